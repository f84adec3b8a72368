//! `moat run` as a user sees it: output, exit codes, options, stdin, and refusals before anything
//! starts. Needs root; skips with a printed reason otherwise.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use moat_test_support as support;
use support::need_root;

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

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn prints_and_exits_with_the_commands_code() {
    need_root!();
    let o = run(&["--", "python3", "-c", "print(1)"]);
    assert_eq!(
        (o.status.code(), stdout(&o).as_str()),
        (Some(0), "1\n"),
        "{}",
        stderr(&o)
    );
    let o = run(&["--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(stdout(&o), "out\n");
    assert_eq!(stderr(&o), "err\n");
    let o = run(&["--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(o.status.code(), Some(128 + 15));
}

#[test]
fn missing_command_is_127() {
    need_root!();
    let o = run(&["--", "no-such-command-anywhere"]);
    assert_eq!(o.status.code(), Some(127));
    assert!(stderr(&o).contains("command not found"), "{}", stderr(&o));
}

#[test]
fn invalid_options_are_refused_before_anything_starts() {
    need_root!();
    // With MOAT_TIMING set, `moat run` reports each stage on stderr ("backend ready", "sandbox
    // created", ...): a refusal before anything starts is the one line that says why.
    let timed = |args: &[&str]| {
        moat()
            .arg("run")
            .args(args)
            .env("MOAT_TIMING", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run moat")
    };
    // The probe works: a valid run reports its stages.
    let o = timed(&["--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("backend ready"), "{}", stderr(&o));
    assert!(stderr(&o).contains("sandbox created"), "{}", stderr(&o));

    for (args, reason) in [
        (
            &["--memory", "1K", "--", "true"][..],
            "memory 1K is out of range (16M to 64G)",
        ),
        (
            &["--memory", "lots", "--", "true"],
            "--memory: invalid request: invalid size \"lots\"",
        ),
        (
            &["--cpus", "0", "--", "true"],
            "--cpus: invalid request: invalid CPU count \"0\": must be positive",
        ),
        (
            &["--pids", "1", "--", "true"],
            "pids 1 is out of range (8 to 4096)",
        ),
        (
            &["--disk", "-5G", "--", "true"],
            "--disk: invalid request: invalid size \"-5G\"",
        ),
        (
            &["--timeout", "forever", "--", "true"],
            "--timeout: invalid request: invalid duration \"forever\"",
        ),
        (
            &["--env", "NOEQUALS", "--", "true"],
            "--env \"NOEQUALS\": expected KEY=VALUE",
        ),
        (
            &["--workdir", "relative", "--", "true"],
            "--workdir \"relative\": must be an absolute path",
        ),
        (
            &["--copy", "/no/such/file:/tmp/x", "--", "true"],
            "/no/such/file is not a readable file",
        ),
        (
            &["--rootfs", "/no/such/dir", "--", "true"],
            "--rootfs /no/such/dir: not a directory",
        ),
    ] {
        let o = timed(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(125), "{args:?} was accepted: {err}");
        // One line, the reason, and no stage: no backend, no sandbox, no command.
        assert_eq!(err.lines().count(), 1, "{args:?} started something: {err}");
        assert!(
            err.starts_with("moat: ") && err.contains(reason),
            "{args:?}: expected {reason:?}, got {err}"
        );
    }
    let o = timed(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "a run without a command: {err}");
    assert_eq!(
        err,
        "moat: no command given: moat run [OPTIONS] -- CMD [ARGS...]\n"
    );
}

#[test]
fn a_rootfs_path_that_is_not_utf8_is_refused_by_name() {
    use std::os::unix::ffi::OsStrExt;
    need_root!();
    // A lossy copy of the name would be another directory: the run must say why it refuses.
    let parent = std::env::temp_dir().join(format!("moat-rootfs-{}", std::process::id()));
    let dir = parent.join(std::ffi::OsStr::from_bytes(b"root\xff"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let o = moat()
        .arg("run")
        .arg("--rootfs")
        .arg(&dir)
        .args(["--", "true"])
        .env("MOAT_TIMING", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run moat");
    let _ = std::fs::remove_dir_all(&parent);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "accepted: {err}");
    assert_eq!(err.lines().count(), 1, "started something: {err}");
    assert!(
        err.starts_with("moat: --rootfs ") && err.contains(": the path is not valid UTF-8"),
        "{err}"
    );
}

#[test]
fn env_workdir_root_and_copy() {
    need_root!();
    let o = run(&[
        "-e",
        "GREETING=hello",
        "--",
        "sh",
        "-c",
        "echo $GREETING $HOME $(whoami)",
    ]);
    assert_eq!(stdout(&o), "hello /home/user user\n", "{}", stderr(&o));
    let o = run(&["--workdir", "/tmp", "--", "pwd"]);
    assert_eq!(stdout(&o), "/tmp\n", "{}", stderr(&o));
    // `/` can be listed (Landlock grants reading it), not written.
    let o = run(&[
        "--root",
        "--",
        "sh",
        "-c",
        "ls / | grep -x tmp; touch /new 2>&1 || echo refused",
    ]);
    assert!(
        stdout(&o).starts_with("tmp\n"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(
        stdout(&o).ends_with("refused\n"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let o = run(&["--root", "--", "id", "-u"]);
    assert_eq!(stdout(&o), "0\n");
    let dir = std::env::temp_dir().join(format!("moat-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let local = dir.join("job.py");
    std::fs::write(&local, "print(sum(range(10)))\n").expect("write");
    let copy = format!("{}:/home/user/job.py", local.display());
    let o = run(&["--copy", &copy, "--", "python3", "job.py"]);
    assert_eq!(stdout(&o), "45\n", "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn stdin_is_forwarded_and_closed() {
    need_root!();
    let mut child = moat()
        .args(["run", "--", "sh", "-c", "wc -c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&vec![b'x'; 100_000]).expect("write");
    drop(stdin);
    let o = child.wait_with_output().expect("wait");
    assert_eq!(stdout(&o).trim(), "100000");
}

/// `moat run` ends with its command even when its own input is still open and silent (a
/// terminal nobody types in, a pipe nobody closed): it does not wait for that input.
#[test]
fn an_open_input_does_not_hold_up_the_end() {
    need_root!();
    let mut child = moat()
        .args(["run", "--", "echo", "done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run moat");
    let input = child.stdin.take();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(input);
    let o = child.wait_with_output().expect("output");
    assert!(
        status.is_some_and(|s| s.success()),
        "moat run did not end within 30 s of its command while its input stayed open: {}",
        stderr(&o)
    );
    assert_eq!(stdout(&o), "done\n");
}

/// Runs `moat run ARGS` on a terminal (a pty of Python's making), typing `typed` a moment
/// after it starts: its exit code (`None`: still running after 30 s, then killed) and what it
/// showed.
fn on_a_terminal(args: &[&str], typed: &str) -> (Option<i32>, String) {
    let script = r#"
import json, os, pty, select, sys, time
argv, typed = json.loads(sys.argv[1]), sys.argv[2].encode()
pid, fd = pty.fork()
if pid == 0:
    os.execv(argv[0], argv)
out, start, sent, code = b"", time.time(), not typed, None
while time.time() - start < 30:
    if not sent and time.time() - start > 1:
        os.write(fd, typed)
        sent = True
    r, _, _ = select.select([fd], [], [], 0.05)
    if r:
        try:
            out += os.read(fd, 65536)
        except OSError:
            pass
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        code = os.waitstatus_to_exitcode(status)
        break
if code is None:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(json.dumps({"code": code, "out": out.decode("utf-8", "replace")}))
"#;
    let mut argv = vec![env!("CARGO_BIN_EXE_moat").to_owned(), "run".to_owned()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let o = Command::new("python3")
        .args(["-c", script])
        .arg(serde_json::to_string(&argv).expect("json"))
        .arg(typed)
        .output()
        .expect("python3");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)));
    (
        v["code"].as_i64().map(|c| c as i32),
        v["out"].as_str().unwrap_or_default().to_owned(),
    )
}

/// On a terminal, as the README's quick start types it: `moat run` ends with its command,
/// and an interactive shell with the status it exits with.
#[test]
fn on_a_terminal_it_ends_with_its_command() {
    need_root!();
    let (code, out) = on_a_terminal(&["--", "python3", "-c", "print(1)"], "");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains('1'), "{out}");
    let (code, out) = on_a_terminal(&["--shell"], "echo in-the-shell; exit 5\n");
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("in-the-shell"), "{out}");
}

/// The host processes whose command line is exactly `argv`.
fn host_processes(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

#[test]
fn timeout_kills_the_whole_tree() {
    need_root!();
    // A duration no other test uses, so the host's process list shows only this tree.
    let marker = format!("{}", 100_000 + std::process::id());
    let script = format!("sleep {marker} & sleep {marker} & echo started; wait");
    let o = run(&["--timeout", "1s", "--", "sh", "-c", &script]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));
    assert_eq!(stdout(&o), "started\n", "the tree never started");
    // `moat run` has exited: the whole tree, background children included, is gone from the
    // host.
    let left = host_processes(&["sleep", &marker]);
    assert!(left.is_empty(), "still running on the host: {left:?}");
}

/// A minimal root filesystem: `dash` as `/bin/sh` with its libraries, and the `user` account.
fn tiny_rootfs() -> std::path::PathBuf {
    let root = std::env::temp_dir().join(format!("moat-cli-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    support::tiny_rootfs(&root, &[("/usr/bin/dash", "sh")]);
    root
}

#[test]
fn directory_rootfs_is_read_only_below_a_writable_layer() {
    need_root!();
    let lower = tiny_rootfs();
    let rootfs = lower.display().to_string();
    let script =
        "echo layer > /tmp/new && read l < /tmp/new && echo $l && echo x > /bin/sh2; echo $?";
    let o = run(&["--rootfs", &rootfs, "--", "/bin/sh", "-c", script]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("layer\n"), "{out}");
    assert!(
        out.ends_with("2\n"),
        "the user may not write the template's /bin: {out}"
    );
    // Root inside owns the template's root-owned files (an id-mapped lower layer), so it can
    // change them; the changes land in the writable layer only.
    let o = run(&["--root", "--rootfs", &rootfs, "--", "/bin/sh", "-c", script]);
    assert_eq!(stdout(&o), "layer\n0\n", "{}", stderr(&o));
    assert!(
        !lower.join("tmp/new").exists(),
        "a write reached the template"
    );
    assert!(
        !lower.join("bin/sh2").exists(),
        "a write reached the template"
    );
    // The host's own root contains moat's runtime directory: refused with a reason.
    let o = run(&["--root", "--rootfs", "/", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("runtime directory"), "{}", stderr(&o));
    std::fs::remove_dir_all(&lower).expect("cleanup");
}

#[test]
fn a_reader_that_goes_away_ends_the_run_like_a_pipeline() {
    need_root!();
    let mut child = moat()
        .args(["run", "--", "yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 4];
    std::io::Read::read_exact(&mut out, &mut buf).expect("first bytes");
    drop(out);
    let o = child.wait_with_output().expect("wait");
    assert_eq!(o.status.code(), Some(141), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
}

#[test]
fn check_reports_the_host_and_the_choice() {
    need_root!();
    let o = moat().arg("check").output().expect("run moat check");
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    for line in [
        "user namespaces",
        "cgroups",
        "seccomp",
        "landlock",
        "overlayfs",
        "runsc",
        "kvm",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "no {line} line: {text}"
        );
    }
    assert!(text.contains("moat will use: native backend"), "{text}");
}

/// Whether process `pid` catches signal `sig` (its `SigCgt` mask in `/proc`).
fn catches(pid: u32, sig: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

#[test]
fn ctrl_c_at_any_moment_exits_130_and_leaves_no_cgroup() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    need_root!();
    const RUNS: u32 = 200;
    let layout = moat_jail::cgroup::Layout::detect().expect("cgroup layout");
    // A small generator is enough to spread the delays; the seed is printed to replay a run.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos() as u64
        | 1;
    eprintln!("seed {seed}");
    let mut leaked = Vec::new();
    let mut caught = 0;
    for i in 0..RUNS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Up to 16 ms: on a loaded machine `moat run` may take 6 ms or more to catch Ctrl-C,
        // and most runs must still be past that.
        let delay = std::time::Duration::from_micros(seed % 16_000);
        // A sandbox id: 16 to 64 of a-z and 0-9.
        let id = format!("intr{:010}x{i:05}", std::process::id());
        let cgroups = || -> Vec<std::path::PathBuf> {
            layout
                .bases()
                .into_iter()
                .map(|b| b.join(&id))
                .filter(|d| d.exists())
                .collect()
        };
        let mut cmd = moat();
        // As from a terminal: Ctrl-C's default action, whatever this test inherited.
        // SAFETY: signal(2) is async-signal-safe, as a pre_exec hook requires.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let child = cmd
            .args(["run", "--id", &id, "--", "sleep", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn moat run");
        std::thread::sleep(delay);
        // Whatever moat run has made, it made with Ctrl-C already caught.
        let made = !cgroups().is_empty();
        let catching = catches(child.id(), libc::SIGINT);
        assert!(
            catching || !made,
            "run {i} after {delay:?}: cgroups exist while Ctrl-C would kill moat run outright"
        );
        // SAFETY: kill has no memory preconditions; the child is ours and not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().expect("wait");
        if catching {
            caught += 1;
        }
        // Only a process that had not yet started to catch it (and so had made nothing) may
        // die of the signal itself.
        let died_early = !catching && out.status.signal() == Some(libc::SIGINT);
        assert!(
            out.status.code() == Some(130) || died_early,
            "run {i} after {delay:?}: {:?}: {}",
            out.status,
            stderr(&out)
        );
        let left = cgroups();
        if !left.is_empty() {
            leaked.push((i, delay, left));
        }
    }
    assert!(leaked.is_empty(), "cgroups left behind: {leaked:?}");
    // Most delays fall after start-up: the 130 path is what is being tested.
    assert!(
        caught > RUNS / 4,
        "only {caught} of {RUNS} runs had started"
    );
}
