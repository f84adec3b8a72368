//! The sandbox manager: the domain layer `moat serve` calls. It owns the live sandboxes (each a
//! backend instance and a client of its agent) and keeps the store true to them.
//!
//! Every change is recorded before it is acknowledged: a sandbox is recorded as `starting`
//! (quotas checked in the same transaction) before the backend makes it, `running` once its
//! agent answers, and `failed` (with the reason) if anything in between fails, after whatever
//! was made is destroyed. Work that must not be left half-done (create, delete) runs in its own
//! task, so a caller that goes away (an HTTP client hanging up) cannot cancel it midway.
//!
//! The store is blocking; its calls run on tokio's blocking pool.

mod access;
mod asked_builds;
mod build_steps;
pub use asked_builds::{ASKED_BUILD_TTL, MAX_ASKED_BUILDS, MAX_ASKED_BUILDS_PER_TENANT};
mod builds;
mod calls;
mod code_run;
pub use code_run::{CodeRun, CodeRunError, CodeRunRequest, MAX_CODE_RUN_BYTES};
mod exec;
mod exec_encoding;
mod exec_stream;
mod execution;
mod health;
mod housekeeping;
mod idempotency;
mod images;
pub use builds::{
    CONTEXT_TTL, DEFAULT_BUILD_TIMEOUT, MAX_ACTIVE_BUILDS_PER_TENANT, MAX_BUILD_LOG_BYTES,
    MAX_BUILD_TIMEOUT, MAX_CONCURRENT_BUILDS, MAX_CONTEXT_BYTES, MAX_CONTEXT_BYTES_PER_TENANT,
    MAX_KEPT_BUILDS_PER_TENANT, UPLOAD_TOKEN_LIFETIME, new_build_id, new_build_uuid, tagged_names,
};
pub use images::IMAGE_GRACE;
mod jobs;
pub use jobs::{
    BlobRead, DEFAULT_JOB_BYTES_PER_TENANT, DEFAULT_JOB_RETENTION, DEFAULT_JOB_TIMEOUT_SECS,
    DEFAULT_MAX_KEPT_JOBS, DEFAULT_MAX_UNFINISHED_JOBS, JobOptions, LogStream, MAX_BLOB_BYTES,
    MAX_INTERRUPTED_ATTEMPTS, MAX_JOB_INPUTS, MAX_JOB_LOG_BYTES, MAX_JOB_OUTPUT_BYTES,
    MAX_JOB_OUTPUT_FILES, MAX_JOB_OUTPUT_PATTERNS, MAX_JOB_RETRIES, MAX_JOB_TIMEOUT_SECS,
    MAX_WEBHOOK_DELIVERIES, MAX_WEBHOOK_URL, WEBHOOK_TIMEOUT, default_workers,
};
mod keys;
mod memory;
mod network;
pub use network::EgressAccess;
mod pause;
mod pool;
mod readiness;
mod restart;
mod run;
mod snapshots;
mod storage;
mod templates;
mod usage;

pub use access::{SandboxAgent, SandboxRoute};
pub use calls::{CallGuard, PAUSE_DRAIN_LIMIT};
pub use exec::{
    BUFFERED_OUTPUT_PER_TENANT, BUFFERED_OUTPUT_TOTAL, DEFAULT_EXEC_TIMEOUT, EXEC_OUTPUT_LIMIT,
    MAX_EXEC_TIMEOUT,
};
pub use exec_stream::ExecStream;
pub use health::{HEALTH_PROBE_INTERVAL, UNHEALTHY_PROBES};
pub use housekeeping::{DEFAULT_RETENTION, Housekeeping, MAX_HOUSEKEEPING_INTERVAL};
pub use idempotency::IDEMPOTENCY_KEY_RETENTION;
pub use pool::{FIRST_MEMBER_ESTIMATE, MAX_CONCURRENT_STARTS, POOL_TICK};
pub use restart::{Recovered, ShutdownMode};
pub use run::{
    MAX_CONCURRENT_RUNS, MAX_CONCURRENT_RUNS_PER_TENANT, MAX_RUN_FILES, MAX_RUN_OUTPUT_FILE,
    MAX_RUN_OUTPUT_TOTAL,
};
pub use snapshots::{
    FORK_PARALLELISM, MAX_SNAPSHOTS_PER_TENANT, RESTORE_TIMEOUT, SNAPSHOT_TIMEOUT,
};
pub use storage::DATA_DIR_RESERVE;
pub use templates::StartFrom;
pub use usage::{MAX_USAGE_SAMPLES, USAGE_INTERVAL, UsageSample};

/// How many expired sandboxes the reaper ends or pauses at once.
const REAP_CONCURRENCY: usize = 16;
/// How long one reaper pass waits for the ends and pauses it started; those still under way
/// (a pause saving a large sandbox to disk) go on, and the next passes leave them alone.
const REAP_WAIT: Duration = Duration::from_secs(5);

use crate::store::now_ms;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_proto::v1;

use crate::agent_client::AgentClient;
use crate::auth::Caller;
use crate::backend::{Backend, Backends, Instance};
use crate::images::ImageCache;
use crate::metrics::Metrics;
use crate::network::NetworkPolicy;
use crate::plan::{self, SandboxPlan, TemplateLimits, limits_v1};
use crate::resources::Resources;
use crate::store::{
    Cursor, EndReason, MAX_PAGE, NewSandbox, SandboxFilter, SandboxQuotas, SandboxRecord,
    SandboxState, Store, StoreError, check_sandbox_id, check_template_name, generate_sandbox_id,
};
use snapshots::restore_layer;

/// Most environment variables in one request.
pub const MAX_ENV_VARS: usize = 256;

/// What the manager can fail with, one variant per answer the API gives.
#[derive(Debug, Clone, thiserror::Error)]
///
/// Each variant holds one sentence for people; its [`ManagerError::code`] is separate, so the
/// text never repeats the code (the API answers both, and the CLI prints both). How a front end
/// answers each (an HTTP status, say) is the front end's: the notes below say what the HTTP
/// surfaces answer.
pub enum ManagerError {
    /// The request is malformed or asks for something not allowed (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// No such sandbox for this tenant (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The sandbox is not in a state that allows this (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// A quota of the key or tenant would be exceeded (HTTP 429).
    #[error("{0}")]
    QuotaExceeded(String),
    /// The caller's key may not do this (HTTP 403).
    #[error("{0}")]
    Forbidden(String),
    /// No valid API key was given (HTTP 401).
    #[error("{0}")]
    Unauthenticated(String),
    /// The sandbox or its agent cannot be reached, or the backend could not make it (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// What the request would make is larger than a limit allows (HTTP 413).
    #[error("{0}")]
    TooLarge(String),
    /// The work did not finish within its time limit (HTTP 504).
    #[error("{0}")]
    Timeout(String),
    /// A fault of the server itself, such as its database (HTTP 500).
    #[error("{0}")]
    Internal(String),
    /// The data dir has no room for what the request would record, or a snapshot would take
    /// it below its free-space reserve (HTTP 507).
    #[error("{0}")]
    InsufficientStorage(String),
}

impl ManagerError {
    /// The machine-readable code of the error, as the API reports it (a domain code: the
    /// same on every front end).
    pub fn code(&self) -> &'static str {
        match self {
            ManagerError::Invalid(_) => "invalid",
            ManagerError::NotFound(_) => "not_found",
            ManagerError::Conflict(_) => "conflict",
            ManagerError::Forbidden(_) => "forbidden",
            ManagerError::Unauthenticated(_) => "unauthenticated",
            ManagerError::QuotaExceeded(_) => "quota_exceeded",
            ManagerError::Unavailable(_) => "unavailable",
            ManagerError::TooLarge(_) => "too_large",
            ManagerError::Timeout(_) => "timeout",
            ManagerError::Internal(_) => "internal",
            ManagerError::InsufficientStorage(_) => "insufficient_storage",
        }
    }
}

