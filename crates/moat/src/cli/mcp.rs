//! `moat mcp`: an MCP server on standard input and output, for MCP clients that start their
//! servers as programs (desktop agents, IDEs). It bridges each JSON-RPC message to the
//! server's `/mcp` endpoint (`MOAT_URL`, `MOAT_API_KEY`), so the tools and the sandboxes are
//! the server's. Requests are relayed side by side, each answer written out as it comes; the
//! session ends, and its sandboxes with it, when standard input closes and the answers under
//! way are written. A session the server ended meanwhile (idle, or a restart) is opened again
//! as the client first opened it, so a client left idle keeps working (with fresh sandboxes).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use moat_client::Client;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use super::remote::{self, Remote};

/// Arguments of `moat mcp`.
#[derive(Debug, clap::Args)]
pub struct McpArgs {
    #[command(flatten)]
    remote: Remote,
}

/// Longest message read from standard input.
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Runs `moat mcp`.
pub fn main(args: McpArgs) -> ExitCode {
    remote::block_on(async move {
        let client = args.remote.client()?;
        bridge(&client).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// The id of the `initialize` the bridge sends itself to open a new session.
const REOPEN_ID: &str = "moat-mcp-reopen";

/// Requests relayed at once; more wait for one of them to be answered. The server holds a
/// session's calls to its own limits too.
const MAX_IN_FLIGHT: usize = 32;
/// Requests relayed or waiting at once; one more is answered with an error at once. Input
/// is read on meanwhile, so that a cancel is never stuck behind the requests it cancels.
const MAX_WAITING: usize = 1024;

/// The server's session of this bridge, and how to open another like it.
#[derive(Default)]
struct Session {
    id: Option<String>,
    /// The client's `initialize`, sent again (under [`REOPEN_ID`]) when the server has ended
    /// the session: the client started its servers once and never sees the session's id.
    initialize: Option<Value>,
}

/// What the relaying tasks share: the client, the session and standard output.
struct Bridge {
    client: Client,
    session: Mutex<Session>,
    out: Mutex<tokio::io::Stdout>,
}

impl Bridge {
    /// Sends `line` in the session and writes its answers out (an error as the answer to a
    /// request). When the server no longer knows the session (it ended after its idle time,
    /// or the server restarted), opens a new one as the client first did and sends `line`
    /// again there; the old session's sandboxes are gone.
    async fn relay(&self, line: &str) -> Result<()> {
        let answers = match self.send(line).await {
            Ok(messages) => messages,
            // The client waits for an answer to each request: it gets the error as one.
            Err(e) => error_for(line, &e),
        };
        self.write(&answers).await
    }

    async fn send(&self, line: &str) -> Result<Vec<String>, String> {
        let message: Option<Value> = serde_json::from_str(line).ok();
        if message
            .as_ref()
            .is_some_and(|m| m.get("method").and_then(Value::as_str) == Some("initialize"))
        {
            let mut session = self.session.lock().await;
            session.initialize = message;
            session.id = None;
        }
        let used = self.session.lock().await.id.clone();
        match self.send_once(line, used.clone()).await {
            Err(e) if e.status() == Some(404) && used.is_some() => {
                let now = self.reopen(used).await?;
                self.send_once(line, now).await.map_err(|e| e.to_string())
            }
            other => other.map_err(|e| e.to_string()),
        }
    }

    /// Sends `line` in the session `id` (none: it opens one).
    async fn send_once(
        &self,
        line: &str,
        id: Option<String>,
    ) -> std::result::Result<Vec<String>, moat_client::Error> {
        let answer = self.client.mcp_send(line.to_owned(), id.as_deref()).await?;
        if answer.session.is_some() {
            self.session.lock().await.id = answer.session;
        }
        Ok(answer.messages)
    }

    /// Opens a session in place of `lost`, unless another message did so already; the id to
    /// send in.
    async fn reopen(&self, lost: Option<String>) -> Result<Option<String>, String> {
        let mut session = self.session.lock().await;
        if session.id != lost {
            return Ok(session.id.clone());
        }
        let Some(mut initialize) = session.initialize.clone() else {
            return Err("the server ended this MCP session, and it was never initialized".into());
        };
        initialize["id"] = Value::from(REOPEN_ID);
        let opened = self
            .client
            .mcp_send(initialize.to_string(), None)
            .await
            .map_err(|e| format!("opening a new MCP session: {e}"))?;
        session.id = opened.session;
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.client
            .mcp_send(initialized.to_string(), session.id.as_deref())
            .await
            .map_err(|e| format!("opening a new MCP session: {e}"))?;
        Ok(session.id.clone())
    }

    async fn write(&self, messages: &[String]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut out = self.out.lock().await;
        for message in messages {
            out.write_all(message.as_bytes()).await?;
            out.write_all(b"\n").await?;
        }
        out.flush().await?;
        Ok(())
    }
}

/// Relays messages until standard input ends, then waits for the answers under way. An
/// `initialize` is answered, and a notification accepted, before the next message is read
/// (what follows needs the session, and notifications keep their order); other requests go
/// at once, so a long tool call holds up neither the next call nor its own cancellation, and
/// their answers come as they are ready.
async fn bridge(client: &Client) -> Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let bridge = Arc::new(Bridge {
        client: client.clone(),
        session: Mutex::default(),
        out: Mutex::new(tokio::io::stdout()),
    });
    let places = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut relaying = JoinSet::new();
    // Requests waiting for a place, by id (as JSON): a cancel of one of them takes it out,
    // so it is never sent after its own cancel.
    let waiting: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
    while let Some(line) = lines.next_line().await.context("reading standard input")? {
        let line = line.trim().to_owned();
        if line.is_empty() {
            continue;
        }
        if line.len() > MAX_MESSAGE_BYTES {
            let why = format!("message larger than {MAX_MESSAGE_BYTES} bytes");
            bridge.write(&error_for(&line, &why)).await?;
        } else if in_turn(&line) {
            if let Some(id) = cancelled_request(&line) {
                lock(&waiting).remove(&id);
            }
            bridge.relay(&line).await?;
        } else if relaying.len() >= MAX_WAITING {
            let why = format!("more than {MAX_WAITING} requests at once");
            bridge.write(&error_for(&line, &why)).await?;
        } else {
            let id = request_id(&line);
            if let Some(id) = &id {
                lock(&waiting).insert(id.clone());
            }
            let (bridge, places, waiting) = (bridge.clone(), places.clone(), waiting.clone());
            relaying.spawn(async move {
                let _place = places.acquire_owned().await?;
                // Cancelled while it waited: the client expects no answer.
                if let Some(id) = &id
                    && !lock(&waiting).remove(id)
                {
                    return Ok(());
                }
                bridge.relay(&line).await
            });
        }
        while let Some(done) = relaying.try_join_next() {
            done??;
        }
    }
    while let Some(done) = relaying.join_next().await {
        done??;
    }
    if let Some(id) = bridge.session.lock().await.id.take() {
        let _ = client.mcp_close(&id).await;
    }
    Ok(())
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The id of the request `line`, as JSON text.
fn request_id(line: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    v.get("id").filter(|id| !id.is_null()).map(Value::to_string)
}

/// The id (as JSON text) of the request `line` cancels, when it is a
/// `notifications/cancelled`.
fn cancelled_request(line: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    (v.get("method")?.as_str()? == "notifications/cancelled")
        .then(|| v.get("params")?.get("requestId").map(Value::to_string))
        .flatten()
}

/// Whether `line` is relayed before the next message is read: an `initialize`, a
/// notification (no id), or what is not JSON-RPC at all (the server answers its error).
fn in_turn(line: &str) -> bool {
    match serde_json::from_str::<Value>(line) {
        Ok(m) => {
            m.get("method").and_then(Value::as_str) == Some("initialize")
                || m.get("id").is_none_or(Value::is_null)
        }
        Err(_) => true,
    }
}

/// A JSON-RPC error answering `line` when it is a request (it has an id); nothing for a
/// notification.
fn error_for(line: &str, why: &str) -> Vec<String> {
    let id = serde_json::from_str::<Value>(line)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .filter(|id| !id.is_null());
    match id {
        Some(id) => vec![
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": why}})
                .to_string(),
        ],
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancels_name_their_requests_as_requests_do() {
        let call = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call"}"#;
        let cancel =
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":7}}"#;
        assert_eq!(request_id(call), cancelled_request(cancel));
        assert_eq!(request_id(call).as_deref(), Some("7"));
        let named = r#"{"jsonrpc":"2.0","id":"a","method":"tools/call"}"#;
        assert_eq!(request_id(named).as_deref(), Some("\"a\""));
        assert_eq!(cancelled_request(call), None);
    }

    #[test]
    fn requests_but_initialize_go_side_by_side() {
        assert!(in_turn(r#"{"jsonrpc":"2.0","id":1,"method":"initialize"}"#));
        assert!(in_turn(
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled"}"#
        ));
        assert!(in_turn("not json"));
        assert!(!in_turn(
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call"}"#
        ));
    }

    #[test]
    fn errors_answer_requests_only() {
        let answered = error_for(r#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#, "down");
        assert_eq!(answered.len(), 1);
        assert!(answered[0].contains(r#""id":7"#) && answered[0].contains("down"));
        assert!(
            error_for(
                r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
                "x"
            )
            .is_empty()
        );
        assert!(error_for("not json", "x").is_empty());
    }
}
