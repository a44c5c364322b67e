//! forget and prune: retention through the binary, space reclaimed, and every
//! kept snapshot still restores byte for byte.

use std::os::unix::fs::FileExt;

use super::util::*;

fn objects_bytes(env: &Env) -> u64 {
    ["packs", "sigs", "maps", "snapshots", "meta"]
        .iter()
        .filter_map(|d| std::fs::read_dir(env.repo().join(d)).ok())
        .flatten()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Four versions; each day rewrites half of the file with new data.
fn four_days(env: &Env) -> Vec<String> {
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(8 << 20, 1)).unwrap();
    let mut hashes = Vec::new();
    for day in 0..4u64 {
        if day > 0 {
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            let at = (day % 2) * (4 << 20);
            f.write_all_at(&pseudo(4 << 20, 10 + day), at).unwrap();
        }
        env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
        hashes.push(blake2(&img));
    }
    hashes
}

#[test]
fn prune_keep_last_reclaims_space_and_keeps_the_rest() {
    let env = Env::new();
    let hashes = four_days(&env);
    let ids = env.ids();
    let before = objects_bytes(&env);
    // A dry run changes nothing.
    let dry: serde_json::Value = serde_json::from_str(
        env.ok(&[
            "prune",
            s(&env.repo()),
            "--keep-last",
            "2",
            "--dry-run",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(dry["forgotten"].as_array().unwrap().len(), 2);
    assert_eq!(env.ids(), ids);
    assert_eq!(objects_bytes(&env), before);

    let v: serde_json::Value = serde_json::from_str(
        env.ok(&["prune", s(&env.repo()), "--keep-last", "2", "--json"])
            .trim(),
    )
    .unwrap();
    assert_eq!(env.ids(), ids[2..].to_vec());
    let after = objects_bytes(&env);
    assert_eq!(v["bytes_freed"].as_u64().unwrap(), before - after);
    // Kept: day 2 (day 2's first half, day 1's second) and day 3 (day 2's
    // first half, day 3's second). Day 0's 8 MiB of incompressible data is
    // used by neither and goes; 12 MiB stay.
    // Within 10 % of the 8 MiB only the forgotten snapshots used.
    let freed = (before - after) as f64;
    let unique = (8u64 << 20) as f64;
    assert!(
        (freed - unique).abs() < 0.1 * unique,
        "freed {freed} bytes for 8 MiB used only by the forgotten"
    );
    assert!(
        after < (12 << 20) + (1 << 20),
        "repository still {after} bytes for 12 MiB of live data"
    );
    let check: serde_json::Value = serde_json::from_slice(
        &env.run(&["check", s(&env.repo()), "--read-data", "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(check["problems"].as_array().unwrap().len(), 0, "{check}");
    for (k, id) in ids[2..].iter().enumerate() {
        let dest = env.path(&format!("r{k}"));
        env.ok(&["restore", s(&env.repo()), id, "--to", s(&dest)]);
        assert_eq!(blake2(&dest.join("disk.img")), hashes[k + 2]);
    }
    // The next backup still diffs against the newest version.
    let v: serde_json::Value = serde_json::from_str(
        env.ok(&[
            "backup",
            s(&env.repo()),
            s(&env.path("disk.img")),
            "--checksum",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(v["files"][0]["literal_bytes"], 0);
}

#[test]
fn forget_then_prune_repacks_a_mostly_dead_pack() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(8 << 20, 1)).unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    // The second version keeps only the last 2 MiB of the first's data.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&pseudo(6 << 20, 2), 0).unwrap();
    drop(f);
    env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    let want = blake2(&img);
    let ids = env.ids();
    env.ok(&["forget", s(&env.repo()), &ids[0][..12]]);
    assert_eq!(env.ids(), vec![ids[1].clone()]);
    let before = objects_bytes(&env);
    let v: serde_json::Value =
        serde_json::from_str(env.ok(&["prune", s(&env.repo()), "--json"]).trim()).unwrap();
    // The data pack, and (format 3) the meta pack the forgotten snapshot's
    // lists mostly filled.
    assert!(v["packs_repacked"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["manifests_rewritten"], 1, "{v}");
    let freed = before - objects_bytes(&env);
    assert_eq!(v["bytes_freed"].as_u64().unwrap(), freed);
    assert!(freed >= 5 << 20, "freed {freed}");
    env.ok(&["check", s(&env.repo()), "--read-data"]);
    env.ok(&[
        "restore",
        s(&env.repo()),
        &ids[1],
        "--to",
        s(&env.path("r")),
    ]);
    assert_eq!(blake2(&env.path("r/disk.img")), want);
}

#[test]
fn prune_removes_what_a_killed_backup_left() {
    let env = Env::new();
    // Format 2: the leftovers include a map file.
    env.ok(&["init", "--format", "2", s(&env.repo())]);
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(2 << 20, 5)).unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    let clean = objects_bytes(&env);
    // Leftovers as a killed backup leaves them: an unreferenced pack and map.
    let pack = std::fs::read_dir(env.repo().join("packs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(
        &pack,
        env.repo().join("packs").join("00000000000000ff.pack"),
    )
    .unwrap();
    let map = std::fs::read_dir(env.repo().join("maps"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(&map, env.repo().join("maps").join("00000000000000fe.map")).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(env.ok(&["prune", s(&env.repo()), "--json"]).trim()).unwrap();
    assert_eq!(v["packs_deleted"], 1);
    assert_eq!(v["maps_deleted"], 1);
    assert_eq!(objects_bytes(&env), clean);
    env.ok(&["check", s(&env.repo()), "--read-data"]);
}
