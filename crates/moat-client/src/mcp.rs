//! The server's MCP endpoint (`/mcp`, streamable HTTP) one JSON-RPC message at a time: what
//! `moat mcp` needs to bridge a stdio MCP client to a server.

use http::Method;
use http::header::CONTENT_TYPE;

use crate::body::Body;
use crate::client::{Client, read_limited};
use crate::error::Result;

/// The MCP session header.
const SESSION_HEADER: &str = "mcp-session-id";
/// Largest answer to one MCP message (tool results are bounded well below it).
pub const MAX_MCP_ANSWER_BYTES: usize = 8 << 20;

/// What the server answered to one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct McpAnswer {
    /// The session the server put the message in (set by its answer to `initialize`).
    pub session: Option<String>,
    /// The JSON-RPC messages it answered with (none for a notification), each one JSON text.
    pub messages: Vec<String>,
}

impl Client {
    /// Sends one JSON-RPC `message` to `/mcp`, in `session` when there is one.
    pub async fn mcp_send(&self, message: String, session: Option<&str>) -> Result<McpAnswer> {
        let headers: Vec<(&'static str, &str)> =
            session.map(|s| (SESSION_HEADER, s)).into_iter().collect();
        let resp = self
            .send_with(
                Method::POST,
                "/mcp",
                Body::from(message.into_bytes()),
                Some("application/json"),
                "application/json, text/event-stream",
                &headers,
            )
            .await?;
        let session = resp
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let events = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/event-stream"));
        let body = read_limited(resp.into_body(), MAX_MCP_ANSWER_BYTES)
            .await
            .map_err(|e| self.transport(e))?;
        let text = String::from_utf8_lossy(&body);
        let messages = if events {
            // Server-sent events: each event's `data:` lines are one message.
            let mut out = Vec::new();
            for event in text.split("\n\n") {
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if !data.is_empty() && !data.concat().trim().is_empty() {
                    out.push(data.join("\n"));
                }
            }
            out
        } else if text.trim().is_empty() {
            Vec::new()
        } else {
            vec![text.trim().to_owned()]
        };
        Ok(McpAnswer { session, messages })
    }

    /// Ends MCP `session` (the server then drops what it holds for it).
    pub async fn mcp_close(&self, session: &str) -> Result<()> {
        let resp = self
            .send_with(
                Method::DELETE,
                "/mcp",
                Body::empty(),
                None,
                "application/json",
                &[(SESSION_HEADER, session)],
            )
            .await?;
        read_limited(resp.into_body(), MAX_MCP_ANSWER_BYTES)
            .await
            .map_err(|e| self.transport(e))?;
        Ok(())
    }
}
