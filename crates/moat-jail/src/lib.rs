//! The only crate in moat that makes namespaces, mounts, seccomp filters, landlock rulesets and
//! cgroups. Everything here is small and audited; every `unsafe` block says why it is sound.
//!
//! - [`spawn`]: starting a sandbox's first process in fresh namespaces, on its own root.
//! - [`outer`]: the outer jail of a runtime with isolation of its own (gVisor's runsc).
//! - [`rootfs`]: what that root looks like (host template, directory templates, `/proc`, `/dev`).
//! - [`cgroup`]: memory, pids and cpu limits, freeze, kill-all, on cgroup v1 and v2.
//! - [`id`]: sandbox ids, checked before they name a path.
//! - [`idmap`]: a host uid/gid range per sandbox.
//! - [`memfd`]: the agent binary as a sealed in-memory copy.
//! - [`runtime`]: the host runtime directory.
//! - [`confine`]: what a user process goes through between `fork` and `exec` inside a sandbox.
//! - [`seccomp`], [`landlock`], [`caps`]: the pieces of that confinement; [`bpf`] generates the
//!   seccomp filters.
//! - [`egress`]: a sandbox's network namespace made into one where every connection ends at
//!   moat.
//! - [`probe`]: what this host supports, for `moat check`.

pub mod bpf;
pub mod caps;
pub mod cgroup;
pub mod confine;
pub mod egress;
pub mod guardian;
pub mod id;
pub mod idmap;
pub mod kept;
pub mod landlock;
pub mod memfd;
pub mod orphans;
pub mod outer;
pub mod probe;
pub mod rootfs;
pub mod runtime;
pub mod seccomp;
pub mod spawn;
mod stack;
pub mod sys;

/// Errors of the jail, each naming the step that failed.
///
/// A wrapped OS error is part of the message and not an error source, so a chain printed with
/// `{:#}` shows it once (the convention of every moat error type).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call failed.
    #[error("{what}: {error}")]
    Os {
        /// The step, with its argument.
        what: String,
        /// The OS error.
        error: std::io::Error,
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
            error: std::io::Error::last_os_error(),
        }
    }

    /// An OS error from `what`.
    pub fn os(what: impl Into<String>, error: std::io::Error) -> Self {
        JailError::Os {
            what: what.into(),
            error,
        }
    }
}

/// Result of jail operations.
pub type Result<T> = std::result::Result<T, JailError>;
