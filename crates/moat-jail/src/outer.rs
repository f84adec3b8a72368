//! The outer jail of a sandbox whose runtime brings isolation of its own (gVisor's `runsc`):
//! the runtime's processes run as root of a user namespace whose ids are the sandbox's own
//! unprivileged host range, in their own pid, mount, network, ipc, uts and cgroup namespaces,
//! inside the sandbox's cgroups, on a root that holds only the host paths the runtime needs
//! (read-only but for the sandbox's own directory) and none of the host's secrets. An escape from
//! the runtime lands here, not in host root.
//!
//! The jail's first process executes the runtime as its PID 1, so when the runtime's main
//! process ends, the kernel ends everything else in the jail. Before that it moves into a
//! nested user namespace with a copy of its mount namespace, so the kernel locks every mount of
//! the jail: the runtime's root cannot unmount a mask or make a read-only mount writable. Later
//! commands of the runtime (`runsc checkpoint`, `pause`) run in the same namespaces and cgroups
//! through [`OuterJail::command`].
//!
//! The start follows [`crate::spawn`]: a `clone(CLONE_VM)` child that makes raw system calls
//! only, the same handshake and the same `(step, errno)` error reports.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cgroup::SandboxCgroup;
use crate::idmap::{IdRange, RANGE};
use crate::rootfs::{Plan, Step, c};
use crate::spawn::{
    self, ExecVectors, MOVE_MOUNT_F_EMPTY_PATH, STEP_CGROUPNS, STEP_EXEC, STEP_FDS, STEP_GO,
    STEP_HOSTNAME, STEP_IDS, STEP_NEST, STEP_PIVOT, STEP_PRIVATE, SandboxProcess, clone_jailed,
    cstr, kill_child, pipe, place_child, read_child_error, report_failure, run_step, socketpair,
    validate_id,
};
use crate::{JailError, Result, sys};

/// How a host path appears in the jail (always at its host path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-only, nosuid, nodev, with what is mounted below it.
    ReadOnly,
    /// Read-write, nosuid, nodev; only the directory's own mount.
    Writable,
    /// Read-only and id-mapped: files of host ids 0..65535 appear owned by the jail's ids
    /// 0..65535 (a template directory, a checkpoint image). Where the kernel or filesystem
    /// cannot id-map it, read-only as it is.
    IdMapped,
}

/// A host path shown in the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The absolute host path; the jail sees it at the same path.
    pub path: PathBuf,
    /// How.
    pub access: Access,
}

/// An overlay mounted in the jail (all paths as the jail sees them, which are their host paths):
/// a read-only tree with a writable layer, such as a template directory a runtime must add
/// mount points to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// The read-only tree (one of the binds).
    pub lower: PathBuf,
    /// The writable layer and overlayfs's work directory, empty directories of a writable bind.
    pub upper: PathBuf,
    /// overlayfs's work directory, beside `upper`.
    pub work: PathBuf,
    /// Where it is mounted, a directory of a writable bind.
    pub target: PathBuf,
}

/// Everything needed to start one outer jail.
#[derive(Debug)]
pub struct OuterConfig<'a> {
    /// Sandbox id (see [`validate_id`]).
    pub id: &'a str,
    /// The sandbox's cgroups (already created, limits applied).
    pub cgroup: &'a SandboxCgroup,
    /// The host id range the jail's ids map to.
    pub ids: &'a IdRange,
    /// An empty host directory the jail's root is mounted on (in the jail's mount namespace
    /// only); no bind may be at or below it.
    pub root: &'a Path,
    /// The host paths the jail sees; a path below another of the same or lesser access is
    /// left out (its parent shows it).
    pub binds: &'a [Bind],
    /// `(source, target)`: host files and directories bound read-only over paths the binds
    /// show (the target must exist there), such as a generated `/etc/passwd` over the host's.
    pub covers: &'a [(PathBuf, PathBuf)],
    /// Host files and directories hidden inside the bound ones (an empty file or directory
    /// takes their place).
    pub masks: &'a [PathBuf],
    /// An overlay the jail mounts for itself, on directories it shows.
    pub overlay: Option<&'a Overlay>,
    /// The program to execute, a path inside the jail.
    pub program: &'a Path,
    /// Its arguments, `argv[0]` first.
    pub args: &'a [String],
    /// Its whole environment, `KEY=VALUE`.
    pub env: &'a [String],
    /// Its standard input (standard output and error are `/dev/null`).
    pub stdin: RawFd,
    /// The jail's host name.
    pub hostname: &'a str,
}

