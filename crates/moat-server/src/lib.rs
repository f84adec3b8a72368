//! moat's HTTP surfaces over the engine, translators only: the `/v1` REST API, the
//! E2B-compatible control plane (see `e2b`), the sandbox traffic of E2B's SDKs (see
//! `sandbox_proxy`) and the health endpoints, on one listener. Each maps its wire types to
//! engine calls and the engine's domain errors to its own answers (`error.rs`).
//!
//! Every answer other than a success is a JSON [`moat_proto::v1::ErrorBody`], including the
//! ones the HTTP layer itself produces (bad JSON, oversized bodies, unknown routes, wrong
//! methods), so clients parse one error format; under E2B's paths it is E2B's
//! `{"code", "message"}` instead. Only `/healthz` and `/readyz` are open; `/v1` needs an API
//! key (`Authorization: Bearer`), the E2B routes the same keys as `X-API-KEY`, and `/metrics`
//! an admin key. Every authenticated request is rate-limited per key.

mod auth;
mod builds;
mod conn_limits;
mod e2b;
mod error;
mod extract;
mod files;
mod held_body;
mod jobs;
mod keys;
mod mcp;
mod metrics;
pub mod openapi;
mod rate_limit;
mod router;
mod sandbox_proxy;
mod sandboxes;
mod snapshots;
mod storage_guard;
mod templates;

use moat_engine::clock::now_ms;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use moat_engine::manager::{SandboxManager, ShutdownMode};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use conn_limits::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS, connection_cap};
pub use error::{ApiError, file_status_of, status_of};
pub use moat_engine::files::{MAX_LIST_DEPTH, MAX_UPLOAD_BYTES, TAR_TIMEOUT};
pub use rate_limit::{BURST_SECONDS, DEFAULT_REQUESTS_PER_MINUTE};
pub use router::router;
pub use sandbox_proxy::{ENVD_PORT, INTERPRETER_PORT, INTERPRETER_PREFIX, validate_domain};

/// Where `moat serve` listens unless told otherwise: loopback only, so a fresh install is not
/// reachable from the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// The port of [`DEFAULT_LISTEN`].
pub const DEFAULT_PORT: u16 = 7070;

/// Largest request body accepted; bigger ones get 413. Every `/v1` body but a file upload is a
/// small JSON document (an exec's stdin is the largest part); uploads stream under
/// [`MAX_UPLOAD_BYTES`] instead.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Largest body of `POST /v1/run`, whose input files travel inline (base64 or text).
pub const MAX_RUN_BODY_BYTES: usize = 16 << 20;
/// Largest `POST /v1/jobs` body: inline inputs larger than this go up first as blobs
/// (`POST /v1/blobs`).
pub const MAX_JOB_BODY_BYTES: usize = 16 << 20;

/// How long a shutdown waits for requests in flight before it destroys the sandboxes anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often expired sandboxes are reaped.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// Settings of the HTTP layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Requests per minute of a key without a `requests_per_minute` quota of its own.
    pub requests_per_minute: u32,
    /// The domain sandbox addresses are built on (`<port>-<sandbox>.<domain>`, the E2B SDKs'
    /// `domain`); `None` means `localhost:<listening port>`.
    pub domain: Option<String>,
    /// What happens to running sandboxes when the server stops.
    pub on_shutdown: ShutdownMode,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            requests_per_minute: DEFAULT_REQUESTS_PER_MINUTE,
            domain: None,
            on_shutdown: ShutdownMode::Destroy,
        }
    }
}

/// The domain of a server listening on `port` that was given none.
pub fn default_domain(port: u16) -> String {
    format!("localhost:{port}")
}

/// One tenant may have in flight at most this fraction of the connections the listener allows
/// (1/8): several tenants together must stall requests to fill them.
const TENANT_SHARE_OF_CONNECTIONS: usize = 8;

/// What the handlers share.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) manager: SandboxManager,
    /// Set once shutdown began: `/readyz` then answers 503 so balancers stop sending work.
    pub(crate) draining: AtomicBool,
    /// The token buckets of the keys.
    pub(crate) rate_limiter: rate_limit::RateLimiter,
    /// The domain sandbox addresses are built on (see [`ServerOptions::domain`]).
    pub(crate) domain: String,
    /// Each tenant's requests in flight (from its key's check to the end of the answer).
    pub(crate) tenant_requests: Arc<moat_engine::tenant_slots::TenantSlots>,
    /// Requests in flight to each tenant's public sandbox services, which anyone may send: a
    /// room of their own, so that outsiders cannot take the owner's for its API calls.
    pub(crate) public_requests: Arc<moat_engine::tenant_slots::TenantSlots>,
}

