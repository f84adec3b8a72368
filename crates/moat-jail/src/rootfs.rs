//! The root filesystem of a sandbox, as a list of steps computed on the host (where allocation is
//! fine) and executed by the sandbox's first process between `clone` and `exec` (where it is not).
//!
//! Layout:
//! - the writable layer is a tmpfs of the sandbox's disk size, mounted at the runtime `mnt` point
//!   inside the sandbox's own mount namespace;
//! - the `host` template mounts the host's `/usr /bin /sbin /lib*` and `/etc` as read-only
//!   overlays (inodes of its own: no lock or inotify watch crosses sandboxes), masks the secrets
//!   in `/etc`, and adds a generated `/etc/passwd`, `/etc/group` and `/etc/hosts`, and `python`
//!   and `sudo` in `/usr/local/bin`;
//! - a directory template is an overlay: the directory read-only below, the tmpfs above;
//! - both get a fresh `/proc` with masked and read-only paths, a minimal `/dev` with a private
//!   devpts and a size-capped `/dev/shm`, and fresh `/tmp` and `/home/user`.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::runtime::RuntimeDir;
use crate::{JailError, Result};

/// Where a sandbox's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rootfs {
    /// The built-in `host` template: host system directories, read-only.
    Host,
    /// A directory holding a complete root filesystem, used as the read-only lower layer.
    Dir(PathBuf),
}

/// Sizes of the writable filesystems.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsLimits {
    /// Size of the writable layer (`/`, `/tmp`, `/home`), bytes.
    pub disk_bytes: u64,
    /// Inodes of the writable layer.
    pub inodes: u64,
    /// Size of `/dev/shm`, bytes.
    pub shm_bytes: u64,
}

use crate::sys::{
    MOUNT_ATTR_NODEV as ATTR_NODEV, MOUNT_ATTR_NOEXEC as ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID as ATTR_NOSUID, MOUNT_ATTR_RDONLY as ATTR_RDONLY,
};

/// One step of building the root, executed with raw system calls.
#[derive(Debug)]
pub(crate) enum Step {
    Mount {
        src: Option<CString>,
        dst: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
        /// A missing target is not an error (kernel-dependent `/proc` entries).
        optional: bool,
    },
    Attr {
        path: CString,
        set: u64,
        recursive: bool,
    },
    Mkdir {
        path: CString,
        mode: u32,
    },
    Symlink {
        target: CString,
        path: CString,
    },
    File {
        path: CString,
        contents: Vec<u8>,
        mode: u32,
    },
    Chown {
        path: CString,
        uid: u32,
        gid: u32,
    },
    /// Mounts `data`'s read-only overlay at `dst`; where overlayfs cannot be mounted, binds
    /// `src` read-only, nosuid and nodev there instead (see `build_host_tree`).
    SharedReadOnly {
        src: CString,
        dst: CString,
        data: CString,
    },
    /// Receives the template's id-mapped mount from the host over the channel socket and attaches
    /// it at `target`; if the host sent none (no id-mapped mounts here), binds `fallback_src`
    /// read-only instead.
    AttachLower {
        target: CString,
        fallback_src: CString,
    },
}

/// The steps and, for error messages, what each does.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub steps: Vec<Step>,
    pub what: Vec<String>,
    pub new_root: Option<CString>,
    /// The sandbox's writable layer, as a path before `pivot_root`: the root tmpfs of the
    /// `host` template (the other filesystems mounted on it are not part of it), or the upper
    /// directory of a directory template's overlay (whiteouts included). The child opens it
    /// and hands it to the agent on [`LAYER_FD`], so it stays reachable after the pivot, where
    /// an overlay's upper directory has no path any more.
    pub layer: Option<CString>,
}

/// The descriptor number the agent finds its writable layer on: an `O_PATH` directory
/// (`moat_proto::agent_config::AGENT_LAYER_FD`).
pub const LAYER_FD: i32 = 4;

impl Plan {
    /// Whether the child expects an id-mapped template mount from the host.
    pub fn wants_lower(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s, Step::AttachLower { .. }))
    }
}

pub(crate) fn c(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| JailError::Invalid(format!("path contains NUL: {}", p.display())))
}

fn cs(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| JailError::Invalid(format!("string contains NUL: {s:?}")))
}

impl Plan {
    pub(crate) fn push(&mut self, what: String, step: Step) {
        self.what.push(what);
        self.steps.push(step);
    }

    pub(crate) fn mount(
        &mut self,
        src: Option<&Path>,
        dst: &Path,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
        optional: bool,
    ) -> Result<()> {
        let what = format!(
            "mount {} on {} ({})",
            src.map(|s| s.display().to_string())
                .unwrap_or_else(|| "-".into()),
            dst.display(),
            fstype.unwrap_or("bind")
        );
        let step = Step::Mount {
            src: src.map(c).transpose()?,
            dst: c(dst)?,
            fstype: fstype.map(cs).transpose()?,
            flags,
            data: data.map(cs).transpose()?,
            optional,
        };
        self.push(what, step);
        Ok(())
    }

    pub(crate) fn bind(
        &mut self,
        src: &Path,
        dst: &Path,
        attrs: u64,
        optional: bool,
    ) -> Result<()> {
        self.mount(
            Some(src),
            dst,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
            optional,
        )?;
        if attrs != 0 {
            self.attr(dst, attrs, true)?;
        }
        Ok(())
    }

