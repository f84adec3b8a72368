//! The native backend: Linux namespaces, an overlay or host-bind root, seccomp, landlock and
//! cgroups, all made by `moat-jail`. The engine knows it only through its `Backend` trait.

use std::os::fd::{AsRawFd, OwnedFd};

use async_trait::async_trait;
use moat_jail::cgroup::{Layout, Limits, SandboxCgroup};
use moat_jail::guardian::Guardian;
use moat_jail::idmap::IdRange;
use moat_jail::kept::{self, KeptMarker};
use moat_jail::memfd::SealedBinary;
use moat_jail::rootfs::{FsLimits, Rootfs};
use moat_jail::runtime::RuntimeDir;
use moat_jail::spawn::{SandboxProcess, SpawnConfig};
use moat_proto::agent_config::{AGENT_CONFIG_ENV, WritableLayer};

use moat_engine::backend::{Backend, Capabilities, Instance};
use moat_engine::error::{EngineError, Result};
use moat_engine::plan::SandboxPlan;
use moat_proto::v1;

mod instance;

pub use instance::NativeInstance;
use instance::{KeepFiles, Live};

/// The engine's form of a jail error: its message (the engine knows no backend's error types).
fn jail(e: moat_jail::JailError) -> EngineError {
    EngineError::Backend(e.to_string())
}

/// What the jail makes for `plan`: the cgroup's limits, the writable filesystems' sizes, the
/// root filesystem, and where the agent finds its writable layer. The one place a plan turns
/// into the jail's types; the plan's limits were checked when it was made.
fn jail_plan(plan: &SandboxPlan) -> Result<(Limits, FsLimits, Rootfs, WritableLayer)> {
    let r = &plan.resources;
    let limits = Limits {
        memory_bytes: r.memory_bytes,
        cpu_millis: r.cpu_millis,
        pids: r.pids,
    };
    let fs_limits = FsLimits {
        disk_bytes: r.disk_bytes,
        inodes: (r.disk_bytes / 4096).clamp(4096, 4 << 20),
        shm_bytes: (r.memory_bytes / 2).min(r.disk_bytes),
    };
    let (rootfs, layer) = match &plan.rootfs {
        v1::Rootfs::Host => (Rootfs::Host, WritableLayer::Root),
        v1::Rootfs::Dir(d) => (Rootfs::Dir(d.into()), WritableLayer::OverlayUpper),
        // The engine hands backends an image's unpacked tree as a directory.
        v1::Rootfs::Image(r) | v1::Rootfs::Build(r) => {
            return Err(EngineError::Invalid(format!(
                "image {r} reached the backend without its tree"
            )));
        }
    };
    Ok((limits, fs_limits, rootfs, layer))
}

/// Checks a sandbox or owner id (`[a-z0-9]{1,64}`) as the jail does.
fn validate_id(id: &str) -> Result<()> {
    moat_jail::spawn::validate_id(id).map_err(jail)
}

/// Age after which an empty sandbox cgroup with no owner is removed (at start-up and by
/// [`Backend::sweep_stale`]): a sandbox being made right now is younger.
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
    /// Make sandboxes that can outlive this process: each agent gets a listener in the runtime
    /// directory's `agents/` and its uid-range slot a marker (`moat_jail::kept`), so that
    /// [`Instance::keep`] can leave it running and a later process can [`Backend::adopt`] it.
    pub keepable: bool,
    /// Who owns the keepable sandboxes this backend makes (`[a-z0-9]{1,64}`; `moat serve`: an
    /// id of its data dir), written in their slot markers. [`Backend::kept`] lists only the
    /// markers of this owner, so a server never takes over or reaps the sandboxes another
    /// server on the same host kept.
    pub owner: Option<String>,
}

impl Default for NativeOptions {
    fn default() -> Self {
        NativeOptions {
            runtime_dir: RuntimeDir::DEFAULT.into(),
            guardian: false,
            agent_binary: None,
            tune_cgroups: true,
            keepable: false,
            owner: None,
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
    keepable: bool,
    owner: Option<String>,
}

impl NativeBackend {
    /// Whether this process could run the native backend, checked without touching anything,
    /// so a caller can refuse before it creates state of its own: the backend needs root.
    pub fn preflight() -> Result<()> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(EngineError::Unsupported(
                "the native backend needs root (it maps uid ranges and makes cgroups); run moat as root".into(),
            ));
        }
        Ok(())
    }

