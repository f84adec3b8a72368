//! Templates: define, show, list, delete.

use http::Method;

use crate::body::Body;
use crate::client::Client;
use crate::error::Result;
use crate::error::{ApiError, Error};
use crate::exec::MAX_LINE_BYTES;
use crate::path::{Query, seg};
use crate::types::{CreateTemplate, TagTemplate, Template, TemplateCreateEvent, TemplateList};

impl Client {
    /// Defines a template for the key's tenant.
    pub async fn create_template(&self, req: &CreateTemplate) -> Result<Template> {
        self.json(Method::POST, "/v1/templates", Some(req)).await
    }

    /// Defines a template, telling `on_event` how the pull of its image goes (the server's
    /// `application/x-ndjson` answer) before the template comes.
    pub async fn create_template_with_progress(
        &self,
        req: &CreateTemplate,
        mut on_event: impl FnMut(&TemplateCreateEvent),
    ) -> Result<Template> {
        let body = serde_json::to_vec(req)
            .map_err(|e| Error::Config(format!("encoding the request: {e}")))?;
        let resp = self
            .send(
                Method::POST,
                "/v1/templates",
                Body::from(body),
                Some("application/json"),
                "application/x-ndjson",
            )
            .await?;
        let mut stream = self.stream(resp);
        let mut buf: Vec<u8> = Vec::new();
        loop {
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event: TemplateCreateEvent = serde_json::from_slice(&line)
                    .map_err(|e| Error::Protocol(format!("a template create line: {e}")))?;
                match event {
                    TemplateCreateEvent::Template { template } => return Ok(*template),
                    TemplateCreateEvent::Error(e) => {
                        return Err(Error::Api(ApiError {
                            status: status_of(&e.code),
                            code: e.code,
                            message: e.message,
                        }));
                    }
                    other => on_event(&other),
                }
            }
            if buf.len() > MAX_LINE_BYTES {
                return Err(Error::Protocol(format!(
                    "a template create line is longer than {MAX_LINE_BYTES} bytes"
                )));
            }
            match stream.next_chunk().await? {
                Some(chunk) => buf.extend_from_slice(&chunk),
                None if buf.iter().any(|b| !b.is_ascii_whitespace()) => buf.push(b'\n'),
                None => {
                    return Err(Error::Protocol(
                        "the template create stream ended without the template".into(),
                    ));
                }
            }
        }
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

    /// Copies the template `name` (`name` or `name:tag`) to each of `tags` of its name,
    /// moving tags that exist; the templates written.
    pub async fn tag_template(&self, name: &str, tags: &[String]) -> Result<Vec<Template>> {
        let body = TagTemplate {
            tags: tags.to_vec(),
        };
        let list: TemplateList = self
            .json(
                Method::POST,
                &format!("/v1/templates/{}/tags", seg(name)),
                Some(&body),
            )
            .await?;
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

/// The HTTP status the API answers for error `code` (a stream carries only the code).
fn status_of(code: &str) -> u16 {
    match code {
        "invalid" => 400,
        "unauthenticated" => 401,
        "forbidden" => 403,
        "not_found" => 404,
        "conflict" => 409,
        "too_large" => 413,
        "quota_exceeded" => 429,
        "unavailable" => 503,
        "timeout" => 504,
        "insufficient_storage" => 507,
        _ => 500,
    }
}
