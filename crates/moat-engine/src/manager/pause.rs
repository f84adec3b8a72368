//! Pause and resume: every process of a sandbox frozen (the backend's `Instance::pause`, the
//! cgroup freezer on the native backend) and thawed, recorded as `paused` and `running`.
//!
//! A pause first lets the short calls under way finish (file calls, process listing and
//! signals, up to [`super::PAUSE_DRAIN_LIMIT`]; see the `calls` module), refusing new ones.
//!
//! While a sandbox is paused:
//! - commands, file calls and runs are refused with 409 (its agent is frozen too and could
//!   not answer), or resume it first when its lifecycle says so (`auto_resume`); streams
//!   under way (commands, watches) stall until it resumes, and one open across a pause
//!   longer than its idle limit fails (saved to disk, they end);
//! - its time to live keeps counting, and expiry ends it as it would a running one; a resume
//!   may set a new one;
//! - its memory and its disk stay allocated (it counts against quotas as a running one does);
//! - the watcher of dead agents leaves it alone (warm-pool members, whose health is probed,
//!   are never paused);
//! - a server restart reaps it like a running one (recorded `killed`, reason
//!   `server_restart`), unless it is saved to disk (below).
//!
//! Pausing keeps memory, so a resumed sandbox carries on where it stopped. On a backend that
//! saves memory (gvisor) it is kept on disk instead: the sandbox is checkpointed into the
//! snapshot directory's `paused/<id>` and released, holding no memory, cgroup or process while
//! paused, and a resume restores it (see the `memory` module). That one outlives its server:
//! the next one on the same data directory takes it over, still paused.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use moat_proto::v1;

use crate::backend::Capabilities;

use crate::auth::Caller;

use super::{
    Inner, Live, ManagerError, ManagerResult, SandboxManager, lock, ms, to_the_end, to_v1,
};
use crate::store::{SandboxRecord, SandboxState, now_ms};

impl SandboxManager {
    /// Freezes every process of the caller's sandbox `id` and records it `paused`. A sandbox
    /// already paused is a conflict (409), as is one that is not running.
    pub async fn pause(&self, caller: &Caller, id: &str) -> ManagerResult<v1::Sandbox> {
        let inner = self.inner.clone();
        let (tenant, id) = (caller.tenant.clone(), id.to_owned());
        to_the_end(
            "pause",
            async move { inner.pause(&tenant, &id, false).await },
        )
        .await
    }

    /// Thaws the caller's paused sandbox `id` and records it `running`; with `timeout_secs`,
    /// it then expires that long from now. One that is not paused is a conflict (409).
    pub async fn resume(
        &self,
        caller: &Caller,
        id: &str,
        req: v1::ResumeSandbox,
    ) -> ManagerResult<v1::Sandbox> {
        let ttl = req
            .timeout_secs
            .map(|t| self.inner.ttl(Some(t)))
            .transpose()?;
        let inner = self.inner.clone();
        let (tenant, id) = (caller.tenant.clone(), id.to_owned());
        to_the_end(
            "resume",
            async move { inner.resume(&tenant, &id, ttl).await },
        )
        .await
    }
}

