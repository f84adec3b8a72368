//! The sandbox manager with its store on a small tmpfs that fills up: an end whose record
//! cannot be written (SQLite's "disk full") fails `507 insufficient_storage` and leaves the
//! sandbox running as recorded, rather than destroying it behind a `running` record. Needs root
//! (the native backend, and to mount the tmpfs); skips otherwise.

use moat_test_support as support;

use std::path::PathBuf;
use std::sync::Arc;

use moat_backend_native::{NativeBackend, NativeOptions};
use moat_engine::auth::Caller;
use moat_engine::manager::{ManagerError, ManagerOptions, SandboxManager};
use moat_engine::store::{Quotas, Role, SandboxState, Store};
use moat_proto::v1;
use support::is_root;
use support::tmpfs::{Tmpfs, fill};

fn shell(script: &str) -> v1::ExecRequest {
    v1::ExecRequest {
        shell: Some(script.into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_that_cannot_be_recorded_leaves_the_sandbox_running_as_recorded() {
    if !is_root() {
        eprintln!("SKIP: the native backend and the tmpfs need root");
        return;
    }
    let tmpfs = Tmpfs::mount("48m");
    let store = Arc::new(Store::open(tmpfs.path().join("moat.db")).expect("store"));
    store.create_tenant("a", "A").expect("tenant");
    let (key, _secret) = store
        .create_key("a", "test", Role::User, Quotas::default())
        .expect("key");
    let caller = Caller {
        tenant: "a".into(),
        key_id: Some(key.id),
        role: Role::User,
        requests_per_minute: None,
    };
    let backend = NativeBackend::new(&NativeOptions {
        agent_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_moat"))),
        ..NativeOptions::default()
    })
    .expect("backend");
    let mgr =
        SandboxManager::new(store, Arc::new(backend), ManagerOptions::default()).expect("manager");
    let sb = mgr
        .create(&caller, v1::CreateSandbox::default())
        .await
        .expect("create");

    let filler = tmpfs.path().join("filler");
    fill(&filler);
    assert!(
        matches!(
            mgr.check_storage(),
            Err(ManagerError::InsufficientStorage(_))
        ),
        "a full data dir passed the storage check"
    );

    // The delete cannot be recorded: it says so, and nothing is destroyed.
    let err = mgr
        .delete(&caller, &sb.id)
        .await
        .expect_err("a delete on a full disk");
    assert!(
        matches!(err, ManagerError::InsufficientStorage(_)),
        "{err:?}"
    );
    assert_eq!(moat_server::status_of(&err).as_u16(), 507);
    assert_eq!(
        mgr.get(&caller, &sb.id).await.expect("get").state,
        SandboxState::Running
    );
    let r = mgr
        .exec(&caller, &sb.id, shell("echo alive"))
        .await
        .expect("the sandbox whose delete failed no longer runs");
    assert_eq!(r.stdout, "alive\n");

    // Room again: the delete goes through, and record and sandbox agree.
    std::fs::remove_file(&filler).expect("remove the filler");
    let ended = mgr.delete(&caller, &sb.id).await.expect("delete");
    assert_eq!(ended.state, SandboxState::Killed);
    assert!(matches!(
        mgr.exec(&caller, &sb.id, shell("true")).await,
        Err(ManagerError::Conflict(_))
    ));
    assert_eq!(mgr.live_count(), 0);
}
