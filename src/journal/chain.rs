//! The event hash chain: one definition of how an event is hashed, used by the writer and by
//! `journal verify`. Changing this function is a schema change.

use sha2::{Digest, Sha256};

/// `prev_hash` of the first event of a journal.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The fields of an event that the chain covers.
#[derive(Debug, Clone, Copy)]
pub struct EventFields<'a> {
    /// Row id (`events.id`).
    pub id: i64,
    /// Run the event belongs to, if any.
    pub run_id: Option<&'a str>,
    /// Step the event belongs to, if any.
    pub step_seq: Option<i64>,
    /// Milliseconds since the epoch.
    pub at: i64,
    /// Event kind, e.g. `step_started`.
    pub kind: &'a str,
    /// JSON text exactly as stored.
    pub data: &'a str,
}

/// `sha256(prev_hash | id | run_id | step_seq | at | kind | data)` as lowercase hex, with NULLs
/// written as empty strings. Reproducible in the `sqlite3` shell documentation.
pub fn event_hash(prev_hash: &str, e: &EventFields<'_>) -> String {
    let mut h = Sha256::new();
    let seq = e.step_seq.map(|s| s.to_string()).unwrap_or_default();
    for (i, part) in [
        prev_hash,
        &e.id.to_string(),
        e.run_id.unwrap_or(""),
        &seq,
        &e.at.to_string(),
        e.kind,
        e.data,
    ]
    .iter()
    .enumerate()
    {
        if i > 0 {
            h.update(b"|");
        }
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_field_sensitive() {
        let e =
            EventFields { id: 1, run_id: Some("r"), step_seq: None, at: 5, kind: "k", data: "{}" };
        let a = event_hash(GENESIS, &e);
        // Pinned: `printf '%s' "$GENESIS|1|r||5|k|{}" | sha256sum`.
        assert_eq!(a, crate::util::sha256_hex(format!("{GENESIS}|1|r||5|k|{{}}").as_bytes()));
        let e2 = EventFields { data: "{\"x\":1}", ..e };
        assert_ne!(a, event_hash(GENESIS, &e2));
        assert_ne!(a, event_hash(&a, &e));
    }
}
