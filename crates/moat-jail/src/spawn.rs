//! Starting a sandbox: `clone` into new user, pid, mount, network, ipc and uts namespaces; map the
//! sandbox's ids onto its own host range; place it in its cgroups; build its root; `pivot_root`;
//! and execute the agent from its sealed memfd as PID 1 with the channel socket on fd 3 and its
//! writable layer on fd 4.
//!
//! The child shares the parent's memory (`CLONE_VM`, on a stack of its own) until it executes
//! the agent: cloning without it would copy the page tables of a large, multi-threaded server
//! for every start and make both sides take copy-on-write faults and TLB-shootdown interrupts,
//! which under load cost more than the rest of the start. So between `clone` and `exec` the
//! child makes raw system calls only, on paths, strings and buffers prepared beforehand, and
//! never allocates. It shares the calling thread's `errno` too; the handshake keeps them apart:
//! the parent writes nothing while the child runs (it waits in `read` on the error pipe), and
//! the child only waits while the parent sets it up. A failure is reported to the parent as
//! `(step, errno)` over a close-on-exec pipe, which a successful `exec` closes; the parent reaps
//! a failed child before the stack goes.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::cgroup::SandboxCgroup;
pub use crate::id::validate_id;
use crate::idmap::{IdRange, RANGE};
use crate::memfd::SealedBinary;
use crate::rootfs::{self, FsLimits, Plan, Rootfs, Step};
use crate::runtime::RuntimeDir;
use crate::stack::ChildStack;
use crate::sys::{self, cvt_int};
use crate::{JailError, Result};

/// Everything needed to start one sandbox.
#[derive(Debug)]
pub struct SpawnConfig<'a> {
    /// Sandbox id, `[a-z0-9]{1,64}` (it names cgroups; see [`validate_id`]).
    pub id: &'a str,
    /// The host runtime directory.
    pub runtime: &'a RuntimeDir,
    /// The root filesystem.
    pub rootfs: &'a Rootfs,
    /// Sizes of the writable filesystems.
    pub fs_limits: FsLimits,
    /// The sandbox's cgroups (already created, limits applied).
    pub cgroup: &'a SandboxCgroup,
    /// The host id range the sandbox's ids map to.
    pub ids: &'a IdRange,
    /// The agent binary.
    pub agent: &'a SealedBinary,
    /// The agent's arguments, `argv[0]` first (the `moat` binary: `["moat", "agent"]`).
    pub agent_args: Vec<String>,
    /// The agent's environment, `KEY=VALUE`.
    pub agent_env: Vec<String>,
    /// Host name inside the sandbox.
    pub hostname: &'a str,
    /// A listening socket the agent gets as fd 5, on which a host process can open new
    /// channels (a sandbox kept across server restarts); `None` leaves fd 5 closed.
    pub listener: Option<RawFd>,
}

/// A running sandbox's first process (the agent) as seen from the host.
#[derive(Debug)]
pub struct SandboxProcess {
    pid: i32,
    pidfd: OwnedFd,
    channel: Option<OwnedFd>,
    reaped: bool,
    /// Whether it is our child (spawned here) rather than adopted from an earlier process.
    child: bool,
}

/// What the child needs, all prepared before `clone`.
struct ChildPlan {
    plan: Plan,
    go_read: RawFd,
    go_write: RawFd,
    err_write: RawFd,
    channel: RawFd,
    /// The listener to hand over as fd 5, or -1.
    listener: RawFd,
    /// The user processes' `cgroup.procs` files, open for writing, to hand over as fds 6 and 7
    /// (-1 where there is none).
    user_cgroups: [RawFd; MAX_USER_CGROUPS],
    memfd: RawFd,
    hostname: CString,
    lo: libc::ifreq,
    exec: ExecVectors,
}

