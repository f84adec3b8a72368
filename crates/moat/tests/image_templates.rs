//! Templates from images, end to end: a real registry with a busybox image the test builds,
//! a real `moat serve` pulling it when the template is made, and sandboxes running in it.

#![allow(clippy::unwrap_used)]

use moat_test_support::need_root;
use moat_test_support::registry::{LayerBuilder, Registry, TestImage};
use moat_test_support::server::{Server, body};
use serde_json::json;

/// An image whose one program is the host's static busybox, with a few applets linked to it.
fn busybox_image() -> TestImage {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox: run scripts/test-deps.sh");
    let mut layer = LayerBuilder::new()
        .dir("bin/", 0o755)
        .file("bin/busybox", 0o755, &busybox);
    for applet in [
        "sh", "echo", "cat", "id", "pwd", "ls", "whoami", "sleep", "env",
    ] {
        layer = layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    let top = LayerBuilder::new()
        .dir("work/", 0o777)
        .dir("usr/", 0o755)
        .dir("usr/share/", 0o755)
        .file("usr/share/note", 0o644, b"a file of the image\n")
        .file("etc/os-release", 0o644, b"ID=moat-busybox\n")
        .build();
    let mut image = TestImage::new(vec![layer.build(), top]);
    image.run = json!({
        "Env": ["PATH=/bin", "GREETING=hello from the image"],
        "WorkingDir": "/work",
        "Cmd": ["/bin/sh"],
    });
    image
}

#[test]
fn a_template_from_an_image_runs_its_programs_with_its_environment() {
    need_root!("moat serve's native backend needs root");
    let registry = Registry::start();
    let digest = registry.push("tools/bb", "1", &busybox_image());
    let reference = format!("{}/tools/bb:1", registry.host());
    // A key that is not an admin's pulls only from registries the operator opens to all.
    let closed = Server::start();
    let admin = closed.admin_key();
    let key = closed.create_key(&admin, json!({"name": "images", "tenant": "imgs"}));
    let r = closed.request(
        "POST",
        "/v1/templates",
        Some(&key),
        Some(&body(
            json!({"name": "bb", "spec": {"rootfs": {"image": reference}}}),
        )),
    );
    r.assert_error(403, "forbidden");
    assert!(r.text().contains("--allow-registry"), "{}", r.text());
    drop(closed);

    let server = Server::start_with(&["--allow-registry", &registry.host()]);
    let admin = server.admin_key();
    let key = server.create_key(&admin, json!({"name": "images", "tenant": "imgs"}));
    server.cli(&key, &["template", "create", "bb", "--image", &reference]);

    let r = server.request("GET", "/v1/templates/bb", Some(&key), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let spec = &r.json()["spec"];
    assert_eq!(spec["rootfs"]["image"], format!("{reference}@{digest}"));
    assert_eq!(spec["env"]["GREETING"], "hello from the image");
    assert_eq!(spec["workdir"], "/work");

    let id = server.create_sandbox_with(&key, json!({"template": "bb"}));
    let out = server.shell(
        &key,
        &id,
        "echo \"$GREETING\"; pwd; whoami; cat /etc/os-release; ls /bin/busybox; touch /work/mine && echo wrote",
    );
    assert_eq!(out["exit_code"], 0, "{out}");
    assert_eq!(
        out["stdout"], "hello from the image\n/work\nuser\nID=moat-busybox\n/bin/busybox\nwrote\n",
        "{out}"
    );
    // Nothing of the host's /usr is there: the image is the whole root.
    let out = server.shell(&key, &id, "ls /usr/bin/python3 2>&1; echo $?");
    assert!(out["stdout"].as_str().unwrap().ends_with("1\n"), "{out}");
    // Root in the sandbox changes image files: in its own layer, never in the shared tree.
    let trees = server.data.join("images/trees");
    let before = tree_listing(&trees);
    changes_image_files_as_root(&server, &key, &id);
    assert_eq!(tree_listing(&trees), before);
    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.status, 204, "{}", r.text());

    // A second template from the same image pulls nothing new and shares its tree.
    let r = server.request(
        "POST",
        "/v1/templates",
        Some(&key),
        Some(&body(json!({"name": "bb2", "spec": {"rootfs": {"image": format!("{}/tools/bb@{digest}", registry.host())}}}))),
    );
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn an_image_template_runs_on_gvisor_and_leaves_the_shared_tree_untouched() {
    need_root!("moat serve's backends need root");
    let registry = Registry::start();
    registry.push("tools/bb", "1", &busybox_image());
    let server = Server::start();
    let admin = server.admin_key();
    let image = format!("{}/tools/bb:1", registry.host());
    server.create_template(
        &admin,
        "bbg",
        json!({"rootfs": {"image": image}, "backend": "gvisor"}),
    );
    let trees = server.data.join("images/trees");
    let before = tree_listing(&trees);
    let id = server.create_sandbox_with(&admin, json!({"template": "bbg"}));
    let out = server.shell(&admin, &id, "echo \"$GREETING\"; whoami");
    assert_eq!(out["exit_code"], 0, "{out}");
    assert_eq!(out["stdout"], "hello from the image\nuser\n", "{out}");
    // Root in the sandbox changes an image file and a directory: in its own layer only.
    changes_image_files_as_root(&server, &admin, &id);
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&admin), None);
    assert_eq!(r.json()["backend"], "gvisor");
    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&admin), None);
    assert_eq!(r.status, 204, "{}", r.text());
    // The sandbox wrote in its own layer: the image's tree (shared with every template of the
    // image, its files hard links into the layer cache) is as it was.
    assert_eq!(tree_listing(&trees), before);
}

