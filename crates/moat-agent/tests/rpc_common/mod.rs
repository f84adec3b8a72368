//! A raw HTTP/2 Connect client over a socketpair to an in-process agent, speaking the JSON codec
//! with the headers the E2B Python SDK sends (`shared/reference/e2b-wire.md` §4.2).

#![allow(dead_code, clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat_agent::state::AgentState;
use moat_agent::{ServeOptions, serve};
use moat_proto::agent_config::AgentConfig;
use moat_proto::connect::{self, EnvelopeDecoder};
use serde_json::Value;
use tokio::sync::mpsc;

/// Request body type of the test client.
pub type Body = BoxBody<Bytes, Infallible>;

/// Bound on any single wait, so a broken agent fails the test instead of hanging it.
pub const WAIT: Duration = Duration::from_secs(30);

/// A config for tests on the host: root as the default user.
pub fn config() -> AgentConfig {
    AgentConfig {
        default_user: "root".into(),
        ..AgentConfig::default()
    }
}

/// A client connected to an agent served in this process.
pub struct Agent {
    sender: SendRequest<Body>,
}

impl Agent {
    /// Serves an agent with `config` on one end of a socketpair and connects to the other.
    pub async fn start(config: AgentConfig) -> Agent {
        let (server, client) = tokio::net::UnixStream::pair().unwrap();
        let state = Arc::new(AgentState::new(config));
        tokio::spawn(async move {
            let _ = serve(server, state, ServeOptions::default()).await;
        });
        Agent::over(client).await
    }

    /// Connects to an agent already serving the other end of `stream`.
    pub async fn over(stream: tokio::net::UnixStream) -> Agent {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        Agent { sender }
    }

    /// Sends a request.
    pub async fn send(&self, req: Request<Body>) -> Response<Incoming> {
        let mut sender = self.sender.clone();
        tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .expect("response in time")
            .expect("response")
    }

    /// A request builder with the SDK's headers for `kind` ("unary" or "stream").
    pub fn builder(path: &str, streaming: bool) -> http::request::Builder {
        let b = Request::post(format!("http://localhost{path}"))
            .header("connect-protocol-version", "1")
            .header("e2b-sandbox-id", "test")
            .header("e2b-sandbox-port", "49983");
        if streaming {
            b.header("content-type", "application/connect+json")
                .header("connect-content-encoding", "identity")
                .header("connect-accept-encoding", "identity")
        } else {
            b.header("content-type", "application/json")
                .header("content-encoding", "identity")
                .header("accept-encoding", "identity")
        }
    }

    /// A unary JSON call: (status, JSON body).
    pub async fn unary(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut b = Self::builder(path, false);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self
            .send(b.body(full(serde_json::to_vec(&body).unwrap())).unwrap())
            .await;
        let status = resp.status().as_u16();
        let bytes = read_all(resp.into_body()).await;
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, json)
    }

    /// Opens a server-streaming JSON call whose request is `body` in one envelope.
    pub async fn stream(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> Stream {
        let mut b = Self::builder(path, true);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let env = connect::encode_envelope(0, &serde_json::to_vec(&body).unwrap());
        let resp = self.send(b.body(full(env)).unwrap()).await;
        Stream::new(resp)
    }

    /// Opens a streaming call whose request body is fed through the returned sender.
    pub async fn stream_with_body(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (
        mpsc::Sender<Bytes>,
        tokio::task::JoinHandle<Response<Incoming>>,
    ) {
        let mut b = Self::builder(path, true);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let req = b.body(BodyExt::boxed(StreamBody::new(frames))).unwrap();
        let mut sender = self.sender.clone();
        let handle = tokio::spawn(async move { sender.send_request(req).await.unwrap() });
        (tx, handle)
    }
}

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// Reads a whole body (bounded by [`WAIT`]).
pub async fn read_all(body: Incoming) -> Bytes {
    tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes()
}

/// One item of a streaming response.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A message envelope's payload.
    Message(Bytes),
    /// The end-stream envelope's JSON.
    End(Value),
}

/// A streaming response being read.
pub struct Stream {
    /// HTTP status.
    pub status: u16,
    /// Content type.
    pub content_type: String,
    body: Incoming,
    dec: EnvelopeDecoder,
    ended: bool,
}

impl Stream {
    /// Wraps a response.
    pub fn new(resp: Response<Incoming>) -> Stream {
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        Stream {
            status,
            content_type,
            body: resp.into_body(),
            dec: EnvelopeDecoder::new(64 << 20),
            ended: false,
        }
    }

    /// The next item; `None` once the body ended.
    pub async fn next(&mut self) -> Option<Item> {
        loop {
            if let Some(env) = self.dec.next_envelope().expect("framing") {
                if env.is_end_stream() {
                    self.ended = true;
                    return Some(Item::End(
                        serde_json::from_slice(&env.payload).expect("end json"),
                    ));
                }
                return Some(Item::Message(env.payload));
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("frame in time");
            match frame {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.dec.push(&d);
                    }
                }
                Some(Err(e)) => panic!("body error: {e}"),
                None => {
                    self.dec.finish().expect("ends on an envelope boundary");
                    return None;
                }
            }
        }
    }

    /// The next message as JSON, or the end-stream JSON wrapped as `{"$end": ...}`.
    pub async fn next_json(&mut self) -> Option<Value> {
        match self.next().await? {
            Item::Message(b) => Some(serde_json::from_slice(&b).expect("message json")),
            Item::End(v) => Some(serde_json::json!({ "$end": v })),
        }
    }

    /// Reads everything: (messages, end-stream JSON); asserts the body ends right after.
    pub async fn collect(mut self) -> (Vec<Value>, Value) {
        let mut messages = Vec::new();
        loop {
            match self.next().await.expect("stream ended without end-stream") {
                Item::Message(b) => messages.push(serde_json::from_slice(&b).expect("json")),
                Item::End(end) => {
                    assert!(self.next().await.is_none(), "data after end-stream");
                    return (messages, end);
                }
            }
        }
    }
}

/// Process output in `events` concatenated per channel: (stdout, stderr, pty).
pub fn outputs(events: &[Value]) -> (String, String, String) {
    use base64::Engine as _;
    let (mut out, mut err, mut pty) = (Vec::new(), Vec::new(), Vec::new());
    for ev in events {
        let Some(data) = ev.pointer("/event/data") else {
            continue;
        };
        let decode = |v: &Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap()
        };
        if let Some(v) = data.get("stdout") {
            out.extend(decode(v));
        }
        if let Some(v) = data.get("stderr") {
            err.extend(decode(v));
        }
        if let Some(v) = data.get("pty") {
            pty.extend(decode(v));
        }
    }
    let s = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
    (s(out), s(err), s(pty))
}

/// Base64 of `data`.
pub fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The `Start` request the SDK's `commands.run` sends for `cmd`.
pub fn run_request(cmd: &str, stdin: bool) -> Value {
    serde_json::json!({
        "process": { "cmd": "/bin/bash", "args": ["-l", "-c", cmd] },
        "stdin": stdin,
    })
}

/// Pids of live (non-zombie) processes whose command line contains `needle`.
pub fn processes_matching(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) {
            found.push(pid);
        }
    }
    found
}
