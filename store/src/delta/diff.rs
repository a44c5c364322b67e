//! The diff of one chunk of a new version against an old version's signature.
//!
//! A backup cuts the new file into chunks (a few MiB, a whole number of blocks)
//! and diffs them in parallel; each chunk is diffed by [`diff_chunk`] in three
//! steps:
//!
//! 1. Every block is classified: known hole (from SEEK_HOLE) or all zeros ->
//!    hole; otherwise its BLAKE2b-256 is computed (SIMD, many blocks at once)
//!    together with its weak checksum. These are the new signature's entries
//!    and the whole-file hash's inputs, so the signature costs no extra pass.
//! 2. Aligned match: a block whose hash equals the old signature's entry at the
//!    same index is unchanged. On a VM image that is nearly every block, and it
//!    costs no rolling search and no second hash. A block that is not there
//!    is looked up by its weak checksum among all old blocks, and confirmed
//!    with the hash step 1 already computed: a block that moved by whole
//!    blocks (a qcow2 file's clusters, shifted by 64 KiB when one is
//!    allocated before them; a file system that moved a file) is found
//!    without rolling and without a second hash.
//! 3. The remaining runs of changed blocks are searched byte by byte with the
//!    rolling checksum, so that data shifted by an insert or delete is still
//!    found at any offset; a candidate is confirmed with BLAKE2b. After a match
//!    the next old block is tried first (rsync's "expected next block"), so a
//!    long shifted region costs one hash per block.
//!
//! What is left is literal. Because the signature's blocks are 4 KiB, a
//! scattered 4 KiB write costs 4 KiB of literal data, not a whole large block.
//!
//! A rolling window never spans two chunks, so a shifted match that straddles a
//! chunk border is lost; [`DeltaStats::border_literal`] bounds those bytes.

use super::rollsum::{self, Rollsum};
use super::signature::{entry, BlockHash, Digest, Entry, SigView};
use crate::format::sig::STRONG_SIZE;

/// One piece of a new version, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `len` zero bytes, nothing stored.
    Hole { len: u64 },
    /// `len` bytes equal to the old version's bytes at `from`.
    Copy { len: u64, from: u64 },
    /// `len` new bytes, at `at` in the chunk's buffer.
    Literal { len: u64, at: usize },
}

