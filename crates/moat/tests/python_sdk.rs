//! The suite of moat's own Python SDK (`sdk/python`, the `moat` package; tests in `tests/sdk/`)
//! against a real `moat serve`. Each test starts a server and runs one pytest file with
//! `MOAT_URL` and `MOAT_API_KEY` (the server's admin key) set, failing with pytest's output; the
//! fixtures never start a server themselves. Another test type-checks the package with
//! `mypy --strict`.
//!
//! The Python is `MOAT_TEST_PYTHON` (set by scripts/test.sh), else the venv
//! scripts/test-deps.sh makes, which has httpx, pytest, pytest-asyncio and mypy from
//! tests/python/requirements.txt. Needs root (the native backend); skips with a printed reason
//! otherwise.

use moat_test_support as support;

use std::process::Command;

use serde_json::json;
use support::need_root;
use support::server::*;

/// Runs `tests/sdk/<file>` with pytest against a fresh `moat serve`.
fn run_pytest(file: &str) {
    run_pytest_with(file, &[]);
}

/// [`run_pytest`] with extra environment variables for pytest.
fn run_pytest_with(file: &str, env: &[(&str, &str)]) {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    support::pytest(&format!("tests/sdk/{file}"), &server, env, &[]);
}

#[test]
fn sandboxes() {
    run_pytest("test_sandboxes.py");
}

#[test]
fn exec() {
    run_pytest("test_exec.py");
}

#[test]
fn filesystem() {
    run_pytest("test_filesystem.py");
}

#[test]
fn code_and_one_shot_runs() {
    run_pytest("test_code.py");
}

/// Templates from an image and builds start from a busybox image (with the programs the
/// tests' commands and `RUN` steps use) in a registry on loopback, which the admin key may
/// pull from.
#[test]
fn templates_and_builds() {
    need_root!("moat serve's native backend needs root");
    let registry = support::registry::Registry::start();
    let applets = [
        "sh", "echo", "cat", "ls", "grep", "true", "false", "sleep", "mkdir", "id", "pwd", "env",
        "tr",
    ];
    let mut image =
        support::registry::TestImage::new(vec![support::registry::busybox_layer(&applets)]);
    image.run = json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]});
    registry.push("tools/busybox", "1", &image);
    let reference = format!("{}/tools/busybox:1", registry.host());
    run_pytest_with("test_templates.py", &[("MOAT_TEST_IMAGE", &reference)]);
}

#[test]
fn jobs() {
    run_pytest("test_jobs.py");
}

#[test]
fn errors_keys_and_quotas() {
    run_pytest("test_errors.py");
}

/// The package type-checks under `mypy --strict`, as its `py.typed` promises.
#[test]
fn mypy_strict() {
    let out = Command::new(support::test_python())
        // No cache directory in the source tree.
        .args([
            "-m",
            "mypy",
            "--strict",
            "--cache-dir=/dev/null",
            "sdk/python/moat",
        ])
        .current_dir(support::repo_root())
        .output()
        .unwrap_or_else(|e| panic!("running mypy: {e}"));
    assert!(
        out.status.success(),
        "mypy --strict sdk/python/moat failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The examples of the README and docs/API.md, run as written.
#[test]
fn docs() {
    run_pytest("test_docs.py");
}
