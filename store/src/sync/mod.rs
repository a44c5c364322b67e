//! `dsync sync SRC... DST`: rsync's job for local trees.
//!
//! Meaning as in rsync (its manual is the reference): `SRC/` syncs SRC's
//! contents into DST, `SRC` syncs SRC itself as DST/SRC's-name; a single
//! file SRC with a DST that is not a directory is copied to that name. The
//! quick check (size and mtime; `--checksum`, `--size-only`) decides which
//! files are transferred; `--itemize-changes` says what was done in rsync's
//! 11-character format; exit codes are rsync's where the meaning matches.
//!
//! How it differs:
//! - A changed file is rebuilt from its old version and SRC ([`file`]):
//!   blocks compared in place, else the rsync search; both kinds of range
//!   copied in the kernel. The new file is written beside the old one and
//!   renamed over it: a reader or a crash sees the old file or the new one.
//! - Files are transferred on several threads while the walk goes on.
//! - Every DST operation is relative to an open directory, never through a
//!   symlink: a symlink in DST is replaced, never followed.
//! - Deletions (`--delete`) are made after everything was transferred, and
//!   only if SRC was read without any error; an empty SRC never empties a
//!   non-empty DST unless `--force-delete` says so.

mod attrs;
mod file;
pub mod filter;
mod inplace;
pub mod remote;
mod src;
mod transfer;
mod walk;

use std::collections::HashMap;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};

use rustix::fs::{Mode, OFlags};

pub use filter::Filters;

use crate::error::{Error, Result};
use transfer::{worker, Job};
use walk::Walker;

/// What `dsync sync` is asked to keep and how (rsync's flags).
#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    /// `-r`: into directories.
    pub recursive: bool,
    /// `-l`: symlinks as symlinks (else skipped).
    pub links: bool,
    /// `-p`: permissions.
    pub perms: bool,
    /// `-t`: modification times.
    pub times: bool,
    /// `-g`: groups.
    pub group: bool,
    /// `-o`: owners (as root).
    pub owner: bool,
    /// `--devices`: character and block devices (as root).
    pub devices: bool,
    /// `--specials`: fifos and sockets.
    pub specials: bool,
    /// `-H`: hard links as hard links.
    pub hard_links: bool,
    /// `-A`: POSIX ACLs (the `system.posix_acl_*` attributes).
    pub acls: bool,
    /// `-X`: other extended attributes.
    pub xattrs: bool,
    /// `-S`: holes of new files kept as holes.
    pub sparse: bool,
    /// `--numeric-ids` (locally, names and ids are the same).
    pub numeric_ids: bool,
    /// `--delete`: remove what DST has and SRC has not.
    pub delete: bool,
    /// `--delete-excluded`: excluded names in DST are removed too.
    pub delete_excluded: bool,
    /// `--max-delete N`: at most N deletions.
    pub max_delete: Option<u64>,
    /// `--force-delete`: delete even when a SRC directory is empty.
    pub force_delete: bool,
    /// `-c`: compare contents, not size and time.
    pub checksum: bool,
    /// `--size-only`.
    pub size_only: bool,
    /// `-u`: skip files newer in DST.
    pub update: bool,
    /// `--ignore-existing`.
    pub ignore_existing: bool,
    /// `--modify-window`: times this many seconds apart are equal; as in
    /// rsync, 0 compares whole seconds and a negative value nanoseconds.
    pub modify_window: i64,
    pub filters: Filters,
    /// `-n`: change nothing, say what would be done.
    pub dry_run: bool,
    /// `-W`: copy changed files whole (no plan against the old file).
    pub whole_file: bool,
    /// `--inplace`: write only the changed ranges into DST's file itself,
    /// journaled (see [`inplace`]).
    pub inplace: bool,
    /// Files transferred at once (0: a default for the machine).
    pub threads: usize,
}

/// One line of `--itemize-changes`.
pub struct Item<'a> {
    /// rsync's 11 characters (`>f.st......`, `cd+++++++++`, `*deleting  `).
    pub code: &'a str,
    /// The path from the transfer's root (a directory's ends with `/`).
    pub path: &'a [u8],
    /// A symlink's target (` -> `) or a hard link's first name (` => `).
    pub link: Option<(&'static str, &'a [u8])>,
    /// A regular file's size.
    pub size: u64,
}

