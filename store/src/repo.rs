//! A repository on a local file system: creating and opening it, the writer
//! lock, listing snapshots, and loading maps and signatures.
//!
//! Layout (FORMAT.md has the bytes):
//!
//! ```text
//! REPO/config                 parameters and format version
//! REPO/lock                   the writer lock (flock), with its holder
//! REPO/packs/<id>.pack        compressed literal bytes
//! REPO/sigs/<id>.sig          signature pages
//! REPO/maps/<id>.map          one file version: extent map + signature index
//! REPO/snapshots/<id>.snap    manifests; a snapshot exists iff its file does
//! REPO/tmp/                   manifests being written
//! ```
//!
//! Readers take no lock: every file is written once, under a name nobody
//! references yet, and a snapshot becomes visible by one rename after
//! everything it references is fsynced.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::delta::signature::{PageBytes, PageSource};
use crate::delta::SigView;
use crate::error::{Error, IoContext, Result};
use crate::format::config::Config;
use crate::format::sig::{self as sigfmt, ENTRY_SIZE};
use crate::format::snapshot::Snapshot;
use crate::format::FORMAT_VERSION;
use crate::id::{MapId, SigId, SnapshotId};
use crate::map::FileMap;
use crate::pack::PackCache;

const DIRS: [&str; 5] = ["packs", "sigs", "maps", "snapshots", "tmp"];

/// Default size of the decompressed-frame cache.
pub const DEFAULT_CACHE: usize = 256 << 20;

/// An open repository.
pub struct Repo {
    root: PathBuf,
    config: Config,
    cache: Arc<PackCache>,
}

impl Repo {
    /// Creates a repository at `path` (an empty or missing directory).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when `path` is a non-empty directory or a file,
    /// [`Error::Io`] when it cannot be written.
    pub fn init(path: &Path, config: Config) -> Result<Repo> {
        if path.join("config").exists() {
            return Err(Error::InvalidInput(format!(
                "{} is already a dsync repository",
                path.display()
            )));
        }
        if path.exists() {
            let md = std::fs::metadata(path).at(path)?;
            if !md.is_dir() {
                return Err(Error::InvalidInput(format!(
                    "{} exists and is not a directory",
                    path.display()
                )));
            }
            if std::fs::read_dir(path).at(path)?.next().is_some() {
                return Err(Error::InvalidInput(format!(
                    "{} is a non-empty directory that is not a dsync repository",
                    path.display()
                )));
            }
        }
        std::fs::create_dir_all(path).at(path)?;
        for d in DIRS {
            let p = path.join(d);
            std::fs::create_dir_all(&p).at(&p)?;
        }
        write_atomic(&path.join("tmp"), &path.join("config"), &config.encode())?;
        Repo::open(path)
    }

    /// Opens the repository at `path`.
    ///
    /// # Errors
    /// [`Error::NotARepository`], [`Error::UnsupportedVersion`], [`Error::Corrupt`].
    pub fn open(path: &Path) -> Result<Repo> {
        Repo::open_with_cache(path, DEFAULT_CACHE)
    }

