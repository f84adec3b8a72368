//! The agent's file API inside a real sandbox, attacked the way `shared/reference/threat-checklist.md`
//! §C describes. File operations run inside the sandbox, so every path is the sandbox's: host
//! files are never read or written, whatever the sandbox's symlinks say. Needs root; skips with a
//! printed reason otherwise.

use std::time::Duration;

use bytes::Bytes;
use moat_engine::agent_client::AgentError;
use moat_proto::connect::Code;

use moat_test_support as support;
use support::{sandbox, sh};

/// Asserts that `r` failed with `code` and a message containing `text`.
fn assert_refused(r: Result<Bytes, AgentError>, code: Code, text: &str, what: &str) {
    match r {
        Err(e) => assert!(
            e.code() == code && e.to_string().contains(text),
            "{what}: expected {code:?} ({text:?}), got {:?}: {e}",
            e.code()
        ),
        Ok(b) => panic!("{what} was read: {} bytes", b.len()),
    }
}

/// C1/C2: traversal and symlinks to host secrets resolve inside the sandbox (to its masked
/// `/etc/shadow`), never on the host; absolute paths are the sandbox's.
#[tokio::test(flavor = "current_thread")]
async fn c1_c2_paths_and_symlinks_stay_inside() {
    let Some(mut sb) = sandbox("filesc2").await else {
        return;
    };
    let c = &sb.client;
    assert_eq!(
        sh(
            c,
            "user",
            "ln -s /etc/shadow /home/user/out && ln -s / /home/user/root \
             && echo sandbox-file > /home/user/ok && ln -s /home/user/ok /home/user/oklink"
        )
        .await
        .1,
        0
    );
    for user in ["user", "root"] {
        // What is legitimate works: a symlink inside the sandbox, and a relative path that
        // climbs to the sandbox's root and finds the sandbox's own files.
        let ok = c.read_file("/home/user/oklink", Some(user), 1 << 20).await;
        assert_eq!(&ok.expect("a symlink inside")[..], b"sandbox-file\n");
        let passwd = c
            .read_file("../../../../etc/passwd", Some(user), 1 << 20)
            .await
            .expect("the sandbox's /etc/passwd by a relative path");
        assert!(
            String::from_utf8_lossy(&passwd).contains("user:x:1000:1000"),
            "{}",
            String::from_utf8_lossy(&passwd)
        );
        // The sandbox's /etc/shadow is masked (mode 0, owned by nobody): through a symlink or
        // by traversal, the kernel refuses it, root included.
        let r = c.read_file("/home/user/out", Some(user), 1 << 20).await;
        let what = format!("{user} reading shadow through a symlink");
        assert_refused(r, Code::PermissionDenied, "(os error 13)", &what);
        let r = c
            .read_file("../../../../etc/shadow", Some(user), 1 << 20)
            .await;
        let what = format!("{user} reading shadow by traversal");
        assert_refused(r, Code::PermissionDenied, "(os error 13)", &what);
    }
    // The host's own files are not there at all.
    let marker = format!("/tmp/moat-host-marker-{}", std::process::id());
    std::fs::write(&marker, "host secret").expect("marker");
    let r = c.read_file(&marker, Some("root"), 1 << 20).await;
    assert_refused(r, Code::NotFound, "no such file", "a host /tmp file");
    let through_root = format!("/home/user/root{marker}");
    let r = c.read_file(&through_root, Some("root"), 1 << 20).await;
    assert_refused(
        r,
        Code::NotFound,
        "no such file",
        "a host file via a / link",
    );
    // Writing through a symlink to a host path lands in the sandbox, never on the host.
    assert_eq!(
        sh(c, "user", &format!("ln -s {marker} /home/user/link"))
            .await
            .1,
        0
    );
    c.write_file(
        "/home/user/link",
        Bytes::from_static(b"pwned"),
        Some("user"),
    )
    .await
    .expect("a write through a symlink inside the sandbox");
    assert_eq!(
        sh(c, "user", &format!("cat {marker}")).await,
        ("pwned".to_owned(), 0),
        "the write did not land at the sandbox's path"
    );
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
    let Some(mut sb) = sandbox("filesc4").await else {
        return;
    };
    // The same files by their plain paths are readable: only the magic link is refused.
    for path in ["/etc/passwd", "/etc/hostname"] {
        let r = sb.client.read_file(path, Some("root"), 1 << 20).await;
        assert!(!r.expect(path).is_empty(), "{path} is empty");
    }
    for path in [
        "/proc/self/root/etc/passwd",
        "/proc/1/cwd/etc/passwd",
        "/proc/1/root/etc/hostname",
    ] {
        let r = sb.client.read_file(path, Some("root"), 1 << 20).await;
        assert_refused(
            r,
            Code::PermissionDenied,
            "goes through a /proc magic link; refused",
            path,
        );
    }
    sb.inst.destroy().await.expect("destroy");
}

/// C5: special files (a FIFO, `/dev/zero`) neither hang the agent nor flood the host; size caps hold.
#[tokio::test(flavor = "current_thread")]
async fn c5_special_files_do_not_hang() {
    let Some(mut sb) = sandbox("filesc5").await else {
        return;
    };
    let c = &sb.client;
    assert_eq!(sh(c, "user", "mkfifo /tmp/fifo").await.1, 0);
    for path in ["/tmp/fifo", "/dev/zero"] {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            c.read_file(path, Some("user"), 1 << 20),
        )
        .await;
        let r = r.expect("the agent hung on a special file");
        // Refused for what it is, not for its size (`/dev/zero` would hit the cap too).
        match r {
            Ok(b) => panic!("{path} was read: {} bytes", b.len()),
            Err(e) => assert!(e.to_string().contains("not a regular file"), "{path}: {e}"),
        }
    }
    // A file larger than the caller's cap is refused, not buffered.
    assert_eq!(
        sh(c, "user", "head -c 3000000 /dev/zero > /tmp/big")
            .await
            .1,
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
