//! `moat sandbox …`: sandboxes on a moat server.

use std::collections::BTreeMap;
use std::process::ExitCode;

use super::output;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use moat_client::Client;
use moat_client::types::{
    CreateSandbox, ExecRequest, ForkSandbox, Lifecycle, ListSandboxes, OnTimeout, OutputEncoding,
    ResourceRequest, Sandbox, SandboxState,
};
use moat_proto::units::{format_size as fmt_bytes, parse_cpus, parse_duration};
use tokio::io::AsyncReadExt;

use super::remote::{self, EXIT_MOAT_FAILED, Finished, Format, Remote, key_values, whole_secs};
use super::table::{self, Table};

/// Largest standard input `exec -i` sends: the server takes request bodies up to 1 MiB, and
/// base64 makes bytes a third bigger.
pub const MAX_STDIN_BYTES: usize = 512 << 10;

/// Arguments of `moat sandbox`.
#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: SandboxCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SandboxCommand {
    /// Make a sandbox and print its id.
    Create(Box<CreateArgs>),
    /// List sandboxes (active ones unless --all or --state).
    #[command(visible_alias = "list")]
    Ls(LsArgs),
    /// Show one sandbox.
    #[command(visible_alias = "show")]
    Get {
        /// The sandbox's id.
        id: String,
    },
    /// Run a command in a sandbox, streaming its output; exits with its exit code.
    Exec(ExecArgs),
    /// Copy files or directories between here and a sandbox (SRC DST; one of them ID:PATH).
    Cp(super::cp::CpArgs),
    /// Destroy sandboxes.
    #[command(visible_alias = "delete")]
    Rm {
        /// Their ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Give a sandbox a new time to live, counted from now.
    Timeout {
        /// The sandbox's id.
        id: String,
        /// How long from now, e.g. 30s, 10m, 2h.
        duration: String,
    },
    /// Freeze every process of a sandbox (its time to live keeps counting).
    Pause {
        /// The sandbox's id.
        id: String,
    },
    /// Thaw a paused sandbox.
    Resume {
        /// The sandbox's id.
        id: String,
        /// A new time to live from now, e.g. 10m [default: the expiry stays as it was].
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Copy a sandbox's files into new sandboxes and print their ids (running processes are
    /// not copied).
    Fork(ForkArgs),
}

#[derive(Debug, clap::Args)]
struct ForkArgs {
    /// The sandbox's id.
    id: String,
    /// How many copies, 1 to 20.
    #[arg(long, short = 'n', default_value_t = 1)]
    count: u32,
    /// Time to live of each copy, e.g. 10m [default: the server's, 5m].
    #[arg(long)]
    timeout: Option<String>,
    /// A label of each copy (repeatable).
    #[arg(long = "metadata", short = 'm', value_name = "K=V")]
    metadata: Vec<String>,
    /// Copy its memory and running processes too (gvisor sandboxes).
    #[arg(long)]
    memory: bool,
}

/// Resource flags shared by `sandbox create` and `moat run` through a server.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ResourceFlags {
    /// Memory limit (RAM, no swap), e.g. 512M, 2G [default: the template's].
    #[arg(long)]
    pub memory: Option<String>,
    /// CPU limit, e.g. 1, 0.5 [default: the template's].
    #[arg(long)]
    pub cpus: Option<String>,
    /// Most processes and threads [default: the template's].
    #[arg(long)]
    pub pids: Option<u64>,
    /// Size of the writable layer, held in memory [default: the template's].
    #[arg(long)]
    pub disk: Option<String>,
}

