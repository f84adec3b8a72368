//! Sandboxes: create, show, list, delete, time to live, buffered exec.

use http::Method;

use crate::client::Client;
use crate::error::Result;
use crate::path::{Query, seg};
use crate::types::{
    CreateSandbox, ExecRequest, ExecResult, ListSandboxes, Sandbox, SandboxList, SetTimeout,
};

impl Client {
    /// Makes a sandbox and waits until it runs (`POST /v1/sandboxes`).
    pub async fn create_sandbox(&self, req: &CreateSandbox) -> Result<Sandbox> {
        self.json(Method::POST, "/v1/sandboxes", Some(req)).await
    }

    /// The sandbox `id`, also when it has ended.
    pub async fn get_sandbox(&self, id: &str) -> Result<Sandbox> {
        self.json(
            Method::GET,
            &format!("/v1/sandboxes/{}", seg(id)),
            None::<&()>,
        )
        .await
    }

    /// One page of the tenant's sandboxes matching `filter`, oldest first; pass the page's
    /// `next` as `filter.after` for the next one.
    pub async fn list_sandboxes(&self, filter: &ListSandboxes) -> Result<SandboxList> {
        let mut q = Query::default();
        for state in &filter.states {
            q = q.add("state", state.as_str());
        }
        for (k, v) in &filter.metadata {
            q = q.add("metadata", &format!("{k}={v}"));
        }
        q = q.opt("after", filter.after.as_deref());
        if let Some(limit) = filter.limit {
            q = q.add("limit", &limit.to_string());
        }
        self.json(
            Method::GET,
            &format!("/v1/sandboxes{}", q.as_str()),
            None::<&()>,
        )
        .await
    }

    /// Every sandbox matching `filter` (its `after` is the starting point), following pages.
    pub async fn list_all_sandboxes(&self, filter: &ListSandboxes) -> Result<Vec<Sandbox>> {
        let mut filter = filter.clone();
        let mut all = Vec::new();
        loop {
            let page = self.list_sandboxes(&filter).await?;
            all.extend(page.sandboxes);
            match page.next {
                // A server repeating a cursor would loop forever: stop instead.
                Some(next) if filter.after.as_deref() != Some(next.as_str()) => {
                    filter.after = Some(next)
                }
                _ => return Ok(all),
            }
        }
    }

    /// Destroys the sandbox (`DELETE`); deleting an ended one succeeds too.
    pub async fn delete_sandbox(&self, id: &str) -> Result<()> {
        self.call(
            Method::DELETE,
            &format!("/v1/sandboxes/{}", seg(id)),
            None::<&()>,
        )
        .await
    }

    /// Makes the sandbox expire `timeout_secs` from now.
    pub async fn set_timeout(&self, id: &str, timeout_secs: u64) -> Result<Sandbox> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/timeout", seg(id)),
            Some(&SetTimeout { timeout_secs }),
        )
        .await
    }

    /// Runs one command and waits for it; its output comes back whole (capped by the server).
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/exec", seg(id)),
            Some(req),
        )
        .await
    }
}
