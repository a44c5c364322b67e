pub mod error;
pub mod format;
pub mod id;
pub use error::{Error, Result};
