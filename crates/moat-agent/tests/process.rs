//! The `process.Process` service over the Connect JSON codec, as the E2B SDK drives it.

#![allow(clippy::unwrap_used)]

#[path = "rpc_common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const START: &str = "/process.Process/Start";
const CONNECT: &str = "/process.Process/Connect";

fn pid_of(start: &Value) -> u64 {
    start
        .pointer("/event/start/pid")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("not a start event: {start}"))
}

fn assert_one_end_last(events: &[Value]) -> Value {
    let ends: Vec<_> = events
        .iter()
        .filter(|e| e.pointer("/event/end").is_some())
        .collect();
    assert_eq!(ends.len(), 1, "exactly one end event: {events:?}");
    let last = events.last().unwrap();
    assert!(
        last.pointer("/event/end").is_some(),
        "end is last: {events:?}"
    );
    last["event"]["end"].clone()
}

/// Reads a stream until its output (all channels) contains `needle`.
async fn read_until(stream: &mut Stream, needle: &str, seen: &mut Vec<Value>) {
    loop {
        let ev = stream.next_json().await.expect("stream open");
        assert!(
            ev.get("$end").is_none(),
            "ended before {needle:?}: {ev} after {seen:?}"
        );
        seen.push(ev);
        let (o, e, p) = outputs(seen);
        if o.contains(needle) || e.contains(needle) || p.contains(needle) {
            return;
        }
    }
}

#[tokio::test]
async fn run_reports_start_output_and_one_end() {
    let agent = Agent::start(config()).await;
    let stream = agent
        .stream(
            START,
            run_request("echo hello; echo oops >&2; exit 3", false),
            &[
                ("keepalive-ping-interval", "50"),
                ("connect-timeout-ms", "60000"),
            ],
        )
        .await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.content_type, "application/connect+json");
    let (events, end) = stream.collect().await;
    assert_eq!(end, json!({}));
    assert!(pid_of(&events[0]) > 0);
    let (out, err, _) = outputs(&events);
    assert_eq!(out, "hello\n");
    assert_eq!(err, "oops\n");
    let end = assert_one_end_last(&events);
    assert_eq!(
        end,
        json!({"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"})
    );
}

#[tokio::test]
async fn success_and_signal_statuses_read_like_go() {
    let agent = Agent::start(config()).await;
    let (events, _) = agent
        .stream(START, run_request("true", false), &[])
        .await
        .collect()
        .await;
    assert_eq!(
        assert_one_end_last(&events),
        json!({"exited": true, "status": "exit status 0"})
    );

    let (events, _) = agent
        .stream(START, run_request("kill -9 $$", false), &[])
        .await
        .collect()
        .await;
    let end = assert_one_end_last(&events);
    assert_eq!(end["exitCode"], -1);
    assert_eq!(end["status"], "signal: killed");
    assert!(end.get("exited").is_none(), "exited is false: {end}");
}

#[tokio::test]
async fn stdin_send_input_and_close() {
    let agent = Agent::start(config()).await;
    // `stdin` absent means true.
    let mut stream = agent
        .stream(START, json!({"process": {"cmd": "cat"}}), &[])
        .await;
    let start = stream.next_json().await.unwrap();
    let pid = pid_of(&start);
    let (status, body) = agent
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": b64(b"ping\n")}}),
            &[],
        )
        .await;
    assert_eq!((status, body), (200, json!({})));
    let mut seen = vec![start];
    read_until(&mut stream, "ping\n", &mut seen).await;
    let (status, _) = agent
        .unary(
            "/process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    let (rest, end) = stream.collect().await;
    assert_eq!(end, json!({}));
    assert_eq!(assert_one_end_last(&rest)["status"], "exit status 0");
}

#[tokio::test]
async fn stdin_false_refuses_input() {
    let agent = Agent::start(config()).await;
    let mut stream = agent
        .stream(START, run_request("sleep 30", false), &[])
        .await;
    let pid = pid_of(&stream.next_json().await.unwrap());
    let (status, body) = agent
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": b64(b"x")}}),
            &[],
        )
        .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["code"], "internal");
    let (status, _) = agent
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    let (events, _) = stream.collect().await;
    assert_eq!(assert_one_end_last(&events)["status"], "signal: killed");
}

