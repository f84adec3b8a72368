//! The plain HTTP `/files` routes: download (`GET`) and upload (`POST`) of
//! `shared/reference/e2b-wire.md` §7. The access token and signed-URL check is the server's
//! sandbox proxy's: only the host reaches the agent.
//!
//! Like the RPCs, all file work runs as the request's user (`username` query parameter, else the
//! default user) through the same checked path resolution (see [`crate::filesystem`]), with one
//! exception that envd makes too: an upload's missing parent directories are made by the agent
//! itself and given to the user, so a write to `/0/a/b.txt` works where the user could not make
//! `/0` (the file is still opened as the user). Bodies stream in both directions: a download is
//! read in [`CHUNK`]-sized pieces, an upload is written as it arrives, so neither size is
//! limited by memory; uploads are limited only by the filesystem (no space or quota answers
//! 507).
//!
//! An upload refused part-way (a bad destination in a multipart form, a failed write) is
//! answered only once the rest of its body has been read and dropped, up to
//! [`MAX_DRAIN_BYTES`] and [`DRAIN_TIMEOUT`]: a client that is still sending when the answer
//! comes would otherwise see its connection break instead of the error.

mod multipart;

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::{GzEncoder, MultiGzDecoder};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use moat_proto::file_signature::FilesQuery;
use tokio::io::AsyncReadExt;
use tokio::sync::{Mutex, mpsc};

use crate::filesystem::creds::blocking_as;
use crate::filesystem::{ops, paths};
use crate::rpc::{Code, RpcError};
use crate::state::AgentState;
use crate::transport::ResponseBody;
use crate::users::User;
use multipart::{Multipart, MultipartError};

/// Size of the pieces a download is read and sent in.
pub const CHUNK: usize = 64 * 1024;

/// Largest download of a file whose size is reported as 0 (procfs and sysfs files are generated
/// as they are read): such a file is read whole first, to send its real length, and one longer
/// than this is refused (400).
pub const MAX_UNSIZED_DOWNLOAD: u64 = 1 << 20;

/// Most of a refused upload's remaining body read (and dropped) before the answer goes out; a
/// longer body is cut off, and its client may see the connection close instead of the answer.
pub const MAX_DRAIN_BYTES: u64 = 64 << 20;

/// Longest a refused upload's remaining body is read before the answer goes out anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Prefix of the request headers that carry file metadata.
const METADATA_HEADER: &str = "x-metadata-";

/// Longest metadata key: the kernel caps an xattr name at 255 bytes, `user.e2b.` included.
pub const MAX_METADATA_KEY: usize = 255 - "user.e2b.".len();

/// Most metadata per file: the sum over entries of `user.e2b.` + key + value (what fits in one
/// ext4 block).
pub const MAX_METADATA_TOTAL: usize = 4096;

/// An error answered as `{"message": …, "code": status}`.
#[derive(Debug)]
struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<RpcError> for HttpError {
    fn from(e: RpcError) -> Self {
        let status = match e.code {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            // On this route it comes from ENOSPC, EDQUOT or EFBIG: the SDK's "not enough space".
            Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError::new(status, e.message)
    }
}

impl From<MultipartError> for HttpError {
    fn from(e: MultipartError) -> Self {
        HttpError::bad_request(format!("invalid multipart body: {e}"))
    }
}

fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl HttpError {
    fn into_response(self) -> Response<ResponseBody> {
        json_response(
            self.status,
            &serde_json::json!({"message": self.message, "code": self.status.as_u16()}),
        )
    }
}

/// Answers a request whose path is `/files`.
pub async fn handle(state: Arc<AgentState>, req: Request<Incoming>) -> Response<ResponseBody> {
    let result = match *req.method() {
        Method::GET => download(&state, req).await,
        Method::POST => upload(&state, req).await,
        _ => Err(HttpError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed on /files; use GET or POST",
        )),
    };
    result.unwrap_or_else(|e| {
        tracing::debug!(status = %e.status, message = %e.message, "/files request failed");
        e.into_response()
    })
}

