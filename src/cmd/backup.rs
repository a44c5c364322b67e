//! `dsync backup`: files, block devices or standard input as one new
//! snapshot; then what each source cost, as text or one JSON object.

use std::io::Write;

use dsync_store::{BackupOptions, BackupReport, Repo};

use crate::cli::{BackupArgs, OnChange};
use crate::output::{diag, human, Style};
use crate::progress;

pub fn run(o: BackupArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let style = Style::new(o.json, quiet);
    let r = Repo::open_or_init(&o.repo)?;
    let mut excludes = dsync_store::exclude::Excludes {
        patterns: o.exclude.clone(),
        if_present: o.exclude_if_present.clone(),
        caches: o.exclude_caches,
        one_file_system: o.one_file_system,
        larger_than: o.exclude_larger_than,
    };
    for f in &o.exclude_from {
        excludes.add_file(f)?;
    }
    let opts = BackupOptions {
        checksum: o.checksum,
        ignore_inode: o.ignore_inode,
        ignore_ctime: o.ignore_ctime,
        excludes,
        accept_changed: o.accept_changed || o.on_change == OnChange::Flag,
        name: o.name,
        time_ns: o.time,
        expect_size: o.expect_size,
        ..Default::default()
    };
    let rep = progress::with_bar_files(style, o.files, |bar| {
        if o.stdin {
            widen_stdin_pipe();
            dsync_store::backup_stream(&r, &mut std::io::stdin(), &opts, bar)
        } else {
            dsync_store::backup(&r, &o.paths, &opts, bar)
        }
    })?;
    warn(&rep);
    match style {
        Style::Json => writeln!(out, "{}", json(&rep))?,
        Style::Text => text(&rep, out)?,
        Style::Quiet => {}
    }
    if rep.incomplete() {
        return Err(Incomplete {
            id: rep.snapshot.id.to_string(),
            errors: rep.tree.errors,
            changed: rep.tree.changed
                + rep
                    .files
                    .iter()
                    .filter(|f| f.changed_while_read.is_some())
                    .count() as u64,
        }
        .into());
    }
    Ok(())
}

/// The snapshot was made but lacks something (exit code 5).
#[derive(Debug)]
pub struct Incomplete {
    id: String,
    errors: u64,
    changed: u64,
}

impl std::fmt::Display for Incomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "snapshot {} saved, but incomplete: {} skipped or unreadable, {} changed while read (warnings above)",
            &self.id[..8.min(self.id.len())],
            self.errors,
            self.changed
        )
    }
}

impl std::error::Error for Incomplete {}

/// A pipe's default 64 KiB buffer costs a context switch per 64 KiB; 1 MiB
/// (the usual pipe-max-size) halves the time a 2 GiB stream takes. Not a
/// pipe, or not allowed: no matter.
fn widen_stdin_pipe() {
    // SAFETY: fcntl on fd 0 with an integer argument.
    unsafe { libc::fcntl(0, libc::F_SETPIPE_SZ, 1 << 20) };
}

/// Warnings go to standard error whatever the style: a script reading the
/// JSON still leaves them in its log.
fn warn(rep: &BackupReport) {
    if let Some(w) = &rep.lock_taken_over {
        diag!("dsync: warning: took over the lock of a writer that died ({w}); what it wrote is garbage for prune");
    }
    for w in &rep.tree.warnings {
        diag!("dsync: warning: {w}");
    }
    for f in &rep.files {
        if let Some(what) = &f.changed_while_read {
            diag!(
                "dsync: warning: {} changed while it was read ({what}); stored as read and flagged",
                f.name
            );
        }
    }
}

fn json(rep: &BackupReport) -> serde_json::Value {
    let s = &rep.snapshot;
    let files: Vec<_> = rep
        .files
        .iter()
        .map(|f| {
            serde_json::json!({
                "name": f.name, "size": f.size, "reused": f.reused,
                "bytes_read": f.bytes_read, "literal_bytes": f.stats.literal,
                "aligned_match_bytes": f.stats.aligned, "shifted_match_bytes": f.stats.shifted,
                "hole_bytes": f.stats.hole, "border_literal_bytes": f.stats.border_literal,
                "compressed_bytes": f.bytes_compressed,
                "changed_while_read": f.changed_while_read.is_some(),
            })
        })
        .collect();
    serde_json::json!({
        "snapshot": s.id.to_string(), "time": dsync_store::time::local(s.time_ns),
        "bytes_read": s.stats.bytes_read, "bytes_added": s.stats.bytes_added,
        "seconds": s.stats.duration_ns as f64 / 1e9, "files": files,
        "tree_files": rep.tree.files, "tree_dirs": rep.tree.dirs,
        "tree_bytes": rep.tree.bytes, "tree_files_read": rep.tree.files_read,
        "errors": rep.tree.errors, "changed_while_read": rep.tree.changed,
        "warnings": rep.tree.warnings, "incomplete": rep.incomplete(),
    })
}

fn text(rep: &BackupReport, out: &mut dyn Write) -> std::io::Result<()> {
    for f in &rep.files {
        if f.reused {
            writeln!(out, "{}: unchanged (size, mtime, inode), not read", f.name)?;
        } else {
            writeln!(
                out,
                "{}: {} read, {} new ({} compressed), {} unchanged, {} moved, {} holes",
                f.name,
                human(f.bytes_read),
                human(f.stats.literal),
                human(f.bytes_compressed),
                human(f.stats.aligned),
                human(f.stats.shifted),
                human(f.stats.hole)
            )?;
        }
    }
    let t = &rep.tree;
    if t.files + t.dirs > 0 {
        writeln!(
            out,
            "{} files ({}) in {} directories: {} read, {} unchanged",
            t.files,
            human(t.bytes),
            t.dirs,
            t.files_read,
            t.files.saturating_sub(t.files_read)
        )?;
    }
    let s = &rep.snapshot;
    writeln!(
        out,
        "snapshot {} saved: {} read, repository grew by {} in {:.2} s",
        &s.id.to_string()[..8],
        human(s.stats.bytes_read),
        human(s.stats.bytes_added),
        s.stats.duration_ns as f64 / 1e9
    )
}
