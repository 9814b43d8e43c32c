//! `journal verify`: SQLite integrity, the hash chain from the prune anchor, the consistency of
//! runs, steps and events, every stored column against the row images the events recorded, and
//! an optional external anchor (`--expect-head`).

use std::borrow::Cow;

use rusqlite::OptionalExtension;
use serde::Serialize;

use super::prune::chain_anchor;
use super::rows::check_rows;
use super::show::EventRecord;
use super::{sql, AuditError, RUN_STATES, STEP_STATES};
use crate::exit::{Exit, ExitCoded};
use crate::journal::chain::GENESIS;
use crate::journal::events;
use crate::journal::runs::{
    column_text, RunState, StepState, RUN_IMAGE_COLUMNS, STEP_IMAGE_COLUMNS,
};
use crate::journal::{Journal, JournalError};

/// Which check found a problem.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// SQLite `PRAGMA integrity_check`.
    Integrity,
    /// The event hash chain.
    Chain,
    /// Runs, steps and events agree with each other.
    Consistency,
    /// Every stored column equals what the (hash-chained) events recorded for it.
    Rows,
    /// The chain contains the head an auditor recorded earlier (`--expect-head`).
    Anchor,
}

/// One problem found by [`verify`], naming the first bad row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    /// Which check.
    pub check: Check,
    /// The event concerned, if any.
    pub event_id: Option<i64>,
    /// The run concerned, if any.
    pub run_id: Option<String>,
    /// What is wrong.
    pub detail: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerifyReport {
    /// Nothing wrong.
    pub ok: bool,
    /// Events walked.
    pub events_checked: u64,
    /// Runs checked.
    pub runs_checked: u64,
    /// Steps checked.
    pub steps_checked: u64,
    /// Id of the last pruned event (the chain's anchor), if any prune happened.
    pub pruned_head_id: Option<i64>,
    /// Runs created before events recorded whole rows (schema 1): only the columns their
    /// `run_created` recorded are compared (see docs/journal.md).
    pub legacy_runs: u64,
    /// The last verified event: record it outside the journal, pass it to `--expect-head`.
    pub head: Head,
    /// The `--expect-head` check, when asked for.
    pub expect_head: Option<ExpectHead>,
    /// Problems: at most the first of the chain, and the first few of the others.
    pub problems: Vec<Problem>,
}

/// The head of the verified chain.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Head {
    /// Event id (0 for an empty journal; the prune anchor's id when nothing is left after it).
    pub id: i64,
    /// Its hash (64 zeros for an empty journal).
    pub hash: String,
}

/// The outcome of `--expect-head`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ExpectHead {
    /// The hash given.
    pub hash: String,
    /// The event it is on the verified chain, if it is there.
    pub found_at: Option<i64>,
    /// Events appended after it.
    pub events_since: Option<i64>,
}

/// An `--expect-head` value that is not a SHA-256 in hex.
#[derive(Debug, thiserror::Error)]
#[error("invalid `--expect-head` value `{0}`: expected the 64 hex digits `journal verify` prints as the head")]
pub struct BadHead(pub String);

impl ExitCoded for BadHead {
    fn exit(&self) -> Exit {
        Exit::Usage
    }
}

/// Parse an `--expect-head` value (the head hash `journal verify` prints); returns it in
/// lowercase.
pub fn parse_head(s: &str) -> Result<String, BadHead> {
    let h = s.trim().to_ascii_lowercase();
    if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(h)
    } else {
        Err(BadHead(s.to_owned()))
    }
}

/// How many consistency problems are reported before stopping to collect them.
const MAX_PROBLEMS: usize = 20;

