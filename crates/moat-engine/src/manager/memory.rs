//! Snapshots with memory: a backend's checkpoint of a running sandbox (its processes, their
//! memory and the files it wrote), kept in the snapshot directory as `<id>.mem/` beside the
//! file-only `<id>.tar` snapshots, with a manifest of every file's SHA-256 that is checked before
//! anything is restored from it (a changed or added file is refused).
//!
//! Taking one briefly stops the sandbox: its agent is told to expect a new channel, the backend
//! saves it (which ends its processes on gvisor), and the sandbox is restored from what was
//! saved under the same id, with a new channel; streams open on it end. Meanwhile it counts as
//! paused (calls are refused with 409). Only backends with `Capabilities::memory_checkpoint`
//! can; the native backend cannot.
//!
//! A sandbox paused to disk outlives its server: the next one on the same data directory
//! takes it over, still paused, from its record and its `paused/<id>` directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sha2::{Digest, Sha256};

use super::snapshots::{Captured, RemoveOnDrop};
use super::{Inner, Live, ManagerError, ManagerResult, SandboxManager, lock, stored_plan};
use crate::agent_client::AgentClient;
use crate::auth::Caller;
use crate::backend::{Backend, Capabilities, Instance};
use crate::plan::SandboxPlan;
use crate::store::{EndReason, SandboxRecord, SandboxState};

/// The suffix of a snapshot-with-memory directory in the snapshot directory.
pub(super) const MEMORY_SUFFIX: &str = ".mem";
/// The manifest in such a directory: every other file's size and SHA-256.
const MANIFEST: &str = "manifest.json";

/// Most files a checkpoint directory may hold (gVisor writes a handful).
const MAX_CHECKPOINT_FILES: usize = 256;

/// The most bytes a checkpoint of a sandbox limited to `memory_bytes` may hold: its memory
/// twice over and a margin for the runtime's own state. Anything more was not written by an
/// honest runtime, and is refused before a byte of it is hashed.
fn checkpoint_bound(memory_bytes: u64) -> u64 {
    memory_bytes.saturating_mul(2).saturating_add(256 << 20)
}

/// Writes the manifest of `dir` (every regular file in it, none in subdirectories) and syncs
/// the directory, refusing first a directory of more than [`MAX_CHECKPOINT_FILES`] files or
/// `max_bytes` bytes (apparent or allocated). Returns the files' total size.
fn write_manifest(dir: &Path, max_bytes: u64) -> std::io::Result<u64> {
    let (mut count, mut apparent, mut allocated) = (0usize, 0u64, 0u64);
    for entry in std::fs::read_dir(dir)? {
        let md = entry?.metadata()?;
        count += 1;
        apparent = apparent.saturating_add(md.len());
        allocated = allocated
            .saturating_add(std::os::unix::fs::MetadataExt::blocks(&md).saturating_mul(512));
        if count > MAX_CHECKPOINT_FILES || apparent.max(allocated) > max_bytes {
            return Err(std::io::Error::other(format!(
                "the checkpoint holds more than {MAX_CHECKPOINT_FILES} files or {max_bytes} \
                 bytes, more than its sandbox's memory could make"
            )));
        }
    }
    let mut files = BTreeMap::new();
    let mut total: u64 = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let md = entry.metadata()?;
        // Written by the backend's runtime (on gvisor as an unprivileged jail, but stored
        // under host ids): nothing but plain files, no set-id or sticky bits.
        if !md.is_file() || std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7000 != 0
        {
            return Err(std::io::Error::other(format!(
                "{} in a checkpoint is not a plain regular file",
                entry.path().display()
            )));
        }
        let digest = sha256_of(&entry.path())?;
        total = total.saturating_add(md.len());
        files.insert(
            name,
            serde_json::json!({"size": md.len(), "sha256": digest}),
        );
    }
    let manifest = serde_json::json!({ "files": files });
    std::fs::write(dir.join(MANIFEST), manifest.to_string())?;
    sync_saved(dir)?;
    Ok(total)
}

