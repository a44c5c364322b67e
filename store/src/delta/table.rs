//! Lookup from a weak checksum to the old blocks that have it.
//!
//! The rolling search asks this table at every byte offset of a changed region,
//! so the lookup, not the checksum, is the cost (see DESIGN.md: std's HashMap
//! 120 MB/s, an Fx-hashed table 300 MB/s, with a bitset in front 440 MB/s). The
//! table is open addressing over one flat `Vec<u32>` of block numbers (+1),
//! behind a bitset with sixteen bits per old block: almost every miss is
//! answered by one bit in a bitset small enough to stay in cache. A slot holds
//! only the block number; its weak checksum is read back from the signature
//! (already in memory), which halves the table: on a 16 GiB image the table is
//! ~16 MiB rather than 64, so memory grows by little more than the signature.
//!
//! Blocks that are all zeros are left out (they are stored as holes and never
//! copied), and so is the short last block (a match must be a whole block).

use super::signature::{entry_weak, SigView};

/// At most this many candidates are checked for one weak checksum, so that a
/// file of many identical blocks cannot make a lookup linear.
pub const MAX_CANDIDATES: usize = 32;

pub struct WeakTable {
    slots: Vec<u32>,
    shift: u32,
    filter: Vec<u64>,
    fshift: u32,
    len: usize,
}

#[inline(always)]
fn h1(w: u32) -> u64 {
    (w as u64 ^ 0x5bd1_e995).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}
#[inline(always)]
fn h2(w: u32) -> u64 {
    (w as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
}

impl WeakTable {
    pub fn build(sig: &SigView) -> WeakTable {
        let bs = sig.block_size() as u64;
        let zero_strong = sig.zero().entry[4..].to_vec();
        let full_blocks = (sig.file_size() / bs).min(u32::MAX as u64 - 1);
        let usable = |i: u64| sig.entry(i).filter(|e| e[4..] != zero_strong[..]);
        let n = (0..full_blocks).filter(|&i| usable(i).is_some()).count();
        // Load factor at most 2/3.
        let cap = (n + n / 2 + 1).next_power_of_two().max(16);
        let bits = cap.trailing_zeros();
        let fbits_total = (n * 16).next_power_of_two().max(64);
        let fbits = fbits_total.trailing_zeros();
        let mut t = WeakTable {
            slots: vec![0; cap],
            shift: 64 - bits,
            filter: vec![0; fbits_total / 64],
            fshift: 64 - fbits,
            len: n,
        };
        let mask = cap - 1;
        for i in 0..full_blocks {
            let Some(e) = usable(i) else { continue };
            let w = entry_weak(e);
            let mut s = (h1(w) >> t.shift) as usize;
            while t.slots[s] != 0 {
                s = (s + 1) & mask;
            }
            t.slots[s] = (i + 1) as u32;
            let f = (h2(w) >> t.fshift) as usize;
            t.filter[f / 64] |= 1 << (f % 64);
        }
        t
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// False when no old block has checksum `w`; true when one may.
    #[inline(always)]
    pub fn may_contain(&self, w: u32) -> bool {
        let f = (h2(w) >> self.fshift) as usize;
        // f < filter.len() * 64 by construction of fshift.
        self.filter[f / 64] & (1 << (f % 64)) != 0
    }

    /// Calls `f` with each old block index whose weak checksum is `w` (`sig`
    /// is the signature the table was built from), until it
    /// returns true or [`MAX_CANDIDATES`] were offered.
    #[inline]
    pub fn candidates(&self, sig: &SigView, w: u32, mut f: impl FnMut(u64) -> bool) {
        let mask = self.slots.len() - 1;
        let mut s = (h1(w) >> self.shift) as usize;
        let mut offered = 0;
        loop {
            let v = self.slots[s];
            if v == 0 {
                return;
            }
            let j = v as u64 - 1;
            if sig.entry(j).is_some_and(|e| entry_weak(e) == w) {
                if f(j) {
                    return;
                }
                offered += 1;
                if offered == MAX_CANDIDATES {
                    return;
                }
            }
            s = (s + 1) & mask;
        }
    }
}
