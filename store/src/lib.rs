//! dsync's repository: the delta engine, packs, extent maps, snapshots, and the
//! backup, restore and read paths over them. It knows nothing of the command
//! line or of FUSE. store/FORMAT.md specifies every byte it writes.

pub mod backend;
pub(crate) mod backup;
pub mod browse;
pub(crate) mod check;
pub mod copy;
pub mod delta;
pub mod error;
pub mod exclude;
pub mod format;
pub mod gc;
pub mod id;
pub mod inspect;
pub(crate) mod map;
pub(crate) mod meta;
pub mod pack;
pub(crate) mod pipeline;
pub mod prune;
pub(crate) mod read;
pub mod remote;
pub(crate) mod repo;
pub(crate) mod restore;
pub(crate) mod source;
pub mod sync;
pub mod testdata;
pub mod time;
pub(crate) mod tree3;

pub use backup::{
    backup, backup_stream, BackupOptions, BackupReport, FileReport, FileStatus, NoProgress,
    Progress, TreeStats,
};
pub use check::{check, CheckOptions, CheckReport, Problem};
pub use error::{Error, Result};
pub use format::snapshot::{FileVersion, Node, NodeKind, Snapshot};
pub use id::{MapId, PackId, SigId, SnapshotId};
pub use map::FileMap;
pub use read::VersionReader;
pub use repo::{Repo, DEFAULT_CACHE};
pub use restore::{cat, open_path, restore, restore_with, RestoreOptions, RestoreReport};
