//! Commands run in a sandbox: the request checked and turned into the agent's, and the
//! buffered result.

use std::time::{Duration, Instant};

use bytes::Bytes;
use moat_proto::connect::Code;
use moat_proto::process::{ProcessConfig, StartRequest, process_event, process_selector};
use moat_proto::v1;

use super::{ManagerError, ManagerResult, SandboxManager, check_env};
use crate::agent_client::{AgentError, CallOptions};

/// Output kept per stream (stdout, stderr) of a buffered exec; the rest is dropped and the
/// result marked `truncated`.
pub const EXEC_OUTPUT_LIMIT: usize = 1 << 20;
/// Timeout of an exec that names none.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest timeout an exec may ask for: a buffered call holds its HTTP request open.
pub const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(3600);
/// Chunk size for writing an exec's stdin to the agent (below its message limit).
const STDIN_CHUNK: usize = 256 << 10;

impl SandboxManager {
    /// Runs one command in the sandbox and returns its buffered result.
    pub async fn exec(
        &self,
        tenant: &str,
        id: &str,
        req: v1::ExecRequest,
    ) -> ManagerResult<v1::ExecResult> {
        let requested = Instant::now();
        let (start, stdin, timeout, user) = exec_plan(req)?;
        let live = self.inner.live_for(tenant, id).await?;
        let oom_before = live.instance.lock().await.stats().oom_kills;
        let began = Instant::now();
        let opts = CallOptions {
            user,
            timeout: Some(timeout),
        };
        let mut stream = match live.client.start(start, opts).await {
            Ok(s) => s,
            Err(e) => return start_failure(e),
        };
        let selector = process_selector::Selector::Pid(stream.pid());
        if let Some(data) = stdin {
            // Fed beside the output loop: a command may fill its output pipe before it has
            // read all its input.
            let client = live.client.clone();
            let sel = selector.clone();
            tokio::spawn(async move {
                for chunk in data.chunks(STDIN_CHUNK) {
                    let bytes = Bytes::copy_from_slice(chunk);
                    if client.send_input(sel.clone(), bytes, false).await.is_err() {
                        return;
                    }
                }
                let _ = client.close_stdin(sel).await;
            });
        }
        let mut out = Capped::default();
        let mut err = Capped::default();
        let mut result = v1::ExecResult {
            stdout: String::new(),
            stderr: String::new(),
            exit_code: None,
            signal: None,
            duration_ms: 0,
            timed_out: false,
            truncated: false,
            oom_killed: false,
        };
        loop {
            match stream.next().await {
                Some(Ok(ev)) => match ev.event {
                    Some(process_event::Event::Data(d)) => {
                        use process_event::data_event::Output;
                        match d.output {
                            Some(Output::Stdout(b)) | Some(Output::Pty(b)) => out.push(&b),
                            Some(Output::Stderr(b)) => err.push(&b),
                            None => {}
                        }
                    }
                    Some(process_event::Event::End(end)) => {
                        if end.exited {
                            result.exit_code = Some(end.exit_code);
                        } else {
                            result.signal = Some(end.status);
                        }
                    }
                    _ => {}
                },
                None => break,
                Some(Err(e)) if e.code() == Code::DeadlineExceeded => {
                    result.timed_out = true;
                    break;
                }
                Some(Err(e)) => {
                    return Err(ManagerError::Unavailable(format!(
                        "sandbox {id}: process stream: {e}"
                    )));
                }
            }
        }
        result.duration_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
        result.oom_killed = live.instance.lock().await.stats().oom_kills > oom_before;
        result.truncated = out.truncated || err.truncated;
        result.stdout = String::from_utf8_lossy(&out.data).into_owned();
        result.stderr = String::from_utf8_lossy(&err.data).into_owned();
        // Commands that ran, whatever their exit: the time a caller waited for the answer.
        self.inner.metrics.observe_exec(requested.elapsed());
        Ok(result)
    }
}

