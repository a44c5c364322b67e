//! A repository in a directory of a local file system (FORMAT.md, "Layout").
//!
//! Durability: objects are written with plain writes (a pack starts its
//! writeback early with `sync_file_range`, so the final fsync finds little
//! left); [`Backend::sync`] fsyncs every file finished since the last sync
//! and then their directories. A commit writes a temporary file in `tmp/`,
//! fsyncs it and links it into place (link fails if the name is taken: a
//! create-if-absent), then fsyncs the directory. Signatures are read through
//! mmap: objects are never modified once written, so a mapping stays valid.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Backend, Key, Kind, LockGuard, Object, ObjectWriter};
use crate::delta::signature::PageBytes;
use crate::error::{Error, IoContext, Result};

const DIRS: [&str; 6] = ["packs", "sigs", "maps", "snapshots", "tmp", "meta"];
/// Directories that repositories made by an older dsync lack: made when
/// first written to, and an empty listing while missing.
const ADDED_LATER: [&str; 1] = ["meta"];

/// A repository directory on a local file system.
pub struct LocalBackend {
    root: PathBuf,
    /// Files finished since the last sync, to fsync before the next commit.
    unsynced: Arc<Mutex<Vec<PathBuf>>>,
}

impl LocalBackend {
    /// Makes the layout's directories under `root`, a missing or empty
    /// directory.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when `root` is a file, a non-empty directory
    /// or already a repository; [`Error::Io`].
    pub fn create_layout(root: &Path) -> Result<LocalBackend> {
        if LocalBackend::holds_repository(root) {
            return Err(Error::InvalidInput(format!(
                "{} is already a dsync repository",
                root.display()
            )));
        }
        if root.exists() {
            let md = std::fs::metadata(root).at(root)?;
            if !md.is_dir() {
                return Err(Error::InvalidInput(format!(
                    "{} exists and is not a directory",
                    root.display()
                )));
            }
            if std::fs::read_dir(root).at(root)?.next().is_some() {
                return Err(Error::InvalidInput(format!(
                    "{} is a non-empty directory that is not a dsync repository",
                    root.display()
                )));
            }
        }
        std::fs::create_dir_all(root).at(root)?;
        for d in DIRS {
            let p = root.join(d);
            std::fs::create_dir_all(&p).at(&p)?;
        }
        Ok(LocalBackend::at(root))
    }

    /// True when `root` holds a repository (its config object exists).
    pub fn holds_repository(root: &Path) -> bool {
        root.join(Key::config().path()).exists()
    }

    /// The backend of an existing repository at `root`; every directory of
    /// the layout must be there.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming a missing directory.
    pub fn open(root: &Path) -> Result<LocalBackend> {
        for d in DIRS.iter().filter(|d| !ADDED_LATER.contains(d)) {
            let p = root.join(d);
            if !p.is_dir() {
                return Err(Error::corrupt(
                    p.display().to_string(),
                    0,
                    "directory missing",
                ));
            }
        }
        Ok(LocalBackend::at(root))
    }

    fn at(root: &Path) -> LocalBackend {
        LocalBackend {
            root: root.to_path_buf(),
            unsynced: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.root.join(key.path())
    }

    fn dir(&self, kind: Kind) -> PathBuf {
        self.root.join(kind.dir())
    }

    fn pending(&self, path: PathBuf) {
        pending(&self.unsynced, path);
    }

    fn create_new(path: &Path) -> Result<File> {
        let open = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
        };
        match open() {
            // A directory that an older dsync's repository lacks.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dir = path.parent().unwrap_or(path);
                let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if !ADDED_LATER.contains(&name) {
                    return Err(Error::io(path, e));
                }
                std::fs::create_dir_all(dir).at(dir)?;
                if let Some(root) = dir.parent() {
                    fsync_dir(root)?;
                }
                open().at(path)
            }
            r => r.at(path),
        }
    }

    /// Writes `bytes` to a fresh temporary file and fsyncs it.
    fn temp_with(&self, bytes: &[u8]) -> Result<PathBuf> {
        let t = self
            .root
            .join("tmp")
            .join(format!("{:016x}.tmp", crate::id::random_u64()));
        let mut f = LocalBackend::create_new(&t)?;
        f.write_all(bytes).at(&t)?;
        f.sync_all().at(&t)?;
        Ok(t)
    }
}

fn pending(unsynced: &Mutex<Vec<PathBuf>>, path: PathBuf) {
    if let Ok(mut u) = unsynced.lock() {
        u.push(path);
    }
}

/// Fsyncs a directory, so that the names in it are durable.
fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).at(dir)?.sync_all().at(dir)
}

/// Asks the kernel to start writing a range back (no wait).
fn start_writeback(file: &File, off: u64, len: u64) {
    let len = if len == u64::MAX { 0 } else { len };
    // SAFETY: a valid fd; sync_file_range has no memory effects. Failure only
    // means the final fsync does all the work.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            off as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

struct LocalObject {
    file: File,
    len: u64,
    path: PathBuf,
}

impl Object for LocalObject {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).at(&self.path)
    }
}

struct LocalWriter {
    unsynced: Arc<Mutex<Vec<PathBuf>>>,
    file: File,
    path: PathBuf,
    pos: u64,
    flushed: u64,
}

