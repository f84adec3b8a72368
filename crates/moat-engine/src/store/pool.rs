//! Warm-pool members: sandboxes started for a template before anyone asked, owned by no tenant
//! until a claim hands one over. A member of a template made with a key counts against that
//! key's quotas (and its tenant's) until it is claimed or destroyed.

use rusqlite::params;

use super::error::{StoreError, StoreResult};
use super::ids::{check_sandbox_id, check_template_name};
use super::sandboxes::{
    NewSandbox, SandboxQuotas, SandboxRecord, check_limits, check_new, insert_in, usage,
};
use super::{Store, now_ms};

/// A warm-pool member to record, and what it is charged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewPoolMember {
    /// Its sandbox id.
    pub id: String,
    /// Its template.
    pub template: String,
    /// The template's owner; `None` for a built-in.
    pub template_tenant: Option<String>,
    /// The key whose quotas it counts against (the template's maker), if any.
    pub key_id: Option<String>,
    /// Its memory limit, bytes.
    pub memory_bytes: u64,
    /// Its pids limit.
    pub pids: u64,
}

impl Store {
    /// Records the pool member `new` before it is made, unless that would take its key over
    /// `limits` (checked in the same transaction: [`StoreError::QuotaExceeded`]).
    pub fn add_pool_member_within(
        &self,
        new: &NewPoolMember,
        limits: SandboxQuotas,
    ) -> StoreResult<()> {
        check_sandbox_id(&new.id)?;
        check_template_name(&new.template)?;
        let memory = i64::try_from(new.memory_bytes).map_err(|_| {
            StoreError::invalid(
                "memory bytes",
                &new.memory_bytes.to_string(),
                "at most 2^63-1",
            )
        })?;
        let pids = i64::try_from(new.pids)
            .map_err(|_| StoreError::invalid("pids", &new.pids.to_string(), "at most 2^63-1"))?;
        self.write(|tx| {
            if let Some(key) = &new.key_id
                && limits != SandboxQuotas::default()
            {
                check_limits(
                    &usage(tx, "key_id", key)?,
                    limits,
                    new.memory_bytes,
                    new.pids,
                )?;
            }
            let inserted = tx.execute(
                "INSERT INTO pool_members
                     (id, template, template_tenant, created_at, key_id, memory_bytes, pids)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
                params![
                    new.id,
                    new.template,
                    new.template_tenant,
                    now_ms(),
                    new.key_id,
                    memory,
                    pids
                ],
            )?;
            if inserted == 0 {
                return Err(StoreError::conflict("pool member", &new.id));
            }
            Ok(())
        })
    }

    /// Records a pool member of the template `template` (of `template_tenant`; `None` for a
    /// built-in) before it is made, so a crash cannot leave it unknown.
    pub fn add_pool_member(
        &self,
        id: &str,
        template: &str,
        template_tenant: Option<&str>,
    ) -> StoreResult<()> {
        let new = NewPoolMember {
            id: id.to_owned(),
            template: template.to_owned(),
            template_tenant: template_tenant.map(str::to_owned),
            ..NewPoolMember::default()
        };
        self.add_pool_member_within(&new, SandboxQuotas::default())
    }

    /// Forgets a pool member that was destroyed. Forgetting one that is not there is fine.
    pub fn remove_pool_member(&self, id: &str) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM pool_members WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    /// Forgets every pool member and returns their ids (sorted): a starting server calls this
    /// once, since none of them survived the previous process, and reaps what is left of them.
    pub fn take_pool_members(&self) -> StoreResult<Vec<String>> {
        self.write(|tx| {
            let mut stmt = tx.prepare_cached("DELETE FROM pool_members RETURNING id")?;
            let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
            let mut ids = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            ids.sort_unstable();
            Ok(ids)
        })
    }

    /// Hands the pool member `new.id` to `new.tenant`: in one transaction it stops being a
    /// member and becomes the tenant's sandbox, within `limits` as
    /// [`Store::insert_sandbox_within`] checks them. [`StoreError::NotFound`] if it is not a
    /// member (already claimed or removed): a member is never handed out twice.
    pub fn claim_pool_member(
        &self,
        new: &NewSandbox,
        limits: SandboxQuotas,
    ) -> StoreResult<SandboxRecord> {
        let (metadata, memory) = check_new(new)?;
        let created_at = now_ms();
        self.write(|tx| {
            let taken = tx.execute("DELETE FROM pool_members WHERE id = ?1", [&new.id])?;
            if taken == 0 {
                return Err(StoreError::not_found("pool member", &new.id));
            }
            insert_in(tx, new, limits, &metadata, memory, created_at)
        })?;
        Ok(new.record(created_at))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::SandboxState;

    fn member_claim(id: &str, tenant: &str) -> NewSandbox {
        NewSandbox {
            id: id.into(),
            tenant: tenant.into(),
            key_id: None,
            template: "host".into(),
            state: SandboxState::Running,
            metadata: BTreeMap::new(),
            resources: serde_json::json!({}),
            memory_bytes: 1 << 20,
            expires_at: None,
            public_traffic: true,
            backend: "native".into(),
            plan: None,
            idempotency_key: None,
        }
    }

    #[test]
    fn members_are_claimed_once_and_within_quotas() {
        let store = Store::open_in_memory().unwrap();
        store.create_tenant("acme", "Acme").unwrap();
        store
            .create_template(None, "host", &serde_json::json!({"rootfs": "host"}))
            .unwrap();
        let (a, b) = ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb");
        store.add_pool_member(a, "host", None).unwrap();
        store.add_pool_member(b, "host", None).unwrap();
        assert!(matches!(
            store.add_pool_member(a, "host", None),
            Err(StoreError::Conflict { .. })
        ));
        let rec = store
            .claim_pool_member(&member_claim(a, "acme"), SandboxQuotas::default())
            .unwrap();
        assert_eq!(
            (rec.tenant.as_str(), rec.state),
            ("acme", SandboxState::Running)
        );
        assert_eq!(store.get_sandbox("acme", a).unwrap().id, a);
        // Twice: refused, and nothing changes.
        assert!(matches!(
            store.claim_pool_member(&member_claim(a, "acme"), SandboxQuotas::default()),
            Err(StoreError::NotFound { .. })
        ));
        // Over a quota: refused, and `b` stays a member.
        let one = SandboxQuotas {
            max_sandboxes: Some(1),
            max_memory_bytes: None,
            ..Default::default()
        };
        assert!(matches!(
            store.claim_pool_member(&member_claim(b, "acme"), one),
            Err(StoreError::QuotaExceeded { .. })
        ));
        assert_eq!(store.take_pool_members().unwrap(), vec![b.to_owned()]);
        assert!(store.take_pool_members().unwrap().is_empty());
    }
}
