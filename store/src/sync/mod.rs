//! `dsync sync SRC... DST`: rsync's job for local trees.
//!
//! Meaning as in rsync (its manual is the reference): `SRC/` syncs SRC's
//! contents into DST, `SRC` syncs SRC itself as DST/SRC's-name; a single
//! file SRC with a DST that is not a directory is copied to that name. The
//! quick check (size and mtime; `--checksum`, `--size-only`) decides which
//! files are transferred; `--itemize-changes` says what was done in rsync's
//! 11-character format; exit codes are rsync's where the meaning matches.
//!
//! How it differs:
//! - A changed file is rebuilt from its old version and SRC ([`file`]):
//!   blocks compared in place, else the rsync search; both kinds of range
//!   copied in the kernel. The new file is written beside the old one and
//!   renamed over it: a reader or a crash sees the old file or the new one.
//! - Files are transferred on several threads while the walk goes on.
//! - Every DST operation is relative to an open directory, never through a
//!   symlink: a symlink in DST is replaced, never followed.
//! - Deletions (`--delete`) are made after everything was transferred, and
//!   only if SRC was read without any error; an empty SRC never empties a
//!   non-empty DST unless `--force-delete` says so.

mod file;
pub mod filter;
mod inplace;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};

pub use filter::Filters;

use crate::error::{Error, Result};
use crate::source::{self, Stat, XattrSource};

/// What `dsync sync` is asked to keep and how (rsync's flags).
#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    /// `-r`: into directories.
    pub recursive: bool,
    /// `-l`: symlinks as symlinks (else skipped).
    pub links: bool,
    /// `-p`: permissions.
    pub perms: bool,
    /// `-t`: modification times.
    pub times: bool,
    /// `-g`: groups.
    pub group: bool,
    /// `-o`: owners (as root).
    pub owner: bool,
    /// `--devices`: character and block devices (as root).
    pub devices: bool,
    /// `--specials`: fifos and sockets.
    pub specials: bool,
    /// `-H`: hard links as hard links.
    pub hard_links: bool,
    /// `-A`: POSIX ACLs (the `system.posix_acl_*` attributes).
    pub acls: bool,
    /// `-X`: other extended attributes.
    pub xattrs: bool,
    /// `-S`: holes of new files kept as holes.
    pub sparse: bool,
    /// `--numeric-ids` (locally, names and ids are the same).
    pub numeric_ids: bool,
    /// `--delete`: remove what DST has and SRC has not.
    pub delete: bool,
    /// `--delete-excluded`: excluded names in DST are removed too.
    pub delete_excluded: bool,
    /// `--max-delete N`: at most N deletions.
    pub max_delete: Option<u64>,
    /// `--force-delete`: delete even when a SRC directory is empty.
    pub force_delete: bool,
    /// `-c`: compare contents, not size and time.
    pub checksum: bool,
    /// `--size-only`.
    pub size_only: bool,
    /// `-u`: skip files newer in DST.
    pub update: bool,
    /// `--ignore-existing`.
    pub ignore_existing: bool,
    /// `--modify-window`: times this many seconds apart are equal; as in
    /// rsync, 0 compares whole seconds and a negative value nanoseconds.
    pub modify_window: i64,
    pub filters: Filters,
    /// `-n`: change nothing, say what would be done.
    pub dry_run: bool,
    /// `-W`: copy changed files whole (no plan against the old file).
    pub whole_file: bool,
    /// `--inplace`: write only the changed ranges into DST's file itself,
    /// journaled (see [`inplace`]).
    pub inplace: bool,
    /// Files transferred at once (0: a default for the machine).
    pub threads: usize,
}

/// One line of `--itemize-changes`.
pub struct Item<'a> {
    /// rsync's 11 characters (`>f.st......`, `cd+++++++++`, `*deleting  `).
    pub code: &'a str,
    /// The path from the transfer's root (a directory's ends with `/`).
    pub path: &'a [u8],
    /// A symlink's target (` -> `) or a hard link's first name (` => `).
    pub link: Option<(&'static str, &'a [u8])>,
    /// A regular file's size.
    pub size: u64,
}

/// What a sync reports as it goes.
pub trait SyncEvents: Sync {
    /// A change made (or, with `-n`, that would be made).
    fn item(&self, _item: &Item<'_>) {}
    /// A problem with one file; the sync goes on.
    fn warn(&self, msg: &str);
    /// Bytes of regular files dealt with (for a progress bar).
    fn advance(&self, _bytes: u64) {}
    /// What rsync says besides items (`created directory DST`).
    fn message(&self, _msg: &str) {}
}

/// What a sync did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    /// Regular files in SRC.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Regular files written.
    pub transferred: u64,
    /// Bytes of them taken from SRC.
    pub literal_bytes: u64,
    /// Bytes of them taken from DST's old files.
    pub matched_bytes: u64,
    /// Bytes read to plan the transfers.
    pub read_bytes: u64,
    /// Bytes written into DST's files.
    pub written_bytes: u64,
    /// Directories, symlinks and other nodes created or replaced.
    pub created: u64,
    /// Names deleted (with --delete, or to make way).
    pub deleted: u64,
    /// Deletions not made because of `--max-delete`.
    pub delete_skipped: u64,
    /// Deletions not made because SRC had an error.
    pub delete_inhibited: bool,
    /// Files that vanished from SRC.
    pub vanished: u64,
    /// Other errors (each was reported).
    pub errors: u64,
}

impl SyncReport {
    /// rsync's exit code for this outcome: 23 partial transfer, 25
    /// `--max-delete` stopped deletions, 24 files vanished, else 0.
    pub fn exit_code(&self) -> u8 {
        if self.errors > 0 {
            23
        } else if self.delete_skipped > 0 {
            25
        } else if self.vanished > 0 {
            24
        } else {
            0
        }
    }
}

/// Syncs `srcs` into `dst`.
///
/// # Errors
/// Only what stops the whole sync: DST unusable, bad options, an empty SRC
/// that `--delete` would empty DST with. A file that cannot be transferred
/// is reported, counted in [`SyncReport::errors`], and the rest goes on.
pub fn sync(
    srcs: &[PathBuf],
    dst: &Path,
    opts: &SyncOptions,
    ev: &dyn SyncEvents,
) -> Result<SyncReport> {
    if srcs.is_empty() {
        return Err(Error::InvalidInput("no source given".into()));
    }
    let matcher = opts.filters.matcher()?;
    let dst_bytes = dst.as_os_str().as_bytes();
    let dst_is_dir = match std::fs::metadata(dst) {
        Ok(m) => m.is_dir(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(dst, e)),
    };
    let single_file = srcs.len() == 1
        && !ends_with_slash(&srcs[0])
        && std::fs::symlink_metadata(&srcs[0]).is_ok_and(|m| !m.is_dir());
    // Where the entries go: DST itself as a directory, or (one file to a
    // name that is not a directory) DST's parent.
    let (dst_dir_path, file_name): (PathBuf, Option<Vec<u8>>) =
        if !dst_is_dir && single_file && !dst_bytes.ends_with(b"/") {
            let parent = match dst.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let name = dst.file_name().ok_or_else(|| {
                Error::InvalidInput(format!("{}: not a file name", dst.display()))
            })?;
            (parent, Some(name.as_bytes().to_vec()))
        } else {
            (dst.to_path_buf(), None)
        };
    let mut created_root = false;
    if file_name.is_none() && !dst_is_dir {
        if !opts.dry_run {
            match std::fs::create_dir(dst) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(Error::InvalidInput(format!(
                        "{}: exists and is not a directory",
                        dst.display()
                    )))
                }
                Err(e) => return Err(Error::io(dst, e)),
            }
        }
        created_root = true;
        let shown = String::from_utf8_lossy(dst_bytes);
        ev.message(&format!(
            "created directory {}",
            shown.trim_end_matches('/')
        ));
    }
    let dst_root = if opts.dry_run && created_root {
        None
    } else {
        Some(Arc::new(
            rustix::fs::open(
                &dst_dir_path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io(&dst_dir_path, e.into()))?,
        ))
    };

    let threads = if opts.threads > 0 {
        opts.threads
    } else {
        (rayon::current_num_threads() * 2).clamp(2, 8)
    };
    let shared = Shared {
        opts,
        ev,
        report: Mutex::new(SyncReport::default()),
        root: rustix::process::geteuid().is_root(),
        umask: umask(),
    };
    let (tx, rx) = sync_channel::<Job>(256);
    let rx = Mutex::new(rx);
    let mut walker = Walker {
        s: &shared,
        matcher: matcher.as_ref(),
        tx: Some(tx),
        links: HashMap::new(),
        dirs: Vec::new(),
        later_links: Vec::new(),
        deletions: Vec::new(),
        src_errors: 0,
        root: dst_root.clone(),
        changes: 0,
        prefetched: HashMap::new(),
    };
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..threads {
            let (shared, rx) = (&shared, &rx);
            scope.spawn(move || worker(shared, rx));
        }
        // The walk recurses once per directory level, and a pool thread
        // waiting for its subtrees runs other subtrees' walks on its own
        // stack: its own pool, with stacks to match.
        let r = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .stack_size(WALK_STACK)
            .thread_name(|i| format!("dsync-walk-{i}"))
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the walk's threads: {e}")))
            .and_then(|pool| {
                pool.install(|| {
                    for src in srcs {
                        walker.top(src, dst_root.as_ref(), file_name.as_deref(), created_root)?;
                    }
                    Ok(())
                })
            });
        // The workers end when the channel closes.
        walker.tx = None;
        r
    })?;
    walker.finish();
    let report = shared
        .report
        .into_inner()
        .map_err(|_| Error::Internal("a sync thread panicked".into()))?;
    Ok(report)
}

