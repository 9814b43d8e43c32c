//! The runner's failures ([`EngineError`]): what stops a call before or outside a step (step
//! failures are not errors: they are in the [`super::RunReport`]).

use std::path::PathBuf;

use super::step::DataError;
use crate::exit::{Exit, ExitCoded};
use crate::journal::runs::{HolderRecord, RunState};
use crate::journal::JournalError;

/// Runner failures (step failures are not errors: they are in the [`super::RunReport`]).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The journal failed (names the file).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Another live runner holds the key.
    #[error("another nemoclaw is working on `{key}`: {}", holder_text(.holder))]
    Busy {
        /// Lock key.
        key: String,
        /// Lock file.
        lock_path: PathBuf,
        /// What the journal says about the holder.
        holder: Option<Box<HolderRecord>>,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot take the runner lock {path}: {source}")]
    Lock {
        /// Lock file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// `start` found an unfinished run on the same key.
    #[error("run {run_id} on `{key}` is unfinished ({state}); resume or roll it back first")]
    Unfinished {
        /// Lock key.
        key: String,
        /// The unfinished run.
        run_id: String,
        /// Its state.
        state: RunState,
    },
    /// The run's plan is not known to this binary.
    #[error(
        "run {run_id} uses plan `{plan}`, which this nemoclaw does not know; refusing to touch it"
    )]
    UnknownPlan {
        /// Run id.
        run_id: String,
        /// Journaled plan name.
        plan: String,
    },
    /// The run's journaled params or a step's journaled output do not decode as its plan
    /// reads them: corrupt input, refused before anything changes.
    #[error("run {run_id}: {source}; refusing to touch it")]
    Data {
        /// Run id.
        run_id: String,
        /// What did not decode.
        source: DataError,
    },
    /// Something the run's plan needs could not be opened (its gateway driver, say).
    #[error("run {run_id}: {message}")]
    PlanUnavailable {
        /// Run id.
        run_id: String,
        /// What failed.
        message: String,
        /// The exit code of the cause.
        exit: Exit,
    },
    /// The run was made by a different version of its plan.
    #[error("run {run_id} was made by a different `{plan}` plan (fingerprint {recorded}, this nemoclaw has {current}); refusing to continue it with different steps")]
    PlanChanged {
        /// Run id.
        run_id: String,
        /// Plan name.
        plan: String,
        /// Journaled fingerprint.
        recorded: String,
        /// This binary's fingerprint.
        current: String,
    },
    /// The run is in a state the asked action cannot continue.
    #[error("run {run_id} is {state}: {why}")]
    Refused {
        /// Run id.
        run_id: String,
        /// Its state.
        state: RunState,
        /// Why and what to do instead.
        why: String,
    },
}

fn holder_text(h: &Option<Box<HolderRecord>>) -> String {
    match h {
        Some(h) => format!(
            "pid {} on host {}{} holds the lock since {}",
            h.pid,
            h.host,
            h.run_id.as_ref().map(|r| format!(", run {r}")).unwrap_or_default(),
            crate::util::iso_ms(h.acquired_at)
        ),
        None => "the lock is held by a process that has not recorded itself yet".to_owned(),
    }
}

impl ExitCoded for EngineError {
    fn exit(&self) -> Exit {
        match self {
            EngineError::Journal(e) => e.exit(),
            EngineError::Busy { .. } => Exit::Busy,
            EngineError::Lock { .. } => Exit::Io,
            EngineError::Data { .. } => Exit::Corrupt,
            EngineError::PlanUnavailable { exit, .. } => *exit,
            EngineError::Unfinished { .. }
            | EngineError::UnknownPlan { .. }
            | EngineError::PlanChanged { .. }
            | EngineError::Refused { .. } => Exit::Refused,
        }
    }
}

/// Why a [`super::PlanResolver`] could not give a journaled run its plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// This binary does not know the run's plan (refused, exit 3).
    #[error("unknown plan")]
    Unknown,
    /// The run's params do not decode (exit 65).
    #[error(transparent)]
    Data(#[from] DataError),
    /// Something the plan needs could not be opened; `exit` is the cause's code.
    #[error("{message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// The cause's exit code.
        exit: Exit,
    },
}
