//! `/v1/builds` and `/v1/build-contexts`: templates built from a Dockerfile, their logs, and
//! the context archives they copy from.

use axum::body::Body;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use moat_engine::auth::Caller;
use moat_proto::v1;
use serde::Serialize;

use crate::ApiError;
use crate::extract::{ApiResult, Shared, json_body, query_pairs, unknown_parameter};

/// Largest `POST /v1/builds` body: a Dockerfile of at most 1 MiB, with the rest of the
/// request.
const MAX_BUILD_BODY_BYTES: usize = 2 << 20;

/// The routes (authentication is added by the caller).
pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/builds",
            post(create)
                .layer(DefaultBodyLimit::max(MAX_BUILD_BODY_BYTES))
                .get(list),
        )
        .route("/v1/builds/{id}", get(show).delete(delete))
        .route("/v1/builds/{id}/logs", get(logs))
        .route("/v1/builds/{id}/cancel", post(cancel))
        .route(
            "/v1/build-contexts/{digest}",
            put(put_context).head(head_context),
        )
}

/// What an upload stored.
#[derive(Debug, Serialize)]
struct ContextStored {
    digest: String,
    size: u64,
}

async fn put_context(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    digest: Result<Path<String>, PathRejection>,
    body: Body,
) -> ApiResult<(StatusCode, Json<ContextStored>)> {
    let Path(digest) = digest?;
    let size = state
        .manager
        .put_build_context(&caller, &digest, body.into_data_stream())
        .await?;
    Ok((StatusCode::CREATED, Json(ContextStored { digest, size })))
}

async fn head_context(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    digest: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path(digest) = digest?;
    Ok(if state.manager.has_build_context(&caller, &digest)? {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    })
}

async fn create(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<v1::Build>)> {
    let req: v1::CreateBuild = json_body(body, None)?;
    let build = state.manager.create_build(&caller, req).await?;
    Ok((StatusCode::ACCEPTED, Json(build)))
}

async fn list(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<v1::BuildList>> {
    Ok(Json(state.manager.list_builds(&caller).await?))
}

async fn show(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<v1::Build>> {
    let Path(id) = id?;
    Ok(Json(state.manager.get_build(&caller, &id).await?))
}

async fn logs(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<v1::BuildLogs>> {
    let Path(id) = id?;
    let mut offset = 0;
    for pair in query_pairs(query.as_deref().unwrap_or("")) {
        let (name, value) = pair?;
        match name.as_str() {
            "offset" => {
                offset = value.parse().map_err(|_| {
                    ApiError::invalid(format!("offset={value:?}: expected a byte offset"))
                })?;
            }
            other => return Err(unknown_parameter(other, "offset")),
        }
    }
    Ok(Json(state.manager.build_logs(&caller, &id, offset).await?))
}

async fn cancel(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<v1::Build>> {
    let Path(id) = id?;
    Ok(Json(state.manager.cancel_build(&caller, &id).await?))
}

async fn delete(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path(id) = id?;
    state.manager.delete_build(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
