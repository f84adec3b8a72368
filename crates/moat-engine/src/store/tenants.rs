//! Tenants: who owns keys, templates and sandboxes.

use rusqlite::{OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

use super::error::{StoreError, StoreResult};
use super::ids::{check_label, check_tenant_id};
use super::{Store, now_ms};

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// `[a-z0-9]{1,64}`.
    pub id: String,
    /// A label for people.
    pub name: String,
    /// When it was created, Unix milliseconds.
    pub created_at: i64,
}

impl TenantRecord {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(TenantRecord {
            id: row.get("id")?,
            name: row.get("name")?,
            created_at: row.get("created_at")?,
        })
    }
}

/// Fails with `NotFound` unless the tenant exists; run inside the caller's transaction so the
/// answer holds for the rest of it.
pub(crate) fn require_tenant(conn: &rusqlite::Connection, tenant: &str) -> StoreResult<()> {
    check_tenant_id(tenant)?;
    let found = conn
        .prepare_cached("SELECT 1 FROM tenants WHERE id = ?1")?
        .exists([tenant])?;
    if found {
        Ok(())
    } else {
        Err(StoreError::not_found("tenant", tenant))
    }
}

impl Store {
    /// Creates a tenant; [`StoreError::Conflict`] if the id is taken.
    pub fn create_tenant(&self, id: &str, name: &str) -> StoreResult<TenantRecord> {
        check_tenant_id(id)?;
        check_label("tenant name", name)?;
        let record = TenantRecord {
            id: id.to_owned(),
            name: name.to_owned(),
            created_at: now_ms(),
        };
        self.write(|tx| {
            let inserted = tx.execute(
                "INSERT INTO tenants (id, name, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO NOTHING",
                params![record.id, record.name, record.created_at],
            )?;
            if inserted == 0 {
                return Err(StoreError::conflict("tenant", id));
            }
            Ok(())
        })?;
        Ok(record)
    }

    /// The tenant `id`.
    pub fn get_tenant(&self, id: &str) -> StoreResult<TenantRecord> {
        check_tenant_id(id)?;
        self.read(|tx| {
            tx.prepare_cached("SELECT * FROM tenants WHERE id = ?1")?
                .query_row([id], TenantRecord::from_row)
                .optional()?
                .ok_or_else(|| StoreError::not_found("tenant", id))
        })
    }

    /// Every tenant, by id.
    pub fn list_tenants(&self) -> StoreResult<Vec<TenantRecord>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached("SELECT * FROM tenants ORDER BY id")?;
            let rows = stmt.query_map([], TenantRecord::from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }
}
