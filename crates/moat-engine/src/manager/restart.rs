//! What happens to sandboxes across a server restart: kept at shutdown (when configured) and
//! adopted at start, or destroyed and reaped.

use std::collections::HashSet;
use std::sync::Arc;

use crate::agent_client::AgentClient;
use crate::backend::{Backend, Instance};
use crate::store::{EndReason, SandboxRecord, SandboxState};

use super::{Inner, Live, ManagerError, SandboxManager, lock};

/// What a stopping server does with the sandboxes it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShutdownMode {
    /// Destroy them and record them killed (reason `shutdown`).
    #[default]
    Destroy,
    /// Leave them running, recorded as they are, for the next server on the same data dir to
    /// adopt (the backend must have made them keepable). Warm-pool members are destroyed.
    Keep,
}
// Either way, sandboxes paused to disk (on a backend that saves memory) stay as they are:
// they hold nothing on the host, and the next server takes them over.

/// What [`SandboxManager::recover`] found of the previous server's sandboxes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Taken over, running (or paused) as before.
    pub adopted: Vec<String>,
    /// Gone or not adoptable: killed, reaped and recorded killed (reason `server_restart`).
    pub reaped: Vec<String>,
    /// Paused to disk by a backend this server cannot run: kept as they are, for a server
    /// that can.
    pub waiting: Vec<String>,
    /// Jobs the previous server was running, queued again.
    pub jobs_requeued: u64,
    /// Jobs the previous server was running that had been cut off too often, failed.
    pub jobs_failed: u64,
}

impl SandboxManager {
    /// Run once at start, before serving: takes over the sandboxes a previous server on this
    /// data dir kept, and kills and records whatever else it left (sandboxes, warm-pool
    /// members), so the store matches what runs.
    pub async fn recover(&self) -> Result<Recovered, ManagerError> {
        let inner = &self.inner;
        let mut out = Recovered::default();
        // Members are recorded without their backend: every backend reaps what it has of them.
        let members = inner.db(|s| s.take_pool_members()).await?;
        for id in members {
            inner.reap(&id, None).await;
        }
        let active = inner.db(|s| s.active_sandboxes()).await?;
        let mut known = HashSet::new();
        for rec in active {
            known.insert(rec.id.clone());
            match inner.adopt_paused_to_disk(&rec).await {
                Ok(true) => {
                    out.adopted.push(rec.id);
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(sandbox = %rec.id, "could not take over a sandbox paused to disk: {e}")
                }
            }
            if inner.keep_paused_for_later(&rec) {
                tracing::warn!(
                    sandbox = %rec.id,
                    backend = %rec.backend,
                    "a sandbox paused to disk by a backend this server cannot run is kept for one that can"
                );
                out.waiting.push(rec.id);
                continue;
            }
            match inner.adopt_kept(&rec).await {
                Ok(true) => out.adopted.push(rec.id),
                Ok(false) => {
                    inner.reap(&rec.id, Some(&rec.backend)).await;
                    inner.record_lost(&rec).await;
                    out.reaped.push(rec.id);
                }
                Err(e) => {
                    tracing::warn!(sandbox = %rec.id, "could not take over a kept sandbox: {e}");
                    inner.reap(&rec.id, Some(&rec.backend)).await;
                    inner.record_lost(&rec).await;
                    out.reaped.push(rec.id);
                }
            }
        }
        // Kept sandboxes the store no longer counts as active (ended by a crash in between),
        // of every backend.
        for backend in inner.backends.iter() {
            for id in backend.kept() {
                if !known.contains(&id) {
                    reap_with(backend.as_ref(), &id).await;
                }
            }
        }
        (out.jobs_requeued, out.jobs_failed) = self.recover_jobs().await?;
        Ok(out)
    }

    /// Ends this manager's work at shutdown: destroys the warm pools, then destroys or keeps
    /// (see [`ShutdownMode`]) every sandbox it runs. Returns how many it destroyed and how many
    /// it kept.
    pub async fn shutdown(&self, mode: ShutdownMode) -> (usize, usize) {
        let members = self.drain_pools().await;
        if members > 0 {
            tracing::info!(members, "destroyed the warm pools");
        }
        let all: Vec<(String, Arc<Live>)> = lock(&self.inner.live).drain().collect();
        let (mut destroyed, mut kept) = (0, 0);
        for (id, live) in all {
            // Saved to disk, it holds nothing here and waits for the next server.
            if self.inner.is_saved_to_disk(&live, &id) {
                kept += 1;
                continue;
            }
            let mut instance = live.instance.lock().await;
            if mode == ShutdownMode::Keep {
                match instance.keep() {
                    Ok(()) => {
                        kept += 1;
                        continue;
                    }
                    Err(e) => tracing::warn!(sandbox = %id, "cannot keep it, destroying: {e}"),
                }
            }
            if let Err(e) = instance.destroy().await {
                tracing::warn!(sandbox = %id, "destroy at shutdown: {e}");
            }
            drop(instance);
            destroyed += 1;
            let tenant = live.tenant.clone();
            let marked = self
                .inner
                .db(move |s| {
                    s.update_sandbox_state(
                        &tenant,
                        &id,
                        SandboxState::Killed,
                        Some(EndReason::Other("shutdown".into())),
                    )
                })
                .await;
            if let Err(e) = marked
                && !matches!(e, ManagerError::Conflict(_))
            {
                tracing::warn!("recording a sandbox ended at shutdown: {e}");
            }
        }
        (destroyed, kept)
    }
}

