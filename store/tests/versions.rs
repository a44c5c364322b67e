//! Backup -> restore through a real repository: any sequence of versions of a
//! file (random edits, inserts, deletes, zero runs, sizes not a multiple of the
//! block) restores byte for byte, every version, through every read path.

use std::path::Path;
use std::sync::Arc;

use dsync_store::backend::{Key, MemBackend};

use dsync_store::format::config::Config;
use dsync_store::testdata::{pseudo, Edit};
use dsync_store::{backup, BackupOptions, NoProgress, NodeKind, Repo, VersionReader};
use proptest::prelude::*;

/// Small frames and pages so that few KiB already cross every boundary.
fn small_config() -> Config {
    Config {
        block_size: 512,
        page_entries: 4,
        frame_size: 4096,
        pack_target: 1 << 20,
        ..Config::default()
    }
}

fn small_repo(dir: &Path) -> Repo {
    Repo::init(&dir.join("repo"), small_config()).unwrap()
}

/// A repository in memory, format 3 (the store's tests run on both
/// backends and both formats: local ones are format 2).
fn mem_repo(mem: &MemBackend) -> Repo {
    let cfg = Config {
        format: 3,
        ..small_config()
    };
    Repo::init_on(Arc::new(mem.clone()), cfg).unwrap()
}

fn check_all(repo: &Repo, versions: &[Vec<u8>], dir: &Path) {
    let snaps = repo.snapshots().unwrap();
    assert_eq!(snaps.len(), versions.len());
    for (k, (s, want)) in snaps.iter().zip(versions).enumerate() {
        let node = s.root_node(b"f").unwrap();
        let NodeKind::File(f) = &node.kind else {
            panic!()
        };
        // Whole-file restore (verifies the hash).
        let out = dir.join(format!("out{k}"));
        dsync_store::restore(repo, s, Some("f"), &out, false, &NoProgress).unwrap();
        let got = std::fs::read(&out).unwrap();
        assert!(got == *want, "version {k} differs after restore");
        // cat
        let mut cat = Vec::new();
        dsync_store::cat(repo, s, "f", &mut cat).unwrap();
        assert!(cat == *want, "version {k} differs through cat");
        // Random-access reads through the shared cache.
        let r = VersionReader::open(repo, f, "t").unwrap();
        let mut x = 7u64;
        for _ in 0..50 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = if want.is_empty() {
                0
            } else {
                (x >> 33) as usize % want.len()
            };
            let len = ((x >> 13) % 9000) as usize;
            let mut buf = vec![0xAAu8; len];
            let n = r.read_at(off as u64, &mut buf).unwrap();
            let end = (off + len).min(want.len());
            assert_eq!(n, end.saturating_sub(off));
            assert!(
                buf[..n] == want[off..end],
                "read_at({off}, {len}) differs in version {k}"
            );
        }
    }
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..2000)
        )
            .prop_map(|(a, b)| Edit::Insert(a, b)),
        (any::<usize>(), 1usize..3000).prop_map(|(a, b)| Edit::Delete(a, b)),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..3000)
        )
            .prop_map(|(a, b)| Edit::Overwrite(a, b)),
        (any::<usize>(), 1usize..9000).prop_map(|(a, b)| Edit::Zero(a, b)),
        proptest::collection::vec(any::<u8>(), 1..3000).prop_map(Edit::Append),
    ]
}

fn run(versions: &[Vec<u8>]) {
    run_mixed(versions, None);
}

/// A stream that hands out its bytes in short reads of varying sizes, as a
/// pipe does.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    x: u64,
}

impl std::io::Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.x = self
            .x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = ((self.x >> 33) as usize % 7000 + 1)
            .min(buf.len())
            .min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Backs up each version of file "f" and checks every read path. With a
/// seed, versions alternate between a file and a stream under the same name:
/// each diffs against the other kind, and both give the same hash. Streams
/// go to a local repository, files alone to one in memory.
fn run_mixed(versions: &[Vec<u8>], stream_seed: Option<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let repo = match stream_seed {
        Some(_) => small_repo(dir.path()),
        None => mem_repo(&MemBackend::new()),
    };
    let src = dir.path().join("f");
    let opts = BackupOptions {
        chunk_size: 8192,
        checksum: true,
        ..Default::default()
    };
    for (k, v) in versions.iter().enumerate() {
        if let Some(seed) = stream_seed.filter(|s| (k as u64 ^ s) & 1 == 0) {
            let mut t = Trickle {
                data: v.clone(),
                pos: 0,
                x: seed ^ k as u64,
            };
            let o = BackupOptions {
                name: Some("f".into()),
                ..opts.clone()
            };
            dsync_store::backup_stream(&repo, &mut t, &o, &NoProgress).unwrap();
        } else {
            std::fs::write(&src, v).unwrap();
            backup(&repo, std::slice::from_ref(&src), &opts, &NoProgress).unwrap();
        }
        let snaps = repo.snapshots().unwrap();
        let Some(NodeKind::File(f)) = snaps
            .last()
            .and_then(|s| s.root_node(b"f"))
            .map(|n| &n.kind)
        else {
            panic!("no file f")
        };
        assert_eq!(f.size, v.len() as u64);
        assert_eq!(f.hash, dsync_store::delta::signature::file_hash(v, 512));
    }
    check_all(&repo, versions, dir.path());
}

