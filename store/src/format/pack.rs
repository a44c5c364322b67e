//! `packs/<id>.pack`: compressed frames of literal bytes, and their index.
//!
//! A pack is read one frame at a time, so its index sits in a trailer that a
//! reader finds from the end of the file; a pack cut short anywhere fails the
//! trailer check and is never half-trusted.

use super::Reader;
use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"DSYNCPAK";
pub const END_MAGIC: &[u8; 8] = b"DSYNCEND";
pub const HEADER_SIZE: u64 = 16;
pub const TRAILER_SIZE: u64 = 32;
pub const INDEX_ENTRY_SIZE: u64 = 24;
/// Largest uncompressed frame a pack may hold.
pub const MAX_FRAME: u32 = 4 << 20;

/// One frame's index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameEntry {
    /// Where the compressed bytes start in the pack file.
    pub file_offset: u64,
    /// Compressed length.
    pub clen: u32,
    /// Uncompressed length.
    pub ulen: u32,
    /// XXH3-64 of the compressed bytes.
    pub sum: u64,
}

pub fn header(version: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h
}

/// Index and trailer bytes for `frames`, the index starting at `index_offset`.
pub fn encode_index(frames: &[FrameEntry], index_offset: u64) -> Vec<u8> {
    let mut w = super::Writer::default();
    for f in frames {
        w.u64(f.file_offset);
        w.u32(f.clen);
        w.u32(f.ulen);
        w.u64(f.sum);
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&w.buf);
    w.u64(index_offset);
    w.u32(frames.len() as u32);
    w.u32(0);
    w.u64(sum);
    w.bytes(END_MAGIC);
    w.buf
}

/// Checks the header.
pub fn check_header(h: &[u8], object: &str) -> Result<()> {
    let mut r = Reader::new(h, object);
    if r.take(8)? != MAGIC {
        return Err(Error::corrupt(object, 0, "not a pack (wrong magic)"));
    }
    let v = r.u32()?;
    if v > super::FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            path: object.into(),
            found: v,
            supported: super::FORMAT_VERSION,
        });
    }
    Ok(())
}

/// Parses the trailer: returns (index offset, frame count) after checking that
/// they fit a file of `file_len` bytes.
pub fn decode_trailer(t: &[u8], file_len: u64, object: &str) -> Result<(u64, u32, u64)> {
    let mut r = Reader::new(t, object);
    let index_offset = r.u64()?;
    let count = r.u32()?;
    let _ = r.u32()?;
    let sum = r.u64()?;
    if r.take(8)? != END_MAGIC {
        return Err(Error::corrupt(
            object,
            file_len.saturating_sub(8),
            "pack trailer missing (pack cut short?)",
        ));
    }
    let want = index_offset
        .checked_add(count as u64 * INDEX_ENTRY_SIZE)
        .and_then(|v| v.checked_add(TRAILER_SIZE));
    if index_offset < HEADER_SIZE || want != Some(file_len) {
        return Err(Error::corrupt(
            object,
            file_len.saturating_sub(TRAILER_SIZE),
            "pack trailer does not fit the file",
        ));
    }
    Ok((index_offset, count, sum))
}

/// Parses and checks the index: frames in order, inside the data area, sizes in range.
pub fn decode_index(
    bytes: &[u8],
    sum: u64,
    index_offset: u64,
    object: &str,
) -> Result<Vec<FrameEntry>> {
    if xxhash_rust::xxh3::xxh3_64(bytes) != sum {
        return Err(Error::corrupt(
            object,
            index_offset,
            "pack index checksum mismatch",
        ));
    }
    let mut r = Reader::new(bytes, object);
    let n = bytes.len() / INDEX_ENTRY_SIZE as usize;
    let mut out = Vec::with_capacity(n);
    let mut next = HEADER_SIZE;
    for i in 0..n {
        let f = FrameEntry {
            file_offset: r.u64()?,
            clen: r.u32()?,
            ulen: r.u32()?,
            sum: r.u64()?,
        };
        if f.file_offset != next || f.ulen == 0 || f.ulen > MAX_FRAME || f.clen == 0 {
            return Err(Error::corrupt(
                object,
                index_offset + i as u64 * INDEX_ENTRY_SIZE,
                format!("frame {i} has an invalid index entry"),
            ));
        }
        next = f.file_offset + f.clen as u64;
        out.push(f);
    }
    if next != index_offset {
        return Err(Error::corrupt(
            object,
            index_offset,
            "frames do not end where the index starts",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn trailer_and_index_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            len in 0u64..1 << 40,
        ) {
            let t = &bytes[..bytes.len().min(32)];
            if let Ok((off, _n, _sum)) = decode_trailer(t, len, "p") {
                proptest::prop_assert!(off >= HEADER_SIZE);
            }
            // An index whose checksum is right but whose entries are anything.
            let sum = xxhash_rust::xxh3::xxh3_64(&bytes);
            let _ = decode_index(&bytes[..bytes.len() / 24 * 24], sum, 16 + len % 1000, "p");
            let _ = check_header(&bytes, "p");
        }
    }

    #[test]
    fn index_round_trip() {
        let frames = vec![
            FrameEntry {
                file_offset: 16,
                clen: 10,
                ulen: 100,
                sum: 1,
            },
            FrameEntry {
                file_offset: 26,
                clen: 5,
                ulen: 50,
                sum: 2,
            },
        ];
        let enc = encode_index(&frames, 31);
        let len = 31 + enc.len() as u64;
        let t = &enc[enc.len() - 32..];
        let (off, n, sum) = decode_trailer(t, len, "p").unwrap();
        assert_eq!((off, n), (31, 2));
        let back = decode_index(&enc[..enc.len() - 32], sum, off, "p").unwrap();
        assert_eq!(back, frames);
        assert!(decode_trailer(t, len + 1, "p").is_err());
        let mut bad = enc.clone();
        bad[3] ^= 1;
        assert!(decode_index(&bad[..bad.len() - 32], sum, off, "p").is_err());
    }
}