/// A program's argument and environment vectors as `execve` takes them, made before `clone`
/// (the child must not allocate).
pub(crate) struct ExecVectors {
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into the strings the value owns, which nothing mutates; sending
// or sharing the value moves or shares them together.
unsafe impl Send for ExecVectors {}
// SAFETY: as above; nothing is written through a shared reference.
unsafe impl Sync for ExecVectors {}

impl ExecVectors {
    /// The vectors of `args` (`argv[0]` first) and `env` (`KEY=VALUE`).
    pub(crate) fn new(args: &[String], env: &[String]) -> Result<ExecVectors> {
        let argv = args.iter().map(|s| cstr(s)).collect::<Result<Vec<_>>>()?;
        let envp = env.iter().map(|s| cstr(s)).collect::<Result<Vec<_>>>()?;
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|a| a.as_ptr())
                .chain([std::ptr::null()])
                .collect()
        };
        // The pointers are into the strings' own buffers, which stay put when the vectors move.
        Ok(ExecVectors {
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            _argv: argv,
            _envp: envp,
        })
    }

    /// `argv`, null-terminated.
    pub(crate) fn argv(&self) -> *const *const libc::c_char {
        self.argv_ptrs.as_ptr()
    }

    /// `envp`, null-terminated.
    pub(crate) fn envp(&self) -> *const *const libc::c_char {
        self.envp_ptrs.as_ptr()
    }
}

/// Starts a child running `entry(plan)` in new user, pid, mount, network, ipc and uts
/// namespaces, in our memory (`CLONE_VM`) on a stack of its own, which is returned with its
/// pid: the caller keeps it until the child has executed its program or been reaped.
///
/// # Safety
///
/// `entry` must make raw system calls only and never return, and `plan` must outlive the
/// child's `exec` or its reaping.
///
/// The user namespace is owned by host uid `owner` (the first id of the sandbox's range), not
/// by root: the kernel charges the per-user counts of everything in a user namespace
/// (inotify instances and watches above all) to its owner as well, all the way up to the
/// host's. Owned by root, every sandbox shared root's 128 inotify instances with every other
/// sandbox and with the host's own services. The child keeps none of the thread's securebits:
/// the kernel resets them in a new user namespace.
pub(crate) unsafe fn clone_jailed<T>(
    entry: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    plan: &T,
    what: &str,
    owner: u32,
) -> Result<(i32, ChildStack)> {
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    let stack = ChildStack::new(CHILD_STACK, &format!("the start stack of {what}"))?;
    let as_owner = JailedThread::become_owner(owner)?;
    // SAFETY: the child runs `entry` on `stack`, in our memory; the caller vouches for `entry`
    // and `plan`, and keeps `stack` as long as the child needs it.
    let pid = unsafe {
        libc::clone(
            entry,
            stack.top(),
            flags | libc::CLONE_VM | libc::SIGCHLD,
            std::ptr::from_ref(plan).cast_mut().cast(),
        )
    };
    let err = (pid < 0).then(|| JailError::last_os(format!("clone {what}")));
    drop(as_owner);
    match err {
        Some(e) => Err(e),
        None => Ok((pid, stack)),
    }
}

/// This thread's credentials while it makes a jail's namespaces: its effective uid the
/// namespace's owner, its capabilities kept (`SECBIT_NO_SETUID_FIXUP`, so the namespaces are
/// made with root's privileges, which no host policy on unprivileged user namespaces
/// restricts). Dropping it puts back the uid and securebits it found.
///
/// Credentials are per thread in Linux, and the changes are raw system calls (glibc's
/// wrappers would change every thread of the process): no other thread of the server sees
/// them.
pub(crate) struct JailedThread {
    euid: libc::uid_t,
    securebits: libc::c_int,
}

impl JailedThread {
    fn become_owner(owner: u32) -> Result<JailedThread> {
        // SAFETY: prctl and geteuid with integer arguments only.
        let (securebits, euid) = unsafe { (libc::prctl(libc::PR_GET_SECUREBITS), libc::geteuid()) };
        if securebits < 0 {
            return Err(JailError::last_os("read this thread's securebits"));
        }
        let keep = libc::c_ulong::try_from(securebits | libc::SECBIT_NO_SETUID_FIXUP)
            .map_err(|_| JailError::Invalid(format!("securebits {securebits:#x}")))?;
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, keep) } != 0 {
            return Err(JailError::last_os(
                "keep capabilities across a uid change (PR_SET_SECUREBITS needs CAP_SETPCAP)",
            ));
        }
        let guard = JailedThread { euid, securebits };
        // SAFETY: a raw setresuid of this thread alone; -1 leaves the real and saved ids.
        if unsafe {
            libc::syscall(
                libc::SYS_setresuid,
                libc::uid_t::MAX,
                owner,
                libc::uid_t::MAX,
            )
        } != 0
        {
            return Err(JailError::last_os(format!(
                "act as uid {owner} to own the sandbox's user namespace"
            )));
        }
        Ok(guard)
    }
}

