//! One attempt of a job: a fresh sandbox, its inputs written, its program run with standard
//! output and error going to files in the sandbox (so that all of them, not a capped buffer,
//! can be kept), those logs and its outputs kept as blobs, the sandbox destroyed, the result
//! recorded.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moat_proto::v1;
use tokio_util::sync::CancellationToken;

use super::outputs::{self, Pattern};
use super::{
    Inner, JobResult, JobSpec, MAX_JOB_LOG_BYTES, MAX_JOB_LOG_READ, MAX_JOB_OUTPUT_BYTES,
    MAX_JOB_OUTPUT_FILES, Program, SandboxManager, TAIL_BYTES, blob_error,
};
use crate::agent_client::AgentClient;
use crate::auth::{Caller, Role};
use crate::manager::ManagerError;
use crate::store::{AttemptEnd, BlobKind, JobRecord, now_ms};

/// Where the program's code goes in the sandbox.
const JOB_DIR: &str = "/tmp/moat-job";
/// Runs the program (`"$@"`) with its output in files (in `/tmp` itself, which every
/// sandbox has, so that no `mkdir` process is needed first).
const WRAPPER: &str = "exec \"$@\" >/tmp/moat-job.stdout 2>/tmp/moat-job.stderr";
/// Time the sandbox of an attempt lives beyond its timeout, for files in and out.
pub(super) const TTL_MARGIN: Duration = Duration::from_secs(300);
/// A job whose sandbox cannot be made for want of room waits before trying again: an eighth
/// of the time it has waited so far, within these bounds, so that a tenant at its quota with
/// many jobs queued does not have each claimed and put back every two seconds.
const ROOM_WAIT_MS: (i64, i64) = (2_000, 60_000);
/// How long a job may wait for room for its sandbox: then it fails with the reason (a request
/// that no room will ever fit, such as more memory than its key may have, fails then too).
const ROOM_PATIENCE_MS: i64 = 3_600_000;
/// Longest wait between two tries of recording an attempt's end (the store failing, a full
/// disk say): it is tried until it is recorded.
const RECORD_RETRY_MAX: Duration = Duration::from_secs(30);

/// How an attempt ended.
enum Outcome {
    /// It ran; its exit and what it kept.
    Ran { result: JobResult, timed_out: bool },
    /// It failed before or around its program (the error is in `result`).
    Failed(JobResult),
    /// No room for its sandbox now: try later, the attempt not counted.
    NoRoom(String),
    /// Cancelled meanwhile.
    Cancelled,
}

fn failed(error: String) -> Outcome {
    Outcome::Failed(JobResult {
        error: Some(error),
        ..JobResult::default()
    })
}

