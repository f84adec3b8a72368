//! A template's `start` script (left running) and `ready` script (retried until it passes),
//! run when one of its sandboxes boots, before anyone can use it.

use std::time::{Duration, Instant};

use crate::plan::Readiness;
use moat_proto::process::{ProcessConfig, StartRequest, process_event};

use super::{ManagerError, ManagerResult};
use crate::agent_client::{AgentClient, CallOptions};

/// Pause between two tries of a `ready` script that did not pass.
const READY_RETRY: Duration = Duration::from_millis(50);
/// Tag of the `start` process, so it can be found with `Process.List`.
pub const START_TAG: &str = "moat-start";

fn shell(script: &str, tag: Option<&str>) -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            envs: Default::default(),
            cwd: None,
        }),
        pty: None,
        tag: tag.map(str::to_owned),
        stdin: Some(false),
    }
}

/// A template script the agent could not start: the template's fault when the agent says the
/// shell or its directory is missing or refused (an image without `/bin/sh`), else the
/// sandbox's.
fn script_error(which: &str, e: crate::agent_client::AgentError) -> ManagerError {
    use moat_proto::connect::Code;
    let text = format!("the template's {which} script could not start: {e}");
    match e.code() {
        Code::NotFound | Code::PermissionDenied | Code::InvalidArgument => {
            ManagerError::Conflict(text)
        }
        _ => ManagerError::Unavailable(text),
    }
}

/// Starts the plan's `start` script in the background and runs its `ready` script until it
/// exits 0, within its readiness timeout. A sandbox whose `ready` never passes fails with the
/// script's last output.
pub(super) async fn start_and_wait(
    client: &AgentClient,
    readiness: &Readiness,
) -> ManagerResult<()> {
    if let Some(script) = &readiness.start {
        // The stream is dropped: the process keeps running, its output unread.
        client
            .start(shell(script, Some(START_TAG)), CallOptions::default())
            .await
            .map_err(|e| script_error("start", e))?;
    }
    let Some(script) = &readiness.ready else {
        return Ok(());
    };
    let limit = readiness.ready_timeout;
    let deadline = Instant::now() + limit;
    // What the last run that finished said: a run cut off by the deadline says nothing useful.
    let mut last: Option<(i32, Vec<u8>)> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (code, output) = match run_once(client, script, left).await {
            Ok(run) => run,
            // A run the deadline cut off as it started (the agent answers
            // `deadline_exceeded`) says nothing: the last run that finished is the answer.
            Err(_) if Instant::now() + READY_RETRY >= deadline => (None, Vec::new()),
            Err(e) => return Err(e),
        };
        match code {
            Some(0) => return Ok(()),
            Some(c) => last = Some((c, output)),
            None => {}
        }
        if Instant::now() + READY_RETRY >= deadline {
            let said = match &last {
                Some((c, out)) => format!(
                    "last exit {c}, output {:?}",
                    String::from_utf8_lossy(out)
                        .chars()
                        .take(512)
                        .collect::<String>()
                ),
                None => "no run finished".to_owned(),
            };
            // The template's own doing: a retry of the create would fail the same way.
            return Err(ManagerError::Conflict(format!(
                "the template's ready script did not pass within {}s ({said}); fix the \
                 script or raise the template's ready_timeout_secs",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(READY_RETRY).await;
    }
}

/// One run of the `ready` script: its exit code (`None` if killed) and its first output.
async fn run_once(
    client: &AgentClient,
    script: &str,
    left: Duration,
) -> ManagerResult<(Option<i32>, Vec<u8>)> {
    let opts = CallOptions {
        user: None,
        timeout: Some(left.max(Duration::from_millis(1))),
    };
    let mut stream = client
        .start(shell(script, None), opts)
        .await
        .map_err(|e| script_error("ready", e))?;
    let mut output = Vec::new();
    let mut code = None;
    while let Some(event) = stream.next().await {
        let Ok(event) = event else {
            break;
        };
        match event.event {
            Some(process_event::Event::Data(d)) => {
                use process_event::data_event::Output;
                if let Some(Output::Stdout(b) | Output::Stderr(b) | Output::Pty(b)) = d.output
                    && output.len() < 4096
                {
                    output.extend_from_slice(&b);
                }
            }
            Some(process_event::Event::End(end)) if end.exited => code = Some(end.exit_code),
            _ => {}
        }
    }
    Ok((code, output))
}