impl Drop for JailedThread {
    fn drop(&mut self) {
        // SAFETY: raw setresuid and prctl of this thread alone, with integer arguments.
        let restored = unsafe {
            libc::syscall(
                libc::SYS_setresuid,
                libc::uid_t::MAX,
                self.euid,
                libc::uid_t::MAX,
            ) == 0
                && libc::c_ulong::try_from(self.securebits)
                    .is_ok_and(|bits| libc::prctl(libc::PR_SET_SECUREBITS, bits) == 0)
        };
        if !restored {
            // A server thread left acting as a sandbox's uid would do the host's work with the
            // wrong identity: stop rather than go on.
            eprintln!(
                "moat: could not restore this thread's credentials after making a sandbox: {}",
                std::io::Error::last_os_error()
            );
            std::process::abort();
        }
    }
}

/// Puts our new child `pid` into `cgroup` (first: it never runs as one of the range's ids
/// outside it) and maps its user namespace's ids 0..65535 onto `ids`.
pub(crate) fn place_child(pid: i32, cgroup: &SandboxCgroup, ids: &IdRange) -> Result<()> {
    cgroup.attach(pid)?;
    let base = ids.host_base();
    for map in ["uid_map", "gid_map"] {
        write_file(
            &format!("/proc/{pid}/{map}"),
            &format!("0 {base} {RANGE}\n"),
        )?;
    }
    Ok(())
}

/// Kills and reaps our child `pid` (one that failed before it could be handed out).
pub(crate) fn kill_child(pid: i32) {
    // SAFETY: kill and waitpid on our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    cvt_int(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })
        .map_err(|e| JailError::os("pipe2", e))?;
    // SAFETY: pipe2 returned two fresh fds that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(crate) fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    cvt_int(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })
    .map_err(|e| JailError::os("socketpair", e))?;
    // SAFETY: socketpair returned two fresh fds that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(crate) fn write_file(path: &str, data: &str) -> Result<()> {
    std::fs::write(path, data).map_err(|e| JailError::os(format!("write {path}"), e))
}

impl SandboxProcess {
    /// Starts a sandbox. Blocks until its agent has been executed (or setup failed).
    pub fn spawn(cfg: &SpawnConfig<'_>) -> Result<SandboxProcess> {
        validate_id(cfg.id)?;
        let plan = rootfs::plan(cfg.runtime, cfg.rootfs, &cfg.fs_limits, cfg.hostname)?;
        let (host_end, agent_end) = socketpair()?;
        // Opened here, by host root: the kernel checks a write to `cgroup.procs` against the
        // credentials it was opened with, so the agent can move its user processes with them.
        let user_files = cfg.cgroup.user_procs_files();
        if user_files.len() > MAX_USER_CGROUPS {
            return Err(JailError::Invalid(format!(
                "{} user cgroups; at most {MAX_USER_CGROUPS}",
                user_files.len()
            )));
        }
        let user_cgroups = user_files
            .iter()
            .map(|f| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(f)
                    .map(OwnedFd::from)
                    .map_err(|e| JailError::os(format!("open {}", f.display()), e))
            })
            .collect::<Result<Vec<OwnedFd>>>()?;
        let mut user_raw = [-1; MAX_USER_CGROUPS];
        for (slot, fd) in user_raw.iter_mut().zip(&user_cgroups) {
            *slot = fd.as_raw_fd();
        }
        let (go_read, go_write) = pipe()?;
        let (err_read, err_write) = pipe()?;
        // SAFETY: ifreq is a plain C struct; all-zero is valid.
        let mut lo: libc::ifreq = unsafe { std::mem::zeroed() };
        for (i, b) in b"lo".iter().enumerate() {
            lo.ifr_name[i] = *b as libc::c_char;
        }
        let child = ChildPlan {
            plan,
            go_read: go_read.as_raw_fd(),
            go_write: go_write.as_raw_fd(),
            err_write: err_write.as_raw_fd(),
            channel: agent_end.as_raw_fd(),
            listener: cfg.listener.unwrap_or(-1),
            user_cgroups: user_raw,
            memfd: cfg.agent.raw_fd(),
            hostname: cstr(cfg.hostname)?,
            lo,
            exec: ExecVectors::new(&cfg.agent_args, &cfg.agent_env)?,
        };

