//! Readers that run while prune repacks: a mount (files opened before the
//! prune and files opened after it) and `dsync cat` stopped mid-stream. Every
//! byte they return is compared with the original; a kept snapshot never
//! fails, a forgotten one vanishes from the mount cleanly.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::mount::{skip, Mount};
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
