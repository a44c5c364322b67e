//! The command line, as clap types: one options struct per command, which
//! main.rs hands whole to that command's module in cmd/. Nothing here reaches
//! the store: the modules turn these into the store's options.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "dsync",
    version,
    about = "Fast incremental backups of large files (VM disk images) with rsync-style deltas",
    after_help = "With DSYNC_REPO set, or -r REPO before the command, leave REPO out of every command \
(e.g. DSYNC_REPO=/backup/vms dsync backup ~/vms/disk.qcow2). A REPO given on the command line \
wins over DSYNC_REPO: see -r.\n\n\
Exit codes: 0 success, 1 error, 2 bad usage, 3 repository damaged, 4 repository locked."
)]
pub struct Cli {
    /// The repository, for a command that takes REPO: leave REPO out of the
    /// command. Only before the command; wins over DSYNC_REPO.
    ///
    /// DSYNC_REPO stands for REPO only where the command line lacks it: a
    /// command given all its arguments keeps them (`DSYNC_REPO=/a dsync list
    /// /b` lists /b). Where the count cannot tell (`backup A B`, `restore A
    /// B`, `diff A B C`, `forget A B`), A is REPO if it is a dsync repository
    /// (a directory with a `config` file) or a URL (`scheme://...`), and
    /// otherwise DSYNC_REPO is REPO. There, a repository that does not exist
    /// yet overrides DSYNC_REPO only as `-r NEW`.
    // with_repo() takes it off the command line before clap parses it (it
    // is inserted where REPO goes): declared here for --help, completions
    // and man pages, never read.
    #[arg(short = 'r', long = "repo", value_name = "REPO")]
    pub repo: Option<PathBuf>,
    /// Print nothing but errors (no progress bars).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// The program that reaches a remote repository's host (default ssh;
    /// words split at spaces: `-e "ssh -i key"`), as rsync's -e.
    #[arg(
        short = 'e',
        long,
        global = true,
        env = "DSYNC_RSH",
        value_name = "CMD"
    )]
    pub rsh: Option<String>,
    /// The dsync program on a remote repository's host (default dsync).
    #[arg(long, global = true, env = "DSYNC_REMOTE_DSYNC", value_name = "PATH")]
    pub remote_dsync: Option<String>,
    /// Connections (ssh processes) to a remote repository (default 2):
    /// more when one is CPU- or window-bound, as restic's sftp backend.
    #[arg(long, global = true, env = "DSYNC_CONNECTIONS", value_name = "N")]
    pub connections: Option<usize>,
    /// The S3 server of an s3://bucket/prefix REPO, for a self-hosted one
    /// (MinIO, Ceph RGW, Garage): path-style requests, http allowed.
    /// Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,
    /// the region from AWS_REGION.
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create an empty repository.
    #[command(after_help = "Example: dsync init /backup/vms")]
    Init(InitArgs),
    /// Back up files as one new snapshot (creates REPO if missing).
    #[command(
        after_help = "Examples:\n  dsync backup /backup/vms ~/vms/disk.qcow2\n  \
dsync backup /backup/vms /dev/vg/disk-snap --name disk.raw\n  \
qemu-img convert -O raw disk.qcow2 /dev/stdout | dsync backup /backup/vms --stdin --name disk.raw"
    )]
    Backup(BackupArgs),
    /// List snapshots, oldest first.
    #[command(after_help = "Example: dsync list /backup/vms --json")]
    List(ListArgs),
    /// List the paths of a snapshot (or under PATH in it), depth first in
    /// name order.
    #[command(after_help = "Examples:\n  dsync ls /backup/home latest\n  \
