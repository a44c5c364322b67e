//! The tree the mount shows, kept apart from FUSE's types:
//!
//! ```text
//! /                               one directory per snapshot, plus links
//! /2024-05-01T03:00:00/           a snapshot, named by its local time
//! /2024-05-01T03:00:00/disk.qcow2 a stored version
//! /2024-05-01 -> 2024-05-01T03:00:00   the last snapshot of each day
//! /latest -> 2024-05-02T03:00:00       the last snapshot
//! ```
//!
//! Snapshots published while mounted appear at the next look at the root
//! (the listing is re-read at most once a second). Inode numbers are given out
//! on first sight and never reused while mounted; a snapshot's contents never
//! change, so the kernel may cache them for long.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dsync_store::format::snapshot::ROOT;
use dsync_store::{Error, NodeKind, Repo, Snapshot, SnapshotId, VersionReader};

pub const ROOT_INO: u64 = 1;
const REFRESH: Duration = Duration::from_secs(1);

/// What an inode is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Root,
    /// A directory of a snapshot: its root (`None`) or a directory node.
    Dir(SnapshotId, Option<u32>),
    /// A regular file node.
    File(SnapshotId, u32),
    /// A symlink node of a snapshot.
    NodeLink(SnapshotId, u32),
    /// A link at the root (`latest`, a day).
    RootLink(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl Type {
    /// The type of a special node, from its mode.
    fn special(mode: u32) -> Type {
        match mode & libc::S_IFMT {
            libc::S_IFCHR => Type::CharDevice,
            libc::S_IFBLK => Type::BlockDevice,
            libc::S_IFIFO => Type::Fifo,
            _ => Type::Socket,
        }
    }
}

/// Attributes, independent of FUSE.
#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: Type,
    pub size: u64,
    /// Bytes stored (holes excluded), for st_blocks.
    pub stored: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    /// A device node's device number.
    pub rdev: u64,
    /// True when it can never change (everything inside a snapshot).
    pub immutable: bool,
}

/// One entry of the root directory.
#[derive(Clone, Debug)]
enum RootEntry {
    Snap(SnapshotId),
    Link(String),
}

struct State {
    snaps: HashMap<SnapshotId, Arc<Snapshot>>,
    /// Root entries by name, in name order.
    root: BTreeMap<String, RootEntry>,
    refreshed: Option<Instant>,
}

#[derive(Default)]
struct Inodes {
    by_ino: HashMap<u64, Key>,
    by_key: HashMap<Key, u64>,
}

pub struct Tree {
    repo: Repo,
    state: RwLock<State>,
    inodes: RwLock<Inodes>,
    next_ino: std::sync::atomic::AtomicU64,
    /// Readers of open files, with their count of open handles: a reader
    /// (and the packs it holds open) goes when its file's last handle is
    /// released, so packs a prune deleted are not kept alive by the mount.
    readers: Mutex<HashMap<u64, (Arc<VersionReader>, u32)>>,
    /// Bytes stored per file inode (for st_blocks), once known.
    stored: Mutex<HashMap<u64, u64>>,
    mount_time_ns: i64,
}

impl Tree {
    /// # Errors
    /// When the repository's snapshots cannot be listed.
    pub fn new(repo: Repo) -> Result<Tree, Error> {
        let t = Tree {
            repo,
            state: RwLock::new(State {
                snaps: HashMap::new(),
                root: BTreeMap::new(),
                refreshed: None,
            }),
            inodes: RwLock::new(Inodes::default()),
            next_ino: std::sync::atomic::AtomicU64::new(ROOT_INO + 1),
            readers: Mutex::new(HashMap::new()),
            stored: Mutex::new(HashMap::new()),
            mount_time_ns: dsync_store::time::now_ns(),
        };
        t.ino(&Key::Root);
        t.refresh(true)?;
        Ok(t)
    }

    /// The inode of `key`, given out now if it has none.
    pub fn ino(&self, key: &Key) -> u64 {
        if *key == Key::Root {
            if let Ok(mut i) = self.inodes.write() {
                i.by_ino.insert(ROOT_INO, Key::Root);
                i.by_key.insert(Key::Root, ROOT_INO);
            }
            return ROOT_INO;
        }
        if let Some(&n) = self
            .inodes
            .read()
            .ok()
            .and_then(|i| i.by_key.get(key).copied())
            .as_ref()
        {
            return n;
        }
        let Ok(mut i) = self.inodes.write() else {
            return 0;
        };
        if let Some(&n) = i.by_key.get(key) {
            return n;
        }
        let n = self
            .next_ino
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        i.by_ino.insert(n, key.clone());
        i.by_key.insert(key.clone(), n);
        n
    }

