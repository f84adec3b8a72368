//! `moat run` through a server (when `MOAT_URL` is set): make a sandbox with the run's limits,
//! copy files in, stream the command's output, exit with its status, delete the sandbox
//! whatever happens (Ctrl-C, SIGTERM and SIGHUP included).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use base64::Engine;
use moat_client::Client;
use moat_client::types::{CreateSandbox, ExecRequest, OutputEncoding, ResourceRequest, Sandbox};
use moat_proto::units::{parse_cpus, parse_duration, parse_size};
use moat_proto::v1;
use tokio::io::AsyncReadExt;

use super::remote::{self, EXIT_MOAT_FAILED, Finished, Remote, Signals, key_values, whole_secs};
use super::run::RunArgs;
use super::sandbox::MAX_STDIN_BYTES;

/// How much longer than the command the sandbox may live, so its time to live never ends
/// the command first.
const TTL_MARGIN_SECS: u64 = 60;

/// Whether `moat run` goes through a server: `MOAT_URL` is set and not empty.
pub fn wanted() -> bool {
    std::env::var_os(moat_client::URL_ENV).is_some_and(|v| !v.is_empty())
}

/// What to do, checked before anything is sent.
struct Plan {
    create: CreateSandbox,
    exec: ExecRequest,
    copies: Vec<(std::path::PathBuf, String)>,
}

fn plan(a: &RunArgs) -> Result<Plan> {
    if a.shell {
        bail!("--shell needs a terminal attached to the sandbox: unset MOAT_URL to run locally");
    }
    if a.rootfs.is_some() {
        bail!(
            "--rootfs names a directory of this host: through a server, use a template \
             (moat template create NAME --rootfs DIR) or unset MOAT_URL"
        );
    }
    if a.id.is_some() {
        bail!("--id is not supported through a server (the server picks sandbox ids)");
    }
    if a.backend != "native" {
        bail!(
            "--backend chooses a backend of this host: through a server, use a template that \
             names its backend (moat template create NAME --backend {}) or unset MOAT_URL",
            a.backend
        );
    }
    // Checked here as the local run does, so a typo fails before anything is made.
    parse_size(&a.memory).context("--memory")?;
    parse_size(&a.disk).context("--disk")?;
    let cpus = parse_cpus(&a.cpus).context("--cpus")? as f64 / 1000.0;
    let timeout = a
        .timeout
        .as_deref()
        .map(parse_duration)
        .transpose()
        .context("--timeout")?
        .map(whole_secs)
        .unwrap_or(v1::MAX_EXEC_TIMEOUT_SECS);
    if timeout > v1::MAX_EXEC_TIMEOUT_SECS {
        bail!(
            "--timeout: through a server a command may run at most {} s",
            v1::MAX_EXEC_TIMEOUT_SECS
        );
    }
    let env: BTreeMap<String, String> = key_values("--env", &a.env)?.into_iter().collect();
    super::run::check_workdir(a.workdir.as_deref())?;
    let copies = super::run::parse_copies(&a.copy)?;
    let cmd = a.command.clone();
    if cmd.is_empty() {
        bail!("no command given: moat run [OPTIONS] -- CMD [ARGS...]");
    }
    Ok(Plan {
        create: CreateSandbox {
            resources: Some(ResourceRequest {
                memory: Some(a.memory.clone()),
                cpus: Some(cpus),
                pids: Some(a.pids),
                disk: Some(a.disk.clone()),
            }),
            metadata: [("created_by".to_owned(), "moat run".to_owned())].into(),
            timeout_secs: Some(timeout + TTL_MARGIN_SECS),
            network: a.network.to_v1()?,
            template: a.template.clone().unwrap_or_else(|| "host".to_owned()),
            ..CreateSandbox::default()
        },
        exec: ExecRequest {
            cmd: Some(cmd),
            env,
            cwd: a.workdir.clone(),
            user: a.root.then(|| "root".to_owned()),
            timeout_secs: Some(timeout),
            encoding: OutputEncoding::Base64,
            ..ExecRequest::default()
        },
        copies,
    })
}

/// Runs `moat run` through the server; the exit status is the command's (see `moat run`).
pub fn main(args: RunArgs) -> ExitCode {
    let rt = match super::runtime(ExitCode::from(EXIT_MOAT_FAILED)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(run(&args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            remote::report(&e);
            ExitCode::from(EXIT_MOAT_FAILED)
        }
    }
}

async fn run(args: &RunArgs) -> Result<u8> {
    let mut plan = plan(args)?;
    let client = Remote {
        url: None,
        api_key: None,
        output: remote::Format::Table,
    }
    .client()?;
    if !std::io::stdin().is_terminal() {
        let data = read_stdin().await?;
        if !data.is_empty() {
            plan.exec.stdin_b64 = Some(base64::engine::general_purpose::STANDARD.encode(data));
        }
    }
    let mut signals = Signals::catch()?;
    let creating = client.create_sandbox(&plan.create);
    tokio::pin!(creating);
    // A signal during the create still waits for it, so the sandbox can be deleted.
    let (created, interrupted) = tokio::select! {
        c = &mut creating => (c, None),
        sig = signals.recv() => ((&mut creating).await, Some(sig)),
    };
    let sandbox = created.context("creating the sandbox")?;
    let outcome = match interrupted {
        Some(sig) => Ok(Finished::Signalled(sig)),
        None => attach(&client, &sandbox, &plan, &mut signals).await,
    };
    let deleted = client.delete_sandbox(&sandbox.id).await;
    let code = match outcome? {
        Finished::Ended(end) => remote::exit_status(&end, Some(sandbox.resources.memory_bytes)),
        Finished::OutputClosed => super::output::EXIT_OUTPUT_CLOSED,
        Finished::Signalled(sig) => {
            eprintln!("moat: interrupted; the sandbox was destroyed");
            128 + sig as u8
        }
    };
    deleted.with_context(|| format!("deleting sandbox {}", sandbox.id))?;
    Ok(code)
}

/// Copies the files in, then runs the command.
async fn attach(
    client: &Client,
    sandbox: &Sandbox,
    plan: &Plan,
    signals: &mut Signals,
) -> Result<Finished> {
    for (local, remote) in &plan.copies {
        let upload = client.upload_file(&sandbox.id, remote, local);
        tokio::select! {
            done = upload => {
                done.with_context(|| format!("copying {} to {remote}", local.display()))?;
            }
            sig = signals.recv() => return Ok(Finished::Signalled(sig)),
        }
    }
    remote::stream_exec(client, &sandbox.id, &plan.exec, signals).await
}

/// Our standard input to its end, at most [`MAX_STDIN_BYTES`].
async fn read_stdin() -> Result<Vec<u8>> {
    let mut data = Vec::new();
    tokio::io::stdin()
        .take(MAX_STDIN_BYTES as u64 + 1)
        .read_to_end(&mut data)
        .await
        .context("reading standard input")?;
    if data.len() > MAX_STDIN_BYTES {
        bail!(
            "standard input is larger than {} KiB: through a server, copy it in with --copy",
            MAX_STDIN_BYTES >> 10
        );
    }
    Ok(data)
}
