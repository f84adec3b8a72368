//! The E2B API's error answers: JSON `{"code": <HTTP status>, "message": "..."}`, which the
//! E2B SDKs parse before they look at the status, so every failure on these routes has it.

use axum::Json;
use axum::extract::Request;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use moat_engine::manager::ManagerError;

use crate::ApiError;
use crate::auth::KeyRefusal;
use crate::error::ErrorCode;

/// `Retry-After` of a 429 or 503 that has no better estimate (a quota, a busy backend), seconds.
pub(crate) const DEFAULT_RETRY_AFTER_SECS: u64 = 1;

/// The header the E2B SDKs read to decide whether a failed request may be retried.
const SHOULD_RETRY: &str = "should-retry";

/// An error as the E2B API answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct E2bError {
    pub(crate) status: StatusCode,
    /// moat's machine-readable code, counted in `moat_errors_total` (the body has only the
    /// status, as E2B's does).
    pub(crate) code: &'static str,
    pub(crate) message: String,
    /// Seconds a client should wait before retrying (429 and 503 only).
    pub(crate) retry_after_secs: Option<u64>,
}

/// Result of the E2B handlers.
pub(crate) type E2bResult<T> = Result<T, E2bError>;

impl E2bError {
    /// 400 with this message.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        ApiError::invalid(message).into()
    }

    /// 404 with this message.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message).into()
    }

    /// 404 for sandbox `id`: unknown, another tenant's, or no longer running.
    pub(crate) fn no_sandbox(id: &str) -> Self {
        E2bError::not_found(format!("sandbox {id} not found"))
    }
}

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> Self {
        E2bError {
            status: e.status,
            code: e.code,
            message: e.message,
            retry_after_secs: None,
        }
    }
}

impl From<ManagerError> for E2bError {
    fn from(e: ManagerError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<KeyRefusal> for E2bError {
    fn from(r: KeyRefusal) -> Self {
        E2bError {
            retry_after_secs: r.retry_after_secs,
            ..r.error.into()
        }
    }
}

impl From<BytesRejection> for E2bError {
    fn from(r: BytesRejection) -> Self {
        ApiError::from(r).into()
    }
}

impl From<PathRejection> for E2bError {
    fn from(r: PathRejection) -> Self {
        ApiError::from(r).into()
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": self.status.as_u16(),
            "message": self.message,
        });
        let mut response = (self.status, Json(body)).into_response();
        let busy = matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        );
        if busy {
            let secs = self.retry_after_secs.unwrap_or(DEFAULT_RETRY_AFTER_SECS);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(ErrorCode(self.code));
        response
    }
}

/// Marks every failed create, fork and snapshot (`POST /v2/sandboxes`, `POST /sandboxes`,
/// `POST /sandboxes/{id}/fork`, `POST /sandboxes/{id}/snapshots`) `Should-Retry: false`. The
/// SDKs retry a 429 or 503 without that header, and none of these is idempotent (a create only
/// with an `Idempotency-Key`): the first attempt may have made what the answer never reached.
/// Layered outside the authentication so its refusals are marked too.
pub(crate) async fn no_retry_on_failed_create(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let create = req.method() == Method::POST
        && (path == super::CREATE_PATH
            || path == super::LEGACY_CREATE_PATH
            || (path.starts_with("/sandboxes/")
                && (path.ends_with("/fork") || path.ends_with("/snapshots"))));
    let mut response = next.run(req).await;
    if create && (response.status().is_client_error() || response.status().is_server_error()) {
        response.headers_mut().insert(
            HeaderName::from_static(SHOULD_RETRY),
            HeaderValue::from_static("false"),
        );
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn answers_carry_the_status_as_code_and_retry_after_when_busy() {
        let r = E2bError::no_sandbox("abc").into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
        assert_eq!(
            r.extensions().get::<ErrorCode>(),
            Some(&ErrorCode("not_found"))
        );
        let r = E2bError::from(ManagerError::Unavailable("busy".into())).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = E2bError::from(KeyRefusal {
            error: ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow"),
            retry_after_secs: Some(7),
        })
        .into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
    }
}
