//! Backup of a whole directory tree (format 3).
//!
//! A walker thread goes through the tree depth first, names in byte order,
//! by file descriptor and single name (`openat` with `O_NOFOLLOW`), and
//! sends the writer a stream of [`Task`]s: a directory starts, a node whose
//! entry is complete (a symlink, a device, a file unchanged since the
//! previous snapshot), a file to read, a directory ends. The writer reads,
//! diffs and compresses the files of a window of tasks on the pool (many
//! small files in flight at once, across directories), then applies the
//! tasks in order: file data into the pack, entries into their directory,
//! and at a directory's end its entry list into the meta pack. Memory is
//! the open directories' entries and the window, whatever the tree's size.
//!
//! Change detection reads nothing: a file is unchanged when its size,
//! mtime, ctime and inode equal those of the previous snapshot's entry at
//! the same path (never the device number: btrfs and ZFS snapshots get a
//! new one every time); `--ignore-ctime`, `--ignore-inode` relax it and
//! `--checksum` reads everything. A file modified less than [`RACY_NS`]
//! before it was read could change again within the same timestamp, so its
//! entry is flagged and the next backup reads it again (git's "racy" rule).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use rayon::prelude::*;

use super::{BackupOptions, FileState, FileStatus, Input, Progress, Writer};
use crate::delta::signature::FileHasher;
use crate::delta::SigView;
use crate::error::{Error, Result};
use crate::exclude::{Matcher, CACHEDIR_SIGNATURE};
use crate::format::v3::node::{
    Entry, FileData, Payload, ENTRY_CHANGED_WHILE_READ, ENTRY_HASH_SIZE_LAST, ENTRY_RACY,
};
use crate::format::v3::List;
use crate::map::FileMap;
use crate::pipeline::{data_ranges, ChunkCtx, ChunkOut, FileFeed};
use crate::repo::Repo;
use crate::source::{self, Owners, Stat, XattrSource};

/// A file whose mtime is this close to the moment it was read is read
/// again by the next backup: a change within the same timestamp tick would
/// leave its size and times as they were. Two seconds covers the coarsest
/// timestamps dsync meets (FAT's); the kernel's own tick is a few ms.
pub(crate) const RACY_NS: i64 = 2_000_000_000;

/// How often a small file that changes while it is read is read again
/// before it is stored as read and flagged.
const RETRIES: usize = 2;

/// Files in flight on the pool at once, per thread.
const WINDOW_FILES: usize = 32;
/// Bytes in flight on the pool at once.
const WINDOW_BYTES: u64 = 64 << 20;

/// Tasks queued between the walker and the writer.
const QUEUE: usize = 4096;

/// What a tree backup saw: counts for the snapshot record and the
/// warnings to show.
#[derive(Clone, Debug, Default)]
pub struct TreeStats {
    pub files: u64,
    pub dirs: u64,
    /// The sum of the files' sizes.
    pub bytes: u64,
    /// Nodes kept with an error, and files that vanished.
    pub errors: u64,
    /// Files read (not reused); bytes read.
    pub files_read: u64,
    pub bytes_read: u64,
    /// Files stored as read though they changed while read.
    pub changed: u64,
    /// One line each: what was skipped or kept incomplete, and why.
    pub warnings: Vec<String>,
}

impl TreeStats {
    pub fn add(&mut self, o: TreeStats) {
        self.files += o.files;
        self.dirs += o.dirs;
        self.bytes += o.bytes;
        self.errors += o.errors;
        self.files_read += o.files_read;
        self.bytes_read += o.bytes_read;
        self.changed += o.changed;
        self.warnings.extend(o.warnings);
    }
}

/// What the walker sends the writer, in depth-first order.
enum Task {
    /// A directory's entries follow, up to its [`Task::Leave`]; the
    /// previous snapshot's list of it, whose pages may be reused.
    Enter(Option<List<Entry>>),
    /// The directory's own entry (its list is what came since `Enter`).
    Leave(Entry),
    /// An entry that needs nothing more.
    Done(Entry),
    /// A regular file to read.
    Read(Box<ReadJob>),
    /// A hard link to a file earlier in this snapshot (same link group).
    Link(Entry, PathBuf),
    /// Something was left out or kept incomplete: a warning, counted as an
    /// error (the snapshot is incomplete).
    Skipped(String),
    /// A warning that leaves the snapshot complete.
    Note(String),
    /// The previous snapshot's files by content (sent once, when the rename
    /// index is built): a file read with one of these contents shares its
    /// stored data.
    Known(Arc<Known>),
    /// The walk failed as a whole (the writer stops with this error).
    Failed(Error),
}

/// A regular file to read, diff and store.
struct ReadJob {
    dir: Arc<OwnedFd>,
    name: Vec<u8>,
    path: PathBuf,
    /// Metadata from the walk; the payload is filled in by the writer.
    entry: Entry,
    size: u64,
    /// The previous version at this path, the delta's basis (or a moved
    /// file's).
    prev: Option<FileData>,
    /// No file at this path in the previous snapshot.
    new: bool,
}

