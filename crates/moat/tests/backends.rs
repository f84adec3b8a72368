//! The backend registry: a server with three backends, native (the default), one that refuses
//! every create, and native sandboxes from a backend that says it cannot pause, over HTTP. A
//! template naming the refusing backend gets that backend's error; a template naming none gets
//! the default; a template naming a backend the server lacks is refused when it is defined; a
//! pause is refused by what the sandbox's own backend can do. Needs root (the native backend);
//! skips with a printed reason otherwise.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use moat_backend_native::{NativeBackend, NativeOptions};
use moat_engine::backend::{Backend, Backends, Capabilities, Instance};
use moat_engine::error::{EngineError, Result};
use moat_engine::manager::{ManagerOptions, SandboxManager};
use moat_engine::plan::SandboxPlan;
use moat_engine::store::SandboxState;
use moat_proto::v1;
use moat_test_support::in_process::{self, InProcess};

/// What the refusing backend says to every create.
const REFUSAL: &str = "the refusing backend makes no sandboxes";

/// A backend whose every create fails with [`REFUSAL`].
struct Refusing;

#[async_trait]
impl Backend for Refusing {
    fn name(&self) -> &'static str {
        "refusing"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    async fn create(&self, id: &str, _plan: &SandboxPlan) -> Result<Box<dyn Instance>> {
        Err(EngineError::Unsupported(format!(
            "{REFUSAL} (asked for {id})"
        )))
    }

    async fn reap_orphan(&self, _id: &str) -> Result<bool> {
        Ok(false)
    }
}

/// The native backend under another kind, saying it cannot pause.
struct NoPause(Arc<NativeBackend>);

