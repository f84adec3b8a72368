//! Routes, authentication and the `/v1` handlers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use moat_engine::manager::SandboxManager;
use moat_engine::store::Role;
use moat_proto::v1;
use serde::de::DeserializeOwned;

use crate::error::ErrorCode;
use crate::{ApiError, AppState, MAX_BODY_BYTES, ServerOptions};

pub(crate) type Shared = Arc<AppState>;
pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Who is calling, from their API key.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) tenant: String,
    pub(crate) key_id: String,
    pub(crate) role: Role,
}

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
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route(
            "/v1/sandboxes/{id}",
            get(get_sandbox).delete(delete_sandbox),
        )
        .route("/v1/sandboxes/{id}/timeout", post(set_timeout))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route(
            "/v1/run",
            post(run).layer(DefaultBodyLimit::max(crate::MAX_RUN_BODY_BYTES)),
        )
        .route("/v1/openapi.json", get(crate::openapi::serve))
        .merge(crate::templates::routes())
        .merge(crate::files::routes())
        .merge(crate::keys::routes())
        .merge(crate::snapshots::routes())
        .merge(crate::metrics::routes())
        // `route_layer`: only matched routes ask for a key, so an unknown path is a plain 404.
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let api = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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
        .layer(middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state)
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

async fn authenticate(
    State(state): State<Shared>,
    mut req: Request,
    next: Next,
) -> ApiResult<Response> {
    let secret = bearer(&req)?;
    match check_key(&state, secret).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            Ok(next.run(req).await)
        }
        Err(refusal) => Ok(refusal.into_response()),
    }
}

/// Why a key was refused: the error, and for a rate limit the seconds until a retry can pass.
#[derive(Debug)]
pub(crate) struct KeyRefusal {
    pub(crate) error: ApiError,
    pub(crate) retry_after_secs: Option<u64>,
}

impl From<ApiError> for KeyRefusal {
    fn from(error: ApiError) -> Self {
        KeyRefusal {
            error,
            retry_after_secs: None,
        }
    }
}

impl IntoResponse for KeyRefusal {
    fn into_response(self) -> Response {
        let mut response = self.error.into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The caller an API key secret stands for, once the key is known, not revoked, and within its
/// rate limit: what every authenticated surface (`/v1`'s Bearer keys, the E2B API's
/// `X-API-KEY`) checks.
pub(crate) async fn check_key(state: &Shared, secret: String) -> Result<Caller, KeyRefusal> {
    let store = state.manager.store().clone();
    let key = tokio::task::spawn_blocking(move || store.authenticate(&secret))
        .await
        .map_err(|e| ApiError::internal(format!("authentication task: {e}")))?
        .map_err(|e| ApiError::internal(format!("authentication: {e}")))?
        .ok_or_else(|| ApiError::unauthenticated("unknown or revoked API key"))?;
    let limited = state
        .rate_limiter
        .check(&key.id, key.quotas.requests_per_minute, Instant::now());
    if let Err(limit) = limited {
        return Err(KeyRefusal {
            error: ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "key {} is over its rate limit of {} requests per minute; retry in {} s",
                    key.id, limit.requests_per_minute, limit.retry_after_secs
                ),
            ),
            retry_after_secs: Some(limit.retry_after_secs),
        });
    }
    Ok(Caller {
        tenant: key.tenant,
        key_id: key.id,
        role: key.role,
    })
}

/// The secret of `Authorization: Bearer <secret>`.
fn bearer(req: &Request) -> ApiResult<String> {
    let missing =
        || ApiError::unauthenticated("missing API key: send `Authorization: Bearer <key>`");
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| ApiError::unauthenticated("malformed Authorization header"))?;
    let (scheme, secret) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::unauthenticated("malformed Authorization header"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::unauthenticated(
            "unsupported Authorization scheme: use `Bearer <key>`",
        ));
    }
    Ok(secret.trim().to_owned())
}

async fn healthz() -> Json<serde_json::Value> {
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
    let store = state.manager.store().clone();
    tokio::task::spawn_blocking(move || store.count_by_state())
        .await
        .map_err(|e| unavailable(format!("store check: {e}")))?
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

/// Parses a JSON body strictly; `empty` is what an empty body means, if it may be empty.
pub(crate) fn json_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    empty: Option<T>,
) -> ApiResult<T> {
    let body = body?;
    if body.iter().all(u8::is_ascii_whitespace)
        && let Some(value) = empty
    {
        return Ok(value);
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

async fn create_sandbox(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<v1::Sandbox>)> {
    let req = json_body(body, Some(v1::CreateSandbox::default()))?;
    let sandbox = state
        .manager
        .create(&caller.tenant, Some(&caller.key_id), req)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(with_access_token(&state, sandbox)),
    ))
}

