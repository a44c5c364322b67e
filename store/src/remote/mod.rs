//! Repositories on another machine: `ssh://[user@]host[:port]/path` or
//! `[user@]host:path`. dsync starts `ssh [user@]host dsync serve` (the
//! program from `DSYNC_RSH`, the far side's dsync from
//! `DSYNC_REMOTE_DSYNC`) and speaks the protocol of PROTOCOL.md over its
//! standard input and output: every [`Backend`] call is one request, and
//! calls from many threads are in flight together. Everything above the
//! backend (backup, restore, the mount, prune, check) works unchanged.

pub mod cache;
pub mod serve;
pub mod wire;

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use crate::backend::ahead::{self, Ahead, AHEAD_PIECE};
use crate::backend::{Backend, Key, Kind, LockGuard, Object, ObjectWriter};
use crate::error::{Error, Result};
use wire::{err, op, Dec, Enc};

/// A remote repository's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    /// `[user@]host`, as ssh takes it.
    pub host: String,
    pub port: Option<u16>,
    /// The path on the far side (relative: to the login's home).
    pub path: String,
}

impl Remote {
    /// The address of `path` if it names a remote repository: `ssh://`
    /// URLs, and `[user@]host:path` where a `:` comes before any `/` (as
    /// rsync and scp decide; `./a:b` is local).
    pub fn parse(path: &Path) -> Option<Remote> {
        let s = path.to_str()?;
        if let Some(rest) = s.strip_prefix("ssh://") {
            let (auth, path) = rest.split_once('/')?;
            let (host, port) = match auth.rsplit_once(':') {
                Some((h, p)) => (h, Some(p.parse().ok()?)),
                None => (auth, None),
            };
            if host.is_empty() {
                return None;
            }
            return Some(Remote {
                host: host.to_string(),
                port,
                path: format!("/{path}"),
            });
        }
        let (host, path) = s.split_once(':')?;
        if host.is_empty() || host.contains('/') || path.is_empty() {
            return None;
        }
        Some(Remote {
            host: host.to_string(),
            port: None,
            path: path.to_string(),
        })
    }
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "ssh://{}:{p}{}", self.host, self.path),
            None => write!(f, "{}:{}", self.host, self.path),
        }
    }
}

/// An answer: its body, or the error's kind and line.
type Answer = std::result::Result<Vec<u8>, (u8, String)>;

/// The connection to one `dsync serve`.
struct Conn {
    /// Taken (closing the far side's input) when the connection is dropped.
    input: Mutex<Option<BufWriter<ChildStdin>>>,
    waiting: Arc<Mutex<HashMap<u64, Sender<Answer>>>>,
    /// Set by the reader when the far side's output ends.
    closed: Arc<std::sync::atomic::AtomicBool>,
    next: AtomicU64,
    child: Mutex<Child>,
    location: PathBuf,
}

