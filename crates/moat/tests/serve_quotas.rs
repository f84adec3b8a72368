//! Key quotas of a real `moat serve` beyond the sandbox count and memory (the pids of a key's
//! sandboxes), and warm pools held to their maker's quotas and to the pool memory budget.
//! Needs root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;
use support::need_root;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::server::*;

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
    need_root!();
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
    assert_eq!(first.status, 201, "{}", first.text());
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

/// Polls the template `name` until `done` holds for it (a generous deadline for a loaded
/// machine; not a speed check), and returns it.
fn wait_template(
    server: &Server,
    key: &str,
    name: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = server
            .request("GET", &format!("/v1/templates/{name}"), Some(key), None)
            .json();
        if done(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "{what} never happened: {t}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn warm_pools_count_against_their_maker_s_quotas() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    let key = cli_key(
        &server,
        &admin,
        "small",
        &["--max-sandboxes", "1", "--max-memory", "64M"],
    );
    let template = |name: &str, pool_size: u32| {
        server.request(
            "POST",
            "/v1/templates",
            Some(&key),
            Some(&body(json!({"name": name, "spec": {
                "rootfs": "host", "pool_size": pool_size, "resources": {"memory": "64M"},
            }}))),
        )
    };
    // Four members of 64M are four sandboxes and 256M: over the key's quota, refused.
    let r = template("four", 4);
    r.assert_error(429, "quota_exceeded");
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("warm pool"), "{message}");
    // One fits, and once started it holds the key's one sandbox.
    assert_eq!(template("one", 1).status, 201);
    wait_template(&server, &key, "one", "a ready member", |t| {
        t["pool"]["ready"] == 1
    });
    let create = |template: &str| {
        server.request(
            "POST",
            "/v1/sandboxes",
            Some(&key),
            Some(&body(json!({"template": template}))),
        )
    };
    create("host").assert_error(429, "quota_exceeded");
    // Claiming the member turns what it held into the sandbox: still within the quota.
    let claimed = create("one");
    assert_eq!(claimed.status, 201, "{}", claimed.text());
    // The pool does not refill past the quota: the key holds its one sandbox.
    create("host").assert_error(429, "quota_exceeded");
    let t = server
        .request("GET", "/v1/templates/one", Some(&key), None)
        .json();
    assert_eq!(t["pool"]["ready"], 0, "{t}");
}

#[test]
fn warm_pools_are_held_to_their_budget_after_readiness() {
    need_root!();
    let server = Server::start_with(&["--pool-memory", "32M"]);
    let admin = server.admin_key();
    // Members are ready at once, then each fills 48M of its writable layer (memory): over
    // the whole budget.
    server.create_template(
        &admin,
        "grow",
        json!({
            "rootfs": "host", "pool_size": 4, "resources": {"memory": "128M"},
            "start": "sleep 1; head -c 48M /dev/zero > /tmp/fill; exec sleep 100000",
        }),
    );
    // Each member outgrows the whole budget once its script has run, so each is destroyed,
    // and no new one starts: one is now known to need more than the budget holds.
    wait_template(
        &server,
        &admin,
        "grow",
        "every member evicted, none refilled",
        |t| {
            t["pool"]["evicted"].as_u64().is_some_and(|n| n >= 4)
                && t["pool"]["ready"] == 0
                && t["pool"]["target"] == 0
        },
    );
}

/// A new sandbox of `key` made with `req`; its id.
/// Runs `shell` as root in `id` and returns its standard output, after checking it exited 0.
fn root_sh(server: &Server, key: &str, id: &str, shell: &str) -> String {
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(key),
        Some(&body(json!({"shell": shell, "user": "root"}))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(out["exit_code"], 0, "{shell}: {out}");
    out["stdout"].as_str().expect("stdout").to_owned()
}

fn snapshot(server: &Server, key: &str, id: &str) -> Reply {
    server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/snapshots"),
        Some(key),
        Some(&body(json!({}))),
    )
}

