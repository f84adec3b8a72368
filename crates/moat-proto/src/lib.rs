//! Every wire type moat speaks, with no I/O.
//!
//! - [`agent_config`]: what the host hands the in-sandbox agent when it starts it.
//! - [`connect`]: the Connect protocol's framing (envelopes, end-stream, errors, deadlines).
//! - [`envd`]: messages of the envd-compatible `process` and `filesystem` services.
//! - [`file_signature`]: the `v1_` signatures of envd's file URLs.
//! - [`secret`]: the one constant-time comparison of secrets.
//! - [`units`]: sizes, CPU counts and durations in their human forms (`512M`, `0.5`, `30s`).
//! - [`v1`]: the `/v1` REST API's request and response bodies.

pub mod agent_config;
pub mod connect;
pub mod envd;
pub mod file_signature;
pub mod secret;
pub mod units;
pub mod v1;

pub use envd::{filesystem, process};
