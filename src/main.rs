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
use dsync_store::{Error, Repo};

use cli::{Cli, Command};
use output::{diag, human};
use progress::Bar;

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

/// `dsync check` found damage (already listed on standard output).
#[derive(Debug)]
struct CheckFailed(usize);

impl std::fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the repository is damaged: {} problems (listed above)",
            self.0
        )
    }
}

impl std::error::Error for CheckFailed {}

/// Exit codes, documented in README.md and `dsync --help`.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<CheckFailed>().is_some() {
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
        Command::Forget(cli::ForgetArgs {
            repo,
            snapshots,
            json,
        }) => {
            let r = Repo::open(&repo)?;
            let mut ids = Vec::new();
            for spec in &snapshots {
                ids.push(r.resolve(spec)?.id);
            }
            ids.sort();
            ids.dedup();
            dsync_store::prune::forget(&r, &ids)?;
            if json {
                let v: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                writeln!(out, "{}", serde_json::json!({ "forgotten": v }))?;
            } else if !cli.quiet {
                writeln!(
                    out,
                    "forgot {} snapshots; `dsync prune {}` reclaims the space they alone used",
                    ids.len(),
                    repo.display()
                )?;
            }
        }
        Command::Prune(cli::PruneArgs {
            repo,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            repack_below,
            dry_run,
            json,
        }) => {
            let r = Repo::open(&repo)?;
            let policy = dsync_store::prune::KeepPolicy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
            };
            let bar = Bar::new(cli.quiet || json);
            let done = dsync_store::prune::prune(&r, &policy, repack_below, dry_run, &bar);
            bar.done();
            let (plan, rep) = done?;
            let (kept, forgotten) = (plan.kept, plan.forgotten);
            if json {
                let list = |v: &[dsync_store::prune::Decision]| -> Vec<serde_json::Value> {
                    v.iter()
                        .map(|d| serde_json::json!({"id": d.id.to_string(), "time": dsync_store::time::local(d.time_ns), "reasons": d.reasons}))
                        .collect()
                };
                let v = serde_json::json!({
                    "dry_run": dry_run, "kept": list(&kept), "forgotten": list(&forgotten),
                    "packs_deleted": rep.packs_deleted, "packs_repacked": rep.packs_repacked,
                    "maps_deleted": rep.maps_deleted, "sigs_deleted": rep.sigs_deleted,
                    "manifests_rewritten": rep.manifests_rewritten, "bytes_freed": rep.bytes_freed,
                    "unused_bytes": rep.unused_bytes,
                });
                writeln!(out, "{v}")?;
            } else if !cli.quiet {
                for d in &kept {
                    writeln!(
                        out,
                        "keep    {}  {}  ({})",
                        d.id,
                        dsync_store::time::local(d.time_ns),
                        d.reasons.join(", ")
                    )?;
                }
                for d in &forgotten {
                    writeln!(
                        out,
                        "forget  {}  {}",
                        d.id,
                        dsync_store::time::local(d.time_ns)
                    )?;
                }
                writeln!(out,
                    "{}{} packs deleted, {} repacked, {} maps and {} signature files deleted, {} freed of {} unused",
                    if dry_run { "dry run: " } else { "" },
                    rep.packs_deleted,
                    rep.packs_repacked,
                    rep.maps_deleted,
                    rep.sigs_deleted,
                    human(rep.bytes_freed),
                    human(rep.unused_bytes)
                )?;
            }
        }
        Command::Diff(cli::DiffArgs {
            repo,
            a,
            b,
            path,
            json,
        }) => {
            let r = Repo::open(&repo)?;
            let (sa, sb) = (r.resolve(&a)?, r.resolve(&b)?);
            let files = |s: &dsync_store::Snapshot| -> Vec<(String, dsync_store::FileVersion)> {
                s.nodes
                    .iter()
                    .filter(|n| n.parent == dsync_store::format::snapshot::ROOT)
                    .filter_map(|n| match &n.kind {
                        dsync_store::NodeKind::File(f) => {
                            Some((String::from_utf8_lossy(&n.name).into_owned(), f.clone()))
                        }
                        _ => None,
                    })
                    .collect()
            };
            let (fa, fb) = (files(&sa), files(&sb));
            let mut names: Vec<String> = fa.iter().chain(&fb).map(|(n, _)| n.clone()).collect();
            names.sort();
            names.dedup();
            if let Some(p) = &path {
                if !names.contains(p) {
                    return Err(Error::NoSuchPath {
                        path: p.clone(),
                        snapshot: format!("{} or {}", sa.id, sb.id),
                    }
                    .into());
                }
                names.retain(|n| n == p);
            }
            for name in names {
                let va = fa.iter().find(|(n, _)| *n == name).map(|(_, f)| f);
                let vb = fb.iter().find(|(n, _)| *n == name).map(|(_, f)| f);
                let (status, ranges, bytes) = match (va, vb) {
                    (Some(_), Some(_)) => {
                        let ma = dsync_store::inspect::version_map(&r, &sa, &name)?;
                        let mb = dsync_store::inspect::version_map(&r, &sb, &name)?;
                        let (ranges, bytes) = dsync_store::inspect::diff_maps(&ma, &mb);
                        (if bytes == 0 { "same" } else { "changed" }, ranges, bytes)
                    }
                    (None, Some(y)) => ("added", vec![(0, y.size)], y.size),
                    (Some(x), None) => ("removed", vec![(0, x.size)], x.size),
                    (None, None) => continue,
                };
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({"file": name, "status": status, "bytes": bytes, "ranges": ranges})
                    )?;
                } else {
                    writeln!(
                        out,
                        "{name}: {status}, {} differ in {} ranges",
                        human(bytes),
                        ranges.len()
                    )?;
                    for (s, e) in ranges.iter().take(if cli.quiet { 0 } else { 50 }) {
                        writeln!(out, "  {s}-{e} ({})", human(e - s))?;
                    }
                    if ranges.len() > 50 && !cli.quiet {
                        writeln!(out, "  ... {} more (--json lists all)", ranges.len() - 50)?;
                    }
                }
            }
        }
        Command::Du(o) => cmd::du::run(o, &mut out)?,
        Command::Generate(o) => cmd::generate::run(o, cli.quiet, &mut out)?,
        Command::ImportRdiffBackup(cli::ImportRdiffBackupArgs { rdiff_repo, repo }) => {
            let n = import::import(&rdiff_repo, &repo, cli.quiet)?;
            if !cli.quiet {
                writeln!(out, "imported {n} versions from {}", rdiff_repo.display())?;
            }
        }
        Command::Unlock(o) => cmd::unlock::run(o, cli.quiet, &mut out)?,
        Command::Check(cli::CheckArgs {
            repo,
            read_data,
            read_data_subset,
            json,
        }) => {
            let read_data = read_data || read_data_subset.is_some();
            let r = Repo::open(&repo)?;
            let bar = Bar::new(cli.quiet || json);
            let rep = dsync_store::check(
                &r,
                &dsync_store::CheckOptions {
                    read_data,
                    subset: read_data_subset,
                },
                &bar,
            );
            bar.done();
            let rep = rep?;
            // Printed apart from the verdict: a reader that closes the pipe
            // after the first damaged line must not turn exit 3 into 0.
            let mut print = || -> std::io::Result<()> {
                if json {
                    let problems: Vec<_> = rep
                        .problems
                        .iter()
                        .map(|p| {
                            serde_json::json!({
                                "object": p.object, "detail": p.detail, "snapshot": p.snapshot,
                                "file": p.file, "ranges": p.ranges,
                            })
                        })
                        .collect();
                    let v = serde_json::json!({
                        "snapshots": rep.snapshots, "versions": rep.versions, "packs": rep.packs,
                        "frames_read": rep.frames_read, "bytes_verified": rep.bytes_verified,
                        "problems": problems,
                    });
                    writeln!(out, "{v}")?;
                } else {
                    for p in &rep.problems {
                        let mut line = format!("damaged: {}: {}", p.object, p.detail);
                        if let (Some(s), Some(f)) = (&p.snapshot, &p.file) {
                            line += &format!(" [snapshot {s} file {f}");
                            if !p.ranges.is_empty() {
                                let r: Vec<String> =
                                    p.ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect();
                                line += &format!(" bytes {}", r.join(","));
                            }
                            line += "]";
                        }
                        writeln!(out, "{line}")?;
                    }
                    if !cli.quiet {
                        let data = if read_data {
                            format!(
                                ", {} frames, {} verified",
                                rep.frames_read,
                                human(rep.bytes_verified)
                            )
                        } else {
                            String::new()
                        };
                        writeln!(
                            out,
                            "checked {} snapshots, {} versions, {} packs{}: {}",
                            rep.snapshots,
                            rep.versions,
                            rep.packs,
                            data,
                            if rep.problems.is_empty() {
                                "no problems".to_string()
                            } else {
                                format!("{} problems", rep.problems.len())
                            }
                        )?;
                    }
                }
                Ok(())
            };
            let printed = print();
            if !rep.problems.is_empty() {
                return Err(CheckFailed(rep.problems.len()).into());
            }
            printed?;
        }
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
