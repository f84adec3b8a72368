//! An image's unpacked layers merged into one directory tree: the read-only root (overlay
//! lower) of the image's sandboxes.
//!
//! Layers apply in order, first the base, the way an overlay would show them. For each layer:
//! its opaque directories are emptied in the tree (kept themselves), its whiteouts removed (with
//! what is beneath; a missing path is fine), and the paths of its skipped devices too, since in
//! the image the device replaces what the layers below had there; then its files are added,
//! depth first:
//!
//! - a directory is made, or kept and given the layer's owner, mode and times (set after its
//!   children, which change its time); anything else in its way is removed;
//! - a regular file is hard-linked from the layer, so images sharing a layer share its data on
//!   disk (copied instead, with the same owner, mode and times, if `linkat` says `EXDEV` or
//!   `EMLINK`); what held its name is removed first, so nothing is written through a link;
//! - symbolic links and FIFOs are made anew with the same owner, mode and target.
//!
//! As in [`super::unpack`], everything goes through directory descriptors and `*at` calls, and
//! no symbolic link is followed, in the tree or in a layer. The tree's root keeps its own owner
//! and mode. A merged file's inode is the layer's: the tree must stay read-only, or a change to
//! it would change the layer (and every image sharing it).

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::sys::{
    fstat, fstatat, linkat, list_dir, open_dir, openat, openat_dir, readlinkat, symlinkat,
};
use super::unpack::{
    Attrs, LayerIndex, UnpackError, create_file, empty_dir, ensure_dir, entry_parts, is_absent,
    is_type, make_fifo, remove_tree, walk,
};

/// One unpacked layer: its directory and its index, as [`super::unpack::unpack_layer`] made
/// them.
#[derive(Debug, Clone, Copy)]
pub struct Layer<'a> {
    /// The directory the layer was unpacked into.
    pub root: &'a Path,
    /// What the layer holds beyond its files.
    pub index: &'a LayerIndex,
}

/// Builds in `dest`, an existing empty directory, the merged view of `layers` applied in order
/// (the first is the base).
pub fn merge_layers(layers: &[Layer<'_>], dest: &Path) -> Result<(), UnpackError> {
    let tree = open_dir(dest).map_err(|e| {
        UnpackError::io(
            dest.display().to_string(),
            "opening the destination directory",
            e,
        )
    })?;
    for layer in layers {
        merge_layer(layer, tree.as_fd())?;
    }
    Ok(())
}

/// Applies one layer over `tree`.
fn merge_layer(layer: &Layer<'_>, tree: BorrowedFd<'_>) -> Result<(), UnpackError> {
    let src = open_dir(layer.root).map_err(|e| {
        UnpackError::io(
            layer.root.display().to_string(),
            "opening the layer's directory",
            e,
        )
    })?;
    for path in &layer.index.opaque_dirs {
        empty_opaque(tree, path)?;
    }
    let hidden = layer.index.whiteouts.iter();
    for path in hidden.chain(&layer.index.skipped_devices) {
        remove_hidden(tree, path)?;
    }
    copy_tree(src.as_fd(), tree, layer.root)
}

/// An index path as components; `""` is the root.
fn index_parts(path: &str) -> Result<Vec<CString>, UnpackError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    entry_parts(path.as_bytes()).map_err(|reason| UnpackError::BadPath {
        path: path.into(),
        reason,
    })
}

/// Empties the opaque directory `path` of `tree`, if it is one there.
fn empty_opaque(tree: BorrowedFd<'_>, path: &str) -> Result<(), UnpackError> {
    let parts = index_parts(path)?;
    match walk(tree, &parts, false) {
        Ok(dir) => empty_dir(dir).map_err(|e| UnpackError::io(path, "emptying", e)),
        // Nothing below to hide: the layer makes the directory.
        Err(e) if is_absent(&e) => Ok(()),
        Err(e) => Err(UnpackError::io(path, "opening", e)),
    }
}

/// Removes `path` from `tree`, with what is beneath; missing (or beneath a non-directory,
/// which is never followed) is fine.
fn remove_hidden(tree: BorrowedFd<'_>, path: &str) -> Result<(), UnpackError> {
    let parts = index_parts(path)?;
    let Some((name, dirs)) = parts.split_last() else {
        return Err(UnpackError::BadPath {
            path: path.into(),
            reason: "a whiteout of the root",
        });
    };
    match walk(tree, dirs, false) {
        Ok(parent) => {
            remove_tree(parent.as_fd(), name).map_err(|e| UnpackError::io(path, "removing", e))
        }
        Err(e) if is_absent(&e) => Ok(()),
        Err(e) => Err(UnpackError::io(path, "opening", e)),
    }
}

