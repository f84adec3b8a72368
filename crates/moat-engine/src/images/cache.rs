//! The image cache on disk: layers unpacked once and shared, and one merged tree per image.
//!
//! Layout under its root (0700, root's own):
//! - `layers/<hex>/`: the layer whose (compressed) blob has digest `sha256:<hex>`, unpacked in
//!   `root/`, with what it deletes from the layers below in `index.json`;
//! - `trees/<hex>/`: the image whose manifest has digest `sha256:<hex>`: its layers merged in
//!   `rootfs/` (files hard-linked from the layers, so images that share a layer share its
//!   data), and what moat keeps of it in `image.json`;
//! - `steps/<hex>`: the digest of the layer a build step whose inputs have digest
//!   `sha256:<hex>` made (see [`super::build`]), so a build run again reuses it;
//! - `tmp/`: work in progress, each pull in a directory of its own. Everything reaches its
//!   place by a rename, after the cache's filesystem is synced, so a layer or tree that is
//!   there is complete (a power loss included), and two pulls of one image do the work twice
//!   at worst, never half.
//!
//! Blobs are checked against their digests as they arrive, layers against the image's
//! `diff_ids` as they are unpacked, and the compressed blob is removed once unpacked.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::registry::{Compression, Registry, RegistryAccess, RunConfig};
use super::tree::{Layer, merge_layers};
use super::unpack::{LayerIndex, UnpackLimits, unpack_layer};
use super::{ImageError, ImageRef};

/// How much may follow a layer's end-of-archive marker (padding) before it counts as abuse.
const MAX_TRAILING_BYTES: u64 = 1 << 20;

/// Entries (files, directories, links) all of an image's layers may hold together.
pub const MAX_IMAGE_ENTRIES: u64 = 2_000_000;

/// The longest a pull may take, waiting for its turn not counted.
pub const PULL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Pulls a cache runs at once; more wait their turn. Twice a tenant's share
/// (`manager::MAX_PULLS_PER_TENANT`), so one tenant's pulls leave room for another's.
pub const MAX_CONCURRENT_PULLS: usize = 4;

/// Room a layer is asked to find before it is fetched, as a multiple of its compressed size:
/// the blob itself and its unpacked files (gzip usually shrinks a layer to a third).
const ROOM_PER_LAYER_BYTE: u64 = 4;

/// What the cache keeps of a pulled image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulledImage {
    /// The reference as pulled, pinned to the manifest's digest (`repo:tag@sha256:…`).
    pub reference: String,
    /// The manifest's digest.
    pub digest: String,
    /// How its containers run (env, user, working directory, entrypoint, cmd).
    pub config: RunConfig,
    /// Its layers' blob digests, base first.
    pub layers: Vec<String>,
    /// The merged tree (not serialised: it follows from where the cache is).
    #[serde(skip)]
    pub rootfs: PathBuf,
}

/// A step of a pull, for progress displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The manifest is known: this many layers, of these compressed sizes.
    Resolved {
        /// Each layer's compressed size, base first.
        sizes: Vec<u64>,
    },
    /// Bytes of layer `index` received so far (layers already cached are not fetched).
    Fetching {
        /// Which layer.
        index: usize,
        /// Bytes so far.
        received: u64,
    },
    /// Layer `index` is unpacked (or was already).
    Unpacked {
        /// Which layer.
        index: usize,
    },
}

/// The image cache rooted at a directory.
pub struct ImageCache {
    /// Pulls under way at once (each a download, an unpack and a merge: disk and CPU).
    pulls: tokio::sync::Semaphore,
    root: PathBuf,
    access: RegistryAccess,
    limits: UnpackLimits,
    /// Free space the cache's filesystem keeps: a layer that would leave less is refused.
    reserve: u64,
}