/// The namespaces a jail's commands enter, in the order they enter them: all but the user
/// namespace with host root's rights (the nested user namespace has none over the jail's other
/// namespaces), the mount namespace first (a checkpoint's directory is attached there).
const NAMESPACES: [(&str, libc::c_int); 7] = [
    ("mnt", libc::CLONE_NEWNS),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("net", libc::CLONE_NEWNET),
    ("pid", libc::CLONE_NEWPID),
    ("user", libc::CLONE_NEWUSER),
];
/// The index of the user namespace in [`NAMESPACES`].
const USER_NS: usize = 6;

/// A running outer jail: its first process (the runtime) and handles on its namespaces.
#[derive(Debug)]
pub struct OuterJail {
    /// The first process; killed and reaped when this is dropped.
    process: SandboxProcess,
    /// `ns/*` of the first process, in [`NAMESPACES`]' order: they outlive it.
    namespaces: Vec<OwnedFd>,
    /// The program, opened on the host: what [`OuterJail::command`] executes again, whatever
    /// the jail has mounted over its path.
    program: OwnedFd,
    /// The sandbox's `cgroup.procs` files, which a command joins first.
    cgroup_procs: Vec<PathBuf>,
}

/// What the child needs, all prepared before `clone`.
struct ChildPlan {
    plan: Plan,
    go_read: RawFd,
    go_write: RawFd,
    err_write: RawFd,
    /// The child's end of the socket the host sends id-mapped mounts over.
    setup: RawFd,
    /// Where the child says it has made its nested user namespace, and where it then waits
    /// for the host to have mapped its ids (see [`OuterJail::spawn`]).
    nest_write: RawFd,
    nest_go_read: RawFd,
    nest_go_write: RawFd,
    stdin: RawFd,
    hostname: CString,
    program: CString,
    exec: ExecVectors,
}

/// The binds that show something: sorted, and without those below another bind that already
/// shows them with the same access (or read-only ones below a writable one). A bind below
/// another that does not show it so is refused: its mount point would be in the other's tree.
fn needed_binds(binds: &[Bind]) -> Result<Vec<Bind>> {
    let mut sorted = binds.to_vec();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut kept: Vec<Bind> = Vec::new();
    for b in sorted {
        match kept.iter().find(|k| b.path.starts_with(&k.path)) {
            None => kept.push(b),
            Some(k)
                if k.access == b.access
                    || (k.access == Access::Writable && b.access == Access::ReadOnly) => {}
            Some(k) => {
                return Err(JailError::Invalid(format!(
                    "{} cannot be shown below {} in an outer jail",
                    b.path.display(),
                    k.path.display()
                )));
            }
        }
    }
    Ok(kept)
}

