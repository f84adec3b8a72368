//! Starting a user process: working directory, environment, stdio and confinement between `fork`
//! and `exec`.
//!
//! The process gets its own session and process group (`setsid`), so that a deadline or a signal
//! reaches everything it started. The agent never waits for it here: the reaper does.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};

use moat_jail::confine::ConfinePlan;

use crate::filesystem::sys;
use crate::rpc::{Code, RpcError};
use crate::users::User;

/// `PATH` for processes when the agent itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `statfs` magic of procfs.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// The `cgroup.procs` files of the sandbox's user processes that the backend handed over
/// (`moat_proto::agent_config::AGENT_USER_CGROUP_FD`): each user process moves itself there
/// before `exec`, so its memory and pids limits are not the agent's.
static USER_CGROUPS: OnceLock<Vec<OwnedFd>> = OnceLock::new();

/// Sets the user processes' cgroups (once, at start-up).
pub fn set_user_cgroups(procs: Vec<OwnedFd>) {
    let _ = USER_CGROUPS.set(procs);
}

/// How the process's stdio is wired.
#[derive(Debug)]
pub enum Stdio3 {
    /// Pipes for stdout and stderr; a pipe for stdin when `stdin` is true, else `/dev/null`.
    Pipes {
        /// Whether the process gets a stdin pipe.
        stdin: bool,
    },
    /// The slave end of a PTY for all three, which becomes the controlling terminal.
    Pty(OwnedFd),
}

/// What [`spawn`] needs.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    /// Program (searched in the new `PATH` when it has no `/`).
    pub cmd: &'a str,
    /// Arguments after the program name.
    pub args: &'a [String],
    /// Environment, in order (later entries win).
    pub env: Vec<(String, String)>,
    /// The working directory, opened with `O_PATH` (see [`open_cwd`]).
    pub cwd: &'a OwnedFd,
    /// Identity, limits, landlock and seccomp for the process.
    pub plan: Arc<ConfinePlan>,
    /// Stdio.
    pub stdio: Stdio3,
    /// Descriptors the process keeps open under their own numbers (each at least 3, so stdio
    /// set-up cannot replace them); they are close-on-exec in the agent.
    pub inherit: &'a [OwnedFd],
}

/// A started process: its pid and the agent's ends of its pipes.
#[derive(Debug)]
pub struct Spawned {
    /// Process id (also its process group and session id).
    pub pid: u32,
    /// Write end of its stdin pipe.
    pub stdin: Option<OwnedFd>,
    /// Read end of its stdout pipe.
    pub stdout: Option<OwnedFd>,
    /// Read end of its stderr pipe.
    pub stderr: Option<OwnedFd>,
}

/// Forks and executes the process described by `spec`.
///
/// The caller must hold the reaper's lock across this call and the registration of the pid, so
/// the process cannot be reaped before someone waits for it.
pub fn spawn(spec: SpawnSpec<'_>) -> io::Result<Spawned> {
    let mut cmd = Command::new(spec.cmd);
    cmd.args(spec.args).env_clear();
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let pty = match spec.stdio {
        Stdio3::Pipes { stdin } => {
            cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            false
        }
        Stdio3::Pty(slave) => {
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            true
        }
    };
    if spec.inherit.iter().any(|fd| fd.as_raw_fd() < 3) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "inherited descriptors must not be stdio numbers",
        ));
    }
    let inherit: Vec<i32> = spec.inherit.iter().map(AsRawFd::as_raw_fd).collect();
    let plan = spec.plan;
    let cwd_fd = spec.cwd.as_raw_fd();
    let user_cgroups: Vec<i32> = USER_CGROUPS
        .get()
        .map(|fds| fds.iter().map(AsRawFd::as_raw_fd).collect())
        .unwrap_or_default();
    // SAFETY: the closure runs in the forked child of a possibly multi-threaded parent, so it only
    // makes async-signal-safe system calls and allocates nothing: setsid, ioctl, write to the
    // cgroup file, open/write/close of a constant path, fcntl, ConfinePlan::apply (documented
    // async-signal-safe) and fchdir. The cgroup files are the static's, open for the agent's life.
    // `cwd_fd` and the `inherit` descriptors are open in the child because the parent keeps
    // `spec` alive until spawn returns (`cwd_fd` stays close-on-exec, so the program never sees
    // it; the `inherit` ones lose that flag in the child only).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            if pty && libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Out of the agent's cgroup before anything runs: "0" moves the writer itself. A
            // process that could not move would share the agent's memory, so it does not run.
            for &fd in &user_cgroups {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Should the whole sandbox (agent included) run out of memory, user code goes
            // first: the OOM killer prefers the highest score. Raising one's own score needs
            // no privilege; failure (no procfs) is harmless, so it is ignored.
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, b"1000".as_ptr().cast(), 4);
                libc::close(fd);
            }
            plan.apply()?;
            // After dropping privileges, so the user needs search permission on the directory.
            if libc::fchdir(cwd_fd) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let stdin = child.stdin.take().map(OwnedFd::from);
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    // Dropping `cmd` closes the parent's copies of the PTY slave, so the master sees EOF once the
    // process and its children are done with it. `child` is dropped without waiting: the reaper
    // collects the exit status.
    drop(cmd);
    drop(child);
    Ok(Spawned {
        pid,
        stdin,
        stdout,
        stderr,
    })
}

