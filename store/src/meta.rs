//! Format 3's metadata store: blobs in meta packs, and lists written as and
//! read from pages (store/FORMAT.md, "Format 3").
//!
//! [`MetaWriter`] appends blobs to a meta pack, one zstd frame each, and
//! hands back a [`BlobRef`]; a blob whose hash it has already written (in
//! this run, or given to it as known) is not written again, which is how an
//! unchanged directory page or signature page costs nothing in a new
//! snapshot. [`ListWriter`] turns records, streamed in key order, into a
//! list: inline when small, else leaf pages cut by content (a page ends
//! after a record whose key hashes to 0 mod 64 once it holds 16 KiB, or at
//! 64 KiB: ~20 KiB on average, one zstd decode of ~10 µs per lookup) under
//! as many levels of index pages as it takes; memory is a page per level. [`ListReader`] walks a list in order or looks a key up, one
//! page per level, checking every page against its hash and its parent.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::{Backend, Kind};
use crate::error::{Error, Result};
use crate::format::v3::{BlobKind, BlobRef, Child, List, Page, Record};
use crate::format::v3::{INLINE_MAX_BYTES, INLINE_MAX_RECORDS, MAX_BLOB, MAX_DEPTH};
use crate::format::Writer;
use crate::id::MetaId;
use crate::pack::{compress_frames, FrameMeta, PackCache, PackWriter};

/// A page is cut after a record whose key hashes to 0 mod `CUT_MODULUS`
/// once it holds `PAGE_MIN` bytes, and always at `PAGE_MAX`.
const PAGE_MIN: usize = 16 << 10;
const PAGE_MAX: usize = 64 << 10;
const CUT_MODULUS: u64 = 64;
/// zstd level of metadata blobs (small and written once per change).
const BLOB_LEVEL: i32 = 3;
/// A meta pack is closed at this size.
const META_PACK_TARGET: u64 = 16 << 20;

fn cut_here(key: &[u8]) -> bool {
    let h = blake2b_simd::Params::new()
        .hash_length(8)
        .personal(b"dsync-cut-v3")
        .hash(key);
    let mut b = [0u8; 8];
    b.copy_from_slice(h.as_bytes());
    u64::from_le_bytes(b) % CUT_MODULUS == 0
}

/// Writes blobs into meta packs.
pub(crate) struct MetaWriter {
    pack: Option<PackWriter>,
    /// Blobs known to be stored: written by this writer, or named by the
    /// snapshot this one follows.
    known: HashMap<[u8; 16], BlobRef>,
    compressed: Vec<u8>,
    frames: Vec<FrameMeta>,
    /// Bytes of meta packs finished.
    pub added: u64,
    /// Blobs written (not found known).
    pub blobs_written: u64,
}

impl MetaWriter {
    pub fn new() -> MetaWriter {
        MetaWriter {
            pack: None,
            known: HashMap::new(),
            compressed: Vec::new(),
            frames: Vec::new(),
            added: 0,
            blobs_written: 0,
        }
    }

    /// Records that `r` is stored (a blob of the previous snapshot), so an
    /// identical blob is referenced instead of written again.
    pub fn know(&mut self, r: BlobRef) {
        self.known.entry(r.hash).or_insert(r);
    }

    /// Stores a blob; returns its reference.
    ///
    /// # Errors
    /// [`Error::Io`]; [`Error::Internal`] for a blob over the frame limit.
    pub fn put(&mut self, backend: &dyn Backend, kind: BlobKind, bytes: &[u8]) -> Result<BlobRef> {
        let hash = crate::format::v3::blob_hash(kind, bytes);
        if let Some(r) = self.known.get(&hash) {
            return Ok(*r);
        }
        if bytes.len() > MAX_BLOB {
            return Err(Error::Internal(format!(
                "{kind:?} blob of {} bytes",
                bytes.len()
            )));
        }
        if self
            .pack
            .as_ref()
            .is_some_and(|p| p.file_len() >= META_PACK_TARGET)
        {
            if let Some(p) = self.pack.take() {
                self.added += p.finish()?;
            }
        }
        let pack = match &mut self.pack {
            Some(p) => p,
            None => self
                .pack
                .insert(PackWriter::create_as(backend, Kind::Meta)?),
        };
        self.compressed.clear();
        self.frames.clear();
        compress_frames(
            bytes,
            MAX_BLOB,
            BLOB_LEVEL,
            &mut self.compressed,
            &mut self.frames,
        )?;
        let f = match self.frames.as_slice() {
            [f] => *f,
            // An empty blob compresses to one empty frame too; never two.
            _ => return Err(Error::Internal("a blob became several frames".into())),
        };
        let frame = pack.frame_count() as u32;
        pack.append(&self.compressed[..f.clen as usize], f.ulen, f.sum)?;
        let r = BlobRef {
            meta: MetaId(pack.id.0),
            frame,
            hash,
        };
        self.known.insert(hash, r);
        self.blobs_written += 1;
        Ok(r)
    }

    /// Completes the open meta pack (durable after the backend's sync).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn finish(&mut self) -> Result<u64> {
        if let Some(p) = self.pack.take() {
            self.added += p.finish()?;
        }
        Ok(self.added)
    }
}