    /// Opens with a frame cache of `cache_bytes`.
    ///
    /// # Errors
    /// See [`Repo::open`].
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Repo> {
        let cfg_path = path.join("config");
        let bytes = match std::fs::read(&cfg_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotARepository { path: path.into() })
            }
            Err(e) => return Err(Error::io(cfg_path, e)),
        };
        let config = Config::decode(&bytes, &cfg_path.display().to_string())?;
        for d in DIRS {
            let p = path.join(d);
            if !p.is_dir() {
                return Err(Error::corrupt(
                    p.display().to_string(),
                    0,
                    "directory missing",
                ));
            }
        }
        Ok(Repo {
            root: path.to_path_buf(),
            cache: Arc::new(PackCache::new(path.join("packs"), cache_bytes)),
            config,
        })
    }

    /// Opens the repository, creating it first if `path` does not exist.
    ///
    /// # Errors
    /// See [`Repo::init`] and [`Repo::open`].
    pub fn open_or_init(path: &Path) -> Result<Repo> {
        if path.join("config").exists() {
            Repo::open(path)
        } else {
            Repo::init(path, Config::default())
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn cache(&self) -> &Arc<PackCache> {
        &self.cache
    }
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Takes the writer lock, or fails at once if another process holds it.
    ///
    /// # Errors
    /// [`Error::Locked`] naming the holder.
    pub fn lock(&self) -> Result<WriteLock> {
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
        let info = format!(
            "host={} pid={} since={}\n",
            hostname(),
            std::process::id(),
            crate::time::local(crate::time::now_ns())
        );
        file.set_len(0).at(&path)?;
        file.write_all_at(info.as_bytes(), 0).at(&path)?;
        Ok(WriteLock { file, took_over })
    }

    /// Who holds the writer lock now, if anyone (what the lock file records).
    /// The lock is an flock: the kernel releases it when its holder exits,
    /// however it exits, so a lock is never stale on a local file system.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn lock_holder(&self) -> Result<Option<String>> {
        match self.lock() {
            Ok(_free) => Ok(None),
            Err(Error::Locked { holder, .. }) => Ok(Some(holder)),
            Err(e) => Err(e),
        }
    }

    /// All snapshots, oldest first. A manifest that fails to decode is an error
    /// naming it.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Corrupt`].
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        for id in self.snapshot_ids()? {
            out.push(self.load_snapshot(id)?);
        }
        out.sort_by_key(|s| (s.time_ns, s.id));
        Ok(out)
    }

    /// The ids of the snapshots that exist now, in no order (a directory
    /// listing: no manifest is read).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        let dir = self.dir("snapshots");
        let mut out = Vec::new();
        for ent in std::fs::read_dir(&dir).at(&dir)? {
            let ent = ent.at(&dir)?;
            let name = ent.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".snap"))
                .and_then(SnapshotId::parse)
            {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// # Errors
    /// [`Error::Io`], [`Error::Corrupt`].
    pub fn load_snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        let path = self.dir("snapshots").join(format!("{id}.snap"));
        let bytes = std::fs::read(&path).at(&path)?;
        let name = format!("snapshots/{id}.snap");
        let s = Snapshot::decode(&bytes, &name)?;
        if s.id != id {
            return Err(Error::corrupt(
                name,
                24,
                "manifest id differs from its file name",
            ));
        }
        Ok(s)
    }

    /// Finds one snapshot by id, unique id prefix, local time
    /// (`YYYY-MM-DDTHH:MM:SS`), day (`YYYY-MM-DD`, the last of that day) or `latest`.
    ///
    /// # Errors
    /// [`Error::NoSuchSnapshot`], [`Error::AmbiguousSnapshot`].
    pub fn resolve(&self, spec: &str) -> Result<Snapshot> {
        let all = self.snapshots()?;
        resolve_in(all, spec)
    }

    /// Loads a map object.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Corrupt`].
    pub fn load_map(&self, id: MapId) -> Result<FileMap> {
        let path = self.dir("maps").join(format!("{id}.map"));
        let bytes = std::fs::read(&path).at(&path)?;
        let body = crate::format::map::MapBody::decode(&bytes, &format!("maps/{id}.map"))?;
        Ok(FileMap { id, body })
    }

    /// The signature of a version, memory-mapped in place.
    ///
    /// # Errors
    /// [`Error::Io`] when a signature file is missing, [`Error::Corrupt`] when
    /// one is malformed. Page contents are checked lazily by [`SigView`].
    pub fn sig_view(&self, map: &FileMap) -> Result<SigView> {
        let b = &map.body;
        let mut files: HashMap<SigId, PageBytes> = HashMap::new();
        let page_bytes = b.page_entries as usize * ENTRY_SIZE;
        let mut pages = Vec::with_capacity(b.pages.len());
        for p in &b.pages {
            let Some(sig) = p.sig else {
                pages.push(PageSource::Zero);
                continue;
            };
            let bytes = match files.get(&sig) {
                Some(m) => m.clone(),
                None => {
                    let path = self.dir("sigs").join(format!("{sig}.sig"));
                    let f = File::open(&path).at(&path)?;
                    // SAFETY: signature files are never modified after they are
                    // written; a truncation by another process would fault, which
                    // the checks below make unlikely but cannot exclude (as for
                    // any mmap).
                    let m = unsafe { memmap2::Mmap::map(&f) }.at(&path)?;
                    let obj = format!("sigs/{sig}.sig");
                    let pe =
                        sigfmt::check_header(m.get(..sigfmt::HEADER_SIZE).unwrap_or(&[]), &obj)?;
                    if pe != b.page_entries {
                        return Err(Error::corrupt(obj, 12, "page size differs from the map's"));
                    }
                    let m: PageBytes = Arc::new(m);
                    files.insert(sig, m.clone());
                    m
                }
            };
            pages.push(PageSource::Bytes {
                bytes,
                offset: sigfmt::HEADER_SIZE + p.slot as usize * page_bytes,
                sum: Some(p.sum),
            });
        }
        Ok(SigView::new(
            b.block_size,
            b.file_size,
            b.page_entries,
            pages,
        ))
    }
}

/// Held while writing; released when dropped (or when the process dies).
pub struct WriteLock {
    file: File,
    /// The lock file's record of a writer that died holding the lock.
    pub took_over: Option<String>,
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        // Released normally: say so by leaving the record empty.
        let _ = self.file.set_len(0);
    }
}

