//! Error messages as people read them, through the API and the CLI against a real `moat
//! serve`: one code, given once, and one sentence that does not contradict itself; quotas in
//! the units requests use. Needs root (the server's native backend); skips with a printed
//! reason otherwise.

use moat_test_support as support;

use std::process::{Command, Output, Stdio};

use serde_json::json;
use support::need_root;
use support::server::*;

fn moat(server: &Server, key: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(args)
        .env("MOAT_URL", format!("http://127.0.0.1:{}", server.port))
        .env("MOAT_API_KEY", key)
        .stdin(Stdio::null())
        .output()
        .expect("run moat")
}

/// The API error's message, after checking its status and code; the message never starts
/// with (or repeats) the code.
fn message(r: &Reply, status: u16, code: &str) -> String {
    r.assert_error(status, code);
    let m = r.json()["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    for prefix in [
        "conflict:",
        "unavailable:",
        "not found:",
        "invalid request:",
    ] {
        assert!(!m.contains(prefix), "the code is in the message: {m}");
    }
    m
}

/// The CLI's one line on stderr for a server error, after checking the exit status.
fn cli_error(out: &Output, status: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(status), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn a_failed_sandbox_says_so_once() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let admin = server.admin_key();
    let r = server.request(
        "POST",
        "/v1/templates",
        Some(&admin),
        Some(&body(json!({"name": "never", "spec": {
            "rootfs": "host", "ready": "echo not yet; exit 1", "ready_timeout_secs": 1,
        }}))),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        Some(&admin),
        Some(&body(
            json!({"template": "never", "metadata": {"t": "never"}}),
        )),
    );
    let created = message(&r, 409, "conflict");
    assert!(created.contains("not yet"), "{created}");
    let list = server
        .request("GET", "/v1/sandboxes?metadata=t=never", Some(&admin), None)
        .json();
    assert_eq!(list["sandboxes"][0]["state"], "failed", "{list}");
    let id = list["sandboxes"][0]["id"].as_str().expect("id").to_owned();

    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(&admin),
        Some(&body(json!({"cmd": ["true"]}))),
    );
    let m = message(&r, 409, "conflict");
    assert!(
        m.starts_with(&format!("sandbox {id} has failed (")) && m.ends_with("); it is not running"),
        "{m}"
    );
    assert!(m.contains("not yet"), "the reason it failed: {m}");

    // 125: moat or the server failed, not the command.
    let out = moat(&server, &admin, &["sandbox", "exec", &id, "--", "true"]);
    let line = cli_error(&out, 125);
    assert_eq!(line, format!("moat: {m} (409 conflict)\n"));
}

#[test]
fn quotas_speak_in_sizes() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let admin = server.admin_key();
    let key = server.create_key(
        &admin,
        json!({"name": "small", "quotas": {"max_memory": "1G"}}),
    );
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        Some(&key),
        Some(&body(json!({"resources": {"memory": "2G"}}))),
    );
    let m = message(&r, 429, "quota_exceeded");
    assert_eq!(
        m,
        "quota exceeded: the memory limit is 1G, 0 is in use and 2G more was requested"
    );

    let out = moat(&server, &key, &["sandbox", "create", "--memory", "1536M"]);
    let line = cli_error(&out, 1);
    assert_eq!(
        line,
        "moat: quota exceeded: the memory limit is 1G, 0 is in use and 1536M more was requested \
         (429 quota_exceeded)\n"
    );
}

