//! `dsync copy`: snapshots into another repository, created with the
//! source's block parameters when missing.

use std::io::Write;

use dsync_store::format::config::Config;
use dsync_store::{Error, Repo};

use crate::cli::CopyArgs;
use crate::output::{human, Style};
use crate::progress;

pub fn run(o: CopyArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let style = Style::new(o.json, quiet);
    let src = Repo::open(&o.src)?;
    let mut ids = Vec::new();
    for spec in &o.snapshots {
        ids.push(src.resolve(spec)?.id);
    }
    let dst = match Repo::open(&o.dst) {
        Err(Error::NotARepository { .. }) => {
            let config = Config {
                repo_id: Config::default().repo_id,
                ..src.config().clone()
            };
            Repo::init(&o.dst, config)?
        }
        r => r?,
    };
    let rep = progress::with_bar(style, |bar| dsync_store::copy::copy(&src, &dst, &ids, bar))?;
    match style {
        Style::Json => {
            let copied: Vec<String> = rep.copied.iter().map(|id| id.to_string()).collect();
            writeln!(
                out,
                "{}",
                serde_json::json!({
                    "copied": copied, "already": rep.already,
                    "objects": rep.objects, "bytes": rep.bytes,
                })
            )?;
        }
        Style::Text => writeln!(
            out,
            "copied {} snapshots ({} objects, {}); {} already in {}",
            rep.copied.len(),
            rep.objects,
            human(rep.bytes),
            rep.already,
            o.dst.display()
        )?,
        Style::Quiet => {}
    }
    Ok(())
}
