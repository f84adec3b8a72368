//! The host terminal: raw mode while a sandbox's PTY is attached, and its size.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Whether `fd` is a terminal.
pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty has no memory preconditions.
    unsafe { libc::isatty(fd) == 1 }
}

/// The terminal's size as `(cols, rows)`, if `fd` is a terminal.
pub fn size(fd: i32) -> Option<(u16, u16)> {
    // SAFETY: winsize is a plain C struct; all-zero is valid.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into a valid pointer.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Puts the terminal on stdin into raw mode; restores it when dropped.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Enters raw mode on stdin, or returns `None` if stdin is not a terminal.
    pub fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        // SAFETY: stdin's fd is open for the life of the process.
        let fd = unsafe { BorrowedFd::borrow_raw(stdin.as_raw_fd()) };
        // SAFETY: termios is a plain C struct; all-zero is valid.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes a termios into a valid pointer.
        if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } != 0 {
            return None;
        }
        let saved = t;
        // SAFETY: cfmakeraw edits a valid termios in place.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: tcsetattr reads a valid termios.
        if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
            return None;
        }
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restoring the termios saved from the same fd.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}
