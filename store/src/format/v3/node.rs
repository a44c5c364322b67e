//! Format 3's records: directory entries (nodes with everything a file
//! system keeps), extents and signature page references.

use super::{BlobKind, BlobRef, List, Record};
use crate::error::Result;
use crate::format::{Reader, Writer};
use crate::id::PackId;

/// Longest name, symlink target, user or group name, error text.
pub const MAX_NAME: usize = 4096;
pub const MAX_TARGET: usize = 64 << 10;
pub const MAX_XATTR_VALUE: usize = 64 << 10;
pub const MAX_XATTRS: usize = 1024;

/// A file version's data: size, hash, extents and signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileData {
    pub size: u64,
    pub hash: [u8; 32],
    pub block_size: u32,
    pub page_entries: u32,
    pub extents: List<Extent>,
    /// Empty for a file below the signature threshold.
    pub sigs: List<SigRef>,
}

/// What an entry is, with what only that kind has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    File(FileData),
    Dir(List<Entry>),
    Symlink(Vec<u8>),
    CharDevice(u64),
    BlockDevice(u64),
    Fifo,
    Socket,
}

impl Payload {
    fn kind(&self) -> u8 {
        match self {
            Payload::File(_) => 1,
            Payload::Dir(_) => 2,
            Payload::Symlink(_) => 3,
            Payload::CharDevice(_) => 4,
            Payload::BlockDevice(_) => 5,
            Payload::Fifo => 6,
            Payload::Socket => 7,
        }
    }
}

/// One directory entry (FORMAT.md, "Directory entries").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub user: Vec<u8>,
    pub group: Vec<u8>,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    pub link_group: u64,
    /// (name, value), names strictly increasing.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Why the node is incomplete; empty when it is not.
    pub error: String,
    pub flags: u32,
    pub payload: Payload,
}

/// Entry flags.
pub const ENTRY_CHANGED_WHILE_READ: u32 = 1;
pub const ENTRY_HASH_SIZE_LAST: u32 = 2;
/// The file was modified within a timestamp tick of its reading: the next
/// backup reads it again even if its size and times look unchanged.
pub const ENTRY_RACY: u32 = 4;
const ENTRY_FLAGS: u32 = ENTRY_CHANGED_WHILE_READ | ENTRY_HASH_SIZE_LAST | ENTRY_RACY;

fn valid_name(n: &[u8]) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && n != b"."
        && n != b".."
        && !n.iter().any(|&c| c == b'/' || c == 0)
}

impl Record for Entry {
    const LEAF: BlobKind = BlobKind::DirLeaf;
    const INDEX: BlobKind = BlobKind::DirIndex;
    // name (2) kind, mode, uid, gid, user, group, times (2), dev, ino, nlink,
    // link group, xattr count, error, flags: at least 1 byte each.
    const MIN_SIZE: usize = 19;
    type State = ();

    fn start() {}

    fn encode(&self, w: &mut Writer, _: &mut ()) {
        w.vbytes(&self.name);
        w.u8(self.payload.kind());
        w.varint(self.mode as u64);
        w.varint(self.uid as u64);
        w.varint(self.gid as u64);
        w.vbytes(&self.user);
        w.vbytes(&self.group);
        w.zigzag(self.mtime_ns);
        w.zigzag(self.ctime_ns);
        w.varint(self.dev);
        w.varint(self.ino);
        w.varint(self.nlink);
        w.varint(self.link_group);
        w.varint(self.xattrs.len() as u64);
        for (n, v) in &self.xattrs {
            w.vbytes(n);
            w.vbytes(v);
        }
        w.vbytes(self.error.as_bytes());
        w.varint(self.flags as u64);
        match &self.payload {
            Payload::File(f) => {
                w.varint(f.size);
                w.bytes(&f.hash);
                w.varint(f.block_size as u64);
                w.varint(f.page_entries as u64);
                f.extents.encode(w);
                f.sigs.encode(w);
            }
            Payload::Dir(entries) => entries.encode(w),
            Payload::Symlink(t) => w.vbytes(t),
            Payload::CharDevice(rdev) | Payload::BlockDevice(rdev) => w.varint(*rdev),
            Payload::Fifo | Payload::Socket => {}
        }
    }