        // SAFETY: `child_entry` makes raw system calls only and never returns; `child`
        // outlives the child here (this frame waits until it has executed the agent or been
        // reaped), and so does the stack.
        let (pid, _stack) = unsafe {
            clone_jailed(
                child_entry,
                &child,
                "the sandbox's namespaces",
                cfg.ids.host_base(),
            )?
        };
        drop(agent_end);
        drop(go_read);
        drop(err_write);

        // From here on, a failure must not leave the child behind.
        let setup = (|| -> Result<()> {
            place_child(pid, cfg.cgroup, cfg.ids)?;
            if child.plan.wants_lower() {
                send_lower(pid, cfg.rootfs, &host_end)?;
            }
            // The agent should never be the OOM killer's choice; user processes raise their own
            // score. Lowering it needs CAP_SYS_RESOURCE, which a container host may not grant.
            let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "-1000");
            Ok(())
        })();
        let go = setup.and_then(|()| {
            // SAFETY: writing one byte from a valid buffer to an fd we own.
            let n = unsafe { libc::write(go_write.as_raw_fd(), b"g".as_ptr().cast(), 1) };
            if n == 1 {
                Ok(())
            } else {
                Err(JailError::last_os("signal sandbox to start"))
            }
        });
        drop(go_write);
        let failure = match go {
            Err(e) => Some(e),
            Ok(()) => read_child_error(&err_read, &child.plan),
        };
        if let Some(err) = failure {
            kill_child(pid);
            return Err(err);
        }
        let mut process = SandboxProcess::own_child(pid)?;
        process.channel = Some(host_end);
        Ok(process)
    }

    /// Takes charge of our running child `pid`, which executed its program; kills it if it
    /// cannot.
    pub(crate) fn own_child(pid: i32) -> Result<SandboxProcess> {
        // SAFETY: pidfd_open on our own, not yet reaped child.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            let e = JailError::last_os("pidfd_open");
            kill_child(pid);
            return Err(e);
        }
        Ok(SandboxProcess {
            pid,
            // SAFETY: pidfd_open returned a fresh fd (close-on-exec by default).
            pidfd: unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) },
            channel: None,
            reaped: false,
            child: true,
        })
    }

    /// Takes over the agent of a sandbox an earlier process spawned and left running (see
    /// [`SandboxProcess::release`]): `pid` must be the agent's pid in our pid namespace. The
    /// caller checks that the pid is still that agent (its cgroup) after this returns, since
    /// only the pidfd pins the process.
    pub fn adopt(pid: i32) -> Result<SandboxProcess> {
        // SAFETY: pidfd_open with integer arguments.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(JailError::last_os(format!("pidfd_open({pid})")));
        }
        // SAFETY: pidfd_open returned a fresh fd (close-on-exec by default).
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(SandboxProcess {
            pid,
            pidfd,
            channel: None,
            reaped: false,
            child: false,
        })
    }

    /// Sets the channel of an adopted agent (a new connection to its listener).
    pub fn set_channel(&mut self, channel: OwnedFd) {
        self.channel = Some(channel);
    }

    /// Lets the agent run on without us: nothing is killed when this is dropped. The kernel
    /// reparents it when this process exits.
    pub fn release(mut self) {
        self.reaped = true;
    }

    /// The agent's pid in the host's pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A pidfd of the agent: readable once it has exited.
    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    /// Takes the host end of the agent channel (once).
    pub fn take_channel(&mut self) -> Option<OwnedFd> {
        self.channel.take()
    }

    /// SIGKILLs the agent. As PID 1 of the sandbox's pid namespace, its death makes the kernel
    /// kill every other process of the sandbox.
    pub fn kill(&self) {
        if !self.reaped {
            // SAFETY: pidfd_send_signal on our pidfd cannot hit a recycled pid.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    self.pidfd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
    }

    /// Waits for the agent to exit and reaps it. Returns the raw wait status (0 for an adopted
    /// agent, which its own parent reaps).
    pub fn wait(&mut self) -> io::Result<i32> {
        if self.reaped {
            return Ok(0);
        }
        if !self.child {
            return self.wait_exit().map(|()| 0);
        }
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child with a valid status pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::__WALL) };
            if r == self.pid {
                self.reaped = true;
                return Ok(status);
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }

    /// Waits on the pidfd until the (adopted) agent has exited.
    fn wait_exit(&mut self) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: poll on one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, -1) };
            if r > 0 {
                self.reaped = true;
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if r < 0 && err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }

    /// Whether the agent has exited (without blocking; reaps it if so).
    pub fn try_wait(&mut self) -> io::Result<Option<i32>> {
        if self.reaped {
            return Ok(Some(0));
        }
        if !self.child {
            let mut pfd = libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one valid pollfd, without waiting.
            let r = unsafe { libc::poll(&mut pfd, 1, 0) };
            return match r {
                0 => Ok(None),
                r if r > 0 => {
                    self.reaped = true;
                    Ok(Some(0))
                }
                _ => Err(io::Error::last_os_error()),
            };
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG | libc::__WALL) };
        match r {
            0 => Ok(None),
            r if r == self.pid => {
                self.reaped = true;
                Ok(Some(status))
            }
            _ => Err(io::Error::last_os_error()),
        }
    }
}

