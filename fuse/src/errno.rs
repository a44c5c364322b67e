//! The one place that maps store errors to errno values.

use dsync_store::Error;
use fuser::Errno;

/// Damage and anything unexpected is EIO: a read fails rather than return a
/// byte that may be wrong.
pub fn errno(e: &Error) -> Errno {
    match e {
        Error::NoSuchPath { .. } | Error::NoSuchSnapshot { .. } => Errno::ENOENT,
        Error::Io { source, .. } => match source.raw_os_error() {
            Some(code) if code == libc::ENOENT || code == libc::EACCES || code == libc::EPERM => {
                Errno::EIO
            }
            Some(code) => Errno::from_i32(code),
            None => Errno::EIO,
        },
        _ => Errno::EIO,
    }
}
