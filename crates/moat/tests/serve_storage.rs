//! `moat serve` with its data dir on a small tmpfs that fills up: state-changing requests are
//! refused cleanly (`507 insufficient_storage`) with nothing changed, `/readyz` says why, a
//! sandbox whose delete was refused runs on as recorded, and everything works again once there
//! is room. Needs root (the native backend, and to mount the tmpfs); skips otherwise.

use moat_test_support as support;
use support::need_root;

use std::path::PathBuf;

use serde_json::json;
use support::server::*;
use support::tmpfs::{Tmpfs, fill};

fn exec(server: &Server, key: &str, id: &str) -> Reply {
    server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(key),
        Some(&body(json!({ "shell": "echo alive" }))),
    )
}

#[test]
fn a_full_data_dir_refuses_changes_cleanly_and_keeps_records_true() {
    need_root!("moat serve's native backend and the tmpfs need root");
    let tmpfs = Tmpfs::mount("48m");
    let data: PathBuf = tmpfs.path().join("data");
    let home = tempfile::Builder::new()
        .prefix("moat-serve-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let server = Server::start_in(home, data);
    let key = server.admin_key();
    let id = server.create_sandbox(&key);
    assert_eq!(server.request("GET", "/readyz", None, None).status, 200);

    let filler = tmpfs.path().join("filler");
    fill(&filler);

    // Not ready, and why.
    let r = server.request("GET", "/readyz", None, None);
    r.assert_error(503, "insufficient_storage");
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("data dir is full"), "{message}");

    // Changes are refused with nothing done.
    server
        .request("POST", "/v1/sandboxes", Some(&key), Some(&body(json!({}))))
        .assert_error(507, "insufficient_storage");
    server
        .request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None)
        .assert_error(507, "insufficient_storage");
    let r = server
        .send(
            "POST",
            "/v2/sandboxes",
            None,
            &[("X-API-KEY", &key), ("Content-Type", "application/json")],
            Some(&body(json!({ "templateID": "base" }))),
        )
        .expect("E2B create");
    assert_eq!(r.status, 507, "{}", r.text());
    assert_eq!(r.json()["code"], 507, "{}", r.json());

    // The sandbox whose delete was refused is what its record says: running, and it answers.
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.json()["state"], "running", "{}", r.json());
    let r = exec(&server, &key, &id);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["stdout"], "alive\n");

    // Room again: everything works.
    std::fs::remove_file(&filler).expect("remove the filler");
    assert_eq!(server.request("GET", "/readyz", None, None).status, 200);
    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.status, 204, "{}", r.text());
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.json()["state"], "killed", "{}", r.json());
    exec(&server, &key, &id).assert_error(409, "conflict");
    server.create_sandbox(&key);
    drop(server);
}
