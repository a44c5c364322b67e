//! Encode and decode of every on-disk structure, and nothing else.
//!
//! store/FORMAT.md is the specification; this module is its implementation.
//! All integers are little-endian. Every length, count and offset read from a
//! file is checked against the bytes actually present (and against a hard cap)
//! before it sizes a buffer or indexes a slice, so damaged or hostile bytes give
//! [`Error::Corrupt`], never a panic or a huge allocation.
//!
//! The small objects (config, snapshot manifests, extent maps) share one
//! envelope: a fixed header naming the kind and the format version, a body
//! (zstd-compressed when it is worth it), and a BLAKE2b-256 of everything before
//! it. Packs and signature files have layouts of their own, because they are
//! read piecewise (a frame, a page) rather than whole.

pub mod config;
pub mod map;
pub mod pack;
pub mod sig;
pub mod snapshot;
pub mod v3;

use crate::error::{Error, Result};

/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 2;

/// Upper bound on an envelope body after decompression: no manifest or map of a
/// sane repository comes near it, and it bounds what a damaged length can make
/// us allocate.
pub const MAX_BODY: u64 = 1 << 30;

/// Size of the envelope header: magic (8), version (4), flags (4), body length (8).
pub const ENVELOPE_HEADER: usize = 24;
/// Size of the envelope trailer: BLAKE2b-256 of header and body.
pub const ENVELOPE_TRAILER: usize = 32;

const FLAG_ZSTD: u32 = 1;

/// Appends little-endian fields to a buffer.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// A length-prefixed (u32) byte string.
    pub fn str(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
    /// Unsigned LEB128 (format 3's `varint`).
    pub fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }
    /// A zigzag-coded `i64` (format 3's `zigzag`).
    pub fn zigzag(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }
    /// A varint-length-prefixed byte string (format 3's `bytes`).
    pub fn vbytes(&mut self, v: &[u8]) {
        self.varint(v.len() as u64);
        self.buf.extend_from_slice(v);
    }
}

