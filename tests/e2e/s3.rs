//! Repositories on S3-compatible object storage, against a real S3 server:
//! s3s-fs (`cargo install --locked s3s-fs@0.14.1 --features binary`, as
//! scripts/setup.sh does), started by each test on 127.0.0.1 with its own
//! root directory. Without s3s-fs these tests fail, unless DSYNC_SKIP_S3=1
//! says to skip them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::util::*;

const KEY: &str = "dsync";
const SECRET: &str = "dsyncsecret";
const BUCKET: &str = "dsync-test";

/// An s3s-fs on a free port of 127.0.0.1, serving `root` (a directory
/// under it is a bucket).
struct S3Server {
    child: std::process::Child,
    port: u16,
    root: PathBuf,
}

fn s3s_fs() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("s3s-fs"))
            .find(|f| f.is_file())
    });
    // Where `cargo install` put it: $CARGO_HOME/bin, else ~/.cargo/bin.
    let in_cargo = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin/s3s-fs"))
        .filter(|f| f.is_file());
    on_path.or(in_cargo).unwrap_or_else(|| {
        panic!(
            "no s3s-fs: install it with `cargo install --locked s3s-fs@0.14.1 --features binary` \
             (scripts/setup.sh does), or skip the S3 tests with DSYNC_SKIP_S3=1"
        )
    })
}

impl S3Server {
    /// The server, or `None` when DSYNC_SKIP_S3=1 says to skip.
    fn start(env: &Env, what: &str) -> Option<S3Server> {
        if std::env::var_os("DSYNC_SKIP_S3").is_some_and(|v| v == "1") {
            eprintln!("DSYNC_SKIP_S3=1: skipping the {what} test");
            return None;
        }
        let root = env.path("s3root");
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new(s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", KEY, "--secret-key", SECRET])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "s3s-fs did not listen on 127.0.0.1:{port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(S3Server { child, port, root })
    }

    /// Runs dsync with this server's endpoint and credentials, and the
    /// test's cache directory.
    fn run(&self, env: &Env, args: &[&str]) -> Output {
        self.run_with(env, args, &[])
    }

    /// As [`S3Server::run`], with more environment variables.
    fn run_with(&self, env: &Env, args: &[&str], vars: &[(&str, &str)]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_dsync"))
            .args(args)
            .envs(vars.iter().copied())
            .env_remove("DSYNC_REPO")
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_REGION", "us-east-1")
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.port),
            )
            .env("DSYNC_CACHE_DIR", env.path("cache"))
            .current_dir(env.dir.path())
            .output()
            .expect("run dsync")
    }

