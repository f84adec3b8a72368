//! Non-blocking reads and writes on pipe and PTY file descriptors, driven by tokio's reactor.
//!
//! The agent reads with `read(2)` on the raw descriptor rather than through tokio's cached
//! readiness, so that the final drain after a process exits sees every byte already in the pipe.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A non-blocking descriptor registered with the reactor.
#[derive(Debug)]
pub struct FdIo {
    fd: AsyncFd<OwnedFd>,
}

impl FdIo {
    /// Makes `fd` non-blocking and registers it for `interest`.
    pub fn new(fd: OwnedFd, interest: Interest) -> io::Result<FdIo> {
        set_nonblocking(fd.as_fd())?;
        // SAFETY: an OwnedFd is a valid open descriptor, and the AsyncFd owns it: nothing can
        // close or replace it while registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, interest) }
            .map_err(|e| e.into_parts().1)?;
        Ok(FdIo { fd })
    }

    /// The descriptor (for ioctls).
    pub fn borrow(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    /// Reads once, waiting until data (or end of file) is available. `EIO`, which a PTY master
    /// answers once every slave descriptor is closed, counts as end of file.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| read_now(fd.get_ref().as_fd(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads what is available now: `Err(WouldBlock)` when nothing is.
    pub fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        read_now(self.borrow(), buf)
    }

    /// Writes all of `data`, waiting while the descriptor is full.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| write_now(fd.get_ref().as_fd(), data)) {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

fn read_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
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

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments on an open descriptor.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