/// Runs attempt `rec.attempts` of job `rec` and records how it ended.
pub(super) async fn run(
    manager: &SandboxManager,
    inner: &Arc<Inner>,
    rec: JobRecord,
    cancel: CancellationToken,
) {
    let attempt = rec.attempts;
    let id = rec.id.clone();
    // What an earlier attempt kept goes: the job shows this attempt's result.
    if attempt > 1 {
        let job = id.clone();
        if let Ok(digests) = inner.db(move |s| s.drop_job_outputs(&job)).await {
            inner.collect_blobs(digests).await;
        }
    }
    let outcome = match serde_json::from_str::<JobSpec>(&rec.spec) {
        Ok(spec) => attempt_in_sandbox(manager, inner, &rec, &spec, &cancel).await,
        Err(e) => failed(format!("the job's recorded spec cannot be read: {e}")),
    };
    let now = now_ms();
    // How long the job has waited for room: since this server first found none for it, or
    // since it last saw another attempt of the tenant's running (whose end may make room:
    // a tenant at its own quota waits for its own jobs, however long they take).
    let waited = inner.jobs().map_or(0, |jobs| {
        let own_running = crate::manager::lock(&jobs.running)
            .iter()
            .any(|(job, a)| a.tenant == rec.tenant && *job != id);
        let mut waiting = crate::manager::lock(&jobs.waiting_for_room);
        match &outcome {
            Outcome::NoRoom(_) if own_running => {
                waiting.insert(id.clone(), now);
                0
            }
            Outcome::NoRoom(_) => now - *waiting.entry(id.clone()).or_insert(now),
            _ => {
                waiting.remove(&id);
                0
            }
        }
    });
    // Whether a failure may be retried: not a wait for room that ran out.
    let mut retryable = true;
    let (state, result, not_before) = match outcome {
        Outcome::NoRoom(why) if waited > ROOM_PATIENCE_MS => {
            if let Ok(jobs) = inner.jobs() {
                crate::manager::lock(&jobs.waiting_for_room).remove(&id);
            }
            retryable = false;
            let error = format!(
                "no room for the job's sandbox for {} minutes: {why}",
                ROOM_PATIENCE_MS / 60_000
            );
            let result = JobResult {
                error: Some(error),
                ..JobResult::default()
            };
            (v1::JobState::Failed, result, now)
        }
        Outcome::NoRoom(why) => {
            tracing::debug!(job = %id, "no room for the job's sandbox yet: {why}");
            let at = now + (waited / 8).clamp(ROOM_WAIT_MS.0, ROOM_WAIT_MS.1);
            let job = id.clone();
            let put_back = record(&id, "putting a job back in the queue", &cancel, || {
                let job = job.clone();
                inner.db(move |s| s.unclaim_job(&job, attempt, at))
            })
            .await;
            // Cancelled or deleted meanwhile: it will not wait again.
            if put_back != Some(true)
                && let Ok(jobs) = inner.jobs()
            {
                crate::manager::lock(&jobs.waiting_for_room).remove(&id);
            }
            return;
        }
        Outcome::Cancelled => {
            discard_outputs(inner, &id).await;
            return;
        }
        Outcome::Ran { result, timed_out } => {
            let state = if timed_out {
                v1::JobState::TimedOut
            } else if result.exit_code == Some(0) {
                v1::JobState::Succeeded
            } else {
                v1::JobState::Failed
            };
            (state, result, now)
        }
        Outcome::Failed(result) => (v1::JobState::Failed, result, now),
    };
    // A failure (not a timeout) with attempts left is retried after a backoff.
    let (state, not_before) =
        if state == v1::JobState::Failed && attempt < rec.max_attempts && retryable {
            let backoff = 1000i64 << (attempt.min(6) - 1);
            (v1::JobState::Queued, not_before + backoff)
        } else {
            (state, not_before)
        };
    let end = AttemptEnd {
        state,
        not_before,
        result: serde_json::to_string(&result).unwrap_or_else(|_| "{}".into()),
    };
    let recorded = record(&id, "recording a job's attempt", &cancel, || {
        let (job, end) = (id.clone(), end.clone());
        inner.db(move |s| s.finish_job_attempt(&job, attempt, &end))
    })
    .await;
    if recorded == Some(false) {
        // Cancelled or deleted meanwhile: what it kept goes.
        discard_outputs(inner, &id).await;
    }
}

/// Runs the store write `write` until it succeeds, waiting longer each time (up to
/// [`RECORD_RETRY_MAX`]): an attempt's end left unrecorded would leave its job running until
/// the next restart, its worker's place taken meanwhile. `None` when `cancel` came first (a
/// cancel, or the server stopping: the next start queues the job again).
async fn record<T, F, W>(
    id: &str,
    what: &str,
    cancel: &CancellationToken,
    mut write: W,
) -> Option<T>
where
    W: FnMut() -> F,
    F: std::future::Future<Output = crate::manager::ManagerResult<T>>,
{
    let mut wait = Duration::from_millis(100);
    loop {
        match write().await {
            Ok(done) => return Some(done),
            Err(e) => {
                tracing::warn!(job = %id, "{what} (trying again in {wait:?}): {e}");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = cancel.cancelled() => return None,
                }
                wait = (wait * 2).min(RECORD_RETRY_MAX);
            }
        }
    }
}

async fn discard_outputs(inner: &Arc<Inner>, id: &str) {
    let job = id.to_owned();
    if let Ok(digests) = inner.db(move |s| s.drop_job_outputs(&job)).await {
        inner.collect_blobs(digests).await;
    }
}

