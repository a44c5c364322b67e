//! `--inplace`, safe: DST's file is brought to SRC's contents by writing
//! only the ranges that differ, in an order where no byte of the old file
//! is overwritten before every copy that needs it has read it, and with a
//! journal of the old bytes of every range about to be overwritten, so a
//! crash leaves something the next sync rolls back to the old file.
//!
//! The journal (`.NAME.dsync-journal` beside the file, little-endian):
//!
//! ```text
//! "DSYNCJ2\n"  8 bytes
//! old size     u64   (the file is cut or grown back to it)
//! inode        u64   (the journal is for this file only)
//! then one zstd frame holding:
//!   records:   offset u64, length u64, the old bytes, xxh3-64 of the three
//!   end:       offset u64::MAX, length 0, xxh3-64
//! ```
//!
//! Compressed (zstd level 1) because it is written on top of the changed
//! ranges themselves: the old bytes of a VM image compress about 2x, and
//! the journal is most of what `--inplace` writes beyond the change.
//!
//! It is complete and on disk (fdatasync, and the directory fsynced) before
//! the file is touched; the file is fdatasynced before the journal is
//! removed. A journal without its end record was cut by the crash before
//! the file was touched: it is simply removed.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use rustix::fs::{AtFlags, Mode, OFlags};

use super::file::{self, copy_range, Piece};

const MAGIC: &[u8; 8] = b"DSYNCJ2\n";
/// Bytes of old data a cycle of moves may hold in memory; beyond it the
/// file is written whole instead (rarely: data swapped around).
const CYCLE_BUFFER_MAX: u64 = 64 << 20;

/// The journal's name for `name`.
pub(crate) fn journal_name(name: &[u8]) -> Vec<u8> {
    let mut j = Vec::with_capacity(name.len() + 16);
    j.push(b'.');
    j.extend_from_slice(&name[..name.len().min(200)]);
    j.extend_from_slice(b".dsync-journal");
    j
}

/// One write into the file.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Write_ {
    /// The old file's bytes at `from`, to `to`.
    Move { to: u64, from: u64, len: u64 },
    /// SRC's bytes at `to`.
    New { to: u64, len: u64 },
    /// Bytes read beforehand (a move in a cycle), to `to`.
    Held { to: u64, data: Vec<u8> },
}

impl Write_ {
    fn to(&self) -> u64 {
        match self {
            Write_::Move { to, .. } | Write_::New { to, .. } | Write_::Held { to, .. } => *to,
        }
    }
    fn len(&self) -> u64 {
        match self {
            Write_::Move { len, .. } | Write_::New { len, .. } => *len,
            Write_::Held { data, .. } => data.len() as u64,
        }
    }
}

