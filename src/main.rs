//! The `dsync` binary: parses the command line, calls the store, prints, and
//! maps errors to exit codes. output.rs says how it prints (never a panic on
//! a closed stream).

mod cli;
mod cmd;
mod import;
mod output;
mod progress;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use dsync_store::Error;

use cli::{Cli, Command};
use output::diag;

/// A reader holds every pack of the version it reads open (so that a prune
/// running beside it cannot pull one away), and a version with a long
/// history spans many packs: lift the soft limit on open files to the hard
/// one, as most servers do, instead of failing with EMFILE at 1,024.
fn raise_open_file_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write or read one valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn main() -> ExitCode {
    raise_open_file_limit();
    let args = std::env::args_os().collect();
    let cli = match cli::with_repo(args, std::env::var_os("DSYNC_REPO")) {
        Ok(args) => Cli::parse_from(args),
        Err(msg) => {
            diag!("dsync: {msg}");
            return ExitCode::from(2);
        }
    };
    if let Command::Mount(cli::MountArgs { daemon: true, .. }) = &cli.command {
        // Fork before any thread exists; the parent returns once the child's
        // mount is ready (or failed).
        return daemonize(cli);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed pipe (`dsync cat ... | head`) is not a failure.
            let broken_pipe = e.chain().any(|c| {
                let io = match c.downcast_ref::<Error>() {
                    Some(Error::Io { source, .. }) => Some(source),
                    _ => c.downcast_ref::<std::io::Error>(),
                };
                io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe {
                return ExitCode::SUCCESS;
            }
            diag!("dsync: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Exit codes, documented in README.md and `dsync --help`.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<cmd::check::CheckFailed>().is_some() {
        return 3;
    }
    match e.downcast_ref::<Error>() {
        Some(Error::Corrupt { .. }) => 3,
        Some(Error::Locked { .. }) => 4,
        _ => 1,
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Init(o) => cmd::init::run(o, cli.quiet, &mut out)?,
        Command::Backup(o) => cmd::backup::run(o, cli.quiet, &mut out)?,
        Command::List(o) => cmd::list::run(o, &mut out)?,
        Command::Restore(o) => cmd::restore::run(o, cli.quiet, &mut out)?,
        Command::Mount(cli::MountArgs {
            repo,
            mountpoint,
            allow_other,
            cache_size,
            daemon: _,
        }) => {
            mount(&repo, &mountpoint, allow_other, cache_size, || {})?;
        }
        Command::Forget(o) => cmd::prune::forget(o, cli.quiet, &mut out)?,
        Command::Prune(o) => cmd::prune::run(o, cli.quiet, &mut out)?,
        Command::Diff(o) => cmd::diff::run(o, cli.quiet, &mut out)?,
        Command::Du(o) => cmd::du::run(o, &mut out)?,
        Command::Generate(o) => cmd::generate::run(o, cli.quiet, &mut out)?,
        Command::ImportRdiffBackup(cli::ImportRdiffBackupArgs { rdiff_repo, repo }) => {
            let n = import::import(&rdiff_repo, &repo, cli.quiet)?;
            if !cli.quiet {
                writeln!(out, "imported {n} versions from {}", rdiff_repo.display())?;
            }
        }
        Command::Unlock(o) => cmd::unlock::run(o, cli.quiet, &mut out)?,
        Command::Check(o) => cmd::check::run(o, cli.quiet, &mut out)?,
        Command::Cat(o) => cmd::restore::cat(o, &mut out)?,
    }
    // Stdout is line-buffered: what is left must fail here, not silently at exit.
    out.flush()?;
    Ok(())
}

fn mount(
    repo: &std::path::Path,
    mountpoint: &std::path::Path,
    allow_other: bool,
    cache_size: u64,
    ready: impl FnOnce(),
) -> anyhow::Result<()> {
    let opts = dsync_fuse::MountOptions {
        allow_other,
        cache_bytes: usize::try_from(cache_size).unwrap_or(usize::MAX),
        ..Default::default()
    };
    dsync_fuse::mount(repo, mountpoint, &opts, ready).map_err(|e| {
        // Repository errors come wrapped in io::Error: show them as they are.
        anyhow::anyhow!("{e}")
    })
}

/// `dsync mount --daemon`: the child mounts and serves; it tells the parent
/// through a pipe when the mount is ready, and the parent exits 0 then. If the
/// child fails first, its error is already on stderr and the parent exits 1.
fn daemonize(cli: Cli) -> ExitCode {
    let Command::Mount(cli::MountArgs {
        repo,
        mountpoint,
        allow_other,
        cache_size,
        ..
    }) = cli.command
    else {
        return ExitCode::FAILURE;
    };
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
        // SAFETY: closing our copy of the write end; reading one byte.
        unsafe { libc::close(fds[1]) };
        let mut b = [0u8; 1];
        let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
        if n == 1 {
            return ExitCode::SUCCESS;
        }
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return ExitCode::FAILURE;
    }
    // Child.
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
    match mount(&repo, &mountpoint, allow_other, cache_size, ready) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            diag!("dsync: {e:#}");
            ExitCode::FAILURE
        }
    }
}
