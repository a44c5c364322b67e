//! Repositories on S3-compatible object storage: `s3://bucket/prefix`.
//!
//! The keys are the local layout's paths under the prefix
//! (`packs/<id>.pack`, `snapshots/<id>.snap`, `config`, ...), so a local
//! repository copied with any S3 sync tool is an S3 repository, and back.
//!
//! How the contract of [`super::Backend`] is kept without rename or flock:
//!
//! - **Writes** are buffered per object and uploaded when the object is
//!   finished, in the background (one PUT, or a multipart upload of
//!   [`PART`] parts for a big pack), at most [`UPLOADS`] objects at a time;
//!   [`Backend::sync`] waits until every upload was acknowledged.
//! - **The commit** is one PUT with `If-None-Match: *`, issued after every
//!   upload was acknowledged.
//! - **One writer**: the lock is the object `locks/writer`, created with
//!   `If-None-Match: *` and rewritten (`If-Match` its last ETag) every
//!   [`REFRESH`] while held. A holder that stopped rewriting it for
//!   [`STALE`] by the server's clock (its `Last-Modified` against a probe
//!   object's) is taken over. A writer whose lock could not be rewritten
//!   for half of [`STALE`], or was taken over, refuses to commit.
//! - **Servers that ignore `If-None-Match`** (found by a probe when the
//!   lock is taken: the same key created twice) get one writer at a time
//!   by convention only, and a warning says so.
//!
//! The S3 client is the `object_store` crate (async); this backend owns its
//! runtime and blocks on it, so the rest of dsync stays synchronous. The
//! requests of [`Backend::read_many`] and the uploads are in flight
//! together, which 2 cores of rayon threads could not do.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::ahead::{self, Ahead};
use super::planned::{Planned, Unfilled};
use super::{Backend, Key, Kind, LockGuard, Object, ObjectWriter};
use crate::error::{Error, Result};

/// Objects larger than this go up as multipart uploads.
const SINGLE_PUT_MAX: usize = 32 << 20;
/// A multipart upload's part size.
const PART: usize = 16 << 20;
/// Parts of one object in flight at once.
const PARTS_IN_FLIGHT: usize = 8;
/// Finished objects uploading at once; a writer that finishes one more
/// waits (the buffered bytes are bounded by this many packs).
const UPLOADS: usize = 4;
/// Requests in flight for reads of many objects.
const READS_IN_FLIGHT: usize = 32;
/// Bytes a sequential read fetches ahead, in ranges of [`RANGE`]: a GET
/// costs a round trip whatever its size (and on s3s-fs 35 ms of Nagle),
/// so fewer and bigger than over ssh. Restoring the 2 GiB image from
/// s3s-fs: 4,152 GETs in 17 s with the ssh backend's 8 MiB in 512 KiB.
const WINDOW: u64 = 32 << 20;
const RANGE: u64 = 4 << 20;
/// Bytes announced reads ([`Object::will_read`]: a restore's next frames)
/// fetched ahead at most, in ranges of at most [`RANGE`], and how many of
/// those in flight at once.
const PLANNED: u64 = 96 << 20;
const FETCHES_IN_FLIGHT: usize = 16;
/// How often a held lock is rewritten.
pub const REFRESH: Duration = Duration::from_secs(5 * 60);
/// A lock not rewritten for this long (server time) belongs to a writer
/// that is gone.
pub const STALE: Duration = Duration::from_secs(30 * 60);

/// The key of the writer lock.
const LOCK: &str = "locks/writer";
/// Where prune's marks go (see [`Backend::removal_grace`]).
const MARKS: &str = "pending";
/// Where a multipart upload in progress is recorded: one object each,
/// `<key>\n<upload id>\n`, removed when the upload completes.
const UPLOADS_DIR: &str = "uploads";

/// How long objects a prune found unreferenced stay marked before a later
/// prune removes them: `DSYNC_S3_GRACE` seconds, else a day (rustic's
/// 23 h, kopia's epochs of 24 h), so a writer whose lock went stale and a
/// mount reading an old pack are done long before.
pub fn grace() -> Duration {
    std::env::var("DSYNC_S3_GRACE")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(24 * 3600))
}

