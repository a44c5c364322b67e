//! `dsync mount`: every snapshot as a read-only file tree (FUSE), in the
//! foreground or, with --daemon, in a child that the parent waits for until
//! the mount is ready.

use std::process::ExitCode;

use crate::cli::MountArgs;
use crate::output::diag;

/// Mounts and serves until unmounted.
pub fn run(o: MountArgs) -> anyhow::Result<()> {
    mount(&o, || {})
}

/// Mounts, calls `ready` once the mount can be used, and serves until
/// unmounted.
fn mount(o: &MountArgs, ready: impl FnOnce()) -> anyhow::Result<()> {
    let opts = dsync_fuse::MountOptions {
        allow_other: o.allow_other,
        cache_bytes: usize::try_from(o.cache_size).unwrap_or(usize::MAX),
        ..Default::default()
    };
    dsync_fuse::mount(&o.repo, &o.mountpoint, &opts, ready).map_err(|e| {
        // Repository errors come wrapped in io::Error: show them as they are.
        anyhow::anyhow!("{e}")
    })
}

/// `dsync mount --daemon`: the child mounts and serves; it tells the parent
/// through a pipe when the mount is ready, and the parent exits 0 then. If the
/// child fails first, its error is already on stderr and the parent exits 1.
///
/// Called before any thread exists (fork copies only the calling thread).
pub fn daemonize(o: MountArgs) -> ExitCode {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid two-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        diag!(
            "dsync: cannot create a pipe: {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    // SAFETY: no other thread exists yet in this process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        diag!("dsync: cannot fork: {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    if pid > 0 {
        return wait_until_ready(pid, fds);
    }
    serve_detached(&o, fds)
}

/// The parent: success once the child writes its byte, failure if the
/// child exits (closing the pipe) first.
fn wait_until_ready(child: libc::pid_t, fds: [i32; 2]) -> ExitCode {
    // SAFETY: closing our copy of the write end; reading one byte.
    unsafe { libc::close(fds[1]) };
    let mut b = [0u8; 1];
    let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
    if n == 1 {
        return ExitCode::SUCCESS;
    }
    let mut status = 0;
    unsafe { libc::waitpid(child, &mut status, 0) };
    ExitCode::FAILURE
}

/// The child: a session of its own, the mount, and once it is ready the
/// terminal let go of and the parent told.
fn serve_detached(o: &MountArgs, fds: [i32; 2]) -> ExitCode {
    unsafe {
        libc::close(fds[0]);
        libc::setsid();
    }
    let ready = || {
        // Detach from the terminal (log lines go to syslog from now on), then
        // tell the parent.
        dsync_fuse::log_to_syslog();
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if null >= 0 {
                libc::dup2(null, 0);
                libc::dup2(null, 1);
                libc::dup2(null, 2);
                libc::close(null);
            }
            libc::write(fds[1], [1u8].as_ptr().cast(), 1);
            libc::close(fds[1]);
        }
    };
    match mount(o, ready) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            diag!("dsync: {e:#}");
            ExitCode::FAILURE
        }
    }
}
