//! State trees on this host's filesystem: walking them safely, copying them with their metadata,
//! and checking a tree against a recorded listing. Backups (`host::backup`) and the local
//! gateway's upload and download are built on these.
//!
//! Safety: a tree is walked by descriptor (every directory opened `O_DIRECTORY|O_NOFOLLOW`
//! relative to its parent's descriptor, every file `O_NOFOLLOW|O_NONBLOCK` and checked with
//! `fstat` after opening), so an entry swapped for a symlink or a fifo mid-walk is refused, never
//! followed. Symlinks are resolved against the tree itself and refused if they leave it; device
//! files, fifos and sockets are refused.
//!
//! Fidelity: a copy keeps permission bits (including setuid/setgid/sticky), mtimes to the
//! nanosecond (files, directories and symlinks), empty directories, holes (the source is read
//! with `SEEK_DATA`/`SEEK_HOLE` and holes stay holes), symlinks as links, hard links within the
//! tree (names of one inode stay one inode), and any name the filesystem allows (long, not
//! UTF-8). Ownership and extended attributes are not copied: see `docs/design.md`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::HostError;

/// What an entry of a tree is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symlink with this target (which stays inside the tree).
    Symlink(Vec<u8>),
}

/// One entry of a tree as it was seen: by a walk (no file digest yet) or by a copy (digest of
/// exactly the bytes that were read and written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Path relative to the root, `/`-separated, raw bytes.
    pub rel: Vec<u8>,
    /// Type (and symlink target).
    pub kind: Kind,
    /// Permission bits, `st_mode & 0o7777`.
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// File: size in bytes; symlink: target length; directory: 0.
    pub size: u64,
    /// File: SHA-256 of the content (holes read as zeros); symlink: of the target; directory:
    /// `None`. A walk leaves it `None` for files.
    pub sha256: Option<String>,
    /// File: an earlier path (in walk order) naming the same inode.
    pub hardlink: Option<Vec<u8>>,
}

impl Node {
    /// The relative path as a `Path`.
    pub fn path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.rel))
    }
}

/// Which metadata a copy keeps. [`Keeps::ALL`] for a copy on this host; a gateway whose
/// transport drops something says so, and verification then checks only what survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keeps {
    /// setuid, setgid and sticky bits (the other permission bits are always kept).
    pub special_bits: bool,
    /// mtimes below the second (otherwise they are truncated to whole seconds).
    pub subsecond_mtimes: bool,
    /// Directory mtimes.
    pub dir_mtimes: bool,
    /// Names of one inode stay one inode.
    pub hard_links: bool,
}

impl Keeps {
    /// Everything a copy on this host keeps.
    pub const ALL: Keeps =
        Keeps { special_bits: true, subsecond_mtimes: true, dir_mtimes: true, hard_links: true };

    /// What survives going through `self` and then `other`.
    pub fn and(self, other: Keeps) -> Keeps {
        Keeps {
            special_bits: self.special_bits && other.special_bits,
            subsecond_mtimes: self.subsecond_mtimes && other.subsecond_mtimes,
            dir_mtimes: self.dir_mtimes && other.dir_mtimes,
            hard_links: self.hard_links && other.hard_links,
        }
    }

    /// The permission bits these keep.
    pub fn mode_mask(self) -> u32 {
        if self.special_bits {
            0o7777
        } else {
            0o777
        }
    }

    /// `mtime_ns` as it survives.
    pub fn mtime(self, ns: i64) -> i64 {
        if self.subsecond_mtimes {
            ns
        } else {
            ns.div_euclid(1_000_000_000) * 1_000_000_000
        }
    }
}

// --- walking ---------------------------------------------------------------------------------

/// Walk `root` without following symlinks, in depth-first order (a directory before its
/// contents, siblings by name), refusing anything unsafe before the caller copies a byte.
pub fn walk(root: &Path) -> Result<Vec<Node>, HostError> {
    let fd = open_root(root)?;
    let mut out = Vec::new();
    let mut inodes = HashMap::new();
    walk_into(&fd, root, b"", &mut out, &mut inodes)?;
    check_tree_links(root, &out)?;
    Ok(out)
}

/// Refuse the first symlink of `nodes` that resolves outside the tree.
fn check_tree_links(root: &Path, nodes: &[Node]) -> Result<(), HostError> {
    match escaping_link(nodes) {
        None => Ok(()),
        Some((rel, t, why)) => Err(HostError::Invalid(format!(
            "refusing symlink {} → {}: {why}",
            root.join(OsStr::from_bytes(rel)).display(),
            String::from_utf8_lossy(t)
        ))),
    }
}

/// The first symlink of `nodes` (in path order) that [`check_link`] refuses or that resolves
/// outside the tree through the tree's own links ([`resolve_in_tree`]): its path, its target
/// and why.
pub fn escaping_link(nodes: &[Node]) -> Option<(&[u8], &[u8], &'static str)> {
    let links: BTreeMap<&[u8], &[u8]> = nodes
        .iter()
        .filter_map(|n| match &n.kind {
            Kind::Symlink(t) => Some((n.rel.as_slice(), t.as_slice())),
            _ => None,
        })
        .collect();
    links.iter().find_map(|(rel, t)| {
        let why = check_link(rel, t).and_then(|()| resolve_in_tree(&links, rel, t)).err()?;
        Some((*rel, *t, why))
    })
}

fn join_rel(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        name.to_vec()
    } else {
        let mut v = Vec::with_capacity(prefix.len() + 1 + name.len());
        v.extend_from_slice(prefix);
        v.push(b'/');
        v.extend_from_slice(name);
        v
    }
}

fn stat_mtime(st: &libc::stat) -> i64 {
    st.st_mtime * 1_000_000_000 + st.st_mtime_nsec
}

