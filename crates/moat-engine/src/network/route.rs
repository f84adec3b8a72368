//! Which kind of route the host's kernel takes to an address. A connection to an address its
//! local table holds (`RTN_LOCAL`: every address of a local route, also one whose connections
//! leave from another source address, such as an IPv6 local prefix) reaches the host itself,
//! whatever its interfaces list.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// `RTM_GETROUTE`, and the `RTM_NEWROUTE` it is answered with.
const RTM_GETROUTE: u16 = 26;
const RTM_NEWROUTE: u16 = 24;
/// `NLMSG_ERROR`: the kernel's refusal (no route at all, say).
const NLMSG_ERROR: u16 = 2;
/// `RTA_DST`.
const RTA_DST: u16 = 1;
/// Route types that end at the host: local, broadcast, anycast.
const RTN_LOCAL: u8 = 2;
const RTN_BROADCAST: u8 = 3;
const RTN_ANYCAST: u8 = 4;
/// Where `rtm_type` is in an answer: after the 16-byte header, the 8th byte of `rtmsg`.
const TYPE_AT: usize = 16 + 7;

/// The `RTM_GETROUTE` request for `dest`: header, `rtmsg`, one `RTA_DST`.
fn request(dest: IpAddr) -> Vec<u8> {
    let (family, bits, octets): (u8, u8, Vec<u8>) = match dest {
        IpAddr::V4(a) => (libc::AF_INET as u8, 32, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, 128, a.octets().to_vec()),
    };
    let attr_len = 4 + octets.len();
    let len = 16 + 12 + attr_len;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32).
    m.extend_from_slice(&[family, bits, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&RTA_DST.to_ne_bytes());
    m.extend_from_slice(&octets);
    m
}

/// How long an answer of [`ends_at_host`] is kept: a sandbox's connections to one address
/// ask the kernel once a second at most, and a route changed is seen within that.
const CACHED_FOR: Duration = Duration::from_secs(1);
/// Destinations whose answers are kept at once; past it the cache starts again.
const CACHED_MAX: usize = 4096;

/// [`ends_at_host`], its answers kept for [`CACHED_FOR`] (errors are not kept).
pub fn ends_at_host_cached(dest: IpAddr) -> io::Result<bool> {
    type Cache = Mutex<HashMap<IpAddr, (Instant, bool)>>;
    static CACHE: LazyLock<Cache> = LazyLock::new(Mutex::default);
    let now = Instant::now();
    if let Some((at, answer)) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).get(&dest)
        && now.duration_since(*at) < CACHED_FOR
    {
        return Ok(*answer);
    }
    let answer = ends_at_host(dest)?;
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= CACHED_MAX {
        cache.clear();
    }
    cache.insert(dest, (now, answer));
    Ok(answer)
}

/// Whether the host's kernel (in the calling thread's network namespace) delivers a
/// connection to `dest` to the host itself. An address with no route is not the host's.
pub fn ends_at_host(dest: IpAddr) -> io::Result<bool> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let msg = request(dest);
    // SAFETY: an all-zero sockaddr_nl addresses the kernel.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `msg` and `addr` are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // The kernel answers a route request while sending it: the answer is there already, and
    // reading it never waits (no answer is an error, so the caller never blocks).
    let mut buf = [0u8; 1024];
    let n = loop {
        // SAFETY: `buf` is valid for its length.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let answer = &buf[..n];
    match answer.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]])) {
        Some(RTM_NEWROUTE) => Ok(matches!(
            answer.get(TYPE_AT),
            Some(&(RTN_LOCAL | RTN_BROADCAST | RTN_ANYCAST))
        )),
        // No route at all: nothing of the host's either. Any other refusal is not known.
        Some(NLMSG_ERROR) => {
            let errno = answer
                .get(16..20)
                .map(|b| -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            match errno {
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => Ok(false),
                Some(e) => Err(io::Error::from_raw_os_error(e)),
                None => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a short netlink error",
                )),
            }
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "an unexpected netlink answer",
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_the_host_and_an_address_out_there_is_not() {
        assert!(ends_at_host("127.0.0.1".parse().unwrap()).unwrap());
        assert!(ends_at_host("127.9.9.9".parse().unwrap()).unwrap());
        assert!(ends_at_host("::1".parse().unwrap()).unwrap());
        // Routed out (or not routed at all): not the host's.
        assert!(!ends_at_host("203.0.113.9".parse().unwrap()).unwrap());
    }
}
