//! The listener's defences against clients that hold connections without using them (slowloris:
//! a request head sent a byte at a time, or never finished), which need no API key:
//!
//! - a request head must be complete within [`HEADER_READ_TIMEOUT`] of the connection being
//!   ready for it (opened, or done with the previous request), so an idle keep-alive connection
//!   is closed after that long too;
//! - at most [`connection_cap`] connections are open at once. At the cap, a new connection
//!   closes the connection that has been idle longest (no request in flight: waiting for a head,
//!   or half-way through one), so a flood of idle connections cannot keep others out; when every
//!   connection has a request in flight, the new one is closed at once. Running out of
//!   descriptors (`EMFILE`) does the same.
//!
//! HTTP/1.1 only (with upgrades), as served before.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

/// Longest wait for a complete request head, from the moment the connection is ready for one.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Most connections open at once, whatever the open-file limit.
pub const MAX_CONNECTIONS: usize = 4096;

/// Pause after an accept error other than running out of descriptors, so a persistent one does
/// not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Connections allowed at once: [`MAX_CONNECTIONS`], and at most a quarter of this process's
/// open-file limit (the rest is for the store and the sandboxes, a few descriptors each).
pub fn connection_cap() -> usize {
    let soft = moat_engine::host_limits::nofile().map_or(1024, |l| l.soft);
    usize::try_from(soft / 4)
        .unwrap_or(usize::MAX)
        .clamp(16, MAX_CONNECTIONS)
}

/// What the listener knows of one connection.
struct Tracked {
    /// Requests being served (their answers not yet sent to the end).
    in_flight: AtomicUsize,
    /// When it last had no request in flight.
    idle_since: Mutex<Instant>,
    /// Closes it.
    evict: Notify,
}

/// The open connections.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Tracked>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    fn len(&self) -> usize {
        lock(&self.open).len()
    }

    fn add(&self) -> (u64, Arc<Tracked>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let tracked = Arc::new(Tracked {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            evict: Notify::new(),
        });
        lock(&self.open).insert(id, tracked.clone());
        (id, tracked)
    }

    fn remove(&self, id: u64) {
        lock(&self.open).remove(&id);
    }

    /// Closes the connection idle longest; false when every one has a request in flight.
    fn evict_idle(&self) -> bool {
        let mut open = lock(&self.open);
        let oldest = open
            .iter()
            .filter(|(_, t)| t.in_flight.load(Ordering::SeqCst) == 0)
            .min_by_key(|(_, t)| *lock(&t.idle_since))
            .map(|(id, _)| *id);
        let Some(id) = oldest else {
            return false;
        };
        if let Some(t) = open.remove(&id) {
            // `notify_one` keeps the wake-up for a task not yet waiting.
            t.evict.notify_one();
        }
        true
    }
}

/// Serves `app` on `listener` within the limits above until `signal` completes; then stops
/// accepting, asks every connection to finish its request in flight and close, and returns once
/// all are closed.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    signal: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cap = connection_cap();
    tracing::debug!(cap, "connection cap");
    let registry = Arc::new(Registry::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(signal);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut signal => break,
        };
        while connections.try_join_next().is_some() {}
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e)
                if e.raw_os_error() == Some(libc::EMFILE)
                    || e.raw_os_error() == Some(libc::ENFILE) =>
            {
                // Out of descriptors: the idle connection that goes makes room for this one.
                if !registry.evict_idle() {
                    tracing::warn!("out of file descriptors and every connection is busy");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
                tokio::task::yield_now().await;
                continue;
            }
            Err(e) => {
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        if registry.len() >= cap && !registry.evict_idle() {
            tracing::warn!(cap, "every connection is busy; refusing a new one");
            drop(tcp);
            continue;
        }
        // Event streams send small lines that must leave at once, not wait for an ack.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("setting TCP_NODELAY: {e}");
        }
        let (id, tracked) = registry.add();
        let (app, registry, stop) = (app.clone(), registry.clone(), stop_rx.clone());
        connections.spawn(async move {
            serve_connection(tcp, app, tracked, stop).await;
            registry.remove(id);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Serves one connection until it closes, is evicted, or (after `stop`) finishes its request.
async fn serve_connection(
    tcp: TcpStream,
    app: Router,
    tracked: Arc<Tracked>,
    mut stop: watch::Receiver<bool>,
) {
    let router = hyper_util::service::TowerToHyperService::new(app);
    let service = {
        let tracked = tracked.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = InFlight::enter(tracked.clone());
            let answer = hyper::service::Service::call(&router, req);
            async move {
                let response = answer.await;
                response.map(|r| crate::held_body::hold(r.map(Body::new), guard))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection: {e}");
                }
                return;
            }
            // Dropping it closes the socket; no request is in flight.
            () = tracked.evict.notified() => return,
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// One request in flight on a connection, until its answer is sent or dropped.
struct InFlight(Arc<Tracked>);

impl InFlight {
    fn enter(tracked: Arc<Tracked>) -> InFlight {
        tracked.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(tracked)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *lock(&self.0.idle_since) = Instant::now();
        }
    }
}