/// The query parameters `/files` reads, by the one parser the server's proxy uses too (so a
/// signature it checked covers what is acted on here).
fn parse_query(query: Option<&str>) -> Result<FilesQuery, HttpError> {
    FilesQuery::parse(query.unwrap_or("")).map_err(|e| HttpError::bad_request(e.0))
}

/// The user the request names (`username`), the default one when it names none; 401 when no
/// such user exists. Who may reach `/files` at all is checked before the request gets here (the
/// server's sandbox proxy, or the host's own calls).
fn request_user(state: &AgentState, q: &FilesQuery) -> Result<User, HttpError> {
    state
        .resolve_user(q.username.as_deref())
        .map_err(|e| HttpError::new(StatusCode::UNAUTHORIZED, e.message))
}

/// The destination or source path of the request, expanded for `user`.
fn request_path(state: &AgentState, user: &User, raw: Option<&str>) -> Result<String, HttpError> {
    let raw = raw
        .filter(|p| !p.is_empty())
        .ok_or_else(|| HttpError::bad_request("the 'path' query parameter is required"))?;
    Ok(paths::expand(raw, user, &state.workdir_for(user))?)
}

/// Which encoding a download is sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
}

/// Picks the response encoding from `Accept-Encoding`: gzip when the client accepts it at least
/// as much as identity, identity when acceptable (it is unless excluded), else none (406).
fn negotiate(headers: &HeaderMap) -> Option<Encoding> {
    let values: Vec<&str> = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if values.is_empty() {
        return Some(Encoding::Identity);
    }
    let (mut gzip, mut identity, mut star) = (None, None, None);
    for item in values.iter().flat_map(|v| v.split(',')) {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .next()
            .map_or(1.0, |v| v.trim().parse::<f32>().unwrap_or(1.0));
        match coding.as_str() {
            "gzip" | "x-gzip" => gzip = Some(q),
            "identity" => identity = Some(q),
            "*" => star = Some(q),
            _ => {}
        }
    }
    let gzip = gzip.or(star).unwrap_or(0.0);
    let identity = identity.or(star).unwrap_or(1.0);
    if gzip > 0.0 && gzip >= identity {
        Some(Encoding::Gzip)
    } else if identity > 0.0 {
        Some(Encoding::Identity)
    } else {
        None
    }
}

/// `Content-Disposition` for a download of `name`: a plain ASCII `filename` and, when the name
/// needs it, the exact UTF-8 one as `filename*`.
fn content_disposition(name: &str) -> HeaderValue {
    let plain: String = name
        .chars()
        .map(|c| {
            if (' '..='~').contains(&c) && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut value = format!("inline; filename=\"{plain}\"");
    if plain != name {
        const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'.')
            .remove(b'-')
            .remove(b'_');
        value.push_str("; filename*=UTF-8''");
        value.push_str(&percent_encoding::utf8_percent_encode(name, SET).to_string());
    }
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("inline"))
}

