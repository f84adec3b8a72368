//! The gvisor backend as users reach it: `moat run --backend gvisor`, and a `moat serve`
//! template naming it, with real runsc containers; the sandbox's kernel is gVisor's, and nothing
//! is left on the host afterwards. A host without runsc gets a refusal that says how to install
//! it. Needs root (skips with a printed reason otherwise) and runsc (scripts/test-deps.sh
//! installs it; a host without it fails these tests rather than skipping them).

use std::process::{Command, Output, Stdio};

use moat_test_support as support;
use serde_json::json;
use support::fakenet::{FakeNet, curl};
use support::server::*;
use support::{MEMORY_COUNTER, need_root, need_runsc};

fn moat() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moat"))
}

fn run(args: &[&str]) -> Output {
    moat()
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run moat")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What sandbox `id` could leave on the host: its cgroups, its runsc directory, and processes
/// whose command line names it.
fn leftovers(id: &str) -> Vec<String> {
    let layout = moat_jail::cgroup::Layout::detect().expect("cgroup layout");
    let mut left: Vec<String> = layout
        .bases()
        .into_iter()
        .map(|b| b.join(id))
        .filter(|d| d.exists())
        .map(|d| d.display().to_string())
        .collect();
    let dir = std::path::Path::new("/run/moat/gvisor").join(id);
    if dir.exists() {
        left.push(dir.display().to_string());
    }
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = text(&cmdline).replace('\0', " ");
        if cmdline.contains("runsc") && cmdline.contains(id) {
            left.push(format!(
                "process {}: {cmdline}",
                e.file_name().to_string_lossy()
            ));
        }
    }
    left
}

/// A server with a template `sentry` on gvisor, and its admin key.
fn gvisor_server() -> (Server, String) {
    let server = Server::start();
    let key = server.admin_key();
    server.create_template(
        &key,
        "sentry",
        json!({"rootfs": "host", "user": "user", "backend": "gvisor"}),
    );
    (server, key)
}

/// A sandbox of `sentry` running [`MEMORY_COUNTER`], which has counted for half a second.
fn counting_sandbox(server: &Server, key: &str) -> String {
    let id = server.create_sandbox_with(key, json!({"template": "sentry"}));
    server.shell(key, &id, MEMORY_COUNTER);
    std::thread::sleep(std::time::Duration::from_millis(500));
    id
}

/// `POST /v1/sandboxes/{id}/{action}` (`pause`, `resume`) with no body.
fn act(server: &Server, key: &str, id: &str, action: &str) -> Reply {
    server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/{action}"),
        Some(key),
        None,
    )
}

/// Deletes sandbox `id`, which must leave nothing on the host.
fn delete(server: &Server, key: &str, id: &str) {
    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(key), None);
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
    assert!(leftovers(id).is_empty(), "{:?}", leftovers(id));
}

/// Takes a snapshot with memory of sandbox `id`; its id.
fn snapshot_with_memory(server: &Server, key: &str, id: &str) -> String {
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/snapshots"),
        Some(key),
        Some(&body(json!({"memory": true}))),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().expect("id").to_owned()
}

/// The count of sandbox `id`'s [`MEMORY_COUNTER`].
fn count(server: &Server, key: &str, id: &str) -> u64 {
    let out = server.shell(key, id, "cat /tmp/n");
    out["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{id}: {out}"))
}

#[test]
fn moat_run_on_gvisor_prints_exits_and_leaves_nothing() {
    need_root!();
    need_runsc();
    let id = format!("gvisorrun{:010}", std::process::id());
    let o = run(&[
        "--backend",
        "gvisor",
        "--id",
        &id,
        "--",
        "python3",
        "-c",
        "print(1)",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "1\n");
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));

    // The command's exit status comes back; the kernel it ran on is gVisor's, not the host's.
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("release");
    let o = run(&[
        "--backend",
        "gvisor",
        "--",
        "sh",
        "-c",
        "uname -r; id -un; exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let mut lines = out.lines();
    let release = lines.next().unwrap_or_default();
    assert!(
        !release.is_empty() && release != host_release.trim(),
        "the sandbox saw the host's kernel {release:?}"
    );
    assert_eq!(lines.next(), Some("user"), "{out}");
}

#[test]
fn moat_run_on_gvisor_without_runsc_says_how_to_install_it() {
    need_root!();
    let o = moat()
        .args(["run", "--backend", "gvisor", "--", "true"])
        .env("PATH", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .expect("run moat");
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("runsc") && err.contains("apt-get install runsc"),
        "{err}"
    );
}

#[test]
fn a_template_on_gvisor_runs_commands_and_files_and_leaves_nothing() {
    need_root!();
    need_runsc();
    let (server, key) = gvisor_server();
    let id = server.create_sandbox_with(&key, json!({"template": "sentry"}));
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["backend"], "gvisor", "{}", r.text());

    let out = server.shell(&key, &id, "python3 -c 'print(6*7)'; id -un");
    assert_eq!(out["stdout"], "42\nuser\n", "{out}");

    let path = format!("/v1/sandboxes/{id}/files?path=/home/user/note.txt");
    let r = server.send("PUT", &path, Some(&key), &[], Some(b"through the sentry"));
    let r = r.expect("upload");
    assert_eq!(r.status, 200, "upload: {}", r.text());
    let out = server.shell(&key, &id, "cat /home/user/note.txt");
    assert_eq!(out["stdout"], "through the sentry", "{out}");
    let r = server.request("GET", &path, Some(&key), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"through the sentry");

    // The default template still runs on the native backend, beside it.
    let native = server.create_sandbox(&key);
    let r = server.request("GET", &format!("/v1/sandboxes/{native}"), Some(&key), None);
    assert_eq!(r.json()["backend"], "native", "{}", r.text());

    for sandbox in [&id, &native] {
        let r = server.request(
            "DELETE",
            &format!("/v1/sandboxes/{sandbox}"),
            Some(&key),
            None,
        );
        assert!(r.status == 200 || r.status == 204, "{}", r.text());
    }
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));
}

mod memory {
    //! Memory checkpoints at the backend: a counter checkpointed at N goes on from N in the
    //! sandboxes restored from it, which are independent of each other.

    use std::time::Duration;

    use moat_backend_gvisor::{GvisorBackend, GvisorOptions};
    use moat_engine::agent_client::{AgentClient, CallOptions};
    use moat_engine::backend::{Backend, Instance};
    use moat_engine::plan::SandboxPlan;
    use moat_proto::process::{ProcessConfig, StartRequest};

