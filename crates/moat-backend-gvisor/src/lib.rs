//! The gVisor backend: each sandbox is a `runsc` container whose init is moat's agent, talking
//! to the host over a socket handed to it as standard input. gVisor's sentry, a kernel written
//! in Go that runs in user space, answers the sandbox's system calls: a second layer between
//! untrusted code and the host kernel. moat applies the sandbox's limits itself, with the same
//! cgroups as the native backend, around all of runsc's processes (`--ignore-cgroups`).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use moat_engine::backend::{Backend, Capabilities, Instance};
use moat_engine::error::{EngineError, Result};
use moat_engine::network::NetworkPolicy;
use moat_engine::plan::SandboxPlan;
use moat_jail::cgroup::{Layout, Limits, SandboxCgroup};
use moat_jail::guardian::Guardian;
use moat_jail::idmap::IdRange;
use moat_jail::outer::{Access, Bind, OuterConfig, OuterJail, Overlay};
use moat_jail::runtime::RuntimeDir;
use moat_proto::agent_config::AGENT_CONFIG_ENV;
use moat_proto::v1;

mod bundle;
mod instance;
pub mod runsc;

pub use instance::GvisorInstance;
use instance::Live;
pub use runsc::Runsc;

/// The engine's form of a jail error: its message.
fn jail(e: moat_jail::JailError) -> EngineError {
    EngineError::Backend(e.to_string())
}

/// Memory the sentry and gofer need beyond what the sandbox's processes use, added to its
/// memory limit (the sandbox's processes, and its writable layer, live in the sentry's memory).
pub const SENTRY_MEMORY_BYTES: u64 = 128 << 20;
/// Tasks runsc's own processes need beyond the sandbox's (the Go runtime's threads and, on the
/// ptrace platform, a host stub per application thread), added to its task limit.
pub const SENTRY_TASKS: u64 = 256;

/// Options of the gvisor backend.
#[derive(Debug, Clone)]
pub struct GvisorOptions {
    /// The host runtime directory (the native backend's; sandboxes' bundles and runsc's state
    /// live in its `gvisor/`).
    pub runtime_dir: PathBuf,
    /// The `runsc` binary; `None` finds it on `PATH`.
    pub runsc: Option<PathBuf>,
    /// The gVisor platform; `None` uses the best that works here.
    pub platform: Option<String>,
    /// The `moat` binary the sandbox runs as its agent; `None` means the running executable.
    pub agent_binary: Option<PathBuf>,
    /// Start a guardian process per sandbox that kills it and removes its cgroups if this
    /// process dies, even by SIGKILL (`moat run`); what it leaves in the runtime directory is
    /// swept by the next start of the backend.
    pub guardian: bool,
}

impl Default for GvisorOptions {
    fn default() -> Self {
        GvisorOptions {
            runtime_dir: RuntimeDir::DEFAULT.into(),
            runsc: None,
            platform: None,
            agent_binary: None,
            guardian: false,
        }
    }
}

/// The gvisor backend.
#[derive(Debug)]
pub struct GvisorBackend {
    runsc: Runsc,
    runtime: RuntimeDir,
    guardian: bool,
    layout: Layout,
    agent: PathBuf,
    /// `<runtime>/gvisor`: bundles and runsc state, one directory each per sandbox.
    dir: PathBuf,
}

