//! E2B's template build API, as the SDK's `Template.build` calls it, translated into a moat
//! build:
//!
//! 1. `POST /v3/templates` names the template and gets a build id (`202`); nothing runs yet.
//! 2. For each `COPY`, `GET /templates/{id}/files/{hash}` says whether the files of that hash
//!    are here (`201`), and if not gives an upload link, which the SDK `PUT`s a (gzipped) tar
//!    to without its API key: the link carries a token the engine signed for the tenant.
//! 3. `POST /v2/templates/{id}/builds/{buildID}` gives the base image and the steps; they
//!    become a Dockerfile (each `COPY` reading the context its hash names, `COPY --from`) and
//!    the build starts.
//! 4. `GET /templates/{id}/builds/{buildID}/status?logsOffset=` answers the build's state and
//!    its log lines from the offset on.
//!
//! As in E2B's builder, steps run as `user` in `/home/user` unless a step says otherwise (a
//! root step whose directory is in `/home/user` runs in `/`: moat's root holds no
//! capabilities and cannot enter the user's home); the template's id is its name (what
//! `Sandbox.create` names). A name's tag and the request's `tags` are the build's tags: each
//! becomes the moat template `name:tag` (`default`, or none at all, is the name alone), and
//! the build's id is a UUID, which `name:<build id>` names. A build asked for but not started
//! waits in the engine (`SandboxManager::ask_build`), which keeps it across restarts.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::{Extension, Json};
use bytes::Bytes;
use moat_engine::auth::Caller;
use moat_engine::images::build::dockerfile::{MAX_DOCKERFILE_BYTES, MAX_INSTRUCTIONS};
use moat_engine::manager::ManagerError;
use moat_proto::v1;
use serde::{Deserialize, Serialize};

use super::error::{E2bError, E2bResult};
use super::shapes::rfc3339;
use crate::extract::{Shared, decode, json_body};

/// Most log entries one status answer holds.
const MAX_LOG_ENTRIES: usize = 100;
/// Where upload links point (outside E2B's authenticated paths).
pub(crate) const UPLOAD_PATH: &str = "/e2b-uploads/{token}";

/// `TemplateBuildRequestV3`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BuildRequest {
    name: Option<String>,
    alias: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    cpu_count: Option<f64>,
    #[serde(rename = "memoryMB")]
    memory_mb: Option<u64>,
    #[serde(rename = "minFreeDiskMb")]
    _min_free_disk_mb: Option<u64>,
    #[serde(rename = "teamID")]
    _team_id: Option<String>,
}

/// `TemplateRequestResponseV3`.
#[derive(Debug, Serialize)]
pub(crate) struct BuildRequested {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
    public: bool,
    names: Vec<String>,
    tags: Vec<String>,
    aliases: Vec<String>,
}

/// `POST /v3/templates`.
pub(crate) async fn request_build(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult<(StatusCode, Json<BuildRequested>)> {
    let req: BuildRequest = json_body(body, None)?;
    let asked = req
        .name
        .or(req.alias)
        .ok_or_else(|| E2bError::invalid("name the template (name)"))?;
    let asked = moat_name(&asked);
    let (base, tag) = moat_engine::ids::split_template_name(&asked);
    let base = base.to_owned();
    // The name's tag first, then the others; none at all is `default`, the name alone. Too
    // many are refused before they are compared with each other.
    if req.tags.len() > moat_proto::v1::MAX_TEMPLATE_TAGS {
        return Err(E2bError::invalid(format!(
            "{} tags; at most {} at once",
            req.tags.len(),
            moat_proto::v1::MAX_TEMPLATE_TAGS
        )));
    }
    let mut tags: Vec<String> = Vec::new();
    for t in tag
        .map(str::to_owned)
        .into_iter()
        .chain(req.tags.iter().map(|t| e2b_word(t)))
    {
        if !tags.contains(&t) {
            tags.push(t);
        }
    }
    if tags.is_empty() {
        tags.push(moat_engine::ids::DEFAULT_TAG.to_owned());
    }
    let names = moat_engine::manager::tagged_names(&base, &base, &tags)?;
    // `tagged_names` put `base` first: what is written is the rest, or `base` for `default`.
    let template = if tags[0] == moat_engine::ids::DEFAULT_TAG {
        base.clone()
    } else {
        names[1].clone()
    };
    let resources = match (req.cpu_count, req.memory_mb) {
        (None, None) => None,
        (cpus, memory) => Some(v1::ResourceRequest {
            cpus,
            memory: memory.map(|mb| format!("{mb}M")),
            ..Default::default()
        }),
    };
    let plan = v1::CreateBuild {
        template,
        tags: tags[1..].to_vec(),
        resources,
        ..Default::default()
    };
    let build_id = state.manager.ask_build(&caller, plan).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(BuildRequested {
            template_id: base.clone(),
            build_id,
            public: false,
            names: vec![base.clone()],
            tags,
            aliases: vec![base],
        }),
    ))
}

