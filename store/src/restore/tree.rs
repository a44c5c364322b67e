//! Restore of a format 3 tree: every node kind and attribute, hard links
//! recreated, sparse files, one directory at a time (its files written in
//! parallel), memory bounded by the depth and the widest directory.
//!
//! Everything under the destination is created relative to an open
//! directory, one name at a time, with `O_NOFOLLOW`/`O_EXCL` opens and
//! `*at` calls that do not follow a final symlink: names come from the
//! snapshot (never `..` nor containing `/`, FORMAT.md), so neither a symlink
//! in the snapshot nor one planted at the destination can make restore
//! write outside it.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};

use super::{write_verified, Out, RestoreReport};
use crate::backup::Progress;
use crate::error::{Error, IoContext, Result};
use crate::format::snapshot::NodeKind;
use crate::format::v3::node::{Entry, Payload};
use crate::format::v3::List;
use crate::read::VersionReader;
use crate::repo::Repo;
use crate::source::{self, Owners};

/// How a restore treats what it writes.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Overwrite what exists at the destination.
    pub force: bool,
    /// Owners by stored uid/gid, not by user and group name.
    pub numeric_ids: bool,
    /// A regular file already at the destination (with no other name) is
    /// brought to the stored version in place, writing only the blocks
    /// that differ (rsync's `--inplace`); anything else is replaced as with
    /// `force`. An interrupted or failed update leaves that file partly
    /// updated.
    pub delta: bool,
}

/// Batches queued for the writers at most: the open directories they
/// hold and the memory they take stay bounded whatever the tree's size.
const QUEUED: usize = 8;
/// A batch: files next to each other in the snapshot, mostly in the same
/// compressed frames, are written by one writer, which decompresses each
/// frame once.
const BATCH_FILES: usize = 32;
const BATCH_BYTES: u64 = 8 << 20;

/// Restores `entries` (a snapshot's root list, or one directory entry)
/// into the directory `dest`; `top`, the directory whose entries these are
/// when `dest` stands for it, gives `dest` its attributes.
///
/// The tree is walked on this thread (directories, symlinks and special
/// nodes made as met) while writer threads write and verify the files
/// across directories. Hard links are made once every file is written
/// (a link's first name may be in a directory still being written), then
/// every directory gets its attributes (its mtime last moved by them).
#[allow(clippy::too_many_arguments)]
pub(super) fn restore_entries(
    repo: &Repo,
    snap: crate::id::SnapshotId,
    base: &[u8],
    entries: Vec<Entry>,
    top: Option<&Entry>,
    dest: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    std::fs::create_dir_all(dest).at(dest)?;
    // The user's own path to the destination may go through symlinks;
    // nothing below it does.
    let fd = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|err| Error::io(dest, err.into()))?;
    let label = snap.to_string();
    let sh = Shared::new(repo, (&label, snap), opts, progress);
    // The packs (and meta packs) read stay open until the restore ends:
    // the next file is most likely in one of them.
    let _held = repo.cache().hold();
    let base: Vec<Vec<u8>> = base
        .split(|&c| c == b'/')
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<FileJob>>(QUEUED);
    let rx = Mutex::new(rx);
    let dest_fd = Arc::new(fd);
    let walked = std::thread::scope(|s| {
        for _ in 0..rayon::current_num_threads().max(1) {
            s.spawn(|| sh.writer(&rx));
        }
        let mut r = Restorer {
            sh: &sh,
            base,
            links: HashMap::new(),
            later: Vec::new(),
            dirs: Vec::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            tx,
        };
        let walked = r
            .entries(&dest_fd, dest, &[], entries)
            .and_then(|()| r.send());
        // The writers stop when the queue is closed and empty.
        let Restorer { later, dirs, .. } = r;
        walked.map(|()| (later, dirs))
    });
    if let Some(err) = sh.error.lock().ok().and_then(|mut e| e.take()) {
        return Err(err);
    }
    let (later, dirs) = walked?;
    for (rel, e, path, first) in later {
        let dir = sh.reopen(&dest_fd, &rel, &path)?;
        sh.clear(dir.as_fd(), &e.name, &path, false)?;
        sh.link(&dest_fd, dir.as_fd(), &first, &e, &path)?;
    }
    for (rel, e, path) in dirs {
        let mut sub = rel.clone();
        sub.push(e.name.clone());
        let parent = sh.reopen(&dest_fd, &rel, &path)?;
        let dir = sh.reopen(&dest_fd, &sub, &path)?;
        sh.attrs(Some(dir.as_fd()), parent.as_fd(), &e, &path)?;
    }
    if let Some(top) = top {
        sh.attrs(Some(dest_fd.as_fd()), dest_fd.as_fd(), top, dest)?;
    }
    let report = sh.report.into_inner().unwrap_or_default();
    Ok(report)
}

