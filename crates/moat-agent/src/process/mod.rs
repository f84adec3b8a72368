//! The `process.Process` service (`shared/reference/e2b-wire.md` §5): start processes with pipes
//! or a PTY, stream their output to any number of readers, feed their input, signal and resize
//! them.

pub(crate) mod fdio;
pub mod output;
pub mod pty;
pub mod registry;
pub mod spawn;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use moat_jail::confine::{ConfinePlan, Identity, Rlimits};
use moat_proto::process::process_event::{Event, StartEvent};
use moat_proto::process::*;
use tokio::io::Interest;
use tokio::time::Instant;

use self::fdio::FdIo;
use self::output::Channel;
use self::registry::{Proc, Registry, Subscription};
use self::spawn::{SpawnSpec, Stdio3};
use crate::reaper::Reaper;
use crate::rpc::{Code, RpcError};
use crate::state::AgentState;
use crate::users::User;

/// The events of one `Start` or `Connect` stream: `start` first, then data, then one `end`.
pub type EventStream = BoxStream<'static, Result<ProcessEvent, RpcError>>;

/// Largest signal number `SendSignal` accepts (`SIGRTMAX` on Linux).
const MAX_SIGNAL: i32 = 64;

type PlanKey = (u32, u32, Vec<u32>);

/// What [`ProcessService::spawn_confined`] starts.
struct Launch<'a> {
    cmd: &'a str,
    args: &'a [String],
    cwd: Option<&'a str>,
    envs: &'a HashMap<String, String>,
    stdio: Stdio3,
    inherit: Vec<OwnedFd>,
}

/// A process started with [`ProcessService::spawn_service`].
#[derive(Debug)]
pub struct ServiceProcess {
    /// Process id (also its process group and session id).
    pub pid: u32,
    /// Read end of its stdout pipe.
    pub stdout: OwnedFd,
    /// Read end of its stderr pipe.
    pub stderr: OwnedFd,
    /// Receives its wait status once the reaper collected it.
    pub exit: tokio::sync::oneshot::Receiver<i32>,
}

/// The process service.
#[derive(Debug)]
pub struct ProcessService {
    state: Arc<AgentState>,
    registry: Arc<Registry>,
    reaper: Arc<Reaper>,
    landlock_root: Option<PathBuf>,
    plans: Mutex<HashMap<PlanKey, Arc<ConfinePlan>>>,
}

impl ProcessService {
    /// The service over `state`, collecting exits through `reaper`. `landlock_root` is the tree
    /// the landlock ruleset of user processes describes (the sandbox's `/`); `None` skips landlock.
    pub fn new(
        state: Arc<AgentState>,
        reaper: Arc<Reaper>,
        landlock_root: Option<PathBuf>,
    ) -> Self {
        ProcessService {
            state,
            registry: Arc::new(Registry::default()),
            reaper,
            landlock_root,
            plans: Mutex::new(HashMap::new()),
        }
    }

    /// The confinement plan of `user`, prepared on first use and cached.
    fn plan_for(&self, user: &User) -> Result<Arc<ConfinePlan>, RpcError> {
        let key = (user.uid, user.gid, user.groups.clone());
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(plan) = plans.get(&key) {
            return Ok(plan.clone());
        }
        let limits = &self.state.config.limits;
        let plan = ConfinePlan::prepare(
            Identity {
                uid: user.uid,
                gid: user.gid,
                groups: user.groups.clone(),
            },
            Rlimits {
                nofile: limits.nofile,
                fsize: limits.fsize,
                nproc: limits.nproc,
            },
            self.landlock_root.as_deref(),
        )
        .map_err(|e| {
            RpcError::new(
                Code::Internal,
                format!("preparing confinement for {}: {e}", user.name),
            )
        })?;
        let plan = Arc::new(plan);
        plans.insert(key, plan.clone());
        Ok(plan)
    }

