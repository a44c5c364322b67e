//! `dsync serve`: the far side of a remote repository. Reads requests from
//! standard input and answers on standard output (an ssh channel), one at
//! a time in order, each with the id it came with; every request is a call
//! on the [`LocalBackend`] of the repository HELLO named.
//!
//! Restricted modes, for an `authorized_keys` forced command (they cannot
//! be lifted by the client, whose own command line sshd ignores):
//! `append_only` refuses every delete and overwrite (REMOVE, REPLACE: so
//! prune and forget fail, while backups, which only create objects and
//! commit new ones, work); `read_only` refuses every write and the lock;
//! `restrict_to` refuses repositories outside a directory.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::wire::{self, err, hello, op, Dec, Enc};
use crate::backend::{Backend, LocalBackend, LockGuard, Object, ObjectWriter};
use crate::error::Error;

/// What a server allows.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    pub append_only: bool,
    pub read_only: bool,
    /// Repositories must be inside this directory.
    pub restrict_to: Option<PathBuf>,
}

/// An answer that is an error: its kind and one line.
struct Fail(u8, String);

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Fail {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => err::NOT_FOUND,
            io::ErrorKind::AlreadyExists => err::EXISTS,
            io::ErrorKind::InvalidData => err::INVALID,
            _ => err::OTHER,
        };
        Fail(kind, e.to_string())
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        match e {
            Error::Io { path, source } => {
                let f = Fail::from(io::Error::new(source.kind(), String::new()));
                Fail(f.0, format!("{}: {source}", path.display()))
            }
            Error::Locked { holder, .. } => Fail(err::LOCKED, holder),
            Error::NotARepository { path } => Fail(
                err::NOT_A_REPOSITORY,
                format!("{} is not a dsync repository", path.display()),
            ),
            e => Fail(err::OTHER, e.to_string()),
        }
    }
}

struct Server {
    opts: ServeOptions,
    backend: Option<Arc<LocalBackend>>,
    reading: HashMap<u64, Arc<dyn Object>>,
    writing: HashMap<u64, Box<dyn ObjectWriter>>,
    next: u64,
    lock: Option<LockGuard>,
}

/// Serves requests from `input` on `output` until the client closes it.
///
/// # Errors
/// A broken stream or a malformed frame (the connection ends: a client
/// that sends garbage gets nothing more); errors of single requests are
/// answered, not returned.
pub fn serve(opts: &ServeOptions, input: impl Read, output: impl Write) -> io::Result<()> {
    let mut r = BufReader::with_capacity(1 << 20, input);
    let mut w = BufWriter::with_capacity(1 << 20, output);
    let mut s = Server::new(opts);
    while let Some((o, id, body)) = wire::read_frame(&mut r)? {
        match s.handle(o, &body) {
            Ok(answer) => wire::write_frame(&mut w, op::OK, id, &answer)?,
            Err(Fail(kind, msg)) => wire::write_frame(
                &mut w,
                op::ERR,
                id,
                &Enc::default().u8(kind).rest(msg.as_bytes()).0,
            )?,
        }
        // Answers go out when no request is waiting (several requests in
        // flight share a flush).
        if r.buffer().is_empty() {
            w.flush()?;
        }
    }
    w.flush()
}

/// `dsync serve` on standard input and output: a repository's server, or
/// (the first frame is SYNC) one side of a sync (`crate::sync::remote`).
///
/// # Errors
/// As [`serve`].
pub fn serve_stdio(opts: &ServeOptions) -> io::Result<()> {
    use std::os::fd::AsFd;
    let input = std::fs::File::from(io::stdin().as_fd().try_clone_to_owned()?);
    let output = std::fs::File::from(io::stdout().as_fd().try_clone_to_owned()?);
    let mut r = BufReader::with_capacity(1 << 20, input);
    let Some((o, id, body)) = wire::read_frame(&mut r)? else {
        return Ok(());
    };
    if o == crate::sync::remote::op::SYNC {
        let server = Server::new(opts);
        let check = |p: &[u8], writes: bool| -> Result<(), String> {
            if writes && opts.read_only {
                return Err(refused("a sync into this server", "read-only").1);
            }
            if writes && opts.append_only {
                // A sync overwrites and deletes.
                return Err(refused("a sync into this server", "append-only").1);
            }
            let path = Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(p));
            server.check_path(path).map_err(|f| f.1)
        };
        return crate::sync::remote::serve(&check, id, &body, r, Box::new(output));
    }
    // Not a sync: the repository's server, the first frame put back.
    let mut first = Vec::new();
    wire::write_frame(&mut first, o, id, &body)?;
    serve(opts, io::Cursor::new(first).chain(r), output)
}

