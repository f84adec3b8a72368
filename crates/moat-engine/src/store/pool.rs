//! Warm-pool members: sandboxes started for a template before anyone asked, owned by no tenant
//! until a claim hands one over.

use rusqlite::params;

use super::error::{StoreError, StoreResult};
use super::ids::{check_sandbox_id, check_template_name};
use super::sandboxes::{Limits, NewSandbox, SandboxRecord, check_new, insert_in};
use super::{Store, now_ms};

impl Store {
    /// Records a pool member of the template `template` (of `template_tenant`; `None` for a
    /// built-in) before it is made, so a crash cannot leave it unknown.
    pub fn add_pool_member(
        &self,
        id: &str,
        template: &str,
        template_tenant: Option<&str>,
    ) -> StoreResult<()> {
        check_sandbox_id(id)?;
        check_template_name(template)?;
        self.write(|tx| {
            let inserted = tx.execute(
                "INSERT INTO pool_members (id, template, template_tenant, created_at)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (id) DO NOTHING",
                params![id, template, template_tenant, now_ms()],
            )?;
            if inserted == 0 {
                return Err(StoreError::conflict("pool member", id));
            }
            Ok(())
        })
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
        limits: Limits,
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
            .claim_pool_member(&member_claim(a, "acme"), Limits::default())
            .unwrap();
        assert_eq!(
            (rec.tenant.as_str(), rec.state),
            ("acme", SandboxState::Running)
        );
        assert_eq!(store.get_sandbox("acme", a).unwrap().id, a);
        // Twice: refused, and nothing changes.
        assert!(matches!(
            store.claim_pool_member(&member_claim(a, "acme"), Limits::default()),
            Err(StoreError::NotFound { .. })
        ));
        // Over a quota: refused, and `b` stays a member.
        let one = Limits {
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
