//! The delta pipeline: source chunks -> matches and literals -> new
//! signature entries -> block digests for the file hash, in parallel, with no
//! knowledge of where the result goes.
//!
//! A [`Feed`] cuts one source (a file read at any offset, or a stream read in
//! order) into chunks of a few MiB; the rayon pool reads each chunk with a
//! block of context on each side, diffs it against the previous version's
//! signature ([`crate::delta::diff_chunk`]), gathers its literal bytes and
//! compresses them into frames: a [`ChunkOut`]. What to do with chunks, in
//! order, is the sink's business: the repository writer (backup.rs) appends
//! their frames to a pack and their extents to a map; `dsync sync` and the
//! remote protocol will take the same chunks elsewhere.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use rayon::prelude::*;

use crate::delta::{diff_chunk, Chunk, DeltaStats, Op, SigView};
use crate::error::{Error, Result};
use crate::format::config::Config;
use crate::format::sig::ENTRY_SIZE;
use crate::pack::{compress_frames, FrameMeta};

/// One chunk after the parallel stage.
pub(crate) struct ChunkOut {
    pub(crate) len: u64,
    pub(crate) ops: Vec<Op>,
    pub(crate) entries: Vec<[u8; ENTRY_SIZE]>,
    pub(crate) digests: Vec<[u8; 32]>,
    /// Compressed frames, back to back.
    pub(crate) compressed: Vec<u8>,
    pub(crate) frames: Vec<FrameMeta>,
    pub(crate) stats: DeltaStats,
    pub(crate) read: u64,
}

/// Reused chunk-sized buffers, so the hot loop allocates (and page-faults)
/// nothing after the first batch.
#[derive(Default)]
pub(crate) struct Buffers(Mutex<Vec<Vec<u8>>>);

impl Buffers {
    /// A buffer of `len` bytes whose contents are unspecified (a reused
    /// buffer keeps old bytes): callers write every byte they later read.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .0
            .lock()
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_default();
        if b.len() >= len {
            b.truncate(len);
        } else {
            b.resize(len, 0);
        }
        b
    }

    pub(crate) fn give(&self, b: Vec<u8>) {
        if let Ok(mut v) = self.0.lock() {
            v.push(b);
        }
    }
}

/// What every chunk of one file is diffed and compressed with.
pub(crate) struct ChunkCtx<'a> {
    pub(crate) cfg: &'a Config,
    pub(crate) prev: Option<&'a SigView>,
    pub(crate) buffers: &'a Buffers,
    pub(crate) chunk_size: u64,
}

impl ChunkCtx<'_> {
    /// Diffs one chunk, `data[pre..pre + len]` at file offset `off`, with
    /// context on both sides, and gathers its literal bytes (runs on a pool
    /// thread). `data` is not needed after this: the caller may reuse it
    /// before [`Gathered::compress`].
    #[allow(clippy::too_many_arguments)]
    fn gather(
        &self,
        data: &[u8],
        pre: usize,
        off: u64,
        len: u64,
        holes: &[bool],
        file_size: u64,
        read: u64,
    ) -> Gathered {
        let d = diff_chunk(
            &Chunk {
                data,
                start: pre,
                len: len as usize,
                offset: off,
                file_size,
                holes,
            },
            self.cfg.block_size,
            self.prev,
        );
        let mut lit = self.buffers.take(0);
        let mut ops = Vec::with_capacity(d.ops.len());
        for op in d.ops {
            match op {
                Op::Literal { len, at } => {
                    let o = lit.len();
                    lit.extend_from_slice(&data[pre + at..pre + at + len as usize]);
                    ops.push(Op::Literal { len, at: o });
                }
                o => ops.push(o),
            }
        }
        Gathered {
            len,
            ops,
            lit,
            entries: d.entries,
            digests: d.digests,
            stats: d.stats,
            read,
        }
    }
}

/// A diffed chunk whose literal bytes wait to be compressed.
struct Gathered {
    len: u64,
    ops: Vec<Op>,
    lit: Vec<u8>,
    entries: Vec<[u8; ENTRY_SIZE]>,
    digests: Vec<[u8; 32]>,
    stats: DeltaStats,
    read: u64,
}

impl Gathered {
    /// Compresses the literals into frames.
    fn compress(self, ctx: &ChunkCtx<'_>) -> Result<ChunkOut> {
        let mut compressed = ctx.buffers.take(0);
        let mut frames = Vec::new();
        compress_frames(
            &self.lit,
            ctx.cfg.frame_size as usize,
            ctx.cfg.zstd_level,
            &mut compressed,
            &mut frames,
        )?;
        ctx.buffers.give(self.lit);
        Ok(ChunkOut {
            len: self.len,
            ops: self.ops,
            entries: self.entries,
            digests: self.digests,
            compressed,
            frames,
            stats: self.stats,
            read: self.read,
        })
    }
}

/// Where one file's chunks come from.
pub(crate) enum Feed<'a> {
    /// A file or block device of known size, read at any offset by the pool.
    File(FileFeed<'a>),
    /// A stream of unknown length, read in order by one thread.
    Stream(StreamFeed<'a>),
}

impl Feed<'_> {
    /// Reads, diffs and compresses the next batch of up to `batch` chunks
    /// from chunk `c0` on; also says whether they are the file's last.
    pub(crate) fn batch(
        &mut self,
        ctx: &ChunkCtx<'_>,
        c0: u64,
        batch: u64,
    ) -> Result<(Vec<Result<ChunkOut>>, bool)> {
        match self {
            Feed::File(f) => {
                let cs = ctx.chunk_size;
                let nchunks = f.size.div_ceil(cs);
                let c1 = (c0 + batch).min(nchunks);
                let f = &*f;
                let outs = (c0..c1)
                    .into_par_iter()
                    .map(|c| {
                        let off = c * cs;
                        f.chunk(ctx, off, (f.size - off).min(cs))
                    })
                    .collect();
                Ok((outs, c1 >= nchunks))
            }
            Feed::Stream(s) => s.batch(ctx, c0, batch),
        }
    }
}