    /// Prepares the backend: runtime directory, cgroup layout, and a sealed copy of this binary
    /// as the agent. Needs root.
    pub fn new(opts: &NativeOptions) -> Result<NativeBackend> {
        NativeBackend::preflight()?;
        if let Some(owner) = &opts.owner {
            validate_id(owner)?;
        }
        let runtime = RuntimeDir::open(&opts.runtime_dir).map_err(jail)?;
        let mut layout = Layout::detect().map_err(jail)?;
        // Sandboxes no one owns any more: paused (frozen) when their owner was killed, they
        // could not end themselves.
        let orphans = moat_jail::orphans::reap(&layout, &runtime.slots());
        if !orphans.is_empty() {
            tracing::warn!(
                "killed {} sandboxes left with no owner: {}",
                orphans.len(),
                orphans.join(", ")
            );
        }
        // Whatever a killed predecessor could not clean up (its processes died with their pid
        // namespace; empty cgroups may remain).
        let swept = layout.sweep(STALE_CGROUP_AGE, |_| true);
        if swept > 0 {
            tracing::info!("removed {swept} stale sandbox cgroups");
        }
        // All sandboxes together stay below the host's task limit.
        layout
            .cap_total_pids(moat_jail::cgroup::sandbox_pids_budget().map_err(jail)?)
            .map_err(jail)?;
        if opts.tune_cgroups
            && let Err(e) = layout.favor_dynamic_changes()
        {
            tracing::warn!("cgroups stay slow to join: {e}");
        }
        let agent = match &opts.agent_binary {
            Some(path) => SealedBinary::of(path).map_err(jail)?,
            None => SealedBinary::current_exe().map_err(jail)?,
        };
        Ok(NativeBackend {
            runtime,
            layout,
            agent,
            guardian: opts.guardian,
            keepable: opts.keepable,
            owner: opts.owner.clone(),
        })
    }

