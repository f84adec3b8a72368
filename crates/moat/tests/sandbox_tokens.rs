//! Who may reach a sandbox's ports through `moat serve`: the code interpreter (port 49999) on
//! every route only with the sandbox's access token or its traffic access token, never with a
//! sandbox id alone or another sandbox's tokens; user services open unless the sandbox (or the
//! server, `--private-traffic`) made them private, then only with the traffic access token.
//! Needs root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::need_root;
use support::server::*;

/// A sandbox made through the E2B API, with the tokens its create answered.
struct E2bSandbox {
    id: String,
    access: String,
    traffic: String,
}

/// A key of a tenant of its own.
fn tenant_key(server: &Server, tenant: &str) -> String {
    server.create_key(
        &server.admin_key(),
        json!({"name": tenant, "tenant": tenant}),
    )
}

/// `POST /v2/sandboxes` with `request` as `key`.
fn create(server: &Server, key: &str, request: Value) -> E2bSandbox {
    let r = server
        .send(
            "POST",
            "/v2/sandboxes",
            None,
            &[("X-API-KEY", key), ("Content-Type", "application/json")],
            Some(&body(request)),
        )
        .expect("create");
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let answer = r.json();
    let field = |name: &str| {
        answer[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {answer}"))
            .to_owned()
    };
    E2bSandbox {
        id: field("sandboxID"),
        access: field("envdAccessToken"),
        traffic: field("trafficAccessToken"),
    }
}

/// A request routed to `port` of sandbox `id` with `headers`.
fn to_port(
    server: &Server,
    id: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    payload: Option<&[u8]>,
) -> Reply {
    let port = port.to_string();
    let mut all = vec![("E2b-Sandbox-Id", id), ("E2b-Sandbox-Port", port.as_str())];
    all.extend_from_slice(headers);
    if payload.is_some() {
        all.push(("Content-Type", "application/json"));
    }
    server
        .send(method, path, None, &all, payload)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Waits (with a generous bound, not a speed check) until port 8000 of `sbx` answers other
/// than 502, with the traffic token.
fn wait_listening(server: &Server, sbx: &E2bSandbox) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = to_port(
            server,
            &sbx.id,
            8000,
            "GET",
            "/",
            &[("E2B-Traffic-Access-Token", &sbx.traffic)],
            None,
        );
        if r.status != 502 {
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            return;
        }
        assert!(Instant::now() < deadline, "port 8000 never opened");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const SERVE_8000: &str = "setsid /usr/bin/python3 -m http.server 8000 --bind 127.0.0.1 \
                          --directory /tmp </dev/null >/dev/null 2>&1 &";

#[test]
fn interpreter_needs_a_token_on_every_route() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let owner = tenant_key(&server, "owner");
    let other = tenant_key(&server, "other");
    let sbx = create(
        &server,
        &owner,
        json!({"templateID": "code-interpreter-v1"}),
    );
    let theirs = create(&server, &other, json!({"templateID": "base"}));
    assert_ne!(sbx.access, sbx.traffic, "the two tokens must differ");

    let new_context = br#"{"language":"python"}"#.as_slice();
    let routes: [(&str, &str, Option<&[u8]>); 6] = [
        ("POST", "/contexts", Some(new_context)),
        ("GET", "/contexts", None),
        ("POST", "/contexts/abc/restart", None),
        ("DELETE", "/contexts/abc", None),
        ("GET", "/health", None),
        ("POST", "/execute", Some(br#"{"code":"1"}"#.as_slice())),
    ];
    // Another tenant with the id only, or with its own sandbox's tokens, or with the traffic
    // token in the access token's header: 401 on every route.
    for (method, path, payload) in routes {
        for headers in [
            vec![],
            vec![("X-Access-Token", theirs.access.as_str())],
            vec![("E2B-Traffic-Access-Token", theirs.traffic.as_str())],
            vec![("X-Access-Token", sbx.traffic.as_str())],
            vec![("X-API-KEY", other.as_str())],
        ] {
            let r = to_port(&server, &sbx.id, 49999, method, path, &headers, payload);
            assert_eq!(
                r.status,
                401,
                "{method} {path} with {headers:?}: {}",
                String::from_utf8_lossy(&r.body)
            );
        }
    }

    // The owner's SDK: the traffic token alone on the context routes, as the code interpreter
    // SDK sends it.
    let traffic = [("E2B-Traffic-Access-Token", sbx.traffic.as_str())];
    let r = to_port(
        &server,
        &sbx.id,
        49999,
        "POST",
        "/contexts",
        &traffic,
        Some(new_context),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let context = r.json()["id"].as_str().expect("context id").to_owned();
    let r = to_port(&server, &sbx.id, 49999, "GET", "/contexts", &traffic, None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = to_port(
        &server,
        &sbx.id,
        49999,
        "DELETE",
        &format!("/contexts/{context}"),
        &traffic,
        None,
    );
    assert!(
        r.status == 200 || r.status == 204,
        "{} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    // The access token works on the interpreter too.
    let r = to_port(
        &server,
        &sbx.id,
        49999,
        "GET",
        "/contexts",
        &[("X-Access-Token", &sbx.access)],
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Nor does it run code: `/execute` takes the access token alone.
    let r = to_port(
        &server,
        &sbx.id,
        49999,
        "POST",
        "/execute",
        &traffic,
        Some(br#"{"code":"print(1)"}"#),
    );
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));

    // envd takes its own token only: the traffic token does not run commands.
    let r = to_port(
        &server,
        &sbx.id,
        49983,
        "POST",
        "/process.Process/List",
        &[
            ("E2B-Traffic-Access-Token", &sbx.traffic),
            ("Connect-Protocol-Version", "1"),
        ],
        Some(b"{}"),
    );
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn user_services_are_public_unless_made_private() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let key = tenant_key(&server, "acme");
    let public = create(&server, &key, json!({"templateID": "base"}));
    let private = create(
        &server,
        &key,
        json!({"templateID": "base", "network": {"allowPublicTraffic": false}}),
    );
    let v1 = |sbx: &E2bSandbox| {
        server
            .request(
                "GET",
                &format!("/v1/sandboxes/{}", sbx.id),
                Some(&key),
                None,
            )
            .json()
    };
    assert_eq!(v1(&public)["public_traffic"], true);
    assert_eq!(v1(&private)["public_traffic"], false);
    assert_eq!(
        v1(&private)["traffic_access_token"],
        private.traffic.as_str()
    );
    for sbx in [&public, &private] {
        exec_as(&server, &key, sbx, SERVE_8000);
        wait_listening(&server, sbx);
    }
    let get = |sbx: &E2bSandbox, headers: &[(&str, &str)]| {
        to_port(&server, &sbx.id, 8000, "GET", "/", headers, None).status
    };
    // Public: anyone with the address.
    assert_eq!(get(&public, &[]), 200);
    // Private: the traffic token (or the access token), nothing else.
    assert_eq!(get(&private, &[]), 401);
    assert_eq!(
        get(&private, &[("E2B-Traffic-Access-Token", &public.traffic)]),
        401
    );
    assert_eq!(
        get(&private, &[("E2B-Traffic-Access-Token", &private.access)]),
        401
    );
    assert_eq!(
        get(&private, &[("E2B-Traffic-Access-Token", &private.traffic)]),
        200
    );
    assert_eq!(get(&private, &[("X-Access-Token", &private.access)]), 200);
}

#[test]
fn private_traffic_server_default() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start_with(&["--private-traffic"]);
    let key = tenant_key(&server, "acme");
    let default = create(&server, &key, json!({"templateID": "base"}));
    let public = create(
        &server,
        &key,
        json!({"templateID": "base", "network": {"allowPublicTraffic": true}}),
    );
    for sbx in [&default, &public] {
        exec_as(&server, &key, sbx, SERVE_8000);
        wait_listening(&server, sbx);
    }
    let get = |sbx: &E2bSandbox| to_port(&server, &sbx.id, 8000, "GET", "/", &[], None).status;
    assert_eq!(get(&default), 401);
    assert_eq!(get(&public), 200);
}

/// Runs `shell` in `sbx` over `/v1` as `key` and expects success.
fn exec_as(server: &Server, key: &str, sbx: &E2bSandbox, shell: &str) {
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{}/exec", sbx.id),
        Some(key),
        Some(&body(json!({"shell": shell}))),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["exit_code"],
        0,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}

#[test]
fn privacy_survives_a_restart() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start_with(&["--on-shutdown", "keep"]);
    let key = tenant_key(&server, "acme");
    let private = create(
        &server,
        &key,
        json!({"templateID": "base", "network": {"allowPublicTraffic": false}}),
    );
    exec_as(&server, &key, &private, SERVE_8000);
    wait_listening(&server, &private);
    // A server that takes the kept sandbox over keeps it private.
    let (dir, data) = server.stop();
    let server = Server::start_in_with(dir, data, &["--on-shutdown", "keep"]);
    wait_listening(&server, &private);
    let r = to_port(&server, &private.id, 8000, "GET", "/", &[], None);
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    let r = server.request(
        "DELETE",
        &format!("/v1/sandboxes/{}", private.id),
        Some(&key),
        None,
    );
    assert_eq!(r.status, 204);
}
