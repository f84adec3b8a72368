//! Asynchronous jobs (`/v1/jobs`): code and inputs in, a fresh sandbox later, outputs and
//! logs kept in the blob store.
//!
//! - **Durable:** a job and its inline inputs are written (the inputs to the blob store, the
//!   job to the database) before its submit is answered. A job a server was running when it
//!   stopped is queued again by the next one, its attempt counted ([`MAX_INTERRUPTED_ATTEMPTS`]
//!   bounds a job that keeps taking servers down). An attempt's result is recorded only if
//!   the job is still running that attempt, so a cancelled or deleted job never gets one and
//!   none is recorded twice.
//! - **Idempotent:** a submit with the key of an earlier one of the tenant returns that job
//!   (the same request) or is a conflict (another request).
//! - **Fair:** a free worker takes a job of the tenant with the fewest running (see
//!   `Store::claim_job`): one tenant's long queue does not hold another's job back.
//! - **Bounded:** workers ([`JobOptions::workers`]), unfinished jobs and stored bytes per
//!   tenant, inputs, outputs and logs per job (the constants below, SPEC.md "Job limits").

mod attempt;
mod outputs;
mod webhook;

pub use webhook::{MAX_WEBHOOK_DELIVERIES, MAX_WEBHOOK_URL, WEBHOOK_TIMEOUT};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures_util::Stream;
use futures_util::stream::BoxStream;
use moat_proto::v1;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, RwLock, watch};
use tokio_util::sync::CancellationToken;

use super::{Inner, ManagerError, ManagerResult, SandboxManager, to_the_end};
use crate::auth::Caller;
use crate::blobs::{BlobError, BlobLocation, BlobStore, is_digest};
use crate::store::{BlobKind, JobLimits, JobRecord, NewJob, Running, now_ms};
use crate::tenant_slots::TenantSlots;

/// Most bytes of a job's record of what to run (its code, command, environment and settings,
/// as JSON): a job's record is in the database, which all tenants share.
pub const MAX_JOB_SPEC_BYTES: usize = 1 << 20;
/// Input files of one job, at most.
pub const MAX_JOB_INPUTS: usize = 256;
/// Output paths or globs of one job, at most.
pub const MAX_JOB_OUTPUT_PATTERNS: usize = 64;
/// Files one job keeps, at most; more matches are reported in `output_errors`.
pub const MAX_JOB_OUTPUT_FILES: usize = 1000;
/// Bytes of output files one attempt keeps, at most, all files together.
pub const MAX_JOB_OUTPUT_BYTES: u64 = 1 << 30;
/// Bytes of each of an attempt's standard output and error kept; the rest is dropped.
pub const MAX_JOB_LOG_BYTES: u64 = 64 << 20;
/// Bytes of each log read at most, for its tail past [`MAX_JOB_LOG_BYTES`]: past this the
/// tail is that of what was read (a log bigger than any sandbox's disk is its agent's lie).
pub const MAX_JOB_LOG_READ: u64 = 16 << 30;
/// Largest blob `POST /v1/blobs` takes.
pub const MAX_BLOB_BYTES: u64 = 1 << 30;
/// Default seconds one attempt may run.
pub const DEFAULT_JOB_TIMEOUT_SECS: u64 = 600;
/// Most seconds one attempt may run.
pub const MAX_JOB_TIMEOUT_SECS: u64 = 86_400;
/// Most retries a job may ask for.
pub const MAX_JOB_RETRIES: u32 = 10;
/// Attempts after which a job that keeps being cut off by server restarts fails.
pub const MAX_INTERRUPTED_ATTEMPTS: u32 = MAX_JOB_RETRIES + 5;
/// Unfinished (queued or running) jobs one tenant may have, unless configured.
pub const DEFAULT_MAX_UNFINISHED_JOBS: u64 = 20_000;
/// Jobs one tenant may keep in any state (finished ones until deleted or past retention),
/// unless configured.
pub const DEFAULT_MAX_KEPT_JOBS: u64 = 1_000_000;
/// Bytes one tenant's jobs may keep (uploads, job inputs, outputs and logs, and the jobs'
/// records), unless configured.
pub const DEFAULT_JOB_BYTES_PER_TENANT: u64 = 10 << 30;
/// How long a finished job and its blobs are kept, unless configured.
pub const DEFAULT_JOB_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Bytes of each log tail shown with a job.
const TAIL_BYTES: usize = 4096;
/// How often housekeeping looks for objects of the blob store that no row names (and once
/// soon after start, when a crash may have left some).
const ORPHAN_SWEEP_EVERY_MS: i64 = 3_600_000;
/// Longest idempotency key.
const MAX_KEY_CHARS: usize = 256;

/// How jobs run on this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOptions {
    /// Where blobs are kept; `None` refuses jobs and blobs.
    pub blobs: Option<BlobLocation>,
    /// Attempts running at once on the server.
    pub workers: usize,
    /// Unfinished jobs one tenant may have.
    pub max_unfinished_per_tenant: u64,
    /// Jobs one tenant may keep, in any state.
    pub max_kept_per_tenant: u64,
    /// Bytes of blobs and job records one tenant may keep.
    pub bytes_per_tenant: u64,
    /// How long a finished job is kept.
    pub retention: Duration,
    /// Whether webhooks may go to private, loopback and link-local addresses (the host's
    /// own network); off unless the operator turns it on.
    pub webhooks_to_private: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            blobs: None,
            workers: default_workers(),
            max_unfinished_per_tenant: DEFAULT_MAX_UNFINISHED_JOBS,
            max_kept_per_tenant: DEFAULT_MAX_KEPT_JOBS,
            bytes_per_tenant: DEFAULT_JOB_BYTES_PER_TENANT,
            retention: DEFAULT_JOB_RETENTION,
            webhooks_to_private: false,
        }
    }
}

