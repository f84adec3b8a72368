//! The OCI bundle of a gVisor sandbox: `config.json`, made from the sandbox plan, and the few
//! files it names (the root directory's skeleton, the generated `/etc` files, the masks).
//!
//! The root filesystem is the `host` template's or a template directory, as on the native
//! backend: the host's system directories (or the template) read-only, the same secrets of
//! `/etc` hidden, the same generated accounts and host name, and everything else written to a
//! layer in the sandbox's memory (runsc's `--overlay2=root:memory`). gVisor's own `/proc`,
//! `/sys` and `/dev` are the sentry's emulations, so none of the host's shows through.

use std::path::{Path, PathBuf};

use moat_engine::error::{EngineError, Result};
use moat_engine::plan::SandboxPlan;
use moat_jail::rootfs::{HostTree, SKELETON, SUDO, USER_ID, identity_files};
use moat_proto::v1;
use serde_json::{Value, json};

/// Where the agent (the moat binary) appears inside the sandbox.
pub(crate) const AGENT_PATH: &str = "/.moat/moat";

/// Capabilities of the agent inside the sentry: what it needs to run commands as any user,
/// own and move their files and signal them. User processes drop them all.
const AGENT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_SYS_CHROOT",
    "CAP_SYS_RESOURCE",
    "CAP_AUDIT_WRITE",
];

/// The bundle directory of one sandbox and what is in it.
#[derive(Debug)]
pub(crate) struct Bundle {
    dir: PathBuf,
    /// The host paths outside the bundle that its mounts show.
    host_paths: Vec<PathBuf>,
    /// The host's secrets the bundle hides.
    secrets: Vec<PathBuf>,
    /// Files and directories bound over host paths (or into the root) where runsc runs.
    covers: Vec<(PathBuf, PathBuf)>,
    /// The container's root directory.
    root: PathBuf,
}

impl Bundle {
    /// The bundle's directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host paths outside the bundle that the sandbox is shown (its root excepted).
    pub(crate) fn host_paths(&self) -> &[PathBuf] {
        &self.host_paths
    }

    /// The container's root directory (for a template directory, where the backend mounts
    /// its overlay).
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The host's secret files and directories that the sandbox is not shown: runsc's outer
    /// jail hides them, and so runsc's gofer serves the sandbox none of them.
    pub(crate) fn secrets(&self) -> &[PathBuf] {
        &self.secrets
    }

    /// `(source, target)`: files and directories to bind read-only over host paths the jail
    /// shows (the generated `/etc/passwd` over the host's) or into the root, where runsc's
    /// outer jail makes them. The gofer serves what the jail shows, so each is in the sandbox
    /// without a mount of the sentry's (a few milliseconds of start each).
    pub(crate) fn covers(&self) -> &[(PathBuf, PathBuf)] {
        &self.covers
    }

