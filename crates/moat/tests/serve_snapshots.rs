//! Pause and resume, snapshots and forks on a real `moat serve`, over HTTP: a paused sandbox
//! runs nothing (its busy process makes no progress, commands get 409) until resumed; a
//! snapshot keeps files with their owners, modes and symlinks (host template and directory
//! template alike) and survives a restart; forks are independent copies; tenants stay apart.
//! Needs root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;
use support::need_root;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::server::*;

fn post(server: &Server, key: &str, path: &str, v: Value) -> Reply {
    server.request("POST", path, Some(key), Some(&body(v)))
}

/// A new sandbox made with `req`; its id.
fn create(server: &Server, key: &str, req: Value) -> String {
    let r = post(server, key, "/v1/sandboxes", req);
    assert_eq!(r.status, 201, "{}", r.text());
    let s = r.json();
    assert_eq!(s["state"], "running", "{s}");
    s["id"].as_str().expect("id").to_owned()
}

/// Runs `shell` as `user` and returns its standard output, after checking it exited 0.
fn sh(server: &Server, key: &str, id: &str, user: &str, shell: &str) -> String {
    let r = post(
        server,
        key,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"shell": shell, "user": user}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(out["exit_code"], 0, "{shell}: {out}");
    out["stdout"].as_str().expect("stdout").to_owned()
}

/// A snapshot of `id`; its JSON.
fn snapshot(server: &Server, key: &str, id: &str, req: Value) -> Value {
    let r = post(server, key, &format!("/v1/sandboxes/{id}/snapshots"), req);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

/// A user key of a new tenant `tenant`, made over the API with the admin key.
fn tenant_key(server: &Server, admin: &str, tenant: &str) -> String {
    server.create_key(admin, json!({"name": tenant, "tenant": tenant}))
}

/// What the counter file of the busy process holds, read from the host through the
/// sandbox's root (its agent is frozen while paused, so the API cannot read it).
fn counter_from_host(id: &str) -> String {
    let pid = *pids_in_sandbox(id)
        .first()
        .expect("a process of the sandbox");
    std::fs::read_to_string(format!("/proc/{pid}/root/tmp/counter")).expect("counter file")
}

fn counter_value(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

#[test]
fn pause_freezes_every_process_and_resume_thaws_them() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let id = create(&server, &key, json!({}));
    // A process that burns CPU counting as fast as it can.
    sh(
        &server,
        &key,
        &id,
        "user",
        "(i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; done) >/dev/null 2>&1 &",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter_value(&sh(&server, &key, &id, "user", "cat /tmp/counter || true")) < 10 {
        assert!(Instant::now() < deadline, "the counter never started");
        std::thread::sleep(Duration::from_millis(20));
    }

    let r = post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/pause"),
        json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "paused");
    post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/pause"),
        json!({}),
    )
    .assert_error(409, "conflict");
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.json()["state"], "paused");

    // Nothing runs: no command, no file call, and the busy process stands still.
    let r = post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"shell": "echo hi"}),
    );
    r.assert_error(409, "conflict");
    assert!(r.text().contains("paused"), "{}", r.text());
    let r = server.request(
        "GET",
        &format!("/v1/sandboxes/{id}/files?path=/tmp/counter"),
        Some(&key),
        None,
    );
    r.assert_error(409, "conflict");
    let before = counter_from_host(&id);
    std::thread::sleep(Duration::from_millis(500));
    let after = counter_from_host(&id);
    assert_eq!(
        before, after,
        "the counter moved while the sandbox was paused"
    );

    // Resume (with a new time to live): it runs again, and so does the counter.
    let r = post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/resume"),
        json!({"timeout_secs": 600}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let s = r.json();
    assert_eq!(s["state"], "running");
    assert!(
        s["expires_at"].as_i64().expect("expiry")
            > s["created_at"].as_i64().expect("created") + 500_000
    );
    post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/resume"),
        json!({}),
    )
    .assert_error(409, "conflict");
    assert_eq!(sh(&server, &key, &id, "user", "echo hi"), "hi\n");
    let frozen_at = counter_value(&after);
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter_value(&sh(&server, &key, &id, "user", "cat /tmp/counter || true")) <= frozen_at {
        assert!(
            Instant::now() < deadline,
            "the counter did not run on after resume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A paused sandbox can be deleted; nothing of it is left.
    let r = post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/pause"),
        json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(
        pids_in_sandbox(&id).is_empty(),
        "processes of {id} are left"
    );
    post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/pause"),
        json!({}),
    )
    .assert_error(409, "conflict");
    post(
        &server,
        &key,
        "/v1/sandboxes/zzzzzzzzzzzzzzzz/pause",
        json!({}),
    )
    .assert_error(404, "not_found");
}

