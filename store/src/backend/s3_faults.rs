//! The S3 crash test: a backup stopped at every request in turn, against
//! `object_store`'s in-memory store behind a wrapper that fails every
//! mutating request after a budget (a process killed between two requests
//! leaves what the earlier ones stored). After each stop every earlier
//! snapshot must restore byte for byte, and the next backup must work.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::memory::InMemory;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartId, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    UploadPart,
};

use super::{S3Backend, S3Url};
use crate::backup::{backup, BackupOptions, NoProgress};
use crate::format::config::Config;
use crate::repo::Repo;
use crate::testdata::pseudo;

/// Mutating requests (PUT, each multipart part and completion, DELETE,
/// COPY) left before every later one fails; `None` is no limit.
#[derive(Debug, Default)]
struct Budget(Mutex<Option<u64>>);

impl Budget {
    fn spend(&self) -> object_store::Result<()> {
        let mut b = self.0.lock().map_err(|_| stopped())?;
        match &mut *b {
            Some(0) => Err(stopped()),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

fn stopped() -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: "injected fault: the writer stopped here".into(),
    }
}

#[derive(Debug)]
struct Faulty {
    inner: InMemory,
    budget: Arc<Budget>,
    /// Multipart uploads begun and neither completed nor aborted: what
    /// the server would keep, and bill, for ever.
    open_uploads: Mutex<std::collections::HashSet<MultipartId>>,
    /// Writes `If-None-Match: *` PUTs over what exists, as Garage 2.5 and
    /// s3rver do.
    ignores_if_none_match: bool,
}

impl Faulty {
    fn new() -> Faulty {
        Faulty {
            inner: InMemory::new(),
            budget: Arc::default(),
            open_uploads: Mutex::default(),
            ignores_if_none_match: false,
        }
    }
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    budget: Arc<Budget>,
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        match self.budget.spend() {
            Ok(()) => self.inner.put_part(data),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.budget.spend()?;
        self.inner.complete().await
    }
    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[async_trait]
impl MultipartStore for Faulty {
    async fn create_multipart(&self, path: &ObjPath) -> object_store::Result<MultipartId> {
        self.budget.spend()?;
        let id = self.inner.create_multipart(path).await?;
        self.open_uploads
            .lock()
            .map_err(|_| stopped())?
            .insert(id.clone());
        Ok(id)
    }
    async fn put_part(
        &self,
        path: &ObjPath,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        self.budget.spend()?;
        self.inner.put_part(path, id, part_idx, data).await
    }
    async fn complete_multipart(
        &self,
        path: &ObjPath,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        self.budget.spend()?;
        let r = self.inner.complete_multipart(path, id, parts).await?;
        self.open_uploads.lock().map_err(|_| stopped())?.remove(id);
        Ok(r)
    }
    async fn abort_multipart(&self, path: &ObjPath, id: &MultipartId) -> object_store::Result<()> {
        self.budget.spend()?;
        if !self.open_uploads.lock().map_err(|_| stopped())?.remove(id) {
            return Err(object_store::Error::NotFound {
                path: path.to_string(),
                source: "no such upload".into(),
            });
        }
        self.inner.abort_multipart(path, id).await
    }
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &ObjPath,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.budget.spend()?;
        if self.ignores_if_none_match && opts.mode == object_store::PutMode::Create {
            opts.mode = object_store::PutMode::Overwrite;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.budget.spend()?;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            budget: self.budget.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &ObjPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjPath>> {
        let budget = self.budget.clone();
        let inner = self.inner.clone();
        locations
            .then(move |p| {
                let (budget, inner) = (budget.clone(), inner.clone());
                async move {
                    let p = p?;
                    budget.spend()?;
                    inner.delete(&p).await?;
                    Ok(p)
                }
            })
            .boxed()
    }

    fn list(
        &self,
        prefix: Option<&ObjPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjPath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjPath,
        to: &ObjPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.budget.spend()?;
        self.inner.copy_opts(from, to, options).await
    }
}

fn url() -> S3Url {
    S3Url::parse(Path::new("s3://bucket/repo")).unwrap()
}

fn open(store: &Arc<Faulty>) -> Repo {
    Repo::open_on(
        Arc::new(S3Backend::on(store.clone(), &url()).unwrap()),
        1 << 20,
    )
    .unwrap()
}

/// The bytes of `name` in snapshot `i` (oldest first).
fn restored(repo: &Repo, i: usize, dir: &Path) -> Vec<u8> {
    let snaps = repo.snapshots().unwrap();
    let out = dir.join(format!("out-{i}"));
    let _ = std::fs::remove_file(&out);
    crate::restore::restore(repo, &snaps[i], Some("disk.img"), &out, true, &NoProgress).unwrap();
    std::fs::read(&out).unwrap()
}

#[test]
fn a_backup_stopped_at_any_s3_request_leaves_every_earlier_snapshot_whole() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let store = Arc::new(Faulty::new());
    // Packs of 40 MiB and more go up in parts: the second version has them.
    let v0 = pseudo(3 << 20, 1);
    let mut v1 = v0.clone();
    v1[1 << 20..(1 << 20) + 4096].copy_from_slice(&pseudo(4096, 2));
    v1.extend_from_slice(&pseudo(40 << 20, 3));
    std::fs::write(&img, &v0).unwrap();
    let config = Config::default();
    Repo::init_on(
        Arc::new(S3Backend::on(store.clone(), &url()).unwrap()),
        config,
    )
    .unwrap();
    backup(
        &open(&store),
        std::slice::from_ref(&img),
        &BackupOptions::default(),
        &NoProgress,
    )
    .unwrap();
    std::fs::write(&img, &v1).unwrap();

