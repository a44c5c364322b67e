//! The receiver's side: the sender's listings as they come ([`Peer`]),
//! and each file fetched as a delta and written ([`transfer`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{
    sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError,
};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};

use super::super::attrs::{Target, Xattrs};
use super::super::file::{self, BlockHash, Piece};
use super::super::src::SrcDir;
use super::super::transfer::{self, Job};
use super::super::{join, show, Shared, SyncEvents, SyncOptions, SyncReport};
use super::{
    bad, get_entry, op, put_bytes, put_u32, put_u64, Dir, Entry, Frame, Out, Top, SIG_STEP, STEP,
    WINDOW,
};
use crate::delta::Signature;
use crate::error::{Error, Result};
use crate::remote::wire::{self, Dec};
use crate::source::{self};

// ---------------------------------------------------------------- receiver

/// The sender, seen from the receiver: what it listed so far, and the
/// files being fetched.
pub struct Peer {
    pub(super) out: Out,
    state: Mutex<State>,
    cond: Condvar,
    next: AtomicU64,
    /// Fetches made ahead and not yet done with.
    ahead: AtomicUsize,
    /// The strong hash of the signatures it sends.
    hash: BlockHash,
}

/// Requests gathered before a flush: requests go out in batches (each
/// flush costs a wake-up of ssh on both sides and of the far dsync), see
/// [`Fetch::next`].
const FLUSH_BATCH: usize = 8;
/// Signatures up to this size are batched with other requests.
const SIG_BATCHED: usize = 64 << 10;
/// How long a fetch waits for its answer with requests unflushed before
/// it flushes them (when fewer than a batch are waiting).
const FLUSH_AFTER: Duration = Duration::from_micros(200);
/// How often a fetch still waiting looks again for unflushed requests.
const FLUSH_AGAIN: Duration = Duration::from_millis(20);

/// Files up to this size are asked for as the walk finds them, before a
/// worker takes them (as rsync's generator asks ahead): their answers
/// wait in their channels (at most 3 frames of [`WINDOW`]), and a worker
/// seldom waits. Bigger ones, and files with an old version over
/// [`SIGNED_AHEAD_MAX_SIZE`] (whose signature a worker computes), are
/// asked for by their worker.
pub(in crate::sync) const AHEAD_MAX_SIZE: u64 = 1 << 20;
/// Files whose old version is up to this size are asked for as the walk
/// finds them too, with the signature the walk makes (a few hundred
/// bytes): a sync of small changes to many files waited a round trip per
/// file in each worker.
pub(in crate::sync) const SIGNED_AHEAD_MAX_SIZE: u64 = 256 << 10;
/// The error of a fetch made ahead whose answer was dropped: its worker
/// asks again.
const SPILLED: &str = "answer dropped: asked for again";
/// At most this many fetches made ahead at a time: more than the jobs a
/// remote sync queues ([`AHEAD_QUEUE`]) and its workers hold, so that
/// every small file is asked for ahead.
const AHEAD: usize = 160;
/// The jobs a sync from a remote SRC queues for its workers.
pub(in crate::sync) const AHEAD_QUEUE: usize = 128;

/// A file being fetched: its answer's frames.
pub(in crate::sync) struct Fetch {
    peer: Arc<Peer>,
    rx: Receiver<Frame>,
    /// Made ahead: counted in [`Peer::ahead`], and set when its answer
    /// was dropped (see [`Route::spilled`]).
    spilled: Option<Arc<AtomicBool>>,
    /// Asked with the signature of the old file the walk saw.
    signed: bool,
}