dsync ls /backup/home 2024-05-01 home/alice/.config -l\n  \
dsync ls /backup/home latest --json | jq -r 'select(.size > 1e9) | .path'")]
    Ls(LsArgs),
    /// Restore a snapshot (or one file of it) to DEST.
    #[command(
        after_help = "SNAPSHOT is an id or unique id prefix, a local time YYYY-MM-DDTHH:MM:SS, \
a day YYYY-MM-DD (the last snapshot of that day), or `latest`.\n\n\
Examples:\n  dsync restore /backup/vms 2024-05-01 --to /tmp/old            # every file, into /tmp/old/\n  \
dsync restore /backup/vms latest --to /tmp/disk.qcow2 disk.qcow2  # one file"
    )]
    Restore(RestoreArgs),
    /// Mount every snapshot as a read-only file tree (FUSE).
    #[command(
        after_help = "The tree: one directory per snapshot named by its local time, a link per day \
to that day's last snapshot, and `latest`. Stays in the foreground until unmounted \
(fusermount3 -u MOUNTPOINT, Ctrl-C or SIGTERM).\n\n\
Examples:\n  dsync mount /backup/vms /mnt/history --daemon\n  \
qemu-img convert /mnt/history/2024-05-01/disk.qcow2 -O raw /tmp/old.raw\n  \
qemu-system-x86_64 -snapshot -drive file=/mnt/history/latest/disk.qcow2"
    )]
    Mount(MountArgs),
    /// Remove snapshots (only their manifests; `prune` reclaims the data).
    #[command(after_help = "Example: dsync forget /backup/vms 2024-05-01 3f2a9c")]
    Forget(ForgetArgs),
    /// Copy snapshots into another repository (a local one and an S3 or
    /// ssh one, either way), creating it if missing: objects as they are,
    /// what it already holds not again.
    #[command(
        after_help = "Examples:\n  dsync copy /backup/vms s3://offsite/vms\n  dsync copy s3://offsite/vms /restore/vms latest"
    )]
    Copy(CopyArgs),
    /// Apply a retention policy, then reclaim the space no snapshot uses.
    #[command(
        after_help = "The newest snapshot of each of the last N hours/days/weeks/months/years \
that have snapshots is kept, plus the last N (restic's and borg's meaning); a snapshot is kept if \
any rule keeps it. Without --keep-* options nothing is forgotten and only unused data is reclaimed.\n\n\
Example: dsync prune /backup/vms --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run"
    )]
    Prune(PruneArgs),
    /// What differs between two snapshots: paths added, removed or changed,
    /// and which byte ranges of each file (from the extent maps alone: no
    /// data is read).
    #[command(after_help = "Example: dsync diff /backup/vms 2024-05-01 latest disk.qcow2 --json")]
    Diff(DiffArgs),
    /// Bytes stored, and per snapshot the bytes only it uses (what forgetting
    /// it and `prune --repack-below 1` would free).
    #[command(after_help = "Example: dsync du /backup/vms")]
    Du(DuArgs),
    /// Make DST the same as SRC on this machine, as rsync does: what is
    /// missing is copied, what is the same skipped, a changed file rebuilt
    /// from its old version (only differing ranges read from SRC).
    #[command(
        override_usage = "dsync sync [OPTIONS] SRC... DST",
        after_help = "SRC/ syncs the contents of SRC into DST; SRC without the slash syncs SRC itself into DST/SRC's-name (rsync's meaning). A changed file is written beside the old one and renamed over it: a reader or a crash sees the old file or the new one, never a mix.