impl Conn {
    /// Sends a request; the answer is awaited with the returned receiver.
    fn send(&self, o: u8, body: &[u8]) -> Result<std::sync::mpsc::Receiver<Answer>> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(id, tx);
        }
        // After the insert: a reader that ended before it cleared the
        // table already, and set this first.
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.lost(io::Error::from(io::ErrorKind::UnexpectedEof)));
        }
        let mut input = self
            .input
            .lock()
            .map_err(|_| Error::Internal("the connection's writer panicked".into()))?;
        let w = input
            .as_mut()
            .ok_or_else(|| self.lost(io::Error::from(io::ErrorKind::NotConnected)))?;
        wire::write_frame(w, o, id, body)
            .and_then(|()| w.flush())
            .map_err(|e| self.lost(e))?;
        Ok(rx)
    }

    fn call(&self, o: u8, body: &[u8]) -> Result<Vec<u8>> {
        let rx = self.send(o, body)?;
        self.wait(&rx, None)
    }

    /// The answer to a request; `key` names what it was about, for errors.
    fn wait(&self, rx: &std::sync::mpsc::Receiver<Answer>, key: Option<&Key>) -> Result<Vec<u8>> {
        match rx.recv() {
            Ok(Ok(body)) => Ok(body),
            Ok(Err((kind, msg))) => Err(self.error(kind, msg, key)),
            Err(_) => Err(self.lost(io::Error::from(io::ErrorKind::UnexpectedEof))),
        }
    }

    fn error(&self, kind: u8, msg: String, key: Option<&Key>) -> Error {
        let path = match key {
            Some(k) => self.location.join(k.path()),
            None => self.location.clone(),
        };
        let io_kind = match kind {
            err::NOT_FOUND => io::ErrorKind::NotFound,
            err::EXISTS => io::ErrorKind::AlreadyExists,
            err::LOCKED => {
                return Error::Locked {
                    path: self.location.clone(),
                    holder: msg,
                }
            }
            err::REFUSED | err::INVALID => {
                return Error::InvalidInput(format!("{}: {msg}", self.location.display()))
            }
            err::NOT_A_REPOSITORY => {
                return Error::NotARepository {
                    path: self.location.clone(),
                }
            }
            _ => io::ErrorKind::Other,
        };
        Error::io(path, io::Error::new(io_kind, msg))
    }

    fn lost(&self, e: io::Error) -> Error {
        let status = self
            .child
            .lock()
            .ok()
            .and_then(|mut c| c.try_wait().ok().flatten())
            .map(|s| format!(" (the remote command exited: {s})"))
            .unwrap_or_default();
        Error::io(
            &self.location,
            // Not BrokenPipe: that is how the command line tells a closed
            // standard output (a success) from a failure.
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("connection lost: {e}{status}"),
            ),
        )
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Closing its input ends the server; then it is reaped.
        if let Ok(mut i) = self.input.lock() {
            if let Some(mut w) = i.take() {
                let _ = w.flush();
            }
        }
        if let Ok(mut c) = self.child.lock() {
            let _ = c.wait();
        }
    }
}

/// The backend of a remote repository, its immutable objects cached
/// ([`cache`]) under the repository's id (`id` for one being made; else
/// read from its config).
///
/// # Errors
/// As [`RemoteBackend::connect`].
pub fn backend(remote: &Remote, flags: u8, id: Option<u64>) -> Result<Arc<dyn Backend>> {
    let b: Arc<dyn Backend> = Arc::new(RemoteBackend::connect(remote, flags)?);
    let id = id.or_else(|| {
        let bytes = b.read(&Key::config()).ok()?;
        crate::format::config::Config::decode(&bytes, "config")
            .ok()
            .map(|c| c.repo_id)
    });
    Ok(match id.and_then(cache::dir_for) {
        Some(dir) => cache::CachedBackend::wrap(b, dir),
        None => b,
    })
}

/// Starts `RSH [-p PORT] HOST REMOTE_DSYNC serve` (the far side's
/// standard error is ours).
///
/// # Errors
/// The command cannot start.
pub fn spawn(remote: &Remote) -> Result<(Child, ChildStdin, ChildStdout)> {
    let rsh = std::env::var("DSYNC_RSH").unwrap_or_else(|_| "ssh".into());
    let far = std::env::var("DSYNC_REMOTE_DSYNC").unwrap_or_else(|_| "dsync".into());
    let mut words = rsh.split_whitespace();
    let prog = words
        .next()
        .ok_or_else(|| Error::InvalidInput("DSYNC_RSH is empty".into()))?;
    let mut cmd = Command::new(prog);
    cmd.args(words);
    if let Some(p) = remote.port {
        cmd.arg("-p").arg(p.to_string());
    }
    cmd.arg(&remote.host).arg(&far).arg("serve");
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::InvalidInput(format!("{remote}: cannot start {prog}: {e}")))?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(Error::Internal("no pipes to the remote command".into()));
    };
    Ok((child, stdin, stdout))
}

/// A repository behind `dsync serve`.
pub struct RemoteBackend {
    /// The first connection: the lock, and every request until others
    /// are up.
    conn: Arc<Conn>,
    conns: Arc<Conns>,
}

