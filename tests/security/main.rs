//! The security corpus: real hostile programs (in `corpus/`) run in real sandboxes through the
//! `moat` binary. Each test asserts what happens inside and the host's invariants afterwards: no
//! process, cgroup, mount or file of the sandbox left, host files untouched.
//!
//! The cases follow `shared/reference/threat-checklist.md` (IDs in each test's name) for the
//! native backend. Tests need root; without it they print a reason and skip.

use moat_test_support::{host, need_root};

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use host::{HostProbe, moat, unique_id};

fn corpus(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/security/corpus")
        .join(name);
    p.canonicalize().expect("corpus file").display().to_string()
}

/// Runs `moat run --id <fresh id> ARGS` with no stdin and returns its output, after checking
/// that the sandbox left nothing on the host.
fn run_clean(args: &[&str]) -> std::process::Output {
    let id = unique_id();
    let probe = HostProbe::before(&id);
    let out = moat()
        .args(["run", "--id", &id])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run moat");
    probe.assert_clean_after();
    out
}

/// Runs `moat run` with `opts`, copying the corpus program in and running it with `interp`.
/// Returns (exit code, stdout, stderr) after checking the host is clean.
fn run_corpus(opts: &[&str], program: &str, interp: &str) -> (i32, String, String) {
    let remote = format!("/tmp/{program}");
    let copy = format!("{}:{remote}", corpus(program));
    let mut args = vec!["--copy", &copy];
    args.extend_from_slice(opts);
    args.extend(["--", interp, &remote]);
    let out = run_clean(&args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A1: host fds leaked into the sandbox (runc CVE-2024-21626, BuildKit CVE-2024-23651).
/// User code sees only its stdio (and the fd of the directory it lists); the agent's fds are
/// closed to it; nothing points at a host path.
#[test]
fn a1_no_host_fds_inside() {
    need_root!();
    let (code, out, err) = run_corpus(&[], "a1_fd_hygiene.py", "python3");
    assert_eq!(code, 0, "{out}{err}");
    // The directory fd the listing itself used is closed by the time it is read back.
    let selfs: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("self ") && !l.contains("unreadable"))
        .collect();
    assert!(selfs.len() <= 4, "unexpected fds: {out}");
    for l in &selfs {
        assert!(
            l.contains("pipe:") || l.contains("/proc/") || l.contains("/dev/null"),
            "fd to a path: {l}"
        );
    }
    assert!(
        out.contains("pid1 fds denied"),
        "the agent's fds must not be visible: {out}"
    );
}

/// A2: cwd set to `/proc/self/fd/N` to reach a leaked host directory (runc CVE-2024-21626).
#[test]
fn a2_proc_fd_workdir_refused() {
    need_root!();
    for n in [3, 4, 7] {
        let workdir = format!("/proc/self/fd/{n}");
        let out = run_clean(&["--workdir", &workdir, "--", "pwd"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(125),
            "cwd {workdir} was accepted: {err}"
        );
        assert!(
            err.contains(&format!(
                "working directory '{workdir}' is inside /proc, which is not allowed"
            )),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "pwd ran");
    }
}

/// A3: overwrite the runtime binary via `/proc/<pid>/exe` (runc CVE-2019-5736), as root inside.
#[test]
fn a3_agent_binary_not_writable() {
    need_root!();
    for user in [&[][..], &["--root"][..]] {
        let (code, out, err) = run_corpus(user, "a3_overwrite_agent.py", "python3");
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("summary: contained"), "{out}");
        // The first layer: the agent is not dumpable, so its exe link is closed to user code.
        assert!(out.contains("/proc/1/exe: EACCES"), "{out}");
    }
}

/// A3, the second layer: even with the agent's `/proc/<pid>/exe` in hand (here the host's, which
/// no non-dumpable flag stops), the binary it names cannot be opened for writing, neither while
/// the agent runs nor after it exited (the CVE-2019-5736 sequence: hold the link, wait for the
/// exit, reopen it for writing), and the host's `moat` binary is unchanged.
#[test]
fn a3_sealed_agent_binary_resists_a_held_exe_link() {
    use std::io::Read as _;
    need_root!();
    let binary = std::fs::read(env!("CARGO_BIN_EXE_moat")).expect("read moat");
    let id = unique_id();
    let probe = HostProbe::before(&id);
    let mut child = moat()
        .args(["run", "--id", &id, "--", "sh", "-c", "echo ready; sleep 2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn moat");
    let mut ready = [0u8; 6];
    child
        .stdout
        .take()
        .expect("stdout")
        .read_exact(&mut ready)
        .expect("ready");
    // The agent: the sandbox's process whose pid in its own namespace is 1.
    let agent = host::pids_in_sandbox(&id)
        .into_iter()
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .find(|l| l.starts_with("NSpid:"))
                    .is_some_and(|l| l.split_whitespace().last() == Some("1"))
            })
        })
        .expect("the agent's pid");
    let exe = format!("/proc/{agent}/exe");
    let write_err = |path: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"pwned"))
            .expect_err("the agent's binary was writable")
    };
    let running = write_err(&exe);
    let held = std::fs::File::open(&exe).expect("open the agent's exe for reading");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    let after = write_err(&format!("/proc/self/fd/{}", held.as_raw_fd()));
    for e in [&running, &after] {
        assert!(
            matches!(
                e.raw_os_error(),
                Some(libc::EROFS | libc::EPERM | libc::ETXTBSY)
            ),
            "unexpected error: {e}"
        );
    }
    // `ETXTBSY` lasts only while some process executes the file (other sandboxes' agents may):
    // what stands for good is the read-only mount the link names or, where the kernel lacks
    // `open_tree`, the memfd's write seal.
    // SAFETY: all-zero is a valid statvfs; fstatvfs fills it from a descriptor we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `held` is open and `st` is writable.
    assert_eq!(unsafe { libc::fstatvfs(held.as_raw_fd(), &mut st) }, 0);
    // SAFETY: fcntl with integer arguments on a descriptor we own.
    let seals = unsafe { libc::fcntl(held.as_raw_fd(), libc::F_GET_SEALS) };
    assert!(
        st.f_flag & libc::ST_RDONLY != 0 || (seals > 0 && seals & libc::F_SEAL_WRITE != 0),
        "the agent's binary is on a writable mount and not sealed"
    );
    drop(held);
    assert_eq!(
        std::fs::read(env!("CARGO_BIN_EXE_moat")).expect("read moat"),
        binary,
        "the host's moat binary changed"
    );
    probe.assert_clean_after();
}

