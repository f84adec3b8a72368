//! Streaming exec: a command's output as it happens, from the server's NDJSON event lines.

use std::collections::VecDeque;

use base64::Engine;
use bytes::Bytes;
use http::Method;
use http::header::CONTENT_TYPE;

use crate::body::{Body, ByteStream};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::path::seg;
use crate::types::{ExecEnd, ExecEvent, ExecRequest, OutputEncoding};

/// Longest event line accepted; a longer one fails the stream rather than filling memory.
/// The server sends output in chunks far smaller than this.
pub const MAX_LINE_BYTES: usize = 8 << 20;

/// What a streamed command did, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// It started, with this process id inside the sandbox.
    Started {
        /// The process id.
        pid: u32,
    },
    /// Bytes it wrote to standard output.
    Stdout(Bytes),
    /// Bytes it wrote to standard error.
    Stderr(Bytes),
    /// It ended; no event follows.
    Ended(ExecEnd),
}

/// Everything a streamed command wrote, and how it ended ([`ExecStream::finish`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub end: ExecEnd,
}

/// The events of one streamed command; read them with [`ExecStream::next`].
#[derive(Debug)]
pub struct ExecStream {
    body: ByteStream,
    buf: Vec<u8>,
    base64: bool,
    queued: VecDeque<StreamEvent>,
    done: bool,
}

impl Client {
    /// Runs one command and streams its events as they happen (`Accept:
    /// application/x-ndjson`). With `encoding: OutputEncoding::Base64` output bytes come
    /// through exactly; otherwise as UTF-8 text.
    ///
    pub async fn exec_stream(&self, id: &str, req: &ExecRequest) -> Result<ExecStream> {
        let body = serde_json::to_vec(req)
            .map_err(|e| Error::Config(format!("encoding the request: {e}")))?;
        let resp = self
            .send(
                Method::POST,
                &format!("/v1/sandboxes/{}/exec", seg(id)),
                Body::from(body),
                Some("application/json"),
                "application/x-ndjson",
            )
            .await?;
        let ndjson = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/x-ndjson"));
        if !ndjson {
            return Err(Error::Protocol(
                "the server answered the exec without an event stream (a server without \
                 streaming exec?)"
                    .into(),
            ));
        }
        Ok(ExecStream {
            body: self.stream(resp),
            buf: Vec::new(),
            base64: req.encoding == OutputEncoding::Base64,
            queued: VecDeque::new(),
            done: false,
        })
    }
}

