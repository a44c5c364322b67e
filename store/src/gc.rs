//! Garbage collection: reclaim what no snapshot references any more.
//!
//! First a plan ([`plan`], a pure function of the repository's state that
//! `prune --dry-run` prints), then its execution ([`execute`]).
//!
//! Versions share frames, so liveness is computed per byte range of each
//! pack's uncompressed stream: the union of the extents of every map that a
//! kept snapshot references. Then:
//!
//! - maps, signature objects and packs that nothing live references are
//!   deleted;
//! - a pack whose live bytes are below `repack_below` of its stream is
//!   repacked: its live ranges are copied into a new pack, every map that
//!   points into it is rewritten under a new id, and every manifest that names
//!   such a map is replaced (same snapshot id); the old pack and maps are
//!   deleted last.
//!
//! Crash safety: new packs and maps are durable before any manifest names
//! them, and nothing a manifest may still name is deleted before every
//! manifest has been replaced, so a kill at any moment leaves every snapshot
//! readable; what a killed gc wrote is garbage for the next one.
//!
//! Readers running meanwhile (FORMAT.md, "Readers during prune"): a reader
//! holds every pack of its version open from the moment it opens it, and a
//! reader that finds its map gone reloads the manifest, which already names
//! the new map; so deleting at once is safe for them.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::backend::{Key, Kind};
use crate::error::{Error, Result};
use crate::format::map::{Extent, MapBody};
use crate::format::snapshot::{NodeKind, Snapshot};
use crate::format::v3::node::{Payload, SigRef};
use crate::format::v3::{BlobKind, BlobRef};
use crate::id::{MapId, MetaId, PackId, SigId, SnapshotId};
use crate::meta::MetaWriter;
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
    /// Objects marked for removal by a later prune, on a backend that
    /// defers removal (S3: see [`crate::backend::Backend::removal_grace`]).
    pub marked: usize,
    /// Uploads that writers stopped midway left incomplete, aborted (S3:
    /// see [`crate::backend::Backend::clean_interrupted`]).
    pub uploads_aborted: usize,
    /// Bytes no snapshot used before this gc: unreferenced objects plus the
    /// dead part of each pack (its dead uncompressed share of the pack's
    /// size). What a gc that repacked everything would free.
    pub unused_bytes: u64,
}

/// A format 3 file node (its index in the snapshot's nodes) and its extents.
type FileExtents = (usize, Vec<Extent>);

/// A kept format 3 snapshot: its files' extents, and the meta packs its
/// blobs are in.
#[derive(Clone, Debug)]
struct Live3 {
    id: SnapshotId,
    files: Vec<FileExtents>,
    metas: HashSet<MetaId>,
}

/// A pack to repack: its live ranges are copied, the rest goes.
#[derive(Clone, Debug)]
pub struct Repack {
    pub pack: PackId,
    /// Live ranges of its uncompressed stream, sorted and merged.
    pub live: Vec<(u64, u64)>,
}

/// What a gc will do, computed from the repository without changing it.
#[derive(Clone, Debug, Default)]
pub struct GcPlan {
    /// The snapshots that stay, as read when planning.
    pub kept: Vec<Snapshot>,
    /// Manifests to delete (forgotten snapshots), before anything else.
    pub forget: Vec<SnapshotId>,
    /// Objects nothing kept references, deleted at once.
    pub unreferenced: Vec<Key>,
    /// Packs to repack.
    pub repack: Vec<Repack>,
    /// The kept snapshots' maps (what a repack rewrites).
    live_maps: BTreeMap<MapId, MapBody>,
    /// Format 3: per kept snapshot, its file nodes' extents (what a repack
    /// rewrites: the snapshot's record then gets new lists).
    live3: Vec<Live3>,
    /// Format 3: meta packs whose live blobs are copied out, the rest going.
    pub repack_meta: Vec<MetaId>,
    /// Format 3: every live blob outside those packs (a rewritten list
    /// references them instead of writing them again).
    keep_blobs: Vec<BlobRef>,
    /// The figures the plan expects (`bytes_freed` an estimate).
    pub expected: GcReport,
}

