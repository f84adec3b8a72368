//! Host-side observations, for the security corpus and the server tests: a sandbox's processes
//! and cgroups as the host sees them, and the invariants that must hold after it is gone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use crate::is_root;

/// The `moat` binary under test.
pub fn moat() -> Command {
    Command::new(crate::moat_binary())
}

/// A sandbox id no other test uses.
pub fn unique_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // A sandbox id: 16 to 64 of a-z and 0-9.
    format!(
        "sec{}x{}x{:09}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// Host pids whose cgroup names this sandbox.
pub fn pids_in_sandbox(id: &str) -> Vec<i32> {
    let needle = format!("/moat/{id}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.contains(&needle))
        })
        .collect()
}

/// Cgroup directories of this sandbox that exist.
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let Ok(layout) = moat_jail::cgroup::Layout::detect() else {
        return Vec::new();
    };
    layout
        .bases()
        .into_iter()
        .map(|b| b.join(id))
        .filter(|d| d.exists())
        .collect()
}

fn host_mounts_under_runtime() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("/run/moat"))
        .map(str::to_string)
        .collect()
}

fn runtime_litter() -> Vec<String> {
    ["/run/moat/mnt", "/run/moat/stage"]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path().display().to_string())
        .collect()
}

/// What the host looked like before a sandbox ran.
pub struct HostProbe {
    id: String,
    mounts: Vec<String>,
}

impl HostProbe {
    /// Records the host state before sandbox `id` starts.
    pub fn before(id: &str) -> HostProbe {
        HostProbe {
            id: id.to_string(),
            mounts: host_mounts_under_runtime(),
        }
    }

    /// Asserts that sandbox `id` left nothing: no process, no cgroup, no host mount, no file in
    /// the runtime mount points. Waits up to 5 s for asynchronous teardown.
    pub fn assert_clean_after(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = pids_in_sandbox(&self.id);
            let dirs = cgroup_dirs(&self.id);
            if (pids.is_empty() && dirs.is_empty()) || Instant::now() > deadline {
                assert!(
                    pids.is_empty(),
                    "sandbox {} left processes {pids:?}",
                    self.id
                );
                assert!(dirs.is_empty(), "sandbox {} left cgroups {dirs:?}", self.id);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            host_mounts_under_runtime(),
            self.mounts,
            "host mount table changed"
        );
        assert!(
            runtime_litter().is_empty(),
            "files left in the runtime mount points: {:?}",
            runtime_litter()
        );
        let gvisor = Path::new("/run/moat/gvisor").join(&self.id);
        assert!(
            !gvisor.exists(),
            "sandbox {} left its gvisor directory {}",
            self.id,
            gvisor.display()
        );
    }
}

/// Waits for `child` and returns its exit code and peak RSS in KiB.
pub fn wait_with_rusage(child: &mut Child) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: rusage is a plain C struct; all-zero is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with valid pointers.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(r, child.id() as i32, "wait4");
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}
