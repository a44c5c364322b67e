//! `dsync du`: the bytes the repository holds, and per snapshot the bytes
//! only it uses (what forgetting it would free).

use std::io::Write;

use dsync_store::inspect::DuReport;
use dsync_store::Repo;

use crate::cli::DuArgs;
use crate::output::{human, snapshot_json};

pub fn run(o: DuArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let r = Repo::open(&o.repo)?;
    let rep = dsync_store::inspect::du(&r)?;
    if o.json {
        writeln!(out, "{}", json(&rep))?;
    } else {
        text(&rep, out)?;
    }
    Ok(())
}

fn json(rep: &DuReport) -> serde_json::Value {
    let snaps: Vec<_> = rep
        .snapshots
        .iter()
        .map(|&(id, t, u)| snapshot_json(id, t, serde_json::json!({ "unique_bytes": u })))
        .collect();
    serde_json::json!({"total_bytes": rep.total_bytes, "snapshots": snaps})
}

fn text(rep: &DuReport, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "{:<16}  {:<19}  {:>12}", "ID", "TIME", "UNIQUE")?;
    for (id, t, u) in &rep.snapshots {
        writeln!(
            out,
            "{:<16}  {:<19}  {:>12}",
            id.to_string(),
            dsync_store::time::local(*t),
            human(*u)
        )?;
    }
    writeln!(out, "repository: {}", human(rep.total_bytes))
}
