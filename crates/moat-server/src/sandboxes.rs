//! `/v1/sandboxes…` and `/v1/run`: the sandbox handlers of the REST API, each a mapping of its
//! request to one engine call and of the answer (or the engine's error) back.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use moat_engine::auth::Caller;
use moat_proto::v1;

use crate::error::status_of;
use crate::extract::{ApiResult, Shared, json_body, query_limit, query_pairs, unknown_parameter};
use crate::{ApiError, AppState};

/// The sandbox routes (authentication is added by the caller).
pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route(
            "/v1/sandboxes/{id}",
            get(get_sandbox).delete(delete_sandbox),
        )
        .route("/v1/sandboxes/{id}/timeout", post(set_timeout))
        .route(
            "/v1/sandboxes/{id}/network",
            get(get_network).put(set_network),
        )
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route(
            "/v1/run",
            post(run).layer(DefaultBodyLimit::max(crate::MAX_RUN_BODY_BYTES)),
        )
}

async fn create_sandbox(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<v1::Sandbox>)> {
    let req = json_body(body, Some(v1::CreateSandbox::default()))?;
    let sandbox = state.manager.create(&caller, req).await?;
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
    Ok(Json(state.manager.list(&caller, query).await?))
}

async fn get_sandbox(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<v1::Sandbox>> {
    let Path(id) = id?;
    let sandbox = state.manager.get(&caller, &id).await?;
    Ok(Json(with_access_token(&state, sandbox)))
}

/// `sandbox` with its access and traffic tokens, for its owner to use the sandbox-traffic routes.
pub(crate) fn with_access_token(state: &AppState, mut sandbox: v1::Sandbox) -> v1::Sandbox {
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
    state.manager.delete(&caller, &id).await?;
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
    Ok(Json(state.manager.set_timeout(&caller, &id, req).await?))
}

async fn get_network(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<v1::SandboxNetwork>> {
    let Path(id) = id?;
    Ok(Json(state.manager.network(&caller, &id).await?))
}

async fn set_network(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<v1::SandboxNetwork>> {
    let Path(id) = id?;
    let req: v1::Network = json_body(body, None)?;
    Ok(Json(state.manager.set_network(&caller, &id, req).await?))
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
        let events = state.manager.exec_stream(&caller, &id, req).await?;
        Ok(ndjson(events.into_events()))
    } else {
        Ok(Json(state.manager.exec(&caller, &id, req).await?).into_response())
    }
}

/// The media type of event streams: one JSON document a line.
pub(crate) const NDJSON: &str = "application/x-ndjson";

/// Whether the `Accept` headers name `media_type` (parameters and quality ignored).
pub(crate) fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
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
pub(crate) fn ndjson<T: serde::Serialize>(
    items: impl Stream<Item = T> + Send + 'static,
) -> Response {
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
    match state.manager.run(&caller, req).await {
        Ok(result) => Json(result).into_response(),
        Err(e) => {
            let busy = matches!(
                status_of(&e),
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            );
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
    for pair in query_pairs(query) {
        let (name, value) = pair?;
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
            "limit" => out.limit = Some(query_limit(&value)?),
            other => return Err(unknown_parameter(other, "state, metadata, after, limit")),
        }
    }
    out.metadata = metadata;
    Ok(out)
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
}
