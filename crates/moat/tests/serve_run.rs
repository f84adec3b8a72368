//! The bounds of the one-shot `POST /v1/run` of a real `moat serve`: output files the server
//! would hold, duplicate paths, runs at once. Needs root (the native backend); skips with a
//! printed reason otherwise.

use moat_test_support as support;
use support::need_root;

use std::time::{Duration, Instant};

use moat_engine::store::{Quotas, Role, Store};
use serde_json::{Value, json};
use support::server::*;

// The documented limits (docs/SPEC.md), written out so that the test also builds against a
// server without them.
/// Largest output file a run returns.
const MAX_RUN_OUTPUT_FILE: u64 = 8 << 20;
/// Most bytes of output files one run returns.
const MAX_RUN_OUTPUT_TOTAL: u64 = 16 << 20;
/// Runs at once on the server.
const MAX_CONCURRENT_RUNS: usize = 8;
/// Runs at once of one tenant.
const MAX_CONCURRENT_RUNS_PER_TENANT: usize = 4;

/// A user key of `tenant`, made in the store beside the running server.
fn user_key(server: &Server, tenant: &str) -> String {
    let store = Store::open(server.data.join("moat.db")).expect("store");
    // Made by an earlier call when it fails.
    let _ = store.create_tenant(tenant, tenant);
    let (_, secret) = store
        .create_key(tenant, "t", Role::User, Quotas::default())
        .expect("key");
    secret.expose().to_owned()
}

/// The server's peak resident memory so far (`VmHWM`), bytes.
fn peak_rss(server: &Server) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmHWM value");
    kib * 1024
}

#[test]
fn duplicate_paths_are_refused() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    for bad in [
        json!({"shell": "true", "output_files": ["/tmp/a", "/tmp/b", "/tmp/a"]}),
        json!({"shell": "true", "files": [
            {"path": "x", "content": "1"}, {"path": "x", "content": "2"}
        ]}),
    ] {
        let r = server.request("POST", "/v1/run", Some(&admin), Some(&body(bad)));
        r.assert_error(400, "invalid");
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(message.contains("twice"), "{message}");
    }
}

#[test]
fn output_files_are_bounded_in_total() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    let before = peak_rss(&server);
    // 64 sparse files of the largest size allowed for one: 512 MiB if all came back.
    let outputs: Vec<String> = (0..64).map(|i| format!("/tmp/out{i}")).collect();
    let r = server.request(
        "POST",
        "/v1/run",
        Some(&admin),
        Some(&body(json!({
            "shell": format!("for i in $(seq 0 63); do truncate -s {MAX_RUN_OUTPUT_FILE} /tmp/out$i; done; truncate -s {} /tmp/big", MAX_RUN_OUTPUT_FILE + 1),
            "resources": {"memory": "16M"},
            "output_files": outputs.iter().cloned().chain(["/tmp/big".to_owned()]).skip(1).collect::<Vec<_>>(),
        }))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(out["exit_code"], 0, "{out}");
    let files = out["files"].as_array().expect("files");
    assert_eq!(files.len(), 64);
    let returned: u64 = files
        .iter()
        .filter_map(|f| f["content_b64"].as_str())
        .map(|b| b.len() as u64 / 4 * 3 - b.bytes().rev().take_while(|&c| c == b'=').count() as u64)
        .sum();
    let fits = (MAX_RUN_OUTPUT_TOTAL / MAX_RUN_OUTPUT_FILE) as usize;
    for (i, f) in files.iter().enumerate() {
        let error = f["error"].as_str();
        if i < fits {
            assert!(error.is_none(), "{i}: {f}");
        } else if i == 63 {
            // One byte over the per-file limit.
            assert!(error.is_some_and(|e| e.contains("per output file")), "{f}");
        } else {
            assert!(error.is_some_and(|e| e.contains("total limit")), "{i}: {f}");
        }
    }
    assert_eq!(returned, MAX_RUN_OUTPUT_TOTAL);
    // The answer, and what the server held for it, are bounded by the total, not by the
    // files asked for. A generous bound: base64 and JSON copies of 16 MiB, and allocator slack.
    assert!(
        (r.body.len() as u64) < MAX_RUN_OUTPUT_TOTAL * 2,
        "{} bytes",
        r.body.len()
    );
    let grown = peak_rss(&server).saturating_sub(before);
    eprintln!("answer {} bytes, peak RSS grew {grown} bytes", r.body.len());
    assert!(
        grown < 200 << 20,
        "the server's peak RSS grew {grown} bytes"
    );
}

/// Waits until `tenant_key` sees `n` run sandboxes running (a generous deadline for a loaded
/// machine; not a speed check).
fn wait_runs(server: &Server, key: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = server
            .request(
                "GET",
                "/v1/sandboxes?state=running&metadata=moat.run=true",
                Some(key),
                None,
            )
            .json();
        if list["sandboxes"].as_array().map(Vec::len) == Some(n) {
            return;
        }
        assert!(Instant::now() < deadline, "runs never started: {list}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn runs_at_once_are_bounded() {
    need_root!();
    let server = Server::start();
    let sleeper = || body(json!({"shell": "sleep 600", "timeout_secs": 600}));
    let keys: Vec<String> = (0..MAX_CONCURRENT_RUNS / MAX_CONCURRENT_RUNS_PER_TENANT)
        .map(|i| user_key(&server, &format!("t{i}")))
        .collect();
    let (mine, others) = std::thread::scope(|s| {
        for key in &keys {
            for _ in 0..MAX_CONCURRENT_RUNS_PER_TENANT {
                let server = &server;
                let request = sleeper();
                // Answered once the sandboxes are deleted below, or when the server stops.
                s.spawn(move || {
                    let _ = server.try_request("POST", "/v1/run", Some(key), Some(&request));
                });
            }
            wait_runs(&server, key, MAX_CONCURRENT_RUNS_PER_TENANT);
        }
        // One more of a tenant whose share is taken, one of another tenant: checked once
        // the runs are ended, so a failure does not leave them sleeping.
        let mine = server.request("POST", "/v1/run", Some(&keys[0]), Some(&sleeper()));
        let other = user_key(&server, "other");
        let others = server.request("POST", "/v1/run", Some(&other), Some(&sleeper()));
        // Ending the runs' sandboxes ends the runs and frees their slots.
        for key in &keys {
            let list = server
                .request("GET", "/v1/sandboxes?state=running", Some(key), None)
                .json();
            for sb in list["sandboxes"].as_array().expect("list") {
                let id = sb["id"].as_str().expect("id");
                server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(key), None);
            }
        }
        (mine, others)
    });
    // The tenant's share is taken: its next run is refused, with when to retry.
    mine.assert_error(429, "quota_exceeded");
    assert_eq!(mine.header("retry-after"), Some("1"));
    // The server's share is taken: another tenant's run is refused too.
    others.assert_error(503, "unavailable");
    assert_eq!(others.header("retry-after"), Some("1"));
    let r = server.request(
        "POST",
        "/v1/run",
        Some(&keys[0]),
        Some(&body(json!({"shell": "echo ok"}))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let out: Value = r.json();
    assert_eq!(out["stdout"], "ok\n", "{out}");
}
