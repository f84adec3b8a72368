//! Writing the writable layer as a tar archive.
//!
//! The walk starts at the layer's directory descriptor and never leaves the layer's mount:
//! an entry on another mount is a filesystem mounted on the layer (the `host` template's
//! read-only system directories, `/proc`, `/dev`), which is not the sandbox's to keep. Every
//! step is an `*at` call on an open directory with symlinks refused, so a process renaming
//! things meanwhile cannot steer the walk anywhere else; each entry's header comes from the
//! descriptor that was opened, not from an earlier `stat`.
//!
//! What goes in: directories, regular files (hard links as links), symbolic links and FIFOs,
//! with numeric owner, group, permission bits and modification time (to the second). Sockets
//! and device nodes are left out (nothing in a sandbox can make a device). In an overlay's
//! upper directory a whiteout (a character device 0/0) is written as an empty `.wh.<name>`,
//! and a directory marked opaque gets a `.wh..wh..opq` entry right after its own, the layer
//! conventions of OCI images. Extended attributes are not kept.
//!
//! A file with holes (fewer blocks allocated than its size needs) is written as a GNU sparse
//! entry: the map of its data extents (`SEEK_DATA`/`SEEK_HOLE`) and only their bytes, so a
//! 3 GiB file made by `truncate` takes a few blocks of the archive, not 3 GiB. Extents are
//! widened to 512-byte boundaries, as the format needs.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use moat_proto::agent_config::WritableLayer;
use tar::{EntryType, Header};

use super::{OPAQUE, WHITEOUT_PREFIX};
use crate::filesystem::sys;

/// Lookups during the walk: no symlink, no magic link, no other mount.
const WALK_RESOLVE: u64 =
    libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;

/// What a capture wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Captured {
    /// Entries written.
    pub entries: u64,
    /// Entries left out (sockets, device nodes).
    pub skipped: u64,
}

/// How files with holes are written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Holes {
    /// As GNU sparse entries: only their data (snapshots, which the agent unpacks again).
    #[default]
    Sparse,
    /// As plain files, holes as zeros: image layers, whose readers refuse sparse entries.
    Dense,
}

/// Writes the layer behind `layer` (a directory descriptor) of kind `kind` to `out` as a tar
/// archive, files with holes written as `holes` says, and finishes the archive.
pub fn capture(
    layer: BorrowedFd<'_>,
    kind: WritableLayer,
    holes: Holes,
    out: impl Write,
) -> io::Result<Captured> {
    let root = sys::openat2(
        Some(layer),
        c".",
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
        WALK_RESOLVE,
    )?;
    let mount = sys::mount_id(root.as_fd(), c"")?;
    let mut w = Walker {
        tar: tar::Builder::new(out),
        mount,
        kind,
        holes,
        links: HashMap::new(),
        done: Captured::default(),
    };
    // Each frame: a directory, its path in the archive, and its names still to visit. An
    // explicit stack: a tree deeper than the thread's stack must not crash the agent.
    let names = sys::read_dir_names(root.as_fd())?;
    let mut stack: Vec<(OwnedFd, PathBuf, std::vec::IntoIter<CString>)> =
        vec![(root, PathBuf::new(), names.into_iter())];
    while let Some((dir, at, names)) = stack.last_mut() {
        let Some(name) = names.next() else {
            stack.pop();
            continue;
        };
        let path = at.join(sys::os(&name));
        if let Some(child) = w.entry(dir.as_fd(), &name, &path)? {
            let names = sys::read_dir_names(child.as_fd())?;
            stack.push((child, path, names.into_iter()));
        }
    }
    w.tar.finish()?;
    Ok(w.done)
}

struct Walker<W: Write> {
    tar: tar::Builder<W>,
    /// The layer's mount: entries on another are filesystems mounted on it.
    mount: u64,
    kind: WritableLayer,
    holes: Holes,
    /// The first path of each multiply-linked file, by (device, inode).
    links: HashMap<(u64, u64), PathBuf>,
    done: Captured,
}

/// A header of `kind` with the owner, group, permission bits and time of `st`.
fn header(kind: EntryType, st: &libc::stat) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(u64::from(st.st_uid));
    h.set_gid(u64::from(st.st_gid));
    h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    h.set_size(0);
    h
}

