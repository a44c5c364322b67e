//! Backup: one snapshot per call, each source file diffed against its previous
//! version's signature and stored as an extent map.
//!
//! The file is read once, in chunks of a few MiB that a rayon pool reads,
//! diffs and compresses in parallel (in batches of a few chunks per thread, so
//! memory stays bounded whatever the file size); the calling thread then
//! appends each chunk's frames to the pack, turns its ops into extents (a copy
//! of the previous version resolves through the previous map, so no version
//! ever points at another version), pages its signature entries (a page equal
//! to the previous version's is shared, not rewritten) and feeds the
//! whole-file hash. Holes are found with SEEK_DATA/SEEK_HOLE and never read.
//!
//! Write order (FORMAT.md, "Write ordering"): packs and signature files are
//! finished and fsynced, maps written and fsynced, their directories fsynced,
//! and only then is the manifest renamed into `snapshots/`. A crash before the
//! rename leaves unreferenced files and no snapshot.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

mod resume;
mod tree;
pub use tree::TreeStats;

use crate::backend::Key;
use crate::delta::signature::{FileHasher, ZeroBlock};
use crate::delta::{DeltaStats, Op, SigView};
use crate::error::{Error, IoContext, Result};
use crate::format::config::Config;
use crate::format::map::{MapBody, PageRef};
use crate::format::sig::ENTRY_SIZE;
use crate::format::snapshot::{
    FileVersion, Node, NodeKind, Snapshot, SnapshotStats, FLAG_CHANGED_WHILE_READ,
    FLAG_HASH_SIZE_LAST, ROOT,
};
use crate::format::v3::node::{Entry, FileData, SigRef};
use crate::format::v3::record::SnapshotRecord;
use crate::format::v3::{BlobKind, List};
use crate::id::{MapId, PackId, SnapshotId};
use crate::map::{FileMap, MapBuilder, Piece};
use crate::meta::MetaWriter;
use crate::pack::PackWriter;
use crate::pipeline::{data_ranges, Buffers, ChunkCtx, ChunkOut, Feed, FileFeed, StreamFeed};
use crate::repo::{Repo, SigWriter};

/// Reports progress of long work. All methods default to doing nothing.
pub trait Progress: Sync {
    /// A new file of `size` bytes starts.
    fn start(&self, _name: &str, _size: u64) {}
    /// `bytes` more were processed.
    fn advance(&self, _bytes: u64) {}
    /// Whether totals are wanted: a directory backup then scans the tree
    /// alongside (lstat only) and reports them with [`Progress::scanned`].
    fn wants_totals(&self) -> bool {
        false
    }
    /// A directory backup's scan found `files` files of `bytes` so far
    /// (`done`: all of them). From the first call on, a file's bytes are
    /// advanced once whether it is read or unchanged, and `start` only
    /// names the file being read.
    fn scanned(&self, _files: u64, _bytes: u64, _done: bool) {}
    /// Whether [`Progress::file`] is wanted (a directory backup then
    /// names every file it stores).
    fn wants_files(&self) -> bool {
        false
    }
    /// A directory backup stored the file at `path` (`size` bytes).
    fn file(&self, _path: &Path, _status: FileStatus, _size: u64) {}
}

/// What a directory backup did with one file ([`Progress::file`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileStatus {
    /// No file at this path in the previous snapshot: read.
    New,
    /// Its size, times or inode changed: read.
    Changed,
    /// The previous snapshot's version, not read.
    Unchanged,
    /// Could not be read: kept with its error.
    Error,
}

impl FileStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FileStatus::New => "new",
            FileStatus::Changed => "changed",
            FileStatus::Unchanged => "unchanged",
            FileStatus::Error => "error",
        }
    }
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// What `dsync backup` was asked to do.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// Read every file even when size, mtime and inode are unchanged.
    pub checksum: bool,
    /// A file whose inode number changed is still unchanged (file systems
    /// without stable inode numbers: FUSE, some network file systems).
    pub ignore_inode: bool,
    /// A file whose ctime changed is still unchanged (after `chown -R`).
    pub ignore_ctime: bool,
    /// What a directory backup leaves out.
    pub excludes: crate::exclude::Excludes,
    /// The snapshot's time (Unix ns); now when `None`.
    pub time_ns: Option<i64>,
    /// Bytes per chunk diffed by one task (rounded to whole blocks).
    pub chunk_size: usize,
    /// Store a file that changed while it was read (flagged in the manifest)
    /// instead of failing the backup. Its bytes may mix before and after.
    pub accept_changed: bool,
    /// Store the (single) source under this name instead of its base name.
    pub name: Option<String>,
    /// A stream must be exactly this long (a stream that ends early looks
    /// like a short one otherwise); files ignore it.
    pub expect_size: Option<u64>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            checksum: false,
            ignore_inode: false,
            ignore_ctime: false,
            excludes: crate::exclude::Excludes::default(),
            time_ns: None,
            chunk_size: 4 << 20,
            accept_changed: false,
            name: None,
            expect_size: None,
        }
    }
}

/// What happened to one source file.
#[derive(Clone, Debug)]
pub struct FileReport {
    pub name: String,
    pub size: u64,
    /// Unchanged metadata: the previous version was reused without reading.
    pub reused: bool,
    /// There was a previous version to diff against.
    pub had_previous: bool,
    pub stats: DeltaStats,
    pub bytes_read: u64,
    /// Compressed bytes of new literal data.
    pub bytes_compressed: u64,
    /// Damaged pages of the previous signature (matched nothing).
    pub damaged_sig_pages: u64,
    /// With [`BackupOptions::accept_changed`]: the source changed while it
    /// was read (what changed); the version is stored as read and flagged.
    pub changed_while_read: Option<String>,
}