fn walk_into(
    dir: &OwnedFd,
    dir_abs: &Path,
    prefix: &[u8],
    out: &mut Vec<Node>,
    inodes: &mut HashMap<(u64, u64), Vec<u8>>,
) -> Result<(), HostError> {
    let mut names = list_dir(dir, dir_abs)?;
    names.sort();
    for name in names {
        let abs = dir_abs.join(OsStr::from_bytes(&name));
        let rel = join_rel(prefix, &name);
        let cname = c_name(&name, &abs)?;
        let st =
            fstatat(dir.as_raw_fd(), &cname).map_err(|e| HostError::io("cannot read", &abs, e))?;
        let mode = st.st_mode & 0o7777;
        let mtime_ns = stat_mtime(&st);
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let sub = open_subdir(dir.as_raw_fd(), &cname, &abs)?;
                out.push(Node {
                    rel: rel.clone(),
                    kind: Kind::Dir,
                    mode,
                    mtime_ns,
                    size: 0,
                    sha256: None,
                    hardlink: None,
                });
                walk_into(&sub, &abs, &rel, out, inodes)?;
            }
            libc::S_IFREG => {
                let hardlink = if st.st_nlink > 1 {
                    let key = (st.st_dev, st.st_ino);
                    match inodes.get(&key) {
                        Some(first) => Some(first.clone()),
                        None => {
                            inodes.insert(key, rel.clone());
                            None
                        }
                    }
                } else {
                    None
                };
                out.push(Node {
                    rel,
                    kind: Kind::File,
                    mode,
                    mtime_ns,
                    size: st.st_size as u64,
                    sha256: None,
                    hardlink,
                });
            }
            libc::S_IFLNK => {
                let t = readlinkat(dir.as_raw_fd(), &cname)
                    .map_err(|e| HostError::io("cannot read link", &abs, e))?;
                check_link(&rel, &t).map_err(|why| {
                    HostError::Invalid(format!(
                        "refusing symlink {} → {}: {why}",
                        abs.display(),
                        String::from_utf8_lossy(&t)
                    ))
                })?;
                out.push(Node {
                    rel,
                    size: t.len() as u64,
                    sha256: Some(hex::encode(Sha256::digest(&t))),
                    kind: Kind::Symlink(t),
                    mode,
                    mtime_ns,
                    hardlink: None,
                });
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

// --- copying ---------------------------------------------------------------------------------

/// Copy the walked `nodes` of `root` into `dest` (which exists), replacing entries of the same
/// path, keeping their metadata. Returns what was read: each file's digest comes from the one
/// read of the source that also fed the copy, and mode and mtime from the opened descriptor.
/// Not yet durable: callers sync the destination.
pub fn copy_nodes(root: &Path, nodes: &[Node], dest: &Path) -> Result<Vec<Node>, HostError> {
    let fd = open_root(root)?;
    let mut out = Vec::with_capacity(nodes.len());
    let mut copier = Copier { dest, inodes: HashMap::new(), buf: vec![0u8; 256 * 1024] };
    let mut i = 0;
    copier.level(&fd, root, b"", nodes, &mut i, true, &mut out)?;
    if i != nodes.len() {
        return Err(HostError::Invalid(format!(
            "internal: walk of {} is not in tree order",
            root.display()
        )));
    }
    // Directory metadata last, deepest first: creating entries inside a directory changes its
    // mtime, and a read-only mode would stop the copy from filling it.
    for n in out.iter().rev().filter(|n| n.kind == Kind::Dir) {
        let to = dest.join(n.path());
        set_path_meta(&to, n.mode, Some(n.mtime_ns), false)?;
    }
    Ok(out)
}

struct Copier<'a> {
    dest: &'a Path,
    /// Source (dev, ino) → the first destination name written for it.
    inodes: HashMap<(u64, u64), Vec<u8>>,
    buf: Vec<u8>,
}

fn is_under(rel: &[u8], prefix: &[u8]) -> bool {
    prefix.is_empty()
        || (rel.len() > prefix.len() && rel.starts_with(prefix) && rel[prefix.len()] == b'/')
}

impl Copier<'_> {
    /// Copy the nodes under `prefix` (the directory open at `src`); `fresh`: the destination
    /// directory was created by this copy, so nothing in it needs replacing.
    #[allow(clippy::too_many_arguments)]
    fn level(
        &mut self,
        src: &OwnedFd,
        src_abs: &Path,
        prefix: &[u8],
        nodes: &[Node],
        i: &mut usize,
        fresh_root: bool,
        out: &mut Vec<Node>,
    ) -> Result<(), HostError> {
        let fresh = fresh_root && !prefix.is_empty();
        while *i < nodes.len() && is_under(&nodes[*i].rel, prefix) {
            let n = &nodes[*i];
            *i += 1;
            let name = &n.rel[if prefix.is_empty() { 0 } else { prefix.len() + 1 }..];
            if name.contains(&b'/') {
                return Err(HostError::Invalid(format!(
                    "internal: walk of {} is not in tree order",
                    src_abs.display()
                )));
            }
            let abs = src_abs.join(OsStr::from_bytes(name));
            let cname = c_name(name, &abs)?;
            let to = self.dest.join(n.path());
            match &n.kind {
                Kind::Dir => {
                    let created = make_dir(&to)?;
                    let sub = open_subdir(src.as_raw_fd(), &cname, &abs)?;
                    let st = fstat(&sub).map_err(|e| HostError::io("cannot read", &abs, e))?;
                    out.push(Node {
                        mode: st.st_mode & 0o7777,
                        mtime_ns: stat_mtime(&st),
                        ..n.clone()
                    });
                    self.level(&sub, &abs, &n.rel, nodes, i, created || fresh, out)?;
                }
                Kind::Symlink(t) => {
                    if !fresh {
                        replace(&to)?;
                    }
                    let ct = CString::new(t.clone()).map_err(|_| {
                        HostError::Invalid(format!("{} has a NUL in its target", abs.display()))
                    })?;
                    let cto = path_c(&to)?;
                    // SAFETY: both are NUL-terminated.
                    if unsafe { libc::symlink(ct.as_ptr(), cto.as_ptr()) } != 0 {
                        return Err(HostError::io(
                            "cannot create symlink",
                            &to,
                            std::io::Error::last_os_error(),
                        ));
                    }
                    set_path_meta(&to, n.mode, Some(n.mtime_ns), true)?;
                    out.push(n.clone());
                }
                Kind::File => {
                    if !fresh {
                        replace(&to)?;
                    }
                    let file = openat(
                        src.as_raw_fd(),
                        &cname,
                        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                    )
                    .map_err(|e| refuse_changed(&abs, e))?;
                    let st = fstat(&file).map_err(|e| HostError::io("cannot read", &abs, e))?;
                    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                        return Err(HostError::Invalid(format!(
                            "refusing {}: it is not a regular file (it changed while being read?)",
                            abs.display()
                        )));
                    }
                    let key = (st.st_dev, st.st_ino);
                    let first = if st.st_nlink > 1 { self.inodes.get(&key).cloned() } else { None };
                    if let Some(first) = first {
                        // Another name of an inode already copied: link it, read nothing.
                        let from = self.dest.join(OsStr::from_bytes(&first));
                        std::fs::hard_link(&from, &to)
                            .map_err(|e| HostError::io("cannot link", &to, e))?;
                        let done = out
                            .iter()
                            .rev()
                            .find(|o| o.rel == first)
                            .cloned()
                            .expect("the first name was copied");
                        out.push(Node { rel: n.rel.clone(), hardlink: Some(first), ..done });
                        continue;
                    }
                    let (size, sha) = self.copy_file(File::from(file), &abs, &to, &st)?;
                    if st.st_nlink > 1 {
                        self.inodes.insert(key, n.rel.clone());
                    }
                    out.push(Node {
                        rel: n.rel.clone(),
                        kind: Kind::File,
                        mode: st.st_mode & 0o7777,
                        mtime_ns: stat_mtime(&st),
                        size,
                        sha256: Some(sha),
                        hardlink: None,
                    });
                }
            }
        }
        Ok(())
    }

    /// Copy one opened source file to `to` (which must not exist), hole for hole, hashing what
    /// was read; then give the copy the source's mode and mtime.
    fn copy_file(
        &mut self,
        mut src: File,
        abs: &Path,
        to: &Path,
        st: &libc::stat,
    ) -> Result<(u64, String), HostError> {
        let cto = path_c(to)?;
        // SAFETY: cto is NUL-terminated; the descriptor is owned below.
        let fd = unsafe {
            libc::open(
                cto.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(HostError::io("cannot write", to, std::io::Error::last_os_error()));
        }
        // SAFETY: fd is fresh and ours.
        let mut dst = unsafe { File::from_raw_fd(fd) };
        let mut h = Sha256::new();
        let size = copy_sparse(
            &mut src,
            &mut dst,
            &mut h,
            &mut self.buf,
            st.st_size as u64,
            st.st_blocks as u64,
        )
        .map_err(|(what, e)| match what {
            Side::Read => HostError::io("cannot read", abs, e),
            Side::Write => HostError::io("cannot write", to, e),
        })?;
        // The mode and mtime the source had when it was opened (what a tar would record).
        // SAFETY: dst is open.
        if unsafe { libc::fchmod(dst.as_raw_fd(), st.st_mode & 0o7777) } != 0 {
            return Err(HostError::io(
                "cannot set the mode of",
                to,
                std::io::Error::last_os_error(),
            ));
        }
        let times =
            [timespec(st.st_atime * 1_000_000_000 + st.st_atime_nsec), timespec(stat_mtime(st))];
        // SAFETY: dst is open; times has two entries.
        if unsafe { libc::futimens(dst.as_raw_fd(), times.as_ptr()) } != 0 {
            return Err(HostError::io(
                "cannot set the mtime of",
                to,
                std::io::Error::last_os_error(),
            ));
        }
        Ok((size, hex::encode(h.finalize())))
    }
}

