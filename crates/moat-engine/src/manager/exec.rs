//! Commands run in a sandbox: the request checked and turned into the agent's, the buffered
//! result and the event stream (both over one [`Execution`]).

use std::time::{Duration, Instant};

use base64::Engine as _;
use moat_proto::process::{ProcessConfig, StartRequest};
use moat_proto::v1;

use super::exec_encoding::OutputEncoder;
use super::exec_stream::ExecStream;
use super::execution::{ExecPlan, Execution, Output};
use super::{ManagerError, ManagerResult, SandboxManager, check_env};
use crate::auth::Caller;
use crate::tenant_slots::{TenantShare, TenantSlots};

/// Output kept per stream (stdout, stderr) of a buffered exec; the rest is dropped and the
/// result marked `truncated`. Exec streams have no cap.
pub const EXEC_OUTPUT_LIMIT: usize = 1 << 20;
/// Output all buffered execs of one tenant may hold at once, bytes as the commands wrote them:
/// past it an exec keeps no more (`truncated`), so that many commands printing at once cannot
/// fill the server's memory (an answer's JSON may take several times its bytes).
pub const BUFFERED_OUTPUT_PER_TENANT: usize = 64 << 20;
/// Output all buffered execs on the server may hold at once (as above).
pub const BUFFERED_OUTPUT_TOTAL: usize = 512 << 20;
/// The places of the output buffered execs hold (bytes), per tenant and in all.
pub(super) fn output_budget() -> std::sync::Arc<TenantSlots> {
    TenantSlots::new(BUFFERED_OUTPUT_PER_TENANT, Some(BUFFERED_OUTPUT_TOTAL))
}

/// Timeout of an exec that names none.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest timeout an exec may ask for: a buffered call holds its HTTP request open.
pub const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(moat_proto::v1::MAX_EXEC_TIMEOUT_SECS);

impl SandboxManager {
    /// The output bytes all buffered execs hold now.
    pub(crate) fn exec_output_held(&self) -> usize {
        self.inner.exec_output.taken_in_all()
    }

    /// Runs one command in the caller's sandbox `id` and returns its buffered result.
    pub async fn exec(
        &self,
        caller: &Caller,
        id: &str,
        req: v1::ExecRequest,
    ) -> ManagerResult<v1::ExecResult> {
        self.exec_up_to(caller, id, req, MAX_EXEC_TIMEOUT).await
    }

    /// [`SandboxManager::exec`] whose timeout may be up to `longest`: a job's own limit, which
    /// no HTTP call waits for.
    pub(crate) async fn exec_up_to(
        &self,
        caller: &Caller,
        id: &str,
        req: v1::ExecRequest,
        longest: Duration,
    ) -> ManagerResult<v1::ExecResult> {
        let requested = Instant::now();
        let encoding = req.encoding;
        let mut execution = self
            .start_execution(&caller.tenant, id, req, longest)
            .await?;
        let mut held = self.inner.exec_output.share(&caller.tenant);
        let mut out = Capped::default();
        let mut err = Capped::default();
        let end = loop {
            match execution.next_output().await {
                Some(Output::Stdout(b)) => out.push(&b, &mut held, self.metrics()),
                Some(Output::Stderr(b)) => err.push(&b, &mut held, self.metrics()),
                Some(Output::Ended(end)) => break end?,
                None => {
                    return Err(ManagerError::Internal(format!(
                        "sandbox {id}: the command's events ended without its end"
                    )));
                }
            }
        };
        // Commands that ran, whatever their exit: the time a caller waited for the answer.
        self.inner.metrics.observe_exec(requested.elapsed());
        Ok(v1::ExecResult {
            truncated: out.truncated || err.truncated,
            stdout: out.encode(encoding),
            stderr: err.encode(encoding),
            exit_code: end.exit_code,
            signal: end.signal,
            duration_ms: end.duration_ms,
            timed_out: end.timed_out,
            oom_killed: end.oom_killed,
        })
    }

    /// Starts one command in the caller's sandbox `id` and returns its events. Whatever is
    /// wrong with the request or the sandbox is an error here, before any event.
    pub async fn exec_stream(
        &self,
        caller: &Caller,
        id: &str,
        req: v1::ExecRequest,
    ) -> ManagerResult<ExecStream> {
        let encoding = req.encoding;
        let execution = self
            .start_execution(&caller.tenant, id, req, MAX_EXEC_TIMEOUT)
            .await?;
        Ok(ExecStream::new(execution, encoding))
    }

    async fn start_execution(
        &self,
        tenant: &str,
        id: &str,
        req: v1::ExecRequest,
        longest: Duration,
    ) -> ManagerResult<Execution> {
        let plan = exec_plan(req, longest)?;
        let live = self.inner.live_for(tenant, id).await?;
        // Counted until the agent has the command, so a pause waits for the start rather than
        // saving the sandbox (and cutting its connection) in the middle of it.
        let _starting = live.enter_call().ok_or_else(|| {
            ManagerError::Conflict(format!("sandbox {id} is being paused; resume it first"))
        })?;
        Execution::start(id, live.clone(), plan).await
    }
}