/// The result of a backup.
#[derive(Clone, Debug)]
pub struct BackupReport {
    pub snapshot: Snapshot,
    pub files: Vec<FileReport>,
    /// A writer that died holding the lock, as its lock record names it.
    pub lock_taken_over: Option<String>,
    /// What the directory sources held, and what was skipped.
    pub tree: TreeStats,
}

impl BackupReport {
    /// The snapshot was made but lacks something: a file vanished, could not
    /// be read, or changed while it was read.
    pub fn incomplete(&self) -> bool {
        self.tree.errors > 0
            || self.tree.changed > 0
            || self.files.iter().any(|f| f.changed_while_read.is_some())
    }
}

/// Runs a backup of `paths` into `repo`.
///
/// # Errors
/// [`Error::Locked`] when another writer runs; [`Error::InvalidInput`] for a
/// missing, unreadable or unsupported source; [`Error::SourceChanged`];
/// [`Error::Io`] (a full disk among them). On any error no snapshot is made and
/// every earlier one is untouched.
pub fn backup(
    repo: &Repo,
    paths: &[PathBuf],
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    run(repo, paths, None, opts, progress)
}

/// Runs a backup of a stream of unknown length (`dsync backup --stdin`) into
/// `repo`, as one file named [`BackupOptions::name`], diffed against the
/// previous version of that name like any file.
///
/// # Errors
/// As [`backup`]; [`Error::InvalidInput`] without a name; a read error of the
/// stream as [`Error::Io`] on "standard input".
pub fn backup_stream(
    repo: &Repo,
    reader: &mut (dyn Read + Send),
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    run(repo, &[], Some(reader), opts, progress)
}

/// Where a source's bytes come from.
enum Origin<'a> {
    Path {
        path: PathBuf,
        md: std::fs::Metadata,
    },
    Stream(&'a mut (dyn Read + Send)),
    /// A directory: its whole tree (format 3).
    Dir(PathBuf),
}