impl Drop for SandboxProcess {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
            let _ = self.wait();
        }
    }
}

pub(crate) fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| JailError::Invalid(format!("string contains NUL: {s:?}")))
}

/// Step numbers the child reports for its own actions (plan steps are 0..n).
pub(crate) const STEP_GO: u32 = 10_000;
pub(crate) const STEP_IDS: u32 = 10_001;
pub(crate) const STEP_CGROUPNS: u32 = 10_002;
pub(crate) const STEP_PRIVATE: u32 = 10_003;
pub(crate) const STEP_PIVOT: u32 = 10_004;
pub(crate) const STEP_HOSTNAME: u32 = 10_005;
const STEP_LOOPBACK: u32 = 10_006;
pub(crate) const STEP_FDS: u32 = 10_007;
pub(crate) const STEP_EXEC: u32 = 10_008;
const STEP_LAYER: u32 = 10_009;
pub(crate) const STEP_NEST: u32 = 10_010;

pub(crate) fn read_child_error(err_read: &OwnedFd, plan: &Plan) -> Option<JailError> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        // SAFETY: reading into the unfilled tail of a valid buffer from an fd we own.
        let n = unsafe {
            libc::read(
                err_read.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                8 - got,
            )
        };
        if n == 0 {
            break;
        }
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Some(JailError::last_os("read sandbox setup status"));
        }
        got += n as usize;
    }
    if got == 0 {
        return None; // exec succeeded and closed the pipe
    }
    if got < 8 {
        return Some(JailError::Invalid(
            "sandbox setup died without a report".into(),
        ));
    }
    let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let what = match step {
        STEP_GO => "wait for the host".to_string(),
        STEP_IDS => "become root of the user namespace".to_string(),
        STEP_CGROUPNS => "unshare the cgroup namespace".to_string(),
        STEP_PRIVATE => "make mounts private".to_string(),
        STEP_PIVOT => "pivot_root into the sandbox root".to_string(),
        STEP_HOSTNAME => "set the host name".to_string(),
        STEP_LOOPBACK => "bring up the loopback interface".to_string(),
        STEP_FDS => "set up the agent's file descriptors".to_string(),
        STEP_EXEC => "execute the agent".to_string(),
        STEP_LAYER => "open the writable layer".to_string(),
        STEP_NEST => "lock the mounts in a nested user namespace".to_string(),
        n => plan
            .what
            .get(n as usize)
            .cloned()
            .unwrap_or_else(|| format!("step {n}")),
    };
    Some(JailError::os(
        format!("sandbox setup: {what}"),
        io::Error::from_raw_os_error(errno),
    ))
}

/// Reports `(step, errno)` to the parent and exits. Async-signal-safe.
fn fail(plan: &ChildPlan, step: u32) -> ! {
    report_failure(plan.err_write, step)
}

/// Reports `(step, errno)` on `err_write` and exits. Async-signal-safe.
pub(crate) fn report_failure(err_write: RawFd, step: u32) -> ! {
    // SAFETY: __errno_location always returns a valid pointer for the calling thread.
    let errno = unsafe { *libc::__errno_location() };
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&step.to_ne_bytes());
    buf[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: writing a valid stack buffer, then exiting without running any destructor.
    unsafe {
        libc::write(err_write, buf.as_ptr().cast(), 8);
        libc::_exit(127);
    }
}

