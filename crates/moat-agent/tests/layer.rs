//! The writable layer's archive on the host: what a capture of an overlay's upper directory
//! holds (owners, modes, links, FIFOs, long names, whiteouts, opaque directories) and that a
//! restore applies it, and refuses archives that reach outside the root. Needs root (owners,
//! device nodes, `trusted.` attributes); skips with a printed reason otherwise.

use std::ffi::CString;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use moat_agent::layer::capture::{Holes, capture};
use moat_agent::layer::restore::restore;
use moat_proto::agent_config::WritableLayer;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("path")
}

fn chown(p: &Path, uid: u32, gid: u32) {
    let path = c(p);
    // SAFETY: a valid NUL-terminated path.
    let r = unsafe { libc::lchown(path.as_ptr(), uid, gid) };
    assert_eq!(r, 0, "{}", p.display());
}

fn mknod(p: &Path, mode: u32, dev: u64) {
    let path = c(p);
    // SAFETY: a valid NUL-terminated path.
    let r = unsafe { libc::mknod(path.as_ptr(), mode, dev) };
    assert_eq!(r, 0, "{}", p.display());
}

fn dir_fd(p: &Path) -> fs::File {
    fs::File::open(p).expect("open dir")
}

#[test]
fn an_upper_layer_round_trips() {
    if !is_root() {
        eprintln!("SKIP: needs root");
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("moat-layer-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    fs::create_dir(&src).expect("src");
    fs::create_dir(&dst).expect("dst");

    fs::write(src.join("a"), "alpha").expect("a");
    fs::set_permissions(src.join("a"), fs::Permissions::from_mode(0o640)).expect("chmod");
    chown(&src.join("a"), 1000, 1000);
    fs::hard_link(src.join("a"), src.join("h")).expect("hard link");
    symlink("a", src.join("l")).expect("symlink");
    chown(&src.join("l"), 1000, 1000);
    fs::create_dir(src.join("d")).expect("d");
    fs::set_permissions(src.join("d"), fs::Permissions::from_mode(0o711)).expect("chmod");
    chown(&src.join("d"), 1234, 4321);
    let long = "n".repeat(150);
    fs::write(src.join("d").join(&long), "long").expect("long name");
    mknod(&src.join("p"), libc::S_IFIFO | 0o620, 0);
    fs::set_permissions(src.join("p"), fs::Permissions::from_mode(0o620)).expect("chmod");
    // A whiteout: `gone` was removed from the layer below.
    mknod(&src.join("gone"), libc::S_IFCHR, 0);
    // An opaque directory: what was below it is hidden.
    fs::create_dir(src.join("o")).expect("o");
    fs::write(src.join("o/new"), "new").expect("o/new");
    let opaque = c(&src.join("o"));
    // SAFETY: valid NUL-terminated strings and a one-byte value.
    let set = unsafe {
        libc::setxattr(
            opaque.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    let opaque_supported = set == 0;

    // What the layer below held: a removed file, an opaque directory's old entry, and a
    // directory where the layer now has a file.
    fs::write(dst.join("gone"), "old").expect("gone");
    fs::create_dir(dst.join("o")).expect("o");
    fs::write(dst.join("o/old"), "old").expect("o/old");
    fs::create_dir(dst.join("a")).expect("a as a directory");
    fs::write(dst.join("a/inside"), "x").expect("a/inside");

    let mut archive = Vec::new();
    let done = capture(
        dir_fd(&src).as_fd(),
        WritableLayer::OverlayUpper,
        Holes::Sparse,
        &mut archive,
    )
    .expect("capture");
    assert!(done.entries >= 9, "{done:?}");
    restore(dir_fd(&dst).as_fd(), &archive[..]).expect("restore");

    let a = fs::symlink_metadata(dst.join("a")).expect("a");
    assert!(a.is_file());
    assert_eq!((a.mode() & 0o7777, a.uid(), a.gid()), (0o640, 1000, 1000));
    assert_eq!(fs::read_to_string(dst.join("a")).expect("read"), "alpha");
    assert_eq!(
        fs::symlink_metadata(dst.join("h")).expect("h").ino(),
        a.ino(),
        "the hard link is one file"
    );
    assert_eq!(fs::read_link(dst.join("l")).expect("link"), Path::new("a"));
    assert_eq!(fs::symlink_metadata(dst.join("l")).expect("l").uid(), 1000);
    let d = fs::metadata(dst.join("d")).expect("d");
    assert_eq!((d.mode() & 0o7777, d.uid(), d.gid()), (0o711, 1234, 4321));
    assert_eq!(
        fs::read_to_string(dst.join("d").join(&long)).expect("long"),
        "long"
    );
    let p = fs::symlink_metadata(dst.join("p")).expect("p");
    assert_eq!(p.mode() & libc::S_IFMT, libc::S_IFIFO);
    assert_eq!(p.mode() & 0o7777, 0o620);
    assert!(!dst.join("gone").exists(), "the whiteout did not remove");
    assert!(!dst.join(".wh.gone").exists());
    assert_eq!(fs::read_to_string(dst.join("o/new")).expect("o/new"), "new");
    if opaque_supported {
        assert!(
            !dst.join("o/old").exists(),
            "the opaque directory kept its old entry"
        );
    }
}

/// One archive entry: raw path bytes, type, link target.
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8]);

/// An archive of `entries`, built without the checks the `tar` crate's own path setters make.
fn raw_archive(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (path, kind, link) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn archives_cannot_reach_outside_the_root() {
    if !is_root() {
        eprintln!("SKIP: needs root");
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("moat-layer-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
    fs::create_dir(&root).expect("root");
    fs::create_dir(&outside).expect("outside");
    let target = outside.as_os_str().as_encoded_bytes().to_vec();
    let cases: Vec<Vec<RawEntry<'_>>> = vec![
        vec![(b"../outside/x", tar::EntryType::Regular, b"")],
        vec![(b"/tmp/x", tar::EntryType::Regular, b"")],
        // A symlink in the archive, then a file through it.
        vec![
            (b"esc", tar::EntryType::Symlink, &target),
            (b"esc/x", tar::EntryType::Regular, b""),
        ],
        // A hard link to a file outside.
        vec![(b"hl", tar::EntryType::Link, b"../outside/secret")],
    ];
    fs::write(outside.join("secret"), "s").expect("secret");
    for entries in cases {
        let archive = raw_archive(&entries);
        assert!(
            restore(dir_fd(&root).as_fd(), &archive[..]).is_err(),
            "{:?}",
            entries
                .iter()
                .map(|e| String::from_utf8_lossy(e.0))
                .collect::<Vec<_>>()
        );
        assert!(!outside.join("x").exists(), "a write escaped the root");
        assert!(!root.join("hl").exists(), "a hard link escaped the root");
    }
}

#[test]
fn sparse_files_stay_sparse() {
    if !is_root() {
        eprintln!("SKIP: needs root");
        return;
    }
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::Builder::new()
        .prefix("moat-layer-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    fs::create_dir(&src).expect("src");
    fs::create_dir(&dst).expect("dst");
    // `truncate -s 3G`, then a little data in the middle and at an odd offset near the end.
    let size: u64 = 3 << 30;
    let f = fs::File::create(src.join("big")).expect("big");
    f.set_len(size).expect("truncate");
    f.write_all_at(b"middle", 1 << 30).expect("write");
    f.write_all_at(b"tail", size - 1000).expect("write");
    drop(f);
    // Only holes.
    fs::File::create(src.join("empty"))
        .and_then(|f| f.set_len(size))
        .expect("empty");

    let mut archive = Vec::new();
    capture(
        dir_fd(&src).as_fd(),
        WritableLayer::Root,
        Holes::Sparse,
        &mut archive,
    )
    .expect("capture");
    assert!(
        archive.len() < 1 << 20,
        "a 3 GiB sparse file made a {}-byte archive",
        archive.len()
    );
    restore(dir_fd(&dst).as_fd(), &archive[..]).expect("restore");
    for name in ["big", "empty"] {
        let m = fs::metadata(dst.join(name)).expect("restored");
        assert_eq!(m.len(), size, "{name}");
        assert!(
            m.blocks() * 512 < 1 << 20,
            "{name} restored with {} blocks",
            m.blocks()
        );
    }
    let f = fs::File::open(dst.join("big")).expect("big");
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 1 << 30).expect("read");
    assert_eq!(&buf, b"middle");
    f.read_exact_at(&mut buf[..4], size - 1000).expect("read");
    assert_eq!(&buf[..4], b"tail");
    f.read_exact_at(&mut buf, 12345).expect("read");
    assert_eq!(buf, [0; 6]);
}

#[test]
fn a_dense_capture_writes_holes_as_zeros_in_plain_entries() {
    if !is_root() {
        eprintln!("SKIP: needs root");
        return;
    }
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::Builder::new()
        .prefix("moat-layer-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let f = fs::File::create(tmp.path().join("holey")).expect("holey");
    f.set_len(1 << 20).expect("truncate");
    f.write_all_at(b"end", (1 << 20) - 3).expect("write");
    drop(f);
    let mut archive = Vec::new();
    capture(
        dir_fd(tmp.path()).as_fd(),
        WritableLayer::Root,
        Holes::Dense,
        &mut archive,
    )
    .expect("capture");
    let mut entries = tar::Archive::new(&archive[..]);
    let mut seen = 0;
    for entry in entries.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        if entry.path().expect("path").as_os_str() != "holey" {
            continue;
        }
        seen += 1;
        assert_eq!(entry.header().entry_type(), tar::EntryType::Regular);
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).expect("data");
        assert_eq!(data.len(), 1 << 20);
        assert!(data[..(1 << 20) - 3].iter().all(|&b| b == 0));
        assert_eq!(&data[(1 << 20) - 3..], b"end");
    }
    assert_eq!(seen, 1, "the file is in the archive once");
}
