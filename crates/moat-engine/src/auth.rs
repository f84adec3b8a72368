//! Who calls the engine: an API key's secret turned into a [`Caller`] (its tenant, key and
//! role), the one check every front end (the `/v1` API, the E2B API, later MCP) makes before
//! any other call. Rate limits per key are the front end's: the caller carries the key's.

use serde::{Deserialize, Serialize};

use crate::manager::{ManagerError, ManagerResult, SandboxManager};

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

/// Who is calling, from their API key: what every service call is made on behalf of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant whose records the calls see and change.
    pub tenant: String,
    /// The key's id (quotas are counted per key).
    pub key_id: String,
    /// What the key may do.
    pub role: Role,
    /// The key's own requests-per-minute quota, if it has one; front ends rate-limit by it.
    pub requests_per_minute: Option<u32>,
}

impl Caller {
    /// Whether the caller holds an admin key.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// [`ManagerError::Forbidden`] ("`what` needs an admin key") unless the caller holds an
    /// admin key: the one check of the admin-only calls (key management, metrics).
    pub fn require_admin(&self, what: &str) -> ManagerResult<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ManagerError::Forbidden(format!(
                "{what} needs an admin key"
            )))
        }
    }
}

impl SandboxManager {
    /// The caller an API key `secret` stands for: [`ManagerError::Unauthenticated`] when no
    /// key has it or the key is revoked.
    pub async fn authenticate(&self, secret: String) -> ManagerResult<Caller> {
        let store = self.store().clone();
        let key = tokio::task::spawn_blocking(move || store.authenticate(&secret))
            .await
            .map_err(|e| ManagerError::Internal(format!("authentication task: {e}")))?
            .map_err(|e| ManagerError::Internal(format!("authentication: {e}")))?
            .ok_or_else(|| ManagerError::Unauthenticated("unknown or revoked API key".into()))?;
        Ok(Caller {
            tenant: key.tenant,
            key_id: key.id,
            role: key.role,
            requests_per_minute: key.quotas.requests_per_minute,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_admin_checks() {
        for role in [Role::Admin, Role::User] {
            assert_eq!(Role::from_name(role.as_str()), Some(role));
        }
        assert_eq!(Role::from_name("root"), None);
        let caller = |role| Caller {
            tenant: "t".into(),
            key_id: "key_x".into(),
            role,
            requests_per_minute: None,
        };
        assert!(caller(Role::Admin).require_admin("this").is_ok());
        let e = caller(Role::User)
            .require_admin("managing API keys")
            .unwrap_err();
        assert_eq!(e.code(), "forbidden");
        assert_eq!(e.to_string(), "managing API keys needs an admin key");
    }
}
