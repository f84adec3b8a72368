//! Pause and resume, snapshots and forks.

use http::Method;

use crate::client::Client;
use crate::error::Result;
use crate::path::{Query, seg};
use crate::types::{
    CreateSnapshot, ForkResult, ForkSandbox, ListSnapshots, ResumeSandbox, Sandbox, Snapshot,
    SnapshotList,
};

impl Client {
    /// Freezes every process of the sandbox; commands and file calls answer 409 until it is
    /// resumed. Pausing a paused sandbox is a 409 `conflict`.
    pub async fn pause_sandbox(&self, id: &str) -> Result<Sandbox> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/pause", seg(id)),
            None::<&()>,
        )
        .await
    }

    /// Thaws a paused sandbox; with `timeout_secs`, it then expires that long from now.
    pub async fn resume_sandbox(&self, id: &str, timeout_secs: Option<u64>) -> Result<Sandbox> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/resume", seg(id)),
            Some(&ResumeSandbox { timeout_secs }),
        )
        .await
    }

    /// Snapshots the sandbox's files (running or paused); `create_sandbox` with `snapshot`
    /// makes sandboxes from it.
    pub async fn create_snapshot(&self, id: &str, req: &CreateSnapshot) -> Result<Snapshot> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/snapshots", seg(id)),
            Some(req),
        )
        .await
    }

    /// Copies of the sandbox's files in `req.count` new sandboxes: one result per copy, a
    /// sandbox or why it failed.
    pub async fn fork_sandbox(&self, id: &str, req: &ForkSandbox) -> Result<ForkResult> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/fork", seg(id)),
            Some(req),
        )
        .await
    }

    /// The snapshot `id`.
    pub async fn get_snapshot(&self, id: &str) -> Result<Snapshot> {
        self.json(
            Method::GET,
            &format!("/v1/snapshots/{}", seg(id)),
            None::<&()>,
        )
        .await
    }

    /// One page of the tenant's snapshots matching `filter`, oldest first; pass the page's
    /// `next` as `filter.after` for the next one.
    pub async fn list_snapshots(&self, filter: &ListSnapshots) -> Result<SnapshotList> {
        let mut q = Query::default()
            .opt("sandbox_id", filter.sandbox_id.as_deref())
            .opt("name", filter.name.as_deref())
            .opt("after", filter.after.as_deref());
        if let Some(limit) = filter.limit {
            q = q.add("limit", &limit.to_string());
        }
        self.json(
            Method::GET,
            &format!("/v1/snapshots{}", q.as_str()),
            None::<&()>,
        )
        .await
    }

    /// Every snapshot matching `filter` (its `after` is the starting point), following pages.
    pub async fn list_all_snapshots(&self, filter: &ListSnapshots) -> Result<Vec<Snapshot>> {
        let mut filter = filter.clone();
        let mut all = Vec::new();
        loop {
            let page = self.list_snapshots(&filter).await?;
            all.extend(page.snapshots);
            match page.next {
                // A server repeating a cursor would loop forever: stop instead.
                Some(next) if filter.after.as_deref() != Some(next.as_str()) => {
                    filter.after = Some(next)
                }
                _ => return Ok(all),
            }
        }
    }

    /// Deletes the snapshot (its stored copy too); sandboxes made from it keep running.
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.call(
            Method::DELETE,
            &format!("/v1/snapshots/{}", seg(id)),
            None::<&()>,
        )
        .await
    }
}
