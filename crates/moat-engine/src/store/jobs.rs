//! Jobs and the blobs they keep.
//!
//! A job is recorded (with its inputs' blob rows) in one transaction before its submit is
//! answered. Its `spec` and `result` are the engine's JSON, opaque here. Its state moves
//! `queued → running → queued` (a retry) `… → succeeded | failed | timed_out`, or to
//! `cancelled` from `queued` or `running`; an attempt ends with [`Store::finish_job_attempt`],
//! which does nothing when the job is no longer that attempt's (cancelled or deleted meanwhile),
//! so a result is never recorded twice or over a cancel.
//!
//! Blob rows say who keeps a blob: an `upload` of its tenant, or a job's `input` or `output`.
//! The object in the blob store may go once no row names its digest ([`Store::blob_unused`]).

use std::collections::HashMap;

use moat_proto::v1::JobState;
use rusqlite::{OptionalExtension, Row, Transaction, params};

use super::error::{StoreError, StoreResult};
use super::ids::check_tenant_id;
use super::tenants::require_tenant;
use super::{Store, first_row, now_ms};

/// What one tenant's jobs may take, checked as a job is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Jobs queued or running.
    pub max_unfinished: u64,
    /// Jobs kept in any state (finished ones stay until deleted or past retention).
    pub max_kept: u64,
    /// Bytes of blobs and job records (spec and result) kept.
    pub max_bytes: u64,
}

/// A job to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Its id.
    pub id: String,
    /// Its owner.
    pub tenant: String,
    /// The key that submitted it, whose quotas its sandboxes count against.
    pub key_id: Option<String>,
    /// The caller's idempotency key.
    pub idempotency_key: Option<String>,
    /// SHA-256 of the request, to tell a repeated submit from another one with the same key.
    pub request_sha256: [u8; 32],
    /// The template its sandboxes are made from.
    pub template: String,
    /// The engine's JSON of what to run.
    pub spec: String,
    /// Most attempts.
    pub max_attempts: u32,
    /// Where its completion webhook goes, if it has one.
    pub webhook_url: Option<String>,
}

/// A recorded job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Its order of submission, unique.
    pub seq: i64,
    /// Its id.
    pub id: String,
    /// Its owner.
    pub tenant: String,
    /// The key that submitted it.
    pub key_id: Option<String>,
    /// The caller's idempotency key.
    pub idempotency_key: Option<String>,
    /// SHA-256 of the request.
    pub request_sha256: Vec<u8>,
    /// Its template.
    pub template: String,
    /// The engine's JSON of what to run.
    pub spec: String,
    /// Where it is.
    pub state: JobState,
    /// Attempts started.
    pub attempts: u32,
    /// Most attempts.
    pub max_attempts: u32,
    /// A queued job waits until then (a retry's backoff), Unix milliseconds.
    pub not_before: i64,
    /// When it was submitted.
    pub created_at: i64,
    /// When its last attempt started.
    pub started_at: Option<i64>,
    /// When it ended.
    pub finished_at: Option<i64>,
    /// The engine's JSON of its last attempt's result.
    pub result: Option<String>,
}

impl JobRecord {
    fn from_row(row: &Row<'_>) -> StoreResult<Self> {
        let state: String = row.get("state")?;
        let count = |name: &str| -> StoreResult<u32> {
            let n: i64 = row.get(name)?;
            u32::try_from(n).map_err(|_| StoreError::Corrupt(format!("job {name} {n}")))
        };
        Ok(JobRecord {
            seq: row.get("seq")?,
            id: row.get("id")?,
            tenant: row.get("tenant_id")?,
            key_id: row.get("key_id")?,
            idempotency_key: row.get("idempotency_key")?,
            request_sha256: row.get("request_sha256")?,
            template: row.get("template")?,
            spec: row.get("spec")?,
            state: JobState::from_name(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("job state {state:?}")))?,
            attempts: count("attempts")?,
            max_attempts: count("max_attempts")?,
            not_before: row.get("not_before")?,
            created_at: row.get("created_at")?,
            started_at: row.get("started_at")?,
            finished_at: row.get("finished_at")?,
            result: row.get("result")?,
        })
    }
}

/// Who keeps a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// Its tenant uploaded it.
    Upload,
    /// A job writes it into its sandboxes.
    Input,
    /// A job kept it (an output file or a log).
    Output,
}

impl BlobKind {
    fn as_str(self) -> &'static str {
        match self {
            BlobKind::Upload => "upload",
            BlobKind::Input => "input",
            BlobKind::Output => "output",
        }
    }
}

/// How an attempt ended, for [`Store::finish_job_attempt`].
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptEnd {
    /// The job's state from now on: final, or `Queued` for a retry.
    pub state: JobState,
    /// A retry waits until then.
    pub not_before: i64,
    /// The engine's JSON of the attempt's result.
    pub result: String,
}

/// What [`Store::claim_job`] picks from.
#[derive(Debug, Clone, Default)]
pub struct Running {
    /// Attempts running now, per tenant.
    pub per_tenant: HashMap<String, usize>,
    /// The tenant served last: among tenants with as few running, the next after it goes.
    pub last_tenant: String,
    /// Most attempts one tenant may run at once (`None`: no bound): the workers less one, so
    /// another tenant's job always finds a worker however long the first tenant's jobs run.
    pub per_tenant_cap: Option<usize>,
}

/// Most rows of one page of jobs.
pub const MAX_JOB_PAGE: u32 = 1000;
/// Bytes of results one page of jobs holds: a page ends early (at least one job) once its
/// results pass this, so a listing's memory stays bounded whatever the jobs recorded.
pub const MAX_JOB_PAGE_BYTES: usize = 8 << 20;

