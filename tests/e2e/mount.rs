//! `dsync mount`: a real FUSE mount read with cp, qemu-img and plain reads,
//! compared byte for byte with the originals. A test that cannot mount fails;
//! only DSYNC_SKIP_FUSE=1 skips these tests (CI never sets it).

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::util::*;

pub fn skip() -> bool {
    if std::env::var_os("DSYNC_SKIP_FUSE").is_some_and(|v| v == "1") {
        eprintln!("DSYNC_SKIP_FUSE=1: skipping a FUSE test");
        return true;
    }
    false
}

/// A running `dsync mount`, unmounted (and checked to exit) on `unmount` or drop.
pub struct Mount {
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Mount {
    pub fn new(env: &Env, args: &[&str]) -> Mount {
        let dir = env.path("mnt");
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dsync"));
        cmd.arg("mount")
            .arg(env.repo())
            .arg(&dir)
            .args(args)
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn dsync mount");
        let t = Instant::now();
        while !dir.join("latest").exists() {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("dsync mount exited with {status} before the mount was ready: {err}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "mount not ready after 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Mount {
            dir,
            child: Some(child),
        }
    }

    /// Unmounts with fusermount3 and requires the process to exit cleanly.
    pub fn unmount(mut self) {
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status()
            .expect("fusermount3");
        assert!(st.success(), "fusermount3 -u failed");
        let mut child = self.child.take().unwrap();
        let t = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                if !status.success() {
                    use std::io::Read;
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                }
                assert!(status.success(), "dsync mount exited with {status}: {err}");
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "dsync mount still running 10 s after unmount"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The snapshot directories, oldest first.
    pub fn snapshot_dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().contains('T') && !p.is_symlink())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.dir)
                .status();
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Backs up `versions` (as disk.img) with a second's gap so that each gets its
/// own directory name; returns the originals' paths.
fn repo_of_versions(env: &Env, n: u64) -> Vec<PathBuf> {
    let img = env.path("disk.img");
    make_image(&img, 24 << 20, 11);
    let mut out = Vec::new();
    for day in 0..n {
        if day > 0 {
            change_image(&img, day, 30);
        }
        let keep = env.path(&format!("orig{day}.img"));
        std::fs::copy(&img, &keep).unwrap();
        env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
        out.push(keep);
        if day + 1 < n {
            std::thread::sleep(Duration::from_millis(1050));
        }
    }
    out
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run");
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn cp_every_version_and_seek_holes() {
    if skip() {
        return;
    }
    let env = Env::new();
    let origs = repo_of_versions(&env, 3);
    let m = Mount::new(&env, &[]);
    let dirs = m.snapshot_dirs();
    assert_eq!(dirs.len(), 3);
    for (k, d) in dirs.iter().enumerate() {
        let dest = env.path(&format!("cp{k}.img"));
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(d.join("disk.img"))
            .arg(&dest));
        assert_eq!(
            blake2(&dest),
            blake2(&origs[k]),
            "version {k} differs through the mount"
        );
        run(Command::new("cmp").arg(&dest).arg(&origs[k]));
    }
    // latest and the day link resolve to the newest.
    assert_eq!(blake2(&m.dir.join("latest/disk.img")), blake2(&origs[2]));
    let mounted = m.dir.join("latest/disk.img");
    let md = std::fs::metadata(&mounted).unwrap();
    assert_eq!(md.len(), 24 << 20);
    assert!(
        md.blocks() * 512 < md.len(),
        "st_blocks does not reflect holes"
    );
    // SEEK_DATA / SEEK_HOLE answer from the extent map.
    let f = std::fs::File::open(dirs[0].join("disk.img")).unwrap();
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&f);
    // SAFETY: valid fd.
    let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
    let data = unsafe { libc::lseek(fd, hole, libc::SEEK_DATA) };
    assert!(hole > 0 && data > hole, "hole {hole} data {data}");
    let orig = std::fs::read(&origs[0]).unwrap();
    assert!(orig[hole as usize..data as usize].iter().all(|&b| b == 0));
    // Writes are refused.
    let w = std::fs::OpenOptions::new().write(true).open(&mounted);
    assert_eq!(w.err().and_then(|e| e.raw_os_error()), Some(libc::EROFS));
    drop(f);
    m.unmount();
}

#[test]
fn random_reads_and_concurrent_readers() {
    if skip() {
        return;
    }
    let env = Env::new();
    let origs = repo_of_versions(&env, 2);
    let m = Mount::new(&env, &["--cache-size", "8M"]);
    let dirs = m.snapshot_dirs();
    let check = |k: usize, seed: u64, reads: usize| {
        let want = std::fs::read(&origs[k]).unwrap();
        let f = std::fs::File::open(dirs[k].join("disk.img")).unwrap();
        let mut x = seed | 1;
        for _ in 0..reads {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % want.len() as u64) as usize;
            let len = ((x >> 40) % 300_000) as usize + 1;
            let mut buf = vec![0u8; len];
            let n = f.read_at(&mut buf, off as u64).unwrap();
            let end = (off + len).min(want.len());
            assert_eq!(n, end - off);
            assert!(
                buf[..n] == want[off..end],
                "read of {len} at {off} differs in version {k}"
            );
        }
    };
    check(0, 42, 10_000);
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let check = &check;
            sc.spawn(move || check((t % 2) as usize, 1000 + t, 1500));
        }
    });
    m.unmount();
}

