//! The E2B sandbox routes, over the same [`SandboxManager`] calls as `/v1`'s.
//!
//! E2B clients see only running and paused sandboxes: one starting, ended, unknown or another
//! tenant's is 404, which the SDKs turn into their not-found answers.
//!
//! [`SandboxManager`]: moat_engine::manager::SandboxManager

use std::time::Duration;

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use moat_engine::auth::Caller;
use moat_engine::listing::SandboxQuery;
use moat_engine::manager::{ManagerError, StartFrom};
use moat_proto::v1;

use super::error::{E2bError, E2bResult};
use super::list_query;
use super::shapes::{
    ConnectSandboxV2, ListedSandbox, NewSandboxV2, Sandbox, SandboxDetail, SandboxMetric,
    SandboxTimeoutRequest, e2b_state,
};
use crate::extract::{Shared, decode, json_body};

/// The header a create's idempotency key comes in.
const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The header naming the next page of a listing.
const NEXT_TOKEN_HEADER: &str = "x-next-token";

/// `POST /v2/sandboxes`: a sandbox from a template, through the warm pool as `/v1`'s create.
pub(crate) async fn create(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult<(StatusCode, Json<Sandbox>)> {
    create_from(&state, &caller, &headers, body, Generation::V2).await
}

/// `POST /sandboxes`, where the SDKs before e2b 2.51 create: as [`create`], but for
/// `allow_internet_access`, which those SDKs send `true` unless told otherwise (so it asks for
/// nothing, and a sandbox without network is what it gets).
pub(crate) async fn create_legacy(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult<(StatusCode, Json<Sandbox>)> {
    create_from(&state, &caller, &headers, body, Generation::Legacy).await
}

/// Which create route a request came by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Generation {
    /// `POST /v2/sandboxes`.
    V2,
    /// `POST /sandboxes`.
    Legacy,
}

/// The create of either route.
async fn create_from(
    state: &Shared,
    caller: &Caller,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    generation: Generation,
) -> E2bResult<(StatusCode, Json<Sandbox>)> {
    let mut req: NewSandboxV2 = json_body(body, None)?;
    if generation == Generation::Legacy && req.allow_internet_access == Some(true) {
        req.allow_internet_access = None;
    }
    let idempotency_key = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| E2bError::invalid("Idempotency-Key is not text"))?
                .to_owned(),
        ),
        None => None,
    };
    let mut create = to_create(req, state.manager.options().max_ttl)?;
    // `templateID` names a snapshot (what `create_snapshot` answered) or a template; an
    // unknown template is "not found", as E2B answers it.
    match state
        .manager
        .resolve_start(caller, &create.template)
        .await?
    {
        StartFrom::Snapshot(id) => {
            create.template.clear();
            create.snapshot = Some(id);
        }
        // A build's id resolves to the name of what it made.
        StartFrom::Template(name) => create.template = name,
    }
    let sandbox = match idempotency_key {
        Some(key) => {
            state
                .manager
                .create_idempotent(caller, &key, create)
                .await?
                .0
        }
        None => state.manager.create(caller, create).await?,
    };
    Ok((StatusCode::CREATED, Json(answer(state, &sandbox))))
}

/// `/v1`'s create request for an E2B one, refusing what moat does not enforce rather than
/// accepting and ignoring it.
fn to_create(req: NewSandboxV2, max_ttl: Duration) -> E2bResult<v1::CreateSandbox> {
    let unsupported = |what: &str| {
        Err(E2bError::invalid(format!(
            "{what} is not supported by this server"
        )))
    };
    let asked = super::network::translate(req.allow_internet_access, req.network.as_ref(), false)?;
    // A paused sandbox keeps its memory on every backend (frozen, or saved to disk), so a
    // filesystem-only auto-pause is not offered.
    if req.auto_pause_memory == Some(false) {
        return unsupported("autoPauseMemory: false (a paused sandbox keeps its memory)");
    }
    let auto_resume = req.auto_resume.is_some_and(|r| r.enabled);
    let lifecycle =
        (req.auto_pause.is_some() || req.auto_resume.is_some()).then_some(v1::Lifecycle {
            on_timeout: if req.auto_pause == Some(true) {
                v1::OnTimeout::Pause
            } else {
                v1::OnTimeout::Kill
            },
            auto_resume,
        });
    if given(&req.mcp) {
        return unsupported("mcp");
    }
    if given(&req.volume_mounts) {
        return unsupported("volumeMounts");
    }
    if given(&req.iam) {
        return unsupported("iam");
    }
    let timeout_secs = req.timeout.map(|t| check_timeout(t, max_ttl)).transpose()?;
    Ok(v1::CreateSandbox {
        template: req
            .template_id
            .map_or_else(|| "base".to_owned(), |t| super::builds::moat_name(&t)),
        snapshot: None,
        resources: None,
        env: req.env_vars.unwrap_or_default(),
        metadata: req.metadata.unwrap_or_default(),
        timeout_secs,
        public_traffic: asked.public_traffic,
        lifecycle,
        network: asked.network,
    })
}