/// Makes the attempt's sandbox, runs the attempt in it unless cancelled, and destroys it.
async fn attempt_in_sandbox(
    manager: &SandboxManager,
    inner: &Arc<Inner>,
    rec: &JobRecord,
    spec: &JobSpec,
    cancel: &CancellationToken,
) -> Outcome {
    let caller = Caller {
        tenant: rec.tenant.clone(),
        key_id: rec.key_id.clone(),
        role: Role::User,
        requests_per_minute: None,
    };
    let create = v1::CreateSandbox {
        template: spec.template.clone(),
        resources: spec.resources.clone(),
        metadata: [("moat.job".to_owned(), rec.id.clone())].into(),
        timeout_secs: Some(
            Duration::from_secs(spec.timeout_secs)
                .saturating_add(TTL_MARGIN)
                .as_secs(),
        ),
        ..v1::CreateSandbox::default()
    };
    // Not cut short by a cancel: a create dropped half-way could leave its sandbox behind.
    let sandbox = match manager.create(&caller, create).await {
        Ok(s) => s,
        Err(e @ (ManagerError::QuotaExceeded(_) | ManagerError::Unavailable(_))) => {
            return Outcome::NoRoom(e.to_string());
        }
        Err(e) => return failed(format!("making the job's sandbox: {e}")),
    };
    let outcome = tokio::select! {
        o = in_sandbox(manager, inner, &caller, &sandbox.id, rec, spec), if !cancel.is_cancelled() => o,
        () = cancel.cancelled() => Outcome::Cancelled,
    };
    if let Err(e) = manager.delete(&caller, &sandbox.id).await {
        tracing::warn!(sandbox = %sandbox.id, job = %rec.id, "destroying a job's sandbox: {e}");
    }
    outcome
}

fn join(base: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{}/{path}", base.trim_end_matches('/'))
    }
}

