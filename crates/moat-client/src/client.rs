//! The [`Client`]: where the server is, the key, and the requests' plumbing.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, USER_AGENT};
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::body::{Body, ByteStream, RawBody};
use crate::error::{ApiError, Error, Result, chain};

/// Environment variable with the server's URL, read by [`Client::from_env`].
pub const URL_ENV: &str = "MOAT_URL";
/// Environment variable with the API key's secret, read by [`Client::from_env`].
pub const API_KEY_ENV: &str = "MOAT_API_KEY";
/// How long connecting to the server may take before the call fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JSON answer read; a bigger one fails with [`Error::Protocol`] rather than filling
/// memory. The largest the API gives (a page of 1,000 sandboxes, an exec result with two
/// 1 MiB outputs) is well below.
pub const MAX_JSON_BYTES: usize = 16 << 20;
/// Largest error body read; the rest is ignored.
pub const MAX_ERROR_BYTES: usize = 64 << 10;
/// How long an idle connection stays in the pool for reuse: below the server's header-read
/// timeout (10 s), which closes idle connections, so a reuse does not race that close.
const POOL_IDLE: Duration = Duration::from_secs(5);

/// A client of one moat server's `/v1` API, acting with one API key.
///
/// Cheap to clone: clones share one pool of connections. Plain HTTP/1.1 only.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: HyperClient<HttpConnector, RawBody>,
    /// `http://host:port` and any path prefix, without a trailing `/`.
    base: String,
    auth: HeaderValue,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Client")
            .field("url", &self.inner.base)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the server at `url` (`http://HOST:PORT`, optionally with a path prefix
    /// when a proxy serves the API below one) that sends `api_key` (`moat_…`) as its bearer
    /// token. Nothing is sent until the first call.
    ///
    /// An `https://` URL is refused: this client speaks plain HTTP.
    pub fn new(url: &str, api_key: &str) -> Result<Client> {
        let base = parse_base(url)?;
        let api_key = api_key.trim();
        if api_key.is_empty() {
            return Err(Error::Config("the API key is empty".into()));
        }
        let mut auth = HeaderValue::from_str(&format!("Bearer {api_key}"))
            .ok()
            .filter(|_| api_key.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| {
                Error::Config("the API key has characters no key has (spaces, controls)".into())
            })?;
        auth.set_sensitive(true);
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Client {
            inner: Arc::new(Inner { http, base, auth }),
        })
    }

    /// A client from the environment: the URL in `MOAT_URL`, the key in `MOAT_API_KEY`.
    pub fn from_env() -> Result<Client> {
        let get = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| Error::Config(format!("{name} is not set")))
        };
        let url = get(URL_ENV).map_err(|_| {
            Error::Config(format!(
                "{URL_ENV} is not set: set it to the server's URL, e.g. http://127.0.0.1:7070"
            ))
        })?;
        let key = get(API_KEY_ENV).map_err(|_| {
            Error::Config(format!(
                "{API_KEY_ENV} is not set: set it to an API key's secret (moat_…)"
            ))
        })?;
        Client::new(&url, &key)
    }

    /// The server's base URL as this client uses it.
    pub fn url(&self) -> &str {
        &self.inner.base
    }

    /// Sends a request and returns the answer if its status is a success; an error status
    /// becomes [`Error::Api`] with the body's code and message.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Body,
        content_type: Option<&'static str>,
        accept: &'static str,
    ) -> Result<Response<Incoming>> {
        self.send_with(method, path, body, content_type, accept, &[])
            .await
    }

    /// [`Client::send`] with extra request headers.
    pub(crate) async fn send_with(
        &self,
        method: Method,
        path: &str,
        body: Body,
        content_type: Option<&'static str>,
        accept: &'static str,
        headers: &[(&'static str, &str)],
    ) -> Result<Response<Incoming>> {
        let uri: Uri = format!("{}{path}", self.inner.base)
            .parse()
            .map_err(|e| Error::Config(format!("bad request path {path:?}: {e}")))?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(AUTHORIZATION, self.inner.auth.clone())
            .header(ACCEPT, accept)
            .header(
                USER_AGENT,
                concat!("moat-client/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, ct);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .body(body.0)
            .map_err(|e| Error::Config(format!("building the request: {e}")))?;
        let resp = self.inner.http.request(req).await.map_err(|e| {
            // A failed upload source shows up here too: report it as the local error it is.
            if let Some(io) = find_io_error(&e) {
                return Error::Io(std::io::Error::new(io.kind(), io.to_string()));
            }
            self.transport(chain(&e))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = read_limited(resp.into_body(), MAX_ERROR_BYTES)
            .await
            .unwrap_or_default();
        Err(Error::Api(ApiError::from_response(status.as_u16(), &body)))
    }

    /// `method path` with an optional JSON body; the answer's JSON as `T`.
    pub(crate) async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T> {
        let resp = self.send_json(method, path, body).await?;
        self.read_json(resp).await
    }

    /// `method path` with an optional JSON body, for answers without a body that matters.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<()> {
        let resp = self.send_json(method, path, body).await?;
        // Read to the end so the connection can be reused.
        read_limited(resp.into_body(), MAX_JSON_BYTES)
            .await
            .map_err(|e| self.transport(e))?;
        Ok(())
    }

    pub(crate) async fn send_json(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<Response<Incoming>> {
        match body {
            Some(value) => {
                let bytes = serde_json::to_vec(value)
                    .map_err(|e| Error::Config(format!("encoding the request: {e}")))?;
                self.send(
                    method,
                    path,
                    Body::from(bytes),
                    Some("application/json"),
                    "application/json",
                )
                .await
            }
            None => {
                self.send(method, path, Body::empty(), None, "application/json")
                    .await
            }
        }
    }

    /// The JSON body of a successful answer.
    pub(crate) async fn read_json<T: DeserializeOwned>(
        &self,
        resp: Response<Incoming>,
    ) -> Result<T> {
        let body = read_limited(resp.into_body(), MAX_JSON_BYTES)
            .await
            .map_err(|e| self.transport(e))?;
        serde_json::from_slice(&body).map_err(|e| {
            Error::Protocol(format!(
                "{e} in {}",
                crate::error::cut(&String::from_utf8_lossy(&body), 200)
            ))
        })
    }

    /// The body of a successful answer as a stream.
    pub(crate) fn stream(&self, resp: Response<Incoming>) -> ByteStream {
        ByteStream::new(resp.into_body(), self.inner.base.clone())
    }

    pub(crate) fn transport(&self, reason: String) -> Error {
        Error::Transport {
            url: self.inner.base.clone(),
            reason,
        }
    }
}

/// Reads a whole body of at most `max` bytes.
pub(crate) async fn read_limited(body: Incoming, max: usize) -> std::result::Result<Bytes, String> {
    Limited::new(body, max)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!("the answer is larger than {max} bytes")
            } else {
                format!("reading the answer: {}", chain(e.as_ref()))
            }
        })
}

/// The first I/O error among `e`'s sources that did not come from the network (an upload
/// source that failed to read).
fn find_io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut source = e.source();
    let mut from_body = false;
    while let Some(s) = source {
        // hyper says "error from user's Body stream" for a failing request body.
        if s.to_string().contains("user's Body stream") {
            from_body = true;
        }
        if from_body && let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        source = s.source();
    }
    None
}

/// Checks the base URL: `http://HOST[:PORT][/prefix]`, without a query.
fn parse_base(url: &str) -> Result<String> {
    let url = url.trim();
    let bad = |why: &str| Error::Config(format!("bad server URL {url:?}: {why}"));
    let uri: Uri = url.parse().map_err(|_| bad("expected http://HOST:PORT"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(Error::Config(format!(
                "{url}: https is not supported: this client speaks plain HTTP only; terminate TLS \
                 in front of it (a local proxy or tunnel) and give its http:// URL"
            )));
        }
        Some(other) => return Err(bad(&format!("scheme {other:?} is not http"))),
        None => return Err(bad("no scheme: expected http://HOST:PORT")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| bad("no host: expected http://HOST:PORT"))?;
    if authority.as_str().contains('@') {
        return Err(bad(
            "user info in the URL is not supported; use the API key",
        ));
    }
    if uri.query().is_some() {
        return Err(bad("a query is not allowed"));
    }
    let prefix = uri.path().trim_end_matches('/');
    Ok(format!("http://{authority}{prefix}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            parse_base("http://127.0.0.1:7070").unwrap(),
            "http://127.0.0.1:7070"
        );
        assert_eq!(parse_base("http://h:1/").unwrap(), "http://h:1");
        assert_eq!(parse_base(" http://h/moat/ ").unwrap(), "http://h/moat");
        let e = parse_base("https://h:443").unwrap_err().to_string();
        assert!(e.contains("https is not supported"), "{e}");
        assert!(e.contains("terminate TLS"), "{e}");
        for bad in [
            "127.0.0.1:7070",
            "ftp://h",
            "http://u:p@h",
            "http://h/?a=b",
            "",
        ] {
            assert!(parse_base(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_checked_and_hidden() {
        let c = Client::new("http://h:1", "moat_secret").unwrap();
        assert!(!format!("{c:?}").contains("moat_secret"));
        assert_eq!(c.url(), "http://h:1");
        assert!(Client::new("http://h:1", "  ").is_err());
        assert!(Client::new("http://h:1", "moat x").is_err());
        assert!(Client::new("http://h:1", "moat\nx").is_err());
    }
}
