//! `moat serve --on-shutdown keep`: sandboxes outlive a stop (or a crash) of the server and the
//! next server on the same data dir takes them over, with their files and processes; their uid
//! ranges stay out of use meanwhile. A sandbox whose server died while it was paused, with no
//! one left to end it, is killed by the next start. Needs root (the native backend); skips
//! otherwise.

use moat_test_support as support;
use support::need_root;

use std::time::{Duration, Instant};

use support::server::*;

/// The uid-range slot markers naming `id`.
fn markers_of(id: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/run/moat/slots") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".kept"))
        .filter(|e| {
            std::fs::read_to_string(e.path()).is_ok_and(|t| t.split_whitespace().next() == Some(id))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn wait_gone(id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids_in_sandbox(id).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kept_sandboxes_survive_a_stop_and_are_taken_over() {
    need_root!();
    let server = Server::start_with(&["--on-shutdown", "keep"]);
    let key = server.admin_key();
    let id = server.create_sandbox(&key);
    let out = server.shell(
        &key,
        &id,
        "echo remembered > /tmp/state; sleep 1000 >/dev/null 2>&1 & echo $!",
    );
    let sleeper = out["stdout"].as_str().expect("stdout").trim().to_owned();
    assert!(!sleeper.is_empty(), "{out}");
    assert_eq!(
        markers_of(&id).len(),
        1,
        "a keepable sandbox has one slot marker"
    );

    // A graceful stop keeps it running and recorded as running.
    let (dir, data) = server.stop();
    let pids = pids_in_sandbox(&id);
    assert!(!pids.is_empty(), "the kept sandbox died with the server");
    assert_eq!(
        markers_of(&id).len(),
        1,
        "its slot stays marked while no server runs"
    );

    // The next server takes it over: same state, same processes.
    let server = Server::start_in_with(dir, data, &["--on-shutdown", "keep"]);
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "running", "{}", r.json());
    let out = server.shell(&key, &id, "cat /tmp/state");
    assert_eq!(out["stdout"], "remembered\n", "{out}");
    let out = server.shell(&key, &id, &format!("kill -0 {sleeper} && echo alive"));
    assert_eq!(
        out["stdout"], "alive\n",
        "the background process was lost: {out}"
    );

    // A crash keeps it too.
    let (dir, data) = server.kill9();
    assert!(
        !pids_in_sandbox(&id).is_empty(),
        "the kept sandbox died in the crash"
    );
    let server = Server::start_in(dir, data);
    let out = server.shell(&key, &id, "cat /tmp/state");
    assert_eq!(out["stdout"], "remembered\n", "{out}");

    // Deleting it releases everything, the marker included.
    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.status, 204, "{}", r.text());
    wait_gone(&id);
    assert!(pids_in_sandbox(&id).is_empty());
    assert!(cgroup_dirs(&id).is_empty());
    assert!(
        markers_of(&id).is_empty(),
        "the slot marker outlived the sandbox"
    );
}

#[test]
fn without_keep_a_stop_destroys_and_a_later_keep_server_adopts_nothing() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let id = server.create_sandbox(&key);
    assert!(
        markers_of(&id).is_empty(),
        "only keepable sandboxes are marked"
    );
    let (dir, data) = server.stop();
    wait_gone(&id);
    assert!(pids_in_sandbox(&id).is_empty());
    let server = Server::start_in_with(dir, data, &["--on-shutdown", "keep"]);
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.json()["state"], "killed", "{}", r.json());
}

#[test]
fn a_kept_sandbox_that_died_meanwhile_is_recorded_and_cleaned() {
    need_root!();
    let server = Server::start_with(&["--on-shutdown", "keep"]);
    let key = server.admin_key();
    let id = server.create_sandbox(&key);
    let (dir, data) = server.stop();
    // Something kills it while no server runs.
    for pid in pids_in_sandbox(&id) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    wait_gone(&id);
    let server = Server::start_in(dir, data);
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    let sandbox = r.json();
    assert_eq!(sandbox["state"], "killed", "{sandbox}");
    assert_eq!(sandbox["end_reason"], "server_restart", "{sandbox}");
    assert!(cgroup_dirs(&id).is_empty());
    assert!(markers_of(&id).is_empty());
}

