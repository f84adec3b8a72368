//! The native backend: Linux namespaces, an overlay or host-bind root, seccomp, landlock and
//! cgroups, all made by `moat-jail`.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use moat_jail::cgroup::{Layout, Limits, SandboxCgroup};
use moat_jail::guardian::Guardian;
use moat_jail::idmap::IdRange;
use moat_jail::memfd::SealedBinary;
use moat_jail::rootfs::{FsLimits, Rootfs};
use moat_jail::runtime::RuntimeDir;
use moat_jail::spawn::{SandboxProcess, SpawnConfig, validate_id};
use moat_proto::agent_config::{AGENT_CONFIG_ENV, WritableLayer};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;

use crate::backend::{Backend, Capabilities, Instance, InstanceStats, RootfsSource, SandboxSpec};
use crate::error::{EngineError, Result};

/// Age after which an empty sandbox cgroup with no owner is removed at start-up.
const STALE_CGROUP_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Longest a pause waits for the kernel to report every process frozen (a process in an
/// uninterruptible sleep, such as a slow disk read, holds a freeze back until it wakes).
pub const FREEZE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Options of the native backend.
#[derive(Debug, Clone)]
pub struct NativeOptions {
    /// The host runtime directory.
    pub runtime_dir: std::path::PathBuf,
    /// Start a guardian process per sandbox that destroys it if this process dies, even by
    /// SIGKILL (what `moat run` wants; a server reaps at restart instead).
    pub guardian: bool,
    /// The `moat` binary to run as the agent; `None` means the running executable.
    pub agent_binary: Option<std::path::PathBuf>,
    /// Remount the cgroup v2 hierarchy with `favordynmods` where it lacks it, which makes moving
    /// a sandbox into its cgroups 10–20 times faster (see `Layout::favor_dynamic_changes`).
    pub tune_cgroups: bool,
}

impl Default for NativeOptions {
    fn default() -> Self {
        NativeOptions {
            runtime_dir: RuntimeDir::DEFAULT.into(),
            guardian: false,
            agent_binary: None,
            tune_cgroups: true,
        }
    }
}

/// The native backend.
#[derive(Debug)]
pub struct NativeBackend {
    runtime: RuntimeDir,
    layout: Layout,
    agent: SealedBinary,
    guardian: bool,
}

impl NativeBackend {
    /// Prepares the backend: runtime directory, cgroup layout, and a sealed copy of this binary
    /// as the agent. Needs root.
    pub fn new(opts: &NativeOptions) -> Result<NativeBackend> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(EngineError::Unsupported(
                "the native backend needs root (it maps uid ranges and makes cgroups); run moat as root".into(),
            ));
        }
        let runtime = RuntimeDir::open(&opts.runtime_dir)?;
        let mut layout = Layout::detect()?;
        // Whatever a killed predecessor could not clean up (its processes died with their pid
        // namespace; empty cgroups may remain).
        let swept = layout.sweep(STALE_CGROUP_AGE, |_| true);
        if swept > 0 {
            tracing::info!("removed {swept} stale sandbox cgroups");
        }
        if opts.tune_cgroups
            && let Err(e) = layout.favor_dynamic_changes()
        {
            tracing::warn!("cgroups stay slow to join: {e}");
        }
        let agent = match &opts.agent_binary {
            Some(path) => SealedBinary::of(path)?,
            None => SealedBinary::current_exe()?,
        };
        Ok(NativeBackend {
            runtime,
            layout,
            agent,
            guardian: opts.guardian,
        })
    }

    /// The cgroup layout in use.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn create_blocking(&self, spec: &SandboxSpec) -> Result<NativeInstance> {
        validate_id(&spec.id)?;
        spec.resources.validate()?;
        let r = &spec.resources;
        let limits = Limits {
            memory_bytes: r.memory_bytes,
            cpu_millis: r.cpu_millis,
            pids: r.pids,
        };
        let cgroup = SandboxCgroup::create(&self.layout, &spec.id, &limits)?;
        let ids = match IdRange::claim(&self.runtime.slots()) {
            Ok(ids) => ids,
            Err(e) => {
                let _ = cgroup.remove();
                return Err(e.into());
            }
        };
        let guardian = if self.guardian {
            match Guardian::spawn(cgroup.dirs(), &[ids.lock_fd()]) {
                Ok(g) => Some(g),
                Err(e) => {
                    let _ = cgroup.remove();
                    return Err(e.into());
                }
            }
        } else {
            None
        };
        let rootfs = match &spec.rootfs {
            RootfsSource::Host => Rootfs::Host,
            RootfsSource::Dir(d) => Rootfs::Dir(d.clone()),
        };
        // The agent finds the sandbox's writable layer on its fd 4 (see moat-jail's rootfs).
        let mut agent = spec.agent.clone();
        agent.writable_layer = Some(match &spec.rootfs {
            RootfsSource::Host => WritableLayer::Root,
            RootfsSource::Dir(_) => WritableLayer::OverlayUpper,
        });
        let config = serde_json::to_string(&agent)
            .map_err(|e| EngineError::Invalid(format!("agent config: {e}")))?;
        let fs_limits = FsLimits {
            disk_bytes: r.disk_bytes,
            inodes: (r.disk_bytes / 4096).clamp(4096, 4 << 20),
            shm_bytes: (r.memory_bytes / 2).min(r.disk_bytes),
        };
        let cfg = SpawnConfig {
            id: &spec.id,
            runtime: &self.runtime,
            rootfs: &rootfs,
            fs_limits,
            cgroup: &cgroup,
            ids: &ids,
            agent: &self.agent,
            agent_args: vec!["moat".into(), "agent".into()],
            agent_env: vec![format!("{AGENT_CONFIG_ENV}={config}")],
            hostname: "moat",
        };
        let process = match SandboxProcess::spawn(&cfg) {
            Ok(p) => p,
            Err(e) => {
                cgroup.kill_all();
                let _ = cgroup.remove();
                drop(guardian);
                return Err(e.into());
            }
        };
        Ok(NativeInstance {
            id: spec.id.clone(),
            inner: Arc::new(Mutex::new(Some(Live {
                process,
                cgroup,
                _ids: ids,
                guardian,
            }))),
            pidfd: None,
        })
    }
}

