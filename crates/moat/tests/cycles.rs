//! 1,000 sequential create → exec → destroy cycles through the engine leave nothing behind:
//! host processes, cgroups, mounts, runtime files and this process's own fds and children are
//! counted before and after. Needs root; skips with a printed reason otherwise.

use std::path::PathBuf;

use moat_backend_native::{NativeBackend, NativeOptions};
use moat_engine::agent_client::{AgentClient, CallOptions};
use moat_engine::backend::Backend;
use moat_engine::plan::SandboxPlan;
use moat_proto::process::{ProcessConfig, StartRequest, process_event};

const CYCLES: usize = 1000;

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

/// Processes running as a sandbox host uid (every range starts at 1,000,000,000), except those
/// already in the cgroup of another test's sandbox: tests run in parallel, and theirs come and go.
fn sandbox_uid_processes() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("status"))
                .ok()
                .and_then(|s| {
                    let line = s.lines().find(|l| l.starts_with("Uid:"))?;
                    line.split_whitespace().nth(1)?.parse::<u64>().ok()
                })
                .is_some_and(|uid| uid >= 1_000_000_000)
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("cgroup"))
                .map_or(true, |c| !c.contains("/moat/") || c.contains("/moat/cycle"))
        })
        .count()
}

#[derive(Debug, PartialEq, Eq)]
struct HostCounts {
    fds: usize,
    mounts: usize,
    cgroups: usize,
    runtime_files: usize,
    children: String,
}

fn counts(bases: &[PathBuf]) -> HostCounts {
    let cgroups = bases
        .iter()
        .flat_map(|b| std::fs::read_dir(b).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with("cycle"))
        .count();
    let me = std::process::id();
    HostCounts {
        fds: count_dir("/proc/self/fd"),
        mounts: std::fs::read_to_string("/proc/self/mountinfo")
            .map(|s| s.lines().count())
            .unwrap_or(0),
        cgroups,
        runtime_files: count_dir("/run/moat/mnt") + count_dir("/run/moat/stage"),
        children: std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
            .unwrap_or_default(),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn thousand_cycles_leave_nothing() {
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
    let bases = backend.layout().bases();
    let sandbox_procs_before = sandbox_uid_processes();
    let before = counts(&bases);
    for i in 0..CYCLES {
        let id = format!("cycle{}x{i}", std::process::id());
        let plan = SandboxPlan::host("native");
        let mut inst = backend.create(&id, &plan).await.expect("create");
        let channel = inst.take_channel().expect("channel");
        let client = AgentClient::handshake(channel).await.expect("handshake");
        let req = StartRequest {
            process: Some(ProcessConfig {
                cmd: "/bin/true".into(),
                ..Default::default()
            }),
            stdin: Some(false),
            ..Default::default()
        };
        let mut stream = client
            .start(req, CallOptions::default())
            .await
            .expect("start");
        let mut ended = false;
        while let Some(ev) = stream.next().await {
            if let Some(process_event::Event::End(end)) = ev.expect("event").event {
                assert_eq!(end.exit_code, 0);
                ended = true;
            }
        }
        assert!(ended, "cycle {i}: no end event");
        drop(stream);
        drop(client);
        inst.destroy().await.expect("destroy");
    }
    let after = counts(&bases);
    assert_eq!(before, after, "host state changed over {CYCLES} cycles");
    let sandbox_procs_after = sandbox_uid_processes();
    assert!(
        sandbox_procs_after <= sandbox_procs_before,
        "sandbox processes left behind: {sandbox_procs_before} before, {sandbox_procs_after} after"
    );
}
