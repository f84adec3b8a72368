//! Jobs with their blobs in S3-compatible storage: a real S3-protocol server (moto, from the
//! test venv scripts/test-deps.sh makes) on loopback, `moat serve --blob-store s3://…`, a job
//! end to end, its output after a `kill -9` and restart, and its objects gone with it. Needs
//! root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;
use support::need_root;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::server::*;

/// moto's S3 server on a free loopback port, killed on drop.
struct S3 {
    child: Child,
    port: u16,
}

impl S3 {
    fn start() -> S3 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(support::test_python())
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto (scripts/test-deps.sh installs it)");
        let s3 = S3 { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_send(port, "GET", "/", &[], None).is_err() {
            assert!(Instant::now() < deadline, "moto never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
        s3
    }

    /// The keys of the objects in `bucket` under `prefix`.
    fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let r = http_send(
            self.port,
            "GET",
            &format!("/{bucket}?list-type=2&prefix={prefix}"),
            &[],
            None,
        )
        .expect("list objects");
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
            .split("<Key>")
            .skip(1)
            .filter_map(|k| k.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait(server: &Server, key: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = server
            .request("GET", &format!("/v1/jobs/{id}"), Some(key), None)
            .json();
        if !matches!(j["state"].as_str(), Some("queued" | "running")) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} never ended: {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn jobs_keep_their_blobs_in_s3() {
    need_root!();
    let s3 = S3::start();
    let r = http_send(s3.port, "PUT", "/moat-blobs", &[], None).expect("make bucket");
    assert_eq!(r.status, 200, "{}", r.text());
    let endpoint = format!("http://127.0.0.1:{}", s3.port);
    let env = [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "moat-test"),
        ("AWS_SECRET_ACCESS_KEY", "moat-test"),
    ];
    let args = ["--blob-store", "s3://moat-blobs/jobs"];
    let dir = tempfile::Builder::new()
        .prefix("moat-serve-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start_in_with_env(dir, data, &args, &env);
    let key = server.admin_key();

    let r = server.request("POST", "/v1/blobs", Some(&key), Some(b"abc"));
    assert_eq!(r.status, 201, "{}", r.text());
    let blob = r.json()["digest"].as_str().expect("digest").to_owned();
    let r = server.request(
        "POST",
        "/v1/jobs",
        Some(&key),
        Some(
            &serde_json::to_vec(&json!({
                "shell": "tr a-z A-Z < in > out; echo done",
                "inputs": [{"path": "in", "blob": blob}],
                "outputs": ["out"],
            }))
            .expect("json"),
        ),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let j = wait(&server, &key, &id);
    assert_eq!(j["state"], "succeeded", "{j}");
    let out = j["outputs"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    // In the bucket, under the prefix, by digest: the input, the output and the log.
    let keys = s3.keys("moat-blobs", "jobs/sha256/");
    for digest in [&blob, &out] {
        let name = format!("jobs/sha256/{}", digest.trim_start_matches("sha256:"));
        assert!(keys.contains(&name), "{name} not in {keys:?}");
    }
    assert!(
        !server.data.join("blobs").exists(),
        "blobs went to the data dir instead"
    );

    // After a kill -9 and a restart, the output is still there.
    let (dir, data) = server.kill9();
    let server = Server::start_in_with_env(dir, data, &args, &env);
    let r = server.request(
        "GET",
        &format!("/v1/jobs/{id}/output?path=/home/user/out"),
        Some(&key),
        None,
    );
    assert_eq!((r.status, r.text()), (200, "ABC".to_owned()));
    let r = server.request(
        "GET",
        &format!("/v1/jobs/{id}/logs/stdout"),
        Some(&key),
        None,
    );
    assert_eq!(r.text(), "done\n");

    // Deleted: its output's object goes; the upload it used stays with its uploader.
    let r = server.request("DELETE", &format!("/v1/jobs/{id}"), Some(&key), None);
    assert_eq!(r.status, 204, "{}", r.text());
    let keys = s3.keys("moat-blobs", "jobs/sha256/");
    let out_key = format!("jobs/sha256/{}", out.trim_start_matches("sha256:"));
    let blob_key = format!("jobs/sha256/{}", blob.trim_start_matches("sha256:"));
    assert!(!keys.contains(&out_key), "{out_key} stayed: {keys:?}");
    assert!(keys.contains(&blob_key), "{blob_key} went: {keys:?}");
    let r = server.request("DELETE", &format!("/v1/blobs/{blob}"), Some(&key), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(s3.keys("moat-blobs", "jobs/sha256/").is_empty());
}
