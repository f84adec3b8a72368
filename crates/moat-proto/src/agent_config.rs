//! The start-up configuration the host hands to the in-sandbox agent.
//!
//! The backend serialises an [`AgentConfig`] as JSON into the agent's environment variable
//! [`AGENT_CONFIG_ENV`]; the agent reads it once and removes it, so user processes never see it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Environment variable that carries the JSON [`AgentConfig`] into the agent.
pub const AGENT_CONFIG_ENV: &str = "MOAT_AGENT_CONFIG";

/// The file descriptor on which the agent finds its channel to the host (a connected stream socket).
pub const AGENT_CHANNEL_FD: i32 = 3;

/// The file descriptor on which the agent finds its writable layer, when its configuration
/// names one ([`AgentConfig::writable_layer`]): an `O_PATH` directory opened before the sandbox's
/// root was pivoted to.
pub const AGENT_LAYER_FD: i32 = 4;

/// Paths of the agent that only the host may call: the server's proxies refuse to forward
/// anything under this prefix (see `AgentClient::forward`).
pub const HOST_ONLY_PREFIX: &str = "/moat/";

/// The host-only route of the writable layer: `GET` streams it as a tar archive, `PUT`
/// unpacks such an archive over the sandbox's root (see the agent's `layer` module).
pub const LAYER_PATH: &str = "/moat/layer";

/// The host-only route that readies a memory checkpoint: `POST` tells an agent whose channel is
/// its standard input ([`AgentConfig::channel_on_stdin`]) to wait, once this connection ends,
/// for a new one on the same descriptor instead of exiting. A runtime that restores the
/// sandbox from a checkpoint (gVisor's `runsc restore`) hands that descriptor a new socket.
pub const RECONNECT_PATH: &str = "/moat/reconnect";

/// What the directory on [`AGENT_LAYER_FD`] holds: exactly what the sandbox wrote.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WritableLayer {
    /// The root filesystem itself (the `host` template's tmpfs); other filesystems mounted on
    /// it (the host's read-only directories, `/proc`, `/dev`) are not part of the layer.
    Root,
    /// The upper directory of an overlay root (a directory template): new and changed files,
    /// and a whiteout (a character device 0/0) for each file of the template that was removed.
    OverlayUpper,
}

/// The file descriptor on which the agent finds its listener when [`AgentConfig::listener`] is
/// set (a listening stream socket the host can open new channels on).
pub const AGENT_LISTENER_FD: i32 = 5;

/// The first file descriptor on which the agent finds the `cgroup.procs` files of its sandbox's
/// user processes, open for writing ([`AgentConfig::user_cgroups`] of them, in a row). Each
/// user process writes `0` to each before `exec`, which moves it into the cgroups whose memory
/// and pids limits are the sandbox's: an out-of-memory kill or a fork bomb then takes a user
/// process, never the agent, which has room of its own beyond those limits.
pub const AGENT_USER_CGROUP_FD: i32 = 6;

/// What the agent needs to know to serve a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// User that runs commands and owns files when a request names none (`user`, uid 1000).
    pub default_user: String,
    /// Working directory for commands that name none; `None` means the user's home.
    #[serde(default)]
    pub default_workdir: Option<String>,
    /// Environment variables every process in the sandbox starts with (below the request's own).
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// Resource limits applied to every user process (rlimits; the cgroup limits are the host's).
    #[serde(default)]
    pub limits: UserLimits,
    /// The agent has a listener on [`AGENT_LISTENER_FD`]: it serves every channel opened there
    /// besides the first one, and outlives them all (the sandbox is kept across host restarts).
    /// Without one it exits when its first channel closes.
    #[serde(default)]
    pub listener: bool,
    /// The writable layer handed over on [`AGENT_LAYER_FD`], if the backend hands one over.
    #[serde(default)]
    pub writable_layer: Option<WritableLayer>,
    /// How many user processes' `cgroup.procs` files are handed over, from
    /// [`AGENT_USER_CGROUP_FD`] up.
    #[serde(default)]
    pub user_cgroups: u32,
    /// The channel is the agent's standard input instead of [`AGENT_CHANNEL_FD`]: a runtime
    /// that hands a container only its standard streams (gVisor's `runsc`) passes it there.
    #[serde(default)]
    pub channel_on_stdin: bool,
}

/// Per-process limits (setrlimit) for user code inside the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserLimits {
    /// `RLIMIT_NOFILE`: open files per process.
    pub nofile: u64,
    /// `RLIMIT_FSIZE`: largest file a process may write, bytes.
    pub fsize: u64,
    /// `RLIMIT_NPROC`: processes of one uid (the cgroup pids limit is the hard bound).
    pub nproc: u64,
}

impl Default for UserLimits {
    fn default() -> Self {
        UserLimits {
            nofile: 4096,
            fsize: 4 << 30,
            nproc: 4096,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            default_user: "user".to_string(),
            default_workdir: None,
            env_vars: BTreeMap::new(),
            limits: UserLimits::default(),
            listener: false,
            writable_layer: None,
            user_cgroups: 0,
            channel_on_stdin: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_unknown_fields() {
        let cfg = AgentConfig::default();
        let text = serde_json::to_string(&cfg).expect("serialise");
        let back: AgentConfig = serde_json::from_str(&text).expect("parse");
        assert_eq!(cfg, back);
        let bad = r#"{"default_user":"user","surprise":1}"#;
        assert!(serde_json::from_str::<AgentConfig>(bad).is_err());
    }
}
