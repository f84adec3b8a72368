//! The E2B routes that freeze or copy a sandbox: pause (resume is a connect, see
//! [`super::sandboxes::connect`]), snapshots and fork, over the manager's pause, snapshot and
//! fork calls.
//!
//! moat's native backend freezes a paused sandbox's processes in memory, so a pause keeps them
//! whatever `memory` asks. Its snapshots hold files only: a snapshot request that does not say
//! `memory: false` (the SDK's default mode, `"full"`) is refused with a message saying so,
//! rather than answered with less than was asked. A fork copies files only (the SDK has no
//! mode for it); the copies start without the source's processes.

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use moat_engine::auth::Caller;
use moat_engine::manager::ManagerError;
use moat_proto::v1;
use serde::{Deserialize, Serialize};

use super::error::{E2bError, E2bResult};
use super::sandboxes::{answer, check_timeout, paged, visible};
use super::shapes::Sandbox;
use crate::extract::{Shared, decode, json_body};

/// `SandboxPauseRequest`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PauseRequest {
    /// `false`: a filesystem-only pause. moat keeps memory either way.
    #[allow(dead_code)]
    pub(crate) memory: Option<bool>,
    /// `true` (the SDK's `pause(strict=True)`): refuse with 503 when the agent does not
    /// answer, instead of pausing it as it is.
    pub(crate) require_healthy_guest: Option<bool>,
}

/// `SandboxSnapshotRequest`.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct SnapshotRequest {
    pub(crate) name: Option<String>,
    /// `false`: files only; otherwise memory too, which gvisor sandboxes can save.
    pub(crate) memory: Option<bool>,
}

/// `SandboxForkRequest`.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ForkRequest {
    pub(crate) timeout: Option<i64>,
    pub(crate) count: Option<i64>,
}

/// `SnapshotInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    pub(crate) snapshot_id: String,
    pub(crate) names: Vec<String>,
}

impl From<&v1::Snapshot> for SnapshotInfo {
    fn from(s: &v1::Snapshot) -> Self {
        SnapshotInfo {
            snapshot_id: s.id.clone(),
            names: s.name.iter().cloned().collect(),
        }
    }
}

/// One item of a fork's answer: exactly one of `sandbox` and `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ForkResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sandbox: Option<Sandbox>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<ForkError>,
}

/// Why one copy of a fork failed, as E2B's `Error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ForkError {
    pub(crate) code: u16,
    pub(crate) message: String,
}

/// The message of a refused memory snapshot.
const FILES_ONLY: &str = "this sandbox's backend snapshots its filesystem only (no memory \
     checkpoints; gvisor templates have them): pass mode=\"filesystem\" (memory: false)";

/// `POST /sandboxes/{id}/pause`: 204, or 409 when it is paused already (the SDK's `False`).
pub(crate) async fn pause(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult<StatusCode> {
    let Path(id) = id?;
    let req: PauseRequest = json_body(body, Some(PauseRequest::default()))?;
    let sandbox = visible(&state, &caller, &id).await?;
    if sandbox.state == v1::SandboxState::Paused {
        return Err(conflict(format!("sandbox {id} is already paused")));
    }
    if req.require_healthy_guest == Some(true) {
        match state.manager.check_agent(&caller, &id).await {
            Ok(()) => {}
            Err(ManagerError::NotFound(_)) => return Err(E2bError::no_sandbox(&id)),
            Err(e) => return Err(e.into()),
        }
    }
    match state.manager.pause(&caller, &id).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(ManagerError::Conflict(m)) => Err(conflict(m)),
        Err(ManagerError::NotFound(_)) => Err(E2bError::no_sandbox(&id)),
        Err(e) => Err(e.into()),
    }
}