/// A file of `size` pseudo-random bytes and its state after each day's edits.
fn history(size: usize, seed: u64, days: Vec<Vec<Edit>>) -> Vec<Vec<u8>> {
    let mut v = pseudo(size, seed);
    let mut versions = vec![v.clone()];
    for d in days {
        for e in d {
            e.apply(&mut v);
        }
        versions.push(v.clone());
    }
    versions
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn any_versions_from_streams_restore_exactly(
        size in 0usize..60_000,
        seed in any::<u64>(),
        days in proptest::collection::vec(proptest::collection::vec(edit(), 0..6), 1..4),
    ) {
        run_mixed(&history(size, seed, days), Some(seed));
    }

    #[test]
    fn any_versions_restore_exactly(
        size in 0usize..60_000,
        seed in any::<u64>(),
        days in proptest::collection::vec(proptest::collection::vec(edit(), 0..6), 1..4),
    ) {
        run(&history(size, seed, days));
    }

    #[test]
    fn any_two_files_restore_exactly(
        a in proptest::collection::vec(any::<u8>(), 0..10_000),
        b in proptest::collection::vec(any::<u8>(), 0..10_000),
    ) {
        run(&[a, b]);
    }
}

#[test]
fn unchanged_file_is_reused_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let repo = small_repo(dir.path());
    let src = dir.path().join("f");
    std::fs::write(&src, pseudo(100_000, 1)).unwrap();
    let opts = BackupOptions::default();
    backup(&repo, std::slice::from_ref(&src), &opts, &NoProgress).unwrap();
    let r = backup(&repo, std::slice::from_ref(&src), &opts, &NoProgress).unwrap();
    assert!(r.files[0].reused);
    assert_eq!(r.files[0].bytes_read, 0);
    // A reused source is still one of the snapshot's paths.
    assert_eq!(r.snapshot.paths, vec![src.display().to_string()]);
    let forced = BackupOptions {
        checksum: true,
        ..opts
    };
    let r = backup(&repo, std::slice::from_ref(&src), &forced, &NoProgress).unwrap();
    assert!(!r.files[0].reused);
    assert_eq!(
        r.files[0].stats.literal, 0,
        "an unchanged file stores no literal bytes"
    );
}

#[test]
fn sparse_file_past_4_gib() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::init(&dir.path().join("repo"), Config::default()).unwrap();
    let src = dir.path().join("big");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(5 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    let data = pseudo(300_000, 9);
    f.write_all_at(&data, (4 << 30) + 12345).unwrap();
    f.write_all_at(&data, 7).unwrap();
    drop(f);
    let r = backup(
        &repo,
        std::slice::from_ref(&src),
        &BackupOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert!(
        r.files[0].bytes_read < 2 << 20,
        "holes were read: {}",
        r.files[0].bytes_read
    );
    let s = repo.resolve("latest").unwrap();
    let NodeKind::File(fv) = &s.root_node(b"big").unwrap().kind else {
        panic!()
    };
    let rd = VersionReader::open(&repo, fv, "t").unwrap();
    let mut buf = vec![0u8; data.len() + 100];
    rd.read_at((4 << 30) + 12345 - 50, &mut buf).unwrap();
    assert!(buf[..50].iter().all(|&b| b == 0));
    assert!(buf[50..50 + data.len()] == data[..]);
    assert_eq!(
        rd.next_data(1 << 30),
        Some((4 << 30) + 12345 - ((4 << 30) + 12345) % 4096)
    );
    let out = dir.path().join("out");
    dsync_store::restore(&repo, &s, Some("big"), &out, false, &NoProgress).unwrap();
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&out).unwrap();
    assert_eq!(md.len(), 5 << 30);
    assert!(md.blocks() * 512 < 8 << 20, "restored file is not sparse");
}

#[test]
fn holes_and_zeros_of_odd_sizes() {
    for size in [0usize, 1, 4095, 4097, 3 * 4096 + 7] {
        run(&[vec![0u8; size], pseudo(size, 3), vec![0u8; size]]);
    }
}

