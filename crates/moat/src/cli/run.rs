//! `moat run`: start a sandbox, run one command in it attached to this terminal, exit with the
//! command's exit code, destroy the sandbox.
//!
//! Exit codes: the command's own; 128+N when a signal N killed it; 124 after `--timeout`; 137 with
//! a reason after an OOM kill; 127 when the command does not exist; 125 when moat itself failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use moat_backend_gvisor::{GvisorBackend, GvisorOptions};
use moat_backend_native::{NativeBackend, NativeOptions};
use moat_engine::agent_client::{AgentClient, AgentError, CallOptions};
use moat_engine::auth::Caller;
use moat_engine::backend::Backend;
use moat_engine::manager::{ManagerOptions, SandboxManager};
use moat_engine::resources::{Resources, fmt_bytes, parse_cpus, parse_duration, parse_size};
use moat_engine::store::{Store, check_sandbox_id};
use moat_proto::connect::Code;
use moat_proto::process::process_selector::Selector;
use moat_proto::process::{ProcessConfig, ProcessEvent, Pty, StartRequest, process_event, pty};
use moat_proto::units::format_size;
use moat_proto::v1;
use tokio::io::AsyncReadExt;

use super::remote::{Signals, write_out};
use tokio::signal::unix::{SignalKind, signal};

use super::signal::signal_number;
use super::terminal::{self, RawMode};

/// Exit code when moat itself fails (as `docker run` and `podman run` use).
const EXIT_MOAT_FAILED: u8 = 125;
/// Exit code after `--timeout`, as `timeout(1)` uses.
const EXIT_TIMEOUT: u8 = 124;
/// Exit code when the command is not found.
const EXIT_NOT_FOUND: u8 = 127;

/// Arguments of `moat run`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit status: the command's; 128+N after signal N; 124 after --timeout; \
137 after an OOM kill; 127 if the command is not found; 125 if moat failed."
)]
pub struct RunArgs {
    /// Memory limit (RAM, no swap), e.g. 512M, 2G.
    #[arg(long, default_value = "512M")]
    pub(crate) memory: String,
    /// CPU limit, e.g. 1, 0.5, 2.
    #[arg(long, default_value = "1")]
    pub(crate) cpus: String,
    /// Maximum number of processes and threads.
    #[arg(long, default_value_t = 256)]
    pub(crate) pids: u64,
    /// Size of the writable layer (/, /tmp, /home); it is held in memory.
    #[arg(long, default_value = "1G")]
    pub(crate) disk: String,
    /// Kill the command after this long, e.g. 30s, 500ms, 5m (exit status 124).
    #[arg(long)]
    pub(crate) timeout: Option<String>,
    /// Set an environment variable in the sandbox (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    pub(crate) env: Vec<String>,
    /// Working directory inside the sandbox (default: the user's home).
    #[arg(long, short = 'w', value_name = "DIR")]
    pub(crate) workdir: Option<String>,
    /// Copy a local file into the sandbox before running (repeatable).
    #[arg(long = "copy", value_name = "LOCAL:REMOTE")]
    pub(crate) copy: Vec<String>,
    /// Run as root inside the sandbox (still an unprivileged user on the host).
    #[arg(long)]
    pub(crate) root: bool,
    /// Start an interactive shell.
    #[arg(long, conflicts_with = "command")]
    pub(crate) shell: bool,
    /// Use this directory as the root filesystem (read-only, with a writable layer on top)
    /// instead of the host's system directories.
    #[arg(long, value_name = "DIR")]
    pub(crate) rootfs: Option<PathBuf>,
    /// Through a server (MOAT_URL): the template of the sandbox [default: host]. A local run
    /// takes its root from --rootfs instead.
    #[arg(long, short = 't', value_name = "NAME", conflicts_with = "rootfs")]
    pub(crate) template: Option<String>,
    /// The isolation backend: native (namespaces on the host kernel) or gvisor (gVisor's
    /// sentry between the command and the host kernel).
    #[arg(long, default_value = "native", value_parser = ["native", "gvisor"])]
    pub(crate) backend: String,
    #[command(flatten)]
    pub(crate) network: super::network_args::NetworkArgs,
    /// Sandbox id (default: random); for tests that must find the sandbox's host resources.
    #[arg(long, hide = true)]
    pub(crate) id: Option<String>,
    /// The command and its arguments.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub(crate) command: Vec<String>,
}

