//! `moat serve` watches every running sandbox's agent: one that stops answering (here stopped
//! with SIGSTOP from the host) gets its calls refused at once (a 503 through `/v1`, through
//! the sandbox proxy, and for E2B's strict pause), then is destroyed and recorded `failed` with
//! the reason. Needs root (the native backend); skips otherwise.

use moat_test_support as support;
use support::need_root;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use support::server::*;

/// The host pid of sandbox `id`'s agent: its process that is pid 1 in the sandbox.
fn agent_pid(id: &str) -> i32 {
    pids_in_sandbox(id)
        .into_iter()
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .find(|l| l.starts_with("NSpid:"))
                    .and_then(|l| l.split_whitespace().last())
                    == Some("1")
            })
        })
        .expect("the sandbox's agent")
}

/// `POST /v1/sandboxes/{id}/exec`, giving up on the answer after `wait`: `None` when none came.
fn exec_within(server: &Server, key: &str, id: &str, wait: Duration) -> Option<Reply> {
    let body = body(json!({ "shell": "true" }));
    let mut conn = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    conn.set_read_timeout(Some(wait)).expect("timeout");
    let head = format!(
        "POST /v1/sandboxes/{id}/exec HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).expect("write");
    conn.write_all(&body).expect("write");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).ok()?;
    Reply::parse(&raw).ok()
}

#[test]
fn a_sandbox_whose_agent_stops_answering_fails_with_a_reason() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let r = server.request("POST", "/v1/sandboxes", Some(&key), Some(b"{}"));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let token = r.json()["access_token"]
        .as_str()
        .expect("access token")
        .to_owned();
    let healthy = exec_within(&server, &key, &id, Duration::from_secs(60)).expect("an answer");
    assert_eq!(healthy.status, 200, "{}", healthy.text());
    // The agent's own port through the sandbox proxy, as E2B SDKs call it.
    let envd = || {
        server
            .send(
                "GET",
                "/health",
                None,
                &[
                    ("E2b-Sandbox-Id", id.as_str()),
                    ("E2b-Sandbox-Port", "49983"),
                    ("X-Access-Token", token.as_str()),
                ],
                None,
            )
            .expect("proxied call")
    };
    assert!(envd().status < 300);

    let pid = agent_pid(&id);
    // SAFETY: kill has no memory preconditions; the pid is the sandbox's agent.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);

    // Calls are refused at once while the server waits to be sure, then the sandbox ends. A
    // call that reached the agent before the first missed check waits for it and is dropped
    // here; the loop keeps asking until the sandbox is ended.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut refused = None;
    let mut proxied = None;
    let mut strict_pause = None;
    let sandbox = loop {
        assert!(
            Instant::now() < deadline,
            "the sandbox with a stopped agent is still running"
        );
        if let Some(r) = exec_within(&server, &key, &id, Duration::from_secs(5))
            && r.status == 503
            && refused.is_none()
        {
            refused = Some(r);
            proxied = Some(envd());
            strict_pause = Some(
                server
                    .send(
                        "POST",
                        &format!("/sandboxes/{id}/pause"),
                        None,
                        &[
                            ("X-API-KEY", key.as_str()),
                            ("Content-Type", "application/json"),
                        ],
                        Some(br#"{"requireHealthyGuest": true}"#),
                    )
                    .expect("pause"),
            );
        }
        let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
        if r.json()["state"] != "running" {
            break r.json();
        }
    };
    let refused = refused.expect("no call was refused while the agent did not answer");
    refused.assert_error(503, "unavailable");
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("does not answer"), "{message}");
    // E2B's strict pause is refused rather than freezing an agent that does not answer.
    let strict_pause = strict_pause.expect("a strict pause while refused");
    assert_eq!(strict_pause.status, 503, "{}", strict_pause.text());
    // Through the proxy: a 503 to retry, not the "was not found" that SDKs read as ended.
    let proxied = proxied.expect("a proxied call while refused");
    assert_eq!(proxied.status, 503, "{}", proxied.text());
    assert!(
        proxied.header("retry-after").is_some(),
        "{}",
        proxied.headers
    );
    assert!(
        proxied.text().contains("does not answer") && !proxied.text().contains("not found"),
        "{}",
        proxied.text()
    );

    assert_eq!(sandbox["state"], "failed", "{sandbox}");
    let reason = sandbox["end_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("stopped answering"), "{sandbox}");

    // Ended: calls get a clear answer without waiting on anything, and nothing is left.
    let r = exec_within(&server, &key, &id, Duration::from_secs(60)).expect("an answer");
    r.assert_error(409, "conflict");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids_in_sandbox(&id).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        pids_in_sandbox(&id).is_empty(),
        "the failed sandbox was not destroyed"
    );
    assert!(cgroup_dirs(&id).is_empty());
}
