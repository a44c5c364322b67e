//! Directory trees (format 3) through the binary, each checked against an
//! oracle that is not dsync: `rsync -anciHAX --modify-window=-1 --delete`
//! between the original (or its `cp -a` copy) and the restore must print
//! nothing, which compares contents, kinds, modes, owners, nanosecond
//! mtimes, hard links, device numbers, xattrs and ACLs. Trees are built
//! from real files of the machine (/usr) and every kind of node; then
//! history, partial restores, planted symlinks at the destination,
//! excludes, and sources that cannot be read or vanish.
//!
//! Tools: rsync, cp, mknod, mkfifo, touch, setpriv, mount (coreutils,
//! util-linux, mount), setfattr (attr) and setfacl (acl);
//! scripts/setup.sh installs them. A missing tool fails the test, naming
//! its package. Tests that make device nodes, change owners or switch user
//! need root (CI runs as root; DSYNC_SKIP_ROOT=1 skips them).

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::util::*;

/// The package a tool comes from, for the message when it is missing.
fn package(prog: &str) -> &'static str {
    match prog {
        "rsync" => "rsync",
        "setfacl" | "getfacl" => "acl",
        "setfattr" | "getfattr" => "attr",
        "setpriv" => "util-linux",
        "mount" | "umount" => "mount",
        "mkfs.xfs" => "xfsprogs",
        _ => "coreutils",
    }
}

/// Runs a tool the test needs and requires success; returns its stdout.
pub(super) fn tool(prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog).args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {prog} ({e}): this test needs it; install the {} package \
             (scripts/setup.sh does)",
            package(prog)
        )
    });
    assert!(
        o.status.success(),
        "{prog} {args:?} failed with {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What rsync would change to make `copy` like `orig` (empty: they are
/// the same), directories compared as their contents.
pub(super) fn rsync_diff(orig: &Path, copy: &Path, extra: &[&str]) -> String {
    let (a, b) = (format!("{}/", s(orig)), format!("{}/", s(copy)));
    let mut args = vec!["-anciHAX", "--modify-window=-1", "--delete"];
    args.extend_from_slice(extra);
    args.push(&a);
    args.push(&b);
    tool("rsync", &args)
}

pub(super) fn show(diff: &str) -> String {
    let lines: Vec<&str> = diff.lines().collect();
    let more = lines.len().saturating_sub(60);
    let mut out = lines[..lines.len().min(60)].join("\n");
    if more > 0 {
        out += &format!("\n... and {more} more lines");
    }
    out
}

/// `copy` is `orig` as rsync sees it (both directories).
#[track_caller]
pub(super) fn assert_same(orig: &Path, copy: &Path) {
    let d = rsync_diff(orig, copy, &[]);
    assert!(
        d.is_empty(),
        "{} differs from {} (rsync -anciHAX --modify-window=-1 --delete, \
         orig/ -> copy/):\n{}",
        copy.display(),
        orig.display(),
        show(&d)
    );
}

/// The file `copy` is the file `orig` as rsync sees it.
#[track_caller]
fn assert_same_file(orig: &Path, copy: &Path) {
    let d = tool(
        "rsync",
        &["-anciHAX", "--modify-window=-1", s(orig), s(copy)],
    );
    assert!(
        d.is_empty(),
        "{} differs from {} (rsync -anciHAX --modify-window=-1):\n{d}",
        copy.display(),
        orig.display()
    );
}

/// `dsync backup --json REPO SRC... EXTRA...`, required to succeed.
fn backup(env: &Env, repo: &Path, srcs: &[&Path], extra: &[&str]) -> Value {
    let mut args = vec!["backup", "--json", s(repo)];
    args.extend(srcs.iter().map(|p| s(p)));
    args.extend_from_slice(extra);
    let out = env.ok(&args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("backup --json {out:?}: {e}"))
}

fn num(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer {field} in {v}"))
}

/// A complete backup: no error, no warning.
#[track_caller]
fn assert_clean(v: &Value) {
    assert_eq!(num(v, "errors"), 0, "{v}");
    assert_eq!(v["incomplete"], false, "{v}");
    assert_eq!(v["warnings"], serde_json::json!([]), "{v}");
}

fn restore(env: &Env, repo: &Path, snap: &str, dest: &Path, extra: &[&str]) -> String {
    let mut args = vec!["restore", "-q", s(repo), snap, "--to", s(dest)];
    args.extend_from_slice(extra);
    env.ok(&args)
}

pub(super) fn mkdirs(p: &Path) {
    std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
}

pub(super) fn write(p: &Path, data: &[u8]) {
    if let Some(d) = p.parent() {
        mkdirs(d);
    }
    std::fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

pub(super) fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Sets the mtime (and atime) of `p` itself, a symlink included.
pub(super) fn touch(p: &Path, when: &str) {
    tool("touch", &["-h", "-d", when, s(p)]);
}

/// Every path under `root` (not `root`), relative, `/`-separated.
fn tree_paths(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            out.insert(r.clone());
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), &r, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, "", &mut out);
    out
}

/// Regular files under `root`, hard links each; distinct inodes; and
/// directories, `root` included.
fn count(root: &Path) -> (u64, u64, u64) {
    fn walk(dir: &Path, files: &mut u64, inodes: &mut HashSet<u64>, dirs: &mut u64) {
        *dirs += 1;
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                walk(&e.path(), files, inodes, dirs);
            } else if md.is_file() {
                *files += 1;
                inodes.insert(md.ino());
            }
        }
    }
    let (mut files, mut inodes, mut dirs) = (0, HashSet::new(), 0);
    walk(root, &mut files, &mut inodes, &mut dirs);
    (files, inodes.len() as u64, dirs)
}

/// Kind, mode, owner, size, mtime, link target and content hash of every
/// node under `root`, `root` included: what must not change.
fn fingerprint(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut paths = vec![root.to_path_buf()];
    while let Some(p) = paths.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let what = if md.is_file() {
            blake2(&p)
        } else if md.file_type().is_symlink() {
            std::fs::read_link(&p).unwrap().display().to_string()
        } else {
            String::new()
        };
        out.push(format!(
            "{} {:o} {}:{} {} {}.{} {}",
            p.display(),
            md.mode(),
            md.uid(),
            md.gid(),
            md.len(),
            md.mtime(),
            md.mtime_nsec(),
            what
        ));
        if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                paths.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

pub(super) fn unix_socket(p: &Path) {
    drop(std::os::unix::net::UnixListener::bind(p).expect("bind a unix socket"));
    assert!(std::fs::symlink_metadata(p).is_ok());
}

/// A sparse file of `size` bytes with 64 KiB of data at each of `at`.
pub(super) fn sparse(p: &Path, size: u64, at: &[u64], seed: u64) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(size).unwrap();
    for (k, &o) in at.iter().enumerate() {
        f.write_all_at(&pseudo(64 << 10, seed + k as u64), o)
            .unwrap();
    }
}

fn allocated(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).unwrap().blocks() * 512
}

