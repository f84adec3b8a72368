//! A small cleanup process that outlives its parent: when the parent goes away for any reason
//! (SIGKILL included), it kills every process in a sandbox's cgroups and removes them. `moat run`
//! uses it so that killing the command never leaves a sandbox behind.
//!
//! It is started after the sandbox's cgroups exist and before the sandbox starts, so no moment is
//! left uncovered. The parent holds the write end of a pipe; the guardian blocks reading it and
//! acts on EOF.
//!
//! The guardian is a `clone(CLONE_VM)` of its parent on a stack of its own: it shares the
//! parent's memory, so starting it copies no page tables and costs the parent no copy-on-write
//! faults afterwards (a `fork` cost both, on the path of every `moat run`), and it needs no
//! program of its own (an exec costs more still). Sharing memory with a running parent bounds
//! what it may do: it reads only its [`Plan`] and its stack, which the parent frees only after
//! reaping it, and it makes system calls directly ([`raw`]), never through libc, whose wrappers
//! would write `errno` in the parent thread's storage. When the parent exits, the memory stays
//! for as long as the guardian runs. One thing it cannot survive: the OOM killer kills every
//! process sharing its victim's memory, so a parent killed for memory takes its guardian along.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use crate::stack::ChildStack;
use crate::sys::cvt_int;
use crate::{JailError, Result};

/// Room for the guardian's calls (a 4 KiB read buffer is the largest frame).
const STACK: usize = 64 << 10;

/// The parent's handle on its guardian.
#[derive(Debug)]
pub struct Guardian {
    pid: i32,
    pipe: Option<OwnedFd>,
    /// Read by the guardian until it exits: freed only after it is reaped.
    _plan: Box<Plan>,
    /// The guardian's stack: unmapped only after it is reaped.
    _stack: ChildStack,
}

/// What the guardian needs, all prepared before `clone`.
#[derive(Debug)]
struct Plan {
    read_end: RawFd,
    null: RawFd,
    kill_files: Vec<CString>,
    procs_files: Vec<CString>,
    dirs: Vec<CString>,
    /// The fds it keeps open, sorted.
    keep: Vec<RawFd>,
}

fn c(p: &std::path::Path) -> Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| JailError::Invalid(format!("path contains NUL: {}", p.display())))
}

impl Guardian {
    /// Starts a guardian for the cgroup directories `dirs` (deepest last is fine; each is removed
    /// after its processes are gone). `keep` are fds the guardian must hold until it is done
    /// (the uid-range lock).
    pub fn spawn(dirs: &[PathBuf], keep: &[RawFd]) -> Result<Guardian> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        cvt_int(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })
            .map_err(|e| JailError::os("pipe2", e))?;
        // SAFETY: pipe2 returned two fresh fds that we own.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let null = OwnedFd::from(
            std::fs::File::open("/dev/null").map_err(|e| JailError::os("open /dev/null", e))?,
        );
        let mut kill_files = Vec::new();
        let mut procs_files = Vec::new();
        for d in dirs {
            if d.join("cgroup.kill").exists() {
                kill_files.push(c(&d.join("cgroup.kill"))?);
            }
            procs_files.push(c(&d.join("cgroup.procs"))?);
        }
        let mut keep: Vec<RawFd> = keep.to_vec();
        keep.push(read_end.as_raw_fd());
        keep.push(null.as_raw_fd());
        keep.sort_unstable();
        let plan = Box::new(Plan {
            read_end: read_end.as_raw_fd(),
            null: null.as_raw_fd(),
            kill_files,
            procs_files,
            dirs: dirs.iter().map(|d| c(d)).collect::<Result<_>>()?,
            keep,
        });
        let stack = ChildStack::new(STACK, "the guardian's stack")?;
        // SAFETY: the child runs `guardian_entry` on `stack`, in our memory (CLONE_VM): it reads
        // `plan`, which the returned `Guardian` owns and frees, with `stack`, only after reaping
        // it; it makes raw system calls only and never returns.
        let pid = unsafe {
            libc::clone(
                guardian_entry,
                stack.top(),
                libc::CLONE_VM | libc::SIGCHLD,
                (&raw const *plan).cast_mut().cast(),
            )
        };
        if pid < 0 {
            return Err(JailError::last_os("start guardian"));
        }
        // The guardian has its own copies of these; ours would only keep the pipe open.
        drop((read_end, null));
        Ok(Guardian {
            pid,
            pipe: Some(write_end),
            _plan: plan,
            _stack: stack,
        })
    }

    /// Tells the guardian to clean up now (idempotent with the parent's own cleanup) and waits
    /// for it to finish.
    pub fn finish(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if self.pipe.take().is_some() {
            let mut status = 0;
            // SAFETY: waiting for our own child with a valid status pointer.
            while unsafe { libc::waitpid(self.pid, &mut status, 0) } < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
            {
            }
        }
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        // Waits before the plan and stack go: the guardian reads both until it exits.
        self.end();
    }
}