impl From<StoreError> for ManagerError {
    fn from(e: StoreError) -> Self {
        if storage::is_disk_full(&e) {
            return ManagerError::InsufficientStorage(format!(
                "the data dir is full; nothing was changed ({e})"
            ));
        }
        let text = e.to_string();
        match e {
            StoreError::Invalid { .. } | StoreError::BadJson { .. } => ManagerError::Invalid(text),
            StoreError::NotFound { .. } => ManagerError::NotFound(text),
            StoreError::Conflict { .. }
            | StoreError::TemplateInUse { .. }
            | StoreError::SnapshotInUse { .. }
            | StoreError::BuiltIn { .. }
            | StoreError::TagOfBuiltIn { .. }
            | StoreError::InvalidTransition { .. }
            | StoreError::Ended { .. } => ManagerError::Conflict(text),
            StoreError::QuotaExceeded { .. } => ManagerError::QuotaExceeded(text),
            _ => ManagerError::Internal(text),
        }
    }
}

impl From<crate::EngineError> for ManagerError {
    fn from(e: crate::EngineError) -> Self {
        match e {
            crate::EngineError::Invalid(m) => ManagerError::Invalid(m),
            crate::EngineError::NotFound(m) => ManagerError::NotFound(m),
            other => ManagerError::Unavailable(other.to_string()),
        }
    }
}

/// Result of manager operations.
pub type ManagerResult<T> = std::result::Result<T, ManagerError>;

/// Settings of a [`SandboxManager`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerOptions {
    /// Time to live of a sandbox whose request names none.
    pub default_ttl: Duration,
    /// Longest time to live a request may ask for (at create or later).
    pub max_ttl: Duration,
    /// Memory all warm-pool members together may use, bytes (see [`pool`]'s notes on how it
    /// is counted).
    pub pool_memory_budget: u64,
    /// Where snapshot archives are kept (`moat serve`: `<data-dir>/snapshots`); `None` keeps
    /// none, and snapshots and forks are unavailable.
    pub snapshot_dir: Option<PathBuf>,
    /// Free space the snapshot directory's filesystem keeps, bytes: a snapshot or fork that
    /// would leave less is refused (507).
    pub min_free_disk: u64,
    /// Bytes of snapshot archives a tenant may keep (fork copies included while they exist),
    /// unless the key that makes one has a `max_snapshot_bytes` quota.
    pub snapshot_bytes_per_tenant: u64,
    /// How long the record of an ended sandbox is kept before [`SandboxManager::housekeep`]
    /// deletes it.
    pub retention: Duration,
    /// Whether a sandbox's own services are reachable without its traffic access token when
    /// its create does not say (`public_traffic`).
    pub public_traffic: bool,
    /// Bytes a second each sandbox may move each way through its network connections
    /// together; no limit when `None`.
    pub egress_bandwidth: Option<u64>,
    /// Who may give sandboxes network access.
    pub egress_access: EgressAccess,
    /// Where pulled images are kept (`moat serve`: `<data-dir>/images`); `None` keeps none,
    /// and templates from images are refused.
    pub image_dir: Option<PathBuf>,
    /// How registries are reached (plain HTTP ones, credentials).
    pub registries: crate::images::registry::RegistryAccess,
    /// How long an image nothing uses stays before housekeeping removes it.
    pub image_grace: Duration,
    /// Where builds keep their records, logs and contexts (`moat serve`:
    /// `<data-dir>/builds`); `None` (or no `image_dir`) refuses builds.
    pub build_dir: Option<PathBuf>,
    /// Asynchronous jobs: where their blobs are kept, workers, quotas, retention.
    pub jobs: JobOptions,
}

/// Free-space reserve of the data directory unless configured: 1 GiB.
pub const DEFAULT_MIN_FREE_DISK: u64 = 1 << 30;
/// Snapshot bytes per tenant unless a key's quota says otherwise: 10 GiB.
pub const DEFAULT_SNAPSHOT_BYTES_PER_TENANT: u64 = 10 << 30;

/// Warm-pool memory budget unless configured: 1 GiB.
pub const DEFAULT_POOL_MEMORY_BUDGET: u64 = 1 << 30;

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            default_ttl: Duration::from_secs(5 * 60),
            max_ttl: Duration::from_secs(24 * 3600),
            pool_memory_budget: DEFAULT_POOL_MEMORY_BUDGET,
            snapshot_dir: None,
            min_free_disk: DEFAULT_MIN_FREE_DISK,
            snapshot_bytes_per_tenant: DEFAULT_SNAPSHOT_BYTES_PER_TENANT,
            retention: housekeeping::DEFAULT_RETENTION,
            public_traffic: true,
            egress_bandwidth: None,
            egress_access: EgressAccess::All,
            image_dir: None,
            registries: Default::default(),
            image_grace: images::IMAGE_GRACE,
            build_dir: None,
            jobs: JobOptions::default(),
        }
    }
}

/// One sandbox the manager runs.
struct Live {
    tenant: String,
    client: AgentClient,
    /// The backend that made it, asked what it can do (pause, …).
    backend: Arc<dyn Backend>,
    /// Behind an async mutex: `destroy` needs `&mut`, and may wait.
    instance: tokio::sync::Mutex<Box<dyn Instance>>,
    /// Frozen (or being frozen): commands and file calls are refused rather than left
    /// waiting on an agent that cannot answer.
    paused: AtomicBool,
    /// Its agent calls under way, which a pause lets finish first (see [`calls`]).
    calls: Arc<calls::CallGate>,
    /// Held by pause, resume and snapshot, which must not interleave; never by `destroy`, so
    /// a delete is never held up by a snapshot. Shared with the `Live` that takes this one's
    /// place when the sandbox is restored (see [`Inner::live_locked`]).
    ops: Arc<tokio::sync::Mutex<()>>,
    /// The environment the sandbox was created with (over its template's), which a snapshot
    /// of it keeps.
    env: BTreeMap<String, String>,
    /// Whether its own services are reachable without its traffic access token.
    public_traffic: bool,
    /// Its recent resource use, sampled every [`USAGE_INTERVAL`].
    usage: Mutex<usage::History>,
    /// What the health checks found (see [`health`]).
    health: health::Health,
    /// Its network being served; `None` while it has none.
    egress: Mutex<Option<crate::network::Egress>>,
    /// Why its memory cannot be saved though its backend saves memory
    /// ([`Instance::memory_refusal`]).
    memory_refusal: Option<String>,
    /// Its access token, derived on first need: requests that name no sandbox are matched
    /// against every running one's, which must not cost a derivation each.
    access_token: std::sync::OnceLock<String>,
}

impl Live {
    fn new(
        tenant: &str,
        client: AgentClient,
        backend: Arc<dyn Backend>,
        instance: Box<dyn Instance>,
        env: BTreeMap<String, String>,
        public_traffic: bool,
    ) -> Live {
        let usage = Mutex::new(usage::History::new(&*instance));
        let memory_refusal = instance.memory_refusal();
        Live {
            tenant: tenant.to_owned(),
            client,
            backend,
            instance: tokio::sync::Mutex::new(instance),
            usage,
            paused: AtomicBool::new(false),
            calls: Arc::default(),
            ops: Arc::default(),
            env,
            public_traffic,
            health: health::Health::default(),
            egress: Mutex::new(None),
            memory_refusal,
            access_token: std::sync::OnceLock::new(),
        }
    }

    /// Whether its memory can be saved: its backend saves memory and nothing of this sandbox
    /// stands in the way.
    fn saves_memory(&self) -> bool {
        self.backend.capabilities().memory_checkpoint && self.memory_refusal.is_none()
    }

    /// The same, with its network being served.
    fn with_egress(self, egress: Option<crate::network::Egress>) -> Live {
        *lock(&self.egress) = egress;
        self
    }

    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// A call to its agent counted in, or `None` when it is paused or pausing.
    fn enter_call(&self) -> Option<calls::CallGuard> {
        let call = self.calls.enter();
        (!self.is_paused()).then_some(call)
    }
}

