//! Remote repositories (`host:path`, `ssh://host:port/path`) through the
//! protocol of PROTOCOL.md, with a fake rsh that runs `dsync serve` here
//! instead of on another machine (as rsync's test suite does): every
//! command on a remote repository, compared with the originals by BLAKE2
//! and rsync; the restricted modes of an `authorized_keys` forced command.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::tree::{assert_same, write};
use super::util::*;

/// A stand-in for ssh: drops `-p PORT` and the host, then runs the
/// command (or, with `forced`, that command whatever was asked, as sshd
/// does with an `authorized_keys` command="...").
pub(super) fn fake_rsh(env: &Env, name: &str, forced: Option<&str>) -> PathBuf {
    let p = env.path(name);
    let run = match forced {
        Some(cmd) => format!("exec {cmd}"),
        None => "exec \"$@\"".to_string(),
    };
    std::fs::write(
        &p,
        format!("#!/bin/sh\nwhile [ \"$1\" = -p ]; do shift 2; done\nshift\n{run}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// dsync with the fake rsh and this build as the far side's dsync.
fn remote(env: &Env, rsh: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args(args)
        .env_remove("DSYNC_REPO")
        .env("DSYNC_RSH", rsh)
        .env("DSYNC_REMOTE_DSYNC", env!("CARGO_BIN_EXE_dsync"))
        .current_dir(env.dir.path())
        .output()
        .expect("run dsync")
}

#[track_caller]
fn ok(env: &Env, rsh: &Path, args: &[&str]) -> String {
    let o = remote(env, rsh, args);
    assert!(
        o.status.success(),
        "dsync {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_command_works_on_a_remote_repository() {
    let env = Env::new();
    let rsh = fake_rsh(&env, "rsh", None);
    let repo_dir = env.path("far/repo");
    std::fs::create_dir_all(env.path("far")).unwrap();
    let repo = format!("backuphost:{}", s(&repo_dir));
    let url = format!("ssh://backup@backuphost:2222{}", s(&repo_dir));
    let img = env.path("disk.img");
    make_image(&img, 16 << 20, 1);
    let tree = env.path("tree");
    write(&tree.join("a/b.txt"), b"a file in a tree");
    write(&tree.join("c.bin"), &pseudo(300_000, 2));
    ok(&env, &rsh, &["init", "-q", &repo]);
    ok(&env, &rsh, &["backup", "-q", &repo, s(&img), s(&tree)]);
    let first = blake2(&img);
    change_image(&img, 1, 100);
    // The URL form reaches the same repository.
    ok(&env, &rsh, &["backup", "-q", &url, s(&img)]);
    let list = ok(&env, &rsh, &["list", &repo, "--json"]);
    let ids: Vec<String> = list
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    // Restores are the originals.
    let out = env.path("out");
    ok(
        &env,
        &rsh,
        &["restore", "-q", &repo, &ids[0], "--to", s(&out)],
    );
    assert_eq!(blake2(&out.join("disk.img")), first);
    assert_same(&tree, &out.join("tree"));
    let cat = remote(&env, &rsh, &["cat", &repo, "latest", "disk.img"]);
    assert!(cat.status.success());
    std::fs::write(env.path("cat.img"), &cat.stdout).unwrap();
    assert_eq!(blake2(&env.path("cat.img")), blake2(&img));
    // The reading commands.
    ok(&env, &rsh, &["ls", &repo, &ids[0], "tree"]);
    ok(&env, &rsh, &["diff", &repo, &ids[0], &ids[1], "disk.img"]);
    ok(&env, &rsh, &["du", &repo]);
    ok(&env, &rsh, &["check", &repo, "--read-data"]);
    // Forget and prune: the repository shrinks, the kept snapshot reads.
    ok(&env, &rsh, &["forget", "-q", &repo, &ids[0]]);
    ok(&env, &rsh, &["prune", "-q", &repo]);
    ok(&env, &rsh, &["check", &repo, "--read-data"]);
    let out2 = env.path("out2");
    ok(
        &env,
        &rsh,
        &["restore", "-q", &repo, "latest", "--to", s(&out2)],
    );
    assert_eq!(blake2(&out2.join("disk.img")), blake2(&img));
    // What the far side holds is an ordinary repository.
    env.ok(&["check", s(&repo_dir)]);
}

#[test]
fn append_only_refuses_forget_and_prune_and_keeps_backups_working() {
    let env = Env::new();
    let open = fake_rsh(&env, "rsh", None);
    let repo_dir = env.path("repo");
    let repo = format!("host:{}", s(&repo_dir));
    let f = env.path("f");
    std::fs::write(&f, pseudo(1 << 20, 3)).unwrap();
    ok(&env, &open, &["backup", "-q", &repo, s(&f)]);
    // The key's forced command, whatever the client asks.
    let forced = fake_rsh(
        &env,
        "rsh-append-only",
        Some(&format!(
            "{} serve --append-only",
            env!("CARGO_BIN_EXE_dsync")
        )),
    );
    std::fs::write(&f, pseudo(1 << 20, 4)).unwrap();
    ok(&env, &forced, &["backup", "-q", &repo, s(&f)]);
    for args in [
        vec!["forget", &repo, "latest"],
        vec!["prune", &repo, "--keep-last", "1"],
    ] {
        let o = remote(&env, &forced, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("append-only"), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    // Both snapshots are still there and sound.
    let ids = env.ids_of(&repo_dir);
    assert_eq!(ids.len(), 2);
    env.ok(&["check", s(&repo_dir), "--read-data"]);
}

#[test]
fn read_only_and_restrict_to_path_refuse_with_one_line() {
    let env = Env::new();
    let open = fake_rsh(&env, "rsh", None);
    let inside = env.path("allowed");
    std::fs::create_dir_all(&inside).unwrap();
    let repo = format!("host:{}", s(&inside.join("repo")));
    let f = env.path("f");
    std::fs::write(&f, pseudo(100_000, 5)).unwrap();
    ok(&env, &open, &["backup", "-q", &repo, s(&f)]);
    let ro = fake_rsh(
        &env,
        "rsh-ro",
        Some(&format!(
            "{} serve --read-only",
            env!("CARGO_BIN_EXE_dsync")
        )),
    );
    let o = remote(&env, &ro, &["backup", &repo, s(&f)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("read-only"), "{err}");
    ok(
        &env,
        &ro,
        &[
            "restore",
            "-q",
            &repo,
            "latest",
            "--to",
            s(&env.path("out")),
        ],
    );
    let restricted = fake_rsh(
        &env,
        "rsh-restricted",
        Some(&format!(
            "{} serve --restrict-to-path {}",
            env!("CARGO_BIN_EXE_dsync"),
            s(&inside)
        )),
    );
    ok(&env, &restricted, &["list", &repo]);
    let elsewhere = format!("host:{}", s(&env.path("elsewhere")));
    let o = remote(&env, &restricted, &["init", &elsewhere]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("outside"), "{err}");
    assert!(!env.path("elsewhere").exists());
}

#[test]
fn a_remote_command_that_fails_is_one_line() {
    let env = Env::new();
    let dead = env.path("dead-rsh");
    std::fs::write(
        &dead,
        "#!/bin/sh\necho 'ssh: connect to host h: Connection refused' >&2\nexit 255\n",
    )
    .unwrap();
    std::fs::set_permissions(&dead, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = remote(&env, &dead, &["list", "h:/srv/repo"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // ssh's own line, then dsync's.
    assert!(err.contains("Connection refused"), "{err}");
    assert!(err.contains("connection lost"), "{err}");
    let missing = fake_rsh(&env, "rsh", None);
    let o = remote(
        &env,
        &missing,
        &["list", &format!("h:{}", s(&env.path("none")))],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("not a dsync repository"), "{err}");
}

/// A stand-in for ssh that counts the bytes each way (an oracle apart
/// from dsync): appends "SENT RECEIVED" to `$DSYNC_TEST_COUNT` at exit.
/// With `$DSYNC_TEST_CUT`, the link drops (the far side killed) once that
/// many bytes were sent.
pub(super) fn counting_rsh(env: &Env) -> PathBuf {
    let p = env.path("counting-rsh");
    std::fs::write(
        &p,
        r#"#!/usr/bin/env python3
import os, subprocess, sys, threading
args = sys.argv[1:]
while args and args[0] == "-p":
    args = args[2:]
args = args[1:]
child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
counts = [0, 0]
cut = int(os.environ.get("DSYNC_TEST_CUT", "0"))
def record():
    with open(os.environ["DSYNC_TEST_COUNT"], "a") as f:
        f.write(f"{counts[0]} {counts[1]}\n")
def pump(src, dst, i):
    while True:
        b = os.read(src.fileno(), 1 << 20)
        if not b:
            break
        if i == 0 and cut and counts[0] + len(b) >= cut:
            counts[0] += len(b)
            child.kill()
            record()
            os._exit(255)
        counts[i] += len(b)
        dst.write(b)
        dst.flush()
    dst.close()
up = threading.Thread(target=pump, args=(sys.stdin.buffer, child.stdin, 0))
down = threading.Thread(target=pump, args=(child.stdout, sys.stdout.buffer, 1))
up.start(); down.start(); up.join(); down.join()
rc = child.wait()
record()
sys.exit(rc)
"#,
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// 1 MiB of new data in 256 scattered 4 KiB blocks.
pub(super) fn change_1mib(img: &Path, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let size = f.metadata().unwrap().len();
    for k in 0..256u64 {
        let at = ((k * 1_048_583 + seed * 7919 * 4096) % (size - 4096)) & !4095;
        f.write_all_at(&pseudo(4096, seed * 1000 + k), at).unwrap();
    }
}

#[test]
fn an_incremental_backup_sends_little_more_than_the_change() {
    let env = Env::new();
    let rsh = counting_rsh(&env);
    let count = env.path("count");
    let repo = format!("host:{}", s(&env.path("repo")));
    let img = env.path("disk.img");
    make_image(&img, 256 << 20, 9);
    let backup = |what: &str| -> (u64, u64) {
        let _ = std::fs::remove_file(&count);
        let o = Command::new(env!("CARGO_BIN_EXE_dsync"))
            .args(["backup", "-q", &repo, s(&img)])
            .env_remove("DSYNC_REPO")
            .env("DSYNC_RSH", &rsh)
            .env("DSYNC_REMOTE_DSYNC", env!("CARGO_BIN_EXE_dsync"))
            .env("DSYNC_CACHE_DIR", env.path("cache"))
            .env("DSYNC_TEST_COUNT", &count)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let text = std::fs::read_to_string(&count).unwrap();
        let mut sent = 0;
        let mut received = 0;
        for l in text.lines() {
            let mut f = l.split(' ').map(|n| n.parse::<u64>().unwrap());
            sent += f.next().unwrap();
            received += f.next().unwrap();
        }
        (sent, received)
    };
    backup("first backup");
    change_1mib(&img, 1);
    backup("first incremental");
    change_1mib(&img, 2);
    let (sent, received) = backup("second incremental");
    eprintln!("second incremental: {sent} bytes sent, {received} received");
    let limit = (3 << 20) / 2 + (256 << 10);
    assert!(
        sent <= limit,
        "the second incremental sent {sent} bytes for 1 MiB changed (at most {limit})"
    );
    // The previous version's signature came from the cache, not the wire.
    assert!(
        received <= 256 << 10,
        "the second incremental received {received} bytes"
    );
    // And the repository restores it.
    let out = env.path("out");
    ok(
        &env,
        &rsh_plain(&env),
        &["restore", "-q", &repo, "latest", "--to", s(&out)],
    );
    assert_eq!(blake2(&out.join("disk.img")), blake2(&img));
}

/// The bytes sent per rsh process, summed, from a counting rsh's file.
fn sent_of(count: &Path) -> u64 {
    let text = std::fs::read_to_string(count).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_backup_retried_after_a_cut_link_sends_only_what_had_not_crossed() {
    let env = Env::new();
    let rsh = counting_rsh(&env);
    let count = env.path("count");
    let img = env.path("disk.img");
    // Incompressible, so that what crosses is what is stored.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&img).unwrap();
        for k in 0..64u64 {
            f.write_all_at(&pseudo(4 << 20, 300 + k), k << 22).unwrap();
        }
    }
    let backup = |repo: &str, cut: Option<u64>| -> (Option<i32>, u64, String) {
        let _ = std::fs::remove_file(&count);
        let mut c = Command::new(env!("CARGO_BIN_EXE_dsync"));
        c.args(["backup", "-q", repo, s(&img)])
            .env_remove("DSYNC_REPO")
            .env("DSYNC_RSH", &rsh)
            .env("DSYNC_REMOTE_DSYNC", env!("CARGO_BIN_EXE_dsync"))
            .env("DSYNC_CACHE_DIR", env.path("cache"))
            .env("DSYNC_CONNECTIONS", "1")
            .env("DSYNC_TEST_COUNT", &count);
        if let Some(n) = cut {
            c.env("DSYNC_TEST_CUT", n.to_string());
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        (o.status.code(), sent_of(&count), err)
    };
    // What a whole backup sends, into another repository.
    let (code, whole, err) = backup(&format!("host:{}", s(&env.path("other"))), None);
    assert_eq!(code, Some(0), "{err}");
    // Cut at 60 %: two 64 MiB packs are finished by then.
    let repo = format!("host:{}", s(&env.path("repo")));
    let (code, before_cut, err) = backup(&repo, Some(whole * 6 / 10));
    assert_eq!(code, Some(1), "the cut backup: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(
        env.ids_of(&env.path("repo")).is_empty(),
        "the cut backup left a snapshot"
    );
    let (code, retried, err) = backup(&repo, None);
    assert_eq!(code, Some(0), "the retry: {err}");
    eprintln!("whole {whole}, sent before the cut {before_cut}, retry {retried}");
    // At most the rest, the pack in flight at the cut and the metadata.
    let limit = whole - before_cut + (64 << 20) + (1 << 20);
    assert!(
        retried <= limit,
        "the retry sent {retried} bytes (at most {limit}; the whole backup sends {whole})"
    );
    let out = env.path("out");
    env.ok(&[
        "restore",
        "-q",
        s(&env.path("repo")),
        "latest",
        "--to",
        s(&out),
    ]);
    assert_eq!(blake2(&out.join("disk.img")), blake2(&img));
    env.ok(&["check", s(&env.path("repo")), "--read-data"]);
    // The journal is gone with the commit.
    let journals = std::fs::read_dir(env.path("cache"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with("resume-"))
        .count();
    assert_eq!(journals, 0, "journals left after the commit");
}

#[test]
fn copies_moves_and_duplicates_in_a_tree_cross_once() {
    let env = Env::new();
    let rsh = counting_rsh(&env);
    let count = env.path("count");
    let repo = format!("host:{}", s(&env.path("repo")));
    let tree = env.path("tree");
    let data = pseudo(3 << 20, 77);
    // Three names, one content: it crosses once.
    write(&tree.join("a"), &data);
    write(&tree.join("b"), &data);
    write(&tree.join("sub/c"), &data);
    let backup = || -> u64 {
        let _ = std::fs::remove_file(&count);
        let o = Command::new(env!("CARGO_BIN_EXE_dsync"))
            .args(["backup", "-q", &repo, s(&tree)])
            .env_remove("DSYNC_REPO")
            .env("DSYNC_CONNECTIONS", "1")
            .env("DSYNC_RSH", &rsh)
            .env("DSYNC_REMOTE_DSYNC", env!("CARGO_BIN_EXE_dsync"))
            .env("DSYNC_CACHE_DIR", env.path("cache"))
            .env("DSYNC_TEST_COUNT", &count)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = std::fs::read_to_string(&count).unwrap();
        // One connection, its bytes sent.
        assert_eq!(text.lines().count(), 1, "{text}");
        text.split(' ').next().unwrap().parse().unwrap()
    };
    let first = backup();
    assert!(
        first < (3 << 20) + (256 << 10),
        "three copies of 3 MiB sent {first} bytes"
    );
    // A copy, a move and a new file of another copy's content: only
    // metadata crosses (the client's index, from its cache, says "have it").
    std::fs::copy(tree.join("a"), tree.join("copied")).unwrap();
    std::fs::rename(tree.join("b"), tree.join("sub/moved")).unwrap();
    write(&tree.join("sub/deeper/again"), &data);
    let second = backup();
    assert!(second < 64 << 10, "a copy and a move sent {second} bytes");
    let out = env.path("out");
    ok(
        &env,
        &rsh_plain(&env),
        &["restore", "-q", &repo, "latest", "--to", s(&out)],
    );
    assert_same(&tree, &out.join("tree"));
}

#[test]
fn several_connections_share_the_reads() {
    let env = Env::new();
    let rsh = counting_rsh(&env);
    let count = env.path("count");
    let repo = format!("host:{}", s(&env.path("repo")));
    let img = env.path("disk.img");
    make_image(&img, 64 << 20, 13);
    let run = |args: &[&str]| -> Vec<(u64, u64)> {
        let _ = std::fs::remove_file(&count);
        let o = Command::new(env!("CARGO_BIN_EXE_dsync"))
            .args(args)
            .env_remove("DSYNC_REPO")
            .env("DSYNC_RSH", &rsh)
            .env("DSYNC_REMOTE_DSYNC", env!("CARGO_BIN_EXE_dsync"))
            .env("DSYNC_CACHE_DIR", env.path("cache"))
            .env("DSYNC_TEST_COUNT", &count)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_counts(&count)
    };
    // A backup writes one pack at a time: one connection carries it.
    run(&["--connections", "3", "backup", "-q", &repo, s(&img)]);
    let out = env.path("out");
    let down = run(&[
        "--connections",
        "3",
        "restore",
        "-q",
        &repo,
        "latest",
        "--to",
        s(&out),
    ]);
    // Three servers were started, each said HELLO (reads go round the
    // connections that are up; how many a short restore gets to use
    // depends on how fast ssh comes up).
    let mut seen = down;
    for _ in 0..50 {
        if seen.len() >= 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        seen = read_counts(&count);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter().all(|(sent, got)| *sent > 0 && *got > 0),
        "{seen:?}"
    );
    assert_eq!(blake2(&out.join("disk.img")), blake2(&img));
}

/// (sent, received) of each connection the counting rsh saw end.
fn read_counts(count: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(count)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut f = l.split(' ').map(|n| n.parse::<u64>().unwrap());
            (f.next().unwrap(), f.next().unwrap())
        })
        .collect()
}

fn rsh_plain(env: &Env) -> PathBuf {
    fake_rsh(env, "rsh-plain", None)
}

/// A real sshd on 127.0.0.1, started by the test with its own host key,
/// whose only authorized key is forced to `dsync serve --append-only`.
struct Sshd {
    child: std::process::Child,
    port: u16,
    client_key: PathBuf,
}

impl Sshd {
    fn start(env: &Env, forced: &str) -> Sshd {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.exists(),
            "no /usr/sbin/sshd: install openssh-server (scripts/setup.sh does)"
        );
        let dir = env.path("sshd");
        std::fs::create_dir_all(&dir).unwrap();
        let keygen = |path: &Path| {
            let o = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path)
                .output()
                .expect("ssh-keygen (openssh-client)");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        let (host_key, client_key) = (dir.join("host_key"), dir.join("client_key"));
        keygen(&host_key);
        keygen(&client_key);
        let public = std::fs::read_to_string(client_key.with_extension("pub")).unwrap();
        let auth = dir.join("authorized_keys");
        std::fs::write(&auth, format!("restrict,command=\"{forced}\" {public}")).unwrap();
        // Privilege separation wants its empty directory (as root).
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PidFile {}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
                s(&host_key),
                s(&auth),
                s(&dir.join("sshd.pid"))
            ),
        )
        .unwrap();
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start sshd");
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "sshd did not listen on 127.0.0.1:{port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Sshd {
            child,
            port,
            client_key,
        }
    }

    /// The rsh: the system ssh with the test's key, no known_hosts.
    fn rsh(&self) -> String {
        format!(
            "ssh -i {} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            s(&self.client_key)
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn through_a_real_sshd_an_append_only_key_backs_up_but_cannot_prune() {
    let env = Env::new();
    let repo_dir = env.path("repo");
    let forced = format!(
        "{} serve --append-only --restrict-to-path {}",
        env!("CARGO_BIN_EXE_dsync"),
        s(env.dir.path())
    );
    let sshd = Sshd::start(&env, &forced);
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let repo = format!("ssh://{user}@127.0.0.1:{}{}", sshd.port, s(&repo_dir));
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dsync"))
            .args(args)
            .env_remove("DSYNC_REPO")
            .env("DSYNC_RSH", sshd.rsh())
            .env("DSYNC_CACHE_DIR", env.path("cache"))
            .output()
            .unwrap()
    };
    let img = env.path("disk.img");
    make_image(&img, 8 << 20, 31);
    for day in 0..2 {
        if day > 0 {
            change_image(&img, day, 20);
        }
        let o = run(&["backup", "-q", &repo, s(&img)]);
        assert!(
            o.status.success(),
            "backup over ssh: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    for args in [
        vec!["forget", &repo, "latest"],
        vec!["prune", &repo, "--keep-last", "1"],
    ] {
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("append-only"), "{args:?}: {err}");
    }
    let out = env.path("out");
    let o = run(&["restore", "-q", &repo, "latest", "--to", s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(blake2(&out.join("disk.img")), blake2(&img));
    assert_eq!(env.ids_of(&repo_dir).len(), 2);
}

#[test]
fn a_connection_killed_mid_backup_or_prune_loses_nothing() {
    let env = Env::new();
    // The fake rsh notes the server's pid (it becomes the server).
    let rsh = env.path("rsh-pid");
    std::fs::write(
        &rsh,
        "#!/bin/sh\nwhile [ \"$1\" = -p ]; do shift 2; done\nshift\necho $$ > \"$DSYNC_TEST_PIDFILE\"\nexec \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&rsh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pidfile = env.path("server.pid");
    let repo_dir = env.path("repo");
    let repo = format!("host:{}", s(&repo_dir));
    let img = env.path("disk.img");
    make_image(&img, 128 << 20, 41);
    let start = |args: &[&str]| {
        let _ = std::fs::remove_file(&pidfile);
        Command::new(env!("CARGO_BIN_EXE_dsync"))
            .args(args)
            .env_remove("DSYNC_REPO")
            .env("DSYNC_RSH", &rsh)
            .env("DSYNC_REMOTE_DSYNC", env!("CARGO_BIN_EXE_dsync"))
            .env("DSYNC_CACHE_DIR", env.path("cache"))
            .env("DSYNC_TEST_PIDFILE", &pidfile)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let finish = |c: std::process::Child| {
        let o = c.wait_with_output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(finish(start(&["backup", "-q", &repo, s(&img)])).0, Some(0));
    let mut seed = 7u64;
    let mut killed = 0;
    for round in 1..=8u64 {
        change_image(&img, round, 50);
        let args: Vec<String> = if round % 3 == 0 {
            vec![
                "prune".into(),
                repo.clone(),
                "--keep-last".into(),
                "2".into(),
            ]
        } else {
            vec![
                "backup".into(),
                "-q".into(),
                repo.clone(),
                s(&img).to_string(),
            ]
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = start(&args);
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(std::time::Duration::from_millis(2 + (seed >> 33) % 60));
        if let Ok(pid) = std::fs::read_to_string(&pidfile) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        let (code, err) = finish(child);
        if code != Some(0) {
            killed += 1;
            assert_eq!(code, Some(1), "{args:?}: {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        }
        // Whatever the moment, what the repository holds is sound.
        env.ok(&["check", s(&repo_dir), "--read-data"]);
    }
    eprintln!("{killed} of 8 runs cut by the kill");
    assert!(
        killed >= 2,
        "only {killed} of 8 runs were cut: the kill came too late"
    );
    // And the next backup works and restores.
    assert_eq!(finish(start(&["backup", "-q", &repo, s(&img)])).0, Some(0));
    let out = env.path("out");
    env.ok(&["restore", "-q", s(&repo_dir), "latest", "--to", s(&out)]);
    assert_eq!(blake2(&out.join("disk.img")), blake2(&img));
}
