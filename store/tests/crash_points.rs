//! Crash points: a backup and a prune stopped between every pair of backend
//! writes (the in-memory backend fails every write after the Nth, then gives
//! what a power cut would leave: only durable objects). After each stop,
//! every snapshot that exists reads back byte for byte, and the repository
//! takes the next backup and prune as if nothing happened. Also: readers
//! opened before a prune, and a restore that a prune interrupts, return the
//! right bytes. Each runs on a format 2 and on a format 3 repository.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use dsync_store::backend::MemBackend;
use dsync_store::format::config::Config;
use dsync_store::prune::{prune, KeepPolicy};
use dsync_store::testdata::pseudo;
use dsync_store::{backup, BackupOptions, NoProgress, NodeKind, Progress, Repo, VersionReader};

fn config(format: u32) -> Config {
    Config {
        format,
        block_size: 512,
        page_entries: 8,
        frame_size: 4096,
        pack_target: 1 << 20,
        ..Config::default()
    }
}

fn open(m: &MemBackend) -> Repo {
    Repo::open_on(Arc::new(m.clone()), 1 << 20).expect("open after a crash")
}

/// Day `d`'s contents: each day rewrites 3/4 of a 96 KiB file.
fn day(d: u64) -> Vec<u8> {
    let mut v = pseudo(96 << 10, 1);
    for k in 1..=d {
        let at = if k % 2 == 1 { 0 } else { 24 << 10 };
        v[at..at + (72 << 10)].copy_from_slice(&pseudo(72 << 10, 100 + k));
    }
    v
}

fn back_up(repo: &Repo, dir: &Path, d: u64) -> dsync_store::Result<()> {
    let src = dir.join("f");
    std::fs::write(&src, day(d)).unwrap();
    let opts = BackupOptions {
        time_ns: Some(1_700_000_000_000_000_000 + d as i64 * 86_400_000_000_000),
        checksum: true,
        chunk_size: 16 << 10,
        ..Default::default()
    };
    backup(repo, &[src], &opts, &NoProgress).map(|_| ())
}

/// Every snapshot reads back as the day its time says; returns their days.
fn verify(repo: &Repo) -> Vec<u64> {
    let mut days = Vec::new();
    for s in repo.snapshots().unwrap() {
        let d = ((s.time_ns - 1_700_000_000_000_000_000) / 86_400_000_000_000) as u64;
        let mut out = Vec::new();
        dsync_store::cat(repo, &s, "f", &mut out).expect("a snapshot that exists reads");
        assert!(out == day(d), "snapshot of day {d} reads wrong bytes");
        days.push(d);
    }
    days
}

fn repo_with_days(n: u64, dir: &Path, format: u32) -> MemBackend {
    let m = MemBackend::new();
    let repo = Repo::init_on(Arc::new(m.clone()), config(format)).unwrap();
    for d in 0..n {
        back_up(&repo, dir, d).unwrap();
    }
    m
}

fn repack_policy() -> KeepPolicy {
    KeepPolicy {
        last: 2,
        ..KeepPolicy::default()
    }
}

fn a_backup_stopped_at_any_write_loses_nothing(format: u32) {
    let dir = tempfile::tempdir().unwrap();
    let base = repo_with_days(2, dir.path(), format);
    // How many writes a whole backup makes.
    let probe = base.crash();
    let w0 = probe.writes();
    back_up(&open(&probe), dir.path(), 2).unwrap();
    let total = probe.writes() - w0;
    assert!(total > 10, "only {total} writes");
    for k in 0..=total {
        let m = base.crash();
        m.fail_after(k);
        let r = back_up(&open(&m), dir.path(), 2);
        assert_eq!(r.is_ok(), k == total, "stopped after {k} of {total} writes");
        let after = m.crash();
        let days = verify(&open(&after));
        assert!(
            days == [0, 1] || (days == [0, 1, 2] && k >= total - 1),
            "after {k} writes: days {days:?}"
        );
        // The next backup and a prune work, and everything still reads.
        let repo = open(&after);
        back_up(&repo, dir.path(), 3).unwrap();
        prune(&repo, &repack_policy(), 0.99, false, &NoProgress).unwrap();
        let days = verify(&repo);
        assert_eq!(days.last(), Some(&3));
        assert_eq!(days.len(), 2);
    }
}

