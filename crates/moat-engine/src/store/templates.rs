//! Templates: how sandboxes start. The server defines the spec; the store keeps it as JSON.
//!
//! Built-in templates (no tenant) are visible to every tenant. A tenant's names and the
//! built-in names form one namespace: a tenant cannot shadow a built-in, so a name always means
//! one template to that tenant.

use rusqlite::{Connection, Row, params};
use serde::{Deserialize, Serialize};

use super::error::{StoreError, StoreResult};
use super::ids::check_template_name;
use super::schema::active_states_sql;
use super::tenants::require_tenant;
use super::{Store, first_row, now_ms};
use crate::ids::split_template_name;

/// The query of [`visible_template`]: the tenant's own template of a name first, else the
/// global one (the store's tests check its plan).
pub(super) const VISIBLE_TEMPLATE_SQL: &str =
    "SELECT * FROM templates WHERE name = ?1 AND (tenant_id = ?2 OR tenant_id IS NULL)
     ORDER BY tenant_id IS NULL LIMIT 1";

/// How many active sandboxes use a template, which guards its deletion (the store's tests
/// check its plan).
pub(super) const TEMPLATE_IN_USE_SQL: &str = concat!(
    "SELECT count(*) FROM sandboxes
     WHERE template = ?1 AND template_tenant IS ?2 AND state IN ",
    active_states_sql!()
);

/// A template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// `[a-z0-9][a-z0-9._-]{0,62}`.
    pub name: String,
    /// Its owner; `None` for a built-in template.
    pub tenant: Option<String>,
    /// The server's template spec, a JSON object.
    pub spec: serde_json::Value,
    /// When it was created, Unix milliseconds.
    pub created_at: i64,
    /// The key that made it, whose quotas its warm pool's members count against; `None` for
    /// a built-in (its pool is bounded by the pool memory budget alone).
    pub key_id: Option<String>,
    /// The server's typed form of the spec's limits, a JSON object, written with the spec;
    /// `None` for a template stored before schema version 8 (until the server fills it in).
    pub limits: Option<serde_json::Value>,
    /// The build that made it (for a tag copied from another template, that template's);
    /// `None` for one no build made.
    pub build_id: Option<String>,
}

impl TemplateRecord {
    fn from_row(row: &Row<'_>) -> StoreResult<Self> {
        let spec: String = row.get("spec")?;
        Ok(TemplateRecord {
            name: row.get("name")?,
            tenant: row.get("tenant_id")?,
            spec: serde_json::from_str(&spec)
                .map_err(|e| StoreError::Corrupt(format!("template spec: {e}")))?,
            created_at: row.get("created_at")?,
            key_id: row.get("key_id")?,
            limits: row
                .get::<_, Option<String>>("limits")?
                .map(|l| serde_json::from_str(&l))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("template limits: {e}")))?,
            build_id: row.get("build_id")?,
        })
    }
}

/// Whether `name` is taken where a new template of `tenant` (a built-in for `None`) would be
/// seen: by the tenant's own template or a built-in, or, for a new built-in, by any
/// tenant's. The tags of a name belong to whoever owns it, so a tenant's tag of a built-in's
/// name (`host:v1`) is taken, and so is a new built-in's name that a tenant has tags of.
fn name_taken(conn: &Connection, tenant: Option<&str>, name: &str) -> StoreResult<bool> {
    let (base, tag) = split_template_name(name);
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM templates
             WHERE (name = ?1 AND (?2 IS NULL OR tenant_id IS NULL OR tenant_id = ?2))
                OR (?3 IS NOT NULL AND ?2 IS NOT NULL AND tenant_id IS NULL AND name = ?3)
                OR (?3 IS NULL AND ?2 IS NULL AND tenant_id IS NOT NULL
                    AND substr(name, 1, length(?1) + 1) = ?1 || ':')",
        )?
        .exists(params![name, tenant, tag.map(|_| base)])?)
}

