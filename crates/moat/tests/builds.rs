//! Builds, end to end: a real registry with a busybox image the test makes, a real
//! `moat serve`, `moat template build` with a Dockerfile and a context directory, and
//! sandboxes started from what it built.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use moat_test_support::need_root;
use moat_test_support::registry::{self, LayerBuilder, Registry, TestImage};
use moat_test_support::server::{Server, body};
use serde_json::{Value, json};

/// An image whose one program is the host's static busybox, with the applets the builds use.
fn busybox_image() -> TestImage {
    let mut image = TestImage::new(vec![busybox_layer()]);
    image.run = json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]});
    image
}

/// The layer of [`busybox_image`].
fn busybox_layer() -> Vec<u8> {
    registry::busybox_layer(&[
        "sh", "echo", "cat", "id", "pwd", "ls", "whoami", "sleep", "env", "rm", "mkdir", "stat",
        "readlink", "test", "true", "false", "ln",
    ])
}

/// A registry with the busybox image, its reference, a server that lets every key pull from
/// it, the server's admin key and a key of tenant `builders`.
fn builder_server() -> (Registry, String, Server, String, String) {
    let (registry, reference) = registry_with_busybox();
    let server = Server::start_with(&["--allow-registry", &registry.host()]);
    let admin = server.admin_key();
    let key = server.create_key(&admin, json!({"name": "builds", "tenant": "builders"}));
    (registry, reference, server, admin, key)
}

/// A registry holding the busybox image, and its reference.
fn registry_with_busybox() -> (Registry, String) {
    let registry = Registry::start();
    registry.push("tools/bb", "1", &busybox_image());
    let reference = format!("{}/tools/bb:1", registry.host());
    (registry, reference)
}

const DOCKERFILE: &str = r#"# syntax=docker/dockerfile:1
ARG BASE
FROM ${BASE}
ARG GREETING=hi
ENV APP_HOME=/opt/app \
    LEVEL=1
WORKDIR $APP_HOME
COPY app/ ./
COPY --chmod=600 app/data.txt /etc/data
RUN echo "$GREETING from run, level $LEVEL" > made && rm /etc/os-release && id -u > uid
USER user
WORKDIR /srv/data
RUN id -un > who
CMD ["/bin/sh"]
"#;