impl ObjectWriter for LocalWriter {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all_at(bytes, self.pos).at(&self.path)?;
        self.pos += bytes.len() as u64;
        // Start writeback early, so the fsync before the commit finds little
        // left to write.
        if self.pos - self.flushed >= 8 << 20 {
            start_writeback(&self.file, self.flushed, self.pos - self.flushed);
            self.flushed = self.pos;
        }
        Ok(())
    }
    fn len(&self) -> u64 {
        self.pos
    }
    fn finish(self: Box<Self>) -> Result<()> {
        if self.pos > self.flushed {
            start_writeback(&self.file, self.flushed, u64::MAX);
        }
        pending(&self.unsynced, self.path);
        Ok(())
    }
}

/// The flock on `lock`, released by the kernel however its holder exits.
struct Flock {
    file: File,
}

impl Drop for Flock {
    fn drop(&mut self) {
        // Released normally: say so by leaving the record empty.
        let _ = self.file.set_len(0);
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> PathBuf {
        self.root.clone()
    }

    fn read(&self, key: &Key) -> Result<Vec<u8>> {
        let p = self.path(key);
        std::fs::read(&p).at(&p)
    }

    fn open(&self, key: &Key) -> Result<Arc<dyn Object>> {
        let path = self.path(key);
        let file = File::open(&path).at(&path)?;
        let len = file.metadata().at(&path)?.len();
        Ok(Arc::new(LocalObject { file, len, path }))
    }

    fn bytes(&self, key: &Key) -> Result<PageBytes> {
        let path = self.path(key);
        let f = File::open(&path).at(&path)?;
        // SAFETY: objects are never modified after they are written; a
        // truncation by another process would fault, which the layout's rules
        // exclude but no mmap can (the readers check every page's checksum).
        let m = unsafe { memmap2::Mmap::map(&f) }.at(&path)?;
        Ok(Arc::new(m))
    }

    fn list(&self, kind: Kind) -> Result<Vec<(String, u64)>> {
        if kind == Kind::Config {
            let p = self.path(&Key::config());
            return Ok(match std::fs::metadata(&p) {
                Ok(m) => vec![("config".to_string(), m.len())],
                Err(_) => vec![],
            });
        }
        let dir = self.dir(kind);
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && ADDED_LATER.contains(&kind.dir()) =>
            {
                return Ok(out)
            }
            r => r.at(&dir)?,
        };
        for ent in entries {
            let ent = ent.at(&dir)?;
            let name = ent.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(kind.suffix())) else {
                continue;
            };
            // A file removed between the listing and its stat is gone: skip it.
            let Ok(md) = ent.metadata() else { continue };
            out.push((stem.to_string(), md.len()));
        }
        Ok(out)
    }

    fn create(&self, key: &Key) -> Result<Box<dyn ObjectWriter>> {
        let path = self.path(key);
        let file = LocalBackend::create_new(&path)?;
        Ok(Box::new(LocalWriter {
            unsynced: self.unsynced.clone(),
            file,
            path,
            pos: 0,
            flushed: 0,
        }))
    }

    fn put(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        let path = self.path(key);
        let mut f = LocalBackend::create_new(&path)?;
        f.write_all(bytes).at(&path)?;
        self.pending(path);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let files = match self.unsynced.lock() {
            Ok(mut u) => std::mem::take(&mut *u),
            Err(_) => return Err(Error::Internal("a writer panicked".into())),
        };
        let mut dirs = BTreeSet::new();
        for p in &files {
            File::open(p).at(p)?.sync_all().at(p)?;
            if let Some(d) = p.parent() {
                dirs.insert(d.to_path_buf());
            }
        }
        for d in dirs {
            fsync_dir(&d)?;
        }
        Ok(())
    }

    fn commit(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        let dest = self.path(key);
        let t = self.temp_with(bytes)?;
        let linked = std::fs::hard_link(&t, &dest);
        let _ = std::fs::remove_file(&t);
        linked.at(&dest)?;
        match dest.parent() {
            Some(parent) => fsync_dir(parent),
            None => Ok(()),
        }
    }

    fn replace(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        let dest = self.path(key);
        let t = self.temp_with(bytes)?;
        if let Err(e) = std::fs::rename(&t, &dest) {
            let _ = std::fs::remove_file(&t);
            return Err(Error::io(dest, e));
        }
        match dest.parent() {
            Some(parent) => fsync_dir(parent),
            None => Ok(()),
        }
    }

    fn remove(&self, keys: &[Key]) -> Result<()> {
        let mut dirs = BTreeSet::new();
        for k in keys {
            let p = self.path(k);
            match std::fs::remove_file(&p) {
                Ok(()) => {
                    dirs.insert(k.kind);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(p, e)),
            }
        }
        for kind in dirs {
            fsync_dir(&self.dir(kind))?;
        }
        Ok(())
    }

    fn lock(&self) -> Result<LockGuard> {
        let path = self.root.join("lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .at(&path)?;
        // SAFETY: a valid fd; flock has no memory effects.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::Locked {
                path: self.root.clone(),
                holder: holder.trim().to_string(),
            });
        }
        // A holder that released the lock normally emptied the file; what is
        // left names a writer that died holding it (the kernel released it).
        let previous = std::fs::read_to_string(&path).unwrap_or_default();
        let took_over = Some(previous.trim().to_string()).filter(|p| !p.is_empty());
        file.set_len(0).at(&path)?;
        file.write_all_at(super::holder_record().as_bytes(), 0)
            .at(&path)?;
        Ok(LockGuard {
            _inner: Box::new(Flock { file }),
            took_over,
        })
    }

    fn scratch_dir(&self) -> Option<PathBuf> {
        Some(self.root.join("tmp"))
    }
}
