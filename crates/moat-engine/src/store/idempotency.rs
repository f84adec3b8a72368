//! Idempotency keys of sandbox creates: which sandbox a tenant's create with a given key made,
//! so that a retried create answers with that sandbox instead of making a second one.
//!
//! A key is remembered per tenant (two tenants may use the same key). Lookups take the oldest
//! time a record may have to count, so a record past its retention is ignored even before
//! [`Store::prune_idempotency_keys`] deletes it.

use rusqlite::{Connection, OptionalExtension, params};

use super::Store;
use super::error::{StoreError, StoreResult};
use super::ids::check_tenant_id;

/// Longest idempotency key, characters.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Checks an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY`] characters of `[a-z0-9-]`.
pub fn check_idempotency_key(key: &str) -> StoreResult<()> {
    let ok = (1..=MAX_IDEMPOTENCY_KEY).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "idempotency key",
            key,
            format!("1 to {MAX_IDEMPOTENCY_KEY} characters of a-z, 0-9 and '-'"),
        ))
    }
}

impl Store {
    /// The sandbox that `tenant`'s create with `key` made, if that was recorded at or after
    /// `since` (Unix milliseconds).
    pub fn idempotent_sandbox(
        &self,
        tenant: &str,
        key: &str,
        since: i64,
    ) -> StoreResult<Option<String>> {
        check_tenant_id(tenant)?;
        check_idempotency_key(key)?;
        self.read(|tx| {
            Ok(tx
                .prepare_cached(
                    "SELECT sandbox_id FROM idempotency_keys
                     WHERE tenant_id = ?1 AND key = ?2 AND created_at >= ?3",
                )?
                .query_row(params![tenant, key, since], |row| row.get(0))
                .optional()?)
        })
    }

    /// Deletes the idempotency keys recorded before `before` (Unix milliseconds), returning how
    /// many.
    pub fn prune_idempotency_keys(&self, before: i64) -> StoreResult<usize> {
        self.write(|tx| {
            Ok(tx
                .prepare_cached("DELETE FROM idempotency_keys WHERE created_at < ?1")?
                .execute([before])?)
        })
    }
}

/// Records in `tx` that `tenant`'s create with `key` made `sandbox_id` at `at` (Unix
/// milliseconds), replacing an older record of the key.
pub(super) fn remember_in(
    tx: &Connection,
    tenant: &str,
    key: &str,
    sandbox_id: &str,
    at: i64,
) -> StoreResult<()> {
    tx.prepare_cached(
        "INSERT INTO idempotency_keys (tenant_id, key, sandbox_id, created_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (tenant_id, key)
         DO UPDATE SET sandbox_id = excluded.sandbox_id, created_at = excluded.created_at",
    )?
    .execute(params![tenant, key, sandbox_id, at])?;
    Ok(())
}

