//! `/v1/sandboxes/{id}/files…`: a sandbox's files, reached through its agent, which does every
//! operation inside the sandbox as the sandbox user (or root when asked). Nothing here resolves
//! a sandbox path on the host.
//!
//! File contents stream in both directions: a download is the agent's body passed on chunk by
//! chunk, an upload is the request body passed on to the agent the same way, so the server holds
//! neither in memory. Directories travel as tar archives made and unpacked by `tar` inside the
//! sandbox (see [`tar`]).

mod body;
mod tar;

use axum::body::Body;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use moat_engine::agent_client::{AgentClient, AgentError};
use moat_proto::connect::Code;
use moat_proto::filesystem::{EntryInfo, FileType as WireType};
use moat_proto::v1;

use crate::ApiError;
use crate::api::{ApiResult, Caller, Shared, decode, json_body};

pub use tar::TAR_TIMEOUT;

/// Largest upload (a file, or a tar archive) one request may carry; more answers 413. The
/// sandbox's disk limit applies as well (507 when it is full). The same as the largest file a
/// sandbox process may write (`RLIMIT_FSIZE`).
pub const MAX_UPLOAD_BYTES: u64 = 4 << 30;

/// Deepest listing `GET …/files/list` walks (`depth` is 1 to this; the agent also caps a listing
/// at 100,000 entries).
pub const MAX_LIST_DEPTH: u32 = 32;

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

/// How a file route's contents travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Format {
    /// The file's own bytes.
    #[default]
    Raw,
    /// A directory as a tar archive.
    Tar,
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

/// The API's answer for an agent's failure on a file operation.
pub(crate) fn agent_error(e: AgentError) -> ApiError {
    let message = agent_message(&e);
    match e.code() {
        Code::NotFound => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
        Code::PermissionDenied => ApiError::new(StatusCode::FORBIDDEN, "forbidden", message),
        Code::AlreadyExists | Code::Aborted => {
            ApiError::new(StatusCode::CONFLICT, "conflict", message)
        }
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unauthenticated => ApiError::invalid(message),
        // What a write hits when the sandbox's disk (or its inodes) is full.
        Code::ResourceExhausted => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            message,
        ),
        Code::Unimplemented => ApiError::new(StatusCode::NOT_IMPLEMENTED, "unsupported", message),
        _ => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message),
    }
}

/// What an agent error says, without the agent's framing for an error it answered.
pub(crate) fn agent_message(e: &AgentError) -> String {
    match e {
        AgentError::Rpc { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// The API's form of an agent's entry.
fn file_entry(e: EntryInfo) -> v1::FileEntry {
    // The agent marks a link by its target, as envd does (`is_symlink` from newer agents too).
    let link = e.is_symlink || e.symlink_target.is_some();
    let kind = if link {
        v1::FileType::Symlink
    } else {
        match WireType::try_from(e.r#type) {
            Ok(WireType::File) => v1::FileType::File,
            Ok(WireType::Directory) => v1::FileType::Dir,
            _ => v1::FileType::Other,
        }
    };
    let modified_at = e.modified_time.map_or(0, |t| {
        t.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(t.nanos) / 1_000_000)
    });
    v1::FileEntry {
        name: e.name,
        path: e.path,
        kind,
        size: u64::try_from(e.size).unwrap_or(0),
        mode: e.mode & 0o7777,
        owner: e.owner,
        group: e.group,
        modified_at,
        symlink_target: if link { e.symlink_target } else { None },
    }
}

/// Whether `e` is a directory, or a symbolic link to one.
fn is_dir(e: &EntryInfo) -> bool {
    e.r#type == WireType::Directory as i32
}

fn is_a_directory(path: &str, hint: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "is_a_directory",
        format!("{path} is a directory{hint}"),
    )
}

fn not_a_directory(path: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "not_a_directory",
        format!("{path} exists and is not a directory"),
    )
}

/// The entry at `path`, or `None` when there is none.
async fn stat_opt(
    client: &AgentClient,
    path: &str,
    user: Option<&str>,
) -> ApiResult<Option<EntryInfo>> {
    match client.stat(path, user).await {
        Ok(e) => Ok(Some(e)),
        Err(e) if e.code() == Code::NotFound => Ok(None),
        Err(e) => Err(agent_error(e)),
    }
}

