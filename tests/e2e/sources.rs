//! Sources other than a plain file: a pipe (--stdin), a block device (a loop device set up by
//! the test; needs root, DSYNC_SKIP_ROOT=1 skips), and snapshot times given
//! with --time.

use std::os::unix::fs::FileExt;
use std::process::Command;

use super::util::*;

#[test]
fn block_device_backup_restores_and_deltas() {
    if skip_root_test("block device") {
        return;
    }
    let env = Env::new();
    let backing = env.path("backing.img");
    std::fs::write(&backing, pseudo(16 << 20, 4)).unwrap();
    let lo = LoopDevice::attach(&backing);
    let dev = lo.0.clone();
    let v: serde_json::Value = serde_json::from_str(
        env.ok(&[
            "backup",
            s(&env.repo()),
            &dev,
            "--name",
            "disk.raw",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(v["files"][0]["size"], 16 << 20);
    assert_eq!(v["files"][0]["name"], "disk.raw");
    // Write through the device, as a VM would, and back up again: a delta.
    {
        let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        f.write_all_at(&pseudo(8192, 5), 1 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let v: serde_json::Value = serde_json::from_str(
        env.ok(&[
            "backup",
            s(&env.repo()),
            &dev,
            "--name",
            "disk.raw",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(v["files"][0]["reused"], false, "a device is always read");
    assert!(v["files"][0]["literal_bytes"].as_u64().unwrap() <= 8192);
    assert!(v["bytes_added"].as_u64().unwrap() < 200_000, "{v}");
    env.ok(&[
        "restore",
        s(&env.repo()),
        "latest",
        "--to",
        s(&env.path("out")),
    ]);
    let restored = env.path("out/disk.raw");
    assert!(std::fs::metadata(&restored).unwrap().is_file());
    assert_eq!(blake2(&restored), blake2(std::path::Path::new(&dev)));
    assert_eq!(blake2(&restored), blake2(&backing));
}

#[test]
fn time_sets_the_snapshot_time() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(4096, 1)).unwrap();
    env.ok(&[
        "backup",
        "-q",
        s(&env.repo()),
        s(&img),
        "--time",
        "2024-05-01T03:00:00",
    ]);
    env.ok(&[
        "backup",
        "-q",
        s(&env.repo()),
        s(&img),
        "--time",
        "2024-05-02T03:00:00",
        "--checksum",
    ]);
    let list = env.ok(&["list", s(&env.repo()), "--json"]);
    let times: Vec<String> = list
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["time"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(times, vec!["2024-05-01T03:00:00", "2024-05-02T03:00:00"]);
    env.ok(&[
        "restore",
        s(&env.repo()),
        "2024-05-01",
        "--to",
        s(&env.path("day1")),
    ]);
    let o = env.run(&["backup", s(&env.repo()), s(&img), "--time", "yesterday"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn dsync_repo_and_dash_r_stand_for_repo() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(1 << 20, 2)).unwrap();
    let run = |envvar: Option<&std::path::Path>, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_dsync"));
        c.args(args)
            .current_dir(env.dir.path())
            .env_remove("DSYNC_REPO");
        if let Some(r) = envvar {
            c.env("DSYNC_REPO", r);
        }
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let repo = env.repo();
    run(Some(&repo), &["backup", "-q", s(&img)]);
    run(
        None,
        &["-r", s(&repo), "backup", "-q", s(&img), "--checksum"],
    );
    let list = run(Some(&repo), &["list", "--json"]);
    assert_eq!(list.lines().count(), 2);
    run(
        Some(&repo),
        &["restore", "latest", "--to", s(&env.path("out"))],
    );
    assert_eq!(blake2(&env.path("out/disk.img")), blake2(&img));
    run(None, &["--repo", s(&repo), "check"]);
}

/// Runs `PRODUCER SRC | dsync backup REPO --stdin ARGS...` through a real
/// shell pipe (PRODUCER: `cat`, `head -c N`, ...).
fn pipe(env: &Env, producer: &str, src: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new("sh")
        .args([
            "-c",
            &format!(
                "src=$1 bin=$2 repo=$3; shift 3; {producer} \"$src\" | \"$bin\" backup \"$repo\" --stdin \"$@\""
            ),
            "sh",
        ])
        .arg(src)
        .arg(env!("CARGO_BIN_EXE_dsync"))
        .arg(env.repo())
        .args(args)
        .env_remove("DSYNC_REPO")
        .output()
        .expect("sh")
}

/// `cat SRC | dsync backup REPO --stdin --name NAME --json`, which must
/// succeed; its parsed summary.
fn backup_from_pipe(env: &Env, src: &std::path::Path, name: &str) -> serde_json::Value {
    let o = pipe(env, "cat", src, &["--name", name, "--json"]);
    assert!(
        o.status.success(),
        "backup from a pipe failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).expect("json")
}

#[test]
fn pipe_backup_restores_and_deltas() {
    let env = Env::new();
    let img = env.path("disk.img");
    // Not a multiple of the block size, with holes (zeros in the stream).
    make_image(&img, (40 << 20) + 1234, 11);
    let v0 = env.path("v0");
    std::fs::copy(&img, &v0).unwrap();
    let v = backup_from_pipe(&env, &img, "disk.raw");
    assert_eq!(v["files"][0]["name"], "disk.raw");
    assert_eq!(v["files"][0]["size"], (40 << 20) + 1234);
    assert!(
        v["files"][0]["hole_bytes"].as_u64().unwrap() > 10 << 20,
        "zeros in a stream are stored as holes: {v}"
    );
    change_image(&img, 1, 50);
    let changed = changed_bytes(&v0, &img);
    let v = backup_from_pipe(&env, &img, "disk.raw");
    let added = v["bytes_added"].as_u64().unwrap();
    let literal = v["files"][0]["literal_bytes"].as_u64().unwrap();
    assert!(
        literal <= changed + 64 * 1024,
        "{literal} literal bytes for {changed} changed"
    );
    assert!(added < (40 << 20) / 20, "the second stream is a delta: {v}");
    let ids = env.ids();
    assert_eq!(ids.len(), 2);
    for (id, want) in ids.iter().zip([&v0, &img]) {
        let out = env.path(&format!("out-{id}"));
        env.ok(&["restore", s(&env.repo()), id, "--to", s(&out), "disk.raw"]);
        assert_eq!(blake2(&out), blake2(want), "snapshot {id}");
        let md = std::fs::metadata(&out).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
    }
    // The stream's version can be the base of a file's, and back.
    let file_src = env.path("disk.raw");
    std::fs::copy(&img, &file_src).unwrap();
    let v: serde_json::Value = serde_json::from_str(
        env.ok(&["backup", s(&env.repo()), s(&file_src), "--json"])
            .trim(),
    )
    .unwrap();
    assert_eq!(v["files"][0]["literal_bytes"], 0, "{v}");
    env.ok(&["check", s(&env.repo()), "--read-data"]);
    // --expect-size: a stream that ends early makes no snapshot.
    let before = env.ids().len();
    let size = std::fs::metadata(&img).unwrap().len().to_string();
    let o = pipe(
        &env,
        "head -c 1000000",
        &img,
        &["--name", "disk.raw", "--expect-size", &size],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("ended after 1000000 bytes"), "{err}");
    assert_eq!(env.ids().len(), before, "a short stream made a snapshot");
    let o = pipe(
        &env,
        "cat",
        &img,
        &["--name", "disk.raw", "--expect-size", &size, "-q"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(env.ids().len(), before + 1);
    // Without --name, or with paths too: one line, exit 2.
    let o = env.run(&["backup", s(&env.repo()), "--stdin"]);
    assert_eq!(o.status.code(), Some(2));
    let o = env.run(&["backup", s(&env.repo()), "--stdin", "--name", "x", s(&img)]);
    assert_eq!(o.status.code(), Some(2));
}
