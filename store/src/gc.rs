//! Garbage collection: reclaim what no snapshot references any more.
//!
//! Versions share frames, so liveness is computed per byte range of each
//! pack's uncompressed stream: the union of the extents of every map that a
//! remaining snapshot references. Then:
//!
//! - maps, signature files and packs that nothing live references are deleted;
//! - a pack whose live bytes are below `repack_below` of its stream is
//!   repacked: its live ranges are copied into a new pack, every map that
//!   points into it is rewritten under a new id, and every manifest that names
//!   such a map is replaced (same snapshot id, atomic rename); the old pack and
//!   maps are deleted last.
//!
//! Crash safety: new packs and maps are fsynced before any manifest names
//! them, and nothing a manifest may still name is deleted before every
//! manifest has been replaced, so a kill at any moment leaves every snapshot
//! readable; what a killed gc wrote is garbage for the next one.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::backend::{Key, Kind};
use crate::error::{Error, Result};
use crate::format::map::{Extent, MapBody};
use crate::format::snapshot::{NodeKind, Snapshot};
use crate::id::{MapId, PackId, SigId};
use crate::pack::{compress_frames, FrameMeta, PackWriter};
use crate::repo::Repo;

/// What gc did (or, dry, would do).
#[derive(Clone, Debug, Default)]
pub struct GcReport {
    pub packs_deleted: usize,
    pub packs_repacked: usize,
    pub maps_deleted: usize,
    pub sigs_deleted: usize,
    pub manifests_rewritten: usize,
    /// Bytes the repository shrank by (an estimate when dry).
    pub bytes_freed: u64,
    /// Bytes no snapshot used before this gc: unreferenced files plus the dead
    /// part of each pack (its dead uncompressed share of the pack's size).
    /// What a gc that repacked everything would free.
    pub unused_bytes: u64,
}