    use super::{leftovers, need_runsc};

    async fn connect(inst: &mut Box<dyn Instance>) -> AgentClient {
        let channel = inst.take_channel().expect("channel");
        let client = AgentClient::handshake(channel).await.expect("handshake");
        client.health().await.expect("health");
        client
    }

    /// Runs `script` with `sh -c` and waits for it to end.
    async fn sh(client: &AgentClient, script: &str) {
        let req = StartRequest {
            process: Some(ProcessConfig {
                cmd: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                ..Default::default()
            }),
            stdin: Some(false),
            ..Default::default()
        };
        let opts = CallOptions {
            user: Some("user".into()),
            timeout: Some(Duration::from_secs(30)),
        };
        let mut stream = client.start(req, opts).await.expect("start");
        while let Some(ev) = stream.next().await {
            ev.expect("event");
        }
    }

    async fn counter(client: &AgentClient) -> u64 {
        // The counter replaces the file (a rename) every 20 ms: each read finds one version.
        let b = client
            .read_file("/tmp/n", Some("user"), 64)
            .await
            .expect("read /tmp/n");
        String::from_utf8_lossy(&b)
            .trim()
            .parse()
            .expect("a number")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_counter_goes_on_from_its_checkpoint_in_independent_restores() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: the gvisor backend needs root");
            return;
        }
        need_runsc();
        let backend = GvisorBackend::new(&GvisorOptions {
            agent_binary: Some(env!("CARGO_BIN_EXE_moat").into()),
            ..GvisorOptions::default()
        })
        .expect("gvisor backend");
        let plan = SandboxPlan::host("gvisor");
        let pid = std::process::id();
        let (source, fork_a, fork_b) = (
            format!("gvsrc{pid:010}"),
            format!("gvforka{pid:010}"),
            format!("gvforkb{pid:010}"),
        );
        let mut inst = backend.create(&source, &plan).await.expect("create");
        let client = connect(&mut inst).await;
        // A counter in memory, written out every 20 ms; it never starts over by itself.
        sh(
            &client,
            "python3 -c 'import time\ni=0\nwhile True:\n    i+=1\n    open(\"/tmp/n.new\",\"w\").write(str(i))\n    __import__(\"os\").rename(\"/tmp/n.new\",\"/tmp/n\")\n    time.sleep(0.02)' >/dev/null 2>&1 &",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = counter(&client).await;
        assert!(before > 5, "the counter did not run: {before}");

        let image = tempfile::Builder::new()
            .prefix("moat-gvisor-image-")
            .tempdir_in("/tmp")
            .expect("image dir");
        client.expect_reconnect().await.expect("expect reconnect");
        drop(client);
        inst.checkpoint(image.path()).await.expect("checkpoint");
        inst.destroy().await.expect("destroy the source");

        let mut a = backend
            .restore(&fork_a, &plan, image.path())
            .await
            .expect("restore a");
        let mut b = backend
            .restore(&fork_b, &plan, image.path())
            .await
            .expect("restore b");
        let (ca, cb) = (connect(&mut a).await, connect(&mut b).await);
        let (a1, b1) = (counter(&ca).await, counter(&cb).await);
        // Both go on from where the source was, not from 1.
        assert!(
            a1 >= before && b1 >= before,
            "before {before}, restored {a1} and {b1}"
        );
        // Independent: files written in one are not in the other, and both keep counting.
        sh(&ca, "echo only-a > /tmp/mark").await;
        let mark_b = cb.read_file("/tmp/mark", Some("user"), 64).await;
        assert!(mark_b.is_err(), "a's file showed in b: {mark_b:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (a2, b2) = (counter(&ca).await, counter(&cb).await);
        assert!(
            a2 > a1 && b2 > b1,
            "stopped counting: a {a1}->{a2}, b {b1}->{b2}"
        );

        drop((ca, cb));
        a.destroy().await.expect("destroy a");
        b.destroy().await.expect("destroy b");
        for id in [&source, &fork_a, &fork_b] {
            assert!(leftovers(id).is_empty(), "{id}: {:?}", leftovers(id));
        }
    }
}

/// The counter demo over `/v1`: a running counter snapshotted with its memory at N goes on
/// from N, in the sandbox it was taken of and in a sandbox made from the snapshot; a tampered
/// snapshot is refused; a native sandbox cannot be snapshotted with memory.
#[test]
fn a_snapshot_with_memory_goes_on_counting_over_the_api() {
    need_root!();
    need_runsc();
    let (server, key) = gvisor_server();
    let id = counting_sandbox(&server, &key);
    let count = |sandbox: &str| count(&server, &key, sandbox);
    let before = count(&id);
    assert!(before > 5, "the counter did not run: {before}");

    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/snapshots"),
        Some(&key),
        Some(&body(json!({"memory": true}))),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let snapshot = r.json();
    assert_eq!(snapshot["memory"], true, "{snapshot}");
    assert!(
        snapshot["size_bytes"].as_u64().unwrap_or(0) > 0,
        "{snapshot}"
    );
    let snap = snapshot["id"].as_str().expect("id").to_owned();

    // The source runs on from where it was.
    let source = count(&id);
    assert!(
        source >= before,
        "the source restarted: {before} then {source}"
    );

    // A sandbox made from it goes on from the checkpoint, not from 1.
    let copy = server.create_sandbox_with(&key, json!({"snapshot": snap}));
    let first = count(&copy);
    assert!(first >= before, "the copy restarted: {before} then {first}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let later = count(&copy);
    assert!(
        later > first,
        "the copy stopped counting: {first} then {later}"
    );

    // A changed checkpoint is refused before anything runs from it.
    let dir = server.data.join("snapshots").join(format!("{snap}.mem"));
    let image = std::fs::read_dir(&dir)
        .expect("snapshot dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n != "manifest.json"))
        .expect("a checkpoint file");
    let mut bytes = std::fs::read(&image).expect("read image");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&image, bytes).expect("tamper");
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        Some(&key),
        Some(&body(json!({"snapshot": snap}))),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("damaged"), "{}", r.text());

    // The native backend cannot save memory, and says so.
    let native = server.create_sandbox(&key);
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{native}/snapshots"),
        Some(&key),
        Some(&body(json!({"memory": true}))),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("native backend cannot save"),
        "{}",
        r.text()
    );

