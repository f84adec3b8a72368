//! The agent's file API inside a real sandbox, attacked the way `shared/reference/threat-checklist.md`
//! §C describes. File operations run inside the sandbox, so every path is the sandbox's: host
//! files are never read or written, whatever the sandbox's symlinks say. Needs root; skips with a
//! printed reason otherwise.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use moat_engine::agent_client::{AgentClient, CallOptions};
use moat_engine::backend::{Backend, Instance, RootfsSource, SandboxSpec};
use moat_engine::native::{NativeBackend, NativeOptions};
use moat_engine::resources::Resources;
use moat_proto::agent_config::AgentConfig;
use moat_proto::process::{ProcessConfig, StartRequest, process_event};

struct Sandbox {
    inst: Box<dyn Instance>,
    client: AgentClient,
}

async fn sandbox(tag: &str) -> Option<Sandbox> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: the native backend needs root");
        return None;
    }
    let backend = NativeBackend::new(&NativeOptions {
        agent_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_moat"))),
        ..NativeOptions::default()
    })
    .expect("backend");
    let spec = SandboxSpec {
        id: format!("files{tag}{}", std::process::id()),
        rootfs: RootfsSource::Host,
        resources: Resources::default(),
        agent: AgentConfig::default(),
    };
    let mut inst = backend.create(&spec).await.expect("create");
    let client = AgentClient::handshake(inst.take_channel().expect("channel"))
        .await
        .expect("handshake");
    Some(Sandbox { inst, client })
}

async fn sh(client: &AgentClient, user: &str, script: &str) -> i32 {
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
        timeout: None,
    };
    let mut stream = client.start(req, opts).await.expect("start");
    let mut code = -1;
    while let Some(ev) = stream.next().await {
        if let Some(process_event::Event::End(end)) = ev.expect("event").event {
            code = end.exit_code;
        }
    }
    code
}

/// C1/C2: traversal and symlinks to host secrets resolve inside the sandbox (to its masked
/// `/etc/shadow`), never on the host; absolute paths are the sandbox's.
#[tokio::test(flavor = "current_thread")]
async fn c1_c2_paths_and_symlinks_stay_inside() {
    let Some(mut sb) = sandbox("c2").await else {
        return;
    };
    let c = &sb.client;
    assert_eq!(
        sh(
            c,
            "user",
            "ln -s /etc/shadow /home/user/out && ln -s / /home/user/root"
        )
        .await,
        0
    );
    for user in ["user", "root"] {
        let r = c.read_file("/home/user/out", Some(user), 1 << 20).await;
        assert!(
            r.is_err(),
            "{user} read the masked shadow through a symlink: {r:?}"
        );
        let r = c
            .read_file("../../../../etc/shadow", Some(user), 1 << 20)
            .await;
        assert!(r.is_err(), "{user} read shadow by traversal: {r:?}");
    }
    // The host's own files are not there at all.
    let marker = format!("/tmp/moat-host-marker-{}", std::process::id());
    std::fs::write(&marker, "host secret").expect("marker");
    assert!(
        c.read_file(&marker, Some("root"), 1 << 20).await.is_err(),
        "a host /tmp file was visible"
    );
    assert!(
        c.read_file(&format!("/home/user/root{marker}"), Some("root"), 1 << 20)
            .await
            .is_err()
    );
    // Writing through a symlink to a host path lands in the sandbox, never on the host.
    assert_eq!(
        sh(c, "user", &format!("ln -s {marker} /home/user/link")).await,
        0
    );
    let w = c
        .write_file(
            "/home/user/link",
            Bytes::from_static(b"pwned"),
            Some("user"),
        )
        .await;
    assert!(w.is_err() || std::fs::read_to_string(&marker).expect("marker") == "host secret");
    assert_eq!(
        std::fs::read_to_string(&marker).expect("marker"),
        "host secret"
    );
    std::fs::remove_file(&marker).expect("cleanup");
    sb.inst.destroy().await.expect("destroy");
}

/// C4: magic links (`/proc/self/root`, `/proc/1/cwd`) in API paths are refused.
#[tokio::test(flavor = "current_thread")]
async fn c4_magic_links_refused() {
    let Some(mut sb) = sandbox("c4").await else {
        return;
    };
    for path in [
        "/proc/self/root/etc/passwd",
        "/proc/1/cwd/etc/passwd",
        "/proc/1/root/etc/hostname",
    ] {
        let r = sb.client.read_file(path, Some("root"), 1 << 20).await;
        assert!(r.is_err(), "{path} was followed: {r:?}");
    }
    sb.inst.destroy().await.expect("destroy");
}

/// C5: special files (a FIFO, `/dev/zero`) neither hang the agent nor flood the host; size caps hold.
#[tokio::test(flavor = "current_thread")]
async fn c5_special_files_do_not_hang() {
    let Some(mut sb) = sandbox("c5").await else {
        return;
    };
    let c = &sb.client;
    assert_eq!(sh(c, "user", "mkfifo /tmp/fifo").await, 0);
    for path in ["/tmp/fifo", "/dev/zero"] {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            c.read_file(path, Some("user"), 1 << 20),
        )
        .await;
        let r = r.expect("the agent hung on a special file");
        assert!(
            r.is_err(),
            "{path} was read: {} bytes",
            r.map(|b| b.len()).unwrap_or(0)
        );
    }
    // A file larger than the caller's cap is refused, not buffered.
    assert_eq!(
        sh(c, "user", "head -c 3000000 /dev/zero > /tmp/big").await,
        0
    );
    assert!(
        c.read_file("/tmp/big", Some("user"), 1 << 20)
            .await
            .is_err()
    );
    assert_eq!(
        c.read_file("/tmp/big", Some("user"), 4 << 20)
            .await
            .expect("read")
            .len(),
        3_000_000
    );
    // And the agent still answers.
    c.health().await.expect("health");
    sb.inst.destroy().await.expect("destroy");
}
