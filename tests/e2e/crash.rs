//! Kill -9 at random moments: backups of a changing image and prunes in the
//! middle of a repack. Afterwards `check --read-data` is clean, every snapshot
//! that was made restores byte for byte, and the next backup and prune work.
//! DSYNC_KILLS sets the number of killed backups (default 50; scripts/crash-loop
//! runs 500).

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::util::*;

fn kill_after(args: &[&str], delay: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let st = child.wait().unwrap();
    st.success()
}

fn verify_all(env: &Env, hashes: &HashMap<String, String>, tag: &str) {
    verify(env, hashes, tag, usize::MAX)
}

/// Check --read-data, then restore the `newest` newest snapshots.
fn verify(env: &Env, hashes: &HashMap<String, String>, tag: &str, newest: usize) {
    let o = env.run(&["check", s(&env.repo()), "--read-data", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{tag}: {v}");
    let ids = env.ids();
    for id in ids.iter().rev().take(newest) {
        let want = hashes
            .get(id)
            .unwrap_or_else(|| panic!("{tag}: snapshot {id} appeared from nowhere"));
        let dest = env.path(&format!("v-{tag}-{id}"));
        env.ok(&["restore", s(&env.repo()), id, "--to", s(&dest)]);
        assert_eq!(
            &blake2(&dest.join("disk.img")),
            want,
            "{tag}: snapshot {id} differs"
        );
        std::fs::remove_dir_all(&dest).unwrap();
    }
}

#[test]
fn backups_killed_at_random_moments() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(32 << 20, 1)).unwrap();
    let kills: u64 = std::env::var("DSYNC_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut hashes: HashMap<String, String> = HashMap::new();
    let mut known = 0;
    for k in 0..kills {
        // A day's changes: scattered writes and one larger region.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        for w in 0..8u64 {
            let at =
                (pseudo(8, k * 100 + w)[0] as u64 * 131_071 + w * 3_999_971) % ((32 << 20) - 4096);
            f.write_all_at(&pseudo(4096, k * 1000 + w), at & !4095)
                .unwrap();
        }
        f.write_all_at(&pseudo(1 << 20, 7_000 + k), (k % 30) << 20)
            .unwrap();
        drop(f);
        let h = blake2(&img);
        let delay = Duration::from_millis(pseudo(8, 99 + k)[0] as u64 % 120);
        let done = kill_after(&["backup", "-q", s(&env.repo()), s(&img)], delay);
        // The first backup creates the repository: killed before its
        // config is written, it leaves none (`list` says so, and the
        // next backup creates it again).
        let ids = if known == 0 && !env.repo().join("config").exists() {
            assert!(!done, "kill {k}: a backup that ended left no repository");
            let err = env.fails(&["list", s(&env.repo())], 1);
            assert!(err.contains("not a dsync repository"), "{err}");
            Vec::new()
        } else {
            env.ids()
        };
        assert!(
            ids.len() == known || ids.len() == known + 1,
            "kill {k}: {} snapshots, {known} before",
            ids.len()
        );
        if ids.len() == known + 1 {
            let new = ids
                .iter()
                .find(|i| !hashes.contains_key(*i))
                .unwrap()
                .clone();
            hashes.insert(new, h);
            known += 1;
        } else {
            assert!(!done);
        }
        if k % 10 == 9 {
            verify(&env, &hashes, &format!("after kill {k}"), 3);
        }
    }
    verify_all(&env, &hashes, "end");
    eprintln!("{kills} backups killed at random moments: {known} had completed, the rest left no snapshot; check --read-data clean, every snapshot restored byte-identical");
    assert!(
        known > 0 && (known as u64) < kills,
        "kills landed nowhere interesting: {known} of {kills} backups completed"
    );
    // The repository goes on: a backup, then a prune of the garbage.
    env.ok(&["backup", "-q", s(&env.repo()), s(&img), "--checksum"]);
    let id = env
        .ids()
        .into_iter()
        .find(|i| !hashes.contains_key(i))
        .unwrap();
    hashes.insert(id, blake2(&img));
    env.ok(&["prune", s(&env.repo()), "-q"]);
    verify_all(&env, &hashes, "after prune");
}

#[test]
fn prune_killed_mid_repack() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(24 << 20, 3)).unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    let mut hashes: HashMap<String, String> = HashMap::new();
    for k in 0..12u64 {
        // Overwrite three quarters: the previous version's pack goes mostly dead.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&pseudo(18 << 20, 50 + k), (k % 2) * (6 << 20))
            .unwrap();
        drop(f);
        env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
        let ids = env.ids();
        let newest = ids.last().unwrap().clone();
        hashes.insert(newest.clone(), blake2(&img));
        // Forget all but the newest, then kill the prune at a random moment.
        let old: Vec<&str> = ids
            .iter()
            .filter(|i| **i != newest)
            .map(|i| i.as_str())
            .collect();
        let repo = env.repo();
        let mut args = vec!["forget", s(&repo)];
        args.extend(old);
        env.ok(&args);
        hashes.retain(|id, _| *id == newest);
        let delay = Duration::from_millis(pseudo(8, 500 + k)[0] as u64 % 60);
        kill_after(&["prune", s(&env.repo()), "-q"], delay);
        verify_all(&env, &hashes, &format!("prune kill {k}"));
    }
    env.ok(&["prune", s(&env.repo()), "-q"]);
    verify_all(&env, &hashes, "final prune");
}

#[test]
fn a_dead_writers_lock_is_taken_over_with_a_warning() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(64 << 20, 9)).unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&pseudo_path(&env))]);
    // A clean run leaves no record: no warning.
    let o = env.run(&["backup", "-q", s(&env.repo()), s(&img)]);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("took over"));
    // A writer killed while holding the lock leaves its record behind.
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args(["backup", "-q", s(&env.repo()), s(&img), "--checksum"])
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while std::fs::read_to_string(env.repo().join("lock"))
        .unwrap_or_default()
        .is_empty()
    {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let o = env.run(&["backup", "-q", s(&env.repo()), s(&img), "--checksum"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("took over") && err.contains(&format!("pid={}", child.id())),
        "{err}"
    );
}

fn pseudo_path(env: &Env) -> std::path::PathBuf {
    let p = env.path("small.img");
    std::fs::write(&p, pseudo(4096, 1)).unwrap();
    p
}
