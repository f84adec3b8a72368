//! The only crate in moat that makes namespaces, mounts, seccomp filters, landlock rulesets and
//! cgroups. Everything here is small and audited; every `unsafe` block says why it is sound.
//!
//! - [`confine`]: what a user process goes through between `fork` and `exec` inside a sandbox.
//! - [`seccomp`]: the syscall allow-list for user code and the deny-list for the agent.
//! - [`landlock`]: the filesystem ruleset for user code.

pub mod caps;
pub mod confine;
pub mod landlock;
pub mod seccomp;
pub mod sys;

/// Errors of the jail, each naming the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// The step, with its argument.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A request or configuration the jail refuses.
    #[error("{0}")]
    Invalid(String),
    /// The seccomp filter could not be compiled.
    #[error("seccomp filter: {0}")]
    Seccomp(String),
}

impl JailError {
    /// An OS error from `what`, taken from `errno`.
    pub fn last_os(what: impl Into<String>) -> Self {
        JailError::Os {
            what: what.into(),
            source: std::io::Error::last_os_error(),
        }
    }

    /// An OS error from `what`.
    pub fn os(what: impl Into<String>, source: std::io::Error) -> Self {
        JailError::Os {
            what: what.into(),
            source,
        }
    }
}

/// Result of jail operations.
pub type Result<T> = std::result::Result<T, JailError>;
