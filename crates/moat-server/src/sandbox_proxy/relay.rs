//! Requests to a user's service inside a sandbox (any port but envd's and the code
//! interpreter's), through the agent's TCP relay.
//!
//! One relay stream (`POST /relay/tcp?port=N` on the agent connection) is one TCP connection
//! to `127.0.0.1:N` inside the sandbox: what is written to the stream's request body reaches
//! the service, and the service's bytes come back as its response body. [`RelayIo`] makes
//! that pair a byte stream, and an HTTP/1.1 client connection over it carries the client's
//! request to the service and its answer back, streaming.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::Request;
use axum::http::{HeaderValue, Method, Version, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::stream;
use http_body::{Body as _, Frame};
use http_body_util::StreamBody;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use moat_engine::agent_client::{AgentClient, BoxError, RequestBody};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use super::answers;
use super::forward::{request_headers, response_back};

/// Writes to the service that may wait for the agent connection before the HTTP client
/// waits too (each is one write of the client, at most a few KiB to 400 KiB).
pub const WRITE_QUEUE: usize = 4;

/// The agent's relay route.
const RELAY_PATH: &str = "/relay/tcp";

type Chunk = Result<Frame<Bytes>, BoxError>;

/// Forwards `req` to the service on `port` of sandbox `id` and streams its answer back.
pub(crate) async fn to_service(
    client: &AgentClient,
    id: &str,
    port: u16,
    req: Request,
) -> Response {
    let (tx, rx) = mpsc::channel::<Chunk>(WRITE_QUEUE);
    let body = StreamBody::new(stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((chunk, rx))
    }));
    let mut open = axum::http::Request::new(RequestBody::new(body));
    *open.method_mut() = Method::POST;
    *open.uri_mut() = match format!("{RELAY_PATH}?port={port}").parse() {
        Ok(uri) => uri,
        Err(e) => return answers::upstream_failed(id, port, e),
    };
    let relay = match client.forward(open).await {
        Ok(relay) => relay,
        Err(_) if client.is_closed() => return answers::sandbox_not_found(id),
        Err(e) => return answers::upstream_failed(id, port, e),
    };
    if !relay.status().is_success() {
        tracing::debug!(sandbox = id, port, status = %relay.status(), "relay refused");
        return answers::port_not_open(id, port);
    }
    let io = RelayIo {
        tx: PollSender::new(tx),
        rx: relay.into_body(),
        pending: Bytes::new(),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
        Ok(pair) => pair,
        Err(e) => return answers::upstream_failed(id, port, e),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("connection to a sandbox service: {e}");
        }
    });
    match sender.send_request(service_request(req, port)).await {
        Ok(response) => response_back(response),
        Err(e) => answers::upstream_failed(id, port, e),
    }
}

/// `req` as the service sees it: origin-form, HTTP/1.1, the client's `Host` (or
/// `localhost:<port>`), without hop-by-hop headers, routing headers or credentials.
fn service_request(req: Request, port: u16) -> Request {
    let (mut parts, body) = req.into_parts();
    let host = parts.headers.get(header::HOST).cloned();
    parts.headers = request_headers(std::mem::take(&mut parts.headers), false);
    let host = host.or_else(|| HeaderValue::from_str(&format!("localhost:{port}")).ok());
    if let Some(host) = host {
        parts.headers.insert(header::HOST, host);
    }
    if let Some(path) = parts.uri.path_and_query().cloned() {
        parts.uri = path.into();
    }
    parts.version = Version::HTTP_11;
    Request::from_parts(parts, body)
}

/// A relay stream as a byte stream: writes go into the stream's request body, reads come from
/// its response body, and a shutdown ends the request body (the service reads end of file).
struct RelayIo {
    tx: PollSender<Chunk>,
    rx: Incoming,
    /// Received and not yet read.
    pending: Bytes,
}

impl AsyncRead for RelayIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.rx).poll_frame(cx)) {
                // Trailers carry nothing for a byte stream.
                Some(Ok(frame)) => this.pending = frame.into_data().unwrap_or_default(),
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                // End of file.
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for RelayIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "the relay closed");
        ready!(this.tx.poll_reserve(cx)).map_err(|_| closed())?;
        this.tx
            .send_item(Ok(Frame::data(Bytes::copy_from_slice(buf))))
            .map_err(|_| closed())?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Every write is handed to the agent connection at once.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().tx.close();
        Poll::Ready(Ok(()))
    }
}