/// Backs up the directory `path` as the entry `name` of the snapshot's
/// root, with `prev` the previous snapshot's entry of that name.
///
/// # Errors
/// [`Error::InvalidInput`] when `path` cannot be opened or a pattern is
/// bad; [`Error::SourceChanged`] under `--on-change fail`; [`Error::Io`]
/// writing the repository. A node that vanishes or cannot be read is not an
/// error: it is counted and warned about in the [`TreeStats`].
pub(super) fn backup_dir(
    w: &mut Writer<'_>,
    path: &Path,
    name: Vec<u8>,
    prev: Option<&Entry>,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<(Entry, TreeStats)> {
    let matcher = opts.excludes.matcher()?;
    let bytes = path.as_os_str().as_encoded_bytes();
    let fd = source::open_dir(None, bytes)
        .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", path.display())))?;
    let st = source::stat_fd(fd.as_fd())
        .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", path.display())))?;
    let prev_list = match prev.map(|e| &e.payload) {
        Some(Payload::Dir(l)) => Some(l.clone()),
        _ => None,
    };
    let (tx, rx) = sync_channel(QUEUE);
    let repo = w.repo;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        if progress.wants_totals() {
            // The bar counts the tree from here on.
            progress.scanned(0, 0, false);
            let (matcher, stop) = (&matcher, &stop);
            s.spawn(move || scan(path, st.dev, matcher, stop, progress));
        }
        let walker = s.spawn(|| {
            let mut wk = Walker {
                repo,
                opts,
                matcher: &matcher,
                owners: Owners::default(),
                links: HashMap::new(),
                root_dev: st.dev,
                renames: Renames::Unbuilt(prev_list.clone()),
                progress,
                files: progress.wants_files(),
                tx,
            };
            wk.source(fd, st, path, name, prev_list);
        });
        let r = Store::new(w, opts, progress).run(rx);
        // A scan runs to its end (the bar ends full), unless the backup
        // failed.
        if r.is_err() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // A writer that failed drops the receiver: the walker's next send
        // fails and it stops.
        let _ = walker.join();
        r
    })
}

/// Counts the files and bytes under `path` that the backup will see (the
/// same excludes), for a progress bar whose total then never moves back:
/// lstat only, reported every few thousand files and at the end. Stops
/// early when `stop` is set (the backup failed).
fn scan(
    path: &Path,
    root_dev: u64,
    matcher: &Matcher,
    stop: &std::sync::atomic::AtomicBool,
    progress: &dyn Progress,
) {
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut dirs: Vec<(Option<Arc<OwnedFd>>, Vec<u8>, PathBuf)> = vec![(
        None,
        path.as_os_str().as_encoded_bytes().to_vec(),
        path.to_path_buf(),
    )];
    while let Some((parent, name, p)) = dirs.pop() {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let Ok(fd) = source::open_dir(parent.as_deref().map(|f| f.as_fd()), &name) else {
            continue;
        };
        let Ok(names) = source::read_names(fd.as_fd()) else {
            continue;
        };
        let fd = Arc::new(fd);
        for (n, _) in names {
            let Ok(st) = source::stat_at(fd.as_fd(), &n) else {
                continue;
            };
            let child = p.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&n));
            if matcher.excluded(&child, st.is_dir()) {
                continue;
            }
            if st.is_dir() {
                if !(matcher.rules.one_file_system && st.dev != root_dev) {
                    dirs.push((Some(fd.clone()), n, child));
                }
            } else if st.is_file() && !matcher.too_large(st.size) {
                files += 1;
                bytes += st.size;
                if files.is_multiple_of(1024) {
                    progress.scanned(files, bytes, false);
                }
            }
        }
    }
    progress.scanned(files, bytes, true);
}

struct Walker<'a> {
    repo: &'a Repo,
    opts: &'a BackupOptions,
    matcher: &'a Matcher,
    owners: Owners,
    /// (dev, ino) of files with several links → (link group, first path).
    links: HashMap<(u64, u64), (u64, PathBuf)>,
    root_dev: u64,
    /// Bases for new paths, built the first time one is met.
    renames: Renames,
    progress: &'a dyn Progress,
    /// Whether each file is reported ([`Progress::file`]).
    files: bool,
    tx: SyncSender<Task>,
}

/// Where a file met at a new path finds its delta basis: the previous
/// snapshot's file with the same size and mtime (a rename or a move keeps
/// both), else with the same base name (`disk.img` moved into a directory
/// after an edit), else with the same size (a copy: when it is identical,
/// the delta finds every block and stores none). Only files with a
/// signature are indexed (smaller ones are stored whole anyway), at most
/// [`RENAMES_MAX`] of each key. The same pass collects the files by content
/// for the writer ([`Known`]).
enum Renames {
    /// The previous snapshot's list of this tree, not read yet.
    Unbuilt(Option<List<Entry>>),
    Built {
        by_stat: HashMap<(u64, i64), Arc<FileData>>,
        by_name: HashMap<Vec<u8>, Arc<FileData>>,
        by_size: HashMap<u64, Arc<FileData>>,
        /// Given to the writer once.
        known: Option<Arc<Known>>,
    },
}

/// The previous snapshot's files (at most [`RENAMES_MAX`]) by (whole-file
/// hash, size).
type Known = HashMap<([u8; 32], u64), Arc<FileData>>;

/// The most files a rename index holds per key: its memory stays a few
/// tens of MB whatever the tree's size.
const RENAMES_MAX: usize = 1 << 17;

impl Renames {
    /// The basis for a new file named `name` with `st`'s size and mtime.
    fn find(&mut self, repo: &Repo, name: &[u8], st: &Stat) -> Result<Option<FileData>> {
        if let Renames::Unbuilt(root) = self {
            let root = root.take();
            *self = Renames::build(repo, root)?;
        }
        let Renames::Built {
            by_stat,
            by_name,
            by_size,
            ..
        } = self
        else {
            return Ok(None);
        };
        Ok(by_stat
            .get(&(st.size, st.mtime_ns))
            .or_else(|| by_name.get(name))
            .or_else(|| by_size.get(&st.size))
            .map(|d| (**d).clone()))
    }

