//! Rebuild backups, `<home>/rebuild-backups/<name>/<timestamp>/` (spec §2.4).
//!
//! A backup holds the copied state directories and `rebuild-manifest.json` with NemoClaw's
//! fields plus a `files` list (relative path, size, sha256) and `complete: true`.
//!
//! Write order is what makes a backup trustworthy: every file is copied, fsynced and re-read to
//! verify its digest, every directory is fsynced, and only then is the manifest written
//! (atomically, fsynced). A crash at any earlier point leaves a directory without a manifest,
//! which [`Backup::open`] refuses, so a half-written backup is never restored.
//!
//! Copying in and out walks trees without following symlinks and refuses absolute paths, `..`,
//! symlinks that escape the tree, and device files, fifos and sockets, naming the path.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{private_dir, HostError};
use crate::names::SandboxName;

/// Directory of backups inside the NemoClaw home.
pub const BACKUPS_DIR: &str = "rebuild-backups";
/// The manifest's file name inside a backup.
pub const MANIFEST_FILE: &str = "rebuild-manifest.json";

/// One backed-up file (or symlink) in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path relative to the state root, `/`-separated.
    pub path: String,
    /// Size in bytes (for a symlink: length of its target).
    pub size: u64,
    /// SHA-256 of the content (for a symlink: of its target text).
    pub sha256: String,
    /// For a symlink (one that stays inside the tree): its target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink: Option<String>,
}

/// `rebuild-manifest.json`: NemoClaw's fields plus `files` and `complete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 1.
    pub version: u32,
    /// The sandbox backed up.
    pub sandbox_name: String,
    /// The backup's timestamp (also its directory name).
    pub timestamp: String,
    /// Agent kind (`openclaw` when the entry says null).
    pub agent_type: String,
    /// Agent version, when known.
    pub agent_version: Option<String>,
    /// Top-level state directories found in the sandbox.
    pub state_dirs: Vec<String>,
    /// Top-level state directories actually copied.
    pub backed_up_dirs: Vec<String>,
    /// Absolute path of the backup directory.
    pub backup_path: String,
    /// Policy presets of the entry.
    pub policy_presets: Vec<String>,
    /// Custom policies of the entry, verbatim.
    pub custom_policies: Value,
    /// Every file copied, sorted by path.
    pub files: Vec<ManifestFile>,
    /// True only when every file was copied and verified before the manifest was written.
    pub complete: bool,
}

/// What the caller knows about the sandbox being backed up.
#[derive(Debug, Clone)]
pub struct BackupMeta {
    /// Sandbox name.
    pub sandbox: SandboxName,
    /// Agent kind (`None` = openclaw).
    pub agent_type: Option<String>,
    /// Agent version.
    pub agent_version: Option<String>,
    /// Policy presets (`policies` of the entry).
    pub policy_presets: Vec<String>,
    /// `customPolicies` of the entry, verbatim (`[]` when absent).
    pub custom_policies: Value,
}

/// A complete, verified-on-open backup.
#[derive(Debug, Clone)]
pub struct Backup {
    /// The backup directory.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// SHA-256 of the manifest file's bytes (journaled by the rebuild).
    pub manifest_digest: String,
}

/// Backup directory timestamp: ISO-8601 UTC with `:` and `.` replaced by `-`
/// (`2026-06-09T10-02-11-399Z`).
pub fn backup_timestamp(ms: i64) -> String {
    crate::util::iso_ms(ms).replace([':', '.'], "-")
}

fn check_timestamp(timestamp: &str) -> Result<(), HostError> {
    if timestamp.is_empty() || timestamp.contains(['/', '\0']) || timestamp.starts_with('.') {
        return Err(HostError::Invalid(format!("invalid backup timestamp `{timestamp}`")));
    }
    Ok(())
}

