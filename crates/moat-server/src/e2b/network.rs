//! E2B's network options as `/v1`'s `network`: `allow_internet_access`, and `network`'s
//! `allowOut`, `denyOut`, `dnsServers` and `allowPublicTraffic`, at create and in
//! `PUT /sandboxes/{id}/network`. What moat does not enforce (`egressProxy`, header `rules`,
//! `maskRequestHost`, `httpsPorts`) is refused with a 400 naming it.
//!
//! E2B's semantics, translated: `allow_internet_access: false` is `denyOut: ["0.0.0.0/0"]`,
//! which is `/v1`'s `internet: false`; an allow wins over any deny (a deny inside an allowed
//! network is dropped); `denyOut` takes networks and addresses only. A create that says
//! nothing about the network gets moat's default, none; an update replaces everything, so one
//! that says nothing opens the internet, as E2B's does.

use axum::Extension;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use bytes::Bytes;
use moat_engine::auth::Caller;
use moat_engine::network::policy::{IpNet, Rule, Target};
use moat_proto::v1;
use serde_json::Value;

use super::error::{E2bError, E2bResult};
use crate::extract::Shared;

/// The sentinel E2B's SDKs send for "all traffic".
const ALL_TRAFFIC: &str = "0.0.0.0/0";

/// What a create's or update's network fields ask for.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct E2bNetwork {
    /// The egress policy; `None` when nothing was said of it.
    pub(crate) network: Option<v1::Network>,
    /// `allowPublicTraffic`.
    pub(crate) public_traffic: Option<bool>,
}

fn strings(field: &str, v: &Value) -> E2bResult<Vec<String>> {
    let bad = || E2bError::invalid(format!("network.{field} must be a list of strings"));
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|s| s.as_str().map(str::to_owned).ok_or_else(bad))
        .collect()
}

/// Translates `allow_internet_access` and the `network` object; `update` says whether it is
/// `PUT /sandboxes/{id}/network` (which replaces everything) rather than a create.
pub(crate) fn translate(
    allow_internet_access: Option<bool>,
    network: Option<&Value>,
    update: bool,
) -> E2bResult<E2bNetwork> {
    let fields = match network {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(E2bError::invalid("network must be an object")),
    };
    let mut public_traffic = None;
    let (mut allow_out, mut deny_out, mut dns) = (None, None, None);
    for (name, value) in &fields {
        match (name.as_str(), value) {
            (_, Value::Null) => {}
            ("allowPublicTraffic", Value::Bool(b)) => public_traffic = Some(*b),
            ("allowPublicTraffic", _) => {
                return Err(E2bError::invalid(
                    "network.allowPublicTraffic must be a boolean",
                ));
            }
            ("allowOut", v) => allow_out = Some(strings("allowOut", v)?),
            ("denyOut", v) => deny_out = Some(strings("denyOut", v)?),
            ("dnsServers", v) => dns = Some(strings("dnsServers", v)?),
            // Asked for in name only: nothing to enforce.
            (_, Value::Array(a)) if a.is_empty() => {}
            (_, Value::Object(o)) if o.is_empty() => {}
            (_, Value::String(s)) if s.is_empty() => {}
            (other, _) => {
                return Err(E2bError::invalid(format!(
                    "network.{other} is not supported by this server (it enforces allowOut, \
                     denyOut, dnsServers and allowPublicTraffic)"
                )));
            }
        }
    }
    // Empty lists (which SDKs send for options left out) ask for nothing.
    let said = allow_internet_access.is_some()
        || allow_out.as_ref().is_some_and(|a| !a.is_empty())
        || deny_out.as_ref().is_some_and(|d| !d.is_empty());
    if !said && !update {
        return Ok(E2bNetwork {
            network: None,
            public_traffic,
        });
    }
    let allow = allow_out.unwrap_or_default();
    let mut deny = deny_out.unwrap_or_default();
    let mut internet = allow_internet_access.unwrap_or(true);
    if deny.iter().any(|d| d.trim() == ALL_TRAFFIC) {
        internet = false;
        deny.retain(|d| d.trim() != ALL_TRAFFIC);
    }
    // Checked here for E2B's own rule; the engine checks the rest, naming the entry.
    let allowed_nets: Vec<IpNet> = allow
        .iter()
        .filter_map(|a| match a.parse::<Rule>() {
            Ok(Rule {
                target: Target::Net(n),
                ports: None,
            }) => Some(n),
            _ => None,
        })
        .collect();
    let mut kept = Vec::new();
    for (i, d) in deny.into_iter().enumerate() {
        match d.parse::<Rule>() {
            Ok(Rule {
                target: Target::Domain(_),
                ..
            }) => {
                return Err(E2bError::invalid(format!(
                    "network.denyOut[{i}]: {d:?} is a domain; denyOut takes networks and \
                     addresses only"
                )));
            }
            // E2B: an allow wins over a deny, so a deny inside an allowed network does nothing.
            Ok(Rule {
                target: Target::Net(n),
                ..
            }) if allowed_nets.iter().any(|a| a.covers(&n)) => {}
            _ => kept.push(d),
        }
    }
    let network = if !internet && allow.is_empty() {
        // Nothing left to reach: no network.
        v1::Network::default()
    } else {
        v1::Network {
            internet,
            allow,
            deny: kept,
            dns_servers: dns.unwrap_or_default(),
        }
    };
    Ok(E2bNetwork {
        network: Some(network),
        public_traffic,
    })
}