pub(crate) fn resolve_in(all: Vec<Snapshot>, spec: &str) -> Result<Snapshot> {
    let none = || Error::NoSuchSnapshot {
        spec: spec.to_string(),
    };
    if spec == "latest" {
        return all.into_iter().last().ok_or_else(none);
    }
    let is_day = spec.len() == 10 && crate::time::parse_local(spec).is_some();
    if is_day {
        return all
            .into_iter()
            .rev()
            .find(|s| crate::time::local(s.time_ns).starts_with(spec))
            .ok_or_else(none);
    }
    let norm = spec.replace(' ', "T");
    if crate::time::parse_local(&norm).is_some() {
        return all
            .into_iter()
            .rev()
            .find(|s| crate::time::local(s.time_ns) == norm)
            .ok_or_else(none);
    }
    let lower = spec.to_ascii_lowercase();
    if lower.is_empty() || !lower.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(none());
    }
    let mut m: Vec<Snapshot> = all
        .into_iter()
        .filter(|s| s.id.to_string().starts_with(&lower))
        .collect();
    match m.len() {
        0 => Err(none()),
        1 => Ok(m.remove(0)),
        n => Err(Error::AmbiguousSnapshot {
            spec: spec.to_string(),
            count: n,
        }),
    }
}

/// Writes `bytes` to `dest` via a temporary file in `tmp`, fsynced, renamed,
/// and the destination directory fsynced.
///
/// # Errors
/// [`Error::Io`].
pub fn write_atomic(tmp: &Path, dest: &Path, bytes: &[u8]) -> Result<()> {
    let t = tmp.join(format!("{:016x}.tmp", crate::id::random_u64()));
    let mut f = File::create(&t).at(&t)?;
    f.write_all(bytes).at(&t)?;
    f.sync_all().at(&t)?;
    drop(f);
    std::fs::rename(&t, dest).at(dest)?;
    if let Some(parent) = dest.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// Writes a new file (that nothing references yet) and fsyncs it.
///
/// # Errors
/// [`Error::Io`].
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .at(path)?;
    f.write_all(bytes).at(path)?;
    f.sync_all().at(path)
}

/// # Errors
/// [`Error::Io`].
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).at(dir)?.sync_all().at(dir)
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for its length.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let n = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Appends signature pages to a new signature file.
pub struct SigWriter {
    pub id: SigId,
    path: PathBuf,
    file: File,
    page_bytes: usize,
    slots: u32,
}

impl SigWriter {
    /// # Errors
    /// [`Error::Io`].
    pub fn create(dir: &Path, page_entries: u32) -> Result<SigWriter> {
        let id = SigId::random();
        let path = dir.join(format!("{id}.sig"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .at(&path)?;
        file.write_all_at(&sigfmt::header(FORMAT_VERSION, page_entries), 0)
            .at(&path)?;
        Ok(SigWriter {
            id,
            path,
            file,
            page_bytes: page_entries as usize * ENTRY_SIZE,
            slots: 0,
        })
    }

    /// Appends a page (at most a page of entries); returns its slot.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn append(&mut self, page: &[u8]) -> Result<u32> {
        let mut buf = page.to_vec();
        buf.resize(self.page_bytes, 0);
        let off = (sigfmt::HEADER_SIZE + self.slots as usize * self.page_bytes) as u64;
        self.file.write_all_at(&buf, off).at(&self.path)?;
        self.slots += 1;
        Ok(self.slots - 1)
    }

    /// Fsyncs; returns the file's size.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn finish(self) -> Result<u64> {
        self.file.sync_all().at(&self.path)?;
        Ok((sigfmt::HEADER_SIZE + self.slots as usize * self.page_bytes) as u64)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::snapshot::SnapshotStats;

    fn snap(id: u64, t: i64) -> Snapshot {
        Snapshot {
            id: SnapshotId(id),
            time_ns: t,
            host: "h".into(),
            paths: vec![],
            stats: SnapshotStats::default(),
            nodes: vec![],
        }
    }

    #[test]
    fn resolve_specs() {
        let day = crate::time::parse_local("2024-05-01T10:00:00").unwrap();
        let all = vec![
            snap(0xaa11, day),
            snap(0xaa22, day + 3_600_000_000_000),
            snap(0xbb33, day + 86_400_000_000_000),
        ];
        let r = |s: &str| resolve_in(all.clone(), s).map(|s| s.id.0);
        assert_eq!(r("latest").unwrap(), 0xbb33);
        assert_eq!(r("2024-05-01").unwrap(), 0xaa22);
        assert_eq!(r("2024-05-01T10:00:00").unwrap(), 0xaa11);
        assert_eq!(r("2024-05-01 11:00:00").unwrap(), 0xaa22);
        assert_eq!(r("000000000000bb").unwrap(), 0xbb33);
        assert!(matches!(
            r("000000000000aa"),
            Err(Error::AmbiguousSnapshot { count: 2, .. })
        ));
        assert!(matches!(r("2023-01-01"), Err(Error::NoSuchSnapshot { .. })));
        assert!(matches!(r("nonsense"), Err(Error::NoSuchSnapshot { .. })));
    }

    #[test]
    fn lock_excludes_second_writer() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::init(&d.path().join("r"), Config::default()).unwrap();
        let l = repo.lock().unwrap();
        assert!(matches!(repo.lock(), Err(Error::Locked { .. })));
        drop(l);
        repo.lock().unwrap();
    }
}