/// Create `<home>/rebuild-backups/<name>/<timestamp>/` (0700; it must not exist yet).
/// Returns the parent and the new directory.
fn new_backup_dir(
    home: &Path,
    meta: &BackupMeta,
    timestamp: &str,
) -> Result<(PathBuf, PathBuf), HostError> {
    check_timestamp(timestamp)?;
    let parent = backups_dir(home, &meta.sandbox);
    // Durably: the backup is found through these names after a power cut.
    super::private_dir_durable(&parent)?;
    let dir = parent.join(timestamp);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| HostError::io("cannot create backup directory", &dir, e))?;
    Ok((parent, dir))
}

/// `<home>/rebuild-backups/<name>/`.
pub fn backups_dir(home: &Path, name: &SandboxName) -> PathBuf {
    home.join(BACKUPS_DIR).join(name.as_str())
}

impl Backup {
    /// Copy the state tree `src` into a new backup `<home>/rebuild-backups/<name>/<timestamp>/`,
    /// verify every copied file's digest, then commit the manifest. Refuses an existing target
    /// directory and any unsafe entry in `src` (before copying anything).
    pub fn create(
        home: &Path,
        meta: &BackupMeta,
        timestamp: &str,
        src: &Path,
    ) -> Result<Backup, HostError> {
        check_timestamp(timestamp)?;
        // Walk first: an unsafe entry aborts before a single byte is copied.
        let entries = walk(src)?;
        if entries.iter().any(|e| e.rel == MANIFEST_FILE) {
            return Err(HostError::Invalid(format!(
                "{} contains a file named {MANIFEST_FILE}, which would clash with the backup manifest",
                src.display()
            )));
        }
        let (parent, dir) = new_backup_dir(home, meta, timestamp)?;
        let files = copy_entries(src, &entries, &dir)?;
        // The copied files and the directory entries naming them are durable, and every copy
        // re-reads to the digest of what was read from the source, before the manifest claims
        // they exist.
        sync_tree(&dir)?;
        verify_files(&dir, &files, false)?;
        Self::commit(meta, timestamp, &parent, dir, &entries, files)
    }