/// `clone`'s entry point for the guardian.
extern "C" fn guardian_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's boxed `Plan`, alive until this process has been reaped.
    let plan = unsafe { &*arg.cast::<Plan>() };
    guardian_main(plan)
}

fn guardian_main(p: &Plan) -> ! {
    // Its own session: a terminal's signals (Ctrl-C, hang-up) are not for it.
    raw::setsid();
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGPIPE,
    ] {
        raw::ignore_signal(sig);
    }
    raw::set_name(c"moat-guardian");
    // Standard streams to /dev/null, so a caller waiting for our parent's output to end is not
    // held up by us; every other fd but the ones we need is closed.
    for std_fd in 0..3 {
        if !p.keep.contains(&std_fd) {
            raw::dup_to(p.null, std_fd);
        }
    }
    let mut from: u32 = 3;
    for &fd in &p.keep {
        let fd = fd as u32;
        if fd > from {
            raw::close_range(from, fd - 1);
        }
        if fd + 1 > from {
            from = fd + 1;
        }
    }
    raw::close_range(from, u32::MAX);

    let mut b = 0u8;
    loop {
        match raw::read(p.read_end, std::slice::from_mut(&mut b)) {
            n if n > 0 => {}
            n if n == -(libc::EINTR as isize) => {}
            _ => break,
        }
    }

    for f in &p.kill_files {
        let fd = raw::open(f, libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            raw::write(fd as RawFd, b"1");
            raw::close(fd as RawFd);
        }
    }
    // Without cgroup.kill: SIGKILL every listed pid until the cgroups are empty (2 s at most).
    for _ in 0..400 {
        let mut any = false;
        for f in &p.procs_files {
            any |= kill_listed(f);
        }
        if !any {
            break;
        }
        raw::sleep_ms(5);
    }
    for d in p.dirs.iter().rev() {
        for _ in 0..400 {
            let r = raw::rmdir(d);
            if r == 0 || r == -(libc::ENOENT as isize) {
                break;
            }
            raw::sleep_ms(5);
        }
    }
    raw::exit(0)
}

/// SIGKILLs every pid in a `cgroup.procs` file; returns whether there was any.
fn kill_listed(procs: &CString) -> bool {
    let mut buf = [0u8; 4096];
    let fd = raw::open(procs, libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return false;
    }
    let n = raw::read(fd as RawFd, &mut buf);
    raw::close(fd as RawFd);
    if n <= 0 {
        return false;
    }
    let mut any = false;
    let mut pid: i32 = 0;
    for &b in &buf[..n as usize] {
        if b.is_ascii_digit() {
            pid = pid.saturating_mul(10).saturating_add(i32::from(b - b'0'));
        } else {
            if pid > 0 {
                raw::kill(pid, libc::SIGKILL);
                any = true;
            }
            pid = 0;
        }
    }
    any
}

/// System calls made directly, without libc: results are the kernel's (negative errno on
/// failure), and nothing is written to `errno`, which for a `CLONE_VM` child is its parent
/// thread's.
mod raw {
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    compile_error!("the guardian's direct system calls are written for x86-64 and AArch64");

    use std::ffi::CStr;
    use std::os::fd::RawFd;

