//! `.dockerignore`: the context paths `moat template build` leaves out of the archive it
//! uploads, as Docker reads the file: one pattern a line (`#` starts a comment), relative to
//! the context (a leading `/` or `./` is the context too), `*`, `?` and `[…]` within a path
//! component, `**` for any number of components, `!` to take a path back in. The last pattern
//! that matches a path, or a directory above it, decides.

use std::path::{Component, Path};

use anyhow::{Context, Result};
use moat_engine::images::build::copy::glob_match;

/// Longest `.dockerignore` read.
const MAX_BYTES: u64 = 1 << 20;

/// The patterns of a context's `.dockerignore`.
#[derive(Debug, Default)]
pub struct Ignore {
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    parts: Vec<String>,
    keep: bool,
}

impl Ignore {
    /// The `.dockerignore` of the context `dir` (none: nothing is left out).
    pub fn read(dir: &Path) -> Result<Ignore> {
        let path = dir.join(".dockerignore");
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ignore::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_BYTES), &mut text)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Ignore::parse(&text))
    }

    /// The patterns of `text`.
    pub fn parse(text: &str) -> Ignore {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|line| {
                let (keep, pattern) = match line.strip_prefix('!') {
                    Some(rest) => (true, rest.trim()),
                    None => (false, line),
                };
                let parts: Vec<String> = pattern
                    .split('/')
                    .filter(|p| !p.is_empty() && *p != ".")
                    .map(str::to_owned)
                    .collect();
                (!parts.is_empty()).then_some(Rule { parts, keep })
            })
            .collect();
        Ignore { rules }
    }

    /// Whether any pattern takes a path back in (then an ignored directory is still walked).
    pub fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|r| r.keep)
    }

    /// Whether `rel` (a path relative to the context) is left out.
    pub fn ignores(&self, rel: &Path) -> bool {
        let parts: Vec<&[u8]> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(p) => Some(p.as_encoded_bytes()),
                _ => None,
            })
            .collect();
        let mut ignored = false;
        for rule in &self.rules {
            // The path itself or a directory above it.
            let hit = (1..=parts.len()).any(|n| matches(&rule.parts, &parts[..n]));
            if hit {
                ignored = !rule.keep;
            }
        }
        ignored
    }
}

/// Whether the pattern components `pattern` match the path components `path` whole.
fn matches(pattern: &[String], path: &[&[u8]]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => (0..=path.len()).any(|i| matches(rest, &path[i..])),
        Some((first, rest)) => path
            .split_first()
            .is_some_and(|(p, tail)| glob_match(first.as_bytes(), p) && matches(rest, tail)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_leave_paths_out_as_docker_does() {
        let i = Ignore::parse(
            "# comment\n\nnode_modules\n/.git\n*.log\n**/__pycache__\nbuild/*\n!build/keep.txt\n",
        );
        let out = |p: &str| i.ignores(Path::new(p));
        assert!(out("node_modules"));
        assert!(out("node_modules/x/y.js"), "beneath an ignored directory");
        assert!(out(".git/HEAD"));
        assert!(out("debug.log"));
        assert!(
            !out("logs/debug.log"),
            "`*.log` is of the context's root only"
        );
        assert!(out("a/b/__pycache__/m.pyc"));
        assert!(out("build/out.bin"));
        assert!(!out("build/keep.txt"), "taken back in");
        assert!(!out("src/main.py"));
        assert!(i.has_exceptions());
        assert!(!Ignore::parse("").ignores(Path::new("x")));
    }
}