    /// Like [`Backup::create`], but `fill` writes the state straight into the new backup
    /// directory (e.g. a gateway's download), saving a staging copy. The result is walked with
    /// the same safety rules; an unsafe entry removes the directory and fails. Digests are taken
    /// from the backup's own bytes after they are durable.
    pub fn create_with(
        home: &Path,
        meta: &BackupMeta,
        timestamp: &str,
        fill: impl FnOnce(&Path) -> Result<(), HostError>,
    ) -> Result<Backup, HostError> {
        let (parent, dir) = new_backup_dir(home, meta, timestamp)?;
        let filled = fill(&dir).and_then(|()| {
            let entries = walk(&dir)?;
            if entries.iter().any(|e| e.rel == MANIFEST_FILE) {
                return Err(HostError::Invalid(format!(
                    "the state contains a file named {MANIFEST_FILE}, which would clash with the backup manifest"
                )));
            }
            sync_tree(&dir)?;
            let mut files = Vec::new();
            for e in &entries {
                match &e.kind {
                    Kind::Dir => {}
                    Kind::File => {
                        let (size, sha256) = hash_file(&dir, &e.rel)?;
                        files.push(ManifestFile { path: e.rel.clone(), size, sha256, symlink: None });
                    }
                    Kind::Symlink(t) => files.push(ManifestFile {
                        path: e.rel.clone(),
                        size: t.len() as u64,
                        sha256: crate::util::sha256_hex(t.as_bytes()),
                        symlink: Some(t.clone()),
                    }),
                }
            }
            Ok((entries, files))
        });
        match filled {
            Ok((entries, files)) => Self::commit(meta, timestamp, &parent, dir, &entries, files),
            Err(e) => {
                // Without a manifest the directory is nobody's backup; remove it now rather
                // than leave it for the next run to trip over.
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Write the manifest — the commit point — for a backup whose files are durable.
    fn commit(
        meta: &BackupMeta,
        timestamp: &str,
        parent: &Path,
        dir: PathBuf,
        entries: &[Entry],
        files: Vec<ManifestFile>,
    ) -> Result<Backup, HostError> {
        let mut top: Vec<String> = entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::Dir))
            .filter(|e| !e.rel.contains('/'))
            .map(|e| e.rel.clone())
            .collect();
        top.sort();
        let manifest = Manifest {
            version: 1,
            sandbox_name: meta.sandbox.as_str().to_owned(),
            timestamp: timestamp.to_owned(),
            agent_type: meta.agent_type.clone().unwrap_or_else(|| "openclaw".to_owned()),
            agent_version: meta.agent_version.clone(),
            state_dirs: top.clone(),
            backed_up_dirs: top,
            backup_path: dir.to_string_lossy().into_owned(),
            policy_presets: meta.policy_presets.clone(),
            custom_policies: meta.custom_policies.clone(),
            files,
            complete: true,
        };
        let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        let mpath = dir.join(MANIFEST_FILE);
        // The commit point: written last, atomically (temp, fsync, rename, fsync dir).
        let sync_dir = !crate::util::skip_sync("manifest_dir");
        crate::util::atomic_write_with(&mpath, &bytes, sync_dir)
            .map_err(|e| HostError::io("cannot write", &mpath, e))?;
        crate::util::fsync_dir(parent).map_err(|e| HostError::io("cannot sync", parent, e))?;
        Ok(Backup { path: dir, manifest, manifest_digest: crate::util::sha256_hex(&bytes) })
    }

    /// Hard-link the backed-up files into `dest` (created if missing) without the manifest: a
    /// view of the state to upload, at no copying cost. Falls back to copying across
    /// filesystems. The backup is verified first.
    pub fn link_out(&self, dest: &Path) -> Result<(), HostError> {
        self.verify()?;
        private_dir(dest)?;
        for f in &self.manifest.files {
            check_rel(&f.path).map_err(|why| {
                HostError::Invalid(format!(
                    "backup {} lists `{}`: {why}",
                    self.path.display(),
                    f.path
                ))
            })?;
            let to = dest.join(&f.path);
            if let Some(p) = to.parent() {
                private_dir(p)?;
            }
            match &f.symlink {
                Some(t) => std::os::unix::fs::symlink(t, &to)
                    .map_err(|e| HostError::io("cannot create symlink", &to, e))?,
                None => {
                    if let Err(e) = fs::hard_link(self.path.join(&f.path), &to) {
                        if e.raw_os_error() != Some(libc::EXDEV) {
                            return Err(HostError::io("cannot link", &to, e));
                        }
                        copy_file(&self.path, &f.path, &to)?;
                    }
                }
            }
        }
        Ok(())
    }
    /// Open a backup directory. Only a complete manifest (version 1, `complete: true`, safe
    /// relative paths) is accepted; anything else is refused naming the directory.
    pub fn open(path: &Path) -> Result<Backup, HostError> {
        let mpath = path.join(MANIFEST_FILE);
        let bytes = match fs::read(&mpath) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(HostError::Invalid(format!(
                    "backup {} has no manifest: it is incomplete and cannot be used",
                    path.display()
                )))
            }
            Err(e) => return Err(HostError::io("cannot read", &mpath, e)),
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| HostError::corrupt(&mpath, format!("not a rebuild manifest ({e})")))?;
        if manifest.version != 1 || !manifest.complete {
            return Err(HostError::Invalid(format!(
                "backup {} is not complete (version {}, complete {})",
                path.display(),
                manifest.version,
                manifest.complete
            )));
        }
        let links: BTreeMap<&str, &str> = manifest
            .files
            .iter()
            .filter_map(|f| f.symlink.as_deref().map(|t| (f.path.as_str(), t)))
            .collect();
        for f in &manifest.files {
            check_rel(&f.path).map_err(|why| {
                HostError::Invalid(format!(
                    "backup {} lists an unsafe path `{}`: {why}",
                    path.display(),
                    f.path
                ))
            })?;
            if let Some(t) = &f.symlink {
                check_link(&f.path, t).and_then(|()| resolve_in_tree(&links, &f.path, t)).map_err(
                    |why| {
                        HostError::Invalid(format!(
                            "backup {} has symlink `{}` → `{t}`: {why}",
                            path.display(),
                            f.path
                        ))
                    },
                )?;
            }
        }
        Ok(Backup {
            path: path.to_owned(),
            manifest,
            manifest_digest: crate::util::sha256_hex(&bytes),
        })
    }

    /// Complete backups of `name`, oldest first (timestamps sort lexically). Directories without
    /// a complete manifest are skipped.
    pub fn list(home: &Path, name: &SandboxName) -> Result<Vec<Backup>, HostError> {
        let dir = backups_dir(home, name);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HostError::io("cannot list", &dir, e)),
        };
        let mut paths: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        paths.sort();
        Ok(paths.iter().filter_map(|p| Backup::open(p).ok()).collect())
    }

    /// Check that the backup's own files still match the manifest (before restoring it).
    pub fn verify(&self) -> Result<(), HostError> {
        verify_files(&self.path, &self.manifest.files, false)
    }

    /// Check that `dir` (e.g. a restored sandbox's state) holds every manifest file with the
    /// recorded digest. Extra files in `dir` are allowed.
    pub fn verify_tree(&self, dir: &Path) -> Result<(), HostError> {
        verify_files(dir, &self.manifest.files, true)
    }

    /// Copy the backed-up state into `dest` (created if missing), verifying each file's digest.
    pub fn copy_out(&self, dest: &Path) -> Result<(), HostError> {
        self.verify()?;
        let entries = walk(&self.path)?;
        let wanted: std::collections::BTreeSet<&str> =
            self.manifest.files.iter().map(|f| f.path.as_str()).collect();
        let picked: Vec<Entry> =
            entries.into_iter().filter(|e| wanted.contains(e.rel.as_str())).collect();
        private_dir(dest)?;
        copy_entries(&self.path, &picked, dest)?;
        sync_tree(dest)?;
        self.verify_tree(dest)
    }
}

