//! The connections of a sandbox: each one accepted at the sandbox's steering listener is
//! decided on by the policy, and, if allowed, relayed through a connection moat opens itself
//! to the address the sandbox meant. A refused one is reset at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::policy::{Verdict, canonical};
use super::sniff::{MAX_SNIFF, Sniffed, Sniffer};
use super::{MAX_CONNECTIONS, OPEN_CONNECTIONS, SandboxNet, answerer, host_addresses};
use crate::tenant_slots::SlotsFull;

/// How long moat waits for the remote end to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection that must name its host may take to send that name.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts the sandbox's connections until the task is aborted.
/// Connections being relayed end when `ended` changes (the sandbox's egress is dropped).
pub(super) async fn serve(
    listener: TcpListener,
    net: Arc<SandboxNet>,
    ended: tokio::sync::watch::Receiver<()>,
) {
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning.
                tracing::warn!(sandbox = %net.id, "accepting a sandbox connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(dest) = conn.local_addr() else {
            reset(conn);
            continue;
        };
        let dest = SocketAddr::new(canonical(dest.ip()), dest.port());
        let Ok(permit) = net.connections.clone().try_acquire_owned() else {
            net.deny(
                dest.to_string(),
                format!("too many open connections (the most is {MAX_CONNECTIONS})"),
                false,
            );
            reset(conn);
            continue;
        };
        let owner = net.owner();
        let server_permit = match OPEN_CONNECTIONS.enter(&owner) {
            Ok(permit) => permit,
            Err(full) => {
                let reason = match full {
                    SlotsFull::Tenant => format!(
                        "tenant {owner}'s sandboxes have {} connections open, the most one \
                         tenant may have",
                        OPEN_CONNECTIONS.per_tenant()
                    ),
                    SlotsFull::Server => format!(
                        "the server has {} sandbox connections open, its most",
                        super::connections_total()
                    ),
                };
                net.deny(dest.to_string(), reason, false);
                reset(conn);
                continue;
            }
        };
        if let Err(reason) = net.connect_token() {
            net.deny(dest.to_string(), reason, false);
            reset(conn);
            continue;
        }
        let net = net.clone();
        let mut ended = ended.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = handle(conn, dest, &net) => {}
                _ = ended.changed() => {}
            }
            drop((permit, server_permit));
        });
    }
}

/// Ends `conn` with a reset rather than a clean close: the sandbox learns at once that the
/// connection was refused.
fn reset(conn: TcpStream) {
    let _ = conn.set_zero_linger();
    drop(conn);
}

async fn handle(mut conn: TcpStream, dest: SocketAddr, net: &SandboxNet) {
    let policy = net.policy();
    // DNS over TCP goes to the answerer, whichever resolver address it was sent to.
    if dest.port() == crate::network::answerer::DNS_PORT {
        answerer::serve_tcp(conn, net).await;
        return;
    }
    let host = host_addresses();
    let verdict = policy.decide(dest.ip(), dest.port(), net.pinned(dest.ip()), &host);
    let mut first = Vec::new();
    match verdict {
        Verdict::Allow => {}
        Verdict::Deny(reason) => {
            net.deny(dest.to_string(), reason, false);
            reset(conn);
            return;
        }
        Verdict::IfNamed => {
            let name = tokio::time::timeout(SNIFF_TIMEOUT, read_name(&mut conn, &mut first))
                .await
                .unwrap_or(None);
            // The policy as it is now: one updated while the name was awaited decides.
            let policy = net.policy();
            if let Verdict::Deny(reason) =
                policy.decide(dest.ip(), dest.port(), net.pinned(dest.ip()), &host)
            {
                net.deny(dest.to_string(), reason, false);
                reset(conn);
                return;
            }
            let refusal = match name {
                Some(name)
                    if policy.name_allowed_on(&name, dest.port())
                        && net.pinned_to(dest.ip(), &name) =>
                {
                    None
                }
                Some(name) => Some(format!(
                    "{name} is not an allowed name that moat resolved to {}",
                    dest.ip()
                )),
                None => Some(
                    "an address allowed by name needs the name in TLS (SNI) or HTTP (Host)".into(),
                ),
            };
            if let Some(reason) = refusal {
                net.deny(dest.to_string(), reason, false);
                reset(conn);
                return;
            }
            // Plain HTTP: moat read the first request's Host only, so that request is the
            // connection's last.
            if first.first() != Some(&0x16) {
                first = super::sniff::one_request_only(&first);
            }
        }
    }
    // An address of a local route (a prefix routed to `lo`, say) is the host's, though no
    // interface lists it; asked of the kernel (which answers at once), at most once a second
    // per address, as routes change. Not known is refused.
    let ip = dest.ip();
    let refusal = match super::route::ends_at_host_cached(ip) {
        Ok(false) => None,
        Ok(true) => Some(format!("{ip} is the host itself (a local route)")),
        Err(e) => Some(format!("the route to {ip} could not be checked: {e}")),
    };
    if let Some(reason) = refusal {
        net.deny(dest.to_string(), reason, false);
        reset(conn);
        return;
    }
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dest)).await {
        Ok(Ok(s)) => s,
        // Unreachable or refused out there: the sandbox sees its connection end the same way.
        Ok(Err(_)) | Err(_) => {
            reset(conn);
            return;
        }
    };
    // An address the host holds that no check above knew of (a local route, a NAT that loops
    // back): the kernel makes such a connection from the address itself.
    if upstream
        .local_addr()
        .is_ok_and(|local| canonical(local.ip()) == dest.ip())
    {
        net.deny(
            dest.to_string(),
            format!("{} is the host itself", dest.ip()),
            false,
        );
        reset(conn);
        return;
    }
    net.count(|c| &c.connections, 1);
    let _ = upstream.set_nodelay(true);
    let _ = conn.set_nodelay(true);
    if !first.is_empty() {
        if upstream.write_all(&first).await.is_err() {
            reset(conn);
            return;
        }
        net.count(|c| &c.bytes_out, first.len() as u64);
    }
    let (out_bucket, in_bucket) = net.buckets();
    if let Ok((out, back)) = super::splice::relay(&conn, &upstream, out_bucket, in_bucket).await {
        net.count(|c| &c.bytes_out, out);
        net.count(|c| &c.bytes_in, back);
    }
}

/// Reads from `conn` into `buf` until its first bytes show the name they carry.
async fn read_name(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 4096];
    let mut sniffer = Sniffer::default();
    loop {
        match sniffer.sniff(buf) {
            Sniffed::Name(n) => return Some(n),
            Sniffed::None => return None,
            Sniffed::More if buf.len() >= MAX_SNIFF => return None,
            Sniffed::More => {}
        }
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