/// An `s3://bucket/prefix` address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// The key prefix, without leading or trailing `/` (may be empty).
    pub prefix: String,
}

impl S3Url {
    /// The address `path` names, if it is an `s3://` one.
    pub fn parse(path: &Path) -> Option<S3Url> {
        let s = path.to_str()?.strip_prefix("s3://")?;
        let (bucket, prefix) = s.split_once('/').unwrap_or((s, ""));
        if bucket.is_empty() {
            return None;
        }
        Some(S3Url {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.as_str() {
            "" => write!(f, "s3://{}", self.bucket),
            p => write!(f, "s3://{}/{p}", self.bucket),
        }
    }
}

struct Shared {
    store: Arc<dyn ObjectStore>,
    /// The same store, for multipart uploads by their ids.
    multipart: Arc<dyn MultipartStore>,
    /// The upload records ([`UPLOADS_DIR`]) of this process's uploads in
    /// flight, which its own prune must not abort.
    own_records: Mutex<HashSet<String>>,
    prefix: String,
    url: String,
    /// Bytes read ahead for sequential readers, shared by all objects.
    ahead: Mutex<Ahead>,
    /// Ranges announced by readers (a restore), fetched ahead.
    planned: Planned,
    /// Announced fetches in flight at most.
    fetches: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    fn path(&self, key: &str) -> ObjPath {
        match self.prefix.as_str() {
            "" => ObjPath::from(key),
            p => ObjPath::from(format!("{p}/{key}")),
        }
    }

    fn err(&self, key: &str, e: object_store::Error) -> Error {
        use std::io::ErrorKind;
        let kind = match &e {
            object_store::Error::NotFound { .. } => ErrorKind::NotFound,
            object_store::Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            object_store::Error::Precondition { .. } => ErrorKind::AlreadyExists,
            _ => ErrorKind::Other,
        };
        Error::io(
            format!("{}/{key}", self.url),
            std::io::Error::new(kind, e.to_string()),
        )
    }

    async fn upload(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let p = self.path(key);
        if bytes.len() <= SINGLE_PUT_MAX {
            // Never over an object (the names are fresh: a server that
            // ignores the condition costs nothing either).
            let create = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            self.store
                .put_opts(&p, PutPayload::from(bytes), create)
                .await
                .map_err(|e| self.err(key, e))?;
            return Ok(());
        }
        let up = self
            .multipart
            .create_multipart(&p)
            .await
            .map_err(|e| self.err(key, e))?;
        // Recorded before any part goes up, so that a prune can abort it if
        // this process stops midway: the server keeps an incomplete upload's
        // parts, and bills them, until it is aborted, and S3 lists them only
        // through a call the client crate lacks. (A stop between the two
        // requests is the one way to leave an upload no record names: a
        // bucket lifecycle rule, AbortIncompleteMultipartUpload, catches it.)
        let record = format!("{UPLOADS_DIR}/{:016x}", crate::id::random_u64());
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let noted = self
            .store
            .put_opts(
                &self.path(&record),
                PutPayload::from(format!("{key}\n{up}\n").into_bytes()),
                create,
            )
            .await;
        if let Err(e) = noted {
            let _ = self.multipart.abort_multipart(&p, &up).await;
            return Err(self.err(&record, e));
        }
        if let Ok(mut r) = self.own_records.lock() {
            r.insert(record.clone());
        }
        let bytes = bytes::Bytes::from(bytes);
        let sent = async {
            let parts: Vec<object_store::multipart::PartId> =
                futures::stream::iter((0..bytes.len().div_ceil(PART)).map(|i| {
                    let part = bytes.slice(i * PART..((i + 1) * PART).min(bytes.len()));
                    self.multipart.put_part(&p, &up, i, PutPayload::from(part))
                }))
                .buffered(PARTS_IN_FLIGHT)
                .try_collect()
                .await?;
            self.multipart.complete_multipart(&p, &up, parts).await
        }
        .await;
        if let Err(e) = sent {
            let _ = self.multipart.abort_multipart(&p, &up).await;
            let _ = self.store.delete(&self.path(&record)).await;
            return Err(self.err(key, e));
        }
        // A record left behind (this delete failed) only makes a prune
        // abort an upload that is already complete, which does nothing.
        let _ = self.store.delete(&self.path(&record)).await;
        if let Ok(mut r) = self.own_records.lock() {
            r.remove(&record);
        }
        Ok(())
    }

    /// Aborts the multipart uploads that other processes recorded and did
    /// not finish; returns how many. The caller holds the writer lock.
    async fn abort_recorded(&self) -> Result<usize> {
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&self.path(UPLOADS_DIR)))
            .try_collect()
            .await
            .map_err(|e| self.err(UPLOADS_DIR, e))?;
        let mut aborted = 0;
        for m in metas {
            let Some(name) = m.location.filename() else {
                continue;
            };
            let record = format!("{UPLOADS_DIR}/{name}");
            let mine = self
                .own_records
                .lock()
                .map_or(true, |r| r.contains(&record));
            if mine {
                continue;
            }
            let body = async { self.store.get(&m.location).await?.bytes().await }
                .await
                .map_err(|e| self.err(&record, e))?;
            let text = String::from_utf8_lossy(&body);
            let mut lines = text.lines();
            let (Some(key), Some(id)) = (lines.next(), lines.next()) else {
                return Err(Error::corrupt(
                    format!("{}/{record}", self.url),
                    0,
                    "not an upload record (key and upload id lines)",
                ));
            };
            match self
                .multipart
                .abort_multipart(&self.path(key), &id.to_string())
                .await
            {
                // Gone already: completed, aborted, or expired by a rule.
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err(key, e)),
            }
            match self.store.delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err(&record, e)),
            }
            aborted += 1;
        }
        Ok(aborted)
    }
}