/// Whether an optional object field asks for something: present, and neither `null` nor
/// empty.
fn given(value: &Option<serde_json::Value>) -> bool {
    match value {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Object(m)) => !m.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

/// A timeout in seconds, 1 to `max`.
pub(super) fn check_timeout(secs: i64, max: Duration) -> E2bResult<u64> {
    let max_secs = max.as_secs();
    match u64::try_from(secs) {
        Ok(s) if s > 0 && s <= max_secs => Ok(s),
        Ok(s) if s > max_secs => Err(E2bError::invalid(format!(
            "Timeout cannot be greater than {}",
            if max_secs.is_multiple_of(3600) {
                format!("{} hours", max_secs / 3600)
            } else {
                format!("{max_secs} seconds")
            }
        ))),
        _ => Err(E2bError::invalid(format!(
            "Timeout must be a positive number of seconds, not {secs}"
        ))),
    }
}

/// The create/connect answer for `sandbox`.
pub(super) fn answer(state: &Shared, sandbox: &v1::Sandbox) -> Sandbox {
    Sandbox::new(
        sandbox,
        state.manager.access_token(&sandbox.id),
        state.manager.traffic_token(&sandbox.id),
        &state.domain,
    )
}

/// `tenant`'s sandbox `id` if an E2B client may see it (running or paused).
pub(super) async fn visible(state: &Shared, caller: &Caller, id: &str) -> E2bResult<v1::Sandbox> {
    match state.manager.get(caller, id).await {
        Ok(sandbox) if e2b_state(sandbox.state).is_some() => Ok(sandbox),
        // A malformed id names no sandbox either.
        Ok(_) | Err(ManagerError::NotFound(_) | ManagerError::Invalid(_)) => {
            Err(E2bError::no_sandbox(id))
        }
        Err(e) => Err(e.into()),
    }
}

/// A manager answer about a sandbox that was visible a moment ago: ended meanwhile is 404
/// (SDKs raise "not found"); a conflict of a sandbox that is still there (a network policy a
/// gvisor sandbox made without one cannot take) is that conflict, as `/v1` answers it.
pub(crate) async fn gone_is_404(
    state: &Shared,
    caller: &Caller,
    id: &str,
    e: ManagerError,
) -> E2bError {
    match e {
        ManagerError::NotFound(_) => E2bError::no_sandbox(id),
        ManagerError::Conflict(_) => match visible(state, caller, id).await {
            Ok(_) => e.into(),
            Err(gone) => gone,
        },
        other => other.into(),
    }
}

/// `POST /v2/sandboxes/{id}/connect`: a running sandbox, its time to live only extended (200);
/// a paused one is resumed with that time to live (201).
pub(crate) async fn connect(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult<Response> {
    let Path(id) = id?;
    let req: ConnectSandboxV2 = json_body(body, Some(ConnectSandboxV2::default()))?;
    let opts = state.manager.options();
    let timeout = match req.timeout {
        Some(t) => check_timeout(t, opts.max_ttl)?,
        None => opts.default_ttl.as_secs(),
    };
    let sandbox = visible(&state, &caller, &id).await?;
    match sandbox.state {
        // Refused rather than resumed with its processes, which is not what was asked.
        v1::SandboxState::Paused if req.memory == Some(false) => Err(E2bError::invalid(
            "connect with memory: false (a reboot: the sandbox started afresh from its files) \
             is not supported by this server; connect without it resumes its processes where \
             they were",
        )),
        v1::SandboxState::Paused => resume(&state, &caller, &id, timeout).await,
        _ => {
            let sandbox = match state.manager.extend_timeout(&caller, &id, timeout).await {
                Ok(v) => v,
                Err(e) => return Err(gone_is_404(&state, &caller, &id, e).await),
            };
            Ok((StatusCode::OK, Json(answer(&state, &sandbox))).into_response())
        }
    }
}

/// Resumes `tenant`'s paused sandbox `id` for `timeout` seconds: what a connect to a paused
/// sandbox does (answered 201).
async fn resume(
    state: &Shared,
    caller: &Caller,
    id: &str,
    timeout_secs: u64,
) -> E2bResult<Response> {
    let req = v1::ResumeSandbox {
        timeout_secs: Some(timeout_secs),
    };
    match state.manager.resume(caller, id, req).await {
        Ok(sandbox) => Ok((StatusCode::CREATED, Json(answer(state, &sandbox))).into_response()),
        Err(ManagerError::NotFound(_)) => Err(E2bError::no_sandbox(id)),
        Err(e) => Err(e.into()),
    }
}

/// `DELETE /sandboxes/{id}`: 204, or 404 when there is no such sandbox (any more).
pub(crate) async fn kill(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> E2bResult<StatusCode> {
    let Path(id) = id?;
    visible(&state, &caller, &id).await?;
    if let Err(e) = state.manager.delete(&caller, &id).await {
        return Err(gone_is_404(&state, &caller, &id, e).await);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/timeout`: the sandbox now expires `timeout` seconds from now (which
/// may be sooner than before).
pub(crate) async fn set_timeout(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult<StatusCode> {
    let Path(id) = id?;
    let req: SandboxTimeoutRequest = json_body(body, None)?;
    let timeout_secs = check_timeout(req.timeout, state.manager.options().max_ttl)?;
    visible(&state, &caller, &id).await?;
    if let Err(e) = state
        .manager
        .set_timeout(&caller, &id, v1::SetTimeout { timeout_secs })
        .await
    {
        return Err(gone_is_404(&state, &caller, &id, e).await);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /sandboxes/{id}`.
pub(crate) async fn get(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> E2bResult<Json<SandboxDetail>> {
    let Path(id) = id?;
    let sandbox = visible(&state, &caller, &id).await?;
    // A sandbox this server does not run (paused to disk, say) shows no network.
    let internet = state
        .manager
        .network(&caller, &id)
        .await
        .is_ok_and(|n| n.network.internet);
    let mut detail = SandboxDetail::new(&sandbox, state.manager.access_token(&id), &state.domain);
    detail.allow_internet_access = internet;
    Ok(Json(detail))
}

/// `GET /v2/sandboxes`: one page, newest first unless `order=asc`; `x-next-token` names the
/// next page.
pub(crate) async fn list(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> E2bResult<Response> {
    let filter = list_query::parse(query.as_deref().unwrap_or(""))?;
    let page = state.manager.list_where(&caller, filter).await?;
    let items: Vec<ListedSandbox> = page.sandboxes.iter().map(ListedSandbox::new).collect();
    paged(items, page.next)
}

/// `GET /sandboxes` (the SDKs before e2b 2.51, and E2B's first listing): every running
/// sandbox, newest first, in one answer; `metadata` filters as `GET /v2/sandboxes`'s does.
/// Paging and states are not this route's: its other parameters are ignored, as E2B does.
pub(crate) async fn list_running(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> E2bResult<Json<Vec<ListedSandbox>>> {
    let parsed = list_query::parse(query.as_deref().unwrap_or(""))?;
    let query = SandboxQuery {
        metadata: parsed.metadata,
        states: vec![v1::SandboxState::Running],
        limit: list_query::MAX_LIST_LIMIT,
        newest_first: true,
        ..Default::default()
    };
    let sandboxes = state.manager.list_all(&caller, query).await?;
    Ok(Json(sandboxes.iter().map(ListedSandbox::new).collect()))
}

/// A page of a listing: `items` as JSON, and `x-next-token` naming the next page if any.
pub(super) fn paged<T: serde::Serialize>(
    items: Vec<T>,
    next: Option<String>,
) -> E2bResult<Response> {
    let mut response = Json(items).into_response();
    if let Some(next) = next {
        let value = HeaderValue::from_str(&next)
            .map_err(|e| E2bError::from(crate::ApiError::internal(format!("page token: {e}"))))?;
        response.headers_mut().insert(NEXT_TOKEN_HEADER, value);
    }
    Ok(response)
}

/// `GET /sandboxes/{id}/metrics?start=<unix s>&end=<unix s>`: the samples taken in that
/// window (the last hour at most), and one taken now unless `end` is past. A paused sandbox
/// has none.
pub(crate) async fn metrics(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> E2bResult<Json<Vec<SandboxMetric>>> {
    let Path(id) = id?;
    let (mut start, mut end) = (None, None);
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match decode(name)?.as_str() {
            "start" => &mut start,
            "end" => &mut end,
            _ => continue,
        };
        let value = decode(value)?;
        let secs: i64 = value.parse().map_err(|_| {
            E2bError::invalid(format!("{name} {value:?} is not a Unix time in seconds"))
        })?;
        *slot = Some(secs);
    }
    let sandbox = visible(&state, &caller, &id).await?;
    if sandbox.state != v1::SandboxState::Running {
        return Ok(Json(Vec::new()));
    }
    // Whole seconds: `end` takes in the whole of its second.
    let from_ms = start.map(|s| s.saturating_mul(1000));
    let to_ms = end.map(|s| s.saturating_mul(1000).saturating_add(999));
    let samples = match state.manager.usage(&caller, &id, from_ms, to_ms).await {
        Ok(v) => v,
        Err(e) => return Err(gone_is_404(&state, &caller, &id, e).await),
    };
    Ok(Json(samples.iter().map(SandboxMetric::from).collect()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn timeouts() {
        assert_eq!(check_timeout(1, DAY).unwrap(), 1);
        assert_eq!(check_timeout(86_400, DAY).unwrap(), 86_400);
        let e = check_timeout(86_401, DAY).unwrap_err();
        assert_eq!(e.message, "Timeout cannot be greater than 24 hours");
        let e = check_timeout(11, Duration::from_secs(10)).unwrap_err();
        assert_eq!(e.message, "Timeout cannot be greater than 10 seconds");
        for bad in [0, -5] {
            assert_eq!(check_timeout(bad, DAY).unwrap_err().status, 400);
        }
    }

    #[test]
    fn unenforced_options_are_refused() {
        let ok = |json: &str| to_create(serde_json::from_str(json).unwrap(), DAY);
        let c = ok(
            r#"{"templateID":"code-interpreter-v1","timeout":60,"metadata":{"a":"b"},
                       "envVars":{"X":"1"},"allow_internet_access":false,"autoPause":false,
                       "autoResume":{"enabled":false},"network":null,"volumeMounts":[]}"#,
        )
        .unwrap();
        assert_eq!(c.template, "code-interpreter-v1");
        assert_eq!(c.timeout_secs, Some(60));
        assert_eq!(c.env["X"], "1");
        assert_eq!(c.metadata["a"], "b");
        assert_eq!(ok("{}").unwrap().template, "base");
        assert_eq!(ok("{}").unwrap().public_traffic, None);
        let private = ok(r#"{"network":{"allowPublicTraffic":false,"allowOut":[]}}"#).unwrap();
        assert_eq!(private.public_traffic, Some(false));
        // Empty lists ask for nothing: still no network.
        assert_eq!(private.network, None);
        assert_eq!(
            ok(r#"{"allow_internet_access":true}"#).unwrap().network,
            Some(v1::Network::internet())
        );
        assert_eq!(ok("{}").unwrap().lifecycle, None);
        let paused =
            ok(r#"{"autoPause":true,"autoPauseMemory":true,"autoResume":{"enabled":true}}"#)
                .unwrap()
                .lifecycle
                .unwrap();
        assert_eq!(paused.on_timeout, v1::OnTimeout::Pause);
        assert!(paused.auto_resume);
        let killed = ok(r#"{"autoPause":false}"#).unwrap().lifecycle.unwrap();
        assert_eq!(killed.on_timeout, v1::OnTimeout::Kill);
        assert!(!killed.auto_resume);
        for bad in [
            r#"{"network":{"egressProxy":{"address":"proxy:1080"}}}"#,
            r#"{"network":{"denyOut":["evil.com"]}}"#,
            r#"{"network":{"allowPublicTraffic":"no"}}"#,
            r#"{"network":true}"#,
            r#"{"autoPause":true,"autoPauseMemory":false}"#,
            r#"{"mcp":{"x":{}}}"#,
            r#"{"volumeMounts":[{"name":"v","path":"/v"}]}"#,
            r#"{"iam":{"tokens":{}}}"#,
            r#"{"iam":{"tokens":{"a":{}}}}"#,
            r#"{"timeout":0}"#,
        ] {
            let e = ok(bad).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
        }
    }
}
