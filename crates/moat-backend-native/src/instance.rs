//! One native sandbox: its processes, cgroups and uid range, and how they are paused, kept
//! and torn down.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use moat_engine::backend::{AgentChannel, Instance, InstanceStats};
use moat_engine::error::{EngineError, Result};
use moat_jail::cgroup::SandboxCgroup;
use moat_jail::guardian::Guardian;
use moat_jail::idmap::IdRange;
use moat_jail::kept;
use moat_jail::spawn::SandboxProcess;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;

use crate::{FREEZE_TIMEOUT, jail};

/// Files that mark a sandbox as keepable, removed when it is destroyed.
#[derive(Debug)]
pub(crate) struct KeepFiles {
    pub(crate) slots: std::path::PathBuf,
    pub(crate) socket: std::path::PathBuf,
}

/// What a live native sandbox holds on the host.
pub(crate) struct Live {
    pub(crate) process: SandboxProcess,
    pub(crate) cgroup: SandboxCgroup,
    pub(crate) ids: IdRange,
    pub(crate) guardian: Option<Guardian>,
    pub(crate) keep: Option<KeepFiles>,
}

/// A native sandbox.
pub struct NativeInstance {
    id: String,
    inner: Arc<Mutex<Option<Live>>>,
    /// A duplicate of the agent's pidfd, readable once the agent has exited.
    pidfd: Option<AsyncFd<OwnedFd>>,
}

impl std::fmt::Debug for NativeInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeInstance")
            .field("id", &self.id)
            .finish()
    }
}

impl NativeInstance {
    pub(crate) fn new(id: String, live: Live) -> NativeInstance {
        NativeInstance {
            id,
            inner: Arc::new(Mutex::new(Some(live))),
            pidfd: None,
        }
    }

    /// Watches the agent's pidfd, so [`Instance::exited`] resolves when it exits.
    pub(crate) fn watch_exit(&mut self) -> Result<()> {
        let fd = {
            let guard = self
                .inner
                .lock()
                .map_err(|_| EngineError::Agent("lock poisoned".into()))?;
            guard.as_ref().map(|l| l.process.pidfd())
        };
        let Some(fd) = fd else {
            return Ok(());
        };
        // SAFETY: dup of an open pidfd; the copy is ours to own.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(EngineError::io(
                "dup sandbox pidfd",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fcntl returned a fresh fd nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        // SAFETY: the OwnedFd stays open for as long as the AsyncFd owns it.
        let watched = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(|e| EngineError::io("watch sandbox pidfd", e.into()))?;
        self.pidfd = Some(watched);
        Ok(())
    }

    /// `f` of the sandbox while it is alive; `NotFound` once it is destroyed.
    fn with_live<T>(&self, f: impl FnOnce(&Live) -> Result<T>) -> Result<T> {
        let guard = self
            .inner
            .lock()
            .map_err(|_| EngineError::Agent("lock poisoned".into()))?;
        let live = guard
            .as_ref()
            .ok_or_else(|| EngineError::NotFound(self.id.clone()))?;
        f(live)
    }

    fn set_frozen(&self, frozen: bool) -> Result<()> {
        self.with_live(|live| live.cgroup.set_frozen(frozen).map_err(jail))
    }

    fn is_frozen(&self) -> Result<bool> {
        self.with_live(|live| Ok(live.cgroup.is_frozen()))
    }
}

fn teardown(mut live: Live) -> Result<()> {
    live.process.kill();
    live.cgroup.kill_all();
    live.process
        .wait()
        .map_err(|e| EngineError::io("wait for sandbox init", e))?;
    let removed = live.cgroup.remove();
    if let Some(g) = live.guardian.take() {
        g.finish();
    }
    if let Some(k) = &live.keep {
        // Still holding the slot's lock: nobody can claim the slot between these and the drop.
        let _ = kept::remove(&k.slots, live.ids.slot());
        let _ = std::fs::remove_file(&k.socket);
    }
    drop(live);
    removed.map_err(jail)?;
    Ok(())
}

#[async_trait]
impl Instance for NativeInstance {
    fn id(&self) -> &str {
        &self.id
    }

