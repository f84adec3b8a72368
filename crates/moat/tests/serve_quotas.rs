//! Key quotas of a real `moat serve` beyond the sandbox count and memory: the pids of a key's
//! sandboxes. Needs root (the native backend); skips with a printed reason otherwise.

mod support;

use std::process::{Command, Stdio};

use serde_json::json;
use support::is_root;
use support::server::*;

fn skip() -> bool {
    if !is_root() {
        eprintln!("SKIP: moat serve's native backend needs root");
        return true;
    }
    false
}

/// A key made with `moat keys create NAME ARGS -q` as `admin`: its secret.
fn cli_key(server: &Server, admin: &str, name: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["keys", "create", name, "-q"])
        .args(args)
        .env("MOAT_URL", format!("http://127.0.0.1:{}", server.port))
        .env("MOAT_API_KEY", admin)
        .stdin(Stdio::null())
        .output()
        .expect("run moat");
    assert!(
        out.status.success(),
        "moat keys create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn pids_are_a_key_quota() {
    if skip() {
        return;
    }
    let server = Server::start();
    let admin = server.admin_key();
    server
        .request(
            "POST",
            "/v1/keys",
            Some(&admin),
            Some(&body(json!({"name": "x", "quotas": {"max_pids": 0}}))),
        )
        .assert_error(400, "invalid");
    let key = cli_key(&server, &admin, "pids", &["--max-pids", "600"]);
    let keys = server.request("GET", "/v1/keys", Some(&admin), None).json();
    let shown = keys["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["name"] == "pids")
        .expect("the key is listed")
        .clone();
    assert_eq!(shown["quotas"]["max_pids"], 600, "{shown}");

    let create = |pids: u64| {
        server.request(
            "POST",
            "/v1/sandboxes",
            Some(&key),
            Some(&body(json!({"resources": {"pids": pids}}))),
        )
    };
    let first = create(256);
    assert_eq!(
        first.status,
        201,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(create(256).status, 201);
    // 512 held: 256 more would make 768.
    let refused = create(256);
    refused.assert_error(429, "quota_exceeded");
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("pids"), "{message}");
    // What still fits is allowed.
    assert_eq!(create(64).status, 201);
    // An ended sandbox gives its pids back.
    let id = first.json()["id"].as_str().expect("id").to_owned();
    server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(create(256).status, 201);
}
