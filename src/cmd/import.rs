//! `dsync import-rdiff-backup`: every version an rdiff-backup repository holds
//! becomes a dsync snapshot with its original time, oldest first, each backed
//! up as an incremental of the one before. rdiff-backup itself restores each
//! version (into a temporary directory, one at a time), so whatever it can
//! read, dsync imports.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use dsync_store::{BackupOptions, Repo};

use crate::cli::ImportRdiffBackupArgs;
use crate::output::Style;
use crate::progress;

/// Imports every version, printing a line for each and then the count.
pub fn run(o: ImportRdiffBackupArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let n = import(&o.rdiff_repo, &o.repo, quiet, out)?;
    if !quiet {
        writeln!(out, "imported {n} versions from {}", o.rdiff_repo.display())?;
    }
    Ok(())
}

/// Imports `rdiff` into `repo` (created if missing); returns the number of
/// versions imported.
fn import(rdiff: &Path, repo: &Path, quiet: bool, out: &mut dyn Write) -> anyhow::Result<usize> {
    if !rdiff.join("rdiff-backup-data").is_dir() {
        bail!(
            "{} is not an rdiff-backup repository (no rdiff-backup-data)",
            rdiff.display()
        );
    }
    let list = Command::new("rdiff-backup")
        .args(["--parsable-output", "-l"])
        .arg(rdiff)
        .output()
        .context("cannot run rdiff-backup (install it: apt-get install rdiff-backup)")?;
    if !list.status.success() {
        bail!(
            "rdiff-backup could not list {}: {}",
            rdiff.display(),
            last_line(&list.stderr)
        );
    }
    let mut times: Vec<i64> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    times.sort_unstable();
    times.dedup();
    if times.is_empty() {
        bail!("{} holds no versions", rdiff.display());
    }
    let r = Repo::open_or_init(repo)?;
    // rdiff-backup restores whole images: next to the repository (its
    // file system has room for them) rather than in a small /tmp.
    let scratch = r.scratch_dir().unwrap_or_else(std::env::temp_dir);
    let work = scratch.join(format!("import-{}", std::process::id()));
    let result = import_versions(&r, rdiff, &times, &work, quiet, out);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| times.len())
}

fn import_versions(
    r: &Repo,
    rdiff: &Path,
    times: &[i64],
    work: &Path,
    quiet: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    // A reader that closes standard output (`| head -1`) must not stop the
    // import half-way: stop printing, import the rest, then report the
    // failed write (a broken pipe is success for main).
    let mut printed = Ok(());
    for (k, t) in times.iter().enumerate() {
        let time_ns = t * 1_000_000_000;
        let files = restore_version(rdiff, *t, work)?;
        let opts = BackupOptions {
            checksum: true,
            time_ns: Some(time_ns),
            ..Default::default()
        };
        let rep = progress::with_bar(Style::new(false, quiet), |bar| {
            dsync_store::backup(r, &files, &opts, bar)
        })?;
        if !quiet && printed.is_ok() {
            printed = writeln!(
                out,
                "{}/{}: {} -> snapshot {} ({} files, repository grew by {} bytes)",
                k + 1,
                times.len(),
                dsync_store::time::local(time_ns),
                &rep.snapshot.id.to_string()[..8],
                rep.files.len() as u64 + rep.tree.files,
                rep.snapshot.stats.bytes_added
            );
        }
    }
    Ok(printed?)
}

/// Has rdiff-backup restore the version of Unix time `t` into `work`
/// (emptied first); returns what it holds at its top, sorted: each file
/// and each directory becomes a path of the snapshot (a directory's whole
/// tree, in a format 3 repository).
fn restore_version(rdiff: &Path, t: i64, work: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let _ = std::fs::remove_dir_all(work);
    let o = Command::new("rdiff-backup")
        .args(["--force", "-r", &t.to_string()])
        .arg(rdiff)
        .arg(work)
        .output()
        .context("cannot run rdiff-backup")?;
    if !o.status.success() {
        bail!(
            "rdiff-backup could not restore the version of {}: {}",
            dsync_store::time::local(t * 1_000_000_000),
            last_line(&o.stderr)
        );
    }
    let mut paths = Vec::new();
    for e in std::fs::read_dir(work).with_context(|| format!("{}", work.display()))? {
        let e = e.with_context(|| format!("{}", work.display()))?;
        let kind = e
            .file_type()
            .with_context(|| format!("{}", e.path().display()))?;
        if kind.is_file() || kind.is_dir() {
            paths.push(e.path());
        } else {
            crate::output::diag!(
                "dsync: warning: {}: not imported: only files and directories can be top-level paths of a snapshot",
                e.file_name().to_string_lossy()
            );
        }
    }
    paths.sort();
    if paths.is_empty() {
        bail!(
            "the version of {} holds no files",
            dsync_store::time::local(t * 1_000_000_000)
        );
    }
    Ok(paths)
}

/// The last line of what rdiff-backup wrote to standard error: its error.
fn last_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}