fn run(
    repo: &Repo,
    paths: &[PathBuf],
    stream: Option<&mut (dyn Read + Send)>,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let started = Instant::now();
    let lock = repo.lock()?;
    // The previous snapshot's lists and signatures are read from the same
    // few packs over and over: they stay open for the whole backup.
    let _held = repo.cache().hold();
    // Check every source before writing anything.
    let mut sources: Vec<(Origin<'_>, Vec<u8>)> = Vec::new();
    let mut names: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    let count = paths.len() + usize::from(stream.is_some());
    if count == 0 {
        return Err(Error::InvalidInput(
            "nothing to back up: give at least one path".into(),
        ));
    }
    let given = match (&opts.name, count) {
        (Some(n), 1) => Some(n.as_bytes().to_vec()),
        (Some(_), _) => {
            return Err(Error::InvalidInput(
                "--name needs exactly one source".into(),
            ));
        }
        (None, _) => None,
    };
    if given
        .as_ref()
        .is_some_and(|n| n.is_empty() || n.contains(&b'/') || n == b"." || n == b"..")
    {
        return Err(Error::InvalidInput(
            "--name must be a plain file name".into(),
        ));
    }
    if let Some(r) = stream {
        let name = given.clone().ok_or_else(|| {
            Error::InvalidInput("a stream needs a name to be stored under: give --name".into())
        })?;
        sources.push((Origin::Stream(r), name));
    }
    for p in paths {
        let md = std::fs::metadata(p)
            .map_err(|e| Error::InvalidInput(format!("cannot back up {}: {}", p.display(), e)))?;
        let format3 = repo.config().format >= crate::format::config::FORMAT_3;
        if md.is_dir() && !format3 {
            return Err(Error::InvalidInput(format!(
                "cannot back up {}: directories need a format 3 repository, and {} is format 2 (make one with `dsync init`, or `dsync upgrade` this one)",
                p.display(),
                repo.location().display()
            )));
        }
        if !md.is_file() && !md.is_dir() && !is_block_device(&md) {
            return Err(Error::InvalidInput(format!(
                "cannot back up {}: not a regular file, directory or block device",
                p.display()
            )));
        }
        let name = match &given {
            Some(n) => n.clone(),
            None => p
                .file_name()
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "cannot back up {}: it has no file name",
                        p.display()
                    ))
                })?
                .as_encoded_bytes()
                .to_vec(),
        };
        if !names.insert(name.clone()) {
            return Err(Error::InvalidInput(format!(
                "two sources are named {:?}; each path is stored under its base name",
                String::from_utf8_lossy(&name)
            )));
        }
        File::open(p)
            .map_err(|e| Error::InvalidInput(format!("cannot read {}: {}", p.display(), e)))?;
        let path = std::path::absolute(p).unwrap_or_else(|_| p.clone());
        if md.is_dir() {
            sources.push((Origin::Dir(path), name));
        } else {
            sources.push((Origin::Path { path, md }, name));
        }
    }
    let wanted: Vec<&[u8]> = sources.iter().map(|(_, n)| n.as_slice()).collect();
    let (earlier, newest3) = Earlier::find(repo, &wanted)?;

    let mut w = Writer::new(repo)?;
    let mut out = Collected::default();
    // Files of at most one chunk, read, diffed and compressed by the pool
    // several at a time (one file alone would keep one core busy).
    let mut group: Vec<SmallJob> = Vec::new();
    let group_max = rayon::current_num_threads() * 4;
    for (origin, name) in sources {
        if let Origin::Dir(path) = &origin {
            w.small_files(&mut group, opts, progress, &mut out)?;
            let prev = earlier.entry.get(&name);
            let (entry, stats) = tree::backup_dir(&mut w, path, name, prev, opts, progress)?;
            out.paths.push(path.display().to_string());
            out.bytes_read += stats.bytes_read;
            out.entries.push(entry);
            out.tree.add(stats);
            continue;
        }
        let prev = earlier.file.get(&name).cloned();
        let display = String::from_utf8_lossy(&name).into_owned();
        // A block device's node says 0 bytes: ask the device. A stream's
        // size is known only at its end.
        let total = match &origin {
            Origin::Path { md, .. } if md.is_file() => md.len(),
            Origin::Path { path, md } => File::open(path)
                .and_then(|f| source_size(&f, md))
                .unwrap_or(0),
            Origin::Stream(_) | Origin::Dir(_) => 0,
        };
        let unchanged = match &origin {
            Origin::Path { md, .. } => {
                md.is_file()
                    && prev.as_ref().is_some_and(|f| {
                        // Not the device number: btrfs and ZFS snapshot
                        // mounts get a new one every time.
                        f.size == md.len()
                            && (opts.ignore_inode || f.ino == md.ino())
                            && (opts.ignore_ctime || f.ctime_ns == ctime_ns(md))
                            && Some(&mtime_ns_of(md)) == earlier.mtime.get(&name)
                    })
            }
            Origin::Stream(_) | Origin::Dir(_) => false,
        };
        let reuse = unchanged && !opts.checksum;
        let prev_loaded = match &prev {
            Some(f) if !reuse => {
                let map = repo.load_version(f)?;
                let sig = repo.version_sig(f, &map)?;
                w.know_signature(f)?;
                Some((map, sig))
            }
            _ => None,
        };
        let small = match &origin {
            Origin::Path { md, .. } => !reuse && md.is_file() && md.len() <= w.chunk_size(opts),
            Origin::Stream(_) | Origin::Dir(_) => false,
        };
        if small {
            if let Origin::Path { path, md } = origin {
                group.push(SmallJob {
                    path,
                    md,
                    name,
                    prev: prev_loaded,
                });
            }
            if group.len() >= group_max {
                w.small_files(&mut group, opts, progress, &mut out)?;
            }
            continue;
        }
        w.small_files(&mut group, opts, progress, &mut out)?;
        progress.start(&display, total);
        let prev_ref = prev_loaded.as_ref().map(|(m, s)| (m, s));
        match (origin, prev) {
            (Origin::Path { path, md }, Some(f)) if reuse => {
                progress.advance(md.len());
                let report = FileReport {
                    name: display,
                    size: md.len(),
                    reused: true,
                    had_previous: true,
                    stats: DeltaStats::default(),
                    bytes_read: 0,
                    bytes_compressed: 0,
                    damaged_sig_pages: 0,
                    changed_while_read: None,
                };
                out.push(name, f, report, node_meta(&md), &path);
            }
            (Origin::Path { path, md }, _) => {
                let (v, r) = w.file(Input::Path(&path), &display, prev_ref, opts, progress)?;
                out.push(name, v, r, node_meta(&md), &path);
            }
            (Origin::Stream(reader), _) => {
                let (v, r) = w.file(Input::Stream(reader), &display, prev_ref, opts, progress)?;
                // SAFETY: getuid/getgid cannot fail and touch no memory.
                let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
                let mtime = opts.time_ns.unwrap_or_else(crate::time::now_ns);
                let meta = (libc::S_IFREG | 0o600, uid, gid, mtime);
                out.push(name, v, r, meta, Path::new("-"));
            }
            (Origin::Dir(_), _) => return Err(Error::Internal("a directory as a file".into())),
        }
    }
    w.small_files(&mut group, opts, progress, &mut out)?;
    let Collected {
        nodes,
        files,
        paths: source_paths,
        bytes_read,
        entries,
        tree,
        attrs,
        ..
    } = out;
    let root = match &mut w.meta {
        Some(meta) => {
            // The newest format 3 snapshot's pages: an unchanged root list
            // (every file reused) is the same pages again.
            if let Some(id) = newest3 {
                let record = repo.load_record(id)?;
                crate::tree3::know_pages(repo, &record.root, meta)?;
            }
            Some(crate::tree3::write_root(
                repo, meta, &nodes, &attrs, entries,
            )?)
        }
        None => None,
    };
    let mut added = w.finish()?;
    let mut snap = Snapshot {
        id: SnapshotId::random(),
        time_ns: opts.time_ns.unwrap_or_else(crate::time::now_ns),
        host: crate::repo::hostname(),
        paths: source_paths,
        stats: SnapshotStats {
            bytes_read,
            bytes_added: 0,
            duration_ns: 0,
        },
        nodes,
        format: if root.is_some() { 3 } else { 2 },
    };
    // The manifest's own size counts in bytes_added: measured before the
    // stats are filled in, it is its size within the few bytes that
    // compressing other numbers may change.
    let encode = |snap: &Snapshot| match &root {
        Some(root) => record_of(snap, root.clone(), &tree).encode(),
        None => snap.encode(),
    };
    added += encode(&snap).len() as u64;
    snap.stats.bytes_added = added;
    snap.stats.duration_ns = started.elapsed().as_nanos() as u64;
    let bytes = encode(&snap);
    repo.backend().commit(&Key::snapshot(snap.id), &bytes)?;
    if let Some(r) = w.resume.take() {
        r.committed();
    }
    Ok(BackupReport {
        snapshot: snap,
        files,
        lock_taken_over: lock.took_over.clone(),
        tree,
    })
}

