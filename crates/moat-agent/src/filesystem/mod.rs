//! The `filesystem.Filesystem` service: every operation runs inside the sandbox, as the calling
//! user.
//!
//! Paths are absolute, or relative to the user's home (`~` expanded, empty = the default
//! workdir). Each operation runs on a blocking-pool thread switched to the user's filesystem
//! credentials (`creds`), resolves paths with `openat2(RESOLVE_NO_MAGICLINKS)` and works on the
//! last component with `*at` calls (`sys`, `ops`), so the kernel applies the user's permissions,
//! `/proc` magic links are refused and special files are never opened in a way that blocks.

pub(crate) mod creds;
mod entry;
pub(crate) mod ops;
pub(crate) mod paths;
pub(crate) mod sys;
mod watch;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use moat_proto::filesystem::*;

use crate::rpc::{Code, RpcError};
use crate::state::AgentState;
use crate::users::User;
use creds::blocking_as;
pub use ops::MAX_LIST_ENTRIES;
pub use watch::{MAX_WATCHED_DIRS, MAX_WATCHERS};
use watch::{Slot, WatchSpec, Watcher};

/// Most events a polled watcher (`CreateWatcher`) keeps between two `GetWatcherEvents` calls.
/// When it is full the **oldest** event is dropped for each new one, so a slow poller still sees
/// the latest changes.
pub const MAX_QUEUED_EVENTS: usize = 10_000;

/// Events a polled watcher collected, and how it ended if it did.
#[derive(Default)]
struct Queue {
    events: VecDeque<FilesystemEvent>,
    dropped: u64,
    failed: Option<RpcError>,
}

