//! MCP (Model Context Protocol) at `/mcp`, over streamable HTTP: tools a model uses to run
//! code and commands and move files in a sandbox of its own, and to manage sandboxes.
//!
//! Each MCP session (one `initialize`) gets a sandbox on first use, of the default template
//! unless `create_sandbox` made another, and every tool acts on that one unless told an id.
//! A session's sandboxes are destroyed when the session ends (the client closes it, or the
//! server drops it), and each lives at most [`SESSION_SANDBOX_TTL_SECS`] seconds past its last tool call
//! whatever happens to the session. Calls are authenticated like the rest of the API (the
//! same key header on every request); a tool acts as the caller of its request.
//!
//! A tenant has at most [`MAX_SESSIONS_PER_TENANT`] sessions open, the server
//! [`MAX_SESSIONS`]; a session with no request for [`SESSION_IDLE`] ends.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use moat_engine::auth::Caller;
use moat_engine::manager::{
    CodeRun, CodeRunRequest, MAX_CODE_RUN_BYTES, ManagerError, SandboxManager,
};
use moat_engine::tenant_slots::{SlotsFull, TenantSlot, TenantSlots};
use moat_proto::v1;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    InitializeResult, JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities,
    Tool,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, ServerHandler};
use serde_json::{Value, json};

use crate::ApiError;

/// How long a session's sandbox lives past its last tool call, seconds.
pub const SESSION_SANDBOX_TTL_SECS: u64 = 15 * 60;
/// Seconds a `run_code` may take unless it says.
const DEFAULT_RUN_SECS: u64 = 60;
/// Most seconds a tool call may ask to run: within [`SESSION_IDLE`] (the session's idle clock
/// does not count a call under way) and the 5 minutes MCP clients wait for an answer by
/// default. Longer work belongs in a job (`POST /v1/jobs`).
pub const MAX_TOOL_SECS: u64 = 240;
/// Largest file `read_file` returns (as text): what a model can use in one answer.
const MAX_READ_BYTES: u64 = 256 << 10;
/// Largest output of a command or code run returned, per stream.
const MAX_OUTPUT_CHARS: usize = 64 << 10;

/// Most MCP sessions one tenant may have open at once (each holds a task and, once used, a
/// sandbox).
pub const MAX_SESSIONS_PER_TENANT: usize = 32;
/// Most MCP sessions open on the server at once.
pub const MAX_SESSIONS: usize = 1024;
/// A session that gets no request for this long ends, and its sandboxes with it.
pub const SESSION_IDLE: Duration = Duration::from_secs(5 * 60);

/// The `/mcp` service: [`admit`] in front of the MCP transport.
pub(crate) fn service<S: Clone + Send + Sync + 'static>(
    manager: SandboxManager,
) -> axum::routing::MethodRouter<S> {
    let config = StreamableHttpServerConfig::default()
        // Every request carries an API key: a `Host` check adds nothing, and would refuse
        // every name the server is reached by but loopback.
        .disable_allowed_hosts()
        .with_json_response(true)
        // The transport reads its own bodies: the router's limit binds only extractors.
        .with_max_request_body_bytes(crate::MAX_BODY_BYTES);
    let mut sessions = LocalSessionManager::default();
    sessions.session_config.keep_alive = Some(SESSION_IDLE);
    let transport = StreamableHttpService::new(
        move || Ok(Session::new(manager.clone())),
        Arc::new(sessions),
        config,
    );
    axum::routing::any_service(transport).layer(axum::middleware::from_fn_with_state(
        Arc::new(Admission {
            places: TenantSlots::new(MAX_SESSIONS_PER_TENANT, Some(MAX_SESSIONS)),
            owners: Mutex::default(),
        }),
        admit,
    ))
}

/// What [`admit`] keeps: the sessions' places, and which tenant opened each session.
struct Admission {
    places: Arc<TenantSlots>,
    /// Session id → the tenant that opened it, while the session lives (its [`SessionPlace`]'s
    /// `alive`, which the session keeps).
    owners: Mutex<HashMap<String, (String, Weak<()>)>>,
}

