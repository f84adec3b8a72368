//! The proxy's own answers, in the shapes E2B's clients classify (`e2b-wire.md` §4.9, §7.5):
//! `{"code": status, "message": …}`, and for a sandbox that cannot be reached the upstream
//! proxy's bodies with their key phrases ("was not found", "port is not open").

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

fn json_answer(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `{"code": status, "message": message}`, envd's error shape.
pub(crate) fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    json_answer(
        status,
        &json!({"code": status.as_u16(), "message": message.into()}),
    )
}

/// A request refused before it reaches a sandbox, answered with [`plain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The status.
    pub(crate) status: StatusCode,
    /// Why, for people.
    pub(crate) message: String,
}

impl Refusal {
    /// A refusal with this status.
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }

    /// 401: the access token (or signature) is missing or wrong.
    pub(crate) fn unauthorized(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 400: the request cannot be routed or checked as it is.
    pub(crate) fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        plain(self.status, self.message)
    }
}

/// 502: sandbox `id` does not run here (never made, ended, or paused).
pub(crate) fn sandbox_not_found(id: &str) -> Response {
    json_answer(
        StatusCode::BAD_GATEWAY,
        &json!({"sandboxId": id, "message": "The sandbox was not found", "code": 502}),
    )
}

/// 503: sandbox `id` runs, but its agent missed its last health check (`why`); the message has
/// neither of the phrases E2B SDKs read as "ended" or "port closed", so an SDK retries, then
/// asks the sandbox's health itself.
pub(crate) fn not_answering(id: &str, why: &str) -> Response {
    let mut answer = json_answer(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"sandboxId": id, "message": why, "code": 503}),
    );
    answer
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    answer
}

/// 502: sandbox `id` runs, but nothing accepts connections on `port` inside it.
pub(crate) fn port_not_open(id: &str, port: u16) -> Response {
    json_answer(
        StatusCode::BAD_GATEWAY,
        &json!({
            "sandboxId": id,
            "message": "The sandbox is running but port is not open",
            "port": port,
            "code": 502,
        }),
    )
}

/// 502: sandbox `id` runs, but its agent (or the service on `port`) failed mid-way.
pub(crate) fn upstream_failed(id: &str, port: u16, why: impl std::fmt::Display) -> Response {
    json_answer(
        StatusCode::BAD_GATEWAY,
        &json!({
            "sandboxId": id,
            "message": format!("The sandbox did not answer on port {port}: {why}"),
            "port": port,
            "code": 502,
        }),
    )
}