/// Plans a gc that keeps every snapshot but `forget`: what is unreferenced
/// once they are gone, and which packs fall under `repack_below` (the live
/// fraction under which a pack is rewritten; 0 never repacks). The caller
/// holds the writer lock until the plan is executed or dropped.
///
/// # Errors
/// [`Error::Corrupt`] when a manifest or a live map cannot be read (nothing
/// can be planned then: gc cannot know what is live); [`Error::Io`].
pub fn plan(repo: &Repo, forget: &[SnapshotId], repack_below: f64) -> Result<GcPlan> {
    let kept: Vec<Snapshot> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| !forget.contains(&s.id))
        .collect();
    let mut live_maps: BTreeMap<MapId, MapBody> = BTreeMap::new();
    let mut live3 = Vec::new();
    let mut live_blobs: HashMap<(MetaId, u32), BlobRef> = HashMap::new();
    let mut live: HashMap<PackId, Vec<(u64, u64)>> = HashMap::new();
    for s in &kept {
        if s.format >= 3 {
            let record = repo.load_record(s.id)?;
            let mut metas = HashSet::new();
            let mut blob = |b: BlobRef| {
                metas.insert(b.meta);
                live_blobs.insert((b.meta, b.frame), b);
            };
            crate::tree3::list_pages(repo, &record.root, &mut blob)?;
            let mut files = Vec::new();
            crate::tree3::visit(repo, &record.root, &mut |i, e| {
                match &e.payload {
                    Payload::Dir(l) => crate::tree3::list_pages(repo, l, &mut blob)?,
                    Payload::File(d) => {
                        crate::tree3::blobs_of_file(repo, d, &mut blob)?;
                        let m = crate::tree3::file_map(repo, d)?;
                        for e in &m.body.extents {
                            live.entry(e.pack)
                                .or_default()
                                .push((e.offset, e.offset + e.len));
                        }
                        files.push((i, m.body.extents));
                    }
                    _ => {}
                }
                Ok(())
            })?;
            live3.push(Live3 {
                id: s.id,
                files,
                metas,
            });
            continue;
        }
        for n in &s.nodes {
            if let NodeKind::File(f) = &n.kind {
                if let std::collections::btree_map::Entry::Vacant(v) = live_maps.entry(f.map) {
                    v.insert(repo.load_map(f.map)?.body);
                }
            }
        }
    }
    // Live ranges per pack, merged.
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

    let mut p = GcPlan {
        forget: forget.to_vec(),
        ..GcPlan::default()
    };
    let snap_sizes = repo.sizes(Kind::Snapshot)?;
    for id in forget {
        p.expected.bytes_freed += snap_sizes.get(&id.to_string()).copied().unwrap_or(0);
    }
    let mut dead = |key: Key, n: u64, e: &mut GcReport| {
        e.unused_bytes += n;
        e.bytes_freed += n;
        match key.kind {
            Kind::Pack => e.packs_deleted += 1,
            Kind::Map => e.maps_deleted += 1,
            Kind::Sig => e.sigs_deleted += 1,
            _ => {}
        }
        p.unreferenced.push(key);
    };
    let mut expected = GcReport::default();
    let mut repack = Vec::new();
    let mut pack_sizes: Vec<(String, u64)> = repo.sizes(Kind::Pack)?.into_iter().collect();
    pack_sizes.sort();
    for (name, size) in pack_sizes {
        let Some(id) = PackId::parse(&name) else {
            continue;
        };
        let Some(ranges) = live.remove(&id) else {
            dead(Key::pack(id), size, &mut expected);
            continue;
        };
        let total = repo.cache().pack(id)?.uncompressed_len().max(1);
        let live_bytes: u64 = ranges.iter().map(|(a, b)| b - a).sum();
        let dead_share = (total - live_bytes.min(total)) as f64 / total as f64;
        expected.unused_bytes += (dead_share * size as f64) as u64;
        if repack_below > 0.0 && (live_bytes as f64) < repack_below * total as f64 {
            // The pack goes; its live bytes come back compressed.
            expected.bytes_freed += (dead_share * size as f64) as u64;
            repack.push(Repack {
                pack: id,
                live: ranges,
            });
        }
    }
    for (name, n) in repo.sizes(Kind::Map)? {
        if let Some(id) = MapId::parse(&name).filter(|id| !live_maps.contains_key(id)) {
            dead(Key::map(id), n, &mut expected);
        }
    }
    for (name, n) in repo.sizes(Kind::Sig)? {
        if let Some(id) = SigId::parse(&name).filter(|id| !live_sigs.contains(id)) {
            dead(Key::sig(id), n, &mut expected);
        }
    }
    // A meta pack none of whose blobs is live goes whole; one whose live
    // share is under `repack_below` is repacked (its live blobs written
    // anew by the records that name them).
    let mut live_per_meta: HashMap<MetaId, usize> = HashMap::new();
    for (m, _) in live_blobs.keys() {
        *live_per_meta.entry(*m).or_default() += 1;
    }
    let mut repack_meta = Vec::new();
    for (name, n) in repo.sizes(Kind::Meta)? {
        let Some(id) = MetaId::parse(&name) else {
            continue;
        };
        let Some(&live_n) = live_per_meta.get(&id) else {
            dead(Key::meta(id), n, &mut expected);
            continue;
        };
        let frames = repo.cache().meta(id)?.frame_count().max(1);
        let dead_share = (frames - live_n.min(frames)) as f64 / frames as f64;
        expected.unused_bytes += (dead_share * n as f64) as u64;
        if repack_below > 0.0 && (live_n as f64) < repack_below * frames as f64 {
            expected.bytes_freed += (dead_share * n as f64) as u64;
            repack_meta.push(id);
        }
    }
    let keep_blobs = live_blobs
        .values()
        .filter(|b| !repack_meta.contains(&b.meta))
        .copied()
        .collect();
    expected.packs_repacked = repack.len() + repack_meta.len();
    expected.bytes_freed += p.expected.bytes_freed;
    expected.manifests_rewritten = kept
        .iter()
        .filter(|s| names_repacked_pack(s, &live_maps, &repack))
        .count()
        + live3
            .iter()
            .filter(|l| rewrites(l, &|p| repack.iter().any(|r| r.pack == p), &repack_meta))
            .count();
    p.expected = expected;
    p.repack = repack;
    p.kept = kept;
    p.live_maps = live_maps;
    p.live3 = live3;
    p.repack_meta = repack_meta;
    p.keep_blobs = keep_blobs;
    Ok(p)
}

