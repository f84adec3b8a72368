//! seccomp-bpf filters: an allow-list for user code (Docker's default profile is the model) and a
//! deny-list for the agent. Compiled with `seccompiler` before `fork`; installed with one `prctl`.
//!
//! Every syscall user code can make is host-kernel attack surface under the native backend, so the
//! user filter admits only what ordinary programs need and refuses, among others: new namespaces,
//! mounts, `keyctl`, `bpf`, `perf_event_open`, `userfaultfd`, io_uring, module loading, `kexec`,
//! `ptrace`, `process_vm_*`, `open_by_handle_at`, `TIOCSTI`, netfilter netlink and vsock.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::{JailError, Result};

/// Namespace flags a `clone` may not carry.
const NS_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP
    | 0x80) as u64; // CLONE_NEWTIME

const TIOCSTI: u64 = 0x5412;
const TIOCLINUX: u64 = 0x541C;

// Syscall numbers newer than some libc releases name (x86_64).
const SYS_IO_PGETEVENTS: i64 = 333;
const SYS_CLOSE_RANGE: i64 = 436;
const SYS_OPENAT2: i64 = 437;
const SYS_FACCESSAT2: i64 = 439;
const SYS_EPOLL_PWAIT2: i64 = 441;
const SYS_FUTEX_WAITV: i64 = 449;
const SYS_CACHESTAT: i64 = 451;
const SYS_FCHMODAT2: i64 = 452;
const SYS_MAP_SHADOW_STACK: i64 = 453;
const SYS_MSEAL: i64 = 462;

