//! Relaying a connection's bytes between two sockets through kernel pipes (`splice(2)`): the
//! bytes go from one socket's receive queue to the other's send queue without being copied to
//! userspace, which is what lets a sandbox's connection through moat come close to the host's
//! own throughput.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::tokens::Tokens;

/// The capacity of each direction's pipe: the most bytes in flight through moat per direction
/// of a connection.
pub const PIPE_BYTES: usize = 256 * 1024;

/// A relayed connection with no byte either way for this long is closed (as NAT gateways do):
/// an idle connection holds six of the server's descriptors and a place among the server's
/// sandbox connections.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// A pipe's two ends.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-int array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just made and nothing else owns them.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A larger pipe moves more per call; where the kernel refuses, the default stands.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            libc::fcntl(
                pipe.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as i32,
            )
        };
        Ok(pipe)
    }
}

/// One non-blocking `splice` of at most `len` bytes from `from` to `to`.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two descriptors the caller holds open, no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// When a relayed connection last moved a byte, in milliseconds since it began.
struct Activity {
    began: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            began: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn moved(&self) {
        let ms = u64::try_from(self.began.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.began.elapsed().saturating_sub(last)
    }

    /// Ends (with an error) once no byte moved for `limit`.
    async fn until_idle(&self, limit: Duration) -> io::Error {
        loop {
            let idle = self.idle_for();
            if idle >= limit {
                return io::Error::new(io::ErrorKind::TimedOut, "the connection was idle");
            }
            tokio::time::sleep(limit - idle).await;
        }
    }
}

/// Moves bytes from `src` to `dst` until `src` ends, then ends `dst`'s sending side, held to
/// `bucket` when there is one; returns how many bytes went.
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    bucket: Option<&Tokens>,
    activity: &Activity,
) -> io::Result<u64> {
    let pipe = Pipe::new()?;
    let mut total = 0u64;
    loop {
        // Tokens are taken once there is something to send, so an idle connection holds none.
        let may = match bucket {
            Some(b) => {
                src.readable().await?;
                b.take_up_to(PIPE_BYTES).await
            }
            None => PIPE_BYTES,
        };
        let n = src
            .async_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), pipe.write.as_raw_fd(), may)
            })
            .await;
        if let Some(b) = bucket {
            b.give_back(may - n.as_ref().map_or(0, |n| *n));
        }
        let n = n?;
        activity.moved();
        if n == 0 {
            // SAFETY: shutdown(2) of a socket `dst` holds open.
            unsafe { libc::shutdown(dst.as_raw_fd(), libc::SHUT_WR) };
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            left -= dst
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
                })
                .await?;
        }
        total += n as u64;
    }
}

/// Relays `a` and `b` both ways until both directions have ended, the bytes from `a` held to
/// `a_to_b` and those from `b` to `b_to_a` where given; returns the bytes from `a` to `b` and
/// from `b` to `a`. An error in either direction ends both, as does [`IDLE_TIMEOUT`] without
/// a byte either way.
pub async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: Option<&Tokens>,
    b_to_a: Option<&Tokens>,
) -> io::Result<(u64, u64)> {
    relay_within(a, b, a_to_b, b_to_a, IDLE_TIMEOUT).await
}

/// [`relay`] with `idle` in place of [`IDLE_TIMEOUT`].
async fn relay_within(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: Option<&Tokens>,
    b_to_a: Option<&Tokens>,
    idle: Duration,
) -> io::Result<(u64, u64)> {
    let activity = Activity::new();
    let both = async {
        tokio::try_join!(
            one_way(a, b, a_to_b, &activity),
            one_way(b, a, b_to_a, &activity)
        )
    };
    tokio::select! {
        done = both => done,
        e = activity.until_idle(idle) => Err(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of sockets on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn bytes_go_both_ways_and_ends_are_passed_on() {
        let (mut client, near) = pair().await;
        let (far, mut server) = pair().await;
        let relay = tokio::spawn(async move { relay(&near, &far, None, None).await.unwrap() });
        let big = vec![7u8; 3 * PIPE_BYTES + 5];
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        server.write_all(b"answer").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"answer");
        assert_eq!(relay.await.unwrap(), (big.len() as u64, 6));
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
        let (mut client, near) = pair().await;
        let (far, mut server) = pair().await;
        let idle = Duration::from_millis(300);
        let relay = tokio::spawn(async move { relay_within(&near, &far, None, None, idle).await });
        // Bytes every 100 ms keep it open past the idle limit.
        for _ in 0..6 {
            client.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!relay.is_finished(), "a busy connection was closed");
        let ended = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("an idle connection stayed open")
            .unwrap();
        assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
