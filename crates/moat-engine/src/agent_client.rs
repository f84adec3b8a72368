//! The engine's client of the in-sandbox agent: one HTTP/2 connection (prior knowledge) over the
//! sandbox's channel, the binary protobuf Connect codec for RPCs, and `/files` for file contents.
//!
//! The agent runs inside the sandbox, so a compromised sandbox controls it: every response
//! message and body is size-capped, every unary call has a deadline, and streams fail when the
//! agent goes silent for longer than its keepalive promise allows.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat_proto::agent_config::HOST_ONLY_PREFIX;
use moat_proto::connect::{self, Code, EndStream, EnvelopeDecoder, EnvelopeError};
use moat_proto::process::process_event::Event;
use moat_proto::process::process_selector::Selector;
use moat_proto::process::{
    CloseStdinRequest, CloseStdinResponse, ConnectRequest, ListRequest, ListResponse, ProcessEvent,
    ProcessInfo, ProcessInput, ProcessSelector, Pty, SendInputRequest, SendInputResponse,
    SendSignalRequest, SendSignalResponse, StartRequest, StartResponse, UpdateRequest,
    UpdateResponse, process_input, pty,
};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

mod files;
mod layer;

pub use files::FileDownload;
pub use layer::LayerStream;

/// The error type request bodies to the agent may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request to the agent: a whole message, or a stream (file uploads).
/// The body type of requests to the agent (any streaming body).
pub type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest response message accepted from the agent (its data chunks are at most 32 KiB).
pub const MAX_RESPONSE_MESSAGE: usize = 4 << 20;
/// Most top-level fields (list entries, above all) of a response message accepted from the
/// agent: past the agent's own 100,000-entry listings, and far below what 4 MiB of empty
/// entries (two bytes each) would decode to, some 250 times their size in memory.
pub const MAX_RESPONSE_FIELDS: usize = 131_072;
/// Largest error body read from the agent.
pub const MAX_ERROR_BODY: usize = 64 << 10;
/// Largest response header list accepted from the agent.
pub const MAX_RESPONSE_HEADERS: u32 = 16 << 10;
/// Deadline of unary calls that name none.
pub const DEFAULT_UNARY_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of `health`.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Keepalive interval the client asks for on process streams.
pub const STREAM_KEEPALIVE: Duration = Duration::from_secs(30);
/// A stream on which nothing (not even a keepalive) arrives for this long has failed.
pub const STREAM_IDLE_LIMIT: Duration = Duration::from_secs(90);
/// Slack past a call's own deadline for the agent's answer to arrive.
const GRACE: Duration = Duration::from_secs(2);
/// How long the end of a process stream may lag behind its `end` event (the agent sends both
/// back to back); keepalives do not extend it.
const END_GRACE: Duration = Duration::from_secs(5);

/// What went wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent answered with a Connect (or HTTP) error.
    #[error("agent answered {code}: {message}")]
    Rpc {
        /// The Connect code.
        code: Code,
        /// The agent's message.
        message: String,
    },
    /// The agent did not answer in time.
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed or closed.
    #[error("agent connection: {0}")]
    Transport(String),
    /// The agent answered something this client cannot accept.
    #[error("agent protocol violation: {0}")]
    Protocol(String),
    /// A response was larger than this client accepts.
    #[error("agent response exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
}

impl AgentError {
    /// The Connect code that best describes the error.
    pub fn code(&self) -> Code {
        match self {
            AgentError::Rpc { code, .. } => *code,
            AgentError::Timeout(_) => Code::DeadlineExceeded,
            AgentError::Transport(_) => Code::Unavailable,
            AgentError::Protocol(_) => Code::Internal,
            AgentError::TooLarge { .. } => Code::ResourceExhausted,
        }
    }

    fn transport(e: impl std::fmt::Display) -> AgentError {
        AgentError::Transport(e.to_string())
    }
}

