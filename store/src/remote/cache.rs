//! The client's cache of a remote repository's immutable objects: meta
//! packs (format 3's lists, maps and signature pages), signature files and
//! maps (format 2). Such an object is written once under a fresh random
//! name and never changed, so a cached copy is never stale: what a backup
//! wrote is kept as it is sent (the next night's backup reads the
//! previous version's signature from here, not over the wire), and what
//! is read is kept for the next reader.
//!
//! Where: `$DSYNC_CACHE_DIR`, else `$XDG_CACHE_HOME/dsync`, else
//! `~/.cache/dsync`; one directory per repository id. A prune through this
//! client removes its cached copies; others only cost space.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{Backend, Key, Kind, LockGuard, Object, ObjectWriter};
use crate::error::{Error, Result};

/// The cache directory of repository `repo_id`, if a home is known.
pub fn dir_for(repo_id: u64) -> Option<PathBuf> {
    let base = std::env::var_os("DSYNC_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("dsync")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/dsync")))?;
    Some(base.join(format!("{repo_id:016x}")))
}

/// A backend whose immutable objects are kept in a local directory.
pub struct CachedBackend {
    inner: Arc<dyn Backend>,
    dir: PathBuf,
}

fn cached(kind: Kind) -> bool {
    matches!(kind, Kind::Meta | Kind::Sig | Kind::Map)
}

impl CachedBackend {
    /// `inner` with its immutable objects cached under `dir` (made if
    /// missing; without it, `inner` alone).
    pub fn wrap(inner: Arc<dyn Backend>, dir: PathBuf) -> Arc<dyn Backend> {
        match std::fs::create_dir_all(&dir) {
            Ok(()) => Arc::new(CachedBackend { inner, dir }),
            Err(_) => inner,
        }
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.dir.join(key.path().replace('/', "-"))
    }

    fn get(&self, key: &Key) -> Option<Vec<u8>> {
        if !cached(key.kind) {
            return None;
        }
        std::fs::read(self.path(key)).ok()
    }

    /// Copies `obj` into the cache by ranges; the copy, or none when the
    /// cache cannot be written (the object is then read remotely).
    fn fetch(&self, key: &Key, obj: &dyn Object) -> Result<Option<File>> {
        let path = self.path(key);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let Ok(mut f) = File::create(&tmp) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; 4 << 20];
        let mut at = 0;
        while at < obj.len() {
            let n = (obj.len() - at).min(buf.len() as u64) as usize;
            obj.read_at(at, &mut buf[..n])?;
            if f.write_all(&buf[..n]).is_err() {
                let _ = std::fs::remove_file(&tmp);
                return Ok(None);
            }
            at += n as u64;
        }
        drop(f);
        if std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
            return Ok(None);
        }
        Ok(File::open(&path).ok())
    }

    /// Keeps a copy (a failure only costs the next read).
    fn keep(&self, key: &Key, bytes: &[u8]) {
        if !cached(key.kind) {
            return;
        }
        let path = self.path(key);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let ok = std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, &path).is_ok();
        if !ok {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// A cached object, read by range from its local copy.
struct LocalCopy {
    file: File,
    len: u64,
    key: Key,
}

impl Object for LocalCopy {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(Path::new("cache").join(self.key.path()), e))
    }
}

/// Writes an object to the repository and to the cache at once; the cached
/// copy appears when the object is finished.
struct Tee {
    inner: Box<dyn ObjectWriter>,
    copy: Option<(File, PathBuf, PathBuf)>,
}

impl ObjectWriter for Tee {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner.append(bytes)?;
        if let Some((f, tmp, _)) = &mut self.copy {
            if f.write_all(bytes).is_err() {
                let _ = std::fs::remove_file(&*tmp);
                self.copy = None;
            }
        }
        Ok(())
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn finish(self: Box<Self>) -> Result<()> {
        let Tee { inner, copy } = *self;
        let r = inner.finish();
        if let Some((f, tmp, path)) = copy {
            drop(f);
            if r.is_err() || std::fs::rename(&tmp, &path).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        r
    }
}

impl Backend for CachedBackend {
    fn location(&self) -> PathBuf {
        self.inner.location()
    }

