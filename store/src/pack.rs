//! Packs: writing frames of literal bytes, and reading them back through a
//! shared cache of decompressed frames.
//!
//! Durability: a pack's bytes are durable only after [`PackWriter::finish`]
//! (which writes the index and fsyncs); a pack is referenced by a snapshot only
//! after that, so a pack cut short by a crash is unreferenced garbage.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Error, IoContext, Result};
use crate::format::pack::{self as fmt, FrameEntry};
use crate::format::FORMAT_VERSION;
use crate::id::PackId;

/// A frame compressed by a worker thread, ready to append.
pub struct CompressedFrame {
    pub bytes: Vec<u8>,
    pub ulen: u32,
    pub sum: u64,
}

/// Compresses `data` into frames of at most `frame_size` uncompressed bytes.
pub fn compress_frames(data: &[u8], frame_size: usize, level: i32, out: &mut Vec<CompressedFrame>) -> Result<()> {
    for part in data.chunks(frame_size.max(1)) {
        let bytes = zstd::bulk::compress(part, level)
            .map_err(|e| Error::InvalidInput(format!("zstd compression failed: {e}")))?;
        let sum = xxhash_rust::xxh3::xxh3_64(&bytes);
        out.push(CompressedFrame {
            bytes,
            ulen: part.len() as u32,
            sum,
        });
    }
    Ok(())
}

/// Appends frames to a new pack file.
pub struct PackWriter {
    pub id: PackId,
    path: PathBuf,
    file: File,
    pos: u64,
    ulen: u64,
    frames: Vec<FrameEntry>,
}

