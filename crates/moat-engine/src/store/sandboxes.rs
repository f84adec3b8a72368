//! Sandboxes: their records, state machine, listing, expiry and quota usage.
//!
//! The store records what the server did; it does not make sandboxes. The state machine is
//! enforced here so that no code path (API, reaper, pool, restart) can record an impossible
//! history.

use std::collections::BTreeMap;

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, Row, params, params_from_iter};
use serde::{Deserialize, Serialize};

use super::error::{StoreError, StoreResult};
use super::ids::{check_key_id, check_sandbox_id, check_template_name, check_tenant_id};
use super::schema::active_states_sql;
use super::templates::visible_template;
use super::tenants::require_tenant;
use super::{Store, first_row, now_ms};

/// The query of [`Store::expired`] (the store's tests check its plan).
pub(super) const EXPIRED_SQL: &str = concat!(
    "SELECT * FROM sandboxes WHERE expires_at <= ?1 AND state IN ",
    active_states_sql!(),
    " ORDER BY expires_at, id"
);

/// Largest page [`Store::list_sandboxes`] returns.
pub const MAX_PAGE: u32 = 1000;
/// Bounds on metadata, so one sandbox's row stays small.
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_KEY: usize = 256;
const MAX_METADATA_VALUE: usize = 4096;
/// All keys and values of one sandbox's metadata together, bytes.
const MAX_METADATA_BYTES: usize = 16 * 1024;

pub use moat_proto::v1::SandboxState;

/// Why a sandbox ended. Stored and serialised as text: `ttl`, `deleted`, `server_restart`,
/// `failed: <message>`, or any other text as given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum EndReason {
    /// Its time to live ran out.
    Ttl,
    /// A client deleted it.
    Deleted,
    /// The server that ran it stopped without ending it; the next start reaped it.
    ServerRestart,
    /// It failed, with this message.
    Failed(String),
    /// Another reason, as text.
    Other(String),
}

impl From<EndReason> for String {
    fn from(reason: EndReason) -> String {
        reason.to_string()
    }
}

impl From<String> for EndReason {
    fn from(text: String) -> EndReason {
        match text.as_str() {
            "ttl" => EndReason::Ttl,
            "deleted" => EndReason::Deleted,
            "server_restart" => EndReason::ServerRestart,
            _ => match text.strip_prefix("failed: ") {
                Some(message) => EndReason::Failed(message.to_owned()),
                None => EndReason::Other(text),
            },
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::Ttl => f.write_str("ttl"),
            EndReason::Deleted => f.write_str("deleted"),
            EndReason::ServerRestart => f.write_str("server_restart"),
            EndReason::Failed(message) => write!(f, "failed: {message}"),
            EndReason::Other(text) => f.write_str(text),
        }
    }
}

/// A sandbox to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSandbox {
    /// `[a-z0-9]{16,64}`; see [`super::generate_sandbox_id`].
    pub id: String,
    /// Its owner.
    pub tenant: String,
    /// The key that created it (quotas are per key); it must belong to `tenant`.
    pub key_id: Option<String>,
    /// The template it is made from, as `tenant` sees it (its own or a built-in); must exist.
    pub template: String,
    /// `Starting`, or `Running` for a sandbox that was ready before it was recorded (a claimed
    /// warm-pool member).
    pub state: SandboxState,
    /// The client's labels.
    pub metadata: BTreeMap<String, String>,
    /// The server's resource limits, a JSON object.
    pub resources: serde_json::Value,
    /// The memory limit in bytes, which quotas add up.
    pub memory_bytes: u64,
    /// When it expires (Unix milliseconds), if ever.
    pub expires_at: Option<i64>,
    /// Whether its own services are reachable without its traffic access token.
    pub public_traffic: bool,
    /// The kind of backend that makes it (`native`, …).
    pub backend: String,
    /// The engine's resolved plan of it, a JSON object (`None` where the caller has none).
    pub plan: Option<serde_json::Value>,
    /// The idempotency key of the create that makes it, recorded with it in one transaction
    /// (see [`Store::idempotent_sandbox`]).
    pub idempotency_key: Option<String>,
}

