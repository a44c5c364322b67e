//! Random-access reads of one stored file version: one binary search in its
//! extent map, then one frame (usually from the cache) per piece. Any version
//! reads the same way whatever its age; there is no chain to walk.
//!
//! Readers and prune: a reader opens every pack its map names when it is
//! opened and keeps them open, so a prune that deletes them later does not
//! disturb it (an open object stays readable; FORMAT.md, "Readers during
//! prune"). A reader opened from a snapshot's node ([`VersionReader::open_node`])
//! that finds its map or a pack already gone reloads the snapshot's manifest,
//! which a repacking prune replaced before deleting anything, and opens the
//! version it names now: the same bytes, stored elsewhere.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::snapshot::{FileVersion, NodeKind, Snapshot};
use crate::id::PackId;
use crate::map::FileMap;
use crate::pack::{PackCache, PackReader};
use crate::repo::Repo;

/// How many times a reader follows a replaced manifest before it gives up
/// (each prune replaces a manifest at most once; several may run meanwhile).
const FOLLOW: usize = 8;

/// The last frame one sequential reader decompressed.
#[derive(Default)]
pub struct Scratch {
    key: Option<(crate::id::PackId, u32)>,
    frame: Vec<u8>,
}

/// An open file version.
#[derive(Clone)]
pub struct VersionReader {
    map: Arc<FileMap>,
    /// The version read (its map id may be newer than the caller's, when
    /// the reader followed a repack).
    file: FileVersion,
    cache: Arc<PackCache>,
    /// Every pack the map names, opened at open time.
    packs: Arc<HashMap<PackId, Arc<PackReader>>>,
    /// What errors name: "snapshot S file F".
    what: Arc<str>,
}

impl VersionReader {
    /// Opens `file` for reading.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Corrupt`] when the map cannot be loaded or does
    /// not describe a file of the manifest's size.
    pub fn open(repo: &Repo, file: &FileVersion, what: &str) -> Result<VersionReader> {
        let map = repo.load_version(file)?;
        let mut packs = HashMap::new();
        for e in map.extents() {
            if let std::collections::hash_map::Entry::Vacant(v) = packs.entry(e.pack) {
                v.insert(repo.cache().pack(e.pack)?);
            }
        }
        if map.size() != file.size {
            return Err(Error::corrupt(
                match file.data {
                    Some(_) => "extent list".to_string(),
                    None => format!("maps/{}.map", file.map),
                },
                0,
                format!(
                    "map is for {} bytes, the manifest says {} ({what})",
                    map.size(),
                    file.size
                ),
            ));
        }
        Ok(VersionReader {
            map: Arc::new(map),
            file: file.clone(),
            cache: repo.cache().clone(),
            packs: Arc::new(packs),
            what: what.into(),
        })
    }

    /// Opens the file at node `node` of `snap`, following the snapshot's
    /// manifest if a prune replaced it since `snap` was read.
    ///
    /// # Errors
    /// [`Error::NoSuchSnapshot`] when the snapshot was forgotten meanwhile;
    /// [`Error::InvalidInput`] when the node is not a file; otherwise as
    /// [`VersionReader::open`] (a missing object that no newer manifest
    /// explains is reported as missing).
    pub fn open_node(repo: &Repo, snap: &Snapshot, node: u32) -> Result<VersionReader> {
        let n = snap
            .nodes
            .get(node as usize)
            .ok_or_else(|| Error::Internal(format!("snapshot {} has no node {node}", snap.id)))?;
        let NodeKind::File(f) = &n.kind else {
            return Err(Error::InvalidInput(format!(
                "{} is not a file",
                String::from_utf8_lossy(&n.name)
            )));
        };
        let what = format!(
            "snapshot {} file {}",
            snap.id,
            String::from_utf8_lossy(&n.name)
        );
        let mut cur = f.clone();
        let mut followed = 0;
        loop {
            let err = match VersionReader::open(repo, &cur, &what) {
                Err(e) if e.is_not_found() && followed < FOLLOW => e,
                r => return r,
            };
            followed += 1;
            let now = match repo.load_snapshot(snap.id) {
                Ok(s) => s,
                Err(e) if e.is_not_found() => {
                    return Err(Error::NoSuchSnapshot {
                        spec: snap.id.to_string(),
                    })
                }
                Err(e) => return Err(e),
            };
            match now.nodes.get(node as usize) {
                Some(m) if m.name == n.name => match &m.kind {
                    NodeKind::File(g) if *g != cur => cur = g.clone(),
                    // The manifest still names what is missing: damage.
                    _ => return Err(err),
                },
                _ => return Err(err),
            }
        }
    }

