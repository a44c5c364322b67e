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
//!
//! What a format 3 snapshot holds never changes, but where it is stored may:
//! a prune that repacks meta packs replaces the record of a kept snapshot
//! with one whose lists point into the new meta pack, then deletes the old
//! one. The root lists and entries cached here still point into the old one,
//! so a read through them that finds an object gone re-reads the record,
//! drops what was cached from the old one and reads again ([`Tree::follow`],
//! store/FORMAT.md "Readers during prune"); only a snapshot whose record is
//! gone (forgotten) answers that it is not there.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dsync_store::browse::{self, Entry, List, Payload};
use dsync_store::format::snapshot::ROOT;
use dsync_store::{Error, NodeKind, Repo, Snapshot, SnapshotId, VersionReader};

pub const ROOT_INO: u64 = 1;
const REFRESH: Duration = Duration::from_secs(1);
/// Replaced records a read of a format 3 tree follows before it takes an
/// object still missing for damage (as store's `VersionReader::open_node`).
const FOLLOW: usize = 8;

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
    /// Format 3: the node named so in the directory of this inode (the
    /// snapshot's root or another `Path`), read lazily, one directory at a
    /// time. Kept compactly in the inode table (`Paths`): a million
    /// inodes take tens of megabytes, not hundreds.
    Path(SnapshotId, u64, Arc<[u8]>),
    /// Format 3: a hard-link group; every path of it is this one inode.
    Group(SnapshotId, u64),
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
    /// Hard links (format 3 keeps the count).
    pub nlink: u32,
    /// True when it can never change (everything inside a snapshot).
    pub immutable: bool,
}

/// One entry of the root directory.
#[derive(Clone, Debug)]
enum RootEntry {
    Snap(SnapshotId),
    Link(String),
}

/// What the mount knows of a snapshot before anything inside is read.
#[derive(Clone, Copy, Debug)]
struct SnapMeta {
    time_ns: i64,
    format: u32,
}

/// Extended attributes (name, value), names sorted.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// A directory's entries as readdir gives them.
type Listing = Arc<Vec<(Vec<u8>, Key, Type)>>;

struct State {
    snaps: HashMap<SnapshotId, SnapMeta>,
    /// Root entries by name, in name order.
    root: BTreeMap<String, RootEntry>,
    refreshed: Option<Instant>,
}

/// Inodes of `Path` keys are numbered from here (their index in `Paths`).
const PATH_BASE: u64 = 1 << 40;

#[derive(Default)]
struct Inodes {
    /// Every key but `Path`: few (the root, format 2 snapshots, groups).
    by_ino: HashMap<u64, Key>,
    by_key: HashMap<Key, u64>,
    paths: Paths,
}

impl Inodes {
    /// The snapshot inode `ino` is part of (`None` for the root and its
    /// links).
    fn snap(&self, ino: u64) -> Option<SnapshotId> {
        match ino.checked_sub(PATH_BASE) {
            Some(n) => self
                .paths
                .nodes
                .get(usize::try_from(n).ok()?)
                .map(|n| n.snap),
            None => match self.by_ino.get(&ino)? {
                Key::Dir(id, _)
                | Key::File(id, _)
                | Key::NodeLink(id, _)
                | Key::Path(id, ..)
                | Key::Group(id, _) => Some(*id),
                Key::Root | Key::RootLink(_) => None,
            },
        }
    }
}

/// The `Path` inodes: the mount never forgets an inode (the kernel may come
/// back with any number it was given), so after `find` over a million files
/// they are a million. Each is one fixed-size record and its name in one
/// arena, found again through a table of indexes hashed by (parent, name).
#[derive(Default)]
struct Paths {
    nodes: Vec<PathNode>,
    names: Vec<u8>,
    index: hashbrown::HashTable<u64>,
    hasher: std::collections::hash_map::RandomState,
}

struct PathNode {
    snap: SnapshotId,
    parent: u64,
    name_at: u64,
    name_len: u32,
}

impl Paths {
    fn name(&self, n: &PathNode) -> &[u8] {
        let at = usize::try_from(n.name_at).unwrap_or(usize::MAX);
        self.names
            .get(at..at.saturating_add(n.name_len as usize))
            .unwrap_or_default()
    }

    fn find(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let h = self.hasher.hash_one((parent, name));
        self.index
            .find(h, |&i| {
                self.nodes
                    .get(i as usize)
                    .is_some_and(|n| n.parent == parent && self.name(n) == name)
            })
            .copied()
    }

