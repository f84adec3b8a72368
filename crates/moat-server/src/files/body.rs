//! Upload bodies: the request body as a stream of chunks, cut off past the upload limit, with
//! the reason it failed kept for the handler (the stream's consumer, the agent client, only
//! sees that it failed).

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::Notify;

use crate::ApiError;
use crate::api::ApiResult;

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("upload larger than {limit} bytes"),
    )
}

/// Refuses a body whose declared `Content-Length` is over `limit` before reading any of it.
pub(crate) fn check_declared_length(headers: &HeaderMap, limit: u64) -> ApiResult<()> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(too_large(limit)),
        _ => Ok(()),
    }
}

/// Why an upload body failed, once it has; the handler waits on it beside the transfer.
#[derive(Debug, Default)]
pub(crate) struct Failure {
    error: Mutex<Option<ApiError>>,
    notify: Notify,
}

impl Failure {
    fn set(&self, e: ApiError) {
        *self.lock() = Some(e);
        // A permit is stored when nobody waits yet, so a later `wait` still wakes.
        self.notify.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ApiError>> {
        self.error.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The failure, if the body failed.
    pub(crate) fn take(&self) -> Option<ApiError> {
        self.lock().clone()
    }

    /// Waits until the body fails (forever if it never does).
    pub(crate) async fn wait(&self) -> ApiError {
        loop {
            if let Some(e) = self.take() {
                return e;
            }
            self.notify.notified().await;
        }
    }
}

/// The error an upload body stream ends with; the details are in its [`Failure`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BodyFailed(String);

/// `body` as a stream of chunks that fails once more than `limit` bytes came (413) or reading
/// the body fails (400), recording why in the returned [`Failure`].
pub(crate) fn limited(
    body: Body,
    limit: u64,
) -> (
    impl Stream<Item = Result<Bytes, BodyFailed>> + Send + 'static,
    Arc<Failure>,
) {
    let failure = Arc::new(Failure::default());
    let state = (body.into_data_stream(), 0u64, failure.clone(), false);
    let stream =
        futures_util::stream::unfold(state, move |(mut data, seen, failure, done)| async move {
            if done {
                return None;
            }
            let error = match data.next().await {
                None => return None,
                Some(Ok(chunk)) => {
                    let seen = seen.saturating_add(chunk.len() as u64);
                    if seen <= limit {
                        return Some((Ok(chunk), (data, seen, failure, false)));
                    }
                    too_large(limit)
                }
                Some(Err(e)) => ApiError::invalid(format!("reading the request body: {e}")),
            };
            let out = BodyFailed(error.message.clone());
            failure.set(error);
            Some((Err(out), (data, seen, failure, true)))
        });
    (stream, failure)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cuts_off_past_the_limit() {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"12345")),
            Ok(Bytes::from_static(b"678")),
        ];
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let (stream, failure) = limited(body, 6);
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        assert!(items[1].is_err());
        assert_eq!(failure.wait().await.status, StatusCode::PAYLOAD_TOO_LARGE);

        let body = Body::from(Bytes::from_static(b"123456"));
        let (stream, failure) = limited(body, 6);
        let items: Vec<_> = stream.collect().await;
        assert!(items.iter().all(Result::is_ok));
        assert!(failure.take().is_none());
    }

    #[test]
    fn declared_lengths() {
        let mut h = HeaderMap::new();
        assert!(check_declared_length(&h, 10).is_ok());
        h.insert(header::CONTENT_LENGTH, "10".parse().unwrap());
        assert!(check_declared_length(&h, 10).is_ok());
        h.insert(header::CONTENT_LENGTH, "11".parse().unwrap());
        assert_eq!(
            check_declared_length(&h, 10).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