/// A5/B1: host-kernel attack surface from inside (fsconfig CVE-2022-0185, nf_tables
/// CVE-2024-1086, io_uring, bpf, keyctl, perf, userfaultfd, kexec, modules, shocker
/// open_by_handle_at, ptrace of the agent, TIOCSTI) as the user and as root.
#[test]
fn a5_b1_privileged_syscalls_denied() {
    need_root!();
    for user in [&[][..], &["--root"][..]] {
        let (code, out, err) = run_corpus(user, "a5_b1_privileged_syscalls.py", "python3");
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("summary: contained"), "{out}");
        // Refused by the filter, every one: a call that failed in the kernel for its
        // arguments would have passed above whatever the filter said.
        assert!(out.contains("errnos: all EPERM"), "{out}");
    }
}

/// A4: audit a live sandbox from the host: its own namespaces, an unprivileged uid range,
/// `NoNewPrivs`, seccomp filtering and no effective capabilities for user code.
#[test]
fn a4_host_side_audit_of_live_sandbox() {
    need_root!();
    let id = unique_id();
    let probe = HostProbe::before(&id);
    let mut child = moat()
        .args([
            "run",
            "--id",
            &id,
            "--root",
            "--",
            "sh",
            "-c",
            "echo ready; sleep 30",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn moat");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut stdout, &mut buf).expect("ready");
    // "ready" comes before the shell has forked and exec'd `sleep`: wait for it to exist.
    let is_sleep = |pid: &i32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut pids = host::pids_in_sandbox(&id);
    while !pids.iter().any(is_sleep) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        pids = host::pids_in_sandbox(&id);
    }
    assert!(
        pids.len() >= 2,
        "expected agent and user processes, got {pids:?}"
    );
    let host_ns = std::fs::read_link("/proc/self/ns/user").expect("ns");
    let mut saw_user_code = false;
    for pid in &pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
        };
        let uid: u64 = field("Uid:").and_then(|v| v.parse().ok()).unwrap_or(0);
        assert!(uid >= 1_000_000_000, "pid {pid} runs as host uid {uid}");
        for ns in ["user", "mnt", "pid", "net", "ipc", "uts"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("ns");
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns");
            assert_ne!(theirs, ours, "pid {pid} shares the host {ns} namespace");
        }
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/user")).ok(),
            Some(host_ns.clone())
        );
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "sleep" {
            saw_user_code = true;
            assert_eq!(
                field("NoNewPrivs:").as_deref(),
                Some("1"),
                "sleep without no_new_privs"
            );
            assert_eq!(
                field("Seccomp:").as_deref(),
                Some("2"),
                "sleep without seccomp"
            );
            assert_eq!(
                field("CapEff:").as_deref(),
                Some("0000000000000000"),
                "sleep has capabilities"
            );
            assert_eq!(
                field("CapBnd:").as_deref(),
                Some("0000000000000000"),
                "sleep has a bounding set"
            );
        }
    }
    assert!(saw_user_code, "no user process found among {pids:?}");
    // SAFETY: SIGINT to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130));
    probe.assert_clean_after();
}

