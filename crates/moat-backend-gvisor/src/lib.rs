//! The gVisor backend: each sandbox is a `runsc` container whose init is moat's agent, talking
//! to the host over a socket handed to it as standard input. gVisor's sentry, a kernel written
//! in Go that runs in user space, answers the sandbox's system calls: a second layer between
//! untrusted code and the host kernel. moat applies the sandbox's limits itself, with the same
//! cgroups as the native backend, around all of runsc's processes (`--ignore-cgroups`).

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use moat_engine::backend::{Backend, Capabilities, Instance};
use moat_engine::error::{EngineError, Result};
use moat_engine::plan::SandboxPlan;
use moat_jail::cgroup::{Layout, Limits, SandboxCgroup};
use moat_jail::runtime::RuntimeDir;
use moat_proto::agent_config::AGENT_CONFIG_ENV;

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
}

impl Default for GvisorOptions {
    fn default() -> Self {
        GvisorOptions {
            runtime_dir: RuntimeDir::DEFAULT.into(),
            runsc: None,
            platform: None,
            agent_binary: None,
        }
    }
}

/// The gvisor backend.
#[derive(Debug)]
pub struct GvisorBackend {
    runsc: Runsc,
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
        Ok(GvisorBackend {
            runsc,
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
        let cgroup = SandboxCgroup::create(&self.layout, id, &limits).map_err(jail)?;
        let sandbox_dir = self.dir.join(id);
        let made = self.start(id, plan, &cgroup, &sandbox_dir, image);
        match made {
            Ok((child, channel, bundle)) => GvisorInstance::new(
                id.to_owned(),
                self.runsc.clone(),
                channel,
                Live {
                    runsc_run: child,
                    cgroup,
                    bundle,
                    dir: sandbox_dir,
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
    /// `image`) inside the sandbox's cgroups, its standard input the agent's end of the channel.
    fn start(
        &self,
        id: &str,
        plan: &SandboxPlan,
        cgroup: &SandboxCgroup,
        sandbox_dir: &Path,
        image: Option<&Path>,
    ) -> Result<(std::process::Child, tokio::net::UnixStream, bundle::Bundle)> {
        let _ = std::fs::remove_dir_all(sandbox_dir);
        std::fs::create_dir(sandbox_dir)
            .map_err(|e| EngineError::io(format!("create {}", sandbox_dir.display()), e))?;
        let mut agent = plan.agent_config();
        agent.channel_on_stdin = true;
        let config = serde_json::to_string(&agent)
            .map_err(|e| EngineError::Invalid(format!("agent config: {e}")))?;
        let bundle = bundle::Bundle::write(
            &sandbox_dir.join("bundle"),
            plan,
            &self.agent,
            &[format!("{AGENT_CONFIG_ENV}={config}")],
            Path::new("/"),
        )?;
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|e| EngineError::io("socketpair", e))?;
        // Opened here, written by the child between fork and exec: runsc and everything it
        // starts are in the sandbox's cgroups from their first instruction.
        let procs: Vec<std::fs::File> = cgroup
            .procs_files()
            .iter()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .map_err(|e| EngineError::io(format!("open {}", p.display()), e))
            })
            .collect::<Result<_>>()?;
        let fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = self.runsc.command(&sandbox_dir.join("state"));
        // runsc's own messages go to a file only runsc holds. The container's standard output
        // and error are runsc's, which the sandbox can reach through `/proc/1/fd` (the sentry
        // does not hide them as a kernel hides a non-dumpable process's): /dev/null, so no host
        // file is writable from inside.
        cmd.arg(format!("--log={}", sandbox_dir.join("runsc.log").display()));
        match image {
            None => cmd.arg("run"),
            Some(dir) => cmd
                .arg("restore")
                .arg(format!("--image-path={}", dir.display())),
        };
        cmd.arg("--bundle")
            .arg(bundle.dir())
            .arg(id)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the hook makes raw write calls on fds opened before fork, which is
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| EngineError::io(format!("start {}", self.runsc.path.display()), e))?;
        drop(procs);
        ours.set_nonblocking(true)
            .map_err(|e| EngineError::io("channel", e))?;
        let channel =
            tokio::net::UnixStream::from_std(ours).map_err(|e| EngineError::io("channel", e))?;
        Ok((child, channel, bundle))
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

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            memory_checkpoint: true,
            keep: false,
            // Its writes live in the sentry's memory overlay, which the agent cannot hand out
            // apart from the rest: snapshots of it keep its memory.
            files_snapshot: false,
        }
    }

    async fn create(&self, id: &str, plan: &SandboxPlan) -> Result<Box<dyn Instance>> {
        Ok(Box::new(self.make(id, plan, None)?))
    }

    async fn restore(&self, id: &str, plan: &SandboxPlan, dir: &Path) -> Result<Box<dyn Instance>> {
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
