//! One file's transfer: the plan (which ranges of the new file are the old
//! file's bytes, and which are new) and the writing of it.
//!
//! The plan starts with the cheap comparison that local files allow: SRC and
//! DST's old file read side by side, block by block at the same offsets (a VM
//! image changes in place: this finds nearly everything at memory speed,
//! with no hashing). When a quarter or more of the file differs that way, or
//! the sizes differ by more than the appended tail (an insertion shifted the
//! rest), the rsync search runs instead: the old file's signature computed
//! in parallel, SRC diffed against it in parallel, so shifted data is found
//! at any byte offset.
//!
//! Writing copies both kinds of range in the kernel (`copy_file_range`), from
//! the old file or from SRC: on btrfs and XFS the kernel clones what it can,
//! so an unchanged range costs no data written at all; elsewhere it is still
//! copied without passing through dsync.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use rayon::prelude::*;

use crate::delta::signature::entry;
pub(crate) use crate::delta::signature::BlockHash;
use crate::delta::{diff_chunk, rollsum, Chunk, Op, Signature};

/// Bytes per block compared or hashed.
pub(crate) const BLOCK: u64 = 4096;
/// Bytes read per parallel task.
const CHUNK: u64 = 4 << 20;
/// Bytes copied between two reports of progress (checkpoints).
pub(crate) const STEP: u64 = 16 << 20;

/// A range of the new file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// The old file's bytes at `from`.
    Old { from: u64, len: u64 },
    /// SRC's bytes at `from` (the same offset as in the new file).
    New { from: u64, len: u64 },
    /// Zeros that are a hole in both SRC and the old file at this offset:
    /// nothing to write (the new file's unwritten bytes are zeros, and the
    /// old file in place has them).
    Zero { len: u64 },
}

impl Piece {
    pub fn len(&self) -> u64 {
        match *self {
            Piece::Old { len, .. } | Piece::New { len, .. } | Piece::Zero { len } => len,
        }
    }
}

/// How a file was brought over, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Moved {
    /// Taken from SRC (what rsync calls literal data).
    pub literal: u64,
    /// Taken from the old file.
    pub matched: u64,
    /// Read, from SRC and the old file, to plan it.
    pub read: u64,
}

/// Appends a piece, merging it with the last one when they continue.
pub(crate) fn push(out: &mut Vec<Piece>, p: Piece) {
    if p.len() == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        match (last, p) {
            (Piece::Old { from, len }, Piece::Old { from: f, len: l }) if *from + *len == f => {
                *len += l;
                return;
            }
            (Piece::New { from, len }, Piece::New { from: f, len: l }) if *from + *len == f => {
                *len += l;
                return;
            }
            (Piece::Zero { len }, Piece::Zero { len: l }) => {
                *len += l;
                return;
            }
            _ => {}
        }
    }
    out.push(p);
}

/// A file that ended before the length it had when the transfer began.
pub(crate) fn shrank() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the file shrank while it was read",
    )
}

