//! The DNS answerer of a sandbox: every query it sends, to any address, arrives here (UDP on
//! the backend's DNS sockets, TCP through the connection proxy). A name the policy does not
//! allow is refused without being asked of anyone; an allowed one is asked of the policy's
//! resolvers (else the host's), over UDP and over TCP when the answer was truncated. An
//! answer that points the name at an address the sandbox may not reach becomes NXDOMAIN
//! (rebinding), and every address in an answer is pinned to the name asked.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::dns::{Question, RCODE_NXDOMAIN, RCODE_REFUSED, RCODE_SERVFAIL, read_answer, set_id};
use super::policy::{SpecialRange, Target, special_range};
use super::{SandboxNet, host_addresses, host_resolvers};

/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// How long one resolver has to answer.
pub const RESOLVER_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest DNS message read or relayed.
const MAX_MESSAGE: usize = 65535;
/// The most queries one TCP connection may carry, and how long it may stay idle.
const TCP_QUERIES: usize = 64;
const TCP_IDLE: Duration = Duration::from_secs(10);

/// A UDP socket of the backend's, with the address each query was sent to.
pub(super) struct DnsSocket {
    fd: AsyncFd<OwnedFd>,
    v6: bool,
}

impl DnsSocket {
    pub(super) fn new(fd: OwnedFd) -> io::Result<DnsSocket> {
        // SAFETY: an all-zero sockaddr_storage is valid to fill.
        let mut addr: libc::sockaddr_storage = unsafe { zeroed() };
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: getsockname into a buffer of the size given.
        if unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut addr).cast(), &mut len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let v6 = i32::from(addr.ss_family) == libc::AF_INET6;
        // SAFETY: the OwnedFd stays open for as long as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(DnsSocket { fd, v6 })
    }

    /// Receives a query: its length, who sent it, and the address it was sent to.
    async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, IpAddr)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_with_dest(fd.get_ref().as_raw_fd(), buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends `msg` to `to` from the address `from` (the one the query was sent to).
    async fn send(&self, msg: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| send_from(fd.get_ref().as_raw_fd(), self.v6, msg, to, from)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

fn sockaddr_of(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let a = unsafe { &*(&raw const *addr).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let a = unsafe { &*(&raw const *addr).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Room for one `in_pktinfo` or `in6_pktinfo` control message.
const CONTROL: usize = 64;

fn recv_with_dest(fd: i32, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, IpAddr)> {
    // SAFETY: zeroed storage for the peer's address and the control messages.
    let mut peer: libc::sockaddr_storage = unsafe { zeroed() };
    let mut control = [0u64; CONTROL / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr, filled below.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&raw mut peer).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL;
    // SAFETY: every pointer in `msg` is valid for the lengths it gives.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let peer = sockaddr_of(&peer)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no sender address"))?;
    let mut dest = None;
    // SAFETY: the CMSG macros walk the control buffer recvmsg filled, within its length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            let fits = |n: usize| h.cmsg_len >= libc::CMSG_LEN(n as u32) as usize;
            if h.cmsg_level == libc::IPPROTO_IP
                && h.cmsg_type == libc::IP_PKTINFO
                && fits(size_of::<libc::in_pktinfo>())
            {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>());
                dest = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_addr.s_addr,
                ))));
            } else if h.cmsg_level == libc::IPPROTO_IPV6
                && h.cmsg_type == libc::IPV6_PKTINFO
                && fits(size_of::<libc::in6_pktinfo>())
            {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>());
                dest = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let dest =
        dest.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no destination address"))?;
    Ok((n as usize, peer, dest))
}

/// Writes one control message of `level` and `kind` carrying `info` at the start of
/// `control`; returns the length to give as `msg_controllen`.
fn put_control<T: Copy>(control: &mut [u64; CONTROL / 8], level: i32, kind: i32, info: T) -> usize {
    let len = size_of::<T>() as u32;
    let base = control.as_mut_ptr().cast::<libc::cmsghdr>();
    // SAFETY: `base` points at the start of the buffer, aligned for cmsghdr (a u64 array) and
    // CONTROL bytes long, more than CMSG_SPACE of a pktinfo: the header fields and the data
    // CMSG_DATA points at are within it. Raw pointers throughout, no reference to the header.
    unsafe {
        (&raw mut (*base).cmsg_level).write(level);
        (&raw mut (*base).cmsg_type).write(kind);
        (&raw mut (*base).cmsg_len).write(libc::CMSG_LEN(len) as usize);
        std::ptr::write_unaligned(libc::CMSG_DATA(base).cast::<T>(), info);
        libc::CMSG_SPACE(len) as usize
    }
}

