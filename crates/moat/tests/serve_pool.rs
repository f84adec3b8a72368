//! Templates, warm pools and the one-shot `POST /v1/run` of a real `moat serve`, over HTTP.
//! Needs root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;
use support::need_root;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use moat_engine::store::{Quotas, Role, Store};
use serde_json::{Value, json};
use support::server::*;

/// Polls the template until its pool has `ready` members (a generous deadline for a loaded
/// machine; not a speed check).
fn wait_ready(server: &Server, key: &str, name: &str, ready: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = server
            .request("GET", &format!("/v1/templates/{name}"), Some(key), None)
            .json();
        if t["pool"]["ready"].as_u64() == Some(ready) {
            return t;
        }
        assert!(Instant::now() < deadline, "pool never reached {ready}: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn user_key(server: &Server, tenant: &str, quotas: Quotas) -> String {
    let store = Store::open(server.data.join("moat.db")).expect("store");
    if store.create_tenant(tenant, tenant).is_err() {
        // Made by an earlier call of this test.
    }
    let (_, secret) = store
        .create_key(tenant, "t", Role::User, quotas)
        .expect("key");
    secret.expose().to_owned()
}

#[test]
fn templates_crud_and_checks() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    let create =
        |key: &str, v: Value| server.request("POST", "/v1/templates", Some(key), Some(&body(v)));
    let r = create(
        &admin,
        json!({"name": "small", "spec": {"rootfs": "host", "resources": {"memory": "128M"},
               "env": {"GREETING": "hi"}, "workdir": "/tmp", "timeout_secs": 60}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let t = r.json();
    assert_eq!(t["name"], "small");
    assert_eq!(t["builtin"], false);
    create(&admin, json!({"name": "small", "spec": {"rootfs": "host"}}))
        .assert_error(409, "conflict");
    create(&admin, json!({"name": "host", "spec": {"rootfs": "host"}}))
        .assert_error(409, "conflict");
    for bad in [
        json!({"name": "Bad Name", "spec": {"rootfs": "host"}}),
        json!({"name": "b", "spec": {"rootfs": "host", "pool_size": 100000}}),
        json!({"name": "b", "spec": {"rootfs": "host", "user": "nobody"}}),
        json!({"name": "b", "spec": {"rootfs": "host", "workdir": "tmp"}}),
        json!({"name": "b", "spec": {"rootfs": "host", "resources": {"memory": "lots"}}}),
        json!({"name": "b", "spec": {"rootfs": "host", "ready_timeout_secs": 0}}),
        json!({"name": "b", "spec": {"rootfs": {"dir": "/no/such/dir"}}}),
        json!({"name": "b", "spec": {"rootfs": "host", "colour": "red"}}),
        json!({"name": "b"}),
    ] {
        create(&admin, bad.clone()).assert_error(400, "invalid");
    }

    // A sandbox of the template gets its env, workdir and limits.
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        Some(&admin),
        Some(&body(json!({"template": "small"}))),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let sb = r.json();
    assert_eq!(sb["resources"]["memory_bytes"], 128 << 20);
    // The template's time to live: 60 s.
    let ttl =
        sb["expires_at"].as_i64().expect("expires") - sb["created_at"].as_i64().expect("created");
    assert!((55_000..=61_000).contains(&ttl), "{sb}");
    let id = sb["id"].as_str().expect("id").to_owned();
    let out = server.shell(&admin, &id, "echo $GREETING; pwd");
    assert_eq!(out["stdout"], "hi\n/tmp\n", "{out}");

    // Listed beside the built-ins; another tenant sees only the built-ins.
    let names = |key: &str| -> Vec<String> {
        server
            .request("GET", "/v1/templates", Some(key), None)
            .json()["templates"]
            .as_array()
            .expect("templates")
            .iter()
            .map(|t| t["name"].as_str().expect("name").to_owned())
            .collect()
    };
    assert_eq!(
        names(&admin),
        ["base", "code-interpreter-v1", "host", "small"]
    );
    let other = user_key(&server, "other", Quotas::default());
    assert_eq!(names(&other), ["base", "code-interpreter-v1", "host"]);
    server
        .request("GET", "/v1/templates/small", Some(&other), None)
        .assert_error(404, "not_found");
    server
        .request("DELETE", "/v1/templates/small", Some(&other), None)
        .assert_error(404, "not_found");
    server
        .request("DELETE", "/v1/templates/host", Some(&other), None)
        .assert_error(409, "conflict");
    // Only an admin may read a host directory as a root filesystem.
    create(
        &other,
        json!({"name": "mine", "spec": {"rootfs": {"dir": "/usr"}}}),
    )
    .assert_error(403, "forbidden");

    // In use: refused unless forced; the sandbox keeps running.
    server
        .request("DELETE", "/v1/templates/small", Some(&admin), None)
        .assert_error(409, "conflict");
    server
        .request(
            "DELETE",
            "/v1/templates/small?force=maybe",
            Some(&admin),
            None,
        )
        .assert_error(400, "invalid");
    let r = server.request(
        "DELETE",
        "/v1/templates/small?force=true",
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(server.shell(&admin, &id, "echo still")["stdout"], "still\n");
    server
        .request("GET", "/v1/templates/small", Some(&admin), None)
        .assert_error(404, "not_found");
    server
        .request(
            "POST",
            "/v1/sandboxes",
            Some(&admin),
            Some(&body(json!({"template": "small"}))),
        )
        .assert_error(400, "invalid");
}

#[test]
fn start_and_ready_scripts_gate_a_sandbox() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    server.create_template(
        &admin,
        "web",
        json!({
            "rootfs": "host",
            "start": "sleep 0.3; echo up > /tmp/started; exec sleep 1000",
            "ready": "test -f /tmp/started && pgrep -x sleep",
        }),
    );
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        Some(&admin),
        Some(&body(json!({"template": "web"}))),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    // Ready means the start script got that far, and it is still running.
    let out = server.shell(&admin, &id, "cat /tmp/started; pgrep -c -x sleep");
    assert_eq!(out["stdout"], "up\n1\n", "{out}");

    // A ready script that never passes fails the create, and leaves a failed record.
    server.create_template(
        &admin,
        "never",
        json!({
            "rootfs": "host", "ready": "echo not yet; exit 1", "ready_timeout_secs": 1,
        }),
    );
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        Some(&admin),
        Some(&body(
            json!({"template": "never", "metadata": {"t": "never"}}),
        )),
    );
    // The template's own doing: a retry would fail the same way.
    r.assert_error(409, "conflict");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not yet")),
        "{}",
        r.json()
    );
    let list = server
        .request("GET", "/v1/sandboxes?metadata=t=never", Some(&admin), None)
        .json();
    assert_eq!(list["sandboxes"][0]["state"], "failed", "{list}");

    // A create with an idempotency key that failed so keeps no claim on the key: its retry
    // tries again (and fails again) instead of answering with the failed sandbox.
    for attempt in 0..2 {
        let r = server
            .send(
                "POST",
                "/v2/sandboxes",
                None,
                &[
                    ("X-API-KEY", admin.as_str()),
                    ("Idempotency-Key", "never-1"),
                    ("Content-Type", "application/json"),
                ],
                Some(&body(
                    json!({"templateID": "never", "metadata": {"t": "keyed"}}),
                )),
            )
            .expect("send");
        assert_eq!(r.status, 409, "attempt {attempt}: {}", r.text());
    }
    let list = server
        .request("GET", "/v1/sandboxes?metadata=t=keyed", Some(&admin), None)
        .json();
    assert_eq!(
        list["sandboxes"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );
}

#[test]
fn fifty_clients_claim_from_one_pool_and_none_twice() {
    need_root!();
    const CLIENTS: usize = 50;
    let server = Server::start();
    let admin = server.admin_key();
    server.create_template(
        &admin,
        "warm",
        json!({"rootfs": "host", "pool_size": CLIENTS}),
    );
    let t = wait_ready(&server, &admin, "warm", CLIENTS as u64);
    assert_eq!(t["pool"]["target"], CLIENTS, "{t}");
    // Pool members belong to no one until claimed.
    let listed = server
        .request("GET", "/v1/sandboxes", Some(&admin), None)
        .json();
    assert_eq!(listed["sandboxes"], json!([]), "{listed}");

    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (server, admin) = (&server, &admin);
                s.spawn(move || {
                    let r = server.request(
                        "POST",
                        "/v1/sandboxes",
                        Some(admin),
                        Some(&body(
                            json!({"template": "warm", "metadata": {"client": i.to_string()}}),
                        )),
                    );
                    assert_eq!(r.status, 201, "{}", r.text());
                    r.json()["id"].as_str().expect("id").to_owned()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), CLIENTS, "a sandbox was handed out twice");
    // Every one was a claim: none waited for a cold start.
    let metrics = server.request("GET", "/metrics", Some(&admin), None);
    let text = metrics.text();
    let count = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert_eq!(count("moat_claim_seconds_count "), CLIENTS as u64, "{text}");
    assert_eq!(count("moat_create_seconds_count "), 0, "{text}");
    // Each is its own, running sandbox, owned by the claimer with its metadata.
    for id in &ids {
        let marker = server.shell(
            &admin,
            id,
            &format!("echo {id} > /tmp/owner; cat /tmp/owner"),
        );
        assert_eq!(marker["stdout"], format!("{id}\n"));
        let s = server
            .request("GET", &format!("/v1/sandboxes/{id}"), Some(&admin), None)
            .json();
        assert_eq!(s["state"], "running", "{s}");
        assert_eq!(s["template"], "warm", "{s}");
    }
    // The pool refills in the background.
    wait_ready(&server, &admin, "warm", CLIENTS as u64);
}

#[test]
fn a_quota_refused_claim_leaves_the_member_in_the_pool() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    // A built-in's pool serves every tenant: give `host`'s sibling a pool as the admin.
    server.create_template(&admin, "two", json!({"rootfs": "host", "pool_size": 2}));
    wait_ready(&server, &admin, "two", 2);
    let quotas = Quotas {
        max_sandboxes: Some(1),
        ..Quotas::default()
    };
    let user = user_key(&server, "default", quotas);
    let create = || {
        server.request(
            "POST",
            "/v1/sandboxes",
            Some(&user),
            Some(&body(json!({"template": "two"}))),
        )
    };
    assert_eq!(create().status, 201);
    create().assert_error(429, "quota_exceeded");
    // The refused claim put its member back: one claimed, one ready, one refilling.
    wait_ready(&server, &admin, "two", 2);
}

#[test]
fn run_is_one_shot() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    let r = server.request(
        "POST",
        "/v1/run",
        Some(&admin),
        Some(&body(json!({
            "code": "import sys\ndata = open('in.txt').read()\nopen('out.txt', 'w').write(data.upper())\nprint('read', len(data))\nsys.exit(4)",
            "files": [{"path": "in.txt", "content": "hello"}, {"path": "/tmp/b.bin", "content_b64": "AAEC"}],
            "output_files": ["out.txt", "missing.txt", "/tmp/b.bin"],
        }))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(out["stdout"], "read 5\n", "{out}");
    assert_eq!(out["exit_code"], 4, "{out}");
    assert_eq!(out["files"][0]["content_b64"], "SEVMTE8=", "{out}");
    assert!(out["files"][1]["error"].as_str().is_some(), "{out}");
    assert_eq!(out["files"][2]["content_b64"], "AAEC", "{out}");
    // The sandbox is gone.
    let id = out["sandbox_id"].as_str().expect("id");
    let s = server
        .request("GET", &format!("/v1/sandboxes/{id}"), Some(&admin), None)
        .json();
    assert_eq!(s["state"], "killed", "{s}");
    assert!(pids_in_sandbox(id).is_empty());

    let r = server.request(
        "POST",
        "/v1/run",
        Some(&admin),
        Some(&body(
            json!({"shell": "echo $X; sleep 5", "env": {"X": "y"}, "timeout_secs": 1}),
        )),
    );
    let out = r.json();
    assert_eq!(out["timed_out"], true, "{out}");
    for bad in [
        json!({}),
        json!({"code": "1", "shell": "true"}),
        json!({"code": "1", "language": "cobol"}),
        json!({"shell": "true", "language": "python"}),
        json!({"shell": "true", "files": [{"path": "x"}]}),
        json!({"shell": "true", "template": "nope"}),
        json!({"shell": "true", "extra": 1}),
    ] {
        server
            .request("POST", "/v1/run", Some(&admin), Some(&body(bad)))
            .assert_error(400, "invalid");
    }
    // Its body limit is larger than the other routes', and still a limit.
    let big = "x".repeat(2 << 20);
    let r = server.request(
        "POST",
        "/v1/run",
        Some(&admin),
        Some(&body(
            json!({"shell": "wc -c < big", "files": [{"path": "big", "content": big}]}),
        )),
    );
    assert_eq!(r.json()["stdout"], format!("{}\n", 2 << 20));
    let huge = "x".repeat(17 << 20);
    server
        .request(
            "POST",
            "/v1/run",
            Some(&admin),
            Some(&body(
                json!({"shell": "true", "files": [{"path": "h", "content": huge}]}),
            )),
        )
        .assert_error(413, "payload_too_large");
}

/// Sandbox ids whose processes descend from `ancestor`.
fn sandboxes_under(ancestor: u32) -> HashSet<String> {
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        rest.split(' ').nth(1)?.parse().ok()
    };
    let mut ids = HashSet::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        let Some(id) = cgroup.lines().find_map(|l| {
            l.split("/moat/")
                .nth(1)
                .map(|r| r.split('/').next().unwrap_or("").to_owned())
        }) else {
            continue;
        };
        let mut p = pid;
        for _ in 0..64 {
            match parent(p) {
                Some(pp) if pp == ancestor => {
                    ids.insert(id.clone());
                    break;
                }
                Some(pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    ids
}

#[test]
fn a_restart_after_sigkill_reaps_pool_members() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    server.create_template(&admin, "warm", json!({"rootfs": "host", "pool_size": 3}));
    wait_ready(&server, &admin, "warm", 3);
    let members = sandboxes_under(server.child.id());
    assert_eq!(members.len(), 3, "{members:?}");

    let (dir, data) = server.kill9();
    let server = Server::start_in(dir, data);
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = || members.iter().any(|id| !pids_in_sandbox(id).is_empty());
    while left() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for id in &members {
        assert!(
            pids_in_sandbox(id).is_empty(),
            "the restart left processes of {id}"
        );
        assert!(
            cgroup_dirs(id).is_empty(),
            "the restart left cgroups of {id}"
        );
    }
    // The template survived, and its pool fills again with new members.
    let key = server.admin_key();
    wait_ready(&server, &key, "warm", 3);
}

#[test]
fn a_sandbox_whose_agent_dies_is_failed_and_released() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        Some(&admin),
        Some(&body(json!({}))),
    );
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().expect("id").to_owned();
    for pid in pids_in_sandbox(&id) {
        // SAFETY: kill has no memory preconditions; these are the sandbox's processes.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = server
            .request("GET", &format!("/v1/sandboxes/{id}"), Some(&admin), None)
            .json();
        if s["state"] != "running" || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["end_reason"]
            .as_str()
            .is_some_and(|r| r.contains("agent")),
        "{s}"
    );
    assert!(cgroup_dirs(&id).is_empty(), "its cgroups are left");
}

#[test]
fn a_pool_member_whose_agent_hangs_is_replaced() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    server.create_template(&admin, "one", json!({"rootfs": "host", "pool_size": 1}));
    wait_ready(&server, &admin, "one", 1);
    let members = sandboxes_under(server.child.id());
    assert_eq!(members.len(), 1, "{members:?}");
    let hung = members.into_iter().next().expect("member");
    // Freeze it: its agent's connection stays open, but nothing answers.
    let frozen = cgroup_dirs(&hung).into_iter().any(|dir| {
        let v1 = dir.join("freezer.state");
        let v2 = dir.join("cgroup.freeze");
        (v1.exists() && std::fs::write(&v1, "FROZEN").is_ok())
            || (v2.exists() && std::fs::write(&v2, "1").is_ok())
    });
    assert!(frozen, "could not freeze {hung}");
    // A generous deadline for a loaded machine (probes run every few seconds); not a speed check.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = sandboxes_under(server.child.id());
        if !now.contains(&hung) && now.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hung member was not replaced: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        cgroup_dirs(&hung).is_empty(),
        "the hung member's cgroups are left"
    );
    wait_ready(&server, &admin, "one", 1);
}