/// Every kind of node and attribute a file system keeps, under `k`
/// (needs root: device nodes, owners, trusted xattrs).
pub(super) fn add_every_kind(k: &Path) {
    // Hard links across directories, one of a file read in chunks (over
    // 4 MiB) and one of an empty file.
    write(&k.join("links/a/orig"), &pseudo(20_000, 1));
    mkdirs(&k.join("links/b/c"));
    std::fs::hard_link(k.join("links/a/orig"), k.join("links/b/second")).unwrap();
    std::fs::hard_link(k.join("links/a/orig"), k.join("links/b/c/third")).unwrap();
    write(&k.join("links/big"), &pseudo(5 << 20, 2));
    write(&k.join("links/empty"), b"");
    mkdirs(&k.join("links/z"));
    std::fs::hard_link(k.join("links/big"), k.join("links/z/big-again")).unwrap();
    std::fs::hard_link(k.join("links/empty"), k.join("links/z/empty-again")).unwrap();
    // Symlinks: relative, absolute, dangling, to a directory.
    mkdirs(&k.join("sym"));
    let ln = |target: &str, name: &str| std::os::unix::fs::symlink(target, k.join(name)).unwrap();
    ln("../links/a/orig", "sym/rel");
    ln("/usr/share", "sym/abs");
    ln("no/such/file", "sym/dangling");
    ln("../links", "sym/to-dir");
    touch(&k.join("sym/rel"), "2011-11-11 11:11:11.111111111");
    // Special nodes.
    mkdirs(&k.join("special"));
    tool("mkfifo", &[s(&k.join("special/fifo"))]);
    unix_socket(&k.join("special/sock"));
    tool("mknod", &[s(&k.join("special/null")), "c", "1", "3"]);
    tool("mknod", &[s(&k.join("special/loop200")), "b", "7", "200"]);
    // Modes.
    for (name, mode) in [
        ("suid", 0o4755),
        ("sgid", 0o2755),
        ("zero", 0),
        ("odd", 0o641),
    ] {
        let p = k.join("modes").join(name);
        write(&p, name.as_bytes());
        chmod(&p, mode);
    }
    for (name, mode) in [("sgid-dir", 0o2775), ("sticky-dir", 0o1777)] {
        let p = k.join("modes").join(name);
        write(&p.join("inside"), b"x");
        chmod(&p, mode);
    }
    // Owners: ids no user or group has, and nobody:nogroup; the chown
    // comes before the chmod that sets setuid (a chown clears it).
    let o = k.join("owners");
    write(&o.join("nameless"), b"1234:5678");
    std::os::unix::fs::chown(o.join("nameless"), Some(1234), Some(5678)).unwrap();
    write(&o.join("nobody"), b"65534");
    std::os::unix::fs::chown(o.join("nobody"), Some(65534), Some(65534)).unwrap();
    write(&o.join("suid-nameless"), b"setuid 1234");
    std::os::unix::fs::chown(o.join("suid-nameless"), Some(1234), Some(5678)).unwrap();
    chmod(&o.join("suid-nameless"), 0o6750);
    write(&o.join("dir/root-file"), b"in a directory of 1234");
    let dir = o.join("dir");
    std::os::unix::fs::chown(&dir, Some(1234), Some(5678)).unwrap();
    tool(
        "setfattr",
        &["-n", "user.root", "-v", "of a subtree", s(&dir)],
    );
    tool("setfacl", &["-m", "g:5678:r-x", s(&dir)]);
    chmod(&dir, 0o2751);
    touch(&dir, "2012-12-12 12:12:12.121212121");
    std::os::unix::fs::symlink("nameless", o.join("link")).unwrap();
    std::os::unix::fs::lchown(o.join("link"), Some(1234), Some(5678)).unwrap();
    tool("mkfifo", &[s(&o.join("fifo"))]);
    std::os::unix::fs::chown(o.join("fifo"), Some(1234), Some(5678)).unwrap();
    // Extended attributes and ACLs.
    let a = k.join("attrs");
    write(&a.join("file"), b"with xattrs");
    tool("setfattr", &["-n", "user.a", "-v", "1", s(&a.join("file"))]);
    tool(
        "setfattr",
        &["-n", "user.bin", "-v", "0x00ff10fe", s(&a.join("file"))],
    );
    let big = format!("0x{}", "ab".repeat(3000));
    tool(
        "setfattr",
        &["-n", "user.big", "-v", &big, s(&a.join("file"))],
    );
    mkdirs(&a.join("dir"));
    tool(
        "setfattr",
        &["-n", "user.d", "-v", "dir", s(&a.join("dir"))],
    );
    write(&a.join("acl"), b"with an ACL");
    tool(
        "setfacl",
        &["-m", "u:1234:rw-,g:5678:r--", s(&a.join("acl"))],
    );
    mkdirs(&a.join("acl-dir"));
    tool(
        "setfacl",
        &["-m", "u:1234:rwx,d:u:1234:r-x", s(&a.join("acl-dir"))],
    );
    write(&a.join("acl-dir/inherits"), b"default ACL");
    std::os::unix::fs::symlink("file", a.join("link")).unwrap();
    tool(
        "setfattr",
        &[
            "-h",
            "-n",
            "trusted.dsync",
            "-v",
            "on-a-link",
            s(&a.join("link")),
        ],
    );
    // Names: not UTF-8, and characters a shell or a parser could trip on.
    let n = k.join("names");
    mkdirs(&n);
    for name in [
        &b"caf\xe9"[..],
        b"\xff\xfe",
        "sp ace".as_bytes(),
        b"new\nline",
        b"-dash",
        "\u{fc}tf8".as_bytes(),
        b"back\\slash",
    ] {
        std::fs::write(n.join(OsStr::from_bytes(name)), name).unwrap();
    }
    // Sparse files: one read in chunks, one small.
    mkdirs(&k.join("sparse"));
    sparse(&k.join("sparse/big"), 64 << 20, &[0, 32 << 20], 10);
    sparse(
        &k.join("sparse/small"),
        3 << 20,
        &[0, (3 << 20) - (64 << 10)],
        20,
    );
    // An empty directory; old times with nanoseconds, one before 1970.
    mkdirs(&k.join("empty"));
    write(&k.join("old/f"), b"old");
    touch(&k.join("old/f"), "1999-12-31 23:59:59.123456789");
    write(&k.join("old/before-1970"), b"older");
    touch(&k.join("old/before-1970"), "1965-06-01 12:00:00.25");
    touch(&k.join("old"), "2001-09-09 01:46:40.987654321");
}

/// The first `/usr/lib/python3.N` directory.
pub(super) fn python_lib() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("python3."))
        })
        .collect();
    dirs.sort();
    dirs.into_iter()
        .next()
        .expect("no /usr/lib/python3.N: install python3 (scripts/setup.sh does)")
}

#[test]
fn real_files_and_every_kind_of_node_restore_as_rsync_sees_them() {
    if skip_root_test("every-kind tree (device nodes, owners)") {
        return;
    }
    let env = Env::new();
    let tree = env.path("tree");
    mkdirs(&tree);
    tool("cp", &["-a", "/usr/share/doc", s(&tree.join("doc"))]);
    tool("cp", &["-a", s(&python_lib()), s(&tree.join("python"))]);
    let (usr_files, _, _) = count(&tree);
    assert!(
        usr_files >= 2000,
        "only {usr_files} files in /usr/share/doc and {}: the test wants thousands",
        python_lib().display()
    );
    add_every_kind(&tree.join("kinds"));
    let sp = tree.join("kinds/sparse");
    for f in ["big", "small"] {
        let n = allocated(&sp.join(f));
        assert!(
            n <= 1 << 20,
            "the test's own sparse file {f} takes {n} bytes: no holes on this file system"
        );
    }
    let repo = env.repo();
    let v = backup(&env, &repo, &[&tree], &[]);
    assert_clean(&v);
    let (files, _, dirs) = count(&tree);
    assert_eq!(num(&v, "tree_files"), files, "{v}");
    assert_eq!(num(&v, "tree_dirs"), dirs, "{v}");

    let out = env.path("out");
    restore(&env, &repo, "latest", &out, &[]);
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        1,
        "DEST holds tree/ only"
    );
    assert_same(&tree, &out.join("tree"));
    for f in ["big", "small"] {
        let p = out.join("tree/kinds/sparse").join(f);
        let n = allocated(&p);
        assert!(
            n <= 1 << 20,
            "restored {f} is not sparse: {n} bytes allocated"
        );
    }
    // By stored ids rather than names: the same here.
    let out2 = env.path("numeric");
    restore(&env, &repo, "latest", &out2, &["--numeric-ids"]);
    assert_same(&tree, &out2.join("tree"));
}

