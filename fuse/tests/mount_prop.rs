//! Directory backups through the mount, as a property: whatever tree a user
//! has, and however it changes between backups, each snapshot's directory
//! read through a real FUSE mount of the repository shows exactly the tree
//! as it was when that snapshot was taken.
//!
//! The random trees, their changes, the backups and the test's own reading
//! of each state are `store/tests/shared/tree_model.rs`, the same as the
//! restore property's (`store/tests/tree_prop.rs`). Here the repository is
//! mounted in this process (`dsync_fuse::mount` on a thread) and every
//! snapshot's `/<local time>/src` is read with the same `lstat`,
//! `readlink`, `read`, `SEEK_DATA`/`SEEK_HOLE` and `getxattr` as the
//! source was, and compared on all the mount serves:
//!
//! - kinds, contents, symlink targets (raw bytes), device numbers;
//! - modes with setuid, setgid and sticky bits (shown as stored: the mount
//!   is `nosuid`, which only stops them from acting);
//! - owners, as non-root too (the mount shows the stored ones, where a
//!   restore can set them only as root);
//! - mtimes to the nanosecond, before 1970 too;
//! - extended attributes;
//! - hard links: names that share an inode in the source share one through
//!   the mount (one inode per link group), with its link count;
//! - holes: `st_blocks` counts stored bytes only, and `SEEK_HOLE` through
//!   the mount finds the holes.
//!
//! What the mount cannot show, and so is not compared (see
//! `tree_model::compare`): ctimes and atimes (the mount serves the mtime
//! for both: a version never changes after its backup, and atimes are not
//! stored), inode numbers themselves (given out by the mount on first
//! sight; only which names share one is compared), directory sizes and
//! link counts (the mount gives every directory 2 links and size 0).
//!
//! A test that cannot mount fails; only DSYNC_SKIP_FUSE=1 skips it (as
//! tests/e2e/mount.rs). `PROPTEST_CASES` sets the number of cases (64 by
//! default).

#[path = "../../store/tests/shared/tree_model.rs"]
mod tree_model;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use dsync_fuse::MountOptions;
use proptest::prelude::*;

use tree_model::*;

fn skip() -> bool {
    static SAID: std::sync::Once = std::sync::Once::new();
    if std::env::var_os("DSYNC_SKIP_FUSE").is_some_and(|v| v == "1") {
        SAID.call_once(|| eprintln!("DSYNC_SKIP_FUSE=1: skipping a FUSE test"));
        return true;
    }
    false
}

/// A repository mounted by `dsync_fuse::mount` on a thread of this
/// process; unmounted on `unmount`, or (lazily) on drop.
struct Mounted {
    dir: PathBuf,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Mounted {
    /// Mounts `repo` at `dir`; panics when it cannot.
    fn new(repo: &Path, dir: &Path) -> Mounted {
        let (tx, rx) = mpsc::channel();
        let (r, d) = (repo.to_path_buf(), dir.to_path_buf());
        let thread = std::thread::Builder::new()
            .name("mount".into())
            .spawn(move || {
                dsync_fuse::mount(&r, &d, &MountOptions::default(), move || {
                    let _ = tx.send(());
                })
            })
            .expect("spawn the mount thread");
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(()) => Mounted {
                dir: dir.to_path_buf(),
                thread: Some(thread),
            },
            // The sender was dropped: mount returned without being ready.
            Err(mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
                Ok(Err(e)) => panic!(
                    "cannot mount {} at {}: {e} (DSYNC_SKIP_FUSE=1 skips FUSE tests)",
                    repo.display(),
                    dir.display()
                ),
                r => panic!("the mount thread ended before the mount was ready: {r:?}"),
            },
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("mount at {} not ready after 20 s", dir.display())
            }
        }
    }

    /// Unmounts with fusermount3 and requires the mount to have served
    /// without error until then.
    fn unmount(mut self) -> Result<(), String> {
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status()
            .map_err(|e| format!("fusermount3: {e}"))?;
        if !st.success() {
            return Err(format!("fusermount3 -u {}: {st}", self.dir.display()));
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(format!("the mount ended with {e}")),
            Some(Err(_)) => Err("the mount thread panicked".into()),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            // Lazily: a failing case may have left something open.
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.dir)
                .status();
            let _ = t.join();
        }
    }
}

/// Backs up `case`'s states, mounts the repository, and compares every
/// snapshot's directory through the mount with its state.
fn run(case: &Case) -> Result<(), String> {
    mount_and_compare(back_up_case(case)?)
}

