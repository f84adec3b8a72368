//! The OpenAPI 3.1 document of the HTTP API, served at `/v1/openapi.json`.
//!
//! Operations are listed here by hand (method, path, parameters, bodies); every body's schema
//! is generated from its `moat_proto::v1` type, so the document cannot drift from what the
//! handlers parse and answer. A test compares the operations with the routes in the sources
//! and probes each one on a live server.

use std::sync::OnceLock;

use axum::Json;
use moat_proto::v1;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{Map, Value, json};

/// A schema of a body, made by the document's generator.
type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn of<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// What an operation takes or answers.
#[derive(Clone, Copy)]
enum Content {
    /// Nothing.
    Empty,
    /// JSON of this schema.
    Json(SchemaFn),
    /// One JSON object of this schema per line (`application/x-ndjson`).
    NdJson(SchemaFn),
    /// Raw bytes of this media type.
    Bytes(&'static str),
}

/// A query parameter.
#[derive(Clone, Copy)]
struct Param {
    name: &'static str,
    /// A JSON Schema type: `string`, `integer`, `boolean`.
    kind: &'static str,
    required: bool,
    repeated: bool,
    description: &'static str,
}

const fn q(name: &'static str, kind: &'static str, description: &'static str) -> Param {
    Param {
        name,
        kind,
        required: false,
        repeated: false,
        description,
    }
}

const PATH_PARAM: Param = Param {
    required: true,
    ..q(
        "path",
        "string",
        "Path in the sandbox: absolute, or relative to the user's home.",
    )
};
const TENANT_PARAM: Param = q("tenant", "string", "The tenant; the caller's when absent.");
const USER_PARAM: Param = q("user", "string", "`user` (default) or `root`.");

/// One operation of the API.
struct Op {
    method: &'static str,
    path: &'static str,
    id: &'static str,
    tag: &'static str,
    summary: &'static str,
    query: Vec<Param>,
    body: Content,
    /// The body may be left out (an empty body means its defaults).
    body_optional: bool,
    status: u16,
    answer: Content,
    /// Extra successful answers: (status, media type, description).
    alternatives: &'static [(u16, Content, &'static str)],
    open: bool,
}

fn op(
    method: &'static str,
    path: &'static str,
    id: &'static str,
    tag: &'static str,
    summary: &'static str,
) -> Op {
    Op {
        method,
        path,
        id,
        tag,
        summary,
        query: Vec::new(),
        body: Content::Empty,
        body_optional: false,
        status: 200,
        answer: Content::Empty,
        alternatives: &[],
        open: false,
    }
}

