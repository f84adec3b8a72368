//! `/v1/sandboxes/{id}/files…`: a sandbox's files, through the engine's file service
//! ([`moat_engine::files`]), which reaches them through the sandbox's agent. This module maps
//! queries and bodies to its typed calls and its answers (and errors) back.
//!
//! File contents stream in both directions: a download's body is the service's stream, an
//! upload's body is handed to it as a stream cut off at [`MAX_UPLOAD_BYTES`], so the server
//! holds neither in memory.

mod body;

use axum::body::Body;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use moat_engine::auth::Caller;
use moat_engine::files::{Download, Format, MAX_LIST_DEPTH, MAX_UPLOAD_BYTES, UploadBody};
use moat_proto::v1;

use crate::ApiError;
use crate::extract::{ApiResult, Shared, decode, json_body};

/// The file routes (authentication is added by the caller).
///
/// The router's `DefaultBodyLimit` (1 MiB) binds only the extractors that buffer a body; the
/// upload handlers take the raw body and enforce [`MAX_UPLOAD_BYTES`] themselves as it streams.
pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/sandboxes/{id}/files",
            get(download).put(upload).delete(remove),
        )
        .route("/v1/sandboxes/{id}/files/list", get(list))
        .route("/v1/sandboxes/{id}/files/stat", get(stat))
        .route("/v1/sandboxes/{id}/files/mkdir", post(mkdir))
        .route("/v1/sandboxes/{id}/files/move", post(move_entry))
}

/// The query parameters of the file routes, each at most once.
#[derive(Debug, Default, PartialEq, Eq)]
struct FileQuery {
    path: Option<String>,
    format: Format,
    user: Option<String>,
    depth: Option<u32>,
}

impl FileQuery {
    /// The `path` parameter, which these routes require.
    fn path(&self) -> ApiResult<&str> {
        self.path
            .as_deref()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ApiError::invalid("the `path` query parameter is required"))
    }

    fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
}

/// Parses `query` strictly: only the parameters in `allowed`, each once, with valid values.
fn parse_query(query: Option<&str>, allowed: &[&str]) -> ApiResult<FileQuery> {
    let mut q = FileQuery::default();
    let mut seen: Vec<String> = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, value) = (decode(name)?, decode(value)?);
        if !allowed.contains(&name.as_str()) {
            return Err(ApiError::invalid(format!(
                "unknown query parameter {name:?} (known here: {})",
                allowed.join(", ")
            )));
        }
        if seen.contains(&name) {
            return Err(ApiError::invalid(format!(
                "query parameter {name:?} is given more than once"
            )));
        }
        seen.push(name.clone());
        match name.as_str() {
            "path" => q.path = Some(value),
            "format" => {
                q.format = match value.as_str() {
                    "raw" => Format::Raw,
                    "tar" => Format::Tar,
                    other => {
                        return Err(ApiError::invalid(format!(
                            "format={other:?}: expected raw or tar"
                        )));
                    }
                }
            }
            "user" => {
                if value != "user" && value != "root" {
                    return Err(ApiError::invalid(format!(
                        "user={value:?}: expected user or root"
                    )));
                }
                q.user = Some(value);
            }
            "depth" => {
                let depth = value
                    .parse::<u32>()
                    .ok()
                    .filter(|d| (1..=MAX_LIST_DEPTH).contains(d))
                    .ok_or_else(|| {
                        ApiError::invalid(format!(
                            "depth={value:?}: expected a number from 1 to {MAX_LIST_DEPTH}"
                        ))
                    })?;
                q.depth = Some(depth);
            }
            _ => {}
        }
    }
    Ok(q)
}

async fn download(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let Path(id) = id?;
    let q = parse_query(query.as_deref(), &["path", "format", "user"])?;
    let path = q.path()?;
    let download = state
        .manager
        .files()
        .download(&caller, &id, path, q.format, q.user())
        .await?;
    let (content_type, size, body) = match download {
        Download::File { size, body } => ("application/octet-stream", Some(size), body),
        Download::Archive { body } => ("application/x-tar", None, body),
    };
    let mut resp = Body::from_stream(body).into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(size) = size {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(resp)
}

async fn upload(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    req: Request,
) -> ApiResult<Json<v1::FileEntry>> {
    let Path(id) = id?;
    let q = parse_query(query.as_deref(), &["path", "format", "user"])?;
    let path = q.path()?;
    body::check_declared_length(req.headers(), MAX_UPLOAD_BYTES)?;
    let (data, failure) = body::limited(req.into_body(), MAX_UPLOAD_BYTES);
    let entry = state
        .manager
        .files()
        .upload(
            &caller,
            &id,
            path,
            q.format,
            q.user(),
            UploadBody { data, failure },
        )
        .await?;
    Ok(Json(entry))
}

async fn remove(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> ApiResult<StatusCode> {
    let Path(id) = id?;
    let q = parse_query(query.as_deref(), &["path", "user"])?;
    let path = q.path()?;
    state
        .manager
        .files()
        .remove(&caller, &id, path, q.user())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<v1::FileList>> {
    let Path(id) = id?;
    let q = parse_query(query.as_deref(), &["path", "depth", "user"])?;
    let path = q.path()?;
    let entries = state
        .manager
        .files()
        .list(&caller, &id, path, q.depth.unwrap_or(1), q.user())
        .await?;
    Ok(Json(v1::FileList { entries }))
}

async fn stat(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<v1::FileEntry>> {
    let Path(id) = id?;
    let q = parse_query(query.as_deref(), &["path", "user"])?;
    let path = q.path()?;
    let entry = state
        .manager
        .files()
        .stat(&caller, &id, path, q.user())
        .await?;
    Ok(Json(entry))
}

/// `201` with the new directory; `200` with it when it already was one (so making a
/// directory is idempotent); `409 not_a_directory` when something else is there.
async fn mkdir(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<v1::FileEntry>)> {
    let Path(id) = id?;
    let q = parse_query(query.as_deref(), &["user"])?;
    let req: v1::MakeDir = json_body(body, None)?;
    let (made, entry) = state
        .manager
        .files()
        .make_dir(&caller, &id, &req.path, q.user())
        .await?;
    let status = if made {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(entry)))
}

async fn move_entry(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<v1::FileEntry>> {
    let Path(id) = id?;
    let q = parse_query(query.as_deref(), &["user"])?;
    let req: v1::MoveFile = json_body(body, None)?;
    let entry = state
        .manager
        .files()
        .move_entry(&caller, &id, &req.from, &req.to, q.user())
        .await?;
    Ok(Json(entry))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ALL: &[&str] = &["path", "format", "user", "depth"];

    #[test]
    fn queries_are_strict() {
        let q = parse_query(Some("path=%2Ftmp%2Fa+b&format=tar&user=root&depth=3"), ALL).unwrap();
        assert_eq!(q.path.as_deref(), Some("/tmp/a b"));
        assert_eq!(q.format, Format::Tar);
        assert_eq!(q.user(), Some("root"));
        assert_eq!(q.depth, Some(3));
        assert_eq!(parse_query(None, ALL).unwrap(), FileQuery::default());
        assert!(parse_query(None, ALL).unwrap().path().is_err());
        assert!(parse_query(Some("path="), ALL).unwrap().path().is_err());
        for bad in [
            "colour=red",
            "path=a&path=b",
            "format=zip",
            "user=nobody",
            "depth=0",
            "depth=33",
            "depth=x",
            "path=%ff",
        ] {
            let e = parse_query(Some(bad), ALL).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        // A parameter another route knows is still unknown here.
        assert!(parse_query(Some("path=a&depth=2"), &["path", "user"]).is_err());
    }
}
