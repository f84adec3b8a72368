//! Routing of every request the agent serves: the Connect RPCs of `process.Process` and
//! `filesystem.Filesystem`, the plain `/files`, `/health` and `/envs` routes, the TCP relay
//! (`/relay/tcp`), the code interpreter under `/interpreter` and the host's own `/moat/layer`.

use std::future::Future;
use std::sync::Arc;

use futures_util::stream::{self, BoxStream, StreamExt};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use moat_proto::agent_config::{LAYER_PATH, RECONNECT_PATH};
use moat_proto::{filesystem as fs, process as pr};

use crate::auth;
use crate::files;
use crate::filesystem::FsService;
use crate::interpreter::InterpreterService;
use crate::process::ProcessService;
use crate::reaper::Reaper;
use crate::relay;
use crate::rpc::{Code, RpcError};
use crate::state::AgentState;
use crate::transport::ResponseBody;
use crate::transport::{self, Call, Codec, Kind, Message};
use crate::users::User;

const PROCESS: &str = "process.Process";
const FILESYSTEM: &str = "filesystem.Filesystem";

/// The shape of the RPC `service`/`method`, if the agent serves it.
fn rpc_kind(service: &str, method: &str) -> Option<Kind> {
    let kind = match (service, method) {
        (PROCESS, "Start" | "Connect") => Kind::ServerStream,
        (PROCESS, "StreamInput") => Kind::ClientStream,
        (PROCESS, "List" | "Update" | "SendInput" | "SendSignal" | "CloseStdin") => Kind::Unary,
        (FILESYSTEM, "WatchDir") => Kind::ServerStream,
        (
            FILESYSTEM,
            "Stat" | "MakeDir" | "Move" | "ListDir" | "Remove" | "CreateWatcher"
            | "GetWatcherEvents" | "RemoveWatcher",
        ) => Kind::Unary,
        _ => return None,
    };
    Some(kind)
}

/// Every service of the agent behind one request handler.
#[derive(Debug)]
pub struct Router {
    state: Arc<AgentState>,
    process: Arc<ProcessService>,
    fs: FsService,
    interpreter: InterpreterService,
}

impl Router {
    /// The router over `state`; see [`ProcessService::new`] for `landlock_root`.
    pub fn new(
        state: Arc<AgentState>,
        reaper: Arc<Reaper>,
        landlock_root: Option<std::path::PathBuf>,
    ) -> Self {
        let process = Arc::new(ProcessService::new(state.clone(), reaper, landlock_root));
        Router {
            interpreter: InterpreterService::new(state.clone(), process.clone()),
            process,
            fs: FsService::new(state.clone()),
            state,
        }
    }