/// What the user asked for, validated.
struct Plan {
    /// The sandbox id `--id` asks for; the engine picks one otherwise.
    id: Option<String>,
    resources: Resources,
    timeout: Option<Duration>,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    copies: Vec<(PathBuf, String)>,
    user: &'static str,
    cmd: String,
    args: Vec<String>,
    rootfs: v1::Rootfs,
    tty: bool,
    backend: String,
    network: Option<v1::Network>,
}

fn plan(a: RunArgs) -> Result<Plan> {
    let resources = Resources {
        memory_bytes: parse_size(&a.memory).context("--memory")?,
        cpu_millis: parse_cpus(&a.cpus).context("--cpus")?,
        pids: a.pids,
        disk_bytes: parse_size(&a.disk).context("--disk")?,
    };
    resources.validate()?;
    let timeout = a
        .timeout
        .as_deref()
        .map(parse_duration)
        .transpose()
        .context("--timeout")?;
    let mut env = Vec::new();
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--env {kv:?}: expected KEY=VALUE"))?;
        if k.is_empty() || k.contains('\0') || v.contains('\0') {
            bail!("--env {kv:?}: the name must be non-empty and neither part may contain NUL");
        }
        env.push((k.to_string(), v.to_string()));
    }
    if let Some(t) = &a.template {
        bail!(
            "--template {t}: templates are a server's; set MOAT_URL (and MOAT_API_KEY) to run \
             through one, or use --rootfs to run here"
        );
    }
    check_workdir(a.workdir.as_deref())?;
    let copies = parse_copies(&a.copy)?;
    let (cmd, args) = if a.shell {
        ("/bin/bash".to_string(), vec!["-l".to_string()])
    } else {
        let mut it = a.command.into_iter();
        let cmd = it
            .next()
            .ok_or_else(|| anyhow!("no command given: moat run [OPTIONS] -- CMD [ARGS...]"))?;
        (cmd, it.collect())
    };
    let rootfs = match a.rootfs {
        Some(d) if !d.is_dir() => bail!("--rootfs {}: not a directory", d.display()),
        // The template's rootfs is an absolute path (the engine refuses a relative one).
        // A template names its directory as UTF-8 text: a path that is not cannot be given to
        // the engine unchanged, and a lossy copy would name another directory.
        Some(d) => v1::Rootfs::Dir(
            std::path::absolute(&d)
                .with_context(|| format!("--rootfs {}", d.display()))?
                .into_os_string()
                .into_string()
                .map_err(|p| {
                    anyhow!(
                        "--rootfs {}: the path is not valid UTF-8",
                        std::path::Path::new(&p).display()
                    )
                })?,
        ),
        None => v1::Rootfs::Host,
    };
    let user = if a.root { "root" } else { "user" };
    let tty = terminal::is_tty(0) && terminal::is_tty(1);
    if a.shell && !tty {
        bail!("--shell needs a terminal on stdin and stdout");
    }
    if let Some(id) = &a.id {
        check_sandbox_id(id)?;
    }
    let id = a.id;
    let network = a.network.to_v1()?;
    Ok(Plan {
        id,
        resources,
        timeout,
        env,
        workdir: a.workdir,
        copies,
        user,
        cmd,
        args,
        rootfs,
        tty,
        backend: a.backend,
        network,
    })
}

/// Runs `moat run` here (without `MOAT_URL`; with it, [`super::run_remote::main`] runs it).
pub fn main(args: RunArgs) -> ExitCode {
    let plan = match plan(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("moat: {e:#}");
            return ExitCode::from(EXIT_MOAT_FAILED);
        }
    };
    let rt = match super::runtime(ExitCode::from(EXIT_MOAT_FAILED)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let code = match rt.block_on(run(plan)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("moat: {e:#}");
            ExitCode::from(EXIT_MOAT_FAILED)
        }
    };
    // The reader of our standard input may still wait in a blocking read (a terminal, or a
    // pipe nobody closed) that nothing can interrupt: dropping the runtime would wait for it,
    // so `moat run` would not end with its command.
    rt.shutdown_background();
    code
}

/// Prints the time since start of each stage to stderr when `MOAT_TIMING` is set.
struct Timing(Option<std::time::Instant>);

impl Timing {
    fn new() -> Timing {
        Timing(std::env::var_os("MOAT_TIMING").map(|_| std::time::Instant::now()))
    }

