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

mod receive;
mod send;

pub use receive::{receive, Peer};
pub(super) use receive::{transfer, Fetch, AHEAD_MAX_SIZE, AHEAD_QUEUE, SIGNED_AHEAD_MAX_SIZE};
use send::send_after;
pub use send::{send, Reports};

use std::io::{self, BufWriter, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::attrs::Xattrs;
use super::file::BlockHash;
use super::{join, Filters, Item, SyncEvents, SyncOptions, SyncReport};
use crate::error::{Error, Result};
use crate::remote::wire::{self, Dec, Enc};
use crate::source::Stat;

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
        // This dsync's block entries may be XXH3-128 (a server from before
        // that ignores the bit and answers OK without features).
        true,
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
/// SYNC's options: the options, whether items are wanted, and the block
/// hash the client can use.
pub(crate) fn decode_options(d: &mut Dec<'_>) -> io::Result<(SyncOptions, bool, BlockHash)> {
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
    let hash = if f(25) {
        BlockHash::Xxh3
    } else {
        BlockHash::Blake2b
    };
    Ok((o, f(24), hash))
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
    /// Requests written and not yet flushed; changed only under `w`'s
    /// lock, so a flush covers every request counted before it.
    unflushed: AtomicUsize,
}

impl Out {
    fn new(w: Box<dyn Write + Send>) -> Out {
        Out {
            w: Mutex::new(Some(BufWriter::with_capacity(1 << 20, w))),
            unflushed: AtomicUsize::new(0),
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
        wire::write_frame(w, o, id, body)?;
        if flush {
            w.flush()?;
            self.unflushed.store(0, Ordering::SeqCst);
        }
        Ok(())
    }

    /// A request's frame, counted; flushed with the others once `batch`
    /// are waiting.
    fn request(&self, o: u8, id: u64, body: &[u8], batch: usize) -> io::Result<()> {
        let mut w = self
            .w
            .lock()
            .map_err(|_| io::Error::other("a writer panicked"))?;
        let w = w
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        wire::write_frame(w, o, id, body)?;
        if self.unflushed.fetch_add(1, Ordering::SeqCst) + 1 >= batch {
            w.flush()?;
            self.unflushed.store(0, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Requests written and not yet flushed.
    fn unflushed(&self) -> usize {
        self.unflushed.load(Ordering::SeqCst)
    }

    /// Writes what is buffered.
    fn flush(&self) -> io::Result<()> {
        let mut w = self
            .w
            .lock()
            .map_err(|_| io::Error::other("a writer panicked"))?;
        match w.as_mut() {
            Some(w) => {
                w.flush()?;
                self.unflushed.store(0, Ordering::SeqCst);
                Ok(())
            }
            None => Err(io::ErrorKind::NotConnected.into()),
        }
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
type Session = (u8, (SyncOptions, bool, BlockHash), Vec<Vec<u8>>);

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
    let (role, (opts, items, hash), paths) = match parsed {
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
    // OK's features: bit 0, block entries are XXH3-128.
    let features = u32::from(hash == BlockHash::Xxh3);
    out.frame(wire::op::OK, id, &features.to_le_bytes(), true)?;
    let w = out.into_inner()?;
    if role == role::SEND {
        send(&paths, &opts, hash, input, w, None).map_err(io::Error::other)?;
        return Ok(());
    }
    // Receive: the sender (the client) lists SRC first; its TOP frames say
    // how many arguments there are (the first says: count).
    let peer = Peer::new(w, hash);
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
        let hash = hello_exchange(
            remote,
            &mut stdin,
            &mut stdout,
            role::SEND,
            opts,
            false,
            &refs,
        )?;
        let peer = Peer::new(stdin, hash);
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

/// Bytes held back up to this much while a push waits for the server's
/// answer to SYNC; a writer past it waits.
const HOLD_MAX: usize = 16 << 20;

/// A writer that holds what it is given until the stream behind it is
/// there ([`Gate::open`]): a push lists SRC while ssh connects (0.3 s here,
/// as long as the whole listing of the 75K-file tree), and nothing is
/// written before the server has answered SYNC.
struct Held(Arc<(Mutex<HeldState>, std::sync::Condvar)>);

/// Opens a [`Held`] writer, or fails it.
struct Gate(Arc<(Mutex<HeldState>, std::sync::Condvar)>);

enum HeldState {
    Holding(Vec<u8>),
    Open(Box<dyn Write + Send>),
    Failed,
}

fn held() -> (Held, Gate) {
    let s = Arc::new((
        Mutex::new(HeldState::Holding(Vec::new())),
        std::sync::Condvar::new(),
    ));
    (Held(s.clone()), Gate(s))
}

impl Write for Held {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let (m, cond) = &*self.0;
        let mut g = m
            .lock()
            .map_err(|_| io::Error::other("a writer panicked"))?;
        loop {
            match &mut *g {
                HeldState::Holding(v) if v.len() < HOLD_MAX => {
                    v.extend_from_slice(b);
                    return Ok(b.len());
                }
                HeldState::Holding(_) => {
                    g = cond
                        .wait(g)
                        .map_err(|_| io::Error::other("a writer panicked"))?;
                }
                HeldState::Open(w) => return w.write(b),
                HeldState::Failed => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let (m, _) = &*self.0;
        let mut g = m
            .lock()
            .map_err(|_| io::Error::other("a writer panicked"))?;
        match &mut *g {
            HeldState::Holding(_) => Ok(()),
            HeldState::Open(w) => w.flush(),
            HeldState::Failed => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
}

impl Gate {
    /// What was held written to `w`, and what comes after.
    fn open(&self, mut w: Box<dyn Write + Send>) -> io::Result<()> {
        let (m, cond) = &*self.0;
        let mut g = m
            .lock()
            .map_err(|_| io::Error::other("a writer panicked"))?;
        if let HeldState::Holding(v) = &*g {
            if let Err(e) = w.write_all(v).and_then(|()| w.flush()) {
                *g = HeldState::Failed;
                cond.notify_all();
                return Err(e);
            }
        }
        *g = HeldState::Open(w);
        cond.notify_all();
        Ok(())
    }

    /// Writes fail from now on (a writer waiting too).
    fn fail(&self) {
        let (m, cond) = &*self.0;
        if let Ok(mut g) = m.lock() {
            *g = HeldState::Failed;
        }
        cond.notify_all();
    }
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
    let (mut child, stdin, stdout) = crate::remote::spawn(remote)?;
    let r = (|| -> Result<SyncReport> {
        let mut stdin: Box<dyn Write + Send> = Box::new(stdin);
        let items = ev.wants_items();
        hello_send(remote, &mut stdin, role::RECEIVE, opts, items, &paths)?;
        let owned: Vec<Vec<u8>> = srcs
            .iter()
            .map(|p| p.as_os_str().as_bytes().to_vec())
            .collect();
        let relay = Relay { ev };
        // SRC is listed while the answer comes; the listing waits in
        // memory until it has.
        let (w, gate) = held();
        let first = |r: &mut _| {
            let answer = hello_answer(remote, r).and_then(|hash| {
                gate.open(stdin).map_err(|e| lost(remote, e))?;
                Ok(hash)
            });
            if answer.is_err() {
                gate.fail();
            }
            answer
        };
        send_after(
            &owned,
            opts,
            first,
            stdout,
            Out::new(Box::new(w)),
            Some(&relay),
        )?
        .ok_or_else(|| {
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
) -> Result<BlockHash> {
    hello_send(remote, w, role, opts, items, paths)?;
    hello_answer(remote, r)
}

/// The connection to `remote` lost, as the error says.
fn lost(remote: &crate::remote::Remote, e: io::Error) -> Error {
    Error::io(
        PathBuf::from(remote.to_string()),
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("connection lost: {e}"),
        ),
    )
}

/// SYNC out.
fn hello_send(
    remote: &crate::remote::Remote,
    w: &mut Box<dyn Write + Send>,
    role: u8,
    opts: &SyncOptions,
    items: bool,
    paths: &[&[u8]],
) -> Result<()> {
    wire::write_frame(w, op::SYNC, 0, &hello(role, opts, items, paths))
        .and_then(|()| w.flush())
        .map_err(|e| lost(remote, e))
}

/// SYNC's answer: the block hash the session uses, or the server's refusal.
fn hello_answer(remote: &crate::remote::Remote, r: &mut impl Read) -> Result<BlockHash> {
    let loc = PathBuf::from(remote.to_string());
    let lost = |e: io::Error| lost(remote, e);
    match wire::read_frame(r).map_err(lost)? {
        // A server from before block hashes answers with no features.
        Some((wire::op::OK, _, body)) => Ok(match body.get(..4) {
            Some(f) if f[0] & 1 != 0 => BlockHash::Xxh3,
            _ => BlockHash::Blake2b,
        }),
        Some((wire::op::ERR, _, body)) => {
            let mut d = Dec::new(&body);
            let _ = d.u8();
            let msg = String::from_utf8_lossy(d.rest()).into_owned();
            // A dsync serve from before sync sessions knows no op 32.
            let msg = if msg.contains("no operation 32") {
                "the dsync on the far side is too old for dsync sync (it serves repositories only): \
                 install this version there"
                    .to_string()
            } else {
                msg
            };
            Err(Error::InvalidInput(format!("{}: {msg}", loc.display())))
        }
        _ => Err(lost(io::ErrorKind::UnexpectedEof.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that keeps what it is given.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn held_bytes_go_out_first_and_only_once_the_gate_opens() {
        let (mut w, gate) = held();
        w.write_all(b"listed ").unwrap();
        w.flush().unwrap();
        let sink = Sink::default();
        assert!(sink.0.lock().unwrap().is_empty());
        gate.open(Box::new(sink.clone())).unwrap();
        w.write_all(b"then answers").unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"listed then answers");
    }

    #[test]
    fn a_failed_gate_releases_a_writer_waiting_past_the_limit() {
        let (mut w, gate) = held();
        w.write_all(&vec![0; HOLD_MAX]).unwrap();
        let waiting = std::thread::spawn(move || w.write_all(b"more"));
        std::thread::sleep(std::time::Duration::from_millis(50));
        gate.fail();
        let r = waiting.join().unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
