//! Templates: define, show, list, delete.

use http::Method;

use crate::client::Client;
use crate::error::Result;
use crate::path::{Query, seg};
use crate::types::{CreateTemplate, Template, TemplateList};

impl Client {
    /// Defines a template for the key's tenant.
    pub async fn create_template(&self, req: &CreateTemplate) -> Result<Template> {
        self.json(Method::POST, "/v1/templates", Some(req)).await
    }

    /// The template `name` (the tenant's own or a built-in one).
    pub async fn get_template(&self, name: &str) -> Result<Template> {
        self.json(
            Method::GET,
            &format!("/v1/templates/{}", seg(name)),
            None::<&()>,
        )
        .await
    }

    /// Every template the tenant sees, by name.
    pub async fn list_templates(&self) -> Result<Vec<Template>> {
        let list: TemplateList = self.json(Method::GET, "/v1/templates", None::<&()>).await?;
        Ok(list.templates)
    }

    /// Deletes the template `name`. While sandboxes made from it run, the server refuses
    /// (409 `conflict`) unless `force`; they keep running either way.
    pub async fn delete_template(&self, name: &str, force: bool) -> Result<()> {
        let q = if force {
            Query::default().add("force", "true")
        } else {
            Query::default()
        };
        self.call(
            Method::DELETE,
            &format!("/v1/templates/{}{}", seg(name), q.as_str()),
            None::<&()>,
        )
        .await
    }
}
