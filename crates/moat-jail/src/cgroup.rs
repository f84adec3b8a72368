//! cgroups for sandboxes, on cgroup v2, v1, or the hybrid of both (v1 controllers plus a v2 mount
//! without controllers, which still has `cgroup.kill` and `cgroup.freeze`). The layout is detected
//! from `/proc/self/mountinfo` and `/proc/self/cgroup`, never assumed. Sandbox cgroups are created
//! below the cgroup this process is in (`<own>/moat/<name>`), because that one may itself be
//! limited by whoever started us.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{JailError, Result};

/// Which cgroup version carries the resource controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Unified hierarchy with controllers.
    V2,
    /// Per-controller v1 hierarchies (possibly with a controller-less v2 mount beside them).
    V1,
}

/// The cgroup hierarchies of this host, as seen from this process.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Which version has the controllers.
    pub version: Version,
    /// For v2: the directory our sandboxes go under. For v1: per controller.
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    cpu: Option<PathBuf>,
    freezer: Option<PathBuf>,
    /// A v2 directory (with or without controllers) for `cgroup.kill` and `cgroup.freeze`.
    unified: Option<PathBuf>,
    /// The v2 mount point and its superblock options, for [`Layout::favor_dynamic_changes`].
    v2_mount: Option<(PathBuf, String)>,
}

/// The child cgroup (of the memory controller) that holds a sandbox's user processes, so that
/// their memory limit is not the agent's: a sandbox that runs out of memory loses a user process,
/// never its agent (see [`SandboxCgroup::user_procs_file`]).
pub const USER_CGROUP: &str = "user";

/// On cgroup v2, where a cgroup with controllers for its children may hold no process, the leaf
/// the agent lives in beside [`USER_CGROUP`].
pub const AGENT_CGROUP: &str = "agent";

/// Memory the agent may use beyond the sandbox's own limit: the sandbox's cgroup allows its limit
/// plus this, its user processes (and what they write to the sandbox's tmpfs) the limit alone. A
/// sandbox that exhausts its memory thus leaves the agent this much to report it with.
pub const AGENT_MEMORY_RESERVE: u64 = 32 << 20;

/// Tasks the agent may have beyond the sandbox's pids limit, which its user processes have to
/// themselves: a fork bomb cannot keep the agent from starting a thread.
pub const AGENT_PIDS_RESERVE: u64 = 32;

/// On cgroup v1, where socket buffers are not part of a cgroup's memory, the share of the
/// memory limit they may take in addition (TCP and UDP buffers; `memory.kmem.tcp.limit_in_bytes`).
/// cgroup v2 charges them to the memory limit itself.
pub const V1_SOCKET_MEMORY_DIVISOR: u64 = 4;

/// Limits applied to a sandbox cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit of the sandbox's user processes in bytes (swap is disabled); the agent has
    /// [`AGENT_MEMORY_RESERVE`] beyond it.
    pub memory_bytes: u64,
    /// CPU limit in thousandths of a CPU (1000 = one CPU).
    pub cpu_millis: u64,
    /// Maximum number of tasks.
    pub pids: u64,
}

struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    /// Superblock options (where v1 names its controllers).
    options: String,
}