    for sandbox in [&id, &copy, &native] {
        let r = server.request(
            "DELETE",
            &format!("/v1/sandboxes/{sandbox}"),
            Some(&key),
            None,
        );
        assert!(r.status == 200 || r.status == 204, "{}", r.text());
    }
    let r = server.request("DELETE", &format!("/v1/snapshots/{snap}"), Some(&key), None);
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
    assert!(!dir.exists(), "the snapshot's directory stayed");
    for sandbox in [&id, &copy] {
        assert!(leftovers(sandbox).is_empty(), "{:?}", leftovers(sandbox));
    }
}

/// `POST /v1/sandboxes/{id}/fork {"memory": true}`: two copies of a running counter both go on
/// from where it was, independently; the source runs on.
#[test]
fn a_fork_with_memory_makes_independent_running_copies() {
    need_root!();
    need_runsc();
    let (server, key) = gvisor_server();
    let id = counting_sandbox(&server, &key);
    let count = |sandbox: &str| count(&server, &key, sandbox);
    let before = count(&id);
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/fork"),
        Some(&key),
        Some(&body(json!({"count": 2, "memory": true}))),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let copies: Vec<String> = r.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|item| {
            item["sandbox"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("a copy failed: {item}"))
                .to_owned()
        })
        .collect();
    assert_eq!(copies.len(), 2);
    for copy in &copies {
        let n = count(copy);
        assert!(n >= before, "{copy} restarted: {before} then {n}");
    }
    server.shell(&key, &copies[0], "echo a > /tmp/only-a");
    let out = server.shell(
        &key,
        &copies[1],
        "test -e /tmp/only-a && echo shared || echo apart",
    );
    assert_eq!(out["stdout"], "apart\n", "{out}");
    assert!(count(&id) >= before, "the source restarted");
    for sandbox in copies.iter().chain(std::iter::once(&id)) {
        let r = server.request(
            "DELETE",
            &format!("/v1/sandboxes/{sandbox}"),
            Some(&key),
            None,
        );
        assert!(r.status == 200 || r.status == 204, "{}", r.text());
        assert!(leftovers(sandbox).is_empty(), "{:?}", leftovers(sandbox));
    }
    // The fork's checkpoint is gone with it.
    let left: Vec<_> = std::fs::read_dir(server.data.join("snapshots"))
        .expect("snapshot dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A pause on gvisor saves the sandbox to disk and releases it: nothing of it stays in the
/// host's cgroups while it is paused; a resume goes on from where it was.
#[test]
fn a_pause_on_gvisor_frees_the_sandbox_and_a_resume_goes_on() {
    need_root!();
    need_runsc();
    let (server, key) = gvisor_server();
    let id = counting_sandbox(&server, &key);
    let count = || count(&server, &key, &id);
    let layout = moat_jail::cgroup::Layout::detect().expect("cgroup layout");
    let cgroups = || -> Vec<std::path::PathBuf> {
        layout
            .bases()
            .into_iter()
            .map(|b| b.join(&id))
            .filter(|d| d.exists())
            .collect()
    };
    assert!(!cgroups().is_empty(), "no cgroup while it runs");
    let before = count();

    let r = act(&server, &key, &id, "pause");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "paused", "{}", r.text());
    // Released: no cgroup (so no memory charged), no runsc process.
    assert!(
        cgroups().is_empty(),
        "still charged while paused: {:?}",
        cgroups()
    );
    assert!(
        leftovers(&id).iter().all(|l| !l.starts_with("process")),
        "{:?}",
        leftovers(&id)
    );
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(&key),
        Some(&body(json!({"shell": "true"}))),
    );
    assert_eq!(r.status, 409, "{}", r.text());

    let r = act(&server, &key, &id, "resume");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running", "{}", r.text());
    let after = count();
    assert!(
        after >= before,
        "restarted by the pause: {before} then {after}"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(count() > after, "stopped counting after the resume");
    // What the pause saved goes once the resume is recorded.
    assert!(
        !server.data.join("snapshots/paused").join(&id).exists(),
        "a resumed sandbox's saved state stayed"
    );

    // Paused again, then deleted: nothing stays, on the host or in the data dir.
    let r = act(&server, &key, &id, "pause");
    assert_eq!(r.status, 200, "{}", r.text());
    delete(&server, &key, &id);
    assert!(!server.data.join("snapshots/paused").join(&id).exists());
}

/// A resume that fails (here: the saved image is damaged) neither ends the sandbox nor loses
/// what its pause saved: it answers `503` and stays paused, and once the image is whole again
/// a resume goes on counting from where it was.
#[test]
fn a_resume_that_fails_leaves_the_sandbox_paused_with_what_it_saved() {
    need_root!();
    need_runsc();
    let (server, key) = gvisor_server();
    let id = counting_sandbox(&server, &key);
    let before = count(&server, &key, &id);
    let pause = act(&server, &key, &id, "pause");
    assert_eq!(pause.status, 200, "{}", pause.text());
    let image = server
        .data
        .join("snapshots/paused")
        .join(&id)
        .join("checkpoint.img");
    let whole = std::fs::read(&image).expect("the saved image");
    std::fs::write(&image, b"not a checkpoint").expect("damage the image");

    let r = act(&server, &key, &id, "resume");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("stays paused"), "{}", r.text());
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.status, 200, "ended by a failed resume: {}", r.text());
    assert_eq!(r.json()["state"], "paused", "{}", r.text());
    assert!(image.exists(), "the saved state was removed");

    std::fs::write(&image, whole).expect("mend the image");
    let r = act(&server, &key, &id, "resume");
    assert_eq!(r.status, 200, "{}", r.text());
    let after = count(&server, &key, &id);
    assert!(after >= before, "restarted: {before} then {after}");
    delete(&server, &key, &id);
}