/// A digest of a directory tree: SHA-256 over each file's and symlink's relative path and
/// content digest, in sorted path order. Directories themselves (and so empty directories) and
/// modes are not part of it: it answers "same files with the same bytes".
pub fn tree_digest(dir: &Path) -> Result<String, HostError> {
    let mut h = Sha256::new();
    for e in walk(dir)? {
        let (tag, digest) = match &e.kind {
            Kind::Dir => continue,
            Kind::File => ("f", hash_file(dir, &e.rel)?.1),
            Kind::Symlink(t) => ("l", crate::util::sha256_hex(t.as_bytes())),
        };
        // NUL cannot occur in a path, so the encoding is unambiguous.
        h.update(e.rel.as_bytes());
        h.update([0]);
        h.update(tag.as_bytes());
        h.update([0]);
        h.update(digest.as_bytes());
        h.update(b"\n");
    }
    Ok(hex::encode(h.finalize()))
}

/// Copy the contents of `src` into `dest` (created if missing), replacing files of the same
/// path, with the same safety rules as backups (no escaping symlinks, no special files); the
/// copy is durable (see `sync_tree`) when this returns. Used by the local gateway to move state in
/// and out.
pub fn copy_tree(src: &Path, dest: &Path) -> Result<(), HostError> {
    let entries = walk(src)?;
    private_dir(dest)?;
    copy_entries(src, &entries, dest)?;
    sync_tree(dest)
}

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File,
    Symlink(String),
}

#[derive(Debug, Clone)]
struct Entry {
    rel: String,
    kind: Kind,
}

