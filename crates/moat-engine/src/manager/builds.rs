//! Builds (`/v1/builds`): templates made from a Dockerfile, in the background, with their
//! logs; the build contexts they copy from.
//!
//! A build is asked for with the Dockerfile's text and, for `COPY`, the digest of a context
//! archive uploaded before (content-addressed, per tenant, so an unchanged context is sent
//! once). The request is checked whole before it is accepted (the Dockerfile parsed, the
//! template name, backend, network and limits); it then waits for one of
//! [`MAX_CONCURRENT_BUILDS`] turns and runs its steps (`build_steps`), each `RUN` in a
//! sandbox of the tenant's. It ends by making the template, or replacing the one an earlier
//! build made.
//!
//! Each build is a directory `<build-dir>/builds/<id>/`: `build.json` (its record, replaced
//! by rename at each change) and `log` (at most [`MAX_BUILD_LOG_BYTES`]). A server that stops
//! during a build finds it at its next start and records it failed. Contexts are
//! `<build-dir>/contexts/<tenant>/<hex>.tar`; a tenant keeps at most
//! [`MAX_CONTEXT_BYTES_PER_TENANT`] of them, and those unused for [`CONTEXT_TTL`] go at its
//! next upload.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use moat_proto::units::describe_size;
use moat_proto::v1;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::task::TaskTracker;

use super::{ManagerError, ManagerResult, SandboxManager, lock};
use crate::auth::Caller;
use crate::clock::now_ms;
use crate::images::build::dockerfile;
use crate::images::reference::is_sha256_digest;

/// Builds running at once on the server (one per tenant); more wait their turn.
pub const MAX_CONCURRENT_BUILDS: usize = 2;
/// Builds one tenant may have queued or running; one more is refused (429).
pub const MAX_ACTIVE_BUILDS_PER_TENANT: usize = 4;
/// Finished builds kept per tenant (records and logs); the oldest go first.
pub const MAX_KEPT_BUILDS_PER_TENANT: usize = 50;
/// A build's time limit when its request names none.
pub const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The longest time limit a build may ask for.
pub const MAX_BUILD_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// Bytes of a build's log kept; what comes after is dropped, with a line saying so.
pub const MAX_BUILD_LOG_BYTES: u64 = 8 << 20;
/// Largest build context archive.
pub const MAX_CONTEXT_BYTES: u64 = 1 << 30;
/// Bytes of context archives one tenant may keep.
pub const MAX_CONTEXT_BYTES_PER_TENANT: u64 = 4 << 30;
/// How long a context stays after its last use.
pub const CONTEXT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Most bytes of a log one call returns.
const MAX_LOG_READ: u64 = 1 << 20;
/// How long an upload link stays valid.
pub const UPLOAD_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Label of upload tokens in the HMAC input.
const UPLOAD_LABEL: &[u8] = b"moat build context upload\0";

/// What the store of builds keeps of one, in `build.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct BuildRecord {
    pub tenant: String,
    pub build: v1::Build,
}

/// The builds of a server: where they live and which are under way.
pub(super) struct Builds {
    dir: PathBuf,
    pub(super) turns: Arc<tokio::sync::Semaphore>,
    /// One turn per tenant: a tenant runs one build at a time, so it cannot hold every
    /// server turn while another tenant's build waits.
    tenant_turns: TenantTurns,
    /// One context upload at a time per tenant, so that uploads side by side cannot each
    /// find room under the tenant's quota.
    uploads: TenantTurns,
    /// Builds queued or running, by id: their tenant and the way to cancel them.
    active: Mutex<HashMap<String, Active>>,
    /// Held while a record is written: a write a cancelled step left going must not
    /// interleave with the build's last one (both stage `build.json.tmp`).
    writing: Mutex<()>,
    /// Builds asked for whose steps have not come yet.
    pub(super) asked: super::asked_builds::AskedBuilds,
}

struct Active {
    tenant: String,
    cancel: tokio::sync::watch::Sender<bool>,
}

/// The image a template made by a build runs (its `rootfs` of kind `build`), if it says.
fn built_image(spec: &serde_json::Value) -> Option<String> {
    match serde_json::from_value::<v1::TemplateSpec>(spec.clone())
        .ok()?
        .rootfs
    {
        v1::Rootfs::Build(digest) => Some(digest),
        _ => None,
    }
}

