//! Ranges a reader announced it will read ([`super::Object::will_read`]),
//! fetched ahead by a backend with latency, many in flight, and handed to
//! the reads as they come. A restore knows every frame it needs before it
//! reads any: announced, they cross in a few large requests in flight
//! together instead of one round trip per frame, and in whatever order the
//! restore's threads then read them.
//!
//! Memory is bounded by [`Planned`]'s cap: a new fetch that would pass it
//! lets the oldest fetches go, those whose every announced range was read
//! first. Fetches are not let go when read: a frame of a later day's
//! changes holds blocks of many places in a file, and each of the reads
//! that need them reads the whole frame again.

use std::sync::{Arc, Condvar, Mutex};

use super::Key;

/// Announced ranges closer than this are fetched as one (the gap is read
/// and thrown away: cheaper than a round trip).
const GAP: u64 = 256 << 10;

/// One fetch's bytes, once they arrive.
#[derive(Default)]
pub(crate) struct Slot {
    value: Mutex<Option<Option<bytes::Bytes>>>,
    ready: Condvar,
}

impl Slot {
    /// Hands the fetched bytes to the readers waiting (`None`: the fetch
    /// failed, and they read the ordinary way, which reports the error).
    pub(crate) fn fill(&self, bytes: Option<bytes::Bytes>) {
        if let Ok(mut v) = self.value.lock() {
            // The first filling counts (see [`Unfilled`]).
            if v.is_none() {
                *v = Some(bytes);
            }
        }
        self.ready.notify_all();
    }

    fn wait(&self) -> Option<bytes::Bytes> {
        let mut v = self.value.lock().ok()?;
        while v.is_none() {
            v = self.ready.wait(v).ok()?;
        }
        v.clone().flatten()
    }
}

/// Held by a fetch until it fills its slot: a fetch dropped before it
/// could (its runtime shut down, its task gone) fills it with a failure
/// as it goes, so that no reader waits for it for ever.
pub(crate) struct Unfilled(pub(crate) Arc<Slot>);

impl Drop for Unfilled {
    fn drop(&mut self) {
        self.0.fill(None);
    }
}

struct Entry {
    key: Key,
    start: u64,
    end: u64,
    /// The ranges announced in `[start, end)` and not read yet.
    unread: Vec<(u64, u64)>,
    slot: Arc<Slot>,
}

/// The fetches announced and not yet read, of all objects of a backend.
pub(crate) struct Planned {
    entries: Mutex<Vec<Entry>>,
    /// Bytes fetched ahead at most at once.
    cap: u64,
    /// The largest single fetch.
    piece: u64,
}

/// A fetch for the backend to start: `[start, end)` of the object, whose
/// bytes go into the slot.
pub(crate) type Fetch = (u64, u64, Arc<Slot>);

impl Planned {
    pub(crate) fn new(cap: u64, piece: u64) -> Planned {
        Planned {
            entries: Mutex::new(Vec::new()),
            cap,
            piece,
        }
    }

    /// Takes note of `ranges` (`[start, end)`, ascending) of object `key`
    /// and returns the fetches to start: near ranges merged, pieces of at
    /// most `piece` bytes, ranges already in flight skipped, nothing past
    /// the cap.
    pub(crate) fn plan(&self, key: &Key, ranges: &[(u64, u64)]) -> Vec<Fetch> {
        let Ok(mut entries) = self.entries.lock() else {
            return Vec::new();
        };
        let mut held: u64 = entries.iter().map(|e| e.end - e.start).sum();
        // A range already fetched is wanted again: not let go before the
        // ranges announced after it.
        let covered = |entries: &mut Vec<Entry>, a: u64, b: u64| {
            let i = entries
                .iter()
                .position(|e| e.key == *key && e.start <= a && b <= e.end);
            if let Some(i) = i {
                let mut e = entries.remove(i);
                e.unread.push((a, b));
                entries.push(e);
            }
            i.is_some()
        };
        let mut out: Vec<Fetch> = Vec::new();
        // The fetch being built: its ranges.
        let mut cur: Vec<(u64, u64)> = Vec::new();
        let mut close = |c: Vec<(u64, u64)>, entries: &mut Vec<Entry>, held: &mut u64| {
            let (Some(&(start, _)), Some(&(_, end))) = (c.first(), c.last()) else {
                return;
            };
            if end - start > self.cap {
                return;
            }
            while *held + (end - start) > self.cap {
                let i = entries
                    .iter()
                    .position(|e| e.unread.is_empty())
                    .unwrap_or(0);
                let e = entries.remove(i);
                *held -= e.end - e.start;
            }
            *held += end - start;
            let slot = Arc::new(Slot::default());
            entries.push(Entry {
                key: key.clone(),
                start,
                end,
                unread: c,
                slot: slot.clone(),
            });
            out.push((start, end, slot));
        };
        for &(a, b) in ranges {
            if b <= a || covered(&mut entries, a, b) {
                continue;
            }
            let joins = match (cur.first(), cur.last()) {
                (Some(&(s, _)), Some(&(_, e))) => a >= e && a - e <= GAP && b - s <= self.piece,
                _ => true,
            };
            if !joins {
                close(std::mem::take(&mut cur), &mut entries, &mut held);
            }
            cur.push((a, b));
        }
        close(cur, &mut entries, &mut held);
        out
    }

