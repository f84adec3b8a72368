//! The blocking file operations behind the RPCs and `/files`. Each runs on a blocking-pool thread
//! that already carries the caller's credentials (see `creds`), so the kernel's permission checks
//! are the user's.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use moat_proto::filesystem::{EntryInfo, FileType};

use super::entry::{self, Names};
use super::paths;
use super::sys;
use crate::rpc::{Code, RpcError};

/// The superblock magic of procfs.
const PROC_SUPER_MAGIC: u32 = 0x9fa0;

/// Most entries one `ListDir` returns; a bigger tree is `resource_exhausted` (the answer must
/// fit in one message, and a bind-mount loop would otherwise never end).
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// Whether a lookup that failed with `ELOOP` did so because it crossed a magic link rather than
/// a symlink loop: the same lookup without `RESOLVE_NO_MAGICLINKS` gets further. The retry opens
/// `O_PATH` only, which reads nothing and cannot block.
fn crossed_magic_link(path: &CStr) -> bool {
    match sys::openat2(None, path, libc::O_PATH, 0, 0) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() != Some(libc::ELOOP),
    }
}

/// Maps a failed lookup of `path` to its RPC error.
pub(crate) fn lookup_error(err: &io::Error, path: &str) -> RpcError {
    match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => {
            RpcError::new(Code::NotFound, format!("{path}: no such file or directory"))
        }
        Some(libc::ELOOP) => {
            let magic = sys::cstring(path).is_ok_and(|c| crossed_magic_link(&c));
            if magic {
                RpcError::new(
                    Code::PermissionDenied,
                    format!("{path}: goes through a /proc magic link; refused"),
                )
            } else {
                RpcError::new(
                    Code::FailedPrecondition,
                    format!("{path}: too many levels of symbolic links (a symlink loop?)"),
                )
            }
        }
        Some(libc::ENAMETOOLONG) => {
            RpcError::new(Code::InvalidArgument, format!("{path}: name too long"))
        }
        _ => RpcError::from_io(err, path),
    }
}

/// Opens `path` itself with `O_PATH`, following ordinary symlinks and refusing magic links.
pub(crate) fn open_path(path: &str) -> Result<OwnedFd, RpcError> {
    let c = sys::cstring(path).map_err(|e| RpcError::from_io(&e, path))?;
    sys::openat2(None, &c, libc::O_PATH, 0, sys::RESOLVE).map_err(|e| lookup_error(&e, path))
}

/// The parent directory of `path` (opened `O_PATH`) and the last component, for the `*at` calls.
pub(crate) fn open_parent(path: &str) -> Result<(OwnedFd, CString), RpcError> {
    let (parent, name) = paths::split(path);
    let dir = open_path(parent)?;
    let st = sys::fstat(dir.as_fd()).map_err(|e| RpcError::from_io(&e, parent))?;
    if sys::file_type(st.st_mode) != libc::S_IFDIR {
        return Err(RpcError::new(
            Code::NotFound,
            format!("{path}: no such file or directory ({parent} is not a directory)"),
        ));
    }
    let name = sys::cstring(name).map_err(|e| RpcError::from_io(&e, path))?;
    Ok((dir, name))
}

/// The entry at `path` (not following a final symlink for the entry itself, but reporting its
/// target). A final symlink that is a magic link is refused like one in the middle of the path.
pub(crate) fn stat(path: &str) -> Result<EntryInfo, RpcError> {
    let (dir, name) = open_parent(path)?;
    let st = sys::fstatat(dir.as_fd(), &name, libc::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| lookup_error(&e, path))?;
    if sys::file_type(st.st_mode) == libc::S_IFLNK
        && let Err(e) = sys::openat2(Some(dir.as_fd()), &name, libc::O_PATH, 0, sys::RESOLVE)
    {
        // A /proc link that cannot be followed is a magic link (the kernel checks access to the
        // process before it even gets to RESOLVE_NO_MAGICLINKS, so the error may be EACCES).
        let on_proc = sys::fs_magic(dir.as_fd()).is_ok_and(|m| m == PROC_SUPER_MAGIC);
        let err = lookup_error(&e, path);
        if on_proc || err.code == Code::PermissionDenied {
            return Err(RpcError::new(
                Code::PermissionDenied,
                format!("{path}: a /proc magic link; refused"),
            ));
        }
    }
    entry::entry_at(dir.as_fd(), &name, path, &mut Names::default())
        .map_err(|e| lookup_error(&e, path))
}

