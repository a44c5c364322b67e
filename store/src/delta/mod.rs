//! The delta engine: signatures, the rolling search, and a whole-buffer API.
//!
//! Three verbs, as in fast_rsync: [`Signature::calculate`] summarises an old
//! version; [`diff`] finds, in a new version, the blocks the old one had (at any
//! byte offset) and returns the new version as [`Op`]s plus its own signature
//! and whole-file hash, all from one pass; [`apply`] rebuilds the new version
//! from the old bytes and the ops. Backups use the same engine chunk by chunk
//! ([`diff_chunk`]), streaming, and never read the old file: the old version's
//! bytes live in the repository, the copies are resolved through its extent map.
//!
//! What makes it differ from rsync/librsync/fast_rsync, and why:
//! - BLAKE2b (SIMD over many blocks) as the strong hash, computed once per
//!   block: the same digest confirms an aligned match, is the new signature's
//!   entry and feeds the whole-file hash.
//! - Unchanged aligned blocks need no rolling search: most of a VM image.
//! - Chunks are diffed in parallel (rayon), each a few MiB.
//! - Small (4 KiB) blocks, so a scattered 4 KiB write costs 4 KiB; signatures
//!   stay at 20 bytes per block (0.5 % of the data) and are paged and shared
//!   between versions by the repository.

pub mod diff;
pub mod rollsum;
pub mod signature;
pub mod table;

pub use diff::{diff_chunk, Chunk, ChunkDelta, DeltaStats, Op};
pub use signature::{FileHasher, SigView, Signature};

/// The result of [`diff`] on a whole buffer.
pub struct Delta {
    /// Ops over the whole new buffer; `Literal::at` is an offset into it.
    pub ops: Vec<Op>,
    /// The new version's signature entries, concatenated.
    pub signature: Signature,
    /// The new version's whole-file hash.
    pub file_hash: [u8; 32],
    pub stats: DeltaStats,
}

impl Delta {
    /// Bytes this delta takes as a compact stream (the form stage 3 sends over
    /// the network): per op a tag byte and LEB128 varints for its length (and
    /// a copy's source offset), plus the literal bytes.
    pub fn encoded_len(&self) -> u64 {
        fn varint(v: u64) -> u64 {
            (64 - v.leading_zeros() as u64).div_ceil(7).max(1)
        }
        self.ops
            .iter()
            .map(|o| match *o {
                Op::Literal { len, .. } => 1 + varint(len) + len,
                Op::Copy { len, from } => 1 + varint(len) + varint(from),
                Op::Hole { len } => 1 + varint(len),
            })
            .sum()
    }
}

/// Diffs `new` against `old` in chunks of `chunk_size` bytes (rounded to whole
/// blocks), in parallel.
pub fn diff(old: &SigView, new: &[u8], chunk_size: usize) -> Delta {
    use rayon::prelude::*;
    let bs = old.block_size();
    let chunk_size = chunk_size.div_ceil(bs as usize).max(1) * bs as usize;
    let bs_us = bs as usize;
    let n = new.len().div_ceil(chunk_size);
    let parts: Vec<ChunkDelta> = (0..n)
        .into_par_iter()
        .map(|i| {
            let off = i * chunk_size;
            let len = (new.len() - off).min(chunk_size);
            let lo = off.saturating_sub(bs_us - 1);
            let hi = (off + len + bs_us - 1).min(new.len());
            let c = Chunk {
                data: &new[lo..hi],
                start: off - lo,
                len,
                offset: off as u64,
                file_size: new.len() as u64,
                holes: &[],
            };
            diff_chunk(&c, bs, Some(old))
        })
        .collect();
    let mut ops = Vec::new();
    let mut entries = Vec::with_capacity(new.len() / bs as usize * 20 + 20);
    let mut hasher = FileHasher::new(bs);
    let mut stats = DeltaStats::default();
    for (i, p) in parts.into_iter().enumerate() {
        let base = i * chunk_size;
        for op in p.ops {
            diff::push(
                &mut ops,
                match op {
                    Op::Literal { len, at } => Op::Literal { len, at: at + base },
                    o => o,
                },
            );
        }
        for e in &p.entries {
            entries.extend_from_slice(e);
        }
        hasher.update(&p.digests);
        stats.add(&p.stats);
    }
    Delta {
        ops,
        signature: Signature {
            block_size: bs,
            file_size: new.len() as u64,
            entries,
        },
        file_hash: hasher.finish(new.len() as u64),
        stats,
    }
}