impl<W: Write> Walker<W> {
    /// Writes the entry `name` of `dir` as `path`; a directory is returned open, to be walked.
    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CString,
        path: &Path,
    ) -> io::Result<Option<OwnedFd>> {
        let gone = |e: &io::Error| e.raw_os_error() == Some(libc::ENOENT);
        match sys::mount_id(dir, name) {
            Ok(mount) if mount == self.mount => {}
            // A filesystem mounted here: not part of the layer.
            Ok(_) => return Ok(None),
            // Removed since the directory was read.
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(context(e, path)),
        }
        let st = match sys::fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(context(e, path)),
        };
        match sys::file_type(st.st_mode) {
            libc::S_IFDIR => self.dir(dir, name, path),
            libc::S_IFREG => self.file(dir, name, path).map(|()| None),
            libc::S_IFLNK => {
                let target = sys::readlinkat(dir, name).map_err(|e| context(e, path))?;
                let mut h = header(EntryType::Symlink, &st);
                self.tar
                    .append_link(&mut h, path, Path::new(OsStr::from_bytes(&target)))
                    .map_err(|e| context(e, path))?;
                self.done.entries += 1;
                Ok(None)
            }
            libc::S_IFIFO => {
                let h = header(EntryType::Fifo, &st);
                self.append(h, path, io::empty())?;
                Ok(None)
            }
            libc::S_IFCHR if self.kind == WritableLayer::OverlayUpper && st.st_rdev == 0 => {
                let mut whiteout = name.as_bytes().to_vec();
                whiteout.splice(0..0, WHITEOUT_PREFIX.bytes());
                let path = path.with_file_name(OsStr::from_bytes(&whiteout));
                let mut h = Header::new_gnu();
                h.set_entry_type(EntryType::Regular);
                h.set_mode(0);
                h.set_size(0);
                self.append(h, &path, io::empty())?;
                Ok(None)
            }
            _ => {
                self.done.skipped += 1;
                Ok(None)
            }
        }
    }

    fn append(&mut self, mut h: Header, path: &Path, data: impl Read) -> io::Result<()> {
        self.tar
            .append_data(&mut h, path, data)
            .map_err(|e| context(e, path))?;
        self.done.entries += 1;
        Ok(())
    }

    fn dir(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &CString,
        path: &Path,
    ) -> io::Result<Option<OwnedFd>> {
        let fd = match sys::openat2(
            Some(parent),
            name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
            WALK_RESOLVE,
        ) {
            Ok(fd) => fd,
            // Removed, or swapped for something else, since it was listed.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                return Ok(None);
            }
            Err(e) => return Err(context(e, path)),
        };
        let st = sys::fstat(fd.as_fd()).map_err(|e| context(e, path))?;
        self.append(header(EntryType::Directory, &st), path, io::empty())?;
        if self.kind == WritableLayer::OverlayUpper && opaque(fd.as_fd()) {
            let mut h = Header::new_gnu();
            h.set_entry_type(EntryType::Regular);
            h.set_mode(0);
            h.set_size(0);
            self.append(h, &path.join(OPAQUE), io::empty())?;
        }
        Ok(Some(fd))
    }

    fn file(&mut self, dir: BorrowedFd<'_>, name: &CString, path: &Path) -> io::Result<()> {
        let fd = match sys::openat2(
            Some(dir),
            name,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
            WALK_RESOLVE,
        ) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(context(e, path)),
        };
        let st = sys::fstat(fd.as_fd()).map_err(|e| context(e, path))?;
        if sys::file_type(st.st_mode) != libc::S_IFREG {
            // Swapped for something else since it was listed; left out.
            self.done.skipped += 1;
            return Ok(());
        }
        if st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                let first = first.clone();
                let mut h = header(EntryType::Link, &st);
                self.tar
                    .append_link(&mut h, path, &first)
                    .map_err(|e| context(e, path))?;
                self.done.entries += 1;
                return Ok(());
            }
            self.links.insert(key, path.to_owned());
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let file = std::fs::File::from(fd);
        let allocated = u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512);
        if allocated < size && self.holes == Holes::Sparse {
            let extents = data_extents(&file, size).map_err(|e| context(e, path))?;
            return self.append_sparse(&st, path, file, size, extents);
        }
        let mut h = header(EntryType::Regular, &st);
        h.set_size(size);
        self.append(h, path, Exact::new(file, size))
    }

    /// Writes `file` (of `size` bytes, its data in `extents`) as a GNU sparse entry: the first
    /// extents in the header, the rest in extension blocks that precede the data.
    fn append_sparse(
        &mut self,
        st: &libc::stat,
        path: &Path,
        file: std::fs::File,
        size: u64,
        mut extents: Vec<(u64, u64)>,
    ) -> io::Result<()> {
        // A map that ends before the file does gets an empty extent at its end, so a reader
        // knows the size (GNU tar does the same).
        if extents.last().is_none_or(|&(at, len)| at + len < size) {
            extents.push((size, 0));
        }
        let stored: u64 = extents.iter().map(|&(_, len)| len).sum();
        let mut h = header(EntryType::GNUSparse, st);
        h.set_size(stored);
        let (first, rest) = extents.split_at(extents.len().min(4));
        {
            let gnu = h
                .as_gnu_mut()
                .ok_or_else(|| io::Error::other("a GNU header is not GNU"))?;
            for (slot, &(at, len)) in gnu.sparse.iter_mut().zip(first) {
                slot.set_offset(at);
                slot.set_length(len);
            }
            gnu.set_real_size(size);
            gnu.set_is_extended(!rest.is_empty());
        }
        let mut blocks = Vec::new();
        let chunks: Vec<&[(u64, u64)]> = rest.chunks(21).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut ext = tar::GnuExtSparseHeader::new();
            for (slot, &(at, len)) in ext.sparse_mut().iter_mut().zip(chunk.iter()) {
                slot.set_offset(at);
                slot.set_length(len);
            }
            ext.set_is_extended(i + 1 < chunks.len());
            blocks.extend_from_slice(ext.as_bytes());
        }
        // The extension blocks go right after the header, before the data; they are whole
        // 512-byte blocks, so the entry's padding is the data's.
        let data = Extents {
            file,
            extents,
            at: 0,
            done: 0,
        };
        self.append(h, path, io::Cursor::new(blocks).chain(data))
    }
}

