//! Typed ids. Every object in a repository is named by a random 64-bit id,
//! written as 16 lower-case hex digits; a newtype per kind keeps a pack id from
//! ever being used as a map id.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
        pub struct $name(pub u64);

        impl $name {
            /// A fresh random id (never 0, which the format reserves).
            pub fn random() -> Self {
                $name(random_u64())
            }

            /// Parses 16 hex digits.
            pub fn parse(s: &str) -> Option<Self> {
                if s.len() != 16 {
                    return None;
                }
                u64::from_str_radix(s, 16).ok().filter(|&v| v != 0).map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:016x}", self.0)
            }
        }
    };
}

id_type!(
    /// Names a pack file (`packs/<id>.pack`).
    PackId
);
id_type!(
    /// Names a signature file (`sigs/<id>.sig`).
    SigId
);
id_type!(
    /// Names an extent-map object (`maps/<id>.map`).
    MapId
);
id_type!(
    /// Names a meta pack of format 3 (`meta/<id>.meta`).
    MetaId
);
id_type!(
    /// Names a snapshot (`snapshots/<id>.snap`).
    SnapshotId
);

/// 64 random bits from the kernel, never 0. Falls back to time and pid mixed
/// through BLAKE2b if getrandom is unavailable, which only weakens uniqueness
/// against a concurrent writer that the lock already excludes.
pub(crate) fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: buf is valid for 8 bytes of writes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    let mut v = u64::from_le_bytes(buf);
    if n != 8 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut seed = Vec::new();
        seed.extend_from_slice(&now.to_le_bytes());
        seed.extend_from_slice(&std::process::id().to_le_bytes());
        let h = blake2b_simd::blake2b(&seed);
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.as_bytes()[..8]);
        v = u64::from_le_bytes(b);
    }
    if v == 0 {
        1
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = PackId(0x0123_4567_89ab_cdef);
        assert_eq!(id.to_string(), "0123456789abcdef");
        assert_eq!(PackId::parse("0123456789abcdef"), Some(id));
        assert_eq!(PackId::parse("0000000000000000"), None);
        assert_eq!(PackId::parse("xyz"), None);
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(SnapshotId::random(), SnapshotId::random());
    }
}
