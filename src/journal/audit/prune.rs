//! `journal prune`: remove a prefix of finished runs and their events in one IMMEDIATE
//! transaction and leave the anchor that keeps the rest of the chain verifiable. What a plan
//! keeps outside the journal for its runs is the plan's business: prune shows it the pruned
//! and the kept runs' step outputs inside the transaction ([`RunFiles`]), records what it
//! decided in the checkpoint event, and leaves the removal to the caller after the commit.

use std::collections::BTreeSet;

use rusqlite::{Connection, OptionalExtension, Transaction};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{AuditError, FINISHED_STATES, META_PRUNE_IN_PROGRESS};
use crate::journal::chain::GENESIS;
use crate::journal::events::{self, META_PRUNED_HEAD, META_PRUNED_ID};
use crate::journal::{Journal, JournalError};

/// What `journal prune` is asked to do.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Only runs finished before `now_ms - older_than_ms`.
    pub older_than_ms: i64,
    /// The clock.
    pub now_ms: i64,
    /// Report, change nothing.
    pub dry_run: bool,
}

/// What a plan keeps outside the journal for its runs (files its steps' outputs name), as
/// [`prune`] asks about it. Every call happens inside the prune transaction, so the decision
/// matches the runs removed exactly and the checkpoint event can record it.
pub trait RunFiles {
    /// What was decided (reported by [`prune`], its fields flattened into the report).
    type Decision: Serialize;
    /// One journaled step output, as stored (JSON text); `pruned`: its run is being removed.
    fn step_output(&mut self, run_id: &str, step: &str, output: &str, pruned: bool);
    /// After every step output was shown: what goes with the pruned runs and what stays.
    fn decide(&mut self) -> Self::Decision;
    /// What the `prune` checkpoint event records about the decision, after the journal's own
    /// fields.
    fn checkpoint(&self, decision: &Self::Decision) -> Map<String, Value>;
}

/// What `journal prune` did (or would do).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PruneReport<D> {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Cut-off time (ms): runs finished before it are eligible.
    pub cutoff: i64,
    /// Runs removed (or that would be).
    pub runs_removed: Vec<String>,
    /// Events removed: ids `<= pruned_through`.
    pub events_removed: u64,
    /// Last removed event id (the new chain anchor), if any.
    pub pruned_through: Option<i64>,
    /// What the plan decided about its files ([`RunFiles::decide`]).
    #[serde(flatten)]
    pub files: D,
    /// Eligible runs left for a later prune because an unfinished or recent run's events are
    /// interleaved with theirs (the chain can only lose a prefix).
    pub eligible_remaining: u64,
    /// The id of the `prune` checkpoint event.
    pub checkpoint_event: Option<i64>,
}

fn eligible_sql() -> String {
    format!(
        "state IN ({}) AND coalesce(finished_at, updated_at) < ?1 \
         AND NOT EXISTS (SELECT 1 FROM holders h WHERE h.run_id = runs.id)",
        FINISHED_STATES.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ")
    )
}

/// Find K: the largest event id such that every event `<= K` belongs to an eligible run (or to
/// no run), and every run with an event `<= K` has all its events `<= K` (a run is removed
/// whole or not at all). Streams the events in id order; stops at the first ineligible one.
fn find_prefix(tx: &Transaction<'_>, cutoff: i64) -> rusqlite::Result<Option<i64>> {
    let mut eligible =
        tx.prepare_cached(&format!("SELECT 1 FROM runs WHERE id = ?2 AND {}", eligible_sql()))?;
    let mut last_of_run = tx.prepare_cached("SELECT max(id) FROM events WHERE run_id = ?1")?;
    let mut stmt = tx.prepare("SELECT id, run_id FROM events ORDER BY id")?;
    let mut rows = stmt.query([])?;
    let mut k = None;
    // The largest event id of any run seen so far: the prefix may only end at or after it.
    let mut must_reach = i64::MIN;
    let mut current: Option<String> = None;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let run: Option<String> = r.get(1)?;
        if let Some(run) = run {
            if current.as_deref() != Some(run.as_str()) {
                if eligible
                    .query_row(rusqlite::params![cutoff, run], |_| Ok(()))
                    .optional()?
                    .is_none()
                {
                    break;
                }
                let last: i64 = last_of_run.query_row([&run], |r| r.get(0))?;
                must_reach = must_reach.max(last);
                current = Some(run);
            }
        }
        if id >= must_reach {
            k = Some(id);
        }
    }
    Ok(k)
}

