//! Code run by the server itself in a sandbox's code interpreter (the agent's
//! `/interpreter/execute`, which E2B's `run_code` reaches through the sandbox proxy): for front
//! ends that answer in one piece, such as MCP's `run_code`. The language's default context
//! keeps its state between runs, as `run_code` does.
//!
//! What comes back is bounded ([`MAX_CODE_RUN_BYTES`] in all: output past it is dropped and
//! the run marked truncated), and so is the time ([`CodeRunRequest::timeout`]): a run past it
//! is abandoned, which interrupts it (the interpreter stops an execution whose client left).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use moat_proto::connect::Code;
use serde_json::{Map, Value, json};

use super::{ManagerError, ManagerResult, SandboxManager};
use crate::agent_client::AgentError;
use crate::auth::Caller;

/// Most bytes of output, results and error a run returns, all together.
pub const MAX_CODE_RUN_BYTES: usize = 8 << 20;

/// What to run.
#[derive(Debug, Clone)]
pub struct CodeRunRequest {
    /// The source.
    pub code: String,
    /// Its language (`python`, `javascript`, `bash`, …); python when `None`.
    pub language: Option<String>,
    /// Longest the run may take.
    pub timeout: Duration,
}

/// The error a run raised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRunError {
    /// Its name (`ValueError`).
    pub name: String,
    /// Its message.
    pub value: String,
    /// Its traceback.
    pub traceback: String,
}

/// How a run went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CodeRun {
    /// What it printed.
    pub stdout: String,
    /// What it printed on standard error.
    pub stderr: String,
    /// Its rich results, as the interpreter sends them (`text`, `html`, `markdown`, `png`,
    /// `jpeg`, `svg`, `json`, `chart`, …; images base64), the main result among them.
    pub results: Vec<Map<String, Value>>,
    /// The error it raised, if it did.
    pub error: Option<CodeRunError>,
    /// Output past [`MAX_CODE_RUN_BYTES`] was dropped.
    pub truncated: bool,
    /// It ran past its timeout and was abandoned.
    pub timed_out: bool,
}

impl CodeRun {
    /// Takes one line of the interpreter's NDJSON stream; `false` at its end.
    fn take(&mut self, line: &[u8], used: &mut usize) -> bool {
        let Ok(Value::Object(event)) = serde_json::from_slice::<Value>(line) else {
            return true;
        };
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        if kind == "end_of_execution" {
            return false;
        }
        let size = line.len();
        if *used + size > MAX_CODE_RUN_BYTES {
            self.truncated = true;
            return true;
        }
        *used += size;
        let text = |key: &str| {
            event
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        match kind {
            "stdout" => self.stdout.push_str(&text("text")),
            "stderr" => self.stderr.push_str(&text("text")),
            "result" => {
                let mut result = event.clone();
                result.remove("type");
                self.results.push(result);
            }
            "error" if self.error.is_none() => {
                self.error = Some(CodeRunError {
                    name: text("name"),
                    value: text("value"),
                    traceback: text("traceback"),
                });
            }
            _ => {}
        }
        true
    }
}

/// What a refused or failed start of a run stands for: the caller's fault where the
/// interpreter says so (a 4xx), else the sandbox's.
fn interpreter_error(id: &str, e: &AgentError) -> ManagerError {
    match e {
        AgentError::Rpc {
            code:
                Code::InvalidArgument
                | Code::NotFound
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::AlreadyExists
                | Code::PermissionDenied,
            message,
        } => ManagerError::Invalid(format!("the code interpreter refused the run: {message}")),
        e => ManagerError::Unavailable(format!("sandbox {id}'s code interpreter: {e}")),
    }
}

impl SandboxManager {
    /// Runs `req` in the code interpreter of the caller's running sandbox `id`.
    pub async fn run_in_interpreter(
        &self,
        caller: &Caller,
        id: &str,
        req: CodeRunRequest,
    ) -> ManagerResult<CodeRun> {
        let agent = self.agent(caller, id).await?;
        let body = json!({
            "code": req.code,
            "context_id": null,
            "language": req.language,
            "env_vars": null,
        });
        let request = Bytes::from(body.to_string());
        let token = self.access_token(id);
        let mut run = CodeRun::default();
        let work = async {
            let mut body = agent
                .interpreter_execute(&token, request)
                .await
                .map_err(|e| interpreter_error(id, &e))?;
            let mut pending: Vec<u8> = Vec::new();
            // Bytes of `pending` already searched for a newline: each byte is searched once,
            // however the answer is cut into frames.
            let mut searched = 0;
            let mut used = 0;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    ManagerError::Unavailable(format!("reading the code interpreter: {e}"))
                })?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                pending.extend_from_slice(&data);
                let mut start = 0;
                while let Some(at) = pending[searched..].iter().position(|b| *b == b'\n') {
                    let end = searched + at;
                    if !run.take(pending[start..end].trim_ascii(), &mut used) {
                        return Ok(());
                    }
                    start = end + 1;
                    searched = start;
                }
                pending.drain(..start);
                searched = pending.len();
                // A line longer than the whole bound is dropped rather than held.
                if pending.len() > MAX_CODE_RUN_BYTES {
                    pending.clear();
                    searched = 0;
                    run.truncated = true;
                }
            }
            if !pending.is_empty() {
                run.take(pending.trim_ascii(), &mut used);
            }
            Ok(())
        };
        match tokio::time::timeout(req.timeout, work).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => run.timed_out = true,
        }
        Ok(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_taken_and_bounded() {
        let mut run = CodeRun::default();
        let mut used = 0;
        for line in [
            r#"{"type":"stdout","text":"a\n","timestamp":"x"}"#,
            r#"{"type":"result","text":"42","is_main_result":true}"#,
            r#"{"type":"error","name":"E","value":"v","traceback":"t"}"#,
            r#"{"type":"error","name":"second","value":"","traceback":""}"#,
            "not json",
        ] {
            assert!(run.take(line.as_bytes(), &mut used));
        }
        assert!(!run.take(br#"{"type":"end_of_execution"}"#, &mut used));
        assert_eq!(run.stdout, "a\n");
        assert_eq!(run.results[0]["text"], "42");
        assert_eq!(run.error.as_ref().map(|e| e.name.as_str()), Some("E"));
        let mut used = MAX_CODE_RUN_BYTES - 5;
        assert!(run.take(br#"{"type":"stdout","text":"more"}"#, &mut used));
        assert!(run.truncated && run.stdout == "a\n");
    }
}
