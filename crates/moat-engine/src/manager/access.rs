//! Per-sandbox access tokens and finding a sandbox by id alone, for traffic that names a sandbox
//! but carries no API key (the E2B SDKs' sandbox traffic).
//!
//! Each sandbox has two tokens: its access token (envd's `X-Access-Token`: commands, files, the
//! code interpreter) and its traffic access token (E2B's `E2B-Traffic-Access-Token`: its code
//! interpreter, and its own services when they are not public), so a token handed out for a
//! preview does not also give commands. Both are derived from the server's `access-tokens`
//! secret and the sandbox id (HMAC-SHA256, each with its own label), so nothing per sandbox is
//! stored: they are the same across restarts, never reused by another sandbox, and cannot be
//! guessed from the id without the secret.

use std::sync::Arc;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::calls::CallGuard;
use super::{Live, ManagerError, ManagerResult, SandboxManager, lock};
use crate::agent_client::AgentClient;

/// Name of the store secret the tokens are derived from.
pub(super) const ACCESS_TOKEN_SECRET: &str = "access-tokens";

/// Label of access tokens in the HMAC input.
const ACCESS_LABEL: &[u8] = b"moat sandbox access token\0";
/// Label of traffic access tokens in the HMAC input.
const TRAFFIC_LABEL: &[u8] = b"moat sandbox traffic access token\0";

/// The access token of sandbox `id` under `key`: 43 URL-safe base64 characters.
pub(super) fn derive(key: &[u8], id: &str) -> String {
    derive_labelled(key, ACCESS_LABEL, id)
}

/// The token of sandbox `id` under `key` for `label`: 43 URL-safe base64 characters.
pub(super) fn derive_labelled(key: &[u8], label: &[u8], id: &str) -> String {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(label);
    mac.update(id.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// A running sandbox found by id: who owns it and a client of its agent, counted as a call
/// under way while `call` is held.
#[derive(Debug)]
pub struct SandboxRoute {
    /// The owning tenant.
    pub tenant: String,
    /// A client of its agent.
    pub client: AgentClient,
    /// Whether its own services are reachable without its traffic access token.
    pub public_traffic: bool,
    /// Held for as long as the call should be waited for by a pause.
    pub call: CallGuard,
}

/// A client of a running sandbox's agent, counted as a call under way while it is held (a
/// pause waits for it, up to [`super::PAUSE_DRAIN_LIMIT`]).
#[derive(Debug)]
pub struct SandboxAgent {
    /// The client.
    pub client: AgentClient,
    /// The call's place in the count.
    pub call: CallGuard,
}

impl std::ops::Deref for SandboxAgent {
    type Target = AgentClient;

    fn deref(&self) -> &AgentClient {
        &self.client
    }
}

impl SandboxManager {
    /// The access token of sandbox `id` (whether or not it exists): what sandbox traffic must
    /// present to reach it without an API key.
    pub fn access_token(&self, id: &str) -> String {
        derive(&self.inner.access_key, id)
    }

    /// The traffic access token of sandbox `id` (whether or not it exists): what reaches its
    /// code interpreter, and its services when they are not public, without an API key.
    pub fn traffic_token(&self, id: &str) -> String {
        derive_labelled(&self.inner.access_key, TRAFFIC_LABEL, id)
    }

    /// [`SandboxManager::route`], resuming a paused sandbox first when its lifecycle says
    /// calls resume it (`auto_resume`).
    pub async fn route_resuming(&self, id: &str) -> ManagerResult<SandboxRoute> {
        let refused = match self.route(id) {
            Ok(route) => return Ok(route),
            Err(e) => e,
        };
        let paused = lock(&self.inner.live)
            .get(id)
            .filter(|live| live.is_paused())
            .map(|live| live.tenant.clone());
        let Some(tenant) = paused else {
            return Err(refused);
        };
        match self.inner.live_for(&tenant, id).await {
            Ok(_) => self.route(id),
            Err(e) => {
                // The caller answers "not found"; why the resume failed is only here.
                tracing::warn!(sandbox = %id, "resuming a paused sandbox for a call failed: {e}");
                Err(refused)
            }
        }
    }

    /// The running sandbox `id`, whatever its tenant. [`ManagerError::NotFound`] when this
    /// server runs no sandbox of that id (never made, ended, or paused);
    /// [`ManagerError::Unavailable`] when its agent does not answer its health checks. Callers
    /// must check [`SandboxManager::access_token`] (or the tenant) before they act for the
    /// caller.
    pub fn route(&self, id: &str) -> ManagerResult<SandboxRoute> {
        let live: Option<Arc<Live>> = lock(&self.inner.live).get(id).cloned();
        match live {
            // Its agent is frozen: to a proxy, as gone as an ended one.
            // Its agent is frozen or being saved: to a proxy, as gone as an ended one.
            Some(live) if live.is_paused() => {
                Err(ManagerError::NotFound(format!("sandbox {id} is paused")))
            }
            Some(live) if let Some(refused) = live.health.refusal(id) => Err(refused),
            Some(live) => match live.enter_call() {
                Some(call) => Ok(SandboxRoute {
                    tenant: live.tenant.clone(),
                    client: live.client.clone(),
                    public_traffic: live.public_traffic,
                    call,
                }),
                // A pause began meanwhile.
                None => Err(ManagerError::NotFound(format!("sandbox {id} is paused"))),
            },
            None => Err(ManagerError::NotFound(format!(
                "sandbox {id} is not running"
            ))),
        }
    }

    /// Whether sandbox `id`, running here (paused or not), lets its own services be reached
    /// without its traffic access token.
    pub fn public_traffic(&self, id: &str) -> bool {
        lock(&self.inner.live)
            .get(id)
            .is_some_and(|live| live.public_traffic)
    }

    /// The running sandboxes [`SandboxManager::route`] finds, whatever their tenants (unclaimed
    /// warm-pool members are not among them), with their access tokens, in no particular order:
    /// what a request that names no sandbox is matched against. Each token is derived once.
    pub fn running_access_tokens(&self) -> Vec<(String, String)> {
        let key = &self.inner.access_key;
        lock(&self.inner.live)
            .iter()
            .map(|(id, live)| {
                let token = live.access_token.get_or_init(|| derive(key, id));
                (id.clone(), token.clone())
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_per_sandbox_and_key() {
        let a = derive(b"k1", "abc");
        assert_eq!(a, derive(b"k1", "abc"));
        assert_ne!(a, derive(b"k1", "abd"));
        assert_ne!(a, derive(b"k2", "abc"));
        assert_ne!(a, derive_labelled(b"k1", TRAFFIC_LABEL, "abc"));
        assert_eq!(a.len(), 43);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }
}