enum Side {
    Read,
    Write,
}

static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

/// Whether a file of `len` bytes on `blocks` 512-byte blocks can have holes. One with at least
/// as many blocks as bytes has none (a compressing filesystem may answer "maybe" wrongly: the
/// data-segment probe then decides, which is only slower).
fn may_have_holes(len: u64, blocks: u64) -> bool {
    blocks.saturating_mul(512) < len
}

fn hash_zeros(h: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Copy `src` to `dst` data segment by data segment (`SEEK_DATA`/`SEEK_HOLE`), leaving holes as
/// holes, and hash the logical content (holes as zeros). Falls back to a plain read where the
/// filesystem cannot tell holes. Returns the number of bytes of content.
fn copy_sparse(
    src: &mut File,
    dst: &mut File,
    h: &mut Sha256,
    buf: &mut [u8],
    size_hint: u64,
    blocks: u64,
) -> Result<u64, (Side, std::io::Error)> {
    use std::io::{Seek, SeekFrom, Write};
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut off: i64 = 0;
    // Only a file with fewer allocated blocks than its size can have holes; one whose first
    // hole is at its end is copied plainly.
    let first_hole = if size_hint > 0 && may_have_holes(size_hint, blocks) {
        // SAFETY: sfd is open.
        unsafe { libc::lseek(sfd, 0, libc::SEEK_HOLE) }
    } else {
        -1
    };
    let sparse = first_hole >= 0 && (first_hole as u64) < size_hint;
    if first_hole >= 0 && !sparse {
        src.seek(SeekFrom::Start(0)).map_err(|e| (Side::Read, e))?;
    }
    loop {
        if sparse {
            // SAFETY: sfd is open.
            let data = unsafe { libc::lseek(sfd, off, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // No data after `off`: the rest (up to the size) is a hole.
                    Some(libc::ENXIO) => {
                        let end = src.metadata().map_err(|e| (Side::Read, e))?.len() as i64;
                        if end > off {
                            hash_zeros(h, (end - off) as u64);
                            off = end;
                        }
                        break;
                    }
                    // The filesystem cannot tell holes after all: copy the rest plainly.
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                        src.seek(SeekFrom::Start(off as u64)).map_err(|e| (Side::Read, e))?;
                        dst.seek(SeekFrom::Start(off as u64)).map_err(|e| (Side::Write, e))?;
                    }
                    _ => return Err((Side::Read, e)),
                }
            } else {
                if data > off {
                    hash_zeros(h, (data - off) as u64);
                }
                off = data;
                // SAFETY: sfd is open.
                let hole = unsafe { libc::lseek(sfd, data, libc::SEEK_HOLE) };
                if hole < 0 {
                    return Err((Side::Read, std::io::Error::last_os_error()));
                }
                src.seek(SeekFrom::Start(data as u64)).map_err(|e| (Side::Read, e))?;
                dst.seek(SeekFrom::Start(data as u64)).map_err(|e| (Side::Write, e))?;
                let mut left = (hole - data) as u64;
                while left > 0 {
                    let want = left.min(buf.len() as u64) as usize;
                    let n = src.read(&mut buf[..want]).map_err(|e| (Side::Read, e))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    dst.write_all(&buf[..n]).map_err(|e| (Side::Write, e))?;
                    left -= n as u64;
                    off += n as i64;
                }
                if left > 0 {
                    // The file shrank while being read: what was read is the copy.
                    break;
                }
                continue;
            }
        }
        // Plain copy from `off` (where both descriptors are) to the end.
        loop {
            let n = src.read(buf).map_err(|e| (Side::Read, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            dst.write_all(&buf[..n]).map_err(|e| (Side::Write, e))?;
            off += n as i64;
        }
        break;
    }
    // A trailing hole is only a size: set it.
    // SAFETY: dfd is open.
    if sparse && unsafe { libc::ftruncate(dfd, off) } != 0 {
        return Err((Side::Write, std::io::Error::last_os_error()));
    }
    Ok(off as u64)
}

/// Create directory `to` (0700 while it is being filled). `Ok(true)` when it was created,
/// `Ok(false)` when a directory (not a symlink to one) was already there.
fn make_dir(to: &Path) -> Result<bool, HostError> {
    let c = path_c(to)?;
    // SAFETY: c is NUL-terminated.
    if unsafe { libc::mkdir(c.as_ptr(), 0o700) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST)
        && std::fs::symlink_metadata(to).is_ok_and(|m| m.is_dir())
    {
        // Filled by this copy: make sure we can write into it.
        std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| HostError::io("cannot create directory", to, e))?;
        return Ok(false);
    }
    Err(HostError::io("cannot create directory", to, e))
}

/// Remove a non-directory at `to` so it can be written afresh (never written through: it may
/// be a symlink or another name of some inode).
fn replace(to: &Path) -> Result<(), HostError> {
    match std::fs::symlink_metadata(to) {
        Ok(m) if m.is_dir() => {
            Err(HostError::Invalid(format!("{} is a directory; cannot replace it", to.display())))
        }
        Ok(_) => std::fs::remove_file(to).map_err(|e| HostError::io("cannot replace", to, e)),
        Err(_) => Ok(()),
    }
}

/// Set mode (not for symlinks) and mtime of `to` without following a symlink there.
/// `None`: leave the mtime as it is.
pub(crate) fn set_path_meta(
    to: &Path,
    mode: u32,
    mtime_ns: Option<i64>,
    link: bool,
) -> Result<(), HostError> {
    let c = path_c(to)?;
    if !link {
        // SAFETY: c is NUL-terminated.
        if unsafe { libc::fchmodat(libc::AT_FDCWD, c.as_ptr(), mode, 0) } != 0 {
            return Err(HostError::io(
                "cannot set the mode of",
                to,
                std::io::Error::last_os_error(),
            ));
        }
    }
    let Some(mtime_ns) = mtime_ns else { return Ok(()) };
    let times = [libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }, timespec(mtime_ns)];
    // SAFETY: c is NUL-terminated; times has two entries.
    if unsafe {
        libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
    } != 0
    {
        return Err(HostError::io("cannot set the mtime of", to, std::io::Error::last_os_error()));
    }
    Ok(())
}