    fn client_dir(&self) -> Option<PathBuf> {
        Some(self.dir.clone())
    }

    fn read(&self, key: &Key) -> Result<Vec<u8>> {
        if let Some(b) = self.get(key) {
            return Ok(b);
        }
        let b = self.inner.read(key)?;
        self.keep(key, &b);
        Ok(b)
    }

    fn read_many(&self, keys: &[Key]) -> Vec<Result<Vec<u8>>> {
        let mut out: Vec<Option<Result<Vec<u8>>>> =
            keys.iter().map(|k| self.get(k).map(Ok)).collect();
        let missing: Vec<Key> = keys
            .iter()
            .zip(&out)
            .filter(|(_, o)| o.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        let mut fetched = self.inner.read_many(&missing).into_iter();
        for (k, slot) in keys.iter().zip(out.iter_mut()) {
            if slot.is_none() {
                let r = fetched
                    .next()
                    .unwrap_or_else(|| Err(Error::Internal("read_many lost an answer".into())));
                if let Ok(b) = &r {
                    self.keep(k, b);
                }
                *slot = Some(r);
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(Error::Internal("read_many lost an answer".into()))))
            .collect()
    }

    fn open(&self, key: &Key) -> Result<Arc<dyn Object>> {
        if cached(key.kind) {
            if let Ok(file) = File::open(self.path(key)) {
                if let Ok(m) = file.metadata() {
                    return Ok(Arc::new(LocalCopy {
                        file,
                        len: m.len(),
                        key: key.clone(),
                    }));
                }
            }
            // Fetched whole once, by range into the cache file (a meta
            // pack may be large): its blobs are read again and again
            // (lists, maps, signature pages of every version).
            let obj = self.inner.open(key)?;
            if let Some(file) = self.fetch(key, &*obj)? {
                return Ok(Arc::new(LocalCopy {
                    file,
                    len: obj.len(),
                    key: key.clone(),
                }));
            }
            return Ok(obj);
        }
        self.inner.open(key)
    }

    fn open_sized(&self, key: &Key, len: u64) -> Result<Arc<dyn Object>> {
        if cached(key.kind) {
            return self.open(key);
        }
        self.inner.open_sized(key, len)
    }

    fn list(&self, kind: Kind) -> Result<Vec<(String, u64)>> {
        self.inner.list(kind)
    }

    fn create(&self, key: &Key) -> Result<Box<dyn ObjectWriter>> {
        let inner = self.inner.create(key)?;
        let copy = if cached(key.kind) {
            let path = self.path(key);
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            File::create(&tmp).ok().map(|f| (f, tmp, path))
        } else {
            None
        };
        Ok(Box::new(Tee { inner, copy }))
    }

    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    fn commit(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        self.inner.commit(key, bytes)
    }

    fn replace(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        self.inner.replace(key, bytes)
    }

    fn remove(&self, keys: &[Key]) -> Result<()> {
        self.inner.remove(keys)?;
        for k in keys {
            if cached(k.kind) {
                let _ = std::fs::remove_file(self.path(k));
            }
            crate::pack::forget_copy(&self.dir, k);
        }
        Ok(())
    }

    fn removal_grace(&self) -> Option<std::time::Duration> {
        self.inner.removal_grace()
    }

    fn mark(&self, keys: &[Key]) -> Result<()> {
        self.inner.mark(keys)
    }

    fn marks(&self) -> Result<Vec<crate::backend::Mark>> {
        self.inner.marks()
    }

    fn unmark(&self, name: &str) -> Result<()> {
        self.inner.unmark(name)
    }

    fn clean_interrupted(&self) -> Result<usize> {
        self.inner.clean_interrupted()
    }

    fn lock(&self) -> Result<LockGuard> {
        self.inner.lock()
    }
}
