//! Opening the journal: durability settings, forward-only migrations, the version guard.
//! The database file is only ever touched through SQLite, never with plain file I/O.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::JournalError;

/// Forward-only migrations, in order. `PRAGMA user_version` = how many are applied.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("../../journal-schema/0001_init.sql")),
    ("0002_row_images", include_str!("../../journal-schema/0002_row_images.sql")),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a writer waits for another writer before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// File name of the journal under the NemoClaw home.
pub const FILE_NAME: &str = "journal.sqlite3";

/// Test hook: `NEMOCLAW_JOURNAL_MAX_PAGES=N` applies `PRAGMA max_page_count=N` at open, so a
/// test can make the journal "full" (SQLITE_FULL) without filling a real disk. The pragma is
/// per-connection (not stored in the file), hence the variable. Not an operator knob.
pub const ENV_MAX_PAGES: &str = "NEMOCLAW_JOURNAL_MAX_PAGES";

static COMMITS: AtomicU64 = AtomicU64::new(0);

/// How many [`Journal::write`] transactions this process has committed (all journals). Used by
/// the benchmark and tests to check the one-commit-per-transition rule.
pub fn commit_count() -> u64 {
    COMMITS.load(Ordering::Relaxed)
}

/// An open journal.
#[derive(Debug)]
pub struct Journal {
    conn: Connection,
    path: PathBuf,
    commits: u64,
}

/// Create the journal file empty with mode 0600 (whatever the umask) before SQLite opens it, so
/// SQLite, which gives `-wal`/`-shm` the main file's mode, never makes them world-readable.
/// Only ever creates an empty file (no content is written with plain file I/O); an existing
/// file is left alone.
fn create_private_file(path: &Path) -> Result<(), JournalError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        // `mode()` is filtered by the umask only towards fewer bits; make it exact.
        Ok(_) => set_private(path),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(JournalError::Io {
                path: path.to_path_buf(),
                context: "cannot create the journal".into(),
                source,
            })
        }
    }
    Ok(())
}

/// chmod 0600 the journal and its `-wal`/`-shm` (if present), best effort: a file this
/// process does not own keeps its mode.
fn restrict_side_files(path: &Path) {
    set_private(path);
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        set_private(Path::new(&side));
    }
}

fn set_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o777 != 0o600 {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
    }
}

/// The `file:` URI of `path` for a read-only open: `mode=ro`, plus `immutable=1` for storage
/// nothing can write. Every byte outside the unreserved set is percent-encoded, so `?`, `#`
/// and `%` in a directory name stay part of the path.
fn readonly_uri(path: &Path, immutable: bool) -> String {
    use std::os::unix::ffi::OsStrExt;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut uri = String::from("file://");
    for &b in abs.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str(if immutable { "?mode=ro&immutable=1" } else { "?mode=ro" });
    uri
}

/// A read-only connection, with the first read done (SQLite opens lazily: the errors that
/// decide between `mode=ro` and `immutable=1` only appear on the first statement).
fn connect_readonly(path: &Path, immutable: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        readonly_uri(path, immutable),
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0))?;
    Ok(conn)
}

fn extended_code(e: &rusqlite::Error) -> Option<i32> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.extended_code),
        _ => None,
    }
}

/// Whether this process may create files in the journal's directory (false on a read-only
/// mount or an immutable directory, even for root).
fn dir_writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Size of `<path><suffix>` (0 when missing). Metadata only: the file is not opened.
fn side_file_len(path: &Path, suffix: &str) -> u64 {
    let mut side = path.as_os_str().to_owned();
    side.push(suffix);
    std::fs::metadata(Path::new(&side)).map(|m| m.len()).unwrap_or(0)
}

/// Let SQLite roll back a hot journal: a read-write connection that creates nothing, switches
/// no mode and migrates nothing; its first read performs the rollback. Closed without a
/// checkpoint, so nothing else is written.
fn roll_back_hot_journal(path: &Path) -> Result<(), JournalError> {
    let err = |e| JournalError::sql(path, "cannot roll back the unfinished write", e);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(err)?;
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0))
        .map_err(err)?;
    conn.close().map_err(|(_, e)| err(e))
}

impl Journal {
    /// The journal of a NemoClaw home: `<home>/journal.sqlite3`, created (and migrated) if needed.
    pub fn open_home(home: &Path) -> Result<Self, JournalError> {
        // Only a missing home is created (0700); an existing one keeps the operator's modes.
        if !home.is_dir() {
            crate::util::create_private_dir(home).map_err(|source| JournalError::Io {
                path: home.to_path_buf(),
                context: "cannot create the NemoClaw home".into(),
                source,
            })?;
        }
        Self::open(&home.join(FILE_NAME))
    }