    let mut stops = 0;
    for n in 0.. {
        *store.budget.0.lock().unwrap() = Some(n);
        let r = backup(
            &open(&store),
            std::slice::from_ref(&img),
            &BackupOptions::default(),
            &NoProgress,
        );
        *store.budget.0.lock().unwrap() = None;
        if r.is_ok() {
            break;
        }
        stops += 1;
        assert!(n < 500, "the backup never finished");
        // A writer killed holding the lock leaves it; 30 minutes later it
        // is stale. Here: now.
        let lock = ObjPath::from("repo/locks/writer");
        let _ = futures::executor::block_on(store.inner.delete(&lock));
        let repo = open(&store);
        let snaps = repo.snapshots().unwrap();
        assert!(!snaps.is_empty() && snaps.len() <= 2, "after stop {n}");
        assert_eq!(
            restored(&repo, 0, d.path()),
            v0,
            "the first snapshot after stop {n}"
        );
        if snaps.len() == 2 {
            // Stopped after the commit (the lock's release): whole.
            assert_eq!(restored(&repo, 1, d.path()), v1, "after stop {n}");
            let extra = repo.snapshots().unwrap()[1].id;
            crate::prune::forget(&repo, &[extra]).unwrap();
        }
    }
    assert!(stops >= 8, "only {stops} requests to stop at");
    let repo = open(&store);
    let snaps = repo.snapshots().unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(restored(&repo, 0, d.path()), v0);
    assert_eq!(restored(&repo, 1, d.path()), v1);
    // And it checks clean, the stopped backups' leftovers being garbage.
    let report = crate::check::check(
        &repo,
        &crate::check::CheckOptions {
            read_data: true,
            subset: None,
        },
        &NoProgress,
    )
    .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems.len());
}

#[test]
fn prune_on_s3_marks_first_and_a_later_prune_removes_what_is_still_unused() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let store = Arc::new(Faulty::new());
    let on = |grace: u64| {
        let b = S3Backend::on(store.clone(), &url())
            .unwrap()
            .with_grace(std::time::Duration::from_secs(grace));
        Repo::open_on(Arc::new(b), 1 << 20).unwrap()
    };
    Repo::init_on(
        Arc::new(S3Backend::on(store.clone(), &url()).unwrap()),
        Config::default(),
    )
    .unwrap();
    let v0 = pseudo(2 << 20, 7);
    let v1 = pseudo(2 << 20, 8);
    for v in [&v0, &v1] {
        std::fs::write(&img, v).unwrap();
        backup(
            &on(3600),
            std::slice::from_ref(&img),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    }
    let packs = |r: &Repo| r.backend().list(crate::backend::Kind::Pack).unwrap().len();
    let r = on(3600);
    let before = packs(&r);
    let old = r.snapshots().unwrap()[0].id;
    crate::prune::forget(&r, &[old]).unwrap();
    let rep = crate::gc::gc(&r, 0.0, false, &NoProgress).unwrap();
    assert!(rep.marked > 0, "{rep:?}");
    assert_eq!(packs(&r), before, "nothing removed in the first phase");
    let marks = r.backend().marks().unwrap();
    assert_eq!(marks.len(), 1);
    assert!(!marks[0].due);
    // Within the grace, a second prune marks nothing more and removes nothing.
    let rep = crate::gc::gc(&r, 0.0, false, &NoProgress).unwrap();
    assert_eq!((rep.marked, packs(&r)), (0, before));
    // Past it, the marked objects go, and the mark with them.
    let r = on(0);
    crate::gc::gc(&r, 0.0, false, &NoProgress).unwrap();
    assert!(packs(&r) < before);
    assert!(r.backend().marks().unwrap().is_empty());
    assert_eq!(restored(&r, 0, d.path()), v1);
}

#[test]
fn a_server_that_ignores_if_none_match_is_found_and_a_writer_warned() {
    let honest = S3Backend::on(Arc::new(Faulty::new()), &url()).unwrap();
    assert!(honest.honours_if_none_match().unwrap());
    let store = Arc::new(Faulty {
        ignores_if_none_match: true,
        ..Faulty::new()
    });
    let b = S3Backend::on(store.clone(), &url()).unwrap();
    assert!(!b.honours_if_none_match().unwrap());
    assert!(super::s3::single_writer_warning("s3://b/r").contains("single-writer mode"));
    // The probe leaves nothing behind, and the lock is still taken (one
    // writer at a time is then the user's to keep).
    let repo = Repo::init_on(Arc::new(b), Config::default()).unwrap();
    drop(repo.lock().unwrap());
    let left: Vec<String> = futures::executor::block_on(
        store
            .inner
            .list(Some(&ObjPath::from("repo/locks")))
            .map_ok(|m| m.location.to_string())
            .try_collect(),
    )
    .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

/// The upload records under `repo/uploads/`.
fn upload_records(store: &Faulty) -> Vec<String> {
    futures::executor::block_on(
        store
            .inner
            .list(Some(&ObjPath::from("repo/uploads")))
            .map_ok(|m| m.location.to_string())
            .try_collect(),
    )
    .unwrap()
}

#[test]
fn a_multipart_upload_that_a_stopped_writer_left_is_aborted_by_the_next_prune() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let store = Arc::new(Faulty::new());
    Repo::init_on(
        Arc::new(S3Backend::on(store.clone(), &url()).unwrap()),
        Config::default(),
    )
    .unwrap();
    // A pack of 40 MiB goes up in 16 MiB parts.
    std::fs::write(&img, pseudo(40 << 20, 5)).unwrap();
    // The first stop that leaves an upload begun, recorded, not complete.
    let mut found = false;
    for n in 0..200 {
        *store.budget.0.lock().unwrap() = Some(n);
        let r = backup(
            &open(&store),
            std::slice::from_ref(&img),
            &BackupOptions::default(),
            &NoProgress,
        );
        *store.budget.0.lock().unwrap() = None;
        assert!(r.is_err(), "the backup finished before an upload was left");
        let _ =
            futures::executor::block_on(store.inner.delete(&ObjPath::from("repo/locks/writer")));
        let open = !store.open_uploads.lock().unwrap().is_empty();
        match (open, upload_records(&store).is_empty()) {
            (true, false) => {
                found = true;
                break;
            }
            // Stopped between the upload's creation and its record: the
            // one window no record covers (FORMAT.md: a lifecycle rule
            // aborts it). Here, as if the rule had.
            (true, true) => store.open_uploads.lock().unwrap().clear(),
            _ => {}
        }
    }
    assert!(found, "no stop left a recorded upload");
    let before = store.open_uploads.lock().unwrap().len();
    let rep = crate::gc::gc(&open(&store), 0.0, false, &NoProgress).unwrap();
    assert_eq!(rep.uploads_aborted, before, "{rep:?}");
    assert!(store.open_uploads.lock().unwrap().is_empty());
    assert!(upload_records(&store).is_empty());
    // A backup that completes its uploads leaves no record; the next
    // prune finds none.
    backup(
        &open(&store),
        std::slice::from_ref(&img),
        &BackupOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert!(upload_records(&store).is_empty());
    assert!(store.open_uploads.lock().unwrap().is_empty());
    let rep = crate::gc::gc(&open(&store), 0.0, false, &NoProgress).unwrap();
    assert_eq!(rep.uploads_aborted, 0);
}

/// A backend on `store` whose lock is rewritten every `refresh` ms and
/// stale after `stale` ms.
fn timed(store: &Arc<Faulty>, refresh: u64, stale: u64) -> S3Backend {
    use std::time::Duration;
    S3Backend::on(store.clone(), &url())
        .unwrap()
        .with_lock_times(Duration::from_millis(refresh), Duration::from_millis(stale))
}

#[test]
fn a_lock_rewritten_in_time_is_not_taken_over() {
    use crate::backend::{Backend, Key, Kind};
    let store = Arc::new(Faulty::new());
    let a = timed(&store, 300, 2_000);
    let _held = a.lock().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2_600));
    let b = timed(&store, 300, 2_000);
    assert!(
        matches!(b.lock(), Err(crate::Error::Locked { .. })),
        "a refreshed lock was taken over"
    );
    a.commit(&Key::new(Kind::Snapshot, "0000000000000001"), b"x")
        .unwrap();
}

#[test]
fn a_stale_lock_is_taken_over_and_its_writer_commits_nothing() {
    use crate::backend::{Backend, Key, Kind};
    let store = Arc::new(Faulty::new());
    // The holder never rewrites its lock (as a writer stopped in a debugger,
    // or cut off from the server, would not).
    let a = timed(&store, 3_600_000, 1_000);
    let _held = a.lock().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1_300));
    let b = timed(&store, 3_600_000, 1_000);
    let guard = b.lock().unwrap();
    assert!(
        guard.took_over.is_some(),
        "the stale lock was not taken over"
    );
    let key = Key::new(Kind::Snapshot, "0000000000000002");
    let err = a.commit(&key, b"x").unwrap_err().to_string();
    assert!(err.contains("lock was lost"), "{err}");
    assert!(
        a.list(Kind::Snapshot).unwrap().is_empty(),
        "nothing committed"
    );
    b.commit(&key, b"y").unwrap();
}
