//! The project's own Python image and data-science interpreter, end to end:
//! scripts/python-image.py makes a `python:3.11-slim` image from this host's packages and
//! pushes it to a registry on loopback; a template from it runs `python3` (through
//! `moat run --template`); scripts/interpreter-template.sh rebuilds `code-interpreter-v1` on it
//! with numpy, pandas and matplotlib (moat's own build, from the wheels
//! scripts/test-deps.sh downloaded); and E2B's DataFrame and chart examples run unmodified on
//! it (`tests/e2b/test_data_science.py`).

use std::process::Command;

use moat_test_support::need_root;
use moat_test_support::registry::Registry;
use moat_test_support::server::Server;
use serde_json::json;

use moat_test_support::repo_root;

/// Runs `cmd` in the repository's root; its standard output, or a failure with all its output.
fn run(mut cmd: Command, what: &str) -> String {
    cmd.current_dir(repo_root());
    moat_test_support::run_checked(cmd, what)
}

#[test]
fn the_projects_python_image_and_data_science_interpreter() {
    need_root!("python-image.py reads every package file, and moat serve needs root");
    let wheels = repo_root().join("target/wheels/code-interpreter");
    let has_wheels = std::fs::read_dir(&wheels)
        .map(|d| {
            d.flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "whl"))
        })
        .unwrap_or(false);
    assert!(
        has_wheels,
        "no wheels in {}: run scripts/test-deps.sh",
        wheels.display()
    );
    let registry = Registry::start();
    let mut push = Command::new("python3");
    push.args(["scripts/python-image.py", &registry.host()]);
    let digest = run(push, "scripts/python-image.py");
    assert!(digest.trim().starts_with("sha256:"), "{digest}");
    let image = format!("{}/python:3.11-slim", registry.host());

    let server = Server::start();
    let admin = server.admin_key();
    server.cli(&admin, &["template", "create", "py", "--image", &image]);
    let out = server.cli(&admin, &["run", "--template", "py", "--", "python3", "-V"]);
    assert_eq!(out, "Python 3.11.2\n");

    let mut build = Command::new("bash");
    build
        .args(["scripts/interpreter-template.sh", &image])
        .env("MOAT_URL", format!("http://127.0.0.1:{}", server.port))
        .env("MOAT_API_KEY", &admin)
        .env("MOAT_BIN", moat_test_support::moat_binary())
        .env("WHEELS", &wheels);
    let built = run(build, "scripts/interpreter-template.sh");
    assert_eq!(built, "code-interpreter-v1\n");

    // Another tenant's E2B code interpreter SDK gets it by default.
    let key = server.create_key(&admin, json!({"name": "data", "tenant": "science"}));
    let url = format!("http://127.0.0.1:{}", server.port);
    let mut pytest = moat_test_support::pytest_command(&moat_test_support::test_python());
    pytest.arg("tests/e2b/test_data_science.py");
    moat_test_support::e2b_env(&mut pytest, &url, &key);
    run(pytest, "pytest tests/e2b/test_data_science.py");
}
