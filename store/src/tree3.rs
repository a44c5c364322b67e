//! Format 3 at run time: a snapshot record read into the [`Snapshot`] the
//! rest of the store works with, a version's extents and signature loaded
//! from its directory entry, and a snapshot's root list written from nodes.
//!
//! Stage 1 backs up files at a snapshot's root, so a record's tree is read
//! whole here (directories, when a record has them, are flattened into
//! nodes with parent indices, as format 2 keeps them). The directories work
//! replaces this with lazy walks over [`ListReader`], which is already how
//! every page is read.

use std::sync::Arc;

use crate::delta::signature::PageSource;
use crate::delta::SigView;
use crate::error::{Error, Result};
use crate::format::map::{Extent as MapExtent, MapBody};
use crate::format::snapshot::{FileVersion, Node, NodeKind, Snapshot, SnapshotStats, ROOT};
use crate::format::v3::node::{Entry, Extent, FileData, Payload, SigRef, ENTRY_HASH_SIZE_LAST};
use crate::format::v3::record::SnapshotRecord;
use crate::format::v3::{BlobKind, BlobRef, List};
use crate::id::MapId;
use crate::map::FileMap;
use crate::meta::{read_blob, ListReader, ListWriter, MetaWriter};
use crate::repo::Repo;

/// Files smaller than this get no signature: a change to one is stored
/// whole. Measured (format 3, five days of a line inserted mid-file into 10 %
/// of the files each day): 15,000 text files of 1-8 KiB grew 18.3 MB with no
/// signatures under 8 KiB and 20.3 MB with signatures for all (a page blob
/// per changed file and nothing saved on one or two blocks); 1,356 text
/// files of 8-64 KiB grew 2.20 MB with signatures from 8 KiB, 2.71 MB from
/// 16 KiB and 5.23 MB from 64 KiB.
pub(crate) const SIG_MIN_SIZE: u64 = 8 << 10;

/// The snapshot a format 3 record describes, its tree read whole.
///
/// # Errors
/// [`Error::Corrupt`] naming a damaged page; [`Error::Io`].
pub(crate) fn snapshot_of(repo: &Repo, r: &SnapshotRecord) -> Result<Snapshot> {
    let mut nodes = Vec::new();
    flatten(repo, &r.root, ROOT, &mut nodes)?;
    Ok(Snapshot {
        id: r.id,
        time_ns: r.time_ns,
        host: r.host.clone(),
        paths: r.paths.clone(),
        stats: SnapshotStats {
            bytes_read: r.bytes_read,
            bytes_added: r.bytes_added,
            duration_ns: r.duration_ns,
        },
        nodes,
        format: 3,
    })
}

fn flatten(repo: &Repo, list: &List<Entry>, parent: u32, nodes: &mut Vec<Node>) -> Result<()> {
    let mut entries = Vec::new();
    ListReader::new(repo.cache()).for_each(list, &mut |e| {
        entries.push(e);
        Ok(())
    })?;
    for e in entries {
        let index = nodes.len() as u32;
        let Some(node) = node_of(&e, parent) else {
            continue;
        };
        nodes.push(node);
        if let Payload::Dir(c) = &e.payload {
            flatten(repo, c, index, nodes)?;
        }
    }
    Ok(())
}

/// The node of an entry, under `parent` (a directory's children left
/// aside).
pub(crate) fn node_of(e: &Entry, parent: u32) -> Option<Node> {
    let kind = match &e.payload {
        Payload::File(d) => NodeKind::File(FileVersion {
            size: d.size,
            hash: d.hash,
            map: MapId(0),
            dev: e.dev,
            ino: e.ino,
            ctime_ns: e.ctime_ns,
            flags: e.flags,
            data: Some(Arc::new(d.clone())),
        }),
        Payload::Dir(_) => NodeKind::Dir,
        Payload::Symlink(t) => NodeKind::Symlink(t.clone()),
        Payload::CharDevice(r) | Payload::BlockDevice(r) => NodeKind::Special(*r),
        Payload::Fifo | Payload::Socket => NodeKind::Special(0),
    };
    Some(Node {
        parent,
        name: e.name.clone(),
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime_ns: e.mtime_ns,
        kind,
    })
}