/// Calls that come together to a sandbox paused to disk with `auto_resume` all get through:
/// the first restores it, the rest wait for that and find it running (none acts on the
/// sandbox as it was before the restore).
#[test]
fn calls_that_come_together_to_a_paused_gvisor_sandbox_all_resume_it() {
    need_root!();
    need_runsc();
    let (server, key) = gvisor_server();
    let id = server.create_sandbox_with(
        &key,
        json!({"template": "sentry", "lifecycle": {"on_timeout": "pause", "auto_resume": true}}),
    );
    server.shell(&key, &id, "echo kept > /tmp/kept");
    for round in 0..3 {
        let r = act(&server, &key, &id, "pause");
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        let answers: Vec<(u16, String)> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| {
                        let r = server.request(
                            "POST",
                            &format!("/v1/sandboxes/{id}/exec"),
                            Some(&key),
                            Some(&body(json!({"shell": "cat /tmp/kept"}))),
                        );
                        (r.status, r.text())
                    })
                })
                .collect();
            calls.into_iter().map(|c| c.join().expect("call")).collect()
        });
        for (status, text) in answers {
            assert_eq!(status, 200, "round {round}: {text}");
            assert!(text.contains("kept"), "round {round}: {text}");
        }
    }
    delete(&server, &key, &id);
}

/// A gvisor sandbox whose lifecycle pauses it at its timeout is frozen in place, not ended,
/// when its tenant's snapshot bytes leave no room to save it to disk; it resumes where it was.
/// An asked-for pause is refused (`429`) instead.
#[test]
fn a_timeout_pause_without_room_on_disk_freezes_the_sandbox_in_place() {
    need_root!();
    need_runsc();
    let server = Server::start_with(&["--snapshot-quota", "1"]);
    let key = server.admin_key();
    server.create_template(
        &key,
        "sentry",
        json!({"rootfs": "host", "user": "user", "backend": "gvisor"}),
    );
    // A first pause to disk takes what the quota has (one may, while a byte is left).
    let first = server.create_sandbox_with(&key, json!({"template": "sentry"}));
    let r = act(&server, &key, &first, "pause");
    assert_eq!(r.status, 200, "{}", r.text());
    let id = server.create_sandbox_with(
        &key,
        json!({"template": "sentry", "timeout_secs": 3, "lifecycle": {"on_timeout": "pause"}}),
    );
    server.shell(&key, &id, MEMORY_COUNTER);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let r = act(&server, &key, &id, "pause");
    assert_eq!(r.status, 429, "{}", r.text());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let state = loop {
        let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
        let state = r.json()["state"].as_str().unwrap_or_default().to_owned();
        if state != "running" || std::time::Instant::now() > deadline {
            break state;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(state, "paused");
    assert!(!server.data.join("snapshots/paused").join(&id).exists());
    let r = act(&server, &key, &id, "resume");
    assert_eq!(r.status, 200, "{}", r.text());
    let before = count(&server, &key, &id);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(count(&server, &key, &id) > before, "stopped counting");
    delete(&server, &key, &id);
    delete(&server, &key, &first);
}

/// A gvisor sandbox's files cannot be snapshotted apart from its memory: `409`, saying what
/// to ask for instead.
#[test]
fn a_files_snapshot_of_a_gvisor_sandbox_is_refused_clearly() {
    need_root!();
    need_runsc();
    let (server, key) = gvisor_server();
    let id = server.create_sandbox_with(&key, json!({"template": "sentry"}));
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/snapshots"),
        Some(&key),
        Some(&body(json!({}))),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text()
            .contains("gvisor backend cannot snapshot a sandbox's files alone")
            && r.text().contains("\\\"memory\\\": true"),
        "{}",
        r.text()
    );
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/fork"),
        Some(&key),
        Some(&body(json!({"count": 1}))),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
}

/// A template defined from a snapshot with memory: its warm pool and its cold creates start
/// with the work of a slow start already done; the snapshot cannot be deleted while the
/// template uses it; a files-only snapshot or a start script of its own is refused.
#[test]
fn a_template_from_a_snapshot_starts_initialised() {
    need_root!();
    need_runsc();
    let server = Server::start();
    let key = server.admin_key();
    // The slow start writes its result once; the snapshot is taken after it.
    server.create_template(
        &key,
        "slow",
        json!({
            "rootfs": "host", "user": "user", "backend": "gvisor",
            "start": "python3 -c 'import time; time.sleep(1); open(\"/tmp/init\", \"w\").write(\"done\")'",
            "ready": "test -s /tmp/init",
        }),
    );
    let source = server.create_sandbox_with(&key, json!({"template": "slow"}));
    let snap = snapshot_with_memory(&server, &key, &source);
    let r = server.request(
        "DELETE",
        &format!("/v1/sandboxes/{source}"),
        Some(&key),
        None,
    );
    assert!(r.status == 200 || r.status == 204, "{}", r.text());

    // A start script of its own is refused.
    let r = server.request(
        "POST",
        "/v1/templates",
        Some(&key),
        Some(&body(json!({"name": "bad", "spec": {
            "rootfs": "host", "snapshot": snap, "start": "true"}}))),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    server.create_template(
        &key,
        "ready",
        json!({"rootfs": "host", "user": "user", "snapshot": snap, "pool_size": 1}),
    );
    let r = server.request("GET", "/v1/templates/ready", Some(&key), None);
    assert_eq!(r.json()["spec"]["backend"], "gvisor", "{}", r.text());
    // Cold and claimed alike, the work is done already.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = server.request("GET", "/v1/templates/ready", Some(&key), None);
        if r.json()["pool"]["ready"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled: {}",
            r.text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut made = Vec::new();
    for _ in 0..2 {
        let id = server.create_sandbox_with(&key, json!({"template": "ready"}));
        let out = server.shell(&key, &id, "cat /tmp/init");
        assert_eq!(out["stdout"], "done", "{out}");
        made.push(id);
    }

    let r = server.request("DELETE", &format!("/v1/snapshots/{snap}"), Some(&key), None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("template ready"), "{}", r.text());
    for id in &made {
        let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None);
        assert!(r.status == 200 || r.status == 204, "{}", r.text());
    }
    let r = server.request("DELETE", "/v1/templates/ready?force=true", Some(&key), None);
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
    let r = server.request("DELETE", &format!("/v1/snapshots/{snap}"), Some(&key), None);
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
}

/// User code under gVisor can open the agent's descriptors through `/proc/1/fd` (the sentry
/// does not hide a non-dumpable process's as a kernel does): none of them may be a host file
/// the sandbox could write. 20 MiB written to each that opens must land nowhere on the host.
#[test]
fn the_agents_descriptors_reach_no_host_file() {
    need_root!();
    need_runsc();
    use std::io::BufRead;
    let id = format!("gvfdsx{:010}", std::process::id());
    let writer = "import os\nfor fd in os.listdir('/proc/1/fd'):\n    try:\n        f = os.open('/proc/1/fd/' + fd, os.O_WRONLY | os.O_APPEND)\n    except OSError:\n        continue\n    try:\n        for _ in range(20):\n            os.write(f, b'x' * (1 << 20))\n        print('wrote', fd, flush=True)\n    except OSError as e:\n        print('refused', fd, e.errno, flush=True)\n    os.close(f)\nprint('written', flush=True)\n";
    let local = std::env::temp_dir().join(format!("{id}.py"));
    std::fs::write(&local, writer).expect("write the program");
    let copy = format!("{}:/tmp/w.py", local.display());
    let mut child = moat()
        .args([
            "run",
            "--backend",
            "gvisor",
            "--id",
            &id,
            "--copy",
            &copy,
            "--",
            "sh",
            "-c",
            "python3 /tmp/w.py && sleep 3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moat run");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.expect("line");
        let done = line == "written";
        lines.push(line);
        if done {
            break;
        }
    }
    assert_eq!(
        lines.last().map(String::as_str),
        Some("written"),
        "{lines:?}"
    );
    // While the sandbox still runs: nothing of its directory on the host grew.
    fn size(p: &std::path::Path) -> u64 {
        match std::fs::symlink_metadata(p) {
            Ok(md) if md.is_dir() => std::fs::read_dir(p)
                .map(|d| d.flatten().map(|e| size(&e.path())).sum())
                .unwrap_or(0),
            Ok(md) => md.len(),
            Err(_) => 0,
        }
    }
    let grown = size(&std::path::Path::new("/run/moat/gvisor").join(&id));
    assert!(
        grown < 4 << 20,
        "{grown} bytes under its host directory: {lines:?}"
    );
    let status = child.wait().expect("wait");
    let _ = std::fs::remove_file(&local);
    assert!(status.success(), "{status}");
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));
}

