//! `agent_main` as a real process: configuration from the environment, the channel on fd 3, exit
//! when the channel closes.
//!
//! The test re-executes its own binary, asking it to run only `child_agent`, which enters
//! `agent_main` when the marker variable is set.

#![allow(clippy::unwrap_used)]

#[path = "rpc_common/mod.rs"]
mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::*;
use moat_proto::agent_config::{AGENT_CHANNEL_FD, AGENT_CONFIG_ENV};
use serde_json::json;

const CHILD_MARKER: &str = "MOAT_AGENT_ENTRY_TEST_CHILD";

#[test]
fn child_agent() {
    if std::env::var_os(CHILD_MARKER).is_some() {
        moat_agent::agent_main();
    }
}

/// Starts this test binary as an agent with the channel on fd 3, under `wrapper` (a command
/// and its arguments to prefix, e.g. `unshare`), and connects to it.
async fn spawn_agent(
    wrapper: &[&str],
    config: moat_proto::agent_config::AgentConfig,
) -> (std::process::Child, Agent) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let theirs = OwnedFd::from(theirs);
    let raw = theirs.as_raw_fd();
    let exe = std::env::current_exe().unwrap();
    let mut argv: Vec<std::ffi::OsString> = wrapper.iter().map(Into::into).collect();
    argv.push(exe.into());
    for a in ["--exact", "child_agent", "--nocapture", "--test-threads=1"] {
        argv.push(a.into());
    }
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env(CHILD_MARKER, "1")
        .env(AGENT_CONFIG_ENV, serde_json::to_string(&config).unwrap())
        .stdin(Stdio::null());
    // SAFETY: dup2 is async-signal-safe; `raw` stays open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, AGENT_CHANNEL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    ours.set_nonblocking(true).unwrap();
    let agent = Agent::over(tokio::net::UnixStream::from_std(ours).unwrap()).await;
    (child, agent)
}

/// Waits (bounded) for `child` to exit, and asserts it exited cleanly.
async fn assert_exits(mut child: std::process::Child) {
    let status = tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || child.wait()))
        .await
        .expect("the agent exits once the channel closes")
        .unwrap()
        .unwrap();
    assert!(status.success(), "agent exited with {status}");
}

#[tokio::test]
async fn agent_main_serves_fd3_and_exits_when_the_channel_closes() {
    let mut config = config();
    config.env_vars.insert("FROM_CONFIG".into(), "yes".into());
    let (child, agent) = spawn_agent(&[], config).await;

    let resp = agent
        .send(
            http::Request::get("http://localhost/health")
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 204);
    // A live response body keeps its HTTP/2 stream, and so the connection, open.
    drop(resp);
    // The configuration variable is gone from the agent's environment, so user code never sees
    // it; the configured variables are there.
    let (events, end) = agent
        .stream(
            "/process.Process/Start",
            json!({"process": {"cmd": "env"}, "stdin": false}),
            &[],
        )
        .await
        .collect()
        .await;
    assert_eq!(end, json!({}));
    let env = outputs(&events).0;
    assert!(env.contains("FROM_CONFIG=yes"), "{env}");
    assert!(!env.contains(AGENT_CONFIG_ENV), "{env}");
    assert!(
        !env.contains(CHILD_MARKER),
        "the environment is built from scratch: {env}"
    );

    drop(agent);
    assert_exits(child).await;
}

/// As PID 1 of a fresh pid namespace the agent confines with landlock and reaps orphans.
#[tokio::test]
async fn agent_as_pid1_reaps_orphans() {
    let probe = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipping: cannot create a pid namespace here");
        return;
    }
    let (child, agent) =
        spawn_agent(&["unshare", "--pid", "--fork", "--kill-child"], config()).await;
    let (events, end) = agent
        .stream(
            "/process.Process/Start",
            // The background sleep outlives its parent and is reparented to the agent.
            json!({"process": {"cmd": "/bin/sh", "args": ["-c", "sleep 0.3 & echo $$"]}, "stdin": false}),
            &[],
        )
        .await
        .collect()
        .await;
    assert_eq!(end, json!({}));
    // `$$` inside is the pid the agent reported: both are pids of the sandbox's namespace.
    let start_pid = events[0]["event"]["start"]["pid"].to_string();
    assert_eq!(outputs(&events).0.trim(), start_pid);
    // Find the agent (unshare's child) and wait until it has no zombie children.
    let unshare_pid = child.id();
    let children = |pid: u32| -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let agent_pid = children(unshare_pid)[0];
    let zombies = || -> Vec<u32> {
        children(agent_pid)
            .into_iter()
            .filter(|c| {
                std::fs::read_to_string(format!("/proc/{c}/stat")).is_ok_and(|s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|rest| rest.trim_start().starts_with('Z'))
                })
            })
            .collect()
    };
    for _ in 0..100 {
        if children(agent_pid).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(zombies().is_empty(), "orphans left as zombies");
    assert!(children(agent_pid).is_empty(), "the orphan is gone");
    drop(agent);
    assert_exits(child).await;
}