/// Every record of `list`, in order.
///
/// # Errors
/// As [`ListReader::for_each`].
pub(crate) fn read_list<T: crate::format::v3::Record>(
    repo: &Repo,
    list: &List<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    ListReader::new(repo.cache()).for_each(list, &mut |r| {
        out.push(r);
        Ok(())
    })?;
    Ok(out)
}

/// A format 3 version's extent map (its signature page list left aside).
///
/// # Errors
/// As [`read_list`].
pub(crate) fn file_map(repo: &Repo, d: &FileData) -> Result<FileMap> {
    let extents = read_list(repo, &d.extents)?
        .into_iter()
        .map(|e| MapExtent {
            logical: e.logical,
            len: e.len,
            pack: e.pack,
            offset: e.offset,
        })
        .collect::<Vec<_>>();
    if extents.last().is_some_and(|e| e.logical + e.len > d.size) {
        return Err(Error::corrupt(
            "extent list",
            0,
            "extents past the end of the file",
        ));
    }
    Ok(FileMap {
        id: MapId(0),
        body: MapBody {
            file_size: d.size,
            block_size: d.block_size,
            page_entries: d.page_entries,
            extents,
            pages: Vec::new(),
        },
    })
}

/// A format 3 version's signature (empty for a file without one).
///
/// # Errors
/// As [`read_list`]; [`Error::Corrupt`] for a signature of the wrong length.
pub(crate) fn sig_view(repo: &Repo, d: &FileData) -> Result<SigView> {
    let refs = read_list(repo, &d.sigs)?;
    let blocks = d.size.div_ceil(d.block_size as u64);
    let want = blocks.div_ceil(d.page_entries as u64);
    if !refs.is_empty() && refs.len() as u64 != want {
        return Err(Error::corrupt(
            "signature list",
            0,
            format!("{} pages for {blocks} blocks", refs.len()),
        ));
    }
    if refs.is_empty() {
        // No signature: nothing matches, every block is new.
        return Ok(SigView::new(d.block_size, 0, d.page_entries, Vec::new()));
    }
    let mut pages = Vec::with_capacity(refs.len());
    for r in refs {
        pages.push(match r {
            SigRef::Zero => PageSource::Zero,
            SigRef::Blob(b) => PageSource::Bytes {
                bytes: read_blob(repo.cache(), &b, BlobKind::SigPage)?,
                offset: 0,
                sum: None,
            },
        });
    }
    Ok(SigView::new(d.block_size, d.size, d.page_entries, pages))
}

/// Calls `f` with every blob a version's lists reach (pages and signature
/// pages), so that prune knows what is live.
///
/// # Errors
/// As [`read_list`].
pub(crate) fn blobs_of_file(repo: &Repo, d: &FileData, f: &mut dyn FnMut(BlobRef)) -> Result<()> {
    list_pages(repo, &d.extents, f)?;
    list_pages(repo, &d.sigs, f)?;
    for r in read_list(repo, &d.sigs)? {
        if let SigRef::Blob(b) = r {
            f(b);
        }
    }
    Ok(())
}

/// Calls `f` with the pages of a paged list (none for an inline one).
///
/// # Errors
/// [`Error::Corrupt`], [`Error::Io`].
pub(crate) fn list_pages<T: crate::format::v3::Record>(
    repo: &Repo,
    list: &List<T>,
    f: &mut dyn FnMut(BlobRef),
) -> Result<()> {
    let List::Paged { depth, root, .. } = list else {
        return Ok(());
    };
    let mut level = vec![*root];
    let mut d = *depth;
    while d > 1 {
        let mut next = Vec::new();
        for r in &level {
            f(*r);
            let bytes = read_blob(repo.cache(), r, T::INDEX)?;
            let object = format!("meta/{}.meta frame {}", r.meta, r.frame);
            match crate::format::v3::Page::<T>::decode(&bytes, false, &object)? {
                crate::format::v3::Page::Index(children) => {
                    next.extend(children.iter().map(|c| c.page));
                }
                crate::format::v3::Page::Leaf(_) => {
                    return Err(Error::corrupt(object, 0, "leaf page above depth 1"))
                }
            }
        }
        level = next;
        d -= 1;
    }
    for r in level {
        f(r);
    }
    Ok(())
}