/// Check the journal: SQLite integrity, the hash chain from the prune anchor (or genesis) to
/// the last event, and consistency of runs, steps and events. Memory stays flat: every pass is
/// one streaming statement, and per-run state lives only while that run is being checked.
///
/// `expect_head` (a lowercase hash from [`parse_head`]) is an anchor kept outside the file: the
/// check fails unless that hash is on the verified chain, which a wholesale rewrite of the
/// journal cannot keep.
pub fn verify(j: &Journal, expect_head: Option<&str>) -> Result<VerifyReport, AuditError> {
    let mut report = VerifyReport {
        ok: true,
        events_checked: 0,
        runs_checked: 0,
        steps_checked: 0,
        pruned_head_id: None,
        legacy_runs: 0,
        head: Head { id: 0, hash: GENESIS.to_owned() },
        expect_head: None,
        problems: Vec::new(),
    };
    match j.integrity_check() {
        Ok(()) => {}
        Err(JournalError::Corrupt { detail, .. }) => {
            // A damaged file makes every other answer unreliable: stop here.
            report.problems.push(Problem {
                check: Check::Integrity,
                event_id: None,
                run_id: None,
                detail,
            });
            report.ok = false;
            return Ok(report);
        }
        Err(e) => return Err(e.into()),
    }
    // The chain walk is the one the engine's tests use (events::verify_chain): one definition
    // of "the chain is intact".
    let (anchor_id, _) = chain_anchor(j.conn()).map_err(sql(j.path(), "cannot read meta"))?;
    report.pruned_head_id = (anchor_id > 0).then_some(anchor_id);
    let (walk, broken) = events::walk_chain(j.conn(), expect_head);
    report.events_checked = walk.events;
    report.head = Head { id: walk.head_id, hash: walk.head_hash.clone() };
    if let Some(bad) = &broken {
        let run_id = j
            .conn()
            .query_row("SELECT run_id FROM events WHERE id = ?1", [bad.event_id], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()
            .ok()
            .flatten()
            .flatten();
        report.problems.push(Problem {
            check: Check::Chain,
            event_id: Some(bad.event_id),
            run_id,
            detail: bad.reason.clone(),
        });
    }
    if let Some(h) = expect_head {
        let found_at = walk.found;
        report.expect_head = Some(ExpectHead {
            hash: h.to_owned(),
            found_at,
            events_since: found_at.map(|f| walk.head_id - f),
        });
        if found_at.is_none() {
            let detail = match &broken {
                Some(b) => format!(
                    "the expected head {h} is not on the chain before it breaks at event {}, so it \
                     cannot be confirmed",
                    b.event_id
                ),
                None => format!(
                    "the expected head {h} is not on the chain (whose head is event {} {}): the \
                     journal was rewritten or replaced{}",
                    walk.head_id,
                    walk.head_hash,
                    report
                        .pruned_head_id
                        .map(|k| format!(
                            ", or the anchored event was pruned (events up to {k} were), which \
                             leaves nothing to compare it with"
                        ))
                        .unwrap_or_default()
                ),
            };
            report.problems.push(Problem {
                check: Check::Anchor,
                event_id: None,
                run_id: None,
                detail,
            });
        }
    }
    consistency(j, &mut report).map_err(sql(j.path(), "cannot check consistency"))?;
    report.ok = report.problems.is_empty();
    Ok(report)
}

/// Whether a run may go from `from` to `to`: the engine's one transition function.
fn run_transition_ok(from: &str, to: &str) -> bool {
    match (RunState::parse(from), RunState::parse(to)) {
        (Some(f), Some(t)) => RunState::transition(f, t).is_ok(),
        _ => false,
    }
}

/// Whether a step may go from `from` to `to`: the engine's one transition function.
fn step_transition_ok(from: &str, to: &str) -> bool {
    match (StepState::parse(from), StepState::parse(to)) {
        (Some(f), Some(t)) => StepState::transition(f, t).is_ok(),
        _ => false,
    }
}

/// The only fields of a state-change event the consistency check needs (parsed without
/// building a full `Value`: this runs once per event).
#[derive(Debug, Default, serde::Deserialize)]
struct FromTo<'a> {
    #[serde(borrow)]
    from: Option<Cow<'a, str>>,
}

/// A stored run, as the checks compare it.
pub(super) struct RunRow {
    pub(super) id: String,
    pub(super) state: String,
    /// The stored columns, [`RUN_IMAGE_COLUMNS`] order, as row-image JSON text.
    pub(super) cols: Vec<String>,
}

/// A stored step, as the checks compare it.
pub(super) struct StepRow {
    pub(super) run_id: String,
    pub(super) seq: i64,
    pub(super) state: String,
    /// The stored columns, [`STEP_IMAGE_COLUMNS`] order, as row-image JSON text.
    pub(super) cols: Vec<String>,
}

