//! Who calls the engine: a [`Caller`] (its tenant, key and role), made from an API key's
//! secret by `SandboxManager::authenticate` (the one check every front end, the `/v1` API, the
//! E2B API, later MCP, makes before any other call) or keyless by [`Caller::local`] (`moat
//! run`'s). Every service of the engine takes the caller and decides from it what the call may
//! see and do (`Caller::require_admin` and the key services live with the manager). Rate
//! limits per key are the front end's: the caller carries the key's. This module is a leaf:
//! the store and the manager import it, it imports neither.

use serde::{Deserialize, Serialize};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Manages keys and tenants as well as using sandboxes.
    Admin,
    /// Uses templates and sandboxes of its tenant.
    User,
}

impl Role {
    /// The name stored and shown: `admin` or `user`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    /// The role named `name` ([`Role::as_str`]'s text), if any.
    pub fn from_name(name: &str) -> Option<Role> {
        match name {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is calling: what every service call is made on behalf of. Made from an API key by
/// `SandboxManager::authenticate`, or keyless by [`Caller::local`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant whose records the calls see and change.
    pub tenant: String,
    /// The key's id, if the caller holds a key: sandboxes, pools and snapshots count against
    /// that key's quotas. A keyless caller is held to none.
    pub key_id: Option<String>,
    /// What the caller may do.
    pub role: Role,
    /// The key's own requests-per-minute quota, if it has one; front ends rate-limit by it.
    pub requests_per_minute: Option<u32>,
}

impl Caller {
    /// A caller on this host without an API key, acting for `tenant` as its administrator and
    /// held to no key's quotas: what `moat run` uses its in-process engine as.
    pub fn local(tenant: impl Into<String>) -> Caller {
        Caller {
            tenant: tenant.into(),
            key_id: None,
            role: Role::Admin,
            requests_per_minute: None,
        }
    }

    /// The id of the caller's key, if it holds one.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    /// Whether the caller holds an admin key.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn role_names() {
        for role in [Role::Admin, Role::User] {
            assert_eq!(Role::from_name(role.as_str()), Some(role));
        }
        assert_eq!(Role::from_name("root"), None);
    }

    #[test]
    fn a_local_caller_is_a_keyless_admin() {
        let local = Caller::local("local");
        assert_eq!(local.tenant, "local");
        assert_eq!(local.key_id(), None);
        assert!(local.is_admin());
        assert_eq!(local.requests_per_minute, None);
    }
}
