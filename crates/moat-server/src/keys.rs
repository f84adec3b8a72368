//! `/v1/keys`: make, list and revoke API keys. Every route needs an admin key; an admin
//! manages the keys of any tenant (`tenant` in the body or query; its own by default).

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use moat_engine::auth::Caller;
use moat_proto::v1;

use crate::ApiError;
use crate::extract::{ApiResult, Shared, decode, json_body};

/// The key routes (authentication is added by the caller).
pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/keys", post(create).get(list))
        .route("/v1/keys/{id}", delete(revoke))
}

/// 403 unless the caller's key is an admin key: the engine's rule, asked before the request
/// is read so that a refused caller learns nothing about its request.
fn require_admin(caller: &Caller) -> ApiResult<()> {
    Ok(caller.require_key_admin()?)
}

async fn create(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<v1::CreatedKey>)> {
    require_admin(&caller)?;
    let req: v1::CreateKey = json_body(body, None)?;
    let key = state.manager.create_key(&caller, req).await?;
    tracing::info!(key = %key.key.id, tenant = %key.key.tenant, role = %key.key.role, by = %caller.key_id().unwrap_or_default(), "API key created");
    Ok((StatusCode::CREATED, Json(key)))
}

async fn list(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<v1::KeyList>> {
    require_admin(&caller)?;
    let tenant = tenant_query(query.as_deref().unwrap_or(""))?;
    Ok(Json(
        state.manager.list_keys(&caller, tenant.as_deref()).await?,
    ))
}

async fn revoke(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<v1::ApiKey>> {
    require_admin(&caller)?;
    let Path(id) = id?;
    let tenant = tenant_query(query.as_deref().unwrap_or(""))?;
    let key = state
        .manager
        .revoke_key(&caller, tenant.as_deref(), &id)
        .await?;
    tracing::info!(key = %key.id, tenant = %key.tenant, by = %caller.key_id().unwrap_or_default(), "API key revoked");
    Ok(Json(key))
}

/// `tenant=T`, the only query parameter of the key routes.
fn tenant_query(query: &str) -> ApiResult<Option<String>> {
    let mut tenant = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match decode(name)?.as_str() {
            "tenant" => tenant = Some(decode(value)?),
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {other:?} (known: tenant)"
                )));
            }
        }
    }
    Ok(tenant)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use moat_engine::auth::Role;

    #[test]
    fn tenant_query_forms() {
        assert_eq!(tenant_query("").unwrap(), None);
        assert_eq!(
            tenant_query("tenant=acme").unwrap().as_deref(),
            Some("acme")
        );
        assert!(tenant_query("tenants=acme").is_err());
        assert!(tenant_query("tenant=%ff").is_err());
    }

    #[test]
    fn only_admins() {
        let caller = |role| Caller {
            tenant: "t".into(),
            key_id: Some("key_x".into()),
            role,
            requests_per_minute: None,
        };
        assert!(require_admin(&caller(Role::Admin)).is_ok());
        let e = require_admin(&caller(Role::User)).unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::FORBIDDEN, "forbidden"));
    }
}
