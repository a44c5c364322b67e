//! The random changing trees of the directory property tests, shared by
//! `store/tests/tree_prop.rs` (every snapshot restored) and
//! `fuse/tests/mount_prop.rs` (every snapshot read through a mount), each
//! of which includes this file as a module.
//!
//! A case is a random tree (nested directories; empty, small, compressible,
//! sparse and, rarely, multi-MiB files; symlinks with raw-byte, dangling,
//! absolute and `..` targets; hard links across directories; fifos,
//! sockets, and device nodes when root; odd names: non-UTF-8 bytes, spaces,
//! newlines, leading dashes, unicode, 255 bytes; modes with setuid, setgid
//! and sticky bits; mtimes with nanoseconds, before 1970 too; `user.*`
//! extended attributes; owners when root) and one or two rounds of random
//! changes (edits of the same and of another size, renames, deletions, a
//! file becoming a directory and back, symlink <-> file, attribute, mode,
//! owner and time changes, new hard links and nodes). The tree is backed up
//! before and after each round ([`back_up_case`]), so later backups go
//! through change detection against the earlier ones; right before each
//! backup the test reads the tree with `lstat`, `readlink`, `read`,
//! `SEEK_DATA`/`SEEK_HOLE` and `getxattr` ([`capture`]: the test's own
//! reading, nothing of dsync's), and [`compare`] tells what a tree read
//! back later has different.
//!
//! Nothing depends on timing: a file modified within dsync's racy window
//! (2 s) is simply read again; and an edit that keeps size and mtime (set
//! back on purpose) is made detectable the way it is in real life, by its
//! ctime (see [`bump_ctimes`]).

// Each test uses most of this, not all.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dsync_store::format::config::Config;
use dsync_store::testdata::pseudo;
use dsync_store::{backup, BackupOptions, NoProgress, Repo, SnapshotId};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, XattrFlags, CWD};

/// Directories are nested at most this deep when made (renames may move
/// one a little deeper).
pub const MAX_DEPTH: usize = 4;

// ---------------------------------------------------------------------------
// What the machine allows, found once.

#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub root: bool,
    pub xattrs: bool,
    pub devices: bool,
}

pub fn caps() -> Caps {
    static CAPS: OnceLock<Caps> = OnceLock::new();
    *CAPS.get_or_init(|| {
        let root = rustix::process::geteuid().is_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("probe");
        File::create(&f).expect("probe file");
        let xattrs = rustix::fs::lsetxattr(&f, "user.probe", b"1", XattrFlags::empty()).is_ok();
        let devices = root
            && rustix::fs::mknodat(
                CWD,
                dir.path().join("dev"),
                FileType::CharacterDevice,
                Mode::from_raw_mode(0o600),
                libc::makedev(1, 3),
            )
            .is_ok();
        let caps = Caps {
            root,
            xattrs,
            devices,
        };
        if !xattrs {
            eprintln!(
                "\n*** tree_prop: the temporary file system ({}) refuses user.* extended \
                 attributes: THEIR PART OF THIS TEST IS SKIPPED (everything else runs) ***\n",
                std::env::temp_dir().display()
            );
        }
        if !root {
            eprintln!("\n*** tree_prop: not root: owners and device nodes are not tested ***\n");
        } else if !devices {
            eprintln!(
                "\n*** tree_prop: root, but mknod of a device fails: devices not tested ***\n"
            );
        }
        eprintln!("tree_prop: {caps:?}");
        caps
    })
}

// ---------------------------------------------------------------------------
// The model: a tree to make, and rounds of changes to it.

pub type Name = Vec<u8>;

#[derive(Clone, Debug)]
pub struct Meta {
    pub mode: u32,
    /// `None`: left at "now" (racy for dsync: read again next time).
    pub mtime: Option<i64>,
    pub owner: Option<(u32, u32)>,
    pub xattrs: Vec<(Name, Vec<u8>)>,
}

#[derive(Clone, Debug)]
pub enum Content {
    Empty,
    Random(usize, u64),
    Text(usize, u64),
    /// `set_len(size)`, then a few writes (offsets modulo `size`): holes.
    Sparse(u64, Vec<(u64, u16, u64)>),
    /// More than one 4 MiB chunk of dense data: dsync's big-file path.
    Big(usize, u64),
}

#[derive(Clone, Debug)]
pub enum Item {
    Dir(Index, Name, Meta),
    File(Index, Name, Content, Meta),
    Symlink(Index, Name, Vec<u8>, Meta),
    /// A hard link to an existing file, in any directory.
    Link(Index, Index, Name),
    Fifo(Index, Name, Meta),
    Socket(Index, Name, Meta),
    /// Block device?, major, minor.
    Device(Index, Name, bool, u32, u32, Meta),
}

