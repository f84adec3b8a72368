//! The Connect protocol's framing, with no I/O: error codes, the five-byte envelope of streaming
//! bodies, the end-stream message, error bodies and the `Connect-Timeout-Ms` header.
//!
//! See `shared/reference/e2b-wire.md` §4 and <https://connectrpc.com/docs/protocol>.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Content type of unary calls with the JSON codec.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Content type of unary calls with the binary protobuf codec.
pub const CONTENT_TYPE_PROTO: &str = "application/proto";
/// Content type of streaming calls with the JSON codec.
pub const CONTENT_TYPE_CONNECT_JSON: &str = "application/connect+json";
/// Content type of streaming calls with the binary protobuf codec.
pub const CONTENT_TYPE_CONNECT_PROTO: &str = "application/connect+proto";

/// Header carrying the call's deadline in milliseconds.
pub const HEADER_TIMEOUT_MS: &str = "connect-timeout-ms";
/// Header carrying the protocol version (`1`).
pub const HEADER_PROTOCOL_VERSION: &str = "connect-protocol-version";
/// Header naming the compression of streaming envelopes.
pub const HEADER_CONTENT_ENCODING: &str = "connect-content-encoding";
/// envd's header: seconds between keepalive events on idle streams.
pub const HEADER_KEEPALIVE_INTERVAL: &str = "keepalive-ping-interval";

/// Envelope flag: an ordinary message.
pub const FLAG_MESSAGE: u8 = 0x00;
/// Envelope flag: the payload is compressed (never negotiated by moat, so always refused).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: the end-stream message (a JSON object).
pub const FLAG_END_STREAM: u8 = 0x02;
/// Length of an envelope's header: one flag byte and a big-endian `u32` length.
pub const ENVELOPE_HEADER_LEN: usize = 5;

/// A Connect error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// `canceled`
    Canceled,
    /// `unknown`
    Unknown,
    /// `invalid_argument`
    InvalidArgument,
    /// `deadline_exceeded`
    DeadlineExceeded,
    /// `not_found`
    NotFound,
    /// `already_exists`
    AlreadyExists,
    /// `permission_denied`
    PermissionDenied,
    /// `resource_exhausted`
    ResourceExhausted,
    /// `failed_precondition`
    FailedPrecondition,
    /// `aborted`
    Aborted,
    /// `out_of_range`
    OutOfRange,
    /// `unimplemented`
    Unimplemented,
    /// `internal`
    Internal,
    /// `unavailable`
    Unavailable,
    /// `data_loss`
    DataLoss,
    /// `unauthenticated`
    Unauthenticated,
}

const ALL_CODES: [Code; 16] = [
    Code::Canceled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

impl Code {
    /// The code's wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The code named by a wire string, if it is one.
    pub fn from_wire(s: &str) -> Option<Code> {
        ALL_CODES.into_iter().find(|c| c.as_str() == s)
    }

    /// The HTTP status the Connect protocol pairs with the code (for unary error responses).
    pub fn http_status(self) -> u16 {
        match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        }
    }

    /// The code a client infers from an HTTP status that came without a Connect error body
    /// (`e2b-wire.md` §4.9).
    pub fn from_http_status(status: u16) -> Code {
        match status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            413 | 429 => Code::ResourceExhausted,
            499 => Code::Canceled,
            500 => Code::Internal,
            501 | 505 => Code::Unimplemented,
            502 | 503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Unknown,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON error object: a unary error body, or the `error` of an end-stream message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The Connect code string.
    pub code: String,
    /// What failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Error details (kept opaque).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<serde_json::Value>,
}

impl ErrorBody {
    /// An error body with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ErrorBody {
            code: code.as_str().to_string(),
            message: message.into(),
            details: Vec::new(),
        }
    }

    /// The body's code, when it names a known one.
    pub fn code(&self) -> Option<Code> {
        Code::from_wire(&self.code)
    }

    /// The body as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| br#"{"code":"internal"}"#.to_vec())
    }
}

