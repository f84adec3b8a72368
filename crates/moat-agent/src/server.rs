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

/// How long the connection on which the host asked to reconnect may go on (its answer on its
/// way out, the host closing its side) before the agent drops it.
const RECONNECT_DRAIN: std::time::Duration = std::time::Duration::from_millis(200);

/// How often an agent waiting for its host to reconnect looks at its channel (see
/// [`serve_resumable`]).
const RECONNECT_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Serves connections on the channel socket `channel`, one after another, all on one router:
/// after each, the agent exits unless the host asked it to expect a new connection
/// (`RECONNECT_PATH`, before a memory checkpoint). It then waits until the descriptor has
/// something to read: the old socket only ever reads as closed, the new one a restored sandbox's
/// runtime hands it (gVisor re-associates the container's standard input) carries the new
/// connection's first bytes.
pub async fn serve_resumable(
    channel: std::os::fd::OwnedFd,
    state: Arc<AgentState>,
    opts: ServeOptions,
) -> std::io::Result<()> {
    let reaper = Reaper::start(opts.reap)?;
    let router = Arc::new(Router::new(state.clone(), reaper, opts.landlock_root));
    // Not registered with the runtime's reactor: a restore may hand the reactor keys of
    // registrations long gone (see `channel`).
    let watched = crate::channel::Channel::new(channel.try_clone()?)?;
    loop {
        watched.rewatch()?;
        let stream = watched.stream();
        // However it ended, what follows depends only on whether the host said it comes back.
        // When it did, the agent ends the connection itself (after the answer went out, and
        // with streams still open cut), so the host knows, once its side closes, that the
        // agent no longer reads the old connection: a checkpoint may follow.
        let conn = serve_connection(stream, router.clone());
        tokio::pin!(conn);
        tokio::select! {
            _ = &mut conn => {}
            () = state.reconnect.notified() => {
                let _ = tokio::time::timeout(RECONNECT_DRAIN, &mut conn).await;
            }
        }
        if !state
            .expect_reconnect
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        // The host waits for this end-of-stream before it checkpoints: from here on the agent
        // reads nothing of the old connection.
        // SAFETY: shutdown with integer arguments on our own socket.
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&channel), libc::SHUT_WR) };
        while !has_data(&channel)? {
            tokio::time::sleep(RECONNECT_POLL).await;
        }
    }
}

/// Whether `fd` has bytes to read now (a peek, which consumes nothing).
fn has_data(fd: &std::os::fd::OwnedFd) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: recv into one byte of our own, with MSG_PEEK (nothing is consumed) and
    // MSG_DONTWAIT (never blocks).
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n > 0 {
        return Ok(true);
    }
    if n == 0 {
        return Ok(false);
    }
    let e = std::io::Error::last_os_error();
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(false),
        _ => Err(e),
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