/// A session's place among [`MAX_SESSIONS_PER_TENANT`], taken by [`admit`] for a request
/// that may open a session and kept by the session its `initialize` opens (see
/// [`Session::initialize`]); a request that opens none gives it back as it ends.
#[derive(Clone)]
struct SessionPlace {
    place: Arc<Mutex<Option<TenantSlot>>>,
    /// Kept by the session the request opens, for as long as it lives.
    alive: Arc<()>,
}

/// Takes a place for a request that may open a session (a `POST` naming none), refusing it
/// with 429 when the caller's tenant or the server has every session it may, and records the
/// tenant of the session it opens. A request naming a live session another tenant opened is
/// refused (404): a session id learned by another tenant reaches nothing of the first
/// tenant's (its sandboxes, its current sandbox, its end).
async fn admit(State(admission): State<Arc<Admission>>, mut req: Request, next: Next) -> Response {
    let Some(tenant) = req.extensions().get::<Caller>().map(|c| c.tenant.clone()) else {
        return ApiError::unauthenticated("no authenticated caller").into_response();
    };
    if let Some(session) = req.headers().get("mcp-session-id") {
        let owner = session.to_str().ok().and_then(|id| {
            let owners = lock(&admission.owners);
            let (owner, alive) = owners.get(id)?;
            alive.upgrade().map(|_| owner.clone())
        });
        if owner.is_some_and(|owner| owner != tenant) {
            return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such MCP session")
                .into_response();
        }
        return next.run(req).await;
    }
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    match admission.places.enter(&tenant) {
        Ok(place) => {
            let alive = Arc::new(());
            req.extensions_mut().insert(SessionPlace {
                place: Arc::new(Mutex::new(Some(place))),
                alive: alive.clone(),
            });
            let response = next.run(req).await;
            if let Some(id) = response
                .headers()
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
            {
                let mut owners = lock(&admission.owners);
                // Sessions that ended are forgotten once they could be as many as live ones.
                if owners.len() >= MAX_SESSIONS {
                    owners.retain(|_, (_, alive)| alive.strong_count() > 0);
                }
                owners.insert(id.to_owned(), (tenant, Arc::downgrade(&alive)));
            }
            response
        }
        Err(full) => {
            let message = match full {
                SlotsFull::Tenant => format!(
                    "tenant {tenant} has {MAX_SESSIONS_PER_TENANT} MCP sessions open, the most \
                     one tenant may have; close one (DELETE /mcp with its Mcp-Session-Id) or \
                     let one idle for {} s",
                    SESSION_IDLE.as_secs()
                ),
                SlotsFull::Server => format!(
                    "the server has {MAX_SESSIONS} MCP sessions open, the most it keeps; retry \
                     later"
                ),
            };
            let mut response =
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
                    .into_response();
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(SESSION_IDLE.as_secs()),
            );
            response
        }
    }
}

