//! Upload bodies: the request body as a stream of chunks, cut off past the upload limit, with
//! the reason it failed kept in an [`UploadFailure`] for the file service (the stream's
//! consumer, the agent client, only sees that it failed).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use moat_engine::files::{BodyFailed, FileError, UploadFailure};

use crate::extract::ApiResult;

fn too_large(limit: u64) -> FileError {
    FileError::UploadTooLarge(format!("upload larger than {limit} bytes"))
}

/// Refuses a body whose declared `Content-Length` is over `limit` before reading any of it.
pub(crate) fn check_declared_length(headers: &HeaderMap, limit: u64) -> ApiResult<()> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(too_large(limit).into()),
        _ => Ok(()),
    }
}

/// `body` as a stream of chunks that fails once more than `limit` bytes came (413) or reading
/// the body fails (400), recording why in the returned [`UploadFailure`].
pub(crate) fn limited(
    body: Body,
    limit: u64,
) -> (
    impl Stream<Item = Result<Bytes, BodyFailed>> + Send + 'static,
    Arc<UploadFailure>,
) {
    let failure = Arc::new(UploadFailure::default());
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
                Some(Err(e)) => FileError::Invalid(format!("reading the request body: {e}")),
            };
            let out = BodyFailed(error.to_string());
            failure.set(error);
            Some((Err(out), (data, seen, failure, true)))
        });
    (stream, failure)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

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
        assert!(matches!(failure.wait().await, FileError::UploadTooLarge(_)));

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