/// Every operation, in the order the document lists them.
fn operations() -> Vec<Op> {
    use Content::{Bytes, Empty, Json, NdJson};
    vec![
        Op {
            open: true,
            answer: Json(of::<serde_json::Value>),
            ..op(
                "get",
                "/healthz",
                "healthz",
                "health",
                "Liveness: the process answers.",
            )
        },
        Op {
            open: true,
            answer: Json(of::<serde_json::Value>),
            ..op(
                "get",
                "/readyz",
                "readyz",
                "health",
                "Readiness: the store answers and no shutdown has begun (503 otherwise).",
            )
        },
        Op {
            answer: Json(of::<serde_json::Value>),
            ..op(
                "get",
                "/v1/openapi.json",
                "openapi",
                "meta",
                "This document.",
            )
        },
        Op {
            answer: Bytes("text/plain; version=0.0.4"),
            ..op(
                "get",
                "/metrics",
                "metrics",
                "meta",
                "Prometheus metrics (an admin key).",
            )
        },
        Op {
            body: Json(of::<v1::CreateSandbox>),
            body_optional: true,
            status: 201,
            answer: Json(of::<v1::Sandbox>),
            ..op(
                "post",
                "/v1/sandboxes",
                "createSandbox",
                "sandboxes",
                "Create a sandbox from a template or a snapshot (a warm-pool claim when one serves).",
            )
        },
        Op {
            query: vec![
                Param {
                    repeated: true,
                    ..q("state", "string", "Only this state (repeatable).")
                },
                Param {
                    repeated: true,
                    ..q(
                        "metadata",
                        "string",
                        "`key=value` that must match (repeatable).",
                    )
                },
                q(
                    "after",
                    "string",
                    "Cursor: the `next` of the previous page.",
                ),
                q("limit", "integer", "Page size (default 100, at most 1000)."),
            ],
            answer: Json(of::<v1::SandboxList>),
            ..op(
                "get",
                "/v1/sandboxes",
                "listSandboxes",
                "sandboxes",
                "List sandboxes, oldest first.",
            )
        },
        Op {
            answer: Json(of::<v1::Sandbox>),
            ..op(
                "get",
                "/v1/sandboxes/{id}",
                "getSandbox",
                "sandboxes",
                "Get a sandbox.",
            )
        },
        Op {
            status: 204,
            ..op(
                "delete",
                "/v1/sandboxes/{id}",
                "deleteSandbox",
                "sandboxes",
                "Destroy a sandbox.",
            )
        },
        Op {
            body: Json(of::<v1::SetTimeout>),
            answer: Json(of::<v1::Sandbox>),
            ..op(
                "post",
                "/v1/sandboxes/{id}/timeout",
                "setTimeout",
                "sandboxes",
                "Set a sandbox's time to live, from now.",
            )
        },
        Op {
            answer: Json(of::<v1::SandboxNetwork>),
            ..op(
                "get",
                "/v1/sandboxes/{id}/network",
                "getSandboxNetwork",
                "sandboxes",
                "A sandbox's network policy, with its counters and latest refusals.",
            )
        },
        Op {
            body: Json(of::<v1::Network>),
            answer: Json(of::<v1::SandboxNetwork>),
            ..op(
                "put",
                "/v1/sandboxes/{id}/network",
                "setSandboxNetwork",
                "sandboxes",
                "Replace a running sandbox's network policy: new connections and DNS queries \
                 meet it at once; open connections stay open (no network ends them).",
            )
        },
        Op {
            answer: Json(of::<v1::Sandbox>),
            ..op(
                "post",
                "/v1/sandboxes/{id}/pause",
                "pauseSandbox",
                "sandboxes",
                "Freeze every process of a sandbox (409 when already paused).",
            )
        },
        Op {
            body: Json(of::<v1::ResumeSandbox>),
            body_optional: true,
            answer: Json(of::<v1::Sandbox>),
            ..op(
                "post",
                "/v1/sandboxes/{id}/resume",
                "resumeSandbox",
                "sandboxes",
                "Thaw a paused sandbox, optionally with a new time to live.",
            )
        },
        Op {
            body: Json(of::<v1::CreateSnapshot>),
            body_optional: true,
            status: 201,
            answer: Json(of::<v1::Snapshot>),
            ..op(
                "post",
                "/v1/sandboxes/{id}/snapshots",
                "createSnapshot",
                "snapshots",
                "Snapshot a sandbox's files.",
            )
        },
        Op {
            body: Json(of::<v1::ForkSandbox>),
            body_optional: true,
            status: 201,
            answer: Json(of::<v1::ForkResult>),
            ..op(
                "post",
                "/v1/sandboxes/{id}/fork",
                "forkSandbox",
                "snapshots",
                "Copy a sandbox's files into 1 to 20 new sandboxes.",
            )
        },
        Op {
            query: vec![
                q("sandbox_id", "string", "Only snapshots of this sandbox."),
                q("name", "string", "Only snapshots with this name."),
                q(
                    "after",
                    "string",
                    "Cursor: the `next` of the previous page.",
                ),
                q("limit", "integer", "Page size (default 100, at most 1000)."),
            ],
            answer: Json(of::<v1::SnapshotList>),
            ..op(
                "get",
                "/v1/snapshots",
                "listSnapshots",
                "snapshots",
                "List snapshots, oldest first.",
            )
        },
        Op {
            answer: Json(of::<v1::Snapshot>),
            ..op(
                "get",
                "/v1/snapshots/{id}",
                "getSnapshot",
                "snapshots",
                "Get a snapshot.",
            )
        },
        Op {
            status: 204,
            ..op(
                "delete",
                "/v1/snapshots/{id}",
                "deleteSnapshot",
                "snapshots",
                "Delete a snapshot (its stored copy too).",
            )
        },
        Op {
            body: Json(of::<v1::ExecRequest>),
            answer: Json(of::<v1::ExecResult>),
            alternatives: &[(
                200,
                NdJson(of::<v1::ExecEvent>),
                "With `Accept: application/x-ndjson`: the events as they happen.",
            )],
            ..op(
                "post",
                "/v1/sandboxes/{id}/exec",
                "exec",
                "exec",
                "Run a command; buffered JSON, or an NDJSON event stream.",
            )
        },
        Op {
            query: vec![
                PATH_PARAM,
                q(
                    "format",
                    "string",
                    "`raw` (default) or `tar` (a directory as a tar stream).",
                ),
                USER_PARAM,
            ],
            answer: Bytes("application/octet-stream"),
            alternatives: &[(200, Bytes("application/x-tar"), "With `format=tar`.")],
            ..op(
                "get",
                "/v1/sandboxes/{id}/files",
                "downloadFile",
                "files",
                "Download a file, or a directory as tar.",
            )
        },
        Op {
            query: vec![
                PATH_PARAM,
                q(
                    "format",
                    "string",
                    "`raw` (default) or `tar` (extract the body into the directory).",
                ),
                USER_PARAM,
            ],
            body: Bytes("application/octet-stream"),
            answer: Json(of::<v1::FileEntry>),
            ..op(
                "put",
                "/v1/sandboxes/{id}/files",
                "uploadFile",
                "files",
                "Upload a file (streamed), or extract a tar into a directory.",
            )
        },
        Op {
            query: vec![PATH_PARAM, USER_PARAM],
            status: 204,
            ..op(
                "delete",
                "/v1/sandboxes/{id}/files",
                "removeFile",
                "files",
                "Remove a file or a directory tree.",
            )
        },
        Op {
            query: vec![
                PATH_PARAM,
                q(
                    "depth",
                    "integer",
                    "Levels to descend (default 1, at most 32).",
                ),
                USER_PARAM,
            ],
            answer: Json(of::<v1::FileList>),
            ..op(
                "get",
                "/v1/sandboxes/{id}/files/list",
                "listFiles",
                "files",
                "List a directory.",
            )
        },
        Op {
            query: vec![PATH_PARAM, USER_PARAM],
            answer: Json(of::<v1::FileEntry>),
            ..op(
                "get",
                "/v1/sandboxes/{id}/files/stat",
                "statFile",
                "files",
                "Describe an entry.",
            )
        },
        Op {
            query: vec![USER_PARAM],
            body: Json(of::<v1::MakeDir>),
            status: 201,
            answer: Json(of::<v1::FileEntry>),
            alternatives: &[(200, Json(of::<v1::FileEntry>), "It already existed.")],
            ..op(
                "post",
                "/v1/sandboxes/{id}/files/mkdir",
                "makeDir",
                "files",
                "Make a directory and its parents.",
            )
        },
        Op {
            query: vec![USER_PARAM],
            body: Json(of::<v1::MoveFile>),
            answer: Json(of::<v1::FileEntry>),
            ..op(
                "post",
                "/v1/sandboxes/{id}/files/move",
                "moveFile",
                "files",
                "Rename an entry.",
            )
        },
        Op {
            body: Json(of::<v1::RunRequest>),
            answer: Json(of::<v1::RunResult>),
            ..op(
                "post",
                "/v1/run",
                "run",
                "run",
                "One shot: a sandbox, files in, a run, files out, the sandbox destroyed.",
            )
        },
        Op {
            body: Json(of::<v1::CreateTemplate>),
            status: 201,
            answer: Json(of::<v1::Template>),
            alternatives: &[(
                200,
                NdJson(of::<v1::TemplateCreateEvent>),
                "With `Accept: application/x-ndjson`: the pull of its image as it goes, then \
                 the template or the error.",
            )],
            ..op(
                "post",
                "/v1/templates",
                "createTemplate",
                "templates",
                "Define a template.",
            )
        },
        Op {
            answer: Json(of::<v1::TemplateList>),
            ..op(
                "get",
                "/v1/templates",
                "listTemplates",
                "templates",
                "List templates.",
            )
        },
        Op {
            answer: Json(of::<v1::Template>),
            ..op(
                "get",
                "/v1/templates/{name}",
                "getTemplate",
                "templates",
                "Get a template and its warm pool.",
            )
        },
        Op {
            body: Json(of::<v1::TagTemplate>),
            answer: Json(of::<v1::TemplateList>),
            ..op(
                "post",
                "/v1/templates/{name}/tags",
                "tagTemplate",
                "templates",
                "Copy a template to tags of its name (`name:tag`), moving tags that exist.",
            )
        },
        Op {
            query: vec![q(
                "force",
                "boolean",
                "Delete even while sandboxes of it run (they keep running).",
            )],
            status: 204,
            answer: Empty,
            ..op(
                "delete",
                "/v1/templates/{name}",
                "deleteTemplate",
                "templates",
                "Delete a template and its warm pool.",
            )
        },
        Op {
            body: Bytes("application/x-tar"),
            status: 201,
            answer: Json(of::<serde_json::Value>),
            ..op(
                "put",
                "/v1/build-contexts/{digest}",
                "putBuildContext",
                "builds",
                "Upload a build context (a tar archive whose bytes have this sha256 digest).",
            )
        },
        Op {
            status: 200,
            answer: Empty,
            alternatives: &[(404, Empty, "The tenant has no such context.")],
            ..op(
                "head",
                "/v1/build-contexts/{digest}",
                "hasBuildContext",
                "builds",
                "Whether the tenant has uploaded this build context.",
            )
        },
        Op {
            body: Json(of::<v1::CreateBuild>),
            status: 202,
            answer: Json(of::<v1::Build>),
            ..op(
                "post",
                "/v1/builds",
                "createBuild",
                "builds",
                "Build a template from a Dockerfile; the build runs in the background.",
            )
        },
        Op {
            answer: Json(of::<v1::BuildList>),
            ..op(
                "get",
                "/v1/builds",
                "listBuilds",
                "builds",
                "List builds, newest first.",
            )
        },
        Op {
            answer: Json(of::<v1::Build>),
            ..op(
                "get",
                "/v1/builds/{id}",
                "getBuild",
                "builds",
                "Get a build.",
            )
        },
        Op {
            query: vec![q("offset", "integer", "The byte of the log to start at.")],
            answer: Json(of::<v1::BuildLogs>),
            ..op(
                "get",
                "/v1/builds/{id}/logs",
                "getBuildLogs",
                "builds",
                "A build's log from an offset.",
            )
        },
        Op {
            answer: Json(of::<v1::Build>),
            ..op(
                "post",
                "/v1/builds/{id}/cancel",
                "cancelBuild",
                "builds",
                "Cancel a queued or running build.",
            )
        },
        Op {
            status: 204,
            answer: Empty,
            ..op(
                "delete",
                "/v1/builds/{id}",
                "deleteBuild",
                "builds",
                "Delete a finished build's record and log.",
            )
        },
        Op {
            body: Json(of::<v1::CreateJob>),
            status: 202,
            answer: Json(of::<v1::Job>),
            alternatives: &[(
                200,
                Json(of::<v1::Job>),
                "A job with this idempotency key exists: that job.",
            )],
            ..op(
                "post",
                "/v1/jobs",
                "submitJob",
                "jobs",
                "Queue a job (code or a command, inputs, outputs to keep); it is recorded before this answer.",
            )
        },
        Op {
            query: vec![
                Param {
                    repeated: true,
                    ..q("state", "string", "Only jobs in this state (repeatable).")
                },
                q(
                    "after",
                    "string",
                    "The cursor of the previous page (`next`).",
                ),
                q("limit", "integer", "Page size, 1 to 1000 (default 100)."),
            ],
            answer: Json(of::<v1::JobList>),
            ..op(
                "get",
                "/v1/jobs",
                "listJobs",
                "jobs",
                "List jobs, newest first, a page at a time.",
            )
        },
        Op {
            answer: Json(of::<v1::Job>),
            ..op("get", "/v1/jobs/{id}", "getJob", "jobs", "Get a job.")
        },
        Op {
            answer: Json(of::<v1::Job>),
            ..op(
                "post",
                "/v1/jobs/{id}/cancel",
                "cancelJob",
                "jobs",
                "Cancel a queued or running job (a running one's sandbox is destroyed).",
            )
        },
        Op {
            status: 204,
            answer: Empty,
            ..op(
                "delete",
                "/v1/jobs/{id}",
                "deleteJob",
                "jobs",
                "Delete a job and the blobs it kept (a job not over is cancelled first).",
            )
        },
        Op {
            answer: Bytes("application/octet-stream"),
            ..op(
                "get",
                "/v1/jobs/{id}/logs/{stream}",
                "getJobLog",
                "jobs",
                "The whole standard output (`stdout`) or error (`stderr`) of the job's last attempt, streamed.",
            )
        },
        Op {
            query: vec![Param {
                required: true,
                ..q("path", "string", "The output's path, as the job lists it.")
            }],
            answer: Bytes("application/octet-stream"),
            ..op(
                "get",
                "/v1/jobs/{id}/output",
                "getJobOutput",
                "jobs",
                "Download a file the job kept, streamed.",
            )
        },
        Op {
            body: Bytes("application/octet-stream"),
            status: 201,
            answer: Json(of::<v1::Blob>),
            ..op(
                "post",
                "/v1/blobs",
                "uploadBlob",
                "jobs",
                "Store a blob (up to 1 GiB, streamed) for jobs' inputs; answers its digest.",
            )
        },
        Op {
            status: 204,
            answer: Empty,
            ..op(
                "delete",
                "/v1/blobs/{digest}",
                "deleteBlob",
                "jobs",
                "Delete an uploaded blob (jobs that name it keep it until they go).",
            )
        },
        Op {
            body: Json(of::<v1::CreateKey>),
            status: 201,
            answer: Json(of::<v1::CreatedKey>),
            ..op(
                "post",
                "/v1/keys",
                "createKey",
                "keys",
                "Make an API key (admin keys only); its secret is in this answer only.",
            )
        },
        Op {
            query: vec![TENANT_PARAM],
            answer: Json(of::<v1::KeyList>),
            ..op(
                "get",
                "/v1/keys",
                "listKeys",
                "keys",
                "List a tenant's API keys, revoked ones included (admin keys only).",
            )
        },
        Op {
            query: vec![TENANT_PARAM],
            answer: Json(of::<v1::ApiKey>),
            ..op(
                "delete",
                "/v1/keys/{id}",
                "revokeKey",
                "keys",
                "Revoke an API key (admin keys only).",
            )
        },
    ]
}