#[derive(Clone, Debug)]
pub enum Change {
    /// Overwrite bytes in place (same size); `true`: then set the mtime
    /// back to what it was.
    Overwrite(Index, u64, u16, u64, bool),
    /// Truncate or extend to a new size.
    Resize(Index, u64, u64),
    /// Any node to a new parent and name (over what is there when rename(2)
    /// allows it).
    Rename(Index, Index, Name),
    Delete(Index),
    FileToDir(Index, Meta, Option<(Name, Content)>),
    DirToFile(Index, Content, Meta),
    /// A symlink becomes a file, or a file a symlink.
    Retype(Index, Content, Vec<u8>),
    /// Set (or with `None` remove) an attribute of a file or directory.
    Xattr(Index, Name, Option<Vec<u8>>),
    Chmod(Index, u32),
    Chown(Index, u32, u32),
    Touch(Index, i64),
    Add(Item),
}

#[derive(Clone, Debug)]
pub struct Case {
    pub items: Vec<Item>,
    pub rounds: Vec<Vec<Change>>,
    /// Directory mtimes are set from this at the end of each round.
    pub dir_times: u64,
    /// Backups in chunks of this many bytes instead of 4 MiB: files of a
    /// few hundred KiB then take the big-file path too, deltas included.
    pub chunk: Option<usize>,
}

pub fn sanitize(mut n: Vec<u8>) -> Vec<u8> {
    for b in &mut n {
        if *b == 0 || *b == b'/' {
            *b = 0xff;
        }
    }
    n.truncate(255);
    if n.is_empty() || n == b"." || n == b".." {
        n.push(b'x');
    }
    n
}

pub fn name() -> impl Strategy<Value = Name> {
    prop_oneof![
        10 => "[a-z0-9_]{1,8}".prop_map(String::into_bytes),
        2 => (
            "[- ]{1,2}",
            "[a-z ]{0,5}",
            select(vec!["", " ", "\n", "\t", "\n\n"])
        )
            .prop_map(|(a, b, c)| format!("{a}{b}{c}").into_bytes()),
        2 => "\\PC{1,5}".prop_map(String::into_bytes),
        2 => vec(any::<u8>(), 1..12),
        1 => (any::<u8>(), vec(any::<u8>(), 0..4)).prop_map(|(c, tail)| {
            let mut v = vec![b'a' + c % 26; 255 - tail.len()];
            v.extend(tail);
            v
        }),
    ]
    .prop_map(sanitize)
}

pub fn mode() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => select(vec![0o644u32, 0o755, 0o600, 0o700, 0o444, 0o640]),
        2 => select(vec![0o4755u32, 0o2755, 0o6711, 0o1777, 0o3770, 0o7777, 0o000, 0o4000, 0o1000]),
        1 => 0u32..0o10000,
    ]
}

pub fn time() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => (-2_000_000_000i64..5_000_000_000, 0i64..1_000_000_000)
            .prop_map(|(s, ns)| s * 1_000_000_000 + ns),
        1 => (0i64..2_000_000_000).prop_map(|s| s * 1_000_000_000),
        1 => Just(-1),
    ]
}

pub fn meta() -> impl Strategy<Value = Meta> {
    let owner = prop_oneof![
        2 => Just(None),
        1 => (
            select(vec![0u32, 1, 2, 1000, 65534, 123_456, 4_000_000]),
            select(vec![0u32, 1, 5, 1000, 65534, 654_321])
        )
            .prop_map(Some),
    ];
    let xattr = (
        "[a-z.]{1,6}".prop_map(|s| format!("user.{s}").into_bytes()),
        prop_oneof![
            4 => vec(any::<u8>(), 0..40),
            // Up to 3 of these share one 4 KiB ext4 block (with their
            // names and headers): 3 x 1,500 failed setxattr with ENOSPC.
            1 => vec(any::<u8>(), 200..1000),
        ],
    );
    (
        mode(),
        prop_oneof![1 => Just(None), 4 => time().prop_map(Some)],
        owner,
        prop_oneof![2 => Just(Vec::new()), 1 => vec(xattr, 1..4)],
    )
        .prop_map(|(mode, mtime, owner, xattrs)| Meta {
            mode,
            mtime,
            owner,
            xattrs,
        })
}

pub fn content() -> impl Strategy<Value = Content> {
    let writes = |n| vec((any::<u64>(), 1u16..20_000, any::<u64>()), 0..n);
    prop_oneof![
        10 => Just(Content::Empty),
        // Few seeds: equal files, which a backup stores once.
        8 => (1usize..100, 0u64..3).prop_map(|(l, s)| Content::Random(l, s)),
        15 => (1usize..20 << 10, any::<u64>()).prop_map(|(l, s)| Content::Random(l, s)),
        15 => (1usize..20 << 10, any::<u64>()).prop_map(|(l, s)| Content::Text(l, s)),
        6 => (1u64..3 << 20, writes(4)).prop_map(|(l, w)| Content::Sparse(l, w)),
        // Past one chunk, so the big-file path runs; its holes are not
        // read, so this stays cheap.
        2 => ((4u64 << 20) + 1..12 << 20, writes(4)).prop_map(|(l, w)| Content::Sparse(l, w)),
        1 => (1usize..300 << 10, any::<u64>()).prop_map(|(l, s)| Content::Big((4 << 20) + l, s)),
    ]
}

