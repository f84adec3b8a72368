//! `moat serve` as a real process on a free port, driven over HTTP/1.1: health, auth, the
//! sandbox routes, tenancy, JSON errors for bad input, and a SIGTERM that leaves nothing behind.
//! Needs root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;
use support::need_root;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::server::*;

use moat_engine::store::{Quotas, Role, Store};
use serde_json::json;

#[test]
fn serve_end_to_end() {
    need_root!();
    let mut server = Server::start();
    let key = server.admin_key();
    assert!(key.starts_with("moat_"), "{key}");
    let key = Some(key.as_str());

    // Open endpoints.
    let r = server.request("GET", "/healthz", None, None);
    assert_eq!(r.status, 200);
    let r = server.request("GET", "/readyz", None, None);
    assert_eq!(r.status, 200);

    // Auth: no key, a wrong key, a wrong scheme.
    server
        .request("GET", "/v1/sandboxes", None, None)
        .assert_error(401, "unauthenticated");
    server
        .request(
            "GET",
            "/v1/sandboxes",
            Some("moat_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            None,
        )
        .assert_error(401, "unauthenticated");
    server
        .request("GET", "/v1/sandboxes", Some("nonsense"), None)
        .assert_error(401, "unauthenticated");

    // Create, exec, list, get.
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        key,
        Some(&body(json!({"metadata": {"suite": "serve"}}))),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let sandbox = r.json();
    assert_eq!(sandbox["state"], "running");
    let id = sandbox["id"].as_str().expect("id").to_owned();

    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        key,
        Some(&body(json!({"cmd": ["echo", "hi"]}))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let result = r.json();
    assert_eq!(result["stdout"], "hi\n");
    assert_eq!(result["exit_code"], 0);

    let r = server.request(
        "GET",
        "/v1/sandboxes?state=running&metadata=suite%3Dserve",
        key,
        None,
    );
    assert_eq!(r.status, 200);
    let list = r.json();
    let ids: Vec<&str> = list["sandboxes"]
        .as_array()
        .expect("sandboxes")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let r = server.request("GET", "/v1/sandboxes?metadata=suite%3Dother", key, None);
    assert_eq!(r.json()["sandboxes"], json!([]));
    server
        .request("GET", "/v1/sandboxes?state=asleep", key, None)
        .assert_error(400, "invalid");

    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), key, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], id.as_str());

    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/timeout"),
        key,
        Some(&body(json!({"timeout_secs": 600}))),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // Another tenant, made beside the running server (SQLite WAL allows a second writer).
    {
        let store = Store::open(server.data.join("moat.db")).expect("store");
        store.create_tenant("other", "Other").expect("tenant");
        let (_, secret) = store
            .create_key("other", "t", Role::User, Quotas::default())
            .expect("key");
        let other = Some(secret.expose());
        server
            .request("GET", &format!("/v1/sandboxes/{id}"), other, None)
            .assert_error(404, "not_found");
        server
            .request(
                "POST",
                &format!("/v1/sandboxes/{id}/exec"),
                other,
                Some(&body(json!({"cmd": ["true"]}))),
            )
            .assert_error(404, "not_found");
        server
            .request("DELETE", &format!("/v1/sandboxes/{id}"), other, None)
            .assert_error(404, "not_found");
        let r = server.request("GET", "/v1/sandboxes", other, None);
        assert_eq!(r.json()["sandboxes"], json!([]));
        // A revoked key is refused like an unknown one.
        let (revoked, secret) = store
            .create_key("other", "gone", Role::User, Quotas::default())
            .expect("key");
        store.revoke_key("other", &revoked.id).expect("revoke");
        server
            .request("GET", "/v1/sandboxes", Some(secret.expose()), None)
            .assert_error(401, "unauthenticated");
    }

    // Bad input: JSON errors, never a half-made sandbox.
    let exec_path = format!("/v1/sandboxes/{id}/exec");
    server
        .request("POST", &exec_path, key, Some(b"{\"cmd\": [\"echo\""))
        .assert_error(400, "invalid");
    server
        .request(
            "POST",
            &exec_path,
            key,
            Some(&body(json!({"command": "ls"}))),
        )
        .assert_error(400, "invalid");
    server
        .request(
            "POST",
            "/v1/sandboxes",
            key,
            Some(&body(json!({"tempalte": "host"}))),
        )
        .assert_error(400, "invalid");
    let oversized = vec![b' '; moat_server::MAX_BODY_BYTES + 1024];
    server
        .request("POST", &exec_path, key, Some(&oversized))
        .assert_error(413, "payload_too_large");
    server
        .request("GET", "/v1/nothing-here", key, None)
        .assert_error(404, "not_found");
    server
        .request("PUT", "/v1/sandboxes", key, None)
        .assert_error(405, "method_not_allowed");
    server
        .request("GET", "/v1/sandboxes/nosuchsandbox0000", key, None)
        .assert_error(404, "not_found");

    // Delete, then the record says killed.
    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), key, None);
    assert_eq!(r.status, 204);
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), key, None);
    assert_eq!(r.json()["state"], "killed");
    assert!(pids_in_sandbox(&id).is_empty());

    // One left running for the shutdown to end.
    let r = server.request("POST", "/v1/sandboxes", key, Some(b""));
    assert_eq!(r.status, 201, "{}", r.text());
    let last = r.json()["id"].as_str().expect("id").to_owned();
    assert!(
        !pids_in_sandbox(&last).is_empty(),
        "no process in the running sandbox"
    );

    sigterm(&server.child);
    let status = wait_exit(&mut server.child);
    assert_eq!(status.code(), Some(0), "{status}");
    for sandbox in [&id, &last] {
        assert_eq!(pids_in_sandbox(sandbox), Vec::<i32>::new(), "{sandbox}");
        assert_eq!(cgroup_dirs(sandbox), Vec::<PathBuf>::new(), "{sandbox}");
    }
    let store = Store::open(server.data.join("moat.db")).expect("store");
    let rec = store.get_sandbox("default", &last).expect("record");
    assert_eq!(rec.state.as_str(), "killed");
    assert_admin_key_private(&server.data);
}

