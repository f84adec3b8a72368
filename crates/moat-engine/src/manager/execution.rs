//! One command running in a sandbox, followed from its start to its end: the output as it
//! arrives (raw bytes), then how it ended. Both the buffered exec and the exec stream consume
//! it.
//!
//! Nothing is read ahead: the agent's process stream is read only when the consumer asks for
//! the next output, so a slow consumer holds back the agent's stream, which blocks the
//! command's writes (the agent reads a pipe only when its readers have room).
//!
//! An execution dropped before the command ended (its HTTP client went away) kills the
//! command's process group, so nothing keeps running unobserved.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moat_proto::connect::Code;
use moat_proto::process::{StartRequest, process_event, process_selector};
use moat_proto::v1;

use super::{Live, ManagerError, ManagerResult};
use crate::agent_client::{AgentClient, AgentError, CallOptions, KillOnDrop, ProcessStream};

/// Chunk size for writing an exec's stdin to the agent (below its message limit).
const STDIN_CHUNK: usize = 256 << 10;

/// An exec request checked and turned into what the agent is asked.
#[derive(Debug)]
pub(super) struct ExecPlan {
    /// The agent's request.
    pub(super) start: StartRequest,
    /// Bytes for the command's stdin, when it has any.
    pub(super) stdin: Option<Vec<u8>>,
    /// When the agent kills the command's process group.
    pub(super) timeout: Duration,
    /// The user it runs as; the sandbox's default when `None`.
    pub(super) user: Option<String>,
}

/// A piece of what a command did.
#[derive(Debug)]
pub(super) enum Output {
    /// Bytes it wrote to standard output (or its terminal).
    Stdout(Vec<u8>),
    /// Bytes it wrote to standard error.
    Stderr(Vec<u8>),
    /// It ended (always the last piece); an error when following it failed.
    Ended(ManagerResult<v1::ExecEnd>),
}

/// A command started in a sandbox (or found impossible to start).
pub(super) struct Execution {
    id: String,
    live: Arc<Live>,
    phase: Phase,
    began: Instant,
    oom_before: u64,
    exit_code: Option<i32>,
    signal: Option<String>,
}

enum Phase {
    /// The program could not be started: a result as a shell reports it (127, 126), with the
    /// reason on standard error.
    NotStarted {
        exit_code: i32,
        reason: Option<String>,
    },
    /// It runs; the guard kills it if the execution is dropped before its end.
    Running {
        process: ProcessStream,
        guard: KillOnDrop,
    },
    /// `Ended` was handed out.
    Done,
}

/// How reading the process stream went on.
enum Step {
    /// Some output.
    Piece(Output),
    /// The end: whether the timeout passed, or why following the command failed.
    Over(Result<bool, AgentError>),
}

impl Execution {
    /// Starts `plan` on the sandbox `live`, feeding its stdin beside the output.
    pub(super) async fn start(id: &str, live: Arc<Live>, plan: ExecPlan) -> ManagerResult<Self> {
        let oom_before = live.instance.lock().await.oom_kills();
        let began = Instant::now();
        let opts = CallOptions {
            user: plan.user,
            timeout: Some(plan.timeout),
        };
        let started = live.client.start_guarded(plan.start, opts).await;
        let phase = match started {
            Ok((process, guard)) => {
                if let Some(data) = plan.stdin {
                    feed_stdin(live.client.clone(), process.pid(), data);
                }
                Phase::Running { process, guard }
            }
            Err(e) => not_started(e)?,
        };
        Ok(Execution {
            id: id.to_owned(),
            live,
            phase,
            began,
            oom_before,
            exit_code: None,
            signal: None,
        })
    }

    /// The command's pid in the sandbox; `None` when it could not be started.
    pub(super) fn pid(&self) -> Option<u32> {
        match &self.phase {
            Phase::Running { process, .. } => Some(process.pid()),
            _ => None,
        }
    }

