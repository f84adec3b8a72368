//! A sandbox's life through the engine: pause freezes every process (the agent included) and
//! resume thaws them with their state intact; the memory counter sees the sandbox; destroy is
//! idempotent. Needs root; skips with a printed reason otherwise.

use std::path::PathBuf;
use std::time::Duration;

use moat_backend_native::{NativeBackend, NativeOptions};
use moat_engine::agent_client::AgentClient;
use moat_engine::backend::Backend;
use moat_engine::plan::SandboxPlan;

use moat_test_support as support;

/// Runs `sh -c script` as the default user; its stdout, after checking it exited 0.
async fn sh(client: &AgentClient, script: &str) -> String {
    let (out, code) = support::sh(client, "user", script).await;
    assert_eq!(code, 0, "{script}");
    out
}

/// Where a frozen task waits: the cgroup v2 freezer's trap (`do_freezer_trap`, which the
/// kernel inlines into `get_signal`), the v1 freezer, and a `vfork` parent (`posix_spawn`)
/// whose child the freeze caught before its `exec`: it waits in `kernel_clone` for the frozen
/// child, a freezable wait that runs nothing (the counter check below holds either way).
const FROZEN_WCHANS: [&str; 3] = ["get_signal", "__refrigerator", "kernel_clone"];

/// Polls `cond` until it holds. Generous: only a condition that never holds should reach the end.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..600 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The host pids in the cgroup v2 directory of `pid` (its `cgroup.freeze` one) and below.
fn sandbox_processes(pid: i32) -> Vec<i32> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mount = mountinfo
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split(' ').nth(4))
        .expect("a cgroup2 mount");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a v2 cgroup");
    let mut dirs = vec![PathBuf::from(format!("{mount}{path}"))];
    let mut pids = Vec::new();
    while let Some(dir) = dirs.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).expect("cgroup.procs");
        pids.extend(procs.lines().map(|l| l.parse::<i32>().expect("pid")));
        for e in std::fs::read_dir(&dir).expect("cgroup dir").flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            }
        }
    }
    pids
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
    let id = format!("life{}", std::process::id());
    let plan = SandboxPlan::host("native");
    let mut inst = backend.create(&id, &plan).await.expect("create");
    let client = AgentClient::handshake(inst.take_channel().expect("channel"))
        .await
        .expect("handshake");
    // A counter that ticks in the background, and a file that must survive the pause. The host
    // reads the counter through the sandbox's root, without the agent, which is frozen too.
    sh(&client, "echo kept > /tmp/state; (i=0; while :; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.05; done) >/dev/null 2>&1 &").await;
    let pid = inst.host_pid().expect("host pid");
    let counter = || -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{pid}/root/tmp/n")).unwrap_or_default();
        text.trim().parse().unwrap_or(0)
    };
    // It runs: seen to move (a counter that never moves fails here).
    let start = counter();
    wait_until("the counter to move", || counter() > start).await;
    assert!(inst.stats().memory_bytes > 0, "memory counter is empty");

    inst.pause().await.expect("pause");
    // Every process of the sandbox, the agent included, is frozen as the kernel reports it.
    let procs = sandbox_processes(pid);
    assert!(procs.len() >= 2, "the agent and the counter: {procs:?}");
    for p in &procs {
        // A process that exited just before the freeze waits, a zombie, for its frozen parent
        // to reap it: nothing of it runs.
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if matches!(state, Some('Z' | 'X') | None) {
            continue;
        }
        // A frozen task that a signal woke (a SIGCHLD from a child that exited as the freeze
        // came) runs for a moment in the kernel, handling it, and goes back to the freezer's
        // wait: it must be seen there within 100 ms (the counter below shows nothing runs).
        let wchan = || std::fs::read_to_string(format!("/proc/{p}/wchan")).unwrap_or_default();
        let mut seen = wchan();
        for _ in 0..20 {
            if FROZEN_WCHANS.contains(&seen.as_str()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            seen = wchan();
        }
        assert!(
            FROZEN_WCHANS.contains(&seen.as_str()),
            "process {p} is not frozen (waits in {seen:?})"
        );
    }
    // And the counter does not move while paused: a running one ticks every 50 ms.
    let paused_at = counter();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counter(), paused_at, "the counter moved while paused");

    inst.resume().await.expect("resume");
    client.health().await.expect("health after resume");
    wait_until("the counter to move after resume", || counter() > paused_at).await;
    assert_eq!(sh(&client, "cat /tmp/state").await, "kept\n");

    inst.destroy().await.expect("destroy");
    inst.destroy().await.expect("destroy is idempotent");
    assert!(
        client.health().await.is_err(),
        "the agent answered after destroy"
    );
}
