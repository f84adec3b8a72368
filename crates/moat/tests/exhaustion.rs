//! D8 and I3 of the threat checklist in a real sandbox: exhausting the agent from inside and
//! through its API, and a kernel count that sandboxes could share. File descriptors, argv and
//! the environment at `ARG_MAX`, and a storm of concurrent starts each end in a clean error; the
//! agent keeps answering, and every process it started is reaped. One sandbox holding every
//! inotify instance it may have leaves another sandbox and the host theirs. Needs root; skips
//! with a printed reason otherwise.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use moat_engine::agent_client::AgentClient;
use moat_proto::connect::Code;
use moat_proto::process::process_event::{Event, data_event};
use moat_proto::process::process_selector::Selector;

use moat_test_support as support;
use support::{Sandbox, as_user, drain, request, sandbox, sh};

/// Backstop against hangs; nothing here should come near it.
const HANG: Duration = Duration::from_secs(120);

/// The agent answers and can still run a process.
async fn assert_agent_works(client: &AgentClient, after: &str) {
    client
        .health()
        .await
        .unwrap_or_else(|e| panic!("health after {after}: {e}"));
    assert_eq!(
        sh(client, "user", "echo alive").await,
        ("alive\n".to_string(), 0),
        "a process after {after}"
    );
}

/// The host pids of the agent's children, from every thread's `children` list.
fn agent_children(agent: i32) -> Vec<(u32, char)> {
    let mut kids = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{agent}/task")) else {
        return kids;
    };
    for task in tasks.flatten() {
        let Ok(list) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for pid in list
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            // The state follows the parenthesised command name in `stat`.
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, r)| r.trim().chars().next())
                })
                .unwrap_or('?');
            kids.push((pid, state));
        }
    }
    kids
}

/// Waits until the agent lists no process and has no child left, zombie or not.
async fn assert_all_reaped(sb: &Sandbox) {
    let agent = sb.inst.host_pid().expect("agent host pid");
    let mut last = (Vec::new(), Vec::new());
    for _ in 0..200 {
        let listed: Vec<u32> = sb
            .client
            .list()
            .await
            .expect("list")
            .iter()
            .map(|p| p.pid)
            .collect();
        let kids = agent_children(agent);
        if listed.is_empty() && kids.is_empty() {
            return;
        }
        last = (listed, kids);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "processes left after 20 s: listed {:?}, children of the agent (pid, state) {:?}",
        last.0, last.1
    );
}

