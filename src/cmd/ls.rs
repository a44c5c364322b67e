//! `dsync ls`: the paths of a snapshot (or of one directory of it), depth
//! first in name order, read one directory list at a time: memory is the
//! lists along one path, whatever the snapshot's size.

use std::io::Write;

use dsync_store::browse::{self, Entry, Payload};
use dsync_store::format::snapshot::ROOT;
use dsync_store::{Error, NodeKind, Repo};

use crate::cli::LsArgs;
use crate::output::human;

/// One node as `ls` shows it.
struct Row<'a> {
    path: &'a [u8],
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    user: &'a [u8],
    group: &'a [u8],
    size: u64,
    mtime_ns: i64,
    target: Option<&'a [u8]>,
    error: &'a str,
}

pub fn run(o: LsArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let r = Repo::open(&o.repo)?;
    let s = r.resolve_head(&o.snapshot)?;
    let at = o.path.as_deref().unwrap_or("").trim_matches('/');
    let mut show = |row: Row<'_>| print(&row, &o, out);
    if s.format < 3 {
        // Format 2: root-level files only.
        for n in s.nodes.iter().filter(|n| n.parent == ROOT) {
            if !at.is_empty() && n.name != at.as_bytes() {
                continue;
            }
            let NodeKind::File(f) = &n.kind else { continue };
            show(Row {
                path: &n.name,
                kind: "file",
                mode: n.mode,
                uid: n.uid,
                gid: n.gid,
                user: b"",
                group: b"",
                size: f.size,
                mtime_ns: n.mtime_ns,
                target: None,
                error: "",
            })?;
        }
        return Ok(());
    }
    let root = browse::root(&r, s.id)?;
    if at.is_empty() {
        return walk(&r, &root, b"", &mut show);
    }
    let e = browse::resolve(&r, &root, at.as_bytes())?.ok_or_else(|| Error::NoSuchPath {
        path: at.to_string(),
        snapshot: s.id.to_string(),
    })?;
    one(&r, &e, at.as_bytes(), &mut show)
}

/// A directory's entries, and each subdirectory's after its own.
fn walk(
    r: &Repo,
    dir: &browse::List<Entry>,
    at: &[u8],
    show: &mut dyn FnMut(Row<'_>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    for e in browse::entries(r, dir)? {
        let mut path = at.to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(&e.name);
        one(r, &e, &path, show)?;
    }
    Ok(())
}

/// The entry `e` at `path`, and what is under it.
fn one(
    r: &Repo,
    e: &Entry,
    path: &[u8],
    show: &mut dyn FnMut(Row<'_>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let (kind, size, target) = match &e.payload {
        Payload::File(d) => ("file", d.size, None),
        Payload::Dir(_) => ("dir", 0, None),
        Payload::Symlink(t) => ("symlink", 0, Some(t.as_slice())),
        Payload::CharDevice(_) => ("chardev", 0, None),
        Payload::BlockDevice(_) => ("blockdev", 0, None),
        Payload::Fifo => ("fifo", 0, None),
        Payload::Socket => ("socket", 0, None),
    };
    show(Row {
        path,
        kind,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        user: &e.user,
        group: &e.group,
        size,
        mtime_ns: e.mtime_ns,
        target,
        error: &e.error,
    })?;
    if let Payload::Dir(list) = &e.payload {
        walk(r, list, path, show)?;
    }
    Ok(())
}

fn print(row: &Row<'_>, o: &LsArgs, out: &mut dyn Write) -> std::io::Result<()> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let path = text(row.path);
    if o.json {
        let v = serde_json::json!({
            "path": path, "kind": row.kind, "mode": row.mode & 0o7777,
            "uid": row.uid, "gid": row.gid, "user": text(row.user), "group": text(row.group),
            "size": row.size, "mtime_unix_ns": row.mtime_ns,
            "target": row.target.map(text).unwrap_or_default(), "error": row.error,
        });
        return writeln!(out, "{v}");
    }
    let slash = if row.kind == "dir" { "/" } else { "" };
    let arrow = row
        .target
        .map(|t| format!(" -> {}", text(t)))
        .unwrap_or_default();
    if !o.long {
        return writeln!(out, "{path}{slash}{arrow}");
    }
    let owner = |name: &[u8], id: u32| match name.is_empty() {
        true => id.to_string(),
        false => text(name),
    };
    writeln!(
        out,
        "{} {:>8} {:>8} {:>10}  {}  {path}{slash}{arrow}",
        mode_string(row.mode),
        owner(row.user, row.uid),
        owner(row.group, row.gid),
        human(row.size),
        dsync_store::time::local(row.mtime_ns),
    )
}

/// `ls -l`'s mode column: the kind, then rwx with setuid, setgid and
/// sticky shown as s/S and t/T.
fn mode_string(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        _ => '-',
    };
    let mut s = String::from(kind);
    for (shift, special, set, unset) in [
        (6, 0o4000, 's', 'S'),
        (3, 0o2000, 's', 'S'),
        (0, 0o1000, 't', 'T'),
    ] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, mode & special != 0) {
            (true, true) => set,
            (false, true) => unset,
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::mode_string;

    #[test]
    fn modes_read_as_ls_prints_them() {
        assert_eq!(mode_string(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(mode_string(libc::S_IFDIR | 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(libc::S_IFREG | 0o4750), "-rwsr-x---");
        assert_eq!(mode_string(libc::S_IFREG | 0o2640), "-rw-r-S---");
        assert_eq!(mode_string(libc::S_IFLNK | 0o777), "lrwxrwxrwx");
    }
}