impl Drop for Fetch {
    fn drop(&mut self) {
        if self.spilled.is_some() {
            self.peer.ahead.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Fetch {
    /// The answer's next frame. With requests still unflushed (its own
    /// among them, maybe), it waits [`FLUSH_AFTER`] for other workers'
    /// requests to join them, then flushes.
    fn next(&self) -> io::Result<Frame> {
        let lost = || {
            if self
                .spilled
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst))
            {
                io::Error::new(io::ErrorKind::Interrupted, SPILLED)
            } else {
                Peer::lost("connection lost during a transfer")
            }
        };
        match self.rx.try_recv() {
            Ok(f) => return Ok(f),
            Err(TryRecvError::Disconnected) => return Err(lost()),
            Err(TryRecvError::Empty) => {}
        }
        // Then it waits, and flushes on a timeout: soon when requests are
        // unflushed, then now and then (a request counted after a look at
        // the count must not wait for the next batch).
        let mut wait = FLUSH_AFTER;
        loop {
            let unflushed = self.peer.out.unflushed() > 0;
            match self
                .rx
                .recv_timeout(if unflushed { wait } else { FLUSH_AGAIN })
            {
                Ok(f) => return Ok(f),
                Err(RecvTimeoutError::Disconnected) => return Err(lost()),
                Err(RecvTimeoutError::Timeout) => {
                    if self.peer.out.unflushed() > 0 {
                        self.peer.out.flush()?;
                    }
                }
            }
            wait = FLUSH_AGAIN;
        }
    }
}

#[derive(Default)]
struct State {
    tops: Vec<Top>,
    /// Listings by (argument, path): complete, or still arriving.
    dirs: HashMap<(u32, Vec<u8>), Listed>,
    listed: bool,
    /// Why the connection ended, once it has.
    gone: Option<String>,
    files: HashMap<u64, Route>,
}

/// Where a fetch's frames go.
struct Route {
    tx: SyncSender<Frame>,
    /// A fetch made ahead of its worker: when its channel is full (its
    /// file grew past what a prefetch is for, and no worker reads it yet),
    /// the rest is dropped and this is set, rather than the reader waiting
    /// (it would wait on a file behind the ones the workers wait for).
    spilled: Option<Arc<AtomicBool>>,
}

enum Listed {
    Partial(Vec<Entry>),
    Done(Arc<Vec<Entry>>),
    Failed(String),
}

impl Peer {
    /// A peer writing to `output`; [`Peer::read`] must run on `input`.
    pub fn new(output: Box<dyn Write + Send>, hash: BlockHash) -> Arc<Peer> {
        Arc::new(Peer {
            out: Out::new(output),
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            next: AtomicU64::new(1),
            ahead: AtomicUsize::new(0),
            hash,
        })
    }

    /// Reads the sender's frames until the stream ends.
    pub fn read(&self, input: impl Read) {
        let mut r = BufReader::with_capacity(1 << 20, input);
        let mut dec = match zstd::stream::raw::Decoder::new() {
            Ok(d) => d,
            Err(e) => {
                if let Ok(mut s) = self.state.lock() {
                    s.gone = Some(e.to_string());
                }
                self.cond.notify_all();
                return;
            }
        };
        let why = loop {
            match wire::read_frame(&mut r) {
                Ok(Some((o, id, body))) => {
                    if let Err(e) = self.take(o, id, body, &mut dec) {
                        break format!("protocol error: {e}");
                    }
                }
                Ok(None) => break "the sender closed the connection".to_string(),
                Err(e) => break format!("connection lost: {e}"),
            }
        };
        if let Ok(mut s) = self.state.lock() {
            s.gone.get_or_insert(why);
            // Every fetch waiting wakes with an error.
            s.files.clear();
        }
        self.cond.notify_all();
    }

