//! moat's MCP server (`/mcp` over streamable HTTP, and `moat mcp` over stdio) with the
//! official `mcp` Python client (`tests/mcp/test_mcp.py`) against a real `moat serve`. The
//! Python is `MOAT_TEST_PYTHON` (set by scripts/test.sh), else the venv scripts/test-deps.sh
//! makes. Needs root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;

use support::need_root;
use support::server::*;

#[test]
fn the_mcp_client_uses_moat_over_http_and_stdio() {
    need_root!();
    let server = Server::start();
    let moat = support::moat_binary();
    let moat = moat.to_str().expect("a UTF-8 path");
    support::pytest("tests/mcp/test_mcp.py", &server, &[("MOAT_BIN", moat)], &[]);
}

/// `message` posted to `/mcp` with `key`, on `session` when given.
fn post_mcp(
    server: &Server,
    key: &str,
    session: Option<&str>,
    message: serde_json::Value,
) -> Reply {
    let mut headers = vec![
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
    ];
    if let Some(session) = session {
        headers.push(("Mcp-Session-Id", session));
    }
    server
        .send("POST", "/mcp", Some(key), &headers, Some(&body(message)))
        .expect("POST /mcp")
}

/// An MCP `initialize` request with the id `id`.
fn initialize_message(id: u64) -> serde_json::Value {
    serde_json::json!({
        "jsonrpc": "2.0", "id": id, "method": "initialize",
        "params": {"protocolVersion": "2025-03-26", "capabilities": {},
                   "clientInfo": {"name": "moat-tests", "version": "1"}},
    })
}

/// An MCP `initialize` for `/mcp` with `key`.
fn initialize(server: &Server, key: &str) -> Reply {
    post_mcp(server, key, None, initialize_message(1))
}

