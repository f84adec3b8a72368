//! Non-blocking reads and writes on pipe and PTY file descriptors, driven by tokio's reactor.
//!
//! The agent reads with `read(2)` on the raw descriptor rather than through tokio's cached
//! readiness, so that the final drain after a process exits sees every byte already in the pipe.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use tokio::io::Interest;

use crate::pollfd::{Direction, PollFd};

/// A non-blocking descriptor registered with the reactor.
#[derive(Debug)]
pub struct FdIo {
    fd: PollFd,
}

impl FdIo {
    /// Makes `fd` non-blocking and registers it for `interest`.
    pub fn new(fd: OwnedFd, interest: Interest) -> io::Result<FdIo> {
        Ok(FdIo {
            fd: PollFd::new(fd, interest)?,
        })
    }

    /// Runs `f` on the descriptor (for ioctls).
    pub fn with_fd<R>(&self, f: impl FnOnce(BorrowedFd<'_>) -> R) -> R {
        self.fd.with_fd(f)
    }

    /// Reads once, waiting until data (or end of file) is available. `EIO`, which a PTY master
    /// answers once every slave descriptor is closed, counts as end of file.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd.io(Direction::Read, |fd| read_now(fd, buf)).await
    }

    /// Reads what is available now: `Err(WouldBlock)` when nothing is.
    pub fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd.with_fd(|fd| read_now(fd, buf))
    }

    /// Writes all of `data`, waiting while the descriptor is full.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match self
                .fd
                .io(Direction::Write, |fd| write_now(fd, data))
                .await?
            {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => data = &data[n..],
            }
        }
        Ok(())
    }
}

fn read_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: buf is a valid writable region of buf.len() bytes; fd is open for the borrow.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EIO) => return Ok(0),
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}

fn write_now(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: data is a valid readable region of data.len() bytes; fd is open for the borrow.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}
