//! `dsync sync` with a remote side (`SRC/ host:DST/`, `host:SRC/ DST/`),
//! through a fake rsh that runs `dsync serve` here (as rsync's test suite
//! does): the same trees as a local sync, by rsync's judgement; the same
//! items; only deltas on the wire (counted by the rsh, apart from dsync);
//! the server's restricted modes.

use std::path::Path;
use std::process::{Command, Output};

use super::remote::{change_1mib, counting_rsh, fake_rsh};
use super::sync::{change, hard_linked, tree_of_every_kind};
use super::tree::{assert_same, write};
use super::util::*;

/// `dsync sync ARGS` with `rsh` as ssh and this build as the far dsync.
fn far(env: &Env, rsh: &Path, args: &[&str], extra_env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dsync"));
    c.arg("sync")
        .args(args)
        .env("DSYNC_RSH", rsh)
        .env("DSYNC_REMOTE_DSYNC", env!("CARGO_BIN_EXE_dsync"))
        .current_dir(env.dir.path());
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.output().expect("run dsync")
}

#[track_caller]
fn far_ok(env: &Env, rsh: &Path, args: &[&str]) -> String {
    let o = far(env, rsh, args, &[]);
    assert!(
        o.status.success(),
        "dsync sync {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn slash(p: &Path) -> String {
    format!("{}/", s(p))
}

fn host(p: &Path) -> String {
    format!("host:{}", slash(p))
}

/// Itemized lines, hard-link groups left out (see sync.rs), and the line
/// naming DST (its path differs).
fn items(out: &str, linked: &std::collections::BTreeSet<String>) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| !l.starts_with('h') && !l.contains(" => "))
        .filter(|l| !l.starts_with("created directory "))
        .filter(|l| !linked.contains(l.get(12..).unwrap_or("")))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

#[test]
fn a_tree_of_every_kind_pushed_and_pulled_is_what_a_local_sync_makes() {
    if skip_root_test("a tree with device nodes and owners") {
        return;
    }
    let env = Env::new();
    let rsh = fake_rsh(&env, "rsh", None);
    let src = env.path("src");
    tree_of_every_kind(&src);
    let linked = hard_linked(&src);
    let (pushed, pulled, local) = (env.path("pushed"), env.path("pulled"), env.path("local"));
    let a = ["-aHAX", "-i"];
    let l = env.ok(&["sync", a[0], a[1], &slash(&src), &slash(&local)]);
    let p = far_ok(&env, &rsh, &[a[0], a[1], &slash(&src), &host(&pushed)]);
    let q = far_ok(&env, &rsh, &[a[0], a[1], &host(&src), &slash(&pulled)]);
    for d in [&local, &pushed, &pulled] {
        assert_same(&src, d);
    }
    assert_eq!(
        items(&p, &linked),
        items(&l, &linked),
        "push vs local items"
    );
    assert_eq!(
        items(&q, &linked),
        items(&l, &linked),
        "pull vs local items"
    );
    // Nothing to do: nothing itemized.
    assert_eq!(
        far_ok(&env, &rsh, &[a[0], a[1], &slash(&src), &host(&pushed)]),
        ""
    );
    assert_eq!(
        far_ok(&env, &rsh, &[a[0], a[1], &host(&src), &slash(&pulled)]),
        ""
    );

    // Every kind of edit, with --delete, both ways.
    change(&src);
    let args = ["-aHAX", "-i", "-@-1", "--delete"];
    let with = |x: &str, y: &str| -> Vec<String> {
        let mut v = args.to_vec();
        v.push(x);
        v.push(y);
        items(&far_ok(&env, &rsh, &v), &linked)
    };
    let p = with(&slash(&src), &host(&pushed));
    let q = with(&host(&src), &slash(&pulled));
    let mut v = vec!["sync"];
    v.extend_from_slice(&args);
    let (ls, ll) = (slash(&src), slash(&local));
    v.push(&ls);
    v.push(&ll);
    let l = items(&env.ok(&v), &linked);
    for d in [&local, &pushed, &pulled] {
        assert_same(&src, d);
    }
    assert_eq!(p, l, "push vs local items after changes");
    assert_eq!(q, l, "pull vs local items after changes");
}

