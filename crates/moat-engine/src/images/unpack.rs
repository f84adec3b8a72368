//! One container image layer (an OCI tar layer, already decompressed) unpacked on the host.
//!
//! The layer is untrusted and this runs as root, so nothing an entry says may reach outside the
//! destination. The destination is opened once and every operation is relative to a directory
//! descriptor, with the `*at` calls, never a path string joined to it:
//!
//! - an entry's parent is reached one component at a time with `O_NOFOLLOW | O_DIRECTORY`, so a
//!   symbolic link (made by an earlier entry) used as a component fails the layer instead of
//!   being followed;
//! - whatever holds an entry's name is removed first and files are made with `O_EXCL`, so
//!   nothing is ever written through an existing link;
//! - hard links are made with `linkat` flags 0 (a symbolic link target is linked, not followed),
//!   and their target must be in the layer;
//! - owners, modes and times are set through the file's descriptor, or with
//!   `AT_SYMLINK_NOFOLLOW` on a symbolic link (whose mode is never set).
//!
//! Names are relative: a leading `/` or `./` (and any `.` or empty component) is dropped; a
//! `..` component, a NUL byte, a path over 4096 bytes or a component over 255 bytes fails the
//! layer. Setuid and setgid bits are dropped; owner ids above 65535 (which the sandbox's id
//! mapping cannot show) become 65534. Device nodes are not made but listed; OCI whiteouts
//! (`.wh.NAME`, `.wh..wh..opq`) are not made but recorded in the [`LayerIndex`], for
//! [`super::tree::merge_layers`]. Extended attributes (pax `SCHILY.xattr.*` included) are
//! ignored. Directory modes and times are set once all entries are in, since adding a child
//! changes a directory's time (and a read-only mode would stop the children being made).
//!
//! Limitations: the `tar` crate reads a GNU long name or a pax header into memory whatever its
//! size, before any limit here sees it. Removing a directory tree (an entry replacing it) holds
//! one descriptor per level, so a tree deeper than the open-file limit allows fails the layer
//! with `EMFILE`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tar::EntryType;

use super::sys::{
    fchmod, fchown, fchownat, fstat, fstatat, futimens, linkat, mkdirat, mkfifoat, openat,
    openat_dir, symlinkat, unlinkat, utimensat,
};

/// Longest entry path, in bytes (the kernel's `PATH_MAX`).
const MAX_PATH: usize = 4096;
/// Longest path component, in bytes (`NAME_MAX`).
const MAX_NAME: usize = 255;
/// Largest owner id kept: the sandbox's id mapping covers 0..=65535.
const MAX_ID: u64 = 65535;
/// The owner given to larger ids (`nobody`).
const OVERFLOW_ID: u32 = 65534;
/// Permission bits kept: setuid and setgid dropped, the sticky bit kept.
const MODE_MASK: u32 = 0o1777;
/// Prefix of an OCI whiteout: `.wh.NAME` hides `NAME` of the layers below.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// An OCI opaque marker: its directory hides everything the layers below have in it.
const OPAQUE: &[u8] = b".wh..wh..opq";

/// What one path held in memory costs beyond its bytes, as the limit on them counts it.
pub const PATH_OVERHEAD: u64 = 64;

/// Bounds on what one layer may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Most bytes of file contents, all files together.
    pub max_bytes: u64,
    /// Most archive entries (directories, links, whiteouts and the rest included).
    pub max_entries: u64,
    /// Most bytes of paths held in memory for the layer: those its index lists (whiteouts,
    /// opaque directories, skipped device nodes: what merging an image holds for it), and
    /// the directories awaiting their attributes until the end of the unpack, each of these
    /// counted with [`PATH_OVERHEAD`] bytes more.
    pub max_index_bytes: u64,
}

impl Default for UnpackLimits {
    /// 16 GiB of contents in at most a million entries, 64 MiB of paths held: far above
    /// real images.
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 16 << 30,
            max_entries: 1_000_000,
            max_index_bytes: 64 << 20,
        }
    }
}

/// What an unpacked layer means beyond its files, kept with it for the merge.
///
/// Paths are relative to the layer's root, `/`-separated, without a leading `/`; the root
/// itself is `""`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndex {
    /// Paths the layer deletes from the layers below (`.wh.NAME` entries).
    pub whiteouts: Vec<String>,
    /// Directories whose contents in the layers below the layer hides (`.wh..wh..opq`).
    pub opaque_dirs: Vec<String>,
    /// Archive entries read.
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
    /// Character and block devices the layer holds, not made on the host.
    pub skipped_devices: Vec<String>,
}

