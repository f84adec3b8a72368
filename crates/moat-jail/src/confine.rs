//! What a user process goes through between `fork` and `exec` inside a sandbox: its identity,
//! an empty capability set, rlimits, `no_new_privs`, landlock and seccomp.
//!
//! [`ConfinePlan::prepare`] does everything that allocates or reads files, once; the plan is then
//! reused for every process. [`ConfinePlan::apply`] runs in the forked child and makes raw system
//! calls only, so it is safe after `fork` in a multi-threaded parent.

use std::io;
use std::path::Path;

use crate::landlock::Ruleset;
use crate::{Result, caps, seccomp};

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id (inside the sandbox's user namespace).
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Per-process resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimits {
    /// `RLIMIT_NOFILE`.
    pub nofile: u64,
    /// `RLIMIT_FSIZE` in bytes.
    pub fsize: u64,
    /// `RLIMIT_NPROC`.
    pub nproc: u64,
}

/// Everything prepared for confining user processes; see the module documentation.
#[derive(Debug)]
pub struct ConfinePlan {
    identity: Identity,
    groups: Vec<libc::gid_t>,
    rlimits: Rlimits,
    filter: seccomp::Program,
    landlock: Option<Ruleset>,
    /// The capabilities in the bounding set when the plan was made: all a process could hold.
    bounding: u64,
}

impl ConfinePlan {
    /// Prepares a plan for `identity` with `rlimits`. `landlock_root` is the tree the landlock
    /// ruleset describes (the sandbox's `/`); `None` skips landlock.
    pub fn prepare(
        identity: Identity,
        rlimits: Rlimits,
        landlock_root: Option<&Path>,
    ) -> Result<ConfinePlan> {
        let landlock = match landlock_root {
            Some(root) => Ruleset::for_user_code(root)?,
            None => None,
        };
        Ok(ConfinePlan {
            groups: identity.groups.clone(),
            identity,
            rlimits,
            filter: seccomp::user_filter()?,
            landlock,
            bounding: caps::bounding_set(caps::last_cap()),
        })
    }

    /// The identity processes get.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether a landlock ruleset is applied.
    pub fn has_landlock(&self) -> bool {
        self.landlock.is_some()
    }

    /// Confines the calling (freshly forked, single-threaded) process. Async-signal-safe.
    pub fn apply(&self) -> io::Result<()> {
        let id = &self.identity;
        // SAFETY: groups is a valid slice of gid_t for the duration of the call. The raw syscall
        // (not the libc wrapper) changes only this thread, which is the whole child process.
        check(unsafe {
            libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr())
        })?;
        // SAFETY: integer arguments only.
        check(unsafe { libc::syscall(libc::SYS_setresgid, id.gid, id.gid, id.gid) })?;
        caps::drop_bounding(self.bounding)?;
        caps::clear_ambient()?;
        for (resource, value) in [
            (libc::RLIMIT_NOFILE, self.rlimits.nofile),
            (libc::RLIMIT_FSIZE, self.rlimits.fsize),
            (libc::RLIMIT_NPROC, self.rlimits.nproc),
            (libc::RLIMIT_CORE, 0),
        ] {
            let lim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            // SAFETY: lim is a valid rlimit for the duration of the call.
            if unsafe { libc::setrlimit(resource, &lim) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: integer arguments only.
        check(unsafe { libc::syscall(libc::SYS_setresuid, id.uid, id.uid, id.uid) })?;
        caps::clear_all()?;
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(ruleset) = &self.landlock {
            ruleset.restrict_self()?;
        }
        seccomp::install(&self.filter)
    }
}

fn check(ret: libc::c_long) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
