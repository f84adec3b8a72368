//! API keys: make, list, revoke (an admin key's calls).

use http::Method;

use crate::client::Client;
use crate::error::Result;
use crate::path::{Query, seg};
use crate::types::{ApiKey, CreateKey, CreatedKey, KeyList};

impl Client {
    /// Makes an API key; the answer holds its secret, which cannot be had again.
    pub async fn create_key(&self, req: &CreateKey) -> Result<CreatedKey> {
        self.json(Method::POST, "/v1/keys", Some(req)).await
    }

    /// The keys of `tenant` (the caller's when `None`), revoked ones included, oldest first.
    pub async fn list_keys(&self, tenant: Option<&str>) -> Result<Vec<ApiKey>> {
        let q = Query::default().opt("tenant", tenant);
        let list: KeyList = self
            .json(Method::GET, &format!("/v1/keys{}", q.as_str()), None::<&()>)
            .await?;
        Ok(list.keys)
    }

    /// Revokes the key `id` of `tenant` (the caller's when `None`) and returns it.
    pub async fn revoke_key(&self, id: &str, tenant: Option<&str>) -> Result<ApiKey> {
        let q = Query::default().opt("tenant", tenant);
        self.json(
            Method::DELETE,
            &format!("/v1/keys/{}{}", seg(id), q.as_str()),
            None::<&()>,
        )
        .await
    }
}
