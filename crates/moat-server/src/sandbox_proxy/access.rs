//! Who may reach a sandbox: its access token ([`SandboxManager::access_token`], sent as
//! `X-Access-Token`, or for `/files` as a `v1_` signature made with it; `e2b-wire.md` §4.6,
//! §7.4) and its traffic access token ([`SandboxManager::traffic_token`], sent as
//! `E2B-Traffic-Access-Token`).
//!
//! The sandbox's agent runs without a token of its own, so these checks are the only ones:
//!
//! | port | what a request needs |
//! | --- | --- |
//! | 49983 (envd) | the access token, but `GET /health` needs none and `/files` takes a signature instead; internal paths are refused |
//! | 49999 (code interpreter) | the access token; on `/health` and `/contexts…`, the traffic access token will do |
//! | any other, public sandbox | nothing (a preview URL opens in a browser) |
//! | any other, private sandbox | the traffic access token (or the access token) |
//!
//! The code interpreter SDK sends `X-Access-Token` only on `/execute`, and only
//! `E2B-Traffic-Access-Token` on its context routes, which is why those take either; none of
//! them runs code.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode};
use moat_engine::manager::SandboxManager;
use moat_proto::file_signature::{FilesQuery, Operation};

use super::answers::Refusal;
use super::{ENVD_PORT, INTERPRETER_PORT};

/// Header carrying a sandbox's access token.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";
/// Header carrying a sandbox's traffic access token.
pub const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// envd paths only the host may use (upstream's proxy refuses them from outside too), and the
/// agent's own routes that are reached through other ports: refused on port 49983. A path is
/// refused when it is one of these or lies below one.
pub const INTERNAL_PATHS: &[&str] = &[
    "/init",
    "/freeze",
    "/unfreeze",
    "/fsfreeze",
    "/fsthaw",
    "/collapse",
    "/upgrade",
    "/relay",
    "/interpreter",
];

/// Compares without an early exit, so timing does not tell how much of a guess was right.
pub(crate) use moat_proto::secret::constant_time_eq as same;

/// Whether header `name` is present and carries `token`.
fn header_is(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|v| same(v.as_bytes(), token.as_bytes()))
}

/// What a sandbox's traffic is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tokens {
    /// Its access token (`X-Access-Token`).
    pub(crate) access: String,
    /// Its traffic access token (`E2B-Traffic-Access-Token`).
    pub(crate) traffic: String,
    /// Whether its own services are reachable without a token.
    pub(crate) public_traffic: bool,
}

/// Allows a request for `port` of the sandbox whose tokens are `tokens`, or answers why not.
pub(crate) fn check(tokens: &Tokens, port: u16, req: &Request) -> Result<(), Refusal> {
    let path = req.uri().path();
    let headers = req.headers();
    let token = tokens.access.as_str();
    let has_access = || header_is(headers, ACCESS_TOKEN_HEADER, token);
    let has_traffic = || header_is(headers, TRAFFIC_TOKEN_HEADER, &tokens.traffic);
    let need_token = |ok: bool| {
        if ok {
            Ok(())
        } else if headers.contains_key(ACCESS_TOKEN_HEADER) {
            Err(Refusal::unauthorized("invalid access token"))
        } else {
            Err(Refusal::unauthorized(
                "missing access token: send the sandbox's access token as X-Access-Token",
            ))
        }
    };
    let need_either = |ok: bool| {
        if ok {
            Ok(())
        } else if headers.contains_key(ACCESS_TOKEN_HEADER)
            || headers.contains_key(TRAFFIC_TOKEN_HEADER)
        {
            Err(Refusal::unauthorized("invalid access token"))
        } else {
            Err(Refusal::unauthorized(
                "missing access token: send the sandbox's traffic access token as \
                 E2B-Traffic-Access-Token (or its access token as X-Access-Token)",
            ))
        }
    };
    match port {
        ENVD_PORT => {
            if is_internal(path) {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    format!("{path} is internal to the sandbox and cannot be reached from outside"),
                ));
            }
            if path == "/health" && matches!(*req.method(), Method::GET | Method::HEAD) {
                return Ok(());
            }
            if path == "/files" {
                return check_files(token, req);
            }
            need_token(has_access())
        }
        // Running code is the access token's alone: a traffic token handed out for a preview
        // must not run anything. The contexts and health routes, where the code interpreter
        // SDK sends only the traffic token, take either.
        INTERPRETER_PORT if runs_no_code(path) => need_either(has_access() || has_traffic()),
        INTERPRETER_PORT => need_token(has_access()),
        _ if tokens.public_traffic => Ok(()),
        _ => need_either(has_traffic() || has_access()),
    }
}

