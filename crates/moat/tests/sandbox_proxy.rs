//! Sandbox traffic through `moat serve`'s one listener, as E2B's SDKs send it: routing on the
//! `E2b-Sandbox-*` headers, on `Host: <port>-<id>.<domain>` and on signed `/files` URLs; the
//! access token; Connect streams and file transfers through to the agent; user services
//! through the agent's TCP relay; and the 502 answers for ended sandboxes and closed ports.
//! Needs root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::need_root;
use support::server::*;

/// A sandbox made over `/v1`, reached as sandbox traffic.
struct Sandbox<'a> {
    server: &'a Server,
    id: String,
    token: String,
}

impl<'a> Sandbox<'a> {
    fn create(server: &'a Server, key: &str) -> Sandbox<'a> {
        let r = server.request("POST", "/v1/sandboxes", Some(key), Some(b"{}"));
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let sandbox = r.json();
        let id = sandbox["id"].as_str().expect("id").to_owned();
        let token = sandbox["access_token"]
            .as_str()
            .expect("create answers the access token")
            .to_owned();
        Sandbox { server, id, token }
    }

    /// A request routed by headers to `port`, with the access token unless `token` is false.
    fn send(
        &self,
        method: &str,
        path: &str,
        port: u16,
        token: bool,
        extra: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let port = port.to_string();
        let mut headers = vec![
            ("E2b-Sandbox-Id", self.id.as_str()),
            ("E2b-Sandbox-Port", port.as_str()),
        ];
        if token {
            headers.push(("X-Access-Token", self.token.as_str()));
        }
        headers.extend_from_slice(extra);
        self.server
            .send(method, path, None, &headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `Host: <port>-<id>.localhost:<server port>`, the default domain's sandbox address.
    fn host(&self, port: u16) -> String {
        format!("{port}-{}.localhost:{}", self.id, self.server.port)
    }

    /// Runs `shell` in the sandbox over `/v1` and expects success.
    fn exec(&self, key: &str, shell: &str) {
        let r = self.server.request(
            "POST",
            &format!("/v1/sandboxes/{}/exec", self.id),
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
}

/// A request's body as written on the wire.
enum Body<'a> {
    None,
    Chunked(&'a [&'a [u8]]),
}

/// A whole HTTP/1.1 request (`Connection: close`).
fn request_bytes(
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    let mut out = match body {
        Body::None => {
            out.push_str("\r\n");
            out.into_bytes()
        }
        Body::Chunked(chunks) => {
            out.push_str("Transfer-Encoding: chunked\r\n\r\n");
            let mut out = out.into_bytes();
            for chunk in chunks {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        }
    };
    out.shrink_to_fit();
    out
}

/// A Connect envelope: flag, big-endian length, JSON payload.
fn envelope(flag: u8, message: &Value) -> Vec<u8> {
    let payload = serde_json::to_vec(message).expect("json");
    let mut out = vec![flag];
    out.extend_from_slice(&u32::try_from(payload.len()).expect("len").to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// A response read as it arrives: the head, then chunks, then Connect envelopes.
struct Incremental {
    conn: TcpStream,
    buf: Vec<u8>,
    /// Dechunked bytes not yet taken as envelopes.
    body: Vec<u8>,
    ended: bool,
}

impl Incremental {
    fn new(conn: TcpStream) -> Incremental {
        // A bound on every read, so a proxy that buffers fails the test instead of hanging it.
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        Incremental {
            conn,
            buf: Vec::new(),
            body: Vec::new(),
            ended: false,
        }
    }

    fn fill(&mut self) {
        let mut piece = [0u8; 8192];
        let n = self.conn.read(&mut piece).expect("read the response");
        assert!(n > 0, "the connection closed early");
        self.buf.extend_from_slice(&piece[..n]);
    }

    fn take_until(&mut self, pattern: &[u8]) -> Vec<u8> {
        loop {
            if let Some(at) = self.buf.windows(pattern.len()).position(|w| w == pattern) {
                let out = self.buf[..at].to_vec();
                self.buf.drain(..at + pattern.len());
                return out;
            }
            self.fill();
        }
    }

    fn take_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill();
        }
        self.buf.drain(..n).collect()
    }

    /// The response head, lower-cased.
    fn head(&mut self) -> String {
        String::from_utf8_lossy(&self.take_until(b"\r\n\r\n")).to_ascii_lowercase()
    }

    /// Reads one more chunk into `body`; false at the end of the body.
    fn next_chunk(&mut self) -> bool {
        let line = self.take_until(b"\r\n");
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&line).trim(), 16).expect("chunk size");
        if size == 0 {
            self.take_until(b"\r\n");
            self.ended = true;
            return false;
        }
        let data = self.take_exact(size);
        self.take_exact(2);
        self.body.extend_from_slice(&data);
        true
    }

    /// The next envelope (flag, JSON), or `None` at the end of the body.
    fn next_envelope(&mut self) -> Option<(u8, Value)> {
        loop {
            if self.body.len() >= 5 {
                let len = u32::from_be_bytes(self.body[1..5].try_into().expect("4 bytes")) as usize;
                if self.body.len() >= 5 + len {
                    let flag = self.body[0];
                    let json =
                        serde_json::from_slice(&self.body[5..5 + len]).expect("envelope JSON");
                    self.body.drain(..5 + len);
                    return Some((flag, json));
                }
            }
            if self.ended || !self.next_chunk() {
                assert!(self.body.is_empty(), "a partial envelope at the end");
                return None;
            }
        }
    }
}

/// The stdout of a data event, if it is one.
fn stdout_of(event: &Value) -> Option<String> {
    let b64 = event["event"]["data"]["stdout"].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    Some(String::from_utf8(bytes).expect("utf-8"))
}

/// The `v1_` signature E2B's SDK puts in file URLs.
fn sign(path: &str, operation: &str, user: &str, token: &str, expiration: Option<i64>) -> String {
    let mut input = format!("{path}:{operation}:{user}:{token}");
    if let Some(exp) = expiration {
        input.push_str(&format!(":{exp}"));
    }
    let digest = Sha256::digest(input.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest);
    // Percent-encoded as Python's `quote` does (`/` stays).
    format!("v1_{}", sig.replace('+', "%2B").replace('=', "%3D"))
}

fn now_secs() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    i64::try_from(secs).expect("secs")
}

fn text(r: &Reply) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// Asserts envd's JSON error shape with this status.
fn assert_plain_error(r: &Reply, status: u16) {
    assert_eq!(r.status, status, "{}", text(r));
    let body = r.json();
    assert_eq!(body["code"], status, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[test]
fn envd_traffic() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let key = server.admin_key();
    let sbx = Sandbox::create(&server, &key);

    // The token is the same on get, and only create and get carry it.
    let got = server.request(
        "GET",
        &format!("/v1/sandboxes/{}", sbx.id),
        Some(&key),
        None,
    );
    assert_eq!(got.json()["access_token"], sbx.token.as_str());
    let list = server
        .request("GET", "/v1/sandboxes", Some(&key), None)
        .json();
    assert!(list["sandboxes"][0].get("access_token").is_none(), "{list}");

    // Health needs no token; the answer is envd's 204.
    let r = sbx.send("GET", "/health", 49983, false, &[], None);
    assert_eq!(r.status, 204, "{}", text(&r));
    // The control plane's own health is unaffected.
    assert_eq!(server.request("GET", "/healthz", None, None).status, 200);

    // Anything else needs the token.
    let list_rpc = |token: bool, extra: &[(&str, &str)]| {
        sbx.send(
            "POST",
            "/process.Process/List",
            49983,
            token,
            &[
                &[
                    ("Content-Type", "application/json"),
                    ("Connect-Protocol-Version", "1"),
                ],
                extra,
            ]
            .concat(),
            Some(b"{}"),
        )
    };
    assert_plain_error(&list_rpc(false, &[]), 401);
    assert_plain_error(&list_rpc(false, &[("X-Access-Token", "wrong")]), 401);
    // moat's API key is not a sandbox credential.
    let bearer = format!("Bearer {key}");
    assert_plain_error(&list_rpc(false, &[("Authorization", bearer.as_str())]), 401);
    let r = list_rpc(true, &[]);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(
        r.json()["processes"].is_array() || r.json() == json!({}),
        "{}",
        text(&r)
    );

    // A server-streaming RPC with a chunked request body: output streams as it happens (the
    // second line waits for a file created only after the first line was read).
    let script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second";
    let start = envelope(
        0,
        &json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}}),
    );
    let (head, rest) = start.split_at(3);
    let req = request_bytes(
        "POST",
        "/process.Process/Start",
        "127.0.0.1",
        &[
            ("E2b-Sandbox-Id", &sbx.id),
            ("E2b-Sandbox-Port", "49983"),
            ("X-Access-Token", &sbx.token),
            ("Content-Type", "application/connect+json"),
            ("Connect-Protocol-Version", "1"),
            ("Connect-Content-Encoding", "identity"),
            ("Connect-Accept-Encoding", "identity"),
            ("Connect-Timeout-Ms", "60000"),
            ("Keepalive-Ping-Interval", "50"),
            ("Authorization", "Basic dXNlcjo="), // "user:"
        ],
        Body::Chunked(&[head, rest]),
    );
    let mut conn = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    conn.write_all(&req).expect("write");
    let mut stream = Incremental::new(conn);
    let response_head = stream.head();
    assert!(response_head.starts_with("http/1.1 200"), "{response_head}");
    assert!(
        response_head.contains("content-type: application/connect+json"),
        "{response_head}"
    );
    assert!(
        response_head.contains("transfer-encoding: chunked"),
        "{response_head}"
    );
    let (flag, first) = stream.next_envelope().expect("start event");
    assert_eq!(flag, 0);
    assert!(first["event"]["start"]["pid"].as_u64().is_some(), "{first}");
    let mut out = String::new();
    while !out.contains("first\n") {
        let (_, event) = stream.next_envelope().expect("output");
        out.push_str(&stdout_of(&event).unwrap_or_default());
    }
    // Through the proxy too: an upload of the file the process waits for.
    let r = sbx.send(
        "POST",
        "/files?path=/tmp/go",
        49983,
        true,
        &[("Content-Type", "application/octet-stream")],
        Some(b"go"),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let mut ended = false;
    let mut end_stream = None;
    while let Some((flag, message)) = stream.next_envelope() {
        if flag == 2 {
            end_stream = Some(message);
            break;
        }
        out.push_str(&stdout_of(&message).unwrap_or_default());
        ended |= message["event"]["end"].is_object();
    }
    assert_eq!(out, "first\nsecond\n");
    assert!(ended, "no end event");
    assert_eq!(end_stream, Some(json!({})), "the end-stream frame");
    assert!(stream.next_envelope().is_none());

    // Files with the header: a chunked upload, a download.
    let upload = request_bytes(
        "POST",
        "/files?path=/home/user/up.txt",
        "127.0.0.1",
        &[
            ("E2b-Sandbox-Id", &sbx.id),
            ("E2b-Sandbox-Port", "49983"),
            ("X-Access-Token", &sbx.token),
            ("Content-Type", "application/octet-stream"),
        ],
        Body::Chunked(&[b"uploaded ", b"in chunks\n"]),
    );
    let r = server.raw(&upload).expect("upload");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()[0]["path"], "/home/user/up.txt");
    let r = sbx.send(
        "GET",
        "/files?path=/home/user/up.txt",
        49983,
        true,
        &[],
        None,
    );
    assert_eq!((r.status, text(&r).as_str()), (200, "uploaded in chunks\n"));
    assert_plain_error(
        &sbx.send(
            "GET",
            "/files?path=/home/user/up.txt",
            49983,
            false,
            &[],
            None,
        ),
        401,
    );

    // Signed URLs without any routing header: a write and a read that expire later, a read
    // that never expires, and refusals.
    let exp = now_secs() + 600;
    let path = "/home/user/signed file.txt";
    let quoted = "/home/user/signed%20file.txt";
    let url = format!(
        "/files?path={quoted}&username=user&signature={}&signature_expiration={exp}",
        sign(path, "write", "user", &sbx.token, Some(exp))
    );
    let r = server
        .send(
            "POST",
            &url,
            None,
            &[("Content-Type", "application/octet-stream")],
            Some(b"signed"),
        )
        .expect("signed upload");
    assert_eq!(r.status, 200, "{}", text(&r));
    let url = format!(
        "/files?path={quoted}&signature={}",
        sign(path, "read", "", &sbx.token, None)
    );
    let r = server
        .send("GET", &url, None, &[], None)
        .expect("signed download");
    assert_eq!((r.status, text(&r).as_str()), (200, "signed"));
    let past = now_secs() - 10;
    let url = format!(
        "/files?path={quoted}&signature={}&signature_expiration={past}",
        sign(path, "read", "", &sbx.token, Some(past))
    );
    let r = server.send("GET", &url, None, &[], None).expect("expired");
    assert_plain_error(&r, 401);
    // envd's own words, which clients may match.
    assert_eq!(r.json()["message"], "signature is already expired");
    // A read signature does not write; a signature made with another token matches nothing.
    let url = format!(
        "/files?path={quoted}&signature={}",
        sign(path, "read", "", &sbx.token, None)
    );
    assert_plain_error(
        &server
            .send("POST", &url, None, &[], Some(b"x"))
            .expect("post"),
        401,
    );
    let url = format!(
        "/files?path={quoted}&signature={}",
        sign(path, "read", "", "guess", None)
    );
    assert_plain_error(
        &server.send("GET", &url, None, &[], None).expect("guess"),
        401,
    );
    // A path longer than any file's is refused before it is hashed under every token.
    let long = format!("/{}", "a".repeat(4096));
    let url = format!(
        "/files?path={long}&signature={}",
        sign(&long, "read", "", &sbx.token, None)
    );
    let r = server
        .send("GET", &url, None, &[], None)
        .expect("long path");
    assert_plain_error(&r, 400);
    assert!(
        r.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("at most 4096")),
        "{}",
        text(&r)
    );
    // With routing headers, a signature works in place of the token too.
    let url = format!(
        "/files?path={quoted}&signature={}",
        sign(path, "read", "", &sbx.token, None)
    );
    let r = sbx.send("GET", &url, 49983, false, &[], None);
    assert_eq!((r.status, text(&r).as_str()), (200, "signed"));

    // Host-header routing.
    let host = sbx.host(49983);
    let r = server
        .raw(&request_bytes("GET", "/health", &host, &[], Body::None))
        .expect("host health");
    assert_eq!(r.status, 204, "{}", text(&r));
    let r = server
        .raw(&request_bytes(
            "GET",
            "/files?path=/home/user/up.txt",
            &host,
            &[("X-Access-Token", &sbx.token)],
            Body::None,
        ))
        .expect("host download");
    assert_eq!((r.status, text(&r).as_str()), (200, "uploaded in chunks\n"));

    // envd's internal routes, and the agent's own, are not reachable from outside.
    for path in [
        "/init",
        "/freeze",
        "/relay/tcp?port=22",
        "/interpreter/health",
    ] {
        let r = sbx.send("POST", path, 49983, true, &[], Some(b"{}"));
        assert_plain_error(&r, 403);
    }

    // Port 49999 reaches the agent under /interpreter (the code interpreter's own routes),
    // with a token on every route (see sandbox_tokens.rs).
    assert_plain_error(&sbx.send("GET", "/health", 49999, false, &[], None), 401);
    let r = sbx.send("GET", "/health", 49999, true, &[], None);
    assert!(
        r.status == 200 || (r.status == 404 && text(&r).contains("/interpreter/health")),
        "{} {}",
        r.status,
        text(&r)
    );

    // A malformed routing header is a 400, not a pass to the API.
    let r = server
        .send("GET", "/health", None, &[("E2b-Sandbox-Id", &sbx.id)], None)
        .expect("no port");
    assert_plain_error(&r, 400);

    // An ended sandbox, and one that never was: envd's "not found" answer.
    let r = server.request(
        "DELETE",
        &format!("/v1/sandboxes/{}", sbx.id),
        Some(&key),
        None,
    );
    assert_eq!(r.status, 204);
    let r = sbx.send("GET", "/health", 49983, false, &[], None);
    assert_eq!(r.status, 502, "{}", text(&r));
    assert_eq!(
        r.json(),
        json!({"sandboxId": sbx.id, "message": "The sandbox was not found", "code": 502})
    );
    let r = sbx.send(
        "POST",
        "/process.Process/List",
        49983,
        true,
        &[],
        Some(b"{}"),
    );
    assert_eq!(r.json()["message"], "The sandbox was not found");
}

