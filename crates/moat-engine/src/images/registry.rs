//! Talking to a registry: an image's manifest resolved for linux/amd64 (through an index when
//! the tag names several platforms), its configuration read, and its blobs fetched to disk.
//! Every manifest and blob is checked against its digest and its declared size before
//! anything uses it; credentials stay in the server and go only to the registry they are for.

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
/// A blob's description in a manifest (media type, digest, size).
pub use oci_client::manifest::OciDescriptor;
use oci_client::manifest::{self, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWrite;

use super::reference::is_sha256_digest;
use super::{ImageError, ImageRef};

/// The largest manifest or image configuration read, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// The most layers an image may have (Docker's own limit is 127 above the base).
pub const MAX_LAYERS: usize = 128;

/// How long connecting to a registry may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a registry may send nothing in the middle of an answer.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The public registries any key may pull from unless the operator says otherwise.
pub const PUBLIC_REGISTRIES: &[&str] = &[
    "docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "gcr.io",
    "mcr.microsoft.com",
    "public.ecr.aws",
];

/// How the server reaches registries: which ones speak plain HTTP, the credentials of each
/// (keyed by registry host, as written in references), and which ones keys that are not
/// admins may name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryAccess {
    /// Registries (`host:port`) reached over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// Credentials by registry.
    pub credentials: BTreeMap<String, Credentials>,
    /// Registries any key may pull from; admin keys may pull from every registry. The server
    /// connects wherever a reference points, so an open list would let a tenant make it reach
    /// hosts on its own network.
    pub open_to_tenants: Vec<String>,
}

impl Default for RegistryAccess {
    fn default() -> RegistryAccess {
        RegistryAccess {
            insecure: Vec::new(),
            credentials: BTreeMap::new(),
            open_to_tenants: PUBLIC_REGISTRIES.iter().map(|r| (*r).to_owned()).collect(),
        }
    }
}

impl RegistryAccess {
    /// Whether a key that is not an admin may pull from `registry`.
    pub fn open_to_tenants(&self, registry: &str) -> bool {
        self.open_to_tenants.iter().any(|r| r == registry)
    }
}

/// The parts of an image configuration moat reads (OCI image spec, `config.json`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ImageConfigFile {
    /// The CPU architecture the image is for.
    pub architecture: String,
    /// The operating system the image is for.
    pub os: String,
    /// How a container of it runs.
    #[serde(default)]
    pub config: RunConfig,
    /// Its layers' digests once decompressed.
    pub rootfs: RootFs,
}

/// How a container of the image runs.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// `NAME=value` entries.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// The program and its first arguments.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// The default command (or arguments to the entrypoint).
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// The working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// The user (`name`, `uid`, `uid:gid`, `name:group`).
    #[serde(default)]
    pub user: Option<String>,
}

/// The layers' uncompressed digests.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// One per layer, base first.
    pub diff_ids: Vec<String>,
}

/// An image as its registry describes it, checked.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The digest of its (single-platform) manifest.
    pub digest: String,
    /// The manifest.
    pub manifest: OciImageManifest,
    /// Its configuration.
    pub config: ImageConfigFile,
}

/// How a layer's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// A gzipped tar.
    Gzip,
}

impl Compression {
    /// The compression of a layer of media type `media_type`, or why it cannot be read.
    pub fn of(media_type: &str) -> Result<Compression, ImageError> {
        match media_type {
            manifest::IMAGE_LAYER_MEDIA_TYPE | manifest::IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE => {
                Ok(Compression::None)
            }
            manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE
            | manifest::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE => Ok(Compression::Gzip),
            other => Err(ImageError::Unsupported(format!(
                "layers of media type {other} are not supported (plain and gzipped tar are)"
            ))),
        }
    }
}