/// Makes sure directory `path` exists, creating missing components (owned by `uid:gid`), and
/// returns it opened `O_PATH`. Every step is an `*at` call on the previous directory, so no
/// component is looked up twice by name.
pub(crate) fn ensure_dirs(path: &str, uid: u32, gid: u32) -> Result<OwnedFd, RpcError> {
    let mut cur = open_path("/")?;
    let mut sofar = String::new();
    let flags = libc::O_PATH | libc::O_DIRECTORY;
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        sofar.push('/');
        sofar.push_str(comp);
        let c = sys::cstring(comp).map_err(|e| RpcError::from_io(&e, &sofar))?;
        let next = match sys::openat2(Some(cur.as_fd()), &c, flags, 0, sys::RESOLVE) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                match sys::mkdirat(cur.as_fd(), &c, 0o755) {
                    // New directories belong to the user (they already do when the thread runs
                    // as the user; this fixes the group under a setgid parent). Best effort.
                    Ok(()) => drop(sys::lchownat(cur.as_fd(), &c, uid, gid)),
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(RpcError::from_io(&e, &sofar)),
                }
                sys::openat2(Some(cur.as_fd()), &c, flags, 0, sys::RESOLVE)
                    .map_err(|e| lookup_error(&e, &sofar))?
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(RpcError::new(
                    Code::InvalidArgument,
                    format!("{sofar} exists and is not a directory"),
                ));
            }
            Err(e) => return Err(lookup_error(&e, &sofar)),
        };
        cur = next;
    }
    Ok(cur)
}

/// `MakeDir`: creates `path` and its missing parents.
pub(crate) fn make_dir(path: &str, uid: u32, gid: u32) -> Result<EntryInfo, RpcError> {
    match open_path(path) {
        Ok(fd) => {
            let st = sys::fstat(fd.as_fd()).map_err(|e| RpcError::from_io(&e, path))?;
            return Err(if sys::file_type(st.st_mode) == libc::S_IFDIR {
                RpcError::new(
                    Code::AlreadyExists,
                    format!("directory already exists: {path}"),
                )
            } else {
                RpcError::new(
                    Code::InvalidArgument,
                    format!("path already exists but is not a directory: {path}"),
                )
            });
        }
        Err(e) if e.code == Code::NotFound => {}
        Err(e) => return Err(e),
    }
    ensure_dirs(path, uid, gid)?;
    stat(path)
}

/// `Move`: renames `source` to `destination`, creating the destination's missing parents.
pub(crate) fn move_entry(
    source: &str,
    destination: &str,
    uid: u32,
    gid: u32,
) -> Result<EntryInfo, RpcError> {
    let (src_dir, src_name) = open_parent(source)?;
    let src_st =
        sys::fstatat(src_dir.as_fd(), &src_name, libc::AT_SYMLINK_NOFOLLOW).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                RpcError::new(Code::NotFound, format!("source not found: {source}"))
            } else {
                lookup_error(&e, source)
            }
        })?;
    let (dst_parent, dst_name) = paths::split(destination);
    let dst_dir = ensure_dirs(dst_parent, uid, gid)?;
    let dst_c = sys::cstring(dst_name).map_err(|e| RpcError::from_io(&e, destination))?;
    let what = format!("moving {source} to {destination}");
    match sys::renameat(src_dir.as_fd(), &src_name, dst_dir.as_fd(), &dst_c) {
        Ok(()) => {}
        // Separate mounts (the sandbox's /tmp and home may be): a regular file is copied and
        // the source removed, as `mv` does; anything else cannot move.
        Err(e)
            if e.raw_os_error() == Some(libc::EXDEV)
                && sys::file_type(src_st.st_mode) == libc::S_IFREG =>
        {
            copy_across(&src_dir, &src_name, &src_st, &dst_dir, &dst_c)
                .map_err(|e| RpcError::from_io(&e, &what))?;
        }
        Err(e) => {
            return Err(match e.raw_os_error() {
                Some(libc::EXDEV) => RpcError::new(
                    Code::FailedPrecondition,
                    format!("{what}: only files can move between filesystems"),
                ),
                Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => RpcError::new(
                    Code::AlreadyExists,
                    format!("{what}: destination is a non-empty directory"),
                ),
                Some(libc::EBUSY) | Some(libc::EINVAL) => {
                    RpcError::new(Code::InvalidArgument, format!("{what}: {e}"))
                }
                _ => RpcError::from_io(&e, &what),
            });
        }
    }
    entry::entry_at(dst_dir.as_fd(), &dst_c, destination, &mut Names::default())
        .map_err(|e| lookup_error(&e, destination))
}