#[test]
fn sparse_files_stay_sparse_in_snapshots() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    let id = server.create_sandbox_with(
        &admin,
        json!({"resources": {"memory": "64M", "disk": "4G"}}),
    );
    root_sh(
        &server,
        &admin,
        &id,
        "truncate -s 3G /tmp/big && echo middle | dd of=/tmp/big bs=1 seek=1073741824 conv=notrunc 2>/dev/null",
    );
    let r = snapshot(&server, &admin, &id);
    assert_eq!(r.status, 201, "{}", r.text());
    let snap = r.json();
    let size = snap["size_bytes"].as_u64().expect("size");
    assert!(
        size < 1 << 20,
        "a 3 GiB sparse file made a {size}-byte snapshot"
    );
    let sid = snap["id"].as_str().expect("id");
    // What the host's disk holds for it.
    let on_disk = std::fs::metadata(server.data.join("snapshots").join(format!("{sid}.tar")))
        .expect("the snapshot's file");
    use std::os::unix::fs::MetadataExt;
    assert!(
        on_disk.blocks() * 512 < 1 << 20,
        "{} blocks",
        on_disk.blocks()
    );
    // Restored with its size, its data, and still sparse.
    let copy = server.create_sandbox_with(&admin, json!({"snapshot": sid}));
    let out = root_sh(
        &server,
        &admin,
        &copy,
        "stat -c '%s %b %B' /tmp/big; dd if=/tmp/big bs=1 skip=1073741824 count=6 2>/dev/null",
    );
    let mut words = out.split_whitespace();
    let bytes: u64 = words.next().and_then(|w| w.parse().ok()).expect("size");
    let blocks: u64 = words.next().and_then(|w| w.parse().ok()).expect("blocks");
    let unit: u64 = words.next().and_then(|w| w.parse().ok()).expect("unit");
    assert_eq!(bytes, 3 << 30, "{out}");
    assert!(
        blocks * unit < 1 << 20,
        "restored with {blocks} blocks: {out}"
    );
    assert_eq!(words.next(), Some("middle"), "{out}");
}

#[test]
fn snapshot_bytes_are_a_quota_and_fork_copies_count() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    let key = cli_key(&server, &admin, "snaps", &["--max-snapshot-size", "3M"]);
    let id = server.create_sandbox(&key);
    // 2 MiB that do not compress or hole: one snapshot fits, a second would make 4 MiB.
    root_sh(&server, &key, &id, "head -c 2M /dev/urandom > /tmp/data");
    let first = snapshot(&server, &key, &id);
    assert_eq!(first.status, 201, "{}", first.text());
    let r = snapshot(&server, &key, &id);
    r.assert_error(429, "quota_exceeded");
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("quota"), "{message}");
    // A fork's copy counts while it exists: refused the same way.
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/fork"),
        Some(&key),
        Some(&body(json!({}))),
    );
    r.assert_error(429, "quota_exceeded");
    // Nothing was left behind by the refused ones.
    let files = std::fs::read_dir(server.data.join("snapshots"))
        .expect("snapshots dir")
        .count();
    assert_eq!(files, 1);
    // Deleting the snapshot gives its bytes back.
    let sid = first.json()["id"].as_str().expect("id").to_owned();
    server.request("DELETE", &format!("/v1/snapshots/{sid}"), Some(&key), None);
    assert_eq!(snapshot(&server, &key, &id).status, 201);
}

#[test]
fn snapshots_keep_the_data_dir_s_free_space_reserve() {
    need_root!();
    // A reserve larger than any disk: every snapshot would go below it.
    let server = Server::start_with(&["--min-free-disk", "1000T"]);
    let admin = server.admin_key();
    let id = server.create_sandbox(&admin);
    let r = snapshot(&server, &admin, &id);
    r.assert_error(507, "insufficient_storage");
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/fork"),
        Some(&admin),
        Some(&body(json!({}))),
    );
    r.assert_error(507, "insufficient_storage");
}
