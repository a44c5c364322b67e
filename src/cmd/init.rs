//! `dsync init`: an empty repository with the frame size and zstd level
//! given.

use std::io::Write;

use dsync_store::format::config::Config;
use dsync_store::Repo;

use crate::cli::InitArgs;

/// Creates the repository, once its parameters pass the checks a reader
/// makes.
pub fn run(o: InitArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let cfg = Config {
        frame_size: u32::try_from(o.frame_size).unwrap_or(u32::MAX),
        zstd_level: o.zstd_level,
        format: o.format,
        ..Default::default()
    };
    // Before creating anything: of the parameters, only these two are the
    // user's to get wrong.
    cfg.validate()
        .map_err(|_| anyhow::anyhow!("frame size must be 4K..4M and the zstd level -7..22"))?;
    Repo::init(&o.repo, cfg)?;
    if !quiet {
        writeln!(out, "created repository {}", o.repo.display())?;
    }
    Ok(())
}
