//! moat's domain: sandboxes made by isolation backends, and the client of the agent inside each.

pub mod agent_client;
