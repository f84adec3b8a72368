//! What a sandbox may reach: the egress policy, its rules as clients write them, and the one
//! decision every connection and DNS answer goes through.
//!
//! A rule names a network (`10.0.0.0/8`, `203.0.113.7`, `2001:db8::/32`) or a domain
//! (`pypi.org`, `*.example.com`), optionally with a port or port range
//! (`api.example.com:443`, `10.1.2.3:5432`, `[2001:db8::1]:80-89`). Among the network rules
//! that match an address, the most specific wins, and a deny wins over an allow of the same
//! prefix length. A domain rule is more specific than any network rule: a connection to an
//! address moat resolved for an allowed name, carrying that name (TLS SNI or HTTP Host), is
//! allowed even where a broader network rule denies (`allow pypi.org, deny 0.0.0.0/0`).
//! Addresses no rule names follow the policy's `internet` switch.
//!
//! Some addresses are special ([`special_range`]): the host's own, loopback, multicast and
//! the unspecified address are never reachable; link-local (with the cloud metadata
//! addresses), private and shared ranges are reachable only through an allow rule inside them
//! (`allow 10.1.0.0/16` opens that network; `allow 0.0.0.0/0` does not), and only for callers
//! with an admin key.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::{LazyLock, OnceLock};

use serde::{Deserialize, Serialize};

/// The most rules an allow or deny list may hold.
pub const MAX_RULES: usize = 256;
/// The most DNS servers a policy may name.
pub const MAX_DNS_SERVERS: usize = 4;

/// An IP network: an address with the bits past its prefix cleared, and the prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// The network of `addr`'s first `prefix` bits; `None` if the prefix is too long.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<IpNet> {
        let addr = canonical(addr);
        let masked = match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) if prefix <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            _ => return None,
        };
        Some(IpNet {
            addr: masked,
            prefix,
        })
    }

    /// The network holding `addr` alone.
    pub fn host(addr: IpAddr) -> IpNet {
        let addr = canonical(addr);
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        IpNet { addr, prefix }
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        IpNet::new(canonical(ip), self.prefix).is_some_and(|n| n.addr == self.addr)
    }

    /// Whether every address of `other` is in this network.
    pub fn covers(&self, other: &IpNet) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;

    /// `ADDR` or `ADDR/PREFIX`; an address with bits set past its prefix is refused, since it
    /// says something other than what it means.
    fn from_str(s: &str) -> std::result::Result<IpNet, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR network"))?;
        let Some(prefix) = prefix else {
            return Ok(IpNet::host(addr));
        };
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= bits)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {bits}"))?;
        // An IPv4-mapped network's prefix counts the mapping's 96 bits.
        let prefix = match addr {
            IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
                prefix.checked_sub(96).ok_or_else(|| {
                    format!("{s:?}: an IPv4-mapped network needs a prefix of at least 96")
                })?
            }
            _ => prefix,
        };
        let net = IpNet::new(addr, prefix).ok_or_else(|| format!("{s:?} is not a network"))?;
        if net.addr != canonical(addr) {
            return Err(format!(
                "{s:?} has bits set past its prefix; the network is {net}"
            ));
        }
        Ok(net)
    }
}

/// `ip`, with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as its IPv4 address: the two are
/// one destination and must meet one rule.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(a),
        },
        v4 => v4,
    }
}

/// The address a connection to `ip` really reaches, for every decision: [`canonical`], and an
/// IPv4 address embedded in the well-known NAT64 prefix (`64:ff9b::/96`) as that IPv4 address,
/// since a NAT64 gateway takes the connection there.
pub fn destination(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(a) if a.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] => {
            let o = a.octets();
            IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
        }
        other => other,
    }
}

/// A domain name pattern: an exact name, or `*.` and a name for every name below it (not the
/// name itself). Lowercase, without a trailing dot: names match as DNS compares them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainPattern {
    /// The name, or the suffix after `*.`.
    name: String,
    wildcard: bool,
}