/// Syncs every file of the checkpoint directory `dir` (which the backend's runtime wrote and
/// did not sync), `dir` and its parent: what is recorded as saved survives a power loss.
fn sync_saved(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()?;
    match dir.parent() {
        Some(parent) => std::fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

/// Checks `dir` against its manifest: the same files, each of the recorded size and digest.
fn verify_manifest(dir: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(dir.join(MANIFEST))
        .map_err(|e| format!("its manifest cannot be read: {e}"))?;
    let manifest: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("its manifest is not JSON: {e}"))?;
    let files = manifest["files"]
        .as_object()
        .ok_or("its manifest lists no files")?;
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| format!("reading it: {e}"))? {
        let entry = entry.map_err(|e| format!("reading it: {e}"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == MANIFEST {
            continue;
        }
        let want = files
            .get(&name)
            .ok_or_else(|| format!("{name} is not in its manifest"))?;
        let md = entry.metadata().map_err(|e| format!("{name}: {e}"))?;
        if !md.is_file() || Some(md.len()) != want["size"].as_u64() {
            return Err(format!("{name} is not the size its manifest says"));
        }
        let digest = sha256_of(&entry.path()).map_err(|e| format!("{name}: {e}"))?;
        if Some(digest.as_str()) != want["sha256"].as_str() {
            return Err(format!("{name} does not match its manifest's digest"));
        }
        seen += 1;
    }
    if seen != files.len() {
        return Err("files of its manifest are missing".into());
    }
    Ok(())
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl SandboxManager {
    /// Whether the caller's running sandbox `id` can be snapshotted with its memory (its
    /// backend saves memory).
    pub async fn saves_memory(&self, caller: &Caller, id: &str) -> ManagerResult<bool> {
        let live = self.inner.live_any(&caller.tenant, id).await?;
        Ok(live.saves_memory())
    }
}

/// Connects to the agent of a restored instance.
async fn connect(instance: &mut Box<dyn Instance>, id: &str) -> ManagerResult<AgentClient> {
    let channel = instance
        .take_channel()
        .ok_or_else(|| ManagerError::Internal("backend gave no agent channel".into()))?;
    let client = AgentClient::handshake(channel)
        .await
        .map_err(|e| ManagerError::Unavailable(format!("sandbox {id}: agent handshake: {e}")))?;
    client
        .health()
        .await
        .map_err(|e| ManagerError::Unavailable(format!("sandbox {id}: agent health: {e}")))?;
    Ok(client)
}

/// Where a sandbox paused to disk keeps its checkpoint, in the snapshot directory.
pub(super) const PAUSED_DIR: &str = "paused";

/// The bytes each sandbox paused to disk holds there, with its tenant: they count as the
/// tenant's snapshot bytes while it is paused.
#[derive(Debug, Default)]
pub(super) struct PausedBytes(std::sync::Mutex<std::collections::HashMap<String, (String, u64)>>);

impl PausedBytes {
    /// Records sandbox `id` of `tenant` paused to disk in `bytes`.
    fn set(&self, id: &str, tenant: &str, bytes: u64) {
        super::lock(&self.0).insert(id.to_owned(), (tenant.to_owned(), bytes));
    }

    /// Forgets sandbox `id` (resumed, or ended).
    pub(super) fn remove(&self, id: &str) {
        super::lock(&self.0).remove(id);
    }

    /// What `tenant`'s sandboxes paused to disk hold.
    pub(super) fn of(&self, tenant: &str) -> u64 {
        super::lock(&self.0)
            .values()
            .filter(|(t, _)| t == tenant)
            .map(|(_, b)| *b)
            .sum()
    }
}

/// The bytes of the files in `dir` (a checkpoint's directory: no subdirectories).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The instance of a sandbox paused to disk by an earlier server: nothing of it runs on the
/// host until a resume restores it, so there is nothing to read, pause or destroy.
#[derive(Debug)]
struct SavedToDisk {
    id: String,
}

#[async_trait::async_trait]
impl Instance for SavedToDisk {
    fn id(&self) -> &str {
        &self.id
    }

    fn take_channel(&mut self) -> Option<crate::backend::AgentChannel> {
        None
    }

    fn stats(&self) -> crate::backend::InstanceStats {
        crate::backend::InstanceStats::default()
    }

    fn host_pid(&self) -> Option<i32> {
        None
    }

    async fn pause(&self) -> crate::error::Result<()> {
        Ok(())
    }

    async fn resume(&self) -> crate::error::Result<()> {
        Err(crate::error::EngineError::Backend(format!(
            "sandbox {} is saved to disk: only a restore runs it again",
            self.id
        )))
    }

    async fn exited(&self) {
        std::future::pending().await
    }

    async fn destroy(&mut self) -> crate::error::Result<()> {
        Ok(())
    }
}

impl Inner {
    /// Checks that a template may start from `tenant`'s snapshot `snapshot` (one with memory,
    /// whole, and no start or ready of the template's own) and has it run on the snapshot's
    /// backend.
    pub(super) async fn check_template_snapshot(
        &self,
        tenant: &str,
        snapshot: &str,
        spec: &mut moat_proto::v1::TemplateSpec,
    ) -> ManagerResult<()> {
        crate::store::check_snapshot_id(snapshot).map_err(ManagerError::from)?;
        if spec.start.is_some() || spec.ready.is_some() {
            return Err(ManagerError::Invalid(
                "a template that starts from a snapshot runs no start or ready script: its \
                 sandboxes are restored with that work done"
                    .into(),
            ));
        }
        let (t, i) = (tenant.to_owned(), snapshot.to_owned());
        let rec = self
            .db(move |s| s.get_snapshot(&t, &i))
            .await
            .map_err(|e| match e {
                ManagerError::NotFound(_) => {
                    ManagerError::Invalid(format!("unknown snapshot {snapshot:?}"))
                }
                e => e,
            })?;
        if !rec.memory {
            return Err(ManagerError::Invalid(format!(
                "snapshot {snapshot} holds files only: a template starts from a snapshot with \
                 memory"
            )));
        }
        match &spec.backend {
            Some(kind) if kind != &rec.backend => {
                return Err(ManagerError::Invalid(format!(
                    "snapshot {snapshot} was taken on the {} backend, which alone can restore it; \
                     the template names {kind}",
                    rec.backend
                )));
            }
            _ => spec.backend = Some(rec.backend.clone()),
        }
        self.verify_snapshot(snapshot).await
    }

    /// Checks the snapshot with memory `snapshot`'s directory against its manifest.
    pub(super) async fn verify_snapshot(&self, snapshot: &str) -> ManagerResult<()> {
        let dir = self
            .snapshot_dir()?
            .join(format!("{snapshot}{MEMORY_SUFFIX}"));
        let checked = tokio::task::spawn_blocking(move || verify_manifest(&dir))
            .await
            .map_err(|e| ManagerError::Internal(format!("manifest task: {e}")))?;
        checked.map_err(|why| {
            ManagerError::Conflict(format!(
                "snapshot {snapshot} is damaged and was not restored: {why}"
            ))
        })
    }

    /// Takes over `rec`, a sandbox an earlier server paused to disk, if its checkpoint is
    /// there and its backend is registered: it stays paused, holding nothing on the host, and a
    /// resume restores it. `false` when it cannot be (the caller reaps and records it lost).
    pub(super) async fn adopt_paused_to_disk(&self, rec: &SandboxRecord) -> ManagerResult<bool> {
        if rec.state != SandboxState::Paused {
            return Ok(false);
        }
        let Ok(backend) = self.backends.get(&rec.backend) else {
            return Ok(false);
        };
        let Some(snapshots) = self.opts.snapshot_dir.as_ref() else {
            return Ok(false);
        };
        let dir = snapshots.join(PAUSED_DIR).join(&rec.id);
        if !backend.capabilities().memory_checkpoint || !dir.is_dir() {
            return Ok(false);
        }
        let backend = backend.clone();
        // Whatever a server that stopped half-way through a resume left of it goes first.
        if let Err(e) = backend.reap_orphan(&rec.id).await {
            tracing::warn!(sandbox = %rec.id, "reaping what a resume left: {e}");
        }
        let env = super::stored_plan(rec)?.map(|p| p.env).unwrap_or_default();
        let live = Live::new(
            &rec.tenant,
            AgentClient::closed(),
            backend,
            Box::new(SavedToDisk { id: rec.id.clone() }),
            env,
            rec.public_traffic,
        );
        live.paused.store(true, Ordering::SeqCst);
        lock(&self.live).insert(rec.id.clone(), Arc::new(live));
        self.paused_bytes.set(&rec.id, &rec.tenant, dir_bytes(&dir));
        Ok(true)
    }

    /// Keeps `rec`'s sandbox, paused to disk by a backend this server cannot run now (no
    /// runsc, no working platform), for a server that can: its saved state stays, and counts
    /// against its tenant's snapshot bytes. Calls to it are refused ([`Self::live_any`]) until
    /// then; a delete removes it. False when it is not such a sandbox.
    pub(super) fn keep_paused_for_later(&self, rec: &SandboxRecord) -> bool {
        if rec.state != SandboxState::Paused || self.backends.get(&rec.backend).is_ok() {
            return false;
        }
        let Some(snapshots) = self.opts.snapshot_dir.as_ref() else {
            return false;
        };
        let dir = snapshots.join(PAUSED_DIR).join(&rec.id);
        if !dir.is_dir() {
            return false;
        }
        self.paused_bytes.set(&rec.id, &rec.tenant, dir_bytes(&dir));
        true
    }

    /// Refuses a checkpoint of `tenant`'s sandbox `id` of `live` when the tenant's snapshot
    /// `quota` is used up (429), or when the memory its processes hold now (an upper bound of
    /// what a checkpoint writes) would not fit above the server's reserve of free space in
    /// `dir` (507). What a snapshot really takes is checked against the quota when it is
    /// recorded; a pause to disk counts as the tenant's snapshot bytes while it lasts.
    async fn check_room(
        &self,
        live: &Live,
        tenant: &str,
        id: &str,
        dir: &Path,
        quota: u64,
    ) -> ManagerResult<()> {
        let estimate = live.instance.lock().await.stats().memory_bytes;
        let bounds = self.bounds(tenant, dir, quota, u64::MAX).await?;
        bounds.check(1, id)?;
        bounds.check_free(estimate, id)
    }

    /// The snapshot quota of `tenant`'s sandbox `id`: its creating key's, else the server's.
    async fn quota_of(&self, tenant: &str, id: &str) -> ManagerResult<u64> {
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let rec = self.db(move |s| s.get_sandbox(&t, &i)).await?;
        self.snapshot_quota(tenant, rec.key_id.as_deref()).await
    }

    /// Whether `live` is saved to disk (paused on a backend that saves memory): it holds
    /// nothing on the host, and outlives its server.
    pub(super) fn is_saved_to_disk(&self, live: &Live, id: &str) -> bool {
        live.is_paused() && self.disk_pause_dir(live, id).is_some_and(|d| d.is_dir())
    }

    /// Where sandbox `id` of `live` is saved when paused: a directory of the snapshot
    /// directory, for backends that save memory; `None` (pause in memory) otherwise.
    pub(super) fn disk_pause_dir(&self, live: &Live, id: &str) -> Option<PathBuf> {
        let snapshots = self.opts.snapshot_dir.as_ref()?;
        live.saves_memory()
            .then(|| snapshots.join(PAUSED_DIR).join(id))
    }

    /// Saves the paused-marked sandbox `id` of `live` into `dir` and releases everything it held
    /// on the host (its memory included): a pause that frees resources. A sandbox lost on the
    /// way is ended, recorded failed.
    pub(super) async fn pause_to_disk(
        &self,
        live: &Arc<Live>,
        tenant: &str,
        id: &str,
        dir: &Path,
    ) -> ManagerResult<()> {
        let made = {
            let dir = dir.to_owned();
            tokio::task::spawn_blocking(move || {
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir)?;
                std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            })
            .await
            .map_err(|e| ManagerError::Internal(format!("pause directory task: {e}")))?
        };
        made.map_err(|e| ManagerError::Internal(format!("creating {}: {e}", dir.display())))?;
        let room = match self.quota_of(tenant, id).await {
            Ok(quota) => self.check_room(live, tenant, id, dir, quota).await,
            Err(e) => Err(e),
        };
        if let Err(e) = room {
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
        if let Err(e) = live.client.expect_reconnect().await {
            let _ = std::fs::remove_dir_all(dir);
            return Err(ManagerError::Unavailable(format!(
                "sandbox {id}'s agent could not be readied for a pause: {e}"
            )));
        }
        let mut instance = live.instance.lock().await;
        let saved = instance.checkpoint(dir).await;
        if let Err(e) = instance.destroy().await {
            tracing::warn!(sandbox = %id, "releasing a sandbox paused to disk: {e}");
        }
        let saved = match saved {
            Ok(()) => {
                let dir = dir.to_owned();
                tokio::task::spawn_blocking(move || sync_saved(&dir))
                    .await
                    .map_err(|e| std::io::Error::other(format!("sync task: {e}")))
                    .and_then(|synced| synced)
                    .map_err(|e| format!("syncing what it saved: {e}"))
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = saved {
            let e = ManagerError::Unavailable(format!("the pause of sandbox {id} failed: {e}"));
            let _ = std::fs::remove_dir_all(dir);
            self.fail(tenant, id, &e).await;
            return Err(e);
        }
        self.paused_bytes.set(id, tenant, dir_bytes(dir));
        Ok(())
    }

    /// Restores sandbox `id`, paused to disk in `dir`, and puts it in place of `live`, still
    /// marked paused; the saved directory stays until the caller has recorded it running
    /// ([`Inner::forget_paused_to_disk`]), so that no crash in between loses what the pause
    /// saved. A sandbox that cannot be restored stays paused with its saved directory, so a
    /// later resume can try again: a restore that failed (an agent slow to answer on a loaded
    /// host) must not lose it either.
    pub(super) async fn resume_from_disk(
        &self,
        live: &Arc<Live>,
        tenant: &str,
        id: &str,
        dir: &Path,
    ) -> ManagerResult<()> {
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let rec = self.db(move |s| s.get_sandbox(&t, &i)).await?;
        let plan = stored_plan(&rec)?.ok_or_else(|| {
            ManagerError::Internal(format!("sandbox {id} paused to disk has no plan"))
        })?;
        let (instance, client) = match self.restart_from(&live.backend, id, &plan, dir).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(sandbox = %id, "resuming a sandbox paused to disk failed; it stays paused: {e}");
                return Err(ManagerError::Unavailable(format!(
                    "{e}; the sandbox stays paused with its saved state, and a resume may be \
                     tried again"
                )));
            }
        };
        // Paused until it is recorded running.
        if let Err(mut orphan) = self.swap_in(live, tenant, id, instance, client, true) {
            let _ = orphan.destroy().await;
            return Err(ManagerError::Conflict(format!(
                "sandbox {id} was ended while it was resumed"
            )));
        }
        Ok(())
    }

    /// Removes what sandbox `id`'s pause to disk saved in `dir`, once its resume is recorded.
    pub(super) fn forget_paused_to_disk(&self, id: &str, dir: &Path) {
        if let Err(e) = std::fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            // Not recorded paused any more: the next start-up sweeps it.
            tracing::warn!(sandbox = %id, "removing {}: {e}", dir.display());
        }
        self.paused_bytes.remove(id);
    }

    /// Saves `tenant`'s running sandbox `id` with its memory into a new directory in the
    /// snapshot directory (see the module's notes), and has it running again from what was
    /// saved.
    pub(super) async fn capture_memory(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        quota: u64,
    ) -> ManagerResult<Captured> {
        let snapshots = self.snapshot_dir()?.to_owned();
        let live = self.live_any(tenant, id).await?;
        Capabilities::require(
            live.backend.capabilities().memory_checkpoint,
            live.backend.name(),
            "save a sandbox's memory (a snapshot without memory keeps its files)",
        )
        .map_err(|e| ManagerError::Conflict(e.to_string()))?;
        if let Some(why) = &live.memory_refusal {
            return Err(ManagerError::Conflict(format!(
                "sandbox {id}'s memory cannot be saved: {why}"
            )));
        }
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let rec = self.db(move |s| s.get_sandbox(&t, &i)).await?;
        let plan = stored_plan(&rec)?.ok_or_else(|| {
            ManagerError::Conflict(format!(
                "sandbox {id} was made by an older server that kept no plan of it"
            ))
        })?;
        let (live, _op) = self.live_locked(tenant, id).await?;
        self.check_room(&live, tenant, id, &snapshots, quota)
            .await?;
        if live.paused.swap(true, Ordering::SeqCst) {
            return Err(ManagerError::Conflict(format!(
                "sandbox {id} is paused; resume it before a snapshot with memory"
            )));
        }
        let dir = snapshots.join(format!(
            "{}{}{MEMORY_SUFFIX}",
            super::snapshots::TEMP_PREFIX,
            crate::store::generate_snapshot_id()?
        ));
        let mut cleanup = RemoveOnDrop(Some(dir.clone()));
        let made = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir(&dir)?;
                std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            })
            .await
            .map_err(|e| ManagerError::Internal(format!("snapshot directory task: {e}")))?
        };
        if let Err(e) = made {
            live.paused.store(false, Ordering::SeqCst);
            return Err(ManagerError::Internal(format!(
                "creating {}: {e}",
                dir.display()
            )));
        }
        if let Err(e) = live.client.expect_reconnect().await {
            live.paused.store(false, Ordering::SeqCst);
            return Err(ManagerError::Unavailable(format!(
                "sandbox {id}'s agent could not be readied for a checkpoint: {e}"
            )));
        }
        // From here on the sandbox's old channel is gone: it runs again only as restored.
        let saved = {
            let mut instance = live.instance.lock().await;
            let saved = instance.checkpoint(&dir).await;
            if let Err(e) = instance.destroy().await {
                tracing::warn!(sandbox = %id, "releasing a checkpointed sandbox: {e}");
            }
            saved
        };
        if let Err(e) = saved {
            let e =
                ManagerError::Unavailable(format!("the checkpoint of sandbox {id} failed: {e}"));
            self.fail(tenant, id, &e).await;
            return Err(e);
        }
        let (instance, client) = match self.restart_from(&live.backend, id, &plan, &dir).await {
            Ok(r) => r,
            Err(e) => return Err(self.pause_on_checkpoint(&live, tenant, id, &dir, e).await),
        };
        if let Err(mut orphan) = self.swap_in(&live, tenant, id, instance, client, false) {
            let _ = orphan.destroy().await;
            return Err(ManagerError::Conflict(format!(
                "sandbox {id} was ended while its memory was saved"
            )));
        }
        let size = {
            let dir = dir.clone();
            let bound = checkpoint_bound(plan.resources.memory_bytes);
            tokio::task::spawn_blocking(move || write_manifest(&dir, bound))
                .await
                .map_err(|e| ManagerError::Internal(format!("manifest task: {e}")))?
                .map_err(|e| ManagerError::Internal(format!("writing the manifest: {e}")))?
        };
        cleanup.disarm();
        Ok(Captured {
            file: dir,
            size,
            sandbox_id: id.to_owned(),
            template: rec.template,
            resources: plan.resources,
            env: live.env.clone(),
            backend: live.backend.name().to_owned(),
        })
    }

    /// Leaves sandbox `id`, whose restart from the checkpoint it was just saved in (`dir`)
    /// failed with `why`, paused on that checkpoint, moved to where a pause to disk keeps it: a
    /// resume can then try again, and nothing the sandbox held is lost. Ends it only when that
    /// cannot be done. The error for the caller.
    async fn pause_on_checkpoint(
        &self,
        live: &Arc<Live>,
        tenant: &str,
        id: &str,
        dir: &Path,
        why: ManagerError,
    ) -> ManagerError {
        tracing::warn!(sandbox = %id, "restarting a sandbox from its checkpoint failed; it stays paused on it: {why}");
        let Some(paused) = self.disk_pause_dir(live, id) else {
            self.fail(tenant, id, &why).await;
            return why;
        };
        let moved = {
            let (from, to) = (dir.to_owned(), paused.clone());
            tokio::task::spawn_blocking(move || {
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::rename(&from, &to)?;
                // Durable before it is recorded paused: its files, its name in `paused/`, and
                // `paused/` itself in the snapshot directory.
                sync_saved(&to)?;
                match to.parent().and_then(Path::parent) {
                    Some(snapshots) => std::fs::File::open(snapshots)?.sync_all(),
                    None => Ok(()),
                }
            })
            .await
        };
        if !matches!(moved, Ok(Ok(()))) {
            self.fail(tenant, id, &why).await;
            return why;
        }
        self.paused_bytes.set(id, tenant, dir_bytes(&paused));
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let recorded = self
            .db(move |s| s.update_sandbox_state(&t, &i, SandboxState::Paused, None))
            .await;
        // Ended meanwhile (a delete that cleared its paused state before this moved the
        // checkpoint there): nothing will resume it, so its saved memory goes now rather than
        // at the next start.
        let ended = !lock(&self.live)
            .get(id)
            .is_some_and(|l| Arc::ptr_eq(l, live));
        if let Err(e) = &recorded {
            tracing::warn!(sandbox = %id, "recording a sandbox paused on its checkpoint: {e}");
        }
        if ended || matches!(recorded, Err(ManagerError::Conflict(_))) {
            self.paused_bytes.remove(id);
            let gone = paused.clone();
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(gone)).await;
            return why;
        }
        ManagerError::Unavailable(format!(
            "{why}; the sandbox is paused on what was saved, and a resume may try again"
        ))
    }

    /// Puts the restored `instance` of sandbox `id` (reached through `client`) in place of
    /// `old`, marked `paused` or not; hands the instance back when `old` is no longer the live
    /// entry (the sandbox was ended meanwhile), for the caller to destroy.
    fn swap_in(
        &self,
        old: &Arc<Live>,
        tenant: &str,
        id: &str,
        instance: Box<dyn Instance>,
        client: AgentClient,
        paused: bool,
    ) -> Result<(), Box<dyn Instance>> {
        let mut map = lock(&self.live);
        if !map.get(id).is_some_and(|l| Arc::ptr_eq(l, old)) {
            return Err(instance);
        }
        let mut fresh = Live::new(
            tenant,
            client,
            old.backend.clone(),
            instance,
            old.env.clone(),
            old.public_traffic,
        );
        // The same lock: an operation waiting on the old one must exclude this one's too.
        fresh.ops = old.ops.clone();
        fresh.paused.store(paused, Ordering::SeqCst);
        map.insert(id.to_owned(), Arc::new(fresh));
        Ok(())
    }

    /// Makes sandbox `id` of `plan` run again from the checkpoint in `dir`, connected.
    async fn restart_from(
        &self,
        backend: &Arc<dyn Backend>,
        id: &str,
        plan: &SandboxPlan,
        dir: &Path,
    ) -> ManagerResult<(Box<dyn Instance>, AgentClient)> {
        let mut instance = backend.restore(id, plan, dir).await.map_err(|e| {
            ManagerError::Unavailable(format!("sandbox {id} could not be restored: {e}"))
        })?;
        match connect(&mut instance, id).await {
            Ok(client) => Ok((instance, client)),
            Err(e) => {
                let _ = instance.destroy().await;
                Err(e)
            }
        }
    }

    /// Ends sandbox `id`, lost in a checkpoint or restore, recorded failed with `why`.
    async fn fail(&self, tenant: &str, id: &str, why: &ManagerError) {
        tracing::warn!(sandbox = %id, "a sandbox lost to a save or restore of its memory: {why}");
        lock(&self.live).remove(id);
        self.paused_bytes.remove(id);
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let reason = EndReason::Failed(why.to_string());
        if let Err(e) = self
            .db(move |s| s.update_sandbox_state(&t, &i, SandboxState::Failed, Some(reason)))
            .await
        {
            tracing::warn!(sandbox = %id, "recording a sandbox lost to a checkpoint: {e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A checkpoint bigger than its sandbox could make (here a sparse file of 1 TiB, or too
    /// many files) is refused before any of it is hashed; an honest one gets its manifest.
    #[test]
    fn a_checkpoint_past_its_bound_is_refused_before_hashing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pages.img"), b"0123456789").unwrap();
        assert_eq!(write_manifest(dir.path(), 1 << 20).unwrap(), 10);
        std::fs::remove_file(dir.path().join(MANIFEST)).unwrap();

        let huge = std::fs::File::create(dir.path().join("huge.img")).unwrap();
        huge.set_len(1 << 40).unwrap();
        let e = write_manifest(dir.path(), checkpoint_bound(512 << 20)).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        std::fs::remove_file(dir.path().join("huge.img")).unwrap();

        for i in 0..=MAX_CHECKPOINT_FILES {
            std::fs::write(dir.path().join(format!("f{i}")), b"").unwrap();
        }
        assert!(write_manifest(dir.path(), 1 << 20).is_err());
    }
}
