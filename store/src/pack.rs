//! Packs: writing frames of literal bytes, and reading them back through a
//! shared cache of decompressed frames.
//!
//! Durability: a pack's bytes are durable only after [`PackWriter::finish`]
//! (which writes the index) and the backend's sync; a pack is referenced by a
//! snapshot only after that, so a pack cut short by a crash is unreferenced
//! garbage.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};

use crate::backend::{Backend, Key, Kind, Object, ObjectWriter};
use crate::error::{Error, Result};
use crate::format::pack::{self as fmt, FrameEntry};
use crate::format::FORMAT_VERSION;
use crate::id::PackId;

/// A frame compressed by a worker thread: `clen` bytes at `start` of the
/// chunk's compressed buffer.
#[derive(Clone, Copy, Debug)]
pub struct FrameMeta {
    pub start: usize,
    pub clen: u32,
    pub ulen: u32,
    pub sum: u64,
}

thread_local! {
    static CCTX: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
    static RBUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// Compresses `data` into frames of at most `frame_size` uncompressed bytes,
/// appended to `out` (a reused buffer: no allocation per frame), with a
/// compression context kept per thread.
///
/// # Errors
/// [`Error::InvalidInput`] if zstd fails (it does not on valid parameters).
pub fn compress_frames(
    data: &[u8],
    frame_size: usize,
    level: i32,
    out: &mut Vec<u8>,
    frames: &mut Vec<FrameMeta>,
) -> Result<()> {
    let zerr = |e: std::io::Error| Error::Internal(format!("zstd compression failed: {e}"));
    CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).map_err(zerr)?));
        }
        let Some((_, cctx)) = c.as_mut() else {
            return Err(Error::Internal("zstd context missing".into()));
        };
        for part in data.chunks(frame_size.max(1)) {
            let start = out.len();
            let bound = zstd::zstd_safe::compress_bound(part.len());
            out.resize(start + bound, 0);
            let n = cctx
                .compress_to_buffer(part, &mut out[start..])
                .map_err(zerr)?;
            out.truncate(start + n);
            let sum = xxhash_rust::xxh3::xxh3_64(&out[start..start + n]);
            frames.push(FrameMeta {
                start,
                clen: n as u32,
                ulen: part.len() as u32,
                sum,
            });
        }
        Ok(())
    })
}

/// Decompresses one frame into `out` (cleared first) with a per-thread context.
fn decompress_frame(src: &[u8], ulen: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
    DCTX.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        let Some(dctx) = d.as_mut() else {
            return Err(std::io::Error::other("zstd context missing"));
        };
        out.clear();
        out.reserve(ulen);
        dctx.decompress_to_buffer(src, out)?;
        Ok(())
    })
}

fn decompress_frame_to_slice(src: &[u8], out: &mut [u8]) -> std::io::Result<usize> {
    DCTX.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        let Some(dctx) = d.as_mut() else {
            return Err(std::io::Error::other("zstd context missing"));
        };
        dctx.decompress_to_buffer(src, out)
    })
}

/// Where a client of a repository with latency (remote, S3) keeps a copy
/// of a data pack's tail (its index and trailer), so that opening the
/// pack costs no round trip: `index-packs-<id>.pack` in the client's
/// directory, holding `len:u64` (the pack's size) and then the pack's
/// bytes from its index offset to its end. A pack never changes under its
/// name, so a copy is never stale; one that fails its checks is ignored.
/// Meta packs are cached whole, so they need none.
fn index_copy(backend: &dyn Backend, key: &Key) -> Option<PathBuf> {
    (key.kind == Kind::Pack).then_some(())?;
    Some(
        backend
            .client_dir()?
            .join(format!("index-{}", key.path().replace('/', "-"))),
    )
}

/// The pack's size and tail from a copy's bytes.
fn split_copy(b: &[u8]) -> Option<(u64, &[u8])> {
    let len = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    Some((len, &b[8..]))
}

/// Keeps a copy of a pack's tail (best effort: without it, the pack is
/// opened the long way).
fn keep_copy(path: &Path, len: u64, tail: &[u8]) {
    let mut b = Vec::with_capacity(8 + tail.len());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(tail);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, &b).is_err() || std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Drops the copy of a removed pack's tail (see [`index_copy`]).