fn opt_ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// Runs one plan step. Returns the raw result (-1 with errno on failure).
pub(crate) fn run_step(step: &Step, channel: RawFd) -> libc::c_long {
    // SAFETY: for every call below, all pointers come from CStrings and buffers prepared before
    // clone, which stay alive in the parent's memory (which the child shares) until exec or exit.
    unsafe {
        match step {
            Step::Mount {
                src,
                dst,
                fstype,
                flags,
                data,
                optional,
            } => {
                let r = libc::mount(
                    opt_ptr(src),
                    dst.as_ptr(),
                    opt_ptr(fstype),
                    *flags,
                    opt_ptr(data).cast(),
                );
                if r != 0 && *optional && *libc::__errno_location() == libc::ENOENT {
                    return 0;
                }
                r as libc::c_long
            }
            Step::Attr {
                path,
                set,
                recursive,
            } => {
                let flags = if *recursive { libc::AT_RECURSIVE } else { 0 };
                match sys::mount_setattr(libc::AT_FDCWD, path, flags, *set, None) {
                    Ok(()) => 0,
                    // Optional /proc entries may be missing.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => 0,
                    Err(_) => -1,
                }
            }
            Step::Mkdir { path, mode } => {
                let r = libc::mkdir(path.as_ptr(), *mode);
                if r != 0 && *libc::__errno_location() == libc::EEXIST {
                    return libc::chmod(path.as_ptr(), *mode) as libc::c_long;
                }
                if r == 0 {
                    // mkdir's mode is masked by sticky/umask rules; set it exactly.
                    return libc::chmod(path.as_ptr(), *mode) as libc::c_long;
                }
                r as libc::c_long
            }
            Step::Symlink { target, path } => {
                libc::symlink(target.as_ptr(), path.as_ptr()) as libc::c_long
            }
            Step::File {
                path,
                contents,
                mode,
            } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_TRUNC
                        | libc::O_CLOEXEC
                        | libc::O_NOFOLLOW,
                    *mode,
                );
                if fd < 0 {
                    return -1;
                }
                let mut off = 0;
                while off < contents.len() {
                    let n = libc::write(fd, contents[off..].as_ptr().cast(), contents.len() - off);
                    if n <= 0 {
                        libc::close(fd);
                        return -1;
                    }
                    off += n as usize;
                }
                libc::close(fd);
                0
            }
            Step::Chown { path, uid, gid } => {
                libc::lchown(path.as_ptr(), *uid, *gid) as libc::c_long
            }
            Step::SharedReadOnly { src, dst, data } => {
                let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
                if libc::mount(
                    c"overlay".as_ptr(),
                    dst.as_ptr(),
                    c"overlay".as_ptr(),
                    flags,
                    data.as_ptr().cast(),
                ) == 0
                {
                    return 0;
                }
                bind_read_only(src, dst)
            }
            Step::AttachLower {
                target,
                fallback_src,
            } => attach_lower(channel, target, fallback_src),
        }
    }
}

pub(crate) const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Makes an id-mapped, read-only clone of the template directory with the sandbox's user
/// namespace (template ids 0..65535 become the sandbox's) and sends it to the child over the
/// channel socket; sends a bare byte instead where the kernel or filesystem cannot id-map it.
fn send_lower(pid: i32, rootfs: &Rootfs, host_end: &OwnedFd) -> Result<()> {
    let Rootfs::Dir(dir) = rootfs else {
        return Ok(());
    };
    send_idmapped(pid, dir, true, host_end)
}

