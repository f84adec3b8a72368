//! A small cleanup process that outlives its parent: when the parent goes away for any reason
//! (SIGKILL included), it kills every process in a sandbox's cgroups and removes them. `moat run`
//! uses it so that killing the command never leaves a sandbox behind.
//!
//! It is forked after the sandbox's cgroups exist and before the sandbox starts, so no moment is
//! left uncovered. The parent holds the write end of a pipe; the guardian blocks reading it and
//! acts on EOF. Between `fork` and `_exit` it makes raw system calls only.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use crate::sys::cvt_int;
use crate::{JailError, Result};

/// The parent's handle on its guardian.
#[derive(Debug)]
pub struct Guardian {
    pid: i32,
    pipe: Option<OwnedFd>,
}

struct Plan {
    read_end: RawFd,
    null: RawFd,
    kill_files: Vec<CString>,
    procs_files: Vec<CString>,
    dirs: Vec<CString>,
    keep: Vec<RawFd>,
}

fn c(p: &std::path::Path) -> Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| JailError::Invalid(format!("path contains NUL: {}", p.display())))
}

impl Guardian {
    /// Forks a guardian for the cgroup directories `dirs` (deepest last is fine; each is removed
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
        let null =
            std::fs::File::open("/dev/null").map_err(|e| JailError::os("open /dev/null", e))?;
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
        let plan = Plan {
            read_end: read_end.as_raw_fd(),
            null: null.as_raw_fd(),
            kill_files,
            procs_files,
            dirs: dirs.iter().map(|d| c(d)).collect::<Result<_>>()?,
            keep,
        };
        // SAFETY: the child runs `guardian_main`, which makes raw system calls only and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            guardian_main(&plan);
        }
        if pid < 0 {
            return Err(JailError::last_os("fork guardian"));
        }
        Ok(Guardian {
            pid,
            pipe: Some(write_end),
        })
    }

    /// Tells the guardian to clean up now (idempotent with the parent's own cleanup) and waits
    /// for it to finish.
    pub fn finish(mut self) {
        self.pipe.take();
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        if self.pipe.take().is_some() {
            let mut status = 0;
            // SAFETY: waiting for our own child with a valid status pointer.
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
        }
    }
}

fn guardian_main(p: &Plan) -> ! {
    // SAFETY: for every call below, raw system calls on fds, paths and buffers prepared before
    // fork; no allocation, no locks, no destructors.
    unsafe {
        libc::setsid();
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        // Standard streams to /dev/null, so a caller waiting for our parent's output to end is
        // not held up by us; every other fd but the ones we need is closed.
        libc::dup2(p.null, 0);
        libc::dup2(p.null, 1);
        libc::dup2(p.null, 2);
        let mut from: u32 = 3;
        for &fd in &p.keep {
            let fd = fd as u32;
            if fd > from {
                libc::syscall(libc::SYS_close_range, from, fd - 1, 0);
            }
            if fd + 1 > from {
                from = fd + 1;
            }
        }
        libc::syscall(libc::SYS_close_range, from, u32::MAX, 0);

        let mut b = 0u8;
        while libc::read(p.read_end, (&mut b as *mut u8).cast(), 1) > 0 {}

        for f in &p.kill_files {
            let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, b"1".as_ptr().cast(), 1);
                libc::close(fd);
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
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 5_000_000,
            };
            libc::nanosleep(&ts, std::ptr::null_mut());
        }
        for d in p.dirs.iter().rev() {
            for _ in 0..400 {
                if libc::rmdir(d.as_ptr()) == 0 || *libc::__errno_location() == libc::ENOENT {
                    break;
                }
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 5_000_000,
                };
                libc::nanosleep(&ts, std::ptr::null_mut());
            }
        }
        libc::_exit(0);
    }
}

/// SIGKILLs every pid in a `cgroup.procs` file; returns whether there was any. Async-signal-safe.
fn kill_listed(procs: &CString) -> bool {
    let mut buf = [0u8; 4096];
    // SAFETY: raw open/read/close into a stack buffer.
    let n = unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
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
                // SAFETY: kill with integer arguments.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                any = true;
            }
            pid = 0;
        }
    }
    any
}
