//! A repository in memory, for fast tests, with fault injection.
//!
//! It keeps the same contract as the local backend and tracks durability:
//! an object finished or put is *written* but not *durable* until the next
//! [`Backend::sync`]; commits, replacements and removals are durable when
//! they return. [`MemBackend::crash`] gives what a machine would find after
//! a power cut at that moment: only durable objects (and the parts of objects
//! being written are gone with them).
//!
//! Faults: [`MemBackend::fail_after`] lets `n` more mutating calls (create,
//! append, finish, put, sync, commit, replace, remove) succeed and fails every
//! one after that, as a process killed between two writes would stop; the
//! crash-point tests then take [`MemBackend::crash`] and check that every
//! snapshot still reads.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Backend, Key, Kind, LockGuard, Object, ObjectWriter};
use crate::error::{Error, Result};

#[derive(Clone)]
struct Stored {
    bytes: Arc<Vec<u8>>,
    durable: bool,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Stored>,
    /// Mutating calls that may still succeed; `None` is no limit.
    budget: Option<u64>,
    /// Mutating calls made so far.
    writes: u64,
    locked: bool,
}

/// An in-memory repository. Cloning gives another handle on the same store.
#[derive(Clone, Default)]
pub struct MemBackend {
    state: Arc<Mutex<State>>,
}

fn not_found(key: &Key) -> Error {
    Error::io(
        key.path(),
        std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"),
    )
}

impl MemBackend {
    pub fn new() -> MemBackend {
        MemBackend::default()
    }

