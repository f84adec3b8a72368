//! Contexts, and the registry of a sandbox's contexts.
//!
//! A context is a language driver that keeps its state between executions. Its driver starts
//! when the context is created (or, for a language's default context, on its first execution),
//! and again on the next use after it died. Executions on one context run one at a time, in the
//! order they arrived.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::time::sleep_until;

use super::kernel::{Handle, Kernel, Launcher, Outcome, StartError};
use super::language::Language;
use super::limits::{KEEPALIVE_INTERVAL, MAX_CONTEXTS};
use super::stream::{Emitter, Output};

/// Why a context's driver is being ended from outside an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Restarting,
    Removed,
}

#[derive(Debug, Default)]
struct Live {
    /// The current driver, to kill it while an execution holds the kernel.
    handle: Option<Handle>,
    ending: Option<Ending>,
}

/// One context.
#[derive(Debug)]
pub struct Context {
    /// Its id (a random UUID).
    pub id: String,
    /// Its language.
    pub language: Language,
    /// The working directory its driver starts in.
    pub cwd: String,
    /// Whether it is its language's default context.
    pub is_default: bool,
    kernel: tokio::sync::Mutex<Option<Kernel>>,
    live: Mutex<Live>,
    executions: AtomicU64,
}

impl Context {
    /// A context whose driver is not started yet.
    pub fn new(language: Language, cwd: String, is_default: bool) -> Arc<Context> {
        Arc::new(Context {
            id: new_id(),
            language,
            cwd,
            is_default,
            kernel: tokio::sync::Mutex::new(None),
            live: Mutex::new(Live::default()),
            executions: AtomicU64::new(0),
        })
    }