/// A recorded sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Its id.
    pub id: String,
    /// Its owner.
    pub tenant: String,
    /// The key that created it.
    pub key_id: Option<String>,
    /// The template it was made from.
    pub template: String,
    /// Where it is in its life.
    pub state: SandboxState,
    /// The client's labels.
    pub metadata: BTreeMap<String, String>,
    /// The server's resource limits.
    pub resources: serde_json::Value,
    /// The memory limit in bytes.
    pub memory_bytes: u64,
    /// When it was recorded, Unix milliseconds.
    pub created_at: i64,
    /// When it expires, if ever.
    pub expires_at: Option<i64>,
    /// When it ended (killed or failed).
    pub ended_at: Option<i64>,
    /// Why it ended.
    pub end_reason: Option<EndReason>,
    /// Whether its own services are reachable without its traffic access token.
    pub public_traffic: bool,
    /// The kind of backend that made it (`native`, …).
    #[serde(default = "native_kind")]
    pub backend: String,
    /// The engine's resolved plan of it, a JSON object; `None` for sandboxes recorded before
    /// schema version 8.
    #[serde(default)]
    pub plan: Option<serde_json::Value>,
}

/// The backend of records that name none: the only one there was before backends were named.
fn native_kind() -> String {
    "native".into()
}

impl SandboxRecord {
    fn from_row(row: &Row<'_>) -> StoreResult<Self> {
        let state: String = row.get("state")?;
        let metadata: String = row.get("metadata")?;
        let resources: String = row.get("resources")?;
        let memory: i64 = row.get("memory_bytes")?;
        Ok(SandboxRecord {
            id: row.get("id")?,
            tenant: row.get("tenant_id")?,
            key_id: row.get("key_id")?,
            template: row.get("template")?,
            state: SandboxState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown sandbox state {state:?}")))?,
            metadata: serde_json::from_str(&metadata)
                .map_err(|e| StoreError::Corrupt(format!("sandbox metadata: {e}")))?,
            resources: serde_json::from_str(&resources)
                .map_err(|e| StoreError::Corrupt(format!("sandbox resources: {e}")))?,
            memory_bytes: u64::try_from(memory)
                .map_err(|_| StoreError::Corrupt(format!("negative memory {memory}")))?,
            created_at: row.get("created_at")?,
            expires_at: row.get("expires_at")?,
            ended_at: row.get("ended_at")?,
            end_reason: row
                .get::<_, Option<String>>("end_reason")?
                .map(EndReason::from),
            public_traffic: row.get("public_traffic")?,
            backend: row.get("backend")?,
            plan: row
                .get::<_, Option<String>>("plan")?
                .map(|p| serde_json::from_str(&p))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("sandbox plan: {e}")))?,
        })
    }
}

/// Cuts `items` (fetched with one more than `limit`, to know whether another page follows) to
/// the page, and returns the cursor of the next page, made from the page's last item, if
/// there is one.
pub(crate) fn cut_page<T>(
    items: &mut Vec<T>,
    limit: u32,
    cursor: impl Fn(&T) -> Cursor,
) -> Option<Cursor> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor)
    } else {
        None
    }
}

/// Where a page of [`Store::list_sandboxes`] ends; the next page starts after it.
///
/// Its text form ([`Cursor::encode`]) is what the API hands to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// `created_at` of the last sandbox of the page.
    pub created_at: i64,
    /// `id` of the last sandbox of the page.
    pub id: String,
}

impl Cursor {
    /// The cursor as text, `<created_at>.<id>`.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.created_at, self.id)
    }

    /// Parses [`Cursor::encode`]'s text; anything else is [`StoreError::Invalid`].
    pub fn decode(text: &str) -> StoreResult<Cursor> {
        let bad = || StoreError::invalid("cursor", text, "a cursor returned by a previous page");
        let (created_at, id) = text.split_once('.').ok_or_else(bad)?;
        let created_at = created_at.parse().map_err(|_| bad())?;
        check_sandbox_id(id).map_err(|_| bad())?;
        Ok(Cursor {
            created_at,
            id: id.to_owned(),
        })
    }
}

/// Which sandboxes [`Store::list_sandboxes`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxFilter {
    /// Only these states; empty means all.
    pub states: Vec<SandboxState>,
    /// Only sandboxes whose metadata has every one of these key/value pairs.
    pub metadata: Vec<(String, String)>,
    /// Only sandboxes made from the template of this name.
    pub template: Option<String>,
    /// Only sandboxes created at or after this time (Unix milliseconds).
    pub created_since: Option<i64>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
    /// Start after this cursor (from the previous page's [`Page::next`], listed in the same
    /// order).
    pub after: Option<Cursor>,
    /// Page size, 1 to [`MAX_PAGE`].
    pub limit: u32,
}

