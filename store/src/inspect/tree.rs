//! `dsync diff` of two format 3 snapshots: their trees walked side by side,
//! one directory list at a time. A subdirectory whose list is the same
//! pages in both is not read (an unchanged subtree costs nothing), so the
//! cost follows the change, not the tree; memory is the lists along one
//! path.

use crate::error::Result;
use crate::format::snapshot::NodeKind;
use crate::format::v3::node::{Entry, Payload};
use crate::format::v3::List;
use crate::read::VersionReader;
use crate::repo::Repo;
use crate::Snapshot;

/// How one path differs between two snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathDiff {
    /// The path under the snapshot root (`a/b/c`), as raw bytes.
    pub path: Vec<u8>,
    /// `added`, `removed`, `changed` (a file's bytes or a symlink's
    /// target), `type` (another kind of node), `metadata` (mode, owner,
    /// times or extended attributes only), or `same` (a root-level file
    /// whose bytes and attributes are unchanged: stage 1's report of images).
    pub status: &'static str,
    /// `file`, `dir`, `symlink`, `chardev`, `blockdev`, `fifo` or
    /// `socket`: the node in the newer snapshot, else in the older.
    pub kind: &'static str,
    /// Byte ranges `[start, end)` that differ (files only).
    pub ranges: Vec<(u64, u64)>,
    /// Their total length.
    pub bytes: u64,
}

/// Calls `each` for every path that differs between `a` and `b` (format 3
/// snapshots), in path order; under `only` (`a/b`) if given.
///
/// # Errors
/// [`crate::Error::NoSuchPath`] when `only` is in neither; as the reads.
pub(crate) fn diff_trees(
    repo: &Repo,
    a: &Snapshot,
    b: &Snapshot,
    only: Option<&str>,
    each: &mut dyn FnMut(PathDiff) -> Result<()>,
) -> Result<()> {
    let (ra, rb) = (
        crate::browse::root(repo, a.id)?,
        crate::browse::root(repo, b.id)?,
    );
    let mut d = Differ { repo, each };
    let Some(only) = only.map(|p| p.trim_matches('/')).filter(|p| !p.is_empty()) else {
        return d.lists(&[], Some(&ra), Some(&rb), true);
    };
    let ea = crate::tree3::resolve(repo, &ra, only.as_bytes())?;
    let eb = crate::tree3::resolve(repo, &rb, only.as_bytes())?;
    if ea.is_none() && eb.is_none() {
        return Err(crate::Error::NoSuchPath {
            path: only.to_string(),
            snapshot: format!("{} or {}", a.id, b.id),
        });
    }
    let parent = only.rsplit_once('/').map_or("", |(p, _)| p).as_bytes();
    d.pair(parent, ea.as_ref(), eb.as_ref(), true)
}

struct Differ<'a, 'f> {
    repo: &'a Repo,
    each: &'f mut dyn FnMut(PathDiff) -> Result<()>,
}