/// `moat mcp` started against `server` with `key`, its input and output piped.
fn start_bridge(server: &Server, key: &str) -> std::process::Child {
    std::process::Command::new(support::moat_binary())
        .arg("mcp")
        .env("MOAT_URL", format!("http://127.0.0.1:{}", server.port))
        .env("MOAT_API_KEY", key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("moat mcp")
}

/// The session an `initialize` answer opened.
fn session_of(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply
        .header("mcp-session-id")
        .expect("an Mcp-Session-Id")
        .to_owned()
}

#[test]
fn a_tenant_s_mcp_sessions_are_capped_and_closing_one_makes_room() {
    need_root!();
    let server = Server::start_with(&["--rate-limit", "100000"]);
    let admin = server.admin_key();
    let a = server.create_key(&admin, serde_json::json!({"name": "a", "tenant": "mcpa"}));
    let b = server.create_key(&admin, serde_json::json!({"name": "b", "tenant": "mcpb"}));

    // Requests that open no session give their place back.
    let list = body(serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    for _ in 0..40 {
        let reply = server
            .send(
                "POST",
                "/mcp",
                Some(&a),
                &[
                    ("Content-Type", "application/json"),
                    ("Accept", "application/json, text/event-stream"),
                ],
                Some(&list),
            )
            .expect("POST /mcp");
        assert_eq!(reply.status / 100, 4, "{}", reply.text());
        assert_ne!(reply.status, 429, "{}", reply.text());
    }

    let mut open: Vec<String> = (0..32)
        .map(|_| session_of(&initialize(&server, &a)))
        .collect();
    let refused = initialize(&server, &a);
    refused.assert_error(429, "rate_limited");
    assert!(
        refused.text().contains("MCP sessions"),
        "{}",
        refused.text()
    );
    assert!(refused.header("retry-after").is_some(), "{}", refused.head);
    // An initialize sent again on an open session keeps that session's place taken.
    let _ = post_mcp(&server, &a, Some(&open[0]), initialize_message(3));
    initialize(&server, &a).assert_error(429, "rate_limited");
    // Another tenant is not held back by the first one's sessions.
    session_of(&initialize(&server, &b));

    let closed = open.pop().expect("a session");
    let reply = server
        .send(
            "DELETE",
            "/mcp",
            Some(&a),
            &[("Mcp-Session-Id", &closed)],
            None,
        )
        .expect("DELETE /mcp");
    assert_eq!(reply.status / 100, 2, "{}", reply.text());
    // The closed session's end gives its place back (its task ends just after the answer).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let reply = initialize(&server, &a);
        if reply.status == 200 {
            break;
        }
        reply.assert_error(429, "rate_limited");
        assert!(
            std::time::Instant::now() < deadline,
            "a closed session's place did not come back"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `moat mcp` keeps working when the server no longer knows its session (here the server
/// restarted; an idle session ends the same way): it opens a new one as the client did.
#[test]
fn moat_mcp_opens_a_new_session_when_the_server_lost_its_own() {
    use std::io::{BufRead, BufReader, Write};
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let port = server.port;
    let mut bridge = start_bridge(&server, &key);
    let mut input = bridge.stdin.take().expect("stdin");
    let mut output = BufReader::new(bridge.stdout.take().expect("stdout"));
    let mut ask = |message: serde_json::Value, answered: bool| -> serde_json::Value {
        writeln!(input, "{message}").expect("write");
        input.flush().expect("flush");
        if !answered {
            return serde_json::Value::Null;
        }
        let mut line = String::new();
        output.read_line(&mut line).expect("read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    };
    let call = |id: u64, word: &str| {
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "run_command", "arguments": {"command": format!("echo {word}")}}})
    };
    let init = ask(initialize_message(1), true);
    assert!(init["result"]["serverInfo"].is_object(), "{init}");
    ask(
        serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        false,
    );
    let first = ask(call(2, "before"), true);
    assert!(first.to_string().contains("before"), "{first}");

    let (dir, data) = server.kill9();
    let _server = Server::start_in_on_port(dir, data, port);
    let second = ask(call(3, "after"), true);
    assert_eq!(second["id"], 3, "{second}");
    assert_eq!(second["result"]["isError"], false, "{second}");
    assert!(second.to_string().contains("after"), "{second}");

    drop(input);
    let status = bridge.wait().expect("wait");
    assert!(status.success(), "{status}");
}

/// A message on an open `/mcp` session.
fn on_session(server: &Server, key: &str, session: &str, message: serde_json::Value) -> Reply {
    post_mcp(server, key, Some(session), message)
}

/// A tool call the client cancels stops: its command is killed in the sandbox.
#[test]
fn a_cancelled_tool_call_kills_its_command() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let session = session_of(&initialize(&server, &key));
    on_session(
        &server,
        &key,
        &session,
        serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    );
    let id = server.create_sandbox(&key);
    let sleeping = |server: &Server| {
        server.shell(&key, &id, "pgrep -c -x sleep || true")["stdout"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    std::thread::scope(|s| {
        let call = s.spawn(|| {
            on_session(
                &server,
                &key,
                &session,
                serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                    "params": {"name": "run_command",
                               "arguments": {"command": "sleep 171", "sandbox_id": id}}}),
            )
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while sleeping(&server) != "1" {
            assert!(
                std::time::Instant::now() < deadline,
                "the command never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        on_session(
            &server,
            &key,
            &session,
            serde_json::json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": 7, "reason": "the user stopped it"}}),
        );
        // The call's own request ends (whatever the transport answers for a cancelled call).
        let _ = call.join().expect("call thread");
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sleeping(&server) != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the cancelled call's command still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `moat mcp` relays requests side by side: a long tool call holds up neither a quick call
/// nor its own cancellation, and calls at once share the session's one sandbox.
#[test]
fn moat_mcp_answers_a_quick_call_while_a_long_one_runs_and_cancels_it() {
    use std::io::{BufRead, BufReader, Write};
    use std::time::Duration;
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let mut bridge = start_bridge(&server, &key);
    let mut input = bridge.stdin.take().expect("stdin");
    let output = BufReader::new(bridge.stdout.take().expect("stdout"));
    let (answers, answered) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in output.lines().map_while(Result::ok) {
            let message = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
            if answers.send(message).is_err() {
                break;
            }
        }
    });
    let mut send = |message: serde_json::Value| {
        writeln!(input, "{message}").expect("write");
        input.flush().expect("flush");
    };
    let next = || {
        answered
            .recv_timeout(Duration::from_secs(60))
            .expect("an answer within a minute")
    };
    let call = |id: u64, command: &str| {
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "run_command", "arguments": {"command": command}}})
    };
    send(initialize_message(1));
    assert!(next()["result"]["serverInfo"].is_object());
    send(serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    send(call(2, "sleep 171"));
    send(call(3, "echo quick"));
    let quick = next();
    assert_eq!(quick["id"], 3, "{quick}");
    assert!(quick.to_string().contains("quick"), "{quick}");
    // The same sandbox: the long call's command is seen there.
    let sleeping = |n: u64, send: &mut dyn FnMut(serde_json::Value)| {
        send(call(n, "echo sleeping=$(pgrep -c -x sleep)"));
        let r = next();
        assert_eq!(r["id"], n, "{r}");
        r["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // It may not have started yet on a busy machine: asked until it has.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut n = 4;
    loop {
        let seen = sleeping(n, &mut send);
        n += 1;
        if seen.contains("sleeping=1\n") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the long call's command is not in the session's sandbox: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    send(
        serde_json::json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
            "params": {"requestId": 2, "reason": "the user stopped it"}}),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen = sleeping(n, &mut send);
        if seen.contains("sleeping=0\n") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cancelled call's command still runs: {seen:?}"
        );
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(input);
    let status = bridge.wait().expect("wait");
    assert!(status.success(), "{status}");
}

/// A session answers only the tenant that opened it: another tenant that learned its id can
/// neither call its tools nor close it, and the session goes on with its own sandbox.
#[test]
fn another_tenant_cannot_use_or_close_a_session() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    let a = server.create_key(&admin, serde_json::json!({"name": "a", "tenant": "mcpa"}));
    let b = server.create_key(&admin, serde_json::json!({"name": "b", "tenant": "mcpb"}));
    let session = session_of(&initialize(&server, &a));
    let initialized = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    on_session(&server, &a, &session, initialized);
    let run = |key: &str, id: u64, command: &str| {
        on_session(
            &server,
            key,
            &session,
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": "run_command", "arguments": {"command": command}}}),
        )
    };
    let r = run(&a, 2, "echo mine > /tmp/mark && echo written");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("written"), "{}", r.text());

    let r = run(&b, 3, "echo theirs");
    assert_eq!(r.status, 404, "{}", r.text());
    let r = server
        .send(
            "DELETE",
            "/mcp",
            Some(&b),
            &[("Mcp-Session-Id", &session)],
            None,
        )
        .expect("DELETE /mcp");
    assert_eq!(r.status, 404, "{}", r.text());

    let r = run(&a, 4, "cat /tmp/mark");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("mine"), "{}", r.text());
}