/// What the lock's refresher and the commit share.
struct Held {
    /// A lock not rewritten for this long is another's to take.
    stale: Duration,
    /// Set when the lock could not be rewritten, or was taken over.
    lost: AtomicBool,
    /// When the lock was last written.
    fresh: Mutex<Instant>,
    stop: AtomicBool,
}

impl Held {
    /// Whether a commit may still go ahead under this lock.
    fn valid(&self) -> bool {
        !self.lost.load(Ordering::SeqCst)
            && self
                .fresh
                .lock()
                .map(|t| t.elapsed() < self.stale / 2)
                .unwrap_or(false)
    }
}

/// An object's key and its upload.
type Upload = (String, tokio::task::JoinHandle<Result<()>>);

/// The uploads of finished objects, in flight.
struct Uploads {
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    pending: Mutex<VecDeque<Upload>>,
}

impl Uploads {
    fn pending(&self) -> Result<std::sync::MutexGuard<'_, VecDeque<Upload>>> {
        self.pending
            .lock()
            .map_err(|_| Error::Internal("s3 uploads poisoned".into()))
    }

    /// Waits for one upload.
    fn join(&self, (_, h): Upload) -> Result<()> {
        self.handle
            .block_on(h)
            .map_err(|e| Error::Internal(format!("s3 upload: {e}")))?
    }

    /// Waits for the upload of `key`, if it is in flight: what this
    /// process wrote reads back.
    fn wait_for(&self, key: &str) -> Result<()> {
        let mine: VecDeque<Upload> = {
            let mut q = self.pending()?;
            let (mine, rest): (VecDeque<Upload>, VecDeque<Upload>) =
                q.drain(..).partition(|(k, _)| k == key);
            *q = rest;
            mine
        };
        mine.into_iter().try_for_each(|u| self.join(u))
    }

    /// Queues the upload of a finished object, waiting for the oldest when
    /// [`UPLOADS`] are in flight.
    fn start(&self, key: &Key, bytes: Vec<u8>) -> Result<()> {
        let s = self.shared.clone();
        let k = key.path();
        let h = self.handle.spawn({
            let k = k.clone();
            async move { s.upload(&k, bytes).await }
        });
        let oldest = {
            let mut q = self.pending()?;
            q.push_back((k, h));
            if q.len() > UPLOADS {
                q.pop_front()
            } else {
                None
            }
        };
        match oldest {
            Some(h) => self.join(h),
            None => Ok(()),
        }
    }

    /// Waits for every upload; the first failure.
    fn wait_all(&self) -> Result<()> {
        let all: Vec<_> = self.pending()?.drain(..).collect();
        let mut first = Ok(());
        for h in all {
            let r = self.join(h);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// A repository in an S3 bucket.
pub struct S3Backend {
    shared: Arc<Shared>,
    uploads: Arc<Uploads>,
    held: Mutex<Option<Arc<Held>>>,
    /// See [`grace`].
    grace: Duration,
    /// How often a held lock is rewritten, and when one not rewritten is
    /// stale: [`REFRESH`], [`STALE`].
    lock_times: (Duration, Duration),
    // Last: dropped after everything that holds its handle.
    rt: tokio::runtime::Runtime,
}

impl S3Backend {
    /// The bucket and prefix of `url` on the server the environment names:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` (default
    /// us-east-1), `AWS_ENDPOINT_URL` (a self-hosted server: path-style
    /// requests, http allowed).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the client cannot be set up.
    pub fn connect(url: &S3Url) -> Result<S3Backend> {
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&url.bucket);
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            b = b.with_region("us-east-1");
        } else if let Ok(r) = std::env::var("AWS_REGION") {
            b = b.with_region(r);
        }
        if let Ok(e) = std::env::var("AWS_ENDPOINT_URL") {
            b = b
                .with_endpoint(&e)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(e.starts_with("http://"));
        }
        let store = b
            .build()
            .map_err(|e| Error::InvalidInput(format!("{url}: {e}")))?;
        S3Backend::on(Arc::new(store), url)
    }

    /// A repository at `url`'s prefix of `store` (tests give an in-memory
    /// store).
    ///
    /// # Errors
    /// [`Error::Io`] when the runtime cannot start.
    pub fn on<S: ObjectStore + MultipartStore>(store: Arc<S>, url: &S3Url) -> Result<S3Backend> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dsync-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io(url.to_string(), e))?;
        let shared = Arc::new(Shared {
            store: store.clone(),
            multipart: store,
            own_records: Mutex::new(HashSet::new()),
            prefix: url.prefix.clone(),
            url: url.to_string(),
            ahead: Mutex::new(Ahead::with_window(WINDOW)),
            planned: Planned::new(PLANNED, RANGE),
            fetches: Arc::new(tokio::sync::Semaphore::new(FETCHES_IN_FLIGHT)),
        });
        Ok(S3Backend {
            uploads: Arc::new(Uploads {
                shared: shared.clone(),
                handle: rt.handle().clone(),
                pending: Mutex::new(VecDeque::new()),
            }),
            shared,
            held: Mutex::new(None),
            grace: grace(),
            lock_times: (REFRESH, STALE),
            rt,
        })
    }

    /// This backend with marks due after `grace` instead of [`grace`]'s.
    pub fn with_grace(mut self, grace: Duration) -> S3Backend {
        self.grace = grace;
        self
    }

    /// This backend with its lock rewritten every `refresh` and taken as
    /// stale after `stale` (tests: seconds, not minutes).
    pub fn with_lock_times(mut self, refresh: Duration, stale: Duration) -> S3Backend {
        self.lock_times = (refresh, stale);
        self
    }

    /// Whether the repository's config object exists.
    ///
    /// # Errors
    /// [`Error::Io`] when the server cannot be asked.
    pub fn holds_repository(&self) -> Result<bool> {
        let s = &self.shared;
        match self.rt.block_on(s.store.head(&s.path("config"))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(s.err("config", e)),
        }
    }

    /// The server's clock now: the Last-Modified of a probe object.
    fn server_now(&self) -> Result<chrono::DateTime<chrono::Utc>> {
        let s = &self.shared;
        let k = format!("locks/clock-{:016x}", crate::id::random_u64());
        let p = s.path(&k);
        self.rt
            .block_on(s.store.put(&p, PutPayload::from_static(b"")))
            .map_err(|e| s.err(&k, e))?;
        let meta = self.rt.block_on(s.store.head(&p)).map_err(|e| s.err(&k, e));
        let _ = self.rt.block_on(s.store.delete(&p));
        Ok(meta?.last_modified)
    }

    /// Whether the server refuses to create an object that exists: the
    /// same probe key created twice.
    pub(super) fn honours_if_none_match(&self) -> Result<bool> {
        let s = &self.shared;
        let k = format!("locks/probe-{:016x}", crate::id::random_u64());
        let p = s.path(&k);
        let create = || PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.rt
            .block_on(
                s.store
                    .put_opts(&p, PutPayload::from_static(b"1"), create()),
            )
            .map_err(|e| s.err(&k, e))?;
        let second = self.rt.block_on(s.store.put_opts(
            &p,
            PutPayload::from_static(b"2"),
            create(),
        ));
        let _ = self.rt.block_on(s.store.delete(&p));
        match second {
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) => Err(s.err(&k, e)),
        }
    }

    /// Creates the lock object (`update`: over the version given, a stale
    /// holder's); its new version.
    fn write_lock(&self, update: Option<UpdateVersion>) -> Result<UpdateVersion> {
        let s = &self.shared;
        let mode = match update {
            Some(v) => PutMode::Update(v),
            None => PutMode::Create,
        };
        let record = super::holder_record();
        let r = self
            .rt
            .block_on(s.store.put_opts(
                &s.path(LOCK),
                PutPayload::from(record.into_bytes()),
                PutOptions {
                    mode,
                    ..Default::default()
                },
            ))
            .map_err(|e| s.err(LOCK, e))?;
        Ok(UpdateVersion {
            e_tag: r.e_tag,
            version: r.version,
        })
    }
}

