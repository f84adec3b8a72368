//! The `/files` routes over a real HTTP/1.1 connection (an in-memory duplex pipe): downloads,
//! uploads, encodings, metadata, signed URLs and the refusals.

mod common;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, symlink};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use moat_agent::files;
use moat_agent::filesystem::FsService;
use moat_agent::state::AgentState;
use moat_proto::filesystem::StatRequest;

type Body = BoxBody<Bytes, std::io::Error>;

const WAIT: Duration = Duration::from_secs(30);

/// Sends `req` to a fresh `/files` server for `state` and returns the response.
async fn send(state: &Arc<AgentState>, req: Request<Body>) -> Response<Incoming> {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let st = state.clone();
    tokio::spawn(async move {
        let svc = service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(files::handle(st, req).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server_io), svc)
            .await;
    });
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("response")
}

fn body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn q(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn get(query: &str) -> http::request::Builder {
    Request::get(format!("/files?{query}"))
}

async fn read_body(resp: Response<Incoming>) -> Vec<u8> {
    tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes()
        .to_vec()
}

async fn json(resp: Response<Incoming>) -> serde_json::Value {
    serde_json::from_slice(&read_body(resp).await).expect("json body")
}

/// Status and, for errors, checks the JSON error shape.
async fn status_of(resp: Response<Incoming>) -> StatusCode {
    let status = resp.status();
    if !status.is_success() {
        let v = json(resp).await;
        assert_eq!(v["code"].as_u64(), Some(u64::from(status.as_u16())), "{v}");
        assert!(v["message"].is_string(), "{v}");
    }
    status
}

fn path_of(dir: &tempfile::TempDir, rel: &str) -> String {
    format!("{}/{rel}", dir.path().display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_stream_identity_or_gzip() {
    require_root!();
    let dir = common::tempdir();
    let state = common::state("root");
    // Bigger than several chunks, not a multiple of one.
    let data: Vec<u8> = (0..3 * files::CHUNK + 1234)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    std::fs::write(dir.path().join("big.bin"), &data).expect("write");
    let path = path_of(&dir, "big.bin");

    let resp = send(
        &state,
        get(&format!("path={}", q(&path)))
            .body(body(""))
            .expect("req"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "application/octet-stream");
    assert_eq!(h["content-disposition"], "inline; filename=\"big.bin\"");
    assert_eq!(h["content-length"], data.len().to_string().as_str());
    assert!(h.get("content-encoding").is_none());
    assert_eq!(read_body(resp).await, data);

    let resp = send(
        &state,
        get(&format!("path={}&username=root", q(&path)))
            .header("accept-encoding", "gzip, deflate")
            .body(body(""))
            .expect("req"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let compressed = read_body(resp).await;
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .read_to_end(&mut plain)
        .expect("gunzip");
    assert_eq!(plain, data);

    let resp = send(
        &state,
        get(&format!("path={}", q(&path)))
            .header("accept-encoding", "br, identity;q=0")
            .body(body(""))
            .expect("req"),
    )
    .await;
    assert_eq!(status_of(resp).await, StatusCode::NOT_ACCEPTABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_errors() {
    require_root!();
    let dir = common::tempdir();
    let state = common::state("root");
    std::fs::create_dir(dir.path().join("d")).expect("mkdir");
    common::mkfifo(&dir.path().join("fifo"));
    let cases = [
        (
            format!("path={}", q(&path_of(&dir, "d"))),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("path={}", q(&path_of(&dir, "missing"))),
            StatusCode::NOT_FOUND,
        ),
        (String::new(), StatusCode::BAD_REQUEST),
        (
            format!("path={}&username=no-such-user-xyz", q(&path_of(&dir, "d"))),
            StatusCode::UNAUTHORIZED,
        ),
        // Special files: refused by type, without blocking.
        (
            format!("path={}", q(&path_of(&dir, "fifo"))),
            StatusCode::BAD_REQUEST,
        ),
        ("path=%2Fdev%2Fzero".to_string(), StatusCode::BAD_REQUEST),
        // Magic links.
        (
            format!("path={}", q("/proc/self/root/etc/passwd")),
            StatusCode::FORBIDDEN,
        ),
        (
            format!("path={}", q("/proc/self/fd/0")),
            StatusCode::FORBIDDEN,
        ),
        // NUL and invalid UTF-8.
        ("path=%2Ftmp%2Fa%00b".to_string(), StatusCode::BAD_REQUEST),
        ("path=%2Ftmp%2F%ff".to_string(), StatusCode::BAD_REQUEST),
    ];
    for (query, want) in cases {
        let resp = send(&state, get(&query).body(body("")).expect("req")).await;
        assert_eq!(status_of(resp).await, want, "query {query:?}");
    }
    let put = send(
        &state,
        Request::put("/files?path=%2Ftmp%2Fx")
            .body(body(""))
            .expect("req"),
    )
    .await;
    assert_eq!(status_of(put).await, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_run_as_the_user() {
    require_root!();
    if moat_agent::users::lookup("nobody").is_none() {
        eprintln!("skipped: the host has no 'nobody' user");
        return;
    }
    let dir = common::tempdir();
    let state = common::state("root");
    std::fs::write(dir.path().join("private"), "secret").expect("write");
    std::fs::set_permissions(
        dir.path().join("private"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let query = format!("path={}", q(&path_of(&dir, "private")));
    let as_root = send(&state, get(&query).body(body("")).expect("req")).await;
    assert_eq!(read_body(as_root).await, b"secret");
    let as_nobody = send(
        &state,
        get(&format!("{query}&username=nobody"))
            .body(body(""))
            .expect("req"),
    )
    .await;
    assert_eq!(status_of(as_nobody).await, StatusCode::FORBIDDEN);

    // A symlink to /etc/shadow is the sandbox's own file, read with the caller's rights.
    symlink("/etc/shadow", dir.path().join("shadow")).expect("symlink");
    let query = format!("path={}", q(&path_of(&dir, "shadow")));
    if let Ok(expected) = std::fs::read("/etc/shadow") {
        let as_root = send(&state, get(&query).body(body("")).expect("req")).await;
        assert_eq!(read_body(as_root).await, expected);
    }
    let as_nobody = send(
        &state,
        get(&format!("{query}&username=nobody"))
            .body(body(""))
            .expect("req"),
    )
    .await;
    assert_eq!(status_of(as_nobody).await, StatusCode::FORBIDDEN);
}

fn multipart(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, filename, data) in parts {
        write!(
            out,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\""
        )
        .expect("write");
        if let Some(f) = filename {
            write!(out, "; filename=\"{f}\"").expect("write");
        }
        out.extend_from_slice(b"\r\nContent-Type: application/octet-stream\r\n\r\n");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    write!(out, "--{boundary}--\r\n").expect("write");
    out
}

fn post(query: &str, content_type: &str) -> http::request::Builder {
    Request::post(format!("/files?{query}")).header("content-type", content_type)
}

/// A `POST /files?{query}` request with an octet-stream body.
fn octet(query: &str) -> http::request::Builder {
    post(query, "application/octet-stream")
}

/// `POST /files?{query}` of `data` as one octet-stream body.
async fn upload(
    state: &Arc<AgentState>,
    query: &str,
    data: impl Into<Bytes>,
) -> Response<Incoming> {
    send(state, octet(query).body(body(data)).expect("req")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_uploads_use_full_filenames() {
    require_root!();
    let dir = common::tempdir();
    let state = common::state("root");
    let a = path_of(&dir, "new/dirs/a.txt");
    let b = path_of(&dir, "other/b \\\"q\\\".txt");
    let form = multipart(
        "bnd42",
        &[
            ("file", Some(&a), b"alpha"),
            ("ignored", None, b"not a file"),
            ("file", Some(&b), b"beta"),
        ],
    );
    let resp = send(
        &state,
        post("", "multipart/form-data; boundary=bnd42")
            .body(body(form))
            .expect("req"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v = json(resp).await;
    let b_real = path_of(&dir, "other/b \"q\".txt");
    assert_eq!(
        v,
        serde_json::json!([
            {"path": a, "name": "a.txt", "type": "file"},
            {"path": b_real, "name": "b \"q\".txt", "type": "file"},
        ])
    );
    assert_eq!(std::fs::read(&a).expect("a"), b"alpha");
    assert_eq!(std::fs::read(&b_real).expect("b"), b"beta");

    // `path` overrides the filename; overwriting truncates.
    let dest = path_of(&dir, "fixed.txt");
    std::fs::write(&dest, "a much longer old content").expect("write");
    let form = multipart("x", &[("file", Some("ignored-name"), b"short")]);
    let resp = send(
        &state,
        post(
            &format!("path={}", q(&dest)),
            "multipart/form-data; boundary=x",
        )
        .body(body(form))
        .expect("req"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(std::fs::read(&dest).expect("dest"), b"short");

    // Two parts to one destination.
    let dup = path_of(&dir, "dup.txt");
    let form = multipart(
        "x",
        &[("file", Some(&dup), b"1"), ("file", Some(&dup), b"2")],
    );
    let resp = send(
        &state,
        post("", "multipart/form-data; boundary=x")
            .body(body(form))
            .expect("req"),
    )
    .await;
    assert_eq!(status_of(resp).await, StatusCode::BAD_REQUEST);

    // A destination that is a directory; a form without file parts; a broken form.
    std::fs::create_dir(dir.path().join("adir")).expect("mkdir");
    let bad = [
        multipart("x", &[("file", Some(&path_of(&dir, "adir")), b"1")]),
        multipart("x", &[("other", None, b"1")]),
        b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/t\"\r\n\r\nunterminated"
            .to_vec(),
    ];
    for form in bad {
        let resp = send(
            &state,
            post("", "multipart/form-data; boundary=x")
                .body(body(form))
                .expect("req"),
        )
        .await;
        assert_eq!(status_of(resp).await, StatusCode::BAD_REQUEST);
    }
    let resp = send(
        &state,
        post(&format!("path={}", q(&dest)), "text/plain")
            .body(body("x"))
            .expect("req"),
    )
    .await;
    assert_eq!(status_of(resp).await, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn octet_stream_uploads_plain_and_gzip() {
    require_root!();
    let dir = common::tempdir();
    let state = common::state("root");
    let dest = path_of(&dir, "deep/er/o.bin");
    // A streamed body of many chunks.
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..200)
        .map(|i| Ok(Frame::data(Bytes::from(vec![i as u8; 10_000]))))
        .collect();
    let streamed = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks)));
    let resp = send(
        &state,
        octet(&format!("path={}", q(&dest)))
            .body(streamed)
            .expect("req"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        json(resp).await,
        serde_json::json!([{"path": dest, "name": "o.bin", "type": "file"}])
    );
    let written = std::fs::read(&dest).expect("read");
    assert_eq!(written.len(), 2_000_000);
    assert!(
        written
            .chunks(10_000)
            .enumerate()
            .all(|(i, c)| c.iter().all(|b| *b == i as u8))
    );

    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(b"compressed content").expect("gzip");
    let gz = enc.finish().expect("gzip");
    let gz_dest = path_of(&dir, "g.txt");
    // A truncated stream is a bad body, not a short file.
    let resp = send(
        &state,
        octet(&format!("path={}", q(&gz_dest)))
            .header("content-encoding", "gzip")
            .body(body(gz[..gz.len() - 6].to_vec()))
            .expect("req"),
    )
    .await;
    assert_eq!(status_of(resp).await, StatusCode::BAD_REQUEST);
    let resp = send(
        &state,
        octet(&format!("path={}", q(&gz_dest)))
            .header("content-encoding", "gzip")
            .body(body(gz))
            .expect("req"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        std::fs::read(&gz_dest).expect("read"),
        b"compressed content"
    );

    let resp = send(
        &state,
        octet(&format!("path={}", q(&gz_dest)))
            .header("content-encoding", "gzip")
            .body(body("this is not gzip"))
            .expect("req"),
    )
    .await;
    assert_eq!(status_of(resp).await, StatusCode::BAD_REQUEST);
    let resp = upload(&state, "", "no path").await;
    assert_eq!(status_of(resp).await, StatusCode::BAD_REQUEST);
    let resp = send(
        &state,
        octet(&format!("path={}", q(&gz_dest)))
            .header("content-encoding", "br")
            .body(body("x"))
            .expect("req"),
    )
    .await;
    assert_eq!(status_of(resp).await, StatusCode::BAD_REQUEST);

    // Onto a FIFO: refused, and no hang.
    common::mkfifo(&dir.path().join("fifo"));
    let resp = upload(&state, &format!("path={}", q(&path_of(&dir, "fifo"))), "x").await;
    assert_eq!(status_of(resp).await, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_run_as_the_user_and_belong_to_them() {
    require_root!();
    let Some(nobody) = moat_agent::users::lookup("nobody") else {
        eprintln!("skipped: the host has no 'nobody' user");
        return;
    };
    let dir = common::tempdir();
    let state = common::state("root");
    let own = dir.path().join("nobodys");
    std::fs::create_dir(&own).expect("mkdir");
    std::os::unix::fs::chown(&own, Some(nobody.uid), Some(nobody.gid)).expect("chown");
    let dest = format!("{}/sub/file.txt", own.display());
    let resp = upload(
        &state,
        &format!("path={}&username=nobody", q(&dest)),
        "mine",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    for p in [format!("{}/sub", own.display()), dest.clone()] {
        let md = std::fs::metadata(&p).expect("exists");
        assert_eq!((md.uid(), md.gid()), (nobody.uid, nobody.gid), "{p}");
    }
    // Not into root's directory.
    let resp = upload(
        &state,
        &format!("path={}&username=nobody", q(&path_of(&dir, "x.txt"))),
        "no",
    )
    .await;
    assert_eq!(status_of(resp).await, StatusCode::FORBIDDEN);
    assert!(!dir.path().join("x.txt").exists());
}

async fn metadata_of(
    fs: &FsService,
    user: &moat_agent::users::User,
    path: &str,
) -> std::collections::HashMap<String, String> {
    fs.stat(user, StatRequest { path: path.into() })
        .await
        .expect("stat")
        .entry
        .expect("entry")
        .metadata
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_headers_become_xattrs() {
    require_root!();
    let dir = common::tempdir();
    let state = common::state("root");
    let fs = FsService::new(state.clone());
    let root = common::root_user(dir.path());
    let dest = path_of(&dir, "m.txt");
    let resp = send(
        &state,
        octet(&format!("path={}", q(&dest)))
            .header("x-metadata-Owner", "alice")
            .header("x-metadata-purpose", "test run")
            .body(body("m"))
            .expect("req"),
    )
    .await;
    let status = resp.status();
    if status == StatusCode::BAD_REQUEST {
        let v = json(resp).await;
        if v["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not support"))
        {
            eprintln!("skipped: /tmp has no user xattrs: {v}");
            return;
        }
        panic!("upload failed: {v}");
    }
    assert_eq!(status, StatusCode::OK);
    let md = metadata_of(&fs, &root, &dest).await;
    assert_eq!(md.len(), 2, "{md:?}");
    assert_eq!(md["owner"], "alice");
    assert_eq!(md["purpose"], "test run");

    // The next upload replaces the set; none clears it.
    let resp = send(
        &state,
        octet(&format!("path={}", q(&dest)))
            .header("x-metadata-k", "v")
            .body(body("m"))
            .expect("req"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let md = metadata_of(&fs, &root, &dest).await;
    assert_eq!(
        md.into_iter().collect::<Vec<_>>(),
        [("k".into(), "v".into())]
    );
    let resp = upload(&state, &format!("path={}", q(&dest)), "m").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(metadata_of(&fs, &root, &dest).await.is_empty());

    let too_big = "v".repeat(files::MAX_METADATA_TOTAL);
    let resp = send(
        &state,
        octet(&format!("path={}", q(&dest)))
            .header("x-metadata-big", too_big.as_str())
            .body(body("m"))
            .expect("req"),
    )
    .await;
    assert_eq!(status_of(resp).await, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_space_is_507() {
    require_root!();
    let dir = common::tempdir();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a small tmpfs here");
        return;
    }
    let state = common::state("root");
    let dest = format!("{}/big.bin", small.display());
    let resp = upload(&state, &format!("path={}", q(&dest)), vec![7u8; 1 << 20]).await;
    let status = status_of(resp).await;
    let _ = std::process::Command::new("umount").arg(&small).status();
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_make_missing_parents_for_the_user() {
    require_root!();
    let Some(nobody) = moat_agent::users::lookup("nobody") else {
        eprintln!("skipped: the host has no 'nobody' user");
        return;
    };
    // `dir` is root's (0755): nobody could not make `0` in it.
    let dir = common::tempdir();
    let state = common::state("root");
    let dest = path_of(&dir, "0/a/b.txt");
    let resp = upload(
        &state,
        &format!("path={}&username=nobody", q(&dest)),
        "made",
    )
    .await;
    assert_eq!(status_of(resp).await, StatusCode::OK);
    assert_eq!(std::fs::read_to_string(&dest).expect("read"), "made");
    for p in [path_of(&dir, "0"), path_of(&dir, "0/a"), dest] {
        let md = std::fs::metadata(&p).expect("exists");
        assert_eq!((md.uid(), md.gid()), (nobody.uid, nobody.gid), "{p}");
    }
    // An existing directory is not taken over: the file is still opened as the user.
    let resp = upload(
        &state,
        &format!("path={}&username=nobody", q(&path_of(&dir, "x.txt"))),
        "no",
    )
    .await;
    assert_eq!(status_of(resp).await, StatusCode::FORBIDDEN);
    assert_eq!(
        std::fs::metadata(dir.path()).expect("dir").uid(),
        0,
        "the existing directory stays root's"
    );
}

/// A multipart body sent as it is pulled: `head`, then `rest` bytes of a second part in 64 KiB
/// pieces, then the closing boundary. Counts the bytes the server pulled.
fn counted_upload(
    boundary: &str,
    head: Vec<u8>,
    rest: usize,
    pulled: Arc<std::sync::atomic::AtomicUsize>,
) -> Body {
    let mut pieces = vec![Bytes::from(head)];
    pieces.push(Bytes::from(format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/never\"\r\n\r\n"
    )));
    let piece = Bytes::from(vec![b'z'; 64 * 1024]);
    for _ in 0..rest.div_ceil(piece.len()) {
        pieces.push(piece.clone());
    }
    pieces.push(Bytes::from(format!("\r\n--{boundary}--\r\n")));
    let stream = futures_util::StreamExt::map(futures_util::stream::iter(pieces), move |b| {
        pulled.fetch_add(b.len(), std::sync::atomic::Ordering::SeqCst);
        Ok::<_, std::io::Error>(Frame::data(b))
    });
    StreamBody::new(stream).boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_is_read_before_the_answer() {
    require_root!();
    let dir = common::tempdir();
    let state = common::state("root");
    let boundary = "XyZ";
    // The first part's destination is a directory: refused before the rest has arrived.
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\n\r\nx\r\n",
        dir.path().display()
    )
    .into_bytes();
    let rest = 8 << 20;
    let pulled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let upload = counted_upload(boundary, head.clone(), rest, pulled.clone());
    let total = head.len() + rest;
    let resp = send(
        &state,
        post("", &format!("multipart/form-data; boundary={boundary}"))
            .body(upload)
            .expect("req"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v = json(resp).await;
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("is a directory")),
        "{v}"
    );
    // The whole body was read before the answer came.
    assert!(
        pulled.load(std::sync::atomic::Ordering::SeqCst) >= total,
        "{} of {total} bytes read",
        pulled.load(std::sync::atomic::Ordering::SeqCst)
    );

    // Past the bound the agent stops reading and answers.
    let bound = usize::try_from(files::MAX_DRAIN_BYTES).expect("fits");
    let pulled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let upload = counted_upload(boundary, head.clone(), 2 * bound, pulled.clone());
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let st = state.clone();
    let server = tokio::spawn(async move {
        let svc = service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(files::handle(st, req).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server_io), svc)
            .await;
    });
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = post("", &format!("multipart/form-data; boundary={boundary}"))
        .body(upload)
        .expect("req");
    let answered = tokio::spawn(async move { sender.send_request(req).await });
    // The server's side ends (answer written, connection closed) without reading everything.
    tokio::time::timeout(WAIT, server)
        .await
        .expect("the agent stops reading at the bound")
        .expect("server task");
    let read = pulled.load(std::sync::atomic::Ordering::SeqCst);
    assert!(read < head.len() + 2 * bound, "read {read} bytes");
    assert!(read > bound, "read only {read} bytes");
    answered.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_answers_carry_the_metadata() {
    require_root!();
    let dir = common::tempdir();
    let state = common::state("root");
    let dest = path_of(&dir, "answer.txt");
    let resp = send(
        &state,
        octet(&format!("path={}", q(&dest)))
            .header("x-metadata-Owner", "alice")
            .body(body("a"))
            .expect("req"),
    )
    .await;
    let status = resp.status();
    let v = json(resp).await;
    if status == StatusCode::BAD_REQUEST
        && v["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not support"))
    {
        eprintln!("skipped: the test directory has no user xattrs: {v}");
        return;
    }
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        serde_json::json!([{"path": dest, "name": "answer.txt", "type": "file",
            "metadata": {"owner": "alice"}}])
    );
    // Every part of a multipart upload gets (and reports) the same metadata.
    let form = multipart(
        "b0",
        &[
            ("file", Some(&path_of(&dir, "p1.txt")), b"1"),
            ("file", Some(&path_of(&dir, "p2.txt")), b"2"),
        ],
    );
    let resp = send(
        &state,
        post("", "multipart/form-data; boundary=b0")
            .header("x-metadata-k", "v")
            .body(body(form))
            .expect("req"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v = json(resp).await;
    let all = v.as_array().expect("array");
    assert_eq!(all.len(), 2, "{v}");
    for item in all {
        assert_eq!(item["metadata"], serde_json::json!({"k": "v"}), "{v}");
    }
    // Without metadata the answer has none.
    let resp = upload(&state, &format!("path={}", q(&dest)), "b").await;
    let v = json(resp).await;
    assert!(v[0].get("metadata").is_none(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_report_no_size_are_read_to_their_end() {
    require_root!();
    let state = common::state("root");
    let path = "/proc/sys/kernel/random/boot_id";
    let expected = std::fs::read(path).expect("read boot_id");
    assert_eq!(std::fs::metadata(path).expect("stat").len(), 0);
    for gzip in [false, true] {
        let mut req = get(&format!("path={}", q(path)));
        if gzip {
            req = req.header("accept-encoding", "gzip");
        }
        let resp = send(&state, req.body(body("")).expect("req")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        if !gzip {
            // The real length, known once the file was read.
            let len = expected.len().to_string();
            assert_eq!(resp.headers()["content-length"], len.as_str());
        }
        let mut got = read_body(resp).await;
        if gzip {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&got[..])
                .read_to_end(&mut plain)
                .expect("gunzip");
            got = plain;
        }
        assert_eq!(got, expected, "gzip {gzip}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upload_of_a_new_file_is_create_chmod_write() {
    use futures_util::StreamExt;
    use moat_proto::filesystem::{EventType, WatchDirRequest};
    require_root!();
    let dir = common::tempdir();
    let state = common::state("root");
    let fs = FsService::new(state.clone());
    let root = common::root_user(dir.path());
    let mut events = fs
        .watch_dir(
            &root,
            WatchDirRequest {
                path: dir.path().display().to_string(),
                recursive: false,
                include_entry: false,
                allow_network_mounts: false,
            },
        )
        .await
        .expect("watch");
    for name in ["new.txt", "marker"] {
        let resp = upload(
            &state,
            &format!("path={}", q(&path_of(&dir, name))),
            "hello",
        )
        .await;
        assert_eq!(status_of(resp).await, StatusCode::OK);
    }
    // Events arrive in order: once the marker's CREATE is in, all of new.txt's are.
    let mut kinds = Vec::new();
    loop {
        let ev = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("event");
        if ev.name == "marker" {
            break;
        }
        assert_eq!(ev.name, "new.txt");
        kinds.push(EventType::try_from(ev.r#type).expect("event type"));
    }
    assert_eq!(
        kinds,
        [EventType::Create, EventType::Chmod, EventType::Write],
        "what upstream's envd reports for one write of a new file"
    );
}
