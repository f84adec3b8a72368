//! API keys as the API sees them: made (with their tenant, if new), listed and revoked, by
//! admin callers only ([`Caller::require_key_admin`]), for any tenant; and a key's secret
//! turned into the [`Caller`] it stands for.

use moat_proto::v1;

use super::{ManagerError, ManagerResult, SandboxManager};
use crate::auth::Caller;
use crate::resources::parse_size;
use crate::store::{KeyRecord, Quotas, Role, StoreError, check_tenant_id};

impl Caller {
    /// [`ManagerError::Forbidden`] ("`what` needs an admin key") unless the caller is an
    /// administrator: the one check of the admin-only calls (key management, metrics).
    pub fn require_admin(&self, what: &str) -> ManagerResult<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ManagerError::Forbidden(format!(
                "{what} needs an admin key"
            )))
        }
    }

    /// [`ManagerError::Forbidden`] unless the caller may manage API keys (of any tenant): an
    /// admin's right. The key services check it; a front end may ask it first, before it
    /// reads the request, so a refused caller learns nothing about its request's form.
    pub fn require_key_admin(&self) -> ManagerResult<()> {
        self.require_admin("managing API keys")
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
            key_id: Some(key.id),
            role: key.role,
            requests_per_minute: key.quotas.requests_per_minute,
        })
    }

    /// Makes a key for `req.tenant` (else the caller's tenant), creating that tenant if it
    /// does not exist, and returns it with its secret, which cannot be shown again. Admin
    /// callers only.
    pub async fn create_key(
        &self,
        caller: &Caller,
        req: v1::CreateKey,
    ) -> ManagerResult<v1::CreatedKey> {
        caller.require_key_admin()?;
        let tenant = req.tenant.unwrap_or_else(|| caller.tenant.clone());
        check_tenant_id(&tenant)?;
        let quotas = quotas(req.quotas.unwrap_or_default())?;
        let role = match req.role {
            v1::KeyRole::Admin => Role::Admin,
            v1::KeyRole::User => Role::User,
        };
        let name = req.name;
        let (record, secret) = self
            .inner
            .db(move |s| {
                // The key is tried first, so a bad name is refused before any tenant is made.
                match s.create_key(&tenant, &name, role, quotas) {
                    Err(StoreError::NotFound { kind: "tenant", .. }) => {
                        match s.create_tenant(&tenant, &tenant) {
                            // Made by a concurrent request meanwhile: just as good.
                            Ok(_) | Err(StoreError::Conflict { .. }) => {}
                            Err(e) => return Err(e),
                        }
                        s.create_key(&tenant, &name, role, quotas)
                    }
                    other => other,
                }
            })
            .await?;
        Ok(v1::CreatedKey {
            key: to_v1(&record),
            secret: secret.expose().to_owned(),
        })
    }

    /// Every key of `tenant` (else the caller's tenant), revoked ones included, oldest first
    /// (never their secrets). Admin callers only.
    pub async fn list_keys(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
    ) -> ManagerResult<v1::KeyList> {
        caller.require_key_admin()?;
        let tenant = tenant.unwrap_or(&caller.tenant).to_owned();
        let records = self.inner.db(move |s| s.list_keys(&tenant)).await?;
        Ok(v1::KeyList {
            keys: records.iter().map(to_v1).collect(),
        })
    }

    /// Revokes the key `id` of `tenant` (else the caller's tenant): from now on it
    /// authenticates nothing. Revoking a revoked key changes nothing. Admin callers only.
    pub async fn revoke_key(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        id: &str,
    ) -> ManagerResult<v1::ApiKey> {
        caller.require_key_admin()?;
        let tenant = tenant.unwrap_or(&caller.tenant).to_owned();
        let id = id.to_owned();
        let record = self.inner.db(move |s| s.revoke_key(&tenant, &id)).await?;
        Ok(to_v1(&record))
    }
}

