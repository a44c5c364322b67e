//! `dsync diff`: which byte ranges of each file differ between two
//! snapshots, from their extent maps alone (no data is read).
//!
//! Two format 3 snapshots are compared tree against tree, one directory
//! list at a time ([`super::tree`]). Otherwise (a format 2 snapshot holds
//! files at its root and nothing else) the root-level files of both are
//! compared by name. Either way each difference is handed to the caller as
//! soon as it is known, in path order, so that a diff of a large tree
//! prints as it goes and holds no list of results.

use crate::error::{Error, Result};
use crate::format::snapshot::ROOT;
use crate::repo::Repo;
use crate::{FileVersion, NodeKind, Snapshot};

use super::PathDiff;

/// Calls `each` for every path that differs between `a` and `b`, in path
/// order; under `only` if given. Root-level files that are the same are
/// reported too (status `same`); [`PathDiff`] tells the statuses.
///
/// # Errors
/// [`Error::NoSuchPath`] when `only` is in neither snapshot; damage or a
/// failing read of a list or map; what `each` returns.
pub fn diff_snapshots(
    repo: &Repo,
    a: &Snapshot,
    b: &Snapshot,
    only: Option<&str>,
    each: &mut dyn FnMut(PathDiff) -> Result<()>,
) -> Result<()> {
    if a.format >= 3 && b.format >= 3 {
        return super::diff_trees(repo, a, b, only, each);
    }
    let (a, b) = (Side::new(a), Side::new(b));
    for name in names(&a, &b, only)? {
        if let Some(d) = file_diff(repo, &a, &b, name)? {
            each(d)?;
        }
    }
    Ok(())
}

/// One snapshot's side: the snapshot and its files at the root, by name.
struct Side<'a> {
    snap: &'a Snapshot,
    files: Vec<(String, &'a FileVersion)>,
}

impl<'a> Side<'a> {
    fn new(snap: &'a Snapshot) -> Side<'a> {
        let files = snap
            .nodes
            .iter()
            .filter(|n| n.parent == ROOT)
            .filter_map(|n| match &n.kind {
                NodeKind::File(f) => Some((String::from_utf8_lossy(&n.name).into_owned(), f)),
                _ => None,
            })
            .collect();
        Side { snap, files }
    }

    fn get(&self, name: &str) -> Option<&FileVersion> {
        self.files.iter().find(|(n, _)| n == name).map(|(_, f)| *f)
    }
}

/// The names in either snapshot, sorted; only `only` if given.
///
/// # Errors
/// [`Error::NoSuchPath`] when `only` is in neither.
fn names(a: &Side, b: &Side, only: Option<&str>) -> Result<Vec<String>> {
    let mut names: Vec<String> = a
        .files
        .iter()
        .chain(&b.files)
        .map(|(n, _)| n.clone())
        .collect();
    names.sort();
    names.dedup();
    if let Some(p) = only {
        if !names.iter().any(|n| n == p) {
            return Err(Error::NoSuchPath {
                path: p.to_string(),
                snapshot: format!("{} or {}", a.snap.id, b.snap.id),
            });
        }
        names.retain(|n| n == p);
    }
    Ok(names)
}

/// A file in both snapshots is compared by its extent maps; a file in one
/// differs over its whole length.
fn file_diff(r: &Repo, a: &Side, b: &Side, name: String) -> Result<Option<PathDiff>> {
    let (status, ranges, bytes) = match (a.get(&name), b.get(&name)) {
        (Some(_), Some(_)) => {
            let ma = super::version_map(r, a.snap, &name)?;
            let mb = super::version_map(r, b.snap, &name)?;
            let (ranges, bytes) = super::diff_maps(&ma, &mb);
            (if bytes == 0 { "same" } else { "changed" }, ranges, bytes)
        }
        (None, Some(y)) => ("added", vec![(0, y.size)], y.size),
        (Some(x), None) => ("removed", vec![(0, x.size)], x.size),
        (None, None) => return Ok(None),
    };
    Ok(Some(PathDiff {
        path: name.into_bytes(),
        status,
        kind: "file",
        ranges,
        bytes,
    }))
}