struct Inner {
    /// Pulled images, when the server keeps them.
    images: Option<Arc<ImageCache>>,
    /// Builds, when the server runs them.
    builds: Option<builds::Builds>,
    /// Jobs and their blob store, when the server keeps one.
    jobs: Option<Arc<jobs::Jobs>>,
    store: Arc<Store>,
    /// The backends sandboxes are made with, by kind; a template names one or gets the default.
    backends: Backends,
    opts: ManagerOptions,
    live: Mutex<HashMap<String, Arc<Live>>>,
    pools: pool::Pools,
    metrics: Arc<Metrics>,
    /// The key sandbox access tokens are derived from (see [`access`]).
    access_key: [u8; crate::store::SECRET_BYTES],
    /// Creates in flight per (tenant, idempotency key), so that two at once make one sandbox.
    idempotent_creates: idempotency::InFlight,
    /// Expired sandboxes being ended or paused by the reaper, and the places for doing so.
    reaping: Arc<Reaping>,
    /// One-shot runs under way.
    runs: Arc<crate::tenant_slots::TenantSlots>,
    /// The output buffered execs hold.
    exec_output: Arc<crate::tenant_slots::TenantSlots>,
    /// Image pulls under way (waiting for their turn included), per tenant.
    pulls: Arc<crate::tenant_slots::TenantSlots>,
    /// Bytes of snapshot archives being written or kept for a fork, per tenant.
    snapshot_bytes: snapshots::InFlight,
    /// Bytes of sandboxes paused to disk, which count as their tenants' snapshot bytes.
    paused_bytes: memory::PausedBytes,
    /// The rounds of health checks of the running sandboxes.
    health_probes: health::Probes,
}

/// The sandboxes of `moat serve`: creates, runs commands in, and ends them, keeping the store
/// true. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct SandboxManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SandboxManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxManager")
            .field("backends", &self.inner.backends)
            .field("opts", &self.inner.opts)
            .finish()
    }
}

/// What a create's caller asked for beyond its request body.
struct Asked {
    /// The sandbox's id (`moat run --id`).
    id: Option<String>,
    /// The create's idempotency key, recorded with the sandbox.
    idempotency_key: Option<String>,
}

/// `plan` as the store keeps it with sandbox `id`'s record: the id it was made with filled in.
fn recorded_plan(plan: &SandboxPlan, id: &str) -> ManagerResult<serde_json::Value> {
    let mut json = plan
        .to_json()
        .map_err(|e| ManagerError::Internal(format!("sandbox {id} plan: {e}")))?;
    json["id"] = id.into();
    Ok(json)
}

/// The plan `rec` was made with; `None` for a sandbox recorded before plans were kept.
fn stored_plan(rec: &SandboxRecord) -> ManagerResult<Option<SandboxPlan>> {
    rec.plan
        .as_ref()
        .map(|p| {
            SandboxPlan::from_json(p)
                .map_err(|e| ManagerError::Internal(format!("sandbox {} plan: {e}", rec.id)))
        })
        .transpose()
}

/// The limits `rec` was made with: its plan's, or for a record older than plans, its
/// `resources` column (the same numbers as the API shows them).
fn recorded_resources(rec: &SandboxRecord) -> ManagerResult<crate::resources::Resources> {
    if let Some(plan) = stored_plan(rec)? {
        return Ok(plan.resources);
    }
    let limits: v1::ResourceLimits = serde_json::from_value(rec.resources.clone())
        .map_err(|e| ManagerError::Internal(format!("sandbox {} resources: {e}", rec.id)))?;
    Ok(plan::resources_of(&limits))
}

/// The built-in `host` template's spec: the host's system directories, engine default limits.
pub fn host_template_spec() -> v1::TemplateSpec {
    let d = Resources::default();
    v1::TemplateSpec {
        resources: Some(v1::ResourceRequest {
            memory: Some(d.memory_bytes.to_string()),
            cpus: Some(d.cpu_millis as f64 / 1000.0),
            pids: Some(d.pids),
            disk: Some(d.disk_bytes.to_string()),
        }),
        ..v1::TemplateSpec::new(v1::Rootfs::Host)
    }
}

/// The built-in templates named as the E2B SDKs expect: `base` (the `e2b` SDK's default) and
/// `code-interpreter-v1` (the `e2b-code-interpreter` SDK's).
pub const E2B_TEMPLATES: [&str; 2] = ["base", "code-interpreter-v1"];

