//! What a caller may do is the engine's decision, from the `Caller` alone: only admins manage
//! keys (of any tenant) or name a host directory as a template's root filesystem, a keyless
//! local caller is such an admin, and a caller sees its own tenant's templates only. Needs no
//! root: no sandbox is made (the backend refuses every create).

use std::sync::Arc;

use async_trait::async_trait;
use moat_engine::auth::{Caller, Role};
use moat_engine::backend::{Backend, Capabilities, Instance};
use moat_engine::error::{EngineError, Result};
use moat_engine::manager::{ManagerError, ManagerOptions, SandboxManager};
use moat_engine::plan::SandboxPlan;
use moat_engine::store::{Quotas, Store};
use moat_proto::v1;

/// A backend that makes nothing: these tests never start a sandbox.
struct Refusing;

#[async_trait]
impl Backend for Refusing {
    fn name(&self) -> &'static str {
        "refusing"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    async fn create(&self, _id: &str, _plan: &SandboxPlan) -> Result<Box<dyn Instance>> {
        Err(EngineError::Unsupported(
            "this backend makes no sandboxes".into(),
        ))
    }

    async fn reap_orphan(&self, _id: &str) -> Result<bool> {
        Ok(false)
    }
}

/// A manager over an in-memory store holding tenant `a` and a user key of it, and that key's
/// caller.
async fn setup() -> (SandboxManager, Caller) {
    let store = Arc::new(Store::open_in_memory().expect("store"));
    store.create_tenant("a", "A").expect("tenant");
    let (_, secret) = store
        .create_key("a", "user", Role::User, Quotas::default())
        .expect("key");
    let manager =
        SandboxManager::new(store, Arc::new(Refusing), ManagerOptions::default()).expect("manager");
    let user = manager
        .authenticate(secret.expose().to_owned())
        .await
        .expect("authenticate");
    assert_eq!((user.tenant.as_str(), user.role), ("a", Role::User));
    assert!(user.key_id().is_some_and(|k| k.starts_with("key_")));
    (manager, user)
}

fn assert_forbidden(e: &ManagerError, message: &str) {
    assert!(matches!(e, ManagerError::Forbidden(_)), "{e:?}");
    assert_eq!(e.to_string(), message);
}

#[tokio::test]
async fn only_admins_manage_keys() {
    let (manager, user) = setup().await;
    let refused = "managing API keys needs an admin key";
    let new_key = |tenant: Option<&str>| v1::CreateKey {
        name: "made".into(),
        role: v1::KeyRole::User,
        tenant: tenant.map(str::to_owned),
        quotas: None,
    };
    let e = manager
        .create_key(&user, new_key(None))
        .await
        .expect_err("a user key makes no keys");
    assert_forbidden(&e, refused);
    let e = manager
        .list_keys(&user, None)
        .await
        .expect_err("a user key lists no keys");
    assert_forbidden(&e, refused);
    let user_key = user.key_id().expect("key").to_owned();
    let e = manager
        .revoke_key(&user, None, &user_key)
        .await
        .expect_err("a user key revokes no keys");
    assert_forbidden(&e, refused);

    // An admin manages its own tenant's keys by default, and any other tenant's by name.
    let admin = Caller::local("a");
    let own = manager.list_keys(&admin, None).await.expect("list");
    assert_eq!(own.keys.len(), 1);
    assert_eq!(own.keys[0].id, user_key);
    let made = manager
        .create_key(&admin, new_key(Some("b")))
        .await
        .expect("a key of a new tenant");
    assert_eq!(made.key.tenant, "b");
    let theirs = manager.list_keys(&admin, Some("b")).await.expect("list b");
    assert_eq!(theirs.keys.len(), 1);
    assert_eq!(theirs.keys[0].id, made.key.id);
    let revoked = manager
        .revoke_key(&admin, Some("b"), &made.key.id)
        .await
        .expect("revoke b's key");
    assert!(revoked.revoked_at.is_some());
}

#[tokio::test]
async fn only_admins_name_a_host_directory() {
    let (manager, user) = setup().await;
    let rootfs = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(rootfs.path().join("etc")).expect("etc");
    std::fs::write(
        rootfs.path().join("etc/passwd"),
        "user:x:1000:1000::/home/user:/bin/sh\n",
    )
    .expect("passwd");
    let template = v1::CreateTemplate {
        name: "dir".into(),
        spec: v1::TemplateSpec::new(v1::Rootfs::Dir(
            rootfs.path().to_str().expect("UTF-8").to_owned(),
        )),
    };
    let e = manager
        .create_template(&user, template.clone())
        .await
        .expect_err("a user key names no host directory");
    assert_forbidden(
        &e,
        "a template's rootfs directory is a host path: only an admin key may name one",
    );

    // The keyless local caller is an admin of its tenant: it may, and the tenant's users see
    // the template; another tenant does not.
    let made = manager
        .create_template(&Caller::local("a"), template)
        .await
        .expect("an admin names a host directory");
    assert!(!made.builtin);
    let seen = manager.get_template(&user, "dir").await.expect("seen");
    assert_eq!(seen.spec, made.spec);
    let listed = manager.list_templates(&user).await.expect("list");
    assert!(listed.templates.iter().any(|t| t.name == "dir"));
    let e = manager
        .get_template(&Caller::local("b"), "dir")
        .await
        .expect_err("another tenant's template");
    assert!(matches!(e, ManagerError::NotFound(_)), "{e:?}");
    manager
        .delete_template(&user, "dir", false)
        .await
        .expect("delete");
}