/// What a writer is told on a server that ignores `If-None-Match: *`.
pub(super) fn single_writer_warning(url: &str) -> String {
    format!(
        "{url}: the server ignores If-None-Match, so dsync cannot keep two writers apart: \
         run one backup or prune at a time (single-writer mode)"
    )
}

/// Rewrites the lock every [`REFRESH`] until stopped; marks it lost when a
/// rewrite fails.
fn refresher(
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    held: Arc<Held>,
    mut version: UpdateVersion,
    refresh: Duration,
) {
    let tick = Duration::from_millis(200);
    let mut since = Instant::now();
    while !held.stop.load(Ordering::SeqCst) {
        std::thread::sleep(tick);
        if since.elapsed() < refresh {
            continue;
        }
        since = Instant::now();
        let r = handle.block_on(shared.store.put_opts(
            &shared.path(LOCK),
            PutPayload::from(super::holder_record().into_bytes()),
            PutOptions {
                mode: PutMode::Update(version.clone()),
                ..Default::default()
            },
        ));
        match r {
            Ok(p) => {
                version = UpdateVersion {
                    e_tag: p.e_tag,
                    version: p.version,
                };
                if let Ok(mut t) = held.fresh.lock() {
                    *t = Instant::now();
                }
            }
            // Taken over: this writer must not commit any more.
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => {
                held.lost.store(true, Ordering::SeqCst);
                return;
            }
            // A failed rewrite is tried again; the commit checks freshness.
            Err(_) => {}
        }
    }
    // Released: the lock object goes if it is still this writer's.
    let p = shared.path(LOCK);
    if let Ok(m) = handle.block_on(shared.store.head(&p)) {
        if m.e_tag == version.e_tag && !held.lost.load(Ordering::SeqCst) {
            let _ = handle.block_on(shared.store.delete(&p));
        }
    }
}

