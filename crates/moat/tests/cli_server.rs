//! The `moat` binary's server commands (`keys`, `sandbox`, `template`, `moat run` with
//! `MOAT_URL`) as subprocesses against a real `moat serve`, plus the keys API over HTTP.
//! Needs root (the server's native backend); skips with a printed reason otherwise.

use moat_test_support as support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::need_root;
use support::server::*;

/// `moat ARGS` with `MOAT_URL` and `MOAT_API_KEY` for `server` and `key`, stdin empty.
fn moat(server: &Server, key: &str, args: &[&str]) -> Output {
    command(server, key, args).output().expect("run moat")
}

fn command(server: &Server, key: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat"));
    cmd.args(args)
        .env("MOAT_URL", format!("http://127.0.0.1:{}", server.port))
        .env("MOAT_API_KEY", key)
        .stdin(Stdio::null());
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts exit status 0 and returns stdout.
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Asserts exit status `code` and returns (stdout, stderr).
fn status(out: Output, code: i32) -> (String, String) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    (text(&out.stdout), text(&out.stderr))
}

fn json_out(out: Output) -> Value {
    let stdout = ok(out);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn keys_api_and_commands() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let admin = server.admin_key();

    // The HTTP API: strict bodies, clear errors.
    let r = server.request(
        "POST",
        "/v1/keys",
        Some(&admin),
        Some(&body(
            json!({"name": "raw", "quotas": {"max_memory": "1G"}}),
        )),
    );
    assert_eq!(r.status, 201, "{}", text(&r.body));
    let raw = r.json();
    assert_eq!(raw["role"], "user");
    assert_eq!(raw["tenant"], "default");
    assert_eq!(raw["quotas"]["max_memory_bytes"], 1 << 30);
    assert!(
        raw["secret"]
            .as_str()
            .is_some_and(|s| s.starts_with("moat_"))
    );
    let raw_secret = raw["secret"].as_str().expect("secret").to_owned();
    for bad in [
        json!({"name": "x", "rolle": "user"}),
        json!({"name": "x", "role": "root"}),
        json!({"name": ""}),
        json!({"name": "x", "tenant": "Not Valid"}),
        json!({"name": "x", "quotas": {"max_sandboxes": 0}}),
        json!({"name": "x", "quotas": {"max_memory": "lots"}}),
    ] {
        server
            .request("POST", "/v1/keys", Some(&admin), Some(&body(bad)))
            .assert_error(400, "invalid");
    }
    // A user key may not manage keys.
    for (method, path) in [
        ("GET", "/v1/keys"),
        ("POST", "/v1/keys"),
        ("DELETE", "/v1/keys/key_aaaaaaaaaaaaaaaa"),
    ] {
        server
            .request(method, path, Some(&raw_secret), Some(b"{\"name\":\"y\"}"))
            .assert_error(403, "forbidden");
    }
    server
        .request("GET", "/v1/keys?tenant=nosuch", Some(&admin), None)
        .assert_error(404, "not_found");
    server
        .request("GET", "/v1/keys?tenants=x", Some(&admin), None)
        .assert_error(400, "invalid");
    server
        .request(
            "DELETE",
            "/v1/keys/key_aaaaaaaaaaaaaaaa",
            Some(&admin),
            None,
        )
        .assert_error(404, "not_found");
    server
        .request("DELETE", "/v1/keys/garbage", Some(&admin), None)
        .assert_error(400, "invalid");
    let r = server.request("GET", "/v1/keys", Some(&admin), None);
    assert!(
        !text(&r.body).contains("moat_"),
        "a listing shows no secret"
    );

    // The commands.
    let secret = ok(moat(
        &server,
        &admin,
        &["keys", "create", "ci runner", "--max-sandboxes", "1", "-q"],
    ));
    let secret = secret.trim().to_owned();
    assert!(secret.starts_with("moat_"), "{secret}");
    let table = ok(moat(&server, &admin, &["keys", "ls"]));
    let row = table
        .lines()
        .find(|l| l.contains("ci runner"))
        .unwrap_or_else(|| panic!("{table}"));
    let ci_id = row.split_whitespace().next().expect("id").to_owned();
    assert!(ci_id.starts_with("key_"), "{row}");
    assert!(row.contains("sandboxes=1"), "{row}");
    assert!(table.starts_with("ID "), "{table}");

    let keys = json_out(moat(&server, &admin, &["keys", "ls", "-o", "json"]));
    let names: Vec<&str> = keys
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    assert_eq!(names, ["admin", "raw", "ci runner"]);

    // A key of a new tenant, made with it; that tenant's keys are listed apart.
    let created = json_out(moat(
        &server,
        &admin,
        &[
            "keys", "create", "ops", "--tenant", "acme", "--role", "admin", "-o", "json",
        ],
    ));
    assert_eq!(created["tenant"], "acme");
    assert_eq!(created["role"], "admin");
    let acme_admin = created["secret"].as_str().expect("secret").to_owned();
    let acme = json_out(moat(
        &server,
        &admin,
        &["keys", "ls", "--tenant", "acme", "-o", "json"],
    ));
    assert_eq!(acme.as_array().map(Vec::len), Some(1));
    // Its own admin sees its own tenant by default.
    let own = json_out(moat(&server, &acme_admin, &["keys", "ls", "-o", "json"]));
    assert_eq!(own[0]["name"], "ops");

    // The quota holds: one sandbox for this key.
    let first = ok(moat(&server, &secret, &["sandbox", "create"]));
    let (_, err) = status(moat(&server, &secret, &["sandbox", "create"]), 1);
    assert!(err.contains("429 quota_exceeded"), "{err}");
    ok(moat(&server, &secret, &["sandbox", "rm", first.trim()]));

    // A user key's key commands are refused.
    let (_, err) = status(moat(&server, &secret, &["keys", "ls"]), 1);
    assert!(err.contains("403 forbidden"), "{err}");

    // Revoked: 401 from then on, for the commands and the API.
    let out = ok(moat(&server, &admin, &["keys", "revoke", &ci_id]));
    assert_eq!(out.trim(), ci_id);
    let (_, err) = status(moat(&server, &secret, &["sandbox", "ls"]), 1);
    assert!(err.contains("401 unauthenticated"), "{err}");
    let keys = json_out(moat(&server, &admin, &["keys", "ls", "-o", "json"]));
    let ci = keys
        .as_array()
        .expect("array")
        .iter()
        .find(|k| k["id"] == ci_id.as_str())
        .expect("revoked key still listed");
    assert!(ci["revoked_at"].is_i64(), "{ci}");
    // Revoking again is no error.
    let again = server.request("DELETE", &format!("/v1/keys/{ci_id}"), Some(&admin), None);
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["revoked_at"], ci["revoked_at"]);
}