    /// The cgroup layout in use.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn create_blocking(&self, id: &str, plan: &SandboxPlan) -> Result<NativeInstance> {
        validate_id(id)?;
        let (limits, fs_limits, rootfs, writable_layer) = jail_plan(plan)?;
        let cgroup = SandboxCgroup::create(&self.layout, id, &limits).map_err(jail)?;
        let ids = match IdRange::claim(&self.runtime.slots()) {
            Ok(ids) => ids,
            Err(e) => {
                let _ = cgroup.remove();
                return Err(jail(e));
            }
        };
        let guardian = if self.guardian {
            match Guardian::spawn(cgroup.dirs(), &[ids.lock_fd()]) {
                Ok(g) => Some(g),
                Err(e) => {
                    let _ = cgroup.remove();
                    return Err(jail(e));
                }
            }
        } else {
            None
        };
        let listener = if self.keepable {
            match bind_agent_listener(&self.runtime, id) {
                Ok(l) => Some(l),
                Err(e) => {
                    let _ = cgroup.remove();
                    return Err(e);
                }
            }
        } else {
            None
        };
        // The agent finds the sandbox's writable layer on its fd 4 (see moat-jail's rootfs).
        let mut agent = plan.agent_config();
        agent.writable_layer = Some(writable_layer);
        agent.listener = listener.is_some();
        // The jail hands the agent its user processes' cgroups from fd 6 on.
        agent.user_cgroups = cgroup.user_procs_files().len() as u32;
        let config = serde_json::to_string(&agent)
            .map_err(|e| EngineError::Invalid(format!("agent config: {e}")))?;
        let cfg = SpawnConfig {
            id,
            runtime: &self.runtime,
            rootfs: &rootfs,
            fs_limits,
            cgroup: &cgroup,
            ids: &ids,
            agent: &self.agent,
            agent_args: vec!["moat".into(), "agent".into()],
            agent_env: vec![format!("{AGENT_CONFIG_ENV}={config}")],
            hostname: "moat",
            listener: listener.as_ref().map(|l| l.as_raw_fd()),
        };
        let spawned = SandboxProcess::spawn(&cfg).map_err(jail);
        // The agent holds the listener now; our copy goes (its socket file stays).
        drop(listener);
        let marked = spawned.and_then(|process| {
            if self.keepable {
                let marker = KeptMarker {
                    slot: ids.slot(),
                    id: id.to_owned(),
                    pid: process.pid(),
                    owner: self.owner.clone(),
                };
                kept::write(&self.runtime.slots(), &marker).map_err(jail)?;
            }
            Ok(process)
        });
        let process = match marked {
            Ok(p) => p,
            Err(e) => {
                // Dropping a spawned process kills it.
                cgroup.kill_all();
                let _ = cgroup.remove();
                drop(guardian);
                if self.keepable {
                    let _ = kept::remove(&self.runtime.slots(), ids.slot());
                    let _ = std::fs::remove_file(agent_socket(&self.runtime, id));
                }
                return Err(e);
            }
        };
        let keep = self.keepable.then(|| KeepFiles {
            slots: self.runtime.slots(),
            socket: agent_socket(&self.runtime, id),
        });
        Ok(NativeInstance::new(
            id.to_owned(),
            Live {
                process,
                cgroup,
                ids,
                guardian,
                keep,
            },
        ))
    }

    /// Whether marker `m` is of a sandbox this backend may take over or reap: its owner's, or
    /// one written before markers named owners (whose id the caller found in its own records).
    fn may_touch(&self, m: &KeptMarker) -> bool {
        m.owner.is_none() || m.owner == self.owner
    }

    /// The markers of sandbox `id`, each with its slot locked, so that nothing else can claim
    /// or reap the slot meanwhile. Fails, touching nothing, when a marker is another owner's
    /// or its slot is locked by a live process (a server running that sandbox).
    fn lock_markers(&self, id: &str) -> Result<Vec<(KeptMarker, IdRange)>> {
        let slots = self.runtime.slots();
        let markers: Vec<KeptMarker> = kept::scan(&slots)
            .into_iter()
            .filter(|m| m.id == id)
            .collect();
        if let Some(m) = markers.iter().find(|m| !self.may_touch(m)) {
            return Err(EngineError::Unsupported(format!(
                "sandbox {id} was kept by another server (owner {})",
                m.owner.as_deref().unwrap_or("-")
            )));
        }
        let mut out = Vec::with_capacity(markers.len());
        for m in markers {
            let ids = IdRange::reclaim(&slots, m.slot).map_err(jail)?;
            out.push((m, ids));
        }
        Ok(out)
    }

    /// Takes over the kept sandbox `id` (see [`NativeOptions::keepable`]): relocks its slot,
    /// checks that the marker's pid is still its agent, and opens a new channel to it.
    fn adopt_blocking(&self, id: &str) -> Result<Option<NativeInstance>> {
        validate_id(id)?;
        let slots = self.runtime.slots();
        let Some((marker, ids)) = self.lock_markers(id)?.into_iter().next() else {
            return Ok(None);
        };
        let Some(cgroup) = SandboxCgroup::existing(&self.layout, id) else {
            return Ok(None);
        };
        let mut process = match SandboxProcess::adopt(marker.pid) {
            Ok(p) => p,
            // Gone: the caller reaps what is left.
            Err(_) => return Ok(None),
        };
        // The pidfd pins the process; if it is in the sandbox's cgroup now, it is the agent
        // (the only process the sandbox's pid 1 can be is the one that was spawned there).
        if !cgroup.pids().contains(&marker.pid) {
            process.release();
            return Ok(None);
        }
        let socket = agent_socket(&self.runtime, id);
        let stream = std::os::unix::net::UnixStream::connect(&socket)
            .map_err(|e| EngineError::io(format!("connect to {}", socket.display()), e))?;
        process.set_channel(OwnedFd::from(stream));
        Ok(Some(NativeInstance::new(
            id.to_owned(),
            Live {
                process,
                cgroup,
                ids,
                guardian: None,
                keep: Some(KeepFiles { slots, socket }),
            },
        )))
    }

    /// Removes the markers (whose slots the caller locked) and the socket of a kept sandbox
    /// `id` that is gone.
    fn forget_kept(&self, id: &str, locked: Vec<(KeptMarker, IdRange)>) {
        let slots = self.runtime.slots();
        for (m, _lock) in locked {
            if let Err(e) = kept::remove(&slots, m.slot) {
                tracing::warn!(sandbox = %id, "keeping the marker of slot {}: {e}", m.slot);
            }
        }
        let _ = std::fs::remove_file(agent_socket(&self.runtime, id));
    }
}

