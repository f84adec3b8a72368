//! Snapshots and forks.
//!
//! A snapshot is the sandbox's writable layer (see `moat_proto::agent_config::WritableLayer`)
//! as a tar archive, made inside the sandbox by its agent and kept as a file in the snapshot
//! directory, `<id>.tar`. Files only: the native backend cannot checkpoint memory, so running
//! processes are not in it (`Capabilities::memory_checkpoint`). The archive is written under a
//! temporary name, synced and renamed, and only then recorded; deleting removes the record
//! first. At start-up the directory is swept of temporary files and of archives nobody
//! recorded (a crash between the two steps).
//!
//! The host never parses an archive: it counts the bytes (at most the sandbox's disk size) and
//! hands them back to the agent of a new sandbox of the same tenant, which unpacks them as
//! root before the sandbox counts as running.
//!
//! A snapshot of a paused sandbox thaws it for the capture (its processes run meanwhile, as
//! its agent must) and freezes it again; the sandbox stays `paused` throughout. A capture of a
//! running sandbox is not atomic: files written while it runs may be caught half-written.
//!
//! A fork snapshots the sandbox once, to an unrecorded file, makes `count` sandboxes from it
//! ([`FORK_PARALLELISM`] at a time) and deletes the file.
//!
//! Disk is bounded three ways. A tenant's archives together (its snapshots, and the files
//! being written or kept for a fork while they exist) stay within its snapshot bytes (the
//! key's `max_snapshot_bytes`, else `ManagerOptions::snapshot_bytes_per_tenant`; `429`); an
//! archive is at most its sandbox's disk size (`413`); and no archive may take the snapshot
//! directory's filesystem below `ManagerOptions::min_free_disk` of free space (`507`). All
//! three are checked as the archive streams in, so a capture that goes over stops there and
//! leaves nothing.

use std::collections::{BTreeMap, HashMap};
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use moat_proto::units::describe_size;
use moat_proto::v1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::memory::MEMORY_SUFFIX;
use super::{Inner, ManagerError, ManagerResult, SandboxManager, check_env, to_the_end};
use crate::agent_client::{AgentClient, AgentError};
use crate::auth::Caller;
use crate::plan::{SandboxPlan, limits_v1, resources_of};
use crate::resources::Resources;
use crate::store::{
    Cursor, MAX_PAGE, NewSnapshot, SnapshotFilter, SnapshotRecord, Store, check_sandbox_id,
    check_snapshot_id, check_snapshot_name, generate_snapshot_id,
};

/// Snapshots one tenant may keep.
pub const MAX_SNAPSHOTS_PER_TENANT: u64 = 100;
/// Longest a capture may take (the archive then fails).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest unpacking a snapshot into a new sandbox may take (the create then fails).
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);
/// Sandboxes a fork makes at once.
pub const FORK_PARALLELISM: usize = 4;
/// Pieces an archive is read from disk in.
const FILE_CHUNK: usize = 64 << 10;
/// Prefix of files being written: not yet snapshots, swept at start-up.
pub(super) const TEMP_PREFIX: &str = ".tmp-";
/// Suffix of snapshot archives.
const SUFFIX: &str = ".tar";

/// Bytes of archives being written, or kept for a fork, per tenant: they count against the
/// tenant's snapshot bytes beside its recorded snapshots.
#[derive(Debug, Default)]
pub(super) struct InFlight(std::sync::Mutex<HashMap<String, u64>>);

impl InFlight {
    fn of(&self, tenant: &str) -> u64 {
        super::lock(&self.0).get(tenant).copied().unwrap_or(0)
    }

    fn hold(&self, tenant: &str) -> Held<'_> {
        Held {
            flight: self,
            tenant: tenant.to_owned(),
            bytes: 0,
        }
    }
}

/// One archive's bytes in [`InFlight`], given back on drop.
pub(super) struct Held<'a> {
    flight: &'a InFlight,
    tenant: String,
    bytes: u64,
}

