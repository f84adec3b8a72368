//! The NDJSON body of `/interpreter/execute` (`shared/reference/e2b-wire.md` §9.3): one JSON
//! object per line, never a blank line, `end_of_execution` last, keepalives during silence,
//! output split into lines of at most [`MAX_OUTPUT_TEXT_BYTES`] of text.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::limits::MAX_OUTPUT_TEXT_BYTES;
use crate::transport::ResponseBody;

/// Lines the stream may queue before the execution waits for the client: a slow reader slows
/// the code down (its output pipe fills) instead of growing the agent's memory.
const LINE_QUEUE: usize = 16;

/// Content type of the stream.
pub const NDJSON: &str = "application/x-ndjson";

/// Which output a text came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Output {
    fn kind(self) -> &'static str {
        match self {
            Output::Stdout => "stdout",
            Output::Stderr => "stderr",
        }
    }
}

/// The writing end of one execution's stream.
#[derive(Debug)]
pub struct Emitter {
    tx: mpsc::Sender<Bytes>,
    last: Instant,
    open: bool,
    error_sent: bool,
}

impl Emitter {
    /// A stream and the `200` response that carries it.
    pub fn new() -> (Emitter, Response<ResponseBody>) {
        let (tx, rx) = mpsc::channel::<Bytes>(LINE_QUEUE);
        let lines = stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|line| (Ok::<_, std::io::Error>(Frame::data(line)), rx))
        });
        let mut resp = Response::new(StreamBody::new(lines).boxed());
        *resp.status_mut() = StatusCode::OK;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
        let emitter = Emitter {
            tx,
            last: Instant::now(),
            open: true,
            error_sent: false,
        };
        (emitter, resp)
    }

    /// Whether the client still reads the stream.
    pub fn is_open(&self) -> bool {
        self.open && !self.tx.is_closed()
    }

    /// When the stream last carried a line.
    pub fn last_sent(&self) -> Instant {
        self.last
    }

    /// A handle that resolves (through [`mpsc::Sender::closed`]) once the client has gone.
    pub fn watcher(&self) -> mpsc::Sender<Bytes> {
        self.tx.clone()
    }

    /// Sends one JSON object as a line. Once the client has gone, lines are dropped.
    pub async fn line(&mut self, value: &Value) {
        if !self.open {
            return;
        }
        // Serialising a `Value` cannot fail.
        let mut bytes = serde_json::to_vec(value).unwrap_or_default();
        bytes.push(b'\n');
        self.last = Instant::now();
        if self.tx.send(Bytes::from(bytes)).await.is_err() {
            self.open = false;
        }
    }

    /// `number_of_executions`.
    pub async fn execution_count(&mut self, count: u64) {
        self.line(&json!({"type": "number_of_executions", "execution_count": count}))
            .await;
    }

    /// Output text, split into lines of at most [`MAX_OUTPUT_TEXT_BYTES`], stamped now.
    pub async fn output(&mut self, which: Output, text: &str) {
        let timestamp = iso8601(SystemTime::now());
        for piece in split_text(text, MAX_OUTPUT_TEXT_BYTES) {
            self.line(&json!({"type": which.kind(), "text": piece, "timestamp": timestamp}))
                .await;
        }
    }

    /// A result line, as the driver's frame was sanitised into (see `control`).
    pub async fn result(&mut self, result: &Value) {
        self.line(result).await;
    }

    /// An `error` line; only the first of an execution is sent (as upstream does).
    pub async fn error(&mut self, name: &str, value: &str, traceback: &str) {
        if self.error_sent {
            return;
        }
        self.error_sent = true;
        self.line(&json!({"type": "error", "name": name, "value": value, "traceback": traceback}))
            .await;
    }

    /// Whether an `error` line was sent.
    pub fn error_sent(&self) -> bool {
        self.error_sent
    }

    /// A `keepalive` line.
    pub async fn keepalive(&mut self) {
        self.line(&json!({"type": "keepalive"})).await;
    }

    /// `end_of_execution`, the last line.
    pub async fn end(mut self) {
        self.line(&json!({"type": "end_of_execution"})).await;
    }
}

/// Splits `text` into pieces of at most `max` bytes, at character boundaries.
pub fn split_text(text: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while rest.len() > max {
        let mut cut = max;
        while cut > 0 && !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut == 0 {
            // `max` is smaller than one character: take that character whole.
            cut = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        pieces.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    if !rest.is_empty() {
        pieces.push(rest);
    }
    pieces
}

/// Turns pipe chunks into text without breaking a UTF-8 sequence that spans two chunks; bytes
/// that are not UTF-8 become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Chunks {
    pending: Vec<u8>,
}

impl Utf8Chunks {
    /// The text of `data` after what an earlier chunk left incomplete; an incomplete sequence at
    /// the end waits for the next chunk.
    pub fn decode(&mut self, data: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.pending);
        bytes.extend_from_slice(data);
        let cut = bytes.len() - incomplete_tail(&bytes);
        self.pending = bytes.split_off(cut);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// What is left (an incomplete sequence), as text.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }
}

/// Length of an incomplete UTF-8 sequence at the end of `bytes` (0 to 3).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead
        }
        let needed = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// `t` as ISO 8601 in UTC with microseconds, e.g. `2026-03-01T12:00:00.123456Z`.
pub fn iso8601(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_709_294_400_123_456);
        assert_eq!(iso8601(t), "2024-03-01T12:00:00.123456Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(iso8601(leap), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn splits_at_char_boundaries() {
        assert_eq!(split_text("abcdef", 4), vec!["abcd", "ef"]);
        assert_eq!(split_text("", 4), Vec::<&str>::new());
        // "é" is two bytes: a cut never lands inside it.
        assert_eq!(split_text("aéé", 2), vec!["a", "é", "é"]);
        assert_eq!(split_text("€", 1), vec!["€"]);
    }

    #[test]
    fn utf8_across_chunks() {
        let mut d = Utf8Chunks::default();
        let euro = "€".as_bytes();
        assert_eq!(d.decode(&[b'a', euro[0]]), "a");
        assert_eq!(d.decode(&euro[1..]), "€");
        assert_eq!(d.decode(&[0xff, b'b']), "\u{fffd}b");
        assert_eq!(d.decode(&euro[..2]), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }
}
