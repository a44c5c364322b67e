//! Answers from the maps alone, no data read: which byte ranges differ
//! between two versions (`dsync diff`), and what each snapshot alone holds
//! (`dsync du`: what forgetting it and a full prune would free).

use std::collections::{BTreeMap, HashMap};

use crate::backend::Kind;
use crate::error::Result;
use crate::format::snapshot::NodeKind;
use crate::id::{MapId, PackId, SnapshotId};
use crate::map::FileMap;
use crate::repo::Repo;

mod diff;
mod tree;
pub use diff::diff_snapshots;
pub(crate) use tree::diff_trees;
pub use tree::PathDiff;

/// Byte ranges `[start, end)` where two versions' maps point at different
/// stored bytes (or one has a hole where the other has data), and their total.
/// Ranges past the shorter version's end count as differing.
pub fn diff_maps(a: &FileMap, b: &FileMap) -> (Vec<(u64, u64)>, u64) {
    let end = a.size().max(b.size());
    // Every boundary of either map.
    let mut cuts: Vec<u64> = vec![0, end, a.size(), b.size()];
    for e in a.extents().iter().chain(b.extents()) {
        cuts.push(e.logical);
        cuts.push(e.end());
    }
    cuts.sort_unstable();
    cuts.dedup();
    let piece = |m: &FileMap, at: u64| -> Option<(PackId, u64)> {
        if at >= m.size() {
            return Some((PackId(u64::MAX), 0)); // past the end: never equal to the other side
        }
        let ex = m.extents();
        let i = m.first_after(at);
        ex.get(i)
            .filter(|e| e.logical <= at)
            .map(|e| (e.pack, e.offset + (at - e.logical)))
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    for w in cuts.windows(2) {
        let (s, e) = (w[0], w[1]);
        if s >= e || s >= end {
            continue;
        }
        let (pa, pb) = (piece(a, s), piece(b, s));
        let same = match (pa, pb) {
            (None, None) => true,
            (Some(x), Some(y)) => x == y && x.0 != PackId(u64::MAX),
            _ => false,
        };
        if !same {
            match out.last_mut() {
                Some(l) if l.1 == s => l.1 = e,
                _ => out.push((s, e)),
            }
        }
    }
    let total = out.iter().map(|(s, e)| e - s).sum();
    (out, total)
}

/// What `dsync du` reports.
#[derive(Clone, Debug, Default)]
pub struct DuReport {
    /// Bytes of all packs, signature files, maps and manifests.
    pub total_bytes: u64,
    /// Per snapshot, oldest first: (id, time, bytes stored only for it).
    pub snapshots: Vec<(SnapshotId, i64, u64)>,
}

/// Bytes unique to each snapshot: pack bytes (at each pack's compression
/// ratio) that no other snapshot's versions use, plus maps and the manifest
/// that only it names.
///
/// # Errors
/// When a manifest or map cannot be read.
pub fn du(repo: &Repo) -> Result<DuReport> {
    // Snapshots one at a time (a format 3 tree streamed a list at a time),
    // each distinct version once: its extents, and the snapshots using it.
    // Memory follows the distinct versions, not versions x snapshots.
    let infos = repo.infos()?;
    let mut index: HashMap<MapId, usize> = HashMap::new();
    let mut users: Vec<Vec<u32>> = Vec::new();
    let mut uses: HashMap<PackId, Vec<(u64, u64, u32)>> = HashMap::new();
    for (i, info) in infos.iter().enumerate() {
        let i = i as u32;
        let mut add = |f: &crate::FileVersion| -> Result<()> {
            let v = match index.get(&f.key()) {
                Some(&v) => v,
                None => {
                    let v = users.len();
                    index.insert(f.key(), v);
                    users.push(Vec::new());
                    for e in repo.load_version(f)?.extents() {
                        uses.entry(e.pack).or_default().push((
                            e.offset,
                            e.offset + e.len,
                            v as u32,
                        ));
                    }
                    v
                }
            };
            if users[v].last() != Some(&i) {
                users[v].push(i);
            }
            Ok(())
        };
        if info.format >= 3 {
            let root = repo.load_record(info.id)?.root;
            crate::tree3::visit(repo, &root, &mut |_, e| match crate::tree3::node_of(e, 0)
                .map(|n| n.kind)
            {
                Some(NodeKind::File(f)) => add(&f),
                _ => Ok(()),
            })?;
        } else {
            for n in repo.load_snapshot(info.id)?.nodes {
                if let NodeKind::File(f) = &n.kind {
                    add(f)?;
                }
            }
        }
    }
    let mut unique = vec![0f64; infos.len()];
    let pack_sizes = repo.sizes(Kind::Pack)?;
    let map_sizes = repo.sizes(Kind::Map)?;
    let snap_sizes = repo.sizes(Kind::Snapshot)?;
    let size =
        |sizes: &HashMap<String, u64>, name: String| sizes.get(&name).copied().unwrap_or(0) as f64;
    for (pack, v) in uses {
        let file_len = size(&pack_sizes, pack.to_string());
        let ulen = repo
            .cache()
            .pack(pack)
            .map(|p| p.uncompressed_len())
            .unwrap_or(0)
            .max(1) as f64;
        let ratio = file_len / ulen;
        // Sweep: segments covered by exactly one snapshot (through any of
        // the versions live there).
        let mut events: BTreeMap<u64, Vec<(u32, i64)>> = BTreeMap::new();
        for (s, e, version) in v {
            events.entry(s).or_default().push((version, 1));
            events.entry(e).or_default().push((version, -1));
        }
        let mut count: HashMap<u32, i64> = HashMap::new();
        let mut prev: Option<u64> = None;
        for (at, evs) in events {
            if let Some(p) = prev {
                let mut live = count.iter().filter(|(_, c)| **c > 0).map(|(s, _)| *s);
                if let (Some(only), None) = (live.next(), live.next()) {
                    unique[only as usize] += (at - p) as f64 * ratio;
                }
            }
            for (version, d) in evs {
                for &s in &users[version as usize] {
                    *count.entry(s).or_default() += d;
                }
            }
            prev = Some(at);
        }
    }
    for (id, &v) in &index {
        if let [only] = users[v].as_slice() {
            unique[*only as usize] += size(&map_sizes, id.to_string());
        }
    }
    for (i, s) in infos.iter().enumerate() {
        unique[i] += size(&snap_sizes, s.id.to_string());
    }
    Ok(DuReport {
        total_bytes: repo.bytes_stored()?,
        snapshots: infos
            .iter()
            .zip(unique)
            .map(|(s, u)| (s.id, s.time_ns, u as u64))
            .collect(),
    })
}

/// The extent map of the file at `name` in `snap`, following the
/// snapshot's manifest if a prune replaced it since `snap` was read.
///
/// # Errors
/// [`crate::Error::NoSuchPath`]; as [`crate::VersionReader::open_node`].
pub(crate) fn version_map(repo: &Repo, snap: &crate::Snapshot, name: &str) -> Result<FileMap> {
    Ok(crate::restore::open_path(repo, snap, name)?.map().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::map::{Extent, MapBody};

    fn map(size: u64, ex: &[(u64, u64, u64, u64)]) -> FileMap {
        FileMap {
            id: MapId(1),
            body: MapBody {
                file_size: size,
                block_size: 4096,
                page_entries: 256,
                extents: ex
                    .iter()
                    .map(|&(l, n, p, o)| Extent {
                        logical: l,
                        len: n,
                        pack: PackId(p),
                        offset: o,
                    })
                    .collect(),
                pages: vec![],
            },
        }
    }

    #[test]
    fn diff_finds_changed_ranges() {
        let a = map(100, &[(0, 100, 1, 0)]);
        // Bytes 10..20 rewritten, 50..60 became a hole.
        let b = map(
            100,
            &[
                (0, 10, 1, 0),
                (10, 10, 2, 0),
                (20, 30, 1, 20),
                (60, 40, 1, 60),
            ],
        );
        assert_eq!(diff_maps(&a, &b), (vec![(10, 20), (50, 60)], 20));
        assert_eq!(diff_maps(&a, &a), (vec![], 0));
        // Growth counts as differing.
        let c = map(120, &[(0, 100, 1, 0)]);
        assert_eq!(diff_maps(&a, &c), (vec![(100, 120)], 20));
    }
}
