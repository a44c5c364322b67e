//! `dsync prune` and `dsync forget`: snapshots removed, by a retention
//! policy or by name, and (prune) the space no snapshot uses reclaimed.
//! The store plans a prune and then runs the plan; this prints both.

use std::io::Write;

use dsync_store::gc::GcReport;
use dsync_store::prune::{Decision, KeepPolicy, PrunePlan};
use dsync_store::Repo;

use crate::cli::{ForgetArgs, PruneArgs};
use crate::output::{human, snapshot_json, Style};
use crate::progress;

/// `dsync prune`: the policy, then a gc (only planned with --dry-run).
pub fn run(o: PruneArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let style = Style::new(o.json, quiet);
    let r = Repo::open(&o.repo)?;
    let policy = KeepPolicy {
        last: o.keep_last,
        hourly: o.keep_hourly,
        daily: o.keep_daily,
        weekly: o.keep_weekly,
        monthly: o.keep_monthly,
        yearly: o.keep_yearly,
    };
    let (plan, rep) = progress::with_bar(style, |bar| {
        dsync_store::prune::prune(&r, &policy, o.repack_below, o.dry_run, bar)
    })?;
    match style {
        Style::Json => writeln!(out, "{}", json(&plan, &rep, o.dry_run))?,
        Style::Text => text(&plan, &rep, o.dry_run, out)?,
        Style::Quiet => {}
    }
    Ok(())
}

fn json(plan: &PrunePlan, rep: &GcReport, dry_run: bool) -> serde_json::Value {
    let list = |v: &[Decision]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|d| snapshot_json(d.id, d.time_ns, serde_json::json!({ "reasons": d.reasons })))
            .collect()
    };
    serde_json::json!({
        "dry_run": dry_run, "kept": list(&plan.kept), "forgotten": list(&plan.forgotten),
        "packs_deleted": rep.packs_deleted, "packs_repacked": rep.packs_repacked,
        "maps_deleted": rep.maps_deleted, "sigs_deleted": rep.sigs_deleted,
        "manifests_rewritten": rep.manifests_rewritten, "bytes_freed": rep.bytes_freed,
        "unused_bytes": rep.unused_bytes, "marked": rep.marked,
        "uploads_aborted": rep.uploads_aborted,
    })
}

fn text(
    plan: &PrunePlan,
    rep: &GcReport,
    dry_run: bool,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    for d in &plan.kept {
        writeln!(
            out,
            "keep    {}  {}  ({})",
            d.id,
            dsync_store::time::local(d.time_ns),
            d.reasons.join(", ")
        )?;
    }
    for d in &plan.forgotten {
        writeln!(
            out,
            "forget  {}  {}",
            d.id,
            dsync_store::time::local(d.time_ns)
        )?;
    }
    writeln!(
        out,
        "{}{} packs deleted, {} repacked, {} maps and {} signature files deleted, {} freed of {} unused",
        if dry_run { "dry run: " } else { "" },
        rep.packs_deleted,
        rep.packs_repacked,
        rep.maps_deleted,
        rep.sigs_deleted,
        human(rep.bytes_freed),
        human(rep.unused_bytes)
    )?;
    if rep.uploads_aborted > 0 {
        writeln!(
            out,
            "{} incomplete uploads of interrupted writers aborted",
            rep.uploads_aborted
        )?;
    }
    if rep.marked > 0 {
        writeln!(
            out,
            "{} objects marked: a prune {} h from now removes them if still unused (S3 removes in two phases)",
            rep.marked,
            dsync_store::backend::s3::grace().as_secs().div_ceil(3600)
        )?;
    }
    Ok(())
}

/// `dsync forget`: the snapshots named (each resolved first, so that one
/// bad name forgets nothing); `prune` reclaims their data.
pub fn forget(o: ForgetArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let r = Repo::open(&o.repo)?;
    let mut named = Vec::new();
    for spec in &o.snapshots {
        named.push(r.resolve(spec)?.id);
    }
    let ids = dsync_store::prune::forget(&r, &named)?;
    match Style::new(o.json, quiet) {
        Style::Json => {
            let v: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            writeln!(out, "{}", serde_json::json!({ "forgotten": v }))?;
        }
        Style::Text => writeln!(
            out,
            "forgot {} snapshots; `dsync prune {}` reclaims the space they alone used",
            ids.len(),
            o.repo.display()
        )?,
        Style::Quiet => {}
    }
    Ok(())
}
