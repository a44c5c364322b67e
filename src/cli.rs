//! The command line, as clap types. Nothing here reaches the store: main.rs
//! turns these into the store's options.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "dsync",
    version,
    about = "Fast incremental backups of large files (VM disk images) with rsync-style deltas",
    after_help = "With DSYNC_REPO set, or -r REPO before the command, leave REPO out of every command \
(e.g. DSYNC_REPO=/backup/vms dsync backup ~/vms/disk.qcow2).\n\n\
Exit codes: 0 success, 1 error, 2 bad usage, 3 repository damaged, 4 repository locked."
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
        /// Most uncompressed bytes per compressed frame: smaller frames make
        /// random reads (the mount) faster, larger ones compress better.
        #[arg(long, default_value = "32K", value_parser = parse_size)]
        frame_size: u64,
        /// zstd level for new data (-7..=22).
        #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
        zstd_level: i32,
    },
    /// Back up files as one new snapshot (creates REPO if missing).
    #[command(
        after_help = "Examples:\n  dsync backup /backup/vms ~/vms/disk.qcow2\n  \
dsync backup /backup/vms /dev/vg/disk-snap --name disk.raw\n  \
qemu-img convert -O raw disk.qcow2 /dev/stdout | dsync backup /backup/vms --stdin --name disk.raw"
    )]
    Backup {
        repo: PathBuf,
        /// Files or block devices to back up; each is stored under its base name.
        #[arg(required_unless_present = "stdin")]
        paths: Vec<PathBuf>,
        /// Read one file from standard input (a pipe of unknown length),
        /// stored under --name and diffed against its previous version.
        #[arg(long, requires = "name", conflicts_with = "paths")]
        stdin: bool,
        /// With --stdin: fail, storing nothing, unless the stream is exactly
        /// this long (e.g. `$(blockdev --getsize64 DEV)`): a producer that
        /// dies early otherwise leaves a short snapshot.
        #[arg(long, requires = "stdin", value_parser = parse_size)]
        expect_size: Option<u64>,
        /// Read files even when size, mtime and inode say they are unchanged.
        #[arg(long)]
        checksum: bool,
        /// Store a file that changes while it is read (flagged, with a
        /// warning) instead of failing. Prefer backing up a VM or LVM snapshot.
        #[arg(long)]
        accept_changed: bool,
        /// Store the (single) source under this name, e.g. for a block device.
        #[arg(long)]
        name: Option<String>,
        /// The snapshot's time instead of now: local YYYY-MM-DDTHH:MM:SS or @UNIX_SECONDS.
        #[arg(long, value_parser = parse_time)]
        time: Option<i64>,
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
        /// Print what was restored as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Mount every snapshot as a read-only file tree (FUSE).
    #[command(
        after_help = "The tree: one directory per snapshot named by its local time, a link per day \
to that day's last snapshot, and `latest`. Stays in the foreground until unmounted \
(fusermount3 -u MOUNTPOINT, Ctrl-C or SIGTERM).\n\n\
Examples:\n  dsync mount /backup/vms /mnt/history --daemon\n  \
qemu-img convert /mnt/history/2024-05-01/disk.qcow2 -O raw /tmp/old.raw\n  \
qemu-system-x86_64 -snapshot -drive file=/mnt/history/latest/disk.qcow2"
    )]
    Mount {
        repo: PathBuf,
        mountpoint: PathBuf,
        /// Let other users read the mount.
        #[arg(long)]
        allow_other: bool,
        /// Memory for decompressed frames, e.g. 256M, 1G.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        cache_size: u64,
        /// Return once the mount is ready, leaving it served in the background.
        #[arg(long)]
        daemon: bool,
    },
    /// Remove snapshots (only their manifests; `prune` reclaims the data).
    #[command(after_help = "Example: dsync forget /backup/vms 2024-05-01 3f2a9c")]
    Forget {
        repo: PathBuf,
        /// Snapshots: ids or unique prefixes, times, days, or latest.
        #[arg(required = true)]
        snapshots: Vec<String>,
        /// Print the forgotten ids as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Apply a retention policy, then reclaim the space no snapshot uses.
    #[command(
        after_help = "The newest snapshot of each of the last N hours/days/weeks/months/years \
that have snapshots is kept, plus the last N (restic's and borg's meaning); a snapshot is kept if \
any rule keeps it. Without --keep-* options nothing is forgotten and only unused data is reclaimed.\n\n\
Example: dsync prune /backup/vms --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run"
    )]
    Prune {
        repo: PathBuf,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        #[arg(long, default_value_t = 0)]
        keep_hourly: u32,
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
        #[arg(long, default_value_t = 0)]
        keep_yearly: u32,
        /// Rewrite packs whose live fraction is below this (0 never repacks).
        #[arg(long, default_value_t = 0.5)]
        repack_below: f64,
        /// Show what would be forgotten and freed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Which byte ranges of each file differ between two snapshots (from the
    /// extent maps alone: no data is read).
    #[command(after_help = "Example: dsync diff /backup/vms 2024-05-01 latest disk.qcow2 --json")]
    Diff {
        repo: PathBuf,
        a: String,
        b: String,
        /// Only this file.
        path: Option<String>,
        /// One JSON object per file, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Bytes stored, and per snapshot the bytes only it uses (what forgetting
    /// it and `prune --repack-below 1` would free).
    #[command(after_help = "Example: dsync du /backup/vms")]
    Du {
        repo: PathBuf,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write shell completions to standard output, or man pages into a directory.
    #[command(
        after_help = "Examples:\n  dsync generate completions bash > /etc/bash_completion.d/dsync\n  \
dsync generate man /usr/local/share/man/man1"
    )]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
    /// Import every version of an rdiff-backup repository, oldest first, each
    /// as a snapshot with its original time (uses rdiff-backup to restore).
    #[command(
        name = "import-rdiff-backup",
        after_help = "Files at the top of the rdiff-backup \
repository are imported (subdirectories come with stage 2).\n\n\
Example: dsync import-rdiff-backup /backup/rdiff-vms /backup/vms"
    )]
    ImportRdiffBackup { rdiff_repo: PathBuf, repo: PathBuf },
    /// Tell whether a writer holds the repository's lock, and which.
    #[command(
        after_help = "The lock is released by the kernel when its holder exits, however it exits \
(even kill -9), so there is never a stale lock to remove on a local file system: if a writer \
holds it, stop that process.\n\nExample: dsync unlock /backup/vms"
    )]
    Unlock { repo: PathBuf },
    /// Check that everything the snapshots reference is there and sound.
    #[command(
        after_help = "Exits 3 when anything is damaged, naming each damaged object, the snapshots \
and files it affects and their unreadable byte ranges.\n\nExample: dsync check /backup/vms --read-data"
    )]
    Check {
        repo: PathBuf,
        /// Also read every frame and every version's bytes (checks all hashes).
        #[arg(long)]
        read_data: bool,
        /// Read only a part: `K/N` (part K of N, by id: 1/7 .. 7/7 on
        /// successive days read everything) or `P%` (about P percent).
        #[arg(long, value_parser = parse_subset)]
        read_data_subset: Option<(u64, u64)>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write one file of a snapshot to standard output.
    #[command(after_help = "Example: dsync cat /backup/vms latest disk.raw | sha256sum")]
    Cat {
        repo: PathBuf,
        snapshot: String,
        path: String,
    },
}