Exit codes (rsync's): 0 success, 1 error, 2 bad usage, 23 some files or attributes were not transferred, 24 some source files vanished, 25 --max-delete stopped deletions.

Examples:\n  dsync sync -a --delete /home/alice/ /mnt/backup/alice/\n  \
dsync sync -aHAX -n -i /etc/ /srv/etc-copy/   # what would change\n  \
dsync sync -a ~/vms/disk.qcow2 /mnt/usb/"
    )]
    Sync(SyncArgs),
    /// Serve a repository on standard input and output, for a dsync on
    /// another machine (started by it through ssh; see PROTOCOL.md).
    #[command(
        after_help = "A remote REPO is ssh://[user@]host[:port]/path or [user@]host:path; dsync \
runs `ssh [user@]host dsync serve` (-e/--rsh or DSYNC_RSH replaces ssh, --remote-dsync the far \
side's dsync).\n\n\
For a key that may only add backups, in ~/.ssh/authorized_keys on the server:\n  \
restrict,command=\"dsync serve --append-only --restrict-to-path /srv/backups\" ssh-ed25519 AAAA... client"
    )]
    Serve(ServeArgs),
    /// Write shell completions to standard output, or man pages into a directory.
    #[command(
        after_help = "Examples:\n  dsync generate completions bash > /etc/bash_completion.d/dsync\n  \
dsync generate man /usr/local/share/man/man1"
    )]
    Generate(GenerateArgs),
    /// Import every version of an rdiff-backup repository, oldest first, each
    /// as a snapshot with its original time (uses rdiff-backup to restore).
    #[command(
        name = "import-rdiff-backup",
        after_help = "Files at the top of the rdiff-backup \
repository are imported (subdirectories come with stage 2).\n\n\
Example: dsync import-rdiff-backup /backup/rdiff-vms /backup/vms"
    )]
    ImportRdiffBackup(ImportRdiffBackupArgs),
    /// Tell whether a writer holds the repository's lock, and which.
    #[command(
        after_help = "The lock is released by the kernel when its holder exits, however it exits \
(even kill -9), so there is never a stale lock to remove on a local file system: if a writer \
holds it, stop that process.\n\nExample: dsync unlock /backup/vms"
    )]
    Unlock(UnlockArgs),
    /// Check that everything the snapshots reference is there and sound.
    #[command(
        after_help = "Exits 3 when anything is damaged, naming each damaged object, the snapshots \
and files it affects and their unreadable byte ranges.\n\nExample: dsync check /backup/vms --read-data"
    )]
    Check(CheckArgs),
    /// Write one file of a snapshot to standard output.
    #[command(after_help = "Example: dsync cat /backup/vms latest disk.raw | sha256sum")]
    Cat(CatArgs),
}

/// The options of `dsync init` (its help: [`Command::Init`]).
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Where to create it (a missing or empty directory).
    pub repo: PathBuf,
    /// Most uncompressed bytes per compressed frame: smaller frames make
    /// random reads (the mount) faster, larger ones compress better.
    #[arg(long, default_value = "32K", value_parser = parse_size)]
    pub frame_size: u64,
    /// zstd level for new data (-7..=22).
    #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
    pub zstd_level: i32,
    /// Repository format: 3 (the default: directories, and the metadata of
    /// many files together in a few objects; store/FORMAT.md, "Format 3")
    /// or 2, which dsync 0.2 also reads (files only).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=3))]
    pub format: u32,
}

