//! Health checks of running sandboxes. An agent that exits closes its connection, and the
//! pool task ends its sandbox at once; an agent that is alive but does not answer (stopped by a
//! signal from the host, stuck) leaves its connection open, and every call to it would wait for
//! its own timeout. So every [`HEALTH_PROBE_INTERVAL`] each running sandbox's agent is asked for
//! its health: after one unanswered probe the sandbox's calls are refused at once (503,
//! `unavailable`) rather than left waiting, an answer lifts that, and after
//! [`UNHEALTHY_PROBES`] unanswered probes in a row the sandbox is destroyed and recorded
//! `failed` with the reason. Paused sandboxes are frozen on purpose and are not probed; warm-pool
//! members have their own probe (see `pool`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::store::{EndReason, SandboxState};

use super::{Inner, Live, ManagerError, ManagerResult, SandboxManager, lock};
use crate::auth::Caller;

/// How often every running sandbox's agent is asked for its health (each probe waits up to
/// [`crate::agent_client::HEALTH_TIMEOUT`]).
pub const HEALTH_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Unanswered probes in a row after which a sandbox is ended as failed.
pub const UNHEALTHY_PROBES: u32 = 3;

/// What the health checks know of one sandbox.
#[derive(Debug, Default)]
pub(super) struct Health {
    /// Probes in a row its agent did not answer.
    failures: AtomicU32,
}

impl Health {
    /// Why calls to sandbox `id` are refused now, if they are: its last probe went unanswered.
    pub(super) fn refusal(&self, id: &str) -> Option<ManagerError> {
        let failures = self.failures.load(Ordering::SeqCst);
        (failures > 0).then(|| {
            ManagerError::Unavailable(format!(
                "sandbox {id} does not answer: its agent missed {failures} health check(s) in a row; \
                 it is ended as failed after {UNHEALTHY_PROBES}"
            ))
        })
    }
}

/// When the sandboxes were last probed, and whether a round is under way (rounds never
/// overlap).
#[derive(Debug)]
pub(super) struct Probes {
    probed: std::sync::Mutex<Instant>,
    probing: AtomicBool,
}

impl Default for Probes {
    fn default() -> Self {
        Probes {
            probed: std::sync::Mutex::new(Instant::now()),
            probing: AtomicBool::new(false),
        }
    }
}

impl SandboxManager {
    /// Whether the agent of the caller's running sandbox `id` answers a health call now:
    /// `Unavailable` (503) when its last probe went unanswered or this call is not answered
    /// within [`crate::agent_client::HEALTH_TIMEOUT`]. For callers that must not act on a
    /// sandbox whose agent is stuck (E2B's strict pause).
    pub async fn check_agent(&self, caller: &Caller, id: &str) -> ManagerResult<()> {
        let live = self.inner.live_for(&caller.tenant, id).await?;
        live.client.health().await.map_err(|e| {
            ManagerError::Unavailable(format!("sandbox {id}'s agent does not answer: {e}"))
        })
    }
}

impl Inner {
    /// Every [`HEALTH_PROBE_INTERVAL`], probes every running sandbox's agent (in the background,
    /// all at once) and acts on the answers (see the module's notes). Called by the pool task's
    /// every pass.
    pub(super) fn probe_sandboxes(self: &Arc<Self>) {
        {
            let mut probed = lock(&self.health_probes.probed);
            if probed.elapsed() < HEALTH_PROBE_INTERVAL
                || self.health_probes.probing.swap(true, Ordering::SeqCst)
            {
                return;
            }
            *probed = Instant::now();
        }
        let all: Vec<(String, Arc<Live>)> = lock(&self.live)
            .iter()
            .filter(|(_, live)| !live.is_paused())
            .map(|(id, live)| (id.clone(), live.clone()))
            .collect();
        let inner = self.clone();
        tokio::spawn(async move {
            let checks = all.into_iter().map(|(id, live)| async move {
                let answered = live.client.health().await.is_ok();
                (id, live, answered)
            });
            for (id, live, answered) in futures_util::future::join_all(checks).await {
                inner.judge(id, live, answered);
            }
            inner.health_probes.probing.store(false, Ordering::SeqCst);
        });
    }

    /// Acts on one probe of sandbox `id`.
    fn judge(self: &Arc<Self>, id: String, live: Arc<Live>, answered: bool) {
        if answered {
            if live.health.failures.swap(0, Ordering::SeqCst) > 0 {
                tracing::info!(sandbox = %id, "the sandbox's agent answers again");
            }
            return;
        }
        // Paused while the probe waited: frozen on purpose, not unhealthy. Ended meanwhile (a
        // delete racing the probe): nothing to judge.
        let current = || {
            lock(&self.live)
                .get(&id)
                .is_some_and(|l| Arc::ptr_eq(l, &live))
        };
        if live.is_paused() || !current() {
            return;
        }
        let failures = live.health.failures.fetch_add(1, Ordering::SeqCst) + 1;
        if failures == 1 {
            tracing::warn!(sandbox = %id, "the sandbox's agent does not answer; refusing its calls");
        }
        // Past the limit too: an end whose record could not be written is tried again.
        if failures < UNHEALTHY_PROBES {
            return;
        }
        let inner = self.clone();
        tokio::spawn(async move {
            tracing::warn!(sandbox = %id, "the sandbox's agent stopped answering; ending it");
            let reason = EndReason::Failed(format!(
                "the sandbox's agent stopped answering ({UNHEALTHY_PROBES} health checks in a row \
                 went unanswered)"
            ));
            if let Err(e) = inner
                .end_as(&live.tenant, &id, SandboxState::Failed, reason)
                .await
            {
                tracing::warn!(sandbox = %id, "ending a sandbox whose agent stopped answering: {e}");
            }
        });
    }
}
