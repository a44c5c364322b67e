//! Extent maps at run time: lookup, resolution of a range into stored pieces,
//! and building a new map with adjacent extents merged.

use crate::format::map::{Extent, MapBody};
use crate::id::{MapId, PackId};

/// A piece of a version's bytes: stored in a pack, or a hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    Data { len: u64, pack: PackId, offset: u64 },
    Hole { len: u64 },
}

/// A loaded extent map.
#[derive(Clone, Debug)]
pub struct FileMap {
    pub id: MapId,
    pub body: MapBody,
}

impl FileMap {
    pub fn size(&self) -> u64 {
        self.body.file_size
    }

    pub fn extents(&self) -> &[Extent] {
        &self.body.extents
    }

    /// Index of the first extent that ends after `off`.
    pub fn first_after(&self, off: u64) -> usize {
        self.body.extents.partition_point(|e| e.end() <= off)
    }

    /// Calls `f` with the pieces of `[from, from + len)`, in order. Past the end
    /// of the file reads as a hole (callers check bounds first).
    pub fn resolve(&self, from: u64, len: u64, mut f: impl FnMut(Piece)) {
        let ex = &self.body.extents;
        let mut i = self.first_after(from);
        let mut pos = from;
        let end = from + len;
        while pos < end {
            match ex.get(i) {
                Some(e) if e.logical <= pos => {
                    let n = (e.end().min(end)) - pos;
                    f(Piece::Data {
                        len: n,
                        pack: e.pack,
                        offset: e.offset + (pos - e.logical),
                    });
                    pos += n;
                    i += 1;
                }
                Some(e) => {
                    let n = e.logical.min(end) - pos;
                    f(Piece::Hole { len: n });
                    pos += n;
                }
                None => {
                    f(Piece::Hole { len: end - pos });
                    pos = end;
                }
            }
        }
    }

    /// Bytes stored (not holes).
    pub fn stored_bytes(&self) -> u64 {
        self.body.extents.iter().map(|e| e.len).sum()
    }
}

/// Sorts ranges `[start, end)` and merges those that overlap or touch.
pub fn merge_ranges(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some(l) if s <= l.1 => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Collects extents in logical order, merging neighbours that are adjacent
/// both in the file and in the pack.
#[derive(Default)]
pub struct MapBuilder {
    pub extents: Vec<Extent>,
}

impl MapBuilder {
    pub fn push(&mut self, logical: u64, len: u64, pack: PackId, offset: u64) {
        if len == 0 {
            return;
        }
        if let Some(l) = self.extents.last_mut() {
            if l.end() == logical && l.pack == pack && l.offset + l.len == offset {
                l.len += len;
                return;
            }
        }
        self.extents.push(Extent {
            logical,
            len,
            pack,
            offset,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_ranges() {
        assert_eq!(
            merge_ranges(vec![(5, 9), (0, 2), (2, 3), (8, 12)]),
            vec![(0, 3), (5, 12)]
        );
    }

    #[test]
    fn resolve_and_merge() {
        let mut b = MapBuilder::default();
        b.push(10, 5, PackId(1), 100);
        b.push(15, 5, PackId(1), 105);
        b.push(30, 10, PackId(2), 0);
        assert_eq!(b.extents.len(), 2);
        let m = FileMap {
            id: MapId(1),
            body: MapBody {
                file_size: 50,
                block_size: 4096,
                page_entries: 1,
                extents: b.extents,
                pages: vec![],
            },
        };
        let mut got = Vec::new();
        m.resolve(12, 30, |p| got.push(p));
        assert_eq!(
            got,
            vec![
                Piece::Data {
                    len: 8,
                    pack: PackId(1),
                    offset: 102
                },
                Piece::Hole { len: 10 },
                Piece::Data {
                    len: 10,
                    pack: PackId(2),
                    offset: 0
                },
                Piece::Hole { len: 2 },
            ]
        );
    }
}
