//! Every wire type moat speaks, with no I/O.
//!
//! - [`agent_config`]: what the host hands the in-sandbox agent when it starts it.
//! - [`envd`]: messages of the envd-compatible `process` and `filesystem` services.

pub mod agent_config;
pub mod envd;

pub use envd::{filesystem, process};
