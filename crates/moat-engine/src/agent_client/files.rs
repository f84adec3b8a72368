//! The filesystem side of the agent client: the `filesystem.Filesystem` RPCs, and file contents
//! streamed through `/files` in both directions without ever holding a whole file in memory.
//!
//! Transfers have no overall deadline (a large file on a slow link takes what it takes), but one
//! on which nothing moves for [`STREAM_IDLE_LIMIT`] fails, so a stalled agent cannot hold a
//! caller forever.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use moat_proto::filesystem::{
    EntryInfo, ListDirRequest, ListDirResponse, MakeDirRequest, MakeDirResponse, MoveRequest,
    MoveResponse, RemoveRequest, RemoveResponse, StatRequest, StatResponse,
};
use tokio::time::Instant;

use super::{
    AgentClient, AgentError, BoxError, CallOptions, DEFAULT_UNARY_TIMEOUT, MAX_ERROR_BODY,
    STREAM_IDLE_LIMIT, files_uri, http_error, read_limited, within,
};

fn as_user(user: Option<&str>) -> CallOptions {
    CallOptions {
        user: user.map(str::to_owned),
        timeout: None,
    }
}

fn entry(entry: Option<EntryInfo>, rpc: &str) -> Result<EntryInfo, AgentError> {
    entry.ok_or_else(|| AgentError::Protocol(format!("{rpc} answered without an entry")))
}

impl AgentClient {
    /// `Filesystem.Stat`: the entry at `path` (absolute, or relative to the user's home), as
    /// `user`. Missing is `not_found`.
    pub async fn stat(&self, path: &str, user: Option<&str>) -> Result<EntryInfo, AgentError> {
        let req = StatRequest { path: path.into() };
        let resp: StatResponse = self
            .unary("/filesystem.Filesystem/Stat", &req, Some(&as_user(user)))
            .await?;
        entry(resp.entry, "Stat")
    }

    /// `Filesystem.ListDir`: the entries under directory `path` down to `depth` levels (1 = the
    /// directory's own entries), as one flat list. The answer must fit in
    /// [`super::MAX_RESPONSE_MESSAGE`]; a bigger one is [`AgentError::TooLarge`].
    pub async fn list_dir(
        &self,
        path: &str,
        depth: u32,
        user: Option<&str>,
    ) -> Result<Vec<EntryInfo>, AgentError> {
        let req = ListDirRequest {
            path: path.into(),
            depth,
        };
        let resp: ListDirResponse = self
            .unary("/filesystem.Filesystem/ListDir", &req, Some(&as_user(user)))
            .await?;
        Ok(resp.entries)
    }

    /// `Filesystem.MakeDir`: creates directory `path` and its missing parents. An existing
    /// directory is `already_exists`, an existing non-directory `invalid_argument`.
    pub async fn make_dir(&self, path: &str, user: Option<&str>) -> Result<EntryInfo, AgentError> {
        let req = MakeDirRequest { path: path.into() };
        let resp: MakeDirResponse = self
            .unary("/filesystem.Filesystem/MakeDir", &req, Some(&as_user(user)))
            .await?;
        entry(resp.entry, "MakeDir")
    }

    /// `Filesystem.Move`: renames `source` to `destination` (creating its parents) and returns
    /// the moved entry.
    pub async fn move_entry(
        &self,
        source: &str,
        destination: &str,
        user: Option<&str>,
    ) -> Result<EntryInfo, AgentError> {
        let req = MoveRequest {
            source: source.into(),
            destination: destination.into(),
        };
        let resp: MoveResponse = self
            .unary("/filesystem.Filesystem/Move", &req, Some(&as_user(user)))
            .await?;
        entry(resp.entry, "Move")
    }

    /// `Filesystem.Remove`: removes `path`, a directory with everything in it; a missing path
    /// is not an error.
    pub async fn remove(&self, path: &str, user: Option<&str>) -> Result<(), AgentError> {
        let req = RemoveRequest { path: path.into() };
        let _: RemoveResponse = self
            .unary("/filesystem.Filesystem/Remove", &req, Some(&as_user(user)))
            .await?;
        Ok(())
    }

    /// `GET /files`: starts a download of the regular file `path`, read as `user`. The answer
    /// knows the file's size; its chunks come from [`FileDownload::next`].
    pub async fn read_file_stream(
        &self,
        path: &str,
        user: Option<&str>,
    ) -> Result<FileDownload, AgentError> {
        let uri = files_uri(path, user);
        let mut req = self.request(Method::GET, &uri, None, None, Bytes::new())?;
        req.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let resp = within(DEFAULT_UNARY_TIMEOUT, self.send(req)).await?;
        if resp.status() != StatusCode::OK {
            return Err(http_error(resp).await);
        }
        if let Some(enc) = resp.headers().get(header::CONTENT_ENCODING)
            && enc.as_bytes() != b"identity"
        {
            return Err(AgentError::Protocol(format!(
                "GET /files answered with encoding {enc:?}, identity was asked for"
            )));
        }
        let size = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                AgentError::Protocol("GET /files answered without a valid Content-Length".into())
            })?;
        Ok(FileDownload {
            body: resp.into_body(),
            size,
            received: 0,
            done: false,
        })
    }

    /// `POST /files` with a streamed body: writes what `body` yields to `path` as `user`,
    /// creating parent directories, and returns once the agent has written all of it. Nothing
    /// is buffered beyond the HTTP/2 flow-control windows, so a slow agent (or disk) slows the
    /// source down. An error from `body` aborts the upload; the file keeps what was written.
    pub async fn write_file_stream<S, E>(
        &self,
        path: &str,
        user: Option<&str>,
        body: S,
    ) -> Result<(), AgentError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let progress = Arc::new(Progress::new());
        let tracked = tracked_frames(body, progress.clone());
        let uri = files_uri(path, user);
        let mut req = self.request(Method::POST, &uri, None, None, Bytes::new())?;
        *req.body_mut() = StreamBody::new(tracked).boxed_unsync();
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let mut send = std::pin::pin!(self.send(req));
        let resp = loop {
            let (deadline, limit) = progress.deadline();
            tokio::select! {
                r = &mut send => break r?,
                () = tokio::time::sleep_until(deadline) => {
                    // Data may have moved while this timer ran; only a deadline that still
                    // holds counts.
                    if Instant::now() >= progress.deadline().0 {
                        return Err(AgentError::Timeout(limit));
                    }
                }
            }
        };
        check_written(resp).await
    }
}

