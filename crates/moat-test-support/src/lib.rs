//! Helpers shared by moat's tests that drive real sandboxes and servers: the `moat` binary
//! under test is the agent and the server. Used only as a dev-dependency.
//!
//! - this module: sandboxes made straight through the native backend, and their agent;
//! - [`server`]: a real `moat serve` on a free port and a small HTTP/1.1 client for it;
//! - [`host`]: what the host sees of a sandbox, and that it left nothing behind;
//! - [`in_process`]: a server in the test's process, over a manager with backends of its own;
//! - [`tmpfs`]: a small filesystem to fill up.

pub mod fakenet;
pub mod host;
pub mod in_process;
pub mod registry;
pub mod server;
pub mod tmpfs;

/// A counter in memory that writes its count to `/tmp/n` every 20 ms, as a shell command that
/// leaves it running: only a restore of its memory keeps it counting from where it was.
pub const MEMORY_COUNTER: &str = "nohup python3 -c 'import os, time\ni = 0\nwhile True:\n    i += 1\n    open(\"/tmp/n.new\", \"w\").write(str(i))\n    os.rename(\"/tmp/n.new\", \"/tmp/n\")\n    time.sleep(0.02)' >/dev/null 2>&1 &";

/// Fails the test unless runsc is installed (`scripts/test-deps.sh` installs it).
pub fn need_runsc() {
    assert!(
        moat_jail::probe::runsc_path().is_some(),
        "runsc is not installed: scripts/test-deps.sh installs it (apt-get install runsc)"
    );
}

use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_backend_native::{NativeBackend, NativeOptions};
use moat_engine::agent_client::{AgentClient, AgentError, CallOptions, ProcessStream};
use moat_engine::backend::{Backend, Instance};
use moat_engine::plan::SandboxPlan;
use moat_proto::process::process_event::{EndEvent, Event, data_event};
use moat_proto::process::{ProcessConfig, StartRequest};

/// Whether we run as root (the native backend needs it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns from the calling test, printing why it skips, unless we run as root (the native
/// backend needs it). Takes the reason as a literal where it is another one.
#[macro_export]
macro_rules! need_root {
    () => {
        $crate::need_root!("the native backend needs root")
    };
    ($why:literal) => {
        if !$crate::is_root() {
            eprintln!(concat!("SKIP: ", $why));
            return;
        }
    };
}

/// The `moat` binary under test: what Cargo (and nextest) name in `CARGO_BIN_EXE_moat` when
/// they run a test of the `moat` package, else the `moat` beside the test's own `deps/`
/// directory (another package's tests, which Cargo builds with the same target directory).
pub fn moat_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_moat") {
        return PathBuf::from(path);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("moat")))
        .filter(|p| p.is_file());
    beside.unwrap_or_else(|| {
        panic!("no moat binary: run the tests through cargo (CARGO_BIN_EXE_moat is not set)")
    })
}