/// A small tree for the history: files of several sizes, most with old
/// mtimes, so that what the next backup reads depends on what changed.
fn history_tree(h: &Path) {
    write(&h.join("docs/readme"), &pseudo(3000, 1));
    write(&h.join("docs/guide"), &pseudo(50_000, 2));
    write(&h.join("data/big.bin"), &pseudo(6 << 20, 3));
    write(&h.join("data/same.bin"), &pseudo(100_000, 4));
    write(&h.join("src/a.rs"), &pseudo(7000, 5));
    write(&h.join("src/b.rs"), &pseudo(9000, 6));
    write(&h.join("src/lib/c.rs"), &pseudo(11_000, 7));
    write(&h.join("gone/x"), &pseudo(1000, 8));
    write(&h.join("gone/y"), &pseudo(2000, 9));
    write(&h.join("gone/sub/z"), &pseudo(3000, 10));
    write(&h.join("f2d"), b"a file, then a directory");
    write(&h.join("d2f/inner"), &pseudo(4000, 11));
    write(&h.join("d2f/deeper/x"), &pseudo(5000, 12));
    write(&h.join("modefile"), &pseudo(6000, 13));
    write(&h.join("target"), &pseudo(8000, 14));
    for f in ["data/same.bin", "modefile", "target", "docs/readme"] {
        touch(&h.join(f), "2020-01-01 12:00:00.5");
    }
}

#[test]
fn history_every_snapshot_restores_its_state_and_unchanged_files_are_not_read() {
    let env = Env::new();
    let repo = env.repo();
    let h = env.path("h");
    history_tree(&h);
    type Change = fn(&Path);
    let changes: [(&str, Change); 7] = [
        ("initial", |_| {}),
        ("edits in the middle", |h| {
            // Bytes inserted: the size changes.
            let p = h.join("data/big.bin");
            let mut d = std::fs::read(&p).unwrap();
            let mid = d.len() / 2;
            d.splice(mid..mid, pseudo(1000, 99));
            std::fs::write(&p, d).unwrap();
            // Bytes overwritten, size and mtime put back: only the ctime
            // tells.
            let p = h.join("data/same.bin");
            let before = std::fs::metadata(&p).unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all_at(&pseudo(4096, 98), 50_000).unwrap();
            drop(f);
            touch(&p, "2020-01-01 12:00:00.5");
            let after = std::fs::metadata(&p).unwrap();
            assert_eq!(
                (
                    before.len(),
                    before.mtime(),
                    before.mtime_nsec(),
                    before.ino()
                ),
                (after.len(), after.mtime(), after.mtime_nsec(), after.ino())
            );
        }),
        ("renames", |h| {
            std::fs::rename(h.join("src/a.rs"), h.join("src/renamed.rs")).unwrap();
            std::fs::rename(h.join("src/b.rs"), h.join("docs/b.rs")).unwrap();
        }),
        ("a directory deleted", |h| {
            std::fs::remove_dir_all(h.join("gone")).unwrap();
        }),
        ("a file becomes a directory and a directory a file", |h| {
            std::fs::remove_file(h.join("f2d")).unwrap();
            write(&h.join("f2d/child"), b"now a directory");
            std::fs::remove_dir_all(h.join("d2f")).unwrap();
            write(&h.join("d2f"), b"now a file");
        }),
        ("a mode only", |h| chmod(&h.join("modefile"), 0o600)),
        ("a hard link added, a file written", |h| {
            std::fs::hard_link(h.join("target"), h.join("data/target-link")).unwrap();
            write(&h.join("fresh.txt"), &pseudo(2500, 15));
        }),
    ];
    let mut states = Vec::new();
    let mut last_change = Instant::now();
    for (k, (what, change)) in changes.iter().enumerate() {
        change(&h);
        last_change = Instant::now();
        let state = env.path(&format!("state{k}"));
        tool("cp", &["-a", s(&h), s(&state)]);
        let v = backup(&env, &repo, &[&h], &[]);
        assert_clean(&v);
        assert_eq!(num(&v, "tree_files"), count(&h).0, "{what}: {v}");
        states.push(state);
    }
    let ids = env.ids();
    assert_eq!(ids.len(), states.len());
    for (k, (id, state)) in ids.iter().zip(&states).enumerate() {
        let out = env.path(&format!("out{k}"));
        restore(&env, &repo, id, &out, &[]);
        assert_same(state, &out.join("h"));
    }

    // fresh.txt was backed up within 2 s of its write: the next backup
    // reads it again even though nothing changed; once past that window,
    // an unchanged tree reads nothing.
    let wait = Duration::from_millis(2200).saturating_sub(last_change.elapsed());
    std::thread::sleep(wait);
    let a = backup(&env, &repo, &[&h], &[]);
    assert!(
        num(&a, "tree_files_read") >= 1,
        "a file written just before the last backup was not read again: {a}"
    );
    let b = backup(&env, &repo, &[&h], &[]);
    assert_clean(&b);
    let (files, inodes, _) = count(&h);
    assert_eq!(num(&b, "tree_files"), files, "{b}");
    assert_eq!(
        num(&b, "tree_files_read"),
        0,
        "unchanged tree read again: {b}"
    );
    assert_eq!(num(&b, "bytes_read"), 0, "{b}");
    let out = env.path("unchanged");
    restore(&env, &repo, "latest", &out, &[]);
    assert_same(states.last().unwrap(), &out.join("h"));
    // --checksum reads every file once (a hard link's data is its first
    // name's).
    let c = backup(&env, &repo, &[&h], &["--checksum"]);
    assert_eq!(num(&c, "tree_files_read"), inodes, "{c}");
    assert_eq!(num(&c, "tree_bytes"), num(&b, "tree_bytes"), "{c}");
    let out = env.path("checksum");
    restore(&env, &repo, "latest", &out, &[]);
    assert_same(states.last().unwrap(), &out.join("h"));
}

#[test]
fn hard_links_restore_whichever_directory_holds_the_first_name() {
    let env = Env::new();
    let repo = env.repo();
    let t = env.path("t");
    let link = |a: &str, b: &str| {
        mkdirs(t.join(b).parent().unwrap());
        std::fs::hard_link(t.join(a), t.join(b)).unwrap();
    };
    // The first name (in walk order: depth first, names sorted) in the
    // parent of the second's directory, in a sibling directory before it,
    // in a subdirectory of a sibling while the second is at the top, and a
    // file read in chunks (over 4 MiB).
    write(&t.join("f"), b"first in the parent");
    link("f", "sub/g");
    write(&t.join("a/x"), b"first in a sibling");
    link("a/x", "b/y");
    write(&t.join("m/deep/p"), b"first deeper");
    link("m/deep/p", "q");
    write(&t.join("big"), &pseudo(5 << 20, 1));
    link("big", "sub/big-again");
    assert_clean(&backup(&env, &repo, &[&t], &[]));
    let out = env.path("out");
    restore(&env, &repo, "latest", &out, &[]);
    assert_same(&t, &out.join("t"));
}