/// On gvisor the sentry and the sandbox's processes share the memory limit: a command that
/// goes over it ends the sandbox, and `moat run` says it ran out of memory (137), as for a
/// native OOM kill.
#[test]
fn running_out_of_memory_on_gvisor_is_reported() {
    need_root!();
    need_runsc();
    let o = run(&[
        "--backend",
        "gvisor",
        "--memory",
        "64M",
        "--",
        "python3",
        "-c",
        "x = bytearray(400 * 2**20); x[::4096] = b'1' * len(x[::4096]); print('survived')",
    ]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(137), "{err}");
    assert!(err.contains("ran out of memory"), "{err}");
    assert!(!text(&o.stdout).contains("survived"));
}

/// The processes of gVisor sandbox `id` on the host (runsc's: those whose command line names it).
fn runsc_processes(id: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = text(&std::fs::read(e.path().join("cmdline")).ok()?).replace('\0', " ");
            (cmdline.contains("runsc") && cmdline.contains(id)).then_some(pid)
        })
        .collect()
}

/// A field of `/proc/PID/status`, split into words.
fn status_field(pid: u32, field: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Two layers: runsc's own processes (the sentry, the gofer, runsc itself) run in an outer
/// jail: as unprivileged host ids of the sandbox's own range, with no host group, in namespaces
/// of their own, on a root that shows the host's system directories and the sandbox's own
/// files but not the rest of the host (not the data directory), with the host's secrets
/// hidden. What runsc writes into a snapshot is stored under host root's ids.
#[test]
fn runsc_runs_in_an_unprivileged_outer_jail() {
    need_root!();
    need_runsc();
    let (server, key) = gvisor_server();
    let id = counting_sandbox(&server, &key);
    let procs = runsc_processes(&id);
    assert!(procs.len() >= 3, "runsc, its gofer and sentry: {procs:?}");
    let host_ns = |name: &str| std::fs::read_link(format!("/proc/self/ns/{name}")).expect("ns");
    for &pid in &procs {
        for field in ["Uid", "Gid"] {
            let ids = status_field(pid, field);
            assert_eq!(ids.len(), 4, "{pid}: {field} {ids:?}");
            for i in &ids {
                let n: u32 = i.parse().expect("id");
                assert!(
                    n >= moat_jail::idmap::BASE,
                    "process {pid} runs with host {field} {n}"
                );
            }
        }
        assert!(
            status_field(pid, "Groups")
                .iter()
                .all(|g| g.parse::<u32>().is_ok_and(|g| g >= moat_jail::idmap::BASE)),
            "process {pid} has host groups {:?}",
            status_field(pid, "Groups")
        );
        for ns in ["user", "mnt", "net", "pid", "ipc", "uts"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("ns");
            assert_ne!(
                theirs,
                host_ns(ns),
                "process {pid} shares the host's {ns} namespace"
            );
        }
    }
    // runsc itself (the jail's first process) sees the jail's root.
    let first = *procs.iter().min().expect("a process");
    let root = std::path::PathBuf::from(format!("/proc/{first}/root"));
    let allowed = [
        "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "run", "proc", "dev",
        "tmp", ".mask", ".maskdir",
    ];
    let shown: Vec<String> = std::fs::read_dir(&root)
        .expect("the jail's root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for name in &shown {
        assert!(
            allowed.contains(&name.as_str()),
            "the jail shows the host's /{name}: {shown:?}"
        );
    }
    let data = server.data.strip_prefix("/").expect("absolute data dir");
    assert!(
        !root.join(data).exists(),
        "the jail shows the data directory {}",
        server.data.display()
    );
    let shadow = std::fs::metadata("/etc/shadow")
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(shadow > 0, "the host has no /etc/shadow to hide");
    assert_eq!(
        std::fs::metadata(root.join("etc/shadow"))
            .map(|m| m.len())
            .ok(),
        Some(0),
        "the jail shows the host's /etc/shadow"
    );
    assert!(
        std::fs::read_dir(root.join("proc"))
            .expect("the jail's /proc")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .count()
            < 20,
        "the jail's /proc shows the host's processes"
    );

    // A snapshot with memory, written by runsc in the jail, is stored under host root's ids.
    let snap = snapshot_with_memory(&server, &key, &id);
    let dir = server.data.join("snapshots").join(format!("{snap}.mem"));
    use std::os::unix::fs::MetadataExt;
    for e in std::fs::read_dir(&dir).expect("snapshot dir").flatten() {
        let md = e.metadata().expect("metadata");
        assert_eq!(
            (md.uid(), md.gid()),
            (0, 0),
            "{} is stored under the jail's ids",
            e.path().display()
        );
    }
    let after = count(&server, &key, &id);
    assert!(after > 5, "the sandbox stopped counting: {after}");

    delete(&server, &key, &id);
}

/// A template directory on gvisor: the sandbox writes over it in its own layer, the user may
/// not change the template's files but root inside may (it owns them: the outer jail shows the
/// template id-mapped), and nothing reaches the directory itself, not even runsc's mount points.
#[test]
fn a_template_directory_on_gvisor_stays_untouched() {
    need_root!();
    need_runsc();
    let lower = std::env::temp_dir().join(format!("moat-gvisor-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&lower);
    support::tiny_rootfs(&lower, &[("/usr/bin/dash", "sh")]);
    let before: Vec<_> = std::fs::read_dir(&lower)
        .expect("template")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let rootfs = lower.display().to_string();
    let script =
        "echo layer > /tmp/new && read l < /tmp/new && echo $l && echo x > /bin/sh2; echo $?";
    let o = run(&[
        "--backend",
        "gvisor",
        "--rootfs",
        &rootfs,
        "--",
        "/bin/sh",
        "-c",
        script,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.starts_with("layer\n"), "{out}");
    assert!(
        out.ends_with("2\n"),
        "the user may not write the template's /bin: {out}"
    );
    let o = run(&[
        "--backend",
        "gvisor",
        "--root",
        "--rootfs",
        &rootfs,
        "--",
        "/bin/sh",
        "-c",
        script,
    ]);
    assert_eq!(text(&o.stdout), "layer\n0\n", "{}", text(&o.stderr));
    let after: Vec<_> = std::fs::read_dir(&lower)
        .expect("template")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(before, after, "the template directory changed");
    assert!(
        !lower.join("tmp/new").exists(),
        "a write reached the template"
    );
    assert!(
        !lower.join("bin/sh2").exists(),
        "a write reached the template"
    );
    std::fs::remove_dir_all(&lower).expect("cleanup");
}

/// A sandbox paused to disk outlives its server, whether it stops gracefully or is killed:
/// the next server on the same data directory shows it paused and resumes it where it was,
/// while a sandbox that was running is ended by the restart as before.
#[test]
fn a_sandbox_paused_on_gvisor_outlives_a_server_restart() {
    need_root!();
    need_runsc();
    let (server, key) = gvisor_server();
    let paused = counting_sandbox(&server, &key);
    let running = server.create_sandbox_with(&key, json!({"template": "sentry"}));
    let before = count(&server, &key, &paused);
    let pause = |server: &Server| {
        let r = act(server, &key, &paused, "pause");
        assert_eq!(r.status, 200, "{}", r.text());
    };
    let state = |server: &Server, id: &str| {
        let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["state"].as_str().unwrap_or_default().to_owned()
    };
    pause(&server);

    // A graceful stop, then a crash: the paused sandbox comes through both.
    let (dir, data) = server.stop();
    let server = Server::start_in(dir, data);
    assert_eq!(state(&server, &paused), "paused");
    assert_eq!(state(&server, &running), "killed");
    assert!(leftovers(&running).is_empty(), "{:?}", leftovers(&running));
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{paused}/exec"),
        Some(&key),
        Some(&body(json!({"shell": "true"}))),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    let (dir, data) = server.kill9();
    let server = Server::start_in(dir, data);
    assert_eq!(state(&server, &paused), "paused");

    // A server that cannot run gvisor (no runsc) keeps it, with what it saved, for one that
    // can: a resume is 503 meanwhile.
    let without_runsc =
        |dir, data| Server::start_in_with_env(dir, data, &[], &[("PATH", "/nonexistent")]);
    let (dir, data) = server.stop();
    let server = without_runsc(dir, data);
    assert_eq!(state(&server, &paused), "paused");
    let r = act(&server, &key, &paused, "resume");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("cannot run"), "{}", r.text());
    assert!(server.data.join("snapshots/paused").join(&paused).is_dir());
    let (dir, data) = server.stop();
    let server = Server::start_in(dir, data);
    assert_eq!(state(&server, &paused), "paused");

    let r = act(&server, &key, &paused, "resume");
    assert_eq!(r.status, 200, "{}", r.text());
    let after = count(&server, &key, &paused);
    assert!(after >= before, "restarted: {before} then {after}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        count(&server, &key, &paused) > after,
        "stopped counting after the resume"
    );
    // Deleted where no server can resume it, what it saved goes with it.
    pause(&server);
    let (dir, data) = server.stop();
    let server = without_runsc(dir, data);
    delete(&server, &key, &paused);
    assert_eq!(state(&server, &paused), "killed");
    assert!(!server.data.join("snapshots/paused").join(&paused).exists());
}

/// The counter demo from the command line: a gvisor sandbox counting, a snapshot of it with
/// memory, a sandbox made from that snapshot and two forks with memory all go on from where
/// it was; a pause and a resume too.
#[test]
fn the_counter_demo_works_from_the_cli() {
    need_root!();
    need_runsc();
    let (server, key) = gvisor_server();
    let cli = |args: &[&str]| server.cli(&key, args).trim().to_owned();
    let count = |id: &str| -> u64 {
        cli(&["sandbox", "exec", id, "--", "cat", "/tmp/n"])
            .parse()
            .unwrap_or_else(|_| panic!("{id} has no count"))
    };
    let id = cli(&["sandbox", "create", "-t", "sentry"]);
    cli(&["sandbox", "exec", &id, "--", "sh", "-c", MEMORY_COUNTER]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while cli(&[
        "sandbox",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "cat /tmp/n 2>/dev/null || echo 0",
    ])
    .parse::<u64>()
    .unwrap_or(0)
        <= 5
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the counter never got going"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let before = count(&id);

    let snap = cli(&["snapshot", "create", &id, "--memory"]);
    let copy = cli(&["sandbox", "create", "--snapshot", &snap]);
    let forks: Vec<String> = cli(&["sandbox", "fork", &id, "--memory", "-n", "2"])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(forks.len(), 2, "{forks:?}");
    let mut started = Vec::new();
    for sandbox in std::iter::once(&copy).chain(&forks) {
        let n = count(sandbox);
        assert!(n >= before, "{sandbox} started over: {before} then {n}");
        started.push(n);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    for (sandbox, n) in std::iter::once(&copy).chain(&forks).zip(&started) {
        assert!(count(sandbox) > *n, "{sandbox} stopped counting");
    }

    assert_eq!(cli(&["sandbox", "pause", &id]), format!("{id} paused"));
    assert_eq!(cli(&["sandbox", "resume", &id]), format!("{id} running"));
    assert!(count(&id) >= before, "the pause started it over");

    for sandbox in std::iter::once(&id)
        .chain(std::iter::once(&copy))
        .chain(&forks)
    {
        cli(&["sandbox", "rm", sandbox]);
        assert!(leftovers(sandbox).is_empty(), "{:?}", leftovers(sandbox));
    }
    cli(&["snapshot", "rm", &snap]);
}

/// `moat run --backend gvisor` killed by SIGKILL: its guardian kills the sandbox (runsc's
/// processes) and removes its cgroups, and the next start of the backend sweeps its directory.
#[test]
fn a_killed_moat_run_on_gvisor_leaves_nothing() {
    need_root!();
    need_runsc();
    let id = format!("gvkilled{:010}", std::process::id());
    let mut child = moat()
        .args([
            "run",
            "--backend",
            "gvisor",
            "--id",
            &id,
            "--",
            "sleep",
            "60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moat run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while runsc_processes(&id).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sandbox never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let layout = moat_jail::cgroup::Layout::detect().expect("cgroup layout");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !runsc_processes(&id).is_empty()
        || moat_jail::cgroup::SandboxCgroup::existing(&layout, &id).is_some()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "still there after its moat run died: {:?}",
            leftovers(&id)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = run(&["--backend", "gvisor", "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));
}

/// Runs `op` as the root of the user and mount namespaces of process `pid` (runsc, in its outer
/// jail): `op` returns 0 or an errno, which this returns.
fn as_jail_root(pid: u32, op: fn() -> i32) -> i32 {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let user = std::fs::File::open(format!("/proc/{pid}/ns/user")).expect("user ns");
    let mnt = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).expect("mnt ns");
    let (user, mnt) = (user.as_raw_fd(), mnt.as_raw_fd());
    let mut cmd = Command::new("/nonexistent");
    // SAFETY: the hook makes raw system calls and `op`'s, and exits without returning.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(user, libc::CLONE_NEWUSER) != 0
                || libc::setns(mnt, libc::CLONE_NEWNS) != 0
            {
                libc::_exit(200);
            }
            libc::_exit(op());
        });
    }
    let status = cmd.status().expect("run the probe");
    status.code().expect("an exit code")
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(255)
}

/// A gvisor `moat run` of `args` that waits for its standard input to close, and its runsc
/// process once the sandbox runs.
fn waiting_run(id: &str, args: &[&str]) -> (std::process::Child, u32) {
    let child = moat()
        .args(["run", "--backend", "gvisor", "--id", id])
        .args(args)
        .args(["--", "/bin/sh", "-c", "read x || true"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moat run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while runsc_processes(id).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sandbox never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let runsc = *runsc_processes(id).iter().min().expect("runsc");
    (child, runsc)
}

/// The outer jail's mounts are locked: its root (runsc's user) cannot uncover a masked
/// secret, nor make a read-only host directory or an id-mapped template writable.
#[test]
fn the_outer_jails_mounts_cannot_be_undone_from_inside() {
    need_root!();
    need_runsc();
    let id = format!("gvlocked{:010}", std::process::id());
    let (mut child, runsc) = waiting_run(&id, &[]);
    // The probe itself works: the jail's root may make a mount of its own.
    assert_eq!(
        as_jail_root(runsc, || {
            // SAFETY: a mount call with valid C strings.
            let r = unsafe {
                libc::mount(
                    c"none".as_ptr(),
                    c"/tmp".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if r == 0 { 0 } else { errno() }
        }),
        0
    );
    let umount = as_jail_root(runsc, || {
        // SAFETY: umount2 of a valid C string.
        if unsafe { libc::umount2(c"/etc/shadow".as_ptr(), libc::MNT_DETACH) } == 0 {
            0
        } else {
            errno()
        }
    });
    assert_ne!(umount, 0, "the jail's root uncovered /etc/shadow");
    let remount = as_jail_root(runsc, || {
        let flags = libc::MS_REMOUNT | libc::MS_BIND;
        // SAFETY: a mount call with valid C strings.
        let r = unsafe {
            libc::mount(
                std::ptr::null(),
                c"/usr".as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        if r == 0 { 0 } else { errno() }
    });
    assert_ne!(remount, 0, "the jail's root made /usr writable");
    drop(child.stdin.take());
    assert!(child.wait().expect("wait").success());

    // An id-mapped template: writes as the jail's root would land as host root's.
    let lower = std::path::PathBuf::from(format!("/tmp/moat-gvisor-locked-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&lower);
    support::tiny_rootfs(&lower, &[("/usr/bin/dash", "sh")]);
    let id2 = format!("gvlockedtpl{:010}", std::process::id());
    let (mut child, runsc) = waiting_run(&id2, &["--rootfs", &lower.display().to_string()]);
    std::fs::write("/tmp/moat-gvisor-locked-path", lower.display().to_string()).expect("path");
    let remount = as_jail_root(runsc, || {
        let Ok(path) = std::fs::read_to_string("/tmp/moat-gvisor-locked-path") else {
            return 254;
        };
        let Ok(path) = std::ffi::CString::new(path) else {
            return 254;
        };
        let flags = libc::MS_REMOUNT | libc::MS_BIND;
        // SAFETY: a mount call with valid C strings.
        let r = unsafe {
            libc::mount(
                std::ptr::null(),
                path.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        if r == 0 { 0 } else { errno() }
    });
    let _ = std::fs::remove_file("/tmp/moat-gvisor-locked-path");
    assert_ne!(remount, 0, "the jail's root made the template writable");
    drop(child.stdin.take());
    assert!(child.wait().expect("wait").success());
    assert!(!lower.join("etc/planted").exists());
    for id in [&id, &id2] {
        assert!(leftovers(id).is_empty(), "{:?}", leftovers(id));
    }
    std::fs::remove_dir_all(&lower).expect("cleanup");
}

/// The bytes of the files in `dir`.
fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A sandbox paused to disk counts as its tenant's snapshot bytes: while one holding 24 MiB
/// of random data is paused, a snapshot with memory of an idle one under a 16 MiB quota is
/// refused (429); once it is resumed, the snapshot is taken.
#[test]
fn a_pause_to_disk_counts_against_the_snapshot_quota() {
    need_root!();
    need_runsc();
    let (server, key) = gvisor_server();
    let post = |key: &str, path: String| server.request("POST", &path, Some(key), None);
    let limited = server.create_key(
        &key,
        json!({"name": "limited", "quotas": {"max_snapshot_size": "16M"}}),
    );
    let big = server.create_sandbox_with(&limited, json!({"template": "sentry"}));
    let idle = server.create_sandbox_with(&limited, json!({"template": "sentry"}));
    server.shell(
        &limited,
        &big,
        "nohup python3 -c 'import os, time\nb = os.urandom(24 << 20)\nopen(\"/tmp/held\", \"w\").write(\"1\")\ntime.sleep(600)' >/dev/null 2>&1 &",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.shell(&limited, &big, "cat /tmp/held 2>/dev/null")["stdout"] != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the data was never held"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        post(&limited, format!("/v1/sandboxes/{big}/pause")).status,
        200
    );
    let paused = dir_size(&server.data.join("snapshots/paused").join(&big));
    assert!(paused > 16 << 20, "{paused} bytes paused");
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{idle}/snapshots"),
        Some(&limited),
        Some(&body(json!({"memory": true}))),
    );
    assert_eq!(r.status, 429, "{}", r.text());
    let made: Vec<_> = std::fs::read_dir(server.data.join("snapshots"))
        .expect("snapshot dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".mem"))
        .collect();
    assert!(made.is_empty(), "{made:?}");
    assert_eq!(
        post(&limited, format!("/v1/sandboxes/{big}/resume")).status,
        200
    );
    snapshot_with_memory(&server, &limited, &idle);
    for id in [&big, &idle] {
        delete(&server, &key, id);
    }
}

/// A gvisor sandbox made with a network meets its policy as a native one does (its sockets
/// are the host kernel's, in its outer jail's namespace, steered to moat): public hosts by
/// name and by address, never the host, private ranges, the metadata address or the server;
/// a policy update applies at once. Its pause freezes it in memory, its memory cannot be
/// saved, and a gvisor sandbox made without a network cannot be given one.
#[test]
fn a_gvisor_sandbox_made_with_a_network_meets_its_policy() {
    need_root!();
    need_runsc();
    let net = FakeNet::start(json!({}));
    let (server, key) = gvisor_server();
    let id = server.create_sandbox_with(
        &key,
        json!({"template": "sentry", "network": net.network(true, &[], &[])}),
    );
    // Its kernel is gVisor's, not the host's.
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("release");
    let kernel = server.shell(&key, &id, "uname -r");
    assert_ne!(kernel["stdout"], host_release.as_str(), "{kernel}");
    let (code, out) = curl(&server, &key, &id, "", &format!("http://{}/", net.web));
    assert_eq!(
        (code, out.as_str()),
        (0, format!("http 80 host={} sni=-\n", net.web).as_str())
    );
    let (code, out) = curl(&server, &key, &id, "", "https://web.test/");
    assert_eq!(
        (code, out.as_str()),
        (0, "https 443 host=web.test sni=web.test\n")
    );
    for url in net.closed_urls(server.port) {
        let (code, out) = curl(&server, &key, &id, "", &url);
        assert_ne!(code, 0, "{url}: {out}");
    }

    // A new policy applies to the next connection: one name, nothing by address.
    let r = server.request(
        "PUT",
        &format!("/v1/sandboxes/{id}/network"),
        Some(&key),
        Some(&body(net.network(false, &["web.test"], &["0.0.0.0/0"]))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (code, out) = curl(&server, &key, &id, "", "http://web.test/");
    assert_eq!(code, 0, "{out}");
    let (code, _) = curl(&server, &key, &id, "", &format!("http://{}/", net.web));
    assert_ne!(code, 0, "by address under a domain rule");

    // Its memory cannot be saved: a snapshot with memory is refused saying why, and a pause
    // freezes it where it is.
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/snapshots"),
        Some(&key),
        Some(&body(json!({"memory": true}))),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("cannot be saved"), "{}", r.text());
    for action in ["pause", "resume"] {
        let r = server.request(
            "POST",
            &format!("/v1/sandboxes/{id}/{action}"),
            Some(&key),
            None,
        );
        assert_eq!(r.status, 200, "{action}: {}", r.text());
    }
    let (code, out) = curl(&server, &key, &id, "", "http://web.test/");
    assert_eq!(code, 0, "after resume: {out}");

    // One made without a network keeps none: a policy for it is refused, and not recorded.
    let plain = server.create_sandbox_with(&key, json!({"template": "sentry"}));
    let (code, _) = curl(&server, &key, &plain, "", &format!("http://{}/", net.web));
    assert_ne!(code, 0);
    let r = server.request(
        "PUT",
        &format!("/v1/sandboxes/{plain}/network"),
        Some(&key),
        Some(&body(net.network(true, &[], &[]))),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("made without a network"), "{}", r.text());
    // E2B's `update_network` gets the same answer, not "sandbox not found".
    let r = server
        .send(
            "PUT",
            &format!("/sandboxes/{plain}/network"),
            None,
            &[
                ("X-API-KEY", key.as_str()),
                ("Content-Type", "application/json"),
            ],
            Some(br#"{"allowOut": ["0.0.0.0/0"]}"#),
        )
        .expect("PUT");
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("made without a network"), "{}", r.text());
    let r = server.request(
        "GET",
        &format!("/v1/sandboxes/{plain}/network"),
        Some(&key),
        None,
    );
    assert_eq!(r.json()["network"]["internet"], false, "{}", r.text());

    delete(&server, &key, &id);
    delete(&server, &key, &plain);
}

/// `moat run --backend gvisor` has no network unless asked, and meets the policy it is given.
#[test]
fn moat_run_on_gvisor_has_the_network_it_asks_for() {
    need_root!();
    need_runsc();
    let net = FakeNet::start(json!({}));
    let dns = net.dns.to_string();
    let curl = |net_args: &[&str]| {
        let o = run(&[
            &["--backend", "gvisor"][..],
            net_args,
            &["--", "curl", "-sI", "--max-time", "5", "http://web.test/"],
        ]
        .concat());
        (o.status.code(), text(&o.stdout))
    };
    let (code, out) = curl(&["--net", "internet", "--dns", &dns]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_ne!(curl(&[]).0, Some(0));
    assert_eq!(curl(&["--allow", "web.test", "--dns", &dns]).0, Some(0));
    assert_ne!(curl(&["--allow", "other.test", "--dns", &dns]).0, Some(0));
}
