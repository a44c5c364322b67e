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