/// Walk `root` without following symlinks, sorted by relative path, refusing anything unsafe.
/// Directories are walked by descriptor (each opened `O_DIRECTORY|O_NOFOLLOW` relative to its
/// parent's descriptor), so a path swapped for a symlink mid-walk is refused, never followed.
/// Every symlink is resolved against the tree itself (following in-tree links) and refused if
/// it leaves the root.
fn walk(root: &Path) -> Result<Vec<Entry>, HostError> {
    let fd = open_root(root)?;
    let mut out = Vec::new();
    walk_into(&fd, root, "", &mut out)?;
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    let links: BTreeMap<&str, &str> = out
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::Symlink(t) => Some((e.rel.as_str(), t.as_str())),
            _ => None,
        })
        .collect();
    for (rel, t) in &links {
        resolve_in_tree(&links, rel, t).map_err(|why| {
            HostError::Invalid(format!(
                "refusing symlink {} → {t}: {why}",
                root.join(rel).display()
            ))
        })?;
    }
    Ok(out)
}

const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;

fn c_name(name: &str, what: &Path) -> Result<CString, HostError> {
    CString::new(name)
        .map_err(|_| HostError::Invalid(format!("{} has a NUL in its name", what.display())))
}

/// `openat(dir, name, flags | O_CLOEXEC)`.
fn openat(dir: RawFd, name: &CStr, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; the returned descriptor is owned by nobody else.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, 0) };
    if fd < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        // SAFETY: fd is a fresh, valid descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Open the tree's root directory (not through a symlink).
fn open_root(root: &Path) -> Result<OwnedFd, HostError> {
    let c = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| HostError::Invalid(format!("{} has a NUL in its name", root.display())))?;
    openat(libc::AT_FDCWD, &c, DIR_FLAGS).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTDIR) | Some(libc::ELOOP) => {
            HostError::Invalid(format!("{} is not a directory", root.display()))
        }
        _ => HostError::io("cannot read", root, e),
    })
}

/// Open `root/rel` for reading: every directory component by descriptor with `O_NOFOLLOW`, the
/// file with `O_NOFOLLOW|O_NONBLOCK` (a swapped-in fifo cannot hang us), and the opened
/// descriptor must be a regular file. Nothing is resolved through a symlink.
fn open_source(root: &Path, rel: &str) -> Result<File, HostError> {
    let abs = root.join(rel);
    let mut dir = open_root(root)?;
    let comps: Vec<&str> = rel.split('/').collect();
    let (leaf, dirs) = comps.split_last().expect("split yields at least one item");
    let refuse = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => HostError::Invalid(format!(
            "refusing {}: it is not a regular file inside the tree (it changed while being read?)",
            abs.display()
        )),
        _ => HostError::io("cannot read", &abs, e),
    };
    for c in dirs {
        dir = openat(dir.as_raw_fd(), &c_name(c, &abs)?, DIR_FLAGS).map_err(refuse)?;
    }
    let fd = openat(
        dir.as_raw_fd(),
        &c_name(leaf, &abs)?,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
    )
    .map_err(refuse)?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| HostError::io("cannot read", &abs, e))?;
    if !meta.is_file() {
        return Err(HostError::Invalid(format!(
            "refusing {}: it is not a regular file (it changed while being read?)",
            abs.display()
        )));
    }
    Ok(file)
}

