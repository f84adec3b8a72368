//! Refuses requests that would change recorded state while the data dir is short of space (see
//! `moat_engine::manager::DATA_DIR_RESERVE`): `507 insufficient_storage` before anything is
//! done, rather than a half-done change. Reads, and the calls that only reach into a sandbox
//! (exec, its files), record nothing and pass.

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::ApiError;
use crate::extract::Shared;

/// The middleware: see the module's notes.
pub(crate) async fn refuse_when_full(
    State(state): State<Shared>,
    req: Request,
    next: Next,
) -> Response {
    if records_nothing(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    match state.manager.check_storage() {
        Ok(()) => next.run(req).await,
        Err(e) => {
            let err = ApiError::from(e);
            if crate::e2b::owns_path(req.uri().path()) {
                crate::e2b::no_route(err)
            } else {
                err.into_response()
            }
        }
    }
}

/// Whether a request with `method` on `path` changes nothing the store keeps.
fn records_nothing(method: &Method, path: &str) -> bool {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return true;
    }
    // `/v1/sandboxes/{id}/exec` and `/v1/sandboxes/{id}/files…`: the sandbox's own business.
    let Some(rest) = path.strip_prefix("/v1/sandboxes/") else {
        return false;
    };
    let mut parts = rest.splitn(3, '/');
    let _id = parts.next();
    matches!(parts.next(), Some("exec" | "files"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_state_changes_are_guarded() {
        assert!(records_nothing(&Method::GET, "/v1/sandboxes"));
        assert!(records_nothing(&Method::POST, "/v1/sandboxes/abc/exec"));
        assert!(records_nothing(&Method::PUT, "/v1/sandboxes/abc/files"));
        assert!(records_nothing(
            &Method::POST,
            "/v1/sandboxes/abc/files/mkdir"
        ));
        assert!(!records_nothing(&Method::POST, "/v1/sandboxes"));
        assert!(!records_nothing(&Method::DELETE, "/v1/sandboxes/abc"));
        assert!(!records_nothing(&Method::POST, "/v1/sandboxes/abc/timeout"));
        assert!(!records_nothing(&Method::POST, "/sandboxes"));
        assert!(!records_nothing(&Method::POST, "/v1/sandboxes/exec"));
    }
}
