//! Signatures: per block of a version, a weak rolling checksum and the first 16
//! bytes of its BLAKE2b-256; and the whole-file hash built from the same block
//! hashes.
//!
//! Blocks are hashed many at a time with `blake2b_simd::many`, which runs
//! several BLAKE2b compressions side by side in SIMD lanes: on 4 KiB blocks it
//! is about twice as fast per core as hashing one stream. That is also why the
//! whole-file hash is a hash of block hashes rather than BLAKE2b over the bytes:
//! one stream would cap a backup at one core's ~1.2 GB/s, while the hash list
//! comes free from the signature pass.
//!
//! A [`SigView`] reads an old signature in place: its pages are slices of
//! memory-mapped signature files (or of a buffer), so loading the signature of a
//! 100 GiB file costs a page list, not a parse. Each page is checked against the
//! checksum its map records the first time it is touched; a page that fails is
//! treated as matching nothing (so a damaged signature can cost space, never a
//! wrong byte) and counted in [`SigView::damaged_pages`].

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use super::rollsum;
use super::table::WeakTable;
use crate::format::sig::{ENTRY_SIZE, STRONG_SIZE};

/// A signature entry: weak checksum (u32 LE) then 16 bytes of BLAKE2b-256.
pub type Entry = [u8; ENTRY_SIZE];
/// A full BLAKE2b-256 block digest.
pub type Digest = [u8; 32];

/// BLAKE2b-256 of one block.
pub fn block_digest(block: &[u8]) -> Digest {
    let h = blake2b_simd::Params::new().hash_length(32).hash(block);
    let mut d = [0u8; 32];
    d.copy_from_slice(h.as_bytes());
    d
}

/// The strong hash of a signature's entries. A repository's signatures are
/// BLAKE2b (FORMAT.md); `dsync sync` may use XXH3-128, as rsync uses
/// xxh128: the sender is the source of every byte either way, so a
/// collision could only be chosen by the side it would mislead, and it is
/// a tenth of BLAKE2b's cost (BLAKE2b was 45% of a remote image sync's CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockHash {
    Blake2b,
    Xxh3,
}

impl BlockHash {
    /// Digests of all `blocks`, in order. XXH3-128 fills the first 16 bytes
    /// (little-endian), the rest zero.
    pub fn digest_many(self, blocks: &[&[u8]], out: &mut Vec<Digest>) {
        match self {
            BlockHash::Blake2b => digest_many(blocks, out),
            BlockHash::Xxh3 => out.extend(blocks.iter().map(|b| {
                let mut d = [0u8; 32];
                d[..16].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(b).to_le_bytes());
                d
            })),
        }
    }
}

/// Hashes all `blocks` with SIMD across inputs; digests in the same order.
pub fn digest_many(blocks: &[&[u8]], out: &mut Vec<Digest>) {
    let params = blake2b_simd::Params::new().hash_length(32).to_owned();
    let mut jobs: Vec<blake2b_simd::many::HashManyJob> = blocks
        .iter()
        .map(|b| blake2b_simd::many::HashManyJob::new(&params, b))
        .collect();
    blake2b_simd::many::hash_many(jobs.iter_mut());
    out.extend(jobs.iter().map(|j| {
        let mut d = [0u8; 32];
        d.copy_from_slice(j.to_hash().as_bytes());
        d
    }));
}

/// The entry of a block from its bytes' weak checksum and digest.
pub fn entry(weak: u32, digest: &Digest) -> Entry {
    let mut e = [0u8; ENTRY_SIZE];
    e[..4].copy_from_slice(&weak.to_le_bytes());
    e[4..].copy_from_slice(&digest[..STRONG_SIZE]);
    e
}

pub fn entry_weak(e: &Entry) -> u32 {
    u32::from_le_bytes([e[0], e[1], e[2], e[3]])
}

/// Entry and digest of an all-zero block of a given size.
#[derive(Clone, Copy, Debug)]
pub struct ZeroBlock {
    pub entry: Entry,
    pub digest: Digest,
}

