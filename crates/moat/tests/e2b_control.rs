//! The E2B-compatible control plane of a real `moat serve`, over HTTP/1.1 as the E2B SDKs send
//! it: `X-API-KEY` auth, create (with its fields, refusals, idempotency and the warm pool's
//! path), get, list (filters and paging), timeout, connect, metrics and kill, E2B's JSON errors
//! with `Should-Retry: false` on failed creates, and tenancy. Needs root (the native backend);
//! skips with a printed reason otherwise.

use moat_test_support as support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use moat_engine::store::{Quotas, Role, Store};
use serde_json::{Value, json};
use support::need_root;
use support::server::*;

/// One E2B request: the key as `X-API-KEY`, extra headers, a JSON body.
fn e2b(
    server: &Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    if let Some(key) = key {
        all.push(("X-API-KEY", key));
    }
    let body = body.map(support::server::body);
    if body.is_some() {
        all.push(("Content-Type", "application/json"));
    }
    server
        .send(method, path, None, &all, body.as_deref())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Asserts an E2B error: this status, JSON `{"code": status, "message": non-empty}`.
fn assert_e2b_error(r: &Reply, status: u16) -> String {
    assert_eq!(
        r.status,
        status,
        "body: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    assert_eq!(body["code"], status, "{body}");
    let message = body["message"].as_str().unwrap_or_default().to_owned();
    assert!(!message.is_empty(), "{body}");
    message
}

/// Asserts a failed create: an E2B error that tells the SDK not to retry.
fn assert_create_refused(r: &Reply, status: u16) -> String {
    let message = assert_e2b_error(r, status);
    assert_eq!(r.header("should-retry"), Some("false"), "{}", r.headers);
    message
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn quote(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The `metadata` query parameter as the E2B SDKs build it: each key and value quoted, joined
/// as a form, and the whole quoted again as one value.
fn metadata_query(pairs: &[(&str, &str)]) -> String {
    let form: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", quote(&quote(k)), quote(&quote(v))))
        .collect();
    format!("metadata={}", quote(&form.join("&")))
}

/// Unix milliseconds of the RFC 3339 UTC times the server writes (`2025-01-01T00:00:00.000Z`).
fn unix_ms(text: &str) -> i64 {
    let num = |range: std::ops::Range<usize>| -> i64 {
        text.get(range)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a time: {text}"))
    };
    assert!(text.ends_with('Z') && text.len() == 24, "{text}");
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    // Days since the epoch of a proleptic Gregorian date.
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + num(11..13) * 3600 + num(14..16) * 60 + num(17..19);
    secs * 1000 + num(20..23)
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    i64::try_from(d.as_millis()).expect("ms")
}

/// A key of a fresh tenant, made beside the running server.
fn tenant_key(server: &Server, tenant: &str, quotas: Quotas) -> String {
    let store = Store::open(server.data.join("moat.db")).expect("store");
    if store.create_tenant(tenant, tenant).is_err() {
        // Made by an earlier call.
    }
    let (_, secret) = store
        .create_key(tenant, "e2b", Role::User, quotas)
        .expect("key");
    secret.expose().to_owned()
}

/// Runs `sh -c script` in sandbox `id` through `/v1` (the same key, as a Bearer key).
fn sh(server: &Server, key: &str, id: &str, script: &str) -> Value {
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(key),
        Some(&body(json!({"cmd": ["/bin/sh", "-c", script]}))),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn create(server: &Server, key: &str, req: Value) -> Value {
    let r = e2b(server, "POST", "/v2/sandboxes", Some(key), &[], Some(req));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn id_of(sandbox: &Value) -> String {
    sandbox["sandboxID"].as_str().expect("sandboxID").to_owned()
}

/// Every page of `GET /v2/sandboxes?<query>` with `limit`, following `x-next-token`.
fn list_all(server: &Server, key: &str, query: &str, limit: u32) -> Vec<Value> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut path = format!("/v2/sandboxes?limit={limit}");
        if !query.is_empty() {
            path.push('&');
            path.push_str(query);
        }
        if let Some(t) = &token {
            path.push_str(&format!("&nextToken={}", quote(t)));
        }
        let r = e2b(server, "GET", &path, Some(key), &[], None);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let page = r.json();
        let items = page.as_array().expect("a JSON array");
        assert!(items.len() <= limit as usize);
        out.extend(items.iter().cloned());
        match r.header("x-next-token").filter(|t| !t.is_empty()) {
            Some(t) => token = Some(t.to_owned()),
            None => return out,
        }
    }
}

fn ids(items: &[Value]) -> Vec<String> {
    items.iter().map(id_of).collect()
}

#[test]
fn e2b_control_plane() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let key = server.admin_key();
    let key = key.as_str();

    // Auth: none, a wrong key, a Bearer key (E2B clients send X-API-KEY only).
    assert_e2b_error(&e2b(&server, "GET", "/v2/sandboxes", None, &[], None), 401);
    assert_e2b_error(
        &e2b(
            &server,
            "GET",
            "/v2/sandboxes",
            Some("moat_nope"),
            &[],
            None,
        ),
        401,
    );
    let r = server.request("GET", "/v2/sandboxes", Some(key), None);
    assert_e2b_error(&r, 401);
    assert_create_refused(
        &e2b(
            &server,
            "POST",
            "/v2/sandboxes",
            None,
            &[],
            Some(json!({"templateID": "base"})),
        ),
        401,
    );

    // Create: 201 with every field the SDK requires.
    let sandbox = create(
        &server,
        key,
        json!({"templateID": "base", "timeout": 120, "metadata": {"suite": "e2b", "n": "1"},
               "envVars": {"GREETING": "hello e2b"}, "allow_internet_access": false,
               "somethingNew": {"ignored": true}}),
    );
    let id = id_of(&sandbox);
    assert!(
        !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{id}"
    );
    assert_eq!(sandbox["templateID"], "base");
    assert_eq!(sandbox["clientID"], "6532622b");
    assert_eq!(sandbox["envdVersion"], "0.6.13");
    assert_eq!(sandbox["domain"], format!("localhost:{}", server.port));
    let token = sandbox["envdAccessToken"]
        .as_str()
        .expect("token")
        .to_owned();
    assert!(token.len() >= 32, "{token}");
    // The env is the sandbox's default; E2B's user and home.
    let out = sh(&server, key, &id, "echo \"$GREETING\"; id -un; pwd");
    assert_eq!(out["stdout"], "hello e2b\nuser\n/home/user\n", "{out}");

    // Get: the detail, its times and limits.
    let r = e2b(
        &server,
        "GET",
        &format!("/sandboxes/{id}"),
        Some(key),
        &[],
        None,
    );
    assert_eq!(r.status, 200);
    let detail = r.json();
    for (field, want) in [
        ("sandboxID", json!(id)),
        ("templateID", json!("base")),
        ("clientID", json!("6532622b")),
        ("envdVersion", json!("0.6.13")),
        ("state", json!("running")),
        ("metadata", json!({"suite": "e2b", "n": "1"})),
        ("envdAccessToken", json!(token)),
        ("domain", json!(format!("localhost:{}", server.port))),
    ] {
        assert_eq!(detail[field], want, "{field}: {detail}");
    }
    for field in ["cpuCount", "memoryMB", "diskSizeMB"] {
        assert!(
            detail[field].as_u64().is_some_and(|n| n > 0),
            "{field}: {detail}"
        );
    }
    let started = unix_ms(detail["startedAt"].as_str().expect("startedAt"));
    let end = unix_ms(detail["endAt"].as_str().expect("endAt"));
    let ttl = end - started;
    assert!((110_000..=120_000).contains(&ttl), "TTL {ttl} ms: {detail}");

    // Timeout: from now, and it may shorten.
    let r = e2b(
        &server,
        "POST",
        &format!("/sandboxes/{id}/timeout"),
        Some(key),
        &[],
        Some(json!({"timeout": 30})),
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let end_of = |id: &str| -> i64 {
        let r = e2b(
            &server,
            "GET",
            &format!("/sandboxes/{id}"),
            Some(key),
            &[],
            None,
        );
        assert_eq!(r.status, 200);
        unix_ms(r.json()["endAt"].as_str().expect("endAt"))
    };
    let shortened = end_of(&id);
    assert!(
        shortened < end && shortened <= now_ms() + 30_000,
        "{shortened}"
    );
    for bad in [
        json!({"timeout": 0}),
        json!({"timeout": -1}),
        json!({}),
        json!({"timeout": 1e12}),
    ] {
        let r = e2b(
            &server,
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(key),
            &[],
            Some(bad),
        );
        assert_e2b_error(&r, 400);
    }

    // Connect: a running sandbox answers 200 and its TTL only grows.
    let connect = |id: &str, body: Value| {
        e2b(
            &server,
            "POST",
            &format!("/v2/sandboxes/{id}/connect"),
            Some(key),
            &[],
            Some(body),
        )
    };
    let r = connect(&id, json!({"timeout": 5}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let connected = r.json();
    assert_eq!(connected["sandboxID"], id.as_str());
    assert_eq!(connected["envdAccessToken"], token.as_str());
    assert_eq!(connected["envdVersion"], "0.6.13");
    assert_eq!(
        end_of(&id),
        shortened,
        "a shorter connect timeout changed nothing"
    );
    let r = connect(&id, json!({"timeout": 600}));
    assert_eq!(r.status, 200);
    assert!(end_of(&id) > shortened + 500_000);
    assert_e2b_error(
        &connect("aaaaaaaaaaaaaaaaaaaa", json!({"timeout": 10})),
        404,
    );
    assert_e2b_error(&connect(&id, json!({"timeout": 0})), 400);
    // Routes of E2B's generated client that moat does not serve are refused by name, not
    // answered "not found" (which the SDK reads as "no such sandbox").
    for (method, path, needle) in [
        ("POST", format!("/sandboxes/{id}/resume"), "resume"),
        ("POST", format!("/sandboxes/{id}/refreshes"), "refreshes"),
        ("GET", format!("/sandboxes/{id}/logs"), "logs"),
        ("GET", format!("/v2/sandboxes/{id}/logs"), "logs"),
        ("GET", "/sandboxes/metrics".to_owned(), "several sandboxes"),
    ] {
        let r = e2b(&server, method, &path, Some(key), &[], None);
        let message = assert_e2b_error(&r, 501);
        assert!(
            message.contains(needle) && message.contains("not supported"),
            "{message}"
        );
    }
    // The control plane's own health, as upstream's.
    let r = e2b(&server, "GET", "/health", None, &[], None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // A reboot (`memory: false`) is a no-op on a running sandbox, and refused on a paused one
    // (moat resumes processes; it does not start them afresh), which stays paused.
    let r = connect(&id, json!({"timeout": 600, "memory": false}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = e2b(
        &server,
        "POST",
        &format!("/sandboxes/{id}/pause"),
        Some(key),
        &[],
        Some(json!({})),
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let refusal = assert_e2b_error(&connect(&id, json!({"timeout": 600, "memory": false})), 400);
    assert!(refusal.contains("memory: false"), "{refusal}");
    let r = connect(&id, json!({"timeout": 600}));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    // Create refusals: E2B errors marked not to be retried, and nothing made.
    let count = |key: &str| list_all(&server, key, "", 100).len();
    let before = count(key);
    for (req, status, needle) in [
        (json!({"templateID": "base", "timeout": 0}), 400, "Timeout"),
        (
            json!({"templateID": "base", "timeout": 1_000_000_000}),
            400,
            "cannot be greater than",
        ),
        (json!({"templateID": "no-such-template"}), 404, "not found"),
        (
            json!({"templateID": "base", "network": {"egressProxy": {"address": "p:1080"}}}),
            400,
            "egressProxy",
        ),
        (
            json!({"templateID": "base", "network": {"denyOut": ["evil.example.com"]}}),
            400,
            "denyOut",
        ),
        (
            json!({"templateID": "base", "network": {"allowOut": ["not a host"]}}),
            400,
            "network.allow[0]",
        ),
        (
            json!({"templateID": "base", "autoPause": true, "autoPauseMemory": false}),
            400,
            "autoPauseMemory",
        ),
        (json!({"templateID": "base", "mcp": {"x": {}}}), 400, "mcp"),
        (
            json!({"templateID": "base", "volumeMounts": [{"name": "v", "path": "/v"}]}),
            400,
            "volumeMounts",
        ),
        (
            json!({"templateID": "base", "iam": {"tokens": {"t": {}}}}),
            400,
            "iam",
        ),
        (json!({"templateID": 7}), 400, "invalid JSON"),
        (json!({"templateID": "Bad Name"}), 400, "template"),
    ] {
        let r = e2b(
            &server,
            "POST",
            "/v2/sandboxes",
            Some(key),
            &[],
            Some(req.clone()),
        );
        let message = assert_create_refused(&r, status);
        assert!(message.contains(needle), "{req}: {message}");
    }
    let r = server
        .send(
            "POST",
            "/v2/sandboxes",
            None,
            &[("X-API-KEY", key), ("Content-Type", "application/json")],
            Some(b"{not json"),
        )
        .expect("send");
    assert_create_refused(&r, 400);
    assert_eq!(count(key), before, "a refused create made a sandbox");

    // Idempotency: the same key answers with the same sandbox; another key makes another.
    let with_key = |k: &str, key: &str| {
        let r = e2b(
            &server,
            "POST",
            "/v2/sandboxes",
            Some(key),
            &[("Idempotency-Key", k)],
            Some(json!({"templateID": "base", "metadata": {"suite": "idem"}})),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        id_of(&r.json())
    };
    let first = with_key("retry-1", key);
    assert_eq!(with_key("retry-1", key), first);
    let second = with_key("retry-2", key);
    assert_ne!(second, first);
    let idem = list_all(&server, key, &metadata_query(&[("suite", "idem")]), 100);
    assert_eq!(idem.len(), 2, "{idem:?}");
    let r = e2b(
        &server,
        "POST",
        "/v2/sandboxes",
        Some(key),
        &[("Idempotency-Key", "Not_Valid")],
        Some(json!({"templateID": "base"})),
    );
    assert_create_refused(&r, 400);

    // Listing: metadata filters (AND, double-encoded), states, paging, order.
    let mut made = Vec::new();
    for i in 0..5 {
        let parity = if i % 2 == 0 { "even" } else { "odd" };
        let sb = create(
            &server,
            key,
            json!({"templateID": "code-interpreter-v1",
                   "metadata": {"suite": "list", "parity": parity, "odd key/=&": "v a+l"}}),
        );
        assert_eq!(sb["templateID"], "code-interpreter-v1");
        made.push(id_of(&sb));
    }
    let newest_first: Vec<String> = made.iter().rev().cloned().collect();
    let listed = list_all(&server, key, &metadata_query(&[("suite", "list")]), 2);
    assert_eq!(ids(&listed), newest_first, "paged, newest first");
    let asc = list_all(
        &server,
        key,
        &format!("{}&order=asc", metadata_query(&[("suite", "list")])),
        3,
    );
    assert_eq!(ids(&asc), made, "oldest first");
    let even = list_all(
        &server,
        key,
        &metadata_query(&[
            ("suite", "list"),
            ("parity", "even"),
            ("odd key/=&", "v a+l"),
        ]),
        100,
    );
    assert_eq!(
        ids(&even),
        [made[4].clone(), made[2].clone(), made[0].clone()]
    );
    assert!(
        list_all(
            &server,
            key,
            &metadata_query(&[("suite", "list"), ("parity", "prime")]),
            100
        )
        .is_empty()
    );
    let item = &listed[0];
    for field in [
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
        "envdVersion",
        "metadata",
    ] {
        assert!(!item[field].is_null(), "{field}: {item}");
    }
    assert_eq!(item["state"], "running");
    let running = list_all(&server, key, "state=running", 100);
    let paused = list_all(&server, key, "state=paused", 100);
    let both = list_all(&server, key, "state=running,paused", 100);
    assert!(paused.is_empty());
    assert_eq!(ids(&running), ids(&both));
    assert!(ids(&running).contains(&id));
    let by_template = list_all(&server, key, "template=code-interpreter-v1", 100);
    assert_eq!(ids(&by_template), newest_first);
    for bad in [
        "limit=0",
        "limit=101",
        "state=killed",
        "order=up",
        "nextToken=x",
    ] {
        let r = e2b(
            &server,
            "GET",
            &format!("/v2/sandboxes?{bad}"),
            Some(key),
            &[],
            None,
        );
        assert_e2b_error(&r, 400);
    }

    // Metrics: real numbers of the sandbox's cgroup and writable layer.
    sh(
        &server,
        key,
        &id,
        "head -c 16777216 /dev/zero > /home/user/blob; \
         end=$(($(date +%s) + 2)); while [ $(date +%s) -lt $end ]; do :; done",
    );
    let r = e2b(
        &server,
        "GET",
        &format!("/sandboxes/{id}/metrics"),
        Some(key),
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let metrics = r.json();
    let metrics = metrics.as_array().expect("array");
    assert!(!metrics.is_empty());
    let last = metrics.last().expect("a sample");
    let n = |field: &str| -> f64 {
        last[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field}: {last}"))
    };
    assert_eq!(n("cpuCount"), detail["cpuCount"].as_f64().expect("cpus"));
    assert_eq!(
        n("memTotal"),
        detail["memoryMB"].as_f64().expect("MB") * 1048576.0
    );
    assert!(
        n("memUsed") > 0.0 && n("memUsed") <= n("memTotal"),
        "{last}"
    );
    assert!(n("memCache") <= n("memUsed"), "{last}");
    assert!(n("diskTotal") > 0.0, "{last}");
    assert!(
        n("diskUsed") >= 16_777_216.0 && n("diskUsed") <= n("diskTotal"),
        "the 16 MiB file is on the writable layer: {last}"
    );
    assert!(
        (n("timestampUnix") * 1000.0 - now_ms() as f64).abs() < 3_600_000.0,
        "{last}"
    );
    assert!(last["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    // CPU is a rate between samples: the busy loop shows in one of them.
    for m in metrics {
        let pct = m["cpuUsedPct"].as_f64().expect("pct");
        assert!((0.0..=100.0).contains(&pct), "{m}");
    }
    assert!(
        metrics
            .iter()
            .any(|m| m["cpuUsedPct"].as_f64().is_some_and(|p| p > 0.0)),
        "{metrics:?}"
    );
    let future = now_ms() / 1000 + 3600;
    let r = e2b(
        &server,
        "GET",
        &format!("/sandboxes/{id}/metrics?start={future}"),
        Some(key),
        &[],
        None,
    );
    assert_eq!(r.json(), json!([]));
    let r = e2b(
        &server,
        "GET",
        &format!("/sandboxes/{id}/metrics?start=soon"),
        Some(key),
        &[],
        None,
    );
    assert_e2b_error(&r, 400);

    // Another tenant sees none of it.
    let other = tenant_key(&server, "other", Quotas::default());
    let other = other.as_str();
    for (method, path, body) in [
        ("GET", format!("/sandboxes/{id}"), None),
        ("DELETE", format!("/sandboxes/{id}"), None),
        ("GET", format!("/sandboxes/{id}/metrics"), None),
        (
            "POST",
            format!("/sandboxes/{id}/timeout"),
            Some(json!({"timeout": 60})),
        ),
        (
            "POST",
            format!("/v2/sandboxes/{id}/connect"),
            Some(json!({"timeout": 60})),
        ),
        ("PUT", format!("/sandboxes/{id}/network"), Some(json!({}))),
        // A malformed id names no sandbox either.
        (
            "PUT",
            "/sandboxes/not-an-id/network".to_owned(),
            Some(json!({})),
        ),
    ] {
        let r = e2b(&server, method, &path, Some(other), &[], body);
        assert_e2b_error(&r, 404);
    }
    assert!(list_all(&server, other, "", 100).is_empty());
    // Its idempotency keys are its own.
    let theirs = with_key("retry-1", other);
    assert_ne!(theirs, first);

    // A key over its quota: 429 with Retry-After, and not to be retried.
    let capped = tenant_key(
        &server,
        "capped",
        Quotas {
            max_sandboxes: Some(0),
            ..Quotas::default()
        },
    );
    let r = e2b(
        &server,
        "POST",
        "/v2/sandboxes",
        Some(&capped),
        &[],
        Some(json!({"templateID": "base"})),
    );
    assert_create_refused(&r, 429);
    assert!(r.header("retry-after").is_some(), "{}", r.headers);

    // The warm pool: an E2B create of a pooled template claims a ready member, as /v1's does.
    server.create_template(key, "pooled", json!({"rootfs": "host", "pool_size": 1}));
    // A generous deadline for a loaded machine; not a speed check.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = server
            .request("GET", "/v1/templates/pooled", Some(key), None)
            .json();
        if t["pool"]["ready"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the pool never filled: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let claims = || -> u64 {
        let r = server.request("GET", "/metrics", Some(key), None);
        String::from_utf8_lossy(&r.body)
            .lines()
            .find_map(|l| {
                l.strip_prefix("moat_claim_seconds_count ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .expect("moat_claim_seconds_count")
    };
    let before = claims();
    let pooled = create(
        &server,
        key,
        json!({"templateID": "pooled", "metadata": {}, "envVars": {}}),
    );
    assert_eq!(pooled["templateID"], "pooled");
    assert_eq!(claims(), before + 1, "the create was not a claim");
    assert_eq!(
        e2b(
            &server,
            "DELETE",
            &format!("/sandboxes/{}", id_of(&pooled)),
            Some(key),
            &[],
            None
        )
        .status,
        204
    );

    // Unknown routes and methods under E2B's paths still answer E2B's JSON.
    assert_e2b_error(
        &e2b(&server, "GET", "/v2/nothing", Some(key), &[], None),
        404,
    );
    assert_e2b_error(
        &e2b(
            &server,
            "PUT",
            &format!("/sandboxes/{id}"),
            Some(key),
            &[],
            None,
        ),
        405,
    );
    assert_e2b_error(
        &e2b(&server, "GET", "/sandboxes/NOT-an-id", Some(key), &[], None),
        404,
    );

    // Kill: 204, then 404 everywhere; the listing drops it.
    let kill = |id: &str| {
        e2b(
            &server,
            "DELETE",
            &format!("/sandboxes/{id}"),
            Some(key),
            &[],
            None,
        )
    };
    assert_eq!(kill(&id).status, 204);
    assert_e2b_error(&kill(&id), 404);
    assert_e2b_error(
        &e2b(
            &server,
            "GET",
            &format!("/sandboxes/{id}"),
            Some(key),
            &[],
            None,
        ),
        404,
    );
    assert_e2b_error(&connect(&id, json!({"timeout": 60})), 404);
    assert_e2b_error(
        &e2b(
            &server,
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(key),
            &[],
            Some(json!({"timeout": 60})),
        ),
        404,
    );
    assert_e2b_error(
        &e2b(
            &server,
            "GET",
            &format!("/sandboxes/{id}/metrics"),
            Some(key),
            &[],
            None,
        ),
        404,
    );
    let remaining: BTreeSet<String> = ids(&list_all(&server, key, "", 100)).into_iter().collect();
    assert!(!remaining.contains(&id));
    for id in remaining {
        assert_eq!(kill(&id).status, 204);
    }
    assert_eq!(
        e2b(
            &server,
            "DELETE",
            &format!("/sandboxes/{theirs}"),
            Some(other),
            &[],
            None
        )
        .status,
        204
    );
}

/// Builds asked for and not yet started are bounded per tenant (`429` past 16), so one tenant
/// cannot take the server's room for them from another.
#[test]
fn builds_waiting_to_start_are_bounded_per_tenant() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let greedy = tenant_key(&server, "greedy", Quotas::default());
    let other = tenant_key(&server, "other", Quotas::default());
    let ask = |key: &str, name: &str| {
        e2b(
            &server,
            "POST",
            "/v3/templates",
            Some(key),
            &[],
            Some(json!({"name": name})),
        )
    };
    for n in 0..16 {
        let r = ask(&greedy, &format!("t{n}"));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let message = assert_e2b_error(&ask(&greedy, "t16"), 429);
    assert!(message.contains("16 builds of yours"), "{message}");
    let r = ask(&other, "mine");
    assert_eq!(r.status, 202, "{}", r.text());
}

/// A build's steps and tags are counted before they are worked on: a request of a few
/// hundred kilobytes cannot make the server write gigabytes of Dockerfile or compare a
/// hundred thousand tags with each other.
#[test]
fn oversized_builds_are_refused_before_they_are_translated() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let key = tenant_key(&server, "builder", Quotas::default());
    let tags: Vec<String> = (0..20_000).map(|n| format!("t{n}")).collect();
    let r = e2b(
        &server,
        "POST",
        "/v3/templates",
        Some(&key),
        &[],
        Some(json!({"name": "many", "tags": tags})),
    );
    let message = assert_e2b_error(&r, 400);
    assert!(message.contains("20000 tags"), "{message}");

    // Each start is of a build of its own: a refused start ends its build.
    let start = |steps: Vec<Value>| {
        let r = e2b(
            &server,
            "POST",
            "/v3/templates",
            Some(&key),
            &[],
            Some(json!({"name": "deep"})),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        let (template, build) = (
            r.json()["templateID"]
                .as_str()
                .expect("templateID")
                .to_owned(),
            r.json()["buildID"].as_str().expect("buildID").to_owned(),
        );
        e2b(
            &server,
            "POST",
            &format!("/v2/templates/{template}/builds/{build}"),
            Some(&key),
            &[],
            Some(json!({"fromImage": "debian:12", "steps": steps})),
        )
    };
    // Too many steps.
    let short = json!({"type": "WORKDIR", "args": ["a"]});
    let message = assert_e2b_error(&start(vec![short; 5000]), 400);
    assert!(message.contains("5000 steps"), "{message}");
    // Few enough steps, whose paths (each relative to the one before) still grow past a
    // Dockerfile's size.
    let step = json!({"type": "WORKDIR", "args": ["a".repeat(3000)]});
    let message = assert_e2b_error(&start(vec![step; 250]), 400);
    assert!(message.contains("more than the"), "{message}");
}

/// A build asked for (`POST /v3/templates`) survives a crash of the server before its steps
/// come: the SDK's next call starts it, and it builds.
#[test]
fn a_build_asked_for_before_a_crash_starts_after_it() {
    need_root!("moat serve's native backend needs root");
    let registry = support::registry::Registry::start();
    let mut image = support::registry::TestImage::new(vec![support::registry::busybox_layer(&[
        "sh", "echo", "true",
    ])]);
    image.run = json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]});
    registry.push("tools/bb", "1", &image);
    let allow = ["--allow-registry", &registry.host()];
    let server = Server::start_with(&allow);
    let key = tenant_key(&server, "builder", Quotas::default());
    let r = e2b(
        &server,
        "POST",
        "/v3/templates",
        Some(&key),
        &[],
        Some(json!({"name": "survivor"})),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let build = r.json()["buildID"].as_str().expect("buildID").to_owned();

    let (dir, data) = server.kill9();
    let server = Server::start_in_with(dir, data, &allow);
    let status = |server: &Server| {
        let r = e2b(
            server,
            "GET",
            &format!("/templates/survivor/builds/{build}/status"),
            Some(&key),
            &[],
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    assert_eq!(status(&server)["status"], "waiting");
    // A start refused (here: a template to start from that is not there) leaves the build
    // waiting for a start that works.
    let r = e2b(
        &server,
        "POST",
        &format!("/v2/templates/survivor/builds/{build}"),
        Some(&key),
        &[],
        Some(json!({"fromTemplate": "not-there", "steps": []})),
    );
    assert_eq!(r.status / 100, 4, "{}", r.text());
    assert_eq!(status(&server)["status"], "waiting");
    let r = e2b(
        &server,
        "POST",
        &format!("/v2/templates/survivor/builds/{build}"),
        Some(&key),
        &[],
        Some(json!({
            "fromImage": format!("{}/tools/bb:1", registry.host()),
            "steps": [{"type": "RUN", "args": ["echo made > /tmp/made"]}],
        })),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(&server);
        match s["status"].as_str() {
            Some("ready") => break,
            Some("waiting" | "building") => {}
            _ => panic!("the build did not succeed: {s}"),
        }
        assert!(Instant::now() < deadline, "the build did not end: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Taken once: a second start of the same build is not found.
    let r = e2b(
        &server,
        "POST",
        &format!("/v2/templates/survivor/builds/{build}"),
        Some(&key),
        &[],
        Some(json!({"fromImage": "x", "steps": []})),
    );
    assert_e2b_error(&r, 404);
}

/// An E2B upload link serves a name with dots, as the SDK's hashes may be, and dies with the
/// key it was made for.
#[test]
fn an_upload_link_dies_with_its_key() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    let r = server.request(
        "POST",
        "/v1/keys",
        Some(&admin),
        Some(&support::server::body(json!({"name": "u", "role": "user"}))),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let (id, key) = (
        r.json()["id"].as_str().expect("id").to_owned(),
        r.json()["secret"].as_str().expect("secret").to_owned(),
    );
    let link = e2b(
        &server,
        "GET",
        "/templates/t/files/a.b.c",
        Some(&key),
        &[],
        None,
    );
    assert_eq!(link.status, 201, "{}", link.text());
    let url = link.json()["url"].as_str().expect("url").to_owned();
    let path = &url[url.find("/e2b-uploads/").expect("upload path")..];
    let archive = support::registry::LayerBuilder::new()
        .file("x", 0o644, b"x")
        .build();
    let put = server.request("PUT", path, None, Some(&archive));
    assert_eq!(put.status, 200, "{}", put.text());
    let r = server.request("DELETE", &format!("/v1/keys/{id}"), Some(&admin), None);
    assert!(r.status / 100 == 2, "{}", r.text());
    let put = server.request("PUT", path, None, Some(&archive));
    assert_eq!(put.status, 403, "{}", put.text());
}
