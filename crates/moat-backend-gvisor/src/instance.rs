//! One gVisor sandbox: the `runsc run` process that holds it, its cgroups, bundle and state.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use moat_engine::backend::{AgentChannel, Instance, InstanceStats};
use moat_engine::error::{EngineError, Result};
use moat_jail::cgroup::SandboxCgroup;
use moat_jail::guardian::Guardian;
use moat_jail::idmap::IdRange;
use moat_jail::outer::OuterJail;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;

use crate::SandboxDir;
use crate::bundle::Bundle;
use crate::runsc::Runsc;

/// How long a destroy waits for the processes of a killed sandbox to leave its cgroups.
const EMPTY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long `runsc pause` and `runsc resume` may take.
const CONTROL_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long `runsc checkpoint` may take (it writes the sandbox's whole memory).
const CHECKPOINT_LIMIT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// How long a checkpoint waits for the agent to let go of its channel.
const RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether the agent shut its side of the channel (end-of-stream on `watch`) within
/// [`RELEASE_TIMEOUT`]; whatever else arrives meanwhile is the old connection's and dropped.
fn agent_released(watch: std::os::unix::net::UnixStream) -> bool {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + RELEASE_TIMEOUT;
    let mut watch = watch;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        // The socket is non-blocking (shared with the async side): wait for it to be readable.
        let mut pfd = libc::pollfd {
            fd: watch.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        match watch.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(_) => return false,
        }
    }
}

/// What a live gVisor sandbox holds on the host.
pub(crate) struct Live {
    /// The outer jail, whose first process is `runsc run`, which lives as long as the container.
    pub(crate) jail: OuterJail,
    /// The host ids of the outer jail, held as long as any of its processes may live.
    pub(crate) _ids: IdRange,
    pub(crate) cgroup: SandboxCgroup,
    /// `moat run`'s guardian of the sandbox, if it has one.
    pub(crate) guardian: Option<Guardian>,
    pub(crate) bundle: Bundle,
    /// The sandbox's directory (see [`SandboxDir`]).
    pub(crate) dir: PathBuf,
    /// Whether its sockets are the host kernel's, in the outer jail's network namespace
    /// (`--network=host`): a sandbox made with a network policy.
    pub(crate) host_network: bool,
}

/// A gVisor sandbox.
pub struct GvisorInstance {
    id: String,
    runsc: Runsc,
    channel: Option<UnixStream>,
    /// A second handle on the host end of the channel, kept when the channel is handed out:
    /// before a checkpoint it shows when the agent has let go of its connection.
    watch: Option<std::os::unix::net::UnixStream>,
    inner: Arc<Mutex<Option<Live>>>,
    /// A pidfd of `runsc run`, readable once it has exited (the container's init is gone).
    exit: Option<AsyncFd<OwnedFd>>,
}

impl std::fmt::Debug for GvisorInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GvisorInstance")
            .field("id", &self.id)
            .finish()
    }
}

impl GvisorInstance {
    pub(crate) fn new(
        id: String,
        runsc: Runsc,
        channel: UnixStream,
        live: Live,
    ) -> Result<GvisorInstance> {
        let pid = live.jail.pid();
        // SAFETY: pidfd_open with a pid of our own unreaped child and no flags.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let exit = if fd >= 0 {
            // SAFETY: pidfd_open returned a fresh fd nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            // SAFETY: the OwnedFd stays open for as long as the AsyncFd owns it.
            match unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) } {
                Ok(watched) => Some(watched),
                Err(e) => {
                    // Nothing will own the sandbox: release it here.
                    if let Err(t) = teardown(live) {
                        tracing::warn!(sandbox = %id, "tearing down: {t}");
                    }
                    return Err(EngineError::io("watch runsc", e.into()));
                }
            }
        } else {
            None
        };
        Ok(GvisorInstance {
            id,
            runsc,
            channel: Some(channel),
            watch: None,
            inner: Arc::new(Mutex::new(Some(live))),
            exit,
        })
    }

    fn with_live<T>(&self, f: impl FnOnce(&Live) -> Result<T>) -> Result<T> {
        let guard = self
            .inner
            .lock()
            .map_err(|_| EngineError::Agent("lock poisoned".into()))?;
        let live = guard
            .as_ref()
            .ok_or_else(|| EngineError::NotFound(self.id.clone()))?;
        f(live)
    }

    /// Runs `runsc ARGS… ID` against this sandbox's state, inside its outer jail, off the
    /// async threads, for at most `limit`; with `image`, that directory attached where runsc
    /// writes its checkpoint.
    async fn runsc_call(
        &self,
        args: &[String],
        image: Option<&std::path::Path>,
        limit: std::time::Duration,
    ) -> Result<()> {
        let cmd = self.with_live(|l| {
            let dir = SandboxDir::new(&l.dir);
            let mount = image.map(|i| (i.to_owned(), dir.image()));
            let mut argv = vec!["runsc".to_owned()];
            argv.extend(self.runsc.global_args(&dir.state(), l.host_network));
            argv.extend(args.iter().cloned());
            argv.push(self.id.clone());
            l.jail
                .command(
                    &argv,
                    mount.as_ref().map(|(i, at)| (i.as_path(), at.as_path())),
                )
                .map_err(crate::jail)
        })?;
        let what = format!("runsc {} {}", args.join(" "), self.id);
        let what2 = what.clone();
        tokio::task::spawn_blocking(move || run_bounded(cmd, limit, &what2))
            .await
            .map_err(|e| EngineError::Backend(format!("runsc task: {e}")))?
            .map_err(|e| EngineError::Backend(format!("{what}: {e}")))
    }
}

