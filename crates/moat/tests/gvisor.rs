//! The gvisor backend as users reach it: `moat run --backend gvisor`, and a `moat serve`
//! template naming it, with real runsc containers; the sandbox's kernel is gVisor's, and nothing
//! is left on the host afterwards. A host without runsc gets a refusal that says how to install
//! it. Needs root (skips with a printed reason otherwise) and runsc (scripts/test-deps.sh
//! installs it; a host without it fails these tests rather than skipping them).

use std::process::{Command, Output, Stdio};

use moat_test_support as support;
use serde_json::json;
use support::need_root;
use support::server::*;

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

fn need_runsc() {
    assert!(
        moat_jail::probe::runsc_path().is_some(),
        "runsc is not installed: scripts/test-deps.sh installs it (apt-get install runsc)"
    );
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
    let server = Server::start();
    let key = server.admin_key();
    server.create_template(
        &key,
        "sentry",
        json!({"rootfs": "host", "user": "user", "backend": "gvisor"}),
    );
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
