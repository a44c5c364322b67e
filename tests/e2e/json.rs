//! Every command's `--json` output has exactly the fields docs/JSON.md lists,
//! with the documented types, so the document cannot drift from the binary.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::Value;

use super::util::*;

/// Per command (`backup`, `list`, ...): field path -> documented type.
fn documented() -> BTreeMap<String, BTreeMap<String, String>> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/JSON.md"))
        .expect("docs/JSON.md");
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut cmd = None;
    for l in doc.lines() {
        if let Some(h) = l.strip_prefix("## `dsync ") {
            // `backup --json` is "backup"; `backup --files --json` is
            // "backup --files".
            let h = h.split('`').next().unwrap_or("").replace(" --json", "");
            cmd = Some(h);
            continue;
        }
        let (Some(c), Some(row)) = (&cmd, l.strip_prefix("| `")) else {
            continue;
        };
        let mut cols = row.split('|');
        let field = cols.next().unwrap_or("").trim().trim_end_matches('`');
        let ty = cols.next().unwrap_or("").trim();
        out.entry(c.clone())
            .or_default()
            .insert(field.to_string(), ty.to_string());
    }
    out
}

/// Field paths of an object: `a`, `a[]` and `a[].b` for an array of objects.
fn fields(v: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    let Value::Object(m) = v else { return };
    for (k, val) in m {
        let path = format!("{prefix}{k}");
        match val {
            Value::Array(a) if a.first().is_some_and(Value::is_object) => {
                out.insert(format!("{path}[]"), val.clone());
                for e in a {
                    fields(e, &format!("{path}[]."), out);
                }
            }
            _ => {
                out.insert(path, val.clone());
            }
        }
    }
}

fn type_ok(ty: &str, v: &Value) -> bool {
    match ty {
        "string" => v.is_string(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "string or null" => v.is_string() || v.is_null(),
        t if t.starts_with("array") => v.is_array(),
        _ => false,
    }
}

fn check_command(doc: &BTreeMap<String, BTreeMap<String, String>>, cmd: &str, stdout: &str) {
    let want = doc
        .get(cmd)
        .unwrap_or_else(|| panic!("docs/JSON.md has no section for {cmd}"));
    let mut got = BTreeMap::new();
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "{cmd} --json printed nothing");
    for l in lines {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{cmd} --json line {l:?}: {e}"));
        fields(&v, "", &mut got);
    }
    let got_names: BTreeSet<&String> = got.keys().collect();
    let want_names: BTreeSet<&String> = want.keys().collect();
    assert_eq!(
        got_names, want_names,
        "{cmd} --json fields differ from docs/JSON.md"
    );
    for (f, v) in &got {
        assert!(
            type_ok(&want[f], v),
            "{cmd} --json: {f} is {v}, documented as {}",
            want[f]
        );
    }
}

#[test]
fn json_output_matches_the_document() {
    let doc = documented();
    let env = Env::new();
    let repo = env.repo();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo(3 << 20, 1)).unwrap();
    env.ok(&["backup", "-q", s(&repo), s(&img)]);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&pseudo(8192, 2), 1 << 20).unwrap();
    drop(f);
    check_command(
        &doc,
        "backup",
        &env.ok(&["backup", s(&repo), s(&img), "--json"]),
    );
    env.ok(&["backup", "-q", s(&repo), s(&img), "--checksum"]);
    let ids = env.ids();
    check_command(&doc, "list", &env.ok(&["list", s(&repo), "--json"]));
    check_command(
        &doc,
        "restore",
        &env.ok(&[
            "restore",
            s(&repo),
            "latest",
            "--to",
            s(&env.path("out")),
            "--json",
        ]),
    );
    check_command(
        &doc,
        "diff",
        &env.ok(&["diff", s(&repo), &ids[0], &ids[1], "--json"]),
    );
    check_command(&doc, "du", &env.ok(&["du", s(&repo), "--json"]));
    check_command(
        &doc,
        "prune",
        &env.ok(&["prune", s(&repo), "--keep-last", "1", "--dry-run", "--json"]),
    );
    check_command(
        &doc,
        "forget",
        &env.ok(&["forget", s(&repo), &ids[2], "--json"]),
    );
    // check, with a problem so that its fields show.
    let pack = std::fs::read_dir(repo.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 1 << 20).unwrap();
    f.write_all_at(&[!b[0]], 1 << 20).unwrap();
    drop(f);
    let o = env.run(&["check", s(&repo), "--read-data", "--json"]);
    assert_eq!(o.status.code(), Some(3));
    check_command(&doc, "check", &String::from_utf8_lossy(&o.stdout));
    // A directory: ls lists its paths.
    let tree = env.path("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/file"), b"data").unwrap();
    std::os::unix::fs::symlink("sub/file", tree.join("link")).unwrap();
    let fresh = env.path("fresh");
    env.ok(&["backup", "-q", s(&fresh), s(&tree)]);
    check_command(&doc, "ls", &env.ok(&["ls", s(&fresh), "latest", "--json"]));
    // backup --files: a line per file, then the summary.
    std::fs::write(tree.join("sub/new"), b"new").unwrap();
    let out = env.ok(&["backup", s(&fresh), s(&tree), "--files", "--json"]);
    let (files, summary): (Vec<&str>, Vec<&str>) =
        out.lines().partition(|l| l.contains("\"status\""));
    assert_eq!(files.len(), 2, "{out}");
    assert_eq!(summary.len(), 1, "{out}");
    check_command(&doc, "backup --files", &files.join("\n"));
    let v: Value = serde_json::from_str(summary[0]).unwrap();
    assert_eq!(v["tree_files"], 2, "{out}");
    // sync: a change of each kind with a link field, then the summary.
    let (src, dst) = (env.path("sync-src"), env.path("sync-dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), b"data").unwrap();
    std::fs::hard_link(src.join("a"), src.join("b")).unwrap();
    std::os::unix::fs::symlink("a", src.join("l")).unwrap();
    let (a, b) = (format!("{}/", s(&src)), format!("{}/", s(&dst)));
    check_command(&doc, "sync", &env.ok(&["sync", "-aH", &a, &b, "--json"]));
    // copy: into a new repository.
    let copied = env.path("copied");
    check_command(
        &doc,
        "copy",
        &env.ok(&["copy", "--json", s(&fresh), s(&copied)]),
    );
    // Every documented command was run.
    assert_eq!(
        doc.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "backup",
            "backup --files",
            "check",
            "copy",
            "diff",
            "du",
            "forget",
            "list",
            "ls",
            "prune",
            "restore",
            "sync"
        ]
    );
}