/// Reads, diffs and compresses one small file (on a pool thread).
fn read_small(j: &SmallJob, ctx: &ChunkCtx<'_>, opts: &BackupOptions) -> Result<SmallRead> {
    let path = &j.path;
    let file = File::open(path)
        .map_err(|e| Error::InvalidInput(format!("cannot read {}: {}", path.display(), e)))?;
    let before = file.metadata().at(path)?;
    let size = before.len();
    let data = data_ranges(&file, size);
    let feed = FileFeed {
        file: &file,
        path,
        size,
        data: &data,
    };
    let chunk = if size > 0 {
        Some(feed.chunk(ctx, 0, size)?)
    } else {
        None
    };
    let changed = changed_while_read(&file, path, &before, size, opts)?;
    Ok(SmallRead {
        size,
        chunk,
        source: (before.dev(), before.ino(), ctime_ns(&before)),
        changed,
    })
}

/// What changed in a source while it was read (size, mtime or ctime), if
/// anything; an error unless the options accept it.
///
/// # Errors
/// [`Error::SourceChanged`]; [`Error::Io`] when it cannot be stat'ed again.
fn changed_while_read(
    file: &File,
    path: &Path,
    before: &std::fs::Metadata,
    size: u64,
    opts: &BackupOptions,
) -> Result<Option<String>> {
    let after = file.metadata().at(path)?;
    let after_size = source_size(file, &after).at(path)?;
    let what = if after_size != size {
        Some(format!("size {} -> {}", size, after_size))
    } else if is_block_device(before) {
        // A device node's times say nothing about its contents.
        None
    } else if mtime_ns_of(&after) != mtime_ns_of(before) {
        Some("modification time changed".to_string())
    } else if ctime_ns(&after) != ctime_ns(before) {
        Some("change time changed".to_string())
    } else {
        None
    };
    match what {
        Some(detail) if !opts.accept_changed => Err(Error::SourceChanged {
            path: path.into(),
            detail,
        }),
        w => Ok(w),
    }
}

/// The format 3 record of a snapshot whose tree is `root`.
fn record_of(s: &Snapshot, root: List<Entry>, tree: &TreeStats) -> SnapshotRecord {
    let (files, bytes) = s.totals();
    let incomplete = tree.errors > 0
        || tree.changed > 0
        || s.nodes.iter().any(|n| match &n.kind {
            NodeKind::File(f) => f.flags & FLAG_CHANGED_WHILE_READ != 0,
            _ => false,
        });
    SnapshotRecord {
        id: s.id,
        time_ns: s.time_ns,
        host: s.host.clone(),
        paths: s.paths.clone(),
        bytes_read: s.stats.bytes_read,
        bytes_added: s.stats.bytes_added,
        duration_ns: s.stats.duration_ns,
        files: files + tree.files,
        bytes: bytes + tree.bytes,
        dirs: s.nodes.len() as u64 - files + tree.dirs,
        errors: tree.errors,
        flags: if incomplete {
            crate::format::v3::record::SNAPSHOT_INCOMPLETE
        } else {
            0
        },
        root,
    }
}

/// The snapshot's nodes and reports, in the order of the sources.
#[derive(Default)]
struct Collected {
    nodes: Vec<Node>,
    files: Vec<FileReport>,
    paths: Vec<String>,
    bytes_read: u64,
    /// Format 3: the directory sources' entries.
    entries: Vec<Entry>,
    tree: TreeStats,
    /// Per node: what format 3 keeps beyond a [`Node`] (owner names,
    /// extended attributes).
    attrs: Vec<crate::tree3::RootAttrs>,
    owners: crate::source::Owners,
}

impl Collected {
    fn push(
        &mut self,
        name: Vec<u8>,
        version: FileVersion,
        report: FileReport,
        meta: (u32, u32, u32, i64),
        source: &Path,
    ) {
        self.bytes_read += report.bytes_read;
        let xattrs = match source == Path::new("-") {
            true => Vec::new(),
            // A file that refuses its attributes is still backed up.
            false => {
                crate::source::xattrs(crate::source::XattrSource::Path(source)).unwrap_or_default()
            }
        };
        self.attrs.push(crate::tree3::RootAttrs {
            user: self.owners.user(meta.1),
            group: self.owners.group(meta.2),
            xattrs,
        });
        self.paths.push(source.display().to_string());
        self.nodes.push(Node {
            parent: ROOT,
            name,
            mode: meta.0,
            uid: meta.1,
            gid: meta.2,
            mtime_ns: meta.3,
            kind: NodeKind::File(version),
        });
        self.files.push(report);
    }
}

/// A file of at most one chunk, waiting for its group.
struct SmallJob {
    path: PathBuf,
    md: std::fs::Metadata,
    name: Vec<u8>,
    prev: Option<(FileMap, SigView)>,
}

/// A small file after the parallel stage.
struct SmallRead {
    size: u64,
    chunk: Option<ChunkOut>,
    source: (u64, u64, i64),
    changed: Option<String>,
}

/// Mode, uid, gid and mtime of a source's node. A block device is stored as
/// the regular file of its contents.
fn node_meta(md: &std::fs::Metadata) -> (u32, u32, u32, i64) {
    let mode = if md.is_file() {
        md.mode()
    } else {
        libc::S_IFREG | (md.mode() & 0o7777)
    };
    (mode, md.uid(), md.gid(), mtime_ns_of(md))
}

