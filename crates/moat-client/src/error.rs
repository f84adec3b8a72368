//! The client's error: what the server answered, or why no answer came.

use moat_proto::v1;

/// Longest part of a non-JSON error body kept in a message; the rest is cut.
pub const MAX_ERROR_TEXT: usize = 512;

/// What a call of the client can fail with.
///
/// A wrapped I/O error is the message and not an error source, so a chain printed with `{:#}`
/// shows it once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error status.
    #[error("{0}")]
    Api(ApiError),
    /// A streamed command ended with an `error` event instead of an `end` event.
    #[error("the command's stream failed ({code}): {message}")]
    Stream {
        /// The event's machine-readable code.
        code: String,
        /// The event's message.
        message: String,
    },
    /// The client is set up wrongly: a missing or malformed URL or API key.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached, or the connection broke.
    #[error("cannot reach the moat server at {url}: {reason}")]
    Transport {
        /// The server's base URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The server's answer does not have the expected shape (or is over a size limit).
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// Reading or writing local data failed (an upload's source, a download's target).
    #[error("{0}")]
    Io(std::io::Error),
}

// By hand rather than `#[from]`, which would make the I/O error a source as well as the
// message: printed with `{:#}`, the chain would show it twice.
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

/// An error answer of the server: its status and the `{"error": {"code", "message"}}` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// The body's `error.code` (`not_found`, `invalid`, …); `http_<status>` when the body is
    /// not moat's JSON error (a proxy's page, for instance).
    pub code: String,
    /// The body's `error.message`, or the start of the body as text.
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl ApiError {
    /// The error a response with `status` and `body` stands for.
    pub fn from_response(status: u16, body: &[u8]) -> ApiError {
        if let Ok(parsed) = serde_json::from_slice::<v1::ErrorBody>(body) {
            return ApiError {
                status,
                code: parsed.error.code,
                message: parsed.error.message,
            };
        }
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let message = if text.is_empty() {
            reason_phrase(status).to_owned()
        } else {
            cut(text, MAX_ERROR_TEXT)
        };
        ApiError {
            status,
            code: format!("http_{status}"),
            message,
        }
    }
}

impl Error {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api(e) => Some(e.status),
            _ => None,
        }
    }

    /// The server's `error.code` (of an error answer or of a stream's error event).
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api(e) => Some(&e.code),
            Error::Stream { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether the server said the thing does not exist (404).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

/// `text` cut to at most `max` bytes on a character boundary, with `…` when cut.
pub(crate) fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn reason_phrase(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error")
}

/// Result of client calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources, `: `-separated (hyper's own messages say little alone).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn moat_error_bodies_keep_code_and_message() {
        let e = ApiError::from_response(
            404,
            br#"{"error":{"code":"not_found","message":"not found: sandbox x"}}"#,
        );
        assert_eq!(e.status, 404);
        assert_eq!(e.code, "not_found");
        assert_eq!(e.message, "not found: sandbox x");
        assert_eq!(e.to_string(), "404 not_found: not found: sandbox x");
        let err = Error::Api(e);
        assert_eq!(err.status(), Some(404));
        assert_eq!(err.code(), Some("not_found"));
        assert!(err.is_not_found());
    }

    #[test]
    fn foreign_bodies_get_a_status_code() {
        let e = ApiError::from_response(502, b"<html>Bad Gateway</html>\n");
        assert_eq!(e.code, "http_502");
        assert_eq!(e.message, "<html>Bad Gateway</html>");
        let e = ApiError::from_response(503, b"");
        assert_eq!(e.message, "Service Unavailable");
        let e = ApiError::from_response(500, "é".repeat(1000).as_bytes());
        assert!(
            e.message.len() <= MAX_ERROR_TEXT + "…".len(),
            "{}",
            e.message
        );
        assert!(e.message.ends_with('…'));
        // JSON, but not moat's error shape.
        let e = ApiError::from_response(400, br#"{"detail":"nope"}"#);
        assert_eq!(e.code, "http_400");
    }

    #[test]
    fn other_errors_have_no_status() {
        let e = Error::Stream {
            code: "unavailable".into(),
            message: "agent gone".into(),
        };
        assert_eq!(e.status(), None);
        assert_eq!(e.code(), Some("unavailable"));
        assert!(!Error::Config("x".into()).is_not_found());
    }
}
