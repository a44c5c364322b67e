use std::sync::Arc;

use super::*;
use crate::backend::{Key, MemBackend};
use crate::format::config::Config;
use crate::format::v3::node::{Entry, Extent, Payload, SigRef};
use crate::id::PackId;
use crate::repo::Repo;

fn repo() -> (MemBackend, Repo) {
    let m = MemBackend::new();
    let r = Repo::init_on(Arc::new(m.clone()), Config::default()).unwrap();
    (m, r)
}

fn entry(name: &[u8], n: u64) -> Entry {
    Entry {
        name: name.to_vec(),
        mode: libc::S_IFLNK | 0o777,
        uid: 1000,
        gid: 1000,
        user: b"alice".to_vec(),
        group: b"users".to_vec(),
        mtime_ns: 1_700_000_000_000_000_000 + n as i64,
        ctime_ns: 1_700_000_000_000_000_000,
        dev: 2049,
        ino: 100_000 + n,
        nlink: 1,
        link_group: 0,
        xattrs: vec![],
        error: String::new(),
        flags: 0,
        payload: Payload::Symlink(format!("target-{n}").into_bytes()),
    }
}

fn names(n: usize) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("file-{:08}.txt", i * 7919 % 1_000_003).into_bytes())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// `n` sorted entries with distinct names.
fn entries(n: usize) -> Vec<Entry> {
    names(n)
        .iter()
        .enumerate()
        .map(|(i, n)| entry(n, i as u64))
        .collect()
}

fn write<T: Record>(r: &Repo, meta: &mut MetaWriter, v: &[T]) -> List<T> {
    let mut w = ListWriter::new();
    for rec in v {
        w.push(rec.clone(), meta, r.backend()).unwrap();
    }
    w.finish(meta, r.backend()).unwrap()
}

fn read_all<T: Record>(r: &Repo, list: &List<T>) -> Result<Vec<T>> {
    crate::tree3::read_list(r, list)
}

#[test]
fn a_small_list_stays_inline() {
    let (_, r) = repo();
    let mut meta = MetaWriter::new();
    let v: Vec<Entry> = entries(10);
    let list = write(&r, &mut meta, &v);
    assert!(matches!(list, List::Inline(_)));
    assert_eq!(meta.blobs_written, 0);
    assert_eq!(read_all(&r, &list).unwrap(), v);
}

#[test]
fn a_big_directory_pages_and_reads_back() {
    let (_, r) = repo();
    let mut meta = MetaWriter::new();
    let v: Vec<Entry> = entries(40_000);
    let list = write(&r, &mut meta, &v);
    meta.finish().unwrap();
    let List::Paged { count, depth, .. } = list else {
        panic!("40,000 entries inline")
    };
    assert_eq!(count, v.len() as u64);
    assert!(depth >= 2, "depth {depth}");
    assert_eq!(read_all(&r, &list).unwrap(), v);
    let reader = ListReader::new(r.cache());
    for i in (0..v.len()).step_by(997) {
        let got = reader.lookup(&list, &v[i].name).unwrap();
        assert_eq!(got.as_ref(), Some(&v[i]));
    }
    assert_eq!(reader.lookup::<Entry>(&list, b"file-zzz").unwrap(), None);
    assert_eq!(reader.lookup::<Entry>(&list, b"a").unwrap(), None);
    // Pages stay near their target size: a few KiB to 64 KiB each.
    let pages = meta.blobs_written;
    assert!(pages > 20 && pages < 200, "{pages} pages");
}

#[test]
fn one_new_name_rewrites_few_pages() {
    let (_, r) = repo();
    let mut meta = MetaWriter::new();
    let all = names(30_001);
    let mut v: Vec<Entry> = all
        .iter()
        .enumerate()
        .map(|(i, n)| entry(n, i as u64))
        .collect();
    let extra = v.remove(12_345);
    write(&r, &mut meta, &v);
    let before = meta.blobs_written;
    v.insert(12_345, extra);
    let list = write(&r, &mut meta, &v);
    let new = meta.blobs_written - before;
    let List::Paged { depth, .. } = list else {
        panic!()
    };
    assert!(
        new <= 2 * depth as u64 + 1,
        "{new} pages written for one name (depth {depth})"
    );
    meta.finish().unwrap();
    assert_eq!(read_all(&r, &list).unwrap(), v);
}

#[test]
fn extents_and_signature_pages_round_trip() {
    let (_, r) = repo();
    let mut meta = MetaWriter::new();
    let ext: Vec<Extent> = (0..200_000u64)
        .map(|i| Extent {
            logical: i * 12_288 + (i % 3) * 100,
            len: 4096 + (i % 5),
            pack: PackId(1 + i % 7),
            offset: i * 5000,
        })
        .collect();
    let list = write(&r, &mut meta, &ext);
    meta.finish().unwrap();
    assert!(matches!(list, List::Paged { .. }));
    assert_eq!(read_all(&r, &list).unwrap(), ext);
    let reader = ListReader::new(r.cache());
    let k = ext[150_001].logical.to_be_bytes();
    assert_eq!(reader.lookup(&list, &k).unwrap(), Some(ext[150_001]));

    let page = meta
        .put(r.backend(), BlobKind::SigPage, &[7u8; 5120])
        .unwrap();
    let sigs: Vec<SigRef> = (0..50_000u64)
        .map(|i| {
            if i % 3 == 0 {
                SigRef::Zero
            } else {
                SigRef::Blob(page)
            }
        })
        .collect();
    let list = write(&r, &mut meta, &sigs);
    meta.finish().unwrap();
    assert_eq!(read_all(&r, &list).unwrap(), sigs);
    assert_eq!(
        reader.lookup(&list, &40_000u64.to_be_bytes()).unwrap(),
        Some(sigs[40_000])
    );
    assert_eq!(
        reader
            .lookup::<SigRef>(&list, &60_000u64.to_be_bytes())
            .unwrap(),
        None
    );
}

#[test]
fn a_damaged_page_is_reported_never_misread() {
    let (m, r) = repo();
    let mut meta = MetaWriter::new();
    let v: Vec<Entry> = entries(20_000);
    let list = write(&r, &mut meta, &v);
    meta.finish().unwrap();
    r.backend().sync().unwrap();
    let List::Paged { root, .. } = list else {
        panic!()
    };
    let key = Key::meta(root.meta);
    let len = m.read(&key).unwrap().len();
    for at in [20usize, len / 3, len / 2, len - 100] {
        let m2 = m.crash();
        m2.damage(&key, |b| b[at] ^= 0x10);
        let r2 = Repo::open_on(Arc::new(m2), 1 << 20).unwrap();
        match read_all(&r2, &list) {
            Ok(got) => assert_eq!(got, v, "damage at {at} gave other records"),
            Err(e) => assert!(matches!(e, Error::Corrupt { .. }), "{e}"),
        }
    }
}
