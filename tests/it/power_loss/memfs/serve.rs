//! The FUSE requests: each one applied to the live tree of [`super::State`], counted as an
//! operation when it changes something (or makes something durable), refused with `EIO` once
//! the power is cut.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use fuser::{
    Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use super::{join, Body, State, BLOCK, ROOT, TTL};

/// The served file system (a handle on the shared state).
pub(super) struct PowerFs(pub(super) Arc<Mutex<State>>);

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
        empty(reply, self.st().sync(req, ino.0, false))
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
        empty(reply, self.st().sync(req, ino.0, true))
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