impl GvisorBackend {
    /// Prepares the backend: finds runsc and its platform (see [`Runsc::find`]), the cgroup
    /// layout and the agent binary. Needs root. Refuses, saying what is missing and how to get
    /// it, on a host that cannot run it.
    pub fn new(opts: &GvisorOptions) -> Result<GvisorBackend> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(EngineError::Unsupported(
                "the gvisor backend needs root (it runs runsc and makes cgroups); run moat as root"
                    .into(),
            ));
        }
        let runtime = RuntimeDir::open(&opts.runtime_dir).map_err(jail)?;
        let dir = runtime.root().join("gvisor");
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::io(format!("create {}", dir.display()), e))?;
        let runsc = Runsc::find(opts.runsc.as_deref(), opts.platform.as_deref(), &dir)?;
        let layout = Layout::detect().map_err(jail)?;
        let agent = match &opts.agent_binary {
            Some(p) => p.clone(),
            None => std::fs::read_link("/proc/self/exe")
                .map_err(|e| EngineError::io("readlink /proc/self/exe", e))?,
        };
        sweep(&dir, &runtime.slots());
        Ok(GvisorBackend {
            runsc,
            runtime,
            guardian: opts.guardian,
            layout,
            agent,
            dir,
        })
    }

    /// runsc and the platform in use.
    pub fn runsc(&self) -> &Runsc {
        &self.runsc
    }

    /// Makes sandbox `id` of `plan`: a fresh container, or (`image`) one restored from the
    /// memory checkpoint in that directory.
    fn create_blocking(
        &self,
        id: &str,
        plan: &SandboxPlan,
        image: Option<&Path>,
    ) -> Result<GvisorInstance> {
        moat_jail::spawn::validate_id(id).map_err(jail)?;
        let r = &plan.resources;
        let limits = Limits {
            memory_bytes: r.memory_bytes.saturating_add(SENTRY_MEMORY_BYTES),
            cpu_millis: r.cpu_millis,
            pids: r.pids.saturating_add(SENTRY_TASKS),
        };
        let ids = IdRange::claim(&self.runtime.slots()).map_err(jail)?;
        let cgroup = SandboxCgroup::create(&self.layout, id, &limits).map_err(jail)?;
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
        let sandbox_dir = self.dir.join(id);
        let made = self.start(id, plan, &cgroup, &ids, &sandbox_dir, image);
        match made {
            Ok((jail, channel, bundle)) => GvisorInstance::new(
                id.to_owned(),
                self.runsc.clone(),
                channel,
                Live {
                    jail,
                    _ids: ids,
                    cgroup,
                    guardian,
                    bundle,
                    dir: sandbox_dir,
                    host_network: host_network(plan),
                },
            ),
            Err(e) => {
                cgroup.kill_all();
                let _ = cgroup.wait_empty(std::time::Duration::from_secs(5));
                let _ = cgroup.remove();
                let _ = std::fs::remove_dir_all(&sandbox_dir);
                Err(e)
            }
        }
    }

    /// Writes the bundle and starts `runsc run` (or `runsc restore` from the checkpoint in
    /// `image`) as the first process of the sandbox's outer jail, in its cgroups, its standard
    /// input the agent's end of the channel.
    fn start(
        &self,
        id: &str,
        plan: &SandboxPlan,
        cgroup: &SandboxCgroup,
        ids: &IdRange,
        sandbox_dir: &Path,
        image: Option<&Path>,
    ) -> Result<(OuterJail, tokio::net::UnixStream, bundle::Bundle)> {
        let io = |what: &str, p: &Path, e: std::io::Error| {
            EngineError::io(format!("{what} {}", p.display()), e)
        };
        let _ = std::fs::remove_dir_all(sandbox_dir);
        let layout = SandboxDir::new(sandbox_dir);
        for d in [sandbox_dir, &layout.run, &layout.root] {
            std::fs::create_dir(d).map_err(|e| io("create", d, e))?;
        }
        // Whose it is, for the sweeps of every moat process of the host (see [`sweep`]).
        let slot_file = sandbox_dir.join(SLOT_FILE);
        std::fs::write(&slot_file, ids.slot().to_string())
            .map_err(|e| io("write", &slot_file, e))?;
        // runsc writes its state and log as the jail's root.
        let owner = ids.host_base();
        std::os::unix::fs::lchown(&layout.run, Some(owner), Some(owner))
            .map_err(|e| io("chown", &layout.run, e))?;
        let mut agent = plan.agent_config();
        agent.channel_on_stdin = true;
        let config = serde_json::to_string(&agent)
            .map_err(|e| EngineError::Invalid(format!("agent config: {e}")))?;
        let bundle = bundle::Bundle::write(
            &layout.bundle(),
            plan,
            &self.agent,
            &[format!("{AGENT_CONFIG_ENV}={config}")],
            Path::new("/"),
            owner,
        )?;
        let mut binds = vec![
            Bind {
                path: self.runsc.path.clone(),
                access: Access::ReadOnly,
            },
            Bind {
                path: layout.run.clone(),
                access: Access::Writable,
            },
        ];
        binds.extend(bundle.host_paths().iter().map(|p| Bind {
            path: p.clone(),
            access: Access::ReadOnly,
        }));
        // A template directory is shown read-only and id-mapped; runsc's gofer adds mount
        // points to the root it is given, so that root is an overlay on it with a layer of the
        // sandbox's own.
        let overlay = match &plan.rootfs {
            v1::Rootfs::Dir(d) => {
                binds.push(Bind {
                    path: d.into(),
                    access: Access::IdMapped,
                });
                let o = Overlay {
                    lower: d.into(),
                    upper: layout.run.join("upper"),
                    work: layout.run.join("work"),
                    target: bundle.root().to_owned(),
                };
                for dir in [&o.upper, &o.work] {
                    std::fs::create_dir(dir).map_err(|e| io("create", dir, e))?;
                    std::os::unix::fs::lchown(dir, Some(owner), Some(owner))
                        .map_err(|e| io("chown", dir, e))?;
                }
                Some(o)
            }
            v1::Rootfs::Host => None,
            // The engine hands backends an image's unpacked tree as a directory.
            v1::Rootfs::Image(r) | v1::Rootfs::Build(r) => {
                return Err(EngineError::Invalid(format!(
                    "image {r} reached the backend without its tree"
                )));
            }
        };
        if let Some(dir) = image {
            binds.push(Bind {
                path: dir.to_owned(),
                access: Access::IdMapped,
            });
        }
        if let Some(dir) = runsc::debug_log_dir() {
            binds.push(Bind {
                path: dir,
                access: Access::Writable,
            });
        }
        let mut args = vec!["runsc".to_owned()];
        args.extend(self.runsc.global_args(&layout.state(), host_network(plan)));
        // runsc's own messages go to a file only runsc holds. The container's standard output
        // and error are runsc's, which the sandbox can reach through `/proc/1/fd` (the sentry
        // does not hide them as a kernel hides a non-dumpable process's): /dev/null, so no host
        // file is writable from inside.
        args.push(format!("--log={}", layout.log().display()));
        match image {
            None => args.push("run".into()),
            Some(dir) => {
                args.push("restore".into());
                args.push(format!("--image-path={}", dir.display()));
            }
        }
        args.push("--bundle".into());
        args.push(bundle.dir().display().to_string());
        args.push(id.to_owned());
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|e| EngineError::io("socketpair", e))?;
        let jail = OuterJail::spawn(&OuterConfig {
            id,
            cgroup,
            ids,
            root: &layout.root,
            binds: &binds,
            covers: bundle.covers(),
            masks: bundle.secrets(),
            overlay: overlay.as_ref(),
            program: &self.runsc.path,
            args: &args,
            env: &[format!("PATH={RUNSC_PATH}")],
            stdin: theirs.as_raw_fd(),
            hostname: "moat",
        })
        .map_err(jail)?;
        drop(theirs);
        ours.set_nonblocking(true)
            .map_err(|e| EngineError::io("channel", e))?;
        let channel =
            tokio::net::UnixStream::from_std(ours).map_err(|e| EngineError::io("channel", e))?;
        Ok((jail, channel, bundle))
    }
}

