//! `moat job …`: asynchronous jobs on a moat server.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use moat_client::Client;
use moat_client::types::{CreateJob, Job, JobInput, JobState};
use moat_proto::units::format_size as fmt_bytes;
use tokio::io::AsyncWriteExt;

use super::output;
use super::remote::{self, EXIT_TIMEOUT, Format, Remote};
use super::table::{self, Table};

/// Arguments of `moat job`.
#[derive(Debug, clap::Args)]
pub struct JobArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: JobCommand,
}

/// What a job runs and with what, as `moat job submit` takes it.
#[derive(Debug, clap::Args)]
struct Submit {
    /// The template its sandbox is made from [default: the server's default].
    #[arg(long, short = 't')]
    template: Option<String>,
    /// Code to run, in `--language`.
    #[arg(long, conflicts_with_all = ["file", "shell"])]
    code: Option<String>,
    /// A local file of code to run, in `--language`.
    #[arg(long, value_name = "PATH", conflicts_with = "shell")]
    file: Option<PathBuf>,
    /// The language of `--code` or `--file`: python (default), bash, sh, javascript.
    #[arg(long, short = 'l')]
    language: Option<String>,
    /// A script for /bin/sh -c.
    #[arg(long)]
    shell: Option<String>,
    /// An input file: `PATH` (a local file, written under the same name relative to the
    /// working directory) or `DEST=LOCAL` (repeatable). Local files go up as blobs first.
    #[arg(long = "input", short = 'i', value_name = "[DEST=]LOCAL")]
    inputs: Vec<String>,
    /// A path or glob of files to keep (repeatable): `out.csv`, `results/**/*.png`.
    #[arg(long = "keep", value_name = "GLOB")]
    outputs: Vec<String>,
    /// An environment variable `KEY=VALUE` (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The working directory [default: the user's home].
    #[arg(long)]
    cwd: Option<String>,
    /// Seconds one attempt may run [default: 600].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Attempts after the first when one fails.
    #[arg(long)]
    retries: Option<u32>,
    /// A key that makes a repeated submit return the first job.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// A URL the server POSTs the finished job to (signed; see `moat job get` for the secret).
    #[arg(long, value_name = "URL")]
    webhook: Option<String>,
    /// Wait until the job ends (a progress line on a terminal), print its output and error,
    /// and exit with its exit code.
    #[arg(long)]
    wait: bool,
    /// With `--wait`: download its outputs into this directory (their sandbox paths under it).
    #[arg(long, value_name = "DIR", requires = "wait")]
    out_dir: Option<PathBuf>,
    /// A program and its arguments, instead of code or a script.
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Debug, clap::Subcommand)]
enum JobCommand {
    /// Queue a job and print its id (or, with --wait, wait for it).
    Submit(Box<Submit>),
    /// List jobs, newest first.
    #[command(visible_alias = "list")]
    Ls {
        /// Only jobs in this state (repeatable): queued, running, succeeded, failed,
        /// cancelled, timed_out.
        #[arg(long = "state", value_parser = parse_state)]
        states: Vec<JobState>,
        /// Show at most this many [default: 100].
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one job.
    #[command(visible_alias = "show")]
    Get {
        /// Its id.
        id: String,
    },
    /// Print a job's whole standard output (or error, with --stderr).
    Logs {
        /// Its id.
        id: String,
        /// Standard error instead.
        #[arg(long)]
        stderr: bool,
    },
    /// List the files a job kept, or download them into a directory.
    Outputs {
        /// Its id.
        id: String,
        /// Download them into this directory (their sandbox paths under it).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// Cancel queued or running jobs.
    Cancel {
        /// Their ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Delete jobs and what they kept.
    #[command(visible_alias = "delete")]
    Rm {
        /// Their ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

fn parse_state(text: &str) -> Result<JobState, String> {
    JobState::from_name(text).ok_or_else(|| {
        format!("unknown state {text:?} (queued, running, succeeded, failed, cancelled, timed_out)")
    })
}

/// Runs `moat job …`.
pub fn main(args: JobArgs) -> ExitCode {
    let JobArgs { remote, command } = args;
    remote::block_on(async move {
        let client = remote.client()?;
        let format = remote.output;
        match command {
            JobCommand::Submit(submit) => run_submit(&client, *submit, format).await,
            JobCommand::Ls { states, limit } => {
                let page = client
                    .list_jobs(&states, None, Some(limit.unwrap_or(100)))
                    .await?;
                match format {
                    Format::Json => remote::print_json(&page.jobs)?,
                    Format::Table => output::print(job_table(&page.jobs))?,
                }
                Ok(ExitCode::SUCCESS)
            }
            JobCommand::Get { id } => {
                let job = client.get_job(&id).await?;
                match format {
                    Format::Json => remote::print_json(&job)?,
                    Format::Table => output::print(describe(&job))?,
                }
                Ok(ExitCode::SUCCESS)
            }
            JobCommand::Logs { id, stderr } => {
                let log = client.job_log(&id, stderr).await?;
                let mut out = tokio::io::stdout();
                log.write_to(&mut out).await?;
                out.flush().await?;
                Ok(ExitCode::SUCCESS)
            }
            JobCommand::Outputs { id, out_dir } => {
                let job = client.get_job(&id).await?;
                match out_dir {
                    Some(dir) => download_outputs(&client, &job, &dir, Names::OnStdout).await?,
                    None => match format {
                        Format::Json => remote::print_json(&job.outputs)?,
                        Format::Table => {
                            let mut t = Table::new(&["PATH", "SIZE", "DIGEST"]);
                            for o in &job.outputs {
                                t.row(vec![o.path.clone(), fmt_bytes(o.size), o.digest.clone()]);
                            }
                            output::print(t.render())?;
                        }
                    },
                }
                Ok(ExitCode::SUCCESS)
            }
            JobCommand::Cancel { ids } => each(&client, &ids, Each::Cancel).await,
            JobCommand::Rm { ids } => each(&client, &ids, Each::Delete).await,
        }
    })
}

/// What [`each`] does to a job.
#[derive(Clone, Copy)]
enum Each {
    Cancel,
    Delete,
}

/// Cancels or deletes every job of `ids`, printing each done and reporting each that failed.
async fn each(client: &Client, ids: &[String], what: Each) -> Result<ExitCode> {
    let mut failed = false;
    for id in ids {
        let done = match what {
            Each::Cancel => client.cancel_job(id).await.map(drop),
            Each::Delete => client.delete_job(id).await,
        };
        match done {
            Ok(()) => output::println(id)?,
            Err(e) => {
                failed = true;
                remote::report(&anyhow::Error::new(e).context(id.clone()));
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn run_submit(client: &Client, s: Submit, format: Format) -> Result<ExitCode> {
    let code = match (&s.code, &s.file) {
        (Some(code), None) => Some(code.clone()),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?,
        ),
        _ => None,
    };
    let given = [code.is_some(), s.shell.is_some(), !s.cmd.is_empty()];
    if given.iter().filter(|g| **g).count() != 1 {
        bail!("give one of --code, --file, --shell, or a command after --");
    }
    let mut inputs = Vec::with_capacity(s.inputs.len());
    for spec in &s.inputs {
        let (dest, local) = match spec.split_once('=') {
            Some((dest, local)) if !dest.is_empty() => (dest.to_owned(), local.to_owned()),
            _ => {
                let name = Path::new(spec)
                    .file_name()
                    .ok_or_else(|| anyhow!("--input {spec:?}: not a file"))?;
                (name.to_string_lossy().into_owned(), spec.clone())
            }
        };
        let blob = client
            .upload_blob_file(&local)
            .await
            .with_context(|| format!("uploading {local}"))?;
        inputs.push(JobInput {
            path: dest,
            blob: Some(blob.digest),
            ..JobInput::default()
        });
    }
    let req = CreateJob {
        template: s.template,
        language: s.language,
        code,
        shell: s.shell,
        cmd: (!s.cmd.is_empty()).then_some(s.cmd),
        inputs,
        outputs: s.outputs,
        env: remote::key_values("--env", &s.env)?.into_iter().collect(),
        cwd: s.cwd,
        timeout_secs: s.timeout,
        resources: None,
        retries: s.retries,
        idempotency_key: s.idempotency_key,
        webhook_url: s.webhook,
    };
    let job = client.submit_job(&req).await?;
    if !s.wait {
        match format {
            Format::Json => remote::print_json(&job)?,
            Format::Table => output::println(&job.id)?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    let job = wait(client, &job.id).await?;
    // Its own output on ours, as `moat run` does.
    client
        .job_log(&job.id, false)
        .await?
        .write_to(&mut tokio::io::stdout())
        .await?;
    client
        .job_log(&job.id, true)
        .await?
        .write_to(&mut tokio::io::stderr())
        .await?;
    if let Some(dir) = &s.out_dir {
        // Our standard output is the job's: the files written are named on standard error.
        download_outputs(client, &job, dir, Names::OnStderr).await?;
    }
    for e in &job.output_errors {
        eprintln!("moat: output {e}");
    }
    if let Format::Json = format {
        remote::print_json(&job)?;
    }
    Ok(match (job.state, job.exit_code) {
        (JobState::Succeeded, _) => ExitCode::SUCCESS,
        (JobState::TimedOut, _) => {
            eprintln!("moat: job {} ran past its timeout", job.id);
            ExitCode::from(EXIT_TIMEOUT)
        }
        (state, code) => {
            if let Some(error) = &job.error {
                eprintln!("moat: job {} {}: {error}", job.id, state.as_str());
            }
            match code {
                Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1).max(1)),
                None => ExitCode::FAILURE,
            }
        }
    })
}

/// Polls job `id` until it is over, with a progress line on a terminal.
async fn wait(client: &Client, id: &str) -> Result<Job> {
    let started = Instant::now();
    let progress = std::io::stderr().is_terminal();
    let mut nap = Duration::from_millis(20);
    loop {
        let job = client.get_job(id).await?;
        if job.state.is_final() {
            if progress {
                eprint!("\r\x1b[K");
            }
            return Ok(job);
        }
        if progress {
            eprint!(
                "\r\x1b[K{id} {} (attempt {}/{}) {}s",
                job.state.as_str(),
                job.attempts.max(1),
                job.max_attempts,
                started.elapsed().as_secs()
            );
        }
        tokio::time::sleep(nap).await;
        nap = (nap * 2).min(Duration::from_millis(500));
    }
}

/// Where [`download_outputs`] names the files it wrote.
#[derive(Clone, Copy)]
enum Names {
    OnStdout,
    OnStderr,
}

/// Downloads each output of `job` to `dir` + its sandbox path, naming each file written.
async fn download_outputs(client: &Client, job: &Job, dir: &Path, names: Names) -> Result<()> {
    for o in &job.outputs {
        let rel = o.path.trim_start_matches('/');
        if rel.split('/').any(|p| p == ".." || p.is_empty()) {
            bail!("output path {:?} is not a plain path", o.path);
        }
        let to = dir.join(rel);
        if let Some(parent) = to.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut file = tokio::fs::File::create(&to)
            .await
            .with_context(|| format!("creating {}", to.display()))?;
        client
            .job_output(&job.id, &o.path)
            .await?
            .write_to(&mut file)
            .await?;
        file.flush().await?;
        match names {
            Names::OnStdout => output::println(to.display().to_string())?,
            Names::OnStderr => eprintln!("moat: kept {}", to.display()),
        }
    }
    Ok(())
}

/// Jobs as a table for people.
fn job_table(jobs: &[Job]) -> String {
    let mut t = Table::new(&["ID", "STATE", "TEMPLATE", "EXIT", "ATTEMPTS", "CREATED"]);
    for j in jobs {
        t.row(vec![
            j.id.clone(),
            j.state.as_str().into(),
            j.template.clone(),
            j.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
            format!("{}/{}", j.attempts, j.max_attempts),
            table::time(j.created_at),
        ]);
    }
    t.render()
}

/// One job as `field: value` lines.
fn describe(j: &Job) -> String {
    let outputs: Vec<String> = j
        .outputs
        .iter()
        .map(|o| format!("{} ({})", o.path, fmt_bytes(o.size)))
        .collect();
    table::fields(&[
        ("id", j.id.clone()),
        ("state", j.state.as_str().into()),
        ("template", j.template.clone()),
        (
            "exit code",
            j.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
        ),
        ("error", j.error.clone().unwrap_or_else(|| "-".into())),
        ("attempts", format!("{}/{}", j.attempts, j.max_attempts)),
        ("created", table::time(j.created_at)),
        ("started", table::opt_time(j.started_at)),
        ("finished", table::opt_time(j.finished_at)),
        (
            "outputs",
            if outputs.is_empty() {
                "-".into()
            } else {
                outputs.join(", ")
            },
        ),
    ])
}