fn mount_and_compare(b: Backups) -> Result<(), String> {
    let mnt = b.tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = Mounted::new(&b.repo_dir, &mnt);
    let r = compare_all(&b, &m.dir);
    // Unmounted before the temporary directory goes, failed or not.
    let u = m.unmount();
    r.and(u)
}

fn compare_all(b: &Backups, mnt: &Path) -> Result<(), String> {
    let through = Through {
        how: "mounted",
        owners: true,
        seek_holes: true,
    };
    // The root: one directory per snapshot, named by its local time (the
    // rest are links: each day's last, and `latest`).
    let mut dirs: Vec<String> = std::fs::read_dir(mnt)
        .map_err(|e| format!("read_dir {}: {e}", mnt.display()))?
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let want: Vec<String> = b
        .taken
        .iter()
        .map(|t| dsync_store::time::local(t.time_ns))
        .collect();
    if dirs != want {
        return Err(format!(
            "the mount's root has snapshot directories {dirs:?}, backups made {want:?}"
        ));
    }
    for (i, (t, name)) in b.taken.iter().zip(&want).enumerate() {
        let snap = mnt.join(name);
        let md = std::fs::symlink_metadata(&snap).unwrap();
        let time = md.mtime() * 1_000_000_000 + md.mtime_nsec();
        if time != t.time_ns {
            return Err(format!(
                "snapshot directory {name}: mtime {time}, the snapshot's time {}",
                t.time_ns
            ));
        }
        let names: Vec<_> = std::fs::read_dir(&snap)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        if names != ["src"] {
            return Err(format!("snapshot directory {name} holds {names:?}"));
        }
        let got = capture(&snap.join("src"));
        let diffs = compare(&t.state, &got, through);
        if !diffs.is_empty() {
            return Err(format!(
                "snapshot {i} of {} ({name}) differs through the mount:\n  {}",
                b.taken.len(),
                diffs.join("\n  ")
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn the_mount_shows_every_snapshot_of_a_changing_tree(case in case()) {
        if skip() {
            return Ok(());
        }
        if let Err(e) = run(&case) {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// The random trees' directories are small; this one's are not: 3000
/// names (a third of them 255 bytes long) take many readdir replies and a
/// list stored out of line, and some are looked up by name before any
/// listing of their directory. A hard link joins a name in it to one
/// outside; in the second snapshot half of the names are renamed, and the
/// name the walk meets first in the link group is gone.
#[test]
fn a_directory_of_thousands_of_names_through_the_mount() {
    if skip() {
        return;
    }
    let at = |i: usize, renamed: bool| {
        let mut p = format!("big/{}{i:05}-", if renamed { "r" } else { "" }).into_bytes();
        p.resize(
            if i.is_multiple_of(3) { 259 } else { 16 },
            b'a' + (i % 26) as u8,
        );
        p
    };
    let b = back_up_rounds(2, None, |t, round| {
        if round == 0 {
            std::fs::create_dir(t.abs(b"big")).unwrap();
            for i in 0..3000 {
                t.write(&at(i, false), &Content::Random(i % 40, i as u64 % 7));
            }
            std::fs::hard_link(t.abs(&at(1500, false)), t.abs(b"link")).unwrap();
        } else {
            for i in (0..3000).step_by(2) {
                std::fs::rename(t.abs(&at(i, false)), t.abs(&at(i, true))).unwrap();
            }
            std::fs::remove_file(t.abs(&at(1500, true))).unwrap();
            std::fs::remove_file(t.abs(&at(2999, false))).unwrap();
            std::fs::hard_link(t.abs(b"link"), t.abs(&at(2999, false))).unwrap();
        }
    })
    .unwrap();
    let mnt = b.tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = Mounted::new(&b.repo_dir, &mnt);
    // Looked up first, straight to the name.
    for (round, t) in b.taken.iter().enumerate() {
        let snap = m.dir.join(dsync_store::time::local(t.time_ns)).join("src");
        for i in [0, 1, 1500, 2999] {
            let rel = at(i, round == 1 && i.is_multiple_of(2));
            let p = snap.join(std::ffi::OsStr::from_bytes(&rel));
            let got = std::fs::symlink_metadata(&p).map(|md| seen(&p, &md));
            match (t.state.get(&rel), got) {
                (None, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                (Some(w), Ok(g)) if (&w.kind, w.mode, w.nlink) == (&g.kind, g.mode, g.nlink) => {}
                (w, g) => panic!("{} looked up: want {w:?}, got {g:?}", p.display()),
            }
        }
    }
    let r = compare_all(&b, &m.dir);
    m.unmount().unwrap();
    r.unwrap();
}
