//! Observability and protection of a real `moat serve`: `/metrics` (admin only, strict
//! Prometheus text format), the per-key rate limit, the data-dir lock and the TTL flags.
//! The tests that run sandboxes need root (the native backend); they skip with a printed
//! reason otherwise.

use moat_test_support as support;
use support::need_root;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::server::*;

use moat_engine::store::{Quotas, Role, Store};
use serde_json::json;

/// One sample line: `name{labels} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format 0.0.4 strictly: every line is `# HELP name text`,
/// `# TYPE name kind` or a sample; every sample's family was given HELP and TYPE before it;
/// histogram samples are `_bucket` (with `le`), `_sum` or `_count`. Panics on anything else.
fn parse_exposition(text: &str) -> Vec<Sample> {
    assert!(text.ends_with('\n'), "the text must end with a newline");
    let mut help = BTreeSet::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').expect("HELP needs a text");
            assert!(valid_name(name), "bad name in {line:?}");
            assert!(!doc.trim().is_empty(), "empty HELP: {line:?}");
            assert!(help.insert(name.to_owned()), "second HELP for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE needs a kind");
            assert!(valid_name(name), "bad name in {line:?}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "unknown type in {line:?}"
            );
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "second TYPE for {name}"
            );
        } else {
            assert!(!line.starts_with('#'), "stray comment {line:?}");
            let sample = parse_sample(line);
            let family = family_of(&sample.name, &types);
            assert!(help.contains(&family), "no HELP before {line:?}");
            if types.get(&family).map(String::as_str) == Some("histogram") {
                let suffix = &sample.name[family.len()..];
                assert!(
                    ["_bucket", "_sum", "_count"].contains(&suffix),
                    "histogram sample {line:?}"
                );
                assert_eq!(
                    suffix == "_bucket",
                    sample.labels.contains_key("le"),
                    "`le` belongs on buckets only: {line:?}"
                );
            }
            samples.push(sample);
        }
    }
    samples
}

/// The family a sample belongs to: itself, or a histogram it is a part of. Panics when no
/// TYPE came before it.
fn family_of(name: &str, types: &BTreeMap<String, String>) -> String {
    if types.contains_key(name) {
        return name.to_owned();
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).map(String::as_str) == Some("histogram")
        {
            return base.to_owned();
        }
    }
    panic!("sample {name} has no TYPE before it");
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value in {line:?}"));
    let name = &line[..name_end];
    assert!(valid_name(name), "bad name in {line:?}");
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let close = loop {
            let (start, c) = chars.next().unwrap_or_else(|| panic!("unclosed {line:?}"));
            if c == '}' {
                break start;
            }
            // label name up to '='
            let mut label = String::from(c);
            loop {
                let (_, c) = chars.next().unwrap_or_else(|| panic!("bad label {line:?}"));
                if c == '=' {
                    break;
                }
                label.push(c);
            }
            assert!(
                valid_name(&label) && !label.contains(':'),
                "bad label name in {line:?}"
            );
            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line:?}");
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => panic!("bad escape {other:?} in {line:?}"),
                    },
                    Some(c) => value.push(c),
                    None => panic!("unterminated label value in {line:?}"),
                }
            }
            assert!(
                labels.insert(label, value).is_none(),
                "repeated label {line:?}"
            );
            match chars.peek().map(|(_, c)| *c) {
                Some(',') => {
                    chars.next();
                }
                Some('}') => {}
                other => panic!("expected ',' or '}}', got {other:?} in {line:?}"),
            }
        };
        rest = &inner[close + 1..];
    }
    let value = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("no space before the value in {line:?}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value {v:?} in {line:?}")),
    };
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

/// The value of the sample `name` with exactly these labels.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