/// The answer of `POST /files`: 200 with the written entries.
pub(super) async fn check_written(resp: http::Response<Incoming>) -> Result<(), AgentError> {
    if resp.status() != StatusCode::OK {
        return Err(http_error(resp).await);
    }
    let body = within(
        DEFAULT_UNARY_TIMEOUT,
        read_limited(resp.into_body(), MAX_ERROR_BODY),
    )
    .await?;
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Array(entries)) if !entries.is_empty() => Ok(()),
        _ => Err(AgentError::Protocol(
            "POST /files answered without the written entry".into(),
        )),
    }
}

/// `body` as HTTP body frames, noting each chunk (and the end) in `progress`, so the upload's
/// caller can tell a transfer that moves from one that stalls.
pub(super) fn tracked_frames<S, E>(
    body: S,
    progress: Arc<Progress>,
) -> impl Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<BoxError>,
{
    futures_util::stream::unfold(Box::pin(body), move |mut body| {
        let tracker = progress.clone();
        async move {
            match body.next().await {
                Some(item) => {
                    tracker.moved();
                    Some((item.map(Frame::data).map_err(Into::into), body))
                }
                None => {
                    tracker.finished();
                    None
                }
            }
        }
    })
}

/// When an upload last moved data, and whether its body is complete.
pub(super) struct Progress(Mutex<(Instant, bool)>);

impl Progress {
    pub(super) fn new() -> Self {
        Progress(Mutex::new((Instant::now(), false)))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, (Instant, bool)> {
        // Plain data: a panic elsewhere while holding the lock leaves nothing half-done.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn moved(&self) {
        self.state().0 = Instant::now();
    }

    pub(super) fn finished(&self) {
        *self.state() = (Instant::now(), true);
    }

    /// When the upload has failed if nothing happens before, and the limit that sets it: the
    /// idle limit while the body moves, a unary call's deadline for the answer after it.
    pub(super) fn deadline(&self) -> (Instant, std::time::Duration) {
        let (at, done) = *self.state();
        let limit = if done {
            DEFAULT_UNARY_TIMEOUT
        } else {
            STREAM_IDLE_LIMIT
        };
        (at + limit, limit)
    }
}

/// A file coming from the agent: its size, then its contents chunk by chunk.
#[derive(Debug)]
pub struct FileDownload {
    body: Incoming,
    size: u64,
    received: u64,
    done: bool,
}

impl FileDownload {
    /// The file's size when the agent opened it: exactly this many bytes follow.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk; `None` once all [`Self::size`] bytes arrived. A body that ends early,
    /// runs long, fails or stays silent for [`STREAM_IDLE_LIMIT`] yields one error.
    pub async fn next(&mut self) -> Option<Result<Bytes, AgentError>> {
        if self.done {
            return None;
        }
        let result = self.next_inner().await;
        if !matches!(result, Some(Ok(_))) {
            self.done = true;
        }
        result
    }

    async fn next_inner(&mut self) -> Option<Result<Bytes, AgentError>> {
        loop {
            let frame = match tokio::time::timeout(STREAM_IDLE_LIMIT, self.body.frame()).await {
                Ok(f) => f,
                Err(_) => {
                    return Some(Err(AgentError::Transport(
                        "file download silent past the stream's idle limit".into(),
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
                    self.received += data.len() as u64;
                    if self.received > self.size {
                        return Some(Err(AgentError::Protocol(format!(
                            "file download longer than its Content-Length of {}",
                            self.size
                        ))));
                    }
                    return Some(Ok(data));
                }
                Some(Err(e)) => return Some(Err(AgentError::transport(e))),
                None if self.received < self.size => {
                    return Some(Err(AgentError::Protocol(format!(
                        "file download ended after {} of {} bytes",
                        self.received, self.size
                    ))));
                }
                None => return None,
            }
        }
    }

    /// The chunks as a stream (what an HTTP response body is made from).
    pub fn into_stream(self) -> Pin<Box<dyn Stream<Item = Result<Bytes, AgentError>> + Send>> {
        futures_util::stream::unfold(
            self,
            |mut d| async move { d.next().await.map(|item| (item, d)) },
        )
        .boxed()
    }
}
