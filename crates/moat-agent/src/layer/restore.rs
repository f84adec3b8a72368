//! Unpacking a layer archive over the sandbox's root, as root, keeping owners and modes.
//!
//! The archive is one [`super::capture`] wrote, but the host stores it and cannot vouch for
//! it (the sandbox that made it was under a tenant's control), so it is read as untrusted:
//! every path must be relative without `..`, and each entry's parent is resolved from the root
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`, so no symlink
//! (in the archive or already on disk) redirects a write, and nothing is written on another
//! filesystem mounted on the root (`/proc`, `/dev`, the `host` template's read-only system
//! directories). Only the sandbox's own writable root can change.
//!
//! Entries replace what is at their path (a directory is kept and given the entry's owner and
//! mode). `.wh.<name>` removes `<name>`; `.wh..wh..opq` empties its directory of what it held
//! before (on an overlay that is the template's entries, whose removal the overlay records as
//! whiteouts). Directory times are set last, since filling a directory changes its time.

use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use super::{OPAQUE, WHITEOUT_PREFIX};
use crate::filesystem::{ops, sys};

/// Lookups of an entry's parent: beneath the root, no symlink, no magic link, no other mount.
const BENEATH: u64 = libc::RESOLVE_BENEATH
    | libc::RESOLVE_NO_SYMLINKS
    | libc::RESOLVE_NO_MAGICLINKS
    | libc::RESOLVE_NO_XDEV;

/// What a restore did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Entries applied (whiteouts included).
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// Unpacks the tar archive `input` over the directory `root` (the sandbox's `/`).
pub fn restore(root: BorrowedFd<'_>, input: impl Read) -> io::Result<Restored> {
    let root = sys::openat2(
        Some(root),
        c".",
        libc::O_PATH | libc::O_DIRECTORY,
        0,
        BENEATH,
    )?;
    let mount = sys::mount_id(root.as_fd(), c"")?;
    let mut r = Restorer {
        root,
        mount,
        dirs: Vec::new(),
        done: Restored::default(),
    };
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path()?.into_owned();
        let path = relative(&raw)?;
        if path.as_os_str().is_empty() {
            // The root itself (`./`): its owner and mode are the template's.
            continue;
        }
        r.apply(&mut entry, &path)
            .map_err(|e| io::Error::new(e.kind(), format!("/{}: {e}", path.display())))?;
        r.done.entries += 1;
    }
    // Innermost first: setting a directory's time after its children were made.
    for (path, mtime) in r.dirs.iter().rev() {
        if let Ok((parent, name)) = r.parent(path) {
            let _ = sys::set_times_at(parent.as_fd(), &name, *mtime);
        }
    }
    Ok(r.done)
}

/// `path` as a plain relative path: `.` components dropped; absolute paths and `..` refused.
fn relative(path: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "archive entry {:?} is not a relative path below the root",
                        path.display()
                    ),
                ));
            }
        }
    }
    Ok(out)
}

fn cstring(part: &OsStr) -> io::Result<CString> {
    CString::new(part.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "name contains NUL"))
}

struct Restorer {
    root: OwnedFd,
    /// The root's mount: anything on another is mounted over it.
    mount: u64,
    /// Directories made or kept, with the time to give them at the end.
    dirs: Vec<(PathBuf, i64)>,
    done: Restored,
}

impl Restorer {
    /// The directory holding `path` (opened beneath the root) and the last component.
    fn parent(&self, path: &Path) -> io::Result<(OwnedFd, CString)> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "entry without a name"))?;
        let parent = path.parent().unwrap_or(Path::new(""));
        let dir = if parent.as_os_str().is_empty() {
            sys::openat2(
                Some(self.root.as_fd()),
                c".",
                libc::O_PATH | libc::O_DIRECTORY,
                0,
                BENEATH,
            )?
        } else {
            sys::openat2(
                Some(self.root.as_fd()),
                &cstring(parent.as_os_str())?,
                libc::O_PATH | libc::O_DIRECTORY,
                0,
                BENEATH,
            )?
        };
        Ok((dir, cstring(name)?))
    }

    fn apply<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, path: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        let bytes = name.as_bytes();
        if bytes == OPAQUE.as_bytes() {
            return self.empty_dir(dir.as_fd());
        }
        if let Some(hidden) = bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            return self.remove(dir.as_fd(), &cstring(OsStr::from_bytes(hidden))?);
        }
        let h = entry.header();
        let mode = h.mode()? & 0o7777;
        let uid = u32::try_from(h.uid()?).map_err(|_| bad("owner out of range"))?;
        let gid = u32::try_from(h.gid()?).map_err(|_| bad("group out of range"))?;
        let mtime = i64::try_from(h.mtime()?).unwrap_or(i64::MAX);
        let kind = h.entry_type();
        let dir = dir.as_fd();
        match kind {
            EntryType::Directory => {
                match sys::fstatat(dir, &name, libc::AT_SYMLINK_NOFOLLOW) {
                    // A filesystem mounted here (`/proc`, `/dev`): not the layer's to change.
                    Ok(_) if !self.on_root(dir, &name)? => return Ok(()),
                    Ok(st) if sys::file_type(st.st_mode) == libc::S_IFDIR => {}
                    Ok(_) => {
                        self.remove(dir, &name)?;
                        sys::mkdirat(dir, &name, 0o700)?;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        sys::mkdirat(dir, &name, 0o700)?;
                    }
                    Err(e) => return Err(e),
                }
                let fd = sys::openat2(
                    Some(dir),
                    &name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                    BENEATH,
                )?;
                sys::fchown(fd.as_fd(), uid, gid)?;
                sys::fchmod(fd.as_fd(), mode)?;
                self.dirs.push((path.to_owned(), mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.remove(dir, &name)?;
                let fd = sys::openat2(
                    Some(dir),
                    &name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                    BENEATH,
                )?;
                let mut file = std::fs::File::from(fd);
                self.done.bytes += if kind == EntryType::GNUSparse {
                    copy_sparse(entry, &file)?
                } else {
                    io::copy(entry, &mut file)?
                };
                // Owner first: a change of owner clears the set-id bits the mode may hold.
                sys::fchown(file.as_fd(), uid, gid)?;
                sys::fchmod(file.as_fd(), mode)?;
                sys::set_times(file.as_fd(), mtime)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad("symbolic link without a target"))?;
                let target = CString::new(target.into_owned())
                    .map_err(|_| bad("link target contains NUL"))?;
                self.remove(dir, &name)?;
                sys::symlinkat(&target, dir, &name)?;
                sys::lchownat(dir, &name, uid, gid)?;
                sys::set_times_at(dir, &name, mtime)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| bad("hard link without a target"))?;
                let target = relative(&target)?;
                let (from_dir, from) = self.parent(&target)?;
                self.remove(dir, &name)?;
                sys::linkat(from_dir.as_fd(), &from, dir, &name)?;
            }
            EntryType::Fifo => {
                self.remove(dir, &name)?;
                sys::mkfifoat(dir, &name, 0o600)?;
                sys::lchownat(dir, &name, uid, gid)?;
                sys::fchmodat(dir, &name, mode)?;
                sys::set_times_at(dir, &name, mtime)?;
            }
            other => {
                return Err(bad(&format!("unsupported archive entry type {other:?}")));
            }
        }
        Ok(())
    }

    /// Removes `name` from `dir` (a directory with everything in it); missing is fine, a
    /// filesystem mounted there is an error.
    fn remove(&self, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        let st = match sys::fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !self.on_root(dir, name)? {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "a filesystem is mounted there",
            ));
        }
        if sys::file_type(st.st_mode) == libc::S_IFDIR {
            let owned = sys::openat2(
                Some(dir),
                c".",
                libc::O_PATH | libc::O_DIRECTORY,
                0,
                BENEATH,
            )?;
            ops::remove_tree(&owned, name, &sys::os(name).to_string_lossy())
                .map_err(|e| io::Error::other(e.message))
        } else {
            sys::unlinkat(dir, name, 0)
        }
    }

    /// Whether the existing `name` in `dir` is on the root's mount (not a mount of its own).
    fn on_root(&self, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<bool> {
        Ok(sys::mount_id(dir, name)? == self.mount)
    }

    /// Removes everything in directory `dir`.
    fn empty_dir(&self, dir: BorrowedFd<'_>) -> io::Result<()> {
        for name in sys::read_dir_names(dir)? {
            self.remove(dir, &name)?;
        }
        Ok(())
    }
}

/// Copies a sparse entry into `file` leaving its holes as holes: the reader yields the holes
/// as zeros, and a block of zeros is skipped rather than written. Returns the bytes copied
/// (the file's size).
fn copy_sparse(mut from: impl Read, file: &std::fs::File) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 64 << 10;
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        // A slice comparison is a `memcmp`: fast over gigabytes of holes.
        if chunk != &zeros[..n] {
            file.write_all_at(chunk, at)?;
        }
        at += n as u64;
    }
    // The size, holes at the end included.
    file.set_len(at)?;
    Ok(at)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_relative_paths_below_the_root() {
        assert_eq!(
            relative(Path::new("./home/user/a")).unwrap(),
            Path::new("home/user/a")
        );
        assert_eq!(relative(Path::new("./")).unwrap(), Path::new(""));
        for bad in ["/etc/passwd", "../x", "a/../../b"] {
            assert!(relative(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
