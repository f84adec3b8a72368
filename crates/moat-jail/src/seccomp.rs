//! seccomp-bpf filters: an allow-list for user code (Docker's default profile is the model) and a
//! deny-list for the agent. This module is the policy; [`crate::bpf`] generates the code. Each is
//! one program, compiled before `fork` and installed with one `prctl`.
//!
//! Every syscall user code can make is host-kernel attack surface under the native backend, so the
//! user filter admits only what ordinary programs need and refuses, among others: new namespaces,
//! mounts, `keyctl`, `bpf`, `perf_event_open`, `userfaultfd`, io_uring and kernel AIO, module
//! loading, `kexec`, `ptrace`, `process_vm_*`, `open_by_handle_at`, `TIOCSTI`, netfilter netlink
//! and vsock.

use std::collections::BTreeMap;
use std::io;

pub use crate::bpf::Program;
use crate::bpf::{Block, Field, Test, dispatch};
use crate::{JailError, Result};

/// Namespace flags a `clone` may not carry. All in the low 32 bits, the only ones the kernel reads:
/// legacy `clone` takes `lower_32_bits(clone_flags)` (kernel/fork.c), so the high half cannot
/// carry a flag and the filter need not look at it.
const NS_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP
    | 0x80) as u64; // CLONE_NEWTIME

const _: () = assert!(NS_FLAGS >> 32 == 0);

const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541C;

/// `AUDIT_ARCH_X86_64`: `EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`.
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// `__X32_SYSCALL_BIT`: x32 syscalls arrive with `AUDIT_ARCH_X86_64` and this bit in the number,
/// so without a check they would slip past a table keyed by x86_64 numbers.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const RET_ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const RET_KILL_PROCESS: u32 = libc::SECCOMP_RET_KILL_PROCESS;

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

/// Syscalls user code may make without conditions. `clone`, `clone3`, `ioctl`, `personality` and
/// `socket` have their own rules in [`user_filter`].
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
    libc::SYS_ioprio_get, libc::SYS_ioprio_set,
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
];

/// Kernel AIO, which user code gets `ENOSYS` for (see [`user_filter`]).
const AIO_SYSCALLS: [i64; 6] = [
    libc::SYS_io_setup,
    libc::SYS_io_destroy,
    libc::SYS_io_submit,
    libc::SYS_io_cancel,
    libc::SYS_io_getevents,
    SYS_IO_PGETEVENTS,
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
    // The new mount API: everything `mount` could do, by other numbers.
    libc::SYS_open_tree, libc::SYS_move_mount, libc::SYS_fsopen, libc::SYS_fsconfig,
    libc::SYS_fsmount, libc::SYS_fspick, libc::SYS_mount_setattr,
];

fn errno(code: i32) -> Block {
    Block::ret(libc::SECCOMP_RET_ERRNO | (code as u32 & libc::SECCOMP_RET_DATA))
}

/// Adds `nr → block` to `table`, refusing a number that already has a rule (a syscall listed
/// twice would otherwise get whichever rule came last).
fn add(table: &mut BTreeMap<u32, Block>, nr: i64, block: Block) -> Result<()> {
    let key = u32::try_from(nr).map_err(|_| JailError::Seccomp(format!("syscall {nr}")))?;
    if table.insert(key, block).is_some() {
        return Err(JailError::Seccomp(format!("syscall {nr} has two rules")));
    }
    Ok(())
}

/// The whole program: a foreign architecture is killed (its numbers mean other calls), the x32
/// ABI gets `x32`, and x86_64 numbers go through `table`, with `default` for the rest.
fn program(table: BTreeMap<u32, Block>, default: Block, x32: Block) -> Result<Program> {
    let table: Vec<(u32, Block)> = table.into_iter().collect();
    let native = Block::load(
        Field::Nr,
        Block::branch(
            Test::AnySet(X32_SYSCALL_BIT),
            x32,
            dispatch(&table, &default),
        ),
    );
    Program::new(Block::load(
        Field::Arch,
        Block::branch(
            Test::Eq(AUDIT_ARCH_X86_64),
            native,
            Block::ret(RET_KILL_PROCESS),
        ),
    ))
}

