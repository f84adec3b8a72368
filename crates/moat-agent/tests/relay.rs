//! The TCP relay (`POST /relay/tcp?port=N`): full duplex, half-closes, refused and bad ports.
//! The agent runs on the host here, so its `127.0.0.1` is the test's.

#![allow(clippy::unwrap_used)]

#[path = "rpc_common/mod.rs"]
mod common;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn relay_request(port: &str) -> http::Request<Body> {
    http::Request::post(format!("http://localhost/relay/tcp?port={port}"))
        .body(full(""))
        .unwrap()
}

/// The next (non-empty) data of a response body (bounded by [`WAIT`]); `None` at its end.
async fn next_data(body: &mut hyper::body::Incoming) -> Option<Bytes> {
    loop {
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("data in time")?
            .expect("frame");
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            return Some(data);
        }
    }
}

#[tokio::test]
async fn half_close_reaches_the_service_and_its_answer_comes_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Reads everything up to end of file, then answers: only a half-close lets it answer.
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        socket.read_to_end(&mut got).await.unwrap();
        let answer = format!("got {}: {}", got.len(), String::from_utf8_lossy(&got));
        socket.write_all(answer.as_bytes()).await.unwrap();
    });
    let agent = Agent::start(config()).await;
    let (tx, handle) = agent
        .stream_with_body(&format!("/relay/tcp?port={port}"), &[])
        .await;
    tx.send(Bytes::from_static(b"hello ")).await.unwrap();
    tx.send(Bytes::from_static(b"world")).await.unwrap();
    drop(tx);
    let resp = handle.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        &read_all(resp.into_body()).await[..],
        b"got 11: hello world"
    );
}

#[tokio::test]
async fn both_directions_flow_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Echoes every piece as it arrives.
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        loop {
            let n = socket.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            socket.write_all(&buf[..n]).await.unwrap();
        }
    });
    let agent = Agent::start(config()).await;
    let (tx, handle) = agent
        .stream_with_body(&format!("/relay/tcp?port={port}"), &[])
        .await;
    tx.send(Bytes::from_static(b"ping")).await.unwrap();
    let resp = handle.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // Each answer arrives while the request is still open: nothing waits for the whole body.
    for word in ["ping", "pong", "again"] {
        if word != "ping" {
            tx.send(Bytes::from(word)).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < word.len() {
            got.extend_from_slice(&next_data(&mut body).await.expect("echo"));
        }
        assert_eq!(got, word.as_bytes());
    }
    drop(tx);
    assert_eq!(next_data(&mut body).await, None);
}

#[tokio::test]
async fn refused_and_bad_ports() {
    let agent = Agent::start(config()).await;
    // A port nobody listens on: bound, then closed.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let resp = agent.send(relay_request(&port.to_string())).await;
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value =
        serde_json::from_slice(&read_all(resp.into_body()).await).unwrap();
    assert_eq!(body["code"], 502);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("nothing listens")
    );

    for bad in ["0", "abc", "65536", "", "80&port=81"] {
        let resp = agent.send(relay_request(bad)).await;
        assert_eq!(resp.status(), 400, "port={bad}");
    }
    let resp = agent
        .send(
            http::Request::get("http://localhost/relay/tcp?port=80")
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 405);
}