pub(crate) fn read_full(f: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The plan of `src` (`size` bytes) over `old` (`old_size` bytes), from
/// `start` on (a resumed transfer has the rest already).
///
/// # Errors
/// A read error of either file.
pub(crate) fn plan(
    src: &File,
    size: u64,
    old: &File,
    old_size: u64,
    start: u64,
) -> io::Result<(Vec<Piece>, Moved)> {
    let (aligned, mut moved) = plan_aligned(src, size, old, old_size, start)?;
    let differ: u64 = aligned
        .iter()
        .filter_map(|p| match p {
            Piece::New { from, len } if *from < old_size => Some((*len).min(old_size - from)),
            _ => None,
        })
        .sum();
    let common = size.min(old_size).saturating_sub(start);
    if differ * 4 < common.max(1) || common == 0 {
        return Ok((aligned, moved));
    }
    let (searched, m) = plan_search(src, size, old, old_size, start)?;
    moved.read += m.read;
    Ok((searched, m_with_read(m, moved.read)))
}

fn m_with_read(mut m: Moved, read: u64) -> Moved {
    m.read = read;
    m
}

fn count(pieces: &[Piece]) -> Moved {
    let mut m = Moved::default();
    for p in pieces {
        match p {
            Piece::Old { len, .. } | Piece::Zero { len } => m.matched += len,
            Piece::New { len, .. } => m.literal += len,
        }
    }
    m
}

/// Blocks compared at the same offsets.
fn plan_aligned(
    src: &File,
    size: u64,
    old: &File,
    old_size: u64,
    start: u64,
) -> io::Result<(Vec<Piece>, Moved)> {
    let common = size.min(old_size);
    let first = start / CHUNK;
    let chunks = if start >= common {
        0
    } else {
        common.div_ceil(CHUNK) - first
    };
    // Holes are not read: a hole in both is equal, and a hole in one
    // compares as zeros.
    let (src_data, old_data) = (data_segments(src, common), data_segments(old, common));
    // Buffers no bigger than the files: a small file's 4 MiB of zeroed
    // memory cost more than its comparison.
    let buf = CHUNK.min(common) as usize;
    let zeros = vec![0u8; buf];
    let parts: Vec<io::Result<(Vec<Piece>, u64)>> = (first..first + chunks)
        .into_par_iter()
        .map_init(
            || (vec![0u8; buf], vec![0u8; buf]),
            |(a, b), c| {
                let at = (c * CHUNK).max(start);
                let len = ((c + 1) * CHUNK).min(common) - at;
                let (sd, od) = (
                    has_data(&src_data, at, at + len),
                    has_data(&old_data, at, at + len),
                );
                if !sd && !od {
                    return Ok((vec![Piece::Zero { len }], 0));
                }
                let read = len * (u64::from(sd) + u64::from(od));
                let fill = |f: &File, buf: &mut [u8], data: bool| -> io::Result<()> {
                    if !data {
                        buf.fill(0);
                    } else if read_full(f, buf, at)? != buf.len() {
                        return Err(shrank());
                    }
                    Ok(())
                };
                let a: &[u8] = if sd {
                    fill(src, &mut a[..len as usize], true)?;
                    &a[..len as usize]
                } else {
                    &zeros[..len as usize]
                };
                let b: &[u8] = if od {
                    fill(old, &mut b[..len as usize], true)?;
                    &b[..len as usize]
                } else {
                    &zeros[..len as usize]
                };
                let mut out = Vec::new();
                let mut off = 0usize;
                while off < a.len() {
                    let end = (off + BLOCK as usize).min(a.len());
                    let p = if a[off..end] == b[off..end] {
                        Piece::Old {
                            from: at + off as u64,
                            len: (end - off) as u64,
                        }
                    } else {
                        Piece::New {
                            from: at + off as u64,
                            len: (end - off) as u64,
                        }
                    };
                    push(&mut out, p);
                    off = end;
                }
                Ok((out, read))
            },
        )
        .collect();
    let mut out = Vec::new();
    let mut read = 0;
    for part in parts {
        let (pieces, r) = part?;
        read += r;
        for p in pieces {
            push(&mut out, p);
        }
    }
    let tail_from = common.max(start);
    push(
        &mut out,
        Piece::New {
            from: tail_from,
            len: size.saturating_sub(tail_from),
        },
    );
    let mut m = count(&out);
    m.read = read + size.saturating_sub(tail_from);
    Ok((out, m))
}

/// The data segments of `f` below `end`, as (start, end); the whole range
/// when the file system cannot say.
pub(crate) fn data_segments(f: &File, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < end {
        let data = match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return vec![(at, end)],
        };
        if data >= end {
            break;
        }
        let hole =
            rustix::fs::seek(f, rustix::fs::SeekFrom::Hole(data)).map_or(end, |h| h.min(end));
        out.push((data, hole));
        at = hole;
    }
    out
}

/// Whether any segment meets [a, b).
pub(crate) fn has_data(segs: &[(u64, u64)], a: u64, b: u64) -> bool {
    let i = segs.partition_point(|&(_, e)| e <= a);
    segs.get(i).is_some_and(|&(s, _)| s < b)
}

/// The rsync search: the old file's signature, then SRC diffed against it.
fn plan_search(
    src: &File,
    size: u64,
    old: &File,
    old_size: u64,
    start: u64,
) -> io::Result<(Vec<Piece>, Moved)> {
    let sig = signature_of(old, old_size, BlockHash::Xxh3)?;
    let out = search(src, size, start, &sig, BlockHash::Xxh3)?;
    let mut m = count(&out);
    m.read = old_size + size.saturating_sub(start / CHUNK * CHUNK);
    Ok((out, m))
}

