//! The agent binary as a sealed, in-memory copy. A sandbox executes the agent from this memfd, so
//! its `/proc/self/exe` points at an anonymous file whose seals forbid every write: nothing inside
//! can rewrite a host binary (the runc CVE-2019-5736 class).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::sys::cvt_int;
use crate::{JailError, Result};

const MFD_EXEC: libc::c_uint = 0x10;

/// A sealed, executable copy of a binary.
#[derive(Debug)]
pub struct SealedBinary {
    fd: OwnedFd,
}

impl SealedBinary {
    /// Copies the running executable.
    pub fn current_exe() -> Result<SealedBinary> {
        SealedBinary::copy_of(Path::new("/proc/self/exe"))
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
