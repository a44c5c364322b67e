//! `dsync sync` with one side on another machine: `dsync sync SRC...
//! [user@]host:DST` (push) and `dsync sync [user@]host:SRC... DST` (pull).
//!
//! Two roles, as in rsync: the *sender* has SRC, the *receiver* has DST and
//! runs the same walk as a local sync ([`super::sync`]) over a SRC that the
//! sender lists ([`Dir`]). Files move as deltas: the receiver sends the
//! signature of its old file, the sender answers with the ranges to copy
//! from it and the new bytes, compressed. In a pull the receiver is here
//! and `dsync serve` on the far side sends; in a push the far side
//! receives and its items, warnings and report come back here.
//!
//! The frames are the remote protocol's (PROTOCOL.md, "Sync sessions").

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

use rustix::fs::{Mode, OFlags};

use super::attrs::{proc_path, Target, Xattrs};
use super::file::{self, Piece, BLOCK};
use super::src::SrcDir;
use super::transfer::{self, Job};
use super::walk::hash_file;
use super::{join, show, Filters, Item, Shared, SyncEvents, SyncOptions, SyncReport};
use crate::delta::Signature;
use crate::error::{Error, Result};
use crate::remote::wire::{self, Dec, Enc};
use crate::source::{self, Stat, XattrSource};

/// The frames of a sync session (PROTOCOL.md).
pub mod op {
    /// Client to server, first: starts a sync session.
    pub const SYNC: u8 = 32;
    /// Sender to receiver.
    pub const TOP: u8 = 33;
    pub const DIR: u8 = 34;
    pub const LISTED: u8 = 35;
    pub const DATA: u8 = 36;
    pub const DONE: u8 = 37;
    /// Receiver to sender.
    pub const FILE: u8 = 40;
    pub const SIG: u8 = 41;
    pub const END: u8 = 42;
    pub const ITEM: u8 = 43;
    pub const WARN: u8 = 44;
    pub const MESSAGE: u8 = 45;
    pub const REPORT: u8 = 46;
    pub const FAIL: u8 = 47;
}

/// SYNC's role byte: what the server is asked to be.
pub mod role {
    pub const SEND: u8 = 0;
    pub const RECEIVE: u8 = 1;
}

/// Literal bytes per DATA record (before compression), and the size at
/// which a DATA frame is sent.
const STEP: usize = 1 << 20;
/// Signature bytes per SIG frame.
const SIG_STEP: usize = 8 << 20;
/// DATA frames buffered per file before the connection's reader waits.
const WINDOW: usize = 8;
/// The sender's threads answering FILE requests.
const SENDERS: usize = 4;

/// A frame for one fetch: DATA or DONE, and its body.
type Frame = (u8, Vec<u8>);

/// A directory still to list: its parent, its name (none: the parent
/// itself), its path.
type Pending = (Arc<OwnedFd>, Option<Vec<u8>>, Vec<u8>);

/// The server's say on a path: (path, written into) -> refused with why.
pub type PathCheck<'a> = dyn Fn(&[u8], bool) -> std::result::Result<(), String> + 'a;

/// One name of a directory SRC lists.
#[derive(Clone, Debug)]
pub struct Entry {
    pub(super) name: Vec<u8>,
    pub(super) st: Stat,
    /// It could not be read: (it vanished, the sender's line).
    pub(super) err: Option<(bool, String)>,
    pub(super) link: Option<Vec<u8>>,
    pub(super) xattrs: Option<Xattrs>,
    pub(super) hash: Option<[u8; 32]>,
}

impl Entry {
    pub(super) fn stat(&self) -> io::Result<Stat> {
        match &self.err {
            None => Ok(self.st),
            Some((true, m)) => Err(io::Error::new(io::ErrorKind::NotFound, m.clone())),
            Some((false, m)) => Err(io::Error::other(m.clone())),
        }
    }
}

/// A directory of a remote SRC, as its sender listed it.
pub struct Dir {
    pub(super) peer: Arc<Peer>,
    pub(super) arg: u32,
    /// Its path from the argument's root.
    pub(super) rel: Vec<u8>,
    /// Sorted by name.
    pub(super) entries: Arc<Vec<Entry>>,
    /// Its own extended attributes (in its parent's listing).
    pub(super) own_xattrs: Option<Xattrs>,
}

impl Dir {
    pub(super) fn entry(&self, name: &[u8]) -> io::Result<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .map(|i| &self.entries[i])
            .map_err(|_| io::Error::new(io::ErrorKind::NotFound, "not listed by the sender"))
    }

    /// This directory with its own listing (an argument's root, `SRC/`).
    pub(super) fn peer_listing(self) -> io::Result<Dir> {
        let entries = self.peer.dir(self.arg, &self.rel)?;
        Ok(Dir { entries, ..self })
    }

    pub(super) fn open(&self, name: &[u8]) -> io::Result<Arc<Dir>> {
        let own_xattrs = self.entry(name)?.xattrs.clone();
        let rel = join(&self.rel, name);
        let entries = self.peer.dir(self.arg, &rel)?;
        Ok(Arc::new(Dir {
            peer: self.peer.clone(),
            arg: self.arg,
            rel,
            entries,
            own_xattrs,
        }))
    }
}

/// A SRC argument as the sender found it.
#[derive(Clone, Debug)]
pub struct Top {
    /// The argument as given (for messages).
    pub shown: Vec<u8>,
    /// `SRC/`: its contents (the entry's name is empty).
    pub contents: bool,
    /// Its node, or why it could not be read.
    pub entry: std::result::Result<Entry, String>,
}

// ---------------------------------------------------------------- encoding

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    put_u32(b, v.len() as u32);
    b.extend_from_slice(v);
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed {what}"))
}

fn put_entry(b: &mut Vec<u8>, e: &Entry) {
    put_bytes(b, &e.name);
    let st = &e.st;
    for v in [st.mode, st.uid, st.gid] {
        put_u32(b, v);
    }
    for v in [
        st.size,
        st.mtime_ns as u64,
        st.dev,
        st.ino,
        st.nlink,
        st.rdev,
    ] {
        put_u64(b, v);
    }
    let flags = u8::from(e.err.is_some())
        | u8::from(e.link.is_some()) << 1
        | u8::from(e.xattrs.is_some()) << 2
        | u8::from(e.hash.is_some()) << 3;
    b.push(flags);
    if let Some((vanished, msg)) = &e.err {
        b.push(u8::from(*vanished));
        put_bytes(b, msg.as_bytes());
    }
    if let Some(l) = &e.link {
        put_bytes(b, l);
    }
    if let Some(x) = &e.xattrs {
        put_u32(b, x.len() as u32);
        for (n, v) in x {
            put_bytes(b, n);
            put_bytes(b, v);
        }
    }
    if let Some(h) = &e.hash {
        b.extend_from_slice(h);
    }
}

