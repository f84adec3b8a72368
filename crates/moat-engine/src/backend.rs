//! The isolation backends behind one trait: each makes a sandbox, hands over a byte stream to its
//! agent, and can pause, resume and destroy it. Native (namespaces) today; gVisor and microVMs fit
//! the same shape.

use std::path::PathBuf;

use async_trait::async_trait;
use moat_proto::agent_config::AgentConfig;
use tokio::net::UnixStream;

use crate::error::Result;
use crate::resources::Resources;

/// Where a sandbox's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsSource {
    /// The built-in `host` template: host system directories, read-only.
    Host,
    /// A directory holding a root filesystem, used read-only below a writable layer.
    Dir(PathBuf),
}

/// Everything a backend needs to make one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Sandbox id, `[a-z0-9]{1,64}`.
    pub id: String,
    /// The root filesystem.
    pub rootfs: RootfsSource,
    /// Limits.
    pub resources: Resources,
    /// What the agent is told at start.
    pub agent: AgentConfig,
}

/// What a backend can do beyond the basics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Freeze and thaw all processes.
    pub pause: bool,
    /// Save and restore memory.
    pub memory_checkpoint: bool,
}

/// Counters of a running sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InstanceStats {
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// Processes killed by the kernel's OOM killer so far.
    pub oom_kills: u64,
    /// Of `memory_bytes`, the page cache (file pages, the writable layer's included), bytes.
    pub memory_cache_bytes: u64,
    /// CPU time used so far by all its processes, microseconds.
    pub cpu_usage_usec: u64,
    /// Bytes in use on its writable layer.
    pub disk_used_bytes: u64,
    /// Size of its writable layer, bytes.
    pub disk_total_bytes: u64,
}

/// An isolation backend.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The backend's name (`native`, `gvisor`, …).
    fn name(&self) -> &'static str;
    /// What it can do.
    fn capabilities(&self) -> Capabilities;
    /// Makes a sandbox and starts its agent.
    async fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Instance>>;
    /// Kills and removes whatever sandbox `id` left on the host when the process that owned it
    /// died (a server killed without a chance to clean up). Returns whether anything was left.
    async fn reap_orphan(&self, id: &str) -> Result<bool>;
    /// Takes over sandbox `id`, left running by an earlier process that kept it (see
    /// [`Instance::keep`]), with a fresh channel to its agent. `None` when there is no such
    /// sandbox alive to take over (the caller reaps what is left of it).
    async fn adopt(&self, id: &str) -> Result<Option<Box<dyn Instance>>> {
        let _ = id;
        Ok(None)
    }
    /// Ids of the sandboxes earlier processes with this backend's owner (a server on the same
    /// data dir) kept on this host, adoptable or not; never another owner's.
    fn kept(&self) -> Vec<String> {
        Vec::new()
    }
    /// Removes what processes killed before they could clean up left on the host and nothing
    /// uses any more (empty sandbox cgroups); returns how many were removed. Blocking.
    fn sweep_stale(&self) -> usize {
        0
    }
}

/// One sandbox as its backend sees it.
#[async_trait]
pub trait Instance: Send + Sync {
    /// The sandbox id.
    fn id(&self) -> &str;
    /// Takes the byte stream to the agent (once).
    fn take_channel(&mut self) -> Option<UnixStream>;
    /// Counters.
    fn stats(&self) -> InstanceStats;
    /// [`InstanceStats::oom_kills`] alone, for callers on a hot path (every exec) that need
    /// nothing else; backends whose full [`Instance::stats`] is costly override it.
    fn oom_kills(&self) -> u64 {
        self.stats().oom_kills
    }
    /// The host pid of the sandbox's first process, where the backend has one (for audits).
    fn host_pid(&self) -> Option<i32>;
    /// Freezes every process.
    async fn pause(&self) -> Result<()>;
    /// Thaws every process.
    async fn resume(&self) -> Result<()>;
    /// Resolves when the sandbox's first process (the agent) has exited.
    async fn exited(&self);
    /// Lets the sandbox run on after this process exits, for a later one to
    /// [`Backend::adopt`]; afterwards this handle owns nothing. Fails for sandboxes the backend
    /// did not make keepable.
    fn keep(&mut self) -> Result<()> {
        Err(crate::error::EngineError::Unsupported(format!(
            "sandbox {} cannot outlive this process",
            self.id()
        )))
    }
    /// Kills everything and releases every host resource. Idempotent.
    async fn destroy(&mut self) -> Result<()>;
}
