//! Appending to the event log (hash-chained) and walking the chain. Every state change of a run
//! or step appends its event in the same transaction as the change.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::Value;

use super::chain::{event_hash, EventFields, GENESIS};
use super::redact::redact;
use super::JournalError;

/// Execute one statement through the connection's statement cache (the hot path of every
/// transition: parsing SQL anew each time would cost more than the rest of the transaction).
pub(crate) fn exec(
    tx: &Transaction<'_>,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(params)
}

/// Append one event inside `tx`. `data` is redacted before it is written. Returns the event id.
pub fn append(
    tx: &Transaction<'_>,
    run_id: Option<&str>,
    step_seq: Option<i64>,
    at: i64,
    kind: &str,
    data: &Value,
) -> Result<i64, JournalError> {
    append_recording(tx, run_id, step_seq, at, kind, data, Vec::new())
}

/// Append an event that also records the rows it creates or changes: each `(key, image)` is
/// added to the redacted `data` as is. Images are read back from the rows, whose JSON columns
/// were redacted when written, so they hold nothing the rows do not; redacting them again would
/// only hide columns whose names look like secrets (`lock_key`) and break the comparison
/// `journal verify` makes.
pub fn append_recording(
    tx: &Transaction<'_>,
    run_id: Option<&str>,
    step_seq: Option<i64>,
    at: i64,
    kind: &str,
    data: &Value,
    rows: Vec<(&str, Value)>,
) -> Result<i64, JournalError> {
    let mut data = redact(data);
    if let Some(m) = data.as_object_mut() {
        for (k, v) in rows {
            m.insert(k.to_owned(), v);
        }
    }
    let data = data.to_string();
    let last: Option<(i64, String)> = tx
        .prepare_cached("SELECT id, hash FROM events ORDER BY id DESC LIMIT 1")
        .and_then(|mut st| st.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(JournalError::from_sqlite)?;
    let (id, prev) = match last {
        Some((id, hash)) => (id + 1, hash),
        // After a prune that removed every event, the chain continues from the checkpoint.
        None => (checkpoint_next_id(tx)?, checkpoint_head(tx)?),
    };
    let hash = event_hash(&prev, &EventFields { id, run_id, step_seq, at, kind, data: &data });
    exec(
        tx,
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

/// Where and why the hash chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hash chain broken at event {event_id}: {reason}")]
pub struct ChainBreak {
    /// The first event that does not verify (0 when the journal could not be read at all).
    pub event_id: i64,
    /// What is wrong with it.
    pub reason: String,
}

/// Walk every event in id order and recompute the chain. Starts at [`GENESIS`] with id 1, or,
/// after a prune, at the checkpoint recorded in meta (`pruned_head_hash`, `pruned_head_id`).
/// Returns the number of events verified.
pub fn verify_chain(conn: &Connection) -> Result<u64, ChainBreak> {
    match walk_chain(conn, None) {
        (walk, None) => Ok(walk.events),
        (_, Some(brk)) => Err(brk),
    }
}

/// How far a chain walk got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainWalk {
    /// Events verified.
    pub events: u64,
    /// Id of the last verified event (the prune anchor's id, or 0, when there is none).
    pub head_id: i64,
    /// Hash of the last verified event (the prune anchor, or [`GENESIS`], when there is none):
    /// the value an auditor records outside the file and later passes to `--expect-head`.
    pub head_hash: String,
    /// Where `find` was met on the verified chain (the anchor counts, as its id), if it was.
    pub found: Option<i64>,
}

/// [`verify_chain`], also returning the head it reached and where the hash `find` (lowercase
/// hex) occurs on the verified part of the chain. The walk stops at the first break.
pub fn walk_chain(conn: &Connection, find: Option<&str>) -> (ChainWalk, Option<ChainBreak>) {
    let mut walk = ChainWalk { events: 0, head_id: 0, head_hash: GENESIS.to_owned(), found: None };
    let brk = walk_into(conn, find, &mut walk).err();
    (walk, brk)
}

fn walk_into(
    conn: &Connection,
    find: Option<&str>,
    walk: &mut ChainWalk,
) -> Result<(), ChainBreak> {
    let read_err =
        |e: rusqlite::Error| ChainBreak { event_id: 0, reason: format!("cannot read events: {e}") };
    let meta = |key: &str| -> Result<Option<String>, ChainBreak> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(read_err)
    };
    let mut prev = meta(META_PRUNED_HEAD)?.unwrap_or_else(|| GENESIS.to_owned());
    let mut expect_id = match meta(META_PRUNED_ID)? {
        Some(v) => {
            v.parse::<i64>().map_err(|_| ChainBreak {
                event_id: 0,
                reason: format!("meta {META_PRUNED_ID} is not a number: {v:?}"),
            })? + 1
        }
        None => 1,
    };
    walk.head_id = expect_id - 1;
    walk.head_hash = prev.clone();
    if find == Some(prev.as_str()) {
        walk.found = Some(walk.head_id);
    }
    let mut stmt = conn
        .prepare(
            "SELECT id, run_id, step_seq, at, kind, data, prev_hash, hash FROM events ORDER BY id",
        )
        .map_err(read_err)?;
    let mut rows = stmt.query([]).map_err(read_err)?;
    while let Some(r) = rows.next().map_err(read_err)? {
        let id: i64 = r.get(0).map_err(read_err)?;
        let run_id: Option<String> = r.get(1).map_err(read_err)?;
        let step_seq: Option<i64> = r.get(2).map_err(read_err)?;
        let at: i64 = r.get(3).map_err(read_err)?;
        let kind: String = r.get(4).map_err(read_err)?;
        let data: String = r.get(5).map_err(read_err)?;
        let prev_hash: String = r.get(6).map_err(read_err)?;
        let hash: String = r.get(7).map_err(read_err)?;
        let brk = |reason: String| ChainBreak { event_id: id, reason };
        if id != expect_id {
            return Err(brk(format!(
                "expected event id {expect_id} (events missing or reordered)"
            )));
        }
        if prev_hash != prev {
            return Err(brk(format!(
                "prev_hash {prev_hash} does not match the previous event's hash {prev}"
            )));
        }
        let fields =
            EventFields { id, run_id: run_id.as_deref(), step_seq, at, kind: &kind, data: &data };
        let want = event_hash(&prev, &fields);
        if hash != want {
            return Err(brk(format!(
                "stored hash {hash} does not match the recomputed {want} (the row was edited)"
            )));
        }
        if find == Some(hash.as_str()) {
            walk.found = Some(id);
        }
        walk.events += 1;
        walk.head_id = id;
        walk.head_hash.clone_from(&hash);
        prev = hash;
        expect_id += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journal;
    use serde_json::json;

    #[test]
    fn verify_chain_accepts_appends_and_follows_the_prune_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open_home(dir.path()).unwrap();
        for i in 0..4 {
            j.write("t", |tx| append(tx, Some("r"), Some(i), i, "k", &json!({"i": i}))).unwrap();
        }
        assert_eq!(verify_chain(j.conn()), Ok(4));
        // Prune the first two events the way `journal prune` does: anchor, then delete.
        j.write("prune", |tx| {
            let h: String = tx.query_row("SELECT hash FROM events WHERE id = 2", [], |r| r.get(0)).map_err(crate::journal::JournalError::from_sqlite)?;
            tx.execute_batch(&format!(
                "INSERT INTO meta VALUES ('prune_in_progress', '1'), ('{META_PRUNED_HEAD}', '{h}'), ('{META_PRUNED_ID}', '2');
                 DELETE FROM events WHERE id <= 2; DELETE FROM meta WHERE key = 'prune_in_progress';"
            ))
            .map_err(crate::journal::JournalError::from_sqlite)
        })
        .unwrap();
        assert_eq!(verify_chain(j.conn()), Ok(2));
        // Removing an event in the middle (bypassing the trigger) is detected.
        j.conn()
            .execute_batch("DROP TRIGGER events_no_delete; DELETE FROM events WHERE id = 3;")
            .unwrap();
        assert_eq!(verify_chain(j.conn()).unwrap_err().event_id, 4);
    }
}
