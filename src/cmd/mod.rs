//! One module per command, in the shape of rustic's `commands/<verb>.rs`:
//! a `run` that takes the command's parsed options (cli.rs), does the work
//! by calling the store, and prints a report as text or JSON (output.rs).
//! A command that shares its store module with a bigger one lives beside
//! it: `cat` in restore.rs, `forget` in prune.rs.

pub mod backup;
pub mod check;
pub mod copy;
pub mod diff;
pub mod du;
pub mod generate;
pub mod import;
pub mod init;
pub mod list;
pub mod ls;
pub mod mount;
pub mod prune;
pub mod restore;
pub mod serve;
pub mod sync;
pub mod unlock;
