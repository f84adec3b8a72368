//! What every handler shares: the state, the result type, strict JSON bodies and query
//! decoding.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::{ApiError, AppState};

/// The state every handler gets.
pub(crate) type Shared = Arc<AppState>;
/// Result of the `/v1` handlers.
pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body strictly; `empty` is what an empty body means, if it may be empty.
pub(crate) fn json_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    empty: Option<T>,
) -> ApiResult<T> {
    let body = body?;
    if body.iter().all(u8::is_ascii_whitespace)
        && let Some(value) = empty
    {
        return Ok(value);
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

/// Form decoding of one query component: `+` is a space, then percent-escapes.
pub(crate) fn decode(text: &str) -> ApiResult<String> {
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::invalid(format!("query component {text:?} is not UTF-8")))
}

/// The `name=value` pairs of a raw query string, each side decoded by [`decode`]; empty pairs
/// are skipped and a pair without `=` has an empty value.
pub(crate) fn query_pairs(query: &str) -> impl Iterator<Item = ApiResult<(String, String)>> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        Ok((decode(name)?, decode(value)?))
    })
}

/// The `limit` of a `/v1` listing's query.
pub(crate) fn query_limit(value: &str) -> ApiResult<u32> {
    value
        .parse()
        .map_err(|_| ApiError::invalid(format!("limit {value:?} is not a non-negative number")))
}

/// The refusal of a query parameter a `/v1` route does not take; `known` lists those it does.
pub(crate) fn unknown_parameter(name: &str, known: &str) -> ApiError {
    ApiError::invalid(format!("unknown query parameter {name:?} (known: {known})"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use moat_proto::v1;

    #[test]
    fn bodies_are_strict() {
        let ok: v1::CreateSandbox =
            json_body(Ok(Bytes::new()), Some(v1::CreateSandbox::default())).unwrap();
        assert_eq!(ok, v1::CreateSandbox::default());
        let e = json_body::<v1::ExecRequest>(Ok(Bytes::from_static(b"")), None).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = json_body::<v1::ExecRequest>(Ok(Bytes::from_static(br#"{"command":"ls"}"#)), None)
            .unwrap_err();
        assert!(e.message.contains("unknown field"), "{}", e.message);
        let e = json_body::<v1::SetTimeout>(Ok(Bytes::from_static(b"{")), None).unwrap_err();
        assert_eq!(e.code, "invalid");
    }
}