/// Syscalls user code may make without conditions.
#[rustfmt::skip]
const USER_ALLOWED: &[i64] = &[
    libc::SYS_accept, libc::SYS_accept4, libc::SYS_access, libc::SYS_alarm,
    libc::SYS_arch_prctl, libc::SYS_bind, libc::SYS_brk, libc::SYS_capget, libc::SYS_capset,
    libc::SYS_chdir, libc::SYS_chmod, libc::SYS_chown, libc::SYS_clock_getres,
    libc::SYS_clock_gettime, libc::SYS_clock_nanosleep, libc::SYS_close, SYS_CLOSE_RANGE,
    libc::SYS_connect, libc::SYS_copy_file_range, libc::SYS_creat, libc::SYS_dup,
    libc::SYS_dup2, libc::SYS_dup3, libc::SYS_epoll_create, libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl, libc::SYS_epoll_pwait, SYS_EPOLL_PWAIT2, libc::SYS_epoll_wait,
    libc::SYS_eventfd, libc::SYS_eventfd2, libc::SYS_execve, libc::SYS_execveat,
    libc::SYS_exit, libc::SYS_exit_group, libc::SYS_faccessat, SYS_FACCESSAT2,
    libc::SYS_fadvise64, libc::SYS_fallocate, libc::SYS_fchdir, libc::SYS_fchmod,
    libc::SYS_fchmodat, SYS_FCHMODAT2, libc::SYS_fchown, libc::SYS_fchownat, libc::SYS_fcntl,
    libc::SYS_fdatasync, libc::SYS_fgetxattr, libc::SYS_flistxattr, libc::SYS_flock,
    libc::SYS_fork, libc::SYS_fremovexattr, libc::SYS_fsetxattr, libc::SYS_fstat,
    libc::SYS_fstatfs, libc::SYS_fsync, libc::SYS_ftruncate, libc::SYS_futex, SYS_FUTEX_WAITV,
    libc::SYS_futimesat, libc::SYS_getcpu, libc::SYS_getcwd, libc::SYS_getdents,
    libc::SYS_getdents64, libc::SYS_getegid, libc::SYS_geteuid, libc::SYS_getgid,
    libc::SYS_getgroups, libc::SYS_getitimer, libc::SYS_getpeername, libc::SYS_getpgid,
    libc::SYS_getpgrp, libc::SYS_getpid, libc::SYS_getppid, libc::SYS_getpriority,
    libc::SYS_getrandom, libc::SYS_getresgid, libc::SYS_getresuid, libc::SYS_getrlimit,
    libc::SYS_get_robust_list, libc::SYS_getrusage, libc::SYS_getsid, libc::SYS_getsockname,
    libc::SYS_getsockopt, libc::SYS_get_thread_area, libc::SYS_gettid, libc::SYS_gettimeofday,
    libc::SYS_getuid, libc::SYS_getxattr, libc::SYS_get_mempolicy, libc::SYS_inotify_add_watch,
    libc::SYS_inotify_init, libc::SYS_inotify_init1, libc::SYS_inotify_rm_watch,
    libc::SYS_io_cancel, libc::SYS_io_destroy, libc::SYS_io_getevents, SYS_IO_PGETEVENTS,
    libc::SYS_io_setup, libc::SYS_io_submit, libc::SYS_ioprio_get, libc::SYS_ioprio_set,
    libc::SYS_kill, libc::SYS_landlock_add_rule, libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_restrict_self, libc::SYS_lchown, libc::SYS_lgetxattr, libc::SYS_link,
    libc::SYS_linkat, libc::SYS_listen, libc::SYS_listxattr, libc::SYS_llistxattr,
    libc::SYS_lremovexattr, libc::SYS_lseek, libc::SYS_lsetxattr, libc::SYS_lstat,
    libc::SYS_madvise, libc::SYS_mbind, libc::SYS_membarrier, libc::SYS_memfd_create,
    libc::SYS_mincore, libc::SYS_mkdir, libc::SYS_mkdirat, libc::SYS_mknod, libc::SYS_mknodat,
    libc::SYS_mlock, libc::SYS_mlock2, libc::SYS_mlockall, libc::SYS_mmap, libc::SYS_mprotect,
    libc::SYS_mq_getsetattr, libc::SYS_mq_notify, libc::SYS_mq_open, libc::SYS_mq_timedreceive,
    libc::SYS_mq_timedsend, libc::SYS_mq_unlink, libc::SYS_mremap, libc::SYS_msgctl,
    libc::SYS_msgget, libc::SYS_msgrcv, libc::SYS_msgsnd, libc::SYS_msync, libc::SYS_munlock,
    libc::SYS_munlockall, libc::SYS_munmap, libc::SYS_nanosleep, libc::SYS_newfstatat,
    libc::SYS_open, libc::SYS_openat, SYS_OPENAT2, libc::SYS_pause, libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal, libc::SYS_pipe, libc::SYS_pipe2, libc::SYS_pkey_alloc,
    libc::SYS_pkey_free, libc::SYS_pkey_mprotect, libc::SYS_poll, libc::SYS_ppoll,
    libc::SYS_prctl, libc::SYS_pread64, libc::SYS_preadv, libc::SYS_preadv2,
    libc::SYS_prlimit64, libc::SYS_pselect6, libc::SYS_pwrite64, libc::SYS_pwritev,
    libc::SYS_pwritev2, libc::SYS_read, libc::SYS_readahead, libc::SYS_readlink,
    libc::SYS_readlinkat, libc::SYS_readv, libc::SYS_recvfrom, libc::SYS_recvmmsg,
    libc::SYS_recvmsg, libc::SYS_remap_file_pages, libc::SYS_removexattr, libc::SYS_rename,
    libc::SYS_renameat, libc::SYS_renameat2, libc::SYS_restart_syscall, libc::SYS_rmdir,
    libc::SYS_rseq, libc::SYS_rt_sigaction, libc::SYS_rt_sigpending, libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigqueueinfo, libc::SYS_rt_sigreturn, libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait, libc::SYS_rt_tgsigqueueinfo, libc::SYS_sched_getaffinity,
    libc::SYS_sched_getattr, libc::SYS_sched_getparam, libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min, libc::SYS_sched_getscheduler,
    libc::SYS_sched_rr_get_interval, libc::SYS_sched_setaffinity, libc::SYS_sched_setattr,
    libc::SYS_sched_setparam, libc::SYS_sched_setscheduler, libc::SYS_sched_yield,
    libc::SYS_seccomp, libc::SYS_select, libc::SYS_semctl, libc::SYS_semget, libc::SYS_semop,
    libc::SYS_semtimedop, libc::SYS_sendfile, libc::SYS_sendmmsg, libc::SYS_sendmsg,
    libc::SYS_sendto, libc::SYS_set_mempolicy, libc::SYS_setfsgid, libc::SYS_setfsuid,
    libc::SYS_setgid, libc::SYS_setgroups, libc::SYS_setitimer, libc::SYS_setpgid,
    libc::SYS_setpriority, libc::SYS_setregid, libc::SYS_setresgid, libc::SYS_setresuid,
    libc::SYS_setreuid, libc::SYS_setrlimit, libc::SYS_set_robust_list, libc::SYS_setsid,
    libc::SYS_setsockopt, libc::SYS_set_thread_area, libc::SYS_set_tid_address,
    libc::SYS_setuid, libc::SYS_setxattr, libc::SYS_shmat, libc::SYS_shmctl, libc::SYS_shmdt,
    libc::SYS_shmget, libc::SYS_shutdown, libc::SYS_sigaltstack, libc::SYS_signalfd,
    libc::SYS_signalfd4, libc::SYS_socketpair, libc::SYS_splice, libc::SYS_stat,
    libc::SYS_statfs, libc::SYS_statx, libc::SYS_symlink, libc::SYS_symlinkat, libc::SYS_sync,
    libc::SYS_sync_file_range, libc::SYS_syncfs, libc::SYS_sysinfo, libc::SYS_tee,
    libc::SYS_tgkill, libc::SYS_time, libc::SYS_timer_create, libc::SYS_timer_delete,
    libc::SYS_timer_getoverrun, libc::SYS_timer_gettime, libc::SYS_timer_settime,
    libc::SYS_timerfd_create, libc::SYS_timerfd_gettime, libc::SYS_timerfd_settime,
    libc::SYS_times, libc::SYS_tkill, libc::SYS_truncate, libc::SYS_umask, libc::SYS_uname,
    libc::SYS_unlink, libc::SYS_unlinkat, libc::SYS_utime, libc::SYS_utimensat,
    libc::SYS_utimes, libc::SYS_vfork, libc::SYS_vmsplice, libc::SYS_wait4, libc::SYS_waitid,
    libc::SYS_write, libc::SYS_writev, SYS_CACHESTAT, SYS_MAP_SHADOW_STACK, SYS_MSEAL,
    // clone3 is listed so the second filter can answer ENOSYS for it (see `user_filters`).
    libc::SYS_clone3,
];

