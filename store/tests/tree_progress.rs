//! Progress of a directory backup: the scan that runs alongside reports the
//! tree's totals, and every file's bytes are advanced exactly once, read or
//! unchanged, so a bar of bytes over the scanned total never moves back and
//! ends full.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use dsync_store::format::config::Config;
use dsync_store::testdata::pseudo;
use dsync_store::{backup, BackupOptions, Progress, Repo};

#[derive(Default)]
struct Recorder {
    advanced: AtomicU64,
    /// Every (files, bytes, done) the scan reported.
    scans: Mutex<Vec<(u64, u64, bool)>>,
    done_before_end: AtomicBool,
}

impl Progress for Recorder {
    fn advance(&self, bytes: u64) {
        self.advanced.fetch_add(bytes, Ordering::Relaxed);
    }
    fn wants_totals(&self) -> bool {
        true
    }
    fn scanned(&self, files: u64, bytes: u64, done: bool) {
        if done {
            self.done_before_end.store(true, Ordering::Relaxed);
        }
        self.scans.lock().unwrap().push((files, bytes, done));
    }
}

#[test]
fn the_scan_totals_match_what_the_backup_advances() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let mut total = 0u64;
    let mut files = 0u64;
    for d in 0..20 {
        let sub = src.join(format!("d{d}/inner"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..30 {
            // Small files, and a few over one chunk (the big-file path).
            let n = if f == 0 && d % 5 == 0 {
                5 << 20
            } else {
                100 + 97 * f
            };
            std::fs::write(sub.join(format!("f{f}")), pseudo(n, (d * 100 + f) as u64)).unwrap();
            total += n as u64;
            files += 1;
        }
    }
    let repo = Repo::init(&dir.path().join("repo"), Config::default()).unwrap();
    for round in 0..2 {
        if round == 1 {
            // One file changed; the rest are unchanged and not read.
            std::fs::write(src.join("d3/inner/f7"), pseudo(777, 9)).unwrap();
            total = total - (100 + 97 * 7) + 777;
        }
        let rec = Recorder::default();
        let rep = backup(
            &repo,
            std::slice::from_ref(&src),
            &BackupOptions::default(),
            &rec,
        )
        .unwrap();
        assert_eq!(rep.tree.files, files);
        let scans = rec.scans.lock().unwrap().clone();
        assert_eq!(scans.first(), Some(&(0, 0, false)), "round {round}");
        assert_eq!(scans.last(), Some(&(files, total, true)), "round {round}");
        assert!(
            scans.windows(2).all(|w| w[0].1 <= w[1].1),
            "the total moved back: {scans:?}"
        );
        assert_eq!(rec.advanced.load(Ordering::Relaxed), total, "round {round}");
    }
}
