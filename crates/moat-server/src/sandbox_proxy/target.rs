//! Recognising sandbox traffic: which sandbox and port a request is for, if any.
//!
//! In this order (`e2b-wire.md` §2.3):
//! 1. `Host: <port>-<id>.<domain>`, with E2B's rule: the left-most label split at its first
//!    `-` (port before, sandbox id after);
//! 2. the headers `E2b-Sandbox-Id` and `E2b-Sandbox-Port`, unless the request carries an API
//!    key (`X-API-KEY`) and its path is under E2B's control plane: some e2b releases before 2.51
//!    (2.7 among them) send those headers on their connect call too (E2B's control plane, on a host of its own, ignores
//!    them), and sandbox traffic never carries an API key;
//! 3. `/files` with a `signature` query parameter and neither of the above: a signed file URL,
//!    whose sandbox is found by its signature (see [`super::access::find_signed`]);
//! 4. one of envd's public paths ([`ENVD_PATHS`]) with an `X-Access-Token` and none of the
//!    above: envd of the sandbox whose access token it is (see [`super::access::find_by_token`]).
//!    Some e2b releases before 2.51 (2.7 among them) send a connected (not created) sandbox's
//!    envd calls so, to `E2B_SANDBOX_URL` without routing headers.
//!
//! Everything else is for the API's router.

use axum::extract::Request;
use axum::http::header;

use super::answers::Refusal;

/// Header naming the sandbox of a request.
pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
/// Header naming the port inside the sandbox a request is for.
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
/// Header carrying an E2B client's API key: control-plane traffic.
const API_KEY_HEADER: &str = "x-api-key";
/// Longest sandbox id accepted in an address (moat's ids have 20 characters).
pub const MAX_ID_LEN: usize = 64;

/// The domains E2B's SDKs treat as E2B's own service (they then ignore the sandbox id in the
/// address), so a server must never tell clients one of them.
pub const E2B_DOMAINS: &[&str] = &[
    "e2b.app",
    "e2b.dev",
    "e2b.pro",
    "e2b-staging.dev",
    "e2b-tango.dev",
    "e2b-juliett.dev",
    "foxtrot-2.e2b.dev",
];

/// What a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Traffic {
    /// For the API's router.
    Control,
    /// For `port` inside sandbox `id`.
    Sandbox { id: String, port: u16 },
    /// A signed file URL that names no sandbox.
    SignedFiles,
    /// An envd request that names no sandbox but carries an access token.
    EnvdByToken,
}

/// envd's routes a client reaches (`e2b-wire.md` §7): what a request that names no sandbox but
/// carries an access token may be for. A path is one of them when it is one of these or lies
/// below one ending in `/`.
pub const ENVD_PATHS: &[&str] = &[
    "/files",
    "/health",
    "/envs",
    "/process.Process/",
    "/filesystem.Filesystem/",
];

/// Classifies `req` for a server whose sandbox addresses are on `domain`; a request that names
/// a sandbox badly is answered `400` here.
pub(crate) fn classify(req: &Request, domain: &str) -> Result<Traffic, Refusal> {
    if let Some(traffic) = from_host(req, domain)? {
        return Ok(traffic);
    }
    let headers = req.headers();
    if headers.contains_key(API_KEY_HEADER) && crate::e2b::owns_path(req.uri().path()) {
        return Ok(Traffic::Control);
    }
    if let Some(id) = headers.get(SANDBOX_ID_HEADER) {
        let id = id
            .to_str()
            .ok()
            .filter(|id| valid_id(id))
            .ok_or_else(|| Refusal::bad_request("E2b-Sandbox-Id is not a sandbox id"))?;
        let port = headers
            .get(SANDBOX_PORT_HEADER)
            .ok_or_else(|| {
                Refusal::bad_request("E2b-Sandbox-Id needs E2b-Sandbox-Port: the port to reach")
            })?
            .to_str()
            .ok()
            .and_then(parse_port)
            .ok_or_else(|| {
                Refusal::bad_request("E2b-Sandbox-Port is not a port number from 1 to 65535")
            })?;
        return Ok(Traffic::Sandbox {
            id: id.to_owned(),
            port,
        });
    }
    if req.uri().path() == "/files"
        && req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .any(|pair| pair.split('=').next() == Some("signature"))
    {
        return Ok(Traffic::SignedFiles);
    }
    if headers.contains_key(super::access::ACCESS_TOKEN_HEADER) && is_envd_path(req.uri().path()) {
        return Ok(Traffic::EnvdByToken);
    }
    Ok(Traffic::Control)
}

