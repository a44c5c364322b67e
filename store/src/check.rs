//! `dsync check`: is everything the snapshots reference there and sound?
//!
//! Structure (always): every manifest decodes; every version's map decodes
//! and matches the manifest's size; every signature page the map names exists
//! and passes its checksum; every pack an extent names opens (header, trailer,
//! index) and holds the extent's range. With `read_data`: every frame of every
//! referenced pack is read and checked, and every version is read whole and
//! its BLAKE2 file hash compared. Each problem names the damaged object and,
//! where a version is affected, the snapshot, the file and the byte ranges of
//! that file that cannot be read. Check only reads.

use std::collections::{BTreeMap, HashMap, HashSet};

use rayon::prelude::*;

use crate::backup::{NoProgress, Progress};
use crate::error::{Error, Result};
use crate::format::snapshot::{FileVersion, NodeKind};
use crate::id::SnapshotId;
use crate::id::{MapId, PackId};
use crate::repo::Repo;

/// What `dsync check` was asked to do.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// Read every frame and every version's bytes.
    pub read_data: bool,
    /// With `read_data`: read only part `k` of `n` (1-based), chosen by id,
    /// so that `1/7 .. 7/7` on successive days together read everything.
    pub subset: Option<(u64, u64)>,
}

impl CheckOptions {
    /// Whether the object with this id is in the subset to read.
    fn selected(&self, id: u64) -> bool {
        match self.subset {
            Some((k, n)) if n > 0 => id % n == (k - 1) % n,
            _ => true,
        }
    }
}

/// One thing found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The damaged or missing object (a file in the repository, a frame).
    pub object: String,
    pub detail: String,
    /// Snapshot and file affected, if the problem is in a version.
    pub snapshot: Option<String>,
    pub file: Option<String>,
    /// Byte ranges `[start, end)` of that file that cannot be read.
    pub ranges: Vec<(u64, u64)>,
}

/// What check looked at and found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub snapshots: usize,
    pub versions: usize,
    pub packs: usize,
    pub frames_read: u64,
    pub bytes_verified: u64,
    pub problems: Vec<Problem>,
}

/// A version and where it is used.
struct Use {
    file: FileVersion,
    name: String,
    /// Snapshots using the version (ids, 8 bytes each: a version of a
    /// million-file tree is in every snapshot).
    snapshots: Vec<SnapshotId>,
}

impl Use {
    /// The snapshots, as problems name them.
    fn snapshot_names(&self) -> String {
        let names: Vec<String> = self.snapshots.iter().map(|s| s.to_string()).collect();
        names.join(",")
    }
}

/// Checks the repository. A check that found problems while a prune
/// replaced or removed manifests under it (objects it was about to read went
/// missing) runs again on what is there now, up to twice.
///
/// # Errors
/// Only when the repository cannot be listed at all; everything found wrong
/// is in the report.
pub fn check(repo: &Repo, opts: &CheckOptions, progress: &dyn Progress) -> Result<CheckReport> {
    let mut again = 0;
    loop {
        let before = repo.manifests_fingerprint()?;
        let report = check_once(repo, opts, progress)?;
        if report.problems.is_empty() || again == 2 || repo.manifests_fingerprint()? == before {
            return Ok(report);
        }
        again += 1;
    }
}