async fn download(
    state: &AgentState,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, HttpError> {
    let q = parse_query(req.uri().query())?;
    let user = request_user(state, &q)?;
    let path = request_path(state, &user, q.path.as_deref())?;
    let encoding = negotiate(req.headers()).ok_or_else(|| {
        HttpError::new(
            StatusCode::NOT_ACCEPTABLE,
            "no acceptable content encoding (identity and gzip are available)",
        )
    })?;
    let open_path = path.clone();
    let (file, size) = blocking_as(&user, move || ops::open_read(&open_path)).await?;
    let file = tokio::fs::File::from_std(file);
    // A size of 0 may be a file generated as it is read (`/proc`, `/sys`): its length is known
    // only once it has been read.
    let (reader, size): (Reader, u64) = if size == 0 {
        let data = read_unsized(file, &path).await?;
        let len = data.get_ref().len() as u64;
        (Box::new(data), len)
    } else {
        (Box::new(file), size)
    };
    let stream = read_stream(reader, size, encoding == Encoding::Gzip);
    let body = BodyExt::boxed(StreamBody::new(stream.map(|r| r.map(Frame::data))));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        content_disposition(paths::base_name(&path)),
    );
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    match encoding {
        Encoding::Gzip => {
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        Encoding::Identity => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
    }
    Ok(resp)
}

/// What a download reads from: the open file, or a size-0 file's contents read beforehand.
type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send + Sync>;

/// The contents of `file`, whose size is reported as 0, read to its end: at most
/// [`MAX_UNSIZED_DOWNLOAD`] bytes (a truly empty file reads nothing).
async fn read_unsized(
    file: tokio::fs::File,
    path: &str,
) -> Result<std::io::Cursor<Vec<u8>>, HttpError> {
    let mut data = Vec::new();
    file.take(MAX_UNSIZED_DOWNLOAD + 1)
        .read_to_end(&mut data)
        .await
        .map_err(|e| HttpError::from(RpcError::from_io(&e, &format!("reading {path}"))))?;
    if data.len() as u64 > MAX_UNSIZED_DOWNLOAD {
        return Err(HttpError::bad_request(format!(
            "{path} reports no size (it is generated as it is read) and is longer than \
             {MAX_UNSIZED_DOWNLOAD} bytes; copy it to a regular file and download that"
        )));
    }
    Ok(std::io::Cursor::new(data))
}

/// What a download stream carries between chunks.
struct ReadState {
    file: Reader,
    remaining: u64,
    gzip: Option<GzEncoder<Vec<u8>>>,
    done: bool,
}

/// The first `size` bytes of `file` (its size when opened: a download is a snapshot of that
/// length, and a file that shrinks meanwhile ends the body with an error), gzip-compressed on the
/// fly when asked.
fn read_stream(
    file: Reader,
    size: u64,
    gzip: bool,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + Sync + 'static {
    let state = ReadState {
        file,
        remaining: size,
        gzip: gzip.then(|| GzEncoder::new(Vec::new(), Compression::fast())),
        done: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            if st.remaining == 0 {
                st.done = true;
                let tail = match st.gzip.take() {
                    Some(enc) => enc.finish(),
                    None => return None,
                };
                return Some((tail.map(Bytes::from), st));
            }
            let want = st.remaining.min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; want];
            let n = match st.file.read(&mut buf).await {
                Ok(0) => {
                    st.done = true;
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file shrank while it was being sent",
                    );
                    return Some((Err(e), st));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
            };
            buf.truncate(n);
            st.remaining -= n as u64;
            let Some(enc) = st.gzip.as_mut() else {
                return Some((Ok(Bytes::from(buf)), st));
            };
            if let Err(e) = enc.write_all(&buf) {
                st.done = true;
                return Some((Err(e), st));
            }
            let out = std::mem::take(enc.get_mut());
            if !out.is_empty() {
                return Some((Ok(Bytes::from(out)), st));
            }
        }
    })
}

/// The `X-Metadata-*` headers as (lowercased key, value) pairs, validated: printable ASCII, key at
/// most [`MAX_METADATA_KEY`] bytes, all of it at most [`MAX_METADATA_TOTAL`]. A repeated key keeps
/// its last value.
fn parse_metadata(headers: &HeaderMap) -> Result<Vec<(String, String)>, HttpError> {
    let mut out = BTreeMap::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(METADATA_HEADER) else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if key.is_empty() {
            return Err(HttpError::bad_request("empty metadata key"));
        }
        if key.len() > MAX_METADATA_KEY {
            return Err(HttpError::bad_request(format!(
                "metadata key '{key}' is longer than {MAX_METADATA_KEY} bytes"
            )));
        }
        let printable = |b: &u8| (0x20..=0x7e).contains(b);
        if !key.as_bytes().iter().all(printable) {
            return Err(HttpError::bad_request(format!(
                "metadata key '{key}' is not printable ASCII"
            )));
        }
        if !value.as_bytes().iter().all(printable) {
            return Err(HttpError::bad_request(format!(
                "metadata value for '{key}' is not printable ASCII"
            )));
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.insert(key, value);
    }
    let total: usize = out
        .iter()
        .map(|(k, v)| "user.e2b.".len() + k.len() + v.len())
        .sum();
    if total > MAX_METADATA_TOTAL {
        return Err(HttpError::bad_request(format!(
            "metadata is {total} bytes, more than {MAX_METADATA_TOTAL}"
        )));
    }
    Ok(out.into_iter().collect())
}