#[test]
fn sandbox_and_template_commands() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let key = server.admin_key();

    // No server, no key, https: clear errors before anything is sent.
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["sandbox", "ls"])
        .env_remove("MOAT_URL")
        .env_remove("MOAT_API_KEY")
        .output()
        .expect("moat");
    let (_, err) = status(out, 1);
    assert!(err.contains("MOAT_URL") && err.contains("--url"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["sandbox", "ls", "--url", "http://127.0.0.1:1"])
        .env_remove("MOAT_API_KEY")
        .output()
        .expect("moat");
    let (_, err) = status(out, 1);
    assert!(err.contains("MOAT_API_KEY"), "{err}");
    let (_, err) = status(
        moat(
            &server,
            &key,
            &["sandbox", "ls", "--url", "https://127.0.0.1:1"],
        ),
        1,
    );
    assert!(err.contains("https is not supported"), "{err}");
    // The flags win over the environment.
    let out = command(&server, "moat_wrong", &["sandbox", "ls", "--api-key", &key])
        .output()
        .expect("moat");
    ok(out);

    // create, ls, get.
    let id = ok(moat(
        &server,
        &key,
        &[
            "sandbox",
            "create",
            "-m",
            "suite=cli",
            "--memory",
            "256M",
            "--cpus",
            "0.5",
        ],
    ));
    let id = id.trim().to_owned();
    assert_eq!(id.len(), 20, "{id}");
    let table = ok(moat(&server, &key, &["sandbox", "ls", "-m", "suite=cli"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("ID  "), "{table}");
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(cells[0], id);
    assert_eq!(cells[2], "running");
    assert!(
        lines[1].contains("256M") && lines[1].contains("suite=cli"),
        "{table}"
    );
    let listed = json_out(moat(&server, &key, &["sandbox", "ls", "-o", "json"]));
    assert_eq!(listed[0]["id"], id.as_str());
    let shown = json_out(moat(&server, &key, &["sandbox", "get", &id, "-o", "json"]));
    assert_eq!(shown["state"], "running");
    assert_eq!(shown["resources"]["cpu_millis"], 500);
    let described = ok(moat(&server, &key, &["sandbox", "get", &id]));
    assert!(described.contains("state:       running"), "{described}");

    // exec: output streams through, the exit code propagates.
    let (stdout, stderr) = status(
        moat(
            &server,
            &key,
            &[
                "sandbox",
                "exec",
                &id,
                "--",
                "sh",
                "-c",
                "echo out; echo err >&2; exit 7",
            ],
        ),
        7,
    );
    assert_eq!(stdout, "out\n");
    assert_eq!(stderr, "err\n");
    let (stdout, _) = status(
        moat(
            &server,
            &key,
            &[
                "sandbox",
                "exec",
                &id,
                "-e",
                "GREETING=hi",
                "-w",
                "/tmp",
                "--",
                "sh",
                "-c",
                "echo $GREETING $(pwd) $(id -u)",
            ],
        ),
        0,
    );
    assert_eq!(stdout, "hi /tmp 1000\n");
    let (stdout, _) = status(
        moat(
            &server,
            &key,
            &["sandbox", "exec", &id, "--root", "--", "id", "-u"],
        ),
        0,
    );
    assert_eq!(stdout, "0\n");
    // Binary output and stdin arrive exactly.
    let mut child = command(&server, &key, &["sandbox", "exec", "-i", &id, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let input: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&input)
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    assert_eq!(out.stdout, input);
    // Timeout: 124; a missing program: 127; a signal: 128+N.
    status(
        moat(
            &server,
            &key,
            &[
                "sandbox",
                "exec",
                &id,
                "--timeout",
                "1s",
                "--",
                "sleep",
                "60",
            ],
        ),
        124,
    );
    status(
        moat(
            &server,
            &key,
            &["sandbox", "exec", &id, "--", "no-such-program"],
        ),
        127,
    );
    status(
        moat(
            &server,
            &key,
            &["sandbox", "exec", &id, "--", "sh", "-c", "kill -TERM $$"],
        ),
        143,
    );
    // -o json: the buffered result.
    let (stdout, _) = status(
        moat(
            &server,
            &key,
            &[
                "sandbox",
                "exec",
                &id,
                "-o",
                "json",
                "--",
                "sh",
                "-c",
                "echo x; exit 3",
            ],
        ),
        3,
    );
    let result: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(result["stdout"], "x\n");
    assert_eq!(result["exit_code"], 3);
    // A missing sandbox.
    let (_, err) = status(
        moat(
            &server,
            &key,
            &["sandbox", "exec", "aaaaaaaaaaaaaaaaaaaa", "--", "true"],
        ),
        125,
    );
    assert!(err.contains("404 not_found"), "{err}");

    // timeout: a new expiry.
    let before = shown["expires_at"].as_i64().expect("expires");
    let after = json_out(moat(
        &server,
        &key,
        &["sandbox", "timeout", &id, "2h", "-o", "json"],
    ));
    assert!(after["expires_at"].as_i64().expect("expires") > before);
    let (_, err) = status(moat(&server, &key, &["sandbox", "timeout", &id, "soon"]), 1);
    assert!(err.contains("duration"), "{err}");

    // Templates: from a file and flags, listed, shown, removed.
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        r#"{"rootfs":"host","resources":{"memory":"256M"},"env":{"LANG":"C.UTF-8"}}"#,
    )
    .expect("spec");
    let spec = spec.to_str().expect("path");
    let out = ok(moat(
        &server,
        &key,
        &[
            "template",
            "create",
            "small",
            "--from-file",
            spec,
            "--cpus",
            "0.5",
        ],
    ));
    assert_eq!(out.trim(), "small");
    let table = ok(moat(&server, &key, &["template", "ls"]));
    let row = table
        .lines()
        .find(|l| l.starts_with("small "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("256M") && row.contains("0.5"), "{row}");
    assert!(table.lines().any(|l| l.starts_with("host ")), "{table}");
    let shown = json_out(moat(
        &server,
        &key,
        &["template", "get", "small", "-o", "json"],
    ));
    assert_eq!(shown["spec"]["env"]["LANG"], "C.UTF-8");
    assert_eq!(shown["spec"]["resources"]["cpus"], 0.5);
    let listed = json_out(moat(&server, &key, &["template", "ls", "-o", "json"]));
    let names: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"small") && names.contains(&"host"),
        "{listed}"
    );
    let (_, err) = status(moat(&server, &key, &["template", "create", "Bad Name"]), 1);
    assert!(err.contains("400 invalid"), "{err}");
    // In use: refused without --force.
    let small = ok(moat(&server, &key, &["sandbox", "create", "-t", "small"]));
    let (_, err) = status(moat(&server, &key, &["template", "rm", "small"]), 1);
    assert!(err.contains("409 conflict"), "{err}");
    ok(moat(&server, &key, &["template", "rm", "--force", "small"]));
    let table = ok(moat(&server, &key, &["template", "ls"]));
    assert!(!table.contains("small"), "{table}");

    // rm: ended, shown as killed, gone from the default listing.
    let out = ok(moat(&server, &key, &["sandbox", "rm", &id, small.trim()]));
    assert_eq!(out, format!("{id}\n{}\n", small.trim()));
    let shown = json_out(moat(&server, &key, &["sandbox", "get", &id, "-o", "json"]));
    assert_eq!(shown["state"], "killed");
    assert_eq!(shown["end_reason"], "deleted");
    let table = ok(moat(&server, &key, &["sandbox", "ls"]));
    assert_eq!(table.lines().count(), 1, "{table}");
    let table = ok(moat(&server, &key, &["sandbox", "ls", "-a"]));
    assert!(table.contains(&id) && table.contains("killed"), "{table}");
}

#[test]
fn cp_both_ways() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let key = server.admin_key();
    let id = ok(moat(&server, &key, &["sandbox", "create"]));
    let id = id.trim();
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path();

    // A file up, into an existing directory and to a new name, and back down.
    let data: Vec<u8> = (0..=255u8).cycle().take(3 << 20).collect();
    std::fs::write(local.join("blob.bin"), &data).expect("write");
    let blob = local.join("blob.bin");
    let blob = blob.to_str().expect("path");
    ok(moat(
        &server,
        &key,
        &["sandbox", "cp", blob, &format!("{id}:/tmp/")],
    ));
    ok(moat(
        &server,
        &key,
        &["sandbox", "cp", blob, &format!("{id}:/tmp/renamed.bin")],
    ));
    let (stdout, _) = status(
        moat(
            &server,
            &key,
            &[
                "sandbox",
                "exec",
                id,
                "--",
                "sh",
                "-c",
                "cmp /tmp/blob.bin /tmp/renamed.bin && wc -c < /tmp/blob.bin",
            ],
        ),
        0,
    );
    assert_eq!(stdout.trim(), (3 << 20).to_string());
    let back = local.join("back.bin");
    ok(moat(
        &server,
        &key,
        &[
            "sandbox",
            "cp",
            &format!("{id}:/tmp/renamed.bin"),
            back.to_str().expect("path"),
        ],
    ));
    assert_eq!(std::fs::read(&back).expect("read"), data);
    // Into an existing local directory, under its own name.
    let into = local.join("into");
    std::fs::create_dir(&into).expect("mkdir");
    ok(moat(
        &server,
        &key,
        &[
            "sandbox",
            "cp",
            &format!("{id}:/tmp/blob.bin"),
            into.to_str().expect("path"),
        ],
    ));
    assert_eq!(std::fs::read(into.join("blob.bin")).expect("read"), data);

    // A directory tree up and back.
    let tree = local.join("project");
    std::fs::create_dir_all(tree.join("src/deep")).expect("mkdir");
    std::fs::write(tree.join("README"), "read me\n").expect("write");
    std::fs::write(tree.join("src/deep/main.py"), "print('hi')\n").expect("write");
    std::os::unix::fs::symlink("README", tree.join("link")).expect("symlink");
    ok(moat(
        &server,
        &key,
        &[
            "sandbox",
            "cp",
            tree.to_str().expect("path"),
            &format!("{id}:/home/user/"),
        ],
    ));
    let (stdout, _) = status(
        moat(
            &server,
            &key,
            &[
                "sandbox",
                "exec",
                id,
                "--",
                "sh",
                "-c",
                "cd /home/user/project && python3 src/deep/main.py && readlink link && cat README",
            ],
        ),
        0,
    );
    assert_eq!(stdout, "hi\nREADME\nread me\n");
    let copy = local.join("copy");
    ok(moat(
        &server,
        &key,
        &[
            "sandbox",
            "cp",
            &format!("{id}:/home/user/project"),
            copy.to_str().expect("path"),
        ],
    ));
    assert_eq!(
        std::fs::read_to_string(copy.join("src/deep/main.py")).expect("read"),
        "print('hi')\n"
    );
    assert_eq!(
        std::fs::read_link(copy.join("link")).expect("link"),
        Path::new("README")
    );

    // A link made in the sandbox cannot take a download outside the target.
    let (_, _) = status(
        moat(
            &server,
            &key,
            &[
                "sandbox",
                "exec",
                id,
                "--",
                "sh",
                "-c",
                "mkdir -p /tmp/evil && ln -s /etc /tmp/evil/out",
            ],
        ),
        0,
    );
    let evil = local.join("evil");
    ok(moat(
        &server,
        &key,
        &[
            "sandbox",
            "cp",
            &format!("{id}:/tmp/evil"),
            evil.to_str().expect("path"),
        ],
    ));
    assert!(
        std::fs::symlink_metadata(evil.join("out"))
            .expect("link")
            .file_type()
            .is_symlink()
    );

    // Errors: both local, a missing source.
    let (_, err) = status(moat(&server, &key, &["sandbox", "cp", blob, "./x"]), 1);
    assert!(err.contains("neither side"), "{err}");
    let (_, err) = status(
        moat(
            &server,
            &key,
            &["sandbox", "cp", &format!("{id}:/nope"), blob],
        ),
        1,
    );
    assert!(err.contains("404"), "{err}");
    ok(moat(&server, &key, &["sandbox", "rm", id]));
}