/// The agent's request, stdin, timeout and user for an exec, or why it is invalid.
#[allow(clippy::type_complexity)]
fn exec_plan(
    req: v1::ExecRequest,
) -> ManagerResult<(StartRequest, Option<Vec<u8>>, Duration, Option<String>)> {
    let (cmd, args) = match (req.cmd, req.shell) {
        (Some(argv), None) => {
            let mut it = argv.into_iter();
            let cmd = it
                .next()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| ManagerError::Invalid("cmd must name a program".into()))?;
            (cmd, it.collect::<Vec<_>>())
        }
        (None, Some(script)) => ("/bin/sh".to_owned(), vec!["-c".to_owned(), script]),
        _ => {
            return Err(ManagerError::Invalid(
                "give exactly one of cmd and shell".into(),
            ));
        }
    };
    if cmd.contains('\0') || args.iter().any(|a| a.contains('\0')) {
        return Err(ManagerError::Invalid(
            "command contains a NUL character".into(),
        ));
    }
    check_env("env", &req.env)?;
    let timeout = match req.timeout_secs {
        None => DEFAULT_EXEC_TIMEOUT,
        Some(s) if s >= 1 && s <= MAX_EXEC_TIMEOUT.as_secs() => Duration::from_secs(s),
        Some(s) => {
            return Err(ManagerError::Invalid(format!(
                "timeout_secs {s} must be 1 to {}",
                MAX_EXEC_TIMEOUT.as_secs()
            )));
        }
    };
    let stdin = req.stdin.map(String::into_bytes);
    let start = StartRequest {
        process: Some(ProcessConfig {
            cmd,
            args,
            envs: req.env.into_iter().collect(),
            cwd: req.cwd,
        }),
        pty: None,
        tag: None,
        stdin: Some(stdin.is_some()),
    };
    Ok((start, stdin, timeout, req.user))
}

/// A command the agent could not start: a missing or unexecutable program is a result (127,
/// 126, as a shell reports it); a bad user or directory is the request's fault.
fn start_failure(e: AgentError) -> ManagerResult<v1::ExecResult> {
    let failed = |code: i32, msg: String| v1::ExecResult {
        stdout: String::new(),
        stderr: msg,
        exit_code: Some(code),
        signal: None,
        duration_ms: 0,
        timed_out: false,
        truncated: false,
        oom_killed: false,
    };
    match e.code() {
        Code::NotFound => Ok(failed(127, format!("{e}\n"))),
        Code::PermissionDenied => Ok(failed(126, format!("{e}\n"))),
        Code::InvalidArgument | Code::Unauthenticated => Err(ManagerError::Invalid(format!(
            "cannot start the command: {e}"
        ))),
        _ => Err(ManagerError::Unavailable(format!(
            "cannot start the command: {e}"
        ))),
    }
}

/// Output kept up to [`EXEC_OUTPUT_LIMIT`].
#[derive(Default)]
struct Capped {
    data: Vec<u8>,
    truncated: bool,
}

impl Capped {
    fn push(&mut self, b: &[u8]) {
        let room = EXEC_OUTPUT_LIMIT - self.data.len();
        if b.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&b[..b.len().min(room)]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn exec_requests_are_checked() {
        let ok = v1::ExecRequest {
            shell: Some("echo hi".into()),
            ..Default::default()
        };
        let (start, stdin, timeout, _) = exec_plan(ok).unwrap();
        assert_eq!(start.process.unwrap().args, ["-c", "echo hi"]);
        assert!(stdin.is_none());
        assert_eq!(timeout, DEFAULT_EXEC_TIMEOUT);
        for bad in [
            v1::ExecRequest::default(),
            v1::ExecRequest {
                cmd: Some(vec![]),
                ..Default::default()
            },
            v1::ExecRequest {
                cmd: Some(vec!["ls".into()]),
                shell: Some("ls".into()),
                ..Default::default()
            },
            v1::ExecRequest {
                shell: Some("ls".into()),
                timeout_secs: Some(0),
                ..Default::default()
            },
            v1::ExecRequest {
                shell: Some("ls".into()),
                env: [("A=B".to_owned(), "c".to_owned())].into(),
                ..Default::default()
            },
        ] {
            assert!(matches!(exec_plan(bad), Err(ManagerError::Invalid(_))));
        }
    }

    #[test]
    fn output_is_capped() {
        let mut c = Capped::default();
        c.push(&vec![b'a'; EXEC_OUTPUT_LIMIT - 1]);
        assert!(!c.truncated);
        c.push(b"bc");
        assert!(c.truncated);
        assert_eq!(c.data.len(), EXEC_OUTPUT_LIMIT);
    }
}