/// Reads little-endian fields, turning every overrun into [`Error::Corrupt`]
/// that names the object and the offset.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    object: &'a str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], object: &'a str) -> Self {
        Reader {
            buf,
            pos: 0,
            object,
        }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn corrupt(&self, detail: impl Into<String>) -> Error {
        Error::corrupt(self.object, self.pos as u64, detail)
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.corrupt(format!(
                "truncated: {n} bytes needed, {} left",
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    /// A length-prefixed byte string of at most `max` bytes.
    pub fn str(&mut self, max: usize) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(self.corrupt(format!("string of {n} bytes exceeds the limit of {max}")));
        }
        self.take(n)
    }
    /// A count of items of `item_size` bytes each, checked against what is left.
    pub fn count(&mut self, item_size: usize) -> Result<usize> {
        let n = self.u64()?;
        let max = (self.remaining() / item_size.max(1)) as u64;
        if n > max {
            return Err(self.corrupt(format!(
                "count {n} of {item_size}-byte items exceeds the {} bytes left",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }
    /// Unsigned LEB128: at most 10 bytes, no redundant zero group, no
    /// overflow.
    pub fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            let part = (b & 0x7f) as u64;
            if i == 9 && b > 1 {
                return Err(self.corrupt("varint overflows 64 bits"));
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(self.corrupt("varint with a redundant zero group"));
                }
                return Ok(v);
            }
        }
        Err(self.corrupt("varint longer than 10 bytes"))
    }
    /// A zigzag-coded `i64`.
    pub fn zigzag(&mut self) -> Result<i64> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }
    /// A varint that must fit in a u32.
    pub fn varint_u32(&mut self) -> Result<u32> {
        let v = self.varint()?;
        u32::try_from(v).map_err(|_| self.corrupt(format!("{v} does not fit 32 bits")))
    }
    /// A varint-length-prefixed byte string of at most `max` bytes.
    pub fn vbytes(&mut self, max: usize) -> Result<&'a [u8]> {
        let n = self.varint()?;
        if n > max as u64 {
            return Err(self.corrupt(format!("string of {n} bytes exceeds the limit of {max}")));
        }
        self.take(n as usize)
    }
    /// A varint count of records of at least `min_size` bytes each, checked
    /// against what is left.
    pub fn vcount(&mut self, min_size: usize) -> Result<usize> {
        let n = self.varint()?;
        let max = (self.remaining() / min_size.max(1)) as u64;
        if n > max {
            return Err(self.corrupt(format!(
                "count {n} exceeds what the {} bytes left can hold",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }
    pub fn finish(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(self.corrupt(format!("{} unexpected trailing bytes", self.remaining())));
        }
        Ok(())
    }
}

/// A signature block size every structure accepts: a power of two,
/// 512..=1 MiB.
pub(crate) fn valid_block_size(b: u32) -> bool {
    b.is_power_of_two() && (512..=1 << 20).contains(&b)
}

/// A number of signature entries per page every structure accepts.
pub(crate) fn valid_page_entries(n: u32) -> bool {
    (1..=65536).contains(&n)
}

/// Wraps `body` in an envelope of kind `magic`.
pub fn seal(magic: &[u8; 8], body: &[u8], compress: bool) -> Vec<u8> {
    seal_as(magic, FORMAT_VERSION, body, compress)
}

/// Wraps `body` in an envelope of kind `magic` marked with `version`.
pub fn seal_as(magic: &[u8; 8], version: u32, body: &[u8], compress: bool) -> Vec<u8> {
    let (flags, stored) = if compress {
        match zstd::bulk::compress(body, 3) {
            Ok(c) => (FLAG_ZSTD, c),
            Err(_) => (0, body.to_vec()),
        }
    } else {
        (0, body.to_vec())
    };
    let mut w = Writer::default();
    w.bytes(magic);
    w.u32(version);
    w.u32(flags);
    w.u64(stored.len() as u64);
    w.bytes(&stored);
    let sum = blake2b_simd::Params::new().hash_length(32).hash(&w.buf);
    w.bytes(sum.as_bytes());
    w.buf
}

/// Checks and opens an envelope: magic, version, checksum, then decompresses.
/// `object` names the file in errors.
///
/// # Errors
/// [`Error::Corrupt`] for any damage, [`Error::UnsupportedVersion`] for a newer
/// format.
pub fn open(magic: &[u8; 8], bytes: &[u8], object: &str) -> Result<Vec<u8>> {
    open_as(magic, bytes, object, FORMAT_VERSION).map(|(_, body)| body)
}

/// As [`open`], for an object of at most version `newest`; returns the
/// version found with the body.
///
/// # Errors
/// As [`open`].
pub fn open_as(magic: &[u8; 8], bytes: &[u8], object: &str, newest: u32) -> Result<(u32, Vec<u8>)> {
    let mut r = Reader::new(bytes, object);
    let m: [u8; 8] = r.array()?;
    if &m != magic {
        return Err(Error::corrupt(
            object,
            0,
            format!(
                "wrong magic {:?}, expected {:?}",
                String::from_utf8_lossy(&m),
                String::from_utf8_lossy(magic)
            ),
        ));
    }
    let version = r.u32()?;
    if version > newest {
        return Err(Error::UnsupportedVersion {
            path: object.into(),
            found: version,
            supported: newest,
        });
    }
    if version == 0 {
        return Err(Error::corrupt(object, 8, "format version 0"));
    }
    let flags = r.u32()?;
    let len = r.u64()?;
    if len != (bytes.len() as u64).saturating_sub((ENVELOPE_HEADER + ENVELOPE_TRAILER) as u64)
        || bytes.len() < ENVELOPE_HEADER + ENVELOPE_TRAILER
    {
        return Err(Error::corrupt(
            object,
            16,
            format!(
                "body length {len} does not fit the file of {} bytes",
                bytes.len()
            ),
        ));
    }
    let split = bytes.len() - ENVELOPE_TRAILER;
    let sum = blake2b_simd::Params::new()
        .hash_length(32)
        .hash(&bytes[..split]);
    if sum.as_bytes() != &bytes[split..] {
        return Err(Error::corrupt(object, split as u64, "checksum mismatch"));
    }
    let stored = &bytes[ENVELOPE_HEADER..split];
    if flags & !FLAG_ZSTD != 0 {
        return Err(Error::corrupt(
            object,
            12,
            format!("unknown flags {flags:#x}"),
        ));
    }
    let body = if flags & FLAG_ZSTD != 0 {
        decompress_bounded(stored, MAX_BODY, object, ENVELOPE_HEADER as u64)?
    } else {
        stored.to_vec()
    };
    Ok((version, body))
}

/// Decompresses a zstd stream of unknown size, refusing to grow past `max`.
pub fn decompress_bounded(src: &[u8], max: u64, object: &str, offset: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let dec = zstd::stream::read::Decoder::new(src)
        .map_err(|e| Error::corrupt(object, offset, format!("zstd: {e}")))?;
    let mut out = Vec::new();
    dec.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::corrupt(object, offset, format!("zstd: {e}")))?;
    if out.len() as u64 > max {
        return Err(Error::corrupt(
            object,
            offset,
            "body larger than the format allows",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip_and_damage() {
        for compress in [false, true] {
            let body = b"hello hello hello hello".to_vec();
            let sealed = seal(b"DSYNCTST", &body, compress);
            assert_eq!(open(b"DSYNCTST", &sealed, "t").unwrap(), body);
            for i in 0..sealed.len() {
                let mut bad = sealed.clone();
                bad[i] ^= 0x40;
                assert!(
                    open(b"DSYNCTST", &bad, "t").is_err(),
                    "flip at {i} undetected"
                );
            }
            for n in 0..sealed.len() {
                assert!(open(b"DSYNCTST", &sealed[..n], "t").is_err());
            }
        }
    }

    #[test]
    fn newer_version_is_refused() {
        let mut sealed = seal(b"DSYNCTST", b"x", false);
        let reseal = |sealed: &mut Vec<u8>, v: u32| {
            sealed[8..12].copy_from_slice(&v.to_le_bytes());
            let split = sealed.len() - 32;
            let sum = blake2b_simd::Params::new()
                .hash_length(32)
                .hash(&sealed[..split]);
            sealed[split..].copy_from_slice(sum.as_bytes());
        };
        reseal(&mut sealed, FORMAT_VERSION + 1);
        assert!(matches!(
            open(b"DSYNCTST", &sealed, "t"),
            Err(Error::UnsupportedVersion { found, .. }) if found == FORMAT_VERSION + 1
        ));
        // Every older version is still read.
        for v in 1..=FORMAT_VERSION {
            reseal(&mut sealed, v);
            assert_eq!(open(b"DSYNCTST", &sealed, "t").unwrap(), b"x");
        }
    }

    #[test]
    fn golden_envelope() {
        // The test vector FORMAT.md shows.
        let sealed = seal(b"DSYNCTST", b"abc", false);
        let hex: String = sealed.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            &hex[..54],
            "4453594e4354535402000000000000000300000000000000616263"
        );
        assert_eq!(sealed.len(), 24 + 3 + 32);
    }
}