impl Held<'_> {
    /// Bytes the tenant's other archives under way hold now.
    fn others(&self) -> u64 {
        self.flight.of(&self.tenant).saturating_sub(self.bytes)
    }

    fn add(&mut self, n: u64) {
        self.bytes = self.bytes.saturating_add(n);
        *super::lock(&self.flight.0)
            .entry(self.tenant.clone())
            .or_default() += n;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut all = super::lock(&self.flight.0);
        if let Some(n) = all.get_mut(&self.tenant) {
            *n = n.saturating_sub(self.bytes);
            if *n == 0 {
                all.remove(&self.tenant);
            }
        }
    }
}

/// How far an archive may grow, each bound with the answer going over it gives.
pub(super) struct Bounds {
    /// The sandbox's disk size (413).
    disk: u64,
    /// What the tenant's recorded snapshots and sandboxes paused to disk leave of its
    /// snapshot bytes (429), and the quota itself.
    quota_left: u64,
    quota: u64,
    /// The tenant's archives under way when the bounds were taken (their bytes count too).
    in_flight: u64,
    /// Free space above the reserve (507), and the reserve itself.
    free_left: u64,
    reserve: u64,
}

impl Bounds {
    /// Why an archive of `size` bytes is too large, if it is.
    pub(super) fn check(&self, size: u64, id: &str) -> ManagerResult<()> {
        self.check_beside(size, self.in_flight, id)
    }

    /// [`Bounds::check`] beside `others` bytes of the tenant's other archives under way (as
    /// they are now: archives written at once must not each take what the quota left).
    fn check_beside(&self, size: u64, others: u64, id: &str) -> ManagerResult<()> {
        self.check_free(size, id)?;
        let left = self.quota_left.saturating_sub(others);
        if size > left {
            return Err(ManagerError::QuotaExceeded(format!(
                "the snapshot of sandbox {id} would take the tenant's snapshots over their quota of {} ({} left)",
                describe_size(self.quota),
                describe_size(left)
            )));
        }
        if size > self.disk {
            return Err(ManagerError::TooLarge(format!(
                "the snapshot of sandbox {id} is larger than its disk size of {}",
                describe_size(self.disk)
            )));
        }
        Ok(())
    }

    /// Why `size` bytes would not fit above the reserve, if they would not.
    pub(super) fn check_free(&self, size: u64, id: &str) -> ManagerResult<()> {
        if size > self.free_left {
            return Err(ManagerError::InsufficientStorage(format!(
                "the snapshot of sandbox {id} would leave less than the server's reserve of {} free on its data disk",
                describe_size(self.reserve)
            )));
        }
        Ok(())
    }
}

