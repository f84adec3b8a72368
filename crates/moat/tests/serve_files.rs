//! The `/v1/sandboxes/{id}/files` routes of a real `moat serve` on real sandboxes: files up and
//! down (text, and a multi-MiB binary byte for byte), list, stat, mkdir, move, remove, whole
//! directories as tar archives both ways, and the JSON errors. Needs root (the native backend);
//! skips with a printed reason otherwise.

use moat_test_support as support;
use support::need_root;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use support::server::*;

use moat_engine::store::{Quotas, Role, Store};
use serde_json::{Value, json};

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A server, its admin key and a running sandbox.
fn setup() -> (Server, String, String) {
    let server = Server::start();
    let key = server.admin_key();
    let r = server.request("POST", "/v1/sandboxes", Some(&key), Some(b""));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    (server, key, id)
}

/// Bytes that are not text and do not repeat: a xorshift sequence.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct Files<'a> {
    server: &'a Server,
    key: &'a str,
    id: &'a str,
}

impl Files<'_> {
    fn url(&self, route: &str, query: &str) -> String {
        format!("/v1/sandboxes/{}/files{route}?{query}", self.id)
    }

    fn put(&self, query: &str, data: &[u8]) -> Reply {
        self.server
            .send(
                "PUT",
                &self.url("", query),
                Some(self.key),
                &[("Content-Type", "application/octet-stream")],
                Some(data),
            )
            .expect("PUT")
    }

    fn get(&self, route: &str, query: &str) -> Reply {
        self.server
            .request("GET", &self.url(route, query), Some(self.key), None)
    }

    fn delete(&self, query: &str) -> Reply {
        self.server
            .request("DELETE", &self.url("", query), Some(self.key), None)
    }

    fn post(&self, route: &str, query: &str, body: Value) -> Reply {
        self.server.request(
            "POST",
            &self.url(route, query),
            Some(self.key),
            Some(&support::server::body(body)),
        )
    }

    fn exec(&self, cmd: &[&str], user: &str) {
        let r = self.server.request(
            "POST",
            &format!("/v1/sandboxes/{}/exec", self.id),
            Some(self.key),
            Some(&support::server::body(json!({"cmd": cmd, "user": user}))),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["exit_code"], 0, "{cmd:?}: {}", r.text());
    }
}