#[test]
fn an_unchanged_hard_linked_file_keeps_all_its_names() {
    let env = Env::new();
    let repo = env.repo();
    let t = env.path("t");
    write(&t.join("a"), b"three names");
    std::fs::hard_link(t.join("a"), t.join("b")).unwrap();
    write(&t.join("big"), &pseudo(5 << 20, 2));
    mkdirs(&t.join("sub"));
    std::fs::hard_link(t.join("big"), t.join("sub/big-again")).unwrap();
    std::fs::hard_link(t.join("a"), t.join("sub/c")).unwrap();
    // Old mtimes: nothing is read again for being recent.
    for f in ["a", "big"] {
        touch(&t.join(f), "2019-05-05 05:05:05.5");
    }
    let v = backup(&env, &repo, &[&t], &[]);
    assert_clean(&v);
    assert_eq!(num(&v, "tree_files_read"), 2, "{v}");
    // Nothing changed: nothing is read, and every name is kept.
    let v = backup(&env, &repo, &[&t], &[]);
    assert_clean(&v);
    assert_eq!(num(&v, "tree_files"), 5, "{v}");
    assert_eq!(num(&v, "tree_files_read"), 0, "{v}");
    let out = env.path("out");
    restore(&env, &repo, "latest", &out, &[]);
    assert_same(&t, &out.join("t"));
}

/// Replaces `t` by a `cp -a` copy of itself: same sizes and mtimes, new
/// inodes and ctimes.
fn recopy(t: &Path) {
    let tmp = t.with_extension("copy");
    tool("cp", &["-a", s(t), s(&tmp)]);
    std::fs::remove_dir_all(t).unwrap();
    std::fs::rename(&tmp, t).unwrap();
}

#[test]
fn ignore_inode_and_ignore_ctime_reuse_a_copied_tree() {
    let env = Env::new();
    let repo = env.repo();
    let t = env.path("t");
    for k in 0..12u64 {
        let p = t.join(format!("d{}/f{k}", k % 3));
        write(&p, &pseudo(1000 + k as usize * 3000, k));
        touch(&p, "2021-03-04 05:06:07.891");
    }
    let n = count(&t).0;
    assert_eq!(num(&backup(&env, &repo, &[&t], &[]), "tree_files_read"), n);
    // New inodes and ctimes: everything is read again...
    recopy(&t);
    let v = backup(&env, &repo, &[&t], &[]);
    assert_eq!(num(&v, "tree_files_read"), n, "{v}");
    // ...also without the inode, as the ctime changed too...
    recopy(&t);
    let v = backup(&env, &repo, &[&t], &["--ignore-inode"]);
    assert_eq!(num(&v, "tree_files_read"), n, "{v}");
    // ...but not without both.
    recopy(&t);
    let v = backup(&env, &repo, &[&t], &["--ignore-inode", "--ignore-ctime"]);
    assert_eq!(num(&v, "tree_files_read"), 0, "{v}");
    // A mode change moves only the ctime: under --ignore-ctime the file is
    // not read, yet the snapshot has its new mode.
    chmod(&t.join("d1/f4"), 0o600);
    let v = backup(&env, &repo, &[&t], &["--ignore-ctime"]);
    assert_eq!(num(&v, "tree_files_read"), 0, "{v}");
    let out = env.path("out");
    restore(&env, &repo, "latest", &out, &[]);
    assert_same(&t, &out.join("t"));
}

/// A snapshot of [`add_every_kind`] at `t`, in `env.repo()`.
fn every_kind_snapshot(env: &Env) -> PathBuf {
    let t = env.path("t");
    add_every_kind(&t);
    assert_clean(&backup(env, &env.repo(), &[&t], &[]));
    t
}

#[test]
fn restore_of_a_subtree_into_a_directory() {
    if skip_root_test("partial restore (device nodes, owners)") {
        return;
    }
    let env = Env::new();
    let repo = env.repo();
    let t = every_kind_snapshot(&env);
    // Into an existing directory: DEST/<name>, and nothing else. links/b
    // holds two names of a file whose first name (links/a/orig) is outside
    // the subtree.
    for sub in ["links/b", "attrs", "owners", "special", "links"] {
        let into = env.path(&format!("into-{}", sub.replace('/', "-")));
        mkdirs(&into);
        restore(&env, &repo, "latest", &into, &[&format!("t/{sub}")]);
        let name = Path::new(sub).file_name().unwrap();
        let top: Vec<_> = std::fs::read_dir(&into)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(top, [name], "restore of t/{sub} into {}", into.display());
        assert_same(&t.join(sub), &into.join(name));
    }
}

#[test]
fn restore_of_a_subtree_to_a_new_directory_makes_it_that_directory() {
    if skip_root_test("partial restore (device nodes, owners)") {
        return;
    }
    let env = Env::new();
    let repo = env.repo();
    let t = every_kind_snapshot(&env);
    // DEST does not exist: it becomes the subtree's directory, as with
    // `cp -a t/owners/dir DEST`, its owner, mode, xattrs, ACL and mtime
    // included.
    for sub in ["owners/dir", "attrs", "modes/sticky-dir"] {
        let new = env.path(&format!("new-{}", sub.replace('/', "-")));
        restore(&env, &repo, "latest", &new, &[&format!("t/{sub}")]);
        assert_same(&t.join(sub), &new);
    }
}

#[test]
fn restore_of_one_file_keeps_its_owner_mode_xattrs_and_acl() {
    if skip_root_test("partial restore (device nodes, owners)") {
        return;
    }
    let env = Env::new();
    let repo = env.repo();
    let t = every_kind_snapshot(&env);
    // Into a directory: DEST/<name>.
    let one = env.path("one");
    mkdirs(&one);
    for f in [
        "sparse/big",
        "old/before-1970",
        "attrs/file",
        "attrs/acl",
        "owners/nameless",
        "owners/suid-nameless",
    ] {
        restore(&env, &repo, "latest", &one, &[&format!("t/{f}")]);
        let name = Path::new(f).file_name().unwrap();
        assert_same_file(&t.join(f), &one.join(name));
    }
    assert!(
        allocated(&one.join("big")) <= 1 << 20,
        "one-file restore is not sparse"
    );
    // To a new file name.
    let file = env.path("renamed");
    restore(&env, &repo, "latest", &file, &["t/attrs/file"]);
    assert_same_file(&t.join("attrs/file"), &file);
}

/// A small tree for the planted-symlink tests.
fn plain_tree(t: &Path) {
    write(&t.join("dir/inner.txt"), b"inner");
    write(&t.join("dir/sub/deep.txt"), b"deep");
    write(&t.join("file.txt"), b"the snapshot's file");
    write(&t.join("hard.txt"), b"the snapshot's hard.txt");
    write(&t.join("other/x.txt"), b"x");
}