fn image_cols(r: &rusqlite::Row<'_>, from: usize, cols: &[&str]) -> rusqlite::Result<Vec<String>> {
    cols.iter().enumerate().map(|(i, c)| Ok(column_text(c, r.get_ref(from + i)?))).collect()
}

fn consistency(j: &Journal, report: &mut VerifyReport) -> rusqlite::Result<()> {
    let conn = j.conn();
    let problem =
        |report: &mut VerifyReport, check: Check, run: &str, ev: Option<i64>, d: String| {
            if report.problems.len() < MAX_PROBLEMS {
                report.problems.push(Problem {
                    check,
                    event_id: ev,
                    run_id: Some(run.to_owned()),
                    detail: d,
                });
            }
        };

    // Three streams in run-id order, merged: runs (primary key), steps (primary key
    // run_id, seq) and events (index events_by_run). One run's steps and events are in memory
    // at a time.
    let mut runs_stmt = conn.prepare(&format!(
        "SELECT id, state, {} FROM runs ORDER BY id",
        RUN_IMAGE_COLUMNS.join(", ")
    ))?;
    let mut runs = runs_stmt
        .query_map([], |r| {
            Ok(RunRow {
                id: r.get(0)?,
                state: r.get(1)?,
                cols: image_cols(r, 2, RUN_IMAGE_COLUMNS)?,
            })
        })?
        .peekable();
    let mut steps_stmt = conn.prepare(&format!(
        "SELECT run_id, seq, state, {} FROM steps ORDER BY run_id, seq",
        STEP_IMAGE_COLUMNS.join(", ")
    ))?;
    let mut steps = steps_stmt
        .query_map([], |r| {
            Ok(StepRow {
                run_id: r.get(0)?,
                seq: r.get(1)?,
                state: r.get(2)?,
                cols: image_cols(r, 3, STEP_IMAGE_COLUMNS)?,
            })
        })?
        .peekable();
    // The hashes were checked by the chain pass; not reading them again saves a copy per row.
    let mut ev_stmt = conn.prepare(
        "SELECT id, run_id, step_seq, at, kind, data, '', '' FROM events \
         WHERE run_id IS NOT NULL ORDER BY run_id, id",
    )?;
    let mut evs = ev_stmt.query_map([], EventRecord::from_row)?.peekable();

    loop {
        // The next run id present in any stream.
        let next = {
            let a = match runs.peek() {
                Some(Ok(r)) => Some(r.id.clone()),
                Some(Err(_)) => return runs.next().transpose().map(|_| ()),
                None => None,
            };
            let b = match steps.peek() {
                Some(Ok(s)) => Some(s.run_id.clone()),
                Some(Err(_)) => return steps.next().transpose().map(|_| ()),
                None => None,
            };
            let c = match evs.peek() {
                Some(Ok(e)) => e.run_id.clone(),
                Some(Err(_)) => return evs.next().transpose().map(|_| ()),
                None => None,
            };
            [a, b, c].into_iter().flatten().min()
        };
        let Some(id) = next else { break };
        let run = match runs.peek() {
            Some(Ok(r)) if r.id == id => runs.next().transpose()?,
            _ => None,
        };
        let mut run_steps: Vec<StepRow> = Vec::new();
        while let Some(Ok(s)) = steps.peek() {
            if s.run_id != id {
                break;
            }
            if let Some(s) = steps.next().transpose()? {
                run_steps.push(s);
            }
        }
        let mut run_events: Vec<EventRecord> = Vec::new();
        while let Some(Ok(e)) = evs.peek() {
            if e.run_id.as_deref() != Some(id.as_str()) {
                break;
            }
            if let Some(e) = evs.next().transpose()? {
                run_events.push(e);
            }
        }
        report.steps_checked += run_steps.len() as u64;
        let Some(run) = run else {
            let ev = run_events.first().map(|e| e.id);
            let d = if run_events.is_empty() {
                "steps exist for a run that does not exist".to_owned()
            } else {
                "events refer to a run that does not exist".to_owned()
            };
            problem(report, Check::Consistency, &id, ev, d);
            continue;
        };
        report.runs_checked += 1;
        let replayed = check_run(&run, &run_steps, &run_events);
        let created =
            replayed.is_empty() || run_events.first().is_some_and(|e| e.kind == "run_created");
        for (at, d) in replayed {
            problem(report, Check::Consistency, &run.id, at, d);
        }
        if created && !run_events.is_empty() {
            let (bad, legacy) = check_rows(&run, &run_steps, &run_events);
            report.legacy_runs += u64::from(legacy);
            for (at, d) in bad {
                problem(report, Check::Rows, &run.id, at, d);
            }
        }
        if report.problems.len() >= MAX_PROBLEMS {
            break;
        }
    }

    // A run marked running must have a holder: otherwise nobody is running it and nothing
    // will ever report it as interrupted.
    let mut stmt = conn.prepare(
        "SELECT id FROM runs WHERE state = 'running' \
         AND NOT EXISTS (SELECT 1 FROM holders h WHERE h.run_id = runs.id) ORDER BY id",
    )?;
    let orphans: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    for id in orphans {
        problem(
            report,
            Check::Consistency,
            &id,
            None,
            "run is `running` but no holder row names it".to_owned(),
        );
    }
    Ok(())
}

