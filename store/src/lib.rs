//! dsync's repository: the delta engine, packs, extent maps, snapshots, and the
//! backup, restore and read paths over them. It knows nothing of the command
//! line or of FUSE. store/FORMAT.md specifies every byte it writes.

pub mod delta;
pub mod error;
pub mod format;
pub mod id;

pub use error::{Error, Result};
