//! A sandbox's limits as a `moat serve` client meets them: a sandbox that fills its memory with
//! files loses the writing process, reported as an out-of-memory kill, and goes on serving.
//! Needs root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;
use support::need_root;

use serde_json::json;
use support::server::*;

#[test]
fn filling_memory_with_files_kills_the_writer_and_the_sandbox_lives_on() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let create = json!({"resources": {"memory": "64M", "disk": "1G"}});
    let r = server.request("POST", "/v1/sandboxes", Some(&key), Some(&body(create)));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let exec = |shell: &str| {
        let path = format!("/v1/sandboxes/{id}/exec");
        let r = server.request(
            "POST",
            &path,
            Some(&key),
            Some(&body(json!({ "shell": shell }))),
        );
        assert_eq!(r.status, 200, "{}", r.text());
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
    assert_eq!(r.status, 204, "{}", r.text());
    let after = exec("echo alive");
    assert_eq!(after["stdout"], "alive\n", "{after}");
    assert_eq!(after["exit_code"], 0, "{after}");
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.json()["state"], "running", "{}", r.json());
}

#[test]
fn a_fork_bomb_leaves_the_agent_room_to_serve() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let create = json!({"resources": {"pids": 32}});
    let r = server.request("POST", "/v1/sandboxes", Some(&key), Some(&body(create)));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let path = format!("/v1/sandboxes/{id}/exec");
    // Threads until the pids limit refuses one, all held: unlike a shell fork bomb, whose
    // processes die and free their pids, this keeps the limit full.
    let hold = "import threading, time\n\
                n = 0\n\
                while True:\n\
                \x20   try:\n\
                \x20       threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n\
                \x20   except RuntimeError:\n\
                \x20       break\n\
                \x20   n += 1\n\
                open('/tmp/full', 'w').write(str(n))\n\
                time.sleep(3600)\n";
    let r = server.send(
        "PUT",
        &format!("/v1/sandboxes/{id}/files?path=/tmp/hold.py"),
        Some(&key),
        &[],
        Some(hold.as_bytes()),
    );
    assert_eq!(r.map(|r| r.status).ok(), Some(200));
    let start = "setsid python3 /tmp/hold.py >/dev/null 2>&1 & echo started";
    let r = server.request(
        "POST",
        &path,
        Some(&key),
        Some(&body(json!({ "shell": start }))),
    );
    assert_eq!(r.json()["stdout"], "started\n", "{}", r.json());
    let full = format!("/v1/sandboxes/{id}/files?path=/tmp/full");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.request("GET", &full, Some(&key), None).status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the limit never filled"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Idle threads of the agent's blocking pool leave after 5 s: from here on, file calls need
    // new ones, which the agent can start only if the bomb has not taken every pid.
    std::thread::sleep(std::time::Duration::from_secs(6));
    let files = format!("/v1/sandboxes/{id}/files?path=/tmp/note");
    let statuses: Vec<Option<u16>> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..4)
            .map(|i| {
                let (server, key, files) = (&server, &key, &files);
                s.spawn(move || {
                    let r = server.send(
                        "PUT",
                        files,
                        Some(key),
                        &[],
                        Some(format!("{i}").as_bytes()),
                    );
                    r.map(|r| r.status).ok()
                })
            })
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().expect("upload"))
            .collect()
    });
    assert!(statuses.iter().all(|s| *s == Some(200)), "{statuses:?}");
    let r = server.request("GET", &files, Some(&key), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.json()["state"], "running", "{}", r.json());
    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert!(r.status == 200 || r.status == 204, "{}", r.status);
}
