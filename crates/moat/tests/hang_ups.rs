//! Engine calls whose caller stops waiting half-way, as a request's does when its client hangs
//! up: what they started runs to its end (or is undone), never stopping between the store and
//! the sandboxes; and a slow end or pause holds up no other. Calls the manager directly over
//! the native backend, whose resumes and pauses a wrapper can make slow; needs root, skips
//! with a printed reason without it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moat_backend_native::{NativeBackend, NativeOptions};
use moat_engine::auth::Caller;
use moat_engine::backend::{
    AgentChannel, Backend, Backends, Capabilities, Instance, InstanceStats,
};
use moat_engine::error::Result;
use moat_engine::manager::{ManagerOptions, SandboxManager};
use moat_engine::plan::SandboxPlan;
use moat_engine::store::SandboxState;
use moat_proto::v1;
use moat_test_support::in_process;

/// How long a slowed resume takes before it thaws anything.
const SLOW_RESUME: Duration = Duration::from_millis(400);

/// How long a slowed pause takes before it freezes anything.
const SLOW_PAUSE: Duration = Duration::from_secs(8);

/// Switches of the wrapped backend's slow calls, and how many pauses were asked for.
#[derive(Default)]
struct Slow {
    resumes: AtomicBool,
    pauses: AtomicBool,
    paused: AtomicUsize,
}

/// The native backend, whose sandboxes' resumes wait [`SLOW_RESUME`] first, and pauses
/// [`SLOW_PAUSE`], while `slow` says so.
struct SlowResumes {
    inner: NativeBackend,
    slow: Arc<Slow>,
}

#[async_trait]
impl Backend for SlowResumes {
    fn name(&self) -> &'static str {
        "native"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn create(&self, id: &str, plan: &SandboxPlan) -> Result<Box<dyn Instance>> {
        let inner = self.inner.create(id, plan).await?;
        Ok(Box::new(SlowInstance {
            inner,
            slow: self.slow.clone(),
        }))
    }

    async fn reap_orphan(&self, id: &str) -> Result<bool> {
        self.inner.reap_orphan(id).await
    }
}

/// A native sandbox whose resume and pause wait first while `slow` says so.
struct SlowInstance {
    inner: Box<dyn Instance>,
    slow: Arc<Slow>,
}

#[async_trait]
impl Instance for SlowInstance {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn take_channel(&mut self) -> Option<AgentChannel> {
        self.inner.take_channel()
    }

    fn stats(&self) -> InstanceStats {
        self.inner.stats()
    }

    fn host_pid(&self) -> Option<i32> {
        self.inner.host_pid()
    }

    async fn pause(&self) -> Result<()> {
        self.slow.paused.fetch_add(1, Ordering::SeqCst);
        if self.slow.pauses.load(Ordering::SeqCst) {
            tokio::time::sleep(SLOW_PAUSE).await;
        }
        self.inner.pause().await
    }

    async fn resume(&self) -> Result<()> {
        if self.slow.resumes.load(Ordering::SeqCst) {
            tokio::time::sleep(SLOW_RESUME).await;
        }
        self.inner.resume().await
    }

    async fn exited(&self) {
        self.inner.exited().await
    }