pub(crate) fn forget_copy(client_dir: &Path, key: &Key) {
    if key.kind == Kind::Pack {
        let _ = std::fs::remove_file(
            client_dir.join(format!("index-{}", key.path().replace('/', "-"))),
        );
    }
}

/// Appends frames to a new pack object.
pub struct PackWriter {
    pub id: PackId,
    w: Box<dyn ObjectWriter>,
    /// Where this client keeps a copy of the pack's index ([`index_copy`]).
    copy: Option<PathBuf>,
    ulen: u64,
    frames: Vec<FrameEntry>,
}

impl PackWriter {
    /// # Errors
    /// [`Error::Io`] when the object cannot be created.
    pub fn create(backend: &dyn Backend) -> Result<PackWriter> {
        PackWriter::create_as(backend, Kind::Pack)
    }

    /// A new pack of `kind` (data [`Kind::Pack`] or [`Kind::Meta`]: the same
    /// layout).
    ///
    /// # Errors
    /// [`Error::Io`] when the object cannot be created.
    pub fn create_as(backend: &dyn Backend, kind: Kind) -> Result<PackWriter> {
        let id = PackId::random();
        let key = Key::new(kind, id.to_string());
        let mut w = backend.create(&key)?;
        w.append(&fmt::header(FORMAT_VERSION))?;
        Ok(PackWriter {
            id,
            w,
            copy: index_copy(backend, &key),
            ulen: 0,
            frames: Vec::new(),
        })
    }

    /// Bytes written so far.
    pub fn file_len(&self) -> u64 {
        self.w.len()
    }

    /// Frames appended so far (the next frame's index).
    pub fn frame_count(&self) -> usize {
        self.frames.len()
    }

    /// Appends a frame; returns its uncompressed offset.
    ///
    /// # Errors
    /// [`Error::Io`] on a write failure (a full disk among them).
    pub fn append(&mut self, bytes: &[u8], ulen: u32, sum: u64) -> Result<u64> {
        let file_offset = self.w.len();
        self.w.append(bytes)?;
        self.frames.push(FrameEntry {
            file_offset,
            clen: bytes.len() as u32,
            ulen,
            sum,
        });
        let at = self.ulen;
        self.ulen += ulen as u64;
        Ok(at)
    }

    /// Writes the index and completes the object (durable after the
    /// backend's sync, which must come before anything references the pack).
    /// Returns the pack's size.
    ///
    /// # Errors
    /// [`Error::Io`] on a write failure.
    pub fn finish(mut self) -> Result<u64> {
        let idx = fmt::encode_index(&self.frames, self.w.len());
        self.w.append(&idx)?;
        let n = self.w.len();
        self.w.finish()?;
        if let Some(p) = self.copy {
            keep_copy(&p, n, &idx);
        }
        Ok(n)
    }
}

/// An open pack: its file and its frame index.
pub struct PackReader {
    pub id: PackId,
    name: String,
    file: Arc<dyn Object>,
    frames: Vec<FrameEntry>,
    /// Uncompressed start offset of each frame.
    starts: Vec<u64>,
}

impl PackReader {
    /// Opens and checks a pack's header, trailer and index.
    ///
    /// # Errors
    /// [`Error::Io`] (a missing pack among them), [`Error::Corrupt`].
    pub fn open(backend: &dyn Backend, id: PackId) -> Result<PackReader> {
        PackReader::open_as(backend, Kind::Pack, id)
    }