    /// The next piece of output, or the end; `None` after the end.
    pub(super) async fn next_output(&mut self) -> Option<Output> {
        let step = match &mut self.phase {
            Phase::Done => return None,
            Phase::NotStarted { exit_code, reason } => {
                if let Some(reason) = reason.take() {
                    return Some(Output::Stderr(reason.into_bytes()));
                }
                self.exit_code = Some(*exit_code);
                Step::Over(Ok(false))
            }
            Phase::Running { process, guard } => {
                read_step(process, guard, &mut self.exit_code, &mut self.signal).await
            }
        };
        let over = match step {
            Step::Piece(piece) => return Some(piece),
            Step::Over(over) => over,
        };
        // Dropping the phase drops its guard, which kills the command unless its end was seen.
        self.phase = Phase::Done;
        let ended = match over {
            Ok(timed_out) => Ok(self.end(timed_out).await),
            Err(e) => Err(ManagerError::Unavailable(format!(
                "sandbox {}: process stream: {e}",
                self.id
            ))),
        };
        Some(Output::Ended(ended))
    }

    async fn end(&self, timed_out: bool) -> v1::ExecEnd {
        let oom_kills = self.live.instance.lock().await.oom_kills();
        v1::ExecEnd {
            exit_code: self.exit_code,
            signal: self.signal.clone(),
            duration_ms: u64::try_from(self.began.elapsed().as_millis()).unwrap_or(u64::MAX),
            timed_out,
            oom_killed: oom_kills > self.oom_before,
        }
    }
}

/// Reads the process stream up to the next output or its end, recording how it exited.
async fn read_step(
    process: &mut ProcessStream,
    guard: &mut KillOnDrop,
    exit_code: &mut Option<i32>,
    signal: &mut Option<String>,
) -> Step {
    use process_event::data_event::Output as Data;
    loop {
        match process.next().await {
            Some(Ok(ev)) => match ev.event {
                Some(process_event::Event::Data(d)) => match d.output {
                    Some(Data::Stdout(b)) | Some(Data::Pty(b)) => {
                        return Step::Piece(Output::Stdout(b));
                    }
                    Some(Data::Stderr(b)) => return Step::Piece(Output::Stderr(b)),
                    None => {}
                },
                Some(process_event::Event::End(end)) => {
                    guard.disarm();
                    if end.exited {
                        *exit_code = Some(end.exit_code);
                    } else {
                        *signal = Some(end.status);
                    }
                }
                _ => {}
            },
            None => return Step::Over(Ok(false)),
            // The agent killed the process group when the deadline passed.
            Some(Err(e)) if e.code() == Code::DeadlineExceeded => return Step::Over(Ok(true)),
            Some(Err(e)) => return Step::Over(Err(e)),
        }
    }
}

/// Writes `data` to the command's stdin and closes it, beside the output: a command may fill
/// its output pipe before it has read all its input.
fn feed_stdin(client: AgentClient, pid: u32, data: Vec<u8>) {
    let selector = process_selector::Selector::Pid(pid);
    tokio::spawn(async move {
        for chunk in data.chunks(STDIN_CHUNK) {
            let bytes = Bytes::copy_from_slice(chunk);
            if client
                .send_input(selector.clone(), bytes, false)
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = client.close_stdin(selector).await;
    });
}

/// A command the agent could not start: a missing or unexecutable program is a result (127,
/// 126, as a shell reports it); a bad user or directory is the request's fault.
fn not_started(e: AgentError) -> ManagerResult<Phase> {
    let failed = |exit_code: i32| Phase::NotStarted {
        exit_code,
        reason: Some(format!("{e}\n")),
    };
    match e.code() {
        Code::NotFound => Ok(failed(127)),
        Code::PermissionDenied => Ok(failed(126)),
        Code::InvalidArgument | Code::Unauthenticated => Err(ManagerError::Invalid(format!(
            "cannot start the command: {e}"
        ))),
        // The sandbox's own processes fill its pids limit (or its memory): the sandbox's to
        // free, not the server's fault.
        Code::ResourceExhausted => Err(ManagerError::QuotaExceeded(format!(
            "cannot start the command: the sandbox has no room for another process (its \
             processes fill its pids or memory limit): {e}"
        ))),
        _ => Err(ManagerError::Unavailable(format!(
            "cannot start the command: {e}"
        ))),
    }
}