/// A context directory: a script, a data file and a link that points out of the context.
fn context(dir: &Path) {
    let app = dir.join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(
        app.join("hello.sh"),
        "#!/bin/sh\necho hello from the script\n",
    )
    .unwrap();
    std::fs::set_permissions(app.join("hello.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(app.join("data.txt"), "data\n").unwrap();
    // Left out of the upload by the context's .dockerignore.
    std::fs::write(app.join("secret.txt"), "not for the image\n").unwrap();
    std::fs::write(dir.join(".dockerignore"), "# local only\napp/secret.txt\n").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", app.join("link")).unwrap();
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE).unwrap();
}

/// The build `id` once it is over.
fn wait_for_build(server: &Server, key: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = server.request("GET", &format!("/v1/builds/{id}"), Some(key), None);
        assert_eq!(r.status, 200, "{}", r.text());
        let build = r.json();
        if !matches!(build["status"].as_str(), Some("queued" | "running")) {
            return build;
        }
        assert!(Instant::now() < deadline, "build {id} did not end: {build}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How many of the key's sandboxes are not recorded killed.
fn sandboxes_not_killed(server: &Server, key: &str) -> (usize, Value) {
    let sandboxes = server
        .request("GET", "/v1/sandboxes", Some(key), None)
        .json();
    let alive = sandboxes["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] != "killed")
        .count();
    (alive, sandboxes)
}

/// Build `id`'s whole log.
fn build_log(server: &Server, key: &str, id: &str) -> String {
    let r = server.request("GET", &format!("/v1/builds/{id}/logs"), Some(key), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["text"].as_str().unwrap().to_owned()
}

#[test]
fn a_dockerfile_builds_a_template_and_building_it_again_reuses_every_layer() {
    need_root!("moat serve's native backend needs root");
    let (_registry, reference, server, _admin, key) = builder_server();
    let ctx = tempfile::tempdir().unwrap();
    context(ctx.path());
    let dir = ctx.path().to_str().unwrap();
    let base = format!("BASE={reference}");
    let out = server.cli(
        &key,
        &["template", "build", "app", dir, "--build-arg", &base],
    );
    assert_eq!(out, "app\n");

    let builds = server.request("GET", "/v1/builds", Some(&key), None).json();
    let first = builds["builds"][0].clone();
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(first["steps"], 10, "{first}");
    assert_eq!(first["steps_done"], 10, "{first}");
    let log = build_log(&server, &key, first["id"].as_str().unwrap());
    assert!(log.contains("Step 6/10 : RUN echo"), "{log}");
    assert!(log.contains("built sha256:"), "{log}");

    let template = server.request("GET", "/v1/templates/app", Some(&key), None);
    assert_eq!(template.status, 200, "{}", template.text());
    let spec = &template.json()["spec"];
    assert_eq!(spec["rootfs"]["build"], first["image"], "{spec}");
    assert_eq!(spec["env"]["APP_HOME"], "/opt/app", "{spec}");
    assert_eq!(spec["workdir"], "/srv/data", "{spec}");

    let id = server.create_sandbox_with(&key, json!({"template": "app"}));
    let out = server.shell(
        &key,
        &id,
        "pwd; cat who; stat -c '%U' .; cd /opt/app; cat made uid; ./hello.sh; readlink link; \
         stat -c '%a %u' /etc/data hello.sh; test -e /etc/os-release || echo os-release removed; \
         test -e secret.txt || echo secret left out; \
         echo \"$APP_HOME $LEVEL ${GREETING:-unset}\"",
    );
    assert_eq!(out["exit_code"], 0, "{out}");
    assert_eq!(
        out["stdout"],
        "/srv/data\nuser\nuser\nhi from run, level 1\n0\nhello from the script\n/etc/shadow\n600 \
         0\n755 0\nos-release removed\nsecret left out\n/opt/app 1 unset\n",
        "{out}"
    );

    // The same build again: every layer is reused, and the image is the same.
    let out = server.cli(
        &key,
        &["template", "build", "app", dir, "--build-arg", &base],
    );
    assert_eq!(out, "app\n");
    let second = server.request("GET", "/v1/builds", Some(&key), None).json()["builds"][0].clone();
    assert_ne!(second["id"], first["id"]);
    assert_eq!(second["status"], "succeeded", "{second}");
    assert_eq!(second["image"], first["image"], "{second}");
    // Two WORKDIRs, two COPYs and two RUNs make layers; all six were there already.
    assert_eq!(second["steps_cached"], 6, "{second}");
    let log = build_log(&server, &key, second["id"].as_str().unwrap());
    assert!(
        !log.contains("hi from run"),
        "a cached RUN ran again: {log}"
    );

    // Another greeting changes the first RUN's inputs: it and what follows run again.
    let out = server.cli(
        &key,
        &[
            "template",
            "build",
            "app",
            dir,
            "--build-arg",
            &base,
            "--build-arg",
            "GREETING=hey",
        ],
    );
    assert_eq!(out, "app\n");
    let third = server.request("GET", "/v1/builds", Some(&key), None).json()["builds"][0].clone();
    // The second WORKDIR's base changed too, but its layer is the same archive as before.
    assert_eq!(third["steps_cached"], 4, "{third}");
    assert_ne!(third["image"], first["image"]);
    let id = server.create_sandbox_with(&key, json!({"template": "app"}));
    let out = server.shell(&key, &id, "cat /opt/app/made");
    assert_eq!(out["stdout"], "hey from run, level 1\n", "{out}");
}

#[test]
fn builds_refuse_bad_requests_report_failed_steps_and_can_be_cancelled() {
    need_root!("moat serve's native backend needs root");
    let (_registry, reference, server, admin, key) = builder_server();
    let build = |req: Value| server.request("POST", "/v1/builds", Some(&key), Some(&body(req)));

    let r = build(json!({"template": "t", "dockerfile": "FROM x\nFROBNICATE y\n"}));
    r.assert_error(400, "invalid");
    assert!(r.text().contains("line 2"), "{}", r.text());
    let r = build(json!({"template": "t", "dockerfile": "FROM a\nFROM b\n"}));
    r.assert_error(400, "invalid");
    let r = build(json!({"template": "host", "dockerfile": format!("FROM {reference}\n")}));
    r.assert_error(409, "conflict");
    let missing = format!("sha256:{}", "0".repeat(64));
    let r = build(json!({"template": "t", "dockerfile": "FROM x\n", "context": missing}));
    r.assert_error(400, "invalid");
    assert!(r.text().contains("upload it first"), "{}", r.text());
    let r = build(json!({"template": "t", "dockerfile": "FROM x\n", "timeout_secs": 99999}));
    r.assert_error(400, "invalid");
    let r = server.request(
        "POST",
        "/v1/templates",
        Some(&key),
        Some(&body(
            json!({"name": "b", "spec": {"rootfs": {"build": missing}}}),
        )),
    );
    r.assert_error(400, "invalid");

    // A step that fails ends the build with its line and status; its output is in the log.
    let r = build(json!({
        "template": "fails",
        "dockerfile": format!("FROM {reference}\nRUN echo about to fail; exit 3\n"),
    }));
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let failed = wait_for_build(&server, &key, &id);
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("line 2") && error.contains("status 3"),
        "{error}"
    );
    assert!(build_log(&server, &key, &id).contains("about to fail"));
    let r = server.request("GET", "/v1/templates/fails", Some(&key), None);
    r.assert_error(404, "not_found");

    // A COPY without a context, and one of a file the context lacks.
    let r = build(json!({
        "template": "nocontext",
        "dockerfile": format!("FROM {reference}\nCOPY a /a\n"),
    }));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let failed = wait_for_build(&server, &key, &id);
    assert!(
        failed["error"].as_str().unwrap().contains("build context"),
        "{failed}"
    );

    // Cancelled while a step runs: the build ends cancelled and its sandbox goes.
    let r = build(json!({
        "template": "slow",
        "dockerfile": format!("FROM {reference}\nRUN sleep 60\n"),
    }));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !build_log(&server, &key, &id).contains("Step 1/1") {
        assert!(Instant::now() < deadline, "the step did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = server.request("POST", &format!("/v1/builds/{id}/cancel"), Some(&key), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let cancelled = wait_for_build(&server, &key, &id);
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let (alive, sandboxes) = sandboxes_not_killed(&server, &key);
    assert_eq!(alive, 0, "a build's sandbox outlived it: {sandboxes}");
    let r = server.request("DELETE", &format!("/v1/builds/{id}"), Some(&key), None);
    assert_eq!(r.status, 204, "{}", r.text());
    let r = server.request("GET", &format!("/v1/builds/{id}"), Some(&key), None);
    r.assert_error(404, "not_found");
    // Another tenant never sees a build.
    let other = server.create_key(&admin, json!({"name": "other", "tenant": "others"}));
    let r = server.request(
        "GET",
        &format!("/v1/builds/{}", failed["id"].as_str().unwrap()),
        Some(&other),
        None,
    );
    r.assert_error(404, "not_found");

    // Nor reuses its steps: a step's sandbox was its tenant's to change while it ran.
    let shared = format!("FROM {reference}\nRUN echo shared > /etc/shared\n");
    let mut cached = Vec::new();
    for (who, k) in [("builders", &key), ("builders", &key), ("others", &other)] {
        let r = server.request(
            "POST",
            "/v1/builds",
            Some(k),
            Some(&body(json!({"template": "shared", "dockerfile": shared}))),
        );
        assert_eq!(r.status, 202, "{who}: {}", r.text());
        let done = wait_for_build(&server, k, r.json()["id"].as_str().unwrap());
        assert_eq!(done["status"], "succeeded", "{who}: {done}");
        cached.push(done["steps_cached"].as_u64().unwrap());
    }
    assert_eq!(cached, [0, 1, 0], "only the same tenant reuses a RUN");
}

/// Uploads `archive` as a build context of `key`'s tenant; its digest.
fn upload_context(server: &Server, key: &str, archive: &[u8]) -> String {
    let digest = moat_test_support::registry::sha256_digest(archive);
    let r = server.request(
        "PUT",
        &format!("/v1/build-contexts/{digest}"),
        Some(key),
        Some(archive),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = server.request(
        "HEAD",
        &format!("/v1/build-contexts/{digest}"),
        Some(key),
        None,
    );
    assert_eq!(r.status, 200);
    digest
}

#[test]
fn hostile_contexts_and_links_never_reach_the_host() {
    need_root!("moat serve's native backend needs root");
    let (_registry, reference, server, _admin, key) = builder_server();
    let run = |context: &str, dockerfile: String| {
        let r = server.request(
            "POST",
            "/v1/builds",
            Some(&key),
            Some(&body(json!({
                "template": "hostile",
                "dockerfile": dockerfile,
                "context": context,
            }))),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        wait_for_build(&server, &key, r.json()["id"].as_str().unwrap())
    };

    // A context whose archive climbs out of its directory fails before any step.
    let escape = format!("../../../../tmp/moat-build-escape-{}", std::process::id());
    let archive = LayerBuilder::new()
        .entry(&escape, tar::EntryType::Regular, 0o644, b"x", None)
        .build();
    let digest = upload_context(&server, &key, &archive);
    let failed = run(&digest, format!("FROM {reference}\nCOPY . /x/\n"));
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("build context"),
        "{failed}"
    );
    assert!(!Path::new(&format!("/tmp/moat-build-escape-{}", std::process::id())).exists());

    // A build's contexts hold 200,000 entries in all, not each: two of 100,001 empty files
    // are refused, whatever little they take in bytes.
    let many = |prefix: &str| {
        let mut b = LayerBuilder::new();
        for i in 0..100_001 {
            b = b.file(&format!("{prefix}{i}"), 0o644, b"");
        }
        b.build()
    };
    let (first, second) = (
        upload_context(&server, &key, &many("a")),
        upload_context(&server, &key, &many("b")),
    );
    let r = server.request(
        "POST",
        "/v1/builds",
        Some(&key),
        Some(&body(json!({
            "template": "hostile",
            "dockerfile": format!("FROM {reference}\nCOPY --from=more b0 /x\n"),
            "context": first,
            "contexts": {"more": second},
        }))),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let failed = wait_for_build(&server, &key, r.json()["id"].as_str().unwrap());
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("max_entries"),
        "{failed}"
    );

    // A wrong digest is refused and nothing is kept.
    let r = server.request(
        "PUT",
        &format!("/v1/build-contexts/sha256:{}", "1".repeat(64)),
        Some(&key),
        Some(b"not what the digest says"),
    );
    r.assert_error(400, "invalid");

    // Links in the context are copied as links, never followed, and a path through one is
    // refused; a link the image holds leads inside the image, never to the host's files.
    let archive = LayerBuilder::new()
        .symlink("etc", "/etc")
        .symlink("shadow", "/etc/shadow")
        .file("real", 0o644, b"real\n")
        .build();
    let digest = upload_context(&server, &key, &archive);
    let failed = run(&digest, format!("FROM {reference}\nCOPY etc/passwd /x\n"));
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("never followed"),
        "{failed}"
    );
    let built = run(
        &digest,
        format!(
            "FROM {reference}\nUSER root\nRUN ln -s /etc /etc/hostetc\n\
             COPY shadow real /etc/hostetc/\n"
        ),
    );
    assert_eq!(built["status"], "succeeded", "{built}");
    let id = server.create_sandbox_with(&key, json!({"template": "hostile"}));
    let out = server.shell(&key, &id, "readlink /etc/shadow; cat /etc/real");
    assert_eq!(out["stdout"], "/etc/shadow\nreal\n", "{out}");
    let shadow = std::fs::symlink_metadata("/etc/shadow").unwrap();
    assert!(
        !shadow.file_type().is_symlink(),
        "the host's /etc/shadow was replaced"
    );
    assert!(
        !Path::new("/etc/real").exists(),
        "a COPY wrote to the host's /etc"
    );
}

#[test]
fn a_build_on_a_backend_that_cannot_run_its_steps_is_refused() {
    need_root!("moat serve's backends need root");
    let server = Server::start();
    let admin = server.admin_key();
    let r = server.request(
        "POST",
        "/v1/builds",
        Some(&admin),
        Some(&body(json!({
            "template": "on-gvisor",
            "backend": "gvisor",
            "dockerfile": "FROM busybox\nRUN true\n",
        }))),
    );
    r.assert_error(400, "invalid");
    assert!(
        r.text().contains("gvisor backend cannot run"),
        "{}",
        r.text()
    );
}

#[test]
fn a_build_starts_from_a_template_s_image() {
    need_root!("moat serve's native backend needs root");
    let (_registry, reference, server, _admin, key) = builder_server();
    server.create_template(
        &key,
        "bb",
        json!({"rootfs": {"image": reference}, "env": {"FROM_TEMPLATE": "yes"}}),
    );
    let build = |template: &str, from: Value| {
        server.request(
            "POST",
            "/v1/builds",
            Some(&key),
            Some(&body(json!({
                "template": template,
                "dockerfile": "FROM base\nRUN echo \"$FROM_TEMPLATE\" > /etc/from\n",
                "from_templates": from,
            }))),
        )
    };
    let r = build("first", json!({"base": "bb"}));
    assert_eq!(r.status, 202, "{}", r.text());
    let done = wait_for_build(&server, &key, r.json()["id"].as_str().unwrap());
    assert_eq!(done["status"], "succeeded", "{done}");
    // And from that built template in turn.
    let r = build("second", json!({"base": "first"}));
    assert_eq!(r.status, 202, "{}", r.text());
    let done = wait_for_build(&server, &key, r.json()["id"].as_str().unwrap());
    assert_eq!(done["status"], "succeeded", "{done}");
    let id = server.create_sandbox_with(&key, json!({"template": "second"}));
    let out = server.shell(&key, &id, "cat /etc/from /etc/os-release");
    assert_eq!(out["stdout"], "yes\nID=moat-busybox\n", "{out}");
    // The host template is not an image; an unknown one is no template.
    build("third", json!({"base": "host"})).assert_error(400, "invalid");
    build("third", json!({"base": "nope"})).assert_error(400, "invalid");
}

#[test]
fn tags_are_templates_of_their_name_that_builds_and_tagging_move() {
    need_root!("moat serve's native backend needs root");
    let (_registry, reference, server, admin, key) = builder_server();
    let build = |template: &str, tags: Value, text: &str| {
        let r = server.request(
            "POST",
            "/v1/builds",
            Some(&key),
            Some(&body(json!({
                "template": template,
                "tags": tags,
                "dockerfile": format!("FROM {reference}\nRUN echo {text} > /etc/version\n"),
            }))),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        let done = wait_for_build(&server, &key, r.json()["id"].as_str().unwrap());
        assert_eq!(done["status"], "succeeded", "{done}");
        done["id"].as_str().unwrap().to_owned()
    };
    let version = |template: &str| {
        let id = server.create_sandbox_with(&key, json!({"template": template}));
        server.shell(&key, &id, "cat /etc/version")["stdout"]
            .as_str()
            .unwrap()
            .trim()
            .to_owned()
    };
    let one = build("app:v1", json!(["stable"]), "one");
    // Tags only: the name alone is not written.
    server
        .request("GET", "/v1/templates/app", Some(&key), None)
        .assert_error(404, "not_found");
    let two = build("app", json!(["v2", "stable"]), "two");
    assert_eq!(version("app:v1"), "one");
    assert_eq!(version("app:stable"), "two");
    assert_eq!(version("app"), "two");
    let shown = server
        .request("GET", "/v1/templates/app:v1", Some(&key), None)
        .json();
    assert_eq!(shown["build_id"], one.as_str(), "{shown}");

    // Tagging copies a template to tags of its name, moving those that exist.
    let out = server.cli(&key, &["template", "tag", "app:v1", "stable", "old"]);
    assert_eq!(out, "app:stable\napp:old\n");
    assert_eq!(version("app:stable"), "one");
    let listed = server
        .request("GET", "/v1/templates", Some(&key), None)
        .json();
    let builds: Vec<(String, String)> = listed["templates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"].as_str().unwrap().starts_with("app"))
        .map(|t| {
            let name = t["name"].as_str().unwrap().to_owned();
            (name, t["build_id"].as_str().unwrap().to_owned())
        })
        .collect();
    let expect = |n: &str, b: &str| (n.to_owned(), b.to_owned());
    assert_eq!(
        builds,
        vec![
            expect("app", &two),
            expect("app:old", &one),
            expect("app:stable", &one),
            expect("app:v1", &one),
            expect("app:v2", &two),
        ]
    );

    // What a tag may not do.
    let tag = |name: &str, tags: Value, key: &str| {
        server.request(
            "POST",
            &format!("/v1/templates/{name}/tags"),
            Some(key),
            Some(&body(json!({ "tags": tags }))),
        )
    };
    let refused = |r: moat_test_support::server::Reply, status: u16, code: &str, says: &str| {
        r.assert_error(status, code);
        assert!(r.text().contains(says), "{says:?}: {}", r.text());
    };
    server.create_template(&key, "hand", json!({"rootfs": {"image": reference}}));
    refused(
        tag("app:v1", json!(["x", "Bad"]), &key),
        400,
        "invalid",
        "template name",
    );
    refused(tag("app:v1", json!([]), &key), 400, "invalid", "no tag");
    refused(
        tag("hand:v1", json!(["x"]), &key),
        404,
        "not_found",
        "hand:v1",
    );
    // A tag may be taken from any template; the name alone only over what a build made.
    let r = tag("hand", json!(["x"]), &key);
    assert_eq!(r.status, 200, "{}", r.text());
    refused(
        tag("hand:x", json!(["default"]), &key),
        409,
        "conflict",
        "no build made",
    );
    refused(
        tag("host", json!(["mine"]), &key),
        409,
        "conflict",
        "built-in",
    );
    // The tags of a name are its owner's: no tenant writes `host:…`.
    let r = server.request(
        "POST",
        "/v1/templates",
        Some(&key),
        Some(&body(
            json!({"name": "host:mine", "spec": {"rootfs": "host"}}),
        )),
    );
    refused(
        r,
        409,
        "conflict",
        "would be a tag of the built-in template",
    );
    // An admin may tag a built-in; the copy is built in too, and only an admin deletes it.
    let r = tag("host", json!(["pinned"]), &admin);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["templates"][0]["builtin"], true, "{}", r.text());
    let r = server.request("DELETE", "/v1/templates/host:pinned", Some(&key), None);
    refused(r, 409, "conflict", "built in");
    let r = server.request("DELETE", "/v1/templates/host:pinned", Some(&admin), None);
    assert_eq!(r.status, 204, "{}", r.text());
    let r = server.request("GET", "/v1/templates/host:pinned", Some(&admin), None);
    assert_eq!(r.status, 404, "{}", r.text());
    // The built-ins themselves stay.
    let r = server.request("DELETE", "/v1/templates/host", Some(&admin), None);
    refused(r, 409, "conflict", "built in");
    // A tag is deleted like any template, and the name's other tags stay.
    server.cli(&key, &["template", "rm", "app:old"]);
    assert_eq!(version("app:v1"), "one");
}

#[test]
fn add_unpacks_local_archives_and_copies_other_files() {
    need_root!("moat serve's native backend needs root");
    let (_registry, reference, server, _admin, key) = builder_server();
    let ctx = tempfile::tempdir().unwrap();
    let pkg = ctx.path().join("src/pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::write(pkg.join("a.txt"), "from the archive\n").unwrap();
    std::os::unix::fs::symlink("a.txt", pkg.join("link")).unwrap();
    let tar = std::process::Command::new("tar")
        .args(["-czf", "pkg.tgz", "-C", "src", "pkg"])
        .current_dir(ctx.path())
        .status()
        .unwrap();
    assert!(tar.success());
    std::fs::write(ctx.path().join("plain.txt"), "a plain file\n").unwrap();
    std::fs::remove_dir_all(ctx.path().join("src")).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {reference}\nADD pkg.tgz /opt/unpacked/\nADD plain.txt /etc/plain\n"),
    )
    .unwrap();
    let dir = ctx.path().to_str().unwrap();
    let out = server.cli(&key, &["template", "build", "added", dir]);
    assert_eq!(out, "added\n");
    let id = server.create_sandbox_with(&key, json!({"template": "added"}));
    let out = server.shell(
        &key,
        &id,
        "cat /opt/unpacked/pkg/a.txt /opt/unpacked/pkg/link /etc/plain; readlink /opt/unpacked/pkg/link",
    );
    assert_eq!(
        out["stdout"], "from the archive\nfrom the archive\na plain file\na.txt\n",
        "{out}"
    );
}

#[test]
fn a_build_cancelled_while_its_step_sandbox_starts_leaves_none_behind() {
    need_root!("moat serve's native backend needs root");
    let (_registry, reference, server, _admin, key) = builder_server();
    // The step's sandbox is made right after its line reaches the log: a cancel sent the
    // moment the line is seen lands, in most rounds, while that sandbox is being made.
    for round in 0..10 {
        let r = server.request(
            "POST",
            "/v1/builds",
            Some(&key),
            Some(&body(json!({
                "template": format!("starting{round}"),
                "dockerfile": format!("FROM {reference}\nRUN sleep 60 # {round}\n"),
            }))),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_owned();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !build_log(&server, &key, &id).contains("Step 1/1") {
            assert!(Instant::now() < deadline, "the step did not start");
        }
        let r = server.request("POST", &format!("/v1/builds/{id}/cancel"), Some(&key), None);
        assert_eq!(r.status, 200, "{}", r.text());
        let cancelled = wait_for_build(&server, &key, &id);
        assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
        let (alive, sandboxes) = sandboxes_not_killed(&server, &key);
        assert_eq!(
            alive, 0,
            "round {round}: a build's sandbox outlived it: {sandboxes}"
        );
    }
    // Nor does one appear after the builds ended.
    std::thread::sleep(Duration::from_millis(500));
    let (alive, sandboxes) = sandboxes_not_killed(&server, &key);
    assert_eq!(
        alive, 0,
        "a build's sandbox appeared after it ended: {sandboxes}"
    );
}