/// Files outside every destination, which a restore must leave alone.
fn outside(env: &Env) -> PathBuf {
    let o = env.path("outside");
    write(&o.join("canary.txt"), b"canary");
    write(&o.join("file.txt"), b"outside file");
    write(
        &o.join("linked.txt"),
        b"outside, hard-linked into the destination",
    );
    write(&o.join("sub/deep.txt"), b"outside deep");
    touch(&o.join("sub"), "2002-02-02 02:02:02.2");
    touch(&o, "2003-03-03 03:03:03.3");
    o
}

/// What must not change outside the destinations: every node under
/// `outside`, and the names beside it in the test's directory.
fn around(env: &Env, outside: &Path) -> Vec<String> {
    let mut v = fingerprint(outside);
    for e in std::fs::read_dir(env.dir.path()).unwrap() {
        v.push(e.unwrap().file_name().to_string_lossy().into_owned());
    }
    v.sort();
    v
}

/// Nothing changed around the destination `dest`.
#[track_caller]
fn assert_untouched(before: &[String], after: &[String], dest: &Path) {
    let gone: Vec<_> = before.iter().filter(|l| !after.contains(l)).collect();
    let new: Vec<_> = after.iter().filter(|l| !before.contains(l)).collect();
    assert!(
        gone.is_empty() && new.is_empty(),
        "restore into {} wrote outside it:\nbefore: {gone:#?}\nafter: {new:#?}",
        dest.display()
    );
}

#[test]
fn restore_never_follows_a_planted_symlink_out_of_the_destination() {
    let env = Env::new();
    let repo = env.repo();
    let t = env.path("t");
    plain_tree(&t);
    assert_clean(&backup(&env, &repo, &[&t], &[]));
    let out = outside(&env);
    // In dest: a directory of the snapshot is a symlink to a directory
    // outside (absolute, and relative), a file of it a symlink to an
    // outside file, another a hard link to one.
    let dest = env.path("dest");
    mkdirs(&dest.join("t"));
    std::os::unix::fs::symlink(&out, dest.join("t/dir")).unwrap();
    std::os::unix::fs::symlink("../../outside/sub", dest.join("t/other")).unwrap();
    std::os::unix::fs::symlink(out.join("file.txt"), dest.join("t/file.txt")).unwrap();
    std::fs::hard_link(out.join("linked.txt"), dest.join("t/hard.txt")).unwrap();
    // In dest2: the snapshot's top directory is a symlink.
    let dest2 = env.path("dest2");
    mkdirs(&dest2);
    std::os::unix::fs::symlink(&out, dest2.join("t")).unwrap();
    // In dest3, where the subtree t/dir is restored: dir is a symlink.
    let dest3 = env.path("dest3");
    mkdirs(&dest3);
    std::os::unix::fs::symlink(&out, dest3.join("dir")).unwrap();
    let before = around(&env, &out);

    restore(&env, &repo, "latest", &dest, &["--force"]);
    assert_untouched(&before, &around(&env, &out), &dest);
    assert_same(&t, &dest.join("t"));
    restore(&env, &repo, "latest", &dest2, &["--force"]);
    assert_untouched(&before, &around(&env, &out), &dest2);
    assert_same(&t, &dest2.join("t"));
    restore(&env, &repo, "latest", &dest3, &["--force", "t/dir"]);
    assert_untouched(&before, &around(&env, &out), &dest3);
    assert_same(&t.join("dir"), &dest3.join("dir"));
}

#[test]
fn one_file_restore_never_writes_through_a_planted_name() {
    let env = Env::new();
    let repo = env.repo();
    let t = env.path("t");
    plain_tree(&t);
    assert_clean(&backup(&env, &repo, &[&t], &[]));
    let out = outside(&env);
    // DEST/file.txt is a symlink to an outside file; a hard link to one;
    // the name restore writes first (its temporary file beside the
    // target) is a symlink to an outside file.
    let dest = env.path("dest");
    mkdirs(&dest);
    std::os::unix::fs::symlink(out.join("file.txt"), dest.join("file.txt")).unwrap();
    let dest2 = env.path("dest2");
    mkdirs(&dest2);
    std::fs::hard_link(out.join("linked.txt"), dest2.join("file.txt")).unwrap();
    let dest3 = env.path("dest3");
    mkdirs(&dest3);
    std::os::unix::fs::symlink(out.join("canary.txt"), dest3.join("file.txt.dsync-partial"))
        .unwrap();
    let before = around(&env, &out);

    for d in [&dest, &dest2, &dest3] {
        restore(&env, &repo, "latest", d, &["--force", "t/file.txt"]);
        assert_untouched(&before, &around(&env, &out), d);
        assert_same_file(&t.join("file.txt"), &d.join("file.txt"));
    }
}

const CACHEDIR_TAG: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by (application name).\n";

#[test]
fn excludes_leave_out_what_each_flag_names() {
    let env = Env::new();
    let repo = env.repo();
    let x = env.path("x");
    for f in [
        "a.tmp",
        "keep.tmp",
        "b.txt",
        "sub/c.tmp",
        "sub/d.txt",
        "sub/only/here.log",
        "build/out.o",
        "src/build",
        "only/here.log",
        "tagged/f",
        "tagged/inner/g",
        "cache/f",
        "fakecache/f",
        "from/one.bak",
        "from/two.txt",
    ] {
        write(&x.join(f), f.as_bytes());
    }
    write(&x.join("tagged/.nobackup"), b"");
    write(&x.join("cache/CACHEDIR.TAG"), CACHEDIR_TAG);
    write(
        &x.join("fakecache/CACHEDIR.TAG"),
        b"Signature: 00000000000000000000000000000000\n",
    );
    write(&x.join("big.bin"), &pseudo(200 << 10, 1));
    write(&x.join("sub/big2.bin"), &pseudo(300 << 10, 2));
    write(&x.join("small.bin"), &pseudo(100 << 10, 3));
    let from = env.path("excludes.txt");
    write(
        &from,
        format!("# a comment line\n\n*.bak\n{}/sub/\n", s(&x)).as_bytes(),
    );
    let all = tree_paths(&x);
    let only_here = format!("{}/only/here.log", s(&x));
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec![], vec![]),
        (
            vec![
                "--exclude",
                "*.tmp",
                "--exclude",
                "!keep.tmp",
                "--exclude",
                "build/",
                "--exclude",
                only_here.as_str(),
            ],
            vec![
                "a.tmp",
                "sub/c.tmp",
                "build",
                "build/out.o",
                "only/here.log",
            ],
        ),
        (
            vec!["--exclude-from", s(&from)],
            vec![
                "from/one.bak",
                "sub",
                "sub/c.tmp",
                "sub/d.txt",
                "sub/only",
                "sub/only/here.log",
                "sub/big2.bin",
            ],
        ),
        (
            vec!["--exclude-if-present", ".nobackup"],
            vec![
                "tagged",
                "tagged/.nobackup",
                "tagged/f",
                "tagged/inner",
                "tagged/inner/g",
            ],
        ),
        (
            vec!["--exclude-caches"],
            vec!["cache", "cache/CACHEDIR.TAG", "cache/f"],
        ),
        (
            vec!["--exclude-larger-than", "100K"],
            vec!["big.bin", "sub/big2.bin"],
        ),
    ];
    for (k, (flags, left_out)) in cases.iter().enumerate() {
        let v = backup(&env, &repo, &[&x], flags);
        assert_clean(&v);
        let out = env.path(&format!("out{k}"));
        restore(&env, &repo, "latest", &out, &[]);
        let got = tree_paths(&out.join("x"));
        let mut want = all.clone();
        for p in left_out {
            assert!(want.remove(*p), "{p} is not in the test tree");
        }
        let missing: Vec<_> = want.difference(&got).collect();
        let extra: Vec<_> = got.difference(&want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "backup {flags:?}: missing {missing:?}, not left out {extra:?}"
        );
        if flags.is_empty() {
            assert_same(&x, &out.join("x"));
        }
    }
}