    pub(crate) fn attr(&mut self, path: &Path, set: u64, recursive: bool) -> Result<()> {
        self.push(
            format!("set mount attributes {set:#x} on {}", path.display()),
            Step::Attr {
                path: c(path)?,
                set,
                recursive,
            },
        );
        Ok(())
    }

    pub(crate) fn mkdir(&mut self, path: &Path, mode: u32) -> Result<()> {
        self.push(
            format!("mkdir {}", path.display()),
            Step::Mkdir {
                path: c(path)?,
                mode,
            },
        );
        Ok(())
    }

    fn symlink(&mut self, target: &Path, path: &Path) -> Result<()> {
        self.push(
            format!("symlink {} -> {}", path.display(), target.display()),
            Step::Symlink {
                target: c(target)?,
                path: c(path)?,
            },
        );
        Ok(())
    }

    pub(crate) fn file(&mut self, path: &Path, contents: &[u8], mode: u32) -> Result<()> {
        self.push(
            format!("write {}", path.display()),
            Step::File {
                path: c(path)?,
                contents: contents.to_vec(),
                mode,
            },
        );
        Ok(())
    }

    fn chown(&mut self, path: &Path, uid: u32, gid: u32) -> Result<()> {
        self.push(
            format!("chown {}", path.display()),
            Step::Chown {
                path: c(path)?,
                uid,
                gid,
            },
        );
        Ok(())
    }
}

/// Host paths of the `host` template bound read-only (symlinks, as on merged-/usr systems, are
/// recreated as symlinks).
pub const HOST_DIRS: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc",
];

/// Secrets in the host's `/etc` that the `host` template hides.
pub const SECRET_FILES: &[&str] = &[
    "etc/shadow",
    "etc/shadow-",
    "etc/gshadow",
    "etc/gshadow-",
    "etc/security/opasswd",
    "etc/sudoers",
    "etc/machine-id",
];
/// Directories of secrets in the host's `/etc` that the `host` template hides.
pub const SECRET_DIRS: &[&str] = &["etc/ssl/private", "etc/sudoers.d", "etc/moat"];

/// Pseudo-terminals one sandbox may have open at once (`max=` of its devpts instance). Every
/// devpts instance but the host's draws from one pool (`kernel.pty.max` less
/// `kernel.pty.reserve`), so without a cap one sandbox could take them all.
pub const MAX_PTYS: u32 = 64;

/// `/proc` files that leak host state or are kernel attack surface (Docker's masked paths).
const PROC_MASKED_FILES: &[&str] = &[
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "timer_stats",
    "sysrq-trigger",
    "kallsyms",
    "kmsg",
];
const PROC_MASKED_DIRS: &[&str] = &["acpi", "scsi", "firmware"];
/// `/proc` entries left visible but read-only.
const PROC_READONLY: &[&str] = &["bus", "fs", "irq", "sys"];

/// Bytes used and total of the writable layer of the sandbox whose first process is host pid
/// `pid`, or `None` when it cannot be read (the sandbox is gone).
///
/// Read through `/proc/<pid>/root`, the sandbox's `/`: with the `host` template that is the
/// writable tmpfs itself, with a directory template an overlay, whose `statfs` reports its upper
/// layer, the same tmpfs. Nothing is resolved inside the sandbox beyond its root directory.
pub fn writable_layer_usage(pid: i32) -> Option<(u64, u64)> {
    let path = CString::new(format!("/proc/{pid}/root")).ok()?;
    // SAFETY: all-zero is a valid `statvfs`; the kernel fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a valid, writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    let total = (st.f_blocks as u64).saturating_mul(unit);
    let free = (st.f_bfree as u64).saturating_mul(unit);
    Some((total.saturating_sub(free), total))
}

/// The uid and gid of the sandbox's default user.
pub const USER_ID: u32 = 1000;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
user:x:1000:1000:user:/home/user:/bin/bash\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\ntty:x:5:\nusers:x:100:user\nuser:x:1000:\nnogroup:x:65534:\n";

/// Builds the plan for `rootfs`.
pub(crate) fn plan(
    rt: &RuntimeDir,
    rootfs: &Rootfs,
    limits: &FsLimits,
    hostname: &str,
) -> Result<Plan> {
    plan_on(rt, rootfs, limits, hostname, Path::new("/"))
}