/// Stops the refresher (which then removes the lock) when dropped.
struct Release {
    held: Arc<Held>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.held.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct S3Object {
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    key: Key,
    /// The key's path in the repository.
    path: String,
    len: u64,
}

impl Object for S3Object {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset + buf.len() as u64 > self.len {
            return Err(Error::io(
                format!("{}/{}", self.shared.url, self.path),
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        if self.shared.planned.read(&self.key, offset, buf) {
            return Ok(());
        }
        ahead::read_through(
            &self.shared.ahead,
            &self.key,
            self.len,
            offset,
            buf,
            |at, b| self.fetch(at, b),
        )
    }

    fn will_read(&self, ranges: &[(u64, u64)]) {
        let s = &self.shared;
        for (start, end, slot) in s.planned.plan(&self.key, ranges) {
            let (shared, p) = (s.clone(), s.path(&self.path));
            let slot = Unfilled(slot);
            self.handle.spawn(async move {
                let got = match shared.fetches.acquire().await {
                    Ok(_permit) => shared.store.get_range(&p, start..end).await.ok(),
                    Err(_) => None,
                };
                slot.0.fill(got.filter(|b| b.len() as u64 == end - start));
            });
        }
    }
}

impl S3Object {
    /// Fills `buf` from `offset`: ranges of [`RANGE`] in flight together.
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let s = &self.shared;
        let p = s.path(&self.path);
        let piece = RANGE as usize;
        let ranges: Vec<std::ops::Range<u64>> = (0..buf.len())
            .step_by(piece)
            .map(|a| offset + a as u64..offset + (a + piece).min(buf.len()) as u64)
            .collect();
        let got: Vec<bytes::Bytes> = self
            .handle
            .block_on(
                futures::stream::iter(ranges.into_iter().map(|r| s.store.get_range(&p, r)))
                    .buffered(READS_IN_FLIGHT)
                    .try_collect(),
            )
            .map_err(|e| s.err(&self.path, e))?;
        let mut at = 0;
        for b in got {
            let end = at + b.len();
            if end > buf.len() {
                break;
            }
            buf[at..end].copy_from_slice(&b);
            at = end;
        }
        if at != buf.len() {
            return Err(Error::io(
                format!("{}/{}", s.url, self.path),
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        Ok(())
    }
}

/// A new object, kept in memory until finished.
struct S3Writer {
    uploads: Arc<Uploads>,
    key: Key,
    bytes: Vec<u8>,
}

impl ObjectWriter for S3Writer {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn finish(self: Box<Self>) -> Result<()> {
        let S3Writer {
            uploads,
            key,
            bytes,
        } = *self;
        uploads.start(&key, bytes)
    }
}

impl Backend for S3Backend {
    fn location(&self) -> PathBuf {
        PathBuf::from(&self.shared.url)
    }

    fn read(&self, key: &Key) -> Result<Vec<u8>> {
        let s = &self.shared;
        let k = key.path();
        self.uploads.wait_for(&k)?;
        self.rt.block_on(async {
            let r = s.store.get(&s.path(&k)).await.map_err(|e| s.err(&k, e))?;
            let b = r.bytes().await.map_err(|e| s.err(&k, e))?;
            Ok(b.to_vec())
        })
    }

    fn read_many(&self, keys: &[Key]) -> Vec<Result<Vec<u8>>> {
        let s = &self.shared;
        if let Err(e) = keys
            .iter()
            .try_for_each(|k| self.uploads.wait_for(&k.path()))
        {
            let msg = e.to_string();
            return keys
                .iter()
                .map(|_| Err(Error::Internal(msg.clone())))
                .collect();
        }
        self.rt.block_on(
            futures::stream::iter(keys.iter().map(|key| async move {
                let k = key.path();
                let r = s.store.get(&s.path(&k)).await.map_err(|e| s.err(&k, e))?;
                let b = r.bytes().await.map_err(|e| s.err(&k, e))?;
                Ok(b.to_vec())
            }))
            .buffered(READS_IN_FLIGHT)
            .collect(),
        )
    }

    fn open(&self, key: &Key) -> Result<Arc<dyn Object>> {
        let s = &self.shared;
        let k = key.path();
        self.uploads.wait_for(&k)?;
        let meta = self
            .rt
            .block_on(s.store.head(&s.path(&k)))
            .map_err(|e| s.err(&k, e))?;
        Ok(Arc::new(S3Object {
            shared: s.clone(),
            handle: self.rt.handle().clone(),
            key: key.clone(),
            path: k,
            len: meta.size,
        }))
    }

    fn open_sized(&self, key: &Key, len: u64) -> Result<Arc<dyn Object>> {
        let k = key.path();
        self.uploads.wait_for(&k)?;
        Ok(Arc::new(S3Object {
            shared: self.shared.clone(),
            handle: self.rt.handle().clone(),
            key: key.clone(),
            path: k,
            len,
        }))
    }

    fn list(&self, kind: Kind) -> Result<Vec<(String, u64)>> {
        let s = &self.shared;
        if kind == Kind::Config {
            return match self.rt.block_on(s.store.head(&s.path("config"))) {
                Ok(m) => Ok(vec![("config".into(), m.size)]),
                Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
                Err(e) => Err(s.err("config", e)),
            };
        }
        self.uploads.wait_all()?;
        let dir = s.path(kind.dir());
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(s.store.list(Some(&dir)).try_collect())
            .map_err(|e| s.err(kind.dir(), e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                let stem = name.strip_suffix(kind.suffix())?;
                // Only the kind's own directory, not deeper.
                (m.location.prefix_match(&dir)?.count() == 1).then(|| (stem.to_string(), m.size))
            })
            .collect())
    }

    fn create(&self, key: &Key) -> Result<Box<dyn ObjectWriter>> {
        Ok(Box::new(S3Writer {
            uploads: self.uploads.clone(),
            key: key.clone(),
            bytes: Vec::new(),
        }))
    }

    fn put(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        self.uploads.start(key, bytes.to_vec())
    }

    fn sync(&self) -> Result<()> {
        self.uploads.wait_all()
    }

    fn commit(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        // Everything the commit names was acknowledged first.
        self.sync()?;
        let s = &self.shared;
        let k = key.path();
        if let Some(h) = self.held.lock().ok().and_then(|h| h.clone()) {
            if !h.valid() {
                return Err(Error::io(
                    format!("{}/{LOCK}", s.url),
                    std::io::Error::other(
                        "the writer lock was lost (not rewritten in time, or taken over); nothing committed",
                    ),
                ));
            }
        }
        self.rt
            .block_on(s.store.put_opts(
                &s.path(&k),
                PutPayload::from(bytes.to_vec()),
                PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                },
            ))
            .map_err(|e| s.err(&k, e))?;
        Ok(())
    }

