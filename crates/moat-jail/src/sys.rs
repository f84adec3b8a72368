//! Thin wrappers over the system calls the jail needs that `libc` does not wrap safely.

use std::io;

/// Turns a `-1` return into the `errno` error.
pub fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Turns a `-1` return of an `int` syscall into the `errno` error.
pub fn cvt_int(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `mount_setattr` attribute: read-only.
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// `mount_setattr` attribute: ignore set-user-id bits.
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
/// `mount_setattr` attribute: no device files.
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
/// `mount_setattr` attribute: no execution.
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;
/// `mount_setattr` attribute: id-map the mount with the given user namespace.
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    set: u64,
    clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `mount_setattr(2)`: adds the attributes `set` to the mount at `dirfd`/`path` (with
/// `AT_RECURSIVE` in `flags`, to its whole subtree), id-mapping it with `userns_fd` when `set`
/// holds [`MOUNT_ATTR_IDMAP`]. Async-signal-safe; errno is left set on failure.
pub fn mount_setattr(
    dirfd: libc::c_int,
    path: &std::ffi::CStr,
    flags: libc::c_int,
    set: u64,
    userns_fd: Option<libc::c_int>,
) -> io::Result<()> {
    let attr = MountAttr {
        set,
        clr: 0,
        propagation: 0,
        userns_fd: userns_fd.map_or(0, |fd| fd as u64),
    };
    // SAFETY: path is a valid C string and attr a valid mount_attr of the size passed.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(())
}

/// `open_tree(2)` with `OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC` (and `extra` flags such as
/// `AT_RECURSIVE`): a detached copy of the mount at `path`, in no mount namespace.
pub fn open_tree_clone(
    path: &std::ffi::CStr,
    extra: libc::c_uint,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | extra;
    // SAFETY: path is a valid C string; open_tree returns a new fd or -1.
    let fd =
        cvt(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) })?;
    // SAFETY: open_tree returned a fresh fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as libc::c_int) })
}
