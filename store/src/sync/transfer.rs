//! The workers: one regular file each at a time, brought over beside the
//! old one and renamed over it, or in place (`--inplace`), a big one
//! through a partial file that a later sync resumes.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use rustix::fs::{AtFlags, Mode, OFlags};

use super::attrs::Target;
use super::src::SrcDir;
use super::{file, inplace, remote, show, Shared};
use crate::source::{self, Stat, XattrSource};

/// A regular file to transfer.
pub(super) struct Job {
    pub(super) sdir: SrcDir,
    pub(super) sname: Vec<u8>,
    pub(super) ddir: Arc<OwnedFd>,
    pub(super) dname: Vec<u8>,
    pub(super) rel: Vec<u8>,
    pub(super) st: Stat,
    /// DST's old file at that name, when it is a regular file.
    pub(super) old: Option<Stat>,
    /// A remote file's fetch, made as the walk found it (see
    /// [`remote::AHEAD_MAX_SIZE`]).
    pub(super) ahead: std::cell::Cell<Option<remote::Fetch>>,
}

impl Job {
    /// Asks ahead for a small remote file, so that its bytes are on their
    /// way before a worker takes the job: with no signature when there is
    /// no old file to compare with, else with the small old file's.
    pub(super) fn ask_ahead(self, opts: &super::SyncOptions) -> Job {
        let whole = match self.old {
            None => true,
            Some(o) => o.size == 0 || (opts.whole_file && !opts.inplace),
        };
        if let SrcDir::Remote(d) = &self.sdir {
            if self.st.size <= remote::AHEAD_MAX_SIZE {
                let rel = super::join(&d.rel, &self.sname);
                if whole {
                    self.ahead.set(d.peer.fetch_ahead(d.arg, &rel));
                } else if !opts.inplace
                    && self
                        .old
                        .is_some_and(|o| o.size <= remote::SIGNED_AHEAD_MAX_SIZE)
                {
                    self.ahead.set(d.peer.fetch_ahead_signed(
                        d.arg,
                        &rel,
                        self.ddir.as_fd(),
                        &self.dname,
                    ));
                }
            }
        }
        self
    }
}

pub(super) fn worker(s: &Shared<'_>, rx: &Mutex<Receiver<Job>>) {
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

pub(super) fn is_src_gone(job: &Job) -> bool {
    match &job.sdir {
        SrcDir::Local(d) => {
            matches!(source::stat_at(d.as_fd(), &job.sname), Err(e) if e.kind() == io::ErrorKind::NotFound)
        }
        // The sender said so (its error is NotFound only then).
        SrcDir::Remote(_) => true,
    }
}

/// A temporary name beside `name` in its directory (rsync's `.NAME.XXXXXX`).
pub(super) fn temp_name(name: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(name.len() + 16);
    t.push(b'.');
    t.extend_from_slice(&name[..name.len().min(200)]);
    t.extend_from_slice(format!(".{:06x}", crate::id::random_u64() & 0xff_ffff).as_bytes());
    t
}

/// Smaller files are copied whole: reading the old one to compare costs
/// more than copying them (rsync copies local files whole too).
pub(super) const DELTA_MIN: u64 = 1 << 20;

/// Files this big are written to a partial file that a later sync resumes
/// from its last checkpoint (rsync's `--partial` starts over, re-reading
/// everything).
pub(super) const RESUME_MIN: u64 = 64 << 20;
/// A checkpoint (an fdatasync) is taken after each 16th of a big file,
/// between 16 and 256 MiB.
pub(super) fn checkpoint_every(size: u64) -> u64 {
    (size / 16).clamp(16 << 20, 256 << 20)
}

/// Brings one regular file over: in place (`--inplace`), or written beside
/// the old one and renamed over it.
pub(super) fn transfer(s: &Shared<'_>, j: &Job) -> io::Result<()> {
    let sdir = match &j.sdir {
        SrcDir::Local(d) => d,
        SrcDir::Remote(d) => return remote::transfer(s, j, d),
    };
    let src = source::open_file(sdir.as_fd(), &j.sname)?;
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
    let (tmp, out, start, big) = open_out(s, &j.rel, &j.dname, &st, dir, old.as_ref())?;
    let r = (|| -> io::Result<()> {
        let mut cp = checkpointer(&st, &j.dname, dir, &out, old.as_ref(), big, start);
        let mut checkpoint = |at| cp.at(at);
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
                file::set_len(&out, st.size)?;
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
        cp.finish()?;
        s.attrs(Target::Fd(out.as_fd()), &st, xattrs.as_ref(), true)?;
        rustix::fs::renameat(dir, tmp.as_slice(), dir, j.dname.as_slice())?;
        Ok(())
    })();
    clean_up(dir, &j.dname, &tmp, big, r.is_ok());
    r?;
    s.count(|r| {
        r.transferred += 1;
        r.written_bytes += st.size - start;
    });
    Ok(())
}

/// Where a file of `st` is written: a temporary name beside `name`, or for
/// a big one its partial file, resumed where its checkpoint says. Returns
/// the name, the file, where writing starts, and whether it is big.
pub(super) fn open_out(
    s: &Shared<'_>,
    rel: &[u8],
    name: &[u8],
    st: &Stat,
    dir: BorrowedFd<'_>,
    old: Option<&File>,
) -> io::Result<(Vec<u8>, File, u64, bool)> {
    let big = st.size >= RESUME_MIN;
    let (tmp, out, start) = if big {
        partial_open(dir, name, st, old)?
    } else {
        let tmp = temp_name(name);
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
            show(rel),
            start,
            st.size
        ));
    }
    Ok((tmp, out, start, big))
}