/// Moves regular file `name` of `src_dir` (whose stat is `st`) to `dst_name` in `dst_dir` on
/// another filesystem: copies it to a hidden temporary name next to the destination, renames
/// that over the destination (so a reader never sees half a file), then removes the source.
fn copy_across(
    src_dir: &OwnedFd,
    name: &CStr,
    st: &libc::stat,
    dst_dir: &OwnedFd,
    dst_name: &CStr,
) -> io::Result<()> {
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let src = sys::openat2(Some(src_dir.as_fd()), name, flags, 0, sys::RESOLVE)?;
    let now = sys::fstat(src.as_fd())?;
    if !entry::same_file(st, &now) || sys::file_type(now.st_mode) != libc::S_IFREG {
        return Err(io::Error::other("the source changed while being moved"));
    }
    let tmp = sys::cstring(&format!(".moat-move-{}", sys::random_id()?))?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    let dst = sys::openat2(
        Some(dst_dir.as_fd()),
        &tmp,
        flags,
        st.st_mode & 0o777,
        sys::RESOLVE,
    )?;
    let copied = std::io::copy(&mut std::fs::File::from(src), &mut std::fs::File::from(dst))
        .and_then(|_| sys::renameat(dst_dir.as_fd(), &tmp, dst_dir.as_fd(), dst_name));
    if let Err(e) = copied {
        let _ = sys::unlinkat(dst_dir.as_fd(), &tmp, 0);
        return Err(e);
    }
    sys::unlinkat(src_dir.as_fd(), name, 0)
}

/// A directory being walked: its descriptor, its path relative to the walk's root, its depth
/// (1 for the root's children) and its names still to visit.
struct Frame {
    fd: OwnedFd,
    rel: String,
    level: u32,
    names: std::vec::IntoIter<CString>,
}

/// `ListDir`: the entries under `path` (a directory, or a symlink to one) down to `depth` levels,
/// depth-first, each directory's names in byte order. Symlinks below the top are listed, not
/// followed. Entries that vanish or cannot be examined while walking are skipped, as are
/// subdirectories the user cannot read.
pub(crate) fn list_dir(path: &str, depth: u32) -> Result<Vec<EntryInfo>, RpcError> {
    let depth = depth.max(1);
    let root = open_path(path)?;
    let st = sys::fstat(root.as_fd()).map_err(|e| RpcError::from_io(&e, path))?;
    if sys::file_type(st.st_mode) != libc::S_IFDIR {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!("path is not a directory: {path}"),
        ));
    }
    // Entries are reported under the resolved directory (upstream reports real paths).
    let base = entry::real_path(path).unwrap_or_else(|_| path.to_string());
    let names = sys::read_dir_names(root.as_fd()).map_err(|e| RpcError::from_io(&e, path))?;
    let mut stack = vec![Frame {
        fd: root,
        rel: String::new(),
        level: 1,
        names: names.into_iter(),
    }];
    let mut out = Vec::new();
    let mut owners = Names::default();
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.next() else {
            stack.pop();
            continue;
        };
        let rel = paths::join(&top.rel, &entry::name_text(&name));
        let full = paths::join(&base, &rel);
        let Ok(info) = entry::entry_at(top.fd.as_fd(), &name, &full, &mut owners) else {
            continue;
        };
        let descend = info.symlink_target.is_none()
            && info.r#type == FileType::Directory as i32
            && top.level < depth;
        out.push(info);
        if out.len() > MAX_LIST_ENTRIES {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("{path}: more than {MAX_LIST_ENTRIES} entries; list with a smaller depth"),
            ));
        }
        if !descend {
            continue;
        }
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        let Ok(child) = sys::openat2(Some(top.fd.as_fd()), &name, flags, 0, sys::RESOLVE) else {
            continue;
        };
        let Ok(names) = sys::read_dir_names(child.as_fd()) else {
            continue;
        };
        let level = top.level + 1;
        stack.push(Frame {
            fd: child,
            rel,
            level,
            names: names.into_iter(),
        });
    }
    Ok(out)
}