    /// Opens pack `id` of `kind` (a meta pack reads like a data pack).
    ///
    /// # Errors
    /// As [`PackReader::open`].
    pub fn open_as(backend: &dyn Backend, kind: Kind, id: PackId) -> Result<PackReader> {
        let name = match kind {
            Kind::Meta => format!("meta pack {id}"),
            _ => format!("pack {id}"),
        };
        let key = Key::new(kind, id.to_string());
        let copy = index_copy(backend, &key);
        if let Some(b) = copy.as_ref().and_then(|p| std::fs::read(p).ok()) {
            if let Some((len, tail)) = split_copy(&b) {
                let file = backend.open_sized(&key, len)?;
                if let Ok(r) = PackReader::from_tail(id, &name, file, len, tail) {
                    return Ok(r);
                }
            }
        }
        let file = backend.open(&key)?;
        let len = file.len();
        if len < fmt::HEADER_SIZE + fmt::TRAILER_SIZE {
            return Err(Error::corrupt(
                &name,
                0,
                format!("pack of {len} bytes is too short"),
            ));
        }
        let mut h = [0u8; fmt::HEADER_SIZE as usize];
        file.read_at(0, &mut h)?;
        fmt::check_header(&h, &name)?;
        let mut t = [0u8; fmt::TRAILER_SIZE as usize];
        file.read_at(len - fmt::TRAILER_SIZE, &mut t)?;
        let (index_offset, _, _) = fmt::decode_trailer(&t, len, &name)?;
        let mut tail = vec![0u8; (len - index_offset) as usize];
        file.read_at(index_offset, &mut tail)?;
        let r = PackReader::from_tail(id, &name, file, len, &tail)?;
        if let Some(p) = copy {
            keep_copy(&p, len, &tail);
        }
        Ok(r)
    }

    /// A reader of `file` (`len` bytes) from its tail: the index and the
    /// trailer, checked.
    fn from_tail(
        id: PackId,
        name: &str,
        file: Arc<dyn Object>,
        len: u64,
        tail: &[u8],
    ) -> Result<PackReader> {
        let t = tail
            .len()
            .checked_sub(fmt::TRAILER_SIZE as usize)
            .map(|at| &tail[at..])
            .ok_or_else(|| Error::corrupt(name, 0, "pack index shorter than its trailer"))?;
        let (index_offset, count, sum) = fmt::decode_trailer(t, len, name)?;
        let n = count as usize * fmt::INDEX_ENTRY_SIZE as usize;
        if index_offset != len - tail.len() as u64 || n + t.len() != tail.len() {
            return Err(Error::corrupt(name, index_offset, "pack index size"));
        }
        let frames = fmt::decode_index(&tail[..n], sum, index_offset, name)?;
        let mut starts = Vec::with_capacity(frames.len());
        let mut u = 0u64;
        for f in &frames {
            starts.push(u);
            u += f.ulen as u64;
        }
        Ok(PackReader {
            id,
            name: name.to_string(),
            file,
            frames,
            starts,
        })
    }

    /// Uncompressed length of the pack's stream.
    pub fn uncompressed_len(&self) -> u64 {
        match (self.starts.last(), self.frames.last()) {
            (Some(s), Some(f)) => s + f.ulen as u64,
            _ => 0,
        }
    }

    /// The frame holding uncompressed offset `off`, and that frame's start.
    pub fn frame_at(&self, off: u64) -> Option<(u32, u64)> {
        let i = self.starts.partition_point(|&s| s <= off).checked_sub(1)?;
        let end = self.starts[i] + self.frames[i].ulen as u64;
        (off < end).then_some((i as u32, self.starts[i]))
    }

    pub fn frame_count(&self) -> usize {
        self.frames.len()
    }

    /// The uncompressed range `[start, end)` of frame `i`.
    pub fn frame_range(&self, i: usize) -> Option<(u64, u64)> {
        let s = *self.starts.get(i)?;
        Some((s, s + self.frames.get(i)?.ulen as u64))
    }

    /// The stored ranges `[start, end)` of the frames that hold
    /// uncompressed `[from, to)`, appended to `out`.
    pub fn frames_in(&self, from: u64, to: u64, out: &mut Vec<(u64, u64)>) {
        if to <= from {
            return;
        }
        let (Some((a, _)), Some((b, _))) = (self.frame_at(from), self.frame_at(to - 1)) else {
            return;
        };
        out.extend(
            self.frames[a as usize..=b as usize]
                .iter()
                .map(|f| (f.file_offset, f.file_offset + f.clen as u64)),
        );
    }

    /// Announces reads of stored `ranges` (ascending; see
    /// [`crate::backend::Object::will_read`]).
    pub fn will_read(&self, ranges: &[(u64, u64)]) {
        self.file.will_read(ranges);
    }

