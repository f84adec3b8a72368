//! An answer's body that holds something (a count of requests in flight) until the body has
//! been sent to its end or dropped, whichever comes first: what a request holds lasts as long
//! as its answer, not just as long as its handler.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http_body::Frame;

/// `body`, holding `held` while it lives.
pub(crate) struct HeldBody<H> {
    body: Body,
    _held: H,
}

/// `response` with its body holding `held` until it is sent or dropped.
pub(crate) fn hold<H: Send + Unpin + 'static>(response: Response, held: H) -> Response {
    response.map(|body| Body::new(HeldBody { body, _held: held }))
}

impl<H: Unpin> http_body::Body for HeldBody<H> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