    pub fn key(&self, ino: u64) -> Option<Key> {
        self.inodes.read().ok()?.by_ino.get(&ino).cloned()
    }

    /// Re-reads the list of snapshots if it is older than a second (or `force`).
    /// A manifest that cannot be read is left out and reported once.
    ///
    /// # Errors
    /// When the snapshot directory cannot be listed.
    pub fn refresh(&self, force: bool) -> Result<(), Error> {
        if !force {
            if let Ok(st) = self.state.read() {
                if st.refreshed.is_some_and(|t| t.elapsed() < REFRESH) {
                    return Ok(());
                }
            }
        }
        let ids = self.repo.snapshot_ids()?;
        let Ok(mut st) = self.state.write() else {
            return Ok(());
        };
        st.snaps.retain(|id, _| ids.contains(id));
        for id in ids {
            if st.snaps.contains_key(&id) {
                continue;
            }
            match self.repo.load_snapshot(id) {
                Ok(s) => {
                    st.snaps.insert(id, Arc::new(s));
                }
                Err(e) => crate::log(&format!("snapshot {id} left out: {e}")),
            }
        }
        let mut order: Vec<&Arc<Snapshot>> = st.snaps.values().collect();
        order.sort_by_key(|s| (s.time_ns, s.id));
        let mut root = BTreeMap::new();
        let mut last_of_day: BTreeMap<String, String> = BTreeMap::new();
        let mut latest = None;
        for s in order {
            let base = dsync_store::time::local(s.time_ns);
            let mut name = base.clone();
            let mut k = 1;
            while root.contains_key(&name) {
                name = format!("{base}.{k}");
                k += 1;
            }
            last_of_day.insert(base[..10.min(base.len())].to_string(), name.clone());
            latest = Some(name.clone());
            root.insert(name, RootEntry::Snap(s.id));
        }
        for (day, target) in last_of_day {
            root.insert(day, RootEntry::Link(target));
        }
        if let Some(l) = latest {
            root.insert("latest".to_string(), RootEntry::Link(l));
        }
        st.root = root;
        st.refreshed = Some(Instant::now());
        Ok(())
    }

    fn snap(&self, id: SnapshotId) -> Option<Arc<Snapshot>> {
        self.state.read().ok()?.snaps.get(&id).cloned()
    }

