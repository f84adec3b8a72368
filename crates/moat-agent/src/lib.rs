//! The in-sandbox agent.
//!
//! The backend starts it as the sandbox's PID 1 with a connected stream socket on fd 3 (see
//! [`moat_proto::agent_config`]). It reaps orphans, and serves HTTP/2 (h2c, prior knowledge) on that
//! socket: the envd-compatible `process.Process` and `filesystem.Filesystem` Connect services and the
//! plain `/files`, `/health` and `/envs` routes described in `shared/reference/e2b-wire.md`, and
//! the TCP relay to services inside the sandbox ([`relay`]), and the code interpreter under
//! `/interpreter` (§9 there).

pub mod auth;
pub mod channel;
pub mod entry;
pub mod files;
pub mod filesystem;
pub mod interpreter;
pub mod layer;
pub mod pollfd;
pub mod process;
pub mod reaper;
pub mod relay;
pub mod router;
pub mod rpc;
pub mod server;
pub mod state;
pub mod transport;
pub mod users;

pub use entry::agent_main;
pub use server::{ServeOptions, serve};
pub use transport::ResponseBody;
