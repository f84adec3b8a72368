//! Finding `runsc` and the gVisor platform it runs best on here.

use std::path::{Path, PathBuf};
use std::process::Command;

use moat_engine::error::{EngineError, Result};

/// How to install what the gvisor backend needs, for error messages.
pub const INSTALL_HINT: &str = "install gVisor's runsc (Debian: apt-get install runsc)";

/// The platforms `runsc` can run on, best first (`systrap` and `kvm` run application system
/// calls far faster than `ptrace`).
pub const PLATFORMS: &[&str] = &["systrap", "kvm", "ptrace"];

/// Environment variable naming a directory for runsc's debug logs (`--debug --strace`): every
/// system call of every gVisor sandbox, for diagnosis only (they grow fast).
pub const DEBUG_LOG_ENV: &str = "MOAT_RUNSC_DEBUG_LOG";

/// The `runsc` binary and the platform sandboxes run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runsc {
    /// The binary.
    pub path: PathBuf,
    /// The platform (`--platform`).
    pub platform: String,
}

impl Runsc {
    /// `runsc` from `path` (or `PATH`) with `platform` (or the best one that works here, probed
    /// once per boot and remembered in `cache_dir`). Refuses with what is missing and how to
    /// get it.
    pub fn find(path: Option<&Path>, platform: Option<&str>, cache_dir: &Path) -> Result<Runsc> {
        let path = match path {
            Some(p) => p.to_owned(),
            None => moat_jail::probe::runsc_path()
                .map(PathBuf::from)
                .ok_or_else(|| {
                    EngineError::Unsupported(format!(
                        "the gvisor backend needs runsc, which is not installed: {INSTALL_HINT}"
                    ))
                })?,
        };
        // Its real path: the outer jail shows it there.
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        if let Some(p) = platform {
            if !PLATFORMS.contains(&p) {
                return Err(EngineError::Invalid(format!(
                    "gVisor platform {p:?} is not one of {}",
                    PLATFORMS.join(", ")
                )));
            }
            version(&path)?;
            return Ok(Runsc {
                path,
                platform: p.to_owned(),
            });
        }
        // The probe runs a container per platform (seconds where kvm hangs): its answer is kept
        // for this binary (its size and time of change stand for its version, which costs a run
        // of it to ask) and kernel until the next boot empties the runtime directory.
        let md = std::fs::metadata(&path).map_err(|e| {
            EngineError::Unsupported(format!(
                "the gvisor backend cannot use {}: {e}; {INSTALL_HINT}",
                path.display()
            ))
        })?;
        let changed = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let key = format!(
            "{} {} {changed} {}",
            path.display(),
            md.len(),
            kernel_release()
        );
        let cache = cache_dir.join("platform");
        if let Ok(text) = std::fs::read_to_string(&cache)
            && let Some((k, p)) = text.trim_end().rsplit_once('\t')
            && k == key
            && PLATFORMS.contains(&p)
        {
            return Ok(Runsc {
                path,
                platform: p.to_owned(),
            });
        }
        let version = version(&path)?;
        let working = moat_jail::probe::runsc_platforms(&path.display().to_string());
        let Some(best) = working.first() else {
            return Err(EngineError::Unsupported(format!(
                "the gvisor backend cannot run here: {} ({version}) runs on none of the platforms \
                 {} (`moat check` shows the host's findings)",
                path.display(),
                PLATFORMS.join(", ")
            )));
        };
        let _ = std::fs::create_dir_all(cache_dir);
        if let Err(e) = std::fs::write(&cache, format!("{key}\t{best}\n")) {
            tracing::warn!(
                "remembering the gVisor platform in {}: {e}",
                cache.display()
            );
        }
        Ok(Runsc {
            path,
            platform: (*best).to_owned(),
        })
    }

    /// The global flags every call of runsc shares: its state under `root`; no network, or
    /// with `host_network` the sandbox's sockets made by the host kernel in the outer jail's
    /// network namespace (`--network=host`), which moat steers as it does a native sandbox's;
    /// moat's cgroups rather than its own, writes kept in the sandbox's memory; runsc's debug logs in
    /// [`DEBUG_LOG_ENV`]'s directory where that is set. Not `--rootless`: runsc is root of the
    /// sandbox's outer jail (and `restore` refuses rootless mode).
    pub fn global_args(&self, root: &Path, host_network: bool) -> Vec<String> {
        let network = if host_network { "host" } else { "none" };
        let mut args = vec![
            format!("--root={}", root.display()),
            format!("--platform={}", self.platform),
            format!("--network={network}"),
            "--ignore-cgroups".to_owned(),
            "--overlay2=root:memory".to_owned(),
        ];
        if let Some(dir) = debug_log_dir() {
            args.extend([
                "--debug".to_owned(),
                "--strace".to_owned(),
                format!("--debug-log={}/", dir.display()),
            ]);
        }
        args
    }
}

/// The directory of runsc's debug logs, where [`DEBUG_LOG_ENV`] names one.
pub(crate) fn debug_log_dir() -> Option<PathBuf> {
    std::env::var_os(DEBUG_LOG_ENV).map(PathBuf::from)
}

/// `runsc --version`'s first line.
fn version(path: &Path) -> Result<String> {
    let out = Command::new(path).arg("--version").output().map_err(|e| {
        EngineError::Unsupported(format!(
            "the gvisor backend cannot run {}: {e}; {INSTALL_HINT}",
            path.display()
        ))
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    if !out.status.success() || line.is_empty() {
        return Err(EngineError::Unsupported(format!(
            "{} --version failed ({}); {INSTALL_HINT}",
            path.display(),
            out.status
        )));
    }
    Ok(line)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}