#[test]
fn files_round_trip() {
    need_root!();
    let (server, key, id) = setup();
    let f = Files {
        server: &server,
        key: &key,
        id: &id,
    };

    // A text file, by a path relative to the user's home, with a space in its name.
    let r = f.put("path=notes/hello%20there.txt", b"hello, sandbox\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let entry = r.json();
    assert_eq!(entry["path"], "/home/user/notes/hello there.txt");
    assert_eq!(entry["name"], "hello there.txt");
    assert_eq!(entry["type"], "file");
    assert_eq!(entry["size"], 15);
    assert_eq!(entry["owner"], "user");
    assert_eq!(entry["mode"], 0o644);
    assert!(entry["symlink_target"].is_null());
    assert!(
        entry["modified_at"]
            .as_i64()
            .is_some_and(|t| t > 1_600_000_000_000)
    );
    let r = f.get("", "path=/home/user/notes/hello%20there.txt");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.body, b"hello, sandbox\n");

    // A multi-MiB binary file comes back byte for byte; an empty one too.
    let blob = noise(5 << 20);
    let r = f.put("path=/tmp/bin/blob.bin", &blob);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["size"], blob.len());
    let r = f.get("", "path=/tmp/bin/blob.bin");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("5242880"));
    assert!(r.body == blob, "the binary file came back different");
    let r = f.put("path=/tmp/bin/empty", b"");
    assert_eq!(r.json()["size"], 0);
    assert_eq!(f.get("", "path=/tmp/bin/empty").body, b"");
    // Overwriting replaces the contents.
    f.put("path=/tmp/bin/empty", b"now full");
    assert_eq!(f.get("", "path=/tmp/bin/empty").body, b"now full");

    // stat, and a symbolic link's entry.
    let r = f.get("/stat", "path=/tmp/bin");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["type"], "dir");
    f.exec(&["ln", "-s", "/tmp/bin/blob.bin", "/tmp/link"], "user");
    let link = f.get("/stat", "path=/tmp/link").json();
    assert_eq!(link["type"], "symlink");
    assert_eq!(link["symlink_target"], "/tmp/bin/blob.bin");
    assert_eq!(f.get("", "path=/tmp/link").body.len(), blob.len());

    // mkdir: 201 when made, 200 when it already was a directory.
    let r = f.post("/mkdir", "", json!({"path": "work/a/b"}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["path"], "/home/user/work/a/b");
    assert_eq!(r.json()["type"], "dir");
    let r = f.post("/mkdir", "", json!({"path": "/home/user/work/a/b"}));
    assert_eq!(r.status, 200, "{}", r.text());
    f.put("path=work/a/one.txt", b"1");
    f.put("path=work/a/b/two.txt", b"22");

    // list: depth 1 by default, deeper when asked; entries carry full paths.
    let r = f.get("/list", "path=work/a");
    assert_eq!(r.status, 200, "{}", r.text());
    let names = |v: &Value| -> Vec<String> {
        v["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| e["path"].as_str().expect("path").to_owned())
            .collect()
    };
    assert_eq!(
        names(&r.json()),
        ["/home/user/work/a/b", "/home/user/work/a/one.txt"]
    );
    let r = f.get("/list", "path=work&depth=3");
    assert_eq!(
        names(&r.json()),
        [
            "/home/user/work/a",
            "/home/user/work/a/b",
            "/home/user/work/a/b/two.txt",
            "/home/user/work/a/one.txt"
        ]
    );

    // move: answers the entry at its new place; the old one is gone.
    let r = f.post(
        "/move",
        "",
        json!({"from": "work/a/one.txt", "to": "/tmp/moved/uno.txt"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/tmp/moved/uno.txt");
    assert_eq!(r.json()["size"], 1);
    f.get("/stat", "path=work/a/one.txt")
        .assert_error(404, "not_found");
    assert_eq!(f.get("", "path=/tmp/moved/uno.txt").body, b"1");

    // remove: a file, then a whole tree.
    assert_eq!(f.delete("path=/tmp/moved/uno.txt").status, 204);
    f.get("/stat", "path=/tmp/moved/uno.txt")
        .assert_error(404, "not_found");
    assert_eq!(f.delete("path=work").status, 204);
    f.get("/stat", "path=work").assert_error(404, "not_found");

    // As root: a file in a directory only root may enter, which the user may not read.
    let r = f.post("/mkdir", "user=root", json!({"path": "/tmp/private"}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["owner"], "root");
    f.exec(&["chmod", "700", "/tmp/private"], "root");
    let r = f.put("path=/tmp/private/secret&user=root", b"root only");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["owner"], "root");
    assert_eq!(
        f.get("", "path=/tmp/private/secret&user=root").body,
        b"root only"
    );
    f.get("", "path=/tmp/private/secret")
        .assert_error(403, "forbidden");
    f.put("path=/tmp/private/mine", b"x")
        .assert_error(403, "forbidden");
}

/// Runs the host's `tar` with `args`.
fn host_tar(args: &[&str]) {
    let status = Command::new("tar").args(args).status().expect("run tar");
    assert!(status.success(), "tar {args:?}: {status}");
}

#[test]
fn files_tar() {
    need_root!();
    let (server, key, id) = setup();
    let f = Files {
        server: &server,
        key: &key,
        id: &id,
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    let blob = noise(3 << 20);
    std::fs::create_dir_all(src.join("sub/deeper")).expect("dirs");
    std::fs::create_dir_all(src.join("empty")).expect("dirs");
    std::fs::write(src.join("a.txt"), "alpha\n").expect("write");
    std::fs::write(src.join("sub/b.bin"), &blob).expect("write");
    std::fs::write(src.join("sub/deeper/c.txt"), "gamma\n").expect("write");
    let archive = tmp.path().join("up.tar");
    host_tar(&[
        "-C",
        src.to_str().expect("utf-8"),
        "-cf",
        archive.to_str().expect("utf-8"),
        ".",
    ]);
    let archive = std::fs::read(&archive).expect("archive");

    // Upload: unpacked into a directory that did not exist, answered with its entry.
    let r = f.put("path=proj&format=tar", &archive);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/home/user/proj");
    assert_eq!(r.json()["type"], "dir");
    let r = f.get("/stat", "path=proj/sub/b.bin");
    assert_eq!(r.json()["size"], blob.len());
    assert_eq!(r.json()["owner"], "user");
    assert!(f.get("", "path=proj/sub/b.bin").body == blob);
    assert_eq!(f.get("", "path=proj/a.txt").body, b"alpha\n");
    assert_eq!(f.get("/stat", "path=proj/empty").json()["type"], "dir");
    // Into an existing directory, beside what is there.
    f.put("path=/tmp/target/keep.txt", b"kept");
    let r = f.put("path=/tmp/target&format=tar", &archive);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(f.get("", "path=/tmp/target/keep.txt").body, b"kept");
    assert_eq!(
        f.get("", "path=/tmp/target/sub/deeper/c.txt").body,
        b"gamma\n"
    );

    // Download: a tar stream that unpacks into the same tree.
    let r = f.get("", "path=/home/user/proj&format=tar");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-tar"));
    let down = tmp.path().join("down.tar");
    std::fs::write(&down, &r.body).expect("write");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).expect("out");
    host_tar(&[
        "-C",
        out.to_str().expect("utf-8"),
        "-xf",
        down.to_str().expect("utf-8"),
    ]);
    assert_same_tree(&src, &out);

    // A damaged archive: tar's own complaint, as JSON.
    let r = f.put(
        "path=/tmp/bad&format=tar",
        b"this is not a tar archive at all",
    );
    r.assert_error(400, "tar_failed");
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("tar"), "{message}");
    // A file where the directory should be.
    f.put("path=/tmp/plain", b"x");
    f.put("path=/tmp/plain&format=tar", &archive)
        .assert_error(409, "not_a_directory");
    f.get("", "path=/tmp/plain&format=tar")
        .assert_error(409, "not_a_directory");
    f.get("", "path=/tmp/nowhere&format=tar")
        .assert_error(404, "not_found");

    // Hostile member names: an absolute path naming a host file, and `../` climbing out of the
    // target. tar runs inside the sandbox, so neither can reach the host; GNU tar also keeps
    // both inside the target directory.
    let canary = std::env::temp_dir().join(format!("moat-canary-{}", std::process::id()));
    std::fs::write(&canary, "host canary").expect("canary");
    let canary_name = canary.to_str().expect("utf-8").to_owned();
    let evil = tmp.path().join("evil.tar");
    let evil_arg = evil.to_str().expect("utf-8");
    host_tar(&["-P", "-cf", evil_arg, &canary_name]);
    let r = f.put("path=evil&format=tar", &std::fs::read(&evil).expect("evil"));
    assert!(r.status == 200 || r.status == 400, "{}", r.text());
    f.get("/stat", &format!("path={}", enc(&canary_name)))
        .assert_error(404, "not_found");
    host_tar(&[
        "-P",
        "-C",
        src.to_str().expect("utf-8"),
        "--transform",
        "s,^,../../../../,",
        "-cf",
        evil_arg,
        "a.txt",
    ]);
    let r = f.put("path=evil&format=tar", &std::fs::read(&evil).expect("evil"));
    assert!(r.status == 200 || r.status == 400, "{}", r.text());
    f.get("/stat", "path=/a.txt").assert_error(404, "not_found");
    assert_eq!(
        std::fs::read_to_string(&canary).expect("canary"),
        "host canary"
    );
    let _ = std::fs::remove_file(&canary);

    // A directory the user cannot read fails before any output: a JSON error.
    let r = f.post("/mkdir", "user=root", json!({"path": "/tmp/locked/inner"}));
    assert_eq!(r.status, 201, "{}", r.text());
    f.exec(&["chmod", "700", "/tmp/locked"], "root");
    f.get("", "path=/tmp/locked&format=tar")
        .assert_error(403, "forbidden");
    f.put("path=/tmp/locked/inner&format=tar", &archive)
        .assert_error(403, "forbidden");
    // As root it works.
    let r = f.get("", "path=/tmp/locked&format=tar&user=root");
    assert_eq!(r.status, 200, "{}", r.text());

    // A tar that fails after its output began: the body is cut off, never a complete-looking
    // (truncated) archive. An unreadable file in the middle makes tar exit 2 at its end.
    f.put("path=/tmp/mixed/a.txt", b"a");
    f.put("path=/tmp/mixed/z.bin", &noise(1 << 20));
    f.put("path=/tmp/mixed/m.secret&user=root", b"no");
    f.exec(&["chmod", "600", "/tmp/mixed/m.secret"], "root");
    let r = server.send(
        "GET",
        &f.url("", "path=/tmp/mixed&format=tar"),
        Some(&key),
        &[],
        None,
    );
    // (The 1 MiB file guarantees output before tar's exit, whatever order it reads in.)
    match r {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}"),
        Ok(r) => panic!(
            "a tar failing midway answered {} with a complete body",
            r.status
        ),
    }
}

#[test]
fn files_limits_of_the_sandbox() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let create = |spec: Value| {
        let r = server.request("POST", "/v1/sandboxes", Some(&key), Some(&body(spec)));
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["id"].as_str().expect("id").to_owned()
    };

    // A full disk is 507, and a file cut short by it is not left behind.
    let small = create(json!({"resources": {"disk": "8M"}}));
    let f = Files {
        server: &server,
        key: &key,
        id: &small,
    };
    f.put("path=/tmp/big", &noise(16 << 20))
        .assert_error(507, "insufficient_storage");
    f.get("/stat", "path=/tmp/big")
        .assert_error(404, "not_found");
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("big"), noise(16 << 20)).expect("write");
    let archive = tmp.path().join("big.tar");
    host_tar(&[
        "-C",
        tmp.path().to_str().expect("utf-8"),
        "-cf",
        archive.to_str().expect("utf-8"),
        "big",
    ]);
    let archive = std::fs::read(&archive).expect("archive");
    let r = f.put("path=/tmp/unpacked&format=tar", &archive);
    r.assert_error(507, "insufficient_storage");
    assert!(r.text().contains("tar: big"), "{}", r.text());
    // Space freed, the same upload fits.
    assert_eq!(f.delete("path=/tmp/unpacked").status, 204);
    assert_eq!(f.put("path=/tmp/fits", &noise(4 << 20)).status, 200);

    // No tar to run in the sandbox: directories cannot travel, files still do.
    let bare = create(json!({"env": {"PATH": "/nowhere"}}));
    let f = Files {
        server: &server,
        key: &key,
        id: &bare,
    };
    f.get("", "path=/tmp&format=tar")
        .assert_error(501, "unsupported");
    f.put("path=/tmp/up&format=tar", &archive)
        .assert_error(501, "unsupported");
    f.get("/stat", "path=/tmp/up")
        .assert_error(404, "not_found");
    assert_eq!(f.put("path=/tmp/plain", b"ok").status, 200);
}

