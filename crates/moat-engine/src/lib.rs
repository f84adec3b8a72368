//! moat's domain: sandboxes made by isolation backends, and the client of the agent inside each.
//!
//! - [`backend`]: the `Backend` and `Instance` traits every isolation backend implements (each
//!   backend lives in a crate of its own, `moat-backend-*`).
//! - [`agent_client`]: the host's HTTP/2 client of the agent inside a sandbox.
//! - [`auth`]: who calls: the [`auth::Caller`] every service takes (from an API key, or local).
//! - [`files`]: a sandbox's files and directories (tar archives) through its agent.
//! - [`ids`], [`listing`], [`clock`]: id shapes, listing queries and timestamps for front ends.
//! - [`manager`]: the sandboxes of `moat serve`: create, exec, delete, TTL, kept true in the store.
//! - [`metrics`]: latency histograms and counters of `moat serve`, in the Prometheus text format.
//! - [`plan`]: a create resolved once, with its template, into one checked `SandboxPlan`.
//! - [`resources`]: limits, their bounds, and parsing.
//! - [`rootfs_users`]: whether a directory root filesystem has the accounts commands run as.
//! - [`status`]: what a server reports about itself (sandbox counts, the metrics text).
//! - [`store`]: the durable state of `moat serve` (tenants, keys, templates, sandboxes) in SQLite.
//! - [`error`]: the engine's errors.

pub mod agent_client;
pub mod auth;
pub mod backend;
pub mod blobs;
pub mod clock;
pub mod disk;
pub mod error;
pub mod files;
pub mod host_limits;
pub mod ids;
pub mod images;
pub mod listing;
pub mod manager;
pub mod metrics;
pub mod network;
pub mod plan;
pub mod resources;
pub mod rootfs_users;
pub mod status;
pub mod store;
pub mod tenant_slots;
mod tls;

pub use error::{EngineError, Result};
