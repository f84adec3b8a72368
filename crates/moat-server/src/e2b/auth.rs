//! Authentication of the E2B API: `X-API-KEY: <moat API key secret>`, checked exactly as
//! `/v1`'s Bearer keys are (same keys, tenants, roles and rate limits).

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::E2bError;
use crate::ApiError;
use crate::auth::check_key;
use crate::extract::Shared;

/// The header the E2B SDKs send their API key in, raw.
const API_KEY_HEADER: &str = "x-api-key";

/// Puts the caller of a valid `X-API-KEY` in the request's extensions; refuses anything else
/// with an E2B error.
pub(crate) async fn authenticate(
    State(state): State<Shared>,
    mut req: Request,
    next: Next,
) -> Response {
    let secret = match req.headers().get(API_KEY_HEADER).map(|v| v.to_str()) {
        Some(Ok(secret)) => secret.trim().to_owned(),
        Some(Err(_)) => {
            return E2bError::from(ApiError::unauthenticated("malformed X-API-KEY header"))
                .into_response();
        }
        None => {
            return E2bError::from(ApiError::unauthenticated(
                "missing API key: send `X-API-KEY: <key>`",
            ))
            .into_response();
        }
    };
    match check_key(&state, secret).await {
        Ok((caller, slot)) => {
            req.extensions_mut().insert(caller);
            crate::held_body::hold(next.run(req).await, slot)
        }
        Err(refusal) => E2bError::from(refusal).into_response(),
    }
}