/// Where the listener of sandbox `id`'s agent lives.
fn agent_socket(runtime: &RuntimeDir, id: &str) -> std::path::PathBuf {
    runtime.agents().join(format!("{id}.sock"))
}

/// A fresh listening socket for the agent of sandbox `id` (any stale file replaced).
fn bind_agent_listener(runtime: &RuntimeDir, id: &str) -> Result<std::os::unix::net::UnixListener> {
    let path = agent_socket(runtime, id);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(EngineError::io(format!("remove {}", path.display()), e)),
    }
    // Created in the 0700 `agents/` directory, so only root on the host can connect.
    std::os::unix::net::UnixListener::bind(&path)
        .map_err(|e| EngineError::io(format!("listen on {}", path.display()), e))
}

#[async_trait]
impl Backend for NativeBackend {
    fn name(&self) -> &'static str {
        "native"
    }

    fn sweep_stale(&self) -> usize {
        // Empty and old: no sandbox lives in it (a paused or kept one still has processes),
        // whichever process made it.
        self.layout.sweep(STALE_CGROUP_AGE, |_| true)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            memory_checkpoint: false,
            keep: true,
            files_snapshot: true,
            egress: true,
        }
    }

    async fn reap_orphan(&self, id: &str) -> Result<bool> {
        validate_id(id)?;
        // A kept sandbox's slot stays locked from here to the end: one whose lock a live
        // process holds, or that another server kept, is left alone.
        let locked = self.lock_markers(id)?;
        let Some(cgroup) = SandboxCgroup::existing(&self.layout, id) else {
            self.forget_kept(id, locked);
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
            cgroup.remove().map_err(jail)?;
            Ok(true)
        })
        .await
        .map_err(|e| EngineError::Agent(format!("reap task: {e}")))??;
        self.forget_kept(id, locked);
        Ok(true)
    }

    async fn create(&self, id: &str, plan: &SandboxPlan) -> Result<Box<dyn Instance>> {
        // Spawning blocks for a few milliseconds (clone, mounts, exec). On a multi-threaded
        // runtime, tell the scheduler so other tasks move off this worker meanwhile.
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let mut inst = if multi {
            tokio::task::block_in_place(|| self.create_blocking(id, plan))?
        } else {
            self.create_blocking(id, plan)?
        };
        inst.watch_exit()?;
        Ok(Box::new(inst))
    }

    fn kept(&self) -> Vec<String> {
        // Only this owner's: markers of other servers (and unowned ones, which may be
        // anybody's) are theirs to take over or clean up.
        kept::scan(&self.runtime.slots())
            .into_iter()
            .filter(|m| m.owner == self.owner)
            .map(|m| m.id)
            .collect()
    }

    async fn adopt(&self, id: &str) -> Result<Option<Box<dyn Instance>>> {
        match self.adopt_blocking(id) {
            Ok(Some(mut inst)) => {
                inst.watch_exit()?;
                Ok(Some(Box::new(inst)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use moat_engine::resources::Resources;

    use super::*;

    #[test]
    fn the_plan_becomes_the_jails_types_once() {
        let plan = SandboxPlan {
            rootfs: v1::Rootfs::Dir("/images/py".into()),
            resources: Resources {
                memory_bytes: 256 << 20,
                cpu_millis: 500,
                pids: 64,
                disk_bytes: 64 << 20,
            },
            ..SandboxPlan::host("native")
        };
        let (limits, fs, rootfs, layer) = jail_plan(&plan).expect("plan");
        assert_eq!(
            (limits.memory_bytes, limits.cpu_millis, limits.pids),
            (256 << 20, 500, 64)
        );
        assert_eq!(fs.disk_bytes, 64 << 20);
        assert_eq!(fs.inodes, (64 << 20) / 4096);
        // Shared memory is half the memory, within the writable layer's size.
        assert_eq!(fs.shm_bytes, 64 << 20);
        assert_eq!(rootfs, Rootfs::Dir("/images/py".into()));
        assert_eq!(layer, WritableLayer::OverlayUpper);
        let (_, _, rootfs, layer) = jail_plan(&SandboxPlan::host("native")).expect("plan");
        assert_eq!(rootfs, Rootfs::Host);
        assert_eq!(layer, WritableLayer::Root);
    }
}