#[test]
fn sources_without_a_slash_a_single_file_and_a_missing_source() {
    let env = Env::new();
    let rsh = fake_rsh(&env, "rsh", None);
    let a = env.path("a");
    write(&a.join("x"), b"x");
    write(&a.join("sub/y"), b"y");
    // SRC itself into DST, both ways.
    let (d1, d2) = (env.path("d1"), env.path("d2"));
    far_ok(&env, &rsh, &["-a", s(&a), &host(&d1)]);
    assert_same(&a, &d1.join("a"));
    far_ok(&env, &rsh, &["-a", &format!("host:{}", s(&a)), s(&d2)]);
    assert_same(&a, &d2.join("a"));
    // One file to a new name.
    let f = env.path("f");
    far_ok(
        &env,
        &rsh,
        &["-a", &format!("host:{}", s(&a.join("x"))), s(&f)],
    );
    assert_eq!(std::fs::read(&f).unwrap(), b"x");
    let g = env.path("g");
    far_ok(
        &env,
        &rsh,
        &["-a", s(&a.join("sub/y")), &format!("host:{}", s(&g))],
    );
    assert_eq!(std::fs::read(&g).unwrap(), b"y");
    // A source that is not there: 23, as rsync, one line each.
    let o = far(
        &env,
        &rsh,
        &["-a", &format!("host:{}", s(&env.path("none"))), s(&d2)],
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(23), "{err}");
    assert!(err.contains("none: No such file"), "{err}");
    let o = far(&env, &rsh, &["-a", s(&env.path("none")), &host(&d1)], &[]);
    assert_eq!(
        o.status.code(),
        Some(23),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Both sides remote: refused.
    let o = far(&env, &rsh, &["-a", &host(&a), &host(&d1)], &[]);
    assert_eq!(o.status.code(), Some(1));
}

/// Bytes (sent, received) of one `dsync sync` through the counting rsh.
fn counted(env: &Env, rsh: &Path, args: &[&str]) -> (u64, u64) {
    let count = env.path("count");
    let _ = std::fs::remove_file(&count);
    let o = far(env, rsh, args, &[("DSYNC_TEST_COUNT", &count)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&count).unwrap();
    let mut w = text.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    (w.next().unwrap(), w.next().unwrap())
}

#[test]
fn a_changed_image_crosses_as_its_changes_both_ways() {
    let env = Env::new();
    let rsh = counting_rsh(&env);
    let dir = env.path("src");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    make_image(&img, 64 << 20, 5);
    let (pushed, pulled) = (env.path("pushed"), env.path("pulled"));
    counted(&env, &rsh, &["-a", &slash(&dir), &host(&pushed)]);
    counted(&env, &rsh, &["-a", &host(&dir), &slash(&pulled)]);
    change_1mib(&img, 3);
    // The signature of the old image crosses one way (20 bytes a 4 KiB
    // block), the changed blocks compressed the other.
    let sig = (64u64 << 20) / 4096 * 20;
    let limit = (3 << 20) / 2 + (256 << 10);
    // Times to the nanosecond: the change may fall in the second of the
    // first sync (the quick check would skip the image).
    let (sent, received) = counted(&env, &rsh, &["-a", "-@-1", &slash(&dir), &host(&pushed)]);
    assert!(sent <= limit, "push sent {sent} bytes for 1 MiB changed");
    assert!(received <= sig + (64 << 10), "push received {received}");
    assert_same(&dir, &pushed);
    let (sent, received) = counted(&env, &rsh, &["-a", "-@-1", &host(&dir), &slash(&pulled)]);
    assert!(
        received <= limit,
        "pull received {received} bytes for 1 MiB changed"
    );
    assert!(sent <= sig + (64 << 10), "pull sent {sent}");
    assert_same(&dir, &pulled);
}

#[test]
fn inplace_both_ways_writes_the_changes_into_the_same_file() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let env = Env::new();
    let rsh = fake_rsh(&env, "rsh", None);
    let dir = env.path("src");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    make_image(&img, 32 << 20, 8);
    let (pushed, pulled) = (env.path("pushed"), env.path("pulled"));
    far_ok(&env, &rsh, &["-a", &slash(&dir), &host(&pushed)]);
    far_ok(&env, &rsh, &["-a", &host(&dir), &slash(&pulled)]);
    let inodes = |d: &Path| std::fs::metadata(d.join("disk.img")).unwrap().ino();
    let (ino_pushed, ino_pulled) = (inodes(&pushed), inodes(&pulled));
    for round in 0..3u64 {
        change_1mib(&img, 10 + round);
        // The end becomes zeros (a plan ending in zeros the sender does
        // not send).
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&vec![0u8; 12288], (32 << 20) - 12288)
            .unwrap();
        drop(f);
        for (args, d) in [
            (
                [
                    "-a",
                    "-@-1",
                    "--inplace",
                    "--json",
                    &slash(&dir),
                    &host(&pushed),
                ],
                &pushed,
            ),
            (
                [
                    "-a",
                    "-@-1",
                    "--inplace",
                    "--json",
                    &host(&dir),
                    &slash(&pulled),
                ],
                &pulled,
            ),
        ] {
            let out = far_ok(&env, &rsh, &args);
            let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
            assert!(
                v["written_bytes"].as_u64().unwrap() < 3 << 20,
                "{args:?}: {v}"
            );
            assert_same(&dir, d);
        }
    }
    assert_eq!(inodes(&pushed), ino_pushed, "--inplace replaced the file");
    assert_eq!(inodes(&pulled), ino_pulled, "--inplace replaced the file");
}

#[test]
fn a_restricted_server_refuses_what_its_mode_forbids() {
    let env = Env::new();
    let a = env.path("a");
    write(&a.join("x"), b"x");
    let dsync = env!("CARGO_BIN_EXE_dsync");
    let append = fake_rsh(
        &env,
        "append",
        Some(&format!("{dsync} serve --append-only")),
    );
    let read = fake_rsh(&env, "read", Some(&format!("{dsync} serve --read-only")));
    let inside = fake_rsh(
        &env,
        "inside",
        Some(&format!("{dsync} serve --restrict-to-path {}", s(&a))),
    );
    for rsh in [&append, &read] {
        let d = env.path("d");
        let o = far(&env, rsh, &["-a", &slash(&a), &host(&d)], &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("refused"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!d.exists());
    }
    // Reading from them works; outside the restriction it is refused.
    far_ok(&env, &read, &["-a", &host(&a), &slash(&env.path("r"))]);
    assert_same(&a, &env.path("r"));
    far_ok(&env, &inside, &["-a", &host(&a), &slash(&env.path("i"))]);
    let o = far(
        &env,
        &inside,
        &["-a", &host(&env.path("r")), &slash(&env.path("j"))],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("outside"));
}