/// Resolves and opens the working directory of a new process.
///
/// `requested` absent means `workdir`; a relative path (or `~/…`) resolves against the user's
/// home. The directory must exist and must not be inside procfs: a cwd such as `/proc/self/fd/N`
/// would hand the process a directory the agent holds open (CVE-2024-21626).
pub fn open_cwd(user: &User, workdir: &str, requested: Option<&str>) -> Result<OwnedFd, RpcError> {
    let path = match requested {
        // A default working directory that does not exist (a template without the user's home)
        // is not the caller's mistake: start in `/` instead.
        None | Some("") if !Path::new(workdir).is_dir() => PathBuf::from("/"),
        None | Some("") => PathBuf::from(workdir),
        Some("~") => PathBuf::from(&user.home),
        Some(p) => {
            if let Some(rest) = p.strip_prefix("~/") {
                Path::new(&user.home).join(rest)
            } else {
                Path::new(&user.home).join(p)
            }
        }
    };
    let shown = path.display().to_string();
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        RpcError::new(
            Code::InvalidArgument,
            format!("working directory '{shown}' contains a NUL byte"),
        )
    })?;
    // No magic links: `/proc/self/fd/N` (or a symlink to it) would resolve to a descriptor of
    // the agent's own (its channel, its writable layer), whatever path that shows.
    let fd = sys::openat2(
        None,
        &c,
        libc::O_PATH | libc::O_DIRECTORY,
        0,
        libc::RESOLVE_NO_MAGICLINKS,
    )
    .map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) && shown.starts_with("/proc") {
            proc_refused(&shown)
        } else {
            RpcError::new(
                Code::InvalidArgument,
                format!("working directory '{shown}': {e}"),
            )
        }
    })?;
    // The path could have changed between canonicalize and open; the filesystem type of what was
    // actually opened is what counts.
    // SAFETY: statfs is plain data, valid when zeroed.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid, writable statfs; fd is open.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } == 0 && st.f_type == PROC_SUPER_MAGIC {
        return Err(proc_refused(&shown));
    }
    Ok(fd)
}

fn proc_refused(shown: &str) -> RpcError {
    RpcError::new(
        Code::InvalidArgument,
        format!("working directory '{shown}' is inside /proc, which is not allowed"),
    )
}

/// The environment of a new process, lowest precedence first: `PATH`, then the user's `HOME`,
/// `USER` and `LOGNAME`, then the sandbox's variables, then the request's.
pub fn build_env(
    user: &User,
    sandbox: &std::collections::BTreeMap<String, String>,
    request: &HashMap<String, String>,
) -> Result<Vec<(String, String)>, RpcError> {
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string());
    let mut env = vec![
        ("PATH".to_string(), path),
        ("HOME".to_string(), user.home.clone()),
        ("USER".to_string(), user.name.clone()),
        ("LOGNAME".to_string(), user.name.clone()),
    ];
    env.extend(sandbox.iter().map(|(k, v)| (k.clone(), v.clone())));
    // The request map has no order of its own; sort it so the environment is deterministic.
    let mut req: Vec<_> = request.iter().collect();
    req.sort();
    for (k, v) in req {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(RpcError::new(
                Code::InvalidArgument,
                format!("invalid environment variable name or value: {k:?}"),
            ));
        }
        env.push((k.clone(), v.clone()));
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> User {
        User {
            name: "root".into(),
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: "/root".into(),
            shell: "/bin/sh".into(),
        }
    }

    #[test]
    fn cwd_rules() {
        let u = root();
        assert!(open_cwd(&u, "/tmp", None).is_ok());
        assert!(open_cwd(&u, "/", Some("/tmp")).is_ok());
        for bad in [
            "/proc/self/fd/0",
            "/proc",
            "/proc/self/fd",
            "/nonexistent-dir-x",
        ] {
            let err = open_cwd(&u, "/", Some(bad)).expect_err(bad);
            assert_eq!(err.code, Code::InvalidArgument, "{bad}: {err}");
        }
        // A file is not a directory.
        let err = open_cwd(&u, "/", Some("/etc/passwd")).expect_err("file");
        assert_eq!(err.code, Code::InvalidArgument);
    }

    #[test]
    fn env_order() {
        let u = root();
        let sandbox = [("A".to_string(), "sandbox".to_string())].into();
        let req = [("A".to_string(), "request".to_string())].into();
        let env = build_env(&u, &sandbox, &req).expect("env");
        assert_eq!(env[0].0, "PATH");
        let a: Vec<_> = env.iter().filter(|(k, _)| k == "A").collect();
        assert_eq!(a.last().map(|(_, v)| v.as_str()), Some("request"));
        let bad = [("A=B".to_string(), "x".to_string())].into();
        assert!(build_env(&u, &sandbox, &bad).is_err());
    }
}