/// The mounts listed in `text`, a `/proc/<pid>/mountinfo`.
fn mounts(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        out.push(Mount {
            root: unescape(l[3]),
            point: PathBuf::from(unescape(l[4])),
            fstype: r[0].to_string(),
            options: r[2].to_string(),
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `(controllers, path)` pairs of `text`, a `/proc/<pid>/cgroup`; v2 has an empty controller
/// list.
fn own_cgroups(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let ctrls = parts.next()?;
            let path = parts.next()?;
            let ctrls = if ctrls.is_empty() {
                Vec::new()
            } else {
                ctrls.split(',').map(str::to_string).collect()
            };
            Some((ctrls, path.to_string()))
        })
        .collect()
}

/// The directory of our own cgroup in a hierarchy mounted at `m`, given our path in it.
fn own_dir(m: &Mount, path: &str) -> PathBuf {
    // A mount whose root is not "/" shows only part of the hierarchy.
    let rel = path
        .strip_prefix(m.root.trim_end_matches('/'))
        .unwrap_or(path);
    m.point.join(rel.trim_start_matches('/'))
}

impl Layout {
    /// Detects the hierarchies and our place in them.
    pub fn detect() -> Result<Layout> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| JailError::os("read /proc/self/mountinfo", e))?;
        let cgroup = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| JailError::os("read /proc/self/cgroup", e))?;
        Layout::from_tables(&mountinfo, &cgroup)
    }

    /// The layout a process with this `mountinfo` and `cgroup` (the texts of its
    /// `/proc/<pid>/` files) sees; the hierarchies' own files are read where they are mounted
    /// (tests point them at a made-up tree).
    fn from_tables(mountinfo: &str, cgroup: &str) -> Result<Layout> {
        let mounts = mounts(mountinfo);
        let own = own_cgroups(cgroup);
        let v2_path = own
            .iter()
            .find(|(c, _)| c.is_empty())
            .map(|(_, p)| p.clone());
        let v2_mount = mounts.iter().find(|m| m.fstype == "cgroup2");
        let v2_mount_info = v2_mount.map(|m| (m.point.clone(), m.options.clone()));
        let unified = match (v2_mount, &v2_path) {
            (Some(m), Some(p)) => Some(own_dir(m, p)),
            _ => None,
        };
        let v2_controllers = unified
            .as_ref()
            .and_then(|d| fs::read_to_string(d.join("cgroup.controllers")).ok())
            .unwrap_or_default();
        let v1_dir = |ctrl: &str| -> Option<PathBuf> {
            let m = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == ctrl))?;
            let (_, p) = own.iter().find(|(c, _)| c.iter().any(|x| x == ctrl))?;
            Some(own_dir(m, p))
        };
        let v1_memory = v1_dir("memory");
        if v1_memory.is_none() && v2_controllers.split_whitespace().any(|c| c == "memory") {
            let dir = unified.clone();
            return Ok(Layout {
                version: Version::V2,
                memory: dir.clone(),
                pids: dir.clone(),
                cpu: dir.clone(),
                freezer: None,
                unified: dir,
                v2_mount: v2_mount_info,
            });
        }
        if v1_memory.is_none() {
            return Err(JailError::Invalid(
                "no memory cgroup controller found (neither cgroup v2 nor v1)".into(),
            ));
        }
        Ok(Layout {
            version: Version::V1,
            memory: v1_memory,
            pids: v1_dir("pids"),
            cpu: v1_dir("cpu"),
            freezer: v1_dir("freezer"),
            unified,
            v2_mount: v2_mount_info,
        })
    }

    /// Whether the v2 hierarchy favours dynamic changes (`favordynmods`).
    pub fn favors_dynamic_changes(&self) -> bool {
        self.v2_mount
            .as_ref()
            .is_some_and(|(_, o)| o.split(',').any(|x| x == "favordynmods"))
    }

    /// Remounts the v2 hierarchy with `favordynmods` (Linux 6.0+), keeping its other options.
    ///
    /// Moving a task into a cgroup takes a global lock whose writer waits for an RCU grace period
    /// unless this flag is set: 5 to 15 ms per sandbox start here, against 0.5 ms with it. The
    /// price is a slightly slower fork and exit for every process of the host, which is what a
    /// sandbox host wants. Returns whether the flag is now set.
    pub fn favor_dynamic_changes(&mut self) -> Result<bool> {
        if self.favors_dynamic_changes() {
            return Ok(true);
        }
        let Some((point, options)) = &self.v2_mount else {
            return Ok(false);
        };
        let mut opts: Vec<&str> = options
            .split(',')
            .filter(|o| !o.is_empty() && *o != "rw" && *o != "ro")
            .collect();
        opts.push("favordynmods");
        let data = opts.join(",");
        let target =
            std::ffi::CString::new(point.as_os_str().as_encoded_bytes()).map_err(|_| {
                JailError::Invalid(format!("mount point with NUL: {}", point.display()))
            })?;
        let cdata = std::ffi::CString::new(data.clone())
            .map_err(|_| JailError::Invalid("mount options with NUL".into()))?;
        // SAFETY: valid C strings; a remount of an existing cgroup2 superblock with its own options
        // plus one flag.
        let r = unsafe {
            libc::mount(
                c"none".as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT,
                cdata.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(JailError::last_os(format!(
                "remount {} with {data}",
                point.display()
            )));
        }
        if let Some((_, o)) = &mut self.v2_mount {
            o.push_str(",favordynmods");
        }
        Ok(true)
    }

    /// Human-readable description for `moat check`.
    pub fn describe(&self) -> String {
        let show = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "-".into())
        };
        match self.version {
            Version::V2 => format!("v2 at {}", show(&self.unified)),
            Version::V1 => format!(
                "v1 (memory {}, pids {}, cpu {}, freezer {}; v2 for kill/freeze: {})",
                show(&self.memory),
                show(&self.pids),
                show(&self.cpu),
                show(&self.freezer),
                show(&self.unified)
            ),
        }
    }

    /// Every base directory (`<own>/moat`) sandbox cgroups live under.
    pub fn bases(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = [
            &self.memory,
            &self.pids,
            &self.cpu,
            &self.freezer,
            &self.unified,
        ]
        .into_iter()
        .flatten()
        .map(|p| p.join("moat"))
        .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Caps the tasks of all sandboxes together at `max` (`pids.max` of the `moat` cgroup every
    /// sandbox's pids cgroup is made under), so that sandboxes at their own limits cannot take
    /// every pid of the host (see [`sandbox_pids_budget`]). A host without a pids controller
    /// is left as it is.
    pub fn cap_total_pids(&self, max: u64) -> Result<()> {
        let Some(pids) = &self.pids else {
            return Ok(());
        };
        let base = pids.join("moat");
        make_base(&base, self.version)?;
        write(&base.join("pids.max"), &max.to_string())
    }

    /// Removes empty sandbox cgroups older than `min_age` whose name `select` accepts: what a
    /// process killed before it could
    /// clean up left behind (a guardian killed with it, or a server restart). The age spares a
    /// sandbox that is being created right now, whose cgroups are empty for a moment. Returns how
    /// many directories were removed.
    pub fn sweep(&self, min_age: Duration, select: impl Fn(&str) -> bool) -> usize {
        let mut removed = 0;
        for base in self.bases() {
            let Ok(entries) = fs::read_dir(&base) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                let old_enough = fs::symlink_metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= min_age);
                let selected = e.file_name().to_str().is_some_and(&select);
                if !path.is_dir() || !old_enough || !selected {
                    continue;
                }
                // Only a sandbox with no process left anywhere: on v2 a live one's own
                // directory is empty too, its agent and user processes being in the children.
                let children = [path.join(USER_CGROUP), path.join(AGENT_CGROUP)];
                let empty = [&path, &children[0], &children[1]].iter().all(|d| {
                    fs::read_to_string(d.join("cgroup.procs")).map_or(true, |p| p.trim().is_empty())
                });
                if !empty {
                    continue;
                }
                for child in &children {
                    if fs::remove_dir(child).is_ok() {
                        removed += 1;
                    }
                }
                if fs::remove_dir(&path).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// Tasks (processes and threads) the host keeps for itself beyond every sandbox's: at least this
/// many, or an eighth of its task limit where that is more.
pub const HOST_PIDS_RESERVE: u64 = 4096;

/// How many tasks all sandboxes together may have: the host's task limit (the smaller of
/// `kernel.pid_max` and `kernel.threads-max`) less [`HOST_PIDS_RESERVE`] (or an eighth of the
/// limit, where that is more), so the host and the server can always fork.
pub fn sandbox_pids_budget() -> Result<u64> {
    let read = |path: &str| -> Result<u64> {
        let text =
            fs::read_to_string(path).map_err(|e| JailError::os(format!("read {path}"), e))?;
        text.trim()
            .parse()
            .map_err(|_| JailError::Invalid(format!("{path}: not a number: {text:?}")))
    };
    let limit = read("/proc/sys/kernel/pid_max")?.min(read("/proc/sys/kernel/threads-max")?);
    Ok(pids_budget(limit))
}

fn pids_budget(host_limit: u64) -> u64 {
    let reserve = HOST_PIDS_RESERVE.max(host_limit / 8);
    host_limit.saturating_sub(reserve).max(1)
}

/// The cgroup directories of one sandbox.
#[derive(Debug)]
pub struct SandboxCgroup {
    version: Version,
    /// Every directory, parents before their children (removal goes in reverse).
    dirs: Vec<PathBuf>,
    /// The sandbox's memory cgroup (its limit covers the agent and the user processes).
    memory: PathBuf,
    /// The memory cgroup of the user processes (`memory/…/<id>/user`).
    user: PathBuf,
    /// The pids cgroup of the user processes where it is not `user` (v1: `pids/…/<id>/user`).
    user_pids: Option<PathBuf>,
    /// The directories whose `cgroup.procs` the agent is written into.
    agent: Vec<PathBuf>,
    /// The v1 cpu directory (for `cpuacct.usage` where cpuacct is mounted with cpu).
    cpu: Option<PathBuf>,
    freezer: Option<PathBuf>,
    unified: Option<PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value)
        .map_err(|e| JailError::os(format!("write {value:?} to {}", path.display()), e))
}

fn make_base(dir: &Path, version: Version) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(JailError::os(format!("mkdir {}", dir.display()), e)),
    }
    if version == Version::V2 {
        enable_v2_controllers(dir)?;
    }
    Ok(())
}

