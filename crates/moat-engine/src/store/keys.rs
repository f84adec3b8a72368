//! API keys: how callers authenticate, and the quotas that bound them.
//!
//! The database keeps only the SHA-256 of a secret. A secret has 200 random bits, so a plain
//! hash is enough (no salt or slow hash needed: there is nothing to guess), and lookup by hash is
//! an index search that reveals nothing useful through its timing.

use rusqlite::{Connection, Row, params};
use serde::{Deserialize, Serialize};

use super::error::{StoreError, StoreResult};
use super::ids::{
    check_key_id, check_label, constant_time_eq, generate_key_id, generate_secret, hash_secret,
    looks_like_secret,
};
use super::tenants::require_tenant;
use super::{Store, first_row, now_ms};

/// The key a secret authenticates, by the hash of the secret (the store's tests check its plan).
pub(super) const KEY_BY_SECRET_SQL: &str = "SELECT * FROM api_keys WHERE secret_sha256 = ?1";

pub use crate::auth::Role;

/// The role of a stored name; another name means the database was not written by moat.
fn parse_role(name: &str) -> StoreResult<Role> {
    Role::from_name(name).ok_or_else(|| StoreError::Corrupt(format!("unknown key role {name:?}")))
}

/// Limits of one key; `None` means the server's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quotas {
    /// Sandboxes that may be starting, running or paused at once.
    pub max_sandboxes: Option<u32>,
    /// Sum of the memory limits of those sandboxes, bytes.
    pub max_memory_bytes: Option<u64>,
    /// Sum of the pids limits (processes and threads) of those sandboxes.
    pub max_pids: Option<u64>,
    /// Bytes of snapshot archives the key's tenant may keep when this key makes one (the
    /// server's default otherwise).
    pub max_snapshot_bytes: Option<u64>,
    /// API requests per minute.
    pub requests_per_minute: Option<u32>,
}

/// An API key as stored: everything but its secret, which the store never keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public id, `key_` and 16 base32 characters; safe to log and show.
    pub id: String,
    /// The tenant the key acts for.
    pub tenant: String,
    /// A label for people.
    pub name: String,
    /// What the key may do.
    pub role: Role,
    /// When it was created, Unix milliseconds.
    pub created_at: i64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
    /// Its limits.
    pub quotas: Quotas,
}

impl KeyRecord {
    fn from_row(row: &Row<'_>) -> StoreResult<Self> {
        let big = |column: &str| -> StoreResult<Option<u64>> {
            let value: Option<i64> = row.get(column)?;
            value
                .map(|m| {
                    u64::try_from(m)
                        .map_err(|_| StoreError::Corrupt(format!("negative quota {column} = {m}")))
                })
                .transpose()
        };
        let small = |column: &str| -> StoreResult<Option<u32>> {
            let value: Option<i64> = row.get(column)?;
            value
                .map(|v| {
                    u32::try_from(v).map_err(|_| {
                        StoreError::Corrupt(format!("quota {column} = {v} out of range"))
                    })
                })
                .transpose()
        };
        Ok(KeyRecord {
            id: row.get("id")?,
            tenant: row.get("tenant_id")?,
            name: row.get("name")?,
            role: parse_role(&row.get::<_, String>("role")?)?,
            created_at: row.get("created_at")?,
            revoked_at: row.get("revoked_at")?,
            quotas: Quotas {
                max_sandboxes: small("max_sandboxes")?,
                max_memory_bytes: big("max_memory_bytes")?,
                max_pids: big("max_pids")?,
                max_snapshot_bytes: big("max_snapshot_bytes")?,
                requests_per_minute: small("requests_per_minute")?,
            },
        })
    }
}

/// A key's secret, returned once at creation. `Debug` hides it so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A new secret (`moat_` and 40 base32 characters, from the OS RNG), for
    /// [`Store::create_key_with`].
    pub fn generate() -> StoreResult<Secret> {
        Ok(Secret(generate_secret()?))
    }

    /// The secret itself, to hand to the key's owner exactly once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

fn get_key(conn: &Connection, tenant: &str, id: &str) -> StoreResult<KeyRecord> {
    first_row(
        &mut *conn.prepare_cached("SELECT * FROM api_keys WHERE id = ?1 AND tenant_id = ?2")?,
        params![id, tenant],
        KeyRecord::from_row,
    )?
    .ok_or_else(|| StoreError::not_found("key", id))
}

impl Store {
    /// Creates a key for `tenant` and returns it with its secret (`moat_` and 40 base32
    /// characters, from the OS RNG). The secret is not stored and cannot be shown again.
    pub fn create_key(
        &self,
        tenant: &str,
        name: &str,
        role: Role,
        quotas: Quotas,
    ) -> StoreResult<(KeyRecord, Secret)> {
        self.create_key_with(tenant, name, role, quotas, Secret::generate()?)
    }