fn timespec(ns: i64) -> libc::timespec {
    libc::timespec { tv_sec: ns.div_euclid(1_000_000_000), tv_nsec: ns.rem_euclid(1_000_000_000) }
}

// --- checking --------------------------------------------------------------------------------

/// One way a tree differs from a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The entry (relative path, raw bytes).
    pub rel: Vec<u8>,
    /// What is wrong, one phrase.
    pub what: String,
}

impl Mismatch {
    /// `path: what`, lossy for names that are not UTF-8.
    pub fn describe(&self) -> String {
        format!("{}: {}", String::from_utf8_lossy(&self.rel), self.what)
    }
}

/// Compare the tree at `root` with `want` (entries with `None` fields are not checked for
/// them); `keeps` says which metadata could have survived the way the tree was made. Extra
/// entries in the tree are allowed. Returns every mismatch, in listing order.
pub fn check(root: &Path, want: &[Node], keeps: Keeps) -> Result<Vec<Mismatch>, HostError> {
    let mut bad = Vec::new();
    let mut inos: HashMap<&[u8], (u64, u64)> = HashMap::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut dirs = DirCache::new(root)?;
    for w in want {
        check_rel(&w.rel).map_err(|why| {
            HostError::Invalid(format!(
                "unsafe listed path `{}`: {why}",
                String::from_utf8_lossy(&w.rel)
            ))
        })?;
        let mut miss = |what: String| bad.push(Mismatch { rel: w.rel.clone(), what });
        let p = root.join(w.path());
        let (parent, name) = match w.rel.iter().rposition(|b| *b == b'/') {
            Some(i) => (&w.rel[..i], &w.rel[i + 1..]),
            None => (&b""[..], &w.rel[..]),
        };
        // By descriptor, never through a symlink: the directory chain is opened O_NOFOLLOW.
        let Some(dir) = dirs.dir(parent)? else {
            miss("missing".into());
            continue;
        };
        let dirfd = dir.as_raw_fd();
        let cname = c_name(name, &p)?;
        let st = match fstatat(dirfd, &cname) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                miss("missing".into());
                continue;
            }
            Err(e) => return Err(HostError::io("cannot read", &p, e)),
        };
        let fmt = st.st_mode & libc::S_IFMT;
        let kind_ok = match &w.kind {
            Kind::Dir => fmt == libc::S_IFDIR,
            Kind::File => fmt == libc::S_IFREG,
            Kind::Symlink(_) => fmt == libc::S_IFLNK,
        };
        if !kind_ok {
            miss("wrong file type".into());
            continue;
        }
        let mask = keeps.mode_mask();
        let mode = st.st_mode & 0o7777;
        if fmt != libc::S_IFLNK && (mode & mask) != (w.mode & mask) {
            miss(format!("mode {:04o}, expected {:04o}", mode & mask, w.mode & mask));
        }
        let got_mtime = stat_mtime(&st);
        let check_mtime = w.kind != Kind::Dir || keeps.dir_mtimes;
        if check_mtime && keeps.mtime(got_mtime) != keeps.mtime(w.mtime_ns) {
            miss(format!("mtime {}, expected {}", fmt_ns(got_mtime), fmt_ns(w.mtime_ns)));
        }
        match &w.kind {
            Kind::Dir => {}
            Kind::Symlink(t) => {
                let got = readlinkat(dirfd, &cname)
                    .map_err(|e| HostError::io("cannot read link", &p, e))?;
                if &got != t {
                    miss(format!(
                        "links to `{}`, expected `{}`",
                        String::from_utf8_lossy(&got),
                        String::from_utf8_lossy(t)
                    ));
                }
            }
            Kind::File => {
                if let (Some(first), true) = (&w.hardlink, keeps.hard_links) {
                    if inos.get(first.as_slice()) != Some(&(st.st_dev, st.st_ino)) {
                        miss(format!("not a hard link of `{}`", String::from_utf8_lossy(first)));
                    }
                }
                inos.insert(&w.rel, (st.st_dev, st.st_ino));
                if let Some(sha) = &w.sha256 {
                    let fd =
                        openat(dirfd, &cname, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK)
                            .map_err(|e| refuse_changed(&p, e))?;
                    let mut f = File::from(fd);
                    let fst = f.metadata().map_err(|e| HostError::io("cannot read", &p, e))?;
                    if !fst.is_file() {
                        miss("wrong file type".into());
                        continue;
                    }
                    let (size, got) = hash_sparse(
                        &mut f,
                        &mut buf,
                        fst.len(),
                        std::os::unix::fs::MetadataExt::blocks(&fst),
                    )
                    .map_err(|e| HostError::io("cannot read", &p, e))?;
                    if size != w.size {
                        miss(format!("{size} bytes, expected {}", w.size));
                    } else if &got != sha {
                        miss(format!("sha256 {got}, expected {sha}"));
                    }
                }
            }
        }
    }
    Ok(bad)
}