#[tokio::test]
async fn stream_input_feeds_stdin() {
    let agent = Agent::start(config()).await;
    let mut stream = agent
        .stream(
            START,
            json!({"process": {"cmd": "cat"}, "stdin": true}),
            &[],
        )
        .await;
    let start = stream.next_json().await.unwrap();
    let pid = pid_of(&start);

    let (tx, handle) = agent
        .stream_with_body("/process.Process/StreamInput", &[])
        .await;
    let env = |v: Value| moat_proto::connect::encode_envelope(0, &serde_json::to_vec(&v).unwrap());
    tx.send(env(json!({"start": {"process": {"pid": pid}}})))
        .await
        .unwrap();
    tx.send(env(json!({"data": {"input": {"stdin": b64(b"one ")}}})))
        .await
        .unwrap();
    tx.send(env(json!({"keepalive": {}}))).await.unwrap();
    tx.send(env(json!({"data": {"input": {"stdin": b64(b"two\n")}}})))
        .await
        .unwrap();
    drop(tx);
    let resp = Stream::new(handle.await.unwrap());
    assert_eq!(resp.content_type, "application/connect+json");
    let (messages, end) = resp.collect().await;
    assert_eq!(messages, vec![json!({})]);
    assert_eq!(end, json!({}));

    let mut seen = vec![start];
    read_until(&mut stream, "one two\n", &mut seen).await;
    agent
        .unary(
            "/process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    let (rest, _) = stream.collect().await;
    assert_one_end_last(&rest);
}

#[tokio::test]
async fn stream_input_to_unknown_process_is_not_found() {
    let agent = Agent::start(config()).await;
    let (tx, handle) = agent
        .stream_with_body("/process.Process/StreamInput", &[])
        .await;
    let body = serde_json::to_vec(&json!({"start": {"process": {"pid": 999_999_999u32}}})).unwrap();
    tx.send(moat_proto::connect::encode_envelope(0, &body))
        .await
        .unwrap();
    drop(tx);
    let (messages, end) = Stream::new(handle.await.unwrap()).collect().await;
    assert!(messages.is_empty());
    assert_eq!(end["error"]["code"], "not_found");
}

#[tokio::test]
async fn pty_output_input_and_resize() {
    let agent = Agent::start(config()).await;
    let req = json!({
        "process": {"cmd": "/bin/sh", "args": ["-c", "stty size; read x; stty size; echo got-$x"], "envs": {"TERM": "xterm-256color"}},
        "pty": {"size": {"cols": 100, "rows": 40}},
    });
    let mut stream = agent
        .stream(START, req, &[("keepalive-ping-interval", "50")])
        .await;
    let start = stream.next_json().await.unwrap();
    let pid = pid_of(&start);
    let mut seen = vec![start];
    read_until(&mut stream, "40 100", &mut seen).await;

    let (status, body) = agent
        .unary(
            "/process.Process/Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 120, "rows": 50}}}),
            &[],
        )
        .await;
    assert_eq!((status, body), (200, json!({})));
    let (status, _) = agent
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"pty": b64(b"abc\n")}}),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    read_until(&mut stream, "got-abc", &mut seen).await;
    let (rest, end) = stream.collect().await;
    assert_eq!(end, json!({}));
    seen.extend(rest.iter().cloned());
    let (out, err, pty) = outputs(&seen);
    assert!(
        out.is_empty() && err.is_empty(),
        "PTY output arrives as pty data"
    );
    assert!(pty.contains("50 120"), "resized: {pty:?}");
    assert_eq!(assert_one_end_last(&rest)["status"], "exit status 0");

    // CloseStdin is for pipes only.
    let mut stream = agent
        .stream(START, json!({"process": {"cmd": "/bin/sh", "args": ["-c", "read x"]}, "pty": {"size": {"cols": 80, "rows": 24}}}), &[])
        .await;
    let pid = pid_of(&stream.next_json().await.unwrap());
    let (status, body) = agent
        .unary(
            "/process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    assert_eq!(status, 400, "{body}");
    // Ctrl-D ends `read` instead.
    agent
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"pty": b64(b"\x04")}}),
            &[],
        )
        .await;
    let (events, _) = stream.collect().await;
    assert_one_end_last(&events);
}