/// A name or tag as E2B reads it: trimmed, in lower case.
pub(crate) fn e2b_word(text: &str) -> String {
    text.trim().to_ascii_lowercase()
}

/// The moat template a name as E2B writes it (`name` or `name:tag`, any case) stands for:
/// trimmed, in lower case, and the tag `default` being the name alone.
pub(crate) fn moat_name(asked: &str) -> String {
    let asked = e2b_word(asked);
    match asked.split_once(moat_engine::ids::TAG_SEPARATOR) {
        Some((base, moat_engine::ids::DEFAULT_TAG)) => base.to_owned(),
        _ => asked,
    }
}

/// `TemplateBuildFileUpload`.
#[derive(Debug, Serialize)]
pub(crate) struct FileUpload {
    present: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
}

/// `GET /templates/{templateID}/files/{hash}`: whether the files of `hash` are here, and
/// where to upload them if not.
pub(crate) async fn file_link(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> E2bResult<(StatusCode, Json<FileUpload>)> {
    let Path((_template, hash)) = path?;
    let present = state.manager.named_build_context(&caller, &hash)?.is_some();
    let token = state.manager.build_upload_token(&caller, &hash)?;
    // The SDK uploads to this absolute URL: the address it reached this server at.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| E2bError::invalid("the request has no Host header"))?;
    let url = format!("http://{host}{}", UPLOAD_PATH.replace("{token}", &token));
    Ok((
        StatusCode::CREATED,
        Json(FileUpload {
            present,
            url: Some(url),
        }),
    ))
}

/// `PUT /e2b-uploads/{token}`: the files of a `COPY`, as the SDK uploads them (no API key:
/// the token is the authority).
pub(crate) async fn upload(
    State(state): State<Shared>,
    token: Result<Path<String>, PathRejection>,
    body: Body,
) -> E2bResult<StatusCode> {
    let Path(token) = token?;
    state
        .manager
        .put_build_context_by_token(&token, body.into_data_stream())
        .await?;
    Ok(StatusCode::OK)
}

/// `TemplateBuildStartV2`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BuildStart {
    from_image: Option<String>,
    from_template: Option<String>,
    from_image_registry: Option<serde_json::Value>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    steps: Vec<Step>,
    start_cmd: Option<String>,
    ready_cmd: Option<String>,
}

/// `TemplateStep`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Step {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    force: bool,
    files_hash: Option<String>,
}

