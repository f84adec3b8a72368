//! The isolation backends behind one trait: each makes a sandbox, hands over a byte stream to its
//! agent, and can pause, resume and destroy it. Native (namespaces, `moat-backend-native`) today;
//! gVisor and microVMs fit the same shape: their channel need not be a Unix socket, and what they
//! can do beyond the basics (pause, memory checkpoints) they say in [`Capabilities`].

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

use crate::error::{EngineError, Result};
use crate::plan::SandboxPlan;

/// Any byte stream a backend can give as an agent channel (a vsock, a pipe pair, a test double).
pub trait ChannelStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ChannelStream for T {}

/// The bidirectional byte stream to a sandbox's agent, which the host speaks HTTP/2 on.
///
/// A Unix socket (the native backend's socketpair) is a variant of its own so the hot path of
/// every call stays a direct, vectored write on the socket with no boxing; other transports
/// (vsock, stdio of a runtime) come boxed.
pub enum AgentChannel {
    /// A Unix stream socket.
    Unix(UnixStream),
    /// Any other transport.
    Other(Box<dyn ChannelStream>),
}

impl std::fmt::Debug for AgentChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentChannel::Unix(s) => f.debug_tuple("Unix").field(s).finish(),
            AgentChannel::Other(_) => f.write_str("Other(..)"),
        }
    }
}

impl From<UnixStream> for AgentChannel {
    fn from(s: UnixStream) -> Self {
        AgentChannel::Unix(s)
    }
}