    /// Answers one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        let path = req.uri().path();
        match path {
            "/health" => {
                return match *req.method() {
                    Method::GET | Method::HEAD => transport::empty(StatusCode::NO_CONTENT),
                    _ => method_not_allowed("GET"),
                };
            }
            "/files" => return files::handle(self.state.clone(), req).await,
            _ => {}
        }
        if path == relay::PATH {
            return relay::handle(req).await;
        }
        if path == LAYER_PATH {
            return crate::layer::handle(self.state.layer.clone(), req).await;
        }
        if path == RECONNECT_PATH {
            if req.method() != Method::POST {
                return method_not_allowed("POST");
            }
            if !self.state.config.channel_on_stdin {
                return transport::plain(
                    StatusCode::CONFLICT,
                    "this agent's channel cannot be reconnected",
                );
            }
            crate::pollfd::checkpoint_coming();
            self.state
                .expect_reconnect
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.state.reconnect.notify_one();
            return transport::empty(StatusCode::NO_CONTENT);
        }
        if path == "/interpreter" || path.starts_with("/interpreter/") {
            return self.interpreter.handle(req).await;
        }
        if path == "/envs" {
            return match *req.method() {
                Method::GET => transport::full(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec(&self.state.config.env_vars).unwrap_or_default(),
                ),
                _ => method_not_allowed("GET"),
            };
        }
        let Some((service, method)) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|(s, m)| !s.is_empty() && !m.contains('/'))
        else {
            return not_found(path);
        };
        let Some(kind) = rpc_kind(service, method) else {
            if service == PROCESS || service == FILESYSTEM {
                let mut resp = transport::unary_error(&RpcError::new(
                    Code::Unimplemented,
                    format!("{service}/{method} is not implemented"),
                ));
                *resp.status_mut() = StatusCode::NOT_FOUND;
                return resp;
            }
            return not_found(path);
        };
        if req.method() != Method::POST {
            return method_not_allowed("POST");
        }
        let call = match Call::parse(kind, req.headers()) {
            Ok(call) => call,
            Err(resp) => return *resp,
        };
        let user = match auth::basic_user(req.headers())
            .and_then(|name| self.state.resolve_user(name.as_deref()))
        {
            Ok(user) => user,
            Err(e) => return transport::error_response(kind, call.codec, &e),
        };
        let (service, method) = (service.to_string(), method.to_string());
        let body = req.into_body();
        match service.as_str() {
            PROCESS => self.process_rpc(&method, call, &user, body).await,
            _ => self.filesystem_rpc(&method, call, &user, body).await,
        }
    }

    async fn process_rpc(
        &self,
        method: &str,
        call: Call,
        user: &User,
        body: Incoming,
    ) -> Response<ResponseBody> {
        let p = &self.process;
        let keepalive = || pr::StartResponse {
            event: Some(pr::ProcessEvent {
                event: Some(pr::process_event::Event::Keepalive(
                    pr::process_event::KeepAlive {},
                )),
            }),
        };
        match method {
            "Start" => {
                server_stream(
                    call,
                    body,
                    keepalive(),
                    |req: pr::StartRequest| async move {
                        let events = p.start(user, req, call.deadline)?;
                        Ok(events
                            .map(|ev| ev.map(|ev| pr::StartResponse { event: Some(ev) }))
                            .boxed())
                    },
                )
                .await
            }
            "Connect" => {
                let keepalive = pr::ConnectResponse {
                    event: keepalive().event,
                };
                server_stream(
                    call,
                    body,
                    keepalive,
                    |req: pr::ConnectRequest| async move {
                        let events = p.connect(req)?;
                        Ok(events
                            .map(|ev| ev.map(|ev| pr::ConnectResponse { event: Some(ev) }))
                            .boxed())
                    },
                )
                .await
            }
            "StreamInput" => {
                let messages = transport::read_stream::<pr::StreamInputRequest>(body, call.codec);
                let work = p.stream_input(messages);
                let result = match call.deadline {
                    Some(d) => tokio::time::timeout_at(d, work)
                        .await
                        .unwrap_or_else(|_| Err(deadline_exceeded())),
                    None => work.await,
                };
                transport::single_response(call.codec, result)
            }
            "List" => unary(call, body, |_: pr::ListRequest| async { Ok(p.list()) }).await,
            "Update" => unary(call, body, |r| async { p.update(r) }).await,
            "SendInput" => unary(call, body, |r| p.send_input(r)).await,
            "CloseStdin" => unary(call, body, |r| async { p.close_stdin(r) }).await,
            "SendSignal" => {
                let work = async {
                    let bytes = transport::read_unary_bytes(body).await?;
                    let req = decode_send_signal(&bytes, call.codec)?;
                    p.send_signal(req)
                };
                finish_unary(call, work).await
            }
            _ => not_found(method),
        }
    }

    async fn filesystem_rpc(
        &self,
        method: &str,
        call: Call,
        user: &User,
        body: Incoming,
    ) -> Response<ResponseBody> {
        let f = &self.fs;
        match method {
            "Stat" => unary(call, body, |r| f.stat(user, r)).await,
            "MakeDir" => unary(call, body, |r| f.make_dir(user, r)).await,
            "Move" => unary(call, body, |r| f.move_entry(user, r)).await,
            "ListDir" => unary(call, body, |r| f.list_dir(user, r)).await,
            "Remove" => unary(call, body, |r| f.remove(user, r)).await,
            "CreateWatcher" => unary(call, body, |r| f.create_watcher(user, r)).await,
            "GetWatcherEvents" => unary(call, body, |r| f.get_watcher_events(user, r)).await,
            "RemoveWatcher" => unary(call, body, |r| f.remove_watcher(user, r)).await,
            "WatchDir" => {
                use fs::watch_dir_response::{Event, KeepAlive, StartEvent};
                let keepalive = fs::WatchDirResponse {
                    event: Some(Event::Keepalive(KeepAlive {})),
                };
                server_stream(
                    call,
                    body,
                    keepalive,
                    |req: fs::WatchDirRequest| async move {
                        let events = f.watch_dir(user, req).await?;
                        let start = fs::WatchDirResponse {
                            event: Some(Event::Start(StartEvent {})),
                        };
                        let rest = events.map(|ev| {
                            ev.map(|ev| fs::WatchDirResponse {
                                event: Some(Event::Filesystem(ev)),
                            })
                        });
                        Ok(stream::once(async { Ok(start) }).chain(rest).boxed())
                    },
                )
                .await
            }
            _ => not_found(method),
        }
    }
}