fn ends_with_slash(p: &Path) -> bool {
    let b = p.as_os_str().as_bytes();
    b.ends_with(b"/") || b.ends_with(b"/.") || b == b"."
}

fn umask() -> u32 {
    // Read without changing it for good: set, then put back.
    let m = rustix::process::umask(Mode::from_raw_mode(0o022));
    rustix::process::umask(m);
    m.bits()
}

fn os(b: &[u8]) -> &std::ffi::OsStr {
    std::ffi::OsStr::from_bytes(b)
}

fn show(rel: &[u8]) -> String {
    if rel.is_empty() {
        ".".into()
    } else {
        String::from_utf8_lossy(rel).into_owned()
    }
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(rel.len() + 1 + name.len());
    if !rel.is_empty() {
        p.extend_from_slice(rel);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// What every thread of a sync shares.
struct Shared<'a> {
    opts: &'a SyncOptions,
    ev: &'a dyn SyncEvents,
    report: Mutex<SyncReport>,
    root: bool,
    umask: u32,
}

impl Shared<'_> {
    fn count(&self, f: impl FnOnce(&mut SyncReport)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }

    fn error(&self, msg: String) {
        self.ev.warn(&msg);
        self.count(|r| r.errors += 1);
    }

    fn item(&self, code: &str, path: &[u8], link: Option<(&'static str, &[u8])>, size: u64) {
        self.ev.item(&Item {
            code,
            path,
            link,
            size,
        });
    }

    /// Owner, mode, extended attributes and times of a node written or
    /// kept, as the flags ask (a chown clears setuid bits, so it goes
    /// first; times last).
    fn attrs(
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
    fn keeps_xattr(&self, name: &[u8]) -> bool {
        if name.starts_with(b"system.posix_acl_") {
            self.opts.acls
        } else {
            self.opts.xattrs
        }
    }

    /// The attributes kept of a node (none asked: `None`).
    fn xattrs_of(&self, src: XattrSource<'_>) -> io::Result<Option<Xattrs>> {
        if !self.opts.xattrs && !self.opts.acls {
            return Ok(None);
        }
        let mut x = source::xattrs(src)?;
        x.retain(|(n, _)| self.keeps_xattr(n));
        Ok(Some(x))
    }
}

type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// A node of DST: an open file, or a name in an open directory.
#[derive(Clone, Copy)]
enum Target<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a [u8]),
}

/// Through `/proc/self/fd`, so that no path is resolved through DST.
fn proc_path(at: Target<'_>) -> PathBuf {
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
fn set_xattrs(at: Target<'_>, want: &Xattrs) -> io::Result<()> {
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

/// A regular file to transfer.
struct Job {
    sdir: Arc<OwnedFd>,
    sname: Vec<u8>,
    ddir: Arc<OwnedFd>,
    dname: Vec<u8>,
    rel: Vec<u8>,
    st: Stat,
    /// DST's old file at that name, when it is a regular file.
    old: Option<Stat>,
}

fn worker(s: &Shared<'_>, rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        match transfer(s, &job) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && is_src_gone(&job) => {
                s.ev.warn(&format!("file has vanished: {}", show(&job.rel)));
                s.count(|r| r.vanished += 1);
            }
            Err(e) => s.error(format!("{}: not transferred: {e}", show(&job.rel))),
        }
        s.ev.advance(job.st.size);
    }
}

