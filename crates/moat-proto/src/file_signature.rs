//! The `v1_` signatures of envd's file URLs (`/files?path=…&signature=…`): what lets a URL that
//! carries no access token read or write one path (e2b-wire.md §7.4). The server's sandbox
//! proxy checks them (and finds by them the sandbox a headerless URL is for); the agent, which
//! only the host reaches, does not check them again.
//!
//! The proxy and the agent read the URL's query with one parser, [`FilesQuery::parse`], so the
//! signature the proxy checks always covers exactly what the agent acts on.

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// What a file signature grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Download (`GET /files`).
    Read,
    /// Upload (`POST /files`).
    Write,
}

impl Operation {
    /// The word signed for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
        }
    }
}

/// The longest path a signed URL may name (Linux's `PATH_MAX`): checking a signature hashes
/// the path once, but a URL that names no sandbox is checked under every running one's token.
pub const MAX_SIGNED_PATH: usize = 4096;

/// The `v1_` signature of a file URL: `v1_` and the unpadded standard base64 of the SHA-256 of
/// `path:operation:user:token`, with `:expiration` appended when the URL expires. `user` is the
/// `username` query value, or empty when the URL names none.
pub fn sign(
    path: &str,
    operation: Operation,
    user: &str,
    token: &str,
    expiration: Option<&str>,
) -> String {
    Signer::new(path, operation, user, expiration).sign(token)
}

/// The signatures of one URL under any number of tokens, its path and user hashed once.
#[derive(Clone)]
pub struct Signer {
    /// The hash of `path:operation:user:`, which every signature of the URL starts from.
    prefix: Sha256,
    expiration: Option<String>,
}

impl Signer {
    /// The signer of the URL of `path`, `operation`, `user` and `expiration` (see [`sign`]).
    pub fn new(path: &str, operation: Operation, user: &str, expiration: Option<&str>) -> Signer {
        let mut prefix = Sha256::new();
        for part in [path, operation.as_str(), user] {
            prefix.update(part.as_bytes());
            prefix.update(b":");
        }
        Signer {
            prefix,
            expiration: expiration.map(str::to_owned),
        }
    }

    /// The URL's signature under `token`.
    pub fn sign(&self, token: &str) -> String {
        let mut hash = self.prefix.clone();
        hash.update(token.as_bytes());
        if let Some(exp) = &self.expiration {
            hash.update(b":");
            hash.update(exp.as_bytes());
        }
        format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(hash.finalize())
        )
    }
}

/// The query parameters of a `/files` request that the agent reads and a signature covers,
/// decoded as a form is (`+` is a space, then percent-escapes, as Go's parser has it). Other
/// parameters are ignored.
///
/// The rules, the same for every reader: a parameter's value is its first occurrence; a
/// repeated one is remembered ([`FilesQuery::repeated`]), and a query that is to be checked
/// against a signature must have none ([`FilesQuery::check_signable`]), so a signature always
/// covers the one value there is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FilesQuery {
    /// `path`: the file, as the client wrote it (not yet expanded for the user).
    pub path: Option<String>,
    /// `username`: whom the operation runs as.
    pub username: Option<String>,
    /// `signature`: the URL's `v1_` signature.
    pub signature: Option<String>,
    /// `signature_expiration`: Unix seconds after which the signature is void.
    pub signature_expiration: Option<String>,
    /// The first of the four parameters that is given more than once, if any.
    pub repeated: Option<&'static str>,
}

/// Why a `/files` query was refused: it is malformed (a bad request, not a refused credential).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError(pub String);

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QueryError {}

/// Why a signature's expiration does not allow the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpirationError {
    /// `signature_expiration` is not a number of seconds.
    Invalid,
    /// It lies in the past.
    Expired,
}

impl std::fmt::Display for ExpirationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExpirationError::Invalid => "invalid signature expiration",
            ExpirationError::Expired => "signature is already expired",
        })
    }
}

impl std::error::Error for ExpirationError {}