    async fn destroy(&mut self) -> Result<()> {
        self.inner.destroy().await
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A manager over [`SlowResumes`], its data directory, the switches of its slow calls and a
/// caller of tenant `a`.
fn manager() -> (tempfile::TempDir, SandboxManager, Arc<Slow>, Caller) {
    let (dir, store, _secret) = in_process::store_with_admin("moat-hang-ups-");
    let slow = Arc::new(Slow::default());
    let backend = SlowResumes {
        inner: NativeBackend::new(&NativeOptions {
            agent_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_moat"))),
            ..NativeOptions::default()
        })
        .expect("native backend"),
        slow: slow.clone(),
    };
    let manager = SandboxManager::with_backends(
        store,
        Backends::new(Arc::new(backend)),
        ManagerOptions::default(),
    )
    .expect("manager");
    (dir, manager, slow, Caller::local("a"))
}

fn shell(command: &str) -> v1::ExecRequest {
    v1::ExecRequest {
        shell: Some(command.into()),
        ..Default::default()
    }
}

/// The caller's sandboxes that are not over.
async fn alive(manager: &SandboxManager, caller: &Caller) -> Vec<v1::Sandbox> {
    manager
        .list(caller, v1::ListSandboxes::default())
        .await
        .expect("list")
        .sandboxes
        .into_iter()
        .filter(|s| !s.state.is_ended())
        .collect()
}

/// A call that resumes a paused sandbox on its way (auto-resume) finishes the resume even when
/// the call is dropped during it: the record and the sandbox agree, and it is running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_resume_whose_caller_hangs_up_still_resumes() {
    if !is_root() {
        eprintln!("SKIP: the native backend needs root");
        return;
    }
    let (_dir, manager, slow, caller) = manager();
    let sandbox = manager
        .create(
            &caller,
            v1::CreateSandbox {
                lifecycle: Some(v1::Lifecycle {
                    auto_resume: true,
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    let id = sandbox.id;
    manager.pause(&caller, &id).await.expect("pause");

    slow.resumes.store(true, Ordering::SeqCst);
    let hung_up = tokio::time::timeout(
        SLOW_RESUME / 4,
        manager.exec(&caller, &id, shell("echo hi")),
    )
    .await;
    assert!(hung_up.is_err(), "the call ended before it was dropped");
    slow.resumes.store(false, Ordering::SeqCst);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = manager.get(&caller, &id).await.expect("get");
        if got.state == SandboxState::Running {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped call left the sandbox {:?}",
            got.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = manager
        .exec(&caller, &id, shell("echo hi"))
        .await
        .expect("an exec after the resume");
    assert_eq!(out.stdout, "hi\n");
    manager.delete(&caller, &id).await.expect("delete");
}

/// A one-shot run whose caller hangs up while its command runs ends there: its sandbox is
/// destroyed at once, not left running until the command or its time to live ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_caller_hangs_up_leaves_no_sandbox() {
    if !is_root() {
        eprintln!("SKIP: the native backend needs root");
        return;
    }
    let (_dir, manager, _slow, caller) = manager();
    let req = v1::RunRequest {
        shell: Some("sleep 60".into()),
        timeout_secs: Some(600),
        ..Default::default()
    };
    let started = Instant::now();
    let hung_up = tokio::time::timeout(Duration::from_millis(800), manager.run(&caller, req)).await;
    assert!(hung_up.is_err(), "the run ended before it was dropped");
    let deadline = started + Duration::from_secs(10);
    loop {
        let left = alive(&manager, &caller).await;
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped run left its sandbox: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its slot went with it (once its sandbox is destroyed, a moment after it is recorded
    // killed): as many runs as a tenant may have at once run again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let one = || {
        manager.run(
            &caller,
            v1::RunRequest {
                shell: Some("true".into()),
                ..Default::default()
            },
        )
    };
    while let Err(e) = one().await {
        assert!(
            Instant::now() < deadline,
            "the run's slot never came back: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let runs = (0..4).map(|_| {
        manager.run(
            &caller,
            v1::RunRequest {
                shell: Some("echo ok".into()),
                ..Default::default()
            },
        )
    });
    for done in futures_util::future::join_all(runs).await {
        assert_eq!(done.expect("a run").exec.stdout, "ok\n");
    }
}

/// A command whose exec is dropped at any point of its start is killed, not left running until
/// its timeout: the drops here land before, during and after the agent starts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_dropped_while_its_command_starts_leaves_no_process() {
    if !is_root() {
        eprintln!("SKIP: the native backend needs root");
        return;
    }
    let (_dir, manager, _slow, caller) = manager();
    let id = manager
        .create(&caller, v1::CreateSandbox::default())
        .await
        .expect("create")
        .id;
    for round in 0..60u64 {
        let exec = manager.exec(&caller, &id, shell("exec sleep 1234"));
        let dropped_after = Duration::from_micros(200 + round * 50);
        let _ = tokio::time::timeout(dropped_after, exec).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = manager
            .exec(&caller, &id, shell("pgrep -c -x sleep || true"))
            .await
            .expect("pgrep");
        if out.stdout.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "commands whose exec was dropped still run: {}",
            out.stdout.trim()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    manager.delete(&caller, &id).await.expect("delete");
}

/// A pause at the end of a sandbox's time to live that takes long (one saved to disk) holds up
/// neither the end of another sandbox that expired with it nor the reaper's next passes, and
/// those passes do not pause it a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pause_at_timeout_holds_up_no_other_end() {
    if !is_root() {
        eprintln!("SKIP: the native backend needs root");
        return;
    }
    let (_dir, manager, slow, caller) = manager();
    let make = |on_timeout| v1::CreateSandbox {
        timeout_secs: Some(1),
        lifecycle: Some(v1::Lifecycle {
            on_timeout,
            ..Default::default()
        }),
        ..Default::default()
    };
    let pausing = manager
        .create(&caller, make(v1::OnTimeout::Pause))
        .await
        .expect("create")
        .id;
    let ending = manager
        .create(&caller, make(v1::OnTimeout::Kill))
        .await
        .expect("create")
        .id;
    slow.pauses.store(true, Ordering::SeqCst);
    let after = moat_engine::store::now_ms() + 1_500;
    let reaped = manager.reap_expired(after).await.expect("reap");
    assert_eq!(
        reaped,
        std::slice::from_ref(&ending),
        "the slow pause held up the pass"
    );
    assert_eq!(
        manager.get(&caller, &ending).await.expect("get").state,
        SandboxState::Killed
    );
    // The next pass leaves the pause under way alone.
    let again = manager.reap_expired(after).await.expect("reap");
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(slow.paused.load(Ordering::SeqCst), 1, "paused twice");
    manager.delete(&caller, &pausing).await.ok();
}