async fn list_sandboxes(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<v1::SandboxList>> {
    let query = parse_list_query(query.as_deref().unwrap_or(""))?;
    Ok(Json(state.manager.list(&caller.tenant, query).await?))
}

async fn get_sandbox(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<v1::Sandbox>> {
    let Path(id) = id?;
    let sandbox = state.manager.get(&caller.tenant, &id).await?;
    Ok(Json(with_access_token(&state, sandbox)))
}

/// `sandbox` with its access and traffic tokens, for its owner to use the sandbox-traffic routes.
fn with_access_token(state: &AppState, mut sandbox: v1::Sandbox) -> v1::Sandbox {
    sandbox.access_token = Some(state.manager.access_token(&sandbox.id));
    sandbox.traffic_access_token = Some(state.manager.traffic_token(&sandbox.id));
    sandbox
}

async fn delete_sandbox(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path(id) = id?;
    state.manager.delete(&caller.tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_timeout(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<v1::Sandbox>> {
    let Path(id) = id?;
    let req: v1::SetTimeout = json_body(body, None)?;
    Ok(Json(
        state.manager.set_timeout(&caller.tenant, &id, req).await?,
    ))
}

/// `POST /v1/sandboxes/{id}/exec`: the buffered result, or with `Accept: application/x-ndjson`
/// the command's events as they happen. Either way, a client that goes away before the end
/// drops the manager's execution, which kills the command.
async fn exec(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let Path(id) = id?;
    let req: v1::ExecRequest = json_body(body, None)?;
    if accepts(&headers, NDJSON) {
        let events = state.manager.exec_stream(&caller.tenant, &id, req).await?;
        Ok(ndjson(events.into_events()))
    } else {
        Ok(Json(state.manager.exec(&caller.tenant, &id, req).await?).into_response())
    }
}

/// The media type of event streams: one JSON document a line.
const NDJSON: &str = "application/x-ndjson";

/// Whether the `Accept` headers name `media_type` (parameters and quality ignored).
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|item| item.split(';').next())
        .any(|t| t.trim().eq_ignore_ascii_case(media_type))
}

/// A `200` answer sending each item as one JSON line, as soon as it is there. The body is
/// pulled by the connection as it writes, so a slow client holds the items back.
fn ndjson<T: serde::Serialize>(items: impl Stream<Item = T> + Send + 'static) -> Response {
    let lines = items.map(|item| {
        let mut line = serde_json::to_vec(&item)?;
        line.push(b'\n');
        Ok::<_, serde_json::Error>(Bytes::from(line))
    });
    ([(header::CONTENT_TYPE, NDJSON)], Body::from_stream(lines)).into_response()
}

/// The one-shot mode: a sandbox (from the warm pool when one is ready), files, a run, files
/// back, the sandbox destroyed. A run refused because too many are under way (`429`, `503`)
/// says when to retry.
async fn run(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(r) => return ApiError::body(r, crate::MAX_RUN_BODY_BYTES).into_response(),
    };
    let req: v1::RunRequest = match json_body(Ok(body), None) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    match state
        .manager
        .run(&caller.tenant, Some(&caller.key_id), req)
        .await
    {
        Ok(result) => Json(result).into_response(),
        Err(e) => {
            let busy = matches!(e.http_status(), 429 | 503);
            let mut response = ApiError::from(e).into_response();
            if busy {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(RUN_RETRY_AFTER_SECS));
            }
            response
        }
    }
}

/// `Retry-After` of a run refused for the runs (or sandboxes) already under way, seconds.
const RUN_RETRY_AFTER_SECS: u64 = 1;

/// `state=running&state=paused&metadata=k=v&after=…&limit=…`, strictly: an unknown parameter
/// is an error, as an unknown JSON field is.
fn parse_list_query(query: &str) -> ApiResult<v1::ListSandboxes> {
    let mut out = v1::ListSandboxes::default();
    let mut metadata = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, value) = (decode(name)?, decode(value)?);
        match name.as_str() {
            "state" => {
                let state = serde_json::from_value(serde_json::Value::String(value.clone()))
                    .map_err(|_| {
                        ApiError::invalid(format!(
                            "unknown state {value:?}: expected starting, running, paused, killed or failed"
                        ))
                    })?;
                out.states.push(state);
            }
            "metadata" => {
                let (k, v) = value.split_once('=').ok_or_else(|| {
                    ApiError::invalid(format!("metadata filter {value:?} is not key=value"))
                })?;
                metadata.insert(k.to_owned(), v.to_owned());
            }
            "after" => out.after = Some(value),
            "limit" => {
                out.limit = Some(value.parse().map_err(|_| {
                    ApiError::invalid(format!("limit {value:?} is not a non-negative number"))
                })?)
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {other:?} (known: state, metadata, after, limit)"
                )));
            }
        }
    }
    out.metadata = metadata;
    Ok(out)
}

/// Form decoding of one query component: `+` is a space, then percent-escapes.
pub(crate) fn decode(text: &str) -> ApiResult<String> {
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::invalid(format!("query component {text:?} is not UTF-8")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn list_query_forms() {
        let q = parse_list_query(
            "state=running&state=killed&metadata=job%3Done&metadata=a=b+c&limit=5&after=xyz",
        )
        .unwrap();
        assert_eq!(
            q.states,
            vec![v1::SandboxState::Running, v1::SandboxState::Killed]
        );
        assert_eq!(q.metadata.get("job").map(String::as_str), Some("one"));
        assert_eq!(q.metadata.get("a").map(String::as_str), Some("b c"));
        assert_eq!(q.limit, Some(5));
        assert_eq!(q.after.as_deref(), Some("xyz"));
        assert_eq!(parse_list_query("").unwrap(), v1::ListSandboxes::default());
        for bad in [
            "state=sleeping",
            "metadata=novalue",
            "limit=-1",
            "colour=red",
            "after=%ff",
        ] {
            let e = parse_list_query(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn bodies_are_strict() {
        let ok: v1::CreateSandbox =
            json_body(Ok(Bytes::new()), Some(v1::CreateSandbox::default())).unwrap();
        assert_eq!(ok, v1::CreateSandbox::default());
        let e = json_body::<v1::ExecRequest>(Ok(Bytes::from_static(b"")), None).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = json_body::<v1::ExecRequest>(Ok(Bytes::from_static(br#"{"command":"ls"}"#)), None)
            .unwrap_err();
        assert!(e.message.contains("unknown field"), "{}", e.message);
        let e = json_body::<v1::SetTimeout>(Ok(Bytes::from_static(b"{")), None).unwrap_err();
        assert_eq!(e.code, "invalid");
    }
}