fn send_from(fd: i32, v6: bool, data: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<()> {
    // SAFETY: zeroed storage for the destination.
    let mut dest: libc::sockaddr_storage = unsafe { zeroed() };
    let mut control = [0u64; CONTROL / 8];
    let (dest_len, control_len) = match (v6, to, from) {
        (false, SocketAddr::V4(to), IpAddr::V4(from)) => {
            // SAFETY: sockaddr_storage has room for a sockaddr_in.
            let a = unsafe { &mut *(&raw mut dest).cast::<libc::sockaddr_in>() };
            a.sin_family = libc::AF_INET as libc::sa_family_t;
            a.sin_port = to.port().to_be();
            a.sin_addr.s_addr = u32::from(*to.ip()).to_be();
            // SAFETY: an all-zero in_pktinfo is valid; its source address is set below.
            let mut info: libc::in_pktinfo = unsafe { zeroed() };
            info.ipi_spec_dst.s_addr = u32::from(from).to_be();
            let len = put_control(&mut control, libc::IPPROTO_IP, libc::IP_PKTINFO, info);
            (size_of::<libc::sockaddr_in>(), len)
        }
        (true, SocketAddr::V6(to), IpAddr::V6(from)) => {
            // SAFETY: sockaddr_storage has room for a sockaddr_in6.
            let a = unsafe { &mut *(&raw mut dest).cast::<libc::sockaddr_in6>() };
            a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            a.sin6_port = to.port().to_be();
            a.sin6_addr.s6_addr = to.ip().octets();
            a.sin6_scope_id = to.scope_id();
            // SAFETY: an all-zero in6_pktinfo is valid; its source address is set below.
            let mut info: libc::in6_pktinfo = unsafe { zeroed() };
            info.ipi6_addr.s6_addr = from.octets();
            let len = put_control(&mut control, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info);
            (size_of::<libc::sockaddr_in6>(), len)
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a DNS answer across address families",
            ));
        }
    };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr, filled below.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&raw mut dest).cast();
    msg.msg_namelen = dest_len as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control_len;
    // SAFETY: every pointer in `msg` is valid for the lengths it gives.
    if unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Answers the queries arriving on `sock` until the task is aborted.
/// Queries being answered end when `ended` changes (the sandbox's egress is dropped).
pub(super) async fn serve(
    sock: DnsSocket,
    net: Arc<SandboxNet>,
    ended: tokio::sync::watch::Receiver<()>,
) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, peer, dest) = match sock.recv(&mut buf).await {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => continue,
            Err(e) => {
                tracing::warn!(sandbox = %net.id, "reading a DNS query: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Some(refusal) = over_rate(&buf[..n], &net) {
            let _ = sock.send(&refusal, peer, dest).await;
            continue;
        }
        // Past the limit, a query is dropped: the client retries, as it would on loss.
        let Ok(permit) = net.dns_in_flight.clone().try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, net, mut ended) = (sock.clone(), net.clone(), ended.clone());
        tokio::spawn(async move {
            tokio::select! {
                reply = answer(&query, &net, false) => {
                    if let Some(reply) = reply {
                        let _ = sock.send(&reply, peer, dest).await;
                    }
                }
                _ = ended.changed() => {}
            }
            drop(permit);
        });
    }
}