/// Forgets in `tx` the keys of `tenant`'s creates that made `sandbox_id`.
pub(super) fn forget_in(tx: &Connection, tenant: &str, sandbox_id: &str) -> StoreResult<()> {
    tx.prepare_cached("DELETE FROM idempotency_keys WHERE tenant_id = ?1 AND sandbox_id = ?2")?
        .execute(params![tenant, sandbox_id])?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::{EndReason, NewSandbox, SandboxState, now_ms};

    #[test]
    fn keys_are_checked() {
        for ok in ["a", "retry-1", &"x".repeat(MAX_IDEMPOTENCY_KEY)] {
            assert!(check_idempotency_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Upper",
            "under_score",
            "sp ace",
            &"x".repeat(MAX_IDEMPOTENCY_KEY + 1),
        ] {
            assert!(check_idempotency_key(bad).is_err(), "{bad}");
        }
    }

    fn new(id: &str, tenant: &str, key: &str, state: SandboxState) -> NewSandbox {
        NewSandbox {
            id: id.into(),
            tenant: tenant.into(),
            key_id: None,
            template: "host".into(),
            state,
            metadata: Default::default(),
            resources: serde_json::json!({}),
            memory_bytes: 1 << 20,
            expires_at: None,
            public_traffic: false,
            backend: "native".into(),
            plan: None,
            idempotency_key: Some(key.into()),
        }
    }

    fn store() -> Store {
        let store = Store::open_in_memory().unwrap();
        store.create_tenant("a", "A").unwrap();
        store.create_tenant("b", "B").unwrap();
        store
            .create_template(None, "host", &serde_json::json!({"rootfs": "host"}))
            .unwrap();
        store
    }

    #[test]
    fn remembered_with_the_sandbox_per_tenant_until_pruned() {
        let store = store();
        let id = "abcdefghijklmnopqrst";
        assert_eq!(store.idempotent_sandbox("a", "k", 0).unwrap(), None);
        store
            .insert_sandbox(&new(id, "a", "k", SandboxState::Running))
            .unwrap();
        assert_eq!(
            store.idempotent_sandbox("a", "k", 0).unwrap().as_deref(),
            Some(id)
        );
        // Another tenant's key of the same name is not this one.
        assert_eq!(store.idempotent_sandbox("b", "k", 0).unwrap(), None);
        // Too old to count, then gone.
        assert_eq!(store.idempotent_sandbox("a", "k", i64::MAX).unwrap(), None);
        assert_eq!(store.prune_idempotency_keys(i64::MAX).unwrap(), 1);
        assert_eq!(store.idempotent_sandbox("a", "k", 0).unwrap(), None);
        // A later create with the key replaces what is left of an old one.
        let other = "bbbbbbbbbbbbbbbbbbbb";
        store
            .insert_sandbox(&new(other, "a", "k", SandboxState::Running))
            .unwrap();
        assert_eq!(
            store.idempotent_sandbox("a", "k", 0).unwrap().as_deref(),
            Some(other)
        );
        // A refused insert records no key.
        assert!(
            store
                .insert_sandbox(&new(other, "b", "k", SandboxState::Running))
                .is_err()
        );
        assert_eq!(store.idempotent_sandbox("b", "k", 0).unwrap(), None);
    }

    #[test]
    fn a_create_that_never_ran_leaves_its_key_free() {
        let store = store();
        let (failed, ran, starting, orphan) = (
            "aaaaaaaaaaaaaaaaaaaa",
            "bbbbbbbbbbbbbbbbbbbb",
            "cccccccccccccccccccc",
            "dddddddddddddddddddd",
        );
        store
            .insert_sandbox(&new(failed, "a", "failed", SandboxState::Starting))
            .unwrap();
        store
            .update_sandbox_state(
                "a",
                failed,
                SandboxState::Failed,
                Some(EndReason::Failed("boom".into())),
            )
            .unwrap();
        assert_eq!(store.idempotent_sandbox("a", "failed", 0).unwrap(), None);

        // One that ran keeps its key when it ends, or when its server goes away.
        store
            .insert_sandbox(&new(ran, "a", "ran", SandboxState::Starting))
            .unwrap();
        store
            .update_sandbox_state("a", ran, SandboxState::Running, None)
            .unwrap();
        store
            .insert_sandbox(&new(orphan, "a", "orphan", SandboxState::Running))
            .unwrap();
        store
            .insert_sandbox(&new(starting, "a", "starting", SandboxState::Starting))
            .unwrap();
        store
            .update_sandbox_state("a", ran, SandboxState::Killed, Some(EndReason::Deleted))
            .unwrap();
        assert_eq!(store.mark_orphaned(now_ms()).unwrap().len(), 2);
        assert_eq!(
            store.idempotent_sandbox("a", "ran", 0).unwrap().as_deref(),
            Some(ran)
        );
        assert_eq!(
            store
                .idempotent_sandbox("a", "orphan", 0)
                .unwrap()
                .as_deref(),
            Some(orphan)
        );
        // Its server went away while it started: it never ran.
        assert_eq!(store.idempotent_sandbox("a", "starting", 0).unwrap(), None);
    }
}