/// The steps that build the jail's root on `cfg.root`.
fn root_plan(cfg: &OuterConfig<'_>, binds: &[Bind]) -> Result<Plan> {
    let root = cfg.root;
    let mut p = Plan::default();
    p.mount(
        None,
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=1m,nr_inodes=4096,mode=0755"),
        false,
    )?;
    let mut made: Vec<PathBuf> = vec![root.to_owned()];
    let inside = |path: &Path| root.join(path.strip_prefix("/").unwrap_or(path));
    let parents = |p: &mut Plan, made: &mut Vec<PathBuf>, at: &Path| -> Result<()> {
        let mut dirs: Vec<PathBuf> = at
            .ancestors()
            .skip(1)
            .take_while(|a| a.starts_with(root) && *a != root)
            .map(Path::to_owned)
            .collect();
        dirs.reverse();
        for d in dirs {
            if !made.contains(&d) {
                p.mkdir(&d, 0o755)?;
                made.push(d);
            }
        }
        Ok(())
    };
    let ro = sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
    for b in binds {
        if !b.path.is_absolute() || b.path.starts_with(root) || root.starts_with(&b.path) {
            return Err(JailError::Invalid(format!(
                "{} cannot be shown in a jail whose root is {}",
                b.path.display(),
                root.display()
            )));
        }
        let md = std::fs::metadata(&b.path)
            .map_err(|e| JailError::os(format!("stat {}", b.path.display()), e))?;
        let dst = inside(&b.path);
        parents(&mut p, &mut made, &dst)?;
        if md.is_dir() {
            p.mkdir(&dst, 0o755)?;
            made.push(dst.clone());
        } else {
            p.file(&dst, b"", 0o644)?;
        }
        match b.access {
            Access::ReadOnly => p.bind(&b.path, &dst, ro, false)?,
            // No nosuid or nodev: once locked they could not be left out of a remount, which
            // runsc's gofer makes of the root it serves from there; the jail's ids gain nothing
            // from a set-id file of their own, and its root cannot make device nodes.
            Access::Writable => p.mount(Some(&b.path), &dst, None, libc::MS_BIND, None, false)?,
            Access::IdMapped => p.push(
                format!("attach {} id-mapped", b.path.display()),
                Step::AttachLower {
                    target: c(&dst)?,
                    fallback_src: c(&b.path)?,
                },
            ),
        }
    }
    for (src, target) in cfg.covers {
        if !binds.iter().any(|b| target.starts_with(&b.path)) {
            return Err(JailError::Invalid(format!(
                "{} is not shown in the outer jail, so nothing can go over it",
                target.display()
            )));
        }
        p.bind(src, &inside(target), ro, false)?;
    }
    // The masks go over what the binds show, from an empty file and directory of the root.
    let empty_file = root.join(".mask");
    let empty_dir = root.join(".maskdir");
    p.file(&empty_file, b"", 0o444)?;
    p.mkdir(&empty_dir, 0o555)?;
    for m in cfg.masks {
        let Ok(md) = std::fs::symlink_metadata(m) else {
            continue;
        };
        // A symlink's target is masked by its own name; what no bind shows needs no mask.
        if md.file_type().is_symlink() || !binds.iter().any(|b| m.starts_with(&b.path)) {
            continue;
        }
        let src = if md.is_dir() { &empty_dir } else { &empty_file };
        p.bind(src, &inside(m), ro, false)?;
    }
    if let Some(o) = cfg.overlay {
        let data = format!(
            "lowerdir={},upperdir={},workdir={},userxattr",
            inside(&o.lower).display(),
            inside(&o.upper).display(),
            inside(&o.work).display()
        );
        // Without nosuid and nodev, for the same reason as a writable bind; its device
        // nodes are inert anyway (a file system mounted in a user namespace has no devices).
        p.mount(
            Some(Path::new("overlay")),
            &inside(&o.target),
            Some("overlay"),
            0,
            Some(&data),
            false,
        )?;
    }
    let proc = root.join("proc");
    p.mkdir(&proc, 0o555)?;
    p.mount(
        Some(Path::new("proc")),
        &proc,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
        false,
    )?;
    let dev = root.join("dev");
    p.mkdir(&dev, 0o755)?;
    for name in ["null", "zero", "full", "random", "urandom"] {
        let node = dev.join(name);
        p.file(&node, b"", 0o666)?;
        p.mount(
            Some(&Path::new("/dev").join(name)),
            &node,
            None,
            libc::MS_BIND,
            None,
            false,
        )?;
        p.attr(
            &node,
            sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NOEXEC,
            false,
        )?;
    }
    // Where a runtime mounts scratch space of its own (runsc builds its sandbox's chroot on a
    // tmpfs it mounts there).
    if !made.contains(&root.join("tmp")) {
        p.mkdir(&root.join("tmp"), 0o755)?;
    }
    // Nothing more is made in the root itself.
    p.attr(root, sys::MOUNT_ATTR_RDONLY, false)?;
    p.new_root = Some(c(root)?);
    Ok(p)
}

