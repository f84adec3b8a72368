//! A sandbox's way out: its network namespace made into one where every connection and every
//! DNS query ends at a socket moat holds, and nothing is routed anywhere.
//!
//! The namespace keeps only its loopback interface. [`open`] makes every address local to it
//! (`local default` routes), adds an nftables chain that hands every TCP connection not meant
//! for the sandbox's own loopback to one transparent listener ([`rules`]), and binds, inside
//! the namespace, that listener and UDP sockets on port 53. Those sockets belong to the host
//! process that called [`open`]: what it accepts there, it decides on and, when a policy
//! allows, relays through connections of its own. The sandbox has no interface that leads
//! anywhere, so changing its own namespace's routes or rules (should it get the capability)
//! gains it nothing: every packet it sends still ends inside its namespace.

mod netlink;
mod rules;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::sys::cvt_int;
use crate::{JailError, Result};

/// The port, inside the sandbox's namespace, of the listener every connection is handed to.
/// Port 1 (tcpmux, unused) so that it never takes a port a sandbox's own service wants.
pub const STEERING_PORT: u16 = 1;

/// The port DNS queries are answered on, at every address of the sandbox's namespace.
pub const DNS_PORT: u16 = 53;

/// The sockets moat holds in a sandbox's network namespace.
#[derive(Debug)]
pub struct EgressSockets {
    /// A listening, non-blocking TCP socket (IPv6 with IPv4 mapped, where the host has IPv6)
    /// that every connection the sandbox makes, except to its own loopback, arrives at. An
    /// accepted connection's local address is where the sandbox meant to connect.
    pub connections: OwnedFd,
    /// A non-blocking UDP socket on port 53 of every IPv4 address, with `IP_PKTINFO`: the
    /// address a query was sent to is the one its answer must come from.
    pub dns_v4: OwnedFd,
    /// The same for IPv6 (`IPV6_RECVPKTINFO`); `None` where the host has no IPv6.
    pub dns_v6: Option<OwnedFd>,
}

/// Makes the network namespace of the process `pidfd` refers to (a sandbox's first process)
/// one where everything ends at moat, as the module's notes say, and returns the sockets
/// made in it. Applying it again (a server adopting a kept sandbox) replaces the rules and
/// makes new sockets. Blocking; runs on a thread of its own, which alone enters the
/// namespace.
pub fn open(pidfd: BorrowedFd<'_>) -> Result<EgressSockets> {
    let pidfd = pidfd.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns(2) on this thread only, which ends when this closure returns:
            // no other code runs in the sandbox's namespace.
            cvt_int(unsafe { libc::setns(pidfd, libc::CLONE_NEWNET) })
                .map_err(|e| JailError::os("enter the sandbox's network namespace", e))?;
            set_up()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(JailError::Invalid(
                "the network set-up thread panicked".into(),
            ))
        })
    })
}

/// The routes, rules and sockets, in the calling thread's network namespace.
fn set_up() -> Result<EgressSockets> {
    // SAFETY: a NUL-terminated name.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if lo == 0 {
        return Err(JailError::last_os("find the loopback interface"));
    }
    rules::set_up_link(lo).map_err(|e| JailError::os("bring the loopback interface up", e))?;
    rules::route_everything_local(libc::AF_INET as u8, lo)
        .map_err(|e| JailError::os("route every IPv4 address to loopback", e))?;
    let ipv6 = match rules::route_everything_local(libc::AF_INET6 as u8, lo) {
        Ok(()) => true,
        // IPv6 off on this host (or in this namespace): there is nothing to steer.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EAFNOSUPPORT | libc::EOPNOTSUPP)
            ) =>
        {
            false
        }
        Err(e) => return Err(JailError::os("route every IPv6 address to loopback", e)),
    };
    rules::install_steering(STEERING_PORT)
        .map_err(|e| JailError::os("install the nftables steering chain", e))?;
    let connections = listener(ipv6).map_err(|e| JailError::os("bind the egress listener", e))?;
    let dns_v4 = dns_socket(false).map_err(|e| JailError::os("bind the IPv4 DNS socket", e))?;
    let dns_v6 = if ipv6 {
        Some(dns_socket(true).map_err(|e| JailError::os("bind the IPv6 DNS socket", e))?)
    } else {
        None
    };
    Ok(EgressSockets {
        connections,
        dns_v4,
        dns_v6,
    })
}