impl Default for SandboxFilter {
    fn default() -> Self {
        SandboxFilter {
            states: Vec::new(),
            metadata: Vec::new(),
            template: None,
            created_since: None,
            newest_first: false,
            after: None,
            limit: 100,
        }
    }
}

/// One page of sandboxes, oldest first (by `created_at`, then id) unless the filter asked for
/// newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The sandboxes.
    pub items: Vec<SandboxRecord>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

/// What a key or tenant holds: its starting, running and paused sandboxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// How many sandboxes.
    pub sandboxes: u64,
    /// The sum of their memory limits, bytes.
    pub memory_bytes: u64,
    /// The sum of their pids limits.
    pub pids: u64,
}

/// The quotas on active (starting, running, paused) sandboxes checked by
/// [`Store::insert_sandbox_within`]: the part of a key's [`super::Quotas`] the store enforces
/// when it records a sandbox (the resource limits of one sandbox are `resources::Resources`).
/// `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxQuotas {
    /// Starting, running and paused sandboxes at once.
    pub max_sandboxes: Option<u64>,
    /// Sum of their memory limits, bytes.
    pub max_memory_bytes: Option<u64>,
    /// Sum of their pids limits (the `pids` of their resources).
    pub max_pids: Option<u64>,
}

fn check_metadata(metadata: &BTreeMap<String, String>) -> StoreResult<()> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(StoreError::invalid(
            "metadata",
            &format!("{} entries", metadata.len()),
            format!("at most {MAX_METADATA_ENTRIES} entries"),
        ));
    }
    let total: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_METADATA_BYTES {
        return Err(StoreError::invalid(
            "metadata",
            &format!("{total} bytes"),
            format!("at most {MAX_METADATA_BYTES} bytes of keys and values together"),
        ));
    }
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY {
            return Err(StoreError::invalid(
                "metadata key",
                key,
                format!("1 to {MAX_METADATA_KEY} bytes"),
            ));
        }
        if value.len() > MAX_METADATA_VALUE {
            return Err(StoreError::invalid(
                "metadata value",
                value,
                format!("at most {MAX_METADATA_VALUE} bytes"),
            ));
        }
    }
    Ok(())
}

/// Sandbox `id` of `tenant`, which must not have ended ([`StoreError::Ended`] otherwise).
fn get_active_sandbox(tx: &Connection, tenant: &str, id: &str) -> StoreResult<SandboxRecord> {
    let current = get_sandbox(tx, tenant, id)?;
    if current.state.is_ended() {
        return Err(StoreError::Ended {
            id: id.to_owned(),
            state: current.state,
        });
    }
    Ok(current)
}

fn get_sandbox(conn: &Connection, tenant: &str, id: &str) -> StoreResult<SandboxRecord> {
    first_row(
        &mut *conn.prepare_cached("SELECT * FROM sandboxes WHERE id = ?1 AND tenant_id = ?2")?,
        params![id, tenant],
        SandboxRecord::from_row,
    )?
    .ok_or_else(|| StoreError::not_found("sandbox", id))
}