    /// What errors name: "snapshot S file F".
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The version this reader reads.
    pub fn file(&self) -> &FileVersion {
        &self.file
    }

    /// The open pack `id` (one the map names, else from the cache).
    fn pack(&self, id: PackId) -> Result<Arc<PackReader>> {
        match self.packs.get(&id) {
            Some(p) => Ok(p.clone()),
            None => self.cache.pack(id),
        }
    }

    pub fn size(&self) -> u64 {
        self.map.size()
    }

    pub fn map(&self) -> &FileMap {
        &self.map
    }

    /// Fills `buf` from offset `off`; returns the bytes read (short only at the
    /// end of the file).
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the pack and frame when stored bytes fail
    /// their checksum; [`Error::Io`] when a pack cannot be read. No byte of
    /// `buf` is then to be trusted.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        self.read_inner(off, buf, None)
    }

    /// As [`VersionReader::read_at`] for one sequential reader (restore, cat):
    /// frames are decompressed into `scratch` instead of the shared cache, so a
    /// whole-file pass neither churns the cache nor allocates per frame.
    ///
    /// # Errors
    /// As [`VersionReader::read_at`].
    pub fn read_at_with(&self, off: u64, buf: &mut [u8], scratch: &mut Scratch) -> Result<usize> {
        self.read_inner(off, buf, Some(scratch))
    }

    /// Announces that `[off, off + len)` will be read soon: the frames that
    /// hold it are fetched ahead where the backend has latency (see
    /// [`crate::backend::Object::will_read`]).
    pub fn will_read(&self, off: u64, len: u64) {
        let end = off.saturating_add(len).min(self.size());
        let ex = self.map.extents();
        let mut i = self.map.first_after(off);
        // Per pack, so that neighbouring frames go in one request.
        type Ranges = Vec<(u64, u64)>;
        let mut per_pack: HashMap<PackId, (Arc<PackReader>, Ranges)> = HashMap::new();
        while let Some(e) = ex.get(i) {
            if e.logical >= end {
                break;
            }
            let a = e.logical.max(off);
            let b = e.end().min(end);
            if let Ok(p) = self.pack(e.pack) {
                let (p, ranges) = per_pack.entry(e.pack).or_insert_with(|| (p, Vec::new()));
                p.frames_in(
                    e.offset + (a - e.logical),
                    e.offset + (b - e.logical),
                    ranges,
                );
            }
            i += 1;
        }
        for (p, mut ranges) in per_pack.into_values() {
            ranges.sort_unstable();
            ranges.dedup();
            p.will_read(&ranges);
        }
    }

    /// The file range `[start, end)` around `off` whose bytes one stored
    /// frame holds (within the extent that holds `off`): what one miss at
    /// `off` has already decompressed. `None` in a hole or past the end.
    ///
    /// # Errors
    /// When the extent's pack cannot be opened.
    pub fn frame_span(&self, off: u64) -> Result<Option<(u64, u64)>> {
        let ex = self.map.extents();
        let Some(e) = ex.get(self.map.first_after(off)) else {
            return Ok(None);
        };
        if e.logical > off {
            return Ok(None);
        }
        let p = self.pack(e.pack)?;
        let Some((fs, fe)) = p
            .frame_at(e.offset + (off - e.logical))
            .and_then(|(fi, _)| p.frame_range(fi as usize))
        else {
            return Ok(None);
        };
        // The frame's part of the extent, in file coordinates.
        let start = e.logical + fs.saturating_sub(e.offset);
        let end = e.end().min(e.logical + (fe - e.offset));
        Ok(Some((start, end)))
    }

    fn read_inner(
        &self,
        off: u64,
        buf: &mut [u8],
        mut scratch: Option<&mut Scratch>,
    ) -> Result<usize> {
        let size = self.size();
        if off >= size {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(size - off) as usize;
        let buf = &mut buf[..want];
        let ex = self.map.extents();
        let mut i = self.map.first_after(off);
        let mut done = 0usize;
        while done < want {
            let pos = off + done as u64;
            match ex.get(i) {
                Some(e) if e.logical <= pos => {
                    let n = ((e.end() - pos) as usize).min(want - done);
                    self.copy(
                        e.pack,
                        e.offset + (pos - e.logical),
                        &mut buf[done..done + n],
                        scratch.as_deref_mut(),
                    )
                    .map_err(|err| self.context(err))?;
                    done += n;
                    i += 1;
                }
                next => {
                    let limit = next.map_or(size, |e| e.logical);
                    let n = ((limit - pos) as usize).min(want - done);
                    buf[done..done + n].fill(0);
                    done += n;
                }
            }
        }
        Ok(want)
    }

    fn copy(
        &self,
        pack: crate::id::PackId,
        mut off: u64,
        mut out: &mut [u8],
        mut scratch: Option<&mut Scratch>,
    ) -> Result<()> {
        let p = self.pack(pack)?;
        while !out.is_empty() {
            let (fi, start) = p.frame_at(off).ok_or_else(|| {
                Error::corrupt(
                    format!("pack {pack}"),
                    off,
                    format!(
                        "an extent points past the pack's {} bytes",
                        p.uncompressed_len()
                    ),
                )
            })?;
            let shared;
            let frame: &[u8] = match scratch.as_deref_mut() {
                Some(s) => {
                    if s.key != Some((pack, fi)) {
                        s.key = None;
                        p.read_frame_into(fi, &mut s.frame)?;
                        s.key = Some((pack, fi));
                    }
                    &s.frame
                }
                None => {
                    // A frame the read covers whole is decompressed straight
                    // into it, not through the cache: sequential readers
                    // (cp, qemu-img) do not come back for it, and it would
                    // only evict frames that random readers share.
                    let ulen = p
                        .frame_range(fi as usize)
                        .map_or(0, |(s, e)| (e - s) as usize);
                    if off == start && ulen > 0 && out.len() >= ulen {
                        if let Some(f) = self.cache.cached(&p, fi) {
                            shared = f;
                        } else {
                            p.read_frame_to_slice(fi, &mut out[..ulen])?;
                            out = &mut out[ulen..];
                            off += ulen as u64;
                            continue;
                        }
                    } else {
                        shared = self.cache.frame(&p, fi)?;
                    }
                    &shared
                }
            };
            let at = (off - start) as usize;
            let n = (frame.len() - at).min(out.len());
            out[..n].copy_from_slice(&frame[at..at + n]);
            out = &mut out[n..];
            off += n as u64;
        }
        Ok(())
    }

    fn context(&self, e: Error) -> Error {
        match e {
            Error::Corrupt {
                object,
                offset,
                detail,
            } => Error::Corrupt {
                object: format!("{} ({})", object, self.what),
                offset,
                detail,
            },
            Error::Io { path, source } => Error::Io {
                path: format!("{} ({})", path.display(), self.what).into(),
                source,
            },
            e => e,
        }
    }

    /// The first offset at or after `from` that holds stored data (SEEK_DATA),
    /// or `None` if only holes follow.
    pub fn next_data(&self, from: u64) -> Option<u64> {
        let ex = self.map.extents();
        let i = self.map.first_after(from);
        ex.get(i).map(|e| e.logical.max(from))
    }

    /// The start of the first hole at or after `from` (the file size if none).
    pub fn next_hole(&self, from: u64) -> u64 {
        let ex = self.map.extents();
        let mut i = self.map.first_after(from);
        let mut pos = from;
        while let Some(e) = ex.get(i) {
            if e.logical > pos {
                return pos;
            }
            pos = e.end();
            i += 1;
        }
        pos.min(self.size()).max(from)
    }
}