/// Manifest media types asked for, single-platform and index forms.
const MANIFEST_TYPES: &[&str] = &[
    manifest::OCI_IMAGE_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_MEDIA_TYPE,
    manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// A connection to the registry of one image reference.
pub struct Registry {
    client: oci_client::Client,
    auth: RegistryAuth,
    reference: ImageRef,
}

impl Registry {
    /// A client for `reference`'s registry: plain HTTP for loopback and `access.insecure`
    /// registries, HTTPS otherwise; its credentials when `access` has some.
    pub fn new(reference: &ImageRef, access: &RegistryAccess) -> Registry {
        crate::tls::install_provider();
        let registry = reference.registry().to_owned();
        let plain = reference.is_loopback() || access.insecure.contains(&registry);
        let protocol = if plain {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            // Indexes are resolved here, to name the platforms in the error when none fits.
            platform_resolver: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..ClientConfig::default()
        };
        let auth = match access.credentials.get(&registry) {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        Registry {
            client: oci_client::Client::new(config),
            auth,
            reference: reference.clone(),
        }
    }

    /// The image's linux/amd64 manifest and configuration, each checked against its digest.
    pub async fn resolve(&self) -> Result<ResolvedImage, ImageError> {
        let (bytes, digest) = self.manifest(&self.reference).await?;
        let image = match parse_manifest(&bytes, &self.reference)? {
            OciManifest::Image(image) => (image, digest),
            OciManifest::ImageIndex(index) => {
                let chosen = choose_linux_amd64(&index, &self.reference)?;
                let at = self.reference.at_digest(&chosen);
                let (bytes, digest) = self.manifest(&at).await?;
                match parse_manifest(&bytes, &at)? {
                    OciManifest::Image(image) => (image, digest),
                    OciManifest::ImageIndex(_) => {
                        return Err(ImageError::Unsupported(format!(
                            "image {}: its index points at another index",
                            self.reference
                        )));
                    }
                }
            }
        };
        let (manifest, digest) = image;
        // Digests name directories of the cache: every one is checked before anything uses it.
        check_descriptor(&manifest.config, &self.reference)?;
        for layer in &manifest.layers {
            check_descriptor(layer, &self.reference)?;
            Compression::of(&layer.media_type)?;
        }
        if manifest.layers.len() > MAX_LAYERS {
            return Err(ImageError::TooLarge(format!(
                "image {}: {} layers, more than the {MAX_LAYERS} moat takes",
                self.reference,
                manifest.layers.len()
            )));
        }
        let config = self.config(&manifest).await?;
        if let Some(bad) = config.rootfs.diff_ids.iter().find(|d| !is_sha256_digest(d)) {
            return Err(ImageError::Invalid(format!(
                "image {}: layer digest {bad:?} in its configuration is not a sha256 digest",
                self.reference
            )));
        }
        if manifest.layers.len() != config.rootfs.diff_ids.len() {
            return Err(ImageError::Invalid(format!(
                "image {}: {} layers but {} layer digests in its configuration",
                self.reference,
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        Ok(ResolvedImage {
            digest,
            manifest,
            config,
        })
    }

    /// Streams the blob `desc` into `out`, checked against its size and (by the registry
    /// client) its digest; `progress` gets the bytes received so far. `out` has seen every
    /// byte when this returns `Ok`, and must be discarded when it returns an error.
    pub async fn fetch_blob_into<W: AsyncWrite + Unpin + Send>(
        &self,
        desc: &OciDescriptor,
        out: W,
        progress: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Result<W, ImageError> {
        check_descriptor(desc, &self.reference)?;
        let limit = u64::try_from(desc.size).unwrap_or(0);
        let mut out = Capped {
            inner: out,
            written: 0,
            limit,
            progress,
        };
        self.client
            .pull_blob(self.reference.as_oci(), desc, &mut out)
            .await
            .map_err(|e| self.error(e, &format!("layer {}", desc.digest)))?;
        if out.written != limit {
            return Err(ImageError::Tampered(format!(
                "image {}: blob {} is {} bytes, its manifest says {limit}",
                self.reference, desc.digest, out.written
            )));
        }
        Ok(out.inner)
    }

    /// The raw manifest at `at` and its digest, checked.
    async fn manifest(&self, at: &ImageRef) -> Result<(bytes::Bytes, String), ImageError> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(at.as_oci(), &self.auth, MANIFEST_TYPES)
            .await
            .map_err(|e| self.error(e, "manifest"))?;
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ImageError::TooLarge(format!(
                "image {at}: its manifest is over {MAX_MANIFEST_BYTES} bytes"
            )));
        }
        let digest = sha256_digest(&bytes);
        if let Some(asked) = at.as_oci().digest()
            && asked != digest
        {
            return Err(ImageError::Tampered(format!(
                "image {at}: the registry's manifest has digest {digest}"
            )));
        }
        Ok((bytes, digest))
    }

    /// The image configuration `manifest` names, checked against its digest.
    async fn config(&self, manifest: &OciImageManifest) -> Result<ImageConfigFile, ImageError> {
        let desc = &manifest.config;
        check_descriptor(desc, &self.reference)?;
        if usize::try_from(desc.size).map_or(true, |n| n > MAX_MANIFEST_BYTES) {
            return Err(ImageError::TooLarge(format!(
                "image {}: its configuration is over {MAX_MANIFEST_BYTES} bytes",
                self.reference
            )));
        }
        let mut out = Capped {
            inner: Vec::new(),
            written: 0,
            limit: u64::try_from(desc.size).unwrap_or(0),
            progress: Arc::new(|_| {}),
        };
        self.client
            .pull_blob(self.reference.as_oci(), desc, &mut out)
            .await
            .map_err(|e| self.error(e, "configuration"))?;
        let bytes = out.inner;
        let config: ImageConfigFile = serde_json::from_slice(&bytes).map_err(|e| {
            ImageError::Invalid(format!(
                "image {}: its configuration is not valid: {e}",
                self.reference
            ))
        })?;
        if config.os != "linux" || config.architecture != "amd64" {
            return Err(ImageError::Unsupported(format!(
                "image {} is for {}/{}; this server runs linux/amd64",
                self.reference, config.os, config.architecture
            )));
        }
        Ok(config)
    }

    /// `e`, from fetching `what`, as an error a user can act on.
    fn error(&self, e: OciDistributionError, what: &str) -> ImageError {
        let r = &self.reference;
        let registry = r.registry();
        match e {
            OciDistributionError::ImageManifestNotFoundError(_) => {
                ImageError::NotFound(format!("image {r} was not found in {registry}"))
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                let text = envelope.to_string();
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    ImageError::NotFound(format!("image {r} was not found in {registry} ({what})"))
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    unauthorized(r)
                } else {
                    ImageError::Registry(format!(
                        "image {r}: {registry} refused the {what}{}",
                        short_message(&text)
                    ))
                }
            }
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => unauthorized(r),
            OciDistributionError::ServerError { code, message, .. } => match code {
                404 => ImageError::NotFound(format!("image {r} was not found in {registry}")),
                401 | 403 => unauthorized(r),
                _ => ImageError::Registry(format!(
                    "image {r}: {registry} answered {code} for the {what}{}",
                    short_message(&message)
                )),
            },
            OciDistributionError::DigestError(d) => ImageError::Tampered(format!(
                "image {r}: the {what} from {registry} does not match its digest ({d})"
            )),
            OciDistributionError::RequestError(req) => ImageError::Unreachable(format!(
                "registry {registry} cannot be reached: {}",
                error_chain(&req)
            )),
            OciDistributionError::IoError(io) if io.kind() == io::ErrorKind::FileTooLarge => {
                ImageError::Tampered(format!(
                    "image {r}: the {what} from {registry} is larger than its manifest says"
                ))
            }
            other => ImageError::Registry(format!("image {r}: {what} from {registry}: {other}")),
        }
    }
}

/// A registry's error text as shown to a caller: its first line, at most 200 characters.
fn short_message(message: &str) -> String {
    let line: String = message
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    if line.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", line.trim())
    }
}

/// The error for a registry that wants credentials moat does not have or refuses them.
fn unauthorized(r: &ImageRef) -> ImageError {
    ImageError::Unauthorized(format!(
        "registry {} refused access to image {r}: check that it exists and the server's \
         credentials for this registry",
        r.registry()
    ))
}

/// `e` and its sources, one after the other: reqwest's own message is only the outermost.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `bytes` as a manifest of either kind.
fn parse_manifest(bytes: &[u8], at: &ImageRef) -> Result<OciManifest, ImageError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ImageError::Invalid(format!("image {at}: its manifest is not valid: {e}")))
}

