//! The `v1_` signatures of envd's file URLs (`/files?path=…&signature=…`): what lets a URL that
//! carries no access token read or write one path (e2b-wire.md §7.4). The agent checks them;
//! the server's proxy checks them to find the sandbox a headerless URL is for.

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
    let mut input = format!("{path}:{}:{user}:{token}", operation.as_str());
    if let Some(exp) = expiration {
        input.push(':');
        input.push_str(exp);
    }
    let digest = Sha256::digest(input.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