fn refused(what: &str, mode: &str) -> Fail {
    Fail(
        err::REFUSED,
        format!("{what} refused: the server is {mode}"),
    )
}

impl Server {
    fn new(opts: &ServeOptions) -> Server {
        Server {
            opts: opts.clone(),
            backend: None,
            reading: HashMap::new(),
            writing: HashMap::new(),
            next: 1,
            lock: None,
        }
    }

    fn backend(&self) -> Result<&Arc<LocalBackend>, Fail> {
        self.backend
            .as_ref()
            .ok_or_else(|| Fail(err::INVALID, "HELLO must come first".into()))
    }

    fn writable(&self, what: &str) -> Result<(), Fail> {
        if self.opts.read_only {
            return Err(refused(what, "read-only"));
        }
        Ok(())
    }

    fn handle(&mut self, o: u8, body: &[u8]) -> Result<Vec<u8>, Fail> {
        let mut d = Dec::new(body);
        let ok = Enc::default();
        match o {
            op::HELLO => self.hello(&mut d),
            op::READ => {
                let key = d.key()?;
                let b = self.backend()?;
                // Whole objects up to a frame; a bigger one is read by range
                // (the client falls back), never answered with a frame the
                // client would refuse.
                let obj = b.open(&key)?;
                if obj.len() > wire::MAX_PAYLOAD as u64 * 3 {
                    return Err(Fail(
                        err::TOO_BIG,
                        format!("{key} is {} bytes: read it by range", obj.len()),
                    ));
                }
                Ok(b.read(&key)?)
            }
            op::OPEN => {
                let obj = self.backend()?.open(&d.key()?)?;
                let h = self.handle_id();
                let len = obj.len();
                self.reading.insert(h, obj);
                Ok(ok.u64(h).u64(len).0)
            }
            op::READ_AT => {
                let (h, off, len) = (d.u64()?, d.u64()?, d.u32()?);
                if len > wire::MAX_PAYLOAD as u32 * 4 {
                    return Err(Fail(err::INVALID, format!("a read of {len} bytes")));
                }
                let obj = self
                    .reading
                    .get(&h)
                    .ok_or_else(|| Fail(err::INVALID, format!("no open object {h}")))?;
                let mut buf = vec![0u8; len as usize];
                obj.read_at(off, &mut buf)?;
                Ok(buf)
            }
            op::CLOSE => {
                let h = d.u64()?;
                self.reading.remove(&h);
                self.writing.remove(&h);
                Ok(ok.0)
            }
            op::LIST => {
                let kind = wire::kind_of(d.u8()?)?;
                let names = self.backend()?.list(kind)?;
                let mut e = ok.u32(u32::try_from(names.len()).unwrap_or(u32::MAX));
                for (n, size) in names {
                    e = e.bytes(n.as_bytes()).u64(size);
                }
                Ok(e.0)
            }
            op::CREATE => {
                self.writable("writing")?;
                let w = self.backend()?.create(&d.key()?)?;
                let h = self.handle_id();
                self.writing.insert(h, w);
                Ok(ok.u64(h).0)
            }
            op::APPEND => {
                let h = d.u64()?;
                let w = self
                    .writing
                    .get_mut(&h)
                    .ok_or_else(|| Fail(err::INVALID, format!("no object {h} being written")))?;
                w.append(d.rest())?;
                Ok(ok.0)
            }
            op::FINISH => {
                let h = d.u64()?;
                let w = self
                    .writing
                    .remove(&h)
                    .ok_or_else(|| Fail(err::INVALID, format!("no object {h} being written")))?;
                w.finish()?;
                Ok(ok.0)
            }
            op::SYNC => {
                self.backend()?.sync()?;
                Ok(ok.0)
            }
            op::COMMIT => {
                self.writable("a commit")?;
                let key = d.key()?;
                self.backend()?.commit(&key, d.rest())?;
                Ok(ok.0)
            }
            op::REPLACE => {
                self.writable("replacing an object")?;
                if self.opts.append_only {
                    return Err(refused("replacing an object", "append-only"));
                }
                let key = d.key()?;
                self.backend()?.replace(&key, d.rest())?;
                Ok(ok.0)
            }
            op::REMOVE => {
                self.writable("deleting")?;
                if self.opts.append_only {
                    return Err(refused("deleting", "append-only"));
                }
                let n = d.u32()?;
                let keys = (0..n).map(|_| d.key()).collect::<io::Result<Vec<_>>>()?;
                self.backend()?.remove(&keys)?;
                Ok(ok.0)
            }
            op::LOCK => {
                self.writable("the writer lock")?;
                let g = self.backend()?.lock()?;
                let took = g.took_over.clone().unwrap_or_default();
                self.lock = Some(g);
                Ok(ok.rest(took.as_bytes()).0)
            }
            op::UNLOCK => {
                self.lock = None;
                Ok(ok.0)
            }
            _ => Err(Fail(err::INVALID, format!("no operation {o}"))),
        }
    }