fn get_entry(d: &mut Dec<'_>) -> io::Result<Entry> {
    let name = d.bytes()?.to_vec();
    let (mode, uid, gid) = (d.u32()?, d.u32()?, d.u32()?);
    let (size, mtime, dev, ino, nlink, rdev) =
        (d.u64()?, d.u64()?, d.u64()?, d.u64()?, d.u64()?, d.u64()?);
    let st = Stat {
        mode,
        uid,
        gid,
        size,
        mtime_ns: mtime as i64,
        ctime_ns: 0,
        dev,
        ino,
        nlink,
        rdev,
    };
    let flags = d.u8()?;
    let err = if flags & 1 != 0 {
        let v = d.u8()? != 0;
        Some((v, String::from_utf8_lossy(d.bytes()?).into_owned()))
    } else {
        None
    };
    let link = if flags & 2 != 0 {
        Some(d.bytes()?.to_vec())
    } else {
        None
    };
    let xattrs = if flags & 4 != 0 {
        let n = d.u32()?;
        let mut x = Vec::new();
        for _ in 0..n {
            x.push((d.bytes()?.to_vec(), d.bytes()?.to_vec()));
        }
        Some(x)
    } else {
        None
    };
    let hash = if flags & 8 != 0 {
        let mut h = [0u8; 32];
        for b in &mut h {
            *b = d.u8()?;
        }
        Some(h)
    } else {
        None
    };
    Ok(Entry {
        name,
        st,
        err,
        link,
        xattrs,
        hash,
    })
}

/// Every option, for a receiver on the far side (a sender needs a few).
pub(crate) fn encode_options(o: &SyncOptions, items: bool) -> Vec<u8> {
    let bits = [
        o.recursive,
        o.links,
        o.perms,
        o.times,
        o.group,
        o.owner,
        o.devices,
        o.specials,
        o.hard_links,
        o.acls,
        o.xattrs,
        o.sparse,
        o.numeric_ids,
        o.delete,
        o.delete_excluded,
        o.force_delete,
        o.checksum,
        o.size_only,
        o.update,
        o.ignore_existing,
        o.dry_run,
        o.whole_file,
        o.inplace,
        o.max_delete.is_some(),
        items,
    ];
    let mut flags = 0u32;
    for (i, b) in bits.iter().enumerate() {
        flags |= u32::from(*b) << i;
    }
    let mut b = Vec::new();
    put_u32(&mut b, flags);
    put_u64(&mut b, o.max_delete.unwrap_or(0));
    put_u64(&mut b, o.modify_window as u64);
    let rules: Vec<(bool, &str)> = o.filters.rules().collect();
    put_u32(&mut b, rules.len() as u32);
    for (include, p) in rules {
        b.push(u8::from(include));
        put_bytes(&mut b, p.as_bytes());
    }
    b
}

/// The options, and whether items are wanted back.
pub(crate) fn decode_options(d: &mut Dec<'_>) -> io::Result<(SyncOptions, bool)> {
    let flags = d.u32()?;
    let f = |i: u32| flags & (1 << i) != 0;
    let max_delete = d.u64()?;
    let modify_window = d.u64()? as i64;
    let mut filters = Filters::default();
    for _ in 0..d.u32()? {
        let include = d.u8()? != 0;
        let p = std::str::from_utf8(d.bytes()?).map_err(|_| bad("filter rule"))?;
        filters.push(include, p);
    }
    let o = SyncOptions {
        recursive: f(0),
        links: f(1),
        perms: f(2),
        times: f(3),
        group: f(4),
        owner: f(5),
        devices: f(6),
        specials: f(7),
        hard_links: f(8),
        acls: f(9),
        xattrs: f(10),
        sparse: f(11),
        numeric_ids: f(12),
        delete: f(13),
        delete_excluded: f(14),
        force_delete: f(15),
        checksum: f(16),
        size_only: f(17),
        update: f(18),
        ignore_existing: f(19),
        dry_run: f(20),
        whole_file: f(21),
        inplace: f(22),
        max_delete: f(23).then_some(max_delete),
        modify_window,
        filters,
        threads: 0,
    };
    Ok((o, f(24)))
}

/// SYNC's body: magic, version, role, options, paths.
pub(crate) fn hello(role: u8, o: &SyncOptions, items: bool, paths: &[&[u8]]) -> Vec<u8> {
    let mut b = Enc::default()
        .rest(wire::MAGIC)
        .u32(wire::VERSION)
        .u8(role)
        .0;
    b.extend_from_slice(&encode_options(o, items));
    put_u32(&mut b, paths.len() as u32);
    for p in paths {
        put_bytes(&mut b, p);
    }
    b
}

// ---------------------------------------------------------------- output

/// One side's frames out, from any thread.
struct Out {
    /// `None` once closed.
    w: Mutex<Option<BufWriter<Box<dyn Write + Send>>>>,
}

impl Out {
    fn new(w: Box<dyn Write + Send>) -> Out {
        Out {
            w: Mutex::new(Some(BufWriter::with_capacity(1 << 20, w))),
        }
    }

    fn frame(&self, o: u8, id: u64, body: &[u8], flush: bool) -> io::Result<()> {
        let mut w = self
            .w
            .lock()
            .map_err(|_| io::Error::other("a writer panicked"))?;
        let w = w
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        wire::write_frame(w, o, id, body).and_then(|()| if flush { w.flush() } else { Ok(()) })
    }

    /// Flushes and closes the stream (the far side sees its end).
    fn close(&self) -> io::Result<()> {
        let w = self.w.lock().ok().and_then(|mut w| w.take());
        match w {
            Some(mut w) => w.flush(),
            None => Ok(()),
        }
    }

