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

use rayon::prelude::*;
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

/// Restores `entries` (a snapshot's root list, or one directory entry)
/// into the directory `dest`; `top`, the directory whose entries these are
/// when `dest` stands for it, gives `dest` its attributes.
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
    let name = snap.to_string();
    let mut r = Restorer {
        repo,
        snap: &name,
        id: snap,
        opts,
        progress,
        owners: Owners::default(),
        root: rustix_is_root(),
        dest: fd.try_clone().at(dest)?,
        base: Vec::new(),
        links: HashMap::new(),
        packs: HashMap::new(),
        report: RestoreReport::default(),
    };
    let base: Vec<Vec<u8>> = base
        .split(|&c| c == b'/')
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    r.base = base;
    r.entries(fd.as_fd(), dest, &[], entries)?;
    if let Some(top) = top {
        r.attrs(Some(fd.as_fd()), fd.as_fd(), top, dest)?;
    }
    Ok(r.report)
}

/// Reads a directory entry's list whole (one directory's worth).
pub(super) fn children(repo: &Repo, list: &List<Entry>) -> Result<Vec<Entry>> {
    crate::tree3::read_list(repo, list)
}

fn rustix_is_root() -> bool {
    rustix::process::geteuid().is_root()
}

struct Restorer<'a> {
    repo: &'a Repo,
    snap: &'a str,
    id: crate::id::SnapshotId,
    /// The snapshot path of the directory restored into the destination.
    base: Vec<Vec<u8>>,
    opts: &'a RestoreOptions,
    progress: &'a dyn Progress,
    owners: Owners,
    root: bool,
    /// The destination directory, where link paths start.
    dest: OwnedFd,
    /// Link group → the first file's path, as names under the destination.
    links: HashMap<u64, Vec<Vec<u8>>>,
    /// The packs read so far, kept open until the restore ends: the next
    /// file is most likely in one of them.
    packs: HashMap<crate::id::PackId, std::sync::Arc<crate::pack::PackReader>>,
    report: RestoreReport,
}