/// A watcher created by `CreateWatcher`: a task filling the queue. Dropping it stops the task,
/// which closes the inotify descriptor and frees the watcher slot.
struct Polled {
    queue: Arc<Mutex<Queue>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Polled {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The filesystem service.
pub struct FsService {
    state: Arc<AgentState>,
    /// Watchers alive (streams and polled), bounded by [`MAX_WATCHERS`].
    active: Arc<AtomicUsize>,
    polled: Mutex<HashMap<String, Polled>>,
}

impl fmt::Debug for FsService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsService")
            .field("active_watchers", &self.active)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FsService {
    /// The service over `state`.
    pub fn new(state: Arc<AgentState>) -> Self {
        FsService {
            state,
            active: Arc::new(AtomicUsize::new(0)),
            polled: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, user: &User, raw: &str) -> Result<String, RpcError> {
        paths::expand(raw, user, &self.state.workdir_for(user))
    }

    /// `Stat`: the entry at the path; missing is `not_found`.
    pub async fn stat(&self, user: &User, req: StatRequest) -> Result<StatResponse, RpcError> {
        let path = self.path(user, &req.path)?;
        let entry = blocking_as(user, move || ops::stat(&path)).await?;
        Ok(StatResponse { entry: Some(entry) })
    }

    /// `MakeDir`: creates the directory and missing parents, owned by the user. An existing
    /// directory is `already_exists`, an existing non-directory `invalid_argument`.
    pub async fn make_dir(
        &self,
        user: &User,
        req: MakeDirRequest,
    ) -> Result<MakeDirResponse, RpcError> {
        let path = self.path(user, &req.path)?;
        let (uid, gid) = (user.uid, user.gid);
        let entry = blocking_as(user, move || ops::make_dir(&path, uid, gid)).await?;
        Ok(MakeDirResponse { entry: Some(entry) })
    }

    /// `Move`: renames source to destination (creating the destination's parents); a missing
    /// source is `not_found`.
    pub async fn move_entry(
        &self,
        user: &User,
        req: MoveRequest,
    ) -> Result<MoveResponse, RpcError> {
        let source = self.path(user, &req.source)?;
        let destination = self.path(user, &req.destination)?;
        let (uid, gid) = (user.uid, user.gid);
        let entry = blocking_as(user, move || {
            ops::move_entry(&source, &destination, uid, gid)
        })
        .await?;
        Ok(MoveResponse { entry: Some(entry) })
    }

    /// `ListDir`: entries down to `depth` levels (0 means 1) as one flat list; a symlinked
    /// directory is followed.
    pub async fn list_dir(
        &self,
        user: &User,
        req: ListDirRequest,
    ) -> Result<ListDirResponse, RpcError> {
        let path = self.path(user, &req.path)?;
        let depth = req.depth;
        let entries = blocking_as(user, move || ops::list_dir(&path, depth)).await?;
        Ok(ListDirResponse { entries })
    }

    /// `Remove`: removes the path, recursively; a missing path is not an error.
    pub async fn remove(
        &self,
        user: &User,
        req: RemoveRequest,
    ) -> Result<RemoveResponse, RpcError> {
        let path = self.path(user, &req.path)?;
        blocking_as(user, move || ops::remove(&path)).await?;
        Ok(RemoveResponse {})
    }

    async fn open_watcher(&self, user: &User, spec: WatchSpec) -> Result<Watcher, RpcError> {
        let slot = Slot::take(&self.active)?;
        Watcher::open(user, spec, slot).await
    }

    /// `WatchDir`: the stream of events after the `start` event (the transport sends `start` first
    /// and interleaves keepalives). The stream ends when the watched directory goes away;
    /// dropping it stops the watcher.
    pub async fn watch_dir(
        &self,
        user: &User,
        req: WatchDirRequest,
    ) -> Result<BoxStream<'static, Result<FilesystemEvent, RpcError>>, RpcError> {
        let spec = WatchSpec {
            path: self.path(user, &req.path)?,
            recursive: req.recursive,
            include_entry: req.include_entry,
            allow_network_mounts: req.allow_network_mounts,
        };
        let watcher = self.open_watcher(user, spec).await?;
        // Backpressure: while the consumer is slow nothing is read, and the kernel's own bounded
        // queue holds (or, when full, drops) events.
        let stream =
            futures_util::stream::unfold(Some((watcher, VecDeque::new())), |state| async move {
                let (mut watcher, mut pending) = state?;
                loop {
                    if let Some(ev) = pending.pop_front() {
                        return Some((Ok(ev), Some((watcher, pending))));
                    }
                    match watcher.next_batch().await {
                        Ok(Some(events)) => pending.extend(events),
                        Ok(None) => return None,
                        Err(e) => return Some((Err(e), None)),
                    }
                }
            });
        Ok(stream.boxed())
    }

    /// `CreateWatcher`: starts a watcher whose events `GetWatcherEvents` collects.
    pub async fn create_watcher(
        &self,
        user: &User,
        req: CreateWatcherRequest,
    ) -> Result<CreateWatcherResponse, RpcError> {
        let spec = WatchSpec {
            path: self.path(user, &req.path)?,
            recursive: req.recursive,
            include_entry: req.include_entry,
            allow_network_mounts: req.allow_network_mounts,
        };
        let mut watcher = self.open_watcher(user, spec).await?;
        let id = sys::random_id().map_err(|e| RpcError::from_io(&e, "getrandom"))?;
        let queue = Arc::new(Mutex::new(Queue::default()));
        let task_queue = queue.clone();
        let task = tokio::spawn(async move {
            loop {
                match watcher.next_batch().await {
                    Ok(Some(events)) => {
                        let mut q = lock(&task_queue);
                        for ev in events {
                            if q.events.len() >= MAX_QUEUED_EVENTS {
                                q.events.pop_front();
                                q.dropped += 1;
                            }
                            q.events.push_back(ev);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        lock(&task_queue).failed = Some(e);
                        break;
                    }
                }
            }
        });
        lock(&self.polled).insert(id.clone(), Polled { queue, task });
        Ok(CreateWatcherResponse { watcher_id: id })
    }

    /// `GetWatcherEvents`: returns and drains the events since the previous call. An unknown id is
    /// `not_found`; a watcher that failed reports its error once its events are drained.
    pub async fn get_watcher_events(
        &self,
        _user: &User,
        req: GetWatcherEventsRequest,
    ) -> Result<GetWatcherEventsResponse, RpcError> {
        let queue = lock(&self.polled)
            .get(&req.watcher_id)
            .map(|p| p.queue.clone())
            .ok_or_else(|| unknown_watcher(&req.watcher_id))?;
        let mut q = lock(&queue);
        if q.dropped > 0 {
            tracing::warn!(
                watcher = %req.watcher_id,
                dropped = q.dropped,
                "watcher queue was full; oldest events dropped"
            );
            q.dropped = 0;
        }
        if q.events.is_empty()
            && let Some(e) = q.failed.clone()
        {
            return Err(e);
        }
        Ok(GetWatcherEventsResponse {
            events: q.events.drain(..).collect(),
        })
    }

    /// `RemoveWatcher`: stops the watcher; an unknown id is `not_found`.
    pub async fn remove_watcher(
        &self,
        _user: &User,
        req: RemoveWatcherRequest,
    ) -> Result<RemoveWatcherResponse, RpcError> {
        lock(&self.polled)
            .remove(&req.watcher_id)
            .map(drop)
            .ok_or_else(|| unknown_watcher(&req.watcher_id))?;
        Ok(RemoveWatcherResponse {})
    }
}

fn unknown_watcher(id: &str) -> RpcError {
    RpcError::new(Code::NotFound, format!("watcher '{id}' not found"))
}
