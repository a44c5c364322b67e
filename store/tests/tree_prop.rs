//! Directory backup and restore, as a property: whatever tree a user has,
//! and however it changes between backups, restoring any snapshot gives
//! back exactly the tree as it was when that snapshot was taken.
//!
//! The random trees, their changes, the backups and the test's own reading
//! of each state are in `shared/tree_model.rs` (shared with the mount's
//! property test, `fuse/tests/mount_prop.rs`). Here every snapshot is
//! restored into a fresh directory and compared with what the source was
//! right before that backup: kinds, contents, symlink targets, modes,
//! mtimes, owners (as root), extended attributes, hard-link structure
//! (names that share an inode in the source share one in the restore, and
//! no others) and holes kept; at the end `check --read-data` must find
//! nothing wrong.
//!
//! `PROPTEST_CASES` sets the number of cases (24 by default).

#[path = "shared/tree_model.rs"]
mod tree_model;

use std::collections::BTreeSet;

use dsync_store::{
    check, restore_with, CheckOptions, NoProgress, Repo, RestoreOptions, SnapshotId,
};
use proptest::prelude::*;
use rustix::fs::XattrFlags;

use tree_model::*;

// ---------------------------------------------------------------------------
// The property.

fn run(case: &Case) -> Result<(), String> {
    restore_each(back_up_case(case)?)
}

/// Makes the tree (`step(tree, 0)`), backs it up, changes it
/// (`step(tree, 1)`), backs it up, and so on for `rounds` backups; then
/// restores each snapshot and compares it with the tree as it was.
fn run_rounds(
    rounds: usize,
    chunk: Option<usize>,
    step: impl FnMut(&Tree, usize),
) -> Result<(), String> {
    restore_each(back_up_rounds(rounds, chunk, step)?)
}

fn restore_each(b: Backups) -> Result<(), String> {
    let caps = caps();
    // A fresh handle, as a later `dsync restore` would have.
    let repo = Repo::open(&b.repo_dir).map_err(|e| format!("open: {e}"))?;
    let ids: BTreeSet<SnapshotId> = repo.snapshot_ids().unwrap().into_iter().collect();
    if ids != b.taken.iter().map(|t| t.id).collect() {
        return Err(format!("snapshots {ids:?}, backups made {}", b.taken.len()));
    }
    let through = Through {
        how: "restored",
        owners: caps.root,
        seek_holes: false,
    };
    for (i, t) in b.taken.iter().enumerate() {
        let snap = repo
            .load_snapshot(t.id)
            .map_err(|e| format!("load {i}: {e}"))?;
        let dest = b.tmp.path().join(format!("restore{i}"));
        let rep = restore_with(
            &repo,
            &snap,
            None,
            &dest,
            &RestoreOptions::default(),
            &NoProgress,
        )
        .map_err(|e| format!("restore of snapshot {i}: {e}"))?;
        let got = capture(&dest.join("src"));
        let diffs = compare(&t.state, &got, through);
        if !diffs.is_empty() {
            return Err(format!(
                "snapshot {i} of {} restored differently:\n  {}",
                b.taken.len(),
                diffs.join("\n  ")
            ));
        }
        if !rep.warnings.is_empty() {
            return Err(format!(
                "restore of snapshot {i} warned: {:?}",
                rep.warnings
            ));
        }
        std::fs::remove_dir_all(&dest).unwrap();
    }
    let report = check(
        &repo,
        &CheckOptions {
            read_data: true,
            subset: None,
        },
        &NoProgress,
    )
    .map_err(|e| format!("check: {e}"))?;
    if !report.problems.is_empty() {
        return Err(format!("check: {:?}", report.problems));
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn restore_gives_back_every_snapshot_of_a_changing_tree(case in case()) {
        if let Err(e) = run(&case) {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// Found by the property above (minimal case: a file `-a/a` with an
/// attribute and its hard link `1` at the root). The walk meets `-a/a`
/// first and stores the other name as a link entry; restore writes a
/// directory's files before its subdirectories, so it creates the file
/// from the link entry `1`, which had no attributes, and links `-a/a` to
/// it: both names lost them. A second backup lost them again the other
/// way: once `-a` is renamed after `1`, `1` is met first, unchanged, and
/// takes its attributes from its previous (link) entry.
#[test]
fn a_hard_link_met_before_its_first_name_keeps_the_attributes() {
    if !caps().xattrs {
        return;
    }
    run_rounds(2, None, |t, round| {
        if round == 0 {
            std::fs::create_dir(t.abs(b"d")).unwrap();
            t.write(b"d/f", &Content::Text(3000, 7));
            rustix::fs::lsetxattr(t.abs(b"d/f"), "user.k", b"v", XattrFlags::empty()).unwrap();
            std::fs::hard_link(t.abs(b"d/f"), t.abs(b"l")).unwrap();
            set_time(&t.abs(b"d/f"), 1_000_000_000_123);
        } else {
            std::fs::rename(t.abs(b"d"), t.abs(b"z")).unwrap();
        }
    })
    .unwrap();
}
