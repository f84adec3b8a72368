//! The store against real database files under /tmp.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moat_engine::store::{
    Cursor, EndReason, KeyRecord, MAX_TEMPLATES_PER_TENANT, NewSandbox, Quotas, Role,
    SCHEMA_VERSION, SandboxFilter, SandboxQuotas, SandboxRecord, SandboxState, Store, StoreError,
    generate_sandbox_id,
};
use serde_json::json;

fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("moat-store-")
        .tempdir_in("/tmp")
        .unwrap();
    let path = dir.path().join("moat.db");
    (dir, path)
}

/// A store with tenants `acme` and `umbrella`, one user key each, and the built-in `host`.
fn fixture(path: &Path) -> (Store, KeyRecord, KeyRecord) {
    let store = Store::open(path).unwrap();
    store.create_tenant("acme", "Acme Corp").unwrap();
    store.create_tenant("umbrella", "Umbrella").unwrap();
    let (acme_key, _) = store
        .create_key("acme", "ci", Role::User, Quotas::default())
        .unwrap();
    let (umbrella_key, _) = store
        .create_key("umbrella", "ci", Role::User, Quotas::default())
        .unwrap();
    store
        .create_template(None, "host", &json!({"rootfs": "host"}))
        .unwrap();
    (store, acme_key, umbrella_key)
}

fn new_sandbox(tenant: &str, key: Option<&KeyRecord>, template: &str) -> NewSandbox {
    NewSandbox {
        id: generate_sandbox_id().unwrap(),
        tenant: tenant.to_owned(),
        key_id: key.map(|k| k.id.clone()),
        template: template.to_owned(),
        state: SandboxState::Starting,
        metadata: BTreeMap::new(),
        resources: json!({"memory": "256M"}),
        memory_bytes: 256 << 20,
        expires_at: None,
        public_traffic: true,
        backend: "native".into(),
        plan: None,
        idempotency_key: None,
    }
}

fn raw(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

fn user_version(path: &Path) -> i64 {
    raw(path)
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn store_is_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
}

#[test]
fn migrates_from_empty_and_reopens_idempotently() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    store.create_tenant("acme", "Acme").unwrap();
    drop(store);
    assert_eq!(user_version(&path), SCHEMA_VERSION);
    let journal: String = raw(&path)
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");

    for _ in 0..3 {
        let store = Store::open(&path).unwrap();
        assert_eq!(store.list_tenants().unwrap().len(), 1);
    }
    assert_eq!(user_version(&path), SCHEMA_VERSION);
}

#[test]
fn missing_parent_directory_is_a_clear_error() {
    let err = Store::open("/tmp/moat-no-such-dir/deeper/moat.db").unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
}

#[test]
fn newer_schema_is_refused() {
    let (_dir, path) = temp_db();
    drop(Store::open(&path).unwrap());
    raw(&path)
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    let err = Store::open(&path).unwrap_err();
    match &err {
        StoreError::TooNew {
            found, supported, ..
        } => {
            assert_eq!(*found, SCHEMA_VERSION + 1);
            assert_eq!(*supported, SCHEMA_VERSION);
        }
        other => panic!("expected TooNew, got {other:?}"),
    }
    assert!(err.to_string().contains("newer"), "{err}");
    // Refusing did not touch it.
    assert_eq!(user_version(&path), SCHEMA_VERSION + 1);
}

#[test]
fn foreign_databases_are_refused() {
    let (_dir, path) = temp_db();
    raw(&path)
        .execute_batch("CREATE TABLE notes (body TEXT);")
        .unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::NotMoat { .. }), "{err}");
    // Nothing was added to it.
    let tables: i64 = raw(&path)
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 1);
}

#[test]
fn data_survives_closing_and_reopening() {
    let (_dir, path) = temp_db();
    let (store, acme_key, _) = fixture(&path);
    let (admin, secret) = store
        .create_key("acme", "admin", Role::Admin, Quotas::default())
        .unwrap();
    store
        .create_template(Some("acme"), "py", &json!({"image": "python"}))
        .unwrap();
    let mut new = new_sandbox("acme", Some(&acme_key), "py");
    new.metadata.insert("owner".into(), "ana".into());
    new.expires_at = Some(123);
    let sandbox = store.insert_sandbox(&new).unwrap();
    store
        .update_sandbox_state("acme", &sandbox.id, SandboxState::Running, None)
        .unwrap();
    drop(store);

    let store = Store::open(&path).unwrap();
    assert_eq!(store.list_tenants().unwrap().len(), 2);
    assert_eq!(store.authenticate(secret.expose()).unwrap(), Some(admin));
    assert!(store.has_admin_key().unwrap());
    assert_eq!(
        store.get_template("acme", "py").unwrap().spec,
        json!({"image": "python"})
    );
    let got = store.get_sandbox("acme", &sandbox.id).unwrap();
    assert_eq!(got.state, SandboxState::Running);
    assert_eq!(got.metadata, new.metadata);
    assert_eq!(got.expires_at, Some(123));
    assert_eq!(
        got,
        SandboxRecord {
            state: SandboxState::Running,
            ..sandbox
        }
    );
}

#[test]
fn in_memory_store_works() {
    let store = Store::open_in_memory().unwrap();
    store.create_tenant("acme", "Acme").unwrap();
    store.create_template(None, "host", &json!({})).unwrap();
    let sandbox = store
        .insert_sandbox(&new_sandbox("acme", None, "host"))
        .unwrap();
    assert_eq!(store.get_sandbox("acme", &sandbox.id).unwrap(), sandbox);
    assert!(store.path().is_none());
}

