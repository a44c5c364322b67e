//! How the commands print: one place for what every report shares.
//!
//! Nothing in dsync prints with `println!` or `eprintln!`: both panic when
//! the stream is closed (`dsync list --json | head -1`). Standard output is
//! written through a lock with `writeln!`, whose error travels up to `main`,
//! which takes a broken pipe for success; diagnostics go through [`diag!`],
//! which ignores a failed write to standard error, there being nowhere left
//! to report it.
//!
//! The JSON field names are a stable interface (docs/JSON.md, checked by
//! tests/e2e/json.rs); serde_json writes an object's fields sorted by name,
//! so the order in which a report builds them does not show.

use dsync_store::SnapshotId;
use serde_json::Value;

/// `eprintln!` that cannot panic: a line to standard error, dropped if
/// standard error is closed.
macro_rules! diag {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use diag;

/// What a command prints on standard output, from its `--json` and the
/// global `--quiet` (`--json` wins: a script asked for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Lines for a person, and progress bars on a terminal.
    Text,
    /// One JSON object (or one per line), no progress bars.
    Json,
    /// Nothing but what a command prints even then (problems, a table).
    Quiet,
}

impl Style {
    pub fn new(json: bool, quiet: bool) -> Style {
        if json {
            Style::Json
        } else if quiet {
            Style::Quiet
        } else {
            Style::Text
        }
    }
}

/// A byte count for a person: `512 B`, `1.5 KiB` ... `2.0 TiB`.
pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// A snapshot as the JSON reports name one, `{"id": ..., "time": ...}`
/// (`time` local, as every command accepts it), with the fields of
/// `more` (an object) added.
pub fn snapshot_json(id: SnapshotId, time_ns: i64, more: Value) -> Value {
    let mut v = serde_json::json!({
        "id": id.to_string(), "time": dsync_store::time::local(time_ns),
    });
    if let (Some(fields), Value::Object(more)) = (v.as_object_mut(), more) {
        fields.extend(more);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1024), "1.0 KiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(5 << 30), "5.0 GiB");
        assert_eq!(human(3 << 50), "3072.0 TiB");
    }

    #[test]
    fn json_wins_over_quiet() {
        assert_eq!(Style::new(true, true), Style::Json);
        assert_eq!(Style::new(false, true), Style::Quiet);
        assert_eq!(Style::new(false, false), Style::Text);
    }

    #[test]
    fn a_snapshot_in_json_is_its_id_and_time_then_the_rest() {
        let v = snapshot_json(SnapshotId(0x1234), 0, serde_json::json!({"b": 1, "a": [2]}));
        let t = dsync_store::time::local(0);
        assert_eq!(
            v.to_string(),
            format!(r#"{{"a":[2],"b":1,"id":"0000000000001234","time":"{t}"}}"#)
        );
    }
}
