//! `journal prune`: remove a prefix of finished runs and their events in one IMMEDIATE
//! transaction, leave the anchor that keeps the rest of the chain verifiable, then remove the
//! pruned runs' files.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Transaction};
use serde::Serialize;
use serde_json::{json, Value};

use super::show::artifacts_in;
use super::{AuditError, BACKUPS_DIR, FINISHED_STATES, META_PRUNE_IN_PROGRESS};
use crate::journal::chain::GENESIS;
use crate::journal::events::{self, META_PRUNED_HEAD, META_PRUNED_ID};
use crate::journal::{Journal, JournalError};

/// What `journal prune` is asked to do.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// NemoClaw home (backups are only removed under `<home>/rebuild-backups/`).
    pub home: PathBuf,
    /// Only runs finished before `now_ms - older_than_ms`.
    pub older_than_ms: i64,
    /// The clock.
    pub now_ms: i64,
    /// Report, change nothing.
    pub dry_run: bool,
    /// Leave backup directories in place.
    pub keep_backups: bool,
}

/// What `journal prune` did (or would do).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PruneReport {
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
    /// Backup directories removed (or that would be).
    pub backups_removed: Vec<String>,
    /// Backup paths kept because another run still references them, or outside the backups
    /// directory, or `--keep-backups`.
    pub backups_kept: Vec<String>,
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

fn is_under(base: &Path, p: &Path) -> bool {
    p.is_absolute()
        && p.starts_with(base)
        && p != base
        && !p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir))
}

/// Whether `p`'s parent, with symlinks resolved, is still under `base` resolved: a symlinked
/// directory on the way must not lead a removal outside the backups directory.
fn resolves_under(base: &Path, p: &Path) -> bool {
    match (p.parent().map(std::fs::canonicalize), std::fs::canonicalize(base)) {
        (Some(Ok(parent)), Ok(base)) => parent.starts_with(base),
        // Already gone: nothing to remove, nothing to escape through.
        (Some(Err(e)), Ok(_)) => e.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// Remove finished runs (succeeded, rolled back) that finished before `now - older_than`,
/// with their events and — unless `keep_backups` — their backup directories.
///
/// Only a prefix of the event chain can go: events `<= K` are removed where K is found by
/// [`find_prefix`]; meta `pruned_head_hash`/`pruned_head_id` anchor the rest of the chain, and a
/// `prune` checkpoint event records what was removed. All in one IMMEDIATE transaction; backup
/// directories are removed only after it commits (an orphaned directory is harmless, a journal
/// naming a missing backup of a run that still needs it is not — and such backups are never
/// candidates anyway).
pub fn prune(j: &mut Journal, o: &PruneOptions) -> Result<PruneReport, AuditError> {
    let cutoff = o.now_ms - o.older_than_ms;
    let backups_base = o.home.join(BACKUPS_DIR);
    let dry_run = o.dry_run;
    let keep_backups = o.keep_backups;
    let older_than_ms = o.older_than_ms;
    let now = o.now_ms;
    let report = j.write("cannot prune the journal", |tx| {
        let raw = JournalError::from_sqlite;
        let k = find_prefix(tx, cutoff).map_err(raw)?;
        let mut report = PruneReport {
            dry_run,
            cutoff,
            runs_removed: Vec::new(),
            events_removed: 0,
            pruned_through: k,
            backups_removed: Vec::new(),
            backups_kept: Vec::new(),
            eligible_remaining: 0,
            checkpoint_event: None,
        };
        let k_val = k.unwrap_or(i64::MIN);
        report.events_removed = tx
            .query_row("SELECT count(*) FROM events WHERE id <= ?1", [k_val], |r| r.get(0))
            .map_err(raw)?;
        let mut stmt = tx
            .prepare(
                "SELECT DISTINCT run_id FROM events WHERE id <= ?1 AND run_id IS NOT NULL \
                 ORDER BY run_id",
            )
            .map_err(raw)?;
        report.runs_removed =
            stmt.query_map([k_val], |r| r.get(0)).and_then(|it| it.collect()).map_err(raw)?;
        drop(stmt);
        report.eligible_remaining = tx
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

        // Backups: those named by removed runs, minus any named by a run that stays.
        let removed: BTreeSet<&str> = report.runs_removed.iter().map(String::as_str).collect();
        let mut stmt = tx
            .prepare("SELECT run_id, name, output FROM steps WHERE output IS NOT NULL")
            .map_err(raw)?;
        let mut rows = stmt.query([]).map_err(raw)?;
        let mut candidates = BTreeSet::new();
        let mut protected = BTreeSet::new();
        while let Some(r) = rows.next().map_err(raw)? {
            let run: String = r.get(0).map_err(raw)?;
            let name: String = r.get(1).map_err(raw)?;
            let out: String = r.get(2).map_err(raw)?;
            if !out.contains("backup_path") {
                continue;
            }
            let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
            for a in artifacts_in(&name, &v) {
                if removed.contains(run.as_str()) {
                    candidates.insert(a.path);
                } else {
                    protected.insert(a.path);
                }
            }
        }
        drop(rows);
        drop(stmt);
        for p in candidates {
            let pb = PathBuf::from(&p);
            if keep_backups
                || protected.contains(&p)
                || !is_under(&backups_base, &pb)
                || !resolves_under(&backups_base, &pb)
            {
                report.backups_kept.push(p);
            } else {
                report.backups_removed.push(p);
            }
        }
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
        let ev = events::append(
            tx,
            None,
            None,
            now,
            "prune",
            &json!({
                "older_than_ms": older_than_ms,
                "cutoff": cutoff,
                "pruned_through": k_val,
                "pruned_head_hash": head,
                "events_removed": report.events_removed,
                "runs_removed": report.runs_removed.len(),
                "runs": report.runs_removed,
                "backups_removed": report.backups_removed,
                "keep_backups": keep_backups,
            }),
        )?;
        report.checkpoint_event = Some(ev);
        Ok(report)
    })?;
    if !report.dry_run {
        for b in &report.backups_removed {
            let pb = PathBuf::from(b);
            match std::fs::symlink_metadata(&pb) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&pb)
                    .map_err(|source| AuditError::Backup { path: pb.clone(), source })?,
                Ok(_) => std::fs::remove_file(&pb)
                    .map_err(|source| AuditError::Backup { path: pb.clone(), source })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(AuditError::Backup { path: pb, source }),
            }
        }
        if !report.backups_removed.is_empty() {
            let _ = crate::util::fsync_dir(&backups_base);
        }
        // A pruned run's snapshot file (`<home>/rebuild-runs/<run>.json`, written by plans that
        // keep a private copy of what they must restore) goes with it. Run ids are UUIDs from
        // the journal's own rows, so the path cannot leave that directory.
        let runs_dir = o.home.join(RUN_FILES_DIR);
        for id in &report.runs_removed {
            if uuid::Uuid::parse_str(id).is_ok() {
                let _ = std::fs::remove_file(runs_dir.join(format!("{id}.json")));
            }
        }
    }
    Ok(report)
}

/// Directory of per-run snapshot files under the home (kept in step with the rebuild's).
pub const RUN_FILES_DIR: &str = "rebuild-runs";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_backups_only() {
        let base = Path::new("/h/rebuild-backups");
        assert!(is_under(base, Path::new("/h/rebuild-backups/a/t")));
        assert!(!is_under(base, Path::new("/h/rebuild-backups")));
        assert!(!is_under(base, Path::new("/h/rebuild-backups/../x")));
        assert!(!is_under(base, Path::new("/etc")));
        assert!(!is_under(base, Path::new("rebuild-backups/a")));
    }
}
