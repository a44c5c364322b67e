//! `dsync check`: whether everything the snapshots reference is there and
//! sound; each damaged object with the snapshots, files and byte ranges it
//! affects, and exit 3 if there is any.

use std::io::Write;

use dsync_store::{CheckOptions, CheckReport, Problem, Repo};

use crate::cli::CheckArgs;
use crate::output::{human, Style};
use crate::progress;

/// `dsync check` found damage (already listed on standard output): main
/// exits 3 for it, as for a damaged object met by any other command.
#[derive(Debug)]
pub struct CheckFailed(pub usize);

impl std::fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the repository is damaged: {} problems (listed above)",
            self.0
        )
    }
}

impl std::error::Error for CheckFailed {}

/// # Errors
/// [`CheckFailed`] when there are problems, whether or not printing them
/// worked.
pub fn run(o: CheckArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let style = Style::new(o.json, quiet);
    let read_data = o.read_data || o.read_data_subset.is_some();
    let r = Repo::open(&o.repo)?;
    let opts = CheckOptions {
        read_data,
        subset: o.read_data_subset,
    };
    let rep = progress::with_bar(style, |bar| dsync_store::check(&r, &opts, bar))?;
    // Printed apart from the verdict: a reader that closes the pipe
    // after the first damaged line must not turn exit 3 into 0.
    let printed = print(&rep, read_data, style, out);
    if !rep.problems.is_empty() {
        return Err(CheckFailed(rep.problems.len()).into());
    }
    printed?;
    Ok(())
}

/// Damaged objects are listed even with --quiet; the summary line is not.
fn print(
    rep: &CheckReport,
    read_data: bool,
    style: Style,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    if style == Style::Json {
        return writeln!(out, "{}", json(rep));
    }
    for p in &rep.problems {
        writeln!(out, "{}", problem_line(p))?;
    }
    if style == Style::Text {
        writeln!(out, "{}", summary(rep, read_data))?;
    }
    Ok(())
}

fn json(rep: &CheckReport) -> serde_json::Value {
    let problems: Vec<_> = rep
        .problems
        .iter()
        .map(|p| {
            serde_json::json!({
                "object": p.object, "detail": p.detail, "snapshot": p.snapshot,
                "file": p.file, "ranges": p.ranges,
            })
        })
        .collect();
    serde_json::json!({
        "snapshots": rep.snapshots, "versions": rep.versions, "packs": rep.packs,
        "frames_read": rep.frames_read, "bytes_verified": rep.bytes_verified,
        "problems": problems,
    })
}

/// `damaged: OBJECT: DETAIL [snapshot S file F bytes A-B,C-D]`, the part in
/// brackets where the damage reaches a file.
fn problem_line(p: &Problem) -> String {
    let mut line = format!("damaged: {}: {}", p.object, p.detail);
    if let (Some(s), Some(f)) = (&p.snapshot, &p.file) {
        line += &format!(" [snapshot {s} file {f}");
        if !p.ranges.is_empty() {
            let r: Vec<String> = p.ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect();
            line += &format!(" bytes {}", r.join(","));
        }
        line += "]";
    }
    line
}

fn summary(rep: &CheckReport, read_data: bool) -> String {
    let data = if read_data {
        format!(
            ", {} frames, {} verified",
            rep.frames_read,
            human(rep.bytes_verified)
        )
    } else {
        String::new()
    };
    let verdict = if rep.problems.is_empty() {
        "no problems".to_string()
    } else {
        format!("{} problems", rep.problems.len())
    };
    format!(
        "checked {} snapshots, {} versions, {} packs{data}: {verdict}",
        rep.snapshots, rep.versions, rep.packs
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_names_the_file_and_ranges_it_reaches() {
        let mut p = Problem {
            object: "pack 00000000000000aa".into(),
            detail: "missing".into(),
            snapshot: None,
            file: None,
            ranges: vec![],
        };
        assert_eq!(problem_line(&p), "damaged: pack 00000000000000aa: missing");
        p.snapshot = Some("00000000000000bb".into());
        p.file = Some("disk.img".into());
        p.ranges = vec![(0, 4096), (8192, 12288)];
        assert_eq!(
            problem_line(&p),
            "damaged: pack 00000000000000aa: missing \
             [snapshot 00000000000000bb file disk.img bytes 0-4096,8192-12288]"
        );
    }
}
