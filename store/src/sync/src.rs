//! SRC as the walk sees it: a directory open here, or one that a sender on
//! another machine listed ([`super::remote`]). The walk asks the same
//! questions of both: the names and their lstat, a symlink's target, the
//! extended attributes kept, a file's hash for `--checksum`.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use rayon::prelude::*;

use super::attrs::{proc_path, Target, Xattrs};
use super::remote;
use super::walk::{hash_file, Listing, Pair};
use super::Shared;
use crate::source::{self, Stat, XattrSource};

/// A directory of SRC.
#[derive(Clone)]
pub(super) enum SrcDir {
    Local(Arc<OwnedFd>),
    Remote(Arc<remote::Dir>),
}

impl SrcDir {
    /// The names (sorted) and each name's lstat here and in `dst`.
    pub(super) fn list(&self, dst: Option<&Arc<OwnedFd>>) -> io::Result<Listing> {
        match self {
            SrcDir::Local(fd) => {
                let mut names = source::read_names(fd.as_fd())?;
                names.sort_unstable();
                let pairs = stat_pairs(Some(fd), dst, &names, None);
                Ok((names, pairs))
            }
            SrcDir::Remote(d) => {
                let names: Vec<(Vec<u8>, u64)> = d
                    .entries
                    .iter()
                    .map(|e| (e.name.clone(), e.st.ino))
                    .collect();
                let pairs = stat_pairs(None, dst, &names, Some(&d.entries));
                Ok((names, pairs))
            }
        }
    }

    /// The subdirectory `name`.
    pub(super) fn open(&self, name: &[u8]) -> io::Result<SrcDir> {
        match self {
            SrcDir::Local(fd) => Ok(SrcDir::Local(Arc::new(source::open_dir(
                Some(fd.as_fd()),
                name,
            )?))),
            SrcDir::Remote(d) => Ok(SrcDir::Remote(d.open(name)?)),
        }
    }

    /// The target of the symlink `name`.
    pub(super) fn read_link(&self, name: &[u8]) -> io::Result<Vec<u8>> {
        match self {
            SrcDir::Local(fd) => source::read_link(fd.as_fd(), name),
            SrcDir::Remote(d) => d
                .entry(name)?
                .link
                .clone()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a symlink")),
        }
    }

    /// The kept extended attributes of `name`, or of this directory itself
    /// (`None`); none asked: `None`.
    pub(super) fn xattrs(&self, s: &Shared<'_>, name: Option<&[u8]>) -> io::Result<Option<Xattrs>> {
        if !s.opts.xattrs && !s.opts.acls {
            return Ok(None);
        }
        match (self, name) {
            (SrcDir::Local(fd), None) => s.xattrs_of(XattrSource::Fd(fd.as_fd())),
            (SrcDir::Local(fd), Some(n)) => {
                s.xattrs_of(XattrSource::Path(&proc_path(Target::At(fd.as_fd(), n))))
            }
            (SrcDir::Remote(d), name) => {
                let x = match name {
                    None => d.own_xattrs.clone(),
                    Some(n) => d.entry(n)?.xattrs.clone(),
                };
                let mut x = x.unwrap_or_default();
                x.retain(|(n, _)| s.keeps_xattr(n));
                Ok(Some(x))
            }
        }
    }

    /// BLAKE2b-256 of the regular file `name` (`--checksum`).
    pub(super) fn hash(&self, name: &[u8]) -> io::Result<[u8; 32]> {
        match self {
            SrcDir::Local(fd) => hash_file(&source::open_file(fd.as_fd(), name)?),
            SrcDir::Remote(d) => d
                .entry(name)?
                .hash
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no checksum sent")),
        }
    }
}

/// Each name's lstat in SRC's directory and in DST's, in order; in
/// parallel but for the smallest directories (rsync's sender and receiver
/// stat their sides at once too). A remote SRC's are in `entries`.
fn stat_pairs(
    src: Option<&Arc<OwnedFd>>,
    dst: Option<&Arc<OwnedFd>>,
    names: &[(Vec<u8>, u64)],
    entries: Option<&[remote::Entry]>,
) -> Vec<Pair> {
    let one = |(i, (n, _)): (usize, &(Vec<u8>, u64))| -> Pair {
        let old = match dst {
            None => Ok(None),
            Some(d) => match source::stat_at(d.as_fd(), n) {
                Ok(st) => Ok(Some(st)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
        };
        let st: io::Result<Stat> = match (src, entries) {
            (Some(fd), _) => source::stat_at(fd.as_fd(), n),
            (None, Some(e)) => e[i].stat(),
            (None, None) => Err(io::ErrorKind::NotFound.into()),
        };
        (st, old)
    };
    if names.len() < 8 || (src.is_none() && dst.is_none()) {
        return names.iter().enumerate().map(one).collect();
    }
    names
        .par_iter()
        .enumerate()
        .with_min_len(16)
        .map(one)
        .collect()
}
