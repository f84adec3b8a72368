//! Wire types of the files API that `moat_proto::v1` does not have yet. They follow the API's
//! documented shapes; when `v1` gains them, these become re-exports.

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
