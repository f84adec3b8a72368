//! Idempotency keys of sandbox creates: which sandbox a tenant's create with a given key made,
//! so that a retried create answers with that sandbox instead of making a second one.
//!
//! A key is remembered per tenant (two tenants may use the same key). Lookups take the oldest
//! time a record may have to count, so a record past its retention is ignored even before
//! [`Store::prune_idempotency_keys`] deletes it.

use rusqlite::{OptionalExtension, params};

use super::error::{StoreError, StoreResult};
use super::ids::{check_sandbox_id, check_tenant_id};
use super::{Store, now_ms};

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

    /// Records that `tenant`'s create with `key` made `sandbox_id`, now. A record of the same
    /// key (one past its retention, not yet pruned) is replaced.
    pub fn remember_idempotency_key(
        &self,
        tenant: &str,
        key: &str,
        sandbox_id: &str,
    ) -> StoreResult<()> {
        check_tenant_id(tenant)?;
        check_idempotency_key(key)?;
        check_sandbox_id(sandbox_id)?;
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO idempotency_keys (tenant_id, key, sandbox_id, created_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (tenant_id, key)
                 DO UPDATE SET sandbox_id = excluded.sandbox_id, created_at = excluded.created_at",
            )?
            .execute(params![tenant, key, sandbox_id, now_ms()])?;
            Ok(())
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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

    #[test]
    fn remembered_per_tenant_until_pruned() {
        let store = Store::open_in_memory().unwrap();
        store.create_tenant("a", "A").unwrap();
        store.create_tenant("b", "B").unwrap();
        let id = "abcdefghijklmnopqrst";
        assert_eq!(store.idempotent_sandbox("a", "k", 0).unwrap(), None);
        store.remember_idempotency_key("a", "k", id).unwrap();
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
        // Remembering again replaces.
        store.remember_idempotency_key("a", "k", id).unwrap();
        store
            .remember_idempotency_key("a", "k", "bbbbbbbbbbbbbbbbbbbb")
            .unwrap();
        assert_eq!(
            store.idempotent_sandbox("a", "k", 0).unwrap().as_deref(),
            Some("bbbbbbbbbbbbbbbbbbbb")
        );
    }
}
