//! Back up versions of an image and get every one back, byte for byte.

use std::os::unix::fs::{FileExt, MetadataExt};

use super::util::*;

#[test]
fn five_versions_restore_identical() {
    let env = Env::new();
    let img = env.path("disk.img");
    let repo = env.repo();
    make_image(&img, 48 << 20, 1);
    let mut hashes = Vec::new();
    for day in 0..5 {
        if day > 0 {
            change_image(&img, day, 40);
        }
        hashes.push(blake2(&img));
        std::fs::copy(&img, env.path(&format!("v{day}.img"))).unwrap();
        let out = env.ok(&["backup", s(&repo), s(&img), "--json"]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["files"][0]["size"], 48 << 20);
        if day > 0 {
            // Every version after the first is stored as a delta.
            let added = v["bytes_added"].as_u64().unwrap();
            assert!(added < 4 << 20, "day {day} added {added} bytes");
        }
    }
    let ids = env.ids();
    assert_eq!(ids.len(), 5);
    // Oldest first: restore the oldest last, after the newer ones.
    for (k, id) in ids.iter().enumerate().rev() {
        let dest = env.path(&format!("out{k}"));
        let o = env.ok(&["restore", s(&repo), &id[..10], "--to", s(&dest)]);
        assert!(o.contains("verified"), "{o}");
        let got = dest.join("disk.img");
        assert_eq!(blake2(&got), hashes[k], "version {k} differs");
        assert_eq!(
            std::process::Command::new("cmp")
                .arg(&got)
                .arg(env.path(&format!("v{k}.img")))
                .status()
                .unwrap()
                .code(),
            Some(0)
        );
    }
    // The first version was sparse: so is its restore.
    let md = std::fs::metadata(env.path("out0/disk.img")).unwrap();
    assert!(
        md.blocks() * 512 < md.len() / 2,
        "restore is not sparse: {} blocks",
        md.blocks()
    );
    // One file to a file path, `latest`, and cat.
    env.ok(&[
        "restore",
        s(&repo),
        "latest",
        "--to",
        s(&env.path("last.img")),
        "disk.img",
    ]);
    assert_eq!(blake2(&env.path("last.img")), hashes[4]);
    let cat = std::process::Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args(["cat", s(&repo), &ids[1], "disk.img"])
        .output()
        .unwrap();
    assert!(cat.status.success());
    assert!(
        cat.stdout == std::fs::read(env.path("v1.img")).unwrap(),
        "cat differs"
    );
    // `list` prints one line per snapshot after the header.
    let list = env.ok(&["list", s(&repo)]);
    assert_eq!(list.lines().count(), 6);
    for id in &ids {
        assert!(list.contains(id.as_str()));
    }
}

#[test]
fn scattered_writes_store_at_most_their_size() {
    let env = Env::new();
    let img = env.path("disk.img");
    let repo = env.repo();
    std::fs::write(&img, pseudo(32 << 20, 5)).unwrap();
    env.ok(&["backup", s(&repo), s(&img)]);
    std::fs::copy(&img, env.path("before")).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for k in 0..100u64 {
        f.write_all_at(&pseudo(4096, 100 + k), (k * 320_000) & !4095)
            .unwrap();
    }
    drop(f);
    let changed = changed_bytes(&env.path("before"), &img);
    let out = env.ok(&["backup", s(&repo), s(&img), "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let literal = v["files"][0]["literal_bytes"].as_u64().unwrap();
    assert!(
        literal as f64 <= changed as f64 * 1.0 + 4096.0,
        "literal {literal} for {changed} changed bytes"
    );
    assert!(literal >= changed);
}

#[test]
fn unchanged_file_is_not_read_unless_asked() {
    let env = Env::new();
    let img = env.path("disk.img");
    let repo = env.repo();
    std::fs::write(&img, pseudo(4 << 20, 6)).unwrap();
    env.ok(&["backup", s(&repo), s(&img)]);
    let v: serde_json::Value =
        serde_json::from_str(env.ok(&["backup", s(&repo), s(&img), "--json"]).trim()).unwrap();
    assert_eq!(v["files"][0]["reused"], true);
    assert_eq!(v["bytes_read"], 0);
    let v: serde_json::Value = serde_json::from_str(
        env.ok(&["backup", s(&repo), s(&img), "--json", "--checksum"])
            .trim(),
    )
    .unwrap();
    assert_eq!(v["files"][0]["reused"], false);
    assert_eq!(v["bytes_read"], 4 << 20);
    assert_eq!(v["files"][0]["literal_bytes"], 0);
}

#[test]
fn killed_backup_leaves_earlier_snapshots_readable() {
    let env = Env::new();
    let img = env.path("disk.img");
    let repo = env.repo();
    std::fs::write(&img, pseudo(24 << 20, 7)).unwrap();
    env.ok(&["backup", s(&repo), s(&img)]);
    let first = blake2(&img);
    std::fs::write(&img, pseudo(160 << 20, 8)).unwrap();
    for delay_ms in [5u64, 20, 40, 80, 120, 200] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dsync"))
            .args(["backup", "-q", s(&repo), s(&img)])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let ids = env.ids();
        assert!(!ids.is_empty());
        let dest = env.path(&format!("after-kill-{delay_ms}"));
        env.ok(&["restore", s(&repo), &ids[0], "--to", s(&dest)]);
        assert_eq!(blake2(&dest.join("disk.img")), first);
    }
    // The repository is still usable.
    env.ok(&["backup", s(&repo), s(&img)]);
    env.ok(&["restore", s(&repo), "latest", "--to", s(&env.path("final"))]);
    assert_eq!(blake2(&env.path("final/disk.img")), blake2(&img));
}

#[test]
fn restore_and_forget_json() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(100_000, 3)).unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    let ids = env.ids();
    let v: serde_json::Value = serde_json::from_str(
        env.ok(&[
            "restore",
            s(&env.repo()),
            "latest",
            "--to",
            s(&env.path("o")),
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(v["snapshot"], ids[0].as_str());
    assert_eq!(v["bytes"], 100_000);
    assert_eq!(v["files"][0]["size"], 100_000);
    assert_eq!(v["files"][0]["verified"], true);
    let v: serde_json::Value = serde_json::from_str(
        env.ok(&["forget", s(&env.repo()), "latest", "--json"])
            .trim(),
    )
    .unwrap();
    assert_eq!(v["forgotten"][0], ids[0].as_str());
    assert!(env.ids().is_empty());
}