/// Why a layer could not be unpacked (or merged); each names the entry or path concerned.
///
/// A wrapped OS error is part of the message and not an error source, as in
/// [`crate::EngineError`].
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The entry's name is not a safe relative path.
    #[error("layer entry {path:?}: {reason}")]
    BadPath {
        /// The entry's name, as the archive has it.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A GNU long name or pax header is too large, malformed or asks for what moat does not
    /// take.
    #[error("layer: the extension header after entry {after:?}: {reason}")]
    BadExtension {
        /// The entry before it.
        after: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A hard link's target is not a safe relative path, or not something to link to.
    #[error("layer entry {path:?}: hard link target {target:?}: {reason}")]
    BadLinkTarget {
        /// The hard link's name.
        path: String,
        /// Its target, as the archive has it.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A hard link's target is not in the layer.
    #[error("layer entry {path:?}: hard link target {target:?} does not exist in the layer")]
    MissingLinkTarget {
        /// The hard link's name.
        path: String,
        /// Its target, as the archive has it.
        target: String,
    },
    /// A component of the entry's path is a symbolic link or not a directory: it is never
    /// followed.
    #[error("layer entry {path:?}: a component of its path is a symbolic link or not a directory")]
    NotADirectory {
        /// The entry's name.
        path: String,
    },
    /// The entry is of a type a layer may not hold.
    #[error("layer entry {path:?}: unsupported entry type {kind}")]
    UnsupportedType {
        /// The entry's name.
        path: String,
        /// Its type.
        kind: String,
    },
    /// The paths held in memory for the layer (its index's, its directories') come to more
    /// than `max_index_bytes`.
    #[error(
        "layer entry {path:?}: the layer's whiteouts, device nodes and directories name more \
         than max_index_bytes ({limit}) bytes of paths"
    )]
    IndexTooLarge {
        /// The first entry over the limit.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// The layer has more entries than `max_entries`.
    #[error("layer entry {path:?}: the layer has more than max_entries ({limit}) entries")]
    TooManyEntries {
        /// The first entry over the limit.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// The layer's files hold more than `max_bytes`.
    #[error("layer entry {path:?}: the layer's files hold more than max_bytes ({limit}) bytes")]
    TooManyBytes {
        /// The file that goes over the limit.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// The archive itself could not be read (truncated, corrupt header, …).
    #[error("reading the layer archive after entry {after:?}: {error}")]
    Archive {
        /// The last entry read whole (empty at the start of the archive).
        after: String,
        /// The error.
        error: io::Error,
    },
    /// An I/O error on the host.
    #[error("{path:?}: {what}: {error}")]
    Io {
        /// The entry, or the host directory, concerned.
        path: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        error: io::Error,
    },
}

impl UnpackError {
    /// Whether the host's file system was full (or over a quota): the host's trouble, not
    /// the archive's.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, UnpackError::Io { error, .. }
            if matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
    }

    /// An I/O error while doing `what` for `path`.
    pub(super) fn io(path: impl Into<String>, what: &'static str, error: io::Error) -> Self {
        UnpackError::Io {
            path: path.into(),
            what,
            error,
        }
    }

    /// A walk to `path` that failed: [`UnpackError::NotADirectory`] when a component is a
    /// symbolic link or not a directory.
    fn walk(path: &str, error: io::Error) -> Self {
        if is_not_dir(&error) {
            UnpackError::NotADirectory { path: path.into() }
        } else {
            UnpackError::io(path, "opening the entry's directory", error)
        }
    }
}

/// Unpacks the tar archive `layer` into `dest`, an existing empty directory, and says what the
/// layer holds beyond its files. Any entry that would reach outside `dest`, or break a limit,
/// fails the whole layer (leaving what was unpacked before it: the caller discards `dest`).
pub fn unpack_layer<R: Read>(
    layer: R,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<LayerIndex, UnpackError> {
    let root = super::sys::open_dir(dest).map_err(|e| {
        UnpackError::io(
            dest.display().to_string(),
            "opening the destination directory",
            e,
        )
    })?;
    let mut unpacker = Unpacker {
        root,
        limits,
        index: LayerIndex::default(),
        dirs: HashMap::new(),
        devices: HashMap::new(),
        device_list: Vec::new(),
        index_bytes: 0,
    };
    let mut archive = tar::Archive::new(layer);
    // Raw: GNU long names and pax headers come as entries of their own, read here within a
    // bound (the tar crate would hold them whole, whatever their size).
    let entries = archive
        .entries()
        .map_err(|error| UnpackError::Archive {
            after: String::new(),
            error,
        })?
        .raw(true);
    let mut after = String::new();
    let mut names = Names::default();
    for entry in entries {
        let mut entry = entry.map_err(|error| UnpackError::Archive {
            after: after.clone(),
            error,
        })?;
        if names.take_extension(&mut entry, &after)? {
            unpacker.count(&after)?;
            continue;
        }
        after = unpacker.entry(&mut entry, std::mem::take(&mut names))?;
    }
    if names != Names::default() {
        return Err(UnpackError::BadExtension {
            after,
            reason: "it ends the archive with no entry after it".into(),
        });
    }
    unpacker.finish()?;
    let mut index = unpacker.index;
    index.skipped_devices = unpacker.device_list.into_iter().flatten().collect();
    Ok(index)
}

/// The most bytes of a GNU long name, long link or pax header entry.
const MAX_EXTENSION_BYTES: u64 = 64 << 10;

/// The names extension entries give the entry after them, read from an archive's raw
/// entries (`tar::Entries::raw`) within [`MAX_EXTENSION_BYTES`]: the tar crate would read
/// them whole, whatever their size.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Names {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
}

impl Names {
    /// The path of `entry`, which came after these names: a long name's or pax `path` if
    /// one came before it, else its header's.
    pub(crate) fn path_of<R: Read>(&mut self, entry: &tar::Entry<'_, R>) -> Vec<u8> {
        self.path
            .take()
            .unwrap_or_else(|| entry.path_bytes().into_owned())
    }

    /// The link target of `entry`, which came after these names (see [`link_of`]).
    pub(crate) fn link_of<'e, R: Read>(
        &mut self,
        entry: &'e tar::Entry<'_, R>,
    ) -> Option<Cow<'e, [u8]>> {
        link_of(self.link.take(), entry)
    }

    /// Reads `entry` if it is a GNU long name or link, or a pax header, and says so.
    pub(crate) fn take_extension<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        after: &str,
    ) -> Result<bool, UnpackError> {
        let kind = entry.header().entry_type();
        if !(kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions()) {
            return Ok(false);
        }
        let bad = |reason: String| UnpackError::BadExtension {
            after: after.to_owned(),
            reason,
        };
        let size = entry
            .header()
            .entry_size()
            .map_err(|e| bad(format!("an extension header's size: {e}")))?;
        if size > MAX_EXTENSION_BYTES {
            return Err(bad(format!(
                "{size} bytes, more than the {MAX_EXTENSION_BYTES} a long name or pax header may have"
            )));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry
            .take(MAX_EXTENSION_BYTES)
            .read_to_end(&mut data)
            .map_err(|error| UnpackError::Archive {
                after: after.to_owned(),
                error,
            })?;
        if kind.is_pax_local_extensions() {
            self.pax(&data).map_err(|r| bad(r.to_owned()))?;
        } else {
            while data.last() == Some(&0) {
                data.pop();
            }
            let slot = if kind.is_gnu_longname() {
                &mut self.path
            } else {
                &mut self.link
            };
            *slot = Some(data);
        }
        Ok(true)
    }

    /// Takes `path` and `linkpath` from pax records (`LEN KEY=VALUE\n`); refuses `size`
    /// (files too large for a tar header, which moat does not take).
    fn pax(&mut self, mut data: &[u8]) -> Result<(), &'static str> {
        while !data.is_empty() {
            let space = data
                .iter()
                .position(|&b| b == b' ')
                .ok_or("a pax record without a length")?;
            let len: usize = std::str::from_utf8(&data[..space])
                .ok()
                .and_then(|n| n.parse().ok())
                .filter(|&n| n > space + 1 && n <= data.len())
                .ok_or("a pax record with a bad length")?;
            let record = &data[space + 1..len];
            let record = record
                .strip_suffix(b"\n")
                .ok_or("a pax record not ended by a newline")?;
            let eq = record
                .iter()
                .position(|&b| b == b'=')
                .ok_or("a pax record without '='")?;
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            match key {
                b"path" => self.path = Some(value.to_vec()),
                b"linkpath" => self.link = Some(value.to_vec()),
                b"size" => return Err("a file too large for a tar header (pax size)"),
                _ => {}
            }
            data = &data[len..];
        }
        Ok(())
    }
}

/// An entry's link target: a long link's or pax `linkpath` if one came before it, else its
/// header's.
fn link_of<'e, R: Read>(
    link: Option<Vec<u8>>,
    entry: &'e tar::Entry<'_, R>,
) -> Option<Cow<'e, [u8]>> {
    match link {
        Some(l) => Some(Cow::Owned(l)),
        None => entry.link_name_bytes(),
    }
}

/// An entry's place: the directory holding it and its name there.
#[derive(Clone, Copy)]
struct At<'a> {
    parent: BorrowedFd<'a>,
    name: &'a CStr,
    /// Its components from the root.
    parts: &'a [CString],
    /// Its name as the archive has it, for errors.
    path: &'a str,
}

/// One layer being unpacked.
struct Unpacker<'a> {
    root: OwnedFd,
    limits: &'a UnpackLimits,
    index: LayerIndex,
    /// Directories made by entries ([`key`]s), with the attributes they get at the end.
    dirs: HashMap<Vec<u8>, Attrs>,
    /// Devices skipped ([`key`]s), so that hard links to them are skipped too, with their
    /// place in `device_list`.
    devices: HashMap<Vec<u8>, usize>,
    /// The skipped devices' paths in the order they came; `None` where a later entry replaced
    /// one. What the index lists.
    device_list: Vec<Option<String>>,
    /// Bytes of the paths held (see [`UnpackLimits::max_index_bytes`]).
    index_bytes: u64,
}