/// A root filesystem directory with `dash` as `/bin/sh` and its libraries, and this
/// `etc/passwd`.
fn rootfs_with(passwd: &str) -> tempfile::TempDir {
    let root = tempfile::Builder::new()
        .prefix("moat-rootfs-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).expect("mkdir");
    support::install_programs(r, &[("/usr/bin/dash", "sh")]);
    std::fs::write(r.join("etc/passwd"), passwd).expect("passwd");
    std::fs::write(r.join("etc/group"), "root:x:0:\nuser:x:1000:\n").expect("group");
    root
}

#[test]
fn a_rootfs_without_the_user_is_refused_with_what_to_add() {
    need_root!("moat serve's native backend needs root");
    let bare = rootfs_with("root:x:0:0::/root:/bin/sh\n");
    let full = rootfs_with("root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n");
    let server = Server::start();
    let admin = server.admin_key();
    let template = |name: &str, spec: serde_json::Value| {
        server.request(
            "POST",
            "/v1/templates",
            Some(&admin),
            Some(&body(json!({"name": name, "spec": spec}))),
        )
    };
    let m = message(
        &template("bare", json!({"rootfs": {"dir": bare.path()}})),
        400,
        "invalid",
    );
    assert!(
        m.contains("no account \"user\" in etc/passwd")
            && m.contains("user:x:1000:1000::/home/user:/bin/sh"),
        "{m}"
    );
    // Root is there: a template whose commands run as root is fine.
    let r = template(
        "bare-root",
        json!({"rootfs": {"dir": bare.path()}, "user": "root"}),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = template("full", json!({"rootfs": {"dir": full.path()}}));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        Some(&admin),
        Some(&body(json!({"template": "full"}))),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(&admin),
        Some(&body(json!({"shell": "id -u"}))),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // `moat run --rootfs` checks the same, before it makes anything.
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["run", "--rootfs"])
        .arg(bare.path())
        .args(["--", "/bin/sh", "-c", "true"])
        .env_remove("MOAT_URL")
        .stdin(Stdio::null())
        .output()
        .expect("moat run");
    let line = cli_error(&out, 125);
    assert!(
        line.starts_with("moat: --rootfs: ") && line.contains("no account \"user\""),
        "{line}"
    );
}

/// An OS error (or SQLite's) wrapped by moat's error types and printed as the CLI prints a
/// chain (`{:#}`) appears once: each type puts it in its message and not also in its source.
#[test]
fn an_error_chain_prints_the_os_error_once() {
    use moat_engine::error::EngineError;
    use moat_engine::store::{Store, StoreError};
    use moat_jail::JailError;

    let denied = || std::io::Error::from_raw_os_error(libc::EACCES);
    let os_text = denied().to_string();
    let missing = Store::open("/tmp/moat-no-such-dir/deeper/moat.db").expect_err("no parent dir");
    let missing_text = match &missing {
        StoreError::Io { error, .. } => error.to_string(),
        other => panic!("not an I/O error: {other}"),
    };
    let sqlite = rusqlite::Connection::open_in_memory()
        .expect("sqlite")
        .execute("not sql", [])
        .expect_err("bad SQL");
    let sqlite_text = sqlite.to_string();
    let chains: Vec<(anyhow::Error, &str)> = vec![
        (
            anyhow::Error::new(JailError::os("mount /proc", denied())).context("creating sandbox"),
            &os_text,
        ),
        (
            anyhow::Error::new(EngineError::io("reading the rootfs", denied())).context("create"),
            &os_text,
        ),
        (
            anyhow::Error::new(missing).context("opening the store"),
            &missing_text,
        ),
        (
            anyhow::Error::new(StoreError::from(sqlite)).context("listing"),
            &sqlite_text,
        ),
        (
            anyhow::Error::new(moat_client::Error::from(denied())).context("--upload a.txt"),
            &os_text,
        ),
    ];
    for (e, inner) in chains {
        let text = format!("{e:#}");
        assert_eq!(text.matches(inner).count(), 1, "{inner:?} twice in: {text}");
    }
}

/// An argument that is not UTF-8 gets the command line's usage error, never a panic.
#[test]
fn an_argument_that_is_not_utf8_is_a_usage_error() {
    use std::os::unix::ffi::OsStrExt;
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg(std::ffi::OsStr::from_bytes(b"\xff"))
        .stdin(Stdio::null())
        .output()
        .expect("run moat");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