#[async_trait]
impl Backend for NativeBackend {
    fn name(&self) -> &'static str {
        "native"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            memory_checkpoint: false,
        }
    }

    async fn reap_orphan(&self, id: &str) -> Result<bool> {
        validate_id(id)?;
        let Some(cgroup) = SandboxCgroup::existing(&self.layout, id) else {
            return Ok(false);
        };
        tokio::task::spawn_blocking(move || {
            // Killing the agent, PID 1 of the sandbox's pid namespace, takes everything with it;
            // its mounts and namespaces go with the last process.
            cgroup.kill_all();
            if !cgroup.wait_empty(std::time::Duration::from_secs(5)) {
                return Err(EngineError::Agent(format!(
                    "processes of orphaned sandbox {} survived SIGKILL",
                    cgroup
                        .dirs()
                        .first()
                        .map(|d| d.display().to_string())
                        .unwrap_or_default()
                )));
            }
            cgroup.remove()?;
            Ok(true)
        })
        .await
        .map_err(|e| EngineError::Agent(format!("reap task: {e}")))?
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Instance>> {
        // Spawning blocks for a few milliseconds (clone, mounts, exec). On a multi-threaded
        // runtime, tell the scheduler so other tasks move off this worker meanwhile.
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let mut inst = if multi {
            tokio::task::block_in_place(|| self.create_blocking(spec))?
        } else {
            self.create_blocking(spec)?
        };
        let fd = {
            let guard = inst
                .inner
                .lock()
                .map_err(|_| EngineError::Agent("lock poisoned".into()))?;
            guard.as_ref().map(|l| l.process.pidfd())
        };
        if let Some(fd) = fd {
            // SAFETY: dup of an open pidfd; the copy is ours to own.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if dup < 0 {
                return Err(EngineError::io(
                    "dup sandbox pidfd",
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: fcntl returned a fresh fd nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(dup) };
            // SAFETY: the OwnedFd stays open for as long as the AsyncFd owns it.
            let watched = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
                .map_err(|e| EngineError::io("watch sandbox pidfd", e.into()))?;
            inst.pidfd = Some(watched);
        }
        Ok(Box::new(inst))
    }
}

struct Live {
    process: SandboxProcess,
    cgroup: SandboxCgroup,
    _ids: IdRange,
    guardian: Option<Guardian>,
}

/// A native sandbox.
pub struct NativeInstance {
    id: String,
    inner: Arc<Mutex<Option<Live>>>,
    /// A duplicate of the agent's pidfd, readable once the agent has exited.
    pidfd: Option<AsyncFd<OwnedFd>>,
}

impl std::fmt::Debug for NativeInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeInstance")
            .field("id", &self.id)
            .finish()
    }
}