/// Per-call options.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// The user the call runs as; `None` is the sandbox's default user.
    pub user: Option<String>,
    /// The call's deadline. On `start` it is the process's deadline: the agent kills the whole
    /// process group when it passes. `None` on `start` lets the process run indefinitely.
    pub timeout: Option<Duration>,
}

/// A client of one agent. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct AgentClient {
    /// `None` for [`AgentClient::closed`].
    sender: Option<SendRequest<RequestBody>>,
}

impl AgentClient {
    /// Opens the HTTP/2 connection on `io` (the host end of the sandbox's channel) and spawns the
    /// task that drives it on the current tokio runtime.
    pub async fn handshake<IO>(io: IO) -> Result<AgentClient, AgentError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .max_header_list_size(MAX_RESPONSE_HEADERS)
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(1024 * 1024)
            .max_send_buf_size(256 * 1024)
            .max_concurrent_reset_streams(256);
        let (sender, conn) = builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(AgentError::transport)?;
        tokio::spawn(async move {
            // The connection ends when the sandbox goes away; callers see it as transport errors.
            let _ = conn.await;
        });
        Ok(AgentClient {
            sender: Some(sender),
        })
    }

    /// A client with no connection (of a sandbox whose agent is not running, such as one
    /// saved to disk): every call fails as on a closed connection.
    pub fn closed() -> AgentClient {
        AgentClient { sender: None }
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.sender.as_ref().is_none_or(SendRequest::is_closed)
    }

    /// `GET /health`: succeeds when the agent answers 2xx within [`HEALTH_TIMEOUT`].
    pub async fn health(&self) -> Result<(), AgentError> {
        let req = self.request(Method::GET, "/health", None, None, Bytes::new())?;
        let resp = within(HEALTH_TIMEOUT, self.send(req)).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(http_error(resp).await)
        }
    }

    /// `POST /moat/reconnect`: the agent (one whose channel is its standard input) waits for a
    /// new connection once this one closes instead of exiting: what a backend's memory
    /// checkpoint needs before it saves the sandbox, whose restored agent gets a new channel.
    pub async fn expect_reconnect(&self) -> Result<(), AgentError> {
        let req = self.request(
            Method::POST,
            moat_proto::agent_config::RECONNECT_PATH,
            None,
            None,
            Bytes::new(),
        )?;
        let resp = within(HEALTH_TIMEOUT, self.send(req)).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(http_error(resp).await)
        }
    }

    /// `Process.Start`. Waits (at most [`DEFAULT_UNARY_TIMEOUT`]) for the `start` event, so the
    /// returned stream knows the pid.
    pub async fn start(
        &self,
        req: StartRequest,
        opts: CallOptions,
    ) -> Result<ProcessStream, AgentError> {
        self.open_stream("/process.Process/Start", &req, opts).await
    }

    /// [`AgentClient::start`], with a guard that kills the command when it is dropped before
    /// being disarmed (once the command's end was seen). The start goes on in a task of its
    /// own, the guard made there as soon as the pid is known: when the caller stopped waiting
    /// meanwhile, the guard is dropped with the answer, so that no command runs on unfollowed
    /// until its timeout.
    pub async fn start_guarded(
        &self,
        req: StartRequest,
        opts: CallOptions,
    ) -> Result<(ProcessStream, KillOnDrop), AgentError> {
        let client = self.clone();
        // Awaited through its handle: dropped, the task runs on and its answer, guard
        // included, is dropped when it ends.
        tokio::spawn(async move {
            client.start(req, opts).await.map(|process| {
                let guard = KillOnDrop {
                    pid: process.pid(),
                    client,
                    armed: true,
                };
                (process, guard)
            })
        })
        .await
        .map_err(|e| AgentError::Transport(format!("the start of the command failed: {e}")))?
    }

    /// `Process.Connect` to a running (or recently exited) process.
    pub async fn connect(&self, selector: Selector) -> Result<ProcessStream, AgentError> {
        let req = ConnectRequest {
            process: Some(ProcessSelector {
                selector: Some(selector),
            }),
        };
        self.open_stream("/process.Process/Connect", &req, CallOptions::default())
            .await
    }

    /// `Process.List`: running processes.
    pub async fn list(&self) -> Result<Vec<ProcessInfo>, AgentError> {
        let resp: ListResponse = self
            .unary("/process.Process/List", &ListRequest {}, None)
            .await?;
        Ok(resp.processes)
    }

    /// `Process.SendInput`: `data` to the process's stdin, or its PTY when `pty` is set.
    pub async fn send_input(
        &self,
        selector: Selector,
        data: Bytes,
        pty: bool,
    ) -> Result<(), AgentError> {
        let input = if pty {
            process_input::Input::Pty(data.to_vec())
        } else {
            process_input::Input::Stdin(data.to_vec())
        };
        let req = SendInputRequest {
            process: Some(ProcessSelector {
                selector: Some(selector),
            }),
            input: Some(ProcessInput { input: Some(input) }),
        };
        let _: SendInputResponse = self.unary("/process.Process/SendInput", &req, None).await?;
        Ok(())
    }

    /// `Process.CloseStdin`.
    pub async fn close_stdin(&self, selector: Selector) -> Result<(), AgentError> {
        let req = CloseStdinRequest {
            process: Some(ProcessSelector {
                selector: Some(selector),
            }),
        };
        let _: CloseStdinResponse = self
            .unary("/process.Process/CloseStdin", &req, None)
            .await?;
        Ok(())
    }

    /// `Process.SendSignal` with a signal number (9 and 15 are envd's; moat's agent takes any
    /// number from 1 to 64). The agent signals the process's whole group.
    pub async fn send_signal(&self, selector: Selector, signal: i32) -> Result<(), AgentError> {
        let req = SendSignalRequest {
            process: Some(ProcessSelector {
                selector: Some(selector),
            }),
            signal,
        };
        let _: SendSignalResponse = self
            .unary("/process.Process/SendSignal", &req, None)
            .await?;
        Ok(())
    }

    /// `Process.Update`: resizes the process's PTY.
    pub async fn update_pty(
        &self,
        selector: Selector,
        cols: u32,
        rows: u32,
    ) -> Result<(), AgentError> {
        let req = UpdateRequest {
            process: Some(ProcessSelector {
                selector: Some(selector),
            }),
            pty: Some(Pty {
                size: Some(pty::Size { cols, rows }),
            }),
        };
        let _: UpdateResponse = self.unary("/process.Process/Update", &req, None).await?;
        Ok(())
    }

    /// `POST /files` (raw body): writes `data` to `path` inside the sandbox as `user`, creating
    /// parent directories.
    pub async fn write_file(
        &self,
        path: &str,
        data: Bytes,
        user: Option<&str>,
    ) -> Result<(), AgentError> {
        let uri = files_uri(path, user);
        let mut req = self.request(Method::POST, &uri, None, None, data)?;
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let resp = within(DEFAULT_UNARY_TIMEOUT, self.send(req)).await?;
        files::check_written(resp).await
    }

    /// `GET /files`: the contents of `path` inside the sandbox, read as `user`; more than
    /// `max_bytes` is [`AgentError::TooLarge`].
    pub async fn read_file(
        &self,
        path: &str,
        user: Option<&str>,
        max_bytes: usize,
    ) -> Result<Bytes, AgentError> {
        let uri = files_uri(path, user);
        let mut req = self.request(Method::GET, &uri, None, None, Bytes::new())?;
        req.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let resp = within(DEFAULT_UNARY_TIMEOUT, self.send(req)).await?;
        if resp.status() != StatusCode::OK {
            return Err(http_error(resp).await);
        }
        if let Some(enc) = resp.headers().get(header::CONTENT_ENCODING)
            && enc.as_bytes() != b"identity"
        {
            return Err(AgentError::Protocol(format!(
                "GET /files answered with encoding {enc:?}, identity was asked for"
            )));
        }
        within(
            DEFAULT_UNARY_TIMEOUT,
            read_limited(resp.into_body(), max_bytes),
        )
        .await
    }

    fn request(
        &self,
        method: Method,
        path_and_query: &str,
        user: Option<&str>,
        timeout: Option<Duration>,
        body: Bytes,
    ) -> Result<Request<RequestBody>, AgentError> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://agent{path_and_query}"));
        if let Some(user) = user {
            let creds = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
            b = b.header(header::AUTHORIZATION, format!("Basic {creds}"));
        }
        if let Some(t) = timeout {
            b = b.header(connect::HEADER_TIMEOUT_MS, connect::format_timeout_ms(t));
        }
        b.body(
            Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .map_err(|e| AgentError::Protocol(format!("building the request: {e}")))
    }

    /// Sends `req` to the agent as it is, bodies streaming both ways (for proxies: the E2B
    /// sandbox traffic). Only the path and query of its URI are kept; the caller is
    /// responsible for what the request may do (the agent sees it as the host's), except that
    /// paths under [`HOST_ONLY_PREFIX`] are refused as `not_found`.
    pub async fn forward(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, AgentError> {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        // The agent matches paths exactly, so a prefix check keeps the host's own routes
        // (the writable layer) out of reach of whatever the proxied client sends.
        if path.starts_with(HOST_ONLY_PREFIX) {
            return Err(AgentError::Rpc {
                code: Code::NotFound,
                message: format!("no route for {}", req.uri().path()),
            });
        }
        *req.uri_mut() = format!("http://agent{path}")
            .parse()
            .map_err(|e| AgentError::Protocol(format!("request path {path:?}: {e}")))?;
        // HTTP/2 carries the authority in the URI; a Host header would be a second one.
        req.headers_mut().remove(header::HOST);
        self.send(req).await
    }

    /// Starts a run of the code interpreter (`POST /interpreter/execute` with the JSON
    /// `request`, authorised by the sandbox's `access_token`): its answer streams back, one
    /// JSON object a line, for the caller to bound. A refusal is an error whose body was read
    /// within [`MAX_ERROR_BODY`] and [`HEALTH_TIMEOUT`], however much the agent sends.
    pub async fn interpreter_execute(
        &self,
        access_token: &str,
        request: Bytes,
    ) -> Result<Incoming, AgentError> {
        let req = Request::builder()
            .method(Method::POST)
            .uri("http://agent/interpreter/execute")
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-access-token", access_token)
            .body(
                Full::new(request)
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .map_err(|e| AgentError::Protocol(format!("interpreter request: {e}")))?;
        let resp = self.send(req).await?;
        if !resp.status().is_success() {
            return Err(http_error(resp).await);
        }
        Ok(resp.into_body())
    }

    async fn send(&self, req: Request<RequestBody>) -> Result<Response<Incoming>, AgentError> {
        let mut sender = self
            .sender
            .clone()
            .ok_or_else(|| AgentError::Transport("the agent is not running".into()))?;
        sender.ready().await.map_err(AgentError::transport)?;
        sender
            .send_request(req)
            .await
            .map_err(AgentError::transport)
    }

    async fn unary<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        path: &str,
        msg: &Req,
        opts: Option<&CallOptions>,
    ) -> Result<Resp, AgentError> {
        let timeout = opts
            .and_then(|o| o.timeout)
            .unwrap_or(DEFAULT_UNARY_TIMEOUT);
        let user = opts.and_then(|o| o.user.as_deref());
        let mut req = self.request(
            Method::POST,
            path,
            user,
            Some(timeout),
            Bytes::from(msg.encode_to_vec()),
        )?;
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(connect::CONTENT_TYPE_PROTO),
        );
        req.headers_mut().insert(
            connect::HEADER_PROTOCOL_VERSION,
            HeaderValue::from_static("1"),
        );
        within(timeout + GRACE, async {
            let resp = self.send(req).await?;
            if resp.status() != StatusCode::OK {
                return Err(http_error(resp).await);
            }
            let ct = content_type(&resp);
            if ct != connect::CONTENT_TYPE_PROTO {
                return Err(AgentError::Protocol(format!(
                    "{path} answered content type {ct:?}"
                )));
            }
            let body = read_limited(resp.into_body(), MAX_RESPONSE_MESSAGE).await?;
            match top_level_fields(&body) {
                Some(n) if n <= MAX_RESPONSE_FIELDS => {}
                Some(n) => {
                    return Err(AgentError::Protocol(format!(
                        "{path} answered {n} fields; the most accepted is {MAX_RESPONSE_FIELDS}"
                    )));
                }
                None => return Err(AgentError::Protocol(format!("{path}: a malformed answer"))),
            }
            Resp::decode(body).map_err(|e| AgentError::Protocol(format!("{path}: {e}")))
        })
        .await
    }

    async fn open_stream<Req: prost::Message>(
        &self,
        path: &str,
        msg: &Req,
        opts: CallOptions,
    ) -> Result<ProcessStream, AgentError> {
        let envelope = connect::encode_envelope(connect::FLAG_MESSAGE, &msg.encode_to_vec());
        let mut req = self.request(
            Method::POST,
            path,
            opts.user.as_deref(),
            opts.timeout,
            envelope,
        )?;
        let headers = req.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(connect::CONTENT_TYPE_CONNECT_PROTO),
        );
        headers.insert(
            connect::HEADER_PROTOCOL_VERSION,
            HeaderValue::from_static("1"),
        );
        headers.insert(
            connect::HEADER_KEEPALIVE_INTERVAL,
            HeaderValue::from(STREAM_KEEPALIVE.as_secs()),
        );
        // One deadline up to the start event: keepalives reset only the stream's idle limit, so
        // without it an agent sending nothing but keepalives would hold the call forever.
        within(DEFAULT_UNARY_TIMEOUT, async {
            let resp = self.send(req).await?;
            if resp.status() != StatusCode::OK {
                return Err(http_error(resp).await);
            }
            let ct = content_type(&resp);
            if ct != connect::CONTENT_TYPE_CONNECT_PROTO {
                return Err(AgentError::Protocol(format!(
                    "{path} answered content type {ct:?}"
                )));
            }
            let mut stream = ProcessStream {
                body: resp.into_body(),
                dec: EnvelopeDecoder::new(MAX_RESPONSE_MESSAGE),
                timeout: opts.timeout,
                deadline: opts.timeout.map(|t| Instant::now() + t + GRACE),
                end_by: None,
                pid: 0,
                done: false,
            };
            match stream.next().await {
                Some(Ok(ProcessEvent {
                    event: Some(Event::Start(start)),
                })) => {
                    stream.pid = start.pid;
                    Ok(stream)
                }
                Some(Err(e)) => Err(e),
                Some(Ok(other)) => Err(AgentError::Protocol(format!(
                    "{path}: expected the start event first, got {other:?}"
                ))),
                None => Err(AgentError::Protocol(format!(
                    "{path}: stream ended before the start event"
                ))),
            }
        })
        .await
    }
}