#[test]
fn tenants_are_validated_and_unique() {
    let store = Store::open_in_memory().unwrap();
    let acme = store.create_tenant("acme", "Acme").unwrap();
    assert!(matches!(
        store.create_tenant("acme", "Again"),
        Err(StoreError::Conflict { .. })
    ));
    for bad in ["", "Acme", "a-b", &"a".repeat(65)] {
        assert!(matches!(
            store.create_tenant(bad, "x"),
            Err(StoreError::Invalid { .. })
        ));
    }
    assert!(matches!(
        store.create_tenant("ok", ""),
        Err(StoreError::Invalid { .. })
    ));
    assert_eq!(store.get_tenant("acme").unwrap(), acme);
    assert!(matches!(
        store.get_tenant("nobody"),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.list_tenants().unwrap(), vec![acme]);
}

#[test]
fn keys_authenticate_by_hash_and_revoke() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    store.create_tenant("acme", "Acme").unwrap();
    assert!(!store.has_admin_key().unwrap());
    let quotas = Quotas {
        max_sandboxes: Some(10),
        max_memory_bytes: Some(8 << 30),
        requests_per_minute: None,
        ..Quotas::default()
    };
    let (key, secret) = store.create_key("acme", "ci", Role::User, quotas).unwrap();
    assert!(secret.expose().starts_with("moat_"));
    assert_eq!(secret.expose().len(), 45);
    assert!(key.id.starts_with("key_") && key.id.len() == 20);
    assert_eq!(key.quotas, quotas);
    assert!(!format!("{secret:?}").contains(secret.expose()));
    assert!(!store.has_admin_key().unwrap());

    assert_eq!(
        store.authenticate(secret.expose()).unwrap(),
        Some(key.clone())
    );
    // Wrong secrets: another well-formed one, a one-character change, garbage, empty.
    let (_, other_secret) = store
        .create_key("acme", "other", Role::User, Quotas::default())
        .unwrap();
    store
        .revoke_key(
            "acme",
            &store
                .authenticate(other_secret.expose())
                .unwrap()
                .unwrap()
                .id,
        )
        .unwrap();
    let mut altered = secret.expose().to_owned();
    let last = if altered.ends_with('a') { "b" } else { "a" };
    altered.replace_range(44.., last);
    for wrong in [
        "moat_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        altered.as_str(),
        "Bearer nonsense",
        "",
        other_secret.expose(),
    ] {
        assert_eq!(store.authenticate(wrong).unwrap(), None, "{wrong:?}");
    }

    // The secret is nowhere on disk, in the WAL or after the checkpoint at close.
    let find = |file: &Path| -> bool {
        let bytes = std::fs::read(file).unwrap_or_default();
        bytes
            .windows(secret.expose().len())
            .any(|w| w == secret.expose().as_bytes())
    };
    let wal = path.with_file_name("moat.db-wal");
    assert!(!find(&path) && !find(&wal));

    let revoked = store.revoke_key("acme", &key.id).unwrap();
    let revoked_at = revoked.revoked_at.unwrap();
    assert_eq!(store.authenticate(secret.expose()).unwrap(), None);
    // Idempotent: a second revoke keeps the first time.
    assert_eq!(
        store.revoke_key("acme", &key.id).unwrap().revoked_at,
        Some(revoked_at)
    );
    assert_eq!(store.list_keys("acme").unwrap().len(), 2);
    assert!(matches!(
        store.revoke_key("acme", "key_nope"),
        Err(StoreError::Invalid { .. })
    ));
    assert!(matches!(
        store.revoke_key("acme", "key_aaaaaaaaaaaaaaaa"),
        Err(StoreError::NotFound { .. })
    ));

    let (_, admin_secret) = store
        .create_key("acme", "root", Role::Admin, Quotas::default())
        .unwrap();
    assert!(store.has_admin_key().unwrap());
    assert_eq!(
        store
            .authenticate(admin_secret.expose())
            .unwrap()
            .unwrap()
            .role,
        Role::Admin
    );
    assert!(matches!(
        store.create_key("nobody", "x", Role::User, Quotas::default()),
        Err(StoreError::NotFound { kind: "tenant", .. })
    ));
    drop(store);
    assert!(!find(&path) && !find(&wal));
}