    /// Writes the bundle of a sandbox of `plan` into `dir` (which must not exist), with the
    /// agent binary `agent` and the agent's environment `agent_env`. `host` is where the
    /// host's files are read (`/`; tests give a made-up one). `owner` is the host id that is
    /// root where runsc runs: the root's skeleton and the generated files are its, the home
    /// directory its `USER_ID`'s.
    pub(crate) fn write(
        dir: &Path,
        plan: &SandboxPlan,
        agent: &Path,
        agent_env: &[String],
        host: &Path,
        owner: u32,
    ) -> Result<Bundle> {
        let io = |what: &str, p: &Path, e: std::io::Error| {
            EngineError::io(format!("{what} {}", p.display()), e)
        };
        std::fs::create_dir(dir).map_err(|e| io("create", dir, e))?;
        let mut bundle = Bundle {
            dir: dir.to_owned(),
            host_paths: Vec::new(),
            secrets: Vec::new(),
            covers: Vec::new(),
            root: PathBuf::new(),
        };
        let rootfs = dir.join("rootfs");
        let stage = dir.join("stage");
        for d in [&rootfs, &stage] {
            std::fs::create_dir(d).map_err(|e| io("create", d, e))?;
        }
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "mode=755"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "nodev", "mode=1777"]}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                   "options": ["nosuid", "noexec", "nodev", "ro"]}),
        ];
        let root_path = match &plan.rootfs {
            v1::Rootfs::Host => {
                host_tree(&rootfs, &stage, host, &mut mounts, &mut bundle)?;
                bundle.covers.push((
                    agent.to_owned(),
                    rootfs.join(AGENT_PATH.trim_start_matches('/')),
                ));
                chown_tree(dir, owner)?;
                let home = rootfs.join("home/user");
                std::os::unix::fs::lchown(&home, Some(owner + USER_ID), Some(owner + USER_ID))
                    .map_err(|e| io("chown", &home, e))?;
                rootfs
            }
            v1::Rootfs::Dir(d) => {
                // The template, under an overlay the backend mounts on `rootfs` (runsc's gofer
                // adds mount points to the root); runsc's memory overlay takes the writes.
                let d = PathBuf::from(d);
                if !d.is_dir() {
                    return Err(EngineError::Invalid(format!(
                        "template rootfs {} is not a directory",
                        d.display()
                    )));
                }
                chown_tree(&rootfs, owner)?;
                mounts.push(ro_bind(agent, Path::new(AGENT_PATH)));
                rootfs
            }
            // The engine hands backends an image's unpacked tree as a directory.
            v1::Rootfs::Image(r) | v1::Rootfs::Build(r) => {
                return Err(EngineError::Invalid(format!(
                    "image {r} reached the backend without its tree"
                )));
            }
        };
        bundle.root = root_path.clone();
        let env: Vec<Value> = agent_env
            .iter()
            .map(|e| Value::from(e.as_str()))
            .chain(std::iter::once(Value::from(
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )))
            .collect();
        let caps: Vec<Value> = AGENT_CAPS.iter().map(|c| Value::from(*c)).collect();
        // A sandbox with a network has the host kernel's sockets in the namespace runsc runs
        // in (`--network=host`): no namespace of its own, which would have no way out.
        let mut namespaces = vec![
            json!({"type": "pid"}),
            json!({"type": "ipc"}),
            json!({"type": "uts"}),
            json!({"type": "mount"}),
        ];
        if !crate::host_network(plan) {
            namespaces.push(json!({"type": "network"}));
        }
        let config = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": [AGENT_PATH, "agent"],
                "env": env,
                "cwd": "/",
                "capabilities": {
                    "bounding": caps, "effective": caps, "permitted": caps,
                    "inheritable": [], "ambient": [],
                },
                "rlimits": [{
                    "type": "RLIMIT_NOFILE",
                    "hard": moat_engine::host_limits::sandbox_nofile(),
                    "soft": moat_engine::host_limits::sandbox_nofile(),
                }],
                "noNewPrivileges": false,
            },
            "root": {"path": root_path, "readonly": false},
            "hostname": "moat",
            "mounts": mounts,
            "linux": {"namespaces": namespaces},
        });
        let path = dir.join("config.json");
        std::fs::write(&path, config.to_string()).map_err(|e| io("write", &path, e))?;
        bundle.host_paths = mounts
            .iter()
            .filter(|m| m["type"] == "bind")
            .filter_map(|m| m["source"].as_str().map(PathBuf::from))
            .filter(|p| !p.starts_with(dir))
            .collect();
        Ok(bundle)
    }

    /// Removes the bundle directory and everything in it.
    pub(crate) fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("removing {}: {e}", self.dir.display());
        }
    }
}

fn ro_bind(src: &Path, dst: &Path) -> Value {
    json!({"destination": dst, "type": "bind", "source": src,
           "options": ["rbind", "ro", "nosuid", "nodev"]})
}

/// Gives `dir` and everything in it to host id `owner` (symlinks themselves, not their targets).
fn chown_tree(dir: &Path, owner: u32) -> Result<()> {
    std::os::unix::fs::lchown(dir, Some(owner), Some(owner))
        .map_err(|e| EngineError::io(format!("chown {}", dir.display()), e))?;
    let md = std::fs::symlink_metadata(dir)
        .map_err(|e| EngineError::io(format!("stat {}", dir.display()), e))?;
    if md.is_dir() {
        for e in std::fs::read_dir(dir)
            .map_err(|e| EngineError::io(format!("read {}", dir.display()), e))?
        {
            let e = e.map_err(|e| EngineError::io(format!("read {}", dir.display()), e))?;
            chown_tree(&e.path(), owner)?;
        }
    }
    Ok(())
}