impl ImageCache {
    /// The cache at `root` (made, 0700, if missing), reaching registries as `access` says.
    pub fn open(root: &Path, access: RegistryAccess) -> Result<ImageCache, ImageError> {
        // What a pull cut short by a crash left: never published, never used.
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .map_err(|e| ImageError::io(format!("clearing {}", tmp.display()), e))?;
        }
        for dir in ["", "layers", "trees", "steps", "tmp"] {
            make_private_dir(&root.join(dir))?;
        }
        Ok(ImageCache {
            pulls: tokio::sync::Semaphore::new(MAX_CONCURRENT_PULLS),
            root: root.to_owned(),
            access,
            limits: UnpackLimits::default(),
            reserve: 0,
        })
    }

    /// The same cache keeping `bytes` free on its filesystem.
    pub fn with_reserve(mut self, bytes: u64) -> ImageCache {
        self.reserve = bytes;
        self
    }

    /// Refuses a layer of `size` compressed bytes when its blob and files might not fit above
    /// the reserve (checked before each layer: a pull cannot fill the disk, though an estimate
    /// lets a layer that unpacks unusually large past it by what it is over).
    fn check_room(&self, size: u64) -> Result<(), ImageError> {
        let free = crate::disk::free_disk(&self.root).map_err(|e| {
            ImageError::io(
                format!("reading the free space of {}", self.root.display()),
                e,
            )
        })?;
        let need = size.saturating_mul(ROOM_PER_LAYER_BYTE);
        if free.saturating_sub(self.reserve) < need {
            return Err(ImageError::InsufficientStorage(format!(
                "the server's data dir has {} free, not enough for a layer of {} (about {} \
                 unpacked) above the {} it keeps free; nothing was kept",
                moat_proto::units::describe_size(free),
                moat_proto::units::describe_size(size),
                moat_proto::units::describe_size(need),
                moat_proto::units::describe_size(self.reserve)
            )));
        }
        Ok(())
    }

    /// The same cache with other unpack limits.
    pub fn with_limits(mut self, limits: UnpackLimits) -> ImageCache {
        self.limits = limits;
        self
    }

    /// The directory of the layer whose blob has `digest`.
    pub fn layer_dir(&self, digest: &str) -> PathBuf {
        self.root.join("layers").join(hex_of(digest))
    }

    /// The directory holding the images' trees (`trees/<hex>/rootfs`).
    pub fn trees_dir(&self) -> PathBuf {
        self.root.join("trees")
    }

    /// The directory of the image whose manifest has `digest`.
    pub fn tree_dir(&self, digest: &str) -> PathBuf {
        self.root.join("trees").join(hex_of(digest))
    }

    /// A new work directory under the cache's `tmp/`, removed when dropped (and at the next
    /// start, if the server stops first).
    pub fn work_dir(&self, prefix: &str) -> Result<tempfile::TempDir, ImageError> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(self.root.join("tmp"))
            .map_err(|e| ImageError::io("making a work directory", e))
    }

    /// Refuses `bytes` more of the cache's filesystem when that would leave less than the
    /// reserve free.
    pub fn check_free(&self, bytes: u64) -> Result<(), ImageError> {
        self.check_room(bytes.div_ceil(ROOM_PER_LAYER_BYTE))
    }

    /// Whether layer `digest` is in the cache, marking it used if so.
    pub fn has_layer(&self, digest: &str) -> bool {
        let index = self.layer_dir(digest).join("index.json");
        let there = index.exists();
        if there {
            touch(&index);
        }
        there
    }

    /// Adds the plain tar archive at `archive`, whose bytes have sha256 `digest` (the caller
    /// hashed them as it wrote the file), as a layer, unless the cache has it; removes the
    /// file either way. The archive is read as untrusted, as a pulled layer is.
    pub async fn add_layer(&self, archive: &Path, digest: &str) -> Result<(), ImageError> {
        if self.has_layer(digest) {
            let _ = std::fs::remove_file(archive);
            return Ok(());
        }
        // Unpacked, it takes about what the archive does: that much must fit above the reserve.
        let size = std::fs::metadata(archive)
            .map_err(|e| ImageError::io(format!("reading {}", archive.display()), e))?
            .len();
        if let Err(e) = self.check_free(size) {
            let _ = std::fs::remove_file(archive);
            return Err(e);
        }
        let work = self.work_dir("layer-")?;
        let (archive, digest_owned) = (archive.to_owned(), digest.to_owned());
        let staging = work.path().join("layer");
        let target = self.layer_dir(digest);
        let limits = self.limits;
        // Unpacked and published by one task that owns the work directory: a caller that
        // stops waiting (a build cancelled) must not remove the layer being made while the
        // task goes on and then publishes it.
        tokio::task::spawn_blocking(move || {
            let _work = work;
            let r = std::fs::File::open(&archive)
                .map_err(|e| ImageError::io(format!("opening {}", archive.display()), e))
                .and_then(|file| {
                    unpack_stream(
                        file,
                        Compression::None,
                        &digest_owned,
                        &digest_owned,
                        &staging,
                        &limits,
                    )
                });
            let _ = std::fs::remove_file(&archive);
            r.and_then(|_| publish(&staging, &target))
        })
        .await
        .map_err(|e| ImageError::Io(format!("unpack task: {e}")))?
    }

    /// The tree of `image`, whose layers are in the cache and whose digest names this set of
    /// layers and configuration: merged unless it is there already.
    pub async fn assemble(&self, image: PulledImage) -> Result<PulledImage, ImageError> {
        if let Some(found) = self.find(&image.digest)? {
            return Ok(found);
        }
        for layer in &image.layers {
            if !self.has_layer(layer) {
                return Err(ImageError::NotFound(format!(
                    "layer {layer} is no longer in the image cache"
                )));
            }
        }
        self.merge(&image).await?;
        self.find(&image.digest)?.ok_or_else(|| {
            ImageError::Io(format!("image {} vanished after its merge", image.digest))
        })
    }

    /// Entries (files, directories, links) `layers` hold together: what merging them makes.
    pub fn layer_entries(&self, layers: &[String]) -> Result<u64, ImageError> {
        // A layer repeated is read once and counted each time.
        let mut read: HashMap<&str, u64> = HashMap::new();
        let mut entries: u64 = 0;
        for layer in layers {
            let n = match read.get(layer.as_str()) {
                Some(n) => *n,
                None => {
                    let n = read_index(&self.layer_dir(layer))?.entries;
                    read.insert(layer, n);
                    n
                }
            };
            entries = entries.saturating_add(n);
        }
        Ok(entries)
    }

    /// The layer the build step whose inputs have digest `key` made, if recorded and still in
    /// the cache.
    pub fn step_layer(&self, key: &str) -> Option<String> {
        let record = self.root.join("steps").join(hex_of(key));
        let layer = std::fs::read_to_string(&record).ok()?;
        let layer = layer.trim();
        (super::reference::is_sha256_digest(layer) && self.has_layer(layer)).then(|| {
            touch(&record);
            layer.to_owned()
        })
    }

    /// Records that the build step whose inputs have digest `key` made layer `layer`.
    pub fn record_step(&self, key: &str, layer: &str) -> Result<(), ImageError> {
        let record = self.root.join("steps").join(hex_of(key));
        let work = self.work_dir("step-")?;
        let staged = work.path().join("record");
        write_synced(&staged, layer.as_bytes())?;
        std::fs::rename(&staged, &record)
            .map_err(|e| ImageError::io(format!("recording step {}", record.display()), e))
    }

    /// Pulls `reference` (or finds it pulled already) and answers with its merged tree.
    pub async fn pull(
        &self,
        reference: &ImageRef,
        progress: Arc<dyn Fn(PullEvent) + Send + Sync>,
    ) -> Result<PulledImage, ImageError> {
        let late = || {
            ImageError::Unreachable(format!(
                "pulling {reference} took longer than {} minutes; nothing was kept of what was \
                 not finished",
                PULL_TIMEOUT.as_secs() / 60
            ))
        };
        let registry = Registry::new(reference, &self.access);
        let resolved = tokio::time::timeout(PULL_TIMEOUT, registry.resolve())
            .await
            .map_err(|_| late())??;
        // Each caller gets the reference it asked for, pinned, whoever pulled the image first.
        let pinned_here = |mut pulled: PulledImage| {
            pulled.reference = pinned(reference, &resolved.digest);
            pulled
        };
        if let Some(pulled) = self.find(&resolved.digest)? {
            return Ok(pinned_here(pulled));
        }
        let _turn = self
            .pulls
            .acquire()
            .await
            .map_err(|e| ImageError::Io(format!("pull queue: {e}")))?;
        // Pulled by another caller while this one waited.
        if let Some(pulled) = self.find(&resolved.digest)? {
            return Ok(pinned_here(pulled));
        }
        let deadline = tokio::time::Instant::now() + PULL_TIMEOUT;
        let layers = &resolved.manifest.layers;
        progress(PullEvent::Resolved {
            sizes: layers
                .iter()
                .map(|l| u64::try_from(l.size).unwrap_or(0))
                .collect(),
        });
        let work = self.work_dir("pull-")?;
        let fetched = async {
            // The image's entries so far: each layer unpacks within what the image has left,
            // so an image over the bound stops before its layers fill the cache with inodes.
            let mut entries: u64 = 0;
            let over = || {
                ImageError::TooLarge(format!(
                    "the image's layers hold more than the {MAX_IMAGE_ENTRIES} entries together \
                     that moat takes"
                ))
            };
            for (index, (desc, diff_id)) in layers
                .iter()
                .zip(&resolved.config.rootfs.diff_ids)
                .enumerate()
            {
                let compression = Compression::of(&desc.media_type)?;
                let cached = self.layer_dir(&desc.digest).join("index.json");
                if cached.exists() {
                    // Used now: a collection leaves it alone for its grace period.
                    touch(&cached);
                    entries =
                        entries.saturating_add(read_index(&self.layer_dir(&desc.digest))?.entries);
                    if entries > MAX_IMAGE_ENTRIES {
                        return Err(over());
                    }
                } else {
                    self.check_room(u64::try_from(desc.size).unwrap_or(u64::MAX))?;
                    let report = {
                        let progress = progress.clone();
                        Arc::new(move |received| progress(PullEvent::Fetching { index, received }))
                    };
                    // Unpacked as it downloads; published only once the download is complete and
                    // its digest checked (the unpacker is built for hostile layers, and what it
                    // wrote of one that fails its check is thrown away with the work directory).
                    let (writer, reader) = super::stream::channel();
                    let left = MAX_IMAGE_ENTRIES - entries;
                    let unpacking = self.unpack(
                        reader,
                        compression,
                        diff_id,
                        &desc.digest,
                        work.path(),
                        left,
                    );
                    let fetched = async {
                        // Cut off at the deadline: the writer goes, which ends the unpacker's
                        // stream too.
                        match tokio::time::timeout_at(
                            deadline,
                            registry.fetch_blob_into(desc, writer, report),
                        )
                        .await
                        {
                            Ok(r) => r.map(drop),
                            Err(_) => Err(late()),
                        }
                    };
                    let (fetched, unpacked) = tokio::join!(fetched, unpacking);
                    match (fetched, unpacked) {
                        (Ok(()), Ok((staging, n))) => {
                            self.publish_layer(staging, &desc.digest).await?;
                            entries = entries.saturating_add(n);
                        }
                        (Ok(()), Err(e)) => return Err(e),
                        // The unpacker stopped first for a reason of its own (a hostile or
                        // oversized layer), which cut the download short: its reason is the one.
                        (
                            Err(_),
                            Err(
                                e @ (ImageError::Invalid(_)
                                | ImageError::TooLarge(_)
                                | ImageError::Unsupported(_)),
                            ),
                        ) => return Err(e),
                        (Err(e), _) => return Err(e),
                    }
                }
                progress(PullEvent::Unpacked { index });
            }
            Ok(())
        }
        .await;
        // A failed layer's half-unpacked files (up to a million) go on the blocking pool.
        let _ = tokio::task::spawn_blocking(move || drop(work)).await;
        fetched?;
        let pulled = PulledImage {
            reference: pinned(reference, &resolved.digest),
            digest: resolved.digest.clone(),
            config: resolved.config.config.clone(),
            layers: layers.iter().map(|l| l.digest.clone()).collect(),
            rootfs: PathBuf::new(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(late());
        }
        self.merge(&pulled).await?;
        self.find(&resolved.digest)?
            .map(pinned_here)
            .ok_or_else(|| {
                ImageError::Io(format!("image {} vanished after its pull", pulled.digest))
            })
    }

    /// The image of manifest `digest`, if its tree is complete.
    pub fn find(&self, digest: &str) -> Result<Option<PulledImage>, ImageError> {
        let dir = self.tree_dir(digest);
        let bytes = match std::fs::read(dir.join("image.json")) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io(format!("reading {}", dir.display()), e)),
        };
        let mut pulled: PulledImage = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::io(format!("reading {}/image.json", dir.display()), e))?;
        pulled.rootfs = dir.join("rootfs");
        // Used now: a collection leaves it alone for its grace period.
        touch(&dir.join("image.json"));
        Ok(Some(pulled))
    }

    /// Removes the trees of images not in `in_use` (manifest digests) and the layers no
    /// remaining tree uses, sparing anything used or made within `grace` (a pull or a
    /// template create under way). Returns how many trees and layers went.
    pub fn collect(
        &self,
        in_use: &std::collections::HashSet<String>,
        grace: std::time::Duration,
    ) -> Result<(usize, usize), ImageError> {
        let recent = |path: &Path| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < grace)
        };
        let mut kept_layers = std::collections::HashSet::new();
        let mut trees = 0;
        for hex in hex_entries(&self.root.join("trees"))? {
            let digest = format!("sha256:{hex}");
            let record = self.tree_dir(&digest).join("image.json");
            if in_use.contains(&digest) || recent(&record) {
                if let Some(image) = self.read_record(&digest) {
                    kept_layers.extend(image.layers.iter().map(|l| hex_of(l).to_owned()));
                }
                continue;
            }
            self.discard(&self.tree_dir(&digest))?;
            trees += 1;
        }
        let mut layers = 0;
        for hex in hex_entries(&self.root.join("layers"))? {
            let dir = self.root.join("layers").join(&hex);
            if kept_layers.contains(&hex) || recent(&dir.join("index.json")) {
                continue;
            }
            self.discard(&dir)?;
            layers += 1;
        }
        // Records of build steps whose layer went are of no use any more.
        for hex in hex_entries(&self.root.join("steps"))? {
            let record = self.root.join("steps").join(&hex);
            let layer = std::fs::read_to_string(&record).unwrap_or_default();
            let layer = layer.trim();
            let gone = !super::reference::is_sha256_digest(layer)
                || !self.layer_dir(layer).join("index.json").exists();
            if gone {
                let _ = std::fs::remove_file(&record);
            }
        }
        Ok((trees, layers))
    }

    /// The record of tree `digest`, if readable (without marking it used).
    fn read_record(&self, digest: &str) -> Option<PulledImage> {
        let bytes = std::fs::read(self.tree_dir(digest).join("image.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Moves `dir` out of its place at once (so nothing finds it half removed), then removes it.
    fn discard(&self, dir: &Path) -> Result<(), ImageError> {
        let gone = tempfile::Builder::new()
            .prefix("gc-")
            .tempdir_in(self.root.join("tmp"))
            .map_err(|e| ImageError::io("making a work directory", e))?;
        let target = gone.path().join("x");
        std::fs::rename(dir, &target)
            .map_err(|e| ImageError::io(format!("moving {} out", dir.display()), e))?;
        // `gone` removes it (and with it what the rename moved).
        drop(gone);
        Ok(())
    }

    /// Unpacks the layer `reader` streams into a staging directory of `work`, checking that
    /// its uncompressed bytes have `diff_id`; the staging directory.
    async fn unpack(
        &self,
        reader: super::stream::ChannelReader,
        compression: Compression,
        diff_id: &str,
        digest: &str,
        work: &Path,
        max_entries: u64,
    ) -> Result<(PathBuf, u64), ImageError> {
        let (diff_id, digest) = (diff_id.to_owned(), digest.to_owned());
        let staging = work.join(format!("layer-{}", hex_of(&digest)));
        let limits = UnpackLimits {
            max_entries: self.limits.max_entries.min(max_entries),
            ..self.limits
        };
        tokio::task::spawn_blocking(move || {
            let entries = unpack_stream(reader, compression, &diff_id, &digest, &staging, &limits)?;
            Ok((staging, entries))
        })
        .await
        .map_err(|e| ImageError::Io(format!("unpack task: {e}")))?
    }

    /// Puts the layer unpacked in `staging` in its place in the cache as layer `digest`.
    async fn publish_layer(&self, staging: PathBuf, digest: &str) -> Result<(), ImageError> {
        let target = self.layer_dir(digest);
        tokio::task::spawn_blocking(move || publish(&staging, &target))
            .await
            .map_err(|e| ImageError::Io(format!("publish task: {e}")))?
    }

    /// Merges `pulled`'s layers into its tree, in a work directory the merge itself owns: a
    /// caller that stops waiting (a build cancelled) must not remove the tree being made
    /// while the merge goes on and then publishes it.
    async fn merge(&self, pulled: &PulledImage) -> Result<(), ImageError> {
        let work = self.work_dir("merge-")?;
        let staging = work.path().join("tree");
        let target = self.tree_dir(&pulled.digest);
        let layer_dirs: Vec<PathBuf> = pulled.layers.iter().map(|d| self.layer_dir(d)).collect();
        let record = serde_json::to_vec_pretty(pulled)
            .map_err(|e| ImageError::Io(format!("recording the image: {e}")))?;
        tokio::task::spawn_blocking(move || {
            let _work = work;
            let rootfs = staging.join("rootfs");
            make_private_dir(&staging)?;
            std::fs::create_dir(&rootfs)
                .map_err(|e| ImageError::io(format!("making {}", rootfs.display()), e))?;
            // Each entry of each layer is one in the tree (a directory, a link): bounded, as a
            // layer repeated many times would multiply them. Counted as the indexes are read,
            // and a repeated layer's read once, so that what is held stays within the bound.
            let mut indexes: Vec<LayerIndex> = Vec::new();
            let mut index_of: HashMap<&Path, usize> = HashMap::new();
            let mut order = Vec::with_capacity(layer_dirs.len());
            let mut entries: u64 = 0;
            for dir in &layer_dirs {
                let at = match index_of.get(dir.as_path()) {
                    Some(at) => *at,
                    None => {
                        indexes.push(read_index(dir)?);
                        index_of.insert(dir, indexes.len() - 1);
                        indexes.len() - 1
                    }
                };
                entries = entries.saturating_add(indexes[at].entries);
                if entries > MAX_IMAGE_ENTRIES {
                    return Err(ImageError::TooLarge(format!(
                        "the image's layers hold more than the {MAX_IMAGE_ENTRIES} entries \
                         together that moat takes"
                    )));
                }
                order.push(at);
            }
            let roots: Vec<PathBuf> = layer_dirs.iter().map(|d| d.join("root")).collect();
            let layers: Vec<Layer<'_>> = roots
                .iter()
                .zip(&order)
                .map(|(root, at)| Layer {
                    root,
                    index: &indexes[*at],
                })
                .collect();
            merge_layers(&layers, &rootfs).map_err(|e| unpack_error("", e))?;
            check_mount_points(&rootfs)?;
            super::accounts::ensure_user(&rootfs)?;
            write_synced(&staging.join("image.json"), &record)?;
            publish(&staging, &target)
        })
        .await
        .map_err(|e| ImageError::Io(format!("merge task: {e}")))?
    }
}

/// Where a sandbox mounts its own file systems over the image: each must be a directory or
/// missing (made then), never a symbolic link, which the mount would follow.
const MOUNT_POINTS: &[&str] = &["dev", "proc", "tmp", "home", "home/user"];

/// Refuses a tree where one of [`MOUNT_POINTS`] is something else than a directory.
fn check_mount_points(rootfs: &Path) -> Result<(), ImageError> {
    for name in MOUNT_POINTS {
        // `home` is checked before `home/user`, so no symbolic link is followed here.
        match std::fs::symlink_metadata(rootfs.join(name)) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ImageError::Unsupported(format!(
                    "the image's /{name} is not a directory (a symbolic link, say): a sandbox \
                     mounts its own there"
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io(format!("checking /{name}"), e)),
        }
    }
    Ok(())
}

/// Sets `path`'s modification time to now (best effort: a failure only shortens its grace).
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().write(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// The names in `dir` that are 64 hex digits (a cache's entries; anything else is left alone).
fn hex_entries(dir: &Path) -> Result<Vec<String>, ImageError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
        if let Some(name) = entry.file_name().to_str()
            && super::reference::is_sha256_digest(&format!("sha256:{name}"))
        {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

/// Unpacks the layer `reader` gives into `staging/root` (and its index into
/// `staging/index.json`).
fn unpack_stream(
    reader: impl Read,
    compression: Compression,
    diff_id: &str,
    digest: &str,
    staging: &Path,
    limits: &UnpackLimits,
) -> Result<u64, ImageError> {
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(io::BufReader::new(reader)),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(
            reader,
        ))),
    };
    let mut hashed = Hashing {
        inner: reader,
        hash: Sha256::new(),
    };
    make_private_dir(staging)?;
    let root = staging.join("root");
    std::fs::create_dir(&root)
        .map_err(|e| ImageError::io(format!("making {}", root.display()), e))?;
    let index = unpack_layer(&mut hashed, &root, limits)
        .map_err(|e| unpack_error(&format!("layer {digest}: "), e))?;
    // The diff id covers the whole stream, the archive's zero blocks and padding too.
    let trailing = io::copy(
        &mut (&mut hashed).take(MAX_TRAILING_BYTES + 1),
        &mut io::sink(),
    )
    .map_err(|e| ImageError::Invalid(format!("layer {digest}: {e}")))?;
    if trailing > MAX_TRAILING_BYTES {
        return Err(ImageError::Invalid(format!(
            "layer {digest}: more than {MAX_TRAILING_BYTES} bytes after the end of its archive"
        )));
    }
    let actual = format!("sha256:{}", hex(&hashed.hash.finalize()));
    if actual != diff_id {
        return Err(ImageError::Tampered(format!(
            "layer {digest} unpacks to {actual}, but the image says {diff_id}"
        )));
    }
    let json = serde_json::to_vec(&index)
        .map_err(|e| ImageError::Io(format!("recording layer {digest}: {e}")))?;
    write_synced(&staging.join("index.json"), &json)?;
    Ok(index.entries)
}

/// What an unpack or merge that failed with `e` answers (`context` before its message): a
/// full disk (507) is the host's trouble, not the image's; anything else, an entry the host
/// would not take among them, is the image's (400).
fn unpack_error(context: &str, e: crate::images::unpack::UnpackError) -> ImageError {
    if e.is_disk_full() {
        ImageError::InsufficientStorage(format!("{context}{e}"))
    } else {
        ImageError::Invalid(format!("{context}{e}"))
    }
}

/// The index of the unpacked layer at `dir`.
fn read_index(dir: &Path) -> Result<LayerIndex, ImageError> {
    let path = dir.join("index.json");
    let bytes = std::fs::read(&path)
        .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))
}