#[test]
fn tenants_never_see_each_other() {
    let (_dir, path) = temp_db();
    let (store, acme_key, umbrella_key) = fixture(&path);
    store
        .create_template(Some("acme"), "secret-tpl", &json!({}))
        .unwrap();
    let mut new = new_sandbox("acme", Some(&acme_key), "secret-tpl");
    new.metadata.insert("team".into(), "red".into());
    let sandbox = store.insert_sandbox(&new).unwrap();
    let not_found = |r: Result<_, StoreError>| matches!(r, Err(StoreError::NotFound { .. }));

    // Sandboxes.
    assert!(not_found(
        store.get_sandbox("umbrella", &sandbox.id).map(drop)
    ));
    assert!(not_found(
        store
            .update_sandbox_state("umbrella", &sandbox.id, SandboxState::Running, None)
            .map(drop)
    ));
    assert!(not_found(
        store
            .set_sandbox_expiry("umbrella", &sandbox.id, Some(1))
            .map(drop)
    ));
    let page = store
        .list_sandboxes("umbrella", &SandboxFilter::default())
        .unwrap();
    assert!(page.items.is_empty());
    let filter = SandboxFilter {
        metadata: vec![("team".into(), "red".into())],
        ..Default::default()
    };
    assert!(
        store
            .list_sandboxes("umbrella", &filter)
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(
        store.list_sandboxes("acme", &filter).unwrap().items.len(),
        1
    );
    assert_eq!(store.usage_for_tenant("umbrella").unwrap().sandboxes, 0);
    // Nor can a sandbox be recorded against another tenant's key or template.
    assert!(not_found(
        store
            .insert_sandbox(&new_sandbox("umbrella", Some(&acme_key), "host"))
            .map(drop)
    ));
    assert!(not_found(
        store
            .insert_sandbox(&new_sandbox("umbrella", None, "secret-tpl"))
            .map(drop)
    ));
    // An id is global: reusing another tenant's sandbox id is a conflict, not a takeover.
    let mut clash = new_sandbox("umbrella", None, "host");
    clash.id = sandbox.id.clone();
    assert!(matches!(
        store.insert_sandbox(&clash),
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(
        store.get_sandbox("acme", &sandbox.id).unwrap().tenant,
        "acme"
    );

    // Templates.
    assert!(not_found(
        store.get_template("umbrella", "secret-tpl").map(drop)
    ));
    assert!(not_found(store.delete_template(
        Some("umbrella"),
        "secret-tpl",
        true
    )));
    let names = |t| -> Vec<String> {
        store
            .list_templates(Some(t))
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect()
    };
    assert_eq!(names("umbrella"), ["host"]);
    assert_eq!(names("acme"), ["host", "secret-tpl"]);

    // Keys.
    assert!(not_found(store.get_key("umbrella", &acme_key.id).map(drop)));
    assert!(not_found(
        store.revoke_key("umbrella", &acme_key.id).map(drop)
    ));
    assert_eq!(store.list_keys("umbrella").unwrap(), vec![umbrella_key]);
    assert_eq!(
        store.get_key("acme", &acme_key.id).unwrap().revoked_at,
        None
    );
}

#[test]
fn tagged_templates_belong_to_their_name_and_builds_write_them_together() {
    let (_dir, path) = temp_db();
    let (store, _, _) = fixture(&path);
    fn conflict<T>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::Conflict { .. }))
    }
    let (spec, limits) = (json!({"rootfs": {"build": "sha256:1"}}), json!({}));
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // A tag of a built-in's name is the built-in's: no tenant may write one.
    assert!(matches!(
        store.create_template(Some("acme"), "host:v1", &json!({})),
        Err(StoreError::TagOfBuiltIn { ref base, .. }) if base == "host"
    ));
    assert!(conflict(store.put_templates(
        Some("acme"),
        None,
        &names(&["host:v1"]),
        &spec,
        &limits,
        Some("b-1"),
        |_| true,
    )));
    // Nor a built-in whose name a tenant has tags of.
    store
        .create_template(Some("acme"), "tools:v1", &json!({}))
        .unwrap();
    assert!(conflict(store.create_template(None, "tools", &json!({}))));
    store.create_template(None, "tool", &json!({})).unwrap();
    // `default` is the name alone.
    assert!(matches!(
        store.create_template(Some("acme"), "py:default", &json!({})),
        Err(StoreError::Invalid { .. })
    ));

    // A build writes all its names at once, each remembering the build.
    let written = store
        .put_templates(
            Some("acme"),
            None,
            &names(&["py:v1", "py:latest"]),
            &spec,
            &limits,
            Some("b-1"),
            |_| true,
        )
        .unwrap();
    assert_eq!(written.len(), 2);
    let v1 = store.get_template("acme", "py:v1").unwrap();
    assert_eq!(v1.build_id.as_deref(), Some("b-1"));
    assert!(matches!(
        store.get_template("acme", "py"),
        Err(StoreError::NotFound { .. })
    ));
    // Another tenant sees none of them.
    assert!(store.get_template("umbrella", "py:v1").is_err());

    // A later build moves `latest` and leaves `v1`.
    let spec2 = json!({"rootfs": {"build": "sha256:2"}});
    store
        .put_templates(
            Some("acme"),
            None,
            &names(&["py:v2", "py:latest"]),
            &spec2,
            &limits,
            Some("b-2"),
            |_| true,
        )
        .unwrap();
    let latest = store.get_template("acme", "py:latest").unwrap();
    assert_eq!(
        (latest.spec, latest.build_id.as_deref()),
        (spec2, Some("b-2"))
    );
    assert_eq!(store.get_template("acme", "py:v1").unwrap().spec, spec);

    // One name refused writes none of them.
    store
        .create_template(Some("acme"), "hand", &json!({"rootfs": "host"}))
        .unwrap();
    assert!(conflict(store.put_templates(
        Some("acme"),
        None,
        &names(&["hand:v1", "hand"]),
        &spec,
        &limits,
        Some("b-3"),
        |current| current.build_id.is_some(),
    )));
    assert!(store.get_template("acme", "hand:v1").is_err());
    assert_eq!(store.get_template("acme", "hand").unwrap().build_id, None);

    // Tags count as templates, within the tenant's bound.
    let have = store
        .list_templates(Some("acme"))
        .unwrap()
        .iter()
        .filter(|t| t.tenant.is_some())
        .count();
    let room = usize::try_from(MAX_TEMPLATES_PER_TENANT).unwrap() - have;
    let many: Vec<String> = (0..room).map(|i| format!("many:t{i}")).collect();
    store
        .put_templates(Some("acme"), None, &many, &spec, &limits, None, |_| true)
        .unwrap();
    assert!(matches!(
        store.create_template(Some("acme"), "one-more", &json!({})),
        Err(StoreError::QuotaExceeded {
            what: "templates",
            ..
        })
    ));
    // Another tenant is not charged for them.
    store
        .create_template(Some("umbrella"), "one-more", &json!({}))
        .unwrap();
}