/// The plan of an exec whose timeout may be up to `longest`, or why it is invalid.
fn exec_plan(req: v1::ExecRequest, longest: Duration) -> ManagerResult<ExecPlan> {
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
        Some(s) if s >= 1 && s <= longest.as_secs() => Duration::from_secs(s),
        Some(s) => {
            return Err(ManagerError::Invalid(format!(
                "timeout_secs {s} must be 1 to {}",
                longest.as_secs()
            )));
        }
    };
    let stdin = match (req.stdin, req.stdin_b64) {
        (None, None) => None,
        (Some(text), None) => Some(text.into_bytes()),
        (None, Some(b64)) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| ManagerError::Invalid(format!("stdin_b64 is not base64: {e}")))?,
        ),
        (Some(_), Some(_)) => {
            return Err(ManagerError::Invalid(
                "give at most one of stdin and stdin_b64".into(),
            ));
        }
    };
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
    Ok(ExecPlan {
        start,
        stdin,
        timeout,
        user: req.user,
    })
}

/// Output kept up to [`EXEC_OUTPUT_LIMIT`].
#[derive(Default)]
struct Capped {
    data: Vec<u8>,
    truncated: bool,
}

impl Capped {
    /// Keeps what of `b` fits the stream's cap and the room `held` can grow by; the rest is
    /// counted as dropped.
    fn push(&mut self, b: &[u8], held: &mut TenantShare, metrics: &crate::metrics::Metrics) {
        let room = EXEC_OUTPUT_LIMIT - self.data.len();
        let take = held.grow(b.len().min(room));
        if take < b.len() {
            self.truncated = true;
            metrics.count_exec_output_dropped(b.len() - take);
        }
        self.data.extend_from_slice(&b[..take]);
    }

    /// The kept output as the result carries it.
    fn encode(&self, encoding: v1::OutputEncoding) -> String {
        let mut encoder = OutputEncoder::new(encoding);
        let mut text = encoder.push(&self.data);
        text.push_str(&encoder.finish());
        text
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn buffered_output_is_held_within_the_tenant_s_and_the_server_s_room() {
        let budget = output_budget();
        let mut a = budget.share("a");
        assert_eq!(
            a.grow(BUFFERED_OUTPUT_PER_TENANT - 1),
            BUFFERED_OUTPUT_PER_TENANT - 1
        );
        let mut a2 = budget.share("a");
        assert_eq!(a2.grow(10), 1, "the tenant's room is shared by its execs");
        let mut kept = Capped::default();
        let metrics = crate::metrics::Metrics::new();
        kept.push(b"more", &mut a2, &metrics);
        assert!(kept.truncated && kept.data.is_empty());
        assert!(
            metrics
                .render(&Default::default(), &[], budget.taken_in_all())
                .contains(&format!(
                    "moat_exec_output_held_bytes {BUFFERED_OUTPUT_PER_TENANT}\n\
                     # HELP moat_exec_output_dropped_bytes_total Output bytes buffered execs \
                     dropped, past a stream's cap or the tenant's budget.\n\
                     # TYPE moat_exec_output_dropped_bytes_total counter\n\
                     moat_exec_output_dropped_bytes_total 4\n"
                ))
        );
        // Other tenants have room of their own, until the server's is used up.
        let per = BUFFERED_OUTPUT_PER_TENANT;
        let others: Vec<TenantShare> = (1..BUFFERED_OUTPUT_TOTAL / per)
            .map(|i| {
                let mut h = budget.share(&format!("t{i}"));
                assert_eq!(h.grow(per), per);
                h
            })
            .collect();
        let mut late = budget.share("late");
        assert_eq!(late.grow(1), 0, "the server's room is used up");
        drop(others);
        assert_eq!(late.grow(1), 1);
        // Given back when the exec ends.
        drop((a, a2));
        let mut again = budget.share("a");
        assert_eq!(again.grow(per), per);
    }

    #[test]
    fn exec_requests_are_checked() {
        let ok = v1::ExecRequest {
            shell: Some("echo hi".into()),
            ..Default::default()
        };
        let plan = exec_plan(ok, MAX_EXEC_TIMEOUT).unwrap();
        assert_eq!(plan.start.process.unwrap().args, ["-c", "echo hi"]);
        assert!(plan.stdin.is_none());
        assert_eq!(plan.timeout, DEFAULT_EXEC_TIMEOUT);
        let binary = v1::ExecRequest {
            shell: Some("cat".into()),
            stdin_b64: Some("AP8=".into()),
            ..Default::default()
        };
        assert_eq!(
            exec_plan(binary, MAX_EXEC_TIMEOUT).unwrap().stdin.unwrap(),
            [0, 255]
        );
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
            v1::ExecRequest {
                shell: Some("cat".into()),
                stdin: Some("a".into()),
                stdin_b64: Some("YQ==".into()),
                ..Default::default()
            },
            v1::ExecRequest {
                shell: Some("cat".into()),
                stdin_b64: Some("not base64!".into()),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                exec_plan(bad, MAX_EXEC_TIMEOUT),
                Err(ManagerError::Invalid(_))
            ));
        }
    }

    #[test]
    fn output_is_capped() {
        let mut held = output_budget().share("t");
        let mut c = Capped::default();
        let metrics = crate::metrics::Metrics::new();
        c.push(&vec![b'a'; EXEC_OUTPUT_LIMIT - 1], &mut held, &metrics);
        assert!(!c.truncated);
        c.push(b"bc", &mut held, &metrics);
        assert!(c.truncated);
        assert_eq!(c.data.len(), EXEC_OUTPUT_LIMIT);
    }
}