/// Syscalls the agent never needs and that widen the host kernel's attack surface.
#[rustfmt::skip]
const AGENT_DENIED: &[i64] = &[
    libc::SYS_add_key, libc::SYS_bpf, libc::SYS_delete_module, libc::SYS_finit_module,
    libc::SYS_init_module, libc::SYS_io_uring_enter, libc::SYS_io_uring_register,
    libc::SYS_io_uring_setup, libc::SYS_kexec_file_load, libc::SYS_kexec_load, libc::SYS_keyctl,
    libc::SYS_open_by_handle_at, libc::SYS_name_to_handle_at, libc::SYS_perf_event_open,
    libc::SYS_process_vm_readv, libc::SYS_process_vm_writev, libc::SYS_ptrace,
    libc::SYS_request_key, libc::SYS_userfaultfd, libc::SYS_setns, libc::SYS_unshare,
    libc::SYS_mount, libc::SYS_umount2, libc::SYS_pivot_root, libc::SYS_swapon,
    libc::SYS_swapoff, libc::SYS_reboot, libc::SYS_syslog, libc::SYS_acct,
];

fn cond(arg: u8, len: Len, op: Op, value: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, len, op, value).map_err(|e| JailError::Seccomp(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule> {
    SeccompRule::new(conds).map_err(|e| JailError::Seccomp(e.to_string()))
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| JailError::Seccomp(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| JailError::Seccomp(e.to_string()))
}

/// The user-code filters, to be installed in order.
///
/// The first is the allow-list (anything else fails with `EPERM`). The second answers `ENOSYS` for
/// `clone3`, whose flags live in memory a filter cannot read, so the C library falls back to `clone`,
/// whose flags the first filter does check.
pub fn user_filters() -> Result<Vec<BpfProgram>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        USER_ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // clone without namespace flags.
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(0, Len::Qword, Op::MaskedEq(NS_FLAGS), 0)?])?],
    );
    // ioctl except terminal injection.
    rules.insert(
        libc::SYS_ioctl,
        vec![rule(vec![
            cond(1, Len::Dword, Op::Ne, TIOCSTI)?,
            cond(1, Len::Dword, Op::Ne, TIOCLINUX)?,
        ])?],
    );
    // personality: only the harmless values Docker admits (no READ_IMPLIES_EXEC).
    rules.insert(
        libc::SYS_personality,
        [0u64, 0x8, 0x20000, 0x20008, 0xffff_ffff]
            .iter()
            .map(|&v| rule(vec![cond(0, Len::Dword, Op::Eq, v)?]))
            .collect::<Result<_>>()?,
    );
    // socket: unix, inet, inet6, and route netlink only (no netfilter netlink, packet or vsock).
    let mut socket_rules = Vec::new();
    for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6] {
        socket_rules.push(rule(vec![cond(0, Len::Dword, Op::Eq, family as u64)?])?);
    }
    socket_rules.push(rule(vec![
        cond(0, Len::Dword, Op::Eq, libc::AF_NETLINK as u64)?,
        cond(2, Len::Dword, Op::Eq, libc::NETLINK_ROUTE as u64)?,
    ])?);
    rules.insert(libc::SYS_socket, socket_rules);

    let allow = compile(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    )?;
    let clone3 = compile(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    Ok(vec![allow, clone3])
}

