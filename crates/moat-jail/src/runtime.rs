//! The host runtime directory (`/run/moat` by default): the mount point every sandbox builds its
//! root on (inside its own mount namespace, so the host never sees those mounts), the mask files
//! secrets are hidden behind, the lock files of the uid ranges, and the sockets on which a
//! restarted server reaches the agents of sandboxes kept across the restart.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{JailError, Result};

/// Paths under the runtime directory.
#[derive(Debug, Clone)]
pub struct RuntimeDir {
    root: PathBuf,
}

impl RuntimeDir {
    /// The default location.
    pub const DEFAULT: &'static str = "/run/moat";

    /// Opens (creating where missing) the runtime directory at `root`. Refuses a directory that
    /// is a symlink, is not owned by us, or is writable by others.
    pub fn open(root: &Path) -> Result<RuntimeDir> {
        if !root.is_absolute() {
            return Err(JailError::Invalid(format!(
                "runtime directory must be absolute: {}",
                root.display()
            )));
        }
        match fs::create_dir(root) {
            Ok(()) => fs::set_permissions(root, fs::Permissions::from_mode(0o711))
                .map_err(|e| JailError::os(format!("chmod {}", root.display()), e))?,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(JailError::os(format!("mkdir {}", root.display()), e)),
        }
        check_owned_dir(root)?;
        let dir = RuntimeDir {
            root: root.to_path_buf(),
        };
        for (sub, mode) in [
            ("mnt", 0o700),
            ("stage", 0o700),
            ("slots", 0o700),
            ("agents", 0o700),
            ("maskdir", 0o000),
            ("empty", 0o555),
        ] {
            let p = root.join(sub);
            match fs::create_dir(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(JailError::os(format!("mkdir {}", p.display()), e)),
            }
            check_owned_dir(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .map_err(|e| JailError::os(format!("chmod {}", p.display()), e))?;
        }
        let mask = dir.mask_file();
        if !mask.exists() {
            fs::write(&mask, b"")
                .map_err(|e| JailError::os(format!("create {}", mask.display()), e))?;
        }
        fs::set_permissions(&mask, fs::Permissions::from_mode(0o000))
            .map_err(|e| JailError::os(format!("chmod {}", mask.display()), e))?;
        Ok(dir)
    }

    /// The runtime directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Mount point of sandbox roots (used only inside each sandbox's mount namespace).
    pub fn mnt(&self) -> PathBuf {
        self.root.join("mnt")
    }

    /// Mount point of the small staging tmpfs for generated files (passwd, hosts, …).
    pub fn stage(&self) -> PathBuf {
        self.root.join("stage")
    }

    /// An empty, mode-000, host-root-owned file that secrets are bind-mounted over with.
    pub fn mask_file(&self) -> PathBuf {
        self.root.join("mask")
    }

    /// An empty, mode-000 directory that secret directories are bind-mounted over with.
    pub fn mask_dir(&self) -> PathBuf {
        self.root.join("maskdir")
    }

    /// An empty, read-only directory: the second, empty lower layer of the read-only overlays
    /// the `host` template's system directories are mounted as (overlayfs wants two lower
    /// layers when it has no upper one).
    pub fn empty_dir(&self) -> PathBuf {
        self.root.join("empty")
    }

    /// Directory of the listening sockets of kept sandboxes' agents (`<id>.sock`).
    pub fn agents(&self) -> PathBuf {
        self.root.join("agents")
    }

    /// Directory of the uid-range lock files.
    pub fn slots(&self) -> PathBuf {
        self.root.join("slots")
    }
}

fn check_owned_dir(p: &Path) -> Result<()> {
    let md =
        fs::symlink_metadata(p).map_err(|e| JailError::os(format!("stat {}", p.display()), e))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !md.is_dir() {
        return Err(JailError::Invalid(format!(
            "{} is not a directory",
            p.display()
        )));
    }
    if md.uid() != me {
        return Err(JailError::Invalid(format!(
            "{} is owned by uid {}, not by us (uid {me})",
            p.display(),
            md.uid()
        )));
    }
    if md.mode() & 0o022 != 0 {
        return Err(JailError::Invalid(format!(
            "{} is writable by group or others",
            p.display()
        )));
    }
    Ok(())
}
