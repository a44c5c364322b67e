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

    /// Slides the window over `outs[k]` leaving / `ins[k]` entering, for k in
    /// order, until `hit` accepts the checksum; returns how many bytes it slid
    /// (then the window's checksum is the accepted one), or `None` after
    /// sliding over all of them. The tight loop of the rolling search: its
    /// state stays in registers.
    #[inline(always)]
    pub fn roll_until(
        &mut self,
        outs: &[u8],
        ins: &[u8],
        hit: impl Fn(u32) -> bool,
    ) -> Option<usize> {
        let (mut a, mut b, n) = (self.a, self.b, self.n);
        let mut found = None;
        for (k, (&o, &i)) in outs.iter().zip(ins).enumerate() {
            let o = o as u32 + OFFSET;
            a = a.wrapping_sub(o).wrapping_add(i as u32 + OFFSET);
            b = b.wrapping_sub(n.wrapping_mul(o)).wrapping_add(a);
            if hit((a & 0xffff) | (b << 16)) {
                found = Some(k + 1);
                break;
            }
        }
        self.a = a;
        self.b = b;
        found
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
    let n = x.len() as u32;
    #[cfg(target_arch = "x86_64")]
    let (s, b) = if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present.
        unsafe { avx2::sums(x) }
    } else {
        plain_sums(x)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (s, b) = plain_sums(x);
    // With the character offset: a = Σ(x + 31), b = Σ(n - i)(x + 31).
    let a = s.wrapping_add(OFFSET.wrapping_mul(n));
    let tri = (n as u64 * (n as u64 + 1) / 2) as u32;
    (a, b.wrapping_add(OFFSET.wrapping_mul(tri)))
}

/// `(Σ x_i, Σ (n - i) x_i)` mod 2^32, without the character offset.
fn plain_sums(x: &[u8]) -> (u32, u32) {
    let n = x.len() as u32;
    let mut s = 0u32;
    let mut b = 0u32;
    for (i, &v) in x.iter().enumerate() {
        s = s.wrapping_add(v as u32);
        b = b.wrapping_add((v as u32).wrapping_mul(n - i as u32));
    }
    (s, b)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// As `plain_sums`, 32 bytes at a time (the SIMD Adler-32 method):
    /// appending L bytes to a prefix with sum `s` adds `L * s + Σ (L - k) x_k`
    /// to `Σ (n - i) x_i`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn sums(x: &[u8]) -> (u32, u32) {
        let zero = _mm256_setzero_si256();
        let weights = _mm256_setr_epi8(
            32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11,
            10, 9, 8, 7, 6, 5, 4, 3, 2, 1,
        );
        let ones = _mm256_set1_epi16(1);
        let mut vs = zero;
        let mut vps = zero;
        let mut vw = zero;
        let mut chunks = x.chunks_exact(32);
        for c in &mut chunks {
            // SAFETY: c is 32 bytes; loadu has no alignment requirement.
            let v = unsafe { _mm256_loadu_si256(c.as_ptr().cast()) };
            vps = _mm256_add_epi32(vps, vs);
            vs = _mm256_add_epi32(vs, _mm256_sad_epu8(v, zero));
            vw = _mm256_add_epi32(
                vw,
                _mm256_madd_epi16(_mm256_maddubs_epi16(v, weights), ones),
            );
        }
        let h = |v: __m256i| -> u32 {
            let mut a = [0u32; 8];
            // SAFETY: a is 32 bytes.
            unsafe { _mm256_storeu_si256(a.as_mut_ptr().cast(), v) };
            a.iter().fold(0u32, |x, &y| x.wrapping_add(y))
        };
        let mut s = h(vs);
        let mut b = h(vps).wrapping_mul(32).wrapping_add(h(vw));
        let rest = chunks.remainder();
        let l = rest.len() as u32;
        b = b.wrapping_add(l.wrapping_mul(s));
        for (k, &v) in rest.iter().enumerate() {
            b = b.wrapping_add((v as u32).wrapping_mul(l - k as u32));
            s = s.wrapping_add(v as u32);
        }
        (s, b)
    }
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
        fn plain_sums_match_reference(x in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let (s, b) = plain_sums(&x);
            let n = x.len() as u32;
            let tri = (n as u64 * (n as u64 + 1) / 2) as u32;
            let a = s.wrapping_add(OFFSET.wrapping_mul(n));
            let b = b.wrapping_add(OFFSET.wrapping_mul(tri));
            prop_assert_eq!((a & 0xffff) | (b << 16), reference(&x));
        }

        #[test]
        fn weak_matches_reference(x in proptest::collection::vec(any::<u8>(), 0..5000)) {
            prop_assert_eq!(weak(&x), reference(&x));
        }

        #[test]
        fn roll_until_matches_rotate(x in proptest::collection::vec(any::<u8>(), 600..3000), stop in any::<u32>()) {
            let w = 512;
            let n = x.len() - w;
            let mut a = Rollsum::new(&x[..w]);
            let mut b = a;
            let target = stop % 4 == 0;
            // Stop at a position chosen by the checksum's own value, or never.
            let stop_at = (stop as usize) % n + 1;
            let mut want = None;
            for k in 1..=n {
                b.rotate(x[k - 1], x[k - 1 + w]);
                if target && k == stop_at {
                    want = Some((k, b.digest()));
                    break;
                }
            }
            let got = a.roll_until(&x[..n], &x[w..w + n], |d| want.is_some_and(|(_, wd)| wd == d));
            match want {
                Some((k, d)) => {
                    prop_assert!(got.is_some_and(|g| g <= k));
                    prop_assert_eq!(a.digest() == d, got == Some(k));
                }
                None => prop_assert_eq!(got, None),
            }
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
