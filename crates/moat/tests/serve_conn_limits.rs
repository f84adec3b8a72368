//! The listener's defences without a key: half-sent requests (slowloris) are closed after the
//! header-read timeout, a flood of them past the connection cap does not keep `/healthz` out,
//! and the server raises its open-file limit at start. `moat serve` and `moat check` refuse a
//! hard open-file limit too low for sandboxes, saying what to set. Needs root (the native
//! backend); skips otherwise.

use moat_test_support as support;
use support::need_root;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::server::{Reply, sigterm, wait_exit};

/// Sets this process's open-file limit.
fn set_nofile(soft: u64, hard: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit; setrlimit touches nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `moat` with `args`, started with an open-file limit of `soft`/`hard`.
fn moat_with_nofile(args: &[&str], soft: u64, hard: u64) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat"));
    cmd.args(args);
    // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
    unsafe {
        cmd.pre_exec(move || set_nofile(soft, hard));
    }
    cmd
}

/// The soft and hard `Max open files` of process `pid`.
fn nofile_of(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let mut nums = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    (nums.next().expect("soft"), nums.next().expect("hard"))
}

/// A `GET /healthz` on a new connection, giving up on the answer after `wait`.
fn healthz(port: u16, wait: Duration) -> std::io::Result<Reply> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(wait))?;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    Reply::parse(&raw)
}

struct Served {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            sigterm(&self.child);
            let _ = wait_exit(&mut self.child);
        }
    }
}

/// `moat serve` on a fresh data dir and a free port, started with the given open-file limit.
fn serve_with_nofile(soft: u64, hard: u64) -> Served {
    let dir = tempfile::Builder::new()
        .prefix("moat-serve-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let child = moat_with_nofile(
        &[
            "serve",
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().expect("path"),
            "--log-format",
            "json",
        ],
        soft,
        hard,
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn moat serve");
    let mut served = Served {
        child,
        port,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = served.child.try_wait() {
            panic!("moat serve exited during start-up: {status}");
        }
        if healthz(port, Duration::from_secs(5)).is_ok_and(|r| r.status == 200) {
            return served;
        }
        assert!(Instant::now() < deadline, "moat serve never became healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the server closed `conn` (end of file or reset) within `wait`.
fn closed_within(conn: &mut TcpStream, wait: Duration) -> bool {
    conn.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            // An answer (a timeout's error page) before the close is fine.
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn half_sent_requests_neither_stop_healthz_nor_stay_open() {
    need_root!();
    // A soft limit of 256 as a login shell might give; the hard one just allows sandboxes.
    let server = serve_with_nofile(256, 4096);
    assert_eq!(
        nofile_of(server.child.id()),
        (4096, 4096),
        "the server did not raise its soft open-file limit to the hard one"
    );
    let cap = 4096 / 4;

    // More half-sent requests than the server may hold connections, from one client without
    // a key. (This process needs a descriptor for each.)
    let (_, hard) = {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, writable rlimit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        (lim.rlim_cur, lim.rlim_max)
    };
    set_nofile(hard, hard).expect("raise this test's open-file limit");
    let flood = cap + 100;
    assert!(
        hard as usize > flood + 64,
        "this test needs {flood} descriptors"
    );
    let mut half_sent = Vec::with_capacity(flood);
    for _ in 0..flood {
        let mut conn = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc")
            .expect("half a request");
        half_sent.push(conn);
    }

    // The server still answers.
    let r = healthz(server.port, Duration::from_secs(60))
        .expect("/healthz did not answer beside the half-sent requests");
    assert_eq!(r.status, 200);

    // Every half-sent request is closed: the oldest at once to make room, the others after
    // the header-read timeout.
    let open = half_sent
        .iter_mut()
        .map(|c| closed_within(c, Duration::from_secs(120)))
        .filter(|closed| !closed)
        .count();
    assert_eq!(open, 0, "{open} half-sent requests were left open");

    // A keep-alive connection that stays idle is closed the same way; a whole request is served.
    let mut idle = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut answer = [0u8; 12];
    idle.read_exact(&mut answer).expect("an answer");
    assert_eq!(&answer, b"HTTP/1.1 200");
    assert!(
        closed_within(&mut idle, Duration::from_secs(120)),
        "an idle keep-alive connection was left open"
    );
    let r = healthz(server.port, Duration::from_secs(60)).expect("/healthz");
    assert_eq!(r.status, 200);
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run moat")
}

#[test]
fn a_hard_open_file_limit_too_low_for_sandboxes_is_refused_with_what_to_set() {
    need_root!();
    let dir = tempfile::Builder::new()
        .prefix("moat-serve-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data = dir.path().join("data");
    let mut child = moat_with_nofile(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("path"),
        ],
        1024,
        1024,
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn moat serve");
    // A server that does not refuse runs until stopped: stop it and say so.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() >= deadline {
            sigterm(&child);
            let _ = wait_exit(&mut child);
            panic!("moat serve started with a hard open-file limit of 1024");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("RLIMIT_NOFILE") && stderr.contains("LimitNOFILE="),
        "{stderr}"
    );
    assert!(
        !Path::new(&data).exists(),
        "the refused server made its data dir"
    );

    let out = run(&mut moat_with_nofile(&["check"], 1024, 1024));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("open files"))
        .unwrap_or_else(|| panic!("no open-file line: {stdout}"));
    assert!(
        line.contains(" no ") && line.contains("ulimit -Hn"),
        "{line}"
    );

    let out = run(&mut moat_with_nofile(&["check"], 1024, 4096));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("open files") && l.contains(" yes ")),
        "{stdout}"
    );
}

/// One answer read from a keep-alive connection: its status line and body, by its
/// `content-length`; `None` when the server closed the connection first.
fn read_answer(conn: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => raw.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&raw).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).ok()?;
    Some((head.lines().next().unwrap_or("").to_owned(), body))
}

