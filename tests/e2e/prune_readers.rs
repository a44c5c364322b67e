//! Readers that run while prune repacks: a mount (files opened before the
//! prune and files opened after it; a format 3 tree whose directory lists
//! were cached before the prune moved them to a new meta pack) and `dsync
//! cat` stopped mid-stream. Every byte they return is compared with the
//! original; a kept snapshot never fails, a forgotten one vanishes from the
//! mount cleanly.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::mount::{skip, Mount};
use super::tree::{assert_same, chmod, write};
use super::util::*;

/// Three versions of a 24 MiB image; each day rewrites 3/4 of it (day 2
/// from the start, day 3 from 6 MiB), so once the first is forgotten, day
/// 1's pack is mostly dead and prune repacks it, rewriting day 2's map and
/// manifest. Day 2's first 18 MiB come from its own pack: a reader of day 2
/// reaches the repacked pack only past 18 MiB.
pub(super) fn three_days(env: &Env) -> Vec<PathBuf> {
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(24 << 20, 1)).unwrap();
    let mut out = Vec::new();
    for day in 0..3u64 {
        if day > 0 {
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            let at = if day == 1 { 0 } else { 6 << 20 };
            f.write_all_at(&pseudo(18 << 20, 10 + day), at).unwrap();
        }
        let time = format!("2024-05-0{}T03:00:00", day + 1);
        env.ok(&["backup", "-q", "--time", &time, s(&env.repo()), s(&img)]);
        let keep = env.path(&format!("orig{day}.img"));
        std::fs::copy(&img, &keep).unwrap();
        out.push(keep);
    }
    out
}

pub(super) fn prune_repacking(env: &Env) -> serde_json::Value {
    let out = env.ok(&[
        "prune",
        s(&env.repo()),
        "--keep-last",
        "2",
        "--repack-below",
        "0.99",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        v["packs_repacked"].as_u64().unwrap() >= 1
            && v["manifests_rewritten"].as_u64().unwrap() >= 1,
        "the test needs a prune that repacks a kept version's pack: {v}"
    );
    v
}

fn read_all(f: &mut std::fs::File) -> Vec<u8> {
    let mut v = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut v).expect("read through the mount");
    v
}

fn same(got: &[u8], want: &Path, what: &str) {
    let want = std::fs::read(want).unwrap();
    assert!(got == want, "{what}: bytes differ from the original");
}

#[test]
fn a_mount_reads_kept_snapshots_while_prune_repacks() {
    if skip() {
        return;
    }
    let env = Env::new();
    let orig = three_days(&env);
    let m = Mount::new(&env, &[]);
    let day = |d: &str| m.dir.join(d).join("disk.img");
    // Opened and partly read before the prune, read to the end after it.
    let mut day3 = std::fs::File::open(day("2024-05-03")).unwrap();
    let mut head = vec![0u8; 1 << 20];
    day3.read_exact(&mut head).unwrap();
    // Opened before, not read at all before.
    let mut day2 = std::fs::File::open(day("2024-05-02")).unwrap();
    // A forgotten version, opened (not read: no pack of it opened yet)
    // before the prune, read after it.
    let mut day1 = std::fs::File::open(day("2024-05-01")).unwrap();

    prune_repacking(&env);

    same(
        &read_all(&mut day3),
        &orig[2],
        "day 3, opened before the prune",
    );
    same(
        &read_all(&mut day2),
        &orig[1],
        "day 2, opened before the prune",
    );
    same(
        &read_all(&mut day1),
        &orig[0],
        "day 1 (forgotten), opened before the prune",
    );
    drop((day1, day2, day3));
    // Opened after: the mount still holds the replaced manifests.
    for (d, o) in [("2024-05-02", &orig[1]), ("2024-05-03", &orig[2])] {
        let mut f = std::fs::File::open(day(d)).unwrap();
        same(
            &read_all(&mut f),
            o,
            &format!("{d}, opened after the prune"),
        );
        let o = Command::new("cmp").arg(day(d)).arg(o).output().unwrap();
        assert!(o.status.success(), "cmp {d}: {:?}", o);
    }
    // The forgotten snapshot leaves the mount: ENOENT, never EIO.
    let t = Instant::now();
    loop {
        match std::fs::metadata(day("2024-05-01")) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => panic!("the forgotten snapshot gave {e}, not ENOENT"),
            Ok(_) => {
                assert!(t.elapsed() < Duration::from_secs(10), "still listed");
                std::thread::sleep(Duration::from_millis(100));
                // Listing the root refreshes the mount's view.
                let _ = std::fs::read_dir(&m.dir).map(|d| d.count());
            }
        }
    }
    m.unmount();
    env.ok(&["check", s(&env.repo()), "--read-data"]);
}