    fn take(
        &self,
        o: u8,
        id: u64,
        body: Vec<u8>,
        dec: &mut zstd::stream::raw::Decoder<'static>,
    ) -> io::Result<()> {
        match o {
            op::TOP => {
                let mut d = Dec::new(&body);
                let shown = d.bytes()?.to_vec();
                let contents = d.u8()? != 0;
                let entry = match d.u8()? {
                    0 => Ok(get_entry(&mut d)?),
                    _ => Err(String::from_utf8_lossy(d.rest()).into_owned()),
                };
                self.update(|s| {
                    s.tops.push(Top {
                        shown,
                        contents,
                        entry,
                    })
                })
            }
            op::DIR => {
                let raw = unz(dec, &body)?;
                let mut d = Dec::new(&raw);
                while !d.rest_is_empty() {
                    self.listing(&mut d)?;
                }
                Ok(())
            }
            op::LISTED => self.update(|s| s.listed = true),
            op::DATA | op::DONE => {
                let mut s = self.lock()?;
                let route = if o == op::DONE {
                    s.files.remove(&id)
                } else {
                    s.files.get(&id).map(|r| Route {
                        tx: r.tx.clone(),
                        spilled: r.spilled.clone(),
                    })
                };
                // A fetch that gave up (its worker failed) drops the rest.
                let Some(route) = route else { return Ok(()) };
                match &route.spilled {
                    Some(flag) => {
                        if let Err(TrySendError::Full(_)) = route.tx.try_send((o, body)) {
                            flag.store(true, Ordering::SeqCst);
                            s.files.remove(&id);
                        }
                    }
                    None => {
                        drop(s);
                        let _ = route.tx.send((o, body));
                    }
                }
                Ok(())
            }
            _ => Err(bad(&format!("frame (op {o})"))),
        }
    }

    /// One directory's record of a DIR frame.
    fn listing(&self, d: &mut Dec<'_>) -> io::Result<()> {
        let arg = d.u32()?;
        let rel = d.bytes()?.to_vec();
        let status = d.u8()?;
        if status != 0 {
            let msg = String::from_utf8_lossy(d.bytes()?).into_owned();
            return self.update(|s| {
                s.dirs.insert((arg, rel), Listed::Failed(msg));
            });
        }
        let more = d.u8()? != 0;
        let n = d.u32()?;
        let mut got = Vec::with_capacity(n.min(1 << 16) as usize);
        for _ in 0..n {
            got.push(get_entry(d)?);
        }
        self.update(|s| {
            let key = (arg, rel);
            let mut all = match s.dirs.remove(&key) {
                Some(Listed::Partial(v)) => v,
                _ => Vec::new(),
            };
            all.append(&mut got);
            let l = if more {
                Listed::Partial(all)
            } else {
                Listed::Done(Arc::new(all))
            };
            s.dirs.insert(key, l);
        })
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| io::Error::other("a sync thread panicked"))
    }

    fn update(&self, f: impl FnOnce(&mut State)) -> io::Result<()> {
        f(&mut *self.lock()?);
        self.cond.notify_all();
        Ok(())
    }

