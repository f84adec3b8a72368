//! What this host supports, for `moat check` and for choosing what to use.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cgroup::Layout;
use crate::landlock;

/// One finding: a feature, whether it works, and details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Feature name.
    pub name: &'static str,
    /// Whether moat can use it.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

fn finding(name: &'static str, ok: bool, detail: impl Into<String>) -> Finding {
    Finding {
        name,
        ok,
        detail: detail.into(),
    }
}

/// Runs every probe. `runsc` platforms are tried with a time limit each (kvm hangs on some hosts).
pub fn probe_all() -> Vec<Finding> {
    let mut out = Vec::new();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    out.push(finding(
        "root",
        root,
        if root {
            "running as root"
        } else {
            "not root: the native backend needs root (uid ranges, cgroups)"
        },
    ));
    out.push(user_namespaces());
    out.push(match Layout::detect() {
        Ok(l) => finding(
            "cgroups",
            true,
            format!(
                "{}{}",
                l.describe(),
                if l.favors_dynamic_changes() {
                    "; favordynmods on"
                } else {
                    "; favordynmods off (moat turns it on to join cgroups fast)"
                }
            ),
        ),
        Err(e) => finding("cgroups", false, e.to_string()),
    });
    let seccomp = fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Seccomp:")))
        .unwrap_or(false);
    out.push(finding(
        "seccomp",
        seccomp,
        if seccomp {
            "seccomp-bpf filters"
        } else {
            "not available"
        },
    ));
    let abi = landlock::abi_version();
    out.push(finding(
        "landlock",
        abi > 0,
        if abi > 0 {
            format!("ABI {abi}")
        } else {
            "not available (skipped)".into()
        },
    ));
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let overlay = filesystems
        .lines()
        .any(|l| l.trim_end().ends_with("overlay"));
    out.push(finding(
        "overlayfs",
        overlay,
        if overlay {
            "available (directory templates; per-sandbox overlays of the host's system directories)"
        } else {
            "missing: directory templates will not work, and the host template binds the host's \
             system directories, so locks and inotify watches on them cross sandboxes"
        },
    ));
    out.push(match crate::egress::probe() {
        Ok(()) => finding(
            "network egress",
            true,
            "nftables tproxy and local routes in a sandbox's namespace (network policies)",
        ),
        Err(e) => finding(
            "network egress",
            false,
            format!(
                "{e}: sandboxes cannot have network policies (needs nf_tables with \
                 NFT_TPROXY in the kernel)"
            ),
        ),
    });
    out.push(oom_score());
    out.push(runsc());
    out.push(kvm());
    out.push(tool("bwrap", &["--version"]));
    out.push(criu());
    out
}

/// Whether this process may lower an OOM score (`CAP_SYS_RESOURCE`, which some container and
/// VM hosts withhold from root). moat does not depend on it: the agent is kept out of its
/// sandbox's user memory cgroup instead.
fn oom_score() -> Finding {
    let path = "/proc/self/oom_score_adj";
    let before = fs::read_to_string(path).unwrap_or_default();
    let lowered = before
        .trim()
        .parse::<i32>()
        .is_ok_and(|v| v > -1000 && fs::write(path, (v - 1).to_string()).is_ok());
    if lowered {
        let _ = fs::write(path, before.trim());
    }
    finding(
        "oom_score_adj",
        true,
        if lowered {
            "can be lowered: agents also get -1000"
        } else {
            "cannot be lowered (no CAP_SYS_RESOURCE): agents are protected by their own memory \
             cgroup only, which is enough"
        },
    )
}

fn user_namespaces() -> Finding {
    let max = fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if max == 0 {
        return finding(
            "user namespaces",
            false,
            "disabled (user.max_user_namespaces = 0)",
        );
    }
    // Try one for real, in a short-lived child.
    // SAFETY: the child makes raw system calls only and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: unshare and _exit are async-signal-safe.
        unsafe {
            libc::_exit(if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                0
            } else {
                1
            })
        };
    }
    let mut status = 1;
    // SAFETY: waiting for our own child with a valid status pointer.
    let ok = pid > 0 && unsafe { libc::waitpid(pid, &mut status, 0) } == pid && status == 0;
    finding(
        "user namespaces",
        ok,
        if ok {
            format!("enabled (max {max})")
        } else {
            "creating one failed".into()
        },
    )
}

fn which(bin: &str) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

fn tool(bin: &'static str, args: &[&str]) -> Finding {
    match which(bin) {
        None => finding(bin, false, "not installed"),
        Some(path) => {
            let v = Command::new(&path).args(args).output().ok();
            let text = v
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .unwrap_or_default();
            finding(bin, true, format!("{path} {text}"))
        }
    }
}

/// Runs `cmd` with a deadline; true if it exited 0 in time.
fn runs_within(cmd: &mut Command, limit: Duration) -> bool {
    let Ok(mut child) = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.success(),
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Where `runsc` is on `PATH`, if it is.
pub fn runsc_path() -> Option<String> {
    which("runsc")
}

/// The gVisor platforms, best first, that run a container with `runsc` at `path` here: each
/// is tried with `runsc do /bin/true` and a time limit (kvm hangs on hosts whose KVM cannot run
/// it), kvm only where `/dev/kvm` has hardware virtualisation.
pub fn runsc_platforms(path: &str) -> Vec<&'static str> {
    let mut candidates = vec!["systrap"];
    if kvm().ok {
        candidates.push("kvm");
    }
    candidates.push("ptrace");
    let mut working = Vec::new();
    for platform in candidates {
        let root = std::env::temp_dir().join(format!(
            "moat-probe-runsc-{}-{platform}",
            std::process::id()
        ));
        let ok = runs_within(
            Command::new(path)
                .arg(format!("--root={}", root.display()))
                .args([
                    "--rootless",
                    "--network=none",
                    &format!("--platform={platform}"),
                    "do",
                    "/bin/true",
                ]),
            Duration::from_secs(8),
        );
        let _ = fs::remove_dir_all(&root);
        if ok {
            working.push(platform);
        }
    }
    working
}

fn runsc() -> Finding {
    let Some(path) = runsc_path() else {
        return finding(
            "runsc",
            false,
            "not installed (apt-get install runsc for the gVisor backend)",
        );
    };
    let working = runsc_platforms(&path);
    let detail = if working.is_empty() {
        format!("{path}: no platform works here")
    } else {
        format!(
            "{path}: working platforms: {} (the gvisor backend uses {})",
            working.join(", "),
            working[0]
        )
    };
    finding("runsc", !working.is_empty(), detail)
}

fn kvm() -> Finding {
    if !Path::new("/dev/kvm").exists() {
        return finding("kvm", false, "no /dev/kvm");
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm")));
    if Path::new("/sys/module/kvm_pvm").exists() || !hw {
        return finding(
            "kvm",
            false,
            "/dev/kvm is PVM (no hardware virtualisation): microVMs unusable",
        );
    }
    finding("kvm", true, "/dev/kvm with hardware virtualisation")
}

fn criu() -> Finding {
    let Some(path) = which("criu") else {
        return finding(
            "criu",
            false,
            "not installed (native memory checkpoints unavailable)",
        );
    };
    let ok = runs_within(Command::new(&path).arg("check"), Duration::from_secs(10));
    finding(
        "criu",
        ok,
        if ok {
            format!("{path}: check passed")
        } else {
            format!("{path}: `criu check` fails here (native memory checkpoints unavailable)")
        },
    )
}
