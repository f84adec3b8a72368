//! A landlock ruleset for user code: writes and device ioctls anywhere in the sandbox's own tree
//! except `/proc`, which user code may only read. Built before `fork`, applied between `fork` and
//! `exec` with one raw system call.
//!
//! The namespaces and mounts already confine what a path can reach; landlock adds a second,
//! independent check on the paths user code can modify, so a mistake in procfs masking (the
//! CVE-2025-52881 class of procfs write redirection) does not become a write.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::sys::cvt;
use crate::{JailError, Result};

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: libc::c_int = 1;

const ACCESS_EXECUTE: u64 = 1 << 0;
const ACCESS_READ_FILE: u64 = 1 << 2;
const ACCESS_READ_DIR: u64 = 1 << 3;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The landlock ABI version of the running kernel, 0 when landlock is unavailable.
pub fn abi_version() -> u32 {
    // SAFETY: a NULL attribute with size 0 and the VERSION flag only queries the ABI.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if r < 0 { 0 } else { r as u32 }
}

/// Every filesystem access right the given ABI knows.
fn all_fs_access(abi: u32) -> u64 {
    let mut all = (1u64 << 13) - 1; // ABI 1: execute .. make_sym
    if abi >= 2 {
        all |= 1 << 13; // refer
    }
    if abi >= 3 {
        all |= 1 << 14; // truncate
    }
    if abi >= 5 {
        all |= 1 << 15; // ioctl_dev
    }
    all
}

/// A created landlock ruleset, ready to be applied to any number of processes.
#[derive(Debug)]
pub struct Ruleset {
    fd: OwnedFd,
    abi: u32,
}

impl Ruleset {
    /// The user-code ruleset for the tree at `root` (the sandbox's `/`): full access beneath every
    /// top-level entry except `proc` and `sys`, read-only beneath `proc`, and the listing of `/`
    /// itself (no entry can be made or removed there). Returns `None` when the
    /// kernel has no landlock.
    pub fn for_user_code(root: &Path) -> Result<Option<Ruleset>> {
        let abi = abi_version();
        if abi == 0 {
            return Ok(None);
        }
        let all = all_fs_access(abi);
        let attr = RulesetAttr {
            handled_access_fs: all,
            handled_access_net: 0,
            scoped: 0,
        };
        // Older ABIs reject a larger struct with non-zero trailing fields only; ours are zero, but
        // pass the size each ABI defines to stay exact.
        let size = if abi >= 6 {
            24
        } else if abi >= 4 {
            16
        } else {
            8
        };
        // SAFETY: attr is a valid ruleset attribute of at least `size` bytes.
        let fd = cvt(unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size,
                0,
            )
        })
        .map_err(|e| JailError::os("landlock_create_ruleset", e))?;
        // SAFETY: the kernel just returned this fd (close-on-exec) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let ruleset = Ruleset { fd, abi };

        let entries = std::fs::read_dir(root)
            .map_err(|e| JailError::os(format!("read_dir {}", root.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let access = match name.to_str() {
                Some("proc") => ACCESS_READ_FILE | ACCESS_READ_DIR | ACCESS_EXECUTE,
                Some("sys") => continue,
                _ => all,
            };
            ruleset.allow_beneath(&entry.path(), access)?;
        }
        // Listing `/` itself (`ls /`). Beneath it this adds nothing the rules above do not
        // give, but for `/sys`, which a sandbox does not have.
        ruleset.allow_beneath(root, ACCESS_READ_DIR)?;
        Ok(Some(ruleset))
    }

    /// The ABI version the ruleset was built for.
    pub fn abi(&self) -> u32 {
        self.abi
    }

    fn allow_beneath(&self, path: &Path, access: u64) -> Result<()> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| JailError::Invalid(format!("path with NUL: {}", path.display())))?;
        // SAFETY: c is a valid NUL-terminated path; O_PATH opens never block or have side effects.
        let dir = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if dir < 0 {
            // Entries that vanish or cannot be opened are simply not granted.
            return Ok(());
        }
        // SAFETY: open returned a fresh fd that we own.
        let dir = unsafe { OwnedFd::from_raw_fd(dir) };
        let mut st: libc::stat = unsafe_zeroed_stat();
        // SAFETY: dir is a valid fd and st is writable.
        if unsafe { libc::fstat(dir.as_raw_fd(), &mut st) } != 0 {
            return Ok(());
        }
        // Rules on non-directories may carry only file rights.
        let access = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            access
        } else {
            access & (ACCESS_EXECUTE | (1 << 1) | ACCESS_READ_FILE | (1 << 14) | (1 << 15))
        };
        let attr = PathBeneathAttr {
            allowed_access: access,
            parent_fd: dir.as_raw_fd(),
        };
        // SAFETY: attr is a valid path-beneath attribute and both fds are open.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.fd.as_raw_fd(),
                RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0,
            )
        })
        .map_err(|e| JailError::os(format!("landlock_add_rule {}", path.display()), e))?;
        Ok(())
    }

    /// Applies the ruleset to the calling thread. Needs `no_new_privs` (or `CAP_SYS_ADMIN`).
    /// Async-signal-safe.
    pub fn restrict_self(&self) -> io::Result<()> {
        // SAFETY: the ruleset fd is open; flags must be 0.
        cvt(unsafe { libc::syscall(libc::SYS_landlock_restrict_self, self.fd.as_raw_fd(), 0) })?;
        Ok(())
    }
}

fn unsafe_zeroed_stat() -> libc::stat {
    // SAFETY: libc::stat is a plain C struct for which all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}