/// The repository's root (where `tests/` and `scripts/` are).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Python with the test suite's packages: `MOAT_TEST_PYTHON` (set by scripts/test.sh),
/// else the venv scripts/test-deps.sh makes; a test that needs it fails without it.
pub fn test_python() -> PathBuf {
    if let Some(p) = std::env::var_os("MOAT_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo_root().join("target/test-venv/bin/python");
    assert!(
        venv.exists(),
        "no test Python: run scripts/test-deps.sh (or set MOAT_TEST_PYTHON)"
    );
    venv
}

/// `python -m pytest -q` in the repository's root, with no cache directory or bytecode
/// written into the source tree.
pub fn pytest_command(python: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(python);
    cmd.args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .current_dir(repo_root())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// Points the E2B SDK that `cmd` runs at `url` (API and sandboxes on the same listener) with
/// the API key `key`, taking out the settings that would point it elsewhere.
pub fn e2b_env(cmd: &mut std::process::Command, url: &str, key: &str) {
    cmd.env("E2B_API_URL", url)
        .env("E2B_SANDBOX_URL", url)
        .env("E2B_API_KEY", key)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_ACCESS_TOKEN");
}

/// Runs `cmd` (`what` names it in a failure); its standard output, or a failure with all of
/// its output unless it exits 0. The output is shown with `--no-capture`.
pub fn run_checked(mut cmd: std::process::Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs pytest on `path` (relative to the repository's root) against `server`, with its URL
/// and admin key in `MOAT_URL` and `MOAT_API_KEY`, the working tree's Python SDK first on the
/// path, the shared fixtures of `tests/pylib/moat_suite.py` loaded, `env` added and `remove`
/// taken out; fails with pytest's output.
pub fn pytest(path: &str, server: &server::Server, env: &[(&str, &str)], remove: &[&str]) {
    let mut cmd = pytest_command(&test_python());
    // `moat_suite`: the fixtures the suites share (tests/pylib).
    cmd.args(["-p", "moat_suite", path])
        // The working tree's SDK before the copy scripts/test-deps.sh installed, so the tests
        // see the code as it is now.
        .env(
            "PYTHONPATH",
            format!(
                "{}:{}",
                repo_root().join("sdk/python").display(),
                repo_root().join("tests/pylib").display()
            ),
        )
        .env("MOAT_URL", format!("http://127.0.0.1:{}", server.port))
        .env("MOAT_API_KEY", server.admin_key())
        .envs(env.iter().copied());
    for name in remove {
        cmd.env_remove(name);
    }
    run_checked(cmd, &format!("pytest {path}"));
}

/// Copies each host program `(source, name)` to `root/bin/name`, with every library `ldd` names
/// for it at the same path under `root`: enough of a root filesystem to run those programs.
pub fn install_programs(root: &Path, programs: &[(&str, &str)]) {
    std::fs::create_dir_all(root.join("bin")).expect("mkdir bin");
    for (src, name) in programs {
        std::fs::copy(src, root.join("bin").join(name)).expect("copy program");
        let ldd = std::process::Command::new("ldd")
            .arg(src)
            .output()
            .expect("ldd");
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let dst = root.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir lib");
            std::fs::copy(lib, &dst).expect("copy lib");
        }
    }
}

/// A minimal root filesystem in `root`: the host `programs` (see [`install_programs`]) and
/// the `root` and `user` (1000) accounts in `etc/passwd` and `etc/group`.
pub fn tiny_rootfs(root: &Path, programs: &[(&str, &str)]) {
    std::fs::create_dir_all(root.join("etc")).expect("mkdir etc");
    install_programs(root, programs);
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").expect("group");
}

/// The native backend with the `moat` binary under test as the agent.
pub fn backend() -> NativeBackend {
    NativeBackend::new(&NativeOptions {
        agent_binary: Some(moat_binary()),
        ..NativeOptions::default()
    })
    .expect("backend")
}

/// A live sandbox and the client of its agent.
pub struct Sandbox {
    /// The backend's handle.
    pub inst: Box<dyn Instance>,
    /// The agent's client.
    pub client: AgentClient,
}

/// A sandbox of the `host` template with default limits, its id made from `tag` and our pid;
/// `None` (with a printed reason) when not running as root.
pub async fn sandbox(tag: &str) -> Option<Sandbox> {
    sandbox_with(tag, SandboxPlan::host("native")).await
}

/// As [`sandbox`], made to `plan` (its env vars, user, workdir, limits).
pub async fn sandbox_with(tag: &str, plan: SandboxPlan) -> Option<Sandbox> {
    if !is_root() {
        eprintln!("SKIP: the native backend needs root");
        return None;
    }
    let id = format!("{tag}{}", std::process::id());
    let mut inst = backend().create(&id, &plan).await.expect("create");
    let client = AgentClient::handshake(inst.take_channel().expect("channel"))
        .await
        .expect("handshake");
    Some(Sandbox { inst, client })
}

/// A start request for `cmd args` without stdin.
pub fn request(cmd: &str, args: Vec<String>) -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: cmd.into(),
            args,
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    }
}

/// Call options for `user` with a generous deadline.
pub fn as_user(user: &str) -> CallOptions {
    CallOptions {
        user: Some(user.into()),
        timeout: Some(Duration::from_secs(60)),
    }
}

/// Reads `stream` to its end: (stdout, end event).
pub async fn drain(mut stream: ProcessStream) -> Result<(String, EndEvent), AgentError> {
    let (mut out, mut end) = (Vec::new(), None);
    while let Some(ev) = stream.next().await {
        match ev?.event {
            Some(Event::Data(d)) => {
                if let Some(data_event::Output::Stdout(b)) = d.output {
                    out.extend(b);
                }
            }
            Some(Event::End(e)) => end = Some(e),
            _ => {}
        }
    }
    let end = end.ok_or_else(|| AgentError::Protocol("no end event".into()))?;
    Ok((String::from_utf8_lossy(&out).into_owned(), end))
}

/// Runs `sh -c script` as `user` and returns its stdout and exit code.
pub async fn sh(client: &AgentClient, user: &str, script: &str) -> (String, i32) {
    let stream = client
        .start(
            request("/bin/sh", vec!["-c".into(), script.into()]),
            as_user(user),
        )
        .await
        .expect("start");
    let (out, end) = drain(stream).await.expect("stream");
    (out, end.exit_code)
}