/// Whether `path` is one of [`ENVD_PATHS`].
fn is_envd_path(path: &str) -> bool {
    ENVD_PATHS.iter().any(|p| {
        if p.ends_with('/') {
            path.strip_prefix(p)
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/') && !rest.contains(".."))
        } else {
            path == *p
        }
    })
}

/// The sandbox of a `<port>-<id>.<domain>` address, if the request's host is one.
fn from_host(req: &Request, domain: &str) -> Result<Option<Traffic>, Refusal> {
    let host = match req.uri().authority() {
        Some(authority) => authority.as_str(),
        None => match req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
        {
            Some(host) => host,
            None => return Ok(None),
        },
    };
    let Some(label) = sandbox_label(host, domain) else {
        return Ok(None);
    };
    let Some((port, id)) = label.split_once('-') else {
        return Ok(None);
    };
    // A label that does not start with a port is some other name under the domain.
    let Some(port) = parse_port(port) else {
        return Ok(None);
    };
    if !valid_id(id) {
        return Err(Refusal::bad_request(format!(
            "{id:?} in the address is not a sandbox id"
        )));
    }
    Ok(Some(Traffic::Sandbox {
        id: id.to_owned(),
        port,
    }))
}

/// The left-most label of `host` (lower-cased) when the rest of it is `domain`. A domain with
/// a port matches only that port; one without matches any.
fn sandbox_label(host: &str, domain: &str) -> Option<String> {
    let (host, host_port) = split_port(host)?;
    let (domain, domain_port) = split_port(domain)?;
    if domain_port.is_some() && host_port != domain_port {
        return None;
    }
    let host = host.to_ascii_lowercase();
    let suffix = format!(".{}", domain.to_ascii_lowercase());
    let label = host.strip_suffix(&suffix)?;
    (!label.is_empty() && !label.contains('.')).then(|| label.to_owned())
}

/// `name[:port]` split; `None` for a bracketed IPv6 literal or a malformed port.
fn split_port(text: &str) -> Option<(&str, Option<u16>)> {
    if text.starts_with('[') {
        return None;
    }
    match text.rsplit_once(':') {
        Some((name, port)) => Some((name, Some(parse_port(port)?))),
        None => Some((text, None)),
    }
}

/// A port from 1 to 65535 written as plain decimal digits.
fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|&p| p != 0)
}