/// Reads a directory entry's list whole (one directory's worth).
pub(super) fn children(repo: &Repo, list: &List<Entry>) -> Result<Vec<Entry>> {
    crate::tree3::read_list(repo, list)
}

fn rustix_is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A file for the writers: the directory it goes in, its entry, its path
/// on the destination and in the snapshot, and whether it is updated in
/// place (`--delta`).
struct FileJob {
    dir: Arc<OwnedFd>,
    e: Entry,
    path: PathBuf,
    at: Vec<u8>,
    update: bool,
}

/// What the walk and the writers share.
struct Shared<'a> {
    repo: &'a Repo,
    snap: &'a str,
    id: crate::id::SnapshotId,
    opts: &'a RestoreOptions,
    progress: &'a dyn Progress,
    root: bool,
    owners: Mutex<Owners>,
    report: Mutex<RestoreReport>,
    /// The first error of a writer: the walk and the other writers stop.
    error: Mutex<Option<Error>>,
    failed: std::sync::atomic::AtomicBool,
}

/// A path under the destination, name by name.
type Names = Vec<Vec<u8>>;

/// The walk's side.
struct Restorer<'s, 'a> {
    sh: &'s Shared<'a>,
    /// The snapshot path of the directory restored into the destination.
    base: Vec<Vec<u8>>,
    /// Link group → the first file's path, as names under the destination.
    links: HashMap<u64, Vec<Vec<u8>>>,
    /// Hard links to make once the files are written: the directory (names
    /// under the destination), the entry, its path, its first name.
    later: Vec<(Names, Entry, PathBuf, Names)>,
    /// Directories whose attributes are set last: the parent (names under
    /// the destination), the entry, its path.
    dirs: Vec<(Names, Entry, PathBuf)>,
    /// Files not yet sent to the writers, and their size.
    batch: Vec<FileJob>,
    batch_bytes: u64,
    tx: std::sync::mpsc::SyncSender<Vec<FileJob>>,
}

