//! A7 of the threat checklist: the agent → host channel under abuse.
//!
//! The agent runs inside the sandbox, so a compromised sandbox speaks for it. Here a fake agent on
//! the far end of a socketpair misbehaves, written either as raw HTTP/2 bytes (for frame-level
//! abuse) or with the `h2` crate as a server (for well-formed but hostile answers). Every call
//! must end with a typed [`AgentError`]: no panic, no wait past the call's deadline, and the
//! host's memory stays bounded however much the agent sends.
//!
//! Deadline cases run on tokio's paused clock, which jumps forward whenever every task waits: a
//! 90-second idle limit costs nothing, and no outcome depends on the machine's speed.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use h2::SendStream;
use h2::server::SendResponse;
use moat_engine::agent_client::{
    AgentClient, AgentError, CallOptions, DEFAULT_UNARY_TIMEOUT, HEALTH_TIMEOUT, MAX_ERROR_BODY,
    MAX_RESPONSE_MESSAGE, ProcessStream, STREAM_IDLE_LIMIT,
};
use moat_proto::connect::{self, Code};
use moat_proto::process::process_event::{
    DataEvent, EndEvent, Event, KeepAlive, StartEvent, data_event,
};
use moat_proto::process::process_selector::Selector;
use moat_proto::process::{ProcessConfig, ProcessEvent, StartRequest, StartResponse};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Notify, mpsc};

/// Backstop for calls whose deadline is the client's own: far past every deadline the client
/// sets (30 s calls, 90 s stream idle limit), so only a missing deadline trips it.
const HANG: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------------------------
// Harness

thread_local! {
    // `#[tokio::test]` runs every task on the test's thread, so panics of the client's
    // connection task (which tokio would otherwise swallow) land here.
    static PANICS: Cell<usize> = const { Cell::new(0) };
}

/// Counts panics on this thread from now on (tokio catches panics of spawned tasks).
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| p.set(p.get() + 1));
            previous(info);
        }));
    });
}

fn assert_no_panics() {
    assert_eq!(PANICS.with(Cell::get), 0, "a task panicked");
}

/// `fut`, which must finish within [`HANG`].
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {HANG:?}, the deadline is missing"))
}

fn start_request() -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/true".into(),
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    }
}

fn no_deadline() -> CallOptions {
    CallOptions::default()
}

fn deadline(t: Duration) -> CallOptions {
    CallOptions {
        user: None,
        timeout: Some(t),
    }
}

/// This process's resident set and its peak so far, in bytes (`/proc/self/status`).
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("{name} missing from /proc/self/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// Raw HTTP/2 -----------------------------------------------------------------------------------

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// HPACK static table entries 9 and 8.
const STATUS_204: u8 = 0x80 | 9;
const STATUS_200: u8 = 0x80 | 8;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    assert!(len < 1 << 24);
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = pairs
        .iter()
        .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

/// An HPACK integer with an `n`-bit prefix, the prefix's other bits set from `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// An HPACK "literal header field without indexing, new name", without Huffman coding.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend(value);
}

/// The agent's end of a connection spoken in raw bytes. A task reads (and drops) everything the
/// client sends, so the client never blocks on writing, and reports each request's stream id.
struct Raw {
    out: OwnedWriteHalf,
    requests: mpsc::UnboundedReceiver<u32>,
}

impl Raw {
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes).await
    }

    async fn request(&mut self) -> u32 {
        self.requests
            .recv()
            .await
            .expect("the client sent a request")
    }
}

async fn raw_agent() -> (AgentClient, Raw) {
    let (agent, host) = UnixStream::pair().expect("socketpair");
    let (mut rd, out) = agent.into_split();
    let (tx, requests) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut preface = [0u8; 24];
        if rd.read_exact(&mut preface).await.is_err() {
            return;
        }
        let mut head = [0u8; 9];
        while rd.read_exact(&mut head).await.is_ok() {
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0; len];
            if rd.read_exact(&mut payload).await.is_err() {
                return;
            }
            if head[3] == HEADERS {
                let _ = tx.send(stream);
            }
        }
    });
    let client = AgentClient::handshake(host).await.expect("handshake");
    (client, Raw { out, requests })
}

