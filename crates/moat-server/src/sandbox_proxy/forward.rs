//! Forwarding a request to a sandbox's agent and its answer back, bodies streaming both ways
//! (chunked uploads, server streams that last minutes, client streams): nothing is buffered
//! beyond the HTTP/2 windows of the agent connection.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, Version, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use moat_engine::agent_client::{AgentClient, BoxError, RequestBody};
use moat_engine::manager::CallGuard;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::access::{ACCESS_TOKEN_HEADER, TRAFFIC_TOKEN_HEADER};
use super::target::{SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER};
use super::{INTERPRETER_PORT, answers};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus `Expect`,
/// which this hop has already answered: never passed on in either direction.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

/// Removes the hop-by-hop headers, those `Connection` names included.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// The headers of a request as they go on to the sandbox: no hop-by-hop headers, no routing
/// headers, and none of moat's own credentials (`Authorization: Bearer`, `X-API-KEY`). envd's
/// `Authorization: Basic` (it selects the user) and everything else (`Connect-Timeout-Ms`,
/// `Keepalive-Ping-Interval`, content headers) pass. The access token passes only to the
/// agent (`keep_token`), never to a user's service.
pub(crate) fn request_headers(mut headers: HeaderMap, keep_token: bool) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    for name in [SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, "x-api-key"] {
        headers.remove(name);
    }
    let basic = headers.get_all(header::AUTHORIZATION).iter().all(|v| {
        v.as_bytes()
            .get(..6)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"basic "))
    });
    if !basic {
        headers.remove(header::AUTHORIZATION);
    }
    if !keep_token {
        headers.remove(ACCESS_TOKEN_HEADER);
        headers.remove(TRAFFIC_TOKEN_HEADER);
    }
    headers
}

/// A response from the sandbox as it goes back to the client: hop-by-hop headers removed, the
/// body streaming.
pub(crate) fn response_back<B>(response: axum::http::Response<B>) -> Response
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The client's connection has its own version; the agent's is HTTP/2.
    parts.version = Version::HTTP_11;
    parts.extensions = Default::default();
    Response::from_parts(parts, Body::new(body))
}

/// A body that holds its call's place in the count of calls under way until it is dropped.
struct Held<B> {
    body: B,
    _call: CallGuard,
}

impl<B: http_body::Body + Unpin> http_body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The client's body as a body of a request to the agent.
pub(crate) fn request_body(body: Body) -> RequestBody {
    body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()
}

/// Whether `req` for the agent on `port` is a stream that lasts as long as what it watches (a
/// Connect streaming RPC: a command's output, a directory watch; a code execution), rather
/// than a call whose answer soon ends.
fn is_stream(port: u16, req: &Request) -> bool {
    let connect_stream = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/connect+"));
    connect_stream || (port == INTERPRETER_PORT && req.uri().path() == "/execute")
}

/// Sends `req` to the agent of sandbox `id` (reached on `port`), its path under `prefix`, and
/// streams the answer back. `call` counts it as under way for a pause: until its answer ends,
/// or for a stream until its answer starts.
pub(crate) async fn to_agent(
    client: &AgentClient,
    call: CallGuard,
    id: &str,
    port: u16,
    prefix: &str,
    req: Request,
) -> Response {
    let stream = is_stream(port, &req);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = axum::http::Request::new(request_body(body));
    *out.method_mut() = parts.method;
    *out.uri_mut() = match format!("{prefix}{path}").parse() {
        Ok(uri) => uri,
        Err(e) => {
            return answers::Refusal::bad_request(format!("request path {path:?}: {e}"))
                .into_response();
        }
    };
    *out.headers_mut() = request_headers(parts.headers, true);
    match client.forward(out).await {
        Ok(response) if stream => response_back(response),
        Ok(response) => response_back(response.map(|body| Held { body, _call: call })),
        Err(_) if client.is_closed() => answers::sandbox_not_found(id),
        Err(e) => answers::upstream_failed(id, port, e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn headers_that_pass() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("e2b-sandbox-id", "abc"),
            ("e2b-sandbox-port", "49983"),
            ("x-api-key", "moat_secret"),
            ("x-access-token", "tok"),
            ("authorization", "Basic cm9vdDo="),
            ("connect-timeout-ms", "60000"),
            ("keepalive-ping-interval", "50"),
            ("content-type", "application/connect+json"),
        ] {
            h.append(k, v.parse().unwrap());
        }
        let out = request_headers(h.clone(), true);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "authorization",
                "connect-timeout-ms",
                "content-type",
                "keepalive-ping-interval",
                "x-access-token",
            ]
        );
        let out = request_headers(h.clone(), false);
        assert!(!out.contains_key("x-access-token"));
        h.insert("authorization", "Bearer moat_secret".parse().unwrap());
        assert!(!request_headers(h, true).contains_key("authorization"));
    }
}