/// The store's quotas from the request's; zero is refused, since leaving a limit out is how a
/// key gets none.
fn quotas(req: v1::QuotaRequest) -> ManagerResult<Quotas> {
    let positive = |what: &str, n: Option<u64>| match n {
        Some(0) => Err(ManagerError::Invalid(format!(
            "quotas.{what} must be at least 1 (leave it out for no limit)"
        ))),
        _ => Ok(()),
    };
    let max_memory_bytes = req.max_memory.as_deref().map(parse_size).transpose()?;
    positive("max_sandboxes", req.max_sandboxes.map(u64::from))?;
    positive("max_memory", max_memory_bytes)?;
    positive("max_pids", req.max_pids)?;
    let max_snapshot_bytes = req
        .max_snapshot_size
        .as_deref()
        .map(parse_size)
        .transpose()?;
    positive("max_snapshot_size", max_snapshot_bytes)?;
    positive(
        "requests_per_minute",
        req.requests_per_minute.map(u64::from),
    )?;
    Ok(Quotas {
        max_sandboxes: req.max_sandboxes,
        max_memory_bytes,
        max_pids: req.max_pids,
        max_snapshot_bytes,
        requests_per_minute: req.requests_per_minute,
    })
}

fn to_v1(record: &KeyRecord) -> v1::ApiKey {
    v1::ApiKey {
        id: record.id.clone(),
        tenant: record.tenant.clone(),
        name: record.name.clone(),
        role: match record.role {
            Role::Admin => v1::KeyRole::Admin,
            Role::User => v1::KeyRole::User,
        },
        created_at: record.created_at,
        revoked_at: record.revoked_at,
        quotas: v1::KeyQuotas {
            max_sandboxes: record.quotas.max_sandboxes,
            max_memory_bytes: record.quotas.max_memory_bytes,
            max_pids: record.quotas.max_pids,
            max_snapshot_bytes: record.quotas.max_snapshot_bytes,
            requests_per_minute: record.quotas.requests_per_minute,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn admin_checks() {
        let caller = |role| Caller {
            tenant: "t".into(),
            key_id: Some("key_x".into()),
            role,
            requests_per_minute: None,
        };
        assert!(caller(Role::Admin).require_admin("this").is_ok());
        assert!(caller(Role::Admin).require_key_admin().is_ok());
        assert!(Caller::local("t").require_key_admin().is_ok());
        let e = caller(Role::User)
            .require_admin("managing API keys")
            .unwrap_err();
        assert_eq!(e.code(), "forbidden");
        assert_eq!(e.to_string(), "managing API keys needs an admin key");
        let e = caller(Role::User).require_key_admin().unwrap_err();
        assert_eq!(e.code(), "forbidden");
        assert_eq!(e.to_string(), "managing API keys needs an admin key");
    }

    #[test]
    fn quota_forms() {
        let q = quotas(v1::QuotaRequest {
            max_sandboxes: Some(3),
            max_memory: Some("4G".into()),
            max_pids: Some(512),
            max_snapshot_size: Some("1G".into()),
            requests_per_minute: None,
        })
        .unwrap();
        assert_eq!(q.max_sandboxes, Some(3));
        assert_eq!(q.max_memory_bytes, Some(4 << 30));
        assert_eq!(q.max_pids, Some(512));
        assert_eq!(q.max_snapshot_bytes, Some(1 << 30));
        assert_eq!(q.requests_per_minute, None);
        assert_eq!(
            quotas(v1::QuotaRequest::default()).unwrap(),
            Quotas::default()
        );
        for bad in [
            v1::QuotaRequest {
                max_sandboxes: Some(0),
                ..Default::default()
            },
            v1::QuotaRequest {
                max_memory: Some("lots".into()),
                ..Default::default()
            },
            v1::QuotaRequest {
                max_memory: Some("0".into()),
                ..Default::default()
            },
            v1::QuotaRequest {
                max_pids: Some(0),
                ..Default::default()
            },
        ] {
            assert!(matches!(quotas(bad), Err(ManagerError::Invalid(_))));
        }
    }
}