/// The agent of sandbox `id` of the caller's tenant (404 for none, 409 when not running).
async fn agent(state: &Shared, caller: &Caller, id: &str) -> ApiResult<AgentClient> {
    Ok(state.manager.agent(&caller.tenant, id).await?)
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
    let client = agent(&state, &caller, &id).await?;
    let entry = client.stat(path, q.user()).await.map_err(agent_error)?;
    if q.format == Format::Tar {
        if !is_dir(&entry) {
            return Err(not_a_directory(&entry.path));
        }
        return tar::download(client, &entry.path, q.user()).await;
    }
    if is_dir(&entry) {
        return Err(is_a_directory(
            &entry.path,
            " (download a directory with format=tar)",
        ));
    }
    let file = client
        .read_file_stream(&entry.path, q.user())
        .await
        .map_err(agent_error)?;
    let size = file.size();
    let mut resp = Body::from_stream(file.into_stream()).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
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
    let client = agent(&state, &caller, &id).await?;
    let (data, failure) = body::limited(req.into_body(), MAX_UPLOAD_BYTES);
    if q.format == Format::Tar {
        return Ok(Json(
            tar::upload(client, path, q.user(), data, failure).await?,
        ));
    }
    if let Some(existing) = stat_opt(&client, path, q.user()).await?
        && is_dir(&existing)
    {
        return Err(is_a_directory(
            &existing.path,
            " (upload a directory with format=tar)",
        ));
    }
    let written = tokio::select! {
        r = client.write_file_stream(path, q.user(), data) => r.map_err(agent_error),
        e = failure.wait() => Err(e),
    };
    // A failed body makes the agent's side fail too; the body's failure is the cause.
    let error = match (failure.take(), written) {
        (Some(e), _) | (None, Err(e)) => e,
        (None, Ok(())) => {
            let entry = client.stat(path, q.user()).await.map_err(agent_error)?;
            return Ok(Json(file_entry(entry)));
        }
    };
    // Over the limit or out of space, the file was opened and holds a fragment of what the
    // client meant (taking space that is short): leave none. Other failures may not have
    // touched the file at all, so it is left alone.
    let cut_short = [
        StatusCode::PAYLOAD_TOO_LARGE,
        StatusCode::INSUFFICIENT_STORAGE,
    ];
    if cut_short.contains(&error.status)
        && let Err(err) = client.remove(path, q.user()).await
    {
        tracing::warn!(path, "removing the remains of a failed upload: {err}");
    }
    Err(error)
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
    let client = agent(&state, &caller, &id).await?;
    // The agent removes a missing path without complaint; the API says it was not there.
    let entry = client.stat(path, q.user()).await.map_err(agent_error)?;
    client
        .remove(&entry.path, q.user())
        .await
        .map_err(agent_error)?;
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
    let client = agent(&state, &caller, &id).await?;
    let dir = client.stat(path, q.user()).await.map_err(agent_error)?;
    if !is_dir(&dir) {
        return Err(not_a_directory(&dir.path));
    }
    let depth = q.depth.unwrap_or(1);
    let entries = client
        .list_dir(path, depth, q.user())
        .await
        .map_err(|e| match e {
            AgentError::TooLarge { .. } => too_big_listing(depth),
            e if e.code() == Code::ResourceExhausted => too_big_listing(depth),
            e => agent_error(e),
        })?;
    Ok(Json(v1::FileList {
        entries: entries.into_iter().map(file_entry).collect(),
    }))
}

fn too_big_listing(depth: u32) -> ApiError {
    ApiError::invalid(format!(
        "the listing at depth {depth} is too large to answer at once; list with a smaller depth"
    ))
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
    let client = agent(&state, &caller, &id).await?;
    let entry = client.stat(path, q.user()).await.map_err(agent_error)?;
    Ok(Json(file_entry(entry)))
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
    if req.path.is_empty() {
        return Err(ApiError::invalid("path must not be empty"));
    }
    let client = agent(&state, &caller, &id).await?;
    let (status, entry) = make_dir(&client, &req.path, q.user()).await?;
    Ok((status, Json(file_entry(entry))))
}

/// Makes directory `path` (and its parents): `201` when made, `200` when it already existed.
pub(crate) async fn make_dir(
    client: &AgentClient,
    path: &str,
    user: Option<&str>,
) -> ApiResult<(StatusCode, EntryInfo)> {
    match client.make_dir(path, user).await {
        Ok(entry) => Ok((StatusCode::CREATED, entry)),
        Err(e) => match stat_opt(client, path, user).await? {
            Some(existing) if is_dir(&existing) => Ok((StatusCode::OK, existing)),
            Some(existing) => Err(not_a_directory(&existing.path)),
            None => Err(agent_error(e)),
        },
    }
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
    if req.from.is_empty() || req.to.is_empty() {
        return Err(ApiError::invalid("from and to must not be empty"));
    }
    let client = agent(&state, &caller, &id).await?;
    let entry = client
        .move_entry(&req.from, &req.to, q.user())
        .await
        .map_err(agent_error)?;
    Ok(Json(file_entry(entry)))
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

    #[test]
    fn agent_errors_map_to_statuses() {
        let rpc = |code| AgentError::Rpc {
            code,
            message: "m".into(),
        };
        for (code, status) in [
            (Code::NotFound, 404),
            (Code::PermissionDenied, 403),
            (Code::AlreadyExists, 409),
            (Code::InvalidArgument, 400),
            (Code::ResourceExhausted, 507),
            (Code::Internal, 503),
        ] {
            assert_eq!(agent_error(rpc(code)).status.as_u16(), status, "{code:?}");
        }
        let e = agent_error(AgentError::Transport("gone".into()));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn entries_convert() {
        let link = EntryInfo {
            name: "l".into(),
            path: "/tmp/l".into(),
            r#type: WireType::Directory as i32,
            size: 4,
            mode: 0o755,
            // Marked by its target only, as the agent (and envd) sends a link.
            is_symlink: false,
            symlink_target: Some("/tmp/d".into()),
            modified_time: Some(pbjson_types::Timestamp {
                seconds: 2,
                nanos: 500_000_000,
            }),
            ..Default::default()
        };
        let e = file_entry(link);
        assert_eq!(e.kind, v1::FileType::Symlink);
        assert_eq!(e.symlink_target.as_deref(), Some("/tmp/d"));
        assert_eq!(e.modified_at, 2500);
        let fifo = EntryInfo {
            r#type: WireType::Unspecified as i32,
            ..Default::default()
        };
        let e = file_entry(fifo);
        assert_eq!(e.kind, v1::FileType::Other);
        assert_eq!(e.symlink_target, None);
    }
}
