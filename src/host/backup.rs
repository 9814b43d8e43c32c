//! Rebuild backups, `<home>/rebuild-backups/<name>/<timestamp>/` (spec §2.4).
//!
//! A backup holds the copied state directories and `rebuild-manifest.json` with NemoClaw's
//! fields plus this project's: `files` (relative path, size, sha256, and the metadata kept:
//! mode, mtime, symlink target, hard-link group), `dirs` (every directory, so empty ones come
//! back, with mode and mtime) and `complete: true`. The manifest digest is journaled, so
//! everything the manifest records — bytes and metadata — is what restore verification checks.
//!
//! Write order is what makes a backup trustworthy: every file is copied (its digest taken from
//! the one read of the source that fed the copy), the tree is made durable, the copy is checked
//! against what was read from the source, and only then is the manifest written (atomically,
//! fsynced). A crash at any earlier point leaves a directory without a manifest, which
//! [`Backup::open`] refuses, so a half-written backup is never restored.
//!
//! The backup directory itself is 0700 (so is its parent), which keeps other users out; the
//! files and directories inside keep their own modes. Copying in and out walks trees by
//! descriptor (see [`super::fstree`]) and refuses absolute paths, `..`, symlinks that escape the
//! tree, and device files, fifos and sockets, naming the path.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::fstree::{self, check_link, check_rel, resolve_in_tree, shown};
pub use super::fstree::{check_links_in_tree, Keeps, Kind, Mismatch, Node};
use super::{private_dir, HostError};
use crate::names::SandboxName;

/// Directory of backups inside the NemoClaw home.
pub const BACKUPS_DIR: &str = "rebuild-backups";
/// The manifest's file name inside a backup.
pub const MANIFEST_FILE: &str = "rebuild-manifest.json";

/// One backed-up file (or symlink) in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path relative to the state root, `/`-separated (a name that is not UTF-8 is written
    /// `{"hex": "…"}`).
    #[serde(with = "name")]
    pub path: Vec<u8>,
    /// Size in bytes (for a symlink: length of its target).
    pub size: u64,
    /// SHA-256 of the content, holes read as zeros (for a symlink: of its target).
    pub sha256: String,
    /// For a symlink (one that stays inside the tree): its target.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_name")]
    pub symlink: Option<Vec<u8>>,
    /// Permission bits (`st_mode & 0o7777`, decimal); absent in manifests that predate them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Modification time in nanoseconds since the epoch; absent when not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<i64>,
    /// An earlier path naming the same inode (a hard link).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_name")]
    pub hardlink: Option<Vec<u8>>,
}

/// One backed-up directory in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDir {
    /// Path relative to the state root.
    #[serde(with = "name")]
    pub path: Vec<u8>,
    /// Permission bits (`st_mode & 0o7777`, decimal).
    pub mode: u32,
    /// Modification time in nanoseconds; absent when the way the state was fetched loses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<i64>,
}

impl ManifestFile {
    /// The path for messages (lossy when not UTF-8).
    pub fn shown(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

/// A relative path in JSON: a string when it is UTF-8, else `{"hex": "<bytes>"}`.
mod name {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    pub(super) enum Repr {
        Text(String),
        Raw { hex: String },
    }

    pub(super) fn repr(v: &[u8]) -> Repr {
        match std::str::from_utf8(v) {
            Ok(s) => Repr::Text(s.to_owned()),
            Err(_) => Repr::Raw { hex: hex::encode(v) },
        }
    }

    pub(super) fn bytes<E: serde::de::Error>(r: Repr) -> Result<Vec<u8>, E> {
        match r {
            Repr::Text(s) => Ok(s.into_bytes()),
            Repr::Raw { hex } => hex::decode(hex).map_err(E::custom),
        }
    }

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        repr(v).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        bytes(Repr::deserialize(d)?)
    }
}

mod opt_name {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_deref().map(super::name::repr).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<super::name::Repr>::deserialize(d)?.map(super::name::bytes).transpose()
    }
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
    /// Every file and symlink copied, in tree order.
    pub files: Vec<ManifestFile>,
    /// Every directory copied, in tree order (absent in manifests that predate it).
    #[serde(default)]
    pub dirs: Vec<ManifestDir>,
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
    /// check the copy against what was read from `src`, then commit the manifest. Refuses an
    /// existing target directory and any unsafe entry in `src` (before copying anything).
    pub fn create(
        home: &Path,
        meta: &BackupMeta,
        timestamp: &str,
        src: &Path,
    ) -> Result<Backup, HostError> {
        check_timestamp(timestamp)?;
        // Walk first: an unsafe entry aborts before a single byte is copied.
        let nodes = fstree::walk(src)?;
        refuse_manifest_clash(&nodes, &src.display().to_string())?;
        let (parent, dir) = new_backup_dir(home, meta, timestamp)?;
        let copied = fstree::copy_nodes(src, &nodes, &dir).and_then(|read| {
            // Durable, then re-read and compared with what was read from the source, before
            // the manifest claims the files exist.
            fstree::sync_tree(&dir)?;
            check_copy(&dir, &read, Keeps::ALL)?;
            Ok(read)
        });
        match copied {
            Ok(read) => Self::commit(meta, timestamp, &parent, dir, &read, Keeps::ALL),
            Err(e) => {
                let _ = fstree::remove_tree(&dir);
                Err(e)
            }
        }
    }

