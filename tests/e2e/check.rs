//! `dsync check`: clean repositories pass; each kind of damage is named with
//! the snapshot, file and byte ranges it affects, and exits 3.

use std::os::unix::fs::FileExt;

use super::util::*;

fn two_snapshots(env: &Env) -> Vec<String> {
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(3 << 20, 1)).unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&pseudo(8192, 2), 1 << 20).unwrap();
    drop(f);
    env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    env.ids()
}

fn report(env: &Env, read_data: bool) -> (i32, serde_json::Value) {
    let repo = env.repo();
    let mut args = vec!["check", s(&repo), "--json"];
    if read_data {
        args.push("--read-data");
    }
    let o = env.run(&args);
    let v = serde_json::from_slice(&o.stdout).expect("json report");
    (o.status.code().unwrap_or(-1), v)
}

#[test]
fn clean_repository_passes() {
    let env = Env::new();
    two_snapshots(&env);
    for rd in [false, true] {
        let (code, v) = report(&env, rd);
        assert_eq!(code, 0, "{v}");
        assert_eq!(v["snapshots"], 2);
        assert_eq!(v["problems"].as_array().unwrap().len(), 0);
    }
    let (_, v) = report(&env, true);
    assert!(v["frames_read"].as_u64().unwrap() > 0);
    assert_eq!(v["bytes_verified"], 2 * (3 << 20));
    assert!(env.ok(&["check", s(&env.repo())]).contains("no problems"));
}

#[test]
fn flipped_frame_byte_is_found_with_its_ranges() {
    let env = Env::new();
    let ids = two_snapshots(&env);
    // The first snapshot's pack holds the whole first version.
    let first_pack = {
        let mut packs: Vec<_> = std::fs::read_dir(env.repo().join("packs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
        packs.pop().unwrap()
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&first_pack)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 2 << 20).unwrap();
    f.write_all_at(&[!b[0]], 2 << 20).unwrap();
    drop(f);
    // Structure alone does not read frames.
    assert_eq!(report(&env, false).0, 0);
    let (code, v) = report(&env, true);
    assert_eq!(code, 3);
    let probs = v["problems"].as_array().unwrap();
    assert!(!probs.is_empty());
    for p in probs {
        assert_eq!(p["file"], "disk.img");
        let snaps = p["snapshot"].as_str().unwrap();
        // The damaged frame is shared by both versions (unchanged there).
        assert!(snaps.contains(&ids[0]) || snaps.contains(&ids[1]), "{p}");
        let r = p["ranges"].as_array().unwrap();
        assert_eq!(r.len(), 1);
        let (a, z) = (r[0][0].as_u64().unwrap(), r[0][1].as_u64().unwrap());
        assert!(a <= 2 << 20 && z > a && z - a <= 64 << 10, "range {a}-{z}");
    }
    let out = env.run(&["check", s(&env.repo()), "--read-data"]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("damaged:") && text.contains("disk.img") && text.contains("bytes "),
        "{text}"
    );
}

#[test]
fn missing_pack_and_damaged_manifest_are_named() {
    let env = Env::new();
    let ids = two_snapshots(&env);
    let packs: Vec<_> = std::fs::read_dir(env.repo().join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let victim = packs
        .iter()
        .min_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
        .clone();
    std::fs::remove_file(&victim).unwrap();
    let (code, v) = report(&env, false);
    assert_eq!(code, 3);
    let name = victim
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches(".pack")
        .to_string();
    let p = &v["problems"][0];
    assert!(p["object"].as_str().unwrap().contains(&name), "{v}");
    assert_eq!(p["snapshot"].as_str().unwrap(), ids[1]);
    assert_eq!(p["ranges"][0][0], 1 << 20);

    let env = Env::new();
    let ids = two_snapshots(&env);
    let m = env
        .repo()
        .join("snapshots")
        .join(format!("{}.snap", ids[0]));
    let mut b = std::fs::read(&m).unwrap();
    b[30] ^= 1;
    std::fs::write(&m, b).unwrap();
    let (code, v) = report(&env, true);
    assert_eq!(code, 3);
    assert!(
        v["problems"][0]["object"]
            .as_str()
            .unwrap()
            .contains(&ids[0]),
        "{v}"
    );
}

#[test]
fn read_data_subsets_cover_everything() {
    let env = Env::new();
    two_snapshots(&env);
    let (_, full) = report(&env, true);
    let mut frames = 0;
    for k in 1..=3 {
        let part = format!("{k}/3");
        let o = env.run(&[
            "check",
            s(&env.repo()),
            "--read-data-subset",
            &part,
            "--json",
        ]);
        assert_eq!(o.status.code(), Some(0));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        frames += v["frames_read"].as_u64().unwrap();
    }
    assert_eq!(frames, full["frames_read"].as_u64().unwrap());
    let o = env.run(&["check", s(&env.repo()), "--read-data-subset", "4/3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a subset"));
}