/// The entry of a stage 1 node (a file at the root, a symlink, or an empty
/// directory), with its version's data.
pub(crate) fn entry_of(n: &Node) -> Result<Entry> {
    let (payload, dev, ino, ctime_ns, flags) = match &n.kind {
        NodeKind::File(f) => {
            let d = f
                .data
                .as_ref()
                .ok_or_else(|| Error::Internal("a format 2 version in a format 3 record".into()))?;
            (
                Payload::File((**d).clone()),
                f.dev,
                f.ino,
                f.ctime_ns,
                f.flags | ENTRY_HASH_SIZE_LAST,
            )
        }
        NodeKind::Dir => (Payload::Dir(List::default()), 0, 0, 0, 0),
        NodeKind::Symlink(t) => (Payload::Symlink(t.clone()), 0, 0, 0, 0),
        NodeKind::Special(r) => (
            match n.mode & libc::S_IFMT {
                libc::S_IFCHR => Payload::CharDevice(*r),
                libc::S_IFBLK => Payload::BlockDevice(*r),
                libc::S_IFIFO => Payload::Fifo,
                _ => Payload::Socket,
            },
            0,
            0,
            0,
            0,
        ),
    };
    Ok(Entry {
        name: n.name.clone(),
        mode: n.mode,
        uid: n.uid,
        gid: n.gid,
        user: Vec::new(),
        group: Vec::new(),
        mtime_ns: n.mtime_ns,
        ctime_ns,
        dev,
        ino,
        nlink: 1,
        link_group: 0,
        xattrs: Vec::new(),
        error: String::new(),
        flags,
        payload,
    })
}