/// The spec of the [`E2B_TEMPLATES`]: the `host` template's, with E2B's user `user`. No fixed
/// working directory: commands start in their user's home (`/home/user`, or `/root` for
/// root, who holds no capabilities and so cannot enter `/home/user`), as in E2B's templates.
pub fn e2b_template_spec() -> v1::TemplateSpec {
    v1::TemplateSpec {
        user: Some("user".into()),
        ..host_template_spec()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `work` to its end even when its caller stops waiting for it. A request's future is
/// dropped where it stands when its client hangs up; an operation that changes the store and
/// live sandboxes (or files) together runs this way so that it never stops between the two.
async fn to_the_end<T: Send + 'static>(
    what: &str,
    work: impl Future<Output = ManagerResult<T>> + Send + 'static,
) -> ManagerResult<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| ManagerError::Internal(format!("{what} task: {e}")))?
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SandboxManager {
    /// A manager over `store` and one `backend`, the default. Makes sure the built-in `host`
    /// template exists in the store (a blocking write; call it at start-up, before serving).
    pub fn new(
        store: Arc<Store>,
        backend: Arc<dyn Backend>,
        opts: ManagerOptions,
    ) -> ManagerResult<SandboxManager> {
        SandboxManager::with_backends(store, Backends::new(backend), opts)
    }

    /// A manager over `store` and the registry `backends`: a template's `backend` names one of
    /// them, the registry's default serves the others. Otherwise as [`SandboxManager::new`].
    pub fn with_backends(
        store: Arc<Store>,
        backends: Backends,
        opts: ManagerOptions,
    ) -> ManagerResult<SandboxManager> {
        if opts.default_ttl.is_zero() || opts.default_ttl > opts.max_ttl {
            return Err(ManagerError::Invalid(format!(
                "default TTL {:?} must be positive and at most the maximum {:?}",
                opts.default_ttl, opts.max_ttl
            )));
        }
        let builtins = std::iter::once((v1::DEFAULT_TEMPLATE, host_template_spec()))
            .chain(E2B_TEMPLATES.map(|name| (name, e2b_template_spec())));
        for (name, spec) in builtins {
            let limits = limits_json(&spec)?;
            let spec = serde_json::to_value(spec)
                .map_err(|e| ManagerError::Internal(format!("{name} template spec: {e}")))?;
            match store.create_template_with(None, None, name, &spec, Some(&limits)) {
                // Already there from an earlier start: keep it (an operator may have tuned it).
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        fill_template_limits(&store)?;
        let access_key = store.secret(access::ACCESS_TOKEN_SECRET)?;
        if let Some(dir) = &opts.snapshot_dir {
            snapshots::prepare_dir(&store, dir)?;
        }
        let images = match &opts.image_dir {
            Some(dir) => Some(Arc::new(
                ImageCache::open(dir, opts.registries.clone())
                    .map_err(|e| ManagerError::Internal(e.to_string()))?
                    .with_reserve(opts.min_free_disk),
            )),
            None => None,
        };
        let builds = match &opts.build_dir {
            Some(dir) => Some(builds::Builds::open(dir, &store)?),
            None => None,
        };
        let jobs = jobs::Jobs::open(&opts.jobs)
            .map_err(ManagerError::Internal)?
            .map(Arc::new);
        let pools = pool::Pools::new(opts.pool_memory_budget);
        Ok(SandboxManager {
            inner: Arc::new(Inner {
                store,
                backends,
                opts,
                live: Mutex::new(HashMap::new()),
                pools,
                metrics: Arc::new(Metrics::new()),
                access_key,
                idempotent_creates: idempotency::InFlight::default(),
                exec_output: exec::output_budget(),
                reaping: Arc::new(Reaping {
                    ids: Mutex::default(),
                    places: tokio::sync::Semaphore::new(REAP_CONCURRENCY),
                    tasks: tokio_util::task::TaskTracker::new(),
                }),
                runs: run::run_slots(),
                pulls: images::pull_slots(),
                snapshot_bytes: snapshots::InFlight::default(),
                paused_bytes: memory::PausedBytes::default(),
                health_probes: health::Probes::default(),
                images,
                builds,
                jobs,
            }),
        })
    }

    /// The settings this manager runs with.
    pub fn options(&self) -> &ManagerOptions {
        &self.inner.opts
    }

    /// The backends this manager makes sandboxes with.
    pub fn backends(&self) -> &Backends {
        &self.inner.backends
    }

    /// The store this manager keeps.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// The latency histograms and counters of this manager and the server over it.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// A client of the agent of the caller's running sandbox `id`, counted as a call under way
    /// until it is dropped (a pause waits for it): 404 when there is no such sandbox, 409 when
    /// it is not running.
    pub async fn agent(&self, caller: &Caller, id: &str) -> ManagerResult<SandboxAgent> {
        // A pause that starts between the two steps is waited for once: the second look
        // resumes the sandbox (auto_resume) or says it is paused.
        for _ in 0..2 {
            let live = self.inner.live_for(&caller.tenant, id).await?;
            if let Some(call) = live.enter_call() {
                return Ok(SandboxAgent {
                    client: live.client.clone(),
                    call,
                });
            }
        }
        Err(ManagerError::Conflict(format!(
            "sandbox {id} is paused; resume it first"
        )))
    }

    /// How many processes of the caller's sandbox `id` the kernel's OOM killer has killed so
    /// far.
    pub async fn oom_kills(&self, caller: &Caller, id: &str) -> ManagerResult<u64> {
        let live = self.inner.live_any(&caller.tenant, id).await?;
        let kills = live.instance.lock().await.oom_kills();
        Ok(kills)
    }

    /// How many sandboxes this manager runs now.
    pub fn live_count(&self) -> usize {
        lock(&self.inner.live).len()
    }

    /// Makes a sandbox for the caller's tenant (charged to the caller's key's quotas, if it
    /// holds a key) and waits until its agent answers. On failure nothing is left running and
    /// the record, if one was made, is `failed` with the reason.
    pub async fn create(
        &self,
        caller: &Caller,
        req: v1::CreateSandbox,
    ) -> ManagerResult<v1::Sandbox> {
        self.create_with_id(caller, req, None).await
    }

    /// [`SandboxManager::create`] of a sandbox with the given `id` (a sandbox id's shape, see
    /// [`crate::ids::is_sandbox_id`]) instead of a fresh one, as `moat run --id` asks; such a
    /// create never takes a warm-pool member.
    pub async fn create_with_id(
        &self,
        caller: &Caller,
        req: v1::CreateSandbox,
        id: Option<String>,
    ) -> ManagerResult<v1::Sandbox> {
        if let Some(id) = &id {
            check_sandbox_id(id)?;
        }
        self.create_keyed(caller, req, id, None).await
    }

    /// [`SandboxManager::create_with_id`], recording `idempotency_key` (already checked) with
    /// the sandbox in the same transaction.
    async fn create_keyed(
        &self,
        caller: &Caller,
        req: v1::CreateSandbox,
        id: Option<String>,
        idempotency_key: Option<String>,
    ) -> ManagerResult<v1::Sandbox> {
        let inner = self.inner.clone();
        let tenant = caller.tenant.clone();
        let key_id = caller.key_id.clone();
        let began = Instant::now();
        let admin = caller.is_admin();
        to_the_end("create", async move {
            let asked = Asked {
                id,
                idempotency_key,
            };
            inner.create(tenant, key_id, admin, req, asked, began).await
        })
        .await
    }

    /// The caller's sandbox `id`.
    pub async fn get(&self, caller: &Caller, id: &str) -> ManagerResult<v1::Sandbox> {
        let (tenant, id) = (caller.tenant.clone(), id.to_owned());
        let rec = self.inner.db(move |s| s.get_sandbox(&tenant, &id)).await?;
        Ok(to_v1(&rec))
    }

    /// One page of the caller's sandboxes matching `query`.
    pub async fn list(
        &self,
        caller: &Caller,
        query: v1::ListSandboxes,
    ) -> ManagerResult<v1::SandboxList> {
        let filter = SandboxFilter {
            states: query.states.clone(),
            metadata: query.metadata.into_iter().collect(),
            after: query
                .after
                .as_deref()
                .map(Cursor::decode)
                .transpose()
                .map_err(ManagerError::from)?,
            limit: query.limit.unwrap_or(100).min(MAX_PAGE),
            ..SandboxFilter::default()
        };
        self.list_filtered(&caller.tenant, filter).await
    }

    /// One page of `tenant`'s sandboxes that `filter` selects.
    pub(crate) async fn list_filtered(
        &self,
        tenant: &str,
        filter: SandboxFilter,
    ) -> ManagerResult<v1::SandboxList> {
        let tenant = tenant.to_owned();
        let page = self
            .inner
            .db(move |s| s.list_sandboxes(&tenant, &filter))
            .await?;
        Ok(v1::SandboxList {
            sandboxes: page.items.iter().map(to_v1).collect(),
            next: page.next.map(|c| c.encode()),
        })
    }

    /// Destroys the sandbox and records it `killed` (reason `deleted`). Deleting an ended
    /// sandbox changes nothing and returns it as it is.
    pub async fn delete(&self, caller: &Caller, id: &str) -> ManagerResult<v1::Sandbox> {
        let inner = self.inner.clone();
        let (tenant, id) = (caller.tenant.clone(), id.to_owned());
        to_the_end("delete", async move {
            inner.end(&tenant, &id, EndReason::Deleted).await
        })
        .await
    }

    /// Sets the sandbox to expire `timeout_secs` from now (at most the configured maximum).
    pub async fn set_timeout(
        &self,
        caller: &Caller,
        id: &str,
        req: v1::SetTimeout,
    ) -> ManagerResult<v1::Sandbox> {
        let ttl = self.inner.ttl(Some(req.timeout_secs))?;
        let (tenant, id) = (caller.tenant.clone(), id.to_owned());
        let at = now_ms().saturating_add(ms(ttl));
        let rec = self
            .inner
            .db(move |s| s.set_sandbox_expiry(&tenant, &id, Some(at)))
            .await?;
        Ok(to_v1(&rec))
    }

    /// Makes the sandbox expire `timeout_secs` from now unless it already expires later:
    /// the time to live only grows (E2B's connect). The same bounds as
    /// [`SandboxManager::set_timeout`] apply.
    pub async fn extend_timeout(
        &self,
        caller: &Caller,
        id: &str,
        timeout_secs: u64,
    ) -> ManagerResult<v1::Sandbox> {
        let ttl = self.inner.ttl(Some(timeout_secs))?;
        let (tenant, id) = (caller.tenant.clone(), id.to_owned());
        let at = now_ms().saturating_add(ms(ttl));
        let rec = self
            .inner
            .db(move |s| s.extend_sandbox_expiry(&tenant, &id, at))
            .await?;
        Ok(to_v1(&rec))
    }

    /// Ends every sandbox whose TTL has passed at `now` (Unix ms): destroyed and recorded
    /// `killed` with reason `ttl`, or, when its lifecycle says so, paused (one already paused
    /// stays so) with no time to live left. Returns the ids of those done within
    /// [`REAP_WAIT`]; the others go on in their tasks, and later passes leave them be.
    pub async fn reap_expired(&self, now: i64) -> ManagerResult<Vec<String>> {
        let expired = self.inner.db(move |s| s.expired(now)).await?;
        // Side by side, each in a task of its own: a pause may wait for calls under way
        // (PAUSE_DRAIN_LIMIT) or save a sandbox to disk, and one sandbox doing so must not
        // hold up the others' ends, in this pass or the next.
        let mut ends = futures_util::stream::FuturesUnordered::new();
        for rec in expired {
            let Some(mark) = Reaping::mark(&self.inner.reaping, &rec.id) else {
                continue;
            };
            let inner = self.inner.clone();
            ends.push(self.inner.reaping.tasks.spawn(async move {
                let _mark = mark;
                let _place = inner.reaping.places.acquire().await;
                // As it is now: a reap of an earlier pass may have paused it (its time to
                // live cleared) between this pass's listing and its mark.
                let (t, i) = (rec.tenant.clone(), rec.id.clone());
                let rec = inner.db(move |s| s.get_sandbox(&t, &i)).await?;
                if rec.state.is_ended() || rec.expires_at.is_none_or(|at| at > now) {
                    return Err(ManagerError::NotFound(format!(
                        "sandbox {} is no longer expired",
                        rec.id
                    )));
                }
                let pauses = stored_plan(&rec)
                    .ok()
                    .flatten()
                    .is_some_and(|p| p.lifecycle.on_timeout == v1::OnTimeout::Pause);
                if pauses && inner.pause_at_timeout(&rec, now).await {
                    return Ok(rec.id);
                }
                inner.end(&rec.tenant, &rec.id, EndReason::Ttl).await?;
                Ok::<_, ManagerError>(rec.id)
            }));
        }
        let mut reaped = Vec::with_capacity(ends.len());
        let deadline = tokio::time::Instant::now() + REAP_WAIT;
        while let Ok(Some(done)) =
            tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut ends)).await
        {
            let done = done.map_err(|e| ManagerError::Internal(format!("reap task: {e}")))?;
            match done {
                Ok(id) => reaped.push(id),
                // Deleted meanwhile: nothing left to reap.
                Err(ManagerError::NotFound(_)) => {}
                Err(e) => tracing::warn!("reaping an expired sandbox: {e}"),
            }
        }
        Ok(reaped)
    }

    /// Waits for the ends and pauses reaper passes started and left under way (at shutdown,
    /// so that none is cut off halfway).
    pub async fn finish_reaps(&self) {
        self.inner.reaping.tasks.close();
        self.inner.reaping.tasks.wait().await;
    }
}