/// One MCP session: its sandboxes.
pub(crate) struct Session {
    manager: SandboxManager,
    state: Arc<Mutex<SessionState>>,
    /// Held while the sandbox tools act on by default is looked for and made: calls at once
    /// share the one the first of them makes.
    making_current: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct SessionState {
    /// The sandbox tools act on, and who made it.
    current: Option<(Caller, String)>,
    /// Every sandbox this session made (destroyed with it).
    made: Vec<(Caller, String)>,
    /// The session's place among its tenant's, given back when it ends.
    place: Option<TenantSlot>,
    /// Held while the session lives: its owner's record in [`Admission`] lasts as long.
    alive: Option<Arc<()>>,
}

impl Session {
    fn new(manager: SandboxManager) -> Session {
        Session {
            manager,
            state: Arc::default(),
            making_current: Arc::default(),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let made = std::mem::take(&mut lock(&self.state).made);
        if made.is_empty() {
            return;
        }
        let manager = self.manager.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for (caller, id) in made {
                    match manager.delete(&caller, &id).await {
                        Ok(_) | Err(ManagerError::NotFound(_) | ManagerError::Conflict(_)) => {}
                        Err(e) => {
                            tracing::warn!(sandbox = %id, "ending an MCP session's sandbox: {e}")
                        }
                    }
                }
            });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A tool's input schema from its JSON.
fn schema(value: Value) -> Arc<JsonObject> {
    match value {
        Value::Object(map) => Arc::new(map),
        _ => Arc::new(JsonObject::new()),
    }
}

fn tool(name: &'static str, description: &'static str, input: Value) -> Tool {
    Tool::new(name, description, schema(input))
}

/// The tools, described for a model to use well.
fn tools() -> Vec<Tool> {
    let sandbox = json!({"type": "string", "description": "A sandbox id from create_sandbox or list_sandboxes; this session's sandbox when absent."});
    vec![
        tool(
            "run_code",
            "Run code in an isolated sandbox's code interpreter, like a notebook cell: variables, imports and functions persist between calls in the same sandbox, and so do files. Returns what it printed, its results (the value of the last expression; charts and images as images) and any error with its traceback. The sandbox has no network access unless its template gives it some.",
            json!({"type": "object", "properties": {
                "code": {"type": "string", "description": "The source code to run."},
                "language": {"type": "string", "enum": ["python", "javascript", "bash"], "description": "The language of the code (default python); each language keeps its own state."},
                "timeout_secs": {"type": "integer", "minimum": 1, "maximum": MAX_TOOL_SECS, "description": "Seconds it may run (default 60, at most 240)."},
                "sandbox_id": sandbox,
            }, "required": ["code"]}),
        ),
        tool(
            "run_command",
            "Run a shell command (/bin/sh -c) in the sandbox, in the user's home, and return its standard output, standard error and exit code.",
            json!({"type": "object", "properties": {
                "command": {"type": "string", "description": "The shell command line."},
                "timeout_secs": {"type": "integer", "minimum": 1, "maximum": MAX_TOOL_SECS, "description": "Seconds it may run (default 60, at most 240)."},
                "sandbox_id": sandbox,
            }, "required": ["command"]}),
        ),
        tool(
            "write_file",
            "Write text to a file in the sandbox (created or replaced, with its parent directories). Relative paths are under /home/user.",
            json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "content": {"type": "string"},
                "sandbox_id": sandbox,
            }, "required": ["path", "content"]}),
        ),
        tool(
            "read_file",
            "Read a text file from the sandbox (at most 256 KiB). Relative paths are under /home/user.",
            json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "sandbox_id": sandbox,
            }, "required": ["path"]}),
        ),
        tool(
            "list_files",
            "List the entries of a directory in the sandbox (name, type, size). Relative paths are under /home/user; the home itself when absent.",
            json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "sandbox_id": sandbox,
            }}),
        ),
        tool(
            "create_sandbox",
            "Create a new sandbox (from a template, the default when absent) and make it this session's sandbox. Sandboxes this session creates are destroyed when it ends.",
            json!({"type": "object", "properties": {
                "template": {"type": "string", "description": "A template name."},
            }}),
        ),
        tool(
            "list_sandboxes",
            "List your running sandboxes (id, template, state).",
            json!({"type": "object", "properties": {}}),
        ),
        tool(
            "kill_sandbox",
            "Destroy a sandbox (this session's when no id is given).",
            json!({"type": "object", "properties": {"sandbox_id": sandbox}}),
        ),
    ]
}

/// What a tool answers: text for the model, or an error it can read.
type ToolResult = Result<String, String>;

fn text(args: &JsonObject, name: &str) -> Result<Option<String>, String> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{name} must be a string")),
    }
}

fn required(args: &JsonObject, name: &str) -> Result<String, String> {
    text(args, name)?.ok_or_else(|| format!("{name} is required"))
}

/// The `timeout_secs` of a call, if it gives one: 1 to [`MAX_TOOL_SECS`].
fn timeout_secs(args: &JsonObject) -> Result<Option<u64>, String> {
    match args.get("timeout_secs") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_TOOL_SECS).contains(n))
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "timeout_secs must be an integer from 1 to {MAX_TOOL_SECS}; run longer work \
                     as a job (POST /v1/jobs)"
                )
            }),
    }
}

/// At most [`MAX_OUTPUT_CHARS`] of `s`, saying so when cut.
fn bounded(s: &str) -> String {
    if s.len() <= MAX_OUTPUT_CHARS {
        return s.to_owned();
    }
    let mut end = MAX_OUTPUT_CHARS;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[… cut: {} bytes in all]", &s[..end], s.len())
}