/// Usage of active sandboxes matching `column = value`, and of the warm-pool members charged
/// to the same key (`key_id`) or tenant (`tenant_id`: members of its templates). `column` is
/// one of ours, never input.
pub(super) fn usage(conn: &Connection, column: &'static str, value: &str) -> StoreResult<Usage> {
    let sandboxes = sandbox_usage(conn, column, value)?;
    let member_column = match column {
        "key_id" => "key_id",
        _ => "template_tenant",
    };
    let (count, memory, pids): (i64, i64, i64) = conn
        .prepare_cached(&member_usage_sql(member_column))?
        .query_row([value], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    Ok(Usage {
        sandboxes: sandboxes
            .sandboxes
            .saturating_add(u64::try_from(count).unwrap_or_default()),
        memory_bytes: sandboxes
            .memory_bytes
            .saturating_add(u64::try_from(memory).unwrap_or_default()),
        pids: sandboxes
            .pids
            .saturating_add(u64::try_from(pids).unwrap_or_default()),
    })
}

/// Whether `memory` and `pids` more (one sandbox or member) fit `limits` beside `used`.
pub(super) fn check_limits(
    used: &Usage,
    limits: SandboxQuotas,
    memory: u64,
    pids: u64,
) -> StoreResult<()> {
    if let Some(limit) = limits.max_sandboxes
        && used.sandboxes.saturating_add(1) > limit
    {
        return Err(StoreError::QuotaExceeded {
            what: "concurrent sandboxes",
            limit,
            used: used.sandboxes,
            requested: 1,
        });
    }
    if let Some(limit) = limits.max_memory_bytes
        && used.memory_bytes.saturating_add(memory) > limit
    {
        return Err(StoreError::QuotaExceeded {
            what: "memory bytes",
            limit,
            used: used.memory_bytes,
            requested: memory,
        });
    }
    if let Some(limit) = limits.max_pids
        && used.pids.saturating_add(pids) > limit
    {
        return Err(StoreError::QuotaExceeded {
            what: "pids",
            limit,
            used: used.pids,
            requested: pids,
        });
    }
    Ok(())
}

/// The query of [`usage`] for warm-pool members (the store's tests check its plan).
pub(super) fn member_usage_sql(column: &'static str) -> String {
    format!(
        "SELECT count(*), coalesce(sum(memory_bytes), 0), coalesce(sum(pids), 0)
         FROM pool_members WHERE {column} = ?1"
    )
}

/// The query of [`sandbox_usage`] (the store's tests check its plan).
pub(super) fn sandbox_usage_sql(column: &'static str) -> String {
    format!(
        "SELECT count(*), coalesce(sum(memory_bytes), 0),
                coalesce(sum(ifnull(json_extract(resources, '$.pids'), 0)), 0)
         FROM sandboxes WHERE {column} = ?1 AND state IN {}",
        active_states_sql!()
    )
}

/// Usage of active sandboxes alone matching `column = value`.
fn sandbox_usage(conn: &Connection, column: &'static str, value: &str) -> StoreResult<Usage> {
    let (count, memory, pids): (i64, i64, i64) =
        conn.prepare_cached(&sandbox_usage_sql(column))?
            .query_row([value], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    Ok(Usage {
        sandboxes: u64::try_from(count).unwrap_or_default(),
        memory_bytes: u64::try_from(memory).unwrap_or_default(),
        pids: u64::try_from(pids).unwrap_or_default(),
    })
}

/// The query of [`Store::list_sandboxes`] and its arguments, for a checked `filter` (the
/// store's tests check its plan).
pub(super) fn list_query(tenant: &str, filter: &SandboxFilter) -> (String, Vec<SqlValue>) {
    let mut sql = String::from("SELECT * FROM sandboxes WHERE tenant_id = ?");
    let mut args = vec![SqlValue::Text(tenant.to_owned())];
    if !filter.states.is_empty() {
        let mut states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        states.sort_unstable();
        states.dedup();
        sql.push_str(" AND state IN (");
        sql.push_str(&vec!["?"; states.len()].join(", "));
        sql.push(')');
        args.extend(states.into_iter().map(|s| SqlValue::Text(s.to_owned())));
    }
    for (key, value) in &filter.metadata {
        // json_each rather than json_extract: a key may hold any character, including the
        // `.` and `"` that a JSON path would interpret.
        sql.push_str(
            " AND EXISTS (SELECT 1 FROM json_each(sandboxes.metadata) AS m
              WHERE m.key = ? AND m.type = 'text' AND m.value = ?)",
        );
        args.push(SqlValue::Text(key.clone()));
        args.push(SqlValue::Text(value.clone()));
    }
    if let Some(template) = &filter.template {
        sql.push_str(" AND template = ?");
        args.push(SqlValue::Text(template.clone()));
    }
    if let Some(since) = filter.created_since {
        sql.push_str(" AND created_at >= ?");
        args.push(SqlValue::Integer(since));
    }
    let (after_op, order) = if filter.newest_first {
        ("<", " ORDER BY created_at DESC, id DESC")
    } else {
        (">", " ORDER BY created_at, id")
    };
    if let Some(after) = &filter.after {
        sql.push_str(&format!(" AND (created_at, id) {after_op} (?, ?)"));
        args.push(SqlValue::Integer(after.created_at));
        args.push(SqlValue::Text(after.id.clone()));
    }
    // One more than the page, to know whether another page follows.
    sql.push_str(order);
    sql.push_str(" LIMIT ?");
    args.push(SqlValue::Integer(i64::from(filter.limit) + 1));
    (sql, args)
}

impl NewSandbox {
    /// The record this sandbox has once inserted at `created_at`.
    pub(super) fn record(&self, created_at: i64) -> SandboxRecord {
        SandboxRecord {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            key_id: self.key_id.clone(),
            template: self.template.clone(),
            state: self.state,
            metadata: self.metadata.clone(),
            resources: self.resources.clone(),
            memory_bytes: self.memory_bytes,
            created_at,
            expires_at: self.expires_at,
            ended_at: None,
            end_reason: None,
            public_traffic: self.public_traffic,
            backend: self.backend.clone(),
            plan: self.plan.clone(),
        }
    }
}

/// Checks a new sandbox's fields; returns its metadata as JSON and its memory as a column value.
pub(super) fn check_new(new: &NewSandbox) -> StoreResult<(String, i64)> {
    check_sandbox_id(&new.id)?;
    check_tenant_id(&new.tenant)?;
    check_template_name(&new.template)?;
    if let Some(key) = &new.key_id {
        check_key_id(key)?;
    }
    if let Some(key) = &new.idempotency_key {
        super::check_idempotency_key(key)?;
    }
    if !matches!(new.state, SandboxState::Starting | SandboxState::Running) {
        return Err(StoreError::invalid(
            "initial sandbox state",
            new.state.as_str(),
            "starting or running",
        ));
    }
    check_metadata(&new.metadata)?;
    if !crate::backend::is_valid_kind(&new.backend) {
        return Err(StoreError::invalid(
            "backend kind",
            &new.backend,
            "[a-z0-9-], 1 to 32 characters",
        ));
    }
    if !new.resources.is_object() {
        return Err(StoreError::BadJson {
            what: "sandbox resources",
            reason: "must be a JSON object".into(),
        });
    }
    let memory = to_i64("memory bytes", new.memory_bytes)?;
    let metadata = serde_json::to_string(&new.metadata).map_err(|e| StoreError::BadJson {
        what: "sandbox metadata",
        reason: e.to_string(),
    })?;
    Ok((metadata, memory))
}

/// The insert of [`Store::insert_sandbox_within`] (its input already checked), inside `tx`.
pub(super) fn insert_in(
    tx: &Connection,
    new: &NewSandbox,
    limits: SandboxQuotas,
    metadata: &str,
    memory: i64,
    created_at: i64,
) -> StoreResult<()> {
    require_tenant(tx, &new.tenant)?;
    if let Some(key) = &new.key_id {
        let owned = tx
            .prepare_cached("SELECT 1 FROM api_keys WHERE id = ?1 AND tenant_id = ?2")?
            .exists(params![key, new.tenant])?;
        if !owned {
            return Err(StoreError::not_found("key", key));
        }
    }
    let template = visible_template(tx, &new.tenant, &new.template)?
        .ok_or_else(|| StoreError::not_found("template", &new.template))?;
    if limits != SandboxQuotas::default() {
        let used = match &new.key_id {
            Some(key) => usage(tx, "key_id", key)?,
            None => usage(tx, "tenant_id", &new.tenant)?,
        };
        let pids = new.resources["pids"].as_u64().unwrap_or(0);
        check_limits(&used, limits, new.memory_bytes, pids)?;
    }
    let inserted = tx.execute(
        "INSERT INTO sandboxes (id, tenant_id, key_id, template, template_tenant, state,
             metadata, resources, memory_bytes, created_at, expires_at, public_traffic, backend,
             plan)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
         ON CONFLICT (id) DO NOTHING",
        params![
            new.id,
            new.tenant,
            new.key_id,
            new.template,
            template.tenant,
            new.state.as_str(),
            metadata,
            new.resources.to_string(),
            memory,
            created_at,
            new.expires_at,
            new.public_traffic,
            new.backend,
            new.plan.as_ref().map(ToString::to_string),
        ],
    )?;
    if inserted == 0 {
        return Err(StoreError::conflict("sandbox", &new.id));
    }
    if let Some(key) = &new.idempotency_key {
        super::idempotency::remember_in(tx, &new.tenant, key, &new.id, created_at)?;
    }
    Ok(())
}