/// Whether the code interpreter's `path` is one of the routes that run no code (health and
/// contexts), written plainly: no dot segments or escapes that a later reader might resolve
/// to another route.
fn runs_no_code(path: &str) -> bool {
    let plain = !path.contains('%') && !path.split('/').any(|s| s == "." || s == "..");
    plain && (path == "/health" || path == "/contexts" || path.starts_with("/contexts/"))
}

/// Whether `path` is, or lies below, one of [`INTERNAL_PATHS`].
fn is_internal(path: &str) -> bool {
    let path = path.trim_end_matches('/');
    INTERNAL_PATHS.iter().any(|p| {
        path == *p
            || path
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// `/files`: a matching `X-Access-Token` when the header is sent, else a valid signature.
fn check_files(token: &str, req: &Request) -> Result<(), Refusal> {
    if let Some(given) = req.headers().get(ACCESS_TOKEN_HEADER) {
        return if same(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(Refusal::unauthorized("invalid access token"))
        };
    }
    let query = files_query(req)?;
    let Some(signature) = query.signature.as_deref() else {
        return Err(Refusal::unauthorized(
            "missing access token or signature: send X-Access-Token or use a signed URL",
        ));
    };
    let operation = operation_of(req.method())?;
    if !same(
        signature.as_bytes(),
        query.sign(operation, token).as_bytes(),
    ) {
        return Err(Refusal::unauthorized("invalid signature"));
    }
    check_expiration(&query)
}

/// The sandbox a signed `/files` URL without routing headers is for: the running sandbox whose
/// token the signature was made with (one short hash per running sandbox: the URL's path, at
/// most `MAX_SIGNED_PATH` bytes, is hashed once). The signature is checked on the way,
/// expiration included.
pub(crate) fn find_signed(manager: &SandboxManager, req: &Request) -> Result<String, Refusal> {
    let query = files_query(req)?;
    let operation = operation_of(req.method())?;
    let signature = query.signature.as_deref().unwrap_or("");
    let signer = query.signer(operation);
    let id = manager
        .running_access_tokens()
        .into_iter()
        .find(|(_, token)| same(signature.as_bytes(), signer.sign(token).as_bytes()))
        .map(|(id, _)| id)
        .ok_or_else(|| {
            Refusal::unauthorized(
                "invalid signature: it was made for no running sandbox (send E2b-Sandbox-Id to name one)",
            )
        })?;
    check_expiration(&query)?;
    Ok(id)
}

/// The running sandbox whose access token `req` carries (one comparison per running sandbox,
/// each token derived once), for an envd request that names no sandbox.
pub(crate) fn find_by_token(manager: &SandboxManager, req: &Request) -> Result<String, Refusal> {
    let given = req
        .headers()
        .get(ACCESS_TOKEN_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    manager
        .running_access_tokens()
        .into_iter()
        .find(|(_, token)| same(given, token.as_bytes()))
        .map(|(id, _)| id)
        .ok_or_else(|| {
            Refusal::unauthorized(
                "invalid access token: it is no running sandbox's (send E2b-Sandbox-Id to name one)",
            )
        })
}

/// The operation of a `/files` request's method: `GET` (and `HEAD`) read, `POST` writes.
fn operation_of(method: &Method) -> Result<Operation, Refusal> {
    match *method {
        Method::GET | Method::HEAD => Ok(Operation::Read),
        Method::POST => Ok(Operation::Write),
        _ => Err(Refusal::unauthorized(format!(
            "a signature covers GET and POST only; {method} needs X-Access-Token"
        ))),
    }
}

/// The `/files` query of `req`, as the agent reads it (one parser for both: see
/// [`FilesQuery`]), to be checked against a signature: a repeated parameter is refused.
fn files_query(req: &Request) -> Result<FilesQuery, Refusal> {
    let query = FilesQuery::parse(req.uri().query().unwrap_or(""))
        .map_err(|e| Refusal::bad_request(e.0))?;
    query
        .check_signable()
        .map_err(|e| Refusal::bad_request(e.0))?;
    Ok(query)
}

/// A given `signature_expiration` must lie in the future.
fn check_expiration(query: &FilesQuery) -> Result<(), Refusal> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    query
        .check_expiration(now)
        .map_err(|e| Refusal::unauthorized(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::body::Body;
    use moat_proto::file_signature::sign;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    fn status(r: Result<(), Refusal>) -> u16 {
        r.map_or_else(|r| r.status.as_u16(), |()| 200)
    }

    fn tokens(public_traffic: bool) -> Tokens {
        Tokens {
            access: "tok".into(),
            traffic: "traffic".into(),
            public_traffic,
        }
    }

    #[test]
    fn envd_rules() {
        let t = &tokens(true);
        let ok = [("x-access-token", "tok")];
        let bad = [("x-access-token", "nope")];
        assert_eq!(status(check(t, 49983, &req("GET", "/health", &[]))), 200);
        assert_eq!(status(check(t, 49983, &req("POST", "/health", &[]))), 401);
        assert_eq!(status(check(t, 49983, &req("POST", "/x.Y/Z", &[]))), 401);
        assert_eq!(status(check(t, 49983, &req("POST", "/x.Y/Z", &bad))), 401);
        assert_eq!(status(check(t, 49983, &req("POST", "/x.Y/Z", &ok))), 200);
        for internal in [
            "/init",
            "/init/",
            "/freeze",
            "/relay/tcp?port=1",
            "/interpreter/execute",
        ] {
            assert_eq!(status(check(t, 49983, &req("POST", internal, &ok))), 403);
        }
        assert_eq!(status(check(t, 49983, &req("GET", "/initial", &ok))), 200);
        // Files: the header, else a signature.
        assert_eq!(
            status(check(t, 49983, &req("GET", "/files?path=/a", &ok))),
            200
        );
        assert_eq!(
            status(check(t, 49983, &req("GET", "/files?path=/a", &bad))),
            401
        );
        assert_eq!(
            status(check(t, 49983, &req("GET", "/files?path=/a", &[]))),
            401
        );
        let traffic = [("e2b-traffic-access-token", "traffic")];
        assert_eq!(
            status(check(t, 49983, &req("POST", "/x.Y/Z", &traffic))),
            401
        );
        let t = &tokens(false);
        let sig = sign("/a b", Operation::Read, "", "tok", None);
        let uri = format!("/files?path=/a%20b&signature={}", sig.replace('+', "%2B"));
        assert_eq!(status(check(t, 49983, &req("GET", &uri, &[]))), 200);
        assert_eq!(status(check(t, 49983, &req("POST", &uri, &[]))), 401);
        let twice = format!("{uri}&path=/etc/shadow");
        assert_eq!(status(check(t, 49983, &req("GET", &twice, &[]))), 400);
        let sig = sign("/a", Operation::Write, "root", "tok", Some("1"));
        let uri = format!(
            "/files?path=/a&username=root&signature={}&signature_expiration=1",
            sig.replace('+', "%2B")
        );
        assert_eq!(status(check(t, 49983, &req("POST", &uri, &[]))), 401);
    }

    #[test]
    fn interpreter_and_user_port_rules() {
        let public = &tokens(true);
        let ok = [("x-access-token", "tok")];
        let traffic = [("e2b-traffic-access-token", "traffic")];
        // The access token in the traffic header is not the traffic token.
        let swapped = [("e2b-traffic-access-token", "tok")];
        for (method, path) in [
            ("POST", "/contexts"),
            ("GET", "/contexts"),
            ("DELETE", "/contexts/a"),
            ("POST", "/contexts/a/restart"),
            ("GET", "/health"),
            ("POST", "/execute"),
            ("POST", "/contexts/../execute"),
        ] {
            // Code runs with the access token only; the routes that run none take either.
            let runs_code = path.ends_with("/execute");
            for t in [public, &tokens(false)] {
                assert_eq!(status(check(t, 49999, &req(method, path, &[]))), 401);
                assert_eq!(status(check(t, 49999, &req(method, path, &swapped))), 401);
                assert_eq!(status(check(t, 49999, &req(method, path, &ok))), 200);
                let with_traffic = status(check(t, 49999, &req(method, path, &traffic)));
                assert_eq!(with_traffic, if runs_code { 401 } else { 200 }, "{path}");
            }
        }
        // User services: open when public; else the traffic token (or the access token).
        assert_eq!(status(check(public, 8000, &req("GET", "/", &[]))), 200);
        let private = &tokens(false);
        assert_eq!(status(check(private, 8000, &req("GET", "/", &[]))), 401);
        assert_eq!(
            status(check(private, 8000, &req("GET", "/", &swapped))),
            401
        );
        assert_eq!(status(check(private, 8000, &req("GET", "/", &ok))), 200);
        assert_eq!(
            status(check(private, 8000, &req("GET", "/", &traffic))),
            200
        );
    }
}