impl Inner {
    /// Takes over `rec`'s sandbox if the backend kept it; false if there is none to take.
    async fn adopt_kept(&self, rec: &SandboxRecord) -> Result<bool, ManagerError> {
        // A sandbox still starting when its server went away never became usable.
        if rec.state == SandboxState::Starting {
            return Ok(false);
        }
        let backend = self.backends.get(&rec.backend)?.clone();
        // The create's own environment comes from its recorded plan, so a snapshot of an
        // adopted sandbox keeps it; records older than plans had none kept.
        let plan = super::stored_plan(rec)?;
        let network = plan.as_ref().map(|p| p.network.clone()).unwrap_or_default();
        let env = plan.map(|p| p.env).unwrap_or_default();
        let Some(mut instance) = backend.adopt(&rec.id).await? else {
            return Ok(false);
        };
        let connected = async {
            // Its network is served again from its recorded policy before anything reaches it.
            let egress = self
                .serve_network(&rec.id, &rec.tenant, &network, instance.as_ref())
                .await?;
            let client = connect(instance.as_mut(), rec.state == SandboxState::Paused).await?;
            Ok::<_, ManagerError>((client, egress))
        };
        match connected.await {
            Ok((client, egress)) => {
                let live = Live::new(
                    &rec.tenant,
                    client,
                    backend,
                    instance,
                    env,
                    rec.public_traffic,
                )
                .with_egress(egress);
                if rec.state == SandboxState::Paused {
                    live.paused.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                lock(&self.live).insert(rec.id.clone(), Arc::new(live));
                Ok(true)
            }
            Err(e) => {
                if let Err(d) = instance.destroy().await {
                    tracing::warn!(sandbox = %rec.id, "destroying an unreachable kept sandbox: {d}");
                }
                Err(e)
            }
        }
    }

    /// Kills whatever is left of sandbox `id` on the host, with the backend of kind `kind`
    /// that made it; with every backend when the kind is unknown or not registered here.
    async fn reap(&self, id: &str, kind: Option<&str>) {
        if let Some(backend) = kind.and_then(|k| self.backends.get(k).ok()) {
            reap_with(backend.as_ref(), id).await;
            return;
        }
        for backend in self.backends.iter() {
            reap_with(backend.as_ref(), id).await;
        }
    }

    /// Records `rec` killed by the restart.
    async fn record_lost(&self, rec: &SandboxRecord) {
        let (t, i) = (rec.tenant.clone(), rec.id.clone());
        match self
            .db(move |s| {
                s.update_sandbox_state(&t, &i, SandboxState::Killed, Some(EndReason::ServerRestart))
            })
            .await
        {
            Ok(_) | Err(ManagerError::Conflict(_)) => {
                // What a pause to disk saved of one that could not be taken over goes with it
                // (the start-up sweep, which ran before, kept it for a sandbox recorded paused).
                if let Some(snapshots) = &self.opts.snapshot_dir {
                    let dir = snapshots.join(super::memory::PAUSED_DIR).join(&rec.id);
                    self.forget_paused_to_disk(&rec.id, &dir);
                }
            }
            Err(e) => {
                tracing::warn!(sandbox = %rec.id, "recording a sandbox lost at restart: {e}")
            }
        }
    }
}

/// Kills whatever `backend` has left of sandbox `id` on the host.
async fn reap_with(backend: &dyn Backend, id: &str) {
    match backend.reap_orphan(id).await {
        Ok(true) => tracing::info!(sandbox = %id, "killed a sandbox of a previous run"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(sandbox = %id, "could not reap a sandbox of a previous run: {e}")
        }
    }
}

/// A client of an adopted sandbox's agent, over the channel the backend opened. A paused
/// sandbox is thawed for the handshake and frozen again.
async fn connect(instance: &mut dyn Instance, paused: bool) -> Result<AgentClient, ManagerError> {
    let channel = instance
        .take_channel()
        .ok_or_else(|| ManagerError::Internal("backend gave no agent channel".into()))?;
    if paused {
        instance.resume().await?;
    }
    let connected = async {
        let client = AgentClient::handshake(channel)
            .await
            .map_err(|e| ManagerError::Unavailable(format!("agent handshake: {e}")))?;
        client
            .health()
            .await
            .map_err(|e| ManagerError::Unavailable(format!("agent health: {e}")))?;
        Ok::<_, ManagerError>(client)
    }
    .await;
    if paused {
        instance.pause().await?;
    }
    connected
}