/// The options of `dsync backup` (its help: [`Command::Backup`]).
#[derive(Args, Debug)]
pub struct BackupArgs {
    pub repo: PathBuf,
    /// Files, directories or block devices to back up; each is stored
    /// under its base name (a directory with its whole tree).
    #[arg(required_unless_present = "stdin")]
    pub paths: Vec<PathBuf>,
    /// Read one file from standard input (a pipe of unknown length),
    /// stored under --name and diffed against its previous version.
    #[arg(long, requires = "name", conflicts_with = "paths")]
    pub stdin: bool,
    /// Name every file of a directory as it is stored: `new`, `changed`,
    /// `unchanged` or `error`, then its path (with --json, one object per
    /// file before the summary: docs/JSON.md).
    #[arg(long)]
    pub files: bool,
    /// With --stdin: fail, storing nothing, unless the stream is exactly
    /// this long (e.g. `$(blockdev --getsize64 DEV)`): a producer that
    /// dies early otherwise leaves a short snapshot.
    #[arg(long, requires = "stdin", value_parser = parse_size)]
    pub expect_size: Option<u64>,
    /// Read files even when size, mtime, ctime and inode say they are
    /// unchanged.
    #[arg(long)]
    pub checksum: bool,
    /// A file whose inode number changed is not read again for that alone
    /// (file systems without stable inode numbers).
    #[arg(long)]
    pub ignore_inode: bool,
    /// A file whose ctime changed is not read again for that alone (after a
    /// `chown -R` or `chmod -R`).
    #[arg(long)]
    pub ignore_ctime: bool,
    /// A file that changes while it is read: `flag` reads it again, then
    /// stores it as read, flagged, and exits 5 (snapshot incomplete);
    /// `fail` makes no snapshot (for a live image: back up a VM or LVM
    /// snapshot instead).
    #[arg(long, value_enum, default_value_t = OnChange::Flag)]
    pub on_change: OnChange,
    /// Same as `--on-change flag` (the default), kept for scripts.
    #[arg(long, hide = true)]
    pub accept_changed: bool,
    /// Leave out what matches PATTERN (gitignore syntax, matched against
    /// absolute paths: `*.tmp`, `.cache/`, `/home/*/Downloads`, `!keep`).
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Patterns from FILE, one per line (`#` starts a comment).
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,
    /// Leave out a directory that contains a file named NAME.
    #[arg(long, value_name = "NAME")]
    pub exclude_if_present: Vec<String>,
    /// Leave out directories tagged with a CACHEDIR.TAG (signature checked).
    #[arg(long)]
    pub exclude_caches: bool,
    /// Leave out files larger than SIZE (e.g. 4G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub exclude_larger_than: Option<u64>,
    /// Stay on the file system of each source: other mounts are kept as
    /// empty directories.
    #[arg(short = 'x', long)]
    pub one_file_system: bool,
    /// Store the (single) source under this name, e.g. for a block device.
    #[arg(long)]
    pub name: Option<String>,
    /// The snapshot's time instead of now: local YYYY-MM-DDTHH:MM:SS or @UNIX_SECONDS.
    #[arg(long, value_parser = parse_time)]
    pub time: Option<i64>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What backup does with a file that changes while it is read.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnChange {
    Flag,
    Fail,
}

/// The options of `dsync list` (its help: [`Command::List`]).
#[derive(Args, Debug)]
pub struct ListArgs {
    pub repo: PathBuf,
    /// One JSON object per snapshot, one per line.
    #[arg(long)]
    pub json: bool,
}

/// The options of `dsync ls` (its help: [`Command::Ls`]).
#[derive(Args, Debug)]
pub struct LsArgs {
    pub repo: PathBuf,
    pub snapshot: String,
    /// A directory or file of the snapshot (`home/alice`); the whole
    /// snapshot without it.
    pub path: Option<String>,
    /// Mode, owner, group, size and modification time, as `ls -l`.
    #[arg(short, long)]
    pub long: bool,
    /// One JSON object per path, one per line (docs/JSON.md).
    #[arg(long)]
    pub json: bool,
}

/// The options of `dsync restore` (its help: [`Command::Restore`]).
#[derive(Args, Debug)]
pub struct RestoreArgs {
    pub repo: PathBuf,
    pub snapshot: String,
    /// Destination: a directory for the whole snapshot, a file (or a
    /// directory to put it in) with PATH.
    #[arg(long)]
    pub to: PathBuf,
    /// A file or directory of the snapshot, by its path there (`etc/hosts`).
    pub path: Option<String>,
    /// Overwrite an existing destination.
    #[arg(long)]
    pub force: bool,
    /// Owners by the stored uid and gid (as root), not by user and group
    /// name.
    #[arg(long)]
    pub numeric_ids: bool,
    /// Update files already at the destination in place, writing only the
    /// blocks that differ from the snapshot's (yesterday's image over
    /// today's copy writes the day's changes); what cannot be updated is
    /// replaced, as with --force. An interrupted run leaves a file partly
    /// updated: run it again.
    #[arg(long)]
    pub delta: bool,
    /// Print what was restored as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The options of `dsync mount` (its help: [`Command::Mount`]).
#[derive(Args, Debug)]
pub struct MountArgs {
    pub repo: PathBuf,
    pub mountpoint: PathBuf,
    /// Let other users read the mount.
    #[arg(long)]
    pub allow_other: bool,
    /// Memory for decompressed frames, e.g. 256M, 1G.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub cache_size: u64,
    /// Return once the mount is ready, leaving it served in the background.
    #[arg(long)]
    pub daemon: bool,
}

/// The options of `dsync forget` (its help: [`Command::Forget`]).
#[derive(Args, Debug)]
pub struct ForgetArgs {
    pub repo: PathBuf,
    /// Snapshots: ids or unique prefixes, times, days, or latest.
    #[arg(required = true)]
    pub snapshots: Vec<String>,
    /// Print the forgotten ids as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The options of `dsync copy` (its help: [`Command::Copy`]).
#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The repository copied from.
    pub src: PathBuf,
    /// The repository copied into (created with SRC's block parameters if
    /// missing).
    pub dst: PathBuf,
    /// Snapshots of SRC (ids or unique prefixes, times, days, latest); all
    /// when none is given.
    pub snapshots: Vec<String>,
    /// Print what was copied as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The options of `dsync prune` (its help: [`Command::Prune`]).
#[derive(Args, Debug)]
pub struct PruneArgs {
    pub repo: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub keep_last: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_hourly: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_daily: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_monthly: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_yearly: u32,
    /// Rewrite packs whose live fraction is below this (0 never repacks).
    #[arg(long, default_value_t = 0.5)]
    pub repack_below: f64,
    /// Show what would be forgotten and freed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The options of `dsync diff` (its help: [`Command::Diff`]).
#[derive(Args, Debug)]
pub struct DiffArgs {
    pub repo: PathBuf,
    pub a: String,
    pub b: String,
    /// Only this file.
    pub path: Option<String>,
    /// One JSON object per file, one per line.
    #[arg(long)]
    pub json: bool,
}

/// The options of `dsync sync` (its help: [`Command::Sync`]); rsync's
/// names and meanings.
#[derive(Args, Debug)]
pub struct SyncArgs {
    /// The sources, then the destination.
    #[arg(required = true, num_args = 2.., value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// -rlptgoD: recursive, symlinks, permissions, times, group, owner,
    /// devices and specials (not -H, -A, -X).
    #[arg(short, long)]
    pub archive: bool,
    /// Into directories.
    #[arg(short, long)]
    pub recursive: bool,
    /// Symlinks as symlinks.
    #[arg(short, long)]
    pub links: bool,
    /// Permissions.
    #[arg(short, long)]
    pub perms: bool,
    /// Modification times.
    #[arg(short, long)]
    pub times: bool,
    /// Groups.
    #[arg(short, long)]
    pub group: bool,
    /// Owners (as root).
    #[arg(short, long)]
    pub owner: bool,
    /// --devices --specials.
    #[arg(short = 'D')]
    pub devices_specials: bool,
    /// Character and block devices (as root).
    #[arg(long)]
    pub devices: bool,
    /// Fifos and sockets.
    #[arg(long)]
    pub specials: bool,
    /// Hard links as hard links.
    #[arg(short = 'H', long)]
    pub hard_links: bool,
    /// POSIX ACLs.
    #[arg(short = 'A', long)]
    pub acls: bool,
    /// Extended attributes.
    #[arg(short = 'X', long)]
    pub xattrs: bool,
    /// Holes of new files stay holes.
    #[arg(short = 'S', long)]
    pub sparse: bool,
    /// Owners by number (locally the same as by name).
    #[arg(long)]
    pub numeric_ids: bool,
    /// Delete what DST has and SRC has not (after the transfer, and only if
    /// SRC was read without error).
    #[arg(long)]
    pub delete: bool,
    /// Delete excluded names from DST too.
    #[arg(long)]
    pub delete_excluded: bool,
    /// Delete at most N names (exit code 25 when more were due).
    #[arg(long, value_name = "N")]
    pub max_delete: Option<u64>,
    /// Delete even when a SRC directory is empty and DST's is not (refused
    /// otherwise: the typo that empties a backup).
    #[arg(long)]
    pub force_delete: bool,
    /// Compare contents, not size and time.
    #[arg(short, long)]
    pub checksum: bool,
    /// Compare sizes only.
    #[arg(long)]
    pub size_only: bool,
    /// Skip files that are newer in DST.
    #[arg(short, long)]
    pub update: bool,
    /// Skip files that exist in DST.
    #[arg(long)]
    pub ignore_existing: bool,
    /// Times this many seconds apart are equal; 0 (the default, as rsync)
    /// compares whole seconds, -1 nanoseconds too.
    #[arg(
        long,
        short = '@',
        value_name = "SECONDS",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub modify_window: i64,
    /// Leave out names matching PATTERN (rsync's patterns).
    #[arg(long, value_name = "PATTERN", allow_hyphen_values = true)]
    pub exclude: Vec<String>,
    /// Keep names matching PATTERN (the first matching rule wins).
    #[arg(long, value_name = "PATTERN", allow_hyphen_values = true)]
    pub include: Vec<String>,
    /// Exclude patterns from FILE, one a line.
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,
    /// Include patterns from FILE, one a line.
    #[arg(long, value_name = "FILE")]
    pub include_from: Vec<PathBuf>,
    /// A filter rule: `- PATTERN`, `+ PATTERN`, `merge FILE`, `. FILE`, `!`.
    #[arg(short, long, value_name = "RULE", allow_hyphen_values = true)]
    pub filter: Vec<String>,
    /// The rules above in command-line order (filled in from clap's
    /// indices: rsync's first match depends on it).
    #[arg(skip)]
    pub rules: Vec<(String, String)>,
    /// Change nothing; say what would be done (with -i).
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// One line per change, rsync's `YXcstpoguax PATH`.
    #[arg(short, long)]
    pub itemize_changes: bool,
    /// Copy changed files whole.
    #[arg(short = 'W', long)]
    pub whole_file: bool,
    /// Write only the changed ranges into DST's files themselves (for VM
    /// images on file systems without reflinks), safely: data that moved is
    /// copied before it is overwritten, and a journal of what is overwritten
    /// lets the next sync roll back a crash.
    #[arg(long)]
    pub inplace: bool,
    /// One JSON object per change, one per line, then a summary
    /// (docs/JSON.md).
    #[arg(long)]
    pub json: bool,
}

/// The options of `dsync serve` (its help: [`Command::Serve`]).
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Refuse every delete and overwrite: backups work, forget and prune
    /// fail.
    #[arg(long)]
    pub append_only: bool,
    /// Refuse every write.
    #[arg(long)]
    pub read_only: bool,
    /// Serve only repositories inside DIR.
    #[arg(long, value_name = "DIR")]
    pub restrict_to_path: Option<PathBuf>,
}

/// The options of `dsync du` (its help: [`Command::Du`]).
#[derive(Args, Debug)]
pub struct DuArgs {
    pub repo: PathBuf,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The options of `dsync generate` (its help: [`Command::Generate`]).
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub what: Generate,
}

/// The options of `dsync import-rdiff-backup` (its help: [`Command::ImportRdiffBackup`]).
#[derive(Args, Debug)]
pub struct ImportRdiffBackupArgs {
    pub rdiff_repo: PathBuf,
    pub repo: PathBuf,
}

/// The options of `dsync unlock` (its help: [`Command::Unlock`]).
#[derive(Args, Debug)]
pub struct UnlockArgs {
    pub repo: PathBuf,
}

/// The options of `dsync check` (its help: [`Command::Check`]).
#[derive(Args, Debug)]
pub struct CheckArgs {
    pub repo: PathBuf,
    /// Also read every frame and every version's bytes (checks all hashes).
    #[arg(long)]
    pub read_data: bool,
    /// Read only a part: `K/N` (part K of N, by id: 1/7 .. 7/7 on
    /// successive days read everything) or `P%` (about P percent).
    #[arg(long, value_parser = parse_subset)]
    pub read_data_subset: Option<(u64, u64)>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The options of `dsync cat` (its help: [`Command::Cat`]).
#[derive(Args, Debug)]
pub struct CatArgs {
    pub repo: PathBuf,
    pub snapshot: String,
    pub path: String,
}

/// Puts the repository of `-r REPO` / `--repo REPO` (before the command) or
/// of DSYNC_REPO (`env`) where the command's REPO argument goes, so that REPO
/// can be left out, as RESTIC_REPOSITORY and restic's -r do.
///
/// `-r` always stands for REPO. DSYNC_REPO does only where REPO is missing:
/// the command's positional arguments (counted with clap's own definitions,
/// so that an option's value is not mistaken for one) are too few for REPO
/// to be among them; or there could be REPO or not (an optional or variadic
/// argument: backup, restore, diff, forget) and the one in REPO's place is
/// neither a dsync repository nor a URL. The --help of -r says the same.
///
/// # Errors
/// `-r` without a value.
pub fn with_repo(mut args: Vec<OsString>, env: Option<OsString>) -> Result<Vec<OsString>, String> {
    let env = env.filter(|v| !v.is_empty());
    let mut flag = None;
    let mut i = 1;
    let mut command = None;
    while i < args.len() {
        let a = args[i].to_string_lossy().into_owned();
        if a == "-r" || a == "--repo" {
            if i + 1 >= args.len() {
                return Err(format!("{a} needs a repository path"));
            }
            flag = Some(args.remove(i + 1));
            args.remove(i);
            continue;
        }
        if let Some(v) = args[i].as_bytes().strip_prefix(b"--repo=") {
            // Bytes, not `a`: a path need not be UTF-8.
            flag = Some(OsStr::from_bytes(v).to_owned());
            args.remove(i);
            continue;
        }
        if !a.starts_with('-') {
            command = Some((i, a));
            break;
        }
        i += 1;
    }
    let (Some(repo), Some((at, name))) = (flag.clone().or(env), command) else {
        return Ok(args);
    };
    let mut cli = Cli::command();
    cli.build();
    let Some(cmd) = cli.find_subcommand(&name) else {
        return Ok(args);
    };
    let wanted: Vec<&clap::Arg> = cmd.get_positionals().collect();
    let Some(repo_at) = wanted.iter().position(|a| a.get_id() == "repo") else {
        return Ok(args);
    };
    let given = positionals(cmd, &args[at + 1..]);
    let insert = flag.is_some() || {
        let required = wanted.iter().filter(|a| a.is_required_set()).count();
        let variadic = wanted
            .iter()
            .any(|a| a.get_num_args().is_some_and(|n| n.max_values() > 1));
        let most = if variadic { usize::MAX } else { wanted.len() };
        if given.len() < required {
            true
        } else if given.len() >= most {
            false
        } else {
            !given
                .get(repo_at)
                .is_some_and(|&k| names_a_repo(&args[at + 1 + k]))
        }
    };
    if insert {
        let k = given.get(repo_at).map_or(args.len(), |&k| at + 1 + k);
        args.insert(k, repo);
    }
    Ok(args)
}

/// Indices in `args` (what follows the command's name) of the positional
/// arguments, skipping options and the values of those that take one.
fn positionals(cmd: &clap::Command, args: &[OsString]) -> Vec<usize> {
    let takes_value = |a: Option<&clap::Arg>| a.is_some_and(|a| a.get_action().takes_values());
    let mut out = Vec::new();
    let mut k = 0;
    while k < args.len() {
        let a = args[k].to_string_lossy();
        if a == "--" {
            out.extend(k + 1..args.len());
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            if !long.contains('=')
                && takes_value(cmd.get_arguments().find(|x| x.get_long() == Some(long)))
            {
                k += 1;
            }
        } else if a.len() > 1 && a.starts_with('-') {
            // A cluster of short flags, the last of which may take the next
            // argument as its value (`-qx V`), or `-xV`.
            for (j, c) in a.char_indices().skip(1) {
                if takes_value(cmd.get_arguments().find(|x| x.get_short() == Some(c))) {
                    if j + c.len_utf8() == a.len() {
                        k += 1;
                    }
                    break;
                }
            }
        } else {
            out.push(k);
        }
        k += 1;
    }
    out
}

/// A dsync repository (a directory with a config file) or a URL such as
/// `ssh://host/path`: what an explicit REPO looks like.
fn names_a_repo(arg: &OsStr) -> bool {
    let url = arg
        .to_str()
        .and_then(|s| s.split_once("://"))
        .is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        });
    url || Path::new(arg).join("config").is_file()
}

#[cfg(test)]
mod repo_tests {
    use super::with_repo;
    use std::ffi::OsString;

