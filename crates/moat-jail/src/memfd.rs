//! The agent binary, sealed against writes. A sandbox executes the agent from a file that nothing
//! can write through, so nothing inside can rewrite a host binary via `/proc/<pid>/exe` (the runc
//! CVE-2019-5736 class):
//!
//! - preferably a private, detached, read-only bind mount of the binary (`open_tree` +
//!   `mount_setattr`): a write through it fails with `EROFS`, and making it costs microseconds;
//! - otherwise (kernels before 5.12, or without `CAP_SYS_ADMIN`) a memfd copy sealed against
//!   writes, growth and shrinking, which costs a copy of the binary.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::sys::{self, cvt_int};
use crate::{JailError, Result};

const MFD_EXEC: libc::c_uint = 0x10;

/// A sealed, executable copy of a binary.
#[derive(Debug)]
pub struct SealedBinary {
    fd: OwnedFd,
}

impl SealedBinary {
    /// Seals the running executable.
    pub fn current_exe() -> Result<SealedBinary> {
        let exe = std::fs::read_link("/proc/self/exe")
            .map_err(|e| JailError::os("readlink /proc/self/exe", e))?;
        SealedBinary::of(&exe)
    }

    /// Seals the binary at `path`: a read-only detached mount where the kernel allows it, a
    /// sealed memfd copy otherwise.
    pub fn of(path: &Path) -> Result<SealedBinary> {
        match SealedBinary::read_only_mount_of(path) {
            Ok(b) => Ok(b),
            Err(_) => SealedBinary::copy_of(path),
        }
    }

    /// A detached, read-only, nosuid, nodev bind mount of the file at `path`, held by an
    /// `O_PATH` fd. It lives in no mount namespace, so nothing can see or unmount it.
    pub fn read_only_mount_of(path: &Path) -> Result<SealedBinary> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| JailError::Invalid(format!("path with NUL: {}", path.display())))?;
        let fd = sys::open_tree_clone(&c, 0)
            .map_err(|e| JailError::os(format!("open_tree {}", path.display()), e))?;
        sys::mount_setattr(
            fd.as_raw_fd(),
            c"",
            libc::AT_EMPTY_PATH,
            sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV,
            None,
        )
        .map_err(|e| JailError::os(format!("make the mount of {} read-only", path.display()), e))?;
        Ok(SealedBinary { fd })
    }

    /// Copies the file at `path` into a sealed memfd.
    pub fn copy_of(path: &Path) -> Result<SealedBinary> {
        let src =
            File::open(path).map_err(|e| JailError::os(format!("open {}", path.display()), e))?;
        let len = src
            .metadata()
            .map_err(|e| JailError::os(format!("stat {}", path.display()), e))?
            .len();
        let name = CString::new("moat-agent").map_err(|_| JailError::Invalid("name".into()))?;
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: name is a valid C string; memfd_create has no other preconditions.
        let mut fd = unsafe { libc::memfd_create(name.as_ptr(), flags | MFD_EXEC) };
        if fd < 0 {
            // Kernels before 6.3 do not know MFD_EXEC (and make every memfd executable).
            // SAFETY: as above.
            fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        }
        let fd = cvt_int(fd).map_err(|e| JailError::os("memfd_create", e))?;
        // SAFETY: memfd_create returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut off: libc::off_t = 0;
        while (off as u64) < len {
            // SAFETY: both fds are open; off is a valid pointer to the source offset.
            let n = unsafe {
                libc::sendfile(
                    fd.as_raw_fd(),
                    src.as_raw_fd(),
                    &mut off,
                    (len - off as u64) as usize,
                )
            };
            if n <= 0 {
                return Err(JailError::os(
                    "copy agent binary into memfd",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        let seals =
            libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        // SAFETY: fcntl on an fd we own with an integer argument.
        cvt_int(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })
            .map_err(|e| JailError::os("seal agent memfd", e))?;
        Ok(SealedBinary { fd })
    }

    /// The memfd (close-on-exec).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