/// What [`map_nested`]'s helper needs, prepared before `clone`.
struct MapPlan {
    userns: RawFd,
    paths: [CString; 2],
    map: CString,
}

/// Maps the ids of `pid`'s nested user namespace one to one onto those of its parent, the
/// user namespace `outer_userns`: from a helper process that enters that namespace first (the
/// kernel lets only a process in a namespace or its parent write its maps).
fn map_nested(pid: i32, outer_userns: RawFd) -> Result<()> {
    let plan = MapPlan {
        userns: outer_userns,
        paths: [
            cstr(&format!("/proc/{pid}/uid_map"))?,
            cstr(&format!("/proc/{pid}/gid_map"))?,
        ],
        map: cstr(&format!("0 0 {RANGE}\n"))?,
    };
    let stack = crate::stack::ChildStack::new(16 << 10, "the id mapper's stack")?;
    // SAFETY: the helper runs `map_entry` on `stack`, in our memory: it reads `plan`, which
    // outlives it (reaped below before either goes), and makes raw system calls only. No
    // CLONE_FS, so it may enter another user namespace.
    let helper = unsafe {
        libc::clone(
            map_entry,
            stack.top(),
            libc::CLONE_VM | libc::SIGCHLD,
            (&raw const plan).cast_mut().cast(),
        )
    };
    if helper < 0 {
        return Err(JailError::last_os("start the id mapper"));
    }
    let mut status = 0;
    // Until it is reaped, whatever errno says (the helper shares this thread's): it runs on
    // `stack` and reads `plan` until then, and waiting for one's own child cannot fail else.
    // SAFETY: waiting for our own child with a valid status pointer.
    while unsafe { libc::waitpid(helper, &mut status, libc::__WALL) } != helper {}
    drop(stack);
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        let errno = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            libc::EINTR
        };
        Err(JailError::os(
            "map the ids of the jail's nested user namespace",
            io::Error::from_raw_os_error(errno),
        ))
    }
}

/// The id mapper: enters the outer user namespace and writes both maps; exits 0, or with the
/// errno of what failed.
extern "C" fn map_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `MapPlan`, alive until this helper is reaped; raw system
    // calls only, on its strings and fds.
    unsafe {
        let p = &*arg.cast::<MapPlan>();
        let fail = || -> ! {
            libc::syscall(libc::SYS_exit, (*libc::__errno_location()).max(1));
            libc::_exit(1)
        };
        if libc::setns(p.userns, libc::CLONE_NEWUSER) != 0 {
            fail();
        }
        for path in &p.paths {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                fail();
            }
            let len = p.map.as_bytes().len();
            if libc::write(fd, p.map.as_ptr().cast(), len) != len as isize {
                fail();
            }
            libc::close(fd);
        }
        libc::syscall(libc::SYS_exit, 0);
        libc::_exit(0)
    }
}

/// Writes one byte to `fd`.
fn signal(fd: &OwnedFd, what: &str) -> Result<()> {
    // SAFETY: writing one byte from a valid buffer to an fd we own.
    if unsafe { libc::write(fd.as_raw_fd(), b"g".as_ptr().cast(), 1) } == 1 {
        Ok(())
    } else {
        Err(JailError::last_os(what))
    }
}