/// How far behind the writing a replaced file's pages are let go (see
/// [`checkpointer`]): old data moved back by up to this much is still
/// copied from the cache.
const LET_GO_BEHIND: u64 = 64 << 20;

/// Told each offset written ([`Checkpointer::at`]): a big file's data is
/// made durable and its checkpoint written every [`checkpoint_every`]
/// bytes, in the background: the copy goes on while the disk catches up
/// (inline, the 16 `fdatasync`s of a 2 GiB image cost 1.2 s of its
/// sync). One checkpoint is in flight at a time; [`Checkpointer::finish`]
/// waits for it, before the partial file is renamed or left.
///
/// The old file's cached pages are also let go [`LET_GO_BEHIND`] behind
/// the writing when the rename will free them anyway (no other link), so
/// that the new file's pages are the ones just freed. Fresh pages cost
/// far more on a virtual machine that hands free memory back to its host:
/// a 2 GiB `copy_file_range` here took 3.5-3.9 s, and 0.6 s letting the
/// source go behind it.
pub(super) struct Checkpointer<'f> {
    st: &'f Stat,
    name: &'f [u8],
    dir: BorrowedFd<'f>,
    out: &'f File,
    old: Option<&'f File>,
    big: bool,
    last: u64,
    let_go: Option<(&'f File, u64)>,
    pending: Option<std::thread::JoinHandle<io::Result<()>>>,
}

pub(super) fn checkpointer<'f>(
    st: &'f Stat,
    name: &'f [u8],
    dir: BorrowedFd<'f>,
    out: &'f File,
    old: Option<&'f File>,
    big: bool,
    start: u64,
) -> Checkpointer<'f> {
    let let_go = old
        .filter(|f| big && source::stat_fd(f.as_fd()).is_ok_and(|o| o.nlink == 1))
        .map(|f| (f, 0u64));
    Checkpointer {
        st,
        name,
        dir,
        out,
        old,
        big,
        last: start,
        let_go,
        pending: None,
    }
}