/// The writes of a plan over the old file, ordered so that each move reads
/// its source before any other write overwrites it; moves in a cycle are
/// read into memory first. `None`: the cycles hold too much.
fn order(pieces: &[Piece], old: &File) -> io::Result<Option<Vec<Write_>>> {
    let mut writes = Vec::new();
    let mut pos = 0;
    for p in pieces {
        match *p {
            Piece::Old { from, len } if from != pos => {
                writes.push(Write_::Move { to: pos, from, len })
            }
            Piece::Old { .. } | Piece::Zero { .. } => {}
            Piece::New { len, .. } => writes.push(Write_::New { to: pos, len }),
        }
        pos += p.len();
    }
    // Writes are in `to` order: the ones overlapping a range are found by
    // binary search.
    let n = writes.len();
    let mut after: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut blockers = vec![0usize; n];
    for (i, w) in writes.iter().enumerate() {
        let Write_::Move { from, len, .. } = *w else {
            continue;
        };
        let end = from + len;
        let first = writes.partition_point(|x| x.to() + x.len() <= from);
        for (j, x) in writes.iter().enumerate().skip(first) {
            if x.to() >= end {
                break;
            }
            if j != i {
                // `j` overwrites what `i` reads: `i` first.
                after[i].push(j);
                blockers[j] += 1;
            }
        }
    }
    let mut out = Vec::with_capacity(n);
    let mut done = vec![false; n];
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&j| blockers[j] == 0).collect();
    let mut held = 0u64;
    while out.len() < n {
        if let Some(i) = ready.pop_first() {
            if done[i] {
                continue;
            }
            done[i] = true;
            out.push(i);
            for j in std::mem::take(&mut after[i]) {
                blockers[j] -= 1;
                if blockers[j] == 0 && !done[j] {
                    ready.insert(j);
                }
            }
            continue;
        }
        // Every write left waits on another: moves in a cycle. The first
        // of them reads its bytes now; what waited on that read is free
        // (the move itself still waits to write).
        let i = (0..n)
            .find(|&i| !done[i] && matches!(writes[i], Write_::Move { .. }))
            .ok_or_else(|| io::Error::other("in-place order: a write waits on nothing"))?;
        if let Write_::Move { to, from, len } = writes[i] {
            held += len;
            if held > CYCLE_BUFFER_MAX {
                return Ok(None);
            }
            let mut data = vec![0u8; len as usize];
            old.read_exact_at(&mut data, from)?;
            writes[i] = Write_::Held { to, data };
        }
        for j in std::mem::take(&mut after[i]) {
            blockers[j] -= 1;
            if blockers[j] == 0 && !done[j] {
                ready.insert(j);
            }
        }
        if blockers[i] == 0 {
            ready.insert(i);
        }
    }
    let mut slots: Vec<Option<Write_>> = writes.into_iter().map(Some).collect();
    Ok(Some(
        out.into_iter().filter_map(|i| slots[i].take()).collect(),
    ))
}

