//! E2B's template lookups: `GET /templates/aliases/{alias}`, what `Template.exists` asks.
//!
//! A template's alias is its name, and its id too. The templates a tenant sees are the built-in
//! ones (`base`, `code-interpreter-v1`, `host`, …: public, as E2B's own are) and its own
//! (private to it). Another tenant's template is "not found": moat's template names are per
//! tenant, so a name another tenant uses names nothing here (E2B answers 403 for an alias that
//! exists in another team, which would tell a tenant what others have).

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use moat_engine::auth::Caller;
use moat_engine::manager::ManagerError;
use serde::Serialize;

use super::error::{E2bError, E2bResult};
use crate::extract::Shared;

/// `TemplateAliasResponse`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct TemplateAlias {
    /// The template's id: its name.
    #[serde(rename = "templateID")]
    pub(crate) template_id: String,
    /// Whether every tenant sees it (a built-in template).
    pub(crate) public: bool,
}

/// `GET /templates/aliases/{alias}`: `200` for a template the caller sees, or a name of
/// which it sees only tags (`name:tag`), `404` otherwise (a malformed name included: it names
/// no template either).
pub(crate) async fn alias(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    alias: Result<Path<String>, PathRejection>,
) -> E2bResult<Json<TemplateAlias>> {
    let Path(alias) = alias?;
    let name = super::builds::moat_name(&alias);
    let found = match state.manager.get_template(&caller, &name).await {
        Ok(template) => Ok(template),
        Err(ManagerError::NotFound(_) | ManagerError::Invalid(_)) => state
            .manager
            .template_tags(&caller, &name)
            .await
            .map(|mut tags| tags.swap_remove(0)),
        Err(e) => Err(e),
    };
    match found {
        Ok(template) => Ok(Json(TemplateAlias {
            template_id: moat_engine::ids::split_template_name(&template.name)
                .0
                .to_owned(),
            public: template.builtin,
        })),
        Err(ManagerError::NotFound(_) | ManagerError::Invalid(_)) => Err(E2bError::not_found(
            format!("template alias {alias:?} not found"),
        )),
        Err(e) => Err(e.into()),
    }
}
