mod backup_restore;
mod bad_input;
mod mount;
mod util;
