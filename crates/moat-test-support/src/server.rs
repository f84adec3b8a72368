//! A real `moat serve` on a free port and a tiny HTTP/1.1 client for it, for the tests that
//! drive the server over HTTP.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

// Tests that drive a server look at its sandboxes from the host too.
pub use crate::host::{cgroup_dirs, pids_in_sandbox};

/// A running `moat serve`; SIGTERMed and reaped on drop so a failing test leaves no server.
pub struct Server {
    /// The `moat serve` process.
    pub child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// Its data directory.
    pub data: PathBuf,
    /// Where its log goes (appended to across restarts in the same directory); its tail is
    /// printed when a test fails, after the failure's own message.
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts a server on a fresh data dir.
    pub fn start() -> Server {
        let dir = tempfile::Builder::new()
            .prefix("moat-serve-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let data = dir.path().join("data");
        Server::start_in(dir, data)
    }

    /// Starts a server on a fresh data dir with extra `moat serve` options.
    pub fn start_with(extra: &[&str]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("moat-serve-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let data = dir.path().join("data");
        Server::start_in_with(dir, data, extra)
    }

    /// Starts a server on the data dir `data` (inside `dir`, which it keeps alive).
    pub fn start_in(dir: tempfile::TempDir, data: PathBuf) -> Server {
        Server::start_in_with(dir, data, &[])
    }

    /// Starts a server on the data dir `data` (inside `dir`) with extra `moat serve` options.
    pub fn start_in_with(dir: tempfile::TempDir, data: PathBuf, extra: &[&str]) -> Server {
        Server::start_in_with_env(dir, data, extra, &[])
    }

    /// [`Server::start_in_with`] with extra environment variables for the server.
    pub fn start_in_with_env(
        dir: tempfile::TempDir,
        data: PathBuf,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        // A port the kernel just handed out is very likely still free a moment later.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        Server::start_at(dir, data, extra, env, port)
    }

    /// Starts a server on the data dir `data` (inside `dir`) listening on `port`: a restart
    /// where its clients expect it.
    pub fn start_in_on_port(dir: tempfile::TempDir, data: PathBuf, port: u16) -> Server {
        Server::start_at(dir, data, &[], &[], port)
    }

    fn start_at(
        dir: tempfile::TempDir,
        data: PathBuf,
        extra: &[&str],
        env: &[(&str, &str)],
        port: u16,
    ) -> Server {
        let log = dir.path().join("serve.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("server log");
        let child = Command::new(crate::moat_binary())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(&data)
            .args(["--log-format", "json"])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn moat serve");
        let mut server = Server {
            child,
            port,
            data,
            log,
            _dir: dir,
        };
        // A generous deadline for start-up on a loaded machine; not a speed check.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "moat serve exited during start-up: {status}\n{}",
                    log_tail(&server.log, 40)
                );
            }
            if let Ok(r) = server.try_request("GET", "/healthz", None, None)
                && r.status == 200
            {
                break;
            }
            assert!(Instant::now() < deadline, "moat serve never became healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// Creates a sandbox of the default template with `key` (`POST /v1/sandboxes {}`), which
    /// must succeed, and returns its id.
    pub fn create_sandbox(&self, key: &str) -> String {
        self.create_sandbox_with(key, serde_json::json!({}))
    }

    /// Creates a sandbox as `req` asks (`POST /v1/sandboxes`) with `key`, which must succeed,
    /// and returns its id.
    pub fn create_sandbox_with(&self, key: &str, req: Value) -> String {
        let r = self.request("POST", "/v1/sandboxes", Some(key), Some(&body(req)));
        assert_eq!(r.status, 201, "create: {}", r.text());
        r.json()["id"].as_str().expect("id").to_owned()
    }

    /// Creates an API key as `req` asks (`POST /v1/keys`) with the admin key `admin`, which
    /// must succeed, and returns its secret.
    pub fn create_key(&self, admin: &str, req: Value) -> String {
        let r = self.request("POST", "/v1/keys", Some(admin), Some(&body(req)));
        assert_eq!(r.status, 201, "key: {}", r.text());
        r.json()["secret"].as_str().expect("secret").to_owned()
    }

    /// Creates template `name` of `spec` (`POST /v1/templates`) with `key`, which must succeed.
    pub fn create_template(&self, key: &str, name: &str, spec: Value) {
        let req = serde_json::json!({ "name": name, "spec": spec });
        let r = self.request("POST", "/v1/templates", Some(key), Some(&body(req)));
        assert_eq!(r.status, 201, "template {name}: {}", r.text());
    }

    /// Runs `script` with the sandbox's shell (a buffered exec), which must be answered 200,
    /// and returns the answer.
    pub fn shell(&self, key: &str, id: &str, script: &str) -> Value {
        let r = self.request(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(key),
            Some(&body(serde_json::json!({ "shell": script }))),
        );
        assert_eq!(r.status, 200, "exec in {id}: {}", r.text());
        r.json()
    }

    /// Runs the `moat` command line against this server with `key`, which must succeed, and
    /// returns its standard output.
    pub fn cli(&self, key: &str, args: &[&str]) -> String {
        let out = Command::new(crate::moat_binary())
            .args(args)
            .env("MOAT_URL", format!("http://127.0.0.1:{}", self.port))
            .env("MOAT_API_KEY", key)
            .stdin(Stdio::null())
            .output()
            .expect("run moat");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "moat {args:?}: {:?}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// The admin API key the server wrote to its data dir on first start.
    pub fn admin_key(&self) -> String {
        let path = self.data.join("admin.key");
        let text = std::fs::read_to_string(&path).expect("admin.key");
        text.trim().to_owned()
    }

    /// One request with `key` as bearer token (a body goes as JSON), read to the end; panics
    /// when the connection fails.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&[u8]>,
    ) -> Reply {
        self.try_request(method, path, key, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// One request on its own connection (`Connection: close`), read to the end.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&[u8]>,
    ) -> std::io::Result<Reply> {
        let json = [("Content-Type", "application/json")];
        let headers: &[(&str, &str)] = if body.is_some() { &json } else { &[] };
        self.send(method, path, key, headers, body)
    }

    /// One request with extra headers (a body gets its Content-Length), read to the end;
    /// a chunked answer is decoded.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> std::io::Result<Reply> {
        let bearer = key.map(|key| format!("Bearer {key}"));
        let mut all: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| ("Authorization", b))
            .into_iter()
            .collect();
        all.extend_from_slice(headers);
        http_send(self.port, method, path, &all, body)
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` with `headers` (a body gets its Content-Length),
/// read to the end; a chunked answer is decoded.
pub fn http_send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Reply> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    if let Some(body) = body {
        // A server refusing an oversized body may stop reading it; its answer still counts.
        if let Err(e) = conn.write_all(body) {
            eprintln!("writing the body of {method} {path}: {e}");
        }
    }
    read_reply(&mut conn)
}

/// Reads an answer to the end of the connection. A reset after some bytes still counts: a server
/// refusing an oversized body may close before reading it.
fn read_reply(conn: &mut TcpStream) -> std::io::Result<Reply> {
    let mut raw = Vec::new();
    match conn.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    Reply::parse(&raw)
}

impl Server {
    /// Sends `request` (a whole HTTP/1.1 request, head and body, as written) on its own
    /// connection and reads the answer to the end; a chunked answer is decoded. The request
    /// should say `Connection: close`.
    pub fn raw(&self, request: &[u8]) -> std::io::Result<Reply> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.port))?;
        conn.write_all(request)?;
        read_reply(&mut conn)
    }

    /// SIGKILLs the server, as a crash would, and hands back its data dir.
    pub fn kill9(mut self) -> (tempfile::TempDir, PathBuf) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.hand_back()
    }

    /// Stops the server with SIGTERM (a graceful shutdown), waits for it to exit 0, and hands
    /// back its data dir.
    pub fn stop(mut self) -> (tempfile::TempDir, PathBuf) {
        sigterm(&self.child);
        let status = wait_exit(&mut self.child);
        assert!(status.success(), "moat serve exited with {status}");
        self.hand_back()
    }

    fn hand_back(&mut self) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::Builder::new()
            .tempdir_in("/tmp")
            .expect("tempdir");
        let data = self.data.clone();
        // Keep the real directory: swap a throwaway one in for the Drop of `self`.
        let real = std::mem::replace(&mut self._dir, dir);
        (real, data)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            sigterm(&self.child);
            let _ = self.child.wait();
        }
        // Only a failing test needs the server's side of the story, and only its end.
        if std::thread::panicking() {
            eprintln!(
                "--- the end of moat serve's log ({}) ---\n{}",
                self.log.display(),
                log_tail(&self.log, 80)
            );
        }
    }
}

/// The last `lines` lines of the log at `path` (or why it cannot be read).
fn log_tail(path: &std::path::Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(no log: {e})"),
    }
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &Child) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// An HTTP answer, read to the end.
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The status line and headers, lower-cased (for matching).
    pub headers: String,
    /// The status line and headers as sent (header values are case-sensitive).
    pub head: String,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Reply {
    /// Parses a whole HTTP/1.1 answer, head and body.
    pub fn parse(raw: &[u8]) -> std::io::Result<Reply> {
        let bad = |m: &str| std::io::Error::new(ErrorKind::InvalidData, m.to_owned());
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| bad("no end of headers"))?;
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let headers = head.to_ascii_lowercase();
        let status = headers
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status"))?;
        let mut body = raw[split + 4..].to_vec();
        if headers.contains("transfer-encoding: chunked") {
            body = dechunk(&body).ok_or_else(|| bad("malformed chunked body"))?;
        }
        Ok(Reply {
            status,
            headers,
            head,
            body,
        })
    }

    /// The value of header `name` (any case), as sent, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body as text (invalid UTF-8 replaced), for messages and text answers.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics (showing it) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }

    /// Asserts a JSON error with this status and code.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert!(
            self.headers.contains("content-type: application/json"),
            "{}",
            self.headers
        );
        let body = self.json();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
}

/// Waits (up to a minute) for `child`, which was asked to stop, to exit.
pub fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "moat serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `v` as a JSON request body.
pub fn body(v: Value) -> Vec<u8> {
    serde_json::to_vec(&v).expect("json")
}

/// The payload of a complete chunked body.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}
