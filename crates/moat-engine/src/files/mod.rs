//! A sandbox's files, reached through its agent, which does every operation inside the sandbox
//! as the sandbox user (or root when asked). Nothing here resolves a sandbox path on the host.
//!
//! File contents stream in both directions: a download is the agent's body passed on chunk by
//! chunk, an upload is the caller's stream passed on to the agent the same way, so the host
//! holds neither in memory. Directories travel as tar archives made and unpacked by `tar`
//! inside the sandbox (see `files/tar.rs`).
//!
//! Every call takes the [`Caller`] (whose tenant must own the sandbox) and answers with a
//! [`FileError`], a domain error each front end maps to its own answer.

mod error;
mod tar;
mod upload;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use moat_proto::connect::Code;
use moat_proto::filesystem::{EntryInfo, FileType as WireType};
use moat_proto::v1;

use crate::agent_client::{AgentClient, AgentError};
use crate::auth::Caller;
use crate::manager::{CallGuard, SandboxAgent, SandboxManager};

pub use error::{FileError, FileResult};
pub use tar::TAR_TIMEOUT;
pub use upload::{BodyFailed, UploadFailure};

/// Largest upload (a file, or a tar archive) one request may carry; more is refused. The
/// sandbox's disk limit applies as well. The same as the largest file a sandbox process may
/// write (`RLIMIT_FSIZE`).
pub const MAX_UPLOAD_BYTES: u64 = 4 << 30;

/// Deepest listing [`FileService::list`] walks (`depth` is 1 to this; the agent also caps a
/// listing at 100,000 entries).
pub const MAX_LIST_DEPTH: u32 = 32;

/// How contents travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// The file's own bytes.
    #[default]
    Raw,
    /// A directory as a tar archive.
    Tar,
}

/// A stream of bytes going out to the caller; an error ends it early (the transfer is then
/// incomplete, never silently truncated).
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// What a download answers.
pub enum Download {
    /// A regular file: its size, then its bytes.
    File {
        /// The file's size in bytes.
        size: u64,
        /// Its contents.
        body: ByteStream,
    },
    /// A directory as a tar archive, of a size not known in advance.
    Archive {
        /// The archive.
        body: ByteStream,
    },
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Download::File { size, .. } => f.debug_struct("File").field("size", size).finish(),
            Download::Archive { .. } => f.write_str("Archive"),
        }
    }
}

/// What an upload writes: the caller's body as a stream, which fails with [`BodyFailed`] when
/// the body does, and the [`UploadFailure`] that then says why.
#[derive(Debug)]
pub struct UploadBody<S> {
    /// The bytes.
    pub data: S,
    /// Why `data` failed, once it has.
    pub failure: Arc<UploadFailure>,
}

/// The files of the sandboxes of one [`SandboxManager`] (see [`SandboxManager::files`]).
#[derive(Debug, Clone)]
pub struct FileService {
    manager: SandboxManager,
}

impl SandboxManager {
    /// The files service over this manager's sandboxes.
    pub fn files(&self) -> FileService {
        FileService {
            manager: self.clone(),
        }
    }
}

impl FileService {
    /// The agent of the caller's sandbox `id` (not found for none, conflict when not running).
    async fn agent(&self, caller: &Caller, id: &str) -> FileResult<SandboxAgent> {
        Ok(self.manager.agent(caller, id).await?)
    }