/// Enables memory, pids and cpu for the children of `base` (and of its parent). A v2 cgroup with
/// processes in it cannot delegate controllers, so if our own cgroup holds processes (us), we
/// move ourselves into a leaf first.
fn enable_v2_controllers(base: &Path) -> Result<()> {
    let Some(parent) = base.parent() else {
        return Ok(());
    };
    let want = "+memory +pids +cpu";
    if fs::write(parent.join("cgroup.subtree_control"), want).is_err() {
        let leaf = parent.join("moat-host");
        let _ = fs::create_dir(&leaf);
        let procs = fs::read_to_string(parent.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = fs::write(leaf.join("cgroup.procs"), pid);
        }
        write(&parent.join("cgroup.subtree_control"), want)?;
    }
    write(&base.join("cgroup.subtree_control"), want)
}

impl SandboxCgroup {
    /// Creates the cgroups of sandbox `name` (validated by the caller) with `limits`.
    ///
    /// In every hierarchy the sandbox gets `<base>/moat/<name>`; the memory controller's also
    /// gets a [`USER_CGROUP`] child for user processes (and, on v2, an [`AGENT_CGROUP`] leaf for
    /// the agent, since a v2 cgroup that limits its children holds no process itself).
    pub fn create(layout: &Layout, name: &str, limits: &Limits) -> Result<SandboxCgroup> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut mkdir = |dir: PathBuf| -> Result<PathBuf> {
            if !dirs.contains(&dir) {
                fs::create_dir(&dir)
                    .map_err(|e| JailError::os(format!("mkdir {}", dir.display()), e))?;
                dirs.push(dir.clone());
            }
            Ok(dir)
        };
        let result = (|| {
            let mut made = |base: &Option<PathBuf>| -> Result<Option<PathBuf>> {
                let Some(base) = base else { return Ok(None) };
                let base = base.join("moat");
                make_base(&base, layout.version)?;
                mkdir(base.join(name)).map(Some)
            };
            let memory = made(&layout.memory)?
                .ok_or_else(|| JailError::Invalid("no memory cgroup".into()))?;
            let pids = made(&layout.pids)?;
            let cpu = made(&layout.cpu)?;
            let unified = made(&layout.unified)?;
            // A v2 cgroup that can freeze makes the v1 freezer redundant: one cgroup fewer to
            // make, join and remove per sandbox.
            let v2_freezes = unified
                .as_ref()
                .is_some_and(|u| u.join("cgroup.freeze").exists());
            let freezer = if v2_freezes {
                None
            } else {
                made(&layout.freezer)?
            };
            let (user, user_pids, agent) = match layout.version {
                Version::V2 => {
                    let control = if pids.is_some() {
                        "+memory +pids"
                    } else {
                        "+memory"
                    };
                    write(&memory.join("cgroup.subtree_control"), control)?;
                    let agent = mkdir(memory.join(AGENT_CGROUP))?;
                    (mkdir(memory.join(USER_CGROUP))?, None, vec![agent])
                }
                Version::V1 => {
                    let agent = [Some(&memory), pids.as_ref(), cpu.as_ref(), unified.as_ref()]
                        .into_iter()
                        .chain([freezer.as_ref()])
                        .flatten()
                        .cloned()
                        .fold(Vec::new(), |mut v, d| {
                            if !v.contains(&d) {
                                v.push(d);
                            }
                            v
                        });
                    let user_pids = pids
                        .as_ref()
                        .map(|p| mkdir(p.join(USER_CGROUP)))
                        .transpose()?;
                    (mkdir(memory.join(USER_CGROUP))?, user_pids, agent)
                }
            };
            Ok((memory, user, user_pids, agent, pids, cpu, freezer, unified))
        })();
        let (memory, user, user_pids, agent, pids, cpu, freezer, unified) = match result {
            Ok(v) => v,
            Err(e) => {
                for d in dirs.iter().rev() {
                    let _ = fs::remove_dir(d);
                }
                return Err(e);
            }
        };
        let cg = SandboxCgroup {
            version: layout.version,
            dirs,
            memory,
            user,
            user_pids,
            agent,
            cpu: cpu.clone(),
            freezer,
            unified,
        };
        if let Err(e) = cg.apply_limits(limits, pids.as_deref(), cpu.as_deref()) {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn apply_limits(&self, l: &Limits, pids: Option<&Path>, cpu: Option<&Path>) -> Result<()> {
        let user_mem = l.memory_bytes.to_string();
        let user_pids = l.pids.to_string();
        let total_pids = l.pids.saturating_add(AGENT_PIDS_RESERVE).to_string();
        let total_mem = l
            .memory_bytes
            .saturating_add(AGENT_MEMORY_RESERVE)
            .to_string();
        let period = 100_000u64;
        let quota = (l.cpu_millis * period / 1000).max(1000);
        match self.version {
            Version::V2 => {
                for (dir, mem) in [(&self.memory, &total_mem), (&self.user, &user_mem)] {
                    write(&dir.join("memory.max"), mem)?;
                    let swap = dir.join("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    }
                }
                if let Some(p) = pids {
                    write(&p.join("pids.max"), &total_pids)?;
                    write(&self.user.join("pids.max"), &user_pids)?;
                }
                if let Some(c) = cpu {
                    write(&c.join("cpu.max"), &format!("{quota} {period}"))?;
                }
            }
            Version::V1 => {
                // Socket buffers live outside v1's memory counter: give them a limit of their
                // own, or one sandbox's unread sockets take the host's whole `tcp_mem`. Set on
                // the user cgroup too, since accounting is on only where a limit was written.
                let sockets = (l.memory_bytes / V1_SOCKET_MEMORY_DIVISOR).to_string();
                for (dir, mem) in [(&self.memory, &total_mem), (&self.user, &user_mem)] {
                    write(&dir.join("memory.limit_in_bytes"), mem)?;
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, mem)?;
                    } else {
                        // No swap accounting: keep the kernel from swapping this cgroup at all.
                        let _ = fs::write(dir.join("memory.swappiness"), "0");
                    }
                    let tcp = dir.join("memory.kmem.tcp.limit_in_bytes");
                    if tcp.exists() {
                        write(&tcp, &sockets)?;
                    }
                }
                if let Some(p) = pids {
                    write(&p.join("pids.max"), &total_pids)?;
                }
                if let Some(u) = &self.user_pids {
                    write(&u.join("pids.max"), &user_pids)?;
                }
                if let Some(c) = cpu {
                    write(&c.join("cpu.cfs_period_us"), &period.to_string())?;
                    write(&c.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a new sandbox's agent must be written into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.agent.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The `cgroup.procs` files of the user processes' cgroups (memory, and pids where that is
    /// another hierarchy). The agent gets them open for writing (opened by the host, whose
    /// credentials the kernel checks on each write) and writes `0` to each in every user
    /// process before `exec`, moving that process there.
    pub fn user_procs_files(&self) -> Vec<PathBuf> {
        [Some(&self.user), self.user_pids.as_ref()]
            .into_iter()
            .flatten()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Moves `pid` (the agent) into every cgroup of the sandbox.
    pub fn attach(&self, pid: i32) -> Result<()> {
        for f in self.procs_files() {
            write(&f, &pid.to_string())?;
        }
        Ok(())
    }

    /// How many times the kernel's OOM killer killed a process of this sandbox.
    pub fn oom_kills(&self) -> u64 {
        let read = |dir: &Path, file: &str| {
            let text = fs::read_to_string(dir.join(file)).unwrap_or_default();
            text.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        match self.version {
            // v2 counts the events of the whole subtree.
            Version::V2 => read(&self.memory, "memory.events"),
            // v1 counts each cgroup's own.
            Version::V1 => {
                read(&self.memory, "memory.oom_control") + read(&self.user, "memory.oom_control")
            }
        }
    }

    /// Current memory use in bytes.
    pub fn memory_current(&self) -> u64 {
        let file = match self.version {
            Version::V2 => "memory.current",
            Version::V1 => "memory.usage_in_bytes",
        };
        fs::read_to_string(self.memory.join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Memory of the page cache (file pages, including the writable layer's tmpfs), bytes:
    /// `file` of v2's `memory.stat`, `cache` of v1's.
    pub fn memory_cache(&self) -> u64 {
        let key = match self.version {
            Version::V2 => "file",
            Version::V1 => "cache",
        };
        let text = fs::read_to_string(self.memory.join("memory.stat")).unwrap_or_default();
        stat_value(&text, key).unwrap_or(0)
    }

    /// CPU time the sandbox's processes used so far, microseconds: `usage_usec` of a v2
    /// `cpu.stat` (which every v2 cgroup has, with or without the cpu controller, so a hybrid
    /// host's controller-less v2 directory counts too), else v1's `cpuacct.usage` where
    /// cpuacct is mounted with cpu; 0 where neither is readable.
    pub fn cpu_usage_usec(&self) -> u64 {
        let v2 = match self.version {
            Version::V2 => Some(&self.memory),
            Version::V1 => self.unified.as_ref(),
        };
        if let Some(usec) = v2
            .and_then(|d| fs::read_to_string(d.join("cpu.stat")).ok())
            .and_then(|text| stat_value(&text, "usage_usec"))
        {
            return usec;
        }
        self.cpu
            .as_ref()
            .and_then(|d| fs::read_to_string(d.join("cpuacct.usage")).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(0, |ns| ns / 1000)
    }

    /// Freezes (`true`) or thaws (`false`) every process of the sandbox.
    pub fn set_frozen(&self, frozen: bool) -> Result<()> {
        if let Some(u) = self
            .unified
            .as_ref()
            .filter(|u| u.join("cgroup.freeze").exists())
        {
            return write(&u.join("cgroup.freeze"), if frozen { "1" } else { "0" });
        }
        if let Some(f) = &self.freezer {
            return write(
                &f.join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            );
        }
        Err(JailError::Invalid("this host has no cgroup freezer".into()))
    }

    /// Whether every process of the sandbox is frozen: a freeze is asynchronous, and done only
    /// once the kernel reports it (`frozen 1` in v2's `cgroup.events`, `FROZEN` in v1's
    /// `freezer.state`, which reads `FREEZING` meanwhile).
    pub fn is_frozen(&self) -> bool {
        if let Some(u) = self
            .unified
            .as_ref()
            .filter(|u| u.join("cgroup.freeze").exists())
        {
            return fs::read_to_string(u.join("cgroup.events"))
                .is_ok_and(|events| events.lines().any(|l| l.trim() == "frozen 1"));
        }
        self.freezer.as_ref().is_some_and(|f| {
            fs::read_to_string(f.join("freezer.state")).is_ok_and(|s| s.trim() == "FROZEN")
        })
    }

    /// The cgroups a sandbox named `name` left on this host, if any (after its owner died).
    pub fn existing(layout: &Layout, name: &str) -> Option<SandboxCgroup> {
        let dir_of = |base: &Option<PathBuf>| {
            base.as_ref()
                .map(|b| b.join("moat").join(name))
                .filter(|d| d.is_dir())
        };
        let memory = dir_of(&layout.memory);
        let unified = dir_of(&layout.unified);
        let freezer = dir_of(&layout.freezer);
        let mut dirs: Vec<PathBuf> = [
            memory.clone(),
            dir_of(&layout.pids),
            dir_of(&layout.cpu),
            unified.clone(),
            freezer.clone(),
        ]
        .into_iter()
        .flatten()
        .collect();
        dirs.dedup();
        let memory = memory.or_else(|| dirs.first().cloned())?;
        let user = memory.join(USER_CGROUP);
        let (agent, user_pids) = match layout.version {
            Version::V2 => (vec![memory.join(AGENT_CGROUP)], None),
            Version::V1 => (
                dirs.clone(),
                dir_of(&layout.pids).map(|p| p.join(USER_CGROUP)),
            ),
        };
        // Children after their parents, so removal (in reverse) takes them first.
        let children = [
            Some(memory.join(AGENT_CGROUP)),
            Some(user.clone()),
            user_pids.clone(),
        ];
        for child in children.into_iter().flatten() {
            if child.is_dir() && !dirs.contains(&child) {
                dirs.push(child);
            }
        }
        Some(SandboxCgroup {
            version: layout.version,
            dirs,
            memory,
            user,
            user_pids,
            agent,
            cpu: dir_of(&layout.cpu),
            freezer,
            unified,
        })
    }

    /// Waits (up to `limit`) until no process is left in the sandbox; true if none is.
    pub fn wait_empty(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.dirs.iter().all(|d| {
                fs::read_to_string(d.join("cgroup.procs")).map_or(true, |p| p.trim().is_empty())
            }) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The pids currently in the sandbox (host pid namespace): every process is in one cgroup
    /// of each hierarchy, the agent's or the user processes'.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .flat_map(|d| {
                fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills every process of the sandbox: `cgroup.kill` where the kernel has it, otherwise
    /// freeze, SIGKILL each, thaw (so nothing forks in between).
    pub fn kill_all(&self) {
        if let Some(u) = self
            .unified
            .as_ref()
            .filter(|u| u.join("cgroup.kill").exists())
            && fs::write(u.join("cgroup.kill"), "1").is_ok()
        {
            return;
        }
        let frozen = self.set_frozen(true).is_ok();
        for pid in self.pids() {
            // SAFETY: kill with integer arguments; the pid came from this sandbox's cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if frozen {
            let _ = self.set_frozen(false);
        }
    }

    /// Removes the cgroup directories, waiting (up to 2 s) for exiting processes to leave.
    pub fn remove(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(2);
        for d in self.dirs.iter().rev() {
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(JailError::os(format!("rmdir {}", d.display()), e)),
                }
            }
        }
        Ok(())
    }

    /// The directories, for a cleanup process that outlives us.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines).
fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_flat_keyed_files() {
        let text = "usage_usec 1234\nuser_usec 1000\nfile 77\n";
        assert_eq!(stat_value(text, "usage_usec"), Some(1234));
        assert_eq!(stat_value(text, "file"), Some(77));
        assert_eq!(stat_value(text, "usage"), None);
    }

    #[test]
    fn pids_budget_leaves_the_host_room() {
        assert_eq!(pids_budget(32_768), 32_768 - 4096);
        assert_eq!(pids_budget(4_194_304), 4_194_304 - 524_288);
        assert_eq!(pids_budget(1000), 1);
    }

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    // cgroup trees made of ordinary directories and files, as youki's libcgroups tests do:
    // the layout is detected from made-up `mountinfo` and `cgroup` tables that point into a
    // temporary directory, and what the sandbox's cgroups get is read back as files. The
    // kernel's side (interface files appearing in a new cgroup, `rmdir` taking them along) is
    // played by the tests where it matters.

    const LIMITS: Limits = Limits {
        memory_bytes: 256 << 20,
        cpu_millis: 1500,
        pids: 100,
    };

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    fn touch(path: &Path) {
        fs::write(path, "").unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    }

    /// Deletes the ordinary files below `dir`, as the kernel's `rmdir` of a cgroup drops its
    /// interface files (a tree of ordinary directories refuses to remove a non-empty one).
    fn drop_interface_files(dir: &Path) {
        for e in fs::read_dir(dir).expect("read_dir").flatten() {
            let path = e.path();
            if path.is_dir() {
                drop_interface_files(&path);
            } else {
                fs::remove_file(&path).expect("rm");
            }
        }
    }

    /// A v2 host: the unified hierarchy at `<tmp>/cg2`, this process in
    /// `/system.slice/moat.service`, which has the memory, pids and cpu controllers.
    fn fake_v2(tmp: &Path) -> (Layout, PathBuf) {
        let point = tmp.join("cg2");
        let own = point.join("system.slice/moat.service");
        fs::create_dir_all(&own).expect("mkdir");
        fs::write(
            own.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .expect("write");
        let mountinfo = format!(
            "25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
             35 25 0:30 / {} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 \
             rw,nsdelegate,memory_recursiveprot\n",
            point.display()
        );
        let layout = Layout::from_tables(&mountinfo, "0::/system.slice/moat.service\n")
            .expect("a v2 layout");
        (layout, own)
    }

    #[test]
    fn detects_v2_and_our_place_in_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (layout, own) = fake_v2(tmp.path());
        assert_eq!(layout.version, Version::V2);
        assert_eq!(layout.bases(), [own.join("moat")]);
        assert!(!layout.favors_dynamic_changes());
        assert_eq!(layout.describe(), format!("v2 at {}", own.display()));
    }

    #[test]
    fn a_v2_sandbox_gets_its_limits_and_its_user_and_agent_children() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (layout, own) = fake_v2(tmp.path());
        let cg = SandboxCgroup::create(&layout, "sbx1", &LIMITS).expect("create");
        let base = own.join("moat");
        let sbx = base.join("sbx1");
        // Controllers delegated down to the sandboxes, and on to the user processes' child.
        assert_eq!(
            read(&own.join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(
            read(&base.join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(read(&sbx.join("cgroup.subtree_control")), "+memory +pids");
        assert_eq!(
            cg.dirs(),
            [sbx.clone(), sbx.join(AGENT_CGROUP), sbx.join(USER_CGROUP)]
        );
        // The sandbox: its limit plus the agent's reserve; its user processes: the limit.
        let user = sbx.join(USER_CGROUP);
        assert_eq!(
            read(&sbx.join("memory.max")),
            ((256 + 32) << 20).to_string()
        );
        assert_eq!(read(&user.join("memory.max")), (256 << 20).to_string());
        assert_eq!(read(&sbx.join("pids.max")), "132");
        assert_eq!(read(&user.join("pids.max")), "100");
        assert_eq!(read(&sbx.join("cpu.max")), "150000 100000");
        // Swap is limited only where the kernel offers it.
        assert!(!sbx.join("memory.swap.max").exists());
        touch(&sbx.join("memory.swap.max"));
        touch(&user.join("memory.swap.max"));
        cg.apply_limits(&LIMITS, Some(&sbx), Some(&sbx))
            .expect("apply");
        assert_eq!(read(&sbx.join("memory.swap.max")), "0");
        assert_eq!(read(&user.join("memory.swap.max")), "0");
        // The agent goes in its leaf, user processes in theirs.
        assert_eq!(
            cg.procs_files(),
            [sbx.join(AGENT_CGROUP).join("cgroup.procs")]
        );
        assert_eq!(cg.user_procs_files(), [user.join("cgroup.procs")]);
        cg.attach(4242).expect("attach");
        assert_eq!(read(&sbx.join(AGENT_CGROUP).join("cgroup.procs")), "4242");
        // A tiny CPU share still gets the kernel's smallest useful quota.
        let slow = Limits {
            cpu_millis: 1,
            ..LIMITS
        };
        cg.apply_limits(&slow, Some(&sbx), Some(&sbx))
            .expect("apply");
        assert_eq!(read(&sbx.join("cpu.max")), "1000 100000");
    }

    #[test]
    fn a_v2_sandbox_reads_its_counters_and_freezes_through_cgroup_freeze() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (layout, own) = fake_v2(tmp.path());
        let cg = SandboxCgroup::create(&layout, "sbx2", &LIMITS).expect("create");
        let sbx = own.join("moat/sbx2");
        fs::write(
            sbx.join("memory.events"),
            "low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n",
        )
        .expect("write");
        fs::write(sbx.join("memory.current"), "12345\n").expect("write");
        fs::write(sbx.join("memory.stat"), "anon 100\nfile 77\n").expect("write");
        fs::write(sbx.join("cpu.stat"), "usage_usec 5000\nuser_usec 4000\n").expect("write");
        assert_eq!(cg.oom_kills(), 2);
        assert_eq!(cg.memory_current(), 12345);
        assert_eq!(cg.memory_cache(), 77);
        assert_eq!(cg.cpu_usage_usec(), 5000);
        // No freezer at all is an error, not a silent no-op.
        assert!(cg.set_frozen(true).is_err());
        touch(&sbx.join("cgroup.freeze"));
        cg.set_frozen(true).expect("freeze");
        assert_eq!(read(&sbx.join("cgroup.freeze")), "1");
        assert!(!cg.is_frozen(), "frozen before the kernel says so");
        fs::write(sbx.join("cgroup.events"), "populated 1\nfrozen 1\n").expect("write");
        assert!(cg.is_frozen());
        cg.set_frozen(false).expect("thaw");
        assert_eq!(read(&sbx.join("cgroup.freeze")), "0");
    }

    #[test]
    fn a_v2_sandbox_is_found_again_and_removed_children_first() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (layout, own) = fake_v2(tmp.path());
        let cg = SandboxCgroup::create(&layout, "sbx3", &LIMITS).expect("create");
        let found = SandboxCgroup::existing(&layout, "sbx3").expect("existing");
        assert_eq!(found.dirs(), cg.dirs());
        assert_eq!(found.procs_files(), cg.procs_files());
        assert_eq!(found.user_procs_files(), cg.user_procs_files());
        assert!(SandboxCgroup::existing(&layout, "other").is_none());
        let sbx = own.join("moat/sbx3");
        drop_interface_files(&sbx);
        found.remove().expect("remove");
        assert!(!sbx.exists());
        assert!(own.join("moat").is_dir(), "the base outlives its sandboxes");
        // Removing what is gone already is no error.
        cg.remove().expect("remove again");
        layout.cap_total_pids(5000).expect("cap");
        assert_eq!(read(&own.join("moat/pids.max")), "5000");
    }

    #[test]
    fn a_failed_create_leaves_no_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (layout, cg_root) = fake_v1(tmp.path());
        // The memory cgroup is made first; the pids one cannot be (its name is taken by a
        // file): what was made is removed again.
        let pids_base = cg_root.join("pids/user.slice/moat");
        fs::create_dir_all(&pids_base).expect("mkdir");
        touch(&pids_base.join("taken"));
        assert!(SandboxCgroup::create(&layout, "taken", &LIMITS).is_err());
        assert!(cg_root.join("memory/moat").is_dir());
        assert!(!cg_root.join("memory/moat/taken").exists());
        assert!(pids_base.join("taken").is_file());
    }

    /// A v1 host as systemd's hybrid mode has it: memory (seen from inside a container, its
    /// mount rooted at the container's cgroup), pids, cpu with cpuacct and freezer as v1
    /// hierarchies, and a v2 mount without controllers.
    fn fake_v1(tmp: &Path) -> (Layout, PathBuf) {
        let cg = tmp.join("cg1");
        for d in [
            "memory",
            "pids/user.slice",
            "cpu,cpuacct/user.slice",
            "freezer",
            "unified/user.slice",
        ] {
            fs::create_dir_all(cg.join(d)).expect("mkdir");
        }
        touch(&cg.join("unified/user.slice/cgroup.controllers"));
        let c = cg.display();
        let mountinfo = format!(
            "25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
             40 30 0:40 /docker/abc {c}/memory rw,nosuid shared:20 - cgroup cgroup rw,memory\n\
             41 30 0:41 / {c}/pids rw,nosuid shared:21 - cgroup cgroup rw,pids\n\
             42 30 0:42 / {c}/cpu,cpuacct rw,nosuid shared:22 - cgroup cgroup rw,cpu,cpuacct\n\
             43 30 0:43 / {c}/freezer rw,nosuid shared:23 - cgroup cgroup rw,freezer\n\
             44 30 0:44 / {c}/unified rw,nosuid shared:24 - cgroup2 cgroup2 rw,nsdelegate\n"
        );
        let cgroup = "12:memory:/docker/abc\n6:pids:/user.slice\n3:cpu,cpuacct:/user.slice\n\
                      7:freezer:/\n0::/user.slice\n";
        let layout = Layout::from_tables(&mountinfo, cgroup).expect("a v1 layout");
        (layout, cg)
    }

    #[test]
    fn detects_v1_with_a_controllerless_v2_beside_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (layout, cg) = fake_v1(tmp.path());
        assert_eq!(layout.version, Version::V1);
        let mut expected = vec![
            cg.join("memory/moat"),
            cg.join("pids/user.slice/moat"),
            cg.join("cpu,cpuacct/user.slice/moat"),
            cg.join("freezer/moat"),
            cg.join("unified/user.slice/moat"),
        ];
        expected.sort();
        assert_eq!(layout.bases(), expected);
    }

    #[test]
    fn a_v1_sandbox_gets_its_limits_in_each_hierarchy() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (layout, cg_root) = fake_v1(tmp.path());
        let cg = SandboxCgroup::create(&layout, "sbx1", &LIMITS).expect("create");
        let memory = cg_root.join("memory/moat/sbx1");
        let pids = cg_root.join("pids/user.slice/moat/sbx1");
        let cpu = cg_root.join("cpu,cpuacct/user.slice/moat/sbx1");
        let freezer = cg_root.join("freezer/moat/sbx1");
        let unified = cg_root.join("unified/user.slice/moat/sbx1");
        let user = memory.join(USER_CGROUP);
        let user_pids = pids.join(USER_CGROUP);
        assert_eq!(
            read(&memory.join("memory.limit_in_bytes")),
            ((256 + 32) << 20).to_string()
        );
        assert_eq!(
            read(&user.join("memory.limit_in_bytes")),
            (256 << 20).to_string()
        );
        // Without swap accounting, no swapping at all.
        assert_eq!(read(&memory.join("memory.swappiness")), "0");
        assert_eq!(read(&user.join("memory.swappiness")), "0");
        assert!(!memory.join("memory.memsw.limit_in_bytes").exists());
        assert_eq!(read(&pids.join("pids.max")), "132");
        assert_eq!(read(&user_pids.join("pids.max")), "100");
        assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "150000");
        // v1 has no v2 controllers to delegate.
        assert!(
            !cg_root
                .join("unified/user.slice/moat/cgroup.subtree_control")
                .exists()
        );
        // Where the kernel has them: swap accounting, and socket buffers limited to a quarter
        // of the memory limit in both the sandbox's and the user processes' cgroup.
        for dir in [&memory, &user] {
            touch(&dir.join("memory.memsw.limit_in_bytes"));
            touch(&dir.join("memory.kmem.tcp.limit_in_bytes"));
        }
        cg.apply_limits(&LIMITS, Some(&pids), Some(&cpu))
            .expect("apply");
        assert_eq!(
            read(&memory.join("memory.memsw.limit_in_bytes")),
            ((256 + 32) << 20).to_string()
        );
        assert_eq!(
            read(&user.join("memory.memsw.limit_in_bytes")),
            (256 << 20).to_string()
        );
        for dir in [&memory, &user] {
            assert_eq!(
                read(&dir.join("memory.kmem.tcp.limit_in_bytes")),
                (64 << 20).to_string()
            );
        }
        // The agent joins every hierarchy; user processes move to the memory and pids children.
        let procs: Vec<PathBuf> = [&memory, &pids, &cpu, &unified, &freezer]
            .iter()
            .map(|d| d.join("cgroup.procs"))
            .collect();
        assert_eq!(cg.procs_files(), procs);
        assert_eq!(
            cg.user_procs_files(),
            [user.join("cgroup.procs"), user_pids.join("cgroup.procs")]
        );
        // No `cgroup.freeze` in the v2 directory: the v1 freezer pauses.
        cg.set_frozen(true).expect("freeze");
        assert_eq!(read(&freezer.join("freezer.state")), "FROZEN");
        assert!(cg.is_frozen());
        fs::write(
            memory.join("memory.oom_control"),
            "under_oom 0\noom_kill 2\n",
        )
        .expect("write");
        fs::write(user.join("memory.oom_control"), "under_oom 0\noom_kill 1\n").expect("write");
        assert_eq!(cg.oom_kills(), 3);
        fs::write(cpu.join("cpuacct.usage"), "7000000\n").expect("write");
        assert_eq!(cg.cpu_usage_usec(), 7000);
        fs::write(unified.join("cpu.stat"), "usage_usec 6000\n").expect("write");
        assert_eq!(cg.cpu_usage_usec(), 6000, "a v2 cpu.stat counts first");
        // Found again after a restart, and removed from every hierarchy.
        let found = SandboxCgroup::existing(&layout, "sbx1").expect("existing");
        assert_eq!(found.user_procs_files(), cg.user_procs_files());
        drop_interface_files(&cg_root);
        found.remove().expect("remove");
        for dir in [&memory, &pids, &cpu, &freezer, &unified] {
            assert!(!dir.exists(), "{} is left", dir.display());
            assert!(dir.parent().is_some_and(Path::is_dir));
        }
    }

    #[test]
    fn a_host_without_a_memory_controller_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let point = tmp.path().join("cg2");
        fs::create_dir_all(&point).expect("mkdir");
        fs::write(point.join("cgroup.controllers"), "cpu pids\n").expect("write");
        let mountinfo = format!("35 25 0:30 / {} rw - cgroup2 cgroup2 rw\n", point.display());
        assert!(matches!(
            Layout::from_tables(&mountinfo, "0::/\n"),
            Err(JailError::Invalid(_))
        ));
        assert!(matches!(
            Layout::from_tables("", ""),
            Err(JailError::Invalid(_))
        ));
    }
}
