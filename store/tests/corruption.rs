//! Seeded damage: single flipped bytes and truncations in packs, signature
//! files, maps, manifests and the config, 240 cases. For every case: nothing
//! panics; every version either restores byte-identical or fails with an
//! error; random reads return correct bytes or an error, never wrong bytes;
//! and whenever a version cannot be read, `check --read-data` has reported a
//! problem. Damage that changes no byte anyone reads (reserved fields,
//! padding) may go unreported; the test counts it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dsync_store::format::config::Config;
use dsync_store::testdata::pseudo;
use dsync_store::{
    backup, check, BackupOptions, CheckOptions, NoProgress, NodeKind, Repo, VersionReader,
};

fn files_under(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for d in ["config", "packs", "sigs", "maps", "snapshots"] {
        let p = root.join(d);
        if p.is_file() {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
            continue;
        }
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap().path();
            out.insert(e.clone(), std::fs::read(&e).unwrap());
        }
    }
    out
}

fn restore_pristine(pristine: &BTreeMap<PathBuf, Vec<u8>>) {
    for (p, b) in pristine {
        std::fs::write(p, b).unwrap();
    }
}

#[test]
fn seeded_damage_never_yields_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let cfg = Config {
        frame_size: 4096,
        page_entries: 16,
        ..Config::default()
    };
    Repo::init(&root, cfg).unwrap();
    let src = dir.path().join("disk.img");
    let mut data = pseudo(1 << 20, 1);
    data[300_000..400_000].fill(0);
    let mut versions = Vec::new();
    {
        let repo = Repo::open(&root).unwrap();
        for day in 0..3u64 {
            if day > 0 {
                for k in 0..20usize {
                    let at = (k * 50_000 + day as usize * 4096) & !4095;
                    data[at..at + 4096].copy_from_slice(&pseudo(4096, day * 100 + k as u64));
                }
            }
            std::fs::write(&src, &data).unwrap();
            let opts = BackupOptions {
                checksum: true,
                ..Default::default()
            };
            backup(&repo, std::slice::from_ref(&src), &opts, &NoProgress).unwrap();
            versions.push(data.clone());
        }
    }
    let pristine = files_under(&root);
    let targets: Vec<&PathBuf> = pristine.keys().collect();
    let (mut detected, mut harmless, mut unreadable_versions) = (0, 0, 0);
    for case in 0..240u64 {
        restore_pristine(&pristine);
        let r = pseudo(24, 1000 + case);
        let pick = |k: usize| u64::from_le_bytes(r[k * 8..k * 8 + 8].try_into().unwrap());
        let target = targets[(pick(0) % targets.len() as u64) as usize];
        let mut bytes = pristine[target].clone();
        let what = if case % 4 == 3 {
            let keep = (pick(1) % bytes.len() as u64) as usize;
            bytes.truncate(keep);
            format!("{} truncated to {keep}", target.display())
        } else {
            let at = (pick(1) % bytes.len() as u64) as usize;
            bytes[at] ^= 1 << (pick(2) % 8);
            format!("{} byte {at} flipped", target.display())
        };
        std::fs::write(target, &bytes).unwrap();

        let repo = match Repo::open(&root) {
            Ok(r) => r,
            Err(_) => {
                // A damaged config is refused at open: nothing can be misread.
                detected += 1;
                continue;
            }
        };
        let report = check(
            &repo,
            &CheckOptions {
                read_data: true,
                subset: None,
            },
            &NoProgress,
        );
        let reported = report
            .as_ref()
            .map(|r| !r.problems.is_empty())
            .unwrap_or(true);
        let mut all_good = true;
        let snaps: Vec<_> = repo
            .snapshot_ids()
            .unwrap()
            .into_iter()
            .filter_map(|id| repo.load_snapshot(id).ok())
            .collect();
        if snaps.len() != versions.len() {
            all_good = false;
        }
        for s in &snaps {
            let Some(node) = s.root_node(b"disk.img") else {
                continue;
            };
            let NodeKind::File(f) = &node.kind else {
                continue;
            };
            // Which version is this? The manifests are time-ordered.
            let idx = {
                let mut all: Vec<_> = snaps.iter().map(|x| (x.time_ns, x.id)).collect();
                all.sort();
                all.iter().position(|x| x.1 == s.id).unwrap()
            };
            let want = if snaps.len() == versions.len() {
                &versions[idx]
            } else {
                continue;
            };
            let mut out = Vec::new();
            match dsync_store::cat(&repo, s, "disk.img", &mut out) {
                Ok(()) => assert!(
                    out == *want,
                    "case {case} ({what}): cat returned wrong bytes"
                ),
                Err(_) => {
                    all_good = false;
                    unreadable_versions += 1;
                }
            }
            if let Ok(rd) = VersionReader::open(&repo, f, "t") {
                for j in 0..20u64 {
                    let x = pick(2).wrapping_mul(j + 1).wrapping_add(j * 7919);
                    let off = (x % want.len() as u64) as usize;
                    let len = ((x >> 20) % 20_000) as usize + 1;
                    let mut buf = vec![0u8; len];
                    if let Ok(n) = rd.read_at(off as u64, &mut buf) {
                        assert!(
                            buf[..n] == want[off..off + n],
                            "case {case} ({what}): read_at returned wrong bytes"
                        );
                    }
                }
            } else {
                all_good = false;
            }
        }
        if !all_good {
            assert!(
                reported,
                "case {case} ({what}): a version is unreadable but check reported nothing"
            );
        }
        if reported {
            detected += 1;
        } else {
            harmless += 1;
        }
    }
    eprintln!("240 cases: {detected} reported by check, {harmless} changed nothing any reader uses, {unreadable_versions} unreadable versions, 0 wrong bytes");
    assert!(
        detected >= 200,
        "only {detected} of 240 damages were reported"
    );
}
