//! `dsync_store::sync` where the binary cannot reach deterministically: a
//! source file that vanishes between the walk and its transfer.

use std::sync::Mutex;

use dsync_store::sync::{sync, Item, SyncEvents, SyncOptions};

/// Removes `victim` from SRC the moment the walk itemizes it (the file
/// is then queued for a worker that will not find it).
struct Vanisher {
    victim: std::path::PathBuf,
    warnings: Mutex<Vec<String>>,
}

impl SyncEvents for Vanisher {
    fn item(&self, item: &Item<'_>) {
        if item.path == b"b-vanishes" {
            std::fs::remove_file(&self.victim).unwrap();
        }
    }
    fn warn(&self, msg: &str) {
        self.warnings.lock().unwrap().push(msg.to_string());
    }
}

#[test]
fn a_file_that_vanishes_before_its_transfer_gives_24_and_no_deletion() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("src"), d.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(src.join("a-stays"), b"a").unwrap();
    std::fs::write(src.join("b-vanishes"), b"b").unwrap();
    std::fs::write(dst.join("extra"), b"not in SRC").unwrap();
    let ev = Vanisher {
        victim: src.join("b-vanishes"),
        warnings: Mutex::new(Vec::new()),
    };
    let opts = SyncOptions {
        recursive: true,
        delete: true,
        ..Default::default()
    };
    let mut s = src.into_os_string();
    s.push("/");
    let r = sync(&[s.into()], &dst, &opts, &ev).unwrap();
    let w = ev.warnings.lock().unwrap().join("\n");
    assert_eq!(r.vanished, 1, "{r:?} {w}");
    assert_eq!(r.exit_code(), 24, "{r:?}");
    assert!(w.contains("vanished: b-vanishes"), "{w}");
    assert!(w.contains("skipping file deletion"), "{w}");
    assert!(dst.join("extra").exists(), "deleted after a vanished file");
    assert_eq!(std::fs::read(dst.join("a-stays")).unwrap(), b"a");
    assert!(!dst.join("b-vanishes").exists());
}