/// Whether a byte arrives on `fd` (rather than its end, or an error).
fn wait_byte(fd: &OwnedFd) -> bool {
    let mut b = 0u8;
    loop {
        // SAFETY: reading one byte into a valid buffer from an fd we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut b).cast(), 1) };
        if n == 1 {
            return true;
        }
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return false;
    }
}

fn open_namespaces(pid: i32) -> Result<Vec<OwnedFd>> {
    NAMESPACES
        .iter()
        .map(|(name, _)| {
            let path = format!("/proc/{pid}/ns/{name}");
            std::fs::File::open(&path)
                .map(OwnedFd::from)
                .map_err(|e| JailError::os(format!("open {path}"), e))
        })
        .collect()
}

impl OuterJail {
    /// Starts a jail and executes its program as the jail's PID 1. Blocks until the program
    /// has been executed (or the setup failed).
    pub fn spawn(cfg: &OuterConfig<'_>) -> Result<OuterJail> {
        validate_id(cfg.id)?;
        let binds = needed_binds(cfg.binds)?;
        let plan = root_plan(cfg, &binds)?;
        let (host_end, child_end) = socketpair()?;
        let (go_read, go_write) = pipe()?;
        let (err_read, err_write) = pipe()?;
        let (nest_read, nest_write) = pipe()?;
        let (nest_go_read, nest_go_write) = pipe()?;
        let child = ChildPlan {
            plan,
            go_read: go_read.as_raw_fd(),
            go_write: go_write.as_raw_fd(),
            err_write: err_write.as_raw_fd(),
            setup: child_end.as_raw_fd(),
            nest_write: nest_write.as_raw_fd(),
            nest_go_read: nest_go_read.as_raw_fd(),
            nest_go_write: nest_go_write.as_raw_fd(),
            stdin: cfg.stdin,
            hostname: cstr(cfg.hostname)?,
            program: c(cfg.program)?,
            exec: ExecVectors::new(cfg.args, cfg.env)?,
        };
        // SAFETY: `child_entry` makes raw system calls only and never returns; `child`
        // outlives the child here (this frame waits until it has executed its program or been
        // reaped), and so does the stack.
        let (pid, _stack) = unsafe {
            clone_jailed(
                child_entry,
                &child,
                "the outer jail's namespaces",
                cfg.ids.host_base(),
            )?
        };
        drop(child_end);
        drop(go_read);
        drop(err_write);
        drop(nest_write);
        drop(nest_go_read);

        // From here on, a failure must not leave the child behind.
        let setup = (|| -> Result<Option<Vec<OwnedFd>>> {
            place_child(pid, cfg.cgroup, cfg.ids)?;
            for b in binds.iter().filter(|b| b.access == Access::IdMapped) {
                spawn::send_idmapped(pid, &b.path, true, &host_end)?;
            }
            let outer_userns = std::fs::File::open(format!("/proc/{pid}/ns/user"))
                .map_err(|e| JailError::os("open the outer jail's user namespace", e))?;
            signal(&go_write, "signal the outer jail to start")?;
            // Its root built, the child makes a nested user namespace with a copy of its
            // mount namespace, which the kernel then locks: no mount of the jail's can be
            // undone, uncovered or made writable from inside. Its ids are the jail's, one to
            // one, mapped from the jail's own user namespace (only a process there may).
            if !wait_byte(&nest_read) {
                // It failed (its report follows) or died.
                return Ok(None);
            }
            map_nested(pid, outer_userns.as_raw_fd())?;
            // Taken while it waits, every namespace its program will have made already.
            let namespaces = open_namespaces(pid)?;
            signal(&nest_go_write, "let the outer jail go on")?;
            Ok(Some(namespaces))
        })();
        drop(go_write);
        drop(nest_go_write);
        let namespaces = setup.and_then(|ns| match read_child_error(&err_read, &child.plan) {
            Some(e) => Err(e),
            None => ns.ok_or_else(|| {
                JailError::Invalid("the outer jail ended before its program started".into())
            }),
        });
        let program = namespaces.and_then(|ns| {
            std::fs::File::open(cfg.program)
                .map(|f| (ns, OwnedFd::from(f)))
                .map_err(|e| JailError::os(format!("open {}", cfg.program.display()), e))
        });
        match program {
            Ok((namespaces, program)) => Ok(OuterJail {
                process: SandboxProcess::own_child(pid)?,
                namespaces,
                program,
                cgroup_procs: cfg.cgroup.procs_files(),
            }),
            Err(e) => {
                kill_child(pid);
                Err(e)
            }
        }
    }

