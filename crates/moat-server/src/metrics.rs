//! `GET /metrics`: the server's series in the Prometheus text format, for admin keys only.
//!
//! Not open like the health endpoints: the series reveal activity across every tenant (how many
//! sandboxes, which templates have pools, error rates), so only an admin key may read them.
//! Prometheus sends the key as a bearer token (`authorization` in its scrape config).

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use moat_engine::auth::Caller;
use moat_engine::metrics::CONTENT_TYPE;

use crate::extract::{ApiResult, Shared};

/// The metrics route (authentication is added by the caller).
pub(crate) fn routes() -> Router<Shared> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Response> {
    caller.require_admin("/metrics")?;
    let text = state.manager.render_metrics().await?;
    let mut response = text.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    Ok(response)
}
