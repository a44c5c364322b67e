//! `dsync sync`: rsync's flags turned into the store's [`SyncOptions`],
//! the items printed as rsync's `--itemize-changes` lines or JSON, and the
//! outcome as rsync's exit codes.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use dsync_store::remote::Remote;
use dsync_store::sync::{self, Filters, Item, SyncEvents, SyncOptions, SyncReport};

use crate::cli::SyncArgs;
use crate::output::{human, Style};
use crate::progress::Bar;

/// Some files were not transferred, vanished, or deletions stopped (exit
/// code 23, 24 or 25, as rsync's).
#[derive(Debug)]
pub struct Partial {
    pub code: u8,
    what: String,
}

impl std::fmt::Display for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Partial {}

/// The filter options in command-line order, from clap's indices.
pub fn rules_in_order(m: &clap::ArgMatches) -> Vec<(String, String)> {
    let mut all: Vec<(usize, String, String)> = Vec::new();
    for id in [
        "exclude",
        "include",
        "filter",
        "exclude_from",
        "include_from",
    ] {
        let (Some(idx), Ok(Some(vals))) = (m.indices_of(id), m.try_get_raw(id)) else {
            continue;
        };
        for (i, v) in idx.zip(vals) {
            all.push((i, id.to_string(), v.to_string_lossy().into_owned()));
        }
    }
    all.sort_by_key(|(i, _, _)| *i);
    all.into_iter().map(|(_, k, v)| (k, v)).collect()
}

/// A name as rsync prints it: printable UTF-8 as is, every other byte
/// (controls, bytes that are not UTF-8) as `\#ooo`.
fn rsync_name(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                let mut buf = [0u8; 4];
                for byte in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\#{byte:03o}"));
                }
            } else {
                out.push(c);
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\#{byte:03o}"));
        }
    }
    out
}

fn options(o: &SyncArgs) -> anyhow::Result<SyncOptions> {
    let a = o.archive;
    let mut filters = Filters::default();
    for (kind, v) in &o.rules {
        match kind.as_str() {
            "exclude" => filters.exclude(v),
            "include" => filters.include(v),
            "filter" => filters.add_rule(v)?,
            "exclude_from" => filters.add_file(std::path::Path::new(v), false)?,
            _ => filters.add_file(std::path::Path::new(v), true)?,
        }
    }
    Ok(SyncOptions {
        recursive: a || o.recursive,
        links: a || o.links,
        perms: a || o.perms,
        times: a || o.times,
        group: a || o.group,
        owner: a || o.owner,
        devices: a || o.devices_specials || o.devices,
        specials: a || o.devices_specials || o.specials,
        hard_links: o.hard_links,
        acls: o.acls,
        xattrs: o.xattrs,
        sparse: o.sparse,
        numeric_ids: o.numeric_ids,
        delete: o.delete || o.delete_excluded,
        delete_excluded: o.delete_excluded,
        max_delete: o.max_delete,
        force_delete: o.force_delete,
        checksum: o.checksum,
        size_only: o.size_only,
        update: o.update,
        ignore_existing: o.ignore_existing,
        modify_window: o.modify_window,
        filters,
        dry_run: o.dry_run,
        whole_file: o.whole_file,
        inplace: o.inplace,
        threads: 0,
    })
}

/// Prints items and warnings as they come; the bar counts bytes.
struct Events<'a> {
    style: Style,
    itemize: bool,
    bar: &'a Bar,
    /// Standard output was closed: items are no longer printed.
    broken: AtomicBool,
}

impl SyncEvents for Events<'_> {
    fn wants_items(&self) -> bool {
        self.itemize || self.style == Style::Json
    }

    fn item(&self, item: &Item<'_>) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let line = match self.style {
            Style::Json => {
                let (mut target, mut hard) = (String::new(), String::new());
                if let Some((kind, to)) = item.link {
                    let to = String::from_utf8_lossy(to).into_owned();
                    if kind.contains("->") {
                        target = to;
                    } else {
                        hard = to;
                    }
                }
                serde_json::json!({
                    "item": item.code,
                    "path": String::from_utf8_lossy(item.path),
                    "size": item.size,
                    "target": target,
                    "hard_link_to": hard,
                })
                .to_string()
            }
            _ if self.itemize => {
                let mut l = format!("{} {}", item.code, rsync_name(item.path));
                if let Some((kind, to)) = item.link {
                    l.push_str(kind);
                    l.push_str(&rsync_name(to));
                }
                l
            }
            _ => return,
        };
        let r = self
            .bar
            .suspend(|| writeln!(std::io::stdout().lock(), "{line}"));
        if r.is_err() {
            self.broken.store(true, Ordering::Relaxed);
        }
    }

    fn message(&self, msg: &str) {
        if self.itemize && self.style != Style::Json && !self.broken.load(Ordering::Relaxed) {
            let r = self
                .bar
                .suspend(|| writeln!(std::io::stdout().lock(), "{msg}"));
            if r.is_err() {
                self.broken.store(true, Ordering::Relaxed);
            }
        }
    }

    fn warn(&self, msg: &str) {
        self.bar.suspend(|| eprintln!("dsync: {msg}"));
    }

    fn advance(&self, bytes: u64) {
        self.bar.add(bytes);
    }
}

