//! `dsync mount`: every version a repository holds, as a read-only file that
//! `cp`, `qemu-img` or a VM read directly. Reads go through the store's
//! [`dsync_store::VersionReader`] (one binary search in the version's extent
//! map, one frame from the shared LRU cache or the pack); this crate knows only
//! that reading API, and keeps fuser's types to itself.

mod affinity;
mod errno;
mod fs;
mod prefill;
mod tree;

use std::sync::atomic::{AtomicBool, Ordering};

static SYSLOG: AtomicBool = AtomicBool::new(false);

/// Sends the mount's log lines (damage, failed opens) to syslog instead of
/// standard error: for `--daemon`, which has no terminal.
pub fn log_to_syslog() {
    // SAFETY: the identifier is a static C string.
    unsafe { libc::openlog(c"dsync".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
    SYSLOG.store(true, Ordering::Relaxed);
}

/// One log line: what failed, on which snapshot, file and frame.
pub(crate) fn log(msg: &str) {
    if SYSLOG.load(Ordering::Relaxed) {
        if let Ok(c) = std::ffi::CString::new(msg.replace('\0', " ")) {
            // SAFETY: a valid format string and C string argument.
            unsafe { libc::syslog(libc::LOG_ERR, c"%s".as_ptr(), c.as_ptr()) };
        }
    } else {
        // Not eprintln!, which panics (in a FUSE callback) if stderr is closed.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "dsync mount: {msg}");
    }
}

use std::io;
use std::path::Path;

use dsync_store::Repo;

/// Threads serving a mount of a repository with latency (see [`mount`]).
const REMOTE_THREADS: usize = 16;

/// What `dsync mount` was asked for.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Let other users read the mount (needs user_allow_other in /etc/fuse.conf
    /// for non-root users).
    pub allow_other: bool,
    /// Bytes of decompressed frames to keep.
    pub cache_bytes: usize,
    /// Threads serving requests.
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: false,
            cache_bytes: 256 << 20,
            threads: 4,
        }
    }
}

/// Checks a mountpoint before mounting: it must be an existing directory that
/// is not already a mount point.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn check_mountpoint(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).map_err(|e| format!("mountpoint {}: {e}", path.display()))?;
    if !md.is_dir() {
        return Err(format!("mountpoint {} is not a directory", path.display()));
    }
    let abs =
        std::path::absolute(path).map_err(|e| format!("mountpoint {}: {e}", path.display()))?;
    if let Some(parent) = abs.parent() {
        let pmd = std::fs::metadata(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        if pmd.dev() != md.dev() || pmd.ino() == md.ino() {
            return Err(format!(
                "mountpoint {} is busy: something is already mounted there",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Mounts `repo` at `mountpoint` and serves it until it is unmounted
/// (`fusermount3 -u`, or SIGINT/SIGTERM, which unmount cleanly). `ready` is
/// called once the mount is usable.
///
/// # Errors
/// When the repository cannot be opened or the mount fails (no /dev/fuse, no
/// permission, busy mountpoint).
pub fn mount(
    repo: &Path,
    mountpoint: &Path,
    opts: &MountOptions,
    ready: impl FnOnce(),
) -> io::Result<()> {
    check_mountpoint(mountpoint).map_err(io::Error::other)?;
    // Resolved now: once mounted, looking the path up would ask the mount.
    let canonical = std::fs::canonicalize(mountpoint)?;
    let repo = Repo::open_with_cache(repo, opts.cache_bytes).map_err(io::Error::other)?;
    // A repository across a network is served by more threads: each waits
    // a round trip per uncached frame, and random readers then have that
    // many in flight.
    let threads = match repo.is_remote() {
        true => opts.threads.max(REMOTE_THREADS),
        false => opts.threads.max(1),
    };
    let cache = repo.cache().clone();
    let frame_size = repo.config().frame_size as usize;
    let tree = tree::Tree::new(repo).map_err(io::Error::other)?;
    let prefill = std::sync::Arc::new(prefill::Prefill::default());
    let fs = fs::DsyncFs {
        tree,
        prefill: prefill.clone(),
    };

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("dsync".into()),
        fuser::MountOption::Subtype("dsync".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::DefaultPermissions,
    ];
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(threads);

    // SIGINT and SIGTERM are handled by one thread that unmounts; every other
    // thread (fuser's included) inherits the blocked mask.
    let sigs = signal_set();
    // SAFETY: sigs is a valid, initialised set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &sigs, std::ptr::null_mut()) };
    let mut session = fuser::Session::new(fs, mountpoint, &config).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot mount at {}: {e}", mountpoint.display()),
        )
    })?;
    let mut unmounter = session.unmount_callable();
    std::thread::Builder::new()
        .name("dsync-signals".into())
        .spawn(move || {
            let sigs = signal_set();
            let mut sig = 0;
            // SAFETY: valid set and out pointer.
            unsafe { libc::sigwait(&sigs, &mut sig) };
            if let Err(e) = unmounter.unmount() {
                log(&format!("unmount failed: {e}"));
            }
        })?;
    // Started here, after the signal mask: they inherit SIGINT/SIGTERM blocked.
    cache.keep_spares_warm(frame_size);
    if let Err(e) = prefill.start(session.notifier()) {
        log(&format!("cannot start the prefill thread: {e}"));
    }
    raise_readahead(&canonical);
    ready();
    session.run()
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds valid signals.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGINT);
        libc::sigaddset(&mut s, libc::SIGTERM);
        s
    }
}

/// Readahead the mount's sequential readers get, in KiB.
const READAHEAD_KB: u32 = 1024;

/// Raises the kernel's readahead for the mount from FUSE's 128 KiB to 1 MiB
/// (the mount's backing-device setting; root may write it): more requests in
/// flight keep both cores busy, so `cat`/`cp` of a version went from
/// 1,029-1,361 to 1,241-1,818 MB/s in alternating runs. Without permission
/// nothing changes but speed.
fn raise_readahead(canonical: &Path) {
    // Not stat(): nothing serves the mount's requests yet. mountinfo names
    // each mount's device as major:minor.
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let Some(dev) = mount_device(&info, &canonical.to_string_lossy()) else {
        return;
    };
    let _ = std::fs::write(
        format!("/sys/class/bdi/{dev}/read_ahead_kb"),
        READAHEAD_KB.to_string(),
    );
}

/// The `major:minor` of the newest mount at `path` in a mountinfo text
/// (fields: id, parent, major:minor, root, mount point with spaces and
/// backslashes escaped as octal, ...).
fn mount_device(info: &str, path: &str) -> Option<String> {
    let escaped = path
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && f[4] == escaped).then(|| f[2].to_string())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn mount_device_from_mountinfo() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
                    90 22 0:39 / /tmp/a\\040b rw - fuse.dsync dsync ro\n\
                    91 22 0:40 / /tmp/a\\040b rw - fuse.dsync dsync ro\n";
        assert_eq!(
            super::mount_device(info, "/tmp/a b").as_deref(),
            Some("0:40")
        );
        assert_eq!(super::mount_device(info, "/tmp/a"), None);
    }
}