fn a_prune_stopped_at_any_write_loses_no_kept_snapshot(format: u32) {
    let dir = tempfile::tempdir().unwrap();
    let base = repo_with_days(3, dir.path(), format);
    let probe = base.crash();
    let w0 = probe.writes();
    let (plan, rep) = prune(&open(&probe), &repack_policy(), 0.99, false, &NoProgress).unwrap();
    assert_eq!(plan.forgotten.len(), 1);
    assert!(
        rep.packs_repacked > 0 && rep.manifests_rewritten > 0,
        "{rep:?}"
    );
    let total = probe.writes() - w0;
    for k in 0..=total {
        let m = base.crash();
        m.fail_after(k);
        let r = prune(&open(&m), &repack_policy(), 0.99, false, &NoProgress);
        assert_eq!(r.is_ok(), k >= total, "stopped after {k} of {total} writes");
        let after = m.crash();
        let days = verify(&open(&after));
        assert!(
            days == [0, 1, 2] || days == [1, 2],
            "after {k} writes: days {days:?}"
        );
        let repo = open(&after);
        prune(&repo, &repack_policy(), 0.99, false, &NoProgress).unwrap();
        assert_eq!(verify(&repo), [1, 2]);
        back_up(&repo, dir.path(), 3).unwrap();
        assert_eq!(verify(&repo), [1, 2, 3]);
        // Nothing unreferenced is left once a prune completed.
        let (_, rep) = prune(&repo, &KeepPolicy::default(), 0.0, true, &NoProgress).unwrap();
        assert_eq!(rep.unused_bytes, 0, "after {k} writes: {rep:?}");
    }
}

fn readers_opened_before_a_prune_read_the_right_bytes(format: u32) {
    let dir = tempfile::tempdir().unwrap();
    let m = repo_with_days(3, dir.path(), format);
    let repo = open(&m);
    let snaps = repo.snapshots().unwrap();
    let readers: Vec<(u64, VersionReader)> = snaps
        .iter()
        .enumerate()
        .map(|(d, s)| (d as u64, VersionReader::open_node(&repo, s, 0).unwrap()))
        .collect();
    let (_, rep) = prune(&repo, &repack_policy(), 0.99, false, &NoProgress).unwrap();
    assert!(rep.packs_repacked > 0);
    for (d, r) in &readers {
        let mut buf = vec![0u8; 96 << 10];
        assert_eq!(r.read_at(0, &mut buf).unwrap(), buf.len());
        assert!(buf == day(*d), "an open reader of day {d} read wrong bytes");
    }
    // Opened after the prune from the snapshots read before it: the readers
    // follow the replaced manifests; the forgotten one is gone.
    for (d, s) in snaps.iter().enumerate() {
        match VersionReader::open_node(&repo, s, 0) {
            Ok(r) => {
                let mut buf = vec![0u8; 96 << 10];
                r.read_at(0, &mut buf).unwrap();
                assert!(buf == day(d as u64));
            }
            Err(e) => {
                assert_eq!(d, 0, "day {d}: {e}");
                assert!(
                    matches!(e, dsync_store::Error::NoSuchSnapshot { .. }),
                    "{e}"
                );
            }
        }
    }
}

/// Runs a prune the first time a restore reports progress.
struct PruneMidway<'r> {
    repo: &'r Repo,
    done: Mutex<Option<dsync_store::gc::GcReport>>,
}

impl Progress for PruneMidway<'_> {
    fn advance(&self, _bytes: u64) {
        let mut done = self.done.lock().unwrap();
        if done.is_none() {
            let (_, rep) = prune(self.repo, &repack_policy(), 0.99, false, &NoProgress).unwrap();
            *done = Some(rep);
        }
    }
}