/// Reads blob `r` of `kind` and checks it against its hash.
///
/// # Errors
/// [`Error::Io`] (a missing meta pack), [`Error::Corrupt`].
pub(crate) fn read_blob(cache: &PackCache, r: &BlobRef, kind: BlobKind) -> Result<Arc<Vec<u8>>> {
    let p = cache.meta(r.meta)?;
    let bytes = p.read_frame(r.frame)?;
    r.verify(kind, &bytes)?;
    Ok(Arc::new(bytes))
}

/// One level of a list being written: the encoded page so far.
struct Level {
    buf: Writer,
    /// Records (or children) in the page so far.
    n: u64,
    /// Records under the page so far.
    below: u64,
    first_key: Vec<u8>,
}

impl Level {
    fn new() -> Level {
        Level {
            buf: Writer::default(),
            n: 0,
            below: 0,
            first_key: Vec::new(),
        }
    }
}

/// Writes one list from records given in key order.
pub(crate) struct ListWriter<T: Record> {
    /// levels[0] holds records, levels[k] children of level k - 1.
    levels: Vec<Level>,
    state: T::State,
    /// Records so far while the list may still be inline, and their
    /// inline encoding.
    inline: Option<Vec<T>>,
    inline_buf: Writer,
    inline_state: T::State,
    count: u64,
}

impl<T: Record> ListWriter<T> {
    pub fn new() -> ListWriter<T> {
        ListWriter {
            levels: vec![Level::new()],
            state: T::start(),
            inline: Some(Vec::new()),
            inline_buf: Writer::default(),
            inline_state: T::start(),
            count: 0,
        }
    }

    /// Adds the next record (keys strictly increasing: the caller's duty,
    /// and a reader refuses a list that breaks it).
    ///
    /// # Errors
    /// [`Error::Io`] when a finished page cannot be stored.
    pub fn push(&mut self, rec: T, meta: &mut MetaWriter, backend: &dyn Backend) -> Result<()> {
        let Some(v) = &mut self.inline else {
            return self.push_paged(rec, meta, backend);
        };
        rec.encode(&mut self.inline_buf, &mut self.inline_state);
        v.push(rec);
        if v.len() > INLINE_MAX_RECORDS || self.inline_buf.buf.len() > INLINE_MAX_BYTES {
            // Too big to sit in its parent: page it. Pages are cut by the
            // records alone, so replaying them cuts where a list paged from
            // the start would have.
            for r in self.inline.take().unwrap_or_default() {
                self.push_paged(r, meta, backend)?;
            }
        }
        Ok(())
    }

    fn push_paged(&mut self, rec: T, meta: &mut MetaWriter, backend: &dyn Backend) -> Result<()> {
        let key = rec.key(self.count);
        let leaf = &mut self.levels[0];
        if leaf.n == 0 {
            leaf.first_key = key.clone();
            self.state = T::start();
        }
        rec.encode(&mut leaf.buf, &mut self.state);
        leaf.n += 1;
        leaf.below += 1;
        self.count += 1;
        let size = leaf.buf.buf.len();
        if size >= PAGE_MAX || (size >= PAGE_MIN && cut_here(&key)) {
            self.cut(0, meta, backend)?;
        }
        Ok(())
    }

    /// Ends the page at `level`: stores it and adds it to the level above.
    fn cut(&mut self, level: usize, meta: &mut MetaWriter, backend: &dyn Backend) -> Result<()> {
        let l = std::mem::replace(&mut self.levels[level], Level::new());
        if l.n == 0 {
            return Ok(());
        }
        let mut page = Writer::default();
        page.varint(l.n);
        page.bytes(&l.buf.buf);
        let kind = if level == 0 { T::LEAF } else { T::INDEX };
        let r = meta.put(backend, kind, &page.buf)?;
        if level + 1 >= MAX_DEPTH as usize {
            return Err(Error::Internal("list deeper than the format allows".into()));
        }
        if self.levels.len() == level + 1 {
            self.levels.push(Level::new());
        }
        let up = &mut self.levels[level + 1];
        if up.n == 0 {
            up.first_key = l.first_key.clone();
        }
        up.buf.varint(l.below);
        up.buf.vbytes(&l.first_key);
        r.encode(&mut up.buf);
        up.n += 1;
        up.below += l.below;
        let size = up.buf.buf.len();
        if size >= PAGE_MAX || (size >= PAGE_MIN && cut_here(&l.first_key)) {
            self.cut(level + 1, meta, backend)?;
        }
        Ok(())
    }

