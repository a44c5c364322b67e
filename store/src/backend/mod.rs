//! The storage seam: the only code that touches a repository's bytes.
//!
//! Everything above this module (backup, restore, the mount, prune, check)
//! speaks of *objects* named by a [`Key`] (a kind and a name), never of files
//! or paths. A backend stores them: [`LocalBackend`] in a directory of a local
//! file system, [`MemBackend`] in memory (tests, with fault injection), and
//! later a remote `dsync serve` and an S3 bucket.
//!
//! The contract is what an object store can give, so that every backend can
//! keep it:
//!
//! - **Objects are written once** under fresh random names and never modified
//!   afterwards ([`Backend::create`], [`Backend::put`]). Until something that
//!   readers follow names them, they are garbage if the writer dies.
//! - **Durability is explicit.** Bytes written by `create`/`put` are durable
//!   only after [`Backend::sync`] returns; [`Backend::commit`] and
//!   [`Backend::remove`] are durable when they return. A writer therefore
//!   writes its data, calls `sync`, and only then commits what names it.
//! - **The commit is one create-if-absent** of one object
//!   ([`Backend::commit`]): locally a link of a fsynced temporary file, on S3 a
//!   conditional PUT. Nothing is ever renamed over anything else.
//! - **Reads are by range** ([`Object::read_at`]) of an object opened once
//!   ([`Backend::open`]); whole small objects are read with [`Backend::read`],
//!   many at once with [`Backend::read_many`] (a slow backend keeps the
//!   requests in flight together).
//! - **Listing gives sizes** ([`Backend::list`]), so accounting (du, prune's
//!   report) needs no request per object.
//! - **Deletion** ([`Backend::remove`]) is done by prune only, in batches.
//! - **One writer at a time** ([`Backend::lock`]): locally an flock that the
//!   kernel releases when its holder dies.
//!
//! A missing object is an [`Error::Io`] whose source is
//! [`std::io::ErrorKind::NotFound`] ([`Error::is_not_found`]): readers that
//! race a prune use it to tell "replaced" from "damaged".

pub(crate) mod ahead;
mod local;
mod mem;
pub(crate) mod planned;
pub mod s3;
#[cfg(test)]
mod s3_faults;

use std::path::PathBuf;
use std::sync::Arc;

pub use local::LocalBackend;
pub use mem::MemBackend;
pub use s3::{S3Backend, S3Url};

use crate::delta::signature::PageBytes;
use crate::error::Result;
use crate::id::{MapId, MetaId, PackId, SigId, SnapshotId};

/// What an object is. Each kind lives in its own namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The repository's parameters (one object, named `config`).
    Config,
    /// Compressed literal bytes in frames.
    Pack,
    /// Signature pages.
    Sig,
    /// One file version's extent map.
    Map,
    /// A snapshot's manifest.
    Snapshot,
    /// Format 3's metadata blobs (a pack of them).
    Meta,
}

impl Kind {
    /// Every kind of object that holds repository data (not the config).
    pub const DATA: [Kind; 5] = [Kind::Pack, Kind::Sig, Kind::Map, Kind::Snapshot, Kind::Meta];

    /// The directory of this kind's objects in the layout (FORMAT.md,
    /// "Layout"); empty for the config, which sits at the top.
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Config => "",
            Kind::Pack => "packs",
            Kind::Sig => "sigs",
            Kind::Map => "maps",
            Kind::Snapshot => "snapshots",
            Kind::Meta => "meta",
        }
    }

    /// The file-name suffix of this kind's objects.
    pub fn suffix(self) -> &'static str {
        match self {
            Kind::Config => "",
            Kind::Pack => ".pack",
            Kind::Sig => ".sig",
            Kind::Map => ".map",
            Kind::Snapshot => ".snap",
            Kind::Meta => ".meta",
        }
    }
}

/// Names one object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: Kind,
    /// The object's name within its kind (16 hex digits for ids).
    pub name: String,
}

impl Key {
    pub fn new(kind: Kind, name: impl Into<String>) -> Key {
        Key {
            kind,
            name: name.into(),
        }
    }
    pub fn config() -> Key {
        Key::new(Kind::Config, "config")
    }
    pub fn pack(id: PackId) -> Key {
        Key::new(Kind::Pack, id.to_string())
    }
    pub fn sig(id: SigId) -> Key {
        Key::new(Kind::Sig, id.to_string())
    }
    pub fn map(id: MapId) -> Key {
        Key::new(Kind::Map, id.to_string())
    }
    pub fn snapshot(id: SnapshotId) -> Key {
        Key::new(Kind::Snapshot, id.to_string())
    }
    pub fn meta(id: MetaId) -> Key {
        Key::new(Kind::Meta, id.to_string())
    }

