//! Creates with an idempotency key: a client that retries a create (its answer was lost, the
//! connection broke) gets the sandbox its first attempt made instead of a second one.
//!
//! The key is recorded in the store, per tenant, with the sandbox (in one transaction, so a
//! crash cannot keep one without the other), and counts for
//! [`IDEMPOTENCY_KEY_RETENTION`]; records older than that are pruned (at most once a
//! [`PRUNE_INTERVAL`], by the creates that use keys). Creates with the same key at the same
//! time wait for one another, so only the first makes a sandbox. A create whose sandbox never
//! ran (its start failed, or its server went away meanwhile) forgets its key: retrying it
//! tries again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_proto::v1;

use super::{Inner, ManagerError, ManagerResult, SandboxManager, lock, ms};
use crate::auth::Caller;
use crate::store::{check_idempotency_key, now_ms};

/// How long an idempotency key is remembered after the create that used it.
pub const IDEMPOTENCY_KEY_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Least time between two prunes of old idempotency keys.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// What creates with the same (tenant, key) take turns on.
type Gate = Arc<tokio::sync::Mutex<()>>;

/// The creates with an idempotency key in flight, one gate per (tenant, key).
#[derive(Debug, Default)]
pub(super) struct InFlight {
    gates: Mutex<HashMap<(String, String), Gate>>,
    /// When old keys were last pruned, Unix milliseconds.
    last_prune_ms: AtomicI64,
}

impl InFlight {
    /// The gate of (`tenant`, `key`), made on first use.
    fn gate(&self, tenant: &str, key: &str) -> Gate {
        lock(&self.gates)
            .entry((tenant.to_owned(), key.to_owned()))
            .or_default()
            .clone()
    }

    /// Forgets the gate of (`tenant`, `key`) unless another create waits on it; `gate` is the
    /// caller's own handle of it.
    fn release(&self, tenant: &str, key: &str, gate: &Gate) {
        let mut gates = lock(&self.gates);
        let id = (tenant.to_owned(), key.to_owned());
        // Two handles: the map's and the caller's. More means someone waits.
        if gates.get(&id).is_some_and(|g| Arc::ptr_eq(g, gate)) && Arc::strong_count(gate) <= 2 {
            gates.remove(&id);
        }
    }

    /// Whether a prune is due at `now`; claims it if so.
    fn prune_due(&self, now: i64) -> bool {
        let last = self.last_prune_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= ms(PRUNE_INTERVAL)
            && self
                .last_prune_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

impl SandboxManager {
    /// [`SandboxManager::create`], once per tenant and idempotency `key` (1 to 255 characters
    /// of `[a-z0-9-]`) within [`IDEMPOTENCY_KEY_RETENTION`]: a repeat returns the sandbox the
    /// first create made, as it is now, and `true`.
    pub async fn create_idempotent(
        &self,
        caller: &Caller,
        key: &str,
        req: v1::CreateSandbox,
    ) -> ManagerResult<(v1::Sandbox, bool)> {
        check_idempotency_key(key).map_err(ManagerError::from)?;
        let this = self.clone();
        let (caller, key) = (caller.clone(), key.to_owned());
        // In a task of its own: a caller that goes away must not cut it off while it holds
        // the key's gate.
        tokio::spawn(async move {
            let tenant = &caller.tenant;
            let gate = this.inner.idempotent_creates.gate(tenant, &key);
            let held = gate.lock().await;
            let made = this.create_once(&caller, &key, req).await;
            this.inner.idempotent_creates.release(tenant, &key, &gate);
            drop(held);
            this.inner.prune_idempotency_keys();
            made
        })
        .await
        .map_err(|e| ManagerError::Internal(format!("create task: {e}")))?
    }

    /// The body of [`SandboxManager::create_idempotent`], under the key's lock.
    async fn create_once(
        &self,
        caller: &Caller,
        key: &str,
        req: v1::CreateSandbox,
    ) -> ManagerResult<(v1::Sandbox, bool)> {
        let since = now_ms().saturating_sub(ms(IDEMPOTENCY_KEY_RETENTION));
        let (t, k) = (caller.tenant.clone(), key.to_owned());
        let earlier = self
            .inner
            .db(move |s| s.idempotent_sandbox(&t, &k, since))
            .await?;
        if let Some(id) = earlier {
            match self.get(caller, &id).await {
                Ok(sandbox) => return Ok((sandbox, true)),
                // Its record was purged meanwhile: the key no longer names a sandbox.
                Err(ManagerError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let sandbox = self
            .create_keyed(caller, req, None, Some(key.to_owned()))
            .await?;
        Ok((sandbox, false))
    }
}

impl Inner {
    /// Deletes idempotency keys past their retention, in the background, if a prune is due.
    fn prune_idempotency_keys(&self) {
        let now = now_ms();
        if !self.idempotent_creates.prune_due(now) {
            return;
        }
        let store = self.store.clone();
        let before = now.saturating_sub(ms(IDEMPOTENCY_KEY_RETENTION));
        tokio::task::spawn_blocking(move || match store.prune_idempotency_keys(before) {
            Ok(0) => {}
            Ok(n) => tracing::info!(keys = n, "pruned old idempotency keys"),
            Err(e) => tracing::warn!("pruning idempotency keys: {e}"),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_are_shared_then_forgotten() {
        let f = InFlight::default();
        let a = f.gate("t", "k");
        let b = f.gate("t", "k");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &f.gate("u", "k")));
        // `b` still waits: kept.
        f.release("t", "k", &a);
        assert!(Arc::ptr_eq(&a, &f.gate("t", "k")));
        drop(b);
        f.release("t", "k", &a);
        assert!(!Arc::ptr_eq(&a, &f.gate("t", "k")));
    }

    #[test]
    fn prunes_are_spaced() {
        let f = InFlight::default();
        let now = ms(PRUNE_INTERVAL) * 10;
        assert!(f.prune_due(now));
        assert!(!f.prune_due(now + 1));
        assert!(f.prune_due(now + ms(PRUNE_INTERVAL)));
    }
}
