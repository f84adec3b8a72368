//! Connect over HTTP/2 for the agent's RPCs: codecs, reading request messages within the size
//! cap, unary and streaming responses, errors, deadlines and keepalives.

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use moat_proto::connect::{self, Code, EnvelopeDecoder, ErrorBody};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::rpc::RpcError;

/// The body type of every response the agent sends.
pub type ResponseBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;

/// Largest request message the agent accepts (a unary body, or one envelope's payload), 16 MiB.
/// Bigger messages are answered with `resource_exhausted` before they are buffered.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Keepalive interval when the request sets none (upstream envd's default).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// Longest keepalive interval honoured; larger (or invalid) values get [`DEFAULT_KEEPALIVE`].
pub const MAX_KEEPALIVE_SECS: u64 = 24 * 3600;

/// Deadline of unary calls that send no `Connect-Timeout-Ms`, so that no call runs forever.
pub const DEFAULT_UNARY_TIMEOUT: Duration = Duration::from_secs(600);

/// Encoded frames a streaming response may queue before its producer waits for the client.
const FRAME_QUEUE: usize = 2;

/// A message both codecs can carry: prost for binary, pbjson (canonical JSON) for JSON.
pub trait Message:
    prost::Message + Serialize + DeserializeOwned + Default + Send + 'static
{
}
impl<T: prost::Message + Serialize + DeserializeOwned + Default + Send + 'static> Message for T {}

/// A Connect codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Proto3 canonical JSON.
    Json,
    /// Binary protobuf.
    Proto,
}

impl Codec {
    /// Decodes a request message.
    pub fn decode<M: Message>(self, bytes: &[u8]) -> Result<M, RpcError> {
        match self {
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| {
                RpcError::new(Code::InvalidArgument, format!("invalid JSON message: {e}"))
            }),
            Codec::Proto => M::decode(bytes).map_err(|e| {
                RpcError::new(
                    Code::InvalidArgument,
                    format!("invalid protobuf message: {e}"),
                )
            }),
        }
    }

    /// Encodes a response message.
    pub fn encode<M: Message>(self, msg: &M) -> Vec<u8> {
        match self {
            // The generated serializers only fail on non-string map keys, which these
            // messages do not have.
            Codec::Json => serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()),
            Codec::Proto => msg.encode_to_vec(),
        }
    }

    fn unary_content_type(self) -> &'static str {
        match self {
            Codec::Json => connect::CONTENT_TYPE_JSON,
            Codec::Proto => connect::CONTENT_TYPE_PROTO,
        }
    }

    fn stream_content_type(self) -> &'static str {
        match self {
            Codec::Json => connect::CONTENT_TYPE_CONNECT_JSON,
            Codec::Proto => connect::CONTENT_TYPE_CONNECT_PROTO,
        }
    }
}

/// The shape of an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One message each way.
    Unary,
    /// One request message, a stream of responses.
    ServerStream,
    /// A stream of request messages, one response.
    ClientStream,
}

impl Kind {
    /// Whether the call uses envelopes (and end-stream errors).
    pub fn is_streaming(self) -> bool {
        self != Kind::Unary
    }
}

/// What the headers of a call say.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// The RPC's shape.
    pub kind: Kind,
    /// The codec of request and response.
    pub codec: Codec,
    /// `Connect-Timeout-Ms`, as an instant.
    pub deadline: Option<Instant>,
    /// `Keepalive-Ping-Interval`.
    pub keepalive: Duration,
}