#[async_trait]
impl Backend for NoPause {
    fn name(&self) -> &'static str {
        "no-pause"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: false,
            ..self.0.capabilities()
        }
    }

    async fn create(&self, id: &str, plan: &SandboxPlan) -> Result<Box<dyn Instance>> {
        self.0.create(id, plan).await
    }

    async fn reap_orphan(&self, id: &str) -> Result<bool> {
        self.0.reap_orphan(id).await
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn template(name: &str, backend: Option<&str>) -> v1::CreateTemplate {
    v1::CreateTemplate {
        name: name.into(),
        spec: v1::TemplateSpec {
            backend: backend.map(str::to_owned),
            ..v1::TemplateSpec::new(v1::Rootfs::Host)
        },
    }
}

fn create_from(template: &str) -> v1::CreateSandbox {
    v1::CreateSandbox {
        template: template.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_choose_their_backend() {
    if !is_root() {
        eprintln!("SKIP: the native backend needs root");
        return;
    }
    let (_dir, store, secret) = in_process::store_with_admin("moat-backends-");
    let native = NativeBackend::new(&NativeOptions {
        agent_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_moat"))),
        ..NativeOptions::default()
    })
    .expect("native backend");
    let native = Arc::new(native);
    let backends = Backends::new(native.clone())
        .with(Arc::new(Refusing))
        .with(Arc::new(NoPause(native)));
    assert_eq!(backends.default_kind(), "native");
    let manager = SandboxManager::with_backends(store.clone(), backends, ManagerOptions::default())
        .expect("manager");
    let server = InProcess::start(manager, &secret).await;
    let client = &server.client;

    // A backend the server does not run is refused when the template is defined.
    let err = client
        .create_template(&template("nowhere", Some("nope")))
        .await
        .expect_err("unknown backend");
    assert_eq!(err.status(), Some(400), "{err}");
    assert_eq!(err.code(), Some("invalid"), "{err}");
    assert!(
        err.to_string().contains("unknown backend \"nope\""),
        "{err}"
    );
    assert!(
        err.to_string().contains("native, no-pause, refusing"),
        "{err}"
    );

    // A template naming the refusing backend: its create fails with that backend's error.
    let t = client
        .create_template(&template("refused", Some("refusing")))
        .await
        .expect("template naming a registered backend");
    assert_eq!(t.spec.backend.as_deref(), Some("refusing"));
    let err = client
        .create_sandbox(&create_from("refused"))
        .await
        .expect_err("the refusing backend makes nothing");
    assert_eq!(err.status(), Some(503), "{err}");
    assert_eq!(err.code(), Some("unavailable"), "{err}");
    assert!(err.to_string().contains(REFUSAL), "{err}");

    // A template naming none: the server's default, native, makes it.
    client
        .create_template(&template("plain", None))
        .await
        .expect("template without a backend");
    let sandbox = client
        .create_sandbox(&create_from("plain"))
        .await
        .expect("sandbox on the default backend");
    assert_eq!(sandbox.state, SandboxState::Running);
    let out = client
        .exec(
            &sandbox.id,
            &v1::ExecRequest {
                shell: Some("echo hi".into()),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    assert_eq!(out.exit_code, Some(0));

    // Each record says which backend made (or failed to make) it.
    let records = store
        .list_sandboxes("a", &Default::default())
        .expect("list")
        .items;
    let by_template = |name: &str| {
        records
            .iter()
            .find(|r| r.template == name)
            .unwrap_or_else(|| panic!("a sandbox of {name}"))
    };
    assert_eq!(by_template("plain").backend, "native");
    assert_eq!(by_template("refused").backend, "refusing");
    assert_eq!(by_template("refused").state, SandboxState::Failed);

    client.delete_sandbox(&sandbox.id).await.expect("delete");

    // What a sandbox's backend cannot do is refused before anything changes, while the
    // default backend's sandboxes can.
    client
        .create_template(&template("frozen-never", Some("no-pause")))
        .await
        .expect("template naming the no-pause backend");
    let unpausable = client
        .create_sandbox(&create_from("frozen-never"))
        .await
        .expect("sandbox of the no-pause backend");
    let err = client
        .pause_sandbox(&unpausable.id)
        .await
        .expect_err("no pause on the no-pause backend");
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(
        err.to_string()
            .contains("the no-pause backend cannot pause sandboxes"),
        "{err}"
    );
    let still = client.get_sandbox(&unpausable.id).await.expect("get");
    assert_eq!(still.state, SandboxState::Running);
    let pausable = client
        .create_sandbox(&create_from("plain"))
        .await
        .expect("sandbox on the default backend");
    let paused = client.pause_sandbox(&pausable.id).await.expect("pause");
    assert_eq!(paused.state, SandboxState::Paused);
    for id in [&unpausable.id, &pausable.id] {
        client.delete_sandbox(id).await.expect("delete");
    }
    server.stop().await;
}

#[test]
fn serve_refuses_an_unknown_default_backend() {
    let dir = tempfile::Builder::new()
        .prefix("moat-backend-flag-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data = dir.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--default-backend",
            "nope",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .expect("run moat serve");
    assert!(!out.status.success(), "--default-backend nope was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "--default-backend \"nope\" is not a backend this build has (it has: native, gvisor)"
        ),
        "{stderr}"
    );
    // Refused before anything was made.
    assert!(
        !data.exists(),
        "--default-backend nope created the data dir"
    );
}

#[test]
fn the_template_backend_is_additive_on_the_wire() {
    // Omitted when absent, so specs stored or sent before look as they did.
    let plain = serde_json::to_value(v1::TemplateSpec::new(v1::Rootfs::Host)).expect("json");
    assert_eq!(plain, serde_json::json!({"rootfs": "host"}));
    let named: v1::TemplateSpec =
        serde_json::from_value(serde_json::json!({"rootfs": "host", "backend": "native"}))
            .expect("a spec naming a backend");
    assert_eq!(named.backend.as_deref(), Some("native"));
    // And shown in the OpenAPI document.
    let doc = moat_server::openapi::document();
    let spec = &doc["components"]["schemas"]["TemplateSpec"]["properties"]["backend"];
    assert!(
        spec.is_object(),
        "TemplateSpec.backend in the document: {spec}"
    );
}

#[test]
fn serve_refuses_gvisor_as_default_without_runsc_before_anything_is_made() {
    moat_test_support::need_root!();
    let dir = tempfile::Builder::new()
        .prefix("moat-backend-flag-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data = dir.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--default-backend",
            "gvisor",
            "--data-dir",
        ])
        .arg(&data)
        // A PATH without runsc.
        .env("PATH", "/nonexistent")
        .output()
        .expect("run moat serve");
    assert!(!out.status.success(), "started without runsc");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("apt-get install runsc") && stderr.contains("nothing was created"),
        "{stderr}"
    );
    assert!(!data.exists(), "the data dir was created");
}