    /// The key whose [`Key::path`] `path` is, if it names one.
    pub fn parse(path: &str) -> Option<Key> {
        if path == "config" {
            return Some(Key::config());
        }
        let (dir, file) = path.split_once('/')?;
        Kind::DATA.into_iter().find_map(|kind| {
            let name = file.strip_suffix(kind.suffix())?;
            (kind.dir() == dir && !name.is_empty() && !name.contains('/'))
                .then(|| Key::new(kind, name))
        })
    }

    /// The object's path relative to the repository's root
    /// (`packs/<id>.pack`): what error messages and `check` name, and the
    /// key an object store uses.
    pub fn path(&self) -> String {
        if self.kind == Kind::Config {
            return self.name.clone();
        }
        format!("{}/{}{}", self.kind.dir(), self.name, self.kind.suffix())
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.path())
    }
}

/// An object opened for reading by range.
pub trait Object: Send + Sync {
    /// The object's length in bytes.
    fn len(&self) -> u64;
    /// True for an object of no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset`.
    ///
    /// # Errors
    /// [`crate::Error::Io`], an `UnexpectedEof` one when the range runs past
    /// the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Says that `ranges` (`[start, end)`, ascending) will be read soon,
    /// in any order: a backend with latency fetches them ahead, many in
    /// flight, and the reads take them from there. Only a hint: reads of
    /// ranges not announced, or announced beyond what the backend keeps,
    /// are read as always.
    fn will_read(&self, ranges: &[(u64, u64)]) {
        let _ = ranges;
    }
}

/// A new object being written by appends ([`Backend::create`]).
pub trait ObjectWriter: Send {
    /// Appends `bytes`.
    ///
    /// # Errors
    /// [`crate::Error::Io`] (a full disk among them).
    fn append(&mut self, bytes: &[u8]) -> Result<()>;
    /// Bytes appended so far.
    fn len(&self) -> u64;
    /// True before the first byte is appended.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Completes the object. Durable after the next [`Backend::sync`].
    ///
    /// # Errors
    /// [`crate::Error::Io`].
    fn finish(self: Box<Self>) -> Result<()>;
}

/// A prune's mark on a backend that defers removal
/// ([`Backend::removal_grace`]): objects it found unreferenced, which a
/// later prune removes if they still are once the mark is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub name: String,
    pub keys: Vec<Key>,
    /// Older than the grace.
    pub due: bool,
}

/// Held by the one writer of a repository; dropping it releases the lock.
pub struct LockGuard {
    /// What releases the lock when dropped.
    pub(crate) _inner: Box<dyn Send>,
    /// The record of a writer that died holding the lock, if one did.
    pub took_over: Option<String>,
}

/// Where a repository's objects are stored. See the module documentation
/// for the contract every method keeps.
pub trait Backend: Send + Sync {
    /// Where the repository is, for messages (a path, later a URL).
    fn location(&self) -> PathBuf;

    /// Reads a whole object.
    ///
    /// # Errors
    /// [`crate::Error::Io`] (NotFound when it does not exist).
    fn read(&self, key: &Key) -> Result<Vec<u8>>;

    /// Reads many whole objects; results in the order of `keys`. A backend
    /// with latency keeps the requests in flight together.
    fn read_many(&self, keys: &[Key]) -> Vec<Result<Vec<u8>>> {
        keys.iter().map(|k| self.read(k)).collect()
    }

    /// Opens an object for reads by range. An object opened before a prune
    /// removed it may stay readable (locally, an open file does).
    ///
    /// # Errors
    /// [`crate::Error::Io`].
    fn open(&self, key: &Key) -> Result<Arc<dyn Object>>;

    /// As [`Backend::open`] for an object whose length the caller knows
    /// (from a copy it keeps): a backend with latency may skip asking for
    /// it, and then reports a missing object at the first read instead.
    ///
    /// # Errors
    /// As [`Backend::open`].
    fn open_sized(&self, key: &Key, len: u64) -> Result<Arc<dyn Object>> {
        let _ = len;
        self.open(key)
    }

    /// A whole object as shared bytes that stay valid while held: the local
    /// backend maps the file (signatures are read this way, page by page).
    ///
    /// # Errors
    /// [`crate::Error::Io`].
    fn bytes(&self, key: &Key) -> Result<PageBytes> {
        Ok(Arc::new(self.read(key)?))
    }

