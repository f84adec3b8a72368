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

/// Whether the names `path` match the pattern names `pattern`.
fn matches(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| matches(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((name, tail)) => {
                glob_match(first.as_bytes(), name.as_bytes()) && matches(rest, tail)
            }
            None => false,
        },
    }
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
    let mut found = Vec::new();
    for e in entries.iter().filter(|e| is_regular(e)) {
        let names: Vec<&str> = e.path.split('/').filter(|p| !p.is_empty()).collect();
        if matches(&parts, &names) {
            found.push((e.path.clone(), u64::try_from(e.size).unwrap_or(0)));
        }
    }
    Ok(found)
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
        for bad in ["", "/", "../x", "a/./b", "a**/b"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