    fn run(env: Option<&str>, line: &str) -> String {
        let args: Vec<OsString> = line.split(' ').map(OsString::from).collect();
        let out = with_repo(args, env.map(OsString::from)).unwrap();
        let out: Vec<String> = out
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        out.join(" ")
    }

    #[test]
    fn dsync_repo_fills_a_missing_repo() {
        let e = Some("/e");
        assert_eq!(run(e, "dsync list --json"), "dsync list --json /e");
        assert_eq!(run(e, "dsync -q list"), "dsync -q list /e");
        assert_eq!(run(e, "dsync backup disk.img"), "dsync backup /e disk.img");
        assert_eq!(run(e, "dsync backup a b c"), "dsync backup /e a b c");
        assert_eq!(
            run(e, "dsync backup --stdin --name x"),
            "dsync backup --stdin --name x /e"
        );
        assert_eq!(
            run(e, "dsync backup --name x disk"),
            "dsync backup --name x /e disk"
        );
        assert_eq!(
            run(e, "dsync restore latest --to out"),
            "dsync restore /e latest --to out"
        );
        assert_eq!(
            run(e, "dsync restore latest --to out a.img"),
            "dsync restore /e latest --to out a.img"
        );
        assert_eq!(run(e, "dsync diff a b"), "dsync diff /e a b");
        assert_eq!(run(e, "dsync diff a b c"), "dsync diff /e a b c");
        assert_eq!(run(e, "dsync mount /mnt"), "dsync mount /e /mnt");
        assert_eq!(
            run(e, "dsync cat latest a.img"),
            "dsync cat /e latest a.img"
        );
        assert_eq!(run(e, "dsync forget a"), "dsync forget /e a");
        assert_eq!(
            run(e, "dsync import-rdiff-backup /src"),
            "dsync import-rdiff-backup /src /e"
        );
        assert_eq!(
            run(e, "dsync init --zstd-level -3"),
            "dsync init --zstd-level -3 /e"
        );
        assert_eq!(
            run(e, "dsync check --read-data-subset 1/7"),
            "dsync check --read-data-subset 1/7 /e"
        );
        assert_eq!(run(e, "dsync backup -- -odd"), "dsync backup -- /e -odd");
    }

