//! The workspace's layering, checked against `cargo metadata`: which moat crate may depend on
//! which (DESIGN.md's "may depend on" table, as an allow-list), and that `moat-proto`, the
//! wire types every client shares, pulls in nothing that does I/O. The one rule below the crate
//! level, that `moat-server` uses neither the store nor the agent client (the sandbox proxy
//! aside), is checked on its sources.
//!
//! Normal and build dependencies count; dev-dependencies do not (tests may use anything,
//! `moat-test-support` included), but `moat-test-support` itself may never be more than a
//! dev-dependency. A workspace crate without a rule is a failure too, so a new crate gets one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// What a workspace crate may depend on among the workspace's crates.
enum Allowed {
    /// Exactly these (by package name).
    Only(&'static [&'static str]),
    /// Any workspace crate: the binary and the programs that measure it.
    Any,
}

/// The allow-list for workspace crate `name`, or `None` when the table has no rule for it.
fn allowed(name: &str) -> Option<Allowed> {
    use Allowed::{Any, Only};
    Some(match name {
        "moat-proto" | "moat-jail" => Only(&[]),
        "moat-agent" => Only(&["moat-proto", "moat-jail"]),
        "moat-engine" => Only(&["moat-proto"]),
        "moat-server" => Only(&["moat-proto", "moat-engine"]),
        "moat-client" => Only(&["moat-proto"]),
        n if n.starts_with("moat-backend-") => Only(&["moat-proto", "moat-engine", "moat-jail"]),
        // The binary is every front end and back end at once; the benchmarks drive the engine
        // as the binary does; test support builds servers and sandboxes for tests.
        "moat" | "moat-bench" | TEST_SUPPORT => Any,
        _ => return None,
    })
}

/// The crate that only tests may use.
const TEST_SUPPORT: &str = "moat-test-support";

/// Crates that do I/O (an async runtime, sockets, HTTP, a database, system calls): none may be
/// among `moat-proto`'s dependencies, however deep.
const IO_ANYWHERE: &[&str] = &[
    "tokio",
    "tokio-util",
    "mio",
    "socket2",
    "hyper",
    "hyper-util",
    "h2",
    "axum",
    "tower",
    "reqwest",
    "async-std",
    "smol",
    "nix",
    "rusqlite",
    "libsqlite3-sys",
    "object_store",
    "tempfile",
];

/// System-call crates `moat-proto` may not use itself. (Only direct use counts: a hash crate
/// may read CPU features through libc on some targets, which is no I/O of the wire types.)
const IO_DIRECT: &[&str] = &["libc", "rustix", "getrandom"];

/// The crate whose wire types must stay free of I/O.
const PROTO: &str = "moat-proto";

/// One dependency edge: the package it points at and how it is used.
struct Edge {
    pkg: String,
    /// A normal dependency (its code ends up in the dependent's).
    normal: bool,
    /// A build dependency (its code runs in the dependent's build script).
    build: bool,
}

/// The dependency graph of one `cargo metadata` document.
struct Graph {
    /// Package id to package name.
    names: BTreeMap<String, String>,
    /// The workspace's package ids.
    members: BTreeSet<String>,
    /// Package id to its dependencies.
    deps: BTreeMap<String, Vec<Edge>>,
}