fn exec_text(r: &v1::ExecResult) -> String {
    let mut out = String::new();
    if !r.stdout.is_empty() {
        out.push_str(&format!("stdout:\n{}\n", bounded(&r.stdout)));
    }
    if !r.stderr.is_empty() {
        out.push_str(&format!("stderr:\n{}\n", bounded(&r.stderr)));
    }
    match (&r.exit_code, &r.signal) {
        _ if r.timed_out => out.push_str("timed out (killed)\n"),
        _ if r.oom_killed => out.push_str("killed: out of memory\n"),
        (Some(code), _) => out.push_str(&format!("exit code: {code}\n")),
        (None, Some(signal)) => out.push_str(&format!("ended by {signal}\n")),
        (None, None) => {}
    }
    out
}

/// A code run as a tool result: its output and results as text, its images as images; an
/// error (raised, or a run past its time) marks the result as one.
fn code_result(run: &CodeRun) -> CallToolResult {
    let mut out = String::new();
    if !run.stdout.is_empty() {
        out.push_str(&format!("stdout:\n{}\n", bounded(&run.stdout)));
    }
    if !run.stderr.is_empty() {
        out.push_str(&format!("stderr:\n{}\n", bounded(&run.stderr)));
    }
    let mut images = Vec::new();
    for result in &run.results {
        let field = |k: &str| result.get(k).and_then(Value::as_str);
        for (key, mime) in [("png", "image/png"), ("jpeg", "image/jpeg")] {
            if let Some(data) = field(key) {
                images.push(ContentBlock::image(data.to_owned(), mime.to_owned()));
            }
        }
        if let Some(text) = field("text").or_else(|| field("markdown")) {
            out.push_str(&format!("result:\n{}\n", bounded(text)));
        } else if let Some(html) = field("html") {
            out.push_str(&format!("result (html):\n{}\n", bounded(html)));
        }
    }
    if let Some(e) = &run.error {
        out.push_str(&format!(
            "error: {}: {}\n{}\n",
            e.name,
            e.value,
            bounded(&e.traceback)
        ));
    }
    if run.timed_out {
        out.push_str("timed out: the run was interrupted\n");
    }
    if run.truncated {
        out.push_str(&format!(
            "[output past {MAX_CODE_RUN_BYTES} bytes was dropped]\n"
        ));
    }
    if out.is_empty() && images.is_empty() {
        out.push_str("(no output)\n");
    }
    let mut content = vec![ContentBlock::text(out)];
    content.extend(images);
    if run.error.is_some() || run.timed_out {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    }
}

impl Session {
    /// The sandbox a tool acts on: the one named, or this session's (made now if none).
    async fn sandbox(&self, caller: &Caller, named: Option<String>) -> Result<String, String> {
        if let Some(id) = named {
            return Ok(id);
        }
        if let Some((_, id)) = &lock(&self.state).current {
            return Ok(id.clone());
        }
        self.create(caller, None, true).await
    }

    /// Makes a sandbox of `template` (the default one when `None`), which tools then act on
    /// by default; with `reuse`, the one they act on already if there is one.
    async fn create(
        &self,
        caller: &Caller,
        template: Option<String>,
        reuse: bool,
    ) -> Result<String, String> {
        let req = v1::CreateSandbox {
            template: template.unwrap_or_else(|| v1::DEFAULT_TEMPLATE.to_owned()),
            timeout_secs: Some(self.sandbox_ttl()),
            metadata: [("moat.mcp".to_owned(), "true".to_owned())].into(),
            ..Default::default()
        };
        // Made and recorded in a task of its own: a call cancelled meanwhile must not leave a
        // sandbox the session does not know (and so never destroys).
        let (manager, state, caller) = (self.manager.clone(), self.state.clone(), caller.clone());
        let making = self.making_current.clone();
        tokio::spawn(async move {
            let _making = making.lock_owned().await;
            if let Some((_, id)) = lock(&state).current.as_ref().filter(|_| reuse) {
                return Ok(id.clone());
            }
            let made = manager
                .create(&caller, req)
                .await
                .map_err(|e| e.to_string())?;
            let mut state = lock(&state);
            state.current = Some((caller.clone(), made.id.clone()));
            state.made.push((caller, made.id.clone()));
            Ok(made.id)
        })
        .await
        .map_err(|e| format!("creating a sandbox: {e}"))?
    }