    /// The names and sizes of every object of `kind`, in no order.
    ///
    /// # Errors
    /// [`crate::Error::Io`].
    fn list(&self, kind: Kind) -> Result<Vec<(String, u64)>>;

    /// Starts a new object written by appends. `key` must be fresh (the
    /// writer never reuses a name); the object is durable only after
    /// [`ObjectWriter::finish`] and then [`Backend::sync`].
    ///
    /// # Errors
    /// [`crate::Error::Io`], AlreadyExists when `key` is taken.
    fn create(&self, key: &Key) -> Result<Box<dyn ObjectWriter>>;

    /// Writes a new object whole. Durable after the next [`Backend::sync`].
    ///
    /// # Errors
    /// As [`Backend::create`].
    fn put(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        let mut w = self.create(key)?;
        w.append(bytes)?;
        w.finish()
    }

    /// Makes every object this handle finished or put so far durable: the
    /// barrier before a commit that names them.
    ///
    /// # Errors
    /// [`crate::Error::Io`]: then nothing written since the last sync may be
    /// relied on.
    fn sync(&self) -> Result<()>;

    /// Creates `key` holding `bytes` if no object has that key, atomically:
    /// readers see all of it or nothing. Durable when it returns. The commit
    /// point of a snapshot.
    ///
    /// # Errors
    /// [`crate::Error::Io`], AlreadyExists when the key is taken.
    fn commit(&self, key: &Key, bytes: &[u8]) -> Result<()>;

    /// Replaces an existing object atomically (readers see the old or the
    /// new bytes). Only format 2's repack uses it, for manifests; durable
    /// when it returns.
    ///
    /// # Errors
    /// [`crate::Error::Io`].
    fn replace(&self, key: &Key, bytes: &[u8]) -> Result<()>;

    /// Deletes objects (missing ones are not an error). Durable when it
    /// returns.
    ///
    /// # Errors
    /// [`crate::Error::Io`].
    fn remove(&self, keys: &[Key]) -> Result<()>;

    /// How long the objects a prune finds unreferenced stay, marked, before
    /// a later prune removes them; `None` (the default) removes them at
    /// once. A backend without flock defers: a writer whose lock went
    /// stale may still reference them, and a reader may still read them
    /// (an S3 object cannot be held open as a local file can).
    fn removal_grace(&self) -> Option<std::time::Duration> {
        None
    }

    /// Records `keys` in a new mark; durable when it returns.
    ///
    /// # Errors
    /// [`crate::Error::Io`]; [`crate::Error::Internal`] where removal is not
    /// deferred.
    fn mark(&self, keys: &[Key]) -> Result<()> {
        let _ = keys;
        Err(crate::Error::Internal(
            "this backend removes at once".into(),
        ))
    }

    /// Every mark, each saying whether it is due.
    ///
    /// # Errors
    /// [`crate::Error::Io`], [`crate::Error::Corrupt`] for an unreadable one.
    fn marks(&self) -> Result<Vec<Mark>> {
        Ok(Vec::new())
    }

    /// Removes a mark (after its objects went).
    ///
    /// # Errors
    /// [`crate::Error::Io`].
    fn unmark(&self, name: &str) -> Result<()> {
        let _ = name;
        Ok(())
    }

    /// Cleans up what writers that stopped midway left in the backend
    /// outside any object (S3: multipart uploads begun and never completed,
    /// whose parts the server keeps, and bills, until they are aborted).
    /// Called by prune, which holds the writer lock, so that no other live
    /// writer can be midway. Returns how many were cleaned up.
    ///
    /// # Errors
    /// [`crate::Error::Io`].
    fn clean_interrupted(&self) -> Result<usize> {
        Ok(0)
    }

    /// Takes the writer lock, or fails at once naming its holder.
    ///
    /// # Errors
    /// [`crate::Error::Locked`], [`crate::Error::Io`].
    fn lock(&self) -> Result<LockGuard>;

    /// A directory on the repository's file system for large temporary
    /// files that are not repository objects (an import's working copies),
    /// when the backend has one.
    fn scratch_dir(&self) -> Option<PathBuf> {
        None
    }

    /// A directory on this machine where the client keeps what it knows of
    /// the repository (a remote repository's cache), when there is one.
    fn client_dir(&self) -> Option<PathBuf> {
        None
    }
}

/// What a lock holder records of itself: host, pid and since when.
pub(crate) fn holder_record() -> String {
    format!(
        "host={} pid={} since={}\n",
        crate::repo::hostname(),
        std::process::id(),
        crate::time::local(crate::time::now_ns())
    )
}

#[cfg(test)]
mod tests;