impl DomainPattern {
    /// Whether `name` (as a client sent it: any case, a trailing dot or not) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if self.wildcard {
            name.len() > self.name.len() + 1
                && name.as_bytes()[name.len() - self.name.len() - 1] == b'.'
                && name[name.len() - self.name.len()..].eq_ignore_ascii_case(&self.name)
        } else {
            name.eq_ignore_ascii_case(&self.name)
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

impl FromStr for DomainPattern {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<DomainPattern, String> {
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = rest.strip_suffix('.').unwrap_or(rest).to_ascii_lowercase();
        if !name.is_ascii() {
            return Err(format!(
                "{s:?}: write an international domain name in its ASCII (xn--) form"
            ));
        }
        if name.is_empty() || name.len() > 253 {
            return Err(format!("{s:?} is not a domain name"));
        }
        for label in name.split('.') {
            let ok = (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(format!(
                    "{s:?} is not a domain name (labels are 1 to 63 letters, digits, '-' and '_')"
                ));
            }
        }
        if name.parse::<Ipv4Addr>().is_ok() || name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        {
            return Err(format!("{s:?} is not a domain name"));
        }
        Ok(DomainPattern { name, wildcard })
    }
}

/// What a rule names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A network or single address.
    Net(IpNet),
    /// A domain name or `*.` pattern.
    Domain(DomainPattern),
}

/// One allow or deny rule: a target and, optionally, the ports it is limited to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// What it names.
    pub target: Target,
    /// The first and last port it applies to; every port when `None`.
    pub ports: Option<(u16, u16)>,
}

impl Rule {
    /// Whether the rule applies to `port`.
    pub fn has_port(&self, port: u16) -> bool {
        self.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&port))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports = match self.ports {
            None => String::new(),
            Some((lo, hi)) if lo == hi => format!(":{lo}"),
            Some((lo, hi)) => format!(":{lo}-{hi}"),
        };
        match &self.target {
            Target::Net(n) if ports.is_empty() => write!(f, "{n}"),
            Target::Net(n) if n.addr.is_ipv6() => write!(f, "[{n}]{ports}"),
            Target::Net(n) => write!(f, "{n}{ports}"),
            Target::Domain(d) => write!(f, "{d}{ports}"),
        }
    }
}

fn parse_ports(s: &str, whole: &str) -> std::result::Result<(u16, u16), String> {
    let bad = || format!("{whole:?}: the port must be 1 to 65535, or a range LOW-HIGH of them");
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (lo, hi),
        None => (s, s),
    };
    let lo: u16 = lo.parse().map_err(|_| bad())?;
    let hi: u16 = hi.parse().map_err(|_| bad())?;
    if lo == 0 || hi < lo {
        return Err(bad());
    }
    Ok((lo, hi))
}

impl FromStr for Rule {
    type Err = String;

    /// `NET`, `IP`, `DOMAIN` or `*.DOMAIN`, each optionally with `:PORT` or `:LOW-HIGH`; an
    /// IPv6 address or network with a port goes in brackets (`[2001:db8::/32]:443`).
    fn from_str(s: &str) -> std::result::Result<Rule, String> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: a '[' without its ']'"))?;
            let ports = match after {
                "" => None,
                p => Some(parse_ports(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{s:?}: expected ':' and a port after ']'"))?,
                    s,
                )?),
            };
            return Ok(Rule {
                target: Target::Net(inside.parse()?),
                ports,
            });
        }
        // Two colons or more: an IPv6 address or network, without a port.
        if s.matches(':').count() > 1 {
            return Ok(Rule {
                target: Target::Net(s.parse()?),
                ports: None,
            });
        }
        let (target, ports) = match s.split_once(':') {
            Some((t, p)) => (t, Some(parse_ports(p, s)?)),
            None => (s, None),
        };
        let looks_numeric = target
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/');
        let target = if looks_numeric || target.contains('/') {
            Target::Net(target.parse()?)
        } else {
            Target::Domain(target.parse()?)
        };
        Ok(Rule { target, ports })
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Rule, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An egress policy: what a sandbox with network access may reach.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EgressPolicy {
    /// Whether addresses no rule names (the public internet) are allowed rather than denied.
    pub internet: bool,
    /// Rules that allow.
    #[serde(default)]
    pub allow: Vec<Rule>,
    /// Rules that deny.
    #[serde(default)]
    pub deny: Vec<Rule>,
    /// The resolvers moat asks on the sandbox's behalf; the host's own (`/etc/resolv.conf`)
    /// when empty.
    #[serde(default)]
    pub dns_servers: Vec<IpAddr>,
}