    /// The entry at `path` as `user`.
    pub async fn stat(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> FileResult<v1::FileEntry> {
        let client = self.agent(caller, id).await?;
        let entry = client.stat(path, user).await.map_err(agent_error)?;
        Ok(file_entry(entry))
    }

    /// The file at `path` (`Format::Raw`: a regular file) or the directory at `path`
    /// (`Format::Tar`: as an archive), read as `user`.
    pub async fn download(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        format: Format,
        user: Option<&str>,
    ) -> FileResult<Download> {
        let client = self.agent(caller, id).await?;
        let entry = client.stat(path, user).await.map_err(agent_error)?;
        if format == Format::Tar {
            if !is_dir(&entry) {
                return Err(not_a_directory(&entry.path));
            }
            let SandboxAgent { client, call } = client;
            let body = held(tar::download(client, &entry.path, user).await?, call);
            return Ok(Download::Archive { body });
        }
        if is_dir(&entry) {
            return Err(FileError::IsADirectory(format!(
                "{} is a directory (download a directory with format=tar)",
                entry.path
            )));
        }
        let file = client
            .read_file_stream(&entry.path, user)
            .await
            .map_err(agent_error)?;
        let size = file.size();
        let body = Box::pin(futures_util::StreamExt::map(file.into_stream(), |r| {
            r.map_err(std::io::Error::other)
        }));
        Ok(Download::File {
            size,
            body: held(body, client.call),
        })
    }

    /// Writes `body` to the file at `path` (`Format::Raw`) or unpacks the archive in `body`
    /// into the directory `path`, made if missing (`Format::Tar`), as `user`; answers with
    /// what is at `path` then.
    pub async fn upload<S>(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        format: Format,
        user: Option<&str>,
        body: UploadBody<S>,
    ) -> FileResult<v1::FileEntry>
    where
        S: Stream<Item = Result<Bytes, BodyFailed>> + Send + 'static,
    {
        let UploadBody { data, failure } = body;
        let client = self.agent(caller, id).await?;
        if format == Format::Tar {
            return tar::upload(client.client.clone(), path, user, data, failure).await;
        }
        if let Some(existing) = stat_opt(&client, path, user).await?
            && is_dir(&existing)
        {
            return Err(FileError::IsADirectory(format!(
                "{} is a directory (upload a directory with format=tar)",
                existing.path
            )));
        }
        let written = tokio::select! {
            r = client.write_file_stream(path, user, data) => r.map_err(agent_error),
            e = failure.wait() => Err(e),
        };
        // A failed body makes the agent's side fail too; the body's failure is the cause.
        let error = match (failure.take(), written) {
            (Some(e), _) | (None, Err(e)) => e,
            (None, Ok(())) => {
                let entry = client.stat(path, user).await.map_err(agent_error)?;
                return Ok(file_entry(entry));
            }
        };
        // Over the limit or out of space, the file was opened and holds a fragment of what the
        // caller meant (taking space that is short): leave none. Other failures may not have
        // touched the file at all, so it is left alone.
        if matches!(
            error,
            FileError::UploadTooLarge(_) | FileError::InsufficientStorage(_)
        ) && let Err(err) = client.remove(path, user).await
        {
            tracing::warn!(path, "removing the remains of a failed upload: {err}");
        }
        Err(error)
    }

    /// Removes what is at `path` (a directory with everything in it) as `user`; not found
    /// when nothing is there.
    pub async fn remove(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> FileResult<()> {
        let client = self.agent(caller, id).await?;
        // The agent removes a missing path without complaint; the caller hears it was not there.
        let entry = client.stat(path, user).await.map_err(agent_error)?;
        client.remove(&entry.path, user).await.map_err(agent_error)
    }

    /// The entries of directory `path`, `depth` levels down (1 to [`MAX_LIST_DEPTH`]).
    pub async fn list(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        depth: u32,
        user: Option<&str>,
    ) -> FileResult<Vec<v1::FileEntry>> {
        if !(1..=MAX_LIST_DEPTH).contains(&depth) {
            return Err(FileError::Invalid(format!(
                "depth {depth} must be 1 to {MAX_LIST_DEPTH}"
            )));
        }
        let client = self.agent(caller, id).await?;
        let dir = client.stat(path, user).await.map_err(agent_error)?;
        if !is_dir(&dir) {
            return Err(not_a_directory(&dir.path));
        }
        let entries = client
            .list_dir(path, depth, user)
            .await
            .map_err(|e| match e {
                AgentError::TooLarge { .. } => too_big_listing(depth),
                e if e.code() == Code::ResourceExhausted => too_big_listing(depth),
                e => agent_error(e),
            })?;
        Ok(entries.into_iter().map(file_entry).collect())
    }

    /// Makes directory `path` (and its parents) as `user`: the directory, and whether it was
    /// made (`false`: it already was one, so making a directory is idempotent). Something
    /// else at `path` is [`FileError::NotADirectory`].
    pub async fn make_dir(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> FileResult<(bool, v1::FileEntry)> {
        if path.is_empty() {
            return Err(FileError::Invalid("path must not be empty".into()));
        }
        let client = self.agent(caller, id).await?;
        let (made, entry) = make_dir(&client, path, user).await?;
        Ok((made, file_entry(entry)))
    }

    /// Moves (renames) `from` to `to` as `user`, and answers with the entry at `to`.
    pub async fn move_entry(
        &self,
        caller: &Caller,
        id: &str,
        from: &str,
        to: &str,
        user: Option<&str>,
    ) -> FileResult<v1::FileEntry> {
        if from.is_empty() || to.is_empty() {
            return Err(FileError::Invalid("from and to must not be empty".into()));
        }
        let client = self.agent(caller, id).await?;
        let entry = client
            .move_entry(from, to, user)
            .await
            .map_err(agent_error)?;
        Ok(file_entry(entry))
    }
}

/// `body`, counted as a call under way (which a pause waits for) until it ends or is dropped.
fn held(body: ByteStream, call: CallGuard) -> ByteStream {
    Box::pin(futures_util::StreamExt::map(body, move |chunk| {
        let _ = &call;
        chunk
    }))
}

/// The domain error for an agent's failure on a file operation.
pub(crate) fn agent_error(e: AgentError) -> FileError {
    let message = agent_message(&e);
    match e.code() {
        Code::NotFound => FileError::NotFound(message),
        Code::PermissionDenied => FileError::Forbidden(message),
        Code::AlreadyExists | Code::Aborted => FileError::Conflict(message),
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unauthenticated => FileError::Invalid(message),
        // What a write hits when the sandbox's disk (or its inodes) is full.
        Code::ResourceExhausted => FileError::InsufficientStorage(message),
        Code::Unimplemented => FileError::Unsupported(message),
        _ => FileError::Unavailable(message),
    }
}

/// What an agent error says, without the agent's framing for an error it answered.
pub(crate) fn agent_message(e: &AgentError) -> String {
    match e {
        AgentError::Rpc { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// The API's form of an agent's entry.
fn file_entry(e: EntryInfo) -> v1::FileEntry {
    // The agent marks a link by its target, as envd does (`is_symlink` from newer agents too).
    let link = e.is_symlink || e.symlink_target.is_some();
    let kind = if link {
        v1::FileType::Symlink
    } else {
        match WireType::try_from(e.r#type) {
            Ok(WireType::File) => v1::FileType::File,
            Ok(WireType::Directory) => v1::FileType::Dir,
            _ => v1::FileType::Other,
        }
    };
    let modified_at = e.modified_time.map_or(0, |t| {
        t.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(t.nanos) / 1_000_000)
    });
    v1::FileEntry {
        name: e.name,
        path: e.path,
        kind,
        size: u64::try_from(e.size).unwrap_or(0),
        mode: e.mode & 0o7777,
        owner: e.owner,
        group: e.group,
        modified_at,
        symlink_target: if link { e.symlink_target } else { None },
    }
}

/// Whether `e` is a directory, or a symbolic link to one.
fn is_dir(e: &EntryInfo) -> bool {
    e.r#type == WireType::Directory as i32
}

fn not_a_directory(path: &str) -> FileError {
    FileError::NotADirectory(format!("{path} exists and is not a directory"))
}

fn too_big_listing(depth: u32) -> FileError {
    FileError::Invalid(format!(
        "the listing at depth {depth} is too large to answer at once; list with a smaller depth"
    ))
}

/// The entry at `path`, or `None` when there is none.
async fn stat_opt(
    client: &AgentClient,
    path: &str,
    user: Option<&str>,
) -> FileResult<Option<EntryInfo>> {
    match client.stat(path, user).await {
        Ok(e) => Ok(Some(e)),
        Err(e) if e.code() == Code::NotFound => Ok(None),
        Err(e) => Err(agent_error(e)),
    }
}

/// Makes directory `path` (and its parents): whether it was made (else it already existed),
/// and the directory.
async fn make_dir(
    client: &AgentClient,
    path: &str,
    user: Option<&str>,
) -> FileResult<(bool, EntryInfo)> {
    match client.make_dir(path, user).await {
        Ok(entry) => Ok((true, entry)),
        Err(e) => match stat_opt(client, path, user).await? {
            Some(existing) if is_dir(&existing) => Ok((false, existing)),
            Some(existing) => Err(not_a_directory(&existing.path)),
            None => Err(agent_error(e)),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_map_to_domain_errors() {
        let rpc = |code| AgentError::Rpc {
            code,
            message: "m".into(),
        };
        for (code, expected) in [
            (Code::NotFound, "not_found"),
            (Code::PermissionDenied, "forbidden"),
            (Code::AlreadyExists, "conflict"),
            (Code::InvalidArgument, "invalid"),
            (Code::ResourceExhausted, "insufficient_storage"),
            (Code::Unimplemented, "unsupported"),
            (Code::Internal, "unavailable"),
        ] {
            assert_eq!(agent_error(rpc(code)).code(), expected, "{code:?}");
        }
        let e = agent_error(AgentError::Transport("gone".into()));
        assert_eq!(e.code(), "unavailable");
        assert_eq!(agent_error(rpc(Code::NotFound)).to_string(), "m");
    }

    #[test]
    fn entries_convert() {
        let link = EntryInfo {
            name: "l".into(),
            path: "/tmp/l".into(),
            r#type: WireType::Directory as i32,
            size: 4,
            mode: 0o755,
            // Marked by its target only, as the agent (and envd) sends a link.
            is_symlink: false,
            symlink_target: Some("/tmp/d".into()),
            modified_time: Some(pbjson_types::Timestamp {
                seconds: 2,
                nanos: 500_000_000,
            }),
            ..Default::default()
        };
        let e = file_entry(link);
        assert_eq!(e.kind, v1::FileType::Symlink);
        assert_eq!(e.symlink_target.as_deref(), Some("/tmp/d"));
        assert_eq!(e.modified_at, 2500);
        let fifo = EntryInfo {
            r#type: WireType::Unspecified as i32,
            ..Default::default()
        };
        let e = file_entry(fifo);
        assert_eq!(e.kind, v1::FileType::Other);
        assert_eq!(e.symlink_target, None);
    }
}