    /// Open (creating if missing) and migrate the journal at `path`.
    ///
    /// WAL, `synchronous=FULL`, foreign keys on, a busy timeout. Refuses a journal written by a
    /// newer schema and a file that is not a SQLite database.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        // A writer needs the directory (for `-wal` and `-shm`); say so plainly instead of
        // SQLite's "unable to open database file".
        if path.parent().is_some_and(Path::is_dir) && !dir_writable(path) {
            return Err(JournalError::Io {
                path: path.to_path_buf(),
                context: "cannot open the journal for writing".into(),
                source: std::io::Error::other("the journal's directory is read-only"),
            });
        }
        create_private_file(path)?;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| JournalError::sql(path, "cannot open the journal", e))?;
        let mut j = Self { conn, path: path.to_path_buf(), commits: 0 };
        // Before anything writes (switching to WAL rewrites the header): a database with
        // tables but none of our versions is not ours and is left byte-for-byte alone.
        j.conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| JournalError::sql(path, "busy_timeout", e))?;
        j.refuse_foreign()?;
        j.configure()?;
        j.migrate()?;
        restrict_side_files(path);
        Ok(j)
    }

    /// Open an existing journal for reading only (audit commands). Never creates, migrates or
    /// writes anything; a missing file is `Ok(None)`.
    ///
    /// The file is opened with SQLite's `mode=ro`. Where that cannot work because the
    /// directory is not writable (a read-only mount, a forensic copy: SQLite cannot create the
    /// `-shm` a WAL reader needs), it is opened `immutable=1`, which reads the file as it is
    /// and takes no locks — safe because nothing can write there, and only done when no
    /// `-journal` or `-wal` beside it holds changes that an immutable read would not see. A
    /// journal left mid-write by a killed process (a hot `-journal`) is reported as such
    /// ([`JournalError::NeedsRollback`]): rolling it back is a write, left to a writer.
    pub fn open_readonly(path: &Path) -> Result<Option<Self>, JournalError> {
        if !path.exists() {
            return Ok(None);
        }
        let conn = match connect_readonly(path, false) {
            Ok(c) => c,
            Err(e) => {
                let code = extended_code(&e);
                if code == Some(rusqlite::ffi::SQLITE_READONLY_ROLLBACK) {
                    return Err(JournalError::NeedsRollback {
                        path: path.to_path_buf(),
                        read_only_dir: !dir_writable(path),
                    });
                }
                let cannot_share = matches!(
                    code,
                    Some(
                        rusqlite::ffi::SQLITE_CANTOPEN
                            | rusqlite::ffi::SQLITE_READONLY_CANTINIT
                            | rusqlite::ffi::SQLITE_READONLY_RECOVERY
                            | rusqlite::ffi::SQLITE_READONLY_CANTLOCK
                            | rusqlite::ffi::SQLITE_READONLY_DIRECTORY
                    )
                );
                if !cannot_share || dir_writable(path) {
                    return Err(JournalError::sql(path, "cannot read the schema version", e));
                }
                // Read-only storage. An immutable open ignores the side files, so it is only
                // right when they hold nothing: a hot `-journal` means the file itself is
                // mid-write, a non-empty `-wal` holds commits the main file does not have.
                if side_file_len(path, "-journal") > 0 {
                    return Err(JournalError::NeedsRollback {
                        path: path.to_path_buf(),
                        read_only_dir: true,
                    });
                }
                if side_file_len(path, "-wal") > 0 {
                    return Err(JournalError::UnreadableWal { path: path.to_path_buf() });
                }
                connect_readonly(path, true)
                    .map_err(|e| JournalError::sql(path, "cannot read the schema version", e))?
            }
        };
        let j = Self { conn, path: path.to_path_buf(), commits: 0 };
        let v = j.user_version()?;
        if v > SCHEMA_VERSION {
            return Err(JournalError::TooNew { path: j.path, found: v, supported: SCHEMA_VERSION });
        }
        if v == 0 {
            j.refuse_foreign()?;
            // Not migrated yet: no runs. Another process may be creating the journal right
            // now (its migration commits atomically), so this is "empty", not an error.
            return Ok(None);
        }
        Ok(Some(j))
    }

    /// [`Journal::open_readonly`] for `nemoclaw recover`'s listing, the command operators are
    /// sent to after an interruption: a journal left mid-write (hot `-journal`) in a writable
    /// directory is first rolled back — SQLite restores the last committed state, exactly as
    /// the next writer would — and then opened read-only. On read-only storage it is reported
    /// like [`Journal::open_readonly`] does.
    pub fn open_recovering(path: &Path) -> Result<Option<Self>, JournalError> {
        match Self::open_readonly(path) {
            Err(JournalError::NeedsRollback { read_only_dir: false, .. }) => {
                roll_back_hot_journal(path)?;
                Self::open_readonly(path)
            }
            other => other,
        }
    }

    fn configure(&mut self) -> Result<(), JournalError> {
        let p = self.path.clone();
        self.conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| JournalError::sql(&p, "busy_timeout", e))?;
        // journal_mode returns a row; the others do not.
        // Switching to WAL needs a moment of exclusive access, and SQLite answers SQLITE_BUSY
        // to it without consulting the busy handler while another process is creating or
        // recovering the same journal. So it is retried here, within the same busy timeout.
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        let mode: String = loop {
            match self.conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)) {
                Ok(m) => break m,
                Err(e)
                    if matches!(
                        e.sqlite_error_code(),
                        Some(
                            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                        )
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(JournalError::sql(&p, "cannot read the journal", e)),
            }
        };
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(JournalError::Corrupt {
                path: p,
                detail: format!("cannot switch to WAL mode (got `{mode}`)"),
            });
        }
        self.conn
            .execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(|e| JournalError::sql(&p, "cannot configure the journal", e))?;
        if let Some(n) = std::env::var(ENV_MAX_PAGES).ok().and_then(|v| v.parse::<i64>().ok()) {
            let _: i64 = self
                .conn
                .query_row(&format!("PRAGMA max_page_count={n}"), [], |r| r.get(0))
                .map_err(|e| JournalError::sql(&p, "cannot configure the journal", e))?;
        }
        Ok(())
    }

    /// A database whose `user_version` is 0 but which has schema objects was not made by
    /// nemoclaw (ours set the version in the same transaction that creates the tables): refuse
    /// it as corrupt input, naming the file. One statement, so one consistent snapshot.
    fn refuse_foreign(&self) -> Result<(), JournalError> {
        let (version, objects): (i64, i64) = self
            .conn
            .query_row(
                "SELECT (SELECT user_version FROM pragma_user_version), \
                        (SELECT count(*) FROM sqlite_master)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| JournalError::sql(&self.path, "cannot read the journal", e))?;
        if version == 0 && objects > 0 {
            return Err(JournalError::Corrupt {
                path: self.path.clone(),
                detail: format!(
                    "it is a SQLite database with {objects} schema object(s) but no nemoclaw \
                     schema version; it is not a nemoclaw journal"
                ),
            });
        }
        Ok(())
    }

    fn user_version(&self) -> Result<i64, JournalError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| JournalError::sql(&self.path, "cannot read the schema version", e))
    }

    fn migrate(&mut self) -> Result<(), JournalError> {
        let current = self.user_version()?;
        if current > SCHEMA_VERSION {
            return Err(JournalError::TooNew {
                path: self.path.clone(),
                found: current,
                supported: SCHEMA_VERSION,
            });
        }
        if current == SCHEMA_VERSION {
            return Ok(());
        }
        let p = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| JournalError::sql(&p, "cannot start the migration", e))?;
        // Re-read inside the write lock: another process may have migrated meanwhile.
        let current: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| JournalError::sql(&p, "cannot read the schema version", e))?;
        for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
            tx.execute_batch(sql)
                .map_err(|e| JournalError::sql(&p, &format!("migration {name} failed"), e))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(|e| JournalError::sql(&p, "cannot record the schema version", e))?;
        }
        tx.commit().map_err(|e| JournalError::sql(&p, "cannot commit the migration", e))?;
        Ok(())
    }

    /// The underlying connection (for queries; writes go through [`Journal::write`]).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// How many [`Journal::write`] transactions this handle has committed.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` in one `BEGIN IMMEDIATE` transaction and commit it: one durable commit (one WAL
    /// fsync with `synchronous=FULL`) per call.
    pub fn write<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, JournalError>,
    ) -> Result<T, JournalError> {
        let p = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| JournalError::sql(&p, what, e))?;
        // On error the transaction is dropped, which rolls it back: nothing partial is recorded.
        // A closure error (JournalError::Raw) gets the path and context attached here.
        let out = f(&tx).map_err(|e| match e {
            JournalError::Raw(e) => JournalError::sql(&p, what, e),
            other => other,
        })?;
        tx.commit().map_err(|e| JournalError::sql(&p, what, e))?;
        tracing::info!("journal: committed `{what}`");
        COMMITS.fetch_add(1, Ordering::Relaxed);
        self.commits += 1;
        Ok(out)
    }

    /// `PRAGMA integrity_check`: `Ok(())` or the first problems SQLite reports.
    pub fn integrity_check(&self) -> Result<(), JournalError> {
        let mut stmt = self
            .conn
            .prepare("PRAGMA integrity_check")
            .map_err(|e| JournalError::sql(&self.path, "integrity_check", e))?;
        let rows: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .and_then(|it| it.collect())
            .map_err(|e| JournalError::sql(&self.path, "integrity_check", e))?;
        if rows.len() == 1 && rows[0] == "ok" {
            Ok(())
        } else {
            Err(JournalError::Corrupt { path: self.path.clone(), detail: rows.join("; ") })
        }
    }
}