/// The expired sandboxes being ended or paused, so that a reaper pass does not start a second
/// end of one a pass before it is still ending.
#[derive(Debug)]
struct Reaping {
    ids: Mutex<std::collections::HashSet<String>>,
    places: tokio::sync::Semaphore,
    /// The reaps under way, for the shutdown to wait for.
    tasks: tokio_util::task::TaskTracker,
}

/// A sandbox marked as being reaped; unmarked when dropped (its end done or failed).
struct ReapMark {
    reaping: Arc<Reaping>,
    id: String,
}

impl Reaping {
    /// Marks `id`, unless it is being reaped already.
    fn mark(reaping: &Arc<Reaping>, id: &str) -> Option<ReapMark> {
        lock(&reaping.ids).insert(id.to_owned()).then(|| ReapMark {
            reaping: reaping.clone(),
            id: id.to_owned(),
        })
    }
}

impl Drop for ReapMark {
    fn drop(&mut self) {
        lock(&self.reaping.ids).remove(&self.id);
    }
}

impl Inner {
    /// Runs a store call on the blocking pool, or here for a store in memory (`moat run`'s),
    /// whose calls take microseconds and never wait for a disk: a hop to another thread and
    /// back would cost more than the call.
    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> ManagerResult<T> {
        if self.store.path().is_none() {
            return f(&self.store).map_err(ManagerError::from);
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| ManagerError::Internal(format!("store task: {e}")))?
            .map_err(ManagerError::from)
    }

    fn ttl(&self, secs: Option<u64>) -> ManagerResult<Duration> {
        let Some(secs) = secs else {
            return Ok(self.opts.default_ttl);
        };
        let ttl = Duration::from_secs(secs);
        if secs == 0 || ttl > self.opts.max_ttl {
            return Err(ManagerError::Invalid(format!(
                "timeout_secs {secs} must be 1 to {}",
                self.opts.max_ttl.as_secs()
            )));
        }
        Ok(ttl)
    }

    async fn create(
        self: Arc<Self>,
        tenant: String,
        key_id: Option<String>,
        admin: bool,
        req: v1::CreateSandbox,
        asked: Asked,
        began: Instant,
    ) -> ManagerResult<v1::Sandbox> {
        let public_traffic = req.public_traffic;
        // Checked before anything else: a malformed policy is the client's to fix first.
        let asked_network = req
            .network
            .as_ref()
            .map(|n| self.policy_of(n, admin))
            .transpose()?;
        let lifecycle = req.lifecycle.unwrap_or_default();
        let mut plan = match req.snapshot.clone() {
            Some(snapshot) => self.plan_from_snapshot(&tenant, &snapshot, req).await?,
            None => self.plan_from_template(&tenant, req).await?,
        };
        plan.public_traffic = public_traffic;
        if let Some(policy) = asked_network {
            plan.network = policy;
            plan.poolable = false;
        }
        network::check_backend(self.backends.get(&plan.backend)?.as_ref(), &plan.network)?;
        if plan.memory.is_some() && matches!(plan.network, NetworkPolicy::Egress(_)) {
            return Err(ManagerError::Invalid(
                "a sandbox restored from a snapshot with memory has no network: its processes \
                 were saved without one (a sandbox with a network cannot save its memory); ask \
                 for no network"
                    .into(),
            ));
        }
        if lifecycle.on_timeout == v1::OnTimeout::Pause {
            let backend = self.backends.get(&plan.backend)?;
            crate::backend::Capabilities::require(
                backend.capabilities().pause,
                backend.name(),
                "pause sandboxes (lifecycle.on_timeout \"pause\")",
            )
            .map_err(|e| ManagerError::Invalid(e.to_string()))?;
        }
        plan.lifecycle = lifecycle;
        if asked.id.is_some() {
            plan.id = asked.id;
            plan.poolable = false;
        }
        plan.idempotency_key = asked.idempotency_key;
        self.create_planned(tenant, key_id, plan, began).await
    }

    /// What a create from a template makes; whatever the client can get wrong is checked
    /// here, before anything is recorded.
    async fn plan_from_template(
        &self,
        tenant: &str,
        req: v1::CreateSandbox,
    ) -> ManagerResult<SandboxPlan> {
        check_template_name(&req.template).map_err(ManagerError::from)?;
        let (owner, spec, limits) =
            self.template(tenant, &req.template)
                .await
                .map_err(|e| match e {
                    ManagerError::NotFound(_) => {
                        ManagerError::Invalid(format!("unknown template {:?}", req.template))
                    }
                    e => e,
                })?;
        // The template is read once: everything of it the sandbox needs is in the plan.
        let mut plan = self.plan_of_template(&req.template, owner, &spec, &limits)?;
        if let Some(snapshot) = &spec.snapshot {
            self.verify_snapshot(snapshot).await?;
        }
        if let Some(secs) = req.timeout_secs {
            self.ttl(Some(secs))?;
            plan.timeout_secs = Some(secs);
        }
        check_env("env", &req.env)?;
        plan.resources = limits.resolve(req.resources.as_ref())?;
        // A request that asks for nothing a started member lacks can take one.
        plan.poolable = req.resources.is_none() && req.env.is_empty();
        plan.env = req.env;
        plan.metadata = req.metadata;
        Ok(plan)
    }