/// Rebuilds the new version from the old bytes, the ops, and the new buffer the
/// literals point into.
///
/// # Errors
/// A message when an op reaches outside either buffer.
pub fn apply(old: &[u8], ops: &[Op], new_literals: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for op in ops {
        match *op {
            Op::Hole { len } => out.resize(out.len() + len as usize, 0),
            Op::Copy { len, from } => {
                let s = old
                    .get(from as usize..(from + len) as usize)
                    .ok_or_else(|| format!("copy {from}+{len} past the old end {}", old.len()))?;
                out.extend_from_slice(s);
            }
            Op::Literal { len, at } => {
                let s = new_literals
                    .get(at..at + len as usize)
                    .ok_or_else(|| format!("literal {at}+{len} past the end"))?;
                out.extend_from_slice(s);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{pseudo, Edit};
    use proptest::prelude::*;

    fn roundtrip(old: &[u8], new: &[u8], bs: u32, chunk: usize) -> Delta {
        let sig = Signature::calculate(old, bs);
        let view = sig.view();
        let d = diff(&view, new, chunk);
        let back = apply(old, &d.ops, new).unwrap();
        assert!(back == new, "rebuild differs");
        assert_eq!(d.file_hash, signature::file_hash(new, bs));
        let direct = Signature::calculate(new, bs);
        assert_eq!(
            d.signature.entries, direct.entries,
            "signature from the diff pass differs"
        );
        d
    }

    #[test]
    fn unchanged_is_all_copies() {
        let old = pseudo(1 << 20, 1);
        let d = roundtrip(&old, &old, 4096, 256 << 10);
        assert_eq!(d.stats.literal, 0);
        assert_eq!(d.ops.len(), 1);
    }

    #[test]
    fn insert_shifts_nothing_into_literals() {
        let old = pseudo(1 << 20, 2);
        let mut new = old[..300_000].to_vec();
        new.extend_from_slice(b"inserted!");
        new.extend_from_slice(&old[300_000..]);
        let d = roundtrip(&old, &new, 4096, 1 << 20);
        // The block around the insert, plus at most a block where the shift
        // realigns, is literal.
        assert!(d.stats.literal <= 2 * 4096 + 9, "{:?}", d.stats);
    }

    #[test]
    fn scattered_writes_cost_their_size() {
        let old = pseudo(4 << 20, 3);
        let mut new = old.clone();
        for k in 0..50 {
            let at = (k * 81_920) & !4095;
            new[at..at + 4096].copy_from_slice(&pseudo(4096, 100 + k as u64));
        }
        let d = roundtrip(&old, &new, 4096, 1 << 20);
        assert_eq!(d.stats.literal, 50 * 4096);
    }

    #[test]
    fn clusters_moved_by_whole_blocks_cost_no_rolling_search() {
        // A qcow2 file allocates a cluster before others: everything after
        // it moves by 64 KiB. The moved blocks are found by their hashes
        // from the signature pass, with no strong hash of the rolling search.
        let old = pseudo(4 << 20, 5);
        let mut new = old[..1 << 20].to_vec();
        new.extend_from_slice(&pseudo(64 << 10, 6));
        new.extend_from_slice(&old[1 << 20..]);
        let d = roundtrip(&old, &new, 4096, 1 << 20);
        assert_eq!(d.stats.literal, 64 << 10, "{:?}", d.stats);
        assert!(d.stats.strong_checks < 8, "{:?}", d.stats);
        assert_eq!(d.stats.shifted, 3 << 20, "{:?}", d.stats);
    }

    #[test]
    fn zeros_become_holes() {
        let old = pseudo(1 << 20, 4);
        let mut new = old.clone();
        new[8192..8192 * 4].fill(0);
        let d = roundtrip(&old, &new, 4096, 1 << 20);
        assert_eq!(d.stats.hole, 8192 * 3);
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (
                any::<usize>(),
                proptest::collection::vec(any::<u8>(), 1..3000)
            )
                .prop_map(|(a, b)| Edit::Insert(a, b)),
            (any::<usize>(), 1usize..5000).prop_map(|(a, b)| Edit::Delete(a, b)),
            (
                any::<usize>(),
                proptest::collection::vec(any::<u8>(), 1..5000)
            )
                .prop_map(|(a, b)| Edit::Overwrite(a, b)),
            (any::<usize>(), 1usize..20_000).prop_map(|(a, b)| Edit::Zero(a, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_edit_restores_exactly(
            size in 0usize..200_000,
            seed in any::<u64>(),
            edits in proptest::collection::vec(edit(), 0..8),
            bs_pow in 9u32..13,
            chunk_blocks in 1usize..20,
        ) {
            let old = pseudo(size, seed);
            let mut new = old.clone();
            for e in edits {
                e.apply(&mut new);
            }
            let bs = 1u32 << bs_pow;
            roundtrip(&old, &new, bs, chunk_blocks * bs as usize);
        }

        #[test]
        fn any_two_buffers_restore_exactly(
            old in proptest::collection::vec(any::<u8>(), 0..20_000),
            new in proptest::collection::vec(any::<u8>(), 0..20_000),
        ) {
            roundtrip(&old, &new, 512, 2048);
        }
    }
}
