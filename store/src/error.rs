//! The one error type of the store. Each variant carries what a user needs to
//! act on it: which file, which object, which byte.

use std::path::PathBuf;

/// Errors returned by every fallible function of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// Bytes in the repository that fail a checksum or do not decode.
    #[error("{object} is damaged at byte {offset}: {detail}")]
    Corrupt {
        /// Which object: a path inside the repository, or a frame of a pack.
        object: String,
        /// Byte offset inside that object where the problem was seen.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The repository was written by a newer dsync.
    #[error("{path}: format version {found} is newer than this dsync supports (version {supported}); upgrade dsync")]
    UnsupportedVersion {
        /// The file whose version was read.
        path: PathBuf,
        /// The version found on disk.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The path exists but holds no repository.
    #[error("{path} is not a dsync repository (no config file); create one with `dsync init`")]
    NotARepository {
        /// The path given as the repository.
        path: PathBuf,
    },
    /// Another process holds the writer lock.
    #[error("repository {path} is locked by another writer ({holder})")]
    Locked {
        /// The repository.
        path: PathBuf,
        /// What the lock file says of its holder.
        holder: String,
    },
    /// A snapshot name matched nothing.
    #[error("no snapshot matches {spec:?} (see `dsync list`)")]
    NoSuchSnapshot {
        /// What the user gave.
        spec: String,
    },
    /// A snapshot name matched more than one snapshot.
    #[error("{spec:?} matches {count} snapshots; give more of the id")]
    AmbiguousSnapshot {
        /// What the user gave.
        spec: String,
        /// How many snapshots it matched.
        count: usize,
    },
    /// A path that is not in a snapshot.
    #[error("{path:?} is not in snapshot {snapshot}")]
    NoSuchPath {
        /// The path asked for.
        path: String,
        /// The snapshot searched.
        snapshot: String,
    },
    /// A source file changed while it was read, so the stored version would not be
    /// one the file ever had.
    #[error(
        "{path} changed while it was read ({detail}); run the backup again when it is quiescent"
    )]
    SourceChanged {
        /// The source file.
        path: PathBuf,
        /// What differed between before and after.
        detail: String,
    },
    /// Anything else the caller got wrong.
    #[error("{0}")]
    InvalidInput(String),
    /// A broken invariant of dsync itself (a bug), never the user's input.
    #[error("internal error (a bug in dsync, please report it): {0}")]
    Internal(String),
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Corrupt`].
    pub fn corrupt(object: impl Into<String>, offset: u64, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            object: object.into(),
            offset,
            detail: detail.into(),
        }
    }

    /// True when the error means repository damage (as opposed to bad input or a
    /// failing disk): the CLI maps it to its own exit code, the mount to EIO.
    pub fn is_damage(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }

    /// True when an object (or file) does not exist: a reader that raced a
    /// prune tells "replaced" from "damaged" by it.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    /// True when a create-if-absent found the key taken.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists)
    }
}

/// Adds a path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