/// Sends the child `pid` an id-mapped clone of `dir` (read-only if `read_only`), for an
/// [`Step::AttachLower`] of its plan; a bare byte where the kernel or filesystem cannot id-map
/// it, so that the child binds it as it is.
pub(crate) fn send_idmapped(
    pid: i32,
    dir: &std::path::Path,
    read_only: bool,
    host_end: &OwnedFd,
) -> Result<()> {
    let tree = idmapped_tree(pid, dir, read_only).ok();
    let byte = [if tree.is_some() { b'L' } else { b'N' }];
    let mut iov = libc::iovec {
        iov_base: byte.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is a plain C struct; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = &tree {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at a buffer of at least `space` bytes, so the first header
        // and its data fit.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    // SAFETY: msg and everything it points to are valid for the call.
    if unsafe { libc::sendmsg(host_end.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) } != 1 {
        return Err(JailError::last_os("send the template mount to the sandbox"));
    }
    Ok(())
}

/// An id-mapped clone of `dir` with `pid`'s user namespace (host ids 0..65535 become its own).
fn idmapped_tree(pid: i32, dir: &std::path::Path, read_only: bool) -> Result<OwnedFd> {
    let userns = std::fs::File::open(format!("/proc/{pid}/ns/user"))
        .map_err(|e| JailError::os("open the sandbox's user namespace", e))?;
    idmapped_clone(userns.as_raw_fd(), dir, read_only)
}

/// An id-mapped clone of `dir` with the user namespace `userns` (an open `ns/user` file): the
/// files of host ids 0..65535 appear owned by that namespace's ids 0..65535, and what it
/// writes there is stored under them.
pub(crate) fn idmapped_clone(
    userns: RawFd,
    dir: &std::path::Path,
    read_only: bool,
) -> Result<OwnedFd> {
    let path = CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| JailError::Invalid(format!("path with NUL: {}", dir.display())))?;
    let tree = sys::open_tree_clone(&path, libc::AT_RECURSIVE as libc::c_uint)
        .map_err(|e| JailError::os(format!("open_tree of {}", dir.display()), e))?;
    sys::mount_setattr(
        tree.as_raw_fd(),
        c"",
        libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
        sys::MOUNT_ATTR_IDMAP
            | if read_only { sys::MOUNT_ATTR_RDONLY } else { 0 }
            | sys::MOUNT_ATTR_NOSUID
            | sys::MOUNT_ATTR_NODEV,
        Some(userns),
    )
    .map_err(|e| JailError::os(format!("id-map {}", dir.display()), e))?;
    Ok(tree)
}

/// Child side of [`send_lower`]. Async-signal-safe.
fn attach_lower(channel: RawFd, target: &CString, fallback_src: &CString) -> libc::c_long {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is a plain C struct; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points at valid stack buffers for the duration of the call.
    if unsafe { libc::recvmsg(channel, &mut msg, libc::MSG_CMSG_CLOEXEC) } != 1 {
        return -1;
    }
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR checks the control length.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if byte[0] == b'L' && !cmsg.is_null() {
        // SAFETY: cmsg is a valid header within cbuf, carrying one fd (SCM_RIGHTS).
        let fd = unsafe {
            if (*cmsg).cmsg_type != libc::SCM_RIGHTS {
                return -1;
            }
            std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>())
        };
        // SAFETY: fd is the detached mount we were sent; target is a valid path.
        let r = unsafe {
            let r = libc::syscall(
                libc::SYS_move_mount,
                fd,
                c"".as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            );
            libc::close(fd);
            r
        };
        return r;
    }
    // No id-mapped mount: bind the template read-only (files owned by unmapped ids stay read-only).
    bind_read_only(fallback_src, target)
}

/// Binds `src` (recursively) at `dst`, read-only, nosuid and nodev; 0 or -1. Raw system calls
/// only, for the child between `clone` and `exec`.
pub(crate) fn bind_read_only(src: &CString, dst: &CString) -> libc::c_long {
    // SAFETY: valid C strings; raw mount and mount_setattr calls.
    unsafe {
        if libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return -1;
        }
    }
    let ro = sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
    match sys::mount_setattr(libc::AT_FDCWD, dst, libc::AT_RECURSIVE, ro, None) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

/// Room for the child's calls between `clone` and `exec` (the plan's steps, the fd passing of
/// the template's lower layer), with a guard page below.
const CHILD_STACK: usize = 256 << 10;