#[test]
fn cat_survives_a_prune_that_runs_while_it_streams() {
    let env = Env::new();
    let orig = three_days(&env);
    // cat writes into a pipe nobody reads yet: it stops after the pipe's
    // buffer, with its map loaded and most of the file still to read.
    let mut cat = Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args(["cat", s(&env.repo()), "2024-05-02", "disk.img"])
        .env_remove("DSYNC_REPO")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = cat.stdout.take().unwrap();
    let mut got = vec![0u8; 1 << 20];
    out.read_exact(&mut got).unwrap();
    prune_repacking(&env);
    out.read_to_end(&mut got).unwrap();
    let status = cat.wait().unwrap();
    let mut err = String::new();
    cat.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "cat failed during prune: {err}");
    same(&got, &orig[1], "cat of day 2 across the prune");
    // And a restore after it.
    let to = env.path("restored.img");
    env.ok(&[
        "restore",
        "-q",
        s(&env.repo()),
        "2024-05-03",
        "--to",
        s(&to),
        "disk.img",
    ]);
    let o = Command::new("cmp").arg(&to).arg(&orig[2]).output().unwrap();
    assert!(o.status.success(), "restored day 3 differs");
}

/// Writes the nested tree of [`a_mount_walks_a_kept_tree_after_prune_repacks_its_meta_packs`]:
/// `d0..d3/s0..s2` of 40 files each and `flat` of 150, sizes from a few
/// bytes to 24 KiB (signatures from 8 KiB), three modes, mtimes with
/// nanoseconds. Each `d*` directory's list is over 16 KiB, so it is paged:
/// its pages are blobs in a meta pack.
fn nested_tree(src: &Path) {
    let mut n = 0u64;
    let mut file = |p: PathBuf| {
        n += 1;
        write(&p, &pseudo((n as usize * 211) % 24_000 + 1, n));
        let mode = [0o644, 0o600, 0o755][n as usize % 3];
        chmod(&p, mode);
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        let t = std::time::UNIX_EPOCH + Duration::new(1_700_000_000 + n * 61, (n * 7_919) as u32);
        f.set_modified(t).unwrap();
    };
    for d in 0..4 {
        for sub in 0..3 {
            for k in 0..40 {
                file(src.join(format!("d{d}/s{sub}/a-file-with-a-longer-name-{k:03}.dat")));
            }
        }
    }
    for k in 0..150 {
        file(src.join(format!("flat/f{k:03}")));
    }
}

/// Day 2's changes: some files of `d0` rewritten, one added to `d1/s1`,
/// one removed from `d2/s0`, modes changed in `flat`; `d3` as it was, so
/// day 2 still names day 1's pages of it.
fn change_tree(src: &Path) {
    for k in (0..40).step_by(7) {
        let p = src.join(format!("d0/s1/a-file-with-a-longer-name-{k:03}.dat"));
        write(&p, &pseudo(10_000 + k, 99 + k as u64));
    }
    write(&src.join("d1/s1/added"), b"new on day 2");
    std::fs::remove_file(src.join("d2/s0/a-file-with-a-longer-name-005.dat")).unwrap();
    for k in (0..150).step_by(11) {
        chmod(&src.join(format!("flat/f{k:03}")), 0o640);
    }
}