impl Call {
    /// Reads the call's headers. A content type that does not fit `kind` is answered with 415;
    /// other problems with a Connect error in the call's own framing.
    pub fn parse(kind: Kind, headers: &HeaderMap) -> Result<Call, Box<Response<ResponseBody>>> {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let base = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let codec = match (kind.is_streaming(), base.as_str()) {
            (false, connect::CONTENT_TYPE_JSON) => Codec::Json,
            (false, connect::CONTENT_TYPE_PROTO) => Codec::Proto,
            (true, connect::CONTENT_TYPE_CONNECT_JSON) => Codec::Json,
            (true, connect::CONTENT_TYPE_CONNECT_PROTO) => Codec::Proto,
            _ => {
                let mut resp = plain(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("unsupported content type {ct:?} for this RPC"),
                );
                resp.headers_mut().insert(
                    http::header::HeaderName::from_static("accept-post"),
                    HeaderValue::from_static(if kind.is_streaming() {
                        "application/connect+json, application/connect+proto"
                    } else {
                        "application/json, application/proto"
                    }),
                );
                return Err(Box::new(resp));
            }
        };
        let fail = |e: RpcError| Box::new(error_response(kind, codec, &e));
        let encoding_header = if kind.is_streaming() {
            connect::HEADER_CONTENT_ENCODING
        } else {
            header::CONTENT_ENCODING.as_str()
        };
        for enc in headers.get_all(encoding_header) {
            let enc = enc.to_str().unwrap_or("?");
            if !enc.eq_ignore_ascii_case("identity") {
                return Err(fail(RpcError::new(
                    Code::Unimplemented,
                    format!("unsupported compression {enc:?}: only identity is accepted"),
                )));
            }
        }
        let deadline = match headers.get(connect::HEADER_TIMEOUT_MS) {
            None => None,
            Some(v) => {
                let timeout = v
                    .to_str()
                    .map_err(|_| connect::InvalidTimeout("<not text>".into()))
                    .and_then(connect::parse_timeout_ms)
                    .map_err(|e| fail(RpcError::new(Code::InvalidArgument, e.to_string())))?;
                Some(Instant::now() + timeout)
            }
        };
        let keepalive = headers
            .get(connect::HEADER_KEEPALIVE_INTERVAL)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|s| (1..=MAX_KEEPALIVE_SECS).contains(s))
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_KEEPALIVE);
        Ok(Call {
            kind,
            codec,
            deadline,
            keepalive,
        })
    }

    /// The deadline of a unary call: the header's, else [`DEFAULT_UNARY_TIMEOUT`].
    pub fn unary_deadline(&self) -> Instant {
        self.deadline
            .unwrap_or_else(|| Instant::now() + DEFAULT_UNARY_TIMEOUT)
    }
}

/// A response with a complete body.
pub fn full(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut resp = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

/// A plain (non-Connect) JSON error, as upstream envd answers outside RPCs:
/// `{"code": <status>, "message": "..."}`.
pub fn plain(status: StatusCode, message: impl Into<String>) -> Response<ResponseBody> {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message.into() });
    full(status, "application/json", body.to_string())
}

/// A response with no body.
pub fn empty(status: StatusCode) -> Response<ResponseBody> {
    let mut resp = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp
}

/// A unary Connect error: the code's HTTP status and a JSON error body.
pub fn unary_error(err: &RpcError) -> Response<ResponseBody> {
    let status =
        StatusCode::from_u16(err.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    full(
        status,
        connect::CONTENT_TYPE_JSON,
        ErrorBody::new(err.code, err.message.clone()).to_json(),
    )
}

/// An error in the framing of `kind`: a unary error, or HTTP 200 with only an end-stream error.
pub fn error_response(kind: Kind, codec: Codec, err: &RpcError) -> Response<ResponseBody> {
    if kind.is_streaming() {
        full(
            StatusCode::OK,
            codec.stream_content_type(),
            connect::end_stream_error(err.code, &err.message),
        )
    } else {
        unary_error(err)
    }
}

/// A successful unary response.
pub fn unary_ok<M: Message>(codec: Codec, msg: &M) -> Response<ResponseBody> {
    full(
        StatusCode::OK,
        codec.unary_content_type(),
        codec.encode(msg),
    )
}

/// Reads a unary request message, refusing bodies above [`MAX_MESSAGE_BYTES`].
pub async fn read_unary<M: Message>(body: Incoming, codec: Codec) -> Result<M, RpcError> {
    codec.decode(&read_unary_bytes(body).await?)
}

/// Reads a unary request body, refusing bodies above [`MAX_MESSAGE_BYTES`].
pub async fn read_unary_bytes(body: Incoming) -> Result<Bytes, RpcError> {
    let bytes = Limited::new(body, MAX_MESSAGE_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                RpcError::new(
                    Code::ResourceExhausted,
                    format!("request message exceeds the limit of {MAX_MESSAGE_BYTES} bytes"),
                )
            } else {
                RpcError::new(Code::Canceled, format!("reading the request: {e}"))
            }
        })?
        .to_bytes();
    Ok(bytes)
}

