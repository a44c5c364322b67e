//! Attributes of what a sync writes: owner, mode, extended attributes
//! and ACLs, times, set through a descriptor or relative to an open
//! directory, never through a path that DST could redirect.

use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, Timespec, Timestamps};

use super::{os, Shared};
use crate::source::{self, Stat, XattrSource};

impl Shared<'_> {
    /// Owner, mode, extended attributes and times of a node written or
    /// kept, as the flags ask (a chown clears setuid bits, so it goes
    /// first; times last).
    pub(super) fn attrs(
        &self,
        at: Target<'_>,
        st: &Stat,
        xattrs: Option<&Xattrs>,
        new: bool,
    ) -> io::Result<()> {
        let o = self.opts;
        let is_link = st.file_type() == libc::S_IFLNK;
        if o.owner || o.group {
            let u = (o.owner && self.root).then(|| rustix::fs::Uid::from_raw(st.uid));
            let g = o.group.then(|| rustix::fs::Gid::from_raw(st.gid));
            let r = match at {
                Target::Fd(fd) => rustix::fs::fchown(fd, u, g),
                Target::At(dir, name) => {
                    rustix::fs::chownat(dir, name, u, g, AtFlags::SYMLINK_NOFOLLOW)
                }
            };
            match r {
                // A group the user is not in: rsync keeps the default too.
                Err(rustix::io::Errno::PERM) if !self.root => {}
                r => r?,
            }
        }
        if !is_link && (o.perms || new) {
            let mode = if o.perms {
                st.mode & 0o7777
            } else {
                st.mode & 0o777 & !self.umask
            };
            let mode = Mode::from_raw_mode(mode);
            match at {
                Target::Fd(fd) => rustix::fs::fchmod(fd, mode)?,
                Target::At(dir, name) => rustix::fs::chmodat(dir, name, mode, AtFlags::empty())?,
            }
        }
        if let Some(want) = xattrs {
            set_xattrs(at, want)?;
        }
        if o.times {
            let t = Timespec {
                tv_sec: st.mtime_ns.div_euclid(1_000_000_000),
                tv_nsec: st.mtime_ns.rem_euclid(1_000_000_000) as _,
            };
            let times = Timestamps {
                last_access: t,
                last_modification: t,
            };
            match at {
                Target::Fd(fd) => rustix::fs::futimens(fd, &times)?,
                Target::At(dir, name) => {
                    rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)?
                }
            }
        }
        Ok(())
    }

    /// Whether the extended attributes `name` is kept under the flags.
    pub(super) fn keeps_xattr(&self, name: &[u8]) -> bool {
        if name.starts_with(b"system.posix_acl_") {
            self.opts.acls
        } else {
            self.opts.xattrs
        }
    }

    /// The attributes kept of a node (none asked: `None`).
    pub(super) fn xattrs_of(&self, src: XattrSource<'_>) -> io::Result<Option<Xattrs>> {
        if !self.opts.xattrs && !self.opts.acls {
            return Ok(None);
        }
        let mut x = source::xattrs(src)?;
        x.retain(|(n, _)| self.keeps_xattr(n));
        Ok(Some(x))
    }
}

pub(super) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// A node of DST: an open file, or a name in an open directory.
#[derive(Clone, Copy)]
pub(super) enum Target<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a [u8]),
}

/// Through `/proc/self/fd`, so that no path is resolved through DST.
pub(super) fn proc_path(at: Target<'_>) -> PathBuf {
    use std::os::fd::AsRawFd;
    match at {
        Target::Fd(fd) => PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
        Target::At(dir, name) => {
            PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(os(name))
        }
    }
}

/// Makes a node's kept extended attributes `want`: sets them, removes the
/// others of the kinds kept.
pub(super) fn set_xattrs(at: Target<'_>, want: &Xattrs) -> io::Result<()> {
    let have = match at {
        Target::Fd(fd) => source::xattrs(XattrSource::Fd(fd))?,
        Target::At(..) => source::xattrs(XattrSource::Path(&proc_path(at)))?,
    };
    for (n, _) in &have {
        if !want.iter().any(|(w, _)| w == n) {
            let r = match at {
                Target::Fd(fd) => rustix::fs::fremovexattr(fd, n.as_slice()),
                Target::At(..) => rustix::fs::lremovexattr(proc_path(at), n.as_slice()),
            };
            match r {
                Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let changed: Xattrs = want.iter().filter(|w| !have.contains(w)).cloned().collect();
    match at {
        Target::Fd(fd) => source::set_xattrs(Some(fd), Path::new(""), &changed),
        Target::At(..) => source::set_xattrs(None, &proc_path(at), &changed),
    }
}
