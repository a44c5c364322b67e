//! `maps/<id>.map`: the extent map and the signature index of one file version.

use super::{open, seal, Reader, Writer};
use crate::error::Result;
use crate::id::{PackId, SigId};

pub const MAGIC: &[u8; 8] = b"DSYNCMAP";
/// Bytes of one encoded extent.
pub const EXTENT_SIZE: usize = 32;
/// Bytes of one encoded page reference.
pub const PAGE_REF_SIZE: usize = 24;

/// A run of a version's bytes stored in a pack: `len` bytes at logical offset
/// `logical` are the bytes at `offset` in the uncompressed stream of `pack`.
/// Logical ranges that no extent covers are holes (zeros, nothing stored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub len: u64,
    pub pack: PackId,
    pub offset: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.logical + self.len
    }
}

/// Where one signature page is stored: slot `slot` of signature file `sig`,
/// or, when `sig` is `None`, the page in which every block is all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRef {
    pub sig: Option<SigId>,
    pub slot: u32,
    /// Entries used in the page (all but the last page are full).
    pub entries: u32,
    /// XXH3-64 of the page's used entries.
    pub sum: u64,
}

/// The decoded body of a map object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapBody {
    pub file_size: u64,
    pub block_size: u32,
    pub page_entries: u32,
    pub extents: Vec<Extent>,
    pub pages: Vec<PageRef>,
}

impl MapBody {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.buf
            .reserve(32 + self.extents.len() * EXTENT_SIZE + self.pages.len() * PAGE_REF_SIZE);
        w.u64(self.file_size);
        w.u32(self.block_size);
        w.u32(self.page_entries);
        w.u64(self.extents.len() as u64);
        for e in &self.extents {
            w.u64(e.logical);
            w.u64(e.len);
            w.u64(e.pack.0);
            w.u64(e.offset);
        }
        w.u64(self.pages.len() as u64);
        for p in &self.pages {
            w.u64(p.sig.map_or(0, |s| s.0));
            w.u32(p.slot);
            w.u32(p.entries);
            w.u64(p.sum);
        }
        seal(MAGIC, &w.buf, true)
    }

    /// Decodes and validates: extents sorted, disjoint, inside the file; the
    /// page list exactly covers the file's blocks.
    ///
    /// # Errors
    /// [`crate::Error::Corrupt`] naming `object` and the offending offset.
    pub fn decode(bytes: &[u8], object: &str) -> Result<MapBody> {
        let body = open(MAGIC, bytes, object)?;
        let mut r = Reader::new(&body, object);
        let file_size = r.u64()?;
        let block_size = r.u32()?;
        let page_entries = r.u32()?;
        if !super::valid_block_size(block_size) {
            return Err(r.corrupt(format!("block size {block_size} out of range")));
        }
        if !super::valid_page_entries(page_entries) {
            return Err(r.corrupt(format!("page entries {page_entries} out of range")));
        }
        let n = r.count(EXTENT_SIZE)?;
        let mut extents = Vec::with_capacity(n);
        let mut end = 0u64;
        for i in 0..n {
            let e = Extent {
                logical: r.u64()?,
                len: r.u64()?,
                pack: PackId(r.u64()?),
                offset: r.u64()?,
            };
            let e_end = e.logical.checked_add(e.len);
            if e.len == 0 || e.logical < end || e_end.is_none_or(|x| x > file_size) {
                return Err(r.corrupt(format!("extent {i} is empty, out of order or past the end")));
            }
            if e.pack.0 == 0 || e.offset.checked_add(e.len).is_none() {
                return Err(r.corrupt(format!("extent {i} has an invalid pack reference")));
            }
            end = e.end();
            extents.push(e);
        }
        let blocks = file_size.div_ceil(block_size as u64);
        let want_pages = blocks.div_ceil(page_entries as u64);
        let np = r.count(PAGE_REF_SIZE)?;
        if np as u64 != want_pages {
            return Err(r.corrupt(format!("{np} signature pages for {blocks} blocks")));
        }
        let mut pages = Vec::with_capacity(np);
        for i in 0..np {
            let sig = r.u64()?;
            let p = PageRef {
                sig: (sig != 0).then_some(SigId(sig)),
                slot: r.u32()?,
                entries: r.u32()?,
                sum: r.u64()?,
            };
            let want = if i + 1 == np {
                blocks - i as u64 * page_entries as u64
            } else {
                page_entries as u64
            };
            if p.entries as u64 != want {
                return Err(r.corrupt(format!(
                    "signature page {i} has {} entries, not {want}",
                    p.entries
                )));
            }
            pages.push(p);
        }
        r.finish()?;
        Ok(MapBody {
            file_size,
            block_size,
            page_entries,
            extents,
            pages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> MapBody {
        MapBody {
            file_size: 4096 * 3 + 5,
            block_size: 4096,
            page_entries: 2,
            extents: vec![
                Extent {
                    logical: 0,
                    len: 100,
                    pack: PackId(1),
                    offset: 0,
                },
                Extent {
                    logical: 4096,
                    len: 8192,
                    pack: PackId(2),
                    offset: 77,
                },
            ],
            pages: vec![
                PageRef {
                    sig: Some(SigId(3)),
                    slot: 0,
                    entries: 2,
                    sum: 1,
                },
                PageRef {
                    sig: None,
                    slot: 0,
                    entries: 2,
                    sum: 2,
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(MapBody::decode(&m.encode(), "m").unwrap(), m);
    }

    #[test]
    fn rejects_overlap_and_overrun() {
        let mut m = sample();
        m.extents[1].logical = 50;
        assert!(MapBody::decode(&m.encode(), "m").is_err());
        let mut m = sample();
        m.extents[1].len = 1 << 20;
        assert!(MapBody::decode(&m.encode(), "m").is_err());
        let mut m = sample();
        m.pages.pop();
        assert!(MapBody::decode(&m.encode(), "m").is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = MapBody::decode(&bytes, "m");
        }

        #[test]
        fn round_trips(lens in proptest::collection::vec((0u64..10_000, 1u64..10_000), 0..50)) {
            let mut extents = Vec::new();
            let mut at = 0;
            for (gap, len) in lens {
                extents.push(Extent { logical: at + gap, len, pack: PackId(5), offset: at });
                at += gap + len;
            }
            let blocks = at.div_ceil(4096);
            let pages = (0..blocks.div_ceil(4)).map(|i| PageRef {
                sig: Some(SigId(1)), slot: i as u32,
                entries: if (i + 1) * 4 > blocks { (blocks - i * 4) as u32 } else { 4 }, sum: i,
            }).collect();
            let m = MapBody { file_size: at, block_size: 4096, page_entries: 4, extents, pages };
            prop_assert_eq!(MapBody::decode(&m.encode(), "m").unwrap(), m);
        }
    }
}