/// `POST /sandboxes/{id}/snapshots`: 201 `SnapshotInfo`; with memory (E2B's default) where the
/// sandbox's backend saves it, files only when asked (`memory: false`).
pub(crate) async fn create_snapshot(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult<(StatusCode, Json<SnapshotInfo>)> {
    let Path(id) = id?;
    let req: SnapshotRequest = json_body(body, Some(SnapshotRequest::default()))?;
    visible(&state, &caller, &id).await?;
    // E2B's default mode keeps memory: done where the sandbox's backend can (gvisor).
    let memory = req.memory != Some(false);
    if memory
        && !state
            .manager
            .saves_memory(&caller, &id)
            .await
            .map_err(|e| sandbox_error(e, &id))?
    {
        return Err(E2bError::invalid(FILES_ONLY));
    }
    let snapshot = state
        .manager
        .snapshot(
            &caller,
            &id,
            v1::CreateSnapshot {
                name: req.name,
                memory,
            },
        )
        .await
        .map_err(|e| sandbox_error(e, &id))?;
    Ok((StatusCode::CREATED, Json(SnapshotInfo::from(&snapshot))))
}

/// `GET /snapshots?sandboxID=&name=&limit=&nextToken=`: one page, `x-next-token` naming the
/// next.
pub(crate) async fn list_snapshots(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> E2bResult<Response> {
    let mut q = v1::ListSnapshots::default();
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(value)?;
        match decode(name)?.as_str() {
            "sandboxID" => q.sandbox_id = Some(value),
            "name" => q.name = Some(value),
            "nextToken" => q.after = Some(value),
            "limit" => {
                let limit: u32 = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=100).contains(l))
                    .ok_or_else(|| {
                        E2bError::invalid(format!("limit {value:?} must be 1 to 100"))
                    })?;
                q.limit = Some(limit);
            }
            // Unknown parameters are ignored, as E2B's API does.
            _ => {}
        }
    }
    // A malformed sandbox id names no snapshot: an empty page, not an error.
    if q.sandbox_id
        .as_deref()
        .is_some_and(|s| !moat_engine::ids::is_sandbox_id(s))
    {
        return Ok(Json(Vec::<SnapshotInfo>::new()).into_response());
    }
    let page = state.manager.list_snapshots(&caller, q).await?;
    let items: Vec<SnapshotInfo> = page.snapshots.iter().map(SnapshotInfo::from).collect();
    paged(items, page.next)
}

/// `DELETE /templates/{snapshotID}`: 204, or 404 (the SDK's `False`).
pub(crate) async fn delete_snapshot(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> E2bResult<StatusCode> {
    let Path(id) = id?;
    match state.manager.delete_snapshot(&caller, &id).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        // Not a snapshot id at all (a template name, say): no such snapshot either.
        Err(ManagerError::NotFound(_) | ManagerError::Invalid(_)) => {
            Err(E2bError::not_found(format!("snapshot {id:?} not found")))
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /sandboxes/{id}/fork`: 201 with one result per copy.
pub(crate) async fn fork(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult<(StatusCode, Json<Vec<ForkResult>>)> {
    let Path(id) = id?;
    let req: ForkRequest = json_body(body, Some(ForkRequest::default()))?;
    let max_ttl = state.manager.options().max_ttl;
    let timeout_secs = req.timeout.map(|t| check_timeout(t, max_ttl)).transpose()?;
    let count = match req.count {
        None => None,
        Some(c) => Some(
            u32::try_from(c)
                .ok()
                .filter(|c| (1..=v1::MAX_FORK_COUNT).contains(c))
                .ok_or_else(|| {
                    E2bError::invalid(format!("count {c} must be 1 to {}", v1::MAX_FORK_COUNT))
                })?,
        ),
    };
    visible(&state, &caller, &id).await?;
    // As E2B's sandboxes are, copies are whole (memory and processes) where the backend can.
    let memory = state
        .manager
        .saves_memory(&caller, &id)
        .await
        .map_err(|e| sandbox_error(e, &id))?;
    let forked = state
        .manager
        .fork(
            &caller,
            &id,
            v1::ForkSandbox {
                count,
                timeout_secs,
                metadata: Default::default(),
                memory,
            },
        )
        .await
        .map_err(|e| sandbox_error(e, &id))?;
    let results = forked
        .iter()
        .map(|item| match item {
            Ok(sandbox) => ForkResult {
                sandbox: Some(answer(&state, sandbox)),
                error: None,
            },
            Err(err) => ForkResult {
                sandbox: None,
                error: Some(ForkError {
                    code: crate::error::status_of(err).as_u16(),
                    message: err.to_string(),
                }),
            },
        })
        .collect();
    Ok((StatusCode::CREATED, Json(results)))
}

/// 409 with this message.
fn conflict(message: impl Into<String>) -> E2bError {
    crate::ApiError::new(StatusCode::CONFLICT, "conflict", message).into()
}

/// The E2B form of a manager error about sandbox `id`: E2B's 404 for one that is not there.
fn sandbox_error(e: ManagerError, id: &str) -> E2bError {
    match e {
        ManagerError::NotFound(_) => E2bError::no_sandbox(id),
        other => other.into(),
    }
}