fn to_i64(what: &'static str, value: u64) -> StoreResult<i64> {
    i64::try_from(value)
        .map_err(|_| StoreError::invalid(what, &value.to_string(), "at most 2^63-1"))
}

impl Store {
    /// Records a new sandbox. [`StoreError::Conflict`] if the id exists (in any tenant),
    /// [`StoreError::NotFound`] for an unknown tenant, key or template.
    pub fn insert_sandbox(&self, new: &NewSandbox) -> StoreResult<SandboxRecord> {
        self.insert_sandbox_within(new, SandboxQuotas::default())
    }

    /// Records a new sandbox unless that would take its key (or, without a key, its tenant)
    /// over `limits`: checked and inserted in one transaction, so concurrent creates cannot
    /// overshoot. Over a limit is [`StoreError::QuotaExceeded`].
    pub fn insert_sandbox_within(
        &self,
        new: &NewSandbox,
        limits: SandboxQuotas,
    ) -> StoreResult<SandboxRecord> {
        let (metadata, memory) = check_new(new)?;
        let created_at = now_ms();
        self.write(|tx| insert_in(tx, new, limits, &metadata, memory, created_at))?;
        Ok(new.record(created_at))
    }

    /// The sandbox `id` of `tenant`; another tenant's sandbox is [`StoreError::NotFound`].
    pub fn get_sandbox(&self, tenant: &str, id: &str) -> StoreResult<SandboxRecord> {
        check_tenant_id(tenant)?;
        check_sandbox_id(id)?;
        self.read(|tx| get_sandbox(tx, tenant, id))
    }

