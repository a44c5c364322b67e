//! The file-system side of a backup source: `lstat` relative to an open
//! directory, no-follow opens, directory listings, extended attributes and
//! user and group names. Everything a tree walk reads goes through here, by
//! file descriptor and single name, so a directory swapped for a symlink
//! while dsync walks cannot lead it elsewhere.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::format::v3::node::{MAX_XATTRS, MAX_XATTR_VALUE};

/// What `lstat` says of a node, in the units entries keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    pub rdev: u64,
}

impl Stat {
    fn of(st: &rustix::fs::Stat) -> Stat {
        Stat {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec as i64,
            dev: st.st_dev,
            ino: st.st_ino,
            nlink: st.st_nlink,
            rdev: st.st_rdev,
        }
    }

    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    pub fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }

    pub fn is_file(&self) -> bool {
        self.file_type() == libc::S_IFREG
    }
}

/// `lstat` of `name` in `dir`.
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Stat> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(Stat::of(&st))
}

/// `fstat` of an open file.
pub(crate) fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    Ok(Stat::of(&rustix::fs::fstat(fd)?))
}

/// Opens the directory `name` in `dir` (`None`: `path` itself), never
/// through a symlink.
pub(crate) fn open_dir(dir: Option<BorrowedFd<'_>>, name: &[u8]) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(match dir {
        Some(d) => rustix::fs::openat(d, name, flags, Mode::empty())?,
        None => rustix::fs::open(name, flags, Mode::empty())?,
    })
}

/// Opens the file `name` in `dir` for reading, never through a symlink,
/// without updating its access time where the kernel lets us.
pub(crate) fn open_file(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let fd = match rustix::fs::openat(dir, name, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => rustix::fs::openat(dir, name, flags, Mode::empty())?,
        r => r?,
    };
    Ok(File::from(fd))
}

/// The names in a directory (not `.` and `..`), with their inode numbers.
pub(crate) fn read_names(dir: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, u64)>> {
    let mut d = rustix::fs::Dir::read_from(dir)?;
    let mut out = Vec::new();
    while let Some(e) = d.read() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push((name.to_vec(), e.ino()));
    }
    Ok(out)
}