/// The payload of the end-stream envelope: `{}` on success, `{"error":{...}}` on failure.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EndStream {
    /// The stream's error, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Trailers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, Vec<String>>>,
}

impl EndStream {
    /// The end-stream message of a failed stream.
    pub fn error(code: Code, message: impl Into<String>) -> Self {
        EndStream {
            error: Some(ErrorBody::new(code, message)),
            metadata: None,
        }
    }

    /// The message as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// Frames `payload` in an envelope with `flags`.
///
/// Payloads longer than `u32::MAX` cannot be framed; callers cap messages far below that.
pub fn encode_envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(ENVELOPE_HEADER_LEN + payload.len());
    out.put_u8(flags);
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// The end-stream envelope of a successful stream (`02 00 00 00 02 {}`).
pub fn end_stream_ok() -> Bytes {
    encode_envelope(FLAG_END_STREAM, b"{}")
}

/// The end-stream envelope of a stream that failed with `code`.
pub fn end_stream_error(code: Code, message: &str) -> Bytes {
    encode_envelope(FLAG_END_STREAM, &EndStream::error(code, message).to_json())
}

/// One decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The flag byte.
    pub flags: u8,
    /// The payload.
    pub payload: Bytes,
}

impl Envelope {
    /// Whether this is the end-stream envelope.
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }
}

/// Why a streaming body could not be framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    /// An envelope announced a payload above the reader's cap.
    TooLarge {
        /// The announced length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The compressed flag was set, but no compression was negotiated.
    Compressed,
    /// A flag bit this protocol does not define.
    UnknownFlags(u8),
    /// The body ended inside an envelope.
    Truncated {
        /// Bytes left over.
        buffered: usize,
    },
}

impl EnvelopeError {
    /// The Connect code a server answers this with.
    pub fn code(&self) -> Code {
        match self {
            EnvelopeError::TooLarge { .. } => Code::ResourceExhausted,
            // connect-go answers a compressed envelope without negotiated compression as a
            // protocol error with `internal`; so do we.
            EnvelopeError::Compressed => Code::Internal,
            EnvelopeError::UnknownFlags(_) | EnvelopeError::Truncated { .. } => {
                Code::InvalidArgument
            }
        }
    }
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::TooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds the limit of {max} bytes")
            }
            EnvelopeError::Compressed => {
                f.write_str("protocol error: compressed message, but no compression negotiated")
            }
            EnvelopeError::UnknownFlags(flags) => {
                write!(f, "protocol error: unknown envelope flags {flags:#04x}")
            }
            EnvelopeError::Truncated { buffered } => write!(
                f,
                "protocol error: stream ended inside an envelope ({buffered} bytes left over)"
            ),
        }
    }
}

impl std::error::Error for EnvelopeError {}

/// Reassembles envelopes from body chunks split or coalesced in any way, refusing any envelope
/// whose announced length is above a cap before buffering it.
#[derive(Debug)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
    max_len: usize,
}

impl EnvelopeDecoder {
    /// A decoder that refuses payloads longer than `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        EnvelopeDecoder {
            buf: BytesMut::new(),
            max_len,
        }
    }

    /// Appends a chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes buffered but not yet returned as envelopes.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete envelope, `None` if more bytes are needed.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, EnvelopeError> {
        if self.buf.len() < ENVELOPE_HEADER_LEN {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if flags & FLAG_COMPRESSED != 0 {
            return Err(EnvelopeError::Compressed);
        }
        if flags & !(FLAG_COMPRESSED | FLAG_END_STREAM) != 0 {
            return Err(EnvelopeError::UnknownFlags(flags));
        }
        if len > self.max_len {
            return Err(EnvelopeError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        if self.buf.len() < ENVELOPE_HEADER_LEN + len {
            // Reserve once for the whole envelope: the length was checked against the cap.
            self.buf.reserve(ENVELOPE_HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(ENVELOPE_HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Envelope { flags, payload }))
    }

    /// Checks that the body ended on an envelope boundary.
    pub fn finish(&self) -> Result<(), EnvelopeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(EnvelopeError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

/// Why a `Connect-Timeout-Ms` value was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTimeout(pub String);

impl fmt::Display for InvalidTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid Connect-Timeout-Ms {:?}: want 1 to 10 decimal digits",
            self.0
        )
    }
}

impl std::error::Error for InvalidTimeout {}

/// Parses a `Connect-Timeout-Ms` value: 1 to 10 ASCII digits, in milliseconds.
pub fn parse_timeout_ms(value: &str) -> Result<Duration, InvalidTimeout> {
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidTimeout(value.chars().take(32).collect()));
    }
    let ms: u64 = value
        .parse()
        .map_err(|_| InvalidTimeout(value.to_string()))?;
    Ok(Duration::from_millis(ms))
}

