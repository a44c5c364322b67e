//! A repository: creating and opening it on a backend, the writer lock,
//! listing snapshots, and loading maps and signatures.
//!
//! The objects (FORMAT.md has the bytes and the local layout):
//!
//! ```text
//! config                 parameters and format version
//! packs/<id>.pack        compressed literal bytes
//! sigs/<id>.sig          signature pages
//! maps/<id>.map          one file version: extent map + signature index
//! snapshots/<id>.snap    manifests; a snapshot exists iff its object does
//! ```
//!
//! Every byte goes through [`crate::backend`]. Readers take no lock: every
//! object is written once, under a name nobody references yet, and a snapshot
//! becomes visible by one commit after everything it references is durable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{Backend, Key, Kind, LocalBackend, LockGuard, ObjectWriter, S3Backend, S3Url};
use crate::delta::signature::{PageBytes, PageSource};
use crate::delta::SigView;
use crate::error::{Error, Result};
use crate::format::config::Config;
use crate::format::sig::{self as sigfmt, ENTRY_SIZE};
use crate::format::snapshot::{Snapshot, Timed};
use crate::format::FORMAT_VERSION;
use crate::id::{MapId, SigId, SnapshotId};
use crate::map::FileMap;
use crate::pack::PackCache;

/// Default size of the decompressed-frame cache.
pub const DEFAULT_CACHE: usize = 256 << 20;

/// An open repository.
pub struct Repo {
    backend: Arc<dyn Backend>,
    config: Config,
    cache: Arc<PackCache>,
}

/// `b` with its immutable objects kept in the client's cache for
/// repository `repo_id` (see [`crate::remote::cache`]).
fn cached(b: Arc<dyn Backend>, repo_id: u64) -> Arc<dyn Backend> {
    match crate::remote::cache::dir_for(repo_id) {
        Some(dir) => crate::remote::cache::CachedBackend::wrap(b, dir),
        None => b,
    }
}

/// `b` cached under the id its config gives (a missing config is left
/// for [`Repo::open_on`] to report).
fn cached_by_config(b: Arc<dyn Backend>) -> Result<Arc<dyn Backend>> {
    match b.read(&Key::config()) {
        Ok(bytes) => {
            let id = Config::decode(&bytes, "config")?.repo_id;
            Ok(cached(b, id))
        }
        Err(e) if e.is_not_found() => Ok(b),
        Err(e) => Err(e),
    }
}

impl Repo {
    /// Creates a repository at `path` (an empty or missing directory).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when `path` is a non-empty directory or a file,
    /// or a parameter of `config` is out of range, and
    /// [`Error::UnsupportedVersion`] for a format newer than this build
    /// ([`Config::validate`], checked before anything is created);
    /// [`Error::Io`] when it cannot be written.
    pub fn init(path: &Path, config: Config) -> Result<Repo> {
        config.validate()?;
        if let Some(u) = S3Url::parse(path) {
            let b = cached(Arc::new(S3Backend::connect(&u)?), config.repo_id);
            return Repo::init_on(b, config);
        }
        if let Some(r) = crate::remote::Remote::parse(path) {
            let b = crate::remote::backend(&r, crate::remote::hello::CREATE, Some(config.repo_id))?;
            return Repo::init_on(b, config);
        }
        Repo::init_on(Arc::new(LocalBackend::create_layout(path)?), config)
    }