/// `POST /v2/templates/{templateID}/builds/{buildID}`: the steps; the build starts.
pub(crate) async fn start_build(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult<StatusCode> {
    let Path((template, build_id)) = path?;
    let req: BuildStart = json_body(body, None)?;
    // The steps are read before the build is taken: a start refused for them leaves it
    // waiting, for the client to start again.
    let translated = translate(&state, &caller, &req)?;
    let asked = state
        .manager
        .take_asked_build(&caller, &build_id, &moat_name(&template))
        .await?;
    let create = v1::CreateBuild {
        dockerfile: translated.dockerfile,
        contexts: translated.contexts,
        from_templates: translated.from_templates,
        start: req.start_cmd,
        ready: req.ready_cmd,
        no_cache: req.force || req.steps.iter().any(|s| s.force),
        ..asked.clone()
    };
    if let Err(e) = state
        .manager
        .create_build_as(&caller, &build_id, create)
        .await
    {
        if let Err(put) = state
            .manager
            .put_back_asked_build(&caller, &build_id, asked)
            .await
        {
            tracing::warn!(build = %build_id, "putting back a build whose start was refused: {put}");
        }
        return Err(e.into());
    }
    Ok(StatusCode::ACCEPTED)
}

/// The Dockerfile of `req`, and the contexts its `COPY` steps read.
fn translate(state: &Shared, caller: &Caller, req: &BuildStart) -> E2bResult<Translated> {
    if req.from_image_registry.is_some() {
        return Err(E2bError::invalid(
            "registry credentials in a build are not supported by moat: the server's operator \
             gives them (moat serve --registry-credentials)",
        ));
    }
    let mut from_templates = BTreeMap::new();
    let image = match (&req.from_image, &req.from_template) {
        (Some(image), None) => image.clone(),
        (None, Some(t)) => {
            // `FROM` a name the build maps to the template (its image).
            from_templates.insert(BASE_TEMPLATE.to_owned(), moat_name(t));
            BASE_TEMPLATE.to_owned()
        }
        _ => {
            return Err(E2bError::invalid(
                "give exactly one of fromImage and fromTemplate",
            ));
        }
    };
    let mut out = format!(
        "FROM {}\nUSER user\nWORKDIR /home/user\n",
        one_line(&image)?
    );
    // Each step is an instruction or more: more steps than a Dockerfile may have are refused
    // before any is translated, and the text is checked as it grows (relative `WORKDIR`s
    // repeat the whole path each time).
    if req.steps.len() > MAX_INSTRUCTIONS {
        return Err(E2bError::invalid(format!(
            "{} steps, more than the {MAX_INSTRUCTIONS} instructions a build may have",
            req.steps.len()
        )));
    }
    let mut contexts = BTreeMap::new();
    let mut user = "user".to_owned();
    let mut workdir = "/home/user".to_owned();
    for (i, step) in req.steps.iter().enumerate() {
        let n = i + 1;
        if out.len() > MAX_DOCKERFILE_BYTES {
            return Err(E2bError::invalid(format!(
                "the build's steps before step {n} make a Dockerfile of more than the {} a \
                 build may have",
                moat_proto::units::describe_size(MAX_DOCKERFILE_BYTES as u64)
            )));
        }
        let arg = |k: usize| step.args.get(k).map(String::as_str).unwrap_or("");
        match step.kind.as_str() {
            "RUN" => {
                let run_as = if arg(1).is_empty() {
                    user.as_str()
                } else {
                    arg(1)
                };
                // moat's root holds no capabilities, so it cannot enter the user's home (0750):
                // a root step whose directory is there runs in `/` instead.
                let outside_home = (run_as == "root" || run_as == "0")
                    && (workdir == "/home/user" || workdir.starts_with("/home/user/"));
                if run_as != user {
                    out.push_str(&format!("USER {}\n", plain(run_as, n)?));
                }
                if outside_home {
                    out.push_str("WORKDIR /\n");
                }
                out.push_str(&format!("RUN {}\n", json_array(&["/bin/sh", "-c", arg(0)])));
                if outside_home {
                    out.push_str(&format!("WORKDIR {}\n", quoted(&workdir, n)?));
                }
                if run_as != user {
                    out.push_str(&format!("USER {}\n", plain(&user, n)?));
                }
            }
            "COPY" => {
                let hash = step.files_hash.as_deref().ok_or_else(|| {
                    E2bError::invalid(format!("step {n}: a COPY without its filesHash"))
                })?;
                let digest = state
                    .manager
                    .named_build_context(caller, hash)?
                    .ok_or_else(|| {
                        E2bError::invalid(format!(
                            "step {n}: the files of {hash} were not uploaded"
                        ))
                    })?;
                contexts.insert(hash.to_owned(), digest);
                let mut line = format!("COPY --from={hash}");
                if !arg(2).is_empty() {
                    line.push_str(&format!(" --chown={}", plain(arg(2), n)?));
                }
                if !arg(3).is_empty() {
                    line.push_str(&format!(" --chmod={}", plain(arg(3), n)?));
                }
                out.push_str(&format!("{line} {}\n", json_array(&[arg(0), arg(1)])));
            }
            "ENV" => {
                let mut pairs = Vec::new();
                for pair in step.args.chunks(2) {
                    let [k, v] = pair else {
                        return Err(E2bError::invalid(format!("step {n}: ENV needs pairs")));
                    };
                    pairs.push(format!("{}={}", plain(k, n)?, quoted(v, n)?));
                }
                if !pairs.is_empty() {
                    out.push_str(&format!("ENV {}\n", pairs.join(" ")));
                }
            }
            "WORKDIR" => {
                let dir = arg(0);
                workdir = if dir.starts_with('/') {
                    dir.to_owned()
                } else {
                    format!("{}/{dir}", workdir.trim_end_matches('/'))
                };
                out.push_str(&format!("WORKDIR {}\n", quoted(&workdir, n)?));
            }
            "USER" => {
                user = plain(arg(0), n)?.to_owned();
                out.push_str(&format!("USER {user}\n"));
            }
            other => {
                return Err(E2bError::invalid(format!(
                    "step {n}: steps of type {other:?} are not supported"
                )));
            }
        }
    }
    Ok(Translated {
        dockerfile: out,
        contexts,
        from_templates,
    })
}

/// A build's steps as moat builds them.
struct Translated {
    dockerfile: String,
    contexts: BTreeMap<String, String>,
    from_templates: BTreeMap<String, String>,
}

/// The name the Dockerfile's `FROM` uses for the template a build starts from.
const BASE_TEMPLATE: &str = "moat-base-template";

/// `text` as a JSON array line (the Dockerfile's exec form).
fn json_array(items: &[&str]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".into())
}

/// `text` as a single-line word: no whitespace, quotes, `$` or escapes.
fn plain(text: &str, step: usize) -> E2bResult<&str> {
    let bad = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '$' | '\\' | '`');
    if text.is_empty() || text.contains(bad) {
        return Err(E2bError::invalid(format!(
            "step {step}: {text:?} must be a single word without quotes or `$`"
        )));
    }
    Ok(text)
}

