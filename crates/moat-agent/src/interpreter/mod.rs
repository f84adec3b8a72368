//! The code interpreter (the server side of `e2b-code-interpreter`,
//! `shared/reference/e2b-wire.md` §9), under the path prefix `/interpreter`:
//!
//! - `POST /interpreter/execute`: runs code in a context and streams NDJSON ([`stream`]);
//! - `POST|GET /interpreter/contexts`, `POST /interpreter/contexts/{id}/restart`,
//!   `DELETE /interpreter/contexts/{id}`: contexts ([`contexts`]);
//! - `GET /interpreter/health`.
//!
//! Each context is a persistent language driver ([`python`], [`bash`], [`javascript`]) started
//! through the process service as the sandbox's default user, confined like every command. The
//! agent talks to it over private pipes ([`control`]), never through its stdout.

pub mod bash;
pub mod contexts;
pub mod control;
pub mod javascript;
pub mod kernel;
pub mod language;
pub mod limits;
pub mod python;
pub mod stream;

use std::collections::HashMap;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::Value;

use self::contexts::{Context, Registry};
use self::kernel::Launcher;
use self::language::Language;
pub use self::limits::{
    INTERRUPT_GRACE, INTERRUPT_REPEAT, KEEPALIVE_INTERVAL, MAX_CODE_BYTES, MAX_CONTEXTS,
    MAX_EXECUTION_TIME, MAX_FRAME_BYTES, MAX_OUTPUT_TEXT_BYTES, MAX_REQUEST_BYTES,
    MAX_RESULT_ENTRY_BYTES, STARTUP_TIMEOUT,
};
use self::stream::Emitter;
use crate::process::ProcessService;
use crate::process::spawn::DEFAULT_PATH;
use crate::state::AgentState;
use crate::transport;
use crate::transport::ResponseBody;

/// Content type of the interpreter's error answers (upstream answers plain text).
const TEXT: &str = "text/plain; charset=utf-8";

/// The body of `POST /interpreter/execute`; the SDK always sends all four keys, any may be null.
#[derive(Debug, Deserialize)]
struct ExecuteBody {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<HashMap<String, String>>,
}

/// The body of `POST /interpreter/contexts`.
#[derive(Debug, Default, Deserialize)]
struct CreateBody {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

/// The code interpreter of one sandbox.
#[derive(Debug)]
pub struct InterpreterService {
    launcher: Launcher,
    registry: Registry,
}

impl InterpreterService {
    /// The service over `state`, starting drivers through `process`.
    pub fn new(state: Arc<AgentState>, process: Arc<ProcessService>) -> Self {
        InterpreterService {
            launcher: Launcher { state, process },
            registry: Registry::default(),
        }
    }

    /// Answers a request whose path starts with `/interpreter` (the access token, where one is
    /// needed, was checked by the router).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let path = req.uri().path();
        let rest = path.strip_prefix("/interpreter").unwrap_or(path);
        let method = req.method().clone();
        match rest {
            "/health" => match method {
                Method::GET | Method::HEAD => {
                    transport::full(StatusCode::OK, "application/json", "\"OK\"")
                }
                _ => method_not_allowed(),
            },
            "/execute" => match method {
                Method::POST => self.execute(req).await,
                _ => method_not_allowed(),
            },
            "/contexts" => match method {
                Method::GET => self.list(),
                Method::POST => self.create(req).await,
                _ => method_not_allowed(),
            },
            _ => {
                let Some(tail) = rest.strip_prefix("/contexts/") else {
                    return text(StatusCode::NOT_FOUND, format!("no route for {path}"));
                };
                match (method, tail.split_once('/')) {
                    (Method::DELETE, None) => self.remove(tail),
                    (Method::POST, Some((id, "restart"))) => self.restart(id).await,
                    (_, None) | (_, Some((_, "restart"))) => method_not_allowed(),
                    _ => text(StatusCode::NOT_FOUND, format!("no route for {path}")),
                }
            }
        }
    }