    /// The index of (parent, name), added if new.
    fn insert(&mut self, snap: SnapshotId, parent: u64, name: &[u8]) -> u64 {
        if let Some(i) = self.find(parent, name) {
            return i;
        }
        let i = self.nodes.len() as u64;
        self.nodes.push(PathNode {
            snap,
            parent,
            name_at: self.names.len() as u64,
            name_len: u32::try_from(name.len()).unwrap_or(u32::MAX),
        });
        self.names.extend_from_slice(name);
        let Paths {
            nodes,
            names,
            index,
            hasher,
        } = self;
        let h = hasher.hash_one((parent, name));
        index.insert_unique(h, i, |&j| {
            let n = &nodes[j as usize];
            let at = n.name_at as usize;
            hasher.hash_one((n.parent, &names[at..at + n.name_len as usize]))
        });
        i
    }

    fn key(&self, i: u64) -> Option<Key> {
        let n = self.nodes.get(usize::try_from(i).ok()?)?;
        Some(Key::Path(n.snap, n.parent, Arc::from(self.name(n))))
    }
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
    /// Bytes stored per file inode (for st_blocks), the most recently
    /// asked (a file that fell out is measured again).
    stored: Mutex<lru::LruCache<u64, u64>>,
    mount_time_ns: i64,
    /// Format 2 snapshots, read whole on first use (one manifest each).
    flat: Mutex<HashMap<SnapshotId, Arc<Snapshot>>>,
    /// Format 3 snapshots' root lists, read on first use.
    roots: Mutex<HashMap<SnapshotId, List<Entry>>>,
    /// Format 3 entries by inode, the most recently used (memory stays
    /// bounded whatever the snapshot's size; an entry that fell out is
    /// looked up again by its path).
    entries: Mutex<lru::LruCache<u64, Arc<Entry>>>,
    /// Listings of the directories read last (readdir comes back with an
    /// offset several times per directory).
    listings: Mutex<lru::LruCache<u64, Listing>>,
    /// A path of each hard-link group met (its `Path` key), to find its
    /// entry again.
    groups: Mutex<HashMap<(SnapshotId, u64), Key>>,
}

/// Entries and listings kept in memory.
const ENTRY_CACHE: usize = 1 << 16;
const LISTING_CACHE: usize = 64;

fn cache<K: std::hash::Hash + Eq, V>(n: usize) -> Mutex<lru::LruCache<K, V>> {
    Mutex::new(lru::LruCache::new(
        std::num::NonZeroUsize::new(n).unwrap_or(std::num::NonZeroUsize::MIN),
    ))
}

/// The value cached for inode `ino` (now the most recently used); a lock
/// that a panic poisoned is a miss, the value read again.
fn cached<V: Clone>(c: &Mutex<lru::LruCache<u64, V>>, ino: u64) -> Option<V> {
    c.lock().ok().and_then(|mut m| m.get(&ino).cloned())
}