    /// `Start`: runs the process as `user`. With a `deadline`, the whole process group is killed
    /// when it passes (the transport ends the stream with `deadline_exceeded`).
    pub fn start(
        &self,
        user: &User,
        req: StartRequest,
        deadline: Option<Instant>,
    ) -> Result<EventStream, RpcError> {
        let config = req
            .process
            .ok_or_else(|| RpcError::new(Code::InvalidArgument, "process is required"))?;
        if config.cmd.is_empty() {
            return Err(RpcError::new(
                Code::InvalidArgument,
                "process.cmd must not be empty",
            ));
        }
        let (pty_master, stdio) = match &req.pty {
            Some(p) => {
                let size = p.size.unwrap_or_default();
                let pair = pty::open(size.cols, size.rows)
                    .map_err(|e| RpcError::new(Code::Internal, format!("opening a PTY: {e}")))?;
                (Some(pair.master), Stdio3::Pty(pair.slave))
            }
            None => (
                None,
                Stdio3::Pipes {
                    stdin: req.stdin.unwrap_or(true),
                },
            ),
        };
        let launch = Launch {
            cmd: &config.cmd,
            args: &config.args,
            cwd: config.cwd.as_deref(),
            envs: &config.envs,
            stdio,
            inherit: Vec::new(),
        };
        let (spawned, exit_rx) = self.spawn_confined(user, launch)?;
        let internal =
            |what: &str, e: std::io::Error| RpcError::new(Code::Internal, format!("{what}: {e}"));

        let pid = spawned.pid;
        let wrap = |fd, interest| FdIo::new(fd, interest).map(Arc::new);
        // Past this point the process runs; failures only lose its I/O, never leak it: it is
        // registered with the reaper and killed below if its I/O cannot be set up.
        let setup = (|| -> std::io::Result<_> {
            let mut outputs = Vec::new();
            let mut stdin = None;
            let mut pty_io = None;
            if let Some(master) = pty_master {
                let io = wrap(master, Interest::READABLE | Interest::WRITABLE)?;
                outputs.push((Channel::Pty, io.clone()));
                pty_io = Some(io);
            }
            if let Some(fd) = spawned.stdout {
                outputs.push((Channel::Stdout, wrap(fd, Interest::READABLE)?));
            }
            if let Some(fd) = spawned.stderr {
                outputs.push((Channel::Stderr, wrap(fd, Interest::READABLE)?));
            }
            if let Some(fd) = spawned.stdin {
                stdin = Some(wrap(fd, Interest::WRITABLE)?);
            }
            Ok((outputs, stdin, pty_io))
        })();
        let (outputs, stdin, pty_io) = match setup {
            Ok(v) => v,
            Err(e) => {
                kill_group(pid, libc::SIGKILL);
                return Err(internal("setting up process I/O", e));
            }
        };

        let (proc, rx) = Proc::new(pid, config, req.tag, stdin, pty_io);
        self.registry.insert(proc.clone());
        tokio::spawn(output::pump(
            proc.clone(),
            outputs,
            exit_rx,
            self.registry.clone(),
        ));
        if let Some(deadline) = deadline {
            let proc = proc.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {
                        if proc.is_running() {
                            kill_group(proc.pid, libc::SIGKILL);
                        }
                    }
                    _ = proc.wait_exited() => {}
                }
            });
        }
        Ok(events(pid, Subscription::Live(rx)))
    }

    /// Forks and executes a user process as `user`: working directory, environment and
    /// confinement (identity, rlimits, landlock, seccomp) are those of every command. The exit
    /// status arrives on the returned receiver.
    fn spawn_confined(
        &self,
        user: &User,
        launch: Launch<'_>,
    ) -> Result<(spawn::Spawned, tokio::sync::oneshot::Receiver<i32>), RpcError> {
        let workdir = self.state.workdir_for(user);
        let cwd = spawn::open_cwd(user, &workdir, launch.cwd)?;
        let env = spawn::build_env(user, &self.state.config.env_vars, launch.envs)?;
        let plan = self.plan_for(user)?;
        let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
        let mut waiters = self.reaper.lock();
        let spawned = spawn::spawn(SpawnSpec {
            cmd: launch.cmd,
            args: launch.args,
            env,
            cwd: &cwd,
            plan,
            stdio: launch.stdio,
            inherit: &launch.inherit,
        })
        .map_err(|e| spawn_error(launch.cmd, &e))?;
        waiters.insert(spawned.pid as i32, exit_tx);
        Ok((spawned, exit_rx))
    }

    /// Starts a process for one of the agent's own services (the code interpreter's language
    /// drivers): confined exactly like a command of `user`, with stdin on `/dev/null`, its
    /// stdout and stderr pipes handed to the caller rather than to the registry (it is not listed
    /// by `List`), and `inherit` kept open in it under their own numbers (all at least 3).
    pub fn spawn_service(
        &self,
        user: &User,
        cmd: &str,
        args: &[String],
        cwd: Option<&str>,
        inherit: Vec<OwnedFd>,
    ) -> Result<ServiceProcess, RpcError> {
        let launch = Launch {
            cmd,
            args,
            cwd,
            envs: &HashMap::new(),
            stdio: Stdio3::Pipes { stdin: false },
            inherit,
        };
        let (spawned, exit) = self.spawn_confined(user, launch)?;
        let pid = spawned.pid;
        match (spawned.stdout, spawned.stderr) {
            (Some(stdout), Some(stderr)) => Ok(ServiceProcess {
                pid,
                stdout,
                stderr,
                exit,
            }),
            _ => {
                kill_group(pid, libc::SIGKILL);
                Err(RpcError::new(
                    Code::Internal,
                    format!("starting '{cmd}': its output pipes are missing"),
                ))
            }
        }
    }

    /// `Connect`: events of a running process from now on, or `start` and `end` of one that
    /// exited recently.
    pub fn connect(&self, req: ConnectRequest) -> Result<EventStream, RpcError> {
        let proc = self.registry.find(req.process.as_ref())?;
        Ok(events(proc.pid, proc.subscribe()))
    }

    /// `List`: running processes.
    pub fn list(&self) -> ListResponse {
        ListResponse {
            processes: self
                .registry
                .live()
                .into_iter()
                .map(|p| ProcessInfo {
                    config: Some(p.config.clone()),
                    pid: p.pid,
                    tag: p.tag.clone(),
                })
                .collect(),
        }
    }

    /// `SendInput`.
    pub async fn send_input(&self, req: SendInputRequest) -> Result<SendInputResponse, RpcError> {
        let proc = self.registry.find_live(req.process.as_ref())?;
        write_input(&proc, req.input).await?;
        Ok(SendInputResponse {})
    }

    /// `StreamInput`: a `start` naming the process, then `data` messages (keepalives ignored).
    pub async fn stream_input<S>(&self, mut messages: S) -> Result<StreamInputResponse, RpcError>
    where
        S: Stream<Item = Result<StreamInputRequest, RpcError>> + Unpin,
    {
        use stream_input_request::Event as In;
        let mut target: Option<Arc<Proc>> = None;
        while let Some(msg) = messages.next().await {
            match msg?.event {
                Some(In::Start(start)) => {
                    target = Some(self.registry.find_live(start.process.as_ref())?);
                }
                Some(In::Data(data)) => {
                    let proc = target.as_ref().ok_or_else(|| {
                        RpcError::new(
                            Code::InvalidArgument,
                            "StreamInput: data before the start message",
                        )
                    })?;
                    write_input(proc, data.input).await?;
                }
                Some(In::Keepalive(_)) | None => {}
            }
        }
        Ok(StreamInputResponse {})
    }

    /// `CloseStdin`: closes the stdin pipe (processes without a PTY).
    pub fn close_stdin(&self, req: CloseStdinRequest) -> Result<CloseStdinResponse, RpcError> {
        let proc = self.registry.find_live(req.process.as_ref())?;
        if proc.pty.is_some() {
            return Err(RpcError::new(
                Code::InvalidArgument,
                "process has a PTY: send Ctrl-D (0x04) instead of closing stdin",
            ));
        }
        let taken = proc.stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
        match taken {
            Some(_) => Ok(CloseStdinResponse {}),
            None => Err(RpcError::new(
                Code::Internal,
                format!("process {} has no open stdin", proc.pid),
            )),
        }
    }

    /// `SendSignal`: SIGTERM and SIGKILL, and as an extension any signal number 1 to 64, to the
    /// process's whole group.
    pub fn send_signal(&self, req: SendSignalRequest) -> Result<SendSignalResponse, RpcError> {
        let sig = req.signal;
        if sig == Signal::Unspecified as i32 {
            return Err(RpcError::new(Code::Unimplemented, "signal is unspecified"));
        }
        if !(1..=MAX_SIGNAL).contains(&sig) {
            return Err(RpcError::new(
                Code::InvalidArgument,
                format!("invalid signal number {sig}"),
            ));
        }
        let proc = self.registry.find_live(req.process.as_ref())?;
        kill_group(proc.pid, sig);
        Ok(SendSignalResponse {})
    }

    /// `Update`: resizes the PTY.
    pub fn update(&self, req: UpdateRequest) -> Result<UpdateResponse, RpcError> {
        let proc = self.registry.find_live(req.process.as_ref())?;
        if let Some(p) = req.pty {
            let master = proc.pty.as_ref().ok_or_else(|| {
                RpcError::new(
                    Code::InvalidArgument,
                    format!("process {} has no PTY", proc.pid),
                )
            })?;
            let size = p.size.unwrap_or_default();
            master
                .with_fd(|fd| pty::set_size(fd, size.cols, size.rows))
                .map_err(|e| RpcError::new(Code::Internal, format!("resizing the PTY: {e}")))?;
        }
        Ok(UpdateResponse {})
    }
}