    /// Ends the list.
    ///
    /// # Errors
    /// [`Error::Io`] when a page cannot be stored.
    pub fn finish(mut self, meta: &mut MetaWriter, backend: &dyn Backend) -> Result<List<T>> {
        if let Some(v) = self.inline.take() {
            return Ok(List::Inline(v));
        }
        // Close the levels from the bottom; the root is the one page left
        // at the top.
        let mut level = 0;
        loop {
            let top = level + 1 == self.levels.len();
            if top && level > 0 {
                let l = &self.levels[level];
                if l.n != 1 {
                    self.cut(level, meta, backend)?;
                    level += 1;
                    continue;
                }
                let mut r = crate::format::Reader::new(&l.buf.buf, "list writer");
                let _below = r.varint()?;
                let _key = r.vbytes(usize::MAX)?;
                let root = BlobRef::decode(&mut r)?;
                return Ok(List::Paged {
                    count: self.count,
                    depth: level as u8,
                    root,
                });
            }
            self.cut(level, meta, backend)?;
            level += 1;
        }
    }
}

/// Reads lists through a pack cache.
pub(crate) struct ListReader<'c> {
    cache: &'c PackCache,
}

impl<'c> ListReader<'c> {
    pub fn new(cache: &'c PackCache) -> ListReader<'c> {
        ListReader { cache }
    }

    fn page<T: Record>(&self, r: &BlobRef, depth: u8) -> Result<Page<T>> {
        let leaf = depth == 1;
        let kind = if leaf { T::LEAF } else { T::INDEX };
        let bytes = read_blob(self.cache, r, kind)?;
        let object = format!("meta/{}.meta frame {}", r.meta, r.frame);
        Page::decode(&bytes, leaf, &object)
    }

    /// Calls `f` on every record of `list`, in order. Checks that each page
    /// holds the records its parent says and that keys increase across
    /// pages.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the page; what `f` returns.
    pub fn for_each<T: Record>(
        &self,
        list: &List<T>,
        f: &mut dyn FnMut(T) -> Result<()>,
    ) -> Result<()> {
        match list {
            List::Inline(v) => {
                for r in v {
                    f(r.clone())?;
                }
                Ok(())
            }
            List::Paged { count, depth, root } => {
                let mut seen = 0u64;
                let mut last: Option<T> = None;
                let first = Vec::new();
                self.walk(root, *depth, &first, *count, &mut seen, &mut last, f)?;
                if seen != *count {
                    return Err(Error::corrupt(
                        format!("meta/{}.meta frame {}", root.meta, root.frame),
                        0,
                        format!("list holds {seen} records, its parent says {count}"),
                    ));
                }
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn walk<T: Record>(
        &self,
        r: &BlobRef,
        depth: u8,
        first_key: &[u8],
        below: u64,
        seen: &mut u64,
        last: &mut Option<T>,
        f: &mut dyn FnMut(T) -> Result<()>,
    ) -> Result<()> {
        let start = *seen;
        let bad = |detail: String| {
            Error::corrupt(format!("meta/{}.meta frame {}", r.meta, r.frame), 0, detail)
        };
        match self.page::<T>(r, depth)? {
            Page::Leaf(v) => {
                for rec in v {
                    if !first_key.is_empty() && *seen == start && rec.key(*seen) != first_key {
                        return Err(bad("first record differs from its index key".into()));
                    }
                    if let Some(prev) = last.as_ref() {
                        if !rec.follows(prev) {
                            return Err(bad("records out of order across pages".into()));
                        }
                    }
                    *last = Some(rec.clone());
                    *seen += 1;
                    f(rec)?;
                }
            }
            Page::Index(children) => {
                if depth <= 1 {
                    return Err(bad("index page at leaf depth".into()));
                }
                for c in &children {
                    self.walk(&c.page, depth - 1, &c.first_key, c.below, seen, last, f)?;
                }
            }
        }
        if *seen - start != below {
            return Err(bad(format!(
                "page holds {} records, its parent says {below}",
                *seen - start
            )));
        }
        Ok(())
    }

    /// The record with key `key`, if the list has one: one page per level.
    /// (The lazy tree walks of the directories work use it; stage 1 reads
    /// root lists whole.)
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the page.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn lookup<T: Record>(&self, list: &List<T>, key: &[u8]) -> Result<Option<T>> {
        match list {
            List::Inline(v) => Ok(v
                .iter()
                .enumerate()
                .find(|(i, r)| r.key(*i as u64) == key)
                .map(|(_, r)| r.clone())),
            List::Paged { depth, root, .. } => {
                let (mut r, mut d) = (*root, *depth);
                // Index of the first record under the current page.
                let mut base = 0u64;
                loop {
                    match self.page::<T>(&r, d)? {
                        Page::Leaf(v) => {
                            return Ok(v
                                .into_iter()
                                .enumerate()
                                .find(|(i, rec)| rec.key(base + *i as u64) == key)
                                .map(|(_, rec)| rec))
                        }
                        Page::Index(children) => {
                            if d <= 1 {
                                return Err(Error::corrupt(
                                    format!("meta/{}.meta frame {}", r.meta, r.frame),
                                    0,
                                    "index page at leaf depth",
                                ));
                            }
                            let i = children.partition_point(|c| c.first_key.as_slice() <= key);
                            let Some(c) = i.checked_sub(1).and_then(|i| children.get(i)) else {
                                return Ok(None);
                            };
                            base += children[..i - 1].iter().map(|c| c.below).sum::<u64>();
                            let c: &Child = c;
                            r = c.page;
                            d -= 1;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
