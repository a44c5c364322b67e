//! Read access to format 3 trees, one directory at a time, for the mount
//! and other readers that must not load a whole snapshot: a snapshot's root
//! list, a directory's entries, one entry by name or path, and the version
//! a file entry holds.

use crate::error::Result;
use crate::format::snapshot::{FileVersion, NodeKind, ROOT};
pub use crate::format::v3::node::{Entry, Payload};
pub use crate::format::v3::List;
use crate::id::SnapshotId;
use crate::meta::ListReader;
use crate::repo::Repo;

/// The root list of format 3 snapshot `id`, read now (after a prune
/// replaced the snapshot's record, this is the new one).
///
/// # Errors
/// [`crate::Error::NoSuchSnapshot`]-like not-found I/O errors when it was
/// forgotten; [`crate::Error::Corrupt`].
pub fn root(repo: &Repo, id: SnapshotId) -> Result<List<Entry>> {
    Ok(repo.load_record(id)?.root)
}

/// The entry `name` of the directory whose list is `dir`: one page per
/// level of the list.
///
/// # Errors
/// [`crate::Error::Corrupt`] naming a damaged page; [`crate::Error::Io`].
pub fn lookup(repo: &Repo, dir: &List<Entry>, name: &[u8]) -> Result<Option<Entry>> {
    ListReader::new(repo.cache()).lookup(dir, name)
}

/// Every entry of a directory, in name order.
///
/// # Errors
/// As [`lookup`].
pub fn entries(repo: &Repo, dir: &List<Entry>) -> Result<Vec<Entry>> {
    crate::tree3::read_list(repo, dir)
}

/// Calls `f` with each entry of the directory whose list is `dir`, in name
/// order, a page at a time: a directory of subdirectories with inline
/// lists is never decoded whole.
///
/// # Errors
/// As [`entries`], and what `f` returns.
pub fn for_each(
    repo: &Repo,
    dir: &List<Entry>,
    f: &mut dyn FnMut(Entry) -> Result<()>,
) -> Result<()> {
    ListReader::new(repo.cache()).for_each(dir, f)
}

/// The entry at `path` (names separated by `/`) under `root`.
///
/// # Errors
/// As [`lookup`].
pub fn resolve(repo: &Repo, root: &List<Entry>, path: &[u8]) -> Result<Option<Entry>> {
    crate::tree3::resolve(repo, root, path)
}

/// The stored version of a file entry (`None` for other kinds).
pub fn version(e: &Entry) -> Option<FileVersion> {
    match crate::tree3::node_of(e, ROOT)?.kind {
        NodeKind::File(f) => Some(f),
        _ => None,
    }
}
