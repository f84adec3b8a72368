//! `AgentClient` against the real agent, served in-process over a socketpair.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moat_agent::state::AgentState;
use moat_agent::{ServeOptions, serve};
use moat_engine::agent_client::{AgentClient, AgentError, CallOptions, ProcessStream};
use moat_proto::agent_config::AgentConfig;
use moat_proto::connect::Code;
use moat_proto::process::process_event::{EndEvent, Event, data_event};
use moat_proto::process::process_selector::Selector;
use moat_proto::process::{ProcessConfig, Pty, StartRequest, pty};

const WAIT: Duration = Duration::from_secs(30);

async fn client_with(config: AgentConfig) -> AgentClient {
    let (server, client) = tokio::net::UnixStream::pair().unwrap();
    let state = Arc::new(AgentState::new(config));
    tokio::spawn(async move {
        let _ = serve(server, state, ServeOptions::default()).await;
    });
    AgentClient::handshake(client).await.unwrap()
}

async fn client() -> AgentClient {
    client_with(AgentConfig {
        default_user: "root".into(),
        ..AgentConfig::default()
    })
    .await
}

fn sh(script: &str) -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    }
}

/// Reads a stream to its end: (stdout, stderr, pty, end).
async fn drain(mut stream: ProcessStream) -> (Vec<u8>, Vec<u8>, Vec<u8>, EndEvent) {
    let (mut out, mut err, mut pty) = (Vec::new(), Vec::new(), Vec::new());
    let mut end = None;
    while let Some(ev) = tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        match ev.unwrap().event.unwrap() {
            Event::Data(d) => match d.output.unwrap() {
                data_event::Output::Stdout(b) => out.extend(b),
                data_event::Output::Stderr(b) => err.extend(b),
                data_event::Output::Pty(b) => pty.extend(b),
            },
            Event::End(e) => {
                assert!(end.is_none(), "one end event");
                end = Some(e);
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    (out, err, pty, end.expect("end event"))
}

#[tokio::test]
async fn health_start_and_exit_codes() {
    let c = client().await;
    c.health().await.unwrap();
    let stream = c
        .start(sh("echo out; echo err >&2; exit 4"), CallOptions::default())
        .await
        .unwrap();
    assert!(stream.pid() > 0);
    let (out, err, _, end) = drain(stream).await;
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert_eq!(
        (end.exit_code, end.exited, end.status.as_str()),
        (4, true, "exit status 4")
    );
}

#[tokio::test]
async fn input_list_signal_and_connect() {
    let c = client().await;
    let mut req = sh("read x; echo got-$x; sleep 30");
    req.stdin = Some(true);
    req.tag = Some("t1".into());
    let stream = c
        .start(
            req,
            CallOptions {
                user: Some("root".into()),
                timeout: None,
            },
        )
        .await
        .unwrap();
    let pid = stream.pid();
    let listed = c.list().await.unwrap();
    let info = listed.iter().find(|p| p.pid == pid).expect("listed");
    assert_eq!(info.tag.as_deref(), Some("t1"));

    let connected = c.connect(Selector::Tag("t1".into())).await.unwrap();
    assert_eq!(connected.pid(), pid);
    c.send_input(Selector::Pid(pid), Bytes::from_static(b"a\n"), false)
        .await
        .unwrap();
    c.close_stdin(Selector::Pid(pid)).await.unwrap();
    // Wait for the output before killing, so both streams have seen it.
    let mut stream = stream;
    loop {
        match stream.next().await.unwrap().unwrap().event.unwrap() {
            Event::Data(d) if d.output == Some(data_event::Output::Stdout(b"got-a\n".to_vec())) => {
                break;
            }
            Event::Data(_) => {}
            other => panic!("{other:?}"),
        }
    }
    c.send_signal(Selector::Pid(pid), 9).await.unwrap();
    let (_, _, _, end) = drain(stream).await;
    assert_eq!(end.status, "signal: killed");
    let (out, _, _, end) = drain(connected).await;
    assert_eq!(out, b"got-a\n");
    assert_eq!(end.exit_code, -1);
}

#[tokio::test]
async fn pty_resize() {
    let c = client().await;
    let mut req = sh("read x; stty size");
    req.stdin = None;
    req.pty = Some(Pty {
        size: Some(pty::Size { cols: 80, rows: 24 }),
    });
    let stream = c.start(req, CallOptions::default()).await.unwrap();
    let pid = stream.pid();
    c.update_pty(Selector::Pid(pid), 132, 43).await.unwrap();
    c.send_input(Selector::Pid(pid), Bytes::from_static(b"\n"), true)
        .await
        .unwrap();
    let (_, _, pty, end) = drain(stream).await;
    assert!(String::from_utf8_lossy(&pty).contains("43 132"), "{pty:?}");
    assert_eq!(end.exit_code, 0);
}

#[tokio::test]
async fn typed_errors() {
    let c = client().await;
    let err = c
        .send_signal(Selector::Pid(999_999_999), 9)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert!(matches!(err, AgentError::Rpc { .. }));
    let err = c.connect(Selector::Pid(999_999_999)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let err = c.send_signal(Selector::Pid(1), 0).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    let err = c
        .start(
            sh("true"),
            CallOptions {
                user: Some("no-such-user-x".into()),
                timeout: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn process_deadline() {
    let c = client().await;
    let mut stream = c
        .start(
            sh("sleep 60"),
            CallOptions {
                user: None,
                timeout: Some(Duration::from_millis(500)),
            },
        )
        .await
        .unwrap();
    let err = loop {
        match tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("stream ended without the deadline error"),
        }
    };
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn files_round_trip() {
    let c = client().await;
    let dir = std::env::temp_dir().join(format!("moat-client-files-{}", std::process::id()));
    let path = dir.join("sub/hello.txt");
    let path = path.to_str().unwrap();
    c.write_file(path, Bytes::from_static(b"hello"), None)
        .await
        .unwrap();
    assert_eq!(&c.read_file(path, None, 1024).await.unwrap()[..], b"hello");
    let err = c.read_file(path, None, 2).await.unwrap_err();
    assert!(matches!(err, AgentError::TooLarge { limit: 2 }), "{err}");
    let missing = dir.join("missing");
    let err = c
        .read_file(missing.to_str().unwrap(), None, 16)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn filesystem_calls_and_streamed_files() {
    let c = client().await;
    let dir = std::env::temp_dir().join(format!("moat-client-fs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let at = |rel: &str| dir.join(rel).to_str().unwrap().to_owned();

    // A body in many chunks goes up as it is produced and comes back the same.
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..64u8)
        .map(|i| Ok(Bytes::from(vec![i; 40_000])))
        .collect();
    let expected: Vec<u8> = (0..64u8).flat_map(|i| vec![i; 40_000]).collect();
    c.write_file_stream(&at("a/big"), None, futures_util::stream::iter(chunks))
        .await
        .unwrap();
    let mut down = c.read_file_stream(&at("a/big"), None).await.unwrap();
    assert_eq!(down.size(), expected.len() as u64);
    let mut got = Vec::new();
    while let Some(chunk) = down.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert!(got == expected, "the streamed file came back different");
    // A failing body aborts the upload.
    let failing: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"part")),
        Err(std::io::Error::other("client went away")),
    ];
    assert!(
        c.write_file_stream(&at("a/cut"), None, futures_util::stream::iter(failing))
            .await
            .is_err()
    );

    let made = c.make_dir(&at("b/c"), None).await.unwrap();
    assert_eq!(made.path, at("b/c"));
    let err = c.make_dir(&at("b/c"), None).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let st = c.stat(&at("a/big"), None).await.unwrap();
    assert_eq!(st.size, expected.len() as i64);
    let moved = c
        .move_entry(&at("a/big"), &at("b/c/big"), None)
        .await
        .unwrap();
    assert_eq!(moved.path, at("b/c/big"));
    let listed = c.list_dir(&at("b"), 2, None).await.unwrap();
    let paths: Vec<&str> = listed.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, [at("b/c"), at("b/c/big")]);
    c.remove(&at("b"), None).await.unwrap();
    let err = c.stat(&at("b"), None).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c.read_file_stream(&at("b/c/big"), None).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let _ = std::fs::remove_dir_all(&dir);
}
