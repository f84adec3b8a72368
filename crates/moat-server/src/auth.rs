//! Authentication of `/v1`: `Authorization: Bearer <key>`, turned into the engine's
//! [`Caller`] by one engine call, then held to the key's rate limit. The E2B API checks its
//! `X-API-KEY` with the same [`check_key`].

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use moat_engine::auth::Caller;
use moat_engine::tenant_slots::TenantSlot;

use crate::ApiError;
use crate::extract::{ApiResult, Shared};

/// Puts the caller of a valid Bearer key in the request's extensions; refuses anything else.
pub(crate) async fn authenticate(
    State(state): State<Shared>,
    mut req: Request,
    next: Next,
) -> ApiResult<Response> {
    let secret = bearer(&req)?;
    match check_key(&state, secret).await {
        Ok((caller, slot)) => {
            req.extensions_mut().insert(caller);
            Ok(crate::held_body::hold(next.run(req).await, slot))
        }
        Err(refusal) => Ok(refusal.into_response()),
    }
}

/// Why a key was refused: the error, and for a rate limit the seconds until a retry can pass.
#[derive(Debug)]
pub(crate) struct KeyRefusal {
    pub(crate) error: ApiError,
    pub(crate) retry_after_secs: Option<u64>,
}

impl From<ApiError> for KeyRefusal {
    fn from(error: ApiError) -> Self {
        KeyRefusal {
            error,
            retry_after_secs: None,
        }
    }
}

impl IntoResponse for KeyRefusal {
    fn into_response(self) -> Response {
        let mut response = self.error.into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The caller an API key secret stands for, once the engine knows the key (not revoked), it is
/// within its rate limit and its tenant has room for one more request in flight: what every
/// authenticated surface (`/v1`'s Bearer keys, the E2B API's `X-API-KEY`) checks. The slot is
/// to be held until the answer has been sent ([`crate::held_body::hold`]).
pub(crate) async fn check_key(
    state: &Shared,
    secret: String,
) -> Result<(Caller, TenantSlot), KeyRefusal> {
    let caller = state.manager.authenticate(secret).await?;
    within_rate(state, &caller)?;
    let slot = state
        .tenant_requests
        .enter(&caller.tenant)
        .map_err(|_| KeyRefusal {
            error: ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "tenant {} has {} requests in flight, the most one tenant may have at once; \
                 retry once some have been answered",
                    caller.tenant,
                    state.tenant_requests.per_tenant()
                ),
            ),
            retry_after_secs: Some(1),
        })?;
    Ok((caller, slot))
}

/// Refuses a caller whose key is over its rate limit.
fn within_rate(state: &Shared, caller: &Caller) -> Result<(), KeyRefusal> {
    // A caller made from a key always names it; one without a key has no key's rate to keep.
    let Some(key_id) = caller.key_id() else {
        return Ok(());
    };
    let limited = state
        .rate_limiter
        .check(key_id, caller.requests_per_minute, Instant::now());
    if let Err(limit) = limited {
        return Err(KeyRefusal {
            error: ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "key {key_id} is over its rate limit of {} requests per minute; retry in {} s",
                    limit.requests_per_minute, limit.retry_after_secs
                ),
            ),
            retry_after_secs: Some(limit.retry_after_secs),
        });
    }
    Ok(())
}

impl From<moat_engine::manager::ManagerError> for KeyRefusal {
    fn from(e: moat_engine::manager::ManagerError) -> Self {
        ApiError::from(e).into()
    }
}

/// The secret of `Authorization: Bearer <secret>`.
fn bearer(req: &Request) -> ApiResult<String> {
    let missing =
        || ApiError::unauthenticated("missing API key: send `Authorization: Bearer <key>`");
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| ApiError::unauthenticated("malformed Authorization header"))?;
    let (scheme, secret) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::unauthenticated("malformed Authorization header"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::unauthenticated(
            "unsupported Authorization scheme: use `Bearer <key>`",
        ));
    }
    Ok(secret.trim().to_owned())
}