#[test]
fn qemu_img_reads_mounted_qcow2_versions() {
    if skip() {
        return;
    }
    let env = Env::new();
    let raw = env.path("disk.raw");
    make_image(&raw, 32 << 20, 21);
    let mut origs = Vec::new();
    for day in 0..2u64 {
        if day > 0 {
            change_image(&raw, day, 20);
        }
        let q = env.path("disk.qcow2");
        let _ = std::fs::remove_file(&q);
        run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]));
        let keep_q = env.path(&format!("orig{day}.qcow2"));
        let keep_r = env.path(&format!("orig{day}.raw"));
        std::fs::copy(&q, &keep_q).unwrap();
        std::fs::copy(&raw, &keep_r).unwrap();
        env.ok(&["backup", "-q", s(&env.repo()), s(&q)]);
        origs.push((keep_q, keep_r));
        std::thread::sleep(Duration::from_millis(1050));
    }
    let m = Mount::new(&env, &[]);
    for (k, d) in m.snapshot_dirs().iter().enumerate() {
        let mq = d.join("disk.qcow2");
        let (oq, or) = &origs[k];
        let info = run(Command::new("qemu-img").args(["info", "--output=json", s(&mq)]));
        assert!(info.contains("\"format\": \"qcow2\""), "{info}");
        run(Command::new("qemu-img").args(["check", s(&mq)]));
        run(Command::new("qemu-img").args(["compare", s(&mq), s(oq)]));
        let out = env.path(&format!("conv{k}.raw"));
        run(Command::new("qemu-img").args(["convert", "-O", "raw", s(&mq), s(&out)]));
        run(Command::new("cmp").arg(&out).arg(or));
        // The way a VM boots an old version: an overlay on the mounted file.
        let ov = env.path(&format!("overlay{k}.qcow2"));
        run(Command::new("qemu-img").args([
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&mq),
            "-F",
            "qcow2",
            s(&ov),
        ]));
        run(Command::new("qemu-img").args(["compare", s(&ov), s(oq)]));
    }
    m.unmount();
}

#[test]
fn damaged_frame_gives_eio_and_the_rest_reads() {
    if skip() {
        return;
    }
    let env = Env::new();
    let img = env.path("disk.img");
    let data = pseudo(8 << 20, 77);
    std::fs::write(&img, &data).unwrap();
    let other = env.path("other.img");
    std::fs::write(&other, pseudo(1 << 20, 78)).unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&img), s(&other)]);
    // Damage one byte in the middle of the (only) pack: inside disk.img's data.
    let pack = std::fs::read_dir(env.repo().join("packs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut b = [0u8; 1];
    let at = 4 << 20;
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    drop(f);
    let m = Mount::new(&env, &[]);
    let mounted = std::fs::File::open(m.dir.join("latest/disk.img")).unwrap();
    let mut eio = 0;
    let mut good = 0;
    for k in 0..(8 << 20) / (128 << 10) {
        let off = k * (128 << 10);
        let mut buf = vec![0u8; 128 << 10];
        // A read that meets the damage part-way returns the bytes before it
        // (a short read) and fails on the next: read the whole range.
        let mut n = 0;
        let res = loop {
            match mounted.read_at(&mut buf[n..], (off + n) as u64) {
                Ok(0) => break Ok(()),
                Ok(k) => {
                    n += k;
                    if n == buf.len() {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
        };
        assert!(buf[..n] == data[off..off + n], "wrong bytes at {off}");
        match res {
            Ok(()) => good += 1,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
                eio += 1;
            }
        }
    }
    assert!(eio >= 1, "the damaged frame was read without error");
    assert!(good >= 32, "only {good} good reads");
    // The rest of the mount keeps working.
    assert_eq!(blake2(&m.dir.join("latest/other.img")), blake2(&other));
    drop(mounted);
    m.unmount();
}

/// Flips one byte in the middle of every frame of the pack at `path`
/// (store/FORMAT.md, "Packs": the trailer locates the index, the index
/// every frame), so that whichever blob a reader asks for is damaged.
fn damage_every_frame(path: &Path) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut trailer = [0u8; 32];
    f.read_exact_at(&mut trailer, len - 32).unwrap();
    assert_eq!(&trailer[24..], b"DSYNCEND", "{}", path.display());
    let index = u64::from_le_bytes(trailer[0..8].try_into().unwrap());
    let frames = u32::from_le_bytes(trailer[8..12].try_into().unwrap());
    assert!(frames > 0, "{} has no frame", path.display());
    for k in 0..u64::from(frames) {
        let mut e = [0u8; 24];
        f.read_exact_at(&mut e, index + 24 * k).unwrap();
        let at = u64::from_le_bytes(e[0..8].try_into().unwrap());
        let clen = u32::from_le_bytes(e[8..12].try_into().unwrap());
        let mid = at + u64::from(clen) / 2;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, mid).unwrap();
        f.write_all_at(&[b[0] ^ 0x5a], mid).unwrap();
    }
}

/// The name of file `i` of [`paged_tree_backup`]'s big directory.
fn name(i: u32) -> String {
    format!("a-file-with-a-long-enough-name-{i:05}.txt")
}

/// A format 3 repository holding one backup of `t/`: `t/small.txt` and
/// `t/big/` with 2,000 files, far more than an inline list holds (16 KiB),
/// so that big's list is paged and its pages are blobs in a meta pack.
fn paged_tree_backup(env: &Env) {
    env.ok(&["init", "--format", "3", s(&env.repo())]);
    let t = env.path("t");
    let big = t.join("big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..2000 {
        std::fs::write(big.join(name(i)), format!("{i}")).unwrap();
    }
    std::fs::write(t.join("small.txt"), b"still readable").unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&t)]);
}

