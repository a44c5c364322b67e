//! Progress bars on a terminal (indicatif); nothing when stderr is not a
//! terminal, with --quiet or with --json.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::output::Style;

/// Runs `work` with a bar (for text output on a terminal) and clears the
/// bar when `work` returns, before the caller prints its report or error.
pub fn with_bar<T>(style: Style, work: impl FnOnce(&Bar) -> T) -> T {
    with_bar_files(style, false, work)
}

/// As [`with_bar`]; with `files`, every file a directory backup stores is
/// printed to standard output as it is stored: a line of text, or with
/// `style` JSON an object (`backup --files`).
pub fn with_bar_files<T>(style: Style, files: bool, work: impl FnOnce(&Bar) -> T) -> T {
    let mut bar = Bar::new(style != Style::Text);
    bar.files = files.then(|| Files {
        json: style == Style::Json,
        broken: std::sync::atomic::AtomicBool::new(false),
    });
    let result = work(&bar);
    bar.done();
    result
}

/// How `backup --files` prints.
struct Files {
    json: bool,
    /// Standard output was closed: nothing more is printed (the backup
    /// goes on).
    broken: std::sync::atomic::AtomicBool,
}

pub struct Bar {
    bar: Option<ProgressBar>,
    /// A directory backup: the bar counts the whole tree's bytes (from the
    /// scan that runs alongside), not one file's.
    tree: std::sync::atomic::AtomicBool,
    files: Option<Files>,
}

impl Bar {
    pub fn new(quiet: bool) -> Self {
        let show = !quiet && std::io::stderr().is_terminal();
        let bar = show.then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:20!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        });
        Bar {
            bar,
            tree: std::sync::atomic::AtomicBool::new(false),
            files: None,
        }
    }

    pub fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// A bar over `total` bytes known before the work starts (`sync`).
    pub fn start_total(&self, name: &str, total: u64) {
        if let Some(b) = &self.bar {
            b.set_message(name.to_string());
            b.set_length(total);
        }
    }

    /// Counts `bytes` done.
    pub fn add(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    /// Runs `f` with the bar hidden (a line printed meanwhile is not
    /// mixed into it).
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }
}

/// A tree while its scan runs: no bar yet (its end is not known, and a bar
/// whose end moves would move back).
const SCANNING: &str = "{prefix}: {bytes} done {bytes_per_sec} {wide_msg}";
/// A tree once scanned.
const SCANNED: &str =
    "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {wide_msg}";

impl dsync_store::Progress for Bar {
    fn wants_totals(&self) -> bool {
        self.bar.is_some()
    }

    fn wants_files(&self) -> bool {
        self.files.is_some()
    }

    fn file(&self, path: &std::path::Path, status: dsync_store::FileStatus, size: u64) {
        let Some(f) = &self.files else { return };
        if f.broken.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let line = match f.json {
            true => serde_json::json!({"file": path.display().to_string(), "status": status.as_str(), "size": size}).to_string(),
            false => format!("{:<9} {}", status.as_str(), path.display()),
        };
        let print = || {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}")
        };
        let r = match &self.bar {
            Some(b) => b.suspend(print),
            None => print(),
        };
        if r.is_err() {
            f.broken.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn scanned(&self, files: u64, bytes: u64, done: bool) {
        let Some(b) = &self.bar else { return };
        let first = !self.tree.swap(true, std::sync::atomic::Ordering::Relaxed);
        if first {
            b.set_position(0);
        }
        if first || done {
            let template = if done { SCANNED } else { SCANNING };
            b.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
        }
        match done {
            true => b.set_prefix(format!("{files} files")),
            false => b.set_prefix(format!(
                "{files}+ files, {}+ found",
                crate::output::human(bytes)
            )),
        }
        b.set_length(bytes.max(b.position()));
    }

    fn start(&self, name: &str, size: u64) {
        if let Some(b) = &self.bar {
            if self.tree.load(std::sync::atomic::Ordering::Relaxed) {
                b.set_message(name.to_string());
                return;
            }
            b.set_message(name.to_string());
            b.set_position(0);
            b.set_length(size);
            if size == 0 {
                // A stream: its length is known only at its end.
                b.set_style(
                    ProgressStyle::with_template("{msg:20!} {bytes} {bytes_per_sec}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
            }
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
}
