//! The schema and its versioned migrations.
//!
//! `PRAGMA user_version` holds how many migrations a database has had. Each migration runs in
//! its own immediate transaction together with the version bump, so a crash leaves the database
//! at one version or the next, never between; two processes opening one file at once serialise
//! on the write lock and the second finds the work done. Migrations are append-only: a shipped
//! one is never edited, a change is a new one.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::error::{StoreError, StoreResult};

/// SQLite `application_id` of moat databases ("moat" in ASCII), so a foreign SQLite file is
/// refused instead of being migrated.
pub(crate) const APPLICATION_ID: i64 = 0x6d6f_6174;

/// The states in which a sandbox still holds resources, as SQL. Kept identical in the partial
/// indexes and the queries so SQLite can use those indexes.
macro_rules! active_states_sql {
    () => {
        "('starting', 'running', 'paused')"
    };
}
pub(crate) use active_states_sql;

/// Version 1: tenants, API keys, templates, sandboxes.
const V1: &str = concat!(
    r#"
CREATE TABLE tenants (
    id         TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE api_keys (
    id                  TEXT PRIMARY KEY NOT NULL,
    tenant_id           TEXT NOT NULL REFERENCES tenants (id),
    name                TEXT NOT NULL,
    secret_sha256       BLOB NOT NULL UNIQUE CHECK (length(secret_sha256) = 32),
    role                TEXT NOT NULL CHECK (role IN ('admin', 'user')),
    created_at          INTEGER NOT NULL,
    revoked_at          INTEGER,
    max_sandboxes       INTEGER CHECK (max_sandboxes >= 0),
    max_memory_bytes    INTEGER CHECK (max_memory_bytes >= 0),
    requests_per_minute INTEGER CHECK (requests_per_minute >= 0)
) STRICT;
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, created_at, id);

-- tenant_id NULL: a built-in template, visible to every tenant. Names are unique per tenant
-- (NULL counted as one tenant, which a plain UNIQUE would not do).
CREATE TABLE templates (
    tenant_id  TEXT REFERENCES tenants (id),
    name       TEXT NOT NULL,
    spec       TEXT NOT NULL CHECK (json_valid(spec)),
    created_at INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX templates_by_tenant_name ON templates (ifnull(tenant_id, ''), name);
CREATE INDEX templates_by_name ON templates (name);

-- template_tenant: the owner of the template the sandbox was made from (NULL: built-in), so
-- "is this template in use" is exact. No foreign key: a forced template delete keeps the
-- sandbox's record of where it came from.
-- memory_bytes: the memory limit, a column of its own because quotas sum it.
CREATE TABLE sandboxes (
    id              TEXT PRIMARY KEY NOT NULL,
    tenant_id       TEXT NOT NULL REFERENCES tenants (id),
    key_id          TEXT REFERENCES api_keys (id),
    template        TEXT NOT NULL,
    template_tenant TEXT,
    state           TEXT NOT NULL
                    CHECK (state IN ('starting', 'running', 'paused', 'killed', 'failed')),
    metadata        TEXT NOT NULL CHECK (json_valid(metadata)),
    resources       TEXT NOT NULL CHECK (json_valid(resources)),
    memory_bytes    INTEGER NOT NULL CHECK (memory_bytes >= 0),
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER,
    ended_at        INTEGER,
    end_reason      TEXT
) STRICT;
CREATE INDEX sandboxes_by_tenant ON sandboxes (tenant_id, created_at, id);
CREATE INDEX sandboxes_active ON sandboxes (expires_at) WHERE state IN "#,
    active_states_sql!(),
    r#";
CREATE INDEX sandboxes_active_by_template ON sandboxes (template, template_tenant)
    WHERE state IN "#,
    active_states_sql!(),
    r#";
CREATE INDEX sandboxes_active_by_key ON sandboxes (key_id) WHERE state IN "#,
    active_states_sql!(),
    r#";
CREATE INDEX sandboxes_active_by_tenant ON sandboxes (tenant_id) WHERE state IN "#,
    active_states_sql!(),
    ";\n"
);

/// Every migration, in order; the database's `user_version` is how many of them it has had.
/// Warm-pool members: sandboxes started ahead of a claim, owned by no tenant yet. Recorded
/// before the backend makes them so a restart after a crash can reap them; a claim moves one
/// into `sandboxes` in the same transaction that deletes it here.
const V2: &str = r#"
CREATE TABLE pool_members (
    id              TEXT PRIMARY KEY NOT NULL,
    template        TEXT NOT NULL,
    template_tenant TEXT,
    created_at      INTEGER NOT NULL
) STRICT;
"#;

/// Version 3: server secrets (the key sandbox access tokens are derived from) and the
/// idempotency keys of sandbox creates (the E2B API's `Idempotency-Key`).
const V3: &str = r#"
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY NOT NULL,
    value      BLOB NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
CREATE TABLE idempotency_keys (
    tenant_id  TEXT NOT NULL REFERENCES tenants (id),
    key        TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, key)
) STRICT;
"#;