/// The user-code filter: `USER_ALLOWED` and the argument rules below; anything else fails with
/// `EPERM`.
///
/// `clone3` fails with `ENOSYS`: its flags live in memory a filter cannot read, so the C library
/// falls back to `clone`, whose flags the filter does check.
///
/// The argument rules compare only the low 32 bits where the kernel's parameter is 32 bits wide
/// (`ioctl`'s `unsigned int cmd`, `personality`'s `unsigned int`, `socket`'s `int`s): the syscall
/// entry truncates those arguments, so the high half cannot change what the kernel does.
pub fn user_filter() -> Result<Program> {
    let allow = Block::ret(RET_ALLOW);
    let eperm = errno(libc::EPERM);
    let mut table = BTreeMap::new();
    for &nr in USER_ALLOWED {
        add(&mut table, nr, allow.clone())?;
    }
    add(&mut table, libc::SYS_clone3, errno(libc::ENOSYS))?;
    // Kernel AIO contexts come from one host-wide pool (`fs.aio-max-nr`) that a single
    // `io_setup` can drain, with no per-cgroup limit; as on a kernel built without AIO, programs
    // fall back to threads.
    for nr in AIO_SYSCALLS {
        add(&mut table, nr, errno(libc::ENOSYS))?;
    }
    // clone without namespace flags.
    add(
        &mut table,
        libc::SYS_clone,
        Block::arg_any_set(0, NS_FLAGS, eperm.clone(), allow.clone()),
    )?;
    // ioctl except terminal injection.
    add(
        &mut table,
        libc::SYS_ioctl,
        Block::load(
            Field::ArgLow(1),
            Block::one_of(&[TIOCSTI, TIOCLINUX], eperm.clone(), allow.clone()),
        ),
    )?;
    // personality: only the harmless values Docker admits (no READ_IMPLIES_EXEC); 0xffffffff
    // only queries.
    add(
        &mut table,
        libc::SYS_personality,
        Block::load(
            Field::ArgLow(0),
            Block::one_of(
                &[0, 0x8, 0x20000, 0x20008, 0xffff_ffff],
                allow.clone(),
                eperm.clone(),
            ),
        ),
    )?;
    // socket: unix, inet, inet6, and route netlink only (no netfilter netlink, packet or vsock).
    let route_netlink = Block::load(
        Field::ArgLow(2),
        Block::one_of(&[libc::NETLINK_ROUTE as u32], allow.clone(), eperm.clone()),
    );
    add(
        &mut table,
        libc::SYS_socket,
        Block::load(
            Field::ArgLow(0),
            Block::one_of(
                &[
                    libc::AF_UNIX as u32,
                    libc::AF_INET as u32,
                    libc::AF_INET6 as u32,
                ],
                allow,
                Block::one_of(&[libc::AF_NETLINK as u32], route_netlink, eperm.clone()),
            ),
        ),
    )?;
    program(table, eperm.clone(), eperm)
}

/// The agent's filter: everything except `AGENT_DENIED` and `clone` with a new user namespace,
/// which fail with `EPERM` (as do x32 calls, which would otherwise bypass the list). `clone3`
/// fails with `ENOSYS`, as for user code, so that no user namespace can be made through it
/// either; the C library then creates threads with `clone`.
pub fn agent_filter() -> Result<Program> {
    let allow = Block::ret(RET_ALLOW);
    let eperm = errno(libc::EPERM);
    let mut table = BTreeMap::new();
    for &nr in AGENT_DENIED {
        add(&mut table, nr, eperm.clone())?;
    }
    add(&mut table, libc::SYS_clone3, errno(libc::ENOSYS))?;
    // The agent needs no kernel AIO either (see `user_filter`).
    for nr in AIO_SYSCALLS {
        add(&mut table, nr, errno(libc::ENOSYS))?;
    }
    add(
        &mut table,
        libc::SYS_clone,
        Block::arg_any_set(0, libc::CLONE_NEWUSER as u64, eperm.clone(), allow.clone()),
    )?;
    program(table, allow, eperm)
}