/// The request messages of a streaming call, decoded one envelope at a time.
pub fn read_stream<M: Message>(
    body: Incoming,
    codec: Codec,
) -> BoxStream<'static, Result<M, RpcError>> {
    struct St {
        body: Incoming,
        dec: EnvelopeDecoder,
        done: bool,
    }
    let st = St {
        body,
        dec: EnvelopeDecoder::new(MAX_MESSAGE_BYTES),
        done: false,
    };
    stream::unfold(st, move |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            match st.dec.next_envelope() {
                Ok(Some(env)) if env.is_end_stream() => {
                    st.done = true;
                    return Some((
                        Err(RpcError::new(
                            Code::InvalidArgument,
                            "protocol error: end-stream envelope in a request",
                        )),
                        st,
                    ));
                }
                Ok(Some(env)) => {
                    let msg = codec.decode(&env.payload);
                    return Some((msg, st));
                }
                Ok(None) => {}
                Err(e) => {
                    st.done = true;
                    return Some((Err(RpcError::new(e.code(), e.to_string())), st));
                }
            }
            match st.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        st.dec.push(&data);
                    }
                }
                Some(Err(e)) => {
                    st.done = true;
                    return Some((
                        Err(RpcError::new(
                            Code::Canceled,
                            format!("reading the request: {e}"),
                        )),
                        st,
                    ));
                }
                None => {
                    st.done = true;
                    return match st.dec.finish() {
                        Ok(()) => None,
                        Err(e) => Some((Err(RpcError::new(e.code(), e.to_string())), st)),
                    };
                }
            }
        }
    })
    .boxed()
}

/// Reads the single request message of a server-streaming call.
pub async fn read_single<M: Message>(body: Incoming, codec: Codec) -> Result<M, RpcError> {
    let mut messages = read_stream::<M>(body, codec);
    match messages.next().await {
        Some(msg) => msg,
        None => Err(RpcError::new(
            Code::InvalidArgument,
            "the request stream holds no message",
        )),
    }
}

/// A streaming response: `items` framed as envelopes, ended by the end-stream envelope (`{}`, or
/// the first error). While no item comes for `keepalive.0`, `keepalive.1` is sent. At `deadline`
/// the stream ends with `deadline_exceeded`. When the client goes away, `items` is dropped.
pub fn stream_response<M, S>(
    codec: Codec,
    items: S,
    keepalive: Option<(Duration, M)>,
    deadline: Option<Instant>,
) -> Response<ResponseBody>
where
    M: Message,
    S: Stream<Item = Result<M, RpcError>> + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(FRAME_QUEUE);
    tokio::spawn(produce(codec, items, keepalive, deadline, tx));
    let frames = stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(codec.stream_content_type()),
    );
    resp
}

async fn produce<M, S>(
    codec: Codec,
    mut items: S,
    keepalive: Option<(Duration, M)>,
    deadline: Option<Instant>,
    tx: mpsc::Sender<Bytes>,
) where
    M: Message,
    S: Stream<Item = Result<M, RpcError>> + Unpin,
{
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    let deadline_at = deadline.unwrap_or(far);
    let interval = keepalive.as_ref().map(|k| k.0);
    let next_keepalive = |now: Instant| interval.map_or(far, |i| now + i);
    let mut keepalive_at = next_keepalive(Instant::now());
    loop {
        let frame = tokio::select! {
            biased;
            _ = tx.closed() => return,
            _ = tokio::time::sleep_until(deadline_at), if deadline.is_some() => {
                let _ = tx
                    .send(connect::end_stream_error(
                        Code::DeadlineExceeded,
                        "context deadline exceeded",
                    ))
                    .await;
                return;
            }
            item = items.next() => match item {
                Some(Ok(msg)) => {
                    keepalive_at = next_keepalive(Instant::now());
                    connect::encode_envelope(connect::FLAG_MESSAGE, &codec.encode(&msg))
                }
                Some(Err(e)) => {
                    let _ = tx.send(connect::end_stream_error(e.code, &e.message)).await;
                    return;
                }
                None => {
                    let _ = tx.send(connect::end_stream_ok()).await;
                    return;
                }
            },
            _ = tokio::time::sleep_until(keepalive_at), if interval.is_some() => {
                keepalive_at = next_keepalive(Instant::now());
                match &keepalive {
                    Some((_, msg)) => connect::encode_envelope(connect::FLAG_MESSAGE, &codec.encode(msg)),
                    None => continue,
                }
            }
        };
        if tx.send(frame).await.is_err() {
            return;
        }
    }
}

/// The response of a client-streaming call: one message and `{}`, or an end-stream error.
pub fn single_response<M: Message>(
    codec: Codec,
    result: Result<M, RpcError>,
) -> Response<ResponseBody> {
    let body = match result {
        Ok(msg) => {
            let mut out =
                connect::encode_envelope(connect::FLAG_MESSAGE, &codec.encode(&msg)).to_vec();
            out.extend_from_slice(&connect::end_stream_ok());
            Bytes::from(out)
        }
        Err(e) => connect::end_stream_error(e.code, &e.message),
    };
    full(StatusCode::OK, codec.stream_content_type(), body)
}
