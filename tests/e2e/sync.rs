//! `dsync sync` through the binary, with rsync itself as the oracle: after
//! `dsync sync -aHAX [--delete] SRC/ DST/`, `rsync -anciHAX --delete SRC/
//! DST/` must print nothing; `dsync sync -n -i` must list what `rsync -n
//! -i` lists for the same pair. Then rsync's meanings (trailing slashes,
//! --delete with excludes, --max-delete, exit codes), the safety rules
//! (an empty or failing SRC deletes nothing, -n changes nothing, a symlink
//! in DST is never written through), crashes (SIGKILL at random moments,
//! plain and --inplace: every file old or new) and resuming a big file.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::tree::{
    add_every_kind, assert_same, mkdirs, python_lib, rsync_diff, show, tool, touch, write,
};
use super::util::*;

/// `dsync sync ARGS... --json`, its summary (the last line); exit code
/// `code`.
fn sync_json(env: &Env, args: &[&str], code: i32) -> Value {
    let mut a = vec!["sync", "--json"];
    a.extend_from_slice(args);
    let o = env.run(&a);
    assert_eq!(
        o.status.code(),
        Some(code),
        "dsync {a:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let last = out.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{out:?}: {e}"))
}

/// `dsync sync ARGS...`, required to succeed; its stdout.
fn sync(env: &Env, args: &[&str]) -> String {
    let mut a = vec!["sync"];
    a.extend_from_slice(args);
    env.ok(&a)
}

fn slash(p: &Path) -> String {
    format!("{}/", s(p))
}

/// The itemized lines of `rsync ARGS` and `dsync sync ARGS`, as sets,
/// with the lines where the formats differ by design left out: names of
/// hard-link groups under `linked` (rsync sends another name of a group
/// first).
fn items_both(env: &Env, args: &[&str]) -> (BTreeSet<String>, BTreeSet<String>) {
    items_except(env, args, &BTreeSet::new())
}

fn items_except(
    env: &Env,
    args: &[&str],
    linked: &BTreeSet<String>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let keep = |out: String| -> BTreeSet<String> {
        out.lines()
            .filter(|l| !l.starts_with('h') && !l.contains(" => "))
            .filter(|l| !linked.contains(l.get(12..).unwrap_or("")))
            .map(str::to_string)
            .collect()
    };
    let r = keep(tool("rsync", args));
    let mut a = vec!["sync"];
    a.extend_from_slice(args);
    let d = keep(env.ok(&a));
    (r, d)
}

/// Paths (from `root`, as rsync prints them when plain) of regular files
/// with several names.
pub(super) fn hard_linked(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let r = format!("{rel}{}", e.file_name().to_string_lossy());
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                walk(&e.path(), &format!("{r}/"), out);
            } else if m.is_file() && m.nlink() > 1 {
                out.insert(r);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, "", &mut out);
    out
}

/// Rolls a file back from the journal an interrupted `--inplace` left
/// beside it, reading the journal as its documentation in
/// store/src/sync/inplace.rs says (not with dsync's code).
fn roll_back(dir: &Path, name: &str) {
    let Ok(j) = std::fs::read(dir.join(format!(".{name}.dsync-journal"))) else {
        return;
    };
    let u = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap());
    if j.len() < 24 || &j[..8] != b"DSYNCJ2\n" {
        return;
    }
    let old_size = u(&j[8..]);
    // The records are one zstd frame; a frame cut short decodes to less.
    let mut body = Vec::new();
    let _ = std::io::Read::read_to_end(&mut zstd::Decoder::new(&j[24..]).unwrap(), &mut body);
    let (j, mut at) = (body, 0);
    let mut records = Vec::new();
    let mut ended = false;
    while at + 16 <= j.len() {
        let (off, len) = (u(&j[at..]), u(&j[at + 8..]) as usize);
        if at + 16 + len + 8 > j.len() {
            break;
        }
        if off == u64::MAX {
            ended = true;
            break;
        }
        records.push((off, j[at + 16..at + 16 + len].to_vec()));
        at += 16 + len + 8;
    }
    if !ended {
        // Cut before its end: the file was not touched.
        return;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(name))
        .unwrap();
    f.set_len(old_size).unwrap();
    for (off, data) in records {
        f.write_all_at(&data, off).unwrap();
    }
}