/// Makes the snapshot directory (mode 0700: archives hold tenants' files) and sweeps it of
/// temporary files and archives without a record.
pub(super) fn prepare_dir(store: &Store, dir: &Path) -> ManagerResult<()> {
    let io = |what: &str, e: std::io::Error| {
        ManagerError::Internal(format!("snapshot directory {}: {what}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| io("create", e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("chmod", e))?;
    // Sandboxes paused to disk outlive their server, as long as their record says paused:
    // what is left of any other (a pause or resume cut short) goes.
    let paused: std::collections::HashSet<String> = store
        .active_sandboxes()?
        .into_iter()
        .filter(|r| r.state == crate::store::SandboxState::Paused)
        .map(|r| r.id)
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir.join(super::memory::PAUSED_DIR)) {
        for entry in entries.flatten() {
            if paused.contains(&*entry.file_name().to_string_lossy()) {
                continue;
            }
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(
                    dir = %entry.path().display(),
                    "removed what a cut-short pause left"
                ),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove a cut-short pause", e)),
            }
        }
    }
    let known: std::collections::HashSet<String> = store.all_snapshot_ids()?.into_iter().collect();
    let mut swept = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| io("read", e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let orphan = match name
            .strip_suffix(SUFFIX)
            .or_else(|| name.strip_suffix(MEMORY_SUFFIX))
        {
            _ if name.starts_with(TEMP_PREFIX) => true,
            Some(id) => !known.contains(id),
            None => false,
        };
        if !orphan {
            continue;
        }
        let removed = if name.ends_with(MEMORY_SUFFIX) {
            std::fs::remove_dir_all(entry.path())
        } else {
            std::fs::remove_file(entry.path())
        };
        if removed.is_ok() {
            swept += 1;
        }
    }
    if swept > 0 {
        tracing::info!(swept, dir = %dir.display(), "removed unrecorded snapshot files");
    }
    Ok(())
}

/// Streams the archive `file` to the agent of `client`, which unpacks it over the sandbox's
/// root, within [`RESTORE_TIMEOUT`].
pub(super) async fn restore_layer(client: &AgentClient, file: &Path) -> ManagerResult<()> {
    let f = tokio::fs::File::open(file)
        .await
        .map_err(|e| match e.kind() {
            // Deleted since its record was read.
            ErrorKind::NotFound => {
                ManagerError::NotFound("the snapshot was deleted meanwhile".into())
            }
            _ => ManagerError::Internal(format!("opening snapshot {}: {e}", file.display())),
        })?;
    let chunks = futures_util::stream::unfold(f, |mut f| async move {
        let mut buf = vec![0u8; FILE_CHUNK];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    match tokio::time::timeout(RESTORE_TIMEOUT, client.restore_layer(chunks)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(restore_error(e)),
        Err(_) => Err(ManagerError::Timeout(format!(
            "restoring the snapshot did not finish within {} s",
            RESTORE_TIMEOUT.as_secs()
        ))),
    }
}

fn restore_error(e: AgentError) -> ManagerError {
    use moat_proto::connect::Code;
    let text = format!("restoring the snapshot: {e}");
    match e.code() {
        Code::ResourceExhausted => ManagerError::TooLarge(text),
        // Made by the source sandbox's own agent: the snapshot is unusable, not the server.
        Code::InvalidArgument => ManagerError::Conflict(format!(
            "{text}: the snapshot is damaged (its archive could not be unpacked)"
        )),
        _ => ManagerError::Unavailable(text),
    }
}

/// A sandbox captured, not yet a snapshot: its layer in an archive file, or (with memory) a
/// checkpoint directory; with what a sandbox made from it needs.
pub(super) struct Captured {
    pub(super) file: PathBuf,
    pub(super) size: u64,
    pub(super) sandbox_id: String,
    pub(super) template: String,
    pub(super) resources: Resources,
    pub(super) env: BTreeMap<String, String>,
    pub(super) backend: String,
}

/// Removes the file or directory it names when dropped, unless disarmed.
pub(super) struct RemoveOnDrop(pub(super) Option<PathBuf>);

impl RemoveOnDrop {
    pub(super) fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            if path.is_dir() {
                let _ = std::fs::remove_dir_all(path);
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn snapshot_v1(rec: &SnapshotRecord) -> v1::Snapshot {
    v1::Snapshot {
        id: rec.id.clone(),
        name: rec.name.clone(),
        sandbox_id: rec.sandbox_id.clone(),
        template: rec.template.clone(),
        // Written by this manager; an unreadable value shows as zeros rather than failing.
        resources: serde_json::from_value(rec.resources.clone()).unwrap_or_default(),
        size_bytes: rec.size_bytes,
        memory: rec.memory,
        created_at: rec.created_at,
    }
}

impl SandboxManager {
    /// Snapshots the files of the caller's running or paused sandbox `id` (within its key's
    /// snapshot quota, if it holds a key). The archive is on disk before the snapshot is
    /// recorded and returned.
    pub async fn snapshot(
        &self,
        caller: &Caller,
        id: &str,
        req: v1::CreateSnapshot,
    ) -> ManagerResult<v1::Snapshot> {
        if let Some(name) = &req.name {
            check_snapshot_name(name).map_err(ManagerError::from)?;
        }
        let inner = self.inner.clone();
        let (tenant, id) = (caller.tenant.clone(), id.to_owned());
        let key_id = caller.key_id.clone();
        to_the_end("snapshot", async move {
            inner
                .snapshot(&tenant, key_id.as_deref(), &id, req.name, req.memory)
                .await
        })
        .await
    }

    /// The caller's snapshot `id`.
    pub async fn get_snapshot(&self, caller: &Caller, id: &str) -> ManagerResult<v1::Snapshot> {
        let (tenant, id) = (caller.tenant.clone(), id.to_owned());
        let rec = self.inner.db(move |s| s.get_snapshot(&tenant, &id)).await?;
        Ok(snapshot_v1(&rec))
    }

    /// One page of the caller's snapshots matching `query`, oldest first.
    pub async fn list_snapshots(
        &self,
        caller: &Caller,
        query: v1::ListSnapshots,
    ) -> ManagerResult<v1::SnapshotList> {
        let filter = SnapshotFilter {
            sandbox_id: query.sandbox_id,
            name: query.name,
            after: query
                .after
                .as_deref()
                .map(Cursor::decode)
                .transpose()
                .map_err(ManagerError::from)?,
            limit: query.limit.unwrap_or(100).min(MAX_PAGE),
        };
        let tenant = caller.tenant.clone();
        let page = self
            .inner
            .db(move |s| s.list_snapshots(&tenant, &filter))
            .await?;
        Ok(v1::SnapshotList {
            snapshots: page.items.iter().map(snapshot_v1).collect(),
            next: page.next.map(|c| c.encode()),
        })
    }

    /// Deletes the caller's snapshot `id`: its record, then its file. Sandboxes made from it
    /// are not affected; one a template starts from is refused (409).
    pub async fn delete_snapshot(&self, caller: &Caller, id: &str) -> ManagerResult<v1::Snapshot> {
        let inner = self.inner.clone();
        let (tenant, id) = (caller.tenant.clone(), id.to_owned());
        to_the_end("snapshot delete", async move {
            inner.delete_snapshot(&tenant, &id).await
        })
        .await
    }

    /// Copies of the caller's running or paused sandbox `id`: its files snapshotted once, then
    /// `count` sandboxes (1 to [`v1::MAX_FORK_COUNT`]) made from that, charged to its key.
    /// One result per copy, in order: a sandbox or why it failed. Running processes are
    /// carried over only with `memory` (a backend that saves memory; see the `memory` module).
    pub async fn fork(
        &self,
        caller: &Caller,
        id: &str,
        req: v1::ForkSandbox,
    ) -> ManagerResult<Vec<ManagerResult<v1::Sandbox>>> {
        let count = req.count.unwrap_or(1);
        if !(1..=v1::MAX_FORK_COUNT).contains(&count) {
            return Err(ManagerError::Invalid(format!(
                "count {count} must be 1 to {}",
                v1::MAX_FORK_COUNT
            )));
        }
        if let Some(secs) = req.timeout_secs {
            self.inner.ttl(Some(secs))?;
        }
        let inner = self.inner.clone();
        let (tenant, id) = (caller.tenant.clone(), id.to_owned());
        let key_id = caller.key_id.clone();
        to_the_end("fork", async move {
            inner.fork(tenant, key_id, &id, count, req).await
        })
        .await
    }
}

impl Inner {
    /// [`SandboxManager::delete_snapshot`], run to its end: a record deleted keeps no file.
    async fn delete_snapshot(&self, tenant: &str, id: &str) -> ManagerResult<v1::Snapshot> {
        // Refused, in the delete's own transaction, while a template starts from it.
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let rec = self.db(move |s| s.delete_snapshot(&t, &i)).await?;
        if let Some(dir) = &self.opts.snapshot_dir {
            if rec.memory {
                let path = dir.join(format!("{}{MEMORY_SUFFIX}", rec.id));
                match tokio::fs::remove_dir_all(&path).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(snapshot = %rec.id, "removing {}: {e}", path.display())
                    }
                }
                return Ok(snapshot_v1(&rec));
            }
            let path = dir.join(format!("{}{SUFFIX}", rec.id));
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                // The record is gone, so the file is an orphan the next start-up sweeps.
                Err(e) => tracing::warn!(snapshot = %rec.id, "removing {}: {e}", path.display()),
            }
        }
        Ok(snapshot_v1(&rec))
    }

    pub(super) fn snapshot_dir(&self) -> ManagerResult<&Path> {
        self.opts.snapshot_dir.as_deref().ok_or_else(|| {
            ManagerError::Unavailable(
                "this server keeps no snapshots (no snapshot directory)".into(),
            )
        })
    }

    /// The tenant's snapshot bytes: `key`'s quota, else the server's default.
    pub(super) async fn snapshot_quota(
        &self,
        tenant: &str,
        key: Option<&str>,
    ) -> ManagerResult<u64> {
        let Some(key) = key else {
            return Ok(self.opts.snapshot_bytes_per_tenant);
        };
        let (t, k) = (tenant.to_owned(), key.to_owned());
        let quotas = self.db(move |s| s.get_key(&t, &k)).await?.quotas;
        Ok(quotas
            .max_snapshot_bytes
            .unwrap_or(self.opts.snapshot_bytes_per_tenant))
    }

    /// How far a new snapshot (or pause to disk) of `tenant`'s may grow in `dir` within its
    /// snapshot `quota` (what its stored snapshots, the archives under way and its sandboxes
    /// paused to disk leave) and the server's reserve of free space, and up to `disk`.
    pub(super) async fn bounds(
        &self,
        tenant: &str,
        dir: &Path,
        quota: u64,
        disk: u64,
    ) -> ManagerResult<Bounds> {
        let t = tenant.to_owned();
        let stored = self.db(move |s| s.snapshot_bytes(&t)).await?;
        let used = stored.saturating_add(self.paused_bytes.of(tenant));
        let free = crate::disk::free_disk(dir)
            .map_err(|e| ManagerError::Internal(format!("free space of {}: {e}", dir.display())))?;
        Ok(Bounds {
            disk,
            quota_left: quota.saturating_sub(used),
            quota,
            in_flight: self.snapshot_bytes.of(tenant),
            free_left: free.saturating_sub(self.opts.min_free_disk),
            reserve: self.opts.min_free_disk,
        })
    }

    /// Captures the writable layer of `tenant`'s sandbox `id` into a new temporary file,
    /// within the tenant's snapshot `quota` (its bytes held in `held` while they exist).
    async fn capture(
        &self,
        tenant: &str,
        id: &str,
        quota: u64,
        held: &mut Held<'_>,
    ) -> ManagerResult<Captured> {
        let dir = self.snapshot_dir()?.to_owned();
        let live = self.live_any(tenant, id).await?;
        crate::backend::Capabilities::require(
            live.backend.capabilities().files_snapshot,
            live.backend.name(),
            "snapshot a sandbox's files alone (snapshot or fork it with its memory: \"memory\": true)",
        )
        .map_err(|e| ManagerError::Conflict(e.to_string()))?;
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let rec = self.db(move |s| s.get_sandbox(&t, &i)).await?;
        let resources = super::recorded_resources(&rec)?;
        let bounds = self
            .bounds(tenant, &dir, quota, resources.disk_bytes)
            .await?;
        // Refused before anything is written when nothing at all would fit (an archive has
        // at least its end-of-archive blocks).
        bounds.check(1, id)?;
        let file = dir.join(format!("{TEMP_PREFIX}{}{SUFFIX}", generate_snapshot_id()?));
        let mut cleanup = RemoveOnDrop(Some(file.clone()));

        let (live, _op) = self.live_locked(tenant, id).await?;
        let paused = live.is_paused();
        if paused {
            live.instance.lock().await.resume().await.map_err(|e| {
                ManagerError::Unavailable(format!(
                    "could not thaw sandbox {id} to snapshot it: {e}"
                ))
            })?;
        }
        let written = tokio::time::timeout(
            SNAPSHOT_TIMEOUT,
            write_layer(&live.client, &file, &bounds, held, id),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ManagerError::Timeout(format!(
                "the snapshot of sandbox {id} did not finish within {} s",
                SNAPSHOT_TIMEOUT.as_secs()
            )))
        });
        if paused && let Err(e) = live.instance.lock().await.pause().await {
            // Recorded paused and refusing calls, but running: say so rather than hide it.
            tracing::warn!(sandbox = %id, "freezing again after a snapshot: {e}");
        }
        let size = written?;
        cleanup.disarm();
        Ok(Captured {
            file,
            size,
            sandbox_id: id.to_owned(),
            template: rec.template,
            resources,
            env: live.env.clone(),
            backend: rec.backend,
        })
    }

    /// A snapshot of `tenant`'s sandbox `id`: its files, or (`memory`) its memory and processes
    /// too (see the `memory` module), within the tenant's snapshot count and bytes. What it
    /// holds is on disk before it is recorded.
    async fn snapshot(
        self: Arc<Self>,
        tenant: &str,
        key_id: Option<&str>,
        id: &str,
        name: Option<String>,
        memory: bool,
    ) -> ManagerResult<v1::Snapshot> {
        check_sandbox_id(id).map_err(ManagerError::from)?;
        let t = tenant.to_owned();
        let count = self.db(move |s| s.count_snapshots(&t)).await?;
        if count >= MAX_SNAPSHOTS_PER_TENANT {
            return Err(ManagerError::QuotaExceeded(format!(
                "tenant {tenant} has {count} snapshots, the most it may keep; delete some first"
            )));
        }
        let quota = self.snapshot_quota(tenant, key_id).await?;
        let mut held = self.snapshot_bytes.hold(tenant);
        let captured = if memory {
            self.capture_memory(tenant, id, quota).await?
        } else {
            self.capture(tenant, id, quota, &mut held).await?
        };
        let mut cleanup = RemoveOnDrop(Some(captured.file.clone()));
        let snapshot_id = generate_snapshot_id()?;
        let dir = self.snapshot_dir()?.to_owned();
        let suffix = if memory { MEMORY_SUFFIX } else { SUFFIX };
        let path = dir.join(format!("{snapshot_id}{suffix}"));
        let (from, to) = (captured.file.clone(), path.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::rename(&from, &to)?;
            // The rename is durable once the directory is.
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| ManagerError::Internal(format!("snapshot file task: {e}")))?
        .map_err(|e| ManagerError::Internal(format!("storing snapshot {}: {e}", path.display())))?;
        cleanup.0 = Some(path);
        let new = NewSnapshot {
            id: snapshot_id,
            tenant: tenant.to_owned(),
            name,
            sandbox_id: captured.sandbox_id,
            template: captured.template,
            resources: serde_json::to_value(limits_v1(&captured.resources))
                .map_err(|e| ManagerError::Internal(e.to_string()))?,
            env: captured.env,
            size_bytes: captured.size,
            memory,
            backend: captured.backend,
        };
        // Sandboxes paused to disk take their share of the quota too.
        let quota_left = quota.saturating_sub(self.paused_bytes.of(tenant));
        let rec = self
            .db(move |s| s.insert_snapshot_within(&new, MAX_SNAPSHOTS_PER_TENANT, quota_left))
            .await?;
        cleanup.disarm();
        // Recorded: counted from the store now.
        drop(held);
        Ok(snapshot_v1(&rec))
    }

    /// What a create from `tenant`'s snapshot `snapshot` makes.
    pub(super) async fn plan_from_snapshot(
        &self,
        tenant: &str,
        snapshot: &str,
        req: v1::CreateSandbox,
    ) -> ManagerResult<SandboxPlan> {
        check_snapshot_id(snapshot).map_err(ManagerError::from)?;
        if req.resources.is_some() {
            return Err(ManagerError::Invalid(
                "a sandbox made from a snapshot has the snapshot's resources; give no `resources`"
                    .into(),
            ));
        }
        let (t, i) = (tenant.to_owned(), snapshot.to_owned());
        let rec = self.db(move |s| s.get_snapshot(&t, &i)).await?;
        if rec.memory {
            return self.plan_from_memory_snapshot(tenant, &rec, req).await;
        }
        let file = self.snapshot_dir()?.join(format!("{}{SUFFIX}", rec.id));
        let resources: v1::ResourceLimits = serde_json::from_value(rec.resources.clone())
            .map_err(|e| ManagerError::Internal(format!("snapshot {snapshot} resources: {e}")))?;
        let resources = resources_of(&resources);
        let mut env = rec.env.clone();
        let asks_nothing = req.env.is_empty();
        env.extend(req.env);
        self.plan_restored(
            tenant,
            &rec.template,
            resources,
            env,
            asks_nothing && rec.env.is_empty(),
            req.metadata,
            req.timeout_secs,
            file,
        )
        .await
    }

    /// What a create from the snapshot with memory `rec` makes: a sandbox restored from its
    /// checkpoint (verified against its manifest first) by the backend that saved it, with its
    /// processes running where they were. Its template starts nothing.
    async fn plan_from_memory_snapshot(
        &self,
        tenant: &str,
        rec: &crate::store::SnapshotRecord,
        req: v1::CreateSandbox,
    ) -> ManagerResult<SandboxPlan> {
        if !req.env.is_empty() {
            return Err(ManagerError::Invalid(
                "a sandbox restored with memory keeps the environment its processes have; give \
                 no `env`"
                    .into(),
            ));
        }
        let dir = self
            .snapshot_dir()?
            .join(format!("{}{MEMORY_SUFFIX}", rec.id));
        self.verify_snapshot(&rec.id).await?;
        let resources: v1::ResourceLimits = serde_json::from_value(rec.resources.clone())
            .map_err(|e| ManagerError::Internal(format!("snapshot {} resources: {e}", rec.id)))?;
        let mut plan = self
            .plan_restored(
                tenant,
                &rec.template,
                resources_of(&resources),
                rec.env.clone(),
                false,
                req.metadata,
                req.timeout_secs,
                PathBuf::new(),
            )
            .await?;
        // The backend that saved it, whatever the template names now.
        let backend = self.backends.get(&rec.backend)?;
        if !backend.capabilities().memory_checkpoint {
            return Err(ManagerError::Conflict(format!(
                "the {} backend cannot restore memory",
                rec.backend
            )));
        }
        restore_memory(&mut plan, &rec.backend, dir);
        Ok(plan)
    }

    /// A plan for a sandbox of `template` with exactly `resources` and `env`, its files from
    /// the archive `layer`. A warm-pool member serves when nothing else is asked (`plain`),
    /// its resources are the template's defaults, and the template starts nothing (a `start`
    /// script would have run before the files were restored).
    #[allow(clippy::too_many_arguments)]
    async fn plan_restored(
        &self,
        tenant: &str,
        template: &str,
        resources: Resources,
        env: BTreeMap<String, String>,
        plain: bool,
        metadata: BTreeMap<String, String>,
        timeout_secs: Option<u64>,
        layer: PathBuf,
    ) -> ManagerResult<SandboxPlan> {
        let (owner, spec, template_limits) =
            self.template(tenant, template).await.map_err(|e| match e {
                ManagerError::NotFound(_) => ManagerError::Conflict(format!(
                    "the snapshot's template {template:?} no longer exists"
                )),
                e => e,
            })?;
        let mut plan = self.plan_of_template(template, owner, &spec, &template_limits)?;
        // Exactly the snapshot's limits, still within what the template allows now.
        let limits = resources;
        template_limits.check(limits)?;
        plan.poolable = plain && spec.start.is_none() && limits == plan.resources;
        plan.resources = limits;
        if let Some(secs) = timeout_secs {
            self.ttl(Some(secs))?;
            plan.timeout_secs = Some(secs);
        }
        check_env("env", &env)?;
        plan.env = env;
        plan.metadata = metadata;
        plan.layer = Some(layer);
        Ok(plan)
    }

    async fn fork(
        self: Arc<Self>,
        tenant: String,
        key_id: Option<String>,
        id: &str,
        count: u32,
        req: v1::ForkSandbox,
    ) -> ManagerResult<Vec<ManagerResult<v1::Sandbox>>> {
        check_sandbox_id(id).map_err(ManagerError::from)?;
        let quota = self.snapshot_quota(&tenant, key_id.as_deref()).await?;
        // A files copy counts against the tenant's snapshot bytes until the fork is done with
        // it; a checkpoint (with memory) is not charged.
        let mut held = self.snapshot_bytes.hold(&tenant);
        let captured = if req.memory {
            self.capture_memory(&tenant, id, quota).await?
        } else {
            self.capture(&tenant, id, quota, &mut held).await?
        };
        let _cleanup = RemoveOnDrop(Some(captured.file.clone()));
        let plain = !req.memory && captured.env.is_empty();
        // The copies' services are as public as the source's, and they reach what it reaches:
        // from its record, which an end during the capture leaves in place (its live entry
        // would be gone, and the copies would get the server's defaults).
        let (t, i) = (tenant.clone(), id.to_owned());
        let source = self.db(move |s| s.get_sandbox(&t, &i)).await?;
        let public_traffic = Some(source.public_traffic);
        let network = super::stored_plan(&source)?.map(|p| p.network);
        let mut plan = self
            .plan_restored(
                &tenant,
                &captured.template,
                captured.resources,
                captured.env.clone(),
                plain,
                req.metadata,
                req.timeout_secs,
                captured.file.clone(),
            )
            .await?;
        if req.memory {
            restore_memory(&mut plan, &captured.backend, captured.file.clone());
        }
        plan.public_traffic = public_traffic;
        let network = network.unwrap_or_default();
        if network != plan.network {
            // The template's warm-pool members serve the template's network, not this one.
            plan.network = network;
            plan.poolable = false;
        }
        let creates = (0..count).map(|_| {
            let (inner, tenant, key_id, plan) =
                (self.clone(), tenant.clone(), key_id.clone(), plan.clone());
            async move {
                inner
                    .create_planned(tenant, key_id, plan, Instant::now())
                    .await
            }
        });
        Ok(futures_util::stream::iter(creates)
            .buffered(FORK_PARALLELISM)
            .collect()
            .await)
    }
}