/// Whether this host can make a sandbox's network as [`open`] does (nftables with tproxy,
/// local routes), tried in a scratch network namespace; the error says what failed.
pub fn probe() -> Result<()> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(2) of this thread's network namespace alone; the thread ends
            // with the closure, and the namespace with it.
            cvt_int(unsafe { libc::unshare(libc::CLONE_NEWNET) })
                .map_err(|e| JailError::os("make a network namespace", e))?;
            set_up().map(drop)
        })
        .join()
        .unwrap_or_else(|_| Err(JailError::Invalid("the network probe panicked".into())))
    })
}

fn socket(family: libc::c_int, kind: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = cvt_int(unsafe {
        libc::socket(family, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    })?;
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_flag(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, on: bool) -> io::Result<()> {
    let v: libc::c_int = on.into();
    // SAFETY: setsockopt with an int of the size given.
    cvt_int(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Binds `fd` to the wildcard address of its family, port `port`.
fn bind_any(fd: &OwnedFd, v6: bool, port: u16) -> io::Result<()> {
    if v6 {
        // SAFETY: all-zero is the IPv6 wildcard address.
        let mut a: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        a.sin6_port = port.to_be();
        // SAFETY: `a` is a sockaddr_in6 of the size given.
        cvt_int(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const a).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        })
        .map(drop)
    } else {
        // SAFETY: all-zero is the IPv4 wildcard address.
        let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        a.sin_family = libc::AF_INET as libc::sa_family_t;
        a.sin_port = port.to_be();
        // SAFETY: `a` is a sockaddr_in of the size given.
        cvt_int(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const a).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        })
        .map(drop)
    }
}

/// `IP_TRANSPARENT` and `IPV6_TRANSPARENT`: what lets the tproxy rule hand a socket
/// connections for addresses it is not bound to.
const IP_TRANSPARENT: libc::c_int = 19;
const IPV6_TRANSPARENT: libc::c_int = 75;

fn listener(ipv6: bool) -> io::Result<OwnedFd> {
    let fd = if ipv6 {
        let fd = socket(libc::AF_INET6, libc::SOCK_STREAM)?;
        set_flag(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, false)?;
        set_flag(&fd, libc::IPPROTO_IPV6, IPV6_TRANSPARENT, true)?;
        fd
    } else {
        socket(libc::AF_INET, libc::SOCK_STREAM)?
    };
    set_flag(&fd, libc::IPPROTO_IP, IP_TRANSPARENT, true)?;
    set_flag(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, true)?;
    bind_any(&fd, ipv6, STEERING_PORT)?;
    // SAFETY: listen(2) on a bound socket.
    cvt_int(unsafe { libc::listen(fd.as_raw_fd(), 1024) })?;
    Ok(fd)
}