impl Restorer<'_> {
    /// Creates the nodes of one directory under `dir` (at `path`, the
    /// names `rel` under the destination).
    fn entries(
        &mut self,
        dir: BorrowedFd<'_>,
        path: &Path,
        rel: &[Vec<u8>],
        entries: Vec<Entry>,
    ) -> Result<()> {
        let mut files = Vec::new();
        let mut later = Vec::new();
        let mut dirs = Vec::new();
        for e in entries {
            let child =
                path.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&e.name));
            match &e.payload {
                Payload::File(_) if !e.error.is_empty() => self.report.warnings.push(format!(
                    "{}: not restored: it could not be read when backed up ({})",
                    child.display(),
                    e.error
                )),
                Payload::File(_) if e.link_group != 0 && self.links.contains_key(&e.link_group) => {
                    later.push(e)
                }
                Payload::File(_) => {
                    if e.link_group != 0 {
                        let mut p = rel.to_vec();
                        p.push(e.name.clone());
                        self.links.insert(e.link_group, p);
                    }
                    let update = self.updatable(dir, &e.name);
                    if !update {
                        self.clear(dir, &e.name, &child, false)?;
                    }
                    let mut at = self.base.clone();
                    at.extend(rel.iter().cloned());
                    at.push(e.name.clone());
                    files.push((e, child, at.join(&b'/'), update));
                }
                // Subdirectories after this directory's files and links:
                // a link group's first name is then written before any
                // other name links to it.
                Payload::Dir(_) => dirs.push((e, child)),
                Payload::Symlink(target) => {
                    self.clear(dir, &e.name, &child, false)?;
                    rustix::fs::symlinkat(target.as_slice(), dir, e.name.as_slice())
                        .map_err(|err| Error::io(&child, err.into()))?;
                    self.attrs(None, dir, &e, &child)?;
                }
                Payload::CharDevice(rdev) | Payload::BlockDevice(rdev) => {
                    self.special(dir, &e, &child, *rdev)?
                }
                Payload::Fifo | Payload::Socket => self.special(dir, &e, &child, 0)?,
            }
        }
        self.files(dir, files)?;
        for e in later {
            let child =
                path.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&e.name));
            self.clear(dir, &e.name, &child, false)?;
            self.link(dir, &e, &child)?;
        }
        for (e, child) in dirs {
            let Payload::Dir(list) = &e.payload else {
                continue;
            };
            let made = match rustix::fs::mkdirat(dir, e.name.as_slice(), Mode::from_raw_mode(0o700))
            {
                Err(rustix::io::Errno::EXIST) if self.opts.force => {
                    self.clear(dir, &e.name, &child, true)
                }
                r => r.map_err(|err| Error::io(&child, err.into())),
            };
            made?;
            // What --force cleared (a planted symlink) is made a directory.
            match rustix::fs::mkdirat(dir, e.name.as_slice(), Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(err) => return Err(Error::io(&child, err.into())),
            }
            let fd = source::open_dir(Some(dir), &e.name).at(&child)?;
            let kids = children(self.repo, list)?;
            let mut rel2 = rel.to_vec();
            rel2.push(e.name.clone());
            self.entries(fd.as_fd(), &child, &rel2, kids)?;
            self.attrs(Some(fd.as_fd()), dir, &e, &child)?;
        }
        Ok(())
    }

    /// Makes room for `name` under `--force` (a directory that stays a
    /// directory is kept; anything else is removed); without it, refuses.
    fn clear(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: &Path,
        keep_dir: bool,
    ) -> Result<()> {
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

    /// Writes a directory's files, several at a time, each verified.
    fn files(&mut self, dir: BorrowedFd<'_>, files: Vec<FileJob>) -> Result<()> {
        let repo = self.repo;
        let snap = self.snap;
        let id = self.id;
        let progress = self.progress;
        type Out = (
            Entry,
            PathBuf,
            Written,
            Vec<std::sync::Arc<crate::pack::PackReader>>,
        );
        let written: Vec<Result<Out>> = files
            .into_par_iter()
            .map(|(e, path, at, update)| {
                let reader = open_entry(repo, (snap, id, &at), &e, &path);
                let packs = match &reader {
                    Ok(r) => r.packs().cloned().collect(),
                    Err(_) => Vec::new(),
                };
                let w = write_file(repo, reader, dir, &e.name, &path, update, progress)?;
                Ok((e, path, w, packs))
            })
            .collect();
        for w in written {
            let (e, path, w, packs) = w?;
            for p in packs {
                self.packs.entry(p.id).or_insert(p);
            }
            let (fd, n) = (w.fd, w.written);
            self.attrs(Some(fd.as_fd()), dir, &e, &path)?;
            self.report.bytes_written += n;
            if let Payload::File(d) = &e.payload {
                self.report.bytes += d.size;
                self.report.files.push((path, d.size));
            }
        }
        Ok(())
    }

    /// Under `--delta`, whether the node `name` in `dir` is a regular file
    /// with no other name, to be brought to the version in place.
    fn updatable(&self, dir: BorrowedFd<'_>, name: &[u8]) -> bool {
        self.opts.delta && source::stat_at(dir, name).is_ok_and(|st| st.is_file() && st.nlink == 1)
    }

    /// A hard link to the group's first file.
    fn link(&mut self, dir: BorrowedFd<'_>, e: &Entry, path: &Path) -> Result<()> {
        let Some(first) = self.links.get(&e.link_group) else {
            return Err(Error::Internal("a hard link before its group".into()));
        };
        let (name, parents) = first
            .split_last()
            .ok_or_else(|| Error::Internal("an empty link path".into()))?;
        // The first file's directory, opened name by name without following
        // a symlink (restore made them all).
        let root = self.dest.as_fd();
        let mut cur: Option<OwnedFd> = None;
        for p in parents {
            let next = {
                let at = cur.as_ref().map_or(root, |f| f.as_fd());
                source::open_dir(Some(at), p).at(path)?
            };
            cur = Some(next);
        }
        let from = cur.as_ref().map_or(root, |f| f.as_fd());
        rustix::fs::linkat(
            from,
            name.as_slice(),
            dir,
            e.name.as_slice(),
            AtFlags::empty(),
        )
        .map_err(|err| Error::io(path, err.into()))?;
        if let Payload::File(d) = &e.payload {
            self.report.files.push((path.to_path_buf(), d.size));
        }
        Ok(())
    }

    /// Devices, fifos and sockets (a socket as a node, not a live one).
    fn special(&mut self, dir: BorrowedFd<'_>, e: &Entry, path: &Path, rdev: u64) -> Result<()> {
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
                self.report.warnings.push(format!(
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
        &mut self,
        fd: Option<BorrowedFd<'_>>,
        dir: BorrowedFd<'_>,
        e: &Entry,
        path: &Path,
    ) -> Result<()> {
        let is_link = matches!(e.payload, Payload::Symlink(_));
        if self.root {
            let uid = match self.opts.numeric_ids {
                true => e.uid,
                false => self.owners.uid(&e.user).unwrap_or(e.uid),
            };
            let gid = match self.opts.numeric_ids {
                true => e.gid,
                false => self.owners.gid(&e.group).unwrap_or(e.gid),
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
                self.report.warnings.push(format!(
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

/// A file to restore: its entry, its path on the destination, its path in
/// the snapshot, and whether it is updated in place (`--delta`).
type FileJob = (Entry, PathBuf, Vec<u8>, bool);

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
    let mut r = Restorer {
        repo,
        snap: &label,
        id: snap,
        opts,
        progress,
        owners: Owners::default(),
        root: rustix_is_root(),
        dest: dir.try_clone().at(parent)?,
        base: Vec::new(),
        links: HashMap::new(),
        packs: HashMap::new(),
        report: RestoreReport::default(),
    };
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
        r.report.bytes_written += w.written;
        r.report.bytes += w.size;
        r.report.files.push((target.to_path_buf(), w.size));
        return Ok(r.report);
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
    let size = w.size;
    r.report.bytes_written += w.written;
    r.report.bytes += size;
    r.report.files.push((target.to_path_buf(), size));
    Ok(r.report)
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