    /// How long a sandbox lives past a tool call: [`SESSION_SANDBOX_TTL_SECS`], or the
    /// server's `--max-ttl` where that is shorter (a longer one would be refused).
    fn sandbox_ttl(&self) -> u64 {
        SESSION_SANDBOX_TTL_SECS.min(self.manager.options().max_ttl.as_secs().max(1))
    }

    /// Pushes the sandbox's end back: it lives while the session uses it. Only ever later: a
    /// sandbox named by a call may have been given a longer life than a session's.
    async fn keep(&self, caller: &Caller, id: &str) {
        let _ = self
            .manager
            .extend_timeout(caller, id, self.sandbox_ttl())
            .await;
    }

    /// `run_code`: in the code interpreter of the session's (or the named) sandbox.
    async fn run_code(&self, caller: &Caller, args: &JsonObject) -> Result<CodeRun, String> {
        let named = text(args, "sandbox_id")?;
        let code = required(args, "code")?;
        let language = text(args, "language")?;
        let timeout = timeout_secs(args)?.unwrap_or(DEFAULT_RUN_SECS);
        let id = self.sandbox(caller, named).await?;
        self.keep(caller, &id).await;
        let req = CodeRunRequest {
            code,
            language,
            timeout: std::time::Duration::from_secs(timeout),
        };
        self.manager
            .run_in_interpreter(caller, &id, req)
            .await
            .map_err(|e| e.to_string())
    }

    async fn call(&self, caller: &Caller, name: &str, args: &JsonObject) -> ToolResult {
        let named = text(args, "sandbox_id")?;
        match name {
            "run_command" => {
                let command = required(args, "command")?;
                let timeout = timeout_secs(args)?;
                let id = self.sandbox(caller, named).await?;
                self.keep(caller, &id).await;
                let req = v1::ExecRequest {
                    shell: Some(command),
                    timeout_secs: timeout,
                    ..Default::default()
                };
                let r = self
                    .manager
                    .exec(caller, &id, req)
                    .await
                    .map_err(|e| e.to_string())?;
                // A run past its time is an error, as `run_code`'s is.
                if r.timed_out {
                    Err(exec_text(&r))
                } else {
                    Ok(exec_text(&r))
                }
            }
            "write_file" => {
                let path = required(args, "path")?;
                let content = required(args, "content")?;
                let id = self.sandbox(caller, named).await?;
                self.keep(caller, &id).await;
                let agent = self
                    .manager
                    .agent(caller, &id)
                    .await
                    .map_err(|e| e.to_string())?;
                let size = content.len();
                agent
                    .write_file(&path, bytes::Bytes::from(content), None)
                    .await
                    .map_err(|e| format!("{path}: {e}"))?;
                Ok(format!("wrote {size} bytes to {path}"))
            }
            "read_file" => {
                let path = required(args, "path")?;
                let id = self.sandbox(caller, named).await?;
                self.keep(caller, &id).await;
                let agent = self
                    .manager
                    .agent(caller, &id)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut download = agent
                    .read_file_stream(&path, None)
                    .await
                    .map_err(|e| format!("{path}: {e}"))?;
                if download.size() > MAX_READ_BYTES {
                    return Err(format!(
                        "{path} is {} bytes, more than the {MAX_READ_BYTES} read_file returns; read a part of it with run_command (head, tail, sed -n)",
                        download.size()
                    ));
                }
                let mut data = Vec::new();
                while let Some(chunk) = download.next().await {
                    data.extend_from_slice(&chunk.map_err(|e| format!("{path}: {e}"))?);
                }
                String::from_utf8(data).map_err(|_| {
                    format!("{path} is not text; use run_command (base64, xxd) to see it")
                })
            }
            "list_files" => {
                let path = text(args, "path")?.unwrap_or_else(|| ".".into());
                let id = self.sandbox(caller, named).await?;
                self.keep(caller, &id).await;
                let entries = self
                    .manager
                    .files()
                    .list(caller, &id, &path, 1, None)
                    .await
                    .map_err(|e| format!("{path}: {e}"))?;
                let mut out = String::new();
                for e in entries {
                    let kind = match e.kind {
                        v1::FileType::Dir => "dir",
                        v1::FileType::File => "file",
                        v1::FileType::Symlink => "link",
                        _ => "other",
                    };
                    out.push_str(&format!("{kind}\t{}\t{}\n", e.size, e.path));
                }
                Ok(if out.is_empty() {
                    format!("{path} is empty")
                } else {
                    bounded(&out)
                })
            }
            "create_sandbox" => {
                let template = text(args, "template")?;
                let id = self.create(caller, template, false).await?;
                Ok(format!("created sandbox {id}; tools now act on it"))
            }
            "list_sandboxes" => {
                let query = v1::ListSandboxes {
                    states: vec![v1::SandboxState::Running, v1::SandboxState::Paused],
                    ..Default::default()
                };
                let list = self
                    .manager
                    .list(caller, query)
                    .await
                    .map_err(|e| e.to_string())?;
                let current = lock(&self.state).current.as_ref().map(|(_, id)| id.clone());
                let mut out = String::new();
                for s in list.sandboxes {
                    let mark = if Some(&s.id) == current.as_ref() {
                        " (this session's)"
                    } else {
                        ""
                    };
                    out.push_str(&format!(
                        "{}\t{}\t{}{mark}\n",
                        s.id,
                        s.template,
                        s.state.as_str()
                    ));
                }
                Ok(if out.is_empty() {
                    "no running sandboxes".into()
                } else {
                    out
                })
            }
            "kill_sandbox" => {
                let id = match named {
                    Some(id) => id,
                    None => lock(&self.state)
                        .current
                        .as_ref()
                        .map(|(_, id)| id.clone())
                        .ok_or("this session has no sandbox")?,
                };
                self.manager
                    .delete(caller, &id)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut state = lock(&self.state);
                if state.current.as_ref().is_some_and(|(_, c)| *c == id) {
                    state.current = None;
                }
                state.made.retain(|(_, m)| *m != id);
                Ok(format!("destroyed sandbox {id}"))
            }
            other => Err(format!("unknown tool {other:?}")),
        }
    }
}