fn a_restore_that_a_prune_interrupts_writes_the_right_bytes(format: u32) {
    let dir = tempfile::tempdir().unwrap();
    let m = MemBackend::new();
    let repo = Repo::init_on(Arc::new(m.clone()), config(format)).unwrap();
    // Two files per snapshot, so the second is opened after the prune.
    let mut want: HashMap<String, Vec<u8>> = HashMap::new();
    for d in 0..3u64 {
        for (name, seed) in [("a", 0u64), ("b", 50)] {
            let mut v = day(d);
            v.iter_mut().for_each(|b| *b ^= seed as u8);
            std::fs::write(dir.path().join(name), &v).unwrap();
            if d == 1 {
                want.insert(name.to_string(), v);
            }
        }
        let opts = BackupOptions {
            time_ns: Some(1_700_000_000_000_000_000 + d as i64 * 86_400_000_000_000),
            chunk_size: 16 << 10,
            ..Default::default()
        };
        let paths = [dir.path().join("a"), dir.path().join("b")];
        backup(&repo, &paths, &opts, &NoProgress).unwrap();
    }
    let snap = repo.snapshots().unwrap().remove(1);
    let to = dir.path().join("out");
    let progress = PruneMidway {
        repo: &repo,
        done: Mutex::new(None),
    };
    dsync_store::restore(&repo, &snap, None, &to, false, &progress).unwrap();
    let rep = progress.done.lock().unwrap().take().expect("the prune ran");
    assert!(rep.manifests_rewritten > 0, "{rep:?}");
    for (name, v) in &want {
        assert!(
            std::fs::read(to.join(name)).unwrap() == *v,
            "{name} differs"
        );
    }
    // The snapshot still holds both files, now through rewritten maps.
    let now = repo.snapshots().unwrap().remove(0);
    assert_eq!(now.id, snap.id);
    let maps = |s: &dsync_store::Snapshot| -> Vec<_> {
        s.nodes
            .iter()
            .filter_map(|n| match &n.kind {
                NodeKind::File(f) => Some(f.key()),
                _ => None,
            })
            .collect()
    };
    assert_ne!(
        maps(&now),
        maps(&snap),
        "the prune rewrote the kept snapshot"
    );
}

fn a_check_that_a_prune_interrupts_reports_no_damage(format: u32) {
    let dir = tempfile::tempdir().unwrap();
    let m = repo_with_days(3, dir.path(), format);
    let repo = open(&m);
    let progress = PruneMidway {
        repo: &repo,
        done: Mutex::new(None),
    };
    let opts = dsync_store::CheckOptions {
        read_data: true,
        subset: None,
    };
    let report = dsync_store::check(&repo, &opts, &progress).unwrap();
    let rep = progress.done.lock().unwrap().take().expect("the prune ran");
    assert!(rep.packs_repacked > 0, "{rep:?}");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // It checked what was there when it (last) started: all three, or the
    // two kept ones if a run found objects gone and started again.
    assert!((2..=3).contains(&report.snapshots), "{}", report.snapshots);
}