    fn handle_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn hello(&mut self, d: &mut Dec<'_>) -> Result<Vec<u8>, Fail> {
        if d.rest_magic()? != *wire::MAGIC {
            return Err(Fail(err::INVALID, "not a dsync client".into()));
        }
        let version = d.u32()?;
        if version != wire::VERSION {
            return Err(Fail(
                err::INVALID,
                format!(
                    "protocol version {version}; this dsync serve speaks {}",
                    wire::VERSION
                ),
            ));
        }
        let flags = d.u8()?;
        let path =
            PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(d.rest()));
        self.check_path(&path)?;
        let exists = LocalBackend::holds_repository(&path);
        let backend = match (flags, exists) {
            (hello::OPEN, false) => {
                return Err(Fail(
                    err::NOT_A_REPOSITORY,
                    format!("{} is not a dsync repository", path.display()),
                ))
            }
            (hello::OPEN | hello::OPEN_OR_CREATE, true) => LocalBackend::open(&path)?,
            (hello::CREATE | hello::OPEN_OR_CREATE, _) => {
                self.writable("creating a repository")?;
                LocalBackend::create_layout(&path)?
            }
            _ => return Err(Fail(err::INVALID, format!("HELLO flags {flags}"))),
        };
        self.backend = Some(Arc::new(backend));
        let mode = u8::from(self.opts.append_only) | u8::from(self.opts.read_only) << 1;
        Ok(Enc::default().u32(wire::VERSION).u8(mode).0)
    }

    /// Refuses a repository outside `restrict_to`.
    fn check_path(&self, path: &Path) -> Result<(), Fail> {
        let Some(dir) = &self.opts.restrict_to else {
            return Ok(());
        };
        let outside = || {
            Fail(
                err::REFUSED,
                format!(
                    "{} is outside {}, where this server keeps repositories",
                    path.display(),
                    dir.display()
                ),
            )
        };
        if !path.is_absolute()
            || path
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(outside());
        }
        // The deepest part that exists, resolved: a symlink inside DIR
        // cannot point out of it.
        let dir = dir
            .canonicalize()
            .map_err(|e| Fail(err::OTHER, format!("{}: {e}", dir.display())))?;
        let mut p = path.to_path_buf();
        let real = loop {
            if let Ok(r) = p.canonicalize() {
                break r;
            }
            if !p.pop() {
                return Err(outside());
            }
        };
        if real.starts_with(&dir) {
            Ok(())
        } else {
            Err(outside())
        }
    }
}