/// A range of addresses with a rule of its own, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialRange {
    /// The range.
    pub net: IpNet,
    /// What it is, as a denial says it.
    pub what: &'static str,
    /// Whether an allow rule inside it can open it.
    pub openable: bool,
}

/// The special ranges, most specific first within each family.
const SPECIAL: &[(&str, &str, bool)] = &[
    ("169.254.169.254/32", "the cloud metadata address", true),
    ("100.100.100.200/32", "the cloud metadata address", true),
    ("168.63.129.16/32", "the Azure platform address", true),
    ("0.0.0.0/8", "the unspecified network", false),
    ("127.0.0.0/8", "the host's loopback", false),
    ("10.0.0.0/8", "a private network", true),
    ("172.16.0.0/12", "a private network", true),
    ("192.168.0.0/16", "a private network", true),
    ("100.64.0.0/10", "the shared address space", true),
    ("169.254.0.0/16", "a link-local network", true),
    ("192.0.0.0/24", "an IETF protocol network", true),
    ("198.18.0.0/15", "a benchmarking network", true),
    ("224.0.0.0/4", "multicast", false),
    ("240.0.0.0/4", "a reserved network", false),
    ("fd00:ec2::254/128", "the cloud metadata address", true),
    ("::/128", "the unspecified address", false),
    ("::1/128", "the host's loopback", false),
    ("::/96", "an IPv4-compatible address", false),
    ("64:ff9b::/96", "an IPv4/IPv6 translation network", true),
    ("64:ff9b:1::/48", "an IPv4/IPv6 translation network", true),
    ("100::/64", "a discard network", false),
    ("fc00::/7", "a private (unique local) network", true),
    ("fe80::/10", "a link-local network", true),
    ("ff00::/8", "multicast", false),
];

/// The special range `ip` is in, if any; the host's own addresses (`host`) come first, then
/// the networks the operator closed.
pub fn special_range(ip: IpAddr, host: &[IpAddr]) -> Option<SpecialRange> {
    let ip = destination(ip);
    if host.iter().any(|h| canonical(*h) == ip) {
        return Some(SpecialRange {
            net: IpNet::host(ip),
            what: "the host itself",
            openable: false,
        });
    }
    closed_ranges().find(|r| r.net.contains(ip)).copied()
}

/// Whether `net` holds any address a sandbox may never reach without a rule naming it: a
/// special range overlaps it, or an address of the host's (`host`) is in it.
pub fn overlaps_special(net: &IpNet, host: &[IpAddr]) -> bool {
    host.iter().any(|h| net.contains(*h))
        || closed_ranges().any(|r| r.net.covers(net) || net.covers(&r.net))
}

/// What a denial says of a network the operator closed.
pub const OPERATOR_CLOSED: &str = "a network closed by the server's operator";

/// The networks the operator closed to every sandbox (`moat serve --egress-deny`).
static OPERATOR_RANGES: OnceLock<Vec<SpecialRange>> = OnceLock::new();

/// Closes `nets` to every sandbox of this process, whatever its policy says: no rule opens
/// them, DNS answers pointing into them are refused, and webhooks are not sent there. For
/// what the host cannot tell is its own (a public address the cloud maps to it by 1:1 NAT, a
/// NAT64 gateway's network-specific prefix) and networks a site keeps apart. Set once, before
/// any sandbox has a network; a second call is refused.
pub fn close_networks(nets: &[IpNet]) -> std::result::Result<(), String> {
    let ranges = nets
        .iter()
        .map(|net| SpecialRange {
            net: *net,
            what: OPERATOR_CLOSED,
            openable: false,
        })
        .collect();
    OPERATOR_RANGES
        .set(ranges)
        .map_err(|_| "the closed networks were already set".to_owned())
}