/// Every file under `a` is under `b` with the same bytes, and the reverse.
fn assert_same_tree(a: &Path, b: &Path) {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Option<Vec<u8>>)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p
                .strip_prefix(root)
                .expect("prefix")
                .to_string_lossy()
                .into_owned();
            if p.is_dir() {
                out.push((rel, None));
                walk(root, &p, out);
            } else {
                out.push((rel, Some(std::fs::read(&p).expect("read"))));
            }
        }
    }
    let (mut left, mut right) = (Vec::new(), Vec::new());
    walk(a, a, &mut left);
    walk(b, b, &mut right);
    let names = |v: &[(String, Option<Vec<u8>>)]| v.iter().map(|e| e.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&left), names(&right));
    assert!(left == right, "file contents differ");
}

/// A PUT that declares `length` bytes and sends none: the answer must come before the body.
fn declare_only(server: &Server, path: &str, key: &str, length: u64) -> Reply {
    let mut conn = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Length: {length}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).expect("write");
    let mut raw = Vec::new();
    let _ = conn.read_to_end(&mut raw);
    Reply::parse(&raw).expect("reply")
}

#[test]
fn files_errors() {
    need_root!();
    let (server, key, id) = setup();
    let f = Files {
        server: &server,
        key: &key,
        id: &id,
    };
    f.put("path=/tmp/file", b"x");
    f.post("/mkdir", "", json!({"path": "/tmp/dir"}));

    // Missing paths.
    f.get("", "path=/tmp/nothing")
        .assert_error(404, "not_found");
    f.get("/stat", "path=/tmp/nothing")
        .assert_error(404, "not_found");
    f.get("/list", "path=/tmp/nothing")
        .assert_error(404, "not_found");
    f.delete("path=/tmp/nothing").assert_error(404, "not_found");
    f.post("/move", "", json!({"from": "/tmp/nothing", "to": "/tmp/x"}))
        .assert_error(404, "not_found");

    // Bad queries and bodies.
    f.get("", "").assert_error(400, "invalid");
    f.get("", "path=").assert_error(400, "invalid");
    f.get("", "path=/tmp/file&colour=red")
        .assert_error(400, "invalid");
    f.get("", "path=/tmp/file&path=/tmp/file")
        .assert_error(400, "invalid");
    f.get("", "path=/tmp/file&user=nobody")
        .assert_error(400, "invalid");
    f.get("", "path=/tmp/file&format=zip")
        .assert_error(400, "invalid");
    f.get("/list", "path=/tmp&depth=0")
        .assert_error(400, "invalid");
    f.get(
        "/list",
        &format!("path=/tmp&depth={}", moat_server::MAX_LIST_DEPTH + 1),
    )
    .assert_error(400, "invalid");
    f.get("/stat", "path=/tmp&depth=2")
        .assert_error(400, "invalid");
    f.delete("path=/tmp/file&format=tar")
        .assert_error(400, "invalid");
    f.post("/mkdir", "", json!({"path": "/tmp/d", "mode": 7}))
        .assert_error(400, "invalid");
    f.post("/mkdir", "path=/tmp/d", json!({"path": "/tmp/d"}))
        .assert_error(400, "invalid");
    f.post("/move", "", json!({"from": "/tmp/file"}))
        .assert_error(400, "invalid");
    f.get("", &format!("path={}", enc("/tmp/a\0b")))
        .assert_error(400, "invalid");

    // The template's read-only system directories refuse even root: the request's doing,
    // not the server's.
    f.put("path=/etc/moat-test&user=root", b"x")
        .assert_error(403, "forbidden");
    f.post(
        "/mkdir",
        "user=root",
        json!({"path": "/usr/local/moat-test"}),
    )
    .assert_error(403, "forbidden");
    f.delete("path=/dev/shm&user=root")
        .assert_error(403, "forbidden");

    // A directory where a file is expected, and the reverse.
    f.get("", "path=/tmp/dir")
        .assert_error(409, "is_a_directory");
    f.put("path=/tmp/dir", b"x")
        .assert_error(409, "is_a_directory");
    f.get("/list", "path=/tmp/file")
        .assert_error(409, "not_a_directory");
    f.post("/mkdir", "", json!({"path": "/tmp/file"}))
        .assert_error(409, "not_a_directory");

    // A path in a state that forbids the call (a program running from it): the caller's to
    // change, not the server's fault.
    let out = server.shell(
        &key,
        &id,
        "cp /bin/sleep /tmp/busy && (setsid /tmp/busy 60 >/dev/null 2>&1 &); \
         for i in $(seq 100); do pgrep -x busy >/dev/null && break; sleep 0.05; done; pgrep -c -x busy",
    );
    assert_eq!(out["stdout"], "1\n", "{out}");
    let r = f.put("path=/tmp/busy", b"x");
    r.assert_error(409, "conflict");
    assert!(r.text().contains("busy"), "{}", r.text());

    // Too large: refused from the declared length, before any of the body is read.
    let r = declare_only(
        &server,
        &f.url("", "path=/tmp/huge"),
        &key,
        moat_server::MAX_UPLOAD_BYTES + 1,
    );
    r.assert_error(413, "payload_too_large");
    let r = declare_only(
        &server,
        &f.url("", "path=/tmp/huge&format=tar"),
        &key,
        moat_server::MAX_UPLOAD_BYTES + 1,
    );
    r.assert_error(413, "payload_too_large");
    f.get("/stat", "path=/tmp/huge")
        .assert_error(404, "not_found");

    // Another tenant's key sees no such sandbox.
    let store = Store::open(server.data.join("moat.db")).expect("store");
    store.create_tenant("other", "Other").expect("tenant");
    let (_, secret) = store
        .create_key("other", "t", Role::User, Quotas::default())
        .expect("key");
    let other = Files {
        server: &server,
        key: secret.expose(),
        id: &id,
    };
    other
        .get("", "path=/tmp/file")
        .assert_error(404, "not_found");
    other
        .put("path=/tmp/theirs", b"x")
        .assert_error(404, "not_found");
    other
        .get("/list", "path=/tmp")
        .assert_error(404, "not_found");
    other
        .delete("path=/tmp/file")
        .assert_error(404, "not_found");
    assert_eq!(f.get("", "path=/tmp/file").body, b"x");
    f.get("/stat", "path=/tmp/theirs")
        .assert_error(404, "not_found");
    // No key at all.
    server
        .request("GET", &f.url("/stat", "path=/tmp/file"), None, None)
        .assert_error(401, "unauthenticated");

    // A deleted sandbox is no longer running.
    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.status, 204);
    f.get("", "path=/tmp/file").assert_error(409, "conflict");
    f.put("path=/tmp/file", b"y").assert_error(409, "conflict");
    f.get("/list", "path=/tmp").assert_error(409, "conflict");
}
