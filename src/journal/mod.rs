//! The SQLite journal: open, migrate, the run and step state machines, runs/steps/events,
//! audit queries.

pub mod audit;
pub mod chain;
pub mod events;
pub mod redact;
pub mod runs;
pub mod state;
pub mod store;

use std::path::{Path, PathBuf};

pub use events::{verify_chain, ChainBreak};
pub use store::{commit_count, Journal};

use crate::exit::{Exit, ExitCoded};

/// Journal failures, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file was written by a newer nemoclaw.
    #[error("journal {path} has schema version {found}, newer than this nemoclaw supports ({supported}); upgrade nemoclaw to read it (nothing was changed)")]
    TooNew {
        /// Database file.
        path: PathBuf,
        /// Version found.
        found: i64,
        /// Newest version this binary knows.
        supported: i64,
    },
    /// The file is not a usable SQLite journal.
    #[error(
        "journal {path} is corrupt: {detail} (nothing was changed; keep the file for inspection)"
    )]
    Corrupt {
        /// Database file.
        path: PathBuf,
        /// What SQLite said.
        detail: String,
    },
    /// The disk is full.
    #[error("journal {path}: {context}: the disk is full")]
    Full {
        /// Database file.
        path: PathBuf,
        /// What was being done.
        context: String,
    },
    /// A process that stopped while writing left a hot rollback journal (`-journal`) beside
    /// the file: the last committed state can only be read after SQLite rolls it back, which a
    /// read-only open does not do.
    #[error("{}", needs_rollback(path, *read_only_dir))]
    NeedsRollback {
        /// Database file.
        path: PathBuf,
        /// The directory cannot be written (read-only storage).
        read_only_dir: bool,
    },
    /// On read-only storage, a `-wal` holds commits the main file does not have, and without
    /// a `-shm` SQLite cannot read them.
    #[error("journal {path} is on read-only storage with a non-empty `{}` and no usable `-shm`: its latest commits cannot be read there (nothing was changed)", side(path, "-wal"))]
    UnreadableWal {
        /// Database file.
        path: PathBuf,
    },
    /// Other I/O or SQLite failure.
    #[error("journal {path}: {context}: {source}")]
    Io {
        /// Database file or directory.
        path: PathBuf,
        /// What was being done.
        context: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A SQLite error without a better category.
    #[error("journal {path}: {context}: {source}")]
    Sql {
        /// Database file.
        path: PathBuf,
        /// What was being done.
        context: String,
        /// Cause.
        source: rusqlite::Error,
    },
    /// A SQLite error raised inside a transaction closure, before the path is attached.
    #[error("{0}")]
    Raw(rusqlite::Error),
    /// A state change the state machine forbids (the journal is not in the state the writer
    /// expected: another writer changed it, or the rows were edited).
    #[error("journal state does not allow this change: {0}")]
    Transition(#[from] runs::TransitionError),
    /// A record the caller asked for does not exist or is ambiguous.
    #[error("{0}")]
    NotFound(String),
}

fn needs_rollback(path: &Path, read_only_dir: bool) -> String {
    format!(
        "journal {} was left mid-write by a process that stopped (a hot rollback journal `{}` is \
         beside it); {} (nothing was changed)",
        path.display(),
        side(path, "-journal"),
        if read_only_dir {
            "its directory is read-only, so the unfinished write cannot be rolled back there"
        } else {
            "it must be rolled back before it can be read, which this command does not do"
        }
    )
}

fn side(path: &Path, suffix: &str) -> String {
    format!("{}{suffix}", path.display())
}

impl JournalError {
    /// Classify a SQLite error that happened on `path` while doing `context`.
    pub fn sql(path: &Path, context: &str, e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        let path = path.to_path_buf();
        let context = context.to_owned();
        match e.sqlite_error_code() {
            Some(C::NotADatabase) | Some(C::DatabaseCorrupt) => {
                JournalError::Corrupt { path, detail: e.to_string() }
            }
            Some(C::DiskFull) => JournalError::Full { path, context },
            Some(C::ReadOnly) => JournalError::Io {
                path,
                context,
                source: std::io::Error::other(format!(
                    "the journal or its directory is read-only ({e})"
                )),
            },
            Some(C::CannotOpen) | Some(C::PermissionDenied) | Some(C::SystemIoFailure) => {
                JournalError::Io { path, context, source: std::io::Error::other(e.to_string()) }
            }
            _ => JournalError::Sql { path, context, source: e },
        }
    }

    /// Wrap an error from inside a transaction closure.
    pub fn from_sqlite(e: rusqlite::Error) -> Self {
        JournalError::Raw(e)
    }
}

impl ExitCoded for JournalError {
    fn exit(&self) -> Exit {
        match self {
            JournalError::TooNew { .. } | JournalError::Corrupt { .. } => Exit::Corrupt,
            JournalError::Full { .. }
            | JournalError::Io { .. }
            | JournalError::NeedsRollback { .. }
            | JournalError::UnreadableWal { .. } => Exit::Io,
            JournalError::Sql { source, .. } | JournalError::Raw(source) => {
                match source.sqlite_error_code() {
                    Some(rusqlite::ErrorCode::DatabaseBusy)
                    | Some(rusqlite::ErrorCode::DatabaseLocked) => Exit::Busy,
                    Some(rusqlite::ErrorCode::NotADatabase)
                    | Some(rusqlite::ErrorCode::DatabaseCorrupt) => Exit::Corrupt,
                    Some(rusqlite::ErrorCode::DiskFull) => Exit::Io,
                    _ => Exit::Failed,
                }
            }
            JournalError::Transition(_) => Exit::Corrupt,
            JournalError::NotFound(_) => Exit::Usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn migrates_appends_chained_events_and_refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open_home(dir.path()).unwrap();
        let (a, b) = j
            .write("test", |tx| {
                let a = events::append(tx, None, None, 1, "x", &json!({"token": "s"}))?;
                let b = events::append(tx, Some("r"), Some(0), 2, "y", &json!({}))?;
                Ok((a, b))
            })
            .unwrap();
        assert_eq!((a, b), (1, 2));
        let (data, prev2): (String, String) = j
            .conn()
            .query_row(
                "SELECT e1.data, e2.prev_hash FROM events e1, events e2 WHERE e1.id=1 AND e2.id=2",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(data, r#"{"token":"[redacted]"}"#);
        let h1: String =
            j.conn().query_row("SELECT hash FROM events WHERE id=1", [], |r| r.get(0)).unwrap();
        assert_eq!(prev2, h1);
        j.integrity_check().unwrap();
        j.conn().pragma_update(None, "user_version", 99).unwrap();
        drop(j);
        let e = Journal::open_home(dir.path()).unwrap_err();
        assert_eq!(e.exit(), Exit::Corrupt);
        assert!(e.to_string().contains("schema version 99"), "{e}");
    }

    #[test]
    fn events_are_append_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open_home(dir.path()).unwrap();
        j.write("t", |tx| events::append(tx, None, None, 1, "x", &json!({}))).unwrap();
        let e = j.conn().execute("UPDATE events SET kind='z'", []).unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        let e = j.conn().execute("DELETE FROM events", []).unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
    }
}
