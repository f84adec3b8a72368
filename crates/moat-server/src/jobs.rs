//! Asynchronous jobs and the blobs they use: `/v1/jobs` and `/v1/blobs`.

use axum::body::Body;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use moat_engine::auth::Caller;
use moat_engine::manager::{BlobRead, LogStream};
use moat_proto::v1;

use crate::error::ApiError;
use crate::extract::{ApiResult, Shared, json_body, query_limit, query_pairs, unknown_parameter};

/// The routes (authentication is added by the caller).
pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/jobs",
            post(submit)
                .layer(DefaultBodyLimit::max(crate::MAX_JOB_BODY_BYTES))
                .get(list),
        )
        .route("/v1/jobs/{id}", get(show).delete(delete_job))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/logs/{stream}", get(logs))
        .route("/v1/jobs/{id}/output", get(output))
        // Streamed to the blob store: bounded there (MAX_BLOB_BYTES), not by a buffer here.
        .route("/v1/blobs", post(upload).layer(DefaultBodyLimit::disable()))
        .route("/v1/blobs/{digest}", delete(delete_blob))
}

async fn submit(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<v1::Job>)> {
    let req: v1::CreateJob = json_body(body, None)?;
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::invalid("the Idempotency-Key header is not text"))?
                .to_owned(),
        ),
        None => None,
    };
    let (job, new) = state.manager.submit_job(&caller, req, key).await?;
    // A repeated submit answers 200 with the job the first one made.
    let status = if new {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(job)))
}

async fn list(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<v1::JobList>> {
    let (mut states, mut after, mut limit) = (Vec::new(), None, 100);
    for pair in query_pairs(query.as_deref().unwrap_or("")) {
        let (name, value) = pair?;
        match name.as_str() {
            "state" => states.push(v1::JobState::from_name(&value).ok_or_else(|| {
                ApiError::invalid(format!(
                    "state {value:?} (known: queued, running, succeeded, failed, cancelled, timed_out)"
                ))
            })?),
            "after" => after = Some(value),
            "limit" => limit = query_limit(&value)?,
            other => return Err(unknown_parameter(other, "state, after, limit")),
        }
    }
    Ok(Json(
        state
            .manager
            .list_jobs(&caller, states, after.as_deref(), limit)
            .await?,
    ))
}

async fn show(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<v1::Job>> {
    let Path(id) = id?;
    Ok(Json(state.manager.get_job(&caller, &id).await?))
}

async fn cancel(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<v1::Job>> {
    let Path(id) = id?;
    Ok(Json(state.manager.cancel_job(&caller, &id).await?))
}

async fn delete_job(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path(id) = id?;
    state.manager.delete_job(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A blob as a streamed answer of its length.
fn streamed((size, body): BlobRead) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

async fn logs(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Response> {
    let Path((id, stream)) = path?;
    let which = match stream.as_str() {
        "stdout" => LogStream::Stdout,
        "stderr" => LogStream::Stderr,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no log {other:?} (stdout or stderr)"),
            ));
        }
    };
    Ok(streamed(state.manager.job_log(&caller, &id, which).await?))
}

async fn output(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let Path(id) = id?;
    let mut path = None;
    for pair in query_pairs(query.as_deref().unwrap_or("")) {
        let (name, value) = pair?;
        match name.as_str() {
            "path" => path = Some(value),
            other => return Err(unknown_parameter(other, "path")),
        }
    }
    let path =
        path.ok_or_else(|| ApiError::invalid("give the output's path: ?path=/home/user/out.txt"))?;
    Ok(streamed(
        state.manager.job_output(&caller, &id, &path).await?,
    ))
}

async fn upload(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> ApiResult<(StatusCode, Json<v1::Blob>)> {
    let blob = state
        .manager
        .upload_blob(&caller, body.into_data_stream())
        .await?;
    Ok((StatusCode::CREATED, Json(blob)))
}

async fn delete_blob(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    digest: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path(digest) = digest?;
    state.manager.delete_blob(&caller, &digest).await?;
    Ok(StatusCode::NO_CONTENT)
}