    /// The jail's first process, in the host's pid namespace.
    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// A pidfd of the jail's first process: readable once it has exited.
    pub fn pidfd(&self) -> RawFd {
        self.process.pidfd()
    }

    /// A command that runs the jail's program again, with `args` (`argv[0]` first), in the
    /// jail's namespaces and cgroups as its root, with no supplementary groups, an empty
    /// environment but `PATH`, no way to gain privileges and standard input and output on
    /// `/dev/null`. The program is the one the host opened at the jail's start, not whatever
    /// the jail shows at its path. With `mount`, the host directory `mount.0` is first attached,
    /// id-mapped and writable, on the directory `mount.1` of the jail (which must exist there):
    /// where the command writes, say, a checkpoint image; what it writes is stored under host
    /// ids 0..65535.
    ///
    /// The command's process is a child of an intermediate one that has entered the jail's pid
    /// namespace and passes its exit status on (128 + the signal's number if it was killed);
    /// killing the intermediate one kills it.
    pub fn command(&self, args: &[String], mount: Option<(&Path, &Path)>) -> Result<Command> {
        let tree = match mount {
            Some((dir, _)) => Some(spawn::idmapped_clone(
                self.namespaces[USER_NS].as_raw_fd(),
                dir,
                false,
            )?),
            None => None,
        };
        let target = mount.map(|(_, at)| c(at)).transpose()?;
        // Copies the hook owns: the jail may be torn down while the command is being started.
        let dup = |fd: &OwnedFd, what: &str| {
            fd.try_clone()
                .map_err(|e| JailError::os(format!("duplicate {what}"), e))
        };
        let ns: Vec<(OwnedFd, libc::c_int)> = self
            .namespaces
            .iter()
            .zip(NAMESPACES)
            .map(|(fd, (name, kind))| Ok((dup(fd, name)?, kind)))
            .collect::<Result<_>>()?;
        let program = dup(&self.program, "the jail's program")?;
        let procs: Vec<OwnedFd> = self
            .cgroup_procs
            .iter()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .map(OwnedFd::from)
                    .map_err(|e| JailError::os(format!("open {}", p.display()), e))
            })
            .collect::<Result<_>>()?;
        let env = [format!(
            "PATH={}",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        )];
        let exec = ExecVectors::new(args, &env)?;
        let mut cmd = Command::new(args.first().map_or("program", String::as_str));
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        // SAFETY: the hook makes raw system calls only, on fds and strings prepared before the
        // fork, which it owns (moved into it) in the child's copy of our memory.
        unsafe {
            cmd.pre_exec(move || {
                let entry = Entry {
                    ns: &ns,
                    procs: &procs,
                    tree: tree.as_ref().map(AsRawFd::as_raw_fd),
                    target: target.as_deref(),
                    program: program.as_raw_fd(),
                    exec: &exec,
                };
                enter(&entry)
            });
        }
        Ok(cmd)
    }

    /// SIGKILLs the jail's first process (and so, as the PID 1 of its namespace, all of the
    /// jail's processes).
    pub fn kill(&self) {
        self.process.kill();
    }

    /// Waits for the jail's first process to exit and reaps it; its raw wait status.
    pub fn wait(&mut self) -> io::Result<i32> {
        self.process.wait()
    }
}