/// Unmounts when dropped.
struct Umount(PathBuf);

impl Drop for Umount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn one_file_system_keeps_a_mount_point_as_an_empty_directory() {
    if skip_root_test("-x (mounts a tmpfs)") {
        return;
    }
    let env = Env::new();
    let repo = env.repo();
    let y = env.path("y");
    write(&y.join("f"), b"on the root file system");
    let mnt = y.join("mnt");
    mkdirs(&mnt);
    tool("mount", &["-t", "tmpfs", "-o", "size=1m", "tmpfs", s(&mnt)]);
    let _guard = Umount(mnt.clone());
    write(&mnt.join("inside.txt"), b"on the tmpfs");
    for (flag, want) in [
        (None, vec!["f", "mnt", "mnt/inside.txt"]),
        (Some("-x"), vec!["f", "mnt"]),
    ] {
        let v = backup(&env, &repo, &[&y], flag.as_slice());
        assert_clean(&v);
        let out = env.path(&format!("out-{}", flag.unwrap_or("all")));
        restore(&env, &repo, "latest", &out, &[]);
        let got: Vec<String> = tree_paths(&out.join("y")).into_iter().collect();
        assert_eq!(got, want, "backup {flag:?}");
    }
}

/// Runs the binary as nobody (uid and gid 65534, no groups).
fn as_nobody(env: &Env, bin: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin)
        .args(args)
        .current_dir(env.dir.path())
        .env_remove("DSYNC_REPO");
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot run setpriv ({e}): install util-linux (scripts/setup.sh does)")
    })
}