    fn state(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::Internal("memory backend poisoned".into()))
    }

    /// Counts one mutating call, failing it when the budget is spent.
    fn write_call(&self, st: &mut State, what: &Key) -> Result<()> {
        st.writes += 1;
        match &mut st.budget {
            Some(0) => Err(Error::io(
                what.path(),
                std::io::Error::other("injected fault: the writer stopped here"),
            )),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Creates `key` if absent (one mutating call): what put and commit
    /// share; `durable` says whether a crash keeps it.
    fn insert_new(&self, key: &Key, bytes: &[u8], durable: bool) -> Result<()> {
        let mut st = self.state()?;
        self.write_call(&mut st, key)?;
        if st.objects.contains_key(key) {
            return Err(Error::io(
                key.path(),
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        st.objects.insert(
            key.clone(),
            Stored {
                bytes: Arc::new(bytes.to_vec()),
                durable,
            },
        );
        Ok(())
    }

    /// Lets `n` more mutating calls succeed and fails all later ones.
    pub fn fail_after(&self, n: u64) {
        if let Ok(mut st) = self.state() {
            st.budget = Some(n);
        }
    }

    /// Removes the fault limit.
    pub fn heal(&self) {
        if let Ok(mut st) = self.state() {
            st.budget = None;
        }
    }

    /// Mutating calls made so far (to size [`MemBackend::fail_after`]).
    pub fn writes(&self) -> u64 {
        self.state().map(|s| s.writes).unwrap_or(0)
    }

    /// What survives a power cut now: the durable objects only, in a new
    /// store, unlocked and without faults.
    pub fn crash(&self) -> MemBackend {
        let objects = self
            .state()
            .map(|s| {
                s.objects
                    .iter()
                    .filter(|(_, o)| o.durable)
                    .map(|(k, o)| (k.clone(), o.clone()))
                    .collect()
            })
            .unwrap_or_default();
        MemBackend {
            state: Arc::new(Mutex::new(State {
                objects,
                ..State::default()
            })),
        }
    }

    /// Overwrites an object's bytes in place, as damage would (tests only:
    /// nothing in the store modifies an object).
    pub fn damage(&self, key: &Key, f: impl FnOnce(&mut Vec<u8>)) {
        if let Ok(mut st) = self.state() {
            if let Some(o) = st.objects.get_mut(key) {
                let mut b = (*o.bytes).clone();
                f(&mut b);
                o.bytes = Arc::new(b);
            }
        }
    }

    /// Every key stored now.
    pub fn keys(&self) -> Vec<Key> {
        self.state()
            .map(|s| s.objects.keys().cloned().collect())
            .unwrap_or_default()
    }
}

struct MemObject {
    bytes: Arc<Vec<u8>>,
    path: String,
}

impl Object for MemObject {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= self.bytes.len() as u64 => {
                buf.copy_from_slice(&self.bytes[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(Error::io(
                self.path.clone(),
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end"),
            )),
        }
    }
}

struct MemWriter {
    backend: MemBackend,
    key: Key,
    buf: Vec<u8>,
}

impl ObjectWriter for MemWriter {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        let mut st = self.backend.state()?;
        self.backend.write_call(&mut st, &self.key)?;
        self.buf.extend_from_slice(bytes);
        // Visible (as a file being written is) but not durable.
        st.objects.insert(
            self.key.clone(),
            Stored {
                bytes: Arc::new(self.buf.clone()),
                durable: false,
            },
        );
        Ok(())
    }
    fn len(&self) -> u64 {
        self.buf.len() as u64
    }
    fn finish(self: Box<Self>) -> Result<()> {
        let mut st = self.backend.state()?;
        self.backend.write_call(&mut st, &self.key)?;
        st.objects.insert(
            self.key,
            Stored {
                bytes: Arc::new(self.buf),
                durable: false,
            },
        );
        Ok(())
    }
}

impl Backend for MemBackend {
    fn location(&self) -> PathBuf {
        PathBuf::from("memory")
    }

    fn read(&self, key: &Key) -> Result<Vec<u8>> {
        let st = self.state()?;
        st.objects
            .get(key)
            .map(|o| (*o.bytes).clone())
            .ok_or_else(|| not_found(key))
    }

    fn open(&self, key: &Key) -> Result<Arc<dyn Object>> {
        let st = self.state()?;
        let o = st.objects.get(key).ok_or_else(|| not_found(key))?;
        Ok(Arc::new(MemObject {
            bytes: o.bytes.clone(),
            path: key.path(),
        }))
    }

    fn bytes(&self, key: &Key) -> Result<crate::delta::signature::PageBytes> {
        let st = self.state()?;
        let o = st.objects.get(key).ok_or_else(|| not_found(key))?;
        Ok(o.bytes.clone())
    }

    fn list(&self, kind: Kind) -> Result<Vec<(String, u64)>> {
        let st = self.state()?;
        Ok(st
            .objects
            .iter()
            .filter(|(k, _)| k.kind == kind)
            .map(|(k, o)| (k.name.clone(), o.bytes.len() as u64))
            .collect())
    }

    fn create(&self, key: &Key) -> Result<Box<dyn ObjectWriter>> {
        // Visible at once, empty, as a file being written is.
        self.insert_new(key, &[], false)?;
        Ok(Box::new(MemWriter {
            backend: self.clone(),
            key: key.clone(),
            buf: Vec::new(),
        }))
    }

    fn put(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        self.insert_new(key, bytes, false)
    }

    fn sync(&self) -> Result<()> {
        let mut st = self.state()?;
        self.write_call(&mut st, &Key::new(Kind::Config, "sync"))?;
        for o in st.objects.values_mut() {
            o.durable = true;
        }
        Ok(())
    }

    fn commit(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        self.insert_new(key, bytes, true)
    }

    fn replace(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        let mut st = self.state()?;
        self.write_call(&mut st, key)?;
        st.objects.insert(
            key.clone(),
            Stored {
                bytes: Arc::new(bytes.to_vec()),
                durable: true,
            },
        );
        Ok(())
    }

    fn remove(&self, keys: &[Key]) -> Result<()> {
        let mut st = self.state()?;
        for k in keys {
            self.write_call(&mut st, k)?;
            st.objects.remove(k);
        }
        Ok(())
    }

    fn lock(&self) -> Result<LockGuard> {
        let mut st = self.state()?;
        if st.locked {
            return Err(Error::Locked {
                path: self.location(),
                holder: "another handle of this memory repository".into(),
            });
        }
        st.locked = true;
        Ok(LockGuard {
            _inner: Box::new(MemLock {
                backend: self.clone(),
            }),
            took_over: None,
        })
    }
}

struct MemLock {
    backend: MemBackend,
}

impl Drop for MemLock {
    fn drop(&mut self) {
        if let Ok(mut st) = self.backend.state.lock() {
            st.locked = false;
        }
    }
}