    /// The index of files by content, the first time it is asked after the
    /// build.
    fn take_known(&mut self) -> Option<Arc<Known>> {
        match self {
            Renames::Built { known, .. } => known.take(),
            Renames::Unbuilt(_) => None,
        }
    }

    fn empty() -> Renames {
        Renames::Built {
            by_stat: HashMap::new(),
            by_name: HashMap::new(),
            by_size: HashMap::new(),
            known: None,
        }
    }

    /// Reads the previous tree once, one directory list at a time.
    fn build(repo: &Repo, root: Option<List<Entry>>) -> Result<Renames> {
        let (mut by_stat, mut by_name, mut by_size) =
            (HashMap::new(), HashMap::new(), HashMap::new());
        let mut known = Known::new();
        let mut lists: Vec<List<Entry>> = root.into_iter().collect();
        while let Some(l) = lists.pop() {
            for e in crate::tree3::read_list(repo, &l)? {
                match e.payload {
                    Payload::Dir(sub) => lists.push(sub),
                    Payload::File(d) if e.error.is_empty() => {
                        let d = Arc::new(d);
                        if known.len() < RENAMES_MAX {
                            known.entry((d.hash, d.size)).or_insert_with(|| d.clone());
                        }
                        if d.size < crate::tree3::SIG_MIN_SIZE {
                            continue;
                        }
                        if by_stat.len() < RENAMES_MAX {
                            by_stat
                                .entry((d.size, e.mtime_ns))
                                .or_insert_with(|| d.clone());
                        }
                        if by_name.len() < RENAMES_MAX {
                            by_name.entry(e.name).or_insert_with(|| d.clone());
                        }
                        if by_size.len() < RENAMES_MAX {
                            by_size.entry(d.size).or_insert(d);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(Renames::Built {
            by_stat,
            by_name,
            by_size,
            known: Some(Arc::new(known)),
        })
    }
}

/// The walker stops: the writer has gone.
struct Gone;

/// Directories with at least this many names are lstat'ed on the pool.
const PAR_STAT_MIN: usize = 32;

/// The lstat of each of `names` (as read from `dir`, with their inode
/// numbers), in their order. A large directory's are asked in parallel and
/// in inode order, the order file systems keep inodes on disk: a cold walk
/// keeps the disk busy with several requests near one another.
fn stat_all(dir: BorrowedFd<'_>, names: &[(Vec<u8>, u64)]) -> Vec<io::Result<Stat>> {
    if names.len() < PAR_STAT_MIN {
        return names.iter().map(|(n, _)| source::stat_at(dir, n)).collect();
    }
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_unstable_by_key(|&k| names[k].1);
    let mut got: Vec<(usize, io::Result<Stat>)> = order
        .into_par_iter()
        .map(|k| (k, source::stat_at(dir, &names[k].0)))
        .collect();
    got.sort_unstable_by_key(|(k, _)| *k);
    got.into_iter().map(|(_, st)| st).collect()
}

impl Walker<'_> {
    fn send(&self, t: Task) -> std::result::Result<(), Gone> {
        self.tx.send(t).map_err(|_| Gone)
    }

    fn source(
        &mut self,
        fd: OwnedFd,
        st: Stat,
        path: &Path,
        name: Vec<u8>,
        prev: Option<List<Entry>>,
    ) {
        let r = (|| -> std::result::Result<(), Gone> {
            let mut entry = self.entry(name, &st);
            let names = match source::read_names(fd.as_fd()) {
                Ok(n) => n,
                Err(e) => {
                    let _ = self.send(Task::Failed(Error::InvalidInput(format!(
                        "cannot read {}: {e}",
                        path.display()
                    ))));
                    return Err(Gone);
                }
            };
            entry.xattrs = self.xattrs(XattrSource::Fd(fd.as_fd()), path);
            self.send(Task::Enter(prev.clone()))?;
            self.walk(Arc::new(fd), path, names, prev.as_ref())?;
            self.send(Task::Leave(entry))
        })();
        let _ = r;
    }

    /// An entry with `st`'s metadata and an empty payload of its kind.
    fn entry(&mut self, name: Vec<u8>, st: &Stat) -> Entry {
        let payload = match st.file_type() {
            libc::S_IFDIR => Payload::Dir(List::default()),
            libc::S_IFLNK => Payload::Symlink(Vec::new()),
            libc::S_IFCHR => Payload::CharDevice(st.rdev),
            libc::S_IFBLK => Payload::BlockDevice(st.rdev),
            libc::S_IFIFO => Payload::Fifo,
            libc::S_IFSOCK => Payload::Socket,
            _ => Payload::File(empty_file(self.repo)),
        };
        Entry {
            name,
            mode: st.mode,
            uid: st.uid,
            gid: st.gid,
            user: self.owners.user(st.uid),
            group: self.owners.group(st.gid),
            mtime_ns: st.mtime_ns,
            ctime_ns: st.ctime_ns,
            dev: st.dev,
            ino: st.ino,
            nlink: st.nlink,
            link_group: 0,
            xattrs: Vec::new(),
            error: String::new(),
            flags: 0,
            payload,
        }
    }

    /// A node's extended attributes; on failure none, with a warning.
    fn xattrs(&self, src: XattrSource<'_>, path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
        source::xattrs(src).unwrap_or_else(|e| {
            let _ = self.send(Task::Note(format!(
                "{}: extended attributes not kept: {e}",
                path.display()
            )));
            Vec::new()
        })
    }

    /// Sends the tasks of a directory's entries (names as read from it).
    fn walk(
        &mut self,
        dir: Arc<OwnedFd>,
        path: &Path,
        mut names: Vec<(Vec<u8>, u64)>,
        prev: Option<&List<Entry>>,
    ) -> std::result::Result<(), Gone> {
        names.sort_unstable();
        let mut stats = stat_all(dir.as_fd(), &names);
        // The previous list is read along with the names (both in name
        // order), one page at a time: a directory's previous entries are
        // never all decoded at once, nor the inline lists they hold.
        let mut i = 0;
        if let Some(l) = prev {
            let mut gone = false;
            let reader = crate::meta::ListReader::new(self.repo.cache());
            let read = reader.for_each(l, &mut |e: Entry| {
                let mut one = |w: &mut Self, i: usize, before| {
                    let st = std::mem::replace(&mut stats[i], Err(io::ErrorKind::Other.into()));
                    w.one(&dir, path, names[i].0.clone(), st, before)
                        .map_err(|Gone| {
                            gone = true;
                            Error::Internal("the writer stopped".into())
                        })
                };
                while i < names.len() && names[i].0 < e.name {
                    one(self, i, None)?;
                    i += 1;
                }
                if i < names.len() && names[i].0 == e.name {
                    one(self, i, Some(&e))?;
                    i += 1;
                }
                Ok(())
            });
            if gone {
                return Err(Gone);
            }
            if let Err(e) = read {
                self.send(Task::Note(format!(
                    "{}: previous snapshot's listing unreadable, the rest of it is read again: {e}",
                    path.display()
                )))?;
            }
        }
        for ((name, _), st) in names.drain(i..).zip(stats.drain(i..)) {
            self.one(&dir, path, name, st, None)?;
        }
        Ok(())
    }

    /// The node `name` of `dir` (at `path` in the source, `st` its lstat):
    /// its task, with `before` its entry in the previous snapshot.
    fn one(
        &mut self,
        dir: &Arc<OwnedFd>,
        path: &Path,
        name: Vec<u8>,
        st: io::Result<Stat>,
        before: Option<&Entry>,
    ) -> std::result::Result<(), Gone> {
        let child = path.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&name));
        let st = match st {
            Ok(st) => st,
            Err(e) => {
                self.skipped(&child, &e)?;
                return Ok(());
            }
        };
        if self.matcher.excluded(&child, st.is_dir()) {
            return Ok(());
        }
        let mut entry = self.entry(name.clone(), &st);
        match st.file_type() {
            libc::S_IFDIR => self.dir(dir, &child, entry, &st, before)?,
            libc::S_IFREG => {
                if self.matcher.too_large(st.size) {
                    return Ok(());
                }
                if st.nlink > 1 {
                    let key = (st.dev, st.ino);
                    let next = self.links.len() as u64 + 1;
                    match self.links.get(&key) {
                        Some((g, first)) => {
                            entry.link_group = *g;
                            let first = first.clone();
                            self.send(Task::Link(entry, first))?;
                            return Ok(());
                        }
                        None => {
                            self.links.insert(key, (next, child.clone()));
                            entry.link_group = next;
                        }
                    }
                }
                let prev_data = match before.map(|b| &b.payload) {
                    Some(Payload::File(d)) => Some(d),
                    _ => None,
                };
                let moved = match prev_data {
                    // Any new path has the index built (once), which also
                    // hands the writer the previous files by content; only
                    // a file with a signature takes a delta basis from it.
                    None => self
                        .renamed(&name, &st, &child)?
                        .filter(|_| st.size >= crate::tree3::SIG_MIN_SIZE),
                    _ => None,
                };
                if let (Some(b), Some(d)) = (before, prev_data) {
                    if self.unchanged(b, &st) {
                        entry.xattrs = b.xattrs.clone();
                        entry.flags = b.flags & ENTRY_HASH_SIZE_LAST;
                        entry.payload = Payload::File(d.clone());
                        if self.files {
                            self.progress.file(&child, FileStatus::Unchanged, d.size);
                        }
                        self.send(Task::Done(entry))?;
                        return Ok(());
                    }
                }
                self.send(Task::Read(Box::new(ReadJob {
                    dir: dir.clone(),
                    name,
                    path: child,
                    entry,
                    size: st.size,
                    new: prev_data.is_none(),
                    prev: prev_data.cloned().or(moved),
                })))?;
            }
            libc::S_IFLNK => {
                match source::read_link(dir.as_fd(), &name) {
                    Ok(t) => entry.payload = Payload::Symlink(t),
                    Err(e) => {
                        self.skipped(&child, &e)?;
                        return Ok(());
                    }
                }
                entry.xattrs = self.xattrs(XattrSource::Path(&child), &child);
                self.send(Task::Done(entry))?;
            }
            _ => {
                entry.xattrs = self.xattrs(XattrSource::Path(&child), &child);
                self.send(Task::Done(entry))?;
            }
        }
        Ok(())
    }

    /// A subdirectory: its tasks, between `Enter` and `Leave`, unless it is
    /// excluded by a tag; an empty directory if it is on another file
    /// system under `-x` or cannot be read.
    fn dir(
        &mut self,
        parent: &Arc<OwnedFd>,
        path: &Path,
        mut entry: Entry,
        st: &Stat,
        before: Option<&Entry>,
    ) -> std::result::Result<(), Gone> {
        if self.matcher.rules.one_file_system && st.dev != self.root_dev {
            return self.send(Task::Done(entry));
        }
        let name = entry.name.clone();
        let opened = source::open_dir(Some(parent.as_fd()), &name)
            .and_then(|fd| source::read_names(fd.as_fd()).map(|n| (fd, n)));
        let (fd, names) = match opened {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return self.skipped(path, &e),
            Err(e) => {
                // Kept, empty, with its error (counted when applied).
                entry.error = e.to_string();
                self.send(Task::Note(format!(
                    "{}: directory not read: {e}",
                    path.display()
                )))?;
                return self.send(Task::Done(entry));
            }
        };
        let tag = || {
            let mut buf = [0u8; CACHEDIR_SIGNATURE.len()];
            source::open_file(fd.as_fd(), b"CACHEDIR.TAG")
                .and_then(|f| std::io::Read::read_exact(&mut &f, &mut buf))
                .is_ok_and(|()| buf == CACHEDIR_SIGNATURE)
        };
        if self.matcher.tagged(&names, tag) {
            return Ok(());
        }
        entry.xattrs = self.xattrs(XattrSource::Fd(fd.as_fd()), path);
        let prev = match before.map(|b| &b.payload) {
            Some(Payload::Dir(l)) => Some(l.clone()),
            _ => None,
        };
        self.send(Task::Enter(prev.clone()))?;
        self.walk(Arc::new(fd), path, names, prev.as_ref())?;
        self.send(Task::Leave(entry))
    }

    /// The basis of a file at a new path (see [`Renames`]); none, with a
    /// warning, when the previous tree cannot be read.
    fn renamed(
        &mut self,
        name: &[u8],
        st: &Stat,
        path: &Path,
    ) -> std::result::Result<Option<FileData>, Gone> {
        match self.renames.find(self.repo, name, st) {
            Ok(d) => {
                if let Some(k) = self.renames.take_known() {
                    self.send(Task::Known(k))?;
                }
                Ok(d)
            }
            Err(e) => {
                self.renames = Renames::empty();
                self.send(Task::Note(format!(
                    "{}: previous snapshot unreadable, renamed files are read whole: {e}",
                    path.display()
                )))?;
                Ok(None)
            }
        }
    }

    fn skipped(&self, path: &Path, e: &std::io::Error) -> std::result::Result<(), Gone> {
        let why = if e.kind() == std::io::ErrorKind::NotFound {
            "vanished".to_string()
        } else {
            e.to_string()
        };
        self.send(Task::Skipped(format!("{}: skipped: {why}", path.display())))
    }

    /// Whether a file can take the previous snapshot's version unread.
    fn unchanged(&self, prev: &Entry, st: &Stat) -> bool {
        let o = self.opts;
        !o.checksum
            && prev.error.is_empty()
            && prev.flags & (ENTRY_CHANGED_WHILE_READ | ENTRY_RACY) == 0
            && prev.flags & ENTRY_HASH_SIZE_LAST != 0
            && prev.mode & libc::S_IFMT == libc::S_IFREG
            && matches!(&prev.payload, Payload::File(d) if d.size == st.size)
            && prev.mtime_ns == st.mtime_ns
            && (o.ignore_ctime || prev.ctime_ns == st.ctime_ns)
            && (o.ignore_inode || prev.ino == st.ino)
    }
}

/// A file read: new at its path, or changed.
fn read_status(j: &ReadJob) -> FileStatus {
    match j.new {
        true => FileStatus::New,
        false => FileStatus::Changed,
    }
}

/// The data of an empty file (also what a file that could not be read
/// holds, beside its error).
fn empty_file(repo: &Repo) -> FileData {
    let cfg = repo.config();
    FileData {
        size: 0,
        hash: FileHasher::new(cfg.block_size).finish(0),
        block_size: cfg.block_size,
        page_entries: cfg.page_entries,
        extents: List::default(),
        sigs: List::default(),
    }
}

/// A node's extended attributes, names sorted.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// A file after the parallel stage.
enum ReadOut {
    Read {
        entry: Entry,
        size: u64,
        chunk: Option<ChunkOut>,
        changed: Option<String>,
    },
    /// Gone before it could be opened.
    Vanished(String),
    /// Kept with its error and no data.
    Failed(Entry, String),
}

/// A file read on the pool, with the basis it was diffed against.
type ReadDone = (ReadOut, Option<(FileMap, SigView)>);

/// Tasks read on the pool, waiting to be applied: each task with what was
/// read for it (files only).
type Window = (Vec<Task>, Vec<Option<Result<ReadDone>>>);

/// The writer's side: applies tasks in order.
struct Store<'w, 'r> {
    w: &'w mut Writer<'r>,
    opts: &'w BackupOptions,
    progress: &'w dyn Progress,
    /// Lists of the directories being written, innermost last.
    stack: Vec<crate::meta::ListWriter<Entry>>,
    /// Link group → the data and extended attributes of its first file
    /// (the walker reads neither for the other names: they share its
    /// inode, and restore may create any of them first).
    groups: HashMap<u64, (FileData, Xattrs)>,
    /// Small files stored by this backup, by (hash, size): an identical
    /// file is stored once.
    same: lru::LruCache<([u8; 32], u64), FileData>,
    /// The previous snapshot's files by content, once a new path made the
    /// walker read them.
    known: Option<Arc<Known>>,
    stats: TreeStats,
    done: Option<Entry>,
}

impl<'w, 'r> Store<'w, 'r> {
    fn new(w: &'w mut Writer<'r>, opts: &'w BackupOptions, progress: &'w dyn Progress) -> Self {
        Store {
            w,
            opts,
            progress,
            stack: Vec::new(),
            groups: HashMap::new(),
            same: lru::LruCache::new(
                std::num::NonZeroUsize::new(1 << 16).unwrap_or(std::num::NonZeroUsize::MIN),
            ),
            known: None,
            stats: TreeStats::default(),
            done: None,
        }
    }

    fn run(mut self, rx: Receiver<Task>) -> Result<(Entry, TreeStats)> {
        let chunk = self.w.chunk_size(self.opts);
        let max_files = rayon::current_num_threads() * WINDOW_FILES;
        let mut window: Vec<Task> = Vec::new();
        let mut pending = None;
        let (mut files, mut bytes) = (0, 0);
        for t in rx {
            match t {
                Task::Read(j) if j.size > chunk => {
                    self.flush(&mut window, &mut pending)?;
                    self.drain(&mut pending)?;
                    (files, bytes) = (0, 0);
                    self.big(*j)?;
                }
                Task::Read(j) => {
                    files += 1;
                    bytes += j.size;
                    window.push(Task::Read(j));
                    if files >= max_files || bytes >= WINDOW_BYTES {
                        self.flush(&mut window, &mut pending)?;
                        (files, bytes) = (0, 0);
                    }
                }
                Task::Failed(e) => return Err(e),
                t if window.is_empty() && pending.is_none() => self.apply(t, None)?,
                t => window.push(t),
            }
        }
        self.flush(&mut window, &mut pending)?;
        self.drain(&mut pending)?;
        let root = self
            .done
            .take()
            .ok_or_else(|| Error::Internal("the walk ended early".into()))?;
        Ok((root, self.stats))
    }

    /// Reads the window's files on the pool while the previous window (if
    /// any) is applied: reading and storing overlap, as for a big file's
    /// chunks. The window read becomes the pending one.
    fn flush(&mut self, window: &mut Vec<Task>, pending: &mut Option<Window>) -> Result<()> {
        let tasks = std::mem::take(window);
        let before = pending.take();
        let cfg = self.w.repo.config().clone();
        let buffers = self.w.buffers.clone();
        let chunk_size = self.w.chunk_size(self.opts);
        let repo = self.w.repo;
        let opts = self.opts;
        let read = || -> Vec<Option<Result<ReadDone>>> {
            tasks
                .par_iter()
                .map(|t| match t {
                    Task::Read(j) => {
                        let prev = j.prev.as_ref().and_then(|d| basis(repo, d));
                        let ctx = ChunkCtx {
                            cfg: &cfg,
                            prev: prev.as_ref().map(|(_, s)| s),
                            buffers: &buffers,
                            chunk_size,
                        };
                        let out = read_small(j, &ctx, opts);
                        Some(out.map(|o| (o, prev)))
                    }
                    _ => None,
                })
                .collect()
        };
        let (outs, applied) = match before {
            Some(w) => rayon::join(read, || self.apply_window(w)),
            None => (read(), Ok(())),
        };
        applied?;
        *pending = Some((tasks, outs));
        Ok(())
    }

    /// Applies the pending window, if any.
    fn drain(&mut self, pending: &mut Option<Window>) -> Result<()> {
        match pending.take() {
            Some(w) => self.apply_window(w),
            None => Ok(()),
        }
    }

    /// Applies a window's tasks in order, with what was read for them.
    fn apply_window(&mut self, (tasks, outs): Window) -> Result<()> {
        for (t, out) in tasks.into_iter().zip(outs) {
            self.apply(t, out.transpose()?)?;
        }
        Ok(())
    }

    fn push(&mut self, e: Entry) -> Result<()> {
        match &e.payload {
            Payload::File(d) => {
                self.stats.files += 1;
                self.stats.bytes += d.size;
            }
            Payload::Dir(_) => self.stats.dirs += 1,
            _ => {}
        }
        if !e.error.is_empty() {
            self.stats.errors += 1;
        }
        // Into the open directory's list: past a page's worth, entries
        // are encoded into pages as they come, so a directory of many
        // subdirectories does not hold their lists decoded.
        let repo = self.w.repo;
        match self.stack.last_mut() {
            Some(list) => list.push(e, self.w.meta3()?, repo.backend()),
            None => {
                self.done = Some(e);
                Ok(())
            }
        }
    }

    fn warn(&mut self, s: String) {
        self.stats.errors += 1;
        self.stats.warnings.push(s);
    }

    fn apply(&mut self, t: Task, out: Option<ReadDone>) -> Result<()> {
        match t {
            Task::Enter(prev) => {
                // Pages of the previous list are known before any of this
                // one is cut: an unchanged directory's pages are the same.
                if let Some(p) = &prev {
                    let repo = self.w.repo;
                    crate::tree3::know_pages(repo, p, self.w.meta3()?)?;
                }
                self.stack.push(crate::meta::ListWriter::new());
            }
            Task::Leave(mut e) => {
                let list = self
                    .stack
                    .pop()
                    .ok_or_else(|| Error::Internal("a directory ended twice".into()))?;
                let repo = self.w.repo;
                let list = list.finish(self.w.meta3()?, repo.backend())?;
                e.payload = Payload::Dir(list);
                self.push(e)?;
            }
            Task::Done(e) => {
                if let Payload::File(d) = &e.payload {
                    self.progress.advance(d.size);
                }
                // An unchanged file of a link group: its other names share it.
                if let (Payload::File(d), true) = (&e.payload, e.link_group != 0) {
                    self.groups
                        .insert(e.link_group, (d.clone(), e.xattrs.clone()));
                }
                self.push(e)?
            }
            Task::Link(mut e, first) => match self.groups.get(&e.link_group) {
                Some((d, x)) => {
                    e.payload = Payload::File(d.clone());
                    e.xattrs = x.clone();
                    e.flags = ENTRY_HASH_SIZE_LAST;
                    self.push(e)?;
                }
                None => {
                    e.error = format!("its hard link {} could not be read", first.display());
                    self.push(e)?;
                }
            },
            Task::Skipped(s) => self.warn(s),
            Task::Note(s) => self.stats.warnings.push(s),
            Task::Known(k) => self.known = Some(k),
            Task::Failed(e) => return Err(e),
            Task::Read(j) => match out {
                Some((o, prev)) => self.small(*j, o, prev)?,
                None => return Err(Error::Internal("a file was not read".into())),
            },
        }
        Ok(())
    }

    /// Stores a small file read on the pool.
    fn small(&mut self, j: ReadJob, out: ReadOut, prev: Option<(FileMap, SigView)>) -> Result<()> {
        let (mut entry, size, chunk, changed) = match out {
            ReadOut::Vanished(s) => {
                self.warn(s);
                return Ok(());
            }
            ReadOut::Failed(mut e, why) => {
                self.stats
                    .warnings
                    .push(format!("{}: not read: {why}", j.path.display()));
                self.progress.file(&j.path, FileStatus::Error, 0);
                e.error = why;
                return self.push(e);
            }
            ReadOut::Read {
                entry,
                size,
                chunk,
                changed,
            } => (entry, size, chunk, changed),
        };
        let cfg = self.w.repo.config().clone();
        self.progress.start(&j.path.display().to_string(), size);
        self.progress.file(&j.path, read_status(&j), size);
        self.stats.files_read += 1;
        // An identical file stored earlier in this backup: share its data.
        let hash = {
            let mut h = FileHasher::new(cfg.block_size);
            if let Some(c) = &chunk {
                h.update(&c.digests);
            }
            h.finish(size)
        };
        // The same bytes as this backup stored already, as the basis (a
        // file touched or copied back, or moved, whose content is
        // unchanged) or as another file of the previous snapshot (a copy):
        // its stored data is shared, nothing is written.
        let basis = j
            .prev
            .as_ref()
            .filter(|d| d.hash == hash && d.size == size && d.block_size == cfg.block_size);
        let known = self
            .known
            .as_ref()
            .and_then(|k| k.get(&(hash, size)))
            .map(|d| &**d)
            .filter(|d| d.block_size == cfg.block_size);
        if let Some(d) = self.same.get(&(hash, size)).or(basis).or(known) {
            entry.payload = Payload::File(d.clone());
            if let Some(c) = chunk {
                self.stats.bytes_read += c.read;
                self.progress.advance(c.len);
                self.w.buffers.give(c.compressed);
            }
            return self.finish_file(entry, changed);
        }
        let prev_ref = prev.as_ref().map(|(m, s)| (m, s));
        if let Some(d) = &j.prev {
            self.w.know_data(d)?;
        }
        let mut st = FileState::new(&cfg, prev_ref);
        st.pager.no_sig = size < crate::tree3::SIG_MIN_SIZE;
        if let Some(c) = &chunk {
            self.w.store_chunk(c, prev_ref, &mut st)?;
            self.progress.advance(c.len);
        }
        if let Some(c) = chunk {
            self.w.buffers.give(c.compressed);
        }
        if let Some(page) = st.pager.flush() {
            self.w.store_page(&page, &mut st.pager)?;
        }
        if st.pos != size {
            return Err(Error::Internal(format!(
                "map covers {} of {size} bytes",
                st.pos
            )));
        }
        self.stats.bytes_read += st.read;
        let name = j.path.display().to_string();
        let (v, _) = self
            .w
            .finish_version(&name, size, st, (0, 0, 0), None, prev_ref)?;
        let d = v
            .data
            .map(|d| (*d).clone())
            .ok_or_else(|| Error::Internal("a format 3 version without data".into()))?;
        self.same.put((hash, size), d.clone());
        entry.payload = Payload::File(d);
        self.finish_file(entry, changed)
    }

    /// Flags, link group and counts of a stored file's entry.
    fn finish_file(&mut self, mut entry: Entry, changed: Option<String>) -> Result<()> {
        if let Some(what) = changed {
            entry.flags |= ENTRY_CHANGED_WHILE_READ;
            self.stats.changed += 1;
            self.stats.warnings.push(format!(
                "{}: changed while read ({what}), stored as read",
                String::from_utf8_lossy(&entry.name)
            ));
        }
        if entry.link_group != 0 {
            if let Payload::File(d) = &entry.payload {
                self.groups
                    .insert(entry.link_group, (d.clone(), entry.xattrs.clone()));
            }
        }
        self.push(entry)
    }

    /// Stores a file of more than one chunk, read in parallel chunks.
    fn big(&mut self, j: ReadJob) -> Result<()> {
        let file = match source::open_file(j.dir.as_fd(), &j.name) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.warn(format!("{}: skipped: vanished", j.path.display()));
                return Ok(());
            }
            Err(e) => {
                let mut entry = j.entry;
                self.stats
                    .warnings
                    .push(format!("{}: not read: {e}", j.path.display()));
                self.progress.file(&j.path, FileStatus::Error, 0);
                entry.error = e.to_string();
                return self.push(entry);
            }
        };
        self.progress.file(&j.path, read_status(&j), j.size);
        let mut entry = j.entry;
        let fresh = source::stat_fd(file.as_fd()).map_err(|e| Error::io(&j.path, e))?;
        refresh(&mut entry, &fresh);
        entry.xattrs = source::xattrs(XattrSource::Fd(file.as_fd())).unwrap_or_default();
        let prev = j.prev.as_ref().and_then(|d| basis(self.w.repo, d));
        if let Some(d) = &j.prev {
            self.w.know_data(d)?;
        }
        let started = crate::time::now_ns();
        let name = j.path.display().to_string();
        self.progress.start(&name, fresh.size);
        let prev_ref = prev.as_ref().map(|(m, s)| (m, s));
        let (v, report) = self.w.file(
            Input::Open(file, &j.path),
            &name,
            prev_ref,
            self.opts,
            self.progress,
        )?;
        self.stats.files_read += 1;
        self.stats.bytes_read += report.bytes_read;
        if entry.mtime_ns > started - RACY_NS {
            entry.flags |= ENTRY_RACY;
        }
        entry.flags |= ENTRY_HASH_SIZE_LAST;
        let d = v
            .data
            .map(|d| (*d).clone())
            .ok_or_else(|| Error::Internal("a format 3 version without data".into()))?;
        entry.payload = Payload::File(d);
        self.finish_file(entry, report.changed_while_read)
    }
}