/// The built-in template `name` of a tenant's would be a tag of, if that is what takes it.
fn builtin_base(
    conn: &Connection,
    tenant: Option<&str>,
    name: &str,
) -> StoreResult<Option<String>> {
    let (base, tag) = split_template_name(name);
    if tenant.is_none() || tag.is_none() {
        return Ok(None);
    }
    let exists = conn
        .prepare_cached(
            "SELECT 1 FROM templates WHERE name = ?1 AND (tenant_id IS NULL OR tenant_id = ?2)",
        )?
        .exists(params![name, tenant])?;
    let builtin = conn
        .prepare_cached("SELECT 1 FROM templates WHERE name = ?1 AND tenant_id IS NULL")?
        .exists([base])?;
    Ok((builtin && !exists).then(|| base.to_owned()))
}

/// Checks that `spec` and `limits` are JSON objects.
fn check_objects(spec: &serde_json::Value, limits: Option<&serde_json::Value>) -> StoreResult<()> {
    if !spec.is_object() {
        return Err(StoreError::BadJson {
            what: "template spec",
            reason: "must be a JSON object".into(),
        });
    }
    if limits.is_some_and(|l| !l.is_object()) {
        return Err(StoreError::BadJson {
            what: "template limits",
            reason: "must be a JSON object".into(),
        });
    }
    Ok(())
}

/// The template `name` as `tenant` sees it: its own, or else a built-in.
pub(crate) fn visible_template(
    conn: &Connection,
    tenant: &str,
    name: &str,
) -> StoreResult<Option<TemplateRecord>> {
    first_row(
        &mut *conn.prepare_cached(VISIBLE_TEMPLATE_SQL)?,
        params![name, tenant],
        TemplateRecord::from_row,
    )
}

/// Most templates (tags included) one tenant may have.
pub const MAX_TEMPLATES_PER_TENANT: u64 = 1000;

/// Inserts `record` as it is, within its tenant's [`MAX_TEMPLATES_PER_TENANT`].
fn insert_template(conn: &Connection, record: &TemplateRecord) -> StoreResult<()> {
    if let Some(tenant) = &record.tenant {
        let used: i64 = conn
            .prepare_cached("SELECT count(*) FROM templates WHERE ifnull(tenant_id, '') = ?1")?
            .query_row([tenant], |row| row.get(0))?;
        let used = u64::try_from(used).unwrap_or(u64::MAX);
        if used >= MAX_TEMPLATES_PER_TENANT {
            return Err(StoreError::QuotaExceeded {
                what: "templates",
                limit: MAX_TEMPLATES_PER_TENANT,
                used,
                requested: 1,
            });
        }
    }
    conn.execute(
        "INSERT INTO templates (tenant_id, name, spec, created_at, key_id, limits, build_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            record.tenant,
            record.name,
            record.spec.to_string(),
            record.created_at,
            record.key_id,
            record.limits.as_ref().map(ToString::to_string),
            record.build_id
        ],
    )?;
    Ok(())
}

impl Store {
    /// Creates a template for `tenant`, or a built-in one for `None`.
    ///
    /// [`StoreError::Conflict`] if the name is taken where it would be seen: by the tenant's own
    /// template or a built-in, or, for a new built-in, by any tenant's template.
    pub fn create_template(
        &self,
        tenant: Option<&str>,
        name: &str,
        spec: &serde_json::Value,
    ) -> StoreResult<TemplateRecord> {
        self.create_template_by(tenant, None, name, spec)
    }

    /// [`Store::create_template`] made with the key `key_id` (of `tenant`), whose quotas the
    /// template's warm-pool members count against.
    pub fn create_template_by(
        &self,
        tenant: Option<&str>,
        key_id: Option<&str>,
        name: &str,
        spec: &serde_json::Value,
    ) -> StoreResult<TemplateRecord> {
        self.create_template_with(tenant, key_id, name, spec, None)
    }

