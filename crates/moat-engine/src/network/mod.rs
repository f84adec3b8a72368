//! Sandbox networking: the policy ([`policy`]) and the host side that enforces it.
//!
//! A sandbox with an egress policy has no route anywhere: its backend makes every connection
//! and DNS query it sends end at sockets the engine holds ([`EgressSockets`]). For each
//! connection, the engine decides on the address it was meant for, reads the name its first
//! bytes carry where a domain rule needs it ([`sniff`]), and only then opens a connection of
//! its own and relays the bytes ([`proxy`], through kernel pipes: `splice`). DNS queries are answered by the engine
//! ([`answerer`]): names the policy does not allow are refused, the rest are asked of the
//! policy's resolvers (else the host's), answers that point a name at an address the sandbox
//! may not reach become NXDOMAIN, and every address handed out for an allowed name is pinned
//! to that name, so a domain rule allows exactly the addresses moat resolved for it.

mod answerer;
pub mod dns;
pub mod policy;
mod proxy;
mod route;
pub mod sniff;
mod splice;
mod tokens;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use moat_proto::v1;
pub use policy::EgressPolicy;
use serde::{Deserialize, Serialize};
use tokens::Tokens;

/// The most connections a sandbox may have open through moat at once.
pub const MAX_CONNECTIONS: usize = 256;
/// The most DNS queries of a sandbox being answered at once.
pub const MAX_DNS_IN_FLIGHT: usize = 32;
/// The most connections all sandboxes of this server may have open through it at once.
pub const MAX_CONNECTIONS_TOTAL: usize = 16_384;
/// Connections a sandbox may open a second, on average; bursts up to [`CONNECT_BURST`]. Each
/// one the server makes takes a local port and, once closed, a while in TIME_WAIT: this keeps
/// one sandbox from using up the ports every tenant shares.
pub const CONNECT_RATE: f64 = 100.0;
/// The most connections a sandbox may open at once after a quiet while.
pub const CONNECT_BURST: f64 = 200.0;
/// DNS queries a sandbox may send a second, on average; bursts up to [`DNS_BURST`]. Names are a
/// channel out (`dig $(secret).allowed.example`): this bounds it.
pub const DNS_RATE: f64 = 100.0;
/// The most DNS queries a sandbox may send at once after a quiet while.
pub const DNS_BURST: f64 = 200.0;
/// DNS queries all sandboxes of one tenant may send a second together, and their burst: a
/// tenant's many sandboxes ask the host's resolvers, which every tenant and the server share,
/// no more than ten sandboxes at their own rate may.
pub const TENANT_DNS_RATE: f64 = 1000.0;
/// The burst of [`TENANT_DNS_RATE`].
pub const TENANT_DNS_BURST: f64 = 2000.0;
/// New connections all sandboxes of one tenant may open a second together (the host's local
/// ports are shared), and their burst.
pub const TENANT_CONNECT_RATE: f64 = 1000.0;
/// The burst of [`TENANT_CONNECT_RATE`].
pub const TENANT_CONNECT_BURST: f64 = 2000.0;

/// The rates one tenant's sandboxes share.
#[derive(Debug)]
struct TenantRates {
    dns: Tokens,
    connect: Tokens,
}

/// The rates of `tenant`'s sandboxes, made on first use (one entry per tenant that has had a
/// sandbox with a network: as many as the store holds tenants).
fn tenant_rates(tenant: &str) -> Arc<TenantRates> {
    static RATES: std::sync::LazyLock<Mutex<std::collections::HashMap<String, Arc<TenantRates>>>> =
        std::sync::LazyLock::new(Mutex::default);
    RATES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(tenant.to_owned())
        .or_insert_with(|| {
            Arc::new(TenantRates {
                dns: Tokens::new(TENANT_DNS_RATE, TENANT_DNS_BURST),
                connect: Tokens::new(TENANT_CONNECT_RATE, TENANT_CONNECT_BURST),
            })
        })
        .clone()
}

/// The most (address, name) pins a sandbox holds; the oldest go first.
pub const MAX_PINS: usize = 4096;
/// How long a pin outlives the answer's TTL, at least: clients cache answers longer than they
/// are told to.
pub const MIN_PIN: Duration = Duration::from_secs(600);

