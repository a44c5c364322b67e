//! `dsync list`: the snapshots, oldest first, as a table or one JSON object
//! per line (with or without --quiet: a list is what was asked for).

use std::io::Write;

use dsync_store::format::snapshot::SnapshotInfo;
use dsync_store::Repo;

use crate::cli::ListArgs;
use crate::output::{human, snapshot_json};

pub fn run(o: ListArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let r = Repo::open(&o.repo)?;
    // Listings only: a format 3 snapshot's tree is not read.
    let snaps = r.infos()?;
    if o.json {
        for s in &snaps {
            writeln!(out, "{}", json(s))?;
        }
    } else {
        text(&snaps, out)?;
    }
    Ok(())
}

fn json(s: &SnapshotInfo) -> serde_json::Value {
    let (files, size) = (s.files, s.size);
    snapshot_json(
        s.id,
        s.time_ns,
        serde_json::json!({
            "time_unix_ns": s.time_ns, "host": s.host, "paths": s.paths,
            "files": files, "size": size, "bytes_added": s.stats.bytes_added,
        }),
    )
}

fn text(snaps: &[SnapshotInfo], out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<16}  {:<19}  {:>5}  {:>10}  {:>10}",
        "ID", "TIME", "FILES", "SIZE", "ADDED"
    )?;
    for s in snaps {
        let (files, size) = (s.files, s.size);
        writeln!(
            out,
            "{:<16}  {:<19}  {:>5}  {:>10}  {:>10}",
            s.id.to_string(),
            dsync_store::time::local(s.time_ns),
            files,
            human(size),
            human(s.stats.bytes_added)
        )?;
    }
    Ok(())
}