/// Ranges the writes (and a cut to `size`) overwrite, merged.
fn overwritten(writes: &[Write_], old_size: u64, size: u64) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = writes
        .iter()
        .map(|w| (w.to(), (w.to() + w.len()).min(old_size)))
        .filter(|(a, b)| a < b)
        .collect();
    if size < old_size {
        r.push((size, old_size));
    }
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in r {
        match out.last_mut() {
            Some(l) if a <= l.1 => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Brings `old` (open read-write, `old_size` bytes, inode `ino`) to the
/// plan's contents in place. `dir` holds it as `name`. Returns the bytes
/// written to it; `Ok(None)` when the plan cannot be applied in place
/// (see [`CYCLE_BUFFER_MAX`]): nothing was changed.
///
/// # Errors
/// A read or write error. Once the journal is on disk, an error leaves it
/// there for the next sync to roll back.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply(
    pieces: &[Piece],
    src: &File,
    size: u64,
    old: &File,
    old_size: u64,
    ino: u64,
    dir: BorrowedFd<'_>,
    name: &[u8],
) -> io::Result<Option<u64>> {
    let Some(writes) = order(pieces, old)? else {
        return Ok(None);
    };
    if writes.is_empty() && size == old_size {
        return Ok(Some(0));
    }
    let jname = journal_name(name);
    let jfd = rustix::fs::openat(
        dir,
        jname.as_slice(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let mut w = io::BufWriter::with_capacity(1 << 20, File::from(jfd));
    w.write_all(MAGIC)?;
    w.write_all(&old_size.to_le_bytes())?;
    w.write_all(&ino.to_le_bytes())?;
    let mut j = zstd::Encoder::new(w, 1)?;
    let mut buf = vec![0u8; 1 << 20];
    for (a, b) in overwritten(&writes, old_size, size) {
        let mut at = a;
        while at < b {
            let n = (b - at).min(buf.len() as u64);
            old.read_exact_at(&mut buf[..n as usize], at)?;
            record(&mut j, at, &buf[..n as usize])?;
            at += n;
        }
    }
    record(&mut j, u64::MAX, &[])?;
    let j = j.finish()?.into_inner().map_err(|e| e.into_error())?;
    j.sync_data()?;
    rustix::fs::fsync(dir)?;
    let mut written = 0;
    for w in &writes {
        match w {
            Write_::Move { to, from, len } => move_within(old, *from, *to, *len)?,
            Write_::New { to, len } => copy_range(src, *to, old, *to, *len)?,
            Write_::Held { to, data } => old.write_all_at(data, *to)?,
        }
        written += w.len();
    }
    file::set_len(old, size)?;
    old.sync_data()?;
    rustix::fs::unlinkat(dir, jname.as_slice(), AtFlags::empty())?;
    Ok(Some(written))
}

fn record(j: &mut impl Write, at: u64, data: &[u8]) -> io::Result<()> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&at.to_le_bytes());
    h.update(&(data.len() as u64).to_le_bytes());
    h.update(data);
    j.write_all(&at.to_le_bytes())?;
    j.write_all(&(data.len() as u64).to_le_bytes())?;
    j.write_all(data)?;
    j.write_all(&h.digest().to_le_bytes())
}

/// Copies `len` bytes within one file from `from` to `to`, the ranges
/// possibly overlapping (as memmove: from the end when moving up).
fn move_within(f: &File, from: u64, to: u64, len: u64) -> io::Result<()> {
    const STEP: u64 = 1 << 20;
    let mut buf = vec![0u8; len.min(STEP) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(STEP);
        let off = if to > from { len - done - n } else { done };
        let b = &mut buf[..n as usize];
        f.read_exact_at(b, from + off)?;
        f.write_all_at(b, to + off)?;
        done += n;
    }
    Ok(())
}

/// Rolls `name` in `dir` back to its old contents if a journal was left
/// for it (a crash mid-way), then removes the journal. Returns whether
/// there was one.
///
/// # Errors
/// The journal or the file cannot be read or written; the journal is then
/// kept.
pub(crate) fn recover(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<bool> {
    let jname = journal_name(name);
    let jf = match rustix::fs::openat(
        dir,
        jname.as_slice(),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(f) => File::from(f),
        Err(rustix::io::Errno::NOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let mut r = io::BufReader::with_capacity(1 << 20, jf);
    let mut head = [0u8; 24];
    let complete = r.read_exact(&mut head).is_ok() && &head[..8] == MAGIC;
    let mut records = Vec::new();
    let mut ended = false;
    if complete {
        let mut r = zstd::Decoder::with_buffer(r)?;
        loop {
            let mut h = [0u8; 16];
            if r.read_exact(&mut h).is_err() {
                break;
            }
            let at = u64::from_le_bytes(h[..8].try_into().unwrap_or_default());
            let len = u64::from_le_bytes(h[8..].try_into().unwrap_or_default());
            if len > 1 << 30 {
                break;
            }
            let mut data = vec![0u8; len as usize];
            let mut sum = [0u8; 8];
            if r.read_exact(&mut data).is_err() || r.read_exact(&mut sum).is_err() {
                break;
            }
            let mut x = xxhash_rust::xxh3::Xxh3::new();
            x.update(&h);
            x.update(&data);
            if x.digest().to_le_bytes() != sum {
                break;
            }
            if at == u64::MAX {
                ended = true;
                break;
            }
            records.push((at, data));
        }
    }
    if ended {
        // The file may have been written: put the old bytes back.
        let old_size = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
        let ino = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
        let f = rustix::fs::openat(
            dir,
            name,
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map(File::from);
        match f {
            Ok(f) if rustix::fs::fstat(f.as_fd())?.st_ino == ino => {
                f.set_len(old_size)?;
                for (at, data) in &records {
                    f.write_all_at(data, *at)?;
                }
                f.sync_data()?;
            }
            // Replaced or removed since: the journal is stale.
            Ok(_) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    rustix::fs::unlinkat(dir, jname.as_slice(), AtFlags::empty())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::file::{plan, BLOCK};
    use crate::testdata::pseudo;

    fn apply_in_place(new: &[u8], old: &[u8]) -> (Vec<u8>, u64) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("s"), new).unwrap();
        std::fs::write(d.path().join("o"), old).unwrap();
        let s = File::open(d.path().join("s")).unwrap();
        let o = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.path().join("o"))
            .unwrap();
        let (pieces, _) = plan(&s, new.len() as u64, &o, old.len() as u64, 0).unwrap();
        let dir = File::open(d.path()).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&o.metadata().unwrap());
        let w = apply(
            &pieces,
            &s,
            new.len() as u64,
            &o,
            old.len() as u64,
            ino,
            dir.as_fd(),
            b"o",
        )
        .unwrap()
        .expect("applied in place");
        assert!(!d.path().join(".o.dsync-journal").exists());
        (std::fs::read(d.path().join("o")).unwrap(), w)
    }

    #[test]
    fn an_edit_writes_only_its_block() {
        let old = pseudo(8 << 20, 1);
        let mut new = old.clone();
        new[3_000_000] ^= 1;
        let (got, w) = apply_in_place(&new, &old);
        assert_eq!(got, new);
        assert_eq!(w, BLOCK);
    }

    #[test]
    fn shifted_data_is_moved_without_reading_overwritten_bytes() {
        // An insertion near the start shifts everything after it up, a
        // deletion shifts it down: each move must read before it is
        // overwritten.
        let old = pseudo(6 << 20, 2);
        let mut ins = old[..100_003].to_vec();
        ins.extend_from_slice(&pseudo(5000, 3));
        ins.extend_from_slice(&old[100_003..]);
        assert_eq!(apply_in_place(&ins, &old).0, ins);
        let mut del = old[..100_003].to_vec();
        del.extend_from_slice(&old[200_000..]);
        assert_eq!(apply_in_place(&del, &old).0, del);
    }

    #[test]
    fn swapped_halves_are_a_cycle_read_into_memory() {
        let old = pseudo(2 << 20, 4);
        let mut new = old[1 << 20..].to_vec();
        new.extend_from_slice(&old[..1 << 20]);
        assert_eq!(apply_in_place(&new, &old).0, new);
    }

    #[test]
    fn a_journal_rolls_a_torn_file_back() {
        let d = tempfile::tempdir().unwrap();
        let old = pseudo(100_000, 5);
        std::fs::write(d.path().join("f"), &old).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.path().join("f"))
            .unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata().unwrap());
        // The journal of a write of 10,000 bytes at 4096 and a cut to
        // 50,000, then the file half-written as a crash would leave it.
        let mut j = Vec::new();
        j.extend_from_slice(MAGIC);
        j.extend_from_slice(&100_000u64.to_le_bytes());
        j.extend_from_slice(&ino.to_le_bytes());
        let mut z = zstd::Encoder::new(j, 1).unwrap();
        record(&mut z, 4096, &old[4096..14096]).unwrap();
        record(&mut z, 50_000, &old[50_000..]).unwrap();
        record(&mut z, u64::MAX, &[]).unwrap();
        let j = z.finish().unwrap();
        std::fs::write(d.path().join(".f.dsync-journal"), &j).unwrap();
        f.write_all_at(&[9; 5000], 4096).unwrap();
        f.set_len(50_000).unwrap();
        let dir = File::open(d.path()).unwrap();
        assert!(recover(dir.as_fd(), b"f").unwrap());
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), old);
        assert!(!d.path().join(".f.dsync-journal").exists());
        // A journal cut before its end: the file was never touched.
        std::fs::write(d.path().join(".f.dsync-journal"), &j[..j.len() - 30]).unwrap();
        f.write_all_at(&[1], 0).unwrap();
        assert!(recover(dir.as_fd(), b"f").unwrap());
        assert_eq!(std::fs::read(d.path().join("f")).unwrap()[0], 1);
        assert!(!recover(dir.as_fd(), b"f").unwrap());
    }
}