/// The events of a `Start` or `Connect` call after its `start` event: output data and one `end`.
/// Keepalives are consumed here.
#[derive(Debug)]
pub struct ProcessStream {
    body: Incoming,
    dec: EnvelopeDecoder,
    /// The call's own timeout, and when it passes (with [`GRACE`]).
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    /// Set by the `end` event: the stream must be over by then.
    end_by: Option<Instant>,
    pid: u32,
    done: bool,
}

/// What a process stream waits for at most.
#[derive(Clone, Copy, PartialEq)]
enum Wait {
    Idle,
    Deadline,
    AfterEnd,
}

impl ProcessStream {
    /// The process's pid (from its `start` event).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next event; `None` after the stream ended normally. A failed stream (for example
    /// `deadline_exceeded` when the process's deadline passed) yields one error.
    pub async fn next(&mut self) -> Option<Result<ProcessEvent, AgentError>> {
        if self.done {
            return None;
        }
        let result = self.next_inner().await;
        if !matches!(result, Some(Ok(_))) {
            self.done = true;
        }
        result
    }

    async fn next_inner(&mut self) -> Option<Result<ProcessEvent, AgentError>> {
        loop {
            match self.dec.next_envelope() {
                Err(EnvelopeError::TooLarge { max, .. }) => {
                    return Some(Err(AgentError::TooLarge { limit: max }));
                }
                Err(e) => return Some(Err(AgentError::Protocol(e.to_string()))),
                Ok(Some(env)) if env.is_end_stream() => return self.end_stream(&env.payload),
                Ok(Some(env)) => {
                    let msg = match StartResponse::decode(env.payload) {
                        Ok(m) => m,
                        Err(e) => return Some(Err(AgentError::Protocol(e.to_string()))),
                    };
                    match msg.event {
                        Some(ProcessEvent {
                            event: Some(Event::Keepalive(_)),
                        }) => continue,
                        Some(ev @ ProcessEvent { event: Some(_) }) => {
                            if matches!(ev.event, Some(Event::End(_))) {
                                self.end_by = Some(Instant::now() + END_GRACE);
                            }
                            return Some(Ok(ev));
                        }
                        _ => {
                            return Some(Err(AgentError::Protocol(
                                "process stream message without an event".into(),
                            )));
                        }
                    }
                }
                Ok(None) => {}
            }
            let (mut until, mut wait) = (Instant::now() + STREAM_IDLE_LIMIT, Wait::Idle);
            for (at, w) in [
                (self.deadline, Wait::Deadline),
                (self.end_by, Wait::AfterEnd),
            ] {
                if let Some(at) = at
                    && at < until
                {
                    (until, wait) = (at, w);
                }
            }
            let frame = match tokio::time::timeout_at(until, self.body.frame()).await {
                Ok(f) => f,
                Err(_) => {
                    return Some(Err(match (wait, self.timeout) {
                        (Wait::Deadline, Some(t)) => AgentError::Timeout(t),
                        (Wait::AfterEnd, _) => AgentError::Protocol(
                            "process stream did not end after its end event".into(),
                        ),
                        _ => AgentError::Transport(
                            "process stream silent past the stream's idle limit".into(),
                        ),
                    }));
                }
            };
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.dec.push(&data);
                    }
                }
                Some(Err(e)) => return Some(Err(AgentError::transport(e))),
                None => {
                    return Some(Err(AgentError::Protocol(
                        "process stream ended without an end-stream message".into(),
                    )));
                }
            }
        }
    }

    fn end_stream(&mut self, payload: &[u8]) -> Option<Result<ProcessEvent, AgentError>> {
        let end: EndStream = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                return Some(Err(AgentError::Protocol(format!(
                    "invalid end-stream message: {e}"
                ))));
            }
        };
        if let Some(err) = end.error {
            return Some(Err(AgentError::Rpc {
                code: err.code().unwrap_or(Code::Unknown),
                message: truncate(err.message),
            }));
        }
        if self.end_by.is_none() {
            return Some(Err(AgentError::Protocol(
                "process stream ended without an end event".into(),
            )));
        }
        None
    }
}

