//! moat's MCP server (`/mcp` over streamable HTTP, and `moat mcp` over stdio) with the
//! official `mcp` Python client (`tests/mcp/test_mcp.py`) against a real `moat serve`. The
//! Python is `MOAT_TEST_PYTHON` (set by scripts/test.sh), else the venv scripts/test-deps.sh
//! makes. Needs root (the native backend); skips with a printed reason otherwise.

use moat_test_support as support;

use support::need_root;
use support::server::*;

#[test]
fn the_mcp_client_uses_moat_over_http_and_stdio() {
    need_root!();
    let server = Server::start();
    let moat = support::moat_binary();
    let moat = moat.to_str().expect("a UTF-8 path");
    support::pytest("tests/mcp/test_mcp.py", &server, &[("MOAT_BIN", moat)], &[]);
}