    fn lost(why: &str) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, why.to_string())
    }

    /// What `ready` finds in the state, once it finds something (the
    /// connection's end wakes every waiter with an error).
    fn wait_for<T>(&self, mut ready: impl FnMut(&State) -> Option<io::Result<T>>) -> io::Result<T> {
        let mut s = self.lock()?;
        loop {
            if let Some(r) = ready(&s) {
                return r;
            }
            if let Some(why) = &s.gone {
                return Err(Self::lost(why));
            }
            s = self
                .cond
                .wait(s)
                .map_err(|_| io::Error::other("a sync thread panicked"))?;
        }
    }

    /// The SRC arguments, once the sender has said all `n` of them.
    pub fn tops(&self, n: usize) -> io::Result<Vec<Top>> {
        self.wait_for(|s| (s.tops.len() >= n).then(|| Ok(s.tops.clone())))
    }

    /// The listing of `rel` under argument `arg`, once it has come.
    pub(super) fn dir(&self, arg: u32, rel: &[u8]) -> io::Result<Arc<Vec<Entry>>> {
        let key = (arg, rel.to_vec());
        self.wait_for(|s| match s.dirs.get(&key) {
            Some(Listed::Done(v)) => Some(Ok(v.clone())),
            Some(Listed::Failed(m)) => Some(Err(io::Error::other(m.clone()))),
            _ if s.listed => Some(Err(io::Error::new(
                io::ErrorKind::NotFound,
                "not listed by the sender",
            ))),
            _ => None,
        })
    }

    /// Asks ahead for a whole file that the walk found (see
    /// [`AHEAD_MAX_SIZE`]); `None` when enough are asked for already.
    pub(in crate::sync) fn fetch_ahead(self: &Arc<Self>, arg: u32, rel: &[u8]) -> Option<Fetch> {
        self.ask_ahead(arg, rel, None)
    }

    /// [`Self::fetch_ahead`] for a small file with an old version at
    /// `dname` in `dir`: its signature made here, by the walk, so that
    /// its delta is on its way before a worker takes the job. The worker
    /// takes the answer only if the old file is still the one signed
    /// (see [`transfer`]).
    pub(in crate::sync) fn fetch_ahead_signed(
        self: &Arc<Self>,
        arg: u32,
        rel: &[u8],
        dir: BorrowedFd<'_>,
        dname: &[u8],
    ) -> Option<Fetch> {
        if self.ahead.load(Ordering::SeqCst) >= AHEAD {
            return None;
        }
        let old = open_old(dir, dname, false).ok()??;
        let st = source::stat_fd(old.as_fd()).ok()?;
        if st.size > SIGNED_AHEAD_MAX_SIZE {
            return None;
        }
        let sig = file::signature_of(&old, st.size, self.hash).ok()?;
        self.ask_ahead(arg, rel, Some(&sig))
    }

    /// A fetch made ahead, counted in [`Self::ahead`] (at most [`AHEAD`]).
    fn ask_ahead(self: &Arc<Self>, arg: u32, rel: &[u8], sig: Option<&Signature>) -> Option<Fetch> {
        if self.ahead.fetch_add(1, Ordering::SeqCst) >= AHEAD {
            self.ahead.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let f = Fetch {
            peer: self.clone(),
            rx: sync_channel(0).1,
            spilled: Some(Arc::new(AtomicBool::new(false))),
            signed: sig.is_some(),
        };
        // Failing here, the worker asks again (and meets the error).
        self.request(arg, rel, 0, sig, f).ok()
    }

    /// Asks for a file's bytes from `start` on, as a delta against `sig`.
    fn fetch(
        self: &Arc<Self>,
        arg: u32,
        rel: &[u8],
        start: u64,
        sig: Option<&Signature>,
    ) -> io::Result<Fetch> {
        let f = Fetch {
            peer: self.clone(),
            rx: sync_channel(0).1,
            spilled: None,
            signed: false,
        };
        self.request(arg, rel, start, sig, f)
    }

    /// Sends a FILE request (with its SIG frames) for `f`, routing the
    /// answer to it.
    fn request(
        &self,
        arg: u32,
        rel: &[u8],
        start: u64,
        sig: Option<&Signature>,
        mut f: Fetch,
    ) -> io::Result<Fetch> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(WINDOW);
        f.rx = rx;
        {
            let mut s = self.lock()?;
            if let Some(why) = &s.gone {
                return Err(Self::lost(why));
            }
            let spilled = f.spilled.clone();
            s.files.insert(id, Route { tx, spilled });
        }
        let empty = Vec::new();
        let (bs, old_size, entries) = match sig {
            Some(s) => (s.block_size, s.file_size, &s.entries),
            None => (0, 0, &empty),
        };
        let mut b = Vec::with_capacity(rel.len() + 40);
        put_u32(&mut b, arg);
        put_bytes(&mut b, rel);
        put_u64(&mut b, start);
        put_u32(&mut b, bs);
        put_u64(&mut b, old_size);
        put_u64(&mut b, entries.len() as u64);
        if entries.is_empty() {
            self.out.request(op::FILE, id, &b, FLUSH_BATCH)?;
        } else {
            // A big signature goes frame by frame (other requests may come
            // between) and is worth its own flush.
            self.out.frame(op::FILE, id, &b, false)?;
            let parts = entries.len().div_ceil(SIG_STEP);
            for (i, part) in entries.chunks(SIG_STEP).enumerate() {
                if i + 1 < parts {
                    self.out.frame(op::SIG, id, part, false)?;
                } else if entries.len() <= SIG_BATCHED {
                    self.out.request(op::SIG, id, part, FLUSH_BATCH)?;
                } else {
                    self.out.frame(op::SIG, id, part, true)?;
                }
            }
        }
        Ok(f)
    }

    /// Tells the sender the receiver is done, and closes the stream.
    pub fn end(&self) -> io::Result<()> {
        let r = self.out.frame(op::END, 0, &[], true);
        self.out.close().and(r)
    }
}