/// What a root-level file's entry keeps that its [`Node`] does not.
#[derive(Clone, Debug, Default)]
pub(crate) struct RootAttrs {
    pub user: Vec<u8>,
    pub group: Vec<u8>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Writes the root list of a snapshot: the root-level `nodes` (files,
/// streams) and the `entries` of directory sources, whose trees are written.
///
/// # Errors
/// [`Error::Internal`] for a nested node; [`Error::Io`].
pub(crate) fn write_root(
    repo: &Repo,
    meta: &mut MetaWriter,
    nodes: &[Node],
    attrs: &[RootAttrs],
    mut entries: Vec<Entry>,
) -> Result<List<Entry>> {
    for (i, n) in nodes.iter().enumerate() {
        if n.parent != ROOT {
            return Err(Error::Internal(
                "a nested node in a stage 1 snapshot".into(),
            ));
        }
        let mut e = entry_of(n)?;
        if let Some(a) = attrs.get(i) {
            e.user.clone_from(&a.user);
            e.group.clone_from(&a.group);
            e.xattrs.clone_from(&a.xattrs);
        }
        entries.push(e);
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    write_list(repo, meta, entries)
}

/// Writes records, in key order, as a list.
///
/// # Errors
/// [`Error::Io`].
pub(crate) fn write_list<T: crate::format::v3::Record>(
    repo: &Repo,
    meta: &mut MetaWriter,
    records: impl IntoIterator<Item = T>,
) -> Result<List<T>> {
    let mut w = ListWriter::new();
    for r in records {
        w.push(r, meta, repo.backend())?;
    }
    w.finish(meta, repo.backend())
}

/// Writes a version's extents as a list.
///
/// # Errors
/// [`Error::Io`].
pub(crate) fn write_extents(
    repo: &Repo,
    meta: &mut MetaWriter,
    extents: &[MapExtent],
) -> Result<List<Extent>> {
    let records = extents.iter().map(|e| Extent {
        logical: e.logical,
        len: e.len,
        pack: e.pack,
        offset: e.offset,
    });
    write_list(repo, meta, records)
}

/// Writes a version's signature page references as a list.
///
/// # Errors
/// [`Error::Io`].
pub(crate) fn write_sigs(
    repo: &Repo,
    meta: &mut MetaWriter,
    refs: &[SigRef],
) -> Result<List<SigRef>> {
    write_list(repo, meta, refs.iter().copied())
}

/// Tells `meta` the pages of `list`, so that a new list with the same pages
/// references them instead of writing them again (an unchanged directory
/// costs nothing in the next snapshot).
///
/// # Errors
/// As [`list_pages`].
pub(crate) fn know_pages<T: crate::format::v3::Record>(
    repo: &Repo,
    list: &List<T>,
    meta: &mut MetaWriter,
) -> Result<()> {
    list_pages(repo, list, &mut |r| meta.know(r))
}

/// Calls `f` with every entry of the tree under `list`, depth first in name
/// order, with its index in that order (the index of its node in
/// [`snapshot_of`]'s flattened snapshot).
///
/// # Errors
/// As [`read_list`], and what `f` returns.
pub(crate) fn visit(
    repo: &Repo,
    list: &List<Entry>,
    f: &mut dyn FnMut(usize, &Entry) -> Result<()>,
) -> Result<()> {
    fn go(
        repo: &Repo,
        list: &List<Entry>,
        next: &mut usize,
        f: &mut dyn FnMut(usize, &Entry) -> Result<()>,
    ) -> Result<()> {
        for e in read_list(repo, list)? {
            let i = *next;
            *next += 1;
            f(i, &e)?;
            if let Payload::Dir(c) = &e.payload {
                go(repo, c, next, f)?;
            }
        }
        Ok(())
    }
    go(repo, list, &mut 0, f)
}

/// Writes the tree under `list` again with every file's data passed
/// through `f` (given the index [`visit`] gives it); a list whose entries
/// come out the same is written as the same pages, which `meta` knows.
///
/// # Errors
/// As [`read_list`] and [`write_list`], and what `f` returns.
pub(crate) fn rewrite(
    repo: &Repo,
    meta: &mut MetaWriter,
    list: &List<Entry>,
    f: &mut dyn FnMut(usize, &mut FileData, &mut MetaWriter) -> Result<()>,
) -> Result<List<Entry>> {
    fn go(
        repo: &Repo,
        meta: &mut MetaWriter,
        list: &List<Entry>,
        next: &mut usize,
        f: &mut dyn FnMut(usize, &mut FileData, &mut MetaWriter) -> Result<()>,
    ) -> Result<List<Entry>> {
        let mut out = Vec::new();
        for mut e in read_list(repo, list)? {
            let i = *next;
            *next += 1;
            match &mut e.payload {
                Payload::File(d) => f(i, d, meta)?,
                Payload::Dir(c) => *c = go(repo, meta, c, next, f)?,
                _ => {}
            }
            out.push(e);
        }
        write_list(repo, meta, out)
    }
    go(repo, meta, list, &mut 0, f)
}

/// The entry at `path` (`a/b/c`, relative to the snapshot's root), read
/// one list lookup per component.
///
/// # Errors
/// As [`ListReader::lookup`].
pub(crate) fn resolve(repo: &Repo, root: &List<Entry>, path: &[u8]) -> Result<Option<Entry>> {
    let mut list = root.clone();
    let mut found = None;
    for part in path
        .split(|&c| c == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
    {
        if let Some(Entry {
            payload: Payload::Dir(l),
            ..
        }) = &found
        {
            list = l.clone();
        } else if found.is_some() {
            return Ok(None);
        }
        match ListReader::new(repo.cache()).lookup(&list, part)? {
            Some(e) => found = Some(e),
            None => return Ok(None),
        }
    }
    Ok(found)
}
