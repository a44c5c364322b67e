//! `sigs/<id>.sig`: signature pages, fixed width, read through a memory map.
//!
//! A page is `page_entries` entries of [`ENTRY_SIZE`] bytes: the block's weak
//! rolling checksum (u32 LE) and the first 16 bytes of its BLAKE2b-256. A page
//! sits at `HEADER_SIZE + slot * page_entries * ENTRY_SIZE`; a short last page
//! of a version still takes a whole slot. Pages are checked against the XXH3-64
//! that the referencing map records, so the file needs no checksum of its own.

use super::Reader;
use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"DSYNCSIG";
pub const HEADER_SIZE: usize = 16;
/// Bytes of one signature entry.
pub const ENTRY_SIZE: usize = 20;
/// Bytes of the strong hash kept per entry.
pub const STRONG_SIZE: usize = 16;

pub fn header(version: u32, page_entries: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..16].copy_from_slice(&page_entries.to_le_bytes());
    h
}

/// Checks a header; returns the page size in entries.
pub fn check_header(h: &[u8], object: &str) -> Result<u32> {
    let mut r = Reader::new(h, object);
    if r.take(8)? != MAGIC {
        return Err(Error::corrupt(
            object,
            0,
            "not a signature file (wrong magic)",
        ));
    }
    let v = r.u32()?;
    if v > super::FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            path: object.into(),
            found: v,
            supported: super::FORMAT_VERSION,
        });
    }
    let pe = r.u32()?;
    if !super::valid_page_entries(pe) {
        return Err(Error::corrupt(object, 12, "page size out of range"));
    }
    Ok(pe)
}
