//! A sandbox's life through the engine: pause freezes every process (the agent included) and
//! resume thaws them with their state intact; the memory counter sees the sandbox; destroy is
//! idempotent. Needs root; skips with a printed reason otherwise.

use std::path::PathBuf;
use std::time::Duration;

use moat_engine::agent_client::AgentClient;
use moat_engine::backend::{Backend, RootfsSource, SandboxSpec};
use moat_engine::native::{NativeBackend, NativeOptions};
use moat_engine::resources::Resources;
use moat_proto::agent_config::AgentConfig;

mod support;

/// Runs `sh -c script` as the default user; its stdout, after checking it exited 0.
async fn sh(client: &AgentClient, script: &str) -> String {
    let (out, code) = support::sh(client, "user", script).await;
    assert_eq!(code, 0, "{script}");
    out
}

#[tokio::test(flavor = "current_thread")]
async fn pause_freezes_and_resume_thaws() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: the native backend needs root");
        return;
    }
    let backend = NativeBackend::new(&NativeOptions {
        agent_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_moat"))),
        ..NativeOptions::default()
    })
    .expect("backend");
    let spec = SandboxSpec {
        id: format!("life{}", std::process::id()),
        rootfs: RootfsSource::Host,
        resources: Resources::default(),
        agent: AgentConfig::default(),
    };
    let mut inst = backend.create(&spec).await.expect("create");
    let client = AgentClient::handshake(inst.take_channel().expect("channel"))
        .await
        .expect("handshake");
    // A counter that ticks in the background, and a file that must survive the pause.
    sh(&client, "echo kept > /tmp/state; (i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.05; done) >/dev/null 2>&1 &").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(inst.stats().memory_bytes > 0, "memory counter is empty");

    inst.pause().await.expect("pause");
    let frozen = tokio::time::timeout(Duration::from_millis(500), client.health()).await;
    assert!(
        frozen.is_err(),
        "the agent answered while the sandbox was paused"
    );
    inst.resume().await.expect("resume");
    client.health().await.expect("health after resume");

    let first: u64 = sh(&client, "cat /tmp/n")
        .await
        .trim()
        .parse()
        .expect("counter");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second: u64 = sh(&client, "cat /tmp/n")
        .await
        .trim()
        .parse()
        .expect("counter");
    assert!(
        second > first,
        "the background process did not run on after resume"
    );
    assert_eq!(sh(&client, "cat /tmp/state").await, "kept\n");

    inst.destroy().await.expect("destroy");
    inst.destroy().await.expect("destroy is idempotent");
    assert!(
        client.health().await.is_err(),
        "the agent answered after destroy"
    );
}
