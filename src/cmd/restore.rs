//! `dsync restore` and `dsync cat`: a snapshot's files, or one of them,
//! written out and verified against their whole-file hashes (the store's
//! restore.rs holds both).

use std::io::Write;

use anyhow::Context;
use dsync_store::{Repo, RestoreOptions, RestoreReport, Snapshot};

use crate::cli::{CatArgs, RestoreArgs};
use crate::output::{diag, human, Style};
use crate::progress;

/// `dsync restore`: the snapshot (or PATH of it) to `--to`.
pub fn run(o: RestoreArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let style = Style::new(o.json, quiet);
    let r = Repo::open(&o.repo)?;
    let s = r.resolve_head(&o.snapshot)?;
    let opts = RestoreOptions {
        force: o.force,
        numeric_ids: o.numeric_ids,
        delta: o.delta,
    };
    let rep = progress::with_bar(style, |bar| {
        dsync_store::restore_with(&r, &s, o.path.as_deref(), &o.to, &opts, bar)
    })?;
    for w in &rep.warnings {
        diag!("dsync: warning: {w}");
    }
    match style {
        Style::Json => writeln!(out, "{}", json(&s, &rep))?,
        Style::Text if rep.files_total <= 20 => {
            for (p, n) in &rep.files {
                writeln!(out, "restored {} ({}), verified", p.display(), human(*n))?;
            }
            if o.delta {
                writeln!(
                    out,
                    "wrote {} of {}",
                    human(rep.bytes_written),
                    human(rep.bytes)
                )?;
            }
        }
        Style::Text => writeln!(
            out,
            "restored {} files ({}) into {}, verified; wrote {}",
            rep.files_total,
            human(rep.bytes),
            o.to.display(),
            human(rep.bytes_written)
        )?,
        Style::Quiet => {}
    }
    Ok(())
}

fn json(s: &Snapshot, rep: &RestoreReport) -> serde_json::Value {
    let files: Vec<_> = rep
        .files
        .iter()
        .map(|(p, n)| serde_json::json!({"path": p.display().to_string(), "size": n, "verified": true}))
        .collect();
    serde_json::json!({"snapshot": s.id.to_string(), "bytes": rep.bytes, "bytes_written": rep.bytes_written, "files_total": rep.files_total, "files": files})
}

/// `dsync cat`: one file of the snapshot to `out` (standard output).
pub fn cat(o: CatArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let r = Repo::open(&o.repo)?;
    let s = r.resolve_head(&o.snapshot)?;
    dsync_store::cat(&r, &s, &o.path, out).with_context(|| format!("cat {}", o.path))?;
    Ok(())
}