/// Whether `ip` is in a network the operator closed ([`close_networks`]).
pub fn operator_closed(ip: IpAddr) -> bool {
    let ip = destination(ip);
    OPERATOR_RANGES
        .get()
        .is_some_and(|r| r.iter().any(|r| r.net.contains(ip)))
}

/// Every range a rule cannot simply reach: the operator's first (never openable, so they win
/// where they overlap a special range), then the special ranges.
fn closed_ranges() -> impl Iterator<Item = &'static SpecialRange> {
    OPERATOR_RANGES
        .get()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .chain(special_ranges())
}

/// Every special range, most specific first within each family.
fn special_ranges() -> &'static [SpecialRange] {
    static RANGES: LazyLock<Vec<SpecialRange>> = LazyLock::new(|| {
        SPECIAL
            .iter()
            .filter_map(|(net, what, openable)| {
                Some(SpecialRange {
                    net: net.parse().ok()?,
                    what,
                    openable: *openable,
                })
            })
            .collect()
    });
    &RANGES
}

/// Why a policy is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// It is malformed or too large, or opens what nothing may.
    #[error("{0}")]
    Invalid(String),
    /// It opens a range only an admin may.
    #[error("{0}")]
    NeedsAdmin(String),
}

/// Refuses naming `special` for `what` where nothing may, or where only an admin may.
fn check_special(
    what: &str,
    special: &SpecialRange,
    admin: bool,
) -> std::result::Result<(), PolicyError> {
    if !special.openable {
        return Err(PolicyError::Invalid(format!(
            "{what}: {} is never reachable from a sandbox",
            special.what
        )));
    }
    if !admin {
        return Err(PolicyError::NeedsAdmin(format!(
            "{what}: opening {} needs an admin key",
            special.what
        )));
    }
    Ok(())
}

/// Whether a connection may go, and the reason a denial gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It may go.
    Allow,
    /// It may go if it names (TLS SNI, HTTP Host) one of the allowed names the sandbox was
    /// given this address for.
    IfNamed,
    /// It may not; the reason names the rule or range.
    Deny(String),
}

impl EgressPolicy {
    /// Checks the policy's size and what its rules may open: `admin` callers alone may name
    /// private, link-local or metadata addresses.
    pub fn validate(&self, admin: bool) -> std::result::Result<(), PolicyError> {
        for (list, rules) in [("allow", &self.allow), ("deny", &self.deny)] {
            if rules.len() > MAX_RULES {
                return Err(PolicyError::Invalid(format!(
                    "the {list} list has {} rules; the most is {MAX_RULES}",
                    rules.len()
                )));
            }
        }
        if self.dns_servers.len() > MAX_DNS_SERVERS {
            return Err(PolicyError::Invalid(format!(
                "{} DNS servers named; the most is {MAX_DNS_SERVERS}",
                self.dns_servers.len()
            )));
        }
        for rule in &self.allow {
            let Target::Net(net) = &rule.target else {
                continue;
            };
            // Every special range the rule lies inside, not only the first: a rule inside a
            // range (and so able to open it) must be allowed to open each of them.
            for special in closed_ranges().filter(|s| s.net.covers(net)) {
                check_special(&format!("allow {rule}"), special, admin)?;
            }
        }
        for (i, server) in self.dns_servers.iter().enumerate() {
            if let Some(special) = special_range(*server, &[]) {
                check_special(&format!("dns_servers[{i}] {server}"), &special, admin)?;
            }
        }
        Ok(())
    }

    /// Whether the policy resolves names at all: with the internet on, or with a domain rule
    /// that allows.
    pub fn resolves_names(&self) -> bool {
        self.internet
            || self
                .allow
                .iter()
                .any(|r| matches!(r.target, Target::Domain(_)))
    }

    /// Whether DNS may answer for `name`: a domain deny rule refuses it; otherwise the
    /// internet or a domain allow rule must let it.
    pub fn name_allowed(&self, name: &str) -> bool {
        let matches = |rules: &[Rule]| {
            rules
                .iter()
                .any(|r| matches!(&r.target, Target::Domain(d) if d.matches(name)))
        };
        !matches(&self.deny) && (self.internet || matches(&self.allow))
    }