    /// `{"id", "language", "cwd"}`.
    pub fn info(&self) -> Value {
        json!({"id": self.id, "language": self.language.name(), "cwd": self.cwd})
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kills the current driver now, even while an execution runs on it (which then ends with
    /// an error naming `why`).
    fn end_current(&self, why: Ending) {
        let mut live = self.live();
        live.ending = Some(why);
        if let Some(handle) = &live.handle {
            handle.kill();
        }
    }

    fn install(&self, kernel: &Kernel) {
        let mut live = self.live();
        live.handle = Some(kernel.handle());
        live.ending = None;
    }

    fn ending(&self) -> Option<Ending> {
        self.live().ending
    }

    /// Starts a fresh driver, once earlier executions are done; the old one, if any, is killed.
    pub async fn start(&self, launcher: &Launcher) -> Result<(), StartError> {
        let mut kernel = self.kernel.lock().await;
        *kernel = None;
        let fresh = Kernel::start(launcher, self.language, &self.cwd).await?;
        self.install(&fresh);
        *kernel = Some(fresh);
        Ok(())
    }

    /// Restarts the context: its state is gone. A running execution ends with a
    /// `ContextRestarting` error.
    pub async fn restart(&self, launcher: &Launcher) -> Result<(), StartError> {
        self.end_current(Ending::Restarting);
        self.start(launcher).await
    }

    /// Ends the context's driver for good (the registry has already forgotten the context).
    pub fn remove(&self) {
        self.end_current(Ending::Removed);
    }

    /// Runs one command (see [`Language::command`]) on this context and writes its stream to
    /// `out`, ending with `end_of_execution`.
    pub async fn run(self: Arc<Self>, launcher: Launcher, command: Vec<u8>, mut out: Emitter) {
        // Wait for earlier executions, with keepalives; give up if the client leaves first.
        let mut kernel = {
            let watcher = out.watcher();
            let lock = self.kernel.lock();
            tokio::pin!(lock);
            loop {
                let keepalive_at = out.last_sent() + KEEPALIVE_INTERVAL;
                tokio::select! {
                    guard = &mut lock => break guard,
                    _ = watcher.closed() => return,
                    _ = sleep_until(keepalive_at) => out.keepalive().await,
                }
            }
        };
        if self.ending() == Some(Ending::Removed) {
            out.error(
                "ContextRemoved",
                &format!("context {} was removed", self.id),
                "",
            )
            .await;
            return out.end().await;
        }
        let count = self.executions.fetch_add(1, Ordering::Relaxed) + 1;
        out.execution_count(count).await;

        let exited = kernel.as_ref().map(|k| k.handle().exited());
        if !matches!(exited, Some(None)) {
            *kernel = None;
            match Kernel::start(&launcher, self.language, &self.cwd).await {
                Ok(fresh) => {
                    self.install(&fresh);
                    *kernel = Some(fresh);
                }
                Err(e) => {
                    out.error("ContextStartError", &e.message, "").await;
                    return out.end().await;
                }
            }
            if let Some(Some(status)) = exited {
                let note = format!(
                    "moat: the {} interpreter of this context had exited ({status}); it was restarted without its earlier state\n",
                    self.language.name()
                );
                out.output(Output::Stderr, &note).await;
            }
        }
        let Some(running) = kernel.as_mut() else {
            return out.end().await;
        };
        if let Outcome::Died(status) = running.execute(&command, &mut out).await {
            let (name, value) = match self.ending() {
                Some(Ending::Restarting) => (
                    "ContextRestarting",
                    "the context was restarted during the execution".to_string(),
                ),
                Some(Ending::Removed) => (
                    "ContextRemoved",
                    format!("context {} was removed during the execution", self.id),
                ),
                None => (
                    "ContextDied",
                    format!(
                        "the {} interpreter exited during the execution ({status}); the context restarts, without its state, on its next use",
                        self.language.name()
                    ),
                ),
            };
            out.error(name, &value, "").await;
            *kernel = None;
        }
        drop(kernel);
        out.end().await;
    }
}

/// The contexts of one sandbox, in creation order.
#[derive(Debug, Default)]
pub struct Registry {
    contexts: Mutex<Vec<Arc<Context>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Context>>> {
        self.contexts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The context `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Context>> {
        self.lock().iter().find(|c| c.id == id).cloned()
    }

    /// The default context of `language`, made (not started) on first use with `cwd`.
    pub fn default_for(&self, language: Language, cwd: &str) -> Arc<Context> {
        let mut all = self.lock();
        if let Some(c) = all.iter().find(|c| c.is_default && c.language == language) {
            return c.clone();
        }
        let c = Context::new(language, cwd.to_string(), true);
        all.push(c.clone());
        c
    }

    /// Whether another context may be created ([`MAX_CONTEXTS`], defaults not counted).
    pub fn has_room(&self) -> bool {
        self.lock().iter().filter(|c| !c.is_default).count() < MAX_CONTEXTS
    }

    /// Adds `context`, unless that would pass [`MAX_CONTEXTS`].
    pub fn add(&self, context: Arc<Context>) -> Result<(), Arc<Context>> {
        let mut all = self.lock();
        if all.iter().filter(|c| !c.is_default).count() >= MAX_CONTEXTS {
            return Err(context);
        }
        all.push(context);
        Ok(())
    }

    /// Removes the context `id` and returns it.
    pub fn remove(&self, id: &str) -> Option<Arc<Context>> {
        let mut all = self.lock();
        let i = all.iter().position(|c| c.id == id)?;
        Some(all.remove(i))
    }

    /// Every context.
    pub fn list(&self) -> Vec<Arc<Context>> {
        self.lock().clone()
    }
}

/// A random UUID (version 4), the shape of upstream's kernel ids.
fn new_id() -> String {
    let mut b = [0u8; 16];
    // SAFETY: b is a valid writable buffer of b.len() bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy source (never on Linux ≥ 3.17): ids need only be unique, not secret.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        b[..8].copy_from_slice(&t.to_le_bytes());
        b[8..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuids() {
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, new_id());
    }

    #[test]
    fn registry_limits_created_contexts_only() {
        let r = Registry::default();
        let d = r.default_for(Language::Python, "/");
        assert!(Arc::ptr_eq(&d, &r.default_for(Language::Python, "/")));
        for _ in 0..MAX_CONTEXTS {
            assert!(r.has_room());
            r.add(Context::new(Language::Bash, "/".into(), false))
                .expect("room");
        }
        assert!(!r.has_room());
        assert!(
            r.add(Context::new(Language::Bash, "/".into(), false))
                .is_err()
        );
        assert_eq!(r.list().len(), MAX_CONTEXTS + 1);
        assert!(r.remove(&d.id).is_some());
        assert!(r.get(&d.id).is_none());
    }
}
