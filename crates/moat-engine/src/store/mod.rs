//! The durable state of `moat serve`: tenants, API keys, templates, sandboxes and snapshots in
//! embedded SQLite.
//!
//! One file, `moat.db` in the data dir, in WAL mode with `synchronous = FULL`: when a write
//! returns, it is on disk, so whatever the API acknowledged survives a crash or power loss. The
//! schema is versioned (see `schema`); a database from a newer moat is refused, not guessed at.
//!
//! # Concurrency
//!
//! A [`Store`] is meant to be shared as `Arc<Store>`. Writes go through one connection behind a
//! mutex (SQLite serialises writers anyway), each in one immediate transaction, so a failed
//! operation leaves nothing half-written. Reads use a small pool of other connections, which WAL
//! lets run beside the writer. Every call is short but blocking (a write waits for `fsync`):
//! async callers run it in `tokio::task::spawn_blocking`, or accept a block of about a
//! millisecond on a runtime thread.
//!
//! # Tenancy
//!
//! Every getter, list and change of a tenant's records takes the tenant: another tenant's record
//! is [`StoreError::NotFound`], indistinguishable from one that never existed. The few calls
//! that span tenants ([`Store::expired`], [`Store::mark_orphaned`], [`Store::authenticate`]) are
//! for the server itself.
//!
//! Timestamps are Unix milliseconds (`i64`). The store stamps `created_at`, `ended_at` and
//! `revoked_at` from the system clock; calls that compare with "now" take it as an argument.

mod error;
mod idempotency;
mod ids;
mod jobs;
mod keys;
mod pool;
mod sandboxes;
mod schema;
mod secrets;
mod snapshots;
mod templates;
mod tenants;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

pub use crate::clock::now_ms;
pub use error::{StoreError, StoreResult};
pub use idempotency::{MAX_IDEMPOTENCY_KEY, check_idempotency_key};
pub use ids::{check_sandbox_id, check_template_name, check_tenant_id, generate_sandbox_id};
pub use jobs::{
    AttemptEnd, BlobKind, JobLimits, JobRecord, JobUsage, MAX_JOB_PAGE, NewJob, Running,
    WebhookRecord,
};
pub use keys::{KeyRecord, Quotas, Role, Secret};
pub use pool::NewPoolMember;
pub use sandboxes::{
    Cursor, EndReason, MAX_PAGE, NewSandbox, Page, SandboxFilter, SandboxQuotas, SandboxRecord,
    SandboxState, Usage,
};
pub use schema::SCHEMA_VERSION;
pub use secrets::SECRET_BYTES;
pub use snapshots::{
    MAX_SNAPSHOT_NAME, NewSnapshot, SnapshotFilter, SnapshotPage, SnapshotRecord,
    check_snapshot_id, check_snapshot_name, generate_snapshot_id,
};
pub use templates::{MAX_TEMPLATES_PER_TENANT, TemplateRecord};
pub use tenants::TenantRecord;

/// How long a connection waits for another's lock (another process, a checkpoint) before
/// failing with "database is locked". Generous: writes are short, and failing is worse.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle read connections kept open; more are opened under load and closed after.
const IDLE_READERS: usize = 4;

/// The durable state: an SQLite database file (or memory, for tests).
pub struct Store {
    /// The file; `None` in memory, where reads share the writer (other connections would see
    /// another, empty database).
    path: Option<PathBuf>,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Takes a mutex even if a thread panicked while holding it: the connection inside is still
/// sound, since an unfinished transaction is rolled back when it is dropped.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Store {
    /// Opens the database at `path`, creating it (mode 0600) if missing, and migrates it to
    /// [`SCHEMA_VERSION`].
    ///
    /// The parent directory must exist. Fails with [`StoreError::TooNew`] for a database of a
    /// newer moat and [`StoreError::NotMoat`] for another program's SQLite file.
    pub fn open(path: impl AsRef<Path>) -> StoreResult<Store> {
        let path = path.as_ref().to_owned();
        // Create the file ourselves so it never exists with the umask's wider mode: it holds
        // key hashes and tenants' metadata. SQLite gives its -wal and -shm files the same mode.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|error| StoreError::Io {
                what: "cannot open database file",
                path: path.clone(),
                error,
            })?;
        let mut writer = open_connection(&path)?;
        // Migrate first: a file this build must refuse (newer, foreign) is then left as found.
        schema::migrate(&mut writer, &path)?;
        let mode: String =
            writer.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal { path, mode });
        }
        Ok(Store {
            path: Some(path),
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
        })
    }

    /// A database in memory, gone when the store is dropped: `moat run`'s and tests'.
    pub fn open_in_memory() -> StoreResult<Store> {
        let mut conn = schema::open_empty_in_memory()?;
        configure(&conn)?;
        schema::migrate(&mut conn, Path::new(":memory:"))?;
        Ok(Store {
            path: None,
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
        })
    }

    /// The database file, `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Runs `f` in one immediate transaction on the writer, committing if it succeeds: either
    /// all of an operation's changes land or none do.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> StoreResult<T>) -> StoreResult<T> {
        let mut conn = lock(&self.writer);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    /// Runs `f` in one read transaction (a consistent snapshot) on a pooled read connection.
    fn read<T>(&self, f: impl FnOnce(&Transaction<'_>) -> StoreResult<T>) -> StoreResult<T> {
        let Some(path) = &self.path else {
            let mut conn = lock(&self.writer);
            let tx = conn.transaction()?;
            return f(&tx);
        };
        let pooled = lock(&self.readers).pop();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => {
                let conn = open_connection(path)?;
                // Reads must never write, whatever a bug upstream asks.
                conn.pragma_update(None, "query_only", true)?;
                conn
            }
        };
        let result = conn.transaction().map_err(StoreError::from).and_then(|tx| {
            let value = f(&tx);
            // A read transaction has nothing to commit; ending it releases the WAL snapshot.
            drop(tx);
            value
        });
        let mut readers = lock(&self.readers);
        if readers.len() < IDLE_READERS {
            readers.push(conn);
        }
        result
    }
}