/// The data extents of `file` (`size` bytes) as (offset, length), widened to 512-byte
/// boundaries and merged, from `SEEK_DATA`/`SEEK_HOLE`.
fn data_extents(file: &std::fs::File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let seek = |at: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let at = i64::try_from(at).map_err(|_| io::Error::other("offset out of range"))?;
        // SAFETY: lseek on a descriptor we own; it only moves the file offset.
        let r = unsafe { libc::lseek(fd, at, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // No data at or after `at`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(u64::try_from(r).unwrap_or(0)))
    };
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut at = 0;
    while at < size {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= size {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        let start = data & !511;
        let end = hole.div_ceil(512).saturating_mul(512).min(size);
        match extents.last_mut() {
            Some((s, len)) if *s + *len >= start => *len = end.max(*s + *len) - *s,
            _ => extents.push((start, end - start)),
        }
        at = hole.max(data + 1);
    }
    Ok(extents)
}

/// The bytes of a file's `extents`, one after another; an extent the file no longer fills
/// (it shrank meanwhile) reads as zeros, so the archive always matches its map.
struct Extents {
    file: std::fs::File,
    extents: Vec<(u64, u64)>,
    /// The extent being read.
    at: usize,
    /// Bytes of it already read.
    done: u64,
}

impl Read for Extents {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        loop {
            let Some(&(offset, len)) = self.extents.get(self.at) else {
                return Ok(0);
            };
            if self.done >= len || buf.is_empty() {
                if buf.is_empty() {
                    return Ok(0);
                }
                self.at += 1;
                self.done = 0;
                continue;
            }
            let want = usize::try_from(len - self.done)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let n = match self.file.read_at(&mut buf[..want], offset + self.done)? {
                0 => {
                    buf[..want].fill(0);
                    want
                }
                n => n,
            };
            self.done += n as u64;
            return Ok(n);
        }
    }
}

/// Whether an overlay marked directory `fd` opaque (it hides the lower layer's entries): the
/// `trusted.` attribute of an overlay mounted by the host, the `user.` one of an overlay
/// mounted with `userxattr`. Unreadable attributes count as absent.
fn opaque(fd: BorrowedFd<'_>) -> bool {
    [c"trusted.overlay.opaque", c"user.overlay.opaque"]
        .iter()
        .any(|name| sys::get_xattr(fd, name).is_ok_and(|v| v == b"y"))
}

fn context(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("/{}: {e}", path.display()))
}

/// Exactly `size` bytes of a file that may change while it is read: a file that shrank is
/// padded with zeros, one that grew is cut, so the archive always matches its headers.
struct Exact<R> {
    inner: io::Take<R>,
    remaining: u64,
}

impl<R: Read> Exact<R> {
    fn new(inner: R, size: u64) -> Self {
        Exact {
            inner: inner.take(size),
            remaining: size,
        }
    }
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = match self.inner.read(buf)? {
            0 => {
                let n = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                buf[..n].fill(0);
                n
            }
            n => n,
        };
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn exact_pads_and_cuts() {
        let mut out = Vec::new();
        Exact::new(&b"abc"[..], 5).read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc\0\0");
        out.clear();
        Exact::new(&b"abcdef"[..], 2).read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ab");
    }
}
