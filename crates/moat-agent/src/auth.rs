//! The user a request selects with `Authorization: Basic base64("<name>:")`
//! (`shared/reference/e2b-wire.md` §4.6). The agent checks no access token: only the host
//! reaches it (its channel is a socketpair), and the server's sandbox proxy checks the
//! sandbox's tokens before it forwards anything.

use base64::Engine as _;
use http::HeaderMap;

use crate::rpc::{Code, RpcError};

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
}
