//! moat's MCP server (`/mcp` over streamable HTTP, and `moat mcp` over stdio) with the
//! official `mcp` Python client (`tests/mcp/test_mcp.py`) against a real `moat serve`. The
//! Python is `MOAT_TEST_PYTHON` (set by scripts/test.sh), else the venv scripts/test-deps.sh
//! makes. Needs root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;

use std::process::Command;

use support::need_root;
use support::server::*;

#[test]
fn the_mcp_client_uses_moat_over_http_and_stdio() {
    need_root!();
    let server = Server::start();
    let key = server.admin_key();
    let out = Command::new(support::test_python())
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/mcp/test_mcp.py",
        ])
        .current_dir(support::repo_root())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("MOAT_URL", format!("http://127.0.0.1:{}", server.port))
        .env("MOAT_API_KEY", &key)
        .env("MOAT_BIN", support::moat_binary())
        .output()
        .expect("run pytest");
    assert!(
        out.status.success(),
        "pytest tests/mcp/test_mcp.py: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
