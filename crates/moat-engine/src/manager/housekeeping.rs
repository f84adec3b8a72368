//! What a long-running server does now and then so that nothing grows without bound: the
//! records of sandboxes that ended longer ago than the retention are deleted, and what killed
//! processes left on the host (empty sandbox cgroups) is swept.

use std::time::Duration;

use super::{ManagerError, ManagerResult, SandboxManager, ms};

/// How long the record of an ended sandbox is kept unless configured: 24 hours.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Longest time between two housekeeping rounds (a shorter retention makes them more often).
pub const MAX_HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(60);

/// Shortest time between two housekeeping rounds.
const MIN_HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// What one housekeeping round removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Housekeeping {
    /// Records of ended sandboxes deleted.
    pub purged: usize,
    /// Stale host resources (empty sandbox cgroups) removed.
    pub swept: usize,
    /// Image trees and layers no template or sandbox uses, removed.
    pub images: usize,
    /// Finished jobs past their retention, deleted with their blobs.
    pub jobs: usize,
}

impl SandboxManager {
    /// How often [`SandboxManager::housekeep`] should run: the retention, within 1 s to
    /// [`MAX_HOUSEKEEPING_INTERVAL`], so a record outlives its retention by at most that much.
    pub fn housekeeping_interval(&self) -> Duration {
        self.inner
            .opts
            .retention
            .clamp(MIN_HOUSEKEEPING_INTERVAL, MAX_HOUSEKEEPING_INTERVAL)
    }

    /// Deletes the records of sandboxes that ended before `now` (Unix ms) minus the retention,
    /// and sweeps stale host resources every backend finds.
    pub async fn housekeep(&self, now: i64) -> ManagerResult<Housekeeping> {
        let before = now.saturating_sub(ms(self.inner.opts.retention));
        let purged = self.inner.db(move |s| s.purge_ended(before)).await?;
        let backends = self.inner.backends.clone();
        let swept =
            tokio::task::spawn_blocking(move || backends.iter().map(|b| b.sweep_stale()).sum())
                .await
                .map_err(|e| ManagerError::Internal(format!("sweep task: {e}")))?;
        let images = match self.collect_images().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("removing unused images: {e}");
                0
            }
        };
        let jobs = match self.housekeep_jobs(now).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("deleting old jobs: {e}");
                0
            }
        };
        Ok(Housekeeping {
            purged,
            swept,
            images,
            jobs,
        })
    }
}
