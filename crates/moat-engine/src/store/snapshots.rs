//! Snapshots: frozen copies of sandboxes' writable layers. The archive is a file the manager
//! keeps in the snapshot directory; the store keeps what a sandbox made from it needs (its
//! template, resources and environment) and who owns it.
//!
//! The manager writes the file (and syncs it) before it records the snapshot, and deletes the
//! record before the file, so a recorded snapshot always has its file; a file without a record
//! (a crash in between) is swept at start-up.

use std::collections::BTreeMap;

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, Row, params, params_from_iter};
use serde::{Deserialize, Serialize};

use super::error::{StoreError, StoreResult};
use super::ids::{check_sandbox_id, check_template_name, check_tenant_id, random_base32};
use super::sandboxes::{Cursor, MAX_PAGE};
use super::tenants::require_tenant;
use super::{Store, first_row, now_ms};

/// Length of the snapshot ids [`generate_snapshot_id`] makes (100 bits).
const SNAPSHOT_ID_CHARS: usize = 20;
/// Longest snapshot name, in characters.
pub const MAX_SNAPSHOT_NAME: usize = 128;

/// A fresh random snapshot id (20 characters of `[a-z2-7]`), valid for [`check_snapshot_id`].
pub fn generate_snapshot_id() -> StoreResult<String> {
    random_base32(SNAPSHOT_ID_CHARS)
}

/// Checks a snapshot id: `[a-z0-9]{16,64}`, the shape of sandbox ids.
pub fn check_snapshot_id(id: &str) -> StoreResult<()> {
    check_sandbox_id(id)
        .map_err(|_| StoreError::invalid("snapshot id", id, "16 to 64 characters of a-z and 0-9"))
}

/// Checks a snapshot name: 1 to [`MAX_SNAPSHOT_NAME`] characters, no control characters.
pub fn check_snapshot_name(name: &str) -> StoreResult<()> {
    let chars = name.chars().count();
    if (1..=MAX_SNAPSHOT_NAME).contains(&chars) && !name.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "snapshot name",
            name,
            format!("1 to {MAX_SNAPSHOT_NAME} characters, no control characters"),
        ))
    }
}

/// A snapshot to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSnapshot {
    /// From [`generate_snapshot_id`].
    pub id: String,
    /// Its owner.
    pub tenant: String,
    /// A name for people, not unique.
    pub name: Option<String>,
    /// The sandbox it was taken of.
    pub sandbox_id: String,
    /// That sandbox's template.
    pub template: String,
    /// That sandbox's resource limits, a JSON object.
    pub resources: serde_json::Value,
    /// That sandbox's environment variables (its own, over the template's).
    pub env: BTreeMap<String, String>,
    /// Size of the archive (and memory checkpoint), bytes.
    pub size_bytes: u64,
    /// Whether it holds the sandbox's memory (a backend's checkpoint) besides its files.
    pub memory: bool,
    /// The backend the sandbox ran on; a snapshot with memory restores only on it.
    pub backend: String,
}

/// A recorded snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Its id.
    pub id: String,
    /// Its owner.
    pub tenant: String,
    /// Its name, if it has one.
    pub name: Option<String>,
    /// The sandbox it was taken of.
    pub sandbox_id: String,
    /// That sandbox's template.
    pub template: String,
    /// That sandbox's resource limits.
    pub resources: serde_json::Value,
    /// That sandbox's environment variables.
    pub env: BTreeMap<String, String>,
    /// Size of the archive (and memory checkpoint), bytes.
    pub size_bytes: u64,
    /// When it was recorded, Unix milliseconds.
    pub created_at: i64,
    /// Whether it holds the sandbox's memory besides its files.
    pub memory: bool,
    /// The backend the sandbox ran on.
    pub backend: String,
}

impl SnapshotRecord {
    fn from_row(row: &Row<'_>) -> StoreResult<Self> {
        let resources: String = row.get("resources")?;
        let env: String = row.get("env")?;
        let size: i64 = row.get("size_bytes")?;
        Ok(SnapshotRecord {
            id: row.get("id")?,
            tenant: row.get("tenant_id")?,
            name: row.get("name")?,
            sandbox_id: row.get("sandbox_id")?,
            template: row.get("template")?,
            resources: serde_json::from_str(&resources)
                .map_err(|e| StoreError::Corrupt(format!("snapshot resources: {e}")))?,
            env: serde_json::from_str(&env)
                .map_err(|e| StoreError::Corrupt(format!("snapshot env: {e}")))?,
            size_bytes: u64::try_from(size)
                .map_err(|_| StoreError::Corrupt(format!("negative snapshot size {size}")))?,
            created_at: row.get("created_at")?,
            memory: row.get::<_, i64>("memory")? != 0,
            backend: row.get("backend")?,
        })
    }
}

