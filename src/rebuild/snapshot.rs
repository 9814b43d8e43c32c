//! The run's snapshot file: everything rollback needs to put the host back byte for byte.
//!
//! The registry entry can hold secrets (messaging tokens, credential hashes), and secrets never
//! enter the journal. So the verbatim entry, the shields files and the onboard session live in a
//! 0600 file `<home>/rebuild-runs/<run-id>.json` written atomically and durably, and the journal
//! records its sha256. Rollback refuses a snapshot whose digest does not match the journal.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::StepError;

/// Directory of run snapshots under the NemoClaw home.
pub const RUNS_DIR: &str = "rebuild-runs";

/// The snapshot of the host taken before anything changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The registry entry, verbatim (key order and unknown fields kept).
    pub entry: Value,
    /// Whether the sandbox was `defaultSandbox`.
    pub was_default: bool,
    /// The shields file's bytes (UTF-8 text), `None` when there was no file.
    pub shields_raw: Option<String>,
    /// The shields timer file's bytes, `None` when there was none.
    pub shields_timer_raw: Option<String>,
    /// Whether shields were up (locked) when the run started.
    pub shields_locked: bool,
    /// The onboard session, when it belongs to this sandbox.
    pub session: Option<Value>,
    /// The old sandbox's whole live policy (normal mode, gateways that keep whole policies):
    /// the replacement is created with it and checked against it. `None` = not captured.
    #[serde(default)]
    pub policy: Option<String>,
    /// The row's position in `sandboxes.json`: a rollback puts it back there, byte for byte.
    #[serde(default)]
    pub position: Option<usize>,
}

/// Path of a run's snapshot file.
pub fn path(home: &Path, run_id: &str) -> PathBuf {
    home.join(RUNS_DIR).join(format!("{run_id}.json"))
}

/// Write the snapshot durably; returns its sha256.
pub fn write(home: &Path, run_id: &str, snap: &Snapshot) -> Result<String, StepError> {
    let dir = home.join(RUNS_DIR);
    // Durably: the journal will say the snapshot exists, so after a power cut the directory
    // naming it must exist too, not only the file inside it.
    crate::util::create_dir_durable(&dir)
        .map_err(|e| StepError::new(format!("cannot create {}: {e}", dir.display())).io())?;
    let bytes = serde_json::to_vec_pretty(snap)
        .map_err(|e| StepError::new(format!("cannot encode the snapshot: {e}")))?;
    let p = path(home, run_id);
    crate::util::atomic_write(&p, &bytes)
        .map_err(|e| StepError::new(format!("cannot write {}: {e}", p.display())).io())?;
    Ok(crate::util::sha256_hex(&bytes))
}

/// Read a run's snapshot and check it against the journaled digest.
pub fn read(home: &Path, run_id: &str, expect_sha256: &str) -> Result<Snapshot, StepError> {
    let p = path(home, run_id);
    let bytes = std::fs::read(&p).map_err(|e| {
        StepError::new(format!("cannot read the run snapshot {}: {e}", p.display()))
            .hint("the snapshot is needed to put the registry entry back; restore the file from a backup of the host")
    })?;
    let got = crate::util::sha256_hex(&bytes);
    if got != expect_sha256 {
        return Err(StepError::new(format!(
            "run snapshot {} does not match the journal (sha256 {got}, journaled {expect_sha256}); refusing to use it",
            p.display()
        )));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| StepError::new(format!("run snapshot {} is corrupt: {e}", p.display())))
}

/// Read the snapshot if it exists and parses (for probes: the file's presence is the effect).
pub fn read_unchecked(home: &Path, run_id: &str) -> Option<(Snapshot, String)> {
    let bytes = std::fs::read(path(home, run_id)).ok()?;
    let snap = serde_json::from_slice(&bytes).ok()?;
    Some((snap, crate::util::sha256_hex(&bytes)))
}
