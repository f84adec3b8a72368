//! C3 of the threat checklist: a symlink race against the agent's file API in a real sandbox
//! (Judge0 CVE-2024-28185/28189, docker cp CVE-2018-15664).
//!
//! Inside, a process flips `/home/user/x` between a regular file and symlinks to a host path, to
//! the same path through `/proc/self/root`, to `/`, and to a host directory, as fast as it can,
//! while the test reads and writes `/home/user/x` through the agent 2,000 times. The agent
//! resolves every path inside the sandbox's mount namespace, so whatever wins the race, the host
//! canaries are never opened: inotify sees no event on them, and their content and mtime hold.
//! Every failed operation must be a refusal the race explains, and plenty must succeed.
//! Needs root; skips with a printed reason otherwise.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use moat_backend_native::{NativeBackend, NativeOptions};
use moat_engine::agent_client::{AgentClient, CallOptions};
use moat_engine::backend::Backend;
use moat_engine::plan::SandboxPlan;
use moat_proto::connect::Code;
use moat_proto::process::process_selector::Selector;
use moat_proto::process::{ProcessConfig, StartRequest, process_event};

const OPS: usize = 2000;
const WORKERS: usize = 4;

/// Flips `x` between a file and a symlink to each target; counts flips in `flips`.
const FLIPPER: &str = r#"
import os, sys
targets = sys.argv[1:]
os.chdir("/home/user")
n = 0
while True:
    with open("x.f", "w") as f:
        f.write("sandbox-content")
    os.replace("x.f", "x")
    try:
        os.unlink("x.l")
    except FileNotFoundError:
        pass
    os.symlink(targets[n % len(targets)], "x.l")
    os.replace("x.l", "x")
    n += 1
    if n % 100 == 0:
        with open("flips.f", "w") as f:
            f.write(str(n))
        os.replace("flips.f", "flips")
"#;

/// An inotify instance on the host.
struct Inotify(OwnedFd);

impl Inotify {
    fn new() -> Inotify {
        // SAFETY: no pointers; the flags are constants.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        Inotify(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Watches every event on `path` (a directory's watch also covers its entries).
    fn watch(&self, path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).expect("path");
        // SAFETY: `c` is a valid NUL-terminated path; the descriptor is open.
        let wd =
            unsafe { libc::inotify_add_watch(self.0.as_raw_fd(), c.as_ptr(), libc::IN_ALL_EVENTS) };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The masks of the events queued so far.
    fn events(&self) -> Vec<u32> {
        let mut masks = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: `buf` is valid for writes of its length; the descriptor is open.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return masks;
            }
            // struct inotify_event: wd, mask, cookie, len (each 4 bytes), then `len` name bytes.
            let mut off = 0;
            while off + 16 <= n as usize {
                let word = |i: usize| {
                    u32::from_ne_bytes(buf[off + i..off + i + 4].try_into().expect("4 bytes"))
                };
                masks.push(word(4));
                off += 16 + word(12) as usize;
            }
        }
    }
}

/// Content, mtime and ctime of a file, or of a directory and its entries' names.
fn snapshot(path: &Path) -> (Vec<u8>, i64, i64, i64, i64) {
    let m = std::fs::symlink_metadata(path).expect("canary metadata");
    let content = if m.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(path)
            .expect("canary dir")
            .map(|e| e.expect("entry").file_name().as_bytes().to_vec())
            .collect();
        names.sort();
        names.join(&b'/')
    } else {
        std::fs::read(path).expect("canary")
    };
    (
        content,
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

async fn run(client: &AgentClient, user: &str, script: &str) -> (i32, String) {
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
        user: Some(user.into()),
        timeout: Some(Duration::from_secs(30)),
    };
    let mut stream = client.start(req, opts).await.expect("start");
    let (mut code, mut out) = (-1, Vec::new());
    while let Some(ev) = stream.next().await {
        match ev.expect("event").event {
            Some(process_event::Event::Data(d)) => {
                if let Some(process_event::data_event::Output::Stdout(b)) = d.output {
                    out.extend(b);
                }
            }
            Some(process_event::Event::End(end)) => code = end.exit_code,
            _ => {}
        }
    }
    (code, String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "current_thread")]