impl ZeroBlock {
    /// The zero block of `block_size` bytes (computed once for the
    /// default size: every file's backup and restore asks for it).
    pub fn new(block_size: u32) -> Self {
        static DEFAULT: std::sync::OnceLock<ZeroBlock> = std::sync::OnceLock::new();
        if block_size == 4096 {
            return *DEFAULT.get_or_init(|| ZeroBlock::compute(4096));
        }
        ZeroBlock::compute(block_size)
    }

    fn compute(block_size: u32) -> Self {
        Self::with_hash(block_size, BlockHash::Blake2b)
    }

    /// The zero block under another strong hash.
    pub fn with_hash(block_size: u32, hash: BlockHash) -> Self {
        let zeros = vec![0u8; block_size as usize];
        let mut d = Vec::with_capacity(1);
        hash.digest_many(&[&zeros], &mut d);
        let digest = d[0];
        ZeroBlock {
            entry: entry(rollsum::weak(&zeros), &digest),
            digest,
        }
    }
}

/// How a version's whole-file hash is defined (FORMAT.md, "File hash").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashScheme {
    /// Format 1 (`dsync-file-v1`): the size first, so it needs the size before
    /// the data. Still verified for versions that format 1 wrote.
    SizeFirst,
    /// Format 2 (`dsync-file-v2`): the size last, so a stream of unknown
    /// length (`dsync backup --stdin`) is hashed in the same single pass.
    SizeLast,
}

/// Streams block digests, in order, into the whole-file hash.
pub struct FileHasher {
    state: blake2b_simd::State,
    scheme: HashScheme,
}

impl FileHasher {
    /// The hash every new version gets ([`HashScheme::SizeLast`]).
    pub fn new(block_size: u32) -> Self {
        Self::with_scheme(HashScheme::SizeLast, 0, block_size)
    }

    /// The hash of a version of `file_size` bytes under `scheme` (the size is
    /// used only by [`HashScheme::SizeFirst`]; [`FileHasher::finish`] takes it
    /// for the other).
    pub fn with_scheme(scheme: HashScheme, file_size: u64, block_size: u32) -> Self {
        let personal: &[u8] = match scheme {
            HashScheme::SizeFirst => b"dsync-file-v1",
            HashScheme::SizeLast => b"dsync-file-v2",
        };
        let mut state = blake2b_simd::Params::new()
            .hash_length(32)
            .personal(personal)
            .to_state();
        if scheme == HashScheme::SizeFirst {
            state.update(&file_size.to_le_bytes());
        }
        state.update(&block_size.to_le_bytes());
        FileHasher { state, scheme }
    }

    pub fn update(&mut self, digests: &[Digest]) {
        for d in digests {
            self.state.update(d);
        }
    }

    /// The hash of a file of `file_size` bytes whose digests were all given.
    pub fn finish(&self, file_size: u64) -> [u8; 32] {
        let mut state = self.state.clone();
        if self.scheme == HashScheme::SizeLast {
            state.update(&file_size.to_le_bytes());
        }
        let mut h = [0u8; 32];
        h.copy_from_slice(state.finalize().as_bytes());
        h
    }
}

/// The whole-file hash of a buffer under `scheme` (the plain reference for
/// tests and checks).
pub fn file_hash_with(scheme: HashScheme, data: &[u8], block_size: u32) -> [u8; 32] {
    let mut h = FileHasher::with_scheme(scheme, data.len() as u64, block_size);
    for b in data.chunks(block_size as usize) {
        h.update(&[block_digest(b)]);
    }
    h.finish(data.len() as u64)
}

/// The whole-file hash a new version of `data` gets.
pub fn file_hash(data: &[u8], block_size: u32) -> [u8; 32] {
    file_hash_with(HashScheme::SizeLast, data, block_size)
}