/// Each directory under `mnt` holds the names its counterpart under `src`
/// holds, each with the same type, permissions, mtime (to the nanosecond)
/// and, for files, size; by `readdir` and `lstat` only, no file opened.
/// With `files` false, only directories are looked up: the mount's
/// attributes of a file open its reader (for `st_blocks`), and a reader
/// that finds its data repacked re-reads the snapshot's record on its own,
/// which would hide a directory lookup that does not.
fn same_names_and_attributes(src: &Path, mnt: &Path, files: bool) {
    use std::os::unix::fs::MetadataExt;
    let names = |d: &Path| -> std::collections::BTreeSet<std::ffi::OsString> {
        std::fs::read_dir(d)
            .and_then(|r| r.map(|e| e.map(|e| e.file_name())).collect())
            .unwrap_or_else(|e| panic!("ls {}: {e}", d.display()))
    };
    let want = names(src);
    assert_eq!(want, names(mnt), "the names in {}", mnt.display());
    for n in want {
        let (p, q) = (src.join(&n), mnt.join(&n));
        let a = std::fs::symlink_metadata(&p).unwrap();
        if !files && !a.is_dir() {
            continue;
        }
        let b =
            std::fs::symlink_metadata(&q).unwrap_or_else(|e| panic!("stat {}: {e}", q.display()));
        let size = |m: &std::fs::Metadata| if m.is_file() { m.len() } else { 0 };
        assert_eq!(
            (a.mode(), a.mtime(), a.mtime_nsec(), size(&a)),
            (b.mode(), b.mtime(), b.mtime_nsec(), size(&b)),
            "mode, mtime and size of {}",
            q.display()
        );
        if a.is_dir() {
            same_names_and_attributes(&p, &q, files);
        }
    }
}

fn meta_packs(env: &Env) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(env.repo().join("meta"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// A format 3 mount whose root and directory lists were read before a
/// prune that repacks the meta packs holding them: every path of the kept
/// snapshot, visited before or not, still resolves with the attributes and
/// bytes of the source (rsync is the judge), and a path of the forgotten
/// snapshot answers ENOENT, not EIO.
#[test]
fn a_mount_walks_a_kept_tree_after_prune_repacks_its_meta_packs() {
    if skip() {
        return;
    }
    let env = Env::new();
    env.ok(&["init", "--format", "3", s(&env.repo())]);
    let src = env.path("src");
    nested_tree(&src);
    env.ok(&[
        "backup",
        "-q",
        "--time",
        "2024-05-01T03:00:00",
        s(&env.repo()),
        s(&src),
    ]);
    let day1_metas = meta_packs(&env);
    assert!(!day1_metas.is_empty(), "day 1 wrote no meta pack");
    change_tree(&src);
    env.ok(&[
        "backup",
        "-q",
        "--time",
        "2024-05-02T03:00:00",
        s(&env.repo()),
        s(&src),
    ]);

    let m = Mount::new(&env, &[]);
    let kept = m.dir.join("2024-05-02/src");
    let gone = m.dir.join("2024-05-01/src");
    // Part of each snapshot visited before the prune: its root list and
    // some directory lists and entries are in the mount's caches.
    let ls = |p: &Path| std::fs::read_dir(p).unwrap().count();
    assert_eq!(ls(&kept), 5);
    assert_eq!(ls(&kept.join("d0/s0")), 40);
    for e in std::fs::read_dir(kept.join("d0/s0")).unwrap() {
        let p = e.unwrap().path();
        let name = p.strip_prefix(&kept).unwrap();
        assert!(std::fs::read(&p).unwrap() == std::fs::read(src.join(name)).unwrap());
    }
    std::fs::metadata(kept.join("d1/s1/a-file-with-a-longer-name-003.dat")).unwrap();
    std::fs::read(kept.join("flat/f007")).unwrap();
    assert_eq!(ls(&gone.join("d2")), 3);

    let v: serde_json::Value = serde_json::from_str(
        env.ok(&[
            "prune",
            s(&env.repo()),
            "--keep-last",
            "1",
            "--repack-below",
            "1",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(v["forgotten"].as_array().map(Vec::len), Some(1), "{v}");
    assert!(
        v["packs_repacked"].as_u64() >= Some(1) && v["manifests_rewritten"].as_u64() == Some(1),
        "the test needs a prune that rewrites the kept record: {v}"
    );
    let after = meta_packs(&env);
    assert!(
        day1_metas.iter().all(|p| !after.contains(p)),
        "day 1's meta packs (which day 2 shares) were not repacked: {day1_metas:?} -> {after:?}"
    );

    // The whole kept snapshot: its directories, then every name's
    // attributes, then (rsync) every byte.
    same_names_and_attributes(&src, &kept, false);
    same_names_and_attributes(&src, &kept, true);
    // A path of the forgotten snapshot that was never looked up.
    let e = std::fs::metadata(gone.join("d2/s2/a-file-with-a-longer-name-000.dat"))
        .expect_err("a path of the forgotten snapshot still resolves");
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOENT),
        "forgotten snapshot: {e}"
    );
    assert_same(&src, &kept);
    m.unmount();
}