    fn take_channel(&mut self) -> Option<AgentChannel> {
        let mut guard = self.inner.lock().ok()?;
        let fd = guard.as_mut()?.process.take_channel()?;
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true).ok()?;
        UnixStream::from_std(std).ok().map(AgentChannel::Unix)
    }

    fn stats(&self) -> InstanceStats {
        let Ok(guard) = self.inner.lock() else {
            return InstanceStats::default();
        };
        match guard.as_ref() {
            Some(l) => {
                let (disk_used_bytes, disk_total_bytes) =
                    moat_jail::rootfs::writable_layer_usage(l.process.pid()).unwrap_or((0, 0));
                InstanceStats {
                    memory_bytes: l.cgroup.memory_current(),
                    oom_kills: l.cgroup.oom_kills(),
                    memory_cache_bytes: l.cgroup.memory_cache(),
                    cpu_usage_usec: l.cgroup.cpu_usage_usec(),
                    disk_used_bytes,
                    disk_total_bytes,
                }
            }
            None => InstanceStats::default(),
        }
    }

    fn oom_kills(&self) -> u64 {
        let Ok(guard) = self.inner.lock() else {
            return 0;
        };
        guard.as_ref().map_or(0, |l| l.cgroup.oom_kills())
    }

    fn host_pid(&self) -> Option<i32> {
        let guard = self.inner.lock().ok()?;
        guard.as_ref().map(|l| l.process.pid())
    }

    async fn pause(&self) -> Result<()> {
        self.set_frozen(true)?;
        // The write starts the freeze; it is done once the kernel says so.
        let deadline = tokio::time::Instant::now() + FREEZE_TIMEOUT;
        let mut wait = std::time::Duration::from_millis(1);
        while !self.is_frozen()? {
            if tokio::time::Instant::now() >= deadline {
                let _ = self.set_frozen(false);
                return Err(EngineError::Agent(format!(
                    "the processes of sandbox {} did not freeze within {FREEZE_TIMEOUT:?}",
                    self.id
                )));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_millis(50));
        }
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.set_frozen(false)
    }

    async fn open_egress(&self) -> Result<moat_engine::network::EgressSockets> {
        // The pidfd names the agent's process, whose network namespace is the sandbox's. A
        // copy of it goes to a blocking thread: entering the namespace and the netlink calls
        // take from under a millisecond to tens of them (replacing a kept sandbox's rules).
        let pidfd = self.with_live(|live| {
            // SAFETY: fcntl duplicates an open pidfd; the copy is ours to own.
            let dup = unsafe { libc::fcntl(live.process.pidfd(), libc::F_DUPFD_CLOEXEC, 3) };
            if dup < 0 {
                return Err(EngineError::io(
                    "dup sandbox pidfd",
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: fcntl returned a fresh descriptor nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(dup) })
        })?;
        let opened = tokio::task::spawn_blocking(move || {
            use std::os::fd::AsFd;
            moat_jail::egress::open(pidfd.as_fd())
        })
        .await
        .map_err(|e| EngineError::Backend(format!("the network set-up task: {e}")))?;
        let s = opened.map_err(jail)?;
        Ok(moat_engine::network::EgressSockets {
            connections: s.connections,
            dns_v4: s.dns_v4,
            dns_v6: s.dns_v6,
        })
    }

    async fn exited(&self) {
        match &self.pidfd {
            Some(fd) => {
                if let Ok(mut g) = fd.readable().await {
                    g.retain_ready();
                }
            }
            None => std::future::pending().await,
        }
    }

    fn keep(&mut self) -> Result<()> {
        let mut guard = self
            .inner
            .lock()
            .map_err(|_| EngineError::Agent("lock poisoned".into()))?;
        match guard.as_ref() {
            Some(live) if live.keep.is_none() => {
                return Err(EngineError::Unsupported(format!(
                    "sandbox {} was not made keepable",
                    self.id
                )));
            }
            None => return Err(EngineError::NotFound(self.id.clone())),
            Some(_) => {}
        }
        if let Some(live) = guard.take() {
            // The marker keeps the slot out of use after our lock goes; cgroups and the
            // listener's socket stay for the next process.
            live.process.release();
        }
        self.pidfd.take();
        Ok(())
    }

    async fn destroy(&mut self) -> Result<()> {
        self.pidfd.take();
        let live = self
            .inner
            .lock()
            .map_err(|_| EngineError::Agent("lock poisoned".into()))?
            .take();
        match live {
            Some(live) => tokio::task::spawn_blocking(move || teardown(live))
                .await
                .map_err(|e| EngineError::Agent(format!("teardown task: {e}")))?,
            None => Ok(()),
        }
    }
}

impl Drop for NativeInstance {
    fn drop(&mut self) {
        self.pidfd.take();
        if let Ok(mut guard) = self.inner.lock()
            && let Some(live) = guard.take()
        {
            let _ = teardown(live);
        }
    }
}