    /// Fills `buf` from `offset` of `key` if an announced fetch holds all
    /// of it, waiting for the fetch to arrive; `false` when none does (or
    /// its fetch failed): the caller reads the ordinary way.
    pub(crate) fn read(&self, key: &Key, offset: u64, buf: &mut [u8]) -> bool {
        let end = offset + buf.len() as u64;
        let (start, slot) = {
            let Ok(entries) = self.entries.lock() else {
                return false;
            };
            match entries
                .iter()
                .find(|e| e.key == *key && e.start <= offset && end <= e.end)
            {
                Some(e) => (e.start, e.slot.clone()),
                None => return false,
            }
        };
        let got = slot.wait();
        let Ok(mut entries) = self.entries.lock() else {
            return false;
        };
        let i = entries.iter().position(|e| Arc::ptr_eq(&e.slot, &slot));
        let Some(bytes) = got else {
            if let Some(i) = i {
                entries.remove(i);
            }
            return false;
        };
        let a = (offset - start) as usize;
        let Some(src) = bytes.get(a..a + buf.len()) else {
            return false;
        };
        buf.copy_from_slice(src);
        if let Some(i) = i {
            entries[i]
                .unread
                .retain(|&(a, b)| !(offset <= a && b <= end));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Kind;

    #[test]
    fn near_ranges_merge_far_ones_split_and_the_cap_lets_the_read_go_first() {
        const M: u64 = 1 << 20;
        let k = Key::new(Kind::Pack, "a");
        let p = Planned::new(10 * M, 4 * M);
        let spans = |f: &[Fetch]| f.iter().map(|(a, b, _)| (*a, *b)).collect::<Vec<_>>();
        let f = p.plan(&k, &[(0, 100), (200, 300), (M, M + 10)]);
        assert_eq!(spans(&f), vec![(0, 300), (M, M + 10)]);
        // Already in flight: nothing more.
        assert!(p.plan(&k, &[(10, 20)]).is_empty());
        // Pieces stop at 4 MiB.
        let f = p.plan(&k, &[(8 * M, 11 * M), (11 * M, 13 * M)]);
        assert_eq!(spans(&f), vec![(8 * M, 11 * M), (11 * M, 13 * M)]);
        // One fetch read whole; past the cap, it goes first.
        f[0].2.fill(Some(vec![7u8; 3 << 20].into()));
        let mut buf = vec![0u8; 3 << 20];
        assert!(p.read(&k, 8 * M, &mut buf));
        assert_eq!(
            spans(&p.plan(&k, &[(20 * M, 26 * M)])),
            vec![(20 * M, 26 * M)]
        );
        assert!(
            p.plan(&k, &[(0, 100)]).is_empty(),
            "an unread one is still held"
        );
        assert_eq!(p.plan(&k, &[(8 * M, 9 * M)]).len(), 1, "the read one went");
        // Bigger than the cap: not fetched ahead at all.
        assert!(p.plan(&k, &[(40 * M, 60 * M)]).is_empty());
    }

    #[test]
    fn reads_wait_for_their_fetch_and_a_failed_one_sends_them_the_ordinary_way() {
        let k = Key::new(Kind::Pack, "a");
        let p = Arc::new(Planned::new(1 << 20, 1 << 20));
        let f = p.plan(&k, &[(10, 20), (30, 40)]);
        assert_eq!(f.len(), 1);
        let slot = f[0].2.clone();
        let bytes: bytes::Bytes = (10..40u8).collect::<Vec<u8>>().into();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            slot.fill(Some(bytes));
        });
        let mut buf = [0u8; 10];
        assert!(p.read(&k, 10, &mut buf));
        assert_eq!(buf[0], 10);
        t.join().unwrap();
        assert!(p.read(&k, 30, &mut buf));
        assert_eq!(buf[9], 39);
        // Read again (two reads share a frame): still there.
        assert!(p.read(&k, 30, &mut buf));
        // A failed fetch sends its readers the ordinary way, and so does
        // one dropped before it filled its slot.
        let f = p.plan(&k, &[(0, 8)]);
        f[0].2.fill(None);
        assert!(!p.read(&k, 0, &mut [0u8; 8]));
        let f = p.plan(&k, &[(100, 108)]);
        drop(Unfilled(f[0].2.clone()));
        assert!(!p.read(&k, 100, &mut [0u8; 8]));
        assert!(!p.read(&k, 0, &mut [0u8; 4]), "let go");
    }
}