/// The first row `stmt` yields for `params`, converted by `f`; `None` if there is none.
fn first_row<T, P: rusqlite::Params>(
    stmt: &mut rusqlite::Statement<'_>,
    params: P,
    f: impl FnOnce(&rusqlite::Row<'_>) -> StoreResult<T>,
) -> StoreResult<Option<T>> {
    let mut rows = stmt.query(params)?;
    rows.next()?.map(f).transpose()
}

/// Opens one connection to an existing file and sets what every connection needs.
fn open_connection(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open_with_flags(
        path,
        // No SQLite mutex: each connection is used by one thread at a time, behind ours.
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    configure(&conn)?;
    Ok(conn)
}

/// Per-connection settings (SQLite does not keep these in the file).
fn configure(conn: &Connection) -> StoreResult<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // FULL: a commit is on disk (WAL fsynced) before it returns; NORMAL would lose the last
    // acknowledged writes on power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Statement journals and other temporary data in memory: an update of a sandbox's state
    // (which moves it between the partial indexes of active sandboxes) would otherwise create,
    // write and delete a temporary file each time, several hundred microseconds.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_is_durable_and_checks_foreign_keys() {
        let dir = tempfile::Builder::new()
            .prefix("moat-store-")
            .tempdir_in("/tmp")
            .unwrap();
        let store = Store::open(dir.path().join("moat.db")).unwrap();
        let check = |conn: &Connection| {
            let sync: i64 = conn
                .pragma_query_value(None, "synchronous", |r| r.get(0))
                .unwrap();
            assert_eq!(sync, 2, "synchronous = FULL");
            let fk: i64 = conn
                .pragma_query_value(None, "foreign_keys", |r| r.get(0))
                .unwrap();
            assert_eq!(fk, 1);
            let mode: String = conn
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        };
        check(&lock(&store.writer));
        store.list_tenants().unwrap();
        let readers = lock(&store.readers);
        assert_eq!(readers.len(), 1);
        check(&readers[0]);
        // A read connection refuses writes.
        assert!(readers[0].execute("DELETE FROM tenants", []).is_err());
    }

    /// The hot queries (listing, reaping, quotas, template guards, auth) must search an index,
    /// never scan a table that grows with every sandbox. The plans are of the very SQL the
    /// store runs, with arguments bound as it binds them.
    #[test]
    fn queries_use_indexes() {
        use rusqlite::types::Value as V;

        use super::sandboxes::{Cursor, SandboxFilter, SandboxState};

        let store = Store::open_in_memory().unwrap();
        let conn = lock(&store.writer);
        let plan = |sql: &str, args: Vec<V>| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                .unwrap();
            rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("; ")
        };
        let text = |s: &str| V::Text(s.to_owned());
        let after = Some(Cursor {
            created_at: 1,
            id: "b".into(),
        });
        let mut queries = Vec::new();
        for filter in [
            SandboxFilter::default(),
            SandboxFilter {
                after: after.clone(),
                ..SandboxFilter::default()
            },
            SandboxFilter {
                newest_first: true,
                after,
                ..SandboxFilter::default()
            },
            SandboxFilter {
                states: vec![SandboxState::Running, SandboxState::Paused],
                metadata: vec![("k".into(), "v".into())],
                template: Some("t".into()),
                created_since: Some(5),
                ..SandboxFilter::default()
            },
        ] {
            queries.push(sandboxes::list_query("a", &filter));
        }
        queries.push((sandboxes::EXPIRED_SQL.to_owned(), vec![V::Integer(5)]));
        for column in ["key_id", "tenant_id"] {
            queries.push((sandboxes::sandbox_usage_sql(column), vec![text("k")]));
        }
        for column in ["key_id", "template_tenant"] {
            queries.push((sandboxes::member_usage_sql(column), vec![text("k")]));
        }
        queries.push((
            templates::VISIBLE_TEMPLATE_SQL.to_owned(),
            vec![text("x"), text("a")],
        ));
        for tenant in [V::Null, text("a")] {
            queries.push((
                templates::TEMPLATE_IN_USE_SQL.to_owned(),
                vec![text("k"), tenant],
            ));
        }
        queries.push((keys::KEY_BY_SECRET_SQL.to_owned(), vec![V::Blob(vec![0])]));
        for (sql, args) in queries {
            let plan = plan(&sql, args);
            // A metadata filter scans json_each of the one row it tests (at most
            // MAX_METADATA_ENTRIES entries): the only scan allowed.
            let scans_a_table = plan
                .split("; ")
                .any(|step| step.starts_with("SCAN") && !step.contains("VIRTUAL TABLE"));
            assert!(
                plan.contains("USING INDEX") && !scans_a_table,
                "{sql}\n  -> {plan}"
            );
        }
    }
}