/// What earlier snapshots hold at their roots: by name, the newest file
/// version (the delta basis) and the newest node's mtime. One pass over the
/// snapshots, then one lookup per source.
#[derive(Default)]
struct Earlier {
    file: HashMap<Vec<u8>, FileVersion>,
    mtime: HashMap<Vec<u8>, i64>,
    /// Format 3: the newest root entry of each name (a directory's is the
    /// basis of its tree's change detection).
    entry: HashMap<Vec<u8>, Entry>,
}

/// How many snapshots, newest first, a backup looks through for a source's
/// previous version: usually the newest has them all and it stops there; a
/// file absent from the last ones is stored without a basis.
const EARLIER_SNAPSHOTS: usize = 16;

impl Earlier {
    /// Reads snapshots newest first (their listings, then each tree) until
    /// every name in `wanted` is found or [`EARLIER_SNAPSHOTS`] were read;
    /// also returns the newest format 3 snapshot, whose pages a format 3
    /// backup reuses.
    fn find(repo: &Repo, wanted: &[&[u8]]) -> Result<(Earlier, Option<SnapshotId>)> {
        let infos = repo.infos()?;
        let newest3 = infos.iter().rev().find(|i| i.format >= 3).map(|i| i.id);
        let mut e = Earlier::default();
        for info in infos.iter().rev().take(EARLIER_SNAPSHOTS) {
            if wanted.iter().all(|n| e.mtime.contains_key(*n)) {
                break;
            }
            if info.format >= 3 {
                // Only the root list: a tree is read lazily, directory by
                // directory, as the walk meets it.
                let record = repo.load_record(info.id)?;
                for en in crate::tree3::read_list(repo, &record.root)? {
                    e.mtime.entry(en.name.clone()).or_insert(en.mtime_ns);
                    if let Some(n) = crate::tree3::node_of(&en, ROOT) {
                        if let NodeKind::File(f) = n.kind {
                            e.file.entry(en.name.clone()).or_insert(f);
                        }
                    }
                    e.entry.entry(en.name.clone()).or_insert(en);
                }
                continue;
            }
            let s = repo.load_snapshot(info.id)?;
            for n in s.nodes.iter().filter(|n| n.parent == ROOT) {
                e.mtime.entry(n.name.clone()).or_insert(n.mtime_ns);
                if let NodeKind::File(f) = &n.kind {
                    e.file.entry(n.name.clone()).or_insert_with(|| f.clone());
                }
            }
        }
        Ok((e, newest3))
    }
}

fn is_block_device(md: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    md.file_type().is_block_device()
}

/// Bytes in a source: the file's length, or a block device's size.
fn source_size(file: &File, md: &std::fs::Metadata) -> std::io::Result<u64> {
    if is_block_device(md) {
        use std::io::Seek;
        let mut f = file;
        f.seek(std::io::SeekFrom::End(0))
    } else {
        Ok(md.len())
    }
}

fn mtime_ns_of(md: &std::fs::Metadata) -> i64 {
    md.mtime() * 1_000_000_000 + md.mtime_nsec()
}

fn ctime_ns(md: &std::fs::Metadata) -> i64 {
    md.ctime() * 1_000_000_000 + md.ctime_nsec()
}

/// The sequential state of one file's backup.
struct FileState<'a> {
    builder: MapBuilder,
    pager: Pager<'a>,
    hasher: FileHasher,
    stats: DeltaStats,
    read: u64,
    compressed: u64,
    pos: u64,
}

impl<'a> FileState<'a> {
    fn new(cfg: &Config, prev: Option<(&'a FileMap, &'a SigView)>) -> Self {
        FileState {
            builder: MapBuilder::default(),
            pager: Pager::new(cfg.page_entries, prev, ZeroBlock::new(cfg.block_size)),
            hasher: FileHasher::new(cfg.block_size),
            stats: DeltaStats::default(),
            read: 0,
            compressed: 0,
            pos: 0,
        }
    }
}

/// The files a backup writes, shared by all its source files.
struct Writer<'r> {
    repo: &'r Repo,
    pack: Option<PackWriter>,
    sig: Option<SigWriter>,
    /// Format 3: metadata blobs (signature pages, lists) go here.
    meta: Option<MetaWriter>,
    added: u64,
    buffers: std::sync::Arc<Buffers>,
    /// A remote repository's journal of finished packs, so that a retry
    /// after a cut link reuses what crossed (`resume.rs`).
    resume: Option<resume::Resume>,
}