const STATE_FINAL_SQL: &str = "('succeeded', 'failed', 'cancelled', 'timed_out')";

fn get_job(tx: &Transaction<'_>, tenant: &str, id: &str) -> StoreResult<JobRecord> {
    first_row(
        &mut *tx.prepare_cached("SELECT * FROM jobs WHERE id = ?1 AND tenant_id = ?2")?,
        params![id, tenant],
        JobRecord::from_row,
    )?
    .ok_or_else(|| StoreError::not_found("job", id))
}
/// Refuses `size` more bytes of `tenant`'s blobs over `max_bytes`.
fn check_blob_room(
    tx: &Transaction<'_>,
    tenant: &str,
    size: u64,
    max_bytes: u64,
) -> StoreResult<()> {
    let used = stored_bytes(tx, tenant)?;
    if used.saturating_add(size) > max_bytes {
        return Err(StoreError::QuotaExceeded {
            what: "stored bytes (blobs and job records)",
            limit: max_bytes,
            used,
            requested: size,
        });
    }
    Ok(())
}

/// The bytes `tenant` stores: its blobs and its job records.
fn stored_bytes(tx: &Transaction<'_>, tenant: &str) -> StoreResult<u64> {
    require_tenant(tx, tenant)?;
    Ok(blob_bytes(tx, tenant)?.saturating_add(job_usage(tx, tenant)?.bytes))
}

/// What a tenant's jobs keep in the database (the `job_usage` row the triggers keep).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobUsage {
    /// Jobs kept, in any state.
    pub jobs: u64,
    /// Bytes of their recorded specs and results.
    pub bytes: u64,
}

fn job_usage(tx: &Transaction<'_>, tenant: &str) -> StoreResult<JobUsage> {
    let row: Option<(i64, i64)> = tx
        .prepare_cached("SELECT jobs, bytes FROM job_usage WHERE tenant_id = ?1")?
        .query_row([tenant], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let (jobs, bytes) = row.unwrap_or_default();
    Ok(JobUsage {
        jobs: u64::try_from(jobs).unwrap_or_default(),
        bytes: u64::try_from(bytes).unwrap_or_default(),
    })
}

fn blob_bytes(tx: &Transaction<'_>, tenant: &str) -> StoreResult<u64> {
    let n: i64 = tx
        .prepare_cached("SELECT coalesce(sum(size), 0) FROM blobs WHERE tenant_id = ?1")?
        .query_row([tenant], |row| row.get(0))?;
    Ok(u64::try_from(n).unwrap_or_default())
}

fn insert_blob_row(
    tx: &Transaction<'_>,
    tenant: &str,
    kind: BlobKind,
    job: &str,
    digest: &str,
    size: u64,
) -> StoreResult<()> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO blobs (tenant_id, kind, job_id, digest, size, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        tenant,
        kind.as_str(),
        job,
        digest,
        i64::try_from(size).unwrap_or(i64::MAX),
        now_ms()
    ])?;
    Ok(())
}

/// Deletes the rows `job` keeps of `kind` (all kinds when `None`); the digests they named.
fn delete_job_rows(
    tx: &Transaction<'_>,
    job: &str,
    kind: Option<BlobKind>,
) -> StoreResult<Vec<String>> {
    let kind = kind.map(BlobKind::as_str);
    let digests = tx
        .prepare_cached(
            "DELETE FROM blobs WHERE job_id = ?1 AND (?2 IS NULL OR kind = ?2) RETURNING digest",
        )?
        .query_map(params![job, kind], |row| row.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(digests)
}

/// Makes job `id`'s webhook due now, if it has one not sent yet.
fn arm_webhook(tx: &Transaction<'_>, id: &str) -> StoreResult<()> {
    tx.prepare_cached(
        "UPDATE job_webhooks SET next_at = ?2 WHERE job_id = ?1 AND next_at IS NULL \
         AND delivered_at IS NULL AND attempts = 0",
    )?
    .execute(params![id, now_ms()])?;
    Ok(())
}

/// A job's completion webhook as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    /// Its job.
    pub job_id: String,
    /// The job's tenant.
    pub tenant: String,
    /// Where it goes.
    pub url: String,
    /// Deliveries tried.
    pub attempts: u32,
    /// When the next delivery is due; `None` when none is (not over, delivered, given up).
    pub next_at: Option<i64>,
    /// When a delivery was answered 2xx.
    pub delivered_at: Option<i64>,
    /// Why the last delivery failed.
    pub last_error: Option<String>,
}

impl WebhookRecord {
    fn from_row(row: &Row<'_>) -> StoreResult<Self> {
        let attempts: i64 = row.get("attempts")?;
        Ok(WebhookRecord {
            job_id: row.get("job_id")?,
            tenant: row.get("tenant_id")?,
            url: row.get("url")?,
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            next_at: row.get("next_at")?,
            delivered_at: row.get("delivered_at")?,
            last_error: row.get("last_error")?,
        })
    }
}

impl Store {
    /// Job `id`'s webhook, if it has one.
    pub fn job_webhook(&self, id: &str) -> StoreResult<Option<WebhookRecord>> {
        self.read(|tx| {
            first_row(
                &mut *tx.prepare_cached("SELECT * FROM job_webhooks WHERE job_id = ?1")?,
                [id],
                WebhookRecord::from_row,
            )
        })
    }