impl ServerHandler for Session {
    async fn initialize(
        &self,
        request: rmcp::model::InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        // The session keeps the place its opening request was given; an initialize sent
        // again on an open session (which takes none) leaves the session's own place.
        let opening = context
            .extensions
            .get::<Parts>()
            .and_then(|parts| parts.extensions.get::<SessionPlace>());
        if let Some(opening) = opening
            && let Some(place) = lock(&opening.place).take()
        {
            let mut state = lock(&self.state);
            state.place.get_or_insert(place);
            state.alive.get_or_insert_with(|| opening.alive.clone());
        }
        context.peer.set_peer_info(request.clone());
        self.negotiate_initialize(&request)
    }

    fn get_info(&self) -> InitializeResult {
        let mut info = InitializeResult::new(ServerCapabilities::builder().enable_tools().build());
        info.server_info = Implementation::new("moat", env!("CARGO_PKG_VERSION"));
        info.instructions = Some(
            "Tools to run code and shell commands and to read and write files in an isolated, \
             disposable sandbox. A sandbox is made for this session on first use and destroyed \
             when the session ends."
                .into(),
        );
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let caller = context
            .extensions
            .get::<Parts>()
            .and_then(|parts| parts.extensions.get::<Caller>())
            .cloned()
            .ok_or_else(|| ErrorData::invalid_request("no authenticated caller", None))?;
        if !tools().iter().any(|t| t.name == request.name) {
            return Err(ErrorData::invalid_params(
                Cow::Owned(format!("unknown tool {:?}", request.name)),
                None,
            ));
        }
        let args = request.arguments.unwrap_or_default();
        let work = async {
            if request.name == "run_code" {
                match self.run_code(&caller, &args).await {
                    Ok(run) => code_result(&run),
                    Err(why) => CallToolResult::error(vec![ContentBlock::text(why)]),
                }
            } else {
                match self.call(&caller, &request.name, &args).await {
                    Ok(text) => CallToolResult::success(vec![ContentBlock::text(text)]),
                    Err(why) => CallToolResult::error(vec![ContentBlock::text(why)]),
                }
            }
        };
        // A cancelled call (`notifications/cancelled`) stops its work: dropping a command's
        // execution kills it, as a client hanging up on `/v1` exec does.
        let result = tokio::select! {
            result = work => result,
            () = context.ct.cancelled() => {
                CallToolResult::error(vec![ContentBlock::text("cancelled by the client")])
            }
        };
        Ok(result.into())
    }
}
