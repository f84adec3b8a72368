//! Sandbox traffic on the server's listener: requests for a port inside a sandbox, as E2B's
//! SDKs send them (`e2b-wire.md` §2.3), go to that sandbox; everything else goes on to the
//! API's router unchanged.
//!
//! - [`target`]: which sandbox and port a request is for (`Host: <port>-<id>.<domain>`, the
//!   `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers, a signed `/files` URL, or an envd request's
//!   access token).
//! - [`access`]: the sandbox's access token, and `/files` signatures made with it.
//! - [`forward`]: port 49983 (envd) and 49999 (the code interpreter) to the sandbox's agent.
//! - [`relay`]: other ports through the agent's TCP relay to the service listening there.
//! - [`answers`]: the proxy's own answers (`401`, and the `502`s E2B clients classify).
//!
//! Sandbox traffic carries no API key and is not rate-limited: the per-sandbox access token is
//! what lets it in. It counts among its sandbox's owner's requests in flight, as that tenant's
//! API requests do. Answers are never redirects.

mod access;
mod answers;
mod forward;
mod relay;
mod target;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::extract::Shared;
use moat_engine::manager::ManagerError;
use target::Traffic;

pub use target::validate_domain;

/// The port of envd, the agent's own API, inside every sandbox.
pub const ENVD_PORT: u16 = 49983;
/// The port of the code interpreter inside every sandbox.
pub const INTERPRETER_PORT: u16 = 49999;
/// Where the agent serves the code interpreter: a port-49999 request for `P` goes to the
/// agent's `/interpreter` + `P`.
pub const INTERPRETER_PREFIX: &str = "/interpreter";

/// The middleware in front of the router: sandbox traffic is answered here, the rest passes.
pub(crate) async fn dispatch(State(state): State<Shared>, req: Request, next: Next) -> Response {
    // Traffic to a public sandbox's own services needs no token: anyone may send it.
    let mut public = false;
    let (id, port) = match target::classify(&req, &state.domain) {
        Err(refusal) => return refusal.into_response(),
        Ok(Traffic::Control) => return next.run(req).await,
        Ok(Traffic::Sandbox { id, port }) => {
            let tokens = access::Tokens {
                access: state.manager.access_token(&id),
                traffic: state.manager.traffic_token(&id),
                // A sandbox not running here is private: the request then gets a 401 rather
                // than telling a caller without a token whether the sandbox exists.
                public_traffic: state.manager.public_traffic(&id),
            };
            if let Err(refusal) = access::check(&tokens, port, &req) {
                return refusal.into_response();
            }
            public = tokens.public_traffic && port != ENVD_PORT && port != INTERPRETER_PORT;
            (id, port)
        }
        Ok(Traffic::SignedFiles) => match access::find_signed(&state.manager, &req) {
            Ok(id) => (id, ENVD_PORT),
            Err(refusal) => return refusal.into_response(),
        },
        // Found by the token it carries, so the token is checked already.
        Ok(Traffic::EnvdByToken) => match access::find_by_token(&state.manager, &req) {
            Ok(id) => (id, ENVD_PORT),
            Err(refusal) => return refusal.into_response(),
        },
    };
    if req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE) {
        return answers::plain(
            StatusCode::NOT_IMPLEMENTED,
            "protocol upgrades (WebSocket) to sandboxes are not supported yet",
        );
    }
    // envd's `/health` needs no token, so it must not resume a paused sandbox: anyone who
    // knows the id could keep it running past its pause.
    let resumes = !(port == ENVD_PORT && req.uri().path() == "/health");
    let route = if resumes {
        state.manager.route_resuming(&id).await
    } else {
        state.manager.route(&id)
    };
    let route = match route {
        Ok(route) => route,
        // Running, but its agent missed a health check: not "not found", which SDKs take for
        // a sandbox that has ended.
        Err(ManagerError::Unavailable(why)) => return answers::not_answering(&id, &why),
        Err(_) => return answers::sandbox_not_found(&id),
    };
    // Counted for the owner, as its API requests are: a sandbox's service that never answers
    // must not hold every connection of the listener. Public traffic, which anyone may send,
    // has a room of its own the same size, so that it cannot take the owner's.
    let (slots, whose) = if public {
        (
            &state.public_requests,
            "the sandbox owner's public services have",
        )
    } else {
        (&state.tenant_requests, "the sandbox's owner has")
    };
    let Ok(slot) = slots.enter(&route.tenant) else {
        return answers::plain(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{whose} as many requests in flight as one tenant may; retry later"),
        );
    };
    let answer = match port {
        ENVD_PORT => forward::to_agent(&route.client, route.call, &id, port, "", req).await,
        INTERPRETER_PORT => {
            let prefix = INTERPRETER_PREFIX;
            forward::to_agent(&route.client, route.call, &id, port, prefix, req).await
        }
        // A user's service may stream for as long as it likes: a pause waits for the
        // answer to start only.
        _ => relay::to_service(&route.client, &id, port, req).await,
    };
    crate::held_body::hold(answer, slot)
}