/// A version that format 1 wrote (hash with the size first, flag bit 1
/// clear) still verifies; reusing it keeps its hash; a hash under the wrong
/// definition is reported, not trusted.
#[test]
fn format_1_hashes_still_verify() {
    use dsync_store::delta::signature::{file_hash_with, HashScheme};
    use dsync_store::format::snapshot::FLAG_HASH_SIZE_LAST;
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBackend::new();
    // Format 1 hashes exist only in format 2 manifests.
    let cfg = Config {
        format: 2,
        ..small_config()
    };
    let repo = Repo::init_on(Arc::new(mem.clone()), cfg).unwrap();
    let src = dir.path().join("f");
    let data = pseudo(50_000, 3);
    std::fs::write(&src, &data).unwrap();
    let opts = BackupOptions::default();
    backup(&repo, std::slice::from_ref(&src), &opts, &NoProgress).unwrap();
    let rewrite = |flags_set: bool, hash: [u8; 32]| {
        let mut s = repo.snapshots().unwrap().remove(0);
        for n in &mut s.nodes {
            if let NodeKind::File(f) = &mut n.kind {
                f.flags = if flags_set {
                    f.flags | FLAG_HASH_SIZE_LAST
                } else {
                    f.flags & !FLAG_HASH_SIZE_LAST
                };
                f.hash = hash;
            }
        }
        mem.damage(&Key::snapshot(s.id), |b| *b = s.encode());
    };
    let v1 = file_hash_with(HashScheme::SizeFirst, &data, 512);
    assert_ne!(v1, file_hash_with(HashScheme::SizeLast, &data, 512));
    rewrite(false, v1);
    check_all(&repo, std::slice::from_ref(&data), dir.path());
    // The format 1 hash under the format 2 flag: restore refuses it.
    rewrite(true, v1);
    let s = repo.snapshots().unwrap().remove(0);
    let out = dir.path().join("bad");
    let err = dsync_store::restore(&repo, &s, Some("f"), &out, false, &NoProgress).unwrap_err();
    assert!(err.to_string().contains("hash"), "{err}");
    // Back to format 1; an unchanged backup reuses the version, hash and all.
    rewrite(false, v1);
    let r = backup(&repo, std::slice::from_ref(&src), &opts, &NoProgress).unwrap();
    assert!(r.files[0].reused);
    let Some(NodeKind::File(f)) = r.snapshot.root_node(b"f").map(|n| &n.kind) else {
        panic!()
    };
    assert_eq!((f.hash, f.flags & FLAG_HASH_SIZE_LAST), (v1, 0));
    let again = dir.path().join("again");
    std::fs::create_dir(&again).unwrap();
    check_all(&repo, &[data.clone(), data], &again);
}

/// Many small files in one snapshot take the grouped path (read, diffed and
/// compressed several at a time): each restores byte for byte, an unchanged
/// one is reused, and a changed one is stored as a delta of its own previous
/// version, never of a neighbour's.
#[test]
fn many_small_files_in_one_snapshot() {
    many_small_files(2);
    many_small_files(3);
}

/// Format 2 diffs a changed small file against its signature; format 3
/// keeps no signature under 8 KiB and stores such a file whole.
fn many_small_files(format: u32) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        format,
        ..small_config()
    };
    let repo = Repo::init_on(Arc::new(MemBackend::new()), cfg).unwrap();
    let n = 300usize;
    let mut contents: Vec<Vec<u8>> = (0..n)
        .map(|i| match i % 10 {
            0 => Vec::new(),
            _ => pseudo(500 + (i * 97) % 20_000, i as u64),
        })
        .collect();
    let paths: Vec<std::path::PathBuf> = (0..n)
        .map(|i| dir.path().join(format!("f{i:03}")))
        .collect();
    for (p, c) in paths.iter().zip(&contents) {
        std::fs::write(p, c).unwrap();
    }
    let opts = BackupOptions::default();
    let r1 = backup(&repo, &paths, &opts, &NoProgress).unwrap();
    assert_eq!(r1.files.len(), n);
    // Day 2: every third file gets a changed block; the rest are untouched.
    for i in (1..n).step_by(3) {
        if contents[i].len() > 600 {
            let at = contents[i].len() / 2;
            contents[i][at..at + 64].copy_from_slice(&[0xEE; 64]);
            std::fs::write(&paths[i], &contents[i]).unwrap();
        }
    }
    let r2 = backup(&repo, &paths, &opts, &NoProgress).unwrap();
    for (i, f) in r2.files.iter().enumerate() {
        assert_eq!(
            f.name,
            format!("f{i:03}"),
            "reports keep the sources' order"
        );
        let changed = i % 3 == 1 && contents[i].len() > 600;
        assert_eq!(f.reused, !changed, "file {i}");
        if changed && format == 3 && contents[i].len() < 8 << 10 {
            assert_eq!(f.stats.literal, contents[i].len() as u64, "file {i}");
        } else if changed && contents[i].len() > 2 * 512 {
            assert!(f.had_previous);
            assert!(
                f.stats.literal < contents[i].len() as u64 / 2 + 1024,
                "file {i}: {} literal bytes of {}",
                f.stats.literal,
                contents[i].len()
            );
        }
    }
    let snaps = repo.snapshots().unwrap();
    let last = snaps.last().unwrap();
    for (i, want) in contents.iter().enumerate() {
        let mut got = Vec::new();
        dsync_store::cat(&repo, last, &format!("f{i:03}"), &mut got).unwrap();
        assert!(got == *want, "f{i:03} differs");
    }
}