/// Parses `1234`, `64K`, `256M`, `1G` (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown unit in {s:?}: use K, M or G")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("not a size: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
    }
}

#[derive(Subcommand, Debug)]
pub enum Generate {
    /// Completions for a shell.
    Completions { shell: clap_complete::Shell },
    /// Man pages (dsync.1 and one per command) into DIR.
    Man { dir: PathBuf },
}

/// Parses a local time `YYYY-MM-DDTHH:MM:SS` (or a day) or `@UNIX_SECONDS`
/// into Unix nanoseconds.
fn parse_time(s: &str) -> Result<i64, String> {
    if let Some(secs) = s.strip_prefix('@') {
        return secs
            .parse::<i64>()
            .ok()
            .and_then(|v| v.checked_mul(1_000_000_000))
            .ok_or_else(|| format!("not a Unix time: {s:?}"));
    }
    dsync_store::time::parse_local(s)
        .ok_or_else(|| format!("not a time: {s:?} (use YYYY-MM-DDTHH:MM:SS or @UNIX_SECONDS)"))
}

/// Parses `K/N` (1 <= K <= N) or `P%` (1..=100, read as part 1 of 100/P).
fn parse_subset(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("not a subset: {s:?} (use K/N such as 1/7, or P% such as 10%)");
    if let Some(p) = s.strip_suffix('%') {
        let p: f64 = p.trim().parse().map_err(|_| bad())?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(bad());
        }
        return Ok((1, (100.0 / p).round().max(1.0) as u64));
    }
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (k, n): (u64, u64) = (
        k.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if k == 0 || n == 0 || k > n {
        return Err(bad());
    }
    Ok((k, n))
}

#[cfg(test)]
mod subset_tests {
    use super::parse_subset;

    #[test]
    fn subsets() {
        assert_eq!(parse_subset("1/7"), Ok((1, 7)));
        assert_eq!(parse_subset("10%"), Ok((1, 10)));
        assert_eq!(parse_subset("100%"), Ok((1, 1)));
        assert!(parse_subset("0/3").is_err());
        assert!(parse_subset("4/3").is_err());
        assert!(parse_subset("0%").is_err());
        assert!(parse_subset("x").is_err());
    }
}
