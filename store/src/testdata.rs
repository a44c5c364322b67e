//! Deterministic pseudo-random bytes for tests, benchmarks and the demo's
//! tools (xorshift64: fast, seedable, incompressible).

/// `n` bytes determined by `seed`.
pub fn pseudo(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// An edit of a buffer, as property tests make them: positions are taken
/// modulo the buffer's length, so any values make a valid edit.
#[derive(Debug, Clone)]
pub enum Edit {
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Overwrite(usize, Vec<u8>),
    Zero(usize, usize),
    Append(Vec<u8>),
}

impl Edit {
    /// Applies the edit to `v`.
    pub fn apply(self, v: &mut Vec<u8>) {
        let at = |a: usize, n: usize| if n == 0 { 0 } else { a % (n + 1) };
        match self {
            Edit::Insert(a, b) => {
                let a = at(a, v.len());
                v.splice(a..a, b);
            }
            Edit::Delete(a, l) => {
                let a = at(a, v.len());
                let e = (a + l).min(v.len());
                v.drain(a..e);
            }
            Edit::Overwrite(a, b) => {
                let a = at(a, v.len());
                let e = (a + b.len()).min(v.len());
                v[a..e].copy_from_slice(&b[..e - a]);
            }
            Edit::Zero(a, l) => {
                let a = at(a, v.len());
                let e = (a + l).min(v.len());
                v[a..e].fill(0);
            }
            Edit::Append(b) => v.extend_from_slice(&b),
        }
    }
}