/// Workers unless configured: four per CPU (an attempt mostly waits on its sandbox).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get() * 4)
}

/// What a job runs, resolved at submit (its inputs as blobs), kept as its `spec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JobSpec {
    template: String,
    program: Program,
    inputs: Vec<SpecInput>,
    outputs: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    timeout_secs: u64,
    resources: Option<v1::ResourceRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Program {
    Code { language: String, code: String },
    Cmd(Vec<String>),
    Shell(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SpecInput {
    path: String,
    digest: String,
    size: u64,
}

/// What an attempt left, kept as the job's `result`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct JobResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default)]
    stdout_tail: String,
    #[serde(default)]
    stderr_tail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stdout: Option<v1::Blob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stderr: Option<v1::Blob>,
    /// The tail is the whole of standard output (small text, kept in the record).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    stdout_whole: bool,
    /// Likewise for standard error.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    stderr_whole: bool,
    #[serde(default)]
    outputs: Vec<v1::JobOutput>,
    #[serde(default)]
    output_errors: Vec<String>,
    /// Bytes `outputs` and `output_errors` list (while the attempt fills them).
    #[serde(skip)]
    listed: usize,
    /// Errors left out of `output_errors`, the list being full.
    #[serde(skip)]
    unlisted: usize,
}

/// Bytes of output paths and errors one job's result lists: past them a file is not kept,
/// and errors are counted rather than listed, so that a result (read whole by every listing
/// of jobs) stays small whatever the program left behind.
pub const MAX_JOB_RESULT_LIST_BYTES: usize = 256 << 10;
/// What an output's entry in a result takes besides its path (its digest, size and JSON).
const OUTPUT_ENTRY_BYTES: usize = 128;

/// The bytes `text` takes in a result's JSON (escapes included).
fn json_len(text: &str) -> usize {
    serde_json::to_string(text).map_or(text.len() * 6, |j| j.len())
}

impl JobResult {
    /// Lists `error`, or counts it when the list is full.
    fn note(&mut self, error: String) {
        let len = json_len(&error);
        if self.listed + len > MAX_JOB_RESULT_LIST_BYTES {
            self.unlisted += 1;
        } else {
            self.listed += len;
            self.output_errors.push(error);
        }
    }

    /// Whether an output of `path` has room in the list.
    fn has_room_for(&self, path: &str) -> bool {
        self.listed + json_len(path) + OUTPUT_ENTRY_BYTES <= MAX_JOB_RESULT_LIST_BYTES
    }

    /// Lists an output kept.
    fn add_output(&mut self, output: v1::JobOutput) {
        self.listed += json_len(&output.path) + OUTPUT_ENTRY_BYTES;
        self.outputs.push(output);
    }

    /// Ends the list of errors with how many were left out, if any.
    fn close_list(&mut self) {
        if self.unlisted > 0 {
            self.output_errors.push(format!(
                "{} more not listed: a job's result lists at most {} KiB of outputs and errors",
                self.unlisted,
                MAX_JOB_RESULT_LIST_BYTES >> 10
            ));
            self.unlisted = 0;
        }
    }
}

/// The jobs of a manager: its blob store, and the attempts running.
pub(super) struct Jobs {
    blobs: BlobStore,
    opts: JobOptions,
    /// Wakes the dispatcher: a job was queued, or a worker came free.
    wake: Notify,
    /// Attempts running, by job id.
    running: Mutex<HashMap<String, RunningAttempt>>,
    last_tenant: Mutex<String>,
    /// Held (shared) from a blob's staging until its row is recorded, and (exclusive) by
    /// collection from its check that no row names a blob to the object's deletion.
    gc: Arc<RwLock<()>>,
    /// When housekeeping last removed the objects no row names (Unix ms; 0: not yet).
    orphans_swept_at: AtomicI64,
    /// Wakes the webhook sender: a job ended.
    webhooks: Notify,
    /// Jobs whose webhook is being sent now.
    delivering: Mutex<std::collections::HashSet<String>>,
    /// Jobs whose sandbox found no room, by id: when the first such attempt ended (ms).
    waiting_for_room: Mutex<HashMap<String, i64>>,
    /// Uploads (`POST /v1/blobs`) under way, per tenant: each may write up to the tenant's
    /// room before its quota is checked again at the end.
    uploads: Arc<TenantSlots>,
}

/// Uploads of one tenant under way at once.
pub const MAX_UPLOADS_PER_TENANT: usize = 2;

struct RunningAttempt {
    tenant: String,
    cancel: CancellationToken,
    /// Which claim made it: the entry goes with its own attempt only, never with a later
    /// one of the same job claimed before the earlier one's task ended.
    claim: u64,
}

impl Jobs {
    pub(super) fn open(opts: &JobOptions) -> Result<Option<Jobs>, String> {
        let Some(location) = &opts.blobs else {
            return Ok(None);
        };
        Ok(Some(Jobs {
            blobs: BlobStore::open(location)?,
            opts: JobOptions {
                workers: opts.workers.max(1),
                ..opts.clone()
            },
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            last_tenant: Mutex::new(String::new()),
            gc: Arc::new(RwLock::new(())),
            orphans_swept_at: AtomicI64::new(0),
            webhooks: Notify::new(),
            delivering: Mutex::new(std::collections::HashSet::new()),
            waiting_for_room: Mutex::default(),
            uploads: TenantSlots::new(MAX_UPLOADS_PER_TENANT, None),
        }))
    }
}

fn blob_error(e: BlobError) -> ManagerError {
    match e {
        BlobError::TooLarge { limit } => ManagerError::TooLarge(format!(
            "the blob is larger than the limit of {}",
            moat_proto::units::describe_size(limit)
        )),
        BlobError::Body(why) => ManagerError::Invalid(why),
        BlobError::NotFound(what) => ManagerError::NotFound(format!("blob {what} not found")),
        BlobError::Store(why) => ManagerError::Unavailable(format!("blob store: {why}")),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    fn jobs(&self) -> ManagerResult<&Arc<Jobs>> {
        self.jobs.as_ref().ok_or_else(|| {
            ManagerError::Unavailable("this server keeps no blob store: jobs are off".into())
        })
    }

    /// Stores `body` as a blob `tenant` keeps as `kind` (of `job`): staged, then its quota
    /// checked, committed and recorded under the collection lock. Staging is outside the lock:
    /// a body sent slowly must not hold up every collection, and through the lock's waiting
    /// writer every other tenant's blob (staged objects are not collected: they have no
    /// digest's name yet).
    async fn keep_blob<S, E>(
        self: &Arc<Self>,
        tenant: &str,
        kind: BlobKind,
        job: &str,
        body: S,
        limit: u64,
    ) -> ManagerResult<v1::Blob>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let jobs = self.jobs()?.clone();
        // No more than the tenant has room for, nor than a local store's disk has free above
        // the server's reserve, is written at all: the quota is checked again when the blob
        // is recorded, but the bytes would be on disk by then.
        let (t, max) = (tenant.to_owned(), jobs.opts.bytes_per_tenant);
        let room = self.db(move |s| s.blob_room(&t, max)).await?;
        let over_quota = || {
            ManagerError::QuotaExceeded(format!(
                "the tenant's stored bytes (blobs and job records) would pass its quota of {}",
                moat_proto::units::describe_size(max)
            ))
        };
        if room == 0 {
            return Err(over_quota());
        }
        let free = jobs
            .blobs
            .local_free_bytes()
            .map(|free| free.saturating_sub(self.opts.min_free_disk));
        let short_of_space = || {
            ManagerError::InsufficientStorage(format!(
                "the blob store's disk has no room above the {} the server keeps free",
                moat_proto::units::describe_size(self.opts.min_free_disk)
            ))
        };
        if free == Some(0) {
            return Err(short_of_space());
        }
        let bound = room.min(free.unwrap_or(u64::MAX));
        let staged = match jobs.blobs.stage(body, limit.min(bound)).await {
            Ok(staged) => staged,
            Err(BlobError::TooLarge { .. }) if bound < limit => {
                return Err(if free.is_some_and(|f| f < room) {
                    short_of_space()
                } else {
                    over_quota()
                });
            }
            Err(e) => return Err(blob_error(e)),
        };
        let (t, j, d, size, max) = (
            tenant.to_owned(),
            job.to_owned(),
            staged.digest.clone(),
            staged.size,
            jobs.opts.bytes_per_tenant,
        );
        // Committed, then recorded, together: a row never names a missing object (a crash in
        // between leaves an object no row names, which housekeeping removes). The quota is
        // checked first, so a tenant over it leaves nothing behind.
        let inner = self.clone();
        // From here on whatever happens to the caller: a staged object is committed or
        // discarded, never left for the staging sweep.
        to_the_end("blob write", async move {
            let _gc = jobs.gc.clone().read_owned().await;
            let (tq, dq) = (t.clone(), d.clone());
            let fits = inner.db(move |s| s.blob_fits(&tq, size, max)).await;
            if let Err(e) = fits {
                jobs.blobs.discard(staged).await;
                return Err(e);
            }
            if let Err(e) = jobs.blobs.commit(&staged).await {
                jobs.blobs.discard(staged).await;
                return Err(blob_error(e));
            }
            // Refused now only if the tenant's other blobs took the room meanwhile: the
            // object stays for housekeeping, which removes objects no row names.
            inner
                .db(move |s| s.add_blob(&t, kind, &j, &dq, size, max))
                .await?;
            Ok(v1::Blob {
                digest: staged.digest,
                size: staged.size,
            })
        })
        .await
    }

    /// What job `id`, refused before it was recorded, would have kept (its inline inputs,
    /// stored first) goes.
    async fn discard_unrecorded_job(&self, id: &str) {
        let job = id.to_owned();
        if let Ok(digests) = self.db(move |s| s.drop_orphan_job_blobs_of(&job)).await {
            self.collect_blobs(digests).await;
        }
    }

    /// Deletes every object of the blob store that no row names (what a crash between a row's
    /// deletion and its object's, or between an object's commit and its row, left); how many.
    async fn sweep_orphan_blobs(&self) -> ManagerResult<usize> {
        let jobs = self.jobs()?.clone();
        let _gc = jobs.gc.write().await;
        let named = self.db(|s| s.blob_digests()).await?;
        let mut removed = 0;
        for digest in jobs.blobs.digests().await.map_err(blob_error)? {
            if named.contains(&digest) {
                continue;
            }
            match jobs.blobs.delete(&digest).await {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(%digest, "deleting a blob no record names: {e}"),
            }
        }
        Ok(removed)
    }

    /// Deletes the objects of `digests` that no row names any more.
    async fn collect_blobs(&self, digests: Vec<String>) {
        let Ok(jobs) = self.jobs() else { return };
        let _gc = jobs.gc.write().await;
        for digest in digests {
            let d = digest.clone();
            match self.db(move |s| s.blob_unused(&d)).await {
                Ok(true) => {
                    if let Err(e) = jobs.blobs.delete(&digest).await {
                        tracing::warn!(%digest, "deleting a blob: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(%digest, "checking a blob's rows: {e}"),
            }
        }
    }
}

/// The job as the API shows it.
fn to_v1(rec: &JobRecord) -> v1::Job {
    let result: JobResult = rec
        .result
        .as_deref()
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or_default();
    v1::Job {
        id: rec.id.clone(),
        state: rec.state,
        template: rec.template.clone(),
        idempotency_key: rec.idempotency_key.clone(),
        attempts: rec.attempts,
        max_attempts: rec.max_attempts,
        exit_code: result.exit_code,
        error: result.error,
        stdout_tail: result.stdout_tail,
        stderr_tail: result.stderr_tail,
        outputs: result.outputs,
        output_errors: result.output_errors,
        created_at: rec.created_at,
        started_at: rec.started_at,
        finished_at: rec.finished_at,
        webhook: None,
    }
}

fn job_result(rec: &JobRecord) -> JobResult {
    rec.result
        .as_deref()
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or_default()
}

/// A new job id: `job-` and 20 characters of `[a-z2-7]`.
fn new_job_id() -> ManagerResult<String> {
    let id = crate::store::generate_snapshot_id().map_err(ManagerError::from)?;
    Ok(format!("job-{id}"))
}

/// Checks a path of an input or an output pattern.
fn check_path(what: &str, path: &str) -> ManagerResult<()> {
    if path.is_empty() || path.contains('\0') || path.len() > 4096 {
        return Err(ManagerError::Invalid(format!(
            "{what} {path:?} is empty, too long or has a NUL"
        )));
    }
    Ok(())
}

/// Which stream of a job's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A blob being read: its size and bytes.
pub type BlobRead = (u64, BoxStream<'static, Result<Bytes, BlobError>>);

impl SandboxManager {
    /// Queues `req` as a job of the caller's; the job, and whether it is new (`false`: an
    /// earlier submit with the same idempotency key made it). `header_key` is the
    /// `Idempotency-Key` header's, which must agree with the body's if both are given.
    pub async fn submit_job(
        &self,
        caller: &Caller,
        mut req: v1::CreateJob,
        header_key: Option<String>,
    ) -> ManagerResult<(v1::Job, bool)> {
        let inner = &self.inner;
        let jobs = inner.jobs()?.clone();
        match (&req.idempotency_key, header_key) {
            (Some(a), Some(b)) if *a != b => {
                return Err(ManagerError::Invalid(
                    "the Idempotency-Key header and the body's idempotency_key differ".into(),
                ));
            }
            (None, Some(b)) => req.idempotency_key = Some(b),
            _ => {}
        }
        if let Some(key) = &req.idempotency_key
            && (key.is_empty()
                || key.chars().count() > MAX_KEY_CHARS
                || key.chars().any(char::is_control))
        {
            return Err(ManagerError::Invalid(format!(
                "idempotency key: 1 to {MAX_KEY_CHARS} characters, no control characters"
            )));
        }
        if let Some(url) = &req.webhook_url {
            webhook::check_url(url, jobs.opts.webhooks_to_private)?;
        }
        let request_sha256: [u8; 32] = Sha256::digest(
            serde_json::to_vec(&req).map_err(|e| ManagerError::Internal(e.to_string()))?,
        )
        .into();
        if let Some(found) = self.earlier_job(caller, &req, &request_sha256).await? {
            return Ok((found, false));
        }
        let spec = self.resolve_job(caller, &req).await?;
        let id = new_job_id()?;
        // Inline inputs become blobs the job keeps, before the job is recorded.
        let mut inputs = Vec::with_capacity(req.inputs.len());
        let mut spec = spec;
        for (input, resolved) in req.inputs.iter().zip(spec.inputs.iter_mut()) {
            let data = match (&input.content, &input.content_b64) {
                (Some(text), None) => Bytes::from(text.clone().into_bytes()),
                (None, Some(b64)) => Bytes::from(B64.decode(b64).map_err(|e| {
                    ManagerError::Invalid(format!("input {:?}: content_b64: {e}", input.path))
                })?),
                _ => {
                    inputs.push((resolved.digest.clone(), resolved.size));
                    continue;
                }
            };
            let blob = inner
                .keep_blob(
                    &caller.tenant,
                    BlobKind::Input,
                    &id,
                    futures_util::stream::iter([Ok::<_, std::io::Error>(data)]),
                    MAX_BLOB_BYTES,
                )
                .await?;
            resolved.digest = blob.digest.clone();
            resolved.size = blob.size;
            inputs.push((blob.digest, blob.size));
        }
        let template = spec.template.clone();
        let spec =
            serde_json::to_string(&spec).map_err(|e| ManagerError::Internal(e.to_string()))?;
        if spec.len() > MAX_JOB_SPEC_BYTES {
            inner.discard_unrecorded_job(&id).await;
            return Err(ManagerError::TooLarge(format!(
                "the job's code, command, environment and settings take {} in its record, more \
                 than the {} a job may have; send large code as an input file",
                moat_proto::units::describe_size(spec.len() as u64),
                moat_proto::units::describe_size(MAX_JOB_SPEC_BYTES as u64)
            )));
        }
        let new = NewJob {
            id: id.clone(),
            tenant: caller.tenant.clone(),
            key_id: caller.key_id.clone(),
            idempotency_key: req.idempotency_key.clone(),
            request_sha256,
            template,
            spec,
            max_attempts: req.retries.unwrap_or(0) + 1,
            webhook_url: req.webhook_url.clone(),
        };
        let limits = JobLimits {
            max_unfinished: jobs.opts.max_unfinished_per_tenant,
            max_kept: jobs.opts.max_kept_per_tenant,
            max_bytes: jobs.opts.bytes_per_tenant,
        };
        let recorded = inner
            .db(move |s| s.insert_job(&new, &inputs, &limits))
            .await;
        match recorded {
            Ok(rec) => {
                jobs.wake.notify_one();
                Ok((self.shown(&rec).await?, true))
            }
            Err(e) => {
                inner.discard_unrecorded_job(&id).await;
                // Two submits with one key at once: the other one made it.
                if matches!(e, ManagerError::Conflict(_))
                    && let Some(found) = self.earlier_job(caller, &req, &request_sha256).await?
                {
                    return Ok((found, false));
                }
                Err(e)
            }
        }
    }

    /// The caller's job with `req`'s idempotency key, if there is one: a conflict when it was
    /// made by another request.
    async fn earlier_job(
        &self,
        caller: &Caller,
        req: &v1::CreateJob,
        sha: &[u8; 32],
    ) -> ManagerResult<Option<v1::Job>> {
        let Some(key) = req.idempotency_key.clone() else {
            return Ok(None);
        };
        let tenant = caller.tenant.clone();
        let Some(found) = self
            .inner
            .db(move |s| s.job_by_idempotency_key(&tenant, &key))
            .await?
        else {
            return Ok(None);
        };
        if found.request_sha256 != sha.as_slice() {
            return Err(ManagerError::Conflict(format!(
                "idempotency key {:?} was used for another job request (job {})",
                req.idempotency_key.as_deref().unwrap_or_default(),
                found.id
            )));
        }
        Ok(Some(self.shown(&found).await?))
    }

    /// The job as the API shows one job: with its webhook.
    async fn shown(&self, rec: &JobRecord) -> ManagerResult<v1::Job> {
        let mut job = to_v1(rec);
        let id = rec.id.clone();
        if let Some(hook) = self.inner.db(move |s| s.job_webhook(&id)).await? {
            job.webhook = Some(v1::JobWebhook {
                secret: webhook::secret(&self.inner.access_key, &rec.id),
                url: hook.url,
                attempts: hook.attempts,
                delivered_at: hook.delivered_at,
                last_error: hook.last_error,
            });
        }
        Ok(job)
    }

    /// Checks `req` and resolves what it names (its template, its blobs and earlier jobs'
    /// outputs); inline inputs are left with no digest for the caller to store.
    async fn resolve_job(&self, caller: &Caller, req: &v1::CreateJob) -> ManagerResult<JobSpec> {
        let program = match (&req.code, &req.cmd, &req.shell) {
            (Some(code), None, None) => {
                let language = req.language.clone().unwrap_or_else(|| "python".into());
                super::run::interpreter(&language)?;
                Program::Code {
                    language,
                    code: code.clone(),
                }
            }
            (None, Some(cmd), None) if req.language.is_none() => {
                if cmd.is_empty() {
                    return Err(ManagerError::Invalid("cmd is empty".into()));
                }
                Program::Cmd(cmd.clone())
            }
            (None, None, Some(shell)) if req.language.is_none() => Program::Shell(shell.clone()),
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err(ManagerError::Invalid(
                    "language goes with code, not with cmd or shell".into(),
                ));
            }
            _ => {
                return Err(ManagerError::Invalid(
                    "give exactly one of code, cmd and shell".into(),
                ));
            }
        };
        if req.inputs.len() > MAX_JOB_INPUTS {
            return Err(ManagerError::Invalid(format!(
                "at most {MAX_JOB_INPUTS} inputs"
            )));
        }
        if req.outputs.len() > MAX_JOB_OUTPUT_PATTERNS {
            return Err(ManagerError::Invalid(format!(
                "at most {MAX_JOB_OUTPUT_PATTERNS} output paths or globs"
            )));
        }
        for pattern in &req.outputs {
            check_path("output", pattern)?;
            outputs::Pattern::parse(pattern)?;
        }
        // The attempt's sandbox outlives the program by a margin, to collect its outputs, and
        // lives no longer than the server's `--max-ttl`.
        let longest = MAX_JOB_TIMEOUT_SECS.min(
            self.options()
                .max_ttl
                .saturating_sub(attempt::TTL_MARGIN)
                .as_secs(),
        );
        if longest == 0 {
            return Err(ManagerError::Unavailable(format!(
                "this server's --max-ttl of {} s leaves jobs no time: a job's sandbox lives {} \
                 s past its program's timeout",
                self.options().max_ttl.as_secs(),
                attempt::TTL_MARGIN.as_secs()
            )));
        }
        // No timeout asked for: the default, or as long as the server lets a job run.
        let timeout_secs = req
            .timeout_secs
            .unwrap_or(DEFAULT_JOB_TIMEOUT_SECS.min(longest));
        if timeout_secs == 0 || timeout_secs > longest {
            return Err(ManagerError::Invalid(format!(
                "timeout_secs must be 1 to {longest}: a job's sandbox lives {} s past its \
                 program's timeout, within the server's --max-ttl of {} s",
                attempt::TTL_MARGIN.as_secs(),
                self.options().max_ttl.as_secs()
            )));
        }
        if req.retries.unwrap_or(0) > MAX_JOB_RETRIES {
            return Err(ManagerError::Invalid(format!(
                "retries must be at most {MAX_JOB_RETRIES}"
            )));
        }
        let template = req
            .template
            .clone()
            .unwrap_or_else(|| v1::DEFAULT_TEMPLATE.to_owned());
        // What every attempt would refuse is refused now: an unknown template, limits past
        // the template's, a malformed environment or working directory.
        crate::store::check_template_name(&template).map_err(ManagerError::from)?;
        let (_, _, limits) = self.inner.template(&caller.tenant, &template).await?;
        limits.resolve(req.resources.as_ref())?;
        super::check_env("env", &req.env)?;
        if let Some(cwd) = &req.cwd {
            check_path("cwd", cwd)?;
        }
        let mut seen = std::collections::HashSet::new();
        let mut inputs = Vec::with_capacity(req.inputs.len());
        for input in &req.inputs {
            check_path("input path", &input.path)?;
            if !seen.insert(input.path.as_str()) {
                return Err(ManagerError::Invalid(format!(
                    "input {:?} is named twice",
                    input.path
                )));
            }
            let given = [
                input.content.is_some(),
                input.content_b64.is_some(),
                input.blob.is_some(),
                input.job_output.is_some(),
            ];
            if given.iter().filter(|g| **g).count() != 1 {
                return Err(ManagerError::Invalid(format!(
                    "input {:?}: give exactly one of content, content_b64, blob and job_output",
                    input.path
                )));
            }
            let (digest, size) = if let Some(blob) = &input.blob {
                if !is_digest(blob) {
                    return Err(ManagerError::Invalid(format!(
                        "input {:?}: blob {blob:?} is not a digest (sha256: and 64 hex digits)",
                        input.path
                    )));
                }
                let (t, d) = (caller.tenant.clone(), blob.clone());
                let size = self
                    .inner
                    .db(move |s| s.upload_size(&t, &d))
                    .await?
                    .ok_or_else(|| {
                        ManagerError::Invalid(format!(
                            "input {:?}: no blob {blob} was uploaded (POST /v1/blobs)",
                            input.path
                        ))
                    })?;
                (blob.clone(), size)
            } else if let Some(from) = &input.job_output {
                let (t, j) = (caller.tenant.clone(), from.job.clone());
                let earlier = self
                    .inner
                    .db(move |s| s.get_job(&t, &j))
                    .await
                    .map_err(|_| {
                        ManagerError::Invalid(format!(
                            "input {:?}: no job {:?} of yours",
                            input.path, from.job
                        ))
                    })?;
                let output = job_result(&earlier)
                    .outputs
                    .into_iter()
                    .find(|o| o.path == from.path)
                    .ok_or_else(|| {
                        ManagerError::Invalid(format!(
                            "input {:?}: job {} kept no output {:?}",
                            input.path, from.job, from.path
                        ))
                    })?;
                (output.digest, output.size)
            } else {
                (String::new(), 0)
            };
            inputs.push(SpecInput {
                path: input.path.clone(),
                digest,
                size,
            });
        }
        Ok(JobSpec {
            template,
            program,
            inputs,
            outputs: req.outputs.clone(),
            env: req.env.clone(),
            cwd: req.cwd.clone(),
            timeout_secs,
            resources: req.resources.clone(),
        })
    }

    /// The caller's job `id`.
    pub async fn get_job(&self, caller: &Caller, id: &str) -> ManagerResult<v1::Job> {
        self.inner.jobs()?;
        let (t, i) = (caller.tenant.clone(), id.to_owned());
        let rec = self.inner.db(move |s| s.get_job(&t, &i)).await?;
        self.shown(&rec).await
    }

    /// The caller's jobs in `states` (all when empty), newest first, a page of at most
    /// `limit` after the cursor `after`.
    pub async fn list_jobs(
        &self,
        caller: &Caller,
        states: Vec<v1::JobState>,
        after: Option<&str>,
        limit: u32,
    ) -> ManagerResult<v1::JobList> {
        self.inner.jobs()?;
        let after = after
            .map(|a| {
                a.parse::<i64>().map_err(|_| {
                    ManagerError::Invalid(format!("cursor {a:?} is not one a page gave"))
                })
            })
            .transpose()?;
        let t = caller.tenant.clone();
        let limit = limit.clamp(1, crate::store::MAX_JOB_PAGE);
        let (page, more) = self
            .inner
            .db(move |s| s.list_jobs(&t, &states, after, limit))
            .await?;
        let next = more
            .then(|| page.last().map(|j| j.seq.to_string()))
            .flatten();
        Ok(v1::JobList {
            jobs: page.iter().map(to_v1).collect(),
            next,
        })
    }

    /// Cancels the caller's job `id`: a queued one never runs, a running one's sandbox is
    /// destroyed. One already over is a conflict.
    pub async fn cancel_job(&self, caller: &Caller, id: &str) -> ManagerResult<v1::Job> {
        let jobs = self.inner.jobs()?.clone();
        let (t, i) = (caller.tenant.clone(), id.to_owned());
        let before = self.inner.db(move |s| s.get_job(&t, &i)).await?;
        if before.state.is_final() {
            return Err(ManagerError::Conflict(format!(
                "job {id} is already over ({})",
                before.state.as_str()
            )));
        }
        let (inner, t, i) = (self.inner.clone(), caller.tenant.clone(), id.to_owned());
        // The attempt is told in the same task as the record is written: a cancel recorded
        // but not told would hold a sandbox and a worker until the job's own timeout.
        let rec = to_the_end("job cancel", async move {
            let rec = inner.db(move |s| s.cancel_job(&t, &i)).await?;
            if let Some(attempt) = lock(&jobs.running).get(&rec.id) {
                attempt.cancel.cancel();
            }
            lock(&jobs.waiting_for_room).remove(&rec.id);
            jobs.webhooks.notify_one();
            Ok(rec)
        })
        .await?;
        self.shown(&rec).await
    }

    /// Deletes the caller's job `id` and the blobs it kept; a job not over is cancelled first.
    pub async fn delete_job(&self, caller: &Caller, id: &str) -> ManagerResult<()> {
        let (t, i) = (caller.tenant.clone(), id.to_owned());
        let rec = self.inner.db(move |s| s.get_job(&t, &i)).await?;
        // No webhook of a deleted job, not even of the cancel below.
        let (t, i) = (caller.tenant.clone(), id.to_owned());
        self.inner.db(move |s| s.forget_webhook(&t, &i)).await?;
        if !rec.state.is_final() {
            match self.cancel_job(caller, id).await {
                Ok(_) | Err(ManagerError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let (inner, t, i) = (self.inner.clone(), caller.tenant.clone(), id.to_owned());
        to_the_end("job delete", async move {
            let digests = inner.db(move |s| s.delete_job(&t, &i)).await?;
            inner.collect_blobs(digests).await;
            Ok(())
        })
        .await
    }

    /// The whole of the caller's job `id`'s standard output or error, as its last attempt
    /// left it.
    pub async fn job_log(
        &self,
        caller: &Caller,
        id: &str,
        which: LogStream,
    ) -> ManagerResult<BlobRead> {
        let jobs = self.inner.jobs()?.clone();
        let (t, i) = (caller.tenant.clone(), id.to_owned());
        let rec = self.inner.db(move |s| s.get_job(&t, &i)).await?;
        let result = job_result(&rec);
        let (blob, whole, tail) = match which {
            LogStream::Stdout => (result.stdout, result.stdout_whole, result.stdout_tail),
            LogStream::Stderr => (result.stderr, result.stderr_whole, result.stderr_tail),
        };
        match blob {
            Some(blob) => jobs.blobs.read(&blob.digest).await.map_err(blob_error),
            None if whole => {
                let data = Bytes::from(tail.into_bytes());
                Ok((
                    data.len() as u64,
                    Box::pin(futures_util::stream::iter([Ok(data)])),
                ))
            }
            None => Ok((0, Box::pin(futures_util::stream::empty()))),
        }
    }

    /// The output `path` the caller's job `id` kept.
    pub async fn job_output(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
    ) -> ManagerResult<BlobRead> {
        let jobs = self.inner.jobs()?.clone();
        let (t, i) = (caller.tenant.clone(), id.to_owned());
        let rec = self.inner.db(move |s| s.get_job(&t, &i)).await?;
        let wanted = path;
        let output = job_result(&rec)
            .outputs
            .into_iter()
            .find(|o| o.path == wanted)
            .ok_or_else(|| ManagerError::NotFound(format!("job {id} kept no output {wanted:?}")))?;
        jobs.blobs.read(&output.digest).await.map_err(blob_error)
    }

    /// Stores `body` as a blob the caller keeps, for jobs' inputs.
    pub async fn upload_blob<S, E>(&self, caller: &Caller, body: S) -> ManagerResult<v1::Blob>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let jobs = self.inner.jobs()?.clone();
        let _upload = jobs.uploads.enter(&caller.tenant).map_err(|_| {
            ManagerError::QuotaExceeded(format!(
                "the tenant has {MAX_UPLOADS_PER_TENANT} uploads under way already; retry when \
                 one is done"
            ))
        })?;
        self.inner
            .keep_blob(&caller.tenant, BlobKind::Upload, "", body, MAX_BLOB_BYTES)
            .await
    }

    /// Deletes the caller's upload `digest` (jobs that name it keep it until they go).
    pub async fn delete_blob(&self, caller: &Caller, digest: &str) -> ManagerResult<()> {
        self.inner.jobs()?;
        let (inner, t, d) = (self.inner.clone(), caller.tenant.clone(), digest.to_owned());
        to_the_end("blob delete", async move {
            let digest = d.clone();
            if !inner.db(move |s| s.delete_upload(&t, &d)).await? {
                return Err(ManagerError::NotFound(format!("blob {digest} not found")));
            }
            inner.collect_blobs(vec![digest]).await;
            Ok(())
        })
        .await
    }

    /// At start-up: queues again the jobs a previous server was running. How many were
    /// queued again, and how many failed for having been cut off too often.
    pub async fn recover_jobs(&self) -> ManagerResult<(u64, u64)> {
        if self.inner.jobs.is_none() {
            return Ok((0, 0));
        }
        self.inner
            .db(|s| s.requeue_interrupted_jobs(MAX_INTERRUPTED_ATTEMPTS))
            .await
    }

    /// Runs queued jobs until `stop` turns true: one attempt per free worker, fairly between
    /// tenants, each in a task of its own. Attempts under way when it stops are cancelled;
    /// their jobs stay recorded running, and the next server queues them again.
    pub async fn run_jobs(&self, mut stop: watch::Receiver<bool>) {
        let Ok(jobs) = self.inner.jobs().cloned() else {
            return;
        };
        let mut tasks = tokio::task::JoinSet::new();
        let mut claims: u64 = 0;
        let webhooks = {
            let (manager, jobs, stop) = (self.clone(), jobs.clone(), stop.clone());
            tokio::spawn(async move { manager.run_webhooks(jobs, stop).await })
        };
        loop {
            while lock(&jobs.running).len() < jobs.opts.workers {
                let running = Running {
                    per_tenant: lock(&jobs.running)
                        .values()
                        .fold(HashMap::new(), |mut m, a| {
                            *m.entry(a.tenant.clone()).or_default() += 1;
                            m
                        }),
                    last_tenant: lock(&jobs.last_tenant).clone(),
                    per_tenant_cap: (jobs.opts.workers > 1).then(|| jobs.opts.workers - 1),
                };
                let now = now_ms();
                let claimed = self.inner.db(move |s| s.claim_job(now, &running)).await;
                let rec = match claimed {
                    Ok(Some(rec)) => rec,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("taking a queued job: {e}");
                        break;
                    }
                };
                lock(&jobs.last_tenant).clone_from(&rec.tenant);
                let cancel = CancellationToken::new();
                claims += 1;
                let claim = claims;
                lock(&jobs.running).insert(
                    rec.id.clone(),
                    RunningAttempt {
                        tenant: rec.tenant.clone(),
                        cancel: cancel.clone(),
                        claim,
                    },
                );
                let inner = self.inner.clone();
                let manager = self.clone();
                let jobs = jobs.clone();
                tasks.spawn(async move {
                    let id = rec.id.clone();
                    // A cancel (or delete) recorded after the claim but before the attempt
                    // was in `running` found nothing to tell: read the record again now that
                    // it is there (a cancel from now on finds it).
                    let (t, i) = (rec.tenant.clone(), id.clone());
                    let gone = match inner.db(move |s| s.get_job(&t, &i)).await {
                        Ok(now) => now.state != v1::JobState::Running,
                        Err(ManagerError::NotFound(_)) => true,
                        // Not known: the attempt runs, and a cancel found it in `running`.
                        Err(_) => false,
                    };
                    if !gone {
                        attempt::run(&manager, &inner, rec, cancel).await;
                    }
                    {
                        let mut running = lock(&jobs.running);
                        if running.get(&id).is_some_and(|a| a.claim == claim) {
                            running.remove(&id);
                        }
                    }
                    jobs.wake.notify_one();
                    jobs.webhooks.notify_one();
                });
            }
            while tasks.try_join_next().is_some() {}
            let now = now_ms();
            let next = self
                .inner
                .db(move |s| s.next_job_time(now))
                .await
                .ok()
                .flatten();
            let nap = next.map_or(Duration::from_secs(5), |at| {
                Duration::from_millis(u64::try_from(at - now).unwrap_or(0).clamp(1, 5000))
            });
            tokio::select! {
                () = jobs.wake.notified() => {}
                () = tokio::time::sleep(nap) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        for attempt in lock(&jobs.running).values() {
            attempt.cancel.cancel();
        }
        while tasks.join_next().await.is_some() {}
        let _ = webhooks.await;
    }

    /// Housekeeping of jobs: deletes those that ended longer ago than their retention, with
    /// their blobs, and what a submit or an attempt cut off left. How many jobs went.
    pub(super) async fn housekeep_jobs(&self, now: i64) -> ManagerResult<usize> {
        let Ok(jobs) = self.inner.jobs().cloned() else {
            return Ok(0);
        };
        let before = now.saturating_sub(super::ms(jobs.opts.retention));
        let old = self
            .inner
            .db(move |s| s.jobs_ended_before(before, 1000))
            .await?;
        let count = old.len();
        for (tenant, id) in old {
            let (t, i) = (tenant.clone(), id.clone());
            match self.inner.db(move |s| s.delete_job(&t, &i)).await {
                Ok(digests) => self.inner.collect_blobs(digests).await,
                Err(e) => tracing::warn!(job = %id, "deleting an old job: {e}"),
            }
        }
        let hour = now.saturating_sub(3_600_000);
        if let Ok(digests) = self.inner.db(move |s| s.drop_orphan_job_blobs(hour)).await {
            self.inner.collect_blobs(digests).await;
        }
        if let Err(e) = jobs.blobs.sweep_staged(Duration::from_secs(3600)).await {
            tracing::warn!("sweeping staged blobs: {e}");
        }
        let last = jobs.orphans_swept_at.load(Ordering::SeqCst);
        if last == 0 || now.saturating_sub(last) >= ORPHAN_SWEEP_EVERY_MS {
            jobs.orphans_swept_at.store(now.max(1), Ordering::SeqCst);
            match self.inner.sweep_orphan_blobs().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(blobs = n, "removed blobs no record names"),
                Err(e) => tracing::warn!("sweeping blobs no record names: {e}"),
            }
        }
        Ok(count)
    }
}

impl From<BlobError> for ManagerError {
    fn from(e: BlobError) -> Self {
        blob_error(e)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_result_lists_outputs_and_errors_within_its_bound() {
        let mut result = JobResult::default();
        let path = format!("/home/user/{}", "d/".repeat(1000));
        let mut kept = 0;
        while result.has_room_for(&path) {
            result.add_output(v1::JobOutput {
                path: path.clone(),
                size: 0,
                digest: String::new(),
            });
            kept += 1;
        }
        assert!(kept > 10 && kept < 200, "{kept}");
        for _ in 0..1000 {
            result.note(format!("{path}: not kept"));
        }
        result.close_list();
        let text = serde_json::to_string(&result).unwrap();
        assert!(
            text.len() < MAX_JOB_RESULT_LIST_BYTES + 16 * 1024,
            "{} bytes",
            text.len()
        );
        let last = result.output_errors.last().unwrap();
        assert!(last.starts_with("1000 more not listed") || last.contains("more not listed"));
    }
}