    /// Makes system call `n` with six arguments.
    ///
    /// # Safety
    /// The arguments must be valid for the call `n` (pointers to live memory of the right size).
    #[cfg(target_arch = "x86_64")]
    unsafe fn call(n: libc::c_long, a: [usize; 6]) -> isize {
        let ret: isize;
        // SAFETY: the x86-64 Linux system call convention; the kernel clobbers rcx and r11 only.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") n as isize => ret,
                in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
                in("r10") a[3], in("r8") a[4], in("r9") a[5],
                lateout("rcx") _, lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    /// Makes system call `n` with six arguments.
    ///
    /// # Safety
    /// The arguments must be valid for the call `n` (pointers to live memory of the right size).
    #[cfg(target_arch = "aarch64")]
    unsafe fn call(n: libc::c_long, a: [usize; 6]) -> isize {
        let ret: isize;
        // SAFETY: the AArch64 Linux system call convention; the result replaces x0.
        unsafe {
            std::arch::asm!(
                "svc 0",
                inlateout("x0") a[0] as isize => ret,
                in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
                in("x8") n,
                options(nostack),
            );
        }
        ret
    }

    pub(super) fn setsid() {
        // SAFETY: no arguments.
        unsafe { call(libc::SYS_setsid, [0; 6]) };
    }

    /// Sets `sig`'s disposition to ignored (which needs no handler or restorer).
    pub(super) fn ignore_signal(sig: libc::c_int) {
        // The kernel's struct sigaction: handler, flags, restorer, mask.
        let act: [usize; 4] = [libc::SIG_IGN, 0, 0, 0];
        // SAFETY: `act` is a valid kernel sigaction; no old action is asked for; the mask is
        // 8 bytes.
        unsafe {
            call(
                libc::SYS_rt_sigaction,
                [sig as usize, act.as_ptr() as usize, 0, 8, 0, 0],
            )
        };
    }

    /// Names the process (its `comm`), so `ps` tells it from its parent.
    pub(super) fn set_name(name: &CStr) {
        // SAFETY: a valid C string.
        unsafe {
            call(
                libc::SYS_prctl,
                [
                    libc::PR_SET_NAME as usize,
                    name.as_ptr() as usize,
                    0,
                    0,
                    0,
                    0,
                ],
            )
        };
    }

    /// `dup2`, which AArch64 lacks: `dup3` refuses equal fds, which need nothing done.
    pub(super) fn dup_to(fd: RawFd, to: RawFd) {
        if fd != to {
            // SAFETY: integer arguments.
            unsafe { call(libc::SYS_dup3, [fd as usize, to as usize, 0, 0, 0, 0]) };
        }
    }

    pub(super) fn close_range(from: u32, to: u32) {
        // SAFETY: integer arguments.
        unsafe {
            call(
                libc::SYS_close_range,
                [from as usize, to as usize, 0, 0, 0, 0],
            )
        };
    }

    pub(super) fn read(fd: RawFd, buf: &mut [u8]) -> isize {
        // SAFETY: `buf` is valid for writes of its length.
        unsafe {
            call(
                libc::SYS_read,
                [fd as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0, 0],
            )
        }
    }

    pub(super) fn write(fd: RawFd, buf: &[u8]) -> isize {
        // SAFETY: `buf` is valid for reads of its length.
        unsafe {
            call(
                libc::SYS_write,
                [fd as usize, buf.as_ptr() as usize, buf.len(), 0, 0, 0],
            )
        }
    }

    pub(super) fn open(path: &CStr, flags: libc::c_int) -> isize {
        // SAFETY: a valid C string.
        unsafe {
            call(
                libc::SYS_openat,
                [
                    libc::AT_FDCWD as usize,
                    path.as_ptr() as usize,
                    flags as usize,
                    0,
                    0,
                    0,
                ],
            )
        }
    }

    pub(super) fn close(fd: RawFd) {
        // SAFETY: integer argument.
        unsafe { call(libc::SYS_close, [fd as usize, 0, 0, 0, 0, 0]) };
    }

    pub(super) fn kill(pid: i32, sig: libc::c_int) {
        // SAFETY: integer arguments.
        unsafe { call(libc::SYS_kill, [pid as usize, sig as usize, 0, 0, 0, 0]) };
    }

    pub(super) fn rmdir(path: &CStr) -> isize {
        // SAFETY: a valid C string.
        unsafe {
            call(
                libc::SYS_unlinkat,
                [
                    libc::AT_FDCWD as usize,
                    path.as_ptr() as usize,
                    libc::AT_REMOVEDIR as usize,
                    0,
                    0,
                    0,
                ],
            )
        }
    }

    pub(super) fn sleep_ms(ms: i64) {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: ms * 1_000_000,
        };
        // SAFETY: `ts` is a valid timespec; no remainder is asked for.
        unsafe { call(libc::SYS_nanosleep, [&raw const ts as usize, 0, 0, 0, 0, 0]) };
    }

    pub(super) fn exit(code: i32) -> ! {
        loop {
            // SAFETY: ends this process (not the parent: CLONE_VM without CLONE_THREAD).
            unsafe { call(libc::SYS_exit, [code as usize, 0, 0, 0, 0, 0]) };
        }
    }
}