impl<'a> Shared<'a> {
    fn new(
        repo: &'a Repo,
        (snap, id): (&'a str, crate::id::SnapshotId),
        opts: &'a RestoreOptions,
        progress: &'a dyn Progress,
    ) -> Self {
        Shared {
            repo,
            snap,
            id,
            opts,
            progress,
            root: rustix_is_root(),
            owners: Mutex::new(Owners::default()),
            report: Mutex::new(RestoreReport::default()),
            error: Mutex::new(None),
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A writer thread: files from the queue until it closes; after an
    /// error, only drains it.
    fn writer(&self, rx: &Mutex<std::sync::mpsc::Receiver<Vec<FileJob>>>) {
        loop {
            let jobs = match rx.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok(jobs) = jobs else { return };
            for job in jobs {
                if self.failed.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if let Err(err) = self.file(job) {
                    self.failed
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut e) = self.error.lock() {
                        e.get_or_insert(err);
                    }
                }
            }
        }
    }

    /// Writes, verifies and gives its attributes to one file.
    fn file(&self, j: FileJob) -> Result<()> {
        let reader = open_entry(self.repo, (self.snap, self.id, &j.at), &j.e, &j.path);
        let w = write_file(
            self.repo,
            reader,
            j.dir.as_fd(),
            &j.e.name,
            &j.path,
            j.update,
            self.progress,
        )?;
        self.attrs(Some(w.fd.as_fd()), j.dir.as_fd(), &j.e, &j.path)?;
        if let Ok(mut r) = self.report.lock() {
            r.bytes_written += w.written;
            r.bytes += w.size;
            r.file(j.path, w.size);
        }
        Ok(())
    }

    fn warn(&self, w: String) {
        if let Ok(mut r) = self.report.lock() {
            r.warnings.push(w);
        }
    }

    /// The directory `rel` (names under the destination `dest`), opened
    /// name by name without following a symlink (restore made them all).
    fn reopen(&self, dest: &OwnedFd, rel: &[Vec<u8>], path: &Path) -> Result<OwnedFd> {
        let mut cur = dest.try_clone().at(path)?;
        for p in rel {
            cur = source::open_dir(Some(cur.as_fd()), p).at(path)?;
        }
        Ok(cur)
    }
}

impl Restorer<'_, '_> {
    /// Sends the batch to the writers.
    fn send(&mut self) -> Result<()> {
        self.batch_bytes = 0;
        if self.batch.is_empty() {
            return Ok(());
        }
        self.tx
            .send(std::mem::take(&mut self.batch))
            .map_err(|_| Error::Internal("the restore's writers stopped".into()))
    }

    /// Creates the nodes of one directory under `dir` (at `path`, the
    /// names `rel` under the destination); its files go to the writers.
    fn entries(
        &mut self,
        dir: &Arc<OwnedFd>,
        path: &Path,
        rel: &[Vec<u8>],
        entries: Vec<Entry>,
    ) -> Result<()> {
        for e in entries {
            self.entry(dir, path, rel, e)?;
        }
        Ok(())
    }

    /// As [`Restorer::entries`] for a directory's list, read a page at a
    /// time: a directory's entries (and the inline lists they hold) are
    /// never all decoded at once.
    fn list(
        &mut self,
        dir: &Arc<OwnedFd>,
        path: &Path,
        rel: &[Vec<u8>],
        list: &List<Entry>,
    ) -> Result<()> {
        let reader = crate::meta::ListReader::new(self.sh.repo.cache());
        reader.for_each(list, &mut |e| self.entry(dir, path, rel, e))
    }

    /// One entry of the directory `dir`.
    fn entry(&mut self, dir: &Arc<OwnedFd>, path: &Path, rel: &[Vec<u8>], e: Entry) -> Result<()> {
        let sh = self.sh;
        let fd = dir.as_fd();
        {
            if sh.failed.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(());
            }
            let child =
                path.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&e.name));
            match &e.payload {
                Payload::File(_) if !e.error.is_empty() => sh.warn(format!(
                    "{}: not restored: it could not be read when backed up ({})",
                    child.display(),
                    e.error
                )),
                Payload::File(_) if e.link_group != 0 && self.links.contains_key(&e.link_group) => {
                    let first = self.links[&e.link_group].clone();
                    self.later.push((rel.to_vec(), e, child, first));
                }
                Payload::File(_) => {
                    if e.link_group != 0 {
                        let mut p = rel.to_vec();
                        p.push(e.name.clone());
                        self.links.insert(e.link_group, p);
                    }
                    let update = sh.updatable(fd, &e.name);
                    if !update {
                        sh.clear(fd, &e.name, &child, false)?;
                    }
                    let mut at = self.base.clone();
                    at.extend(rel.iter().cloned());
                    at.push(e.name.clone());
                    if let Payload::File(d) = &e.payload {
                        self.batch_bytes += d.size;
                    }
                    self.batch.push(FileJob {
                        dir: dir.clone(),
                        e,
                        path: child,
                        at: at.join(&b'/'),
                        update,
                    });
                    if self.batch.len() >= BATCH_FILES || self.batch_bytes >= BATCH_BYTES {
                        self.send()?;
                    }
                }
                Payload::Dir(list) => {
                    let made = match rustix::fs::mkdirat(
                        fd,
                        e.name.as_slice(),
                        Mode::from_raw_mode(0o700),
                    ) {
                        Err(rustix::io::Errno::EXIST) if sh.opts.force => {
                            sh.clear(fd, &e.name, &child, true)
                        }
                        r => r.map_err(|err| Error::io(&child, err.into())),
                    };
                    made?;
                    // What --force cleared (a planted symlink) is made a
                    // directory.
                    match rustix::fs::mkdirat(fd, e.name.as_slice(), Mode::from_raw_mode(0o700)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(err) => return Err(Error::io(&child, err.into())),
                    }
                    let sub = Arc::new(source::open_dir(Some(fd), &e.name).at(&child)?);
                    let list = list.clone();
                    let mut rel2 = rel.to_vec();
                    rel2.push(e.name.clone());
                    self.list(&sub, &child, &rel2, &list)?;
                    // Kept for its attributes only, not its list.
                    let mut e = e;
                    e.payload = Payload::Dir(List::default());
                    self.dirs.push((rel.to_vec(), e, child));
                }
                Payload::Symlink(target) => {
                    sh.clear(fd, &e.name, &child, false)?;
                    rustix::fs::symlinkat(target.as_slice(), fd, e.name.as_slice())
                        .map_err(|err| Error::io(&child, err.into()))?;
                    sh.attrs(None, fd, &e, &child)?;
                }
                Payload::CharDevice(rdev) | Payload::BlockDevice(rdev) => {
                    sh.special(fd, &e, &child, *rdev)?
                }
                Payload::Fifo | Payload::Socket => sh.special(fd, &e, &child, 0)?,
            }
        }
        Ok(())
    }
}

