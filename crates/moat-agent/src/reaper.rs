//! Collecting the exit status of child processes on `SIGCHLD`.
//!
//! As PID 1 the agent inherits every orphan in the sandbox, so it reaps any child
//! ([`ReapMode::AnyChild`]); statuses of processes the process service started go to it, others
//! are dropped. Outside a sandbox (tests) it waits only for the processes it started
//! ([`ReapMode::OwnChildren`]), so it never steals another component's children.
//!
//! Nothing else in the agent may wait for children: neither `tokio::process` nor `Child::wait`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

/// Which children the reaper collects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapMode {
    /// Every child (`waitpid(-1)`): the agent is PID 1.
    AnyChild,
    /// Only pids registered with [`Reaper::lock`].
    OwnChildren,
}

/// Where exit statuses go: pid → the waiter of that process.
pub type Waiters = HashMap<i32, oneshot::Sender<i32>>;

/// Interval of the safety-net poll while some registered process is still running, in case a
/// `SIGCHLD` was coalesced with one another consumer already handled.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The reaper; see the module documentation.
#[derive(Debug)]
pub struct Reaper {
    mode: ReapMode,
    waiters: Mutex<Waiters>,
}

impl Reaper {
    /// Starts a reaper task on the current tokio runtime.
    pub fn start(mode: ReapMode) -> std::io::Result<Arc<Reaper>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Reaper {
            mode,
            waiters: Mutex::new(HashMap::new()),
        });
        let weak: Weak<Reaper> = Arc::downgrade(&reaper);
        tokio::spawn(async move {
            loop {
                let busy = match weak.upgrade() {
                    Some(r) => {
                        r.reap_now();
                        !r.lock().is_empty()
                    }
                    None => return,
                };
                if busy {
                    tokio::select! {
                        _ = sigchld.recv() => {}
                        _ = tokio::time::sleep(POLL_INTERVAL) => {}
                    }
                } else if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Locks the waiter table. Hold it across forking a process and inserting its waiter, so the
    /// status cannot be collected before anyone waits for it.
    pub fn lock(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Collects every exited child now.
    pub fn reap_now(&self) {
        let mut waiters = self.lock();
        match self.mode {
            ReapMode::AnyChild => loop {
                let mut status = 0;
                // SAFETY: status is a valid, writable int.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if let Some(tx) = waiters.remove(&pid) {
                    let _ = tx.send(status);
                }
            },
            ReapMode::OwnChildren => {
                let pids: Vec<i32> = waiters.keys().copied().collect();
                for pid in pids {
                    let mut status = 0;
                    // SAFETY: status is a valid, writable int.
                    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                    if r == pid {
                        if let Some(tx) = waiters.remove(&pid) {
                            let _ = tx.send(status);
                        }
                    } else if r < 0 {
                        // Not our child (any more): nobody will ever report it.
                        waiters.remove(&pid);
                    }
                }
            }
        }
    }
}

/// How a process ended, in envd's terms: exit code (−1 for a signal), whether it exited, and Go's
/// `ProcessState.String()`.
pub fn describe_status(status: i32) -> (i32, bool, String) {
    if libc::WIFEXITED(status) {
        let code = libc::WEXITSTATUS(status);
        (code, true, format!("exit status {code}"))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let mut text = format!("signal: {}", signal_name(sig));
        if libc::WCOREDUMP(status) {
            text.push_str(" (core dumped)");
        }
        (-1, false, text)
    } else {
        (-1, false, format!("unknown wait status {status:#x}"))
    }
}

/// Go's description of a Linux signal (`syscall.Signal.String()`).
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        16 => "stack fault",
        17 => "child exited",
        18 => "continued",
        19 => "stopped (signal)",
        20 => "stopped",
        21 => "stopped (tty input)",
        22 => "stopped (tty output)",
        23 => "urgent I/O condition",
        24 => "CPU time limit exceeded",
        25 => "file size limit exceeded",
        26 => "virtual timer expired",
        27 => "profiling timer expired",
        28 => "window changed",
        29 => "I/O possible",
        30 => "power failure",
        31 => "bad system call",
        n => return format!("signal {n}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_like_go() {
        assert_eq!(describe_status(0), (0, true, "exit status 0".into()));
        assert_eq!(describe_status(1 << 8), (1, true, "exit status 1".into()));
        assert_eq!(describe_status(9), (-1, false, "signal: killed".into()));
        assert_eq!(
            describe_status(11 | 0x80),
            (-1, false, "signal: segmentation fault (core dumped)".into())
        );
        assert_eq!(signal_name(40), "signal 40");
    }
}