/// A directory being merged: the layer's and the tree's, the names left to merge, and the
/// attributes the tree's directory gets once they are in (none for the root).
struct Frame {
    src: OwnedFd,
    dst: OwnedFd,
    /// Relative to the layer's root, for errors.
    path: PathBuf,
    names: Vec<CString>,
    attrs: Option<Attrs>,
}

/// Adds the files of the layer directory `src` to `tree`, depth first. Iterative, so a deep
/// tree cannot exhaust the stack (it holds two descriptors per level).
fn copy_tree(src: BorrowedFd<'_>, tree: BorrowedFd<'_>, root: &Path) -> Result<(), UnpackError> {
    let here = Path::new("");
    let mut stack = vec![Frame {
        src: src
            .try_clone_to_owned()
            .map_err(io_at(root, here, "opening"))?,
        dst: tree
            .try_clone_to_owned()
            .map_err(io_at(root, here, "opening"))?,
        path: PathBuf::new(),
        names: list_dir(src).map_err(io_at(root, here, "listing"))?,
        attrs: None,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.pop() else {
            if let Some(Frame {
                dst,
                path,
                attrs: Some(attrs),
                ..
            }) = stack.pop()
            {
                attrs.apply(dst.as_fd()).map_err(io_at(
                    root,
                    &path,
                    "setting owner, mode and time",
                ))?;
            }
            continue;
        };
        let path = top.path.join(OsStr::from_bytes(name.to_bytes()));
        let (src, dst) = (top.src.as_fd(), top.dst.as_fd());
        let st = fstatat(src, &name, libc::AT_SYMLINK_NOFOLLOW)
            .map_err(io_at(root, &path, "reading"))?;
        let attrs = Attrs::from_stat(&st);
        if is_type(&st, libc::S_IFDIR) {
            let frame = Frame {
                dst: ensure_dir(dst, &name).map_err(io_at(root, &path, "making the directory"))?,
                src: openat_dir(src, &name).map_err(io_at(root, &path, "opening"))?,
                names: Vec::new(),
                path,
                attrs: Some(attrs),
            };
            let names = list_dir(frame.src.as_fd()).map_err(io_at(root, &frame.path, "listing"))?;
            stack.push(Frame { names, ..frame });
        } else if is_type(&st, libc::S_IFREG) {
            link_file(src, dst, &name, &attrs).map_err(io_at(root, &path, "linking the file"))?;
        } else if is_type(&st, libc::S_IFLNK) {
            copy_symlink(src, dst, &name, &attrs).map_err(io_at(
                root,
                &path,
                "making the symbolic link",
            ))?;
        } else if is_type(&st, libc::S_IFIFO) {
            remove_tree(dst, &name).map_err(io_at(root, &path, "removing what was there"))?;
            let fifo = make_fifo(dst, &name).map_err(io_at(root, &path, "making the FIFO"))?;
            attrs.apply(fifo.as_fd()).map_err(io_at(
                root,
                &path,
                "setting owner, mode and time",
            ))?;
        } else {
            return Err(UnpackError::UnsupportedType {
                path: root.join(&path).display().to_string(),
                kind: format!("file type {:o}", st.st_mode & libc::S_IFMT),
            });
        }
    }
    Ok(())
}

/// The error of doing `what` to `path` of the layer at `root`.
fn io_at<'a>(
    root: &'a Path,
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |e| UnpackError::io(root.join(path).display().to_string(), what, e)
}

/// Hard-links the regular file `name` of `src` into `dst`, replacing what was there; copies it
/// if the two are on different filesystems or the file has all the links it may.
fn link_file(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &CStr,
    attrs: &Attrs,
) -> io::Result<()> {
    remove_tree(dst, name)?;
    match linkat(src, name, dst, name) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EMLINK)) => {
            copy_file(src, dst, name, attrs)
        }
        other => other,
    }
}

/// Copies the regular file `name` of `src` to a new file in `dst`, with `attrs`.
fn copy_file(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &CStr,
    attrs: &Attrs,
) -> io::Result<()> {
    // Non-blocking: were it swapped for a FIFO, the open would not wait for a writer.
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let mut from = File::from(openat(src, name, flags, 0)?);
    if !is_type(&fstat(from.as_fd())?, libc::S_IFREG) {
        return Err(io::Error::other("not a regular file any more"));
    }
    let mut to = File::from(create_file(dst, name)?);
    io::copy(&mut from, &mut to)?;
    attrs.apply(to.as_fd())
}