impl Shared<'_> {
    /// Makes room for `name` under `--force` (a directory that stays a
    /// directory is kept; anything else is removed); without it, refuses.
    fn clear(&self, dir: BorrowedFd<'_>, name: &[u8], path: &Path, keep_dir: bool) -> Result<()> {
        let st = match source::stat_at(dir, name) {
            Ok(st) => st,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(path, e)),
        };
        if !self.opts.force {
            return Err(Error::InvalidInput(format!(
                "{} exists; pass --force to overwrite it",
                path.display()
            )));
        }
        if st.is_dir() {
            if keep_dir {
                return Ok(());
            }
            remove_tree(dir, name, path)?;
            return Ok(());
        }
        rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(|e| Error::io(path, e.into()))
    }

    /// Under `--delta`, whether the node `name` in `dir` is a regular file
    /// with no other name, to be brought to the version in place.
    fn updatable(&self, dir: BorrowedFd<'_>, name: &[u8]) -> bool {
        self.opts.delta && source::stat_at(dir, name).is_ok_and(|st| st.is_file() && st.nlink == 1)
    }

    /// A hard link (in `dir`) to the group's first file, whose names
    /// under `dest` are `first`.
    fn link(
        &self,
        dest: &OwnedFd,
        dir: BorrowedFd<'_>,
        first: &[Vec<u8>],
        e: &Entry,
        path: &Path,
    ) -> Result<()> {
        let (name, parents) = first
            .split_last()
            .ok_or_else(|| Error::Internal("an empty link path".into()))?;
        let from = self.reopen(dest, parents, path)?;
        rustix::fs::linkat(
            from.as_fd(),
            name.as_slice(),
            dir,
            e.name.as_slice(),
            AtFlags::empty(),
        )
        .map_err(|err| Error::io(path, err.into()))?;
        if let (Payload::File(d), Ok(mut r)) = (&e.payload, self.report.lock()) {
            r.file(path.to_path_buf(), d.size);
        }
        Ok(())
    }

    /// Devices, fifos and sockets (a socket as a node, not a live one).
    fn special(&self, dir: BorrowedFd<'_>, e: &Entry, path: &Path, rdev: u64) -> Result<()> {
        self.clear(dir, &e.name, path, false)?;
        let kind = FileType::from_raw_mode(e.mode);
        match rustix::fs::mknodat(
            dir,
            e.name.as_slice(),
            kind,
            Mode::from_raw_mode(0o600),
            rdev,
        ) {
            Ok(()) => self.attrs(None, dir, e, path),
            Err(err) => {
                self.warn(format!(
                    "{}: not created: {}",
                    path.display(),
                    std::io::Error::from(err)
                ));
                Ok(())
            }
        }
    }

    /// Owner, mode, extended attributes and times, in that order (a chown
    /// clears setuid bits; setting anything else moves no mtime).
    fn attrs(
        &self,
        fd: Option<BorrowedFd<'_>>,
        dir: BorrowedFd<'_>,
        e: &Entry,
        path: &Path,
    ) -> Result<()> {
        let is_link = matches!(e.payload, Payload::Symlink(_));
        if self.root {
            let (uid, gid) = match (self.opts.numeric_ids, self.owners.lock()) {
                (false, Ok(mut o)) => (
                    o.uid(&e.user).unwrap_or(e.uid),
                    o.gid(&e.group).unwrap_or(e.gid),
                ),
                _ => (e.uid, e.gid),
            };
            let (u, g) = (
                rustix::fs::Uid::from_raw(uid),
                rustix::fs::Gid::from_raw(gid),
            );
            let r = match fd {
                Some(fd) => rustix::fs::fchown(fd, Some(u), Some(g)),
                None => rustix::fs::chownat(
                    dir,
                    e.name.as_slice(),
                    Some(u),
                    Some(g),
                    AtFlags::SYMLINK_NOFOLLOW,
                ),
            };
            r.map_err(|err| Error::io(path, err.into()))?;
        }
        if !is_link {
            let mode = Mode::from_raw_mode(e.mode & 0o7777);
            let r = match fd {
                Some(fd) => rustix::fs::fchmod(fd, mode),
                None => rustix::fs::chmodat(dir, e.name.as_slice(), mode, AtFlags::empty()),
            };
            r.map_err(|err| Error::io(path, err.into()))?;
        }
        if !e.xattrs.is_empty() {
            let r = match fd {
                Some(fd) => source::set_xattrs(Some(fd), path, &e.xattrs),
                None => {
                    // Through the directory's descriptor, never following
                    // the node itself.
                    let p = PathBuf::from(format!(
                        "/proc/self/fd/{}",
                        std::os::fd::AsRawFd::as_raw_fd(&dir)
                    ))
                    .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&e.name));
                    source::set_xattrs(None, &p, &e.xattrs)
                }
            };
            if let Err(err) = r {
                self.warn(format!(
                    "{}: extended attributes not set: {err}",
                    path.display()
                ));
            }
        }
        let t = Timespec {
            tv_sec: e.mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: e.mtime_ns.rem_euclid(1_000_000_000) as _,
        };
        let times = Timestamps {
            last_access: t,
            last_modification: t,
        };
        let r = match fd {
            Some(fd) => rustix::fs::futimens(fd, &times),
            None => {
                rustix::fs::utimensat(dir, e.name.as_slice(), &times, AtFlags::SYMLINK_NOFOLLOW)
            }
        };
        r.map_err(|err| Error::io(path, err.into()))
    }
}