    fn ok(&self, env: &Env, args: &[&str]) -> String {
        let o = self.run(env, args);
        assert!(
            o.status.success(),
            "dsync {args:?} failed with {:?}: {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn ids(&self, env: &Env, repo: &str) -> Vec<String> {
        self.ok(env, &["list", repo, "--json"])
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json line");
                v["id"].as_str().expect("id").to_string()
            })
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn an_s3_repository_backs_up_restores_checks_and_prunes() {
    let env = Env::new();
    let Some(srv) = S3Server::start(&env, "S3 backup and restore") else {
        return;
    };
    let repo = format!("s3://{BUCKET}/vms");
    let img = env.path("disk.img");
    make_image(&img, 48 << 20, 3);
    let day0 = env.path("day0.img");
    std::fs::copy(&img, &day0).unwrap();
    srv.ok(&env, &["init", &repo]);
    srv.ok(&env, &["backup", "-q", &repo, s(&img)]);
    change_image(&img, 1, 40);
    srv.ok(&env, &["backup", "-q", &repo, s(&img)]);
    let ids = srv.ids(&env, &repo);
    assert_eq!(ids.len(), 2);

    // The objects are the local layout's files under the prefix.
    let stored = files_under(&srv.root.join(BUCKET).join("vms"));
    assert!(stored.contains(&PathBuf::from("config")), "{stored:?}");
    assert!(
        stored.iter().any(|p| p.starts_with("snapshots")),
        "{stored:?}"
    );
    assert!(
        !stored.iter().any(|p| p.starts_with("locks")),
        "a lock left behind: {stored:?}"
    );

    for (id, want) in [(&ids[0], &day0), (&ids[1], &img)] {
        let out = env.path(&format!("out-{id}"));
        srv.ok(
            &env,
            &["restore", "-q", &repo, id, "--to", s(&out), "disk.img"],
        );
        assert_eq!(blake2(&out), blake2(want), "snapshot {id}");
    }
    let cat = srv.run(&env, &["cat", &repo, &ids[0], "disk.img"]);
    assert!(cat.status.success());
    assert_eq!(cat.stdout, std::fs::read(&day0).unwrap());
    srv.ok(&env, &["check", "--read-data", &repo]);

    // Forget the older one and prune: what it alone used is marked, and
    // goes at a prune past the grace (a day; here none); the newer
    // snapshot restores the same.
    srv.ok(&env, &["forget", "-q", &repo, &ids[0]]);
    let count = |dir: &str| files_under(&srv.root.join(BUCKET).join("vms").join(dir)).len();
    let (metas, packs) = (count("meta"), count("packs"));
    let out = srv.ok(&env, &["prune", &repo]);
    assert!(out.contains("objects marked"), "{out}");
    // (A repack may have written a new pack: nothing went.)
    assert!(count("meta") >= metas && count("packs") >= packs);
    let (metas, packs) = (count("meta"), count("packs"));
    assert_eq!(count("pending"), 1);
    let o = srv.run_with(&env, &["prune", "-q", &repo], &[("DSYNC_S3_GRACE", "0")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(count("meta") + count("packs") < metas + packs);
    assert_eq!(count("pending"), 0);
    assert_eq!(srv.ids(&env, &repo), vec![ids[1].clone()]);
    let out = env.path("after-prune");
    srv.ok(
        &env,
        &["restore", "-q", &repo, &ids[1], "--to", s(&out), "disk.img"],
    );
    assert_eq!(blake2(&out), blake2(&img));
    srv.ok(&env, &["check", "--read-data", &repo]);
}

#[test]
fn a_local_repository_copied_file_by_file_is_an_s3_repository() {
    let env = Env::new();
    let Some(srv) = S3Server::start(&env, "copied repository") else {
        return;
    };
    let img = env.path("disk.img");
    make_image(&img, 8 << 20, 5);
    env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    let id = env.ids()[0].clone();
    // s3s-fs keeps a bucket's objects as files under its directory: a copy
    // there is what an S3 sync tool's upload gives.
    let prefix = srv.root.join(BUCKET).join("copied");
    for rel in files_under(&env.repo()) {
        let to = prefix.join(&rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(env.repo().join(&rel), to).unwrap();
    }
    let repo = format!("s3://{BUCKET}/copied");
    assert_eq!(srv.ids(&env, &repo), vec![id.clone()]);
    let out = env.path("out");
    srv.ok(
        &env,
        &["restore", "-q", &repo, &id, "--to", s(&out), "disk.img"],
    );
    assert_eq!(blake2(&out), blake2(&img));
    srv.ok(&env, &["check", "--read-data", &repo]);
}

#[test]
fn a_second_writer_is_refused_while_the_first_holds_the_s3_lock() {
    let env = Env::new();
    let Some(srv) = S3Server::start(&env, "S3 lock") else {
        return;
    };
    let repo = format!("s3://{BUCKET}/locked");
    srv.ok(&env, &["init", &repo]);
    // A lock object as a live writer leaves it (written just now).
    let lock = srv.root.join(BUCKET).join("locked/locks/writer");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    std::fs::write(&lock, "host=elsewhere pid=1 since=now\n").unwrap();
    let img = env.path("disk.img");
    make_image(&img, 1 << 20, 9);
    let o = srv.run(&env, &["backup", "-q", &repo, s(&img)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a backup ran beside a held lock");
    assert!(err.contains("host=elsewhere"), "{err}");
    assert!(srv.ids(&env, &repo).is_empty());
    // Released, the next backup goes ahead.
    std::fs::remove_file(&lock).unwrap();
    srv.ok(&env, &["backup", "-q", &repo, s(&img)]);
    assert_eq!(srv.ids(&env, &repo).len(), 1);
}

#[test]
fn cp_and_qemu_img_read_versions_through_a_mount_of_an_s3_repository() {
    if super::mount::skip() {
        return;
    }
    let env = Env::new();
    let Some(srv) = S3Server::start(&env, "S3 mount") else {
        return;
    };
    let repo = format!("s3://{BUCKET}/mounted");
    let raw = env.path("disk.raw");
    make_image(&raw, 24 << 20, 31);
    let mut origs = Vec::new();
    for day in 0..2u64 {
        if day > 0 {
            change_image(&raw, day, 20);
        }
        let q = env.path("disk.qcow2");
        let _ = std::fs::remove_file(&q);
        let o = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)])
            .output()
            .expect("qemu-img (qemu-utils)");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (keep_q, keep_r) = (env.path(&format!("q{day}")), env.path(&format!("r{day}")));
        std::fs::copy(&q, &keep_q).unwrap();
        std::fs::copy(&raw, &keep_r).unwrap();
        srv.ok(&env, &["backup", "-q", &repo, s(&q), s(&raw)]);
        origs.push((keep_q, keep_r));
        std::thread::sleep(Duration::from_millis(1050));
    }
    let dir = env.path("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args(["mount", &repo, s(&dir)])
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", srv.port))
        .env("DSYNC_CACHE_DIR", env.path("cache"))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dsync mount");
    let unmount = |child: &mut std::process::Child| {
        let _ = Command::new("fusermount3").arg("-u").arg(&dir).status();
        let t = Instant::now();
        while child.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().unwrap()
    };
    let t = Instant::now();
    while !dir.join("latest").exists() {
        if t.elapsed() > Duration::from_secs(20) || child.try_wait().unwrap().is_some() {
            unmount(&mut child);
            panic!("the mount of {repo} was not ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().contains('T') && !p.is_symlink())
        .collect();
    snaps.sort();
    let checks = (|| -> Result<(), String> {
        if snaps.len() != 2 {
            return Err(format!("snapshot directories: {snaps:?}"));
        }
        for (k, d) in snaps.iter().enumerate() {
            let (oq, or) = &origs[k];
            let copy = env.path(&format!("copy{k}"));
            let cp = Command::new("cp")
                .arg(d.join("disk.raw"))
                .arg(&copy)
                .status()
                .unwrap();
            if !cp.success() || blake2(&copy) != blake2(or) {
                return Err(format!("cp of {} differs", d.display()));
            }
            let cmp = Command::new("qemu-img")
                .args(["compare", s(&d.join("disk.qcow2")), s(oq)])
                .output()
                .unwrap();
            if !cmp.status.success() {
                return Err(format!(
                    "qemu-img compare: {}",
                    String::from_utf8_lossy(&cmp.stdout)
                ));
            }
        }
        Ok(())
    })();
    let status = unmount(&mut child);
    checks.unwrap();
    assert!(status.success(), "dsync mount exited with {status}");
}

#[test]
fn copy_moves_history_from_a_local_repository_to_s3_and_back() {
    let env = Env::new();
    let Some(srv) = S3Server::start(&env, "S3 copy") else {
        return;
    };
    let img = env.path("disk.img");
    make_image(&img, 12 << 20, 41);
    let mut days = Vec::new();
    for day in 0..3u64 {
        if day > 0 {
            change_image(&img, day, 30);
        }
        let keep = env.path(&format!("day{day}"));
        std::fs::copy(&img, &keep).unwrap();
        days.push(keep);
        env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    }
    let ids = env.ids();
    let off = format!("s3://{BUCKET}/offsite");
    // The first two, then all: only the third crosses the second time.
    let v: serde_json::Value = serde_json::from_str(&srv.ok(
        &env,
        &["copy", "--json", s(&env.repo()), &off, &ids[0], &ids[1]],
    ))
    .unwrap();
    assert_eq!(v["copied"].as_array().unwrap().len(), 2, "{v}");
    let first_bytes = v["bytes"].as_u64().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&srv.ok(&env, &["copy", "--json", s(&env.repo()), &off])).unwrap();
    assert_eq!(v["copied"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["already"], 2, "{v}");
    assert!(
        v["bytes"].as_u64().unwrap() < first_bytes,
        "the second copy sent {} after {first_bytes}",
        v["bytes"]
    );
    assert_eq!(srv.ids(&env, &off), ids);
    srv.ok(&env, &["check", "--read-data", &off]);
    // And back into a new local repository.
    let back = env.path("back");
    srv.ok(&env, &["copy", "-q", &off, s(&back)]);
    assert_eq!(env.ids_of(&back), ids);
    for (k, id) in ids.iter().enumerate() {
        let out = env.path(&format!("out{k}"));
        env.ok(&["restore", "-q", s(&back), id, "--to", s(&out), "disk.img"]);
        assert_eq!(blake2(&out), blake2(&days[k]), "snapshot {id}");
    }
    env.ok(&["check", "--read-data", s(&back)]);
}
