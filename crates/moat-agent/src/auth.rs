//! Who a request comes from: the access token (`X-Access-Token`) and the user selected with
//! `Authorization: Basic base64("<name>:")` (`shared/reference/e2b-wire.md` §4.6).

use base64::Engine as _;
use http::HeaderMap;

use crate::rpc::{Code, RpcError};

/// Header carrying the sandbox's access token.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// Whether a request for `path` must carry the access token, when the sandbox has one. Every
/// route does except `/health`, `/files` (which also accepts signed URLs and checks for itself)
/// and the code interpreter's `/interpreter/health` and `/interpreter/contexts…`: the E2B SDK
/// sends the token to the code interpreter only on `/execute` (`shared/reference/e2b-wire.md`
/// §2.4).
pub fn requires_token(path: &str) -> bool {
    if matches!(path, "/health" | "/files" | "/interpreter/health") {
        return false;
    }
    !(path == "/interpreter/contexts" || path.starts_with("/interpreter/contexts/"))
}

/// Whether `headers` carry the access token `expected` (compared in constant time).
pub fn token_matches(headers: &HeaderMap, expected: &str) -> bool {
    let Some(given) = headers.get(ACCESS_TOKEN_HEADER) else {
        return false;
    };
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The user name of the `Authorization` header: `None` when absent (the default user).
pub fn basic_user(headers: &HeaderMap) -> Result<Option<String>, RpcError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = |why: &str| {
        RpcError::new(
            Code::Unauthenticated,
            format!("invalid Authorization header: {why}"),
        )
    };
    let text = value.to_str().map_err(|_| bad("not text"))?;
    let (scheme, creds) = text
        .trim()
        .split_once(' ')
        .ok_or_else(|| bad("expected 'Basic <credentials>'"))?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad("only the Basic scheme selects a user"));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(creds.trim())
        .map_err(|_| bad("credentials are not base64"))?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad("credentials are not UTF-8"))?;
    let name = decoded.split_once(':').map_or(decoded.as_str(), |(n, _)| n);
    if name.is_empty() {
        return Ok(None);
    }
    Ok(Some(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn basic_users() {
        assert_eq!(basic_user(&headers(&[])).expect("none"), None);
        let h = headers(&[("authorization", "Basic cm9vdDo=")]); // "root:"
        assert_eq!(basic_user(&h).expect("root").as_deref(), Some("root"));
        let h = headers(&[("authorization", "Bearer x")]);
        assert_eq!(
            basic_user(&h).expect_err("bearer").code,
            Code::Unauthenticated
        );
        let h = headers(&[("authorization", "Basic !!!")]);
        assert!(basic_user(&h).is_err());
    }

    #[test]
    fn token_free_routes() {
        for path in [
            "/health",
            "/files",
            "/interpreter/health",
            "/interpreter/contexts",
            "/interpreter/contexts/abc/restart",
        ] {
            assert!(!requires_token(path), "{path}");
        }
        for path in [
            "/envs",
            "/interpreter/execute",
            "/interpreter/contextsx",
            "/process.Process/Start",
        ] {
            assert!(requires_token(path), "{path}");
        }
    }

    #[test]
    fn tokens() {
        assert!(token_matches(&headers(&[("x-access-token", "abc")]), "abc"));
        assert!(!token_matches(
            &headers(&[("x-access-token", "abd")]),
            "abc"
        ));
        assert!(!token_matches(&headers(&[]), "abc"));
    }
}
