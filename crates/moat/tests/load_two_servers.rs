//! Load beside a neighbour: 8 clients create, use and delete sandboxes on one `moat serve`
//! while a second server, on a data dir of its own and in keep mode, starts, makes sandboxes,
//! stops (keeping them) and starts again (adopting them), several times. Every acknowledged
//! answer must be right (nothing lost), neither server may touch the other's sandboxes, and at
//! the end nothing is left on the host (no process, cgroup or agent socket of any sandbox).
//! Bounded in count: 8 × 12 cycles on the first server, 3 rounds on the second.
//! Needs root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::need_root;
use support::server::*;

const CLIENTS: usize = 8;
const CYCLES: usize = 12;
const NEIGHBOUR_ROUNDS: usize = 3;
const NEIGHBOUR_SANDBOXES: usize = 2;

/// One client's life: create, exec, write and read back a file, delete; every answer checked.
fn client(server: &Server, key: &str, n: usize, ids: &Mutex<Vec<String>>) {
    for cycle in 0..CYCLES {
        let id = server.create_sandbox(key);
        ids.lock().expect("ids").push(id.clone());
        let out = server.shell(key, &id, &format!("echo {n}-{cycle}"));
        assert_eq!(out["stdout"], format!("{n}-{cycle}\n"), "{out}");
        let content = format!("client {n} cycle {cycle}");
        let path = format!("/v1/sandboxes/{id}/files?path=/tmp/f");
        let r = server.send("PUT", &path, Some(key), &[], Some(content.as_bytes()));
        assert_eq!(
            r.as_ref().map(|r| r.status).ok(),
            Some(200),
            "upload to {id}"
        );
        let r = server.request("GET", &path, Some(key), None);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, content.as_bytes(), "file of {id}");
        let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(key), None);
        assert!(
            r.status == 200 || r.status == 204,
            "delete {id}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(key), None);
        assert_eq!(r.json()["state"], "killed", "{id} after its delete");
    }
}

/// The neighbour: a keep-mode server that starts, makes sandboxes, stops keeping them and is
/// started again to adopt them, `NEIGHBOUR_ROUNDS` times; each round its sandboxes must have
/// survived with their files. Returns every id it made.
fn neighbour() -> Vec<String> {
    let keep = ["--on-shutdown", "keep"];
    let mut server = Server::start_with(&keep);
    let key = server.admin_key();
    let mut ids: Vec<String> = Vec::new();
    for round in 0..NEIGHBOUR_ROUNDS {
        for _ in 0..NEIGHBOUR_SANDBOXES {
            let id = server.create_sandbox(&key);
            server.shell(&key, &id, &format!("echo {round} > /tmp/round"));
            ids.push(id);
        }
        let (dir, data) = server.stop();
        server = Server::start_in_with(dir, data, &keep);
        for id in &ids {
            let out = server.shell(&key, id, "cat /tmp/round");
            assert_eq!(
                out["exit_code"], 0,
                "neighbour's {id} after a restart: {out}"
            );
        }
    }
    // A last stop in destroy mode: the neighbour's sandboxes go with it.
    let (dir, data) = server.stop();
    let server = Server::start_in(dir, data);
    for id in &ids {
        let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
        assert_eq!(r.json()["state"], "running", "neighbour's {id} at the end");
    }
    server.stop();
    ids
}

fn assert_gone(id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = pids_in_sandbox(id);
        let dirs = cgroup_dirs(id);
        let socket = Path::new("/run/moat/agents").join(format!("{id}.sock"));
        if pids.is_empty() && dirs.is_empty() && !socket.exists() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sandbox {id} left processes {pids:?}, cgroups {dirs:?} or its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn eight_clients_beside_a_restarting_keep_mode_neighbour_lose_and_leak_nothing() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start_with(&["--on-shutdown", "keep"]);
    let key = server.admin_key();
    let ids = Mutex::new(Vec::new());
    // A sandbox that lives through the whole run on the main server.
    let resident = server.create_sandbox(&key);
    server.shell(&key, &resident, "echo resident > /tmp/mark");
    let neighbour_ids = std::thread::scope(|s| {
        let neighbour = s.spawn(neighbour);
        let clients: Vec<_> = (0..CLIENTS)
            .map(|n| {
                let (server, key, ids) = (&server, &key, &ids);
                s.spawn(move || client(server, key, n, ids))
            })
            .collect();
        for c in clients {
            c.join().expect("a client failed");
        }
        neighbour.join().expect("the neighbour failed")
    });
    let out = server.shell(&key, &resident, "cat /tmp/mark");
    assert_eq!(out["stdout"], "resident\n", "{out}");
    let r = server.request("GET", "/v1/sandboxes?state=running", Some(&key), None);
    let listing = r.json();
    let running: Vec<&str> = listing["sandboxes"]
        .as_array()
        .expect("sandboxes")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(running, vec![resident.as_str()], "{listing}");
    let r = server.request(
        "DELETE",
        &format!("/v1/sandboxes/{resident}"),
        Some(&key),
        None,
    );
    assert!(r.status == 200 || r.status == 204);
    drop(server);
    let ids = ids.into_inner().expect("ids");
    assert_eq!(ids.len(), CLIENTS * CYCLES);
    for id in ids.iter().chain(&neighbour_ids).chain([&resident]) {
        assert_gone(id);
    }
}
