//! Just enough netlink to send a few fixed requests and read their acknowledgements: a message
//! builder with nested attributes, and a socket that sends one buffer and waits for an ack per
//! message. No general parser: the only answers read are errors and acks.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::sys::cvt_int;

/// `NLA_F_NESTED`: set on attributes that hold attributes.
const NLA_F_NESTED: u16 = 0x8000;
/// `NLMSG_ERROR`: an error or, with error 0, an acknowledgement.
const NLMSG_ERROR: u16 = 2;

/// A buffer of netlink messages, built in order.
#[derive(Default)]
pub(crate) struct Messages {
    buf: Vec<u8>,
    /// Where the open message's header starts.
    msg_start: usize,
    /// Where the open nested attributes' headers start, innermost last.
    nests: Vec<usize>,
    /// Messages begun so far (their sequence numbers count from 1).
    count: u32,
    /// Messages that ask for an acknowledgement.
    acked: u32,
}

impl Messages {
    /// Opens a message of `kind` with `flags` (`NLM_F_*`; `NLM_F_REQUEST` is added), and
    /// writes `header`, the family's fixed header, after it.
    pub fn begin(&mut self, kind: u16, flags: u16, header: &[u8]) {
        self.msg_start = self.buf.len();
        self.count += 1;
        let seq = self.count;
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `end`
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf
            .extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
        self.buf.extend_from_slice(header);
        self.pad();
        if flags & libc::NLM_F_ACK as u16 != 0 {
            self.acked += 1;
        }
    }

    /// Closes the open message.
    pub fn end(&mut self) {
        let len = (self.buf.len() - self.msg_start) as u32;
        self.buf[self.msg_start..self.msg_start + 4].copy_from_slice(&len.to_ne_bytes());
        self.pad();
    }

    /// Adds attribute `kind` holding `value`.
    pub fn attr(&mut self, kind: u16, value: &[u8]) {
        let len = (4 + value.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    /// Adds a NUL-terminated string attribute.
    pub fn attr_str(&mut self, kind: u16, value: &str) {
        let mut v = value.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v);
    }

    /// Adds a big-endian 32-bit attribute (netfilter's integers).
    pub fn attr_be32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_be_bytes());
    }

    /// Opens nested attribute `kind`; [`Messages::close`] ends it.
    pub fn open(&mut self, kind: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    /// Closes the innermost open nested attribute.
    pub fn close(&mut self) {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Sends the messages on a fresh `NETLINK_*` socket of `protocol` in the calling thread's
    /// network namespace and waits for every acknowledgement; the first error the kernel
    /// reports is returned.
    pub fn send(&self, protocol: libc::c_int) -> io::Result<()> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = cvt_int(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        })?;
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // An answer the count above does not foresee must not hang the caller.
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a timeval of the size given.
        cvt_int(unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        // SAFETY: an all-zero sockaddr_nl addresses the kernel.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `buf` and `addr` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                self.buf.as_ptr().cast(),
                self.buf.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut pending = self.acked;
        let mut buf = vec![0u8; 8192];
        while pending > 0 {
            // SAFETY: `buf` is valid for its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut at = 0usize;
            let n = n as usize;
            while at + 16 <= n {
                let len =
                    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap_or_default());
                if len < 16 || at + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a malformed netlink answer",
                    ));
                }
                if kind == NLMSG_ERROR && len >= 20 {
                    let errno =
                        i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap_or_default());
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    pending -= 1;
                }
                at += (len + 3) & !3;
            }
        }
        Ok(())
    }
}
