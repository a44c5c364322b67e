//! `dsync sync` as a property: whatever tree a user has, and however it
//! changes, after `sync -aHAXS --delete` (with `-c` and `-@-1`, see below)
//! DST is SRC on every attribute: kinds, contents, holes, symlink targets,
//! device numbers, modes with setuid/setgid/sticky, owners (as root),
//! nanosecond mtimes, xattrs and ACLs, hard-link structure.
//!
//! The random trees and their changes, and the test's own reading of a
//! tree, are `shared/tree_model.rs` (shared with the backup property,
//! tree_prop.rs). Each state of the tree is synced into the same DST in
//! turn, so later syncs update what earlier ones wrote: edits as deltas,
//! renames, deletions, a file becoming a directory and back.
//!
//! `-c`: the model makes edits that keep size and mtime (set back on
//! purpose), which a quick check misses by design (rsync's too); contents
//! are compared instead. `-@-1`: rounds are seconds apart at most, so times
//! are compared to the nanosecond. After the last round a sync with the
//! plain quick check must find nothing to do.
//!
//! `PROPTEST_CASES` sets the number of cases (24 by default).

#[path = "shared/tree_model.rs"]
mod tree_model;

use std::sync::Mutex;

use dsync_store::sync::{sync, SyncEvents, SyncOptions};
use proptest::prelude::*;
use tree_model::*;

struct Warnings(Mutex<Vec<String>>);

impl SyncEvents for Warnings {
    fn warn(&self, msg: &str) {
        if let Ok(mut w) = self.0.lock() {
            w.push(msg.to_string());
        }
    }
}

fn options(caps: Caps, checksum: bool) -> SyncOptions {
    SyncOptions {
        recursive: true,
        links: true,
        perms: true,
        times: true,
        group: true,
        owner: true,
        devices: true,
        specials: true,
        hard_links: true,
        acls: caps.xattrs,
        xattrs: caps.xattrs,
        sparse: true,
        delete: true,
        // A round may empty the tree: the refusal that guards against
        // that typo is tested on its own (tests/e2e/sync.rs).
        force_delete: true,
        checksum,
        modify_window: -1,
        ..SyncOptions::default()
    }
}

fn run(case: &Case) -> Result<(), String> {
    let caps = caps();
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    std::fs::create_dir(&src).map_err(|e| e.to_string())?;
    let tree = Tree {
        root: src.clone(),
        caps,
    };
    let mut arg = src.clone().into_os_string();
    arg.push("/");
    let srcs = [std::path::PathBuf::from(arg)];
    let through = Through {
        how: "synced",
        owners: caps.root,
        seek_holes: false,
    };
    for round in 0..=case.rounds.len() {
        match round {
            0 => case.items.iter().for_each(|it| tree.add(it)),
            r => case.rounds[r - 1].iter().for_each(|c| tree.change(c)),
        }
        tree.dir_times(case.dir_times.wrapping_add(round as u64));
        let want = capture(&src);
        let ev = Warnings(Mutex::new(Vec::new()));
        let r = sync(&srcs, &dst, &options(caps, true), &ev)
            .map_err(|e| format!("sync {round}: {e}"))?;
        let warned = ev.0.lock().map(|w| w.join("\n")).unwrap_or_default();
        if r.exit_code() != 0 {
            return Err(format!("sync {round}: {r:?}\n{warned}"));
        }
        let got = capture(&dst);
        let d = compare(&want, &got, through);
        if !d.is_empty() {
            return Err(format!("after sync {round}:\n{}", d.join("\n")));
        }
    }
    // Nothing left to do for the quick check.
    let ev = Warnings(Mutex::new(Vec::new()));
    let r = sync(&srcs, &dst, &options(caps, false), &ev).map_err(|e| e.to_string())?;
    if r.transferred != 0 || r.created != 0 || r.deleted != 0 {
        return Err(format!(
            "a sync of an identical tree changed something: {r:?}"
        ));
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn any_tree_and_its_changes_sync_to_an_identical_tree(case in case()) {
        if let Err(e) = run(&case) {
            return Err(TestCaseError::fail(e));
        }
    }
}
