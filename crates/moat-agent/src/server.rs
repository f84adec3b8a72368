//! Serving the agent's HTTP/2 connection (h2c, prior knowledge) on one byte stream.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::reaper::{ReapMode, Reaper};
use crate::router::Router;
use crate::state::AgentState;

/// Most concurrent HTTP/2 streams the host may open.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Largest header list accepted, bytes.
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Largest frame accepted (the HTTP/2 minimum, so a peer cannot make the agent buffer more).
pub const MAX_FRAME_SIZE: u32 = 16 * 1024;
/// Bytes each response stream may buffer for sending.
pub const MAX_SEND_BUF: usize = 128 * 1024;
/// Per-stream receive window: bounds request data buffered per stream.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// Connection receive window.
pub const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// How [`serve`] runs user processes.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Root of the landlock ruleset of user processes (the sandbox's `/`); `None` skips landlock
    /// (tests on the host).
    pub landlock_root: Option<PathBuf>,
    /// Which children the reaper collects.
    pub reap: ReapMode,
}

impl Default for ServeOptions {
    /// Options for running outside a sandbox: no landlock, reap only own processes.
    fn default() -> Self {
        ServeOptions {
            landlock_root: None,
            reap: ReapMode::OwnChildren,
        }
    }
}

impl ServeOptions {
    /// Options for the agent as the sandbox's PID 1: landlock over `/`, reap every child.
    pub fn pid1() -> Self {
        ServeOptions {
            landlock_root: Some(PathBuf::from("/")),
            reap: ReapMode::AnyChild,
        }
    }
}

/// How long the accept loop waits after a failed `accept` (out of fds, say) before it retries.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Serves the agent's API on `io` until the peer closes it.
pub async fn serve<IO>(io: IO, state: Arc<AgentState>, opts: ServeOptions) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let reaper = Reaper::start(opts.reap)?;
    let router = Arc::new(Router::new(state, reaper, opts.landlock_root));
    serve_connection(io, router).await
}

/// Serves `first`, then every connection `listener` accepts, all on one router (one set of
/// processes and watchers), until the process is killed: the host may go away and come back.
pub async fn serve_with_listener<IO>(
    first: IO,
    listener: tokio::net::UnixListener,
    state: Arc<AgentState>,
    opts: ServeOptions,
) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let reaper = Reaper::start(opts.reap)?;
    let router = Arc::new(Router::new(state, reaper, opts.landlock_root));
    {
        let router = router.clone();
        tokio::spawn(async move {
            let _ = serve_connection(first, router).await;
        });
    }
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let router = router.clone();
                tokio::spawn(async move {
                    let _ = serve_connection(stream, router).await;
                });
            }
            Err(_) => tokio::time::sleep(ACCEPT_RETRY).await,
        }
    }
}

async fn serve_connection<IO>(io: IO, router: Arc<Router>) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let router = router.clone();
        async move { Ok::<_, Infallible>(router.handle(req).await) }
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buf_size(MAX_SEND_BUF)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(256);
    builder
        .serve_connection(TokioIo::new(io), service)
        .await
        .map_err(std::io::Error::other)
}
