//! The way out of a run whose backup no longer verifies (bit rot, files deleted by hand):
//! `nemoclaw recover --rollback RUN --accept-damaged-backup`.
//!
//! Without it, a rollback (or resume) that needs the backup stops before restoring anything,
//! every time, naming the files that fail. With it, `recover` first checks the backup itself
//! and, only when it really is damaged, journals the operator's decision (`damaged_backup_accepted`,
//! with the backup's path and every failing file) before the rollback runs; the rollback then
//! puts the registry row back, removes (or never creates) the replacement sandbox, and leaves
//! the backup where it is. A backup that verifies is restored as usual: the flag never skips a
//! good backup, and nothing is ever restored from a bad one.

use serde_json::json;

use super::data::BackupOutput;
use super::saga::SagaError;
use super::steps::checked_backup;
use crate::engine::decode;
use crate::journal::{runs, Journal};

/// What `recover` found when asked to accept a damaged backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupCheck {
    /// The run made no backup (stale mode, or it never got that far): nothing to accept.
    NoBackup,
    /// The backup verifies; it will be restored.
    Intact {
        /// The backup directory.
        path: String,
    },
    /// The backup fails verification; the acceptance is journaled.
    Damaged {
        /// The backup directory.
        path: String,
        /// Why, naming every file that failed.
        why: String,
    },
}

/// Check the backup of `run_id` and, when it is damaged, journal that the operator accepted
/// rolling back without it (one event, written before the rollback changes anything). A backup
/// output that does not decode is corrupt input ([`SagaError::Data`]), and nothing is journaled.
pub fn accept_damaged_backup(
    journal: &mut Journal,
    run_id: &str,
) -> Result<BackupCheck, SagaError> {
    let steps = runs::steps(journal.conn(), run_id)?;
    let Some(out) = steps.iter().find(|s| s.name == "backup").and_then(|s| s.output.as_ref())
    else {
        return Ok(BackupCheck::NoBackup);
    };
    let out: BackupOutput = decode("output of step `backup`", out)
        .map_err(|source| SagaError::Data { run_id: run_id.to_owned(), source })?;
    let path = out.backup_path.clone();
    let why = match checked_backup(&out) {
        Ok(Ok(_)) => return Ok(BackupCheck::Intact { path }),
        Ok(Err(why)) => why,
        Err(e) => e.message,
    };
    let now = crate::util::now_ms();
    journal.write("record the accepted damaged backup", |tx| {
        runs::run_event(
            tx,
            run_id,
            "damaged_backup_accepted",
            now,
            json!({
                "backup_path": path,
                "error": why,
                "restore": "skipped: the rollback restores nothing from this backup",
            }),
        )
    })?;
    Ok(BackupCheck::Damaged { path, why })
}
