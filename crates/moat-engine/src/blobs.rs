//! Blob storage for jobs: inputs uploaded by callers, outputs and logs jobs keep.
//!
//! Blobs are content-addressed: `sha256/<hex>` under the store's root, which is a local
//! directory (`<data-dir>/blobs` by default) or S3-compatible storage named by URL
//! (`s3://bucket/prefix`, configured from the usual `AWS_*` variables), both through the
//! `object_store` crate. A blob is first written under `tmp/` while its digest is computed
//! ([`BlobStore::stage`]), then moved to its name ([`BlobStore::commit`]) before the store of
//! record names it, so that a row never names a missing object; collection (which deletes an
//! object no row names) is kept out meanwhile by the jobs' collection lock. On a local
//! directory the object and its directory are synced before the commit returns: a blob
//! acknowledged survives a power loss. The store is one server's: objects its records do not
//! name are deleted, so two servers must not share a bucket prefix.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};

/// Where blobs are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobLocation {
    /// A local directory.
    Dir(PathBuf),
    /// An `s3://bucket/prefix` URL; endpoint, region and credentials come from `AWS_*`
    /// variables (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`, …).
    Url(String),
}

/// Why a blob could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The blob is larger than it may be.
    #[error("larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit, bytes.
        limit: u64,
    },
    /// The body being stored failed (the caller's connection, the sandbox's file).
    #[error("reading the blob's content: {0}")]
    Body(String),
    /// No such blob.
    #[error("blob {0} not found")]
    NotFound(String),
    /// The store failed.
    #[error("blob store: {0}")]
    Store(String),
}

fn store_error(e: object_store::Error) -> BlobError {
    match e {
        object_store::Error::NotFound { path, .. } => BlobError::NotFound(path),
        e => BlobError::Store(e.to_string()),
    }
}

/// A blob written under `tmp/`, not yet under its name.
#[derive(Debug)]
pub struct Staged {
    tmp: StorePath,
    /// Its digest, `sha256:<hex>`.
    pub digest: String,
    /// Its size, bytes.
    pub size: u64,
}

/// The blob store.
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// The directory, when the store is local (objects are synced there).
    local_root: Option<PathBuf>,
    describe: String,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

/// Whether `digest` is a blob digest, `sha256:` and 64 lowercase hex digits.
pub fn is_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

fn object_path(digest: &str) -> Result<StorePath, BlobError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if is_digest(digest) => Ok(StorePath::from(format!("sha256/{hex}"))),
        _ => Err(BlobError::NotFound(digest.to_owned())),
    }
}