/// What [`enter`] needs, all prepared before the fork.
struct Entry<'a> {
    ns: &'a [(OwnedFd, libc::c_int)],
    procs: &'a [OwnedFd],
    tree: Option<RawFd>,
    target: Option<&'a std::ffi::CStr>,
    program: RawFd,
    exec: &'a ExecVectors,
}

/// Where the program is in the processes [`enter`] makes.
const PROGRAM_FD: RawFd = 3;

/// The `pre_exec` hook of [`OuterJail::command`]: joins the sandbox's cgroups, enters the jail
/// and forks the process that executes the program, itself only passing that one's status on.
/// Async-signal-safe.
fn enter(e: &Entry<'_>) -> io::Result<()> {
    let check = |r: libc::c_long| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: raw system calls on fds, buffers and C strings owned by the caller.
    unsafe {
        // Keep a jail process (the same uid) from reading this copy of the server's memory.
        check(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) as libc::c_long)?;
        // Into the sandbox's cgroups, where its limits bound what runs there.
        for fd in e.procs {
            if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        // Host root's groups would go into the jail unmapped but effective.
        check(libc::syscall(
            libc::SYS_setgroups,
            0,
            std::ptr::null::<libc::gid_t>(),
        ))?;
        for (i, (fd, kind)) in e.ns.iter().enumerate() {
            check(libc::setns(fd.as_raw_fd(), *kind) as libc::c_long)?;
            // Attached with host root's rights, right after entering the mount namespace.
            if i == 0
                && let (Some(tree), Some(target)) = (e.tree, e.target)
            {
                check(libc::syscall(
                    libc::SYS_move_mount,
                    tree,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    target.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                ))?;
            }
        }
        check(libc::syscall(libc::SYS_setresgid, 0, 0, 0))?;
        check(libc::syscall(libc::SYS_setresuid, 0, 0, 0))?;
        // A change of uid makes a process dumpable again where `fs.suid_dumpable` says so.
        check(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) as libc::c_long)?;
        check(libc::chdir(c"/".as_ptr()) as libc::c_long)?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
        // Only standard streams and the program (as fd 3, close-on-exec) go on from here: the
        // caller's error pipe closes now, so starting the command cannot be held up by what
        // happens in the jail (a process there may stop the one below before it executes).
        if libc::dup2(e.program, PROGRAM_FD) < 0
            || libc::fcntl(PROGRAM_FD, libc::F_SETFD, libc::FD_CLOEXEC) < 0
            || libc::syscall(
                libc::SYS_close_range,
                (PROGRAM_FD + 1) as u32,
                u32::MAX,
                0u32,
            ) != 0
        {
            libc::_exit(127);
        }
        // Entering a pid namespace takes effect for children only. A raw clone, not `fork`:
        // no handler registered with `pthread_atfork` may run in a fork of a threaded process.
        let child = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0);
        if child < 0 {
            libc::_exit(127);
        }
        if child == 0 {
            // Dies with the process above; one that died already (its parent is then one the
            // jail's pid namespace shows) means going no further.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
                || libc::getppid() != 0
            {
                libc::_exit(127);
            }
            libc::syscall(
                libc::SYS_execveat,
                PROGRAM_FD,
                c"".as_ptr(),
                e.exec.argv(),
                e.exec.envp(),
                libc::AT_EMPTY_PATH,
            );
            let msg = b"the jail's program could not be executed\n";
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        }
        let child = child as libc::pid_t;
        let mut status = 0;
        loop {
            if libc::waitpid(child, &mut status, 0) == child {
                break;
            }
            if *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        libc::_exit(128 + libc::WTERMSIG(status));
    }
}