impl Unpacker<'_> {
    /// Counts `listed`, a path the index will list, against the limit (`path`: the entry's
    /// name, for the error).
    fn listed(&mut self, listed: &str, path: &str) -> Result<(), UnpackError> {
        self.held(listed.len(), path)
    }

    /// Counts a path of `len` bytes held in memory against the limit (`path`: the entry's
    /// name, for the error).
    fn held(&mut self, len: usize, path: &str) -> Result<(), UnpackError> {
        self.index_bytes += len as u64 + PATH_OVERHEAD;
        if self.index_bytes > self.limits.max_index_bytes {
            return Err(UnpackError::IndexTooLarge {
                path: path.to_owned(),
                limit: self.limits.max_index_bytes,
            });
        }
        Ok(())
    }

    /// Counts an entry against the limit (`path`: the last entry's name, for the error).
    fn count(&mut self, path: &str) -> Result<(), UnpackError> {
        self.index.entries += 1;
        if self.index.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                path: path.to_owned(),
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    /// Applies one entry, its names as `names` (long names, pax) give them or else its
    /// header's, and returns its name.
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        names: Names,
    ) -> Result<String, UnpackError> {
        let raw = names
            .path
            .unwrap_or_else(|| entry.path_bytes().into_owned());
        let link = names.link;
        let path = String::from_utf8_lossy(&raw).into_owned();
        self.count(&path)?;
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            // Pax metadata for the whole archive: nothing to make.
            return Ok(path);
        }
        let parts = entry_parts(&raw).map_err(|reason| UnpackError::BadPath {
            path: path.clone(),
            reason,
        })?;
        let Some((name, dirs)) = parts.split_last() else {
            // The root (`./`): `dest` keeps its own owner and mode.
            return Ok(path);
        };
        if let Some(hidden) = name.to_bytes().strip_prefix(WHITEOUT_PREFIX) {
            self.whiteout(dirs, hidden, &path)?;
            return Ok(path);
        }
        // Old tar archives mark a directory by a trailing `/` on a regular entry.
        let is_dir = kind == EntryType::Directory
            || (matches!(kind, EntryType::Regular | EntryType::Continuous) && raw.ends_with(b"/"));
        self.replaced(&parts, is_dir);
        let attrs = Attrs::from_header(entry.header())
            .map_err(|e| UnpackError::io(path.as_str(), "reading the entry's header", e))?;
        let parent =
            walk(self.root.as_fd(), dirs, true).map_err(|e| UnpackError::walk(&path, e))?;
        let at = At {
            parent: parent.as_fd(),
            name,
            parts: &parts,
            path: &path,
        };
        match kind {
            _ if is_dir => self.directory(at, attrs),
            // Not GNU sparse files: they unpack to their full size from a few bytes.
            EntryType::Regular | EntryType::Continuous => self.file(at, attrs, entry),
            EntryType::Symlink => symlink(at, attrs, link_of(link, entry)),
            EntryType::Link => self.hard_link(at, link_of(link, entry)),
            EntryType::Fifo => fifo(at, attrs),
            EntryType::Char | EntryType::Block => self.device(at),
            other => Err(UnpackError::UnsupportedType {
                path: path.clone(),
                kind: format!("{other:?} ({:?})", char::from(other.as_byte())),
            }),
        }?;
        Ok(path)
    }

    /// Forgets what earlier entries at `parts` left pending, as a new entry replaces them: a
    /// directory's attributes for the end (unless the new entry is a directory too, which
    /// keeps it), a skipped device (listed again if the new entry is one).
    fn replaced(&mut self, parts: &[CString], is_dir: bool) {
        let key = key(parts);
        if !is_dir {
            self.dirs.remove(&key);
        }
        if let Some(at) = self.devices.remove(&key) {
            self.device_list[at] = None;
        }
    }

    /// Records a whiteout (`.wh.` + `hidden`) in `dirs`, and makes `dirs`, which the layer's
    /// directory in an overlay would be.
    fn whiteout(&mut self, dirs: &[CString], hidden: &[u8], path: &str) -> Result<(), UnpackError> {
        let bad = |reason| UnpackError::BadPath {
            path: path.into(),
            reason,
        };
        if matches!(hidden, b"" | b"." | b"..") {
            return Err(bad("a whiteout naming no file"));
        }
        walk(self.root.as_fd(), dirs, true).map_err(|e| UnpackError::walk(path, e))?;
        if hidden == &OPAQUE[WHITEOUT_PREFIX.len()..] {
            let dir = index_path(dirs).ok_or_else(|| bad(NOT_UTF8))?;
            self.listed(&dir, path)?;
            self.index.opaque_dirs.push(dir);
        } else {
            let mut parts = dirs.to_vec();
            parts.push(CString::new(hidden).map_err(|_| bad("name contains a NUL byte"))?);
            let hidden = index_path(&parts).ok_or_else(|| bad(NOT_UTF8))?;
            self.listed(&hidden, path)?;
            self.index.whiteouts.push(hidden);
        }
        Ok(())
    }

    /// Makes (or keeps) a directory; its attributes are set at the end.
    fn directory(&mut self, at: At<'_>, attrs: Attrs) -> Result<(), UnpackError> {
        ensure_dir(at.parent, at.name)
            .map_err(|e| UnpackError::io(at.path, "making the directory", e))?;
        let key = key(at.parts);
        if !self.dirs.contains_key(&key) {
            self.held(key.len(), at.path)?;
        }
        self.dirs.insert(key, attrs);
        Ok(())
    }

    /// Makes a regular file with the entry's contents, replacing what held its name.
    fn file<R: Read>(
        &mut self,
        at: At<'_>,
        attrs: Attrs,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), UnpackError> {
        let size = entry.size();
        // Counted before reading, so a huge size fails at once.
        self.index.bytes = self
            .index
            .bytes
            .checked_add(size)
            .filter(|total| *total <= self.limits.max_bytes)
            .ok_or_else(|| UnpackError::TooManyBytes {
                path: at.path.into(),
                limit: self.limits.max_bytes,
            })?;
        let io_err = |what| move |e| UnpackError::io(at.path, what, e);
        remove_tree(at.parent, at.name).map_err(io_err("removing what was there"))?;
        let mut file = File::from(create_file(at.parent, at.name).map_err(io_err("creating"))?);
        let copied = io::copy(&mut entry.take(size), &mut file).map_err(io_err("writing"))?;
        if copied != size {
            let short = io::Error::new(io::ErrorKind::UnexpectedEof, "the archive ends early");
            return Err(io_err("writing")(short));
        }
        attrs
            .apply(file.as_fd())
            .map_err(io_err("setting owner, mode and time"))
    }

    /// Makes a hard link to an earlier entry of the layer.
    fn hard_link(&mut self, at: At<'_>, target: Option<Cow<'_, [u8]>>) -> Result<(), UnpackError> {
        let raw = target.unwrap_or_default();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let bad = |reason| UnpackError::BadLinkTarget {
            path: at.path.into(),
            target: shown.clone(),
            reason,
        };
        let missing = || UnpackError::MissingLinkTarget {
            path: at.path.into(),
            target: shown.clone(),
        };
        let parts = entry_parts(&raw).map_err(bad)?;
        let Some((name, dirs)) = parts.split_last() else {
            return Err(bad("names the layer's root"));
        };
        if self.devices.contains_key(&key(&parts)) {
            // Another name for a device that was not made: not made either.
            return self.device(at);
        }
        let parent = match walk(self.root.as_fd(), dirs, false) {
            Ok(parent) => parent,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(missing()),
            Err(e) => return Err(UnpackError::walk(at.path, e)),
        };
        match fstatat(parent.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if is_type(&st, libc::S_IFDIR) => return Err(bad("names a directory")),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(missing()),
            Err(e) => return Err(UnpackError::io(at.path, "looking up the link target", e)),
        }
        if parts == at.parts {
            // A link to itself: already there.
            return Ok(());
        }
        remove_tree(at.parent, at.name)
            .map_err(|e| UnpackError::io(at.path, "removing what was there", e))?;
        match linkat(parent.as_fd(), name, at.parent, at.name) {
            Ok(()) => Ok(()),
            // The target was inside the directory the link replaced.
            Err(e) if is_absent(&e) => Err(missing()),
            Err(e) => Err(UnpackError::io(at.path, "making the hard link", e)),
        }
    }

    /// Lists a device node, not made on the host; what held its name is removed all the
    /// same, as the device replaces it.
    fn device(&mut self, at: At<'_>) -> Result<(), UnpackError> {
        let path = index_path(at.parts).ok_or_else(|| UnpackError::BadPath {
            path: at.path.into(),
            reason: NOT_UTF8,
        })?;
        remove_tree(at.parent, at.name)
            .map_err(|e| UnpackError::io(at.path, "removing what was there", e))?;
        self.listed(&path, at.path)?;
        self.devices.insert(key(at.parts), self.device_list.len());
        self.device_list.push(Some(path));
        Ok(())
    }

    /// Gives the directories their modes and times, now that their children are in.
    fn finish(&self) -> Result<(), UnpackError> {
        for (key, attrs) in &self.dirs {
            let parts = parts_of(key);
            let Some((name, dirs)) = parts.split_last() else {
                continue;
            };
            let dir = match walk(self.root.as_fd(), dirs, false)
                .and_then(|parent| openat_dir(parent.as_fd(), name))
            {
                Ok(dir) => dir,
                // Replaced by a later entry, whose attributes stand.
                Err(e) if is_absent(&e) => continue,
                Err(e) => return Err(UnpackError::io(shown(&parts), "opening the directory", e)),
            };
            attrs
                .apply(dir.as_fd())
                .map_err(|e| UnpackError::io(shown(&parts), "setting owner, mode and time", e))?;
        }
        Ok(())
    }
}

