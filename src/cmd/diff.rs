//! `dsync diff`: prints what `dsync_store::inspect::diff_snapshots` finds
//! (which byte ranges of each file differ between two snapshots), a line or
//! a JSON object per path as soon as it is found.

use std::io::Write;

use dsync_store::inspect::PathDiff;
use dsync_store::{Error, Repo};

use crate::cli::DiffArgs;
use crate::output::{human, Style};

/// Ranges a text report lists per file; --json lists all.
const RANGES_SHOWN: usize = 50;

/// Prints each file as soon as it is compared, in name order.
pub fn run(o: DiffArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let style = Style::new(o.json, quiet);
    let r = Repo::open(&o.repo)?;
    let (a, b) = (r.resolve_head(&o.a)?, r.resolve_head(&o.b)?);
    dsync_store::inspect::diff_snapshots(&r, &a, &b, o.path.as_deref(), &mut |d| {
        print(&d, style, out).map_err(|e| Error::io("standard output", e))
    })?;
    Ok(())
}

/// One JSON object per path; or a line per path, and with text (not
/// --quiet) a file's first ranges under it.
fn print(d: &PathDiff, style: Style, out: &mut dyn Write) -> std::io::Result<()> {
    let name = String::from_utf8_lossy(&d.path);
    if style == Style::Json {
        let v = serde_json::json!({"file": name, "kind": d.kind, "status": d.status, "bytes": d.bytes, "ranges": d.ranges});
        return writeln!(out, "{v}");
    }
    if d.kind != "file" {
        let slash = if d.kind == "dir" { "/" } else { "" };
        return match d.kind {
            "dir" | "symlink" => writeln!(out, "{name}{slash}: {}", d.status),
            k => writeln!(out, "{name}: {} ({k})", d.status),
        };
    }
    writeln!(
        out,
        "{name}: {}, {} differ in {} ranges",
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

    fn printed(d: &PathDiff, style: Style) -> String {
        let mut out = Vec::new();
        print(d, style, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn text_lists_the_first_ranges_and_json_all() {
        let ranges: Vec<(u64, u64)> = (0..52).map(|k| (k * 8192, k * 8192 + 4096)).collect();
        let d = PathDiff {
            path: b"disk.img".to_vec(),
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