/// The digest of the linux/amd64 manifest in `index`, or an error naming the platforms it has.
fn choose_linux_amd64(
    index: &manifest::OciImageIndex,
    reference: &ImageRef,
) -> Result<String, ImageError> {
    let mut platforms = Vec::new();
    for entry in &index.manifests {
        let Some(p) = &entry.platform else { continue };
        let (os, arch) = (p.os.to_string(), p.architecture.to_string());
        if os == "linux" && arch == "amd64" {
            if !is_sha256_digest(&entry.digest) {
                return Err(ImageError::Invalid(format!(
                    "image {reference}: its linux/amd64 entry has no sha256 digest"
                )));
            }
            return Ok(entry.digest.clone());
        }
        platforms.push(format!("{os}/{arch}"));
    }
    platforms.sort();
    platforms.dedup();
    Err(ImageError::Unsupported(format!(
        "image {reference} has no linux/amd64 variant (it has: {})",
        if platforms.is_empty() {
            "none named".to_owned()
        } else {
            platforms.join(", ")
        }
    )))
}

/// Refuses a descriptor whose digest is not sha256, whose size is negative, or that names
/// other places to fetch it from (`urls`: the client would go there, wherever they point).
fn check_descriptor(desc: &OciDescriptor, reference: &ImageRef) -> Result<(), ImageError> {
    if !is_sha256_digest(&desc.digest) || desc.size < 0 {
        return Err(ImageError::Invalid(format!(
            "image {reference}: descriptor {:?} (size {}) is not a sha256 digest and a size",
            desc.digest.chars().take(80).collect::<String>(),
            desc.size
        )));
    }
    if desc.urls.as_ref().is_some_and(|u| !u.is_empty()) {
        return Err(ImageError::Unsupported(format!(
            "image {reference}: blob {} is to be fetched from other URLs, which moat does not do",
            desc.digest
        )));
    }
    Ok(())
}

