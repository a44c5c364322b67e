//! Format 3's metadata: blobs in meta packs, lists that are inline or paged,
//! directory entries, and snapshot records (store/FORMAT.md, "Format 3").
//!
//! Only encode and decode live here. A list is either carried inline by its
//! parent or split into pages (blobs) under a small tree of index pages;
//! decoding a paged list's root gives its reference, and the reader fetches
//! pages one level at a time (see [`Page`]). Every decoder checks each count
//! and length against the bytes present and refuses anything the spec does
//! not allow, so damaged bytes give [`Error::Corrupt`], never a panic.

pub mod node;
pub mod record;

use super::{Reader, Writer};
use crate::error::{Error, Result};
use crate::id::MetaId;

/// Personalisation of the blob hash.
pub const BLOB_PERSONAL: &[u8] = b"dsync-blob-v3";
/// Largest blob (the pack frame limit).
pub const MAX_BLOB: usize = 4 << 20;
/// Deepest paged list.
pub const MAX_DEPTH: u8 = 8;
/// Most records an inline list may hold, and its largest encoding.
pub const INLINE_MAX_RECORDS: usize = 4096;
pub const INLINE_MAX_BYTES: usize = 16 << 10;
/// Longest key in an index page (a name).
pub const MAX_KEY: usize = 4096;

/// What a blob holds; part of its hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobKind {
    DirLeaf = 1,
    DirIndex = 2,
    ExtentLeaf = 3,
    ExtentIndex = 4,
    SigRefLeaf = 5,
    SigRefIndex = 6,
    SigPage = 7,
}

/// The hash of a blob of `kind` holding `bytes`.
pub fn blob_hash(kind: BlobKind, bytes: &[u8]) -> [u8; 16] {
    let mut st = blake2b_simd::Params::new()
        .hash_length(16)
        .personal(BLOB_PERSONAL)
        .to_state();
    st.update(&[kind as u8]);
    st.update(bytes);
    let mut h = [0u8; 16];
    h.copy_from_slice(st.finalize().as_bytes());
    h
}

/// Names a blob: frame `frame` of meta pack `meta`, whose bytes hash to
/// `hash`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlobRef {
    pub meta: MetaId,
    pub frame: u32,
    pub hash: [u8; 16],
}

/// Encoded size of a [`BlobRef`].
pub const BLOB_REF_SIZE: usize = 28;

impl BlobRef {
    pub fn encode(&self, w: &mut Writer) {
        w.u64(self.meta.0);
        w.u32(self.frame);
        w.bytes(&self.hash);
    }

    /// # Errors
    /// [`Error::Corrupt`] when truncated or the pack id is 0.
    pub fn decode(r: &mut Reader<'_>) -> Result<BlobRef> {
        let meta = r.u64()?;
        if meta == 0 {
            return Err(r.corrupt("blob reference to meta pack 0"));
        }
        Ok(BlobRef {
            meta: MetaId(meta),
            frame: r.u32()?,
            hash: r.array()?,
        })
    }

    /// Checks that `bytes`, read for this reference, are the blob it names.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the blob when the hash differs.
    pub fn verify(&self, kind: BlobKind, bytes: &[u8]) -> Result<()> {
        if blob_hash(kind, bytes) != self.hash {
            return Err(Error::corrupt(
                format!("meta/{}.meta frame {}", self.meta, self.frame),
                0,
                format!("{kind:?} blob does not match its hash"),
            ));
        }
        Ok(())
    }
}

/// A record of a list: how it is coded, what orders it.
pub trait Record: Sized + Clone {
    /// Blob kinds of this list's leaf and index pages.
    const LEAF: BlobKind;
    const INDEX: BlobKind;
    /// Smallest encoding of one record (bounds counts read from disk).
    const MIN_SIZE: usize;
    /// Running state while coding a sequence (extents: the logical offset).
    type State: Copy;
    /// The state at the start of a page or an inline list.
    fn start() -> Self::State;
    fn encode(&self, w: &mut Writer, st: &mut Self::State);
    /// # Errors
    /// [`Error::Corrupt`].
    fn decode(r: &mut Reader<'_>, st: &mut Self::State) -> Result<Self>;
    /// The key of this record, the `index`-th of its list.
    fn key(&self, index: u64) -> Vec<u8>;
    /// Checks that `self` may follow `prev` (keys strictly increasing, no
    /// overlap).
    fn follows(&self, prev: &Self) -> bool;
}

/// A list: its records inline, or the root of its pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum List<T> {
    Inline(Vec<T>),
    Paged {
        count: u64,
        depth: u8,
        root: BlobRef,
    },
}

impl<T> Default for List<T> {
    fn default() -> Self {
        List::Inline(Vec::new())
    }
}

