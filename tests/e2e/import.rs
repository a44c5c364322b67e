//! import-rdiff-backup: four versions made with rdiff-backup in the test
//! become four snapshots with the same times, each byte-identical to what
//! rdiff-backup restores, the later ones stored as deltas.

use std::os::unix::fs::FileExt;
use std::process::Command;

use super::util::*;

/// `rdiff-backup backup SRC RDIFF`, required to succeed.
fn rdiff_backup(src: &std::path::Path, rdiff: &std::path::Path) {
    let o = Command::new("rdiff-backup")
        .args(["backup"])
        .arg(src)
        .arg(rdiff)
        .output()
        .expect("rdiff-backup is installed by scripts/setup.sh");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The times (Unix seconds) of the versions `rdiff` holds, oldest first.
fn rdiff_times(rdiff: &std::path::Path) -> Vec<i64> {
    let list = Command::new("rdiff-backup")
        .args(["--parsable-output", "-l"])
        .arg(rdiff)
        .output()
        .unwrap();
    String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn imports_every_version_with_its_time() {
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir(&src).unwrap();
    let img = src.join("disk.img");
    std::fs::write(&img, pseudo(6 << 20, 1)).unwrap();
    let rdiff = env.path("rdiff");
    for day in 0..4u64 {
        if day > 0 {
            // rdiff-backup needs each backup in its own second, and sees a
            // change only through a new mtime (whole seconds).
            std::thread::sleep(std::time::Duration::from_millis(1100));
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            for w in 0..20u64 {
                f.write_all_at(
                    &pseudo(4096, day * 100 + w),
                    ((w * 300_007 + day * 4096) % (6 << 20)) & !4095,
                )
                .unwrap();
            }
        }
        rdiff_backup(&src, &rdiff);
    }
    let times = rdiff_times(&rdiff);
    assert_eq!(times.len(), 4);

    env.ok(&["import-rdiff-backup", s(&rdiff), s(&env.repo())]);
    let snaps: Vec<serde_json::Value> = env
        .ok(&["list", s(&env.repo()), "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(snaps.len(), 4);
    for (k, (snap, t)) in snaps.iter().zip(&times).enumerate() {
        assert_eq!(
            snap["time_unix_ns"].as_i64().unwrap(),
            t * 1_000_000_000,
            "version {k} time"
        );
        if k > 0 {
            assert!(
                snap["bytes_added"].as_u64().unwrap() < 1 << 20,
                "version {k} not stored as a delta: {snap}"
            );
        }
        let theirs = env.path(&format!("rdiff-{k}"));
        let o = Command::new("rdiff-backup")
            .args(["-r", &t.to_string()])
            .arg(&rdiff)
            .arg(&theirs)
            .output()
            .unwrap();
        assert!(o.status.success());
        let ours = env.path(&format!("dsync-{k}"));
        env.ok(&[
            "restore",
            s(&env.repo()),
            snap["id"].as_str().unwrap(),
            "--to",
            s(&ours),
        ]);
        assert_eq!(
            blake2(&ours.join("disk.img")),
            blake2(&theirs.join("disk.img")),
            "version {k} differs"
        );
    }
    let err = env.fails(&["import-rdiff-backup", s(&src), s(&env.path("other"))], 1);
    assert!(err.contains("not an rdiff-backup repository"), "{err}");
}

/// `rsync -anciJ` between two trees: contents, kinds, modes, mtimes and
/// symlink targets (what rdiff-backup restores: not a symlink's own mtime,
/// hence -J), nothing printed when the same.
fn rsync_diff(a: &std::path::Path, b: &std::path::Path) -> String {
    let o = Command::new("rsync")
        .args(["-anciJ", "--delete"])
        .arg(format!("{}/", a.display()))
        .arg(format!("{}/", b.display()))
        .output()
        .expect("rsync is installed by scripts/setup.sh");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn imports_a_repository_of_a_directory_tree() {
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(src.join("etc/ssh")).unwrap();
    std::fs::write(src.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    std::fs::write(src.join("etc/ssh/sshd_config"), pseudo(3000, 1)).unwrap();
    std::fs::write(src.join("disk.img"), pseudo(2 << 20, 2)).unwrap();
    std::os::unix::fs::symlink("hosts", src.join("etc/hosts.link")).unwrap();
    let rdiff = env.path("rdiff");
    for day in 0..3u64 {
        if day > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1100));
            std::fs::write(src.join(format!("etc/new-{day}")), pseudo(500, day)).unwrap();
            std::fs::write(src.join("etc/hosts"), format!("day {day}\n")).unwrap();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(src.join("disk.img"))
                .unwrap();
            f.write_all_at(&pseudo(4096, 10 + day), day * 8192).unwrap();
        }
        if day == 2 {
            std::fs::remove_dir_all(src.join("etc/ssh")).unwrap();
        }
        rdiff_backup(&src, &rdiff);
    }
    let times = rdiff_times(&rdiff);
    assert_eq!(times.len(), 3);
    env.ok(&["import-rdiff-backup", s(&rdiff), s(&env.repo())]);
    let ids = env.ids();
    assert_eq!(ids.len(), 3);
    for (k, (id, t)) in ids.iter().zip(&times).enumerate() {
        let theirs = env.path(&format!("rdiff-{k}"));
        let o = Command::new("rdiff-backup")
            .args(["-r", &t.to_string()])
            .arg(&rdiff)
            .arg(&theirs)
            .output()
            .unwrap();
        assert!(o.status.success());
        let ours = env.path(&format!("dsync-{k}"));
        env.ok(&["restore", "-q", s(&env.repo()), id, "--to", s(&ours)]);
        // The top directory is rdiff-backup's work directory, not a path
        // of the snapshot: its own mtime is not the tree's.
        let t = Command::new("touch")
            .arg("-r")
            .arg(&theirs)
            .arg(&ours)
            .status()
            .unwrap();
        assert!(t.success());
        let d = rsync_diff(&theirs, &ours);
        assert!(d.is_empty(), "version {k} differs:\n{d}");
    }
}