/// [`plan`] with the host's files read below `host` instead of `/`: what the `host` template
/// shows and masks depends on what the host has, and tests give it a host of their own.
fn plan_on(
    rt: &RuntimeDir,
    rootfs: &Rootfs,
    limits: &FsLimits,
    hostname: &str,
    host: &Path,
) -> Result<Plan> {
    let mut p = Plan::default();
    let m = rt.mnt();
    let tmpfs_opts = format!(
        "size={},nr_inodes={},mode=0755",
        limits.disk_bytes, limits.inodes
    );
    p.mount(
        None,
        &m,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&tmpfs_opts),
        false,
    )?;
    let root = match rootfs {
        Rootfs::Host => {
            build_host_tree(&mut p, rt, host, &m, hostname)?;
            p.layer = Some(c(&m)?);
            m.clone()
        }
        Rootfs::Dir(dir) => {
            let dir = dir
                .canonicalize()
                .map_err(|e| JailError::os(format!("template rootfs {}", dir.display()), e))?;
            if rt.root().starts_with(&dir) {
                return Err(JailError::Invalid(format!(
                    "template rootfs {} contains moat's runtime directory {}; overlayfs cannot \
                     stack a layer on its own ancestor",
                    dir.display(),
                    rt.root().display()
                )));
            }
            if !dir.is_dir() {
                return Err(JailError::Invalid(format!(
                    "template rootfs {} is not a directory",
                    dir.display()
                )));
            }
            let text = dir.to_string_lossy();
            if text.contains([',', ':', '\\']) {
                return Err(JailError::Invalid(format!(
                    "template rootfs path may not contain ',', ':' or '\\': {text}"
                )));
            }
            for d in ["lower", "upper", "work", "root"] {
                p.mkdir(&m.join(d), 0o755)?;
            }
            // The template, seen through an id-mapped mount made by the host (ids 0..65535 of
            // the template become the sandbox's own), so overlayfs can copy its files up.
            p.push(
                format!(
                    "attach template {} at {}",
                    dir.display(),
                    m.join("lower").display()
                ),
                Step::AttachLower {
                    target: c(&m.join("lower"))?,
                    fallback_src: c(&dir)?,
                },
            );
            // `userxattr`: mounted in the sandbox's user namespace, overlayfs can only keep its
            // markers (an opaque directory, a removed directory of the template) in `user.`
            // attributes; without it, removing a template directory fails with EIO.
            let data = format!(
                "lowerdir={},upperdir={},workdir={},userxattr",
                m.join("lower").display(),
                m.join("upper").display(),
                m.join("work").display()
            );
            let merged = m.join("root");
            p.mount(
                None,
                &merged,
                Some("overlay"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some(&data),
                false,
            )?;
            for (d, mode) in [
                ("tmp", 0o1777),
                ("home", 0o755),
                ("proc", 0o555),
                ("dev", 0o755),
            ] {
                p.mkdir(&merged.join(d), mode)?;
            }
            p.mkdir(&merged.join("home/user"), 0o750)?;
            p.chown(&merged.join("home/user"), USER_ID, USER_ID)?;
            p.layer = Some(c(&m.join("upper"))?);
            merged
        }
    };
    build_proc(&mut p, &root)?;
    build_dev(&mut p, &root, limits)?;
    p.new_root = Some(c(&root)?);
    Ok(p)
}

/// What of the `host` template's tree a host has: the same for every backend that builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTree {
    /// The entries of [`HOST_DIRS`] that are directories there, shown read-only.
    pub dirs: Vec<&'static str>,
    /// The entries of [`HOST_DIRS`] that are symlinks there (merged `/usr`), with their
    /// targets, made again as symlinks.
    pub symlinks: Vec<(&'static str, PathBuf)>,
    /// Its secret files to hide ([`SECRET_FILES`] and the ssh host keys it has), relative.
    pub secret_files: Vec<PathBuf>,
    /// Its secret directories to hide ([`SECRET_DIRS`] it has), relative.
    pub secret_dirs: Vec<PathBuf>,
    /// The generated `/etc` files that replace ones it has (see [`identity_files`]).
    pub identity: Vec<&'static str>,
    /// Whether it has a `/usr/local/bin`, where `python` and `sudo` are added.
    pub local_bin: bool,
    /// Whether `python` must be added there (it has `python3` but no `python`).
    pub add_python: bool,
    /// Whether `sudo` must be added there (its `/usr/local/bin` has none).
    pub add_sudo: bool,
}

impl HostTree {
    /// Reads what the host below `host_root` has (`/`; tests give a made-up one).
    pub fn read(host_root: &Path) -> Result<HostTree> {
        let mut tree = HostTree {
            dirs: Vec::new(),
            symlinks: Vec::new(),
            secret_files: Vec::new(),
            secret_dirs: Vec::new(),
            identity: Vec::new(),
            local_bin: host_root.join("usr/local/bin").is_dir(),
            add_python: false,
            add_sudo: false,
        };
        for name in HOST_DIRS {
            let host = host_root.join(name);
            let Ok(md) = std::fs::symlink_metadata(&host) else {
                continue;
            };
            if md.file_type().is_symlink() {
                let target = std::fs::read_link(&host)
                    .map_err(|e| JailError::os(format!("readlink {}", host.display()), e))?;
                tree.symlinks.push((name, target));
            } else if md.is_dir() {
                tree.dirs.push(name);
            }
        }
        for secret in SECRET_FILES {
            if std::fs::symlink_metadata(host_root.join(secret)).is_ok_and(|md| md.is_file()) {
                tree.secret_files.push(PathBuf::from(secret));
            }
        }
        for secret in SECRET_DIRS {
            if std::fs::symlink_metadata(host_root.join(secret)).is_ok_and(|md| md.is_dir()) {
                tree.secret_dirs.push(PathBuf::from(secret));
            }
        }
        if let Ok(entries) = std::fs::read_dir(host_root.join("etc/ssh")) {
            let mut keys: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("ssh_host_") && !n.ends_with(".pub"))
                .map(|n| Path::new("etc/ssh").join(n))
                .collect();
            keys.sort();
            tree.secret_files.extend(keys);
        }
        for (name, _) in identity_files("") {
            if host_root.join("etc").join(name).exists() {
                tree.identity.push(name);
            }
        }
        if tree.local_bin {
            let has = |name: &str| {
                ["usr/local/bin", "usr/bin"]
                    .iter()
                    .any(|d| host_root.join(d).join(name).exists())
            };
            tree.add_python = !has("python") && host_root.join("usr/bin/python3").exists();
            tree.add_sudo = !host_root.join("usr/local/bin/sudo").exists();
        }
        Ok(tree)
    }
}

