//! `moat mcp`: an MCP server on standard input and output, for MCP clients that start their
//! servers as programs (desktop agents, IDEs). It bridges each JSON-RPC message to the
//! server's `/mcp` endpoint (`MOAT_URL`, `MOAT_API_KEY`), so the tools and the sandboxes are
//! the server's; the session ends, and its sandboxes with it, when standard input closes. A
//! session the server ended meanwhile (idle, or a restart) is opened again as the client first
//! opened it, so a client left idle keeps working (with fresh sandboxes).

use std::process::ExitCode;

use anyhow::{Context, Result};
use moat_client::Client;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

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

/// The server's session of this bridge, and how to open another like it.
#[derive(Default)]
struct Session {
    id: Option<String>,
    /// The client's `initialize`, sent again (under [`REOPEN_ID`]) when the server has ended
    /// the session: the client started its servers once and never sees the session's id.
    initialize: Option<Value>,
}

impl Session {
    /// Sends `line` in this session. When the server no longer knows the session (it ended
    /// after its idle time, or the server restarted), opens a new one as the client first did
    /// and sends `line` again there; the old session's sandboxes are gone.
    async fn send(&mut self, client: &Client, line: &str) -> Result<Vec<String>, String> {
        let message: Option<Value> = serde_json::from_str(line).ok();
        if message
            .as_ref()
            .is_some_and(|m| m.get("method").and_then(Value::as_str) == Some("initialize"))
        {
            self.initialize = message;
            self.id = None;
        }
        match self.send_once(client, line).await {
            Err(e) if e.status() == Some(404) && self.id.is_some() => {
                self.reopen(client).await?;
                self.send_once(client, line)
                    .await
                    .map_err(|e| e.to_string())
            }
            other => other.map_err(|e| e.to_string()),
        }
    }

    async fn send_once(
        &mut self,
        client: &Client,
        line: &str,
    ) -> std::result::Result<Vec<String>, moat_client::Error> {
        let answer = client.mcp_send(line.to_owned(), self.id.as_deref()).await?;
        if answer.session.is_some() {
            self.id = answer.session;
        }
        Ok(answer.messages)
    }

    async fn reopen(&mut self, client: &Client) -> Result<(), String> {
        let Some(mut initialize) = self.initialize.clone() else {
            return Err("the server ended this MCP session, and it was never initialized".into());
        };
        initialize["id"] = Value::from(REOPEN_ID);
        self.id = None;
        self.send_once(client, &initialize.to_string())
            .await
            .map_err(|e| format!("opening a new MCP session: {e}"))?;
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.send_once(client, &initialized.to_string())
            .await
            .map_err(|e| format!("opening a new MCP session: {e}"))?;
        Ok(())
    }
}

/// Relays messages until standard input ends, one at a time, in order.
async fn bridge(client: &Client) -> Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let mut session = Session::default();
    while let Some(line) = lines.next_line().await.context("reading standard input")? {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let answers = if line.len() > MAX_MESSAGE_BYTES {
            error_for(
                line,
                &format!("message larger than {MAX_MESSAGE_BYTES} bytes"),
            )
        } else {
            match session.send(client, line).await {
                Ok(messages) => messages,
                // The client waits for an answer to each request: it gets the error as one.
                Err(e) => error_for(line, &e),
            }
        };
        for message in answers {
            out.write_all(message.as_bytes()).await?;
            out.write_all(b"\n").await?;
        }
        out.flush().await?;
    }
    if let Some(id) = session.id {
        let _ = client.mcp_close(&id).await;
    }
    Ok(())
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