    /// The plan of a sandbox of `template` (named `name`, owned by `owner`, its limits
    /// `limits`) with the template's defaults, made by the backend the template names or the
    /// default one.
    fn plan_of_template(
        &self,
        name: &str,
        owner: Option<String>,
        template: &v1::TemplateSpec,
        limits: &TemplateLimits,
    ) -> ManagerResult<SandboxPlan> {
        let backend = self.backends.resolve(template.backend.as_deref())?;
        let mut plan = SandboxPlan::of_template(name, owner, template, limits, backend.name());
        match &template.rootfs {
            v1::Rootfs::Image(reference) => {
                plan.rootfs = v1::Rootfs::Dir(self.image_tree(name, reference)?);
            }
            v1::Rootfs::Build(digest) => {
                plan.rootfs = v1::Rootfs::Dir(self.built_tree(name, digest)?);
            }
            v1::Rootfs::Host | v1::Rootfs::Dir(_) => {}
        }
        // Checked when the template was written, by whoever wrote it; the server's
        // `--egress` as it is now.
        if let Some(n) = &template.network {
            plan.network = NetworkPolicy::from_v1(n)
                .map_err(|e| ManagerError::Internal(format!("template {name}'s network: {e}")))?;
            self.check_egress_on(&plan.network)?;
        }
        // Started from a snapshot with memory: restored, nothing of the template runs again.
        if let Some(snapshot) = &template.snapshot {
            let dir = self
                .snapshot_dir()?
                .join(format!("{snapshot}{}", memory::MEMORY_SUFFIX));
            plan.memory = Some(dir);
        }
        Ok(plan)
    }

    /// The quotas of `tenant`'s key `key` as the store checks them.
    async fn key_limits(&self, tenant: &str, key: &str) -> ManagerResult<SandboxQuotas> {
        let (t, k) = (tenant.to_owned(), key.to_owned());
        let q = self.db(move |s| s.get_key(&t, &k)).await?.quotas;
        Ok(SandboxQuotas {
            max_sandboxes: q.max_sandboxes.map(u64::from),
            max_memory_bytes: q.max_memory_bytes,
            max_pids: q.max_pids,
        })
    }

    /// The template `name` as `tenant` sees it: its owner (`None` for a built-in), spec and
    /// typed limits.
    async fn template(
        &self,
        tenant: &str,
        name: &str,
    ) -> ManagerResult<(Option<String>, v1::TemplateSpec, TemplateLimits)> {
        let (t, n) = (tenant.to_owned(), name.to_owned());
        let template = self.db(move |s| s.get_template(&t, &n)).await?;
        let (spec, limits) = read_template(&template)?;
        Ok((template.tenant, spec, limits))
    }

    /// Records the planned sandbox and makes it (or claims a warm-pool member for it), with
    /// the plan's layer restored before it counts as running.
    async fn create_planned(
        self: Arc<Self>,
        tenant: String,
        key_id: Option<String>,
        plan: SandboxPlan,
        began: Instant,
    ) -> ManagerResult<v1::Sandbox> {
        // Resolved when the plan was made; a backend unregistered since is refused here,
        // before anything is recorded. So is a network a server started with `--egress none`
        // since gives nobody (a fork's or a snapshot's recorded one).
        let backend = self.backends.get(&plan.backend)?.clone();
        self.check_egress_on(&plan.network)?;
        let limits = match &key_id {
            Some(key) => self.key_limits(&tenant, key).await?,
            None => SandboxQuotas::default(),
        };
        // The request's time to live, else the template's, else the server's default.
        let ttl = self.ttl(plan.timeout_secs)?;
        let expires_at = Some(now_ms().saturating_add(ms(ttl)));
        let public_traffic = plan.public_traffic.unwrap_or(self.opts.public_traffic);
        if plan.poolable {
            let key = pool::PoolKey {
                tenant: plan.template_owner.clone(),
                name: plan.template.clone(),
            };
            if let Some(member) = self.pools.take(&key) {
                // A poolable plan asks for the template's defaults, which the member has.
                let resources = plan.resources;
                let recorded = recorded_plan(&plan, &member.id)?;
                let new = NewSandbox {
                    id: member.id.clone(),
                    tenant: tenant.clone(),
                    key_id,
                    template: plan.template.clone(),
                    state: SandboxState::Running,
                    metadata: plan.metadata,
                    resources: serde_json::to_value(limits_v1(&resources))
                        .map_err(|e| ManagerError::Internal(e.to_string()))?,
                    memory_bytes: resources.memory_bytes,
                    expires_at,
                    public_traffic,
                    backend: member.backend.name().to_owned(),
                    plan: Some(recorded),
                    idempotency_key: plan.idempotency_key.clone(),
                };
                if let Some(layer) = &plan.layer
                    && let Err(e) = restore_layer(&member.client, layer).await
                {
                    self.discard(member).await;
                    self.pools.claimed();
                    return Err(e);
                }
                let restored = plan.layer.is_some();
                let claimed = self.claim(&key, member, new, limits, restored).await?;
                // Successes only: a refused request would pull the latency towards zero.
                self.metrics.observe_claim(began.elapsed());
                return Ok(claimed);
            }
        }
        let id = match plan.id.clone() {
            Some(id) => id,
            None => generate_sandbox_id().map_err(ManagerError::from)?,
        };
        let recorded = recorded_plan(&plan, &id)?;
        let new = NewSandbox {
            id: id.clone(),
            tenant: tenant.clone(),
            key_id,
            template: plan.template.clone(),
            state: SandboxState::Starting,
            metadata: plan.metadata.clone(),
            resources: serde_json::to_value(limits_v1(&plan.resources))
                .map_err(|e| ManagerError::Internal(e.to_string()))?,
            memory_bytes: plan.resources.memory_bytes,
            expires_at,
            public_traffic,
            backend: backend.name().to_owned(),
            plan: Some(recorded),
            idempotency_key: plan.idempotency_key.clone(),
        };
        self.db(move |s| s.insert_sandbox_within(&new, limits))
            .await?;

        match self
            .start(&tenant, &backend, &id, &plan, public_traffic)
            .await
        {
            Ok(()) => {}
            Err(e) => {
                let reason = EndReason::Failed(e.to_string());
                let (t, i) = (tenant.clone(), id.clone());
                // Ended by a concurrent delete is fine: it is not running either way.
                if let Err(store_err) = self
                    .db(move |s| s.update_sandbox_state(&t, &i, SandboxState::Failed, Some(reason)))
                    .await
                    && !matches!(store_err, ManagerError::Conflict(_))
                {
                    tracing::warn!(sandbox = %id, "recording a failed create: {store_err}");
                }
                return Err(e);
            }
        }
        let (t, i) = (tenant.clone(), id.clone());
        match self
            .db(move |s| s.update_sandbox_state(&t, &i, SandboxState::Running, None))
            .await
        {
            Ok(rec) => {
                self.metrics.observe_create(began.elapsed());
                Ok(to_v1(&rec))
            }
            Err(e) => {
                // Deleted while starting (or the store failed): nothing may stay running.
                self.remove_and_destroy(&id).await;
                if matches!(e, ManagerError::Conflict(_)) {
                    return Err(ManagerError::Conflict(format!(
                        "sandbox {id} was ended while it started"
                    )));
                }
                let (t, i) = (tenant.clone(), id.clone());
                let reason = EndReason::Failed(e.to_string());
                let _ = self
                    .db(move |s| s.update_sandbox_state(&t, &i, SandboxState::Failed, Some(reason)))
                    .await;
                Err(e)
            }
        }
    }

    /// Hands a warm-pool member to the tenant of `new`: recorded (quotas checked) in the same
    /// transaction that ends its membership, then live. A member a quota refused goes back,
    /// unless a layer was `restored` into it (it is then no longer like the others).
    async fn claim(
        &self,
        key: &pool::PoolKey,
        member: pool::Member,
        new: NewSandbox,
        limits: SandboxQuotas,
        restored: bool,
    ) -> ManagerResult<v1::Sandbox> {
        let tenant = new.tenant.clone();
        let public_traffic = new.public_traffic;
        match self.db(move |s| s.claim_pool_member(&new, limits)).await {
            Ok(rec) => {
                let id = rec.id.clone();
                self.adopt(&tenant, member, public_traffic);
                self.pools.claimed();
                // A delete that read the record between the claim's commit and the adoption
                // found nothing live to destroy: do it for it.
                let (t, i) = (tenant.clone(), id.clone());
                if let Ok(now) = self.db(move |s| s.get_sandbox(&t, &i)).await
                    && now.state.is_ended()
                {
                    self.remove_and_destroy(&id).await;
                    return Ok(to_v1(&now));
                }
                Ok(to_v1(&rec))
            }
            Err(e @ ManagerError::QuotaExceeded(_)) if !restored => {
                if let Some(member) = self.pools.put_back(key, member) {
                    self.discard(member).await;
                }
                Err(e)
            }
            Err(e) => {
                self.discard(member).await;
                self.pools.claimed();
                Err(e)
            }
        }
    }

