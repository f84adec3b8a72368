//! Building [`EntryInfo`] the way upstream envd fills it.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use moat_proto::filesystem::{EntryInfo, FileType};

use super::paths;
use super::sys;
use crate::users;

/// Prefix of the extended attributes that carry user metadata.
pub(crate) const METADATA_PREFIX: &str = "user.e2b.";

/// Owner and group names, looked up once per request (each lookup reads `/etc/passwd` or
/// `/etc/group`, and a listing shows the same few ids again and again).
#[derive(Default)]
pub(crate) struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn user(&mut self, uid: u32) -> String {
        self.users
            .entry(uid)
            .or_insert_with(|| users::user_name(uid))
            .clone()
    }

    fn group(&mut self, gid: u32) -> String {
        self.groups
            .entry(gid)
            .or_insert_with(|| users::group_name(gid))
            .clone()
    }
}

/// The wire type of a mode: regular file, directory, or unspecified for anything else.
pub(crate) fn wire_type(mode: libc::mode_t) -> FileType {
    match sys::file_type(mode) {
        libc::S_IFREG => FileType::File,
        libc::S_IFDIR => FileType::Directory,
        _ => FileType::Unspecified,
    }
}

/// The mode as Go's `FileMode.String()` renders it (what upstream sends as `permissions`): type
/// and special-bit letters from `dalTLDpSugct?` (or `-`), then `rwxrwxrwx`.
pub(crate) fn permissions_string(mode: libc::mode_t) -> String {
    let mut s = String::with_capacity(12);
    let ty = sys::file_type(mode);
    if ty == libc::S_IFDIR {
        s.push('d');
    }
    if ty == libc::S_IFLNK {
        s.push('L');
    }
    if ty == libc::S_IFBLK || ty == libc::S_IFCHR {
        s.push('D');
    }
    if ty == libc::S_IFIFO {
        s.push('p');
    }
    if ty == libc::S_IFSOCK {
        s.push('S');
    }
    if mode & libc::S_ISUID != 0 {
        s.push('u');
    }
    if mode & libc::S_ISGID != 0 {
        s.push('g');
    }
    if ty == libc::S_IFCHR {
        s.push('c');
    }
    if mode & libc::S_ISVTX != 0 {
        s.push('t');
    }
    if s.is_empty() {
        s.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

fn timestamp(st: &libc::stat) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp {
        seconds: st.st_mtime,
        nanos: st.st_mtime_nsec as i32,
    }
}

/// Same file: device and inode match.
pub(crate) fn same_file(a: &libc::stat, b: &libc::stat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

/// User metadata of the open file `fd`: its `user.e2b.*` attributes, prefix stripped. A
/// filesystem without extended attributes has none; values that are not UTF-8 are skipped (the
/// wire map holds strings, and anything inside the sandbox can set such values).
pub(crate) fn read_metadata(fd: BorrowedFd<'_>) -> io::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    let names = match sys::list_xattrs(fd) {
        Ok(n) => n,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP)) => return Ok(out),
        Err(e) => return Err(e),
    };
    for name in names {
        let Some(key) = name.strip_prefix(METADATA_PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(key) = std::str::from_utf8(key) else {
            continue;
        };
        let Ok(cname) = CString::new(name.clone()) else {
            continue;
        };
        let value = match sys::get_xattr(fd, &cname) {
            Ok(v) => v,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        if let Ok(value) = String::from_utf8(value) {
            out.insert(key.to_string(), value);
        }
    }
    Ok(out)
}

/// Metadata of `name` in `dir` if it is (or, following symlinks, leads to) the regular file or
/// directory `expect`; reading needs read permission, and anything that fails means none.
fn metadata_of(
    dir: BorrowedFd<'_>,
    name: &CStr,
    expect: &libc::stat,
    follow: bool,
) -> HashMap<String, String> {
    let ty = sys::file_type(expect.st_mode);
    if ty != libc::S_IFREG && ty != libc::S_IFDIR {
        return HashMap::new();
    }
    let mut flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let Ok(fd) = sys::openat2(Some(dir), name, flags, 0, sys::RESOLVE) else {
        return HashMap::new();
    };
    match sys::fstat(fd.as_fd()) {
        Ok(st) if same_file(&st, expect) => read_metadata(fd.as_fd()).unwrap_or_default(),
        _ => HashMap::new(),
    }
}

/// The entry `name` in directory `dir`, reported at `path` (absolute). A symlink reports its
/// target's type and permission bits and the resolved `symlink_target` (which marks it as a
/// link); its own size, owner, `permissions` and time, as upstream does. `is_symlink` stays
/// false: the envd version the agent reports has no such field, and an SDK that knows it would
/// show every link as a symlink instead of its target's type.
pub(crate) fn entry_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    path: &str,
    names: &mut Names,
) -> io::Result<EntryInfo> {
    let st = sys::fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW)?;
    let mut info = EntryInfo {
        name: paths::base_name(path).to_string(),
        r#type: wire_type(st.st_mode) as i32,
        path: path.to_string(),
        size: st.st_size,
        mode: st.st_mode & 0o777,
        permissions: permissions_string(st.st_mode),
        owner: names.user(st.st_uid),
        group: names.group(st.st_gid),
        modified_time: Some(timestamp(&st)),
        symlink_target: None,
        metadata: HashMap::new(),
        is_symlink: false,
    };
    if sys::file_type(st.st_mode) != libc::S_IFLNK {
        info.metadata = metadata_of(dir, name, &st, false);
        return Ok(info);
    }
    // Where the link text points, lexically: the answer when the target cannot be resolved.
    let text = sys::readlinkat(dir, name).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let (parent, _) = paths::split(path);
    let lexical = if text.starts_with('/') {
        paths::clean(&text)
    } else {
        paths::clean(&paths::join(parent, &text))
    };
    match sys::openat2(Some(dir), name, libc::O_PATH, 0, sys::RESOLVE) {
        Ok(fd) => {
            let target = sys::fstat(fd.as_fd())?;
            info.r#type = wire_type(target.st_mode) as i32;
            info.mode = target.st_mode & 0o777;
            info.symlink_target = Some(real_path(path).unwrap_or(lexical));
            info.metadata = metadata_of(dir, name, &target, true);
        }
        Err(_) => {
            // Dangling, a loop, a magic link or not searchable: upstream leaves type and mode
            // unset.
            info.r#type = FileType::Unspecified as i32;
            info.mode = 0;
            info.symlink_target = Some(lexical);
        }
    }
    Ok(info)
}

