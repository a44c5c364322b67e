//! The `dsync` binary, kept thin (ripgrep's shape): parses the command line
//! (cli.rs), hands each command to its module in cmd/, and maps errors to
//! the documented exit codes, a closed pipe counting as success. output.rs
//! says how the commands print (never a panic on a closed stream).

mod cli;
mod cmd;
mod output;
mod progress;

use std::io::Write;
use std::process::ExitCode;

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
        Ok(args) => parse(args),
        Err(msg) => {
            diag!("dsync: {msg}");
            return ExitCode::from(2);
        }
    };
    // Read by the store when it reaches a remote repository; set while
    // this is the only thread.
    if let Some(rsh) = &cli.rsh {
        std::env::set_var("DSYNC_RSH", rsh);
    }
    if let Some(far) = &cli.remote_dsync {
        std::env::set_var("DSYNC_REMOTE_DSYNC", far);
    }
    if let Some(n) = cli.connections {
        std::env::set_var("DSYNC_CONNECTIONS", n.to_string());
    }
    if let Some(url) = &cli.s3_endpoint {
        std::env::set_var("AWS_ENDPOINT_URL", url);
    }
    let command = match cli.command {
        // Fork before any thread exists; the parent returns once the child's
        // mount is ready (or failed).
        Command::Mount(o) if o.daemon => return cmd::mount::daemonize(o),
        command => command,
    };
    match run(command, cli.quiet) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`dsync cat ... | head`) is not a failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            diag!("dsync: {}", one_line(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Hands the command to its module; standard output is flushed at the
/// end. It is not held locked: `backup --files` prints from the threads
/// that store the files.
fn run(command: Command, quiet: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    match command {
        Command::Init(o) => cmd::init::run(o, quiet, &mut out)?,
        Command::Backup(o) => cmd::backup::run(o, quiet, &mut out)?,
        Command::List(o) => cmd::list::run(o, &mut out)?,
        Command::Ls(o) => cmd::ls::run(o, &mut out)?,
        Command::Restore(o) => cmd::restore::run(o, quiet, &mut out)?,
        Command::Cat(o) => cmd::restore::cat(o, &mut out)?,
        Command::Mount(o) => cmd::mount::run(o)?,
        Command::Forget(o) => cmd::prune::forget(o, quiet, &mut out)?,
        Command::Copy(o) => cmd::copy::run(o, quiet, &mut out)?,
        Command::Prune(o) => cmd::prune::run(o, quiet, &mut out)?,
        Command::Diff(o) => cmd::diff::run(o, quiet, &mut out)?,
        Command::Du(o) => cmd::du::run(o, &mut out)?,
        Command::Sync(o) => cmd::sync::run(o, quiet, &mut out)?,
        Command::Serve(o) => cmd::serve::run(o)?,
        Command::Generate(o) => cmd::generate::run(o, quiet, &mut out)?,
        Command::ImportRdiffBackup(o) => cmd::import::run(o, quiet, &mut out)?,
        Command::Unlock(o) => cmd::unlock::run(o, quiet, &mut out)?,
        Command::Check(o) => cmd::check::run(o, quiet, &mut out)?,
    }
    // Stdout is line-buffered: what is left must fail here, not silently at exit.
    out.flush()?;
    Ok(())
}

/// The command line parsed; `sync`'s filter rules also in the order given
/// (rsync's first match depends on it, and clap keeps each option's
/// values apart).
fn parse(args: Vec<std::ffi::OsString>) -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches_from(args);
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Sync(o), Some(m)) = (&mut cli.command, matches.subcommand_matches("sync")) {
        o.rules = cmd::sync::rules_in_order(m);
    }
    cli
}

/// Whether `e` is, somewhere in its chain, a write to a closed pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let io = match c.downcast_ref::<Error>() {
            Some(Error::Io { source, .. }) => Some(source),
            _ => c.downcast_ref::<std::io::Error>(),
        };
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes on one line, a cause left out when the line
/// already ends with it (an I/O error on a path says its cause itself).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let t = cause.to_string();
        if !out.ends_with(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
    }
    out
}

/// Exit codes, documented in README.md and `dsync --help`.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<cmd::check::CheckFailed>().is_some() {
        return 3;
    }
    if e.downcast_ref::<cmd::backup::Incomplete>().is_some() {
        return 5;
    }
    if let Some(p) = e.downcast_ref::<cmd::sync::Partial>() {
        return p.code;
    }
    match e.downcast_ref::<Error>() {
        Some(e) if e.is_damage() => 3,
        Some(Error::Locked { .. }) => 4,
        _ => 1,
    }
}