/// Moves the finished `staging` to `target`; if another pull got there first, keeps theirs.
/// What it holds is on disk first (the cache's whole filesystem is synced: a tree may hold
/// too many files to sync one by one), and the move after it, so that what is there is
/// complete even after a power loss.
fn publish(staging: &Path, target: &Path) -> Result<(), ImageError> {
    let synced = std::fs::File::open(staging).and_then(|dir| {
        // SAFETY: syncfs on a descriptor this function holds open.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    });
    synced.map_err(|e| ImageError::io(format!("syncing {}", staging.display()), e))?;
    let moved = match std::fs::rename(staging, target) {
        Ok(()) => Ok(()),
        // Renaming onto a non-empty directory: already there, complete.
        Err(e)
            if target.exists()
                && matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) =>
        {
            Ok(())
        }
        Err(e) => Err(ImageError::io(
            format!("moving {} into place", target.display()),
            e,
        )),
    };
    moved?;
    if let Some(parent) = target.parent() {
        std::fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| ImageError::io(format!("syncing {}", parent.display()), e))?;
    }
    Ok(())
}

/// Writes `bytes` to the new file `path` and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    use std::io::Write as _;
    let mut f = std::fs::File::create_new(path)
        .map_err(|e| ImageError::io(format!("creating {}", path.display()), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| ImageError::io(format!("writing {}", path.display()), e))
}

/// Makes `dir` (and its parents) readable by root only.
fn make_private_dir(dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ImageError::io(format!("making {}", dir.display()), e))
}

/// `reference` pinned to `digest`, its tag kept for people to read.
fn pinned(reference: &ImageRef, digest: &str) -> String {
    let whole = reference.whole();
    let name = whole.split('@').next().unwrap_or(&whole);
    format!("{name}@{digest}")
}

/// The hex part of a `sha256:` digest (checked by the registry client before it gets here).
fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}