/// Most symlinks one resolution follows, as the kernel's limit.
const MAX_LINKS: usize = 40;

/// `path` (absolute and clean) with every symlink resolved, found by reading the links as text
/// with the caller's permissions. It only names the object; the file operations themselves open
/// paths with `openat2`, so a link changed meanwhile cannot redirect them. (The kernel's own
/// answer, `/proc/self/fd/N`, is not readable by a user other than the agent's.)
pub(crate) fn real_path(path: &str) -> io::Result<String> {
    let mut pending: Vec<String> = path.split('/').rev().map(str::to_string).collect();
    let mut resolved: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(comp) = pending.pop() {
        match comp.as_str() {
            "" | "." => continue,
            ".." => {
                // The resolved prefix holds no symlinks, so `..` is its parent.
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let mut candidate = String::new();
        for c in resolved.iter().chain(std::iter::once(&comp)) {
            candidate.push('/');
            candidate.push_str(c);
        }
        let md = std::fs::symlink_metadata(&candidate)?;
        if !md.file_type().is_symlink() {
            resolved.push(comp);
            continue;
        }
        links += 1;
        if links > MAX_LINKS {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        let target = std::fs::read_link(&candidate)?;
        let target = target
            .to_str()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "link is not UTF-8"))?;
        if target.starts_with('/') {
            resolved.clear();
        }
        pending.extend(target.split('/').rev().map(str::to_string));
    }
    Ok(paths::clean(&resolved.join("/")))
}

/// `name` (a C string) as text, for building paths; names that are not UTF-8 are rendered
/// lossily.
pub(crate) fn name_text(name: &CStr) -> String {
    sys::os(name).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_modes_like_go() {
        assert_eq!(permissions_string(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(permissions_string(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions_string(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
        assert_eq!(permissions_string(libc::S_IFDIR | 0o1777), "dtrwxrwxrwx");
        assert_eq!(permissions_string(libc::S_IFCHR | 0o666), "Dcrw-rw-rw-");
        assert_eq!(permissions_string(libc::S_IFREG | 0o4755), "urwxr-xr-x");
        assert_eq!(permissions_string(libc::S_IFIFO | 0o600), "prw-------");
    }
}