#[test]
fn run_through_the_server() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let key = server.admin_key();
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("job.sh");
    std::fs::write(&script, "echo copied $1\n").expect("write");
    let copy = format!("{}:/tmp/job.sh", script.display());

    let (stdout, stderr) = status(
        moat(
            &server,
            &key,
            &[
                "run",
                "--memory",
                "256M",
                "--copy",
                &copy,
                "-e",
                "X=1",
                "--",
                "sh",
                "-c",
                "sh /tmp/job.sh $X; echo oops >&2; exit 5",
            ],
        ),
        5,
    );
    assert_eq!(stdout, "copied 1\n");
    assert_eq!(stderr, "oops\n");
    let (_, _) = status(
        moat(
            &server,
            &key,
            &["run", "--timeout", "1s", "--", "sleep", "60"],
        ),
        124,
    );
    // Standard input that is not a terminal goes to the command.
    let mut child = command(&server, &key, &["run", "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"shout\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(text(&out.stdout), "SHOUT\n");
    // Not supported through a server.
    let (_, err) = status(
        moat(&server, &key, &["run", "--rootfs", "/", "--", "true"]),
        125,
    );
    assert!(err.contains("--rootfs"), "{err}");

    // Ctrl-C: the sandbox goes too.
    let child = command(&server, &key, &["run", "--", "sleep", "600"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = server.request(
            "GET",
            "/v1/sandboxes?state=running&metadata=created_by%3Dmoat+run",
            Some(&key),
            None,
        );
        if r.json()["sandboxes"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            break;
        }
        assert!(Instant::now() < deadline, "the run's sandbox never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Give the command a moment to start; the test does not depend on it having started.
    std::thread::sleep(Duration::from_millis(200));
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));

    // Every run's sandbox was deleted.
    let r = server.request(
        "GET",
        "/v1/sandboxes?metadata=created_by%3Dmoat+run",
        Some(&key),
        None,
    );
    let all = r.json();
    let sandboxes = all["sandboxes"].as_array().expect("sandboxes");
    assert_eq!(sandboxes.len(), 4, "{all}");
    for s in sandboxes {
        assert_eq!(s["state"], "killed", "{s}");
        assert_eq!(s["end_reason"], "deleted", "{s}");
    }
}

/// `cmd` with its standard output a pipe whose reader is already gone.
fn with_closed_stdout(mut cmd: Command) -> Output {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints for pipe(2) to fill.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: both descriptors were just made by pipe(2) and are owned only here.
    let (read, write) = unsafe {
        use std::os::fd::{FromRawFd, OwnedFd};
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    drop(read);
    let child = cmd
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn moat");
    child.wait_with_output().expect("wait for moat")
}

#[test]
fn closed_stdout_exits_quietly() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let admin = server.admin_key();
    let id = ok(moat(&server, &admin, &["sandbox", "create"]));
    let id = id.trim();
    for args in [
        &["template", "ls"][..],
        &["template", "ls", "-o", "json"],
        &["template", "get", "base"],
        &["sandbox", "ls"],
        &["sandbox", "ls", "-o", "json"],
        &["sandbox", "get", id],
        &["keys", "ls"],
        &["keys", "ls", "-o", "json"],
        &["snapshot", "ls", "-o", "json"],
        &["sandbox", "exec", "-o", "json", id, "--", "echo", "hi"],
    ] {
        let out = with_closed_stdout(command(&server, &admin, args));
        assert_eq!(
            out.status.code(),
            Some(141),
            "moat {args:?}: {:?}, stderr: {}",
            out.status,
            text(&out.stderr)
        );
        assert_eq!(text(&out.stderr), "", "moat {args:?} is quiet");
    }
    let mut check = Command::new(env!("CARGO_BIN_EXE_moat"));
    check.arg("check");
    let out = with_closed_stdout(check);
    assert_eq!(out.status.code(), Some(141), "{}", text(&out.stderr));
    ok(moat(&server, &admin, &["sandbox", "rm", id]));
}