/// A6: hostile identifiers and paths are refused before any namespace or mount work.
#[test]
fn a6_hostile_ids_refused() {
    need_root!();
    for id in ["../x", "a/b", "UPPER", "", &"a".repeat(65)] {
        let out = moat()
            .args(["run", "--id", id, "--", "true"])
            .output()
            .expect("run moat");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "id {id:?} accepted: {err}");
        assert!(err.contains(&format!("invalid sandbox id {id:?}")), "{err}");
        // Refused before any work: no cgroup of that name anywhere.
        if !id.contains(['/', '.']) && !id.is_empty() {
            assert!(host::cgroup_dirs(id).is_empty(), "cgroups made for {id:?}");
        }
    }
    let id = unique_id();
    let probe = HostProbe::before(&id);
    let out = moat()
        .args(["run", "--id", &id, "--rootfs", "/etc/passwd", "--", "true"])
        .output()
        .expect("run moat");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("--rootfs /etc/passwd: not a directory"),
        "{err}"
    );
    probe.assert_clean_after();
}

/// A8: host daemons through abstract unix sockets and host loopback ports.
#[test]
fn a8_no_path_to_host_sockets() {
    need_root!();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let script = format!(
        "import socket\n\
         try:\n  socket.create_connection(('127.0.0.1', {port}), timeout=2); print('tcp: CONNECTED')\n\
         except OSError: print('tcp: refused')\n\
         s = socket.socket(socket.AF_UNIX)\n\
         try:\n  s.connect('\\0moat-test-abstract'); print('abstract: CONNECTED')\n\
         except OSError: print('abstract: refused')\n"
    );
    use std::os::linux::net::SocketAddrExt;
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(b"moat-test-abstract").expect("addr");
    let abs = std::os::unix::net::UnixListener::bind_addr(&addr).expect("abstract listener");
    let out = run_clean(&["--", "python3", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tcp: refused") && text.contains("abstract: refused"),
        "{text}"
    );
    drop(abs);
}

/// B2: host-global kernel knobs (core_pattern, sysrq, uevent_helper, drop_caches, cgroup v1
/// `release_agent` CVE-2022-0492) as root inside.
#[test]
fn b2_host_knobs_not_writable() {
    need_root!();
    let core_before =
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").expect("core_pattern");
    let (code, out, err) = run_corpus(&["--root"], "b2_host_knobs.sh", "sh");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.contains("WRITTEN") && !out.contains("MOUNTED"),
        "{out}"
    );
    assert!(out.contains("sys: absent"), "{out}");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").expect("core_pattern"),
        core_before
    );
}