/// Whether `id` has the shape of a sandbox id (`[a-z0-9]+`, E2B's rule, which moat's ids meet).
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Checks a `--domain` value: a DNS name (letters, digits, `-`, dot-separated labels of at
/// most 63 characters) with an optional `:port`, and not one of [`E2B_DOMAINS`]. Sandbox
/// addresses are `<port>-<id>.<domain>`.
pub fn validate_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("the domain is empty".into());
    }
    if domain.contains("://") || domain.contains('/') {
        return Err("give a host name and optional port (like sandbox.example.com or localhost:7070), not a URL".into());
    }
    let (name, port) = match domain.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (domain, None),
    };
    if let Some(port) = port
        && parse_port(port).is_none()
    {
        return Err(format!("{port:?} is not a port from 1 to 65535"));
    }
    if name.len() > 253 {
        return Err("the host name is longer than 253 characters".into());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(format!(
                "{label:?} is not a DNS label (letters, digits and inner hyphens, 1 to 63 characters)"
            ));
        }
    }
    if E2B_DOMAINS.iter().any(|d| d.eq_ignore_ascii_case(name)) {
        return Err(format!(
            "{name} is E2B's own domain: E2B clients would send sandbox traffic to E2B's service"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn request(host: &str, headers: &[(&str, &str)], uri: &str) -> Request {
        let mut b = Request::builder().uri(uri).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    fn sandbox(id: &str, port: u16) -> Traffic {
        Traffic::Sandbox {
            id: id.into(),
            port,
        }
    }

    #[test]
    fn hosts() {
        let d = "localhost:7070";
        let c = |host: &str| classify(&request(host, &[], "/"), d).map_err(|r| r.status);
        assert_eq!(c("8000-abc2.localhost:7070"), Ok(sandbox("abc2", 8000)));
        assert_eq!(c("8000-ABC2.LocalHost:7070"), Ok(sandbox("abc2", 8000)));
        assert_eq!(c("localhost:7070"), Ok(Traffic::Control));
        assert_eq!(c("8000-abc.localhost:7071"), Ok(Traffic::Control));
        assert_eq!(c("8000-abc.localhost"), Ok(Traffic::Control));
        assert_eq!(c("api.localhost:7070"), Ok(Traffic::Control));
        assert_eq!(c("x-abc.localhost:7070"), Ok(Traffic::Control));
        assert_eq!(c("a.8000-abc.localhost:7070"), Ok(Traffic::Control));
        assert_eq!(c("[::1]:7070"), Ok(Traffic::Control));
        assert!(c("8000-a_b.localhost:7070").is_err());
        // A domain without a port matches any port.
        let r = request("49983-xyz.sb.example.com:443", &[], "/");
        assert_eq!(
            classify(&r, "sb.example.com").unwrap(),
            sandbox("xyz", 49983)
        );
    }

    #[test]
    fn headers_and_signed_files() {
        let d = "localhost:7070";
        let c = |h: &[(&str, &str)], uri: &str| {
            classify(&request("127.0.0.1:7070", h, uri), d).map_err(|r| r.status)
        };
        let both = [("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "49983")];
        assert_eq!(c(&both, "/health"), Ok(sandbox("abc", 49983)));
        assert!(c(&[("E2b-Sandbox-Id", "abc")], "/health").is_err());
        assert!(c(&[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "0")], "/").is_err());
        assert!(c(&[("E2b-Sandbox-Id", "a/b"), ("E2b-Sandbox-Port", "1")], "/").is_err());
        assert_eq!(
            c(&[], "/files?path=/a&signature=v1_x"),
            Ok(Traffic::SignedFiles)
        );
        assert_eq!(c(&[], "/files?path=/a"), Ok(Traffic::Control));
        assert_eq!(c(&[], "/v1/sandboxes"), Ok(Traffic::Control));
        // Some older e2b releases send the routing headers on their connect call as well.
        let keyed = [both.as_slice(), &[("X-API-KEY", "moat_x")]].concat();
        assert_eq!(c(&keyed, "/sandboxes/abc/connect"), Ok(Traffic::Control));
        assert_eq!(c(&keyed, "/v2/sandboxes"), Ok(Traffic::Control));
        assert_eq!(c(&keyed, "/files"), Ok(sandbox("abc", 49983)));
        assert_eq!(
            c(&both, "/sandboxes/abc/connect"),
            Ok(sandbox("abc", 49983))
        );
        // envd's paths with an access token and nothing else naming a sandbox.
        let token = [("X-Access-Token", "t")];
        for path in [
            "/files?path=/a",
            "/health",
            "/envs",
            "/process.Process/Start",
        ] {
            assert_eq!(c(&token, path), Ok(Traffic::EnvdByToken), "{path}");
        }
        for path in [
            "/v1/sandboxes",
            "/init",
            "/process.Process/",
            "/process.Process/a/b",
        ] {
            assert_eq!(c(&token, path), Ok(Traffic::Control), "{path}");
        }
        assert_eq!(c(&[], "/health"), Ok(Traffic::Control));
    }

    #[test]
    fn domains() {
        for ok in [
            "localhost:7070",
            "localhost",
            "sandbox.example.com",
            "a-b.example.com:443",
            "127.0.0.1:80",
        ] {
            assert_eq!(validate_domain(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "http://localhost:7070",
            "localhost:0",
            "localhost:99999",
            "localhost:",
            "-a.example.com",
            "a..b",
            "a b",
            "example.com/x",
            "e2b.app",
            "E2B.dev:443",
            "[::1]:7070",
        ] {
            assert!(validate_domain(bad).is_err(), "{bad}");
        }
    }
}
