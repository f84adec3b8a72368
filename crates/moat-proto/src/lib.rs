//! Every wire type moat speaks, with no I/O.
//!
//! - [`agent_config`]: what the host hands the in-sandbox agent when it starts it.

pub mod agent_config;