/// Opens the version `e` names, following the snapshot's record when a
/// prune repacked what the entry names (FORMAT.md, "Readers during
/// prune"): the entry is then read again at its path `at`.
pub(super) fn open_entry(
    repo: &Repo,
    (snap, id, at): (&str, crate::id::SnapshotId, &[u8]),
    e: &Entry,
    path: &Path,
) -> Result<VersionReader> {
    let version = |e: &Entry| match crate::tree3::node_of(e, 0).map(|n| n.kind) {
        Some(NodeKind::File(f)) => Ok(f),
        _ => Err(Error::Internal("not a file".into())),
    };
    let what = format!("snapshot {snap} file {}", path.display());
    let mut cur = version(e)?;
    let mut followed = 0;
    loop {
        match VersionReader::open(repo, &cur, &what) {
            Err(err) if err.is_not_found() && followed < 8 => {
                followed += 1;
                let root = crate::browse::root(repo, id)?;
                match crate::tree3::resolve(repo, &root, at)? {
                    Some(e2) if version(&e2)? != cur => cur = version(&e2)?,
                    _ => return Err(err),
                }
            }
            r => return r,
        }
    }
}

/// A file [`write_file`] wrote.
struct Written {
    fd: OwnedFd,
    size: u64,
    /// Bytes written (under `--delta`, only what differed).
    written: u64,
}

