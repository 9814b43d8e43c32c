//! A FUSE file system that forgets what was not made durable: the power-loss tests mount it as
//! a NemoClaw home, run real `nemoclaw` processes on it, "cut the power" at a chosen operation
//! and continue from what a disk would hold afterwards.
//!
//! The live tree is kept in memory (it starts as a copy of a real directory) and served by a
//! thread of the test process. Beside it, every inode keeps its *durable* state, with the
//! weakest rules POSIX allows:
//!
//! - a file's bytes (and size) become durable when that file is `fsync`ed or `fdatasync`ed;
//! - a directory's entries — every create, mkdir, symlink, link, rename and unlink in it —
//!   become durable when that directory is `fsync`ed (`FUSE_FSYNCDIR`);
//! - nothing else makes anything durable. In particular `syncfs(2)` on a FUSE mount never
//!   reaches the daemon (Linux sends `FUSE_SYNCFS` only to virtiofs-style servers), so it
//!   makes nothing durable here, exactly as on sshfs and other FUSE file systems.
//!
//! A file whose name is durable but whose bytes never were comes back empty; a directory whose
//! name is durable but whose entries never were comes back empty. A rename whose two parents
//! were not both synced can leave the inode under both names (for a file, as hard links), as a
//! journaling file system that commits the two directories separately could.
//!
//! The power cut happens *before* mutating operation number `cut_at`: from then on every
//! operation fails with `EIO`, and the process that asked is killed. [`Mounted::power_cut`]
//! then unmounts and writes the durable state where the mount was (the disk comes back at the
//! same path, so absolute paths in the journal stay right); in torn mode every file with
//! unsynced bytes gets them up to a random 4 KiB block (writeback reached part of the file).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

mod serve;

use crate::common::XorShift;
use fuser::{Config, Errno, FileAttr, FileType, INodeNo, MountOption, Request, SessionACL};
use serve::PowerFs;

const TTL: Duration = Duration::from_secs(1);
const BLOCK: usize = 4096;
const ROOT: u64 = 1;

#[derive(Clone, Debug)]
enum Body {
    File(Vec<u8>),
    Dir(BTreeMap<OsString, u64>),
    Symlink(PathBuf),
}

#[derive(Clone, Debug)]
struct Node {
    body: Body,
    perm: u16,
    nlink: u32,
    mtime: SystemTime,
    /// What survives a power cut: the bytes (file) or entries (directory) as of the last sync;
    /// `None` = never synced. Symlink targets are written with the inode and always durable.
    durable: Option<Body>,
    /// Last name given to the inode (parent, name), for describing operations.
    at: (u64, OsString),
}

impl Node {
    fn kind(&self) -> FileType {
        match self.body {
            Body::File(_) => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
            Body::Symlink(_) => FileType::Symlink,
        }
    }

    fn size(&self) -> u64 {
        match &self.body {
            Body::File(d) => d.len() as u64,
            Body::Dir(e) => e.len() as u64,
            Body::Symlink(t) => t.as_os_str().len() as u64,
        }
    }
}

/// Everything the file system knows, behind one lock (the session serves on one thread).
#[derive(Debug, Default)]
struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Mutating operations served so far (writes, creates, renames, syncs, ...).
    ops: u64,
    /// Cut the power before mutating operation number `cut_at` (1-based).
    cut_at: Option<u64>,
    /// The operation the power was cut at, once it was.
    cut: Option<String>,
    /// Syncs served, by kind, for the report (`fsync`, `fsyncdir`).
    syncs: BTreeMap<&'static str, u64>,
    /// Every mutating operation served, described, in order.
    log: Vec<String>,
}

