//! A repository written by an older release: tests/fixtures/format2-repo,
//! made by dsync 0.2.0 as tests/fixtures/make-format2.sh records. Today's
//! dsync lists, checks, restores, cats, mounts, extends and prunes it, and
//! every file it serves matches the BLAKE2b-256 that `b2sum -l 256` computed
//! from the originals when the fixture was made (format2-repo.expected), so
//! neither side of the comparison comes from dsync.
//!
//! The tests work on copies: the committed bytes are never written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::mount::{skip as skip_fuse, Mount};
use super::util::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format2-repo");
const EXPECTED: &str = include_str!("../fixtures/format2-repo.expected");

/// The directories of a repository (store/FORMAT.md, "Layout"); git keeps
/// no empty one, so the copy recreates them.
const DIRS: [&str; 5] = ["packs", "sigs", "maps", "snapshots", "tmp"];

/// What each snapshot holds, by Unix time (seconds): file name -> (size, hash).
fn expected() -> BTreeMap<i64, BTreeMap<String, (u64, String)>> {
    let mut out: BTreeMap<i64, BTreeMap<String, (u64, String)>> = BTreeMap::new();
    for line in EXPECTED.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 4, "format2-repo.expected: {line}");
        out.entry(f[0].parse().unwrap())
            .or_default()
            .insert(f[1].to_string(), (f[2].parse().unwrap(), f[3].to_string()));
    }
    assert_eq!(out.len(), 3, "three snapshots expected");
    out
}

/// Every file of the committed fixture with its bytes.
fn fixture_files() -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(Path::new(FIXTURE), &mut out);
    out
}

/// Copies the fixture to `env.repo()`. Returns the fixture's files as they
/// were, for [`unchanged`].
fn copy_fixture(env: &Env) -> BTreeMap<PathBuf, Vec<u8>> {
    let files = fixture_files();
    assert!(files.contains_key(&Path::new(FIXTURE).join("config")));
    for (p, bytes) in &files {
        let dest = env.repo().join(p.strip_prefix(FIXTURE).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(dest, bytes).unwrap();
    }
    for d in DIRS {
        std::fs::create_dir_all(env.repo().join(d)).unwrap();
    }
    files
}

fn unchanged(before: &BTreeMap<PathBuf, Vec<u8>>) {
    assert!(
        fixture_files() == *before,
        "the committed fixture {FIXTURE} was modified"
    );
}

/// (Unix seconds, id) of each snapshot, oldest first.
fn snapshots(env: &Env) -> Vec<(i64, String)> {
    env.ok(&["list", s(&env.repo()), "--json"])
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let ns = v["time_unix_ns"].as_i64().unwrap();
            assert_eq!(ns % 1_000_000_000, 0, "{l}");
            (ns / 1_000_000_000, v["id"].as_str().unwrap().to_string())
        })
        .collect()
}

fn check_clean(env: &Env) {
    let out = env.ok(&["check", s(&env.repo()), "--read-data"]);
    assert!(out.contains("no problems"), "{out}");
}

/// Restores snapshot `id` into a new directory `name` and requires exactly
/// the files of `want`, each with its size and hash.
fn restores_as(env: &Env, id: &str, want: &BTreeMap<String, (u64, String)>, name: &str) {
    let dest = env.path(name);
    env.ok(&["restore", s(&env.repo()), id, "--to", s(&dest)]);
    let mut got: Vec<String> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    got.sort();
    assert_eq!(got, want.keys().cloned().collect::<Vec<_>>(), "{id}");
    for (file, (size, hash)) in want {
        let p = dest.join(file);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), *size, "{id} {file}");
        assert_eq!(&blake2(&p), hash, "snapshot {id} file {file} restored");
    }
}

fn blake2_of(bytes: &[u8]) -> String {
    blake2b_simd::Params::new()
        .hash_length(32)
        .hash(bytes)
        .to_hex()
        .to_string()
}

#[test]
fn format2_fixture_lists_checks_restores_and_cats() {
    let env = Env::new();
    let before = copy_fixture(&env);
    let want = expected();

    let snaps = snapshots(&env);
    let times: Vec<i64> = snaps.iter().map(|(t, _)| *t).collect();
    assert_eq!(times, want.keys().copied().collect::<Vec<_>>());
    check_clean(&env);
    for (k, (t, id)) in snaps.iter().enumerate() {
        restores_as(&env, id, &want[t], &format!("restored{k}"));
    }

    let (t0, first) = &snaps[0];
    let o = env.run(&["cat", s(&env.repo()), first, "disk.img"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout.len() as u64, want[t0]["disk.img"].0);
    assert_eq!(blake2_of(&o.stdout), want[t0]["disk.img"].1, "cat");
    let (t2, _) = &snaps[2];
    let o = env.run(&["cat", s(&env.repo()), "latest", "notes.txt"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(blake2_of(&o.stdout), want[t2]["notes.txt"].1, "cat");
    unchanged(&before);
}

#[test]
fn format2_fixture_takes_a_backup_and_prunes() {
    let env = Env::new();
    let before = copy_fixture(&env);
    let want = expected();

    // The newest version, changed in a few blocks, backed up as the next day.
    let src = env.path("src");
    env.ok(&["restore", s(&env.repo()), "latest", "--to", s(&src)]);
    let img = src.join("disk.img");
    let mut data = std::fs::read(&img).unwrap();
    for b in [0usize, 7, 150, 255] {
        data[b * 4096..(b + 1) * 4096].copy_from_slice(&pseudo(4096, b as u64));
    }
    std::fs::write(&img, &data).unwrap();
    env.ok(&[
        "backup",
        "-q",
        s(&env.repo()),
        s(&img),
        s(&src.join("notes.txt")),
        "--time",
        "@1714788000",
    ]);
    let mut now = want[&1714701600].clone();
    now.insert("disk.img".into(), (data.len() as u64, blake2_of(&data)));
    let snaps = snapshots(&env);
    assert_eq!(snaps.len(), 4);
    assert_eq!(snaps[3].0, 1714788000);
    restores_as(&env, &snaps[3].1, &now, "new");
    check_clean(&env);

    env.ok(&["prune", "-q", s(&env.repo()), "--keep-last", "2"]);
    check_clean(&env);
    let kept = snapshots(&env);
    assert_eq!(kept, snaps[2..].to_vec(), "prune --keep-last 2");
    restores_as(&env, &kept[0].1, &want[&1714701600], "kept0");
    restores_as(&env, &kept[1].1, &now, "kept1");
    unchanged(&before);
}

#[test]
fn format2_fixture_mounts() {
    if skip_fuse() {
        return;
    }
    let env = Env::new();
    let before = copy_fixture(&env);
    let want = expected();
    let m = Mount::new(&env, &[]);
    let dirs = m.snapshot_dirs();
    assert_eq!(dirs.len(), 3);
    for (dir, files) in dirs.iter().zip(want.values()) {
        let mut got: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        got.sort();
        assert_eq!(got, files.keys().cloned().collect::<Vec<_>>(), "{dir:?}");
        for (file, (size, hash)) in files {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            assert_eq!(bytes.len() as u64, *size, "{dir:?} {file}");
            assert_eq!(&blake2_of(&bytes), hash, "{dir:?} {file} through the mount");
        }
    }
    m.unmount();
    unchanged(&before);
}