pub fn run(o: SyncArgs, quiet: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let style = Style::new(o.json, quiet);
    let opts = options(&o)?;
    let (dst, srcs) = o
        .paths
        .split_last()
        .ok_or_else(|| anyhow::anyhow!("SRC and DST are needed"))?;
    let bar = Bar::new(style != Style::Text);
    bar.start_total("sync", total_bytes(srcs));
    let ev = Events {
        style,
        itemize: o.itemize_changes,
        bar: &bar,
        broken: AtomicBool::new(false),
    };
    let r = match sides(srcs, dst)? {
        Sides::Local => sync::sync(srcs, dst, &opts, &ev),
        Sides::Push(far) => sync::remote::push(srcs, &far, &opts, &ev),
        Sides::Pull(far, paths) => sync::remote::pull(&far, &paths, dst, &opts, &ev),
    };
    bar.done();
    let rep = r?;
    report(&rep, style, o.dry_run, out)?;
    match rep.exit_code() {
        0 => Ok(()),
        code => Err(Partial {
            code,
            what: match code {
                23 => format!(
                    "some files or attributes were not transferred ({} errors, above)",
                    rep.errors
                ),
                25 => format!(
                    "--max-delete stopped deletions ({} not deleted)",
                    rep.delete_skipped
                ),
                _ => format!("{} source files vanished (above)", rep.vanished),
            },
        }
        .into()),
    }
}

/// Where SRC and DST are.
enum Sides {
    Local,
    /// DST on another machine.
    Push(Remote),
    /// Every SRC on one other machine: the far paths.
    Pull(Remote, Vec<Vec<u8>>),
}

fn sides(srcs: &[std::path::PathBuf], dst: &std::path::Path) -> anyhow::Result<Sides> {
    let far_srcs: Vec<Option<Remote>> = srcs.iter().map(|s| Remote::parse(s)).collect();
    let any_far_src = far_srcs.iter().any(Option::is_some);
    match Remote::parse(dst) {
        Some(_) if any_far_src => {
            anyhow::bail!("the source and the destination cannot both be remote")
        }
        Some(far) => Ok(Sides::Push(far)),
        None if !any_far_src => Ok(Sides::Local),
        None => {
            let first = far_srcs[0].clone();
            let Some(first) = first.filter(|f| {
                far_srcs.iter().all(|o| {
                    o.as_ref()
                        .is_some_and(|o| o.host == f.host && o.port == f.port)
                })
            }) else {
                anyhow::bail!("every source must be on the same machine, or every one here");
            };
            let paths = far_srcs
                .into_iter()
                .flatten()
                .map(|r| r.path.into_bytes())
                .collect();
            Ok(Sides::Pull(first, paths))
        }
    }
}

/// Bytes of regular files under the sources, for the bar (counted before
/// the transfer starts: the bar never moves back). Only on a terminal.
fn total_bytes(srcs: &[std::path::PathBuf]) -> u64 {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return 0;
    }
    fn walk(p: &std::path::Path) -> u64 {
        let Ok(m) = std::fs::symlink_metadata(p) else {
            return 0;
        };
        if m.is_file() {
            return m.len();
        }
        if !m.is_dir() {
            return 0;
        }
        std::fs::read_dir(p)
            .map(|d| d.flatten().map(|e| walk(&e.path())).sum())
            .unwrap_or(0)
    }
    srcs.iter().map(|s| walk(s)).sum()
}

fn report(r: &SyncReport, style: Style, dry_run: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    match style {
        Style::Json => {
            let v = serde_json::json!({
                "dry_run": dry_run,
                "files": r.files,
                "bytes": r.bytes,
                "transferred": r.transferred,
                "literal_bytes": r.literal_bytes,
                "matched_bytes": r.matched_bytes,
                "read_bytes": r.read_bytes,
                "written_bytes": r.written_bytes,
                "created": r.created,
                "deleted": r.deleted,
                "delete_skipped": r.delete_skipped,
                "delete_inhibited": r.delete_inhibited,
                "vanished": r.vanished,
                "errors": r.errors,
                "exit_code": r.exit_code(),
            });
            writeln!(out, "{v}")?;
        }
        Style::Text if !dry_run && std::io::IsTerminal::is_terminal(&std::io::stderr()) => {
            // A summary for a person at a terminal, on standard error:
            // scripts (and cron) see only the items, as with rsync.
            eprintln!(
                "{} files ({}): {} transferred ({} new data, {} from old versions), {} deleted",
                r.files,
                human(r.bytes),
                r.transferred,
                human(r.literal_bytes),
                human(r.matched_bytes),
                r.deleted
            );
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_print_as_rsync_prints_them() {
        assert_eq!(super::rsync_name(b"caf\xe9"), "caf\\#351");
        assert_eq!(super::rsync_name(b"new\nline"), "new\\#012line");
        assert_eq!(super::rsync_name("ütf8 sp\\".as_bytes()), "ütf8 sp\\");
    }
}