#[test]
fn a_body_the_handler_does_not_read_does_not_close_the_connection() {
    need_root!("moat serve's native backend needs root");
    let server = support::server::Server::start();
    let key = server.admin_key();
    let mut conn = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // A cancel reads no body; clients send `{}` anyway, and its bytes may come after the
    // head (a second TCP segment, late under load).
    for round in 0..2 {
        let head = format!(
            "POST /v1/builds/b-aaaaaaaaaaaaaaaa/cancel HTTP/1.1\r\nHost: localhost\r\n\
             Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
             Content-Length: 2\r\n\r\n"
        );
        let closed = |e: std::io::Error| panic!("round {round}: the connection was closed: {e}");
        conn.write_all(head.as_bytes()).unwrap_or_else(closed);
        std::thread::sleep(Duration::from_millis(200));
        conn.write_all(b"{}").unwrap_or_else(closed);
        let (status, body) = read_answer(&mut conn)
            .unwrap_or_else(|| panic!("round {round}: the server closed the connection"));
        assert!(
            status.contains(" 404 "),
            "{status}: {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    // Nor does the sandbox proxy's refusal of a call to a sandbox that does not run.
    let head = "POST /process.Process/Start HTTP/1.1\r\nHost: localhost\r\n\
                E2b-Sandbox-Id: aaaaaaaaaaaaaaaaaaaa\r\nContent-Type: application/json\r\n\
                Content-Length: 2\r\n\r\n";
    let closed = |e: std::io::Error| panic!("the proxy's refusal closed the connection: {e}");
    conn.write_all(head.as_bytes()).unwrap_or_else(closed);
    std::thread::sleep(Duration::from_millis(200));
    conn.write_all(b"{}").unwrap_or_else(closed);
    let (status, _) = read_answer(&mut conn).expect("the proxy closed the connection");
    let code: u16 = status
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    assert!((400..600).contains(&code), "a refusal, not {status}");
    // The connection still serves what comes next.
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("healthz");
    let (status, _) = read_answer(&mut conn).expect("the connection was closed");
    assert!(status.contains(" 200 "), "{status}");
    // A small body held back is given up on after the header-read timeout, as a head is.
    conn.write_all(b"POST /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\n{}")
        .expect("a body cut short");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let began = Instant::now();
    let (status, body) = read_answer(&mut conn).expect("no answer");
    assert!(status.contains(" 408 "), "{status}");
    assert!(
        String::from_utf8_lossy(&body).contains("did not arrive"),
        "{body:?}"
    );
    assert!(
        began.elapsed() >= Duration::from_secs(9),
        "{:?}",
        began.elapsed()
    );
}

/// One request on a new connection with `key`, its answer read to the end.
fn keyed(port: u16, method: &str, path: &str, key: &str, body: &str) -> Reply {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).expect("send");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).expect("read");
    Reply::parse(&raw).expect("an HTTP answer")
}

