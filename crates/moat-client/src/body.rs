//! Bodies in both directions: [`Body`] streams an upload, [`ByteStream`] a download.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use http_body::{Body as _, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::error::{Error, Result};

/// Boxed error of upload bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type the HTTP client sends.
pub(crate) type RawBody = UnsyncBoxBody<Bytes, BoxError>;

/// A request body: bytes in memory, or streamed from a reader or a stream without being held
/// whole.
pub struct Body(pub(crate) RawBody);

impl Body {
    /// No body.
    pub fn empty() -> Body {
        Body(Empty::new().map_err(|never| match never {}).boxed_unsync())
    }

    /// Streams what `reader` yields until its end (a file, a pipe, a tar being written).
    pub fn from_reader(reader: impl AsyncRead + Send + 'static) -> Body {
        Body::from_stream(ReaderStream::new(reader))
    }

    /// Streams the chunks of `stream`; an error ends the upload and fails the call.
    pub fn from_stream(
        stream: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    ) -> Body {
        let frames = stream.map_ok(Frame::data).map_err(BoxError::from);
        Body(BodyExt::boxed_unsync(StreamBody::new(frames)))
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Body")
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Body {
        Body(
            Full::new(bytes)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
    }
}

impl From<Vec<u8>> for Body {
    fn from(bytes: Vec<u8>) -> Body {
        Body::from(Bytes::from(bytes))
    }
}

impl From<&'static [u8]> for Body {
    fn from(bytes: &'static [u8]) -> Body {
        Body::from(Bytes::from_static(bytes))
    }
}

impl From<String> for Body {
    fn from(text: String) -> Body {
        Body::from(Bytes::from(text))
    }
}

impl From<&'static str> for Body {
    fn from(text: &'static str) -> Body {
        Body::from(Bytes::from_static(text.as_bytes()))
    }
}

/// A response body read as it arrives (a downloaded file or tar archive, a command's event
/// stream). Also a [`Stream`] of chunks.
pub struct ByteStream {
    /// `None` for an empty body.
    body: Option<Incoming>,
    /// The server's URL, for errors.
    url: String,
}

impl std::fmt::Debug for ByteStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteStream")
            .field("url", &self.url)
            .finish()
    }
}

impl ByteStream {
    pub(crate) fn new(body: Incoming, url: String) -> ByteStream {
        ByteStream {
            body: Some(body),
            url,
        }
    }

    /// A stream with nothing in it.
    #[cfg(test)]
    pub(crate) fn empty(url: &str) -> ByteStream {
        ByteStream {
            body: None,
            url: url.to_owned(),
        }
    }

    /// The next chunk, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_chunk(cx)).await
    }

    /// Everything that is left, held in memory: meant for small files.
    pub async fn bytes(mut self) -> Result<Bytes> {
        let mut all = Vec::new();
        while let Some(chunk) = self.next_chunk().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(all))
    }

    /// Writes everything that is left to `out`, flushes it and returns the byte count.
    pub async fn write_to(mut self, out: &mut (impl AsyncWrite + Unpin)) -> Result<u64> {
        let mut written = 0u64;
        while let Some(chunk) = self.next_chunk().await? {
            out.write_all(&chunk).await?;
            written = written.saturating_add(chunk.len() as u64);
        }
        out.flush().await?;
        Ok(written)
    }

    /// The rest of the body as an [`AsyncRead`] (for a tar reader, a hash, a copy).
    pub fn into_reader(self) -> impl AsyncRead + Send + Unpin {
        StreamReader::new(self.map_err(std::io::Error::other))
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        loop {
            match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                None => return Poll::Ready(Ok(None)),
                Some(Err(e)) => {
                    return Poll::Ready(Err(Error::Transport {
                        url: self.url.clone(),
                        reason: format!("reading the answer: {}", crate::error::chain(&e)),
                    }));
                }
                // Trailers carry nothing the API uses: skip them.
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Poll::Ready(Ok(Some(data)));
                    }
                }
            }
        }
    }
}

impl Stream for ByteStream {
    type Item = Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_chunk(cx).map(Result::transpose)
    }
}