/// The first line a running hog prints on its standard output (it must not end first).
async fn first_line(stream: &mut moat_engine::agent_client::ProcessStream) -> String {
    tokio::time::timeout(HANG, async {
        let mut out = Vec::new();
        while !out.ends_with(b"\n") {
            match stream.next().await {
                Some(Ok(ev)) => match ev.event {
                    Some(Event::Data(d)) => {
                        if let Some(data_event::Output::Stdout(b)) = d.output {
                            out.extend(b);
                        }
                    }
                    Some(Event::End(e)) => panic!("the hog ended early: {e:?}"),
                    _ => {}
                },
                other => panic!("hog stream: {other:?}"),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("the hog never reported")
}

/// Opening files until `EMFILE` fails cleanly in the process; the agent, whose descriptors are
/// its own, goes on serving processes and files while the hog holds every descriptor it got.
#[tokio::test(flavor = "current_thread")]
async fn d8_fd_exhaustion() {
    let Some(mut sb) = sandbox("d8fd").await else {
        return;
    };
    let c = sb.client.clone();
    const HOG: &str = r#"
import errno, os, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
except (ValueError, OSError):
    pass
fds = []
try:
    while True:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno), len(fds), flush=True)
time.sleep(600)
"#;
    c.write_file("/tmp/hog.py", Bytes::from_static(HOG.as_bytes()), None)
        .await
        .expect("hog");
    let mut hogs = Vec::new();
    for user in ["user", "root"] {
        let mut stream = c
            .start(
                request("/usr/bin/python3", vec!["/tmp/hog.py".into()]),
                as_user(user),
            )
            .await
            .expect("hog start");
        let line = first_line(&mut stream).await;
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("EMFILE"), "{user}: {line}");
        let n: usize = words.next().and_then(|n| n.parse().ok()).expect("count");
        assert!(n >= 1000, "{user} hit EMFILE after only {n} files");
        hogs.push(stream.pid());
        assert_agent_works(&c, &format!("{user}'s fd exhaustion")).await;
        c.write_file("/tmp/still", Bytes::from_static(b"ok"), Some("user"))
            .await
            .expect("write while fds are exhausted");
        assert_eq!(
            c.read_file("/tmp/still", Some("user"), 64)
                .await
                .expect("read"),
            Bytes::from_static(b"ok")
        );
    }
    // The check `assert_all_reaped` relies on sees the live hogs as the agent's children.
    let agent = sb.inst.host_pid().expect("agent host pid");
    assert_eq!(
        agent_children(agent).len(),
        hogs.len(),
        "the hogs as children"
    );
    for pid in hogs {
        c.send_signal(Selector::Pid(pid), 9)
            .await
            .expect("kill hog");
    }
    assert_all_reaped(&sb).await;
    sb.inst.destroy().await.expect("destroy");
}

/// I3: a sandbox that opens every inotify instance it may have takes none of another
/// sandbox's or the host's. The kernel counts a user namespace's instances against its owner
/// too, up to the host: owned by root, all sandboxes and the host's own root services shared
/// 128.
#[tokio::test(flavor = "current_thread")]
async fn i3_inotify_instances_are_counted_per_sandbox() {
    let Some(mut hog) = sandbox("i3hog").await else {
        return;
    };
    let Some(mut other) = sandbox("i3other").await else {
        return;
    };
    const HOG: &str = r#"
import ctypes, errno, time
libc = ctypes.CDLL(None, use_errno=True)
n = 0
while n < 100000:
    if libc.inotify_init1(0) < 0:
        break
    n += 1
print(errno.errorcode.get(ctypes.get_errno(), "?"), n, flush=True)
time.sleep(600)
"#;
    let c = hog.client.clone();
    c.write_file("/tmp/hog.py", Bytes::from_static(HOG.as_bytes()), None)
        .await
        .expect("hog");
    let mut stream = c
        .start(
            request("/usr/bin/python3", vec!["/tmp/hog.py".into()]),
            as_user("user"),
        )
        .await
        .expect("hog start");
    let line = first_line(&mut stream).await;
    // It reached a limit of its own (`EMFILE`: the per-user count of instances).
    assert!(line.starts_with("EMFILE "), "{line}");

    // While it holds them: another sandbox, and the host's root, can still make one.
    let probe = "import ctypes; print(ctypes.CDLL(None).inotify_init1(0) >= 0)";
    assert_eq!(
        sh(&other.client, "user", &format!("python3 -c '{probe}'")).await,
        ("True\n".to_string(), 0),
        "another sandbox got no inotify instance while one sandbox held {line}"
    );
    // SAFETY: inotify_init1 with a flag; the descriptor is closed at once.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    let err = std::io::Error::last_os_error();
    if fd >= 0 {
        // SAFETY: closing the descriptor just made.
        unsafe { libc::close(fd) };
    }
    assert!(fd >= 0, "the host's root got no inotify instance: {err}");

    c.send_signal(Selector::Pid(stream.pid()), 9)
        .await
        .expect("kill hog");
    hog.inst.destroy().await.expect("destroy");
    other.inst.destroy().await.expect("destroy");
}

/// argv and the environment at and beyond `ARG_MAX`, and a request beyond the agent's message
/// cap: each a clean error, and the agent carries on.
#[tokio::test(flavor = "current_thread")]
async fn d8_argv_at_arg_max() {
    let Some(mut sb) = sandbox("d8argv").await else {
        return;
    };
    let c = sb.client.clone();
    // SAFETY: sysconf has no preconditions.
    let arg_max = usize::try_from(unsafe { libc::sysconf(libc::_SC_ARG_MAX) }).expect("ARG_MAX");
    let kib = "a".repeat(1023);

    // Half of ARG_MAX fits.
    let args: Vec<String> = std::iter::once("-c".to_string())
        .chain(std::iter::once("echo $#".to_string()))
        .chain(std::iter::once("sh".to_string()))
        .chain(std::iter::repeat_n(kib.clone(), arg_max / 2 / 1024))
        .collect();
    let stream = tokio::time::timeout(HANG, c.start(request("/bin/sh", args), as_user("user")))
        .await
        .expect("hang")
        .expect("half of ARG_MAX");
    let (out, end) = drain(stream).await.expect("stream");
    assert_eq!(
        (out.trim(), end.exit_code),
        ((arg_max / 2 / 1024).to_string().as_str(), 0)
    );

    let too_many_args: Vec<String> =
        std::iter::repeat_n(kib.clone(), arg_max / 1024 + 64).collect();
    let one_huge_arg = vec!["a".repeat(256 << 10)];
    let mut huge_env = request("/bin/true", Vec::new());
    if let Some(p) = huge_env.process.as_mut() {
        p.envs = (0..arg_max / 1024 + 64)
            .map(|i| (format!("V{i}"), kib.clone()))
            .collect();
    }
    let cases = [
        ("argv past ARG_MAX", request("/bin/true", too_many_args)),
        (
            "one argument past MAX_ARG_STRLEN",
            request("/bin/true", one_huge_arg),
        ),
        ("environment past ARG_MAX", huge_env),
    ];
    for (what, req) in cases {
        let r = tokio::time::timeout(HANG, c.start(req, as_user("user")))
            .await
            .unwrap_or_else(|_| panic!("{what}: hang"));
        let e = r.err().unwrap_or_else(|| panic!("{what}: started"));
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e}");
        assert!(e.to_string().contains("too long"), "{what}: {e}");
        assert_agent_works(&c, what).await;
    }

    // Beyond the agent's 16 MiB request cap: refused before any fork.
    let huge = request(
        "/bin/true",
        std::iter::repeat_n("b".repeat(1 << 20), 20).collect(),
    );
    let e = tokio::time::timeout(HANG, c.start(huge, as_user("user")))
        .await
        .expect("hang")
        .expect_err("a 20 MiB request started");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert_agent_works(&c, "a 20 MiB request").await;
    assert_all_reaped(&sb).await;
    sb.inst.destroy().await.expect("destroy");
}

