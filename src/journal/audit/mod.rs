//! Audit queries over the journal: list runs, show one run's timeline, export events as JSON
//! Lines, verify integrity / hash chain / consistency, and prune finished runs.
//!
//! Everything here reads with streaming statements (one row at a time) so that a journal with
//! millions of events costs time, not memory. The only writer is [`prune()`], which removes a
//! prefix of the hash chain in one IMMEDIATE transaction and leaves an anchor so that the rest
//! of the chain stays verifiable.
//!
//! One file per command: `list`, `show`, `export`, `verify` (its row-image check in `rows`),
//! `prune`; `time` parses and prints the times they take and show. Their items are re-exported
//! here, where callers find them.

mod export;
mod list;
mod prune;
mod rows;
mod show;
mod time;
mod verify;

use std::path::{Path, PathBuf};

pub use export::{export, export_line, ExportFilter};
pub use list::{list_query_plan, list_runs, LastStep, RunFilter, RunSummary};
pub use prune::{chain_anchor, prune, PruneOptions, PruneReport, RunFiles};
pub use show::{resolve_run, show_run, Artifact, EventRecord, RunDetail, StepView};
pub use time::{human_duration, parse_duration, parse_time, relative_time};
pub use verify::{parse_head, verify, BadHead, Check, ExpectHead, Head, Problem, VerifyReport};

use super::JournalError;
use crate::exit::{Exit, ExitCoded};

/// Version of the `journal export` line format and of the audit `--json` payloads.
pub const AUDIT_SCHEMA_VERSION: u32 = 1;

/// meta key that allows deleting events; set and cleared inside the prune transaction.
pub const META_PRUNE_IN_PROGRESS: &str = "prune_in_progress";

/// Run states after which nothing more will happen to a run. `failed`, `interrupted` and
/// `needs_operator` are not finished: they still need `nemoclaw recover`.
pub const FINISHED_STATES: &[&str] = &["succeeded", "rolled_back"];

/// Every step state the schema allows.
pub const STEP_STATES: &[&str] =
    &["pending", "started", "done", "failed", "compensating", "compensated"];

/// Every run state the schema allows.
pub const RUN_STATES: &[&str] = &[
    "running",
    "succeeded",
    "failed",
    "interrupted",
    "needs_operator",
    "rolling_back",
    "rolled_back",
];

/// Audit failures.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A `--since` / `--until` value that is neither RFC 3339 nor a duration.
    #[error("invalid time `{input}`: use RFC 3339 (`2026-06-01T10:00:00Z`), a date (`2026-06-01`) or a duration before now (`7d`, `12h`, `1h30m`, `45s`)")]
    BadTime {
        /// What was given.
        input: String,
    },
    /// A `--older-than` value that is not a duration.
    #[error("invalid duration `{input}`: use numbers with units, e.g. `30d`, `12h`, `1h30m`, `1min`, `45s`, `2w`")]
    BadDuration {
        /// What was given.
        input: String,
    },
    /// A `--state` value the schema does not know.
    #[error("invalid run state `{input}`: expected one of {}", RUN_STATES.join(", "))]
    BadState {
        /// What was given.
        input: String,
    },
    /// No run matches.
    #[error("no run matches `{prefix}` in journal {path}")]
    UnknownRun {
        /// The id or prefix given.
        prefix: String,
        /// Journal file.
        path: PathBuf,
    },
    /// Several runs match a prefix.
    #[error("run prefix `{prefix}` is ambiguous; it matches: {}", candidates.join(", "))]
    AmbiguousRun {
        /// The prefix given.
        prefix: String,
        /// Up to ten matching ids.
        candidates: Vec<String>,
    },
    /// A journal failure.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Writing the output failed (other than a closed pipe, which ends the output quietly).
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

impl ExitCoded for AuditError {
    fn exit(&self) -> Exit {
        match self {
            AuditError::BadTime { .. }
            | AuditError::BadDuration { .. }
            | AuditError::BadState { .. }
            | AuditError::UnknownRun { .. }
            | AuditError::AmbiguousRun { .. } => Exit::Usage,
            AuditError::Journal(e) => e.exit(),
            AuditError::Output(_) => Exit::Io,
        }
    }
}

fn sql<'a>(path: &'a Path, what: &str) -> impl FnOnce(rusqlite::Error) -> AuditError + 'a {
    let what = what.to_owned();
    move |e| AuditError::Journal(JournalError::sql(path, &what, e))
}
