//! Bad input: one clear line on stderr, a documented exit code, nothing lost.

use std::os::unix::io::AsRawFd;

use super::util::*;

fn repo_with_one(env: &Env) -> String {
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(1 << 20, 1)).unwrap();
    env.ok(&["backup", s(&env.repo()), s(&img)]);
    blake2(&img)
}

fn still_restores(env: &Env, hash: &str, name: &str) {
    let dest = env.path(name);
    env.ok(&["restore", s(&env.repo()), "latest", "--to", s(&dest)]);
    assert_eq!(blake2(&dest.join("disk.img")), hash);
}

#[test]
fn missing_source() {
    let env = Env::new();
    let h = repo_with_one(&env);
    let err = env.fails(&["backup", s(&env.repo()), "/nonexistent/disk.img"], 1);
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
    assert_eq!(env.ids().len(), 1);
    still_restores(&env, &h, "r");
}

#[test]
fn directory_source_in_a_format_2_repository_is_refused() {
    let env = Env::new();
    env.ok(&["init", "--format", "2", s(&env.repo())]);
    std::fs::create_dir(env.path("tree")).unwrap();
    let err = env.fails(&["backup", s(&env.repo()), s(&env.path("tree"))], 1);
    assert!(
        err.contains("directories need a format 3 repository"),
        "{err}"
    );
    // A fifo is neither a file, a directory nor a device.
    let fifo = env.path("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = env.fails(&["backup", s(&env.repo()), s(&fifo)], 1);
    assert!(
        err.contains("not a regular file, directory or block device"),
        "{err}"
    );
}

#[test]
fn not_a_repository() {
    let env = Env::new();
    std::fs::create_dir(env.path("empty")).unwrap();
    let err = env.fails(&["list", s(&env.path("empty"))], 1);
    assert!(err.contains("not a dsync repository"), "{err}");
    let err = env.fails(&["init", s(env.dir.path())], 1);
    assert!(err.contains("non-empty"), "{err}");
}

#[test]
fn snapshot_that_matches_nothing() {
    let env = Env::new();
    repo_with_one(&env);
    let err = env.fails(&["restore", s(&env.repo()), "2001-01-01", "--to", "x"], 1);
    assert!(err.contains("no snapshot matches"), "{err}");
    let err = env.fails(&["restore", s(&env.repo()), "zzz", "--to", "x"], 1);
    assert!(err.contains("no snapshot matches"), "{err}");
    let err = env.fails(&["cat", s(&env.repo()), "latest", "other.img"], 1);
    assert!(err.contains("other.img"), "{err}");
}

#[test]
fn existing_destination_needs_force() {
    let env = Env::new();
    let h = repo_with_one(&env);
    std::fs::write(env.path("taken"), b"mine").unwrap();
    let err = env.fails(
        &[
            "restore",
            s(&env.repo()),
            "latest",
            "--to",
            s(&env.path("taken")),
            "disk.img",
        ],
        1,
    );
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(env.path("taken")).unwrap(), b"mine");
    env.ok(&[
        "restore",
        s(&env.repo()),
        "latest",
        "--to",
        s(&env.path("taken")),
        "disk.img",
        "--force",
    ]);
    assert_eq!(blake2(&env.path("taken")), h);
}

#[test]
fn second_writer_is_refused() {
    let env = Env::new();
    let h = repo_with_one(&env);
    let lock = std::fs::File::open(env.repo().join("lock")).unwrap();
    // SAFETY: valid fd.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let err = env.fails(&["backup", s(&env.repo()), s(&env.path("disk.img"))], 4);
    assert!(err.contains("locked"), "{err}");
    // Readers do not block on the lock.
    still_restores(&env, &h, "r");
    drop(lock);
    env.ok(&[
        "backup",
        s(&env.repo()),
        s(&env.path("disk.img")),
        "--checksum",
    ]);
}

#[test]
fn newer_format_is_refused() {
    let env = Env::new();
    repo_with_one(&env);
    let cfg = env.repo().join("config");
    let mut b = std::fs::read(&cfg).unwrap();
    b[8] = 9;
    // Re-seal so that only the version is "wrong".
    let split = b.len() - 32;
    let sum = blake2b_simd::Params::new()
        .hash_length(32)
        .hash(&b[..split]);
    b[split..].copy_from_slice(sum.as_bytes());
    std::fs::write(&cfg, b).unwrap();
    let err = env.fails(&["list", s(&env.repo())], 1);
    assert!(err.contains("newer"), "{err}");
}

#[test]
fn damaged_manifest_is_named() {
    let env = Env::new();
    repo_with_one(&env);
    let id = env.ids().remove(0);
    let p = env.repo().join("snapshots").join(format!("{id}.snap"));
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n / 2] ^= 0x10;
    std::fs::write(&p, b).unwrap();
    let err = env.fails(&["list", s(&env.repo())], 3);
    assert!(err.contains(&id) && err.contains("damaged"), "{err}");
}

