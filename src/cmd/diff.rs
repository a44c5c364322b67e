//! `dsync diff`: which byte ranges of each file differ between two
//! snapshots, from their extent maps alone (no data is read).

use std::io::Write;

use dsync_store::format::snapshot::ROOT;
use dsync_store::{Error, FileVersion, NodeKind, Repo, Snapshot};

use crate::cli::DiffArgs;
use crate::output::{human, Style};

/// Ranges a text report lists per file; --json lists all.
const RANGES_SHOWN: usize = 50;

/// One snapshot's side: the snapshot and its files at the root, by name.
struct Side {
    snap: Snapshot,
    files: Vec<(String, FileVersion)>,
}

impl Side {
    fn new(snap: Snapshot) -> Side {
        let files = snap
            .nodes
            .iter()
            .filter(|n| n.parent == ROOT)
            .filter_map(|n| match &n.kind {
                NodeKind::File(f) => {
                    Some((String::from_utf8_lossy(&n.name).into_owned(), f.clone()))
                }
                _ => None,
            })
            .collect();
        Side { snap, files }
    }

    fn get(&self, name: &str) -> Option<&FileVersion> {
        self.files.iter().find(|(n, _)| n == name).map(|(_, f)| f)
    }
}

/// How one file differs: `same`, `changed`, `added` or `removed`, and the
/// ranges `[start, end)` that differ with their total length.
struct FileDiff {
    name: String,
    /// `file`, or the kind of node a tree's path is (store's `PathDiff`).
    kind: &'static str,
    status: &'static str,
    ranges: Vec<(u64, u64)>,
    bytes: u64,
}

/// Prints each file as soon as it is compared, in name order.
pub fn run(o: DiffArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let style = Style::new(o.json, quiet);
    let r = Repo::open(&o.repo)?;
    let (a, b) = (r.resolve_head(&o.a)?, r.resolve_head(&o.b)?);
    if a.format >= 3 && b.format >= 3 {
        return dsync_store::inspect::diff_trees(&r, &a, &b, o.path.as_deref(), &mut |d| {
            let d = FileDiff {
                name: String::from_utf8_lossy(&d.path).into_owned(),
                kind: d.kind,
                status: d.status,
                ranges: d.ranges,
                bytes: d.bytes,
            };
            print(&d, style, out).map_err(|e| Error::io("standard output", e))
        })
        .map_err(Into::into);
    }
    let (a, b) = (Side::new(a), Side::new(b));
    for name in names(&a, &b, o.path)? {
        if let Some(d) = file_diff(&r, &a, &b, name)? {
            print(&d, style, out)?;
        }
    }
    Ok(())
}

/// The names in either snapshot, sorted; only `only` if given.
///
/// # Errors
/// [`Error::NoSuchPath`] when `only` is in neither.
fn names(a: &Side, b: &Side, only: Option<String>) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = a
        .files
        .iter()
        .chain(&b.files)
        .map(|(n, _)| n.clone())
        .collect();
    names.sort();
    names.dedup();
    if let Some(p) = only {
        if !names.contains(&p) {
            return Err(Error::NoSuchPath {
                path: p,
                snapshot: format!("{} or {}", a.snap.id, b.snap.id),
            }
            .into());
        }
        names.retain(|n| *n == p);
    }
    Ok(names)
}

/// A file in both snapshots is compared by its extent maps; a file in one
/// differs over its whole length.
fn file_diff(r: &Repo, a: &Side, b: &Side, name: String) -> anyhow::Result<Option<FileDiff>> {
    let (status, ranges, bytes) = match (a.get(&name), b.get(&name)) {
        (Some(_), Some(_)) => {
            let ma = dsync_store::inspect::version_map(r, &a.snap, &name)?;
            let mb = dsync_store::inspect::version_map(r, &b.snap, &name)?;
            let (ranges, bytes) = dsync_store::inspect::diff_maps(&ma, &mb);
            (if bytes == 0 { "same" } else { "changed" }, ranges, bytes)
        }
        (None, Some(y)) => ("added", vec![(0, y.size)], y.size),
        (Some(x), None) => ("removed", vec![(0, x.size)], x.size),
        (None, None) => return Ok(None),
    };
    Ok(Some(FileDiff {
        name,
        kind: "file",
        status,
        ranges,
        bytes,
    }))
}

/// One JSON object per file; or a line per file, and with text (not
/// --quiet) the first ranges under it.
fn print(d: &FileDiff, style: Style, out: &mut dyn Write) -> std::io::Result<()> {
    if style == Style::Json {
        let v = serde_json::json!({"file": d.name, "kind": d.kind, "status": d.status, "bytes": d.bytes, "ranges": d.ranges});
        return writeln!(out, "{v}");
    }
    if d.kind != "file" {
        let slash = if d.kind == "dir" { "/" } else { "" };
        return match d.kind {
            "dir" | "symlink" => writeln!(out, "{}{slash}: {}", d.name, d.status),
            k => writeln!(out, "{}: {} ({k})", d.name, d.status),
        };
    }
    writeln!(
        out,
        "{}: {}, {} differ in {} ranges",
        d.name,
        d.status,
        human(d.bytes),
        d.ranges.len()
    )?;
    if style == Style::Quiet {
        return Ok(());
    }
    for (s, e) in d.ranges.iter().take(RANGES_SHOWN) {
        writeln!(out, "  {s}-{e} ({})", human(e - s))?;
    }
    if d.ranges.len() > RANGES_SHOWN {
        writeln!(
            out,
            "  ... {} more (--json lists all)",
            d.ranges.len() - RANGES_SHOWN
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn printed(d: &FileDiff, style: Style) -> String {
        let mut out = Vec::new();
        print(d, style, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn text_lists_the_first_ranges_and_json_all() {
        let ranges: Vec<(u64, u64)> = (0..52).map(|k| (k * 8192, k * 8192 + 4096)).collect();
        let d = FileDiff {
            name: "disk.img".into(),
            kind: "file",
            status: "changed",
            bytes: 52 * 4096,
            ranges,
        };
        let text = printed(&d, Style::Text);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + RANGES_SHOWN + 1);
        assert_eq!(lines[0], "disk.img: changed, 208.0 KiB differ in 52 ranges");
        assert_eq!(lines[1], "  0-4096 (4.0 KiB)");
        assert_eq!(lines[51], "  ... 2 more (--json lists all)");
        assert_eq!(printed(&d, Style::Quiet), format!("{}\n", lines[0]));
        let v: serde_json::Value = serde_json::from_str(&printed(&d, Style::Json)).unwrap();
        assert_eq!(v["ranges"].as_array().unwrap().len(), 52);
    }
}