/// Bytes that a signature page lives in.
pub type PageBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where a page's entries are: a byte range of shared storage, or the zero page.
#[derive(Clone)]
pub enum PageSource {
    Bytes {
        bytes: PageBytes,
        offset: usize,
        sum: Option<u64>,
    },
    Zero,
}

/// An old version's signature, read in place.
pub struct SigView {
    block_size: u32,
    file_size: u64,
    blocks: u64,
    page_entries: u32,
    pages: Vec<PageSource>,
    state: Vec<AtomicU8>,
    zero: ZeroBlock,
    zero_page: Vec<u8>,
    damaged: AtomicU64,
    table: OnceLock<WeakTable>,
    hash: BlockHash,
}

const UNCHECKED: u8 = 0;
const GOOD: u8 = 1;
const BAD: u8 = 2;

impl SigView {
    /// A view over `pages`. Every `Bytes` page must hold its entries inside its
    /// buffer; a page that does not is marked damaged rather than trusted.
    pub fn new(block_size: u32, file_size: u64, page_entries: u32, pages: Vec<PageSource>) -> Self {
        let blocks = file_size.div_ceil(block_size as u64);
        let zero = ZeroBlock::new(block_size);
        let zero_page = zero.entry.repeat(page_entries as usize);
        let state = pages.iter().map(|_| AtomicU8::new(UNCHECKED)).collect();
        SigView {
            block_size,
            file_size,
            blocks,
            page_entries,
            pages,
            state,
            zero,
            zero_page,
            damaged: AtomicU64::new(0),
            table: OnceLock::new(),
            hash: BlockHash::Blake2b,
        }
    }

    /// The view of a signature whose strong hash is `hash`.
    pub fn with_hash(mut self, hash: BlockHash) -> Self {
        if hash != self.hash {
            self.zero = ZeroBlock::with_hash(self.block_size, hash);
            self.zero_page = self.zero.entry.repeat(self.page_entries as usize);
            self.hash = hash;
        }
        self
    }

    /// The strong hash of its entries.
    pub fn hash(&self) -> BlockHash {
        self.hash
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    pub fn file_size(&self) -> u64 {
        self.file_size
    }
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    pub fn zero(&self) -> &ZeroBlock {
        &self.zero
    }
    /// Pages that failed their checksum so far.
    pub fn damaged_pages(&self) -> u64 {
        self.damaged.load(Ordering::Relaxed)
    }

    /// Entries in page `p`.
    fn page_len(&self, p: usize) -> usize {
        let pe = self.page_entries as u64;
        (self.blocks - p as u64 * pe).min(pe) as usize
    }

    /// The bytes of page `p` if it is sound.
    pub fn page(&self, p: usize) -> Option<&[u8]> {
        let n = self.page_len(p) * ENTRY_SIZE;
        match self.pages.get(p)? {
            PageSource::Zero => Some(&self.zero_page[..n]),
            PageSource::Bytes { bytes, offset, sum } => {
                let all = (**bytes).as_ref();
                let s = all.get(*offset..offset.checked_add(n)?);
                let st = &self.state[p];
                match st.load(Ordering::Relaxed) {
                    GOOD => s,
                    BAD => None,
                    _ => {
                        let ok = match (s, sum) {
                            (Some(s), Some(sum)) => xxhash_rust::xxh3::xxh3_64(s) == *sum,
                            (Some(_), None) => true,
                            (None, _) => false,
                        };
                        if ok {
                            st.store(GOOD, Ordering::Relaxed);
                            s
                        } else {
                            if st.swap(BAD, Ordering::Relaxed) != BAD {
                                self.damaged.fetch_add(1, Ordering::Relaxed);
                            }
                            None
                        }
                    }
                }
            }
        }
    }

    /// Entry of block `i`, if it exists and its page is sound.
    #[inline]
    pub fn entry(&self, i: u64) -> Option<&Entry> {
        if i >= self.blocks {
            return None;
        }
        let pe = self.page_entries as u64;
        let page = self.page((i / pe) as usize)?;
        let at = (i % pe) as usize * ENTRY_SIZE;
        page.get(at..at + ENTRY_SIZE)?.try_into().ok()
    }

    /// Length of block `i` of the old version.
    pub fn block_len(&self, i: u64) -> u64 {
        let bs = self.block_size as u64;
        (self.file_size - i * bs).min(bs)
    }

    /// The lookup table from weak checksum to block, built on first use.
    pub fn table(&self) -> &WeakTable {
        self.table.get_or_init(|| WeakTable::build(self))
    }
}

/// A signature held in memory, for callers that have a whole old buffer (tests,
/// benchmarks, the differential test against fast_rsync).
pub struct Signature {
    pub block_size: u32,
    pub file_size: u64,
    pub entries: Vec<u8>,
}

impl Signature {
    /// The signature of `data`, computed in parallel.
    pub fn calculate(data: &[u8], block_size: u32) -> Self {
        use rayon::prelude::*;
        let bs = block_size as usize;
        let per_task = 256 * bs;
        let parts: Vec<Vec<u8>> = data
            .par_chunks(per_task)
            .map(|part| {
                let blocks: Vec<&[u8]> = part.chunks(bs).collect();
                let mut d = Vec::with_capacity(blocks.len());
                digest_many(&blocks, &mut d);
                let mut out = Vec::with_capacity(blocks.len() * ENTRY_SIZE);
                for (b, d) in blocks.iter().zip(&d) {
                    out.extend_from_slice(&entry(rollsum::weak(b), d));
                }
                out
            })
            .collect();
        Signature {
            block_size,
            file_size: data.len() as u64,
            entries: parts.concat(),
        }
    }

