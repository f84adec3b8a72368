//! `POST /relay/tcp?port=N`: a TCP connection to a service inside the sandbox, carried by one
//! HTTP/2 stream of the agent's channel. This is how the host reaches user services (a web
//! server on port 8000, say) without the sandbox having any network: the agent dials
//! `127.0.0.1:N` in the sandbox's own network namespace, so only the sandbox's loopback is
//! reachable, never the host or another sandbox.
//!
//! Once connected, the answer is `200` and the stream is full duplex: the request body's bytes
//! are written to the socket as they arrive, and the socket's bytes are the response body. The
//! end of the request body half-closes the socket (the service reads end of file) and the
//! service's end of file ends the response body; each direction ends on its own. Failing to
//! connect answers a JSON error (`{"code": status, "message": …}`): `502` when nothing listens
//! there (or the connection fails), `504` when connecting takes longer than
//! [`CONNECT_TIMEOUT`], `400` for a bad port.

use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::transport;
use crate::transport::ResponseBody;

/// The route's path.
pub const PATH: &str = "/relay/tcp";

/// Longest wait for the service to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A relay on which no byte moves in either direction for this long is closed (both ways), so
/// forgotten connections do not hold sockets and tasks forever.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Largest piece read from the socket at once.
pub const CHUNK: usize = 16 * 1024;

/// Pieces read from the socket that may wait for the host before reading pauses. With the
/// HTTP/2 stream window bounding the other direction, a relay buffers at most about
/// `CHUNK * QUEUE` bytes plus one window.
pub const QUEUE: usize = 4;

/// Answers `POST /relay/tcp?port=N`.
pub async fn handle(req: Request<Incoming>) -> Response<ResponseBody> {
    if req.method() != Method::POST {
        let mut resp = transport::plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    let port = match parse_port(req.uri().query().unwrap_or("")) {
        Ok(port) => port,
        Err(message) => return transport::plain(StatusCode::BAD_REQUEST, message),
    };
    let connecting = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
    let socket = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(socket)) => socket,
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return transport::plain(
                StatusCode::BAD_GATEWAY,
                format!("nothing listens on port {port} in the sandbox"),
            );
        }
        Ok(Err(e)) => {
            return transport::plain(
                StatusCode::BAD_GATEWAY,
                format!("connecting to port {port} in the sandbox: {e}"),
            );
        }
        Err(_) => {
            return transport::plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!("port {port} in the sandbox did not accept within {CONNECT_TIMEOUT:?}"),
            );
        }
    };
    // Small writes (a request line, an interactive protocol) should leave at once.
    let _ = socket.set_nodelay(true);
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(QUEUE);
    tokio::spawn(pipe(socket, req.into_body(), tx));
    let chunks = stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item.map(Frame::data), rx))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// The `port` of the query `port=N`: a decimal number from 1 to 65535, and nothing else.
fn parse_port(query: &str) -> Result<u16, String> {
    let mut port = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "port" {
            return Err(format!("unknown query parameter {name:?} (known: port)"));
        }
        if port.is_some() {
            return Err("the port is given twice".into());
        }
        port = Some(value);
    }
    let value = port.ok_or("the query parameter 'port' is required")?;
    match value.parse::<u16>() {
        Ok(0) => Err("port 0 cannot be connected to".into()),
        Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(format!("port {value:?} is not a number from 1 to 65535")),
    }
}

/// When a relay last moved a byte, shared by its two directions.
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing moved for `limit`.
    async fn idle(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let due = self.start + last + limit;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// Moves bytes both ways until both directions ended, either failed, or the relay idled out.
async fn pipe(socket: TcpStream, body: Incoming, tx: mpsc::Sender<io::Result<Bytes>>) {
    let (reader, writer) = socket.into_split();
    let activity = Activity::new();
    // Only a weak handle here: the response body must end when `downstream` drops its sender.
    let weak = tx.downgrade();
    let both = async {
        tokio::try_join!(
            upstream(body, writer, &activity),
            downstream(reader, tx, &activity)
        )
    };
    tokio::select! {
        result = both => {
            if let Err(e) = result {
                tracing::debug!("relay ended: {e}");
            }
        }
        () = activity.idle(IDLE_TIMEOUT) => {
            tracing::debug!("relay idle for {IDLE_TIMEOUT:?}: closed");
            if let Some(tx) = weak.upgrade() {
                // Best effort: the host sees a failed stream rather than a clean end.
                let _ = tx.try_send(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "relay idle timeout",
                )));
            }
        }
    }
}

/// The request body into the socket, then a half-close. Fails only when the host's stream
/// failed; a service that stops reading ends this direction alone, so its answer still flows.
async fn upstream(
    mut body: Incoming,
    mut writer: OwnedWriteHalf,
    activity: &Activity,
) -> io::Result<()> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        activity.touch();
        if let Err(e) = writer.write_all(&data).await {
            tracing::debug!("relay: the service stopped reading: {e}");
            // Keep taking the host's data (and discarding it) so the stream's flow control
            // does not stall the direction that still works.
            while let Some(frame) = body.frame().await {
                frame.map_err(io::Error::other)?;
                activity.touch();
            }
            return Ok(());
        }
    }
    // The service reads end of file; its answer can still come back.
    if let Err(e) = writer.shutdown().await {
        tracing::debug!("relay: half-closing the socket: {e}");
    }
    Ok(())
}

/// The socket's bytes into the response body, until the service's end of file.
async fn downstream(
    mut reader: OwnedReadHalf,
    tx: mpsc::Sender<io::Result<Bytes>>,
    activity: &Activity,
) -> io::Result<()> {
    let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "the host closed the relay");
    loop {
        let mut buf = BytesMut::with_capacity(CHUNK);
        let n = match reader.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                let message = format!("reading from the service: {e}");
                let _ = tx.send(Err(io::Error::new(e.kind(), message))).await;
                return Err(e);
            }
        };
        if n == 0 {
            return Ok(());
        }
        activity.touch();
        tx.send(Ok(buf.freeze())).await.map_err(|_| gone())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_port("port=8000"), Ok(8000));
        assert_eq!(parse_port("port=65535"), Ok(65535));
        for bad in [
            "",
            "port=",
            "port=0",
            "port=65536",
            "port=abc",
            "port=+80",
            "port=80&port=81",
            "port=80&x=1",
        ] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }
}
