//! Restore: writes a stored version to a file, sparse where the version has
//! holes, verifying the whole-file hash as it goes. Chunks are read and hashed
//! in parallel; the output is written under a temporary name and renamed only
//! once the hash matched, so a damaged version never leaves a plausible file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::backup::Progress;
use crate::delta::signature::{digest_many, ZeroBlock};
use crate::error::{Error, IoContext, Result};
use crate::format::snapshot::{FileVersion, Node, NodeKind, Snapshot, ROOT};
use crate::read::VersionReader;
use crate::repo::Repo;

mod tree;
pub use tree::RestoreOptions;

const CHUNK: u64 = 4 << 20;

thread_local! {
    /// One decompressed frame per pool thread, reused across chunks.
    static SCRATCH: std::cell::RefCell<crate::read::Scratch> = std::cell::RefCell::new(crate::read::Scratch::default());
}

/// At most this many files are listed in a [`RestoreReport`] (its memory
/// stays bounded however many files a restore writes).
pub const REPORT_FILES: usize = 1000;

/// What restore wrote.
#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    /// The first [`REPORT_FILES`] files written, and their sizes.
    pub files: Vec<(PathBuf, u64)>,
    /// How many files were written (hard links included).
    pub files_total: u64,
    /// The restored files' sizes.
    pub bytes: u64,
    /// Bytes written to files: `bytes` but for holes, and under `--delta`
    /// only the blocks that differed.
    pub bytes_written: u64,
    /// What could not be restored as stored (a device node without root,
    /// extended attributes the file system refuses), one line each.
    pub warnings: Vec<String>,
}

impl RestoreReport {
    /// Counts a file written to `path` (listed while the list is short).
    pub(crate) fn file(&mut self, path: PathBuf, size: u64) {
        self.files_total += 1;
        if self.files.len() < REPORT_FILES {
            self.files.push((path, size));
        }
    }

    /// Adds what another restore wrote.
    pub(crate) fn add(&mut self, o: RestoreReport) {
        self.bytes += o.bytes;
        self.bytes_written += o.bytes_written;
        self.files_total += o.files_total;
        for (p, n) in o.files {
            if self.files.len() < REPORT_FILES {
                self.files.push((p, n));
            }
        }
        self.warnings.extend(o.warnings);
    }
}

/// The root-level file `name` of `snap`, and its node index.
///
/// # Errors
/// [`Error::NoSuchPath`].
pub fn find_file<'s>(snap: &'s Snapshot, name: &str) -> Result<(u32, &'s Node)> {
    let name = name.trim_start_matches('/');
    snap.nodes
        .iter()
        .enumerate()
        .find(|(_, n)| {
            n.parent == ROOT && n.name == name.as_bytes() && matches!(n.kind, NodeKind::File(_))
        })
        .map(|(i, n)| (i as u32, n))
        .ok_or_else(|| Error::NoSuchPath {
            path: name.to_string(),
            snapshot: snap.id.to_string(),
        })
}

/// Restores `snap`: the file `path` to the file `dest`, or (without `path`)
/// every file into the directory `dest`.
///
/// # Errors
/// [`Error::InvalidInput`] when `dest` exists and `force` is not set;
/// [`Error::Corrupt`] when stored data is damaged or fails verification (the
/// destination is then not created); [`Error::Io`].
pub fn restore(
    repo: &Repo,
    snap: &Snapshot,
    path: Option<&str>,
    dest: &Path,
    force: bool,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let opts = RestoreOptions {
        force,
        ..RestoreOptions::default()
    };
    restore_with(repo, snap, path, dest, &opts, progress)
}

/// Restores `snap` as [`restore`] does, with `opts`: a format 3 snapshot's
/// whole tree, or the file or subtree at `path` (`a/b/c`).
///
/// # Errors
/// As [`restore`]; [`Error::NoSuchPath`].
pub fn restore_with(
    repo: &Repo,
    snap: &Snapshot,
    path: Option<&str>,
    dest: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    // What --delta cannot update in place it replaces.
    let opts = &RestoreOptions {
        force: opts.force || opts.delta,
        ..opts.clone()
    };
    if snap.format < 3 {
        return restore_flat(repo, snap, path, dest, opts, progress);
    }
    let record = repo.load_record(snap.id)?;
    let id = snap.id.to_string();
    let Some(p) = path else {
        refuse_nonempty(dest, opts.force)?;
        let entries = tree::children(repo, &record.root)?;
        return tree::restore_entries(repo, snap.id, b"", entries, None, dest, opts, progress);
    };
    let e = crate::tree3::resolve(repo, &record.root, p.as_bytes())?.ok_or_else(|| {
        Error::NoSuchPath {
            path: p.to_string(),
            snapshot: id.clone(),
        }
    })?;
    match &e.payload {
        crate::format::v3::node::Payload::File(_) => {
            let target = file_target(dest, &e.name);
            let at = p.trim_matches('/').as_bytes();
            let open = |path: &Path| tree::open_entry(repo, (&id, snap.id, at), &e, path);
            tree::restore_one(repo, snap.id, &e, &open, &target, opts, progress)
        }
        crate::format::v3::node::Payload::Dir(list) if !dest.is_dir() => {
            let entries = tree::children(repo, list)?;
            tree::restore_entries(
                repo,
                snap.id,
                p.as_bytes(),
                entries,
                Some(&e),
                dest,
                opts,
                progress,
            )
        }
        _ => {
            let parent = p
                .trim_end_matches('/')
                .rsplit_once('/')
                .map_or("", |(a, _)| a);
            let entries = vec![e.clone()];
            tree::restore_entries(
                repo,
                snap.id,
                parent.as_bytes(),
                entries,
                None,
                dest,
                opts,
                progress,
            )
        }
    }
}