#[test]
fn unreadable_file_and_directory_make_an_incomplete_snapshot() {
    if skip_root_test("unreadable files (runs dsync as nobody)") {
        return;
    }
    let env = Env::new();
    chmod(env.dir.path(), 0o755);
    // The test binary's directory may be closed to nobody: a copy.
    let bin = env.path("dsync");
    std::fs::copy(env!("CARGO_BIN_EXE_dsync"), &bin).unwrap();
    chmod(&bin, 0o755);
    let home = env.path("nobody");
    mkdirs(&home);
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let repo = home.join("repo");
    let t = env.path("t");
    write(&t.join("ok.txt"), b"readable");
    write(&t.join("sub/ok2.txt"), &pseudo(30_000, 1));
    write(&t.join("secret"), b"mode 000");
    chmod(&t.join("secret"), 0);
    write(&t.join("locked/inner.txt"), b"in a mode 000 directory");
    chmod(&t.join("locked"), 0);
    for d in [&t, &t.join("sub")] {
        chmod(d, 0o755);
    }
    let o = as_nobody(&env, &bin, &["backup", "--json", s(&repo), s(&t)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for p in [t.join("secret"), t.join("locked")] {
        assert!(
            err.lines()
                .any(|l| l.contains("warning") && l.contains(s(&p))),
            "no warning names {}: {err}",
            p.display()
        );
    }
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(v["incomplete"], true, "{v}");
    assert_eq!(num(&v, "errors"), 2, "{v}");
    assert_eq!(v["warnings"].as_array().map(Vec::len), Some(2), "{v}");
    // The snapshot was made, and the rest of the tree restores.
    let list = env.ok(&["list", s(&repo), "--json"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    let out = env.path("out");
    restore(&env, &repo, "latest", &out, &[]);
    let d = rsync_diff(
        &t,
        &out.join("t"),
        &["--exclude=/secret", "--exclude=/locked/*"],
    );
    assert!(d.is_empty(), "the readable part differs:\n{}", show(&d));
    assert!(out.join("t/locked").is_dir());
}

/// Paths of the files process `pid` has open.
pub(super) fn open_files(pid: u32) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    rd.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect()
}

/// Stops or continues every thread of `pid`; a stop returns once all of
/// them are stopped.
pub(super) fn signal(pid: u32, sig: &str) {
    // The shell's kill: no procps needed.
    tool("sh", &["-c", &format!("kill -{sig} {pid}")]);
    if sig != "STOP" {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
            .all(|st| {
                // The state follows the command name in parentheses.
                let state = st.rsplit(')').next().unwrap_or("").trim_start();
                state.starts_with('T') || state.starts_with('t')
            });
        if stopped {
            return;
        }
        assert!(Instant::now() < deadline, "dsync did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_file_that_vanishes_before_it_is_read_is_skipped_with_a_warning() {
    // The walker lists and stats a whole small tree at once, ahead of the
    // writer, which reads files in order: while the writer reads d1/big
    // (over one chunk, read alone) and the walker is already in d3 (its
    // descriptor is open), d2/zzz has been seen but not opened. dsync is
    // stopped at that moment, zzz deleted, and dsync continued.
    let env = Env::new();
    let mut caught = false;
    for (attempt, mb) in [64usize, 256].into_iter().enumerate() {
        let repo = env.path(&format!("repo{attempt}"));
        let v = env.path(&format!("v{attempt}"));
        let big = v.join("d1/big");
        let zzz = v.join("d2/zzz");
        let d3 = v.join("d3");
        write(&big, &pseudo(mb << 20, 7));
        write(&zzz, b"vanishes");
        write(&d3.join("f"), b"stays");
        let mut child = Command::new(env!("CARGO_BIN_EXE_dsync"))
            .args(["backup", "--json", s(&repo), s(&v)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            let open = open_files(pid);
            if open.contains(&big) && open.contains(&d3) {
                signal(pid, "STOP");
                let open = open_files(pid);
                if open.contains(&big) && !open.contains(&zzz) {
                    std::fs::remove_file(&zzz).unwrap();
                    caught = true;
                }
                signal(pid, "CONT");
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let o = child.wait_with_output().unwrap();
        if !caught {
            continue;
        }
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(5), "stderr: {err}");
        assert!(
            err.lines()
                .any(|l| l.contains(s(&zzz)) && l.contains("vanished")),
            "no warning that {} vanished: {err}",
            zzz.display()
        );
        let j: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        assert_eq!(j["incomplete"], true, "{j}");
        assert_eq!(num(&j, "errors"), 1, "{j}");
        let out = env.path("out");
        restore(&env, &repo, "latest", &out, &[]);
        let root = out.join(v.file_name().unwrap());
        let got: Vec<String> = tree_paths(&root).into_iter().collect();
        assert_eq!(got, ["d1", "d1/big", "d2", "d3", "d3/f"], "restored");
        assert_eq!(blake2(&root.join("d1/big")), blake2(&big));
        break;
    }
    assert!(
        caught,
        "dsync was never caught reading d1/big after the walk passed d2/zzz: \
         the case was not exercised"
    );
}

/// Every path under `root` (relative, `/` joined) with what `diff`
/// compares: kind, contents (files) or target (symlinks), and the
/// attributes.
fn describe(root: &Path) -> std::collections::BTreeMap<String, (char, Vec<u8>, String)> {
    use std::os::unix::ffi::OsStringExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let (kind, data) = if md.is_dir() {
                stack.push(p.clone());
                ('d', Vec::new())
            } else if md.file_type().is_symlink() {
                (
                    'l',
                    std::fs::read_link(&p).unwrap().into_os_string().into_vec(),
                )
            } else {
                ('f', std::fs::read(&p).unwrap())
            };
            let attrs = format!(
                "{:o} {} {} {}.{}",
                md.mode() & 0o7777,
                md.uid(),
                md.gid(),
                md.mtime(),
                md.mtime_nsec()
            );
            out.insert(rel, (kind, data, attrs));
        }
    }
    out
}

#[test]
fn ls_diff_and_cat_answer_for_paths_inside_a_tree() {
    let env = Env::new();
    let repo = env.repo();
    let h = env.path("h");
    history_tree(&h);
    std::os::unix::fs::symlink("target", h.join("link")).unwrap();
    let before = env.path("before");
    tool("cp", &["-a", s(&h), s(&before)]);
    backup(&env, &repo, &[&h], &[]);
    // Bytes changed in the middle, a directory removed, a file become a
    // directory, a mode changed, a file added, a symlink retargeted.
    let p = h.join("data/big.bin");
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&pseudo(10_000, 77), 3 << 20).unwrap();
    drop(f);
    std::fs::remove_dir_all(h.join("gone")).unwrap();
    std::fs::remove_file(h.join("f2d")).unwrap();
    write(&h.join("f2d/child"), b"now a directory");
    chmod(&h.join("modefile"), 0o600);
    write(&h.join("fresh.txt"), &pseudo(2500, 15));
    std::fs::remove_file(h.join("link")).unwrap();
    std::os::unix::fs::symlink("modefile", h.join("link")).unwrap();
    let after = env.path("after");
    tool("cp", &["-a", s(&h), s(&after)]);
    backup(&env, &repo, &[&h], &[]);
    let ids = env.ids();
    let (old, new) = (describe(&before), describe(&after));

    // ls: every path, directories with a slash, symlinks with their target.
    let listed: BTreeSet<String> = env
        .ok(&["ls", s(&repo), &ids[0]])
        .lines()
        .map(str::to_string)
        .collect();
    let mut expected: BTreeSet<String> = old
        .iter()
        .map(|(p, (k, data, _))| match k {
            'd' => format!("h/{p}/"),
            'l' => format!("h/{p} -> {}", String::from_utf8_lossy(data)),
            _ => format!("h/{p}"),
        })
        .collect();
    expected.insert("h/".into());
    assert_eq!(listed, expected);
    for line in env
        .ok(&["ls", "--json", s(&repo), &ids[1], "h/data"])
        .lines()
    {
        let v: Value = serde_json::from_str(line).unwrap();
        let p = v["path"].as_str().unwrap().strip_prefix("h/").unwrap();
        let md = std::fs::symlink_metadata(after.join(p)).unwrap();
        assert_eq!(v["mode"], md.mode() & 0o7777, "{line}");
        if md.is_file() {
            assert_eq!(v["size"], md.len(), "{line}");
        }
    }

    // cat: each file of the first snapshot, byte for byte.
    for (p, (k, data, _)) in &old {
        if *k == 'f' {
            let out = env.run(&["cat", s(&repo), &ids[0], &format!("h/{p}")]);
            assert!(out.status.success(), "cat h/{p}: {out:?}");
            assert!(out.stdout == *data, "cat h/{p}: other bytes");
        }
    }
    env.fails(&["cat", s(&repo), &ids[0], "h/docs"], 1);
    env.fails(&["cat", s(&repo), &ids[0], "h/nothing"], 1);

    // diff: exactly the paths that differ, as the two copies tell.
    let mut want = std::collections::BTreeMap::new();
    for p in old.keys().chain(new.keys()) {
        let status = match (old.get(p), new.get(p)) {
            (Some(_), None) => "removed",
            (None, Some(_)) => "added",
            (Some(a), Some(b)) if a.0 != b.0 => "type",
            (Some(a), Some(b)) if a.1 != b.1 => "changed",
            (Some(a), Some(b)) if a.2 != b.2 => "metadata",
            _ => continue,
        };
        want.insert(format!("h/{p}"), status.to_string());
    }
    let root_old = std::fs::symlink_metadata(&before).unwrap();
    let root_new = std::fs::symlink_metadata(&after).unwrap();
    if (root_old.mtime(), root_old.mtime_nsec()) != (root_new.mtime(), root_new.mtime_nsec()) {
        want.insert("h".into(), "metadata".into());
    }
    let mut got = std::collections::BTreeMap::new();
    for line in env
        .ok(&["diff", "--json", s(&repo), &ids[0], &ids[1]])
        .lines()
    {
        let v: Value = serde_json::from_str(line).unwrap();
        got.insert(
            v["file"].as_str().unwrap().to_string(),
            v["status"].as_str().unwrap().to_string(),
        );
        if v["file"] == "h/data/big.bin" {
            // One 4 KiB-aligned run around the 10,000 bytes written.
            assert_eq!(
                v["ranges"],
                serde_json::json!([[3 << 20, (3 << 20) + 12288]])
            );
        }
    }
    assert_eq!(got, want);
    // Under one directory only.
    let sub = env.ok(&["diff", "-q", s(&repo), &ids[0], &ids[1], "h/gone"]);
    assert!(sub.lines().all(|l| l.starts_with("h/gone")), "{sub}");
    assert!(sub.contains("h/gone/sub/z: removed"), "{sub}");
}

#[test]
fn a_moved_or_renamed_file_is_stored_as_a_delta_of_its_old_path() {
    let env = Env::new();
    let repo = env.repo();
    let t = env.path("t");
    let big = pseudo(3 << 20, 41);
    write(&t.join("a/disk.img"), &big);
    write(&t.join("a/notes.txt"), &pseudo(20_000, 42));
    touch(&t.join("a/disk.img"), "2021-06-01 10:00:00");
    backup(&env, &repo, &[&t], &[]);
    // Moved to another directory: same size and mtime, new name.
    std::fs::create_dir(t.join("b")).unwrap();
    std::fs::rename(t.join("a/disk.img"), t.join("b/old.img")).unwrap();
    let v = backup(&env, &repo, &[&t], &[]);
    assert_clean(&v);
    assert!(
        num(&v, "bytes_added") < 200_000,
        "a moved 3 MiB file was stored again: {v}"
    );
    // Edited and moved again, keeping its base name: 4 KiB changed.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(t.join("b/old.img"))
        .unwrap();
    f.write_all_at(&pseudo(4096, 43), 1 << 20).unwrap();
    drop(f);
    std::fs::create_dir(t.join("c")).unwrap();
    std::fs::rename(t.join("b/old.img"), t.join("c/old.img")).unwrap();
    let before = env.path("before");
    tool("cp", &["-a", s(&t), s(&before)]);
    let v = backup(&env, &repo, &[&t], &[]);
    assert!(
        num(&v, "bytes_added") < 200_000,
        "an edited, moved 3 MiB file was stored again: {v}"
    );
    let out = env.path("out");
    restore(&env, &repo, "latest", &out, &[]);
    assert_same(&before, &out.join("t"));
}

#[test]
fn a_copy_of_a_stored_file_shares_its_data() {
    let env = Env::new();
    let repo = env.repo();
    let t = env.path("t");
    // Two files of one size (the copy must find the right one by content),
    // one of more than a chunk (stored as a delta against a file of its
    // size), and a small one.
    write(&t.join("a/one.bin"), &pseudo(300_000, 71));
    write(&t.join("a/two.bin"), &pseudo(300_000, 72));
    write(&t.join("a/big.bin"), &pseudo(40 << 20, 73));
    backup(&env, &repo, &[&t], &[]);
    write(&t.join("a/small.txt"), &pseudo(3000, 74));
    backup(&env, &repo, &[&t], &[]);
    // Copies elsewhere, under other names and mtimes (a small one too).
    write(&t.join("b/copy-of-small"), &pseudo(3000, 74));
    write(&t.join("b/copy-of-two"), &pseudo(300_000, 72));
    write(&t.join("b/c/copy-of-big"), &pseudo(40 << 20, 73));
    let before = env.path("before");
    tool("cp", &["-a", s(&t), s(&before)]);
    let v = backup(&env, &repo, &[&t], &[]);
    assert_clean(&v);
    assert!(
        num(&v, "bytes_added") < 100_000,
        "copies of stored files were stored again: {v}"
    );
    let out = env.path("out");
    restore(&env, &repo, "latest", &out, &[]);
    assert_same(&before, &out.join("t"));
    // One small copy alone: its 3,000 incompressible bytes are not stored
    // again (what the backup adds is the new directory list).
    write(&t.join("b/another-small-copy"), &pseudo(3000, 74));
    let v = backup(&env, &repo, &[&t], &[]);
    assert!(
        num(&v, "bytes_added") < 2500,
        "a small copy of a stored file was stored again: {v}"
    );
}

#[test]
fn restore_delta_writes_only_the_blocks_that_differ() {
    let env = Env::new();
    let repo = env.repo();
    let t = env.path("t");
    write(&t.join("data/small.txt"), &pseudo(5000, 51));
    // 8 MiB of data but for a 1 MiB hole at 3 MiB.
    let f = std::fs::File::create(t.join("data/disk.img")).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&pseudo(3 << 20, 52), 0).unwrap();
    f.write_all_at(&pseudo(4 << 20, 57), 4 << 20).unwrap();
    drop(f);
    touch(&t.join("data/disk.img"), "2021-06-01 10:00:00");
    backup(&env, &repo, &[&t], &[]);
    let out = env.path("out");
    restore(&env, &repo, "latest", &out, &[]);
    assert_same(&t, &out.join("t"));

    // The copy drifts: 3 blocks overwritten, data written into the hole,
    // bytes appended, a small file edited, a file added.
    let img = out.join("t/data/disk.img");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&pseudo(3 * 4096, 53), 1 << 20).unwrap();
    f.write_all_at(&pseudo(8192, 54), (3 << 20) + 4096).unwrap();
    f.write_all_at(&pseudo(1000, 55), 8 << 20).unwrap();
    drop(f);
    write(&out.join("t/data/small.txt"), b"edited");
    write(&out.join("t/data/extra"), b"not in the snapshot");
    let ino = std::fs::metadata(&img).unwrap().ino();

    let json = env.ok(&[
        "restore",
        "--json",
        s(&repo),
        "latest",
        "--to",
        s(&out),
        "--delta",
    ]);
    let v: Value = serde_json::from_str(json.trim()).unwrap();
    // The 3 blocks and the small file (the hole is punched, not written).
    assert_eq!(num(&v, "bytes_written"), 3 * 4096 + 5000, "{v}");
    assert_eq!(
        std::fs::metadata(&img).unwrap().ino(),
        ino,
        "disk.img was replaced, not updated"
    );
    // What the snapshot does not hold is left alone.
    assert!(out.join("t/data/extra").exists());
    let d = rsync_diff(&t, &out.join("t"), &["--exclude=/data/extra"]);
    assert!(d.is_empty(), "restore --delta:\n{d}");
    assert!(
        allocated(&img) < (7 << 20) + (512 << 10),
        "the hole was not punched again: {} bytes allocated",
        allocated(&img)
    );

    // One file onto its copy.
    let one = env.path("one.img");
    std::fs::copy(&img, &one).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&one).unwrap();
    f.write_all_at(&pseudo(4096, 56), 4096).unwrap();
    drop(f);
    let json = env.ok(&[
        "restore",
        "--json",
        s(&repo),
        "latest",
        "--to",
        s(&one),
        "t/data/disk.img",
        "--delta",
    ]);
    let v: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(num(&v, "bytes_written"), 4096, "{v}");
    assert_same_file(&t.join("data/disk.img"), &one);
}

#[test]
fn every_snapshot_of_a_tree_reads_through_the_mount_as_rsync_sees_it() {
    if super::mount::skip() || skip_root_test("a tree with device nodes and owners") {
        return;
    }
    let env = Env::new();
    let repo = env.repo();
    let t = env.path("t");
    add_every_kind(&t.join("kinds"));
    history_tree(&t.join("h"));
    let mut states = Vec::new();
    for (k, when) in ["2024-01-01T00:00:00", "2024-01-02T00:00:00"]
        .iter()
        .enumerate()
    {
        if k == 1 {
            // Bytes in the middle, a directory gone, a file become a
            // directory, a mode, a new hard link.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(t.join("h/data/big.bin"))
                .unwrap();
            f.write_all_at(&pseudo(10_000, 61), 2 << 20).unwrap();
            drop(f);
            std::fs::remove_dir_all(t.join("h/gone")).unwrap();
            std::fs::remove_file(t.join("h/f2d")).unwrap();
            write(&t.join("h/f2d/child"), b"now a directory");
            chmod(&t.join("h/modefile"), 0o4711);
            std::fs::hard_link(t.join("h/target"), t.join("h/src/target-link")).unwrap();
        }
        let state = env.path(&format!("state{k}"));
        tool("cp", &["-a", s(&t), s(&state)]);
        assert_clean(&backup(&env, &repo, &[&t], &["--time", when]));
        states.push(state);
    }
    let m = super::mount::Mount::new(&env, &[]);
    let dirs = m.snapshot_dirs();
    assert_eq!(dirs.len(), states.len(), "{dirs:?}");
    for (state, dir) in states.iter().zip(&dirs) {
        // Read through the mount: contents, kinds, modes, owners, ns
        // mtimes, hard links (one inode), devices, xattrs and ACLs.
        assert_same(state, &dir.join("t"));
    }
    m.unmount();
}

#[test]
fn touched_small_files_are_read_but_not_stored_again() {
    let env = Env::new();
    let repo = env.repo();
    let t = env.path("t");
    for i in 0..300u64 {
        write(&t.join(format!("d{}/f{i}", i % 10)), &pseudo(3000, 70 + i));
    }
    backup(&env, &repo, &[&t], &[]);
    // New mtimes (and ctimes), same bytes: every file is read again, and
    // found to be what the previous snapshot holds.
    for i in 0..300u64 {
        touch(&t.join(format!("d{}/f{i}", i % 10)), "2022-02-02 02:02:02");
    }
    let v = backup(&env, &repo, &[&t], &[]);
    assert_eq!(num(&v, "tree_files_read"), 300, "{v}");
    assert!(
        num(&v, "bytes_added") < 100_000,
        "300 touched files of 3,000 random bytes were stored again: {v}"
    );
    let out = env.path("out");
    restore(&env, &repo, "latest", &out, &[]);
    assert_same(&t, &out.join("t"));
}
