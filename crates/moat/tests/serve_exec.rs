//! `POST /v1/sandboxes/{id}/exec` over a real `moat serve`: the NDJSON event stream (order,
//! output before the end, UTF-8 split between writes, timeouts), base64 stdin and output, a
//! client hanging up killing its command, the output many buffered commands hold at once within
//! their tenant's budget, and JSON errors for what fails before the start.
//! Needs root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::is_root;
use support::server::*;

const NDJSON: (&str, &str) = ("Accept", "application/x-ndjson");

/// A server, its admin key and one running sandbox.
struct Fixture {
    server: Server,
    key: String,
    id: String,
}

impl Fixture {
    fn start() -> Option<Fixture> {
        if !is_root() {
            eprintln!("SKIP: moat serve's native backend needs root");
            return None;
        }
        let server = Server::start();
        let key = server.admin_key();
        let id = server.create_sandbox(&key);
        Some(Fixture { server, key, id })
    }

    /// The value of an unlabelled series of `/metrics`.
    fn metric(&self, name: &str) -> usize {
        let text = self
            .server
            .request("GET", "/metrics", Some(&self.key), None)
            .text();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    fn exec_path(&self) -> String {
        format!("/v1/sandboxes/{}/exec", self.id)
    }

    /// A buffered exec, which must succeed.
    fn exec(&self, req: Value) -> Value {
        let r = self
            .server
            .request("POST", &self.exec_path(), Some(&self.key), Some(&body(req)));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// A streamed exec read to its end: every event.
    fn stream(&self, req: Value) -> Vec<Value> {
        let r = self
            .server
            .send(
                "POST",
                &self.exec_path(),
                Some(&self.key),
                &[("Content-Type", "application/json"), NDJSON],
                Some(&body(req)),
            )
            .expect("streamed exec");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
        let text = String::from_utf8(r.body).expect("UTF-8 stream");
        assert!(text.ends_with('\n'), "{text}");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("one JSON document a line"))
            .collect()
    }

    /// A streamed exec whose events are read one at a time.
    fn open_stream(&self, req: Value) -> EventReader {
        EventReader::open(&self.server, &self.key, &self.exec_path(), &body(req))
    }

    /// Waits until no process of the sandbox has `needle` in its command line.
    fn wait_gone(&self, needle: &str) {
        // Generous: only a command that is never killed should reach it.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ps = self.exec(json!({"cmd": ["ps", "-eo", "args"]}));
            let listing = ps["stdout"].as_str().expect("ps output");
            // An empty listing must not pass for "gone": `ps` ran and saw itself.
            assert_eq!(ps["exit_code"], 0, "ps failed (is procps installed?): {ps}");
            assert!(
                listing.lines().any(|l| l.starts_with("ps -eo args")),
                "ps did not list itself:\n{listing}"
            );
            if !listing.lines().any(|l| l.contains(needle)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} still runs after its client went away:\n{listing}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The concatenated `data` of the events of `kind`.
fn output(events: &[Value], kind: &str) -> String {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| e["data"].as_str().expect("data is a string"))
        .collect()
}

/// Checks the stream's shape: `start` first, then output only, then one `end`; returns the end.
fn check_shape(events: &[Value]) -> &Value {
    let (first, rest) = events.split_first().expect("events");
    assert_eq!(first["type"], "start", "{events:?}");
    assert!(first["pid"].as_u64().is_some_and(|p| p > 0), "{first}");
    let (last, middle) = rest.split_last().expect("an end");
    assert_eq!(last["type"], "end", "{events:?}");
    for e in middle {
        assert!(e["type"] == "stdout" || e["type"] == "stderr", "{events:?}");
    }
    last
}

#[test]
fn exec_streams_events() {
    let Some(f) = Fixture::start() else { return };

    // Both outputs and an exit code, in order: start, output, end.
    let events = f.stream(json!({"shell": "echo out; echo err >&2; exit 3"}));
    let end = check_shape(&events);
    assert_eq!(output(&events, "stdout"), "out\n");
    assert_eq!(output(&events, "stderr"), "err\n");
    assert_eq!(end["exit_code"], 3);
    assert_eq!(end["signal"], Value::Null);
    assert_eq!(end["timed_out"], false);
    assert_eq!(end["oom_killed"], false);
    assert!(end["duration_ms"].is_u64(), "{end}");

    // The first output arrives while the command still runs: it waits for a file that is
    // only made once the test has read that output.
    let mut reader = f.open_stream(json!({
        "shell": "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second",
    }));
    assert_eq!(reader.next_event()["type"], "start");
    let first = reader.next_event();
    assert_eq!(first, json!({"type": "stdout", "data": "first\n"}));
    f.exec(json!({"cmd": ["touch", "/tmp/go"]}));
    let mut rest = Vec::new();
    while let Some(e) = reader.try_next_event() {
        rest.push(e);
    }
    assert_eq!(output(&rest, "stdout"), "second\n");
    assert_eq!(rest.last().expect("end")["exit_code"], 0);

    // A character split between two writes arrives whole.
    let events = f.stream(json!({"shell": r"printf '\303'; sleep 0.1; printf '\251'"}));
    check_shape(&events);
    assert_eq!(output(&events, "stdout"), "é");
    // Invalid bytes are replaced, the rest kept.
    let events = f.stream(json!({"shell": r"printf 'a\377b'"}));
    assert_eq!(output(&events, "stdout"), "a\u{fffd}b");

    // A timeout ends the stream with `timed_out`.
    let events = f.stream(json!({"shell": "echo going; sleep 60", "timeout_secs": 1}));
    let end = check_shape(&events);
    assert_eq!(output(&events, "stdout"), "going\n");
    assert_eq!(end["timed_out"], true, "{end}");
    assert_eq!(end["exit_code"], Value::Null, "{end}");

    // A program that cannot start has no `start`: the reason, then exit 127.
    let events = f.stream(json!({"cmd": ["no-such-program"]}));
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["type"], "stderr");
    assert_eq!(events[1]["type"], "end");
    assert_eq!(events[1]["exit_code"], 127);
}

#[test]
fn exec_carries_binary_as_base64() {
    let Some(f) = Fixture::start() else { return };
    let b64 = base64::engine::general_purpose::STANDARD;
    let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let req = json!({"cmd": ["cat"], "stdin_b64": b64.encode(&bytes), "encoding": "base64"});

    // Buffered: the whole output is one base64 string.
    let result = f.exec(req.clone());
    assert_eq!(result["exit_code"], 0);
    let out = b64
        .decode(result["stdout"].as_str().expect("stdout"))
        .expect("base64 stdout");
    assert_eq!(out, bytes);
    assert_eq!(result["truncated"], false);

    // Streamed: each event is the base64 of its own bytes.
    let events = f.stream(req);
    check_shape(&events);
    let mut out = Vec::new();
    for e in events.iter().filter(|e| e["type"] == "stdout") {
        out.extend(
            b64.decode(e["data"].as_str().expect("data"))
                .expect("base64"),
        );
    }
    assert_eq!(out, bytes);

    // Text stdin still works, and output defaults to UTF-8.
    let result = f.exec(json!({"shell": "tr a-z A-Z", "stdin": "hello"}));
    assert_eq!(result["stdout"], "HELLO");
}

#[test]
fn buffered_execs_at_once_share_their_tenant_s_output_budget() {
    let Some(f) = Fixture::start() else { return };
    // 40 commands each print their full 1 MiB on stdout and on stderr, then wait: 80 MiB held
    // at once against the tenant's 64 MiB. Four sandboxes, ten commands each.
    const SANDBOXES: usize = 4;
    const EACH: usize = 10;
    const MIB: usize = 1 << 20;
    let ids: Vec<String> = (0..SANDBOXES)
        .map(|i| {
            if i == 0 {
                f.id.clone()
            } else {
                f.server.create_sandbox(&f.key)
            }
        })
        .collect();
    // Each waits, once it has printed, for the test to see all of them print: only then do
    // they all hold their output at once.
    let script = "head -c 1048576 /dev/zero | tr '\\0' a; \
                  head -c 1048576 /dev/zero | tr '\\0' b >&2; \
                  mkdir -p /tmp/m && touch /tmp/m/$$; \
                  for i in $(seq 1200); do [ -e /tmp/go ] && exit 0; sleep 0.05; done; exit 9";
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..SANDBOXES * EACH)
            .map(|n| {
                let (f, id) = (&f, &ids[n % SANDBOXES]);
                s.spawn(move || {
                    let r = f.server.request(
                        "POST",
                        &format!("/v1/sandboxes/{id}/exec"),
                        Some(&f.key),
                        Some(&body(json!({"shell": script}))),
                    );
                    assert_eq!(r.status, 200, "{}", r.text());
                    r.json()
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        for id in &ids {
            loop {
                let r = f.server.request(
                    "GET",
                    &format!("/v1/sandboxes/{id}/files/list?path=/tmp/m"),
                    Some(&f.key),
                    None,
                );
                let printed = if r.status == 200 {
                    r.json()["entries"].as_array().map_or(0, Vec::len)
                } else {
                    0
                };
                if printed == EACH {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{id}: {printed} of {EACH} printed"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // What the commands printed may still be on its way to the server: wait until every
        // byte is held or dropped, before any command ends and gives its room back.
        loop {
            let held = f.metric("moat_exec_output_held_bytes");
            let dropped = f.metric("moat_exec_output_dropped_bytes_total");
            if held + dropped >= SANDBOXES * EACH * 2 * MIB {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the server has {held} bytes held and {dropped} dropped"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        for id in &ids {
            let r = f
                .server
                .send(
                    "PUT",
                    &format!("/v1/sandboxes/{id}/files?path=/tmp/go"),
                    Some(&f.key),
                    &[("Content-Type", "application/octet-stream")],
                    Some(b"go"),
                )
                .expect("PUT");
            assert!(r.status < 300, "{}", r.text());
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("exec thread"))
            .collect()
    });
    let kept: usize = results
        .iter()
        .map(|r| {
            assert_eq!(
                r["exit_code"],
                0,
                "{}",
                r["stderr"].as_str().map_or(0, str::len)
            );
            r["stdout"].as_str().map_or(0, str::len) + r["stderr"].as_str().map_or(0, str::len)
        })
        .sum();
    let truncated = results.iter().filter(|r| r["truncated"] == true).count();
    let budget = moat_engine::manager::BUFFERED_OUTPUT_PER_TENANT;
    assert!(
        kept <= budget,
        "the tenant's commands held {kept} bytes at once, over its {budget}"
    );
    assert!(
        truncated >= (SANDBOXES * EACH * 2 * MIB - budget) / (2 * MIB),
        "{truncated} truncated"
    );
    // Their answers gave the budget back: one more command keeps all it prints.
    let r = f.exec(json!({"shell": script}));
    assert_eq!(r["truncated"], false);
    assert_eq!(r["stdout"].as_str().map(str::len), Some(MIB));
    assert_eq!(r["stderr"].as_str().map(str::len), Some(MIB));
}

#[test]
fn exec_client_hanging_up_kills_the_command() {
    let Some(f) = Fixture::start() else { return };

    // A stream closed after its first output.
    let mut reader = f.open_stream(json!({"shell": "echo up; exec sleep 987"}));
    assert_eq!(reader.next_event()["type"], "start");
    assert_eq!(reader.next_event()["data"], "up\n");
    drop(reader);
    f.wait_gone("sleep 987");

    // A buffered exec closed once its command runs (it says so through a file).
    let mut conn = connect(&f.server);
    let req = body(json!({"shell": "touch /tmp/started; exec sleep 988"}));
    write_request(&mut conn, &f.key, &f.exec_path(), &[], &req);
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.exec(json!({"cmd": ["ls", "/tmp/started"]}))["exit_code"] != 0 {
        assert!(
            Instant::now() < deadline,
            "the buffered command never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(conn);
    f.wait_gone("sleep 988");

    // The sandbox going away under a stream ends it with an `error` event.
    let mut reader = f.open_stream(json!({"shell": "echo up; exec sleep 989"}));
    assert_eq!(reader.next_event()["type"], "start");
    assert_eq!(reader.next_event()["data"], "up\n");
    let path = format!("/v1/sandboxes/{}", f.id);
    assert_eq!(
        f.server.request("DELETE", &path, Some(&f.key), None).status,
        204
    );
    let last = reader.next_event();
    assert_eq!(last["type"], "error", "{last}");
    assert_eq!(last["code"], "unavailable", "{last}");
    assert!(
        last["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{last}"
    );
    assert_eq!(reader.try_next_event(), None);
}

#[test]
fn exec_errors_before_the_start_are_json() {
    let Some(f) = Fixture::start() else { return };
    let send = |path: &str, req: &[u8]| {
        f.server
            .send(
                "POST",
                path,
                Some(&f.key),
                &[("Content-Type", "application/json"), NDJSON],
                Some(req),
            )
            .expect("exec")
    };
    let path = f.exec_path();
    send(&path, b"{").assert_error(400, "invalid");
    send(&path, br#"{"command":"ls"}"#).assert_error(400, "invalid");
    send(&path, br#"{"shell":"ls","encoding":"hex"}"#).assert_error(400, "invalid");
    send(&path, br#"{"shell":"cat","stdin":"a","stdin_b64":"YQ=="}"#).assert_error(400, "invalid");
    send(&path, br#"{"shell":"cat","stdin_b64":"%%%"}"#).assert_error(400, "invalid");
    send(&path, br#"{"cmd":["ls"],"cwd":"/no/such/dir"}"#).assert_error(400, "invalid");
    send(&path, br#"{"cmd":["ls"],"user":"nobody-here"}"#).assert_error(400, "invalid");
    send(
        "/v1/sandboxes/nosuchsandbox0000000/exec",
        br#"{"cmd":["ls"]}"#,
    )
    .assert_error(404, "not_found");
    // The buffered form answers the same errors.
    f.server
        .request(
            "POST",
            &path,
            Some(&f.key),
            Some(br#"{"shell":"x","stdin":"a","stdin_b64":"YQ=="}"#),
        )
        .assert_error(400, "invalid");

    let r = f.server.request(
        "DELETE",
        &format!("/v1/sandboxes/{}", f.id),
        Some(&f.key),
        None,
    );
    assert_eq!(r.status, 204);
    send(&path, br#"{"cmd":["ls"]}"#).assert_error(409, "conflict");
}

fn connect(server: &Server) -> TcpStream {
    let conn = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    // Only a hung server reaches it; the test then fails instead of hanging.
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("read timeout");
    conn
}

fn write_request(
    conn: &mut TcpStream,
    key: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).expect("write head");
    conn.write_all(body).expect("write body");
}

/// Reads an NDJSON answer event by event, as it arrives: the chunked body is decoded
/// incrementally and no read waits for more than the next event needs.
struct EventReader {
    conn: TcpStream,
    /// Received bytes not yet decoded (chunk framing included).
    raw: Vec<u8>,
    /// Decoded body bytes not yet split into lines.
    body: Vec<u8>,
    /// The terminating chunk was seen.
    done: bool,
}

impl EventReader {
    fn open(server: &Server, key: &str, path: &str, body: &[u8]) -> EventReader {
        let mut conn = connect(server);
        write_request(&mut conn, key, path, &[NDJSON], body);
        let mut reader = EventReader {
            conn,
            raw: Vec::new(),
            body: Vec::new(),
            done: false,
        };
        let end = loop {
            if let Some(i) = reader.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            assert!(reader.fill(), "connection closed before the answer's head");
        };
        let head = String::from_utf8_lossy(&reader.raw[..end]).to_ascii_lowercase();
        reader.raw.drain(..end + 4);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains("content-type: application/x-ndjson"),
            "{head}"
        );
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        reader
    }

    /// Reads more bytes; false at the end of the connection.
    fn fill(&mut self) -> bool {
        let mut buf = [0u8; 16 << 10];
        match self.conn.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                self.raw.extend_from_slice(&buf[..n]);
                true
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => true,
            Err(e) => panic!("reading the event stream: {e}"),
        }
    }

    /// Moves every complete chunk of `raw` into `body`.
    fn dechunk(&mut self) {
        while !self.done {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[start..start + size]);
            self.raw.drain(..start + size + 2);
            self.done = size == 0;
        }
    }

    /// The next event, or `None` at the end of the stream.
    fn try_next_event(&mut self) -> Option<Value> {
        loop {
            self.dechunk();
            if let Some(i) = self.body.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.body.drain(..=i).collect();
                return Some(serde_json::from_slice(&line).expect("an event is JSON"));
            }
            if self.done {
                assert!(self.body.is_empty(), "stream ended mid-line");
                return None;
            }
            assert!(self.fill(), "connection closed mid-stream");
        }
    }

    fn next_event(&mut self) -> Value {
        self.try_next_event().expect("another event")
    }
}