impl State {
    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn entries(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.node(ino)?.body {
            Body::Dir(e) => Ok(e),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.node_mut(ino)?.body {
            Body::Dir(e) => Ok(e),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let n = self.node(ino)?;
        Ok(FileAttr {
            ino: INodeNo(ino),
            size: n.size(),
            blocks: n.size().div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind: n.kind(),
            perm: n.perm,
            nlink: n.nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        })
    }

    /// Path of an inode from the root, by the last name it was given (for reports).
    fn path_of(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut at = ino;
        while at != ROOT && parts.len() < 64 {
            let Some(n) = self.nodes.get(&at) else { break };
            parts.push(n.at.1.to_string_lossy().into_owned());
            at = n.at.0;
        }
        parts.reverse();
        if parts.is_empty() {
            return "<home>".into();
        }
        parts.join("/")
    }

    /// Count one mutating operation; `Err(EIO)` once the power is cut. `what` describes it.
    fn mutate(&mut self, req: &Request, what: impl FnOnce(&State) -> String) -> Result<(), Errno> {
        if self.cut.is_some() {
            return Err(Errno::EIO);
        }
        self.ops += 1;
        let op = what(self);
        if self.cut_at.is_some_and(|c| self.ops >= c) {
            self.cut = Some(op);
            // The machine is off: the process that was writing does not live on either (the
            // test process itself, and the kernel's own writeback, are left alone).
            let pid = req.pid() as i32;
            if pid > 0 && pid as u32 != std::process::id() {
                // SAFETY: plain syscall with no memory arguments.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            return Err(Errno::EIO);
        }
        self.log.push(op);
        Ok(())
    }

    /// `fsync` (`dir` false) or `fsyncdir` of `ino`: its bytes, or its entries, are durable.
    fn sync(&mut self, req: &Request, ino: u64, dir: bool) -> Result<(), Errno> {
        let verb = if dir { "fsyncdir" } else { "fsync" };
        self.node(ino)?;
        self.mutate(req, |s| format!("{verb} {}", s.path_of(ino)))?;
        *self.syncs.entry(verb).or_default() += 1;
        let n = self.node_mut(ino)?;
        n.durable = Some(n.body.clone());
        Ok(())
    }

    fn alloc(&mut self, parent: u64, name: &OsStr, body: Body, perm: u16) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        // A symlink's target is part of the inode, written with it.
        let durable = match &body {
            Body::Symlink(_) => Some(body.clone()),
            _ => None,
        };
        let nlink = if matches!(body, Body::Dir(_)) { 2 } else { 1 };
        self.nodes.insert(
            ino,
            Node {
                body,
                perm,
                nlink,
                mtime: SystemTime::now(),
                durable,
                at: (parent, name.to_owned()),
            },
        );
        ino
    }

    /// Add a fresh inode under `parent/name` (which must not exist).
    fn make(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        body: Body,
        perm: u16,
        verb: &str,
    ) -> Result<FileAttr, Errno> {
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        self.mutate(req, |s| format!("{verb} {}", join(&s.path_of(parent), name)))?;
        let ino = self.alloc(parent, name, body, perm);
        self.entries_mut(parent)?.insert(name.to_owned(), ino);
        self.touch(parent);
        self.attr(ino)
    }

    fn touch(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.mtime = SystemTime::now();
        }
    }

    fn unlink_entry(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = self.entries_mut(parent)?.remove(name).ok_or(Errno::ENOENT)?;
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.nlink = n.nlink.saturating_sub(1);
        }
        self.touch(parent);
        Ok(())
    }
}

fn join(dir: &str, name: &OsStr) -> String {
    if dir == "<home>" {
        name.to_string_lossy().into_owned()
    } else {
        format!("{dir}/{}", name.to_string_lossy())
    }
}

/// A mounted power-loss file system; unmounted when dropped.
pub struct Mounted {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

/// Why the file system cannot be used on this machine (the tests then skip, saying so).
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse does not exist".into());
    }
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()))
        .unwrap_or(false);
    if !found {
        return Some("`fusermount3` is not on PATH (Debian: `apt-get install fuse3`)".into());
    }
    None
}

