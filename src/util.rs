//! Small shared primitives: durable file writes, the clock, host identity, hashing.
//! Everything that writes a file that must survive a crash goes through [`atomic_write`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Write `bytes` to `path` atomically and durably: temp file in the same directory (mode 0600),
/// fsync, rename over `path`, fsync the directory. A crash leaves either the old or the new file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    atomic_write_with(path, bytes, true)
}

/// [`atomic_write`], with the final directory fsync only when `sync_dir` (false only under the
/// test hook [`skip_sync`]).
pub(crate) fn atomic_write_with(path: &Path, bytes: &[u8], sync_dir: bool) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f =
            OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        if sync_dir {
            fsync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Test hook: `NEMOCLAW_TEST_SKIP_SYNC=<name>` skips one named durability call, so the
/// power-loss tests can prove they notice a missing sync. Names: `manifest_dir` (the directory
/// fsync after a backup manifest's rename). Not an operator knob.
pub const ENV_SKIP_SYNC: &str = "NEMOCLAW_TEST_SKIP_SYNC";

/// Whether the test hook [`ENV_SKIP_SYNC`] asks to skip the durability call `name`.
pub(crate) fn skip_sync(name: &str) -> bool {
    std::env::var(ENV_SKIP_SYNC).is_ok_and(|v| v == name)
}

/// fsync a directory so that renames and creations inside it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Flush every dirty page and inode of the filesystem holding `path` to stable storage
/// (`syncfs(2)`). One call makes a whole freshly written tree durable — its files and the
/// directory entries naming them — which per-file `fsync` does thousands of times more slowly.
/// Only where [`syncfs_is_trusted`] says so; [`sync_tree`] chooses.
pub fn syncfs(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: `f` is an open descriptor for the duration of the call.
    let rc = unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&f)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `statfs(2)` `f_type` of a FUSE file system (sshfs, rclone, s3fs, ...).
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// `statfs(2)` `f_type`s of file systems whose `syncfs` is not trusted to reach the server that
/// stores the data: FUSE (verified by the power-loss tests); 9p (`V9FS_MAGIC`: QEMU shares,
/// WSL 2's Windows drives) and SMB (`CIFS_SUPER_MAGIC`, `SMB2_SUPER_MAGIC`), whose kernel
/// clients have no `sync_fs` operation and send their flush request (`TFSYNC`, SMB `FLUSH`)
/// only from a file's `fsync`. These two are read from the kernel source, not tested here;
/// the per-file path they take instead is always correct, only slower.
pub const SYNCFS_UNTRUSTED: &[i64] = &[FUSE_SUPER_MAGIC, 0x0102_1997, 0xFF53_4D42, 0xFE53_4D42];

/// Test hook: `NEMOCLAW_SYNC_TREE=fsync` makes [`sync_tree`] take the per-file path on every
/// file system, `syncfs` forces the `syncfs` path; unset, the file system decides.
pub const ENV_SYNC_TREE: &str = "NEMOCLAW_SYNC_TREE";

/// Whether one `syncfs(2)` on the file system holding `path` makes what was written there
/// durable.
//
// Not on the file systems in `SYNCFS_UNTRUSTED`. FUSE, for one: Linux sends `FUSE_SYNCFS` only to servers that ask for it (virtiofs), so on
// sshfs and every ordinary FUSE daemon `syncfs` flushes the kernel's pages to the daemon and
// returns success without the daemon ever being asked to make anything durable. Only `fsync`
// of each file (`FUSE_FSYNC`) and of each directory (`FUSE_FSYNCDIR`) reaches it. A statfs
// that fails is answered "not trusted": the slow path is always correct.
pub fn syncfs_is_trusted(path: &Path) -> bool {
    match std::env::var(ENV_SYNC_TREE).as_deref() {
        Ok("fsync") => return false,
        Ok("syncfs") => return true,
        _ => {}
    }
    let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
    else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    !SYNCFS_UNTRUSTED.contains(&(st.f_type as i64))
}

/// Make the freshly written tree `root` durable: every file and directory under it, and the
/// entry naming `root` in its parent. One `syncfs` where the file system honours it (the
/// measured fast path); else `fsync` of every file, then of every directory bottom-up, then
/// of `root`'s parent.
pub fn sync_tree(root: &Path) -> io::Result<()> {
    if syncfs_is_trusted(root) {
        return syncfs(root);
    }
    fsync_tree(root)?;
    match root.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => fsync_dir(parent),
        None => Ok(()),
    }
}

/// fsync every regular file and directory under `dir` (symlinks are part of their directory),
/// children before the directory that names them.
fn fsync_tree(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            fsync_tree(&e.path())?;
        } else if ft.is_file() {
            File::open(e.path())?.sync_all()?;
        }
    }
    fsync_dir(dir)
}

/// Create `dir` and any missing parents, each with mode 0700, durably: each directory created
/// is fsynced into its parent, so the path exists after a power cut once this returns.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.is_dir() {
        missing.push(at.to_owned());
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => break,
        }
    }
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    create_private_dir(dir)?;
    for d in missing.iter().rev() {
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
    }
    Ok(())
}

/// Create `dir` and its parents with mode 0700 (NemoClaw's convention for its home).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut perm = fs::metadata(dir)?.permissions();
    if perm.mode() & 0o777 != 0o700 {
        perm.set_mode(0o700);
        fs::set_permissions(dir, perm)?;
    }
    Ok(())
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Current time in milliseconds since the Unix epoch.
///
/// `NEMOCLAW_NOW_MS` overrides it; it exists for deterministic tests and is not an operator knob.
pub fn now_ms() -> i64 {
    if let Some(v) = std::env::var("NEMOCLAW_NOW_MS").ok().and_then(|v| v.parse().ok()) {
        return v;
    }
    chrono::Utc::now().timestamp_millis()
}

/// RFC 3339 UTC with milliseconds, the format NemoClaw uses (`2026-06-01T10:00:00.000Z`).
pub fn iso_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// When process `pid` (or this process, for `None`) started, in ms since the epoch: field 22 of
/// `/proc/<pid>/stat` (clock ticks since boot) plus the boot time from `/proc/stat`. Lets a lock
/// owner's pid be told apart from a recycled one. `None` when `/proc` cannot tell.
pub fn process_start_ms(pid: Option<i32>) -> Option<i64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let ticks: i64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let btime: i64 = fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no memory arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as i64 } else { 100 };
    Some(btime * 1000 + ticks * 1000 / hz)
}

/// This host's name, as recorded with every run.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The invoking user's name, best effort.
pub fn username() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid {}", unsafe { libc::getuid() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "temp file left behind: {names:?}");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn create_dir_durable_makes_every_missing_level_private() {
        let dir = tempfile::tempdir().unwrap();
        let leaf = dir.path().join("a/b/c");
        create_dir_durable(&leaf).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            let mode = fs::metadata(dir.path().join(d)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{d}");
        }
        create_dir_durable(&leaf).expect("an existing directory is fine");
    }

    #[test]
    fn iso_format_matches_nemoclaw() {
        assert_eq!(iso_ms(1_780_308_000_000), "2026-06-01T10:00:00.000Z");
    }
}