/// A source as the writer reads it.
enum Input<'a> {
    Path(&'a Path),
    /// A file the tree walk opened (no-follow, relative to its directory).
    Open(File, &'a Path),
    Stream(&'a mut (dyn Read + Send)),
}

impl<'r> Writer<'r> {
    fn new(repo: &'r Repo) -> Result<Self> {
        let format3 = repo.config().format >= crate::format::config::FORMAT_3;
        Ok(Writer {
            repo,
            pack: None,
            sig: None,
            meta: format3.then(MetaWriter::new),
            added: 0,
            buffers: std::sync::Arc::default(),
            resume: repo
                .backend()
                .client_dir()
                .map(|d| resume::Resume::load(&d, repo.backend())),
        })
    }

    fn pack(&mut self) -> Result<&mut PackWriter> {
        let full = self
            .pack
            .as_ref()
            .is_some_and(|p| p.file_len() >= self.repo.config().pack_target);
        if full {
            self.finish_pack()?;
        }
        if self.pack.is_none() {
            self.pack = Some(PackWriter::create(self.repo.backend())?);
        }
        self.pack
            .as_mut()
            .ok_or_else(|| Error::Internal("no pack".into()))
    }

    /// Finishes the pack being written; with a journal, makes it durable
    /// and records what it holds.
    fn finish_pack(&mut self) -> Result<()> {
        let Some(p) = self.pack.take() else {
            return Ok(());
        };
        let id = p.id;
        let len = p.finish()?;
        self.added += len;
        if let Some(r) = &mut self.resume {
            self.repo.backend().sync()?;
            r.pack_done(id, len);
        }
        Ok(())
    }

    /// Appends a chunk's frames to the pack, or finds them where an
    /// earlier cut-off try left them; returns the pack and where in its
    /// uncompressed stream they start.
    fn frames(&mut self, out: &ChunkOut, st: &mut FileState<'_>) -> Result<(PackId, u64)> {
        let key = self
            .resume
            .as_ref()
            .filter(|_| !out.frames.is_empty())
            .map(|_| resume::FramesKey::of(&out.compressed, &out.frames));
        if let (Some(k), Some(r)) = (&key, &mut self.resume) {
            if let Some(found) = r.find(k) {
                r.reused += out.frames.iter().map(|f| u64::from(f.clen)).sum::<u64>();
                return Ok(found);
            }
        }
        let pack = self.pack()?;
        let mut base = None;
        for f in &out.frames {
            let at = pack.append(
                &out.compressed[f.start..f.start + f.clen as usize],
                f.ulen,
                f.sum,
            )?;
            base.get_or_insert(at);
            st.compressed += f.clen as u64;
        }
        let id = pack.id;
        let base = base.unwrap_or(0);
        if let (Some(k), Some(r)) = (key, &mut self.resume) {
            r.appended(k, base);
        }
        Ok((id, base))
    }

    fn sig(&mut self) -> Result<&mut SigWriter> {
        if self.sig.is_none() {
            self.sig = Some(SigWriter::create(
                self.repo.backend(),
                self.repo.config().page_entries,
            )?);
        }
        self.sig
            .as_mut()
            .ok_or_else(|| Error::Internal("no signature file".into()))
    }

    /// Backs up one file or stream; returns its version and report.
    fn file(
        &mut self,
        input: Input<'_>,
        name: &str,
        prev: Option<(&FileMap, &SigView)>,
        opts: &BackupOptions,
        progress: &dyn Progress,
    ) -> Result<(FileVersion, FileReport)> {
        let (size, st, source, what) = match input {
            Input::Path(_) | Input::Open(..) => {
                let (file, path) = match input {
                    Input::Open(f, p) => (f, p),
                    Input::Path(path) => (
                        File::open(path).map_err(|e| {
                            Error::InvalidInput(format!("cannot read {}: {}", path.display(), e))
                        })?,
                        path,
                    ),
                    Input::Stream(_) => return Err(Error::Internal("not a file".into())),
                };
                let before = file.metadata().at(path)?;
                let size = source_size(&file, &before).at(path)?;
                let data = data_ranges(&file, size);
                let mut feed = Feed::File(FileFeed {
                    file: &file,
                    path,
                    size,
                    data: &data,
                });
                let st = self.store(&mut feed, prev, opts, progress)?;
                if st.pos != size {
                    return Err(Error::Internal(format!(
                        "map covers {} of {size} bytes",
                        st.pos
                    )));
                }
                let what = changed_while_read(&file, path, &before, size, opts)?;
                let source = (before.dev(), before.ino(), ctime_ns(&before));
                (size, st, source, what)
            }
            Input::Stream(reader) => {
                let mut feed = Feed::Stream(StreamFeed::new(reader));
                let st = self.store(&mut feed, prev, opts, progress)?;
                if let Some(want) = opts.expect_size.filter(|&w| w != st.pos) {
                    return Err(Error::InvalidInput(format!(
                        "standard input ended after {} bytes, not the {want} expected: no snapshot was made",
                        st.pos
                    )));
                }
                (st.pos, st, (0, 0, 0), None)
            }
        };
        self.finish_version(name, size, st, source, what, prev)
    }

    /// Writes a stored file's map; returns its version and report.
    fn finish_version(
        &mut self,
        name: &str,
        size: u64,
        st: FileState<'_>,
        source: (u64, u64, i64),
        what: Option<String>,
        prev: Option<(&FileMap, &SigView)>,
    ) -> Result<(FileVersion, FileReport)> {
        let cfg = self.repo.config().clone();
        let hash = st.hasher.finish(size);
        let (map_id, data) = match &mut self.meta {
            Some(meta) => {
                let sigs = if size < crate::tree3::SIG_MIN_SIZE {
                    Vec::new()
                } else {
                    st.pager.sig_refs
                };
                let d = FileData {
                    size,
                    hash,
                    block_size: cfg.block_size,
                    page_entries: cfg.page_entries,
                    extents: crate::tree3::write_extents(self.repo, meta, &st.builder.extents)?,
                    sigs: crate::tree3::write_sigs(self.repo, meta, &sigs)?,
                };
                (MapId(0), Some(std::sync::Arc::new(d)))
            }
            None => {
                let body = MapBody {
                    file_size: size,
                    block_size: cfg.block_size,
                    page_entries: cfg.page_entries,
                    extents: st.builder.extents,
                    pages: st.pager.refs,
                };
                let map_id = MapId::random();
                self.added += self.repo.put_map(map_id, &body)?;
                (map_id, None)
            }
        };
        let mut flags = FLAG_HASH_SIZE_LAST;
        if what.is_some() {
            flags |= FLAG_CHANGED_WHILE_READ;
        }
        let version = FileVersion {
            size,
            hash,
            map: map_id,
            dev: source.0,
            ino: source.1,
            ctime_ns: source.2,
            flags,
            data,
        };
        let report = FileReport {
            name: name.to_string(),
            size,
            reused: false,
            had_previous: prev.is_some(),
            stats: st.stats,
            bytes_read: st.read,
            bytes_compressed: st.compressed,
            damaged_sig_pages: prev.map_or(0, |(_, s)| s.damaged_pages()),
            changed_while_read: what,
        };
        Ok((version, report))
    }

    /// Reads, diffs and compresses a group of small files on the pool, then
    /// stores them in order; empties `group`.
    ///
    /// # Errors
    /// As [`Writer::file`] for any of them.
    fn small_files(
        &mut self,
        group: &mut Vec<SmallJob>,
        opts: &BackupOptions,
        progress: &dyn Progress,
        out: &mut Collected,
    ) -> Result<()> {
        if group.is_empty() {
            return Ok(());
        }
        let cfg = self.repo.config().clone();
        let buffers = self.buffers.clone();
        let chunk_size = self.chunk_size(opts);
        let reads: Vec<Result<SmallRead>> = group
            .par_iter()
            .map(|j| {
                let ctx = ChunkCtx {
                    cfg: &cfg,
                    prev: j.prev.as_ref().map(|(_, s)| s),
                    buffers: &buffers,
                    chunk_size,
                };
                read_small(j, &ctx, opts)
            })
            .collect();
        for (j, r) in group.drain(..).zip(reads) {
            let r = r?;
            let display = String::from_utf8_lossy(&j.name).into_owned();
            progress.start(&display, r.size);
            let prev = j.prev.as_ref().map(|(m, s)| (m, s));
            let mut st = FileState::new(&cfg, prev);
            st.pager.no_sig = r.size < crate::tree3::SIG_MIN_SIZE;
            if let Some(c) = &r.chunk {
                self.store_chunk(c, prev, &mut st)?;
                progress.advance(c.len);
            }
            if let Some(c) = r.chunk {
                self.buffers.give(c.compressed);
            }
            if let Some(page) = st.pager.flush() {
                self.store_page(&page, &mut st.pager)?;
            }
            if st.pos != r.size {
                return Err(Error::Internal(format!(
                    "map covers {} of {} bytes",
                    st.pos, r.size
                )));
            }
            let (v, report) =
                self.finish_version(&display, r.size, st, r.source, r.changed, prev)?;
            out.push(j.name, v, report, node_meta(&j.md), &j.path);
        }
        Ok(())
    }

    /// Format 3: the previous version's signature pages are stored blobs,
    /// so pages that did not change are referenced, not written again.
    fn know_signature(&mut self, f: &FileVersion) -> Result<()> {
        match &f.data {
            Some(d) => self.know_data(&d.clone()),
            None => Ok(()),
        }
    }

    /// Format 3: a previous version's signature pages, referenced again
    /// where they did not change.
    fn know_data(&mut self, d: &FileData) -> Result<()> {
        let Some(meta) = &mut self.meta else {
            return Ok(());
        };
        for r in crate::tree3::read_list(self.repo, &d.sigs)? {
            if let SigRef::Blob(b) = r {
                meta.know(b);
            }
        }
        Ok(())
    }

    /// The meta pack writer (format 3 only).
    fn meta3(&mut self) -> Result<&mut MetaWriter> {
        self.meta
            .as_mut()
            .ok_or_else(|| Error::Internal("a tree in a format 2 repository".into()))
    }

    /// Bytes per chunk diffed by one task (whole blocks).
    fn chunk_size(&self, opts: &BackupOptions) -> u64 {
        let bs = self.repo.config().block_size as usize;
        (opts.chunk_size.div_ceil(bs).max(1) * bs) as u64
    }

    /// Stores every chunk `feed` gives: while the pool reads and diffs batch
    /// k+1, this thread appends batch k.
    fn store<'p>(
        &mut self,
        feed: &mut Feed<'_>,
        prev: Option<(&'p FileMap, &'p SigView)>,
        opts: &BackupOptions,
        progress: &dyn Progress,
    ) -> Result<FileState<'p>> {
        let cfg = self.repo.config().clone();
        let bs = cfg.block_size as usize;
        let buffers = self.buffers.clone();
        let ctx = ChunkCtx {
            cfg: &cfg,
            prev: prev.map(|(_, s)| s),
            buffers: &buffers,
            chunk_size: (opts.chunk_size.div_ceil(bs).max(1) * bs) as u64,
        };
        let batch = (rayon::current_num_threads() * 2).max(2) as u64;
        let mut st = FileState::new(&cfg, prev);
        if let Feed::File(f) = feed {
            st.pager.no_sig = f.size < crate::tree3::SIG_MIN_SIZE;
        }
        let mut pending: Vec<Result<ChunkOut>> = Vec::new();
        let mut c0 = 0;
        let mut last = false;
        let result = loop {
            let more = !last;
            let (next, stored) = rayon::join(
                || more.then(|| feed.batch(&ctx, c0, batch)),
                || -> Result<()> {
                    for out in pending.drain(..) {
                        let out = out?;
                        self.store_chunk(&out, prev, &mut st)?;
                        progress.advance(out.len);
                        buffers.give(out.compressed);
                    }
                    Ok(())
                },
            );
            if let Err(e) = stored {
                break Err(e);
            }
            match next {
                None => break Ok(()),
                Some(Err(e)) => break Err(e),
                Some(Ok((outs, is_last))) => {
                    c0 += outs.len() as u64;
                    pending = outs;
                    last = is_last;
                }
            }
        };
        result?;
        if let Some(page) = st.pager.flush() {
            self.store_page(&page, &mut st.pager)?;
        }
        Ok(st)
    }

    /// Appends a chunk's frames, extents, signature pages and hashes.
    fn store_chunk<'p>(
        &mut self,
        out: &ChunkOut,
        prev: Option<(&FileMap, &SigView)>,
        st: &mut FileState<'p>,
    ) -> Result<()> {
        let (pack_id, base) = self.frames(out, st)?;
        for op in &out.ops {
            match *op {
                Op::Hole { len } => st.pos += len,
                Op::Literal { len, at } => {
                    st.builder.push(st.pos, len, pack_id, base + at as u64);
                    st.pos += len;
                }
                Op::Copy { len, from } => {
                    let Some((pm, _)) = prev else {
                        return Err(Error::Internal("copy without a previous version".into()));
                    };
                    pm.resolve(from, len, |p| match p {
                        Piece::Data { len, pack, offset } => {
                            st.builder.push(st.pos, len, pack, offset);
                            st.pos += len;
                        }
                        Piece::Hole { len } => st.pos += len,
                    });
                }
            }
        }
        for e in &out.entries {
            if let Some(page) = st.pager.push(e) {
                self.store_page(&page, &mut st.pager)?;
            }
        }
        st.hasher.update(&out.digests);
        st.stats.add(&out.stats);
        st.read += out.read;
        Ok(())
    }

    /// Stores a full (or last) signature page and records its reference.
    fn store_page(&mut self, page: &[u8], pager: &mut Pager<'_>) -> Result<()> {
        if let Some(meta) = &mut self.meta {
            if pager.no_sig {
                return Ok(());
            }
            // Format 3: a page the previous version had is a known blob.
            let r = if page == &pager.zero_page[..page.len()] {
                SigRef::Zero
            } else {
                SigRef::Blob(meta.put(self.repo.backend(), BlobKind::SigPage, page)?)
            };
            pager.sig_refs.push(r);
            return Ok(());
        }
        let r = self.page_ref(page, pager)?;
        pager.refs.push(r);
        Ok(())
    }

    fn page_ref(&mut self, page: &[u8], pager: &mut Pager<'_>) -> Result<PageRef> {
        if let Some(r) = pager.shared(page) {
            return Ok(r);
        }
        let entries = (page.len() / ENTRY_SIZE) as u32;
        let sum = xxhash_rust::xxh3::xxh3_64(page);
        if page == &pager.zero_page[..page.len()] {
            return Ok(PageRef {
                sig: None,
                slot: 0,
                entries,
                sum,
            });
        }
        let w = self.sig()?;
        let slot = w.append(page)?;
        Ok(PageRef {
            sig: Some(w.id),
            slot,
            entries,
            sum,
        })
    }

    /// Finishes the pack and signature object and makes everything written
    /// durable (the barrier before the manifest's commit).
    fn finish(&mut self) -> Result<u64> {
        self.finish_pack()?;
        if let Some(s) = self.sig.take() {
            self.added += s.finish()?;
        }
        if let Some(m) = &mut self.meta {
            self.added += m.finish()?;
        }
        self.repo.backend().sync()?;
        Ok(self.added)
    }
}

