//! The network options shared by `moat run`, `moat sandbox create` and `moat template
//! create`: none by default, `--net internet`, and allow and deny rules.

use anyhow::{Result, bail};
use moat_proto::v1;

/// A sandbox's network, as options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NetworkArgs {
    /// The network: none (loopback only, the default) or internet (the public internet; never
    /// the host, private or link-local networks). --allow rules alone give a network that
    /// reaches only what they allow.
    #[arg(long, value_name = "none|internet", value_parser = ["none", "internet"])]
    pub(crate) net: Option<String>,
    /// Allow a CIDR network, IP, domain or *.domain, optionally with :PORT or :LOW-HIGH
    /// (repeatable): e.g. pypi.org, *.pythonhosted.org:443, 203.0.113.0/24.
    #[arg(long = "allow", value_name = "RULE")]
    pub(crate) allow: Vec<String>,
    /// Deny a CIDR network, IP, domain or *.domain (repeatable); the most specific rule wins.
    #[arg(long = "deny", value_name = "RULE")]
    pub(crate) deny: Vec<String>,
    /// A resolver moat asks for the sandbox's names (repeatable; default: the host's).
    #[arg(long = "dns", value_name = "IP")]
    pub(crate) dns: Vec<String>,
}

impl NetworkArgs {
    /// The network asked for; `None` when no option was given (the default: none, or the
    /// template's).
    pub fn to_v1(&self) -> Result<Option<v1::Network>> {
        let given = self.net.is_some()
            || !self.allow.is_empty()
            || !self.deny.is_empty()
            || !self.dns.is_empty();
        if !given {
            return Ok(None);
        }
        let internet = self.net.as_deref() == Some("internet");
        if self.net.as_deref() == Some("none")
            && !(self.allow.is_empty() && self.deny.is_empty() && self.dns.is_empty())
        {
            bail!("--net none gives no network: drop --allow, --deny and --dns, or --net");
        }
        if !internet && self.allow.is_empty() && (!self.deny.is_empty() || !self.dns.is_empty()) {
            bail!("--deny and --dns need --net internet or an --allow rule");
        }
        Ok(Some(v1::Network {
            internet,
            allow: self.allow.clone(),
            deny: self.deny.clone(),
            dns_servers: self.dns.clone(),
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn options_become_a_network_or_a_clear_error() {
        assert_eq!(NetworkArgs::default().to_v1().unwrap(), None);
        let internet = NetworkArgs {
            net: Some("internet".into()),
            deny: vec!["203.0.113.0/24".into()],
            ..Default::default()
        };
        let n = internet.to_v1().unwrap().unwrap();
        assert!(n.internet);
        assert_eq!(n.deny, ["203.0.113.0/24"]);
        let allow = NetworkArgs {
            allow: vec!["pypi.org".into()],
            ..Default::default()
        };
        assert!(!allow.to_v1().unwrap().unwrap().internet);
        let none = NetworkArgs {
            net: Some("none".into()),
            allow: vec!["pypi.org".into()],
            ..Default::default()
        };
        assert!(none.to_v1().is_err());
        let deny_only = NetworkArgs {
            deny: vec!["1.2.3.4".into()],
            ..Default::default()
        };
        assert!(deny_only.to_v1().is_err());
    }
}
