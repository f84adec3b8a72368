//! Pseudo-terminals for processes started with a `pty`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Columns and rows used when a request asks for a PTY without (or with a zero) size.
pub const DEFAULT_SIZE: (u16, u16) = (80, 24);

/// A fresh PTY pair, both ends close-on-exec.
#[derive(Debug)]
pub struct Pty {
    /// The agent's end.
    pub master: OwnedFd,
    /// The process's end (its stdin, stdout, stderr and controlling terminal).
    pub slave: OwnedFd,
}

/// Opens a PTY pair of `cols` × `rows`.
pub fn open(cols: u32, rows: u32) -> io::Result<Pty> {
    // SAFETY: posix_openpt with constant flags; the result is checked.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: unlockpt on the master we own.
    if unsafe { libc::unlockpt(master.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // TIOCGPTPEER opens the slave through the master, without resolving a /dev/pts path that
    // code in the sandbox could have replaced.
    // SAFETY: ioctl with integer arguments on the master we own; returns a new descriptor.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    set_size(master.as_fd(), cols, rows)?;
    Ok(Pty { master, slave })
}

/// Sets the window size of the PTY behind `master` (the kernel signals `SIGWINCH` to the
/// foreground process group). Zero sizes fall back to [`DEFAULT_SIZE`]; sizes are clamped to
/// what the kernel stores (16 bits).
pub fn set_size(master: BorrowedFd<'_>, cols: u32, rows: u32) -> io::Result<()> {
    let clamp = |v: u32, default: u16| {
        if v == 0 {
            default
        } else {
            u16::try_from(v).unwrap_or(u16::MAX)
        }
    };
    let ws = libc::winsize {
        ws_row: clamp(rows, DEFAULT_SIZE.1),
        ws_col: clamp(cols, DEFAULT_SIZE.0),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: ws is a valid winsize for the duration of the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the window size of the PTY behind `fd` as (cols, rows).
pub fn get_size(fd: BorrowedFd<'_>) -> io::Result<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: ws is a valid, writable winsize for the duration of the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((ws.ws_col, ws.ws_row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_and_resizes() {
        let pty = open(100, 40).expect("pty");
        assert_eq!(get_size(pty.slave.as_fd()).expect("size"), (100, 40));
        set_size(pty.master.as_fd(), 0, 0).expect("resize");
        assert_eq!(get_size(pty.slave.as_fd()).expect("size"), DEFAULT_SIZE);
    }
}