/// Makes a symbolic link, its target kept verbatim (absolute ones too): it is only ever
/// resolved inside the sandbox.
fn symlink(at: At<'_>, attrs: Attrs, target: Option<Cow<'_, [u8]>>) -> Result<(), UnpackError> {
    let bad = |reason| UnpackError::BadPath {
        path: at.path.into(),
        reason,
    };
    let target = target
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("symbolic link without a target"))?;
    let target = CString::new(target.into_owned())
        .map_err(|_| bad("symbolic link target contains a NUL byte"))?;
    let io_err = |what| move |e| UnpackError::io(at.path, what, e);
    remove_tree(at.parent, at.name).map_err(io_err("removing what was there"))?;
    symlinkat(&target, at.parent, at.name).map_err(io_err("making the symbolic link"))?;
    attrs
        .apply_to_link(at.parent, at.name)
        .map_err(io_err("setting owner and time"))
}

/// Makes a FIFO, replacing what held its name.
fn fifo(at: At<'_>, attrs: Attrs) -> Result<(), UnpackError> {
    let io_err = |what| move |e| UnpackError::io(at.path, what, e);
    remove_tree(at.parent, at.name).map_err(io_err("removing what was there"))?;
    let made = make_fifo(at.parent, at.name).map_err(io_err("making the FIFO"))?;
    attrs
        .apply(made.as_fd())
        .map_err(io_err("setting owner, mode and time"))
}

/// Why a path cannot be in a [`LayerIndex`].
const NOT_UTF8: &str = "a whiteout or device whose name is not UTF-8";

/// `raw`, an entry's name, as components from the root: `.` and empty components dropped (so a
/// leading `/` or `./` too); a `..` component, a NUL byte, an empty name or an over-long one
/// refused. The root itself (`./`, `/`) is no components.
pub(super) fn entry_parts(raw: &[u8]) -> Result<Vec<CString>, &'static str> {
    if raw.is_empty() {
        return Err("empty name");
    }
    if raw.len() > MAX_PATH {
        return Err("path longer than 4096 bytes");
    }
    let mut parts = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path with a `..` component"),
            _ if part.len() > MAX_NAME => return Err("path component longer than 255 bytes"),
            _ => parts.push(CString::new(part).map_err(|_| "name contains a NUL byte")?),
        }
    }
    Ok(parts)
}

/// `parts` as a [`LayerIndex`] path, if UTF-8.
fn index_path(parts: &[CString]) -> Option<String> {
    let parts: Option<Vec<&str>> = parts.iter().map(|p| p.to_str().ok()).collect();
    Some(parts?.join("/"))
}

/// `parts` as one allocation (joined with `/`, which no part holds): the key of a path held
/// until the end, some 50 bytes of overhead a path rather than a part.
fn key(parts: &[CString]) -> Vec<u8> {
    let mut key = Vec::with_capacity(parts.iter().map(|p| p.as_bytes().len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            key.push(b'/');
        }
        key.extend_from_slice(p.as_bytes());
    }
    key
}

/// The parts of a [`key`] again.
fn parts_of(key: &[u8]) -> Vec<CString> {
    if key.is_empty() {
        return Vec::new();
    }
    key.split(|b| *b == b'/')
        .filter_map(|p| CString::new(p).ok())
        .collect()
}

/// `parts` joined, for errors.
fn shown(parts: &[CString]) -> String {
    let parts: Vec<_> = parts.iter().map(|p| p.to_string_lossy()).collect();
    parts.join("/")
}

/// The attributes an entry gives what it makes.
#[derive(Clone, Copy)]
pub(super) struct Attrs {
    uid: u32,
    gid: u32,
    /// Permission bits, within [`MODE_MASK`].
    mode: u32,
    /// Access and modification times.
    times: [libc::timespec; 2],
}

impl Attrs {
    /// From a tar header: ids clamped, setuid and setgid dropped, access time = modification
    /// time.
    fn from_header(header: &tar::Header) -> io::Result<Self> {
        let mtime = libc::timespec {
            tv_sec: i64::try_from(header.mtime()?).unwrap_or(i64::MAX),
            tv_nsec: 0,
        };
        Ok(Attrs {
            uid: clamp_id(header.uid()?),
            gid: clamp_id(header.gid()?),
            mode: header.mode()? & MODE_MASK,
            times: [mtime, mtime],
        })
    }

    /// From a file's status (in an unpacked layer), setuid and setgid dropped all the same.
    pub(super) fn from_stat(st: &libc::stat) -> Self {
        Attrs {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & MODE_MASK,
            times: [
                libc::timespec {
                    tv_sec: st.st_atime,
                    tv_nsec: st.st_atime_nsec,
                },
                libc::timespec {
                    tv_sec: st.st_mtime,
                    tv_nsec: st.st_mtime_nsec,
                },
            ],
        }
    }

    /// Sets owner, then mode (a change of owner may clear mode bits), then times, on an open
    /// file or directory.
    pub(super) fn apply(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        fchown(fd, self.uid, self.gid)?;
        fchmod(fd, self.mode)?;
        futimens(fd, &self.times)
    }

    /// Sets owner and times on the symbolic link `name` in `dir` itself (a link has no mode of
    /// its own).
    pub(super) fn apply_to_link(&self, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        fchownat(dir, name, self.uid, self.gid, libc::AT_SYMLINK_NOFOLLOW)?;
        utimensat(dir, name, &self.times, libc::AT_SYMLINK_NOFOLLOW)
    }
}