    #[test]
    fn an_explicit_repo_wins_over_dsync_repo() {
        let e = Some("/e");
        assert_eq!(run(e, "dsync list /r"), "dsync list /r");
        assert_eq!(run(e, "dsync list --json /r"), "dsync list --json /r");
        assert_eq!(
            run(e, "dsync check /r --read-data"),
            "dsync check /r --read-data"
        );
        assert_eq!(run(e, "dsync mount /r /mnt"), "dsync mount /r /mnt");
        assert_eq!(
            run(e, "dsync cat /r latest a.img"),
            "dsync cat /r latest a.img"
        );
        assert_eq!(
            run(e, "dsync restore /r latest --to o a.img"),
            "dsync restore /r latest --to o a.img"
        );
        assert_eq!(run(e, "dsync diff /r a b c"), "dsync diff /r a b c");
        assert_eq!(
            run(e, "dsync import-rdiff-backup /src /r"),
            "dsync import-rdiff-backup /src /r"
        );
        assert_eq!(
            run(e, "dsync backup ssh://h/r a"),
            "dsync backup ssh://h/r a"
        );
        assert_eq!(run(e, "dsync -r /f list"), "dsync list /f");
        assert_eq!(run(e, "dsync --repo=/f backup a b"), "dsync backup /f a b");
        assert_eq!(
            run(None, "dsync -r /f import-rdiff-backup /src"),
            "dsync import-rdiff-backup /src /f"
        );
        // -r always stands for REPO: with REPO given too, clap says which is extra.
        assert_eq!(run(e, "dsync -r /f list /r"), "dsync list /f /r");
    }