impl AsyncRead for AgentChannel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentChannel::Unix(s) => Pin::new(s).poll_read(cx, buf),
            AgentChannel::Other(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AgentChannel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AgentChannel::Unix(s) => Pin::new(s).poll_write(cx, buf),
            AgentChannel::Other(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AgentChannel::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            AgentChannel::Other(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            AgentChannel::Unix(s) => s.is_write_vectored(),
            AgentChannel::Other(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentChannel::Unix(s) => Pin::new(s).poll_flush(cx),
            AgentChannel::Other(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentChannel::Unix(s) => Pin::new(s).poll_shutdown(cx),
            AgentChannel::Other(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// What a backend can do beyond the basics (create, channel, destroy). The manager refuses a
/// request that needs something its sandbox's backend lacks, with a clear message, before it
/// asks the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Freeze and thaw all processes ([`Instance::pause`], [`Instance::resume`]).
    pub pause: bool,
    /// Save and restore memory ([`Instance::checkpoint`], [`Backend::restore`]).
    pub memory_checkpoint: bool,
    /// Leave sandboxes running past this process for a later one to adopt
    /// ([`Instance::keep`], [`Backend::adopt`]).
    pub keep: bool,
    /// Hand the agent the sandbox's writable layer, so its files alone can be snapshotted and
    /// restored (`/moat/layer`).
    pub files_snapshot: bool,
    /// Give the sandbox network access through the engine ([`Instance::open_egress`]).
    pub egress: bool,
}

impl Capabilities {
    /// Refuses, as [`EngineError::Unsupported`] naming `backend`, what needs a capability
    /// `has` says is missing; `what` is the action ("pause sandboxes").
    pub fn require(has: bool, backend: &str, what: &str) -> Result<()> {
        if has {
            Ok(())
        } else {
            Err(EngineError::Unsupported(format!(
                "the {backend} backend cannot {what}"
            )))
        }
    }
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
    /// Makes sandbox `id` (`[a-z0-9]{1,64}`) as `plan` says and starts its agent. The plan
    /// was checked when it was made; the backend turns it into what it makes (limits, root
    /// filesystem, the agent's config) and parses nothing again.
    async fn create(&self, id: &str, plan: &SandboxPlan) -> Result<Box<dyn Instance>>;
    /// Makes sandbox `id` of `plan` from the memory checkpoint an [`Instance::checkpoint`]
    /// wrote to `dir`, running from where it was frozen. Backends without
    /// [`Capabilities::memory_checkpoint`] refuse.
    async fn restore(&self, id: &str, plan: &SandboxPlan, dir: &Path) -> Result<Box<dyn Instance>> {
        let _ = (id, plan, dir);
        Err(EngineError::Unsupported(format!(
            "the {} backend cannot restore sandboxes from memory checkpoints",
            self.name()
        )))
    }
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
    fn take_channel(&mut self) -> Option<AgentChannel>;
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
    /// Writes the sandbox's memory and process state into the directory `dir` (which exists and
    /// is empty), for [`Backend::restore`]. Afterwards the sandbox is left paused, or, where
    /// saving ends its processes (gvisor), stopped: only a restore runs it again, and
    /// [`Instance::destroy`] releases what is left. Before it, the caller asks the agent to
    /// expect a new channel (`AgentClient::expect_reconnect`) and closes its own: the restored
    /// agent is reached through the restored instance's channel. Backends without
    /// [`Capabilities::memory_checkpoint`] refuse.
    async fn checkpoint(&self, dir: &Path) -> Result<()> {
        let _ = dir;
        Err(EngineError::Unsupported(format!(
            "sandbox {} cannot be checkpointed: its backend cannot save memory",
            self.id()
        )))
    }
    /// Why this sandbox's memory cannot be saved although its backend has
    /// [`Capabilities::memory_checkpoint`] (a gvisor sandbox with a network), if it cannot:
    /// its pause then freezes it in memory, and snapshots with memory and forks of it are
    /// refused with this reason.
    fn memory_refusal(&self) -> Option<String> {
        None
    }
    /// Makes the sandbox's network one where every connection and DNS query ends at the
    /// sockets returned (see `moat_jail::egress`), which the engine serves the sandbox's
    /// policy on. Called again (a server adopting a kept sandbox), it replaces what the first
    /// call made. Backends without [`Capabilities::egress`] refuse. Its blocking work runs off
    /// the async runtime's threads.
    async fn open_egress(&self) -> Result<crate::network::EgressSockets> {
        Err(EngineError::Unsupported(format!(
            "sandbox {} cannot have network access: its backend cannot give it",
            self.id()
        )))
    }
    /// Resolves when the sandbox's first process (the agent) has exited.
    async fn exited(&self);
    /// Lets the sandbox run on after this process exits, for a later one to
    /// [`Backend::adopt`]; afterwards this handle owns nothing. Fails for sandboxes the backend
    /// did not make keepable.
    fn keep(&mut self) -> Result<()> {
        Err(EngineError::Unsupported(format!(
            "sandbox {} cannot outlive this process",
            self.id()
        )))
    }
    /// Kills everything and releases every host resource. Idempotent.
    async fn destroy(&mut self) -> Result<()>;
}

/// Whether `kind` can name a backend: `[a-z0-9-]`, 1 to 32 characters.
pub fn is_valid_kind(kind: &str) -> bool {
    (1..=32).contains(&kind.len())
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The backends a server runs, keyed by kind ([`Backend::name`]), and the one a template that
/// names none gets.
#[derive(Clone)]
pub struct Backends {
    by_kind: std::collections::BTreeMap<String, std::sync::Arc<dyn Backend>>,
    /// Kinds this build has that cannot run on this host, with why and how to fix it.
    unavailable: std::collections::BTreeMap<String, String>,
    default: String,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("kinds", &self.by_kind.keys().collect::<Vec<_>>())
            .field("default", &self.default)
            .finish()
    }
}

impl Backends {
    /// A registry holding `default` alone, as the default.
    pub fn new(default: std::sync::Arc<dyn Backend>) -> Backends {
        let kind = default.name().to_owned();
        Backends {
            by_kind: std::iter::once((kind.clone(), default)).collect(),
            unavailable: std::collections::BTreeMap::new(),
            default: kind,
        }
    }

    /// Records that the backend of kind `kind` cannot run on this host and `why` (what is
    /// missing and how to get it): a template or run naming it is refused with that.
    pub fn unavailable(mut self, kind: &str, why: impl Into<String>) -> Backends {
        self.unavailable.insert(kind.to_owned(), why.into());
        self
    }

    /// Adds `backend` under its kind, replacing one of the same kind.
    pub fn with(mut self, backend: std::sync::Arc<dyn Backend>) -> Backends {
        self.by_kind.insert(backend.name().to_owned(), backend);
        self
    }

    /// Makes `kind`, which must be registered, the default.
    pub fn set_default(&mut self, kind: &str) -> Result<()> {
        self.get(kind)?;
        kind.clone_into(&mut self.default);
        Ok(())
    }

    /// The kind templates that name none get.
    pub fn default_kind(&self) -> &str {
        &self.default
    }

    /// The backend of kind `kind`; [`EngineError::Unsupported`] with the reason for a kind
    /// this host cannot run, [`EngineError::Invalid`] saying which kinds there are for others.
    pub fn get(&self, kind: &str) -> Result<&std::sync::Arc<dyn Backend>> {
        if let Some(why) = self.unavailable.get(kind) {
            return Err(EngineError::Unsupported(format!(
                "the {kind} backend is unavailable on this host: {why}"
            )));
        }
        self.by_kind.get(kind).ok_or_else(|| {
            let shown: String = kind.chars().take(64).collect();
            EngineError::Invalid(format!(
                "unknown backend {shown:?}; this server has {}",
                self.kinds().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// The backend a template naming `kind` (or none, for the default) gets.
    pub fn resolve(&self, kind: Option<&str>) -> Result<&std::sync::Arc<dyn Backend>> {
        self.get(kind.unwrap_or(&self.default))
    }

    /// The registered kinds, in order.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.by_kind.keys().map(String::as_str)
    }

    /// Every registered backend, in the order of their kinds.
    pub fn iter(&self) -> impl Iterator<Item = &std::sync::Arc<dyn Backend>> {
        self.by_kind.values()
    }
}

impl From<std::sync::Arc<dyn Backend>> for Backends {
    fn from(backend: std::sync::Arc<dyn Backend>) -> Backends {
        Backends::new(backend)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A backend that only has a name.
    struct Named(&'static str);

    #[async_trait]
    impl Backend for Named {
        fn name(&self) -> &'static str {
            self.0
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        async fn create(&self, _id: &str, _plan: &SandboxPlan) -> Result<Box<dyn Instance>> {
            Err(EngineError::Unsupported("nothing".into()))
        }
        async fn reap_orphan(&self, _id: &str) -> Result<bool> {
            Ok(false)
        }
    }

    #[test]
    fn the_registry_resolves_kinds_and_its_default() {
        let mut b = Backends::new(Arc::new(Named("native"))).with(Arc::new(Named("other")));
        assert_eq!(b.default_kind(), "native");
        assert_eq!(b.resolve(None).unwrap().name(), "native");
        assert_eq!(b.resolve(Some("other")).unwrap().name(), "other");
        assert_eq!(b.kinds().collect::<Vec<_>>(), ["native", "other"]);
        let err = b.resolve(Some("gvisor")).err().unwrap();
        assert!(matches!(&err, EngineError::Invalid(_)));
        assert_eq!(
            err.to_string(),
            "invalid request: unknown backend \"gvisor\"; this server has native, other"
        );
        b.set_default("other").unwrap();
        assert_eq!(b.resolve(None).unwrap().name(), "other");
        assert!(b.set_default("gvisor").is_err());
        assert_eq!(b.default_kind(), "other");
    }

    #[test]
    fn kinds_are_short_lowercase_names() {
        for good in ["native", "gvisor", "micro-vm", "a1"] {
            assert!(is_valid_kind(good), "{good}");
        }
        for bad in ["", "Native", "a b", "a/b", &"x".repeat(33)] {
            assert!(!is_valid_kind(bad), "{bad}");
        }
    }

    #[test]
    fn unsupported_capabilities_are_refused_by_name() {
        assert!(Capabilities::require(true, "native", "pause sandboxes").is_ok());
        let err = Capabilities::require(false, "refusing", "pause sandboxes").unwrap_err();
        assert_eq!(
            err.to_string(),
            "not supported: the refusing backend cannot pause sandboxes"
        );
    }
}