/// A file read at any offset; its holes are never read.
pub(crate) struct FileFeed<'a> {
    pub(crate) file: &'a File,
    pub(crate) path: &'a Path,
    pub(crate) size: u64,
    pub(crate) data: &'a [(u64, u64)],
}

impl FileFeed<'_> {
    /// Reads one chunk and its context, then diffs and compresses it.
    pub(crate) fn chunk(&self, ctx: &ChunkCtx<'_>, off: u64, len: u64) -> Result<ChunkOut> {
        let bs = ctx.cfg.block_size as u64;
        let end = off + len;
        // A block's worth of context on each side, for matches across borders.
        let lo = off.saturating_sub(bs - 1);
        let hi = (end + bs - 1).min(self.size);
        let pre = (off - lo) as usize;
        let mut buf = ctx.buffers.take((hi - lo) as usize);
        let nb = len.div_ceil(bs) as usize;
        let mut holes = vec![true; nb];
        let mut read = 0u64;
        let first = self.data.partition_point(|&(_, e)| e <= lo);
        // Holes read as zeros: fill the gaps between data ranges.
        let mut filled = lo;
        for &(ds, de) in &self.data[first..] {
            if ds >= hi {
                break;
            }
            let s = ds.max(lo);
            let e = de.min(hi);
            buf[(filled - lo) as usize..(s - lo) as usize].fill(0);
            filled = e;
            let dst = &mut buf[(s - lo) as usize..(e - lo) as usize];
            self.file
                .read_exact_at(dst, s)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => Error::SourceChanged {
                        path: self.path.into(),
                        detail: "file shrank while it was read".into(),
                    },
                    _ => Error::io(self.path, e),
                })?;
            // Mark the chunk's own blocks that hold data.
            let (s, e) = (s.max(off), e.min(end));
            if e > s {
                read += e - s;
                let b0 = ((s - off) / bs) as usize;
                let b1 = ((e - off).div_ceil(bs)) as usize;
                holes[b0..b1].fill(false);
            }
        }
        buf[(filled - lo) as usize..].fill(0);
        let g = ctx.gather(&buf, pre, off, len, &holes, self.size, read);
        // The chunk's buffer goes back before compressing: one fewer chunk
        // buffer per thread at a time.
        ctx.buffers.give(buf);
        g.compress(ctx)
    }
}

/// A stream read in order into a window that holds the current batch of
/// chunks and a block of context on each side.
pub(crate) struct StreamFeed<'a> {
    reader: &'a mut (dyn Read + Send),
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    start: u64,
    /// Bytes of `buf` that hold data.
    filled: usize,
    eof: bool,
}

impl<'a> StreamFeed<'a> {
    pub(crate) fn new(reader: &'a mut (dyn Read + Send)) -> Self {
        StreamFeed {
            reader,
            buf: Vec::new(),
            start: 0,
            filled: 0,
            eof: false,
        }
    }

    fn batch(
        &mut self,
        ctx: &ChunkCtx<'_>,
        c0: u64,
        batch: u64,
    ) -> Result<(Vec<Result<ChunkOut>>, bool)> {
        let bs = ctx.cfg.block_size as u64;
        let cs = ctx.chunk_size;
        // Keep the block of context before the batch; drop the rest.
        let keep = (c0 * cs).saturating_sub(bs - 1).max(self.start);
        let drop = (keep - self.start) as usize;
        self.buf.copy_within(drop..self.filled, 0);
        self.filled -= drop;
        self.start = keep;
        // Read up to a block past the batch: data there means more chunks.
        let want = ((c0 + batch) * cs + bs - 1 - self.start) as usize;
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        while !self.eof && self.filled < want {
            match self.reader.read(&mut self.buf[self.filled..want]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("standard input", e)),
            }
        }
        let end = self.start + self.filled as u64;
        let (c1, size, last) = if self.eof {
            let n = end.div_ceil(cs);
            let c1 = (c0 + batch).min(n);
            (c1, end, c1 >= n)
        } else {
            (c0 + batch, u64::MAX, false)
        };
        let (buf, start) = (&self.buf[..self.filled], self.start);
        let outs = (c0..c1)
            .into_par_iter()
            .map(|c| {
                let off = c * cs;
                let len = cs.min(end - off);
                let lo = off.saturating_sub(bs - 1);
                let hi = (off + len + bs - 1).min(end);
                let holes = vec![false; len.div_ceil(bs) as usize];
                let data = &buf[(lo - start) as usize..(hi - start) as usize];
                ctx.gather(data, (off - lo) as usize, off, len, &holes, size, len)
                    .compress(ctx)
            })
            .collect();
        Ok((outs, last))
    }
}

/// The data ranges of a file (SEEK_DATA/SEEK_HOLE); the whole file when the
/// file system cannot tell.
pub(crate) fn data_ranges(file: &File, size: u64) -> Vec<(u64, u64)> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a valid fd has no memory effects.
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return vec![(0, size)];
        }
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h < 0 {
            return vec![(0, size)];
        }
        let (d, h) = (d as u64, (h as u64).min(size));
        if h > d {
            out.push((d, h));
        }
        if h <= pos as u64 {
            break;
        }
        pos = h as i64;
    }
    out
}