/// The names in the directory open at `dir` (without `.` and `..`).
fn list_dir(dir: &OwnedFd, abs: &Path) -> Result<Vec<Vec<u8>>, HostError> {
    // fdopendir takes ownership of the descriptor it is given: hand it a duplicate.
    let dup = dir.try_clone().map_err(|e| HostError::io("cannot list", abs, e))?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(dup);
    // SAFETY: raw is a valid directory descriptor we own; on success the DIR owns it.
    let d = unsafe { libc::fdopendir(raw) };
    if d.is_null() {
        let e = std::io::Error::last_os_error();
        // SAFETY: fdopendir failed, so raw is still ours.
        unsafe { libc::close(raw) };
        return Err(HostError::io("cannot list", abs, e));
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: d is a valid DIR*; the entry is copied before the next readdir.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    // SAFETY: d is valid and closed once.
    unsafe { libc::closedir(d) };
    Ok(names)
}

fn walk_into(
    dir: &OwnedFd,
    dir_abs: &Path,
    prefix: &str,
    out: &mut Vec<Entry>,
) -> Result<(), HostError> {
    for raw_name in list_dir(dir, dir_abs)? {
        let abs = dir_abs.join(OsStr::from_bytes(&raw_name));
        let Ok(name) = String::from_utf8(raw_name) else {
            return Err(HostError::Invalid(format!(
                "{} has a name that is not UTF-8",
                abs.display()
            )));
        };
        let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        let cname = c_name(&name, &abs)?;
        // SAFETY: an all-zero stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: cname is NUL-terminated, st is a valid out-parameter.
        let r = unsafe {
            libc::fstatat(dir.as_raw_fd(), cname.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW)
        };
        if r != 0 {
            return Err(HostError::io("cannot read", &abs, std::io::Error::last_os_error()));
        }
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let sub = openat(dir.as_raw_fd(), &cname, DIR_FLAGS).map_err(|e| {
                    match e.raw_os_error() {
                        Some(libc::ELOOP) | Some(libc::ENOTDIR) => HostError::Invalid(format!(
                            "refusing {}: it changed from a directory while being read",
                            abs.display()
                        )),
                        _ => HostError::io("cannot list", &abs, e),
                    }
                })?;
                out.push(Entry { rel: rel.clone(), kind: Kind::Dir });
                walk_into(&sub, &abs, &rel, out)?;
            }
            libc::S_IFREG => out.push(Entry { rel, kind: Kind::File }),
            libc::S_IFLNK => {
                let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
                // SAFETY: buf is writable for its length; cname is NUL-terminated.
                let n = unsafe {
                    libc::readlinkat(
                        dir.as_raw_fd(),
                        cname.as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n < 0 {
                    return Err(HostError::io(
                        "cannot read link",
                        &abs,
                        std::io::Error::last_os_error(),
                    ));
                }
                buf.truncate(n as usize);
                let Ok(t) = String::from_utf8(buf) else {
                    return Err(HostError::Invalid(format!(
                        "{} links to a non-UTF-8 path",
                        abs.display()
                    )));
                };
                check_link(&rel, &t).map_err(|why| {
                    HostError::Invalid(format!("refusing symlink {} → {t}: {why}", abs.display()))
                })?;
                out.push(Entry { rel, kind: Kind::Symlink(t) });
            }
            _ => {
                return Err(HostError::Invalid(format!(
                    "refusing {}: device files, fifos and sockets cannot be backed up or restored",
                    abs.display()
                )))
            }
        }
    }
    Ok(())
}

/// Check every link of a tree (`(path, target)` pairs relative to the root) with
/// [`resolve_in_tree`]; returns the first link that leaves the tree and why.
pub fn check_links_in_tree(links: &[(String, String)]) -> Result<(), (String, &'static str)> {
    let map: BTreeMap<&str, &str> = links.iter().map(|(p, t)| (p.as_str(), t.as_str())).collect();
    for (rel, target) in links {
        resolve_in_tree(&map, rel, target).map_err(|why| (rel.clone(), why))?;
    }
    Ok(())
}

/// Resolve the symlink at `rel` → `target` the way the kernel would, against the tree's own
/// symlinks (`links`, relative path → target; any other path is a directory, a file or
/// nothing). Refuses a target that leaves the root at any point, absolute targets, and chains
/// deeper than 40 links (a loop).
fn resolve_in_tree(
    links: &BTreeMap<&str, &str>,
    rel: &str,
    target: &str,
) -> Result<(), &'static str> {
    let mut at: Vec<String> = rel.split('/').map(str::to_owned).collect();
    at.pop();
    let mut budget = 40u32;
    follow(links, &mut at, target, &mut budget)
}

