//! The access check of the `/files` routes: the access token, or a `v1_` signed URL.

use http::HeaderMap;
pub use moat_proto::file_signature::{Operation, sign};

/// Compares without an early exit, so timing does not tell how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The parameters of a request that the check reads.
#[derive(Debug, Default)]
pub(crate) struct Credentials<'a> {
    pub path: &'a str,
    pub username: Option<&'a str>,
    pub signature: Option<&'a str>,
    pub signature_expiration: Option<&'a str>,
}

/// Allows the request, or says why not. With no token configured everything is allowed; else
/// an `X-Access-Token` header must match, or (without the header) the signature must match and
/// not have expired. `now` is Unix seconds.
pub(crate) fn check(
    token: Option<&str>,
    headers: &HeaderMap,
    creds: &Credentials<'_>,
    operation: Operation,
    now: i64,
) -> Result<(), String> {
    let Some(token) = token else {
        return Ok(());
    };
    if let Some(given) = headers.get("x-access-token") {
        return if same(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err("invalid access token".into())
        };
    }
    let Some(signature) = creds.signature else {
        return Err("missing access token or signature".into());
    };
    let expected = sign(
        creds.path,
        operation,
        creds.username.unwrap_or(""),
        token,
        creds.signature_expiration,
    );
    if !same(signature.as_bytes(), expected.as_bytes()) {
        return Err("invalid signature".into());
    }
    if let Some(exp) = creds.signature_expiration {
        let exp: i64 = exp
            .parse()
            .map_err(|_| "invalid signature expiration".to_string())?;
        if exp <= now {
            return Err("signature is already expired".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        let h = HeaderMap::new();
        let sig = sign("/a", Operation::Read, "", "t", Some("100"));
        let ok = Credentials {
            path: "/a",
            signature: Some(&sig),
            signature_expiration: Some("100"),
            ..Default::default()
        };
        assert!(check(None, &h, &Credentials::default(), Operation::Read, 0).is_ok());
        assert!(check(Some("t"), &h, &ok, Operation::Read, 99).is_ok());
        assert!(check(Some("t"), &h, &ok, Operation::Read, 100).is_err());
        assert!(check(Some("t"), &h, &ok, Operation::Write, 99).is_err());
        assert!(check(Some("t"), &h, &Credentials::default(), Operation::Read, 0).is_err());
        let mut h2 = HeaderMap::new();
        h2.insert("x-access-token", "t".parse().expect("header"));
        assert!(check(Some("t"), &h2, &Credentials::default(), Operation::Read, 0).is_ok());
        h2.insert("x-access-token", "u".parse().expect("header"));
        assert!(check(Some("t"), &h2, &ok, Operation::Read, 0).is_err());
    }
}
