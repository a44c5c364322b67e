//! dsync's repository: the delta engine, packs, extent maps, snapshots, and the
//! backup, restore and read paths over them. It knows nothing of the command
//! line or of FUSE. store/FORMAT.md specifies every byte it writes.

pub mod backend;
pub mod backup;
pub mod check;
pub mod delta;
pub mod error;
pub mod format;
pub mod gc;
pub mod id;
pub mod inspect;
pub mod map;
pub(crate) mod meta;
pub mod pack;
pub(crate) mod pipeline;
pub mod prune;
pub mod read;
pub mod repo;
pub mod restore;
pub mod testdata;
pub mod time;
pub(crate) mod tree3;

pub use backup::{
    backup, backup_stream, BackupOptions, BackupReport, FileReport, NoProgress, Progress,
};
pub use check::{check, CheckOptions, CheckReport, Problem};
pub use error::{Error, Result};
pub use format::snapshot::{FileVersion, Node, NodeKind, Snapshot};
pub use id::{MapId, PackId, SigId, SnapshotId};
pub use read::VersionReader;
pub use repo::Repo;
pub use restore::{cat, restore, RestoreReport};