#[test]
fn templates_unique_builtins_shared_and_delete_guarded() {
    let (_dir, path) = temp_db();
    let (store, acme_key, _) = fixture(&path);
    let conflict = |r: Result<_, StoreError>| matches!(r, Err(StoreError::Conflict { .. }));

    let tpl = store
        .create_template(Some("acme"), "py", &json!({"a": 1}))
        .unwrap();
    assert_eq!(tpl.tenant.as_deref(), Some("acme"));
    assert!(conflict(store.create_template(
        Some("acme"),
        "py",
        &json!({})
    )));
    // Another tenant may use the same name.
    store
        .create_template(Some("umbrella"), "py", &json!({"b": 2}))
        .unwrap();
    assert_eq!(
        store.get_template("umbrella", "py").unwrap().spec,
        json!({"b": 2})
    );
    // No shadowing a built-in, and no built-in over a tenant's name.
    assert!(conflict(store.create_template(
        Some("acme"),
        "host",
        &json!({})
    )));
    assert!(conflict(store.create_template(None, "py", &json!({}))));
    assert!(conflict(store.create_template(None, "host", &json!({}))));

    // Built-ins: seen by all, listed for None.
    for tenant in ["acme", "umbrella"] {
        assert_eq!(store.get_template(tenant, "host").unwrap().tenant, None);
    }
    assert_eq!(store.list_templates(None).unwrap().len(), 1);

    // Bad input.
    assert!(matches!(
        store.create_template(Some("acme"), "Bad Name", &json!({})),
        Err(StoreError::Invalid { .. })
    ));
    assert!(matches!(
        store.create_template(Some("acme"), "list", &json!([1, 2])),
        Err(StoreError::BadJson { .. })
    ));
    assert!(matches!(
        store.create_template(Some("nobody"), "x", &json!({})),
        Err(StoreError::NotFound { kind: "tenant", .. })
    ));

    // Delete is refused while a sandbox that has not ended uses it.
    let sandbox = store
        .insert_sandbox(&new_sandbox("acme", Some(&acme_key), "py"))
        .unwrap();
    for state in [
        SandboxState::Starting,
        SandboxState::Running,
        SandboxState::Paused,
    ] {
        if state != SandboxState::Starting {
            store
                .update_sandbox_state("acme", &sandbox.id, state, None)
                .unwrap();
        }
        match store.delete_template(Some("acme"), "py", false) {
            Err(StoreError::TemplateInUse { sandboxes: 1, .. }) => {}
            other => panic!("{state}: expected TemplateInUse, got {other:?}"),
        }
    }
    // Umbrella's `py` is another template: not in use.
    store
        .delete_template(Some("umbrella"), "py", false)
        .unwrap();
    store
        .update_sandbox_state(
            "acme",
            &sandbox.id,
            SandboxState::Killed,
            Some(EndReason::Deleted),
        )
        .unwrap();
    store.delete_template(Some("acme"), "py", false).unwrap();
    assert!(matches!(
        store.get_template("acme", "py"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete_template(Some("acme"), "py", false),
        Err(StoreError::NotFound { .. })
    ));

    // Built-in in use by a sandbox: refused, then forced; the sandbox keeps the name.
    let on_host = store
        .insert_sandbox(&new_sandbox("umbrella", None, "host"))
        .unwrap();
    assert!(matches!(
        store.delete_template(Some("acme"), "host", true),
        Err(StoreError::BuiltIn { .. })
    ));
    assert!(matches!(
        store.delete_template(None, "host", false),
        Err(StoreError::TemplateInUse { .. })
    ));
    store.delete_template(None, "host", true).unwrap();
    assert_eq!(
        store.get_sandbox("umbrella", &on_host.id).unwrap().template,
        "host"
    );
    assert!(store.list_templates(Some("acme")).unwrap().is_empty());
}

/// A sandbox of `acme` brought to `state` by allowed steps.
fn sandbox_in(store: &Store, state: SandboxState) -> SandboxRecord {
    use SandboxState::*;
    let sandbox = store
        .insert_sandbox(&new_sandbox("acme", None, "host"))
        .unwrap();
    let path: &[SandboxState] = match state {
        Starting => &[],
        Running => &[Running],
        Paused => &[Running, Paused],
        Killed => &[Killed],
        Failed => &[Failed],
    };
    for &step in path {
        let reason = step.is_ended().then_some(EndReason::Deleted);
        store
            .update_sandbox_state("acme", &sandbox.id, step, reason)
            .unwrap();
    }
    store.get_sandbox("acme", &sandbox.id).unwrap()
}

#[test]
fn sandbox_state_machine_is_enforced() {
    use SandboxState::*;
    let (_dir, path) = temp_db();
    let (store, _, _) = fixture(&path);
    let allowed = [
        (Starting, Running),
        (Starting, Failed),
        (Starting, Killed),
        (Running, Paused),
        (Running, Killed),
        (Running, Failed),
        (Paused, Running),
        (Paused, Killed),
        (Paused, Failed),
    ];
    for from in SandboxState::ALL {
        for to in SandboxState::ALL {
            let sandbox = sandbox_in(&store, from);
            assert_eq!(sandbox.state, from);
            let reason = to
                .is_ended()
                .then(|| EndReason::Failed(format!("{from}→{to}")));
            let result = store.update_sandbox_state("acme", &sandbox.id, to, reason.clone());
            if allowed.contains(&(from, to)) {
                let updated = result.unwrap();
                assert_eq!(updated, store.get_sandbox("acme", &sandbox.id).unwrap());
                assert_eq!(updated.state, to);
                assert_eq!(updated.ended_at.is_some(), to.is_ended());
                assert_eq!(updated.end_reason, reason);
            } else {
                match result {
                    Err(StoreError::InvalidTransition { from: f, to: t, .. }) => {
                        assert_eq!((f, t), (from, to));
                    }
                    other => panic!("{from} → {to}: expected InvalidTransition, got {other:?}"),
                }
                // Unchanged.
                assert_eq!(store.get_sandbox("acme", &sandbox.id).unwrap(), sandbox);
            }
        }
    }
    // A reason only goes with an end.
    let running = sandbox_in(&store, Running);
    assert!(matches!(
        store.update_sandbox_state("acme", &running.id, Paused, Some(EndReason::Ttl)),
        Err(StoreError::Invalid { .. })
    ));
    // Expiry changes only while not ended.
    let updated = store
        .set_sandbox_expiry("acme", &running.id, Some(42))
        .unwrap();
    assert_eq!(updated.expires_at, Some(42));
    assert_eq!(
        store.get_sandbox("acme", &running.id).unwrap().expires_at,
        Some(42)
    );
    let killed = sandbox_in(&store, Killed);
    assert!(matches!(
        store.set_sandbox_expiry("acme", &killed.id, Some(42)),
        Err(StoreError::Ended { state: Killed, .. })
    ));
    // A pause at its timeout takes away only a time to live that ran out, of a paused sandbox:
    // not a running one's, nor a new one a resume gave.
    assert!(!store.clear_expired_pause("acme", &running.id, 100).unwrap());
    let paused_one = sandbox_in(&store, Paused);
    store
        .set_sandbox_expiry("acme", &paused_one.id, Some(500))
        .unwrap();
    assert!(
        !store
            .clear_expired_pause("acme", &paused_one.id, 100)
            .unwrap()
    );
    assert_eq!(
        store
            .get_sandbox("acme", &paused_one.id)
            .unwrap()
            .expires_at,
        Some(500)
    );
    assert!(
        store
            .clear_expired_pause("acme", &paused_one.id, 500)
            .unwrap()
    );
    assert_eq!(
        store
            .get_sandbox("acme", &paused_one.id)
            .unwrap()
            .expires_at,
        None
    );
    // Only starting or running at insert.
    let mut paused = new_sandbox("acme", None, "host");
    paused.state = Paused;
    assert!(matches!(
        store.insert_sandbox(&paused),
        Err(StoreError::Invalid { .. })
    ));
}

#[test]
fn sandbox_input_is_validated_without_half_writes() {
    let (_dir, path) = temp_db();
    let (store, _, _) = fixture(&path);
    let count = || store.count_by_state().unwrap().values().sum::<u64>();
    type Expect = fn(&StoreError) -> bool;
    let cases: Vec<(NewSandbox, Expect)> = vec![
        (
            NewSandbox {
                id: "short".into(),
                ..new_sandbox("acme", None, "host")
            },
            |e| matches!(e, StoreError::Invalid { .. }),
        ),
        (
            NewSandbox {
                id: "UPPERCASEUPPERCASE".into(),
                ..new_sandbox("acme", None, "host")
            },
            |e| matches!(e, StoreError::Invalid { .. }),
        ),
        (new_sandbox("nobody", None, "host"), |e| {
            matches!(e, StoreError::NotFound { kind: "tenant", .. })
        }),
        (new_sandbox("acme", None, "missing"), |e| {
            matches!(
                e,
                StoreError::NotFound {
                    kind: "template",
                    ..
                }
            )
        }),
        (new_sandbox("acme", None, "../etc"), |e| {
            matches!(e, StoreError::Invalid { .. })
        }),
        (
            NewSandbox {
                resources: json!("256M"),
                ..new_sandbox("acme", None, "host")
            },
            |e| matches!(e, StoreError::BadJson { .. }),
        ),
        (
            NewSandbox {
                memory_bytes: u64::MAX,
                ..new_sandbox("acme", None, "host")
            },
            |e| matches!(e, StoreError::Invalid { .. }),
        ),
        (
            NewSandbox {
                metadata: [(String::new(), "v".to_owned())].into(),
                ..new_sandbox("acme", None, "host")
            },
            |e| matches!(e, StoreError::Invalid { .. }),
        ),
        (
            NewSandbox {
                metadata: (0..65).map(|i| (i.to_string(), String::new())).collect(),
                ..new_sandbox("acme", None, "host")
            },
            |e| matches!(e, StoreError::Invalid { .. }),
        ),
        (
            NewSandbox {
                key_id: Some("key_aaaaaaaaaaaaaaaa".into()),
                ..new_sandbox("acme", None, "host")
            },
            |e| matches!(e, StoreError::NotFound { kind: "key", .. }),
        ),
    ];
    for (new, expected) in cases {
        let err = store.insert_sandbox(&new).unwrap_err();
        assert!(expected(&err), "{new:?}: {err:?}");
        assert!(!err.to_string().is_empty());
    }
    assert_eq!(count(), 0);
    for bad in ["", "nope", "ABCDEFGHIJKLMNOPQRS"] {
        assert!(matches!(
            store.get_sandbox("acme", bad),
            Err(StoreError::Invalid { .. })
        ));
    }
    assert!(matches!(
        store.get_sandbox("acme", "aaaaaaaaaaaaaaaaaaaa"),
        Err(StoreError::NotFound {
            kind: "sandbox",
            ..
        })
    ));
}

#[test]
fn listing_filters_and_pages_without_duplicates_or_gaps() {
    let (_dir, path) = temp_db();
    let (store, _, _) = fixture(&path);
    let mut all = BTreeMap::new();
    for i in 0..120 {
        let mut new = new_sandbox("acme", None, "host");
        new.metadata.insert(
            "parity".into(),
            if i % 2 == 0 { "even" } else { "odd" }.into(),
        );
        new.metadata.insert("mod.3".into(), (i % 3).to_string());
        new.metadata.insert("quote\"key".into(), "x".into());
        let sandbox = store.insert_sandbox(&new).unwrap();
        let state = match i % 4 {
            0 => SandboxState::Starting,
            1 => SandboxState::Running,
            2 => SandboxState::Paused,
            _ => SandboxState::Killed,
        };
        let sandbox = match state {
            SandboxState::Starting => sandbox,
            _ => {
                if state != SandboxState::Killed {
                    store
                        .update_sandbox_state("acme", &sandbox.id, SandboxState::Running, None)
                        .unwrap();
                }
                if state == SandboxState::Running {
                    store.get_sandbox("acme", &sandbox.id).unwrap()
                } else {
                    let reason = state.is_ended().then_some(EndReason::Deleted);
                    store
                        .update_sandbox_state("acme", &sandbox.id, state, reason)
                        .unwrap()
                }
            }
        };
        all.insert(sandbox.id.clone(), (i, sandbox));
    }
    // Noise in another tenant.
    for _ in 0..10 {
        store
            .insert_sandbox(&new_sandbox("umbrella", None, "host"))
            .unwrap();
    }

    let walk = |filter: SandboxFilter| -> Vec<SandboxRecord> {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .list_sandboxes(
                    "acme",
                    &SandboxFilter {
                        after: after.clone(),
                        ..filter.clone()
                    },
                )
                .unwrap();
            assert!(page.items.len() <= filter.limit as usize);
            seen.extend(page.items);
            match page.next {
                // Round-trip the cursor through its text form, as the API will.
                Some(next) => after = Some(Cursor::decode(&next.encode()).unwrap()),
                None => return seen,
            }
        }
    };

    for limit in [1, 7, 30, 119, 120, 1000] {
        let seen = walk(SandboxFilter {
            limit,
            ..Default::default()
        });
        let ids: Vec<&String> = seen.iter().map(|s| &s.id).collect();
        let unique: BTreeSet<&String> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "duplicates at limit {limit}");
        assert_eq!(unique, all.keys().collect(), "gaps at limit {limit}");
        // Ordered by (created_at, id), and each record is what get returns.
        assert!(
            seen.windows(2)
                .all(|w| (w[0].created_at, &w[0].id) < (w[1].created_at, &w[1].id))
        );
        for s in &seen {
            assert_eq!(*s, all[&s.id].1);
        }
        // Newest first: the same sandboxes in the opposite order.
        let newest = walk(SandboxFilter {
            limit,
            newest_first: true,
            ..Default::default()
        });
        let mut reversed: Vec<&String> = newest.iter().map(|s| &s.id).collect();
        reversed.reverse();
        assert_eq!(reversed, ids, "newest first at limit {limit}");
    }

    let matching = |pred: &dyn Fn(usize, &SandboxRecord) -> bool| -> BTreeSet<String> {
        all.values()
            .filter(|(i, s)| pred(*i, s))
            .map(|(_, s)| s.id.clone())
            .collect()
    };
    let ids = |v: Vec<SandboxRecord>| -> BTreeSet<String> { v.into_iter().map(|s| s.id).collect() };

    let active = walk(SandboxFilter {
        states: vec![
            SandboxState::Running,
            SandboxState::Paused,
            SandboxState::Running,
        ],
        limit: 11,
        ..Default::default()
    });
    assert_eq!(ids(active), matching(&|i, _| i % 4 == 1 || i % 4 == 2));

    let even_mod0 = walk(SandboxFilter {
        metadata: vec![
            ("parity".into(), "even".into()),
            ("mod.3".into(), "0".into()),
        ],
        limit: 4,
        ..Default::default()
    });
    assert_eq!(ids(even_mod0), matching(&|i, _| i % 6 == 0));

    let even_starting = walk(SandboxFilter {
        states: vec![SandboxState::Starting],
        metadata: vec![
            ("parity".into(), "even".into()),
            ("quote\"key".into(), "x".into()),
        ],
        limit: 5,
        ..Default::default()
    });
    assert_eq!(ids(even_starting), matching(&|i, _| i % 4 == 0));

    // By template, and by creation time.
    assert_eq!(
        walk(SandboxFilter {
            template: Some("host".into()),
            limit: 50,
            ..Default::default()
        })
        .len(),
        all.len()
    );
    assert!(
        walk(SandboxFilter {
            template: Some("other".into()),
            ..Default::default()
        })
        .is_empty()
    );
    let median = {
        let mut times: Vec<i64> = all.values().map(|(_, s)| s.created_at).collect();
        times.sort_unstable();
        times[times.len() / 2]
    };
    assert_eq!(
        ids(walk(SandboxFilter {
            created_since: Some(median),
            limit: 9,
            newest_first: true,
            ..Default::default()
        })),
        matching(&|_, s| s.created_at >= median)
    );

    let none = store
        .list_sandboxes(
            "acme",
            &SandboxFilter {
                metadata: vec![("parity".into(), "prime".into())],
                ..Default::default()
            },
        )
        .unwrap();
    assert!(none.items.is_empty() && none.next.is_none());

    for limit in [0, 1001] {
        assert!(matches!(
            store.list_sandboxes(
                "acme",
                &SandboxFilter {
                    limit,
                    ..Default::default()
                }
            ),
            Err(StoreError::Invalid { .. })
        ));
    }
    assert!(matches!(
        Cursor::decode("garbage"),
        Err(StoreError::Invalid { .. })
    ));
}

