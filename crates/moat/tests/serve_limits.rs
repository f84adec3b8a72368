//! A sandbox's limits as a `moat serve` client meets them: a sandbox that fills its memory with
//! files loses the writing process, reported as an out-of-memory kill, and goes on serving.
//! Needs root (the native backend); skips with a printed reason otherwise.

mod support;

use serde_json::json;
use support::is_root;
use support::server::*;

#[test]
fn filling_memory_with_files_kills_the_writer_and_the_sandbox_lives_on() {
    if !is_root() {
        eprintln!("SKIP: moat serve's native backend needs root");
        return;
    }
    let server = Server::start();
    let key = server.admin_key();
    let create = json!({"resources": {"memory": "64M", "disk": "1G"}});
    let r = server.request("POST", "/v1/sandboxes", Some(&key), Some(&body(create)));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let exec = |shell: &str| {
        let path = format!("/v1/sandboxes/{id}/exec");
        let r = server.request(
            "POST",
            &path,
            Some(&key),
            Some(&body(json!({ "shell": shell }))),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    };
    let filled = exec("head -c 100M /dev/zero > /tmp/f");
    assert_eq!(filled["signal"], "signal: killed", "{filled}");
    assert_eq!(filled["oom_killed"], true, "{filled}");
    // The agent survived. The file holds the user processes' memory until it is removed, which
    // the agent does without needing any of it; then commands run again.
    let r = server.request(
        "DELETE",
        &format!("/v1/sandboxes/{id}/files?path=/tmp/f"),
        Some(&key),
        None,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let after = exec("echo alive");
    assert_eq!(after["stdout"], "alive\n", "{after}");
    assert_eq!(after["exit_code"], 0, "{after}");
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.json()["state"], "running", "{}", r.json());
}