pub fn target() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-z0-9_]{1,8}".prop_map(String::into_bytes),
        2 => "(\\.\\./){1,3}[a-z]{0,4}".prop_map(String::into_bytes),
        1 => Just(b"..".to_vec()),
        1 => Just(b".".to_vec()),
        1 => Just(b"/".to_vec()),
        2 => select(vec!["/etc/passwd", "/nonexistent/dsync/x", "/tmp"]).prop_map(|s| s.as_bytes().to_vec()),
        2 => vec(1u8..=255, 1..60),
        1 => (any::<u8>(), 1000usize..4000).prop_map(|(c, n)| vec![b'a' + c % 26; n]),
    ]
}

pub fn item() -> impl Strategy<Value = Item> {
    let ix = any::<Index>;
    prop_oneof![
        5 => (ix(), name(), meta()).prop_map(|(p, n, m)| Item::Dir(p, n, m)),
        12 => (ix(), name(), content(), meta()).prop_map(|(p, n, c, m)| Item::File(p, n, c, m)),
        4 => (ix(), name(), target(), meta()).prop_map(|(p, n, t, m)| Item::Symlink(p, n, t, m)),
        4 => (ix(), ix(), name()).prop_map(|(f, p, n)| Item::Link(f, p, n)),
        1 => (ix(), name(), meta()).prop_map(|(p, n, m)| Item::Fifo(p, n, m)),
        1 => (ix(), name(), meta()).prop_map(|(p, n, m)| Item::Socket(p, n, m)),
        1 => (ix(), name(), any::<bool>(), 0u32..300, 0u32..70_000, meta())
            .prop_map(|(p, n, b, ma, mi, m)| Item::Device(p, n, b, ma, mi, m)),
    ]
}

pub fn change() -> impl Strategy<Value = Change> {
    let ix = any::<Index>;
    prop_oneof![
        4 => (ix(), any::<u64>(), 1u16..5000, any::<u64>(), any::<bool>())
            .prop_map(|(f, at, n, s, keep)| Change::Overwrite(f, at, n, s, keep)),
        2 => (ix(), 0u64..40 << 10, any::<u64>()).prop_map(|(f, l, s)| Change::Resize(f, l, s)),
        3 => (ix(), ix(), name()).prop_map(|(a, p, n)| Change::Rename(a, p, n)),
        2 => ix().prop_map(Change::Delete),
        1 => (ix(), meta(), proptest::option::of((name(), content())))
            .prop_map(|(f, m, c)| Change::FileToDir(f, m, c)),
        1 => (ix(), content(), meta()).prop_map(|(d, c, m)| Change::DirToFile(d, c, m)),
        2 => (ix(), content(), target()).prop_map(|(a, c, t)| Change::Retype(a, c, t)),
        2 => (ix(), "[a-z]{1,3}", proptest::option::of(vec(any::<u8>(), 0..30)))
            .prop_map(|(a, n, v)| Change::Xattr(a, format!("user.{n}").into_bytes(), v)),
        2 => (ix(), mode()).prop_map(|(a, m)| Change::Chmod(a, m)),
        1 => (ix(), 0u32..70_000, 0u32..70_000).prop_map(|(a, u, g)| Change::Chown(a, u, g)),
        2 => (ix(), time()).prop_map(|(a, t)| Change::Touch(a, t)),
        3 => item().prop_map(Change::Add),
    ]
}

pub fn case() -> impl Strategy<Value = Case> {
    (
        vec(item(), 1..50),
        vec(vec(change(), 1..16), 1..=2),
        any::<u64>(),
        prop_oneof![3 => Just(None), 1 => Just(Some(64 << 10))],
    )
        .prop_map(|(items, rounds, dir_times, chunk)| Case {
            items,
            rounds,
            dir_times,
            chunk,
        })
}

// ---------------------------------------------------------------------------
// Making the tree.

pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return name.to_vec();
    }
    let mut p = parent.to_vec();
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

pub fn depth(rel: &[u8]) -> usize {
    if rel.is_empty() {
        0
    } else {
        rel.iter().filter(|&&c| c == b'/').count() + 1
    }
}

pub fn under(rel: &[u8], ancestor: &[u8]) -> bool {
    rel == ancestor
        || ancestor.is_empty()
        || (rel.starts_with(ancestor) && rel.get(ancestor.len()) == Some(&b'/'))
}

/// Shows a path's bytes readably (escapes for newlines and non-UTF-8).
pub fn show(rel: &[u8]) -> String {
    let s = rel.escape_ascii().to_string();
    if s.len() > 80 {
        format!("{}...({} bytes)", &s[..60], rel.len())
    } else {
        s
    }
}

pub fn text(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"backup ",
        b"restore ",
        b"tree ",
        b"of ",
        b"files\n",
        b"dsync ",
        b"snapshot ",
        b"a ",
    ];
    let r = pseudo(len / 4 + 1, seed);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(WORDS[r[i % r.len()] as usize % WORDS.len()]);
        i += 1;
    }
    out.truncate(len);
    out
}