/// Asserts `r` is a connection-level failure: the connection is unusable after frame abuse.
fn assert_transport<T: std::fmt::Debug>(what: &str, r: Result<T, AgentError>) {
    match r {
        Err(AgentError::Transport(_)) => {}
        other => panic!("{what}: expected a transport error, got {other:?}"),
    }
}

// h2 server ------------------------------------------------------------------------------------

type Respond = SendResponse<Bytes>;

/// An agent served with the `h2` crate: `handler` answers each request on its own task.
/// Notifying the returned handle drops the connection on the floor (no GOAWAY).
async fn h2_agent<F, Fut>(handler: F) -> (AgentClient, Arc<Notify>)
where
    F: Fn(http::Request<h2::RecvStream>, Respond) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (agent, host) = UnixStream::pair().expect("socketpair");
    let hang_up = Arc::new(Notify::new());
    let h = hang_up.clone();
    tokio::spawn(async move {
        let Ok(mut conn) = h2::server::handshake(agent).await else {
            return;
        };
        loop {
            tokio::select! {
                next = conn.accept() => match next {
                    Some(Ok((req, respond))) => {
                        tokio::spawn(handler(req, respond));
                    }
                    _ => return,
                },
                _ = h.notified() => return,
            }
        }
    });
    let client = AgentClient::handshake(host).await.expect("handshake");
    (client, hang_up)
}

fn response(status: u16, content_type: &str) -> http::Response<()> {
    http::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(())
        .expect("response")
}

/// Starts a streaming (Connect) answer.
fn stream_response(respond: &mut Respond) -> Option<SendStream<Bytes>> {
    respond
        .send_response(response(200, connect::CONTENT_TYPE_CONNECT_PROTO), false)
        .ok()
}

/// Sends `data` as fast as the client's flow control allows; false once the client reset the
/// stream or went away. Never buffers more than the capacity the client granted.
async fn send_all(stream: &mut SendStream<Bytes>, mut data: Bytes) -> bool {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(n)) if n > 0 => n,
            Some(Ok(_)) => continue,
            _ => return false,
        };
        let piece = data.split_to(granted.min(data.len()));
        if stream.send_data(piece, false).is_err() {
            return false;
        }
    }
    true
}

/// `total` bytes of `chunk` repeated.
async fn pour(stream: &mut SendStream<Bytes>, total: usize, chunk: &Bytes) -> bool {
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        if !send_all(stream, chunk.slice(..n)).await {
            return false;
        }
        left -= n;
    }
    true
}

fn event(ev: Event) -> Bytes {
    let msg = StartResponse {
        event: Some(ProcessEvent { event: Some(ev) }),
    };
    connect::encode_envelope(connect::FLAG_MESSAGE, &msg.encode_to_vec())
}

fn start_event() -> Bytes {
    event(Event::Start(StartEvent { pid: 42 }))
}

fn keepalive() -> Bytes {
    event(Event::Keepalive(KeepAlive {}))
}

fn end_event() -> Bytes {
    event(Event::End(EndEvent {
        exit_code: 0,
        exited: true,
        status: "exit status 0".into(),
        error: None,
    }))
}

/// The next event or error of `stream`, within [`HANG`].
async fn next(stream: &mut ProcessStream) -> Option<Result<ProcessEvent, AgentError>> {
    bounded("ProcessStream::next", stream.next()).await
}

