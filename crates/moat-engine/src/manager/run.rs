//! The one-shot mode (`POST /v1/run`): take a sandbox, write files, run, read files back,
//! destroy the sandbox, in one call.
//!
//! The output files come back inside the JSON answer, so they are held in the server's
//! memory: each file is bounded ([`MAX_RUN_OUTPUT_FILE`]), all of a run's together are
//! bounded ([`MAX_RUN_OUTPUT_TOTAL`]; a file's size is known from the agent before any of it
//! is read, so a file over what is left is reported and never read), and so are the runs at
//! once ([`MAX_CONCURRENT_RUNS`] on the server, [`MAX_CONCURRENT_RUNS_PER_TENANT`] per
//! tenant). The memory runs can hold at once is therefore bounded too.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use moat_proto::units::describe_size;
use moat_proto::v1;

use tokio_util::sync::CancellationToken;

use crate::tenant_slots::{SlotsFull, TenantSlot, TenantSlots};

use super::{DEFAULT_EXEC_TIMEOUT, ManagerError, ManagerResult, SandboxManager, to_the_end};
use crate::agent_client::AgentError;
use crate::auth::Caller;

/// Most input or output files of one run.
pub const MAX_RUN_FILES: usize = 64;
/// Largest output file returned; a bigger one is reported with an error instead.
pub const MAX_RUN_OUTPUT_FILE: u64 = 8 << 20;
/// Most bytes of output files one run returns, all files together; a file that would take
/// the run over is reported with an error instead.
pub const MAX_RUN_OUTPUT_TOTAL: u64 = 16 << 20;
/// Runs under way at once on the server; one more is refused (503, retry later).
pub const MAX_CONCURRENT_RUNS: usize = 8;
/// Runs under way at once for one tenant; one more is refused (429, retry later).
pub const MAX_CONCURRENT_RUNS_PER_TENANT: usize = 4;
/// Where the code of a run is written, in the sandbox.
const CODE_DIR: &str = "/tmp/moat-run";
/// Time the sandbox of a run lives beyond the run's own timeout, for files in and out.
const RUN_TTL_MARGIN: Duration = Duration::from_secs(60);

/// How `code` of a language is run: the file it is written to and the program for it.
pub(super) fn interpreter(language: &str) -> ManagerResult<(&'static str, &'static str)> {
    Ok(match language {
        "python" | "python3" | "py" => ("main.py", "python3"),
        "bash" => ("main.sh", "bash"),
        "sh" => ("main.sh", "sh"),
        "javascript" | "js" | "node" => ("main.js", "node"),
        other => {
            return Err(ManagerError::Invalid(format!(
                "unknown language {other:?} (known: python, bash, sh, javascript)"
            )));
        }
    })
}

