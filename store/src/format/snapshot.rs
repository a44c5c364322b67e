//! `snapshots/<id>.snap`: a snapshot manifest, the tree of one backup.

use super::{open, seal, Reader, Writer};
use crate::delta::signature::{FileHasher, HashScheme};
use crate::error::{Error, Result};
use crate::id::{MapId, SnapshotId};

pub const MAGIC: &[u8; 8] = b"DSYNCSNP";

/// Parent index of a node at the snapshot's root.
pub const ROOT: u32 = u32::MAX;
const MAX_NAME: usize = 4096;
const MAX_TARGET: usize = 65536;
/// Flag on a file version: the source changed while it was read.
pub const FLAG_CHANGED_WHILE_READ: u32 = 1;
/// Flag on a file version (format 2): its hash puts the size last
/// ([`HashScheme::SizeLast`]); without it the hash is format 1's.
pub const FLAG_HASH_SIZE_LAST: u32 = 2;
const KNOWN_FLAGS: u32 = FLAG_CHANGED_WHILE_READ | FLAG_HASH_SIZE_LAST;

/// Counters recorded with a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Bytes read from the sources.
    pub bytes_read: u64,
    /// Bytes the repository grew by (packs, signatures, maps, this manifest).
    pub bytes_added: u64,
    /// Wall time of the backup.
    pub duration_ns: u64,
}

/// One snapshot: when, from where, and the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub id: SnapshotId,
    /// Unix time in nanoseconds.
    pub time_ns: i64,
    pub host: String,
    /// The source paths as given to `dsync backup` (made absolute).
    pub paths: Vec<String>,
    pub stats: SnapshotStats,
    /// The tree in preorder; a node's parent comes before it.
    pub nodes: Vec<Node>,
    /// The format it is stored in: 2 (a manifest) or 3 (a record whose
    /// tree is in meta packs).
    pub format: u32,
}

/// What listing a snapshot shows, without its tree (a format 3 record is
/// read without reading a page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub time_ns: i64,
    pub host: String,
    pub paths: Vec<String>,
    pub stats: SnapshotStats,
    /// Regular files, and the sum of their sizes.
    pub files: u64,
    pub size: u64,
    pub format: u32,
}

/// A snapshot's name and time: what retention and snapshot names need.
pub trait Timed {
    fn id(&self) -> SnapshotId;
    fn time_ns(&self) -> i64;
}

impl Timed for Snapshot {
    fn id(&self) -> SnapshotId {
        self.id
    }
    fn time_ns(&self) -> i64 {
        self.time_ns
    }
}

impl Timed for SnapshotInfo {
    fn id(&self) -> SnapshotId {
        self.id
    }
    fn time_ns(&self) -> i64 {
        self.time_ns
    }
}

/// A file, directory or symlink of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Index of the parent directory node, or [`ROOT`].
    pub parent: u32,
    /// The base name, as raw bytes (Unix names need not be UTF-8).
    pub name: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub kind: NodeKind,
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    File(FileVersion),
    Dir,
    Symlink(Vec<u8>),
    /// Format 3: a device (its rdev), fifo or socket (rdev 0); the mode's
    /// type bits tell which. Format 2 manifests never hold one.
    Special(u64),
}

/// The stored version of one regular file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileVersion {
    pub size: u64,
    /// The whole-file hash (FORMAT.md, "File hash").
    pub hash: [u8; 32],
    /// The extent map and signature of this version.
    pub map: MapId,
    /// Source identity, to reuse an unchanged file without reading it.
    pub dev: u64,
    pub ino: u64,
    pub ctime_ns: i64,
    pub flags: u32,
    /// Format 3: the version's extents and signature, carried by its
    /// directory entry (then `map` is unused, 0).
    pub data: Option<std::sync::Arc<super::v3::node::FileData>>,
}

impl FileVersion {
    /// How this version's [`FileVersion::hash`] is defined.
    pub fn hash_scheme(&self) -> HashScheme {
        if self.flags & FLAG_HASH_SIZE_LAST != 0 {
            HashScheme::SizeLast
        } else {
            HashScheme::SizeFirst
        }
    }

