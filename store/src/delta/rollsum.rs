//! The weak rolling checksum.
//!
//! rsync's checksum (with librsync's character offset 31, so that runs of zeros
//! do not all sum to 0): over a window x[0..n), `a = Σ (x_i + 31)` and
//! `b = Σ (n - i)(x_i + 31)`, both mod 2^32, and the 32-bit weak checksum is
//! `(a & 0xffff) | (b << 16)`. Sliding the window one byte costs two additions
//! and a multiply, which is what makes a search at every byte offset affordable.
//! The checksum is only a filter: a candidate is confirmed by BLAKE2b.

const OFFSET: u32 = 31;

/// A rolling checksum over a window of fixed length.
#[derive(Clone, Copy, Debug)]
pub struct Rollsum {
    a: u32,
    b: u32,
    n: u32,
}

impl Rollsum {
    /// The checksum of `window`.
    pub fn new(window: &[u8]) -> Self {
        let (a, b) = sums(window);
        Rollsum {
            a,
            b,
            n: window.len() as u32,
        }
    }

    /// Slides the window one byte: `out` leaves at the front, `inb` enters at the back.
    #[inline(always)]
    pub fn rotate(&mut self, out: u8, inb: u8) {
        let o = out as u32 + OFFSET;
        self.a = self.a.wrapping_sub(o).wrapping_add(inb as u32 + OFFSET);
        self.b = self
            .b
            .wrapping_sub(self.n.wrapping_mul(o))
            .wrapping_add(self.a);
    }

    #[inline(always)]
    pub fn digest(&self) -> u32 {
        (self.a & 0xffff) | (self.b << 16)
    }
}

/// The weak checksum of one block, computed directly (vectorisable: no carried
/// dependency between bytes).
pub fn weak(block: &[u8]) -> u32 {
    let (a, b) = sums(block);
    (a & 0xffff) | (b << 16)
}

fn sums(x: &[u8]) -> (u32, u32) {
    // b = n*Σx - Σ i*x_i + 31*n(n+1)/2, all mod 2^32.
    let n = x.len() as u32;
    let mut s = 0u32;
    let mut si = 0u32;
    let mut lanes_s = [0u32; 16];
    let mut lanes_i = [0u32; 16];
    let mut chunks = x.chunks_exact(16);
    let mut base = 0u32;
    for c in &mut chunks {
        for k in 0..16 {
            let v = c[k] as u32;
            lanes_s[k] = lanes_s[k].wrapping_add(v);
            lanes_i[k] = lanes_i[k].wrapping_add(v.wrapping_mul(base.wrapping_add(k as u32)));
        }
        base = base.wrapping_add(16);
    }
    for k in 0..16 {
        s = s.wrapping_add(lanes_s[k]);
        si = si.wrapping_add(lanes_i[k]);
    }
    for (k, &v) in chunks.remainder().iter().enumerate() {
        s = s.wrapping_add(v as u32);
        si = si.wrapping_add((v as u32).wrapping_mul(base + k as u32));
    }
    let a = s.wrapping_add(OFFSET.wrapping_mul(n));
    let tri = (n as u64 * (n as u64 + 1) / 2) as u32;
    let b = n
        .wrapping_mul(s)
        .wrapping_sub(si)
        .wrapping_add(OFFSET.wrapping_mul(tri));
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, written plainly.
    fn reference(x: &[u8]) -> u32 {
        let n = x.len() as u32;
        let mut a = 0u32;
        let mut b = 0u32;
        for (i, &v) in x.iter().enumerate() {
            a = a.wrapping_add(v as u32 + OFFSET);
            b = b.wrapping_add((n - i as u32).wrapping_mul(v as u32 + OFFSET));
        }
        (a & 0xffff) | (b << 16)
    }

    proptest! {
        #[test]
        fn weak_matches_reference(x in proptest::collection::vec(any::<u8>(), 0..5000)) {
            prop_assert_eq!(weak(&x), reference(&x));
        }

        #[test]
        fn rolling_matches_reference(x in proptest::collection::vec(any::<u8>(), 2..3000), w in 1usize..600) {
            let w = w.min(x.len() - 1);
            let mut r = Rollsum::new(&x[..w]);
            for p in 0..x.len() - w {
                prop_assert_eq!(r.digest(), reference(&x[p..p + w]));
                r.rotate(x[p], x[p + w]);
            }
        }
    }
}