fn content(c: Content, g: &mut SchemaGenerator) -> Option<Value> {
    let (media, schema) = match c {
        Content::Empty => return None,
        Content::Json(f) => ("application/json", serde_json::to_value(f(g)).ok()?),
        Content::NdJson(f) => ("application/x-ndjson", serde_json::to_value(f(g)).ok()?),
        Content::Bytes(media) => (media, json!({"type": "string", "contentMediaType": media})),
    };
    Some(json!({ media: { "schema": schema } }))
}

fn parameters(op: &Op) -> Vec<Value> {
    let mut out = Vec::new();
    for segment in op.path.split('/') {
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            out.push(json!({
                "name": name, "in": "path", "required": true, "schema": {"type": "string"}
            }));
        }
    }
    for p in &op.query {
        let schema = if p.repeated {
            json!({"type": "array", "items": {"type": p.kind}})
        } else {
            json!({"type": p.kind})
        };
        let mut param = json!({
            "name": p.name, "in": "query", "required": p.required,
            "description": p.description, "schema": schema,
        });
        if p.repeated {
            param["explode"] = json!(true);
        }
        out.push(param);
    }
    out
}

fn build() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut g = settings.into_generator();
    let error = of::<v1::ErrorBody>(&mut g);
    let mut paths = Map::new();
    for op in operations() {
        let mut responses = Map::new();
        let mut ok = json!({"description": "Success."});
        if let Some(c) = content(op.answer, &mut g) {
            ok["content"] = c;
        }
        for (status, alt, description) in op.alternatives {
            let alt = content(*alt, &mut g).unwrap_or_else(|| json!({}));
            if *status == op.status {
                // Another media type of the same answer.
                if let (Some(have), Some(more)) = (ok["content"].as_object_mut(), alt.as_object()) {
                    have.extend(more.clone());
                }
                ok["description"] = json!(format!("Success. {description}"));
            } else {
                responses.insert(
                    status.to_string(),
                    json!({"description": description, "content": alt}),
                );
            }
        }
        responses.insert(op.status.to_string(), ok);
        responses.insert(
            "default".into(),
            json!({
                "description": "An error: `{\"error\": {\"code\", \"message\"}}`.",
                "content": {"application/json": {"schema": error}},
            }),
        );
        let mut operation = json!({
            "operationId": op.id,
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": parameters(&op),
            "responses": responses,
        });
        if let Some(c) = content(op.body, &mut g) {
            operation["requestBody"] = json!({"required": !op.body_optional, "content": c});
        }
        if op.open {
            operation["security"] = json!([]);
        }
        let item = paths.entry(op.path.to_owned()).or_insert_with(|| json!({}));
        item[op.method] = operation;
    }
    let schemas: Map<String, Value> = g.take_definitions(true).into_iter().collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "moat",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Self-hosted sandboxes for untrusted code. Every route but the health \
                            endpoints needs `Authorization: Bearer <API key>`.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}

/// The document (built once).
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(build)
}

/// `GET /v1/openapi.json`.
pub(crate) async fn serve() -> Json<&'static Value> {
    Json(document())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for part in text.split("\"$ref\":\"").skip(1) {
            let target = &part[..part.find('"').unwrap()];
            let name = target.strip_prefix("#/components/schemas/").unwrap();
            assert!(schemas.contains_key(name), "dangling {target}");
        }
        assert!(schemas.contains_key("CreateSandbox"));
        assert!(
            schemas["CreateSandbox"]["properties"]
                .get("snapshot")
                .is_some()
        );
        assert!(schemas.contains_key("ForkResult"));
        assert_eq!(doc["paths"]["/healthz"]["get"]["security"], json!([]));
    }
}
