//! Templates from images: the image pulled when the template is written, the template pinned
//! to the digest pulled, and its sandboxes given the image's tree as their root.
//!
//! A template `{"rootfs": {"image": "registry/name:tag"}}` is stored as
//! `{"image": "registry/name:tag@sha256:…"}`, so a tag that moves later does not change the
//! template. The image's `Env` entries become the template's environment below the spec's own,
//! its `WorkingDir` the default working directory unless the spec names one, and its `User`
//! `root` when the image runs as root (`root`, `0`, `0:0`) and the spec names no user; any
//! other image user runs as moat's `user` (uid 1000), which every image tree has (see
//! `images::accounts`).

use moat_proto::v1;

use super::{Inner, ManagerError, ManagerResult, check_env};
use crate::images::registry::RunConfig;
use crate::images::{ImageError, ImageRef, PullEvent, PulledImage};
use crate::tenant_slots::TenantSlots;

/// Image pulls one tenant may have under way at once (waiting for the server's turn
/// included): the server pulls a few at a time for everyone, so one tenant's many pulls must
/// not queue ahead of every other tenant's.
pub const MAX_PULLS_PER_TENANT: usize = 2;

/// The pulls under way, per tenant, within [`MAX_PULLS_PER_TENANT`].
pub(super) fn pull_slots() -> std::sync::Arc<TenantSlots> {
    TenantSlots::new(MAX_PULLS_PER_TENANT, None)
}

impl Inner {
    /// Pulls `reference` into `cache`, in a task of its own: a caller that goes away must not
    /// cut a pull short halfway through writing into the shared cache. With a `tenant`, the
    /// pull takes one of its [`MAX_PULLS_PER_TENANT`] places (429 when none is left), which
    /// the task holds to its end; a build step passes none, as a tenant's builds already run
    /// one at a time (and a build, accepted, must not fail for want of a place), and instead
    /// the build's `tasks`, which its end waits for (with its tenant's turn held) even when
    /// the build was cancelled meanwhile.
    pub(super) async fn pull_image(
        &self,
        tenant: Option<&str>,
        tasks: Option<&tokio_util::task::TaskTracker>,
        cache: &std::sync::Arc<crate::images::ImageCache>,
        reference: ImageRef,
        progress: std::sync::Arc<dyn Fn(PullEvent) + Send + Sync>,
    ) -> ManagerResult<PulledImage> {
        let place = match tenant {
            Some(tenant) => Some(self.pulls.enter(tenant).map_err(|_| {
                ManagerError::QuotaExceeded(format!(
                    "{MAX_PULLS_PER_TENANT} image pulls of yours are under way, the most one \
                     tenant may have at once; retry when one has finished"
                ))
            })?),
            None => None,
        };
        let cache = cache.clone();
        let pull = async move {
            let _place = place;
            cache.pull(&reference, progress).await
        };
        match tasks {
            Some(tasks) => tasks.spawn(pull),
            None => tokio::spawn(pull),
        }
        .await
        .map_err(|e| ManagerError::Internal(format!("pull task: {e}")))?
        .map_err(image_error)
    }

    /// Pulls the image `spec` names, pins the spec to it and takes over its defaults.
    pub(super) async fn pull_template_image(
        &self,
        spec: &mut v1::TemplateSpec,
        tenant: &str,
        progress: std::sync::Arc<dyn Fn(PullEvent) + Send + Sync>,
    ) -> ManagerResult<()> {
        let v1::Rootfs::Image(text) = &spec.rootfs else {
            return Ok(());
        };
        let reference = ImageRef::parse(text).map_err(image_error)?;
        let cache = self.images.as_ref().ok_or_else(|| {
            ManagerError::Invalid(
                "this server keeps no images: templates from images need `moat serve`".into(),
            )
        })?;
        let pulled = self
            .pull_image(Some(tenant), None, cache, reference, progress)
            .await?;
        apply(spec, &pulled);
        check_env("the image's environment", &spec.env)
    }

    /// The tree of template `template`'s pinned image `reference` (a host path, as a
    /// directory template's).
    pub(super) fn image_tree(&self, template: &str, reference: &str) -> ManagerResult<String> {
        let digest = pinned_digest(reference).ok_or_else(|| {
            ManagerError::Internal(format!(
                "template {template}'s image {reference} is not pinned to a digest"
            ))
        })?;
        self.tree_of_digest(
            template,
            reference,
            &digest,
            "make the template again to pull it",
        )
    }

    /// The tree of the image `digest` a build made for template `template`.
    pub(super) fn built_tree(&self, template: &str, digest: &str) -> ManagerResult<String> {
        if !crate::images::reference::is_sha256_digest(digest) {
            return Err(ManagerError::Internal(format!(
                "template {template}'s built image {digest:?} is not a digest"
            )));
        }
        self.tree_of_digest(template, digest, digest, "build the template again")
    }