/// The agent's filter: everything except [`AGENT_DENIED`], and `clone` with a new user namespace.
pub fn agent_filter() -> Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        AGENT_DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            Len::Qword,
            Op::MaskedEq(libc::CLONE_NEWUSER as u64),
            libc::CLONE_NEWUSER as u64,
        )?])?],
    );
    compile(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
    )
}

/// Installs `prog` on the calling thread. Needs `no_new_privs` (or `CAP_SYS_ADMIN`).
/// Async-signal-safe: no allocation.
pub fn install(prog: &BpfProgram) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        // seccompiler's sock_filter has the kernel's layout (u16, u8, u8, u32).
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at `prog`, which outlives the call; the kernel copies the program.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
            0,
            0,
        )
    };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Installs `prog` on every thread of the calling process (`SECCOMP_FILTER_FLAG_TSYNC`).
pub fn install_all_threads(prog: &BpfProgram) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at `prog`, which outlives the call; the kernel copies the program.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let user = user_filters().expect("user filters");
        assert_eq!(user.len(), 2);
        assert!(!user[0].is_empty());
        assert!(!agent_filter().expect("agent filter").is_empty());
    }

    #[test]
    fn allow_list_has_no_duplicates_and_no_dangerous_calls() {
        let mut seen = std::collections::BTreeSet::new();
        for nr in USER_ALLOWED {
            assert!(seen.insert(*nr), "syscall {nr} listed twice");
            assert!(
                !AGENT_DENIED.contains(nr),
                "syscall {nr} is both allowed and denied"
            );
        }
    }
}
