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