/// Installs `prog` on the calling thread. Needs `no_new_privs` (or `CAP_SYS_ADMIN`).
/// Async-signal-safe: no allocation.
pub fn install(prog: &Program) -> io::Result<()> {
    let fprog = fprog(prog);
    // SAFETY: fprog points at `prog`'s instructions, which outlive the call; the kernel copies
    // the program.
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
pub fn install_all_threads(prog: &Program) -> io::Result<()> {
    let fprog = fprog(prog);
    // SAFETY: fprog points at `prog`'s instructions, which outlive the call; the kernel copies
    // the program.
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

fn fprog(prog: &Program) -> libc::sock_fprog {
    let insns = prog.instructions();
    libc::sock_fprog {
        // Program::new caps the length at BPF_MAXINSNS, which fits.
        len: insns.len() as u16,
        // The kernel only reads through this pointer.
        filter: insns.as_ptr().cast_mut(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::interp::{Data, run};

    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    const HIGH: u64 = 0xffff_ffff_0000_0000;

    /// Every namespace flag, one at a time.
    const NS_EACH: &[u64] = &[
        libc::CLONE_NEWNS as u64,
        libc::CLONE_NEWUTS as u64,
        libc::CLONE_NEWIPC as u64,
        libc::CLONE_NEWUSER as u64,
        libc::CLONE_NEWPID as u64,
        libc::CLONE_NEWNET as u64,
        libc::CLONE_NEWCGROUP as u64,
        0x80,
    ];

    /// What the user policy says, written from its description rather than from the generator.
    fn user_policy(d: &Data) -> u32 {
        if d.arch != AUDIT_ARCH_X86_64 {
            return RET_KILL_PROCESS;
        }
        let nr = i64::from(d.nr);
        let low = |i: usize| d.args[i] as u32;
        let allowed = if d.nr & X32_SYSCALL_BIT != 0 {
            false
        } else if nr == libc::SYS_clone3 || AIO_SYSCALLS.contains(&nr) {
            return ENOSYS;
        } else if nr == libc::SYS_clone {
            d.args[0] & NS_FLAGS == 0
        } else if nr == libc::SYS_ioctl {
            low(1) != TIOCSTI && low(1) != TIOCLINUX
        } else if nr == libc::SYS_personality {
            [0, 0x8, 0x20000, 0x20008, 0xffff_ffff].contains(&low(0))
        } else if nr == libc::SYS_socket {
            let family = low(0) as i32;
            [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6].contains(&family)
                || (family == libc::AF_NETLINK && low(2) == libc::NETLINK_ROUTE as u32)
        } else {
            USER_ALLOWED.contains(&nr)
        };
        if allowed { RET_ALLOW } else { EPERM }
    }

    fn agent_policy(d: &Data) -> u32 {
        if d.arch != AUDIT_ARCH_X86_64 {
            return RET_KILL_PROCESS;
        }
        let nr = i64::from(d.nr);
        let denied = d.nr & X32_SYSCALL_BIT != 0
            || AGENT_DENIED.contains(&nr)
            || (nr == libc::SYS_clone && d.args[0] & libc::CLONE_NEWUSER as u64 != 0);
        if denied {
            EPERM
        } else if nr == libc::SYS_clone3 || AIO_SYSCALLS.contains(&nr) {
            ENOSYS
        } else {
            RET_ALLOW
        }
    }

    /// Argument vectors with the edge values of every rule.
    fn arg_cases() -> Vec<[u64; 6]> {
        let mut arg0: Vec<u64> = vec![0, 1, u64::MAX, HIGH, 17, 0x3d0f00, 0x0040_0000];
        for &flag in NS_EACH {
            arg0.extend([flag, flag | 17, flag | HIGH, flag << 32]);
        }
        // personality values and near misses.
        arg0.extend([
            0x8,
            0x20000,
            0x20008,
            0xffff_ffff,
            0xffff_fffe,
            0x20009,
            1 << 32 | 0x8,
        ]);
        // socket families: unix, inet, inet6, netlink, packet, vsock, and high bits.
        arg0.extend([2, 10, 16, 17, 40, 9, HIGH | 1, HIGH | 16]);
        let arg1 = [
            0,
            u64::from(TIOCSTI),
            u64::from(TIOCLINUX),
            HIGH | u64::from(TIOCSTI),
            HIGH | u64::from(TIOCLINUX),
            u64::from(TIOCSTI) << 32,
            u64::from(TIOCSTI) + 1,
            0x5401,
        ];
        // netlink protocols: route, netfilter, and route with high bits.
        let arg2 = [0, 12, 9, HIGH, u64::MAX];
        let mut cases = Vec::new();
        for &a0 in &arg0 {
            for &a1 in &arg1 {
                for &a2 in &arg2 {
                    cases.push([a0, a1, a2, 0, 0, 0]);
                }
            }
        }
        cases
    }

    fn numbers() -> impl Iterator<Item = u32> {
        let x32 = [0, 1, 39, 56, 250, 321, 512, 547].map(|n| X32_SYSCALL_BIT | n);
        (0..=500)
            .chain(x32)
            .chain([0x3fff_ffff, 0x8000_0000, u32::MAX])
    }

    /// Checks `prog` against `policy` for every number, each edge value alone, and every
    /// combination of edge values for the calls with argument rules.
    fn check_against(prog: &Program, policy: fn(&Data) -> u32) {
        let full = arg_cases();
        let mut single: Vec<[u64; 6]> = Vec::new();
        for args in &full {
            for i in 0..3 {
                let mut one = [0; 6];
                one[i] = args[i];
                if !single.contains(&one) {
                    single.push(one);
                }
            }
        }
        let ruled = [
            libc::SYS_clone,
            libc::SYS_ioctl,
            libc::SYS_personality,
            libc::SYS_socket,
        ];
        for nr in numbers() {
            let cases = if ruled.contains(&i64::from(nr)) {
                &full
            } else {
                &single
            };
            for arch in [
                AUDIT_ARCH_X86_64,
                0x4000_0003, /* i386 */
                0xC000_00B7, /* aarch64 */
            ] {
                for args in cases {
                    let d = Data {
                        nr,
                        arch,
                        args: *args,
                    };
                    assert_eq!(run(prog.instructions(), &d).0, policy(&d), "{d:x?}");
                }
            }
        }
    }

    #[test]
    fn user_filter_is_the_policy() {
        check_against(&user_filter().expect("user filter"), user_policy);
    }

    #[test]
    fn agent_filter_is_the_policy() {
        check_against(&agent_filter().expect("agent filter"), agent_policy);
    }

    /// The calls the agent's filter must refuse, named here rather than read from
    /// `AGENT_DENIED`, so that a call dropped from that list fails this test.
    #[test]
    fn the_agent_filter_refuses_what_no_agent_needs() {
        let prog = agent_filter().expect("agent filter");
        for nr in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_open_tree,
            libc::SYS_move_mount,
            libc::SYS_fsopen,
            libc::SYS_fsconfig,
            libc::SYS_fsmount,
            libc::SYS_fspick,
            libc::SYS_mount_setattr,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
            libc::SYS_io_uring_setup,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_open_by_handle_at,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_kexec_load,
            libc::SYS_kexec_file_load,
            libc::SYS_swapon,
            libc::SYS_reboot,
        ] {
            let d = Data {
                nr: nr as u32,
                arch: AUDIT_ARCH_X86_64,
                args: [0; 6],
            };
            assert_eq!(run(prog.instructions(), &d).0, EPERM, "syscall {nr}");
        }
    }

    #[test]
    fn named_calls_get_the_documented_answer() {
        let prog = user_filter().expect("user filter");
        let answer = |nr: i64, args: [u64; 6]| {
            let d = Data {
                nr: nr as u32,
                arch: AUDIT_ARCH_X86_64,
                args,
            };
            run(prog.instructions(), &d).0
        };
        for nr in [
            libc::SYS_getpid,
            libc::SYS_read,
            libc::SYS_execve,
            libc::SYS_mmap,
        ] {
            assert_eq!(answer(nr, [0; 6]), RET_ALLOW, "{nr}");
        }
        for nr in [
            libc::SYS_keyctl,
            libc::SYS_bpf,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_mount,
            libc::SYS_ptrace,
            libc::SYS_io_uring_setup,
            libc::SYS_userfaultfd,
            libc::SYS_perf_event_open,
            libc::SYS_open_by_handle_at,
        ] {
            assert_eq!(answer(nr, [0; 6]), EPERM, "{nr}");
        }
        assert_eq!(answer(libc::SYS_clone3, [0; 6]), ENOSYS);
        assert_eq!(answer(libc::SYS_io_setup, [65536, 0, 0, 0, 0, 0]), ENOSYS);
        let newuser = libc::CLONE_NEWUSER as u64;
        assert_eq!(answer(libc::SYS_clone, [17, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(
            answer(libc::SYS_clone, [newuser | HIGH, 0, 0, 0, 0, 0]),
            EPERM
        );
        let tiocsti = [0, HIGH | u64::from(TIOCSTI), 0, 0, 0, 0];
        assert_eq!(answer(libc::SYS_ioctl, tiocsti), EPERM);
        assert_eq!(
            answer(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            answer(libc::SYS_personality, [0x0040_0000, 0, 0, 0, 0, 0]),
            EPERM
        );
        let netfilter = [libc::AF_NETLINK as u64, 3, 12, 0, 0, 0];
        assert_eq!(answer(libc::SYS_socket, netfilter), EPERM);
        assert_eq!(
            answer(libc::SYS_socket, [libc::AF_PACKET as u64, 3, 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(answer(libc::SYS_socket, [40, 1, 0, 0, 0, 0]), EPERM); // AF_VSOCK
    }

    /// Most instructions a run of `prog` executes for syscall numbers 0..=500 with plain
    /// arguments, and for the calls with argument rules under any of the edge cases.
    fn longest_paths(prog: &Program) -> (usize, usize) {
        let steps = |nr: i64, args| {
            let d = Data {
                nr: nr as u32,
                arch: AUDIT_ARCH_X86_64,
                args,
            };
            run(prog.instructions(), &d).1
        };
        let plain = (0..=500).map(|nr| steps(nr, [0; 6])).max().unwrap_or(0);
        let cases = arg_cases();
        let ruled = [
            libc::SYS_clone,
            libc::SYS_ioctl,
            libc::SYS_personality,
            libc::SYS_socket,
        ];
        let any = ruled
            .iter()
            .flat_map(|&nr| cases.iter().map(move |a| (nr, *a)))
            .map(|(nr, a)| steps(nr, a))
            .fold(plain, usize::max);
        (plain, any)
    }

    #[test]
    fn filters_are_small_and_shallow() {
        let user = user_filter().expect("user filter");
        let agent = agent_filter().expect("agent filter");
        let (user_plain, user_any) = longest_paths(&user);
        let (agent_plain, agent_any) = longest_paths(&agent);
        println!(
            "user filter: {} instructions, longest path {user_plain} ({user_any} with argument \
             checks); agent filter: {} instructions, longest path {agent_plain} ({agent_any})",
            user.len(),
            agent.len()
        );
        assert!(user.len() < 4 * USER_ALLOWED.len(), "{}", user.len());
        assert!(
            agent.len() < 4 * (AGENT_DENIED.len() + 1) + 16,
            "{}",
            agent.len()
        );
        for prog in [&user, &agent] {
            assert!(prog.len() < libc::BPF_MAXINSNS as usize);
        }
        assert!(user_plain <= 20, "{user_plain}");
        assert!(agent_plain <= 20, "{agent_plain}");
        assert!(user_any <= 32, "{user_any}");
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

    #[test]
    fn a_syscall_with_two_rules_is_refused() {
        let mut table = BTreeMap::new();
        add(&mut table, 1, Block::ret(RET_ALLOW)).expect("first rule");
        assert!(add(&mut table, 1, Block::ret(RET_ALLOW)).is_err());
        assert!(add(&mut table, -1, Block::ret(RET_ALLOW)).is_err());
    }

    /// Installs `prog` in a forked child, runs `probe` there and returns its exit status: 0 if
    /// every check passed, else the number of the first that failed.
    fn in_child(prog: &Program, probe: fn() -> i32) -> i32 {
        // SAFETY: the child makes raw syscalls only (no allocation, no locks) and leaves with
        // _exit, so forking from a multi-threaded test process is sound.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: prctl with integer arguments.
            let nnp = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            let code = if nnp != 0 {
                100
            } else if install(prog).is_err() {
                101
            } else {
                probe()
            };
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// A raw syscall with three integer arguments: its result, or the errno it failed with.
    fn sys(nr: libc::c_long, a: libc::c_long, b: libc::c_long, c: libc::c_long) -> SysResult {
        // SAFETY: integer arguments only; pointer arguments are null, which the kernel checks.
        let r = unsafe { libc::syscall(nr, a, b, c, 0, 0) };
        if r == -1 {
            // SAFETY: reads this thread's errno.
            Err(unsafe { *libc::__errno_location() })
        } else {
            Ok(r)
        }
    }

    type SysResult = std::result::Result<libc::c_long, i32>;

    fn is_root() -> bool {
        // SAFETY: no arguments.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            println!("skipped: installing filters and the calls they refuse need root");
        }
        root
    }

    #[test]
    fn user_filter_works_in_the_kernel() {
        if !is_root() {
            return;
        }
        let prog = user_filter().expect("user filter");
        let code = in_child(&prog, || {
            use libc::*;
            if !matches!(sys(SYS_getpid, 0, 0, 0), Ok(pid) if pid > 0) {
                return 1;
            }
            if sys(SYS_unshare, CLONE_NEWUSER.into(), 0, 0) != Err(EPERM) {
                return 2;
            }
            // A null clone_args would be EFAULT had the filter let clone3 through.
            if sys(SYS_clone3, 0, 64, 0) != Err(ENOSYS) {
                return 3;
            }
            if sys(SYS_keyctl, 0, 0, 0) != Err(EPERM) {
                return 4;
            }
            match sys(SYS_clone, (CLONE_NEWUSER | SIGCHLD).into(), 0, 0) {
                Err(EPERM) => {}
                // SAFETY: ends the grandchild the filter should not have let through.
                Ok(0) => unsafe { _exit(0) },
                _ => return 5,
            }
            if sys(SYS_socket, AF_PACKET.into(), SOCK_RAW.into(), 0) != Err(EPERM) {
                return 6;
            }
            if sys(SYS_socket, AF_UNIX.into(), SOCK_STREAM.into(), 0).is_err() {
                return 7;
            }
            0
        });
        assert_eq!(code, 0, "check {code} failed in the child");
    }

    #[test]
    fn agent_filter_works_in_the_kernel() {
        if !is_root() {
            return;
        }
        let prog = agent_filter().expect("agent filter");
        let code = in_child(&prog, || {
            use libc::*;
            if !matches!(sys(SYS_getpid, 0, 0, 0), Ok(pid) if pid > 0) {
                return 1;
            }
            if sys(SYS_unshare, CLONE_NEWUSER.into(), 0, 0) != Err(EPERM) {
                return 2;
            }
            if sys(SYS_keyctl, 0, 0, 0) != Err(EPERM) {
                return 3;
            }
            // clone3 is refused with ENOSYS, so no user namespace can be made through it.
            if sys(SYS_clone3, 0, 64, 0) != Err(ENOSYS) {
                return 4;
            }
            0
        });
        assert_eq!(code, 0, "check {code} failed in the child");
    }
}
