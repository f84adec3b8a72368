//! The account commands run as, added to an image's tree when the image lacks it.
//!
//! A sandbox's commands run as `user` (uid and gid 1000) unless a template says `root`, and
//! the tools inside (a shell's prompt, `whoami`, Python's `getpass`) look the name up. Most
//! images have no such account, so the merged tree gets one: `user` appended to
//! `etc/passwd` and `etc/group` (made if missing), with home `/home/user`. The files are
//! replaced (written beside, renamed over), never written through: in the tree they are hard
//! links to the cached layers' files. An image whose `etc` is not a plain directory (a
//! symbolic link, say) is left alone, and every step goes through directory descriptors, so
//! nothing outside the tree is read or written.

use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use super::ImageError;
use super::sys;

/// The account added.
const USER_LINE: &str = "user:x:1000:1000:user:/home/user:/bin/sh\n";
/// Its group.
const GROUP_LINE: &str = "user:x:1000:\n";
/// What a missing `etc/passwd` starts with.
const ROOT_PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";
/// What a missing `etc/group` starts with.
const ROOT_GROUP: &str = "root:x:0:\n";
/// The largest account file read.
const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// Adds `user` to the tree at `rootfs` where it lacks one.
pub fn ensure_user(rootfs: &Path) -> Result<(), ImageError> {
    let fail =
        |what: &str, e: io::Error| ImageError::io(format!("{what} in {}", rootfs.display()), e);
    let root = sys::open_dir(rootfs).map_err(|e| fail("opening the tree", e))?;
    let etc = match sys::openat_dir(root.as_fd(), c"etc") {
        Ok(etc) => etc,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            sys::mkdirat(root.as_fd(), c"etc", 0o755).map_err(|e| fail("making etc", e))?;
            sys::openat_dir(root.as_fd(), c"etc").map_err(|e| fail("opening etc", e))?
        }
        // A symbolic link or another file: not followed, not replaced.
        Err(_) => return Ok(()),
    };
    add_line(&etc, c"passwd", ROOT_PASSWD, USER_LINE, 0o644)
        .map_err(|e| fail("adding user to etc/passwd", e))?;
    add_line(&etc, c"group", ROOT_GROUP, GROUP_LINE, 0o644)
        .map_err(|e| fail("adding user to etc/group", e))
}

/// Replaces `etc/name` with its content plus `line` unless an entry of the same name is there
/// already; a missing file starts as `initial`. A file that is not regular is left alone.
fn add_line(
    etc: &OwnedFd,
    name: &CStr,
    initial: &str,
    line: &str,
    mode: libc::mode_t,
) -> io::Result<()> {
    let account = line.split(':').next().unwrap_or_default();
    let mut text = match sys::openat(
        etc.as_fd(),
        name,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        0,
    ) {
        Ok(fd) => {
            let st = sys::fstat(fd.as_fd())?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Ok(());
            }
            let mut text = String::new();
            std::fs::File::from(fd)
                .take(MAX_ACCOUNT_FILE)
                .read_to_string(&mut text)?;
            text
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => initial.to_owned(),
        // A symbolic link (ELOOP) or something unreadable: left as the image has it.
        Err(_) => return Ok(()),
    };
    if text.lines().any(|l| l.split(':').next() == Some(account)) {
        return Ok(());
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    // Before an account of the image with the same id (uid 1000 is `ubuntu` or `node` in
    // some images), so that a lookup by id finds moat's name first; else at the end.
    let id = line.split(':').nth(2).unwrap_or_default();
    let mut at = text.len();
    let mut offset = 0;
    for l in text.split_inclusive('\n') {
        if l.split(':').nth(2) == Some(id) {
            at = offset;
            break;
        }
        offset += l.len();
    }
    text.insert_str(at, line);
    let staging = CString::new(format!("{}.moat-new", name.to_string_lossy()))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let _ = sys::unlinkat(etc.as_fd(), &staging, 0);
    let fd = sys::openat(
        etc.as_fd(),
        &staging,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        mode,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    sys::renameat(etc.as_fd(), &staging, name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn a_tree_without_the_account_gets_it_and_one_with_it_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("bare");
        std::fs::create_dir(&bare).unwrap();
        ensure_user(&bare).unwrap();
        let passwd = std::fs::read_to_string(bare.join("etc/passwd")).unwrap();
        assert_eq!(passwd, format!("{ROOT_PASSWD}{USER_LINE}"));

        // An image's passwd, hard-linked from a layer: replaced, the layer's copy untouched.
        let layer = dir.path().join("layer-passwd");
        std::fs::write(&layer, "root:x:0:0::/root:/bin/ash").unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::hard_link(&layer, tree.join("etc/passwd")).unwrap();
        ensure_user(&tree).unwrap();
        assert_eq!(
            std::fs::read_to_string(&layer).unwrap(),
            "root:x:0:0::/root:/bin/ash"
        );
        let new = std::fs::read_to_string(tree.join("etc/passwd")).unwrap();
        assert_eq!(new, format!("root:x:0:0::/root:/bin/ash\n{USER_LINE}"));
        assert_ne!(
            std::fs::metadata(&layer).unwrap().ino(),
            std::fs::metadata(tree.join("etc/passwd")).unwrap().ino()
        );
        ensure_user(&tree).unwrap();
        assert_eq!(
            std::fs::read_to_string(tree.join("etc/passwd")).unwrap(),
            new,
            "once"
        );

        // An image whose uid 1000 has another name: moat's comes first, theirs stays.
        let ubuntu = dir.path().join("ubuntu");
        std::fs::create_dir_all(ubuntu.join("etc")).unwrap();
        std::fs::write(
            ubuntu.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nubuntu:x:1000:1000::/home/ubuntu:/bin/sh\n",
        )
        .unwrap();
        ensure_user(&ubuntu).unwrap();
        assert_eq!(
            std::fs::read_to_string(ubuntu.join("etc/passwd")).unwrap(),
            format!(
                "root:x:0:0::/root:/bin/sh\n{USER_LINE}ubuntu:x:1000:1000::/home/ubuntu:/bin/sh\n"
            )
        );
    }

    #[test]
    fn links_out_of_the_tree_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("passwd"), "host\n").unwrap();
        // etc itself a link out.
        let a = dir.path().join("a");
        std::fs::create_dir(&a).unwrap();
        std::os::unix::fs::symlink(&outside, a.join("etc")).unwrap();
        ensure_user(&a).unwrap();
        // etc/passwd a link out.
        let b = dir.path().join("b");
        std::fs::create_dir_all(b.join("etc")).unwrap();
        std::os::unix::fs::symlink(outside.join("passwd"), b.join("etc/passwd")).unwrap();
        ensure_user(&b).unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.join("passwd")).unwrap(),
            "host\n"
        );
        assert!(!outside.join("group").exists());
    }
}