/// An owner id the sandbox can show: above 65535, 65534.
fn clamp_id(id: u64) -> u32 {
    if id > MAX_ID {
        OVERFLOW_ID
    } else {
        u32::try_from(id).unwrap_or(OVERFLOW_ID)
    }
}

/// Whether an error says a path component is a symbolic link or not a directory.
pub(super) fn is_not_dir(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR))
}

/// Whether an error says a path does not lead anywhere: missing, or through a symbolic link or
/// a non-directory (which is never followed, so nothing is beneath it).
pub(super) fn is_absent(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT) || is_not_dir(e)
}

/// Whether `st` is of the type `kind` (an `S_IF*` constant).
pub(super) fn is_type(st: &libc::stat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

/// The directory `dirs` below `root`, opened one component at a time without following a
/// symbolic link (`ELOOP` or `ENOTDIR` if one is a link or not a directory). Missing
/// directories are made (mode 0755, owned by the caller) if `create`, else `ENOENT`.
pub(super) fn walk(root: BorrowedFd<'_>, dirs: &[CString], create: bool) -> io::Result<OwnedFd> {
    let mut dir = root.try_clone_to_owned()?;
    for name in dirs {
        dir = match openat_dir(dir.as_fd(), name) {
            Ok(next) => next,
            Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => {
                make_dir(dir.as_fd(), name)?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(dir)
}

/// The directory `name` in `parent`: kept if it is one; else made, after removing what was
/// there (a symbolic link is removed, never followed).
pub(super) fn ensure_dir(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    match openat_dir(parent, name) {
        Ok(dir) => return Ok(dir),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) if is_not_dir(&e) => remove_tree(parent, name)?,
        Err(e) => return Err(e),
    }
    make_dir(parent, name)
}

/// Makes the directory `name` in `parent`, mode 0755 whatever the umask, and opens it.
fn make_dir(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    match mkdirat(parent, name, 0o755) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return openat_dir(parent, name),
        Err(e) => return Err(e),
    }
    let dir = openat_dir(parent, name)?;
    fchmod(dir.as_fd(), 0o755)?;
    Ok(dir)
}

/// Creates the regular file `name` in `parent`, write-only; it must not exist.
pub(super) fn create_file(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    openat(
        parent,
        name,
        libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_WRONLY | libc::O_CLOEXEC,
        0o600,
    )
}

/// Makes the FIFO `name` in `parent` and opens it (without waiting for a writer), to set its
/// attributes through the descriptor.
pub(super) fn make_fifo(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    mkfifoat(parent, name, 0o600)?;
    let fifo = openat(
        parent,
        name,
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0,
    )?;
    if !is_type(&fstat(fifo.as_fd())?, libc::S_IFIFO) {
        return Err(io::Error::other("replaced while being made"));
    }
    Ok(fifo)
}

/// Removes `name` from `parent`, with its contents if it is a directory; missing is fine. A
/// symbolic link is removed itself, never followed.
pub(super) fn remove_tree(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    match unlinkat(parent, name, 0) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
            empty_dir(openat_dir(parent, name)?)?;
            unlinkat(parent, name, libc::AT_REMOVEDIR)
        }
        Err(e) => Err(e),
    }
}

