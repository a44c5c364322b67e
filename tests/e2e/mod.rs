mod backup_restore;
mod bad_input;
mod check;
mod crash;
mod mount;
mod prune;
mod sources;
mod util;