impl Dec<'_> {
    /// The 8 bytes of HELLO's magic.
    fn rest_magic(&mut self) -> io::Result<[u8; 8]> {
        let mut m = [0u8; 8];
        for b in &mut m {
            *b = self.u8()?;
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(opts: &ServeOptions, frames: &[(u8, Vec<u8>)]) -> Vec<(u8, Vec<u8>)> {
        let mut input = Vec::new();
        for (k, (o, b)) in frames.iter().enumerate() {
            wire::write_frame(&mut input, *o, k as u64, b).unwrap();
        }
        let mut out = Vec::new();
        serve(opts, &input[..], &mut out).unwrap();
        let mut r = &out[..];
        let mut answers = Vec::new();
        while let Some((o, _, b)) = wire::read_frame(&mut r).unwrap() {
            answers.push((o, b));
        }
        answers
    }

    fn hello_body(path: &Path, flags: u8) -> Vec<u8> {
        Enc::default()
            .rest(wire::MAGIC)
            .u32(wire::VERSION)
            .u8(flags)
            .rest(path.as_os_str().as_encoded_bytes())
            .0
    }

    #[test]
    fn append_only_refuses_deletes_and_overwrites_but_not_new_objects() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("r");
        let opts = ServeOptions {
            append_only: true,
            ..Default::default()
        };
        let key = crate::backend::Key::snapshot(crate::id::SnapshotId(0x42));
        let a = run(
            &opts,
            &[
                (op::HELLO, hello_body(&repo, hello::CREATE)),
                (op::COMMIT, Enc::default().key(&key).rest(b"snap").0),
                (op::REMOVE, Enc::default().u32(1).key(&key).0),
                (op::REPLACE, Enc::default().key(&key).rest(b"other").0),
                (op::READ, Enc::default().key(&key).0),
            ],
        );
        let kinds: Vec<u8> = a.iter().map(|(o, _)| *o).collect();
        assert_eq!(kinds, [op::OK, op::OK, op::ERR, op::ERR, op::OK]);
        assert_eq!(a[2].1[0], err::REFUSED);
        assert_eq!(a[4].1, b"snap");
    }

    #[test]
    fn a_repository_server_answers_sync_as_an_unknown_operation() {
        // What a server from before sync sessions says to SYNC: the client
        // turns this line into "too old for dsync sync".
        let a = run(
            &ServeOptions::default(),
            &[(crate::sync::remote::op::SYNC, b"DSYNCRP\0".to_vec())],
        );
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].0, op::ERR);
        assert!(String::from_utf8_lossy(&a[0].1).contains("no operation 32"));
    }

    #[test]
    fn requests_before_hello_and_paths_outside_the_restriction_fail() {
        let d = tempfile::tempdir().unwrap();
        let opts = ServeOptions {
            restrict_to: Some(d.path().join("allowed")),
            ..Default::default()
        };
        std::fs::create_dir(d.path().join("allowed")).unwrap();
        let a = run(
            &opts,
            &[
                (
                    op::READ,
                    Enc::default().key(&crate::backend::Key::config()).0,
                ),
                (
                    op::HELLO,
                    hello_body(&d.path().join("other"), hello::CREATE),
                ),
                (
                    op::HELLO,
                    hello_body(&d.path().join("allowed/../other"), hello::CREATE),
                ),
                (
                    op::HELLO,
                    hello_body(&d.path().join("allowed/repo"), hello::CREATE),
                ),
            ],
        );
        let kinds: Vec<u8> = a.iter().map(|(o, _)| *o).collect();
        assert_eq!(kinds, [op::ERR, op::ERR, op::ERR, op::OK]);
        assert_eq!(a[1].1[0], err::REFUSED);
    }

    #[test]
    fn an_object_bigger_than_a_frame_is_refused_by_read_and_served_by_range() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("r");
        crate::Repo::init(&repo, Default::default()).unwrap();
        let backend = LocalBackend::open(&repo).unwrap();
        let key = crate::backend::Key::meta(crate::id::MetaId(0x51));
        let big = vec![7u8; wire::MAX_PAYLOAD * 3 + 1];
        backend.put(&key, &big).unwrap();
        backend.sync().unwrap();
        let a = run(
            &ServeOptions::default(),
            &[
                (op::HELLO, hello_body(&repo, hello::OPEN)),
                (op::READ, Enc::default().key(&key).0),
                (op::OPEN, Enc::default().key(&key).0),
                (
                    op::READ_AT,
                    Enc::default().u64(2).u64(big.len() as u64 - 5).u32(5).0,
                ),
            ],
        );
        assert_eq!(a[1].0, op::ERR);
        assert_eq!(a[1].1[0], err::TOO_BIG);
        assert_eq!(a[2].0, op::OK);
        assert_eq!(Dec::new(&a[2].1).u64().unwrap(), 2, "the first handle");
        assert_eq!(a[3], (op::OK, vec![7u8; 5]));
    }

    #[test]
    fn garbage_ends_the_connection_without_a_panic() {
        let opts = ServeOptions::default();
        for input in [
            &b"\xff\xff\xff\xff"[..],
            b"\x05\x00\x00\x00\x01",
            b"\x0a\x00\x00\x00\x02\x01\x00\x00\x00\x00\x00\x00\x00\x07",
        ] {
            let mut out = Vec::new();
            let _ = serve(&opts, input, &mut out);
        }
    }
}