    /// The tree of image `digest` (shown as `shown`), or what to do when it is gone.
    fn tree_of_digest(
        &self,
        template: &str,
        shown: &str,
        digest: &str,
        remedy: &str,
    ) -> ManagerResult<String> {
        let reference = shown;
        let cache = self.images.as_ref().ok_or_else(|| {
            ManagerError::Invalid(format!(
                "template {template} is made from an image, and this server keeps no images"
            ))
        })?;
        let tree = cache.tree_dir(digest).join("rootfs");
        if !tree.is_dir() {
            return Err(ManagerError::Conflict(format!(
                "template {template}'s image {reference} is no longer on this server: {remedy}"
            )));
        }
        tree.into_os_string().into_string().map_err(|p| {
            ManagerError::Internal(format!("image tree {} is not UTF-8", p.to_string_lossy()))
        })
    }
}

/// How long an image tree or layer stays after its last use although nothing refers to it:
/// longer than a pull and a template create take, so neither loses what it just found.
pub const IMAGE_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

impl super::SandboxManager {
    /// Removes the image trees no template and no active sandbox uses, and the layers no
    /// remaining tree uses (each after `ManagerOptions::image_grace`, [`IMAGE_GRACE`] unless
    /// set); how many went.
    pub async fn collect_images(&self) -> ManagerResult<usize> {
        let Some(cache) = self.inner.images.clone() else {
            return Ok(0);
        };
        let templates = self.inner.db(|s| s.all_templates()).await?;
        let sandboxes = self.inner.db(|s| s.active_sandboxes()).await?;
        let mut in_use = std::collections::HashSet::new();
        for t in &templates {
            match serde_json::from_value::<v1::TemplateSpec>(t.spec.clone()).map(|s| s.rootfs) {
                Ok(v1::Rootfs::Image(reference)) => in_use.extend(pinned_digest(&reference)),
                Ok(v1::Rootfs::Build(digest)) => {
                    in_use.insert(digest);
                }
                _ => {}
            }
        }
        let trees = cache.trees_dir();
        for rec in &sandboxes {
            if let Ok(Some(plan)) = super::stored_plan(rec)
                && let v1::Rootfs::Dir(dir) = &plan.rootfs
                && let Ok(rest) = std::path::Path::new(dir).strip_prefix(&trees)
                && let Some(hex) = rest.components().next()
            {
                in_use.insert(format!("sha256:{}", hex.as_os_str().to_string_lossy()));
            }
        }
        let grace = self.inner.opts.image_grace;
        let (trees, layers) = tokio::task::spawn_blocking(move || cache.collect(&in_use, grace))
            .await
            .map_err(|e| ManagerError::Internal(format!("image collection task: {e}")))?
            .map_err(image_error)?;
        if trees + layers > 0 {
            tracing::info!(trees, layers, "removed images no template or sandbox uses");
        }
        Ok(trees + layers)
    }
}

/// The digest a pinned reference (`name:tag@sha256:…`) names.
pub(super) fn pinned_digest(reference: &str) -> Option<String> {
    ImageRef::parse(reference)
        .ok()
        .and_then(|r| r.whole().split_once('@').map(|(_, d)| d.to_owned()))
}

/// `spec` pinned to `pulled` and given its defaults where the spec has none.
fn apply(spec: &mut v1::TemplateSpec, pulled: &PulledImage) {
    spec.rootfs = v1::Rootfs::Image(pulled.reference.clone());
    apply_config(spec, &pulled.config);
}

/// `spec` given the defaults of an image's run configuration `config` where it has none.
pub(super) fn apply_config(spec: &mut v1::TemplateSpec, config: &RunConfig) {
    let image_env = config.env.iter().flatten().filter_map(|entry| {
        let (k, v) = entry.split_once('=')?;
        (!k.is_empty() && !k.contains('\0') && !v.contains('\0'))
            .then(|| (k.to_owned(), v.to_owned()))
    });
    for (k, v) in image_env {
        spec.env.entry(k).or_insert(v);
    }
    if spec.workdir.is_none() {
        spec.workdir = config
            .working_dir
            .clone()
            .filter(|d| d.starts_with('/') && !d.contains('\0'));
    }
    if spec.user.is_none()
        && matches!(
            config.user.as_deref(),
            Some("root" | "0" | "0:0" | "root:root")
        )
    {
        spec.user = Some("root".into());
    }
}

/// `e` as the manager's error: the registry's and the image's faults told apart from the
/// caller's.
pub(super) fn image_error(e: ImageError) -> ManagerError {
    match e {
        ImageError::Invalid(m) | ImageError::Unsupported(m) => ManagerError::Invalid(m),
        ImageError::NotFound(m) => ManagerError::NotFound(m),
        ImageError::Unauthorized(m) => ManagerError::Forbidden(m),
        ImageError::Unreachable(m) | ImageError::Tampered(m) | ImageError::Registry(m) => {
            ManagerError::Unavailable(m)
        }
        ImageError::TooLarge(m) => ManagerError::TooLarge(m),
        ImageError::InsufficientStorage(m) => ManagerError::InsufficientStorage(m),
        ImageError::Io(m) => ManagerError::Internal(m),
    }
}
