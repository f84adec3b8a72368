//! `COPY` and `ADD` of a build: files of the build context written as a layer archive that
//! applies over the image as it stands.
//!
//! The context is a directory the hardened unpacker made from the client's archive, so its
//! names are safe, but its symbolic links point wherever the client wanted: nothing in it is
//! ever followed. A source that is a link is copied as the link; a path through a link is
//! refused. Globs (`*`, `?`, `[…]`) match one path component each, as Docker's do.
//!
//! The destination is resolved in the image's tree as a process in the sandbox would see it,
//! with `openat2(RESOLVE_IN_ROOT)`: `/bin/x` in an image whose `/bin` links to `usr/bin`
//! lands in `usr/bin/x`, and no link leads out of the tree. The archive names every directory
//! on the way, with the owner, mode and time the tree gives it, so applying the layer changes
//! none of them; directories that do not exist yet are made, `0755`, owned as the copied files
//! are. Copied entries keep their permission bits and times (the layer's unpacking drops
//! set-id bits), are owned by root or `--chown`, and take `--chmod` when given. The archive is
//! the same for the same context and image, so a layer built twice is stored once.

use std::ffi::{CStr, CString};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use tar::{EntryType, Header};

use crate::images::sys::{fd_path, fstat, fstatat, list_dir, open_dir, open_in_root, openat};
use crate::images::sys::{openat_dir, readlinkat};
use crate::images::unpack::Names;

/// Longest user or group file read from the image when `--chown` names a user.
const MAX_ACCOUNT_FILE: u64 = 4 << 20;
/// Directories a source's glob may pass through at one level (each held open meanwhile).
const MAX_OPEN_DIRS: usize = 1024;

/// One `COPY`, its words expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// Sources, relative to the context's root (a leading `/` or `./` is the root too).
    pub sources: Vec<String>,
    /// The destination: absolute, the working directory applied; a trailing `/` makes it a
    /// directory.
    pub dest: String,
    /// Owner and group of what is made.
    pub owner: (u32, u32),
    /// Permission bits of what is copied, instead of the sources'.
    pub mode: Option<u32>,
    /// `ADD`: a source that is a tar archive (plain or gzipped) is unpacked into the
    /// destination (a directory then) instead of copied, keeping its entries' owners and
    /// modes.
    pub unpack_archives: bool,
}

/// What a copy wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Files, directories and links copied (the directories on the way not counted).
    pub entries: u64,
    /// Bytes of file contents.
    pub bytes: u64,
}

