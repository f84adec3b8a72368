//! State shared by every service of the agent.

use std::sync::Arc;

use moat_proto::agent_config::AgentConfig;

use crate::layer::Layer;
use crate::rpc::{Code, RpcError};
use crate::users::{self, User};

/// What every request handler can see.
#[derive(Debug)]
pub struct AgentState {
    /// The configuration the host started the agent with.
    pub config: AgentConfig,
    /// The sandbox's writable layer, when the backend handed one over.
    pub layer: Option<Arc<Layer>>,
    /// The host asked to reconnect after this connection (see `RECONNECT_PATH`).
    pub expect_reconnect: std::sync::atomic::AtomicBool,
    /// Woken when the host asks to reconnect: the agent then ends the connection itself.
    pub reconnect: tokio::sync::Notify,
}

impl AgentState {
    /// State for `config`, without a writable layer.
    pub fn new(config: AgentConfig) -> Self {
        AgentState {
            config,
            layer: None,
            expect_reconnect: std::sync::atomic::AtomicBool::new(false),
            reconnect: tokio::sync::Notify::new(),
        }
    }

    /// The same state with the sandbox's writable layer.
    pub fn with_layer(mut self, layer: Layer) -> Self {
        self.layer = Some(Arc::new(layer));
        self
    }

    /// The user a request runs as: `name` when given, else the sandbox's default user.
    /// An unknown user is `unauthenticated` (the `/files` routes answer 401 for it).
    pub fn resolve_user(&self, name: Option<&str>) -> Result<User, RpcError> {
        let name = name
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.config.default_user);
        users::lookup(name)
            .ok_or_else(|| RpcError::new(Code::Unauthenticated, format!("user '{name}' not found")))
    }

    /// The directory relative paths and commands without a `cwd` start from, for `user`.
    pub fn workdir_for(&self, user: &User) -> String {
        self.config
            .default_workdir
            .clone()
            .unwrap_or_else(|| user.home.clone())
    }
}