/// Collects garbage. `repack_below` is the live fraction under which a pack is
/// rewritten (0 never repacks). Takes the writer lock.
///
/// # Errors
/// [`Error::Corrupt`] when a manifest or a live map cannot be read (gc then
/// changes nothing: it cannot know what is live); [`Error::Locked`]; [`Error::Io`].
/// `progress` hears of the live bytes copied by a repack.
pub fn gc(
    repo: &Repo,
    repack_below: f64,
    dry_run: bool,
    progress: &dyn crate::Progress,
) -> Result<GcReport> {
    let _lock = repo.lock()?;
    let snaps = repo.snapshots()?;
    let mut live_maps: BTreeMap<MapId, MapBody> = BTreeMap::new();
    for s in &snaps {
        for n in &s.nodes {
            if let NodeKind::File(f) = &n.kind {
                if let std::collections::btree_map::Entry::Vacant(v) = live_maps.entry(f.map) {
                    v.insert(repo.load_map(f.map)?.body);
                }
            }
        }
    }
    // Live ranges per pack, merged.
    let mut live: HashMap<PackId, Vec<(u64, u64)>> = HashMap::new();
    let mut live_sigs: HashSet<SigId> = HashSet::new();
    for m in live_maps.values() {
        for e in &m.extents {
            live.entry(e.pack)
                .or_default()
                .push((e.offset, e.offset + e.len));
        }
        live_sigs.extend(m.pages.iter().filter_map(|p| p.sig));
    }
    for r in live.values_mut() {
        *r = crate::map::merge_ranges(std::mem::take(r));
    }

    let mut report = GcReport::default();
    let before = repo.bytes_stored()?;
    let backend = repo.backend();
    let mut doomed: Vec<Key> = Vec::new();

    // Repack candidates.
    let mut repack: Vec<PackId> = Vec::new();
    let pack_sizes = repo.sizes(Kind::Pack)?;
    for (stem, &pack_size) in &pack_sizes {
        let Some(id) = PackId::parse(stem) else {
            continue;
        };
        match live.get(&id) {
            None => {
                report.unused_bytes += pack_size;
                report.packs_deleted += 1;
                report.bytes_freed += pack_size;
                doomed.push(Key::pack(id));
            }
            Some(ranges) => {
                let p = repo.cache().pack(id)?;
                let total = p.uncompressed_len().max(1);
                let live_bytes: u64 = ranges.iter().map(|(a, b)| b - a).sum();
                let dead_share = (total - live_bytes.min(total)) as f64 / total as f64;
                report.unused_bytes += (dead_share * pack_size as f64) as u64;
                if repack_below > 0.0 && (live_bytes as f64) < repack_below * total as f64 {
                    repack.push(id);
                    // The pack goes; its live bytes come back compressed.
                    let ratio = pack_size as f64 / total as f64;
                    report.bytes_freed += ((total - live_bytes) as f64 * ratio) as u64;
                }
            }
        }
    }
    let map_sizes = repo.sizes(Kind::Map)?;
    for (stem, &n) in &map_sizes {
        if let Some(id) = MapId::parse(stem).filter(|id| !live_maps.contains_key(id)) {
            report.unused_bytes += n;
            report.maps_deleted += 1;
            report.bytes_freed += n;
            doomed.push(Key::map(id));
        }
    }
    for (stem, n) in backend.list(Kind::Sig)? {
        if let Some(id) = SigId::parse(&stem).filter(|id| !live_sigs.contains(id)) {
            report.unused_bytes += n;
            report.sigs_deleted += 1;
            report.bytes_freed += n;
            doomed.push(Key::sig(id));
        }
    }
    report.packs_repacked = repack.len();
    if dry_run {
        return Ok(report);
    }
    backend.remove(&doomed)?;
    if repack.is_empty() {
        report.bytes_freed = before.saturating_sub(repo.bytes_stored()?);
        return Ok(report);
    }

    // Copy the live ranges of the repacked packs into one new pack.
    let cfg = repo.config().clone();
    let mut w = PackWriter::create(backend)?;
    // (old pack, range start) -> (range end, new offset)
    let mut moved: HashMap<PackId, Vec<(u64, u64, u64)>> = HashMap::new();
    let mut buf = Vec::new();
    let mut compressed = Vec::new();
    let mut frames: Vec<FrameMeta> = Vec::new();
    let to_copy = repack
        .iter()
        .filter_map(|id| live.get(id))
        .flat_map(|r| r.iter().map(|(a, b)| b - a))
        .sum();
    progress.start("repack", to_copy);
    for id in &repack {
        let p = repo.cache().pack(*id)?;
        for &(a, b) in &live[id] {
            progress.advance(b - a);
            buf.clear();
            let mut off = a;
            while off < b {
                let (fi, start) = p.frame_at(off).ok_or_else(|| {
                    Error::corrupt(format!("pack {id}"), off, "live range past the pack's end")
                })?;
                let frame = p.read_frame(fi)?;
                let from = (off - start) as usize;
                let n = ((b - off) as usize).min(frame.len() - from);
                buf.extend_from_slice(&frame[from..from + n]);
                off += n as u64;
            }
            compressed.clear();
            frames.clear();
            compress_frames(
                &buf,
                cfg.frame_size as usize,
                cfg.zstd_level,
                &mut compressed,
                &mut frames,
            )?;
            let mut new_off = None;
            for f in &frames {
                let at = w.append(
                    &compressed[f.start..f.start + f.clen as usize],
                    f.ulen,
                    f.sum,
                )?;
                new_off.get_or_insert(at);
            }
            moved
                .entry(*id)
                .or_default()
                .push((a, b, new_off.unwrap_or(0)));
        }
    }
    let new_pack = w.id;
    w.finish()?;

    // Rewrite the maps that point into repacked packs.
    let mut renamed: HashMap<MapId, MapId> = HashMap::new();
    for (id, m) in &live_maps {
        if !m.extents.iter().any(|e| moved.contains_key(&e.pack)) {
            continue;
        }
        let mut body = m.clone();
        for e in body.extents.iter_mut() {
            if let Some(ranges) = moved.get(&e.pack) {
                let i = ranges.partition_point(|r| r.1 <= e.offset);
                let (a, _, to) = ranges
                    .get(i)
                    .copied()
                    .ok_or_else(|| Error::Internal("extent outside the live ranges".into()))?;
                *e = Extent {
                    logical: e.logical,
                    len: e.len,
                    pack: new_pack,
                    offset: to + (e.offset - a),
                };
            }
        }
        let new_id = MapId::random();
        repo.put_map(new_id, &body)?;
        renamed.insert(*id, new_id);
    }
    backend.sync()?;

    // Replace the manifests that name rewritten maps (same id, atomic rename).
    for s in &snaps {
        let mut changed = false;
        let mut s2: Snapshot = s.clone();
        for n in s2.nodes.iter_mut() {
            if let NodeKind::File(f) = &mut n.kind {
                if let Some(new) = renamed.get(&f.map) {
                    f.map = *new;
                    changed = true;
                }
            }
        }
        if changed {
            backend.replace(&Key::snapshot(s.id), &s2.encode())?;
            report.manifests_rewritten += 1;
        }
    }

    // Nothing names the old maps and packs any more.
    let old: Vec<Key> = renamed
        .keys()
        .map(|&m| Key::map(m))
        .chain(repack.iter().map(|&p| Key::pack(p)))
        .collect();
    backend.remove(&old)?;
    report.bytes_freed = before.saturating_sub(repo.bytes_stored()?);
    Ok(report)
}