/// Writes the layer of `spec` over the tree at `tree`, from the context at `context`, to
/// `out` as a tar archive; finishes the archive. Errors are the user's to read.
pub fn copy_layer(
    context: &Path,
    tree: &Path,
    spec: &CopySpec,
    out: impl Write,
) -> Result<Copied, String> {
    let context = open_dir(context).map_err(|e| format!("opening the build context: {e}"))?;
    let tree_fd = open_dir(tree).map_err(|e| format!("opening the image: {e}"))?;
    let mut sources = Vec::new();
    for source in &spec.sources {
        let found = find_sources(context.as_fd(), source)?;
        if found.is_empty() {
            return Err(format!("{source} matches nothing in the build context"));
        }
        sources.extend(found);
    }
    let dest_parts = components(&spec.dest)
        .ok_or_else(|| format!("the destination {} leaves the image's root", spec.dest))?;
    // `/app/`, `/app/.` and `.` name a directory, as in Docker.
    let names_dir = spec.dest.ends_with('/') || spec.dest.ends_with("/.") || spec.dest == ".";
    let archives: Vec<bool> = sources
        .iter()
        .map(|s| spec.unpack_archives && !s.is_dir && is_archive(s.parent.as_fd(), &s.name_c))
        .collect();
    let into_dir = names_dir
        || sources.len() > 1
        || sources.first().is_some_and(|s| s.is_dir)
        || archives.first().copied().unwrap_or(false);
    if sources.len() > 1 && !names_dir {
        return Err(format!(
            "with more than one source the destination must be a directory ending in `/` (not \
             {})",
            spec.dest
        ));
    }
    let mut w = Writer {
        tar: tar::Builder::new(out),
        owner: spec.owner,
        mode: spec.mode,
        done: Copied::default(),
    };
    let single_file = !into_dir;
    // A single file copied to an existing directory goes into it.
    let (dir_parts, file_name) = match (single_file, dest_parts.split_last()) {
        (true, Some((last, parents))) if !is_dir_in(tree_fd.as_fd(), &dest_parts) => {
            (parents.to_vec(), Some(last.clone()))
        }
        _ => (dest_parts.clone(), None),
    };
    let dest_dir = w.directories(tree_fd.as_fd(), &dir_parts)?;
    for (source, archive) in sources.iter().zip(archives) {
        if archive {
            w.unpack_archive(source.parent.as_fd(), &source.name_c, &dest_dir)?;
            continue;
        }
        let target = match (&file_name, source.is_dir) {
            (Some(name), _) => dest_dir.join(std::ffi::OsStr::from_bytes(name.to_bytes())),
            // A directory's contents go into the destination, not the directory itself.
            (None, true) => dest_dir.clone(),
            (None, false) => dest_dir.join(&source.name),
        };
        if source.is_dir {
            let dir = openat_dir(source.parent.as_fd(), &source.name_c)
                .map_err(|e| format!("{}: {e}", source.name.display()))?;
            w.copy_dir(dir, &target)?;
        } else {
            w.copy_entry(source.parent.as_fd(), &source.name_c, &target)?;
        }
    }
    w.tar
        .finish()
        .map_err(|e| format!("writing the layer: {e}"))?;
    Ok(w.done)
}

/// Writes the layer that makes the directory `dest` (absolute) of the tree at `tree`, and its
/// missing parents, owned by `owner`, to `out`; `false` (and nothing written) when the tree
/// has it already.
pub fn dir_layer(
    tree: &Path,
    dest: &str,
    owner: (u32, u32),
    out: impl Write,
) -> Result<bool, String> {
    let tree_fd = open_dir(tree).map_err(|e| format!("opening the image: {e}"))?;
    let parts =
        components(dest).ok_or_else(|| format!("the directory {dest} leaves the image's root"))?;
    if is_dir_in(tree_fd.as_fd(), &parts) {
        return Ok(false);
    }
    let mut w = Writer {
        tar: tar::Builder::new(out),
        owner,
        mode: None,
        done: Copied::default(),
    };
    w.directories(tree_fd.as_fd(), &parts)?;
    w.tar
        .finish()
        .map_err(|e| format!("writing the layer: {e}"))?;
    Ok(true)
}

/// The owner and group `spec` (`user`, `user:group`, `uid:gid`, names or numbers) names in the
/// image at `tree`; a user's own group when no group is given.
pub fn resolve_owner(tree: &Path, spec: &str) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(format!(
            "--chown={spec}: expected user, user:group or uid:gid"
        ));
    }
    let root = open_dir(tree).map_err(|e| format!("opening the image: {e}"))?;
    let passwd = || account_file(root.as_fd(), c"etc/passwd");
    let (uid, own_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) => {
            let (uid, gid) = find_account(&passwd()?, user, 2, Some(3))
                .ok_or_else(|| format!("--chown: no user {user} in the image's /etc/passwd"))?;
            (uid, gid)
        }
    };
    let gid = match group {
        None => own_gid.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = account_file(root.as_fd(), c"etc/group")?;
                find_account(&groups, g, 2, None)
                    .map(|(gid, _)| gid)
                    .ok_or_else(|| format!("--chown: no group {g} in the image's /etc/group"))?
            }
        },
    };
    Ok((uid, gid))
}