#[tokio::test]
async fn connect_to_running_and_to_recently_exited_process() {
    let agent = Agent::start(config()).await;
    let mut first = agent.stream(START, json!({"process": {"cmd": "/bin/sh", "args": ["-c", "read x; echo got-$x"]}, "tag": "reader"}), &[]).await;
    let start = first.next_json().await.unwrap();
    let pid = pid_of(&start);

    // List shows it, with its config and tag.
    let (status, list) = agent.unary("/process.Process/List", json!({}), &[]).await;
    assert_eq!(status, 200);
    let entry = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .expect("listed")
        .clone();
    assert_eq!(entry["tag"], "reader");
    assert_eq!(entry["config"]["cmd"], "/bin/sh");

    let mut second = agent
        .stream(
            CONNECT,
            json!({"process": {"tag": "reader"}}),
            &[("keepalive-ping-interval", "50")],
        )
        .await;
    let start2 = second.next_json().await.unwrap();
    assert_eq!(pid_of(&start2), pid, "Connect starts with start{{pid}}");
    agent
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": b64(b"x\n")}}),
            &[],
        )
        .await;
    for stream in [first, second] {
        let (events, end) = stream.collect().await;
        assert_eq!(end, json!({}));
        assert_eq!(outputs(&events).0, "got-x\n");
        assert_one_end_last(&events);
    }

    // Exited: not listed, but Connect still reports start and end.
    let (_, list) = agent.unary("/process.Process/List", json!({}), &[]).await;
    assert!(
        !list.to_string().contains(&format!("\"pid\":{pid}")),
        "{list}"
    );
    let (events, end) = agent
        .stream(CONNECT, json!({"process": {"pid": pid}}), &[])
        .await
        .collect()
        .await;
    assert_eq!(end, json!({}));
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(pid_of(&events[0]), pid);
    assert_eq!(events[1]["event"]["end"]["status"], "exit status 0");
}

#[tokio::test]
async fn client_disconnect_does_not_kill() {
    let agent = Agent::start(config()).await;
    let mut stream = agent
        .stream(START, run_request("read x; echo after-$x", true), &[])
        .await;
    let pid = pid_of(&stream.next_json().await.unwrap());
    drop(stream);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = agent
        .stream(CONNECT, json!({"process": {"pid": pid}}), &[])
        .await;
    assert_eq!(pid_of(&again.next_json().await.unwrap()), pid);
    agent
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": b64(b"1\n")}}),
            &[],
        )
        .await;
    let (events, _) = again.collect().await;
    assert_eq!(outputs(&events).0, "after-1\n");
}

#[tokio::test]
async fn deadline_kills_the_whole_process_group() {
    let agent = Agent::start(config()).await;
    let marker = format!("{}.{}", 7000 + std::process::id() % 1000, 321);
    let cmd = format!("sleep {marker} & sleep {marker}");
    let stream = agent
        .stream(
            START,
            json!({"process": {"cmd": "/bin/sh", "args": ["-c", cmd]}}),
            &[("connect-timeout-ms", "1000")],
        )
        .await;
    let (events, end) = stream.collect().await;
    assert!(pid_of(&events[0]) > 0);
    assert_eq!(end["error"]["code"], "deadline_exceeded", "{end}");
    let needle = format!("sleep {marker}");
    let mut left = processes_matching(&needle);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = processes_matching(&needle);
    }
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[tokio::test]
async fn send_signal_reaches_the_group() {
    let agent = Agent::start(config()).await;
    let marker = format!("{}.{}", 8000 + std::process::id() % 1000, 654);
    let cmd = format!("sleep {marker} & sleep {marker}");
    let mut stream = agent
        .stream(
            START,
            json!({"process": {"cmd": "/bin/sh", "args": ["-c", cmd]}}),
            &[],
        )
        .await;
    let pid = pid_of(&stream.next_json().await.unwrap());
    let (status, _) = agent
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGTERM"}),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    let (events, _) = stream.collect().await;
    assert_eq!(assert_one_end_last(&events)["status"], "signal: terminated");
    let needle = format!("sleep {marker}");
    for _ in 0..100 {
        if processes_matching(&needle).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("group survived SIGTERM");
}

#[tokio::test]
async fn numeric_signals_are_an_extension() {
    let agent = Agent::start(config()).await;
    let mut stream = agent
        .stream(START, run_request("sleep 30", false), &[])
        .await;
    let pid = pid_of(&stream.next_json().await.unwrap());
    // Signalled once bash has become the sleep: a SIGINT caught by bash's own handler while it
    // starts up is swallowed, and the sleep would then run its 30 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let comm = || std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    while comm().trim() != "sleep" {
        assert!(
            std::time::Instant::now() < deadline,
            "bash never became the sleep"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (status, body) = agent
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": 2}),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (events, _) = stream.collect().await;
    // bash -c with a single command execs it, so the sleep itself gets SIGINT.
    assert_eq!(assert_one_end_last(&events)["status"], "signal: interrupt");
}

#[tokio::test]
async fn keepalives_on_idle_streams() {
    let agent = Agent::start(config()).await;
    let (events, end) = agent
        .stream(
            START,
            run_request("sleep 2.5", false),
            &[("keepalive-ping-interval", "1")],
        )
        .await
        .collect()
        .await;
    assert_eq!(end, json!({}));
    assert!(pid_of(&events[0]) > 0);
    assert!(
        events
            .iter()
            .any(|e| *e == json!({"event": {"keepalive": {}}})),
        "keepalive sent: {events:?}"
    );
    assert_one_end_last(&events);
}

#[tokio::test]
async fn env_and_cwd() {
    let mut cfg = config();
    cfg.env_vars.insert("FOO".into(), "sandbox".into());
    cfg.env_vars.insert("BAR".into(), "sandbox".into());
    cfg.default_workdir = Some("/tmp".into());
    let agent = Agent::start(cfg).await;
    let req = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "echo $HOME:$USER:$LOGNAME:$FOO:$BAR; pwd"], "envs": {"BAR": "request"}}});
    let (events, _) = agent.stream(START, req, &[]).await.collect().await;
    assert_eq!(
        outputs(&events).0,
        "/root:root:root:sandbox:request\n/tmp\n"
    );

    let req = json!({"process": {"cmd": "pwd", "cwd": "/"}});
    let (events, _) = agent.stream(START, req, &[]).await.collect().await;
    assert_eq!(outputs(&events).0, "/\n");
}

