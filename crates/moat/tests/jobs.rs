//! Asynchronous jobs (`/v1/jobs`, `/v1/blobs`) of a real `moat serve`: inputs in, outputs
//! and logs kept, idempotency, cancel, timeout, retries, a `kill -9` of the server in the
//! middle of a batch, fairness between tenants, and bad requests. Needs root (the native
//! backend); skips with a printed reason otherwise.

use moat_test_support as support;
use support::need_root;

use std::time::{Duration, Instant};

use moat_engine::store::{Quotas, Role, Store};
use serde_json::{Value, json};
use support::server::*;

fn post(server: &Server, key: &str, path: &str, body: Value) -> Reply {
    server.request(
        "POST",
        path,
        Some(key),
        Some(&serde_json::to_vec(&body).expect("json")),
    )
}

/// Submits `body`, which must be accepted (202); the job's id.
fn submit(server: &Server, key: &str, body: Value) -> String {
    let r = post(server, key, "/v1/jobs", body);
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_str().expect("id").to_owned()
}

fn job(server: &Server, key: &str, id: &str) -> Value {
    let r = server.request("GET", &format!("/v1/jobs/{id}"), Some(key), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Waits (at most `secs`) until job `id` is over; the job.
fn wait(server: &Server, key: &str, id: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let j = job(server, key, id);
        if !matches!(j["state"].as_str(), Some("queued" | "running")) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} never ended: {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A user key of `tenant`, made in the store beside the running server.
fn user_key(server: &Server, tenant: &str) -> String {
    let store = Store::open(server.data.join("moat.db")).expect("store");
    let _ = store.create_tenant(tenant, tenant);
    let (_, secret) = store
        .create_key(tenant, "jobs", Role::User, Quotas::default())
        .expect("key");
    secret.expose().to_owned()
}

/// The documented example: code with an inline input and an uploaded one, outputs kept by
/// name and by glob, logs whole and in tails; a later job takes an earlier one's output.
#[test]
fn a_job_runs_with_its_inputs_and_keeps_its_outputs_and_logs() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let r = server.request("POST", "/v1/blobs", Some(&key), Some(b"1\n2\n3\n"));
    assert_eq!(r.status, 201, "{}", r.text());
    let blob = r.json()["digest"].as_str().expect("digest").to_owned();
    assert!(blob.starts_with("sha256:"), "{blob}");

    let id = submit(
        &server,
        &key,
        json!({
            "code": "import os, sys\nn = sum(int(x) for x in open('numbers.txt'))\nos.makedirs('out/deep', exist_ok=True)\nopen('out/sum.txt', 'w').write(str(n * int(open('/tmp/factor').read())))\nopen('out/deep/a.csv', 'w').write('a')\nprint('x' * 10000)\nprint('the end')\nprint('warned', file=sys.stderr)",
            "inputs": [
                {"path": "numbers.txt", "blob": blob},
                {"path": "/tmp/factor", "content": "7"},
            ],
            "outputs": ["out/sum.txt", "out/**/*.csv", "nothing-*.txt"],
        }),
    );
    let j = wait(&server, &key, &id, 60);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["exit_code"], 0, "{j}");
    assert_eq!(j["attempts"], 1, "{j}");
    let paths: Vec<&str> = j["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .map(|o| o["path"].as_str().expect("path"))
        .collect();
    assert_eq!(
        paths,
        ["/home/user/out/sum.txt", "/home/user/out/deep/a.csv"],
        "{j}"
    );
    assert_eq!(
        j["output_errors"],
        json!(["nothing-*.txt: matched no file"]),
        "{j}"
    );
    // A tail of 4 KiB, the whole log apart.
    let tail = j["stdout_tail"].as_str().expect("tail");
    assert!(
        tail.ends_with("the end\n") && tail.len() == 4096,
        "{}",
        tail.len()
    );
    assert_eq!(j["stderr_tail"], "warned\n");
    let r = server.request(
        "GET",
        &format!("/v1/jobs/{id}/logs/stdout"),
        Some(&key),
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 10001 + 8);
    let r = server.request(
        "GET",
        &format!("/v1/jobs/{id}/output?path=/home/user/out/sum.txt"),
        Some(&key),
        None,
    );
    assert_eq!((r.status, r.text()), (200, "42".to_owned()));

    // An output of that job is an input of the next.
    let next = submit(
        &server,
        &key,
        json!({
            "shell": "cat sum.txt; echo; cat sum.txt > doubled; cat sum.txt >> doubled",
            "inputs": [{"path": "sum.txt", "job_output": {"job": id, "path": "/home/user/out/sum.txt"}}],
            "outputs": ["doubled"],
        }),
    );
    let j = wait(&server, &key, &next, 60);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["stdout_tail"], "42\n");
    let r = server.request(
        "GET",
        &format!("/v1/jobs/{next}/output?path=/home/user/doubled"),
        Some(&key),
        None,
    );
    assert_eq!(r.text(), "4242");

    // Another tenant sees none of it.
    let other = user_key(&server, "other");
    let r = server.request("GET", &format!("/v1/jobs/{id}"), Some(&other), None);
    assert_eq!(r.status, 404, "{}", r.text());
    let r = post(
        &server,
        &other,
        "/v1/jobs",
        json!({"shell": "true", "inputs": [{"path": "x", "blob": blob}]}),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    // Deleted with its blobs: the first job's output is still the second's input, so only
    // the second's own go.
    let r = server.request("DELETE", &format!("/v1/jobs/{next}"), Some(&key), None);
    assert_eq!(r.status, 204, "{}", r.text());
    let r = server.request("GET", &format!("/v1/jobs/{next}"), Some(&key), None);
    assert_eq!(r.status, 404);
    let r = server.request(
        "GET",
        &format!("/v1/jobs/{id}/output?path=/home/user/out/sum.txt"),
        Some(&key),
        None,
    );
    assert_eq!(r.text(), "42");
}

/// The same idempotency key returns the same job (200); another request with it is a
/// conflict.
#[test]
fn an_idempotency_key_makes_one_job() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let body = json!({"shell": "echo once", "idempotency_key": "k-1"});
    let first = submit(&server, &key, body.clone());
    let r = post(&server, &key, "/v1/jobs", body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], first.as_str());
    let r = server
        .send(
            "POST",
            "/v1/jobs",
            Some(&key),
            &[
                ("Content-Type", "application/json"),
                ("Idempotency-Key", "k-1"),
            ],
            Some(br#"{"shell": "echo another"}"#),
        )
        .expect("send");
    assert_eq!(r.status, 409, "{}", r.text());
    wait(&server, &key, &first, 60);
    let r = server.request("GET", "/v1/jobs", Some(&key), None);
    assert_eq!(r.json()["jobs"].as_array().expect("jobs").len(), 1);
}

/// Cancel (queued or running: its sandbox goes), a timeout, and retries.
#[test]
fn cancel_timeout_and_retries() {
    need_root!();
    let server = Server::start_with(&["--job-workers", "1"]);
    let key = server.admin_key();
    let long = submit(&server, &key, json!({"shell": "sleep 60"}));
    let queued = submit(&server, &key, json!({"shell": "echo never"}));
    let deadline = Instant::now() + Duration::from_secs(30);
    while job(&server, &key, &long)["state"] != "running" {
        assert!(Instant::now() < deadline, "never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    for id in [&queued, &long] {
        let r = server.request("POST", &format!("/v1/jobs/{id}/cancel"), Some(&key), None);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["state"], "cancelled");
    }
    let r = server.request("POST", &format!("/v1/jobs/{long}/cancel"), Some(&key), None);
    assert_eq!(r.status, 409, "{}", r.text());
    // Its sandbox is destroyed, and the one queued never ran.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = server.request("GET", "/v1/sandboxes?state=running", Some(&key), None);
        if r.json()["sandboxes"].as_array().expect("list").is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cancelled job's sandbox stayed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(job(&server, &key, &queued)["attempts"], 0);

    let slow = submit(
        &server,
        &key,
        json!({"shell": "sleep 30", "timeout_secs": 1, "retries": 2}),
    );
    let j = wait(&server, &key, &slow, 60);
    assert_eq!(j["state"], "timed_out", "{j}");
    assert_eq!(j["attempts"], 1, "a timeout is not retried: {j}");

    let flaky = submit(
        &server,
        &key,
        json!({"shell": "echo try; exit 3", "retries": 2}),
    );
    let j = wait(&server, &key, &flaky, 60);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["exit_code"], 3, "{j}");
    assert_eq!(j["attempts"], 3, "{j}");
    assert_eq!(j["stdout_tail"], "try\n", "{j}");
}

