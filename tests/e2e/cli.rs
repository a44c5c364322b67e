//! The command line as a shell uses it: output into a pipe that its reader
//! closes early (`| head`), and where the repository comes from (REPO,
//! `-r`, DSYNC_REPO).

use std::io::Read;
use std::process::{Command, Stdio};

use super::util::*;

/// A repository whose `list --json`, `diff --json` and `cat` each print far
/// more than a pipe holds (64 KiB), so that the writer is still writing when
/// the reader goes away: snapshot 1 holds a 48 MiB disk.img, snapshot 2 the
/// same with every other 4 KiB block changed (6144 changed ranges) plus 400
/// files with long names (their paths make one `list --json` line ~100 KiB).
fn big_output_repo(env: &Env) {
    let img = env.path("disk.img");
    let mut data = pseudo(48 << 20, 1);
    std::fs::write(&img, &data).unwrap();
    env.ok(&[
        "backup",
        "-q",
        s(&env.repo()),
        s(&img),
        "--time",
        "@1700000000",
    ]);
    for (k, block) in data.chunks_mut(4096).enumerate().step_by(2) {
        block.copy_from_slice(&pseudo(4096, 1000 + k as u64));
    }
    std::fs::write(&img, &data).unwrap();
    let dir = env.path("many");
    std::fs::create_dir(&dir).unwrap();
    let mut args: Vec<String> = [
        "backup",
        "-q",
        s(&env.repo()),
        s(&img),
        "--time",
        "@1700000100",
    ]
    .map(String::from)
    .to_vec();
    for k in 0..400 {
        let f = dir.join(format!("{k:03}-{}", "x".repeat(200)));
        std::fs::write(&f, pseudo(100, k)).unwrap();
        args.push(s(&f).to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.ok(&args);
}

/// Runs dsync with standard output into a pipe, reads 10 bytes, closes the
/// pipe and waits: dsync must exit 0 (a closed pipe is not a failure) without
/// a panic (exit 101, "failed printing to stdout").
fn into_closed_pipe(env: &Env, args: &[&str]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args(args)
        .env_remove("DSYNC_REPO")
        .current_dir(env.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dsync");
    let mut head = [0u8; 10];
    child
        .stdout
        .take()
        .unwrap()
        .read_exact(&mut head)
        .expect("the first 10 bytes");
    // The read end is dropped here: dsync's next write fails with EPIPE.
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "dsync {args:?}: {err}");
    assert_eq!(o.status.code(), Some(0), "dsync {args:?}: {err}");
    assert_eq!(err, "", "dsync {args:?} printed on stderr");
}

#[test]
fn closed_stdout_is_not_a_failure() {
    let env = Env::new();
    big_output_repo(&env);
    let repo = env.repo();
    let repo = s(&repo);
    let ids = env.ids();
    let first = &ids[0];
    into_closed_pipe(&env, &["list", repo, "--json"]);
    into_closed_pipe(&env, &["list", repo]);
    into_closed_pipe(&env, &["diff", repo, first, "latest", "--json"]);
    into_closed_pipe(&env, &["diff", repo, first, "latest"]);
    into_closed_pipe(&env, &["cat", repo, "latest", "disk.img"]);
}

/// A closed standard error (its reader gone): the error message is lost, but
/// dsync still exits with the error's code, not with a panic's 101.
#[test]
fn closed_stderr_keeps_the_exit_code() {
    let env = Env::new();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let st = Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args(["list", s(&env.path("no-such-repo"))])
        .env_remove("DSYNC_REPO")
        .stdout(Stdio::null())
        .stderr(writer)
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(1));
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let st = Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args(["list", "a", "b", "c"])
        .env_remove("DSYNC_REPO")
        .stderr(writer)
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(2), "bad usage");
}

/// Runs dsync with DSYNC_REPO set to `env_repo`; requires success.
fn with_env(env: &Env, env_repo: &std::path::Path, args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args(args)
        .env("DSYNC_REPO", env_repo)
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "DSYNC_REPO={} dsync {args:?}: {}",
        env_repo.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Snapshot count of a repository, read without DSYNC_REPO.
fn count(env: &Env, repo: &std::path::Path) -> usize {
    env.ok(&["list", s(repo), "--json"]).lines().count()
}

#[test]
fn an_explicit_repo_wins_over_dsync_repo() {
    let env = Env::new();
    let (repo, other) = (env.repo(), env.path("other"));
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(1 << 20, 3)).unwrap();
    env.ok(&["backup", "-q", s(&repo), s(&img), "--time", "@1700000000"]);
    env.ok(&["backup", "-q", s(&other), s(&img), "--time", "@1800000000"]);
    let mine = &env.ids()[0];

    // Commands whose arguments are complete keep them.
    let list = with_env(&env, &other, &["list", s(&repo), "--json"]);
    assert_eq!(list.lines().count(), 1);
    assert!(list.contains(mine.as_str()), "{list}");
    let check = with_env(&env, &other, &["check", s(&repo), "--read-data"]);
    assert!(check.contains("no problems"), "{check}");
    let du = with_env(&env, &other, &["du", s(&repo), "--json"]);
    assert!(du.contains(mine.as_str()), "{du}");

    // backup: an existing repository in REPO's place is REPO...
    with_env(
        &env,
        &other,
        &["backup", "-q", s(&repo), s(&img), "--checksum"],
    );
    assert_eq!((count(&env, &repo), count(&env, &other)), (2, 1));
    // ...a file is a file, backed up into DSYNC_REPO.
    with_env(&env, &other, &["backup", "-q", s(&img), "--checksum"]);
    assert_eq!((count(&env, &repo), count(&env, &other)), (2, 2));
    // -r wins over DSYNC_REPO, and creates a new repository.
    let new = env.path("new");
    with_env(&env, &other, &["-r", s(&new), "backup", "-q", s(&img)]);
    assert_eq!((count(&env, &new), count(&env, &other)), (1, 2));
    // The snapshot arguments of restore are not mistaken for REPO.
    with_env(
        &env,
        &repo,
        &["restore", mine, "--to", s(&env.path("out.img")), "disk.img"],
    );
    assert_eq!(blake2(&env.path("out.img")), blake2(&img));
}

#[test]
fn import_rdiff_backup_keeps_its_destination_with_dsync_repo_set() {
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir(&src).unwrap();
    let img = src.join("disk.img");
    std::fs::write(&img, pseudo(1 << 20, 4)).unwrap();
    let rdiff = env.path("rdiff");
    let o = Command::new("rdiff-backup")
        .arg("backup")
        .arg(&src)
        .arg(&rdiff)
        .output()
        .expect("rdiff-backup is installed by scripts/setup.sh");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (dest, other) = (env.repo(), env.path("other"));
    with_env(
        &env,
        &other,
        &["import-rdiff-backup", s(&rdiff), s(&dest), "-q"],
    );
    assert_eq!(count(&env, &dest), 1);
    assert!(!other.exists(), "DSYNC_REPO was not the destination");
    let out = env.path("out");
    env.ok(&["restore", s(&dest), "latest", "--to", s(&out)]);
    assert_eq!(blake2(&out.join("disk.img")), blake2(&img));
}