    /// [`Store::create_key`] with a secret made beforehand ([`Secret::generate`]), for a caller
    /// that must keep the secret safe before the key that it opens exists.
    pub fn create_key_with(
        &self,
        tenant: &str,
        name: &str,
        role: Role,
        quotas: Quotas,
        secret: Secret,
    ) -> StoreResult<(KeyRecord, Secret)> {
        check_label("key name", name)?;
        let fits = |what: &'static str, n: Option<u64>| {
            n.map(|m| {
                i64::try_from(m)
                    .map_err(|_| StoreError::invalid(what, &m.to_string(), "at most 2^63-1"))
            })
            .transpose()
        };
        let max_memory = fits("memory quota", quotas.max_memory_bytes)?;
        let max_pids = fits("pids quota", quotas.max_pids)?;
        let max_snapshot = fits("snapshot quota", quotas.max_snapshot_bytes)?;
        let record = KeyRecord {
            id: generate_key_id()?,
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            role,
            created_at: now_ms(),
            revoked_at: None,
            quotas,
        };
        self.write(|tx| {
            require_tenant(tx, tenant)?;
            tx.execute(
                "INSERT INTO api_keys (id, tenant_id, name, secret_sha256, role, created_at,
                     max_sandboxes, max_memory_bytes, requests_per_minute, max_pids,
                     max_snapshot_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    record.id,
                    record.tenant,
                    record.name,
                    hash_secret(secret.expose()).as_slice(),
                    role.as_str(),
                    record.created_at,
                    quotas.max_sandboxes,
                    max_memory,
                    quotas.requests_per_minute,
                    max_pids,
                    max_snapshot,
                ],
            )?;
            Ok(())
        })?;
        Ok((record, secret))
    }

    /// The key whose secret this is, unless there is none or it is revoked. Anything that is not
    /// a well-formed secret is `None` without touching the database.
    pub fn authenticate(&self, secret: &str) -> StoreResult<Option<KeyRecord>> {
        if !looks_like_secret(secret) {
            return Ok(None);
        }
        let hash = hash_secret(secret);
        self.read(|tx| {
            let found = first_row(
                &mut *tx.prepare_cached(KEY_BY_SECRET_SQL)?,
                [hash.as_slice()],
                |row| {
                    let stored: Vec<u8> = row.get("secret_sha256")?;
                    Ok((KeyRecord::from_row(row)?, stored))
                },
            )?;
            // The index lookup already matched; comparing again in constant time keeps the
            // decision itself free of early exits, whatever the index does.
            Ok(found.and_then(|(key, stored)| {
                (constant_time_eq(&stored, &hash) && key.revoked_at.is_none()).then_some(key)
            }))
        })
    }

    /// The key `id` of `tenant` (revoked or not).
    pub fn get_key(&self, tenant: &str, id: &str) -> StoreResult<KeyRecord> {
        check_key_id(id)?;
        self.read(|tx| {
            require_tenant(tx, tenant)?;
            get_key(tx, tenant, id)
        })
    }

    /// Every key of `tenant`, revoked ones included, oldest first.
    pub fn list_keys(&self, tenant: &str) -> StoreResult<Vec<KeyRecord>> {
        self.read(|tx| {
            require_tenant(tx, tenant)?;
            let mut stmt = tx.prepare_cached(
                "SELECT * FROM api_keys WHERE tenant_id = ?1 ORDER BY created_at, id",
            )?;
            let keys = stmt.query_and_then([tenant], KeyRecord::from_row)?;
            keys.collect()
        })
    }

    /// Revokes a key of `tenant`; revoking it again changes nothing and is not an error.
    pub fn revoke_key(&self, tenant: &str, id: &str) -> StoreResult<KeyRecord> {
        check_key_id(id)?;
        self.write(|tx| {
            require_tenant(tx, tenant)?;
            tx.execute(
                "UPDATE api_keys SET revoked_at = ?1
                 WHERE id = ?2 AND tenant_id = ?3 AND revoked_at IS NULL",
                params![now_ms(), id, tenant],
            )?;
            get_key(tx, tenant, id)
        })
    }

    /// Whether any unrevoked admin key exists: a server starting without one makes the first.
    pub fn has_admin_key(&self) -> StoreResult<bool> {
        self.read(|tx| {
            Ok(tx
                .prepare_cached(
                    "SELECT 1 FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL LIMIT 1",
                )?
                .exists([])?)
        })
    }
}