/// The sockets a backend made in a sandbox's network namespace, which the engine serves the
/// sandbox's policy on.
#[derive(Debug)]
pub struct EgressSockets {
    /// A listening, non-blocking TCP socket every connection of the sandbox arrives at; an
    /// accepted connection's local address is where the sandbox meant to connect.
    pub connections: OwnedFd,
    /// Non-blocking UDP sockets every DNS query arrives at (IPv4 with `IP_PKTINFO`, IPv6 with
    /// `IPV6_RECVPKTINFO` where the host has it).
    pub dns_v4: OwnedFd,
    /// The IPv6 one.
    pub dns_v6: Option<OwnedFd>,
}

/// What the server gives every sandbox's egress.
#[derive(Debug, Clone, Default)]
pub struct EgressSettings {
    /// The server's totals every sandbox's counters add to (its metrics).
    pub totals: Arc<Counters>,
    /// Bytes a second a sandbox may move each way through its connections together; no limit
    /// when `None`.
    pub bandwidth: Option<u64>,
}

/// How a sandbox reaches the network.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkPolicy {
    /// No interface but loopback.
    #[default]
    None,
    /// Out through moat, as the policy allows.
    Egress(EgressPolicy),
}

impl NetworkPolicy {
    /// The policy a client's `network` asks for, every entry checked; a malformed one is
    /// refused naming it (`network.allow[2]: ...`).
    pub fn from_v1(n: &v1::Network) -> Result<NetworkPolicy, String> {
        let rules = |list: &[String], name: &str| -> Result<Vec<policy::Rule>, String> {
            if list.len() > policy::MAX_RULES {
                return Err(format!(
                    "network.{name} has {} rules; the most is {}",
                    list.len(),
                    policy::MAX_RULES
                ));
            }
            list.iter()
                .enumerate()
                .map(|(i, r)| r.parse().map_err(|e| format!("network.{name}[{i}]: {e}")))
                .collect()
        };
        let allow = rules(&n.allow, "allow")?;
        let deny = rules(&n.deny, "deny")?;
        if n.dns_servers.len() > policy::MAX_DNS_SERVERS {
            return Err(format!(
                "network.dns_servers names {}; the most is {}",
                n.dns_servers.len(),
                policy::MAX_DNS_SERVERS
            ));
        }
        let dns_servers = n
            .dns_servers
            .iter()
            .enumerate()
            .map(|(i, a)| {
                a.parse::<IpAddr>()
                    .map_err(|_| format!("network.dns_servers[{i}]: {a:?} is not an IP address"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if n.is_none() {
            if !deny.is_empty() || !dns_servers.is_empty() {
                return Err(
                    "network: deny rules and dns_servers need internet: true or an \
                            allow rule (without either, the sandbox has no network)"
                        .into(),
                );
            }
            return Ok(NetworkPolicy::None);
        }
        Ok(NetworkPolicy::Egress(EgressPolicy {
            internet: n.internet,
            allow,
            deny,
            dns_servers,
        }))
    }

    /// The policy as the API shows it.
    pub fn to_v1(&self) -> v1::Network {
        match self {
            NetworkPolicy::None => v1::Network::default(),
            NetworkPolicy::Egress(p) => v1::Network {
                internet: p.internet,
                allow: p.allow.iter().map(ToString::to_string).collect(),
                deny: p.deny.iter().map(ToString::to_string).collect(),
                dns_servers: p.dns_servers.iter().map(ToString::to_string).collect(),
            },
        }
    }
}

/// Counters of one sandbox's network use.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections allowed and opened.
    pub connections: AtomicU64,
    /// Connections refused.
    pub denied: AtomicU64,
    /// Bytes the sandbox sent through its connections.
    pub bytes_out: AtomicU64,
    /// Bytes it received through them.
    pub bytes_in: AtomicU64,
    /// DNS queries answered from a resolver.
    pub dns_answered: AtomicU64,
    /// DNS queries refused (a name not allowed, an answer pointing somewhere closed).
    pub dns_refused: AtomicU64,
}

/// The most recent denials a sandbox keeps, for operators to see what it tried.
pub const RECENT_DENIALS: usize = 32;

/// Addresses handed out for allowed names, with when each pin ends.
#[derive(Debug, Default)]
struct Pins {
    by_addr: HashMap<IpAddr, Vec<(String, Instant)>>,
    count: usize,
}

impl Pins {
    fn add(&mut self, addr: IpAddr, name: &str, until: Instant) {
        let now = Instant::now();
        if self.count >= MAX_PINS {
            self.by_addr.retain(|_, names| {
                names.retain(|(_, end)| *end > now);
                !names.is_empty()
            });
            self.count = self.by_addr.values().map(Vec::len).sum();
            if self.count >= MAX_PINS {
                // Still full of live pins: the ones ending first go.
                let mut ends: Vec<Instant> = self
                    .by_addr
                    .values()
                    .flat_map(|v| v.iter().map(|(_, e)| *e))
                    .collect();
                ends.sort();
                let cut = ends[ends.len() / 4];
                self.by_addr.retain(|_, names| {
                    names.retain(|(_, end)| *end > cut);
                    !names.is_empty()
                });
                self.count = self.by_addr.values().map(Vec::len).sum();
            }
        }
        let names = self.by_addr.entry(addr).or_default();
        match names.iter_mut().find(|(n, _)| n == name) {
            Some(pin) => pin.1 = pin.1.max(until),
            None => {
                names.push((name.to_owned(), until));
                self.count += 1;
            }
        }
    }

    fn any(&self, addr: IpAddr) -> bool {
        let now = Instant::now();
        self.by_addr
            .get(&addr)
            .is_some_and(|v| v.iter().any(|(_, end)| *end > now))
    }

    fn has(&self, addr: IpAddr, name: &str) -> bool {
        let now = Instant::now();
        self.by_addr
            .get(&addr)
            .is_some_and(|v| v.iter().any(|(n, end)| n == name && *end > now))
    }
}

/// Connections open through this server, all sandboxes together: at most
/// [`connections_total`], so that sandboxes' connections cannot take the descriptors the API,
/// the store and new sandboxes need; and one tenant's sandboxes at most a
/// [`TENANT_SHARE_OF_CONNECTIONS`]th of that, so that one tenant's cannot take every other
/// tenant's. Sized on first use, after the server has raised its limit.
static OPEN_CONNECTIONS: std::sync::LazyLock<Arc<crate::tenant_slots::TenantSlots>> =
    std::sync::LazyLock::new(|| {
        let total = connections_total();
        crate::tenant_slots::TenantSlots::new(
            (total / TENANT_SHARE_OF_CONNECTIONS).max(1),
            Some(total),
        )
    });

/// One tenant's sandboxes may have at most this fraction of [`connections_total`] open (1/4).
pub const TENANT_SHARE_OF_CONNECTIONS: usize = 4;

/// How many connections all sandboxes together may have open through this server: at most
/// [`MAX_CONNECTIONS_TOTAL`], and at most a sixteenth of the server's open-file limit (each
/// takes six descriptors: its two sockets and two pipes).
pub fn connections_total() -> usize {
    let soft = crate::host_limits::nofile().map_or(1024, |l| l.soft);
    usize::try_from(soft / 16)
        .unwrap_or(usize::MAX)
        .clamp(16, MAX_CONNECTIONS_TOTAL)
}

/// One sandbox's network state, shared by its connection and DNS tasks.
#[derive(Debug)]
pub struct SandboxNet {
    id: String,
    /// The tenant its connections count for (a warm-pool member's changes when it is
    /// claimed).
    owner: RwLock<Arc<str>>,
    policy: RwLock<Arc<EgressPolicy>>,
    pins: Mutex<Pins>,
    counters: Counters,
    /// The server's totals over every sandbox (its metrics).
    totals: Arc<Counters>,
    denials: Mutex<std::collections::VecDeque<v1::Denial>>,
    connections: Arc<tokio::sync::Semaphore>,
    /// Its DNS queries' rate.
    dns_rate: Tokens,
    /// Its DNS queries being answered (over UDP and TCP together).
    dns_in_flight: Arc<tokio::sync::Semaphore>,
    /// Its new connections' rate.
    connect_rate: Tokens,
    /// The bandwidth out of and into the sandbox, when limited.
    bandwidth: Option<(Tokens, Tokens)>,
}

impl SandboxNet {
    /// Takes one DNS query's token; why not when the sandbox is over [`DNS_RATE`] or its
    /// tenant over [`TENANT_DNS_RATE`].
    fn dns_token(&self) -> Result<(), String> {
        if !self.dns_rate.try_take() {
            return Err(format!("over the DNS rate of {DNS_RATE} queries a second"));
        }
        if !tenant_rates(&self.owner()).dns.try_take() {
            return Err(format!(
                "over the DNS rate of {TENANT_DNS_RATE} queries a second of the tenant's \
                 sandboxes together"
            ));
        }
        Ok(())
    }

    /// Takes one new connection's token; why not when the sandbox is over [`CONNECT_RATE`]
    /// or its tenant over [`TENANT_CONNECT_RATE`].
    fn connect_token(&self) -> Result<(), String> {
        if !self.connect_rate.try_take() {
            return Err(format!(
                "over the rate of {CONNECT_RATE} new connections a second"
            ));
        }
        if !tenant_rates(&self.owner()).connect.try_take() {
            return Err(format!(
                "over the rate of {TENANT_CONNECT_RATE} new connections a second of the \
                 tenant's sandboxes together"
            ));
        }
        Ok(())
    }

    /// The buckets its bytes out and in are held to, when its bandwidth is limited.
    fn buckets(&self) -> (Option<&Tokens>, Option<&Tokens>) {
        match &self.bandwidth {
            Some((out, back)) => (Some(out), Some(back)),
            None => (None, None),
        }
    }

    /// Adds `n` to a counter of this sandbox's and to the same one of the server's totals.
    fn count(&self, counter: fn(&Counters) -> &AtomicU64, n: u64) {
        counter(&self.counters).fetch_add(n, Ordering::Relaxed);
        counter(&self.totals).fetch_add(n, Ordering::Relaxed);
    }

    fn owner(&self) -> Arc<str> {
        self.owner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn policy(&self) -> Arc<EgressPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn deny(&self, target: String, reason: String, dns: bool) {
        if dns {
            self.count(|c| &c.dns_refused, 1);
        } else {
            self.count(|c| &c.denied, 1);
        }
        tracing::debug!(sandbox = %self.id, %target, %reason, "egress denied");
        let mut d = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        if d.len() == RECENT_DENIALS {
            d.pop_front();
        }
        d.push_back(v1::Denial {
            at_ms: u64::try_from(crate::clock::now_ms()).unwrap_or_default(),
            target,
            reason,
        });
    }

    fn pinned(&self, addr: IpAddr) -> bool {
        self.pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .any(policy::canonical(addr))
    }

    fn pinned_to(&self, addr: IpAddr, name: &str) -> bool {
        self.pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .has(policy::canonical(addr), name)
    }

    fn pin(&self, addr: IpAddr, name: &str, ttl: u32) {
        let until = Instant::now() + MIN_PIN.max(Duration::from_secs(u64::from(ttl)));
        self.pins.lock().unwrap_or_else(|e| e.into_inner()).add(
            policy::canonical(addr),
            name,
            until,
        );
    }
}

/// A sandbox's egress being served: its tasks end when this is dropped.
#[derive(Debug)]
pub struct Egress {
    net: Arc<SandboxNet>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Dropped with this: every connection being relayed sees it and ends.
    _ended: tokio::sync::watch::Sender<()>,
}

impl Egress {
    /// Serves `policy` for sandbox `id` of tenant `owner` on `sockets`, counting into its own
    /// counters and the server's totals, within the server's `settings`. Must be called within
    /// a Tokio runtime.
    pub fn start(
        id: &str,
        owner: &str,
        policy: EgressPolicy,
        sockets: EgressSockets,
        settings: &EgressSettings,
    ) -> std::io::Result<Egress> {
        let net = Arc::new(SandboxNet {
            id: id.to_owned(),
            owner: RwLock::new(owner.into()),
            policy: RwLock::new(Arc::new(policy)),
            pins: Mutex::default(),
            counters: Counters::default(),
            totals: settings.totals.clone(),
            denials: Mutex::default(),
            connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            dns_rate: Tokens::new(DNS_RATE, DNS_BURST),
            dns_in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_DNS_IN_FLIGHT)),
            connect_rate: Tokens::new(CONNECT_RATE, CONNECT_BURST),
            bandwidth: settings.bandwidth.map(|rate| {
                // A second's worth may go at once.
                let rate = rate.max(1) as f64;
                (Tokens::new(rate, rate), Tokens::new(rate, rate))
            }),
        });
        // Everything that can fail comes first: a task spawned before a failure would be left
        // serving the sandbox with nothing to stop it.
        let listener = std::net::TcpListener::from(sockets.connections);
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let dns = std::iter::once(sockets.dns_v4)
            .chain(sockets.dns_v6)
            .map(answerer::DnsSocket::new)
            .collect::<std::io::Result<Vec<_>>>()?;
        let (ended, watch) = tokio::sync::watch::channel(());
        let mut tasks = vec![tokio::spawn(proxy::serve(listener, net.clone(), watch))];
        for sock in dns {
            tasks.push(tokio::spawn(answerer::serve(
                sock,
                net.clone(),
                ended.subscribe(),
            )));
        }
        Ok(Egress {
            net,
            tasks,
            _ended: ended,
        })
    }

    /// Replaces the policy: new connections and queries meet it at once; connections already
    /// open stay open.
    pub fn set_policy(&self, policy: EgressPolicy) {
        *self.net.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// Makes `tenant` the one its new connections count for (a warm-pool member claimed);
    /// connections already open stay counted where they were.
    pub fn set_owner(&self, tenant: &str) {
        *self.net.owner.write().unwrap_or_else(|e| e.into_inner()) = tenant.into();
    }

    /// The policy being served.
    pub fn policy(&self) -> EgressPolicy {
        (*self.net.policy()).clone()
    }

    /// The counters and latest denials.
    pub fn stats(&self) -> v1::NetworkStats {
        let c = &self.net.counters;
        v1::NetworkStats {
            connections: c.connections.load(Ordering::Relaxed),
            denied: c.denied.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            dns_answered: c.dns_answered.load(Ordering::Relaxed),
            dns_refused: c.dns_refused.load(Ordering::Relaxed),
            recent_denials: self
                .net
                .denials
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect(),
        }
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        // Ends the listeners; relayed connections end with their tasks.
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The host's own addresses, read at most once a second: a sandbox may never reach them.
pub fn host_addresses() -> Arc<Vec<IpAddr>> {
    static CACHE: HostFacts<IpAddr> = Mutex::new(None);
    fresh(&CACHE, read_host_addresses)
}

/// Something read from the host, and when.
type HostFacts<T> = Mutex<Option<(Instant, Arc<Vec<T>>)>>;

/// What `cache` holds if it was read less than a second ago, else `read` afresh.
fn fresh<T>(cache: &HostFacts<T>, read: fn() -> Vec<T>) -> Arc<Vec<T>> {
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, facts)) = &*cache
        && at.elapsed() < Duration::from_secs(1)
    {
        return facts.clone();
    }
    let facts = Arc::new(read());
    *cache = Some((Instant::now(), facts.clone()));
    facts
}

fn read_host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        tracing::warn!(
            "reading the host's addresses: {}",
            std::io::Error::last_os_error()
        );
        return out;
    }
    let mut at = list;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*at };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family says its real type.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: the family is AF_INET, so it is a sockaddr_in.
                    let a = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                    out.push(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()));
                }
                libc::AF_INET6 => {
                    // SAFETY: the family is AF_INET6, so it is a sockaddr_in6.
                    let a = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                    out.push(IpAddr::from(a.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        at = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    out
}

/// The resolvers of the host (`nameserver` lines of `/etc/resolv.conf`), on port 53, read at
/// most once a second.
pub fn host_resolvers() -> Arc<Vec<SocketAddr>> {
    static CACHE: HostFacts<SocketAddr> = Mutex::new(None);
    fresh(&CACHE, read_host_resolvers)
}

fn read_host_resolvers() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|a| a.split('%').next())
                .and_then(|a| a.parse::<IpAddr>().ok())
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .take(policy::MAX_DNS_SERVERS)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_s_sandboxes_share_its_rates() {
        let (a, b) = (tenant_rates("rates-a"), tenant_rates("rates-a"));
        assert!(Arc::ptr_eq(&a, &b));
        let mut taken = 0;
        while a.dns.try_take() {
            taken += 1;
            assert!(
                taken <= 2 * TENANT_DNS_BURST as usize,
                "no end to the burst"
            );
        }
        // What one sandbox used is gone for the other; another tenant has its own.
        assert!(taken >= TENANT_DNS_BURST as usize - 1);
        assert!(!b.dns.try_take());
        assert!(tenant_rates("rates-b").dns.try_take());
        assert!(b.connect.try_take());
    }

    #[test]
    fn pins_end_and_stay_bounded() {
        let mut p = Pins::default();
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        let later = Instant::now() + Duration::from_secs(60);
        p.add(a, "x.com", later);
        assert!(p.any(a) && p.has(a, "x.com") && !p.has(a, "y.com"));
        p.add(a, "gone.com", Instant::now());
        assert!(!p.has(a, "gone.com"));
        for i in 0..(MAX_PINS as u32 * 2) {
            p.add(IpAddr::from(i.to_be_bytes()), "n.com", later);
        }
        assert!(p.count <= MAX_PINS);
    }

    #[test]
    fn the_host_has_addresses_and_loopback_is_one() {
        let addrs = host_addresses();
        assert!(addrs.contains(&"127.0.0.1".parse().unwrap()), "{addrs:?}");
    }
}