/// A DIR frame's bytes, through the session's decompression stream (at
/// most a frame's worth of listing from one frame).
fn unz(dec: &mut zstd::stream::raw::Decoder<'static>, z: &[u8]) -> io::Result<Vec<u8>> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut input = InBuffer::around(z);
    loop {
        let mut o = OutBuffer::around(&mut buf[..]);
        dec.run(&mut input, &mut o)?;
        let n = o.pos();
        out.extend_from_slice(&buf[..n]);
        if out.len() > wire::MAX_FRAME as usize {
            return Err(bad("listing"));
        }
        if input.pos() == z.len() && n < buf.len() {
            return Ok(out);
        }
    }
}

/// One record of a DATA frame.
enum Record<'a> {
    /// Bytes of the old file.
    Copy { from: u64, len: u64 },
    /// New bytes.
    Literal(&'a [u8]),
    /// Zeros.
    Zeros(u64),
}

/// The sender's answer to a fetch, record by record (`frame` after each
/// DATA frame), until DONE: the file's (size, mtime) as the sender read
/// it.
fn records(
    rx: &Fetch,
    mut each: impl FnMut(Record<'_>) -> io::Result<()>,
    mut frame: impl FnMut() -> io::Result<()>,
) -> io::Result<(u64, i64)> {
    // A thread's decompression context serves all its files.
    thread_local! {
        static DZ: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let mut dz = match DZ.with(|d| d.borrow_mut().take()) {
        Some(d) => d,
        None => zstd::bulk::Decompressor::new()?,
    };
    let mut data = Vec::new();
    let r = loop {
        let (o, body) = match rx.next() {
            Ok(f) => f,
            Err(e) => break Err(e),
        };
        let mut d = Dec::new(&body);
        if o == op::DONE {
            break done_status(&mut d);
        }
        let mut one = || -> io::Result<()> {
            while !d.rest_is_empty() {
                match d.u8()? {
                    1 => {
                        let (from, len) = (d.u64()?, d.u64()?);
                        each(Record::Copy { from, len })?;
                    }
                    2 => {
                        let raw = d.u32()? as usize;
                        if raw > STEP {
                            return Err(bad("data record"));
                        }
                        data.clear();
                        data.reserve(raw);
                        let n = dz
                            .decompress_to_buffer(d.bytes()?, &mut data)
                            .map_err(|_| bad("data record"))?;
                        if n != raw {
                            return Err(bad("data record"));
                        }
                        each(Record::Literal(&data))?;
                    }
                    3 => each(Record::Zeros(d.u64()?))?,
                    _ => return Err(bad("data record")),
                }
            }
            frame()
        };
        if let Err(e) = one() {
            break Err(e);
        }
    };
    DZ.with(|d| *d.borrow_mut() = Some(dz));
    r
}

/// The sender's answer to a fetch, applied to `out` from `start` on:
/// ranges of `old`, new bytes, zeros (left unwritten: `out` is new).
/// The holes of `old` stay holes, as in a local sync (`file::write_plan`):
/// writing them out was a third of the time of a next-day push of a 2 GiB
/// image whose old copy had 0.8 GiB of holes, for bytes that read the same.
/// Returns the file's (size, mtime) and the bytes (new, matched).
fn apply(
    rx: &Fetch,
    old: Option<&File>,
    out: &File,
    start: u64,
    done: impl FnMut(u64) -> io::Result<()>,
) -> io::Result<((u64, i64), (u64, u64))> {
    let pos = std::cell::Cell::new(start);
    let (mut literal, mut matched) = (0u64, 0u64);
    let done = std::cell::RefCell::new(done);
    let end = records(
        rx,
        |r| {
            let at = pos.get();
            let len = match r {
                Record::Copy { from, len } => {
                    let old = old.ok_or_else(|| bad("copy without an old file"))?;
                    // In steps, with checkpoints between them: one call
                    // for a gigabyte ran at a fifth of the speed here
                    // (dirty pages throttled all at once).
                    let mut off = 0;
                    while off < len {
                        let n = (len - off).min(file::STEP);
                        file::copy_data_to(old, from + off, n, out, at + off)?;
                        off += n;
                        if off < len {
                            (done.borrow_mut())(at + off)?;
                        }
                    }
                    matched += len;
                    len
                }
                Record::Literal(data) => {
                    out.write_all_at(data, at)?;
                    literal += data.len() as u64;
                    data.len() as u64
                }
                Record::Zeros(len) => {
                    literal += len;
                    len
                }
            };
            pos.set(at + len);
            Ok(())
        },
        || (done.borrow_mut())(pos.get()),
    )?;
    Ok((end, (literal, matched)))
}

/// Brings one regular file over from a remote SRC: the old file's
/// signature out, the delta back, written beside the old file (or into a
/// partial file that a later sync resumes) and renamed over it.
pub(in crate::sync) fn transfer(s: &Shared<'_>, j: &Job, d: &Dir) -> io::Result<()> {
    match transfer_once(s, j, d, j.ahead.take()) {
        Err(e) if e.kind() == io::ErrorKind::Interrupted && e.to_string() == SPILLED => {
            transfer_once(s, j, d, None)
        }
        r => r,
    }
}

fn transfer_once(s: &Shared<'_>, j: &Job, d: &Dir, ahead: Option<Fetch>) -> io::Result<()> {
    let dir = j.ddir.as_fd();
    let xattrs = SrcDir::Remote(Arc::new(Dir {
        peer: d.peer.clone(),
        arg: d.arg,
        rel: d.rel.clone(),
        entries: d.entries.clone(),
        own_xattrs: None,
    }))
    .xattrs(s, Some(&j.sname))?;
    // A crash in an earlier local `--inplace` run: the old file comes back.
    if j.old.is_some() && super::super::inplace::recover(dir, &j.dname)? {
        s.ev.warn(&format!(
            "{}: rolled back an interrupted in-place update",
            show(&j.rel)
        ));
    }
    if s.opts.inplace && j.old.is_some_and(|o| o.size > 0) {
        if let Some(old) = open_old(dir, &j.dname, true)? {
            return in_place(s, j, d, dir, &old, xattrs.as_ref());
        }
    }
    let old = match j.old {
        Some(o) if o.size > 0 && !s.opts.whole_file => open_old(dir, &j.dname, false)?,
        _ => None,
    };
    let (tmp, out, start, big) = transfer::open_out(s, &j.rel, &j.dname, &j.st, dir, old.as_ref())?;
    let r = (|| -> io::Result<(u64, (u64, u64))> {
        let old_st = match &old {
            Some(f) => Some(source::stat_fd(f.as_fd())?),
            None => None,
        };
        // An answer asked ahead is for no old file, or for the old file
        // the walk signed: the same inode, size and time (a recovery
        // above, or another writer, changes them).
        let ahead = ahead.filter(|f| {
            start == 0
                && match (&old_st, j.old, f.signed) {
                    (None, _, false) => true,
                    (Some(now), Some(seen), true) => {
                        now.ino == seen.ino
                            && now.size == seen.size
                            && now.mtime_ns == seen.mtime_ns
                            && now.ctime_ns == seen.ctime_ns
                    }
                    _ => false,
                }
        });
        let rx = match ahead {
            Some(f) => f,
            None => {
                let sig = match (&old, &old_st) {
                    (Some(f), Some(st)) => Some(file::signature_of(f, st.size, d.peer.hash)?),
                    _ => None,
                };
                d.peer
                    .fetch(d.arg, &join(&d.rel, &j.sname), start, sig.as_ref())?
            }
        };
        let mut cp = transfer::checkpointer(&j.st, &j.dname, dir, &out, old.as_ref(), big, start);
        let ((size, mtime), moved) = apply(&rx, old.as_ref(), &out, start, |at| cp.at(at))?;
        cp.finish()?;
        file::set_len(&out, size)?;
        let mut st = j.st;
        st.size = size;
        st.mtime_ns = mtime;
        s.attrs(Target::Fd(out.as_fd()), &st, xattrs.as_ref(), true)?;
        rustix::fs::renameat(dir, tmp.as_slice(), dir, j.dname.as_slice())?;
        Ok((size, moved))
    })();
    transfer::clean_up(dir, &j.dname, &tmp, big, r.is_ok());
    let (size, (literal, matched)) = r?;
    s.count(|r| {
        r.transferred += 1;
        r.literal_bytes += literal;
        r.matched_bytes += matched;
        r.written_bytes += size - start;
    });
    Ok(())
}

/// `--inplace` from a remote SRC: the plan comes from the sender, its new
/// bytes into a shadow file (unlinked, in DST's directory: holes where
/// the old file's ranges go), then the local sync's in-place writing of
/// that plan, with the shadow as SRC; when the plan cannot be done in
/// place (see [`super::inplace`]), the file is written beside and renamed.
fn in_place(
    s: &Shared<'_>,
    j: &Job,
    d: &Dir,
    dir: BorrowedFd<'_>,
    old: &File,
    xattrs: Option<&Xattrs>,
) -> io::Result<()> {
    let ost = source::stat_fd(old.as_fd())?;
    let sig = file::signature_of(old, ost.size, d.peer.hash)?;
    let rx = d
        .peer
        .fetch(d.arg, &join(&d.rel, &j.sname), 0, Some(&sig))?;
    let shadow = shadow_file(dir)?;
    let (pieces, (size, mtime), (literal, matched)) = collect(&rx, &shadow)?;
    // Zeros at the end were not written: the shadow reads them as zeros
    // only inside its length.
    file::set_len(&shadow, size)?;
    let mut st = j.st;
    st.size = size;
    st.mtime_ns = mtime;
    let planned = super::super::inplace::apply(
        &pieces, &shadow, size, old, ost.size, ost.ino, dir, &j.dname,
    )?;
    let written = match planned {
        Some(w) => {
            s.attrs(Target::Fd(old.as_fd()), &st, xattrs, false)?;
            w
        }
        None => {
            let tmp = transfer::temp_name(&j.dname);
            let out = File::from(rustix::fs::openat(
                dir,
                tmp.as_slice(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?);
            let r = (|| -> io::Result<()> {
                file::write_plan(&pieces, &shadow, old, &out, 0, s.opts.sparse, |_| Ok(()))?;
                file::set_len(&out, size)?;
                s.attrs(Target::Fd(out.as_fd()), &st, xattrs, true)?;
                rustix::fs::renameat(dir, tmp.as_slice(), dir, j.dname.as_slice())?;
                Ok(())
            })();
            transfer::clean_up(dir, &j.dname, &tmp, false, r.is_ok());
            r?;
            size
        }
    };
    s.count(|r| {
        r.transferred += 1;
        r.literal_bytes += literal;
        r.matched_bytes += matched;
        r.written_bytes += written;
    });
    Ok(())
}

/// An unlinked file in `dir` (on the file system of the file it helps to
/// rebuild).
fn shadow_file(dir: BorrowedFd<'_>) -> io::Result<File> {
    if let Ok(f) = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) {
        return Ok(File::from(f));
    }
    let name = transfer::temp_name(b"shadow");
    let f = rustix::fs::openat(
        dir,
        name.as_slice(),
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    rustix::fs::unlinkat(dir, name.as_slice(), rustix::fs::AtFlags::empty())?;
    Ok(File::from(f))
}

/// A plan, the file's (size, mtime), and its bytes (new, matched).
type Collected = (Vec<Piece>, (u64, i64), (u64, u64));

/// The sender's answer as a plan, its new bytes written into `shadow` at
/// their offsets.
fn collect(rx: &Fetch, shadow: &File) -> io::Result<Collected> {
    let mut pieces = Vec::new();
    let (mut pos, mut matched) = (0u64, 0u64);
    let end = records(
        rx,
        |r| {
            let (p, len) = match r {
                Record::Copy { from, len } => {
                    matched += len;
                    (Piece::Old { from, len }, len)
                }
                Record::Literal(data) => {
                    shadow.write_all_at(data, pos)?;
                    let len = data.len() as u64;
                    (Piece::New { from: pos, len }, len)
                }
                // A hole of the shadow reads as zeros.
                Record::Zeros(len) => (Piece::New { from: pos, len }, len),
            };
            file::push(&mut pieces, p);
            pos += len;
            Ok(())
        },
        || Ok(()),
    )?;
    Ok((pieces, end, (pos - matched, matched)))
}

/// DONE's status: the file's (size, mtime) as the sender read it, or its
/// error (NotFound: it vanished).
fn done_status(d: &mut Dec<'_>) -> io::Result<(u64, i64)> {
    match d.u8()? {
        0 => Ok((d.u64()?, d.u64()? as i64)),
        1 => Err(io::Error::new(
            io::ErrorKind::NotFound,
            String::from_utf8_lossy(d.rest()).into_owned(),
        )),
        _ => Err(io::Error::other(
            String::from_utf8_lossy(d.rest()).into_owned(),
        )),
    }
}

fn open_old(dir: BorrowedFd<'_>, name: &[u8], write: bool) -> io::Result<Option<File>> {
    let mode = if write { OFlags::RDWR } else { OFlags::RDONLY };
    match rustix::fs::openat(
        dir,
        name,
        mode | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(f) => Ok(Some(File::from(f))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Runs a receiver: a sync of what `peer` lists for `n` arguments into
/// `dst`.
///
/// # Errors
/// As [`super::sync`]; a lost connection.
pub fn receive(
    peer: &Arc<Peer>,
    n: usize,
    dst: &Path,
    opts: &SyncOptions,
    ev: &dyn SyncEvents,
) -> Result<SyncReport> {
    let tops = peer
        .tops(n)
        .map_err(|e| Error::io(Path::new("(remote)"), e))?;
    super::super::run(
        super::super::Srcs::Remote(peer.clone(), tops),
        dst,
        opts,
        ev,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader never waits on a file asked for ahead: an answer that
    /// outgrows its window (the file grew after it was listed) is dropped,
    /// and its fetch says so, for its worker to ask again.
    #[test]
    fn an_answer_asked_ahead_that_outgrows_its_window_is_dropped_not_waited_for() {
        let peer = Peer::new(Box::new(io::sink()), BlockHash::Xxh3);
        let f = peer.fetch_ahead(0, b"a").expect("asked");
        let mut input = Vec::new();
        for _ in 0..WINDOW + 3 {
            wire::write_frame(&mut input, op::DATA, 1, &[]).expect("frame");
        }
        wire::write_frame(&mut input, op::DONE, 1, &[0; 17]).expect("frame");
        // Returns at the input's end: it did not wait for the fetch.
        peer.read(&input[..]);
        for _ in 0..WINDOW {
            assert_eq!(f.next().expect("buffered").0, op::DATA);
        }
        let e = f.next().expect_err("dropped");
        assert_eq!(e.to_string(), SPILLED);
        drop(f);
        assert_eq!(peer.ahead.load(Ordering::SeqCst), 0);
    }

    /// At most [`AHEAD`] fetches are made ahead at a time.
    #[test]
    fn fetches_ahead_are_bounded() {
        let peer = Peer::new(Box::new(io::sink()), BlockHash::Xxh3);
        let held: Vec<Fetch> = (0..AHEAD + 5)
            .filter_map(|i| peer.fetch_ahead(0, format!("f{i}").as_bytes()))
            .collect();
        assert_eq!(held.len(), AHEAD);
        drop(held);
        assert!(peer.fetch_ahead(0, b"again").is_some());
    }
}
