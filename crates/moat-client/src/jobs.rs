//! Asynchronous jobs and the blobs they use.

use std::path::Path;

use http::Method;

use crate::body::{Body, ByteStream};
use crate::client::Client;
use crate::error::Result;
use crate::path::{Query, seg};
use crate::types::{Blob, CreateJob, Job, JobList, JobState};

const OCTETS: &str = "application/octet-stream";

impl Client {
    /// Stores `body` as a blob for jobs' inputs; its digest and size.
    pub async fn upload_blob(&self, body: impl Into<Body>) -> Result<Blob> {
        let resp = self
            .send(
                Method::POST,
                "/v1/blobs",
                body.into(),
                Some(OCTETS),
                "application/json",
            )
            .await?;
        self.read_json(resp).await
    }

    /// Stores the local file `local` as a blob.
    pub async fn upload_blob_file(&self, local: impl AsRef<Path>) -> Result<Blob> {
        let file = tokio::fs::File::open(local.as_ref()).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("{}: {e}", local.as_ref().display()))
        })?;
        self.upload_blob(Body::from_reader(file)).await
    }

    /// Deletes the upload `digest`.
    pub async fn delete_blob(&self, digest: &str) -> Result<()> {
        self.call(
            Method::DELETE,
            &format!("/v1/blobs/{}", seg(digest)),
            None::<&()>,
        )
        .await
    }

    /// Queues a job; the job (an earlier one when its idempotency key was used by the same
    /// request).
    pub async fn submit_job(&self, req: &CreateJob) -> Result<Job> {
        self.json(Method::POST, "/v1/jobs", Some(req)).await
    }

    /// The job `id`.
    pub async fn get_job(&self, id: &str) -> Result<Job> {
        self.json(Method::GET, &format!("/v1/jobs/{}", seg(id)), None::<&()>)
            .await
    }

    /// One page of the tenant's jobs in `states` (all when empty), newest first, after the
    /// cursor `after` (the previous page's `next`).
    pub async fn list_jobs(
        &self,
        states: &[JobState],
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<JobList> {
        let mut q = Query::default();
        for state in states {
            q = q.add("state", state.as_str());
        }
        q = q.opt("after", after);
        if let Some(limit) = limit {
            q = q.add("limit", &limit.to_string());
        }
        self.json(Method::GET, &format!("/v1/jobs{}", q.as_str()), None::<&()>)
            .await
    }

    /// Cancels the job `id`.
    pub async fn cancel_job(&self, id: &str) -> Result<Job> {
        self.json(
            Method::POST,
            &format!("/v1/jobs/{}/cancel", seg(id)),
            None::<&()>,
        )
        .await
    }

    /// Deletes the job `id` and the blobs it kept.
    pub async fn delete_job(&self, id: &str) -> Result<()> {
        self.call(
            Method::DELETE,
            &format!("/v1/jobs/{}", seg(id)),
            None::<&()>,
        )
        .await
    }

    /// The whole standard output (`stderr: false`) or error of the job's last attempt.
    pub async fn job_log(&self, id: &str, stderr: bool) -> Result<ByteStream> {
        let which = if stderr { "stderr" } else { "stdout" };
        let resp = self
            .send(
                Method::GET,
                &format!("/v1/jobs/{}/logs/{which}", seg(id)),
                Body::empty(),
                None,
                OCTETS,
            )
            .await?;
        Ok(self.stream(resp))
    }

    /// The output `path` the job `id` kept.
    pub async fn job_output(&self, id: &str, path: &str) -> Result<ByteStream> {
        let q = Query::default().add("path", path);
        let resp = self
            .send(
                Method::GET,
                &format!("/v1/jobs/{}/output{}", seg(id), q.as_str()),
                Body::empty(),
                None,
                OCTETS,
            )
            .await?;
        Ok(self.stream(resp))
    }
}