fn is_src_gone(job: &Job) -> bool {
    matches!(source::stat_at(job.sdir.as_fd(), &job.sname), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

/// A temporary name beside `name` in its directory (rsync's `.NAME.XXXXXX`).
fn temp_name(name: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(name.len() + 16);
    t.push(b'.');
    t.extend_from_slice(&name[..name.len().min(200)]);
    t.extend_from_slice(format!(".{:06x}", crate::id::random_u64() & 0xff_ffff).as_bytes());
    t
}

/// Stack of each walk thread (address space; only what is used is memory).
const WALK_STACK: usize = 256 << 20;

/// Smaller files are copied whole: reading the old one to compare costs
/// more than copying them (rsync copies local files whole too).
const DELTA_MIN: u64 = 1 << 20;

/// Files this big are written to a partial file that a later sync resumes
/// from its last checkpoint (rsync's `--partial` starts over, re-reading
/// everything).
const RESUME_MIN: u64 = 64 << 20;
/// A checkpoint (an fdatasync) is taken after each 16th of a big file,
/// between 16 and 256 MiB.
fn checkpoint_every(size: u64) -> u64 {
    (size / 16).clamp(16 << 20, 256 << 20)
}

/// Brings one regular file over: in place (`--inplace`), or written beside
/// the old one and renamed over it.
fn transfer(s: &Shared<'_>, j: &Job) -> io::Result<()> {
    let src = source::open_file(j.sdir.as_fd(), &j.sname)?;
    let st = source::stat_fd(src.as_fd())?;
    let xattrs = s.xattrs_of(XattrSource::Fd(src.as_fd()))?;
    let dir = j.ddir.as_fd();
    // A crash in an earlier `--inplace` run: the old file comes back first.
    if j.old.is_some() && inplace::recover(dir, &j.dname)? {
        s.ev.warn(&format!(
            "{}: rolled back an interrupted in-place update",
            show(&j.rel)
        ));
    }
    let old = match j.old {
        Some(o) if o.size > 0 && st.size >= DELTA_MIN && !s.opts.whole_file => {
            let flags = if s.opts.inplace {
                OFlags::RDWR
            } else {
                OFlags::RDONLY
            };
            match rustix::fs::openat(
                dir,
                j.dname.as_slice(),
                flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(f) => Some(File::from(f)),
                Err(rustix::io::Errno::NOENT) => None,
                Err(e) => return Err(e.into()),
            }
        }
        _ => None,
    };
    if let (true, Some(old)) = (s.opts.inplace, &old) {
        let ost = source::stat_fd(old.as_fd())?;
        if ost.is_file() {
            let (pieces, m) = file::plan(&src, st.size, old, ost.size, 0)?;
            let r = inplace::apply(
                &pieces, &src, st.size, old, ost.size, ost.ino, dir, &j.dname,
            )?;
            if let Some(written) = r {
                s.attrs(Target::Fd(old.as_fd()), &st, xattrs.as_ref(), false)?;
                s.count(|r| {
                    r.transferred += 1;
                    r.literal_bytes += m.literal;
                    r.matched_bytes += m.matched;
                    r.read_bytes += m.read;
                    r.written_bytes += written;
                });
                return Ok(());
            }
        }
    }
    let big = st.size >= RESUME_MIN;
    let (tmp, out, start) = if big {
        partial_open(dir, &j.dname, &st, old.as_ref())?
    } else {
        let tmp = temp_name(&j.dname);
        let out = rustix::fs::openat(
            dir,
            tmp.as_slice(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        (tmp, File::from(out), 0)
    };
    if start > 0 {
        s.ev.warn(&format!(
            "{}: resuming at {} of {} bytes",
            show(&j.rel),
            start,
            st.size
        ));
    }
    let r = (|| -> io::Result<()> {
        let mut last = start;
        let mut checkpoint = |at: u64| -> io::Result<()> {
            if big && at - last >= checkpoint_every(st.size) && at < st.size {
                out.sync_data()?;
                write_checkpoint(dir, &j.dname, &Checkpoint::of(&st, old.as_ref(), at)?)?;
                last = at;
            }
            Ok(())
        };
        match &old {
            Some(old) => {
                let old_size = source::stat_fd(old.as_fd())?.size;
                let (pieces, m) = file::plan(&src, st.size, old, old_size, start)?;
                file::write_plan(
                    &pieces,
                    &src,
                    old,
                    &out,
                    start,
                    s.opts.sparse,
                    &mut checkpoint,
                )?;
                out.set_len(st.size)?;
                s.count(|r| {
                    r.literal_bytes += m.literal;
                    r.matched_bytes += m.matched;
                    r.read_bytes += m.read;
                });
            }
            None => {
                file::copy_all(&src, st.size, &out, s.opts.sparse, start, &mut checkpoint)?;
                s.count(|r| {
                    r.literal_bytes += st.size - start;
                    r.read_bytes += st.size - start;
                });
            }
        }
        s.attrs(Target::Fd(out.as_fd()), &st, xattrs.as_ref(), true)?;
        rustix::fs::renameat(dir, tmp.as_slice(), dir, j.dname.as_slice())?;
        Ok(())
    })();
    match &r {
        // A big file keeps its partial file and checkpoint for next time.
        Err(_) if big => {}
        Err(_) => {
            let _ = rustix::fs::unlinkat(dir, tmp.as_slice(), AtFlags::empty());
        }
        Ok(()) if big => {
            let _ =
                rustix::fs::unlinkat(dir, checkpoint_name(&j.dname).as_slice(), AtFlags::empty());
        }
        Ok(()) => {}
    }
    r?;
    s.count(|r| {
        r.transferred += 1;
        r.written_bytes += st.size - start;
    });
    Ok(())
}

/// `.NAME.dsync-partial`: a big file being written.
fn partial_name(name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(name.len() + 16);
    p.push(b'.');
    p.extend_from_slice(&name[..name.len().min(200)]);
    p.extend_from_slice(b".dsync-partial");
    p
}

/// `.NAME.dsync-partial.ckpt`: how much of the partial file is written,
/// and for which SRC and old file.
fn checkpoint_name(name: &[u8]) -> Vec<u8> {
    let mut p = partial_name(name);
    p.extend_from_slice(b".ckpt");
    p
}

/// What a partial file holds: SRC's bytes (over the old file given) up to
/// `done`, valid only for those very files (size, mtime, inode).
#[derive(Debug, PartialEq, Eq)]
struct Checkpoint {
    src: (u64, i64, u64),
    old: (u64, i64, u64),
    done: u64,
}

const CHECKPOINT_MAGIC: &[u8; 8] = b"DSYNCP1\n";

impl Checkpoint {
    fn of(st: &Stat, old: Option<&File>, done: u64) -> io::Result<Checkpoint> {
        let old = match old {
            Some(f) => {
                let o = source::stat_fd(f.as_fd())?;
                (o.size, o.mtime_ns, o.ino)
            }
            None => (0, 0, 0),
        };
        Ok(Checkpoint {
            src: (st.size, st.mtime_ns, st.ino),
            old,
            done,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = CHECKPOINT_MAGIC.to_vec();
        for v in [
            self.src.0,
            self.src.1 as u64,
            self.src.2,
            self.old.0,
            self.old.1 as u64,
            self.old.2,
            self.done,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Checkpoint> {
        if b.len() != 8 + 7 * 8 + 8 || &b[..8] != CHECKPOINT_MAGIC {
            return None;
        }
        let (body, sum) = b.split_at(b.len() - 8);
        if xxhash_rust::xxh3::xxh3_64(body).to_le_bytes() != sum {
            return None;
        }
        let v = |i: usize| {
            u64::from_le_bytes(body[8 + 8 * i..16 + 8 * i].try_into().unwrap_or_default())
        };
        Some(Checkpoint {
            src: (v(0), v(1) as i64, v(2)),
            old: (v(3), v(4) as i64, v(5)),
            done: v(6),
        })
    }
}

/// Writes the checkpoint beside the partial file (a new one renamed over).
fn write_checkpoint(dir: BorrowedFd<'_>, name: &[u8], c: &Checkpoint) -> io::Result<()> {
    let ck = checkpoint_name(name);
    let mut tmp = ck.clone();
    tmp.extend_from_slice(b".new");
    let f = rustix::fs::openat(
        dir,
        tmp.as_slice(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let f = File::from(f);
    f.write_all_at(&c.encode(), 0)?;
    f.sync_data()?;
    rustix::fs::renameat(dir, tmp.as_slice(), dir, ck.as_slice())?;
    Ok(())
}

/// The partial file of a big file: the one a checkpoint vouches for
/// (resumed where it says), else a new one.
fn partial_open(
    dir: BorrowedFd<'_>,
    name: &[u8],
    st: &Stat,
    old: Option<&File>,
) -> io::Result<(Vec<u8>, File, u64)> {
    let pname = partial_name(name);
    let ck = checkpoint_name(name);
    let saved = rustix::fs::openat(
        dir,
        ck.as_slice(),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
    .and_then(|f| {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut File::from(f), &mut b).ok()?;
        Checkpoint::decode(&b)
    });
    if let Some(c) = saved {
        let now = Checkpoint::of(st, old, c.done)?;
        if c == now {
            if let Ok(f) = rustix::fs::openat(
                dir,
                pname.as_slice(),
                OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                let f = File::from(f);
                if source::stat_fd(f.as_fd())?.size >= c.done {
                    return Ok((pname, f, c.done));
                }
            }
        }
    }
    for n in [&pname, &ck] {
        match rustix::fs::unlinkat(dir, n.as_slice(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let f = rustix::fs::openat(
        dir,
        pname.as_slice(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    Ok((pname, File::from(f), 0))
}

/// A directory whose attributes are set once everything in it is written.
struct DirFix {
    rel: Vec<u8>,
    st: Stat,
    xattrs: Option<Xattrs>,
    new: bool,
}

/// A hard link made at the end (its first name may still be in flight).
struct LaterLink {
    first: Vec<u8>,
    rel: Vec<u8>,
}

/// Walks SRC in name order, deciding what each node needs; regular files go
/// to the workers.
struct Walker<'s, 'a> {
    s: &'s Shared<'a>,
    matcher: Option<&'s filter::Matcher>,
    tx: Option<std::sync::mpsc::SyncSender<Job>>,
    /// (dev, ino) of SRC files with several names → the first's path, and
    /// whether it was written this run.
    links: HashMap<(u64, u64), (Vec<u8>, bool)>,
    dirs: Vec<DirFix>,
    later_links: Vec<LaterLink>,
    /// Names in DST that SRC has not, deleted at the end.
    deletions: Vec<Vec<u8>>,
    src_errors: u64,
    /// DST's directory (none in a dry run that would create it).
    root: Option<Arc<OwnedFd>>,
    /// Changes made (or queued) in DST so far: a directory whose count
    /// moved while its entries were done gets its attributes set again.
    changes: u64,
    /// Subdirectories opened and listed ahead, by path.
    prefetched: HashMap<Vec<u8>, Prefetched>,
}

/// A directory's names (sorted) and each name's SRC and DST lstat.
type Listing = (Vec<(Vec<u8>, u64)>, Vec<Pair>);

/// A subdirectory listed ahead: its SRC and DST descriptors and listing.
type Prefetched = (Arc<OwnedFd>, Option<Arc<OwnedFd>>, Listing);

/// An entry of a directory being synced: name, SRC lstat, DST lstat.
type Kept = (Vec<u8>, Stat, io::Result<Option<Stat>>);

/// Subdirectories listed ahead at once.
const PREFETCH: usize = 32;

/// A directory's sorted names and their lstats on both sides.
fn list(src: &Arc<OwnedFd>, dst: Option<&Arc<OwnedFd>>) -> io::Result<Listing> {
    let mut names = source::read_names(src.as_fd())?;
    names.sort_unstable();
    let pairs = stat_pairs(src.as_fd(), dst.map(|d| d.as_fd()), &names);
    Ok((names, pairs))
}

/// The node DST has at a name.
fn dst_stat(dir: Option<&Arc<OwnedFd>>, name: &[u8]) -> io::Result<Option<Stat>> {
    let Some(dir) = dir else { return Ok(None) };
    match source::stat_at(dir.as_fd(), name) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Each name's lstat in SRC's directory and in DST's, in order; in
/// parallel but for the smallest directories (rsync's sender and receiver
/// stat their sides at once too).
type Pair = (io::Result<Stat>, io::Result<Option<Stat>>);

fn stat_pairs(
    src: BorrowedFd<'_>,
    dst: Option<BorrowedFd<'_>>,
    names: &[(Vec<u8>, u64)],
) -> Vec<Pair> {
    let one = |(n, _): &(Vec<u8>, u64)| -> Pair {
        let old = match dst {
            None => Ok(None),
            Some(d) => match source::stat_at(d, n) {
                Ok(st) => Ok(Some(st)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
        };
        (source::stat_at(src, n), old)
    };
    if names.len() < 8 {
        return names.iter().map(one).collect();
    }
    names.par_iter().with_min_len(16).map(one).collect()
}

impl<'s, 'a> Walker<'s, 'a> {
    fn send(&self, mut j: Job) -> Result<()> {
        let gone = || Error::Internal("the sync workers stopped".into());
        let tx = self.tx.as_ref().ok_or_else(gone)?;
        // On a pool thread (a subtree walked in parallel), never block: a
        // worker may be waiting for the pool (a big file's plan).
        if rayon::current_thread_index().is_none() {
            return tx.send(j).map_err(|_| gone());
        }
        loop {
            match tx.try_send(j) {
                Ok(()) => return Ok(()),
                Err(std::sync::mpsc::TrySendError::Full(back)) => {
                    j = back;
                    if !matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                        std::thread::sleep(std::time::Duration::from_micros(100));
                    }
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return Err(gone()),
            }
        }
    }

    /// A walker for a subtree walked on the pool beside its siblings.
    fn child(&self) -> Walker<'s, 'a> {
        Walker {
            s: self.s,
            matcher: self.matcher,
            tx: self.tx.clone(),
            links: HashMap::new(),
            dirs: Vec::new(),
            later_links: Vec::new(),
            deletions: Vec::new(),
            src_errors: 0,
            root: self.root.clone(),
            changes: 0,
            prefetched: HashMap::new(),
        }
    }

    /// Takes in what a subtree's walker found.
    fn merge(&mut self, c: Walker<'s, 'a>) {
        self.dirs.extend(c.dirs);
        self.later_links.extend(c.later_links);
        self.deletions.extend(c.deletions);
        self.src_errors += c.src_errors;
        self.changes += c.changes;
    }

    fn src_error(&mut self, msg: String) {
        self.src_errors += 1;
        self.s.error(msg);
    }

    fn excluded(&self, rel: &[u8], is_dir: bool) -> bool {
        self.matcher
            .as_ref()
            .is_some_and(|m| m.excluded(rel, is_dir))
    }

    /// One SRC argument.
    fn top(
        &mut self,
        src: &Path,
        dst_root: Option<&Arc<OwnedFd>>,
        file_name: Option<&[u8]>,
        created_root: bool,
    ) -> Result<()> {
        let contents = ends_with_slash(src);
        let found = if contents {
            std::fs::metadata(src)
        } else {
            std::fs::symlink_metadata(src)
        };
        if let Err(e) = found {
            self.src_error(format!("{}: {e}", src.display()));
            return Ok(());
        }
        if contents {
            let sdir = Arc::new(
                source::open_dir(None, src.as_os_str().as_bytes())
                    .or_else(|_| {
                        rustix::fs::open(
                            src,
                            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .map_err(io::Error::from)
                    })
                    .map_err(|e| Error::io(src, e))?,
            );
            let sst = source::stat_fd(sdir.as_fd()).map_err(|e| Error::io(src, e))?;
            return self.dir_contents(&sdir, dst_root, b"", sst, created_root, true, None);
        }
        // SRC itself: its name in its parent.
        let name = match src.file_name() {
            Some(n) => n.as_bytes().to_vec(),
            None => {
                return Err(Error::InvalidInput(format!(
                    "{}: not a file name (add a trailing / to sync its contents)",
                    src.display()
                )))
            }
        };
        let parent = match src.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let sdir = Arc::new(
            rustix::fs::open(
                &parent,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io(&parent, e.into()))?,
        );
        let st = match source::stat_at(sdir.as_fd(), &name) {
            Ok(st) => st,
            Err(e) => {
                self.src_error(format!("{}: {e}", src.display()));
                return Ok(());
            }
        };
        let dname = file_name.map_or_else(|| name.clone(), <[u8]>::to_vec);
        let rel = dname.clone();
        let old = dst_stat(dst_root, &dname);
        self.node(&sdir, &name, dst_root, &dname, &rel, st, old)
    }

    /// A node of SRC (`sname` in `sdir`) and what DST has for it.
    #[allow(clippy::too_many_arguments)]
    fn node(
        &mut self,
        sdir: &Arc<OwnedFd>,
        sname: &[u8],
        ddir: Option<&Arc<OwnedFd>>,
        dname: &[u8],
        rel: &[u8],
        st: Stat,
        old: io::Result<Option<Stat>>,
    ) -> Result<()> {
        let s = self.s;
        let o = s.opts;
        let old = match old {
            Ok(o) => o,
            Err(e) => {
                s.error(format!("{}: {e}", show(rel)));
                return Ok(());
            }
        };
        match st.file_type() {
            libc::S_IFDIR => {
                if !o.recursive {
                    s.ev.warn(&format!("skipping directory {}", show(rel)));
                    return Ok(());
                }
                self.dir(sdir, sname, ddir, dname, rel, st, old)
            }
            libc::S_IFREG => self.file(sdir, sname, ddir, dname, rel, st, old),
            libc::S_IFLNK if o.links => self.symlink(sdir, sname, ddir, dname, rel, st, old),
            libc::S_IFCHR | libc::S_IFBLK if o.devices && s.root => {
                self.special(sdir, sname, ddir, dname, rel, st, old)
            }
            libc::S_IFIFO | libc::S_IFSOCK if o.specials => {
                self.special(sdir, sname, ddir, dname, rel, st, old)
            }
            _ => {
                s.ev.warn(&format!("skipping non-regular file \"{}\"", show(rel)));
                Ok(())
            }
        }
    }

    /// Makes room for a new node at `dname`: anything but a directory is
    /// replaced by the rename that puts the new node there; a directory is
    /// removed (with its contents under --delete, else only when empty).
    fn make_way(&mut self, ddir: &Arc<OwnedFd>, dname: &[u8], rel: &[u8], old: &Stat) -> bool {
        if !old.is_dir() {
            return true;
        }
        let s = self.s;
        // rsync itemizes what the directory held, not the directory.
        self.deleting(ddir.as_fd(), dname, rel, true, false);
        if s.opts.dry_run {
            return true;
        }
        let mut budget = u64::MAX;
        let r = if s.opts.delete {
            remove_tree(ddir.as_fd(), dname, &mut budget)
        } else {
            rustix::fs::unlinkat(ddir.as_fd(), dname, AtFlags::REMOVEDIR)
                .map(|()| 1)
                .map_err(io::Error::from)
        };
        match r {
            Ok(n) => {
                s.count(|r| r.deleted += n);
                self.changes += 1;
                true
            }
            Err(e) => {
                s.error(format!(
                    "cannot delete directory {} to make way for a file: {e}",
                    show(rel)
                ));
                false
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn file(
        &mut self,
        sdir: &Arc<OwnedFd>,
        sname: &[u8],
        ddir: Option<&Arc<OwnedFd>>,
        dname: &[u8],
        rel: &[u8],
        st: Stat,
        old: Option<Stat>,
    ) -> Result<()> {
        let s = self.s;
        let o = s.opts;
        s.count(|r| {
            r.files += 1;
            r.bytes += st.size;
        });
        if o.hard_links && st.nlink > 1 {
            let key = (st.dev, st.ino);
            if let Some((first, written)) = self.links.get(&key).cloned() {
                let same = !written
                    && ddir.is_some_and(|d| {
                        let a = dst_stat(Some(d), dname).ok().flatten();
                        let b = self.reopen_stat(&first);
                        matches!((a, b), (Some(a), Some(b)) if a.ino == b.ino && a.dev == b.dev)
                    });
                if !same {
                    // rsync's forms: the first name shown for a new name,
                    // the differences from the old file for an existing one.
                    match old.as_ref().filter(|d| d.file_type() == libc::S_IFREG) {
                        Some(d) => {
                            let f = self.flags(&st, Some(d), false, false, true);
                            s.item(&format!("hf{f}"), rel, None, st.size);
                        }
                        None => s.item("hf+++++++++", rel, Some((" => ", &first)), st.size),
                    }
                    if let (Some(d), Some(old)) = (ddir, &old) {
                        if !self.make_way(d, dname, rel, old) {
                            return Ok(());
                        }
                    }
                    self.changes += 1;
                    self.later_links.push(LaterLink {
                        first,
                        rel: rel.to_vec(),
                    });
                }
                s.ev.advance(st.size);
                return Ok(());
            }
        }
        let transfer = match &old {
            None => true,
            Some(d) if d.file_type() != libc::S_IFREG => true,
            Some(d) => {
                if o.ignore_existing || (o.update && d.mtime_ns > st.mtime_ns) {
                    if o.hard_links && st.nlink > 1 {
                        self.links.insert((st.dev, st.ino), (rel.to_vec(), false));
                    }
                    s.ev.advance(st.size);
                    return Ok(());
                }
                !self.same_file(sdir, sname, ddir, dname, &st, d)
            }
        };
        if o.hard_links && st.nlink > 1 {
            self.links
                .insert((st.dev, st.ino), (rel.to_vec(), transfer));
        }
        let new = !matches!(&old, Some(d) if d.file_type() == libc::S_IFREG);
        if transfer {
            let code = if new {
                ">f+++++++++".to_string()
            } else {
                let d = old.as_ref().map(|d| *d);
                let x = self.xattrs_differ(sdir, sname, ddir, dname, &st);
                format!(">f{}", self.flags(&st, d.as_ref(), o.checksum, x, true))
            };
            s.item(&code, rel, None, st.size);
            if let (Some(d), Some(old)) = (ddir, &old) {
                if !self.make_way(d, dname, rel, old) {
                    return Ok(());
                }
            }
            match ddir {
                Some(d) if !o.dry_run => {
                    self.changes += 1;
                    self.send(Job {
                        sdir: sdir.clone(),
                        sname: sname.to_vec(),
                        ddir: d.clone(),
                        dname: dname.to_vec(),
                        rel: rel.to_vec(),
                        st,
                        old: old.filter(|d| d.file_type() == libc::S_IFREG),
                    })?
                }
                _ => s.ev.advance(st.size),
            }
            return Ok(());
        }
        // Same contents: attributes only.
        if let (Some(d), Some(old)) = (ddir, old) {
            self.same_attrs(sdir, sname, d, dname, rel, &st, &old, 'f')?;
        }
        s.ev.advance(st.size);
        Ok(())
    }

    /// The quick check (or `-c`'s contents check).
    fn same_file(
        &mut self,
        sdir: &Arc<OwnedFd>,
        sname: &[u8],
        ddir: Option<&Arc<OwnedFd>>,
        dname: &[u8],
        st: &Stat,
        d: &Stat,
    ) -> bool {
        let o = self.s.opts;
        if st.size != d.size {
            return false;
        }
        if o.size_only {
            return true;
        }
        if o.checksum {
            let Some(ddir) = ddir else { return false };
            let h = |dir: BorrowedFd<'_>, name: &[u8]| -> io::Result<[u8; 32]> {
                let f = source::open_file(dir, name)?;
                hash_file(&f)
            };
            return match (h(sdir.as_fd(), sname), h(ddir.as_fd(), dname)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
        }
        times_equal(st.mtime_ns, d.mtime_ns, o.modify_window)
    }

    /// rsync's `cstpoguax` columns for a node that exists in DST.
    fn flags(
        &self,
        st: &Stat,
        d: Option<&Stat>,
        content: bool,
        xattrs: bool,
        file: bool,
    ) -> String {
        let o = self.s.opts;
        let Some(d) = d else {
            return "+++++++++".into();
        };
        let c = if content { 'c' } else { '.' };
        let sz = if file && st.size != d.size { 's' } else { '.' };
        let t = if !times_equal(st.mtime_ns, d.mtime_ns, o.modify_window) {
            if o.times {
                't'
            } else {
                'T'
            }
        } else {
            '.'
        };
        let is_link = st.file_type() == libc::S_IFLNK;
        let p = if o.perms && !is_link && st.mode & 0o7777 != d.mode & 0o7777 {
            'p'
        } else {
            '.'
        };
        let own = if o.owner && self.s.root && st.uid != d.uid {
            'o'
        } else {
            '.'
        };
        let g = if o.group && st.gid != d.gid { 'g' } else { '.' };
        let x = if xattrs { 'x' } else { '.' };
        format!("{c}{sz}{t}{p}{own}{g}..{x}")
    }

    /// Whether the kept extended attributes differ.
    fn xattrs_differ(
        &self,
        sdir: &Arc<OwnedFd>,
        sname: &[u8],
        ddir: Option<&Arc<OwnedFd>>,
        dname: &[u8],
        _st: &Stat,
    ) -> bool {
        let s = self.s;
        let Some(ddir) = ddir else { return false };
        if !s.opts.xattrs && !s.opts.acls {
            return false;
        }
        let a = s.xattrs_of(XattrSource::Path(&proc_path(Target::At(
            sdir.as_fd(),
            sname,
        ))));
        let b = s.xattrs_of(XattrSource::Path(&proc_path(Target::At(
            ddir.as_fd(),
            dname,
        ))));
        match (a, b) {
            (Ok(a), Ok(b)) => a != b,
            _ => false,
        }
    }

    /// A node whose contents are the same: its attributes brought over, an
    /// item when any differed.
    #[allow(clippy::too_many_arguments)]
    fn same_attrs(
        &mut self,
        sdir: &Arc<OwnedFd>,
        sname: &[u8],
        ddir: &Arc<OwnedFd>,
        dname: &[u8],
        rel: &[u8],
        st: &Stat,
        old: &Stat,
        kind: char,
    ) -> Result<()> {
        let s = self.s;
        let o = s.opts;
        // Most files of a rerun: nothing kept differs (no allocation).
        if !o.xattrs
            && !o.acls
            && (!o.times || times_equal(st.mtime_ns, old.mtime_ns, o.modify_window))
            && (!o.perms
                || st.file_type() == libc::S_IFLNK
                || st.mode & 0o7777 == old.mode & 0o7777)
            && (!o.owner || !s.root || st.uid == old.uid)
            && (!o.group || st.gid == old.gid)
        {
            return Ok(());
        }
        let x = self.xattrs_differ(sdir, sname, Some(ddir), dname, st);
        let f = self.flags(st, Some(old), false, x, false);
        // `T`: times differ but are not kept: nothing to do.
        if f.chars().all(|c| c == '.' || c == 'T') {
            return Ok(());
        }
        let mut path = rel.to_vec();
        if kind == 'd' {
            path.push(b'/');
        }
        s.item(&format!(".{kind}{f}"), &path, None, 0);
        if s.opts.dry_run || kind == 'd' {
            return Ok(());
        }
        let xattrs = match s.xattrs_of(XattrSource::Path(&proc_path(Target::At(
            sdir.as_fd(),
            sname,
        )))) {
            Ok(x) => x,
            Err(e) => {
                s.error(format!("{}: {e}", show(rel)));
                None
            }
        };
        if let Err(e) = s.attrs(Target::At(ddir.as_fd(), dname), st, xattrs.as_ref(), false) {
            s.error(format!("{}: attributes not set: {e}", show(rel)));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn dir(
        &mut self,
        sdir: &Arc<OwnedFd>,
        sname: &[u8],
        ddir: Option<&Arc<OwnedFd>>,
        dname: &[u8],
        rel: &[u8],
        st: Stat,
        old: Option<Stat>,
    ) -> Result<()> {
        let s = self.s;
        let pre = self.prefetched.remove(rel);
        let mut new = true;
        if let (Some(d), Some(old)) = (ddir, &old) {
            if old.is_dir() {
                new = false;
            } else {
                // Not a directory in DST: it goes (a rename cannot put a
                // directory over it; rsync itemizes only the new one).
                if !s.opts.dry_run {
                    if let Err(e) = rustix::fs::unlinkat(d.as_fd(), dname, AtFlags::empty()) {
                        s.error(format!("{}: cannot delete: {e}", show(rel)));
                        return Ok(());
                    }
                    s.count(|r| r.deleted += 1);
                }
            }
        }
        // What `prefetch` opened and listed holds if DST's side is as it
        // saw it: an existing directory, or none (then made empty now).
        let (pre_src, pre_dst, listing) = match pre {
            Some((sfd, dfd, l)) if dfd.is_some() != new => (Some(sfd), dfd, Some(l)),
            _ => (None, None, None),
        };
        let child_dir = match ddir {
            Some(_) if pre_dst.is_some() => pre_dst,
            Some(d) if !s.opts.dry_run || !new => {
                if new {
                    if let Err(e) =
                        rustix::fs::mkdirat(d.as_fd(), dname, Mode::from_raw_mode(0o700))
                    {
                        s.error(format!("{}: cannot create directory: {e}", show(rel)));
                        return Ok(());
                    }
                    s.count(|r| r.created += 1);
                }
                match source::open_dir(Some(d.as_fd()), dname) {
                    Ok(fd) => Some(Arc::new(fd)),
                    Err(e) => {
                        s.error(format!("{}: cannot open directory: {e}", show(rel)));
                        return Ok(());
                    }
                }
            }
            _ => None,
        };
        let src = match pre_src.map_or_else(
            || source::open_dir(Some(sdir.as_fd()), sname).map(Arc::new),
            Ok,
        ) {
            Ok(fd) => fd,
            Err(e) => {
                self.src_error(format!("{}: cannot open directory: {e}", show(rel)));
                return Ok(());
            }
        };
        self.dir_contents(&src, child_dir.as_ref(), rel, st, new, false, listing)
    }

    /// A directory's own item and attributes, then its entries.
    #[allow(clippy::too_many_arguments)]
    fn dir_contents(
        &mut self,
        src: &Arc<OwnedFd>,
        dst: Option<&Arc<OwnedFd>>,
        rel: &[u8],
        st: Stat,
        new: bool,
        top: bool,
        listing: Option<Listing>,
    ) -> Result<()> {
        let s = self.s;
        let mut path = if rel.is_empty() {
            b".".to_vec()
        } else {
            rel.to_vec()
        };
        path.push(b'/');
        let mut differs = new;
        if new {
            s.item("cd+++++++++", &path, None, 0);
        } else if let Some(d) = dst {
            let old = source::stat_fd(d.as_fd()).ok();
            let x = match (
                s.xattrs_of(XattrSource::Fd(src.as_fd())),
                s.xattrs_of(XattrSource::Fd(d.as_fd())),
            ) {
                (Ok(a), Ok(b)) => a != b,
                _ => false,
            };
            let f = self.flags(&st, old.as_ref(), false, x, false);
            if f.chars().any(|c| c != '.' && c != 'T') {
                s.item(&format!(".d{f}"), &path, None, 0);
                differs = true;
            }
        }
        let changes = self.changes;
        self.entries(src, dst, rel, top, listing)?;
        // Its attributes once everything in it is written (what is
        // written there moves its mtime), when they differ or something
        // was written.
        if dst.is_some() && !s.opts.dry_run && (differs || self.changes > changes) {
            let xattrs = match s.xattrs_of(XattrSource::Fd(src.as_fd())) {
                Ok(x) => x,
                Err(e) => {
                    s.error(format!("{}: {e}", show(rel)));
                    None
                }
            };
            self.dirs.push(DirFix {
                rel: rel.to_vec(),
                st,
                xattrs,
                new,
            });
        }
        if new {
            // A new directory changed its parent.
            self.changes += 1;
        }
        Ok(())
    }

    /// A directory's entries, in name order (`listing`: already read).
    fn entries(
        &mut self,
        src: &Arc<OwnedFd>,
        dst: Option<&Arc<OwnedFd>>,
        rel: &[u8],
        top: bool,
        listing: Option<Listing>,
    ) -> Result<()> {
        let s = self.s;
        let listing = match listing {
            Some(l) => Ok(l),
            None => list(src, dst),
        };
        let (names, stats) = match listing {
            Ok(l) => l,
            Err(e) => {
                self.src_error(format!("{}: cannot read directory: {e}", show(rel)));
                return Ok(());
            }
        };
        let mut kept: Vec<Kept> = Vec::with_capacity(names.len());
        for ((name, _), (st, old)) in names.into_iter().zip(stats) {
            let child = join(rel, &name);
            match st {
                Ok(st) => {
                    if !self.excluded(&child, st.is_dir()) {
                        kept.push((name, st, old));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    s.ev.warn(&format!("file has vanished: {}", show(&child)));
                    s.count(|r| r.vanished += 1);
                    self.src_errors += 1;
                }
                Err(e) => self.src_error(format!("{}: {e}", show(&child))),
            }
        }
        if s.opts.delete {
            if let Some(d) = dst {
                self.extraneous(d, rel, &kept, top)?;
            }
        }
        // Subdirectories on the pool, in parallel, when their walks are
        // independent (hard links need one walk: a group's first name is
        // the first met); the rest here, in name order.
        let subdirs = kept.iter().filter(|k| k.1.is_dir()).count();
        if s.opts.recursive && !s.opts.hard_links && subdirs >= 2 {
            return self.entries_parallel(src, dst, rel, kept);
        }
        let mut fetched_to = 0;
        for i in 0..kept.len() {
            if i >= fetched_to && kept[i].1.is_dir() && s.opts.recursive {
                fetched_to = self.prefetch(src, dst, rel, &kept, i);
            }
            let (name, st, old) = &kept[i];
            let old = match old {
                Ok(o) => Ok(*o),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            let child = join(rel, name);
            self.node(src, name, dst, name, &child, *st, old)?;
        }
        Ok(())
    }

    /// A directory's entries: its other nodes here, in name order, then its
    /// subdirectories each by its own walker on the pool.
    fn entries_parallel(
        &mut self,
        src: &Arc<OwnedFd>,
        dst: Option<&Arc<OwnedFd>>,
        rel: &[u8],
        kept: Vec<Kept>,
    ) -> Result<()> {
        let (dirs, others): (Vec<Kept>, Vec<Kept>) = kept.into_iter().partition(|k| k.1.is_dir());
        for (name, st, old) in others {
            let child = join(rel, &name);
            self.node(src, &name, dst, &name, &child, st, old)?;
        }
        let walked: Vec<Result<Walker<'s, 'a>>> = dirs
            .into_par_iter()
            .map(|(name, st, old)| {
                let mut w = self.child();
                let child = join(rel, &name);
                w.node(src, &name, dst, &name, &child, st, old)?;
                Ok(w)
            })
            .collect();
        for w in walked {
            let w = w?;
            self.merge(w);
        }
        Ok(())
    }

    /// Opens and lists, in parallel, the next subdirectories of `kept`
    /// from `from` on (at most [`PREFETCH`] of them), on both sides, for
    /// [`Walker::dir`] to take: the walk itself stays in name order, but
    /// the system calls of many small directories overlap. Returns where
    /// it stopped.
    fn prefetch(
        &mut self,
        src: &Arc<OwnedFd>,
        dst: Option<&Arc<OwnedFd>>,
        rel: &[u8],
        kept: &[Kept],
        from: usize,
    ) -> usize {
        let mut todo = Vec::new();
        let mut i = from;
        while i < kept.len() && todo.len() < PREFETCH {
            if kept[i].1.is_dir() {
                todo.push(i);
            }
            i += 1;
        }
        if todo.len() < 2 {
            return i;
        }
        let got: Vec<(usize, Option<Prefetched>)> = todo
            .par_iter()
            .map(|&k| {
                let (name, _, old) = &kept[k];
                let Ok(sfd) = source::open_dir(Some(src.as_fd()), name) else {
                    // Reported when the walk gets there.
                    return (k, None);
                };
                let dfd = match (dst, old) {
                    (Some(d), Ok(Some(o))) if o.is_dir() => {
                        match source::open_dir(Some(d.as_fd()), name) {
                            Ok(fd) => Some(Arc::new(fd)),
                            Err(_) => return (k, None),
                        }
                    }
                    _ => None,
                };
                let sfd = Arc::new(sfd);
                let l = list(&sfd, dfd.as_ref()).ok();
                (k, l.map(|l| (sfd, dfd, l)))
            })
            .collect();
        for (k, p) in got {
            if let Some(p) = p {
                self.prefetched.insert(join(rel, &kept[k].0), p);
            }
        }
        i
    }

    /// Notes what DST's directory has that SRC's has not, to delete at the
    /// end; refuses when SRC's directory is empty and DST's is not (the
    /// typo that empties a backup), unless `--force-delete`.
    fn extraneous(&mut self, d: &Arc<OwnedFd>, rel: &[u8], kept: &[Kept], top: bool) -> Result<()> {
        let s = self.s;
        let names = match source::read_names(d.as_fd()) {
            Ok(n) => n,
            Err(e) => {
                s.error(format!("{}: cannot read directory: {e}", show(rel)));
                return Ok(());
            }
        };
        if top && kept.is_empty() && !names.is_empty() && !s.opts.force_delete {
            return Err(Error::InvalidInput(format!(
                "the source directory for {} is empty and the destination is not: \
                 refusing to delete everything in it (pass --force-delete to do so)",
                show(rel)
            )));
        }
        let mut extra: Vec<Vec<u8>> = names
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| {
                kept.binary_search_by(|(k, ..)| k.as_slice().cmp(n))
                    .is_err()
            })
            .collect();
        extra.sort_unstable();
        for n in extra {
            let child = join(rel, &n);
            let is_dir = source::stat_at(d.as_fd(), &n).is_ok_and(|st| st.is_dir());
            if !s.opts.delete_excluded && self.excluded(&child, is_dir) {
                continue;
            }
            self.deleting(d.as_fd(), &n, &child, is_dir, true);
            self.deletions.push(child);
            self.changes += 1;
        }
        Ok(())
    }

    /// Itemizes the deletion of `name` in `dir` (at `rel`): a directory's
    /// contents first, each directory's in reverse name order (rsync's),
    /// then itself unless `!top`.
    fn deleting(&self, dir: BorrowedFd<'_>, name: &[u8], rel: &[u8], is_dir: bool, top: bool) {
        if is_dir {
            if let Ok(fd) = source::open_dir(Some(dir), name) {
                let mut names = source::read_names(fd.as_fd()).unwrap_or_default();
                names.sort_unstable_by(|a, b| b.cmp(a));
                for (n, _) in names {
                    let d = source::stat_at(fd.as_fd(), &n).is_ok_and(|st| st.is_dir());
                    self.deleting(fd.as_fd(), &n, &join(rel, &n), d, true);
                }
            }
        }
        if top {
            let mut shown = rel.to_vec();
            if is_dir {
                shown.push(b'/');
            }
            self.s.item("*deleting  ", &shown, None, 0);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn symlink(
        &mut self,
        sdir: &Arc<OwnedFd>,
        sname: &[u8],
        ddir: Option<&Arc<OwnedFd>>,
        dname: &[u8],
        rel: &[u8],
        st: Stat,
        old: Option<Stat>,
    ) -> Result<()> {
        let s = self.s;
        let target = match source::read_link(sdir.as_fd(), sname) {
            Ok(t) => t,
            Err(e) => {
                self.src_error(format!("{}: {e}", show(rel)));
                return Ok(());
            }
        };
        let same = match (ddir, &old) {
            (Some(d), Some(o)) if o.file_type() == libc::S_IFLNK => {
                source::read_link(d.as_fd(), dname).is_ok_and(|t| t == target)
            }
            _ => false,
        };
        if same {
            if let (Some(d), Some(o)) = (ddir, &old) {
                self.same_attrs(sdir, sname, d, dname, rel, &st, o, 'L')?;
            }
            return Ok(());
        }
        let code = match &old {
            Some(o) if o.file_type() == libc::S_IFLNK => {
                format!("cL{}", self.flags(&st, Some(o), true, false, false))
            }
            _ => "cL+++++++++".into(),
        };
        s.item(&code, rel, Some((" -> ", &target)), 0);
        let Some(d) = ddir else { return Ok(()) };
        if s.opts.dry_run {
            return Ok(());
        }
        if let Some(o) = &old {
            if !self.make_way(d, dname, rel, o) {
                return Ok(());
            }
        }
        self.changes += 1;
        let tmp = temp_name(dname);
        let r = rustix::fs::symlinkat(target.as_slice(), d.as_fd(), tmp.as_slice())
            .map_err(io::Error::from)
            .and_then(|()| self.finish_node(sdir, sname, d, &tmp, dname, &st));
        if let Err(e) = r {
            let _ = rustix::fs::unlinkat(d.as_fd(), tmp.as_slice(), AtFlags::empty());
            s.error(format!("{}: not created: {e}", show(rel)));
        }
        Ok(())
    }

    /// A node made under a temporary name: its attributes, then renamed
    /// over what DST had.
    fn finish_node(
        &self,
        sdir: &Arc<OwnedFd>,
        sname: &[u8],
        d: &Arc<OwnedFd>,
        tmp: &[u8],
        dname: &[u8],
        st: &Stat,
    ) -> io::Result<()> {
        let s = self.s;
        // Symlinks too (root may give one `trusted.*` attributes).
        let xattrs = s.xattrs_of(XattrSource::Path(&proc_path(Target::At(
            sdir.as_fd(),
            sname,
        ))))?;
        s.attrs(Target::At(d.as_fd(), tmp), st, xattrs.as_ref(), true)?;
        rustix::fs::renameat(d.as_fd(), tmp, d.as_fd(), dname)?;
        s.count(|r| r.created += 1);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn special(
        &mut self,
        sdir: &Arc<OwnedFd>,
        sname: &[u8],
        ddir: Option<&Arc<OwnedFd>>,
        dname: &[u8],
        rel: &[u8],
        st: Stat,
        old: Option<Stat>,
    ) -> Result<()> {
        let s = self.s;
        let kind = if matches!(st.file_type(), libc::S_IFCHR | libc::S_IFBLK) {
            'D'
        } else {
            'S'
        };
        let same = old
            .as_ref()
            .is_some_and(|o| o.file_type() == st.file_type() && o.rdev == st.rdev);
        if same {
            if let (Some(d), Some(o)) = (ddir, &old) {
                self.same_attrs(sdir, sname, d, dname, rel, &st, o, kind)?;
            }
            return Ok(());
        }
        let code = match &old {
            Some(o) if o.file_type() == st.file_type() => {
                format!("c{kind}{}", self.flags(&st, Some(o), true, false, false))
            }
            _ => format!("c{kind}+++++++++"),
        };
        s.item(&code, rel, None, 0);
        let Some(d) = ddir else { return Ok(()) };
        if s.opts.dry_run {
            return Ok(());
        }
        if let Some(o) = &old {
            if !self.make_way(d, dname, rel, o) {
                return Ok(());
            }
        }
        self.changes += 1;
        let tmp = temp_name(dname);
        let r = rustix::fs::mknodat(
            d.as_fd(),
            tmp.as_slice(),
            FileType::from_raw_mode(st.mode),
            Mode::from_raw_mode(0o600),
            st.rdev,
        )
        .map_err(io::Error::from)
        .and_then(|()| self.finish_node(sdir, sname, d, &tmp, dname, &st));
        if let Err(e) = r {
            let _ = rustix::fs::unlinkat(d.as_fd(), tmp.as_slice(), AtFlags::empty());
            s.error(format!("{}: not created: {e}", show(rel)));
        }
        Ok(())
    }

    /// The DST node at `rel` (from DST's root), found again.
    fn reopen_stat(&self, rel: &[u8]) -> Option<Stat> {
        let (dir, name) = self.reopen_parent(rel)?;
        source::stat_at(dir.as_fd(), &name).ok()
    }

    /// DST's directory holding `rel`, opened from DST's root name by name
    /// (never through a symlink), and `rel`'s last name.
    fn reopen_parent(&self, rel: &[u8]) -> Option<(OwnedFd, Vec<u8>)> {
        let root = self.root.as_ref()?;
        let mut names: Vec<&[u8]> = rel.split(|&c| c == b'/').collect();
        let last = names.pop()?.to_vec();
        let mut dir = rustix::fs::openat(
            root.as_fd(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        for n in names {
            dir = source::open_dir(Some(dir.as_fd()), n).ok()?;
        }
        Some((dir, last))
    }

    /// After the workers: hard links, deletions, then directories'
    /// attributes, deepest first.
    fn finish(&mut self) {
        let root = self.root.clone();
        let root = root.as_ref();
        let s = self.s;
        if s.opts.dry_run {
            return;
        }
        for l in std::mem::take(&mut self.later_links) {
            let r = (|| -> io::Result<()> {
                let (fdir, fname) = self
                    .reopen_parent(&l.first)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
                let (dir, name) = self
                    .reopen_parent(&l.rel)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
                let tmp = temp_name(&name);
                rustix::fs::linkat(
                    fdir.as_fd(),
                    fname.as_slice(),
                    dir.as_fd(),
                    tmp.as_slice(),
                    AtFlags::empty(),
                )?;
                rustix::fs::renameat(dir.as_fd(), tmp.as_slice(), dir.as_fd(), name.as_slice())
                    .inspect_err(|_| {
                        let _ = rustix::fs::unlinkat(dir.as_fd(), tmp.as_slice(), AtFlags::empty());
                    })?;
                Ok(())
            })();
            if let Err(e) = r {
                s.error(format!("{}: hard link not made: {e}", show(&l.rel)));
            }
        }
        let errors = s.report.lock().map(|r| r.errors + r.vanished).unwrap_or(1);
        let deletions = std::mem::take(&mut self.deletions);
        if !deletions.is_empty() {
            if self.src_errors > 0 || errors > 0 {
                s.ev.warn("IO error encountered -- skipping file deletion");
                s.count(|r| r.delete_inhibited = true);
            } else {
                let mut budget = s.opts.max_delete.unwrap_or(u64::MAX);
                let mut skipped = 0u64;
                for rel in deletions {
                    let Some((dir, name)) = self.reopen_parent(&rel) else {
                        continue;
                    };
                    if budget == 0 {
                        skipped += 1;
                        continue;
                    }
                    match remove_tree(dir.as_fd(), &name, &mut budget) {
                        Ok(n) => s.count(|r| r.deleted += n),
                        // Gone meanwhile (a journal a transfer used up).
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) if e.raw_os_error() == Some(libc::EDQUOT) => skipped += 1,
                        Err(e) => s.error(format!("{}: cannot delete: {e}", show(&rel))),
                    }
                }
                if skipped > 0 {
                    s.ev.warn(&format!(
                        "Deletions stopped due to --max-delete limit ({skipped} skipped)"
                    ));
                    s.count(|r| r.delete_skipped = skipped);
                }
            }
        }
        // Deepest first (each was noted after its entries).
        for d in std::mem::take(&mut self.dirs) {
            let r = if d.rel.is_empty() {
                match root {
                    Some(root) => {
                        s.attrs(Target::Fd(root.as_fd()), &d.st, d.xattrs.as_ref(), d.new)
                    }
                    None => Ok(()),
                }
            } else {
                match self.reopen_parent(&d.rel) {
                    Some((dir, name)) => s.attrs(
                        Target::At(dir.as_fd(), &name),
                        &d.st,
                        d.xattrs.as_ref(),
                        d.new,
                    ),
                    None => Err(io::ErrorKind::NotFound.into()),
                }
            };
            if let Err(e) = r {
                s.error(format!("{}: attributes not set: {e}", show(&d.rel)));
            }
        }
    }
}

/// Times (in nanoseconds) equal as rsync's `--modify-window` says: within
/// `window` whole seconds, or exactly when it is negative.
fn times_equal(a: i64, b: i64, window: i64) -> bool {
    if window < 0 {
        return a == b;
    }
    let (a, b) = (a.div_euclid(1_000_000_000), b.div_euclid(1_000_000_000));
    (a - b).abs() <= window
}

/// BLAKE2b-256 of a whole file (`--checksum`).
fn hash_file(f: &File) -> io::Result<[u8; 32]> {
    use std::io::Read;
    let mut h = blake2b_simd::Params::new().hash_length(32).to_state();
    let mut buf = vec![0u8; 1 << 20];
    let mut r = f;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finalize().as_bytes());
    Ok(out)
}

/// Removes `name` in `dir` and, for a directory, everything under it, never
/// following a symlink; counts down `budget` per name removed and stops
/// with EDQUOT when it runs out. Returns the names removed.
fn remove_tree(dir: BorrowedFd<'_>, name: &[u8], budget: &mut u64) -> io::Result<u64> {
    let st = source::stat_at(dir, name)?;
    let mut n = 0;
    if st.is_dir() {
        let fd = source::open_dir(Some(dir), name)?;
        for (child, _) in source::read_names(fd.as_fd())? {
            n += remove_tree(fd.as_fd(), &child, budget)?;
        }
    }
    if *budget == 0 {
        return Err(io::Error::from_raw_os_error(libc::EDQUOT));
    }
    let flags = if st.is_dir() {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    rustix::fs::unlinkat(dir, name, flags)?;
    *budget -= 1;
    Ok(n + 1)
}