    /// Makes sandbox `id` of `plan` (restoring the plan's layer into it, if any), connects to
    /// its agent and registers it as live; on failure, destroys whatever was made.
    async fn start(
        &self,
        tenant: &str,
        backend: &Arc<dyn Backend>,
        id: &str,
        plan: &SandboxPlan,
        public_traffic: bool,
    ) -> ManagerResult<()> {
        let (instance, client, egress) = self.boot(tenant, backend, id, plan).await?;
        // Registered before it is recorded running, so a delete that sees it running finds it.
        lock(&self.live).insert(
            id.to_owned(),
            Arc::new(
                Live::new(
                    tenant,
                    client,
                    backend.clone(),
                    instance,
                    plan.env.clone(),
                    public_traffic,
                )
                .with_egress(egress),
            ),
        );
        Ok(())
    }

    /// Makes sandbox `id` of `plan` with `backend`, connects to its agent, restores the plan's
    /// layer into it (a snapshot's files, before anything of the template runs), starts the
    /// template's `start` script and waits for its `ready` script to pass. Its network's
    /// connections count for tenant `owner`. On failure, destroys whatever was made.
    async fn boot(
        &self,
        owner: &str,
        backend: &Arc<dyn Backend>,
        id: &str,
        plan: &SandboxPlan,
    ) -> ManagerResult<(
        Box<dyn Instance>,
        AgentClient,
        Option<crate::network::Egress>,
    )> {
        let made = match &plan.memory {
            // Its processes come back running: nothing of the template's starts again.
            Some(dir) => backend.restore(id, plan, dir).await,
            None => backend.create(id, plan).await,
        };
        // What the plan asks for that cannot be (a template directory gone) is the caller's
        // to see as such; anything else is the host's.
        let mut instance = made.map_err(|e| match e {
            crate::EngineError::Invalid(_) | crate::EngineError::NotFound(_) => {
                ManagerError::from(e)
            }
            e => ManagerError::Unavailable(format!("the sandbox could not be made: {e}")),
        })?;
        let connected = async {
            // Served before anything of the template runs: a start script may need it.
            let egress = self
                .serve_network(id, owner, &plan.network, instance.as_ref())
                .await?;
            let channel = instance
                .take_channel()
                .ok_or_else(|| ManagerError::Internal("backend gave no agent channel".into()))?;
            let client = AgentClient::handshake(channel)
                .await
                .map_err(|e| ManagerError::Unavailable(format!("agent handshake: {e}")))?;
            client
                .health()
                .await
                .map_err(|e| ManagerError::Unavailable(format!("agent health: {e}")))?;
            if let Some(layer) = &plan.layer {
                restore_layer(&client, layer).await?;
            }
            if plan.memory.is_none() {
                readiness::start_and_wait(&client, &plan.readiness).await?;
            }
            Ok::<_, ManagerError>((client, egress))
        }
        .await;
        match connected {
            Ok((client, egress)) => Ok((instance, client, egress)),
            Err(e) => {
                if let Err(d) = instance.destroy().await {
                    tracing::warn!(sandbox = %id, "destroying a failed sandbox: {d}");
                }
                Err(e)
            }
        }
    }

    async fn remove_and_destroy(&self, id: &str) {
        let live = lock(&self.live).remove(id);
        if let Some(live) = live {
            lock(&live.egress).take();
            if let Err(e) = live.instance.lock().await.destroy().await {
                tracing::warn!(sandbox = %id, "destroy: {e}");
            }
            // A sandbox paused to disk leaves nothing there either.
            if let Some(dir) = self.disk_pause_dir(&live, id)
                && let Err(e) = tokio::fs::remove_dir_all(&dir).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(sandbox = %id, "removing {}: {e}", dir.display());
            }
            self.paused_bytes.remove(id);
        }
    }

    /// Destroys the sandbox if it runs and records it killed for `reason`; an ended one is
    /// returned as it is.
    async fn end(&self, tenant: &str, id: &str, reason: EndReason) -> ManagerResult<v1::Sandbox> {
        self.end_as(tenant, id, SandboxState::Killed, reason).await
    }

    /// [`Inner::end`] with the final state (`killed` or `failed`).
    async fn end_as(
        &self,
        tenant: &str,
        id: &str,
        state: SandboxState,
        reason: EndReason,
    ) -> ManagerResult<v1::Sandbox> {
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let rec = self.db(move |s| s.get_sandbox(&t, &i)).await?;
        if rec.state.is_ended() {
            // The store said it is the tenant's, so the live entry (same id) is too.
            self.remove_and_destroy(id).await;
            return Ok(to_v1(&rec));
        }
        // Recorded before it is destroyed: when the record cannot be written (a full data
        // dir), the sandbox runs on as recorded and the caller may try again; once it is
        // written, the destroy follows whatever happens to it.
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let recorded = self
            .db(move |s| s.update_sandbox_state(&t, &i, state, Some(reason)))
            .await;
        match recorded {
            Ok(ended) => {
                self.remove_and_destroy(id).await;
                // Paused to disk and kept for a server that can run its backend: what it saved
                // goes with it.
                if rec.state == SandboxState::Paused
                    && let Some(snapshots) = &self.opts.snapshot_dir
                    && !lock(&self.live).contains_key(id)
                {
                    self.forget_paused_to_disk(id, &snapshots.join(memory::PAUSED_DIR).join(id));
                }
                Ok(to_v1(&ended))
            }
            // Ended meanwhile by another path (a failed create, a concurrent delete).
            Err(ManagerError::Conflict(_)) => {
                self.remove_and_destroy(id).await;
                let (t, i) = (tenant.to_owned(), id.to_owned());
                Ok(to_v1(&self.db(move |s| s.get_sandbox(&t, &i)).await?))
            }
            Err(e) => Err(e),
        }
    }

    /// The live, running sandbox `id` of `tenant`, or why there is none: 404 when there is no
    /// such sandbox, 409 when it is paused (and its lifecycle does not resume it) or not
    /// running, 503 when its agent does not answer its health checks.
    async fn live_for(self: &Arc<Self>, tenant: &str, id: &str) -> ManagerResult<Arc<Live>> {
        let mut live = self.live_any(tenant, id).await?;
        if live.is_paused()
            && let Some(ttl) = self.resumes_on_call(tenant, id).await
        {
            let (inner, t, i) = (self.clone(), tenant.to_owned(), id.to_owned());
            let resumed = to_the_end(
                "resume",
                async move { inner.resume(&t, &i, Some(ttl)).await },
            );
            match resumed.await {
                // Resumed here, or by a call that got there first.
                Ok(_) | Err(ManagerError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
            live = self.live_any(tenant, id).await?;
        }
        if live.is_paused() {
            return Err(ManagerError::Conflict(format!(
                "sandbox {id} is paused; resume it first"
            )));
        }
        if let Some(refused) = live.health.refusal(id) {
            return Err(refused);
        }
        Ok(live)
    }

    /// [`Inner::live_any`] with its operations lock held. Taken after the lock, so that an
    /// operation that waited for a restore (which puts a new `Live` in place, sharing the
    /// lock) acts on the sandbox as it now is, not on the one it replaced.
    async fn live_locked(
        &self,
        tenant: &str,
        id: &str,
    ) -> ManagerResult<(Arc<Live>, tokio::sync::OwnedMutexGuard<()>)> {
        let ops = self.live_any(tenant, id).await?.ops.clone();
        let guard = ops.lock_owned().await;
        Ok((self.live_any(tenant, id).await?, guard))
    }

    /// The live sandbox `id` of `tenant`, paused or not, or why there is none.
    async fn live_any(&self, tenant: &str, id: &str) -> ManagerResult<Arc<Live>> {
        let live = lock(&self.live).get(id).cloned();
        if let Some(live) = live
            && live.tenant == tenant
        {
            return Ok(live);
        }
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let rec = self.db(move |s| s.get_sandbox(&t, &i)).await?;
        if rec.state == SandboxState::Paused
            && let Err(why) = self.backends.get(&rec.backend)
        {
            return Err(ManagerError::Unavailable(format!(
                "sandbox {id} is paused to disk by the {} backend, which this server cannot \
                 run ({why}); it is kept for a server that can, or until it is deleted",
                rec.backend
            )));
        }
        Err(not_running(&rec))
    }
}

/// Why the sandbox of record `rec`, which this server does not run, takes no calls: one
/// sentence for a 409, with the reason it ended when it has one.
fn not_running(rec: &SandboxRecord) -> ManagerError {
    let id = &rec.id;
    ManagerError::Conflict(match (rec.state, &rec.end_reason) {
        (SandboxState::Failed, Some(EndReason::Failed(why))) => {
            format!("sandbox {id} has failed ({why}); it is not running")
        }
        (SandboxState::Failed, _) => format!("sandbox {id} has failed; it is not running"),
        (SandboxState::Killed, Some(EndReason::Ttl)) => {
            format!("sandbox {id} has ended (its time to live ran out); it is not running")
        }
        (SandboxState::Killed, Some(EndReason::Deleted)) => {
            format!("sandbox {id} has ended (it was deleted); it is not running")
        }
        (SandboxState::Killed, Some(EndReason::ServerRestart)) => {
            format!("sandbox {id} has ended (its server stopped); it is not running")
        }
        (SandboxState::Killed, Some(EndReason::Other(why) | EndReason::Failed(why))) => {
            format!("sandbox {id} has ended ({why}); it is not running")
        }
        (SandboxState::Killed, None) => format!("sandbox {id} has ended; it is not running"),
        (SandboxState::Starting, _) => format!("sandbox {id} is still starting; try again shortly"),
        // The record says it is live but this server holds no sandbox for it.
        (state, _) => {
            format!("sandbox {id} is recorded {state} but this server does not run it; delete it")
        }
    })
}

fn check_env(what: &str, env: &BTreeMap<String, String>) -> ManagerResult<()> {
    if env.len() > MAX_ENV_VARS {
        return Err(ManagerError::Invalid(format!(
            "{what}: at most {MAX_ENV_VARS} variables"
        )));
    }
    for (k, v) in env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(ManagerError::Invalid(format!(
                "{what}: invalid variable {:?} (names are non-empty, without '=' or NUL)",
                k.chars().take(64).collect::<String>()
            )));
        }
    }
    Ok(())
}

