//! Bytes read ahead for sequential readers of a backend with latency (a
//! remote repository, an S3 bucket): a read that starts where an earlier
//! read of the same object ended fetches [`READ_AHEAD`] bytes at once (the
//! backend fetches them in pieces in flight together), and the next reads
//! are served from them. A restore reads a pack frame by frame (32 KiB
//! each): without this, one round trip each. Random reads (a VM through the
//! mount) fetch only what they ask for.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::Key;
use crate::error::{Error, Result};

/// The windows read ahead and where recent reads ended, shared by all
/// objects of a backend.
#[derive(Default)]
pub(crate) struct Ahead {
    /// Bytes a sequential read fetches ([`READ_AHEAD`] when 0).
    window: u64,
    /// (object, start, bytes), the most recent last.
    windows: VecDeque<(Key, u64, Arc<Vec<u8>>)>,
    /// Where recent reads ended, the most recent last.
    ends: VecDeque<(Key, u64)>,
}

/// Bytes one sequential read fetches ahead, and the size of the pieces a
/// backend fetches them in.
pub(crate) const READ_AHEAD: u64 = 8 << 20;
pub(crate) const AHEAD_PIECE: u64 = 512 << 10;
/// Windows kept (at most 64 MiB), and read ends remembered.
const AHEAD_WINDOWS: usize = 8;
const AHEAD_ENDS: usize = 64;

impl Ahead {
    /// Windows of `window` bytes instead of [`READ_AHEAD`].
    pub(crate) fn with_window(window: u64) -> Ahead {
        Ahead {
            window,
            ..Ahead::default()
        }
    }

    /// Fills `buf` from a window that holds all of it.
    fn read(&self, key: &Key, offset: u64, buf: &mut [u8]) -> bool {
        let end = offset + buf.len() as u64;
        for (k, start, bytes) in self.windows.iter().rev() {
            if k == key && *start <= offset && end <= start + bytes.len() as u64 {
                let a = (offset - start) as usize;
                buf.copy_from_slice(&bytes[a..a + buf.len()]);
                return true;
            }
        }
        false
    }

    /// Whether a read at `offset` continues an earlier one.
    fn follows(&self, key: &Key, offset: u64) -> bool {
        self.ends.iter().any(|(k, e)| *e == offset && k == key)
    }

    fn ended(&mut self, key: &Key, end: u64) {
        if self.ends.len() >= AHEAD_ENDS {
            self.ends.pop_front();
        }
        self.ends.push_back((key.clone(), end));
    }

    fn keep(&mut self, key: &Key, start: u64, bytes: Arc<Vec<u8>>) {
        if self.windows.len() >= AHEAD_WINDOWS {
            self.windows.pop_front();
        }
        self.windows.push_back((key.clone(), start, bytes));
    }
}

/// Fills `buf` from `offset` of object `key` (`len` bytes long): from a
/// window read ahead, else by `fetch` (offset, bytes to fill), fetching a
/// whole window when the read continues an earlier one.
///
/// # Errors
/// What `fetch` returns.
pub(crate) fn read_through(
    ahead: &Mutex<Ahead>,
    key: &Key,
    len: u64,
    offset: u64,
    buf: &mut [u8],
    fetch: impl Fn(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let n = buf.len() as u64;
    let lock = || {
        ahead
            .lock()
            .map_err(|_| Error::Internal("a reader panicked".into()))
    };
    let (sequential, window) = {
        let mut a = lock()?;
        if a.read(key, offset, buf) {
            a.ended(key, offset + n);
            return Ok(());
        }
        let window = if a.window == 0 { READ_AHEAD } else { a.window };
        (a.follows(key, offset), window)
    };
    let want = if sequential {
        n.max(window).min(len.saturating_sub(offset)).max(n)
    } else {
        n
    };
    if want > n {
        let mut bytes = vec![0u8; want as usize];
        fetch(offset, &mut bytes)?;
        buf.copy_from_slice(&bytes[..buf.len()]);
        let mut a = lock()?;
        a.keep(key, offset, Arc::new(bytes));
        a.ended(key, offset + n);
    } else {
        fetch(offset, buf)?;
        lock()?.ended(key, offset + n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Kind;

    /// Only a read that continues an earlier one reads ahead, and the
    /// window serves reads it holds whole, of its own object only.
    #[test]
    fn read_ahead_follows_sequential_reads_only() {
        let (a, b) = (Key::new(Kind::Pack, "a"), Key::new(Kind::Pack, "b"));
        let mut ahead = Ahead::default();
        assert!(!ahead.follows(&a, 100));
        ahead.ended(&a, 100);
        assert!(ahead.follows(&a, 100));
        assert!(!ahead.follows(&b, 100) && !ahead.follows(&a, 99));
        ahead.keep(&a, 100, Arc::new((0..=255u8).collect()));
        let mut buf = [0u8; 4];
        assert!(ahead.read(&a, 110, &mut buf));
        assert_eq!(buf, [10, 11, 12, 13]);
        assert!(!ahead.read(&b, 110, &mut buf));
        assert!(!ahead.read(&a, 354, &mut buf), "past the window's end");
        assert!(!ahead.read(&a, 98, &mut buf), "before its start");
        for i in 0..AHEAD_WINDOWS as u64 {
            ahead.keep(&b, 1000 * i, Arc::new(vec![0; 8]));
        }
        assert!(!ahead.read(&a, 110, &mut buf), "the oldest window went");
    }
}