/// `sha256:` and the hex digest of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for b in hash {
        text.push_str(&format!("{b:02x}"));
    }
    text
}

/// A writer that refuses to go past `limit` bytes (a blob larger than its manifest says) and
/// reports its progress.
struct Capped<W> {
    inner: W,
    written: u64,
    limit: u64,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Capped<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let room = self.limit.saturating_sub(self.written);
        if buf.len() as u64 > room {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "more bytes than the descriptor's size",
            )));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.written += n as u64;
                (this.progress)(this.written);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn layer_media_types() {
        assert_eq!(
            Compression::of(manifest::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE).unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            Compression::of(manifest::IMAGE_LAYER_MEDIA_TYPE).unwrap(),
            Compression::None
        );
        let e = Compression::of("application/vnd.oci.image.layer.v1.tar+zstd").unwrap_err();
        assert!(e.to_string().contains("zstd"), "{e}");
    }

    #[test]
    fn digests_are_sha256_hex() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(is_sha256_digest(&sha256_digest(b"x")));
    }

    #[test]
    fn descriptors_that_could_leave_the_cache_or_the_registry_are_refused() {
        let r = ImageRef::parse("example.com/a:b").unwrap();
        let hex = "a".repeat(64);
        let desc = |digest: String, urls: Option<Vec<String>>| OciDescriptor {
            media_type: manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE.into(),
            digest,
            size: 10,
            urls,
            annotations: None,
            artifact_type: None,
        };
        check_descriptor(&desc(format!("sha256:{hex}"), None), &r).unwrap();
        for bad in [
            format!("sha256:{hex}/root/x"),
            format!("sha256:../{hex}"),
            "sha512:abc".to_owned(),
            String::new(),
        ] {
            let e = check_descriptor(&desc(bad.clone(), None), &r).unwrap_err();
            assert!(matches!(e, ImageError::Invalid(_)), "{bad}: {e}");
        }
        let e = check_descriptor(
            &desc(
                format!("sha256:{hex}"),
                Some(vec!["http://10.0.0.1/x".into()]),
            ),
            &r,
        )
        .unwrap_err();
        assert!(matches!(e, ImageError::Unsupported(_)), "{e}");
        // Nondistributable layers are the ones that come from elsewhere: not read.
        assert!(Compression::of(manifest::IMAGE_LAYER_NONDISTRIBUTABLE_GZIP_MEDIA_TYPE).is_err());
    }

    #[test]
    fn credentials_never_print_their_password() {
        let c = Credentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