/// Has root in sandbox `id` change an image file and directory, which must succeed.
fn changes_image_files_as_root(server: &Server, key: &str, id: &str) {
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(key),
        Some(&body(json!({
            // A directory of the image removed with what it holds: the overlay records it (in
            // `user.` attributes, the only ones a user namespace may write).
            "shell": "echo changed > /etc/os-release && chmod 700 /bin && rm /bin/ls && \
                      cat /etc/os-release && rm -rf /usr/share && test ! -e /usr/share && echo gone",
            "user": "root",
        }))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["stdout"], "changed\ngone\n", "{}", r.text());
}

/// Every path under `dir` with its size and mode, sorted.
fn tree_listing(dir: &std::path::Path) -> Vec<(String, u64, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            out.push((path.display().to_string(), meta.len(), meta.mode()));
            if meta.is_dir() {
                todo.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn images_that_cannot_be_pulled_are_refused_with_what_is_wrong() {
    need_root!("moat serve's native backend needs root");
    let registry = Registry::start();
    let mut arm = busybox_image();
    arm.platform = ("linux".into(), "arm64".into());
    registry.push("tools/arm", "1", &arm);
    let server = Server::start();
    let admin = server.admin_key();
    let create = |name: &str, image: String| {
        server.request(
            "POST",
            "/v1/templates",
            Some(&admin),
            Some(&body(
                json!({"name": name, "spec": {"rootfs": {"image": image}}}),
            )),
        )
    };
    let r = create("missing", format!("{}/tools/none:1", registry.host()));
    r.assert_error(404, "not_found");
    assert!(r.text().contains("was not found"), "{}", r.text());
    let r = create("arm", format!("{}/tools/arm:1", registry.host()));
    r.assert_error(400, "invalid");
    assert!(r.text().contains("linux/arm64"), "{}", r.text());
    let r = create("bad", "Not A Reference".into());
    r.assert_error(400, "invalid");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = create("down", format!("127.0.0.1:{closed}/a:b"));
    r.assert_error(503, "unavailable");
    assert!(r.text().contains("cannot be reached"), "{}", r.text());
    // None of them was made.
    let r = server.request("GET", "/v1/templates", Some(&admin), None);
    let names: Vec<String> = r.json()["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    for name in ["missing", "arm", "bad", "down"] {
        assert!(!names.contains(&name.to_owned()), "{names:?}");
    }
}

#[test]
fn a_private_registry_is_pulled_with_the_servers_credentials() {
    use std::os::unix::fs::PermissionsExt as _;
    need_root!("moat serve's native backend needs root");
    let registry = Registry::start_with_auth("puller", "s3cret-pass");
    registry.push("private/bb", "1", &busybox_image());
    let image = format!("{}/private/bb:1", registry.host());
    let spec = json!({"name": "private", "spec": {"rootfs": {"image": image}}});

    // Without credentials the registry refuses, and the caller hears it.
    let server = Server::start();
    let admin = server.admin_key();
    let r = server.request(
        "POST",
        "/v1/templates",
        Some(&admin),
        Some(&body(spec.clone())),
    );
    r.assert_error(403, "forbidden");
    drop(server);

    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("registries.json");
    let text = json!({registry.host(): {"username": "puller", "password": "s3cret-pass"}});
    std::fs::write(&creds, text.to_string()).unwrap();
    // A file others may read is refused before anything starts.
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = dir.path().join("data");
    let out = std::process::Command::new(moat_test_support::moat_binary())
        .args(["serve", "--listen", "127.0.0.1:1", "--data-dir"])
        .arg(&data)
        .arg("--registry-credentials")
        .arg(&creds)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");

    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let server = Server::start_with(&["--registry-credentials", creds.to_str().unwrap()]);
    let admin = server.admin_key();
    let r = server.request("POST", "/v1/templates", Some(&admin), Some(&body(spec)));
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(!r.text().contains("s3cret"), "{}", r.text());
    let id = server.create_sandbox_with(&admin, json!({"template": "private"}));
    let out = server.shell(&admin, &id, "echo \"$GREETING\"");
    assert_eq!(out["stdout"], "hello from the image\n", "{out}");
    // The sandbox has no trace of the credentials.
    let out = server.shell(&admin, &id, "env; cat /etc/* 2>/dev/null");
    assert!(!out.to_string().contains("s3cret"), "{out}");
}

/// Every line of an NDJSON answer, parsed.
fn ndjson_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn a_template_create_can_follow_its_pull() {
    need_root!("moat serve's native backend needs root");
    let registry = Registry::start();
    registry.push("tools/bb", "1", &busybox_image());
    let server = Server::start();
    let admin = server.admin_key();
    let image = format!("{}/tools/bb:1", registry.host());
    let create = |name: &str, image: &str| {
        let req = body(json!({"name": name, "spec": {"rootfs": {"image": image}}}));
        server
            .send(
                "POST",
                "/v1/templates",
                Some(&admin),
                &[
                    ("Content-Type", "application/json"),
                    ("Accept", "application/x-ndjson"),
                ],
                Some(&req),
            )
            .unwrap()
    };
    let r = create("followed", &image);
    assert_eq!(r.status, 200, "{}", r.text());
    let lines = ndjson_lines(&r.text());
    assert_eq!(lines[0]["type"], "resolved", "{lines:?}");
    assert_eq!(lines[0]["layers"], 2, "{lines:?}");
    let unpacked: Vec<_> = lines.iter().filter(|l| l["type"] == "unpacked").collect();
    assert_eq!(unpacked.len(), 2, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "progress" && l["received"] == l["size"]),
        "a layer's bytes were never all received: {lines:?}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "template", "{lines:?}");
    assert_eq!(last["template"]["name"], "followed");
    // The same image again: nothing to fetch, the template at once.
    let lines = ndjson_lines(&create("again", &image).text());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["type"], "template");
    // A failure is the last line, with its code.
    let missing = format!("{}/tools/bb:nope", registry.host());
    let lines = ndjson_lines(&create("missing", &missing).text());
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "error", "{lines:?}");
    assert_eq!(last["code"], "not_found", "{lines:?}");
}

