//! Starts real sandboxes with a shell script as their first process and checks, from inside and
//! from the host, what the jail promises. Needs root; skips with a printed reason otherwise.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use moat_jail::cgroup::{Layout, Limits, SandboxCgroup};
use moat_jail::idmap::IdRange;
use moat_jail::memfd::SealedBinary;
use moat_jail::rootfs::{FsLimits, Rootfs};
use moat_jail::runtime::RuntimeDir;
use moat_jail::spawn::{SandboxProcess, SpawnConfig};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn runtime() -> RuntimeDir {
    let dir = PathBuf::from(format!(
        "/run/moat-test-jail-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    RuntimeDir::open(&dir).expect("runtime dir")
}

/// Runs `script` under `/bin/sh` as the sandbox's PID 1 and returns what it wrote to fd 3 and
/// the exit status, after checking that its cgroups are gone.
fn run_script(rootfs: &Rootfs, script: &str) -> (String, i32) {
    let rt = runtime();
    let layout = Layout::detect().expect("cgroups");
    let id = format!("jailtest{}x{}", std::process::id(), rand_suffix());
    let limits = Limits {
        memory_bytes: 256 << 20,
        cpu_millis: 1000,
        pids: 128,
    };
    let cg = SandboxCgroup::create(&layout, &id, &limits).expect("cgroup");
    let ids = IdRange::claim(&rt.slots()).expect("id range");
    let sh = SealedBinary::copy_of(Path::new("/bin/sh")).expect("memfd");
    let cfg = SpawnConfig {
        id: &id,
        runtime: &rt,
        rootfs,
        fs_limits: FsLimits {
            disk_bytes: 64 << 20,
            inodes: 10_000,
            shm_bytes: 8 << 20,
        },
        cgroup: &cg,
        ids: &ids,
        agent: &sh,
        agent_args: vec!["sh".into(), "-c".into(), script.into()],
        agent_env: vec!["PATH=/usr/bin:/bin:/usr/sbin:/sbin".into()],
        hostname: "moat",
        listener: None,
    };
    let mut proc_ = SandboxProcess::spawn(&cfg).expect("spawn");
    let chan = proc_.take_channel().expect("channel");
    let mut stream = UnixStream::from(chan);
    let mut out = String::new();
    stream.read_to_string(&mut out).expect("read channel");
    let status = proc_.wait().expect("wait");
    cg.kill_all();
    cg.remove().expect("cgroup removal");
    for d in cg.dirs() {
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
    drop(ids);
    std::fs::remove_dir_all(rt.root()).expect("remove runtime dir");
    (out, status)
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

#[test]
fn host_template_isolates() {
    if !is_root() {
        eprintln!("SKIP: needs root");
        return;
    }
    let script = r#"
        exec 2>&3
        echo "uid=$(id -u) pid=$$ host=$(hostname)" >&3
        ls /proc/self/fd | tr '\n' ' ' >&3; echo >&3
        cat /etc/shadow >/dev/null 2>&1 && echo "shadow=readable" >&3 || echo "shadow=denied" >&3
        touch /usr/moat-probe 2>/dev/null && echo "usr=writable" >&3 || echo "usr=readonly" >&3
        echo x > /tmp/f && echo "tmp=writable" >&3
        echo "user=$(grep ^user: /etc/passwd | cut -d: -f3)" >&3
        ls /sys >/dev/null 2>&1 && echo "sys=visible" >&3 || echo "sys=absent" >&3
        echo "net=$(ls /proc/net/dev >/dev/null && grep -c : /proc/net/dev)" >&3
        echo 1 > /proc/sys/kernel/core_pattern 2>/dev/null && echo "core=writable" >&3 || echo "core=denied" >&3
    "#;
    let (out, status) = run_script(&Rootfs::Host, script);
    assert_eq!(status, 0, "script failed: {out}");
    assert!(out.contains("uid=0 pid=1 host=moat"), "{out}");
    assert!(out.contains("shadow=denied"), "{out}");
    assert!(out.contains("usr=readonly"), "{out}");
    assert!(out.contains("tmp=writable"), "{out}");
    assert!(out.contains("user=1000"), "{out}");
    assert!(out.contains("sys=absent"), "{out}");
    assert!(out.contains("net=1"), "only loopback expected: {out}");
    assert!(out.contains("core=denied"), "{out}");
}

/// A minimal root filesystem: `dash` as `/bin/sh` and the libraries it links.
fn tiny_rootfs() -> PathBuf {
    let root = PathBuf::from(format!("/tmp/moat-jail-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::copy("/usr/bin/dash", root.join("bin/sh")).expect("copy dash");
    let ldd = std::process::Command::new("ldd")
        .arg("/usr/bin/dash")
        .output()
        .expect("ldd");
    for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
        if word.starts_with('/') {
            let src = Path::new(word);
            let dst = root.join(word.trim_start_matches('/'));
            std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir lib");
            std::fs::copy(src, &dst).expect("copy lib");
        }
    }
    root
}

#[test]
fn directory_template_uses_overlay() {
    if !is_root() {
        eprintln!("SKIP: needs root");
        return;
    }
    let lower = tiny_rootfs();
    let script =
        "echo hi > /tmp/probe && read l < /tmp/probe && echo \"$l\" >&3 && echo x > /newfile";
    let (out, status) = run_script(&Rootfs::Dir(lower.clone()), script);
    assert_eq!(status, 0, "{out}");
    assert_eq!(out.trim(), "hi");
    assert!(
        !lower.join("tmp/probe").exists(),
        "write leaked to the lower layer"
    );
    assert!(
        !lower.join("newfile").exists(),
        "write leaked to the lower layer"
    );
    std::fs::remove_dir_all(&lower).expect("cleanup");
}

#[test]
fn sweep_removes_only_empty_selected_cgroups() {
    if !is_root() {
        eprintln!("SKIP: needs root");
        return;
    }
    let layout = Layout::detect().expect("cgroups");
    let id = format!("sweeptest{}x{}", std::process::id(), rand_suffix());
    let limits = Limits {
        memory_bytes: 64 << 20,
        cpu_millis: 1000,
        pids: 16,
    };
    let cg = SandboxCgroup::create(&layout, &id, &limits).expect("cgroup");
    // Too young: kept.
    assert_eq!(
        layout.sweep(std::time::Duration::from_secs(3600), |n| n == id),
        0
    );
    assert!(cg.dirs().iter().all(|d| d.exists()));
    // Old enough (any age) and selected: removed everywhere.
    let removed = layout.sweep(std::time::Duration::ZERO, |n| n == id);
    assert_eq!(removed, cg.dirs().len());
    assert!(cg.dirs().iter().all(|d| !d.exists()));
}