#[test]
fn expiry_and_orphans() {
    let (_dir, path) = temp_db();
    let (store, _, _) = fixture(&path);
    let with_expiry = |state: SandboxState, expires_at: Option<i64>| {
        let sandbox = sandbox_in(&store, state);
        store
            .set_sandbox_expiry("acme", &sandbox.id, expires_at)
            .unwrap_or(sandbox)
    };
    let starting_past = with_expiry(SandboxState::Starting, Some(100));
    let running_past = with_expiry(SandboxState::Running, Some(50));
    let paused_at_now = with_expiry(SandboxState::Paused, Some(1000));
    let running_future = with_expiry(SandboxState::Running, Some(1001));
    let running_never = with_expiry(SandboxState::Running, None);
    let killed = sandbox_in(&store, SandboxState::Killed);
    let failed = sandbox_in(&store, SandboxState::Failed);

    let expired: Vec<String> = store
        .expired(1000)
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    // Soonest first.
    assert_eq!(
        expired,
        [
            running_past.id.clone(),
            starting_past.id.clone(),
            paused_at_now.id.clone()
        ]
    );
    assert!(store.expired(0).unwrap().is_empty());

    // Extending only moves an expiry later; a sandbox that never expires stays so.
    let extend = |id: &str, at: i64| store.extend_sandbox_expiry("acme", id, at).unwrap();
    assert_eq!(extend(&running_future.id, 500).expires_at, Some(1001));
    assert_eq!(extend(&running_future.id, 1001).expires_at, Some(1001));
    assert_eq!(extend(&running_never.id, 5).expires_at, None);
    let later = extend(&running_future.id, 1002);
    assert_eq!(later.expires_at, Some(1002));
    assert_eq!(
        store.get_sandbox("acme", &running_future.id).unwrap(),
        later
    );
    assert!(matches!(
        store.extend_sandbox_expiry("acme", &killed.id, 9),
        Err(StoreError::Ended { .. })
    ));
    assert!(matches!(
        store.extend_sandbox_expiry("umbrella", &running_future.id, 9),
        Err(StoreError::NotFound { .. })
    ));

    // The reaper kills one; it is no longer expired.
    store
        .update_sandbox_state(
            "acme",
            &running_past.id,
            SandboxState::Killed,
            Some(EndReason::Ttl),
        )
        .unwrap();
    assert_eq!(store.expired(1000).unwrap().len(), 2);

    // Restart: everything not ended becomes killed/server_restart; ended ones are untouched.
    let killed_before = store.get_sandbox("acme", &killed.id).unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    let mut expected = vec![
        starting_past.id.clone(),
        paused_at_now.id.clone(),
        running_future.id.clone(),
        running_never.id.clone(),
    ];
    expected.sort();
    assert_eq!(store.mark_orphaned(5000).unwrap(), expected);
    for id in &expected {
        let s = store.get_sandbox("acme", id).unwrap();
        assert_eq!(s.state, SandboxState::Killed);
        assert_eq!(s.ended_at, Some(5000));
        assert_eq!(s.end_reason, Some(EndReason::ServerRestart));
    }
    assert_eq!(
        store.get_sandbox("acme", &killed.id).unwrap(),
        killed_before
    );
    assert_eq!(
        store.get_sandbox("acme", &failed.id).unwrap().state,
        SandboxState::Failed
    );
    assert_eq!(
        store
            .get_sandbox("acme", &running_past.id)
            .unwrap()
            .end_reason,
        Some(EndReason::Ttl)
    );
    assert!(store.mark_orphaned(6000).unwrap().is_empty());
    assert!(store.expired(i64::MAX).unwrap().is_empty());
    // Keys and templates are untouched by a restart.
    assert_eq!(store.list_keys("acme").unwrap().len(), 1);
    assert!(store.get_template("acme", "host").is_ok());

    // Purging history: the orphans ended at 5000, the others at the real clock's now.
    assert_eq!(store.purge_ended(5000).unwrap(), 0);
    assert_eq!(store.purge_ended(5001).unwrap(), 4);
    assert_eq!(store.purge_ended(i64::MAX).unwrap(), 3);
    assert_eq!(store.count_by_state().unwrap().values().sum::<u64>(), 0);
}

