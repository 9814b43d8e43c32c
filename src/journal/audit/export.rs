//! `journal export`: the events in chain order as JSON Lines, in the documented line format.

use std::io::Write;

use super::show::EventRecord;
use super::{sql, AuditError, AUDIT_SCHEMA_VERSION};
use crate::journal::Journal;

/// Filters of `journal export`.
#[derive(Debug, Clone, Default)]
pub struct ExportFilter {
    /// Only events at or after this time (ms).
    pub since: Option<i64>,
    /// Only events of this sandbox's runs.
    pub sandbox: Option<String>,
}

/// One export line (without the trailing newline):
/// `{"schema_version":1,"type":"event","data":{...}}`. `data.data` is the event's JSON; its
/// compact serialisation is the exact text the hash covers.
pub fn export_line(e: &EventRecord, sandbox: Option<&str>) -> String {
    // Built by hand rather than through a `Value`: the stored data text is already compact JSON
    // (the schema CHECKs json_valid), so it is embedded as is, and the line costs no parse.
    // Field order and spelling are the format; `q` quotes and escapes a string.
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "null".to_owned());
    let opt = |s: Option<&str>| s.map(q).unwrap_or_else(|| "null".to_owned());
    let data = if e.data.is_empty() { "null" } else { e.data.as_str() };
    format!(
        "{{\"schema_version\":{AUDIT_SCHEMA_VERSION},\"type\":\"event\",\"data\":{{\"id\":{},\"at\":{},\
         \"at_iso\":\"{}\",\"run_id\":{},\"sandbox\":{},\"step_seq\":{},\"kind\":{},\"data\":{data},\
         \"prev_hash\":{},\"hash\":{}}}}}",
        e.id,
        e.at,
        crate::util::iso_ms(e.at),
        opt(e.run_id.as_deref()),
        opt(sandbox),
        e.step_seq.map(|s| s.to_string()).unwrap_or_else(|| "null".to_owned()),
        q(&e.kind),
        q(&e.prev_hash),
        q(&e.hash),
    )
}

/// Stream matching events in chain order to `out` as JSON Lines. Returns how many were written.
/// A closed pipe (`| head`) ends the export quietly.
pub fn export(j: &Journal, f: &ExportFilter, out: &mut impl Write) -> Result<u64, AuditError> {
    let p = j.path();
    // Events are walked in id order (the primary key); the sandbox filter is an IN-list that
    // SQLite materialises once from `runs_by_sandbox`, so memory does not grow with the journal.
    let q = format!(
        "SELECT e.id, e.run_id, e.step_seq, e.at, e.kind, e.data, e.prev_hash, e.hash, \
         (SELECT r.sandbox FROM runs r WHERE r.id = e.run_id) \
         FROM events e WHERE (?1 IS NULL OR e.at >= ?1) {} ORDER BY e.id",
        if f.sandbox.is_some() {
            "AND e.run_id IN (SELECT id FROM runs WHERE sandbox = ?2)"
        } else {
            "AND ?2 IS NULL"
        }
    );
    let mut stmt = j.conn().prepare(&q).map_err(sql(p, "cannot export events"))?;
    let mut rows = stmt
        .query(rusqlite::params![f.since, f.sandbox])
        .map_err(sql(p, "cannot export events"))?;
    let mut n = 0u64;
    while let Some(row) = rows.next().map_err(sql(p, "cannot export events"))? {
        let e = EventRecord::from_row(row).map_err(sql(p, "cannot read an event"))?;
        let sandbox: Option<String> = row.get(8).map_err(sql(p, "cannot read an event"))?;
        let line = export_line(&e, sandbox.as_deref());
        if let Err(err) = writeln!(out, "{line}") {
            if err.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(n);
            }
            return Err(AuditError::Output(err));
        }
        n += 1;
    }
    match out.flush() {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(AuditError::Output(err)),
        _ => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn export_line_is_valid_json_with_the_documented_fields() {
        let e = EventRecord {
            id: 7,
            run_id: Some("r\"1".into()),
            step_seq: Some(2),
            at: 1_780_308_000_000,
            kind: "step_done".into(),
            data: r#"{"name":"x","s":"a\nb"}"#.into(),
            prev_hash: "p".into(),
            hash: "h".into(),
        };
        let v: Value = serde_json::from_str(&export_line(&e, None)).unwrap();
        assert_eq!(
            v,
            json!({"schema_version": 1, "type": "event", "data": {
                "id": 7, "at": 1_780_308_000_000_i64, "at_iso": "2026-06-01T10:00:00.000Z",
                "run_id": "r\"1", "sandbox": null, "step_seq": 2, "kind": "step_done",
                "data": {"name": "x", "s": "a\nb"}, "prev_hash": "p", "hash": "h"}})
        );
        assert_eq!(v["data"]["data"].to_string(), e.data);
    }
}