/// The signature of `old`'s `old_size` bytes, [`BLOCK`]-sized blocks, a
/// chunk per task.
///
/// # Errors
/// A read error; the file shrank.
pub(crate) fn signature_of(old: &File, old_size: u64, hash: BlockHash) -> io::Result<Signature> {
    // No bigger than the file: zeroing 4 MiB for each small file was a
    // sixth of the CPU time of a sync of small changes.
    let buf = CHUNK.min(old_size) as usize;
    if old_size <= CHUNK {
        // One chunk: on this thread (the walk signs small files ahead),
        // read whole (its holes read as zeros, their entries the same).
        let mut data = vec![0u8; buf];
        if read_full(old, &mut data, 0)? != buf {
            return Err(shrank());
        }
        return Ok(Signature {
            block_size: BLOCK as u32,
            file_size: old_size,
            entries: entries_of(&data, hash),
        });
    }
    // Holes are not read: their blocks' entries are the zero block's.
    let segs = data_segments(old, old_size);
    let zero = entries_of(&[0u8; BLOCK as usize], hash);
    let parts: Vec<io::Result<Vec<u8>>> = (0..old_size.div_ceil(CHUNK))
        .into_par_iter()
        .map_init(
            || vec![0u8; buf],
            |buf, c| {
                let at = c * CHUNK;
                let len = (old_size - at).min(CHUNK) as usize;
                if (len as u64).is_multiple_of(BLOCK) && !has_data(&segs, at, at + len as u64) {
                    return Ok(zero.repeat(len / BLOCK as usize));
                }
                let n = read_full(old, &mut buf[..len], at)?;
                if n != len {
                    return Err(shrank());
                }
                Ok(entries_of(&buf[..len], hash))
            },
        )
        .collect();
    let mut entries = Vec::new();
    for p in parts {
        entries.extend_from_slice(&p?);
    }
    Ok(Signature {
        block_size: BLOCK as u32,
        file_size: old_size,
        entries,
    })
}

/// The signature entries of `data`'s [`BLOCK`]-sized blocks.
pub(crate) fn entries_of(data: &[u8], hash: BlockHash) -> Vec<u8> {
    let blocks: Vec<&[u8]> = data.chunks(BLOCK as usize).collect();
    let mut d = Vec::with_capacity(blocks.len());
    hash.digest_many(&blocks, &mut d);
    let mut out = Vec::with_capacity(blocks.len() * crate::format::sig::ENTRY_SIZE);
    for (b, d) in blocks.iter().zip(&d) {
        out.extend_from_slice(&entry(rollsum::weak(b), d));
    }
    out
}

/// SRC (`size` bytes, from `start` on) diffed against `sig`: each chunk
/// with a block of context before it (a shifted match across the border is
/// still found), in parallel. New pieces are SRC's offsets.
///
/// # Errors
/// A read error; SRC shrank.
pub(crate) fn search(
    src: &File,
    size: u64,
    start: u64,
    sig: &Signature,
    hash: BlockHash,
) -> io::Result<Vec<Piece>> {
    let bs = sig.block_size;
    let view = sig.view().with_hash(hash);
    let first = start / CHUNK;
    let chunks = size.div_ceil(CHUNK).saturating_sub(first);
    let parts: Vec<io::Result<Vec<Piece>>> = (first..first + chunks)
        .into_par_iter()
        .map(|c| {
            let off = c * CHUNK;
            let len = (size - off).min(CHUNK);
            let lo = off.saturating_sub(BLOCK - 1);
            let hi = (off + len + BLOCK - 1).min(size);
            let mut data = vec![0u8; (hi - lo) as usize];
            if read_full(src, &mut data, lo)? != data.len() {
                return Err(shrank());
            }
            let chunk = Chunk {
                data: &data,
                start: (off - lo) as usize,
                len: len as usize,
                offset: off,
                file_size: size,
                holes: &[],
            };
            let d = diff_chunk(&chunk, bs, Some(&view));
            let mut out = Vec::new();
            let mut pos = off;
            for op in d.ops {
                let p = match op {
                    Op::Copy { from, len } => Piece::Old { from, len },
                    Op::Literal { len, .. } | Op::Hole { len } => Piece::New { from: pos, len },
                };
                pos += op.len();
                push(&mut out, p);
            }
            Ok(out)
        })
        .collect();
    let mut out = Vec::new();
    for part in parts {
        for p in part? {
            push(&mut out, p);
        }
    }
    // A resumed transfer starts mid-chunk: cut what came before `start`.
    Ok(skip_before(out, start - first * CHUNK))
}