/// A reader of the file at `path` in `snap` (`a/b/c`; format 2: a
/// root-level name), following the snapshot's record if a prune replaced
/// it.
///
/// # Errors
/// [`Error::NoSuchPath`] when `path` is not a file of `snap`; as
/// [`VersionReader::open`].
pub fn open_path(repo: &Repo, snap: &Snapshot, path: &str) -> Result<VersionReader> {
    if snap.format < 3 {
        let (node, _) = find_file(snap, path)?;
        return VersionReader::open_node(repo, snap, node);
    }
    let missing = || Error::NoSuchPath {
        path: path.to_string(),
        snapshot: snap.id.to_string(),
    };
    let at = path.trim_matches('/');
    let record = repo.load_record(snap.id)?;
    let e = crate::tree3::resolve(repo, &record.root, at.as_bytes())?.ok_or_else(missing)?;
    if !matches!(e.payload, crate::format::v3::node::Payload::File(_)) {
        return Err(Error::InvalidInput(format!(
            "{path} in snapshot {} is not a regular file",
            snap.id
        )));
    }
    if !e.error.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{path} in snapshot {} was not stored: {}",
            snap.id, e.error
        )));
    }
    let id = snap.id.to_string();
    tree::open_entry(repo, (&id, snap.id, at.as_bytes()), &e, Path::new(at))
}

/// Refuses a destination directory that exists and is not empty, unless
/// `force`.
fn refuse_nonempty(dest: &Path, force: bool) -> Result<()> {
    if dest.exists()
        && !force
        && std::fs::read_dir(dest)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::InvalidInput(format!(
            "{} exists; restore into a new or empty directory, or pass --force",
            dest.display()
        )));
    }
    Ok(())
}

/// Where a file named `name` is restored: into `dest` when it is a
/// directory, else as `dest`.
fn file_target(dest: &Path, name: &[u8]) -> PathBuf {
    match dest.is_dir() {
        true => dest.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name)),
        false => dest.to_path_buf(),
    }
}

/// Format 2: root-level files only, each as [`tree::restore_one`] writes it.
fn restore_flat(
    repo: &Repo,
    snap: &Snapshot,
    path: Option<&str>,
    dest: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let mut jobs = Vec::new();
    match path {
        Some(p) => {
            let (i, node) = find_file(snap, p)?;
            jobs.push((i, node, file_target(dest, &node.name)));
        }
        None => {
            refuse_nonempty(dest, opts.force)?;
            std::fs::create_dir_all(dest).at(dest)?;
            for (i, n) in snap.nodes.iter().enumerate() {
                if n.parent == ROOT && matches!(n.kind, NodeKind::File(_)) {
                    jobs.push((i as u32, n, file_target(dest, &n.name)));
                }
            }
        }
    }
    for (_, _, target) in &jobs {
        if std::fs::symlink_metadata(target).is_ok() && !opts.force {
            return Err(Error::InvalidInput(format!(
                "{} exists; pass --force to overwrite it",
                target.display()
            )));
        }
    }
    let mut report = RestoreReport::default();
    for (i, node, target) in jobs {
        // The node's attributes as an entry (its version is opened from
        // the node itself, so the entry carries none).
        let attrs = Node {
            kind: NodeKind::Dir,
            ..node.clone()
        };
        let entry = crate::tree3::entry_of(&attrs)?;
        let open = |_: &Path| VersionReader::open_node(repo, snap, i);
        let r = tree::restore_one(repo, snap.id, &entry, &open, &target, opts, progress)?;
        report.add(r);
    }
    Ok(report)
}