/// What a sync reports as it goes.
pub trait SyncEvents: Sync {
    /// A change made (or, with `-n`, that would be made).
    fn item(&self, _item: &Item<'_>) {}
    /// Whether [`SyncEvents::item`] does anything (a receiver on another
    /// machine sends items only then).
    fn wants_items(&self) -> bool {
        true
    }
    /// A problem with one file; the sync goes on.
    fn warn(&self, msg: &str);
    /// Bytes of regular files dealt with (for a progress bar).
    fn advance(&self, _bytes: u64) {}
    /// What rsync says besides items (`created directory DST`).
    fn message(&self, _msg: &str) {}
}

/// What a sync did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    /// Regular files in SRC.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Regular files written.
    pub transferred: u64,
    /// Bytes of them taken from SRC.
    pub literal_bytes: u64,
    /// Bytes of them taken from DST's old files.
    pub matched_bytes: u64,
    /// Bytes read to plan the transfers.
    pub read_bytes: u64,
    /// Bytes written into DST's files.
    pub written_bytes: u64,
    /// Directories, symlinks and other nodes created or replaced.
    pub created: u64,
    /// Names deleted (with --delete, or to make way).
    pub deleted: u64,
    /// Deletions not made because of `--max-delete`.
    pub delete_skipped: u64,
    /// Deletions not made because SRC had an error.
    pub delete_inhibited: bool,
    /// Files that vanished from SRC.
    pub vanished: u64,
    /// Other errors (each was reported).
    pub errors: u64,
}

impl SyncReport {
    /// rsync's exit code for this outcome: 23 partial transfer, 25
    /// `--max-delete` stopped deletions, 24 files vanished, else 0.
    pub fn exit_code(&self) -> u8 {
        if self.errors > 0 {
            23
        } else if self.delete_skipped > 0 {
            25
        } else if self.vanished > 0 {
            24
        } else {
            0
        }
    }
}

/// Syncs `srcs` into `dst`.
///
/// # Errors
/// Only what stops the whole sync: DST unusable, bad options, an empty SRC
/// that `--delete` would empty DST with. A file that cannot be transferred
/// is reported, counted in [`SyncReport::errors`], and the rest goes on.
pub fn sync(
    srcs: &[PathBuf],
    dst: &Path,
    opts: &SyncOptions,
    ev: &dyn SyncEvents,
) -> Result<SyncReport> {
    run(Srcs::Local(srcs), dst, opts, ev)
}

/// SRC: paths here, or what a remote sender said of its arguments.
pub(super) enum Srcs<'p> {
    Local(&'p [PathBuf]),
    Remote(Arc<remote::Peer>, Vec<remote::Top>),
}

impl Srcs<'_> {
    fn len(&self) -> usize {
        match self {
            Srcs::Local(s) => s.len(),
            Srcs::Remote(_, t) => t.len(),
        }
    }

    /// One argument that is not a directory (nor `SRC/`).
    fn single_file(&self) -> bool {
        match self {
            Srcs::Local(s) => {
                s.len() == 1
                    && !ends_with_slash(&s[0])
                    && std::fs::symlink_metadata(&s[0]).is_ok_and(|m| !m.is_dir())
            }
            Srcs::Remote(_, t) => {
                t.len() == 1 && !t[0].contents && t[0].entry.as_ref().is_ok_and(|e| !e.st.is_dir())
            }
        }
    }
}