    fn replace(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        let s = &self.shared;
        let k = key.path();
        self.rt
            .block_on(s.store.put(&s.path(&k), PutPayload::from(bytes.to_vec())))
            .map_err(|e| s.err(&k, e))?;
        Ok(())
    }

    fn remove(&self, keys: &[Key]) -> Result<()> {
        let s = &self.shared;
        let paths: Vec<object_store::Result<ObjPath>> =
            keys.iter().map(|k| Ok(s.path(&k.path()))).collect();
        let results: Vec<object_store::Result<ObjPath>> = self.rt.block_on(
            s.store
                .delete_stream(futures::stream::iter(paths).boxed())
                .collect(),
        );
        for r in results {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(s.err("(delete)", e)),
            }
        }
        Ok(())
    }

    fn removal_grace(&self) -> Option<Duration> {
        Some(self.grace)
    }

    fn mark(&self, keys: &[Key]) -> Result<()> {
        let s = &self.shared;
        let k = format!("{MARKS}/{:016x}", crate::id::random_u64());
        let mut body = String::new();
        for key in keys {
            body.push_str(&key.path());
            body.push('\n');
        }
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.rt
            .block_on(
                s.store
                    .put_opts(&s.path(&k), PutPayload::from(body.into_bytes()), create),
            )
            .map_err(|e| s.err(&k, e))?;
        Ok(())
    }