/// Files with different owners, modes and a symlink, in `/home/user` and `/tmp`.
const MAKE_FILES_AS_USER: &str = "set -e
mkdir -p /home/user/proj/sub
echo hello > /home/user/proj/a
chmod 640 /home/user/proj/a
chmod 700 /home/user/proj/sub
ln -s a /home/user/proj/link
ln -s /tmp/userfile /home/user/proj/abs
echo u > /tmp/userfile
chmod 604 /tmp/userfile
mkdir /tmp/d
chmod 711 /tmp/d";
const MAKE_FILES_AS_ROOT: &str = "set -e
echo r > /tmp/rootfile
chmod 600 /tmp/rootfile";
/// How those files look: owner, group, mode, type and link target of each.
const DESCRIBE_FILES: &str = "stat -c '%n %u:%g %a %F %N' /home/user/proj /home/user/proj/a \
/home/user/proj/sub /home/user/proj/link /home/user/proj/abs /tmp/userfile /tmp/d \
/tmp/rootfile; cat /home/user/proj/link";

#[test]
fn snapshots_keep_files_and_forks_are_independent() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let id = create(&server, &key, json!({"env": {"FROM": "source"}}));
    sh(&server, &key, &id, "user", MAKE_FILES_AS_USER);
    sh(&server, &key, &id, "root", MAKE_FILES_AS_ROOT);
    let original = sh(&server, &key, &id, "user", DESCRIBE_FILES);
    assert!(original.contains("/tmp/rootfile 0:0 600"), "{original}");
    assert!(
        original.contains("/home/user/proj/a 1000:1000 640"),
        "{original}"
    );

    // Snapshot: a file in the data dir, shown, listed, filterable.
    let snap = snapshot(&server, &key, &id, json!({"name": "with-files"}));
    let sid = snap["id"].as_str().expect("id").to_owned();
    assert!(
        sid.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{sid}"
    );
    assert_eq!(snap["sandbox_id"], id.as_str());
    assert_eq!(snap["template"], "host");
    assert_eq!(snap["memory"], false);
    assert_eq!(snap["name"], "with-files");
    let file = server.data.join("snapshots").join(format!("{sid}.tar"));
    let size = std::fs::metadata(&file).expect("snapshot file").len();
    assert_eq!(snap["size_bytes"].as_u64(), Some(size));
    let r = server.request("GET", &format!("/v1/snapshots/{sid}"), Some(&key), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), snap);
    let listed = server
        .request(
            "GET",
            &format!("/v1/snapshots?sandbox_id={id}"),
            Some(&key),
            None,
        )
        .json();
    assert_eq!(listed["snapshots"], json!([snap.clone()]));
    let none = server
        .request("GET", "/v1/snapshots?name=other", Some(&key), None)
        .json();
    assert_eq!(none["snapshots"], json!([]));

    // A sandbox from it: the same files, owners, modes and links, and the same environment.
    let copy = create(&server, &key, json!({"snapshot": sid}));
    assert_eq!(sh(&server, &key, &copy, "user", DESCRIBE_FILES), original);
    assert_eq!(sh(&server, &key, &copy, "user", "echo $FROM"), "source\n");

    // Fork: three independent copies of the source.
    let r = post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/fork"),
        json!({"count": 3}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let results = r.json()["results"].as_array().expect("results").clone();
    assert_eq!(results.len(), 3, "{results:?}");
    let forks: Vec<String> = results
        .iter()
        .map(|item| {
            assert!(item.get("error").is_none(), "{item}");
            item["sandbox"]["id"].as_str().expect("id").to_owned()
        })
        .collect();
    for f in &forks {
        assert_eq!(sh(&server, &key, f, "user", DESCRIBE_FILES), original);
    }
    sh(
        &server,
        &key,
        &forks[0],
        "user",
        "echo changed > /home/user/proj/a; touch /tmp/only-here",
    );
    assert_eq!(
        sh(&server, &key, &forks[1], "user", "cat /home/user/proj/a"),
        "hello\n"
    );
    assert_eq!(
        sh(
            &server,
            &key,
            &forks[2],
            "user",
            "test -e /tmp/only-here && echo yes || echo no"
        ),
        "no\n"
    );
    assert_eq!(
        sh(&server, &key, &id, "user", "cat /home/user/proj/a"),
        "hello\n"
    );
    // The fork's own snapshot is gone; the named one stays.
    let left: Vec<_> = std::fs::read_dir(server.data.join("snapshots"))
        .expect("snapshot dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec![format!("{sid}.tar")]);

    // Bad requests.
    for count in [0, 21] {
        post(
            &server,
            &key,
            &format!("/v1/sandboxes/{id}/fork"),
            json!({"count": count}),
        )
        .assert_error(400, "invalid");
    }
    post(
        &server,
        &key,
        "/v1/sandboxes",
        json!({"template": "host", "snapshot": sid}),
    )
    .assert_error(400, "invalid");
    post(
        &server,
        &key,
        "/v1/sandboxes",
        json!({"snapshot": sid, "resources": {"memory": "128M"}}),
    )
    .assert_error(400, "invalid");
    post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/snapshots"),
        json!({"name": ""}),
    )
    .assert_error(400, "invalid");

    // Another tenant sees none of it.
    let other = tenant_key(&server, &key, "other");
    for (method, path) in [
        ("GET", format!("/v1/snapshots/{sid}")),
        ("DELETE", format!("/v1/snapshots/{sid}")),
        ("POST", format!("/v1/sandboxes/{id}/snapshots")),
        ("POST", format!("/v1/sandboxes/{id}/fork")),
        ("POST", format!("/v1/sandboxes/{id}/pause")),
    ] {
        server
            .request(method, &path, Some(&other), None)
            .assert_error(404, "not_found");
    }
    post(&server, &other, "/v1/sandboxes", json!({"snapshot": sid})).assert_error(404, "not_found");
    let theirs = server
        .request("GET", "/v1/snapshots", Some(&other), None)
        .json();
    assert_eq!(theirs["snapshots"], json!([]));

    // Delete: the record and the file go; sandboxes made from it stay.
    let r = server.request("DELETE", &format!("/v1/snapshots/{sid}"), Some(&key), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(!file.exists(), "{} is left", file.display());
    server
        .request("GET", &format!("/v1/snapshots/{sid}"), Some(&key), None)
        .assert_error(404, "not_found");
    post(&server, &key, "/v1/sandboxes", json!({"snapshot": sid})).assert_error(404, "not_found");
    assert_eq!(
        sh(&server, &key, &copy, "user", "cat /home/user/proj/link"),
        "hello\n"
    );
}

#[test]
fn a_snapshot_larger_than_the_disk_is_refused() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let id = create(&server, &key, json!({"resources": {"disk": "1M"}}));
    // Thousands of empty files fit the disk, but their archive headers alone do not.
    sh(
        &server,
        &key,
        &id,
        "user",
        "mkdir /tmp/many && cd /tmp/many && seq 3000 | xargs touch",
    );
    post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/snapshots"),
        json!({}),
    )
    .assert_error(413, "too_large");
    let left = std::fs::read_dir(server.data.join("snapshots"))
        .expect("snapshot dir")
        .count();
    assert_eq!(left, 0, "the refused snapshot left a file");
    let r = server.request("GET", "/v1/snapshots", Some(&key), None);
    assert_eq!(r.json()["snapshots"], json!([]));
}