fn check_once(repo: &Repo, opts: &CheckOptions, progress: &dyn Progress) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut versions: BTreeMap<MapId, Use> = BTreeMap::new();
    for id in repo.snapshot_ids()? {
        report.snapshots += 1;
        let mut add = |name: &[u8], f: &FileVersion| {
            let u = versions.entry(f.key()).or_insert_with(|| Use {
                file: f.clone(),
                name: String::from_utf8_lossy(name).into_owned(),
                snapshots: Vec::new(),
            });
            if u.snapshots.last() != Some(&id) {
                u.snapshots.push(id);
            }
        };
        // A format 3 tree is walked a list at a time, not flattened whole;
        // a manifest that is not a format 3 record is read as format 2.
        let read = match repo.load_record(id) {
            Ok(record) => crate::tree3::visit(repo, &record.root, &mut |_, e| {
                if let Some(NodeKind::File(f)) = crate::tree3::node_of(e, 0).map(|n| n.kind) {
                    add(&e.name, &f);
                }
                Ok(())
            }),
            Err(_) => repo.load_snapshot(id).map(|s| {
                for n in &s.nodes {
                    if let NodeKind::File(f) = &n.kind {
                        add(&n.name, f);
                    }
                }
            }),
        };
        if let Err(e) = read {
            report.problems.push(problem(
                &e,
                format!("snapshots/{id}.snap"),
                None,
                None,
                vec![],
            ));
        }
    }
    report.versions = versions.len();

    // Structure of every version; remember which maps loaded (the data
    // pass loads them again only if a frame is damaged: keeping a million
    // maps took most of check's memory).
    let mut maps: HashSet<MapId> = HashSet::new();
    let mut packs: HashMap<
        PackId,
        std::result::Result<std::sync::Arc<crate::pack::PackReader>, String>,
    > = HashMap::new();
    for (map_id, u) in &versions {
        let snap = Some(u.snapshot_names());
        let file = Some(u.name.clone());
        let map_name = match u.file.data {
            Some(_) => format!("the extent list of {}", u.name),
            None => format!("maps/{map_id}.map"),
        };
        let map = match repo.load_version(&u.file) {
            Ok(m) => m,
            Err(e) => {
                let all = vec![(0, u.file.size)];
                report.problems.push(problem(&e, map_name, snap, file, all));
                continue;
            }
        };
        if map.size() != u.file.size {
            report.problems.push(Problem {
                object: map_name.clone(),
                detail: format!(
                    "map is for {} bytes, the manifest says {}",
                    map.size(),
                    u.file.size
                ),
                snapshot: snap.clone(),
                file: file.clone(),
                ranges: vec![(0, u.file.size)],
            });
        }
        match repo.version_sig(&u.file, &map) {
            Ok(sig) => {
                for i in 0..map.body.pages.len() {
                    if sig.page(i).is_none() {
                        report.problems.push(Problem {
                            object: format!("signature page {i} of {map_name}"),
                            detail: "signature page fails its checksum (the next backup stores those blocks anew)".into(),
                            snapshot: snap.clone(),
                            file: file.clone(),
                            ranges: vec![],
                        });
                    }
                }
            }
            Err(e) => report.problems.push(problem(
                &e,
                format!("signature of {map_name}"),
                snap.clone(),
                file.clone(),
                vec![],
            )),
        }
        let mut bad: BTreeMap<PackId, (String, Vec<(u64, u64)>)> = BTreeMap::new();
        for e in map.extents() {
            let p = packs
                .entry(e.pack)
                .or_insert_with(|| repo.cache().pack(e.pack).map_err(|err| err.to_string()));
            let reason = match p {
                Err(msg) => Some(msg.clone()),
                Ok(p) if e.offset + e.len > p.uncompressed_len() => Some(format!(
                    "an extent reaches byte {} of a pack of {}",
                    e.offset + e.len,
                    p.uncompressed_len()
                )),
                Ok(_) => None,
            };
            if let Some(r) = reason {
                let entry = bad.entry(e.pack).or_insert_with(|| (r, Vec::new()));
                entry.1.push((e.logical, e.end()));
            }
        }
        for (pack, (detail, ranges)) in bad {
            report.problems.push(Problem {
                object: format!("packs/{pack}.pack"),
                detail,
                snapshot: snap.clone(),
                file: file.clone(),
                ranges: crate::map::merge_ranges(ranges),
            });
        }
        maps.insert(*map_id);
    }
    report.packs = packs.len();
    if !opts.read_data {
        return Ok(report);
    }

    // Every frame of every pack that opened.
    let open: Vec<_> = packs
        .values()
        .filter_map(|p| p.as_ref().ok().cloned())
        .filter(|p| opts.selected(p.id.0))
        .collect();
    let damaged: Vec<(PackId, u64, u64, String)> = open
        .par_iter()
        .flat_map_iter(|p| {
            (0..p.frame_count())
                .filter_map(|i| match p.read_frame(i as u32) {
                    Ok(_) => None,
                    Err(e) => p.frame_range(i).map(|(s, t)| (p.id, s, t, e.to_string())),
                })
                .collect::<Vec<_>>()
        })
        .collect();
    report.frames_read = open.iter().map(|p| p.frame_count() as u64).sum();
    let mut by_pack: HashMap<PackId, Vec<(u64, u64, String)>> = HashMap::new();
    for (p, s, t, msg) in damaged {
        by_pack.entry(p).or_default().push((s, t, msg));
    }
    let mut damaged_versions: HashSet<MapId> = HashSet::new();
    for map_id in maps.iter().filter(|_| !by_pack.is_empty()) {
        let u = &versions[map_id];
        let Ok(map) = repo.load_version(&u.file) else {
            continue;
        };
        let mut hit: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        for e in map.extents() {
            for (s, t, msg) in by_pack.get(&e.pack).map(|v| v.as_slice()).unwrap_or(&[]) {
                let (a, b) = ((*s).max(e.offset), (*t).min(e.offset + e.len));
                if a < b {
                    let logical = (e.logical + (a - e.offset), e.logical + (b - e.offset));
                    hit.entry(msg.clone()).or_default().push(logical);
                }
            }
        }
        for (msg, ranges) in hit {
            damaged_versions.insert(*map_id);
            report.problems.push(Problem {
                object: msg.split(" is damaged").next().unwrap_or(&msg).to_string(),
                detail: msg.clone(),
                snapshot: Some(u.snapshot_names()),
                file: Some(u.name.clone()),
                ranges: crate::map::merge_ranges(ranges),
            });
        }
    }

    // Every sound version read whole against its file hash.
    for (map_id, u) in &versions {
        if damaged_versions.contains(map_id) || !maps.contains(map_id) || !opts.selected(map_id.0) {
            continue;
        }
        let what = format!("snapshot {} file {}", u.snapshot_names(), u.name);
        match crate::restore::verify_version(repo, &u.file, &what, &NoProgress) {
            Ok(()) => report.bytes_verified += u.file.size,
            Err(e) => report.problems.push(problem(
                &e,
                match u.file.data {
                    Some(_) => format!("the extent list of {}", u.name),
                    None => format!("maps/{map_id}.map"),
                },
                Some(u.snapshot_names()),
                Some(u.name.clone()),
                vec![(0, u.file.size)],
            )),
        }
        progress.advance(u.file.size);
    }
    Ok(report)
}

fn problem(
    e: &Error,
    object: String,
    snapshot: Option<String>,
    file: Option<String>,
    ranges: Vec<(u64, u64)>,
) -> Problem {
    Problem {
        object,
        detail: e.to_string(),
        snapshot,
        file,
        ranges,
    }
}
