//! Pause, resume, snapshots and forks: `/v1/sandboxes/{id}/pause|resume|snapshots|fork` and
//! `/v1/snapshots`.

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use moat_engine::auth::Caller;
use moat_proto::v1;
use serde::Deserialize;

use crate::error::status_of;
use crate::extract::{ApiResult, Shared, json_body, query_limit, query_pairs, unknown_parameter};

/// The routes (authentication is added by the caller).
pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/sandboxes/{id}/pause", post(pause))
        .route("/v1/sandboxes/{id}/resume", post(resume))
        .route("/v1/sandboxes/{id}/snapshots", post(create))
        .route("/v1/sandboxes/{id}/fork", post(fork))
        .route("/v1/snapshots", get(list))
        .route("/v1/snapshots/{id}", get(show).delete(delete))
}

/// The body of a call that takes none: empty, or an empty JSON object.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

async fn pause(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<v1::Sandbox>> {
    let Path(id) = id?;
    let NoFields {} = json_body(body, Some(NoFields::default()))?;
    Ok(Json(state.manager.pause(&caller, &id).await?))
}

async fn resume(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<v1::Sandbox>> {
    let Path(id) = id?;
    let req: v1::ResumeSandbox = json_body(body, Some(v1::ResumeSandbox::default()))?;
    Ok(Json(state.manager.resume(&caller, &id, req).await?))
}

async fn create(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<v1::Snapshot>)> {
    let Path(id) = id?;
    let req: v1::CreateSnapshot = json_body(body, Some(v1::CreateSnapshot::default()))?;
    let snapshot = state.manager.snapshot(&caller, &id, req).await?;
    Ok((StatusCode::CREATED, Json(snapshot)))
}

async fn fork(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<v1::ForkResult>)> {
    let Path(id) = id?;
    let req: v1::ForkSandbox = json_body(body, Some(v1::ForkSandbox::default()))?;
    let forked = state.manager.fork(&caller, &id, req).await?;
    let results = forked
        .into_iter()
        .map(|r| match r {
            // A copy is a new sandbox: its owner gets its tokens, as from a create.
            Ok(sandbox) => v1::ForkItem {
                sandbox: Some(crate::sandboxes::with_access_token(&state, sandbox)),
                error: None,
            },
            Err(e) => v1::ForkItem {
                sandbox: None,
                error: Some(v1::ForkError {
                    status: status_of(&e).as_u16(),
                    code: e.code().to_owned(),
                    message: e.to_string(),
                }),
            },
        })
        .collect();
    Ok((StatusCode::CREATED, Json(v1::ForkResult { results })))
}

async fn list(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<v1::SnapshotList>> {
    let query = parse_list_query(query.as_deref().unwrap_or(""))?;
    Ok(Json(state.manager.list_snapshots(&caller, query).await?))
}

async fn show(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<v1::Snapshot>> {
    let Path(id) = id?;
    Ok(Json(state.manager.get_snapshot(&caller, &id).await?))
}

async fn delete(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path(id) = id?;
    state.manager.delete_snapshot(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `sandbox_id=…&name=…&after=…&limit=…`, strictly: an unknown parameter is an error.
fn parse_list_query(query: &str) -> ApiResult<v1::ListSnapshots> {
    let mut out = v1::ListSnapshots::default();
    for pair in query_pairs(query) {
        let (name, value) = pair?;
        match name.as_str() {
            "sandbox_id" => out.sandbox_id = Some(value),
            "name" => out.name = Some(value),
            "after" => out.after = Some(value),
            "limit" => out.limit = Some(query_limit(&value)?),
            other => return Err(unknown_parameter(other, "sandbox_id, name, after, limit")),
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn list_query_forms() {
        let q = parse_list_query("sandbox_id=abc&name=my+snap&limit=5&after=x").unwrap();
        assert_eq!(q.sandbox_id.as_deref(), Some("abc"));
        assert_eq!(q.name.as_deref(), Some("my snap"));
        assert_eq!(q.limit, Some(5));
        assert_eq!(q.after.as_deref(), Some("x"));
        for bad in ["limit=-1", "colour=red", "name=%ff"] {
            assert_eq!(
                parse_list_query(bad).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }

    #[test]
    fn bodies_may_be_empty() {
        let NoFields {} =
            json_body(Ok(Bytes::from_static(b"{}")), Some(NoFields::default())).unwrap();
        assert!(json_body::<NoFields>(Ok(Bytes::from_static(br#"{"x":1}"#)), None).is_err());
    }
}