fn deadline_exceeded() -> RpcError {
    RpcError::new(Code::DeadlineExceeded, "context deadline exceeded")
}

/// Runs a unary call: reads the request and runs `handler`, both under the call's deadline.
async fn unary<Req, Resp, F, Fut>(call: Call, body: Incoming, handler: F) -> Response<ResponseBody>
where
    Req: Message,
    Resp: Message,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp, RpcError>>,
{
    let work = async {
        let req = transport::read_unary::<Req>(body, call.codec).await?;
        handler(req).await
    };
    finish_unary(call, work).await
}

async fn finish_unary<Resp: Message>(
    call: Call,
    work: impl Future<Output = Result<Resp, RpcError>>,
) -> Response<ResponseBody> {
    match tokio::time::timeout_at(call.unary_deadline(), work).await {
        Ok(Ok(resp)) => transport::unary_ok(call.codec, &resp),
        Ok(Err(e)) => transport::unary_error(&e),
        Err(_) => transport::unary_error(&deadline_exceeded()),
    }
}

/// Runs a server-streaming call: reads the one request message (under the call's deadline),
/// asks `open` for the stream, and frames it with keepalives and the deadline.
async fn server_stream<Req, Resp, F, Fut>(
    call: Call,
    body: Incoming,
    keepalive: Resp,
    open: F,
) -> Response<ResponseBody>
where
    Req: Message,
    Resp: Message,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<BoxStream<'static, Result<Resp, RpcError>>, RpcError>>,
{
    let work = async {
        let req = transport::read_single::<Req>(body, call.codec).await?;
        open(req).await
    };
    let opened = match tokio::time::timeout_at(call.unary_deadline(), work).await {
        Ok(r) => r,
        Err(_) => Err(deadline_exceeded()),
    };
    match opened {
        Ok(items) => transport::stream_response(
            call.codec,
            items,
            Some((call.keepalive, keepalive)),
            call.deadline,
        ),
        Err(e) => transport::error_response(Kind::ServerStream, call.codec, &e),
    }
}

/// Decodes `SendSignal`, accepting a signal number the `Signal` enum does not name also in JSON
/// (an extension: the JSON codec otherwise only knows the enum's values).
fn decode_send_signal(bytes: &[u8], codec: Codec) -> Result<pr::SendSignalRequest, RpcError> {
    if codec == Codec::Proto {
        return codec.decode(bytes);
    }
    let mut value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| RpcError::new(Code::InvalidArgument, format!("invalid JSON message: {e}")))?;
    let number = value
        .get("signal")
        .and_then(|s| s.as_i64())
        .map(|n| i32::try_from(n).unwrap_or(-1));
    if number.is_some()
        && let Some(obj) = value.as_object_mut()
    {
        obj.remove("signal");
    }
    let mut req: pr::SendSignalRequest = serde_json::from_value(value)
        .map_err(|e| RpcError::new(Code::InvalidArgument, format!("invalid JSON message: {e}")))?;
    if let Some(n) = number {
        req.signal = n;
    }
    Ok(req)
}

fn not_found(path: &str) -> Response<ResponseBody> {
    let mut resp = transport::unary_error(&RpcError::new(
        Code::NotFound,
        format!("no route for {path}"),
    ));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp
}

fn method_not_allowed(allow: &'static str) -> Response<ResponseBody> {
    let mut resp = transport::plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}
