//! Errors of the engine.

/// What went wrong, in a form every surface (CLI, API) can turn into a clear message and status.
///
/// A wrapped OS error is part of the message and not an error source, so a chain printed with
/// `{:#}` shows it once.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is invalid (bad limit, bad id, unknown template, …).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The sandbox does not exist (any more).
    #[error("not found: {0}")]
    NotFound(String),
    /// The backend cannot do this.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The isolation backend failed (what its own error said, as text: the engine knows no
    /// backend's error types).
    #[error("{0}")]
    Backend(String),
    /// The agent inside the sandbox failed or misbehaved.
    #[error("agent: {0}")]
    Agent(String),
    /// An I/O error on the host.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        error: std::io::Error,
    },
}

impl EngineError {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>, error: std::io::Error) -> Self {
        EngineError::Io {
            what: what.into(),
            error,
        }
    }
}

/// Result of engine operations.
pub type Result<T> = std::result::Result<T, EngineError>;
