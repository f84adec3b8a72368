//! API keys as the API sees them: made (with their tenant, if new), listed and revoked.
//!
//! Who may call these is the server's decision (admin keys only); the manager checks the
//! request itself.

use moat_proto::v1;

use super::{ManagerError, ManagerResult, SandboxManager};
use crate::resources::parse_size;
use crate::store::{KeyRecord, Quotas, Role, StoreError, check_tenant_id};

impl SandboxManager {
    /// Makes a key for `req.tenant` (else `caller_tenant`), creating that tenant if it does
    /// not exist, and returns it with its secret, which cannot be shown again.
    pub async fn create_key(
        &self,
        caller_tenant: &str,
        req: v1::CreateKey,
    ) -> ManagerResult<v1::CreatedKey> {
        let tenant = req.tenant.unwrap_or_else(|| caller_tenant.to_owned());
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

    /// Every key of `tenant`, revoked ones included, oldest first (never their secrets).
    pub async fn list_keys(&self, tenant: &str) -> ManagerResult<v1::KeyList> {
        let tenant = tenant.to_owned();
        let records = self.inner.db(move |s| s.list_keys(&tenant)).await?;
        Ok(v1::KeyList {
            keys: records.iter().map(to_v1).collect(),
        })
    }

    /// Revokes `tenant`'s key `id`: from now on it authenticates nothing. Revoking a revoked
    /// key changes nothing.
    pub async fn revoke_key(&self, tenant: &str, id: &str) -> ManagerResult<v1::ApiKey> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
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
