//! Lookup from a weak checksum to the old blocks that have it.
//!
//! The rolling search asks this table at every byte offset of a changed region,
//! so the lookup, not the checksum, is the cost (see DESIGN.md: std's HashMap
//! 120 MB/s, an Fx-hashed table 300 MB/s, with a bitset in front 440 MB/s). The
//! table is open addressing over one flat `Vec<u64>` (weak << 32 | block + 1),
//! behind a bitset with eight bits per old block: almost every miss is answered
//! by one bit in a bitset small enough to stay in cache.
//!
//! Blocks that are all zeros are left out (they are stored as holes and never
//! copied), and so is the short last block (a match must be a whole block).

use super::signature::{entry_weak, SigView};

/// At most this many candidates are checked for one weak checksum, so that a
/// file of many identical blocks cannot make a lookup linear.
pub const MAX_CANDIDATES: usize = 32;

pub struct WeakTable {
    slots: Vec<u64>,
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
        let mut items: Vec<u64> = Vec::new();
        for i in 0..full_blocks {
            if let Some(e) = sig.entry(i) {
                if e[4..] != zero_strong[..] {
                    items.push(((entry_weak(e) as u64) << 32) | (i + 1));
                }
            }
        }
        let cap = (items.len() * 2).next_power_of_two().max(16);
        let bits = cap.trailing_zeros();
        let fbits_total = (items.len() * 8).next_power_of_two().max(64);
        let fbits = fbits_total.trailing_zeros();
        let mut t = WeakTable {
            slots: vec![0; cap],
            shift: 64 - bits,
            filter: vec![0; fbits_total / 64],
            fshift: 64 - fbits,
            len: items.len(),
        };
        let mask = cap - 1;
        for it in items {
            let w = (it >> 32) as u32;
            let mut s = (h1(w) >> t.shift) as usize;
            while t.slots[s] != 0 {
                s = (s + 1) & mask;
            }
            t.slots[s] = it;
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

    /// Calls `f` with each old block index whose weak checksum is `w`, until it
    /// returns true or [`MAX_CANDIDATES`] were offered.
    #[inline]
    pub fn candidates(&self, w: u32, mut f: impl FnMut(u64) -> bool) {
        let mask = self.slots.len() - 1;
        let mut s = (h1(w) >> self.shift) as usize;
        let mut offered = 0;
        loop {
            let v = self.slots[s];
            if v == 0 {
                return;
            }
            if (v >> 32) as u32 == w {
                if f((v & 0xffff_ffff) - 1) {
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