/// The file of a sandbox's directory naming its uid-range slot.
const SLOT_FILE: &str = "slot";

/// Removes what sandboxes of processes that died without cleaning up (a `moat run` killed by
/// SIGKILL; a sandbox the native backend's start found with no owner) left in `dir`, which
/// every moat process of the host shares: the directory of every sandbox whose uid-range
/// slot no process holds and no kept marker names (its owner, a server or a `moat run` and
/// its guardian, holds the slot's lock as long as the sandbox lives). The slot is held while
/// the directory goes, so no new sandbox takes it meanwhile. Returns how many it removed.
fn sweep(dir: &Path, slots: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if moat_jail::spawn::validate_id(&name).is_err() || !e.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        // A directory being made has no slot file for a moment: its maker holds the slot.
        let Some(slot) = std::fs::read_to_string(e.path().join(SLOT_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(Some(_held)) = IdRange::try_hold(slots, slot) else {
            continue;
        };
        if moat_jail::kept::is_marked(slots, slot) {
            continue;
        }
        match std::fs::remove_dir_all(e.path()) {
            Ok(()) => {
                removed += 1;
                tracing::info!(sandbox = %name, "removed what a dead sandbox left");
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!("removing {}: {err}", e.path().display()),
        }
    }
    removed
}

/// Whether a sandbox of `plan` gets a network: the host kernel's sockets in its outer jail's
/// namespace (`--network=host`), which the engine steers as it does a native sandbox's. Fixed
/// when it starts: runsc cannot change a running sandbox's network mode.
pub(crate) fn host_network(plan: &SandboxPlan) -> bool {
    matches!(plan.network, NetworkPolicy::Egress(_))
}

/// `PATH` of runsc's processes.
const RUNSC_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The directory of one gVisor sandbox on the host.
#[derive(Debug, Clone)]
pub(crate) struct SandboxDir {
    /// What the outer jail may write (owned by its root): the bundle, runsc's state and log,
    /// where checkpoints are attached.
    pub(crate) run: PathBuf,
    /// Where the outer jail's root is mounted, in its own mount namespace.
    pub(crate) root: PathBuf,
}

impl SandboxDir {
    pub(crate) fn new(dir: &Path) -> SandboxDir {
        SandboxDir {
            run: dir.join("run"),
            root: dir.join("root"),
        }
    }

    pub(crate) fn bundle(&self) -> PathBuf {
        self.run.join("bundle")
    }

    /// runsc's `--root`.
    pub(crate) fn state(&self) -> PathBuf {
        self.run.join("state")
    }

    pub(crate) fn log(&self) -> PathBuf {
        self.run.join("runsc.log")
    }

    /// Where a checkpoint's directory is attached in the jail while runsc writes it.
    pub(crate) fn image(&self) -> PathBuf {
        self.run.join("image")
    }
}

impl GvisorBackend {
    /// [`GvisorBackend::create_blocking`], off the async worker where the runtime has others.
    fn make(&self, id: &str, plan: &SandboxPlan, image: Option<&Path>) -> Result<GvisorInstance> {
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi {
            tokio::task::block_in_place(|| self.create_blocking(id, plan, image))
        } else {
            self.create_blocking(id, plan, image)
        }
    }
}

#[async_trait]
impl Backend for GvisorBackend {
    fn name(&self) -> &'static str {
        "gvisor"
    }

    fn sweep_stale(&self) -> usize {
        // Also after start: a sandbox whose cgroups another backend's sweep removed since.
        sweep(&self.dir, &self.runtime.slots())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            memory_checkpoint: true,
            keep: false,
            // Its writes live in the sentry's memory overlay, which the agent cannot hand out
            // apart from the rest: snapshots of it keep its memory.
            files_snapshot: false,
            // Only for sandboxes made with a network (`--network=host` in the outer jail's
            // namespace, steered as a native sandbox's is), whose memory cannot be saved.
            egress: true,
        }
    }

    async fn create(&self, id: &str, plan: &SandboxPlan) -> Result<Box<dyn Instance>> {
        Ok(Box::new(self.make(id, plan, None)?))
    }

    async fn restore(&self, id: &str, plan: &SandboxPlan, dir: &Path) -> Result<Box<dyn Instance>> {
        if host_network(plan) {
            return Err(EngineError::Invalid(
                "a gvisor sandbox restored from memory has no network: one with a network \
                 cannot be saved"
                    .into(),
            ));
        }
        if !dir.join("checkpoint.img").is_file() {
            return Err(EngineError::Invalid(format!(
                "{} holds no gVisor checkpoint",
                dir.display()
            )));
        }
        Ok(Box::new(self.make(id, plan, Some(dir))?))
    }

    async fn reap_orphan(&self, id: &str) -> Result<bool> {
        moat_jail::spawn::validate_id(id).map_err(jail)?;
        let dir = self.dir.join(id);
        let cgroup = SandboxCgroup::existing(&self.layout, id);
        let found = cgroup.is_some() || dir.exists();
        let dir2 = dir.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(cgroup) = cgroup {
                cgroup.kill_all();
                if !cgroup.wait_empty(std::time::Duration::from_secs(5)) {
                    return Err(EngineError::Backend(format!(
                        "processes of orphaned gVisor sandbox {} survived SIGKILL",
                        dir2.display()
                    )));
                }
                cgroup.remove().map_err(jail)?;
            }
            let _ = std::fs::remove_dir_all(&dir2);
            Ok(())
        })
        .await
        .map_err(|e| EngineError::Backend(format!("reap task: {e}")))??;
        Ok(found)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The sweep goes by who holds a sandbox's slot, not by cgroups: other moat processes of
    /// the host keep their cgroups elsewhere, and their sandboxes are alive.
    #[test]
    fn the_sweep_removes_only_sandboxes_no_process_owns() {
        let (dir, slots) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let held = IdRange::claim(slots.path()).unwrap();
        let free = {
            let other = IdRange::claim(slots.path()).unwrap();
            other.slot()
        };
        let sandbox = |name: &str, slot: Option<u32>| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(d.join("run")).unwrap();
            if let Some(slot) = slot {
                std::fs::write(d.join(SLOT_FILE), slot.to_string()).unwrap();
            }
            d
        };
        let alive = sandbox("alive", Some(held.slot()));
        let dead = sandbox("dead", Some(free));
        let making = sandbox("making", None);
        assert_eq!(sweep(dir.path(), slots.path()), 1);
        assert!(alive.exists() && making.exists() && !dead.exists());
        // Once its owner lets go, it goes too.
        drop(held);
        assert_eq!(sweep(dir.path(), slots.path()), 1);
        assert!(!alive.exists());
    }
}