/// Drives `stream` until it fails, skipping events; panics if it ends cleanly.
async fn failure(mut stream: ProcessStream) -> AgentError {
    loop {
        match next(&mut stream).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return e,
            None => panic!("the stream ended cleanly"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frame-level abuse (raw bytes)

#[tokio::test(start_paused = true)]
async fn garbage_instead_of_the_preface() {
    count_panics();
    let (c, mut raw) = raw_agent().await;
    let mut garbage = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec();
    garbage.extend(std::iter::repeat_n(0xab, 64 << 10));
    // The client may close before reading it all.
    let _ = raw.send(&garbage).await;
    assert_transport("health", bounded("health", c.health()).await);
    assert_transport("list after", bounded("list", c.list()).await);
    assert!(c.is_closed());
    assert_no_panics();
}

#[tokio::test(start_paused = true)]
async fn oversized_frame_length() {
    count_panics();
    let (c, mut raw) = raw_agent().await;
    let call = tokio::spawn(async move { c.health().await });
    raw.send(&settings(&[])).await.expect("settings");
    let stream = raw.request().await;
    // A DATA frame claiming 16 MiB - 1, far above the client's 16 KiB SETTINGS_MAX_FRAME_SIZE.
    let mut f = frame(DATA, 0, stream, &[]);
    f[..3].copy_from_slice(&[0xff, 0xff, 0xff]);
    f.extend([0u8; 4096]);
    let _ = raw.send(&f).await;
    assert_transport("health", bounded("health", call).await.expect("join"));
    assert_no_panics();
}

#[tokio::test(start_paused = true)]
async fn truncated_frame_then_silence() {
    count_panics();
    let (c, mut raw) = raw_agent().await;
    let calls = tokio::spawn({
        let c = c.clone();
        async move { (c.health().await, c.list().await) }
    });
    raw.send(&settings(&[])).await.expect("settings");
    raw.request().await;
    // Five bytes of a frame header, then nothing; the connection stays open.
    raw.send(&frame(HEADERS, END_HEADERS, 1, &[STATUS_204])[..5])
        .await
        .expect("send");
    let (health, list) = bounded("calls", calls).await.expect("join");
    assert!(
        matches!(health, Err(AgentError::Timeout(t)) if t == HEALTH_TIMEOUT),
        "{health:?}"
    );
    assert!(
        matches!(list, Err(AgentError::Timeout(t)) if t >= DEFAULT_UNARY_TIMEOUT),
        "{list:?}"
    );
    drop(raw);
    assert_no_panics();
}

#[tokio::test(start_paused = true)]
async fn connection_closed_mid_frame() {
    count_panics();
    let (c, mut raw) = raw_agent().await;
    let call = tokio::spawn(async move { c.health().await });
    raw.send(&settings(&[])).await.expect("settings");
    let stream = raw.request().await;
    let f = frame(HEADERS, END_HEADERS | END_STREAM, stream, &[STATUS_204]);
    raw.send(&f[..f.len() - 1]).await.expect("send");
    drop(raw);
    assert_transport("health", bounded("health", call).await.expect("join"));
    assert_no_panics();
}

/// SETTINGS and PING floods: each needs an acknowledgement, which must not pile up in the
/// client. The agent reads everything, as a real one would, then answers.
#[tokio::test(start_paused = true)]
async fn settings_and_ping_flood() {
    count_panics();
    let (c, mut raw) = raw_agent().await;
    let call = tokio::spawn(async move { c.health().await });
    raw.send(&settings(&[])).await.expect("settings");
    let stream = raw.request().await;
    let (_, peak_before) = rss();
    let one = settings(&[(SETTINGS_HEADER_TABLE_SIZE, 4096)]);
    let ping = frame(PING, 0, 0, &[7; 8]);
    let batch: Vec<u8> = (0..1000)
        .flat_map(|_| one.iter().chain(&ping).copied())
        .collect();
    for _ in 0..100 {
        raw.send(&batch).await.expect("flood");
    }
    raw.send(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        stream,
        &[STATUS_204],
    ))
    .await
    .expect("answer");
    let r = bounded("health", call).await.expect("join");
    // 200,000 frames later the connection still works.
    assert!(r.is_ok(), "{r:?}");
    let (_, peak) = rss();
    assert!(
        peak.saturating_sub(peak_before) < 64 << 20,
        "the flood grew the peak RSS by {} MiB",
        (peak - peak_before) >> 20
    );
    assert_no_panics();
}

/// A header list above the client's 16 KiB cap, then a header block that never ends.
#[tokio::test(start_paused = true)]
async fn huge_headers_and_endless_continuation() {
    count_panics();
    // One complete header list of 20 KiB, split over HEADERS and CONTINUATION.
    let (c, mut raw) = raw_agent().await;
    let call = tokio::spawn(async move { c.health().await });
    raw.send(&settings(&[])).await.expect("settings");
    let stream = raw.request().await;
    let mut block = vec![STATUS_200];
    hpack_literal(&mut block, "x-big", &[b'a'; 20 << 10]);
    let (first, rest) = block.split_at(12 << 10);
    let mut frames = frame(HEADERS, END_STREAM, stream, first);
    frames.extend(frame(CONTINUATION, END_HEADERS, stream, rest));
    let _ = raw.send(&frames).await;
    let r = bounded("health", call).await.expect("join");
    assert!(r.is_err(), "a 20 KiB header list was accepted");

    // Endless CONTINUATION: 16 KiB fragments, up to 1 GiB, until the client hangs up.
    let (c, mut raw) = raw_agent().await;
    let call = tokio::spawn(async move { c.health().await });
    raw.send(&settings(&[])).await.expect("settings");
    let stream = raw.request().await;
    let (_, peak_before) = rss();
    let mut fragment = Vec::new();
    while fragment.len() < 16000 {
        hpack_literal(&mut fragment, "x-more", &[b'b'; 1000]);
    }
    let mut sent = raw
        .send(&frame(HEADERS, 0, stream, &[STATUS_200]))
        .await
        .is_ok();
    let cont = frame(CONTINUATION, 0, stream, &fragment);
    let mut frames = 0;
    while sent && frames < 65536 {
        sent = raw.send(&cont).await.is_ok();
        frames += 1;
    }
    assert!(!sent, "the client read 1 GiB of one header block");
    let r = bounded("health", call).await.expect("join");
    assert_transport("health", r);
    let (_, peak) = rss();
    assert!(
        peak.saturating_sub(peak_before) < 64 << 20,
        "CONTINUATION grew the peak RSS by {} MiB",
        (peak - peak_before) >> 20
    );
    assert_no_panics();
}

/// Frames the agent may not send unasked: a server push (push is disabled), a response on a
/// stream the agent opened itself, data on a stream nobody opened.
#[tokio::test(start_paused = true)]
async fn unsolicited_frames() {
    count_panics();
    for (name, kind, flags, on_request, payload) in [
        (
            "PUSH_PROMISE",
            PUSH_PROMISE,
            END_HEADERS,
            true,
            vec![0, 0, 0, 2, 0x82],
        ),
        (
            "HEADERS on stream 2",
            HEADERS,
            END_HEADERS,
            false,
            vec![STATUS_200],
        ),
        ("DATA on stream 99", DATA, 0, false, b"hello".to_vec()),
    ] {
        let (c, mut raw) = raw_agent().await;
        let call = tokio::spawn(async move { c.health().await });
        raw.send(&settings(&[])).await.expect("settings");
        let stream = raw.request().await;
        let target = match (on_request, kind) {
            (true, _) => stream,
            (false, HEADERS) => 2,
            (false, _) => 99,
        };
        let _ = raw.send(&frame(kind, flags, target, &payload)).await;
        let r = bounded(name, call).await.expect("join");
        assert!(r.is_err(), "{name}: accepted");
        assert_eq!(r.expect_err(name).code(), Code::Unavailable, "{name}");
    }
    assert_no_panics();
}

/// An agent that allows no streams at all: calls wait for one, but only until their deadline.
#[tokio::test(start_paused = true)]
async fn zero_concurrent_streams() {
    count_panics();
    let (c, mut raw) = raw_agent().await;
    raw.send(&settings(&[(SETTINGS_MAX_CONCURRENT_STREAMS, 0)]))
        .await
        .expect("settings");
    let r = bounded("health", c.health()).await;
    assert!(matches!(r, Err(AgentError::Timeout(_))), "{r:?}");
    let r = bounded("start", c.start(start_request(), no_deadline())).await;
    assert!(matches!(r, Err(AgentError::Timeout(_))), "{r:?}");
    drop(raw);
    assert_no_panics();
}

// ---------------------------------------------------------------------------------------------
// Well-formed HTTP/2, hostile answers (h2 server)

/// Nothing at all comes back: every call's deadline fires.
#[tokio::test(start_paused = true)]
async fn silent_agent() {
    count_panics();
    let (c, _hang_up) = h2_agent(|req, respond| async move {
        let _keep = (req, respond);
        std::future::pending::<()>().await;
    })
    .await;
    let r = bounded("health", c.health()).await;
    assert!(matches!(r, Err(AgentError::Timeout(_))), "health: {r:?}");
    let r = bounded("list", c.list()).await;
    assert!(matches!(r, Err(AgentError::Timeout(_))), "list: {r:?}");
    let r = bounded("read_file", c.read_file("/x", None, 1 << 20)).await;
    assert!(matches!(r, Err(AgentError::Timeout(_))), "read_file: {r:?}");
    let r = bounded(
        "write_file",
        c.write_file("/x", Bytes::from_static(b"x"), None),
    )
    .await;
    assert!(
        matches!(r, Err(AgentError::Timeout(_))),
        "write_file: {r:?}"
    );
    let r = bounded("start", c.start(start_request(), no_deadline())).await;
    assert!(matches!(r, Err(AgentError::Timeout(_))), "start: {r:?}");
    assert_no_panics();
}

/// Slowloris: the answer begins, then trickles a byte (or a keepalive) a second, forever.
#[tokio::test(start_paused = true)]
async fn trickling_agent() {
    count_panics();
    let (c, _hang_up) = h2_agent(|req, mut respond| async move {
        let path = req.uri().path().to_string();
        let (ct, drip) = match path.as_str() {
            "/files" => ("application/octet-stream", Bytes::from_static(b"x")),
            "/process.Process/List" => (connect::CONTENT_TYPE_PROTO, Bytes::from_static(&[0])),
            _ => (connect::CONTENT_TYPE_CONNECT_PROTO, keepalive()),
        };
        let Ok(mut body) = respond.send_response(response(200, ct), false) else {
            return;
        };
        loop {
            if !send_all(&mut body, drip.clone()).await {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await;
    let r = bounded("read_file", c.read_file("/x", None, 1 << 20)).await;
    assert!(matches!(r, Err(AgentError::Timeout(_))), "read_file: {r:?}");
    let r = bounded("list", c.list()).await;
    assert!(matches!(r, Err(AgentError::Timeout(_))), "list: {r:?}");
    // Keepalives forever and never the start event.
    let r = bounded("start", c.start(start_request(), no_deadline())).await;
    assert!(matches!(r, Err(AgentError::Timeout(_))), "start: {r:?}");
    assert_no_panics();
}

/// Process streams that never finish properly.
#[tokio::test(start_paused = true)]
async fn process_stream_without_end() {
    count_panics();
    // The command name of the start request picks the misbehaviour.
    let (c, _hang_up) = h2_agent(|req, mut respond| async move {
        let (_parts, mut body) = req.into_parts();
        let mut request = Vec::new();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            request.extend_from_slice(&chunk);
        }
        let cmd = StartRequest::decode(request.get(5..).unwrap_or_default())
            .ok()
            .and_then(|r| r.process)
            .map(|p| p.cmd)
            .unwrap_or_default();
        let Some(mut out) = stream_response(&mut respond) else {
            return;
        };
        match cmd.as_str() {
            // Start, then keepalives forever: the process "runs" past the call's deadline.
            "keepalives" => {
                send_all(&mut out, start_event()).await;
                while send_all(&mut out, keepalive()).await {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            // Start, then nothing at all.
            "silent" => {
                send_all(&mut out, start_event()).await;
                std::future::pending::<()>().await;
            }
            // The end event, then keepalives forever instead of the end of the stream.
            "end-then-keepalives" => {
                send_all(&mut out, start_event()).await;
                send_all(&mut out, end_event()).await;
                while send_all(&mut out, keepalive()).await {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            // A clean end of the stream without the end event.
            "no-end-event" => {
                send_all(&mut out, start_event()).await;
                send_all(&mut out, connect::end_stream_ok()).await;
                let _ = out.send_data(Bytes::new(), true);
            }
            // An envelope with undefined flags.
            "bad-flags" => {
                send_all(&mut out, start_event()).await;
                send_all(&mut out, Bytes::from_static(&[0x80, 0, 0, 0, 0])).await;
                std::future::pending::<()>().await;
            }
            _ => {}
        }
    })
    .await;
    let start = |cmd: &str, opts: CallOptions| {
        let mut req = start_request();
        if let Some(p) = req.process.as_mut() {
            p.cmd = cmd.into();
        }
        let c = c.clone();
        async move { bounded("start", c.start(req, opts)).await.expect("start") }
    };

    let e = failure(start("keepalives", deadline(Duration::from_secs(5))).await).await;
    assert!(
        matches!(e, AgentError::Timeout(_)),
        "keepalives past the deadline: {e:?}"
    );
    assert_eq!(e.code(), Code::DeadlineExceeded);

    let e = failure(start("silent", no_deadline()).await).await;
    assert!(
        matches!(&e, AgentError::Transport(m) if m.contains("idle")),
        "silence without a deadline: {e:?} (idle limit {STREAM_IDLE_LIMIT:?})"
    );

    let mut s = start("end-then-keepalives", no_deadline()).await;
    assert!(matches!(
        next(&mut s).await,
        Some(Ok(ProcessEvent {
            event: Some(Event::End(_))
        }))
    ));
    let r = next(&mut s).await;
    assert!(matches!(r, Some(Err(_))), "after the end event: {r:?}");

    let e = failure(start("no-end-event", no_deadline()).await).await;
    assert!(matches!(e, AgentError::Protocol(_)), "{e:?}");

    let e = failure(start("bad-flags", no_deadline()).await).await;
    assert!(matches!(e, AgentError::Protocol(_)), "{e:?}");
    assert_no_panics();
}

/// The agent vanishes in the middle of a process stream.
#[tokio::test(start_paused = true)]
async fn connection_closed_mid_stream() {
    count_panics();
    let gone = Arc::new(Notify::new());
    let (c, hang_up) = h2_agent({
        let gone = gone.clone();
        move |_req, mut respond| {
            let gone = gone.clone();
            async move {
                let Some(mut out) = stream_response(&mut respond) else {
                    return;
                };
                send_all(&mut out, start_event()).await;
                let data = event(Event::Data(DataEvent {
                    output: Some(data_event::Output::Stdout(b"partial".to_vec())),
                }));
                send_all(&mut out, data).await;
                gone.notify_one();
                std::future::pending::<()>().await;
            }
        }
    })
    .await;
    let mut s = bounded("start", c.start(start_request(), no_deadline()))
        .await
        .expect("start");
    gone.notified().await;
    hang_up.notify_one();
    let mut saw_data = false;
    let e = loop {
        match next(&mut s).await {
            Some(Ok(ProcessEvent {
                event: Some(Event::Data(_)),
            })) => saw_data = true,
            Some(Ok(other)) => panic!("unexpected {other:?}"),
            Some(Err(e)) => break e,
            None => panic!("a vanished agent ended the stream cleanly"),
        }
    };
    assert!(saw_data);
    assert!(matches!(e, AgentError::Transport(_)), "{e:?}");
    assert!(next(&mut s).await.is_none(), "one error, then the end");
    assert_transport("health", bounded("health", c.health()).await);
    assert_no_panics();
}

// ---------------------------------------------------------------------------------------------
// Oversized answers and memory

const HUGE: usize = 100 << 20;

/// 100 MB answers to every kind of call: caps hold, and the host's peak memory grows by far less
/// than what the agent sent. Real time: nothing here waits on a deadline.
#[tokio::test]
async fn responses_bigger_than_the_caps() {
    count_panics();
    let (c, _hang_up) = h2_agent(|req, mut respond| async move {
        let chunk = Bytes::from(vec![b'z'; 64 << 10]);
        match req.uri().path() {
            "/files" => {
                let Ok(mut out) =
                    respond.send_response(response(200, "application/octet-stream"), false)
                else {
                    return;
                };
                pour(&mut out, HUGE, &chunk).await;
            }
            "/process.Process/List" => {
                let Ok(mut out) =
                    respond.send_response(response(200, connect::CONTENT_TYPE_PROTO), false)
                else {
                    return;
                };
                pour(&mut out, HUGE, &chunk).await;
            }
            // 4 MiB of empty entries: 2 bytes each on the wire, far more decoded.
            "/filesystem.Filesystem/ListDir" => {
                let Ok(mut out) =
                    respond.send_response(response(200, connect::CONTENT_TYPE_PROTO), false)
                else {
                    return;
                };
                let empties = Bytes::from([0x0a, 0x00].repeat((4 << 20) / 2 - 8));
                send_all(&mut out, empties).await;
                let _ = out.send_data(Bytes::new(), true);
            }
            "/process.Process/SendSignal" | "/interpreter/execute" => {
                let Ok(mut out) = respond.send_response(response(500, "text/plain"), false) else {
                    return;
                };
                pour(&mut out, HUGE, &chunk).await;
            }
            // One envelope that claims 100 MB, and then sends it.
            "/process.Process/Start" => {
                let Some(mut out) = stream_response(&mut respond) else {
                    return;
                };
                send_all(&mut out, start_event()).await;
                let len = u32::try_from(HUGE).expect("len").to_be_bytes();
                send_all(
                    &mut out,
                    Bytes::from(vec![0, len[0], len[1], len[2], len[3]]),
                )
                .await;
                pour(&mut out, HUGE, &chunk).await;
            }
            // 100 MB of well-formed 32 KiB output events: the caller sees all of it.
            "/process.Process/Connect" => {
                let Some(mut out) = stream_response(&mut respond) else {
                    return;
                };
                send_all(&mut out, start_event()).await;
                let data = event(Event::Data(DataEvent {
                    output: Some(data_event::Output::Stdout(vec![b'o'; 32 << 10])),
                }));
                for _ in 0..HUGE / (32 << 10) {
                    if !send_all(&mut out, data.clone()).await {
                        return;
                    }
                }
                send_all(&mut out, end_event()).await;
                send_all(&mut out, connect::end_stream_ok()).await;
                let _ = out.send_data(Bytes::new(), true);
            }
            _ => {}
        }
    })
    .await;
    let (rss_before, _) = rss();

    let r = bounded("read_file", c.read_file("/x", None, 4 << 20)).await;
    assert!(
        matches!(r, Err(AgentError::TooLarge { limit }) if limit == 4 << 20),
        "read_file: {:?}",
        r.map(|b| b.len())
    );
    let r = bounded("list", c.list()).await;
    assert!(
        matches!(r, Err(AgentError::TooLarge { limit }) if limit == MAX_RESPONSE_MESSAGE),
        "list: {:?}",
        r.map(|p| p.len())
    );
    let r = bounded("send_signal", c.send_signal(Selector::Pid(1), 9)).await;
    match r {
        Err(AgentError::Rpc { message, .. }) => assert!(
            message.len() < MAX_ERROR_BODY,
            "error message of {} bytes",
            message.len()
        ),
        other => panic!("send_signal: {other:?}"),
    }
    let r = bounded("list_dir", c.list_dir("/", 1, None)).await;
    match r {
        Err(AgentError::Protocol(m)) => assert!(m.contains("fields"), "{m}"),
        other => panic!("list_dir: {:?}", other.map(|e| e.len())),
    }
    // A code interpreter's refusal is read as far as an error's bound.
    let r = bounded(
        "interpreter_execute",
        c.interpreter_execute("token", Bytes::from_static(b"{}")),
    )
    .await;
    match r {
        Err(AgentError::Rpc { code, message }) => {
            assert_eq!(code, Code::Internal);
            assert!(message.len() < MAX_ERROR_BODY, "{} bytes", message.len());
        }
        other => panic!("interpreter_execute: {other:?}"),
    }
    let e = failure(
        bounded("start", c.start(start_request(), no_deadline()))
            .await
            .expect("start"),
    )
    .await;
    assert!(
        matches!(e, AgentError::TooLarge { limit } if limit == MAX_RESPONSE_MESSAGE),
        "an envelope of 100 MB: {e:?}"
    );
    let mut s = bounded("connect", c.connect(Selector::Pid(42)))
        .await
        .expect("connect");
    let mut output = 0;
    let mut ended = false;
    while let Some(ev) = next(&mut s).await {
        match ev.expect("event").event {
            Some(Event::Data(DataEvent {
                output: Some(data_event::Output::Stdout(b)),
            })) => output += b.len(),
            Some(Event::End(_)) => ended = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(ended);
    assert_eq!(output, HUGE);
    c.health()
        .await
        .expect_err("the fake agent does not serve /health");

    let (_, peak) = rss();
    eprintln!(
        "peak RSS grew by {} KiB over {} KiB",
        peak.saturating_sub(rss_before) >> 10,
        rss_before >> 10
    );
    assert!(
        peak.saturating_sub(rss_before) < 64 << 20,
        "100 MB answers grew the peak RSS by {} MiB",
        (peak - rss_before) >> 20
    );
    assert_no_panics();
}

/// Streamed file transfers against an agent that lies about a download's length, stalls
/// midway, or never reads an upload: each ends with a typed error within the idle limit.
#[tokio::test(start_paused = true)]
async fn streamed_files_that_stall_or_lie() {
    count_panics();
    let (c, _hang_up) = h2_agent(|req, mut respond| async move {
        let query = req.uri().query().unwrap_or("").to_string();
        if req.method() == http::Method::POST {
            // Never read the upload, never answer.
            let _keep = (req, respond);
            std::future::pending::<()>().await;
            return;
        }
        let (declared, sent) = match query.as_str() {
            q if q.contains("short") => ("10", Bytes::from_static(b"12345")),
            q if q.contains("long") => ("2", Bytes::from_static(b"12345")),
            _ => ("10", Bytes::from_static(b"12345")),
        };
        let resp = http::Response::builder()
            .status(200)
            .header("content-type", "application/octet-stream")
            .header("content-length", declared)
            .body(())
            .expect("response");
        let Ok(mut body) = respond.send_response(resp, false) else {
            return;
        };
        if !send_all(&mut body, sent).await {
            return;
        }
        if query.contains("short") {
            let _ = body.send_data(Bytes::new(), true);
            return;
        }
        // Stall with the stream open.
        std::future::pending::<()>().await;
    })
    .await;

    let drain = |mut d: moat_engine::agent_client::FileDownload| async move {
        let mut got = 0;
        loop {
            match d.next().await {
                Some(Ok(b)) => got += b.len(),
                Some(Err(e)) => return (got, Some(e)),
                None => return (got, None),
            }
        }
    };
    let d = bounded("stall", c.read_file_stream("/stall", None))
        .await
        .expect("the download starts");
    assert_eq!(d.size(), 10);
    let (got, err) = bounded("stall body", drain(d)).await;
    assert_eq!(got, 5);
    assert!(matches!(err, Some(AgentError::Transport(_))), "{err:?}");

    let d = bounded("short", c.read_file_stream("/short", None))
        .await
        .expect("the download starts");
    // HTTP/2 itself or the client's own count catches the lie, whichever sees it first.
    let (_, err) = bounded("short body", drain(d)).await;
    assert!(
        matches!(
            err,
            Some(AgentError::Protocol(_) | AgentError::Transport(_))
        ),
        "{err:?}"
    );

    let d = bounded("long", c.read_file_stream("/long", None))
        .await
        .expect("the download starts");
    let (_, err) = bounded("long body", drain(d)).await;
    assert!(
        matches!(
            err,
            Some(AgentError::Protocol(_) | AgentError::Transport(_))
        ),
        "{err:?}"
    );

    // An upload the agent never takes: the body stops moving, the idle limit ends the call.
    let endless = futures_util::stream::repeat_with(|| {
        Ok::<_, std::io::Error>(Bytes::from_static(&[0u8; 16 << 10]))
    });
    let began = tokio::time::Instant::now();
    let r = bounded("upload", c.write_file_stream("/up", None, endless)).await;
    assert!(matches!(r, Err(AgentError::Timeout(_))), "{r:?}");
    assert!(began.elapsed() >= STREAM_IDLE_LIMIT);
    assert_no_panics();
}
