//! E2B's template tags, as `Template.assign_tags`, `remove_tags` and `get_tags` call them:
//! `POST /templates/tags`, `DELETE /templates/tags` and `GET /templates/{id}/tags`.
//!
//! A tag is a moat template of its own, named `name:tag`, a copy of the template it was given
//! from (see `SandboxManager::tag_template`); the tag `default` is the name alone. A
//! template no build made (one of an image, say) has no build id; E2B's clients read every
//! tag's build id as a UUID, so such a tag shows the nil UUID.

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use bytes::Bytes;
use moat_engine::auth::Caller;
use moat_engine::ids::{DEFAULT_TAG, TAG_SEPARATOR, split_template_name};
use moat_engine::manager::ManagerError;
use moat_proto::v1;
use serde::{Deserialize, Serialize};

use super::builds::{e2b_word, moat_name};
use super::error::{E2bError, E2bResult};
use super::shapes::rfc3339;
use crate::extract::{Shared, json_body};

/// The build id shown for a template no build made.
const NO_BUILD: &str = "00000000-0000-0000-0000-000000000000";

/// `AssignTemplateTagsRequest`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AssignTags {
    target: String,
    tags: Vec<String>,
}

/// `AssignedTemplateTags`.
#[derive(Debug, Serialize)]
pub(crate) struct AssignedTags {
    #[serde(rename = "buildID")]
    build_id: String,
    tags: Vec<String>,
}

/// `DeleteTemplateTagsRequest`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeleteTags {
    name: String,
    tags: Vec<String>,
}

/// `TemplateTag`.
#[derive(Debug, Serialize)]
pub(crate) struct TemplateTag {
    tag: String,
    #[serde(rename = "buildID")]
    build_id: String,
    #[serde(rename = "createdAt")]
    created_at: String,
}

fn build_of(template: &v1::Template) -> String {
    template
        .build_id
        .clone()
        .unwrap_or_else(|| NO_BUILD.to_owned())
}

/// `POST /templates/tags`: `201` with the build the tags now name.
pub(crate) async fn assign(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult<(StatusCode, Json<AssignedTags>)> {
    let req: AssignTags = json_body(body, None)?;
    let tags: Vec<String> = req.tags.iter().map(|t| e2b_word(t)).collect();
    let target = moat_name(&req.target);
    let written = match state.manager.tag_template(&caller, &target, &tags).await {
        Err(ManagerError::NotFound(_)) => {
            return Err(E2bError::not_found(format!(
                "template {:?} not found",
                req.target
            )));
        }
        other => other?,
    };
    let build_id = written.first().map(build_of).unwrap_or_default();
    Ok((StatusCode::CREATED, Json(AssignedTags { build_id, tags })))
}

/// `DELETE /templates/tags`: `204` once every tag named is gone; none is removed unless all
/// exist.
pub(crate) async fn remove(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult<StatusCode> {
    let req: DeleteTags = json_body(body, None)?;
    let base = moat_name(&req.name);
    if split_template_name(&base).1.is_some() {
        return Err(E2bError::invalid(format!(
            "name {:?} carries a tag: name the template alone and the tags to remove",
            req.name
        )));
    }
    let mut names = Vec::with_capacity(req.tags.len());
    for tag in req.tags.iter().map(|t| e2b_word(t)) {
        if tag == DEFAULT_TAG {
            return Err(E2bError::invalid(format!(
                "the {DEFAULT_TAG} tag is the template {base} itself: it is not removed as a tag"
            )));
        }
        names.push(format!("{base}{TAG_SEPARATOR}{tag}"));
    }
    let existing = state.manager.template_tags(&caller, &base).await?;
    if let Some(missing) = names
        .iter()
        .find(|n| !existing.iter().any(|t| &t.name == *n && !t.builtin))
    {
        return Err(E2bError::not_found(format!("tag {missing:?} not found")));
    }
    for name in &names {
        state.manager.delete_template(&caller, name, false).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /templates/{templateID}/tags`: the name's tags (`default` for the name alone).
pub(crate) async fn list(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> E2bResult<Json<Vec<TemplateTag>>> {
    let Path(id) = id?;
    let base = moat_name(&id);
    let templates = match state.manager.template_tags(&caller, &base).await {
        Err(ManagerError::NotFound(_) | ManagerError::Invalid(_)) => {
            return Err(E2bError::not_found(format!("template {id:?} not found")));
        }
        other => other?,
    };
    Ok(Json(
        templates
            .iter()
            .map(|t| TemplateTag {
                tag: split_template_name(&t.name)
                    .1
                    .unwrap_or(DEFAULT_TAG)
                    .to_owned(),
                build_id: build_of(t),
                created_at: rfc3339(t.created_at),
            })
            .collect(),
    ))
}