impl BlobStore {
    /// Opens the store at `location` (a local directory is made if missing). Its opener is its
    /// only user: what a local store staged before (a server stopped mid-upload) is removed,
    /// including the pieces of unfinished writes, which listings do not show.
    pub fn open(location: &BlobLocation) -> Result<BlobStore, String> {
        match location {
            BlobLocation::Dir(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                let staged = dir.join("tmp");
                match std::fs::remove_dir_all(&staged) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("removing {}: {e}", staged.display())),
                }
                let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| format!("blob directory {}: {e}", dir.display()))?;
                Ok(BlobStore {
                    store: Arc::new(store),
                    local_root: Some(dir.clone()),
                    describe: format!("blobs in {}", dir.display()),
                })
            }
            BlobLocation::Url(url) => {
                let rest = url.strip_prefix("s3://").ok_or_else(|| {
                    format!(
                        "blob store {url:?}: only s3:// URLs (or a local directory) are supported"
                    )
                })?;
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(format!("blob store {url:?} names no bucket"));
                }
                crate::tls::install_provider();
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| format!("blob store {url:?}: {e}"))?;
                let prefix = prefix.trim_matches('/');
                let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
                };
                Ok(BlobStore {
                    store,
                    local_root: None,
                    describe: format!("blobs in {url}"),
                })
            }
        }
    }

    /// Writes `body` under `tmp/` while hashing it; more than `limit` bytes is
    /// [`BlobError::TooLarge`] (and nothing is left behind).
    pub async fn stage<S, E>(&self, body: S, limit: u64) -> Result<Staged, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let name =
            crate::store::generate_snapshot_id().map_err(|e| BlobError::Store(e.to_string()))?;
        let tmp = StorePath::from(format!("tmp/{name}"));
        let upload = self.store.put_multipart(&tmp).await.map_err(store_error)?;
        let mut writer = WriteMultipart::new(upload);
        let mut hash = Sha256::new();
        let mut size = 0u64;
        let mut body = std::pin::pin!(body);
        let failed = loop {
            let chunk = match body.next().await {
                None => break None,
                Some(Err(e)) => break Some(BlobError::Body(e.to_string())),
                Some(Ok(chunk)) => chunk,
            };
            size += chunk.len() as u64;
            if size > limit {
                break Some(BlobError::TooLarge { limit });
            }
            hash.update(&chunk);
            if let Err(e) = writer.wait_for_capacity(4).await {
                break Some(store_error(e));
            }
            writer.put(chunk);
        };
        if let Some(e) = failed {
            let _ = writer.abort().await;
            return Err(e);
        }
        writer.finish().await.map_err(store_error)?;
        Ok(Staged {
            tmp,
            digest: format!("sha256:{:x}", hash.finalize()),
            size,
        })
    }

    /// Free bytes of the file system under a local store; `None` for a remote one (or where
    /// it cannot be read).
    pub fn local_free_bytes(&self) -> Option<u64> {
        crate::disk::free_disk(self.local_root.as_ref()?).ok()
    }

    /// Moves `staged` to its name (a blob of that digest already there is the same bytes).
    pub async fn commit(&self, staged: &Staged) -> Result<(), BlobError> {
        let to = object_path(&staged.digest)?;
        self.store
            .rename(&staged.tmp, &to)
            .await
            .map_err(store_error)?;
        if let Some(root) = &self.local_root {
            let (file, dir) = (root.join(to.as_ref()), root.join("sha256"));
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                std::fs::File::open(&file)?.sync_all()?;
                std::fs::File::open(&dir)?.sync_all()
            })
            .await
            .map_err(|e| BlobError::Store(format!("sync task: {e}")))?
            .map_err(|e| BlobError::Store(format!("syncing a blob: {e}")))?;
        }
        Ok(())
    }

    /// Removes `staged` without committing it.
    pub async fn discard(&self, staged: Staged) {
        if let Err(e) = self.store.delete(&staged.tmp).await {
            tracing::warn!("removing a staged blob: {e}");
        }
    }

    /// Blob `digest`: its size and its bytes as a stream.
    pub async fn read(
        &self,
        digest: &str,
    ) -> Result<(u64, BoxStream<'static, Result<Bytes, BlobError>>), BlobError> {
        let got = self
            .store
            .get(&object_path(digest)?)
            .await
            .map_err(store_error)?;
        let size = got.meta.size;
        Ok((size, got.into_stream().map_err(store_error).boxed()))
    }

    /// Deletes blob `digest`'s object (one already gone is not an error).
    pub async fn delete(&self, digest: &str) -> Result<(), BlobError> {
        match self.store.delete(&object_path(digest)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(e)),
        }
    }

    /// The digests of the blobs in the store.
    pub async fn digests(&self) -> Result<Vec<String>, BlobError> {
        self.store
            .list(Some(&StorePath::from("sha256")))
            .map_ok(|meta| {
                let name = meta.location.filename().unwrap_or_default();
                format!("sha256:{name}")
            })
            .try_filter(|digest| std::future::ready(is_digest(digest)))
            .try_collect()
            .await
            .map_err(store_error)
    }

    /// Removes what was staged more than `age` ago and never committed (a server stopped in
    /// the middle); how many.
    pub async fn sweep_staged(&self, age: Duration) -> Result<usize, BlobError> {
        let before = chrono_now() - age;
        let old: Vec<StorePath> = self
            .store
            .list(Some(&StorePath::from("tmp")))
            .try_filter(|meta| std::future::ready(system_time(meta) < before))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(store_error)?;
        for path in &old {
            let _ = self.store.delete(path).await;
        }
        Ok(old.len())
    }
}

fn chrono_now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

fn system_time(meta: &object_store::ObjectMeta) -> std::time::SystemTime {
    meta.last_modified.into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_blob_is_named_by_its_digest_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&BlobLocation::Dir(dir.path().into())).unwrap();
        let body = futures_util::stream::iter([
            Ok::<_, std::io::Error>(Bytes::from_static(b"hello ")),
            Ok(Bytes::from_static(b"world")),
        ]);
        let staged = store.stage(body, 100).await.unwrap();
        assert_eq!(
            staged.digest,
            "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        store.commit(&staged).await.unwrap();
        let (size, data) = store.read(&staged.digest).await.unwrap();
        assert_eq!(size, 11);
        let data: Vec<Bytes> = data.try_collect().await.unwrap();
        assert_eq!(data.concat(), b"hello world");

        let big =
            futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 101]))]);
        assert!(matches!(
            store.stage(big, 100).await,
            Err(BlobError::TooLarge { limit: 100 })
        ));
        assert!(
            !dir.path().join("tmp").exists()
                || std::fs::read_dir(dir.path().join("tmp"))
                    .unwrap()
                    .next()
                    .is_none()
        );
        assert!(matches!(
            store.read("sha256:../../etc/passwd").await,
            Err(BlobError::NotFound(_))
        ));
        store.delete(&staged.digest).await.unwrap();
        assert!(matches!(
            store.read(&staged.digest).await,
            Err(BlobError::NotFound(_))
        ));
    }
}