/// The type of an entry.
fn entry_type(e: &Entry) -> Type {
    match &e.payload {
        Payload::File(_) => Type::File,
        Payload::Dir(_) => Type::Dir,
        Payload::Symlink(_) => Type::Symlink,
        _ => Type::special(e.mode),
    }
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
            stored: cache(ENTRY_CACHE),
            mount_time_ns: dsync_store::time::now_ns(),
            flat: Mutex::new(HashMap::new()),
            roots: Mutex::new(HashMap::new()),
            entries: cache(ENTRY_CACHE),
            listings: cache(LISTING_CACHE),
            groups: Mutex::new(HashMap::new()),
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
        if let Key::Path(snap, parent, name) = key {
            if let Some(n) = self
                .inodes
                .read()
                .ok()
                .and_then(|i| i.paths.find(*parent, name))
            {
                return PATH_BASE + n;
            }
            return match self.inodes.write() {
                Ok(mut i) => PATH_BASE + i.paths.insert(*snap, *parent, name),
                Err(_) => 0,
            };
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
        let i = self.inodes.read().ok()?;
        match ino.checked_sub(PATH_BASE) {
            Some(n) => i.paths.key(n),
            None => i.by_ino.get(&ino).cloned(),
        }
    }

    /// The path inside its snapshot of a format 3 inode (names joined by
    /// `/`), from the chain of its parents.
    fn path_of(&self, mut ino: u64) -> Option<Vec<u8>> {
        let mut names = Vec::new();
        loop {
            match self.key(ino)? {
                Key::Path(_, parent, name) => {
                    names.push(name);
                    ino = parent;
                }
                Key::Dir(_, None) => break,
                _ => return None,
            }
        }
        let mut p = Vec::new();
        for n in names.iter().rev() {
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(n);
        }
        Some(p)
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
        // The listing's records only: nothing inside a snapshot is read
        // until it is looked at.
        let infos = self.repo.infos()?;
        let Ok(mut st) = self.state.write() else {
            return Ok(());
        };
        st.snaps = infos
            .iter()
            .map(|i| {
                (
                    i.id,
                    SnapMeta {
                        time_ns: i.time_ns,
                        format: i.format,
                    },
                )
            })
            .collect();
        if let Ok(mut f) = self.flat.lock() {
            f.retain(|id, _| st.snaps.contains_key(id));
        }
        if let Ok(mut r) = self.roots.lock() {
            r.retain(|id, _| st.snaps.contains_key(id));
        }
        let mut order: Vec<(SnapshotId, SnapMeta)> =
            st.snaps.iter().map(|(k, v)| (*k, *v)).collect();
        order.sort_by_key(|(id, m)| (m.time_ns, *id));
        let mut root = BTreeMap::new();
        let mut last_of_day: BTreeMap<String, String> = BTreeMap::new();
        let mut latest = None;
        for (id, m) in order {
            let base = dsync_store::time::local(m.time_ns);
            let mut name = base.clone();
            let mut k = 1;
            while root.contains_key(&name) {
                name = format!("{base}.{k}");
                k += 1;
            }
            last_of_day.insert(base[..10.min(base.len())].to_string(), name.clone());
            latest = Some(name.clone());
            root.insert(name, RootEntry::Snap(id));
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

    fn meta(&self, id: SnapshotId) -> Option<SnapMeta> {
        self.state.read().ok()?.snaps.get(&id).copied()
    }

    /// A format 2 snapshot, read whole on first use.
    ///
    /// # Errors
    /// [`Error::NoSuchSnapshot`] when it was forgotten meanwhile; damage
    /// or a failing read as the store reports it.
    fn snap(&self, id: SnapshotId) -> Result<Arc<Snapshot>, Error> {
        if let Some(s) = self.flat.lock().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(s);
        }
        match self.repo.load_snapshot(id) {
            Ok(s) => {
                let s = Arc::new(s);
                if let Ok(mut m) = self.flat.lock() {
                    m.insert(id, s.clone());
                }
                Ok(s)
            }
            Err(e) => {
                crate::log(&format!("snapshot {id}: {e}"));
                Err(forgotten(id, e))
            }
        }
    }

    /// A format 3 snapshot's root list (read again with `fresh`, after a
    /// prune replaced its record).
    ///
    /// # Errors
    /// [`Error::NoSuchSnapshot`] when it was forgotten meanwhile; as
    /// [`browse::root`].
    fn root3(&self, id: SnapshotId, fresh: bool) -> Result<List<Entry>, Error> {
        if !fresh {
            if let Some(r) = self.roots.lock().ok().and_then(|m| m.get(&id).cloned()) {
                return Ok(r);
            }
        }
        let r = browse::root(&self.repo, id).map_err(|e| forgotten(id, e))?;
        if let Ok(mut m) = self.roots.lock() {
            m.insert(id, r.clone());
        }
        Ok(r)
    }

    /// The format 3 entry of inode `ino` (`Path` or `Group`); `None` when
    /// there is none.
    ///
    /// # Errors
    /// A directory list on its path that is damaged or cannot be read;
    /// [`Error::NoSuchSnapshot`] when the snapshot was forgotten meanwhile.
    fn entry(&self, ino: u64) -> Result<Option<Arc<Entry>>, Error> {
        if let Some(e) = cached(&self.entries, ino) {
            return Ok(Some(e));
        }
        let Some(id) = self.inodes.read().ok().and_then(|i| i.snap(ino)) else {
            return Ok(None);
        };
        self.follow(id, || self.load_entry(ino, false))
            .inspect_err(|e| crate::log(&format!("inode {ino}: {e}")))
    }

    /// Runs `read`, a read of format 3 snapshot `id`'s tree through what is
    /// cached of it; when that finds an object gone, a prune replaced the
    /// snapshot's record (store/FORMAT.md, "Readers during prune"): the
    /// record is read again, the entries cached from the old one dropped,
    /// and `read` runs again, following up to [`FOLLOW`] replacements.
    ///
    /// # Errors
    /// [`Error::NoSuchSnapshot`] when the record is gone (the snapshot was
    /// forgotten: ENOENT); the object still missing once the record read
    /// again is the one read before (damage: EIO); what `read` returns.
    fn follow<T>(&self, id: SnapshotId, read: impl Fn() -> Result<T, Error>) -> Result<T, Error> {
        let mut followed = 0;
        loop {
            let e = match read() {
                Err(e) if e.is_not_found() && followed < FOLLOW => e,
                r => return r,
            };
            followed += 1;
            let before = self.roots.lock().ok().and_then(|m| m.get(&id).cloned());
            self.drop_entries(id);
            let now = self.root3(id, true)?;
            // The first time, what failed may have come from an entry
            // cached before the record was read again elsewhere (`open3`, a
            // concurrent lookup): read once more whatever the record says.
            if followed > 1 && before.as_ref() == Some(&now) {
                return Err(e);
            }
        }
    }

    /// Drops the cached entries of snapshot `id` (their lists may point
    /// into a meta pack a prune deleted). Listings stay: they hold names
    /// and keys (paths), which a prune does not change.
    fn drop_entries(&self, id: SnapshotId) {
        let inos: Vec<u64> = match self.entries.lock() {
            Ok(m) => m.iter().map(|(ino, _)| *ino).collect(),
            Err(_) => return,
        };
        let stale: Vec<u64> = match self.inodes.read() {
            Ok(i) => inos
                .into_iter()
                .filter(|&n| i.snap(n) == Some(id))
                .collect(),
            Err(_) => return,
        };
        if let Ok(mut m) = self.entries.lock() {
            for ino in stale {
                m.pop(&ino);
            }
        }
    }

    /// Looks the entry of `ino` up by its path.
    fn load_entry(&self, ino: u64, fresh: bool) -> Result<Option<Arc<Entry>>, Error> {
        let key = match self.key(ino) {
            Some(Key::Group(id, g)) => self
                .groups
                .lock()
                .ok()
                .and_then(|m| m.get(&(id, g)).cloned()),
            k => k,
        };
        let Some(Key::Path(id, parent, name)) = key else {
            return Ok(None);
        };
        let Some(mut path) = self.path_of(parent) else {
            return Ok(None);
        };
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(&name);
        let root = self.root3(id, fresh)?;
        let Some(e) = browse::resolve(&self.repo, &root, &path)? else {
            return Ok(None);
        };
        Ok(Some(self.remember(ino, e)))
    }

    /// Keeps `e` as the entry of `ino` in the entry cache, unless it is a
    /// directory whose list is inline (its children decoded: a cache of
    /// such entries would hold whole subtrees); that one is looked up again
    /// by its path when next needed.
    fn remember(&self, ino: u64, e: Entry) -> Arc<Entry> {
        let e = Arc::new(e);
        let inline = matches!(&e.payload, Payload::Dir(List::Inline(v)) if !v.is_empty());
        if !inline {
            if let Ok(mut m) = self.entries.lock() {
                m.put(ino, e.clone());
            }
        }
        e
    }

    /// The key of entry `e` of directory inode `dir` (format 3), noting a
    /// hard-link group's first path.
    fn key_of(&self, id: SnapshotId, dir: u64, e: &Entry) -> Key {
        let path = Key::Path(id, dir, Arc::from(&e.name[..]));
        if e.link_group != 0 && matches!(e.payload, Payload::File(_)) {
            if let Ok(mut g) = self.groups.lock() {
                g.entry((id, e.link_group)).or_insert(path);
            }
            return Key::Group(id, e.link_group);
        }
        path
    }

    /// The snapshot and list of a format 3 directory inode; `None` when it
    /// is not a directory.
    ///
    /// # Errors
    /// As [`Tree::entry`]; [`Error::NoSuchSnapshot`] when the snapshot was
    /// forgotten meanwhile.
    fn dir3(&self, key: &Key, ino: u64) -> Result<Option<(SnapshotId, List<Entry>)>, Error> {
        match key {
            Key::Dir(id, None) => {
                let root = self
                    .root3(*id, false)
                    .inspect_err(|e| crate::log(&format!("snapshot {id}: {e}")))?;
                Ok(Some((*id, root)))
            }
            Key::Path(id, ..) => match self.entry(ino)?.as_deref().map(|e| &e.payload) {
                Some(Payload::Dir(l)) => Ok(Some((*id, l.clone()))),
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }

    /// A format 3 directory's entries, keyed, their entries cached; `None`
    /// when it is not a directory.
    ///
    /// # Errors
    /// As [`Tree::dir3`], and a page of its list that is damaged or cannot
    /// be read.
    fn list3(&self, key: &Key, ino: u64) -> Result<Option<Listing>, Error> {
        if let Some(l) = cached(&self.listings, ino) {
            return Ok(Some(l));
        }
        let (Key::Dir(id, None) | Key::Path(id, ..)) = key else {
            return Ok(None);
        };
        let read = || {
            let Some((id, list)) = self.dir3(key, ino)? else {
                return Ok(None);
            };
            let mut out = Vec::new();
            browse::for_each(&self.repo, &list, &mut |e| {
                let k = self.key_of(id, ino, &e);
                let t = entry_type(&e);
                let child = self.ino(&k);
                let name = e.name.clone();
                self.remember(child, e);
                out.push((name, k, t));
                Ok(())
            })
            .inspect_err(|e| {
                crate::log(&format!(
                    "snapshot {id} {}: {e}",
                    String::from_utf8_lossy(&self.path_of(ino).unwrap_or_default())
                ))
            })?;
            Ok(Some(out))
        };
        let Some(out) = self.follow(*id, read)? else {
            return Ok(None);
        };
        let out = Arc::new(out);
        if let Ok(mut m) = self.listings.lock() {
            m.put(ino, out.clone());
        }
        Ok(Some(out))
    }

    /// The extended attributes of `ino` (format 3 entries have them);
    /// `None` when there is no such inode.
    ///
    /// # Errors
    /// As [`Tree::entry`].
    pub fn xattrs(&self, ino: u64) -> Result<Option<Xattrs>, Error> {
        match self.key(ino) {
            None => Ok(None),
            Some(Key::Path(..) | Key::Group(..)) => Ok(self.entry(ino)?.map(|e| e.xattrs.clone())),
            Some(_) => Ok(Some(Vec::new())),
        }
    }

    /// The entries of directory `ino`: (name, key, type), in order; `None`
    /// when it is not a directory (or no such inode).
    ///
    /// # Errors
    /// What the snapshot's tree is read with reports: damage, a failing
    /// read, a snapshot forgotten meanwhile.
    pub fn list(&self, ino: u64) -> Result<Option<Listing>, Error> {
        let Some(key) = self.key(ino) else {
            return Ok(None);
        };
        match &key {
            Key::Dir(id, None) | Key::Path(id, ..) => match self.meta(*id) {
                None => return Ok(None),
                Some(m) if m.format >= 3 => return self.list3(&key, ino),
                Some(_) => {}
            },
            _ => {}
        }
        match key {
            Key::Root => {
                let _ = self.refresh(false);
                let st = self.state.read().map_err(poisoned)?;
                Ok(Some(Arc::new(
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
                )))
            }
            Key::Dir(id, dir) => {
                let s = self.snap(id)?;
                let parent = dir.unwrap_or(ROOT);
                Ok(Some(Arc::new(
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
                )))
            }
            _ => Ok(None),
        }
    }

    /// The entry `name` of directory `parent`; `None` when it has none.
    ///
    /// # Errors
    /// As [`Tree::list`]: a list that cannot be read is not taken for one
    /// without `name` (the mount answers EIO, not ENOENT).
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Key>, Error> {
        let Some(key) = self.key(parent) else {
            return Ok(None);
        };
        if key == Key::Root {
            let _ = self.refresh(false);
            let st = self.state.read().map_err(poisoned)?;
            let Ok(name) = std::str::from_utf8(name) else {
                return Ok(None);
            };
            return Ok(st.root.get(name).map(|e| match e {
                RootEntry::Snap(id) => Key::Dir(*id, None),
                RootEntry::Link(_) => Key::RootLink(name.to_string()),
            }));
        }
        if let Key::Dir(id, None) | Key::Path(id, ..) = &key {
            let Some(m) = self.meta(*id) else {
                return Ok(None);
            };
            if m.format >= 3 {
                // One lookup in the directory's list, unless it was listed.
                if let Some(l) = cached(&self.listings, parent) {
                    return Ok(find(&l, name));
                }
                let read = || {
                    let Some((id, list)) = self.dir3(&key, parent)? else {
                        return Ok(None);
                    };
                    let e = browse::lookup(&self.repo, &list, name)
                        .inspect_err(|e| crate::log(&format!("snapshot {id}: {e}")))?;
                    Ok(e.map(|e| (id, e)))
                };
                let Some((id, e)) = self.follow(*id, read)? else {
                    return Ok(None);
                };
                let k = self.key_of(id, parent, &e);
                let child = self.ino(&k);
                if let Ok(mut m) = self.entries.lock() {
                    m.put(child, Arc::new(e));
                }
                return Ok(Some(k));
            }
        }
        Ok(self.list(parent)?.and_then(|l| find(&l, name)))
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
        match self.key(ino) {
            Some(Key::File(id, node)) => {
                let s = self.snap(id)?;
                Ok(Arc::new(VersionReader::open_node(&self.repo, &s, node)?))
            }
            Some(Key::Path(id, ..) | Key::Group(id, _)) => self.open3(id, ino),
            _ => Err(Error::InvalidInput("not a file".into())),
        }
    }

    /// Opens a format 3 file; when what its entry names is gone, a prune
    /// replaced the snapshot's record: its entry is read again from the new
    /// one (FORMAT.md, "Readers during prune").
    fn open3(&self, id: SnapshotId, ino: u64) -> Result<Arc<VersionReader>, Error> {
        let mut entry = self
            .entry(ino)?
            .ok_or_else(|| Error::InvalidInput("no such file".into()))?;
        let mut followed = 0;
        loop {
            let f =
                browse::version(&entry).ok_or_else(|| Error::InvalidInput("not a file".into()))?;
            let what = format!(
                "snapshot {id} file {}",
                String::from_utf8_lossy(&entry.name)
            );
            match VersionReader::open(&self.repo, &f, &what) {
                Err(e) if e.is_not_found() && followed < 8 => {
                    followed += 1;
                    if let Ok(mut m) = self.entries.lock() {
                        m.clear();
                    }
                    if let Ok(mut m) = self.listings.lock() {
                        m.clear();
                    }
                    let again = match self.load_entry(ino, true) {
                        Ok(Some(e)) => e,
                        // Forgotten meanwhile.
                        Ok(None) => return Err(e),
                        Err(e2) if e2.is_not_found() => {
                            return Err(Error::NoSuchSnapshot {
                                spec: id.to_string(),
                            })
                        }
                        Err(e2) => return Err(e2),
                    };
                    if *again == *entry {
                        return Err(e);
                    }
                    entry = again;
                }
                r => return r.map(Arc::new),
            }
        }
    }

    /// Bytes stored for file `ino` (its size when its map cannot be read).
    fn stored_bytes(&self, ino: u64, size: u64) -> u64 {
        if let Some(n) = cached(&self.stored, ino) {
            return n;
        }
        let Ok(r) = self.reader(ino) else { return size };
        let n = r.map().stored_bytes();
        if let Ok(mut m) = self.stored.lock() {
            m.put(ino, n);
        }
        n
    }

    /// The target of a symlink; `None` when `ino` is not one.
    ///
    /// # Errors
    /// As [`Tree::attr`].
    pub fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, Error> {
        match self.key(ino) {
            Some(Key::RootLink(name)) => {
                let _ = self.refresh(false);
                match self.state.read().map_err(poisoned)?.root.get(&name) {
                    Some(RootEntry::Link(t)) => Ok(Some(t.as_bytes().to_vec())),
                    _ => Ok(None),
                }
            }
            Some(Key::NodeLink(id, node)) => {
                match self.snap(id)?.nodes.get(node as usize).map(|n| &n.kind) {
                    Some(NodeKind::Symlink(t)) => Ok(Some(t.clone())),
                    _ => Ok(None),
                }
            }
            Some(Key::Path(..)) => match self.entry(ino)?.as_deref().map(|e| &e.payload) {
                Some(Payload::Symlink(t)) => Ok(Some(t.clone())),
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }

    /// Attributes of `ino`; `None` when there is no such inode (or what it
    /// named is gone).
    ///
    /// # Errors
    /// What the snapshot's tree is read with reports: damage, a failing
    /// read, a snapshot forgotten meanwhile.
    pub fn attr(&self, ino: u64) -> Result<Option<Attr>, Error> {
        let Some(key) = self.key(ino) else {
            return Ok(None);
        };
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
            nlink: 2,
            immutable,
        };
        Ok(match key {
            Key::Root => Some(dir(self.mount_time_ns, false)),
            Key::Dir(id, None) => self.meta(id).map(|m| dir(m.time_ns, true)),
            Key::RootLink(_) => {
                let Some(t) = self.readlink(ino)? else {
                    return Ok(None);
                };
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
                    nlink: 1,
                    immutable: false,
                })
            }
            Key::Dir(id, Some(node)) | Key::File(id, node) | Key::NodeLink(id, node) => {
                let s = self.snap(id)?;
                let Some(n) = s.nodes.get(node as usize) else {
                    return Ok(None);
                };
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
                    // The stored mode: the mount itself is read-only
                    // (MountOption::RO), and `cp -a` or `rsync -a` from it
                    // must copy the mode the file had.
                    mode: n.mode & 0o7777,
                    uid: n.uid,
                    gid: n.gid,
                    mtime_ns: n.mtime_ns,
                    rdev,
                    nlink: if kind == Type::Dir { 2 } else { 1 },
                    immutable: true,
                })
            }
            Key::Path(..) | Key::Group(..) => {
                let Some(e) = self.entry(ino)? else {
                    return Ok(None);
                };
                let kind = entry_type(&e);
                let (size, stored, rdev) = match &e.payload {
                    Payload::File(d) => (d.size, self.stored_bytes(ino, d.size), 0),
                    Payload::Symlink(t) => (t.len() as u64, 0, 0),
                    Payload::CharDevice(r) | Payload::BlockDevice(r) => (0, 0, *r),
                    _ => (0, 0, 0),
                };
                Some(Attr {
                    ino,
                    kind,
                    size,
                    stored,
                    mode: e.mode & 0o7777,
                    uid: e.uid,
                    gid: e.gid,
                    mtime_ns: e.mtime_ns,
                    rdev,
                    nlink: match kind {
                        Type::Dir => 2,
                        _ => u32::try_from(e.nlink.max(1)).unwrap_or(u32::MAX),
                    },
                    immutable: true,
                })
            }
        })
    }
}