impl Inner {
    /// Pauses `rec`, whose time to live ran out by `now` and whose lifecycle pauses it then,
    /// and takes its time to live away (it stays paused until resumed or deleted). `false`
    /// when it could not be paused, for the caller to end it.
    pub(super) async fn pause_at_timeout(self: &Arc<Self>, rec: &SandboxRecord, now: i64) -> bool {
        let (tenant, id) = (rec.tenant.as_str(), rec.id.as_str());
        match rec.state {
            SandboxState::Running => {
                // Kept in memory where a save to disk finds no room: a sandbox whose lifecycle
                // keeps it at its timeout must not be ended for its tenant's full quota.
                if let Err(e) = self.clone().pause(tenant, id, true).await {
                    // Paused meanwhile by another call (the owner's pause): as good as done.
                    let (t, i) = (tenant.to_owned(), id.to_owned());
                    let paused = self
                        .db(move |s| s.get_sandbox(&t, &i))
                        .await
                        .is_ok_and(|r| r.state == SandboxState::Paused);
                    if !paused {
                        tracing::warn!(sandbox = %id, "pausing at its timeout failed, ending it: {e}");
                        return false;
                    }
                }
            }
            SandboxState::Paused => {}
            _ => return false,
        }
        // Only the time to live that ran out: a resume meanwhile gave it a new one to keep.
        let (t, i) = (tenant.to_owned(), id.to_owned());
        match self.db(move |s| s.clear_expired_pause(&t, &i, now)).await {
            Ok(cleared) => {
                if cleared {
                    tracing::info!(sandbox = %id, "paused at its timeout");
                }
                true
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, "clearing the time to live of a paused sandbox: {e}");
                false
            }
        }
    }

    /// Whether `tenant`'s paused sandbox `id` is resumed by a call that needs it (its
    /// lifecycle's `auto_resume`), and if so the time to live it then gets: the one it was
    /// created with.
    pub(super) async fn resumes_on_call(
        &self,
        tenant: &str,
        id: &str,
    ) -> Option<std::time::Duration> {
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let rec = self.db(move |s| s.get_sandbox(&t, &i)).await.ok()?;
        let plan = super::stored_plan(&rec).ok().flatten()?;
        if !plan.lifecycle.auto_resume {
            return None;
        }
        self.ttl(plan.timeout_secs).ok()
    }

    /// Pauses `tenant`'s sandbox `id`: saved to disk where its backend saves memory, else
    /// frozen in place. With `in_memory_if_no_room`, one that would be saved to disk but finds
    /// no room (its tenant's snapshot quota, the data dir's free space) is frozen in place
    /// instead of refused.
    async fn pause(
        self: Arc<Self>,
        tenant: &str,
        id: &str,
        in_memory_if_no_room: bool,
    ) -> ManagerResult<v1::Sandbox> {
        let live = self.live_any(tenant, id).await?;
        // Refused before anything changes, by what the sandbox's own backend can do.
        Capabilities::require(
            live.backend.capabilities().pause,
            live.backend.name(),
            "pause sandboxes",
        )
        .map_err(|e| ManagerError::Conflict(e.to_string()))?;
        let (live, _op) = self.live_locked(tenant, id).await?;
        if live.is_paused() {
            return Err(ManagerError::Conflict(format!(
                "sandbox {id} is already paused"
            )));
        }
        if !lock(&self.live).contains_key(id) {
            return Err(ManagerError::Conflict(format!(
                "sandbox {id} ended while it was being paused"
            )));
        }
        // Refuse new calls first: from here on they would only wait on a frozen agent. Those
        // under way may finish (a save to disk would cut them off).
        live.paused.store(true, Ordering::SeqCst);
        if !live.calls.drain(super::PAUSE_DRAIN_LIMIT).await {
            tracing::info!(sandbox = %id, "pausing with calls still under way after {:?}", super::PAUSE_DRAIN_LIMIT);
        }
        if let Some(dir) = self.disk_pause_dir(&live, id) {
            // Saved to disk and released: the sandbox holds no memory while paused.
            match self.pause_to_disk(&live, tenant, id, &dir).await {
                Ok(()) => {}
                Err(ManagerError::QuotaExceeded(why) | ManagerError::InsufficientStorage(why))
                    if in_memory_if_no_room =>
                {
                    tracing::info!(sandbox = %id, "no room to pause it to disk, frozen in place instead: {why}");
                    return self.freeze(&live, tenant, id).await;
                }
                Err(e) => {
                    live.paused.store(false, Ordering::SeqCst);
                    return Err(e);
                }
            }
            let (t, i) = (tenant.to_owned(), id.to_owned());
            return match self
                .db(move |s| s.update_sandbox_state(&t, &i, SandboxState::Paused, None))
                .await
            {
                Ok(rec) => Ok(to_v1(&rec)),
                Err(e) => {
                    // Not recorded: run it again, as the record has it.
                    self.resume_from_disk(&live, tenant, id, &dir).await?;
                    self.forget_paused_to_disk(id, &dir);
                    if let Some(fresh) = lock(&self.live).get(id) {
                        fresh.paused.store(false, Ordering::SeqCst);
                    }
                    Err(e)
                }
            };
        }
        self.freeze(&live, tenant, id).await
    }

    /// Freezes the paused-marked sandbox `id` of `live` in place and records it paused.
    async fn freeze(&self, live: &Arc<Live>, tenant: &str, id: &str) -> ManagerResult<v1::Sandbox> {
        let frozen = live.instance.lock().await.pause().await;
        if let Err(e) = frozen {
            live.paused.store(false, Ordering::SeqCst);
            return Err(ManagerError::Unavailable(format!(
                "could not pause sandbox {id}: {e}"
            )));
        }
        let (t, i) = (tenant.to_owned(), id.to_owned());
        match self
            .db(move |s| s.update_sandbox_state(&t, &i, SandboxState::Paused, None))
            .await
        {
            Ok(rec) => Ok(to_v1(&rec)),
            Err(e) => {
                // Not recorded (ended meanwhile, or the store failed): leave it as it was.
                let _ = live.instance.lock().await.resume().await;
                live.paused.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    pub(super) async fn resume(
        self: Arc<Self>,
        tenant: &str,
        id: &str,
        ttl: Option<std::time::Duration>,
    ) -> ManagerResult<v1::Sandbox> {
        let (live, _op) = self.live_locked(tenant, id).await?;
        if !live.is_paused() {
            return Err(ManagerError::Conflict(format!(
                "sandbox {id} is not paused"
            )));
        }
        let on_disk = self.disk_pause_dir(&live, id).filter(|d| d.exists());
        let live = match &on_disk {
            Some(dir) => {
                self.resume_from_disk(&live, tenant, id, dir).await?;
                self.live_any(tenant, id).await?
            }
            None => {
                live.instance.lock().await.resume().await.map_err(|e| {
                    ManagerError::Unavailable(format!("could not resume sandbox {id}: {e}"))
                })?;
                live.clone()
            }
        };
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let recorded = match self
            .db(move |s| s.update_sandbox_state(&t, &i, SandboxState::Running, None))
            .await
        {
            // Recorded running already: a pause (or a snapshot's restart) whose own record
            // could not be written left it so. Running is what it now is.
            Err(ManagerError::Conflict(why)) => {
                let (t, i) = (tenant.to_owned(), id.to_owned());
                match self.db(move |s| s.get_sandbox(&t, &i)).await {
                    Ok(rec) if rec.state == SandboxState::Running => Ok(rec),
                    _ => Err(ManagerError::Conflict(why)),
                }
            }
            other => other,
        };
        let rec = match recorded {
            Ok(rec) => rec,
            Err(e) => {
                // Not recorded: keep it as the record has it. A thawed one is frozen again; a
                // restored one is released again, paused on what its pause saved, which stays.
                match &on_disk {
                    None => {
                        let _ = live.instance.lock().await.pause().await;
                    }
                    Some(_) => {
                        let _ = live.instance.lock().await.destroy().await;
                    }
                }
                return Err(e);
            }
        };
        if let Some(dir) = &on_disk {
            self.forget_paused_to_disk(id, dir);
        }
        live.paused.store(false, Ordering::SeqCst);
        let Some(ttl) = ttl else {
            return Ok(to_v1(&rec));
        };
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let at = now_ms().saturating_add(ms(ttl));
        let rec = self
            .db(move |s| s.set_sandbox_expiry(&t, &i, Some(at)))
            .await?;
        Ok(to_v1(&rec))
    }
}
