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
    conn: Arc<Conn>,
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
        Ok(RemoteBackend { conn })
    }
}

struct RemoteObject {
    conn: Arc<Conn>,
    handle: u64,
    len: u64,
    key: Key,
}

impl Object for RemoteObject {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(wire::MAX_PAYLOAD);
            let body = Enc::default()
                .u64(self.handle)
                .u64(offset + done as u64)
                .u32(n as u32)
                .0;
            let rx = self.conn.send(op::READ_AT, &body)?;
            let got = self.conn.wait(&rx, Some(&self.key))?;
            if got.len() != n {
                return Err(Error::io(
                    self.conn.location.join(self.key.path()),
                    io::Error::from(io::ErrorKind::UnexpectedEof),
                ));
            }
            buf[done..done + n].copy_from_slice(&got);
            done += n;
        }
        Ok(())
    }
}

impl Drop for RemoteObject {
    fn drop(&mut self) {
        // Not awaited: the answer is dropped when it comes.
        let _ = self
            .conn
            .send(op::CLOSE, &Enc::default().u64(self.handle).0);
    }
}

struct RemoteWriter {
    conn: Arc<Conn>,
    handle: u64,
    len: u64,
    key: Key,
    /// Appends sent, not yet answered: awaited at FINISH (an error of any
    /// of them fails the object).
    pending: Vec<std::sync::mpsc::Receiver<Answer>>,
}

impl ObjectWriter for RemoteWriter {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        for part in bytes.chunks(wire::MAX_PAYLOAD) {
            let body = Enc::default().u64(self.handle).rest(part).0;
            self.pending.push(self.conn.send(op::APPEND, &body)?);
            self.len += part.len() as u64;
        }
        // Keep a bounded number in flight.
        while self.pending.len() > 16 {
            let rx = self.pending.remove(0);
            self.conn.wait(&rx, Some(&self.key))?;
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        for rx in std::mem::take(&mut self.pending) {
            self.conn.wait(&rx, Some(&self.key))?;
        }
        let rx = self
            .conn
            .send(op::FINISH, &Enc::default().u64(self.handle).0)?;
        self.conn.wait(&rx, Some(&self.key)).map(drop)
    }
}

/// Releases the far side's writer lock when dropped.
struct RemoteLock(Arc<Conn>);

impl Drop for RemoteLock {
    fn drop(&mut self) {
        let _ = self.0.call(op::UNLOCK, &[]);
    }
}

impl RemoteBackend {
    /// A READ's answer; an object too big for one frame is read by range.
    fn answer_or_by_range(
        &self,
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
            Ok(Err((kind, msg))) => Err(self.conn.error(kind, msg, Some(key))),
            Err(_) => Err(self
                .conn
                .lost(io::Error::from(io::ErrorKind::UnexpectedEof))),
        }
    }
}

impl Backend for RemoteBackend {
    fn location(&self) -> PathBuf {
        self.conn.location.clone()
    }

    fn read(&self, key: &Key) -> Result<Vec<u8>> {
        let rx = self.conn.send(op::READ, &Enc::default().key(key).0)?;
        self.answer_or_by_range(&rx, key)
    }

    fn read_many(&self, keys: &[Key]) -> Vec<Result<Vec<u8>>> {
        // Every request out before the first answer is awaited.
        let sent: Vec<Result<_>> = keys
            .iter()
            .map(|k| self.conn.send(op::READ, &Enc::default().key(k).0))
            .collect();
        sent.into_iter()
            .zip(keys)
            .map(|(rx, k)| self.answer_or_by_range(&rx?, k))
            .collect()
    }

    fn open(&self, key: &Key) -> Result<Arc<dyn Object>> {
        let rx = self.conn.send(op::OPEN, &Enc::default().key(key).0)?;
        let body = self.conn.wait(&rx, Some(key))?;
        let mut d = Dec::new(&body);
        let bad = |e: io::Error| Error::io(self.conn.location.join(key.path()), e);
        Ok(Arc::new(RemoteObject {
            conn: self.conn.clone(),
            handle: d.u64().map_err(bad)?,
            len: d.u64().map_err(bad)?,
            key: key.clone(),
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
        let rx = self.conn.send(op::CREATE, &Enc::default().key(key).0)?;
        let body = self.conn.wait(&rx, Some(key))?;
        let handle = Dec::new(&body)
            .u64()
            .map_err(|e| Error::io(self.conn.location.join(key.path()), e))?;
        Ok(Box::new(RemoteWriter {
            conn: self.conn.clone(),
            handle,
            len: 0,
            key: key.clone(),
            pending: Vec::new(),
        }))
    }

    fn sync(&self) -> Result<()> {
        self.conn.call(op::SYNC, &[]).map(drop)
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