impl Graph {
    /// Reads the graph out of `cargo metadata --format-version 1` output.
    fn from_metadata(meta: &Value) -> Result<Graph, String> {
        fn field<'v>(v: &'v Value, k: &str) -> Result<&'v Value, String> {
            v.get(k).ok_or_else(|| format!("metadata without `{k}`"))
        }
        fn list<'v>(v: &'v Value, k: &str) -> Result<&'v Vec<Value>, String> {
            field(v, k)?
                .as_array()
                .ok_or_else(|| format!("metadata's `{k}` is not a list"))
        }
        fn text(v: &Value, k: &str) -> Result<String, String> {
            field(v, k)?
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("metadata's `{k}` is not a string"))
        }
        let mut names = BTreeMap::new();
        for p in list(meta, "packages")? {
            names.insert(text(p, "id")?, text(p, "name")?);
        }
        let members = list(meta, "workspace_members")?
            .iter()
            .map(|m| {
                m.as_str()
                    .map(str::to_owned)
                    .ok_or("a member id is not a string")
            })
            .collect::<Result<_, _>>()?;
        let mut deps = BTreeMap::new();
        for node in list(field(meta, "resolve")?, "nodes")? {
            let mut edges = Vec::new();
            for d in list(node, "deps")? {
                // `kind` is null for a normal dependency, "build" or "dev" otherwise.
                let kinds: Vec<Option<&str>> = list(d, "dep_kinds")?
                    .iter()
                    .map(|k| k.get("kind").and_then(Value::as_str))
                    .collect();
                edges.push(Edge {
                    pkg: text(d, "pkg")?,
                    normal: kinds.contains(&None),
                    build: kinds.contains(&Some("build")),
                });
            }
            deps.insert(text(node, "id")?, edges);
        }
        Ok(Graph {
            names,
            members,
            deps,
        })
    }

    /// The name of package `id`.
    fn name<'a>(&'a self, id: &'a str) -> &'a str {
        self.names.get(id).map_or(id, String::as_str)
    }

    /// The normal and build dependencies of package `id`.
    fn linked<'a>(&'a self, id: &str) -> impl Iterator<Item = &'a str> {
        self.edges(id)
            .filter(|e| e.normal || e.build)
            .map(|e| e.pkg.as_str())
    }

    fn edges<'a>(&'a self, id: &str) -> impl Iterator<Item = &'a Edge> {
        self.deps.get(id).into_iter().flatten()
    }

    /// Every package in the code of package `id`, however deep, through normal dependencies
    /// (a build script's own helpers run at build time only), each with the direct dependency
    /// of `id` it was first reached through.
    fn normal_closure(&self, id: &str) -> BTreeMap<String, String> {
        let mut reached: BTreeMap<String, String> = BTreeMap::new();
        let mut todo: Vec<(String, String)> = self
            .edges(id)
            .filter(|e| e.normal)
            .map(|e| (e.pkg.clone(), e.pkg.clone()))
            .collect();
        while let Some((pkg, via)) = todo.pop() {
            if reached.contains_key(&pkg) {
                continue;
            }
            todo.extend(
                self.edges(&pkg)
                    .filter(|e| e.normal)
                    .map(|e| (e.pkg.clone(), via.clone())),
            );
            reached.insert(pkg, via);
        }
        reached
    }
}

/// Every breach of the rules in `meta`, one line each naming the crate, the dependency and
/// the rule.
fn violations(meta: &Value) -> Result<Vec<String>, String> {
    let g = Graph::from_metadata(meta)?;
    let mut out = Vec::new();
    for member in &g.members {
        let name = g.name(member);
        match allowed(name) {
            None => out.push(format!(
                "{name}: a workspace crate without a rule; give it one in DESIGN.md's \
                 \"may depend on\" table and in this test"
            )),
            Some(Allowed::Any) => {}
            Some(Allowed::Only(list)) => {
                for dep in g.linked(member).filter(|d| g.members.contains(*d)) {
                    let dep = g.name(dep);
                    // Test support as a normal dependency gets its own message below.
                    if !list.contains(&dep) && dep != TEST_SUPPORT {
                        out.push(format!(
                            "{name} depends on {dep}: DESIGN.md lets {name} depend only on {}",
                            if list.is_empty() {
                                "no other moat crate".to_owned()
                            } else {
                                list.join(", ")
                            }
                        ));
                    }
                }
            }
        }
        if g.linked(member).any(|d| g.name(d) == TEST_SUPPORT) {
            out.push(format!(
                "{name} depends on {TEST_SUPPORT}: test support may only be a dev-dependency"
            ));
        }
    }
    for proto in g.members.iter().filter(|m| g.name(m) == PROTO) {
        for dep in g.linked(proto) {
            let dep = g.name(dep);
            if IO_DIRECT.contains(&dep) || IO_ANYWHERE.contains(&dep) {
                out.push(format!(
                    "{PROTO} depends on {dep}: the wire types have nothing with I/O"
                ));
            }
        }
        for (pkg, via) in g.normal_closure(proto) {
            let dep = g.name(&pkg);
            // A direct dependency was reported above.
            if IO_ANYWHERE.contains(&dep) && pkg != via {
                out.push(format!(
                    "{PROTO} depends on {dep} (through {}): the wire types have nothing with I/O",
                    g.name(&via)
                ));
            }
        }
    }
    Ok(out)
}