impl Mounted {
    /// Mount at `mountpoint` (an existing directory, hidden while mounted) a file system whose
    /// live and durable state are both a copy of the real directory `src` (everything in it
    /// counts as synced; `src` may be `mountpoint` itself). The power is cut before mutating
    /// operation `cut_at`, if given. `Err` says why mounting failed.
    pub fn new(src: &Path, mountpoint: &Path, cut_at: Option<u64>) -> Result<Mounted, String> {
        let mut st = State { next_ino: ROOT + 1, cut_at, ..State::default() };
        let root = Node {
            body: Body::Dir(BTreeMap::new()),
            perm: 0o700,
            nlink: 2,
            mtime: SystemTime::now(),
            durable: None,
            at: (ROOT, OsString::new()),
        };
        st.nodes.insert(ROOT, root);
        load(&mut st, ROOT, src).map_err(|e| format!("cannot load {}: {e}", src.display()))?;
        let state = Arc::new(Mutex::new(st));
        let mut cfg = Config::default();
        cfg.mount_options =
            vec![MountOption::FSName("nemoclaw-power".into()), MountOption::NoAtime];
        cfg.acl = SessionACL::All;
        let session = fuser::spawn_mount(PowerFs(state.clone()), mountpoint, &cfg)
            .map_err(|e| format!("cannot mount FUSE at {}: {e}", mountpoint.display()))?;
        Ok(Mounted { state, session: Some(session), mountpoint: mountpoint.to_owned() })
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Mutating operations served so far.
    pub fn ops(&self) -> u64 {
        self.st().ops
    }

    /// The operation the power was cut at, if it was.
    pub fn cut(&self) -> Option<String> {
        self.st().cut.clone()
    }

    /// `fsync` and `fsyncdir` requests served.
    pub fn syncs(&self) -> BTreeMap<&'static str, u64> {
        self.st().syncs.clone()
    }

    /// Every mutating operation served so far, described (`fsyncdir <home>`, `write a/b`).
    pub fn log(&self) -> Vec<String> {
        self.st().log.clone()
    }

    /// Cut the power now (if it was not cut yet), unmount, and put the durable state in the
    /// mountpoint directory instead of whatever it held. `torn`: a seed for tearing unsynced
    /// file bytes at a random block. Returns how many files came back torn (neither their
    /// durable nor their live bytes).
    pub fn power_cut(mut self, torn: Option<u64>) -> std::io::Result<usize> {
        {
            let mut st = self.st();
            if st.cut.is_none() {
                st.cut = Some("(after the last operation)".into());
            }
        }
        self.unmount();
        let dest = self.mountpoint.clone();
        clear_dir(&dest);
        let st = self.st();
        let mut rng = torn.map(|s| XorShift(s | 1));
        let mut linked = HashMap::new();
        let mut path = vec![ROOT];
        let mut torn_files = 0;
        write_dir(&st, ROOT, &dest, &mut rng, &mut linked, &mut path, &mut torn_files)?;
        Ok(torn_files)
    }
}

impl Mounted {
    /// Unmount (synchronously) and stop the serving thread.
    fn unmount(&mut self) {
        let Some(s) = self.session.take() else { return };
        if let Err(e) = s.umount_and_join() {
            // A lazy unmount as the fallback: the directory underneath must come back.
            let c = std::ffi::CString::new(self.mountpoint.as_os_str().as_bytes()).unwrap();
            // SAFETY: `c` is NUL-terminated.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            assert!(
                rc == 0 || !self.mounted(),
                "cannot unmount {}: {e}",
                self.mountpoint.display()
            );
        }
        assert!(!self.mounted(), "{} is still mounted", self.mountpoint.display());
    }

    fn mounted(&self) -> bool {
        !nemoclaw::util::syncfs_is_trusted(&self.mountpoint)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Remove everything inside `dir` (which stays).
pub fn clear_dir(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("list the directory") {
        let p = e.expect("list the directory").path();
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p).expect("remove a directory");
        } else {
            std::fs::remove_file(&p).expect("remove a file");
        }
    }
}