async fn c3_symlink_race_never_reaches_the_host() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: the native backend needs root");
        return;
    }
    let pid = std::process::id();
    // A token no sandbox file contains: seeing it anywhere means the host file was read.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let token = format!("host-canary-{pid}-{nanos}");
    let canary = PathBuf::from(format!("/tmp/moat-canary-{pid}"));
    let canary_dir = PathBuf::from(format!("/tmp/moat-canary-dir-{pid}"));
    let canary_inner = canary_dir.join("inside");
    let _ = std::fs::remove_dir_all(&canary_dir);
    std::fs::write(&canary, &token).expect("canary");
    std::fs::create_dir(&canary_dir).expect("canary dir");
    std::fs::write(&canary_inner, &token).expect("canary in dir");
    let watched = [&canary, &canary_dir, &canary_inner];
    let before: Vec<_> = watched.iter().map(|p| snapshot(p)).collect();
    let inotify = Inotify::new();
    for p in watched {
        inotify.watch(p);
    }

    let backend = NativeBackend::new(&NativeOptions {
        agent_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_moat"))),
        ..NativeOptions::default()
    })
    .expect("backend");
    let id = format!("race{pid}");
    let plan = SandboxPlan::host("native");
    let mut inst = backend.create(&id, &plan).await.expect("create");
    let client = AgentClient::handshake(inst.take_channel().expect("channel"))
        .await
        .expect("handshake");

    // Decoys at the same paths inside, so a symlink that resolves (as it must) in the sandbox
    // finds the sandbox's file.
    let (code, _) = run(
        &client,
        "user",
        &format!(
            "echo sandbox-decoy > {c} && mkdir {d} && echo sandbox-decoy > {i}",
            c = canary.display(),
            d = canary_dir.display(),
            i = canary_inner.display()
        ),
    )
    .await;
    assert_eq!(code, 0, "decoys");
    client
        .write_file(
            "/home/user/flip.py",
            Bytes::from_static(FLIPPER.as_bytes()),
            Some("user"),
        )
        .await
        .expect("flipper");
    let targets = [
        canary.display().to_string(),
        format!("/proc/self/root{}", canary.display()),
        "/".to_string(),
        canary_dir.display().to_string(),
        canary_inner.display().to_string(),
        format!("/proc/1/root{}", canary_inner.display()),
    ];
    let mut args = vec!["/home/user/flip.py".to_string()];
    args.extend(targets);
    let flipper = client
        .start(
            StartRequest {
                process: Some(ProcessConfig {
                    cmd: "/usr/bin/python3".into(),
                    args,
                    ..Default::default()
                }),
                stdin: Some(false),
                ..Default::default()
            },
            CallOptions {
                user: Some("user".into()),
                timeout: Some(Duration::from_secs(300)),
            },
        )
        .await
        .expect("flipper start");
    let flipper_pid = flipper.pid();
    // Let it get going before the storm.
    for _ in 0..100 {
        if client
            .read_file("/home/user/flips", Some("user"), 64)
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut workers = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let client = client.clone();
        let token = token.clone();
        workers.spawn(async move {
            let (mut reads, mut writes, mut errors) = (0, 0, Vec::new());
            for i in 0..OPS / WORKERS {
                let user = if (i / 2) % 2 == 0 { "user" } else { "root" };
                if i % 2 == 0 {
                    let r = client.read_file("/home/user/x", Some(user), 1 << 20).await;
                    match r {
                        Ok(b) => {
                            reads += 1;
                            assert!(
                                !String::from_utf8_lossy(&b).contains(&token),
                                "a read through the agent returned the host canary"
                            );
                        }
                        Err(e) => errors.push(("read", user, e)),
                    }
                } else {
                    let data = Bytes::from(format!("written-by-test-{w}-{i}"));
                    match client.write_file("/home/user/x", data, Some(user)).await {
                        Ok(()) => writes += 1,
                        Err(e) => errors.push(("write", user, e)),
                    }
                }
            }
            (reads, writes, errors)
        });
    }
    let (mut reads, mut writes, mut errors) = (0, 0, Vec::new());
    while let Some(r) = workers.join_next().await {
        let (r, w, e) = r.expect("worker");
        (reads, writes) = (reads + r, writes + w);
        errors.extend(e);
    }
    let flips: u64 = client
        .read_file("/home/user/flips", Some("user"), 64)
        .await
        .ok()
        .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
        .unwrap_or(0);
    eprintln!(
        "{reads} reads, {writes} writes, {} errors, {flips} flips",
        errors.len()
    );
    assert_eq!(reads + writes + errors.len(), OPS);
    // Every refusal is one the race explains; anything else (a timeout, an internal error, a
    // path not found) fails the test.
    let mut truncated = 0;
    for (op, user, e) in &errors {
        let msg = e.to_string();
        let explained = match e.code() {
            // `x` was a symlink to `/` or to a directory.
            Code::InvalidArgument => msg.ends_with("/home/user/x is a directory"),
            // `x` went through /proc/self/root or /proc/1/root.
            Code::PermissionDenied if msg.contains("goes through a /proc magic link") => true,
            // The kernel's own refusal of a file the caller may not write.
            Code::PermissionDenied => *op == "write" && msg.contains("(os error 13)"),
            // `x` was swapped between the agent's resolution and its open.
            Code::AlreadyExists => msg.ends_with("changed while being opened"),
            // Another worker truncated `x` while this read streamed it: the body ends before
            // the Content-Length the agent sent.
            Code::Unavailable if *op == "read" => {
                truncated += 1;
                true
            }
            _ => false,
        };
        assert!(explained, "unexpected {op} error as {user}: {e}");
    }
    assert!(
        truncated <= OPS / 50,
        "{truncated} reads lost their connection"
    );
    // Plenty of operations got through: the agent did not just refuse everything.
    assert!(
        reads >= OPS / 10 && writes >= OPS / 10,
        "{reads} reads and {writes} writes succeeded"
    );
    assert!(flips >= 100, "the flipper barely ran ({flips} flips)");
    client
        .send_signal(Selector::Pid(flipper_pid), 9)
        .await
        .expect("kill flipper");
    drop(flipper);

    // What the sandbox wrote landed inside it.
    let (code, inside) = run(
        &client,
        "root",
        &format!("cat {} {}", canary.display(), canary_inner.display()),
    )
    .await;
    assert_eq!(code, 0);
    assert!(!inside.contains(&token), "the sandbox sees the host canary");
    inst.destroy().await.expect("destroy");

    // The host: no event at all on the canaries, and nothing about them changed. Events are
    // drained before the snapshot, which reads the files itself.
    let events = inotify.events();
    assert!(
        events.is_empty(),
        "host canaries saw inotify events (masks {events:x?})"
    );
    let after: Vec<_> = watched.iter().map(|p| snapshot(p)).collect();
    assert_eq!(before, after, "a host canary changed");
    std::fs::remove_file(&canary).expect("cleanup");
    std::fs::remove_dir_all(&canary_dir).expect("cleanup");
}
