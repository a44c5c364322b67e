//! Helpers: a temporary directory per test, running the binary, making images.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use dsync_store::testdata::pseudo;

pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn repo(&self) -> PathBuf {
        self.path("repo")
    }

    /// Runs dsync; returns its output whatever the exit status.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_dsync"))
            .args(args)
            .env_remove("DSYNC_REPO")
            .current_dir(self.dir.path())
            .output()
            .expect("run dsync")
    }

    /// Runs dsync and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "dsync {:?} failed with {:?}: {}",
            args,
            o.status.code(),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs dsync, requires failure with `code`, and returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(code), "dsync {args:?}: stderr {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "not one line on stderr: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        err
    }

    /// Snapshot ids, oldest first, from `dsync list --json`.
    pub fn ids(&self) -> Vec<String> {
        self.ids_of(&self.repo())
    }

    /// The snapshot ids of the repository at `repo`, oldest first.
    pub fn ids_of(&self, repo: &Path) -> Vec<String> {
        let out = self.ok(&["list", repo.to_str().unwrap(), "--json"]);
        out.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json line");
                v["id"].as_str().expect("id").to_string()
            })
            .collect()
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Tests that mount a tmpfs or set up a loop device need root; they fail
/// loudly without it unless DSYNC_SKIP_ROOT=1 says to skip them.
pub fn skip_root_test(what: &str) -> bool {
    if std::env::var_os("DSYNC_SKIP_ROOT").is_some_and(|v| v == "1") {
        eprintln!("DSYNC_SKIP_ROOT=1: skipping the {what} test");
        return true;
    }
    false
}

/// BLAKE2b-256 of a file's bytes.
pub fn blake2(path: &Path) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(path).expect("open");
    let mut st = blake2b_simd::Params::new().hash_length(32).to_state();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        st.update(&buf[..n]);
    }
    st.finalize().to_hex().to_string()
}

/// A sparse "disk image" of `size` bytes: data regions with holes between.
pub fn make_image(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("set_len");
    let mut at = 0u64;
    let mut k = 0;
    while at < size {
        let len = (1 << 20) + (k * 37_000) % (3 << 20);
        let len = len.min(size - at);
        f.write_all_at(&pseudo(len as usize, seed + k), at)
            .expect("write");
        at += len + (2 << 20);
        k += 1;
    }
}

/// Day-to-day changes: scattered aligned 4 KiB writes, an inserted range (all
/// later bytes shift), and a zeroed run.
pub fn change_image(path: &Path, day: u64, writes: usize) {
    let mut data = std::fs::read(path).expect("read image");
    let size = data.len();
    for w in 0..writes {
        let at = ((pseudo(8, day * 1000 + w as u64)[0] as usize * 65_537 + w * 1_048_583)
            % (size - 4096))
            & !4095;
        data[at..at + 4096].copy_from_slice(&pseudo(4096, day * 7919 + w as u64));
    }
    let ins = size / 3 + day as usize * 4099;
    data.splice(ins..ins, pseudo(3001, day));
    data.truncate(size);
    let z = size / 2 + day as usize * 65_536;
    data[z..z + 200_000].fill(0);
    std::fs::write(path, data).expect("write image");
}

/// Bytes that differ between two equal-length files.
pub fn changed_bytes(a: &Path, b: &Path) -> u64 {
    let x = std::fs::read(a).expect("read");
    let y = std::fs::read(b).expect("read");
    x.iter().zip(&y).filter(|(p, q)| p != q).count() as u64
        + (x.len() as i64 - y.len() as i64).unsigned_abs()
}

/// A loop device over a file (needs root), detached when dropped.
pub struct LoopDevice(pub String);

impl LoopDevice {
    pub fn attach(file: &Path) -> LoopDevice {
        let o = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            o.status.success(),
            "losetup needs root (DSYNC_SKIP_ROOT=1 skips what needs it): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        LoopDevice(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
