//! What can go wrong with an image, in terms a user can act on.

/// An image that could not be had, and why.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference, or something the image holds, is malformed (400).
    #[error("{0}")]
    Invalid(String),
    /// The registry has no such repository, tag or digest (404).
    #[error("{0}")]
    NotFound(String),
    /// The registry refused the credentials, or asked for some and none were configured.
    #[error("{0}")]
    Unauthorized(String),
    /// The registry could not be reached (DNS, connection, TLS, time-out).
    #[error("{0}")]
    Unreachable(String),
    /// The image exists but not for linux/amd64, or uses a format moat does not read.
    #[error("{0}")]
    Unsupported(String),
    /// Something the registry sent does not match its digest or its declared size.
    #[error("{0}")]
    Tampered(String),
    /// The image is larger than the configured limit.
    #[error("{0}")]
    TooLarge(String),
    /// The registry answered something else that is wrong.
    #[error("{0}")]
    Registry(String),
    /// The data dir has no room for the image above its free-space reserve (507).
    #[error("{0}")]
    InsufficientStorage(String),
    /// A local failure (disk).
    #[error("{0}")]
    Io(String),
}

impl ImageError {
    /// A local I/O failure while doing `what`.
    pub fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ImageError {
        ImageError::Io(format!("{what}: {e}"))
    }
}