/// The key of `name` in listing `l`.
fn find(l: &Listing, name: &[u8]) -> Option<Key> {
    l.iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, k, _)| k.clone())
}

/// A snapshot whose record or manifest is not found was forgotten (a
/// prune or `forget` meanwhile): the mount answers ENOENT for it, and EIO
/// for everything else.
fn forgotten(id: SnapshotId, e: Error) -> Error {
    if e.is_not_found() {
        Error::NoSuchSnapshot {
            spec: id.to_string(),
        }
    } else {
        e
    }
}

/// A lock that a panicking thread left poisoned: the tree cannot be
/// trusted to answer, which is EIO, never ENOENT.
fn poisoned<T>(_: std::sync::PoisonError<T>) -> Error {
    Error::Internal("a lock of the mount's tree was poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_give_one_index_per_parent_and_name_and_their_key_back() {
        let mut p = Paths::default();
        let s = SnapshotId(7);
        let mut given = Vec::new();
        for parent in [2u64, 3, PATH_BASE] {
            for name in [&b"a"[..], b"b", b"", b"\xff/x", b"a"] {
                given.push((parent, name, p.insert(s, parent, name)));
            }
        }
        // "a" twice under each parent: the same index.
        assert_eq!(p.nodes.len(), 12);
        for (parent, name, i) in given {
            assert_eq!(p.find(parent, name), Some(i));
            assert_eq!(p.key(i), Some(Key::Path(s, parent, Arc::from(name))));
        }
        assert_eq!(p.find(4, b"a"), None);
        assert_eq!(p.key(12), None);
        // Many more than the table's first capacity: it grows and rehashes.
        for n in 0..10_000u32 {
            p.insert(s, 9, &n.to_le_bytes());
        }
        for n in 0..10_000u32 {
            let i = p.find(9, &n.to_le_bytes()).expect("found");
            assert_eq!(
                p.key(i),
                Some(Key::Path(s, 9, Arc::from(&n.to_le_bytes()[..])))
            );
        }
    }
}
