//! rsync's filter rules for `dsync sync`: `--exclude`, `--include`,
//! `--exclude-from`, `--include-from` and `--filter` with the common rule
//! forms (`- PATTERN`, `+ PATTERN`, `exclude`, `include`, `merge FILE`,
//! `. FILE`).
//!
//! rsync takes the first rule that matches a name; a `.gitignore` takes the
//! last. The rules are therefore handed to the `ignore` crate's gitignore
//! matcher (the one backup's `--exclude` uses) in reverse order, includes as
//! `!` lines. Patterns keep rsync's meaning: one without a slash matches a
//! name at any depth; one with a slash inside matches the end of a path
//! (gitignore would anchor it, so it is given a leading `**/`); a leading
//! `/` anchors at the transfer's root; a trailing `/` matches directories
//! only; `*` stops at slashes and `**` does not; `dir/***` is `dir` and
//! everything in it.

use std::path::Path;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::error::{Error, Result};

/// The rules of one sync, in the order given.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
struct Rule {
    include: bool,
    pattern: String,
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// `--exclude PATTERN`.
    pub fn exclude(&mut self, pattern: &str) {
        self.push(false, pattern);
    }

    /// `--include PATTERN`.
    pub fn include(&mut self, pattern: &str) {
        self.push(true, pattern);
    }

    /// The rules in order, as (include, pattern): what a remote side is
    /// sent.
    pub(crate) fn rules(&self) -> impl Iterator<Item = (bool, &str)> {
        self.rules.iter().map(|r| (r.include, r.pattern.as_str()))
    }

    pub(crate) fn push(&mut self, include: bool, pattern: &str) {
        self.rules.push(Rule {
            include,
            pattern: pattern.to_string(),
        });
    }

    /// `--exclude-from FILE` or `--include-from FILE`: one pattern a line;
    /// blank lines and lines starting with `#` or `;` are skipped.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the file cannot be read.
    pub fn add_file(&mut self, path: &Path, include: bool) -> Result<()> {
        for line in read_lines(path)? {
            self.push(include, &line);
        }
        Ok(())
    }

    /// One `--filter RULE`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a rule form dsync does not take (it is
    /// named), or a merge file that cannot be read.
    pub fn add_rule(&mut self, rule: &str) -> Result<()> {
        let (kind, arg) = match rule.split_once([' ', '_']) {
            Some((k, a)) => (k, a),
            None => (rule, ""),
        };
        match kind {
            "-" | "exclude" => self.exclude(arg),
            "+" | "include" => self.include(arg),
            "." | "merge" => {
                for line in read_lines(Path::new(arg))? {
                    self.add_rule(&line)?;
                }
            }
            "!" | "clear" => self.rules.clear(),
            _ => {
                return Err(Error::InvalidInput(format!(
                    "filter rule {rule:?}: dsync takes `- PATTERN`, `+ PATTERN`, `exclude`, \
                     `include`, `merge FILE`, `. FILE` and `!`"
                )))
            }
        }
        Ok(())
    }

    /// The compiled matcher (none when there are no rules).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming a pattern that does not parse.
    pub(crate) fn matcher(&self) -> Result<Option<Matcher>> {
        if self.rules.is_empty() {
            return Ok(None);
        }
        let mut b = GitignoreBuilder::new("/");
        for r in self.rules.iter().rev() {
            for line in gitignore_lines(r) {
                b.add_line(None, &line).map_err(|e| {
                    Error::InvalidInput(format!("bad filter pattern {:?}: {e}", r.pattern))
                })?;
            }
        }
        let globs = b
            .build()
            .map_err(|e| Error::InvalidInput(format!("bad filter patterns: {e}")))?;
        Ok(Some(Matcher { globs }))
    }
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::InvalidInput(format!("cannot read filter file {}: {e}", path.display()))
    })?;
    Ok(text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(str::to_string)
        .collect())
}

/// The gitignore lines of one rsync rule (placed last-wins).
fn gitignore_lines(r: &Rule) -> Vec<String> {
    let mut p = r.pattern.clone();
    let mut out = Vec::new();
    if let Some(base) = p.strip_suffix("/***") {
        // The directory itself, then everything in it.
        let base = base.to_string();
        out.push(format!("{base}/**"));
        p = base;
    }
    out.push(p);
    out.into_iter()
        .map(|p| {
            let body = p.strip_suffix('/').unwrap_or(&p);
            let mut line = if !p.starts_with('/') && !p.starts_with("**/") && body.contains('/') {
                format!("**/{p}")
            } else {
                p.clone()
            };
            if line.starts_with('!') || line.starts_with('#') {
                line.insert(0, '\\');
            }
            if r.include {
                line.insert(0, '!');
            }
            line
        })
        .collect()
}

/// [`Filters`] ready to match paths relative to the transfer's root.
pub(crate) struct Matcher {
    globs: Gitignore,
}

impl Matcher {
    /// Whether the node at `rel` (names joined by `/`, from the transfer's
    /// root) is excluded.
    pub fn excluded(&self, rel: &[u8], is_dir: bool) -> bool {
        let mut p = Vec::with_capacity(rel.len() + 1);
        p.push(b'/');
        p.extend_from_slice(rel);
        let p = Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&p));
        self.globs.matched(p, is_dir).is_ignore()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rules: &[&str]) -> Matcher {
        let mut f = Filters::default();
        for r in rules {
            f.add_rule(r).unwrap();
        }
        f.matcher().unwrap().unwrap()
    }

    #[test]
    fn first_matching_rule_wins_as_in_rsync() {
        let x = m(&["+ keep.tmp", "- *.tmp"]);
        assert!(x.excluded(b"a/b.tmp", false));
        assert!(!x.excluded(b"a/keep.tmp", false));
        // The other order: the exclude comes first and wins.
        let x = m(&["- *.tmp", "+ keep.tmp"]);
        assert!(x.excluded(b"a/keep.tmp", false));
    }

    #[test]
    fn only_directories_and_one_kind_of_file() {
        // rsync's classic: every directory, *.txt files, nothing else.
        let x = m(&["+ */", "+ *.txt", "- *"]);
        assert!(!x.excluded(b"a", true));
        assert!(!x.excluded(b"a/b/c.txt", false));
        assert!(x.excluded(b"a/b/c.bin", false));
    }

    #[test]
    fn slashes_anchor_as_rsync_does() {
        let x = m(&["- /top", "- mid/name", "- build/"]);
        assert!(x.excluded(b"top", false));
        assert!(!x.excluded(b"a/top", false));
        // A slash inside: the end of the path, at any depth.
        assert!(x.excluded(b"mid/name", false));
        assert!(x.excluded(b"a/b/mid/name", false));
        assert!(!x.excluded(b"a/xmid/name", false));
        // Trailing slash: directories only.
        assert!(x.excluded(b"src/build", true));
        assert!(!x.excluded(b"src/build", false));
    }

    #[test]
    fn triple_star_is_the_directory_and_its_contents() {
        let x = m(&["+ keep/***", "- *"]);
        assert!(!x.excluded(b"keep", true));
        assert!(!x.excluded(b"keep/a/b", false));
        assert!(x.excluded(b"other", false));
    }

    #[test]
    fn unknown_rule_forms_are_named() {
        let mut f = Filters::default();
        let e = f.add_rule("P protected").unwrap_err().to_string();
        assert!(e.contains("P protected"), "{e}");
    }
}