/// Compare a listing `got` (e.g. taken inside a sandbox, digests included) with `want`, as
/// [`check`] compares a tree: every entry of `want` must be in `got` with its type, bytes
/// (size and digest, when both have one), symlink target, hard-link group and the metadata
/// `keeps` carries. Extra entries in `got` are allowed.
pub fn compare(got: &[Node], want: &[Node], keeps: Keeps) -> Vec<Mismatch> {
    let by: HashMap<&[u8], &Node> = got.iter().map(|n| (n.rel.as_slice(), n)).collect();
    let group = |rel: &[u8]| by.get(rel).map(|n| n.hardlink.as_deref().unwrap_or(&n.rel).to_vec());
    let mut bad = Vec::new();
    for w in want {
        let mut miss = |what: String| bad.push(Mismatch { rel: w.rel.clone(), what });
        let Some(g) = by.get(w.rel.as_slice()) else {
            miss("missing".into());
            continue;
        };
        let kind_ok = match (&w.kind, &g.kind) {
            (Kind::Symlink(_), Kind::Symlink(_)) => true,
            (a, b) => a == b,
        };
        if !kind_ok {
            miss("wrong file type".into());
            continue;
        }
        let mask = keeps.mode_mask();
        if !matches!(w.kind, Kind::Symlink(_)) && (g.mode & mask) != (w.mode & mask) {
            miss(format!("mode {:04o}, expected {:04o}", g.mode & mask, w.mode & mask));
        }
        let check_mtime = w.kind != Kind::Dir || keeps.dir_mtimes;
        if check_mtime && keeps.mtime(g.mtime_ns) != keeps.mtime(w.mtime_ns) {
            miss(format!("mtime {}, expected {}", fmt_ns(g.mtime_ns), fmt_ns(w.mtime_ns)));
        }
        match (&w.kind, &g.kind) {
            (Kind::Symlink(t), Kind::Symlink(got)) if got != t => miss(format!(
                "links to `{}`, expected `{}`",
                String::from_utf8_lossy(got),
                String::from_utf8_lossy(t)
            )),
            (Kind::File, _) => {
                if let (Some(first), true) = (&w.hardlink, keeps.hard_links) {
                    if group(first).is_none() || group(first) != group(&w.rel) {
                        miss(format!("not a hard link of `{}`", String::from_utf8_lossy(first)));
                    }
                }
                if let (Some(want), Some(sha)) = (&w.sha256, &g.sha256) {
                    if g.size != w.size {
                        miss(format!("{} bytes, expected {}", g.size, w.size));
                    } else if sha != want {
                        miss(format!("sha256 {sha}, expected {want}"));
                    }
                } else if w.sha256.is_some() {
                    miss("no digest to check".into());
                }
            }
            _ => {}
        }
    }
    bad
}