pub fn set_time(p: &Path, ns: i64) {
    let t = Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    };
    let times = Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(CWD, p, &times, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}

pub struct Tree {
    pub root: PathBuf,
    pub caps: Caps,
}

impl Tree {
    pub fn abs(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(OsStr::from_bytes(rel))
        }
    }

    /// Every node under the root (not the root), sorted, with its lstat.
    pub fn nodes(&self) -> Vec<(Vec<u8>, std::fs::Metadata)> {
        fn walk(t: &Tree, rel: &[u8], out: &mut Vec<(Vec<u8>, std::fs::Metadata)>) {
            let mut names: Vec<Vec<u8>> = std::fs::read_dir(t.abs(rel))
                .unwrap()
                .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                .collect();
            names.sort();
            for n in names {
                let p = join(rel, &n);
                let md = std::fs::symlink_metadata(t.abs(&p)).unwrap();
                let is_dir = md.is_dir();
                out.push((p.clone(), md));
                if is_dir {
                    walk(t, &p, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(self, b"", &mut out);
        out
    }

    pub fn pick(
        &self,
        ix: &Index,
        f: impl Fn(&[u8], &std::fs::Metadata) -> bool,
    ) -> Option<Vec<u8>> {
        let all: Vec<Vec<u8>> = self
            .nodes()
            .into_iter()
            .filter(|(p, md)| f(p, md))
            .map(|(p, _)| p)
            .collect();
        (!all.is_empty()).then(|| all[ix.index(all.len())].clone())
    }

    /// A directory (the root among them) no deeper than `max`.
    pub fn pick_dir(&self, ix: &Index, max: usize) -> Vec<u8> {
        let mut all = vec![Vec::new()];
        all.extend(
            self.nodes()
                .into_iter()
                .filter(|(p, md)| md.is_dir() && depth(p) <= max)
                .map(|(p, _)| p),
        );
        all[ix.index(all.len())].clone()
    }

    pub fn free(&self, rel: &[u8]) -> bool {
        std::fs::symlink_metadata(self.abs(rel)).is_err()
    }

    pub fn write(&self, rel: &[u8], c: &Content) {
        let p = self.abs(rel);
        let f = File::create(&p).unwrap();
        match c {
            Content::Empty => {}
            Content::Random(n, s) | Content::Big(n, s) => {
                f.write_all_at(&pseudo(*n, *s), 0).unwrap()
            }
            Content::Text(n, s) => f.write_all_at(&text(*n, *s), 0).unwrap(),
            Content::Sparse(size, writes) => {
                f.set_len(*size).unwrap();
                for (at, n, s) in writes {
                    let at = at % size;
                    let n = (*n as u64).min(size - at) as usize;
                    f.write_all_at(&pseudo(n, *s), at).unwrap();
                }
            }
        }
    }

    /// Owner, then mode (a chown clears setuid), attributes, mtime.
    pub fn meta(&self, rel: &[u8], m: &Meta, xattrs: bool) {
        let p = self.abs(rel);
        let md = std::fs::symlink_metadata(&p).unwrap();
        let is_link = md.file_type().is_symlink();
        if let (true, Some((u, g))) = (self.caps.root, m.owner) {
            chown(&p, u, g);
        }
        if !is_link {
            let mut mode = m.mode;
            if !self.caps.root {
                // Without root we must still read, write and walk it.
                mode |= if md.is_dir() { 0o700 } else { 0o600 };
            }
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        if xattrs && self.caps.xattrs {
            for (n, v) in &m.xattrs {
                rustix::fs::lsetxattr(&p, n.as_slice(), v, XattrFlags::empty())
                    .unwrap_or_else(|e| panic!("setxattr {}: {e}", p.display()));
            }
        }
        if let Some(t) = m.mtime {
            set_time(&p, t);
        }
    }

    pub fn add(&self, item: &Item) {
        match item {
            Item::Dir(ix, n, m) => {
                let rel = join(&self.pick_dir(ix, MAX_DEPTH - 1), n);
                if self.free(&rel) {
                    std::fs::create_dir(self.abs(&rel)).unwrap();
                    self.meta(&rel, m, true);
                }
            }
            Item::File(ix, n, c, m) => {
                let rel = join(&self.pick_dir(ix, MAX_DEPTH), n);
                if self.free(&rel) {
                    self.write(&rel, c);
                    self.meta(&rel, m, true);
                }
            }
            Item::Symlink(ix, n, t, m) => {
                let rel = join(&self.pick_dir(ix, MAX_DEPTH), n);
                if self.free(&rel) {
                    std::os::unix::fs::symlink(OsStr::from_bytes(t), self.abs(&rel)).unwrap();
                    self.meta(&rel, m, false);
                }
            }
            Item::Link(f, ix, n) => {
                let Some(file) = self.pick(f, |_, md| md.is_file()) else {
                    return;
                };
                let rel = join(&self.pick_dir(ix, MAX_DEPTH), n);
                if self.free(&rel) {
                    std::fs::hard_link(self.abs(&file), self.abs(&rel)).unwrap();
                }
            }
            Item::Fifo(ix, n, m) | Item::Socket(ix, n, m) => {
                let rel = join(&self.pick_dir(ix, MAX_DEPTH), n);
                let kind = match item {
                    Item::Fifo(..) => FileType::Fifo,
                    _ => FileType::Socket,
                };
                if self.free(&rel) {
                    rustix::fs::mknodat(CWD, self.abs(&rel), kind, Mode::from_raw_mode(0o644), 0)
                        .unwrap();
                    self.meta(&rel, m, false);
                }
            }
            Item::Device(ix, n, block, major, minor, m) => {
                let rel = join(&self.pick_dir(ix, MAX_DEPTH), n);
                if self.caps.devices && self.free(&rel) {
                    let kind = match block {
                        true => FileType::BlockDevice,
                        false => FileType::CharacterDevice,
                    };
                    let dev = libc::makedev(*major, *minor);
                    rustix::fs::mknodat(CWD, self.abs(&rel), kind, Mode::from_raw_mode(0o600), dev)
                        .unwrap();
                    self.meta(&rel, m, false);
                }
            }
        }
    }

    pub fn remove(&self, rel: &[u8]) {
        let p = self.abs(rel);
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }

    pub fn change(&self, c: &Change) {
        let file = |ix: &Index| self.pick(ix, |_, md| md.is_file());
        match c {
            Change::Overwrite(ix, at, n, s, keep) => {
                let Some(rel) = file(ix) else { return };
                let p = self.abs(&rel);
                let md = std::fs::symlink_metadata(&p).unwrap();
                let size = md.len();
                if size == 0 {
                    return;
                }
                let at = at % size;
                let n = (*n as u64).min(size - at) as usize;
                let f = File::options().write(true).open(&p).unwrap();
                f.write_all_at(&pseudo(n, *s), at).unwrap();
                drop(f);
                if *keep {
                    // Same size, same mtime: only the ctime tells.
                    set_time(&p, md.mtime() * 1_000_000_000 + md.mtime_nsec());
                }
            }
            Change::Resize(ix, len, s) => {
                let Some(rel) = file(ix) else { return };
                let f = File::options().write(true).open(self.abs(&rel)).unwrap();
                let old = f.metadata().unwrap().len();
                f.set_len(*len).unwrap();
                if *len > old {
                    let n = (*len - old).min(64 << 10) as usize;
                    f.write_all_at(&pseudo(n, *s), old).unwrap();
                }
            }
            Change::Rename(ix, dir, n) => {
                let Some(from) = self.pick(ix, |_, _| true) else {
                    return;
                };
                let parent = self.pick_dir(dir, MAX_DEPTH + 1);
                if under(&parent, &from) {
                    return;
                }
                let to = join(&parent, n);
                // A directory over a non-empty one, a file over a directory
                // and so on fail, and change nothing.
                let _ = std::fs::rename(self.abs(&from), self.abs(&to));
            }
            Change::Delete(ix) => {
                if let Some(rel) = self.pick(ix, |_, _| true) {
                    self.remove(&rel);
                }
            }
            Change::FileToDir(ix, m, child) => {
                let Some(rel) = file(ix) else { return };
                self.remove(&rel);
                std::fs::create_dir(self.abs(&rel)).unwrap();
                if let Some((n, c)) = child {
                    let f = join(&rel, n);
                    self.write(&f, c);
                }
                self.meta(&rel, m, true);
            }
            Change::DirToFile(ix, c, m) => {
                let Some(rel) = self.pick(ix, |_, md| md.is_dir()) else {
                    return;
                };
                self.remove(&rel);
                self.write(&rel, c);
                self.meta(&rel, m, true);
            }
            Change::Retype(ix, c, t) => {
                let Some(rel) = self.pick(ix, |_, md| md.is_file() || md.is_symlink()) else {
                    return;
                };
                let was_link = std::fs::symlink_metadata(self.abs(&rel))
                    .unwrap()
                    .is_symlink();
                self.remove(&rel);
                if was_link {
                    self.write(&rel, c);
                } else {
                    std::os::unix::fs::symlink(OsStr::from_bytes(t), self.abs(&rel)).unwrap();
                }
            }
            Change::Xattr(ix, n, v) => {
                if !self.caps.xattrs {
                    return;
                }
                let mut all = vec![Vec::new()];
                all.extend(
                    self.nodes()
                        .into_iter()
                        .filter(|(_, md)| md.is_file() || md.is_dir())
                        .map(|(p, _)| p),
                );
                let p = self.abs(&all[ix.index(all.len())]);
                match v {
                    Some(v) => {
                        rustix::fs::lsetxattr(&p, n.as_slice(), v, XattrFlags::empty()).unwrap()
                    }
                    None => {
                        // Remove that one, or else the first there is.
                        let have = list_xattrs(&p);
                        let name = match have.iter().find(|(k, _)| k == n) {
                            Some((k, _)) => Some(k.clone()),
                            None => have.first().map(|(k, _)| k.clone()),
                        };
                        if let Some(k) = name {
                            rustix::fs::lremovexattr(&p, k.as_slice()).unwrap();
                        }
                    }
                }
            }
            Change::Chmod(ix, mode) => {
                let mut all = vec![Vec::new()];
                all.extend(
                    self.nodes()
                        .into_iter()
                        .filter(|(_, md)| !md.is_symlink())
                        .map(|(p, _)| p),
                );
                let rel = all[ix.index(all.len())].clone();
                let m = Meta {
                    mode: *mode,
                    mtime: None,
                    owner: None,
                    xattrs: Vec::new(),
                };
                self.meta(&rel, &m, false);
            }
            Change::Chown(ix, u, g) => {
                if !self.caps.root {
                    return;
                }
                let mut all = vec![Vec::new()];
                all.extend(self.nodes().into_iter().map(|(p, _)| p));
                chown(&self.abs(&all[ix.index(all.len())]), *u, *g);
            }
            Change::Touch(ix, t) => {
                if let Some(rel) = self.pick(ix, |_, _| true) {
                    set_time(&self.abs(&rel), *t);
                }
            }
            Change::Add(item) => self.add(item),
        }
    }

    /// Directory mtimes (made "now" by every change inside), set from
    /// `seed`: most to a time of their own, some left as they are.
    pub fn dir_times(&self, seed: u64) {
        let mut dirs = vec![Vec::new()];
        dirs.extend(
            self.nodes()
                .into_iter()
                .filter(|(_, md)| md.is_dir())
                .map(|(p, _)| p),
        );
        for d in dirs {
            let h = xxhash(&d) ^ seed;
            if h.is_multiple_of(8) {
                continue;
            }
            let ns = (h >> 8) as i64 % (4_000_000_000 * 1_000_000_000) - 1_000_000_000_000_000_000;
            set_time(&self.abs(&d), ns);
        }
    }
}

pub fn xxhash(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in b {
        h ^= c as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub fn chown(p: &Path, u: u32, g: u32) {
    rustix::fs::chownat(
        CWD,
        p,
        Some(rustix::fs::Uid::from_raw(u)),
        Some(rustix::fs::Gid::from_raw(g)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

pub fn grow(f: impl Fn(&mut [u8]) -> rustix::io::Result<usize>) -> rustix::io::Result<Vec<u8>> {
    let mut size = 256;
    loop {
        let mut buf = vec![0u8; size];
        match f(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => size *= 4,
            Err(e) => return Err(e),
        }
    }
}

/// A node's extended attributes, sorted (none where the file system has
/// none).
pub fn list_xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let list = match grow(|b| rustix::fs::llistxattr(p, b)) {
        Ok(l) => l,
        Err(rustix::io::Errno::NOTSUP) => return Vec::new(),
        Err(e) => panic!("listxattr {}: {e}", p.display()),
    };
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = list
        .split(|&c| c == 0)
        .filter(|n| !n.is_empty())
        .map(|n| {
            let v = grow(|b| rustix::fs::lgetxattr(p, n, b))
                .unwrap_or_else(|e| panic!("getxattr {}: {e}", p.display()));
            (n.to_vec(), v)
        })
        .collect();
    out.sort();
    out
}

// ---------------------------------------------------------------------------
// What a tree holds, read independently of dsync.

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Dir,
    /// Size and bytes (up to 256 KiB) or a hash of them.
    File(u64, Data),
    Symlink(Vec<u8>),
    Fifo,
    Socket,
    Char(u64),
    Block(u64),
}

#[derive(Clone, PartialEq)]
pub enum Data {
    Bytes(Vec<u8>),
    Hash([u8; 32]),
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Data::Bytes(b) => write!(f, "{} bytes {:02x?}..", b.len(), &b[..b.len().min(8)]),
            Data::Hash(h) => write!(f, "hash {:02x?}..", &h[..8]),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub nlink: u64,
    /// Bytes allocated (`st_blocks`): a restored sparse file must keep its
    /// holes.
    pub allocated: u64,
    /// Bytes in the data regions `SEEK_DATA` and `SEEK_HOLE` give (a
    /// file's), as `cp --sparse` or `qemu-img` would find its holes.
    pub data: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Every node of a tree by path ("" for the root).
pub type Capture = BTreeMap<Vec<u8>, Seen>;

pub fn capture(root: &Path) -> Capture {
    let t = Tree {
        root: root.to_path_buf(),
        caps: caps(),
    };
    let mut out = Capture::new();
    let md = std::fs::symlink_metadata(root).unwrap();
    out.insert(Vec::new(), seen(root, &md));
    for (rel, md) in t.nodes() {
        out.insert(rel.clone(), seen(&t.abs(&rel), &md));
    }
    out
}

pub fn seen(p: &Path, md: &std::fs::Metadata) -> Seen {
    use std::os::unix::fs::FileTypeExt;
    let ft = md.file_type();
    let mut data = 0;
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        let mut f = File::open(p).unwrap();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, md.len(), "{} changed size", p.display());
        data = data_bytes(&f, md.len());
        let data = if bytes.len() <= 256 << 10 {
            Data::Bytes(bytes)
        } else {
            Data::Hash(
                *blake2b_simd::blake2b(&bytes)
                    .as_array()
                    .first_chunk()
                    .unwrap(),
            )
        };
        Kind::File(md.len(), data)
    } else if ft.is_symlink() {
        Kind::Symlink(
            std::fs::read_link(p)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec(),
        )
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::Char(md.rdev())
    } else {
        Kind::Block(md.rdev())
    };
    Seen {
        kind,
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
        ino: md.ino(),
        nlink: md.nlink(),
        allocated: md.blocks() * 512,
        data,
        xattrs: list_xattrs(p),
    }
}

/// Bytes in the data regions of `f` by `SEEK_DATA` and `SEEK_HOLE` (a file
/// system that does not tell holes reports all of it as data).
pub fn data_bytes(f: &File, size: u64) -> u64 {
    use rustix::fs::SeekFrom;
    let mut total = 0;
    let mut at = 0;
    while at < size {
        let start = match rustix::fs::seek(f, SeekFrom::Data(at)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => panic!("SEEK_DATA at {at}: {e}"),
        };
        let end = rustix::fs::seek(f, SeekFrom::Hole(start))
            .unwrap_or_else(|e| panic!("SEEK_HOLE at {start}: {e}"));
        assert!(end > start, "SEEK_HOLE at {start} gave {end}");
        total += end.min(size) - start;
        at = end;
    }
    total
}

/// The hard-link structure: the sets of paths that share an inode.
pub fn link_groups(c: &Capture) -> BTreeSet<Vec<Vec<u8>>> {
    let mut by_ino: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    for (p, s) in c {
        if matches!(s.kind, Kind::File(..)) {
            by_ino.entry(s.ino).or_default().push(p.clone());
        }
    }
    by_ino
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect()
}

/// How a tree was read back, and so what of it is compared.
#[derive(Clone, Copy, Debug)]
pub struct Through {
    /// "restored", "mounted": for the messages.
    pub how: &'static str,
    /// Owners are compared (a restore can set them only as root).
    pub owners: bool,
    /// Holes must also be told by `SEEK_HOLE`, not only by `st_blocks`.
    pub seek_holes: bool,
}

/// What differs between the source as it was and the tree read back.
///
/// Never compared: ctimes (no one can set them: a restore's are the time
/// of the restore), atimes (reading changes them), inode numbers (only
/// which names share one: the hard-link structure), directory sizes and
/// link counts (file-system specific).
pub fn compare(want: &Capture, got: &Capture, through: Through) -> Vec<String> {
    let how = through.how;
    let mut d = Vec::new();
    for p in want.keys().filter(|p| !got.contains_key(*p)) {
        d.push(format!("{}: in the source, missing {how}", show(p)));
    }
    for p in got.keys().filter(|p| !want.contains_key(*p)) {
        d.push(format!("{}: {how} but not in the source", show(p)));
    }
    for (p, w) in want {
        let Some(g) = got.get(p) else { continue };
        let at = show(p);
        if w.kind != g.kind {
            d.push(format!(
                "{at}: kind/content {:?} {how} as {:?}",
                w.kind, g.kind
            ));
        }
        if w.mode != g.mode {
            d.push(format!("{at}: mode {:o} {how} as {:o}", w.mode, g.mode));
        }
        if w.mtime_ns != g.mtime_ns {
            d.push(format!(
                "{at}: mtime {} {how} as {}",
                w.mtime_ns, g.mtime_ns
            ));
        }
        if through.owners && (w.uid, w.gid) != (g.uid, g.gid) {
            d.push(format!(
                "{at}: owner {}:{} {how} as {}:{}",
                w.uid, w.gid, g.uid, g.gid
            ));
        }
        if w.xattrs != g.xattrs {
            let f = |x: &[(Vec<u8>, Vec<u8>)]| {
                x.iter()
                    .map(|(k, v)| format!("{}={}", show(k), show(v)))
                    .collect::<Vec<_>>()
            };
            d.push(format!(
                "{at}: xattrs {:?} {how} as {:?}",
                f(&w.xattrs),
                f(&g.xattrs)
            ));
        }
        if matches!(w.kind, Kind::File(..)) && w.nlink != g.nlink {
            d.push(format!("{at}: {} links {how} as {}", w.nlink, g.nlink));
        }
        // Restore writes whole blocks and may make holes of zero blocks:
        // a little more than the source, never a filled hole.
        if matches!(w.kind, Kind::File(..)) && g.allocated > w.allocated + (64 << 10) {
            d.push(format!(
                "{at}: {} bytes allocated {how} as {} (holes filled)",
                w.allocated, g.allocated
            ));
        }
        if through.seek_holes && matches!(w.kind, Kind::File(..)) && g.data > w.data + (64 << 10) {
            d.push(format!(
                "{at}: {} bytes of data by SEEK_DATA/SEEK_HOLE {how} as {} (holes not told)",
                w.data, g.data
            ));
        }
    }
    let (wl, gl) = (link_groups(want), link_groups(got));
    if wl != gl {
        let f = |s: &BTreeSet<Vec<Vec<u8>>>| {
            s.iter()
                .map(|g| g.iter().map(|p| show(p)).collect::<Vec<_>>().join(" = "))
                .collect::<Vec<_>>()
        };
        d.push(format!("hard links {:?} {how} as {:?}", f(&wl), f(&gl)));
    }
    d
}

/// A file whose bytes or attributes changed since the last backup while
/// its size, mtime, ctime and inode stayed as they were is invisible to any
/// metadata-based change detection (dsync's, rsync's, git's). In real life
/// the ctime always moves on a write; here, within one coarse clock tick
/// it may not, so such a file's ctime is moved on (a chmod to its own mode
/// sets the ctime) until it differs. This is what makes the test's
/// "same size, mtime set back" edits detectable, independent of timing.
pub fn bump_ctimes(t: &Tree, before: &Capture, now: &Capture) -> bool {
    let mut bumped = false;
    for (p, n) in now {
        let Some(b) = before.get(p) else { continue };
        let (Kind::File(..), Kind::File(..)) = (&b.kind, &n.kind) else {
            continue;
        };
        let same_stat = (b.ino, b.mtime_ns, b.ctime_ns) == (n.ino, n.mtime_ns, n.ctime_ns);
        if !same_stat || (b.kind == n.kind && b.xattrs == n.xattrs) {
            continue;
        }
        let abs = t.abs(p);
        loop {
            std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(n.mode & 0o7777))
                .unwrap();
            let md = std::fs::symlink_metadata(&abs).unwrap();
            if md.ctime() * 1_000_000_000 + md.ctime_nsec() != n.ctime_ns {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        bumped = true;
    }
    bumped
}

// ---------------------------------------------------------------------------
// Backing the changing tree up.

/// A snapshot, with the source as the test read it right before.
pub struct Taken {
    pub id: SnapshotId,
    /// The snapshot's time (what the mount names its directory by).
    pub time_ns: i64,
    pub state: Capture,
}

/// A repository holding every state of a changing tree.
pub struct Backups {
    /// Holds `src` (the tree as it is last), `repo`, and room for more.
    pub tmp: tempfile::TempDir,
    pub repo_dir: PathBuf,
    /// Oldest first.
    pub taken: Vec<Taken>,
}

/// Makes `case`'s tree and backs up each of its states.
pub fn back_up_case(case: &Case) -> Result<Backups, String> {
    back_up_rounds(case.rounds.len() + 1, case.chunk, |tree, round| {
        match round {
            0 => case.items.iter().for_each(|it| tree.add(it)),
            r => case.rounds[r - 1].iter().for_each(|c| tree.change(c)),
        }
        tree.dir_times(case.dir_times.wrapping_add(round as u64));
    })
}

/// Makes the tree (`step(tree, 0)`), backs it up, changes it
/// (`step(tree, 1)`), backs it up, and so on for `rounds` backups, each a
/// second after the last; reads the tree right before each backup.
pub fn back_up_rounds(
    rounds: usize,
    chunk: Option<usize>,
    mut step: impl FnMut(&Tree, usize),
) -> Result<Backups, String> {
    let caps = caps();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let tree = Tree {
        root: src.clone(),
        caps,
    };

    let repo_dir = tmp.path().join("repo");
    let cfg = Config {
        format: 3,
        ..Config::default()
    };
    let repo = Repo::init(&repo_dir, cfg).map_err(|e| format!("init: {e}"))?;
    let mut taken: Vec<Taken> = Vec::new();
    for round in 0..rounds {
        step(&tree, round);
        let mut state = capture(&src);
        if let Some(before) = taken.last() {
            if bump_ctimes(&tree, &before.state, &state) {
                state = capture(&src);
            }
        }
        let time_ns = 1_700_000_000_000_000_000 + round as i64 * 1_000_000_000;
        let opts = BackupOptions {
            time_ns: Some(time_ns),
            chunk_size: chunk.unwrap_or(BackupOptions::default().chunk_size),
            ..BackupOptions::default()
        };
        let r = backup(&repo, std::slice::from_ref(&src), &opts, &NoProgress)
            .map_err(|e| format!("backup {round}: {e}"))?;
        if r.incomplete() || r.tree.errors > 0 {
            return Err(format!("backup {round} incomplete: {:?}", r.tree.warnings));
        }
        // The walk must see what the test saw.
        let files = state
            .values()
            .filter(|s| matches!(s.kind, Kind::File(..)))
            .count();
        let dirs = state.values().filter(|s| s.kind == Kind::Dir).count();
        if (r.tree.files, r.tree.dirs) != (files as u64, dirs as u64) {
            return Err(format!(
                "backup {round} counted {} files and {} dirs, the tree has {files} and {dirs}",
                r.tree.files, r.tree.dirs
            ));
        }
        taken.push(Taken {
            id: r.snapshot.id,
            time_ns,
            state,
        });
    }
    Ok(Backups {
        tmp,
        repo_dir,
        taken,
    })
}

/// The proptest configuration: `PROPTEST_CASES` cases, `default` if unset.
pub fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    }
}