    fn mark(&self, what: &str) {
        if let Some(t) = self.0 {
            eprintln!(
                "moat: {:8.3} ms  {what}",
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
    }
}

/// The tenant of the in-memory store `moat run` keeps its one sandbox in.
const LOCAL_TENANT: &str = "local";
/// The template `moat run` defines for its sandbox: the root filesystem, user and working
/// directory its options ask for.
const RUN_TEMPLATE: &str = "run";
/// Time to live of a `moat run` sandbox: the command's own `--timeout` bounds the run, and no
/// reaper runs here, so the engine's expiry is only a record.
const RUN_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The engine `moat run` goes through, as `moat serve` does: the native backend (with a
/// guardian that destroys the sandbox should this process die) and a store in memory holding
/// one tenant and the run's template, defined by `caller`.
async fn local_engine(plan: &Plan, caller: &Caller, timing: &Timing) -> Result<SandboxManager> {
    // The store is made on another thread while this one prepares the backend.
    let store = tokio::task::spawn_blocking(|| -> Result<Store> {
        let store = Store::open_in_memory()?;
        store.create_tenant(LOCAL_TENANT, LOCAL_TENANT)?;
        Ok(store)
    });
    let backend: Arc<dyn Backend> = match plan.backend.as_str() {
        "gvisor" => Arc::new(GvisorBackend::new(&GvisorOptions {
            guardian: true,
            ..GvisorOptions::default()
        })?),
        _ => Arc::new(NativeBackend::new(&NativeOptions {
            guardian: true,
            ..NativeOptions::default()
        })?),
    };
    timing.mark("backend ready");
    let store = Arc::new(
        store
            .await
            .context("the in-memory store")?
            .context("the in-memory store")?,
    );
    timing.mark("store ready");
    let opts = ManagerOptions {
        default_ttl: RUN_TTL,
        max_ttl: RUN_TTL,
        ..ManagerOptions::default()
    };
    let manager = SandboxManager::new(store, backend, opts).map_err(|e| anyhow!("{e}"))?;
    let spec = v1::TemplateSpec {
        backend: Some(plan.backend.clone()),
        user: Some(plan.user.to_owned()),
        workdir: plan.workdir.clone(),
        ..v1::TemplateSpec::new(plan.rootfs.clone())
    };
    let template = v1::CreateTemplate {
        name: RUN_TEMPLATE.to_owned(),
        spec,
    };
    manager
        .create_template(caller, template)
        .await
        .map_err(|e| match plan.rootfs {
            v1::Rootfs::Dir(_) => anyhow!("--rootfs: {e}"),
            v1::Rootfs::Host | v1::Rootfs::Image(_) | v1::Rootfs::Build(_) => anyhow!("{e}"),
        })?;
    Ok(manager)
}

/// The create request of the run's sandbox: its template and the limits the options ask for.
fn create_request(r: &Resources, network: Option<v1::Network>) -> v1::CreateSandbox {
    v1::CreateSandbox {
        template: RUN_TEMPLATE.to_owned(),
        snapshot: None,
        resources: Some(v1::ResourceRequest {
            memory: Some(format_size(r.memory_bytes)),
            cpus: Some(r.cpu_millis as f64 / 1000.0),
            pids: Some(r.pids),
            disk: Some(format_size(r.disk_bytes)),
        }),
        env: Default::default(),
        metadata: Default::default(),
        timeout_secs: None,
        public_traffic: None,
        lifecycle: None,
        network,
    }
}

async fn run(plan: Plan) -> Result<u8> {
    // Ctrl-C, SIGTERM and SIGHUP are caught before anything is made: from here on they end
    // the run through the path that destroys the sandbox (exit 128+N), never by the default
    // action, which would leave what was made so far behind.
    let mut signals = Signals::catch()?;
    let timing = Timing::new();
    // This host's user, with no API key: an admin of the one local tenant (so the template
    // may name a host directory) held to no key's quotas.
    let caller = Caller::local(LOCAL_TENANT);
    let manager = local_engine(&plan, &caller, &timing).await?;
    timing.mark("engine ready");
    // A signal during the create is kept for when it is done: a create cut off halfway could
    // not be undone.
    let create = manager.create_with_id(
        &caller,
        create_request(&plan.resources, plan.network.clone()),
        plan.id.clone(),
    );
    tokio::pin!(create);
    let mut caught = None;
    let created = loop {
        tokio::select! {
            r = &mut create => break r,
            sig = signals.recv(), if caught.is_none() => caught = Some(sig),
        }
    };
    if let Some(sig) = caught {
        if let Ok(sandbox) = created {
            manager
                .delete(&caller, &sandbox.id)
                .await
                .map_err(|e| anyhow!("destroying the sandbox: {e}"))?;
        }
        return Ok(interrupted(sig));
    }
    let id = created.map_err(|e| anyhow!("{e}"))?.id;
    timing.mark("sandbox created");
    let result = async {
        let client = manager
            .agent(&caller, &id)
            .await
            .map_err(|e| anyhow!("connecting to the sandbox agent: {e}"))?;
        timing.mark("agent connected");
        let code = attach(&client, &plan, &manager, &caller, &id, &mut signals).await;
        timing.mark("command finished");
        code
    }
    .await;
    let destroyed = manager.delete(&caller, &id).await;
    timing.mark("sandbox destroyed");
    let code = result?;
    destroyed.map_err(|e| anyhow!("destroying the sandbox: {e}"))?;
    Ok(code)
}

/// The exit status after signal `sig` (128+N), with its note on stderr; the caller destroys
/// the sandbox.
fn interrupted(sig: i32) -> u8 {
    eprintln!("moat: interrupted; the sandbox was destroyed");
    128 + sig as u8
}

/// Copies files in, runs the command attached to this terminal, and returns the exit code.
async fn attach(
    client: &AgentClient,
    plan: &Plan,
    manager: &SandboxManager,
    caller: &Caller,
    id: &str,
    signals: &mut Signals,
) -> Result<u8> {
    let opts = CallOptions {
        user: Some(plan.user.to_string()),
        timeout: None,
    };
    let copies = async {
        for (local, remote) in &plan.copies {
            let data = tokio::fs::read(local)
                .await
                .with_context(|| format!("reading {}", local.display()))?;
            client
                .write_file(remote, bytes::Bytes::from(data), Some(plan.user))
                .await
                .with_context(|| format!("copying {} to {remote}", local.display()))?;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::select! {
        r = copies => r?,
        sig = signals.recv() => return Ok(interrupted(sig)),
    }
    let pty = if plan.tty {
        let (cols, rows) = terminal::size(1).unwrap_or((80, 24));
        Some(Pty {
            size: Some(pty::Size {
                cols: u32::from(cols),
                rows: u32::from(rows),
            }),
        })
    } else {
        None
    };
    let mut envs: std::collections::HashMap<String, String> = plan.env.iter().cloned().collect();
    if plan.tty {
        envs.entry("TERM".into())
            .or_insert_with(|| std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()));
    }
    let req = StartRequest {
        process: Some(ProcessConfig {
            cmd: plan.cmd.clone(),
            args: plan.args.clone(),
            envs,
            cwd: plan.workdir.clone(),
        }),
        pty,
        tag: None,
        stdin: Some(true),
    };
    let start_opts = CallOptions {
        timeout: plan.timeout,
        ..opts.clone()
    };
    let started = tokio::select! {
        s = client.start(req, start_opts) => s,
        sig = signals.recv() => return Ok(interrupted(sig)),
    };
    let mut stream = match started {
        Ok(s) => s,
        Err(e) => return Ok(start_failure(&plan.cmd, &e)),
    };
    let selector = Selector::Pid(stream.pid());
    let _raw = if plan.tty { RawMode::enter() } else { None };

    // Input: stdin bytes go to the process (PTY input in TTY mode) until EOF closes its stdin.
    let input_client = client.clone();
    let input_sel = selector.clone();
    let tty = plan.tty;
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let data = bytes::Bytes::copy_from_slice(&buf[..n]);
            if input_client
                .send_input(input_sel.clone(), data, tty)
                .await
                .is_err()
            {
                return;
            }
        }
        if !tty {
            let _ = input_client.close_stdin(input_sel).await;
        }
    });

    let mut sigwinch = signal(SignalKind::window_change())?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    // The agent enforces the timeout; this is the host's backstop should the agent not answer.
    let backstop = plan
        .timeout
        .map(|t| t + Duration::from_secs(5))
        .unwrap_or(Duration::MAX);
    let backstop = tokio::time::sleep(backstop.min(Duration::from_secs(u64::from(u32::MAX))));
    tokio::pin!(backstop);

    let outcome = loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(ProcessEvent { event: Some(process_event::Event::Data(d)) })) => {
                    use process_event::data_event::Output;
                    let written = match d.output {
                        Some(Output::Stdout(b)) | Some(Output::Pty(b)) => write_out(&mut stdout, &b).await,
                        Some(Output::Stderr(b)) => write_out(&mut stderr, &b).await,
                        None => Ok(()),
                    };
                    match written {
                        Ok(()) => {}
                        // Whoever read our output is gone (`moat run ... | head`): stop, as a
                        // pipeline would.
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break Outcome::OutputClosed,
                        Err(e) => break Outcome::Failed(anyhow!("writing the command's output: {e}")),
                    }
                }
                Some(Ok(ProcessEvent { event: Some(process_event::Event::End(end)) })) => break Outcome::Ended(end),
                Some(Ok(_)) => {}
                Some(Err(e)) if e.code() == Code::DeadlineExceeded => break Outcome::TimedOut,
                // The agent's connection closes when it exits: the sandbox is gone.
                Some(Err(_)) | None if client.is_closed() => break Outcome::SandboxDied,
                Some(Err(e)) => break Outcome::Failed(anyhow!("process stream: {e}")),
                None => break Outcome::Failed(anyhow!("the agent ended the stream without an end event")),
            },
            sig = signals.recv() => break Outcome::Signalled(sig),
            _ = sigwinch.recv() => {
                if let Some((cols, rows)) = terminal::size(1) {
                    let _ = client.update_pty(selector.clone(), u32::from(cols), u32::from(rows)).await;
                }
            }
            _ = &mut backstop => break Outcome::TimedOut,
        }
    };
    input.abort();
    drop(_raw);
    Ok(match outcome {
        Outcome::Ended(end) => {
            let code = exit_code(&end);
            if code == 137 && manager.oom_kills(caller, id).await.unwrap_or(0) > 0 {
                eprintln!(
                    "moat: killed: out of memory (the sandbox's limit is {})",
                    fmt_bytes(plan.resources.memory_bytes)
                );
            }
            code
        }
        Outcome::TimedOut => {
            eprintln!(
                "moat: timed out after {}; the command and all its processes were killed",
                plan.timeout.map(|t| format!("{t:?}")).unwrap_or_default()
            );
            EXIT_TIMEOUT
        }
        Outcome::Signalled(sig) => interrupted(sig),
        Outcome::OutputClosed => super::output::EXIT_OUTPUT_CLOSED,
        // On gvisor the sentry and the sandbox's processes share one memory limit: running
        // out of it ends the whole sandbox, which the cgroup's OOM count tells.
        Outcome::SandboxDied if manager.oom_kills(caller, id).await.unwrap_or(0) > 0 => {
            eprintln!(
                "moat: killed: the sandbox ran out of memory and ended (its limit is {})",
                fmt_bytes(plan.resources.memory_bytes)
            );
            137
        }
        Outcome::SandboxDied => return Err(anyhow!("the sandbox's agent exited unexpectedly")),
        Outcome::Failed(e) => return Err(e),
    })
}