async fn in_sandbox(
    manager: &SandboxManager,
    inner: &Arc<Inner>,
    caller: &Caller,
    sandbox: &str,
    rec: &JobRecord,
    spec: &JobSpec,
) -> Outcome {
    let Ok(jobs) = inner.jobs().cloned() else {
        return failed("jobs are off".into());
    };
    let client = match manager.agent(caller, sandbox).await {
        Ok(c) => c,
        Err(e) => return failed(format!("reaching the job's sandbox: {e}")),
    };
    // Relative paths, and the program's working directory, are the user's home unless the
    // job names a directory.
    let base = match &spec.cwd {
        Some(cwd) if cwd.starts_with('/') => cwd.clone(),
        other => match client.stat(".", None).await {
            Ok(home) => join(&home.path, other.as_deref().unwrap_or("")),
            Err(e) => return failed(format!("finding the user's home: {e}")),
        },
    };
    let base = base.trim_end_matches('/').to_owned();
    let base = if base.is_empty() {
        "/".to_owned()
    } else {
        base
    };
    for input in &spec.inputs {
        let path = join(&base, &input.path);
        let body = match jobs.blobs.read(&input.digest).await {
            Ok((_, body)) => body,
            Err(e) => return failed(format!("input {:?}: {}", input.path, blob_error(e))),
        };
        if let Err(e) = client.write_file_stream(&path, None, body).await {
            return failed(format!("writing input {path:?}: {e}"));
        }
    }
    let program: Vec<String> = match &spec.program {
        Program::Code { language, code } => {
            let (file, interpreter) = match super::super::run::interpreter(language) {
                Ok(i) => i,
                Err(e) => return failed(e.to_string()),
            };
            let path = format!("{JOB_DIR}/{file}");
            if let Err(e) = client
                .write_file(&path, Bytes::from(code.clone().into_bytes()), None)
                .await
            {
                return failed(format!("writing the job's code: {e}"));
            }
            vec![interpreter.to_owned(), path]
        }
        Program::Cmd(cmd) => cmd.clone(),
        Program::Shell(script) => vec!["/bin/sh".into(), "-c".into(), script.clone()],
    };
    let mut cmd = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        WRAPPER.to_owned(),
        "moat-job".to_owned(),
    ];
    cmd.extend(program);
    let exec = v1::ExecRequest {
        cmd: Some(cmd),
        env: spec.env.clone(),
        cwd: Some(base.clone()),
        timeout_secs: Some(spec.timeout_secs),
        ..Default::default()
    };
    let longest = Duration::from_secs(super::MAX_JOB_TIMEOUT_SECS);
    let ran = match manager.exec_up_to(caller, sandbox, exec, longest).await {
        Ok(r) => r,
        Err(e) => return failed(format!("running the job: {e}")),
    };
    let mut result = JobResult {
        exit_code: ran.exit_code,
        ..JobResult::default()
    };
    if ran.oom_killed {
        result.error = Some("a process of the job ran out of memory and was killed".into());
    } else if ran.timed_out {
        result.error = Some(format!("ran past its timeout of {} s", spec.timeout_secs));
    } else if let Some(signal) = &ran.signal {
        result.error = Some(format!("ended by {signal}"));
    } else if ran.exit_code.is_none() && !ran.stderr.is_empty() {
        // The wrapper itself could not start (no /bin/sh in the image, say).
        result.error = Some(ran.stderr.clone());
    }
    let mut log_errors = Vec::new();
    for (name, tail, blob, whole) in [
        (
            "stdout",
            &mut result.stdout_tail,
            &mut result.stdout,
            &mut result.stdout_whole,
        ),
        (
            "stderr",
            &mut result.stderr_tail,
            &mut result.stderr,
            &mut result.stderr_whole,
        ),
    ] {
        match keep_log(inner, &client, &rec.tenant, &rec.id, name).await {
            Ok(Log::Kept(kept, text)) => {
                *blob = Some(kept);
                *tail = text;
            }
            Ok(Log::Whole(text)) => {
                *tail = text;
                *whole = true;
            }
            Ok(Log::Unkept(text, e)) => {
                *tail = text;
                log_errors.push(format!("{name}: {e}"));
            }
            Err(e) => log_errors.push(format!("{name}: {e}")),
        }
    }
    for e in log_errors {
        result.note(e);
    }
    keep_outputs(inner, &client, rec, spec, &base, &mut result).await;
    result.close_list();
    Outcome::Ran {
        result,
        timed_out: ran.timed_out,
    }
}

/// A log as an attempt keeps it.
enum Log {
    /// Small and text: held whole in the job's record (no blob to write).
    Whole(String),
    /// Kept as a blob (its first [`MAX_JOB_LOG_BYTES`]), with the text of its last
    /// [`TAIL_BYTES`].
    Kept(v1::Blob, String),
    /// Too large for the record and not kept as a blob (over the quota, say): its tail, and
    /// why.
    Unkept(String, String),
}