/// `kill -9` of the server in the middle of a batch: after a restart every job ends, each
/// with its own output, none lost.
#[test]
fn a_batch_survives_a_kill_9_of_the_server() {
    need_root!();
    let server = Server::start_with(&["--job-workers", "2"]);
    let key = server.admin_key();
    let ids: Vec<String> = (0..12)
        .map(|i| {
            submit(
                &server,
                &key,
                json!({"shell": format!("sleep 0.3; echo {i} > n"), "outputs": ["n"]}),
            )
        })
        .collect();
    // Some done, some running, some queued.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = ids
            .iter()
            .filter(|id| job(&server, &key, id)["state"] == "succeeded")
            .count();
        if done >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no job finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (dir, data) = server.kill9();
    let server = Server::start_in_with(dir, data, &["--job-workers", "2"]);
    for (i, id) in ids.iter().enumerate() {
        let j = wait(&server, &key, id, 120);
        assert_eq!(j["state"], "succeeded", "{j}");
        let r = server.request(
            "GET",
            &format!("/v1/jobs/{id}/output?path=/home/user/n"),
            Some(&key),
            None,
        );
        assert_eq!(r.text(), format!("{i}\n"), "{j}");
    }
    let r = server.request("GET", "/v1/jobs?limit=100", Some(&key), None);
    assert_eq!(r.json()["jobs"].as_array().expect("jobs").len(), ids.len());
}

