//! `moat mcp`: an MCP server on standard input and output, for MCP clients that start their
//! servers as programs (desktop agents, IDEs). It bridges each JSON-RPC message to the
//! server's `/mcp` endpoint (`MOAT_URL`, `MOAT_API_KEY`), so the tools and the sandboxes are
//! the server's; the session ends, and its sandboxes with it, when standard input closes.

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

/// Relays messages until standard input ends, one at a time, in order.
async fn bridge(client: &Client) -> Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let mut session: Option<String> = None;
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
            match client.mcp_send(line.to_owned(), session.as_deref()).await {
                Ok(answer) => {
                    if answer.session.is_some() {
                        session = answer.session;
                    }
                    answer.messages
                }
                // The client waits for an answer to each request: it gets the error as one.
                Err(e) => error_for(line, &e.to_string()),
            }
        };
        for message in answers {
            out.write_all(message.as_bytes()).await?;
            out.write_all(b"\n").await?;
        }
        out.flush().await?;
    }
    if let Some(session) = session {
        let _ = client.mcp_close(&session).await;
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