impl Op {
    pub fn len(&self) -> u64 {
        match *self {
            Op::Hole { len } | Op::Copy { len, .. } | Op::Literal { len, .. } => len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a diff found, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeltaStats {
    pub hole: u64,
    pub aligned: u64,
    pub shifted: u64,
    pub literal: u64,
    /// Literal bytes within a block of a chunk border, where a shifted match
    /// could have been missed (an upper bound of the loss).
    pub border_literal: u64,
    /// Strong hashes the rolling search computed (its cost, beyond the one
    /// hash per block that the signature needs anyway).
    pub strong_checks: u64,
}

impl DeltaStats {
    pub fn add(&mut self, o: &DeltaStats) {
        self.hole += o.hole;
        self.aligned += o.aligned;
        self.shifted += o.shifted;
        self.literal += o.literal;
        self.border_literal += o.border_literal;
        self.strong_checks += o.strong_checks;
    }
}

/// The result of diffing one chunk.
#[derive(Default)]
pub struct ChunkDelta {
    pub ops: Vec<Op>,
    /// New signature entries, one per block of the chunk.
    pub entries: Vec<Entry>,
    /// BLAKE2b-256 of each block of the chunk, for the whole-file hash.
    pub digests: Vec<Digest>,
    pub stats: DeltaStats,
}

/// A chunk of the new version, with up to a block of the bytes around it as
/// context, so that a shifted match straddling a chunk border is still found:
/// the chunk's own bytes are `data[start..start + len]`.
pub struct Chunk<'a> {
    pub data: &'a [u8],
    pub start: usize,
    pub len: usize,
    /// Offset of the chunk's first byte in the file; a multiple of the block size.
    pub offset: u64,
    /// Size of the whole new file.
    pub file_size: u64,
    /// Per block of the chunk: known to be a hole (never read, zeros).
    pub holes: &'a [bool],
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Hole,
    /// Equal to the old block at the same index.
    Match(u64),
    /// Equal to another old block.
    Moved(u64),
    Dirty,
}

/// Diffs one chunk. `old` is the previous version's signature, if any; its
/// block size must be `block_size`.
pub fn diff_chunk(chunk: &Chunk<'_>, block_size: u32, old: Option<&SigView>) -> ChunkDelta {
    let bs = block_size as usize;
    let all = chunk.data;
    let data = &all[chunk.start..chunk.start + chunk.len];
    let nb = data.len().div_ceil(bs);
    let first_block = chunk.offset / bs as u64;
    let zero = match old {
        Some(o) => *o.zero(),
        None => super::signature::ZeroBlock::new(block_size),
    };
    let old = old.filter(|o| o.block_size() == block_size && o.blocks() > 0);
    let mut out = ChunkDelta {
        ops: Vec::new(),
        entries: Vec::with_capacity(nb),
        digests: Vec::with_capacity(nb),
        stats: DeltaStats::default(),
    };

    // 1. Classify and hash.
    let mut state = vec![State::Dirty; nb];
    let mut to_hash: Vec<&[u8]> = Vec::with_capacity(nb);
    for (b, st) in state.iter_mut().enumerate() {
        let blk = &data[b * bs..((b + 1) * bs).min(data.len())];
        let hole = chunk.holes.get(b).copied().unwrap_or(false) || is_zero(blk);
        if hole {
            *st = State::Hole;
        }
        if !hole || blk.len() != bs {
            to_hash.push(blk);
        }
    }
    let mut hashed = Vec::with_capacity(to_hash.len());
    old.map_or(BlockHash::Blake2b, |o| o.hash())
        .digest_many(&to_hash, &mut hashed);
    let mut hi = 0;
    for (b, st) in state.iter().enumerate() {
        let blk = &data[b * bs..((b + 1) * bs).min(data.len())];
        if *st == State::Hole && blk.len() == bs {
            out.entries.push(zero.entry);
            out.digests.push(zero.digest);
        } else {
            let d = hashed[hi];
            hi += 1;
            out.entries.push(entry(rollsum::weak(blk), &d));
            out.digests.push(d);
        }
    }

    // 2. Aligned matches.
    if let Some(o) = old {
        for (b, st) in state.iter_mut().enumerate() {
            if *st != State::Dirty {
                continue;
            }
            let g = first_block + b as u64;
            let len = (data.len() - b * bs).min(bs) as u64;
            let strong = &out.digests[b][..STRONG_SIZE];
            if let Some(e) = o.entry(g) {
                if o.block_len(g) == len && e[4..] == *strong {
                    *st = State::Match(g);
                    continue;
                }
            }
            // Elsewhere in the old version (whole blocks only: the table
            // holds no short last block and no zero block).
            if len != bs as u64 {
                continue;
            }
            let table = o.table();
            let w = super::signature::entry_weak(&out.entries[b]);
            if !table.may_contain(w) {
                continue;
            }
            table.candidates(o, w, |j| {
                let found = o.entry(j).is_some_and(|e| e[4..] == *strong);
                if found {
                    *st = State::Moved(j);
                }
                found
            });
        }
    }

    // 3. Emit, searching dirty runs.
    let digests = std::mem::take(&mut out.digests);
    let mut b = 0;
    while b < nb {
        let start = b * bs;
        match state[b] {
            State::Hole => {
                let mut e = b + 1;
                while e < nb && state[e] == State::Hole {
                    e += 1;
                }
                let end = (e * bs).min(data.len());
                push(
                    &mut out.ops,
                    Op::Hole {
                        len: (end - start) as u64,
                    },
                );
                out.stats.hole += (end - start) as u64;
                b = e;
            }
            State::Match(g) | State::Moved(g) => {
                // A moved block is whole; a matched one may be the short last.
                let len = (data.len() - start).min(bs) as u64;
                push(
                    &mut out.ops,
                    Op::Copy {
                        len,
                        from: g * bs as u64,
                    },
                );
                match state[b] {
                    State::Match(_) => out.stats.aligned += len,
                    _ => out.stats.shifted += len,
                }
                b += 1;
            }
            State::Dirty => {
                let mut e = b + 1;
                while e < nb && state[e] == State::Dirty {
                    e += 1;
                }
                let end = (e * bs).min(data.len());
                match old {
                    Some(o) => search(all, chunk.start, start, end, bs, o, &digests, &mut out),
                    _ => {
                        push(
                            &mut out.ops,
                            Op::Literal {
                                len: (end - start) as u64,
                                at: start,
                            },
                        );
                        out.stats.literal += (end - start) as u64;
                    }
                }
                b = e;
            }
        }
    }

    out.digests = digests;

    // Literal bytes touching a chunk border might have matched across it.
    let end_of_chunk = chunk.offset + data.len() as u64;
    if chunk.offset > 0 {
        if let Some(Op::Literal { len, .. }) = out.ops.first() {
            out.stats.border_literal += (*len).min(bs as u64 - 1);
        }
    }
    if end_of_chunk < chunk.file_size {
        if let Some(Op::Literal { len, .. }) = out.ops.last() {
            out.stats.border_literal += (*len).min(bs as u64 - 1);
        }
    }
    out
}

/// Windows hashed together when following a run of shifted matches.
const CHAIN: usize = 16;

/// Rolling search for old blocks in the changed run `[start, end)` of the chunk
/// (chunk coordinates). Windows may reach up to a block outside the run, into
/// unchanged neighbours or the chunk's context, but only the run's own bytes
/// are emitted: a window that matches across the run's edge still copies the
/// part inside it.
#[allow(clippy::too_many_arguments)]
fn search(
    all: &[u8],
    base: usize,
    start: usize,
    end: usize,
    bs: usize,
    old: &SigView,
    digests: &[Digest],
    out: &mut ChunkDelta,
) {
    let table = old.table();
    // In `all`'s coordinates.
    let (s, e) = (base + start, base + end);
    let first = s.saturating_sub(bs - 1);
    let literal = |out: &mut ChunkDelta, a: usize, b: usize| {
        if b > a {
            push(
                &mut out.ops,
                Op::Literal {
                    len: (b - a) as u64,
                    at: a - base,
                },
            );
            out.stats.literal += (b - a) as u64;
        }
    };
    // The window at `p` matched old block `j`: emit the literal before it and
    // the part of the window inside the run; returns where literals resume.
    let copy = |out: &mut ChunkDelta, p: usize, j: u64, lit_start: usize| -> usize {
        let cs = p.max(lit_start);
        let ce = (p + bs).min(e);
        literal(out, lit_start, cs);
        if ce <= cs {
            return lit_start;
        }
        let op = Op::Copy {
            len: (ce - cs) as u64,
            from: j * bs as u64 + (cs - p) as u64,
        };
        push(&mut out.ops, op);
        out.stats.shifted += (ce - cs) as u64;
        ce
    };
    if table.is_empty() || all.len() < bs || first + bs > all.len() {
        literal(out, s, e);
        return;
    }
    // The last window start: it must overlap the run and fit in `all`.
    let last = (e - 1).min(all.len() - bs);
    let mut lit_start = s;
    let mut p = first;
    let mut expect: Option<u64> = None;
    let data = all;
    let mut roll = Rollsum::new(&data[p..p + bs]);
    let strong_at = |p: usize| -> [u8; STRONG_SIZE] {
        let mut s = [0u8; STRONG_SIZE];
        if p >= base
            && (p - base).is_multiple_of(bs)
            && (p - base) / bs < digests.len()
            && p + bs <= base + digests.len() * bs
        {
            s.copy_from_slice(&digests[(p - base) / bs][..STRONG_SIZE]);
        } else {
            let mut d = Vec::with_capacity(1);
            old.hash().digest_many(&[&data[p..p + bs]], &mut d);
            s.copy_from_slice(&d[0][..STRONG_SIZE]);
        }
        s
    };
    loop {
        let w = roll.digest();
        let mut found = None;
        if let Some(j) = expect {
            if let Some(e) = old.entry(j) {
                if super::signature::entry_weak(e) == w && old.block_len(j) == bs as u64 {
                    let s = strong_at(p);
                    out.stats.strong_checks += 1;
                    if e[4..] == s {
                        found = Some(j);
                    }
                }
            }
        }
        if found.is_none() && table.may_contain(w) {
            let mut strong: Option<[u8; STRONG_SIZE]> = None;
            table.candidates(old, w, |j| {
                let s = *strong.get_or_insert_with(|| strong_at(p));
                match old.entry(j) {
                    Some(e) if e[4..] == s => {
                        found = Some(j);
                        true
                    }
                    _ => false,
                }
            });
            if strong.is_some() {
                out.stats.strong_checks += 1;
            }
        }
        if let Some(j) = found {
            lit_start = copy(out, p, j, lit_start);
            p += bs;
            let mut next = j + 1;
            // A match usually starts a run of consecutive old blocks (data
            // shifted by an insert): hash the next windows many at a time
            // (SIMD) and take the ones that continue the run.
            loop {
                let mut wins: Vec<&[u8]> = Vec::with_capacity(CHAIN);
                while wins.len() < CHAIN {
                    let q = p + wins.len() * bs;
                    if q > last || q + bs > data.len() {
                        break;
                    }
                    wins.push(&data[q..q + bs]);
                }
                if wins.len() < 2 {
                    break;
                }
                let mut ds = Vec::with_capacity(wins.len());
                old.hash().digest_many(&wins, &mut ds);
                out.stats.strong_checks += ds.len() as u64;
                let mut took = 0;
                for d in &ds {
                    match old.entry(next) {
                        Some(ent)
                            if old.block_len(next) == bs as u64 && ent[4..] == d[..STRONG_SIZE] =>
                        {
                            lit_start = copy(out, p, next, lit_start);
                            p += bs;
                            next += 1;
                            took += 1;
                        }
                        _ => break,
                    }
                }
                if took < ds.len() {
                    break;
                }
            }
            expect = Some(next);
            if p > last {
                break;
            }
            roll = Rollsum::new(&data[p..p + bs]);
        } else {
            expect = None;
            if p >= last {
                break;
            }
            // Slide to the next offset whose checksum the table may hold.
            match roll.roll_until(&data[p..last], &data[p + bs..last + bs], |w| {
                table.may_contain(w)
            }) {
                Some(k) => p += k,
                None => break,
            }
        }
    }
    literal(out, lit_start, e);
}

/// Appends `op`, merging it into the previous one when they continue each other.
pub fn push(ops: &mut Vec<Op>, op: Op) {
    if let Some(last) = ops.last_mut() {
        match (last, op) {
            (Op::Hole { len }, Op::Hole { len: l }) => {
                *len += l;
                return;
            }
            (Op::Copy { len, from }, Op::Copy { len: l, from: f }) if *from + *len == f => {
                *len += l;
                return;
            }
            (Op::Literal { len, at }, Op::Literal { len: l, at: a })
                if *at + *len as usize == a =>
            {
                *len += l;
                return;
            }
            _ => {}
        }
    }
    ops.push(op);
}

/// True when every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0)
        && post.iter().all(|&x| x == 0)
        && mid.iter().fold(0u128, |a, &x| a | x) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v[1..]));
    }
}
