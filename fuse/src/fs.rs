//! The `fuser::Filesystem` implementation: every callback only dispatches to
//! the tree and the store's reader, and maps errors through `errno`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use dsync_store::Error;

use crate::errno::errno;
use crate::tree::{Attr, Tree, Type};

/// How long the kernel may cache what can change (the root) and what cannot
/// (anything inside a snapshot).
const TTL_ROOT: Duration = Duration::from_secs(1);
const TTL_FIXED: Duration = Duration::from_secs(3600);

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub struct DsyncFs {
    pub tree: Tree,
    pub prefill: std::sync::Arc<crate::prefill::Prefill>,
}

/// Reads up to this size are random reads (whose frame is worth prefilling,
/// and whose reader's CPU is worth following); larger ones are the kernel's
/// readahead.
const PREFILL_BELOW: usize = 64 << 10;

fn to_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let t = to_time(a.mtime_ns);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.stored.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        flags: 0,
        blksize: 4096,
    }
}

fn file_type(t: Type) -> FileType {
    match t {
        Type::Dir => FileType::Directory,
        Type::File => FileType::RegularFile,
        Type::Symlink => FileType::Symlink,
        Type::CharDevice => FileType::CharDevice,
        Type::BlockDevice => FileType::BlockDevice,
        Type::Fifo => FileType::NamedPipe,
        Type::Socket => FileType::Socket,
    }
}

/// A value, its size when `size` is 0, or ERANGE when it does not fit.
fn xattr_reply(v: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(u32::try_from(v.len()).unwrap_or(u32::MAX));
    } else if v.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(v);
    }
}

/// What the tree found, or the errno to answer: ENOENT only for what is
/// truly absent; a list or record that cannot be read answers as its error
/// maps (damage is EIO), never as a missing name.
fn found<T>(r: Result<Option<T>, Error>) -> Result<T, Errno> {
    match r {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(Errno::ENOENT),
        Err(e) => Err(errno(&e)),
    }
}

fn ttl(a: &Attr) -> Duration {
    if a.immutable {
        TTL_FIXED
    } else {
        TTL_ROOT
    }
}

impl Filesystem for DsyncFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large reads for cp and qemu-img; the kernel caps what it accepts.
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = found(self.tree.lookup(parent.0, name.as_bytes()))
            .and_then(|key| found(self.tree.attr(self.tree.ino(&key))));
        match found {
            Ok(a) => reply.entry(&ttl(&a), &file_attr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match found(self.tree.attr(ino.0)) {
            Ok(a) => reply.attr(&ttl(&a), &file_attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.readlink(ino.0) {
            Ok(Some(t)) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
            // A day link whose snapshots were forgotten is gone (ENOENT).
            Ok(None) => match found(self.tree.attr(ino.0)) {
                Ok(_) => reply.error(Errno::EINVAL),
                Err(e) => reply.error(e),
            },
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.tree.open(ino.0) {
            // Versions never change: the page cache may keep their pages.
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => {
                crate::log(&format!("cannot open inode {}: {e}", ino.0));
                reply.error(errno(&e))
            }
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.tree.release(ino.0);
        reply.ok();
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        crate::affinity::follow(req.pid(), (size as usize) < PREFILL_BELOW);
        let r = match self.tree.reader(ino.0) {
            Ok(r) => r,
            Err(e) => return reply.error(errno(&e)),
        };
        let len = (size as u64).min(r.size().saturating_sub(offset)) as usize;
        // One buffer per FUSE thread: a fresh one per request would cost an
        // allocation, page faults and zeroing for every (up to 1 MiB) read.
        READ_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match r.read_at(offset, &mut buf[..len]) {
                Ok(n) => {
                    reply.data(&buf[..n]);
                    if n > 0 && n < PREFILL_BELOW {
                        self.prefill.push(ino.0, r.clone(), offset, n as u64);
                    }
                }
                Err(e) => {
                    crate::log(&format!("EIO for {len} bytes at {offset}: {e}"));
                    reply.error(errno(&e))
                }
            }
        })
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let r = match self.tree.reader(ino.0) {
            Ok(r) => r,
            Err(e) => return reply.error(errno(&e)),
        };
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        if off >= r.size() {
            return reply.error(Errno::ENXIO);
        }
        match whence {
            libc::SEEK_DATA => match r.next_data(off) {
                Some(d) if d < r.size() => reply.offset(d as i64),
                _ => reply.error(Errno::ENXIO),
            },
            libc::SEEK_HOLE => reply.offset(r.next_hole(off) as i64),
            libc::SEEK_SET => reply.offset(offset),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.tree.list(ino.0) {
            Ok(Some(entries)) => entries,
            Ok(None) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(errno(&e)),
        };
        let dots = [
            (b".".to_vec(), ino.0, FileType::Directory),
            (b"..".to_vec(), ino.0, FileType::Directory),
        ];
        let all = dots.into_iter().chain(
            entries
                .iter()
                .map(|(name, key, t)| (name.clone(), self.tree.ino(key), file_type(*t))),
        );
        for (i, (name, child, kind)) in all.enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(child),
                (i + 1) as u64,
                kind,
                OsStr::from_bytes(&name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let all = match found(self.tree.xattrs(ino.0)) {
            Ok(all) => all,
            Err(e) => return reply.error(e),
        };
        match all.iter().find(|(n, _)| n.as_slice() == name.as_bytes()) {
            None => reply.error(Errno::ENODATA),
            Some((_, v)) => xattr_reply(v, size, reply),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let all = match found(self.tree.xattrs(ino.0)) {
            Ok(all) => all,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        for (n, _) in &all {
            names.extend_from_slice(n);
            names.push(0);
        }
        xattr_reply(&names, size, reply)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }
}