/// Replay one run's events against its row and steps. Returns `(event id, problem)` pairs.
fn check_run(
    run: &RunRow,
    steps: &[StepRow],
    events: &[EventRecord],
) -> Vec<(Option<i64>, String)> {
    let mut out = Vec::new();
    let Some(first) = events.first() else {
        out.push((None, "run has no events (expected `run_created` first)".to_owned()));
        return out;
    };
    if first.kind != "run_created" {
        out.push((Some(first.id), format!("first event is `{}`, not `run_created`", first.kind)));
        return out;
    }
    let mut run_state = "running".to_owned();
    let mut state: Vec<String> = steps.iter().map(|_| "pending".to_owned()).collect();
    let index = |seq: i64| steps.iter().position(|s| s.seq == seq);
    for e in &events[1..] {
        // State changes are `run_<to>` / `step_<to>` events carrying `from`; any other kind
        // (takeover, notes, ...) changes no state and is not checked here.
        let (is_step, to) = if let Some(t) = e.kind.strip_prefix("step_") {
            (true, t)
        } else if let Some(t) = e.kind.strip_prefix("run_") {
            (false, t)
        } else {
            continue;
        };
        let known = if is_step { STEP_STATES.contains(&to) } else { RUN_STATES.contains(&to) };
        if !known {
            continue;
        }
        let d: FromTo<'_> = serde_json::from_str(&e.data).unwrap_or_default();
        let from: &str = d.from.as_deref().unwrap_or("");
        if !is_step {
            if from != run_state || !run_transition_ok(&run_state, to) {
                out.push((
                    Some(e.id),
                    format!("`{}` from `{from}`, but the run was `{run_state}`", e.kind),
                ));
                return out;
            }
            run_state = to.to_owned();
            continue;
        }
        let Some(i) = e.step_seq.and_then(index) else {
            out.push((Some(e.id), format!("`{}` names a step that does not exist", e.kind)));
            return out;
        };
        if from != state[i] || !step_transition_ok(&state[i], to) {
            out.push((
                Some(e.id),
                format!(
                    "step {} `{}` from `{from}`, but the step was `{}`",
                    steps[i].seq, e.kind, state[i]
                ),
            ));
            return out;
        }
        // Forward steps run in plan order: starting or finishing step k needs every earlier
        // step done.
        if matches!(to, "started" | "done") {
            if let Some(k) = state[..i].iter().position(|s| s != "done") {
                out.push((
                    Some(e.id),
                    format!(
                        "step {} `{}` while earlier step {} is `{}`",
                        steps[i].seq, e.kind, steps[k].seq, state[k]
                    ),
                ));
                return out;
            }
        }
        state[i] = to.to_owned();
    }
    let last = events.last().map(|e| e.id);
    if run_state != run.state {
        out.push((last, format!("run is `{}` but its events end in `{run_state}`", run.state)));
    }
    for (s, derived) in steps.iter().zip(&state) {
        if s.state != *derived {
            out.push((
                last,
                format!("step {} is `{}` but its events end in `{derived}`", s.seq, s.state),
            ));
        }
    }
    out
}