/// Makes `plan` one of a sandbox restored from the memory checkpoint in `dir` by the
/// `backend` that saved it: no layer to unpack, and no warm-pool member serves.
fn restore_memory(plan: &mut SandboxPlan, backend: &str, dir: PathBuf) {
    backend.clone_into(&mut plan.backend);
    plan.layer = None;
    plan.memory = Some(dir);
    plan.poolable = false;
}

/// Streams `client`'s writable layer into the new file `path` (mode 0600) within `bounds`,
/// counting its bytes in `held`, and syncs it. Returns its size.
async fn write_layer(
    client: &AgentClient,
    path: &Path,
    bounds: &Bounds,
    held: &mut Held<'_>,
    id: &str,
) -> ManagerResult<u64> {
    let io = |e: std::io::Error| {
        ManagerError::Internal(format!("writing snapshot file {}: {e}", path.display()))
    };
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .await
        .map_err(io)?;
    let mut stream = client
        .capture_layer(false)
        .await
        .map_err(|e| ManagerError::Unavailable(format!("snapshot of sandbox {id}: {e}")))?;
    let mut size: u64 = 0;
    while let Some(piece) = stream.next().await {
        let piece = piece
            .map_err(|e| ManagerError::Unavailable(format!("snapshot of sandbox {id}: {e}")))?;
        size = size.saturating_add(piece.len() as u64);
        bounds.check_beside(size, held.others(), id)?;
        held.add(piece.len() as u64);
        file.write_all(&piece).await.map_err(io)?;
    }
    file.sync_all().await.map_err(io)?;
    Ok(size)
}
