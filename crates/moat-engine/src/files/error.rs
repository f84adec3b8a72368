//! The file service's errors.

use crate::manager::ManagerError;

/// What a file operation can fail with: one variant per answer a front end gives. The text
/// is one sentence for people; [`FileError::code`] is the machine-readable part.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FileError {
    /// The sandbox itself could not be reached (none, another tenant's, not running, …).
    #[error(transparent)]
    Sandbox(#[from] ManagerError),
    /// Nothing is at the path.
    #[error("{0}")]
    NotFound(String),
    /// The sandbox user may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The path is in a state that does not allow this (it exists, it is busy).
    #[error("{0}")]
    Conflict(String),
    /// A directory is where a file was meant.
    #[error("{0}")]
    IsADirectory(String),
    /// Something other than a directory is where a directory was meant.
    #[error("{0}")]
    NotADirectory(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// `tar` refused the archive (or failed on it) for a reason other than space or permission.
    #[error("{0}")]
    TarFailed(String),
    /// The sandbox's disk (or its inodes) is full, or a file is over its size limit.
    #[error("{0}")]
    InsufficientStorage(String),
    /// The sandbox cannot do this (no `tar` in it, an agent without the call).
    #[error("{0}")]
    Unsupported(String),
    /// The agent failed or went away.
    #[error("{0}")]
    Unavailable(String),
    /// The transfer did not finish within its time limit.
    #[error("{0}")]
    Timeout(String),
    /// The upload is larger than allowed.
    #[error("{0}")]
    UploadTooLarge(String),
}

impl FileError {
    /// The machine-readable code of the error.
    pub fn code(&self) -> &'static str {
        match self {
            FileError::Sandbox(e) => e.code(),
            FileError::NotFound(_) => "not_found",
            FileError::Forbidden(_) => "forbidden",
            FileError::Conflict(_) => "conflict",
            FileError::IsADirectory(_) => "is_a_directory",
            FileError::NotADirectory(_) => "not_a_directory",
            FileError::Invalid(_) => "invalid",
            FileError::TarFailed(_) => "tar_failed",
            FileError::InsufficientStorage(_) => "insufficient_storage",
            FileError::Unsupported(_) => "unsupported",
            FileError::Unavailable(_) => "unavailable",
            FileError::Timeout(_) => "timeout",
            FileError::UploadTooLarge(_) => "payload_too_large",
        }
    }
}

/// Result of file operations.
pub type FileResult<T> = std::result::Result<T, FileError>;