    /// What names this version: its map object (format 2), or for format 3
    /// a key made from its entry's data (its lists, size and hash), the same
    /// for the same version in every snapshot.
    pub fn key(&self) -> MapId {
        let Some(d) = &self.data else { return self.map };
        let mut w = Writer::default();
        w.u64(d.size);
        w.bytes(&d.hash);
        d.extents.encode(&mut w);
        d.sigs.encode(&mut w);
        MapId(xxhash_rust::xxh3::xxh3_64(&w.buf) | 1)
    }

    /// A hasher that verifies this version's bytes against its hash.
    pub fn hasher(&self, block_size: u32) -> FileHasher {
        FileHasher::with_scheme(self.hash_scheme(), self.size, block_size)
    }
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.id.0);
        w.i64(self.time_ns);
        w.str(self.host.as_bytes());
        w.u32(self.paths.len() as u32);
        for p in &self.paths {
            w.str(p.as_bytes());
        }
        w.u64(self.stats.bytes_read);
        w.u64(self.stats.bytes_added);
        w.u64(self.stats.duration_ns);
        w.u32(self.nodes.len() as u32);
        for n in &self.nodes {
            let kind = match n.kind {
                NodeKind::File(_) => 1,
                NodeKind::Dir => 2,
                NodeKind::Symlink(_) => 3,
                // Not in format 2 (backup refuses trees there): kept as an
                // empty symlink rather than an undecodable manifest.
                NodeKind::Special(_) => 3,
            };
            w.u8(kind);
            w.u32(n.parent);
            w.str(&n.name);
            w.u32(n.mode);
            w.u32(n.uid);
            w.u32(n.gid);
            w.i64(n.mtime_ns);
            match &n.kind {
                NodeKind::File(f) => {
                    w.u64(f.size);
                    w.bytes(&f.hash);
                    w.u64(f.map.0);
                    w.u64(f.dev);
                    w.u64(f.ino);
                    w.i64(f.ctime_ns);
                    w.u32(f.flags);
                }
                NodeKind::Dir => {}
                NodeKind::Symlink(t) => w.str(t),
                NodeKind::Special(_) => w.str(b""),
            }
        }
        seal(MAGIC, &w.buf, true)
    }

    /// # Errors
    /// [`Error::Corrupt`] for damage, [`Error::UnsupportedVersion`] for a newer format.
    pub fn decode(bytes: &[u8], object: &str) -> Result<Snapshot> {
        let body = open(MAGIC, bytes, object)?;
        let mut r = Reader::new(&body, object);
        let id = SnapshotId(r.u64()?);
        let time_ns = r.i64()?;
        let host = r_str(&mut r, 1024)?;
        let host = utf8(&r, host)?;
        let npaths = r.u32()? as usize;
        if npaths > r.remaining() / 4 {
            return Err(r.corrupt("path count exceeds the manifest"));
        }
        let mut paths = Vec::with_capacity(npaths);
        for _ in 0..npaths {
            let p = r_str(&mut r, MAX_TARGET)?;
            paths.push(utf8(&r, p)?);
        }
        let stats = SnapshotStats {
            bytes_read: r.u64()?,
            bytes_added: r.u64()?,
            duration_ns: r.u64()?,
        };
        let count = r.u32()? as usize;
        if count > r.remaining() / 29 {
            return Err(r.corrupt("node count exceeds the manifest"));
        }
        let mut nodes = Vec::with_capacity(count);
        for i in 0..count {
            let kind = r.u8()?;
            let parent = r.u32()?;
            if parent != ROOT && parent as usize >= i {
                return Err(r.corrupt(format!("node {i} has parent {parent}, not an earlier node")));
            }
            if parent != ROOT
                && !matches!(
                    nodes.get(parent as usize),
                    Some(Node {
                        kind: NodeKind::Dir,
                        ..
                    })
                )
            {
                return Err(r.corrupt(format!("node {i} has a parent that is not a directory")));
            }
            let name = r_str(&mut r, MAX_NAME)?.to_vec();
            if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
                return Err(r.corrupt(format!("node {i} has an invalid name")));
            }
            let mode = r.u32()?;
            let uid = r.u32()?;
            let gid = r.u32()?;
            let mtime_ns = r.i64()?;
            let kind = match kind {
                1 => NodeKind::File(FileVersion {
                    size: r.u64()?,
                    hash: r.array()?,
                    map: MapId(r.u64()?),
                    dev: r.u64()?,
                    ino: r.u64()?,
                    ctime_ns: r.i64()?,
                    flags: r.u32()?,
                    data: None,
                }),
                2 => NodeKind::Dir,
                3 => NodeKind::Symlink(r_str(&mut r, MAX_TARGET)?.to_vec()),
                k => return Err(r.corrupt(format!("node {i} has unknown kind {k}"))),
            };
            if let NodeKind::File(f) = &kind {
                if f.map.0 == 0 {
                    return Err(r.corrupt(format!("node {i} has no map")));
                }
                if f.flags & !KNOWN_FLAGS != 0 {
                    return Err(r.corrupt(format!(
                        "node {i} has unknown flags {:#x}",
                        f.flags & !KNOWN_FLAGS
                    )));
                }
            }
            nodes.push(Node {
                parent,
                name,
                mode,
                uid,
                gid,
                mtime_ns,
                kind,
            });
        }
        r.finish()?;
        if id.0 == 0 {
            return Err(Error::corrupt(object, 24, "snapshot id 0"));
        }
        Ok(Snapshot {
            id,
            time_ns,
            host,
            paths,
            stats,
            nodes,
            format: 2,
        })
    }

    /// The root-level node called `name`.
    pub fn root_node(&self, name: &[u8]) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.parent == ROOT && n.name == name)
    }

    /// What listing it shows.
    pub fn info(&self) -> SnapshotInfo {
        let (files, size) = self.totals();
        SnapshotInfo {
            id: self.id,
            time_ns: self.time_ns,
            host: self.host.clone(),
            paths: self.paths.clone(),
            stats: self.stats.clone(),
            files,
            size,
            format: self.format,
        }
    }

    /// Number of regular files and their total size.
    pub fn totals(&self) -> (u64, u64) {
        self.nodes
            .iter()
            .fold((0, 0), |(n, s), node| match &node.kind {
                NodeKind::File(f) => (n + 1, s + f.size),
                _ => (n, s),
            })
    }
}