impl Builds {
    /// The builds under `dir` (made, 0700, if missing); records of builds a stopped server
    /// left under way are marked failed, or succeeded where `store` holds the templates they
    /// wrote; what builds unpacked and did not remove is removed.
    pub(super) fn open(dir: &Path, store: &crate::store::Store) -> ManagerResult<Builds> {
        let io = |what: &str, e: std::io::Error| {
            ManagerError::Internal(format!("{what} {}: {e}", dir.display()))
        };
        for sub in ["", "builds", "contexts"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| io("making", e))?;
            std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(|e| io("securing", e))?;
        }
        let builds = Builds {
            dir: dir.to_owned(),
            turns: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_BUILDS)),
            tenant_turns: TenantTurns::default(),
            uploads: TenantTurns::default(),
            active: Mutex::new(HashMap::new()),
            writing: Mutex::new(()),
            asked: super::asked_builds::AskedBuilds::open(&dir.join("asked"))?,
        };
        // Half made (a crash before the first record): nothing to keep.
        for entry in std::fs::read_dir(dir.join("builds"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if !entry.path().join("build.json").is_file() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        // Uploads a stopped server cut off (none is under way yet).
        for tenant in std::fs::read_dir(dir.join("contexts"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for entry in std::fs::read_dir(tenant.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if entry.file_name().to_string_lossy().starts_with(".upload-") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        for mut rec in builds.all()? {
            if !rec.build.status.is_final() {
                // Its templates written, it succeeded: the server stopped before it recorded
                // that.
                let written = store.template_of_build(&rec.build.id).map_err(|e| {
                    ManagerError::Internal(format!("build {}'s templates: {e}", rec.build.id))
                })?;
                match written {
                    Some(template) => {
                        rec.build.status = v1::BuildStatus::Succeeded;
                        rec.build.image = built_image(&template.spec);
                    }
                    None => {
                        rec.build.status = v1::BuildStatus::Failed;
                        rec.build.error = Some("the server stopped during the build".into());
                    }
                }
                rec.build.finished_at = Some(now_ms());
                builds.write(&rec)?;
            }
            // What it unpacked, if a stop came before its cleanup (finished or not).
            for unpacked in ["context", "named"] {
                let _ = std::fs::remove_dir_all(builds.build_dir(&rec.build.id).join(unpacked));
            }
        }
        Ok(builds)
    }

    pub(super) fn build_dir(&self, id: &str) -> PathBuf {
        self.dir.join("builds").join(id)
    }

    fn contexts_dir(&self, tenant: &str) -> PathBuf {
        self.dir.join("contexts").join(tenant_dir(tenant))
    }

    /// The context archive `digest` of `tenant`, if uploaded. Only a well-formed digest
    /// names a file: anything else is no context.
    pub(super) fn context(&self, tenant: &str, digest: &str) -> Option<PathBuf> {
        if !is_sha256_digest(digest) {
            return None;
        }
        let path = self
            .contexts_dir(tenant)
            .join(format!("{}.tar", digest.strip_prefix("sha256:")?));
        path.is_file().then(|| {
            touch(&path);
            path
        })
    }

    /// Every build's record.
    fn all(&self) -> ManagerResult<Vec<BuildRecord>> {
        let dir = self.dir.join("builds");
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| ManagerError::Internal(format!("listing {}: {e}", dir.display())))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path().join("build.json");
            // A directory without a record yet is a build being made: not listed.
            if let Some(rec) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<BuildRecord>(&b).ok())
            {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// The record of build `id` of `tenant`.
    pub(super) fn read(&self, tenant: &str, id: &str) -> ManagerResult<BuildRecord> {
        let missing = || ManagerError::NotFound(format!("build {id} not found"));
        if !is_build_id(id) {
            return Err(missing());
        }
        let bytes = std::fs::read(self.build_dir(id).join("build.json")).map_err(|_| missing())?;
        let rec: BuildRecord = serde_json::from_slice(&bytes)
            .map_err(|e| ManagerError::Internal(format!("build {id}'s record: {e}")))?;
        if rec.tenant != tenant {
            return Err(missing());
        }
        Ok(rec)
    }

    /// Writes `rec` in place of its earlier record, synced with its directory and the
    /// directory's entry (a new build's), so that an acknowledged build survives a power loss.
    pub(super) fn write(&self, rec: &BuildRecord) -> ManagerResult<()> {
        let _writing = lock(&self.writing);
        let dir = self.build_dir(&rec.build.id);
        let io = |e: std::io::Error| {
            ManagerError::Internal(format!("recording build {}: {e}", rec.build.id))
        };
        let bytes = serde_json::to_vec_pretty(rec)
            .map_err(|e| ManagerError::Internal(format!("build record: {e}")))?;
        let staged = dir.join("build.json.tmp");
        let mut f = std::fs::File::create(&staged).map_err(io)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&staged, dir.join("build.json")).map_err(io)?;
        for synced in [Some(dir.as_path()), dir.parent()].into_iter().flatten() {
            std::fs::File::open(synced)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }

    /// Records of `tenant`'s builds, newest first.
    fn of_tenant(&self, tenant: &str) -> ManagerResult<Vec<BuildRecord>> {
        let mut recs: Vec<BuildRecord> = self
            .all()?
            .into_iter()
            .filter(|r| r.tenant == tenant)
            .collect();
        recs.sort_by_key(|r| std::cmp::Reverse(r.build.created_at));
        Ok(recs)
    }

    /// Removes `tenant`'s finished builds beyond the newest [`MAX_KEPT_BUILDS_PER_TENANT`].
    fn trim(&self, tenant: &str) -> ManagerResult<()> {
        let finished = self
            .of_tenant(tenant)?
            .into_iter()
            .filter(|r| r.build.status.is_final());
        for rec in finished.skip(MAX_KEPT_BUILDS_PER_TENANT) {
            let _ = std::fs::remove_dir_all(self.build_dir(&rec.build.id));
        }
        Ok(())
    }
}

/// A new build id.
pub fn new_build_id() -> ManagerResult<String> {
    let random = crate::store::generate_sandbox_id().map_err(ManagerError::from)?;
    Ok(format!("b-{}", random.chars().take(16).collect::<String>()))
}

/// A new build id in the form E2B's API gives builds: a random (version 4) UUID, lower case.
pub fn new_build_uuid() -> ManagerResult<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| ManagerError::Internal(format!("random build id: {e}")))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// One turn per tenant: a semaphore of one permit each, made when first asked for and
/// dropped once nobody holds or waits for it.
#[derive(Default)]
struct TenantTurns(Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>);

impl TenantTurns {
    /// `tenant`'s turn, to acquire.
    fn of(&self, tenant: &str) -> Arc<tokio::sync::Semaphore> {
        lock(&self.0)
            .entry(tenant.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(1)))
            .clone()
    }

    /// Drops `tenant`'s turn if nobody holds or waits for it (call with none of it held).
    fn forget_idle(&self, tenant: &str) {
        let mut turns = lock(&self.0);
        if turns.get(tenant).is_some_and(|t| Arc::strong_count(t) == 1) {
            turns.remove(tenant);
        }
    }
}

/// A build id: `b-` and 16 base32 characters, or a lower-case UUID (E2B's API's builds).
pub(super) fn is_build_id(id: &str) -> bool {
    let uuid = crate::ids::looks_like_uuid(id) && !id.bytes().any(|b| b.is_ascii_uppercase());
    uuid || id.strip_prefix("b-").is_some_and(|rest| {
        rest.len() == 16
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

/// A tenant's directory name: a digest of its name, which may hold any character.
fn tenant_dir(tenant: &str) -> String {
    let hash = Sha256::digest(tenant.as_bytes());
    hash.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Marks `path` used now.
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// The log of a build, appended to as it runs, bounded.
pub(super) struct BuildLog {
    file: tokio::fs::File,
    written: u64,
    full: bool,
}

impl BuildLog {
    pub(super) async fn create(path: &Path) -> ManagerResult<BuildLog> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|e| ManagerError::Internal(format!("opening {}: {e}", path.display())))?;
        Ok(BuildLog {
            file,
            written: 0,
            full: false,
        })
    }

    /// Appends `text`; past [`MAX_BUILD_LOG_BYTES`], drops it (saying so once).
    pub(super) async fn write(&mut self, text: &str) {
        if self.full {
            return;
        }
        let room = MAX_BUILD_LOG_BYTES.saturating_sub(self.written);
        let bytes = text.as_bytes();
        let cut = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let mut out = bytes[..cut].to_vec();
        if cut < bytes.len() {
            self.full = true;
            out.extend_from_slice(
                format!(
                    "\n[the log reached {} and the rest is not kept]\n",
                    describe_size(MAX_BUILD_LOG_BYTES)
                )
                .as_bytes(),
            );
        }
        self.written = self.written.saturating_add(out.len() as u64);
        // A log that cannot be written must not fail the build.
        let _ = self.file.write_all(&out).await;
    }

    /// Appends `line` and a newline.
    pub(super) async fn line(&mut self, line: &str) {
        self.write(&format!("{line}\n")).await;
    }
}

impl SandboxManager {
    pub(super) fn builds(&self) -> ManagerResult<&Builds> {
        match (&self.inner.builds, &self.inner.images) {
            (Some(b), Some(_)) => Ok(b),
            _ => Err(ManagerError::Invalid(
                "this server keeps no images: builds need `moat serve`".into(),
            )),
        }
    }

    /// Runs `f` on the builds' records on the blocking pool: records are synced to disk,
    /// and listings read every build's record.
    pub(super) async fn on_builds<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Builds) -> ManagerResult<T> + Send + 'static,
    ) -> ManagerResult<T> {
        self.builds()?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || match &inner.builds {
            Some(builds) => f(builds),
            None => Err(ManagerError::Internal("builds went away".into())),
        })
        .await
        .map_err(|e| ManagerError::Internal(format!("builds task: {e}")))?
    }

    /// Writes the end of the build `rec` (its status set) with the time it ended.
    async fn record_end(&self, rec: &mut BuildRecord) {
        rec.build.finished_at = Some(now_ms());
        let written = rec.clone();
        if let Err(e) = self.on_builds(move |b| b.write(&written)).await {
            tracing::warn!(build = %rec.build.id, "recording the end of a build: {e}");
        }
    }

    /// Stores the build context archive `body` for the caller's tenant as `digest` (which its
    /// bytes must have); its size. Already there: the body is not read.
    pub async fn put_build_context<S, E>(
        &self,
        caller: &Caller,
        digest: &str,
        body: S,
    ) -> ManagerResult<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let builds = self.builds()?;
        if !is_sha256_digest(digest) {
            return Err(ManagerError::Invalid(format!(
                "{digest:?} is not a sha256 digest (sha256:<64 hex digits>)"
            )));
        }
        if let Some(path) = builds.context(&caller.tenant, digest) {
            return std::fs::metadata(&path)
                .map(|m| m.len())
                .map_err(|e| ManagerError::Internal(format!("{}: {e}", path.display())));
        }
        let (_, size) = self
            .store_context(&caller.tenant, Some(digest), body)
            .await?;
        Ok(size)
    }

    /// A URL path token that lets its bearer upload the context named `name` (a client's own
    /// name for it, such as the hash E2B's SDK gives a `COPY`'s files) for the caller's
    /// tenant, for [`UPLOAD_TOKEN_LIFETIME`] and while the caller's key is not revoked: E2B's
    /// SDK uploads without its API key.
    pub fn build_upload_token(&self, caller: &Caller, name: &str) -> ManagerResult<String> {
        check_context_name(name)?;
        let expires = now_ms() / 1000 + UPLOAD_TOKEN_LIFETIME.as_secs() as i64;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let tenant = b64(&caller.tenant);
        // `-` for a caller of no key (the server's own).
        let key = caller.key_id().map_or_else(|| "-".to_owned(), b64);
        // Tenant and key first, expiry last: the name between them may hold dots.
        let claim = format!("{tenant}.{key}.{name}.{expires}");
        let mac = super::access::derive_labelled(&self.inner.access_key, UPLOAD_LABEL, &claim);
        Ok(format!("{claim}.{mac}"))
    }

    /// Stores the archive `body` as the context named in `token` (see
    /// [`SandboxManager::build_upload_token`]); its size.
    pub async fn put_build_context_by_token<S, E>(&self, token: &str, body: S) -> ManagerResult<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let refused = || ManagerError::Forbidden("the upload link is invalid or expired".into());
        let (claim, mac) = token.rsplit_once('.').ok_or_else(refused)?;
        let expected = super::access::derive_labelled(&self.inner.access_key, UPLOAD_LABEL, claim);
        // Compared whole; the token is a bearer secret of fixed length.
        if !constant_time_eq(expected.as_bytes(), mac.as_bytes()) {
            return Err(refused());
        }
        let (tenant, rest) = claim.split_once('.').ok_or_else(refused)?;
        let (key, rest) = rest.split_once('.').ok_or_else(refused)?;
        let (name, expires) = rest.rsplit_once('.').ok_or_else(refused)?;
        let expires: i64 = expires.parse().map_err(|_| refused())?;
        if expires < now_ms() / 1000 {
            return Err(refused());
        }
        let unb64 = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .ok()
                .and_then(|t| String::from_utf8(t).ok())
        };
        let tenant = unb64(tenant).ok_or_else(refused)?;
        check_context_name(name)?;
        // A link outlives no revocation of the key it was made for.
        if key != "-" {
            let key = unb64(key).ok_or_else(refused)?;
            let (t, k) = (tenant.clone(), key);
            let live = self
                .inner
                .db(move |s| s.get_key(&t, &k))
                .await
                .is_ok_and(|k| k.revoked_at.is_none());
            if !live {
                return Err(refused());
            }
        }
        let (digest, size) = self.store_context(&tenant, None, body).await?;
        let builds = self.builds()?;
        let names = builds.contexts_dir(&tenant).join("names");
        std::fs::create_dir_all(&names)
            .and_then(|()| std::fs::write(names.join(name), &digest))
            .map_err(|e| ManagerError::Internal(format!("naming a context: {e}")))?;
        Ok(size)
    }

    /// The digest of the context the caller's tenant uploaded under `name`, if it is still
    /// there.
    pub fn named_build_context(
        &self,
        caller: &Caller,
        name: &str,
    ) -> ManagerResult<Option<String>> {
        check_context_name(name)?;
        let builds = self.builds()?;
        let path = builds.contexts_dir(&caller.tenant).join("names").join(name);
        let Ok(digest) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let digest = digest.trim().to_owned();
        Ok(builds.context(&caller.tenant, &digest).map(|_| digest))
    }

    /// Streams `body` into `tenant`'s contexts, checked against `expected` when given; its
    /// digest and size.
    async fn store_context<S, E>(
        &self,
        tenant: &str,
        expected: Option<&str>,
        body: S,
    ) -> ManagerResult<(String, u64)>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let builds = self.builds()?;
        let result = {
            let _turn = builds
                .uploads
                .of(tenant)
                .acquire_owned()
                .await
                .map_err(|e| ManagerError::Internal(format!("upload queue: {e}")))?;
            self.store_context_now(builds, tenant, expected, body).await
        };
        builds.uploads.forget_idle(tenant);
        result
    }

    /// [`SandboxManager::store_context`], the tenant's upload turn held.
    async fn store_context_now<S, E>(
        &self,
        builds: &Builds,
        tenant: &str,
        expected: Option<&str>,
        body: S,
    ) -> ManagerResult<(String, u64)>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let dir = builds.contexts_dir(tenant);
        let used = prune_contexts(&dir)?;
        let room = MAX_CONTEXT_BYTES_PER_TENANT.saturating_sub(used);
        let limit = MAX_CONTEXT_BYTES.min(room);
        let staged = tempfile::Builder::new()
            .prefix(".upload-")
            .tempfile_in(&dir)
            .map_err(|e| ManagerError::Internal(format!("staging a context: {e}")))?;
        let io = |e: std::io::Error| ManagerError::Internal(format!("writing a context: {e}"));
        let mut file = tokio::fs::File::from_std(staged.reopen().map_err(io)?);
        let mut hash = Sha256::new();
        let mut size: u64 = 0;
        let mut body = std::pin::pin!(body);
        while let Some(piece) = body.next().await {
            let piece =
                piece.map_err(|e| ManagerError::Invalid(format!("reading the upload: {e}")))?;
            let before = size;
            size = size.saturating_add(piece.len() as u64);
            if size > limit {
                return Err(if limit < MAX_CONTEXT_BYTES {
                    ManagerError::QuotaExceeded(format!(
                        "the tenant's build contexts would take more than {}; contexts unused \
                         for a day are removed",
                        describe_size(MAX_CONTEXT_BYTES_PER_TENANT)
                    ))
                } else {
                    ManagerError::TooLarge(format!(
                        "a build context is at most {}",
                        describe_size(MAX_CONTEXT_BYTES)
                    ))
                });
            }
            if before >> 26 != size >> 26 {
                self.inner.check_build_disk(64 << 20)?;
            }
            hash.update(&piece);
            file.write_all(&piece).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        let actual: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let digest = format!("sha256:{actual}");
        if let Some(expected) = expected
            && digest != expected
        {
            return Err(ManagerError::Invalid(format!(
                "the upload's digest is {digest}, not {expected}"
            )));
        }
        let target = dir.join(format!("{actual}.tar"));
        staged
            .persist(&target)
            .map_err(|e| ManagerError::Internal(format!("keeping a context: {e}")))?;
        // The rename is on disk before the upload is acknowledged.
        let synced = match tokio::fs::File::open(&dir).await {
            Ok(d) => d.sync_all().await,
            Err(e) => Err(e),
        };
        synced.map_err(|e| ManagerError::Internal(format!("keeping a context: {e}")))?;
        Ok((digest, size))
    }

    /// Whether the caller's tenant has the context `digest`.
    pub fn has_build_context(&self, caller: &Caller, digest: &str) -> ManagerResult<bool> {
        Ok(self.builds()?.context(&caller.tenant, digest).is_some())
    }

    /// Checks `req` whole and starts its build; the build as it stands (queued).
    pub async fn create_build(
        &self,
        caller: &Caller,
        req: v1::CreateBuild,
    ) -> ManagerResult<v1::Build> {
        let id = new_build_id()?;
        self.create_build_as(caller, &id, req).await
    }

    /// [`SandboxManager::create_build`] under the id `id` (one [`new_build_id`] made, which a
    /// front end handed out before the build was asked for); `409` if it is taken.
    pub async fn create_build_as(
        &self,
        caller: &Caller,
        id: &str,
        req: v1::CreateBuild,
    ) -> ManagerResult<v1::Build> {
        let builds = self.builds()?;
        if !is_build_id(id) {
            return Err(ManagerError::Invalid(format!("{id:?} is not a build id")));
        }
        let parsed = dockerfile::parse(&req.dockerfile)
            .map_err(|e| ManagerError::Invalid(format!("Dockerfile {e}")))?;
        if parsed.steps.len() > crate::images::build::MAX_BUILD_STEPS {
            return Err(ManagerError::Invalid(format!(
                "the Dockerfile has {} steps; a build takes at most {}",
                parsed.steps.len(),
                crate::images::build::MAX_BUILD_STEPS
            )));
        }
        let names = build_names(&req)?;
        let mut builtin = false;
        for existing in self.existing_templates(caller, &names).await? {
            // An admin's build may replace a built-in template (the interpreter's image, say).
            if existing.tenant.is_none() && caller.is_admin() {
                builtin = true;
            } else if existing.tenant.is_none() || !replaceable(&existing) {
                return Err(ManagerError::Conflict(format!(
                    "template {} exists and no build made it: delete it or build another name \
                     (an admin key's build may replace a built-in one)",
                    existing.name
                )));
            }
        }
        for (name, template) in &req.from_templates {
            check_context_name(name)?;
            // Checked now, so a build that cannot start is refused before it is queued.
            self.template_state(caller, template).await?;
        }
        let plan = self
            .inner
            .build_plan(caller, &req, parsed, names, builtin)?;
        // Each is unpacked for the build: no more than its instructions could copy from.
        if req.contexts.len() > dockerfile::MAX_INSTRUCTIONS {
            return Err(ManagerError::Invalid(format!(
                "{} named build contexts, more than the {} a build may have",
                req.contexts.len(),
                dockerfile::MAX_INSTRUCTIONS
            )));
        }
        let named = req.contexts.iter().map(|(n, d)| (Some(n), d));
        for (name, digest) in req.context.iter().map(|d| (None, d)).chain(named) {
            if let Some(name) = name {
                check_context_name(name)?;
            }
            if builds.context(&caller.tenant, digest).is_none() {
                return Err(ManagerError::Invalid(format!(
                    "no build context {digest}: upload it first (PUT /v1/build-contexts/{digest})"
                )));
            }
        }
        let id = id.to_owned();
        let (cancel, cancelled) = tokio::sync::watch::channel(false);
        {
            let mut active = lock(&builds.active);
            let mine = active
                .values()
                .filter(|a| a.tenant == caller.tenant)
                .count();
            if mine >= MAX_ACTIVE_BUILDS_PER_TENANT {
                return Err(ManagerError::QuotaExceeded(format!(
                    "{mine} builds of this tenant are queued or running, the most it may have; \
                     wait for one to end"
                )));
            }
            active.insert(
                id.clone(),
                Active {
                    tenant: caller.tenant.clone(),
                    cancel,
                },
            );
        }
        let rec = BuildRecord {
            tenant: caller.tenant.clone(),
            build: v1::Build {
                id: id.clone(),
                template: req.template.clone(),
                tags: req.tags.clone(),
                status: v1::BuildStatus::Queued,
                error: None,
                steps: u32::try_from(plan.dockerfile.steps.len()).unwrap_or(u32::MAX),
                steps_done: 0,
                steps_cached: 0,
                image: None,
                created_at: now_ms(),
                finished_at: None,
                warnings: plan.dockerfile.warnings.clone(),
            },
        };
        // `create_dir` fails on a taken id: no build is ever written over.
        let (written, made_id) = (rec.clone(), id.clone());
        let made = self
            .on_builds(move |b| {
                std::fs::create_dir(b.build_dir(&made_id))
                    .map_err(|e| {
                        ManagerError::Internal(format!("making build {made_id}'s directory: {e}"))
                    })
                    .and_then(|()| b.write(&written))
            })
            .await;
        if let Err(e) = made {
            lock(&builds.active).remove(&id);
            return Err(e);
        }
        let tenant = caller.tenant.clone();
        let _ = self.on_builds(move |b| b.trim(&tenant)).await;
        let manager = self.clone();
        let caller = caller.clone();
        let build = rec.build.clone();
        tokio::spawn(async move { manager.run_build(caller, rec, plan, cancelled).await });
        Ok(build)
    }

    /// Runs a build to its end and records how it ended.
    async fn run_build(
        &self,
        caller: Caller,
        mut rec: BuildRecord,
        plan: super::build_steps::BuildPlan,
        mut cancelled: tokio::sync::watch::Receiver<bool>,
    ) {
        let Ok(builds) = self.builds() else {
            return;
        };
        let id = rec.build.id.clone();
        let dir = builds.build_dir(&id);
        let creates = TaskTracker::new();
        let host_work = TaskTracker::new();
        // The build's turns are held until its work on the host ends, not its steps: what a
        // cancelled or timed-out step left running (a pull, a layer being unpacked, a tree
        // being merged, in `host_work`) still counts as the tenant's one build at a time.
        let (mut tenant_turn, mut server_turn) = (None, None);
        let outcome = async {
            let mut log = BuildLog::create(&dir.join("log")).await?;
            let mine = builds.tenant_turns.of(&caller.tenant);
            tenant_turn = Some(tokio::select! {
                turn = mine.acquire_owned() => turn
                    .map_err(|e| ManagerError::Internal(format!("build queue: {e}")))?,
                _ = cancelled.wait_for(|c| *c) => return Err(cancelled_error()),
            });
            let turns = builds.turns.clone();
            server_turn = Some(tokio::select! {
                turn = turns.acquire_owned() => turn
                    .map_err(|e| ManagerError::Internal(format!("build queue: {e}")))?,
                _ = cancelled.wait_for(|c| *c) => return Err(cancelled_error()),
            });
            rec.build.status = v1::BuildStatus::Running;
            let written = rec.clone();
            self.on_builds(move |b| b.write(&written)).await?;
            let timeout = plan.timeout;
            let run = self.run_steps(
                &caller,
                &mut rec,
                builds,
                &plan,
                (&creates, &host_work),
                &mut log,
            );
            let result = tokio::select! {
                r = tokio::time::timeout(timeout, run) => r.unwrap_or_else(|_| {
                    Err(ManagerError::Timeout(format!(
                        "the build took longer than its {} s limit",
                        timeout.as_secs()
                    )))
                }),
                _ = cancelled.wait_for(|c| *c) => Err(cancelled_error()),
            };
            // Written outside the select: a build recorded cancelled or timed out never has
            // written its templates, and a cancel that comes during the write is too late.
            let result = match result {
                Ok((digest, config)) => self
                    .write_built_template(&caller, &plan, &digest, &config, &id)
                    .await
                    .map(|()| digest),
                Err(e) => Err(e),
            };
            match &result {
                Ok(image) => log.line(&format!("built {image}")).await,
                Err(e) => log.line(&format!("error: {e}")).await,
            }
            result
        }
        .await;
        let was_cancelled = *cancelled.borrow();
        // Whatever a step left running (the select above dropped it mid-way) is ended here,
        // once a sandbox it was making is recorded.
        // A build that succeeded is recorded so before the cleanup: its templates are written,
        // and a server stopped during the cleanup must not find it unfinished and fail it.
        // One that did not is recorded after it, so that its end means nothing of it runs.
        let ended = match outcome {
            Ok(image) => {
                rec.build.status = v1::BuildStatus::Succeeded;
                rec.build.image = Some(image);
                true
            }
            Err(e) => {
                rec.build.status = if was_cancelled {
                    v1::BuildStatus::Cancelled
                } else {
                    v1::BuildStatus::Failed
                };
                rec.build.error = Some(e.to_string());
                false
            }
        };
        if ended {
            self.record_end(&mut rec).await;
        }
        creates.close();
        creates.wait().await;
        self.end_build_sandboxes(&caller, &id).await;
        if !ended {
            self.record_end(&mut rec).await;
        }
        lock(&builds.active).remove(&id);
        // What the steps left running on the host finishes in the background; the contexts
        // are removed once nothing unpacks into them, and the turns given back after that.
        host_work.close();
        let manager = self.clone();
        tokio::spawn(async move {
            host_work.wait().await;
            // Up to hundreds of thousands of files: off the async workers.
            let _ = tokio::task::spawn_blocking(move || {
                for name in ["context", "named"] {
                    let _ = std::fs::remove_dir_all(dir.join(name));
                }
            })
            .await;
            drop((server_turn, tenant_turn));
            if let Ok(builds) = manager.builds() {
                builds.tenant_turns.forget_idle(&caller.tenant);
            }
        });
    }

    /// Ends the sandboxes build `id` of `caller` made that are still there.
    async fn end_build_sandboxes(&self, caller: &Caller, id: &str) {
        let tenant = caller.tenant.clone();
        let Ok(sandboxes) = self.inner.db(move |s| s.active_sandboxes()).await else {
            return;
        };
        for rec in sandboxes {
            if rec.tenant == tenant
                && rec
                    .metadata
                    .get(super::build_steps::BUILD_METADATA)
                    .map(String::as_str)
                    == Some(id)
            {
                let _ = self.delete(caller, &rec.id).await;
            }
        }
    }

    /// The caller's build `id`.
    pub async fn get_build(&self, caller: &Caller, id: &str) -> ManagerResult<v1::Build> {
        Ok(self.builds()?.read(&caller.tenant, id)?.build)
    }

    /// The caller's builds, newest first.
    pub async fn list_builds(&self, caller: &Caller) -> ManagerResult<v1::BuildList> {
        let tenant = caller.tenant.clone();
        let builds = self
            .on_builds(move |b| b.of_tenant(&tenant))
            .await?
            .into_iter()
            .map(|r| r.build)
            .collect();
        Ok(v1::BuildList { builds })
    }

    /// Build `id`'s log from byte `offset` (at most 1 MiB of it).
    pub async fn build_logs(
        &self,
        caller: &Caller,
        id: &str,
        offset: u64,
    ) -> ManagerResult<v1::BuildLogs> {
        let builds = self.builds()?;
        // Read before the log, so a build that ended in between is not reported done early.
        let done = builds.read(&caller.tenant, id)?.build.status.is_final();
        let path = builds.build_dir(id).join("log");
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(v1::BuildLogs {
                    text: String::new(),
                    next_offset: 0,
                    done,
                });
            }
            Err(e) => return Err(ManagerError::Internal(format!("{}: {e}", path.display()))),
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let offset = offset.min(len);
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset))
            .map_err(|e| ManagerError::Internal(format!("{}: {e}", path.display())))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&mut file, MAX_LOG_READ),
            &mut bytes,
        )
        .map_err(|e| ManagerError::Internal(format!("{}: {e}", path.display())))?;
        // Whole characters only: a character cut at the end comes with the next read.
        let whole = match std::str::from_utf8(&bytes) {
            Ok(_) => bytes.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => bytes.len(),
        };
        let next_offset = offset + whole as u64;
        Ok(v1::BuildLogs {
            text: String::from_utf8_lossy(&bytes[..whole]).into_owned(),
            next_offset,
            done: done && next_offset >= len,
        })
    }

    /// Lines `skip..skip + limit` of build `id`'s log (a line still being written is left for
    /// a later call), and whether the build is over and this the end of its log.
    pub async fn build_log_lines(
        &self,
        caller: &Caller,
        id: &str,
        skip: usize,
        limit: usize,
    ) -> ManagerResult<(Vec<String>, bool)> {
        let builds = self.builds()?;
        let done = builds.read(&caller.tenant, id)?.build.status.is_final();
        let path = builds.build_dir(id).join("log");
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), done)),
            Err(e) => return Err(ManagerError::Internal(format!("{}: {e}", path.display()))),
        };
        let mut reader = std::io::BufReader::new(file);
        let mut lines = Vec::new();
        let mut index = 0;
        let mut buf = Vec::new();
        let mut at_end = false;
        while lines.len() < limit {
            buf.clear();
            let n = std::io::BufRead::read_until(&mut reader, b'\n', &mut buf)
                .map_err(|e| ManagerError::Internal(format!("{}: {e}", path.display())))?;
            if n == 0 {
                at_end = true;
                break;
            }
            // Unfinished: left for later, unless the build is over.
            if buf.last() != Some(&b'\n') && !done {
                at_end = true;
                break;
            }
            if index >= skip {
                let text = String::from_utf8_lossy(&buf);
                lines.push(text.trim_end_matches(['\n', '\r']).to_owned());
            }
            index += 1;
        }
        Ok((lines, done && at_end))
    }

    /// Cancels the caller's build `id` if it is under way; the build as it stands.
    pub async fn cancel_build(&self, caller: &Caller, id: &str) -> ManagerResult<v1::Build> {
        let builds = self.builds()?;
        let rec = builds.read(&caller.tenant, id)?;
        if let Some(active) = lock(&builds.active).get(id) {
            let _ = active.cancel.send(true);
        }
        Ok(rec.build)
    }

    /// Deletes the caller's finished build `id` (its record and log).
    pub async fn delete_build(&self, caller: &Caller, id: &str) -> ManagerResult<()> {
        let builds = self.builds()?;
        let rec = builds.read(&caller.tenant, id)?;
        if !rec.build.status.is_final() {
            return Err(ManagerError::Conflict(format!(
                "build {id} is {}: cancel it first",
                serde_json::to_value(rec.build.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )));
        }
        std::fs::remove_dir_all(builds.build_dir(id))
            .map_err(|e| ManagerError::Internal(format!("removing build {id}: {e}")))
    }
}

