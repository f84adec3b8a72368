//! Image references as users write them (`python:3.11-slim`, `registry:5000/team/tool@sha256:…`),
//! checked and completed the way container tools do: no registry means Docker Hub, no tag
//! means `latest`.

use std::net::IpAddr;
use std::str::FromStr;

use super::ImageError;

/// The longest reference accepted, in bytes.
pub const MAX_REFERENCE_LEN: usize = 512;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    inner: oci_client::Reference,
}

impl ImageRef {
    /// Parses `text`, refusing what no registry would accept with a message that names it.
    pub fn parse(text: &str) -> Result<ImageRef, ImageError> {
        if text.is_empty() || text.len() > MAX_REFERENCE_LEN {
            return Err(ImageError::Invalid(format!(
                "image reference must be 1 to {MAX_REFERENCE_LEN} bytes"
            )));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ImageError::Invalid(format!(
                "image reference {text:?} contains white space or control characters"
            )));
        }
        let inner = oci_client::Reference::from_str(text)
            .map_err(|e| ImageError::Invalid(format!("image reference {text:?}: {e}")))?;
        // The distribution spec's grammar, which the parser is lenient about.
        if inner.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ImageError::Invalid(format!(
                "image reference {text:?}: repository names are lower case"
            )));
        }
        if let Some(digest) = inner.digest()
            && !is_sha256_digest(digest)
        {
            return Err(ImageError::Invalid(format!(
                "image reference {text:?}: only sha256 digests are supported"
            )));
        }
        Ok(ImageRef { inner })
    }

    /// The registry's host (and port) as written, `docker.io` when none was.
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The repository within the registry (`library/python`).
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The reference in full, registry, tag and digest included.
    pub fn whole(&self) -> String {
        self.inner.whole()
    }

    /// The same repository at the manifest `digest`.
    pub fn at_digest(&self, digest: &str) -> ImageRef {
        ImageRef {
            inner: oci_client::Reference::with_digest(
                self.inner.registry().to_owned(),
                self.inner.repository().to_owned(),
                digest.to_owned(),
            ),
        }
    }

    /// Whether the registry is on this machine's loopback (`localhost`, `127.0.0.0/8`): such a registry is spoken to over plain HTTP, as container tools do.
    pub fn is_loopback(&self) -> bool {
        let host = host_of(self.registry());
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// The client library's form.
    pub(super) fn as_oci(&self) -> &oci_client::Reference {
        &self.inner
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.whole())
    }
}

/// The host part of `registry` (`host` or `host:port`; the reference grammar has no IPv6
/// literals).
fn host_of(registry: &str) -> &str {
    registry.split(':').next().unwrap_or(registry)
}

/// Whether `digest` is `sha256:` and 64 lower-case hex digits.
pub fn is_sha256_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn references_are_completed_like_container_tools_do() {
        let r = ImageRef::parse("python:3.11-slim").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/python");
        assert!(!r.is_loopback());
        let r = ImageRef::parse("127.0.0.1:5000/team/tool").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.whole(), "127.0.0.1:5000/team/tool:latest");
        assert!(r.is_loopback());
        assert!(ImageRef::parse("localhost:5000/a:b").unwrap().is_loopback());
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("example.com/a@{digest}")).unwrap();
        assert_eq!(
            r.at_digest(&digest).whole(),
            format!("example.com/a@{digest}")
        );
    }

    #[test]
    fn bad_references_are_refused_by_name() {
        for bad in [
            "",
            "UPPER/case",
            "a b",
            "a:tag\n",
            "example.com/a@sha256:short",
            "example.com/a@md5:0123",
        ] {
            let e = ImageRef::parse(bad).unwrap_err();
            assert!(matches!(e, ImageError::Invalid(_)), "{bad:?}: {e}");
        }
        assert!(ImageRef::parse(&"a".repeat(MAX_REFERENCE_LEN + 1)).is_err());
    }
}
