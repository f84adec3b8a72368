//! Request paths: escaped segments and query strings.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Escaped in a path segment: everything but the unreserved characters of RFC 3986, so an id
/// or name can never add a segment (`/`) or a query (`?`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One path segment, escaped.
pub(crate) fn seg(text: &str) -> String {
    // `.` and `..` alone would be resolved as relative segments by proxies.
    match text {
        "." => "%2E".into(),
        ".." => "%2E%2E".into(),
        _ => utf8_percent_encode(text, SEGMENT).to_string(),
    }
}

/// A query string built from pairs, `?` included; empty when there are none.
#[derive(Debug, Default)]
pub(crate) struct Query(String);

impl Query {
    /// Adds `name=value`.
    pub(crate) fn add(mut self, name: &str, value: &str) -> Query {
        self.0.push(if self.0.is_empty() { '?' } else { '&' });
        self.0.push_str(&seg(name));
        self.0.push('=');
        self.0
            .push_str(&utf8_percent_encode(value, SEGMENT).to_string());
        self
    }

    /// Adds `name=value` if there is a value.
    pub(crate) fn opt(self, name: &str, value: Option<&str>) -> Query {
        match value {
            Some(v) => self.add(name, v),
            None => self,
        }
    }

    /// The query, `?` included.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cannot_escape() {
        assert_eq!(seg("abc123"), "abc123");
        assert_eq!(seg("../keys"), "..%2Fkeys");
        assert_eq!(seg(".."), "%2E%2E");
        assert_eq!(seg("a b?c#d"), "a%20b%3Fc%23d");
    }

    #[test]
    fn queries() {
        assert_eq!(Query::default().as_str(), "");
        let q = Query::default()
            .add("path", "/home/user/a b&c=d")
            .opt("depth", None)
            .opt("format", Some("tar"));
        assert_eq!(
            q.as_str(),
            "?path=%2Fhome%2Fuser%2Fa%20b%26c%3Dd&format=tar"
        );
        assert_eq!(
            Query::default().add("metadata", "job=x+y").as_str(),
            "?metadata=job%3Dx%2By"
        );
    }
}