/// Whether a format 3 snapshot's record must be rewritten: an extent points
/// into a repacked data pack, or a blob sits in a repacked meta pack.
fn rewrites(l: &Live3, moved: &dyn Fn(PackId) -> bool, metas: &[MetaId]) -> bool {
    l.files
        .iter()
        .any(|(_, ex)| ex.iter().any(|e| moved(e.pack)))
        || l.metas.iter().any(|m| metas.contains(m))
}

fn names_repacked_pack(s: &Snapshot, maps: &BTreeMap<MapId, MapBody>, repack: &[Repack]) -> bool {
    s.nodes.iter().any(|n| match &n.kind {
        NodeKind::File(f) => maps.get(&f.map).is_some_and(|m| {
            m.extents
                .iter()
                .any(|e| repack.iter().any(|r| r.pack == e.pack))
        }),
        _ => false,
    })
}

/// Carries out `plan`: deletes the forgotten manifests and the unreferenced
/// objects, then repacks. The caller holds the writer lock since planning.
/// `progress` hears of the live bytes a repack copies.
///
/// # Errors
/// [`Error::Io`], [`Error::Corrupt`] when a pack being repacked is damaged
/// (nothing it holds has been deleted then).
pub fn execute(repo: &Repo, plan: &GcPlan, progress: &dyn crate::Progress) -> Result<GcReport> {
    let before = repo.bytes_stored()?;
    let backend = repo.backend();
    let forget: Vec<Key> = plan.forget.iter().map(|&id| Key::snapshot(id)).collect();
    backend.remove(&forget)?;
    let mut report = GcReport {
        packs_repacked: plan.repack.len() + plan.repack_meta.len(),
        uploads_aborted: backend.clean_interrupted()?,
        ..plan.expected.clone()
    };
    match backend.removal_grace() {
        None => backend.remove(&plan.unreferenced)?,
        Some(_) => report.marked += settle_marks(backend, &plan.unreferenced)?,
    }
    if !plan.repack.is_empty() || !plan.repack_meta.is_empty() {
        let (n, old) = repack(repo, plan, progress)?;
        report.manifests_rewritten = n;
        match backend.removal_grace() {
            None => backend.remove(&old)?,
            Some(_) => {
                backend.mark(&old)?;
                report.marked += old.len();
            }
        }
    }
    report.bytes_freed = before.saturating_sub(repo.bytes_stored()?);
    Ok(report)
}