    #[test]
    fn an_existing_repository_is_recognised_in_an_ambiguous_place() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("r");
        std::fs::create_dir(&r).unwrap();
        let r = r.to_str().unwrap().to_string();
        let e = Some("/e");
        // Not a repository yet: a file to back up.
        assert_eq!(
            run(e, &format!("dsync backup {r} a")),
            format!("dsync backup /e {r} a")
        );
        std::fs::write(format!("{r}/config"), b"").unwrap();
        assert_eq!(
            run(e, &format!("dsync backup {r} a")),
            format!("dsync backup {r} a")
        );
        assert_eq!(
            run(e, &format!("dsync forget {r} a")),
            format!("dsync forget {r} a")
        );
        assert_eq!(
            run(e, &format!("dsync restore {r} a --to o")),
            format!("dsync restore {r} a --to o")
        );
        assert_eq!(
            run(e, &format!("dsync diff {r} a b")),
            format!("dsync diff {r} a b")
        );
    }

    #[test]
    fn nothing_to_do() {
        assert_eq!(run(None, "dsync list /r"), "dsync list /r");
        assert_eq!(run(Some(""), "dsync list"), "dsync list");
        assert_eq!(
            run(Some("/e"), "dsync generate man /d"),
            "dsync generate man /d"
        );
        assert_eq!(run(Some("/e"), "dsync --version"), "dsync --version");
        assert!(with_repo(vec!["dsync".into(), "-r".into()], None).is_err());
    }
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