/// `clone`'s entry point for the child.
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildPlan`, alive until this child executes or is reaped.
    let plan = unsafe { &*arg.cast::<ChildPlan>() };
    child_main(plan)
}

/// The jail's first process, from `clone` to `exec`. Never returns.
fn child_main(c: &ChildPlan) -> ! {
    let fail = |step: u32| -> ! { report_failure(c.err_write, step) };
    // SAFETY: for every call below, raw system calls on fds and buffers prepared before clone;
    // no allocation, no locks, no destructors.
    unsafe {
        // Our copy of the write end must go, so the parent's death reads as EOF below.
        libc::close(c.go_write);
        let mut b = 0u8;
        if libc::read(c.go_read, (&mut b as *mut u8).cast(), 1) != 1 {
            fail(STEP_GO);
        }
        libc::setsid();
        if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
            || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
        {
            fail(STEP_IDS);
        }
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            fail(STEP_CGROUPNS);
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(STEP_PRIVATE);
        }
        libc::umask(0);
        for (i, step) in c.plan.steps.iter().enumerate() {
            if run_step(step, c.setup) != 0 {
                fail(i as u32);
            }
        }
        // /dev/null for standard output and error, opened while the host's is reachable.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        let Some(root) = &c.plan.new_root else {
            fail(STEP_PIVOT)
        };
        if libc::chdir(root.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
            || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
            || libc::chdir(c"/".as_ptr()) != 0
        {
            fail(STEP_PIVOT);
        }
        libc::umask(0o022);
        if libc::sethostname(c.hostname.as_ptr(), c.hostname.as_bytes().len()) != 0 {
            fail(STEP_HOSTNAME);
        }
        // Lock the mounts: a nested user namespace with a copy of the mount namespace (see
        // `OuterJail::spawn`). The host maps its ids once it has said so.
        libc::close(c.nest_go_write);
        if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) != 0
            || libc::write(c.nest_write, b"n".as_ptr().cast(), 1) != 1
        {
            fail(STEP_NEST);
        }
        let mut b = 0u8;
        if libc::read(c.nest_go_read, (&mut b as *mut u8).cast(), 1) != 1 {
            fail(STEP_NEST);
        }
        if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
        {
            fail(STEP_NEST);
        }
        let stdin = libc::fcntl(c.stdin, libc::F_DUPFD_CLOEXEC, 10);
        if null < 0
            || stdin < 0
            || libc::dup2(stdin, 0) < 0
            || libc::dup2(null, 1) < 0
            || libc::dup2(null, 2) < 0
            || libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
        {
            fail(STEP_FDS);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(STEP_EXEC);
        }
        // err_write is close-on-exec: a successful exec closes it, which the parent reads as EOF.
        libc::execve(c.program.as_ptr(), c.exec.argv(), c.exec.envp());
        fail(STEP_EXEC);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(path: &str, access: Access) -> Bind {
        Bind {
            path: path.into(),
            access,
        }
    }

    #[test]
    fn binds_below_one_that_shows_them_are_left_out() {
        let got = needed_binds(&[
            b("/usr/bin/runsc", Access::ReadOnly),
            b("/usr", Access::ReadOnly),
            b("/run/moat/x", Access::Writable),
            b("/run/moat/x/bundle", Access::ReadOnly),
            b("/data/tpl", Access::IdMapped),
            b("/usr", Access::ReadOnly),
            b("/usrx", Access::ReadOnly),
        ])
        .expect("binds");
        let paths: Vec<_> = got
            .iter()
            .map(|b| (b.path.to_str().unwrap_or(""), b.access))
            .collect();
        assert_eq!(
            paths,
            vec![
                ("/data/tpl", Access::IdMapped),
                ("/run/moat/x", Access::Writable),
                ("/usr", Access::ReadOnly),
                ("/usrx", Access::ReadOnly),
            ]
        );
        for (outer, inner) in [
            (
                b("/usr", Access::ReadOnly),
                b("/usr/local/tpl", Access::IdMapped),
            ),
            (b("/usr", Access::ReadOnly), b("/usr/x", Access::Writable)),
            (b("/d", Access::IdMapped), b("/d/x", Access::ReadOnly)),
        ] {
            assert!(needed_binds(&[outer, inner]).is_err());
        }
    }
}