/// Copy the real directory `dir` into `parent` (as live and durable state).
fn load(st: &mut State, parent: u64, dir: &Path) -> std::io::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let meta = e.metadata()?;
        let perm = (meta.mode() & 0o7777) as u16;
        let name = e.file_name();
        let body = if meta.is_dir() {
            Body::Dir(BTreeMap::new())
        } else if meta.file_type().is_symlink() {
            Body::Symlink(std::fs::read_link(e.path())?)
        } else {
            Body::File(std::fs::read(e.path())?)
        };
        let is_dir = meta.is_dir();
        let ino = st.alloc(parent, &name, body, perm);
        if let Some(n) = st.nodes.get_mut(&ino) {
            n.mtime = meta.modified()?;
        }
        if let Some(p) = st.nodes.get_mut(&parent) {
            if let Body::Dir(en) = &mut p.body {
                en.insert(name.clone(), ino);
            }
            if is_dir {
                p.nlink += 1;
            }
        }
        if is_dir {
            load(st, ino, &e.path())?;
        }
        let n = st.nodes.get_mut(&ino).expect("just inserted");
        n.durable = Some(n.body.clone());
    }
    let p = st.nodes.get_mut(&parent).expect("parent exists");
    p.durable = Some(p.body.clone());
    Ok(())
}

/// Bytes of a file after the power cut: the durable ones, or (torn) the live ones up to a
/// random block boundary followed by what the durable version had beyond it.
fn file_after_cut(n: &Node, rng: &mut Option<XorShift>) -> Vec<u8> {
    let durable = match &n.durable {
        Some(Body::File(d)) => d.clone(),
        _ => Vec::new(),
    };
    let (Some(rng), Body::File(live)) = (rng.as_mut(), &n.body) else { return durable };
    if *live == durable {
        return durable;
    }
    let blocks = live.len().div_ceil(BLOCK) as u64;
    let k = (rng.next() % (blocks + 1)) as usize * BLOCK;
    let mut out = live[..k.min(live.len())].to_vec();
    if durable.len() > out.len() {
        out.extend_from_slice(&durable[out.len()..]);
    }
    out
}

fn write_dir(
    st: &State,
    ino: u64,
    dest: &Path,
    rng: &mut Option<XorShift>,
    linked: &mut HashMap<u64, PathBuf>,
    path: &mut Vec<u64>,
    torn_files: &mut usize,
) -> std::io::Result<()> {
    let Some(Body::Dir(entries)) = st.nodes.get(&ino).and_then(|n| n.durable.as_ref()) else {
        return Ok(()); // never synced: empty
    };
    for (name, &child) in entries {
        let Some(n) = st.nodes.get(&child) else { continue };
        let to = dest.join(name);
        match &n.body {
            Body::Dir(_) => {
                // A directory can only be reached twice through renames of unsynced parents;
                // never descend into itself.
                if path.contains(&child) {
                    continue;
                }
                std::fs::create_dir(&to)?;
                path.push(child);
                write_dir(st, child, &to, rng, linked, path, torn_files)?;
                path.pop();
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(n.perm as u32))?;
            }
            Body::Symlink(t) => std::os::unix::fs::symlink(t, &to)?,
            Body::File(_) => {
                if let Some(first) = linked.get(&child) {
                    std::fs::hard_link(first, &to)?;
                    continue;
                }
                let bytes = file_after_cut(n, rng);
                let durable = match &n.durable {
                    Some(Body::File(d)) => d.as_slice(),
                    _ => &[],
                };
                if let Body::File(live) = &n.body {
                    if bytes != durable && bytes != *live {
                        *torn_files += 1;
                    }
                }
                std::fs::write(&to, bytes)?;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(n.perm as u32))?;
                linked.insert(child, to.clone());
            }
        }
        if matches!(n.body, Body::Symlink(_)) {
            // A symlink's own mtime (backups keep it): set without following the link.
            set_symlink_mtime(&to, n.mtime);
        } else if let Ok(f) = std::fs::File::options().read(true).open(&to) {
            let _ = f.set_modified(n.mtime);
        }
    }
    Ok(())
}

fn set_symlink_mtime(path: &Path, t: SystemTime) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) else { return };
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return };
    let ts = libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as _ };
    let times = [libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }, ts];
    // SAFETY: a valid C path and two timespecs; AT_SYMLINK_NOFOLLOW touches the link itself.
    unsafe {
        libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
    };
}