/// Cuts signature entries into pages and recognises pages the previous version
/// already stored.
struct Pager<'a> {
    pe: usize,
    cur: Vec<u8>,
    index: usize,
    refs: Vec<PageRef>,
    /// Format 3's references, in place of `refs`.
    sig_refs: Vec<SigRef>,
    /// Format 3: the file is too small to get a signature; write no pages.
    no_sig: bool,
    prev: Option<(&'a FileMap, &'a SigView)>,
    zero_page: Vec<u8>,
}

impl<'a> Pager<'a> {
    fn new(page_entries: u32, prev: Option<(&'a FileMap, &'a SigView)>, zero: ZeroBlock) -> Self {
        Pager {
            pe: page_entries as usize,
            cur: Vec::with_capacity(page_entries as usize * ENTRY_SIZE),
            index: 0,
            refs: Vec::new(),
            sig_refs: Vec::new(),
            no_sig: false,
            prev,
            zero_page: zero.entry.repeat(page_entries as usize),
        }
    }

    /// Adds an entry; returns a full page when one is complete.
    fn push(&mut self, e: &[u8; ENTRY_SIZE]) -> Option<Vec<u8>> {
        self.cur.extend_from_slice(e);
        if self.cur.len() == self.pe * ENTRY_SIZE {
            self.flush()
        } else {
            None
        }
    }

    fn flush(&mut self) -> Option<Vec<u8>> {
        if self.cur.is_empty() {
            return None;
        }
        let p = std::mem::replace(&mut self.cur, Vec::with_capacity(self.pe * ENTRY_SIZE));
        Some(p)
    }

    /// The previous version's reference for this page index, if its bytes are
    /// the same. Advances the page index.
    fn shared(&mut self, page: &[u8]) -> Option<PageRef> {
        let i = self.index;
        self.index += 1;
        let (map, sig) = self.prev?;
        let r = *map.body.pages.get(i)?;
        if r.entries as usize * ENTRY_SIZE != page.len() {
            return None;
        }
        (sig.page(i)? == page).then_some(r)
    }
}