    /// Like [`Backup::create`], but `fill` writes the state straight into the new backup
    /// directory (e.g. a gateway's download), saving a staging copy. `fill` returns the
    /// source's own listing when it can give one (digests and metadata taken while reading the
    /// source): the copy is then checked against it and the manifest records the source.
    /// Without one, the manifest records the downloaded bytes. `keeps` says which metadata the
    /// way of fetching carries; what it loses is left out of the manifest. The result is walked
    /// with the same safety rules; an unsafe entry or a failed check removes the directory.
    pub fn create_with(
        home: &Path,
        meta: &BackupMeta,
        timestamp: &str,
        keeps: Keeps,
        fill: impl FnOnce(&Path) -> Result<Option<Vec<Node>>, HostError>,
    ) -> Result<Backup, HostError> {
        let (parent, dir) = new_backup_dir(home, meta, timestamp)?;
        let filled = fill(&dir).and_then(|described| {
            let walked = fstree::walk(&dir)?;
            refuse_manifest_clash(&walked, "the state")?;
            fstree::sync_tree(&dir)?;
            match described {
                Some(src) => {
                    refuse_manifest_clash(&src, "the state")?;
                    check_copy(&dir, &src, keeps)?;
                    Ok(src)
                }
                None => hash_walked(&dir, walked),
            }
        });
        match filled {
            Ok(listing) => Self::commit(meta, timestamp, &parent, dir, &listing, keeps),
            Err(e) => {
                // Without a manifest the directory is nobody's backup; remove it now rather
                // than leave it for the next run to trip over.
                let _ = fstree::remove_tree(&dir);
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
        listing: &[Node],
        keeps: Keeps,
    ) -> Result<Backup, HostError> {
        let mut top: Vec<String> = listing
            .iter()
            .filter(|n| n.kind == Kind::Dir && !n.rel.contains(&b'/'))
            .map(|n| String::from_utf8_lossy(&n.rel).into_owned())
            .collect();
        top.sort();
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        // What was read is recorded as read; only a directory mtime that the way of fetching
        // does not carry (it would be the time of the download) is left out. Comparisons
        // apply the precision of the way a tree travelled (see `Keeps`).
        for n in listing {
            let mode = n.mode;
            match &n.kind {
                Kind::Dir => dirs.push(ManifestDir {
                    path: n.rel.clone(),
                    mode,
                    mtime_ns: keeps.dir_mtimes.then_some(n.mtime_ns),
                }),
                kind => files.push(ManifestFile {
                    path: n.rel.clone(),
                    size: n.size,
                    sha256: n.sha256.clone().unwrap_or_default(),
                    symlink: match kind {
                        Kind::Symlink(t) => Some(t.clone()),
                        _ => None,
                    },
                    mode: Some(mode),
                    mtime_ns: Some(n.mtime_ns),
                    hardlink: n.hardlink.clone(),
                }),
            }
        }
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
            dirs,
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

    /// The manifest as a listing (directories first, then files and symlinks, each in tree
    /// order), for checking a tree against it.
    pub fn listing(&self) -> Vec<Node> {
        let dirs = self.manifest.dirs.iter().map(|d| Node {
            rel: d.path.clone(),
            kind: Kind::Dir,
            mode: d.mode,
            mtime_ns: d.mtime_ns.unwrap_or(0),
            size: 0,
            sha256: None,
            hardlink: None,
        });
        let files = self.manifest.files.iter().map(|f| Node {
            rel: f.path.clone(),
            kind: match &f.symlink {
                Some(t) => Kind::Symlink(t.clone()),
                None => Kind::File,
            },
            mode: f.mode.unwrap_or(0),
            mtime_ns: f.mtime_ns.unwrap_or(0),
            size: f.size,
            sha256: Some(f.sha256.clone()),
            hardlink: f.hardlink.clone(),
        });
        dirs.chain(files).collect()
    }

    /// Check `root` against the manifest, with what the manifest does not record left
    /// unchecked (older manifests have no modes, mtimes or directories).
    fn check(&self, root: &Path, keeps: Keeps) -> Result<Vec<Mismatch>, HostError> {
        let bad = fstree::check(root, &self.listing(), keeps)?;
        Ok(self.recorded(bad))
    }

    /// `bad` without the checks of fields the manifest does not record.
    fn recorded(&self, mut bad: Vec<Mismatch>) -> Vec<Mismatch> {
        // A field the manifest does not record reads as 0 in the listing: drop those checks.
        let unrecorded = |m: &Mismatch| {
            let f = self.manifest.files.iter().find(|f| f.path == m.rel);
            let d = self.manifest.dirs.iter().find(|d| d.path == m.rel);
            (m.what.starts_with("mode ") && f.is_some_and(|f| f.mode.is_none()))
                || (m.what.starts_with("mtime ")
                    && (f.is_some_and(|f| f.mtime_ns.is_none())
                        || d.is_some_and(|d| d.mtime_ns.is_none())))
        };
        bad.retain(|m| !unrecorded(m));
        bad
    }

    /// Check a listing of the restored state taken where it lives (inside a sandbox, digests
    /// computed there) against the manifest: every entry with its bytes and metadata, as
    /// [`Backup::verify_tree`] checks a tree. `place` names where the listing was taken.
    pub fn verify_listing(&self, got: &[Node], place: &str) -> Result<(), HostError> {
        let bad = self.recorded(fstree::compare(got, &self.listing(), Keeps::ALL));
        if bad.is_empty() {
            return Ok(());
        }
        Err(HostError::Invalid(format!(
            "restored state in {place} does not match the manifest of backup {}: {}",
            self.path.display(),
            describe_all(&bad)
        )))
    }

    /// Check what a copy read from this backup (the listing [`fstree::copy_nodes`] returns for
    /// [`Backup::restore_nodes`]: digests of the bytes read, metadata of the opened files)
    /// against the manifest, as [`Backup::verify`] checks the backup's files: the same
    /// mismatches, found by the copy's own read instead of a read of its own.
    pub fn check_read(&self, read: &[Node]) -> Result<(), String> {
        let bad = self.recorded(fstree::compare(read, &self.listing(), Keeps::ALL));
        if bad.is_empty() {
            return Ok(());
        }
        Err(format!(
            "backup {} does not match the manifest: {}",
            self.path.display(),
            describe_all(&bad)
        ))
    }

    /// The backup's entries to copy for a restore, walked in tree order without reading a
    /// file: the directories the manifest lists (and those holding its files) and its files
    /// and symlinks that are there. What is missing or differs is left for
    /// [`Backup::check_read`] to find in what the copy read.
    pub fn restore_nodes(&self) -> Result<Vec<Node>, HostError> {
        let mut wanted: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
        for d in &self.manifest.dirs {
            wanted.insert(&d.path);
        }
        for f in &self.manifest.files {
            wanted.insert(&f.path);
            // Older manifests list no directories: the ones holding a file are wanted.
            let mut p: &[u8] = &f.path;
            while let Some(i) = p.iter().rposition(|b| *b == b'/') {
                p = &p[..i];
                wanted.insert(p);
            }
        }
        let walked = fstree::walk(&self.path)?;
        Ok(walked.into_iter().filter(|n| wanted.contains(n.rel.as_slice())).collect())
    }

    /// Every way the backup's own files differ from its manifest (empty: intact).
    pub fn damage(&self) -> Result<Vec<Mismatch>, HostError> {
        self.check(&self.path, Keeps::ALL)
    }

    /// Hard-link the backed-up files into `dest` (created if missing) without the manifest: a
    /// view of the state to upload, at no copying cost, with directories, symlinks and
    /// metadata as the manifest records them. Copies instead across filesystems. The backup
    /// is verified first.
    pub fn link_out(&self, dest: &Path) -> Result<(), HostError> {
        self.verify()?;
        self.link_out_verified(dest)
    }

    /// [`Backup::link_out`] for a caller that has just verified the backup in full (saves a
    /// second read of every file).
    pub fn link_out_verified(&self, dest: &Path) -> Result<(), HostError> {
        private_dir(dest)?;
        use std::os::unix::fs::MetadataExt;
        let same_fs = fs::metadata(&self.path)
            .and_then(|a| fs::metadata(dest).map(|b| a.dev() == b.dev()))
            .map_err(|e| HostError::io("cannot read", dest, e))?;
        if !same_fs {
            return self.copy_out(dest);
        }
        for d in &self.manifest.dirs {
            let to = shown(dest, &d.path);
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&to)
                .map_err(|e| HostError::io("cannot create directory", &to, e))?;
        }
        for f in &self.manifest.files {
            let to = shown(dest, &f.path);
            if let Some(p) = to.parent() {
                // Older manifests list no directories.
                if !p.is_dir() {
                    private_dir(p)?;
                }
            }
            match &f.symlink {
                Some(t) => {
                    std::os::unix::fs::symlink(Path::new(std::ffi::OsStr::from_bytes(t)), &to)
                        .map_err(|e| HostError::io("cannot create symlink", &to, e))?;
                    if let Some(ns) = f.mtime_ns {
                        fstree::set_path_meta(&to, 0, Some(ns), true)?;
                    }
                }
                // The same inode as the verified backup file: same bytes, mode and mtime.
                None => fs::hard_link(shown(&self.path, &f.path), &to)
                    .map_err(|e| HostError::io("cannot link", &to, e))?,
            }
        }
        for d in self.manifest.dirs.iter().rev() {
            fstree::set_path_meta(&shown(dest, &d.path), d.mode, d.mtime_ns, false)?;
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
        let links: std::collections::BTreeMap<&[u8], &[u8]> = manifest
            .files
            .iter()
            .filter_map(|f| f.symlink.as_deref().map(|t| (f.path.as_slice(), t)))
            .collect();
        let unsafe_path = |p: &[u8], why: &str| {
            HostError::Invalid(format!(
                "backup {} lists an unsafe path `{}`: {why}",
                path.display(),
                String::from_utf8_lossy(p)
            ))
        };
        for d in &manifest.dirs {
            check_rel(&d.path).map_err(|why| unsafe_path(&d.path, why))?;
        }
        for f in &manifest.files {
            check_rel(&f.path).map_err(|why| unsafe_path(&f.path, why))?;
            if let Some(h) = &f.hardlink {
                check_rel(h).map_err(|why| unsafe_path(h, why))?;
            }
            if let Some(t) = &f.symlink {
                check_link(&f.path, t).and_then(|()| resolve_in_tree(&links, &f.path, t)).map_err(
                    |why| {
                        HostError::Invalid(format!(
                            "backup {} has symlink `{}` → `{}`: {why}",
                            path.display(),
                            f.shown(),
                            String::from_utf8_lossy(t)
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

    /// Check that the backup's own files still match the manifest (before restoring it); the
    /// error names every file that does not.
    pub fn verify(&self) -> Result<(), HostError> {
        let bad = self.damage()?;
        if bad.is_empty() {
            return Ok(());
        }
        Err(HostError::Invalid(format!(
            "backup {} does not match the manifest: {}",
            self.path.display(),
            describe_all(&bad)
        )))
    }

    /// Check that `dir` (e.g. a restored sandbox's state) holds every manifest entry with the
    /// recorded digest and the metadata `keeps` says could survive the way it got there.
    /// Extra files in `dir` are allowed.
    pub fn verify_tree(&self, dir: &Path, keeps: Keeps) -> Result<(), HostError> {
        let bad = self.check(dir, keeps)?;
        if bad.is_empty() {
            return Ok(());
        }
        Err(HostError::Invalid(format!(
            "restored state in {} does not match the manifest of backup {}: {}",
            dir.display(),
            self.path.display(),
            describe_all(&bad)
        )))
    }

    /// Copy the backed-up state into `dest` (created if missing), verifying it.
    pub fn copy_out(&self, dest: &Path) -> Result<(), HostError> {
        self.verify()?;
        let wanted: std::collections::BTreeSet<&[u8]> =
            self.manifest.files.iter().map(|f| f.path.as_slice()).collect();
        let picked: Vec<Node> = fstree::walk(&self.path)?
            .into_iter()
            .filter(|n| n.kind == Kind::Dir || wanted.contains(n.rel.as_slice()))
            .collect();
        private_dir(dest)?;
        fstree::copy_nodes(&self.path, &picked, dest)?;
        fstree::sync_tree(dest)?;
        self.verify_tree(dest, Keeps::ALL)
    }
}

/// `a: what; b: what; … (and N more)`.
pub fn describe_all(bad: &[Mismatch]) -> String {
    const SHOWN: usize = 20;
    let mut s: Vec<String> = bad.iter().take(SHOWN).map(Mismatch::describe).collect();
    if bad.len() > SHOWN {
        s.push(format!("and {} more", bad.len() - SHOWN));
    }
    s.join("; ")
}

fn refuse_manifest_clash(nodes: &[Node], what: &str) -> Result<(), HostError> {
    if nodes.iter().any(|n| n.rel == MANIFEST_FILE.as_bytes()) {
        return Err(HostError::Invalid(format!(
            "{what} contains a file named {MANIFEST_FILE}, which would clash with the backup manifest"
        )));
    }
    Ok(())
}

/// The backup's check of its own copy: the copy at `dir` must hold exactly what was read from
/// the source (bytes, and the metadata `keeps` carries).
fn check_copy(dir: &Path, read: &[Node], keeps: Keeps) -> Result<(), HostError> {
    let bad = fstree::check(dir, read, keeps)?;
    if bad.is_empty() {
        return Ok(());
    }
    Err(HostError::Invalid(format!(
        "the copy in {} does not match what was read from the sandbox: {}",
        dir.display(),
        describe_all(&bad)
    )))
}

/// Digests for a walked tree that came without a source listing (a download). Runs of zero
/// blocks become holes again on the way: a transport that fills holes (OpenShell's download)
/// would otherwise make a sparse file take its whole size in the backup and, restored, in the
/// sandbox.
fn hash_walked(dir: &Path, mut walked: Vec<Node>) -> Result<Vec<Node>, HostError> {
    let mut buf = vec![0u8; 256 * 1024];
    for n in &mut walked {
        if n.kind == Kind::File {
            let (size, sha) = fstree::hash_and_sparsify(dir, &n.rel, &mut buf)?;
            n.size = size;
            n.sha256 = Some(sha);
        }
    }
    Ok(walked)
}

/// A digest of a directory tree: SHA-256 over each file's and symlink's relative path and
/// content digest, in tree order. Directories themselves (and so empty directories) and
/// metadata are not part of it: it answers "same files with the same bytes".
pub fn tree_digest(dir: &Path) -> Result<String, HostError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut nodes = fstree::walk(dir)?;
    nodes.sort_by(|a, b| a.rel.cmp(&b.rel));
    for n in nodes {
        let (tag, digest) = match &n.kind {
            Kind::Dir => continue,
            Kind::File => ("f", fstree::hash_file(dir, &n.rel, &mut buf)?.1),
            Kind::Symlink(t) => ("l", crate::util::sha256_hex(t)),
        };
        // NUL cannot occur in a path, so the encoding is unambiguous.
        h.update(&n.rel);
        h.update([0]);
        h.update(tag.as_bytes());
        h.update([0]);
        h.update(digest.as_bytes());
        h.update(b"\n");
    }
    Ok(hex::encode(h.finalize()))
}

/// Copy the contents of `src` into `dest` (created if missing), replacing entries of the same
/// path, keeping metadata, with the same safety rules as backups (no escaping symlinks, no
/// special files); the copy is durable (see `sync_tree`) when this returns.
pub fn copy_tree(src: &Path, dest: &Path) -> Result<(), HostError> {
    copy_tree_listed(src, dest).map(|_| ())
}

/// [`copy_tree`], returning what was read from `src` (digests and metadata of the source).
pub fn copy_tree_listed(src: &Path, dest: &Path) -> Result<Vec<Node>, HostError> {
    let nodes = fstree::walk(src)?;
    private_dir(dest)?;
    let read = fstree::copy_nodes(src, &nodes, dest)?;
    fstree::sync_tree(dest)?;
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_format() {
        assert_eq!(backup_timestamp(1_780_999_331_399), "2026-06-09T10-02-11-399Z");
    }

    #[test]
    fn names_that_are_not_utf8_round_trip_through_the_manifest() {
        let f = ManifestFile {
            path: b"caf\xe9/x".to_vec(),
            size: 1,
            sha256: "00".into(),
            symlink: Some(b"\xff".to_vec()),
            mode: Some(0o644),
            mtime_ns: Some(-5),
            hardlink: None,
        };
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["path"], serde_json::json!({"hex": "636166e92f78"}));
        let back: ManifestFile = serde_json::from_value(v).unwrap();
        assert_eq!(back, f);
        let plain: ManifestFile =
            serde_json::from_str(r#"{"path": "a/b", "size": 0, "sha256": "x"}"#).unwrap();
        assert_eq!((plain.path, plain.mode), (b"a/b".to_vec(), None));
    }
}
