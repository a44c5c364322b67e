//! What a tree backup leaves out: gitignore-style patterns (the `ignore`
//! crate's matcher, as ripgrep and rustic use it), directories tagged by a
//! file they contain (`--exclude-if-present`, `--exclude-caches`), other
//! file systems (`-x`) and files over a size.
//!
//! Patterns match absolute source paths: `*.tmp` or `.cache/` match at any
//! depth, `/home/*/.cache` only there, `!keep.tmp` takes a file back (as in a
//! `.gitignore`, a file inside an excluded directory cannot be taken back).

use std::path::Path;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::error::{Error, Result};

/// CACHEDIR.TAG's first bytes (<https://bford.info/cachedir/>).
pub(crate) const CACHEDIR_SIGNATURE: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55";

/// The exclusion rules of one backup.
#[derive(Clone, Debug, Default)]
pub struct Excludes {
    /// Gitignore-style patterns (`--exclude`, and the lines of
    /// `--exclude-from` files).
    pub patterns: Vec<String>,
    /// Leave out a directory that contains a file of one of these names.
    pub if_present: Vec<String>,
    /// Leave out directories tagged with a valid CACHEDIR.TAG.
    pub caches: bool,
    /// Do not descend into other file systems (mount points are kept as
    /// empty directories, as rsync's `-x` keeps them).
    pub one_file_system: bool,
    /// Leave out files larger than this.
    pub larger_than: Option<u64>,
}

impl Excludes {
    /// Reads a `--exclude-from` file: one pattern a line; blank lines and
    /// lines starting with `#` are ignored.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the file cannot be read.
    pub fn add_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::InvalidInput(format!("cannot read exclude file {}: {e}", path.display()))
        })?;
        for line in text.lines() {
            let l = line.trim_end();
            if !l.is_empty() && !l.starts_with('#') {
                self.patterns.push(l.to_string());
            }
        }
        Ok(())
    }

    /// The compiled matcher.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming a pattern that does not parse.
    pub(crate) fn matcher(&self) -> Result<Matcher> {
        let mut b = GitignoreBuilder::new("/");
        for p in &self.patterns {
            b.add_line(None, p)
                .map_err(|e| Error::InvalidInput(format!("bad exclude pattern {p:?}: {e}")))?;
        }
        let globs = b
            .build()
            .map_err(|e| Error::InvalidInput(format!("bad exclude patterns: {e}")))?;
        Ok(Matcher {
            globs,
            rules: self.clone(),
        })
    }
}

/// [`Excludes`] ready to match.
pub(crate) struct Matcher {
    globs: Gitignore,
    pub rules: Excludes,
}

impl Matcher {
    /// Whether the node at absolute path `path` is left out by a pattern.
    pub fn excluded(&self, path: &Path, is_dir: bool) -> bool {
        !self.globs.is_empty() && self.globs.matched(path, is_dir).is_ignore()
    }

    /// Whether a file of `size` bytes is too big to keep.
    pub fn too_large(&self, size: u64) -> bool {
        self.rules.larger_than.is_some_and(|max| size > max)
    }

    /// Whether a directory whose names are `names` is tagged to be left out;
    /// `tag_is_cache` checks a CACHEDIR.TAG's signature.
    pub fn tagged(&self, names: &[(Vec<u8>, u64)], tag_is_cache: impl Fn() -> bool) -> bool {
        let has = |n: &[u8]| names.iter().any(|(m, _)| m == n);
        self.rules.if_present.iter().any(|t| has(t.as_bytes()))
            || (self.rules.caches && has(b"CACHEDIR.TAG") && tag_is_cache())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &[&str]) -> Matcher {
        Excludes {
            patterns: p.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .matcher()
        .unwrap()
    }

    #[test]
    fn gitignore_rules_on_absolute_paths() {
        let x = m(&["*.tmp", "/home/*/.cache", "build/", "!keep.tmp"]);
        assert!(x.excluded(Path::new("/src/a/b.tmp"), false));
        assert!(!x.excluded(Path::new("/src/a/keep.tmp"), false));
        assert!(x.excluded(Path::new("/home/ann/.cache"), true));
        assert!(!x.excluded(Path::new("/srv/home/ann/.cache"), true));
        assert!(x.excluded(Path::new("/src/build"), true));
        assert!(!x.excluded(Path::new("/src/build"), false));
        assert!(!x.excluded(Path::new("/src/main.rs"), false));
    }

    #[test]
    fn bad_pattern_is_one_clear_error() {
        let e = Excludes {
            patterns: vec!["a{b".into()],
            ..Default::default()
        }
        .matcher()
        .err()
        .unwrap();
        assert!(e.to_string().contains("a{b"), "{e}");
    }

    #[test]
    fn tags() {
        let x = Excludes {
            if_present: vec![".nobackup".into()],
            caches: true,
            ..Default::default()
        }
        .matcher()
        .unwrap();
        let n = |s: &[&str]| {
            s.iter()
                .map(|s| (s.as_bytes().to_vec(), 0))
                .collect::<Vec<_>>()
        };
        assert!(x.tagged(&n(&["a", ".nobackup"]), || false));
        assert!(x.tagged(&n(&["CACHEDIR.TAG"]), || true));
        assert!(!x.tagged(&n(&["CACHEDIR.TAG"]), || false));
        assert!(!x.tagged(&n(&["a"]), || true));
    }
}