/// Give the entries of the tree at `root` the modes and mtimes that `nodes` (in walk order)
/// lists: files and symlinks first, then directories deepest first, each by descriptor
/// through its `O_NOFOLLOW` directory chain and only when its type is the listed one (a
/// mismatch is left for a check to report). Files of 128 KiB or more first have their runs
/// of zero blocks turned back into holes (a transport that fills holes with zeros).
pub fn apply_meta(root: &Path, nodes: &[Node]) -> Result<(), HostError> {
    let mut dirs = DirCache::new(root)?;
    let mut buf = vec![0u8; 256 * 1024];
    let files = nodes.iter().filter(|n| n.kind != Kind::Dir);
    let dirs_last = nodes.iter().rev().filter(|n| n.kind == Kind::Dir);
    for n in files.chain(dirs_last) {
        check_rel(&n.rel).map_err(|why| {
            HostError::Invalid(format!(
                "unsafe listed path `{}`: {why}",
                String::from_utf8_lossy(&n.rel)
            ))
        })?;
        let p = root.join(n.path());
        let (parent, name) = match n.rel.iter().rposition(|b| *b == b'/') {
            Some(i) => (&n.rel[..i], &n.rel[i + 1..]),
            None => (&b""[..], &n.rel[..]),
        };
        if n.kind == Kind::File && n.size >= 128 * 1024 {
            match hash_and_sparsify(root, &n.rel, &mut buf) {
                Ok(_) => {}
                // Not there or not a file: the check reports it.
                Err(HostError::Invalid(_)) => continue,
                Err(HostError::Io { source, .. })
                    if matches!(
                        source.raw_os_error(),
                        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
        let Some(dir) = dirs.dir(parent)? else { continue };
        let dirfd = dir.as_raw_fd();
        let cname = c_name(name, &p)?;
        let Ok(st) = fstatat(dirfd, &cname) else { continue };
        let fmt = st.st_mode & libc::S_IFMT;
        let same = match n.kind {
            Kind::Dir => fmt == libc::S_IFDIR,
            Kind::File => fmt == libc::S_IFREG,
            Kind::Symlink(_) => fmt == libc::S_IFLNK,
        };
        if !same {
            continue;
        }
        // Not a symlink (just checked, in a tree only this process writes to): chmod cannot
        // follow one.
        // SAFETY: cname is NUL-terminated, dirfd is open.
        if fmt != libc::S_IFLNK && unsafe { libc::fchmodat(dirfd, cname.as_ptr(), n.mode, 0) } != 0
        {
            return Err(HostError::io(
                "cannot set the mode of",
                &p,
                std::io::Error::last_os_error(),
            ));
        }
        let times = [libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }, timespec(n.mtime_ns)];
        // SAFETY: cname is NUL-terminated; times has two entries.
        if unsafe {
            libc::utimensat(dirfd, cname.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
        } != 0
        {
            return Err(HostError::io(
                "cannot set the mtime of",
                &p,
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// The directories of one tree open by descriptor along the path last asked for, so a pass in
/// tree order opens each directory once (not once per file).
struct DirCache {
    /// `(relative path, descriptor)` from the root (`""`) down.
    stack: Vec<(Vec<u8>, OwnedFd)>,
}

impl DirCache {
    fn new(root: &Path) -> Result<Self, HostError> {
        Ok(DirCache { stack: vec![(Vec::new(), open_root(root)?)] })
    }

    /// The directory `dir` (relative, `""` = the root), opened `O_NOFOLLOW` component by
    /// component; `None` when a component is missing or not a directory.
    fn dir(&mut self, dir: &[u8]) -> Result<Option<&OwnedFd>, HostError> {
        while self.stack.len() > 1 {
            let top = &self.stack[self.stack.len() - 1].0;
            if dir == top.as_slice() || is_under(dir, top) {
                break;
            }
            self.stack.pop();
        }
        let top_len = self.stack[self.stack.len() - 1].0.len();
        if dir.len() > top_len {
            let rest = &dir[if top_len == 0 { 0 } else { top_len + 1 }..];
            for comp in rest.split(|b| *b == b'/') {
                let (rel, fd) = self.stack.last().expect("the root is always there");
                let c = c_name(comp, Path::new(OsStr::from_bytes(dir)))?;
                match openat(fd.as_raw_fd(), &c, DIR_FLAGS) {
                    Ok(sub) => {
                        let next = join_rel(rel, comp);
                        self.stack.push((next, sub));
                    }
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
                        ) =>
                    {
                        return Ok(None)
                    }
                    Err(e) => {
                        return Err(HostError::io(
                            "cannot list",
                            Path::new(OsStr::from_bytes(dir)),
                            e,
                        ))
                    }
                }
            }
        }
        Ok(self.stack.last().map(|(_, fd)| fd))
    }
}

fn fmt_ns(ns: i64) -> String {
    format!("{}.{:09}", ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// Size and digest of `root/rel`, opened by descriptor (see [`open_source`]).
pub fn hash_file(root: &Path, rel: &[u8], buf: &mut [u8]) -> Result<(u64, String), HostError> {
    let path = root.join(OsStr::from_bytes(rel));
    let mut f = open_source(root, rel)?;
    let m = f.metadata().map_err(|e| HostError::io("cannot read", &path, e))?;
    let blocks = std::os::unix::fs::MetadataExt::blocks(&m);
    hash_sparse(&mut f, buf, m.len(), blocks).map_err(|e| HostError::io("cannot read", &path, e))
}

/// Size and SHA-256 of an open file's content, reading only its data segments: holes are
/// hashed as zeros without being read.
fn hash_sparse(
    f: &mut File,
    buf: &mut [u8],
    len: u64,
    blocks: u64,
) -> std::io::Result<(u64, String)> {
    use std::io::{Seek, SeekFrom};
    let mut h = Sha256::new();
    let fd = f.as_raw_fd();
    let mut off: i64 = 0;
    // Only a file with fewer allocated blocks than its size can have holes (as `cp` decides);
    // one whose first hole is at its end is read plainly.
    let first_hole = if len > 0 && may_have_holes(len, blocks) {
        // SAFETY: fd is open.
        unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) }
    } else {
        -1
    };
    if first_hole >= 0 && (first_hole as u64) < len {
        loop {
            // SAFETY: fd is open.
            let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ENXIO) {
                    return Err(e);
                }
                let end = f.metadata()?.len() as i64;
                if end > off {
                    hash_zeros(&mut h, (end - off) as u64);
                    off = end;
                }
                return Ok((off as u64, hex::encode(h.finalize())));
            }
            hash_zeros(&mut h, (data - off) as u64);
            // SAFETY: fd is open.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(std::io::Error::last_os_error());
            }
            f.seek(SeekFrom::Start(data as u64))?;
            off = data;
            let mut left = (hole - data) as u64;
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                let n = f.read(&mut buf[..want])?;
                if n == 0 {
                    return Ok((off as u64, hex::encode(h.finalize())));
                }
                h.update(&buf[..n]);
                left -= n as u64;
                off += n as i64;
            }
        }
    }
    if first_hole >= 0 {
        f.seek(SeekFrom::Start(0))?;
    }
    let mut size = 0u64;
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, hex::encode(h.finalize())))
}

/// Size and digest of a file this process just received (a download that filled holes with
/// zeros), turning each run of whole zero blocks back into a hole as it is read
/// (`fallocate(PUNCH_HOLE)`, as `cp --sparse=always`); the content, size and mtime stay as they
/// were. Small files are only hashed.
pub fn hash_and_sparsify(
    root: &Path,
    rel: &[u8],
    buf: &mut [u8],
) -> Result<(u64, String), HostError> {
    const MIN: u64 = 128 * 1024;
    let path = root.join(OsStr::from_bytes(rel));
    let mut f = match open_in_tree(root, rel, libc::O_RDWR) {
        Ok(f) => f,
        // Not writable by us (a read-only mode kept from the sandbox, and we are not root):
        // hash it as it is.
        Err(HostError::Io { source, .. }) if source.raw_os_error() == Some(libc::EACCES) => {
            return hash_file(root, rel, buf)
        }
        Err(e) => return Err(e),
    };
    let io = |e| HostError::io("cannot read", &path, e);
    let st = fstat(&OwnedFd::from(f.try_clone().map_err(io)?)).map_err(io)?;
    let len = st.st_size as u64;
    if len < MIN || may_have_holes(len, st.st_blocks as u64) {
        return hash_sparse(&mut f, buf, len, st.st_blocks as u64).map_err(io);
    }
    let bs = (st.st_blksize as usize).clamp(512, buf.len());
    let mut h = Sha256::new();
    let (mut off, mut zero_from, mut punched) = (0u64, None::<u64>, false);
    let mut punch = |from: u64, to: u64| -> std::io::Result<()> {
        // SAFETY: f is open for writing; the range lies inside the file.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                from as i64,
                (to - from) as i64,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // A filesystem without hole punching keeps the zeros: only space is lost.
            if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)) {
                return Err(e);
            }
        }
        punched = true;
        Ok(())
    };
    let mut reader = f.try_clone().map_err(io)?;
    loop {
        let n = reader.read(buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        for block in buf[..n].chunks(bs) {
            let zero = block.len() == bs && block.iter().all(|b| *b == 0);
            match (zero, zero_from) {
                (true, None) => zero_from = Some(off),
                (false, Some(z)) => {
                    punch(z, off).map_err(io)?;
                    zero_from = None;
                }
                _ => {}
            }
            off += block.len() as u64;
        }
    }
    if let Some(z) = zero_from {
        punch(z, off).map_err(io)?;
    }
    if punched {
        // Punching a hole is a write: give the file its mtime back.
        let times =
            [timespec(st.st_atime * 1_000_000_000 + st.st_atime_nsec), timespec(stat_mtime(&st))];
        // SAFETY: f is open; times has two entries.
        if unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) } != 0 {
            return Err(HostError::io(
                "cannot set the mtime of",
                &path,
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok((off, hex::encode(h.finalize())))
}

// --- descriptors -----------------------------------------------------------------------------

const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;

fn c_name(name: &[u8], what: &Path) -> Result<CString, HostError> {
    CString::new(name)
        .map_err(|_| HostError::Invalid(format!("{} has a NUL in its name", what.display())))
}

fn path_c(p: &Path) -> Result<CString, HostError> {
    c_name(p.as_os_str().as_bytes(), p)
}

/// `openat(dir, name, flags | O_CLOEXEC)`.
/// Open the directory `name` below `dir` without following a symlink; a directory swapped for
/// something else since it was listed is refused, never followed.
fn open_subdir(dir: RawFd, name: &CStr, abs: &Path) -> Result<OwnedFd, HostError> {
    openat(dir, name, DIR_FLAGS).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => HostError::Invalid(format!(
            "refusing {}: it changed from a directory while being read",
            abs.display()
        )),
        _ => HostError::io("cannot list", abs, e),
    })
}

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

