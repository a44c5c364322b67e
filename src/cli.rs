//! The command line, as clap types. Nothing here reaches the store: main.rs
//! turns these into the store's options.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "dsync",
    version,
    about = "Fast incremental backups of large files (VM disk images) with rsync-style deltas",
    after_help = "Exit codes: 0 success, 1 error, 2 bad usage, 3 repository damaged, 4 repository locked."
)]
pub struct Cli {
    /// Print nothing but errors (no progress bars).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create an empty repository.
    #[command(after_help = "Example: dsync init /backup/vms")]
    Init {
        /// Where to create it (a missing or empty directory).
        repo: PathBuf,
    },
    /// Back up files as one new snapshot (creates REPO if missing).
    #[command(after_help = "Example: dsync backup /backup/vms ~/vms/disk.qcow2")]
    Backup {
        repo: PathBuf,
        /// Files to back up; each is stored under its base name.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Read files even when size, mtime and inode say they are unchanged.
        #[arg(long)]
        checksum: bool,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List snapshots, oldest first.
    #[command(after_help = "Example: dsync list /backup/vms --json")]
    List {
        repo: PathBuf,
        /// One JSON object per snapshot, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot (or one file of it) to DEST.
    #[command(
        after_help = "SNAPSHOT is an id or unique id prefix, a local time YYYY-MM-DDTHH:MM:SS, \
a day YYYY-MM-DD (the last snapshot of that day), or `latest`.\n\n\
Examples:\n  dsync restore /backup/vms 2024-05-01 --to /tmp/old            # every file, into /tmp/old/\n  \
dsync restore /backup/vms latest --to /tmp/disk.qcow2 disk.qcow2  # one file"
    )]
    Restore {
        repo: PathBuf,
        snapshot: String,
        /// Destination: a directory for the whole snapshot, a file (or a
        /// directory to put it in) with PATH.
        #[arg(long)]
        to: PathBuf,
        /// One file of the snapshot, by its name there.
        path: Option<String>,
        /// Overwrite an existing destination.
        #[arg(long)]
        force: bool,
    },
    /// Write one file of a snapshot to standard output.
    #[command(after_help = "Example: dsync cat /backup/vms latest disk.raw | sha256sum")]
    Cat {
        repo: PathBuf,
        snapshot: String,
        path: String,
    },
}