/// Removes everything in the directory `dir`, keeping it. Iterative, so a deep tree cannot
/// exhaust the stack (it holds one descriptor per level).
pub(super) fn empty_dir(dir: OwnedFd) -> io::Result<()> {
    let names = super::sys::list_dir(dir.as_fd())?;
    // Directories being emptied, each with the names left in it and its own name in its
    // parent (the one below it on the stack).
    let mut stack: Vec<(OwnedFd, Vec<CString>, Option<CString>)> = vec![(dir, names, None)];
    while let Some((fd, names, _)) = stack.last_mut() {
        if let Some(name) = names.pop() {
            match unlinkat(fd.as_fd(), &name, 0) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                    let sub = openat_dir(fd.as_fd(), &name)?;
                    let names = super::sys::list_dir(sub.as_fd())?;
                    stack.push((sub, names, Some(name)));
                }
                Err(e) => return Err(e),
            }
        } else if let Some((done, _, Some(name))) = stack.pop() {
            drop(done);
            if let Some((parent, _, _)) = stack.last() {
                unlinkat(parent.as_fd(), &name, libc::AT_REMOVEDIR)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(super) mod tests {
    use std::collections::BTreeSet;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    use super::*;

    /// The modification time every test entry has.
    pub(in crate::images) const MTIME: i64 = 1_600_000_000;

    /// A layer archive built entry by entry, with names written verbatim into the header (so
    /// hostile ones too).
    pub(in crate::images) struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        pub(in crate::images) fn new() -> Self {
            Tar(tar::Builder::new(Vec::new()))
        }

        fn header(kind: EntryType, path: &str, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(MTIME as u64);
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h
        }

        fn add(&mut self, mut h: tar::Header, data: &[u8]) -> &mut Self {
            h.set_size(data.len() as u64);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        pub(in crate::images) fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
            self.add(Self::header(EntryType::Directory, path, mode), b"")
        }

        pub(in crate::images) fn owned_dir(&mut self, path: &str, mode: u32, id: u64) -> &mut Self {
            let mut h = Self::header(EntryType::Directory, path, mode);
            h.set_uid(id);
            h.set_gid(id);
            self.add(h, b"")
        }

        pub(in crate::images) fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
            self.add(Self::header(EntryType::Regular, path, mode), data)
        }

        fn owned_file(&mut self, path: &str, uid: u64, gid: u64, data: &[u8]) -> &mut Self {
            let mut h = Self::header(EntryType::Regular, path, 0o644);
            h.set_uid(uid);
            h.set_gid(gid);
            self.add(h, data)
        }

        pub(in crate::images) fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
            let mut h = Self::header(EntryType::Symlink, path, 0o777);
            h.set_link_name_literal(target).unwrap();
            self.add(h, b"")
        }

        fn hard_link(&mut self, path: &str, target: &str) -> &mut Self {
            let mut h = Self::header(EntryType::Link, path, 0o644);
            h.set_link_name_literal(target).unwrap();
            self.add(h, b"")
        }

        pub(in crate::images) fn fifo(&mut self, path: &str) -> &mut Self {
            self.add(Self::header(EntryType::Fifo, path, 0o640), b"")
        }

        pub(in crate::images) fn device(&mut self, path: &str, kind: EntryType) -> &mut Self {
            let mut h = Self::header(kind, path, 0o666);
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
            self.add(h, b"")
        }

        /// A regular file with a name too long for the header (a GNU long name entry).
        pub(in crate::images) fn long_file(&mut self, path: &str) -> &mut Self {
            let mut h = Self::header(EntryType::Regular, "", 0o644);
            self.0.append_data(&mut h, path, &b""[..]).unwrap();
            self
        }

        /// A regular file whose name is a pax `path` record, verbatim.
        fn pax_file(&mut self, path: &[u8]) -> &mut Self {
            let body = [b"path=".as_slice(), path, b"\n"].concat();
            // The record's length counts its own digits (a short record: two of them).
            let len = body.len() + 3;
            let record = [format!("{len} ").as_bytes(), &body].concat();
            assert_eq!(record.len(), len);
            self.add(Self::header(EntryType::XHeader, "pax", 0o644), &record);
            self.file("placeholder", 0o644, b"")
        }

        pub(in crate::images) fn finish(&mut self) -> Vec<u8> {
            self.0.finish().unwrap();
            self.0.get_ref().clone()
        }
    }

    /// A directory to unpack into, inside a private one, so that anything escaping it shows.
    pub(in crate::images) struct Dest {
        outer: tempfile::TempDir,
    }

    impl Dest {
        pub(in crate::images) fn new() -> Self {
            let outer = tempfile::tempdir().unwrap();
            std::fs::create_dir(outer.path().join("dest")).unwrap();
            Dest { outer }
        }

        pub(in crate::images) fn path(&self) -> PathBuf {
            self.outer.path().join("dest")
        }

        /// Checks nothing but `dest` was made next to it.
        pub(in crate::images) fn assert_nothing_outside(&self) {
            let names: Vec<_> = std::fs::read_dir(self.outer.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["dest"]);
        }
    }

    use std::path::PathBuf;

    pub(in crate::images) fn unpack(tar: &[u8], dest: &Path) -> Result<LayerIndex, UnpackError> {
        unpack_layer(tar, dest, &UnpackLimits::default())
    }

    /// Every path below `dir`, relative, without following symbolic links.
    pub(in crate::images) fn listing(dir: &Path) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            for entry in std::fs::read_dir(dir.join(&rel)).unwrap() {
                let entry = entry.unwrap();
                let path = rel.join(entry.file_name());
                if entry.file_type().unwrap().is_dir() {
                    todo.push(path.clone());
                }
                out.insert(path.to_str().unwrap().to_owned());
            }
        }
        out
    }

    fn meta(path: PathBuf) -> std::fs::Metadata {
        std::fs::symlink_metadata(path).unwrap()
    }

    fn set(paths: &[&str]) -> BTreeSet<String> {
        paths.iter().map(|p| p.to_string()).collect()
    }

    /// A full disk is the host's trouble, told apart from what an archive did wrong.
    #[test]
    fn a_full_disk_is_told_apart() {
        let full = UnpackError::io("a", "writing", io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(full.is_disk_full());
        let bad = UnpackError::io("a", "making", io::Error::from_raw_os_error(libc::ENOTDIR));
        assert!(!bad.is_disk_full());
    }

    #[test]
    fn a_normal_layer_round_trips() {
        let tar = Tar::new()
            .dir("./", 0o755)
            .dir("etc/", 0o750)
            .file("etc/hosts", 0o644, b"127.0.0.1 localhost\n")
            .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
            .owned_dir("home/user/", 0o700, 1000)
            .owned_file("home/user/.profile", 1000, 1000, b"PATH=/bin\n")
            .file("bin/tool", 0o755, b"#!/bin/sh\n")
            .hard_link("bin/tool2", "./bin/tool")
            .fifo("run/fifo")
            .finish();
        let dest = Dest::new();
        let d = dest.path();
        let index = unpack(&tar, &d).unwrap();

        assert_eq!(
            index,
            LayerIndex {
                entries: 9,
                bytes: 40,
                ..LayerIndex::default()
            }
        );
        assert_eq!(
            listing(&d),
            set(&[
                "bin",
                "bin/tool",
                "bin/tool2",
                "etc",
                "etc/hosts",
                "etc/localtime",
                "home",
                "home/user",
                "home/user/.profile",
                "run",
                "run/fifo",
            ])
        );
        assert_eq!(
            std::fs::read(d.join("etc/hosts")).unwrap(),
            b"127.0.0.1 localhost\n"
        );
        let hosts = meta(d.join("etc/hosts"));
        assert_eq!(hosts.mode() & 0o7777, 0o644);
        assert_eq!(hosts.mtime(), MTIME);
        let etc = meta(d.join("etc"));
        assert_eq!(etc.mode() & 0o7777, 0o750);
        assert_eq!(
            etc.mtime(),
            MTIME,
            "directory times are set after their children"
        );
        let home = meta(d.join("home/user"));
        assert_eq!(
            (home.uid(), home.gid(), home.mode() & 0o7777),
            (1000, 1000, 0o700)
        );
        let profile = meta(d.join("home/user/.profile"));
        assert_eq!((profile.uid(), profile.gid()), (1000, 1000));
        // Parents no entry named are made 0755.
        assert_eq!(meta(d.join("run")).mode() & 0o7777, 0o755);

        assert_eq!(
            std::fs::read_link(d.join("etc/localtime")).unwrap(),
            Path::new("/usr/share/zoneinfo/UTC")
        );
        assert_eq!(meta(d.join("etc/localtime")).mtime(), MTIME);
        let tool = meta(d.join("bin/tool"));
        assert_eq!(tool.mode() & 0o7777, 0o755);
        assert_eq!(tool.ino(), meta(d.join("bin/tool2")).ino());
        assert_eq!(tool.nlink(), 2);
        let fifo = meta(d.join("run/fifo"));
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o640);
        dest.assert_nothing_outside();
    }

    #[test]
    fn parent_components_are_refused() {
        for name in ["../escape", "a/../../escape", "./.."] {
            let dest = Dest::new();
            let tar = Tar::new().file(name, 0o644, b"x").finish();
            let err = unpack(&tar, &dest.path()).unwrap_err();
            assert!(
                matches!(&err, UnpackError::BadPath { path, .. } if path == name),
                "{name}: {err}"
            );
            assert!(err.to_string().contains(name), "{err}");
            dest.assert_nothing_outside();
        }
    }

    #[test]
    fn absolute_paths_stay_inside() {
        let dest = Dest::new();
        let tar = Tar::new().file("/abs/path", 0o644, b"x").finish();
        unpack(&tar, &dest.path()).unwrap();
        assert_eq!(std::fs::read(dest.path().join("abs/path")).unwrap(), b"x");
        dest.assert_nothing_outside();
    }

    #[test]
    fn a_symlink_is_never_followed_as_a_component() {
        for target in ["/", "..", "../..", "."] {
            let dest = Dest::new();
            let tar = Tar::new()
                .symlink("evil", target)
                .file("evil/pwned", 0o644, b"x")
                .finish();
            let err = unpack(&tar, &dest.path()).unwrap_err();
            assert!(
                matches!(&err, UnpackError::NotADirectory { path } if path == "evil/pwned"),
                "{target}: {err}"
            );
            dest.assert_nothing_outside();
            assert!(!Path::new("/pwned").exists());
            assert!(!dest.path().join("pwned").exists());
        }
        // Nor as the directory of a directory entry, a whiteout or a hard link.
        for tail in [
            Tar::new().dir("evil/sub/", 0o755).finish(),
            Tar::new().file("evil/.wh.x", 0o644, b"").finish(),
            Tar::new().hard_link("evil/x", "ok").finish(),
        ] {
            let dest = Dest::new();
            let head = Tar::new()
                .symlink("evil", "..")
                .file("ok", 0o644, b"")
                .finish();
            // Two archives back to back: the first one's end marker dropped.
            let tar = [&head[..head.len() - 1024], &tail].concat();
            let err = unpack(&tar, &dest.path()).unwrap_err();
            assert!(matches!(err, UnpackError::NotADirectory { .. }), "{err}");
            dest.assert_nothing_outside();
        }
    }

    #[test]
    fn a_file_replaces_a_symlink_without_writing_through_it() {
        let dest = Dest::new();
        let victim = dest.outer.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        let tar = Tar::new()
            .symlink("link", victim.to_str().unwrap())
            .file("link", 0o644, b"mine")
            .finish();
        unpack(&tar, &dest.path()).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert!(meta(dest.path().join("link")).is_file());
        assert_eq!(std::fs::read(dest.path().join("link")).unwrap(), b"mine");
    }

    #[test]
    fn hard_links_stay_inside_the_layer() {
        let cases = [
            (
                Tar::new().hard_link("passwd", "../../etc/passwd").finish(),
                "bad",
            ),
            (
                Tar::new().hard_link("passwd", "/etc/passwd").finish(),
                "missing",
            ),
            (Tar::new().hard_link("passwd", "nope").finish(), "missing"),
            (Tar::new().hard_link("passwd", "").finish(), "bad"),
            (Tar::new().hard_link("passwd", "./").finish(), "bad"),
            (
                Tar::new()
                    .symlink("s", "/etc")
                    .hard_link("passwd", "s/passwd")
                    .finish(),
                "not a directory",
            ),
            (
                Tar::new()
                    .dir("d/", 0o755)
                    .hard_link("passwd", "d")
                    .finish(),
                "bad",
            ),
        ];
        for (tar, expected) in cases {
            let dest = Dest::new();
            let err = unpack(&tar, &dest.path()).unwrap_err();
            let kind = match err {
                UnpackError::BadLinkTarget { .. } => "bad",
                UnpackError::MissingLinkTarget { .. } => "missing",
                UnpackError::NotADirectory { .. } => "not a directory",
                _ => "other",
            };
            assert_eq!(kind, expected, "{err}");
            assert!(err.to_string().contains("passwd"), "{err}");
            assert!(!dest.path().join("passwd").exists());
            dest.assert_nothing_outside();
        }
    }

    #[test]
    fn a_hard_link_to_a_symlink_links_the_symlink() {
        let dest = Dest::new();
        let d = dest.path();
        let tar = Tar::new()
            .symlink("sl", "/etc/passwd")
            .hard_link("hl", "sl")
            .finish();
        unpack(&tar, &d).unwrap();
        let hl = meta(d.join("hl"));
        assert!(hl.file_type().is_symlink());
        assert_eq!(hl.ino(), meta(d.join("sl")).ino());
        assert_eq!(
            std::fs::read_link(d.join("hl")).unwrap(),
            Path::new("/etc/passwd")
        );
    }

    #[test]
    fn devices_are_listed_not_made() {
        let dest = Dest::new();
        let d = dest.path();
        let tar = Tar::new()
            .file("dev/null", 0o644, b"was a file")
            .device("dev/null", EntryType::Char)
            .device("dev/sda", EntryType::Block)
            .hard_link("dev/null2", "dev/null")
            .finish();
        let index = unpack(&tar, &d).unwrap();
        assert_eq!(index.skipped_devices, ["dev/null", "dev/sda", "dev/null2"]);
        assert_eq!(listing(&d), set(&["dev"]));

        // A file replacing a device is made, and can be linked to.
        let tar = Tar::new()
            .device("dev/zero", EntryType::Char)
            .device("dev/zero", EntryType::Char)
            .file("dev/zero", 0o644, b"a file now")
            .hard_link("dev/zero2", "dev/zero")
            .finish();
        let dest = Dest::new();
        let index = unpack(&tar, &dest.path()).unwrap();
        assert!(index.skipped_devices.is_empty());
        assert_eq!(
            std::fs::read(dest.path().join("dev/zero2")).unwrap(),
            b"a file now"
        );
    }

    #[test]
    fn setuid_and_setgid_are_dropped_sticky_kept() {
        let dest = Dest::new();
        let d = dest.path();
        let tar = Tar::new()
            .file("suid", 0o4755, b"")
            .file("sgid", 0o2711, b"")
            .dir("tmp/", 0o1777)
            .dir("shared/", 0o3775)
            .finish();
        unpack(&tar, &d).unwrap();
        let mode = |p: &str| meta(d.join(p)).permissions().mode() & 0o7777;
        assert_eq!(mode("suid"), 0o755);
        assert_eq!(mode("sgid"), 0o711);
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("shared"), 0o1775);
    }

    #[test]
    fn extreme_times_do_not_fail() {
        let mut tar = Tar::new();
        let mut h = Tar::header(EntryType::Regular, "late", 0o644);
        h.set_mtime(u64::MAX);
        tar.add(h, b"");
        let dest = Dest::new();
        unpack(&tar.finish(), &dest.path()).unwrap();
        assert!(meta(dest.path().join("late")).mtime() > MTIME);
    }

    #[test]
    fn large_ids_become_nobody() {
        let dest = Dest::new();
        let tar = Tar::new()
            .owned_file("f", 100_000, 65_536, b"")
            .owned_file("g", 65_535, 0, b"")
            .finish();
        unpack(&tar, &dest.path()).unwrap();
        let f = meta(dest.path().join("f"));
        assert_eq!((f.uid(), f.gid()), (65534, 65534));
        let g = meta(dest.path().join("g"));
        assert_eq!((g.uid(), g.gid()), (65535, 0));
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let dest = Dest::new();
        let d = dest.path();
        let tar = Tar::new()
            .file("a", 0o644, b"one")
            .file("a", 0o600, b"two")
            .dir("d/", 0o755)
            .file("d/child", 0o644, b"")
            .dir("d/sub/", 0o755)
            .file("d/sub/deeper", 0o644, b"")
            .file("d", 0o644, b"now a file")
            .file("f", 0o644, b"")
            .dir("f/", 0o700)
            .file("f/inner", 0o644, b"in")
            .fifo("p")
            .symlink("p", "a")
            .finish();
        unpack(&tar, &d).unwrap();
        assert_eq!(listing(&d), set(&["a", "d", "f", "f/inner", "p"]));
        assert_eq!(std::fs::read(d.join("a")).unwrap(), b"two");
        assert_eq!(meta(d.join("a")).mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(d.join("d")).unwrap(), b"now a file");
        assert!(meta(d.join("f")).is_dir());
        assert_eq!(meta(d.join("f")).mode() & 0o777, 0o700);
        assert!(meta(d.join("p")).file_type().is_symlink());
    }

    #[test]
    fn whiteouts_and_opaque_markers_are_recorded_not_made() {
        let dest = Dest::new();
        let d = dest.path();
        let tar = Tar::new()
            .file("etc/.wh.passwd", 0o644, b"")
            .file(".wh.top", 0o644, b"")
            .file("opt/app/.wh..wh..opq", 0o644, b"")
            .file("opt/app/new", 0o644, b"")
            .file(".wh..wh..opq", 0o644, b"")
            .finish();
        let index = unpack(&tar, &d).unwrap();
        assert_eq!(index.whiteouts, ["etc/passwd", "top"]);
        assert_eq!(index.opaque_dirs, ["opt/app", ""]);
        assert_eq!(listing(&d), set(&["etc", "opt", "opt/app", "opt/app/new"]));

        for name in [".wh.", "a/.wh..", ".wh..."] {
            let tar = Tar::new().file(name, 0o644, b"").finish();
            let err = unpack(&tar, &Dest::new().path()).unwrap_err();
            assert!(matches!(err, UnpackError::BadPath { .. }), "{name}: {err}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let tar = Tar::new()
            .file("a", 0o644, &[0; 10])
            .file("b", 0o644, &[0; 10])
            .file("c", 0o644, b"")
            .finish();
        let limits = UnpackLimits {
            max_entries: 2,
            ..UnpackLimits::default()
        };
        let err = unpack_layer(&tar[..], &Dest::new().path(), &limits).unwrap_err();
        assert!(matches!(&err, UnpackError::TooManyEntries { path, limit: 2 } if path == "c"));
        assert!(err.to_string().contains("max_entries"), "{err}");

        let limits = UnpackLimits {
            max_bytes: 15,
            ..UnpackLimits::default()
        };
        let err = unpack_layer(&tar[..], &Dest::new().path(), &limits).unwrap_err();
        assert!(matches!(&err, UnpackError::TooManyBytes { path, limit: 15 } if path == "b"));
        assert!(err.to_string().contains("max_bytes"), "{err}");

        // Whiteouts are held in memory until the merge: their paths are bounded too.
        let whiteouts = Tar::new()
            .file(".wh.aaaa", 0o644, b"")
            .file(".wh.bbbb", 0o644, b"")
            .file(".wh.cccc", 0o644, b"")
            .finish();
        let limits = UnpackLimits {
            max_index_bytes: 2 * (4 + PATH_OVERHEAD) + 10,
            ..UnpackLimits::default()
        };
        let err = unpack_layer(&whiteouts[..], &Dest::new().path(), &limits).unwrap_err();
        assert!(
            matches!(&err, UnpackError::IndexTooLarge { path, .. } if path == ".wh.cccc"),
            "{err}"
        );
        // So are directories, which wait for their attributes until the end: each path
        // once, whatever its depth.
        let dirs = Tar::new()
            .dir("d", 0o755)
            .dir("d/d", 0o755)
            .dir("d/d", 0o700)
            .dir("d/d/d", 0o755)
            .finish();
        let limits = UnpackLimits {
            max_index_bytes: (1 + PATH_OVERHEAD) + (3 + PATH_OVERHEAD) + 2,
            ..UnpackLimits::default()
        };
        let err = unpack_layer(&dirs[..], &Dest::new().path(), &limits).unwrap_err();
        assert!(
            matches!(&err, UnpackError::IndexTooLarge { path, .. } if path == "d/d/d"),
            "{err}"
        );

        // A huge size fails before anything is read.
        let mut h = Tar::header(EntryType::Regular, "huge", 0o644);
        h.set_size(1 << 50);
        h.set_cksum();
        let huge = [h.as_bytes().as_slice(), &[0; 1024]].concat();
        let dest = Dest::new();
        let err = unpack(&huge, &dest.path()).unwrap_err();
        assert!(matches!(err, UnpackError::TooManyBytes { .. }), "{err}");
        assert!(!dest.path().join("huge").exists());
    }

    #[test]
    fn bad_names_are_refused() {
        let long_component = format!("dir/{}", "x".repeat(256));
        let long_path = "d/".repeat(2100);
        let cases = [
            Tar::new().file("", 0o644, b"").finish(),
            Tar::new().long_file(&long_component).finish(),
            Tar::new().long_file(&long_path).finish(),
            Tar::new().pax_file(b"a\0b").finish(),
        ];
        for tar in cases {
            let dest = Dest::new();
            let err = unpack(&tar, &dest.path()).unwrap_err();
            assert!(matches!(err, UnpackError::BadPath { .. }), "{err}");
            assert_eq!(listing(&dest.path()), BTreeSet::new());
        }
        // A long name within the limits is fine.
        let name = format!("dir/{}", "x".repeat(255));
        let dest = Dest::new();
        unpack(&Tar::new().long_file(&name).finish(), &dest.path()).unwrap();
        assert!(dest.path().join(name).is_file());
    }

    #[test]
    fn unknown_types_and_truncated_archives_fail() {
        let tar = Tar::new()
            .add(Tar::header(EntryType::new(b'V'), "volume", 0o644), b"")
            .finish();
        let err = unpack(&tar, &Dest::new().path()).unwrap_err();
        assert!(
            matches!(&err, UnpackError::UnsupportedType { path, .. } if path == "volume"),
            "{err}"
        );

        let mut h = Tar::header(EntryType::Regular, "short", 0o644);
        h.set_size(100);
        h.set_cksum();
        let short = [h.as_bytes().as_slice(), b"only ten b"].concat();
        let err = unpack(&short, &Dest::new().path()).unwrap_err();
        assert!(err.to_string().contains("short"), "{err}");

        let err = unpack(&b"not a tar archive"[..], &Dest::new().path()).unwrap_err();
        assert!(matches!(err, UnpackError::Archive { .. }), "{err}");
    }

    /// A GNU header of `kind` named `name` (written as is) declaring `size` bytes.
    fn gnu_header(kind: EntryType, name: &[u8], size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h.set_cksum();
        h
    }

    /// A pax header entry holding `records` (each `KEY=VALUE`), then a file `placeholder`.
    fn pax_records(records: &[&str]) -> Vec<u8> {
        let mut body = Vec::new();
        for r in records {
            let text = format!("{r}\n");
            // The length counts its own digits and the space.
            let mut len = text.len() + 2;
            if len.to_string().len() + 1 + text.len() != len {
                len += 1;
            }
            body.extend_from_slice(format!("{len} {text}").as_bytes());
        }
        let mut tar = Tar::new();
        tar.add(Tar::header(EntryType::XHeader, "pax", 0o644), &body);
        tar.file("placeholder", 0o644, b"x");
        tar.finish()
    }

    #[test]
    fn long_names_and_pax_headers_are_read_within_a_bound() {
        // pax path and linkpath name the entry after them.
        let dest = Dest::new();
        unpack(
            &pax_records(&["path=from/pax.txt", "mtime=1"]),
            &dest.path(),
        )
        .unwrap();
        assert_eq!(
            std::fs::read(dest.path().join("from/pax.txt")).unwrap(),
            b"x"
        );
        assert!(!dest.path().join("placeholder").exists());

        // A pax size (a file over 8 GiB) is refused, by name of what it is.
        let err = unpack(&pax_records(&["size=99999999999"]), &Dest::new().path()).unwrap_err();
        assert!(matches!(err, UnpackError::BadExtension { .. }), "{err}");

        // A long name of 1 MiB is refused before it is read whole.
        let h = gnu_header(EntryType::GNULongName, b"././@LongLink", 1 << 20);
        let tar = [h.as_bytes().as_slice(), &vec![b'a'; 1 << 20], &[0u8; 1024]].concat();
        let err = unpack(&tar, &Dest::new().path()).unwrap_err();
        assert!(
            matches!(&err, UnpackError::BadExtension { reason, .. } if reason.contains("1048576 bytes")),
            "{err}"
        );

        // A pax header with nothing after it.
        let mut tar = Tar::new();
        tar.add(
            Tar::header(EntryType::XHeader, "pax", 0o644),
            b"13 path=abc\n",
        );
        let err = unpack(&tar.finish(), &Dest::new().path()).unwrap_err();
        assert!(matches!(err, UnpackError::BadExtension { .. }), "{err}");
    }

    #[test]
    fn gnu_sparse_files_are_refused() {
        // A few header bytes that would unpack to a file of its full size.
        let mut h = gnu_header(EntryType::GNUSparse, b"sparse", 0);
        h.as_gnu_mut().unwrap().realsize = *b"00000000000\0";
        h.set_cksum();
        let tar = [h.as_bytes().as_slice(), &[0u8; 1024]].concat();
        let dest = Dest::new();
        let err = unpack(&tar, &dest.path()).unwrap_err();
        assert!(
            matches!(&err, UnpackError::UnsupportedType { path, .. } if path == "sparse"),
            "{err}"
        );
    }
}