    /// Creates a repository on an empty backend.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when it already holds one; [`Error::Io`].
    pub fn init_on(backend: Arc<dyn Backend>, config: Config) -> Result<Repo> {
        match backend.commit(&Key::config(), &config.encode()) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::InvalidInput(format!(
                    "{} is already a dsync repository",
                    backend.location().display()
                )))
            }
            r => r?,
        }
        Repo::open_on(backend, DEFAULT_CACHE)
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
        if let Some(u) = S3Url::parse(path) {
            let b: Arc<dyn Backend> = Arc::new(S3Backend::connect(&u)?);
            return Repo::open_on(cached_by_config(b)?, cache_bytes);
        }
        if let Some(r) = crate::remote::Remote::parse(path) {
            let b = crate::remote::backend(&r, crate::remote::hello::OPEN, None)?;
            return Repo::open_on(b, cache_bytes);
        }
        if !LocalBackend::holds_repository(path) {
            return Err(Error::NotARepository { path: path.into() });
        }
        Repo::open_on(Arc::new(LocalBackend::open(path)?), cache_bytes)
    }

    /// Opens the repository a backend holds, with a frame cache of
    /// `cache_bytes`.
    ///
    /// # Errors
    /// See [`Repo::open`].
    pub fn open_on(backend: Arc<dyn Backend>, cache_bytes: usize) -> Result<Repo> {
        let key = Key::config();
        let bytes = match backend.read(&key) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(Error::NotARepository {
                    path: backend.location(),
                })
            }
            Err(e) => return Err(e),
        };
        let name = backend.location().join(key.path()).display().to_string();
        let config = Config::decode(&bytes, &name)?;
        Ok(Repo {
            cache: Arc::new(PackCache::new(backend.clone(), cache_bytes)),
            backend,
            config,
        })
    }

    /// Opens the repository, creating it first if `path` does not exist.
    ///
    /// # Errors
    /// See [`Repo::init`] and [`Repo::open`].
    pub fn open_or_init(path: &Path) -> Result<Repo> {
        if let Some(u) = S3Url::parse(path) {
            let s3 = S3Backend::connect(&u)?;
            if s3.holds_repository()? {
                return Repo::open_on(cached_by_config(Arc::new(s3))?, DEFAULT_CACHE);
            }
            let config = Config::default();
            return Repo::init_on(cached(Arc::new(s3), config.repo_id), config);
        }
        if let Some(r) = crate::remote::Remote::parse(path) {
            let flags = crate::remote::hello::OPEN_OR_CREATE;
            let b: Arc<dyn Backend> = Arc::new(crate::remote::RemoteBackend::connect(&r, flags)?);
            return match b.read(&Key::config()) {
                Err(e) if e.is_not_found() => {
                    let config = Config::default();
                    let b = match crate::remote::cache::dir_for(config.repo_id) {
                        Some(dir) => crate::remote::cache::CachedBackend::wrap(b, dir),
                        None => b,
                    };
                    Repo::init_on(b, config)
                }
                Err(e) => Err(e),
                // The same connection, its objects cached under the id
                // (a second ssh connection costs a handshake).
                Ok(bytes) => {
                    let id = Config::decode(&bytes, "config").map(|c| c.repo_id)?;
                    let b = match crate::remote::cache::dir_for(id) {
                        Some(dir) => crate::remote::cache::CachedBackend::wrap(b, dir),
                        None => b,
                    };
                    Repo::open_on(b, DEFAULT_CACHE)
                }
            };
        }
        if LocalBackend::holds_repository(path) {
            Repo::open(path)
        } else {
            Repo::init(path, Config::default())
        }
    }

    /// Where the repository is, for messages.
    pub fn location(&self) -> PathBuf {
        self.backend.location()
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn cache(&self) -> &Arc<PackCache> {
        &self.cache
    }
    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Whether the repository is across a network (over ssh, on S3): each
    /// read of an uncached object waits a round trip.
    pub fn is_remote(&self) -> bool {
        self.backend.client_dir().is_some()
    }

    /// A directory for large temporary files beside the repository (on its
    /// file system), when it has one.
    pub fn scratch_dir(&self) -> Option<PathBuf> {
        self.backend.scratch_dir()
    }

    /// Takes the writer lock, or fails at once if another process holds it.
    ///
    /// # Errors
    /// [`Error::Locked`] naming the holder.
    pub fn lock(&self) -> Result<LockGuard> {
        self.backend.lock()
    }

    /// Who holds the writer lock now, if anyone (what the lock records).
    /// Locally the lock is an flock: the kernel releases it when its holder
    /// exits, however it exits, so a lock is never stale.
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
        let ids = self.snapshot_ids()?;
        let keys: Vec<Key> = ids.iter().map(|&id| Key::snapshot(id)).collect();
        let mut out = Vec::with_capacity(ids.len());
        for (id, bytes) in ids.into_iter().zip(self.backend.read_many(&keys)) {
            out.push(self.decode_snapshot(id, &bytes?)?);
        }
        out.sort_by_key(|s| (s.time_ns, s.id));
        Ok(out)
    }

    /// The ids of the snapshots that exist now, in no order (a listing: no
    /// manifest is read).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        Ok(self
            .backend
            .list(Kind::Snapshot)?
            .into_iter()
            .filter_map(|(name, _)| SnapshotId::parse(&name))
            .collect())
    }

    /// # Errors
    /// [`Error::Io`], [`Error::Corrupt`].
    pub fn load_snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        let bytes = self.backend.read(&Key::snapshot(id))?;
        self.decode_snapshot(id, &bytes)
    }

    fn decode_snapshot(&self, id: SnapshotId, bytes: &[u8]) -> Result<Snapshot> {
        let name = Key::snapshot(id).path();
        let s = if envelope_version(bytes) == crate::format::v3::record::RECORD_VERSION {
            let r = crate::format::v3::record::SnapshotRecord::decode(bytes, &name)?;
            crate::tree3::snapshot_of(self, &r)?
        } else {
            Snapshot::decode(bytes, &name)?
        };
        if s.id != id {
            return Err(Error::corrupt(
                name,
                24,
                "manifest id differs from its file name",
            ));
        }
        Ok(s)
    }

    /// Every manifest's id and a hash of its bytes, sorted: equal before and
    /// after a long read-only job exactly when no manifest was committed,
    /// replaced or removed meanwhile.
    ///
    /// # Errors
    /// [`Error::Io`] when the snapshots cannot be listed.
    pub(crate) fn manifests_fingerprint(&self) -> Result<Vec<(SnapshotId, u64)>> {
        let ids = self.snapshot_ids()?;
        let keys: Vec<Key> = ids.iter().map(|&id| Key::snapshot(id)).collect();
        let mut out: Vec<(SnapshotId, u64)> = ids
            .into_iter()
            .zip(self.backend.read_many(&keys))
            .map(|(id, b)| (id, b.map_or(0, |b| xxhash_rust::xxh3::xxh3_64(&b))))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The format 3 record of snapshot `id` (its tree not read).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Corrupt`] (also for a format 2 manifest).
    pub(crate) fn load_record(
        &self,
        id: SnapshotId,
    ) -> Result<crate::format::v3::record::SnapshotRecord> {
        let key = Key::snapshot(id);
        let bytes = self.backend.read(&key)?;
        crate::format::v3::record::SnapshotRecord::decode(&bytes, &key.path())
    }

    /// Every snapshot's listing, oldest first, without reading a format 3
    /// tree.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Corrupt`].
    pub fn infos(&self) -> Result<Vec<crate::format::snapshot::SnapshotInfo>> {
        let ids = self.snapshot_ids()?;
        let keys: Vec<Key> = ids.iter().map(|&id| Key::snapshot(id)).collect();
        let mut out = Vec::with_capacity(ids.len());
        for (id, bytes) in ids.into_iter().zip(self.backend.read_many(&keys)) {
            let bytes = bytes?;
            let name = Key::snapshot(id).path();
            let info = if envelope_version(&bytes) == crate::format::v3::record::RECORD_VERSION {
                crate::format::v3::record::SnapshotRecord::decode(&bytes, &name)?.info()
            } else {
                self.decode_snapshot(id, &bytes)?.info()
            };
            if info.id != id {
                return Err(Error::corrupt(
                    name,
                    24,
                    "manifest id differs from its file name",
                ));
            }
            out.push(info);
        }
        out.sort_by_key(|s| (s.time_ns, s.id));
        Ok(out)
    }

    /// Finds one snapshot by id, unique id prefix, local time
    /// (`YYYY-MM-DDTHH:MM:SS`), day (`YYYY-MM-DD`, the last of that day) or `latest`.
    ///
    /// # Errors
    /// [`Error::NoSuchSnapshot`], [`Error::AmbiguousSnapshot`].
    pub fn resolve(&self, spec: &str) -> Result<Snapshot> {
        let found = resolve_in(self.infos()?, spec)?;
        self.load_snapshot(found.id)
    }

    /// As [`Repo::resolve`], without reading a format 3 tree: such a
    /// snapshot comes with no nodes (its tree is read one directory at a
    /// time through its record: restore, cat, diff, [`crate::browse`]).
    ///
    /// # Errors
    /// As [`Repo::resolve`].
    pub fn resolve_head(&self, spec: &str) -> Result<Snapshot> {
        let found = resolve_in(self.infos()?, spec)?;
        if found.format < 3 {
            return self.load_snapshot(found.id);
        }
        Ok(Snapshot {
            id: found.id,
            time_ns: found.time_ns,
            host: found.host,
            paths: found.paths,
            stats: found.stats,
            nodes: Vec::new(),
            format: found.format,
        })
    }

    /// Loads a map object.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Corrupt`].
    pub fn load_map(&self, id: MapId) -> Result<FileMap> {
        let key = Key::map(id);
        let bytes = self.backend.read(&key)?;
        let body = crate::format::map::MapBody::decode(&bytes, &key.path())?;
        Ok(FileMap { id, body })
    }

    /// The extent map of a version, format 2 (its map object) or 3 (its
    /// entry's extent list).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Corrupt`].
    pub fn load_version(&self, f: &crate::format::snapshot::FileVersion) -> Result<FileMap> {
        match &f.data {
            Some(d) => crate::tree3::file_map(self, d),
            None => self.load_map(f.map),
        }
    }

    /// The signature of a version whose map `map` is.
    ///
    /// # Errors
    /// As [`Repo::sig_view`].
    pub fn version_sig(
        &self,
        f: &crate::format::snapshot::FileVersion,
        map: &FileMap,
    ) -> Result<SigView> {
        match &f.data {
            Some(d) => crate::tree3::sig_view(self, d),
            None => self.sig_view(map),
        }
    }

    /// Writes a new map object (durable after [`Backend::sync`]); returns
    /// its encoded size.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub(crate) fn put_map(&self, id: MapId, body: &crate::format::map::MapBody) -> Result<u64> {
        let enc = body.encode();
        self.backend.put(&Key::map(id), &enc)?;
        Ok(enc.len() as u64)
    }

    /// Sizes of every object of `kind`, by name.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub(crate) fn sizes(&self, kind: Kind) -> Result<HashMap<String, u64>> {
        Ok(self.backend.list(kind)?.into_iter().collect())
    }

    /// Bytes in the repository's objects (packs, signatures, maps, manifests).
    ///
    /// # Errors
    /// [`Error::Io`] when a kind cannot be listed.
    pub fn bytes_stored(&self) -> Result<u64> {
        let mut n = 0;
        for kind in Kind::DATA {
            n += self.backend.list(kind)?.iter().map(|(_, s)| s).sum::<u64>();
        }
        Ok(n)
    }

    /// The signature of a version; pages are read in place (mapped, on a
    /// local repository).
    ///
    /// # Errors
    /// [`Error::Io`] when a signature object is missing, [`Error::Corrupt`]
    /// when one is malformed. Page contents are checked lazily by [`SigView`].
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
                    let key = Key::sig(sig);
                    let m = self.backend.bytes(&key)?;
                    let obj = key.path();
                    let pe = sigfmt::check_header(
                        (*m).as_ref().get(..sigfmt::HEADER_SIZE).unwrap_or(&[]),
                        &obj,
                    )?;
                    if pe != b.page_entries {
                        return Err(Error::corrupt(obj, 12, "page size differs from the map's"));
                    }
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