impl AppState {
    pub(crate) fn new(manager: SandboxManager, opts: &ServerOptions, port: u16) -> AppState {
        AppState {
            manager,
            draining: AtomicBool::new(false),
            rate_limiter: rate_limit::RateLimiter::new(opts.requests_per_minute),
            domain: opts.domain.clone().unwrap_or_else(|| default_domain(port)),
            tenant_requests: moat_engine::tenant_slots::TenantSlots::new(
                conn_limits::connection_cap() / TENANT_SHARE_OF_CONNECTIONS,
                None,
            ),
            public_requests: moat_engine::tenant_slots::TenantSlots::new(
                conn_limits::connection_cap() / TENANT_SHARE_OF_CONNECTIONS,
                None,
            ),
        }
    }
}

/// Serves the API on `listener` with `opts` until `shutdown` completes, reaping expired
/// sandboxes every [`REAP_INTERVAL`], sampling their resource use every
/// [`moat_engine::manager::USAGE_INTERVAL`], deleting old records of ended sandboxes and stale
/// cgroups (see [`SandboxManager::housekeep`]) and keeping the warm pools filled meanwhile. Then it stops
/// accepting connections, waits up to [`DRAIN_TIMEOUT`] for requests in flight, and destroys
/// (or keeps, per [`ServerOptions::on_shutdown`]) every sandbox the manager runs.
pub async fn serve(
    listener: TcpListener,
    manager: SandboxManager,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let port = listener.local_addr()?.port();
    let state = Arc::new(AppState::new(manager.clone(), &opts, port));
    let app = router::router_with(state.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let reaper = tokio::spawn(reap_loop(manager.clone(), stop_rx.clone()));
    let housekeeper = tokio::spawn(housekeeping_loop(manager.clone(), stop_rx.clone()));
    let pools = {
        let (manager, stop) = (manager.clone(), stop_rx.clone());
        tokio::spawn(async move { manager.run_pools(stop).await })
    };
    let usage = {
        let (manager, stop) = (manager.clone(), stop_rx.clone());
        tokio::spawn(async move { manager.run_usage_sampler(stop).await })
    };
    let jobs = {
        let (manager, stop) = (manager.clone(), stop_rx.clone());
        tokio::spawn(async move { manager.run_jobs(stop).await })
    };

    let signal = {
        let state = state.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, draining requests in flight");
            state.draining.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(true);
        }
    };
    // Header-read timeout and connection cap: see `conn_limits`.
    let server = conn_limits::serve(listener, app, signal);
    let mut stopped = stop_rx;
    let drain_deadline = async move {
        // Only counts from the start of the shutdown; a dropped sender means the server ended.
        if stopped.wait_for(|s| *s).await.is_ok() {
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        r = server => r,
        () = drain_deadline => {
            tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; ending them");
            Ok(())
        }
    };
    let _ = reaper.await;
    let _ = housekeeper.await;
    let _ = pools.await;
    let _ = usage.await;
    let _ = jobs.await;
    let (destroyed, kept) = manager.shutdown(opts.on_shutdown).await;
    tracing::info!(destroyed, kept, "ended or kept the sandboxes still running");
    result
}

/// Runs [`SandboxManager::housekeep`] every [`SandboxManager::housekeeping_interval`]: ended
/// records past the retention are deleted, stale cgroups swept.
async fn housekeeping_loop(manager: SandboxManager, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(manager.housekeeping_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match manager.housekeep(now_ms()).await {
            Ok(done) if done.purged > 0 || done.swept > 0 || done.images > 0 => tracing::info!(
                purged = done.purged,
                swept = done.swept,
                images = done.images,
                "deleted old records of ended sandboxes, stale cgroups and unused images"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("housekeeping: {e}"),
        }
    }
}

async fn reap_loop(manager: SandboxManager, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        // Outside the select: a reap is never cut off halfway by the shutdown.
        match manager.reap_expired(now_ms()).await {
            Ok(ids) if !ids.is_empty() => tracing::info!(?ids, "reaped expired sandboxes"),
            Ok(_) => {}
            Err(e) => tracing::warn!("reaping expired sandboxes: {e}"),
        }
    }
    // A slow reap a pass left under way (a pause saving to disk) is finished before the
    // shutdown goes on.
    manager.finish_reaps().await;
}
