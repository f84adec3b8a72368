//! `moat sandbox cp`: copy files and directories between this machine and a sandbox, as
//! `docker cp` does. Files go as they are; directories as tar archives, packed or unpacked
//! here as they stream.
//!
//! What comes out of a sandbox is untrusted: archives are unpacked with the `tar` crate's
//! checks (no entry outside the target, none through a symbolic link, no `..`), without
//! owners, set-id bits or extended attributes, and devices, pipes and sockets are skipped.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use moat_client::types::FileType;
use moat_client::{Body, Client};
use tokio_util::io::SyncIoBridge;

/// Bytes buffered between the thread that packs a directory and the upload.
const PACK_BUFFER: usize = 256 << 10;

/// Arguments of `moat sandbox cp`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  moat sandbox cp ./data ID:/home/user/data\n  \
moat sandbox cp ID:/home/user/out.txt .\n\
A local path with a colon in it is written with a slash first: ./a:b."
)]
pub struct CpArgs {
    /// What to copy: a local path, or ID:PATH in a sandbox.
    src: String,
    /// Where to: a local path, or ID:PATH in a sandbox.
    dst: String,
}

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    Local(PathBuf),
    Sandbox { id: String, path: String },
}

/// `ID:PATH` is in a sandbox when the part before the first colon is non-empty and has no
/// `/` (so `./a:b` and `/x:y` are local paths); anything else is local.
fn place(text: &str) -> Place {
    match text.split_once(':') {
        Some((id, path)) if !id.is_empty() && !id.contains('/') => Place::Sandbox {
            id: id.to_owned(),
            path: if path.is_empty() {
                ".".to_owned()
            } else {
                path.to_owned()
            },
        },
        _ => Place::Local(PathBuf::from(text)),
    }
}

/// Runs the copy.
pub async fn copy(client: &Client, a: CpArgs) -> Result<ExitCode> {
    match (place(&a.src), place(&a.dst)) {
        (Place::Local(src), Place::Sandbox { id, path }) => upload(client, &src, &id, &path).await,
        (Place::Sandbox { id, path }, Place::Local(dst)) => {
            download(client, &id, &path, &dst).await
        }
        (Place::Local(_), Place::Local(_)) => {
            bail!("neither side is in a sandbox: write one of them as ID:PATH")
        }
        (Place::Sandbox { .. }, Place::Sandbox { .. }) => {
            bail!("both sides are in sandboxes: copy through a local directory")
        }
    }?;
    Ok(ExitCode::SUCCESS)
}

/// The last component of `path` (of a sandbox path or a local one).
fn base_name(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

async fn upload(client: &Client, src: &Path, id: &str, dst: &str) -> Result<()> {
    let meta = tokio::fs::metadata(src)
        .await
        .with_context(|| format!("{}", src.display()))?;
    let src_name = src
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .or_else(|| {
            std::fs::canonicalize(src)
                .ok()
                .and_then(|p| p.file_name()?.to_str().map(str::to_owned))
        });
    // Into an existing directory: under the source's own name, as cp does.
    let into_dir = match client.stat(id, dst).await {
        Ok(entry) => entry.kind == FileType::Dir,
        Err(e) if e.is_not_found() => {
            if dst.ends_with('/') && !meta.is_dir() {
                bail!("{id}:{dst}: no such directory");
            }
            false
        }
        Err(e) => return Err(e.into()),
    };
    let target = if into_dir {
        let name = src_name.ok_or_else(|| anyhow!("{}: has no name", src.display()))?;
        format!("{}/{name}", dst.trim_end_matches('/'))
    } else {
        dst.to_owned()
    };
    if meta.is_dir() {
        let (reader, writer) = tokio::io::duplex(PACK_BUFFER);
        let root = src.to_owned();
        let packer = tokio::task::spawn_blocking(move || pack(&root, SyncIoBridge::new(writer)));
        let sent = client
            .upload_tar(id, &target, Body::from_reader(reader))
            .await;
        let packed = packer.await.context("packing task")?;
        // A packing error explains a failed upload better than the upload's own error.
        packed.with_context(|| format!("packing {}", src.display()))?;
        sent.with_context(|| format!("copying to {id}:{target}"))?;
    } else {
        client
            .upload_file(id, &target, src)
            .await
            .with_context(|| format!("copying to {id}:{target}"))?;
    }
    Ok(())
}

/// Writes a tar of the contents of `root` (names relative to it) to `out`. Symbolic links
/// are kept as links; sockets, pipes and devices are skipped.
fn pack(root: &Path, out: impl std::io::Write) -> Result<()> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut entries = std::fs::read_dir(&dir)
            .with_context(|| format!("{}", dir.display()))?
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("{}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = rel.join(entry.file_name());
            let path = entry.path();
            let kind = entry
                .file_type()
                .with_context(|| format!("{}", path.display()))?;
            if kind.is_dir() {
                tar.append_dir(&name, &path)
                    .with_context(|| format!("{}", path.display()))?;
                stack.push(name);
            } else if kind.is_file() || kind.is_symlink() {
                tar.append_path_with_name(&path, &name)
                    .with_context(|| format!("{}", path.display()))?;
            } else {
                eprintln!(
                    "moat: skipping {} (not a file, directory or link)",
                    path.display()
                );
            }
        }
    }
    tar.into_inner()?.flush()?;
    Ok(())
}

