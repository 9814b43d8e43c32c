//! Appending to the event log (hash-chained) and walking the chain. Every state change of a run
//! or step appends its event in the same transaction as the change.

use rusqlite::{params, OptionalExtension, Transaction};
use serde_json::Value;

use super::chain::{event_hash, EventFields, GENESIS};
use super::redact::redact;
use super::JournalError;

/// Append one event inside `tx`. `data` is redacted before it is written. Returns the event id.
pub fn append(
    tx: &Transaction<'_>,
    run_id: Option<&str>,
    step_seq: Option<i64>,
    at: i64,
    kind: &str,
    data: &Value,
) -> Result<i64, JournalError> {
    let data = redact(data).to_string();
    let last: Option<(i64, String)> = tx
        .query_row("SELECT id, hash FROM events ORDER BY id DESC LIMIT 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(JournalError::from_sqlite)?;
    let (id, prev) = match last {
        Some((id, hash)) => (id + 1, hash),
        // After a prune that removed every event, the chain continues from the checkpoint.
        None => (checkpoint_next_id(tx)?, checkpoint_head(tx)?),
    };
    let hash = event_hash(&prev, &EventFields { id, run_id, step_seq, at, kind, data: &data });
    tx.execute(
        "INSERT INTO events (id, run_id, step_seq, at, kind, data, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![id, run_id, step_seq, at, kind, data, prev, hash],
    )
    .map_err(JournalError::from_sqlite)?;
    Ok(id)
}

/// meta key holding the hash of the last event removed by prune (the chain's new anchor).
pub const META_PRUNED_HEAD: &str = "pruned_head_hash";
/// meta key holding the id of the last event removed by prune.
pub const META_PRUNED_ID: &str = "pruned_head_id";

fn meta(tx: &Transaction<'_>, key: &str) -> Result<Option<String>, JournalError> {
    tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(JournalError::from_sqlite)
}

fn checkpoint_head(tx: &Transaction<'_>) -> Result<String, JournalError> {
    Ok(meta(tx, META_PRUNED_HEAD)?.unwrap_or_else(|| GENESIS.to_owned()))
}

fn checkpoint_next_id(tx: &Transaction<'_>) -> Result<i64, JournalError> {
    Ok(meta(tx, META_PRUNED_ID)?.and_then(|v| v.parse::<i64>().ok()).unwrap_or(0) + 1)
}