async fn within<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, AgentError>>,
) -> Result<T, AgentError> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(AgentError::Timeout(limit)))
}

async fn read_limited(body: Incoming, limit: usize) -> Result<Bytes, AgentError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(AgentError::TooLarge { limit }),
        Err(e) => Err(AgentError::Transport(e.to_string())),
    }
}

/// How many top-level fields the protobuf message `buf` holds, counted from the wire format
/// alone before anything is decoded; `None` if it is malformed (groups included, which no
/// message of the agent's has).
fn top_level_fields(mut buf: &[u8]) -> Option<usize> {
    let mut n = 0;
    while !buf.is_empty() {
        let key = prost::encoding::decode_varint(&mut buf).ok()?;
        let skip = match key & 7 {
            0 => {
                prost::encoding::decode_varint(&mut buf).ok()?;
                0
            }
            1 => 8,
            2 => usize::try_from(prost::encoding::decode_varint(&mut buf).ok()?).ok()?,
            5 => 4,
            _ => return None,
        };
        buf = buf.get(skip..)?;
        n += 1;
    }
    Some(n)
}

fn content_type(resp: &Response<Incoming>) -> String {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The error a non-success response stands for: a Connect error body when it is one, else the
/// HTTP status mapped as the E2B SDK maps proxy answers (`e2b-wire.md` §4.9).
async fn http_error(resp: Response<Incoming>) -> AgentError {
    let status = resp.status().as_u16();
    let body = match tokio::time::timeout(
        HEALTH_TIMEOUT,
        read_limited(resp.into_body(), MAX_ERROR_BODY),
    )
    .await
    {
        Ok(Ok(b)) => b,
        _ => Bytes::new(),
    };
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let message = json
        .as_ref()
        .and_then(|j| j.get("message"))
        .and_then(|m| m.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| {
            if body.is_empty() {
                format!("HTTP {status}")
            } else {
                String::from_utf8_lossy(&body).into_owned()
            }
        });
    let json_code = json.as_ref().and_then(|j| j.get("code"));
    let code = match json_code {
        Some(serde_json::Value::String(s)) => Code::from_wire(s),
        _ => None,
    }
    .unwrap_or_else(|| {
        let status = json_code
            .and_then(|c| c.as_u64())
            .and_then(|c| u16::try_from(c).ok())
            .unwrap_or(status);
        match status {
            507 => Code::ResourceExhausted,
            s => Code::from_http_status(s),
        }
    });
    AgentError::Rpc {
        code,
        message: truncate(message),
    }
}

/// Keeps error messages from the agent to a sane length.
fn truncate(mut s: String) -> String {
    const MAX: usize = 1024;
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn files_uri(path: &str, user: Option<&str>) -> String {
    let mut uri = format!("/files?path={}", percent_encode(path));
    if let Some(user) = user {
        uri.push_str("&username=");
        uri.push_str(&percent_encode(user));
    }
    uri
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Kills a command (`SIGKILL`, through the agent) when dropped while armed: held by whatever
/// follows a command, so that one nobody follows any more stops at once.
pub struct KillOnDrop {
    client: AgentClient,
    pid: u32,
    armed: bool,
}

impl KillOnDrop {
    /// The command ended (or is someone else's to end now): dropping kills nothing.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(pid = self.pid, "no runtime to kill an abandoned command");
            return;
        };
        let (client, pid) = (self.client.clone(), self.pid);
        runtime.spawn(async move {
            // It may have ended meanwhile; the agent then no longer knows it.
            if let Err(e) = client.send_signal(Selector::Pid(pid), libc::SIGKILL).await {
                tracing::debug!(pid, "killing an abandoned command: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_query_values() {
        assert_eq!(
            files_uri("/home/user/a b&c.txt", Some("user")),
            "/files?path=/home/user/a%20b%26c.txt&username=user"
        );
    }

    #[test]
    fn counts_top_level_fields_without_decoding() {
        use moat_proto::filesystem::{EntryInfo, ListDirResponse};
        let msg = ListDirResponse {
            entries: vec![
                EntryInfo {
                    name: "a".into(),
                    size: 7,
                    ..EntryInfo::default()
                };
                3
            ],
        };
        assert_eq!(top_level_fields(&msg.encode_to_vec()), Some(3));
        assert_eq!(top_level_fields(&[]), Some(0));
        assert_eq!(top_level_fields(&[0x0a, 0x00].repeat(5)), Some(5));
        // A length past the end, a cut varint, a group: malformed.
        assert_eq!(top_level_fields(&[0x0a, 0x05, 0x01]), None);
        assert_eq!(top_level_fields(&[0x08, 0x80]), None);
        assert_eq!(top_level_fields(&[0x0b]), None);
    }

    #[test]
    fn truncates_long_messages() {
        let s = truncate("é".repeat(2000));
        assert!(s.len() <= 1024 + '…'.len_utf8());
    }
}
