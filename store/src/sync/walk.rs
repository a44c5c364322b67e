//! The walk: SRC in name order (subtrees in parallel), each node compared
//! with what DST has, the decisions itemized; regular files go to the
//! workers ([`super::transfer`]), the rest is done here. Deletions,
//! hard links and directories' attributes wait for the end
//! ([`Walker::finish`]).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::attrs::{proc_path, Target, Xattrs};
use super::src::SrcDir;
use super::transfer::{temp_name, Job};
use super::{ends_with_slash, filter, join, show, Shared};
use crate::error::{Error, Result};
use crate::source::{self, Stat, XattrSource};

/// A directory whose attributes are set once everything in it is written.
pub(super) struct DirFix {
    pub(super) rel: Vec<u8>,
    pub(super) st: Stat,
    pub(super) xattrs: Option<Xattrs>,
    pub(super) new: bool,
}

/// A hard link made at the end (its first name may still be in flight).
pub(super) struct LaterLink {
    pub(super) first: Vec<u8>,
    pub(super) rel: Vec<u8>,
}

/// A node's place on both sides: `sname` in SRC's `sdir`, `dname` in
/// DST's `ddir` (none in a dry run under a directory not made), and its
/// path from the transfer's root (for items and messages).
#[derive(Clone, Copy)]
pub(super) struct At<'w> {
    sdir: &'w SrcDir,
    sname: &'w [u8],
    ddir: Option<&'w Arc<OwnedFd>>,
    dname: &'w [u8],
    rel: &'w [u8],
}

impl<'w> At<'w> {
    fn new(
        sdir: &'w SrcDir,
        sname: &'w [u8],
        ddir: Option<&'w Arc<OwnedFd>>,
        dname: &'w [u8],
        rel: &'w [u8],
    ) -> At<'w> {
        At {
            sdir,
            sname,
            ddir,
            dname,
            rel,
        }
    }
}

/// Walks SRC in name order, deciding what each node needs; regular files go
/// to the workers.
pub(super) struct Walker<'s, 'a> {
    pub(super) s: &'s Shared<'a>,
    pub(super) matcher: Option<&'s filter::Matcher>,
    pub(super) tx: Option<std::sync::mpsc::SyncSender<Job>>,
    /// (dev, ino) of SRC files with several names → the first's path, and
    /// whether it was written this run.
    pub(super) links: HashMap<(u64, u64), (Vec<u8>, bool)>,
    pub(super) dirs: Vec<DirFix>,
    pub(super) later_links: Vec<LaterLink>,
    /// Names in DST that SRC has not, deleted at the end.
    pub(super) deletions: Vec<Vec<u8>>,
    pub(super) src_errors: u64,
    /// DST's directory (none in a dry run that would create it).
    pub(super) root: Option<Arc<OwnedFd>>,
    /// Changes made (or queued) in DST's directory being walked, among
    /// its own entries: a directory whose count moved while its entries
    /// were done gets its attributes set again (what is written in a
    /// subdirectory moves that one's mtime, not its parent's).
    pub(super) changes: u64,
    /// Subdirectories opened and listed ahead, by path.
    pub(super) prefetched: HashMap<Vec<u8>, Prefetched>,
}

/// A directory's names (sorted) and each name's SRC and DST lstat.
pub(super) type Listing = (Vec<(Vec<u8>, u64)>, Vec<Pair>);

/// A subdirectory listed ahead: its SRC and DST descriptors and listing.
pub(super) type Prefetched = (SrcDir, Option<Arc<OwnedFd>>, Listing);

/// An entry of a directory being synced: name, SRC lstat, DST lstat.
pub(super) type Kept = (Vec<u8>, Stat, io::Result<Option<Stat>>);

/// Subdirectories listed ahead at once.
pub(super) const PREFETCH: usize = 32;

