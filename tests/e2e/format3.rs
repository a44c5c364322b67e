//! A format 3 repository (`dsync init --format 3`) through the binary: every
//! version restores byte for byte, check reads everything back, a repacking
//! prune keeps the kept versions whole, a mount serves them, and a file
//! under the signature threshold changes as a whole file.

use std::process::Command;

use super::mount::{skip, Mount};
use super::prune_readers::{prune_repacking, three_days};
use super::util::*;

fn cmp(a: &std::path::Path, b: &std::path::Path) {
    let o = Command::new("cmp").arg(a).arg(b).output().unwrap();
    assert!(
        o.status.success(),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

#[test]
fn a_format_3_repository_backs_up_restores_prunes_and_mounts() {
    let env = Env::new();
    env.ok(&["init", "--format", "3", s(&env.repo())]);
    let orig = three_days(&env);
    // No map or signature objects: everything is in meta packs.
    for d in ["maps", "sigs"] {
        let n = std::fs::read_dir(env.repo().join(d)).unwrap().count();
        assert_eq!(n, 0, "{d}/ holds {n} objects");
    }
    assert!(std::fs::read_dir(env.repo().join("meta")).unwrap().count() > 0);
    // Day d + 1 restores as the original of day d.
    let repo = env.repo();
    let restore_days = |from: usize, tag: &str| {
        for (d, o) in orig.iter().enumerate().skip(from) {
            let to = env.path(&format!("{tag}{d}.img"));
            let day = format!("2024-05-0{}", d + 1);
            env.ok(&["restore", "-q", s(&repo), &day, "--to", s(&to), "disk.img"]);
            cmp(&to, o);
        }
    };
    restore_days(0, "out");
    env.ok(&["check", s(&env.repo()), "--read-data"]);
    prune_repacking(&env);
    env.ok(&["check", s(&env.repo()), "--read-data"]);
    restore_days(1, "pruned");
    if skip() {
        return;
    }
    let m = Mount::new(&env, &[]);
    cmp(&m.dir.join("2024-05-02").join("disk.img"), &orig[1]);
    cmp(&m.dir.join("latest").join("disk.img"), &orig[2]);
    m.unmount();
}

#[test]
fn files_under_8_kib_have_no_signature_and_change_whole() {
    let env = Env::new();
    env.ok(&["init", "--format", "3", s(&env.repo())]);
    let f = env.path("notes.txt");
    let mut text = pseudo(6_000, 3);
    std::fs::write(&f, &text).unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&f)]);
    text[3_000..3_010].copy_from_slice(b"0123456789");
    std::fs::write(&f, &text).unwrap();
    let out = env.ok(&["backup", "--json", s(&env.repo()), s(&f)]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let file = &v["files"][0];
    assert_eq!(file["literal_bytes"].as_u64(), Some(6_000), "{v}");
    let to = env.path("back.txt");
    env.ok(&[
        "restore",
        "-q",
        s(&env.repo()),
        "latest",
        "--to",
        s(&to),
        "notes.txt",
    ]);
    cmp(&to, &f);
    // From 8 KiB on, a file has a signature: a small change is a delta.
    let big = env.path("big.txt");
    let mut text = pseudo(40_000, 4);
    std::fs::write(&big, &text).unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&big)]);
    text[20_000..20_010].copy_from_slice(b"0123456789");
    std::fs::write(&big, &text).unwrap();
    let out = env.ok(&["backup", "--json", s(&env.repo()), s(&big)]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["files"][0]["literal_bytes"].as_u64(), Some(4096), "{v}");
}
