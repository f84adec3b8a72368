//! Connect framing, codecs, limits, authentication and the plain routes.

#![allow(clippy::unwrap_used)]

#[path = "rpc_common/mod.rs"]
mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use moat_proto::connect::{self, EnvelopeDecoder};
use moat_proto::process as pr;
use prost::Message as _;
use serde_json::json;

#[tokio::test]
async fn request_envelope_split_across_frames() {
    let agent = Agent::start(config()).await;
    let (tx, handle) = agent.stream_with_body("/process.Process/Start", &[]).await;
    let env = connect::encode_envelope(
        0,
        &serde_json::to_vec(&run_request("echo split", false)).unwrap(),
    );
    for byte in env.iter() {
        tx.send(Bytes::copy_from_slice(&[*byte])).await.unwrap();
    }
    drop(tx);
    let (events, end) = Stream::new(handle.await.unwrap()).collect().await;
    assert_eq!(end, json!({}));
    assert_eq!(outputs(&events).0, "split\n");
}

#[tokio::test]
async fn compressed_envelope_is_rejected() {
    let agent = Agent::start(config()).await;
    let body = connect::encode_envelope(connect::FLAG_COMPRESSED, b"{}");
    let resp = agent
        .send(
            Agent::builder("/process.Process/Start", true)
                .body(full(body))
                .unwrap(),
        )
        .await;
    let (messages, end) = Stream::new(resp).collect().await;
    assert!(messages.is_empty());
    assert_eq!(end["error"]["code"], "internal", "{end}");
    // Negotiated compression is refused too.
    let resp = agent
        .send(
            Agent::builder("/process.Process/List", false)
                .header("content-encoding", "gzip")
                .body(full("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 501);
}

#[tokio::test]
async fn oversized_messages_are_rejected() {
    let agent = Agent::start(config()).await;
    // A streaming envelope announcing more than the cap is refused before its payload arrives.
    let header = Bytes::from_static(&[0, 0x01, 0x10, 0x00, 0x01]); // 16 MiB + 1
    let resp = agent
        .send(
            Agent::builder("/process.Process/Start", true)
                .body(full(header))
                .unwrap(),
        )
        .await;
    let (_, end) = Stream::new(resp).collect().await;
    assert_eq!(end["error"]["code"], "resource_exhausted", "{end}");
    // A unary body over the cap.
    let big = vec![b' '; moat_agent::transport::MAX_MESSAGE_BYTES + 1];
    let resp = agent
        .send(
            Agent::builder("/process.Process/List", false)
                .body(full(big))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 429);
    let body: serde_json::Value =
        serde_json::from_slice(&read_all(resp.into_body()).await).unwrap();
    assert_eq!(body["code"], "resource_exhausted");
}

#[tokio::test]
async fn binary_codec() {
    let agent = Agent::start(config()).await;
    let req = pr::StartRequest {
        process: Some(pr::ProcessConfig {
            cmd: "/bin/echo".into(),
            args: vec!["proto".into()],
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    };
    let resp = agent
        .send(
            http::Request::post("http://localhost/process.Process/Start")
                .header("content-type", "application/connect+proto")
                .body(full(connect::encode_envelope(0, &req.encode_to_vec())))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.headers()["content-type"], "application/connect+proto");
    let bytes = read_all(resp.into_body()).await;
    let mut dec = EnvelopeDecoder::new(1 << 20);
    dec.push(&bytes);
    let mut events = Vec::new();
    let mut ended = false;
    while let Some(env) = dec.next_envelope().unwrap() {
        if env.is_end_stream() {
            assert_eq!(&env.payload[..], b"{}");
            ended = true;
        } else {
            events.push(
                pr::StartResponse::decode(env.payload)
                    .unwrap()
                    .event
                    .unwrap()
                    .event
                    .unwrap(),
            );
        }
    }
    assert!(ended);
    assert!(matches!(events[0], pr::process_event::Event::Start(_)));
    let out: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            pr::process_event::Event::Data(d) => match &d.output {
                Some(pr::process_event::data_event::Output::Stdout(b)) => Some(b.clone()),
                _ => None,
            },
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(out, b"proto\n");
    match events.last().unwrap() {
        pr::process_event::Event::End(end) => assert!(end.exited && end.exit_code == 0),
        other => panic!("last event {other:?}"),
    }

    // Unary with the binary codec.
    let resp = agent
        .send(
            http::Request::post("http://localhost/process.Process/List")
                .header("content-type", "application/proto")
                .body(full(pr::ListRequest {}.encode_to_vec()))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/proto");
    pr::ListResponse::decode(read_all(resp.into_body()).await).unwrap();
}

#[tokio::test]
async fn health_and_envs() {
    let mut cfg = config();
    cfg.env_vars.insert("A".into(), "1".into());
    let agent = Agent::start(cfg).await;
    let resp = agent
        .send(
            http::Request::get("http://localhost/health")
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 204);
    assert!(read_all(resp.into_body()).await.is_empty());
    let resp = agent
        .send(
            http::Request::get("http://localhost/envs")
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value =
        serde_json::from_slice(&read_all(resp.into_body()).await).unwrap();
    assert_eq!(body, json!({"A": "1"}));
}

#[tokio::test]
async fn unary_deadline() {
    let agent = Agent::start(config()).await;
    // SendInput to a process that never reads blocks once the pipe is full; the call's deadline
    // ends it.
    let mut stream = agent
        .stream("/process.Process/Start", run_request("sleep 30", true), &[])
        .await;
    let start = stream.next_json().await.unwrap();
    let pid = start["event"]["start"]["pid"].as_u64().unwrap();
    let big = b64(&vec![b'x'; 1 << 20]);
    let (status, body) = agent
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": big}}),
            &[("connect-timeout-ms", "300")],
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (504, Some("deadline_exceeded"))
    );
    agent
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
            &[],
        )
        .await;
    let (events, _) = stream.collect().await;
    assert!(!events.is_empty());
}

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn output_floods_stay_bounded_when_nobody_reads() {
    let agent = Agent::start(config()).await;
    let mut stream = agent
        .stream(
            "/process.Process/Start",
            json!({"process": {"cmd": "yes"}, "stdin": false}),
            &[],
        )
        .await;
    let start = stream.next_json().await.unwrap();
    let pid = start["event"]["start"]["pid"].as_u64().unwrap();
    // Read a little, then stop reading while `yes` keeps writing.
    for _ in 0..4 {
        stream.next_json().await.unwrap();
    }
    let before = rss_kib();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "RSS grew by {grown} KiB while the reader stalled"
    );
    agent
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
            &[],
        )
        .await;
    // Draining to the end still works.
    loop {
        let ev = stream.next_json().await.expect("open");
        if ev.get("$end").is_some() {
            assert_eq!(ev["$end"], json!({}));
            break;
        }
    }
}

#[tokio::test]
async fn watch_dir_starts_with_start_and_keeps_alive() {
    let agent = Agent::start(config()).await;
    let dir = std::env::temp_dir().join(format!("moat-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut stream = agent
        .stream(
            "/filesystem.Filesystem/WatchDir",
            json!({"path": dir.to_str().unwrap()}),
            &[("keepalive-ping-interval", "1")],
        )
        .await;
    assert_eq!(stream.status, 200);
    let first = stream.next_json().await.unwrap();
    assert_eq!(first, json!({"start": {}}));
    loop {
        let ev = stream.next_json().await.unwrap();
        assert!(ev.get("$end").is_none(), "{ev}");
        if ev == json!({"keepalive": {}}) {
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
