//! `dsync unlock`: says whether a writer holds the repository's lock. There
//! is nothing to remove: the kernel releases the lock when its holder exits.

use std::io::Write;

use dsync_store::{Error, Repo};

use crate::cli::UnlockArgs;

/// Succeeds when no writer holds the lock; fails as [`Error::Locked`]
/// (exit 4), naming the holder, when one does.
pub fn run(o: UnlockArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let r = Repo::open(&o.repo)?;
    match r.lock_holder()? {
        None => {
            if !quiet {
                writeln!(out, "{} is not locked", o.repo.display())?;
            }
            Ok(())
        }
        Some(holder) => Err(Error::Locked {
            path: o.repo,
            holder: format!("{holder}; it is released when that process exits: stop it"),
        }
        .into()),
    }
}