/// The target of the symlink `name` in `dir`, as raw bytes.
pub(crate) fn read_link(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<u8>> {
    Ok(rustix::fs::readlinkat(dir, name, Vec::new())?.into_bytes())
}

/// Where extended attributes are read from.
pub(crate) enum XattrSource<'a> {
    Fd(BorrowedFd<'a>),
    /// A node that is not opened (symlink, device, fifo, socket).
    Path(&'a Path),
}

/// The extended attributes of a node, names sorted. A file system without
/// them gives none.
pub(crate) fn xattrs(src: XattrSource<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let list = match grow(|buf| match &src {
        XattrSource::Fd(fd) => rustix::fs::flistxattr(fd, buf),
        XattrSource::Path(p) => rustix::fs::llistxattr(*p, buf),
    }) {
        Ok(l) => l,
        Err(e) if unsupported(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in list.split(|&c| c == 0).filter(|n| !n.is_empty()) {
        let value = match grow(|buf| match &src {
            XattrSource::Fd(fd) => rustix::fs::fgetxattr(fd, name, buf),
            XattrSource::Path(p) => rustix::fs::lgetxattr(*p, name, buf),
        }) {
            Ok(v) => v,
            // Removed since it was listed.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        if value.len() > MAX_XATTR_VALUE {
            return Err(io::Error::other(format!(
                "extended attribute {} is {} bytes (at most {MAX_XATTR_VALUE} are kept)",
                String::from_utf8_lossy(name),
                value.len()
            )));
        }
        out.push((name.to_vec(), value));
    }
    if out.len() > MAX_XATTRS {
        return Err(io::Error::other(format!(
            "{} extended attributes (at most {MAX_XATTRS} are kept)",
            out.len()
        )));
    }
    out.sort();
    Ok(out)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTSUP) | Some(libc::ENOSYS) | Some(libc::EPERM)
    )
}

/// Calls `f` with ever larger buffers until the value fits.
fn grow(f: impl Fn(&mut [u8]) -> rustix::io::Result<usize>) -> io::Result<Vec<u8>> {
    let mut size = 256;
    loop {
        let mut buf = vec![0u8; size];
        match f(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) if size < 16 << 20 => size *= 4,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sets the extended attributes of a node (restore).
pub(crate) fn set_xattrs(
    fd: Option<BorrowedFd<'_>>,
    path: &Path,
    xattrs: &[(Vec<u8>, Vec<u8>)],
) -> io::Result<()> {
    for (n, v) in xattrs {
        let flags = rustix::fs::XattrFlags::empty();
        match fd {
            Some(fd) => rustix::fs::fsetxattr(fd, n.as_slice(), v, flags)?,
            None => rustix::fs::lsetxattr(path, n.as_slice(), v, flags)?,
        }
    }
    Ok(())
}

/// User and group names by id, and ids by name, looked up once each.
#[derive(Default)]
pub(crate) struct Owners {
    users: HashMap<u32, Vec<u8>>,
    groups: HashMap<u32, Vec<u8>>,
    uids: HashMap<Vec<u8>, Option<u32>>,
    gids: HashMap<Vec<u8>, Option<u32>>,
}

impl Owners {
    /// The name of user `uid` (empty when the system has none).
    pub fn user(&mut self, uid: u32) -> Vec<u8> {
        self.users
            .entry(uid)
            .or_insert_with(|| user_name(uid))
            .clone()
    }

    /// The name of group `gid` (empty when the system has none).
    pub fn group(&mut self, gid: u32) -> Vec<u8> {
        self.groups
            .entry(gid)
            .or_insert_with(|| group_name(gid))
            .clone()
    }

    /// The id of the user called `name` on this system.
    pub fn uid(&mut self, name: &[u8]) -> Option<u32> {
        if name.is_empty() {
            return None;
        }
        *self
            .uids
            .entry(name.to_vec())
            .or_insert_with(|| user_id(name))
    }

    /// The id of the group called `name` on this system.
    pub fn gid(&mut self, name: &[u8]) -> Option<u32> {
        if name.is_empty() {
            return None;
        }
        *self
            .gids
            .entry(name.to_vec())
            .or_insert_with(|| group_id(name))
    }
}

fn cstr_bytes(p: *const libc::c_char) -> Vec<u8> {
    if p.is_null() {
        return Vec::new();
    }
    // SAFETY: a non-null pointer from getpw*/getgr* points at a C string
    // inside the buffer we passed, alive for this call.
    unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes().to_vec()
}

/// The buffer for a passwd or group record starts here (most records fit)
/// and grows on ERANGE up to the cap (a group with thousands of members is
/// large; past the cap the name is taken as unknown).
const DB_BUF_START: usize = 16 << 10;
const DB_BUF_MAX: usize = 16 << 20;

/// One `getpw*_r` / `getgr*_r` lookup, its buffer grown on ERANGE; `read`
/// sees the record found (its strings point into the buffer, so `read`
/// copies what it keeps). `None` when there is no such record, or on any
/// other error.
///
/// `call(record, buf, buf_len, result)` must be one of those functions with
/// its key bound: it writes the record into `record`, its strings into
/// `buf` (`buf_len` bytes), and sets `result` to `record` or to null.
fn db_lookup<R, T>(
    call: impl Fn(*mut R, *mut libc::c_char, usize, *mut *mut R) -> libc::c_int,
    read: impl FnOnce(&R) -> T,
) -> Option<T> {
    let mut size = DB_BUF_START;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        let mut rec = std::mem::MaybeUninit::<R>::uninit();
        let mut res: *mut R = std::ptr::null_mut();
        match call(rec.as_mut_ptr(), buf.as_mut_ptr(), buf.len(), &mut res) {
            // SAFETY: on success with a non-null result the call filled the
            // record `res` points at (`rec`), its strings in `buf`; both
            // live until `read` returns.
            0 if !res.is_null() => return Some(read(unsafe { &*res })),
            libc::ERANGE if size < DB_BUF_MAX => size *= 4,
            _ => return None,
        }
    }
}

fn user_name(uid: u32) -> Vec<u8> {
    // SAFETY: getpwuid_r with the pointers and length db_lookup gives.
    let call = |p, b, n, r| unsafe { libc::getpwuid_r(uid, p, b, n, r) };
    db_lookup(call, |pw: &libc::passwd| cstr_bytes(pw.pw_name)).unwrap_or_default()
}

fn group_name(gid: u32) -> Vec<u8> {
    // SAFETY: as in user_name.
    let call = |p, b, n, r| unsafe { libc::getgrgid_r(gid, p, b, n, r) };
    db_lookup(call, |gr: &libc::group| cstr_bytes(gr.gr_name)).unwrap_or_default()
}

fn user_id(name: &[u8]) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: as in user_name; `c` is a C string alive for the call.
    let call = |p, b, n, r| unsafe { libc::getpwnam_r(c.as_ptr(), p, b, n, r) };
    db_lookup(call, |pw: &libc::passwd| pw.pw_uid)
}

fn group_id(name: &[u8]) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: as in user_id.
    let call = |p, b, n, r| unsafe { libc::getgrnam_r(c.as_ptr(), p, b, n, r) };
    db_lookup(call, |gr: &libc::group| gr.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn stat_and_names_relative_to_a_directory() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a"), b"xyz").unwrap();
        std::os::unix::fs::symlink("a", t.path().join("l")).unwrap();
        let d = open_dir(None, t.path().as_os_str().as_encoded_bytes()).unwrap();
        let mut names = read_names(d.as_fd()).unwrap();
        names.sort();
        assert_eq!(
            names.iter().map(|n| n.0.clone()).collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"l".to_vec()]
        );
        assert_eq!(stat_at(d.as_fd(), b"a").unwrap().size, 3);
        let l = stat_at(d.as_fd(), b"l").unwrap();
        assert_eq!(l.file_type(), libc::S_IFLNK);
        assert_eq!(read_link(d.as_fd(), b"l").unwrap(), b"a");
        // A symlink is never opened as a file or a directory.
        assert!(open_file(d.as_fd(), b"l").is_err());
        assert!(open_dir(Some(d.as_fd()), b"l").is_err());
    }

    #[test]
    fn xattrs_are_read_sorted() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        std::fs::write(&p, b"").unwrap();
        let f = File::open(&p).unwrap();
        if rustix::fs::fsetxattr(&f, "user.b", b"2", rustix::fs::XattrFlags::empty()).is_err() {
            // The file system has no user xattrs: nothing to read.
            assert_eq!(xattrs(XattrSource::Fd(f.as_fd())).unwrap(), vec![]);
            return;
        }
        rustix::fs::fsetxattr(&f, "user.a", b"1", rustix::fs::XattrFlags::empty()).unwrap();
        let x = xattrs(XattrSource::Fd(f.as_fd())).unwrap();
        assert_eq!(
            x,
            vec![
                (b"user.a".to_vec(), b"1".to_vec()),
                (b"user.b".to_vec(), b"2".to_vec())
            ]
        );
        assert_eq!(xattrs(XattrSource::Path(&p)).unwrap(), x);
    }

    #[test]
    fn owner_names_round_trip() {
        let mut o = Owners::default();
        let root = o.user(0);
        assert_eq!(root, b"root");
        assert_eq!(o.uid(&root), Some(0));
        let g = o.group(0);
        assert_eq!(o.gid(&g), Some(0));
        assert_eq!(o.uid(b"no-such-user-dsync"), None);
        assert_eq!(o.gid(b"no-such-group-dsync"), None);
        assert_eq!(o.uid(b"nul\0inside"), None);
    }

    /// A record larger than the buffer (ERANGE) is found with a larger
    /// one; one larger than the cap is unknown, as is one not found.
    #[test]
    fn db_lookup_grows_the_buffer_on_erange() {
        let needs = |need: usize| {
            let sizes = std::cell::RefCell::new(Vec::new());
            let call = |rec: *mut usize, _: *mut libc::c_char, n: usize, res: *mut *mut usize| {
                sizes.borrow_mut().push(n);
                if n < need {
                    return libc::ERANGE;
                }
                // SAFETY: db_lookup passes valid pointers.
                unsafe {
                    rec.write(n);
                    *res = rec;
                }
                0
            };
            let got = db_lookup(call, |&n| n);
            (got, sizes.into_inner())
        };
        assert_eq!(needs(1), (Some(16 << 10), vec![16 << 10]));
        assert_eq!(
            needs(100_000),
            (Some(256 << 10), vec![16 << 10, 64 << 10, 256 << 10])
        );
        let (got, sizes) = needs(usize::MAX);
        assert_eq!(got, None);
        assert_eq!(sizes.last(), Some(&(16 << 20)));
        // Not found: the call succeeds with a null result.
        let none = db_lookup(|_: *mut u8, _, _, _| 0, |_| ());
        assert_eq!(none, None);
        let err = db_lookup(|_: *mut u8, _, _, _| libc::EIO, |_| ());
        assert_eq!(err, None);
    }
}