    fn marks(&self) -> Result<Vec<super::Mark>> {
        let s = &self.shared;
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(s.store.list(Some(&s.path(MARKS))).try_collect())
            .map_err(|e| s.err(MARKS, e))?;
        if metas.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.server_now()?;
        let grace = self.grace;
        let mut out = Vec::new();
        for m in metas {
            let Some(name) = m.location.filename().map(str::to_string) else {
                continue;
            };
            let k = format!("{MARKS}/{name}");
            let body = self
                .rt
                .block_on(async { s.store.get(&m.location).await?.bytes().await })
                .map_err(|e| s.err(&k, e))?;
            let text = std::str::from_utf8(&body)
                .map_err(|_| Error::corrupt(format!("{}/{k}", s.url), 0, "not text"))?;
            let keys = text
                .lines()
                .map(|l| {
                    Key::parse(l).ok_or_else(|| {
                        Error::corrupt(format!("{}/{k}", s.url), 0, format!("not a key: {l:?}"))
                    })
                })
                .collect::<Result<Vec<Key>>>()?;
            let age = (now - m.last_modified).to_std().unwrap_or_default();
            out.push(super::Mark {
                name,
                keys,
                due: age >= grace,
            });
        }
        Ok(out)
    }

    fn unmark(&self, name: &str) -> Result<()> {
        let s = &self.shared;
        let k = format!("{MARKS}/{name}");
        match self.rt.block_on(s.store.delete(&s.path(&k))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s.err(&k, e)),
        }
    }