/// B3: user code (as root) kills or stops the agent, reads its memory: the agent survives.
#[test]
fn b3_agent_survives_user_code() {
    need_root!();
    let (code, out, err) = run_corpus(&["--root"], "b3_kill_agent.py", "python3");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("still here") && out.contains("agent memory: denied"),
        "{out}"
    );
    // kill -9 -1 as root kills every other process of the sandbox, but not the agent.
    let script = "sleep 100 & kill -9 -1; wait; echo survived";
    let out = run_clean(&["--root", "--", "sh", "-c", script]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "survived");
}

/// D1: fork bomb: contained by the pids limit; the host keeps spawning processes meanwhile.
#[test]
fn d1_fork_bomb_contained() {
    need_root!();
    let id = unique_id();
    let probe = HostProbe::before(&id);
    let mut child = moat()
        .args([
            "run",
            "--id",
            &id,
            "--pids",
            "64",
            "--timeout",
            "3s",
            "--copy",
        ])
        .arg(format!("{}:/tmp/bomb.sh", corpus("d1_fork_bomb.sh")))
        .args(["--", "sh", "/tmp/bomb.sh"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // The bomb meets its limit: the kernel counts the forks it refused (`max` in the pids
    // cgroup's `pids.events`, of the sandbox or its user processes' child).
    let refused = || -> u64 {
        host::cgroup_dirs(&id)
            .iter()
            .flat_map(|d| [d.join("pids.events"), d.join("user/pids.events")])
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .filter_map(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("max "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .sum()
    };
    // Watched for as long as the run lives (its `--timeout` ends it), not for a fixed time: on a
    // loaded host the sandbox may take a while to start, and the bomb with it.
    while refused() == 0 {
        let ended = child.try_wait().expect("try_wait");
        assert!(
            ended.is_none() || refused() > 0,
            "the bomb never met the pids limit (the run ended: {ended:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // 64 for the user processes, and the agent beside them (in its own reserve).
    let pids = host::pids_in_sandbox(&id);
    assert!(pids.len() <= 64 + 1, "pids limit exceeded: {}", pids.len());
    assert!(
        Command::new("true")
            .status()
            .expect("host can still spawn")
            .success()
    );
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(124));
    probe.assert_clean_after();
}

/// D2: memory exhaustion: the OOM stays inside the sandbox and is reported (exit 137, reason).
#[test]
fn d2_oom_reported() {
    need_root!();
    let out = run_clean(&[
        "--memory",
        "64M",
        "--",
        "python3",
        "-c",
        "b=bytearray(10**9)",
    ]);
    assert_eq!(out.status.code(), Some(137));
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of memory"));
}

/// D3: disk and inode exhaustion hit the sandbox's own quota (ENOSPC), not the host's disk.
#[test]
fn d3_disk_quota() {
    need_root!();
    let (code, out, err) = run_corpus(
        &["--disk", "16M", "--memory", "256M", "--timeout", "60s"],
        "d3_fill_disk.sh",
        "sh",
    );
    assert_eq!(code, 0, "{out}{err}");
    // The writable layer and /dev/shm each stop at their size with ENOSPC.
    assert!(
        out.contains("tmp fill: exit 1 No space left on device"),
        "{out}"
    );
    assert!(number_after(&out, "tmp filled MiB: ") <= 16, "{out}");
    assert!(
        out.contains("shm fill: exit 1 No space left on device"),
        "{out}"
    );
    // Empty files take no space: the inode cap (16M / 4 KiB = 4,096) stops them.
    let files = number_after(&out, "files created: ");
    assert!(
        (3_500..=4_096).contains(&files),
        "inode cap not what it should be: {out}"
    );
    assert!(
        out.contains("one more file: No space left on device"),
        "{out}"
    );
    // A petabyte sparse file is over RLIMIT_FSIZE (4 GiB).
    assert!(out.contains("sparse: refused"), "{out}");
}

/// D4: output flood: moat's own memory stays bounded while a command writes 200 MB.
#[test]
fn d4_output_flood_bounded() {
    need_root!();
    let id = unique_id();
    let probe = HostProbe::before(&id);
    let mut child = moat()
        .args([
            "run",
            "--id",
            &id,
            "--",
            "sh",
            "-c",
            "yes | head -c 200000000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut stdout, &mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let (status, maxrss_kib) = host::wait_with_rusage(&mut child);
    assert_eq!(status, 0);
    assert_eq!(total, 200_000_000);
    assert!(
        maxrss_kib < 200 * 1024,
        "moat run used {maxrss_kib} KiB for a 200 MB flood"
    );
    probe.assert_clean_after();
}

/// D7: processes that try to outlive the sandbox (setsid, double fork, nohup, ignoring
/// SIGTERM/SIGHUP) die with it.
#[test]
fn d7_nothing_escapes_the_kill() {
    need_root!();
    let (code, out, err) = run_corpus(&[], "d7_escape_kill.sh", "sh");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("planted"));
}

/// E1-E3: network with the default policy (none): public hosts, metadata service encodings,
/// private ranges, IPv6, DNS. Only loopback exists.
#[test]
fn e1_network_blocked() {
    need_root!();
    let (code, out, err) = run_corpus(&[], "e1_network.py", "python3");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("summary: contained"), "{out}");
    assert!(out.contains("interfaces: ['lo']"), "{out}");
}

/// E1-E2 with the internet open: the metadata service (in several encodings), private,
/// shared and link-local ranges, and the host's own addresses stay closed; nothing else is
/// tried, so no test traffic leaves the machine.
#[test]
fn e2_internet_policy_keeps_special_ranges_closed() {
    need_root!();
    let host_addrs: Vec<String> = Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.split('/').next())
        // Link-local IPv6 needs a scope: covered by the fe80::/10 rule in the engine's tests.
        .filter(|a| !a.starts_with("fe80"))
        .map(str::to_owned)
        .collect();
    assert!(!host_addrs.is_empty());
    let env = format!("HOST_ADDRS={}", host_addrs.join(","));
    let (code, out, err) = run_corpus(
        &["--net", "internet", "-e", &env],
        "e2_network_internet.py",
        "python3",
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("summary: contained"), "{out}");
    assert!(
        out.contains("169.254.169.254: refused (ConnectionResetError)"),
        "{out}"
    );
}

/// Ctrl-C and SIGKILL of `moat run` leave no process, cgroup or mount behind.
#[test]
fn killing_moat_run_leaves_nothing() {
    need_root!();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGKILL] {
        let id = unique_id();
        let probe = HostProbe::before(&id);
        let mut child = moat()
            .args([
                "run",
                "--id",
                &id,
                "--",
                "sh",
                "-c",
                "echo ready; sleep 100",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut buf = [0u8; 6];
        std::io::Read::read_exact(&mut stdout, &mut buf).expect("ready");
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let _ = child.wait();
        // After SIGKILL the guardian cleans up asynchronously; give it a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !host::pids_in_sandbox(&id).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        probe.assert_clean_after();
    }
}

/// The number after `prefix` on a line of `out`.
fn number_after(out: &str, prefix: &str) -> i64 {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in {out}"))
}

/// I1: loopback TCP pairs whose receivers never read. The kernel's socket memory (`tcp_mem`) is
/// one pool for the whole host; a sandbox's share must be bounded by its own limits (cgroup v1:
/// a quarter of its memory limit, v2: within the limit itself), not by the host's.
#[test]
fn i1_socket_buffers_bounded() {
    need_root!();
    let (code, out, err) = run_corpus(
        &["--memory", "64M", "--timeout", "120s"],
        "i1_socket_buffers.py",
        "python3",
    );
    assert_eq!(code, 0, "{out}{err}");
    let queued = number_after(&out, "queued MiB ");
    assert!(
        queued <= 64,
        "a 64M sandbox queued {queued} MiB in socket buffers: {out}"
    );
}

/// I2: one sandbox may not ask for the host's pids, and all sandboxes together stay below the
/// host's task limit with room for the host and the server.
#[test]
fn i2_host_pids_capped() {
    need_root!();
    let out = run_clean(&["--pids", "65536", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pids 65536 is out of range"), "{err}");
    // The cap is set by the backend, which this run started.
    let out = run_clean(&["--", "true"]);
    assert_eq!(out.status.code(), Some(0));
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("pid_max number");
    let layout = moat_jail::cgroup::Layout::detect().expect("cgroup layout");
    let caps: Vec<String> = layout
        .bases()
        .iter()
        .filter_map(|b| std::fs::read_to_string(b.join("pids.max")).ok())
        .collect();
    assert!(!caps.is_empty(), "no pids.max above the sandboxes");
    for cap in caps {
        let cap: u64 = cap
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("sandboxes' total pids are not capped: {cap:?}"));
        assert!(
            cap + 4096 <= pid_max,
            "cap {cap} leaves the host too little of {pid_max}"
        );
    }
}

/// I3: pseudo-terminals come from one host-wide pool; a sandbox gets a bounded share.
#[test]
fn i3_ptys_bounded() {
    need_root!();
    let (code, out, err) = run_corpus(&[], "i3_ptys.py", "python3");
    assert_eq!(code, 0, "{out}{err}");
    let ptys = number_after(&out, "ptys ");
    assert!(ptys <= 64, "one sandbox opened {ptys} terminals: {out}");
    assert!(!out.contains("refused None"), "{out}");
    // Another sandbox still gets one.
    let out = run_clean(&[
        "--",
        "python3",
        "-c",
        "import os; os.openpty(); print('ok')",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// I3: kernel AIO contexts come from one host-wide pool (`fs.aio-max-nr`); user code gets
/// `ENOSYS`, so nothing is taken from it.
#[test]
fn i3_aio_denied() {
    need_root!();
    for user in [&[][..], &["--root"][..]] {
        let (code, out, err) = run_corpus(user, "i3_aio.py", "python3");
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("io_setup -1 ENOSYS"), "{out}");
        assert!(out.contains("aio-nr grew 0"), "{out}");
    }
}

/// I4: filling the writable layer (a tmpfs, so memory) past the memory limit is an OOM kill of
/// the writer, reported as such, and the agent survives to report it; past the disk limit it is
/// `ENOSPC`.
#[test]
fn i4_full_layer_is_reported_and_the_agent_survives() {
    need_root!();
    let out = run_clean(&[
        "--memory",
        "64M",
        "--",
        "sh",
        "-c",
        "head -c 100M /dev/zero > /tmp/f",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(137), "{err}");
    assert!(err.contains("out of memory"), "{err}");
    let out = run_clean(&[
        "--memory",
        "256M",
        "--disk",
        "16M",
        "--",
        "sh",
        "-c",
        "head -c 32M /dev/zero > /tmp/f",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
}

/// I3: shared read-only host files. A sandbox's exclusive `flock` on `/usr/bin/env` must not
/// block the host (or another sandbox), and its inotify watch on `/usr/bin` must not see the
/// host opening and reading files there.
#[test]
fn i3_shared_files_isolated() {
    use std::io::{BufRead, BufReader};
    need_root!();
    let id = unique_id();
    let probe = HostProbe::before(&id);
    let copy = format!("{}:/tmp/p.py", corpus("i3_shared_files.py"));
    let mut child = moat()
        .args([
            "run",
            "--id",
            &id,
            "--copy",
            &copy,
            "--",
            "python3",
            "/tmp/p.py",
            "3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run moat");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
    assert_eq!(first, "ready");
    // The sandbox holds its lock now: the host takes the same lock at once.
    let env = std::fs::File::open("/usr/bin/env").expect("open /usr/bin/env");
    // SAFETY: flock on a descriptor we own.
    let locked = unsafe { libc::flock(env.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(locked, 0, "the sandbox's lock blocks the host");
    // Host activity in the watched directory.
    for _ in 0..20 {
        let _ = std::fs::read("/usr/bin/env");
    }
    drop(env);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{rest:?}");
    assert!(
        rest.iter().any(|l| l == "event bytes 0"),
        "the sandbox saw the host's activity: {rest:?}"
    );
    probe.assert_clean_after();
}

/// The same corpus on the gvisor backend: where gVisor's sentry stands between the sandbox and
/// the host kernel, the expectations are the same, and where the sentry answers differently
/// (a fork bomb, a disk or socket buffers filling the sentry's memory end the whole sandbox
/// rather than one process) the host is still untouched and the end is reported. Needs runsc.
mod on_gvisor {
    use super::*;

    /// `opts` on the gvisor backend.
    fn gvisor<'a>(opts: &[&'a str]) -> Vec<&'a str> {
        assert!(
            moat_jail::probe::runsc_path().is_some(),
            "runsc is not installed: scripts/test-deps.sh installs it"
        );
        let mut v = vec!["--backend", "gvisor"];
        v.extend_from_slice(opts);
        v
    }

    #[test]
    fn a3_agent_binary_not_writable() {
        need_root!();
        for user in [&[][..], &["--root"][..]] {
            let (code, out, err) = run_corpus(&gvisor(user), "a3_overwrite_agent.py", "python3");
            assert_eq!(code, 0, "{out}{err}");
            assert!(out.contains("summary: contained"), "{out}");
            assert!(out.contains("/proc/1/exe: EACCES"), "{out}");
        }
    }

    #[test]
    fn a5_b1_privileged_syscalls_denied() {
        need_root!();
        for user in [&[][..], &["--root"][..]] {
            let (code, out, err) =
                run_corpus(&gvisor(user), "a5_b1_privileged_syscalls.py", "python3");
            assert_eq!(code, 0, "{out}{err}");
            assert!(out.contains("summary: contained"), "{out}");
        }
    }

    #[test]
    fn b2_host_knobs_not_writable() {
        need_root!();
        let (code, out, err) = run_corpus(&gvisor(&["--root"]), "b2_host_knobs.sh", "sh");
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            !out.contains("WRITTEN") && !out.contains("MOUNTED"),
            "{out}"
        );
        assert!(out.contains("drop_caches: denied"), "{out}");
    }

    /// As the sandbox's user the agent survives; as the sandbox's root, unlike under Linux,
    /// killing PID 1 ends the sandbox (gVisor's sentry of 2022 does not shield an init from
    /// its own namespace's signals): the sandbox's owner can end their own sandbox, nothing
    /// beyond it.
    #[test]
    fn b3_agent_survives_user_code() {
        need_root!();
        let (code, out, err) = run_corpus(&gvisor(&[]), "b3_kill_agent.py", "python3");
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("still here") && out.contains("agent memory: denied"),
            "{out}"
        );
        let (code, out, err) = run_corpus(&gvisor(&["--root"]), "b3_kill_agent.py", "python3");
        assert!(
            code == 0 || err.contains("exited unexpectedly"),
            "{code}: {out}{err}"
        );
    }

    #[test]
    fn e1_network_blocked() {
        need_root!();
        let (code, out, err) = run_corpus(&gvisor(&[]), "e1_network.py", "python3");
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("summary: contained"), "{out}");
        assert!(out.contains("interfaces: ['lo']"), "{out}");
    }

    /// A fork bomb exhausts the tasks the sentry may have: the sandbox ends, the host is
    /// untouched (`run_clean` checks nothing of it is left).
    #[test]
    fn d1_fork_bomb_ends_the_sandbox_only() {
        need_root!();
        let (code, out, err) = run_corpus(&gvisor(&["--timeout", "60s"]), "d1_fork_bomb.sh", "sh");
        assert_ne!(code, 0, "{out}{err}");
        assert!(
            err.contains("exited unexpectedly") || err.contains("ran out of memory") || code == 124,
            "{out}{err}"
        );
        // The host still makes processes.
        let st = Command::new("/bin/true")
            .status()
            .expect("spawn on the host");
        assert!(st.success());
    }

    /// Filling the writable layer fills the sentry's memory: the sandbox ends, reported as out
    /// of memory.
    #[test]
    fn d3_full_disk_is_out_of_memory() {
        need_root!();
        let (code, out, err) = run_corpus(
            &gvisor(&["--memory", "128M", "--timeout", "60s"]),
            "d3_fill_disk.sh",
            "sh",
        );
        assert_eq!(code, 137, "{out}{err}");
        assert!(err.contains("ran out of memory"), "{out}{err}");
    }
}