/// Which snapshots [`Store::list_snapshots`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFilter {
    /// Only those taken of this sandbox.
    pub sandbox_id: Option<String>,
    /// Only those with this name.
    pub name: Option<String>,
    /// Start after this cursor (from the previous page's [`SnapshotPage::next`]).
    pub after: Option<Cursor>,
    /// Page size, 1 to [`MAX_PAGE`].
    pub limit: u32,
}

impl Default for SnapshotFilter {
    fn default() -> Self {
        SnapshotFilter {
            sandbox_id: None,
            name: None,
            after: None,
            limit: 100,
        }
    }
}

/// One page of snapshots, oldest first (by `created_at`, then id).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotPage {
    /// The snapshots.
    pub items: Vec<SnapshotRecord>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

pub(super) fn get_snapshot(
    conn: &Connection,
    tenant: &str,
    id: &str,
) -> StoreResult<SnapshotRecord> {
    first_row(
        &mut *conn.prepare_cached("SELECT * FROM snapshots WHERE id = ?1 AND tenant_id = ?2")?,
        params![id, tenant],
        SnapshotRecord::from_row,
    )?
    .ok_or_else(|| StoreError::not_found("snapshot", id))
}

fn count(conn: &Connection, tenant: &str) -> StoreResult<u64> {
    let n: i64 = conn
        .prepare_cached("SELECT count(*) FROM snapshots WHERE tenant_id = ?1")?
        .query_row([tenant], |row| row.get(0))?;
    Ok(u64::try_from(n).unwrap_or_default())
}

/// Bytes of the archives of `tenant`'s snapshots.
fn bytes(conn: &Connection, tenant: &str) -> StoreResult<u64> {
    let n: i64 = conn
        .prepare_cached("SELECT coalesce(sum(size_bytes), 0) FROM snapshots WHERE tenant_id = ?1")?
        .query_row([tenant], |row| row.get(0))?;
    Ok(u64::try_from(n).unwrap_or_default())
}

impl Store {
    /// Records a snapshot unless its tenant already has `max_per_tenant` (checked and inserted
    /// in one transaction, so concurrent snapshots cannot overshoot; over it is
    /// [`StoreError::QuotaExceeded`]). [`StoreError::Conflict`] if the id exists.
    pub fn insert_snapshot(
        &self,
        new: &NewSnapshot,
        max_per_tenant: u64,
    ) -> StoreResult<SnapshotRecord> {
        self.insert_snapshot_within(new, max_per_tenant, u64::MAX)
    }

