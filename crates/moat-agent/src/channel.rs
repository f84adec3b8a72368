//! The agent's connection to its host when its sandbox may be checkpointed and restored
//! (gVisor): the channel socket is watched by epoll instances of the agent's own, never by the
//! runtime's reactor.
//!
//! After a restore, gVisor's epoll may report events of registrations the agent removed long
//! before, with the keys they had then, and may do so again after every later restore (seen
//! with the key of a channel connection three restores old). The reactor takes a key for the
//! address of its record of a registration: a key whose registration was dropped names freed
//! memory, which the reactor then reads and locks as its own (an agent found waiting forever on
//! a lock at such an address). A channel connection was a registration that every checkpoint
//! saw and every restore replaced, the one most exposed to this.
//!
//! So the channel socket is watched by two epoll instances of the agent's own, one for reading
//! and one for writing, whose keys the agent never reads; only those two descriptors are
//! registered with the reactor, once, for the agent's life, so every key the reactor could be
//! handed back stays valid. Each connection watches the socket afresh ([`Channel::rewatch`]):
//! what a restored instance reports cannot be trusted, and an event that means nothing only
//! costs one more try of the read or write, which is always made first.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::Interest;

use crate::pollfd::{Direction, PollFd, set_nonblocking};

/// The channel socket and its two watches.
#[derive(Debug)]
pub struct Channel {
    socket: OwnedFd,
    readable: Watch,
    writable: Watch,
}

/// An epoll instance of the agent's own watching the socket for one direction, registered
/// with the reactor (for being readable, which it is once it has an event to report).
#[derive(Debug)]
struct Watch {
    epoll: PollFd,
    events: u32,
}

impl Channel {
    /// Watches the connected socket `socket` (made non-blocking), which the agent keeps for
    /// its whole life; call [`Channel::rewatch`] before each connection.
    pub fn new(socket: OwnedFd) -> io::Result<Arc<Channel>> {
        set_nonblocking(socket.as_fd())?;
        Ok(Arc::new(Channel {
            socket,
            readable: Watch::new((libc::EPOLLIN | libc::EPOLLRDHUP) as u32)?,
            writable: Watch::new(libc::EPOLLOUT as u32)?,
        }))
    }

    /// Watches the socket afresh, for a new connection: whatever a restored watch held is
    /// dropped, and nothing the reactor knows changes.
    pub fn rewatch(&self) -> io::Result<()> {
        self.readable.rewatch(self.socket.as_fd())?;
        self.writable.rewatch(self.socket.as_fd())
    }

    /// A stream over the channel, for one connection.
    pub fn stream(self: &Arc<Self>) -> ChannelStream {
        ChannelStream(self.clone())
    }

    /// Runs `op` on the socket until it answers anything but `WouldBlock`, waiting between
    /// tries for the watch of `dir` to report an event.
    fn poll_io<R>(
        &self,
        cx: &mut Context<'_>,
        dir: Direction,
        mut op: impl FnMut(BorrowedFd<'_>) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        let watch = match dir {
            Direction::Read => &self.readable,
            Direction::Write => &self.writable,
        };
        loop {
            match op(self.socket.as_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return Poll::Ready(other),
            }
            // Returns once the watch has taken at least one event: an edge of the socket
            // since the last take, so the next try may get through.
            ready!(watch.epoll.poll_io(cx, Direction::Read, take_events))?;
        }
    }
}

impl Watch {
    fn new(events: u32) -> io::Result<Watch> {
        // SAFETY: epoll_create1 with a flag; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Watch {
            epoll: PollFd::new(fd, Interest::READABLE)?,
            events,
        })
    }

    fn rewatch(&self, socket: BorrowedFd<'_>) -> io::Result<()> {
        self.epoll.with_fd(|epoll| {
            // Gone already (a fresh watch) is as good as removed.
            let _ = ctl(epoll, libc::EPOLL_CTL_DEL, socket, 0);
            let events = self.events | libc::EPOLLET as u32;
            match ctl(epoll, libc::EPOLL_CTL_ADD, socket, events) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    ctl(epoll, libc::EPOLL_CTL_MOD, socket, events)
                }
                other => other,
            }?;
            // Events of the watch as it was go: they belong to the old connection.
            let _ = take_events(epoll);
            Ok(())
        })
    }
}