/// Formats a deadline as a `Connect-Timeout-Ms` value, clamped to the 10 digits the header allows.
pub fn format_timeout_ms(timeout: Duration) -> String {
    let ms = timeout.as_millis().clamp(1, 9_999_999_999);
    ms.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_reassemble_across_any_split() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode_envelope(FLAG_MESSAGE, b"{\"a\":1}"));
        wire.extend_from_slice(&encode_envelope(FLAG_MESSAGE, b""));
        wire.extend_from_slice(&end_stream_ok());
        for split in 1..wire.len() {
            let mut dec = EnvelopeDecoder::new(64);
            let mut got = Vec::new();
            for chunk in wire.chunks(split) {
                dec.push(chunk);
                while let Some(env) = dec.next_envelope().expect("frame") {
                    got.push(env);
                }
            }
            dec.finish().expect("ends on a boundary");
            assert_eq!(got.len(), 3, "split {split}");
            assert_eq!(&got[0].payload[..], b"{\"a\":1}");
            assert!(got[1].payload.is_empty());
            assert!(got[2].is_end_stream());
            assert_eq!(&got[2].payload[..], b"{}");
        }
    }

    #[test]
    fn refuses_compressed_oversized_and_truncated() {
        let mut dec = EnvelopeDecoder::new(4);
        dec.push(&encode_envelope(FLAG_COMPRESSED, b"x"));
        assert_eq!(dec.next_envelope(), Err(EnvelopeError::Compressed));

        let mut dec = EnvelopeDecoder::new(4);
        dec.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        let err = dec.next_envelope().expect_err("too large");
        assert_eq!(err.code(), Code::ResourceExhausted);

        let mut dec = EnvelopeDecoder::new(4);
        dec.push(&[0, 0, 0, 0, 3, b'a']);
        assert_eq!(dec.next_envelope(), Ok(None));
        assert!(dec.finish().is_err());
    }

    #[test]
    fn end_stream_json() {
        assert_eq!(&end_stream_ok()[..], b"\x02\x00\x00\x00\x02{}");
        let err = end_stream_error(Code::DeadlineExceeded, "context deadline exceeded");
        let parsed: EndStream = serde_json::from_slice(&err[5..]).expect("json");
        let body = parsed.error.expect("error");
        assert_eq!(body.code(), Some(Code::DeadlineExceeded));
        assert_eq!(body.message, "context deadline exceeded");
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout_ms("60000"), Ok(Duration::from_secs(60)));
        assert_eq!(
            parse_timeout_ms("9999999999"),
            Ok(Duration::from_millis(9_999_999_999))
        );
        for bad in ["", "12345678901", "-1", "1.5", "abc", " 1"] {
            assert!(parse_timeout_ms(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_timeout_ms(Duration::from_secs(1)), "1000");
    }

    #[test]
    fn codes_round_trip() {
        for c in ALL_CODES {
            assert_eq!(Code::from_wire(c.as_str()), Some(c));
        }
        assert_eq!(Code::from_http_status(404), Code::NotFound);
        assert_eq!(Code::from_wire("nope"), None);
    }
}