/// Remove finished runs (succeeded, rolled back) that finished before `now - older_than`,
/// with their steps and events; `files` decides what goes of what the runs keep outside the
/// journal, which the caller removes once this returns (an orphaned file is harmless, a journal
/// naming a missing file of a run that still needs it is not — and unfinished runs' files are
/// never candidates anyway).
///
/// Only a prefix of the event chain can go: events `<= K` are removed where K is found by
/// `find_prefix`; meta `pruned_head_hash`/`pruned_head_id` anchor the rest of the chain, and a
/// `prune` checkpoint event records what was removed. All in one IMMEDIATE transaction.
pub fn prune<F: RunFiles>(
    j: &mut Journal,
    o: &PruneOptions,
    files: &mut F,
) -> Result<PruneReport<F::Decision>, AuditError> {
    let cutoff = o.now_ms - o.older_than_ms;
    let dry_run = o.dry_run;
    let older_than_ms = o.older_than_ms;
    let now = o.now_ms;
    let report = j.write("cannot prune the journal", |tx| {
        let raw = JournalError::from_sqlite;
        let k = find_prefix(tx, cutoff).map_err(raw)?;
        let k_val = k.unwrap_or(i64::MIN);
        let events_removed: u64 = tx
            .query_row("SELECT count(*) FROM events WHERE id <= ?1", [k_val], |r| r.get(0))
            .map_err(raw)?;
        let mut stmt = tx
            .prepare(
                "SELECT DISTINCT run_id FROM events WHERE id <= ?1 AND run_id IS NOT NULL \
                 ORDER BY run_id",
            )
            .map_err(raw)?;
        let runs_removed: Vec<String> =
            stmt.query_map([k_val], |r| r.get(0)).and_then(|it| it.collect()).map_err(raw)?;
        drop(stmt);
        let eligible_remaining = tx
            .query_row(
                &format!(
                    "SELECT count(*) FROM runs WHERE {} AND NOT EXISTS \
                     (SELECT 1 FROM events e WHERE e.run_id = runs.id AND e.id <= ?2)",
                    eligible_sql()
                ),
                rusqlite::params![cutoff, k_val],
                |r| r.get(0),
            )
            .map_err(raw)?;

        // The plan's files: every step output, of the removed runs and of those that stay.
        let removed: BTreeSet<&str> = runs_removed.iter().map(String::as_str).collect();
        let mut stmt = tx
            .prepare("SELECT run_id, name, output FROM steps WHERE output IS NOT NULL")
            .map_err(raw)?;
        let mut rows = stmt.query([]).map_err(raw)?;
        while let Some(r) = rows.next().map_err(raw)? {
            let run: String = r.get(0).map_err(raw)?;
            let name: String = r.get(1).map_err(raw)?;
            let out: String = r.get(2).map_err(raw)?;
            files.step_output(&run, &name, &out, removed.contains(run.as_str()));
        }
        drop(rows);
        drop(stmt);
        let decision = files.decide();
        let mut report = PruneReport {
            dry_run,
            cutoff,
            runs_removed,
            events_removed,
            pruned_through: k,
            files: decision,
            eligible_remaining,
            checkpoint_event: None,
        };
        if dry_run || k.is_none() {
            return Ok(report);
        }

        // Write order inside the transaction: open the delete guard, delete runs (steps
        // cascade) and the event prefix, move the chain anchor to event K, close the guard,
        // then append the checkpoint — which chains onto the last kept event, or onto the
        // anchor when nothing is left.
        let head: String = tx
            .query_row("SELECT hash FROM events WHERE id = ?1", [k_val], |r| r.get(0))
            .map_err(raw)?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            [META_PRUNE_IN_PROGRESS, &now.to_string()],
        )
        .map_err(raw)?;
        tx.execute(
            "DELETE FROM runs WHERE id IN \
             (SELECT DISTINCT run_id FROM events WHERE id <= ?1 AND run_id IS NOT NULL)",
            [k_val],
        )
        .map_err(raw)?;
        tx.execute("DELETE FROM events WHERE id <= ?1", [k_val]).map_err(raw)?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2), (?3, ?4)",
            [META_PRUNED_HEAD, &head, META_PRUNED_ID, &k_val.to_string()],
        )
        .map_err(raw)?;
        tx.execute("DELETE FROM meta WHERE key = ?1", [META_PRUNE_IN_PROGRESS]).map_err(raw)?;
        let mut data = json!({
            "older_than_ms": older_than_ms,
            "cutoff": cutoff,
            "pruned_through": k_val,
            "pruned_head_hash": head,
            "events_removed": report.events_removed,
            "runs_removed": report.runs_removed.len(),
            "runs": report.runs_removed,
        });
        if let Value::Object(m) = &mut data {
            m.extend(files.checkpoint(&report.files));
        }
        let ev = events::append(tx, None, None, now, "prune", &data)?;
        report.checkpoint_event = Some(ev);
        Ok(report)
    })?;
    Ok(report)
}

/// The chain anchor left by the last prune: `(pruned_head_id, pruned_head_hash)`, or genesis.
pub fn chain_anchor(conn: &Connection) -> rusqlite::Result<(i64, String)> {
    let get = |k: &str| {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get::<_, String>(0))
            .optional()
    };
    let id = get(META_PRUNED_ID)?.and_then(|v| v.parse().ok()).unwrap_or(0);
    let hash = get(META_PRUNED_HEAD)?.unwrap_or_else(|| GENESIS.to_owned());
    Ok((id, hash))
}