    /// A view for diffing against.
    pub fn view(&self) -> SigView {
        let bytes: PageBytes = Arc::new(self.entries.clone());
        let pe = 1024u32;
        let blocks = self.file_size.div_ceil(self.block_size as u64);
        let pages = (0..blocks.div_ceil(pe as u64))
            .map(|p| PageSource::Bytes {
                bytes: bytes.clone(),
                offset: p as usize * pe as usize * ENTRY_SIZE,
                sum: None,
            })
            .collect();
        SigView::new(self.block_size, self.file_size, pe, pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_matches_single() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let blocks: Vec<&[u8]> = data.chunks(4096).collect();
        let mut d = Vec::new();
        digest_many(&blocks, &mut d);
        for (b, d) in blocks.iter().zip(&d) {
            assert_eq!(&block_digest(b), d);
        }
    }

    #[test]
    fn damaged_page_matches_nothing() {
        let data = vec![1u8; 3 * 4096];
        let sig = Signature::calculate(&data, 4096);
        let mut bytes = sig.entries.clone();
        let sum = xxhash_rust::xxh3::xxh3_64(&bytes);
        bytes[5] ^= 1;
        let view = SigView::new(
            4096,
            data.len() as u64,
            4,
            vec![PageSource::Bytes {
                bytes: Arc::new(bytes),
                offset: 0,
                sum: Some(sum),
            }],
        );
        assert!(view.entry(0).is_none());
        assert_eq!(view.damaged_pages(), 1);
    }
}

#[cfg(test)]
mod hash_vectors {
    use super::*;

    fn hex(h: [u8; 32]) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The test vectors FORMAT.md shows ("File hash").
    #[test]
    fn file_hash_vectors() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let v2 = hex(file_hash_with(HashScheme::SizeLast, &data, 4096));
        let v1 = hex(file_hash_with(HashScheme::SizeFirst, &data, 4096));
        assert_eq!(
            v2,
            "3611715cb670e1be74cda61e0b4debf9dcd5b16af9bc3575122baea1391ed2b8"
        );
        assert_eq!(
            v1,
            "bac37ec5131d88c54241d2f8462beded5d563d9e9ec508293a801076cf7d5bdf"
        );
    }
}