/// Removes the directory tree `name` in `dir` without following any symlink: every step is an
/// `*at` call on an open directory, and the walk keeps an explicit stack (a tree deeper than any
/// path can name would overflow a recursive walk).
pub(crate) fn remove_tree(dir: &OwnedFd, name: &CStr, path: &str) -> Result<(), RpcError> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
    let open = |parent: &OwnedFd, n: &CStr| -> io::Result<(OwnedFd, Vec<CString>)> {
        let fd = sys::openat2(Some(parent.as_fd()), n, flags, 0, sys::RESOLVE)?;
        let names = sys::read_dir_names(fd.as_fd())?;
        Ok((fd, names))
    };
    let err = |e: io::Error| RpcError::from_io(&e, &format!("removing {path}"));
    let (fd, names) = open(dir, name).map_err(err)?;
    // Each frame: the directory, its name in its parent, and its names still to visit.
    let mut stack: Vec<(OwnedFd, CString, std::vec::IntoIter<CString>)> =
        vec![(fd, name.to_owned(), names.into_iter())];
    while let Some((fd, _, names)) = stack.last_mut() {
        if let Some(child) = names.next() {
            let st = match sys::fstatat(fd.as_fd(), &child, libc::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(err(e)),
            };
            if sys::file_type(st.st_mode) == libc::S_IFDIR {
                let (cfd, cnames) = open(fd, &child).map_err(err)?;
                stack.push((cfd, child, cnames.into_iter()));
            } else {
                match sys::unlinkat(fd.as_fd(), &child, 0) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(err(e)),
                }
            }
            continue;
        }
        let Some((done, done_name, _)) = stack.pop() else {
            break;
        };
        drop(done);
        let parent = stack.last().map_or(dir, |(p, _, _)| p);
        match sys::unlinkat(parent.as_fd(), &done_name, libc::AT_REMOVEDIR) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

/// `Remove`: removes `path` (a directory with everything in it); a missing path is fine.
pub(crate) fn remove(path: &str) -> Result<(), RpcError> {
    if path == "/" {
        return Err(RpcError::new(Code::InvalidArgument, "refusing to remove /"));
    }
    let (dir, name) = match open_parent(path) {
        Ok(p) => p,
        Err(e) if e.code == Code::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let st = match sys::fstatat(dir.as_fd(), &name, libc::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(lookup_error(&e, path)),
    };
    if sys::file_type(st.st_mode) == libc::S_IFDIR {
        remove_tree(&dir, &name, path)
    } else {
        match sys::unlinkat(dir.as_fd(), &name, 0) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(RpcError::from_io(&e, &format!("removing {path}"))),
        }
    }
}

/// How many times an open is tried when the file at the path is replaced between the look and
/// the open: a file replaced by a rename (how editors and careful writers save) is read or
/// written whole on the next try; only a path replaced on every try is refused.
const REPLACED_TRIES: usize = 16;