/// The `host` template's tree: the skeleton in `rootfs`, the host's system directories bound
/// read-only over it; its secrets (to mask) and generated files from `stage` over the host's
/// (to cover) in `bundle`, for runsc's outer jail.
fn host_tree(
    rootfs: &Path,
    stage: &Path,
    host: &Path,
    mounts: &mut Vec<Value>,
    bundle: &mut Bundle,
) -> Result<()> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        EngineError::io(format!("{what} {}", p.display()), e)
    };
    let tree = HostTree::read(host).map_err(|e| EngineError::Backend(e.to_string()))?;
    for (name, target) in &tree.symlinks {
        let dst = rootfs.join(name);
        std::os::unix::fs::symlink(target, &dst).map_err(|e| io("symlink", &dst, e))?;
    }
    for name in &tree.dirs {
        let dst = rootfs.join(name);
        std::fs::create_dir(&dst).map_err(|e| io("create", &dst, e))?;
        mounts.push(ro_bind(&host.join(name), &Path::new("/").join(name)));
    }
    bundle.secrets = tree
        .secret_files
        .iter()
        .chain(&tree.secret_dirs)
        .map(|s| host.join(s))
        .collect();
    for (name, contents) in identity_files("moat") {
        let staged = stage.join(name);
        std::fs::write(&staged, &contents).map_err(|e| io("write", &staged, e))?;
        if tree.identity.contains(&name) {
            bundle.covers.push((staged, host.join("etc").join(name)));
        }
    }
    e2b_commands(&tree, stage, host, rootfs, &mut bundle.covers)?;
    for (d, mode) in
        SKELETON
            .iter()
            .chain(&[("sys", 0o555), (".moat", 0o755), (".moat/local-bin", 0o755)])
    {
        let p = rootfs.join(d);
        std::fs::create_dir(&p).map_err(|e| io("create", &p, e))?;
        set_mode(&p, *mode)?;
    }
    let agent = rootfs.join(AGENT_PATH.trim_start_matches('/'));
    std::fs::write(&agent, b"").map_err(|e| io("write", &agent, e))?;
    Ok(())
}

/// Where the host's own `/usr/local/bin` appears inside, for the entries of the staged one.
const HOST_LOCAL_BIN: &str = "/.moat/local-bin";