impl SandboxManager {
    /// Runs `req` in a fresh sandbox of the caller's (charged to its key, if it holds one) and
    /// destroys it, whatever happened. Input is checked before a sandbox is taken.
    pub async fn run(&self, caller: &Caller, req: v1::RunRequest) -> ManagerResult<v1::RunResult> {
        let files = decode_files(&req.files)?;
        if req.output_files.len() > MAX_RUN_FILES {
            return Err(ManagerError::Invalid(format!(
                "at most {MAX_RUN_FILES} output files"
            )));
        }
        check_unique("output", req.output_files.iter().map(String::as_str))?;
        let code = match (&req.code, &req.cmd, &req.shell) {
            (Some(code), None, None) => {
                let (file, program) = interpreter(req.language.as_deref().unwrap_or("python"))?;
                let path = format!("{CODE_DIR}/{file}");
                Some((path, program, code.clone()))
            }
            (None, Some(_), None) | (None, None, Some(_)) => {
                if req.language.is_some() {
                    return Err(ManagerError::Invalid(
                        "language goes with code, not with cmd or shell".into(),
                    ));
                }
                None
            }
            _ => {
                return Err(ManagerError::Invalid(
                    "give exactly one of code, cmd and shell".into(),
                ));
            }
        };
        let exec = v1::ExecRequest {
            cmd: match &code {
                Some((path, program, _)) => Some(vec![(*program).to_owned(), path.clone()]),
                None => req.cmd.clone(),
            },
            shell: req.shell.clone(),
            stdin: req.stdin.clone(),
            env: req.env.clone(),
            cwd: req.cwd.clone(),
            user: None,
            timeout_secs: req.timeout_secs,
            ..Default::default()
        };
        let run_for = req
            .timeout_secs
            .map_or(DEFAULT_EXEC_TIMEOUT, Duration::from_secs);
        let create = v1::CreateSandbox {
            template: req
                .template
                .clone()
                .unwrap_or_else(|| v1::DEFAULT_TEMPLATE.to_owned()),
            resources: req.resources.clone(),
            env: Default::default(),
            metadata: [("moat.run".to_owned(), "true".to_owned())].into(),
            timeout_secs: Some(run_for.saturating_add(RUN_TTL_MARGIN).as_secs()),
            ..v1::CreateSandbox::default()
        };
        // The run goes on in a task of its own, so that its sandbox is destroyed whatever
        // point it had reached; a client that hangs up stops it there (the token), and its
        // slot is held until the sandbox is gone.
        let hung_up = CancellationToken::new();
        let _hang_up_on_drop = hung_up.clone().drop_guard();
        let (manager, caller) = (self.clone(), caller.clone());
        let outputs = req.output_files;
        to_the_end("run", async move {
            let _slot = enter_run(&manager.inner.runs, &caller.tenant)?;
            let sandbox = manager.create(&caller, create).await?;
            let outcome = tokio::select! {
                o = manager.run_in(&caller, &sandbox.id, files, code, exec, &outputs) => o,
                () = hung_up.cancelled() => Err(ManagerError::Unavailable(
                    "the client went away before the run ended".into(),
                )),
            };
            if let Err(e) = manager.delete(&caller, &sandbox.id).await {
                tracing::warn!(sandbox = %sandbox.id, "destroying the sandbox of a run: {e}");
            }
            let (exec, files) = outcome?;
            Ok(v1::RunResult {
                exec,
                files,
                sandbox_id: sandbox.id,
            })
        })
        .await
    }

    async fn run_in(
        &self,
        caller: &Caller,
        id: &str,
        files: Vec<(String, Bytes)>,
        code: Option<(String, &'static str, String)>,
        exec: v1::ExecRequest,
        outputs: &[String],
    ) -> ManagerResult<(v1::ExecResult, Vec<v1::OutputFile>)> {
        let client = self.agent(caller, id).await?;
        let code_file = code.map(|(path, _, source)| (path, Bytes::from(source)));
        for (path, data) in files.into_iter().chain(code_file) {
            client
                .write_file(&path, data, None)
                .await
                .map_err(|e| file_error("writing", &path, e))?;
        }
        let result = self.exec(caller, id, exec).await?;
        let mut left = MAX_RUN_OUTPUT_TOTAL;
        let mut read = Vec::with_capacity(outputs.len());
        for path in outputs {
            let file = match read_output(&client, path, &mut left).await {
                Ok(data) => v1::OutputFile {
                    path: path.clone(),
                    content_b64: Some(B64.encode(&data)),
                    error: None,
                },
                Err(error) => v1::OutputFile {
                    path: path.clone(),
                    content_b64: None,
                    error: Some(error),
                },
            };
            read.push(file);
        }
        Ok((result, read))
    }
}

/// Reads the output file `path` if it fits both the per-file limit and the `left` bytes of
/// the run's total, which it takes from `left`; otherwise why not. The size comes first, so a
/// file that does not fit is never read.
async fn read_output(
    client: &crate::agent_client::AgentClient,
    path: &str,
    left: &mut u64,
) -> Result<Vec<u8>, String> {
    let mut download = client
        .read_file_stream(path, None)
        .await
        .map_err(|e| e.to_string())?;
    let size = download.size();
    if size > MAX_RUN_OUTPUT_FILE {
        return Err(format!(
            "{} is larger than the limit of {} per output file",
            describe_size(size),
            describe_size(MAX_RUN_OUTPUT_FILE)
        ));
    }
    if size > *left {
        return Err(format!(
            "{} would take the run's output files over their total limit of {} ({} left)",
            describe_size(size),
            describe_size(MAX_RUN_OUTPUT_TOTAL),
            describe_size(*left)
        ));
    }
    // The download yields exactly `size` bytes or fails, so this never grows past `left`.
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    while let Some(chunk) = download.next().await {
        data.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
    }
    *left -= data.len() as u64;
    Ok(data)
}

/// Refuses a list of `what` paths that names one path twice.
fn check_unique<'a>(what: &str, paths: impl Iterator<Item = &'a str>) -> ManagerResult<()> {
    let mut seen = HashSet::new();
    for path in paths {
        if !seen.insert(path) {
            return Err(ManagerError::Invalid(format!(
                "{what} file {path:?} is named twice"
            )));
        }
    }
    Ok(())
}