    fn decode(r: &mut Reader<'_>, _: &mut ()) -> Result<Entry> {
        let name = r.vbytes(MAX_NAME)?.to_vec();
        if !valid_name(&name) {
            return Err(r.corrupt("invalid entry name"));
        }
        let kind = r.u8()?;
        let mode = r.varint_u32()?;
        let uid = r.varint_u32()?;
        let gid = r.varint_u32()?;
        let user = r.vbytes(MAX_NAME)?.to_vec();
        let group = r.vbytes(MAX_NAME)?.to_vec();
        let mtime_ns = r.zigzag()?;
        let ctime_ns = r.zigzag()?;
        let dev = r.varint()?;
        let ino = r.varint()?;
        let nlink = r.varint()?;
        let link_group = r.varint()?;
        let nx = r.vcount(2)?;
        if nx > MAX_XATTRS {
            return Err(r.corrupt(format!("{nx} extended attributes")));
        }
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(nx);
        for _ in 0..nx {
            let n = r.vbytes(MAX_NAME)?.to_vec();
            let v = r.vbytes(MAX_XATTR_VALUE)?.to_vec();
            if n.is_empty() || xattrs.last().is_some_and(|(p, _)| *p >= n) {
                return Err(r.corrupt("extended attribute names out of order"));
            }
            xattrs.push((n, v));
        }
        let error = String::from_utf8(r.vbytes(MAX_NAME)?.to_vec())
            .map_err(|_| r.corrupt("error text is not UTF-8"))?;
        let flags = r.varint_u32()?;
        if flags & !ENTRY_FLAGS != 0 {
            return Err(r.corrupt(format!("unknown entry flags {flags:#x}")));
        }
        let payload = match kind {
            1 => {
                let size = r.varint()?;
                let hash = r.array()?;
                let block_size = r.varint_u32()?;
                let page_entries = r.varint_u32()?;
                if !crate::format::valid_block_size(block_size) {
                    return Err(r.corrupt(format!("block size {block_size}")));
                }
                if !crate::format::valid_page_entries(page_entries) {
                    return Err(r.corrupt(format!("{page_entries} entries per page")));
                }
                Payload::File(FileData {
                    size,
                    hash,
                    block_size,
                    page_entries,
                    extents: List::decode(r)?,
                    sigs: List::decode(r)?,
                })
            }
            2 => Payload::Dir(List::decode(r)?),
            3 => Payload::Symlink(r.vbytes(MAX_TARGET)?.to_vec()),
            4 => Payload::CharDevice(r.varint()?),
            5 => Payload::BlockDevice(r.varint()?),
            6 => Payload::Fifo,
            7 => Payload::Socket,
            k => return Err(r.corrupt(format!("entry kind {k}"))),
        };
        let type_bits = mode & libc::S_IFMT;
        let want = match kind {
            1 => libc::S_IFREG,
            2 => libc::S_IFDIR,
            3 => libc::S_IFLNK,
            4 => libc::S_IFCHR,
            5 => libc::S_IFBLK,
            6 => libc::S_IFIFO,
            _ => libc::S_IFSOCK,
        };
        if type_bits != want {
            return Err(r.corrupt(format!("mode {mode:o} disagrees with entry kind {kind}")));
        }
        Ok(Entry {
            name,
            mode,
            uid,
            gid,
            user,
            group,
            mtime_ns,
            ctime_ns,
            dev,
            ino,
            nlink,
            link_group,
            xattrs,
            error,
            flags,
            payload,
        })
    }

    fn key(&self, _: u64) -> Vec<u8> {
        self.name.clone()
    }

    fn follows(&self, prev: &Entry) -> bool {
        self.name > prev.name
    }
}

/// Bytes `[logical, logical + len)` of a file are bytes `[offset, offset +
/// len)` of pack `pack`'s uncompressed stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub len: u64,
    pub pack: PackId,
    pub offset: u64,
}

impl Record for Extent {
    const LEAF: BlobKind = BlobKind::ExtentLeaf;
    const INDEX: BlobKind = BlobKind::ExtentIndex;
    const MIN_SIZE: usize = 11;
    /// The end of the previous extent.
    type State = u64;

    fn start() -> u64 {
        0
    }

    fn encode(&self, w: &mut Writer, end: &mut u64) {
        w.varint(self.logical.saturating_sub(*end));
        w.varint(self.len);
        w.u64(self.pack.0);
        w.varint(self.offset);
        *end = self.logical.saturating_add(self.len);
    }

    fn decode(r: &mut Reader<'_>, end: &mut u64) -> Result<Extent> {
        let gap = r.varint()?;
        let len = r.varint()?;
        let pack = r.u64()?;
        let offset = r.varint()?;
        let logical = end
            .checked_add(gap)
            .ok_or_else(|| r.corrupt("extent past 2^64"))?;
        let e = logical
            .checked_add(len)
            .ok_or_else(|| r.corrupt("extent past 2^64"))?;
        if len == 0 || pack == 0 || offset.checked_add(len).is_none() {
            return Err(r.corrupt("invalid extent"));
        }
        *end = e;
        Ok(Extent {
            logical,
            len,
            pack: PackId(pack),
            offset,
        })
    }

    fn key(&self, _: u64) -> Vec<u8> {
        self.logical.to_be_bytes().to_vec()
    }

    fn follows(&self, prev: &Extent) -> bool {
        self.logical >= prev.logical + prev.len
    }
}

/// A signature page: all zero-block entries (nothing stored), or a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigRef {
    Zero,
    Blob(BlobRef),
}

impl Record for SigRef {
    const LEAF: BlobKind = BlobKind::SigRefLeaf;
    const INDEX: BlobKind = BlobKind::SigRefIndex;
    const MIN_SIZE: usize = 1;
    type State = ();

    fn start() {}

    fn encode(&self, w: &mut Writer, _: &mut ()) {
        match self {
            SigRef::Zero => w.u8(0),
            SigRef::Blob(b) => {
                w.u8(1);
                b.encode(w);
            }
        }
    }

    fn decode(r: &mut Reader<'_>, _: &mut ()) -> Result<SigRef> {
        match r.u8()? {
            0 => Ok(SigRef::Zero),
            1 => Ok(SigRef::Blob(BlobRef::decode(r)?)),
            f => Err(r.corrupt(format!("signature page reference form {f}"))),
        }
    }

    fn key(&self, index: u64) -> Vec<u8> {
        index.to_be_bytes().to_vec()
    }

    fn follows(&self, _: &SigRef) -> bool {
        true
    }
}