/// Reads every byte of a version without writing it anywhere and checks its
/// whole-file hash (`dsync check --read-data`).
///
/// # Errors
/// [`Error::Corrupt`] naming what is damaged; [`Error::Io`].
pub fn verify_version(
    repo: &Repo,
    f: &FileVersion,
    what: &str,
    progress: &dyn Progress,
) -> Result<()> {
    let reader = VersionReader::open(repo, f, what)?;
    write_verified(
        &reader,
        f,
        what,
        Out::None,
        repo.config().block_size,
        progress,
    )
    .map(|_| ())
}

/// Where [`write_verified`] puts the bytes it reads.
#[derive(Clone, Copy)]
enum Out<'a> {
    /// Nowhere: read and verify only.
    None,
    /// A new, empty file: the stored ranges are written, holes stay holes.
    New(&'a File, &'a Path),
    /// An existing file brought to the version in place: only the blocks
    /// whose bytes differ are written, and a hole where the file has data
    /// is punched (`--delta`).
    Delta(&'a File, &'a Path),
}

/// Reads a version chunk by chunk in parallel, writes it to `out`, and
/// checks the whole-file hash. Returns the bytes written.
fn write_verified(
    reader: &VersionReader,
    f: &FileVersion,
    what: &str,
    out: Out<'_>,
    block_size: u32,
    progress: &dyn Progress,
) -> Result<u64> {
    let size = f.size;
    match out {
        Out::New(file, path) | Out::Delta(file, path) => file.set_len(size).at(path)?,
        Out::None => {}
    }
    let bs = block_size as u64;
    let zero = ZeroBlock::new(block_size);
    let mut hasher = f.hasher(block_size);
    let nchunks = size.div_ceil(CHUNK);
    let written = std::sync::atomic::AtomicU64::new(0);
    // Each chunk in flight holds a buffer only while a thread works on it and
    // leaves 32 bytes per block behind, so a large batch costs little memory
    // and keeps both threads busy when data and holes alternate.
    //
    // Each batch is announced to the backend (`will_read`) while the one
    // before it is read: over the network its frames then cross in large
    // requests in flight together, not one round trip per frame.
    let batch = 8u64;
    let buffers = crate::pipeline::Buffers::default();
    reader.will_read(0, batch * CHUNK);
    let mut c0 = 0;
    while c0 < nchunks {
        let c1 = (c0 + batch).min(nchunks);
        reader.will_read(c1 * CHUNK, batch * CHUNK);
        let chunk = |c: u64| -> Result<Vec<[u8; 32]>> {
            let off = c * CHUNK;
            let len = (size - off).min(CHUNK);
            // The stored ranges of this chunk, from one walk of the map.
            let mut pos = off;
            let mut writes = Vec::new();
            let mut holes = Vec::new();
            reader.map().resolve(off, len, |p| match p {
                crate::map::Piece::Data { len: n, .. } => {
                    writes.push((pos, n));
                    pos += n;
                }
                crate::map::Piece::Hole { len: n } => {
                    holes.push((pos, n));
                    pos += n;
                }
            });
            if let Out::Delta(file, path) = out {
                let n = clear_holes(file, path, &holes, &buffers)?;
                written.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
            if writes.is_empty() {
                progress.advance(len);
                let blocks = len.div_ceil(bs) as usize;
                let mut d = vec![zero.digest; blocks];
                if !len.is_multiple_of(bs) {
                    if let Some(last) = d.last_mut() {
                        *last =
                            crate::delta::signature::block_digest(&vec![0u8; (len % bs) as usize]);
                    }
                }
                return Ok(d);
            }
            let mut buf = buffers.take(len as usize);
            SCRATCH.with(|sc| reader.read_at_with(off, &mut buf, &mut sc.borrow_mut()))?;
            // Write the stored ranges; holes stay holes.
            let mut hole_block = vec![true; len.div_ceil(bs) as usize];
            for (s, n) in writes {
                let a = (s - off) as usize;
                let data = &buf[a..a + n as usize];
                let n_written = match out {
                    Out::New(file, path) => {
                        file.write_all_at(data, s).at(path)?;
                        n
                    }
                    Out::Delta(file, path) => write_changed(file, path, data, s, bs, &buffers)?,
                    Out::None => 0,
                };
                written.fetch_add(n_written, std::sync::atomic::Ordering::Relaxed);
                let b0 = ((s - off) / bs) as usize;
                let b1 = ((s - off + n).div_ceil(bs)) as usize;
                hole_block[b0..b1].fill(false);
            }
            let blocks: Vec<&[u8]> = buf.chunks(bs as usize).collect();
            let mut need: Vec<&[u8]> = Vec::new();
            for (i, b) in blocks.iter().enumerate() {
                if !hole_block[i] || b.len() != bs as usize {
                    need.push(b);
                }
            }
            let mut d = Vec::with_capacity(need.len());
            digest_many(&need, &mut d);
            let mut it = d.into_iter();
            let mut digests = Vec::with_capacity(blocks.len());
            for (i, b) in blocks.iter().enumerate() {
                if !hole_block[i] || b.len() != bs as usize {
                    digests.push(it.next().unwrap_or(zero.digest));
                } else {
                    digests.push(zero.digest);
                }
            }
            progress.advance(len);
            buffers.give(buf);
            Ok(digests)
        };
        // One chunk (most files) is read on the calling thread.
        let parts: Vec<Result<Vec<[u8; 32]>>> = match c1 - c0 {
            1 => vec![chunk(c0)],
            _ => (c0..c1).into_par_iter().map(chunk).collect(),
        };
        for p in parts {
            hasher.update(&p?);
        }
        c0 = c1;
    }
    if hasher.finish(f.size) != f.hash {
        return Err(Error::corrupt(
            what.to_string(),
            0,
            "restored bytes do not match the stored BLAKE2 hash of the file",
        ));
    }
    Ok(written.into_inner())
}

/// Writes the blocks of `data` (at `at` in `file`) whose bytes differ from
/// the file's; returns the bytes written.
fn write_changed(
    file: &File,
    path: &Path,
    data: &[u8],
    at: u64,
    bs: u64,
    buffers: &crate::pipeline::Buffers,
) -> Result<u64> {
    let mut have = buffers.take(data.len());
    read_full_at(file, path, &mut have, at)?;
    let mut written = 0;
    let mut i = 0;
    let bs = bs as usize;
    while i < data.len() {
        // A run of differing blocks, written at once.
        let mut j = i;
        while j < data.len()
            && data[j..(j + bs).min(data.len())] != have[j..(j + bs).min(data.len())]
        {
            j = (j + bs).min(data.len());
        }
        if j > i {
            file.write_all_at(&data[i..j], at + i as u64).at(path)?;
            written += (j - i) as u64;
            i = j;
        } else {
            i = (i + bs).min(data.len());
        }
    }
    buffers.give(have);
    Ok(written)
}

/// Makes the `holes` (offset, length) of `file` read as zeros: a range
/// that holds data is punched (written with zeros where the file system
/// cannot punch). Returns the bytes written.
fn clear_holes(
    file: &File,
    path: &Path,
    holes: &[(u64, u64)],
    buffers: &crate::pipeline::Buffers,
) -> Result<u64> {
    let mut cleared = 0;
    for &(at, n) in holes {
        let mut have = buffers.take(n as usize);
        read_full_at(file, path, &mut have, at)?;
        let dirty = have.iter().any(|&b| b != 0);
        buffers.give(have);
        if !dirty {
            continue;
        }
        let punched = rustix::fs::fallocate(
            file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            at,
            n,
        );
        if punched.is_err() {
            file.write_all_at(&vec![0u8; n as usize], at).at(path)?;
            cleared += n;
        }
    }
    Ok(cleared)
}

/// Fills `buf` from `file` at `at` (zeros past its end).
fn read_full_at(file: &File, path: &Path, buf: &mut [u8], at: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(())
}

/// Writes the root-level file `path` of `snap` to `w` sequentially (for
/// `dsync cat`), verifying the whole-file hash at the end.
///
/// # Errors
/// [`Error::NoSuchPath`]; as [`restore`]; a write error on `w` as
/// [`Error::Io`] on "standard output".
pub fn cat(repo: &Repo, snap: &Snapshot, path: &str, w: &mut dyn std::io::Write) -> Result<()> {
    let reader = open_path(repo, snap, path)?;
    let (f, what) = (reader.file(), reader.what());
    let bs = repo.config().block_size;
    let mut hasher = f.hasher(bs);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut scratch = crate::read::Scratch::default();
    // Announced AHEAD bytes ahead of the reads (see `write_verified`).
    const AHEAD: u64 = 16 * CHUNK;
    reader.will_read(0, AHEAD);
    let mut off = 0;
    while off < f.size {
        if off % AHEAD == 0 {
            reader.will_read(off + AHEAD, AHEAD);
        }
        let n = reader.read_at_with(off, &mut buf, &mut scratch)?;
        let blocks: Vec<&[u8]> = buf[..n].chunks(bs as usize).collect();
        let mut d = Vec::with_capacity(blocks.len());
        digest_many(&blocks, &mut d);
        hasher.update(&d);
        w.write_all(&buf[..n])
            .map_err(|e| Error::io("standard output", e))?;
        off += n as u64;
    }
    w.flush().map_err(|e| Error::io("standard output", e))?;
    if hasher.finish(f.size) != f.hash {
        return Err(Error::corrupt(
            what.to_string(),
            0,
            "bytes do not match the stored BLAKE2 hash of the file",
        ));
    }
    Ok(())
}