/// The node DST has at a name.
pub(super) fn dst_stat(dir: Option<&Arc<OwnedFd>>, name: &[u8]) -> io::Result<Option<Stat>> {
    let Some(dir) = dir else { return Ok(None) };
    match source::stat_at(dir.as_fd(), name) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A name's lstat in SRC and in DST.
pub(super) type Pair = (io::Result<Stat>, io::Result<Option<Stat>>);

impl<'s, 'a> Walker<'s, 'a> {
    fn send(&self, mut j: Job) -> Result<()> {
        let gone = || Error::Internal("the sync workers stopped".into());
        let tx = self.tx.as_ref().ok_or_else(gone)?;
        // On a pool thread (a subtree walked in parallel), never block: a
        // worker may be waiting for the pool (a big file's plan).
        if rayon::current_thread_index().is_none() {
            return tx.send(j).map_err(|_| gone());
        }
        // A full queue holds a hundred jobs and more: waking every 100 µs
        // to find it still full cost a first copy of 75k files 50k
        // wakeups on the workers' cores; the naps grow to 2 ms.
        let mut nap = std::time::Duration::from_micros(100);
        loop {
            match tx.try_send(j) {
                Ok(()) => return Ok(()),
                Err(std::sync::mpsc::TrySendError::Full(back)) => {
                    j = back;
                    if !matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                        std::thread::sleep(nap);
                        nap = (nap * 2).min(std::time::Duration::from_millis(2));
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
    pub(super) fn top(
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
            let sdir = SrcDir::Local(sdir);
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
        let sdir = SrcDir::Local(sdir);
        self.node(At::new(&sdir, &name, dst_root, &dname, &rel), st, old)
    }

    /// One SRC argument that a remote sender listed.
    pub(super) fn top_remote(
        &mut self,
        peer: &Arc<super::remote::Peer>,
        arg: u32,
        top: &super::remote::Top,
        dst_root: Option<&Arc<OwnedFd>>,
        file_name: Option<&[u8]>,
        created_root: bool,
    ) -> Result<()> {
        let e = match &top.entry {
            Ok(e) => e,
            Err(m) => {
                self.src_error(format!("{}: {m}", show(&top.shown)));
                return Ok(());
            }
        };
        // The argument's root: the directory itself, or a parent that
        // holds only it.
        let root = super::remote::Dir {
            peer: peer.clone(),
            arg,
            rel: Vec::new(),
            entries: Arc::new(if top.contents {
                Vec::new()
            } else {
                vec![e.clone()]
            }),
            own_xattrs: e.xattrs.clone(),
        };
        if top.contents {
            let sdir = match root.peer_listing() {
                Ok(d) => SrcDir::Remote(Arc::new(d)),
                Err(x) => {
                    self.src_error(format!("{}: cannot read directory: {x}", show(&top.shown)));
                    return Ok(());
                }
            };
            return self.dir_contents(&sdir, dst_root, b"", e.st, created_root, true, None);
        }
        let name = e.name.clone();
        let dname = file_name.map_or_else(|| name.clone(), <[u8]>::to_vec);
        let rel = dname.clone();
        let old = dst_stat(dst_root, &dname);
        let sdir = SrcDir::Remote(Arc::new(root));
        self.node(At::new(&sdir, &name, dst_root, &dname, &rel), e.st, old)
    }

    /// A node of SRC and what DST has for it.
    fn node(&mut self, at: At<'_>, st: Stat, old: io::Result<Option<Stat>>) -> Result<()> {
        let rel = at.rel;
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
                self.dir(at, st, old)
            }
            libc::S_IFREG => self.file(at, st, old),
            libc::S_IFLNK if o.links => self.symlink(at, st, old),
            libc::S_IFCHR | libc::S_IFBLK if o.devices && s.root => self.special(at, st, old),
            libc::S_IFIFO | libc::S_IFSOCK if o.specials => self.special(at, st, old),
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

    fn file(&mut self, at: At<'_>, st: Stat, old: Option<Stat>) -> Result<()> {
        let At {
            sdir,
            sname,
            ddir,
            dname,
            rel,
        } = at;
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
                    self.send(
                        Job {
                            sdir: sdir.clone(),
                            sname: sname.to_vec(),
                            ddir: d.clone(),
                            dname: dname.to_vec(),
                            rel: rel.to_vec(),
                            st,
                            old: old.filter(|d| d.file_type() == libc::S_IFREG),
                            ahead: Default::default(),
                        }
                        .ask_ahead(o),
                    )?
                }
                _ => s.ev.advance(st.size),
            }
            return Ok(());
        }
        // Same contents: attributes only.
        if let (Some(d), Some(old)) = (ddir, old) {
            self.same_attrs(at, d, &st, &old, 'f')?;
        }
        s.ev.advance(st.size);
        Ok(())
    }

    /// The quick check (or `-c`'s contents check).
    fn same_file(
        &mut self,
        sdir: &SrcDir,
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
            let theirs = source::open_file(ddir.as_fd(), dname).and_then(|f| hash_file(&f));
            return match (sdir.hash(sname), theirs) {
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
        sdir: &SrcDir,
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
        let a = sdir.xattrs(s, Some(sname));
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
    fn same_attrs(
        &mut self,
        at: At<'_>,
        ddir: &Arc<OwnedFd>,
        st: &Stat,
        old: &Stat,
        kind: char,
    ) -> Result<()> {
        let At {
            sdir,
            sname,
            dname,
            rel,
            ..
        } = at;
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
        let xattrs = match sdir.xattrs(s, Some(sname)) {
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

    fn dir(&mut self, at: At<'_>, st: Stat, old: Option<Stat>) -> Result<()> {
        let At {
            sdir,
            sname,
            ddir,
            dname,
            rel,
        } = at;
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
        let src = match pre_src.map_or_else(|| sdir.open(sname), Ok) {
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
        src: &SrcDir,
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
            let x = match (src.xattrs(s, None), s.xattrs_of(XattrSource::Fd(d.as_fd()))) {
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
            let xattrs = match src.xattrs(s, None) {
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
        // What changed within is this directory's own (noted above); its
        // parent changed only if it is new.
        self.changes = changes + u64::from(new);
        Ok(())
    }

    /// A directory's entries, in name order (`listing`: already read).
    fn entries(
        &mut self,
        src: &SrcDir,
        dst: Option<&Arc<OwnedFd>>,
        rel: &[u8],
        top: bool,
        listing: Option<Listing>,
    ) -> Result<()> {
        let s = self.s;
        let listing = match listing {
            Some(l) => Ok(l),
            None => src.list(dst),
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
            self.node(At::new(src, name, dst, name, &child), *st, old)?;
        }
        Ok(())
    }

    /// A directory's entries: its other nodes here, in name order, then its
    /// subdirectories each by its own walker on the pool.
    fn entries_parallel(
        &mut self,
        src: &SrcDir,
        dst: Option<&Arc<OwnedFd>>,
        rel: &[u8],
        kept: Vec<Kept>,
    ) -> Result<()> {
        let (dirs, others): (Vec<Kept>, Vec<Kept>) = kept.into_iter().partition(|k| k.1.is_dir());
        for (name, st, old) in others {
            let child = join(rel, &name);
            self.node(At::new(src, &name, dst, &name, &child), st, old)?;
        }
        let walked: Vec<Result<Walker<'s, 'a>>> = dirs
            .into_par_iter()
            .map(|(name, st, old)| {
                let mut w = self.child();
                let child = join(rel, &name);
                w.node(At::new(src, &name, dst, &name, &child), st, old)?;
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
        src: &SrcDir,
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
                let Ok(sfd) = src.open(name) else {
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
                let l = sfd.list(dfd.as_ref()).ok();
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

    fn symlink(&mut self, at: At<'_>, st: Stat, old: Option<Stat>) -> Result<()> {
        let At {
            sdir,
            sname,
            ddir,
            dname,
            rel,
        } = at;
        let s = self.s;
        let target = match sdir.read_link(sname) {
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
                self.same_attrs(at, d, &st, o, 'L')?;
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
        sdir: &SrcDir,
        sname: &[u8],
        d: &Arc<OwnedFd>,
        tmp: &[u8],
        dname: &[u8],
        st: &Stat,
    ) -> io::Result<()> {
        let s = self.s;
        // Symlinks too (root may give one `trusted.*` attributes).
        let xattrs = sdir.xattrs(s, Some(sname))?;
        s.attrs(Target::At(d.as_fd(), tmp), st, xattrs.as_ref(), true)?;
        rustix::fs::renameat(d.as_fd(), tmp, d.as_fd(), dname)?;
        s.count(|r| r.created += 1);
        Ok(())
    }

    fn special(&mut self, at: At<'_>, st: Stat, old: Option<Stat>) -> Result<()> {
        let At {
            sdir,
            sname,
            ddir,
            dname,
            rel,
        } = at;
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
                self.same_attrs(at, d, &st, o, kind)?;
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
    pub(super) fn finish(&mut self) {
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
        let mut chain = Chain::default();
        for d in std::mem::take(&mut self.dirs) {
            let r = match root {
                Some(root) if d.rel.is_empty() => {
                    s.attrs(Target::Fd(root.as_fd()), &d.st, d.xattrs.as_ref(), d.new)
                }
                Some(root) => match chain.parent(root.as_fd(), &d.rel) {
                    Some((dir, name)) => {
                        s.attrs(Target::At(dir, name), &d.st, d.xattrs.as_ref(), d.new)
                    }
                    None => Err(io::ErrorKind::NotFound.into()),
                },
                None => Ok(()),
            };
            if let Err(e) = r {
                s.error(format!("{}: attributes not set: {e}", show(&d.rel)));
            }
        }
    }
}

/// DST's directories along the path last reopened from its root, name by
/// name (never through a symlink), kept for the next path: the end's
/// passes go in walk order, so neighbours share most of their path.
#[derive(Default)]
struct Chain {
    open: Vec<(Vec<u8>, OwnedFd)>,
}

impl Chain {
    /// The directory holding `rel` (`root` when it has no parent), and
    /// `rel`'s last name.
    fn parent<'c, 'r>(
        &'c mut self,
        root: BorrowedFd<'c>,
        rel: &'r [u8],
    ) -> Option<(BorrowedFd<'c>, &'r [u8])> {
        let mut names: Vec<&[u8]> = rel.split(|&c| c == b'/').collect();
        let last = names.pop()?;
        let same = self
            .open
            .iter()
            .zip(&names)
            .take_while(|((a, _), b)| a.as_slice() == **b)
            .count();
        self.open.truncate(same);
        for n in &names[same..] {
            let at = self.open.last().map_or(root, |(_, fd)| fd.as_fd());
            match source::open_dir(Some(at), n) {
                Ok(fd) => self.open.push((n.to_vec(), fd)),
                Err(_) => return None,
            }
        }
        Some((self.open.last().map_or(root, |(_, fd)| fd.as_fd()), last))
    }
}

/// Times (in nanoseconds) equal as rsync's `--modify-window` says: within
/// `window` whole seconds, or exactly when it is negative.
pub(super) fn times_equal(a: i64, b: i64, window: i64) -> bool {
    if window < 0 {
        return a == b;
    }
    let (a, b) = (a.div_euclid(1_000_000_000), b.div_euclid(1_000_000_000));
    (a - b).abs() <= window
}

/// BLAKE2b-256 of a whole file (`--checksum`).
pub(super) fn hash_file(f: &File) -> io::Result<[u8; 32]> {
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
pub(super) fn remove_tree(dir: BorrowedFd<'_>, name: &[u8], budget: &mut u64) -> io::Result<u64> {
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
