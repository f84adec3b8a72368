//! What the engine does when a gvisor sandbox cannot be restarted from a checkpoint it was just
//! saved in: a server whose gvisor backend fails restores while the test says so. Needs root and
//! runsc (`scripts/test-deps.sh` installs it); skips with a printed reason without root.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use moat_backend_gvisor::{GvisorBackend, GvisorOptions};
use moat_engine::backend::{Backend, Backends, Capabilities, Instance};
use moat_engine::error::{EngineError, Result};
use moat_engine::manager::{ManagerOptions, SandboxManager};
use moat_engine::plan::SandboxPlan;
use moat_engine::store::SandboxState;
use moat_proto::v1;
use moat_test_support::in_process::{self, InProcess};

/// The gvisor backend, whose restores fail while `failing` is set.
struct FailingRestores {
    inner: GvisorBackend,
    failing: AtomicBool,
}

#[async_trait]
impl Backend for FailingRestores {
    fn name(&self) -> &'static str {
        "gvisor"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn create(&self, id: &str, plan: &SandboxPlan) -> Result<Box<dyn Instance>> {
        self.inner.create(id, plan).await
    }

    async fn restore(&self, id: &str, plan: &SandboxPlan, dir: &Path) -> Result<Box<dyn Instance>> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(EngineError::Backend("this restore fails on purpose".into()));
        }
        self.inner.restore(id, plan, dir).await
    }

    async fn reap_orphan(&self, id: &str) -> Result<bool> {
        self.inner.reap_orphan(id).await
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The count a sandbox's counter (started by `MEMORY_COUNTER`) has reached.
async fn count(client: &moat_client::Client, id: &str) -> u64 {
    let out = client
        .exec(
            id,
            &v1::ExecRequest {
                shell: Some("cat /tmp/n".into()),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{out:?}"))
}

/// A snapshot with memory whose sandbox cannot be restarted from the checkpoint answers `503`
/// and leaves the sandbox paused on that checkpoint, not ended: a resume goes on counting from
/// where it was saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_whose_sandbox_cannot_restart_leaves_it_paused_on_what_it_saved() {
    if !is_root() {
        eprintln!("SKIP: the gvisor backend needs root");
        return;
    }
    moat_test_support::need_runsc();
    let (dir, store, secret) = in_process::store_with_admin("moat-gvisor-failures-");
    let backend = Arc::new(FailingRestores {
        inner: GvisorBackend::new(&GvisorOptions {
            agent_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_moat"))),
            ..GvisorOptions::default()
        })
        .expect("gvisor backend"),
        failing: AtomicBool::new(false),
    });
    let opts = ManagerOptions {
        snapshot_dir: Some(dir.path().join("snapshots")),
        ..ManagerOptions::default()
    };
    let manager = SandboxManager::with_backends(store, Backends::new(backend.clone()), opts)
        .expect("manager");
    let server = InProcess::start(manager, &secret).await;
    let client = &server.client;
    client
        .create_template(&v1::CreateTemplate {
            name: "sentry".into(),
            spec: v1::TemplateSpec {
                backend: Some("gvisor".into()),
                ..v1::TemplateSpec::new(v1::Rootfs::Host)
            },
        })
        .await
        .expect("template");
    let sandbox = client
        .create_sandbox(&v1::CreateSandbox {
            template: "sentry".into(),
            ..Default::default()
        })
        .await
        .expect("sandbox");
    let id = sandbox.id;
    client
        .exec(
            &id,
            &v1::ExecRequest {
                shell: Some(moat_test_support::MEMORY_COUNTER.into()),
                ..Default::default()
            },
        )
        .await
        .expect("counter");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let before = count(client, &id).await;

    backend.failing.store(true, Ordering::SeqCst);
    let err = client
        .create_snapshot(
            &id,
            &v1::CreateSnapshot {
                memory: true,
                ..Default::default()
            },
        )
        .await
        .expect_err("the restart fails");
    assert_eq!(err.status(), Some(503), "{err}");
    assert!(
        err.to_string().contains("paused on what was saved"),
        "{err}"
    );
    let got = client.get_sandbox(&id).await.expect("the sandbox is kept");
    assert_eq!(got.state, SandboxState::Paused);

    backend.failing.store(false, Ordering::SeqCst);
    let resumed = client.resume_sandbox(&id, None).await.expect("resume");
    assert_eq!(resumed.state, SandboxState::Running);
    let after = count(client, &id).await;
    assert!(after >= before, "restarted: {before} then {after}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(count(client, &id).await > after, "stopped counting");

    client.delete_sandbox(&id).await.expect("delete");
    assert!(
        !dir.path().join("snapshots/paused").join(&id).exists(),
        "the saved state outlived the sandbox"
    );
    server.stop().await;
}
