//! A long-running `moat serve` keeps nothing forever: records of ended sandboxes go after the
//! retention (so create/delete cycles do not grow the database), and empty sandbox cgroups that
//! killed processes left are swept while it runs. Needs root (the server's native backend);
//! skips with a printed reason otherwise.

use moat_test_support as support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::need_root;
use support::server::*;

/// Pages of the server's database, read beside it (WAL lets a reader in).
fn pages(server: &Server) -> i64 {
    let db = rusqlite::Connection::open_with_flags(
        server.data.join("moat.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open moat.db");
    db.query_row("PRAGMA page_count", [], |r| r.get(0))
        .expect("page_count")
}

/// The records of ended sandboxes the server still shows.
fn ended(server: &Server, key: &str) -> usize {
    let list = server
        .request("GET", "/v1/sandboxes?state=killed", Some(key), None)
        .json();
    list["sandboxes"].as_array().expect("sandboxes").len()
}

/// Creates `n` sandboxes with as much metadata as a record may hold, deletes them, then waits
/// until their records are gone. All `n` run at once before any is deleted, so every call holds
/// exactly `n` records at its peak: the file's size (its high-water mark) then does not depend on
/// how many records the once-a-second purge happened to delete between a create and the next.
fn cycles(server: &Server, key: &str, n: usize) {
    // 4 values of 4000 bytes: just under the 16 KiB of metadata one record may hold.
    let metadata: serde_json::Map<String, serde_json::Value> = (0..4)
        .map(|i| (format!("k{i}"), json!("x".repeat(4000))))
        .collect();
    let ids: Vec<String> = (0..n)
        .map(|_| {
            let r = server.request(
                "POST",
                "/v1/sandboxes",
                Some(key),
                Some(&body(json!({"metadata": metadata}))),
            );
            assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
            r.json()["id"].as_str().expect("id").to_owned()
        })
        .collect();
    for id in ids {
        let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(key), None);
        assert!(r.status < 300, "{}", String::from_utf8_lossy(&r.body));
    }
    assert!(ended(server, key) > 0, "ended records are kept for a while");
    // A deadline for a loaded machine, not a speed check.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ended(server, key) > 0 {
        assert!(
            Instant::now() < deadline,
            "records of ended sandboxes are never deleted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ended_records_go_after_the_retention_and_the_database_stays_flat() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start_with(&["--retention", "1s"]);
    let key = server.admin_key();
    cycles(&server, &key, 20);
    let first = pages(&server);
    cycles(&server, &key, 20);
    let second = pages(&server);
    assert!(
        second <= first,
        "the database grew from {first} to {second} pages across create/delete cycles"
    );

    // One record's metadata is bounded as a whole, not only per value.
    let metadata: serde_json::Map<String, serde_json::Value> = (0..5)
        .map(|i| (format!("k{i}"), json!("x".repeat(4000))))
        .collect();
    server
        .request(
            "POST",
            "/v1/sandboxes",
            Some(&key),
            Some(&body(json!({"metadata": metadata}))),
        )
        .assert_error(400, "invalid");
}

#[test]
fn a_running_server_sweeps_empty_cgroups_left_behind() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start_with(&["--retention", "1s"]);
    // What a `moat run` killed between making its cgroups and arming its guardian leaves:
    // empty sandbox cgroups, older than any create in progress.
    let id = format!("leftover{}", std::process::id());
    let layout = moat_jail::cgroup::Layout::detect().expect("cgroup layout");
    for base in layout.bases().into_iter().filter(|b| b.is_dir()) {
        let dir = base.join(&id);
        std::fs::create_dir(&dir).expect("mkdir cgroup");
        let status = std::process::Command::new("touch")
            .args(["-d", "2 hours ago"])
            .arg(&dir)
            .status()
            .expect("touch");
        assert!(status.success());
    }
    assert!(!cgroup_dirs(&id).is_empty());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cgroup_dirs(&id).is_empty() {
        if Instant::now() > deadline {
            for dir in cgroup_dirs(&id) {
                let _ = std::fs::remove_dir(dir);
            }
            panic!("a running server never swept empty sandbox cgroups");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(server);
}