    /// One page of `tenant`'s sandboxes that match `filter`, oldest first (newest first if
    /// the filter says so).
    ///
    /// Paging is by keyset (`created_at`, id), so sandboxes created or ended between pages
    /// never make a page repeat or skip another sandbox.
    pub fn list_sandboxes(&self, tenant: &str, filter: &SandboxFilter) -> StoreResult<Page> {
        check_tenant_id(tenant)?;
        if !(1..=MAX_PAGE).contains(&filter.limit) {
            return Err(StoreError::invalid(
                "page size",
                &filter.limit.to_string(),
                format!("1 to {MAX_PAGE}"),
            ));
        }
        if filter.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(StoreError::invalid(
                "metadata filter",
                &format!("{} pairs", filter.metadata.len()),
                format!("at most {MAX_METADATA_ENTRIES} pairs"),
            ));
        }
        let (sql, args) = list_query(tenant, filter);
        let mut items = self.read(|tx| {
            let mut stmt = tx.prepare_cached(&sql)?;
            let rows = stmt.query_and_then(params_from_iter(args), SandboxRecord::from_row)?;
            rows.collect::<StoreResult<Vec<_>>>()
        })?;
        let next = cut_page(&mut items, filter.limit, |last| Cursor {
            created_at: last.created_at,
            id: last.id.clone(),
        });
        Ok(Page { items, next })
    }

    /// Moves a sandbox of `tenant` to `to`, if the state machine allows it from where it is
    /// ([`StoreError::InvalidTransition`] otherwise). Ending it (killed, failed) records the
    /// time and `reason`; a reason for any other state is [`StoreError::Invalid`].
    pub fn update_sandbox_state(
        &self,
        tenant: &str,
        id: &str,
        to: SandboxState,
        reason: Option<EndReason>,
    ) -> StoreResult<SandboxRecord> {
        check_tenant_id(tenant)?;
        check_sandbox_id(id)?;
        if let Some(reason) = &reason
            && !to.is_ended()
        {
            return Err(StoreError::invalid(
                "end reason",
                &reason.to_string(),
                format!("only a sandbox that ends has one, not one going to {to}"),
            ));
        }
        self.write(|tx| {
            let current = get_sandbox(tx, tenant, id)?;
            if !current.state.can_become(to) {
                return Err(StoreError::InvalidTransition {
                    id: id.to_owned(),
                    from: current.state,
                    to,
                });
            }
            let ended_at = to.is_ended().then(now_ms);
            let reason_text = reason.as_ref().map(ToString::to_string);
            tx.execute(
                "UPDATE sandboxes SET state = ?1, ended_at = ?2, end_reason = ?3 WHERE id = ?4",
                params![to.as_str(), ended_at, reason_text, id],
            )?;
            // A create that never ran failed: a retry with its key tries again.
            if current.state == SandboxState::Starting && to.is_ended() {
                super::idempotency::forget_in(tx, tenant, id)?;
            }
            Ok(SandboxRecord {
                state: to,
                ended_at,
                end_reason: reason,
                ..current
            })
        })
    }

    /// Sets when a sandbox of `tenant` expires (`None`: never). An ended sandbox is
    /// [`StoreError::Ended`].
    pub fn set_sandbox_expiry(
        &self,
        tenant: &str,
        id: &str,
        expires_at: Option<i64>,
    ) -> StoreResult<SandboxRecord> {
        check_tenant_id(tenant)?;
        check_sandbox_id(id)?;
        self.write(|tx| {
            let current = get_active_sandbox(tx, tenant, id)?;
            tx.execute(
                "UPDATE sandboxes SET expires_at = ?1 WHERE id = ?2",
                params![expires_at, id],
            )?;
            Ok(SandboxRecord {
                expires_at,
                ..current
            })
        })
    }

    /// Takes the time to live away from a paused sandbox of `tenant` whose time ran out by
    /// `now` (a pause at its timeout): whether it did. A sandbox resumed meanwhile (with a
    /// new time to live) or not paused is left as it is.
    pub fn clear_expired_pause(&self, tenant: &str, id: &str, now: i64) -> StoreResult<bool> {
        check_tenant_id(tenant)?;
        check_sandbox_id(id)?;
        self.write(|tx| {
            let cleared = tx.execute(
                "UPDATE sandboxes SET expires_at = NULL
                 WHERE tenant_id = ?1 AND id = ?2 AND state = 'paused' AND expires_at <= ?3",
                params![tenant, id, now],
            )?;
            Ok(cleared == 1)
        })
    }

    /// Replaces the recorded plan of a running or paused sandbox of `tenant` (a network policy
    /// changed while it runs). An ended sandbox is [`StoreError::Ended`].
    pub fn set_sandbox_plan(
        &self,
        tenant: &str,
        id: &str,
        plan: &serde_json::Value,
    ) -> StoreResult<()> {
        check_tenant_id(tenant)?;
        check_sandbox_id(id)?;
        self.write(|tx| {
            get_active_sandbox(tx, tenant, id)?;
            tx.execute(
                "UPDATE sandboxes SET plan = ?1 WHERE id = ?2",
                params![plan.to_string(), id],
            )?;
            Ok(())
        })
    }

    /// Moves the expiry of a sandbox of `tenant` to `at` unless it is already later (or never):
    /// extends only, in one transaction. An ended sandbox is [`StoreError::Ended`].
    pub fn extend_sandbox_expiry(
        &self,
        tenant: &str,
        id: &str,
        at: i64,
    ) -> StoreResult<SandboxRecord> {
        check_tenant_id(tenant)?;
        check_sandbox_id(id)?;
        self.write(|tx| {
            let current = get_active_sandbox(tx, tenant, id)?;
            // Never expiring, or expiring later already: nothing to extend.
            if current.expires_at.is_none_or(|old| old >= at) {
                return Ok(current);
            }
            tx.execute(
                "UPDATE sandboxes SET expires_at = ?1 WHERE id = ?2",
                params![at, id],
            )?;
            Ok(SandboxRecord {
                expires_at: Some(at),
                ..current
            })
        })
    }

    /// Sandboxes of every tenant that have not ended and whose `expires_at` is at or before
    /// `now`, soonest first: what the reaper kills.
    pub fn expired(&self, now: i64) -> StoreResult<Vec<SandboxRecord>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(EXPIRED_SQL)?;
            let rows = stmt.query_and_then([now], SandboxRecord::from_row)?;
            rows.collect()
        })
    }

    /// Every sandbox of every tenant that has not ended, oldest first: what a starting server
    /// finds of the previous one's.
    pub fn active_sandboxes(&self) -> StoreResult<Vec<SandboxRecord>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(concat!(
                "SELECT * FROM sandboxes WHERE state IN ",
                active_states_sql!(),
                " ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_and_then([], SandboxRecord::from_row)?;
            rows.collect()
        })
    }

    /// Marks every sandbox that has not ended as killed at `now` with reason `server_restart`,
    /// and returns their ids (sorted). A starting server calls this once, after reaping what the
    /// previous process left, since none of those sandboxes survived it.
    pub fn mark_orphaned(&self, now: i64) -> StoreResult<Vec<String>> {
        self.write(|tx| {
            // Creates that never ran failed: retries with their keys try again.
            tx.prepare_cached(
                "DELETE FROM idempotency_keys WHERE sandbox_id IN
                     (SELECT id FROM sandboxes WHERE state = 'starting')",
            )?
            .execute([])?;
            let mut stmt = tx.prepare_cached(concat!(
                "UPDATE sandboxes SET state = 'killed', ended_at = ?1, end_reason = ?2
                 WHERE state IN ",
                active_states_sql!(),
                " RETURNING id"
            ))?;
            let rows = stmt
                .query_map(params![now, EndReason::ServerRestart.to_string()], |row| {
                    row.get::<_, String>(0)
                })?;
            let mut ids = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            ids.sort_unstable();
            Ok(ids)
        })
    }

    /// What the key holds: its starting, running and paused sandboxes and their memory and
    /// pids limits, and the warm-pool members charged to it. (Paused and starting sandboxes
    /// count: they hold memory too.)
    pub fn usage_for_key(&self, key_id: &str) -> StoreResult<Usage> {
        check_key_id(key_id)?;
        self.read(|tx| usage(tx, "key_id", key_id))
    }

    /// What the tenant holds, all its keys together; see [`Store::usage_for_key`].
    pub fn usage_for_tenant(&self, tenant: &str) -> StoreResult<Usage> {
        check_tenant_id(tenant)?;
        self.read(|tx| {
            require_tenant(tx, tenant)?;
            usage(tx, "tenant_id", tenant)
        })
    }

    /// How many sandboxes are in each state, over all tenants (for metrics); every state is
    /// present.
    pub fn count_by_state(&self) -> StoreResult<BTreeMap<SandboxState, u64>> {
        self.read(|tx| {
            let mut counts: BTreeMap<SandboxState, u64> =
                SandboxState::ALL.into_iter().map(|s| (s, 0)).collect();
            let mut stmt =
                tx.prepare_cached("SELECT state, count(*) FROM sandboxes GROUP BY state")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let state: String = row.get(0)?;
                let count: i64 = row.get(1)?;
                let state = SandboxState::parse(&state).ok_or_else(|| {
                    StoreError::Corrupt(format!("unknown sandbox state {state:?}"))
                })?;
                counts.insert(state, u64::try_from(count).unwrap_or_default());
            }
            Ok(counts)
        })
    }

    /// Deletes the records of sandboxes that ended before `before`, returning how many; the
    /// server calls it now and then so history does not grow without bound.
    pub fn purge_ended(&self, before: i64) -> StoreResult<usize> {
        self.write(|tx| {
            Ok(tx.execute(
                "DELETE FROM sandboxes WHERE ended_at IS NOT NULL AND ended_at < ?1",
                [before],
            )?)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        use SandboxState::*;
        let allowed = [
            (Starting, Running),
            (Starting, Failed),
            (Starting, Killed),
            (Running, Paused),
            (Paused, Running),
            (Running, Killed),
            (Running, Failed),
            (Paused, Killed),
            (Paused, Failed),
        ];
        for from in SandboxState::ALL {
            for to in SandboxState::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from} → {to}"
                );
            }
        }
    }

    #[test]
    fn end_reasons_round_trip() {
        for reason in [
            EndReason::Ttl,
            EndReason::Deleted,
            EndReason::ServerRestart,
            EndReason::Failed("oom: killed".into()),
            EndReason::Other("shutdown".into()),
        ] {
            assert_eq!(EndReason::from(reason.to_string()), reason);
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(serde_json::from_str::<EndReason>(&json).unwrap(), reason);
        }
        assert_eq!(serde_json::to_string(&EndReason::Ttl).unwrap(), "\"ttl\"");
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let cursor = Cursor {
            created_at: 1_700_000_000_000,
            id: "abcdefghijklmnop".into(),
        };
        assert_eq!(Cursor::decode(&cursor.encode()).unwrap(), cursor);
        for bad in [
            "",
            ".",
            "x.abcdefghijklmnop",
            "1.short",
            "1.ABCDEFGHIJKLMNOPQ",
            "1",
        ] {
            assert!(
                matches!(Cursor::decode(bad), Err(StoreError::Invalid { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn states_parse() {
        for state in SandboxState::ALL {
            assert_eq!(SandboxState::parse(state.as_str()), Some(state));
        }
        assert!(SandboxState::parse("dead").is_none());
    }
}