impl FilesQuery {
    /// Parses the raw query string; a value that is not UTF-8 once decoded is refused.
    pub fn parse(query: &str) -> Result<FilesQuery, QueryError> {
        let mut q = FilesQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (name, slot): (&'static str, _) = match name {
                "path" => ("path", &mut q.path),
                "username" => ("username", &mut q.username),
                "signature" => ("signature", &mut q.signature),
                "signature_expiration" => ("signature_expiration", &mut q.signature_expiration),
                _ => continue,
            };
            if slot.is_some() {
                q.repeated = q.repeated.or(Some(name));
                continue;
            }
            let spaced = value.replace('+', " ");
            let decoded = percent_encoding::percent_decode_str(&spaced)
                .decode_utf8()
                .map_err(|_| QueryError(format!("the query parameter '{name}' is not UTF-8")))?;
            *slot = Some(decoded.into_owned());
        }
        Ok(q)
    }

    /// Refuses a query with a repeated parameter, before it is checked against a signature:
    /// the signature must cover exactly what is acted on, so no reader may take another
    /// occurrence than the signer meant.
    pub fn check_signable(&self) -> Result<(), QueryError> {
        if let Some(name) = self.repeated {
            return Err(QueryError(format!(
                "the query parameter '{name}' is given twice"
            )));
        }
        let path = self.path.as_deref().unwrap_or("");
        if path.len() > MAX_SIGNED_PATH {
            return Err(QueryError(format!(
                "the path is {} bytes long; a signed URL's path may have at most {MAX_SIGNED_PATH}",
                path.len()
            )));
        }
        Ok(())
    }

    /// The signer of this query's path and user for `operation` (see [`Signer`]).
    pub fn signer(&self, operation: Operation) -> Signer {
        Signer::new(
            self.path.as_deref().unwrap_or(""),
            operation,
            self.username.as_deref().unwrap_or(""),
            self.signature_expiration.as_deref(),
        )
    }

    /// The `v1_` signature of this query's path and user for `operation` under `token`.
    pub fn sign(&self, operation: Operation, token: &str) -> String {
        self.signer(operation).sign(token)
    }

    /// Whether a given `signature_expiration` still lies after `now` (Unix seconds); none
    /// given never expires.
    pub fn check_expiration(&self, now: i64) -> Result<(), ExpirationError> {
        let Some(text) = self.signature_expiration.as_deref() else {
            return Ok(());
        };
        let at: i64 = text.parse().map_err(|_| ExpirationError::Invalid)?;
        if at <= now {
            return Err(ExpirationError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_as_forms_and_signed_ones_refuse_repeats() {
        let q = FilesQuery::parse("path=%2Ftmp%2Fa+b&username=user&x=1&signature=v1_s").unwrap();
        assert_eq!(q.path.as_deref(), Some("/tmp/a b"));
        assert_eq!(q.username.as_deref(), Some("user"));
        assert_eq!(q.signature.as_deref(), Some("v1_s"));
        assert_eq!(q.signature_expiration, None);
        assert!(q.check_signable().is_ok());
        assert_eq!(FilesQuery::parse("").unwrap(), FilesQuery::default());
        let q = FilesQuery::parse("path=a&username=u&path=b&path=c").unwrap();
        assert_eq!(q.path.as_deref(), Some("a"));
        assert_eq!(q.repeated, Some("path"));
        let e = q.check_signable().unwrap_err();
        assert!(e.0.contains("'path' is given twice"), "{e}");
        let e = FilesQuery::parse("username=%ff").unwrap_err();
        assert!(e.0.contains("not UTF-8"), "{e}");
        // Unknown parameters may repeat: nothing reads them.
        assert!(
            FilesQuery::parse("x=1&x=2")
                .unwrap()
                .check_signable()
                .is_ok()
        );
    }

    #[test]
    fn expirations() {
        let at = |e: &str| FilesQuery {
            signature_expiration: Some(e.into()),
            ..FilesQuery::default()
        };
        assert_eq!(FilesQuery::default().check_expiration(5), Ok(()));
        assert_eq!(at("10").check_expiration(5), Ok(()));
        assert_eq!(at("5").check_expiration(5), Err(ExpirationError::Expired));
        assert_eq!(
            at("soon").check_expiration(5),
            Err(ExpirationError::Invalid)
        );
        assert_eq!(
            at("10").sign(Operation::Read, "t"),
            sign("", Operation::Read, "", "t", Some("10"))
        );
    }

    #[test]
    fn a_signed_path_has_a_bounded_length() {
        let at_most = format!("path=/{}&signature=v1_s", "a".repeat(MAX_SIGNED_PATH - 1));
        assert!(
            FilesQuery::parse(&at_most)
                .unwrap()
                .check_signable()
                .is_ok()
        );
        let over = format!("path=/{}&signature=v1_s", "a".repeat(MAX_SIGNED_PATH));
        let e = FilesQuery::parse(&over)
            .unwrap()
            .check_signable()
            .unwrap_err();
        assert!(e.0.contains("at most 4096"), "{e}");
    }

    #[test]
    fn signs_like_the_sdk() {
        // Vectors computed independently with Python's hashlib and base64.
        assert_eq!(
            sign("/home/user/a.txt", Operation::Read, "", "secret", None),
            "v1_HEW7fDvq8wDd0bCgcYpP4vKMGjo6waU8ir2ibcmhKGY"
        );
        assert_eq!(
            sign(
                "/home/user/a.txt",
                Operation::Write,
                "user",
                "secret",
                Some("1700000000")
            ),
            "v1_NuOL6MxlaYQ+owIRhnNeiDwJq5PQda3sqDKPDCZmEek"
        );
    }
}
