//! `moat serve` with its data dir on a small tmpfs that fills up: state-changing requests are
//! refused cleanly (`507 insufficient_storage`) with nothing changed, `/readyz` says why, a
//! sandbox whose delete was refused runs on as recorded, and everything works again once there
//! is room. Needs root (the native backend, and to mount the tmpfs); skips otherwise.

mod support;

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde_json::json;
use support::is_root;
use support::server::*;

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("moat-full-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let target = CString::new(dir.path().as_os_str().as_bytes()).expect("path");
        let data = CString::new(format!("size={size},mode=0700")).expect("options");
        // SAFETY: valid C strings; a fresh tmpfs on a directory of our own.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(r, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.dir.path().as_os_str().as_bytes()).expect("path");
        // SAFETY: a valid C string naming our own mount; detached if something still uses it.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Writes zeros to `path` until the filesystem has no room left.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0u8; 64 << 10];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Smaller writes take what is left of the last block.
    while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
}

fn exec(server: &Server, key: &str, id: &str) -> Reply {
    server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(key),
        Some(&body(json!({ "shell": "echo alive" }))),
    )
}

#[test]
fn a_full_data_dir_refuses_changes_cleanly_and_keeps_records_true() {
    if !is_root() {
        eprintln!("SKIP: moat serve's native backend and the tmpfs need root");
        return;
    }
    let tmpfs = Tmpfs::mount("48m");
    let data: PathBuf = tmpfs.path().join("data");
    let home = tempfile::Builder::new()
        .prefix("moat-serve-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let server = Server::start_in(home, data);
    let key = server.admin_key();
    let r = server.request("POST", "/v1/sandboxes", Some(&key), Some(&body(json!({}))));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().expect("id").to_owned();
    assert_eq!(server.request("GET", "/readyz", None, None).status, 200);

    let filler = tmpfs.path().join("filler");
    fill(&filler);

    // Not ready, and why.
    let r = server.request("GET", "/readyz", None, None);
    r.assert_error(503, "insufficient_storage");
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("data dir is full"), "{message}");

    // Changes are refused with nothing done.
    server
        .request("POST", "/v1/sandboxes", Some(&key), Some(&body(json!({}))))
        .assert_error(507, "insufficient_storage");
    server
        .request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None)
        .assert_error(507, "insufficient_storage");
    let r = server
        .send(
            "POST",
            "/v2/sandboxes",
            None,
            &[("X-API-KEY", &key), ("Content-Type", "application/json")],
            Some(&body(json!({ "templateID": "base" }))),
        )
        .expect("E2B create");
    assert_eq!(r.status, 507, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], 507, "{}", r.json());

    // The sandbox whose delete was refused is what its record says: running, and it answers.
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.json()["state"], "running", "{}", r.json());
    let r = exec(&server, &key, &id);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["stdout"], "alive\n");

    // Room again: everything works.
    std::fs::remove_file(&filler).expect("remove the filler");
    assert_eq!(server.request("GET", "/readyz", None, None).status, 200);
    let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let r = server.request("GET", &format!("/v1/sandboxes/{id}"), Some(&key), None);
    assert_eq!(r.json()["state"], "killed", "{}", r.json());
    exec(&server, &key, &id).assert_error(409, "conflict");
    let r = server.request("POST", "/v1/sandboxes", Some(&key), Some(&body(json!({}))));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    drop(server);
}
