//! The OpenAPI document: it validates as OpenAPI 3.1 (with the `openapi-spec-validator` the
//! test scripts install), it lists exactly the routes the server's sources register (but the
//! E2B-compatible ones, whose contract is E2B's own API), and every operation it lists is routed
//! on a live `moat serve`.

use moat_test_support as support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::need_root;
use support::server::*;

/// The server's module of E2B-compatible routes. moat's document does not describe them: their
/// contract is E2B's API (its SDKs are the clients), which they follow field for field, and
/// `tests/e2b_control.rs` and the E2B SDK suite check them instead.
const E2B_MODULE: &str = "e2b";

/// (METHOD, path) of every `.route("path", get(..).post(..))` in the server's sources, but
/// those of [`E2B_MODULE`].
fn routes_in_sources() -> BTreeSet<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../moat-server/src");
    assert!(
        dir.join(E2B_MODULE).is_dir(),
        "the E2B module moved: update E2B_MODULE"
    );
    let mut files = vec![dir.clone()];
    let mut routes = BTreeSet::new();
    while let Some(path) = files.pop() {
        if path == dir.join(E2B_MODULE) {
            continue;
        }
        if path.is_dir() {
            for e in std::fs::read_dir(&path).expect("read_dir").flatten() {
                files.push(e.path());
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("source");
        let mut rest = text.as_str();
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            let Some(open) = rest.find('"') else { break };
            let Some(len) = rest[open + 1..].find('"') else {
                break;
            };
            let route = rest[open + 1..open + 1 + len].to_owned();
            // The method routers up to the call's closing parenthesis.
            let mut depth = 1;
            let mut end = 0;
            for (i, c) in rest.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let call = &rest[..end];
            for method in ["get", "post", "put", "delete", "patch", "head"] {
                for prefix in [
                    format!(" {method}("),
                    format!("({method}("),
                    format!(".{method}("),
                ] {
                    if call.contains(&prefix) {
                        routes.insert((method.to_uppercase(), route.clone()));
                    }
                }
            }
        }
    }
    routes
}

fn routes_in_document(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

#[test]
fn the_document_validates_and_matches_the_routes() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let key = server.admin_key();
    server
        .request("GET", "/v1/openapi.json", None, None)
        .assert_error(401, "unauthenticated");
    let r = server.request("GET", "/v1/openapi.json", Some(&key), None);
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(doc["openapi"], "3.1.0");

    // Exactly the routes the sources register; none of E2B's.
    let documented = routes_in_document(&doc);
    for (method, path) in &documented {
        assert!(
            path.starts_with("/v1/")
                || path == "/healthz"
                || path == "/readyz"
                || path == "/metrics",
            "{method} {path} is outside moat's own API"
        );
    }
    let registered = routes_in_sources();
    assert!(
        registered.len() > 10,
        "found too few routes: {registered:?}"
    );
    assert_eq!(
        documented.difference(&registered).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented but not registered"
    );
    assert_eq!(
        registered.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "registered but not documented"
    );

    // Each is routed: never the router's own 404 or 405.
    for (method, path) in &documented {
        let concrete = path
            .replace("{id}", "zzzzzzzzzzzzzzzz")
            .replace("{name}", "no-such-template");
        let r = server.request(method, &concrete, Some(&key), None);
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert!(
            !(r.status == 404 && body.contains("no such route")) && r.status != 405,
            "{method} {path} is not routed: {} {body}",
            r.status
        );
    }

    // A valid OpenAPI 3.1 document.
    let python = support::test_python();
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), serde_json::to_vec(&doc).expect("json")).expect("write");
    let out = Command::new(&python)
        .args(["-m", "openapi_spec_validator"])
        .arg(file.path())
        .output()
        .expect("run openapi-spec-validator");
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
