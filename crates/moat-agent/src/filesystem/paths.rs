//! Turning a request's path into an absolute, clean path inside the sandbox.

use crate::rpc::{Code, RpcError};
use crate::users::User;

use super::sys::PATH_MAX;

/// Expands `raw` for `user`: empty means `workdir`, `~` and `~/…` start at the user's home, a
/// relative path is relative to the home; the result is absolute and lexically clean (no `.`,
/// `..` or repeated `/`), as upstream envd does. A NUL byte or a path the kernel would refuse as
/// too long is `invalid_argument`.
pub(crate) fn expand(raw: &str, user: &User, workdir: &str) -> Result<String, RpcError> {
    if raw.contains('\0') {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "path contains a NUL byte",
        ));
    }
    if raw.len() >= PATH_MAX {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!("path is longer than {} bytes", PATH_MAX - 1),
        ));
    }
    let joined = if raw.is_empty() {
        workdir.to_string()
    } else if raw == "~" {
        user.home.clone()
    } else if let Some(rest) = raw.strip_prefix("~/") {
        format!("{}/{rest}", user.home)
    } else if raw.starts_with('/') {
        raw.to_string()
    } else {
        format!("{}/{raw}", user.home)
    };
    let cleaned = clean(&joined);
    if cleaned.len() >= PATH_MAX {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!("path is longer than {} bytes", PATH_MAX - 1),
        ));
    }
    Ok(cleaned)
}

/// Lexically cleans `path` into an absolute path: `.` and empty components go, `..` removes the
/// previous component (and stays at `/` at the root).
pub(crate) fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for p in &parts {
        out.push('/');
        out.push_str(p);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Splits a clean absolute path into its parent and last component. The root splits into
/// (`/`, `.`), so operations on it address the root directory itself.
pub(crate) fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(0) if path.len() == 1 => ("/", "."),
        Some(0) => ("/", &path[1..]),
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (".", path),
    }
}

/// `base` joined with the relative `name` (either may be empty: relative paths are built with
/// this too).
pub(crate) fn join(base: &str, name: &str) -> String {
    if name.is_empty() {
        base.to_string()
    } else if base.is_empty() {
        name.to_string()
    } else if base.ends_with('/') {
        format!("{base}{name}")
    } else {
        format!("{base}/{name}")
    }
}

/// The last component of a clean absolute path (`/` for the root).
pub(crate) fn base_name(path: &str) -> &str {
    match split(path) {
        (_, ".") => "/",
        (_, name) => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: "/home/user".into(),
            shell: "/bin/sh".into(),
        }
    }

    #[test]
    fn expands_and_cleans() {
        let u = user();
        let e = |p: &str| expand(p, &u, "/work").expect("valid");
        assert_eq!(e(""), "/work");
        assert_eq!(e("~"), "/home/user");
        assert_eq!(e("~/a/b"), "/home/user/a/b");
        assert_eq!(e("a/./b//c/"), "/home/user/a/b/c");
        assert_eq!(e("../../../etc/passwd"), "/etc/passwd");
        assert_eq!(e("/a/../../.."), "/");
        assert_eq!(e("~x"), "/home/user/~x");
        assert!(expand("a\0b", &u, "/").is_err());
        assert!(expand(&"a".repeat(PATH_MAX), &u, "/").is_err());
    }

    #[test]
    fn splits() {
        assert_eq!(split("/"), ("/", "."));
        assert_eq!(split("/a"), ("/", "a"));
        assert_eq!(split("/a/b"), ("/a", "b"));
        assert_eq!(base_name("/"), "/");
        assert_eq!(base_name("/a/b"), "b");
        assert_eq!(join("/", "x"), "/x");
        assert_eq!(join("/a", "x/y"), "/a/x/y");
        assert_eq!(join("", "x"), "x");
    }
}
