//! The E2B-compatible control plane, on moat's one listener: what the unmodified `e2b` and
//! `e2b-code-interpreter` SDKs call to create, find, extend and kill sandboxes.
//!
//! - Auth: `X-API-KEY` carries a moat API key (the same keys and tenants as `/v1`'s Bearer
//!   keys; see [`auth`]).
//! - Errors: E2B's JSON `{"code": <status>, "message": "..."}` on every failure, including
//!   unknown routes under E2B's paths ([`owns_path`]); see [`error`].
//! - Bodies: E2B's field names ([`shapes`]); the listing's query in [`list_query`].
//! - Handlers: [`sandboxes`], [`lifecycle`] (pause, snapshots, fork), [`templates`]
//!   (template lookups), [`builds`] (`Template.build`) and [`tags`] (`Template.assign_tags`
//!   and its kin), each over the same manager calls as `/v1`'s.
//!
//! Both generations of the SDKs are served: e2b 2.51 and later create with `POST /v2/sandboxes`
//! and connect with `POST /v2/sandboxes/{id}/connect`; earlier 2.x releases (from 2.7, the
//! first that can be pointed at another server) create with `POST /sandboxes` and connect with
//! `POST /sandboxes/{id}/connect`. E2B's first listing, `GET /sandboxes` (running sandboxes
//! only, in one answer), is served too. Each older route is the newer one's handler (their
//! bodies differ only in fields moat reads the same way), but for `allow_internet_access:
//! true`, which the older SDKs send unless told otherwise, so `POST /sandboxes` takes it as
//! asking for nothing.
//!
//! E2B's own API description is the contract for these routes, so moat's OpenAPI document
//! (`/v1/openapi.json`) does not list them.

mod auth;
pub(crate) mod builds;
mod error;
mod lifecycle;
mod list_query;
mod network;
mod sandboxes;
mod shapes;
mod tags;
mod templates;

use axum::Router;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};

use crate::ApiError;
use crate::extract::Shared;

/// The `envdVersion` moat reports: what the SDKs gate envd features on.
pub(crate) const ENVD_VERSION: &str = "0.6.13";

/// The `clientID` moat reports (a field E2B keeps for old clients, always this value).
pub(crate) const CLIENT_ID: &str = "6532622b";

/// Where sandboxes are created (and listed, with `/v2/sandboxes`'s GET).
pub(crate) const CREATE_PATH: &str = "/v2/sandboxes";

/// Where the SDKs before e2b 2.51 create sandboxes.
pub(crate) const LEGACY_CREATE_PATH: &str = "/sandboxes";

/// Path prefixes of E2B's control plane. Requests under them that match no route still get an
/// E2B error body, which the SDKs can parse.
const E2B_PREFIXES: [&str; 8] = [
    "/sandboxes",
    "/v2",
    "/v3",
    "/templates",
    "/snapshots",
    "/volumes",
    "/teams",
    "/secrets",
];

/// The E2B routes, authenticated by `X-API-KEY`.
pub(crate) fn routes(state: Shared) -> Router<Shared> {
    Router::new()
        .route(CREATE_PATH, post(sandboxes::create).get(sandboxes::list))
        .route("/v2/sandboxes/{id}/connect", post(sandboxes::connect))
        // The SDKs before e2b 2.51.
        .route(
            LEGACY_CREATE_PATH,
            post(sandboxes::create_legacy).get(sandboxes::list_running),
        )
        .route("/sandboxes/{id}/connect", post(sandboxes::connect))
        .route(
            "/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::kill),
        )
        .route("/sandboxes/{id}/timeout", post(sandboxes::set_timeout))
        .route("/sandboxes/{id}/network", put(network::update))
        .route("/sandboxes/{id}/metrics", get(sandboxes::metrics))
        .route("/sandboxes/{id}/pause", post(lifecycle::pause))
        .route(
            "/sandboxes/{id}/snapshots",
            post(lifecycle::create_snapshot),
        )
        .route("/sandboxes/{id}/fork", post(lifecycle::fork))
        // Known to E2B's generated client but not called by its sandbox methods: refused by
        // name (a bare 404 reads as "sandbox not found" to the SDK).
        .route(
            "/sandboxes/{id}/resume",
            post(|| unsupported("POST /sandboxes/{id}/resume (use POST /v2/sandboxes/{id}/connect)")),
        )
        .route(
            "/sandboxes/{id}/refreshes",
            post(|| unsupported("POST /sandboxes/{id}/refreshes (use POST /sandboxes/{id}/timeout)")),
        )
        .route(
            "/sandboxes/{id}/logs",
            get(|| unsupported("sandbox logs (GET /sandboxes/{id}/logs)")),
        )
        .route(
            "/v2/sandboxes/{id}/logs",
            get(|| unsupported("sandbox logs (GET /v2/sandboxes/{id}/logs)")),
        )
        .route(
            "/sandboxes/metrics",
            get(|| unsupported("metrics of several sandboxes at once (GET /sandboxes/metrics; GET /sandboxes/{id}/metrics is)")),
        )
        .route("/snapshots", get(lifecycle::list_snapshots))
        .route("/templates/{id}", delete(lifecycle::delete_snapshot))
        .route("/templates/aliases/{alias}", get(templates::alias))
        .route("/templates/tags", post(tags::assign).delete(tags::remove))
        .route("/templates/{id}/tags", get(tags::list))
        .route("/v3/templates", post(builds::request_build))
        .route("/templates/{id}/files/{hash}", get(builds::file_link))
        .route(
            "/v2/templates/{id}/builds/{build}",
            post(builds::start_build),
        )
        .route("/templates/{id}/builds/{build}/status", get(builds::status))
        // `route_layer`: only matched routes ask for a key, so an unknown path is a plain 404.
        .route_layer(middleware::from_fn_with_state(state, auth::authenticate))
        // The control plane's health, without a key as upstream's (the sandbox proxy takes a
        // sandbox's own `/health`, by its routing headers, before this router).
        .route("/health", get(crate::router::healthz))
        .layer(middleware::from_fn(error::no_retry_on_failed_create))
}

/// `501` for an E2B route moat does not serve, naming it.
async fn unsupported(what: &'static str) -> error::E2bError {
    crate::ApiError::new(
        axum::http::StatusCode::NOT_IMPLEMENTED,
        "unsupported",
        format!("{what} is not supported by this server"),
    )
    .into()
}

/// Whether `path` is under E2B's control-plane paths.
pub(crate) fn owns_path(path: &str) -> bool {
    E2B_PREFIXES.iter().any(|prefix| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// The answer to a request under E2B's paths that no route matches.
pub(crate) fn no_route(err: ApiError) -> Response {
    error::E2bError::from(err).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_paths() {
        for p in [
            "/sandboxes",
            "/sandboxes/x/pause",
            "/v2/sandboxes",
            "/v3/templates",
            "/templates/a",
        ] {
            assert!(owns_path(p), "{p}");
        }
        for p in [
            "/v1/sandboxes",
            "/sandboxesx",
            "/healthz",
            "/v20",
            "/files",
            "/health",
        ] {
            assert!(!owns_path(p), "{p}");
        }
    }
}
