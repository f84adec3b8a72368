//! The E2B SDK suite (`tests/e2b/`): the unmodified `e2b` and `e2b-code-interpreter` Python SDKs,
//! and the `e2b` JavaScript SDK under Node, against a real `moat serve`. Each test starts a server, makes an API key for a tenant of its
//! own through `/v1/keys`, and runs one pytest file with `E2B_API_URL`, `E2B_SANDBOX_URL` (the
//! same listener) and `E2B_API_KEY` set, failing with pytest's output.
//!
//! The Python is `MOAT_TEST_PYTHON` (set by scripts/test.sh), else the venv
//! scripts/test-deps.sh makes, which has the SDKs from tests/python/requirements.txt. Needs root
//! (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use support::need_root;
use support::server::*;

use support::{repo_root, test_python};

/// Runs `tests/e2b/<file>` with pytest against a fresh `moat serve`.
fn run_pytest(file: &str) {
    run_pytest_with(&test_python(), file);
}

/// The Python of the venv with e2b `version` (an older SDK generation), which
/// scripts/test-deps.sh makes from tests/python/requirements-e2b-<version>.txt.
fn older_sdk_python(version: &str) -> PathBuf {
    let python = repo_root().join(format!("target/test-venv-e2b-{version}/bin/python"));
    assert!(
        python.exists(),
        "no venv with e2b {version}: run scripts/test-deps.sh"
    );
    python
}

/// Runs `tests/e2b/<file>` with pytest under `python` against a fresh `moat serve`.
fn run_pytest_with(python: &Path, file: &str) {
    let mut cmd = support::pytest_command(python);
    cmd.arg(format!("tests/e2b/{file}"));
    run_client(cmd, &format!("pytest tests/e2b/{file}"));
}

/// Runs `cmd` (an SDK client) in the repository's root against a fresh `moat serve`, with the
/// E2B environment pointing at it; fails with its output unless it exits 0.
fn run_client(cmd: Command, what: &str) {
    run_client_on(&[], cmd, what);
}

/// [`run_client`] against a `moat serve` started with `server_args`.
fn run_client_on(server_args: &[&str], mut cmd: Command, what: &str) {
    need_root!("moat serve's native backend needs root");
    let server = Server::start_with(server_args);
    let admin = server.admin_key();
    let key = server.create_key(&admin, json!({"name": "e2b sdk suite", "tenant": "e2bsdk"}));
    // The suite's gvisor sandboxes (snapshots with memory) come from this template.
    server.create_template(
        &key,
        "gvisor",
        json!({"rootfs": "host", "user": "user", "backend": "gvisor"}),
    );
    support::e2b_env(&mut cmd, &format!("http://127.0.0.1:{}", server.port), &key);
    cmd.current_dir(repo_root());
    support::run_checked(cmd, what);
}

/// E2B's network options against a fake internet built for the run
/// (`moat_test_support::fakenet`), whose addresses the file reads from `MOAT_FAKE_*`.
#[test]
fn network() {
    need_root!("the fake internet and moat serve's native backend need root");
    let net = support::fakenet::FakeNet::start(json!({}));
    let mut cmd = support::pytest_command(&test_python());
    cmd.arg("tests/e2b/test_network.py")
        .env("MOAT_FAKE_WEB", net.web.to_string())
        .env("MOAT_FAKE_OTHER", net.other.to_string())
        .env("MOAT_FAKE_DNS", net.dns.to_string());
    run_client(cmd, "pytest tests/e2b/test_network.py");
}

/// `Template.build` from a busybox image (with a `/bin/bash`, which the SDK runs commands
/// with) in a registry on loopback, which the server lets every key pull from.
#[test]
fn template_builds() {
    need_root!("moat serve's native backend needs root");
    let registry = support::registry::Registry::start();
    let bash = support::registry::LayerBuilder::new()
        .file("bin/bash", 0o755, b"#!/bin/sh\nexec /bin/sh \"$@\"\n")
        .build();
    let applets = ["sh", "echo", "cat", "id", "pwd", "ls", "true", "false"];
    let mut image =
        support::registry::TestImage::new(vec![support::registry::busybox_layer(&applets), bash]);
    image.run = json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]});
    registry.push("tools/bbash", "1", &image);
    let mut cmd = support::pytest_command(&test_python());
    cmd.arg("tests/e2b/test_template_build.py").env(
        "MOAT_TEST_IMAGE",
        format!("{}/tools/bbash:1", registry.host()),
    );
    run_client_on(
        &["--allow-registry", &registry.host()],
        cmd,
        "pytest tests/e2b/test_template_build.py",
    );
}

#[test]
fn control_plane() {
    run_pytest("test_control.py");
}

#[test]
fn commands_and_ptys() {
    run_pytest("test_commands.py");
}

#[test]
fn files() {
    run_pytest("test_files.py");
}

#[test]
fn code_interpreter() {
    run_pytest("test_code_interpreter.py");
}

#[test]
fn lifecycle() {
    run_pytest("test_lifecycle.py");
}

/// The calls every 2.x SDK shares, with the newest SDK.
#[test]
fn sdk_generations_newest() {
    run_pytest("test_sdk_generations.py");
}

/// The same with e2b 2.7.0, the oldest 2.x that can be pointed at another server
/// (`E2B_SANDBOX_URL`): `POST /sandboxes`, `POST /sandboxes/{id}/connect`.
#[test]
fn sdk_generations_e2b_2_7() {
    run_pytest_with(&older_sdk_python("2.7"), "test_sdk_generations.py");
}

/// The same with e2b 2.50.0, the last before `/v2/sandboxes`.
#[test]
fn sdk_generations_e2b_2_50() {
    run_pytest_with(&older_sdk_python("2.50"), "test_sdk_generations.py");
}

#[test]
fn tokens_signatures_and_templates() {
    run_pytest("test_hardening_proxy.py");
}

/// The e2b JavaScript SDK (tests/e2b/js, installed by scripts/test-deps.sh) under Node.
#[test]
fn javascript_sdk_smoke() {
    let mut cmd = Command::new("node");
    cmd.arg("tests/e2b/js/smoke.mjs");
    run_client(cmd, "node tests/e2b/js/smoke.mjs");
}

/// File writes the agent refuses mid-upload, and parents it makes for the user, through the
/// JavaScript SDK (whose fetch fails outright when an answer comes before the upload is read).
#[test]
fn javascript_file_errors() {
    let mut cmd = Command::new("node");
    cmd.arg("tests/e2b/js/file_errors.mjs");
    run_client(cmd, "node tests/e2b/js/file_errors.mjs");
}

#[test]
fn documentation_quickstarts() {
    run_pytest("test_quickstart.py");
}

#[test]
fn fidelity() {
    run_pytest("test_fidelity.py");
}