#[test]
fn damaged_pack_fails_restore_and_names_it() {
    let env = Env::new();
    repo_with_one(&env);
    let packs = env.repo().join("packs");
    let pack = std::fs::read_dir(&packs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut b = std::fs::read(&pack).unwrap();
    b[100] ^= 0xff;
    std::fs::write(&pack, b).unwrap();
    let dest = env.path("out");
    let err = env.fails(&["restore", s(&env.repo()), "latest", "--to", s(&dest)], 3);
    assert!(err.contains("frame") && err.contains("disk.img"), "{err}");
    assert!(
        !dest.join("disk.img").exists(),
        "a damaged version left a file behind"
    );
}

#[test]
fn source_changing_while_read() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(96 << 20, 3)).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        // A writer that keeps appending, as a running VM keeps writing.
        sc.spawn(|| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&img).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(&[7u8; 4096]).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        });
        // --on-change fail: today's strict behaviour for images.
        let o = env.run(&["backup", s(&env.repo()), s(&img), "--on-change", "fail"]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        // By default the file is stored as read, flagged, and the exit code
        // (5) says the snapshot is incomplete.
        let o2 = env.run(&["backup", s(&env.repo()), s(&img), "--json"]);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("changed while it was read") && err.contains("disk.img"),
            "{err}"
        );
        let o = o2;
        assert_eq!(
            o.status.code(),
            Some(5),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(String::from_utf8_lossy(&o.stderr).contains("warning"));
        assert!(String::from_utf8_lossy(&o.stderr).contains("incomplete"));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["files"][0]["changed_while_read"], true);
    });
    // What was stored restores and verifies (bytes and hash agree).
    env.ok(&[
        "restore",
        s(&env.repo()),
        "latest",
        "--to",
        s(&env.path("out")),
    ]);
    assert_eq!(env.ids().len(), 1);
}

#[test]
fn ambiguous_snapshot_prefix() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(4096, 1)).unwrap();
    // Sixteen hex digits: among 17 snapshots two share a first digit.
    let shared = loop {
        env.ok(&["backup", "-q", s(&env.repo()), s(&img), "--checksum"]);
        let ids = env.ids();
        let mut firsts: Vec<char> = ids.iter().map(|i| i.chars().next().unwrap()).collect();
        firsts.sort();
        if let Some(w) = firsts.windows(2).find(|w| w[0] == w[1]) {
            break w[0];
        }
        assert!(ids.len() <= 17);
    };
    let err = env.fails(
        &["restore", s(&env.repo()), &shared.to_string(), "--to", "x"],
        1,
    );
    assert!(
        err.contains("matches") && err.contains("give more of the id"),
        "{err}"
    );
}

#[test]
fn full_disk_during_backup_loses_nothing() {
    if skip_root_test("full-disk") {
        return;
    }
    let env = Env::new();
    let small = env.path("small");
    std::fs::create_dir(&small).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&small)
        .status()
        .expect("run mount");
    assert!(
        st.success(),
        "this test mounts a 6 MiB tmpfs and needs root (DSYNC_SKIP_ROOT=1 skips it)"
    );
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Umount(small.clone());
    let repo = small.join("repo");
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(2 << 20, 1)).unwrap();
    env.ok(&["backup", "-q", s(&repo), s(&img)]);
    let first = blake2(&img);
    // 8 MiB of incompressible data cannot fit in what is left.
    std::fs::write(&img, pseudo(8 << 20, 2)).unwrap();
    let o = env.run(&["backup", "-q", s(&repo), s(&img)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("No space left") || err.contains("space"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // The earlier snapshot is intact; after a prune of the leftovers the
    // repository takes a small backup again.
    let list = env.ok(&["list", s(&repo), "--json"]);
    assert_eq!(list.lines().count(), 1);
    env.ok(&["restore", s(&repo), "latest", "--to", s(&env.path("out"))]);
    assert_eq!(blake2(&env.path("out/disk.img")), first);
    env.ok(&["prune", s(&repo), "-q"]);
    env.ok(&["check", s(&repo), "--read-data"]);
    std::fs::write(&img, pseudo(1 << 20, 3)).unwrap();
    env.ok(&["backup", "-q", s(&repo), s(&img)]);
}

#[test]
fn unlock_reports_the_holder() {
    let env = Env::new();
    repo_with_one(&env);
    assert!(env.ok(&["unlock", s(&env.repo())]).contains("not locked"));
    // A writer killed with SIGKILL leaves no lock behind.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args([
            "backup",
            "-q",
            s(&env.repo()),
            s(&env.path("disk.img")),
            "--checksum",
        ])
        .spawn()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(env.ok(&["unlock", s(&env.repo())]).contains("not locked"));
    let lock = std::fs::File::open(env.repo().join("lock")).unwrap();
    // SAFETY: valid fd.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let err = env.fails(&["unlock", s(&env.repo())], 4);
    assert!(err.contains("locked") && err.contains("stop it"), "{err}");
}
