//! Many small files (format 3): 100,000 files of 1-8 KiB of text in one
//! snapshot cost a few objects, not one per file, and a second snapshot of
//! the unchanged files adds almost nothing.
//!
//! Stage 1 backs up the files as root-level paths (directories as sources
//! come with the directories issue, which will back this test up as 1,000
//! directories instead).

use std::path::PathBuf;

use dsync_store::backend::{Backend, Kind, LocalBackend};
use dsync_store::format::config::Config;
use dsync_store::testdata::pseudo;
use dsync_store::{backup, BackupOptions, NoProgress, Repo};

/// Text-like bytes: words from a small vocabulary (compressible as text is).
fn text(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 24] = [
        "the", "backup", "of", "a", "file", "system", "keeps", "every", "version", "and",
        "restores", "it", "byte", "for", "in", "order", "to", "with", "its", "metadata",
        "snapshot", "pack", "frame", "tree",
    ];
    let r = pseudo(len, seed);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(WORDS[r[i % len] as usize % WORDS.len()].as_bytes());
        out.push(if r[(i + 7) % len].is_multiple_of(12) {
            b'\n'
        } else {
            b' '
        });
        i += 1;
    }
    out.truncate(len);
    out
}

#[test]
fn a_hundred_thousand_small_files_cost_few_objects() {
    let n: usize = std::env::var("DSYNC_MANY_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let mut paths: Vec<PathBuf> = Vec::with_capacity(n);
    for i in 0..n {
        let p = src.join(format!("d{:03}-f{:05}.txt", i % 1000, i));
        std::fs::write(&p, text(1024 + (i * 7919) % 7168, i as u64)).unwrap();
        paths.push(p);
    }
    let root = dir.path().join("repo");
    let cfg = Config {
        format: 3,
        ..Config::default()
    };
    let repo = Repo::init(&root, cfg).unwrap();
    let r1 = backup(&repo, &paths, &BackupOptions::default(), &NoProgress).unwrap();
    assert_eq!(r1.files.len(), n);
    let local = LocalBackend::open(&root).unwrap();
    let count = |k: Kind| local.list(k).unwrap().len();
    let size = |k: Kind| local.list(k).unwrap().iter().map(|(_, s)| s).sum::<u64>();
    let objects: usize = [Kind::Sig, Kind::Map, Kind::Meta, Kind::Snapshot]
        .into_iter()
        .map(count)
        .sum();
    assert!(
        objects <= n / 1000,
        "{objects} objects beside {} packs for {n} files",
        count(Kind::Pack)
    );
    let meta1 = size(Kind::Meta) + size(Kind::Snapshot);

    let r2 = backup(&repo, &paths, &BackupOptions::default(), &NoProgress).unwrap();
    assert!(r2.files.iter().all(|f| f.reused));
    let added = r2.snapshot.stats.bytes_added;
    // The record lists the snapshot's source paths: here 100,000 of them
    // (~60 KB compressed), because stage 1 takes each file as a path; with
    // directories as sources it lists the few directories. The tree's new
    // metadata (pages) is what must stay under 1 %.
    let record = local
        .read(&dsync_store::backend::Key::snapshot(r2.snapshot.id))
        .unwrap()
        .len() as u64;
    let tree = added.saturating_sub(record);
    eprintln!(
        "{n} files: {objects} objects beside {} packs, metadata {meta1} B; unchanged second snapshot: {tree} B of pages, record {record} B",
        count(Kind::Pack)
    );
    assert!(
        tree * 100 <= meta1,
        "the unchanged second snapshot added {tree} bytes of pages; the first's metadata is {meta1}"
    );
    // Every file reads back (a sample, through the whole path).
    let last = repo.snapshots().unwrap().pop().unwrap();
    for i in (0..n).step_by(4999) {
        let name = paths[i].file_name().unwrap().to_str().unwrap().to_string();
        let mut got = Vec::new();
        dsync_store::cat(&repo, &last, &name, &mut got).unwrap();
        assert_eq!(got, std::fs::read(&paths[i]).unwrap(), "{name}");
    }
}
