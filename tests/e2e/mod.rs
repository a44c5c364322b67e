mod backup_restore;
mod bad_input;
mod check;
mod mount;
mod prune;
mod util;