fn dns_socket(v6: bool) -> io::Result<OwnedFd> {
    let fd = if v6 {
        let fd = socket(libc::AF_INET6, libc::SOCK_DGRAM)?;
        set_flag(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, true)?;
        set_flag(&fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, true)?;
        // IPv6 sends from an address the interface does not hold (the resolver address the
        // sandbox asked) only from a transparent socket; IPv4 takes any local route's.
        set_flag(&fd, libc::IPPROTO_IPV6, IPV6_TRANSPARENT, true)?;
        fd
    } else {
        let fd = socket(libc::AF_INET, libc::SOCK_DGRAM)?;
        set_flag(&fd, libc::IPPROTO_IP, libc::IP_PKTINFO, true)?;
        fd
    };
    set_flag(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, true)?;
    bind_any(&fd, v6, DNS_PORT)?;
    Ok(fd)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    use super::*;

    /// A process in a network namespace of its own, parked until dropped.
    struct Netns {
        pid: libc::pid_t,
        pidfd: OwnedFd,
    }

    impl Netns {
        fn new() -> Option<Netns> {
            let mut ready = [0i32; 2];
            // SAFETY: pipe(2) into a two-int array.
            assert_eq!(unsafe { libc::pipe(ready.as_mut_ptr()) }, 0);
            // SAFETY: fork(2) in a test; the child only calls async-signal-safe functions.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: the child: its own network namespace, then a byte to say so, then
                // parked until killed.
                unsafe {
                    if libc::unshare(libc::CLONE_NEWNET) != 0 {
                        libc::_exit(1);
                    }
                    libc::write(ready[1], [1u8].as_ptr().cast(), 1);
                    loop {
                        libc::pause();
                    }
                }
            }
            let mut b = [0u8; 1];
            // SAFETY: read one byte into `b`, then close both ends of our pipe.
            unsafe {
                libc::close(ready[1]);
                assert_eq!(libc::read(ready[0], b.as_mut_ptr().cast(), 1), 1);
                libc::close(ready[0]);
            }
            // SAFETY: pidfd_open on our own child.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            if fd < 0 {
                return None;
            }
            // SAFETY: a fresh pidfd nothing else owns.
            let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            Some(Netns { pid, pidfd })
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            // SAFETY: kill and reap our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Runs `f` on a thread inside `ns`'s network namespace.
    fn inside<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
        let fd = ns.pidfd.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: this thread alone enters the namespace and ends afterwards.
                assert_eq!(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }, 0);
                f()
            })
            .join()
            .unwrap()
        })
    }

    #[test]
    fn every_connection_out_of_the_namespace_reaches_the_listener() {
        if !is_root() {
            eprintln!("skipped: needs root to make network namespaces");
            return;
        }
        probe().unwrap();
        // A namespace whose loopback is down: `open` brings it up.
        let ns = Netns::new().unwrap();
        let sockets = open(ns.pidfd.as_fd()).unwrap();
        // Opening again (a server adopting a kept sandbox) replaces what the first made.
        drop(sockets);
        let sockets = open(ns.pidfd.as_fd()).unwrap();
        let listener = TcpListener::from(sockets.connections);
        listener.set_nonblocking(false).unwrap();
        let (dests, own) = inside(&ns, || {
            // The sandbox's own loopback services are its own.
            let own = TcpListener::bind("127.0.0.1:8080").unwrap();
            let mut dests = Vec::new();
            for to in ["203.0.113.10:443", "169.254.169.254:80", "[2001:db8::1]:22"] {
                let mut c = TcpStream::connect(to).unwrap();
                c.write_all(b"x").unwrap();
                let (mut accepted, _) = listener.accept().unwrap();
                let mut b = [0u8; 1];
                accepted.read_exact(&mut b).unwrap();
                dests.push(accepted.local_addr().unwrap().to_string());
            }
            let _c = TcpStream::connect("127.0.0.1:8080").unwrap();
            let own_reached = own.accept().is_ok();
            (dests, own_reached)
        });
        assert_eq!(
            dests,
            [
                "[::ffff:203.0.113.10]:443",
                "[::ffff:169.254.169.254]:80",
                "[2001:db8::1]:22"
            ]
        );
        assert!(
            own,
            "a connection to the sandbox's own loopback stays its own"
        );
        // DNS to any resolver address arrives at the DNS socket.
        let dns = std::net::UdpSocket::from(sockets.dns_v4);
        dns.set_nonblocking(false).unwrap();
        inside(&ns, || {
            let q = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            q.send_to(b"query", "198.51.100.53:53").unwrap();
        });
        let mut b = [0u8; 16];
        let (n, _) = dns.recv_from(&mut b).unwrap();
        assert_eq!(&b[..n], b"query");
    }
}