/// The directories of the `host` template's root besides the host's, with their modes
/// (`home/user` is the user's).
pub const SKELETON: &[(&str, u32)] = &[
    ("tmp", 0o1777),
    ("home", 0o755),
    ("home/user", 0o750),
    ("root", 0o700),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("run", 0o755),
    ("proc", 0o555),
    ("dev", 0o755),
];

fn build_host_tree(
    p: &mut Plan,
    rt: &RuntimeDir,
    host_root: &Path,
    m: &Path,
    hostname: &str,
) -> Result<()> {
    let ro = ATTR_RDONLY | ATTR_NOSUID | ATTR_NODEV;
    let empty = rt.empty_dir();
    if empty.to_string_lossy().contains([',', ':', '\\']) {
        return Err(JailError::Invalid(format!(
            "runtime directory path may not contain ',', ':' or '\\': {}",
            rt.root().display()
        )));
    }
    let tree = HostTree::read(host_root)?;
    for (name, target) in &tree.symlinks {
        p.symlink(target, &m.join(name))?;
    }
    for name in &tree.dirs {
        let host = host_root.join(name);
        let dst = m.join(name);
        // A read-only overlay rather than a bind: its inodes are the sandbox's own, so a
        // lock on a shared file (`flock /usr/bin/env`) blocks no one outside it, and inotify
        // watches see only what happens through it, not the host's or other sandboxes'
        // activity. Pages stay shared with the host's page cache.
        // Where overlayfs is missing, a read-only bind does instead (`moat check` says
        // whether it is there).
        p.mkdir(&dst, 0o755)?;
        let data = format!("lowerdir={}:{}", host.display(), empty.display());
        p.push(
            format!("mount {} read-only on {}", host.display(), dst.display()),
            Step::SharedReadOnly {
                src: c(&host)?,
                dst: c(&dst)?,
                data: cs(&data)?,
            },
        );
    }
    for secret in &tree.secret_files {
        p.bind(&rt.mask_file(), &m.join(secret), ro, false)?;
    }
    for secret in &tree.secret_dirs {
        p.bind(&rt.mask_dir(), &m.join(secret), ro, false)?;
    }
    // Generated identity files, staged on a small tmpfs that disappears from view with the old
    // root; the bind mounts keep it alive.
    let stage = rt.stage();
    p.mount(
        None,
        &stage,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=64k,mode=0755"),
        false,
    )?;
    for (name, contents) in identity_files(hostname) {
        let staged = stage.join(name);
        p.file(&staged, &contents, 0o644)?;
        if tree.identity.contains(&name) {
            p.bind(&staged, &m.join("etc").join(name), ro, false)?;
        }
    }
    add_e2b_commands(p, &tree, m, &stage)?;
    for (d, mode) in SKELETON {
        p.mkdir(&m.join(d), *mode)?;
    }
    p.chown(&m.join("home/user"), USER_ID, USER_ID)?;
    Ok(())
}