/// `PUT /sandboxes/{id}/network`: replaces a running sandbox's egress policy (`204`).
pub(crate) async fn update(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult<StatusCode> {
    let Path(id) = id?;
    // An unknown or malformed id is a 404, as on every other route of a sandbox.
    super::sandboxes::visible(&state, &caller, &id).await?;
    let body: Value = crate::extract::json_body(body, Some(Value::Object(Default::default())))?;
    let Value::Object(mut fields) = body else {
        return Err(E2bError::invalid("the body must be a JSON object"));
    };
    let allow_internet_access = match fields.remove("allow_internet_access") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(b),
        Some(_) => return Err(E2bError::invalid("allow_internet_access must be a boolean")),
    };
    let asked = translate(allow_internet_access, Some(&Value::Object(fields)), true)?;
    if asked.public_traffic.is_some() {
        return Err(E2bError::invalid(
            "allowPublicTraffic cannot be changed on a running sandbox",
        ));
    }
    let network = asked.network.unwrap_or_default();
    if let Err(e) = state.manager.set_network(&caller, &id, network).await {
        return Err(super::sandboxes::gone_is_404(&state, &caller, &id, e).await);
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn t(internet: Option<bool>, n: Value, update: bool) -> E2bResult<E2bNetwork> {
        translate(internet, Some(&n), update)
    }

    #[test]
    fn e2bs_shapes_become_v1_policies() {
        // Nothing said at create: the default (none).
        assert_eq!(t(None, json!({}), false).unwrap().network, None);
        // Nothing said in an update: open, as E2B's update clears everything.
        assert_eq!(
            t(None, json!({}), true).unwrap().network,
            Some(v1::Network::internet())
        );
        assert_eq!(
            t(Some(true), json!({}), false).unwrap().network,
            Some(v1::Network::internet())
        );
        assert_eq!(
            t(Some(false), json!({}), false).unwrap().network,
            Some(v1::Network::default())
        );
        let n = t(
            None,
            json!({"allowOut": ["pypi.org"], "denyOut": ["0.0.0.0/0"]}),
            false,
        )
        .unwrap()
        .network
        .unwrap();
        assert_eq!(
            n,
            v1::Network {
                internet: false,
                allow: vec!["pypi.org".into()],
                ..Default::default()
            }
        );
        // An allow wins over a deny inside it.
        let n = t(
            None,
            json!({"allowOut": ["8.8.0.0/16"], "denyOut": ["8.8.8.8", "1.1.1.1"]}),
            false,
        )
        .unwrap()
        .network
        .unwrap();
        assert_eq!(n.deny, ["1.1.1.1"]);
        assert!(n.internet);
        let n = t(None, json!({"allowPublicTraffic": false}), false).unwrap();
        assert_eq!(n.public_traffic, Some(false));
        assert_eq!(n.network, None);
    }

    #[test]
    fn what_moat_does_not_enforce_is_refused() {
        for bad in [
            json!({"egressProxy": {"address": "p:1080"}}),
            json!({"rules": {"a.com": [{"transform": {"headers": {"a": "b"}}}]}}),
            json!({"maskRequestHost": "${PORT}-x.example.com"}),
            json!({"denyOut": ["evil.com"]}),
            json!({"allowOut": "pypi.org"}),
        ] {
            assert!(t(None, bad.clone(), false).is_err(), "{bad}");
        }
    }
}