impl super::Inner {
    /// Refuses `bytes` more of the data directory when that would leave less than the
    /// reserve free (507).
    pub(super) fn check_build_disk(&self, bytes: u64) -> ManagerResult<()> {
        match &self.images {
            Some(cache) => cache.check_free(bytes).map_err(super::images::image_error),
            None => Ok(()),
        }
    }
}

/// Checks a context name (a named context of a build, or an uploaded context's own name).
pub(super) fn check_context_name(name: &str) -> ManagerResult<()> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ManagerError::Invalid(format!(
            "context name {name:?}: expected [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}"
        )))
    }
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a template's stored spec is one a build made.
pub(super) fn made_by_build(spec: &serde_json::Value) -> bool {
    spec.get("rootfs").and_then(|r| r.get("build")).is_some()
}

/// Whether a build or a tag may write over `existing`: a build made it, or it is a tag (a
/// name that points at whatever was last written to it).
pub(super) fn replaceable(existing: &crate::store::TemplateRecord) -> bool {
    made_by_build(&existing.spec) || crate::ids::split_template_name(&existing.name).1.is_some()
}

/// The names a build writes: its template, and the same name with each of its tags.
fn build_names(req: &v1::CreateBuild) -> ManagerResult<Vec<String>> {
    crate::store::check_template_name(&req.template).map_err(ManagerError::from)?;
    let (base, _) = crate::ids::split_template_name(&req.template);
    tagged_names(base, &req.template, &req.tags)
}