impl Differ<'_, '_> {
    /// The entries of two directory lists (either may be absent), merged
    /// by name.
    fn lists(
        &mut self,
        dir: &[u8],
        a: Option<&List<Entry>>,
        b: Option<&List<Entry>>,
        top: bool,
    ) -> Result<()> {
        // An unchanged subdirectory is not read (the root is: its files
        // are listed even when the same).
        if !top && a.is_some() && a == b {
            return Ok(());
        }
        let read = |l: Option<&List<Entry>>| match l {
            Some(l) => crate::tree3::read_list(self.repo, l),
            None => Ok(Vec::new()),
        };
        let (ea, eb) = (read(a)?, read(b)?);
        let (mut i, mut j) = (0, 0);
        while i < ea.len() || j < eb.len() {
            let order = match (ea.get(i), eb.get(j)) {
                (Some(x), Some(y)) => x.name.cmp(&y.name),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    self.pair(dir, Some(&ea[i]), None, top)?;
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    self.pair(dir, None, Some(&eb[j]), top)?;
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    self.pair(dir, Some(&ea[i]), Some(&eb[j]), top)?;
                    i += 1;
                    j += 1;
                }
            }
        }
        Ok(())
    }

    /// One name in `dir`, in either snapshot or both.
    fn pair(&mut self, dir: &[u8], a: Option<&Entry>, b: Option<&Entry>, top: bool) -> Result<()> {
        let Some(name) = a.or(b).map(|e| e.name.as_slice()) else {
            return Ok(());
        };
        let mut path = dir.to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        let sub = |e: Option<&Entry>| match e.map(|e| &e.payload) {
            Some(Payload::Dir(l)) => Some(l.clone()),
            _ => None,
        };
        let (status, ranges, bytes) = match (a, b) {
            (Some(x), None) => ("removed", whole(x), size(x)),
            (None, Some(y)) => ("added", whole(y), size(y)),
            (Some(x), Some(y)) if kind(x) != kind(y) => ("type", Vec::new(), 0),
            (Some(x), Some(y)) => match (&x.payload, &y.payload) {
                // The same bytes stored twice (a file read again) differ
                // in their maps, not in their hash.
                (Payload::File(fx), Payload::File(fy))
                    if fx != fy && (fx.hash != fy.hash || fx.size != fy.size) =>
                {
                    let (ranges, bytes) = self.ranges(x, y, &path)?;
                    match bytes {
                        0 if same_attrs(x, y) => ("same", ranges, 0),
                        0 => ("metadata", ranges, 0),
                        _ => ("changed", ranges, bytes),
                    }
                }
                (Payload::Symlink(tx), Payload::Symlink(ty)) if tx != ty => {
                    ("changed", Vec::new(), 0)
                }
                (Payload::CharDevice(dx), Payload::CharDevice(dy))
                | (Payload::BlockDevice(dx), Payload::BlockDevice(dy))
                    if dx != dy =>
                {
                    ("changed", Vec::new(), 0)
                }
                _ if !same_attrs(x, y) => ("metadata", Vec::new(), 0),
                (Payload::File(_), _) => ("same", Vec::new(), 0),
                _ => ("", Vec::new(), 0),
            },
            (None, None) => return Ok(()),
        };
        // Unchanged paths are not listed, but for root-level files (a
        // stage 1 snapshot of images lists each one).
        let file = matches!(a.or(b).map(|e| &e.payload), Some(Payload::File(_)));
        if !status.is_empty() && (status != "same" || (top && file)) {
            (self.each)(PathDiff {
                path: path.clone(),
                status,
                kind: kind_name(b.or(a)),
                ranges,
                bytes,
            })?;
        }
        let (la, lb) = (sub(a), sub(b));
        if la.is_some() || lb.is_some() {
            self.lists(&path, la.as_ref(), lb.as_ref(), false)?;
        }
        Ok(())
    }

    /// The byte ranges where two file versions differ, from their maps.
    fn ranges(&self, a: &Entry, b: &Entry, path: &[u8]) -> Result<(Vec<(u64, u64)>, u64)> {
        let what = String::from_utf8_lossy(path);
        let map = |e: &Entry| match crate::tree3::node_of(e, 0).map(|n| n.kind) {
            Some(NodeKind::File(f)) => Ok(VersionReader::open(self.repo, &f, &what)?.map().clone()),
            _ => Err(crate::Error::Internal("not a file".into())),
        };
        Ok(super::diff_maps(&map(a)?, &map(b)?))
    }
}

/// An entry's kind, as its payload's variant.
fn kind(e: &Entry) -> std::mem::Discriminant<Payload> {
    std::mem::discriminant(&e.payload)
}

fn kind_name(e: Option<&Entry>) -> &'static str {
    match e.map(|e| &e.payload) {
        Some(Payload::File(_)) | None => "file",
        Some(Payload::Dir(_)) => "dir",
        Some(Payload::Symlink(_)) => "symlink",
        Some(Payload::CharDevice(_)) => "chardev",
        Some(Payload::BlockDevice(_)) => "blockdev",
        Some(Payload::Fifo) => "fifo",
        Some(Payload::Socket) => "socket",
    }
}

fn size(e: &Entry) -> u64 {
    match &e.payload {
        Payload::File(d) => d.size,
        _ => 0,
    }
}

/// A file in one snapshot only differs over its whole length.
fn whole(e: &Entry) -> Vec<(u64, u64)> {
    match size(e) {
        0 => Vec::new(),
        n => vec![(0, n)],
    }
}

/// The attributes a restore sets (not the inode, device or ctime a copy
/// changes).
fn same_attrs(a: &Entry, b: &Entry) -> bool {
    a.mode == b.mode
        && a.uid == b.uid
        && a.gid == b.gid
        && a.user == b.user
        && a.group == b.group
        && a.mtime_ns == b.mtime_ns
        && a.xattrs == b.xattrs
}