    /// The stream itself, unbuffered again (what was buffered written).
    fn into_inner(self) -> io::Result<Box<dyn Write + Send>> {
        let w = self
            .w
            .into_inner()
            .map_err(|_| io::Error::other("a writer panicked"))?;
        match w {
            Some(w) => w.into_inner().map_err(|e| e.into_error()),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

// ---------------------------------------------------------------- receiver

/// The sender, seen from the receiver: what it listed so far, and the
/// files being fetched.
pub struct Peer {
    out: Out,
    state: Mutex<State>,
    cond: Condvar,
    next: AtomicU64,
}

#[derive(Default)]
struct State {
    tops: Vec<Top>,
    /// Listings by (argument, path): complete, or still arriving.
    dirs: HashMap<(u32, Vec<u8>), Listed>,
    listed: bool,
    /// Why the connection ended, once it has.
    gone: Option<String>,
    files: HashMap<u64, SyncSender<Frame>>,
}

enum Listed {
    Partial(Vec<Entry>),
    Done(Arc<Vec<Entry>>),
    Failed(String),
}

impl Peer {
    /// A peer writing to `output`; [`Peer::read`] must run on `input`.
    pub fn new(output: Box<dyn Write + Send>) -> Arc<Peer> {
        Arc::new(Peer {
            out: Out::new(output),
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            next: AtomicU64::new(1),
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
                    got.push(get_entry(&mut d)?);
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
            op::LISTED => self.update(|s| s.listed = true),
            op::DATA | op::DONE => {
                let tx = {
                    let mut s = self.lock()?;
                    if o == op::DONE {
                        s.files.remove(&id)
                    } else {
                        s.files.get(&id).cloned()
                    }
                };
                // A fetch that gave up (its worker failed) drops the rest.
                if let Some(tx) = tx {
                    let _ = tx.send((o, body));
                }
                Ok(())
            }
            _ => Err(bad(&format!("frame (op {o})"))),
        }
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

    /// The SRC arguments, once the sender has said all `n` of them.
    pub fn tops(&self, n: usize) -> io::Result<Vec<Top>> {
        let mut s = self.lock()?;
        loop {
            if s.tops.len() >= n {
                return Ok(s.tops.clone());
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

    /// The listing of `rel` under argument `arg`, once it has come.
    fn dir(&self, arg: u32, rel: &[u8]) -> io::Result<Arc<Vec<Entry>>> {
        let key = (arg, rel.to_vec());
        let mut s = self.lock()?;
        loop {
            match s.dirs.get(&key) {
                Some(Listed::Done(v)) => return Ok(v.clone()),
                Some(Listed::Failed(m)) => return Err(io::Error::other(m.clone())),
                _ if s.listed => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "not listed by the sender",
                    ))
                }
                _ => {}
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

    /// Asks for a file's bytes from `start` on, as a delta against `sig`.
    fn fetch(
        &self,
        arg: u32,
        rel: &[u8],
        start: u64,
        sig: Option<&Signature>,
    ) -> io::Result<(u64, Receiver<Frame>)> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(WINDOW);
        {
            let mut s = self.lock()?;
            if let Some(why) = &s.gone {
                return Err(Self::lost(why));
            }
            s.files.insert(id, tx);
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
        let last = entries.is_empty();
        self.out.frame(op::FILE, id, &b, last)?;
        let parts = entries.len().div_ceil(SIG_STEP);
        for (i, part) in entries.chunks(SIG_STEP).enumerate() {
            self.out.frame(op::SIG, id, part, i + 1 == parts)?;
        }
        Ok((id, rx))
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

/// The sender's answer to a fetch, applied to `out` from `start` on:
/// ranges of `old`, new bytes, zeros (left unwritten: `out` is new).
/// Returns the file's (size, mtime) as the sender read it, and the bytes
/// (new, matched).
fn apply(
    rx: &Receiver<Frame>,
    old: Option<&File>,
    out: &File,
    start: u64,
    sparse: bool,
    mut done: impl FnMut(u64) -> io::Result<()>,
) -> io::Result<((u64, i64), (u64, u64))> {
    let mut pos = start;
    thread_local! {
        static DZ: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let mut dz = match DZ.with(|d| d.borrow_mut().take()) {
        Some(d) => d,
        None => zstd::bulk::Decompressor::new()?,
    };
    let r = apply_with(rx, old, out, &mut pos, sparse, &mut done, &mut dz);
    DZ.with(|d| *d.borrow_mut() = Some(dz));
    r
}

fn apply_with(
    rx: &Receiver<Frame>,
    old: Option<&File>,
    out: &File,
    pos: &mut u64,
    sparse: bool,
    done: &mut impl FnMut(u64) -> io::Result<()>,
    dz: &mut zstd::bulk::Decompressor<'static>,
) -> io::Result<((u64, i64), (u64, u64))> {
    let (mut literal, mut matched) = (0u64, 0u64);
    let mut data = Vec::new();
    loop {
        let (o, body) = rx
            .recv()
            .map_err(|_| Peer::lost("connection lost during a transfer"))?;
        let mut d = Dec::new(&body);
        if o == op::DONE {
            return Ok((done_status(&mut d)?, (literal, matched)));
        }
        while !d.rest_is_empty() {
            match d.u8()? {
                1 => {
                    let (from, len) = (d.u64()?, d.u64()?);
                    let old = old.ok_or_else(|| bad("copy without an old file"))?;
                    if sparse {
                        file::copy_data_to(old, from, len, out, *pos)?;
                    } else {
                        file::copy_range(old, from, out, *pos, len)?;
                    }
                    *pos += len;
                    matched += len;
                }
                2 => {
                    let raw = d.u32()? as usize;
                    if raw > STEP {
                        return Err(bad("data record"));
                    }
                    let z = d.bytes()?;
                    data.clear();
                    data.reserve(raw);
                    let n = dz
                        .decompress_to_buffer(z, &mut data)
                        .map_err(|_| bad("data record"))?;
                    if n != raw {
                        return Err(bad("data record"));
                    }
                    out.write_all_at(&data, *pos)?;
                    *pos += raw as u64;
                    literal += raw as u64;
                }
                3 => {
                    let len = d.u64()?;
                    *pos += len;
                    literal += len;
                }
                _ => return Err(bad("data record")),
            }
        }
        done(*pos)?;
    }
}

/// Brings one regular file over from a remote SRC: the old file's
/// signature out, the delta back, written beside the old file (or into a
/// partial file that a later sync resumes) and renamed over it.
pub(super) fn transfer(s: &Shared<'_>, j: &Job, d: &Dir) -> io::Result<()> {
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
    if j.old.is_some() && super::inplace::recover(dir, &j.dname)? {
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
        let sig = match &old {
            Some(f) => Some(file::signature_of(f, source::stat_fd(f.as_fd())?.size)?),
            None => None,
        };
        let (_, rx) = d
            .peer
            .fetch(d.arg, &join(&d.rel, &j.sname), start, sig.as_ref())?;
        let mut checkpoint =
            transfer::checkpointer(&j.st, &j.dname, dir, &out, old.as_ref(), big, start);
        let ((size, mtime), moved) = apply(
            &rx,
            old.as_ref(),
            &out,
            start,
            s.opts.sparse,
            &mut checkpoint,
        )?;
        out.set_len(size)?;
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
    let sig = file::signature_of(old, ost.size)?;
    let (_, rx) = d
        .peer
        .fetch(d.arg, &join(&d.rel, &j.sname), 0, Some(&sig))?;
    let shadow = shadow_file(dir)?;
    let (pieces, (size, mtime), (literal, matched)) = collect(&rx, &shadow)?;
    // Zeros at the end were not written: the shadow reads them as zeros
    // only inside its length.
    shadow.set_len(size)?;
    let mut st = j.st;
    st.size = size;
    st.mtime_ns = mtime;
    let planned = super::inplace::apply(
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
                out.set_len(size)?;
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
fn collect(rx: &Receiver<Frame>, shadow: &File) -> io::Result<Collected> {
    let mut pieces = Vec::new();
    let mut pos = 0u64;
    let mut matched = 0u64;
    let mut dz = zstd::bulk::Decompressor::new()?;
    let mut data = Vec::new();
    loop {
        let (o, body) = rx
            .recv()
            .map_err(|_| Peer::lost("connection lost during a transfer"))?;
        let mut d = Dec::new(&body);
        if o == op::DONE {
            return Ok((pieces, done_status(&mut d)?, (pos - matched, matched)));
        }
        while !d.rest_is_empty() {
            match d.u8()? {
                1 => {
                    let (from, len) = (d.u64()?, d.u64()?);
                    file::push(&mut pieces, Piece::Old { from, len });
                    pos += len;
                    matched += len;
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
                    shadow.write_all_at(&data, pos)?;
                    file::push(
                        &mut pieces,
                        Piece::New {
                            from: pos,
                            len: n as u64,
                        },
                    );
                    pos += n as u64;
                }
                3 => {
                    // Zeros: a hole of the shadow reads as zeros.
                    let len = d.u64()?;
                    file::push(&mut pieces, Piece::New { from: pos, len });
                    pos += len;
                }
                _ => return Err(bad("data record")),
            }
        }
    }
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
    super::run(super::Srcs::Remote(peer.clone(), tops), dst, opts, ev)
}

// ---------------------------------------------------------------- sender

/// Where each argument's paths start: the directory itself (`SRC/`) or
/// its parent.
struct Root {
    fd: Option<Arc<OwnedFd>>,
}

/// A request being read: FILE's header and the signature so far.
struct Request {
    arg: u32,
    rel: Vec<u8>,
    start: u64,
    block_size: u32,
    old_size: u64,
    want: usize,
    entries: Vec<u8>,
}

/// What a sender does with frames that are not requests (a push: the
/// receiver's items and report).
pub trait Reports {
    /// A frame of the receiver's; `Some` ends the session with its outcome.
    fn frame(&self, o: u8, body: &[u8]) -> Option<Result<SyncReport>>;
}

/// Runs a sender: lists `srcs`, then answers the receiver's requests until
/// it says END (a pull) or reports (a push, through `reports`).
///
/// # Errors
/// A lost connection; a protocol error.
pub fn send(
    srcs: &[Vec<u8>],
    opts: &SyncOptions,
    input: impl Read + Send,
    output: Box<dyn Write + Send>,
    reports: Option<&dyn Reports>,
) -> Result<Option<SyncReport>> {
    let out = Out::new(output);
    let stop = AtomicBool::new(false);
    let matcher = opts.filters.matcher()?;
    let roots: Vec<Root> = srcs.iter().map(|p| open_root(p)).collect();
    let (tx, rx) = sync_channel::<(u64, Request)>(64);
    let rx = Mutex::new(rx);
    let loc = || {
        Error::io(
            Path::new("(remote)"),
            io::ErrorKind::ConnectionAborted.into(),
        )
    };
    std::thread::scope(|scope| -> Result<Option<SyncReport>> {
        let (out, stop, roots, rx) = (&out, &stop, &roots, &rx);
        let matcher = matcher.as_ref();
        scope.spawn(move || {
            list_all(srcs, roots, opts, matcher, out, stop);
        });
        for _ in 0..SENDERS {
            scope.spawn(move || loop {
                let next = match rx.lock() {
                    Ok(r) => r.recv(),
                    Err(_) => return,
                };
                let Ok((id, req)) = next else { return };
                answer(roots, id, &req, out);
            });
        }
        let mut r = BufReader::with_capacity(1 << 20, input);
        let mut pending: HashMap<u64, Request> = HashMap::new();
        let outcome = loop {
            let frame = match wire::read_frame(&mut r) {
                Ok(Some(f)) => f,
                Ok(None) => break Err(loc()),
                Err(e) => break Err(Error::io(Path::new("(remote)"), e)),
            };
            let (o, id, body) = frame;
            let mut d = Dec::new(&body);
            let got = match o {
                op::FILE => (|| -> io::Result<Option<Request>> {
                    let req = Request {
                        arg: d.u32()?,
                        rel: d.bytes()?.to_vec(),
                        start: d.u64()?,
                        block_size: d.u32()?,
                        old_size: d.u64()?,
                        want: usize::try_from(d.u64()?).map_err(|_| bad("request"))?,
                        entries: Vec::new(),
                    };
                    if req.want == 0 {
                        return Ok(Some(req));
                    }
                    pending.insert(id, req);
                    Ok(None)
                })(),
                op::SIG => (|| -> io::Result<Option<Request>> {
                    let req = pending.get_mut(&id).ok_or_else(|| bad("signature"))?;
                    if req.entries.len() + body.len() > req.want {
                        return Err(bad("signature"));
                    }
                    req.entries.extend_from_slice(&body);
                    if req.entries.len() == req.want {
                        return Ok(pending.remove(&id));
                    }
                    Ok(None)
                })(),
                op::END => break Ok(None),
                _ => match reports.and_then(|rep| rep.frame(o, &body)) {
                    Some(r) => break r.map(Some),
                    None if reports.is_some() => Ok(None),
                    None => Err(bad(&format!("frame (op {o})"))),
                },
            };
            match got {
                Ok(Some(req)) => {
                    if tx.send((id, req)).is_err() {
                        break Err(loc());
                    }
                }
                Ok(None) => {}
                Err(e) => break Err(Error::io(Path::new("(remote)"), e)),
            }
        };
        stop.store(true, Ordering::Relaxed);
        drop(tx);
        outcome
    })
}

fn open_root(p: &[u8]) -> Root {
    let path = Path::new(std::ffi::OsStr::from_bytes(p));
    let contents = super::ends_with_slash(path);
    let dir: Option<PathBuf> = if contents {
        Some(path.to_path_buf())
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => Some(p.to_path_buf()),
            _ => Some(PathBuf::from(".")),
        }
    };
    let fd = dir.and_then(|d| {
        rustix::fs::open(
            &d,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()
    });
    Root {
        fd: fd.map(Arc::new),
    }
}

/// The entry of `name` in `dir` (at `rel`), with what the options ask.
fn entry_of(dir: BorrowedFd<'_>, name: &[u8], opts: &SyncOptions) -> Entry {
    let mut e = Entry {
        name: name.to_vec(),
        st: Stat {
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            dev: 0,
            ino: 0,
            nlink: 0,
            rdev: 0,
        },
        err: None,
        link: None,
        xattrs: None,
        hash: None,
    };
    let st = match source::stat_at(dir, name) {
        Ok(st) => st,
        Err(e2) => {
            e.err = Some((e2.kind() == io::ErrorKind::NotFound, e2.to_string()));
            return e;
        }
    };
    e.st = st;
    if st.file_type() == libc::S_IFLNK {
        match source::read_link(dir, name) {
            Ok(t) => e.link = Some(t),
            Err(x) => e.err = Some((x.kind() == io::ErrorKind::NotFound, x.to_string())),
        }
    }
    if opts.xattrs || opts.acls {
        match source::xattrs(XattrSource::Path(&proc_path(Target::At(dir, name)))) {
            Ok(x) => e.xattrs = Some(x),
            Err(x) => e.err = Some((x.kind() == io::ErrorKind::NotFound, x.to_string())),
        }
    }
    if opts.checksum && st.is_file() {
        match source::open_file(dir, name).and_then(|f| hash_file(&f)) {
            Ok(h) => e.hash = Some(h),
            Err(x) => e.err = Some((x.kind() == io::ErrorKind::NotFound, x.to_string())),
        }
    }
    e
}

/// TOP for every argument, then every directory's listing (depth first,
/// names in order), then LISTED.
fn list_all(
    srcs: &[Vec<u8>],
    roots: &[Root],
    opts: &SyncOptions,
    matcher: Option<&super::filter::Matcher>,
    out: &Out,
    stop: &AtomicBool,
) {
    let mut walks: Vec<(u32, Arc<OwnedFd>, Vec<u8>)> = Vec::new();
    let Ok(mut z) = Lister::new() else { return };
    for (i, (p, root)) in srcs.iter().zip(roots).enumerate() {
        let path = Path::new(std::ffi::OsStr::from_bytes(p));
        let contents = super::ends_with_slash(path);
        let mut b = Vec::new();
        put_bytes(&mut b, p);
        b.push(u8::from(contents));
        let found: std::result::Result<(Entry, Option<Arc<OwnedFd>>), String> =
            match (&root.fd, contents) {
                (None, _) => Err("cannot open its directory".into()),
                (Some(fd), true) => {
                    source::stat_fd(fd.as_fd())
                        .map_err(|e| e.to_string())
                        .map(|st| {
                            let mut e = entry_of(fd.as_fd(), b".", opts);
                            e.name = Vec::new();
                            e.st = st;
                            (e, Some(fd.clone()))
                        })
                }
                (Some(fd), false) => match path.file_name() {
                    None => Err("not a file name (add a trailing / to sync its contents)".into()),
                    Some(n) => {
                        let e = entry_of(fd.as_fd(), n.as_bytes(), opts);
                        match e.stat() {
                            Err(x) => Err(x.to_string()),
                            Ok(st) if st.is_dir() && opts.recursive => {
                                match source::open_dir(Some(fd.as_fd()), n.as_bytes()) {
                                    Ok(d) => Ok((e, Some(Arc::new(d)))),
                                    Err(x) => Err(x.to_string()),
                                }
                            }
                            Ok(_) => Ok((e, None)),
                        }
                    }
                },
            };
        match found {
            Ok((e, dir)) => {
                b.push(0);
                if let Some(d) = dir {
                    walks.push((i as u32, d, e.name.clone()));
                }
                put_entry(&mut b, &e);
            }
            Err(m) => {
                b.push(1);
                b.extend_from_slice(m.as_bytes());
            }
        }
        if out.frame(op::TOP, 0, &b, false).is_err() {
            return;
        }
    }
    for (arg, fd, rel) in walks {
        if list_tree(arg, fd, rel, opts, matcher, out, stop, &mut z).is_err() {
            return;
        }
    }
    let _ = out.frame(op::LISTED, 0, &[], true);
}

/// One argument's directories, depth first.
#[allow(clippy::too_many_arguments)]
fn list_tree(
    arg: u32,
    fd: Arc<OwnedFd>,
    rel: Vec<u8>,
    opts: &SyncOptions,
    matcher: Option<&super::filter::Matcher>,
    out: &Out,
    stop: &AtomicBool,
    z: &mut Lister,
) -> io::Result<()> {
    // (parent, name, path): opened when its turn comes.
    let mut todo: Vec<Pending> = vec![(fd, None, rel)];
    while let Some((parent, name, rel)) = todo.pop() {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let dir = match &name {
            None => Ok(parent),
            Some(n) => source::open_dir(Some(parent.as_fd()), n).map(Arc::new),
        };
        let listed = dir.and_then(|d| {
            let mut names = source::read_names(d.as_fd())?;
            names.sort_unstable();
            Ok((d, names))
        });
        let (dir, names) = match listed {
            Ok(l) => l,
            Err(e) => {
                send_failed(arg, &rel, &e.to_string(), out, z)?;
                continue;
            }
        };
        let entries: Vec<Entry> = {
            use rayon::prelude::*;
            names
                .par_iter()
                .with_min_len(16)
                .map(|(n, _)| entry_of(dir.as_fd(), n, opts))
                .collect()
        };
        let entries: Vec<Entry> = entries
            .into_iter()
            .filter(|e| {
                let is_dir = e.err.is_none() && e.st.is_dir();
                !matcher.is_some_and(|m| m.excluded(&join(&rel, &e.name), is_dir))
            })
            .collect();
        send_listing(arg, &rel, &entries, out, z)?;
        if opts.recursive {
            for e in entries.iter().rev() {
                if e.err.is_none() && e.st.is_dir() {
                    todo.push((dir.clone(), Some(e.name.clone()), join(&rel, &e.name)));
                }
            }
        }
    }
    Ok(())
}

/// The listings' compression: one zstd stream for the session, flushed
/// at each DIR frame (names and attributes repeat from directory to
/// directory).
pub(crate) struct Lister {
    enc: zstd::stream::raw::Encoder<'static>,
}

impl Lister {
    fn new() -> io::Result<Lister> {
        Ok(Lister {
            enc: zstd::stream::raw::Encoder::new(3)?,
        })
    }

    /// One DIR frame of `raw`, compressed.
    fn frame(&mut self, raw: &[u8], out: &Out, flush: bool) -> io::Result<()> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut z: Vec<u8> = Vec::with_capacity(raw.len() / 2 + 64);
        let mut buf = vec![0u8; 64 << 10];
        let mut input = InBuffer::around(raw);
        while input.pos() < raw.len() {
            let mut o = OutBuffer::around(&mut buf[..]);
            self.enc.run(&mut input, &mut o)?;
            let n = o.pos();
            z.extend_from_slice(&buf[..n]);
        }
        loop {
            let mut o = OutBuffer::around(&mut buf[..]);
            let left = self.enc.flush(&mut o)?;
            let n = o.pos();
            z.extend_from_slice(&buf[..n]);
            if left == 0 {
                break;
            }
        }
        out.frame(op::DIR, 0, &z, flush)
    }
}

/// DIR frames of a listing (split when it is big): argument, path, status
/// 0, more, count, entries.
fn send_listing(
    arg: u32,
    rel: &[u8],
    entries: &[Entry],
    out: &Out,
    z: &mut Lister,
) -> io::Result<()> {
    let mut i = 0;
    loop {
        let mut raw = Vec::new();
        put_u32(&mut raw, arg);
        put_bytes(&mut raw, rel);
        raw.push(0);
        let more_at = raw.len();
        raw.push(0);
        let count_at = raw.len();
        put_u32(&mut raw, 0);
        let mut n = 0u32;
        while i < entries.len() && raw.len() < 8 << 20 {
            put_entry(&mut raw, &entries[i]);
            i += 1;
            n += 1;
        }
        let more = i < entries.len();
        raw[more_at] = u8::from(more);
        raw[count_at..count_at + 4].copy_from_slice(&n.to_le_bytes());
        z.frame(&raw, out, !more)?;
        if !more {
            return Ok(());
        }
    }
}

/// A DIR frame saying why a directory could not be listed.
fn send_failed(arg: u32, rel: &[u8], why: &str, out: &Out, z: &mut Lister) -> io::Result<()> {
    let mut raw = Vec::new();
    put_u32(&mut raw, arg);
    put_bytes(&mut raw, rel);
    raw.push(1);
    put_bytes(&mut raw, why.as_bytes());
    z.frame(&raw, out, true)
}

/// A sender thread's last directory: (argument, path, descriptor).
type LastDir = Option<(u32, Vec<u8>, Arc<OwnedFd>)>;

/// Opens `rel` (names from the argument's root, never through a symlink).
/// The directory is kept for the next request of the thread: files are
/// asked for in walk order, most in the directory of the one before.
fn open_rel(root: &Root, arg: u32, rel: &[u8]) -> io::Result<File> {
    thread_local! {
        static LAST: std::cell::RefCell<LastDir> =
            const { std::cell::RefCell::new(None) };
    }
    let fd = root
        .fd
        .as_ref()
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let (parent, last) = match rel.iter().rposition(|&c| c == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&rel[..0], rel),
    };
    let names: Vec<&[u8]> = if parent.is_empty() {
        Vec::new()
    } else {
        parent.split(|&c| c == b'/').collect()
    };
    if last.is_empty()
        || names
            .iter()
            .any(|n| n.is_empty() || *n == b".." || *n == b".")
    {
        return Err(bad("path"));
    }
    let cached = LAST.with(|l| {
        l.borrow()
            .as_ref()
            .filter(|(a, p, _)| *a == arg && p.as_slice() == parent)
            .map(|(_, _, d)| d.clone())
    });
    let dir = match cached {
        Some(d) => d,
        None => {
            let mut dir = fd.clone();
            for n in names {
                dir = Arc::new(source::open_dir(Some(dir.as_fd()), n)?);
            }
            LAST.with(|l| *l.borrow_mut() = Some((arg, parent.to_vec(), dir.clone())));
            dir
        }
    };
    source::open_file(dir.as_fd(), last)
}

/// Answers one FILE request: DATA frames, then DONE.
fn answer(roots: &[Root], id: u64, req: &Request, out: &Out) {
    let r = (|| -> io::Result<(u64, i64)> {
        let root = roots.get(req.arg as usize).ok_or_else(|| bad("request"))?;
        let f = open_rel(root, req.arg, &req.rel)?;
        let st = source::stat_fd(f.as_fd())?;
        if !st.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        let sig = (req.want > 0 && req.block_size as u64 == BLOCK).then(|| Signature {
            block_size: req.block_size,
            file_size: req.old_size,
            entries: req.entries.clone(),
        });
        if let Some(s) = &sig {
            if (s.file_size.div_ceil(BLOCK) as usize) * crate::format::sig::ENTRY_SIZE
                != s.entries.len()
            {
                return Err(bad("signature"));
            }
        }
        let start = req.start.min(st.size);
        let pieces = plan(&f, st.size, start, sig.as_ref())?;
        stream(out, id, &f, &pieces)?;
        Ok((st.size, st.mtime_ns))
    })();
    let mut b = Vec::new();
    match r {
        Ok((size, mtime)) => {
            b.push(0);
            put_u64(&mut b, size);
            put_u64(&mut b, mtime as u64);
        }
        Err(e) => {
            b.push(if e.kind() == io::ErrorKind::NotFound {
                1
            } else {
                2
            });
            b.extend_from_slice(e.to_string().as_bytes());
        }
    }
    let _ = out.frame(op::DONE, id, &b, true);
}

/// What to send of `f` from `start` on against the receiver's old file:
/// blocks compared at the same offsets first (a VM image changes in
/// place), the rsync search when a quarter or more differ.
fn plan(f: &File, size: u64, start: u64, sig: Option<&Signature>) -> io::Result<Vec<Piece>> {
    let whole = vec![Piece::New {
        from: start,
        len: size - start,
    }];
    let Some(sig) = sig.filter(|s| s.file_size > 0 && size > start) else {
        return Ok(whole);
    };
    if let Some(p) = aligned(f, size, start, sig)? {
        return Ok(p);
    }
    file::search(f, size, start, sig)
}

/// Blocks of `f` that hash as the old file's at the same offset; `None`
/// when a quarter or more of the common part differs.
fn aligned(f: &File, size: u64, start: u64, sig: &Signature) -> io::Result<Option<Vec<Piece>>> {
    use rayon::prelude::*;
    const CHUNK: u64 = 4 << 20;
    let es = crate::format::sig::ENTRY_SIZE;
    // Whole blocks of both only (a short last block of the old file is
    // new bytes here).
    let common = (size.min(sig.file_size) / BLOCK) * BLOCK;
    let first = start / BLOCK * BLOCK;
    if common <= first {
        return Ok(None);
    }
    // Holes are not read: their blocks are the zero block.
    let segs = file::data_segments(f, common);
    let zero = file::entries_of(&[0u8; BLOCK as usize]);
    let parts: Vec<io::Result<Vec<Piece>>> = (first / CHUNK..common.div_ceil(CHUNK))
        .into_par_iter()
        .map_init(
            || vec![0u8; CHUNK as usize],
            |buf, c| {
                let at = (c * CHUNK).max(first);
                let end = ((c + 1) * CHUNK).min(common);
                let len = (end - at) as usize;
                let mine = if file::has_data(&segs, at, end) {
                    if file::read_full(f, &mut buf[..len], at)? != len {
                        return Err(file::shrank());
                    }
                    file::entries_of(&buf[..len])
                } else {
                    zero.repeat(len / BLOCK as usize)
                };
                let k0 = (at / BLOCK) as usize;
                let mut out = Vec::new();
                for (i, e) in mine.chunks(es).enumerate() {
                    let theirs = sig.entries.get((k0 + i) * es..(k0 + i + 1) * es);
                    let from = at + i as u64 * BLOCK;
                    let p = if theirs == Some(e) {
                        Piece::Old { from, len: BLOCK }
                    } else {
                        Piece::New { from, len: BLOCK }
                    };
                    file::push(&mut out, p);
                }
                Ok(out)
            },
        )
        .collect();
    let mut out = Vec::new();
    let mut differ = 0u64;
    for part in parts {
        for p in part? {
            if let Piece::New { len, .. } = p {
                differ += len;
            }
            file::push(&mut out, p);
        }
    }
    if differ * 4 >= common - first {
        return Ok(None);
    }
    file::push(
        &mut out,
        Piece::New {
            from: common,
            len: size - common,
        },
    );
    Ok(Some(file::skip_before(out, start - first)))
}

/// DATA frames for `pieces`: ranges of the old file, new bytes compressed
/// (all-zero blocks as zeros).
fn stream(out: &Out, id: u64, f: &File, pieces: &[Piece]) -> io::Result<()> {
    // A thread's buffers and compressor serve all its files (most are
    // small: a fresh megabyte and zstd context each would cost more than
    // the file).
    thread_local! {
        static BUFS: std::cell::RefCell<(Vec<u8>, Vec<u8>, Option<zstd::bulk::Compressor<'static>>)> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new(), None)) };
    }
    BUFS.with(|b| {
        let (rec, buf, z) = &mut *b.borrow_mut();
        if z.is_none() {
            *z = Some(zstd::bulk::Compressor::new(3)?);
        }
        let z = z
            .as_mut()
            .ok_or_else(|| io::Error::other("no compressor"))?;
        rec.clear();
        stream_with(out, id, f, pieces, rec, buf, z)
    })
}

fn stream_with(
    out: &Out,
    id: u64,
    f: &File,
    pieces: &[Piece],
    rec: &mut Vec<u8>,
    buf: &mut Vec<u8>,
    z: &mut zstd::bulk::Compressor<'static>,
) -> io::Result<()> {
    let mut zbuf = Vec::new();
    let send = |rec: &mut Vec<u8>| -> io::Result<()> {
        if !rec.is_empty() {
            out.frame(op::DATA, id, rec, false)?;
            rec.clear();
        }
        Ok(())
    };
    for p in pieces {
        match *p {
            Piece::Old { from, len } => {
                rec.push(1);
                put_u64(rec, from);
                put_u64(rec, len);
            }
            Piece::Zero { len } => {
                rec.push(3);
                put_u64(rec, len);
            }
            Piece::New { from, len } => {
                let mut at = from;
                while at < from + len {
                    let n = (from + len - at).min(STEP as u64) as usize;
                    if buf.len() < n {
                        buf.resize(n, 0);
                    }
                    if file::read_full(f, &mut buf[..n], at)? != n {
                        return Err(file::shrank());
                    }
                    for (zero, run) in zero_runs(&buf[..n]) {
                        if zero {
                            rec.push(3);
                            put_u64(rec, run.len() as u64);
                        } else {
                            rec.push(2);
                            put_u32(rec, run.len() as u32);
                            zbuf.clear();
                            zbuf.reserve(zstd::zstd_safe::compress_bound(run.len()));
                            z.compress_to_buffer(run, &mut zbuf)?;
                            put_bytes(rec, &zbuf);
                        }
                    }
                    at += n as u64;
                    if rec.len() >= STEP {
                        send(rec)?;
                    }
                }
            }
        }
        if rec.len() >= STEP {
            send(rec)?;
        }
    }
    send(rec)
}

/// `data` cut into runs of whole zero blocks and the rest.
fn zero_runs(data: &[u8]) -> Vec<(bool, &[u8])> {
    let mut out: Vec<(bool, &[u8])> = Vec::new();
    let mut start = 0;
    let mut cur: Option<bool> = None;
    for (i, b) in data.chunks(BLOCK as usize).enumerate() {
        let z = b.len() == BLOCK as usize && b.iter().all(|&x| x == 0);
        let at = i * BLOCK as usize;
        match cur {
            Some(c) if c != z => {
                out.push((c, &data[start..at]));
                start = at;
                cur = Some(z);
            }
            None => cur = Some(z),
            _ => {}
        }
    }
    if let Some(c) = cur {
        out.push((c, &data[start..]));
    }
    out
}

// ---------------------------------------------------------------- sessions

/// A receiver on the far side reports through frames.
struct FrameEvents<'a> {
    out: &'a Out,
    /// The client prints items (-i, --json).
    items: bool,
}

impl SyncEvents for FrameEvents<'_> {
    fn wants_items(&self) -> bool {
        self.items
    }

    fn item(&self, item: &Item<'_>) {
        if !self.items {
            return;
        }
        let mut b = Vec::new();
        put_bytes(&mut b, item.code.as_bytes());
        put_bytes(&mut b, item.path);
        match item.link {
            Some((kind, to)) => {
                b.push(if kind.contains("->") { 1 } else { 2 });
                put_bytes(&mut b, to);
            }
            None => b.push(0),
        }
        put_u64(&mut b, item.size);
        let _ = self.out.frame(op::ITEM, 0, &b, false);
    }

    fn warn(&self, msg: &str) {
        let _ = self.out.frame(op::WARN, 0, msg.as_bytes(), true);
    }

    fn message(&self, msg: &str) {
        let _ = self.out.frame(op::MESSAGE, 0, msg.as_bytes(), false);
    }
}

fn encode_report(r: &SyncReport) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [
        r.files,
        r.bytes,
        r.transferred,
        r.literal_bytes,
        r.matched_bytes,
        r.read_bytes,
        r.written_bytes,
        r.created,
        r.deleted,
        r.delete_skipped,
        u64::from(r.delete_inhibited),
        r.vanished,
        r.errors,
    ] {
        put_u64(&mut b, v);
    }
    b
}

fn decode_report(body: &[u8]) -> io::Result<SyncReport> {
    let mut d = Dec::new(body);
    let mut v = [0u64; 13];
    for x in &mut v {
        *x = d.u64()?;
    }
    Ok(SyncReport {
        files: v[0],
        bytes: v[1],
        transferred: v[2],
        literal_bytes: v[3],
        matched_bytes: v[4],
        read_bytes: v[5],
        written_bytes: v[6],
        created: v[7],
        deleted: v[8],
        delete_skipped: v[9],
        delete_inhibited: v[10] != 0,
        vanished: v[11],
        errors: v[12],
    })
}

/// The client's side of a push: the far receiver's frames to `ev`.
struct Relay<'a> {
    ev: &'a dyn SyncEvents,
}

impl Reports for Relay<'_> {
    fn frame(&self, o: u8, body: &[u8]) -> Option<Result<SyncReport>> {
        let text = || String::from_utf8_lossy(body).into_owned();
        match o {
            op::ITEM => {
                let mut d = Dec::new(body);
                let r = (|| -> io::Result<()> {
                    let code = String::from_utf8_lossy(d.bytes()?).into_owned();
                    let path = d.bytes()?.to_vec();
                    let link = match d.u8()? {
                        0 => None,
                        k => Some((if k == 1 { " -> " } else { " => " }, d.bytes()?.to_vec())),
                    };
                    let size = d.u64()?;
                    self.ev.item(&Item {
                        code: &code,
                        path: &path,
                        link: link.as_ref().map(|(k, t)| (*k, t.as_slice())),
                        size,
                    });
                    Ok(())
                })();
                r.err().map(|e| Err(Error::io(Path::new("(remote)"), e)))
            }
            op::WARN => {
                self.ev.warn(&text());
                None
            }
            op::MESSAGE => {
                self.ev.message(&text());
                None
            }
            op::REPORT => {
                Some(decode_report(body).map_err(|e| Error::io(Path::new("(remote)"), e)))
            }
            op::FAIL => Some(Err(Error::InvalidInput(text()))),
            _ => Some(Err(Error::io(
                Path::new("(remote)"),
                bad(&format!("frame (op {o})")),
            ))),
        }
    }
}

/// What SYNC asks: role, (options, items wanted), paths.
type Session = (u8, (SyncOptions, bool), Vec<Vec<u8>>);

/// The far side of a sync session (`dsync serve` got SYNC): sends SRC or
/// receives into DST over `input` and `output`.
///
/// # Errors
/// A malformed SYNC (answered, then returned); a lost connection.
pub fn serve(
    check: &PathCheck<'_>,
    id: u64,
    body: &[u8],
    input: impl Read + Send + 'static,
    output: Box<dyn Write + Send>,
) -> io::Result<()> {
    let out = Out::new(output);
    let parsed = (|| -> io::Result<Session> {
        let mut d = Dec::new(body);
        let mut magic = [0u8; 8];
        for b in &mut magic {
            *b = d.u8()?;
        }
        let version = d.u32()?;
        if &magic != wire::MAGIC || version != wire::VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "protocol version {version} asked, this dsync speaks {}",
                    wire::VERSION
                ),
            ));
        }
        let role = d.u8()?;
        let opts = decode_options(&mut d)?;
        let n = d.u32()?;
        let mut paths = Vec::new();
        for _ in 0..n {
            paths.push(d.bytes()?.to_vec());
        }
        if paths.is_empty() || role > role::RECEIVE {
            return Err(bad("SYNC"));
        }
        Ok((role, opts, paths))
    })();
    let (role, (opts, items), paths) = match parsed {
        Ok(p) => p,
        Err(e) => {
            let b = Enc::default()
                .u8(wire::err::INVALID)
                .rest(e.to_string().as_bytes())
                .0;
            out.frame(wire::op::ERR, id, &b, true)?;
            return Err(e);
        }
    };
    for p in &paths {
        if let Err(m) = check(p, role == role::RECEIVE) {
            let b = Enc::default().u8(wire::err::REFUSED).rest(m.as_bytes()).0;
            out.frame(wire::op::ERR, id, &b, true)?;
            return Ok(());
        }
    }
    out.frame(wire::op::OK, id, &[], true)?;
    let w = out.into_inner()?;
    if role == role::SEND {
        send(&paths, &opts, input, w, None).map_err(io::Error::other)?;
        return Ok(());
    }
    // Receive: the sender (the client) lists SRC first; its TOP frames say
    // how many arguments there are (the first says: count).
    let peer = Peer::new(w);
    let reader = {
        let p = peer.clone();
        std::thread::spawn(move || p.read(input))
    };
    let ev = FrameEvents {
        out: &peer.out,
        items,
    };
    let dst = PathBuf::from(std::ffi::OsStr::from_bytes(&paths[0]));
    let count = paths.len() - 1;
    let r = receive(&peer, count, &dst, &opts, &ev);
    match r {
        Ok(rep) => peer.out.frame(op::REPORT, 0, &encode_report(&rep), true)?,
        Err(e) => peer
            .out
            .frame(op::FAIL, 0, e.to_string().as_bytes(), true)?,
    }
    drop(reader);
    Ok(())
}

/// `dsync sync HOST:SRC... DST`: a receiver here, `dsync serve` sending.
///
/// # Errors
/// As [`super::sync`]; the far side refuses or the connection is lost.
pub fn pull(
    remote: &crate::remote::Remote,
    srcs: &[Vec<u8>],
    dst: &Path,
    opts: &SyncOptions,
    ev: &dyn SyncEvents,
) -> Result<SyncReport> {
    let refs: Vec<&[u8]> = srcs.iter().map(Vec::as_slice).collect();
    let (mut child, stdin, mut stdout) = crate::remote::spawn(remote)?;
    let r = (|| -> Result<SyncReport> {
        let mut stdin: Box<dyn Write + Send> = Box::new(stdin);
        hello_exchange(
            remote,
            &mut stdin,
            &mut stdout,
            role::SEND,
            opts,
            false,
            &refs,
        )?;
        let peer = Peer::new(stdin);
        let reader = {
            let p = peer.clone();
            std::thread::spawn(move || p.read(stdout))
        };
        let r = receive(&peer, srcs.len(), dst, opts, ev);
        let _ = peer.end();
        drop(peer);
        let _ = reader.join();
        r
    })();
    let _ = child.wait();
    r
}

/// `dsync sync SRC... HOST:DST`: a sender here, `dsync serve` receiving.
///
/// # Errors
/// As [`super::sync`]; the far side refuses or the connection is lost.
pub fn push(
    srcs: &[PathBuf],
    remote: &crate::remote::Remote,
    opts: &SyncOptions,
    ev: &dyn SyncEvents,
) -> Result<SyncReport> {
    let mut paths: Vec<&[u8]> = vec![remote.path.as_bytes()];
    paths.extend(srcs.iter().map(|p| p.as_os_str().as_bytes()));
    let (mut child, stdin, mut stdout) = crate::remote::spawn(remote)?;
    let r = (|| -> Result<SyncReport> {
        let mut stdin: Box<dyn Write + Send> = Box::new(stdin);
        let items = ev.wants_items();
        hello_exchange(
            remote,
            &mut stdin,
            &mut stdout,
            role::RECEIVE,
            opts,
            items,
            &paths,
        )?;
        let owned: Vec<Vec<u8>> = srcs
            .iter()
            .map(|p| p.as_os_str().as_bytes().to_vec())
            .collect();
        let relay = Relay { ev };
        send(&owned, opts, stdout, stdin, Some(&relay))?.ok_or_else(|| {
            Error::InvalidInput(format!("{remote}: the receiver ended without a report"))
        })
    })();
    let _ = child.wait();
    r
}

/// SYNC out, its answer back.
fn hello_exchange(
    remote: &crate::remote::Remote,
    w: &mut Box<dyn Write + Send>,
    r: &mut impl Read,
    role: u8,
    opts: &SyncOptions,
    items: bool,
    paths: &[&[u8]],
) -> Result<()> {
    let loc = PathBuf::from(remote.to_string());
    let lost = |e: io::Error| {
        Error::io(
            &loc,
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("connection lost: {e}"),
            ),
        )
    };
    wire::write_frame(w, op::SYNC, 0, &hello(role, opts, items, paths))
        .and_then(|()| w.flush())
        .map_err(lost)?;
    match wire::read_frame(r).map_err(lost)? {
        Some((wire::op::OK, _, _)) => Ok(()),
        Some((wire::op::ERR, _, body)) => {
            let mut d = Dec::new(&body);
            let _ = d.u8();
            Err(Error::InvalidInput(format!(
                "{}: {}",
                loc.display(),
                String::from_utf8_lossy(d.rest())
            )))
        }
        _ => Err(lost(io::ErrorKind::UnexpectedEof.into())),
    }
}
