//! `/v1/templates`: define, show, list, tag and delete templates.

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use moat_engine::auth::Caller;
use moat_engine::images::PullEvent;
use moat_proto::v1;

use crate::ApiError;
use crate::extract::{ApiResult, Shared, decode, json_body};

/// The template routes (authentication is added by the caller).
pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/templates", post(create).get(list))
        .route("/v1/templates/{name}", get(show).delete(delete))
        .route("/v1/templates/{name}/tags", post(tag))
}

/// `POST /v1/templates/{name}/tags`: `200` with the tags written.
async fn tag(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<v1::TemplateList>> {
    let Path(name) = name?;
    let req: v1::TagTemplate = json_body(body, None)?;
    let templates = state
        .manager
        .tag_template(&caller, &name, &req.tags)
        .await?;
    Ok(Json(v1::TemplateList { templates }))
}

/// `POST /v1/templates`: `201` with the template; with `Accept: application/x-ndjson`, `200`
/// with the pull of its image as it goes, then the template (or the error) as the last line.
async fn create(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: v1::CreateTemplate = json_body(body, None)?;
    if !crate::sandboxes::accepts(&headers, crate::sandboxes::NDJSON) {
        let template = state.manager.create_template(&caller, req).await?;
        return Ok((StatusCode::CREATED, Json(template)).into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let progress = pull_progress(tx.clone());
    // A task of its own: the client going away does not cut the create short.
    tokio::spawn(async move {
        let last = match state
            .manager
            .create_template_with_progress(&caller, req, progress)
            .await
        {
            Ok(template) => v1::TemplateCreateEvent::Template {
                template: Box::new(template),
            },
            Err(e) => v1::TemplateCreateEvent::Error(v1::ErrorDetail {
                code: e.code().to_owned(),
                message: e.to_string(),
            }),
        };
        let _ = tx.send(last);
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (event, rx))
    });
    Ok(crate::sandboxes::ndjson(events))
}

/// Least time between two progress lines of one layer.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The pull's events as stream lines, a layer's byte counts at most every [`PROGRESS_EVERY`].
fn pull_progress(
    tx: tokio::sync::mpsc::UnboundedSender<v1::TemplateCreateEvent>,
) -> std::sync::Arc<dyn Fn(PullEvent) + Send + Sync> {
    let sizes = std::sync::Mutex::new(Vec::<u64>::new());
    let last = std::sync::Mutex::new(None::<(usize, std::time::Instant)>);
    std::sync::Arc::new(move |event| {
        let line = match event {
            PullEvent::Resolved { sizes: s } => {
                let bytes = s.iter().fold(0u64, |a, b| a.saturating_add(*b));
                let layers = u32::try_from(s.len()).unwrap_or(u32::MAX);
                *sizes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = s;
                v1::TemplateCreateEvent::Resolved { layers, bytes }
            }
            PullEvent::Fetching { index, received } => {
                let mut last = last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = std::time::Instant::now();
                if last.is_some_and(|(i, at)| i == index && now - at < PROGRESS_EVERY) {
                    return;
                }
                *last = Some((index, now));
                let size = sizes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(index)
                    .copied()
                    .unwrap_or(0);
                v1::TemplateCreateEvent::Progress {
                    layer: u32::try_from(index).unwrap_or(u32::MAX),
                    received,
                    size,
                }
            }
            PullEvent::Unpacked { index } => v1::TemplateCreateEvent::Unpacked {
                layer: u32::try_from(index).unwrap_or(u32::MAX),
            },
        };
        let _ = tx.send(line);
    })
}

async fn list(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<v1::TemplateList>> {
    Ok(Json(state.manager.list_templates(&caller).await?))
}

async fn show(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<v1::Template>> {
    let Path(name) = name?;
    Ok(Json(state.manager.get_template(&caller, &name).await?))
}

async fn delete(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> ApiResult<StatusCode> {
    let Path(name) = name?;
    let force = parse_force(query.as_deref().unwrap_or(""))?;
    state.manager.delete_template(&caller, &name, force).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `force=true|false` (or bare `force`), the only parameter of a delete.
fn parse_force(query: &str) -> ApiResult<bool> {
    let mut force = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, "true"));
        match (decode(name)?.as_str(), decode(value)?.as_str()) {
            ("force", "true" | "1") => force = true,
            ("force", "false" | "0") => force = false,
            ("force", other) => {
                return Err(ApiError::invalid(format!(
                    "force={other:?}: expected true or false"
                )));
            }
            (other, _) => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {other:?} (known: force)"
                )));
            }
        }
    }
    Ok(force)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn force_forms() {
        assert!(!parse_force("").unwrap());
        assert!(parse_force("force").unwrap());
        assert!(parse_force("force=true").unwrap());
        assert!(!parse_force("force=0").unwrap());
        assert!(parse_force("force=yes").is_err());
        assert!(parse_force("forse=1").is_err());
    }
}