/// Serves POST and GET with a JSON echo of the request's headers and body (chunked bodies
/// decoded), on the port given as its argument.
const ECHO_SERVER: &str = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        out = json.dumps({"headers": headers, "body": body.decode()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
"#;

#[test]
fn user_services() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let key = server.admin_key();
    let sbx = Sandbox::create(&server, &key);

    // Content for a static web server, and an echo server, put there through the proxy.
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    for (path, data) in [
        ("/home/user/www/hello.txt", &b"hello from the sandbox\n"[..]),
        ("/home/user/www/big.bin", &big[..]),
        ("/home/user/echo.py", ECHO_SERVER.as_bytes()),
    ] {
        let r = sbx.send(
            "POST",
            &format!("/files?path={path}"),
            49983,
            true,
            &[("Content-Type", "application/octet-stream")],
            Some(data),
        );
        assert_eq!(r.status, 200, "{path}: {}", text(&r));
    }
    sbx.exec(
        &key,
        "cd /home/user/www && setsid /usr/bin/python3 -m http.server 8000 --bind 127.0.0.1 \
         </dev/null >/dev/null 2>&1 & \
         setsid /usr/bin/python3 /home/user/echo.py 8001 </dev/null >/dev/null 2>&1 &",
    );
    // Until both listen (a wait with a generous bound, not a speed check).
    let deadline = Instant::now() + Duration::from_secs(60);
    for port in [8000, 8001] {
        loop {
            let r = sbx.send("GET", "/", port, true, &[], None);
            if r.status != 502 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "port {port} never opened: {}",
                text(&r)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // The web server by its address, and by headers (with either token header).
    let r = server
        .raw(&request_bytes(
            "GET",
            "/hello.txt",
            &sbx.host(8000),
            &[("X-Access-Token", &sbx.token)],
            Body::None,
        ))
        .expect("by host");
    assert_eq!(
        (r.status, text(&r).as_str()),
        (200, "hello from the sandbox\n")
    );
    let r = sbx.send(
        "GET",
        "/big.bin",
        8000,
        false,
        &[("E2B-Traffic-Access-Token", &sbx.token)],
        None,
    );
    assert_eq!(r.status, 200);
    assert!(
        r.body == big,
        "the 1 MiB file came back changed ({} bytes)",
        r.body.len()
    );
    // A sandbox's services are public unless it was made private (see sandbox_tokens.rs):
    // no token is needed.
    let r = sbx.send("GET", "/hello.txt", 8000, false, &[], None);
    assert_eq!(
        (r.status, text(&r).as_str()),
        (200, "hello from the sandbox\n")
    );

    // What the service receives: the chunked body, the client's host and own headers, and
    // none of moat's credentials, the routing headers or the access token.
    let bearer = format!("Bearer {key}");
    let r = server
        .raw(&request_bytes(
            "POST",
            "/echo?x=1",
            &sbx.host(8001),
            &[
                ("X-Access-Token", &sbx.token),
                ("Authorization", &bearer),
                ("X-API-KEY", &key),
                ("X-Custom", "kept"),
                ("E2b-Sandbox-Id", &sbx.id),
                ("E2b-Sandbox-Port", "8001"),
            ],
            Body::Chunked(&[b"part one, ", b"part two"]),
        ))
        .expect("echo");
    assert_eq!(r.status, 200, "{}", text(&r));
    let echo = r.json();
    assert_eq!(echo["body"], "part one, part two");
    let headers = &echo["headers"];
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(headers["host"], sbx.host(8001).as_str());
    for gone in [
        "authorization",
        "x-api-key",
        "x-access-token",
        "e2b-sandbox-id",
        "e2b-sandbox-port",
    ] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} reached the service: {headers}"
        );
    }
    // A Basic user passes (it is not moat's credential).
    let r = sbx.send(
        "GET",
        "/",
        8001,
        true,
        &[("Authorization", "Basic dXNlcjo=")],
        None,
    );
    assert_eq!(r.json()["headers"]["authorization"], "Basic dXNlcjo=");

    // A closed port, and an upgrade.
    let r = sbx.send("GET", "/", 8002, true, &[], None);
    assert_eq!(r.status, 502, "{}", text(&r));
    assert_eq!(
        r.json(),
        json!({
            "sandboxId": sbx.id,
            "message": "The sandbox is running but port is not open",
            "port": 8002,
            "code": 502
        })
    );
    let r = sbx.send(
        "GET",
        "/",
        8000,
        true,
        &[("Connection", "Upgrade"), ("Upgrade", "websocket")],
        None,
    );
    assert_plain_error(&r, 501);
}

#[test]
fn domain_is_checked() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args([
            "serve",
            "--domain",
            "http://sandboxes.example.com",
            "--data-dir",
            "/nonexistent",
        ])
        .output()
        .expect("run moat serve");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--domain") && stderr.contains("not a URL"),
        "{stderr}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["serve", "--domain", "e2b.app", "--data-dir", "/nonexistent"])
        .output()
        .expect("run moat serve");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("E2B's own domain"));
}
