//! The README's quick start, run line by line as written, so that it cannot
//! drift from the binary. Paths are moved into the test's directory; the
//! repository already holds snapshots of 2024-04-30 and 2024-05-01, as a
//! user's would. Needs FUSE for its last three lines (DSYNC_SKIP_FUSE=1
//! skips those, loudly) and root for the block device line (a loop device;
//! DSYNC_SKIP_ROOT=1 runs it on a regular file instead).

use std::path::Path;
use std::process::Command;

use super::tree::assert_same;
use super::util::*;

/// The indented lines of the README's "Quick start" code block.
fn quick_start() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let mut lines = readme
        .lines()
        .skip_while(|l| l.trim() != "## Quick start")
        .skip(1)
        .skip_while(|l| l.trim().is_empty());
    let mut out = Vec::new();
    for l in lines.by_ref() {
        match l.strip_prefix("    ") {
            Some(cmd) => out.push(cmd.to_string()),
            None => break,
        }
    }
    assert!(
        out.len() >= 10,
        "README.md has no quick start block: {out:?}"
    );
    out
}

fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Writes `data` into the guest's view of a qcow2 image at `off`.
fn qemu_write(img: &Path, off: u64, pattern: u8, len: u64) {
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern} {off} {len}"),
        ])
        .arg(img)
        .output()
        .expect("qemu-io");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn readme_quick_start_runs() {
    let env = Env::new();
    let t = env.dir.path();
    let home = t.join("home");
    for d in ["home/vms", "backup", "tmp", "mnt/history", "dev/vg"] {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }
    let repo = env.repo();
    let img = home.join("vms/disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    qemu_write(&img, 0, 0x11, 4 << 20);
    // History made after the README's `dsync init` line, before the rest.
    let may1 = t.join("may1.raw");
    let history = || {
        let dsync = |args: &[&str]| env.ok(&[&args[..1], &[s(&repo)], &args[1..]].concat());
        dsync(&["backup", s(&img), "--time", "2024-04-30T03:00:00", "-q"]);
        qemu_write(&img, 8 << 20, 0x22, 1 << 20);
        dsync(&["backup", s(&img), "--time", "2024-05-01T03:00:00", "-q"]);
        qemu_img(&["convert", "-O", "raw", s(&img), s(&may1)]);
        qemu_write(&img, 20 << 20, 0x33, 1 << 20);
    };
    let mut history = Some(history);
    // The stream line's input, and the block device line's device.
    let raw = t.join("disk.raw");
    std::fs::write(&raw, pseudo(3 << 20, 9)).unwrap();
    let gz = Command::new("sh")
        .arg("-c")
        .arg("gzip -c \"$1\" > \"$2\"")
        .arg("sh")
        .arg(&raw)
        .arg(home.join("vms/disk.raw.gz"))
        .status()
        .expect("gzip");
    assert!(gz.success());
    let dev_file = t.join("dev/vg/disk-snap");
    std::fs::write(&dev_file, pseudo(2 << 20, 10)).unwrap();
    let mut _loop = None;
    let dev = if skip_root_test("README line's loop device (a regular file stands in)") {
        dev_file.display().to_string()
    } else {
        let lo = LoopDevice::attach(&dev_file);
        let d = lo.0.clone();
        _loop = Some(lo);
        d
    };
    let skip_fuse = std::env::var_os("DSYNC_SKIP_FUSE").is_some_and(|v| v == "1");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // Unmounted by the README's last line unless a line failed.
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    let _unmount = Unmount(t.join("mnt/history"));

    let bin_dir = Path::new(env!("CARGO_BIN_EXE_dsync")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // `backuphost:` is reached through a stand-in for ssh that runs the
    // command here.
    let rsh = t.join("rsh");
    std::fs::write(
        &rsh,
        "#!/bin/sh\nwhile [ \"$1\" = -p ]; do shift 2; done\nshift\nexec \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&rsh, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut ran = 0;
    for line in quick_start() {
        if skip_fuse && (line.contains("/mnt/history")) {
            eprintln!("DSYNC_SKIP_FUSE=1: not running README line: {line}");
            continue;
        }
        if !line.starts_with("dsync init ") {
            if let Some(h) = history.take() {
                h();
            }
        }
        let latest = if repo.join("config").exists() {
            env.ids().pop().unwrap_or_default()
        } else {
            String::new()
        };
        let cmd = line
            .replace("/tmp/", &format!("{}/", s(&t.join("tmp"))))
            .replace("/backup/vms", s(&repo))
            .replace("/mnt/history", s(&t.join("mnt/history")))
            .replace("/dev/vg/disk-snap", &dev)
            .replace("3f2a9c", latest.get(..6).unwrap_or("none"));
        let o = Command::new("bash")
            .arg("-c")
            .arg(format!("set -eo pipefail; {cmd}"))
            .env("HOME", &home)
            .env("PATH", &path)
            .env("DSYNC_RSH", &rsh)
            .env_remove("DSYNC_REPO")
            .current_dir(t)
            .output()
            .expect("sh");
        assert!(
            o.status.success(),
            "README line failed: {line}\nran: {cmd}\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        ran += 1;
    }
    assert!(ran >= 13, "only {ran} README lines ran");

    // What the lines made is right.
    let tmp = t.join("tmp");
    assert_eq!(
        blake2(&tmp.join("disk.qcow2")),
        blake2(&img),
        "restore latest"
    );
    let old = tmp.join("old/disk.qcow2");
    let cmp = |a: &Path, b: &Path| {
        let o = Command::new("qemu-img")
            .args(["compare", "-q"])
            .arg(a)
            .arg(b)
            .status()
            .expect("qemu-img compare");
        assert!(o.success(), "{} differs from {}", a.display(), b.display());
    };
    cmp(&old, &may1);
    if !skip_fuse {
        cmp(&tmp.join("old.raw"), &may1);
    }
    for f in ["disk.qcow2", "disk.raw.gz"] {
        assert_eq!(
            blake2(&tmp.join("vms-copy").join(f)),
            blake2(&home.join("vms").join(f)),
            "the directory's {f}"
        );
    }
    assert_same(&home.join("vms"), &tmp.join("vms-far"));
    let out = env.path("stream.raw");
    env.ok(&["restore", s(&repo), "latest", "--to", s(&out), "disk.raw"]);
    assert_eq!(blake2(&out), blake2(&raw), "the stream's snapshot");
    let list = env.ok(&["list", s(&repo)]);
    assert!(!list.contains("2024-04-30"), "forget 2024-04-30: {list}");
    assert!(list.contains("2024-05-01"), "{list}");
}