/// A message to a file writer.
enum Chunk {
    Data(Bytes),
    /// The body is complete: finish the file. A writer whose channel closes without it was
    /// aborted (the request body failed) and leaves the file as far as it got.
    End,
}

/// A file being written as the user on a blocking thread, fed through a small bounded channel
/// (so a slow disk slows the client, not memory).
struct FileSink {
    tx: Option<mpsc::Sender<Chunk>>,
    task: tokio::task::JoinHandle<Result<(), HttpError>>,
}

impl FileSink {
    fn open(user: &User, path: String, gzip: bool, metadata: Arc<Vec<(String, String)>>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Chunk>(4);
        let user = user.clone();
        let task = tokio::spawn(async move {
            let (uid, gid) = (user.uid, user.gid);
            make_parents(&path, uid, gid).await?;
            blocking_as(&user, move || {
                let file = ops::open_write(&path, uid, gid)?;
                let mut gz = gzip.then(|| MultiGzDecoder::new(&file));
                let write_error = |e: io::Error| write_error(&e, &path);
                let mut complete = false;
                while let Some(chunk) = rx.blocking_recv() {
                    match chunk {
                        Chunk::Data(data) => match gz.as_mut() {
                            Some(d) => d.write_all(&data).map_err(write_error)?,
                            None => (&file).write_all(&data).map_err(write_error)?,
                        },
                        Chunk::End => {
                            complete = true;
                            break;
                        }
                    }
                }
                if !complete {
                    return Err(RpcError::new(
                        Code::Aborted,
                        format!("{path}: the upload was interrupted"),
                    ));
                }
                if let Some(d) = gz {
                    d.finish().map_err(write_error)?;
                }
                ops::write_metadata(&file, &metadata, &path)?;
                Ok(())
            })
            .await
            .map_err(HttpError::from)
        });
        FileSink { tx: Some(tx), task }
    }

    /// Hands `data` to the writer; if the writer has stopped, its error.
    async fn send(&mut self, data: Bytes) -> Result<(), HttpError> {
        if let Some(tx) = &self.tx
            && tx.send(Chunk::Data(data)).await.is_ok()
        {
            return Ok(());
        }
        Err(self.join().await.err().unwrap_or_else(|| {
            HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "the file writer stopped")
        }))
    }

    /// Ends the file and waits for the writer.
    async fn finish(mut self) -> Result<(), HttpError> {
        if let Some(tx) = self.tx.take() {
            // A closed channel means the writer already stopped; `join` reports why.
            let _ = tx.send(Chunk::End).await;
        }
        self.join().await
    }

    async fn join(&mut self) -> Result<(), HttpError> {
        self.tx = None;
        (&mut self.task).await.map_err(|e| {
            HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("file writer failed: {e}"),
            )
        })?
    }
}

/// Makes the missing parent directories of `path` with the agent's own credentials, each given
/// to `uid:gid`, as envd does: the user could not always make them (`/0/a` below a `/` only root
/// may write). Existing directories are left as they are, so the file itself is still opened
/// with the user's rights.
async fn make_parents(path: &str, uid: u32, gid: u32) -> Result<(), HttpError> {
    let parent = paths::split(path).0.to_owned();
    tokio::task::spawn_blocking(move || ops::ensure_dirs(&parent, uid, gid).map(drop))
        .await
        .map_err(|e| {
            HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("making parent directories failed: {e}"),
            )
        })?
        .map_err(HttpError::from)
}

/// A write failure: OS errors keep their meaning (no space is 507); anything else came from the
/// gzip decoder, so the body was bad.
fn write_error(err: &io::Error, path: &str) -> RpcError {
    match err.raw_os_error() {
        Some(_) => RpcError::from_io(err, &format!("writing {path}")),
        None => RpcError::new(
            Code::InvalidArgument,
            format!("{path}: invalid gzip body: {err}"),
        ),
    }
}

/// The upload's answer for one file: its path, name and type, and the metadata it now carries
/// (only when there is some, as upstream).
fn written(path: &str, metadata: &[(String, String)]) -> serde_json::Value {
    let mut v = serde_json::json!({"path": path, "name": paths::base_name(path), "type": "file"});
    if !metadata.is_empty() {
        let map: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, val)| (k.clone(), serde_json::Value::from(val.as_str())))
            .collect();
        v["metadata"] = serde_json::Value::Object(map);
    }
    v
}