async fn download(client: &Client, id: &str, src: &str, dst: &Path) -> Result<()> {
    let entry = client
        .stat(id, src)
        .await
        .with_context(|| format!("{id}:{src}"))?;
    let dst_is_dir = tokio::fs::metadata(dst).await.is_ok_and(|m| m.is_dir());
    let target = if dst_is_dir {
        let name = base_name(&entry.path)
            .or_else(|| base_name(src))
            .ok_or_else(|| anyhow!("{id}:{src} has no name to copy it under"))?;
        dst.join(name)
    } else {
        dst.to_owned()
    };
    match entry.kind {
        FileType::Dir => {
            tokio::fs::create_dir_all(&target)
                .await
                .with_context(|| format!("{}", target.display()))?;
            let stream = client
                .download_tar(id, src)
                .await
                .with_context(|| format!("{id}:{src}"))?;
            let reader = SyncIoBridge::new(stream.into_reader());
            let into = target.clone();
            tokio::task::spawn_blocking(move || unpack(reader, &into))
                .await
                .context("unpacking task")?
                .with_context(|| format!("unpacking {id}:{src} into {}", target.display()))?;
        }
        FileType::File | FileType::Symlink => {
            if dst.as_os_str().to_string_lossy().ends_with('/') && !dst_is_dir {
                bail!("{}: no such directory", dst.display());
            }
            let stream = client
                .download(id, src)
                .await
                .with_context(|| format!("{id}:{src}"))?;
            // Written beside the target, then renamed: an interrupted copy leaves no half file.
            let partial = partial_name(&target);
            let mut file = tokio::fs::File::create(&partial)
                .await
                .with_context(|| format!("{}", partial.display()))?;
            let written = stream.write_to(&mut file).await;
            if let Err(e) = written {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e).with_context(|| format!("{id}:{src}"));
            }
            file.sync_all().await.ok();
            tokio::fs::rename(&partial, &target)
                .await
                .with_context(|| format!("{}", target.display()))?;
            set_mode(&target, entry.mode).await;
        }
        FileType::Other => bail!("{id}:{src} is not a file or directory"),
    }
    Ok(())
}

/// `.NAME.moat-partial` beside `target`.
fn partial_name(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.moat-partial"))
}

/// Gives a downloaded file the permission bits it had (without set-id bits).
async fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let perms = std::fs::Permissions::from_mode(mode & 0o777);
    let _ = tokio::fs::set_permissions(path, perms).await;
}

/// Unpacks the tar `input` into the directory `into`, safely (see the module's doc).
fn unpack(input: impl std::io::Read, into: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(false);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let wanted = kind.is_file()
            || kind.is_dir()
            || kind.is_symlink()
            || kind.is_hard_link()
            || kind == tar::EntryType::Continuous;
        if !wanted {
            let name = entry.path_lossy_string();
            eprintln!("moat: skipping {name} (not a file, directory or link)");
            continue;
        }
        let name = entry.path_lossy_string();
        if !entry.unpack_in(into)? {
            eprintln!("moat: skipping {name} (its path leaves the target directory)");
        }
    }
    Ok(())
}

/// The entry's path as text, for messages.
trait PathLossy {
    fn path_lossy_string(&self) -> String;
}

impl<R: std::io::Read> PathLossy for tar::Entry<'_, R> {
    fn path_lossy_string(&self) -> String {
        String::from_utf8_lossy(&self.path_bytes()).into_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn places() {
        assert_eq!(
            place("abc:/tmp/x"),
            Place::Sandbox {
                id: "abc".into(),
                path: "/tmp/x".into()
            }
        );
        assert_eq!(
            place("abc:"),
            Place::Sandbox {
                id: "abc".into(),
                path: ".".into()
            }
        );
        assert_eq!(place("./a:b"), Place::Local("./a:b".into()));
        assert_eq!(place("/x:y"), Place::Local("/x:y".into()));
        assert_eq!(place(":x"), Place::Local(":x".into()));
        assert_eq!(place("plain"), Place::Local("plain".into()));
    }

    #[test]
    fn base_names() {
        assert_eq!(base_name("/home/user/data/"), Some("data"));
        assert_eq!(base_name("a"), Some("a"));
        assert_eq!(base_name("/"), None);
        assert_eq!(base_name("/x/.."), None);
    }

    #[test]
    fn pack_and_unpack_round_trip() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("sub/deeper")).unwrap();
        std::fs::write(src.path().join("a.txt"), b"alpha").unwrap();
        std::fs::write(src.path().join("sub/deeper/b.bin"), [0u8, 255, 7]).unwrap();
        std::os::unix::fs::symlink("a.txt", src.path().join("link")).unwrap();
        let mut tar = Vec::new();
        pack(src.path(), &mut tar).unwrap();

        let dst = tempfile::tempdir().unwrap();
        unpack(&tar[..], dst.path()).unwrap();
        assert_eq!(std::fs::read(dst.path().join("a.txt")).unwrap(), b"alpha");
        assert_eq!(
            std::fs::read(dst.path().join("sub/deeper/b.bin")).unwrap(),
            [0, 255, 7]
        );
        assert_eq!(
            std::fs::read_link(dst.path().join("link")).unwrap(),
            Path::new("a.txt")
        );
    }

    #[test]
    fn hostile_archives_stay_inside() {
        let outside = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        // A link out of the target, then a file written through it.
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "escape", outside.path()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o4755);
        b.append_data(&mut h, "escape/owned", &b"bad"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o4755);
        b.append_data(&mut h, "setuid", &b"ok"[..]).unwrap();
        let tar = b.into_inner().unwrap();

        let dst = tempfile::tempdir().unwrap();
        assert!(unpack(&tar[..], dst.path()).is_err());
        assert!(!outside.path().join("owned").exists());

        // Set-id bits are dropped.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o4755);
        b.append_data(&mut h, "setuid", &b"ok"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let dst = tempfile::tempdir().unwrap();
        unpack(&tar[..], dst.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dst.path().join("setuid"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "{mode:o}");
    }
}