/// `clone`'s entry point for the child.
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildPlan`, alive until this child executes or is reaped.
    let plan = unsafe { &*arg.cast::<ChildPlan>() };
    child_main(plan)
}

/// The sandbox's first process, from `clone` to `exec`. Never returns.
fn child_main(c: &ChildPlan) -> ! {
    // SAFETY: for every call below, raw system calls on fds and buffers prepared before clone;
    // no allocation, no locks, no destructors.
    unsafe {
        // Our copy of the write end must go, so the parent's death reads as EOF below.
        libc::close(c.go_write);
        let mut b = 0u8;
        if libc::read(c.go_read, (&mut b as *mut u8).cast(), 1) != 1 {
            libc::_exit(1);
        }
        // Leave the caller's session, so terminal signals do not reach the sandbox.
        libc::setsid();
        if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
            || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
        {
            fail(c, STEP_IDS);
        }
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            fail(c, STEP_CGROUPNS);
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(c, STEP_PRIVATE);
        }
        libc::umask(0);
        for (i, step) in c.plan.steps.iter().enumerate() {
            if run_step(step, c.channel) != 0 {
                fail(c, i as u32);
            }
        }
        // The writable layer, opened while it still has a path (an overlay's upper directory
        // has none after the pivot). Close-on-exec until it is moved to its number below.
        let layer = match &c.plan.layer {
            Some(path) => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                );
                if fd < 0 {
                    fail(c, STEP_LAYER);
                }
                fd
            }
            None => -1,
        };
        let Some(root) = &c.plan.new_root else {
            fail(c, STEP_PIVOT)
        };
        if libc::chdir(root.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
            || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
            || libc::chdir(c"/".as_ptr()) != 0
        {
            fail(c, STEP_PIVOT);
        }
        libc::umask(0o022);
        if libc::sethostname(c.hostname.as_ptr(), c.hostname.as_bytes().len()) != 0 {
            fail(c, STEP_HOSTNAME);
        }
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        let mut ifr = c.lo;
        if sock < 0 || libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            fail(c, STEP_LOOPBACK);
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr) != 0 {
            fail(c, STEP_LOOPBACK);
        }
        libc::close(sock);

        // Move what we keep above the standard numbers, then lay out 0-2 (/dev/null), 3 (the
        // channel), 4 (the writable layer, when there is one), 5 (the listener of a keepable
        // sandbox's agent) and 6, 7 (the user processes' cgroups). Everything else is
        // close-on-exec.
        let memfd = libc::fcntl(c.memfd, libc::F_DUPFD_CLOEXEC, 10);
        let chan = libc::fcntl(c.channel, libc::F_DUPFD_CLOEXEC, 10);
        let listener = if c.listener >= 0 {
            libc::fcntl(c.listener, libc::F_DUPFD_CLOEXEC, 10)
        } else {
            -1
        };
        let layer = if layer >= 0 {
            libc::fcntl(layer, libc::F_DUPFD_CLOEXEC, 10)
        } else {
            -1
        };
        let mut user_cgroups = [-1; MAX_USER_CGROUPS];
        for (i, &fd) in c.user_cgroups.iter().enumerate() {
            if fd >= 0 {
                user_cgroups[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if user_cgroups[i] < 0 {
                    fail(c, STEP_FDS);
                }
            }
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if memfd < 0
            || chan < 0
            || null < 0
            || (c.plan.layer.is_some() && layer < 0)
            || (c.listener >= 0 && listener < 0)
        {
            fail(c, STEP_FDS);
        }
        if libc::dup2(null, 0) < 0
            || libc::dup2(null, 1) < 0
            || libc::dup2(null, 2) < 0
            || libc::dup2(chan, CHANNEL_FD) < 0
        {
            fail(c, STEP_FDS);
        }
        // Everything from 4 up close-on-exec first; the dup2s below make 4 to 7 inheritable.
        if libc::syscall(
            libc::SYS_close_range,
            (CHANNEL_FD + 1) as u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
            || (layer >= 0 && libc::dup2(layer, rootfs::LAYER_FD) < 0)
            || (listener >= 0 && libc::dup2(listener, LISTENER_FD) < 0)
        {
            fail(c, STEP_FDS);
        }
        for (i, &fd) in user_cgroups.iter().enumerate() {
            if fd >= 0 && libc::dup2(fd, USER_CGROUP_FD + i as RawFd) < 0 {
                fail(c, STEP_FDS);
            }
        }
        // err_write is close-on-exec: a successful exec closes it, which the parent reads as EOF.
        libc::syscall(
            libc::SYS_execveat,
            memfd,
            c"".as_ptr(),
            c.exec.argv(),
            c.exec.envp(),
            libc::AT_EMPTY_PATH,
        );
        fail(c, STEP_EXEC);
    }
}

/// The fd number the agent finds its channel on (`moat_proto::agent_config::AGENT_CHANNEL_FD`).
const CHANNEL_FD: RawFd = 3;
/// The fd number the agent finds its listener on (`moat_proto::agent_config::AGENT_LISTENER_FD`).
const LISTENER_FD: RawFd = 5;
/// The first fd number the agent finds the user processes' `cgroup.procs` files on
/// (`moat_proto::agent_config::AGENT_USER_CGROUP_FD`).
const USER_CGROUP_FD: RawFd = 6;
/// How many user cgroup files a sandbox hands its agent at most (memory and pids on v1).
pub const MAX_USER_CGROUPS: usize = 2;
