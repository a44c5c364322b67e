//! `dsync copy`: snapshots from one repository into another (a local one
//! and an S3 or ssh one, either way: an off-site copy, as restic's `copy`).
//!
//! Objects are copied as they are, under the same keys: the snapshots keep
//! their ids, and what the destination already holds (an earlier copy's
//! packs) is not copied again. The objects a snapshot needs are what a gc
//! that kept only the snapshots being copied would keep, so the walk is
//! gc's own. The manifests are committed last, each once everything it
//! references is durable in the destination.

use std::collections::HashSet;

use crate::backend::{Backend, Key, Kind};
use crate::error::{Error, Result};
use crate::id::SnapshotId;
use crate::repo::Repo;

/// What a copy did.
#[derive(Clone, Debug, Default)]
pub struct CopyReport {
    /// Snapshots copied, oldest first.
    pub copied: Vec<SnapshotId>,
    /// Snapshots asked for that the destination already had.
    pub already: usize,
    /// Objects copied, and their bytes.
    pub objects: usize,
    pub bytes: u64,
}

/// Bytes read and written at a time.
const PIECE: u64 = 8 << 20;

/// Copies the snapshots `ids` of `src` (every one when empty) into `dst`,
/// whose block parameters must be `src`'s.
///
/// # Errors
/// [`Error::InvalidInput`] when the parameters differ; [`Error::Locked`]
/// when a writer holds `dst`; [`Error::Io`], [`Error::Corrupt`]. What was
/// copied before an error is garbage in `dst` until a later copy uses it.
pub fn copy(
    src: &Repo,
    dst: &Repo,
    ids: &[SnapshotId],
    progress: &dyn crate::Progress,
) -> Result<CopyReport> {
    let (a, b) = (src.config(), dst.config());
    if (a.block_size, a.page_entries, a.frame_size) != (b.block_size, b.page_entries, b.frame_size)
    {
        return Err(Error::InvalidInput(format!(
            "{} and {} have different block parameters (block size {} and {}): copy into a new repository",
            src.location().display(),
            dst.location().display(),
            a.block_size,
            b.block_size
        )));
    }
    let _lock = dst.lock()?;
    let all = src.snapshots()?;
    let have: HashSet<SnapshotId> = dst.snapshots()?.iter().map(|s| s.id).collect();
    let wanted: Vec<SnapshotId> = all
        .iter()
        .map(|s| s.id)
        .filter(|id| ids.is_empty() || ids.contains(id))
        .collect();
    let mut report = CopyReport {
        already: wanted.iter().filter(|id| have.contains(id)).count(),
        ..CopyReport::default()
    };
    let todo: Vec<SnapshotId> = wanted.into_iter().filter(|id| !have.contains(id)).collect();
    if todo.is_empty() {
        return Ok(report);
    }
    let others: Vec<SnapshotId> = all
        .iter()
        .map(|s| s.id)
        .filter(|id| !todo.contains(id))
        .collect();
    let unused: HashSet<Key> = crate::gc::plan(src, &others, 0.0)?
        .unreferenced
        .into_iter()
        .collect();
    let (from, to) = (src.backend(), dst.backend());
    let mut present = HashSet::new();
    let mut needed = Vec::new();
    for kind in [Kind::Pack, Kind::Meta, Kind::Sig, Kind::Map] {
        present.extend(to.list(kind)?.into_iter().map(|(n, _)| Key::new(kind, n)));
        for (name, size) in from.list(kind)? {
            let k = Key::new(kind, name);
            if !unused.contains(&k) {
                needed.push((k, size));
            }
        }
    }
    needed.retain(|(k, _)| !present.contains(k));
    progress.start("", needed.iter().map(|(_, n)| n).sum());
    for (k, size) in &needed {
        copy_object(from, to, k, progress)?;
        report.objects += 1;
        report.bytes += size;
    }
    to.sync()?;
    for id in todo {
        let key = Key::snapshot(id);
        match to.commit(&key, &from.read(&key)?) {
            Err(e) if e.is_already_exists() => report.already += 1,
            r => {
                r?;
                report.copied.push(id);
            }
        }
    }
    Ok(report)
}

/// One object, piece by piece.
fn copy_object(
    from: &dyn Backend,
    to: &dyn Backend,
    key: &Key,
    progress: &dyn crate::Progress,
) -> Result<()> {
    let o = from.open(key)?;
    let mut w = to.create(key)?;
    let mut buf = vec![0u8; PIECE.min(o.len()) as usize];
    let mut at = 0;
    while at < o.len() {
        let n = (o.len() - at).min(PIECE) as usize;
        o.read_at(at, &mut buf[..n])?;
        w.append(&buf[..n])?;
        progress.advance(n as u64);
        at += n as u64;
    }
    w.finish()
}
