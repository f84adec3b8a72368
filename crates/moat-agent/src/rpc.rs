//! Errors every agent service answers with, named by their Connect codes.

use std::fmt;

pub use moat_proto::connect::Code;

/// An error answered to an RPC: a Connect code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// The Connect code.
    pub code: Code,
    /// What failed, and with what.
    pub message: String,
}

impl RpcError {
    /// An error with the given code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// Maps an OS error on `what` (usually a path) to the closest Connect code.
    pub fn from_io(err: &std::io::Error, what: &str) -> Self {
        use std::io::ErrorKind as K;
        let code = match err.kind() {
            K::NotFound => Code::NotFound,
            // The template's read-only system directories (/usr, /etc, …).
            K::PermissionDenied | K::ReadOnlyFilesystem => Code::PermissionDenied,
            // The path is in a state that forbids the call (a running program, a mount
            // point, a directory with entries): the caller's to change.
            K::ResourceBusy | K::ExecutableFileBusy | K::DirectoryNotEmpty | K::TooManyLinks => {
                Code::Aborted
            }
            K::AlreadyExists => Code::AlreadyExists,
            K::InvalidInput | K::InvalidFilename | K::NotADirectory | K::IsADirectory => {
                Code::InvalidArgument
            }
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => Code::ResourceExhausted,
            K::TimedOut => Code::DeadlineExceeded,
            _ if err.raw_os_error() == Some(libc::ELOOP) => Code::FailedPrecondition,
            _ => Code::Internal,
        };
        RpcError::new(code, format!("{what}: {err}"))
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for RpcError {}