/// Every file under `root` by path: its BLAKE2 (or its kind).
fn contents(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.insert(r.clone(), "dir".into());
                walk(&p, &r, out);
            } else if m.is_file() {
                out.insert(r, blake2(&p));
            } else {
                out.insert(r, format!("{:o}", m.mode()));
            }
        }
    }
    walk(root, "", &mut out);
    out
}

/// Edits of every kind to a tree made by `tree_of_every_kind`.
pub(super) fn change(t: &Path) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(t.join("data/image.raw"))
        .unwrap();
    f.write_all_at(&pseudo(8192, 91), 3 << 20).unwrap();
    drop(f);
    write(&t.join("data/small.txt"), b"changed, and of another size");
    std::fs::remove_file(t.join("data/gone.txt")).unwrap();
    std::fs::rename(t.join("data/old-name"), t.join("data/new-name")).unwrap();
    std::fs::remove_file(t.join("data/f2d")).unwrap();
    write(&t.join("data/f2d/inside"), b"a file became a directory");
    std::fs::remove_dir_all(t.join("data/d2f")).unwrap();
    write(&t.join("data/d2f"), b"a directory became a file");
    std::fs::set_permissions(
        t.join("data/mode"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    touch(&t.join("data/touched"), "2022-02-02 02:02:02.5");
    std::fs::remove_file(t.join("data/link")).unwrap();
    std::os::unix::fs::symlink("elsewhere", t.join("data/link")).unwrap();
}

/// Real files of the machine and every kind of node, plus files `change`
/// edits.
pub(super) fn tree_of_every_kind(t: &Path) {
    mkdirs(t);
    tool(
        "cp",
        &["-a", s(&python_lib().join("json")), s(&t.join("py"))],
    );
    add_every_kind(&t.join("kinds"));
    let d = t.join("data");
    mkdirs(&d);
    make_image(&d.join("image.raw"), 8 << 20, 90);
    write(&d.join("small.txt"), b"small");
    write(&d.join("gone.txt"), b"will be deleted");
    write(&d.join("old-name"), &pseudo(50_000, 92));
    write(&d.join("f2d"), b"will become a directory");
    write(&d.join("d2f/child"), b"its directory becomes a file");
    write(&d.join("mode"), b"mode");
    write(&d.join("touched"), b"touched");
    std::os::unix::fs::symlink("target", d.join("link")).unwrap();
}

#[test]
fn a_tree_of_every_kind_syncs_as_rsync_sees_it_and_itemizes_as_rsync_does() {
    if skip_root_test("a tree with device nodes and owners") {
        return;
    }
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    tree_of_every_kind(&src);
    let linked = hard_linked(&src);
    // Into a DST that does not exist yet.
    let (r, d) = items_except(
        &env,
        &["-n", "-i", "-aHAX", &slash(&src), &slash(&dst)],
        &linked,
    );
    assert!(!std::fs::exists(&dst).unwrap(), "-n created DST");
    assert_eq!(d, r, "dsync sync -n -i (right) vs rsync -n -i (left)");
    sync(&env, &["-aHAX", &slash(&src), &slash(&dst)]);
    assert_same(&src, &dst);
    // Nothing to do: nothing itemized.
    assert_eq!(sync(&env, &["-aHAX", "-i", &slash(&src), &slash(&dst)]), "");

    change(&src);
    let before = contents(&dst);
    // The edits fall in the second of the first sync: times compared to
    // the nanosecond (rsync's -@-1), or the quick check of both misses the
    // in-place edit of the image.
    let (r, d) = items_except(
        &env,
        &[
            "-n",
            "-i",
            "-aHAX",
            "-@-1",
            "--delete",
            &slash(&src),
            &slash(&dst),
        ],
        &linked,
    );
    assert_eq!(d, r, "dsync sync -n -i (right) vs rsync -n -i (left)");
    assert_eq!(contents(&dst), before, "-n changed DST");
    let v = sync_json(
        &env,
        &["-aHAX", "-@-1", "--delete", &slash(&src), &slash(&dst)],
        0,
    );
    assert_same(&src, &dst);
    // The 8 MiB image: 8 KiB changed, the rest from the old file.
    assert!(
        v["matched_bytes"].as_u64().unwrap() >= (8 << 20) - (64 << 10),
        "{v}"
    );
    assert!(v["deleted"].as_u64().unwrap() >= 3, "{v}");
}

#[test]
fn trailing_slashes_several_sources_and_a_file_to_a_new_name() {
    let env = Env::new();
    let a = env.path("a");
    write(&a.join("x"), b"x");
    write(&a.join("sub/y"), b"y");
    let b = env.path("b");
    write(&b.join("z"), b"z");
    // SRC without a slash: SRC itself inside DST (DST made).
    let d1 = env.path("d1");
    sync(&env, &["-a", s(&a), s(&d1)]);
    assert_same(&a, &d1.join("a"));
    // With a slash: the contents.
    let d2 = env.path("d2");
    sync(&env, &["-a", &slash(&a), s(&d2)]);
    assert_same(&a, &d2);
    // Several sources into one directory.
    let d3 = env.path("d3");
    sync(&env, &["-a", s(&a), s(&b), s(&d3)]);
    assert_same(&a, &d3.join("a"));
    assert_same(&b, &d3.join("b"));
    // One file to a new name; to a directory.
    let f = env.path("f");
    sync(&env, &["-a", s(&a.join("x")), s(&f)]);
    assert_eq!(std::fs::read(&f).unwrap(), b"x");
    sync(&env, &["-a", s(&a.join("x")), &slash(&d3)]);
    assert_eq!(std::fs::read(d3.join("x")).unwrap(), b"x");
    // Without -r a directory is skipped (with a warning), as rsync does.
    let d4 = env.path("d4");
    let o = env.run(&["sync", s(&a), s(&d4)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("skipping directory"));
    assert!(!std::fs::exists(d4.join("a")).unwrap());
}

#[test]
fn delete_spares_excluded_names_and_max_delete_stops_with_25() {
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    write(&src.join("keep"), b"k");
    write(&src.join("sub/keep2"), b"k");
    for n in ["extra1", "extra2", "sub/extra3", "cache.tmp", "sub/x.tmp"] {
        write(&dst.join(n), b"e");
    }
    write(&dst.join("olddir/a/b"), b"e");
    // Excluded names are protected from --delete, as in rsync.
    let args = [
        "-n",
        "-i",
        "-a",
        "--delete",
        "--exclude",
        "*.tmp",
        &slash(&src),
        &slash(&dst),
    ];
    let (r, d) = items_both(&env, &args);
    assert_eq!(d, r);
    sync(
        &env,
        &[
            "-a",
            "--delete",
            "--exclude",
            "*.tmp",
            &slash(&src),
            &slash(&dst),
        ],
    );
    assert!(dst.join("cache.tmp").exists() && dst.join("sub/x.tmp").exists());
    assert!(!dst.join("extra1").exists() && !dst.join("olddir").exists());
    // --delete-excluded removes them.
    sync(
        &env,
        &[
            "-a",
            "--delete-excluded",
            "--exclude",
            "*.tmp",
            &slash(&src),
            &slash(&dst),
        ],
    );
    assert_same(&src, &dst);
    // --max-delete: two deletions made, the rest refused with 25.
    for n in ["m1", "m2", "m3", "m4"] {
        write(&dst.join(n), b"e");
    }
    let v = sync_json(
        &env,
        &[
            "-a",
            "--delete",
            "--max-delete",
            "2",
            &slash(&src),
            &slash(&dst),
        ],
        25,
    );
    assert_eq!(v["deleted"], 2, "{v}");
    assert_eq!(v["delete_skipped"], 2, "{v}");
}

#[test]
fn include_and_exclude_rules_keep_rsyncs_order() {
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    for n in [
        "a.txt",
        "b.bin",
        "d/c.txt",
        "d/e.bin",
        "d/f/g.txt",
        "top.txt",
    ] {
        write(&src.join(n), n.as_bytes());
    }
    mkdirs(&dst);
    for rules in [
        vec!["--include", "*/", "--include", "*.txt", "--exclude", "*"],
        vec![
            "--exclude",
            "/top.txt",
            "--include",
            "*.txt",
            "--exclude",
            "*.bin",
        ],
        vec![
            "--filter", "- d/f/", "--filter", "+ *.txt", "--filter", "- *",
        ],
    ] {
        let mut args = vec!["-n", "-i", "-a"];
        args.extend_from_slice(&rules);
        let (a, b) = (slash(&src), slash(&dst));
        args.push(&a);
        args.push(&b);
        let (r, d) = items_both(&env, &args);
        assert_eq!(d, r, "rules {rules:?}");
    }
}

#[test]
fn an_empty_source_never_empties_the_destination_without_force_delete() {
    let env = Env::new();
    let (src, dst) = (env.path("empty"), env.path("dst"));
    mkdirs(&src);
    write(&dst.join("precious"), b"years of photos");
    let err = env.fails(&["sync", "-a", "--delete", &slash(&src), &slash(&dst)], 1);
    assert!(err.contains("--force-delete"), "{err}");
    assert!(dst.join("precious").exists());
    sync(
        &env,
        &[
            "-a",
            "--delete",
            "--force-delete",
            &slash(&src),
            &slash(&dst),
        ],
    );
    assert!(!dst.join("precious").exists());
}

#[test]
fn a_source_that_cannot_be_read_stops_every_deletion() {
    if skip_root_test("switching to an unprivileged user") {
        return;
    }
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    write(&src.join("ok"), b"ok");
    write(&src.join("locked/inside"), b"x");
    write(&dst.join("extra"), b"e");
    write(&dst.join("locked/inside"), b"x");
    tool("chmod", &["-R", "a+rwX", s(env.dir.path())]);
    tool("chmod", &["000", s(&src.join("locked"))]);
    let o = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_dsync"))
        .args(["sync", "-r", "--delete", &slash(&src), &slash(&dst)])
        .output()
        .expect("setpriv (util-linux)");
    tool("chmod", &["755", s(&src.join("locked"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(23), "{err}");
    assert!(err.contains("skipping file deletion"), "{err}");
    assert!(dst.join("extra").exists(), "deleted after a read error");
}

#[test]
fn symlinks_in_the_destination_are_replaced_never_followed() {
    let env = Env::new();
    let (src, dst, outside) = (env.path("src"), env.path("dst"), env.path("outside"));
    write(&outside.join("victim"), b"must stay");
    write(&src.join("dir/victim"), b"from src");
    write(&src.join("file"), b"from src");
    mkdirs(&dst);
    std::os::unix::fs::symlink(&outside, dst.join("dir")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), dst.join("file")).unwrap();
    sync(&env, &["-a", &slash(&src), &slash(&dst)]);
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"must stay");
    assert!(std::fs::symlink_metadata(dst.join("dir")).unwrap().is_dir());
    assert!(std::fs::symlink_metadata(dst.join("file"))
        .unwrap()
        .is_file());
    assert_same(&src, &dst);
}

/// The old and new states of a tree for crash tests: an image with
/// scattered edits and some small files.
fn crash_states(env: &Env) -> (PathBuf, PathBuf) {
    let (old, new) = (env.path("old"), env.path("new"));
    mkdirs(&old);
    make_image(&old.join("disk.img"), 48 << 20, 7);
    for k in 0..40 {
        write(&old.join(format!("small/{k}")), &pseudo(10_000, k));
    }
    write(&old.join("shifted"), &pseudo(3 << 20, 8));
    // Old times: the quick check (whole seconds, as rsync's) tells the
    // new files from them.
    tool(
        "sh",
        &[
            "-c",
            &format!("find {} -exec touch -h -d 2020-01-01 {{}} +", s(&old)),
        ],
    );
    tool("cp", &["-a", s(&old), s(&new)]);
    change_image(&new.join("disk.img"), 1, 200);
    // An insertion: the in-place order must move data up.
    let mut ins = pseudo(3 << 20, 8);
    ins.splice(1000..1000, pseudo(5000, 9));
    write(&new.join("shifted"), &ins);
    for k in 0..40 {
        write(
            &new.join(format!("small/{k}")),
            &pseudo(10_000 + k as usize, 100 + k),
        );
    }
    (old, new)
}

#[test]
fn a_sync_killed_at_random_moments_leaves_each_file_old_or_new() {
    let env = Env::new();
    let (old, new) = crash_states(&env);
    let (olds, news) = (contents(&old), contents(&new));
    let mut seed = 12345u64;
    for inplace in [false, true] {
        for round in 0..6 {
            let dst = env.path(&format!("dst-{inplace}-{round}"));
            tool("cp", &["-a", s(&old), s(&dst)]);
            let mut args = vec!["sync", "-a"];
            if inplace {
                args.push("--inplace");
            }
            let (a, b) = (slash(&new), slash(&dst));
            args.push(&a);
            args.push(&b);
            let mut child = Command::new(env!("CARGO_BIN_EXE_dsync"))
                .args(&args)
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            std::thread::sleep(Duration::from_micros(2_000 + (seed >> 33) % 60_000));
            let _ = child.kill();
            let _ = child.wait();
            // What an in-place run was writing is rolled back from its
            // journal (the next sync does it; here the test does, by the
            // documented format), then every file is its old or its new
            // contents.
            if inplace {
                for (path, _) in contents(&dst) {
                    let p = dst.join(&path);
                    if let (Some(d), Some(n)) = (p.parent(), p.file_name()) {
                        roll_back(d, &n.to_string_lossy());
                    }
                }
            }
            for (path, got) in contents(&dst) {
                if path.contains(".dsync-") || path.starts_with('.') || path.contains("/.") {
                    continue;
                }
                let ok = olds.get(&path) == Some(&got) || news.get(&path) == Some(&got);
                assert!(
                    ok,
                    "{path} is neither old nor new after a kill (inplace {inplace})"
                );
            }
            // The next sync completes.
            let mut args = vec!["sync", "-a", "--delete"];
            if inplace {
                args.push("--inplace");
            }
            args.push(&a);
            args.push(&b);
            env.ok(&args);
            assert_same(&new, &dst);
        }
    }
}

#[test]
fn an_interrupted_big_file_resumes_without_reading_again_what_was_written() {
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    write(&src.join("big"), &pseudo(192 << 20, 4));
    mkdirs(&dst);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args(["sync", "-a", &slash(&src), &slash(&dst)])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = dst.join(".big.dsync-partial.ckpt");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ckpt.exists() {
        assert!(Instant::now() < deadline, "no checkpoint was written");
        std::thread::sleep(Duration::from_micros(300));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!dst.join("big").exists(), "finished before the kill");
    let v = sync_json(&env, &["-a", &slash(&src), &slash(&dst)], 0);
    assert_eq!(blake2(&dst.join("big")), blake2(&src.join("big")));
    let read = v["read_bytes"].as_u64().unwrap();
    assert!(
        read <= (192 << 20) - (12 << 20),
        "the resumed sync read {read} bytes of 192 MiB: {v}"
    );
    assert!(!ckpt.exists() && !dst.join(".big.dsync-partial").exists());
    assert_eq!(show(&rsync_diff(&src, &dst, &[])), "");
}

#[test]
fn inplace_writes_only_the_changed_blocks() {
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    mkdirs(&dst);
    make_image(&dst.join("disk.img"), 64 << 20, 11);
    touch(&dst.join("disk.img"), "2024-01-01");
    tool("cp", &["-a", s(&dst), s(&src)]);
    // 50 scattered 4 KiB writes.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(src.join("disk.img"))
        .unwrap();
    for k in 0..50u64 {
        f.write_all_at(&pseudo(4096, 500 + k), (k * 1_300_007) & !4095)
            .unwrap();
    }
    drop(f);
    let changed = changed_bytes(&src.join("disk.img"), &dst.join("disk.img"));
    let ino = std::fs::metadata(dst.join("disk.img")).unwrap().ino();
    let v = sync_json(&env, &["-a", "--inplace", &slash(&src), &slash(&dst)], 0);
    assert_same(&src, &dst);
    assert_eq!(std::fs::metadata(dst.join("disk.img")).unwrap().ino(), ino);
    let written = v["written_bytes"].as_u64().unwrap();
    assert!(
        written <= 50 * 4096 && changed > 40 * 4000,
        "{written} bytes written for {changed} changed: {v}"
    );
    // The kernel's count too (GNU time's %O: write_bytes of /proc/PID/io in
    // 512-byte units, the journal included), not only dsync's: 200 KiB
    // more changed in one run, against the 64 MiB a rewrite writes. In one
    // run because the page cache counts a whole (large) folio dirtied by
    // the first byte written into it: here 50 scattered 4 KiB pwrites by
    // any program count ~65 MB.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(src.join("disk.img"))
        .unwrap();
    f.write_all_at(&pseudo(50 * 4096, 700), 32 << 20).unwrap();
    drop(f);
    let o = Command::new("/usr/bin/time")
        .args(["-f", "%O", "-o", s(&env.path("time.out"))])
        .arg(env!("CARGO_BIN_EXE_dsync"))
        .args([
            "sync",
            "-a",
            "-@-1",
            "--inplace",
            &slash(&src),
            &slash(&dst),
        ])
        .output()
        .expect("/usr/bin/time (the time package; scripts/setup.sh installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&src, &dst);
    let blocks: u64 = std::fs::read_to_string(env.path("time.out"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        blocks * 512 <= 8 << 20,
        "the kernel counted {} bytes written for 200 KiB changed",
        blocks * 512
    );
}

/// An XFS file system with reflinks in a loop file, mounted at `dir`
/// (root), unmounted when dropped.
struct Xfs(PathBuf);

impl Xfs {
    fn new(env: &Env) -> Xfs {
        let img = env.path("xfs.img");
        let dir = env.path("xfs");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        tool("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", s(&img)]);
        mkdirs(&dir);
        tool("mount", &["-o", "loop", s(&img), s(&dir)]);
        Xfs(dir)
    }

    /// Bytes in use, as the file system counts them.
    fn used(&self) -> u64 {
        let out = tool("df", &["-B1", "--output=used", s(&self.0)]);
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn on_xfs_unchanged_ranges_are_cloned_not_written() {
    if skip_root_test("mounting an XFS loop file") {
        return;
    }
    let env = Env::new();
    let fs = Xfs::new(&env);
    let (src, dst) = (fs.0.join("src"), fs.0.join("dst"));
    mkdirs(&src);
    mkdirs(&dst);
    let data = pseudo(64 << 20, 21);
    write(&dst.join("disk.img"), &data);
    touch(&dst.join("disk.img"), "2024-01-01");
    let mut new = data;
    for k in 0..20usize {
        let at = (k * 3_000_000) & !4095;
        new[at..at + 4096].copy_from_slice(&pseudo(4096, 100 + k as u64));
    }
    write(&src.join("disk.img"), &new);
    tool("sync", &[]);
    let before = fs.used();
    let v = sync_json(&env, &["-a", &slash(&src), &slash(&dst)], 0);
    tool("sync", &[]);
    assert_same(&src, &dst);
    // SRC and DST on one file system: both the old file's ranges and
    // SRC's are clones, so the new file takes (almost) no new space.
    let grew = fs.used().saturating_sub(before);
    assert!(
        grew < 4 << 20,
        "the 64 MiB file took {grew} new bytes on XFS: {v}"
    );
}
