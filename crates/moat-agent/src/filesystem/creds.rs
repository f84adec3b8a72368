//! Running file work as the calling user.
//!
//! The agent is root in the sandbox's user namespace. Before touching a file for a request it
//! switches the *current thread's* filesystem credentials (fsuid, fsgid and supplementary groups)
//! to the user's, so the kernel applies that user's permission checks and new files belong to
//! them; afterwards it switches back to root. All three calls are made as raw syscalls: the C
//! library's `setgroups` wrapper changes every thread of the process, the raw syscall only the
//! caller, which is what lets other requests run concurrently as other users.

use std::io;

use crate::rpc::{Code, RpcError};
use crate::users::User;

/// Supplementary groups we pass to the kernel at most (its own limit is 65536).
const MAX_GROUPS: usize = 1024;

/// Whether the kernel has `setfsuid`. gVisor's sentry (the gvisor backend) does not: there the
/// thread's *effective* ids are switched instead (real and saved stay 0, so it can switch back),
/// which the kernel uses for file access the same way, and which also changes the thread alone.
static HAS_FSUID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

fn has_fsuid() -> bool {
    use std::sync::atomic::Ordering;
    if !HAS_FSUID.load(Ordering::Relaxed) {
        return false;
    }
    // SAFETY: setfsuid with an invalid id changes nothing; it only reports the current one.
    let r = unsafe { libc::syscall(libc::SYS_setfsuid, -1 as libc::c_long) };
    if r == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        HAS_FSUID.store(false, Ordering::Relaxed);
        return false;
    }
    true
}

/// Sets this thread's filesystem uid (its effective one where there is no `setfsuid`).
fn set_fsuid(uid: u32) {
    if has_fsuid() {
        // SAFETY: setfsuid takes one integer and cannot fail in a way that corrupts memory.
        unsafe { libc::syscall(libc::SYS_setfsuid, uid as libc::c_long) };
    } else {
        // SAFETY: raw setresuid with integers changes only the calling thread; -1 keeps one.
        unsafe {
            libc::syscall(
                libc::SYS_setresuid,
                -1 as libc::c_long,
                uid as libc::c_long,
                -1 as libc::c_long,
            )
        };
    }
}

/// Sets this thread's filesystem gid (its effective one where there is no `setfsgid`).
fn set_fsgid(gid: u32) {
    if has_fsuid() {
        // SAFETY: as for setfsuid.
        unsafe { libc::syscall(libc::SYS_setfsgid, gid as libc::c_long) };
    } else {
        // SAFETY: as for setresuid.
        unsafe {
            libc::syscall(
                libc::SYS_setresgid,
                -1 as libc::c_long,
                gid as libc::c_long,
                -1 as libc::c_long,
            )
        };
    }
}

/// The current fsuid (or effective uid, see [`set_fsuid`]).
fn current_fsuid() -> u32 {
    if has_fsuid() {
        // SAFETY: an invalid id (-1) changes nothing and returns the current value.
        unsafe { libc::syscall(libc::SYS_setfsuid, -1 as libc::c_long) as u32 }
    } else {
        // SAFETY: geteuid has no preconditions; the raw call reads this thread's.
        unsafe { libc::syscall(libc::SYS_geteuid) as u32 }
    }
}

fn current_fsgid() -> u32 {
    if has_fsuid() {
        // SAFETY: as for current_fsuid.
        unsafe { libc::syscall(libc::SYS_setfsgid, -1 as libc::c_long) as u32 }
    } else {
        // SAFETY: getegid has no preconditions; the raw call reads this thread's.
        unsafe { libc::syscall(libc::SYS_getegid) as u32 }
    }
}

fn set_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a readable slice of gid_t; the raw syscall changes
    // only the calling thread's credentials.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            groups.len() as libc::c_long,
            groups.as_ptr(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn get_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: a size of 0 asks only for the count and writes nothing.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getgroups,
            0 as libc::c_long,
            std::ptr::null_mut::<libc::gid_t>(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0 as libc::gid_t; n as usize];
    // SAFETY: `groups` is writable for `n` entries.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getgroups,
            groups.len() as libc::c_long,
            groups.as_mut_ptr(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(n as usize);
    Ok(groups)
}

/// The thread's credentials as they were before the switch; dropping it restores them.
struct Restore {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<libc::gid_t>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // uid first: back at 0 the kernel gives the thread its capabilities again, which the
        // gid and groups need.
        set_fsuid(self.fsuid);
        set_fsgid(self.fsgid);
        let groups_ok = set_groups(&self.groups).is_ok();
        if current_fsuid() != self.fsuid || current_fsgid() != self.fsgid || !groups_ok {
            // Cannot happen for a process that could switch in the first place. A pool thread
            // left with a user's credentials would run later work with them, so stop here.
            eprintln!("moat-agent: cannot restore thread credentials; aborting");
            std::process::abort();
        }
    }
}

/// Runs `f` on this thread with `user`'s filesystem credentials, then restores the previous ones
/// (also if `f` panics). Meant for a blocking-pool thread: the switch is per thread.
///
/// When the agent is not root it can only act as itself: another user is `permission_denied`.
pub(crate) fn with_user<T>(user: &User, f: impl FnOnce() -> T) -> Result<T, RpcError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        if user.uid == euid {
            return Ok(f());
        }
        return Err(RpcError::new(
            Code::PermissionDenied,
            format!(
                "the agent runs as uid {euid} and cannot act as user '{}' (uid {})",
                user.name, user.uid
            ),
        ));
    }
    let saved = Restore {
        fsuid: current_fsuid(),
        fsgid: current_fsgid(),
        groups: get_groups().map_err(|e| RpcError::from_io(&e, "getgroups"))?,
    };
    let mut groups: Vec<libc::gid_t> = Vec::with_capacity(user.groups.len() + 1);
    for g in std::iter::once(user.gid).chain(user.groups.iter().copied()) {
        if !groups.contains(&g) && groups.len() < MAX_GROUPS {
            groups.push(g);
        }
    }
    // From here on `saved` puts everything back, whatever fails.
    set_groups(&groups).map_err(|e| RpcError::from_io(&e, "setgroups"))?;
    set_fsgid(user.gid);
    set_fsuid(user.uid);
    if current_fsgid() != user.gid || current_fsuid() != user.uid {
        return Err(RpcError::new(
            Code::Internal,
            format!("cannot switch to uid {} gid {}", user.uid, user.gid),
        ));
    }
    let out = f();
    drop(saved);
    Ok(out)
}

/// Runs `f` on the blocking pool as `user` (see [`with_user`]).
pub(crate) async fn blocking_as<T, F>(user: &User, f: F) -> Result<T, RpcError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, RpcError> + Send + 'static,
{
    let user = user.clone();
    tokio::task::spawn_blocking(move || with_user(&user, f))
        .await
        .map_err(|e| RpcError::new(Code::Internal, format!("file task failed: {e}")))?
        .and_then(|r| r)
}