/// `python` and `sudo` in `/usr/local/bin`, as the native backend's `host` template has them:
/// a staged directory over it, holding a symlink to each of the host's own entries (which take
/// precedence) in the host's directory, shown once beside it in the root. Two covers (see
/// [`Bundle::covers`]) whatever the host has there.
fn e2b_commands(
    tree: &HostTree,
    stage: &Path,
    host: &Path,
    rootfs: &Path,
    covers: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<()> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        EngineError::io(format!("{what} {}", p.display()), e)
    };
    let local = host.join("usr/local/bin");
    if !tree.local_bin {
        return Ok(());
    }
    let bin = stage.join("bin");
    std::fs::create_dir(&bin).map_err(|e| io("create", &bin, e))?;
    for e in std::fs::read_dir(&local)
        .map_err(|e| io("read", &local, e))?
        .flatten()
    {
        let name = e.file_name();
        let link = bin.join(&name);
        std::os::unix::fs::symlink(Path::new(HOST_LOCAL_BIN).join(&name), &link)
            .map_err(|err| io("symlink", &link, err))?;
    }
    if tree.add_python {
        std::os::unix::fs::symlink("/usr/bin/python3", bin.join("python"))
            .map_err(|e| io("symlink", &bin.join("python"), e))?;
    }
    if tree.add_sudo {
        std::fs::write(bin.join("sudo"), SUDO).map_err(|e| io("write", &bin.join("sudo"), e))?;
        set_mode(&bin.join("sudo"), 0o755)?;
    }
    covers.push((
        local.clone(),
        rootfs.join(HOST_LOCAL_BIN.trim_start_matches('/')),
    ));
    covers.push((bin, local));
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| EngineError::io(format!("chmod {}", p.display()), e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A made-up host: a merged /usr, an /etc with secrets, ssh host keys and a passwd.
    fn fake_host(root: &Path) {
        for d in ["usr/bin", "usr/local/bin", "etc/ssh", "etc/ssl/private"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        for f in [
            "etc/shadow",
            "etc/passwd",
            "etc/hostname",
            "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/ssh_host_ed25519_key.pub",
            "usr/bin/python3",
            "usr/local/bin/tool",
        ] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
    }

    fn destinations(config: &Value) -> Vec<(String, String)> {
        config["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["destination"].as_str().unwrap().to_owned(),
                    m["source"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn the_host_template_shows_system_dirs_read_only_and_hides_secrets() {
        let tmp = std::env::temp_dir().join(format!("moat-bundle-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let host = tmp.join("host");
        fake_host(&host);
        let dir = tmp.join("bundle");
        let plan = SandboxPlan::host("gvisor");
        let b = Bundle::write(
            &dir,
            &plan,
            Path::new("/usr/bin/moat"),
            &["MOAT_AGENT_CONFIG={}".into()],
            &host,
            4242,
        )
        .unwrap();
        let config: Value =
            serde_json::from_slice(&std::fs::read(b.dir().join("config.json")).unwrap()).unwrap();
        let mounts = destinations(&config);
        let find = |d: &str| {
            mounts
                .iter()
                .find(|(dst, _)| dst == d)
                .map(|(_, s)| s.clone())
        };
        // System directories from the host, read-only; symlinks as symlinks.
        assert_eq!(find("/usr"), Some(host.join("usr").display().to_string()));
        assert_eq!(find("/etc"), Some(host.join("etc").display().to_string()));
        assert_eq!(
            std::fs::read_link(dir.join("rootfs/bin")).unwrap(),
            Path::new("usr/bin")
        );
        for m in config["mounts"].as_array().unwrap() {
            if m["type"] == "bind" {
                let opts = m["options"].as_array().unwrap();
                assert!(opts.contains(&Value::from("ro")), "{m}");
            }
        }
        // Secrets the host has are for the jail to mask; ones it lacks are not named.
        let secrets = b.secrets();
        assert!(secrets.contains(&host.join("etc/shadow")));
        assert!(secrets.contains(&host.join("etc/ssh/ssh_host_ed25519_key")));
        assert!(secrets.contains(&host.join("etc/ssl/private")));
        assert!(!secrets.contains(&host.join("etc/ssh/ssh_host_ed25519_key.pub")));
        assert!(!secrets.contains(&host.join("etc/gshadow")));
        // Small files go over the host's in the jail, not as mounts of the sentry's.
        let cover = |target: &Path| {
            b.covers()
                .iter()
                .find(|(_, t)| t == target)
                .map(|(src, _)| src.clone())
        };
        assert_eq!(
            cover(&host.join("etc/passwd")),
            Some(dir.join("stage/passwd"))
        );
        assert!(
            std::fs::read_to_string(dir.join("stage/passwd"))
                .unwrap()
                .contains("user:x:1000:1000")
        );
        assert_eq!(cover(&host.join("etc/group")), None);
        assert_eq!(
            cover(&dir.join("rootfs/.moat/moat")),
            Some(PathBuf::from("/usr/bin/moat"))
        );
        assert!(dir.join("rootfs/.moat/moat").is_file());
        // python and sudo beside the host's own tool.
        assert!(dir.join("stage/bin/sudo").is_file());
        assert_eq!(
            std::fs::read_link(dir.join("stage/bin/python")).unwrap(),
            Path::new("/usr/bin/python3")
        );
        assert_eq!(
            cover(&host.join("usr/local/bin")),
            Some(dir.join("stage/bin"))
        );
        // The host's own entries through its directory, shown once in the root.
        assert_eq!(
            cover(
                &dir.join("rootfs")
                    .join(HOST_LOCAL_BIN.trim_start_matches('/'))
            ),
            Some(host.join("usr/local/bin"))
        );
        assert_eq!(
            std::fs::read_link(dir.join("stage/bin/tool")).unwrap(),
            Path::new(HOST_LOCAL_BIN).join("tool")
        );
        // The sentry mounts only the system directories and its own file systems.
        let binds: Vec<&str> = config["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["type"] == "bind")
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(binds, ["/usr", "/etc"], "{binds:?}");
        // Nothing of the host's /proc, /sys, /dev, /run, /var, /root or /home.
        for (dst, src) in &mounts {
            for hidden in ["proc", "sys", "dev", "run", "var", "root", "home"] {
                assert!(
                    !src.starts_with(&host.join(hidden).display().to_string()),
                    "{dst} from {src}"
                );
            }
        }
        // What runsc's jail must show of the host.
        assert!(b.host_paths().contains(&host.join("usr")));
        assert!(b.host_paths().iter().all(|p| !p.starts_with(&dir)));
        // Owned by the jail's root, the home by its user.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(dir.join("rootfs/tmp")).unwrap().uid(),
            4242
        );
        assert_eq!(
            std::fs::metadata(dir.join("stage/passwd")).unwrap().uid(),
            4242
        );
        assert_eq!(
            std::fs::metadata(dir.join("rootfs/home/user"))
                .unwrap()
                .uid(),
            4242 + USER_ID
        );
        // The agent runs as root, inside the sentry, from the bound moat binary.
        assert_eq!(config["process"]["args"][0], AGENT_PATH);
        assert_eq!(config["process"]["user"]["uid"], 0);
        b.remove();
        assert!(!dir.exists());
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
