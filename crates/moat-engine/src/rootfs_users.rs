//! Whether a directory root filesystem has the account its commands run as.
//!
//! The agent runs every command as a user it finds by name in the sandbox's `/etc/passwd`
//! (`user`, uid 1000, by default; `root` on request). The host template generates both; a
//! directory brings its own, so it is checked when it is named, not at the first command.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{EngineError, Result};

/// Largest `etc/passwd` read for the check; a real one is a few KiB.
const MAX_PASSWD_BYTES: u64 = 1 << 20;

/// Checks that `etc/passwd` under the root filesystem `dir` has an account `user` (with
/// numeric ids, a home and a shell), or says what to add. Symbolic links are not followed:
/// on the host they would lead outside `dir`.
pub fn check_account(dir: &Path, user: &str) -> Result<()> {
    let path = dir.join("etc/passwd");
    let shown = dir.display();
    let etc_is_link = std::fs::symlink_metadata(dir.join("etc"))
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false);
    let text = if etc_is_link {
        Err(std::io::Error::other("etc is a symbolic link"))
    } else {
        read_bounded(&path)
    };
    let text = match text {
        Ok(text) => text,
        Err(e) => {
            return Err(EngineError::Invalid(format!(
                "rootfs dir {shown}: cannot read etc/passwd ({e}); it needs one naming the \
                 account {user:?} that commands run as{}",
                add_hint(user)
            )));
        }
    };
    let found = text.lines().any(|line| {
        let f: Vec<&str> = line.split(':').collect();
        f.len() >= 7 && f[0] == user && f[2].parse::<u32>().is_ok() && f[3].parse::<u32>().is_ok()
    });
    if found {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "rootfs dir {shown} has no account {user:?} in etc/passwd, and commands run as \
             {user:?}{}",
            add_hint(user)
        )))
    }
}

/// What to add for `user`: the lines the host template uses.
fn add_hint(user: &str) -> String {
    match user {
        "user" => "; add \"user:x:1000:1000::/home/user:/bin/sh\" to its etc/passwd and \
                   \"user:x:1000:\" to its etc/group"
            .into(),
        "root" => "; add \"root:x:0:0::/root:/bin/sh\" to its etc/passwd and \"root:x:0:\" to \
                   its etc/group"
            .into(),
        _ => String::new(),
    }
}

/// The file at `path`, not through a symbolic link, at most [`MAX_PASSWD_BYTES`].
fn read_bounded(path: &Path) -> std::io::Result<String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_PASSWD_BYTES).read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_found_or_explained() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_account(dir.path(), "user").unwrap_err().to_string();
        assert!(err.contains("cannot read etc/passwd"), "{err}");
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        assert!(check_account(dir.path(), "root").is_ok());
        let err = check_account(dir.path(), "user").unwrap_err().to_string();
        assert!(err.contains("no account \"user\""), "{err}");
        assert!(
            err.contains("user:x:1000:1000::/home/user:/bin/sh"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("etc/passwd")).unwrap();
        let err = check_account(dir.path(), "root").unwrap_err().to_string();
        assert!(
            err.contains("cannot read etc/passwd"),
            "a link is not followed: {err}"
        );
    }
}