/// Keeps the log file `name`.
async fn keep_log(
    inner: &Arc<Inner>,
    client: &AgentClient,
    tenant: &str,
    job: &str,
    name: &str,
) -> Result<Log, String> {
    let path = format!("/tmp/moat-job.{name}");
    let mut download = match client.read_file_stream(&path, None).await {
        Ok(d) => d,
        // Never made: the program did not start.
        Err(_) => return Ok(Log::Whole(String::new())),
    };
    if download.size() <= TAIL_BYTES as u64 {
        let mut data = Vec::with_capacity(TAIL_BYTES);
        while let Some(chunk) = download.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            if data.len() + chunk.len() > TAIL_BYTES {
                break;
            }
            data.extend_from_slice(&chunk);
        }
        if data.len() as u64 == download.size()
            && let Ok(text) = String::from_utf8(data)
        {
            return Ok(Log::Whole(text));
        }
        // Not text (or it grew meanwhile): read again and kept as a blob.
        download = client
            .read_file_stream(&path, None)
            .await
            .map_err(|e| e.to_string())?;
    }
    let tail = Arc::new(std::sync::Mutex::new(VecDeque::<u8>::with_capacity(
        TAIL_BYTES,
    )));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(4);
    let feeder = {
        let tail = tail.clone();
        async move {
            let (mut sent, mut read) = (0u64, 0u64);
            while read < MAX_JOB_LOG_READ
                && let Some(chunk) = download.next().await
            {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string())).await;
                        return;
                    }
                };
                read += chunk.len() as u64;
                {
                    let mut t = tail
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    t.extend(chunk.iter().copied());
                    let excess = t.len().saturating_sub(TAIL_BYTES);
                    t.drain(..excess);
                }
                // Past the limit the rest is read for the tail only.
                let room = MAX_JOB_LOG_BYTES.saturating_sub(sent);
                if room > 0 {
                    let part =
                        chunk.slice(..usize::try_from(room).unwrap_or(usize::MAX).min(chunk.len()));
                    sent += part.len() as u64;
                    // Refused part-way (the quota, the disk): read on for the true tail.
                    if tx.send(Ok(part)).await.is_err() {
                        sent = MAX_JOB_LOG_BYTES;
                    }
                }
            }
        }
    };
    let body = tokio_stream_from(rx);
    let (kept, ()) = tokio::join!(
        inner.keep_blob(tenant, BlobKind::Output, job, body, MAX_JOB_LOG_BYTES),
        feeder
    );
    let tail: Vec<u8> = tail
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .copied()
        .collect();
    let tail = String::from_utf8_lossy(&tail).into_owned();
    Ok(match kept {
        Ok(kept) => Log::Kept(kept, tail),
        Err(e) => Log::Unkept(tail, e.to_string()),
    })
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
) -> impl futures_util::Stream<Item = Result<Bytes, String>> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Keeps the files the job's output patterns name, within [`MAX_JOB_OUTPUT_FILES`] and
/// [`MAX_JOB_OUTPUT_BYTES`]; what cannot be kept is said in `result.output_errors`.
async fn keep_outputs(
    inner: &Arc<Inner>,
    client: &AgentClient,
    rec: &JobRecord,
    spec: &JobSpec,
    base: &str,
    result: &mut JobResult,
) {
    let mut seen = HashSet::new();
    let mut left = MAX_JOB_OUTPUT_BYTES;
    for text in &spec.outputs {
        let Ok(pattern) = Pattern::parse(text) else {
            continue;
        };
        let found = match outputs::find(client, &pattern, base).await {
            Ok(found) => found,
            Err(e) => {
                result.note(format!("{text}: {e}"));
                continue;
            }
        };
        if found.is_empty() {
            result.note(format!("{text}: matched no file"));
        }
        for (path, size) in found {
            if !seen.insert(path.clone()) {
                continue;
            }
            if result.outputs.len() >= MAX_JOB_OUTPUT_FILES {
                result.note(format!(
                    "{path}: not kept, a job keeps at most {MAX_JOB_OUTPUT_FILES} files"
                ));
                continue;
            }
            if !result.has_room_for(&path) {
                result.note(format!(
                    "{path}: not kept, a job's result lists at most {} KiB of outputs",
                    super::MAX_JOB_RESULT_LIST_BYTES >> 10
                ));
                continue;
            }
            if size > left {
                result.note(format!(
                    "{path}: not kept, it would take the job's outputs over {} bytes",
                    MAX_JOB_OUTPUT_BYTES
                ));
                continue;
            }
            let download = match client.read_file_stream(&path, None).await {
                Ok(d) => d,
                Err(e) => {
                    result.note(format!("{path}: {e}"));
                    continue;
                }
            };
            let body = futures_util::stream::unfold(download, |mut d| async move {
                d.next()
                    .await
                    .map(|chunk| (chunk.map_err(|e| e.to_string()), d))
            });
            match inner
                .keep_blob(&rec.tenant, BlobKind::Output, &rec.id, body, left)
                .await
            {
                Ok(blob) => {
                    left -= blob.size;
                    result.add_output(v1::JobOutput {
                        path,
                        size: blob.size,
                        digest: blob.digest,
                    });
                }
                Err(e) => result.note(format!("{path}: {e}")),
            }
        }
    }
}