impl ResourceFlags {
    /// The request's resources, `None` when no flag is given.
    pub fn request(&self) -> Result<Option<ResourceRequest>> {
        let cpus = self
            .cpus
            .as_deref()
            .map(|c| parse_cpus(c).map(|m| m as f64 / 1000.0))
            .transpose()
            .context("--cpus")?;
        let req = ResourceRequest {
            memory: self.memory.clone(),
            cpus,
            pids: self.pids,
            disk: self.disk.clone(),
        };
        Ok((req != ResourceRequest::default()).then_some(req))
    }
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// The template [default: host].
    #[arg(long, short = 't')]
    template: Option<String>,
    /// Make it from this snapshot (its template, limits, environment and files) instead of a
    /// template.
    #[arg(long, value_name = "ID", conflicts_with_all = ["template", "memory", "cpus", "pids", "disk"])]
    snapshot: Option<String>,
    #[command(flatten)]
    resources: ResourceFlags,
    /// Time to live, e.g. 10m, 2h [default: the server's, 5m].
    #[arg(long)]
    timeout: Option<String>,
    /// Environment variable of every command in the sandbox (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// A label, filterable with `ls --metadata` (repeatable).
    #[arg(long = "metadata", short = 'm', value_name = "K=V")]
    metadata: Vec<String>,
    /// What the time to live running out does: kill, or pause (it then stays paused until
    /// resumed or deleted).
    #[arg(long, value_name = "ACTION", value_parser = ["kill", "pause"])]
    on_timeout: Option<String>,
    /// Resume the sandbox when a command, a file call or traffic needs it while it is paused.
    #[arg(long)]
    auto_resume: bool,
    #[command(flatten)]
    network: super::network_args::NetworkArgs,
}