    /// [`Store::create_template_by`] with the server's typed form of the spec's `limits` (a
    /// JSON object), kept beside the spec so nothing parses the spec's strings again.
    pub fn create_template_with(
        &self,
        tenant: Option<&str>,
        key_id: Option<&str>,
        name: &str,
        spec: &serde_json::Value,
        limits: Option<&serde_json::Value>,
    ) -> StoreResult<TemplateRecord> {
        check_template_name(name)?;
        check_objects(spec, limits)?;
        let record = TemplateRecord {
            name: name.to_owned(),
            tenant: tenant.map(str::to_owned),
            spec: spec.clone(),
            created_at: now_ms(),
            key_id: key_id.map(str::to_owned),
            limits: limits.cloned(),
            build_id: None,
        };
        self.write(|tx| {
            if let Some(tenant) = tenant {
                require_tenant(tx, tenant)?;
            }
            // The snapshot it starts from, read in this transaction: one deleted since the
            // caller checked it is not named.
            if let (Some(tenant), Some(snapshot)) =
                (tenant, spec.get("snapshot").and_then(|s| s.as_str()))
            {
                super::snapshots::get_snapshot(tx, tenant, snapshot)?;
            }
            if name_taken(tx, tenant, name)? {
                return Err(builtin_base(tx, tenant, name)?.map_or_else(
                    || StoreError::conflict("template", name),
                    |base| StoreError::TagOfBuiltIn {
                        name: name.to_owned(),
                        base,
                    },
                ));
            }
            insert_template(tx, &record)
        })?;
        Ok(record)
    }

