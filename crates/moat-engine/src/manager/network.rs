//! Sandboxes' networks: a policy checked for its caller and backend, served from the moment a
//! sandbox is made (before its template's start script runs), looked at and changed while it
//! runs, and served again when a server adopts a kept sandbox.

use std::sync::Arc;

use moat_proto::v1;

use super::{Inner, Live, ManagerError, ManagerResult, SandboxManager, lock, to_the_end};
use crate::auth::Caller;
use crate::backend::{Backend, Instance};
use crate::error::EngineError;
use crate::network::policy::PolicyError;
use crate::network::{Egress, EgressSettings, NetworkPolicy};

/// Who may give sandboxes network access on a server (`moat serve --egress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EgressAccess {
    /// Any key (the default).
    #[default]
    All,
    /// Admin keys only.
    Admin,
    /// Nobody: every sandbox has no network.
    None,
}

impl Inner {
    /// Refuses a recorded `policy` (a template's, a fork's source's) with network access on a
    /// server whose `--egress` now gives nobody any: it was allowed when it was written.
    pub(super) fn check_egress_on(&self, policy: &NetworkPolicy) -> ManagerResult<()> {
        if matches!(policy, NetworkPolicy::Egress(_))
            && self.opts.egress_access == EgressAccess::None
        {
            return Err(ManagerError::Forbidden(
                "this server gives sandboxes no network (moat serve --egress none), and this \
                 sandbox's template or source has one: give it none"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The policy `n` asks for: every entry parsed, its size bounded, and what it opens allowed
    /// to the caller (`admin` alone may open private, shared or link-local ranges), on a server
    /// whose `--egress` lets the caller give network access at all.
    pub(super) fn policy_of(&self, n: &v1::Network, admin: bool) -> ManagerResult<NetworkPolicy> {
        let policy = NetworkPolicy::from_v1(n).map_err(ManagerError::Invalid)?;
        if let NetworkPolicy::Egress(p) = &policy {
            match self.opts.egress_access {
                EgressAccess::All => {}
                EgressAccess::Admin if admin => {}
                EgressAccess::Admin => {
                    return Err(ManagerError::Forbidden(
                        "network access needs an admin key on this server (moat serve --egress \
                         admin)"
                            .into(),
                    ));
                }
                EgressAccess::None => {
                    return Err(ManagerError::Forbidden(
                        "this server gives sandboxes no network (moat serve --egress none)".into(),
                    ));
                }
            }
            p.validate(admin).map_err(|e| match e {
                PolicyError::Invalid(m) => ManagerError::Invalid(m),
                PolicyError::NeedsAdmin(m) => ManagerError::Forbidden(m),
            })?;
        }
        Ok(policy)
    }
}

/// Refuses a policy with network access on a backend that cannot give it.
pub(super) fn check_backend(backend: &dyn Backend, policy: &NetworkPolicy) -> ManagerResult<()> {
    if matches!(policy, NetworkPolicy::Egress(_)) && !backend.capabilities().egress {
        return Err(ManagerError::Invalid(format!(
            "the {} backend cannot give sandboxes network access; use another backend \
             or no network",
            backend.name()
        )));
    }
    Ok(())
}

/// What `GET` answers for `live`.
fn shown(live: &Live) -> v1::SandboxNetwork {
    match &*lock(&live.egress) {
        Some(e) => v1::SandboxNetwork {
            network: NetworkPolicy::Egress(e.policy()).to_v1(),
            stats: Some(e.stats()),
        },
        None => v1::SandboxNetwork::default(),
    }
}

impl SandboxManager {
    /// The caller's sandbox `id`'s network policy and counters.
    pub async fn network(&self, caller: &Caller, id: &str) -> ManagerResult<v1::SandboxNetwork> {
        let live = self.inner.live_any(&caller.tenant, id).await?;
        Ok(shown(&live))
    }

    /// Replaces the network policy of the caller's running sandbox `id` with `n`: connections
    /// and DNS queries from then on meet the new policy at once; connections already open stay
    /// open, unless the new policy is no network, which ends them. Recorded, so a server that
    /// adopts the sandbox serves the new one.
    pub async fn set_network(
        &self,
        caller: &Caller,
        id: &str,
        n: v1::Network,
    ) -> ManagerResult<v1::SandboxNetwork> {
        let policy = self.inner.policy_of(&n, caller.is_admin())?;
        let inner = self.inner.clone();
        let (tenant, id) = (caller.tenant.clone(), id.to_owned());
        to_the_end("network update", async move {
            inner.set_network(&tenant, &id, policy).await
        })
        .await
    }
}

impl Inner {
    /// Serves `policy` for sandbox `id` of tenant `owner` made as `instance`: `None` for no
    /// network.
    pub(super) async fn serve_network(
        &self,
        id: &str,
        owner: &str,
        policy: &NetworkPolicy,
        instance: &dyn Instance,
    ) -> ManagerResult<Option<Egress>> {
        let NetworkPolicy::Egress(p) = policy else {
            return Ok(None);
        };
        let sockets = instance.open_egress().await.map_err(|e| match e {
            // What this sandbox was made without (a gvisor sandbox's network is fixed when
            // it starts): the caller's to change, not a failure of the host.
            EngineError::Unsupported(m) => ManagerError::Conflict(m),
            e => ManagerError::Unavailable(format!("the sandbox's network: {e}")),
        })?;
        let settings = EgressSettings {
            totals: self.metrics.egress(),
            bandwidth: self.opts.egress_bandwidth,
        };
        let egress = Egress::start(id, owner, p.clone(), sockets, &settings)
            .map_err(|e| ManagerError::Internal(format!("serving the sandbox's network: {e}")))?;
        Ok(Some(egress))
    }

    async fn set_network(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        policy: NetworkPolicy,
    ) -> ManagerResult<v1::SandboxNetwork> {
        let live = self.live_any(tenant, id).await?;
        check_backend(live.backend.as_ref(), &policy)?;
        // One update at a time per sandbox, and none during a pause or snapshot.
        let (live, _op) = self.live_locked(tenant, id).await?;
        let has_egress = lock(&live.egress).is_some();
        // A network it has none of yet is made first: a sandbox that cannot have one keeps
        // its recorded policy.
        let opened = match &policy {
            NetworkPolicy::Egress(_) if !has_egress => {
                let instance = live.instance.lock().await;
                Some(
                    self.serve_network(id, tenant, &policy, instance.as_ref())
                        .await?,
                )
            }
            _ => None,
        };
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let rec = self.db(move |s| s.get_sandbox(&t, &i)).await?;
        if let Some(mut plan) = super::stored_plan(&rec)? {
            plan.network = policy.clone();
            let json = plan
                .to_json()
                .map_err(|e| ManagerError::Internal(format!("sandbox plan: {e}")))?;
            let (t, i) = (tenant.to_owned(), id.to_owned());
            self.db(move |s| s.set_sandbox_plan(&t, &i, &json)).await?;
        }
        match (policy, opened) {
            (NetworkPolicy::None, _) => {
                // Its sockets close: every new connection and query then ends at nothing.
                lock(&live.egress).take();
            }
            (NetworkPolicy::Egress(_), Some(made)) => *lock(&live.egress) = made,
            (NetworkPolicy::Egress(p), None) => {
                if let Some(e) = &*lock(&live.egress) {
                    e.set_policy(p);
                }
            }
        }
        Ok(shown(&live))
    }
}