/// `cargo metadata` of this workspace, resolved for the host's target only (a full resolve
/// would need every other platform's crates downloaded).
fn workspace_metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let out = Command::new(&cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
        ])
        .arg(host_target())
        .arg("--manifest-path")
        .arg(&manifest)
        .output()
        .unwrap_or_else(|e| panic!("running {cargo} metadata: {e}"));
    assert!(
        out.status.success(),
        "{cargo} metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// The host's target triple, as rustc names it.
fn host_target() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .unwrap_or_else(|e| panic!("running {rustc} -vV: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("{rustc} -vV names no host"))
}

#[test]
fn workspace_crates_depend_only_on_what_the_design_allows() {
    let found = violations(&workspace_metadata()).expect("readable metadata");
    assert!(
        found.is_empty(),
        "dependencies DESIGN.md forbids:\n  {}",
        found.join("\n  ")
    );
}

/// Where a server source file reaches the engine's store or the agent client, which DESIGN.md
/// keeps out of `moat-server` (the engine's services stand between), except in the sandbox
/// proxy, whose byte forwarding is the agent's own protocol. One `file:line: text` each.
fn server_reaches_past_the_engine(src: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![src.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "sandbox_proxy") {
                    todo.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            let rel = path
                .strip_prefix(src)
                .unwrap_or(&path)
                .display()
                .to_string();
            out.extend(
                forbidden_lines(&text)
                    .into_iter()
                    .map(|(n, line)| format!("{rel}:{n}: {line}")),
            );
        }
    }
    out
}

/// The lines (1-based, trimmed) of Rust source `text` that name the engine's store module (a
/// path through `store`, or `store` in a `use`; not `object_store` or a variable called
/// `store`) or the agent client; comments do not count.
fn forbidden_lines(text: &str) -> Vec<(usize, &str)> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.starts_with("//"))
        .filter(|(_, l)| {
            let names = |word: &str| {
                l.match_indices(word)
                    .map(|(i, w)| (&l[..i], &l[i + w.len()..]))
                    .filter(|(before, after)| {
                        !before.ends_with(is_ident) && !after.starts_with(is_ident)
                    })
                    .collect::<Vec<_>>()
            };
            let store = names("store").into_iter().any(|(before, after)| {
                before.ends_with("::") || after.starts_with("::") || l.starts_with("use ")
            });
            store || !names("agent_client").is_empty()
        })
        .collect()
}

#[test]
fn the_server_reaches_neither_the_store_nor_the_agent_client() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../moat-server/src");
    let found = server_reaches_past_the_engine(&src);
    assert!(
        found.is_empty(),
        "moat-server uses the store or the agent client, which DESIGN.md leaves to the engine \
         (the sandbox proxy's byte forwarding aside):\n  {}",
        found.join("\n  ")
    );
}

/// The checker itself, on small made-up metadata documents.
mod checker {
    use serde_json::{Value, json};

    use super::violations;

    /// A dependency of a synthetic package: (name, kind) with kind `None` for a normal one.
    type Dep = (&'static str, Option<&'static str>);