/// The sandbox's limits: the template's defaults, then the request, checked against the
/// template's maximum and the engine's bounds. Parses the spec's limits: for a template being
/// written (a create reads the stored typed ones).
fn resolve_resources(
    spec: &v1::TemplateSpec,
    req: Option<&v1::ResourceRequest>,
) -> ManagerResult<Resources> {
    Ok(TemplateLimits::of(spec)?.resolve(req)?)
}

/// A stored template's spec and typed limits: the limits as they were stored with it, or,
/// for a template stored before they were (the server fills them in at start), parsed from
/// its spec.
pub(crate) fn read_template(
    rec: &crate::store::TemplateRecord,
) -> ManagerResult<(v1::TemplateSpec, TemplateLimits)> {
    let name = &rec.name;
    let spec: v1::TemplateSpec = serde_json::from_value(rec.spec.clone())
        .map_err(|e| ManagerError::Internal(format!("template {name:?} has a bad spec: {e}")))?;
    let limits = match &rec.limits {
        Some(l) => serde_json::from_value(l.clone()).map_err(|e| {
            ManagerError::Internal(format!("template {name:?} has bad limits: {e}"))
        })?,
        None => TemplateLimits::of(&spec)?,
    };
    Ok((spec, limits))
}

/// `spec`'s typed limits as the store keeps them beside it.
pub(crate) fn limits_json(spec: &v1::TemplateSpec) -> ManagerResult<serde_json::Value> {
    let limits = TemplateLimits::of(spec)?;
    serde_json::to_value(limits)
        .map_err(|e| ManagerError::Internal(format!("template limits: {e}")))
}

/// Fills in the typed limits of templates stored before they were kept (once, at start); a
/// template whose spec no longer parses is left to fail where it is used.
fn fill_template_limits(store: &Store) -> ManagerResult<()> {
    for rec in store.all_templates()? {
        if rec.limits.is_some() {
            continue;
        }
        let limits = serde_json::from_value::<v1::TemplateSpec>(rec.spec.clone())
            .map_err(|e| e.to_string())
            .and_then(|spec| limits_json(&spec).map_err(|e| e.to_string()));
        match limits {
            Ok(l) => {
                store.fill_template_limits(rec.tenant.as_deref(), &rec.name, &l)?;
            }
            Err(e) => tracing::warn!(template = %rec.name, "template limits: {e}"),
        }
    }
    Ok(())
}

fn to_v1(rec: &SandboxRecord) -> v1::Sandbox {
    v1::Sandbox {
        id: rec.id.clone(),
        template: rec.template.clone(),
        state: rec.state,
        metadata: rec.metadata.clone(),
        // Written by this manager; an unreadable value shows as zeros rather than failing.
        resources: serde_json::from_value(rec.resources.clone()).unwrap_or_default(),
        created_at: rec.created_at,
        expires_at: rec.expires_at,
        ended_at: rec.ended_at,
        end_reason: rec.end_reason.as_ref().map(ToString::to_string),
        access_token: None,
        public_traffic: rec.public_traffic,
        traffic_access_token: None,
        backend: rec.backend.clone(),
        // Only this part of the plan, which the listing of many records needs.
        lifecycle: rec
            .plan
            .as_ref()
            .and_then(|p| p.get("lifecycle"))
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn templates_stored_without_limits_get_them_at_start() {
        let store = Store::open_in_memory().unwrap();
        store.create_tenant("acme", "Acme").unwrap();
        let spec = v1::TemplateSpec {
            resources: Some(v1::ResourceRequest {
                memory: Some("256M".into()),
                ..Default::default()
            }),
            ..v1::TemplateSpec::new(v1::Rootfs::Host)
        };
        let json = serde_json::to_value(&spec).unwrap();
        store.create_template(Some("acme"), "old", &json).unwrap();
        fill_template_limits(&store).unwrap();
        let rec = store.get_template("acme", "old").unwrap();
        assert_eq!(rec.spec, json, "the spec is kept as written");
        let stored: TemplateLimits = serde_json::from_value(rec.limits.clone().unwrap()).unwrap();
        assert_eq!(stored.defaults.memory_bytes, 256 << 20);
        assert_eq!(read_template(&rec).unwrap(), (spec, stored));
    }

    #[test]
    fn resources_resolve_within_the_template() {
        let mut spec = host_template_spec();
        let r = resolve_resources(&spec, None).unwrap();
        assert_eq!(r, Resources::default());
        let req = v1::ResourceRequest {
            memory: Some("256M".into()),
            cpus: Some(0.5),
            ..Default::default()
        };
        let r = resolve_resources(&spec, Some(&req)).unwrap();
        assert_eq!((r.memory_bytes, r.cpu_millis), (256 << 20, 500));
        spec.max_resources = Some(v1::ResourceRequest {
            memory: Some("128M".into()),
            ..Default::default()
        });
        assert!(matches!(
            resolve_resources(&spec, Some(&req)),
            Err(ManagerError::Invalid(_))
        ));
        for bad in [
            v1::ResourceRequest {
                memory: Some("lots".into()),
                ..Default::default()
            },
            v1::ResourceRequest {
                cpus: Some(-1.0),
                ..Default::default()
            },
            v1::ResourceRequest {
                pids: Some(1),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                resolve_resources(&host_template_spec(), Some(&bad)),
                Err(ManagerError::Invalid(_))
            ));
        }
    }
}