/// `first` and `base:tag` for each of `tags` (the tag `default` standing for `base`), without
/// repeats, each checked; at most [`v1::MAX_TEMPLATE_TAGS`] tags.
pub fn tagged_names(base: &str, first: &str, tags: &[String]) -> ManagerResult<Vec<String>> {
    if tags.len() > v1::MAX_TEMPLATE_TAGS {
        return Err(ManagerError::Invalid(format!(
            "{} tags; at most {} at once",
            tags.len(),
            v1::MAX_TEMPLATE_TAGS
        )));
    }
    let mut names = vec![first.to_owned()];
    for tag in tags {
        let name = if tag == crate::ids::DEFAULT_TAG {
            base.to_owned()
        } else {
            format!("{base}{}{tag}", crate::ids::TAG_SEPARATOR)
        };
        crate::store::check_template_name(&name).map_err(ManagerError::from)?;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

fn cancelled_error() -> ManagerError {
    ManagerError::Conflict("the build was cancelled".into())
}

/// Removes the contexts in `dir` unused for [`CONTEXT_TTL`] and the uploads a crash left;
/// the bytes of those that stay.
fn prune_contexts(dir: &Path) -> ManagerResult<u64> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ManagerError::Internal(format!("making {}: {e}", dir.display())))?;
    let mut used = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        let upload = entry.file_name().to_string_lossy().starts_with(".upload-");
        if age > CONTEXT_TTL || (upload && age > Duration::from_secs(3600)) {
            let _ = std::fs::remove_file(entry.path());
        } else {
            used += meta.len();
        }
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_have_one_shape() {
        assert!(is_build_id("b-abcdefgh23456789"));
        assert!(!is_build_id("b-abcdefgh2345678"));
        assert!(!is_build_id("b-../../etc/passwd"));
        assert!(!is_build_id("abcdefgh23456789"));
        let uuid = new_build_uuid().expect("a uuid");
        assert!(is_build_id(&uuid), "{uuid}");
        assert_eq!(&uuid[14..15], "4");
        assert!(!is_build_id(&uuid.to_uppercase()));
        assert_ne!(uuid, new_build_uuid().expect("a uuid"));
    }

    fn build(id: &str, status: v1::BuildStatus) -> BuildRecord {
        BuildRecord {
            tenant: "acme".into(),
            build: v1::Build {
                id: id.into(),
                template: "py".into(),
                tags: Vec::new(),
                status,
                error: None,
                steps: 1,
                steps_done: 1,
                steps_cached: 0,
                image: None,
                created_at: 1,
                finished_at: None,
                warnings: Vec::new(),
            },
        }
    }

    #[test]
    fn a_restart_settles_unfinished_builds_and_removes_what_builds_and_uploads_left() {
        let dir = tempfile::tempdir().expect("dir");
        let store = crate::store::Store::open_in_memory().expect("store");
        store.create_tenant("acme", "Acme").expect("tenant");
        let (wrote, cut, done) = (
            "b-aaaaaaaaaaaaaaaa",
            "b-bbbbbbbbbbbbbbbb",
            "b-cccccccccccccccc",
        );
        {
            let builds = Builds::open(dir.path(), &store).expect("open");
            for (id, status) in [
                (wrote, v1::BuildStatus::Running),
                (cut, v1::BuildStatus::Running),
                (done, v1::BuildStatus::Succeeded),
            ] {
                let unpacked = builds.build_dir(id);
                for sub in ["context/etc", "named/x"] {
                    std::fs::create_dir_all(unpacked.join(sub)).expect("unpacked");
                }
                builds.write(&build(id, status)).expect("record");
            }
        }
        // The first wrote its template before the server stopped; the second did not.
        let spec = serde_json::json!({"rootfs": {"build": "sha256:0123"}});
        store
            .put_templates(
                Some("acme"),
                None,
                &["py".to_owned()],
                &spec,
                &serde_json::json!({}),
                Some(wrote),
                |_| true,
            )
            .expect("template");

        // An upload cut off by the stop, beside one that was kept.
        let contexts = dir.path().join("contexts").join(tenant_dir("acme"));
        std::fs::create_dir_all(&contexts).expect("contexts");
        std::fs::write(contexts.join(".upload-x1"), b"half").expect("upload");
        std::fs::write(contexts.join("00.tar"), b"kept").expect("context");

        let builds = Builds::open(dir.path(), &store).expect("reopen");
        assert!(
            !contexts.join(".upload-x1").exists(),
            "a cut-off upload stayed"
        );
        assert!(contexts.join("00.tar").exists(), "a kept context went");
        let status = |id: &str| {
            builds
                .all()
                .expect("records")
                .into_iter()
                .find(|r| r.build.id == id)
                .expect("record")
                .build
        };
        let b = status(wrote);
        assert_eq!(b.status, v1::BuildStatus::Succeeded, "{b:?}");
        assert_eq!(b.image.as_deref(), Some("sha256:0123"));
        assert!(b.error.is_none() && b.finished_at.is_some(), "{b:?}");
        let b = status(cut);
        assert_eq!(b.status, v1::BuildStatus::Failed, "{b:?}");
        assert!(b.error.is_some_and(|e| e.contains("stopped")));
        assert_eq!(status(done).status, v1::BuildStatus::Succeeded);
        for id in [wrote, cut, done] {
            for sub in ["context", "named"] {
                assert!(
                    !builds.build_dir(id).join(sub).exists(),
                    "{id}/{sub} outlived the restart"
                );
            }
        }
    }

    #[test]
    fn templates_made_by_builds_are_told_apart() {
        assert!(made_by_build(
            &serde_json::json!({"rootfs": {"build": "sha256:00"}})
        ));
        assert!(!made_by_build(&serde_json::json!({"rootfs": "host"})));
        assert!(!made_by_build(
            &serde_json::json!({"rootfs": {"image": "x"}})
        ));
    }
}