/// `POST /v1/templates` of `image` with `key` on a new connection, given up on after `wait`:
/// the answer, or `None` when none came in time.
fn create_within(
    server: &Server,
    key: &str,
    name: &str,
    image: &str,
    wait: std::time::Duration,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    conn.set_read_timeout(Some(wait)).expect("timeout");
    let body = json!({"name": name, "spec": {"rootfs": {"image": image}}}).to_string();
    let head = format!(
        "POST /v1/templates HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).expect("send");
    let mut raw = Vec::new();
    match conn.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return None;
        }
        Err(e) => panic!("reading the answer: {e}"),
    }
    let reply = moat_test_support::server::Reply::parse(&raw).expect("an HTTP answer");
    Some((reply.status, reply.text()))
}

/// A tenant has at most two pulls under way (waiting for the server's turn included): a third
/// is `429` at once, while another tenant's pull is taken. The registry here accepts
/// connections and never answers, so the pulls stay under way.
#[test]
fn a_tenant_s_pulls_under_way_are_bounded() {
    need_root!("moat serve's native backend needs root");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let host = silent.local_addr().expect("address").to_string();
    let server = Server::start_with(&["--allow-registry", &host]);
    let admin = server.admin_key();
    let key = |tenant: &str| server.create_key(&admin, json!({"name": "k", "tenant": tenant}));
    let (greedy, other) = (key("greedy"), key("other"));
    let short = std::time::Duration::from_millis(1500);
    let image = |n: u32| format!("{host}/app{n}:1");
    for n in 0..2 {
        assert_eq!(
            create_within(&server, &greedy, &format!("t{n}"), &image(n), short),
            None,
            "a pull from a registry that never answers ended"
        );
    }
    let (status, text) = create_within(&server, &greedy, "t2", &image(2), short)
        .expect("the third pull is refused at once");
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("image pulls of yours"), "{text}");
    assert_eq!(
        create_within(&server, &other, "t0", &image(0), short),
        None,
        "another tenant's pull was refused"
    );
}
