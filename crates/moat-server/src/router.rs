//! The routes of the whole HTTP surface: which module answers which path, the middleware
//! around them (authentication, the storage guard, sandbox traffic, request logs), the health
//! endpoints and the answers for unknown routes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use moat_engine::manager::SandboxManager;

use crate::error::ErrorCode;
use crate::extract::{ApiResult, Shared};
use crate::{ApiError, AppState, MAX_BODY_BYTES, ServerOptions};

/// The whole HTTP surface over `manager`: health endpoints, `/v1`, `/metrics` and sandbox
/// traffic, with the
/// default [`ServerOptions`] (sandbox addresses on the domain of [`crate::DEFAULT_LISTEN`]'s port). [`crate::serve`] adds the reaper and graceful shutdown; this
/// alone suits serving in-process.
pub fn router(manager: SandboxManager) -> Router {
    router_with(Arc::new(AppState::new(
        manager,
        &ServerOptions::default(),
        crate::DEFAULT_PORT,
    )))
}

pub(crate) fn router_with(state: Shared) -> Router {
    let v1 = Router::new()
        .merge(crate::sandboxes::routes())
        .route("/v1/openapi.json", get(crate::openapi::serve))
        .merge(crate::templates::routes())
        .merge(crate::builds::routes())
        .merge(crate::files::routes())
        .merge(crate::keys::routes())
        .merge(crate::snapshots::routes())
        .merge(crate::jobs::routes())
        .merge(crate::metrics::routes())
        .route("/mcp", crate::mcp::service(state.manager.clone()))
        // `route_layer`: only matched routes ask for a key, so an unknown path is a plain 404.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::auth::authenticate,
        ));
    let api = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // E2B's SDK uploads a build's files without its key: the path's token is the authority.
        .route(
            crate::e2b::builds::UPLOAD_PATH,
            axum::routing::put(crate::e2b::builds::upload),
        )
        .merge(v1)
        .merge(crate::e2b::routes(state.clone()))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::storage_guard::refuse_when_full,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state.clone());
    // Sandbox traffic is recognised before any routing, so no API route can shadow it.
    Router::new()
        .fallback_service(api)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::sandbox_proxy::dispatch,
        ))
        // Outside the proxy too: its refusals (a sandbox not running) read no body either.
        .layer(middleware::from_fn(read_small_bodies))
        .layer(middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state)
}

/// Bodies up to this size are read whole before the route's handler runs.
const READ_FIRST_BYTES: usize = 64 << 10;

/// Reads a small request body (a `content-length` up to [`READ_FIRST_BYTES`]) whole before
/// the handler runs. A handler that needs no body (a cancel, a pause, a health check) would
/// (nor the sandbox proxy's refusals) would otherwise answer before a body sent after the head
/// has arrived, and hyper, unable to skip
/// bytes it has not received, then closes the connection: a keep-alive client that sends its
/// next request on it gets no answer ("server disconnected"). Larger bodies stream to their
/// handlers as they come. A small body must arrive within the header-read timeout, as its head
/// had to.
async fn read_small_bodies(req: Request, next: Next) -> Response {
    let small = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n > 0 && n <= READ_FIRST_BYTES);
    if !small {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(
        crate::conn_limits::HEADER_READ_TIMEOUT,
        axum::body::to_bytes(body, READ_FIRST_BYTES),
    );
    let error = match read.await {
        Ok(Ok(bytes)) => return next.run(Request::from_parts(parts, bytes.into())).await,
        Ok(Err(e)) => ApiError::invalid(format!("reading the request's body: {e}")),
        // A small body still coming after this long is held back on purpose (slowloris).
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "the request's body of at most {} KiB did not arrive within {} s",
                READ_FIRST_BYTES >> 10,
                crate::conn_limits::HEADER_READ_TIMEOUT.as_secs()
            ),
        ),
    };
    surface_error(&parts.uri, error)
}

/// Logs and counts every answer: its status, and its error code when it is a JSON error.
async fn log_request(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let began = Instant::now();
    let response = next.run(req).await;
    let metrics = state.manager.metrics();
    metrics.count_http(response.status().as_u16());
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        metrics.count_error(code);
    }
    tracing::info!(
        %method,
        path,
        status = response.status().as_u16(),
        ms = began.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    response
}

pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Ready when the store answers, its data dir has room and no shutdown has begun; the backend
/// was ready before the listener opened.
async fn readyz(State(state): State<Shared>) -> ApiResult<Json<serde_json::Value>> {
    let unavailable = |m: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m);
    if state.draining.load(Ordering::SeqCst) {
        return Err(unavailable("shutting down".into()));
    }
    // Not ready for work that changes anything: say why, under the same code as the refusals.
    if let Err(e) = state.manager.check_storage() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.code(),
            e.to_string(),
        ));
    }
    state
        .manager
        .sandbox_counts()
        .await
        .map_err(|e| unavailable(format!("store: {e}")))?;
    Ok(Json(serde_json::json!({"status": "ready"})))
}

/// The error of `err` in the format of the surface `uri` belongs to (E2B's or `/v1`'s).
fn surface_error(uri: &Uri, err: ApiError) -> Response {
    if crate::e2b::owns_path(uri.path()) {
        crate::e2b::no_route(err)
    } else {
        err.into_response()
    }
}

async fn not_found(uri: Uri) -> Response {
    surface_error(
        &uri,
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route"),
    )
}

async fn method_not_allowed(uri: Uri) -> Response {
    surface_error(
        &uri,
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        ),
    )
}