/// Answers DNS over TCP (length-prefixed messages) on `conn`.
pub(super) async fn serve_tcp(mut conn: TcpStream, net: &SandboxNet) {
    for _ in 0..TCP_QUERIES {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
        match tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let reply = match over_rate(&query, net) {
            Some(refusal) => refusal,
            None => {
                // Held to the same count of queries being answered as over UDP: a sandbox's
                // connections must not each have a query upstream.
                let Ok(_permit) = net.dns_in_flight.clone().acquire_owned().await else {
                    return;
                };
                match answer(&query, net, true).await {
                    Some(reply) => reply,
                    None => return,
                }
            }
        };
        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        match tokio::time::timeout(TCP_IDLE, conn.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

/// A refusal of `query` when the sandbox (or its tenant) is over its DNS rate, taking a token
/// otherwise.
fn over_rate(query: &[u8], net: &SandboxNet) -> Option<Vec<u8>> {
    let Err(reason) = net.dns_token() else {
        return None;
    };
    let q = Question::parse(query)?;
    net.deny(q.name.clone(), reason, true);
    Some(q.reply(query, RCODE_REFUSED))
}

/// The answer to `query`, or `None` for a message that is not one query.
async fn answer(query: &[u8], net: &SandboxNet, tcp: bool) -> Option<Vec<u8>> {
    let q = Question::parse(query)?;
    let policy = net.policy();
    if !policy.resolves_names() || !policy.name_allowed(&q.name) {
        net.deny(q.name.clone(), "the name is not allowed".into(), true);
        return Some(q.reply(query, RCODE_REFUSED));
    }
    let host = host_addresses();
    // Reverse lookups of closed addresses (or of whole zones) would tell the sandbox the names
    // of the host's private networks.
    if is_reverse(&q.name) && reverse_closed(&q.name, &host) {
        net.deny(
            q.name.clone(),
            "reverse lookups of closed addresses are not answered".into(),
            true,
        );
        return Some(q.reply(query, RCODE_REFUSED));
    }
    let resolvers: Vec<SocketAddr> = if policy.dns_servers.is_empty() {
        // The host's own configuration: its resolvers may well be on its loopback.
        host_resolvers().to_vec()
    } else {
        // A policy's resolvers were checked when it was set; an address the host has taken
        // since is still never asked.
        policy
            .dns_servers
            .iter()
            .filter(|ip| special_range(**ip, &host).is_none_or(|s| s.openable))
            .map(|ip| SocketAddr::new(*ip, DNS_PORT))
            .collect()
    };
    let mut reply = None;
    for r in resolvers {
        if let Some(a) = ask(r, &q, tcp).await {
            reply = Some(a);
            break;
        }
    }
    let Some(mut reply) = reply else {
        return Some(q.reply(query, RCODE_SERVFAIL));
    };
    set_id(&mut reply, q.id);
    let Some(read) = read_answer(&reply) else {
        return Some(q.reply(query, RCODE_SERVFAIL));
    };
    // A record of a closed address's reverse name (reached through an alias of an open
    // name) would tell what the question alone may not.
    if let Some(owner) = read
        .owners
        .iter()
        .find(|o| is_reverse(o) && reverse_closed(o, &host))
    {
        net.deny(
            q.name.clone(),
            format!("the answer holds {owner}, a reverse lookup of a closed address"),
            true,
        );
        return Some(q.reply(query, RCODE_REFUSED));
    }
    // Every address anywhere in the answer, glue and hints included, must be one the
    // sandbox may reach.
    for addr in &read.all {
        if let Some(special) = special_range(*addr, &host)
            && !opened(&policy.allow, &special, *addr)
        {
            net.deny(
                q.name.clone(),
                format!("an answer pointed it at {addr}, which is {}", special.what),
                true,
            );
            return Some(q.reply(query, RCODE_NXDOMAIN));
        }
    }
    for (addr, ttl) in read.answers {
        net.pin(addr, &q.name, ttl);
    }
    net.count(|c| &c.dns_answered, 1);
    Some(reply)
}

/// Whether `name` is in a reverse-lookup zone.
fn is_reverse(name: &str) -> bool {
    name == "in-addr.arpa"
        || name == "ip6.arpa"
        || name.ends_with(".in-addr.arpa")
        || name.ends_with(".ip6.arpa")
}

/// The whole address a reverse-lookup name stands for (`4.3.2.1.in-addr.arpa`, 32 nibbles of
/// `ip6.arpa`); `None` for anything else, zones included.
/// Whether the reverse-lookup name `name` tells of a closed address: the whole address it
/// stands for is closed, or (a zone's name, or a classless delegation's such as
/// `9.0-25.113.0.203.in-addr.arpa`) the network its whole-number labels next to the zone
/// name stand for overlaps a closed range. The zones themselves are closed.
fn reverse_closed(name: &str, host: &[IpAddr]) -> bool {
    if let Some(a) = reverse_address(name) {
        return special_range(a, host).is_some();
    }
    reverse_prefix(name).is_none_or(|net| super::policy::overlaps_special(&net, host))
}

/// The network the labels of `name` next to its reverse zone's name stand for (`113.0.203`
/// of `x.113.0.203.in-addr.arpa`: 203.0.113.0/24); `None` with none.
fn reverse_prefix(name: &str) -> Option<super::policy::IpNet> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let mut octets = [0u8; 4];
        let mut n = 0;
        for label in rest.rsplit('.').take(4) {
            let Ok(o) = label.parse::<u8>() else { break };
            octets[n] = o;
            n += 1;
        }
        return (n > 0)
            .then(|| super::policy::IpNet::new(IpAddr::V4(Ipv4Addr::from(octets)), 8 * n as u8))
            .flatten();
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let mut bytes = [0u8; 16];
    let mut n = 0;
    for label in rest.rsplit('.').take(32) {
        let Some(nibble) = (label.len() == 1)
            .then(|| u8::from_str_radix(label, 16).ok())
            .flatten()
        else {
            break;
        };
        bytes[n / 2] |= if n % 2 == 0 { nibble << 4 } else { nibble };
        n += 1;
    }
    (n > 0)
        .then(|| super::policy::IpNet::new(IpAddr::V6(Ipv6Addr::from(bytes)), 4 * n as u8))
        .flatten()
}

fn reverse_address(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let octets: Vec<u8> = rest
            .split('.')
            .map(|l| l.parse().ok())
            .collect::<Option<_>>()?;
        let [d, c, b, a] = octets[..] else {
            return None;
        };
        return Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = rest
        .split('.')
        .map(|l| {
            (l.len() == 1)
                .then(|| u8::from_str_radix(l, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, pair) in nibbles.rchunks(2).enumerate() {
        bytes[i] = pair[1] << 4 | pair[0];
    }
    Some(IpAddr::V6(Ipv6Addr::from(bytes)))
}

/// Whether an allow rule inside `special` names `addr`.
fn opened(allow: &[super::policy::Rule], special: &SpecialRange, addr: IpAddr) -> bool {
    special.openable
        && allow.iter().any(
            |r| matches!(&r.target, Target::Net(n) if special.net.covers(n) && n.contains(addr)),
        )
}

/// Asks `resolver` the question `q` as a query of moat's own making (a fresh random id, so an
/// answer cannot be forged by guessing the sandbox's; nothing of the sandbox's message but
/// the question). Over UDP for a UDP client, whose truncated answer it gets as it is (it
/// retries over TCP, which comes here too); over TCP for a TCP client.
async fn ask(resolver: SocketAddr, q: &Question, tcp: bool) -> Option<Vec<u8>> {
    let mut id = [0u8; 2];
    getrandom::fill(&mut id).ok()?;
    let id = u16::from_be_bytes(id);
    let query = q.upstream_query(id);
    let is_answer =
        |a: &[u8]| a.len() >= 12 && u16::from_be_bytes([a[0], a[1]]) == id && a[2] & 0x80 != 0;
    let asked = async {
        if !tcp {
            let local: SocketAddr = match resolver {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let sock = UdpSocket::bind(local).await.ok()?;
            sock.connect(resolver).await.ok()?;
            sock.send(&query).await.ok()?;
            let mut buf = vec![0u8; MAX_MESSAGE];
            loop {
                let n = sock.recv(&mut buf).await.ok()?;
                if is_answer(&buf[..n]) {
                    return Some(buf[..n].to_vec());
                }
            }
        }
        let mut conn = TcpStream::connect(resolver).await.ok()?;
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&query);
        conn.write_all(&framed).await.ok()?;
        let mut len = [0u8; 2];
        conn.read_exact(&mut len).await.ok()?;
        let mut a = vec![0u8; u16::from_be_bytes(len) as usize];
        conn.read_exact(&mut a).await.ok()?;
        is_answer(&a).then_some(a)
    };
    tokio::time::timeout(RESOLVER_TIMEOUT, asked)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names_are_read_as_their_addresses() {
        assert_eq!(
            reverse_address("10.113.0.203.in-addr.arpa"),
            Some("203.0.113.10".parse().unwrap())
        );
        assert_eq!(
            reverse_address(
                "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
            ),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(reverse_address("10.in-addr.arpa"), None);
        // Zones and classless delegations: by the network their labels stand for.
        let host = [];
        assert!(reverse_closed("10.in-addr.arpa", &host));
        assert!(reverse_closed("254.169.in-addr.arpa", &host));
        assert!(reverse_closed("in-addr.arpa", &host));
        assert!(!reverse_closed("113.0.203.in-addr.arpa", &host));
        assert!(!reverse_closed("9.0-25.113.0.203.in-addr.arpa", &host));
        assert!(reverse_closed("9.0-25.1.168.192.in-addr.arpa", &host));
        assert!(reverse_closed("c.f.ip6.arpa", &host), "fc00::/7");
        assert!(!reverse_closed("8.b.d.0.1.0.0.2.ip6.arpa", &host));
        assert_eq!(reverse_address("300.1.1.1.in-addr.arpa"), None);
        assert!(is_reverse("10.in-addr.arpa") && !is_reverse("example.com"));
    }
}