    /// `POST /interpreter/execute`.
    async fn execute(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let body: ExecuteBody = match read_json(req).await {
            Ok(b) => b,
            Err(resp) => return *resp,
        };
        let code = body.code.unwrap_or_default();
        if code.len() > MAX_CODE_BYTES {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("code is larger than the limit of {MAX_CODE_BYTES} bytes"),
            );
        }
        if code.contains('\0') {
            return text(StatusCode::BAD_REQUEST, "code must not contain NUL bytes");
        }
        let env = body.env_vars.unwrap_or_default();
        if let Some(k) = env
            .iter()
            .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
            .map(|(k, _)| k)
        {
            return text(
                StatusCode::BAD_REQUEST,
                format!("invalid env var name or value: {k:?}"),
            );
        }
        let context_id = body.context_id.filter(|s| !s.is_empty());
        let language = body.language.filter(|s| !s.trim().is_empty());
        let context = match (context_id, language) {
            (Some(_), Some(_)) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "only one of context_id and language may be given",
                );
            }
            (Some(id), None) => match self.registry.get(&id) {
                Some(c) => c,
                None => return text(StatusCode::NOT_FOUND, format!("Context {id} not found")),
            },
            (None, language) => {
                let language = match language.as_deref().map(Language::parse) {
                    None => Language::Python,
                    Some(Ok(l)) => l,
                    Some(Err(msg)) => return text(StatusCode::BAD_REQUEST, msg),
                };
                if let Err(msg) = language.check_installed(&self.path()) {
                    return text(StatusCode::BAD_REQUEST, msg);
                }
                self.registry.default_for(language, &self.default_cwd())
            }
        };
        let command = match context.language.command(&code, &env) {
            Ok(c) => c,
            Err(msg) => return text(StatusCode::BAD_REQUEST, msg),
        };
        let (out, resp) = Emitter::new();
        tokio::spawn(context.run(self.launcher.clone(), command, out));
        resp
    }

    /// `POST /interpreter/contexts`: creates a context and starts its driver.
    async fn create(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let body: CreateBody = match read_json(req).await {
            Ok(b) => b,
            Err(resp) => return *resp,
        };
        let language = match body.language.as_deref().filter(|l| !l.trim().is_empty()) {
            None => Language::Python,
            Some(raw) => match Language::parse(raw) {
                Ok(l) => l,
                Err(msg) => return text(StatusCode::BAD_REQUEST, msg),
            },
        };
        if let Err(msg) = language.check_installed(&self.path()) {
            return text(StatusCode::BAD_REQUEST, msg);
        }
        if !self.registry.has_room() {
            return too_many();
        }
        let cwd = body
            .cwd
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| self.default_cwd());
        let context = Context::new(language, cwd, false);
        if let Err(e) = context.start(&self.launcher).await {
            return text(e.status, e.message);
        }
        let info = context.info();
        // The driver is killed with the context if the limit was reached meanwhile.
        if self.registry.add(context).is_err() {
            return too_many();
        }
        json(&info)
    }

    /// `GET /interpreter/contexts`. Upstream lists the default Python and JavaScript contexts
    /// from the start; here they exist (not started) once listed, for each language installed.
    fn list(&self) -> Response<ResponseBody> {
        let path = self.path();
        for language in [Language::Python, Language::JavaScript] {
            if language.check_installed(&path).is_ok() {
                self.registry.default_for(language, &self.default_cwd());
            }
        }
        let all: Vec<Value> = self.registry.list().iter().map(|c| c.info()).collect();
        json(&Value::Array(all))
    }

    /// `POST /interpreter/contexts/{id}/restart`.
    async fn restart(&self, id: &str) -> Response<ResponseBody> {
        let Some(context) = self.registry.get(id) else {
            return text(StatusCode::NOT_FOUND, format!("Context {id} not found"));
        };
        match context.restart(&self.launcher).await {
            Ok(()) => transport::empty(StatusCode::NO_CONTENT),
            Err(e) => text(e.status, e.message),
        }
    }

    /// `DELETE /interpreter/contexts/{id}`.
    fn remove(&self, id: &str) -> Response<ResponseBody> {
        match self.registry.remove(id) {
            Some(context) => {
                context.remove();
                transport::empty(StatusCode::NO_CONTENT)
            }
            None => text(StatusCode::NOT_FOUND, format!("Context {id} not found")),
        }
    }

    /// The `PATH` drivers start with (as for commands: the sandbox's own, else the agent's).
    fn path(&self) -> String {
        let config = &self.launcher.state.config;
        config
            .env_vars
            .get("PATH")
            .cloned()
            .or_else(|| std::env::var("PATH").ok())
            .unwrap_or_else(|| DEFAULT_PATH.to_string())
    }

    /// The working directory of contexts that name none: the default user's.
    fn default_cwd(&self) -> String {
        let state = &self.launcher.state;
        match state.resolve_user(None) {
            Ok(user) => state.workdir_for(&user),
            Err(_) => state
                .config
                .default_workdir
                .clone()
                .unwrap_or_else(|| "/".to_string()),
        }
    }
}

/// Reads a JSON body of at most [`MAX_REQUEST_BYTES`]; an empty body is `{}`.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Box<Response<ResponseBody>>> {
    let bytes = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Box::new(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than the limit of {MAX_REQUEST_BYTES} bytes"),
            )));
        }
        Err(e) => {
            return Err(Box::new(text(
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}"),
            )));
        }
    };
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        &bytes[..]
    };
    serde_json::from_slice(bytes).map_err(|e| {
        Box::new(text(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {e}"),
        ))
    })
}

fn text(status: StatusCode, message: impl Into<String>) -> Response<ResponseBody> {
    transport::full(status, TEXT, message.into())
}

fn json(value: &Value) -> Response<ResponseBody> {
    transport::full(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

fn too_many() -> Response<ResponseBody> {
    text(
        StatusCode::TOO_MANY_REQUESTS,
        format!("a sandbox has at most {MAX_CONTEXTS} contexts; remove one first"),
    )
}

fn method_not_allowed() -> Response<ResponseBody> {
    text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}
