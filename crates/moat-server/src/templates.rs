//! `/v1/templates`: define, show, list and delete templates.

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use moat_engine::auth::Caller;
use moat_proto::v1;

use crate::ApiError;
use crate::extract::{ApiResult, Shared, decode, json_body};

/// The template routes (authentication is added by the caller).
pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/templates", post(create).get(list))
        .route("/v1/templates/{name}", get(show).delete(delete))
}

async fn create(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<v1::Template>)> {
    let req: v1::CreateTemplate = json_body(body, None)?;
    let template = state.manager.create_template(&caller, req).await?;
    Ok((StatusCode::CREATED, Json(template)))
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