/// How much of a runsc command's error output is kept for its error message.
const STDERR_LIMIT: usize = 16 << 10;

/// How long a command's error output is read after it has ended (whatever still holds the
/// pipe open is not waited for).
const STDERR_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs `cmd` (whose standard output is `/dev/null`) for at most `limit`, killing it past that;
/// `Err` with the first [`STDERR_LIMIT`] bytes of its error output when it fails. Nothing here
/// waits beyond `limit` and [`STDERR_GRACE`] on what the command (in the jail) does.
fn run_bounded(
    mut cmd: std::process::Command,
    limit: std::time::Duration,
    what: &str,
) -> std::result::Result<(), String> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("start: {e}"))?;
    let mut err = child.stderr.take();
    if let Some(e) = &err {
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(e.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(e.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    let mut kept = Vec::new();
    let mut drain = |err: &mut Option<std::process::ChildStderr>| {
        let Some(e) = err else { return };
        let mut buf = [0u8; 4096];
        loop {
            match e.read(&mut buf) {
                Ok(0) => {
                    *err = None;
                    return;
                }
                Ok(n) => {
                    let room = STDERR_LIMIT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(_) => return,
            }
        }
    };
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        drain(&mut err);
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("did not finish within {} s", limit.as_secs()));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("wait: {e}"));
            }
        }
    };
    let grace = std::time::Instant::now() + STDERR_GRACE;
    while err.is_some() && std::time::Instant::now() < grace {
        drain(&mut err);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let status = status?;
    if status.success() {
        Ok(())
    } else {
        tracing::debug!("{what} failed: {status}");
        Err(String::from_utf8_lossy(&kept).trim().to_owned())
    }
}

/// Kills every process of the sandbox (runsc's own included) and removes what it held.
pub(crate) fn teardown(mut live: Live) -> Result<()> {
    live.cgroup.kill_all();
    live.jail.kill();
    let _ = live.jail.wait();
    if !live.cgroup.wait_empty(EMPTY_TIMEOUT) {
        // Its cgroups stay (they cannot go while a process is in them); its files go.
        live.bundle.remove();
        let _ = std::fs::remove_dir_all(&live.dir);
        return Err(EngineError::Backend(format!(
            "processes of gVisor sandbox in {} survived SIGKILL",
            live.cgroup
                .dirs()
                .first()
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        )));
    }
    let removed = live.cgroup.remove();
    if let Some(g) = live.guardian.take() {
        g.finish();
    }
    live.bundle.remove();
    if let Err(e) = std::fs::remove_dir_all(&live.dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", live.dir.display());
    }
    removed.map_err(crate::jail)
}

#[async_trait]
impl Instance for GvisorInstance {
    fn id(&self) -> &str {
        &self.id
    }

    fn take_channel(&mut self) -> Option<AgentChannel> {
        let channel = self.channel.take()?;
        let std_stream = channel.into_std().ok()?;
        self.watch = std_stream.try_clone().ok();
        let channel = UnixStream::from_std(std_stream).ok()?;
        Some(AgentChannel::Unix(channel))
    }

    fn stats(&self) -> InstanceStats {
        self.with_live(|l| {
            Ok(InstanceStats {
                memory_bytes: l.cgroup.memory_current(),
                oom_kills: l.cgroup.oom_kills(),
                memory_cache_bytes: l.cgroup.memory_cache(),
                cpu_usage_usec: l.cgroup.cpu_usage_usec(),
                // The writable layer is in the sandbox's memory (runsc's memory overlay).
                disk_used_bytes: 0,
                disk_total_bytes: 0,
            })
        })
        .unwrap_or_default()
    }