enum Outcome {
    /// The agent's connection closed under the command: the whole sandbox ended.
    SandboxDied,
    Ended(process_event::EndEvent),
    OutputClosed,
    TimedOut,
    Signalled(i32),
    Failed(anyhow::Error),
}

/// The exit code for a start failure: 127 when the command does not exist.
fn start_failure(cmd: &str, e: &AgentError) -> u8 {
    if e.code() == Code::NotFound {
        eprintln!("moat: {cmd}: command not found");
        EXIT_NOT_FOUND
    } else if e.code() == Code::PermissionDenied {
        eprintln!("moat: {cmd}: permission denied");
        126
    } else {
        eprintln!("moat: starting {cmd}: {e}");
        EXIT_MOAT_FAILED
    }
}

/// Maps an end event to a shell-style exit code (128+N for signal N).
fn exit_code(end: &process_event::EndEvent) -> u8 {
    if end.exited {
        return (end.exit_code & 0xff) as u8;
    }
    let sig = signal_number(&end.status).unwrap_or(libc::SIGKILL);
    (128 + sig) as u8
}

/// `--copy LOCAL:REMOTE` values: each local path a readable file, each remote path non-empty.
pub(crate) fn parse_copies(values: &[String]) -> Result<Vec<(PathBuf, String)>> {
    values
        .iter()
        .map(|c| {
            let (local, remote) = c
                .split_once(':')
                .ok_or_else(|| anyhow!("--copy {c:?}: expected LOCAL:REMOTE"))?;
            let local = PathBuf::from(local);
            if !local.is_file() {
                bail!("--copy {c:?}: {} is not a readable file", local.display());
            }
            if remote.is_empty() || remote.contains('\0') {
                bail!("--copy {c:?}: the remote path is empty");
            }
            Ok((local, remote.to_string()))
        })
        .collect()
}

/// `--workdir`: an absolute path inside the sandbox.
pub(crate) fn check_workdir(workdir: Option<&str>) -> Result<()> {
    if let Some(w) = workdir
        && (!w.starts_with('/') || w.contains('\0'))
    {
        bail!("--workdir {w:?}: must be an absolute path inside the sandbox");
    }
    Ok(())
}