fn r_str<'a>(r: &mut Reader<'a>, max: usize) -> Result<&'a [u8]> {
    r.str(max)
}

fn utf8(r: &Reader<'_>, b: &[u8]) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| r.corrupt("string is not UTF-8"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn sample() -> Snapshot {
        Snapshot {
            id: SnapshotId(0x1122334455667788),
            time_ns: 1_700_000_000_000_000_000,
            host: "host".into(),
            paths: vec!["/vm/disk.qcow2".into()],
            stats: SnapshotStats {
                bytes_read: 1,
                bytes_added: 2,
                duration_ns: 3,
            },
            nodes: vec![
                Node {
                    parent: ROOT,
                    name: b"disk.qcow2".to_vec(),
                    mode: 0o100644,
                    uid: 0,
                    gid: 0,
                    mtime_ns: 5,
                    kind: NodeKind::File(FileVersion {
                        size: 10,
                        hash: [7; 32],
                        map: MapId(9),
                        dev: 1,
                        ino: 2,
                        ctime_ns: 3,
                        flags: 0,
                        data: None,
                    }),
                },
                Node {
                    parent: ROOT,
                    name: b"etc".to_vec(),
                    mode: 0o40755,
                    uid: 0,
                    gid: 0,
                    mtime_ns: 5,
                    kind: NodeKind::Dir,
                },
                Node {
                    parent: 1,
                    name: b"link".to_vec(),
                    mode: 0o120777,
                    uid: 0,
                    gid: 0,
                    mtime_ns: 5,
                    kind: NodeKind::Symlink(b"../x".to_vec()),
                },
            ],
            format: 2,
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(Snapshot::decode(&s.encode(), "s").unwrap(), s);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Snapshot::decode(&bytes, "s");
        }

        #[test]
        fn any_flip_is_detected(pos in 0usize..10_000, bit in 0u8..8) {
            let enc = sample().encode();
            let mut bad = enc.clone();
            let pos = pos % bad.len();
            bad[pos] ^= 1 << bit;
            prop_assert!(Snapshot::decode(&bad, "s").is_err());
        }
    }
}
