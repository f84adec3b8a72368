//! Files inside a sandbox: upload and download (streamed), list, stat, mkdir, remove, move,
//! and whole directories as tar archives.

use std::path::Path;

use http::Method;

use crate::body::{Body, ByteStream};
use crate::client::Client;
use crate::error::Result;
use crate::path::{Query, seg};
use crate::types::{FileEntry, FileList, MakeDir, MoveFile};

/// Content type of tar archives in both directions.
const TAR: &str = "application/x-tar";
/// Content type of plain file contents.
const OCTETS: &str = "application/octet-stream";

impl Client {
    fn files_path(id: &str, rest: &str, q: Query) -> String {
        format!("/v1/sandboxes/{}/files{rest}{}", seg(id), q.as_str())
    }

    /// Writes `body` to the file `path` in the sandbox (created or replaced, with missing
    /// parent directories), streaming it.
    pub async fn upload(&self, id: &str, path: &str, body: impl Into<Body>) -> Result<FileEntry> {
        let url = Client::files_path(id, "", Query::default().add("path", path));
        let resp = self
            .send(
                Method::PUT,
                &url,
                body.into(),
                Some(OCTETS),
                "application/json",
            )
            .await?;
        self.read_json(resp).await
    }

    /// Uploads the local file `local` to `path` in the sandbox.
    pub async fn upload_file(
        &self,
        id: &str,
        path: &str,
        local: impl AsRef<Path>,
    ) -> Result<FileEntry> {
        let file = tokio::fs::File::open(local.as_ref()).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("{}: {e}", local.as_ref().display()))
        })?;
        self.upload(id, path, Body::from_reader(file)).await
    }

    /// The contents of the file `path`, streamed.
    pub async fn download(&self, id: &str, path: &str) -> Result<ByteStream> {
        let url = Client::files_path(id, "", Query::default().add("path", path));
        let resp = self
            .send(Method::GET, &url, Body::empty(), None, OCTETS)
            .await?;
        Ok(self.stream(resp))
    }

    /// Extracts the tar archive `tar` into the directory `dir` in the sandbox (made if
    /// missing), streaming it; returns the directory.
    pub async fn upload_tar(&self, id: &str, dir: &str, tar: impl Into<Body>) -> Result<FileEntry> {
        let url = Client::files_path(
            id,
            "",
            Query::default().add("path", dir).add("format", "tar"),
        );
        let resp = self
            .send(Method::PUT, &url, tar.into(), Some(TAR), "application/json")
            .await?;
        self.read_json(resp).await
    }

    /// The directory `dir` (or the file) as a tar archive, streamed; entry names are relative
    /// to `dir`.
    pub async fn download_tar(&self, id: &str, dir: &str) -> Result<ByteStream> {
        let url = Client::files_path(
            id,
            "",
            Query::default().add("path", dir).add("format", "tar"),
        );
        let resp = self
            .send(Method::GET, &url, Body::empty(), None, TAR)
            .await?;
        Ok(self.stream(resp))
    }

    /// The entries of the directory `path`, down to `depth` levels (the server's default, 1,
    /// when `None`).
    pub async fn list_files(
        &self,
        id: &str,
        path: &str,
        depth: Option<u32>,
    ) -> Result<Vec<FileEntry>> {
        let depth = depth.map(|d| d.to_string());
        let q = Query::default()
            .add("path", path)
            .opt("depth", depth.as_deref());
        let list: FileList = self
            .json(
                Method::GET,
                &Client::files_path(id, "/list", q),
                None::<&()>,
            )
            .await?;
        Ok(list.entries)
    }

    /// What `path` is (without following a final symbolic link).
    pub async fn stat(&self, id: &str, path: &str) -> Result<FileEntry> {
        let q = Query::default().add("path", path);
        self.json(
            Method::GET,
            &Client::files_path(id, "/stat", q),
            None::<&()>,
        )
        .await
    }

    /// Makes the directory `path` with its missing parents (an existing directory is fine)
    /// and returns it.
    pub async fn mkdir(&self, id: &str, path: &str) -> Result<FileEntry> {
        let body = MakeDir {
            path: path.to_owned(),
        };
        self.json(
            Method::POST,
            &Client::files_path(id, "/mkdir", Query::default()),
            Some(&body),
        )
        .await
    }

    /// Removes the file or directory (with its contents) `path`.
    pub async fn remove(&self, id: &str, path: &str) -> Result<()> {
        let q = Query::default().add("path", path);
        self.call(Method::DELETE, &Client::files_path(id, "", q), None::<&()>)
            .await
    }

    /// Moves (renames) `from` to `to`, making `to`'s missing parents, and returns what is now
    /// at `to`.
    pub async fn move_path(&self, id: &str, from: &str, to: &str) -> Result<FileEntry> {
        let body = MoveFile {
            from: from.to_owned(),
            to: to.to_owned(),
        };
        self.json(
            Method::POST,
            &Client::files_path(id, "/move", Query::default()),
            Some(&body),
        )
        .await
    }
}
