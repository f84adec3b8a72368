//! `agent_main` as a real process: configuration from the environment, the channel on fd 3, exit
//! when the channel closes.
//!
//! The test re-executes its own binary, asking it to run only `child_agent`, which enters
//! `agent_main` when the marker variable is set.

#![allow(clippy::unwrap_used)]

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

#[tokio::test]
async fn agent_main_serves_fd3_and_exits_when_the_channel_closes() {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let theirs = OwnedFd::from(theirs);
    let raw = theirs.as_raw_fd();
    let mut config = config();
    config.env_vars.insert("FROM_CONFIG".into(), "yes".into());
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_agent", "--nocapture", "--test-threads=1"])
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
    let mut child = cmd.spawn().unwrap();
    drop(theirs);
    ours.set_nonblocking(true).unwrap();
    let agent = Agent::over(tokio::net::UnixStream::from_std(ours).unwrap()).await;

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
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "agent exited with {status}");
}