    /// The entries of directory `ino`: (name, key, type), in order.
    pub fn list(&self, ino: u64) -> Option<Vec<(Vec<u8>, Key, Type)>> {
        match self.key(ino)? {
            Key::Root => {
                let _ = self.refresh(false);
                let st = self.state.read().ok()?;
                Some(
                    st.root
                        .iter()
                        .map(|(name, e)| match e {
                            RootEntry::Snap(id) => {
                                (name.as_bytes().to_vec(), Key::Dir(*id, None), Type::Dir)
                            }
                            RootEntry::Link(_) => (
                                name.as_bytes().to_vec(),
                                Key::RootLink(name.clone()),
                                Type::Symlink,
                            ),
                        })
                        .collect(),
                )
            }
            Key::Dir(id, dir) => {
                let s = self.snap(id)?;
                let parent = dir.unwrap_or(ROOT);
                Some(
                    s.nodes
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| n.parent == parent)
                        .map(|(i, n)| {
                            let i = i as u32;
                            let (key, t) = match n.kind {
                                NodeKind::File(_) => (Key::File(id, i), Type::File),
                                NodeKind::Dir => (Key::Dir(id, Some(i)), Type::Dir),
                                NodeKind::Symlink(_) => (Key::NodeLink(id, i), Type::Symlink),
                                NodeKind::Special(_) => {
                                    (Key::NodeLink(id, i), Type::special(n.mode))
                                }
                            };
                            (n.name.clone(), key, t)
                        })
                        .collect(),
                )
            }
            _ => None,
        }
    }

    /// The entry `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<Key> {
        if self.key(parent)? == Key::Root {
            let _ = self.refresh(false);
            let st = self.state.read().ok()?;
            let name = std::str::from_utf8(name).ok()?;
            return match st.root.get(name)? {
                RootEntry::Snap(id) => Some(Key::Dir(*id, None)),
                RootEntry::Link(_) => Some(Key::RootLink(name.to_string())),
            };
        }
        self.list(parent)?
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, k, _)| k)
    }

    /// Opens file `ino` for one more handle; its reader is shared by all
    /// handles and kept until the last is released.
    ///
    /// # Errors
    /// When the version's map cannot be loaded.
    pub fn open(&self, ino: u64) -> Result<Arc<VersionReader>, Error> {
        if let Ok(mut m) = self.readers.lock() {
            if let Some((r, n)) = m.get_mut(&ino) {
                *n += 1;
                return Ok(r.clone());
            }
        }
        let r = self.open_reader(ino)?;
        if let Ok(mut m) = self.readers.lock() {
            let e = m.entry(ino).or_insert_with(|| (r.clone(), 0));
            e.1 += 1;
            return Ok(e.0.clone());
        }
        Ok(r)
    }

    /// Releases one handle of file `ino`.
    pub fn release(&self, ino: u64) {
        if let Ok(mut m) = self.readers.lock() {
            if let Some((_, n)) = m.get_mut(&ino) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&ino);
                }
            }
        }
    }

    /// The reader of file `ino`: the open one, or a fresh one for this use.
    ///
    /// # Errors
    /// When the version's map cannot be loaded.
    pub fn reader(&self, ino: u64) -> Result<Arc<VersionReader>, Error> {
        if let Some(r) = self
            .readers
            .lock()
            .ok()
            .and_then(|m| m.get(&ino).map(|e| e.0.clone()))
        {
            return Ok(r);
        }
        self.open_reader(ino)
    }

    fn open_reader(&self, ino: u64) -> Result<Arc<VersionReader>, Error> {
        let Some(Key::File(id, node)) = self.key(ino) else {
            return Err(Error::InvalidInput("not a file".into()));
        };
        let s = self.snap(id).ok_or_else(|| Error::NoSuchSnapshot {
            spec: id.to_string(),
        })?;
        Ok(Arc::new(VersionReader::open_node(&self.repo, &s, node)?))
    }

    /// Bytes stored for file `ino` (its size when its map cannot be read).
    fn stored_bytes(&self, ino: u64, size: u64) -> u64 {
        if let Some(&n) = self
            .stored
            .lock()
            .ok()
            .and_then(|m| m.get(&ino).copied())
            .as_ref()
        {
            return n;
        }
        let Ok(r) = self.reader(ino) else { return size };
        let n = r.map().stored_bytes();
        if let Ok(mut m) = self.stored.lock() {
            m.insert(ino, n);
        }
        n
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: u64) -> Option<Vec<u8>> {
        match self.key(ino)? {
            Key::RootLink(name) => {
                let _ = self.refresh(false);
                match self.state.read().ok()?.root.get(&name)? {
                    RootEntry::Link(t) => Some(t.as_bytes().to_vec()),
                    RootEntry::Snap(_) => None,
                }
            }
            Key::NodeLink(id, node) => match &self.snap(id)?.nodes.get(node as usize)?.kind {
                NodeKind::Symlink(t) => Some(t.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Attributes of `ino`.
    pub fn attr(&self, ino: u64) -> Option<Attr> {
        let key = self.key(ino)?;
        let dir = |mtime_ns, immutable| Attr {
            ino,
            kind: Type::Dir,
            size: 0,
            stored: 0,
            mode: 0o555,
            uid: 0,
            gid: 0,
            mtime_ns,
            rdev: 0,
            immutable,
        };
        match key {
            Key::Root => Some(dir(self.mount_time_ns, false)),
            Key::Dir(id, None) => Some(dir(self.snap(id)?.time_ns, true)),
            Key::RootLink(_) => {
                let t = self.readlink(ino)?;
                Some(Attr {
                    ino,
                    kind: Type::Symlink,
                    size: t.len() as u64,
                    stored: 0,
                    mode: 0o777,
                    uid: 0,
                    gid: 0,
                    mtime_ns: self.mount_time_ns,
                    rdev: 0,
                    immutable: false,
                })
            }
            Key::Dir(id, Some(node)) | Key::File(id, node) | Key::NodeLink(id, node) => {
                let s = self.snap(id)?;
                let n = s.nodes.get(node as usize)?;
                let mut rdev = 0;
                let (kind, size, stored) = match &n.kind {
                    NodeKind::File(f) => (Type::File, f.size, self.stored_bytes(ino, f.size)),
                    NodeKind::Dir => (Type::Dir, 0, 0),
                    NodeKind::Symlink(t) => (Type::Symlink, t.len() as u64, 0),
                    NodeKind::Special(r) => {
                        rdev = *r;
                        (Type::special(n.mode), 0, 0)
                    }
                };
                Some(Attr {
                    ino,
                    kind,
                    size,
                    stored,
                    // Read-only: no write bits, whatever the source had.
                    mode: n.mode & 0o7555,
                    uid: n.uid,
                    gid: n.gid,
                    mtime_ns: n.mtime_ns,
                    rdev,
                    immutable: true,
                })
            }
        }
    }
}