/// A request body that an upload reads as a stream and, if it is refused, drains what is left
/// of afterwards.
#[derive(Clone)]
struct SharedBody(Arc<Mutex<Incoming>>);

impl SharedBody {
    /// The body's data, frame by frame (trailers skipped).
    fn stream(&self) -> BoxStream<'static, Result<Bytes, MultipartError>> {
        futures_util::stream::unfold(self.0.clone(), |body| async move {
            loop {
                let frame = body.lock().await.frame().await?;
                match frame {
                    Ok(frame) => match frame.into_data() {
                        Ok(data) => return Some((Ok(data), body)),
                        Err(_) => continue,
                    },
                    Err(e) => {
                        let e = MultipartError(format!("reading the request body: {e}"));
                        return Some((Err(e), body));
                    }
                }
            }
        })
        .boxed()
    }

    /// Reads and drops the rest of the body, up to [`MAX_DRAIN_BYTES`] and [`DRAIN_TIMEOUT`].
    async fn drain(&self) {
        let mut body = self.0.lock().await;
        let read_all = async {
            let mut read: u64 = 0;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    read = read.saturating_add(data.len() as u64);
                    if read > MAX_DRAIN_BYTES {
                        tracing::debug!("a refused upload's body is longer than the drain bound");
                        return;
                    }
                }
            }
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, read_all).await.is_err() {
            tracing::debug!("a refused upload's body took longer than the drain bound");
        }
    }
}