    /// Writes the typed `limits` (a JSON object) of `tenant`'s template `name` (a built-in for
    /// `None`) where it has none yet: what a server fills in at start for templates stored
    /// before schema version 8. Returns whether it wrote them.
    pub fn fill_template_limits(
        &self,
        tenant: Option<&str>,
        name: &str,
        limits: &serde_json::Value,
    ) -> StoreResult<bool> {
        if !limits.is_object() {
            return Err(StoreError::BadJson {
                what: "template limits",
                reason: "must be a JSON object".into(),
            });
        }
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE templates SET limits = ?1
                 WHERE name = ?2 AND tenant_id IS ?3 AND limits IS NULL",
                params![limits.to_string(), name, tenant],
            )?;
            Ok(n > 0)
        })
    }

    /// Writes `spec` and its typed `limits` as each of `names`, templates of `tenant` (built-ins
    /// for `None`) made by the build `build_id`, in one transaction: a name that is free is
    /// made (by the key `key_id`), one of `tenant`'s own is replaced when `replace` says yes to
    /// it (a conflict otherwise, and nothing is written). What each is now.
    #[allow(clippy::too_many_arguments)]
    pub fn put_templates(
        &self,
        tenant: Option<&str>,
        key_id: Option<&str>,
        names: &[String],
        spec: &serde_json::Value,
        limits: &serde_json::Value,
        build_id: Option<&str>,
        replace: impl Fn(&TemplateRecord) -> bool,
    ) -> StoreResult<Vec<TemplateRecord>> {
        for name in names {
            check_template_name(name)?;
        }
        check_objects(spec, Some(limits))?;
        self.write(|tx| {
            if let Some(tenant) = tenant {
                require_tenant(tx, tenant)?;
            }
            let mut written = Vec::with_capacity(names.len());
            for name in names {
                let current = tx
                    .prepare_cached("SELECT * FROM templates WHERE tenant_id IS ?1 AND name = ?2")?
                    .query_and_then(params![tenant, name], TemplateRecord::from_row)?
                    .next()
                    .transpose()?;
                let record = match current {
                    Some(current) => {
                        if !replace(&current) {
                            return Err(StoreError::conflict("template", name));
                        }
                        tx.execute(
                            "UPDATE templates SET spec = ?1, limits = ?2, build_id = ?3
                             WHERE tenant_id IS ?4 AND name = ?5",
                            params![spec.to_string(), limits.to_string(), build_id, tenant, name],
                        )?;
                        TemplateRecord {
                            spec: spec.clone(),
                            limits: Some(limits.clone()),
                            build_id: build_id.map(str::to_owned),
                            ..current
                        }
                    }
                    None => {
                        if name_taken(tx, tenant, name)? {
                            return Err(StoreError::conflict("template", name));
                        }
                        let record = TemplateRecord {
                            name: name.clone(),
                            tenant: tenant.map(str::to_owned),
                            spec: spec.clone(),
                            created_at: now_ms(),
                            key_id: key_id.map(str::to_owned),
                            limits: Some(limits.clone()),
                            build_id: build_id.map(str::to_owned),
                        };
                        insert_template(tx, &record)?;
                        record
                    }
                };
                written.push(record);
            }
            Ok(written)
        })
    }

    /// The template `name` as `tenant` sees it: its own or a built-in.
    pub fn get_template(&self, tenant: &str, name: &str) -> StoreResult<TemplateRecord> {
        check_template_name(name)?;
        self.read(|tx| {
            require_tenant(tx, tenant)?;
            visible_template(tx, tenant, name)?
                .ok_or_else(|| StoreError::not_found("template", name))
        })
    }

    /// A template the build `build_id` wrote (the first by name), if any is left.
    pub fn template_of_build(&self, build_id: &str) -> StoreResult<Option<TemplateRecord>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT * FROM templates WHERE build_id = ?1 ORDER BY name LIMIT 1",
            )?;
            let mut rows = stmt.query_and_then([build_id], TemplateRecord::from_row)?;
            rows.next().transpose()
        })
    }

    /// The templates `tenant` sees (its own and the built-ins), by name; `None` lists only the
    /// built-ins.
    pub fn list_templates(&self, tenant: Option<&str>) -> StoreResult<Vec<TemplateRecord>> {
        self.read(|tx| {
            if let Some(tenant) = tenant {
                require_tenant(tx, tenant)?;
            }
            let mut stmt = tx.prepare_cached(
                "SELECT * FROM templates WHERE tenant_id IS NULL OR tenant_id = ?1 ORDER BY name",
            )?;
            let rows = stmt.query_and_then([tenant], TemplateRecord::from_row)?;
            rows.collect()
        })
    }

    /// Every template of every tenant and the built-ins: what the warm pools follow.
    pub fn all_templates(&self) -> StoreResult<Vec<TemplateRecord>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached("SELECT * FROM templates ORDER BY tenant_id, name")?;
            let rows = stmt.query_and_then([], TemplateRecord::from_row)?;
            rows.collect()
        })
    }

    /// Deletes `tenant`'s template `name`, or the built-in `name` for `None`.
    ///
    /// Refused with [`StoreError::TemplateInUse`] while starting, running or paused sandboxes
    /// were made from it, unless `force`; the sandboxes keep its name either way. A tenant
    /// naming a built-in gets [`StoreError::BuiltIn`].
    pub fn delete_template(
        &self,
        tenant: Option<&str>,
        name: &str,
        force: bool,
    ) -> StoreResult<()> {
        check_template_name(name)?;
        self.write(|tx| {
            if let Some(tenant) = tenant {
                require_tenant(tx, tenant)?;
            }
            let exists = tx
                .prepare_cached("SELECT 1 FROM templates WHERE name = ?1 AND tenant_id IS ?2")?
                .exists(params![name, tenant])?;
            if !exists {
                let built_in = tenant.is_some()
                    && tx
                        .prepare_cached(
                            "SELECT 1 FROM templates WHERE name = ?1 AND tenant_id IS NULL",
                        )?
                        .exists([name])?;
                return Err(if built_in {
                    StoreError::BuiltIn {
                        name: name.to_owned(),
                    }
                } else {
                    StoreError::not_found("template", name)
                });
            }
            if !force {
                let in_use: i64 = tx
                    .prepare_cached(TEMPLATE_IN_USE_SQL)?
                    .query_row(params![name, tenant], |row| row.get(0))?;
                if in_use > 0 {
                    return Err(StoreError::TemplateInUse {
                        name: name.to_owned(),
                        sandboxes: u64::try_from(in_use).unwrap_or_default(),
                    });
                }
            }
            tx.execute(
                "DELETE FROM templates WHERE name = ?1 AND tenant_id IS ?2",
                params![name, tenant],
            )?;
            Ok(())
        })
    }
}

/// Names of `tenant`'s templates that start from snapshot `snapshot`.
pub(super) fn templates_using_snapshot(
    tx: &Connection,
    tenant: &str,
    snapshot: &str,
) -> StoreResult<Vec<String>> {
    let mut stmt = tx.prepare_cached(
        "SELECT name FROM templates
         WHERE tenant_id = ?1 AND json_extract(spec, '$.snapshot') = ?2 ORDER BY name",
    )?;
    let rows = stmt.query_map([tenant, snapshot], |r| r.get::<_, String>(0))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(Into::into)
}