    /// Reads, checks and decompresses frame `i`.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the pack and frame when the checksum or the
    /// decompression fails; [`Error::Io`] on a read error.
    pub fn read_frame(&self, i: u32) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_frame_into(i, &mut out)?;
        Ok(out)
    }

    /// As [`PackReader::read_frame`], into a reused buffer.
    ///
    /// # Errors
    /// As [`PackReader::read_frame`].
    pub fn read_frame_into(&self, i: u32, out: &mut Vec<u8>) -> Result<()> {
        self.read_checked(i, |c, ulen| {
            decompress_frame(c, ulen, out)?;
            Ok(out.len())
        })
    }

    /// As [`PackReader::read_frame`], straight into `out`, which must be the
    /// frame's uncompressed length (a reader that wants the whole frame and
    /// not a cached copy of it: sequential reads).
    ///
    /// # Errors
    /// As [`PackReader::read_frame`].
    pub fn read_frame_to_slice(&self, i: u32, out: &mut [u8]) -> Result<()> {
        self.read_checked(i, |c, ulen| {
            if out.len() != ulen {
                return Err(std::io::Error::other("output is not the frame's length"));
            }
            decompress_frame_to_slice(c, out)
        })
    }

    /// Reads frame `i`, checks its checksum, and hands the compressed bytes
    /// and the uncompressed length to `decompress`, which returns how many
    /// bytes it produced.
    fn read_checked(
        &self,
        i: u32,
        decompress: impl FnOnce(&[u8], usize) -> std::io::Result<usize>,
    ) -> Result<()> {
        let f = self
            .frames
            .get(i as usize)
            .ok_or_else(|| Error::corrupt(&self.name, 0, format!("no frame {i}")))?;
        let name = || format!("{} frame {i}", self.name);
        let n = RBUF.with(|c| {
            let mut c = c.borrow_mut();
            c.resize(f.clen as usize, 0);
            self.file.read_at(f.file_offset, &mut c)?;
            if xxhash_rust::xxh3::xxh3_64(&c) != f.sum {
                return Err(Error::corrupt(
                    name(),
                    f.file_offset,
                    "frame checksum mismatch",
                ));
            }
            decompress(&c, f.ulen as usize)
                .map_err(|e| Error::corrupt(name(), f.file_offset, format!("zstd: {e}")))
        })?;
        if n != f.ulen as usize {
            return Err(Error::corrupt(
                name(),
                f.file_offset,
                "frame decompresses to the wrong length",
            ));
        }
        Ok(())
    }
}

type FrameKey = (PackId, u32);

struct LruState {
    lru: lru::LruCache<FrameKey, Arc<Vec<u8>>>,
    /// Bytes held (buffer capacities, what the allocator really gave).
    bytes: usize,
    /// Buffers of evicted frames, reused for the next misses.
    spare: Vec<Vec<u8>>,
    /// A warming thread refills `spare` (see [`PackCache::keep_spares_warm`]).
    warming: bool,
}

/// Evicted frame buffers kept for reuse.
const SPARE_FRAMES: usize = 16;
/// Buffers [`PackCache::keep_spares_warm`] keeps ready while the cache fills:
/// it refills to `WARM_FRAMES` once misses have taken all but `WARM_LOW`, so
/// that it wakes once per ~48 misses. Woken on every miss (a futex wake and
/// a wakeup on the other CPU each time) it cost more than the page faults it
/// saved: median 16,600 vs 19,700 cold random reads/s with one reader.
const WARM_FRAMES: usize = 64;
const WARM_LOW: usize = 16;

/// Opens packs on demand and keeps an LRU of decompressed frames, bounded in
/// bytes. Shared by restore, `cat` and the mount.
pub struct PackCache {
    backend: Arc<dyn Backend>,
    /// Open packs, while some reader holds them: a pack nobody reads is
    /// closed, so a long-lived mount does not keep packs that a prune
    /// deleted (and their disk space) alive.
    packs: RwLock<HashMap<(Kind, PackId), Weak<PackReader>>>,
    /// While a [`PackCache::hold`] guard lives: every pack opened, kept
    /// open (a restore or check reads the same packs over and over).
    held: Mutex<(usize, Vec<Arc<PackReader>>)>,
    frames: Mutex<LruState>,
    capacity: usize,
    /// Signalled when a miss takes a spare buffer (for the warming thread).
    spare_taken: Condvar,
}

/// See [`PackCache::hold`].
pub struct Held<'a>(&'a PackCache);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Ok(mut h) = self.0.held.lock() {
            h.0 -= 1;
            if h.0 == 0 {
                h.1.clear();
            }
        }
    }
}