#[tokio::test]
async fn error_codes() {
    let agent = Agent::start(config()).await;
    // Errors before the first message: HTTP 200 with an end-stream error.
    for (req, code) in [
        (
            json!({"process": {"cmd": "pwd", "cwd": "/nonexistent-moat-dir"}}),
            "invalid_argument",
        ),
        (
            json!({"process": {"cmd": "pwd", "cwd": "/proc/self/fd"}}),
            "invalid_argument",
        ),
        (json!({"process": {"cmd": ""}}), "invalid_argument"),
        (
            json!({"process": {"cmd": "/nonexistent-moat-binary"}}),
            "not_found",
        ),
    ] {
        let stream = agent.stream(START, req.clone(), &[]).await;
        assert_eq!(stream.status, 200);
        let (messages, end) = stream.collect().await;
        assert!(messages.is_empty(), "{req}: {messages:?}");
        assert_eq!(end["error"]["code"], code, "{req}: {end}");
    }
    let (messages, end) = agent
        .stream(CONNECT, json!({"process": {"pid": 999_999_999u32}}), &[])
        .await
        .collect()
        .await;
    assert!(messages.is_empty());
    assert_eq!(end["error"]["code"], "not_found");

    let (status, body) = agent
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": 999_999_999u32}, "signal": "SIGNAL_SIGKILL"}),
            &[],
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, body) = agent
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": 1}, "signal": "SIGNAL_UNSPECIFIED"}),
            &[],
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (501, Some("unimplemented"))
    );
    let (status, body) = agent
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": 999_999_999u32}}),
            &[],
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));

    // Unknown user.
    let (status, body) = agent
        .unary(
            "/process.Process/List",
            json!({}),
            &[("authorization", "Basic bm8tc3VjaC11c2VyLXg6")],
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    let (_, end) = agent
        .stream(
            START,
            run_request("true", false),
            &[("authorization", "Basic bm8tc3VjaC11c2VyLXg6")],
        )
        .await
        .collect()
        .await;
    assert_eq!(end["error"]["code"], "unauthenticated");
    // A known user, explicitly.
    let (status, _) = agent
        .unary(
            "/process.Process/List",
            json!({}),
            &[("authorization", "Basic cm9vdDo=")],
        )
        .await;
    assert_eq!(status, 200);

    // Invalid deadlines.
    let (status, body) = agent
        .unary(
            "/process.Process/List",
            json!({}),
            &[("connect-timeout-ms", "12345678901")],
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    let (_, end) = agent
        .stream(
            START,
            run_request("true", false),
            &[("connect-timeout-ms", "soon")],
        )
        .await
        .collect()
        .await;
    assert_eq!(end["error"]["code"], "invalid_argument");

    // Unknown routes and methods.
    let (status, body) = agent.unary("/process.Process/Nope", json!({}), &[]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unimplemented"))
    );
    let (status, _) = agent.unary("/nope.Nope/Nope", json!({}), &[]).await;
    assert_eq!(status, 404);
    let resp = agent
        .send(
            http::Request::get("http://localhost/process.Process/List")
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 405);
    // A streaming content type on a unary RPC.
    let resp = agent
        .send(
            Agent::builder("/process.Process/List", true)
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 415);
    // Malformed JSON.
    let resp = agent
        .send(
            Agent::builder("/process.Process/List", false)
                .body(full("{"))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 400);
}