/// One tenant's long queue does not hold another's job back: it runs on the next free
/// worker.
#[test]
fn jobs_are_fair_between_tenants() {
    need_root!();
    let server = Server::start_with(&["--job-workers", "1"]);
    let (a, b) = (user_key(&server, "alpha"), user_key(&server, "beta"));
    let many: Vec<String> = (0..15)
        .map(|_| submit(&server, &a, json!({"shell": "sleep 0.2"})))
        .collect();
    let one = submit(&server, &b, json!({"shell": "true"}));
    let j = wait(&server, &b, &one, 120);
    assert_eq!(j["state"], "succeeded", "{j}");
    let done_first = many
        .iter()
        .filter(|id| job(&server, &a, id)["state"] == "succeeded")
        .count();
    assert!(
        done_first <= 3,
        "beta's one job waited for {done_first} of alpha's 15"
    );
}

/// Bad requests get a clear 4xx naming what is wrong.
#[test]
fn bad_job_requests_are_refused_clearly() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"shell": "true", "template": "nope"}), 404, "nope"),
        (json!({"code": "1", "language": "cobol"}), 400, "cobol"),
        (json!({"shell": "true", "code": "1"}), 400, "exactly one"),
        (json!({"shell": "true", "outputs": ["../x"]}), 400, "../x"),
        (json!({"shell": "true", "outputs": ["a**b/c"]}), 400, "**"),
        (
            json!({"shell": "true", "inputs": [{"path": "x", "blob": "sha256:00"}]}),
            400,
            "not a digest",
        ),
        (
            json!({"shell": "true", "inputs": [{"path": "x", "blob": format!("sha256:{}", "0".repeat(64))}]}),
            400,
            "no blob",
        ),
        (
            json!({"shell": "true", "inputs": [{"path": "x", "content": "a", "content_b64": "YQ=="}]}),
            400,
            "exactly one",
        ),
        (
            json!({"shell": "true", "timeout_secs": 0}),
            400,
            "timeout_secs",
        ),
        (
            json!({"shell": "true", "timeout_secs": 86_400}),
            400,
            "--max-ttl of 86400 s",
        ),
        (json!({"shell": "true", "env": {"A=B": "x"}}), 400, "A=B"),
        (
            json!({"shell": "true", "resources": {"memory": "lots"}}),
            400,
            "lots",
        ),
        (json!({"shell": "true", "cwd": "a\u{0}b"}), 400, "cwd"),
        (json!({"shell": "true", "retries": 11}), 400, "retries"),
        (
            json!({"shell": "true", "inputs": [{"path": "x", "job_output": {"job": "job-nope", "path": "/a"}}]}),
            400,
            "job-nope",
        ),
        (json!({"shell": "true", "surprise": 1}), 400, "surprise"),
    ];
    for (body, status, says) in cases {
        let r = post(&server, &key, "/v1/jobs", body.clone());
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.text().contains(says), "{body}: {}", r.text());
    }
    // A timeout longer than an HTTP call's (an hour) is a job's to have.
    let id = submit(
        &server,
        &key,
        json!({"shell": "echo long", "timeout_secs": 7_200}),
    );
    let j = wait(&server, &key, &id, 60);
    assert_eq!(j["state"], "succeeded", "{j}");
    // A body over the limit (inline inputs go up as blobs first).
    let big = json!({"shell": "true", "inputs": [{"path": "x", "content": "a".repeat(17 << 20)}]});
    let r = post(&server, &key, "/v1/jobs", big);
    assert_eq!(r.status, 413, "{}", r.text());
    // Code that would take its record over 1 MiB: inputs are for large code.
    let r = post(
        &server,
        &key,
        "/v1/jobs",
        json!({"code": format!("# {}\nprint(1)", "a".repeat(1 << 20))}),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("as an input file"), "{}", r.text());
    let r = server.request("GET", "/v1/jobs?state=sleeping", Some(&key), None);
    assert_eq!(r.status, 400, "{}", r.text());
    let r = server.request("GET", "/v1/jobs/job-nope/logs/stdin", Some(&key), None);
    assert_eq!(r.status, 404, "{}", r.text());
    let r = server.request("GET", "/v1/jobs", None, None);
    assert_eq!(r.status, 401, "{}", r.text());
}

