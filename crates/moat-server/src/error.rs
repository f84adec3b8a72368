//! The API's error answers: a status and a JSON [`v1::ErrorBody`].

use axum::Json;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use moat_engine::files::FileError;
use moat_engine::manager::ManagerError;
use moat_proto::v1;

/// An error as the API answers it: status, machine-readable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The `error.code` of the body.
    pub code: &'static str,
    /// The `error.message` of the body.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid`.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    /// 401 `unauthenticated`.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

/// Marks a response as a JSON error with this code, so the request middleware can count it
/// (`moat_errors_total`) without reading the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ErrorCode(pub(crate) &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = v1::ErrorBody {
            error: v1::ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        response.extensions_mut().insert(ErrorCode(self.code));
        response
    }
}

/// The HTTP status every surface (`/v1`, the E2B API) answers an engine error with: the one
/// place a domain error becomes a status.
pub fn status_of(e: &ManagerError) -> StatusCode {
    match e {
        ManagerError::Invalid(_) => StatusCode::BAD_REQUEST,
        ManagerError::NotFound(_) => StatusCode::NOT_FOUND,
        ManagerError::Conflict(_) => StatusCode::CONFLICT,
        ManagerError::Forbidden(_) => StatusCode::FORBIDDEN,
        ManagerError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        ManagerError::QuotaExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
        ManagerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        ManagerError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ManagerError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        ManagerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ManagerError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
    }
}

/// The HTTP status of a file service error (see [`status_of`] for the sandbox's own errors).
pub fn file_status_of(e: &FileError) -> StatusCode {
    match e {
        FileError::Sandbox(e) => status_of(e),
        FileError::NotFound(_) => StatusCode::NOT_FOUND,
        FileError::Forbidden(_) => StatusCode::FORBIDDEN,
        FileError::Conflict(_) | FileError::IsADirectory(_) | FileError::NotADirectory(_) => {
            StatusCode::CONFLICT
        }
        FileError::Invalid(_) | FileError::TarFailed(_) => StatusCode::BAD_REQUEST,
        FileError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
        FileError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
        FileError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        FileError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        FileError::UploadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        ApiError::new(status_of(&e), e.code(), e.to_string())
    }
}

impl From<FileError> for ApiError {
    fn from(e: FileError) -> Self {
        ApiError::new(file_status_of(&e), e.code(), e.to_string())
    }
}

impl ApiError {
    /// A body that could not be read, on a route whose body limit is `limit` bytes.
    pub fn body(r: BytesRejection, limit: usize) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body larger than {limit} bytes"),
            )
        } else {
            ApiError::invalid(format!("reading the request body: {}", r.body_text()))
        }
    }
}

impl From<BytesRejection> for ApiError {
    /// A body rejected under the router's default limit, [`crate::MAX_BODY_BYTES`].
    fn from(r: BytesRejection) -> Self {
        ApiError::body(r, crate::MAX_BODY_BYTES)
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::invalid(format!("bad path: {}", r.body_text()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn manager_errors_keep_status_and_code() {
        let e = ApiError::from(ManagerError::NotFound("sandbox x".into()));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.code, "not_found");
        let e = ApiError::from(ManagerError::QuotaExceeded("too many".into()));
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.message, "too many");
        let e = ApiError::from(ManagerError::Unauthenticated("who".into()));
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert_eq!(e.code, "unauthenticated");
    }

    #[test]
    fn file_errors_keep_status_and_code() {
        for (e, status, code) in [
            (FileError::NotFound("m".into()), 404, "not_found"),
            (FileError::Forbidden("m".into()), 403, "forbidden"),
            (FileError::Conflict("m".into()), 409, "conflict"),
            (FileError::IsADirectory("m".into()), 409, "is_a_directory"),
            (FileError::NotADirectory("m".into()), 409, "not_a_directory"),
            (FileError::Invalid("m".into()), 400, "invalid"),
            (FileError::TarFailed("m".into()), 400, "tar_failed"),
            (
                FileError::InsufficientStorage("m".into()),
                507,
                "insufficient_storage",
            ),
            (FileError::Unsupported("m".into()), 501, "unsupported"),
            (FileError::Unavailable("m".into()), 503, "unavailable"),
            (FileError::Timeout("m".into()), 504, "timeout"),
            (
                FileError::UploadTooLarge("m".into()),
                413,
                "payload_too_large",
            ),
            (ManagerError::Conflict("m".into()).into(), 409, "conflict"),
        ] {
            let e = ApiError::from(e);
            assert_eq!((e.status.as_u16(), e.code), (status, code));
            assert_eq!(e.message, "m");
        }
    }
}