    /// [`Store::insert_snapshot`] that also keeps the tenant's snapshots within `max_bytes`
    /// of archives, this one included.
    pub fn insert_snapshot_within(
        &self,
        new: &NewSnapshot,
        max_per_tenant: u64,
        max_bytes: u64,
    ) -> StoreResult<SnapshotRecord> {
        check_snapshot_id(&new.id)?;
        check_tenant_id(&new.tenant)?;
        check_sandbox_id(&new.sandbox_id)?;
        check_template_name(&new.template)?;
        if let Some(name) = &new.name {
            check_snapshot_name(name)?;
        }
        if !new.resources.is_object() {
            return Err(StoreError::BadJson {
                what: "snapshot resources",
                reason: "must be a JSON object".into(),
            });
        }
        let env = serde_json::to_string(&new.env).map_err(|e| StoreError::BadJson {
            what: "snapshot env",
            reason: e.to_string(),
        })?;
        let size = i64::try_from(new.size_bytes).map_err(|_| {
            StoreError::invalid(
                "snapshot size",
                &new.size_bytes.to_string(),
                "at most 2^63-1",
            )
        })?;
        let created_at = now_ms();
        self.write(|tx| {
            require_tenant(tx, &new.tenant)?;
            let used = count(tx, &new.tenant)?;
            if used >= max_per_tenant {
                return Err(StoreError::QuotaExceeded {
                    what: "snapshots",
                    limit: max_per_tenant,
                    used,
                    requested: 1,
                });
            }
            let held = bytes(tx, &new.tenant)?;
            if held.saturating_add(new.size_bytes) > max_bytes {
                return Err(StoreError::QuotaExceeded {
                    what: "snapshot bytes",
                    limit: max_bytes,
                    used: held,
                    requested: new.size_bytes,
                });
            }
            let inserted = tx.execute(
                "INSERT INTO snapshots (id, tenant_id, name, sandbox_id, template, resources,
                     env, size_bytes, created_at, memory, backend)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (id) DO NOTHING",
                params![
                    new.id,
                    new.tenant,
                    new.name,
                    new.sandbox_id,
                    new.template,
                    new.resources.to_string(),
                    env,
                    size,
                    created_at,
                    i64::from(new.memory),
                    new.backend,
                ],
            )?;
            if inserted == 0 {
                return Err(StoreError::conflict("snapshot", &new.id));
            }
            Ok(())
        })?;
        Ok(SnapshotRecord {
            id: new.id.clone(),
            tenant: new.tenant.clone(),
            name: new.name.clone(),
            sandbox_id: new.sandbox_id.clone(),
            template: new.template.clone(),
            resources: new.resources.clone(),
            env: new.env.clone(),
            size_bytes: new.size_bytes,
            created_at,
            memory: new.memory,
            backend: new.backend.clone(),
        })
    }

    /// The snapshot `id` of `tenant`; another tenant's is [`StoreError::NotFound`].
    pub fn get_snapshot(&self, tenant: &str, id: &str) -> StoreResult<SnapshotRecord> {
        check_tenant_id(tenant)?;
        check_snapshot_id(id)?;
        self.read(|tx| get_snapshot(tx, tenant, id))
    }

    /// How many snapshots `tenant` has.
    pub fn count_snapshots(&self, tenant: &str) -> StoreResult<u64> {
        check_tenant_id(tenant)?;
        self.read(|tx| count(tx, tenant))
    }

    /// Bytes of the archives of `tenant`'s snapshots.
    pub fn snapshot_bytes(&self, tenant: &str) -> StoreResult<u64> {
        check_tenant_id(tenant)?;
        self.read(|tx| bytes(tx, tenant))
    }

    /// One page of `tenant`'s snapshots that match `filter`, oldest first, paged by keyset
    /// like [`Store::list_sandboxes`].
    pub fn list_snapshots(
        &self,
        tenant: &str,
        filter: &SnapshotFilter,
    ) -> StoreResult<SnapshotPage> {
        check_tenant_id(tenant)?;
        if !(1..=MAX_PAGE).contains(&filter.limit) {
            return Err(StoreError::invalid(
                "page size",
                &filter.limit.to_string(),
                format!("1 to {MAX_PAGE}"),
            ));
        }
        let mut sql = String::from("SELECT * FROM snapshots WHERE tenant_id = ?");
        let mut args = vec![SqlValue::Text(tenant.to_owned())];
        if let Some(sandbox) = &filter.sandbox_id {
            sql.push_str(" AND sandbox_id = ?");
            args.push(SqlValue::Text(sandbox.clone()));
        }
        if let Some(name) = &filter.name {
            sql.push_str(" AND name = ?");
            args.push(SqlValue::Text(name.clone()));
        }
        if let Some(after) = &filter.after {
            sql.push_str(" AND (created_at, id) > (?, ?)");
            args.push(SqlValue::Integer(after.created_at));
            args.push(SqlValue::Text(after.id.clone()));
        }
        sql.push_str(" ORDER BY created_at, id LIMIT ?");
        args.push(SqlValue::Integer(i64::from(filter.limit) + 1));
        let mut items = self.read(|tx| {
            let mut stmt = tx.prepare_cached(&sql)?;
            let rows = stmt.query_and_then(params_from_iter(args), SnapshotRecord::from_row)?;
            rows.collect::<StoreResult<Vec<_>>>()
        })?;
        let next = super::sandboxes::cut_page(&mut items, filter.limit, |last| Cursor {
            created_at: last.created_at,
            id: last.id.clone(),
        });
        Ok(SnapshotPage { items, next })
    }

    /// Deletes the record of `tenant`'s snapshot `id` and returns it (the caller deletes the
    /// file after).
    pub fn delete_snapshot(&self, tenant: &str, id: &str) -> StoreResult<SnapshotRecord> {
        check_tenant_id(tenant)?;
        check_snapshot_id(id)?;
        self.write(|tx| {
            let rec = get_snapshot(tx, tenant, id)?;
            let templates = super::templates::templates_using_snapshot(tx, tenant, id)?;
            if !templates.is_empty() {
                return Err(StoreError::SnapshotInUse {
                    id: id.to_owned(),
                    templates,
                });
            }
            tx.execute(
                "DELETE FROM snapshots WHERE id = ?1 AND tenant_id = ?2",
                params![id, tenant],
            )?;
            Ok(rec)
        })
    }

    /// The ids of every snapshot of every tenant (for the start-up sweep of the snapshot
    /// directory).
    pub fn all_snapshot_ids(&self) -> StoreResult<Vec<String>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached("SELECT id FROM snapshots ORDER BY id")?;
            let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn store() -> Store {
        let s = Store::open_in_memory().unwrap();
        s.create_tenant("a", "A").unwrap();
        s.create_tenant("b", "B").unwrap();
        s
    }

    fn new(tenant: &str, name: Option<&str>, sandbox: &str) -> NewSnapshot {
        NewSnapshot {
            id: generate_snapshot_id().unwrap(),
            tenant: tenant.into(),
            name: name.map(str::to_owned),
            sandbox_id: sandbox.into(),
            template: "host".into(),
            resources: serde_json::json!({"memory_bytes": 1}),
            env: BTreeMap::from([("K".into(), "v".into())]),
            size_bytes: 10,
            memory: false,
            backend: "native".into(),
        }
    }

    /// A snapshot a template starts from is not deleted, and a template never names a
    /// deleted snapshot: each is checked in the other's transaction.
    #[test]
    fn a_template_and_its_snapshot_hold_each_other() {
        let s = store();
        let snap = s
            .insert_snapshot(&new("a", None, "sandboxaaaaaaaaaaaaa"), 10)
            .unwrap();
        let spec = serde_json::json!({"rootfs": "host", "snapshot": snap.id});
        s.create_template(Some("a"), "warm", &spec).unwrap();
        match s.delete_snapshot("a", &snap.id) {
            Err(StoreError::SnapshotInUse { templates, .. }) => assert_eq!(templates, ["warm"]),
            other => panic!("{other:?}"),
        }
        s.delete_template(Some("a"), "warm", true).unwrap();
        s.delete_snapshot("a", &snap.id).unwrap();
        assert!(matches!(
            s.create_template(Some("a"), "late", &spec),
            Err(StoreError::NotFound {
                kind: "snapshot",
                ..
            })
        ));
    }

    #[test]
    fn records_pages_filters_and_tenancy() {
        let s = store();
        let one = s
            .insert_snapshot(&new("a", Some("x"), "sandboxaaaaaaaaaaaaa"), 10)
            .unwrap();
        let two = s
            .insert_snapshot(&new("a", None, "sandboxbbbbbbbbbbbbb"), 10)
            .unwrap();
        s.insert_snapshot(&new("b", Some("x"), "sandboxaaaaaaaaaaaaa"), 10)
            .unwrap();
        assert_eq!(s.get_snapshot("a", &one.id).unwrap(), one);
        assert!(matches!(
            s.get_snapshot("b", &one.id),
            Err(StoreError::NotFound { .. })
        ));
        let all = s.list_snapshots("a", &SnapshotFilter::default()).unwrap();
        assert_eq!(all.items.len(), 2);
        let named = SnapshotFilter {
            name: Some("x".into()),
            ..SnapshotFilter::default()
        };
        assert_eq!(
            s.list_snapshots("a", &named).unwrap().items,
            vec![one.clone()]
        );
        let of = SnapshotFilter {
            sandbox_id: Some("sandboxbbbbbbbbbbbbb".into()),
            ..SnapshotFilter::default()
        };
        assert_eq!(s.list_snapshots("a", &of).unwrap().items, vec![two.clone()]);
        let first = s
            .list_snapshots(
                "a",
                &SnapshotFilter {
                    limit: 1,
                    ..SnapshotFilter::default()
                },
            )
            .unwrap();
        assert_eq!(first.items.len(), 1);
        let rest = s
            .list_snapshots(
                "a",
                &SnapshotFilter {
                    after: first.next,
                    ..SnapshotFilter::default()
                },
            )
            .unwrap();
        assert_eq!(rest.items.len(), 1);
        assert!(rest.next.is_none());
        assert_ne!(first.items[0].id, rest.items[0].id);
        assert!(matches!(
            s.delete_snapshot("b", &one.id),
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(s.delete_snapshot("a", &one.id).unwrap(), one);
        assert_eq!(s.count_snapshots("a").unwrap(), 1);
        assert_eq!(s.all_snapshot_ids().unwrap().len(), 2);
    }

    #[test]
    fn the_per_tenant_limit_holds() {
        let s = store();
        s.insert_snapshot(&new("a", None, "sandboxaaaaaaaaaaaaa"), 1)
            .unwrap();
        assert!(matches!(
            s.insert_snapshot(&new("a", None, "sandboxaaaaaaaaaaaaa"), 1),
            Err(StoreError::QuotaExceeded { .. })
        ));
        s.insert_snapshot(&new("b", None, "sandboxaaaaaaaaaaaaa"), 1)
            .unwrap();
    }

    #[test]
    fn names_are_checked() {
        check_snapshot_name("team/name:tag").unwrap();
        for bad in ["", "a\nb", &"x".repeat(MAX_SNAPSHOT_NAME + 1)] {
            assert!(check_snapshot_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_snapshot_id("short").is_err());
    }
}
