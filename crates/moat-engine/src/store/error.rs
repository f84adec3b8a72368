//! Errors of the store.

use std::path::PathBuf;

/// What went wrong in the store, typed so the server can pick the HTTP status without parsing text.
///
/// A wrapped error (OS, SQLite) is part of the message and not an error source, so a chain
/// printed with `{:#}` shows it once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An id, name or value given by the caller is malformed.
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        /// Which kind of value (`tenant id`, `template name`, …).
        what: &'static str,
        /// The offending value, as given.
        value: String,
        /// What a valid one looks like.
        reason: String,
    },
    /// A JSON value does not have the required shape.
    #[error("bad JSON for {what}: {reason}")]
    BadJson {
        /// Which value (`template spec`, `sandbox resources`, …).
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The record does not exist, or belongs to another tenant (which must look the same).
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// Which kind of record (`tenant`, `key`, `template`, `sandbox`).
        kind: &'static str,
        /// The id or name that was looked up.
        id: String,
    },
    /// A record with this id or name already exists.
    #[error("{kind} {id:?} already exists")]
    Conflict {
        /// Which kind of record.
        kind: &'static str,
        /// The id or name that is taken.
        id: String,
    },
    /// The template is used by sandboxes that have not ended, and deletion was not forced.
    #[error(
        "template {name:?} is used by {sandboxes} active sandbox(es); delete them first or force"
    )]
    TemplateInUse {
        /// The template's name.
        name: String,
        /// How many starting, running or paused sandboxes use it.
        sandboxes: u64,
    },
    /// The snapshot is what templates start from, so it cannot be deleted.
    #[error(
        "snapshot {id} is what template {} starts from; delete the template first",
        .templates.join(", ")
    )]
    SnapshotInUse {
        /// The snapshot.
        id: String,
        /// The templates that start from it.
        templates: Vec<String>,
    },
    /// A tenant's template would be a tag of a built-in one, whose tags are the server's.
    #[error(
        "template {name:?} would be a tag of the built-in template {base:?}, whose tags only \
         an admin key writes (POST /v1/templates/{base}/tags); choose another name"
    )]
    TagOfBuiltIn {
        /// The name asked for.
        name: String,
        /// The built-in template it is a tag of.
        base: String,
    },
    /// A tenant tried to delete a built-in template.
    #[error("template {name:?} is built in and cannot be deleted by a tenant")]
    BuiltIn {
        /// The template's name.
        name: String,
    },
    /// Recording the sandbox would take its key or tenant over a quota.
    #[error("{}", quota_text(.what, *.limit, *.used, *.requested))]
    QuotaExceeded {
        /// Which quota (`concurrent sandboxes`, `memory bytes`, `pids`, `snapshot bytes`); a
        /// name ending in ` bytes` has its amounts written as sizes (`1G`, `512M`).
        what: &'static str,
        /// The limit.
        limit: u64,
        /// What is in use now.
        used: u64,
        /// What the new sandbox would add.
        requested: u64,
    },
    /// The sandbox's state machine does not allow this change.
    #[error("sandbox {id:?} cannot go from {from} to {to}")]
    InvalidTransition {
        /// The sandbox.
        id: String,
        /// Its current state.
        from: super::SandboxState,
        /// The state that was asked for.
        to: super::SandboxState,
    },
    /// The sandbox has ended (killed or failed), so it cannot be changed any more.
    #[error("sandbox {id:?} has ended ({state})")]
    Ended {
        /// The sandbox.
        id: String,
        /// Its final state.
        state: super::SandboxState,
    },
    /// The database was written by a newer moat, whose schema this build does not know.
    #[error(
        "database {path:?} has schema version {found}, newer than the {supported} this moat knows; \
         upgrade moat or use another data dir"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// The version found in the file.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The file is an SQLite database of some other program.
    #[error("{path:?} is not a moat database (its SQLite application id is {application_id:#x})")]
    NotMoat {
        /// The database file.
        path: PathBuf,
        /// The application id found in the file.
        application_id: i64,
    },
    /// SQLite would not put the database in WAL mode, which concurrent reads rely on.
    #[error(
        "database {path:?} stays in journal mode {mode:?}, not WAL (no shared memory on this filesystem?)"
    )]
    NoWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// A row holds a value this build cannot read (hand-edited or corrupted database).
    #[error("corrupt database: {0}")]
    Corrupt(String),
    /// The operating system's random number generator failed.
    #[error("cannot get random bytes from the OS: {0}")]
    Random(getrandom::Error),
    /// A filesystem operation on the database file failed.
    #[error("{what} {path:?}: {error}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// SQLite failed (I/O error, disk full, locked beyond the busy timeout, …).
    #[error("database: {0}")]
    Sqlite(rusqlite::Error),
}

// By hand rather than `#[from]`, which would make the SQLite error a source as well as part of
// the message: printed with `{:#}`, the chain would show it twice.
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

impl StoreError {
    pub(crate) fn invalid(what: &'static str, value: &str, reason: impl Into<String>) -> Self {
        // Bound the echoed value: it may be a megabyte of garbage from a request body.
        let value = if value.len() > 80 {
            let mut end = 80;
            while !value.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &value[..end])
        } else {
            value.to_owned()
        };
        StoreError::Invalid {
            what,
            value,
            reason: reason.into(),
        }
    }

    pub(crate) fn not_found(kind: &'static str, id: &str) -> Self {
        StoreError::NotFound {
            kind,
            id: id.to_owned(),
        }
    }

    pub(crate) fn conflict(kind: &'static str, id: &str) -> Self {
        StoreError::Conflict {
            kind,
            id: id.to_owned(),
        }
    }
}

/// Result of store operations.
pub type StoreResult<T> = std::result::Result<T, StoreError>;

/// A quota error as one sentence, amounts of bytes in the units requests use (`1G`, `512M`).
fn quota_text(what: &str, limit: u64, used: u64, requested: u64) -> String {
    let (name, amount): (&str, fn(u64) -> String) = match what.strip_suffix(" bytes") {
        Some(name) => (name, size_text),
        None => (what, |n| n.to_string()),
    };
    format!(
        "quota exceeded: the {name} limit is {}, {} is in use and {} more was requested",
        amount(limit),
        amount(used),
        amount(requested)
    )
}

/// A byte count as a size: exact (`2G`, `512M`, `100`) when it is a whole number of a unit,
/// else to one decimal (`1.5G`).
use moat_proto::units::format_size_approx as size_text;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_errors_use_sizes_for_bytes() {
        let e = StoreError::QuotaExceeded {
            what: "memory bytes",
            limit: 1 << 30,
            used: 512 << 20,
            requested: 2 << 30,
        };
        assert_eq!(
            e.to_string(),
            "quota exceeded: the memory limit is 1G, 512M is in use and 2G more was requested"
        );
        let e = StoreError::QuotaExceeded {
            what: "concurrent sandboxes",
            limit: 1,
            used: 1,
            requested: 1,
        };
        assert_eq!(
            e.to_string(),
            "quota exceeded: the concurrent sandboxes limit is 1, 1 is in use and 1 more was requested"
        );
        assert_eq!(size_text(1536 << 20), "1536M");
        assert_eq!(size_text(1_500_000_000), "1.4G");
        assert_eq!(size_text(100), "100");
        assert_eq!(size_text(0), "0");
    }
}