fn fstatat(dir: RawFd, name: &CStr) -> std::io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: name is NUL-terminated, st is a valid out-parameter.
    let r = unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    if r != 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(st)
    }
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open, st is a valid out-parameter.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(st)
    }
}

fn readlinkat(dir: RawFd, name: &CStr) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buf is writable for its length; name is NUL-terminated.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Open the tree's root directory (not through a symlink).
fn open_root(root: &Path) -> Result<OwnedFd, HostError> {
    let c = path_c(root)?;
    openat(libc::AT_FDCWD, &c, DIR_FLAGS).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTDIR) | Some(libc::ELOOP) => {
            HostError::Invalid(format!("{} is not a directory", root.display()))
        }
        _ => HostError::io("cannot read", root, e),
    })
}

fn refuse_changed(abs: &Path, e: std::io::Error) -> HostError {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => HostError::Invalid(format!(
            "refusing {}: it is not a regular file inside the tree (it changed while being read?)",
            abs.display()
        )),
        _ => HostError::io("cannot read", abs, e),
    }
}

/// Open `root/rel` for reading: every directory component by descriptor with `O_NOFOLLOW`, the
/// file with `O_NOFOLLOW|O_NONBLOCK` (a swapped-in fifo cannot hang us), and the opened
/// descriptor must be a regular file. Nothing is resolved through a symlink.
pub fn open_source(root: &Path, rel: &[u8]) -> Result<File, HostError> {
    open_in_tree(root, rel, libc::O_RDONLY)
}