pub(super) fn run(
    srcs: Srcs<'_>,
    dst: &Path,
    opts: &SyncOptions,
    ev: &dyn SyncEvents,
) -> Result<SyncReport> {
    if srcs.len() == 0 {
        return Err(Error::InvalidInput("no source given".into()));
    }
    let matcher = opts.filters.matcher()?;
    let dst_bytes = dst.as_os_str().as_bytes();
    let dst_is_dir = match std::fs::metadata(dst) {
        Ok(m) => m.is_dir(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(dst, e)),
    };
    let single_file = srcs.single_file();
    // Where the entries go: DST itself as a directory, or (one file to a
    // name that is not a directory) DST's parent.
    let (dst_dir_path, file_name): (PathBuf, Option<Vec<u8>>) =
        if !dst_is_dir && single_file && !dst_bytes.ends_with(b"/") {
            let parent = match dst.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let name = dst.file_name().ok_or_else(|| {
                Error::InvalidInput(format!("{}: not a file name", dst.display()))
            })?;
            (parent, Some(name.as_bytes().to_vec()))
        } else {
            (dst.to_path_buf(), None)
        };
    let mut created_root = false;
    if file_name.is_none() && !dst_is_dir {
        if !opts.dry_run {
            match std::fs::create_dir(dst) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(Error::InvalidInput(format!(
                        "{}: exists and is not a directory",
                        dst.display()
                    )))
                }
                Err(e) => return Err(Error::io(dst, e)),
            }
        }
        created_root = true;
        let shown = String::from_utf8_lossy(dst_bytes);
        ev.message(&format!(
            "created directory {}",
            shown.trim_end_matches('/')
        ));
    }
    let dst_root = if opts.dry_run && created_root {
        None
    } else {
        Some(Arc::new(
            rustix::fs::open(
                &dst_dir_path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io(&dst_dir_path, e.into()))?,
        ))
    };

    let threads = if opts.threads > 0 {
        opts.threads
    } else if matches!(srcs, Srcs::Remote(..)) {
        // Each waits on the network for its file: many keep the link
        // busy (rsync's pipelining).
        REMOTE_WORKERS
    } else {
        (rayon::current_num_threads() * 2).clamp(2, 8)
    };
    let shared = Shared {
        opts,
        ev,
        report: Mutex::new(SyncReport::default()),
        root: rustix::process::geteuid().is_root(),
        umask: umask(),
    };
    // A remote SRC's small files are asked for as they are queued (see
    // remote::AHEAD): the queue is no longer than what may be asked ahead.
    let queue = if matches!(srcs, Srcs::Remote(..)) {
        remote::AHEAD_QUEUE
    } else {
        256
    };
    let (tx, rx) = sync_channel::<Job>(queue);
    let rx = Mutex::new(rx);
    let mut walker = Walker {
        s: &shared,
        matcher: matcher.as_ref(),
        tx: Some(tx),
        links: HashMap::new(),
        dirs: Vec::new(),
        later_links: Vec::new(),
        deletions: Vec::new(),
        src_errors: 0,
        root: dst_root.clone(),
        changes: 0,
        prefetched: HashMap::new(),
    };
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..threads {
            let (shared, rx) = (&shared, &rx);
            scope.spawn(move || worker(shared, rx));
        }
        // The walk recurses once per directory level, and a pool thread
        // waiting for its subtrees runs other subtrees' walks on its own
        // stack: its own pool, with stacks to match.
        let r = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .stack_size(WALK_STACK)
            .thread_name(|i| format!("dsync-walk-{i}"))
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the walk's threads: {e}")))
            .and_then(|pool| {
                pool.install(|| {
                    let (dst_root, file_name) = (dst_root.as_ref(), file_name.as_deref());
                    match &srcs {
                        Srcs::Local(srcs) => {
                            for src in *srcs {
                                walker.top(src, dst_root, file_name, created_root)?;
                            }
                        }
                        Srcs::Remote(peer, tops) => {
                            for (i, t) in tops.iter().enumerate() {
                                walker.top_remote(
                                    peer,
                                    i as u32,
                                    t,
                                    dst_root,
                                    file_name,
                                    created_root,
                                )?;
                            }
                        }
                    }
                    Ok(())
                })
            });
        // The workers end when the channel closes.
        walker.tx = None;
        r
    })?;
    walker.finish();
    let report = shared
        .report
        .into_inner()
        .map_err(|_| Error::Internal("a sync thread panicked".into()))?;
    Ok(report)
}

pub(super) fn ends_with_slash(p: &Path) -> bool {
    let b = p.as_os_str().as_bytes();
    b.ends_with(b"/") || b.ends_with(b"/.") || b == b"."
}

fn umask() -> u32 {
    // Read without changing it for good: set, then put back.
    let m = rustix::process::umask(Mode::from_raw_mode(0o022));
    rustix::process::umask(m);
    m.bits()
}

pub(super) fn os(b: &[u8]) -> &std::ffi::OsStr {
    std::ffi::OsStr::from_bytes(b)
}

pub(super) fn show(rel: &[u8]) -> String {
    if rel.is_empty() {
        ".".into()
    } else {
        String::from_utf8_lossy(rel).into_owned()
    }
}

pub(super) fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(rel.len() + 1 + name.len());
    if !rel.is_empty() {
        p.extend_from_slice(rel);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// What every thread of a sync shares.
pub(super) struct Shared<'a> {
    opts: &'a SyncOptions,
    ev: &'a dyn SyncEvents,
    report: Mutex<SyncReport>,
    root: bool,
    umask: u32,
}

impl Shared<'_> {
    fn count(&self, f: impl FnOnce(&mut SyncReport)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }

    fn error(&self, msg: String) {
        self.ev.warn(&msg);
        self.count(|r| r.errors += 1);
    }

    fn item(&self, code: &str, path: &[u8], link: Option<(&'static str, &[u8])>, size: u64) {
        self.ev.item(&Item {
            code,
            path,
            link,
            size,
        });
    }
}

/// Files in flight from a remote sender.
const REMOTE_WORKERS: usize = 16;

/// Stack of each walk thread (address space; only what is used is memory).
const WALK_STACK: usize = 256 << 20;