/// The pieces after the first `n` bytes.
pub(crate) fn skip_before(pieces: Vec<Piece>, mut n: u64) -> Vec<Piece> {
    let mut out = Vec::with_capacity(pieces.len());
    for p in pieces {
        if n >= p.len() {
            n -= p.len();
            continue;
        }
        let q = match p {
            Piece::Old { from, len } => Piece::Old {
                from: from + n,
                len: len - n,
            },
            Piece::New { from, len } => Piece::New {
                from: from + n,
                len: len - n,
            },
            Piece::Zero { len } => Piece::Zero { len: len - n },
        };
        n = 0;
        push(&mut out, q);
    }
    out
}

/// Copies `len` bytes of `from` at `src_at` to `to` at `dst_at`, in the
/// kernel when it can (a clone on btrfs and XFS), else through a buffer.
///
/// # Errors
/// A read or write error; reading past the end of `from` (it shrank).
pub(crate) fn copy_range(
    from: &File,
    src_at: u64,
    to: &File,
    dst_at: u64,
    len: u64,
) -> io::Result<()> {
    let (mut s, mut d, mut left) = (src_at, dst_at, len);
    while left > 0 {
        let mut so = s;
        let mut dof = d;
        let want = left.min(1 << 30) as usize;
        match rustix::fs::copy_file_range(
            from.as_fd(),
            Some(&mut so),
            to.as_fd(),
            Some(&mut dof),
            want,
        ) {
            Ok(0) => return Err(shrank()),
            Ok(n) => {
                s += n as u64;
                d += n as u64;
                left -= n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::NOSYS
                | rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::PERM,
            ) => return copy_buffered(from, s, to, d, left),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_buffered(from: &File, mut s: u64, to: &File, mut d: u64, mut left: u64) -> io::Result<()> {
    let mut buf = vec![0u8; left.min(1 << 20) as usize];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let got = read_full(from, &mut buf[..n], s)?;
        if got != n {
            return Err(shrank());
        }
        to.write_all_at(&buf[..n], d)?;
        s += n as u64;
        d += n as u64;
        left -= n as u64;
    }
    Ok(())
}

/// Copies `src` (`size` bytes) from `start` on into `out`, which holds
/// the bytes before it; with `sparse`, only data segments (holes stay
/// holes). `done` is told each offset reached (a checkpoint may be taken).
///
/// # Errors
/// A read or write error.
pub(crate) fn copy_all(
    src: &File,
    size: u64,
    out: &File,
    sparse: bool,
    start: u64,
    mut done: impl FnMut(u64) -> io::Result<()>,
) -> io::Result<()> {
    let mut at = start;
    while at < size {
        let end = (at + STEP).min(size);
        if sparse {
            copy_data(src, at, end, out)?;
        } else {
            copy_range(src, at, out, at, end - at)?;
        }
        at = end;
        done(at)?;
    }
    if sparse {
        set_len(out, size)?;
    }
    Ok(())
}

/// `out` made `size` bytes long, when it is not already: ext4 runs a
/// whole truncate (an orphan-list entry, the page cache walked) even for
/// the length a file has, a tenth of the system time of a many-file sync.
pub(crate) fn set_len(out: &File, size: u64) -> io::Result<()> {
    if out.metadata()?.len() != size {
        out.set_len(size)?;
    }
    Ok(())
}

/// The data segments of `src` in [at, end) copied to the same offsets.
fn copy_data(src: &File, at: u64, end: u64, out: &File) -> io::Result<()> {
    copy_data_to(src, at, end - at, out, at)
}

/// The data segments of `f`'s `len` bytes at `from` copied to `to` on:
/// its holes stay holes in `out` (a new file, zeros where unwritten).
pub(crate) fn copy_data_to(f: &File, from: u64, len: u64, out: &File, to: u64) -> io::Result<()> {
    let end = from + len;
    let mut at = from;
    while at < end {
        let data = match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(at)) {
            Ok(d) => d,
            // No data after `at`.
            Err(rustix::io::Errno::NXIO) => return Ok(()),
            Err(_) => return copy_range(f, at, out, to + (at - from), end - at),
        };
        if data >= end {
            return Ok(());
        }
        let hole =
            rustix::fs::seek(f, rustix::fs::SeekFrom::Hole(data)).map_or(end, |h| h.min(end));
        copy_range(f, data, out, to + (data - from), hole - data)?;
        at = hole;
    }
    Ok(())
}

/// Writes the plan into `out` (a new file); `at` is where it starts. The
/// old file's holes stay holes (as `cp --sparse=auto` keeps a copy's);
/// with `sparse`, SRC's too.
///
/// # Errors
/// A read or write error.
pub(crate) fn write_plan(
    pieces: &[Piece],
    src: &File,
    old: &File,
    out: &File,
    mut at: u64,
    sparse: bool,
    mut done: impl FnMut(u64) -> io::Result<()>,
) -> io::Result<()> {
    for p in pieces {
        let mut off = 0;
        while off < p.len() {
            let n = (p.len() - off).min(STEP);
            match *p {
                Piece::Old { from, .. } => copy_data_to(old, from + off, n, out, at)?,
                Piece::New { from, .. } if sparse => copy_data_to(src, from + off, n, out, at)?,
                Piece::New { from, .. } => copy_range(src, from + off, out, at, n)?,
                Piece::Zero { .. } => {}
            }
            at += n;
            off += n;
            done(at)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::pseudo;

    fn file(dir: &Path, name: &str, data: &[u8]) -> File {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        File::open(p).unwrap()
    }
    use std::path::Path;

    fn rebuild(src: &[u8], old: &[u8]) -> (Vec<u8>, Moved) {
        let d = tempfile::tempdir().unwrap();
        let s = file(d.path(), "s", src);
        let o = file(d.path(), "o", old);
        let (pieces, m) = plan(&s, src.len() as u64, &o, old.len() as u64, 0).unwrap();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(d.path().join("n"))
            .unwrap();
        write_plan(&pieces, &s, &o, &out, 0, false, |_| Ok(())).unwrap();
        (std::fs::read(d.path().join("n")).unwrap(), m)
    }

    #[test]
    fn an_edit_in_place_is_found_block_by_block() {
        let old = pseudo(10 << 20, 1);
        let mut new = old.clone();
        new[5_000_000..5_000_100].copy_from_slice(&[7; 100]);
        new.extend_from_slice(&pseudo(10_000, 2));
        let (got, m) = rebuild(&new, &old);
        assert_eq!(got, new);
        assert_eq!(m.literal, BLOCK + 10_000, "{m:?}");
    }

    #[test]
    fn an_insertion_is_found_by_the_search() {
        let old = pseudo(6 << 20, 3);
        let mut new = old[..1_000_003].to_vec();
        new.extend_from_slice(&pseudo(777, 4));
        new.extend_from_slice(&old[1_000_003..]);
        let (got, m) = rebuild(&new, &old);
        assert_eq!(got, new);
        assert!(m.literal < 4 * BLOCK, "{m:?}");
    }

    #[test]
    fn the_old_files_holes_stay_holes() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let (size, hole) = (12u64 << 20, 4u64 << 20..8 << 20);
        let mut src = pseudo(size as usize, 7);
        src[hole.start as usize..hole.end as usize].fill(0);
        src[..100].fill(9);
        // The old file: SRC's bytes but for the first block, the zeros a hole.
        let o = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(d.path().join("o"))
            .unwrap();
        o.write_all_at(&src[..hole.start as usize], 0).unwrap();
        o.write_all_at(&src[hole.end as usize..], hole.end).unwrap();
        o.write_all_at(&[1; 100], 0).unwrap();
        let s = file(d.path(), "s", &src);
        let (pieces, _) = plan(&s, size, &o, size, 0).unwrap();
        let out = File::create(d.path().join("n")).unwrap();
        write_plan(&pieces, &s, &o, &out, 0, false, |_| Ok(())).unwrap();
        set_len(&out, size).unwrap();
        assert_eq!(std::fs::read(d.path().join("n")).unwrap(), src);
        let used = out.metadata().unwrap().blocks() * 512;
        assert!(
            used <= size - (hole.end - hole.start),
            "{used} bytes allocated"
        );
    }

    #[test]
    fn shorter_longer_and_empty_files() {
        for (n, o) in [(0, 5000), (5000, 0), (100, 100_000), (100_000, 100), (1, 1)] {
            let old = pseudo(o, 5);
            let new = pseudo(n, 6);
            assert_eq!(rebuild(&new, &old).0, new, "{n} over {o}");
        }
    }

    #[test]
    fn skip_before_cuts_inside_a_piece() {
        let p = vec![
            Piece::Old { from: 0, len: 10 },
            Piece::New { from: 10, len: 10 },
        ];
        assert_eq!(skip_before(p, 15), vec![Piece::New { from: 15, len: 5 }]);
    }
}