/// 500 concurrent starts on one agent (which allows 256 concurrent streams, and the sandbox 256
/// pids): each succeeds or fails with a clear error, the agent survives, and every process is
/// reaped.
#[tokio::test(flavor = "current_thread")]
async fn d8_concurrent_start_storm() {
    let Some(mut sb) = sandbox("d8storm").await else {
        return;
    };
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let c = sb.client.clone();
        calls.spawn(async move {
            let stream = c
                .start(request("/bin/true", Vec::new()), as_user("user"))
                .await?;
            drain(stream).await
        });
    }
    let mut ok = 0;
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    tokio::time::timeout(HANG, async {
        while let Some(r) = calls.join_next().await {
            match r.expect("task") {
                Ok((_, end)) => {
                    assert_eq!((end.exit_code, end.exited), (0, true), "{end:?}");
                    ok += 1;
                }
                Err(e) => {
                    let code = e.code();
                    assert!(
                        matches!(code, Code::ResourceExhausted | Code::Unavailable),
                        "an unclear failure: {e}"
                    );
                    *failures.entry(code.as_str().to_string()).or_default() += 1;
                }
            }
        }
    })
    .await
    .expect("the storm hung");
    eprintln!("{ok} started and exited, failures by code: {failures:?}");
    assert!(ok > 0, "nothing started");
    assert_agent_works(&sb.client, "the storm").await;
    assert_all_reaped(&sb).await;
    sb.inst.destroy().await.expect("destroy");
}