/// Two-phase removal: the objects of due marks that are still unreferenced
/// go, with the marks; the unreferenced objects no mark holds yet get a new
/// mark. Returns how many objects were newly marked.
fn settle_marks(backend: &dyn crate::backend::Backend, unreferenced: &[Key]) -> Result<usize> {
    let unref: HashSet<&Key> = unreferenced.iter().collect();
    let mut held: HashSet<Key> = HashSet::new();
    for m in backend.marks()? {
        if m.due {
            let gone: Vec<Key> = m.keys.into_iter().filter(|k| unref.contains(k)).collect();
            backend.remove(&gone)?;
            held.extend(gone);
            backend.unmark(&m.name)?;
        } else {
            held.extend(m.keys);
        }
    }
    let new: Vec<Key> = unreferenced
        .iter()
        .filter(|k| !held.contains(*k))
        .cloned()
        .collect();
    if !new.is_empty() {
        backend.mark(&new)?;
    }
    Ok(new.len())
}

/// Copies the live ranges of the plan's packs into one new pack, and
/// rewrites the maps and manifests that point into them. Returns how many
/// manifests it replaced, and the old maps and packs, which nothing names
/// any more.
fn repack(repo: &Repo, plan: &GcPlan, progress: &dyn crate::Progress) -> Result<(usize, Vec<Key>)> {
    let backend = repo.backend();
    let cfg = repo.config().clone();
    // (A repack of meta packs alone writes no data pack.)
    let mut w = match plan.repack.is_empty() {
        true => None,
        false => Some(PackWriter::create(backend)?),
    };
    // old pack -> [(range start, range end, new offset)]
    let mut moved: HashMap<PackId, Vec<(u64, u64, u64)>> = HashMap::new();
    let mut buf = Vec::new();
    let mut compressed = Vec::new();
    let mut frames: Vec<FrameMeta> = Vec::new();
    let to_copy = plan
        .repack
        .iter()
        .flat_map(|r| r.live.iter().map(|(a, b)| b - a))
        .sum();
    progress.start("repack", to_copy);
    for r in &plan.repack {
        let p = repo.cache().pack(r.pack)?;
        for &(a, b) in &r.live {
            progress.advance(b - a);
            buf.clear();
            let mut off = a;
            while off < b {
                let (fi, start) = p.frame_at(off).ok_or_else(|| {
                    Error::corrupt(
                        format!("pack {}", r.pack),
                        off,
                        "live range past the pack's end",
                    )
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
            let Some(w) = w.as_mut() else {
                return Err(Error::Internal("no pack to repack into".into()));
            };
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
                .entry(r.pack)
                .or_default()
                .push((a, b, new_off.unwrap_or(0)));
        }
    }
    let new_pack = w.as_ref().map_or(PackId(0), |w| w.id);
    if let Some(w) = w {
        w.finish()?;
    }

    // Rewrite the maps that point into repacked packs.
    let mut renamed: HashMap<MapId, MapId> = HashMap::new();
    for (id, m) in &plan.live_maps {
        if !m.extents.iter().any(|e| moved.contains_key(&e.pack)) {
            continue;
        }
        let mut body = m.clone();
        relocate(&mut body.extents, &moved, new_pack)?;
        let new_id = MapId::random();
        repo.put_map(new_id, &body)?;
        renamed.insert(*id, new_id);
    }
    // Format 3: the records that name a moved extent or a blob in a
    // repacked meta pack get new lists; a page that did not change and is
    // not in such a pack is referenced where it is.
    let mut meta = MetaWriter::new();
    for b in &plan.keep_blobs {
        meta.know(*b);
    }
    let mut records = Vec::new();
    for l in &plan.live3 {
        if !rewrites(l, &|p| moved.contains_key(&p), &plan.repack_meta) {
            continue;
        }
        let extents: HashMap<usize, &Vec<Extent>> = l.files.iter().map(|(i, e)| (*i, e)).collect();
        let mut record = repo.load_record(l.id)?;
        record.root = crate::tree3::rewrite(repo, &mut meta, &record.root, &mut |i, d, meta| {
            let Some(ex) = extents.get(&i) else {
                return Err(Error::Internal(format!(
                    "snapshot {} changed under gc",
                    l.id
                )));
            };
            let mut ex = (*ex).clone();
            relocate(&mut ex, &moved, new_pack)?;
            let sigs = rewrite_sigs(repo, meta, d, &plan.repack_meta)?;
            d.extents = crate::tree3::write_extents(repo, meta, &ex)?;
            d.sigs = sigs;
            Ok(())
        })?;
        records.push(record);
    }
    meta.finish()?;
    // The new pack, maps and lists are durable before any manifest names
    // them.
    backend.sync()?;
    for r in &records {
        backend.replace(&Key::snapshot(r.id), &r.encode())?;
    }

    // Replace the manifests that name rewritten maps (same id, atomically).
    let mut rewritten = 0;
    for s in &plan.kept {
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
            rewritten += 1;
        }
    }

    // Nothing names the old maps and packs any more.
    let old: Vec<Key> = renamed
        .keys()
        .map(|&m| Key::map(m))
        .chain(plan.repack.iter().map(|r| Key::pack(r.pack)))
        .chain(plan.repack_meta.iter().map(|&m| Key::meta(m)))
        .collect();
    Ok((rewritten + records.len(), old))
}

/// A version's signature list, its pages in repacked meta packs copied to
/// `meta`.
fn rewrite_sigs(
    repo: &Repo,
    meta: &mut MetaWriter,
    d: &crate::format::v3::node::FileData,
    repack_meta: &[MetaId],
) -> Result<crate::format::v3::List<SigRef>> {
    let mut refs = crate::tree3::read_list(repo, &d.sigs)?;
    for r in refs.iter_mut() {
        if let SigRef::Blob(b) = r {
            if repack_meta.contains(&b.meta) {
                let bytes = crate::meta::read_blob(repo.cache(), b, BlobKind::SigPage)?;
                *b = meta.put(repo.backend(), BlobKind::SigPage, &bytes)?;
            }
        }
    }
    crate::tree3::write_sigs(repo, meta, &refs)
}

/// Points extents into repacked packs at their bytes' new place.
fn relocate(
    extents: &mut [Extent],
    moved: &HashMap<PackId, Vec<(u64, u64, u64)>>,
    new_pack: PackId,
) -> Result<()> {
    for e in extents.iter_mut() {
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
    Ok(())
}

/// Plans and (unless `dry_run`) executes a gc that forgets nothing, under
/// the writer lock.
///
/// # Errors
/// As [`plan`] and [`execute`]; [`Error::Locked`].
pub fn gc(
    repo: &Repo,
    repack_below: f64,
    dry_run: bool,
    progress: &dyn crate::Progress,
) -> Result<GcReport> {
    let _lock = repo.lock()?;
    let p = plan(repo, &[], repack_below)?;
    if dry_run {
        return Ok(p.expected);
    }
    execute(repo, &p, progress)
}