impl NativeInstance {
    fn set_frozen(&self, frozen: bool) -> Result<()> {
        let guard = self
            .inner
            .lock()
            .map_err(|_| EngineError::Agent("lock poisoned".into()))?;
        let live = guard
            .as_ref()
            .ok_or_else(|| EngineError::NotFound(self.id.clone()))?;
        live.cgroup.set_frozen(frozen)?;
        Ok(())
    }

    fn is_frozen(&self) -> Result<bool> {
        let guard = self
            .inner
            .lock()
            .map_err(|_| EngineError::Agent("lock poisoned".into()))?;
        let live = guard
            .as_ref()
            .ok_or_else(|| EngineError::NotFound(self.id.clone()))?;
        Ok(live.cgroup.is_frozen())
    }
}

fn teardown(mut live: Live) -> Result<()> {
    live.process.kill();
    live.cgroup.kill_all();
    live.process
        .wait()
        .map_err(|e| EngineError::io("wait for sandbox init", e))?;
    let removed = live.cgroup.remove();
    if let Some(g) = live.guardian.take() {
        g.finish();
    }
    removed?;
    Ok(())
}

#[async_trait]
impl Instance for NativeInstance {
    fn id(&self) -> &str {
        &self.id
    }

    fn take_channel(&mut self) -> Option<UnixStream> {
        let mut guard = self.inner.lock().ok()?;
        let fd = guard.as_mut()?.process.take_channel()?;
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true).ok()?;
        UnixStream::from_std(std).ok()
    }

    fn stats(&self) -> InstanceStats {
        let Ok(guard) = self.inner.lock() else {
            return InstanceStats::default();
        };
        match guard.as_ref() {
            Some(l) => InstanceStats {
                memory_bytes: l.cgroup.memory_current(),
                oom_kills: l.cgroup.oom_kills(),
            },
            None => InstanceStats::default(),
        }
    }

    fn host_pid(&self) -> Option<i32> {
        let guard = self.inner.lock().ok()?;
        guard.as_ref().map(|l| l.process.pid())
    }

    async fn pause(&self) -> Result<()> {
        self.set_frozen(true)?;
        // The write starts the freeze; it is done once the kernel says so.
        let deadline = tokio::time::Instant::now() + FREEZE_TIMEOUT;
        let mut wait = std::time::Duration::from_millis(1);
        while !self.is_frozen()? {
            if tokio::time::Instant::now() >= deadline {
                let _ = self.set_frozen(false);
                return Err(EngineError::Agent(format!(
                    "the processes of sandbox {} did not freeze within {FREEZE_TIMEOUT:?}",
                    self.id
                )));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_millis(50));
        }
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.set_frozen(false)
    }

    async fn exited(&self) {
        match &self.pidfd {
            Some(fd) => {
                if let Ok(mut g) = fd.readable().await {
                    g.retain_ready();
                }
            }
            None => std::future::pending().await,
        }
    }

    async fn destroy(&mut self) -> Result<()> {
        self.pidfd.take();
        let live = self
            .inner
            .lock()
            .map_err(|_| EngineError::Agent("lock poisoned".into()))?
            .take();
        match live {
            Some(live) => tokio::task::spawn_blocking(move || teardown(live))
                .await
                .map_err(|e| EngineError::Agent(format!("teardown task: {e}")))?,
            None => Ok(()),
        }
    }
}

impl Drop for NativeInstance {
    fn drop(&mut self) {
        self.pidfd.take();
        if let Ok(mut guard) = self.inner.lock()
            && let Some(live) = guard.take()
        {
            let _ = teardown(live);
        }
    }
}