/// The regular file `path` of the image (as the sandbox resolves it), at most
/// [`MAX_ACCOUNT_FILE`] bytes.
fn account_file(root: BorrowedFd<'_>, path: &CStr) -> Result<String, String> {
    let shown = path.to_string_lossy();
    let fd = open_in_root(root, path, libc::O_RDONLY | libc::O_NONBLOCK)
        .map_err(|e| format!("--chown: reading the image's /{shown}: {e}"))?;
    let st = fstat(fd.as_fd()).map_err(|e| format!("reading /{shown}: {e}"))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(format!("--chown: the image's /{shown} is not a file"));
    }
    let mut text = String::new();
    io::Read::read_to_string(
        &mut io::Read::take(std::fs::File::from(fd), MAX_ACCOUNT_FILE),
        &mut text,
    )
    .map_err(|e| format!("--chown: reading the image's /{shown}: {e}"))?;
    Ok(text)
}

/// The numeric fields `id_field` (and `gid_field`) of the line of `file` (`name:x:…`) for
/// `name`.
fn find_account(
    file: &str,
    name: &str,
    id_field: usize,
    gid_field: Option<usize>,
) -> Option<(u32, Option<u32>)> {
    file.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() != Some(&name) {
            return None;
        }
        let id = fields.get(id_field)?.parse().ok()?;
        let gid = gid_field.and_then(|f| fields.get(f)?.parse().ok());
        Some((id, gid))
    })
}

/// One source found in the context.
struct Source {
    /// The directory holding it, shared by the sources in it (a glob may match thousands).
    parent: Rc<OwnedFd>,
    /// Its name there.
    name_c: CString,
    /// The same, as a path component of the layer.
    name: PathBuf,
    /// It is a directory.
    is_dir: bool,
}

/// `path`'s components: `.` and empty ones dropped, `..` taking one off; `None` when a `..`
/// would leave the root.
fn components(path: &str) -> Option<Vec<CString>> {
    let mut out: Vec<CString> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            p => out.push(CString::new(p).ok()?),
        }
    }
    Some(out)
}

/// The entries of the context that `source` names or matches, sorted by path.
fn find_sources(context: BorrowedFd<'_>, source: &str) -> Result<Vec<Source>, String> {
    let parts =
        components(source).ok_or_else(|| format!("{source} reaches outside the build context"))?;
    // The directories reached so far, each with its path (for messages).
    let mut dirs: Vec<(OwnedFd, String)> = vec![(
        openat_dir(context, c".").map_err(|e| format!("opening the build context: {e}"))?,
        String::new(),
    )];
    let Some((last, walk)) = parts.split_last() else {
        // The context's root itself.
        let (dir, _) = dirs.remove(0);
        return Ok(vec![Source {
            parent: Rc::new(dir),
            name_c: c".".to_owned(),
            name: PathBuf::new(),
            is_dir: true,
        }]);
    };
    for part in walk {
        let mut next = Vec::new();
        if dirs.len() > MAX_OPEN_DIRS {
            return Err(format!(
                "{source} passes through more than {MAX_OPEN_DIRS} directories; name fewer"
            ));
        }
        for (dir, at) in &dirs {
            for name in matching(dir.as_fd(), part, at)? {
                let shown = format!("{at}{}/", name.to_string_lossy());
                match openat_dir(dir.as_fd(), &name) {
                    Ok(d) => next.push((d, shown)),
                    // A glob passes over what is not a directory; a plain name must be one.
                    Err(_) if has_glob(part) => {}
                    Err(e) => {
                        return Err(format!(
                            "{source}: {shown} is not a directory of the build context ({e}); \
                             links in the context are never followed"
                        ));
                    }
                }
            }
        }
        dirs = next;
    }
    let mut found = Vec::new();
    for (dir, at) in dirs {
        let dir = Rc::new(dir);
        for name in matching(dir.as_fd(), last, &at)? {
            let st = fstatat(dir.as_fd(), &name, libc::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| format!("{source}: {at}{}: {e}", name.to_string_lossy()))?;
            found.push(Source {
                parent: dir.clone(),
                name: PathBuf::from(std::ffi::OsStr::from_bytes(name.as_bytes())),
                name_c: name,
                is_dir: st.st_mode & libc::S_IFMT == libc::S_IFDIR,
            });
        }
    }
    Ok(found)
}