fn follow(
    links: &BTreeMap<&str, &str>,
    at: &mut Vec<String>,
    target: &str,
    budget: &mut u32,
) -> Result<(), &'static str> {
    if target.starts_with('/') {
        return Err("absolute target escapes the tree");
    }
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                // `at` always holds the resolved (physical) location, so `..` is its parent.
                if at.pop().is_none() {
                    return Err("target escapes the tree (through its symlinks)");
                }
            }
            name => {
                at.push(name.to_owned());
                if let Some(next) = links.get(at.join("/").as_str()) {
                    if *budget == 0 {
                        return Err("too many levels of symlinks");
                    }
                    *budget -= 1;
                    at.pop();
                    follow(links, at, next, budget)?;
                }
            }
        }
    }
    Ok(())
}

/// A manifest path must be relative, `/`-separated, without `.`, `..` or empty components.
fn check_rel(rel: &str) -> Result<(), &'static str> {
    if rel.is_empty() {
        return Err("empty path");
    }
    if rel.starts_with('/') {
        return Err("absolute path");
    }
    if rel.contains('\0') {
        return Err("NUL in path");
    }
    for c in rel.split('/') {
        match c {
            "" => return Err("empty path component"),
            "." | ".." => return Err("`.` or `..` component"),
            _ => {}
        }
    }
    Ok(())
}

/// A symlink at `rel` pointing to `target` must stay inside the tree.
fn check_link(rel: &str, target: &str) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("empty target");
    }
    if Path::new(target).is_absolute() {
        return Err("absolute target escapes the tree");
    }
    // Resolve lexically from the link's directory; going above the root escapes.
    let mut depth: i64 = rel.split('/').count() as i64 - 1;
    for c in Path::new(target).components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return Err("unsupported target"),
        }
        if depth < 0 {
            return Err("target escapes the tree");
        }
    }
    Ok(())
}

/// Size and digest of `root/rel`, opened by descriptor (see [`open_source`]).
fn hash_file(root: &Path, rel: &str) -> Result<(u64, String), HostError> {
    let path = root.join(rel);
    let mut f = open_source(root, rel)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| HostError::io("cannot read", &path, e))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, hex::encode(h.finalize())))
}

/// Copy walked entries under `dest`, hashing what was read. Returns the manifest rows for files
/// and symlinks. Not yet durable nor verified: callers follow with [`sync_tree`] and a
/// verification pass over the copy.
fn copy_entries(
    root: &Path,
    entries: &[Entry],
    dest: &Path,
) -> Result<Vec<ManifestFile>, HostError> {
    let mut files = Vec::new();
    for e in entries {
        let to = dest.join(&e.rel);
        if let Some(p) = to.parent() {
            private_dir(p)?;
        }
        match &e.kind {
            Kind::Dir => private_dir(&to)?,
            Kind::Symlink(t) => {
                match fs::symlink_metadata(&to) {
                    Ok(m) if m.is_dir() => {
                        return Err(HostError::Invalid(format!(
                            "{} is a directory; cannot replace it",
                            to.display()
                        )))
                    }
                    Ok(_) => fs::remove_file(&to)
                        .map_err(|err| HostError::io("cannot replace", &to, err))?,
                    Err(_) => {}
                }
                std::os::unix::fs::symlink(t, &to)
                    .map_err(|err| HostError::io("cannot create symlink", &to, err))?;
                files.push(ManifestFile {
                    path: e.rel.clone(),
                    size: t.len() as u64,
                    sha256: crate::util::sha256_hex(t.as_bytes()),
                    symlink: Some(t.clone()),
                });
            }
            Kind::File => {
                let (size, digest) = copy_file(root, &e.rel, &to)?;
                files.push(ManifestFile {
                    path: e.rel.clone(),
                    size,
                    sha256: digest,
                    symlink: None,
                });
            }
        }
    }
    Ok(files)
}