#[test]
fn concurrent_writers_lose_nothing() {
    let (_dir, path) = temp_db();
    let (store, _, _) = fixture(&path);
    let store = Arc::new(store);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                for i in 0..125 {
                    let mut new = new_sandbox("acme", None, "host");
                    new.metadata.insert("thread".into(), t.to_string());
                    ids.push(store.insert_sandbox(&new).unwrap().id);
                    // Readers run beside the writers.
                    if i % 25 == 0 {
                        store.get_sandbox("acme", &ids[0]).unwrap();
                        store.usage_for_tenant("acme").unwrap();
                    }
                }
                ids
            })
        })
        .collect();
    let written: BTreeSet<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(written.len(), 1000);

    let page = store
        .list_sandboxes(
            "acme",
            &SandboxFilter {
                limit: 1000,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(page.next.is_none());
    let listed: BTreeSet<String> = page.items.into_iter().map(|s| s.id).collect();
    assert_eq!(listed, written);
    assert_eq!(
        store.count_by_state().unwrap()[&SandboxState::Starting],
        1000
    );
    let thread3 = store
        .list_sandboxes(
            "acme",
            &SandboxFilter {
                metadata: vec![("thread".into(), "3".into())],
                limit: 1000,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(thread3.items.len(), 125);

    // And after reopening.
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.usage_for_tenant("acme").unwrap().sandboxes, 1000);
}

#[test]
fn quota_usage_sums_and_limits() {
    let (_dir, path) = temp_db();
    let (store, acme_key, _) = fixture(&path);
    let (second_key, _) = store
        .create_key("acme", "second", Role::User, Quotas::default())
        .unwrap();
    let make = |key: &KeyRecord, mib: u64, state: SandboxState| {
        let mut new = new_sandbox("acme", Some(key), "host");
        new.memory_bytes = mib << 20;
        let sandbox = store.insert_sandbox(&new).unwrap();
        if state != SandboxState::Starting {
            store
                .update_sandbox_state("acme", &sandbox.id, SandboxState::Running, None)
                .unwrap();
        }
        if state.is_ended() || state == SandboxState::Paused {
            let reason = state.is_ended().then_some(EndReason::Deleted);
            store
                .update_sandbox_state("acme", &sandbox.id, state, reason)
                .unwrap();
        }
    };
    make(&acme_key, 100, SandboxState::Starting);
    make(&acme_key, 200, SandboxState::Running);
    make(&acme_key, 400, SandboxState::Paused);
    make(&acme_key, 800, SandboxState::Killed);
    make(&acme_key, 1600, SandboxState::Failed);
    make(&second_key, 50, SandboxState::Running);
    store
        .insert_sandbox(&new_sandbox("umbrella", None, "host"))
        .unwrap();

    let key_usage = store.usage_for_key(&acme_key.id).unwrap();
    assert_eq!(
        (key_usage.sandboxes, key_usage.memory_bytes),
        (3, 700 << 20)
    );
    let second = store.usage_for_key(&second_key.id).unwrap();
    assert_eq!((second.sandboxes, second.memory_bytes), (1, 50 << 20));
    let tenant = store.usage_for_tenant("acme").unwrap();
    assert_eq!((tenant.sandboxes, tenant.memory_bytes), (4, 750 << 20));

    // Limits are checked in the same transaction as the insert.
    let over_count = SandboxQuotas {
        max_sandboxes: Some(3),
        max_memory_bytes: None,
        ..Default::default()
    };
    match store.insert_sandbox_within(&new_sandbox("acme", Some(&acme_key), "host"), over_count) {
        Err(StoreError::QuotaExceeded {
            limit: 3,
            used: 3,
            requested: 1,
            ..
        }) => {}
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
    let over_memory = SandboxQuotas {
        max_sandboxes: None,
        max_memory_bytes: Some(900 << 20),
        ..Default::default()
    };
    assert!(matches!(
        store.insert_sandbox_within(&new_sandbox("acme", Some(&acme_key), "host"), over_memory),
        Err(StoreError::QuotaExceeded { .. })
    ));
    assert_eq!(store.usage_for_key(&acme_key.id).unwrap(), key_usage);
    let fits = SandboxQuotas {
        max_sandboxes: Some(4),
        max_memory_bytes: Some(956 << 20),
        ..Default::default()
    };
    store
        .insert_sandbox_within(&new_sandbox("acme", Some(&acme_key), "host"), fits)
        .unwrap();
    // Without a key, the tenant's usage counts.
    let tenant_limit = SandboxQuotas {
        max_sandboxes: Some(5),
        max_memory_bytes: None,
        ..Default::default()
    };
    assert!(matches!(
        store.insert_sandbox_within(&new_sandbox("acme", None, "host"), tenant_limit),
        Err(StoreError::QuotaExceeded { used: 5, .. })
    ));

    // Concurrent creates never overshoot.
    let store = Arc::new(store);
    let (racer, _) = store
        .create_key("umbrella", "racer", Role::User, Quotas::default())
        .unwrap();
    let racer = Arc::new(racer);
    let limit = SandboxQuotas {
        max_sandboxes: Some(5),
        max_memory_bytes: None,
        ..Default::default()
    };
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (store, racer) = (Arc::clone(&store), Arc::clone(&racer));
            std::thread::spawn(move || {
                (0..4)
                    .filter(|_| {
                        store
                            .insert_sandbox_within(
                                &new_sandbox("umbrella", Some(&racer), "host"),
                                limit,
                            )
                            .is_ok()
                    })
                    .count()
            })
        })
        .collect();
    let created: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(created, 5);
    assert_eq!(store.usage_for_key(&racer.id).unwrap().sandboxes, 5);
}

#[test]
fn a_sandbox_keeps_its_plan() {
    let store = Store::open_in_memory().unwrap();
    store.create_tenant("acme", "Acme").unwrap();
    store.create_template(None, "host", &json!({})).unwrap();
    let plan = json!({"template": "host", "resources": {"memory_bytes": 1}});
    let with = store
        .insert_sandbox(&NewSandbox {
            plan: Some(plan.clone()),
            ..new_sandbox("acme", None, "host")
        })
        .unwrap();
    assert_eq!(with.plan.as_ref(), Some(&plan));
    assert_eq!(
        store.get_sandbox("acme", &with.id).unwrap().plan,
        Some(plan)
    );
    let without = store
        .insert_sandbox(&new_sandbox("acme", None, "host"))
        .unwrap();
    assert_eq!(store.get_sandbox("acme", &without.id).unwrap().plan, None);
}

#[test]
fn template_limits_are_kept_beside_the_spec_and_filled_in_once() {
    let store = Store::open_in_memory().unwrap();
    store.create_tenant("acme", "Acme").unwrap();
    let limits = json!({"defaults": {"memory_bytes": 1}, "max": null});
    let with = store
        .create_template_with(
            Some("acme"),
            None,
            "typed",
            &json!({"rootfs": "host"}),
            Some(&limits),
        )
        .unwrap();
    assert_eq!(with.limits.as_ref(), Some(&limits));
    assert_eq!(
        store.get_template("acme", "typed").unwrap().limits,
        Some(limits.clone())
    );
    // A template stored without them (as before schema 8) gets them once.
    store
        .create_template(Some("acme"), "old", &json!({"rootfs": "host"}))
        .unwrap();
    assert_eq!(store.get_template("acme", "old").unwrap().limits, None);
    assert!(
        store
            .fill_template_limits(Some("acme"), "old", &limits)
            .unwrap()
    );
    assert!(
        !store
            .fill_template_limits(Some("acme"), "old", &json!({}))
            .unwrap()
    );
    assert_eq!(
        store.get_template("acme", "old").unwrap().limits,
        Some(limits)
    );
    assert!(
        store
            .create_template_with(None, None, "bad", &json!({}), Some(&json!(1)))
            .is_err()
    );
}
