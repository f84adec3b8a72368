//! The sandbox's writable layer as a tar archive, for snapshots: `GET /moat/layer` streams it
//! ([`capture`]), `PUT /moat/layer` unpacks such an archive over the sandbox's root
//! ([`restore`]). The route is the host's only (`moat_proto::agent_config::HOST_ONLY_PREFIX`):
//! the server's proxies never forward it.
//!
//! The backend hands the agent its writable layer as a directory descriptor (see
//! [`moat_proto::agent_config::WritableLayer`]); an agent without one (running outside a
//! sandbox, in tests) answers 501 to both, so it never unpacks anything over a host's root.

pub mod capture;
pub mod restore;

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use moat_proto::agent_config::{AGENT_LAYER_FD, WritableLayer};
use tokio::sync::mpsc;

use crate::filesystem::sys;
use crate::transport::{self, ResponseBody};

/// Prefix of the name of a whiteout entry: `.wh.<name>` records that `<name>` was removed.
pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";
/// The name of the entry that marks its directory opaque (it hides what was below).
pub(crate) const OPAQUE: &str = ".wh..wh..opq";

/// Size of the pieces the archive travels in, each way.
const CHUNK: usize = 64 << 10;
/// Pieces buffered between the filesystem thread and the connection, each way.
const QUEUE: usize = 8;

/// The writable layer the backend handed over.
#[derive(Debug)]
pub struct Layer {
    fd: OwnedFd,
    kind: WritableLayer,
}

impl Layer {
    /// Takes the layer on [`AGENT_LAYER_FD`]: marks it close-on-exec, so no user process
    /// inherits it, and checks that it is a directory. Call once, at start-up.
    pub fn take(kind: WritableLayer) -> io::Result<Layer> {
        // SAFETY: fcntl with integer arguments; fails cleanly if the fd is not open.
        if unsafe { libc::fcntl(AGENT_LAYER_FD, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the backend handed this descriptor to the agent (checked open above); it is
        // owned from here on and nothing else uses that number.
        let fd = unsafe { OwnedFd::from_raw_fd(AGENT_LAYER_FD) };
        Layer::new(fd, kind)
    }

    /// The layer behind the directory descriptor `fd`.
    pub fn new(fd: OwnedFd, kind: WritableLayer) -> io::Result<Layer> {
        let st = sys::fstat(fd.as_fd())?;
        if sys::file_type(st.st_mode) != libc::S_IFDIR {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the writable layer is not a directory",
            ));
        }
        Ok(Layer { fd, kind })
    }
}

/// Answers a request whose path is `/moat/layer`, for the sandbox's writable `layer` (`None`:
/// the backend handed over none).
pub async fn handle(layer: Option<Arc<Layer>>, req: Request<Incoming>) -> Response<ResponseBody> {
    let Some(layer) = layer else {
        return transport::plain(
            StatusCode::NOT_IMPLEMENTED,
            "this agent was given no writable layer",
        );
    };
    match *req.method() {
        Method::GET => match holes_of(req.uri().query()) {
            Ok(holes) => capture_response(layer, holes),
            Err(message) => transport::plain(StatusCode::BAD_REQUEST, &message),
        },
        Method::PUT => restore_response(req.into_body()).await,
        _ => {
            let mut resp = transport::plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, PUT"));
            resp
        }
    }
}

/// How a capture asked for by `query` writes files with holes: `dense=1` as plain files (for
/// image layers), else as sparse entries.
fn holes_of(query: Option<&str>) -> Result<capture::Holes, String> {
    match query.unwrap_or("") {
        "" | "dense=0" => Ok(capture::Holes::Sparse),
        "dense=1" => Ok(capture::Holes::Dense),
        other => Err(format!("unknown query {other:?} (known: dense=0, dense=1)")),
    }
}

/// Streams the layer as it is walked. A failure after the first byte ends the body with an
/// error, so the host sees an incomplete transfer, never a short archive that looks whole.
fn capture_response(layer: Arc<Layer>, holes: capture::Holes) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(QUEUE);
    tokio::task::spawn_blocking(move || {
        let mut out = ChunkWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        let result = capture::capture(layer.fd.as_fd(), layer.kind, holes, &mut out)
            .and_then(|done| out.flush().map(|()| done));
        match result {
            Ok(done) => tracing::debug!(?done, "captured the writable layer"),
            Err(e) => {
                tracing::warn!("capturing the writable layer: {e}");
                let _ = tx.blocking_send(Err(e));
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map(Frame::data), rx))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    resp
}

/// Unpacks the request body over `/`, then answers 204, or the error with its status: 400 for
/// a damaged archive, 507 when the sandbox's disk is full, 500 for anything else.
async fn restore_response(body: Incoming) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(QUEUE);
    let feed = tokio::spawn(async move {
        let mut body = body.into_data_stream();
        while let Some(item) = body.next().await {
            let item = item.map_err(io::Error::other);
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    let work = tokio::task::spawn_blocking(move || {
        let root = sys::openat2(
            None,
            c"/",
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            sys::RESOLVE,
        )?;
        let reader = ChunkReader {
            rx,
            current: Bytes::new(),
        };
        restore::restore(root.as_fd(), reader)
    })
    .await;
    feed.abort();
    match work {
        Ok(Ok(done)) => {
            tracing::debug!(?done, "restored the writable layer");
            transport::empty(StatusCode::NO_CONTENT)
        }
        Ok(Err(e)) => {
            let status = match e.kind() {
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => {
                    StatusCode::BAD_REQUEST
                }
                io::ErrorKind::StorageFull
                | io::ErrorKind::QuotaExceeded
                | io::ErrorKind::FileTooLarge => StatusCode::INSUFFICIENT_STORAGE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            transport::plain(status, format!("restoring the writable layer: {e}"))
        }
        Err(e) => transport::plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("restore task: {e}"),
        ),
    }
}

/// Sends what is written in [`CHUNK`]-sized pieces down a channel, from a blocking thread.
struct ChunkWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the host stopped reading"))
    }
}

/// Reads the pieces a channel delivers, from a blocking thread.
struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(piece)) => self.current = piece,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
