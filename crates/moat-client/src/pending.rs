//! Wire types of the files API and of streaming exec that `moat_proto::v1` does not have yet.
//! They follow the API's documented shapes; when `v1` gains them, these become re-exports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What kind of file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (a device, a socket, a pipe).
    Other,
}

/// One file in a sandbox, as listed or stated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its last path component.
    pub name: String,
    /// Its absolute path.
    pub path: String,
    /// Its kind.
    #[serde(rename = "type")]
    pub kind: FileType,
    /// Its size, bytes.
    pub size: u64,
    /// Its permission bits (`0o644` is 420).
    pub mode: u32,
    /// Its owner's name.
    pub owner: String,
    /// Its group's name.
    pub group: String,
    /// When it was last modified, Unix milliseconds.
    pub modified_at: i64,
    /// Where it points, for a symbolic link.
    pub symlink_target: Option<String>,
}

/// `GET /v1/sandboxes/{id}/files/list`: a directory's entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileList {
    /// The entries.
    pub entries: Vec<FileEntry>,
}

/// `POST /v1/sandboxes/{id}/files/mkdir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MakeDir {
    /// The directory to make, with its missing parents.
    pub path: String,
}

/// `POST /v1/sandboxes/{id}/files/move`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveFile {
    /// What to move.
    pub from: String,
    /// Where to.
    pub to: String,
}

/// How a streamed command's output is carried in its events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputEncoding {
    /// As UTF-8 text, invalid bytes replaced (the server's default).
    #[default]
    Utf8,
    /// As base64 of the exact bytes.
    Base64,
}

/// `POST /v1/sandboxes/{id}/exec`: run one command, buffered or streamed.
///
/// Exactly one of `cmd` and `shell` is given; at most one of `stdin` and `stdin_b64`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// A script for `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Text written to the command's standard input, which is then closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Bytes (base64) written to the command's standard input, which is then closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
    /// Environment variables of this command (over the sandbox's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory; the sandbox's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `user` (uid 1000) or `root`; the sandbox's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Seconds after which the command and its process group are killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// How output is carried (in a result's `stdout`/`stderr` and in a stream's events).
    #[serde(default, skip_serializing_if = "is_utf8")]
    pub encoding: OutputEncoding,
}

fn is_utf8(e: &OutputEncoding) -> bool {
    *e == OutputEncoding::Utf8
}

/// How a streamed command ended: the last event of its stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEnd {
    /// The exit code; `null` when a signal killed it or it timed out.
    pub exit_code: Option<i32>,
    /// How it ended when not by exiting (`signal: killed`).
    pub signal: Option<String>,
    /// Wall time from start to end, milliseconds.
    pub duration_ms: u64,
    /// Its timeout passed and its process group was killed.
    pub timed_out: bool,
    /// The kernel's OOM killer killed a process of the sandbox while it ran.
    pub oom_killed: bool,
}

/// One line of a streamed exec (`Accept: application/x-ndjson`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ExecEvent {
    /// The command started.
    Start {
        /// Its process id inside the sandbox.
        pid: u32,
    },
    /// Output on standard output.
    Stdout {
        /// Text, or base64 with [`OutputEncoding::Base64`].
        data: String,
    },
    /// Output on standard error.
    Stderr {
        /// Text, or base64 with [`OutputEncoding::Base64`].
        data: String,
    },
    /// It ended; the last line.
    End(ExecEnd),
    /// The stream failed; the last line.
    Error(moat_proto::v1::ErrorDetail),
}