    fn clean_interrupted(&self) -> Result<usize> {
        self.rt.block_on(self.shared.abort_recorded())
    }

    fn lock(&self) -> Result<LockGuard> {
        let s = &self.shared;
        if !self.honours_if_none_match()? {
            eprintln!("dsync: warning: {}", single_writer_warning(&s.url));
        }
        let (version, took_over) = match self.write_lock(None) {
            Ok(v) => (v, None),
            Err(e) if e.is_already_exists() => {
                let p = s.path(LOCK);
                let meta = self
                    .rt
                    .block_on(s.store.head(&p))
                    .map_err(|e| s.err(LOCK, e))?;
                let holder = self
                    .rt
                    .block_on(async { s.store.get(&p).await?.bytes().await })
                    .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                    .unwrap_or_default();
                let now = self.server_now()?;
                let age = (now - meta.last_modified).to_std().unwrap_or_default();
                if age < self.lock_times.1 {
                    return Err(Error::Locked {
                        path: self.location(),
                        holder,
                    });
                }
                let stale = UpdateVersion {
                    e_tag: meta.e_tag,
                    version: meta.version,
                };
                match self.write_lock(Some(stale)) {
                    Ok(v) => (
                        v,
                        Some(format!(
                            "{holder} (its lock not rewritten for {} s)",
                            age.as_secs()
                        )),
                    ),
                    Err(e) if e.is_already_exists() => {
                        return Err(Error::Locked {
                            path: self.location(),
                            holder: "another writer that took over a stale lock".into(),
                        })
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let held = Arc::new(Held {
            stale: self.lock_times.1,
            lost: AtomicBool::new(false),
            fresh: Mutex::new(Instant::now()),
            stop: AtomicBool::new(false),
        });
        if let Ok(mut h) = self.held.lock() {
            *h = Some(held.clone());
        }
        let (shared, handle, h2) = (s.clone(), self.rt.handle().clone(), held.clone());
        let refresh = self.lock_times.0;
        let thread = std::thread::Builder::new()
            .name("dsync-s3-lock".into())
            .spawn(move || refresher(shared, handle, h2, version, refresh))
            .map_err(|e| Error::io(format!("{}/{LOCK}", s.url), e))?;
        Ok(LockGuard {
            _inner: Box::new(Release {
                held,
                thread: Some(thread),
            }),
            took_over,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_addresses_parse() {
        let p = |s: &str| S3Url::parse(Path::new(s));
        assert_eq!(
            p("s3://b/x/y/"),
            Some(S3Url {
                bucket: "b".into(),
                prefix: "x/y".into()
            })
        );
        assert_eq!(p("s3://b").map(|u| u.prefix), Some(String::new()));
        assert_eq!(p("s3:///x"), None);
        assert_eq!(p("/s3://b"), None);
        assert_eq!(
            p("s3://b/x").map(|u| u.to_string()),
            Some("s3://b/x".into())
        );
    }
}