impl<T: Record> List<T> {
    /// Records in the list.
    pub fn len(&self) -> u64 {
        match self {
            List::Inline(v) => v.len() as u64,
            List::Paged { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn encode(&self, w: &mut Writer) {
        match self {
            List::Inline(v) => {
                w.varint(v.len() as u64);
                w.u8(0);
                let mut st = T::start();
                for rec in v {
                    rec.encode(w, &mut st);
                }
            }
            List::Paged { count, depth, root } => {
                w.varint(*count);
                w.u8(1);
                w.u8(*depth);
                root.encode(w);
            }
        }
    }

    /// # Errors
    /// [`Error::Corrupt`].
    pub fn decode(r: &mut Reader<'_>) -> Result<List<T>> {
        let count = r.varint()?;
        match r.u8()? {
            0 => {
                let at = r.pos();
                if count > INLINE_MAX_RECORDS as u64
                    || count > (r.remaining() / T::MIN_SIZE.max(1)) as u64
                {
                    return Err(r.corrupt(format!("inline list of {count} records")));
                }
                let mut st = T::start();
                let v = decode_records::<T>(r, count as usize, &mut st)?;
                if r.pos() - at > INLINE_MAX_BYTES {
                    return Err(r.corrupt("inline list longer than 16 KiB"));
                }
                Ok(List::Inline(v))
            }
            1 => {
                let depth = r.u8()?;
                if !(1..=MAX_DEPTH).contains(&depth) {
                    return Err(r.corrupt(format!("paged list of depth {depth}")));
                }
                if count == 0 {
                    return Err(r.corrupt("empty paged list"));
                }
                Ok(List::Paged {
                    count,
                    depth,
                    root: BlobRef::decode(r)?,
                })
            }
            f => Err(r.corrupt(format!("list form {f}"))),
        }
    }
}

fn decode_records<T: Record>(
    r: &mut Reader<'_>,
    count: usize,
    st: &mut T::State,
) -> Result<Vec<T>> {
    let mut v: Vec<T> = Vec::with_capacity(count);
    for _ in 0..count {
        let rec = T::decode(r, st)?;
        if let Some(prev) = v.last() {
            if !rec.follows(prev) {
                return Err(r.corrupt("records out of order"));
            }
        }
        v.push(rec);
    }
    Ok(v)
}

/// One child of an index page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Child {
    /// Records under it.
    pub below: u64,
    /// The key of its first record.
    pub first_key: Vec<u8>,
    pub page: BlobRef,
}

/// A page of a paged list, as decoded from its blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Page<T> {
    Leaf(Vec<T>),
    Index(Vec<Child>),
}

impl<T: Record> Page<T> {
    /// The blob kind of this page.
    pub fn kind(&self) -> BlobKind {
        match self {
            Page::Leaf(_) => T::LEAF,
            Page::Index(_) => T::INDEX,
        }
    }

    /// Encodes the page.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Page::Leaf(v) => {
                w.varint(v.len() as u64);
                let mut st = T::start();
                for rec in v {
                    rec.encode(&mut w, &mut st);
                }
            }
            Page::Index(children) => {
                w.varint(children.len() as u64);
                for c in children {
                    w.varint(c.below);
                    w.vbytes(&c.first_key);
                    c.page.encode(&mut w);
                }
            }
        }
        w.buf
    }

    /// Decodes a page of the kind the parent expects: a leaf at depth 1, an
    /// index page above.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming `object`.
    pub fn decode(bytes: &[u8], leaf: bool, object: &str) -> Result<Page<T>> {
        if bytes.len() > MAX_BLOB {
            return Err(Error::corrupt(object, 0, "page larger than a blob may be"));
        }
        let mut r = Reader::new(bytes, object);
        let page = if leaf {
            let n = r.vcount(T::MIN_SIZE)?;
            if n == 0 {
                return Err(r.corrupt("empty leaf page"));
            }
            let mut st = T::start();
            Page::Leaf(decode_records::<T>(&mut r, n, &mut st)?)
        } else {
            let n = r.vcount(1 + 1 + BLOB_REF_SIZE)?;
            if n == 0 {
                return Err(r.corrupt("empty index page"));
            }
            let mut children: Vec<Child> = Vec::with_capacity(n);
            for _ in 0..n {
                let below = r.varint()?;
                let first_key = r.vbytes(MAX_KEY)?.to_vec();
                if below == 0 {
                    return Err(r.corrupt("index child with no records"));
                }
                if let Some(prev) = children.last() {
                    if first_key <= prev.first_key {
                        return Err(r.corrupt("index keys out of order"));
                    }
                }
                children.push(Child {
                    below,
                    first_key,
                    page: BlobRef::decode(&mut r)?,
                });
            }
            Page::Index(children)
        };
        r.finish()?;
        Ok(page)
    }
}

#[cfg(test)]
mod tests;
