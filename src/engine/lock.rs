//! Runner locks: one runner per key. The truth is a kernel lock (`flock(LOCK_EX|LOCK_NB)`) on
//! `<home>/locks/<sanitised key>.lock`, which the OS releases when the holder dies however it
//! dies. The journal's `holders` table only says who holds it (pid, host, process start time),
//! so a refused runner can name the holder and a takeover can be journaled.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Directory of lock files under a NemoClaw home.
#[derive(Debug, Clone)]
pub struct LockDir {
    dir: PathBuf,
}

/// A held kernel lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct KernelLock {
    _file: File,
    path: PathBuf,
}

impl KernelLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl LockDir {
    /// The lock directory of a NemoClaw home (`<home>/locks`).
    pub fn new(home: &Path) -> Self {
        Self { dir: home.join("locks") }
    }

    /// The lock file for `key`: characters outside `[A-Za-z0-9._-]` become `_`, and a short
    /// digest of the key keeps distinct keys apart when that changed anything.
    pub fn path_for(&self, key: &str) -> PathBuf {
        let safe: String = key
            .chars()
            .map(
                |c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' },
            )
            .collect();
        let name = if safe == key && !key.starts_with('.') && !key.is_empty() {
            format!("{key}.lock")
        } else {
            let digest = crate::util::sha256_hex(key.as_bytes());
            format!("{}.{}.lock", safe.trim_start_matches('.'), &digest[..12])
        };
        self.dir.join(name)
    }

    /// Try to take the lock for `key` without waiting: `Ok(None)` when another process holds it.
    pub fn try_lock(&self, key: &str) -> io::Result<Option<KernelLock>> {
        if !self.dir.is_dir() {
            crate::util::create_private_dir(&self.dir)?;
        }
        let path = self.path_for(key);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(KernelLock { _file: file, path }));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

impl LockDir {
    /// Whether some process holds the lock for `key`, **without taking it**: a reader (the
    /// unfinished-run notice of `status`) must never make a runner starting at that moment
    /// fail as busy. Read from the kernel's lock table (`/proc/locks`, the flock entries for the
    /// lock file's device and inode); `None` when that table cannot be read.
    pub fn is_held(&self, key: &str) -> Option<bool> {
        use std::os::unix::fs::MetadataExt;
        let meta = match std::fs::metadata(self.path_for(key)) {
            Ok(m) => m,
            // No lock file: nobody ever locked it here.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Some(false),
            Err(_) => return None,
        };
        let table = std::fs::read_to_string("/proc/locks").ok()?;
        let dev = meta.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
        Some(table.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 1234 00:2d:56789 0 EOF" ("->" marks a waiter).
            f.get(1) == Some(&"FLOCK") && f.contains(&id.as_str()) && !f.contains(&"->")
        }))
    }
}

/// When this process started, in ms since the epoch (from `/proc`; now if unavailable).
/// Recorded with the holder so a recycled pid cannot pass for the holder.
pub fn process_start_ms() -> i64 {
    crate::util::process_start_ms(None).unwrap_or_else(crate::util::now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_a_key_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let locks = LockDir::new(dir.path());
        let a = locks.try_lock("local/demo").unwrap().expect("free");
        // flock locks belong to the open file description: a second open in the same process
        // conflicts just like another process would.
        assert!(locks.try_lock("local/demo").unwrap().is_none());
        assert!(locks.try_lock("local/other").unwrap().is_some());
        drop(a);
        assert!(locks.try_lock("local/demo").unwrap().is_some());
    }

    #[test]
    fn is_held_reads_the_kernel_table_without_taking_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let locks = LockDir::new(dir.path());
        assert_eq!(locks.is_held("local/demo"), Some(false), "no lock file yet");
        let a = locks.try_lock("local/demo").unwrap().expect("free");
        assert_eq!(locks.is_held("local/demo"), Some(true));
        assert_eq!(locks.is_held("local/other"), Some(false));
        drop(a);
        assert_eq!(locks.is_held("local/demo"), Some(false));
        // Asking never took it: a runner gets it at once.
        assert!(locks.try_lock("local/demo").unwrap().is_some());
    }

    #[test]
    fn lock_file_names_are_safe_and_distinct() {
        let locks = LockDir::new(Path::new("/h"));
        assert_eq!(locks.path_for("synthetic"), Path::new("/h/locks/synthetic.lock"));
        let a = locks.path_for("local/demo");
        let b = locks.path_for("local_demo");
        assert_ne!(a, b);
        assert!(!locks.path_for("../x").to_string_lossy().contains(".."));
        let now = crate::util::now_ms();
        let started = process_start_ms();
        assert!(started <= now && started > now - 86_400_000 * 365, "{started}");
    }
}
