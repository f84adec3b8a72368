//! The agent's host-only layer route: the sandbox's writable layer as a tar archive, out of the
//! sandbox (a snapshot) and into one (a restore). The host never parses the archive: it only
//! moves and stores the bytes, which the agent of a sandbox of the same tenant unpacks.

use std::pin::pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use moat_proto::agent_config::LAYER_PATH;
use tokio::time::Instant;

use super::files::{Progress, tracked_frames};
use super::{AgentClient, AgentError, BoxError, DEFAULT_UNARY_TIMEOUT, STREAM_IDLE_LIMIT};
use super::{http_error, within};

impl AgentClient {
    /// `GET /moat/layer`: starts the transfer of the sandbox's writable layer as a tar archive
    /// (see the agent's `layer` module for what it holds); its pieces come from
    /// [`LayerStream::next`]. Files with holes come as GNU sparse entries, unless `dense`:
    /// then as plain files with their holes as zeros (an image layer's form).
    pub async fn capture_layer(&self, dense: bool) -> Result<LayerStream, AgentError> {
        let path = if dense {
            format!("{LAYER_PATH}?dense=1")
        } else {
            LAYER_PATH.to_owned()
        };
        let req = self.request(Method::GET, &path, None, None, Bytes::new())?;
        let resp = within(DEFAULT_UNARY_TIMEOUT, self.send(req)).await?;
        if resp.status() != StatusCode::OK {
            return Err(http_error(resp).await);
        }
        Ok(LayerStream {
            body: resp.into_body(),
            done: false,
        })
    }

    /// `PUT /moat/layer`: streams the archive `body` yields to the agent, which unpacks it over
    /// the sandbox's root as root (owners and modes kept); returns once it is all in place.
    /// A transfer on which nothing moves for [`STREAM_IDLE_LIMIT`] fails.
    pub async fn restore_layer<S, E>(&self, body: S) -> Result<(), AgentError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let progress = Arc::new(Progress::new());
        let tracked = tracked_frames(body, progress.clone());
        let mut req = self.request(Method::PUT, LAYER_PATH, None, None, Bytes::new())?;
        *req.body_mut() = StreamBody::new(tracked).boxed_unsync();
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-tar"),
        );
        let mut send = pin!(self.send(req));
        let resp = loop {
            let (deadline, limit) = progress.deadline();
            tokio::select! {
                r = &mut send => break r?,
                () = tokio::time::sleep_until(deadline) => {
                    if Instant::now() >= progress.deadline().0 {
                        return Err(AgentError::Timeout(limit));
                    }
                }
            }
        };
        if resp.status() != StatusCode::NO_CONTENT {
            return Err(http_error(resp).await);
        }
        Ok(())
    }
}

/// A writable layer coming from the agent, piece by piece.
#[derive(Debug)]
pub struct LayerStream {
    body: Incoming,
    done: bool,
}

impl LayerStream {
    /// The next piece; `None` once the archive is complete. A body that fails (the agent hit
    /// an error midway) or stays silent for [`STREAM_IDLE_LIMIT`] yields one error.
    pub async fn next(&mut self) -> Option<Result<Bytes, AgentError>> {
        if self.done {
            return None;
        }
        loop {
            let frame = match tokio::time::timeout(STREAM_IDLE_LIMIT, self.body.frame()).await {
                Ok(f) => f,
                Err(_) => {
                    self.done = true;
                    return Some(Err(AgentError::Transport(
                        "layer transfer silent past the stream's idle limit".into(),
                    )));
                }
            };
            match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    return Some(Ok(data));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(AgentError::Transport(format!(
                        "layer transfer failed: {e}"
                    ))));
                }
                None => {
                    self.done = true;
                    return None;
                }
            }
        }
    }
}