impl ExecStream {
    /// The next event; `None` after [`StreamEvent::Ended`] or an error. A stream that ends
    /// with an `error` line yields [`Error::Stream`].
    pub async fn next(&mut self) -> Option<Result<StreamEvent>> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                if matches!(event, StreamEvent::Ended(_)) {
                    self.done = true;
                }
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                match self.parse(&line) {
                    Ok(Some(event)) => self.queued.push_back(event),
                    Ok(None) => {}
                    Err(e) => return Some(Err(self.fail(e))),
                }
                continue;
            }
            if self.buf.len() > MAX_LINE_BYTES {
                return Some(Err(self.fail(Error::Protocol(format!(
                    "an event line is longer than {MAX_LINE_BYTES} bytes"
                )))));
            }
            match self.body.next_chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) if self.buf.iter().any(|b| !b.is_ascii_whitespace()) => {
                    // A last line without its newline.
                    self.buf.push(b'\n');
                }
                Ok(None) => {
                    return Some(Err(self.fail(Error::Protocol(
                        "the stream ended without an end event".into(),
                    ))));
                }
                Err(e) => return Some(Err(self.fail(e))),
            }
        }
    }

    /// Reads the stream to its end, keeping all output in memory.
    pub async fn finish(mut self) -> Result<ExecOutput> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(event) = self.next().await {
            match event? {
                StreamEvent::Started { .. } => {}
                StreamEvent::Stdout(b) => stdout.extend_from_slice(&b),
                StreamEvent::Stderr(b) => stderr.extend_from_slice(&b),
                StreamEvent::Ended(end) => {
                    return Ok(ExecOutput {
                        stdout,
                        stderr,
                        end,
                    });
                }
            }
        }
        Err(Error::Protocol(
            "the stream ended without an end event".into(),
        ))
    }

    fn fail(&mut self, e: Error) -> Error {
        self.done = true;
        e
    }

    /// The event of one line; `None` for a blank line or an event type this client does not
    /// know (newer servers may add some).
    fn parse(&self, line: &[u8]) -> Result<Option<StreamEvent>> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let value: serde_json::Value = serde_json::from_slice(line)
            .map_err(|e| Error::Protocol(format!("an event line is not JSON: {e}")))?;
        let kind = value
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_owned();
        if !matches!(
            kind.as_str(),
            "start" | "stdout" | "stderr" | "end" | "error"
        ) {
            return Ok(None);
        }
        let parsed: ExecEvent = serde_json::from_value(value)
            .map_err(|e| Error::Protocol(format!("a {kind:?} event is malformed: {e}")))?;
        Ok(Some(match parsed {
            ExecEvent::Start { pid } => StreamEvent::Started { pid },
            ExecEvent::Stdout { data } => StreamEvent::Stdout(self.data(data)?),
            ExecEvent::Stderr { data } => StreamEvent::Stderr(self.data(data)?),
            ExecEvent::End(end) => StreamEvent::Ended(end),
            ExecEvent::Error(e) => {
                return Err(Error::Stream {
                    code: e.code,
                    message: e.message,
                });
            }
        }))
    }

    fn data(&self, data: String) -> Result<Bytes> {
        if self.base64 {
            base64::engine::general_purpose::STANDARD
                .decode(data.as_bytes())
                .map(Bytes::from)
                .map_err(|e| Error::Protocol(format!("output data is not base64: {e}")))
        } else {
            Ok(Bytes::from(data))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn stream(base64: bool) -> ExecStream {
        ExecStream {
            body: ByteStream::empty("http://test"),
            buf: Vec::new(),
            base64,
            queued: VecDeque::new(),
            done: false,
        }
    }

    #[test]
    fn lines_become_events() {
        let s = stream(false);
        assert_eq!(
            s.parse(br#"{"type":"start","pid":7}"#).unwrap(),
            Some(StreamEvent::Started { pid: 7 })
        );
        assert_eq!(
            s.parse(b"{\"type\":\"stdout\",\"data\":\"hi\\n\"}\n")
                .unwrap(),
            Some(StreamEvent::Stdout(Bytes::from_static(b"hi\n")))
        );
        let end = s
            .parse(br#"{"type":"end","exit_code":3,"signal":null,"duration_ms":5,"timed_out":false,"oom_killed":false}"#)
            .unwrap();
        assert!(matches!(
            end,
            Some(StreamEvent::Ended(ExecEnd {
                exit_code: Some(3),
                ..
            }))
        ));
        assert_eq!(s.parse(b"  \n").unwrap(), None);
        assert_eq!(s.parse(br#"{"type":"progress","x":1}"#).unwrap(), None);
        let e = s
            .parse(br#"{"type":"error","code":"unavailable","message":"agent gone"}"#)
            .unwrap_err();
        assert_eq!(e.code(), Some("unavailable"));
        assert!(matches!(s.parse(b"{nope"), Err(Error::Protocol(_))));
        assert!(matches!(
            s.parse(br#"{"type":"stdout"}"#),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn base64_output_is_decoded() {
        let s = stream(true);
        assert_eq!(
            s.parse(br#"{"type":"stderr","data":"AP8="}"#).unwrap(),
            Some(StreamEvent::Stderr(Bytes::from_static(&[0, 255])))
        );
        assert!(s.parse(br#"{"type":"stdout","data":"!!"}"#).is_err());
    }
}