/// A tenant's requests in flight are capped at an eighth of the connections the listener
/// allows: one that stalls as many as it may (bodies announced and never sent) gets `429`
/// for one more, while another tenant is served, and gets its room back as they end. Requests
/// to its public services, which anyone may send, have a room of their own.
#[test]
fn one_tenant_s_stalled_requests_leave_room_for_others() {
    need_root!();
    // 4,096 open files: 1,024 connections, 128 requests in flight per tenant.
    let server = serve_with_nofile(4096, 4096);
    let admin = std::fs::read_to_string(server._dir.path().join("data/admin.key"))
        .expect("admin key")
        .trim()
        .to_owned();
    let key_of = |tenant: &str| {
        let body = format!(r#"{{"name": "k", "tenant": "{tenant}"}}"#);
        let r = keyed(server.port, "POST", "/v1/keys", &admin, &body);
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["secret"].as_str().expect("secret").to_owned()
    };
    let (greedy, other) = (key_of("greedy"), key_of("other"));
    // More than the cap: the polls below take places too while these arrive, so a few of
    // these may be the ones refused.
    let stalled = send_heads(
        server.port,
        140,
        &format!(
            "POST /v1/sandboxes/nope/exec HTTP/1.1\r\nHost: localhost\r\n\
             Authorization: Bearer {greedy}\r\nContent-Type: application/json\r\n\
             Content-Length: 200000\r\n\r\n"
        ),
    );
    // Each stalled request is in flight once its key has been checked.
    let capped = std::panic::catch_unwind(|| {
        until_status(
            server.port,
            &greedy,
            429,
            200,
            "the stalled requests were never capped",
        )
    });
    let mut stalled = stalled;
    let r = match capped {
        Ok(r) => r,
        Err(e) => {
            // What the requests that should be stalled got instead (a refusal, a close),
            // to tell that from a miscount.
            eprintln!(
                "answers to the stalled requests: {:?}",
                early_answers(&mut stalled)
            );
            std::panic::resume_unwind(e);
        }
    };
    assert!(r.text().contains("requests in flight"), "{}", r.text());
    let r = keyed(server.port, "GET", "/v1/sandboxes", &other, "");
    assert_eq!(r.status, 200, "another tenant was kept out: {}", r.text());
    // Ended, each seen closed (its place is given back once its answer is sent), so that all
    // of the tenant's room is back before the next part.
    for mut conn in stalled {
        let _ = conn.shutdown(std::net::Shutdown::Write);
        assert!(
            closed_within(&mut conn, Duration::from_secs(10)),
            "an ended request stayed open"
        );
    }
    wait_for_room(server.port, &greedy);

    // Its sandbox's public service that never answers: anyone may send it requests, without
    // a key. They are capped in a room of their own, which leaves the owner's room alone.
    let r = keyed(server.port, "POST", "/v1/sandboxes", &greedy, "{}");
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    // Started in the background; the exec ends once it listens (at most 20 s).
    let silent = "nohup python3 -c 'import socket, time\ns = socket.socket()\n\
                  s.bind((\"0.0.0.0\", 8080))\ns.listen(512)\n\
                  open(\"/tmp/listening\", \"w\").close()\ntime.sleep(600)' \
                  >/dev/null 2>&1 &\n\
                  i=0; while [ ! -e /tmp/listening ] && [ $i -lt 400 ]; do \
                  sleep 0.05; i=$((i+1)); done; test -e /tmp/listening";
    let exec = format!(r#"{{"shell": {}}}"#, serde_json::Value::from(silent));
    let r = keyed(
        server.port,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &greedy,
        &exec,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["exit_code"],
        0,
        "the service never listened: {}",
        r.text()
    );
    let head = format!(
        "GET / HTTP/1.1\r\nHost: 8080-{id}.localhost:{}\r\n\r\n",
        server.port
    );
    let mut waiting = send_heads(server.port, 128, &head);
    // One more at a time until one is refused: each that gets in waits on the silent
    // service, holding its place.
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let mut conn = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
        conn.write_all(head.as_bytes()).expect("send");
        conn.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        match conn.read(&mut buf) {
            Ok(n) if n > 0 => break String::from_utf8_lossy(&buf[..n]).into_owned(),
            _ => waiting.push(conn),
        }
        if Instant::now() > deadline {
            eprintln!(
                "answers to the service's requests: {:?}",
                early_answers(&mut waiting)
            );
            panic!("requests to a public service were never capped");
        }
    };
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("public services"), "{refused}");
    // The owner, and another tenant, are not held back by them.
    let r = keyed(server.port, "GET", "/v1/sandboxes", &greedy, "");
    assert_eq!(r.status, 200, "the owner was kept out: {}", r.text());
    let r = keyed(server.port, "GET", "/v1/sandboxes", &other, "");
    assert_eq!(r.status, 200, "another tenant was kept out: {}", r.text());
    drop(waiting);
}

/// The status lines of the answers that have come on `conns` (each read for at most 100 ms),
/// counted.
fn early_answers(conns: &mut [TcpStream]) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for conn in conns {
        let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = [0u8; 256];
        let line = match conn.read(&mut buf) {
            Ok(0) => "closed".to_owned(),
            Ok(n) => String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            Err(_) => "no answer (waiting)".to_owned(),
        };
        *seen.entry(line).or_default() += 1;
    }
    seen
}

/// Waits until `key`'s tenant has room for a request again.
fn wait_for_room(port: u16, key: &str) {
    until_status(port, key, 200, 429, "the tenant's room never came back");
}

/// Opens `count` connections to `port` and sends `head` on each, no more.
fn send_heads(port: u16, count: usize, head: &str) -> Vec<TcpStream> {
    (0..count)
        .map(|_| {
            let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            conn.write_all(head.as_bytes()).expect("send");
            conn
        })
        .collect()
}

/// Lists `key`'s sandboxes every 50 ms until the answer is `want` (each one before it
/// `meanwhile`), for at most 30 s (then fails with `what`); that answer.
fn until_status(port: u16, key: &str, want: u16, meanwhile: u16, what: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = keyed(port, "GET", "/v1/sandboxes", key, "");
        if r.status == want {
            return r;
        }
        assert_eq!(r.status, meanwhile, "{}", r.text());
        assert!(Instant::now() < deadline, "{what}: {}", r.text());
        std::thread::sleep(Duration::from_millis(50));
    }
}