/// Every test above, on a repository of each format.
macro_rules! in_both_formats {
    ($($name:ident),*) => {
        mod format_2 {
            $(#[test] fn $name() { super::$name(2) })*
        }
        mod format_3 {
            $(#[test] fn $name() { super::$name(3) })*
        }
    };
}

in_both_formats!(
    a_backup_stopped_at_any_write_loses_nothing,
    a_prune_stopped_at_any_write_loses_no_kept_snapshot,
    readers_opened_before_a_prune_read_the_right_bytes,
    a_restore_that_a_prune_interrupts_writes_the_right_bytes,
    a_check_that_a_prune_interrupts_reports_no_damage
);

/// Format 3: a meta pack most of whose blobs only forgotten snapshots used
/// is repacked: the kept records get new lists, the pack goes.
#[test]
fn format_3_prune_repacks_meta_packs() {
    let dir = tempfile::tempdir().unwrap();
    let m = repo_with_days(4, dir.path(), 3);
    let repo = open(&m);
    let meta_bytes = |m: &MemBackend| -> u64 {
        use dsync_store::backend::{Backend, Kind};
        m.list(Kind::Meta).unwrap().iter().map(|(_, n)| n).sum()
    };
    let before = meta_bytes(&m);
    let policy = KeepPolicy {
        last: 1,
        ..KeepPolicy::default()
    };
    let (plan, rep) = prune(&repo, &policy, 1.0, false, &NoProgress).unwrap();
    assert!(!plan.gc.repack_meta.is_empty(), "{rep:?}");
    assert!(meta_bytes(&m) < before, "{} -> {}", before, meta_bytes(&m));
    assert_eq!(verify(&repo), [3]);
    let opts = dsync_store::CheckOptions {
        read_data: true,
        subset: None,
    };
    let report = dsync_store::check(&repo, &opts, &NoProgress).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // Nothing left to reclaim, and the next backup still diffs.
    let (_, again) = prune(&repo, &KeepPolicy::default(), 1.0, true, &NoProgress).unwrap();
    assert_eq!(again.unused_bytes, 0, "{again:?}");
    back_up(&repo, dir.path(), 4).unwrap();
    assert_eq!(verify(&repo), [3, 4]);
}

/// Format 3: listing snapshots and resolving their names read the records
/// only, never a page of their trees.
#[test]
fn format_3_listing_reads_no_tree() {
    use dsync_store::backend::{Backend, Key, Kind};
    let dir = tempfile::tempdir().unwrap();
    let m = MemBackend::new();
    let repo = Repo::init_on(Arc::new(m.clone()), config(3)).unwrap();
    // Enough files that the root list is paged.
    let paths: Vec<std::path::PathBuf> = (0..600)
        .map(|i| {
            let p = dir
                .path()
                .join(format!("a-file-with-a-long-name-{i:05}.txt"));
            std::fs::write(&p, pseudo(100 + i, i as u64)).unwrap();
            p
        })
        .collect();
    for d in 0..2i64 {
        let opts = BackupOptions {
            time_ns: Some(1_700_000_000_000_000_000 + d),
            ..Default::default()
        };
        backup(&repo, &paths, &opts, &NoProgress).unwrap();
    }
    let metas: Vec<Key> = m
        .list(Kind::Meta)
        .unwrap()
        .into_iter()
        .map(|(n, _)| Key::new(Kind::Meta, n))
        .collect();
    m.remove(&metas).unwrap();
    let repo = open(&m);
    let infos = repo.infos().unwrap();
    assert_eq!(infos.len(), 2);
    assert!(infos.iter().all(|i| i.files == 600));
    assert!(repo.snapshots().is_err(), "the trees are gone");
}

/// Format 3: a backup finds its sources' previous versions in the newest
/// snapshot that has them all and reads no older tree (here an older
/// snapshot's pages are gone, and the backup does not notice).
#[test]
fn format_3_backup_reads_only_the_newest_tree() {
    use dsync_store::backend::{Backend, Key, Kind};
    let dir = tempfile::tempdir().unwrap();
    let m = MemBackend::new();
    let repo = Repo::init_on(Arc::new(m.clone()), config(3)).unwrap();
    let paths: Vec<std::path::PathBuf> = (0..600)
        .map(|i| {
            dir.path()
                .join(format!("a-file-with-a-long-name-{i:05}.txt"))
        })
        .collect();
    let metas = || -> std::collections::BTreeSet<String> {
        m.list(Kind::Meta)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    };
    let mut day1 = Default::default();
    for d in 0..3u64 {
        for (i, p) in paths.iter().enumerate() {
            std::fs::write(p, pseudo(100 + i, i as u64 * 10 + d)).unwrap();
        }
        let opts = BackupOptions {
            time_ns: Some(1_700_000_000_000_000_000 + d as i64),
            ..Default::default()
        };
        backup(&repo, &paths, &opts, &NoProgress).unwrap();
        if d == 0 {
            day1 = metas();
            continue;
        }
        if d == 1 {
            // Every file changed: day 2 shares no page with day 1. Lose
            // day 1's pages.
            let keys: Vec<Key> = day1
                .iter()
                .map(|n| Key::new(Kind::Meta, n.clone()))
                .collect();
            m.remove(&keys).unwrap();
        }
    }
    let snaps = repo.infos().unwrap();
    assert_eq!(snaps.len(), 3);
    let last = repo.load_snapshot(snaps[2].id).unwrap();
    let mut got = Vec::new();
    dsync_store::cat(&repo, &last, "a-file-with-a-long-name-00007.txt", &mut got).unwrap();
    assert_eq!(got, pseudo(107, 72));
}