/// The runs under way, on the server and per tenant, within [`MAX_CONCURRENT_RUNS`] and
/// [`MAX_CONCURRENT_RUNS_PER_TENANT`].
pub(super) fn run_slots() -> Arc<TenantSlots> {
    TenantSlots::new(MAX_CONCURRENT_RUNS_PER_TENANT, Some(MAX_CONCURRENT_RUNS))
}

/// A place for a run of `tenant` in `slots`, or why there is none now (the caller may retry).
fn enter_run(slots: &Arc<TenantSlots>, tenant: &str) -> ManagerResult<TenantSlot> {
    slots.enter(tenant).map_err(|full| match full {
        SlotsFull::Tenant => ManagerError::QuotaExceeded(format!(
            "at most {MAX_CONCURRENT_RUNS_PER_TENANT} one-shot runs of a tenant at once; retry later"
        )),
        SlotsFull::Server => ManagerError::Unavailable(format!(
            "the server already runs {MAX_CONCURRENT_RUNS} one-shot runs at once; retry later"
        )),
    })
}

/// The input files, decoded, or why one is invalid.
fn decode_files(files: &[v1::InputFile]) -> ManagerResult<Vec<(String, Bytes)>> {
    if files.len() > MAX_RUN_FILES {
        return Err(ManagerError::Invalid(format!(
            "at most {MAX_RUN_FILES} input files"
        )));
    }
    check_unique("input", files.iter().map(|f| f.path.as_str()))?;
    files
        .iter()
        .map(|f| {
            if f.path.is_empty() || f.path.contains('\0') {
                return Err(ManagerError::Invalid(format!(
                    "file path {:?} is empty or has a NUL",
                    f.path
                )));
            }
            let data = match (&f.content, &f.content_b64) {
                (Some(text), None) => Bytes::from(text.clone().into_bytes()),
                (None, Some(b64)) => Bytes::from(B64.decode(b64).map_err(|e| {
                    ManagerError::Invalid(format!("file {:?}: content_b64: {e}", f.path))
                })?),
                _ => {
                    return Err(ManagerError::Invalid(format!(
                        "file {:?}: give exactly one of content and content_b64",
                        f.path
                    )));
                }
            };
            Ok((f.path.clone(), data))
        })
        .collect()
}

/// A file the agent would not write: the caller's fault where the agent says so.
fn file_error(what: &str, path: &str, e: AgentError) -> ManagerError {
    use moat_proto::connect::Code;
    let text = format!("{what} {path:?}: {e}");
    match e.code() {
        // The sandbox's disk being full is the run's input being too big for it.
        Code::InvalidArgument
        | Code::NotFound
        | Code::PermissionDenied
        | Code::AlreadyExists
        | Code::Aborted
        | Code::FailedPrecondition
        | Code::ResourceExhausted => ManagerError::Invalid(text),
        _ => ManagerError::Unavailable(text),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn files_and_languages_are_checked() {
        let ok = [
            v1::InputFile {
                path: "a.txt".into(),
                content: Some("hi".into()),
                content_b64: None,
            },
            v1::InputFile {
                path: "/tmp/b".into(),
                content: None,
                content_b64: Some("AAE=".into()),
            },
        ];
        let files = decode_files(&ok).unwrap();
        assert_eq!(files[1].1.as_ref(), [0u8, 1]);
        for bad in [
            v1::InputFile {
                path: "x".into(),
                ..Default::default()
            },
            v1::InputFile {
                path: "".into(),
                content: Some("x".into()),
                content_b64: None,
            },
            v1::InputFile {
                path: "x".into(),
                content: None,
                content_b64: Some("not base64!".into()),
            },
        ] {
            assert!(decode_files(&[bad]).is_err());
        }
        assert_eq!(interpreter("python").unwrap().1, "python3");
        assert!(interpreter("cobol").is_err());
    }
}