impl Checkpointer<'_> {
    /// Everything before `at` is written.
    pub(super) fn at(&mut self, at: u64) -> io::Result<()> {
        if let Some((f, from)) = &mut self.let_go {
            let to = at.saturating_sub(LET_GO_BEHIND);
            if to >= *from + file::STEP {
                // Advice only: a failure costs nothing but the cache.
                let _ = rustix::fs::fadvise(
                    f,
                    *from,
                    std::num::NonZeroU64::new(to - *from),
                    rustix::fs::Advice::DontNeed,
                );
                *from = to;
            }
        }
        if self.big && at - self.last >= checkpoint_every(self.st.size) && at < self.st.size {
            self.finish()?;
            let c = Checkpoint::of(self.st, self.old, at)?;
            let out = self.out.try_clone()?;
            let dir = rustix::io::fcntl_dupfd_cloexec(self.dir, 0)?;
            let name = self.name.to_vec();
            self.pending = Some(
                std::thread::Builder::new()
                    .name("dsync-checkpoint".into())
                    .spawn(move || {
                        out.sync_data()?;
                        write_checkpoint(dir.as_fd(), &name, &c)
                    })?,
            );
            self.last = at;
        }
        Ok(())
    }

    /// Waits for the checkpoint in flight; its error, if it failed.
    pub(super) fn finish(&mut self) -> io::Result<()> {
        match self.pending.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the checkpoint thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for Checkpointer<'_> {
    /// A transfer that failed leaves no checkpoint being written behind it.
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// After a transfer: a failed one's temporary file goes, a big one's
/// partial file stays for next time; a finished big one's checkpoint goes.
pub(super) fn clean_up(dir: BorrowedFd<'_>, name: &[u8], tmp: &[u8], big: bool, ok: bool) {
    match (ok, big) {
        (false, true) => {}
        (false, false) => {
            let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::empty());
        }
        (true, true) => {
            let _ = rustix::fs::unlinkat(dir, checkpoint_name(name).as_slice(), AtFlags::empty());
        }
        (true, false) => {}
    }
}

/// `.NAME.dsync-partial`: a big file being written.
pub(super) fn partial_name(name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(name.len() + 16);
    p.push(b'.');
    p.extend_from_slice(&name[..name.len().min(200)]);
    p.extend_from_slice(b".dsync-partial");
    p
}

/// `.NAME.dsync-partial.ckpt`: how much of the partial file is written,
/// and for which SRC and old file.
pub(super) fn checkpoint_name(name: &[u8]) -> Vec<u8> {
    let mut p = partial_name(name);
    p.extend_from_slice(b".ckpt");
    p
}

/// What a partial file holds: SRC's bytes (over the old file given) up to
/// `done`, valid only for those very files (size, mtime, inode).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Checkpoint {
    pub(super) src: (u64, i64, u64),
    pub(super) old: (u64, i64, u64),
    pub(super) done: u64,
}

pub(super) const CHECKPOINT_MAGIC: &[u8; 8] = b"DSYNCP1\n";

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
pub(super) fn write_checkpoint(dir: BorrowedFd<'_>, name: &[u8], c: &Checkpoint) -> io::Result<()> {
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
pub(super) fn partial_open(
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
                let size = source::stat_fd(f.as_fd())?.size;
                if size >= c.done {
                    // What was written after the checkpoint goes: the rest
                    // is written again, but a hole or zeros are left
                    // unwritten, and must not show an interrupted run's bytes.
                    if size > c.done {
                        f.set_len(c.done)?;
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn a_resumed_partial_file_keeps_nothing_written_after_its_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::write(&src, vec![7u8; 1 << 20]).unwrap();
        let st = source::stat_fd(File::open(&src).unwrap().as_fd()).unwrap();
        let dir = File::open(d.path()).unwrap();
        // An interrupted run: 64 KiB vouched for, 1 MiB written.
        let partial = d.path().join(OsStr::from_bytes(&partial_name(b"f")));
        std::fs::write(&partial, vec![9u8; 1 << 20]).unwrap();
        let ck = Checkpoint::of(&st, None, 64 << 10).unwrap();
        let ckp = d.path().join(OsStr::from_bytes(&checkpoint_name(b"f")));
        std::fs::write(&ckp, ck.encode()).unwrap();
        let (_, f, start) = partial_open(dir.as_fd(), b"f", &st, None).unwrap();
        assert_eq!(start, 64 << 10);
        // A hole or zeros after the checkpoint, left unwritten, read as zeros.
        f.set_len(1 << 20).unwrap();
        let mut b = vec![1u8; 4096];
        File::open(&partial)
            .unwrap()
            .read_exact_at(&mut b, 512 << 10)
            .unwrap();
        assert!(b.iter().all(|&c| c == 0), "an interrupted run's bytes show");
    }
}