/// The names in `dir` that `pattern` matches, sorted; a pattern without glob characters is
/// the name itself when it exists.
fn matching(dir: BorrowedFd<'_>, pattern: &CStr, at: &str) -> Result<Vec<CString>, String> {
    let text = pattern.to_string_lossy();
    if !has_glob(pattern) {
        return match fstatat(dir, pattern, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(vec![pattern.to_owned()]),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
            Err(e) => Err(format!("{at}{text}: {e}")),
        };
    }
    let mut names: Vec<CString> = list_dir(dir)
        .map_err(|e| format!("listing {at}: {e}"))?
        .into_iter()
        .filter(|n| glob_match(pattern.to_bytes(), n.to_bytes()))
        .collect();
    names.sort();
    Ok(names)
}

/// Whether `part` has glob characters.
fn has_glob(part: &CStr) -> bool {
    part.to_bytes()
        .iter()
        .any(|b| matches!(b, b'*' | b'?' | b'['))
}

/// Whether `name` matches the glob `pattern` (`*`, `?`, `[a-z]`, `[!a]`, `[^a]`, `\x`), which
/// has no `/`.
pub fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    // Iterative, with one backtrack point for the last `*`: linear enough for any input.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
                continue;
            }
            Some(b'?') => {
                p += 1;
                n += 1;
                continue;
            }
            Some(b'[') => {
                if let Some((matched, len)) = class_match(&pattern[p..], name[n])
                    && matched
                {
                    p += len;
                    n += 1;
                    continue;
                }
            }
            Some(b'\\') if pattern.get(p + 1) == Some(&name[n]) => {
                p += 2;
                n += 1;
                continue;
            }
            Some(&c) if c == name[n] && c != b'\\' => {
                p += 1;
                n += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, sn)) => {
                p = sp + 1;
                n = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether the class at the start of `pattern` (`[…]`) matches `c`, and the class's length;
/// `None` when the class is not closed (then `[` matches nothing).
fn class_match(pattern: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negated = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negated {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let lo = *pattern.get(i)?;
        if lo == b']' && !first {
            return Some((matched != negated, i + 1));
        }
        first = false;
        let lo = if lo == b'\\' {
            i += 1;
            *pattern.get(i)?
        } else {
            lo
        };
        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|&h| h != b']') {
            let hi = *pattern.get(i + 2)?;
            matched |= (lo..=hi).contains(&c);
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
}

/// The regular file `name` of `dir` as a reader of its tar bytes: gunzipped when it is
/// gzipped.
fn archive_reader(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Box<dyn io::Read>> {
    // Not blocking: a FIFO of that name would otherwise hold the thread until a writer came.
    let fd = openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        0,
    )?;
    let st = fstat(fd.as_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::other("not a regular file"));
    }
    let mut file = io::BufReader::new(std::fs::File::from(fd));
    let gzipped = io::BufRead::fill_buf(&mut file)?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzipped {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

/// Whether the file `name` of `dir` is a tar archive (plain or gzipped): its first header
/// says `ustar` and has a valid checksum.
fn is_archive(dir: BorrowedFd<'_>, name: &CStr) -> bool {
    let Ok(mut reader) = archive_reader(dir, name) else {
        return false;
    };
    let mut block = [0u8; 512];
    if io::Read::read_exact(&mut reader, &mut block).is_err() {
        return false;
    }
    let header = Header::from_byte_slice(&block);
    block[257..262] == *b"ustar"
        && header
            .cksum()
            .is_ok_and(|sum| sum == header_checksum(&block))
}

/// The checksum a tar header's bytes give (its checksum field counted as spaces).
fn header_checksum(block: &[u8; 512]) -> u32 {
    block
        .iter()
        .enumerate()
        .map(|(i, &b)| u32::from(if (148..156).contains(&i) { b' ' } else { b }))
        .sum()
}

/// An archive entry's path as components below the destination, or `None` when it climbs
/// out of it.
fn archive_path(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

/// Whether `parts` (of the tree) is a directory, as the sandbox would resolve it.
fn is_dir_in(tree: BorrowedFd<'_>, parts: &[CString]) -> bool {
    let Ok(path) = joined(parts) else {
        return false;
    };
    open_in_root(tree, &path, libc::O_PATH)
        .and_then(|fd| fstat(fd.as_fd()))
        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

/// `parts` as one relative path (`.` for none).
fn joined(parts: &[CString]) -> Result<CString, String> {
    if parts.is_empty() {
        return Ok(c".".to_owned());
    }
    let bytes: Vec<u8> = parts
        .iter()
        .map(|p| p.to_bytes())
        .collect::<Vec<_>>()
        .join(&b'/');
    CString::new(bytes).map_err(|_| "a path with a NUL byte".to_owned())
}

/// The archive being written.
struct Writer<W: Write> {
    tar: tar::Builder<W>,
    owner: (u32, u32),
    mode: Option<u32>,
    done: Copied,
}

impl<W: Write> Writer<W> {
    /// Writes the directories of `parts` (the destination directory, in the tree), resolved
    /// as the sandbox would, and returns the resolved path in the layer.
    fn directories(&mut self, tree: BorrowedFd<'_>, parts: &[CString]) -> Result<PathBuf, String> {
        let root_path = fd_path(tree).map_err(|e| format!("locating the image: {e}"))?;
        // The longest prefix that exists, resolved.
        let mut found = 0;
        let mut resolved = PathBuf::new();
        for k in (1..=parts.len()).rev() {
            let Ok(fd) = open_in_root(tree, &joined(&parts[..k])?, libc::O_PATH) else {
                continue;
            };
            let st = fstat(fd.as_fd()).map_err(|e| format!("reading the image: {e}"))?;
            let shown = format!("/{}", joined(&parts[..k])?.to_string_lossy());
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                return Err(format!(
                    "the destination's {shown} is not a directory in the image"
                ));
            }
            let host = fd_path(fd.as_fd()).map_err(|e| format!("locating {shown}: {e}"))?;
            resolved = host
                .strip_prefix(&root_path)
                .map_err(|_| format!("{shown} resolves outside the image"))?
                .to_owned();
            found = k;
            break;
        }
        // Each directory on the resolved way, as the tree has it.
        let mut at = PathBuf::new();
        for part in resolved.components() {
            at.push(part);
            let path = CString::new(at.as_os_str().as_bytes())
                .map_err(|_| "a path with a NUL byte".to_owned())?;
            let fd = open_in_root(tree, &path, libc::O_PATH | libc::O_NOFOLLOW)
                .map_err(|e| format!("reading /{}: {e}", at.display()))?;
            let st = fstat(fd.as_fd()).map_err(|e| format!("reading /{}: {e}", at.display()))?;
            let mut h = header(EntryType::Directory, &st);
            h.set_size(0);
            self.append(h, &at, io::empty())?;
        }
        // The ones still to make.
        for part in &parts[found..] {
            at.push(std::ffi::OsStr::from_bytes(part.to_bytes()));
            let mut h = Header::new_gnu();
            h.set_entry_type(EntryType::Directory);
            h.set_mode(0o755);
            h.set_uid(u64::from(self.owner.0));
            h.set_gid(u64::from(self.owner.1));
            h.set_mtime(0);
            h.set_size(0);
            self.append(h, &at, io::empty())?;
        }
        Ok(at)
    }

    /// Copies what is in the context directory `dir` to `target` of the layer, depth first.
    fn copy_dir(&mut self, dir: OwnedFd, target: &Path) -> Result<(), String> {
        let first = openat_dir(dir.as_fd(), c".").map_err(|e| format!("{e}"))?;
        let mut stack: Vec<(OwnedFd, PathBuf, std::vec::IntoIter<CString>)> = vec![(
            first,
            target.to_owned(),
            sorted_names(dir.as_fd())?.into_iter(),
        )];
        while let Some((dir, at, names)) = stack.last_mut() {
            let Some(name) = names.next() else {
                stack.pop();
                continue;
            };
            let path = at.join(std::ffi::OsStr::from_bytes(name.as_bytes()));
            let is_dir = self.copy_entry(dir.as_fd(), &name, &path)?;
            if is_dir {
                let sub = openat_dir(dir.as_fd(), &name)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let names = sorted_names(sub.as_fd())?;
                stack.push((sub, path, names.into_iter()));
            }
        }
        Ok(())
    }

    /// Copies the entry `name` of `dir` (not followed if a link) to `path` of the layer;
    /// whether it is a directory (whose contents the caller copies next).
    fn copy_entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        path: &Path,
    ) -> Result<bool, String> {
        let shown = || path.display().to_string();
        let st = fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| format!("{}: {e}", shown()))?;
        let kind = st.st_mode & libc::S_IFMT;
        self.done.entries += 1;
        match kind {
            libc::S_IFDIR => {
                let mut h = self.owned(header(EntryType::Directory, &st));
                h.set_size(0);
                self.append(h, path, io::empty())?;
                Ok(true)
            }
            libc::S_IFREG => {
                // Not blocking, and checked again once open: what was looked at may have
                // been replaced by a FIFO, which would hold the thread until a writer came.
                let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
                let file = openat(dir, name, flags, 0).map_err(|e| format!("{}: {e}", shown()))?;
                // The size of what was opened, not of an earlier look.
                let st = fstat(file.as_fd()).map_err(|e| format!("{}: {e}", shown()))?;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(format!("{}: changed while it was copied", shown()));
                }
                let size = u64::try_from(st.st_size).unwrap_or(0);
                let mut h = self.owned(header(EntryType::Regular, &st));
                h.set_size(size);
                self.done.bytes += size;
                self.append(h, path, io::Read::take(std::fs::File::from(file), size))?;
                Ok(false)
            }
            libc::S_IFLNK => {
                let target = readlinkat(dir, name).map_err(|e| format!("{}: {e}", shown()))?;
                let mut h = header(EntryType::Symlink, &st);
                h.set_uid(u64::from(self.owner.0));
                h.set_gid(u64::from(self.owner.1));
                h.set_size(0);
                self.tar
                    .append_link(
                        &mut h,
                        path,
                        Path::new(std::ffi::OsStr::from_bytes(target.as_bytes())),
                    )
                    .map_err(|e| format!("writing {}: {e}", shown()))?;
                Ok(false)
            }
            libc::S_IFIFO => {
                let mut h = self.owned(header(EntryType::Fifo, &st));
                h.set_size(0);
                self.append(h, path, io::empty())?;
                Ok(false)
            }
            _ => {
                // Nothing else comes out of an unpacked context; left out if it did.
                self.done.entries -= 1;
                Ok(false)
            }
        }
    }

    /// Unpacks the tar archive `name` of `dir` (plain or gzipped) into `base` of the layer,
    /// keeping its entries' owners, modes and times; device nodes are left out, and an entry
    /// that climbs out of `base`, or a sparse one, fails the copy.
    fn unpack_archive(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        base: &Path,
    ) -> Result<(), String> {
        let shown = name.to_string_lossy().into_owned();
        let fail = |e: io::Error| format!("ADD {shown}: {e}");
        let mut archive = tar::Archive::new(archive_reader(dir, name).map_err(fail)?);
        let mut names = Names::default();
        let mut after = String::new();
        // Raw: long names and pax headers are read within a bound, not whole.
        for entry in archive.entries().map_err(fail)?.raw(true) {
            let mut entry = entry.map_err(fail)?;
            if names
                .take_extension(&mut entry, &after)
                .map_err(|e| format!("ADD {shown}: {e}"))?
            {
                continue;
            }
            let raw = PathBuf::from(std::ffi::OsString::from_vec(names.path_of(&entry)));
            after = raw.display().to_string();
            let link = names.link_of(&entry).map(|l| l.into_owned());
            names = Names::default();
            let rel = archive_path(&raw).ok_or_else(|| {
                format!(
                    "ADD {shown}: {} climbs out of the destination",
                    raw.display()
                )
            })?;
            if rel.as_os_str().is_empty() {
                continue;
            }
            let path = base.join(&rel);
            let from = entry.header();
            let mut h = Header::new_gnu();
            h.set_mode(from.mode().map_err(fail)? & 0o7777);
            h.set_uid(from.uid().map_err(fail)?);
            h.set_gid(from.gid().map_err(fail)?);
            h.set_mtime(from.mtime().unwrap_or(0));
            h.set_size(0);
            let kind = from.entry_type();
            self.done.entries += 1;
            match kind {
                EntryType::Directory => {
                    h.set_entry_type(EntryType::Directory);
                    self.append(h, &path, io::empty())?;
                }
                EntryType::Regular | EntryType::Continuous => {
                    let size = entry.size();
                    h.set_entry_type(EntryType::Regular);
                    h.set_size(size);
                    self.done.bytes += size;
                    self.append(h, &path, &mut entry)?;
                }
                EntryType::Symlink | EntryType::Link => {
                    let target = link
                        .map(|l| PathBuf::from(std::ffi::OsString::from_vec(l)))
                        .ok_or_else(|| format!("ADD {shown}: a link without its target"))?;
                    // A hard link names another entry of the archive: below `base` too.
                    let target =
                        if kind == EntryType::Link {
                            base.join(archive_path(&target).ok_or_else(|| {
                                format!("ADD {shown}: a link out of the destination")
                            })?)
                        } else {
                            target
                        };
                    h.set_entry_type(kind);
                    self.tar
                        .append_link(&mut h, &path, &target)
                        .map_err(|e| format!("writing {}: {e}", path.display()))?;
                }
                EntryType::Fifo => {
                    h.set_entry_type(EntryType::Fifo);
                    self.append(h, &path, io::empty())?;
                }
                EntryType::GNUSparse => {
                    return Err(format!(
                        "ADD {shown}: {} is a sparse file, which moat does not unpack",
                        raw.display()
                    ));
                }
                // Devices and the like: nothing a sandbox may have.
                _ => self.done.entries -= 1,
            }
        }
        Ok(())
    }

    /// `h` with the copy's owner and mode.
    fn owned(&self, mut h: Header) -> Header {
        h.set_uid(u64::from(self.owner.0));
        h.set_gid(u64::from(self.owner.1));
        if let Some(mode) = self.mode {
            h.set_mode(mode & 0o7777);
        }
        h
    }

    fn append(&mut self, mut h: Header, path: &Path, data: impl io::Read) -> Result<(), String> {
        self.tar
            .append_data(&mut h, path, data)
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }
}

/// The names in `dir`, sorted (so the archive is the same every time).
fn sorted_names(dir: BorrowedFd<'_>) -> Result<Vec<CString>, String> {
    let mut names = list_dir(dir).map_err(|e| format!("listing the build context: {e}"))?;
    names.sort();
    Ok(names)
}

/// A header of `kind` with the permission bits and time of `st` (owner set by the caller).
fn header(kind: EntryType, st: &libc::stat) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(u64::from(st.st_uid));
    h.set_gid(u64::from(st.st_gid));
    h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A FIFO in a build context is not an archive, and looking costs no wait for a writer.
    #[test]
    fn a_fifo_is_no_archive_and_no_wait() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = CString::new(dir.path().join("fifo").into_os_string().into_vec()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let path = dir.path().to_owned();
        std::thread::spawn(move || {
            let d = open_dir(&path).unwrap();
            let _ = tx.send(is_archive(d.as_fd(), c"fifo"));
        });
        let answer = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(answer, Ok(false), "still waiting for a writer");
    }

    #[test]
    fn globs_match_as_docker_s_do() {
        assert!(glob_match(b"*.py", b"main.py"));
        assert!(!glob_match(b"*.py", b"main.pyc"));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(glob_match(b"[a-c]x", b"bx"));
        assert!(!glob_match(b"[!a-c]x", b"bx"));
        assert!(glob_match(b"[^a]x", b"bx"));
        assert!(glob_match(b"\\*", b"*"));
        assert!(!glob_match(b"\\*", b"a"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a*b*c", b"aXXbYYc"));
        assert!(
            !glob_match(b"[abc", b"a"),
            "an unclosed class matches nothing"
        );
        assert!(glob_match(b"[]]", b"]"));
        // Many stars on a long name finish quickly.
        let name = vec![b'a'; 4096];
        assert!(!glob_match(b"*a*a*a*a*a*b", &name));
    }

    #[test]
    fn components_stay_inside_the_root() {
        let c = |s: &str| {
            components(s).map(|v| {
                v.iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            c("/a/./b//c/"),
            Some(vec!["a".into(), "b".into(), "c".into()])
        );
        assert_eq!(c("a/../b"), Some(vec!["b".into()]));
        assert_eq!(c("../x"), None);
        assert_eq!(c("/"), Some(vec![]));
    }

    #[test]
    fn archive_entries_stay_below_the_destination() {
        assert_eq!(archive_path(Path::new("./a/b")), Some(PathBuf::from("a/b")));
        assert_eq!(
            archive_path(Path::new("/etc/x")),
            Some(PathBuf::from("etc/x"))
        );
        assert_eq!(archive_path(Path::new("a/../b")), Some(PathBuf::from("b")));
        assert_eq!(archive_path(Path::new("../x")), None);
        assert_eq!(archive_path(Path::new("a/../../x")), None);
    }

    /// A tar whose first entry is a GNU long name of `name_len` bytes naming the file
    /// after it, and a long link for the symlink after that.
    fn long_named_archive(name_len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |kind: EntryType, name: &[u8], link: &[u8], data: &[u8]| {
            let mut h = Header::new_gnu();
            h.set_entry_type(kind);
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
            h.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        };
        let long = "d/".repeat(name_len / 2) + "f";
        put(
            EntryType::GNULongName,
            b"././@LongLink",
            b"",
            long.as_bytes(),
        );
        put(EntryType::Regular, b"short", b"", b"hi");
        put(
            EntryType::GNULongLink,
            b"././@LongLink",
            b"",
            b"target-of-the-link",
        );
        put(EntryType::Symlink, b"ln", b"t", b"");
        out.resize(out.len() + 1024, 0);
        out
    }

    /// The paths and link targets of the layer `ADD a.tar /x/` writes.
    fn add_archive(archive: &[u8]) -> Result<Vec<(String, Option<String>)>, String> {
        let context = tempfile::tempdir().unwrap();
        let tree = tempfile::tempdir().unwrap();
        std::fs::write(context.path().join("a.tar"), archive).unwrap();
        let spec = CopySpec {
            sources: vec!["a.tar".into()],
            dest: "/x/".into(),
            owner: (0, 0),
            mode: None,
            unpack_archives: true,
        };
        let mut layer = Vec::new();
        copy_layer(context.path(), tree.path(), &spec, &mut layer)?;
        let mut read = tar::Archive::new(&layer[..]);
        Ok(read
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let link = e
                    .link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().into_owned());
                (e.path().unwrap().to_string_lossy().into_owned(), link)
            })
            .filter(|(p, _)| p != "x" && p != "x/")
            .collect())
    }

    #[test]
    fn an_added_archive_s_long_names_are_read_within_a_bound() {
        let entries = add_archive(&long_named_archive(300)).unwrap();
        let long = "d/".repeat(150) + "f";
        assert_eq!(
            entries,
            [
                (format!("x/{long}"), None),
                ("x/ln".into(), Some("target-of-the-link".into()))
            ]
        );
        // A long name of a mebibyte (a gzipped one could be gigabytes) is refused, unread.
        let e = add_archive(&long_named_archive(1 << 20)).unwrap_err();
        assert!(e.contains("a long name or pax header may have"), "{e}");
    }

    #[test]
    fn accounts_are_found_by_name() {
        let passwd = "root:x:0:0::/root:/bin/sh\napp:x:1001:1002::/home/app:/bin/sh\n";
        assert_eq!(
            find_account(passwd, "app", 2, Some(3)),
            Some((1001, Some(1002)))
        );
        assert_eq!(find_account(passwd, "nobody", 2, Some(3)), None);
        assert_eq!(find_account("bad", "bad", 2, None), None);
    }
}