fn open_in_tree(root: &Path, rel: &[u8], access: libc::c_int) -> Result<File, HostError> {
    let abs = root.join(OsStr::from_bytes(rel));
    let mut dir = open_root(root)?;
    let comps: Vec<&[u8]> = rel.split(|b| *b == b'/').collect();
    let (leaf, dirs) = comps.split_last().expect("split yields at least one item");
    for c in dirs {
        dir = openat(dir.as_raw_fd(), &c_name(c, &abs)?, DIR_FLAGS)
            .map_err(|e| refuse_changed(&abs, e))?;
    }
    let fd =
        openat(dir.as_raw_fd(), &c_name(leaf, &abs)?, access | libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .map_err(|e| refuse_changed(&abs, e))?;
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
    // The duplicate shares the offset with `dir`: start from the beginning.
    // SAFETY: d is a valid DIR*.
    unsafe { libc::rewinddir(d) };
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

// --- paths and links -------------------------------------------------------------------------

/// Check every link of a tree (`(path, target)` pairs relative to the root) with
/// [`resolve_in_tree`]; returns the first link that leaves the tree and why.
pub fn check_links_in_tree(links: &[(String, String)]) -> Result<(), (String, &'static str)> {
    let map: BTreeMap<&[u8], &[u8]> =
        links.iter().map(|(p, t)| (p.as_bytes(), t.as_bytes())).collect();
    for (rel, target) in links {
        resolve_in_tree(&map, rel.as_bytes(), target.as_bytes())
            .map_err(|why| (rel.clone(), why))?;
    }
    Ok(())
}

/// Resolve the symlink at `rel` → `target` the way the kernel would, against the tree's own
/// symlinks (`links`, relative path → target; any other path is a directory, a file or
/// nothing). Refuses a target that leaves the root at any point, absolute targets, and chains
/// deeper than 40 links (a loop).
pub fn resolve_in_tree(
    links: &BTreeMap<&[u8], &[u8]>,
    rel: &[u8],
    target: &[u8],
) -> Result<(), &'static str> {
    let mut at: Vec<Vec<u8>> = rel.split(|b| *b == b'/').map(<[u8]>::to_vec).collect();
    at.pop();
    let mut budget = 40u32;
    follow(links, &mut at, target, &mut budget)
}

fn follow(
    links: &BTreeMap<&[u8], &[u8]>,
    at: &mut Vec<Vec<u8>>,
    target: &[u8],
    budget: &mut u32,
) -> Result<(), &'static str> {
    if target.starts_with(b"/") {
        return Err("absolute target escapes the tree");
    }
    for c in target.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                // `at` always holds the resolved (physical) location, so `..` is its parent.
                if at.pop().is_none() {
                    return Err("target escapes the tree (through its symlinks)");
                }
            }
            name => {
                at.push(name.to_vec());
                if let Some(next) = links.get(at.join(&b'/').as_slice()) {
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

/// A listed path must be relative, `/`-separated, without `.`, `..` or empty components.
pub fn check_rel(rel: &[u8]) -> Result<(), &'static str> {
    if rel.is_empty() {
        return Err("empty path");
    }
    if rel.starts_with(b"/") {
        return Err("absolute path");
    }
    if rel.contains(&0) {
        return Err("NUL in path");
    }
    for c in rel.split(|b| *b == b'/') {
        match c {
            b"" => return Err("empty path component"),
            b"." | b".." => return Err("`.` or `..` component"),
            _ => {}
        }
    }
    Ok(())
}

/// A symlink at `rel` pointing to `target` must stay inside the tree (lexically).
pub fn check_link(rel: &[u8], target: &[u8]) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("empty target");
    }
    let t = Path::new(OsStr::from_bytes(target));
    if t.is_absolute() {
        return Err("absolute target escapes the tree");
    }
    // Resolve lexically from the link's directory; going above the root escapes.
    let mut depth: i64 = rel.split(|b| *b == b'/').count() as i64 - 1;
    for c in t.components() {
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

/// Remove the tree at `root`, first giving its owner write and search permission on every
/// directory in it (copies keep the sandbox's modes, and a read-only directory would otherwise
/// stop a non-root owner from emptying it). Symlinks are removed, never followed.
pub fn remove_tree(root: &Path) -> std::io::Result<()> {
    fn open_up(dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::symlink_metadata(dir)?;
        if !m.is_dir() {
            return Ok(());
        }
        if m.permissions().mode() & 0o700 != 0o700 {
            std::fs::set_permissions(
                dir,
                std::fs::Permissions::from_mode(m.permissions().mode() | 0o700),
            )?;
        }
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                open_up(&e.path())?;
            }
        }
        Ok(())
    }
    match open_up(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    }
    std::fs::remove_dir_all(root)
}

/// Make a freshly written tree durable: every file and directory entry under `root` and the
/// entry naming `root` in its parent (one `syncfs`, or per-file fsync where that is not
/// trusted: see [`crate::util::sync_tree`]).
pub fn sync_tree(root: &Path) -> Result<(), HostError> {
    crate::util::sync_tree(root).map_err(|e| HostError::io("cannot sync", root, e))
}

/// A tree's path for messages.
pub fn shown(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
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
        assert_eq!(check_link(rel.as_bytes(), target.as_bytes()).is_ok(), ok);
    }

    #[rstest]
    #[case::ok("workspace/a.md", true)]
    #[case::dotdot("../x", false)]
    #[case::inner_dotdot("a/../../x", false)]
    #[case::abs("/etc/x", false)]
    #[case::empty_comp("a//b", false)]
    fn rel_paths(#[case] p: &str, #[case] ok: bool) {
        assert_eq!(check_rel(p.as_bytes()).is_ok(), ok);
    }

    #[rstest]
    #[case::all(Keeps::ALL, 1_500_000_001, 1_500_000_001)]
    #[case::seconds(Keeps { subsecond_mtimes: false, ..Keeps::ALL }, 1_500_000_001, 1_000_000_000)]
    #[case::before_1970(Keeps { subsecond_mtimes: false, ..Keeps::ALL }, -1, -1_000_000_000)]
    fn mtime_resolution(#[case] k: Keeps, #[case] ns: i64, #[case] kept: i64) {
        assert_eq!(k.mtime(ns), kept);
    }
}
