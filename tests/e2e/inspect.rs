//! `dsync diff` against known changed ranges, and `dsync du`'s unique bytes
//! against what forget + prune then free.

use std::os::unix::fs::FileExt;

use super::util::*;

#[test]
fn diff_reports_the_written_ranges() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(8 << 20, 1)).unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let written = [(4096u64, 4096u64), (1 << 20, 8192), (5 << 20, 4096)];
    for (at, n) in written {
        f.write_all_at(&pseudo(n as usize, at), at).unwrap();
    }
    drop(f);
    env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    let ids = env.ids();
    let out = env.ok(&[
        "diff",
        s(&env.repo()),
        &ids[0],
        &ids[1],
        "disk.img",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], "changed");
    assert_eq!(v["bytes"], 16384);
    let ranges: Vec<(u64, u64)> = v["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    assert_eq!(
        ranges,
        written.iter().map(|(a, n)| (*a, a + n)).collect::<Vec<_>>()
    );
    let same = env.ok(&["diff", s(&env.repo()), &ids[1], &ids[1], "--json"]);
    assert!(same.contains("\"same\""), "{same}");
}

#[test]
fn du_unique_bytes_match_what_prune_frees() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(6 << 20, 1)).unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    for day in 1..3u64 {
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&pseudo(2 << 20, 10 + day), (day - 1) * (2 << 20))
            .unwrap();
        drop(f);
        env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    }
    let v: serde_json::Value =
        serde_json::from_str(env.ok(&["du", s(&env.repo()), "--json"]).trim()).unwrap();
    let snaps = v["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 3);
    // Day 1 overwrote the first 2 MiB and day 2 the next 2: the first
    // snapshot alone holds the first 2 MiB (day 1 still uses the second),
    // the second snapshot nothing but its manifest and map.
    let unique0 = snaps[0]["unique_bytes"].as_u64().unwrap() as f64;
    assert!(
        (unique0 - (2 << 20) as f64).abs() < 0.05 * (2 << 20) as f64,
        "{v}"
    );
    assert!(snaps[1]["unique_bytes"].as_u64().unwrap() < 4096, "{v}");
    let id0 = snaps[0]["id"].as_str().unwrap().to_string();
    env.ok(&["forget", s(&env.repo()), &id0]);
    let p: serde_json::Value = serde_json::from_str(
        env.ok(&["prune", s(&env.repo()), "--repack-below", "1", "--json"])
            .trim(),
    )
    .unwrap();
    let freed = p["bytes_freed"].as_u64().unwrap() as f64;
    // Forget removed the manifest before prune measured.
    assert!(
        (freed - unique0).abs() < 0.1 * unique0,
        "du said {unique0}, prune freed {freed}"
    );
    env.ok(&["check", s(&env.repo()), "--read-data"]);
}