/// Creates the file `name` in `dir` (it must not exist: `O_EXCL`, never
/// through a symlink) and writes `reader`'s verified bytes; a version that
/// fails verification leaves no file. With `update`, opens the existing
/// file instead (never through a symlink) and writes only the blocks that
/// differ: a failure then leaves it partly updated.
fn write_file(
    repo: &Repo,
    reader: Result<VersionReader>,
    dir: BorrowedFd<'_>,
    name: &[u8],
    path: &Path,
    update: bool,
    progress: &dyn Progress,
) -> Result<Written> {
    let reader = reader?;
    let flags = match update {
        true => OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        false => {
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC
        }
    };
    let fd = rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o600))
        .map_err(|err| Error::io(path, err.into()))?;
    let file = File::from(fd);
    if update && !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(Error::InvalidInput(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let f = reader.file().clone();
    progress.start(&path.display().to_string(), f.size);
    let out = match update {
        true => Out::Delta(&file, path),
        false => Out::New(&file, path),
    };
    let r = write_verified(
        &reader,
        &f,
        reader.what(),
        out,
        repo.config().block_size,
        progress,
    );
    match r {
        Ok(written) => Ok(Written {
            fd: OwnedFd::from(file),
            size: f.size,
            written,
        }),
        Err(err) => {
            drop(file);
            if !update {
                let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
            }
            Err(err)
        }
    }
}

/// Restores one file to `target`: written under `NAME.dsync-partial` in
/// the target's directory (created `O_EXCL`, no-follow), given its owner,
/// mode, extended attributes and times, then renamed over `target` (which
/// replaces a symlink there, never writes through it). `open` opens the
/// version (it may follow a pruned record).
pub(super) fn restore_one(
    repo: &Repo,
    snap: crate::id::SnapshotId,
    e: &Entry,
    open: &dyn Fn(&Path) -> Result<VersionReader>,
    target: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    use std::os::unix::ffi::OsStrExt;
    let name = target
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("{}: not a file name", target.display())))?
        .as_bytes()
        .to_vec();
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // The user's own path to the directory may go through symlinks;
    // nothing below it does.
    let dir = rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|err| Error::io(parent, err.into()))?;
    match source::stat_at(dir.as_fd(), &name) {
        Ok(st) if st.is_dir() => {
            return Err(Error::InvalidInput(format!(
                "{} is a directory",
                target.display()
            )))
        }
        Ok(_) if !opts.force && !opts.delta => {
            return Err(Error::InvalidInput(format!(
                "{} exists; pass --force to overwrite it (or --delta to update it)",
                target.display()
            )))
        }
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(Error::io(target, err)),
    }
    let label = snap.to_string();
    let r = Shared::new(repo, (&label, snap), opts, progress);
    let mut report = RestoreReport::default();
    if r.updatable(dir.as_fd(), &name) {
        let w = write_file(
            repo,
            open(target),
            dir.as_fd(),
            &name,
            target,
            true,
            progress,
        )?;
        r.attrs(Some(w.fd.as_fd()), dir.as_fd(), e, target)?;
        report.bytes_written += w.written;
        report.bytes += w.size;
        report.file(target.to_path_buf(), w.size);
        report.warnings = r.report.into_inner().unwrap_or_default().warnings;
        return Ok(report);
    }
    let mut tmp = name.clone();
    tmp.extend_from_slice(b".dsync-partial");
    let tmp_path = parent.join(std::ffi::OsStr::from_bytes(&tmp));
    // A partial file left by an interrupted restore (unlinkat removes a
    // symlink itself, not what it points to).
    match rustix::fs::unlinkat(dir.as_fd(), tmp.as_slice(), AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(err) => return Err(Error::io(&tmp_path, err.into())),
    }
    let w = write_file(
        repo,
        open(target),
        dir.as_fd(),
        &tmp,
        target,
        false,
        progress,
    )?;
    let done = r
        .attrs(Some(w.fd.as_fd()), dir.as_fd(), e, target)
        .and_then(|()| {
            rustix::fs::renameat(dir.as_fd(), tmp.as_slice(), dir.as_fd(), name.as_slice())
                .map_err(|err| Error::io(target, err.into()))
        });
    if let Err(err) = done {
        let _ = rustix::fs::unlinkat(dir.as_fd(), tmp.as_slice(), AtFlags::empty());
        return Err(err);
    }
    report.bytes_written += w.written;
    report.bytes += w.size;
    report.file(target.to_path_buf(), w.size);
    report.warnings = r.report.into_inner().unwrap_or_default().warnings;
    Ok(report)
}

/// Removes the directory `name` in `dir` and everything under it, never
/// following a symlink.
fn remove_tree(dir: BorrowedFd<'_>, name: &[u8], path: &Path) -> Result<()> {
    let fd = source::open_dir(Some(dir), name).at(path)?;
    for (n, _) in source::read_names(fd.as_fd()).at(path)? {
        let child = path.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&n));
        match source::stat_at(fd.as_fd(), &n) {
            Ok(st) if st.is_dir() => remove_tree(fd.as_fd(), &n, &child)?,
            _ => rustix::fs::unlinkat(fd.as_fd(), n.as_slice(), AtFlags::empty())
                .map_err(|e| Error::io(&child, e.into()))?,
        }
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(|e| Error::io(path, e.into()))
}