    /// Webhooks due at `now`, earliest first, at most `limit`.
    pub fn due_webhooks(&self, now: i64, limit: u32) -> StoreResult<Vec<WebhookRecord>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT * FROM job_webhooks WHERE next_at IS NOT NULL AND next_at <= ?1 \
                 ORDER BY next_at LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![now, limit])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(WebhookRecord::from_row(row)?);
            }
            Ok(out)
        })
    }

    /// Forgets `tenant`'s job `id`'s webhook (the job is being deleted: no delivery of it is
    /// wanted any more, not even of a cancel the delete makes).
    pub fn forget_webhook(&self, tenant: &str, id: &str) -> StoreResult<()> {
        self.write(|tx| {
            tx.prepare_cached("DELETE FROM job_webhooks WHERE job_id = ?1 AND tenant_id = ?2")?
                .execute(params![id, tenant])?;
            Ok(())
        })
    }

    /// Whether job `id`'s webhook is still due at `now` after `attempts` deliveries: not
    /// delivered, given up or tried again since it was read.
    pub fn webhook_still_due(&self, id: &str, attempts: u32, now: i64) -> StoreResult<bool> {
        self.read(|tx| {
            Ok(tx
                .prepare_cached(
                    "SELECT 1 FROM job_webhooks WHERE job_id = ?1 AND attempts = ?2 \
                     AND next_at IS NOT NULL AND next_at <= ?3",
                )?
                .exists(params![id, attempts, now])?)
        })
    }

    /// The earliest time a webhook is due, if any is.
    pub fn next_webhook_time(&self) -> StoreResult<Option<i64>> {
        self.read(|tx| {
            Ok(tx
                .prepare_cached("SELECT min(next_at) FROM job_webhooks WHERE next_at IS NOT NULL")?
                .query_row([], |row| row.get::<_, Option<i64>>(0))?)
        })
    }

    /// Records a delivery of job `id`'s webhook: delivered (`error` `None`), or failed and
    /// tried again at `retry_at` (`None`: given up).
    pub fn webhook_tried(
        &self,
        id: &str,
        error: Option<&str>,
        retry_at: Option<i64>,
    ) -> StoreResult<()> {
        self.write(|tx| {
            let delivered = error.is_none().then(now_ms);
            tx.prepare_cached(
                "UPDATE job_webhooks SET attempts = attempts + 1, delivered_at = ?2, \
                 last_error = ?3, next_at = ?4 WHERE job_id = ?1",
            )?
            .execute(params![
                id,
                delivered,
                error,
                if delivered.is_some() { None } else { retry_at }
            ])?;
            Ok(())
        })
    }

    /// Records `new`, queued, with the blobs it writes into its sandboxes (`inputs`, digests
    /// and sizes), unless its tenant would then be over one of `limits`
    /// ([`StoreError::QuotaExceeded`]). A job of that tenant with the same idempotency key is
    /// [`StoreError::Conflict`].
    pub fn insert_job(
        &self,
        new: &NewJob,
        inputs: &[(String, u64)],
        limits: &JobLimits,
    ) -> StoreResult<JobRecord> {
        check_tenant_id(&new.tenant)?;
        self.write(|tx| {
            require_tenant(tx, &new.tenant)?;
            let kept = job_usage(tx, &new.tenant)?.jobs;
            if kept >= limits.max_kept {
                return Err(StoreError::QuotaExceeded {
                    what: "jobs kept (finished ones until deleted or past retention)",
                    limit: limits.max_kept,
                    used: kept,
                    requested: 1,
                });
            }
            let unfinished: i64 = tx
                .prepare_cached(
                    "SELECT count(*) FROM jobs WHERE tenant_id = ?1 \
                     AND state IN ('queued', 'running')",
                )?
                .query_row([&new.tenant], |row| row.get(0))?;
            let unfinished = u64::try_from(unfinished).unwrap_or_default();
            if unfinished >= limits.max_unfinished {
                return Err(StoreError::QuotaExceeded {
                    what: "unfinished jobs",
                    limit: limits.max_unfinished,
                    used: unfinished,
                    requested: 1,
                });
            }
            // The job's record counts with the blobs it names, but for the rows its inline
            // inputs already have (kept, and counted, as they were stored).
            let mut adding = new.spec.len() as u64;
            for (digest, size) in inputs {
                let counted: bool = tx
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM blobs WHERE tenant_id = ?1 \
                         AND kind = 'input' AND job_id = ?2 AND digest = ?3)",
                    )?
                    .query_row(params![new.tenant, new.id, digest], |row| row.get(0))?;
                if !counted {
                    adding = adding.saturating_add(*size);
                }
            }
            check_blob_room(tx, &new.tenant, adding, limits.max_bytes)?;
            let now = now_ms();
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO jobs (id, tenant_id, key_id, idempotency_key, request_sha256, \
                     template, spec, state, max_attempts, not_before, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?9, ?9)",
                )?
                .execute(params![
                    new.id,
                    new.tenant,
                    new.key_id,
                    new.idempotency_key,
                    new.request_sha256.as_slice(),
                    new.template,
                    new.spec,
                    new.max_attempts,
                    now
                ]);
            match inserted {
                Ok(_) => {}
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    return Err(StoreError::Conflict {
                        kind: "job with idempotency key",
                        id: new.idempotency_key.clone().unwrap_or_default(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
            for (digest, size) in inputs {
                // Still kept by the tenant (an upload, an earlier job's output, or this job's
                // own inline input): one deleted since the request was checked is refused
                // here rather than found missing by the first attempt.
                let kept: bool = tx
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM blobs WHERE tenant_id = ?1 AND digest = ?2)",
                    )?
                    .query_row(params![new.tenant, digest], |row| row.get(0))?;
                if !kept {
                    return Err(StoreError::not_found("blob", digest));
                }
                insert_blob_row(tx, &new.tenant, BlobKind::Input, &new.id, digest, *size)?;
            }
            if let Some(url) = &new.webhook_url {
                tx.prepare_cached(
                    "INSERT INTO job_webhooks (job_id, tenant_id, url) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![new.id, new.tenant, url])?;
            }
            get_job(tx, &new.tenant, &new.id)
        })
    }

    /// `tenant`'s job `id`.
    pub fn get_job(&self, tenant: &str, id: &str) -> StoreResult<JobRecord> {
        self.read(|tx| get_job(tx, tenant, id))
    }

    /// `tenant`'s job with idempotency key `key`, if there is one.
    pub fn job_by_idempotency_key(
        &self,
        tenant: &str,
        key: &str,
    ) -> StoreResult<Option<JobRecord>> {
        self.read(|tx| {
            first_row(
                &mut *tx.prepare_cached(
                    "SELECT * FROM jobs WHERE tenant_id = ?1 AND idempotency_key = ?2",
                )?,
                params![tenant, key],
                JobRecord::from_row,
            )
        })
    }

    /// `tenant`'s jobs in `states` (all when empty), newest first, after the job of sequence
    /// `after` (from the previous page), at most `limit`; without their specs (`{}`), which a
    /// listing does not show and which may be large.
    pub fn list_jobs(
        &self,
        tenant: &str,
        states: &[JobState],
        after: Option<i64>,
        limit: u32,
    ) -> StoreResult<(Vec<JobRecord>, bool)> {
        let limit = limit.clamp(1, MAX_JOB_PAGE);
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let states = serde_json::to_string(&states).unwrap_or_else(|_| "[]".into());
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT seq, id, tenant_id, key_id, idempotency_key, request_sha256, template, \
                 '{}' AS spec, state, attempts, max_attempts, not_before, created_at, \
                 started_at, finished_at, result \
                 FROM jobs WHERE tenant_id = ?1 AND seq < ?2 \
                 AND (json_array_length(?3) = 0 OR state IN (SELECT value FROM json_each(?3))) \
                 ORDER BY seq DESC LIMIT ?4",
            )?;
            let mut rows = stmt.query(params![tenant, after.unwrap_or(i64::MAX), states, limit])?;
            let mut out = Vec::new();
            let mut bytes = 0usize;
            while let Some(row) = rows.next()? {
                if bytes > MAX_JOB_PAGE_BYTES {
                    return Ok((out, true));
                }
                let rec = JobRecord::from_row(row)?;
                bytes += rec.result.as_ref().map_or(0, String::len);
                out.push(rec);
            }
            let full = out.len() == limit as usize;
            Ok((out, full))
        })
    }

    /// Takes the next queued job whose time has come, fairly between tenants (the one with
    /// the fewest attempts `running`, then the next after the last served; none of a tenant
    /// at its cap), and marks it running with one more attempt.
    pub fn claim_job(&self, now: i64, running: &Running) -> StoreResult<Option<JobRecord>> {
        self.write(|tx| {
            // Each tenant with a queued job, by index seeks: as many steps as tenants, however
            // many jobs are queued.
            let mut tenants = Vec::new();
            let mut next = tx.prepare_cached(
                "SELECT tenant_id FROM jobs WHERE state = 'queued' AND tenant_id > ?1 \
                 ORDER BY tenant_id LIMIT 1",
            )?;
            let mut from = String::new();
            while let Some(t) = next
                .query_row([&from], |row| row.get::<_, String>(0))
                .optional()?
            {
                from.clone_from(&t);
                tenants.push(t);
            }
            drop(next);
            let load = |t: &String| running.per_tenant.get(t).copied().unwrap_or(0);
            // Fewest running first; among equals, those after the last served before the rest.
            tenants.sort_by(|a, b| {
                load(a).cmp(&load(b)).then_with(|| {
                    (a.as_str() <= running.last_tenant.as_str())
                        .cmp(&(b.as_str() <= running.last_tenant.as_str()))
                        .then_with(|| a.cmp(b))
                })
            });
            let mut first = tx.prepare_cached(
                "SELECT seq FROM jobs WHERE state = 'queued' AND tenant_id = ?1 \
                 AND not_before <= ?2 ORDER BY seq LIMIT 1",
            )?;
            for tenant in &tenants {
                if running
                    .per_tenant_cap
                    .is_some_and(|cap| load(tenant) >= cap)
                {
                    continue;
                }
                let Some(seq) = first
                    .query_row(params![tenant, now], |row| row.get::<_, i64>(0))
                    .optional()?
                else {
                    continue;
                };
                let claimed = tx
                    .prepare_cached(
                        "UPDATE jobs SET state = 'running', attempts = attempts + 1, \
                         started_at = ?2 WHERE seq = ?1 AND state = 'queued' RETURNING *",
                    )?
                    .query_row(params![seq, now], |row| Ok(JobRecord::from_row(row)))
                    .optional()?
                    .transpose()?;
                return Ok(claimed);
            }
            Ok(None)
        })
    }

    /// The earliest time after `now` a queued job waits for, if any does.
    pub fn next_job_time(&self, now: i64) -> StoreResult<Option<i64>> {
        self.read(|tx| {
            Ok(tx
                .prepare_cached(
                    "SELECT min(not_before) FROM jobs WHERE state = 'queued' AND not_before > ?1",
                )?
                .query_row([now], |row| row.get::<_, Option<i64>>(0))?)
        })
    }

    /// Records how attempt `attempt` of job `id` ended; `false` (nothing recorded) when the
    /// job is no longer running that attempt (cancelled or deleted meanwhile).
    pub fn finish_job_attempt(
        &self,
        id: &str,
        attempt: u32,
        end: &AttemptEnd,
    ) -> StoreResult<bool> {
        self.write(|tx| {
            let current: Option<(String, i64)> = tx
                .prepare_cached("SELECT state, attempts FROM jobs WHERE id = ?1")?
                .query_row([id], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            if current != Some(("running".into(), i64::from(attempt))) {
                return Ok(false);
            }
            let finished = end.state.is_final().then(now_ms);
            tx.prepare_cached(
                "UPDATE jobs SET state = ?2, not_before = ?3, finished_at = ?4, result = ?5 \
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                end.state.as_str(),
                end.not_before,
                finished,
                end.result
            ])?;
            if end.state.is_final() {
                arm_webhook(tx, id)?;
            }
            Ok(true)
        })
    }

    /// Puts back job `id`'s attempt `attempt`, which could not start for want of room (a
    /// quota, the server busy): queued again until `not_before`, the attempt not counted;
    /// whether it was (not: cancelled or deleted meanwhile).
    pub fn unclaim_job(&self, id: &str, attempt: u32, not_before: i64) -> StoreResult<bool> {
        self.write(|tx| {
            let changed = tx
                .prepare_cached(
                    "UPDATE jobs SET state = 'queued', attempts = attempts - 1, not_before = ?3 \
                     WHERE id = ?1 AND state = 'running' AND attempts = ?2",
                )?
                .execute(params![id, attempt, not_before])?;
            Ok(changed == 1)
        })
    }

    /// Cancels `tenant`'s job `id` if it is queued or running; the job as it now is (a job
    /// already over is left as it is).
    pub fn cancel_job(&self, tenant: &str, id: &str) -> StoreResult<JobRecord> {
        self.write(|tx| {
            let cancelled = tx
                .prepare_cached(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?3 \
                     WHERE id = ?1 AND tenant_id = ?2 AND state IN ('queued', 'running')",
                )?
                .execute(params![id, tenant, now_ms()])?;
            if cancelled > 0 {
                arm_webhook(tx, id)?;
            }
            get_job(tx, tenant, id)
        })
    }

    /// Deletes `tenant`'s job `id`, which must be over, and the rows of the blobs it kept;
    /// their digests, for collection.
    pub fn delete_job(&self, tenant: &str, id: &str) -> StoreResult<Vec<String>> {
        self.write(|tx| {
            let job = get_job(tx, tenant, id)?;
            if !job.state.is_final() {
                return Err(StoreError::Conflict {
                    kind: "unfinished job",
                    id: id.to_owned(),
                });
            }
            tx.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
                .execute([id])?;
            tx.prepare_cached("DELETE FROM job_webhooks WHERE job_id = ?1")?
                .execute([id])?;
            delete_job_rows(tx, id, None)
        })
    }

    /// Jobs that ended before `before`, as (tenant, id), at most `limit`: what retention
    /// deletes.
    pub fn jobs_ended_before(&self, before: i64, limit: u32) -> StoreResult<Vec<(String, String)>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT tenant_id, id FROM jobs WHERE finished_at < ?1 \
                 AND state IN {STATE_FINAL_SQL} ORDER BY finished_at LIMIT ?2"
            ))?;
            let rows = stmt
                .query_map(params![before, limit], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// At start-up: every job a previous server left running is queued again (its attempt
    /// stays counted), or failed when it has had `max_attempts` already. How many of each.
    pub fn requeue_interrupted_jobs(&self, max_attempts: u32) -> StoreResult<(u64, u64)> {
        self.write(|tx| {
            let now = now_ms();
            // What the cut-off attempts of those about to fail kept: their result no longer
            // names it (their objects go with housekeeping's sweep of unnamed ones).
            tx.prepare_cached(
                "DELETE FROM blobs WHERE kind = 'output' AND job_id IN \
                 (SELECT id FROM jobs WHERE state = 'running' AND attempts >= ?1)",
            )?
            .execute([max_attempts])?;
            let failed = tx
                .prepare_cached(
                    "UPDATE jobs SET state = 'failed', finished_at = ?1, \
                     result = json_object('error', 'interrupted by server restarts ' || attempts || ' times') \
                     WHERE state = 'running' AND attempts >= ?2",
                )?
                .execute(params![now, max_attempts])?;
            // Those just failed get their webhooks (a webhook never sent is armed once).
            tx.prepare_cached(&format!(
                "UPDATE job_webhooks SET next_at = ?1 WHERE next_at IS NULL \
                 AND delivered_at IS NULL AND attempts = 0 AND job_id IN \
                 (SELECT id FROM jobs WHERE state IN {STATE_FINAL_SQL})"
            ))?
            .execute([now])?;
            let requeued = tx
                .prepare_cached(
                    "UPDATE jobs SET state = 'queued', not_before = ?1 WHERE state = 'running'",
                )?
                .execute([now])?;
            Ok((requeued as u64, failed as u64))
        })
    }

    /// Records that `tenant` keeps the blob `digest` of `size` bytes, as `kind` (for `job`, or
    /// `""` for an upload), unless that takes its blobs over `max_bytes`.
    pub fn add_blob(
        &self,
        tenant: &str,
        kind: BlobKind,
        job: &str,
        digest: &str,
        size: u64,
        max_bytes: u64,
    ) -> StoreResult<()> {
        self.write(|tx| {
            // An attempt's output is kept only while the attempt runs: one a cancel cleaned
            // up after, or a restart cut off, keeps nothing more.
            if kind == BlobKind::Output {
                let running: bool = tx
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM jobs WHERE id = ?1 AND state = 'running')",
                    )?
                    .query_row([job], |row| row.get(0))?;
                if !running {
                    return Err(StoreError::conflict(
                        "output of a job no longer running",
                        job,
                    ));
                }
            }
            check_blob_room(tx, tenant, size, max_bytes)?;
            insert_blob_row(tx, tenant, kind, job, digest, size)
        })
    }

    /// Whether `tenant` may keep `size` more bytes of blobs within `max_bytes` now (what
    /// [`Store::add_blob`] checks again when it records them).
    pub fn blob_fits(&self, tenant: &str, size: u64, max_bytes: u64) -> StoreResult<()> {
        self.read(|tx| check_blob_room(tx, tenant, size, max_bytes))
    }

    /// Bytes `tenant` may still store (blobs and job records) under `max_bytes`.
    pub fn blob_room(&self, tenant: &str, max_bytes: u64) -> StoreResult<u64> {
        self.read(|tx| Ok(max_bytes.saturating_sub(stored_bytes(tx, tenant)?)))
    }

    /// Every digest a blob row names.
    pub fn blob_digests(&self) -> StoreResult<std::collections::HashSet<String>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached("SELECT DISTINCT digest FROM blobs")?;
            let digests = stmt
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(digests)
        })
    }

    /// Deletes the rows of the blobs job `id` kept as outputs (before another attempt), and
    /// with them what its recorded result says of them (its outputs, its logs' blobs), so the
    /// record never lists a file that is gone; their digests, for collection.
    pub fn drop_job_outputs(&self, id: &str) -> StoreResult<Vec<String>> {
        self.write(|tx| {
            tx.prepare_cached(
                "UPDATE jobs SET result = json_set(json_remove(result, '$.stdout', '$.stderr'), \
                 '$.outputs', json('[]')) WHERE id = ?1 AND result IS NOT NULL",
            )?
            .execute([id])?;
            delete_job_rows(tx, id, Some(BlobKind::Output))
        })
    }

    /// Deletes `tenant`'s upload of `digest`; whether there was one.
    pub fn delete_upload(&self, tenant: &str, digest: &str) -> StoreResult<bool> {
        self.write(|tx| {
            let n = tx
                .prepare_cached(
                    "DELETE FROM blobs WHERE tenant_id = ?1 AND kind = 'upload' AND digest = ?2",
                )?
                .execute(params![tenant, digest])?;
            Ok(n > 0)
        })
    }

    /// The size of `tenant`'s upload `digest`, if it has one.
    pub fn upload_size(&self, tenant: &str, digest: &str) -> StoreResult<Option<u64>> {
        self.read(|tx| {
            let size: Option<i64> = tx
                .prepare_cached(
                    "SELECT size FROM blobs WHERE tenant_id = ?1 AND kind = 'upload' AND digest = ?2",
                )?
                .query_row(params![tenant, digest], |row| row.get(0))
                .optional()?;
            Ok(size.map(|s| u64::try_from(s).unwrap_or_default()))
        })
    }

    /// Bytes of the blobs `tenant` keeps (each row counted, shared or not).
    pub fn blob_bytes(&self, tenant: &str) -> StoreResult<u64> {
        self.read(|tx| blob_bytes(tx, tenant))
    }

    /// What `tenant`'s jobs keep in the database.
    pub fn job_usage(&self, tenant: &str) -> StoreResult<JobUsage> {
        self.read(|tx| job_usage(tx, tenant))
    }

    /// Whether no row names blob `digest` any more (its object may go).
    pub fn blob_unused(&self, digest: &str) -> StoreResult<bool> {
        self.read(|tx| {
            let n: i64 = tx
                .prepare_cached("SELECT count(*) FROM blobs WHERE digest = ?1")?
                .query_row([digest], |row| row.get(0))?;
            Ok(n == 0)
        })
    }

    /// Deletes the blob rows of `job`, which was never recorded (its submit failed); their
    /// digests.
    pub fn drop_orphan_job_blobs_of(&self, job: &str) -> StoreResult<Vec<String>> {
        self.write(|tx| {
            let exists: bool = tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM jobs WHERE id = ?1)")?
                .query_row([job], |row| row.get(0))?;
            if exists {
                return Ok(Vec::new());
            }
            delete_job_rows(tx, job, None)
        })
    }

    /// Deletes job blob rows older than `before` whose job was never recorded (a submit cut
    /// off between the two); their digests.
    pub fn drop_orphan_job_blobs(&self, before: i64) -> StoreResult<Vec<String>> {
        self.write(|tx| {
            let digests = tx
                .prepare_cached(
                    "DELETE FROM blobs WHERE job_id != '' AND created_at < ?1 \
                     AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = blobs.job_id) \
                     RETURNING digest",
                )?
                .query_map([before], |row| row.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(digests)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn job(id: &str, tenant: &str) -> NewJob {
        NewJob {
            id: id.into(),
            tenant: tenant.into(),
            key_id: None,
            idempotency_key: None,
            request_sha256: [0; 32],
            template: "host".into(),
            spec: "{}".into(),
            max_attempts: 2,
            webhook_url: Some("http://example.com/".into()),
        }
    }

    fn limits(max_unfinished: u64) -> JobLimits {
        JobLimits {
            max_unfinished,
            max_kept: 1_000,
            max_bytes: 1 << 30,
        }
    }

    fn store() -> Store {
        let store = Store::open_in_memory().unwrap();
        for t in ["a", "b"] {
            store.create_tenant(t, t).unwrap();
        }
        store
    }

    #[test]
    fn an_input_must_be_a_blob_its_tenant_keeps() {
        let store = store();
        let digest = format!("sha256:{}", "1".repeat(64));
        let inputs = [(digest.clone(), 3)];
        let e = store
            .insert_job(&job("j1", "a"), &inputs, &limits(10))
            .unwrap_err();
        assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
        // Another tenant's upload of the same bytes does not count.
        store
            .add_blob("b", BlobKind::Upload, "", &digest, 3, 1 << 30)
            .unwrap();
        assert!(
            store
                .insert_job(&job("j1", "a"), &inputs, &limits(10))
                .is_err()
        );
        store
            .add_blob("a", BlobKind::Upload, "", &digest, 3, 1 << 30)
            .unwrap();
        store
            .insert_job(&job("j1", "a"), &inputs, &limits(10))
            .unwrap();
        // Deleting the upload leaves the job's own row: the object stays.
        assert!(store.delete_upload("a", &digest).unwrap());
        assert!(!store.blob_unused(&digest).unwrap());
    }

    #[test]
    fn a_page_of_jobs_ends_once_its_results_are_large() {
        let store = store();
        let caps = limits(100);
        for n in 0..4 {
            store
                .insert_job(&job(&format!("j{n}"), "a"), &[], &caps)
                .unwrap();
            let claimed = store
                .claim_job(now_ms() + 1, &Running::default())
                .unwrap()
                .unwrap();
            let end = AttemptEnd {
                state: JobState::Succeeded,
                not_before: 0,
                result: format!("{{\"out\":\"{}\"}}", "x".repeat(MAX_JOB_PAGE_BYTES / 2)),
            };
            assert!(store.finish_job_attempt(&claimed.id, 1, &end).unwrap());
        }
        let (page, more) = store.list_jobs("a", &[], None, 100).unwrap();
        // Two results of half the page's bytes each pass it.
        assert_eq!(page.len(), 2);
        assert!(more);
        let after = page.last().unwrap().seq;
        let (rest, more) = store.list_jobs("a", &[], Some(after), 100).unwrap();
        assert_eq!(rest.len(), 2);
        assert!(!more);
    }

    #[test]
    fn a_webhook_read_due_is_no_longer_due_once_tried() {
        let store = store();
        store.insert_job(&job("j1", "a"), &[], &limits(10)).unwrap();
        let now = now_ms() + 1;
        let claimed = store.claim_job(now, &Running::default()).unwrap().unwrap();
        let end = AttemptEnd {
            state: JobState::Succeeded,
            not_before: now,
            result: "{}".into(),
        };
        assert!(store.finish_job_attempt(&claimed.id, 1, &end).unwrap());
        let later = now_ms() + 10;
        let due = store.due_webhooks(later, 10).unwrap();
        assert_eq!(due.len(), 1);
        assert!(
            store
                .webhook_still_due("j1", due[0].attempts, later)
                .unwrap()
        );
        // Delivered by another task meanwhile: the listing read before is stale.
        store.webhook_tried("j1", None, None).unwrap();
        assert!(
            !store
                .webhook_still_due("j1", due[0].attempts, later)
                .unwrap()
        );
    }

    #[test]
    fn outputs_dropped_before_another_attempt_leave_the_record_too() {
        let store = store();
        store.insert_job(&job("j1", "a"), &[], &limits(10)).unwrap();
        let claimed = store
            .claim_job(now_ms() + 1, &Running::default())
            .unwrap()
            .unwrap();
        let digest = format!("sha256:{}", "3".repeat(64));
        store
            .add_blob("a", BlobKind::Output, "j1", &digest, 5, 1 << 30)
            .unwrap();
        let end = AttemptEnd {
            state: JobState::Queued,
            not_before: 0,
            result: format!(
                "{{\"error\":\"x\",\"stdout_tail\":\"t\",\"stdout\":{{\"digest\":\"{digest}\",\"size\":5}},\
                 \"outputs\":[{{\"path\":\"/o\",\"size\":5,\"digest\":\"{digest}\"}}]}}"
            ),
        };
        assert!(store.finish_job_attempt(&claimed.id, 1, &end).unwrap());
        assert_eq!(store.drop_job_outputs("j1").unwrap(), [digest]);
        let result: serde_json::Value =
            serde_json::from_str(&store.get_job("a", "j1").unwrap().result.unwrap()).unwrap();
        assert_eq!(
            result,
            serde_json::json!({"error": "x", "stdout_tail": "t", "outputs": []})
        );
    }

    #[test]
    fn a_job_failed_for_its_restarts_keeps_nothing_its_attempt_left() {
        let store = store();
        store.insert_job(&job("j1", "a"), &[], &limits(10)).unwrap();
        store
            .claim_job(now_ms() + 1, &Running::default())
            .unwrap()
            .unwrap();
        let digest = format!("sha256:{}", "4".repeat(64));
        store
            .add_blob("a", BlobKind::Output, "j1", &digest, 7, 1 << 30)
            .unwrap();
        assert_eq!(store.requeue_interrupted_jobs(1).unwrap(), (0, 1));
        assert_eq!(store.blob_bytes("a").unwrap(), 0);
        assert!(store.blob_unused(&digest).unwrap());
        // Nor does a write of that attempt's still under way when it ended.
        assert!(matches!(
            store.add_blob("a", BlobKind::Output, "j1", &digest, 7, 1 << 30),
            Err(StoreError::Conflict { .. })
        ));
    }

    #[test]
    fn an_inline_input_counts_once_against_the_quota() {
        let store = store();
        let digest = format!("sha256:{}", "2".repeat(64));
        // Stored first, as an inline input of the job (counted then): 600 of 1,000 bytes.
        store
            .add_blob("a", BlobKind::Input, "j1", &digest, 600, 1_000)
            .unwrap();
        let caps = JobLimits {
            max_bytes: 1_000,
            ..limits(10)
        };
        store
            .insert_job(&job("j1", "a"), &[(digest, 600)], &caps)
            .unwrap();
        assert_eq!(store.blob_bytes("a").unwrap(), 600);
    }

    #[test]
    fn a_tenant_s_kept_jobs_and_their_records_count_until_they_are_deleted() {
        let store = store();
        let caps = JobLimits {
            max_unfinished: 10,
            max_kept: 2,
            max_bytes: 1 << 20,
        };
        store.insert_job(&job("j0", "a"), &[], &caps).unwrap();
        store.insert_job(&job("j1", "a"), &[], &caps).unwrap();
        assert_eq!(
            store.job_usage("a").unwrap(),
            JobUsage { jobs: 2, bytes: 4 }
        );
        // Finished jobs count: a tenant cannot keep more than its share by letting them end.
        let now = now_ms() + 1;
        let running = Running::default();
        let claimed = store.claim_job(now, &running).unwrap().unwrap();
        let result = "x".repeat(1000);
        let end = AttemptEnd {
            state: JobState::Succeeded,
            not_before: now,
            result: format!("{{\"out\":\"{result}\"}}"),
        };
        assert!(store.finish_job_attempt(&claimed.id, 1, &end).unwrap());
        assert_eq!(store.job_usage("a").unwrap().bytes, 4 + 1010);
        match store.insert_job(&job("j2", "a"), &[], &caps) {
            Err(StoreError::QuotaExceeded {
                limit: 2, used: 2, ..
            }) => {}
            other => panic!("expected the kept-jobs quota, got {other:?}"),
        }
        // Another tenant has its own count.
        store.insert_job(&job("b0", "b"), &[], &caps).unwrap();
        // The records' bytes count with the blobs.
        let tight = JobLimits {
            max_kept: 10,
            max_bytes: 1014 + 1,
            ..caps
        };
        match store.insert_job(&job("j2", "a"), &[], &tight) {
            Err(StoreError::QuotaExceeded {
                used: 1014,
                requested: 2,
                ..
            }) => {}
            other => panic!("expected the bytes quota, got {other:?}"),
        }
        store.delete_job("a", &claimed.id).unwrap();
        assert_eq!(
            store.job_usage("a").unwrap(),
            JobUsage { jobs: 1, bytes: 2 }
        );
        store.insert_job(&job("j2", "a"), &[], &caps).unwrap();
    }

    #[test]
    fn claims_are_fair_and_results_land_once() {
        let store = store();
        for i in 0..3 {
            store
                .insert_job(&job(&format!("a{i}"), "a"), &[], &limits(10))
                .unwrap();
        }
        store.insert_job(&job("b0", "b"), &[], &limits(10)).unwrap();
        let now = now_ms() + 1;
        let mut running = Running::default();
        let first = store.claim_job(now, &running).unwrap().unwrap();
        assert_eq!(first.id, "a0");
        running.per_tenant.insert("a".into(), 1);
        running.last_tenant = "a".into();
        // "b" has none running: its one job goes before "a"'s next.
        let second = store.claim_job(now, &running).unwrap().unwrap();
        assert_eq!((second.id.as_str(), second.attempts), ("b0", 1));
        // A tenant at its cap gets no more, whatever it has queued.
        let capped = Running {
            per_tenant: [("a".to_owned(), 1)].into(),
            last_tenant: "b".into(),
            per_tenant_cap: Some(1),
        };
        assert!(store.claim_job(now, &capped).unwrap().is_none());

        let end = AttemptEnd {
            state: JobState::Succeeded,
            not_before: now,
            result: "{}".into(),
        };
        // Not the attempt it is on: nothing recorded.
        assert!(!store.finish_job_attempt("b0", 2, &end).unwrap());
        assert!(store.finish_job_attempt("b0", 1, &end).unwrap());
        assert!(!store.finish_job_attempt("b0", 1, &end).unwrap(), "twice");
        assert_eq!(store.get_job("b", "b0").unwrap().state, JobState::Succeeded);
        // Its webhook is due; a cancelled job's too; a running one's not yet.
        let due: Vec<String> = store
            .due_webhooks(now_ms() + 1, 10)
            .unwrap()
            .into_iter()
            .map(|w| w.job_id)
            .collect();
        assert_eq!(due, ["b0"]);
        store.cancel_job("a", "a0").unwrap();
        assert!(
            !store.finish_job_attempt("a0", 1, &end).unwrap(),
            "over a cancel"
        );
        assert_eq!(store.get_job("a", "a0").unwrap().state, JobState::Cancelled);
        assert_eq!(store.due_webhooks(now_ms() + 1, 10).unwrap().len(), 2);
        // Another tenant's job is not found.
        assert!(matches!(
            store.get_job("a", "b0"),
            Err(StoreError::NotFound { .. })
        ));
    }
}
