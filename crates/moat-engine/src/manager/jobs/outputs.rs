//! Which files a job keeps: its output paths and globs, matched against the sandbox's files.
//!
//! A pattern is a path whose names may hold `*`, `?` and `[…]` (matching within one name) or
//! be `**` (any number of directories, none included). A relative pattern is under the
//! job's working directory. Only regular files match; symlinks are never followed.

use crate::agent_client::AgentClient;
use crate::images::build::copy::glob_match;
use moat_proto::envd::filesystem::{EntryInfo, FileType};

use super::super::{ManagerError, ManagerResult};

/// Deepest a `**` pattern is walked, in directories.
const MAX_WALK_DEPTH: u32 = 32;
/// Most names a pattern may have.
pub const MAX_PATTERN_NAMES: usize = 64;
/// Most `**` names a pattern may have.
pub const MAX_PATTERN_ANY_DIRS: usize = 4;

/// One output pattern, split into names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pattern {
    absolute: bool,
    parts: Vec<String>,
}

fn has_glob(part: &str) -> bool {
    part == "**" || part.bytes().any(|b| matches!(b, b'*' | b'?' | b'['))
}

impl Pattern {
    /// Parses `text`, refusing `.`, `..` and empty names.
    pub(super) fn parse(text: &str) -> ManagerResult<Pattern> {
        let absolute = text.starts_with('/');
        let parts: Vec<String> = text
            .split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if parts.is_empty() || parts.iter().any(|p| p == "." || p == "..") {
            return Err(ManagerError::Invalid(format!(
                "output {text:?}: a file path or glob with no '.' or '..' names"
            )));
        }
        if parts.iter().any(|p| p.contains("**") && p != "**") {
            return Err(ManagerError::Invalid(format!(
                "output {text:?}: '**' must be a whole name (a/**/b)"
            )));
        }
        if parts.len() > MAX_PATTERN_NAMES
            || parts.iter().filter(|p| *p == "**").count() > MAX_PATTERN_ANY_DIRS
        {
            return Err(ManagerError::Invalid(format!(
                "output {text:?}: at most {MAX_PATTERN_NAMES} names, of which at most \
                 {MAX_PATTERN_ANY_DIRS} '**'"
            )));
        }
        Ok(Pattern { absolute, parts })
    }

    /// The pattern made absolute under `base` (an absolute directory).
    fn under(&self, base: &str) -> Vec<String> {
        if self.absolute {
            return self.parts.clone();
        }
        base.split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .chain(self.parts.iter().cloned())
            .collect()
    }
}

/// Whether the names `path` match the pattern names `pattern`: one pass per pattern name
/// over the path's prefixes, so `**`s cost time in proportion to the names, never in the
/// number of ways to split the path among them.
fn matches(pattern: &[String], path: &[&str]) -> bool {
    // `reach[j]`: the pattern names so far match the first `j` names of the path.
    let mut reach = vec![false; path.len() + 1];
    reach[0] = true;
    for part in pattern {
        if part == "**" {
            // Any number of names: every prefix at or past one reached.
            let mut any = false;
            for r in reach.iter_mut() {
                any |= *r;
                *r = any;
            }
        } else {
            for j in (1..=path.len()).rev() {
                reach[j] = reach[j - 1] && glob_match(part.as_bytes(), path[j - 1].as_bytes());
            }
            reach[0] = false;
        }
        if !reach.contains(&true) {
            return false;
        }
    }
    reach[path.len()]
}

fn is_regular(e: &EntryInfo) -> bool {
    !e.is_symlink && e.symlink_target.is_none() && e.r#type == FileType::File as i32
}

/// The regular files `pattern` names in the sandbox of `client`, relative ones under `base`;
/// an error says why none could be looked for.
pub(super) async fn find(
    client: &AgentClient,
    pattern: &Pattern,
    base: &str,
) -> Result<Vec<(String, u64)>, String> {
    let parts = pattern.under(base);
    let literal = parts.iter().take_while(|p| !has_glob(p)).count();
    if literal == parts.len() {
        let path = format!("/{}", parts.join("/"));
        return match client.stat(&path, None).await {
            Ok(e) if is_regular(&e) => Ok(vec![(path, u64::try_from(e.size).unwrap_or(0))]),
            Ok(_) => Err(format!("{path} is not a regular file")),
            Err(e) => Err(e.to_string()),
        };
    }
    let dir = format!("/{}", parts[..literal].join("/"));
    let rest = &parts[literal..];
    let depth = if rest.iter().any(|p| p == "**") {
        MAX_WALK_DEPTH
    } else {
        u32::try_from(rest.len()).unwrap_or(MAX_WALK_DEPTH)
    };
    let entries = client
        .list_dir(&dir, depth, None)
        .await
        .map_err(|e| e.to_string())?;
    // Up to a walk's whole listing against the pattern: off the async workers.
    tokio::task::spawn_blocking(move || {
        entries
            .into_iter()
            .filter(is_regular)
            .filter(|e| {
                let names: Vec<&str> = e.path.split('/').filter(|p| !p.is_empty()).collect();
                matches(&parts, &names)
            })
            .map(|e| {
                let size = u64::try_from(e.size).unwrap_or(0);
                (e.path, size)
            })
            .collect()
    })
    .await
    .map_err(|e| format!("matching the outputs: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        let p = Pattern::parse(pattern).unwrap().under("/home/user");
        let names: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        matches(&p, &names)
    }

    #[test]
    fn patterns_match_as_documented() {
        assert!(m("out.txt", "/home/user/out.txt"));
        assert!(m("*.csv", "/home/user/a.csv"));
        assert!(!m("*.csv", "/home/user/d/a.csv"));
        assert!(m("**/*.csv", "/home/user/a.csv"));
        assert!(m("**/*.csv", "/home/user/d/e/a.csv"));
        assert!(m("/tmp/r[0-9].png", "/tmp/r7.png"));
        assert!(!m("/tmp/r[0-9].png", "/tmp/rx.png"));
        assert!(m("results/**", "/home/user/results/a/b"));
        assert!(m("**/**/x", "/home/user/x"));
        assert!(m("a/**/b/**/c", "/home/user/a/b/c"));
        assert!(m("a/**/b/**/c", "/home/user/a/x/b/y/z/c"));
        assert!(!m("a/**/b/**/c", "/home/user/a/c"));
        for bad in ["", "/", "../x", "a/./b", "a**/b", "**/**/**/**/**/x"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        assert!(Pattern::parse(&"a/".repeat(65)).is_err());
    }

    #[test]
    fn many_ways_to_split_a_path_take_no_time() {
        // Exponential for a matcher that tries every split: four `**`s and every name a
        // `*` before a last name that never matches.
        let pattern: Vec<String> = ["**", "*", "**", "*", "**", "*", "**"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain(std::iter::once("nothing".to_owned()))
            .collect();
        let path: Vec<&str> = std::iter::repeat_n("d", 60).collect();
        // A matcher that tries every split takes hours over these (the test is then ended
        // as hung); this one a few milliseconds.
        for _ in 0..10_000 {
            assert!(!matches(&pattern, &path));
        }
    }
}