/// A previous version's map and signature, to diff against; none when they
/// cannot be read (the file is then stored whole).
fn basis(repo: &Repo, d: &FileData) -> Option<(FileMap, SigView)> {
    let map = crate::tree3::file_map(repo, d).ok()?;
    let sig = crate::tree3::sig_view(repo, d).ok()?;
    Some((map, sig))
}

/// The entry's metadata as an open file's `fstat` gives it.
fn refresh(e: &mut Entry, st: &Stat) {
    e.mode = st.mode;
    e.uid = st.uid;
    e.gid = st.gid;
    e.mtime_ns = st.mtime_ns;
    e.ctime_ns = st.ctime_ns;
    e.ino = st.ino;
    e.nlink = st.nlink;
}

/// Reads, diffs and compresses one small file (on a pool thread), again
/// while it changes under the read, up to [`RETRIES`] times.
fn read_small(j: &ReadJob, ctx: &ChunkCtx<'_>, opts: &BackupOptions) -> Result<ReadOut> {
    let file = match source::open_file(j.dir.as_fd(), &j.name) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(ReadOut::Vanished(format!(
                "{}: skipped: vanished",
                j.path.display()
            )))
        }
        Err(e) => return Ok(ReadOut::Failed(j.entry.clone(), e.to_string())),
    };
    let mut entry = j.entry.clone();
    let mut attempt = 0;
    loop {
        let started = crate::time::now_ns();
        let before = match source::stat_fd(file.as_fd()) {
            Ok(s) => s,
            Err(e) => return Ok(ReadOut::Failed(entry, e.to_string())),
        };
        if !before.is_file() {
            return Ok(ReadOut::Failed(entry, "no longer a regular file".into()));
        }
        refresh(&mut entry, &before);
        let size = before.size;
        let chunk = match read_chunk(&file, &j.path, size, ctx) {
            Ok(c) => c,
            Err(Error::Io { source, .. }) => return Ok(ReadOut::Failed(entry, source.to_string())),
            Err(e) => return Err(e),
        };
        let after = match source::stat_fd(file.as_fd()) {
            Ok(s) => s,
            Err(e) => return Ok(ReadOut::Failed(entry, e.to_string())),
        };
        let changed = if after.size != size {
            Some(format!("size {size} -> {}", after.size))
        } else if after.mtime_ns != before.mtime_ns {
            Some("modification time changed".to_string())
        } else if after.ctime_ns != before.ctime_ns {
            Some("change time changed".to_string())
        } else {
            None
        };
        if changed.is_some() && attempt < RETRIES {
            attempt += 1;
            if let Some(c) = chunk {
                ctx.buffers.give(c.compressed);
            }
            continue;
        }
        if let Some(detail) = &changed {
            if !opts.accept_changed {
                return Err(Error::SourceChanged {
                    path: j.path.clone(),
                    detail: detail.clone(),
                });
            }
        }
        entry.xattrs = source::xattrs(XattrSource::Fd(file.as_fd())).unwrap_or_default();
        entry.flags = ENTRY_HASH_SIZE_LAST;
        if before.mtime_ns > started - RACY_NS {
            entry.flags |= ENTRY_RACY;
        }
        return Ok(ReadOut::Read {
            entry,
            size,
            chunk,
            changed,
        });
    }
}

fn read_chunk(file: &File, path: &Path, size: u64, ctx: &ChunkCtx<'_>) -> Result<Option<ChunkOut>> {
    if size == 0 {
        return Ok(None);
    }
    let data = data_ranges(file, size);
    let feed = FileFeed {
        file,
        path,
        size,
        data: &data,
    };
    feed.chunk(ctx, 0, size).map(Some)
}