/// A format 3 directory whose list pages are damaged answers EIO, for a
/// name it holds and for one it does not (which cannot be known): never
/// ENOENT, which would say the name is absent. A name truly absent from a
/// readable directory stays ENOENT, and the rest of the tree reads.
#[test]
fn damaged_directory_list_gives_eio_not_enoent() {
    if skip() {
        return;
    }
    let env = Env::new();
    paged_tree_backup(&env);
    let metas: Vec<PathBuf> = std::fs::read_dir(env.repo().join("meta"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!metas.is_empty(), "no meta pack");
    for p in &metas {
        damage_every_frame(p);
    }
    let m = Mount::new(&env, &[]);
    let snap = m.dir.join("latest/t");
    let errno = |r: std::io::Result<std::fs::Metadata>| r.err().and_then(|e| e.raw_os_error());
    // Outside the damaged list: as before.
    assert_eq!(
        std::fs::read(snap.join("small.txt")).unwrap(),
        b"still readable"
    );
    assert_eq!(
        errno(std::fs::metadata(snap.join("absent"))),
        Some(libc::ENOENT)
    );
    assert!(std::fs::metadata(snap.join("big")).unwrap().is_dir());
    // Inside it: EIO, whether the name is there or not.
    for p in [name(0), name(1999), "absent".to_string()] {
        assert_eq!(
            errno(std::fs::metadata(snap.join("big").join(&p))),
            Some(libc::EIO),
            "stat of big/{p}"
        );
    }
    let listed =
        std::fs::read_dir(snap.join("big")).and_then(|d| d.collect::<std::io::Result<Vec<_>>>());
    assert_eq!(
        listed.err().and_then(|e| e.raw_os_error()),
        Some(libc::EIO),
        "ls of big"
    );
    m.unmount();
}

/// A meta pack missing with no prune about (the snapshot's record, read
/// again, still names it) is damage: the mount re-reads the record a
/// bounded number of times (as after a prune that replaced it), then
/// answers EIO, not ENOENT, and the rest of the tree reads.
#[test]
fn missing_meta_pack_gives_eio_not_enoent() {
    if skip() {
        return;
    }
    let env = Env::new();
    paged_tree_backup(&env);
    for e in std::fs::read_dir(env.repo().join("meta")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let m = Mount::new(&env, &[]);
    let snap = m.dir.join("latest/t");
    let errno = |r: std::io::Result<std::fs::Metadata>| r.err().and_then(|e| e.raw_os_error());
    assert_eq!(
        std::fs::read(snap.join("small.txt")).unwrap(),
        b"still readable"
    );
    for p in [name(0), "absent".to_string()] {
        assert_eq!(
            errno(std::fs::metadata(snap.join("big").join(&p))),
            Some(libc::EIO),
            "stat of big/{p}"
        );
    }
    m.unmount();
}

#[test]
fn new_snapshots_appear_and_sigterm_unmounts() {
    if skip() {
        return;
    }
    let env = Env::new();
    let origs = repo_of_versions(&env, 1);
    let mut m = Mount::new(&env, &[]);
    assert_eq!(m.snapshot_dirs().len(), 1);
    std::thread::sleep(Duration::from_millis(1050));
    change_image(&env.path("disk.img"), 9, 5);
    env.ok(&["backup", "-q", s(&env.repo()), s(&env.path("disk.img"))]);
    let t = Instant::now();
    while m.snapshot_dirs().len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the new snapshot did not appear"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        blake2(&m.dir.join("latest/disk.img")),
        blake2(&env.path("disk.img"))
    );
    assert_eq!(
        blake2(&m.snapshot_dirs()[0].join("disk.img")),
        blake2(&origs[0])
    );
    // SIGTERM unmounts cleanly and the process exits 0.
    let mut child = m.child.take().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "dsync mount ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(
        !m.dir.join("latest").exists(),
        "still mounted after SIGTERM"
    );
}