/// Stream `root/rel` (opened by descriptor, never through a symlink: see [`open_source`]) into
/// `to` (replacing it; never through a symlink at `to`), and return size and digest of what
/// was read.
fn copy_file(root: &Path, rel: &str, to: &Path) -> Result<(u64, String), HostError> {
    let from = &root.join(rel);
    let mut src = open_source(root, rel)?;
    let mode = src.metadata().map(|m| m.permissions().mode() & 0o777).unwrap_or(0o600);
    if fs::symlink_metadata(to).is_ok_and(|m| m.file_type().is_symlink()) {
        fs::remove_file(to).map_err(|e| HostError::io("cannot replace", to, e))?;
    }
    let mut dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(|e| HostError::io("cannot write", to, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(|e| HostError::io("cannot read", from, e))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).map_err(|e| HostError::io("cannot write", to, e))?;
        h.update(&buf[..n]);
        size += n as u64;
    }
    // Copies are private (host files are 0600): keep only the owner's execute bit of the source.
    let _ = dst.set_permissions(fs::Permissions::from_mode((mode & 0o100) | 0o600));
    // No fsync here: callers make the whole tree durable at once (see `sync_tree`) before
    // anything claims the copy exists.
    Ok((size, hex::encode(h.finalize())))
}

/// Make a freshly written tree durable: every file and directory entry under `root` and the
/// entry naming `root` in its parent (one `syncfs`, or per-file fsync where that is not
/// trusted: see [`crate::util::sync_tree`]).
fn sync_tree(root: &Path) -> Result<(), HostError> {
    crate::util::sync_tree(root).map_err(|e| HostError::io("cannot sync", root, e))
}

fn verify_files(root: &Path, files: &[ManifestFile], what_restored: bool) -> Result<(), HostError> {
    let label = if what_restored { "restored state" } else { "backup" };
    for f in files {
        check_rel(&f.path).map_err(|why| {
            HostError::Invalid(format!("unsafe manifest path `{}`: {why}", f.path))
        })?;
        let p = root.join(&f.path);
        let meta = fs::symlink_metadata(&p)
            .map_err(|e| HostError::io(&format!("{label} is missing"), &p, e))?;
        let digest = match &f.symlink {
            Some(_) if meta.file_type().is_symlink() => {
                let t = fs::read_link(&p).map_err(|e| HostError::io("cannot read link", &p, e))?;
                crate::util::sha256_hex(t.to_string_lossy().as_bytes())
            }
            None if meta.is_file() => hash_file(root, &f.path)?.1,
            _ => {
                return Err(HostError::Invalid(format!(
                    "{label} {} has the wrong file type",
                    p.display()
                )))
            }
        };
        if digest != f.sha256 {
            return Err(HostError::Invalid(format!(
                "{label} {} does not match the manifest (sha256 {digest}, expected {})",
                p.display(),
                f.sha256
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::plain("a/b", "c", true)]
    #[case::up_inside("a/b", "../c", true)]
    #[case::escape("a", "../x", false)]
    #[case::deep_escape("a/b", "../../../etc", false)]
    #[case::absolute("a", "/etc/passwd", false)]
    fn links(#[case] rel: &str, #[case] target: &str, #[case] ok: bool) {
        assert_eq!(check_link(rel, target).is_ok(), ok);
    }

    #[rstest]
    #[case::ok("workspace/a.md", true)]
    #[case::dotdot("../x", false)]
    #[case::inner_dotdot("a/../../x", false)]
    #[case::abs("/etc/x", false)]
    #[case::empty_comp("a//b", false)]
    fn rel_paths(#[case] p: &str, #[case] ok: bool) {
        assert_eq!(check_rel(p).is_ok(), ok);
    }

    #[test]
    fn timestamp_format() {
        assert_eq!(backup_timestamp(1_780_999_331_399), "2026-06-09T10-02-11-399Z");
    }
}
