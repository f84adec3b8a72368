//! Builds: templates built from a Dockerfile, their logs, and build contexts.

use http::Method;

use crate::body::Body;
use crate::client::Client;
use crate::error::{Error, Result};
use crate::path::seg;
use crate::types::{Build, BuildList, BuildLogs, CreateBuild};

impl Client {
    /// Whether the tenant has uploaded the build context `digest` (`sha256:…`).
    pub async fn has_build_context(&self, digest: &str) -> Result<bool> {
        let path = format!("/v1/build-contexts/{}", seg(digest));
        match self
            .send(Method::HEAD, &path, Body::empty(), None, "application/json")
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::Api(e)) if e.status == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Uploads a build context: a tar archive whose bytes have sha256 `digest`.
    pub async fn put_build_context(&self, digest: &str, archive: Body) -> Result<()> {
        let path = format!("/v1/build-contexts/{}", seg(digest));
        let resp = self
            .send(
                Method::PUT,
                &path,
                archive,
                Some("application/x-tar"),
                "application/json",
            )
            .await?;
        let _: serde_json::Value = self.read_json(resp).await?;
        Ok(())
    }

    /// Starts a build; the build, queued.
    pub async fn create_build(&self, req: &CreateBuild) -> Result<Build> {
        self.json(Method::POST, "/v1/builds", Some(req)).await
    }

    /// The build `id`.
    pub async fn get_build(&self, id: &str) -> Result<Build> {
        self.json(Method::GET, &format!("/v1/builds/{}", seg(id)), None::<&()>)
            .await
    }

    /// The tenant's builds, newest first.
    pub async fn list_builds(&self) -> Result<Vec<Build>> {
        let list: BuildList = self.json(Method::GET, "/v1/builds", None::<&()>).await?;
        Ok(list.builds)
    }

    /// Build `id`'s log from byte `offset`.
    pub async fn build_logs(&self, id: &str, offset: u64) -> Result<BuildLogs> {
        self.json(
            Method::GET,
            &format!("/v1/builds/{}/logs?offset={offset}", seg(id)),
            None::<&()>,
        )
        .await
    }

    /// Cancels build `id`.
    pub async fn cancel_build(&self, id: &str) -> Result<Build> {
        self.json(
            Method::POST,
            &format!("/v1/builds/{}/cancel", seg(id)),
            None::<&()>,
        )
        .await
    }
}