/// `moat job`: submit with a local input and --wait (its output on ours, its outputs
/// downloaded, its exit code ours), then ls, get, logs, outputs, cancel and rm.
#[test]
fn the_job_command_line_submits_waits_and_downloads() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let work = tempfile::tempdir().expect("tempdir");
    let input = work.path().join("words.txt");
    std::fs::write(&input, "b\na\nc\n").expect("input");
    let out_dir = work.path().join("out");
    let input_arg = input.to_str().expect("path");
    let out_arg = out_dir.to_str().expect("path");
    let printed = server.cli(
        &key,
        &[
            "job",
            "submit",
            "--input",
            input_arg,
            "--keep",
            "sorted.txt",
            "--wait",
            "--out-dir",
            out_arg,
            "--shell",
            "sort words.txt > sorted.txt; echo sorted",
        ],
    );
    // Standard output is the job's alone: the files written are named on standard error.
    assert_eq!(printed, "sorted\n");
    let kept = out_dir.join("home/user/sorted.txt");
    assert_eq!(
        std::fs::read_to_string(&kept).expect("downloaded"),
        "a\nb\nc\n"
    );

    // A failing job's exit code is the command's.
    let out = std::process::Command::new(support::moat_binary())
        .args([
            "job",
            "submit",
            "--wait",
            "--shell",
            "echo oops >&2; exit 7",
        ])
        .env("MOAT_URL", format!("http://127.0.0.1:{}", server.port))
        .env("MOAT_API_KEY", &key)
        .output()
        .expect("moat job submit");
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("oops"),
        "{out:?}"
    );

    let id = server.cli(&key, &["job", "submit", "--code", "print(6 * 7)"]);
    let id = id.trim();
    assert!(id.starts_with("job-"), "{id}");
    wait(&server, &key, id, 60);
    assert_eq!(server.cli(&key, &["job", "logs", id]), "42\n");
    let listed = server.cli(&key, &["job", "ls", "--state", "succeeded"]);
    assert!(listed.contains(id), "{listed}");
    let shown = server.cli(&key, &["job", "get", id]);
    assert!(shown.contains("succeeded"), "{shown}");
    let long = server.cli(&key, &["job", "submit", "--", "sleep", "60"]);
    let long = long.trim();
    assert_eq!(server.cli(&key, &["job", "cancel", long]).trim(), long);
    assert_eq!(
        server.cli(&key, &["job", "rm", id, long]),
        format!("{id}\n{long}\n")
    );
    let r = server.request("GET", &format!("/v1/jobs/{id}"), Some(&key), None);
    assert_eq!(r.status, 404);
}