/// `POST /files`; a refusal goes out only after the rest of the body was drained (see the
/// module's notes).
async fn upload(
    state: &AgentState,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, HttpError> {
    let (parts, body) = req.into_parts();
    let body = SharedBody(Arc::new(Mutex::new(body)));
    let result = upload_from(state, &parts, body.stream()).await;
    if result.is_err() {
        body.drain().await;
    }
    result
}

async fn upload_from(
    state: &AgentState,
    req: &http::request::Parts,
    body: BoxStream<'static, Result<Bytes, MultipartError>>,
) -> Result<Response<ResponseBody>, HttpError> {
    let q = parse_query(req.uri.query())?;
    let user = request_user(state, &q)?;
    let metadata = Arc::new(parse_metadata(&req.headers)?);
    let content_type = req
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let encoding = req
        .headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
        .unwrap_or_default();
    let gzip = match encoding.as_str() {
        "" | "identity" => false,
        "gzip" | "x-gzip" => true,
        other => {
            return Err(HttpError::bad_request(format!(
                "unsupported Content-Encoding '{other}' (use gzip or none)"
            )));
        }
    };
    let results = match essence.as_str() {
        "application/octet-stream" => {
            let path = request_path(state, &user, q.path.as_deref())?;
            let mut body = body;
            let mut sink = FileSink::open(&user, path.clone(), gzip, metadata.clone());
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| HttpError::bad_request(e.0))?;
                sink.send(chunk).await?;
            }
            sink.finish().await?;
            vec![written(&path, &metadata)]
        }
        "multipart/form-data" => {
            if gzip {
                return Err(HttpError::bad_request(
                    "Content-Encoding gzip is supported for application/octet-stream uploads only",
                ));
            }
            let boundary = multipart::boundary(&content_type)?;
            let fixed = q
                .path
                .as_deref()
                .map(|p| request_path(state, &user, Some(p)))
                .transpose()?;
            let mut form = Multipart::new(body, &boundary);
            let mut seen = HashSet::new();
            let mut results = Vec::new();
            while let Some(part) = form.next_part().await? {
                if part.name.as_deref() != Some("file") {
                    continue;
                }
                let path = match &fixed {
                    Some(p) => p.clone(),
                    None => {
                        let raw = part
                            .filename
                            .as_deref()
                            .filter(|f| !f.is_empty())
                            .ok_or_else(|| {
                                HttpError::bad_request(
                                    "a file part has no filename and the request no 'path'",
                                )
                            })?;
                        paths::expand(raw, &user, &state.workdir_for(&user))?
                    }
                };
                if !seen.insert(path.clone()) {
                    return Err(HttpError::bad_request(format!(
                        "more than one file part is written to {path}"
                    )));
                }
                let mut sink = FileSink::open(&user, path.clone(), false, metadata.clone());
                while let Some(chunk) = form.read_chunk().await? {
                    sink.send(chunk).await?;
                }
                sink.finish().await?;
                results.push(written(&path, &metadata));
            }
            if results.is_empty() {
                return Err(HttpError::bad_request("the form has no 'file' part"));
            }
            results
        }
        _ => {
            return Err(HttpError::bad_request(format!(
                "unsupported Content-Type '{content_type}' (use multipart/form-data or application/octet-stream)"
            )));
        }
    };
    Ok(json_response(
        StatusCode::OK,
        &serde_json::Value::Array(results),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn negotiates_encodings() {
        let n = |v: &str| negotiate(&headers(&[("accept-encoding", v)]));
        assert_eq!(negotiate(&HeaderMap::new()), Some(Encoding::Identity));
        assert_eq!(n("gzip, deflate"), Some(Encoding::Gzip));
        assert_eq!(n("gzip"), Some(Encoding::Gzip));
        assert_eq!(n("deflate"), Some(Encoding::Identity));
        assert_eq!(n("gzip;q=0.5, identity"), Some(Encoding::Identity));
        assert_eq!(n("gzip;q=0"), Some(Encoding::Identity));
        assert_eq!(n("identity;q=0, gzip"), Some(Encoding::Gzip));
        assert_eq!(n("*;q=0"), None);
        assert_eq!(n("br, identity;q=0"), None);
        assert_eq!(n("*"), Some(Encoding::Gzip));
    }

    #[test]
    fn parses_queries() {
        let q = parse_query(Some(
            "path=%2Fhome%2Fa+b.txt&username=root&path=ignored&x=1",
        ))
        .expect("query");
        assert_eq!(q.path.as_deref(), Some("/home/a b.txt"));
        assert_eq!(q.username.as_deref(), Some("root"));
        assert!(parse_query(Some("path=%ff")).is_err());
    }

    #[test]
    fn validates_metadata() {
        let ok = parse_metadata(&headers(&[("x-metadata-Owner", "me"), ("x-other", "1")]))
            .expect("valid");
        assert_eq!(ok, vec![("owner".to_string(), "me".to_string())]);
        let long_key = format!("x-metadata-{}", "k".repeat(MAX_METADATA_KEY + 1));
        assert!(parse_metadata(&headers(&[(long_key.as_str(), "v")])).is_err());
        let big = "v".repeat(MAX_METADATA_TOTAL);
        assert!(parse_metadata(&headers(&[("x-metadata-a", big.as_str())])).is_err());
        let mut h = HeaderMap::new();
        h.insert(
            "x-metadata-a",
            HeaderValue::from_bytes(b"caf\xc3\xa9").expect("value"),
        );
        assert!(parse_metadata(&h).is_err());
    }

    #[test]
    fn unsized_files_are_read_whole_within_the_bound() {
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let read = |len: u64| {
            f.as_file().set_len(len).expect("set_len");
            let file = tokio::fs::File::from_std(std::fs::File::open(f.path()).expect("open"));
            rt.block_on(read_unsized(file, "f"))
        };
        assert_eq!(read(0).expect("empty").get_ref().len(), 0);
        assert_eq!(read(1000).expect("small").get_ref().len(), 1000);
        let at = read(MAX_UNSIZED_DOWNLOAD).expect("at the bound");
        assert_eq!(at.get_ref().len() as u64, MAX_UNSIZED_DOWNLOAD);
        let err = read(MAX_UNSIZED_DOWNLOAD + 1).expect_err("past the bound");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("longer than"), "{}", err.message);
    }

    #[test]
    fn dispositions() {
        assert_eq!(content_disposition("a.txt"), "inline; filename=\"a.txt\"");
        assert_eq!(
            content_disposition("caf\u{e9} \"x\".txt"),
            "inline; filename=\"caf_ _x_.txt\"; filename*=UTF-8''caf%C3%A9%20%22x%22.txt"
        );
    }
}