/// Every connection to the repository: the first, and further ones
/// (`--connections N`) added as their ssh comes up; requests go round
/// them.
struct Conns {
    all: Mutex<Vec<Arc<Conn>>>,
    turn: AtomicU64,
    /// Bytes read ahead for sequential readers, shared by all objects.
    ahead: Mutex<Ahead>,
}

impl Conns {
    /// The connection for the next request, and its index: each in turn.
    fn pick(&self) -> Option<(usize, Arc<Conn>)> {
        let all = self.all.lock().ok()?;
        let i = self.turn.fetch_add(1, Ordering::Relaxed) as usize % all.len().max(1);
        all.get(i).map(|c| (i, c.clone()))
    }
}

/// Connections to one repository when `DSYNC_CONNECTIONS` (the global
/// `--connections N`) does not say: several ssh processes share the
/// encryption when one is CPU-bound, as restic's sftp backend does.
pub const DEFAULT_CONNECTIONS: usize = 2;

fn connections() -> usize {
    std::env::var("DSYNC_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CONNECTIONS)
        .clamp(1, 16)
}

/// What to do when the far path holds no repository.
pub use wire::hello;

impl RemoteBackend {
    /// Starts `RSH [-p PORT] HOST REMOTE_DSYNC serve` and says HELLO.
    ///
    /// # Errors
    /// The command cannot start, the far side refuses, or it is not a
    /// repository (with `hello::OPEN`).
    pub fn connect(remote: &Remote, flags: u8) -> Result<RemoteBackend> {
        let conn = Self::one(remote, flags)?;
        let conns = Arc::new(Conns {
            all: Mutex::new(vec![conn.clone()]),
            turn: AtomicU64::new(0),
            ahead: Mutex::default(),
        });
        let more = connections() - 1;
        if more > 0 {
            // In the background: a command that needs one connection does
            // not wait for the others' handshakes. The repository exists
            // now (the first HELLO made it if asked).
            for _ in 0..more {
                let (remote, conns) = (remote.clone(), Arc::downgrade(&conns));
                let _ = std::thread::Builder::new()
                    .name("dsync-connect".into())
                    .spawn(move || {
                        let Ok(c) = Self::one(&remote, hello::OPEN) else {
                            return;
                        };
                        // Gone: the command ended meanwhile.
                        let Some(conns) = conns.upgrade() else { return };
                        if let Ok(mut all) = conns.all.lock() {
                            all.push(c);
                        };
                    });
            }
        }
        Ok(RemoteBackend { conn, conns })
    }

    /// The connection for the next request: each in turn.
    fn pick(&self) -> Arc<Conn> {
        self.conns
            .pick()
            .map_or_else(|| self.conn.clone(), |(_, c)| c)
    }

    /// One connection, HELLO said.
    fn one(remote: &Remote, flags: u8) -> Result<Arc<Conn>> {
        let location = PathBuf::from(remote.to_string());
        let (child, stdin, stdout) = spawn(remote)?;
        let waiting: Arc<Mutex<HashMap<u64, Sender<Answer>>>> =
            Arc::new(Mutex::new(HashMap::new()));
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (w, c) = (waiting.clone(), closed.clone());
        std::thread::Builder::new()
            .name("dsync-remote".into())
            .spawn(move || {
                let mut r = BufReader::with_capacity(1 << 20, stdout);
                while let Ok(Some((o, id, body))) = wire::read_frame(&mut r) {
                    let answer = match o {
                        op::OK => Ok(body),
                        _ => {
                            let mut d = Dec::new(&body);
                            let kind = d.u8().unwrap_or(err::OTHER);
                            Err((kind, String::from_utf8_lossy(d.rest()).into_owned()))
                        }
                    };
                    if let Some(tx) = w.lock().ok().and_then(|mut m| m.remove(&id)) {
                        let _ = tx.send(answer);
                    }
                }
                // The connection is gone: every waiter wakes with an error.
                c.store(true, Ordering::SeqCst);
                if let Ok(mut m) = w.lock() {
                    m.clear();
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the connection's reader: {e}")))?;
        let conn = Arc::new(Conn {
            input: Mutex::new(Some(BufWriter::with_capacity(1 << 20, stdin))),
            waiting,
            closed,
            next: AtomicU64::new(1),
            child: Mutex::new(child),
            location,
        });
        let body = Enc::default()
            .rest(wire::MAGIC)
            .u32(wire::VERSION)
            .u8(flags)
            .rest(remote.path.as_bytes())
            .0;
        conn.call(op::HELLO, &body)?;
        Ok(conn)
    }
}

/// An open object; its reads go round the connections, each with its own
/// handle (opened on first use).
struct RemoteObject {
    conn: Arc<Conn>,
    handle: u64,
    len: u64,
    key: Key,
    conns: Arc<Conns>,
    /// The index of `conn`.
    at: usize,
    /// Handles on the other connections, by index.
    others: Mutex<HashMap<usize, (Arc<Conn>, u64)>>,
}

impl RemoteObject {
    /// A connection and this object's handle on it.
    fn route(&self) -> Result<(Arc<Conn>, u64)> {
        let Some((i, c)) = self.conns.pick().filter(|(i, _)| *i != self.at) else {
            return Ok((self.conn.clone(), self.handle));
        };
        if let Some(h) = self.others.lock().ok().and_then(|o| o.get(&i).cloned()) {
            return Ok(h);
        }
        let rx = c.send(op::OPEN, &Enc::default().key(&self.key).0)?;
        let body = c.wait(&rx, Some(&self.key))?;
        let handle = Dec::new(&body)
            .u64()
            .map_err(|e| Error::io(c.location.join(self.key.path()), e))?;
        if let Ok(mut o) = self.others.lock() {
            o.insert(i, (c.clone(), handle));
        }
        Ok((c, handle))
    }
}

impl RemoteObject {
    /// Fills `buf` from `offset`, in pieces sent together (each answered
    /// on its connection), then awaited.
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let piece = (AHEAD_PIECE as usize).min(wire::MAX_PAYLOAD);
        let mut sent = Vec::with_capacity(buf.len().div_ceil(piece));
        for (i, part) in buf.chunks(piece).enumerate() {
            let (conn, handle) = self.route()?;
            let body = Enc::default()
                .u64(handle)
                .u64(offset + (i * piece) as u64)
                .u32(part.len() as u32)
                .0;
            let rx = conn.send(op::READ_AT, &body)?;
            sent.push((conn, rx));
        }
        for ((conn, rx), part) in sent.into_iter().zip(buf.chunks_mut(piece)) {
            let got = conn.wait(&rx, Some(&self.key))?;
            if got.len() != part.len() {
                return Err(Error::io(
                    conn.location.join(self.key.path()),
                    io::Error::from(io::ErrorKind::UnexpectedEof),
                ));
            }
            part.copy_from_slice(&got);
        }
        Ok(())
    }
}

impl Object for RemoteObject {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        ahead::read_through(
            &self.conns.ahead,
            &self.key,
            self.len,
            offset,
            buf,
            |at, b| self.fetch(at, b),
        )
    }
}

impl Drop for RemoteObject {
    fn drop(&mut self) {
        // Not awaited: the answer is dropped when it comes.
        let _ = self
            .conn
            .send(op::CLOSE, &Enc::default().u64(self.handle).0);
        if let Ok(o) = self.others.lock() {
            for (c, h) in o.values() {
                let _ = c.send(op::CLOSE, &Enc::default().u64(*h).0);
            }
        }
    }
}

struct RemoteWriter {
    conn: Arc<Conn>,
    /// The server's handle, once its answer to CREATE is read (at the
    /// first APPEND: a create costs no round trip of its own).
    handle: Option<u64>,
    created: Option<std::sync::mpsc::Receiver<Answer>>,
    len: u64,
    key: Key,
    /// Appends sent, not yet answered: awaited at FINISH (an error of any
    /// of them fails the object).
    pending: std::collections::VecDeque<std::sync::mpsc::Receiver<Answer>>,
    /// Small appends gathered into one APPEND.
    buf: Vec<u8>,
}

/// Bytes gathered before an APPEND goes out.
const APPEND_STEP: usize = 1 << 20;
/// APPENDs in flight per object: 64 MiB at [`APPEND_STEP`], enough to fill
/// a link of 1 GB/s at 50 ms of round trip.
const APPEND_WINDOW: usize = 64;

impl RemoteWriter {
    fn handle(&mut self) -> Result<u64> {
        if let Some(h) = self.handle {
            return Ok(h);
        }
        let rx = self
            .created
            .take()
            .ok_or_else(|| Error::Internal("an object created twice".into()))?;
        let body = self.conn.wait(&rx, Some(&self.key))?;
        let h = Dec::new(&body)
            .u64()
            .map_err(|e| Error::io(self.conn.location.join(self.key.path()), e))?;
        self.handle = Some(h);
        Ok(h)
    }

    fn send_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let handle = self.handle()?;
        let body = Enc::default().u64(handle).rest(&self.buf).0;
        self.buf.clear();
        self.pending.push_back(self.conn.send(op::APPEND, &body)?);
        // Keep a bounded number in flight.
        while self.pending.len() > APPEND_WINDOW {
            if let Some(rx) = self.pending.pop_front() {
                self.conn.wait(&rx, Some(&self.key))?;
            }
        }
        Ok(())
    }
}

impl ObjectWriter for RemoteWriter {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        for part in bytes.chunks(APPEND_STEP) {
            self.buf.extend_from_slice(part);
            self.len += part.len() as u64;
            if self.buf.len() >= APPEND_STEP {
                self.send_buf()?;
            }
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.send_buf()?;
        let handle = self.handle()?;
        for rx in std::mem::take(&mut self.pending) {
            self.conn.wait(&rx, Some(&self.key))?;
        }
        let rx = self.conn.send(op::FINISH, &Enc::default().u64(handle).0)?;
        self.conn.wait(&rx, Some(&self.key)).map(drop)
    }
}

/// Releases the far side's writer lock when dropped.
struct RemoteLock(Arc<Conn>);

impl Drop for RemoteLock {
    fn drop(&mut self) {
        // Not awaited (a round trip at the end of every write): the
        // server answers in order, so whatever comes next on this
        // connection comes after it; and a server releases its lock
        // when its client goes anyway.
        let _ = self.0.send(op::UNLOCK, &[]);
    }
}

impl RemoteBackend {
    /// A READ's answer; an object too big for one frame is read by range.
    fn answer_or_by_range(
        &self,
        c: &Conn,
        rx: &std::sync::mpsc::Receiver<Answer>,
        key: &Key,
    ) -> Result<Vec<u8>> {
        match rx.recv() {
            Ok(Ok(body)) => Ok(body),
            Ok(Err((err::TOO_BIG, _))) => {
                let obj = self.open(key)?;
                let len = usize::try_from(obj.len())
                    .map_err(|_| Error::Internal(format!("{key} does not fit in memory")))?;
                let mut buf = vec![0u8; len];
                obj.read_at(0, &mut buf)?;
                Ok(buf)
            }
            Ok(Err((kind, msg))) => Err(c.error(kind, msg, Some(key))),
            Err(_) => Err(c.lost(io::Error::from(io::ErrorKind::UnexpectedEof))),
        }
    }
}

impl Backend for RemoteBackend {
    fn location(&self) -> PathBuf {
        self.conn.location.clone()
    }

    fn read(&self, key: &Key) -> Result<Vec<u8>> {
        let c = self.pick();
        let rx = c.send(op::READ, &Enc::default().key(key).0)?;
        self.answer_or_by_range(&c, &rx, key)
    }

    fn read_many(&self, keys: &[Key]) -> Vec<Result<Vec<u8>>> {
        // Every request out before the first answer is awaited.
        let sent: Vec<(Arc<Conn>, Result<_>)> = keys
            .iter()
            .map(|k| {
                let c = self.pick();
                let rx = c.send(op::READ, &Enc::default().key(k).0);
                (c, rx)
            })
            .collect();
        sent.into_iter()
            .zip(keys)
            .map(|((c, rx), k)| self.answer_or_by_range(&c, &rx?, k))
            .collect()
    }

    fn open(&self, key: &Key) -> Result<Arc<dyn Object>> {
        let (at, c) = self.conns.pick().unwrap_or_else(|| (0, self.conn.clone()));
        let rx = c.send(op::OPEN, &Enc::default().key(key).0)?;
        let body = c.wait(&rx, Some(key))?;
        let mut d = Dec::new(&body);
        let bad = |e: io::Error| Error::io(c.location.join(key.path()), e);
        Ok(Arc::new(RemoteObject {
            conn: c.clone(),
            handle: d.u64().map_err(bad)?,
            len: d.u64().map_err(bad)?,
            key: key.clone(),
            conns: self.conns.clone(),
            at,
            others: Mutex::new(HashMap::new()),
        }))
    }

    fn list(&self, kind: Kind) -> Result<Vec<(String, u64)>> {
        let body = self
            .conn
            .call(op::LIST, &Enc::default().u8(wire::kind_code(kind)).0)?;
        let mut d = Dec::new(&body);
        let bad = |e: io::Error| Error::io(&self.conn.location, e);
        let n = d.u32().map_err(bad)?;
        let mut out = Vec::with_capacity(n.min(1 << 20) as usize);
        for _ in 0..n {
            let name = String::from_utf8_lossy(d.bytes().map_err(bad)?).into_owned();
            out.push((name, d.u64().map_err(bad)?));
        }
        Ok(out)
    }

    fn create(&self, key: &Key) -> Result<Box<dyn ObjectWriter>> {
        let c = self.pick();
        let rx = c.send(op::CREATE, &Enc::default().key(key).0)?;
        Ok(Box::new(RemoteWriter {
            conn: c.clone(),
            handle: None,
            created: Some(rx),
            len: 0,
            key: key.clone(),
            pending: std::collections::VecDeque::new(),
            buf: Vec::new(),
        }))
    }

    fn sync(&self) -> Result<()> {
        // Each server makes what it wrote durable.
        let all = match self.conns.all.lock() {
            Ok(a) => a.clone(),
            Err(_) => vec![self.conn.clone()],
        };
        let sent: Vec<_> = all.iter().map(|c| c.send(op::SYNC, &[])).collect();
        for (c, rx) in all.iter().zip(sent) {
            c.wait(&rx?, None)?;
        }
        Ok(())
    }

    fn commit(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        let rx = self
            .conn
            .send(op::COMMIT, &Enc::default().key(key).rest(bytes).0)?;
        self.conn.wait(&rx, Some(key)).map(drop)
    }

    fn replace(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        let rx = self
            .conn
            .send(op::REPLACE, &Enc::default().key(key).rest(bytes).0)?;
        self.conn.wait(&rx, Some(key)).map(drop)
    }

    fn remove(&self, keys: &[Key]) -> Result<()> {
        for part in keys.chunks(4096) {
            let mut e = Enc::default().u32(part.len() as u32);
            for k in part {
                e = e.key(k);
            }
            self.conn.call(op::REMOVE, &e.0)?;
        }
        Ok(())
    }

    fn lock(&self) -> Result<LockGuard> {
        let body = self.conn.call(op::LOCK, &[])?;
        let took = String::from_utf8_lossy(&body).into_owned();
        Ok(LockGuard {
            _inner: Box::new(RemoteLock(self.conn.clone())),
            took_over: (!took.is_empty()).then_some(took),
        })
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn remote_addresses_as_rsync_and_ssh_read_them() {
        let p = |s: &str| Remote::parse(Path::new(s));
        assert_eq!(
            p("backup@host:vms"),
            Some(Remote {
                host: "backup@host".into(),
                port: None,
                path: "vms".into()
            })
        );
        assert_eq!(
            p("ssh://u@h:2222/srv/repo"),
            Some(Remote {
                host: "u@h".into(),
                port: Some(2222),
                path: "/srv/repo".into()
            })
        );
        assert_eq!(p("ssh://h/r").map(|r| r.path), Some("/r".into()));
        for local in ["/backup/vms", "./a:b", "dir/x:y", "repo", ":x", "h:"] {
            assert_eq!(p(local), None, "{local}");
        }
    }
}