/// The generated files of the `host` template's `/etc` (each replaces the host's where it has
/// one): the accounts, the host name and no resolver.
pub fn identity_files(hostname: &str) -> [(&'static str, Vec<u8>); 5] {
    let hosts = format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n");
    [
        ("passwd", PASSWD.into()),
        ("group", GROUP.into()),
        ("hosts", hosts.into_bytes()),
        ("hostname", format!("{hostname}\n").into_bytes()),
        ("resolv.conf", b"# no network\n".to_vec()),
    ]
}

/// The `sudo` the `host` template provides (see the script for what it does).
pub const SUDO: &[u8] = include_bytes!("sudo.sh");

/// `python` (for `python3`) and `sudo`, which E2B's base image has and a host may lack, in the
/// host's `/usr/local/bin` (first on a login shell's `PATH` too): a read-only overlay of that
/// directory over two staged entries, the host's own files taking precedence. Skipped where the
/// host has no `/usr/local/bin`.
fn add_e2b_commands(p: &mut Plan, tree: &HostTree, m: &Path, stage: &Path) -> Result<()> {
    if !tree.local_bin {
        return Ok(());
    }
    let extra = stage.join("bin");
    p.mkdir(&extra, 0o755)?;
    if tree.add_python {
        p.symlink(Path::new("/usr/bin/python3"), &extra.join("python"))?;
    }
    p.file(&extra.join("sudo"), SUDO, 0o755)?;
    let target = m.join("usr/local/bin");
    let data = format!("lowerdir={}:{}", target.display(), extra.display());
    p.mount(
        None,
        &target,
        Some("overlay"),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        Some(&data),
        false,
    )
}

fn build_proc(p: &mut Plan, root: &Path) -> Result<()> {
    let proc_ = root.join("proc");
    p.mount(
        None,
        &proc_,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
        false,
    )?;
    for f in PROC_MASKED_FILES {
        p.mount(
            Some(Path::new("/dev/null")),
            &proc_.join(f),
            None,
            libc::MS_BIND,
            None,
            true,
        )?;
    }
    for d in PROC_MASKED_DIRS {
        p.mount(
            None,
            &proc_.join(d),
            Some("tmpfs"),
            libc::MS_RDONLY,
            Some("size=0"),
            true,
        )?;
    }
    for d in PROC_READONLY {
        let path = proc_.join(d);
        p.mount(
            Some(&path),
            &path,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
            true,
        )?;
        p.attr(
            &path,
            ATTR_RDONLY | ATTR_NOSUID | ATTR_NODEV | ATTR_NOEXEC,
            true,
        )?;
    }
    Ok(())
}

fn build_dev(p: &mut Plan, root: &Path, limits: &FsLimits) -> Result<()> {
    let dev = root.join("dev");
    p.mount(
        None,
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("size=64k,mode=0755"),
        false,
    )?;
    for d in ["null", "zero", "full", "random", "urandom", "tty"] {
        let dst = dev.join(d);
        p.file(&dst, b"", 0o666)?;
        p.bind(
            &Path::new("/dev").join(d),
            &dst,
            ATTR_NOSUID | ATTR_NOEXEC,
            false,
        )?;
    }
    let pts = dev.join("pts");
    p.mkdir(&pts, 0o755)?;
    p.mount(
        None,
        &pts,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(&format!(
            "newinstance,ptmxmode=0666,mode=0620,gid=5,max={MAX_PTYS}"
        )),
        false,
    )?;
    p.symlink(Path::new("pts/ptmx"), &dev.join("ptmx"))?;
    let shm = dev.join("shm");
    p.mkdir(&shm, 0o1777)?;
    let shm_opts = format!("size={},mode=1777", limits.shm_bytes);
    p.mount(
        None,
        &shm,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&shm_opts),
        false,
    )?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        p.symlink(Path::new(target), &dev.join(name))?;
    }
    // Nothing may add device nodes or files to /dev itself (pts and shm stay writable).
    p.attr(&dev, ATTR_RDONLY | ATTR_NOSUID | ATTR_NOEXEC, false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The root filesystem plan, read without running it: what each template shows of the host,
    //! what it hides, and what is read-only. The `host` template is planned over a made-up host
    //! root, so the assertions do not depend on the machine's own files.

    use std::collections::BTreeSet;
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    const LIMITS: FsLimits = FsLimits {
        disk_bytes: 1 << 30,
        inodes: 65_536,
        shm_bytes: 64 << 20,
    };

    /// Every read-only bind of host content gets these.
    const RO: u64 = ATTR_RDONLY | ATTR_NOSUID | ATTR_NODEV;

    /// A runtime directory and a made-up host root in a temporary directory.
    struct Fixture {
        tmp: tempfile::TempDir,
        rt: RuntimeDir,
        host: PathBuf,
    }

    /// A host with the usual system directories (`bin` and `lib` as merged-/usr symlinks), every
    /// kind of secret, ssh host keys beside public ones, and the directories no sandbox may see
    /// (`/sys`, `/run`, `/var`, `/root`, `/home`), each with something in it.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = RuntimeDir::open(&dir.path().join("rt")).expect("runtime dir");
        let host = dir.path().join("host");
        for d in [
            "usr/bin",
            "usr/lib",
            "usr/local/bin",
            "sbin",
            "lib64",
            "etc/ssh",
            "etc/ssl/private",
            "etc/sudoers.d",
            "etc/moat",
            "etc/security",
            "sys/kernel",
            "run/user/0",
            "var/lib",
            "root/.ssh",
            "home/alice",
        ] {
            fs::create_dir_all(host.join(d)).expect("mkdir");
        }
        for f in [
            "etc/shadow",
            "etc/shadow-",
            "etc/gshadow",
            "etc/gshadow-",
            "etc/security/opasswd",
            "etc/sudoers",
            "etc/machine-id",
            "etc/passwd",
            "etc/group",
            "etc/hosts",
            "etc/hostname",
            "etc/resolv.conf",
            "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/ssh_host_ed25519_key.pub",
            "etc/ssh/ssh_host_rsa_key",
            "etc/ssh/ssh_host_rsa_key.pub",
            "etc/ssh/ssh_config",
            "usr/bin/python3",
            "sys/kernel/notes",
            "run/user/0/bus",
            "var/lib/secret",
            "root/.ssh/id_ed25519",
            "home/alice/notes",
        ] {
            fs::write(host.join(f), b"").expect("write");
        }
        symlink("usr/bin", host.join("bin")).expect("symlink");
        symlink("usr/lib", host.join("lib")).expect("symlink");
        Fixture { tmp: dir, rt, host }
    }

    fn text(c: &CString) -> String {
        c.to_string_lossy().into_owned()
    }

    fn path(p: &Path) -> String {
        p.display().to_string()
    }

    /// `(source, target)` of every bind mount.
    fn binds(p: &Plan) -> Vec<(String, String)> {
        p.steps
            .iter()
            .filter_map(|s| match s {
                Step::Mount {
                    src: Some(src),
                    dst,
                    flags,
                    ..
                } if flags & libc::MS_BIND != 0 => Some((text(src), text(dst))),
                _ => None,
            })
            .collect()
    }

    /// The attributes set on `target` (the union of every `Attr` step on it).
    fn attrs(p: &Plan, target: &str) -> u64 {
        p.steps
            .iter()
            .filter_map(|s| match s {
                Step::Attr { path, set, .. } if text(path) == target => Some(*set),
                _ => None,
            })
            .fold(0, |a, b| a | b)
    }

    /// Every path something is mounted on, of any kind.
    fn mount_targets(p: &Plan) -> Vec<String> {
        p.steps
            .iter()
            .filter_map(|s| match s {
                Step::Mount { dst, .. } | Step::SharedReadOnly { dst, .. } => Some(text(dst)),
                Step::AttachLower { target, .. } => Some(text(target)),
                _ => None,
            })
            .collect()
    }

    /// Every host path the plan takes content from: bind and overlay sources and overlay lower
    /// directories.
    fn sources(p: &Plan) -> Vec<String> {
        let mut out = Vec::new();
        for s in &p.steps {
            match s {
                Step::Mount {
                    src: Some(src),
                    flags,
                    ..
                } if flags & libc::MS_BIND != 0 => out.push(text(src)),
                Step::Mount {
                    data: Some(data),
                    fstype: Some(fs),
                    ..
                } if fs.as_bytes() == b"overlay" => out.extend(lower_dirs(&text(data))),
                Step::SharedReadOnly { src, data, .. } => {
                    out.push(text(src));
                    out.extend(lower_dirs(&text(data)));
                }
                Step::AttachLower { fallback_src, .. } => out.push(text(fallback_src)),
                _ => {}
            }
        }
        out
    }

    fn lower_dirs(data: &str) -> Vec<String> {
        data.split(',')
            .filter_map(|o| o.strip_prefix("lowerdir="))
            .flat_map(|l| l.split(':'))
            .map(str::to_owned)
            .collect()
    }

    /// What no sandbox root may contain from the host, and its own fresh `/proc` and `/dev`
    /// aside, never has mounted: the host's `/sys`, `/run`, `/var`, `/root`, `/home`.
    fn assert_no_host_private_dirs(p: &Plan, host: &Path, root: &Path) {
        for d in ["sys", "run", "var", "root", "home"] {
            let from = path(&host.join(d));
            let from_real = format!("/{d}");
            for src in sources(p) {
                assert!(
                    !(src == from || src.starts_with(&format!("{from}/"))),
                    "the host's /{d} is mounted: {src}"
                );
                assert!(
                    !(src == from_real || src.starts_with(&format!("{from_real}/"))),
                    "the host's /{d} is mounted: {src}"
                );
            }
            let at = path(&root.join(d));
            for dst in mount_targets(p) {
                assert!(
                    !(dst == at || dst.starts_with(&format!("{at}/"))),
                    "something is mounted on the sandbox's /{d}: {dst}"
                );
            }
        }
        let sys = path(&root.join("sys"));
        assert!(
            !p.steps.iter().any(|s| match s {
                Step::Mkdir { path, .. } | Step::Symlink { path, .. } => text(path) == sys,
                _ => false,
            }),
            "the sandbox has a /sys"
        );
    }

    #[test]
    fn the_host_template_masks_every_secret_and_nothing_else() {
        let f = fixture();
        let p = plan_on(&f.rt, &Rootfs::Host, &LIMITS, "sbx", &f.host).expect("plan");
        let m = f.rt.mnt();
        let masked: BTreeSet<String> = binds(&p)
            .into_iter()
            .filter(|(src, _)| *src == path(&f.rt.mask_file()) || *src == path(&f.rt.mask_dir()))
            .map(|(_, dst)| dst)
            .collect();
        let expected: BTreeSet<String> = [
            "etc/shadow",
            "etc/shadow-",
            "etc/gshadow",
            "etc/gshadow-",
            "etc/security/opasswd",
            "etc/sudoers",
            "etc/machine-id",
            "etc/ssl/private",
            "etc/sudoers.d",
            "etc/moat",
            "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/ssh_host_rsa_key",
        ]
        .iter()
        .map(|s| path(&m.join(s)))
        .collect();
        assert_eq!(masked, expected);
        // Files behind the empty file, directories behind the empty directory.
        for (src, dst) in binds(&p) {
            if dst.ends_with("/etc/ssl/private")
                || dst.ends_with("/etc/sudoers.d")
                || dst.ends_with("/etc/moat")
            {
                assert_eq!(src, path(&f.rt.mask_dir()), "{dst}");
            } else if expected.contains(&dst) {
                assert_eq!(src, path(&f.rt.mask_file()), "{dst}");
            }
        }
        for dst in &masked {
            assert_eq!(attrs(&p, dst) & RO, RO, "mask on {dst} is not read-only");
        }
    }

    #[test]
    fn a_secret_the_host_lacks_is_not_masked() {
        let f = fixture();
        fs::remove_file(f.host.join("etc/shadow")).expect("rm");
        fs::remove_dir(f.host.join("etc/moat")).expect("rmdir");
        let p = plan_on(&f.rt, &Rootfs::Host, &LIMITS, "sbx", &f.host).expect("plan");
        let m = f.rt.mnt();
        let targets = mount_targets(&p);
        assert!(!targets.contains(&path(&m.join("etc/shadow"))));
        assert!(!targets.contains(&path(&m.join("etc/moat"))));
        assert!(targets.contains(&path(&m.join("etc/gshadow"))));
    }

    #[test]
    fn the_host_template_shows_system_directories_read_only() {
        let f = fixture();
        let p = plan_on(&f.rt, &Rootfs::Host, &LIMITS, "sbx", &f.host).expect("plan");
        let m = f.rt.mnt();
        // Directories as read-only overlays (a read-only bind where overlayfs is missing), with
        // the empty directory as the second lower layer; symlinks stay symlinks.
        let shared: Vec<(String, String, String)> = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::SharedReadOnly { src, dst, data } => Some((text(src), text(dst), text(data))),
                _ => None,
            })
            .collect();
        let expected: Vec<(String, String, String)> = ["usr", "sbin", "lib64", "etc"]
            .iter()
            .map(|d| {
                let src = path(&f.host.join(d));
                let data = format!("lowerdir={src}:{}", path(&f.rt.empty_dir()));
                (src, path(&m.join(d)), data)
            })
            .collect();
        assert_eq!(shared, expected);
        let links: Vec<(String, String)> = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Symlink { target, path } if text(path).starts_with(&path_of(&m)) => {
                    Some((text(path), text(target)))
                }
                _ => None,
            })
            .collect();
        assert!(links.contains(&(path(&m.join("bin")), "usr/bin".into())));
        assert!(links.contains(&(path(&m.join("lib")), "usr/lib".into())));
        // Every bind of host content (masks, generated identity files) is read-only, nosuid
        // and nodev, and so is the overlay that adds `python` and `sudo`.
        let dev = path(&m.join("dev"));
        let proc_ = path(&m.join("proc"));
        for (src, dst) in binds(&p) {
            if dst.starts_with(&dev) || dst.starts_with(&proc_) {
                continue;
            }
            assert_eq!(attrs(&p, &dst) & RO, RO, "bind of {src} on {dst}");
        }
        for name in ["passwd", "group", "hosts", "hostname", "resolv.conf"] {
            let dst = path(&m.join("etc").join(name));
            assert!(
                binds(&p).contains(&(path(&f.rt.stage().join(name)), dst.clone())),
                "{name} is not generated"
            );
        }
        let local_bin = p.steps.iter().find_map(|s| match s {
            Step::Mount {
                dst, flags, fstype, ..
            } if text(dst) == path(&m.join("usr/local/bin")) => Some((*flags, fstype.clone())),
            _ => None,
        });
        let (flags, fstype) = local_bin.expect("an overlay on /usr/local/bin");
        assert_eq!(fstype.as_deref(), Some(c"overlay"));
        assert_ne!(flags & libc::MS_RDONLY, 0);
        // The root itself is a fresh, size-capped tmpfs: the sandbox's writable layer.
        let Some(Step::Mount {
            dst,
            fstype,
            data,
            src: None,
            ..
        }) = p.steps.first()
        else {
            panic!("the plan does not start with the root tmpfs");
        };
        assert_eq!(text(dst), path(&m));
        assert_eq!(fstype.as_deref(), Some(c"tmpfs"));
        assert_eq!(
            data.as_ref().map(text).as_deref(),
            Some("size=1073741824,nr_inodes=65536,mode=0755")
        );
        assert_eq!(p.new_root.as_ref().map(text), Some(path(&m)));
        assert_eq!(p.layer.as_ref().map(text), Some(path(&m)));
        assert!(!p.wants_lower());
    }

    fn path_of(p: &Path) -> String {
        format!("{}/", p.display())
    }

    #[test]
    fn the_host_template_takes_nothing_else_from_the_host() {
        let f = fixture();
        let p = plan_on(&f.rt, &Rootfs::Host, &LIMITS, "sbx", &f.host).expect("plan");
        let m = f.rt.mnt();
        assert_no_host_private_dirs(&p, &f.host, &m);
        // The allow-list of sources: the system directories, the runtime directory's masks,
        // empty directory and staged files, the six device nodes, `/proc` over itself.
        let host_dirs: Vec<String> = ["usr", "sbin", "lib64", "etc"]
            .iter()
            .map(|d| path(&f.host.join(d)))
            .collect();
        let devices: Vec<String> = ["null", "zero", "full", "random", "urandom", "tty"]
            .iter()
            .map(|d| format!("/dev/{d}"))
            .collect();
        for src in sources(&p) {
            let ok = host_dirs.contains(&src)
                || src.starts_with(&path_of(f.rt.root()))
                || devices.contains(&src)
                || src.starts_with(&path_of(&m.join("proc")))
                || src == path(&m.join("usr/local/bin"));
            assert!(ok, "the plan mounts {src} from the host");
        }
        // Fresh, empty directories stand where the host's private ones would be.
        for d in ["tmp", "home", "home/user", "root", "var", "var/tmp", "run"] {
            let at = path(&m.join(d));
            assert!(
                p.steps
                    .iter()
                    .any(|s| matches!(s, Step::Mkdir { path, .. } if text(path) == at)),
                "no fresh {d}"
            );
        }
    }

    #[test]
    fn proc_and_dev_are_fresh_with_masked_and_read_only_paths() {
        let f = fixture();
        let p = plan_on(&f.rt, &Rootfs::Host, &LIMITS, "sbx", &f.host).expect("plan");
        let root = f.rt.mnt();
        let proc_ = root.join("proc");
        let fresh = |fs_type: &std::ffi::CStr, at: &Path| {
            p.steps.iter().find_map(|s| match s {
                Step::Mount {
                    src: None,
                    dst,
                    fstype: Some(t),
                    flags,
                    data,
                    ..
                } if t.as_c_str() == fs_type && text(dst) == path(at) => {
                    Some((*flags, data.as_ref().map(text)))
                }
                _ => None,
            })
        };
        let (flags, _) = fresh(c"proc", &proc_).expect("a fresh /proc");
        let want = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        assert_eq!(flags & want, want);
        for name in [
            "kcore",
            "keys",
            "sysrq-trigger",
            "kallsyms",
            "kmsg",
            "timer_list",
        ] {
            let dst = path(&proc_.join(name));
            assert!(
                binds(&p).contains(&("/dev/null".into(), dst.clone())),
                "{dst} is not masked"
            );
        }
        for name in ["acpi", "scsi", "firmware"] {
            let (flags, _) = fresh(c"tmpfs", &proc_.join(name)).expect("masked directory");
            assert_ne!(flags & libc::MS_RDONLY, 0, "{name}");
        }
        for name in ["sys", "fs", "irq", "bus"] {
            let dst = path(&proc_.join(name));
            assert!(binds(&p).contains(&(dst.clone(), dst.clone())), "{dst}");
            assert_eq!(attrs(&p, &dst) & RO, RO, "{dst} is writable");
        }
        let dev = root.join("dev");
        let (_, data) = fresh(c"tmpfs", &dev).expect("a fresh /dev");
        assert_eq!(data.as_deref(), Some("size=64k,mode=0755"));
        let dev_binds: Vec<String> = binds(&p)
            .into_iter()
            .filter(|(_, dst)| dst.starts_with(&path_of(&dev)))
            .map(|(src, _)| src)
            .collect();
        assert_eq!(
            dev_binds,
            [
                "/dev/null",
                "/dev/zero",
                "/dev/full",
                "/dev/random",
                "/dev/urandom",
                "/dev/tty"
            ]
        );
        let (_, pts) = fresh(c"devpts", &dev.join("pts")).expect("a private devpts");
        assert_eq!(
            pts.as_deref(),
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5,max=64")
        );
        let (_, shm) = fresh(c"tmpfs", &dev.join("shm")).expect("a /dev/shm");
        assert_eq!(shm.as_deref(), Some("size=67108864,mode=1777"));
        assert_ne!(attrs(&p, &path(&dev)) & ATTR_RDONLY, 0, "/dev is writable");
    }

    #[test]
    fn a_directory_template_is_an_overlay_with_nothing_of_the_host() {
        let f = fixture();
        let tpl = f.tmp.path().join("template");
        fs::create_dir_all(tpl.join("etc")).expect("mkdir");
        fs::write(tpl.join("etc/shadow"), b"").expect("write");
        let p = plan_on(&f.rt, &Rootfs::Dir(tpl.clone()), &LIMITS, "sbx", &f.host).expect("plan");
        let m = f.rt.mnt();
        let root = m.join("root");
        assert!(p.wants_lower());
        let overlay = p.steps.iter().find_map(|s| match s {
            Step::Mount {
                dst,
                fstype: Some(t),
                data: Some(d),
                ..
            } if t.as_bytes() == b"overlay" => Some((text(dst), text(d))),
            _ => None,
        });
        assert_eq!(
            overlay,
            Some((
                path(&root),
                format!(
                    "lowerdir={},upperdir={},workdir={},userxattr",
                    path(&m.join("lower")),
                    path(&m.join("upper")),
                    path(&m.join("work"))
                )
            ))
        );
        assert_eq!(p.new_root.as_ref().map(text), Some(path(&root)));
        assert_eq!(p.layer.as_ref().map(text), Some(path(&m.join("upper"))));
        assert!(
            !p.steps
                .iter()
                .any(|s| matches!(s, Step::SharedReadOnly { .. })),
            "host directories in a directory template"
        );
        assert_no_host_private_dirs(&p, &f.host, &root);
        let devices: Vec<String> = ["null", "zero", "full", "random", "urandom", "tty"]
            .iter()
            .map(|d| format!("/dev/{d}"))
            .collect();
        for src in sources(&p) {
            let ok = src == path(&tpl.canonicalize().expect("canonical"))
                || src == path(&m.join("lower"))
                || devices.contains(&src)
                || src.starts_with(&path_of(&root.join("proc")));
            assert!(ok, "a directory template mounts {src} from the host");
        }
    }

    #[test]
    fn unusable_template_directories_are_refused() {
        let f = fixture();
        let plan_dir = |dir: PathBuf| plan_on(&f.rt, &Rootfs::Dir(dir), &LIMITS, "sbx", &f.host);
        let file = f.tmp.path().join("a-file");
        fs::write(&file, b"").expect("write");
        assert!(matches!(plan_dir(file), Err(JailError::Invalid(_))));
        let comma = f.tmp.path().join("a,b");
        fs::create_dir(&comma).expect("mkdir");
        assert!(matches!(plan_dir(comma), Err(JailError::Invalid(_))));
        // An ancestor of the runtime directory cannot be a lower layer under it.
        assert!(matches!(
            plan_dir(f.tmp.path().to_path_buf()),
            Err(JailError::Invalid(_))
        ));
        assert!(matches!(
            plan_dir(f.tmp.path().join("missing")),
            Err(JailError::Os { .. })
        ));
    }

    #[test]
    fn the_real_plan_reads_this_host() {
        let f = fixture();
        let p = plan(&f.rt, &Rootfs::Host, &LIMITS, "sbx").expect("plan");
        let m = f.rt.mnt();
        if Path::new("/etc/shadow").is_file() {
            assert!(mount_targets(&p).contains(&path(&m.join("etc/shadow"))));
        }
        assert_no_host_private_dirs(&p, Path::new("/"), &m);
    }
}