fn assert_admin_key_private(data: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: PathBuf| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(data.join("admin.key")), 0o600);
    assert_eq!(mode(data.to_path_buf()), 0o700);
}

#[test]
fn expired_sandbox_is_reaped() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let key = Some(key.as_str());
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        key,
        Some(&body(json!({"timeout_secs": 1}))),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    // Polled up to a generous deadline: this checks that the reaper runs, not how fast.
    let deadline = Instant::now() + Duration::from_secs(60);
    let sandbox = loop {
        let s = server
            .request("GET", &format!("/v1/sandboxes/{id}"), key, None)
            .json();
        if s["state"] != "running" {
            break s;
        }
        assert!(Instant::now() < deadline, "sandbox {id} never expired");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(sandbox["state"], "killed", "{sandbox}");
    assert_eq!(sandbox["end_reason"], "ttl", "{sandbox}");
    // The end is recorded before the sandbox is destroyed (so a record that cannot be written
    // leaves it running as recorded): its processes and cgroups go just after.
    while !pids_in_sandbox(&id).is_empty() || !cgroup_dirs(&id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "sandbox {id} is recorded killed but still has processes {:?} or cgroups {:?}",
            pids_in_sandbox(&id),
            cgroup_dirs(&id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_restart_after_sigkill_reaps_what_the_old_server_left() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let id = server.create_sandbox(&key);
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(&key),
        Some(&body(
            json!({"shell": "sleep 1000 >/dev/null 2>&1 & echo started"}),
        )),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !pids_in_sandbox(&id).is_empty(),
        "the sandbox has no process"
    );

    // A crash: the server has no chance to clean up, and its sandbox outlives it.
    let (dir, data) = server.kill9();
    assert!(
        !pids_in_sandbox(&id).is_empty(),
        "the sandbox died with the server"
    );

    let server = Server::start_in(dir, data);
    // The killed processes were reparented to the host's init when the server died; give it a
    // moment to reap them (zombies still show their old cgroup).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids_in_sandbox(&id).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        pids_in_sandbox(&id).is_empty(),
        "the restart left processes of {id}"
    );
    assert!(
        cgroup_dirs(&id).is_empty(),
        "the restart left cgroups of {id}"
    );
    // Keys survive, and the API says what happened.
    let key = server.admin_key();
    let s = server
        .request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None)
        .json();
    assert_eq!(s["state"], "killed", "{s}");
    assert_eq!(s["end_reason"], "server_restart", "{s}");
    let r = server.request("POST", "/v1/sandboxes", Some(&key), Some(&body(json!({}))));
    assert_eq!(
        r.status,
        201,
        "the restarted server cannot create: {}",
        r.text()
    );
}

#[test]
fn a_server_without_root_creates_nothing_and_says_why() {
    use std::os::unix::process::CommandExt;
    need_root!("switching to an unprivileged user needs root");
    const NOBODY: u32 = 65534;
    let dir = tempfile::Builder::new()
        .prefix("moat-serve-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    // The unprivileged user could make the data dir: only the missing root stops it.
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
    let data = dir.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .uid(NOBODY)
        .gid(NOBODY) // with uid set, std also drops supplementary groups
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run moat serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("needs root") && stderr.contains("nothing was created"),
        "stderr: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "no admin key printed: {:?}",
        out.stdout
    );
    assert!(!data.exists(), "the data dir was created");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read tempdir")
        .collect();
    assert!(left.is_empty(), "nothing is created: {left:?}");
}

/// The first admin key's secret is kept before the key exists: when `admin.key` cannot be
/// written, the start fails and records no key, so the next start makes one whose secret is
/// in the file (no admin key that nobody can use).
#[test]
fn an_admin_key_whose_secret_cannot_be_kept_is_not_made() {
    need_root!();
    let dir = tempfile::Builder::new()
        .prefix("moat-serve-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data = dir.path().join("data");
    // A directory where the file goes: neither writing nor renaming over it works.
    std::fs::create_dir_all(data.join("admin.key/in-the-way")).expect("mkdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run moat serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("admin.key"), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "a secret was printed: {:?}",
        out.stdout
    );

    std::fs::remove_dir_all(data.join("admin.key")).expect("rm");
    let server = Server::start_in(dir, data);
    let key = server.admin_key();
    let r = server.request("GET", "/v1/sandboxes", Some(&key), None);
    assert_eq!(r.status, 200, "{}", r.text());
}
