//! Error messages as people read them, through the API and the CLI against a real `moat
//! serve`: one code, given once, and one sentence that does not contradict itself; quotas in
//! the units requests use. Needs root (the server's native backend); skips with a printed
//! reason otherwise.

mod support;

use std::process::{Command, Output, Stdio};

use serde_json::json;
use support::is_root;
use support::server::*;

fn moat(server: &Server, key: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(args)
        .env("MOAT_URL", format!("http://127.0.0.1:{}", server.port))
        .env("MOAT_API_KEY", key)
        .stdin(Stdio::null())
        .output()
        .expect("run moat")
}

/// The API error's message, after checking its status and code; the message never starts
/// with (or repeats) the code.
fn message(r: &Reply, status: u16, code: &str) -> String {
    r.assert_error(status, code);
    let m = r.json()["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    for prefix in [
        "conflict:",
        "unavailable:",
        "not found:",
        "invalid request:",
    ] {
        assert!(!m.contains(prefix), "the code is in the message: {m}");
    }
    m
}

/// The CLI's one line on stderr for a server error, after checking the exit status.
fn cli_error(out: &Output, status: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(status), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn a_failed_sandbox_says_so_once() {
    if !is_root() {
        eprintln!("SKIP: moat serve's native backend needs root");
        return;
    }
    let server = Server::start();
    let admin = server.admin_key();
    let r = server.request(
        "POST",
        "/v1/templates",
        Some(&admin),
        Some(&body(json!({"name": "never", "spec": {
            "rootfs": "host", "ready": "echo not yet; exit 1", "ready_timeout_secs": 1,
        }}))),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        Some(&admin),
        Some(&body(
            json!({"template": "never", "metadata": {"t": "never"}}),
        )),
    );
    let created = message(&r, 503, "unavailable");
    assert!(created.contains("not yet"), "{created}");
    let list = server
        .request("GET", "/v1/sandboxes?metadata=t=never", Some(&admin), None)
        .json();
    assert_eq!(list["sandboxes"][0]["state"], "failed", "{list}");
    let id = list["sandboxes"][0]["id"].as_str().expect("id").to_owned();

    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(&admin),
        Some(&body(json!({"cmd": ["true"]}))),
    );
    let m = message(&r, 409, "conflict");
    assert!(
        m.starts_with(&format!("sandbox {id} has failed (")) && m.ends_with("); it is not running"),
        "{m}"
    );
    assert!(m.contains("not yet"), "the reason it failed: {m}");

    // 125: moat or the server failed, not the command.
    let out = moat(&server, &admin, &["sandbox", "exec", &id, "--", "true"]);
    let line = cli_error(&out, 125);
    assert_eq!(line, format!("moat: {m} (409 conflict)\n"));
}

#[test]
fn quotas_speak_in_sizes() {
    if !is_root() {
        eprintln!("SKIP: moat serve's native backend needs root");
        return;
    }
    let server = Server::start();
    let admin = server.admin_key();
    let r = server.request(
        "POST",
        "/v1/keys",
        Some(&admin),
        Some(&body(
            json!({"name": "small", "quotas": {"max_memory": "1G"}}),
        )),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let key = r.json()["secret"].as_str().expect("secret").to_owned();
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        Some(&key),
        Some(&body(json!({"resources": {"memory": "2G"}}))),
    );
    let m = message(&r, 429, "quota_exceeded");
    assert_eq!(
        m,
        "quota exceeded: the memory limit is 1G, 0 is in use and 2G more was requested"
    );

    let out = moat(&server, &key, &["sandbox", "create", "--memory", "1536M"]);
    let line = cli_error(&out, 1);
    assert_eq!(
        line,
        "moat: quota exceeded: the memory limit is 1G, 0 is in use and 1536M more was requested \
         (429 quota_exceeded)\n"
    );
}