    fn oom_kills(&self) -> u64 {
        self.with_live(|l| Ok(l.cgroup.oom_kills())).unwrap_or(0)
    }

    fn host_pid(&self) -> Option<i32> {
        self.with_live(|l| Ok(l.jail.pid())).ok()
    }

    fn memory_refusal(&self) -> Option<String> {
        self.with_live(|l| Ok(l.host_network))
            .unwrap_or(false)
            .then(|| {
                "it has a network, which the host kernel's sockets carry, and runsc cannot \
                 checkpoint those (pause freezes it in memory instead)"
                    .to_owned()
            })
    }

    async fn open_egress(&self) -> Result<moat_engine::network::EgressSockets> {
        // The jail's first process (runsc) is in the namespace the sandbox's sockets are made
        // in; a copy of its pidfd goes to the blocking thread that enters it.
        let pidfd = self.with_live(|l| {
            if !l.host_network {
                return Err(EngineError::Unsupported(format!(
                    "sandbox {} was made without a network, and a gvisor sandbox's network is \
                     set when it starts; make a new sandbox with the policy",
                    self.id
                )));
            }
            // SAFETY: the jail's pidfd stays open while `l` is borrowed, which outlasts this.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(l.jail.pidfd()) };
            fd.try_clone_to_owned()
                .map_err(|e| EngineError::io("dup sandbox pidfd", e))
        })?;
        let opened = tokio::task::spawn_blocking(move || {
            use std::os::fd::AsFd;
            moat_jail::egress::open(pidfd.as_fd())
        })
        .await
        .map_err(|e| EngineError::Backend(format!("the network set-up task: {e}")))?;
        let s = opened.map_err(crate::jail)?;
        Ok(moat_engine::network::EgressSockets {
            connections: s.connections,
            dns_v4: s.dns_v4,
            dns_v6: s.dns_v6,
        })
    }

    async fn pause(&self) -> Result<()> {
        self.runsc_call(&["pause".into()], None, CONTROL_LIMIT)
            .await
    }

    async fn resume(&self) -> Result<()> {
        self.runsc_call(&["resume".into()], None, CONTROL_LIMIT)
            .await
    }

    /// `runsc checkpoint`: the sandbox's memory and processes into `dir`, after which its
    /// processes are gone (its container ends); only [`Backend::restore`] runs it again, and
    /// [`Instance::destroy`] releases what is left. The engine first asks the agent to expect
    /// a new channel and closes its own (`AgentClient::expect_reconnect`).
    ///
    /// [`Backend::restore`]: moat_engine::backend::Backend::restore
    async fn checkpoint(&self, dir: &std::path::Path) -> Result<()> {
        // The agent, told to expect a new channel, ends its connection once the host has
        // closed its own, and shuts its side: only then is nothing of the old connection in
        // what is saved.
        if let Some(watch) = self.watch.as_ref().and_then(|w| w.try_clone().ok()) {
            let released = tokio::task::spawn_blocking(move || agent_released(watch))
                .await
                .map_err(|e| EngineError::Backend(format!("channel task: {e}")))?;
            if !released {
                return Err(EngineError::Agent(format!(
                    "sandbox {}'s agent did not let go of its channel within {} s (was it told \
                     to expect a new one, and the host's connection closed?)",
                    self.id,
                    RELEASE_TIMEOUT.as_secs()
                )));
            }
        }
        // runsc, inside the jail, writes into `dir` attached at the sandbox's image directory.
        let at = self.with_live(|l| {
            let at = SandboxDir::new(&l.dir).image();
            std::fs::create_dir_all(&at)
                .map_err(|e| EngineError::io(format!("create {}", at.display()), e))?;
            Ok(at)
        })?;
        self.runsc_call(
            &[
                "checkpoint".into(),
                format!("--image-path={}", at.display()),
            ],
            Some(dir),
            CHECKPOINT_LIMIT,
        )
        .await
    }

    async fn exited(&self) {
        match &self.exit {
            Some(fd) => {
                let _ = fd.readable().await;
            }
            None => std::future::pending().await,
        }
    }

    async fn destroy(&mut self) -> Result<()> {
        let live = self
            .inner
            .lock()
            .map_err(|_| EngineError::Agent("lock poisoned".into()))?
            .take();
        self.channel.take();
        match live {
            Some(live) => tokio::task::spawn_blocking(move || teardown(live))
                .await
                .map_err(|e| EngineError::Backend(format!("teardown task: {e}")))?,
            None => Ok(()),
        }
    }
}

impl Drop for GvisorInstance {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.inner.lock()
            && let Some(live) = guard.take()
            && let Err(e) = teardown(live)
        {
            tracing::warn!(sandbox = %self.id, "tearing down: {e}");
        }
    }
}