/// Checks a histogram's buckets rise with `le` and end in `+Inf` equal to `_count`; returns
/// the count.
fn histogram_count(samples: &[Sample], name: &str) -> f64 {
    let bucket = format!("{name}_bucket");
    let buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == bucket)
        .map(|s| {
            let le = &s.labels["le"];
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le")
            };
            (le, s.value)
        })
        .collect();
    assert!(buckets.len() > 1, "{name} has no buckets");
    for pair in buckets.windows(2) {
        assert!(pair[0].0 < pair[1].0, "{name}: le not rising");
        assert!(pair[0].1 <= pair[1].1, "{name}: buckets not cumulative");
    }
    let (last_le, last) = buckets[buckets.len() - 1];
    assert!(last_le.is_infinite(), "{name}: no +Inf bucket");
    let count = value(samples, &format!("{name}_count"), &[]).expect("_count");
    assert_eq!(last, count, "{name}: +Inf bucket and _count differ");
    assert!(value(samples, &format!("{name}_sum"), &[]).is_some());
    count
}

#[test]
fn metrics_show_states_latencies_and_errors() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    let admin = Some(admin.as_str());

    let r = server.request("POST", "/v1/sandboxes", admin, Some(b"{}"));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        admin,
        Some(&body(json!({"cmd": ["true"]}))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    server
        .request("GET", "/v1/sandboxes/nosuchsandbox0000", admin, None)
        .assert_error(404, "not_found");

    // Only admin keys read the metrics.
    server
        .request("GET", "/metrics", None, None)
        .assert_error(401, "unauthenticated");
    let store = Store::open(server.data.join("moat.db")).expect("store");
    let (_, user) = store
        .create_key("default", "user", Role::User, Quotas::default())
        .expect("key");
    server
        .request("GET", "/metrics", Some(user.expose()), None)
        .assert_error(403, "forbidden");

    let r = server.request("GET", "/metrics", admin, None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(r.body.clone()).expect("UTF-8");
    let samples = parse_exposition(&text);

    for state in ["starting", "running", "paused", "killed", "failed"] {
        assert!(
            value(&samples, "moat_sandboxes", &[("state", state)]).is_some(),
            "no moat_sandboxes{{state={state:?}}} in\n{text}"
        );
    }
    assert!(value(&samples, "moat_sandboxes", &[("state", "running")]) >= Some(1.0));
    assert!(histogram_count(&samples, "moat_create_seconds") >= 1.0);
    assert!(histogram_count(&samples, "moat_exec_seconds") >= 1.0);
    histogram_count(&samples, "moat_claim_seconds");
    for (code, least) in [
        ("not_found", 1.0),
        ("unauthenticated", 1.0),
        ("forbidden", 1.0),
    ] {
        assert!(
            value(&samples, "moat_errors_total", &[("code", code)]) >= Some(least),
            "moat_errors_total{{code={code:?}}} in\n{text}"
        );
    }
    for status in ["200", "201", "401", "403", "404"] {
        assert!(
            value(&samples, "moat_http_requests_total", &[("status", status)]) >= Some(1.0),
            "moat_http_requests_total{{status={status:?}}} in\n{text}"
        );
    }
    assert!(
        samples
            .iter()
            .any(|s| s.name == "moat_build_info" && s.value == 1.0)
    );
    // No pools exist, but their families are declared.
    assert!(text.contains("# TYPE moat_pool_ready gauge\n"));
    assert!(text.contains("# TYPE moat_pool_target gauge\n"));

    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), admin, None);
    assert_eq!(r.status, 204);
    let r = server.request("GET", "/metrics", admin, None);
    let samples = parse_exposition(&r.text());
    assert!(value(&samples, "moat_sandboxes", &[("state", "killed")]) >= Some(1.0));
}