#[test]
fn a_paused_sandbox_can_be_snapshotted_and_stays_paused() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let id = create(&server, &key, json!({}));
    sh(&server, &key, &id, "user", "echo kept > /home/user/kept");
    let r = post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/pause"),
        json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let snap = snapshot(&server, &key, &id, json!({}));
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.json()["state"], "paused");
    post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"shell": "true"}),
    )
    .assert_error(409, "conflict");
    // A fork of a paused sandbox works the same way.
    let r = post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/fork"),
        json!({}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let fork = r.json()["results"][0]["sandbox"]["id"]
        .as_str()
        .expect("fork")
        .to_owned();
    assert_eq!(
        sh(&server, &key, &fork, "user", "cat /home/user/kept"),
        "kept\n"
    );
    let copy = create(&server, &key, json!({"snapshot": snap["id"]}));
    assert_eq!(
        sh(&server, &key, &copy, "user", "cat /home/user/kept"),
        "kept\n"
    );
}

#[test]
fn snapshots_survive_a_restart_and_paused_sandboxes_do_not() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let id = create(&server, &key, json!({}));
    sh(&server, &key, &id, "user", "echo durable > /home/user/f");
    let sid = snapshot(&server, &key, &id, json!({"name": "keep"}))["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let r = post(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/pause"),
        json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let (dir, data) = server.kill9();
    // A file without a record, as a crash between writing and recording would leave.
    let stray = data.join("snapshots").join(".tmp-stray.tar");
    std::fs::write(&stray, b"partial").expect("stray file");
    let server = Server::start_in(dir, data);

    // The paused sandbox was reaped like a running one.
    let s = server
        .request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None)
        .json();
    assert_eq!(s["state"], "killed", "{s}");
    assert_eq!(s["end_reason"], "server_restart", "{s}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids_in_sandbox(&id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the paused sandbox's processes are left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!stray.exists(), "the unrecorded file was not swept");

    // The snapshot is still there, and sandboxes start from it.
    let r = server.request("GET", &format!("/v1/snapshots/{sid}"), Some(&key), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let copy = create(&server, &key, json!({"snapshot": sid}));
    assert_eq!(
        sh(&server, &key, &copy, "user", "cat /home/user/f"),
        "durable\n"
    );
}

/// A minimal root filesystem: `dash` as `/bin/sh`, `cat` and `rm`, the libraries they link,
/// and the identity files.
fn tiny_rootfs(root: &Path) {
    support::tiny_rootfs(
        root,
        &[
            ("/usr/bin/dash", "sh"),
            ("/usr/bin/cat", "cat"),
            ("/usr/bin/rm", "rm"),
        ],
    );
    std::fs::create_dir_all(root.join("etc/sub")).expect("mkdir");
    std::fs::write(root.join("etc/sub/gone"), "from the template\n").expect("file");
    std::fs::write(root.join("etc/sub/kept"), "from the template\n").expect("file");
}

#[test]
fn a_directory_template_snapshot_keeps_removals() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let rootfs = tempfile::Builder::new()
        .prefix("moat-snap-rootfs-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    tiny_rootfs(rootfs.path());
    server.create_template(&key, "tiny", json!({"rootfs": {"dir": rootfs.path()}}));
    let id = create(&server, &key, json!({"template": "tiny"}));
    // Remove a file of the template, change another, add one.
    sh(
        &server,
        &key,
        &id,
        "root",
        "rm /etc/sub/gone && echo changed > /etc/sub/kept && echo new > /etc/new",
    );
    let sid = snapshot(&server, &key, &id, json!({}))["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let copy = create(&server, &key, json!({"snapshot": sid}));
    let look = "cat /etc/sub/kept /etc/new; test -e /etc/sub/gone && echo present || echo absent";
    assert_eq!(
        sh(&server, &key, &copy, "root", look),
        "changed\nnew\nabsent\n"
    );
    // The template itself is untouched.
    assert!(rootfs.path().join("etc/sub/gone").exists());
    assert!(!rootfs.path().join("etc/new").exists());
}

/// How many warm-pool claims the server has counted.
fn claims(server: &Server, key: &str) -> u64 {
    let r = server.request("GET", "/metrics", Some(key), None);
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix("moat_claim_seconds_count "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn wait_ready(server: &Server, key: &str, template: &str) {
    // A generous deadline for a loaded machine; not a speed check.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = server
            .request("GET", &format!("/v1/templates/{template}"), Some(key), None)
            .json();
        if t["pool"]["ready"].as_u64() == Some(1) {
            return;
        }
        assert!(Instant::now() < deadline, "the pool never filled: {t}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_create_from_a_snapshot_may_claim_a_warm_member() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    server.create_template(&key, "warm", json!({"rootfs": "host", "pool_size": 1}));
    wait_ready(&server, &key, "warm");
    let id = create(&server, &key, json!({"template": "warm"}));
    sh(&server, &key, &id, "user", "echo warm > /home/user/w");
    let sid = snapshot(&server, &key, &id, json!({}))["id"]
        .as_str()
        .expect("id")
        .to_owned();
    wait_ready(&server, &key, "warm");
    let before = claims(&server, &key);
    let copy = create(&server, &key, json!({"snapshot": sid}));
    assert_eq!(claims(&server, &key), before + 1, "not a claim");
    assert_eq!(
        sh(&server, &key, &copy, "user", "cat /home/user/w"),
        "warm\n"
    );
    // Asking for more (an environment) starts a sandbox of its own.
    wait_ready(&server, &key, "warm");
    let own = create(&server, &key, json!({"snapshot": sid, "env": {"X": "1"}}));
    assert_eq!(claims(&server, &key), before + 1, "a claim despite the env");
    assert_eq!(
        sh(&server, &key, &own, "user", "cat /home/user/w; echo $X"),
        "warm\n1\n"
    );
}

/// `moat ARGS` against `server` with `key`; asserts it exited 0 and returns its stdout.
#[test]
fn the_cli_pauses_snapshots_and_forks() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let id = server.cli(&key, &["sandbox", "create"]).trim().to_owned();
    server.cli(
        &key,
        &["sandbox", "exec", &id, "--", "sh", "-c", "echo cli > ~/c"],
    );
    assert_eq!(
        server.cli(&key, &["sandbox", "pause", &id]),
        format!("{id} paused\n")
    );
    assert_eq!(
        server.cli(&key, &["sandbox", "resume", &id, "--timeout", "10m"]),
        format!("{id} running\n")
    );
    let sid = server
        .cli(&key, &["snapshot", "create", &id, "--name", "cli"])
        .trim()
        .to_owned();
    let listed = server.cli(&key, &["snapshot", "ls", "--name", "cli"]);
    assert!(
        listed.lines().nth(1).is_some_and(|l| l.starts_with(&sid)),
        "{listed}"
    );
    let shown: Value =
        serde_json::from_str(&server.cli(&key, &["snapshot", "get", "-o", "json", &sid]))
            .expect("json");
    assert_eq!(shown["sandbox_id"], id.as_str());
    let copy = server
        .cli(&key, &["sandbox", "create", "--snapshot", &sid])
        .trim()
        .to_owned();
    assert_eq!(
        server.cli(
            &key,
            &["sandbox", "exec", &copy, "--", "cat", "/home/user/c"]
        ),
        "cli\n"
    );
    let forks = server.cli(&key, &["sandbox", "fork", &id, "-n", "2"]);
    assert_eq!(forks.lines().count(), 2, "{forks}");
    for f in forks.lines() {
        assert_eq!(
            server.cli(&key, &["sandbox", "exec", f, "--", "cat", "/home/user/c"]),
            "cli\n"
        );
    }
    assert_eq!(
        server.cli(&key, &["snapshot", "rm", &sid]),
        format!("{sid}\n")
    );
    assert_eq!(server.cli(&key, &["snapshot", "ls"]).lines().count(), 1);
}

/// The state and expiry of sandbox `id`.
fn state_of(server: &Server, key: &str, id: &str) -> (String, Value) {
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(key), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let s = r.json();
    (
        s["state"].as_str().unwrap_or_default().to_owned(),
        s["expires_at"].clone(),
    )
}

/// Waits (bounded) until sandbox `id` is `state`.
fn wait_state(server: &Server, key: &str, id: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while state_of(server, key, id).0 != state {
        assert!(Instant::now() < deadline, "{id} never became {state}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `lifecycle`: a sandbox whose time runs out is paused instead of ended, and stays paused
/// with no time to live; with `auto_resume` a command resumes it (and its time to live starts
/// again), without it a command is refused until a resume; a bad lifecycle is refused.
#[test]
fn a_lifecycle_pauses_at_the_timeout_and_calls_resume() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let resuming = create(
        &server,
        &key,
        json!({"timeout_secs": 1, "lifecycle": {"on_timeout": "pause", "auto_resume": true}}),
    );
    let waiting = create(
        &server,
        &key,
        json!({"timeout_secs": 1, "lifecycle": {"on_timeout": "pause"}}),
    );
    let ending = create(&server, &key, json!({"timeout_secs": 1}));
    let r = server.request(
        "GET",
        &format!("/v1/sandboxes/{resuming}"),
        Some(&key),
        None,
    );
    assert_eq!(
        r.json()["lifecycle"],
        json!({"on_timeout": "pause", "auto_resume": true})
    );
    let r = server.request("GET", &format!("/v1/sandboxes/{ending}"), Some(&key), None);
    assert_eq!(
        r.json()["lifecycle"],
        json!({"on_timeout": "kill", "auto_resume": false})
    );
    for id in [&resuming, &waiting] {
        sh(&server, &key, id, "user", "echo kept > /tmp/kept");
    }
    wait_state(&server, &key, &resuming, "paused");
    wait_state(&server, &key, &waiting, "paused");
    wait_state(&server, &key, &ending, "killed");
    // Paused, with no time to live: still paused well after.
    std::thread::sleep(Duration::from_millis(1500));
    for id in [&resuming, &waiting] {
        assert_eq!(state_of(&server, &key, id), ("paused".into(), Value::Null));
    }

    // envd's health check needs no token, so it resumes nothing: anyone knowing the id could
    // otherwise keep it running.
    let r = server
        .send(
            "GET",
            "/health",
            None,
            &[
                ("E2b-Sandbox-Id", resuming.as_str()),
                ("E2b-Sandbox-Port", "49983"),
            ],
            None,
        )
        .expect("health");
    assert!(!(200..300).contains(&r.status), "{} {}", r.status, r.text());
    assert_eq!(state_of(&server, &key, &resuming).0, "paused");

    // A command resumes the one that asks for it, and it runs on with a new time to live.
    assert_eq!(
        sh(&server, &key, &resuming, "user", "cat /tmp/kept"),
        "kept\n"
    );
    let (state, expires) = state_of(&server, &key, &resuming);
    assert_eq!(state, "running");
    assert!(expires.is_number(), "{expires}");
    // The other answers 409 until it is resumed.
    let r = post(
        &server,
        &key,
        &format!("/v1/sandboxes/{waiting}/exec"),
        json!({"shell": "true"}),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    let r = post(
        &server,
        &key,
        &format!("/v1/sandboxes/{waiting}/resume"),
        json!({"timeout_secs": 60}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        sh(&server, &key, &waiting, "user", "cat /tmp/kept"),
        "kept\n"
    );

    let r = post(
        &server,
        &key,
        "/v1/sandboxes",
        json!({"lifecycle": {"on_timeout": "sleep"}}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    for id in [&resuming, &waiting] {
        let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None);
        assert!(r.status == 200 || r.status == 204, "{}", r.text());
    }
}