    /// Metadata in `cargo metadata`'s shape: `members` are workspace crates, `others` are
    /// registry crates, each with its dependencies.
    fn metadata(members: &[(&str, &[Dep])], others: &[(&str, &[Dep])]) -> Value {
        let id = |name: &str| format!("id:{name}");
        let all = members.iter().chain(others);
        json!({
            "packages": all.clone().map(|(n, _)| json!({"id": id(n), "name": n})).collect::<Vec<_>>(),
            "workspace_members": members.iter().map(|(n, _)| id(n)).collect::<Vec<_>>(),
            "resolve": {
                "nodes": all.map(|(n, deps)| json!({
                    "id": id(n),
                    "deps": deps.iter().map(|(d, kind)| json!({
                        "name": d.replace('-', "_"),
                        "pkg": id(d),
                        "dep_kinds": [{"kind": kind, "target": null}],
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            },
        })
    }

    /// The layering DESIGN.md draws, with no breach.
    const GOOD: &[(&str, &[Dep])] = &[
        (
            "moat-proto",
            &[("serde", None), ("prost-build", Some("build"))],
        ),
        (
            "moat-jail",
            &[("libc", None), ("moat-test-support", Some("dev"))],
        ),
        ("moat-agent", &[("moat-proto", None), ("moat-jail", None)]),
        (
            "moat-engine",
            &[("moat-proto", None), ("moat-agent", Some("dev"))],
        ),
        (
            "moat-backend-native",
            &[("moat-engine", None), ("moat-jail", None)],
        ),
        (
            "moat-server",
            &[("moat-engine", None), ("moat-proto", None)],
        ),
        ("moat-client", &[("moat-proto", None)]),
        (
            "moat",
            &[("moat-server", None), ("moat-backend-native", None)],
        ),
        (
            "moat-test-support",
            &[("moat-engine", None), ("moat-jail", None)],
        ),
    ];

    const REGISTRY: &[(&str, &[Dep])] = &[
        ("serde", &[]),
        ("libc", &[]),
        ("prost-build", &[("tempfile", None)]),
        ("tempfile", &[("libc", None)]),
        ("tokio", &[("mio", None)]),
        ("mio", &[("libc", None)]),
        ("hyper", &[("tokio", None)]),
    ];

    fn with(name: &str, deps: &'static [Dep]) -> Vec<(&'static str, &'static [Dep])> {
        GOOD.iter()
            .map(|&(n, d)| if n == name { (n, deps) } else { (n, d) })
            .collect()
    }

    #[test]
    fn the_designed_layering_passes() {
        // Build dependencies with I/O (prost-build writes files) and dev-dependencies pass.
        assert_eq!(violations(&metadata(GOOD, REGISTRY)), Ok(vec![]));
    }

    #[test]
    fn an_engine_depending_on_the_jail_is_caught() {
        let found = violations(&metadata(
            &with("moat-engine", &[("moat-proto", None), ("moat-jail", None)]),
            REGISTRY,
        ))
        .expect("metadata");
        assert_eq!(
            found,
            [
                "moat-engine depends on moat-jail: DESIGN.md lets moat-engine depend only on moat-proto"
            ]
        );
    }

    #[test]
    fn build_dependencies_count_and_dev_dependencies_do_not() {
        let found = violations(&metadata(
            &with(
                "moat-jail",
                &[("moat-engine", Some("build")), ("moat-agent", Some("dev"))],
            ),
            REGISTRY,
        ))
        .expect("metadata");
        assert_eq!(
            found,
            [
                "moat-jail depends on moat-engine: DESIGN.md lets moat-jail depend only on no other moat crate"
            ]
        );
    }

    #[test]
    fn io_in_proto_is_caught_directly_and_through_another_crate() {
        let found = violations(&metadata(
            &with("moat-proto", &[("libc", None), ("hyper", None)]),
            REGISTRY,
        ))
        .expect("metadata");
        assert_eq!(
            found,
            [
                "moat-proto depends on libc: the wire types have nothing with I/O",
                "moat-proto depends on hyper: the wire types have nothing with I/O",
                "moat-proto depends on mio (through hyper): the wire types have nothing with I/O",
                "moat-proto depends on tokio (through hyper): the wire types have nothing with I/O",
            ]
        );
    }

    #[test]
    fn test_support_as_a_normal_dependency_and_unknown_crates_are_caught() {
        let mut members = with(
            "moat-server",
            &[("moat-engine", None), ("moat-test-support", None)],
        );
        members.push(("moat-gadget", &[]));
        let found = violations(&metadata(&members, REGISTRY)).expect("metadata");
        assert_eq!(
            found,
            [
                "moat-gadget: a workspace crate without a rule; give it one in DESIGN.md's \"may depend on\" table and in this test",
                "moat-server depends on moat-test-support: test support may only be a dev-dependency",
            ]
        );
    }

    #[test]
    fn the_source_check_sees_the_store_and_the_agent_client_but_not_comments() {
        let text = "use moat_engine::store::Store;\n\
                    // store:: in a comment\n\
                    let s = object_store::local();\n\
                    use moat_engine::agent_client::AgentClient;\n\
                    let k = keystore::open(store.path());\n\
                    use moat_engine::{manager, store};\n\
                    let f = moat_engine::store::SandboxFilter {\n";
        assert_eq!(
            super::forbidden_lines(text),
            [
                (1, "use moat_engine::store::Store;"),
                (4, "use moat_engine::agent_client::AgentClient;"),
                (6, "use moat_engine::{manager, store};"),
                (7, "let f = moat_engine::store::SandboxFilter {"),
            ]
        );
    }
}