fn assert_alive(id: &str, why: &str) {
    assert!(!pids_in_sandbox(id).is_empty(), "sandbox {id} died: {why}");
    assert_eq!(
        markers_of(id).len(),
        1,
        "sandbox {id} lost its marker: {why}"
    );
}

#[test]
fn servers_on_other_data_dirs_leave_each_others_sandboxes_alone() {
    need_root!();
    let a = Server::start_with(&["--on-shutdown", "keep"]);
    let key_a = a.admin_key();
    let a1 = a.create_sandbox(&key_a);

    // A server on another data dir starts while A runs, and makes one of its own.
    let b = Server::start();
    let key_b = b.admin_key();
    let b1 = b.create_sandbox(&key_b);
    assert_alive(&a1, "a second server started beside its server");
    assert_eq!(a.shell(&key_a, &a1, "echo ok")["stdout"], "ok\n");

    // A stops and keeps a1; a third server (keep) starts while nobody runs a1.
    let (dir_a, data_a) = a.stop();
    let c = Server::start_with(&["--on-shutdown", "keep"]);
    let key_c = c.admin_key();
    let c1 = c.create_sandbox(&key_c);
    assert_alive(&a1, "another server started while its own was stopped");
    assert!(
        !pids_in_sandbox(&b1).is_empty(),
        "a keep-mode server's start killed a destroy-mode server's sandbox"
    );
    assert_eq!(b.shell(&key_b, &b1, "echo ok")["stdout"], "ok\n");

    // B stops (destroying its own sandboxes) and C crashes: only their own are affected.
    let _b_data = b.stop();
    wait_gone(&b1);
    assert!(pids_in_sandbox(&b1).is_empty(), "B's sandbox outlived B");
    let (dir_c, data_c) = c.kill9();
    assert_alive(&a1, "other servers stopped");
    assert_alive(&c1, "its server crashed");

    // A comes back and takes over a1 only; C comes back and takes over c1.
    let a = Server::start_in_with(dir_a, data_a, &["--on-shutdown", "keep"]);
    assert_alive(&c1, "A restarted beside it");
    let r = a.request("GET", &format!("/v1/sandboxes/{a1}"), Some(&key_a), None);
    assert_eq!(r.json()["state"], "running", "{}", r.json());
    assert_eq!(a.shell(&key_a, &a1, "echo ok")["stdout"], "ok\n");
    let c = Server::start_in_with(dir_c, data_c, &["--on-shutdown", "keep"]);
    assert_alive(&a1, "C restarted beside it");
    assert_eq!(c.shell(&key_c, &c1, "echo ok")["stdout"], "ok\n");

    for (server, key, id) in [(&a, &key_a, &a1), (&c, &key_c, &c1)] {
        let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(key), None);
        assert_eq!(r.status, 204, "{}", r.text());
        wait_gone(id);
        assert!(markers_of(id).is_empty(), "the slot marker outlived {id}");
    }
}

#[test]
fn a_paused_sandbox_its_server_died_ending_is_killed_at_the_next_start() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let id = server.create_sandbox(&key);
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/pause"),
        Some(&key),
        Some(b"{}"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // The server dies just after recording the sandbox ended, before destroying it: frozen,
    // its agent cannot see its channel close.
    let (dir, data) = server.kill9();
    let store = moat_engine::store::Store::open(data.join("moat.db")).expect("store");
    store
        .update_sandbox_state(
            "default",
            &id,
            moat_engine::store::SandboxState::Killed,
            Some(moat_engine::store::EndReason::Deleted),
        )
        .expect("record it ended");
    drop(store);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !pids_in_sandbox(&id).is_empty(),
        "the frozen sandbox should have outlived its server"
    );

    let server = Server::start_in(dir, data);
    wait_gone(&id);
    assert!(
        pids_in_sandbox(&id).is_empty(),
        "a sandbox with no owner left outlived the next start"
    );
    assert!(cgroup_dirs(&id).is_empty(), "{:?}", cgroup_dirs(&id));
    // Its server goes on as it was.
    let other = server.create_sandbox(&key);
    assert_eq!(server.shell(&key, &other, "echo ok")["stdout"], "ok\n");
}