fn ctl(epoll: BorrowedFd<'_>, op: i32, fd: BorrowedFd<'_>, events: u32) -> io::Result<()> {
    // The key is never read (see the module's notes).
    let mut ev = libc::epoll_event { events, u64: 0 };
    // SAFETY: epoll_ctl on open descriptors with an event that lives for the call.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd.as_raw_fd(), &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes the events the watch `epoll` holds, without waiting: `WouldBlock` when it has none.
fn take_events(epoll: BorrowedFd<'_>) -> io::Result<usize> {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
    loop {
        // SAFETY: epoll_wait into an array of `events.len()` entries, with no timeout.
        let n = unsafe {
            libc::epoll_wait(
                epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                0,
            )
        };
        match n {
            0 => return Err(io::ErrorKind::WouldBlock.into()),
            n if n > 0 => return Ok(n as usize),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// One connection's stream over the [`Channel`].
#[derive(Debug)]
pub struct ChannelStream(Arc<Channel>);

impl tokio::io::AsyncRead for ChannelStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: the bytes are only written (by read(2)), never read, and only the `n` it
        // wrote are then marked initialised.
        let unfilled = unsafe { buf.unfilled_mut() };
        let n = ready!(self.0.poll_io(cx, Direction::Read, |fd| {
            retrying(|| {
                // SAFETY: `unfilled` is writable for its length; `fd` is open for the borrow.
                unsafe { libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len()) }
            })
        }))?;
        // SAFETY: read(2) initialised the first `n` bytes of the unfilled part.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for ChannelStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let count = bufs.len().min(libc::UIO_MAXIOV as usize);
        self.0.poll_io(cx, Direction::Write, |fd| {
            retrying(|| {
                // SAFETY: IoSlice is ABI-compatible with iovec; `count` slices are valid for reads;
                // `fd` is open for the borrow. MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE.
                unsafe {
                    let msg = libc::msghdr {
                        msg_name: std::ptr::null_mut(),
                        msg_namelen: 0,
                        msg_iov: bufs.as_ptr() as *mut libc::iovec,
                        msg_iovlen: count as _,
                        msg_control: std::ptr::null_mut(),
                        msg_controllen: 0,
                        msg_flags: 0,
                    };
                    libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
                }
            })
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown with integer arguments on an open socket.
        let r = unsafe { libc::shutdown(self.0.socket.as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        })
    }
}

/// The byte count of a read or write system call `call`, which is made again when a signal
/// interrupted it.
fn retrying(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        if let Ok(n) = usize::try_from(call()) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::io::{Read, Write};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The (descriptor, key) pairs the epoll instance `epoll` of this process watches.
    fn watched(epoll: i32) -> BTreeSet<(i32, String)> {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{epoll}")).expect("fdinfo");
        info.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some("tfd:")).then_some(())?;
                let fd = it.next()?.parse().ok()?;
                let data = it.skip_while(|w| *w != "data:").nth(1)?.to_owned();
                Some((fd, data))
            })
            .collect()
    }

    /// The runtime's reactor: the epoll instance of this process that watches `inner`.
    fn reactor_of(inner: i32) -> i32 {
        std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&fd| {
                std::fs::read_link(format!("/proc/self/fd/{fd}"))
                    .is_ok_and(|t| t.to_string_lossy() == "anon_inode:[eventpoll]")
            })
            .find(|&fd| watched(fd).iter().any(|(t, _)| *t == inner))
            .expect("the reactor watches the channel's read watch")
    }

    async fn round_trip(ch: &Arc<Channel>, host: &mut std::os::unix::net::UnixStream) {
        ch.rewatch().expect("rewatch");
        let mut stream = ch.stream();
        host.write_all(b"ping").expect("host write");
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        stream.write_all(b"pong").await.expect("write");
        host.read_exact(&mut buf).expect("host read");
        assert_eq!(&buf, b"pong");
    }

    /// Connection after connection, the reactor watches the same two descriptors of the agent's
    /// own under the same keys, and never the channel socket: no key it could be handed back
    /// after a restore ever names a registration that was dropped.
    #[tokio::test(flavor = "current_thread")]
    async fn connections_come_and_go_without_the_reactor_seeing_a_new_key() {
        let (agent, mut host) = std::os::unix::net::UnixStream::pair().expect("pair");
        let socket = agent.as_raw_fd();
        let ch = Channel::new(agent.into()).expect("channel");
        let inner = ch.readable.epoll.with_fd(|fd| fd.as_raw_fd());
        round_trip(&ch, &mut host).await;
        let reactor = reactor_of(inner);
        let first = watched(reactor);
        let target = |fd: i32| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
        assert!(
            first.iter().all(|(fd, _)| target(*fd) != target(socket)),
            "the reactor watches the channel socket: {first:?}"
        );
        for _ in 0..3 {
            round_trip(&ch, &mut host).await;
            assert_eq!(watched(reactor), first, "the reactor's keys changed");
        }
    }

    /// A read waits for data without spinning, and sees the end once the host closes.
    #[tokio::test(flavor = "current_thread")]
    async fn a_read_waits_for_data_and_sees_the_end() {
        let (agent, mut host) = std::os::unix::net::UnixStream::pair().expect("pair");
        let ch = Channel::new(agent.into()).expect("channel");
        ch.rewatch().expect("rewatch");
        let mut stream = ch.stream();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            stream.read_to_end(&mut got).await.expect("read");
            got
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "read before any data");
        host.write_all(b"late").expect("host write");
        drop(host);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the read ends once the host closes")
            .expect("join");
        assert_eq!(got, b"late");
    }
}