#[test]
fn a_key_over_its_rate_gets_429_and_others_are_unaffected() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    let store = Store::open(server.data.join("moat.db")).expect("store");
    // One request a minute: a burst of one, then a minute's wait.
    let quotas = Quotas {
        requests_per_minute: Some(1),
        ..Quotas::default()
    };
    let (slow, secret) = store
        .create_key("default", "slow", Role::User, quotas)
        .expect("key");
    let r = server.request("GET", "/v1/sandboxes", Some(secret.expose()), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let limited = server.request("GET", "/v1/sandboxes", Some(secret.expose()), None);
    limited.assert_error(429, "rate_limited");
    let message = limited.json()["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    assert!(
        message.contains(&slow.id) && message.contains("1 requests per minute"),
        "{message}"
    );
    let retry: u64 = limited
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("whole seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");

    // Another key of the same tenant goes on as before.
    for _ in 0..20 {
        let r = server.request("GET", "/v1/sandboxes", Some(&admin), None);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = server.request("GET", "/metrics", Some(&admin), None);
    let samples = parse_exposition(&r.text());
    assert!(value(&samples, "moat_errors_total", &[("code", "rate_limited")]) >= Some(1.0));
    assert!(value(&samples, "moat_http_requests_total", &[("status", "429")]) >= Some(1.0));
}

#[test]
fn the_rate_limit_flag_sets_the_default_of_keys_without_a_quota() {
    need_root!();
    let server = Server::start_with(&["--rate-limit", "1"]);
    let admin = server.admin_key();
    let r = server.request("GET", "/v1/sandboxes", Some(&admin), None);
    assert_eq!(r.status, 200);
    let r = server.request("GET", "/v1/sandboxes", Some(&admin), None);
    r.assert_error(429, "rate_limited");
    assert!(r.header("retry-after").is_some(), "{}", r.headers);
    // The health endpoints take no key and are not limited.
    assert_eq!(server.request("GET", "/healthz", None, None).status, 200);
}

#[test]
fn a_second_server_on_the_same_data_dir_fails_fast() {
    need_root!();
    let server = Server::start();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let second = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(&server.data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = wait_output(second);
    assert!(!out.status.success(), "the second server ran: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another moat serve")
            && stderr.contains(&format!("pid {}", server.child.id())),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no new admin key may be printed");
    // The first one serves on, its lock file naming it.
    assert_eq!(server.request("GET", "/readyz", None, None).status, 200);
    let pid = std::fs::read_to_string(server.data.join("moat.lock")).expect("lock file");
    assert_eq!(pid.trim(), server.child.id().to_string());
}

#[test]
fn the_lock_is_released_when_the_server_dies() {
    need_root!();
    let server = Server::start();
    let (dir, data) = server.kill9();
    let again = Server::start_in(dir, data);
    let pid = std::fs::read_to_string(again.data.join("moat.lock")).expect("lock file");
    assert_eq!(pid.trim(), again.child.id().to_string());
}

#[test]
fn ttl_flags_are_validated() {
    let dir = tempfile::Builder::new()
        .prefix("moat-ttl-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data = dir.path().join("data");
    for (flags, needle) in [
        (
            ["--default-ttl", "600", "--max-ttl", "60"],
            "--default-ttl 600 is longer than --max-ttl 60",
        ),
        (
            ["--default-ttl", "0", "--max-ttl", "60"],
            "at least 1 second",
        ),
        (
            ["--default-ttl", "10", "--max-ttl", "0"],
            "at least 1 second",
        ),
    ] {
        let child = Command::new(env!("CARGO_BIN_EXE_moat"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let out = wait_output(child);
        assert!(!out.status.success(), "{flags:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{flags:?}: {stderr}");
        // Refused before anything was made.
        assert!(!data.exists(), "{flags:?} created the data dir");
    }
}

#[test]
fn ttl_flags_reach_the_sandboxes() {
    need_root!();
    let server = Server::start_with(&["--default-ttl", "7", "--max-ttl", "60"]);
    let admin = server.admin_key();
    let admin = Some(admin.as_str());
    server
        .request(
            "POST",
            "/v1/sandboxes",
            admin,
            Some(&body(json!({"timeout_secs": 61}))),
        )
        .assert_error(400, "invalid");
    let r = server.request("POST", "/v1/sandboxes", admin, Some(b"{}"));
    assert_eq!(r.status, 201, "{}", r.text());
    let sandbox = r.json();
    let ttl_ms = sandbox["expires_at"].as_i64().expect("expires_at")
        - sandbox["created_at"].as_i64().expect("created_at");
    // The expiry is set from the 7 s default just before the record is written.
    assert!(0 < ttl_ms && ttl_ms <= 7_000, "time to live {ttl_ms} ms");
    let id = sandbox["id"].as_str().expect("id");
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/timeout"),
        admin,
        Some(&body(json!({"timeout_secs": 60}))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), admin, None);
    assert_eq!(r.status, 204);
}

/// Waits for a child that should exit by itself (a generous deadline, not a speed check),
/// killing it if it does not.
fn wait_output(mut child: std::process::Child) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("moat serve did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}