/// `text` as a double-quoted word, its `"`, `\` and `$` escaped; one line only.
fn quoted(text: &str, step: usize) -> E2bResult<String> {
    if text.contains(['\n', '\r']) {
        return Err(E2bError::invalid(format!(
            "step {step}: a value spanning lines is not supported"
        )));
    }
    let mut out = String::from("\"");
    for c in text.chars() {
        if matches!(c, '"' | '\\' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

/// An image reference on one line.
fn one_line(text: &str) -> E2bResult<&str> {
    if text.is_empty() || text.contains(char::is_whitespace) {
        return Err(E2bError::invalid(format!(
            "image {text:?} is not a reference"
        )));
    }
    Ok(text)
}

/// `TemplateBuildInfo`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BuildStatus {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
    status: &'static str,
    logs: Vec<String>,
    log_entries: Vec<LogEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<Reason>,
}

#[derive(Debug, Serialize)]
struct LogEntry {
    timestamp: String,
    message: String,
    level: &'static str,
}

#[derive(Debug, Serialize)]
struct Reason {
    message: String,
}

/// `GET /templates/{templateID}/builds/{buildID}/status?logsOffset=&limit=`.
pub(crate) async fn status(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
) -> E2bResult<Json<BuildStatus>> {
    let Path((template, build_id)) = path?;
    let mut offset = 0usize;
    let mut limit = MAX_LOG_ENTRIES;
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(v)?;
        match k {
            "logsOffset" => {
                offset = v
                    .parse()
                    .map_err(|_| E2bError::invalid(format!("logsOffset={v:?}")))?;
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| E2bError::invalid(format!("limit={v:?}")))?
                    .clamp(1, MAX_LOG_ENTRIES);
            }
            // `level` filters nothing here: every line is `info`.
            _ => {}
        }
    }
    let waiting = state.manager.build_waits_for_steps(&caller, &build_id);
    let answer = |status, log_entries, reason| {
        Json(BuildStatus {
            template_id: template.clone(),
            build_id: build_id.clone(),
            status,
            logs: Vec::new(),
            log_entries,
            reason,
        })
    };
    if waiting {
        return Ok(answer("waiting", Vec::new(), None));
    }
    let build = match state.manager.get_build(&caller, &build_id).await {
        Ok(b) => b,
        Err(ManagerError::NotFound(_)) => {
            return Err(E2bError::not_found(format!("build {build_id} not found")));
        }
        Err(e) => return Err(e.into()),
    };
    let (lines, _) = state
        .manager
        .build_log_lines(&caller, &build_id, offset, limit)
        .await?;
    let now = rfc3339(moat_engine::clock::now_ms());
    let entries = lines
        .into_iter()
        .map(|message| LogEntry {
            timestamp: now.clone(),
            level: if message.starts_with("error: ") {
                "error"
            } else {
                "info"
            },
            message,
        })
        .collect();
    let (status, reason) = match build.status {
        v1::BuildStatus::Queued => ("waiting", None),
        v1::BuildStatus::Running => ("building", None),
        v1::BuildStatus::Succeeded => ("ready", None),
        v1::BuildStatus::Failed | v1::BuildStatus::Cancelled => (
            "error",
            Some(Reason {
                message: build.error.unwrap_or_else(|| "the build failed".into()),
            }),
        ),
    };
    Ok(answer(status, entries, reason))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn words_are_escaped_or_refused() {
        assert_eq!(quoted("a \"b\" $c \\", 1).unwrap(), r#""a \"b\" \$c \\""#);
        assert!(quoted("a\nb", 1).is_err());
        assert!(plain("user", 1).is_ok());
        assert!(plain("us er", 1).is_err());
        assert!(plain("$x", 1).is_err());
        assert_eq!(
            json_array(&["/bin/sh", "-c", "echo \"hi\"\n"]),
            r#"["/bin/sh","-c","echo \"hi\"\n"]"#
        );
        assert_eq!(moat_name(" T:Default "), "t");
        assert_eq!(moat_name("t:V1"), "t:v1");
    }
}