impl PackCache {
    pub fn new(backend: Arc<dyn Backend>, capacity_bytes: usize) -> Self {
        PackCache {
            backend,
            packs: RwLock::new(HashMap::new()),
            held: Mutex::new((0, Vec::new())),
            frames: Mutex::new(LruState {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
                spare: Vec::new(),
                warming: false,
            }),
            capacity: capacity_bytes,
            spare_taken: Condvar::new(),
        }
    }

    /// The open pack `id`.
    ///
    /// # Errors
    /// See [`PackReader::open`].
    pub fn pack(&self, id: PackId) -> Result<Arc<PackReader>> {
        self.open(Kind::Pack, id)
    }

    /// The open meta pack `id`.
    ///
    /// # Errors
    /// See [`PackReader::open`].
    pub fn meta(&self, id: crate::id::MetaId) -> Result<Arc<PackReader>> {
        self.open(Kind::Meta, PackId(id.0))
    }

    fn open(&self, kind: Kind, id: PackId) -> Result<Arc<PackReader>> {
        if let Some(p) = self
            .packs
            .read()
            .ok()
            .and_then(|m| m.get(&(kind, id)).and_then(Weak::upgrade))
        {
            return Ok(p);
        }
        let p = Arc::new(PackReader::open_as(&*self.backend, kind, id)?);
        if let Ok(mut m) = self.packs.write() {
            if m.len() >= 64 && m.len().is_power_of_two() {
                m.retain(|_, w| w.strong_count() > 0);
            }
            m.insert((kind, id), Arc::downgrade(&p));
        }
        if let Ok(mut h) = self.held.lock() {
            if h.0 > 0 {
                h.1.push(p.clone());
            }
        }
        Ok(p)
    }

