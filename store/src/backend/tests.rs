//! The contract every backend keeps, run against each of them.

use std::sync::Arc;

use super::*;
use crate::error::Error;

fn already_exists(r: Result<()>) -> bool {
    matches!(r, Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists)
}

fn contract(b: &dyn Backend) {
    let k = Key::new(Kind::Map, "00000000000000aa");
    assert!(b.read(&k).unwrap_err().is_not_found());
    assert!(b.open(&k).err().unwrap().is_not_found());

    b.put(&k, b"hello map").unwrap();
    assert_eq!(b.read(&k).unwrap(), b"hello map");
    // (An uploading backend finds out when the upload is waited for.)
    assert!(
        already_exists(b.put(&k, b"again").and_then(|()| b.sync())),
        "put never overwrites"
    );

    let p = Key::new(Kind::Pack, "00000000000000bb");
    let mut w = b.create(&p).unwrap();
    w.append(b"0123").unwrap();
    w.append(b"456789").unwrap();
    assert_eq!(w.len(), 10);
    w.finish().unwrap();
    b.sync().unwrap();
    let o = b.open(&p).unwrap();
    assert_eq!(o.len(), 10);
    let mut buf = [0u8; 4];
    o.read_at(3, &mut buf).unwrap();
    assert_eq!(&buf, b"3456");
    assert!(
        o.read_at(8, &mut buf).is_err(),
        "a range past the end fails"
    );
    assert_eq!((*b.bytes(&p).unwrap()).as_ref(), b"0123456789");

    let mut packs = b.list(Kind::Pack).unwrap();
    packs.sort();
    assert_eq!(packs, vec![("00000000000000bb".to_string(), 10)]);
    assert!(b.list(Kind::Sig).unwrap().is_empty());

    let s = Key::new(Kind::Snapshot, "00000000000000cc");
    b.commit(&s, b"first").unwrap();
    assert!(
        already_exists(b.commit(&s, b"second")),
        "commit is create-if-absent"
    );
    assert_eq!(b.read(&s).unwrap(), b"first");
    b.replace(&s, b"third").unwrap();
    assert_eq!(b.read(&s).unwrap(), b"third");

    b.remove(&[
        k.clone(),
        s.clone(),
        Key::new(Kind::Sig, "00000000000000dd"),
    ])
    .unwrap();
    assert!(b.read(&k).unwrap_err().is_not_found());
    assert!(b.list(Kind::Snapshot).unwrap().is_empty());
    let many = b.read_many(&[p.clone(), k.clone()]);
    assert_eq!(many[0].as_ref().unwrap(), b"0123456789");
    assert!(many[1].as_ref().unwrap_err().is_not_found());

    let l = b.lock().unwrap();
    assert!(matches!(b.lock(), Err(Error::Locked { .. })));
    drop(l);
    drop(b.lock().unwrap());
}

#[test]
fn local_backend_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    let b = LocalBackend::create_layout(&d.path().join("r")).unwrap();
    contract(&b);
    assert!(b.scratch_dir().is_some());
}

#[test]
fn memory_backend_keeps_the_contract() {
    contract(&MemBackend::new());
}

#[test]
fn s3_backend_keeps_the_contract() {
    let store = Arc::new(object_store::memory::InMemory::new());
    let url = S3Url::parse(std::path::Path::new("s3://bucket/some/prefix")).unwrap();
    let b = S3Backend::on(store.clone(), &url).unwrap();
    contract(&b);
    // A second prefix in the same bucket is another repository.
    let other = S3Backend::on(
        store,
        &S3Url::parse(std::path::Path::new("s3://bucket/some")).unwrap(),
    )
    .unwrap();
    assert!(other.list(Kind::Pack).unwrap().is_empty());
    assert!(!other.holds_repository().unwrap());
}

#[test]
fn a_crash_keeps_only_what_was_durable() {
    let m = MemBackend::new();
    let synced = Key::new(Kind::Map, "0000000000000001");
    let unsynced = Key::new(Kind::Map, "0000000000000002");
    let committed = Key::new(Kind::Snapshot, "0000000000000003");
    m.put(&synced, b"a").unwrap();
    m.sync().unwrap();
    m.put(&unsynced, b"b").unwrap();
    let mut w = m.create(&Key::new(Kind::Pack, "0000000000000004")).unwrap();
    w.append(b"half a pack").unwrap();
    m.commit(&committed, b"c").unwrap();
    let after = m.crash();
    let mut keys = after.keys();
    keys.sort();
    assert_eq!(keys, vec![synced, committed]);
}

#[test]
fn injected_faults_stop_every_later_write() {
    let m = MemBackend::new();
    let b: Arc<dyn Backend> = Arc::new(m.clone());
    m.fail_after(2);
    b.put(&Key::new(Kind::Map, "0000000000000001"), b"a")
        .unwrap();
    b.sync().unwrap();
    assert!(b
        .put(&Key::new(Kind::Map, "0000000000000002"), b"b")
        .is_err());
    assert!(b.sync().is_err());
    assert_eq!(m.writes(), 4);
    m.heal();
    b.sync().unwrap();
}