impl PackWriter {
    /// # Errors
    /// [`Error::Io`] when the file cannot be created.
    pub fn create(dir: &Path) -> Result<PackWriter> {
        let id = PackId::random();
        let path = dir.join(format!("{id}.pack"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .at(&path)?;
        file.write_all_at(&fmt::header(FORMAT_VERSION), 0).at(&path)?;
        Ok(PackWriter {
            id,
            path,
            file,
            pos: fmt::HEADER_SIZE,
            ulen: 0,
            frames: Vec::new(),
        })
    }

    /// Offset in the uncompressed stream where the next frame starts.
    pub fn uncompressed_len(&self) -> u64 {
        self.ulen
    }

    /// Bytes written so far.
    pub fn file_len(&self) -> u64 {
        self.pos
    }

    /// Appends a frame; returns its uncompressed offset.
    ///
    /// # Errors
    /// [`Error::Io`] on a write failure (a full disk among them).
    pub fn append(&mut self, f: &CompressedFrame) -> Result<u64> {
        self.file.write_all_at(&f.bytes, self.pos).at(&self.path)?;
        self.frames.push(FrameEntry {
            file_offset: self.pos,
            clen: f.bytes.len() as u32,
            ulen: f.ulen,
            sum: f.sum,
        });
        self.pos += f.bytes.len() as u64;
        let at = self.ulen;
        self.ulen += f.ulen as u64;
        Ok(at)
    }

    /// Writes the index and fsyncs. Returns the pack's size in bytes.
    ///
    /// # Errors
    /// [`Error::Io`] on a write or sync failure.
    pub fn finish(self) -> Result<u64> {
        let idx = fmt::encode_index(&self.frames, self.pos);
        self.file.write_all_at(&idx, self.pos).at(&self.path)?;
        self.file.sync_all().at(&self.path)?;
        Ok(self.pos + idx.len() as u64)
    }
}

/// An open pack: its file and its frame index.
pub struct PackReader {
    pub id: PackId,
    name: String,
    file: File,
    frames: Vec<FrameEntry>,
    /// Uncompressed start offset of each frame.
    starts: Vec<u64>,
}

impl PackReader {
    /// Opens and checks a pack's header, trailer and index.
    ///
    /// # Errors
    /// [`Error::Io`] (a missing pack among them), [`Error::Corrupt`].
    pub fn open(path: &Path, id: PackId) -> Result<PackReader> {
        let name = format!("pack {id}");
        let file = File::open(path).at(path)?;
        let len = file.metadata().at(path)?.len();
        if len < fmt::HEADER_SIZE + fmt::TRAILER_SIZE {
            return Err(Error::corrupt(&name, 0, format!("pack of {len} bytes is too short")));
        }
        let mut h = [0u8; 16];
        file.read_exact_at(&mut h, 0).at(path)?;
        fmt::check_header(&h, &name)?;
        let mut t = [0u8; 32];
        file.read_exact_at(&mut t, len - fmt::TRAILER_SIZE).at(path)?;
        let (index_offset, count, sum) = fmt::decode_trailer(&t, len, &name)?;
        let mut idx = vec![0u8; count as usize * fmt::INDEX_ENTRY_SIZE as usize];
        file.read_exact_at(&mut idx, index_offset).at(path)?;
        let frames = fmt::decode_index(&idx, sum, index_offset, &name)?;
        let mut starts = Vec::with_capacity(frames.len());
        let mut u = 0u64;
        for f in &frames {
            starts.push(u);
            u += f.ulen as u64;
        }
        Ok(PackReader {
            id,
            name,
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

    /// Reads, checks and decompresses frame `i`.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the pack and frame when the checksum or the
    /// decompression fails; [`Error::Io`] on a read error.
    pub fn read_frame(&self, i: u32) -> Result<Vec<u8>> {
        let f = self
            .frames
            .get(i as usize)
            .ok_or_else(|| Error::corrupt(&self.name, 0, format!("no frame {i}")))?;
        let mut c = vec![0u8; f.clen as usize];
        self.file
            .read_exact_at(&mut c, f.file_offset)
            .map_err(|e| Error::io(PathBuf::from(&self.name), e))?;
        if xxhash_rust::xxh3::xxh3_64(&c) != f.sum {
            return Err(Error::corrupt(
                format!("{} frame {i}", self.name),
                f.file_offset,
                "frame checksum mismatch",
            ));
        }
        let out = zstd::bulk::decompress(&c, f.ulen as usize).map_err(|e| {
            Error::corrupt(format!("{} frame {i}", self.name), f.file_offset, format!("zstd: {e}"))
        })?;
        if out.len() != f.ulen as usize {
            return Err(Error::corrupt(
                format!("{} frame {i}", self.name),
                f.file_offset,
                "frame decompresses to the wrong length",
            ));
        }
        Ok(out)
    }
}

type FrameKey = (PackId, u32);

struct LruState {
    lru: lru::LruCache<FrameKey, Arc<Vec<u8>>>,
    bytes: usize,
}

/// Opens packs on demand and keeps an LRU of decompressed frames, bounded in
/// bytes. Shared by restore, `cat` and the mount.
pub struct PackCache {
    dir: PathBuf,
    packs: RwLock<HashMap<PackId, Arc<PackReader>>>,
    frames: Mutex<LruState>,
    capacity: usize,
}

impl PackCache {
    pub fn new(dir: PathBuf, capacity_bytes: usize) -> Self {
        PackCache {
            dir,
            packs: RwLock::new(HashMap::new()),
            frames: Mutex::new(LruState {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
            }),
            capacity: capacity_bytes,
        }
    }

    /// The open pack `id`.
    ///
    /// # Errors
    /// See [`PackReader::open`].
    pub fn pack(&self, id: PackId) -> Result<Arc<PackReader>> {
        if let Some(p) = self.packs.read().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(p);
        }
        let path = self.dir.join(format!("{id}.pack"));
        let p = Arc::new(PackReader::open(&path, id)?);
        if let Ok(mut m) = self.packs.write() {
            m.insert(id, p.clone());
        }
        Ok(p)
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
        let f = Arc::new(pack.read_frame(i)?);
        if let Ok(mut st) = self.frames.lock() {
            if f.len() <= self.capacity {
                st.bytes += f.len();
                if let Some(old) = st.lru.put(key, f.clone()) {
                    st.bytes -= old.len();
                }
                while st.bytes > self.capacity {
                    match st.lru.pop_lru() {
                        Some((_, v)) => st.bytes -= v.len(),
                        None => break,
                    }
                }
            }
        }
        Ok(f)
    }
}