fn events(pid: u32, sub: Subscription) -> EventStream {
    let start = ProcessEvent {
        event: Some(Event::Start(StartEvent { pid })),
    };
    match sub {
        Subscription::Live(rx) => {
            let rest = stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|ev| (Ok(ev), rx))
            });
            stream::once(async move { Ok(start) }).chain(rest).boxed()
        }
        Subscription::Exited(end) => stream::iter([
            Ok(start),
            Ok(ProcessEvent {
                event: Some(Event::End(end)),
            }),
        ])
        .boxed(),
    }
}

async fn write_input(proc: &Proc, input: Option<ProcessInput>) -> Result<(), RpcError> {
    use process_input::Input;
    let (data, to_pty) = match input.and_then(|i| i.input) {
        Some(Input::Stdin(d)) => (d, false),
        Some(Input::Pty(d)) => (d, true),
        None => {
            return Err(RpcError::new(
                Code::Unimplemented,
                "input must be stdin or pty",
            ));
        }
    };
    // A PTY process reads its input from the PTY whichever variant carried it.
    let sink = match &proc.pty {
        Some(master) => Some(master.clone()),
        None if to_pty => {
            return Err(RpcError::new(
                Code::Internal,
                format!("process {} has no PTY", proc.pid),
            ));
        }
        None => proc.stdin.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    };
    let sink = sink.ok_or_else(|| {
        RpcError::new(
            Code::Internal,
            format!(
                "process {} has no stdin (started without it, or closed)",
                proc.pid
            ),
        )
    })?;
    sink.write_all(&data).await.map_err(|e| {
        RpcError::new(
            Code::Internal,
            format!("writing input to process {}: {e}", proc.pid),
        )
    })
}

/// Sends `sig` to the process group `pid` leads, or to the process alone if the group is gone.
pub(crate) fn kill_group(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill with integer arguments; a negative pid addresses the process group.
    if unsafe { libc::kill(-pid, sig) } != 0 {
        // SAFETY: as above.
        unsafe { libc::kill(pid, sig) };
    }
}

fn spawn_error(cmd: &str, e: &std::io::Error) -> RpcError {
    let code = match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => Code::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) => Code::PermissionDenied,
        // argv and environment past ARG_MAX (or one string past MAX_ARG_STRLEN): the caller's
        // request is too big, not an agent failure.
        Some(libc::E2BIG) => Code::InvalidArgument,
        // A program name too long, or a chain of links that never ends.
        Some(libc::ENAMETOOLONG) | Some(libc::ELOOP) => Code::InvalidArgument,
        Some(libc::EAGAIN) | Some(libc::ENOMEM) | Some(libc::EMFILE) | Some(libc::ENFILE) => {
            Code::ResourceExhausted
        }
        _ if e.kind() == std::io::ErrorKind::InvalidInput => Code::InvalidArgument,
        _ => Code::Internal,
    };
    RpcError::new(code, format!("starting process '{cmd}': {e}"))
}