#[derive(Debug, clap::Args)]
struct LsArgs {
    /// Also ended sandboxes (killed, failed).
    #[arg(long, short = 'a')]
    all: bool,
    /// Only sandboxes in this state (repeatable): starting, running, paused, killed, failed.
    #[arg(long, value_name = "STATE")]
    state: Vec<String>,
    /// Only sandboxes with this label (repeatable; all must match).
    #[arg(long = "metadata", short = 'm', value_name = "K=V")]
    metadata: Vec<String>,
    /// Show at most this many.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit status: the command's; 128+N after signal N; 124 after --timeout; \
137 after an OOM kill; 127 if the command is not found; 125 if moat failed."
)]
struct ExecArgs {
    /// The sandbox's id.
    id: String,
    /// Environment variable of the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Working directory inside the sandbox.
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    /// Run as root inside the sandbox.
    #[arg(long)]
    root: bool,
    /// Kill the command after this long, e.g. 30s, 5m (whole seconds, rounded up; at most
    /// 1h) [default: the server's, 60s].
    #[arg(long)]
    timeout: Option<String>,
    /// Send this program's standard input (read to its end first, at most 512 KiB) to the
    /// command.
    #[arg(long, short = 'i')]
    stdin: bool,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// Runs `moat sandbox …`.
pub fn main(args: SandboxArgs) -> ExitCode {
    let SandboxArgs { remote, command } = args;
    remote::block_on(async move {
        let client = remote.client()?;
        let format = remote.output;
        match command {
            SandboxCommand::Create(a) => create(&client, format, *a).await,
            SandboxCommand::Ls(a) => ls(&client, format, a).await,
            SandboxCommand::Get { id } => {
                let sandbox = client.get_sandbox(&id).await?;
                match format {
                    Format::Json => remote::print_json(&sandbox)?,
                    Format::Table => output::print(describe(&sandbox))?,
                }
                Ok(ExitCode::SUCCESS)
            }
            SandboxCommand::Exec(a) => exec(&client, format, a).await,
            SandboxCommand::Cp(a) => super::cp::copy(&client, a).await,
            SandboxCommand::Rm { ids } => rm(&client, &ids).await,
            SandboxCommand::Pause { id } => {
                let sandbox = client.pause_sandbox(&id).await?;
                print_state(format, &sandbox)?;
                Ok(ExitCode::SUCCESS)
            }
            SandboxCommand::Resume { id, timeout } => {
                let secs = timeout
                    .as_deref()
                    .map(parse_duration)
                    .transpose()
                    .context("--timeout")?
                    .map(whole_secs);
                let sandbox = client.resume_sandbox(&id, secs).await?;
                print_state(format, &sandbox)?;
                Ok(ExitCode::SUCCESS)
            }
            SandboxCommand::Fork(a) => fork(&client, format, a).await,
            SandboxCommand::Timeout { id, duration } => {
                let secs = whole_secs(parse_duration(&duration).context("duration")?);
                let sandbox = client.set_timeout(&id, secs).await?;
                match format {
                    Format::Json => remote::print_json(&sandbox)?,
                    Format::Table => output::println(format!(
                        "{} expires at {} (UTC)",
                        sandbox.id,
                        table::opt_time(sandbox.expires_at)
                    ))?,
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

async fn create(client: &Client, format: Format, a: CreateArgs) -> Result<ExitCode> {
    let timeout_secs = a
        .timeout
        .as_deref()
        .map(parse_duration)
        .transpose()
        .context("--timeout")?
        .map(whole_secs);
    let mut req = CreateSandbox {
        resources: a.resources.request()?,
        env: key_values("--env", &a.env)?.into_iter().collect(),
        metadata: key_values("--metadata", &a.metadata)?.into_iter().collect(),
        timeout_secs,
        snapshot: a.snapshot,
        lifecycle: (a.on_timeout.is_some() || a.auto_resume).then(|| Lifecycle {
            on_timeout: if a.on_timeout.as_deref() == Some("pause") {
                OnTimeout::Pause
            } else {
                OnTimeout::Kill
            },
            auto_resume: a.auto_resume,
        }),
        network: a.network.to_v1()?,
        ..CreateSandbox::default()
    };
    if let Some(t) = a.template {
        req.template = t;
    }
    let sandbox = client.create_sandbox(&req).await?;
    match format {
        Format::Json => remote::print_json(&sandbox)?,
        Format::Table => output::println(sandbox.id)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A sandbox after a change of state: JSON, or `ID STATE`.
fn print_state(format: Format, sandbox: &Sandbox) -> Result<()> {
    match format {
        Format::Json => remote::print_json(sandbox)?,
        Format::Table => output::println(format!("{} {}", sandbox.id, sandbox.state))?,
    }
    Ok(())
}

/// Prints the copies' ids, one a line (JSON: every result); a copy that failed is reported
/// and makes the exit status a failure.
async fn fork(client: &Client, format: Format, a: ForkArgs) -> Result<ExitCode> {
    let timeout_secs = a
        .timeout
        .as_deref()
        .map(parse_duration)
        .transpose()
        .context("--timeout")?
        .map(whole_secs);
    let req = ForkSandbox {
        count: Some(a.count),
        timeout_secs,
        metadata: key_values("--metadata", &a.metadata)?.into_iter().collect(),
        memory: a.memory,
    };
    let result = client.fork_sandbox(&a.id, &req).await?;
    let failed = result.results.iter().any(|r| r.error.is_some());
    match format {
        Format::Json => remote::print_json(&result.results)?,
        Format::Table => {
            for item in &result.results {
                match (&item.sandbox, &item.error) {
                    (Some(s), _) => output::println(&s.id)?,
                    (None, Some(e)) => eprintln!("moat: a copy failed: {} ({})", e.message, e.code),
                    (None, None) => eprintln!("moat: a copy came back empty"),
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn ls(client: &Client, format: Format, a: LsArgs) -> Result<ExitCode> {
    let mut states = a
        .state
        .iter()
        .map(|s| {
            SandboxState::parse(s).ok_or_else(|| {
                anyhow!("--state {s:?}: expected starting, running, paused, killed or failed")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if states.is_empty() && !a.all {
        states = SandboxState::ALL
            .into_iter()
            .filter(|s| s.is_active())
            .collect();
    }
    let filter = ListSandboxes {
        states,
        metadata: key_values("--metadata", &a.metadata)?.into_iter().collect(),
        after: None,
        limit: a.limit.map(|l| u32::try_from(l).unwrap_or(u32::MAX)),
    };
    let mut sandboxes = match a.limit {
        Some(_) => client.list_sandboxes(&filter).await?.sandboxes,
        None => client.list_all_sandboxes(&filter).await?,
    };
    if let Some(limit) = a.limit {
        sandboxes.truncate(limit);
    }
    match format {
        Format::Json => remote::print_json(&sandboxes)?,
        Format::Table => output::print(sandbox_table(&sandboxes))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Sandboxes as a table for people.
pub fn sandbox_table(sandboxes: &[Sandbox]) -> String {
    let mut t = Table::new(&[
        "ID", "TEMPLATE", "STATE", "CREATED", "EXPIRES", "MEMORY", "CPUS", "METADATA",
    ]);
    for s in sandboxes {
        t.row(vec![
            s.id.clone(),
            s.template.clone(),
            s.state.to_string(),
            table::time(s.created_at),
            if s.state.is_ended() {
                "-".into()
            } else {
                table::opt_time(s.expires_at)
            },
            fmt_bytes(s.resources.memory_bytes),
            table::cpus(s.resources.cpu_millis),
            table::pairs(&s.metadata),
        ]);
    }
    t.render()
}

/// One sandbox as `field: value` lines.
fn describe(s: &Sandbox) -> String {
    let r = &s.resources;
    table::fields(&[
        ("id", s.id.clone()),
        ("template", s.template.clone()),
        ("state", s.state.to_string()),
        ("metadata", table::pairs(&s.metadata)),
        ("memory", fmt_bytes(r.memory_bytes)),
        ("cpus", table::cpus(r.cpu_millis)),
        ("pids", r.pids.to_string()),
        ("disk", fmt_bytes(r.disk_bytes)),
        ("created", table::time(s.created_at)),
        ("expires", table::opt_time(s.expires_at)),
        ("ended", table::opt_time(s.ended_at)),
        (
            "end reason",
            s.end_reason.clone().unwrap_or_else(|| "-".into()),
        ),
    ])
}

async fn rm(client: &Client, ids: &[String]) -> Result<ExitCode> {
    let mut failed = false;
    for id in ids {
        match client.delete_sandbox(id).await {
            Ok(()) => output::println(id)?,
            Err(e) => {
                failed = true;
                remote::report(&anyhow::Error::new(e).context(format!("deleting {id}")));
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The exec request of `exec`'s flags.
fn exec_request(a: &ExecArgs) -> Result<ExecRequest> {
    let timeout_secs = a
        .timeout
        .as_deref()
        .map(parse_duration)
        .transpose()
        .context("--timeout")?
        .map(whole_secs);
    let env: BTreeMap<String, String> = key_values("--env", &a.env)?.into_iter().collect();
    Ok(ExecRequest {
        cmd: Some(a.command.clone()),
        env,
        cwd: a.workdir.clone(),
        user: a.root.then(|| "root".to_owned()),
        timeout_secs,
        encoding: OutputEncoding::Base64,
        ..ExecRequest::default()
    })
}

async fn exec(client: &Client, format: Format, a: ExecArgs) -> Result<ExitCode> {
    let plan = async {
        let mut req = exec_request(&a)?;
        if a.stdin {
            req.stdin_b64 = Some(read_stdin().await?);
        }
        Ok::<_, anyhow::Error>(req)
    };
    let mut req = match plan.await {
        Ok(r) => r,
        Err(e) => {
            remote::report(&e);
            return Ok(ExitCode::from(EXIT_MOAT_FAILED));
        }
    };
    if format == Format::Json {
        // Buffered: one JSON result for scripts.
        req.encoding = OutputEncoding::Utf8;
        let result = client.exec(&a.id, &req).await;
        return Ok(match result {
            Ok(r) => {
                remote::print_json(&r)?;
                ExitCode::from(remote::exit_status(
                    &moat_client::types::ExecEnd {
                        exit_code: r.exit_code,
                        signal: r.signal.clone(),
                        duration_ms: r.duration_ms,
                        timed_out: r.timed_out,
                        oom_killed: r.oom_killed,
                    },
                    None,
                ))
            }
            Err(e) => {
                remote::report(&e.into());
                ExitCode::from(EXIT_MOAT_FAILED)
            }
        });
    }
    Ok(ExitCode::from(
        match remote::stream_exec(client, &a.id, &req, &mut remote::Signals::catch()?).await {
            Ok(Finished::Ended(end)) => remote::exit_status(&end, None),
            Ok(Finished::OutputClosed) => super::output::EXIT_OUTPUT_CLOSED,
            Ok(Finished::Signalled(sig)) => {
                // Our exit closes the stream, and the server kills a command whose stream closed.
                eprintln!("moat: interrupted; the command is stopped");
                128 + sig as u8
            }
            Err(e) => {
                remote::report(&e);
                EXIT_MOAT_FAILED
            }
        },
    ))
}

/// Our standard input, read to its end, as base64.
async fn read_stdin() -> Result<String> {
    let mut data = Vec::new();
    let read = tokio::io::stdin()
        .take(MAX_STDIN_BYTES as u64 + 1)
        .read_to_end(&mut data)
        .await
        .context("reading standard input")?;
    if read > MAX_STDIN_BYTES {
        bail!(
            "standard input is larger than {} KiB: copy it in with `moat sandbox cp` instead",
            MAX_STDIN_BYTES >> 10
        );
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(&data))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use moat_client::types::ResourceLimits;

    use super::*;

    fn sandbox(id: &str, state: SandboxState) -> Sandbox {
        Sandbox {
            id: id.into(),
            template: "host".into(),
            state,
            metadata: [("job".to_owned(), "a".to_owned())].into(),
            resources: ResourceLimits {
                memory_bytes: 512 << 20,
                cpu_millis: 500,
                pids: 64,
                disk_bytes: 1 << 30,
            },
            created_at: 0,
            expires_at: Some(60_000),
            ended_at: None,
            end_reason: None,
            access_token: None,
            public_traffic: true,
            traffic_access_token: None,
            backend: "native".into(),
            lifecycle: Default::default(),
        }
    }

    #[test]
    fn sandbox_tables() {
        let text = sandbox_table(&[
            sandbox("aaaa", SandboxState::Running),
            sandbox("bbbbbbbb", SandboxState::Killed),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ID        TEMPLATE  STATE    CREATED              EXPIRES              MEMORY  CPUS  METADATA"
        );
        assert_eq!(
            lines[1],
            "aaaa      host      running  1970-01-01 00:00:00  1970-01-01 00:01:00  512M    0.5   job=a"
        );
        assert!(lines[2].starts_with("bbbbbbbb  host      killed   1970-01-01 00:00:00  -  "));
        let one = describe(&sandbox("aaaa", SandboxState::Running));
        assert!(one.starts_with("id:          aaaa\n"), "{one}");
        assert!(one.contains("end reason:  -\n"), "{one}");
    }

    #[test]
    fn resource_flags() {
        assert_eq!(ResourceFlags::default().request().unwrap(), None);
        let r = ResourceFlags {
            memory: Some("256M".into()),
            cpus: Some("0.5".into()),
            ..Default::default()
        }
        .request()
        .unwrap()
        .unwrap();
        assert_eq!(r.memory.as_deref(), Some("256M"));
        assert_eq!(r.cpus, Some(0.5));
        assert!(
            ResourceFlags {
                cpus: Some("lots".into()),
                ..Default::default()
            }
            .request()
            .is_err()
        );
    }
}