/// The version an envelope's header says (0 when too short to say).
fn envelope_version(bytes: &[u8]) -> u32 {
    bytes
        .get(8..12)
        .map_or(0, |v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]))
}

pub(crate) fn resolve_in<T: Timed>(all: Vec<T>, spec: &str) -> Result<T> {
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
            .find(|s| crate::time::local(s.time_ns()).starts_with(spec))
            .ok_or_else(none);
    }
    let norm = spec.replace(' ', "T");
    if crate::time::parse_local(&norm).is_some() {
        return all
            .into_iter()
            .rev()
            .find(|s| crate::time::local(s.time_ns()) == norm)
            .ok_or_else(none);
    }
    let lower = spec.to_ascii_lowercase();
    if lower.is_empty() || !lower.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(none());
    }
    let mut m: Vec<T> = all
        .into_iter()
        .filter(|s| s.id().to_string().starts_with(&lower))
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

/// Appends signature pages to a new signature object.
pub(crate) struct SigWriter {
    pub id: SigId,
    w: Box<dyn ObjectWriter>,
    page_bytes: usize,
    slots: u32,
}

impl SigWriter {
    /// # Errors
    /// [`Error::Io`].
    pub fn create(backend: &dyn Backend, page_entries: u32) -> Result<SigWriter> {
        let id = SigId::random();
        let mut w = backend.create(&Key::sig(id))?;
        w.append(&sigfmt::header(FORMAT_VERSION, page_entries))?;
        Ok(SigWriter {
            id,
            w,
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
        self.w.append(&buf)?;
        self.slots += 1;
        Ok(self.slots - 1)
    }

    /// Completes the object (durable after the backend's sync); returns its
    /// size.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn finish(self) -> Result<u64> {
        let n = self.w.len();
        self.w.finish()?;
        Ok(n)
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
            format: 2,
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
