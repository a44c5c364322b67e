//! `dsync generate`: shell completions and man pages, made from the clap
//! definitions (cli.rs) so that they cannot drift from the binary.

use std::io::Write;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::{Cli, Generate, GenerateArgs};

pub fn run(o: GenerateArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    match o.what {
        Generate::Completions { shell } => {
            // clap_complete panics when a write fails: let it write
            // to memory, and write that here.
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "dsync", &mut buf);
            out.write_all(&buf)?;
        }
        Generate::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))?;
            if !quiet {
                writeln!(out, "man pages written to {}", dir.display())?;
            }
        }
    }
    Ok(())
}
