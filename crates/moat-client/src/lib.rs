//! A Rust client of moat's `/v1` HTTP API: sandboxes, commands (buffered or streamed),
//! files, snapshots, templates and API keys.
//!
//! One [`Client`] talks to one server with one API key over plain HTTP/1.1 (connections are
//! pooled; clones share them). Every call is async (tokio). A failure is an [`Error`]; an
//! error answer of the server keeps its HTTP status and its `error.code` and `message`
//! ([`ApiError`]).
//!
//! ```no_run
//! use moat_client::{Client, StreamEvent};
//! use moat_client::types::{CreateSandbox, ExecRequest, OutputEncoding};
//!
//! # async fn demo() -> moat_client::Result<()> {
//! // MOAT_URL=http://127.0.0.1:7070 and MOAT_API_KEY=moat_… in the environment.
//! let client = Client::from_env()?;
//! let sandbox = client.create_sandbox(&CreateSandbox::default()).await?;
//!
//! // Buffered: wait for the command, get its output whole.
//! let result = client
//!     .exec(&sandbox.id, &ExecRequest {
//!         cmd: Some(vec!["echo".into(), "hello".into()]),
//!         ..Default::default()
//!     })
//!     .await?;
//! assert_eq!(result.stdout, "hello\n");
//!
//! // Files: write one, read it back.
//! client.upload(&sandbox.id, "/tmp/greeting", "hi there").await?;
//! let bytes = client.download(&sandbox.id, "/tmp/greeting").await?.bytes().await?;
//! assert_eq!(&bytes[..], b"hi there");
//!
//! // Streamed: output as it happens.
//! let mut events = client
//!     .exec_stream(&sandbox.id, &ExecRequest {
//!         shell: Some("for i in 1 2 3; do echo $i; sleep 1; done".into()),
//!         encoding: OutputEncoding::Base64,
//!         ..Default::default()
//!     })
//!     .await?;
//! while let Some(event) = events.next().await {
//!     match event? {
//!         StreamEvent::Stdout(bytes) => print!("{}", String::from_utf8_lossy(&bytes)),
//!         StreamEvent::Ended(end) => println!("exit code {:?}", end.exit_code),
//!         _ => {}
//!     }
//! }
//!
//! client.delete_sandbox(&sandbox.id).await?;
//! # Ok(())
//! # }
//! ```

mod body;
mod builds;
mod client;
mod error;
mod exec;
mod files;
mod jobs;
mod keys;
mod mcp;
mod path;
mod sandboxes;
mod snapshots;
mod templates;

pub use body::{Body, ByteStream};
pub use client::{API_KEY_ENV, CONNECT_TIMEOUT, Client, MAX_ERROR_BYTES, MAX_JSON_BYTES, URL_ENV};
pub use error::{ApiError, Error, MAX_ERROR_TEXT, Result};
pub use exec::{ExecOutput, ExecStream, MAX_LINE_BYTES, StreamEvent};
pub use mcp::{MAX_MCP_ANSWER_BYTES, McpAnswer};

/// The request and response bodies of the API: `moat_proto::v1`.
pub mod types {
    pub use moat_proto::v1::*;
}