/// 1,000 jobs submitted at once by 8 clients all finish, each with its own output.
#[test]
fn a_thousand_jobs_from_eight_clients_all_finish_with_their_outputs() {
    need_root!();
    let server = Server::start_with(&["--rate-limit", "1000000"]);
    let key = server.admin_key();
    let ids: Vec<(usize, String)> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..8)
            .map(|c| {
                let (server, key) = (&server, &key);
                s.spawn(move || {
                    (0..125)
                        .map(|i| {
                            let n = c * 125 + i;
                            let body = json!({"shell": format!("echo {n} > n"), "outputs": ["n"]});
                            (n, submit(server, key, body))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("client"))
            .collect()
    });
    assert_eq!(ids.len(), 1000);
    for (n, id) in &ids {
        let j = wait(&server, &key, id, 600);
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["attempts"], 1, "{j}");
        let r = server.request(
            "GET",
            &format!("/v1/jobs/{id}/output?path=/home/user/n"),
            Some(&key),
            None,
        );
        assert_eq!(r.text(), format!("{n}\n"), "{j}");
    }
}

/// The requests a [`Receiver`] got: each one's head and body.
type Requests = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A receiver of webhooks on loopback: answers each request with the next status of
/// `answers` (then 200), and keeps what it got.
struct Receiver {
    port: u16,
    got: Requests,
}

impl Receiver {
    fn start(answers: Vec<u16>) -> Receiver {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let got: Requests = Default::default();
        let kept = got.clone();
        std::thread::spawn(move || {
            let mut answers = answers.into_iter();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                kept.lock().expect("lock").push((head, body));
                let status = answers.next().unwrap_or(200);
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        Receiver { port, got }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A job's webhook is POSTed when it ends, signed with the job's secret, and retried until
/// it is answered 2xx; a server that keeps webhooks to public addresses refuses a loopback
/// URL, and a malformed one is refused.
#[test]
fn a_job_webhook_is_signed_and_retried_until_answered() {
    use hmac::{Hmac, Mac};
    need_root!();
    let receiver = Receiver::start(vec![500]);
    let server = Server::start_with(&["--job-webhooks-to-private"]);
    let key = server.admin_key();
    let url = format!("http://127.0.0.1:{}/hook", receiver.port);
    let r = post(
        &server,
        &key,
        "/v1/jobs",
        json!({"shell": "echo hooked", "webhook_url": url}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let secret = r.json()["webhook"]["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    wait(&server, &key, &id, 60);
    // A 500 first, then (after a backoff of 2 s) a 200.
    let deadline = Instant::now() + Duration::from_secs(60);
    let j = loop {
        let j = job(&server, &key, &id);
        if j["webhook"]["delivered_at"].is_number() {
            break j;
        }
        assert!(Instant::now() < deadline, "never delivered: {j}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(j["webhook"]["attempts"], 2, "{j}");
    let got = receiver.got.lock().expect("lock").clone();
    assert_eq!(got.len(), 2, "{got:?}");
    for (head, body) in &got {
        assert!(head.starts_with("POST /hook "), "{head}");
        assert_eq!(header(head, "moat-delivery"), Some(id.as_str()), "{head}");
        let sig = header(head, "moat-signature").expect("signature");
        let (t, v1) = sig
            .strip_prefix("t=")
            .and_then(|s| s.split_once(",v1="))
            .expect("t=…,v1=…");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("hmac");
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(v1, want, "bad signature");
        let sent: Value = serde_json::from_slice(body).expect("json body");
        assert_eq!(sent["id"], id.as_str());
        assert_eq!(sent["state"], "succeeded");
        assert_eq!(sent["stdout_tail"], "hooked\n");
        assert!(sent.get("webhook").is_none(), "the secret went out: {sent}");
    }

    // By default, webhooks go to public addresses only.
    let strict = Server::start();
    let key = strict.admin_key();
    for (url, says) in [
        (
            format!("http://127.0.0.1:{}/", receiver.port),
            "public addresses only",
        ),
        (
            "http://169.254.169.254/latest".to_owned(),
            "public addresses only",
        ),
        ("http://localhost:1/".to_owned(), "public addresses only"),
        ("ftp://example.com/".to_owned(), "only http"),
        ("http://user:pw@example.com/".to_owned(), "credentials"),
        ("not a url".to_owned(), "webhook_url"),
    ] {
        let r = post(
            &strict,
            &key,
            "/v1/jobs",
            json!({"shell": "true", "webhook_url": url}),
        );
        assert_eq!(r.status, 400, "{url}: {}", r.text());
        assert!(r.text().contains(says), "{url}: {}", r.text());
    }
}

/// An attempt whose sandbox fails under it (here: destroyed from outside) is retried, and
/// the job goes on to succeed in a fresh sandbox.
#[test]
fn an_attempt_whose_sandbox_fails_is_retried() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let id = submit(
        &server,
        &key,
        json!({"shell": "sleep 1; echo survived", "retries": 1}),
    );
    // The first attempt's sandbox, found by the label jobs put on theirs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let sandbox = loop {
        let r = server.request(
            "GET",
            &format!("/v1/sandboxes?metadata=moat.job%3D{id}"),
            Some(&key),
            None,
        );
        if let Some(s) = r.json()["sandboxes"]
            .as_array()
            .and_then(|a| a.first().cloned())
        {
            break s["id"].as_str().expect("id").to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the job's sandbox never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let r = server.request(
        "DELETE",
        &format!("/v1/sandboxes/{sandbox}"),
        Some(&key),
        None,
    );
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
    let j = wait(&server, &key, &id, 60);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["attempts"], 2, "{j}");
    assert_eq!(j["stdout_tail"], "survived\n", "{j}");
}

/// What a server stopped mid-way leaves in the blob store goes at the next start: the pieces
/// of an unfinished upload (which the store's listings do not show) at once, an object no
/// record names (its record deleted, the object not yet) at the first housekeeping. Blobs
/// that are recorded stay.
#[test]
fn blobs_a_crash_left_go_and_recorded_ones_stay() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let key = server.admin_key();
    let r = server.request("POST", "/v1/blobs", Some(&key), Some(b"kept\n"));
    assert_eq!(r.status, 201, "{}", r.text());
    let kept = r.json()["digest"].as_str().expect("digest").to_owned();
    let (dir, data) = server.stop();

    let blobs = data.join("blobs");
    let object = |digest: &str| blobs.join("sha256").join(&digest["sha256:".len()..]);
    assert!(object(&kept).exists(), "the upload is not where expected");
    let piece = blobs.join("tmp/upload#1");
    std::fs::create_dir_all(blobs.join("tmp")).expect("mkdir");
    std::fs::write(&piece, b"half an upload").expect("write");
    let orphan = format!("sha256:{}", "ab".repeat(32));
    std::fs::write(object(&orphan), b"no record names me").expect("write");

    let _server = Server::start_in_with(dir, data.clone(), &["--retention", "1s"]);
    assert!(
        !piece.exists(),
        "an unfinished upload's piece outlived the start"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while object(&orphan).exists() {
        assert!(
            Instant::now() < deadline,
            "an object no record names outlived housekeeping"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(object(&kept).exists(), "a recorded blob was removed");
}

/// Finished jobs count against `--max-kept-jobs` until they are deleted: a tenant cannot
/// pile up records by letting its jobs end. Another tenant has its own count.
#[test]
fn finished_jobs_count_until_deleted() {
    need_root!();
    let server = Server::start_with(&["--max-kept-jobs", "2"]);
    let key = server.admin_key();
    let first = submit(&server, &key, json!({"shell": "echo one"}));
    let second = submit(&server, &key, json!({"shell": "echo two"}));
    for id in [&first, &second] {
        assert_eq!(wait(&server, &key, id, 60)["state"], "succeeded");
    }
    let r = post(&server, &key, "/v1/jobs", json!({"shell": "echo three"}));
    r.assert_error(429, "quota_exceeded");
    assert!(r.text().contains("jobs kept"), "{}", r.text());
    let other = user_key(&server, "keeper");
    submit(&server, &other, json!({"shell": "true"}));
    let r = server.request("DELETE", &format!("/v1/jobs/{first}"), Some(&key), None);
    assert_eq!(r.status / 100, 2, "{}", r.text());
    submit(&server, &key, json!({"shell": "echo three"}));
}

/// An upload is refused once it passes what the tenant's `--job-quota` has left, while it
/// arrives: the server does not take the whole body onto its disk before it says no.
#[test]
fn an_upload_past_the_quota_is_refused_before_it_is_all_written() {
    use std::io::{Read, Write};
    need_root!();
    let server = Server::start_with(&["--job-quota", "1M"]);
    let key = server.admin_key();
    const BODY: usize = 256 << 20;
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    write!(
        conn,
        "POST /v1/blobs HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {BODY}\r\n\r\n"
    )
    .expect("head");
    conn.set_read_timeout(Some(Duration::from_millis(1)))
        .expect("timeout");
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0;
    let mut answer = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while sent < BODY && Instant::now() < deadline {
        let mut buf = [0u8; 4096];
        if let Ok(n) = conn.read(&mut buf)
            && n > 0
        {
            answer.extend_from_slice(&buf[..n]);
            break;
        }
        if conn.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut rest = [0u8; 4096];
    if let Ok(n) = conn.read(&mut rest) {
        answer.extend_from_slice(&rest[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("quota"), "{answer}");
    // A few MiB of socket buffers at most past the 1 MiB quota, not the whole body.
    assert!(
        sent < 64 << 20,
        "the server read {} MiB before it refused a 1 MiB quota's upload",
        sent >> 20
    );
}

/// An upload sent slowly holds up nobody: while one tenant's body trickles in, its job's
/// delete (which collects blobs) and another tenant's job with an inline input both finish.
#[test]
fn a_slow_upload_holds_up_no_other_blob_work() {
    use std::io::Write;
    need_root!();
    let server = Server::start();
    let slow = server.admin_key();
    let other = user_key(&server, "other");
    let done = submit(
        &server,
        &slow,
        json!({"shell": "echo kept > o", "outputs": ["o"]}),
    );
    assert_eq!(wait(&server, &slow, &done, 60)["state"], "succeeded");

    let mut conn = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    write!(
        conn,
        "POST /v1/blobs HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {slow}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\nx"
    )
    .expect("head");
    conn.flush().expect("flush");
    // Let the upload begin its body before the others come.
    std::thread::sleep(Duration::from_millis(500));

    let (finished, finishes) = std::sync::mpsc::channel::<String>();
    std::thread::scope(|s| {
        let tell = finished.clone();
        let (server, slow, other) = (&server, &slow, &other);
        let done = &done;
        s.spawn(move || {
            let r = server.request("DELETE", &format!("/v1/jobs/{done}"), Some(slow), None);
            let _ = tell.send(format!("delete: {}", r.status));
        });
        s.spawn(move || {
            let id = submit(
                server,
                other,
                json!({"shell": "cat in", "inputs": [{"path": "in", "content": "inline"}]}),
            );
            let j = wait(server, other, &id, 120);
            let _ = finished.send(format!("job: {} {}", j["state"], j["stdout_tail"]));
        });
        let mut got: Vec<String> = (0..2)
            .map_while(|_| finishes.recv_timeout(Duration::from_secs(60)).ok())
            .collect();
        // The upload ends here either way, so that what waits for it can end too.
        drop(conn);
        got.sort();
        assert_eq!(
            got,
            ["delete: 204", "job: \"succeeded\" \"inline\""],
            "what ended within a minute while the upload waited"
        );
    });
}