/// Makes in `dst` a symbolic link like `name` of `src`: same target and attributes; what was
/// there is replaced.
fn copy_symlink(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &CStr,
    attrs: &Attrs,
) -> io::Result<()> {
    let target = readlinkat(src, name)?;
    remove_tree(dst, name)?;
    symlinkat(&target, dst, name)?;
    attrs.apply_to_link(dst, name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::PathBuf;

    use tar::EntryType;

    use super::*;
    use crate::images::unpack::tests::{Dest, MTIME, Tar, listing, unpack};

    /// A layer unpacked into a directory of its own.
    struct Unpacked {
        dir: Dest,
        index: LayerIndex,
    }

    impl Unpacked {
        fn new(tar: Vec<u8>) -> Self {
            let dir = Dest::new();
            let index = unpack(&tar, &dir.path()).unwrap();
            Unpacked { dir, index }
        }

        fn root(&self) -> PathBuf {
            self.dir.path()
        }
    }

    fn merge(layers: &[&Unpacked]) -> Result<Dest, UnpackError> {
        let roots: Vec<PathBuf> = layers.iter().map(|l| l.root()).collect();
        let layers: Vec<Layer<'_>> = layers
            .iter()
            .zip(&roots)
            .map(|(l, root)| Layer {
                root,
                index: &l.index,
            })
            .collect();
        let dest = Dest::new();
        merge_layers(&layers, &dest.path())?;
        Ok(dest)
    }

    fn meta(path: PathBuf) -> std::fs::Metadata {
        std::fs::symlink_metadata(path).unwrap()
    }

    fn set(paths: &[&str]) -> std::collections::BTreeSet<String> {
        paths.iter().map(|p| p.to_string()).collect()
    }

    fn base() -> Unpacked {
        Unpacked::new(
            Tar::new()
                .dir("etc/", 0o755)
                .file("etc/a", 0o644, b"a1")
                .file("etc/b", 0o644, b"b1")
                .dir("opt/", 0o755)
                .file("opt/x/y", 0o644, b"y")
                .file("opt/x/sub/z", 0o644, b"z")
                .file("usr/bin/tool", 0o755, b"tool")
                .symlink("bin", "usr/bin")
                .fifo("run/fifo")
                .file("dev/null", 0o644, b"a file the device replaces")
                .file("gone/deep/file", 0o644, b"")
                .finish(),
        )
    }

    fn top() -> Unpacked {
        Unpacked::new(
            Tar::new()
                .file("etc/.wh.a", 0o644, b"")
                .file("etc/b", 0o600, b"b2")
                .file("etc/c", 0o644, b"c")
                .owned_dir("opt/", 0o750, 1000)
                .file("opt/x/.wh..wh..opq", 0o644, b"")
                .file("opt/x/new", 0o644, b"new")
                .file(".wh.gone", 0o644, b"")
                .file(".wh.never-there", 0o644, b"")
                .device("dev/null", EntryType::Char)
                .finish(),
        )
    }

    #[test]
    fn layers_merge_as_an_overlay_shows_them() {
        let (base, top) = (base(), top());
        let merged = merge(&[&base, &top]).unwrap();
        let m = merged.path();

        assert_eq!(
            listing(&m),
            set(&[
                "bin",
                "dev",
                "etc",
                "etc/b",
                "etc/c",
                "opt",
                "opt/x",
                "opt/x/new",
                "run",
                "run/fifo",
                "usr",
                "usr/bin",
                "usr/bin/tool",
            ])
        );
        assert_eq!(std::fs::read(m.join("etc/b")).unwrap(), b"b2");
        assert_eq!(meta(m.join("etc/b")).mode() & 0o7777, 0o600);
        assert_eq!(
            std::fs::read_link(m.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert!(meta(m.join("run/fifo")).file_type().is_fifo());
        let opt = meta(m.join("opt"));
        assert_eq!(
            (opt.uid(), opt.gid(), opt.mode() & 0o7777, opt.mtime()),
            (1000, 1000, 0o750, MTIME)
        );
        // `etc` is the top layer's (made there for its files), with its attributes.
        let etc = (meta(m.join("etc")), meta(top.root().join("etc")));
        assert_eq!(
            (etc.0.mtime(), etc.0.mtime_nsec()),
            (etc.1.mtime(), etc.1.mtime_nsec())
        );

        // Files are the layers' own inodes.
        for (merged_file, layer) in [
            ("etc/b", &top),
            ("etc/c", &top),
            ("opt/x/new", &top),
            ("usr/bin/tool", &base),
        ] {
            assert_eq!(
                meta(m.join(merged_file)).ino(),
                meta(layer.root().join(merged_file)).ino(),
                "{merged_file}"
            );
        }
        // The base is untouched.
        assert_eq!(std::fs::read(base.root().join("etc/a")).unwrap(), b"a1");
        assert_eq!(std::fs::read(base.root().join("etc/b")).unwrap(), b"b1");
        assert!(base.root().join("opt/x/y").is_file());
        assert!(base.root().join("opt/x/sub/z").is_file());
        assert!(base.root().join("gone/deep/file").is_file());
        assert!(base.root().join("dev/null").is_file());
        merged.assert_nothing_outside();
    }

    #[test]
    fn replacements_across_types_never_follow_links() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        let base = Unpacked::new(
            Tar::new()
                .symlink("d", outside.path().to_str().unwrap())
                .symlink("f", victim.to_str().unwrap())
                .dir("g/", 0o755)
                .file("g/inner", 0o644, b"")
                .file("h", 0o644, b"")
                .finish(),
        );
        let top = Unpacked::new(
            Tar::new()
                .file("d/victim", 0o644, b"mine")
                .file("f", 0o644, b"mine")
                .file("g", 0o644, b"now a file")
                .dir("h/", 0o755)
                .symlink("h/link", "/etc/shadow")
                .finish(),
        );
        let merged = merge(&[&base, &top]).unwrap();
        let m = merged.path();
        assert_eq!(
            listing(&m),
            set(&["d", "d/victim", "f", "g", "h", "h/link"])
        );
        assert!(meta(m.join("d")).is_dir());
        assert_eq!(std::fs::read(m.join("f")).unwrap(), b"mine");
        assert_eq!(std::fs::read(m.join("g")).unwrap(), b"now a file");
        assert_eq!(
            std::fs::read_link(m.join("h/link")).unwrap(),
            Path::new("/etc/shadow")
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        let names: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn whiteouts_beneath_a_symlink_remove_nothing_through_it() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"").unwrap();
        let base = Unpacked::new(
            Tar::new()
                .symlink("link", outside.path().to_str().unwrap())
                .finish(),
        );
        let mut top = Unpacked::new(Tar::new().finish());
        top.index.whiteouts.push("link/keep".into());
        top.index.opaque_dirs.push("link".into());
        let merged = merge(&[&base, &top]).unwrap();
        assert!(outside.path().join("keep").exists());
        assert!(meta(merged.path().join("link")).file_type().is_symlink());
    }

    #[test]
    fn deep_trees_merge_and_are_replaced() {
        // 2000 levels: far more than a recursive walk would be wise to take.
        let deep = format!("{}f", "a/".repeat(2000));
        let base = Unpacked::new(Tar::new().long_file(&deep).finish());
        let merged = merge(&[&base]).unwrap();
        assert!(merged.path().join(&deep).is_file());

        let top = Unpacked::new(Tar::new().file("a", 0o644, b"flat").finish());
        let merged = merge(&[&base, &top]).unwrap();
        assert_eq!(listing(&merged.path()), set(&["a"]));
        assert!(base.root().join(&deep).is_file());
    }

    #[test]
    fn hostile_index_paths_are_refused() {
        let base = base();
        for (whiteouts, opaque) in [
            (vec!["../x"], vec![]),
            (vec!["a/../../x"], vec![]),
            (vec![""], vec![]),
            (vec![], vec![".."]),
        ] {
            let mut top = Unpacked::new(Tar::new().finish());
            top.index.whiteouts = whiteouts.iter().map(|s| s.to_string()).collect();
            top.index.opaque_dirs = opaque.iter().map(|s| s.to_string()).collect();
            let Err(err) = merge(&[&base, &top]) else {
                panic!("{whiteouts:?} {opaque:?} merged");
            };
            assert!(matches!(err, UnpackError::BadPath { .. }), "{err}");
        }
    }

    #[test]
    fn files_are_copied_across_filesystems() {
        let shm = Path::new("/dev/shm");
        let tmp = std::env::temp_dir();
        let (Ok(shm_meta), Ok(tmp_meta)) = (std::fs::metadata(shm), std::fs::metadata(&tmp)) else {
            return;
        };
        if shm_meta.dev() == tmp_meta.dev() {
            eprintln!("skipped: /dev/shm and {} are one filesystem", tmp.display());
            return;
        }
        let layer_dir = tempfile::tempdir_in(shm).unwrap();
        let tar = Tar::new().file("bin/tool", 0o4755, b"tool").finish();
        let index = unpack(&tar, layer_dir.path()).unwrap();
        let layer = Layer {
            root: layer_dir.path(),
            index: &index,
        };
        let merged = Dest::new();
        merge_layers(&[layer], &merged.path()).unwrap();
        let copy = meta(merged.path().join("bin/tool"));
        let original = meta(layer_dir.path().join("bin/tool"));
        assert_ne!(copy.ino(), original.ino());
        assert_eq!(
            std::fs::read(merged.path().join("bin/tool")).unwrap(),
            b"tool"
        );
        assert_eq!(
            (copy.mode(), copy.uid(), copy.mtime()),
            (original.mode(), original.uid(), original.mtime())
        );
        assert_eq!(copy.mode() & 0o7777, 0o755);
    }
}