/// Version 4: snapshots, each a tar archive of a sandbox's writable layer in the snapshot
/// directory. `sandbox_id` has no foreign key: ended sandboxes' records are purged, their
/// snapshots stay. `resources` and `env` are what a sandbox made from it gets.
const V4: &str = r#"
CREATE TABLE snapshots (
    id          TEXT PRIMARY KEY NOT NULL,
    tenant_id   TEXT NOT NULL REFERENCES tenants (id),
    name        TEXT,
    sandbox_id  TEXT NOT NULL,
    template    TEXT NOT NULL,
    resources   TEXT NOT NULL CHECK (json_valid(resources)),
    env         TEXT NOT NULL CHECK (json_valid(env)),
    size_bytes  INTEGER NOT NULL CHECK (size_bytes >= 0),
    created_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX snapshots_by_tenant ON snapshots (tenant_id, created_at, id);
"#;

/// Version 5: whether a sandbox's own services (ports other than envd's and the code
/// interpreter's) are reachable without its traffic access token. Sandboxes recorded before
/// were reachable only with a token, so they stay private.
const V5: &str = r#"
ALTER TABLE sandboxes ADD COLUMN public_traffic INTEGER NOT NULL DEFAULT 0
    CHECK (public_traffic IN (0, 1));
"#;

/// Version 6: more key quotas, and warm-pool members charged to them.
/// `api_keys.max_pids`: the sum of the pids limits of the key's active sandboxes (each
/// sandbox's limit is in its `resources`). `api_keys.max_snapshot_bytes`: the bytes of
/// snapshot archives the key's tenant may keep when the key makes one. `templates.key_id`: the
/// key that made the template, whose quotas its warm pool's members count against (no foreign key, like
/// `sandboxes.template_tenant`: a record of who, kept as it was). `pool_members` keep the
/// limits they are charged, and are found by their template's tenant for its quotas.
const V6: &str = r#"
ALTER TABLE api_keys ADD COLUMN max_pids INTEGER CHECK (max_pids >= 0);
ALTER TABLE api_keys ADD COLUMN max_snapshot_bytes INTEGER CHECK (max_snapshot_bytes >= 0);
ALTER TABLE templates ADD COLUMN key_id TEXT;
ALTER TABLE pool_members ADD COLUMN key_id TEXT;
ALTER TABLE pool_members ADD COLUMN memory_bytes INTEGER NOT NULL DEFAULT 0
    CHECK (memory_bytes >= 0);
ALTER TABLE pool_members ADD COLUMN pids INTEGER NOT NULL DEFAULT 0 CHECK (pids >= 0);
CREATE INDEX pool_members_by_key ON pool_members (key_id);
CREATE INDEX pool_members_by_template_tenant ON pool_members (template_tenant);
"#;

/// Version 7: the kind of isolation backend that made each sandbox (a template may name one;
/// the server has a default), so a restarted server reaps or adopts it with that backend.
/// Sandboxes recorded before were all made by the only backend there was.
const V7: &str = r#"
ALTER TABLE sandboxes ADD COLUMN backend TEXT NOT NULL DEFAULT 'native';
"#;

/// Version 8: each sandbox's resolved plan (the engine's JSON of everything it was made with),
/// which what later needs its settings reads instead of deriving them again, and each
/// template's limits in their typed form, parsed once when it was written. Rows written before
/// have neither (NULL): the engine falls back to the `resources` column and the spec's strings.
const V8: &str = r#"
ALTER TABLE sandboxes ADD COLUMN plan TEXT CHECK (plan IS NULL OR json_valid(plan));
ALTER TABLE templates ADD COLUMN limits TEXT CHECK (limits IS NULL OR json_valid(limits));
"#;
/// Snapshots with memory (a backend's checkpoint beside the files), and the backend that made
/// them, which alone can restore them.
const V9: &str = r#"
ALTER TABLE snapshots ADD COLUMN memory INTEGER NOT NULL DEFAULT 0 CHECK (memory IN (0, 1));
ALTER TABLE snapshots ADD COLUMN backend TEXT NOT NULL DEFAULT 'native';
"#;
/// Asynchronous jobs, and the blobs they and their owners keep (see `jobs`). A blob's
/// object in the blob store stays while any row names its digest.
macro_rules! v10_sql {
    () => {
        r#"
CREATE TABLE jobs (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    tenant_id       TEXT NOT NULL REFERENCES tenants (id),
    key_id          TEXT,
    idempotency_key TEXT,
    request_sha256  BLOB NOT NULL CHECK (length(request_sha256) = 32),
    template        TEXT NOT NULL,
    spec            TEXT NOT NULL CHECK (json_valid(spec)),
    state           TEXT NOT NULL CHECK (state IN
                        ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out')),
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts    INTEGER NOT NULL CHECK (max_attempts >= 1),
    not_before      INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    result          TEXT CHECK (result IS NULL OR json_valid(result))
) STRICT;
CREATE UNIQUE INDEX jobs_by_idempotency_key ON jobs (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_queued ON jobs (tenant_id, seq) WHERE state = 'queued';
CREATE INDEX jobs_by_tenant ON jobs (tenant_id, seq);
CREATE INDEX jobs_running ON jobs (state) WHERE state = 'running';
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE blobs (
    tenant_id  TEXT NOT NULL REFERENCES tenants (id),
    kind       TEXT NOT NULL CHECK (kind IN ('upload', 'input', 'output')),
    job_id     TEXT NOT NULL DEFAULT '',
    digest     TEXT NOT NULL,
    size       INTEGER NOT NULL CHECK (size >= 0),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, kind, job_id, digest)
) STRICT;
CREATE INDEX blobs_by_digest ON blobs (digest);
CREATE INDEX blobs_by_job ON blobs (job_id) WHERE job_id != '';
"#
    };
}
const V10: &str = v10_sql!();
/// Jobs' completion webhooks: armed (`next_at`) when the job ends, retried until delivered or
/// given up.
macro_rules! v11_sql {
    () => {
        r#"
CREATE TABLE job_webhooks (
    job_id       TEXT PRIMARY KEY NOT NULL,
    tenant_id    TEXT NOT NULL REFERENCES tenants (id),
    url          TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_at      INTEGER,
    delivered_at INTEGER,
    last_error   TEXT
) STRICT;
CREATE INDEX job_webhooks_due ON job_webhooks (next_at) WHERE next_at IS NOT NULL;
"#
    };
}
const V11: &str = v11_sql!();
/// Version 12: the build that made each template (a tag copied from another template keeps
/// that template's build), so a template's tags can say which build each names and a build's
/// id can name the template it made.
const V12: &str = r#"
ALTER TABLE templates ADD COLUMN build_id TEXT;
"#;
/// Version 13: what each tenant's jobs keep in the database (their count, and the bytes of
/// their recorded spec and result), kept by triggers so that a submit checks its tenant's
/// room in one row's read; counted from the jobs already there.
macro_rules! v13_sql {
    () => {
        r#"
CREATE TABLE job_usage (
    tenant_id TEXT PRIMARY KEY NOT NULL REFERENCES tenants (id),
    jobs      INTEGER NOT NULL DEFAULT 0,
    bytes     INTEGER NOT NULL DEFAULT 0
) STRICT;
INSERT INTO job_usage (tenant_id, jobs, bytes)
    SELECT tenant_id, count(*),
           sum(length(CAST(spec AS BLOB)) + coalesce(length(CAST(result AS BLOB)), 0))
    FROM jobs GROUP BY tenant_id;
CREATE TRIGGER job_usage_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO job_usage (tenant_id, jobs, bytes)
        VALUES (new.tenant_id, 1,
                length(CAST(new.spec AS BLOB)) + coalesce(length(CAST(new.result AS BLOB)), 0))
        ON CONFLICT (tenant_id) DO UPDATE SET jobs = jobs + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER job_usage_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_usage SET jobs = jobs - 1,
        bytes = bytes - length(CAST(old.spec AS BLOB)) - coalesce(length(CAST(old.result AS BLOB)), 0)
        WHERE tenant_id = old.tenant_id;
END;
CREATE TRIGGER job_usage_result AFTER UPDATE OF result ON jobs BEGIN
    UPDATE job_usage SET bytes = bytes + coalesce(length(CAST(new.result AS BLOB)), 0)
        - coalesce(length(CAST(old.result AS BLOB)), 0)
        WHERE tenant_id = new.tenant_id;
END;
"#
    };
}
const V13: &str = v13_sql!();
/// The whole schema at [`SCHEMA_VERSION`], what [`MIGRATIONS`] make one after another, in one
/// script for a fresh database: a fresh store (every `moat run` opens one in memory) takes about
/// 1 ms instead of the 4–6 ms that the `ALTER TABLE`s of the migrations cost (each re-reads the
/// whole schema). `a_fresh_schema_is_the_migrated_one` keeps the two equal: a new migration must
/// be written here too.
const CURRENT: &str = concat!(
    r#"
CREATE TABLE tenants (
    id         TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE api_keys (
    id                  TEXT PRIMARY KEY NOT NULL,
    tenant_id           TEXT NOT NULL REFERENCES tenants (id),
    name                TEXT NOT NULL,
    secret_sha256       BLOB NOT NULL UNIQUE CHECK (length(secret_sha256) = 32),
    role                TEXT NOT NULL CHECK (role IN ('admin', 'user')),
    created_at          INTEGER NOT NULL,
    revoked_at          INTEGER,
    max_sandboxes       INTEGER CHECK (max_sandboxes >= 0),
    max_memory_bytes    INTEGER CHECK (max_memory_bytes >= 0),
    requests_per_minute INTEGER CHECK (requests_per_minute >= 0),
    max_pids INTEGER CHECK (max_pids >= 0),
    max_snapshot_bytes INTEGER CHECK (max_snapshot_bytes >= 0)
) STRICT;
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, created_at, id);

CREATE TABLE templates (
    tenant_id  TEXT REFERENCES tenants (id),
    name       TEXT NOT NULL,
    spec       TEXT NOT NULL CHECK (json_valid(spec)),
    created_at INTEGER NOT NULL,
    key_id TEXT,
    limits TEXT CHECK (limits IS NULL OR json_valid(limits)),
    build_id TEXT
) STRICT;
CREATE UNIQUE INDEX templates_by_tenant_name ON templates (ifnull(tenant_id, ''), name);
CREATE INDEX templates_by_name ON templates (name);

CREATE TABLE sandboxes (
    id              TEXT PRIMARY KEY NOT NULL,
    tenant_id       TEXT NOT NULL REFERENCES tenants (id),
    key_id          TEXT REFERENCES api_keys (id),
    template        TEXT NOT NULL,
    template_tenant TEXT,
    state           TEXT NOT NULL
                    CHECK (state IN ('starting', 'running', 'paused', 'killed', 'failed')),
    metadata        TEXT NOT NULL CHECK (json_valid(metadata)),
    resources       TEXT NOT NULL CHECK (json_valid(resources)),
    memory_bytes    INTEGER NOT NULL CHECK (memory_bytes >= 0),
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER,
    ended_at        INTEGER,
    end_reason      TEXT,
    public_traffic INTEGER NOT NULL DEFAULT 0
    CHECK (public_traffic IN (0, 1)),
    backend TEXT NOT NULL DEFAULT 'native',
    plan TEXT CHECK (plan IS NULL OR json_valid(plan))
) STRICT;
CREATE INDEX sandboxes_by_tenant ON sandboxes (tenant_id, created_at, id);
CREATE INDEX sandboxes_active ON sandboxes (expires_at) WHERE state IN "#,
    active_states_sql!(),
    r#";
CREATE INDEX sandboxes_active_by_template ON sandboxes (template, template_tenant)
    WHERE state IN "#,
    active_states_sql!(),
    r#";
CREATE INDEX sandboxes_active_by_key ON sandboxes (key_id) WHERE state IN "#,
    active_states_sql!(),
    r#";
CREATE INDEX sandboxes_active_by_tenant ON sandboxes (tenant_id) WHERE state IN "#,
    active_states_sql!(),
    r#";

CREATE TABLE pool_members (
    id              TEXT PRIMARY KEY NOT NULL,
    template        TEXT NOT NULL,
    template_tenant TEXT,
    created_at      INTEGER NOT NULL,
    key_id TEXT,
    memory_bytes INTEGER NOT NULL DEFAULT 0
    CHECK (memory_bytes >= 0),
    pids INTEGER NOT NULL DEFAULT 0 CHECK (pids >= 0)
) STRICT;
CREATE INDEX pool_members_by_key ON pool_members (key_id);
CREATE INDEX pool_members_by_template_tenant ON pool_members (template_tenant);

CREATE TABLE secrets (
    name       TEXT PRIMARY KEY NOT NULL,
    value      BLOB NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
CREATE TABLE idempotency_keys (
    tenant_id  TEXT NOT NULL REFERENCES tenants (id),
    key        TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, key)
) STRICT;

CREATE TABLE snapshots (
    id          TEXT PRIMARY KEY NOT NULL,
    tenant_id   TEXT NOT NULL REFERENCES tenants (id),
    name        TEXT,
    sandbox_id  TEXT NOT NULL,
    template    TEXT NOT NULL,
    resources   TEXT NOT NULL CHECK (json_valid(resources)),
    env         TEXT NOT NULL CHECK (json_valid(env)),
    size_bytes  INTEGER NOT NULL CHECK (size_bytes >= 0),
    created_at  INTEGER NOT NULL,
    memory INTEGER NOT NULL DEFAULT 0 CHECK (memory IN (0, 1)),
    backend TEXT NOT NULL DEFAULT 'native'
) STRICT;
CREATE INDEX snapshots_by_tenant ON snapshots (tenant_id, created_at, id);
"#,
    v10_sql!(),
    v11_sql!(),
    v13_sql!()
);

/// An empty database at [`SCHEMA_VERSION`] (what [`migrate`] makes of a fresh one, with 1 KiB
/// pages), serialized: [`open_empty_in_memory`] loads it instead of running [`CURRENT`], which
/// spares every `moat run` the parsing and planning of each `CREATE` (about 0.7 ms of its start).
/// `the_empty_image_is_the_current_schema` keeps it equal to [`CURRENT`] and says how to write it
/// again after a schema change.
const EMPTY_IMAGE: &[u8] = include_bytes!("empty.db");

/// A database in memory with today's schema, loaded from [`EMPTY_IMAGE`]; [`migrate`] still
/// checks it.
pub(crate) fn open_empty_in_memory() -> StoreResult<Connection> {
    let mut conn = Connection::open_in_memory()?;
    conn.deserialize_read_exact(rusqlite::MAIN_DB, EMPTY_IMAGE, EMPTY_IMAGE.len(), false)?;
    Ok(conn)
}

const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11, V12, V13];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database at `path` up to [`SCHEMA_VERSION`], refusing newer and foreign files.
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> StoreResult<()> {
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
        let application_id: i64 =
            tx.pragma_query_value(None, "application_id", |row| row.get(0))?;
        // A fresh file has both at 0; anything else must carry our id.
        if application_id != APPLICATION_ID && (application_id != 0 || version != 0) {
            return Err(StoreError::NotMoat {
                path: path.to_owned(),
                application_id,
            });
        }
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: path.to_owned(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let Some(migration) = usize::try_from(version)
            .ok()
            .and_then(|v| MIGRATIONS.get(v))
        else {
            // Up to date (or a negative version, which only a hand edit makes).
            if version < 0 {
                return Err(StoreError::Corrupt(format!(
                    "schema version {version} is negative"
                )));
            }
            return Ok(());
        };
        if version == 0 {
            // A fresh file that already has tables is someone else's database.
            let tables: i64 = tx.query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
                [],
                |row| row.get(0),
            )?;
            if tables > 0 {
                return Err(StoreError::NotMoat {
                    path: path.to_owned(),
                    application_id,
                });
            }
            tx.pragma_update(None, "application_id", APPLICATION_ID)?;
            // A fresh database gets today's schema at once.
            tx.execute_batch(CURRENT)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            tx.commit()?;
            tracing::info!(path = %path.display(), version = SCHEMA_VERSION, "created the database");
            return Ok(());
        }
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
        tracing::info!(path = %path.display(), version = version + 1, "migrated the database");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sandboxes_recorded_before_version_7_were_made_by_the_native_backend() {
        let mut conn = Connection::open_in_memory().unwrap();
        // A database as version 6 left it, with one sandbox.
        conn.pragma_update(None, "application_id", APPLICATION_ID)
            .unwrap();
        for m in &MIGRATIONS[..6] {
            conn.execute_batch(m).unwrap();
        }
        conn.pragma_update(None, "user_version", 6).unwrap();
        conn.execute_batch(
            "INSERT INTO tenants VALUES ('a', 'A', 0);
             INSERT INTO templates (tenant_id, name, spec, created_at)
                 VALUES (NULL, 'host', '{\"rootfs\":\"host\"}', 0);
             INSERT INTO sandboxes (id, tenant_id, template, state, metadata, resources,
                 memory_bytes, created_at)
                 VALUES ('sbx', 'a', 'host', 'running', '{}', '{}', 0, 0);",
        )
        .unwrap();
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let backend: String = conn
            .query_row("SELECT backend FROM sandboxes WHERE id = 'sbx'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(backend, "native");
        // Nor did they have a plan: the column is there, empty.
        let plan: Option<String> = conn
            .query_row("SELECT plan FROM sandboxes WHERE id = 'sbx'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(plan, None);
    }

    #[test]
    fn jobs_recorded_before_version_13_are_counted_by_the_migration() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "application_id", APPLICATION_ID)
            .unwrap();
        for m in &MIGRATIONS[..12] {
            conn.execute_batch(m).unwrap();
        }
        conn.pragma_update(None, "user_version", 12).unwrap();
        conn.execute_batch(
            "INSERT INTO tenants VALUES ('a', 'A', 0);
             INSERT INTO jobs (id, tenant_id, request_sha256, template, spec, state,
                 max_attempts, not_before, created_at, result)
                 VALUES ('j1', 'a', zeroblob(32), 'host', '{\"é\":1}', 'succeeded', 1, 0, 0,
                         '{}'),
                        ('j2', 'a', zeroblob(32), 'host', '{}', 'queued', 1, 0, 0, NULL);",
        )
        .unwrap();
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        let usage: (i64, i64) = conn
            .query_row(
                "SELECT jobs, bytes FROM job_usage WHERE tenant_id = 'a'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        // Bytes, not characters: `é` is two.
        assert_eq!(usage, (2, 8 + 2 + 2));
    }

    /// The schema of a database: every table's and index's SQL with its white space collapsed
    /// (an `ALTER TABLE … ADD COLUMN` splices the column's text into its table's SQL).
    fn schema_of(conn: &Connection) -> Vec<(String, String)> {
        let mut stmt = conn
            .prepare("SELECT name, sql FROM sqlite_schema WHERE sql IS NOT NULL ORDER BY name")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .unwrap()
            .map(|r| {
                let (name, sql) = r.unwrap();
                let words: Vec<&str> = sql.split_whitespace().collect();
                (
                    name,
                    words
                        .join(" ")
                        .replace("( ", "(")
                        .replace(" )", ")")
                        .replace(" ,", ","),
                )
            })
            .collect()
    }

    /// The page size of [`EMPTY_IMAGE`]: small, for a small embedded image and a small store.
    const EMPTY_IMAGE_PAGE_SIZE: i64 = 1024;

    /// A fresh database as [`migrate`] makes it, serialized as [`EMPTY_IMAGE`] is.
    fn fresh_image() -> Vec<u8> {
        let mut fresh = Connection::open_in_memory().unwrap();
        fresh
            .pragma_update(None, "page_size", EMPTY_IMAGE_PAGE_SIZE)
            .unwrap();
        migrate(&mut fresh, Path::new(":memory:")).unwrap();
        fresh.serialize(rusqlite::MAIN_DB).unwrap().to_vec()
    }

    #[test]
    fn the_empty_image_is_the_current_schema() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/store/empty.db");
        if std::env::var_os("MOAT_WRITE_EMPTY_DB").is_some() {
            std::fs::write(path, fresh_image()).unwrap();
        }
        let mut loaded = open_empty_in_memory().unwrap();
        let mut fresh = Connection::open_in_memory().unwrap();
        migrate(&mut fresh, Path::new(":memory:")).unwrap();
        let pragma = |c: &Connection, p: &str| -> i64 {
            c.pragma_query_value(None, p, |r| r.get(0)).unwrap()
        };
        let hint = format!(
            "{path} is not today's schema: write it again with \
             `MOAT_WRITE_EMPTY_DB=1 cargo test -p moat-engine the_empty_image_is_the_current_schema`, \
             then run the test again (the image is compiled in)"
        );
        assert_eq!(schema_of(&loaded), schema_of(&fresh), "{hint}");
        for p in ["user_version", "application_id"] {
            assert_eq!(pragma(&loaded, p), pragma(&fresh, p), "{p}: {hint}");
        }
        assert_eq!(
            pragma(&loaded, "page_size"),
            EMPTY_IMAGE_PAGE_SIZE,
            "{hint}"
        );
        // And it is a database migrate takes as it is, and that can be written.
        migrate(&mut loaded, Path::new(":memory:")).unwrap();
        assert_eq!(schema_of(&loaded), schema_of(&fresh));
        loaded
            .execute("INSERT INTO tenants VALUES ('t', 't', 1)", [])
            .unwrap();
    }

    #[test]
    fn a_fresh_schema_is_the_migrated_one() {
        let mut fresh = Connection::open_in_memory().unwrap();
        migrate(&mut fresh, Path::new(":memory:")).unwrap();
        let mut migrated = Connection::open_in_memory().unwrap();
        migrated
            .pragma_update(None, "application_id", APPLICATION_ID)
            .unwrap();
        for m in MIGRATIONS {
            migrated.execute_batch(m).unwrap();
        }
        migrated
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .unwrap();
        let (fresh_schema, migrated_schema) = (schema_of(&fresh), schema_of(&migrated));
        assert!(fresh_schema.len() >= 8, "{fresh_schema:?}");
        for (f, m) in fresh_schema.iter().zip(&migrated_schema) {
            assert_eq!(f, m, "CURRENT differs from the migrations");
        }
        assert_eq!(fresh_schema.len(), migrated_schema.len());
        let version = |c: &Connection| -> i64 {
            c.pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap()
        };
        assert_eq!(version(&fresh), SCHEMA_VERSION);
        // And migrating the migrated one again changes nothing.
        migrate(&mut migrated, Path::new(":memory:")).unwrap();
        assert_eq!(schema_of(&migrated), migrated_schema);
    }
}