/// Runs `open` until it finds the same file it looked at (`Code::Aborted` means it did not),
/// at most [`REPLACED_TRIES`] times.
fn open_unreplaced<T>(mut open: impl FnMut() -> Result<T, RpcError>) -> Result<T, RpcError> {
    let mut tries = 1;
    loop {
        match open() {
            Err(e) if e.code == Code::Aborted && tries < REPLACED_TRIES => tries += 1,
            done => return done,
        }
    }
}

/// Opens the regular file at `path` for reading. The type is checked before the real open (on
/// an `O_PATH` descriptor) and again after it on the same inode, and the open itself is
/// non-blocking, so a FIFO, socket or device can neither hang nor be read.
pub(crate) fn open_read(path: &str) -> Result<(std::fs::File, u64), RpcError> {
    open_unreplaced(|| open_read_once(path))
}

fn open_read_once(path: &str) -> Result<(std::fs::File, u64), RpcError> {
    let probe = open_path(path)?;
    let st = sys::fstat(probe.as_fd()).map_err(|e| RpcError::from_io(&e, path))?;
    check_regular(&st, path)?;
    let c = sys::cstring(path).map_err(|e| RpcError::from_io(&e, path))?;
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
    let fd = sys::openat2(None, &c, flags, 0, sys::RESOLVE).map_err(|e| lookup_error(&e, path))?;
    let st2 = sys::fstat(fd.as_fd()).map_err(|e| RpcError::from_io(&e, path))?;
    check_regular(&st2, path)?;
    if !entry::same_file(&st, &st2) {
        return Err(RpcError::new(
            Code::Aborted,
            format!("{path}: changed while being opened"),
        ));
    }
    sys::set_blocking(fd.as_fd()).map_err(|e| RpcError::from_io(&e, path))?;
    Ok((std::fs::File::from(fd), st2.st_size.max(0) as u64))
}

fn check_regular(st: &libc::stat, path: &str) -> Result<(), RpcError> {
    match sys::file_type(st.st_mode) {
        libc::S_IFREG => Ok(()),
        libc::S_IFDIR => Err(RpcError::new(
            Code::InvalidArgument,
            format!("{path} is a directory"),
        )),
        _ => Err(RpcError::new(
            Code::InvalidArgument,
            format!("{path} is not a regular file"),
        )),
    }
}

/// Opens (creating or truncating) the regular file at `path` for writing, creating missing parent
/// directories; new directories and the file end up owned by `uid:gid` where the kernel allows
/// it to the calling user. Checked like [`open_read`]: an existing FIFO, socket, device or
/// directory is refused without blocking.
pub(crate) fn open_write(path: &str, uid: u32, gid: u32) -> Result<std::fs::File, RpcError> {
    let (parent, name) = paths::split(path);
    if name == "." {
        return Err(RpcError::new(Code::InvalidArgument, "/ is a directory"));
    }
    let dir = ensure_dirs(parent, uid, gid)?;
    let c = sys::cstring(name).map_err(|e| RpcError::from_io(&e, path))?;
    open_unreplaced(|| open_write_once(&dir, &c, path, uid, gid))
}