    /// Keeps every pack opened from now on open until the guard is dropped
    /// (with nested guards, the last): for work that reads many versions
    /// from the same packs, which would otherwise open each pack and decode
    /// its index once per version. Memory: the indexes of the packs read.
    pub fn hold(&self) -> Held<'_> {
        if let Ok(mut h) = self.held.lock() {
            h.0 += 1;
        }
        Held(self)
    }

    /// Decompressed frame `i` of `pack` if the cache holds it.
    pub fn cached(&self, pack: &PackReader, i: u32) -> Option<Arc<Vec<u8>>> {
        self.frames.lock().ok()?.lru.get(&(pack.id, i)).cloned()
    }

    /// Decompressed frame `i` of `pack`, from the cache or the disk.
    ///
    /// # Errors
    /// See [`PackReader::read_frame`].
    pub fn frame(&self, pack: &PackReader, i: u32) -> Result<Arc<Vec<u8>>> {
        let key = (pack.id, i);
        if let Ok(mut st) = self.frames.lock() {
            if let Some(f) = st.lru.get(&key) {
                return Ok(f.clone());
            }
        }
        // Decompress into a buffer an evicted frame left behind: no fresh
        // allocation (and page faults) per miss, and no heap growing past the
        // cache's bound through fragmentation.
        let mut buf = self
            .frames
            .lock()
            .ok()
            .and_then(|mut st| {
                let b = st.spare.pop();
                if st.warming && st.spare.len() == WARM_LOW {
                    self.spare_taken.notify_one();
                }
                b
            })
            .unwrap_or_default();
        if let Err(e) = pack.read_frame_into(i, &mut buf) {
            self.recycle(buf);
            return Err(e);
        }
        let f = Arc::new(buf);
        if let Ok(mut st) = self.frames.lock() {
            if f.capacity() <= self.capacity {
                st.bytes += f.capacity();
                if let Some(old) = st.lru.put(key, f.clone()) {
                    st.bytes -= old.capacity();
                }
                while st.bytes > self.capacity {
                    match st.lru.pop_lru() {
                        Some((_, v)) => {
                            st.bytes -= v.capacity();
                            if let Ok(v) = Arc::try_unwrap(v) {
                                if st.spare.len() < SPARE_FRAMES {
                                    st.spare.push(v);
                                }
                            }
                        }
                        None => break,
                    }
                }
            }
        }
        Ok(f)
    }

    /// Keeps up to 64 spare buffers of `frame_len` bytes, their pages
    /// already touched, ready for misses, from a background thread, until the
    /// cache is full (from then on evicted frames' buffers are reused). A
    /// fresh buffer costs a page fault per 4 KiB when first written: ~10 µs
    /// per 32 KiB miss on the mount's critical path, measured as 17,200 vs
    /// 19,500-20,700 cold random reads/s with one reader. For the mount,
    /// whose readers wait on every miss; the thread ends with the cache and
    /// inherits the caller's signal mask.
    pub fn keep_spares_warm(self: &Arc<Self>, frame_len: usize) {
        let weak = Arc::downgrade(self);
        if let Ok(mut st) = self.frames.lock() {
            st.warming = true;
        }
        let spawned = std::thread::Builder::new()
            .name("dsync-warm".into())
            .spawn(move || loop {
                let Some(cache) = weak.upgrade() else { return };
                let Ok(mut st) = cache.frames.lock() else {
                    return;
                };
                let held = st.bytes + st.spare.len() * frame_len;
                if held + frame_len > cache.capacity {
                    // Full: evicted frames' buffers serve from now on.
                    st.warming = false;
                    return;
                }
                if st.spare.len() >= WARM_FRAMES {
                    // Wake up now and then to notice the cache is gone.
                    let wait = std::time::Duration::from_millis(200);
                    let (st, _) = match cache.spare_taken.wait_timeout(st, wait) {
                        Ok(r) => r,
                        Err(_) => return,
                    };
                    drop(st);
                    continue;
                }
                let missing = WARM_FRAMES - st.spare.len();
                drop(st);
                // Writing every byte faults every page in now, off the
                // readers' path (not zeros: an allocation that is then
                // zeroed may become a calloc that touches nothing).
                let mut fresh = Vec::with_capacity(missing);
                for _ in 0..missing {
                    let mut buf = Vec::with_capacity(frame_len);
                    buf.resize(frame_len, 1u8);
                    let mut buf = std::hint::black_box(buf);
                    buf.clear();
                    fresh.push(buf);
                }
                if let Ok(mut st) = cache.frames.lock() {
                    st.spare.append(&mut fresh);
                };
            });
        if let Err(e) = spawned {
            // Only slower misses: not worth failing the mount for.
            // (A closed stderr must not panic the mount.)
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "dsync: cannot start the buffer warming thread: {e}"
            );
        }
    }

    fn recycle(&self, buf: Vec<u8>) {
        if let Ok(mut st) = self.frames.lock() {
            if st.spare.len() < SPARE_FRAMES {
                st.spare.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;

    /// A client with a directory keeps each pack's tail as it writes the
    /// pack, opens the pack from it, and ignores a copy that fails its
    /// checks.
    #[test]
    fn a_client_opens_packs_from_its_copy_of_their_index() {
        let d = tempfile::tempdir().unwrap();
        let b = crate::remote::cache::CachedBackend::wrap(
            Arc::new(MemBackend::new()),
            d.path().to_path_buf(),
        );
        let frames: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000 + i as usize]).collect();
        let mut w = PackWriter::create(&*b).unwrap();
        for f in &frames {
            let c = zstd::bulk::compress(f, 1).unwrap();
            w.append(&c, f.len() as u32, xxhash_rust::xxh3::xxh3_64(&c))
                .unwrap();
        }
        let id = w.id;
        w.finish().unwrap();
        let copy = index_copy(&*b, &Key::new(Kind::Pack, id.to_string())).unwrap();
        assert!(copy.is_file(), "the writer kept the index");
        let read_all = || {
            let r = PackReader::open(&*b, id).unwrap();
            (0..3).map(|i| r.read_frame(i).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(read_all(), frames);
        // A damaged copy is passed over, and replaced.
        let mut bad = std::fs::read(&copy).unwrap();
        let n = bad.len();
        bad[n - 40] ^= 1;
        std::fs::write(&copy, &bad).unwrap();
        assert_eq!(read_all(), frames);
        assert_ne!(std::fs::read(&copy).unwrap(), bad);
        // Removed with the pack.
        b.remove(&[Key::new(Kind::Pack, id.to_string())]).unwrap();
        assert!(!copy.exists());
    }
}