    /// Whether a connection naming `name` (TLS SNI, HTTP Host) to `port` is allowed by a
    /// domain allow rule, and not refused by a domain deny rule.
    pub fn name_allowed_on(&self, name: &str, port: u16) -> bool {
        let matches = |rules: &[Rule]| {
            rules.iter().any(|r| {
                r.has_port(port) && matches!(&r.target, Target::Domain(d) if d.matches(name))
            })
        };
        !matches(&self.deny) && matches(&self.allow)
    }

    /// The verdict on a connection to `ip`:`port`. `pinned` says whether moat answered one of
    /// the sandbox's DNS queries for an allowed name with this address; `host` holds the
    /// host's own addresses.
    pub fn decide<'a>(&'a self, ip: IpAddr, port: u16, pinned: bool, host: &[IpAddr]) -> Verdict {
        let ip = destination(ip);
        let special = special_range(ip, host);
        if let Some(s) = special
            && !s.openable
        {
            return Verdict::Deny(format!("{ip} is {}", s.what));
        }
        let most_specific = |rules: &'a [Rule]| -> Option<(u8, &'a Rule)> {
            rules
                .iter()
                .filter(|r| r.has_port(port))
                .filter_map(|r| match &r.target {
                    Target::Net(n) if n.contains(ip) => Some((n.prefix(), r)),
                    _ => None,
                })
                .max_by_key(|(p, _)| *p)
        };
        let allow = most_specific(&self.allow);
        let deny = most_specific(&self.deny);
        if let Some((a, rule)) = allow
            && deny.is_none_or(|(d, _)| a > d)
        {
            // Inside a special range, only an allow rule inside the range opens it.
            return match special {
                Some(s) if !matches!(&rule.target, Target::Net(n) if s.net.covers(n)) => {
                    Verdict::Deny(format!("{ip} is {}", s.what))
                }
                _ => Verdict::Allow,
            };
        }
        if let Some(s) = special {
            return Verdict::Deny(format!("{ip} is {}", s.what));
        }
        match deny {
            // A domain rule is more specific than any network rule.
            _ if pinned && (deny.is_some() || !self.internet) => Verdict::IfNamed,
            Some((_, rule)) => Verdict::Deny(format!("denied by {rule}")),
            None if self.internet => Verdict::Allow,
            None => Verdict::Deny(format!("{ip} is not allowed by the policy")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn policy(internet: bool, allow: &[&str], deny: &[&str]) -> EgressPolicy {
        EgressPolicy {
            internet,
            allow: allow.iter().map(|r| r.parse().unwrap()).collect(),
            deny: deny.iter().map(|r| r.parse().unwrap()).collect(),
            dns_servers: vec![],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_special_range_parses() {
        for (net, _, _) in SPECIAL {
            net.parse::<IpNet>().unwrap();
        }
    }

    #[test]
    fn rules_parse_and_print_back() {
        for s in [
            "10.0.0.0/8",
            "203.0.113.7/32",
            "2001:db8::/32",
            "[2001:db8::1/128]:443",
            "pypi.org",
            "*.example.com:443",
            "10.1.2.3/32:5432",
            "api.example.com:8000-8010",
        ] {
            let r: Rule = s.parse().unwrap();
            assert_eq!(r.to_string(), s, "{s}");
        }
        let r: Rule = "203.0.113.7".parse().unwrap();
        assert_eq!(r.to_string(), "203.0.113.7/32");
        let r: Rule = "PyPI.org.".parse().unwrap();
        assert_eq!(r.to_string(), "pypi.org");
        let r: Rule = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(r.to_string(), "10.0.0.0/8");
    }

    #[test]
    fn malformed_rules_are_refused_naming_the_entry() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.1/8",
            "300.1.1.1",
            "exa mple.com",
            "-bad.com",
            "*.",
            "例え.jp",
            "example.com:0",
            "example.com:99999",
            "example.com:90-80",
            "[2001:db8::1]443",
            "[2001:db8::1",
            "1.2.3",
        ] {
            let e = bad.parse::<Rule>().unwrap_err();
            assert!(
                e.contains(&format!("{bad:?}")) || bad.is_empty(),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn wildcards_match_names_below_and_names_match_as_dns_does() {
        let d: DomainPattern = "*.example.com".parse().unwrap();
        assert!(d.matches("a.example.com"));
        assert!(d.matches("A.B.Example.COM."));
        assert!(!d.matches("example.com"));
        assert!(!d.matches("badexample.com"));
        let e: DomainPattern = "example.com".parse().unwrap();
        assert!(e.matches("EXAMPLE.com."));
        assert!(!e.matches("a.example.com"));
    }

    #[test]
    fn the_most_specific_rule_wins_and_deny_wins_a_tie() {
        let host = [];
        let p = policy(
            false,
            &["203.0.113.0/24", "198.51.100.7"],
            &["203.0.113.128/25", "198.51.100.0/24"],
        );
        assert_eq!(
            p.decide(ip("203.0.113.1"), 80, false, &host),
            Verdict::Allow
        );
        assert!(
            matches!(p.decide(ip("203.0.113.200"), 80, false, &host), Verdict::Deny(r) if r.contains("203.0.113.128/25"))
        );
        assert_eq!(
            p.decide(ip("198.51.100.7"), 80, false, &host),
            Verdict::Allow
        );
        assert!(matches!(
            p.decide(ip("198.51.100.8"), 80, false, &host),
            Verdict::Deny(_)
        ));
        let tie = policy(true, &["203.0.113.0/24"], &["203.0.113.0/24"]);
        assert!(matches!(
            tie.decide(ip("203.0.113.1"), 80, false, &host),
            Verdict::Deny(_)
        ));
        // Unnamed addresses follow the internet switch.
        assert!(matches!(
            p.decide(ip("8.8.8.8"), 80, false, &host),
            Verdict::Deny(_)
        ));
        let open = policy(true, &[], &["8.8.8.8"]);
        assert_eq!(
            open.decide(ip("1.1.1.1"), 443, false, &host),
            Verdict::Allow
        );
        assert!(matches!(
            open.decide(ip("8.8.8.8"), 443, false, &host),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            open.decide(ip("::ffff:8.8.8.8"), 443, false, &host),
            Verdict::Deny(_)
        ));
    }

    #[test]
    fn ports_limit_rules() {
        let p = policy(
            false,
            &["203.0.113.0/24:443", "198.51.100.0/24:8000-8010"],
            &[],
        );
        assert_eq!(p.decide(ip("203.0.113.1"), 443, false, &[]), Verdict::Allow);
        assert!(matches!(
            p.decide(ip("203.0.113.1"), 80, false, &[]),
            Verdict::Deny(_)
        ));
        assert_eq!(
            p.decide(ip("198.51.100.1"), 8005, false, &[]),
            Verdict::Allow
        );
        assert!(matches!(
            p.decide(ip("198.51.100.1"), 8011, false, &[]),
            Verdict::Deny(_)
        ));
    }

    #[test]
    fn special_ranges_stay_closed_to_the_internet_and_broad_rules() {
        let host = [ip("192.0.2.2")];
        let p = policy(true, &["0.0.0.0/0", "::/0"], &[]);
        for closed in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.100.100.200",
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
            "fe80::1",
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "192.0.2.2",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(
                matches!(p.decide(ip(closed), 80, false, &host), Verdict::Deny(_)),
                "{closed}"
            );
        }
        assert_eq!(
            p.decide(ip("203.0.113.9"), 80, false, &host),
            Verdict::Allow
        );
        // A rule inside a private range opens it; the host and loopback stay closed.
        let p = policy(false, &["10.1.0.0/16", "169.254.169.254"], &[]);
        assert_eq!(p.decide(ip("10.1.2.3"), 80, false, &host), Verdict::Allow);
        assert!(matches!(
            p.decide(ip("10.2.0.1"), 80, false, &host),
            Verdict::Deny(_)
        ));
        assert_eq!(
            p.decide(ip("169.254.169.254"), 80, false, &host),
            Verdict::Allow
        );
    }

    #[test]
    fn nat64_and_nested_ranges_are_judged_by_what_they_reach() {
        let open = policy(true, &[], &[]);
        // A NAT64 address of the metadata service is the metadata service.
        assert!(
            matches!(open.decide(ip("64:ff9b::a9fe:a9fe"), 80, false, &[]), Verdict::Deny(r) if r.contains("metadata"))
        );
        assert_eq!(
            open.decide(ip("64:ff9b::cb00:7101"), 80, false, &[]),
            Verdict::Allow
        );
        for closed in ["168.63.129.16", "100.100.100.200"] {
            assert!(
                matches!(open.decide(ip(closed), 80, false, &[]), Verdict::Deny(_)),
                "{closed}"
            );
        }
        // A rule spanning the metadata address and its neighbour is a rule in both ranges.
        let p = policy(false, &["169.254.169.254/31"], &[]);
        assert!(matches!(p.validate(false), Err(PolicyError::NeedsAdmin(_))));
        // Opening the shared space does not open Alibaba's metadata address inside it.
        let p = policy(false, &["100.64.0.0/10"], &[]);
        assert!(matches!(
            p.decide(ip("100.100.100.200"), 80, false, &[]),
            Verdict::Deny(_)
        ));
        assert_eq!(p.decide(ip("100.64.0.1"), 80, false, &[]), Verdict::Allow);
    }

    #[test]
    fn dns_servers_in_closed_ranges_are_refused() {
        let with = |dns: &str| EgressPolicy {
            internet: true,
            dns_servers: vec![ip(dns)],
            ..EgressPolicy::default()
        };
        assert!(matches!(
            with("127.0.0.53").validate(true),
            Err(PolicyError::Invalid(_))
        ));
        assert!(matches!(
            with("::ffff:127.0.0.1").validate(true),
            Err(PolicyError::Invalid(_))
        ));
        assert!(matches!(
            with("0.0.0.0").validate(true),
            Err(PolicyError::Invalid(_))
        ));
        assert!(matches!(
            with("10.0.0.2").validate(false),
            Err(PolicyError::NeedsAdmin(_))
        ));
        with("10.0.0.2").validate(true).unwrap();
        with("203.0.113.53").validate(false).unwrap();
    }

    #[test]
    fn opening_special_ranges_needs_an_admin_and_some_never_open() {
        let p = policy(false, &["10.1.0.0/16"], &[]);
        assert!(matches!(p.validate(false), Err(PolicyError::NeedsAdmin(_))));
        p.validate(true).unwrap();
        let p = policy(false, &["127.0.0.1"], &[]);
        assert!(matches!(p.validate(true), Err(PolicyError::Invalid(_))));
        // A broad rule opens nothing special, so it needs nothing.
        policy(false, &["0.0.0.0/0"], &[]).validate(false).unwrap();
        let many: Vec<String> = (0..=MAX_RULES)
            .map(|i| format!("203.0.{}.{}", i / 256, i % 256))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(policy(false, &refs, &[]).validate(true).is_err());
    }

    #[test]
    fn a_domain_allow_beats_a_broad_deny_for_pinned_addresses() {
        let p = policy(false, &["pypi.org"], &["0.0.0.0/0"]);
        assert_eq!(
            p.decide(ip("203.0.113.5"), 443, true, &[]),
            Verdict::IfNamed
        );
        assert!(matches!(
            p.decide(ip("203.0.113.5"), 443, false, &[]),
            Verdict::Deny(_)
        ));
        assert!(p.name_allowed("PyPI.org."));
        assert!(!p.name_allowed("evil.com"));
        assert!(p.name_allowed_on("pypi.org", 443));
        assert!(p.resolves_names());
        assert!(!policy(false, &["203.0.113.0/24"], &[]).resolves_names());
        // With the internet on, a resolved name needs no check unless a deny covers it.
        let open = policy(true, &["pypi.org"], &[]);
        assert_eq!(
            open.decide(ip("203.0.113.5"), 443, true, &[]),
            Verdict::Allow
        );
        let open = policy(true, &[], &["*.evil.com"]);
        assert!(open.name_allowed("ok.com"));
        assert!(!open.name_allowed("x.evil.com"));
    }
}