fn open_write_once(
    dir: &OwnedFd,
    c: &CString,
    path: &str,
    uid: u32,
    gid: u32,
) -> Result<std::fs::File, RpcError> {
    // Look before opening: the open must not even start on something that is not a file.
    let before = match sys::openat2(Some(dir.as_fd()), c, libc::O_PATH, 0, sys::RESOLVE) {
        Ok(fd) => {
            let st = sys::fstat(fd.as_fd()).map_err(|e| RpcError::from_io(&e, path))?;
            check_regular(&st, path)?;
            Some(st)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
        Err(e) => return Err(lookup_error(&e, path)),
    };
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_NONBLOCK | libc::O_NOCTTY;
    let fd = sys::openat2(Some(dir.as_fd()), c, flags, 0o644, sys::RESOLVE).map_err(|e| match e
        .raw_os_error()
    {
        Some(libc::EISDIR) => {
            RpcError::new(Code::InvalidArgument, format!("{path} is a directory"))
        }
        Some(libc::ENXIO) => RpcError::new(
            Code::InvalidArgument,
            format!("{path} is not a regular file"),
        ),
        _ => lookup_error(&e, path),
    })?;
    let st = sys::fstat(fd.as_fd()).map_err(|e| RpcError::from_io(&e, path))?;
    check_regular(&st, path)?;
    if before.is_some_and(|b| !entry::same_file(&b, &st)) {
        return Err(RpcError::new(
            Code::Aborted,
            format!("{path}: changed while being opened"),
        ));
    }
    sys::set_blocking(fd.as_fd()).map_err(|e| RpcError::from_io(&e, path))?;
    // Truncating is a change watchers see (a WRITE event), so an empty file, new ones included,
    // is left as it is: the events of a write are then upstream's (which truncates in `open`,
    // a no-op on a file it creates).
    if st.st_size != 0 {
        sys::truncate(fd.as_fd()).map_err(|e| RpcError::from_io(&e, path))?;
    }
    // Upstream hands the file to the user. The thread runs as the user, so this succeeds for
    // files the user owns (fixing the group) and for root; the agent never gives a user a file
    // they could not chown themselves.
    let _ = sys::fchown(fd.as_fd(), uid, gid);
    Ok(std::fs::File::from(fd))
}

/// Replaces the `user.e2b.*` metadata of the open file `file` with `metadata`.
pub(crate) fn write_metadata(
    file: &std::fs::File,
    metadata: &[(String, String)],
    path: &str,
) -> Result<(), RpcError> {
    let fd = file.as_fd();
    let existing = match sys::list_xattrs(fd) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) && metadata.is_empty() => {
            return Ok(());
        }
        Err(e) => return Err(xattr_error(&e, path)),
    };
    let prefix = entry::METADATA_PREFIX.as_bytes();
    for name in existing {
        let Some(key) = name.strip_prefix(prefix) else {
            continue;
        };
        if metadata.iter().any(|(k, _)| k.as_bytes() == key) {
            continue;
        }
        let Ok(cname) = CString::new(name.clone()) else {
            continue;
        };
        match sys::remove_xattr(fd, &cname) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(xattr_error(&e, path)),
        }
    }
    for (k, v) in metadata {
        let name = CString::new(format!("{}{k}", entry::METADATA_PREFIX))
            .map_err(|_| RpcError::new(Code::InvalidArgument, "metadata key contains NUL"))?;
        sys::set_xattr(fd, &name, v.as_bytes()).map_err(|e| xattr_error(&e, path))?;
    }
    Ok(())
}

fn xattr_error(err: &io::Error, path: &str) -> RpcError {
    if err.raw_os_error() == Some(libc::ENOTSUP) {
        RpcError::new(
            Code::FailedPrecondition,
            format!("{path}: the filesystem does not support metadata (extended attributes)"),
        )
    } else {
        RpcError::from_io(err, &format!("{path}: metadata"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A file replaced by renames as fast as one core can, while `open` runs 2,000 times:
    /// every open must succeed (each finds the file as one of its versions).
    fn opens_beside_renames(open: impl Fn(&str) -> Result<(), RpcError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "0").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let renamer = {
            let (dir, stop) = (dir.path().to_owned(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let new = dir.join("n.new");
                    std::fs::write(&new, i.to_string()).unwrap();
                    std::fs::rename(&new, dir.join("n")).unwrap();
                }
                i
            })
        };
        let path = path.to_str().unwrap();
        let failures = (0..2000).filter_map(|_| open(path).err()).count();
        stop.store(true, Ordering::Relaxed);
        let renames = renamer.join().unwrap();
        assert!(renames > 0);
        assert_eq!(failures, 0, "opens refused beside {renames} renames");
    }

    #[test]
    fn a_file_replaced_by_renames_is_read_whole() {
        opens_beside_renames(|path| open_read(path).map(drop));
    }

    #[test]
    fn a_file_replaced_by_renames_is_written() {
        // SAFETY: getuid and getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        opens_beside_renames(|path| open_write(path, uid, gid).map(drop));
    }
}