#[test]
fn mount_errors_are_one_line() {
    if skip() {
        return;
    }
    let env = Env::new();
    repo_of_versions(&env, 1);
    let err = env.fails(&["mount", s(&env.repo()), s(&env.path("missing"))], 1);
    assert!(err.contains("missing"), "{err}");
    let err = env.fails(&["mount", s(&env.path("norepo")), s(env.dir.path())], 1);
    assert!(err.contains("not a dsync repository"), "{err}");
    let m = Mount::new(&env, &[]);
    let err = env.fails(&["mount", s(&env.repo()), s(&m.dir)], 1);
    assert!(err.contains("busy"), "{err}");
    m.unmount();
}

#[test]
fn daemon_returns_once_ready() {
    if skip() {
        return;
    }
    let env = Env::new();
    let origs = repo_of_versions(&env, 1);
    let dir = env.path("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    env.ok(&["mount", s(&env.repo()), s(&dir), "--daemon"]);
    // Ready as soon as the command returned.
    assert_eq!(blake2(&dir.join("latest/disk.img")), blake2(&origs[0]));
    run(Command::new("fusermount3").arg("-u").arg(&dir));
    let t = Instant::now();
    while Path::new(&dir.join("latest")).exists() {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pages of `f` in `[off, off + len)` that the kernel's page cache holds.
fn resident_pages(f: &std::fs::File, off: u64, len: usize) -> Vec<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a read-only shared mapping of an open file, unmapped below;
    // mincore writes one byte per page into a vector of that many bytes.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            off as libc::off_t,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap of a mounted file");
        let mut v = vec![0u8; len.div_ceil(4096)];
        let r = libc::mincore(p, len, v.as_mut_ptr());
        libc::munmap(p, len);
        assert_eq!(r, 0, "mincore");
        v.into_iter().map(|b| b & 1 == 1).collect()
    }
}

/// A 4 KiB read that misses puts the rest of its frame into the page cache
/// (FUSE_NOTIFY_STORE), and those pages hold the right bytes.
#[test]
fn a_miss_prefills_its_frame() {
    if skip() {
        return;
    }
    let env = Env::new();
    let img = env.path("disk.img");
    // Incompressible, so the first version's frames map to 32 KiB-aligned
    // file ranges: [1 MiB, 1 MiB + 32 KiB) is one frame.
    let data = pseudo(4 << 20, 77);
    std::fs::write(&img, &data).unwrap();
    env.ok(&["backup", "-q", s(&env.repo()), s(&img)]);
    let m = Mount::new(&env, &[]);
    // As root, the mount reads ahead 1 MiB (its backing device's setting).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let dev = std::fs::metadata(&m.dir).unwrap().dev();
        let knob = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        );
        assert_eq!(
            std::fs::read_to_string(&knob).unwrap().trim(),
            "1024",
            "{knob}"
        );
    }
    let f = std::fs::File::open(m.dir.join("latest/disk.img")).unwrap();
    let frame = 1u64 << 20;
    assert!(
        resident_pages(&f, frame, 32768).iter().all(|r| !r),
        "pages cached before any read"
    );
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, frame + 8192).unwrap();
    assert!(b[..] == data[(frame + 8192) as usize..][..4096]);
    let t = Instant::now();
    while !resident_pages(&f, frame, 32768).iter().all(|&r| r) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "frame not prefilled: {:?}",
            resident_pages(&f, frame, 32768)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The prefilled pages read (from the page cache) as the original.
    let mut all = vec![0u8; 32768];
    f.read_exact_at(&mut all, frame).unwrap();
    assert!(
        all[..] == data[frame as usize..][..32768],
        "prefilled bytes differ"
    );
    drop(f);
    m.unmount();
}
