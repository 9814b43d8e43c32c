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

use crate::common::XorShift;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    SessionACL, TimeOrNow, WriteFlags,
};

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

/// The served file system (a handle on the shared state).
struct PowerFs(Arc<Mutex<State>>);

impl PowerFs {
    fn st(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

macro_rules! reply {
    ($reply:expr, $res:expr, $ok:ident $(, $arg:expr)*) => {
        match $res {
            Ok(v) => $reply.$ok($($arg,)* &v),
            Err(e) => $reply.error(e),
        }
    };
}

fn empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for PowerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let st = self.st();
        let r = st.entries(parent.0).and_then(|e| e.get(name).copied().ok_or(Errno::ENOENT));
        match r.and_then(|ino| st.attr(ino)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply!(reply, self.st().attr(ino.0), attr, &TTL)
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.st();
        let r = (|| {
            st.node(ino.0)?;
            if size.is_some() || mode.is_some() || mtime.is_some() {
                st.mutate(req, |s| format!("setattr {}", s.path_of(ino.0)))?;
            }
            let n = st.node_mut(ino.0)?;
            if let Some(m) = mode {
                n.perm = (m & 0o7777) as u16;
            }
            if let Some(sz) = size {
                match &mut n.body {
                    Body::File(d) => d.resize(sz as usize, 0),
                    _ => return Err(Errno::EISDIR),
                }
                n.mtime = SystemTime::now();
            }
            match mtime {
                Some(TimeOrNow::SpecificTime(t)) => n.mtime = t,
                Some(TimeOrNow::Now) => n.mtime = SystemTime::now(),
                None => {}
            }
            st.attr(ino.0)
        })();
        reply!(reply, r, attr, &TTL)
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let st = self.st();
        match st.node(ino.0).map(|n| &n.body) {
            Ok(Body::Symlink(t)) => reply.data(t.as_os_str().as_bytes()),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        let perm = (mode & !umask & 0o7777) as u16;
        let r = st.make(req, parent.0, name, Body::Dir(BTreeMap::new()), perm, "mkdir");
        if r.is_ok() {
            if let Ok(p) = st.node_mut(parent.0) {
                p.nlink += 1;
            }
        }
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.st();
        let r = (|| {
            let ino = *st.entries(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            if matches!(st.node(ino)?.body, Body::Dir(_)) {
                return Err(Errno::EISDIR);
            }
            st.mutate(req, |s| format!("unlink {}", join(&s.path_of(parent.0), name)))?;
            st.unlink_entry(parent.0, name)
        })();
        empty(reply, r)
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.st();
        let r = (|| {
            let ino = *st.entries(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            if !st.entries(ino)?.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            st.mutate(req, |s| format!("rmdir {}", join(&s.path_of(parent.0), name)))?;
            st.unlink_entry(parent.0, name)?;
            st.node_mut(parent.0)?.nlink -= 1;
            Ok(())
        })();
        empty(reply, r)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        let body = Body::Symlink(target.to_owned());
        match st.make(req, parent.0, link_name, body, 0o777, "symlink") {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let r = (|| {
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                return Err(Errno::EINVAL);
            }
            let ino = *st.entries(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            let is_dir = matches!(st.node(ino)?.body, Body::Dir(_));
            if let Some(&old) = st.entries(newparent.0)?.get(newname) {
                if old == ino {
                    return Ok(());
                }
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                match (&st.node(old)?.body, is_dir) {
                    (Body::Dir(e), true) if !e.is_empty() => return Err(Errno::ENOTEMPTY),
                    (Body::Dir(_), false) => return Err(Errno::EISDIR),
                    (_, true) if !matches!(st.node(old)?.body, Body::Dir(_)) => {
                        return Err(Errno::ENOTDIR)
                    }
                    _ => {}
                }
            }
            st.mutate(req, |s| {
                format!(
                    "rename {} -> {}",
                    join(&s.path_of(parent.0), name),
                    join(&s.path_of(newparent.0), newname)
                )
            })?;
            if let Some(old) = st.entries_mut(newparent.0)?.remove(newname) {
                let n = st.node_mut(old)?;
                n.nlink = n.nlink.saturating_sub(if is_dir { 2 } else { 1 });
                if is_dir {
                    st.node_mut(newparent.0)?.nlink -= 1;
                }
            }
            st.entries_mut(parent.0)?.remove(name);
            st.entries_mut(newparent.0)?.insert(newname.to_owned(), ino);
            if is_dir && parent != newparent {
                st.node_mut(parent.0)?.nlink -= 1;
                st.node_mut(newparent.0)?.nlink += 1;
            }
            st.node_mut(ino)?.at = (newparent.0, newname.to_owned());
            st.touch(parent.0);
            st.touch(newparent.0);
            Ok(())
        })();
        empty(reply, r)
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        let r = (|| {
            if matches!(st.node(ino.0)?.body, Body::Dir(_)) {
                return Err(Errno::EPERM);
            }
            if st.entries(newparent.0)?.contains_key(newname) {
                return Err(Errno::EEXIST);
            }
            st.mutate(req, |s| format!("link {}", join(&s.path_of(newparent.0), newname)))?;
            st.entries_mut(newparent.0)?.insert(newname.to_owned(), ino.0);
            st.node_mut(ino.0)?.nlink += 1;
            st.touch(newparent.0);
            st.attr(ino.0)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.st();
        let r = (|| {
            st.node(ino.0)?;
            if flags.0 & libc::O_TRUNC != 0 {
                st.mutate(req, |s| format!("truncate {}", s.path_of(ino.0)))?;
                if let Body::File(d) = &mut st.node_mut(ino.0)?.body {
                    d.clear();
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let st = self.st();
        if st.cut.is_some() {
            return reply.error(Errno::EIO);
        }
        match st.node(ino.0).map(|n| &n.body) {
            Ok(Body::File(d)) => {
                let start = (offset as usize).min(d.len());
                let end = (start + size as usize).min(d.len());
                reply.data(&d[start..end])
            }
            Ok(_) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut st = self.st();
        let r = (|| {
            st.node(ino.0)?;
            st.mutate(req, |s| format!("write {}", s.path_of(ino.0)))?;
            let n = st.node_mut(ino.0)?;
            let Body::File(d) = &mut n.body else { return Err(Errno::EISDIR) };
            let end = offset as usize + data.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[offset as usize..end].copy_from_slice(data);
            n.mtime = SystemTime::now();
            Ok(data.len() as u32)
        })();
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let r = (|| {
            st.node(ino.0)?;
            st.mutate(req, |s| format!("fsync {}", s.path_of(ino.0)))?;
            *st.syncs.entry("fsync").or_default() += 1;
            let n = st.node_mut(ino.0)?;
            if let Body::File(_) = n.body {
                n.durable = Some(n.body.clone());
            }
            Ok(())
        })();
        empty(reply, r)
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let st = self.st();
        let entries = match st.entries(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let parent = st.node(ino.0).map(|n| n.at.0).unwrap_or(ROOT);
        let mut all: Vec<(u64, FileType, OsString)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (parent, FileType::Directory, "..".into()),
        ];
        for (name, &child) in entries {
            let kind = st.node(child).map(|n| n.kind()).unwrap_or(FileType::RegularFile);
            all.push((child, kind, name.clone()));
        }
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let r = (|| {
            st.entries(ino.0)?;
            st.mutate(req, |s| format!("fsyncdir {}", s.path_of(ino.0)))?;
            *st.syncs.entry("fsyncdir").or_default() += 1;
            let n = st.node_mut(ino.0)?;
            n.durable = Some(n.body.clone());
            Ok(())
        })();
        empty(reply, r)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, BLOCK as u32, 255, BLOCK as u32);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.st();
        let perm = (mode & !umask & 0o7777) as u16;
        match st.make(req, parent.0, name, Body::File(Vec::new()), perm, "create") {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
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
        for e in std::fs::read_dir(&dest)? {
            let p = e?.path();
            if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
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
        let f = std::fs::File::options().read(true).open(&to).ok();
        if let (Some(f), false) = (f, matches!(n.body, Body::Symlink(_))) {
            let _ = f.set_modified(n.mtime);
        }
    }
    Ok(())
}
