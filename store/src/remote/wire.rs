//! The frames and messages of the remote protocol (PROTOCOL.md, which this
//! module implements byte for byte).

use std::io::{self, Read, Write};

use crate::backend::{Key, Kind};

/// The first bytes of a HELLO's body.
pub const MAGIC: &[u8; 8] = b"DSYNCRP\x00";
/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// The largest frame either side accepts (the rest of the frame after its
/// length): 64 MiB of payload and room for the header.
pub const MAX_FRAME: u32 = (64 << 20) + 4096;
/// The largest payload a client puts in one frame (APPEND, PUT, COMMIT);
/// bigger writes are split.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// Operations (client to server) and answers (server to client).
pub mod op {
    pub const HELLO: u8 = 1;
    pub const READ: u8 = 2;
    pub const OPEN: u8 = 3;
    pub const READ_AT: u8 = 4;
    pub const CLOSE: u8 = 5;
    pub const LIST: u8 = 6;
    pub const CREATE: u8 = 7;
    pub const APPEND: u8 = 8;
    pub const FINISH: u8 = 9;
    pub const SYNC: u8 = 11;
    pub const COMMIT: u8 = 12;
    pub const REPLACE: u8 = 13;
    pub const REMOVE: u8 = 14;
    pub const LOCK: u8 = 15;
    pub const UNLOCK: u8 = 16;
    pub const OK: u8 = 128;
    pub const ERR: u8 = 129;
}

/// What kind of error an ERR frame carries.
pub mod err {
    pub const OTHER: u8 = 0;
    pub const NOT_FOUND: u8 = 1;
    pub const EXISTS: u8 = 2;
    pub const LOCKED: u8 = 3;
    pub const REFUSED: u8 = 4;
    pub const INVALID: u8 = 5;
    pub const NOT_A_REPOSITORY: u8 = 6;
    /// READ of an object bigger than a frame: read it by OPEN and READ_AT.
    pub const TOO_BIG: u8 = 7;
}

/// HELLO's flags: what to do when the path holds no repository.
pub mod hello {
    /// Open an existing repository.
    pub const OPEN: u8 = 0;
    /// Create a new one (the path must not hold one).
    pub const CREATE: u8 = 1;
    /// Open it, or create it when there is none.
    pub const OPEN_OR_CREATE: u8 = 2;
}

/// Writes one frame: length (u32 LE, of what follows), op, request id
/// (u64 LE), body.
///
/// # Errors
/// A write error, or a body too big for a frame.
pub fn write_frame(w: &mut impl Write, op: u8, id: u64, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len() + 9)
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too big"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&[op])?;
    w.write_all(&id.to_le_bytes())?;
    w.write_all(body)
}

/// Reads one frame; `None` at a clean end of the stream (between frames).
///
/// # Errors
/// A read error; InvalidData for a frame shorter than its header or longer
/// than [`MAX_FRAME`] (nothing of it is allocated then).
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, u64, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if !(9..=MAX_FRAME).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {MAX_FRAME}, at least 9)"),
        ));
    }
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    let mut body = vec![0u8; len as usize - 9];
    r.read_exact(&mut body)?;
    let id = u64::from_le_bytes(head[1..9].try_into().unwrap_or_default());
    Ok(Some((head[0], id, body)))
}

/// Builds a message body.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A length (u32) and the bytes.
    pub fn bytes(self, b: &[u8]) -> Self {
        let mut e = self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        e.0.extend_from_slice(b);
        e
    }
    /// Bytes to the end of the body (the last field).
    pub fn rest(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn key(self, k: &Key) -> Self {
        self.u8(kind_code(k.kind)).bytes(k.name.as_bytes())
    }
}

/// Reads a message body; every getter fails cleanly on a short body.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn short() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "a message shorter than its fields",
    )
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Dec { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(short)?;
        let s = self.buf.get(self.pos..end).ok_or_else(short)?;
        self.pos = end;
        Ok(s)
    }
    pub fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| short())?,
        ))
    }
    pub fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| short())?,
        ))
    }
    pub fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// Whether every byte was read.
    pub fn rest_is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    pub fn rest(&mut self) -> &'a [u8] {
        let r = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        r
    }
    /// A key; its name must be one a repository uses (letters, digits,
    /// at most 64): nothing a server joins to its path can leave it.
    pub fn key(&mut self) -> io::Result<Key> {
        let kind = kind_of(self.u8()?)?;
        let name = self.bytes()?;
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.iter().all(u8::is_ascii_alphanumeric)
            && (kind != Kind::Config || name == b"config");
        if !ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an object name: {:?}", String::from_utf8_lossy(name)),
            ));
        }
        Ok(Key::new(kind, String::from_utf8_lossy(name).into_owned()))
    }
}

pub fn kind_code(k: Kind) -> u8 {
    match k {
        Kind::Config => 0,
        Kind::Pack => 1,
        Kind::Sig => 2,
        Kind::Map => 3,
        Kind::Snapshot => 4,
        Kind::Meta => 5,
    }
}

pub fn kind_of(c: u8) -> io::Result<Kind> {
    Ok(match c {
        0 => Kind::Config,
        1 => Kind::Pack,
        2 => Kind::Sig,
        3 => Kind::Map,
        4 => Kind::Snapshot,
        5 => Kind::Meta,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no object kind {c}"),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused_unread() {
        let mut b = Vec::new();
        write_frame(&mut b, op::READ, 7, &Enc::default().key(&Key::config()).0).unwrap();
        let (o, id, body) = read_frame(&mut &b[..]).unwrap().unwrap();
        assert_eq!((o, id), (op::READ, 7));
        assert_eq!(Dec::new(&body).key().unwrap(), Key::config());
        // Empty stream: a clean end.
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
        // A length over the cap, a length under the header.
        for len in [MAX_FRAME + 1, u32::MAX, 3] {
            let e = read_frame(&mut &len.to_le_bytes()[..]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        }
        // Cut inside a frame.
        assert!(read_frame(&mut &b[..b.len() - 1]).is_err());
    }

    #[test]
    fn keys_that_could_leave_the_repository_are_refused() {
        for name in [&b"../config"[..], b"a/b", b"", b"x.pack", &[b'a'; 65]] {
            let body = Enc::default().u8(1).bytes(name).0;
            assert!(Dec::new(&body).key().is_err(), "{name:?}");
        }
        let body = Enc::default().u8(0).bytes(b"other").0;
        assert!(Dec::new(&body).key().is_err());
        let body = Enc::default().u8(9).bytes(b"abc").0;
        assert!(Dec::new(&body).key().is_err());
        // Short bodies fail, never panic.
        for n in 0..6 {
            let body = Enc::default().u8(1).bytes(b"abcdef").0;
            assert!(Dec::new(&body[..n]).key().is_err());
        }
    }
}
