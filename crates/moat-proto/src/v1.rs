//! The `/v1` REST API's request and response bodies (JSON).
//!
//! Requests refuse unknown fields (`deny_unknown_fields`), so a misspelt option is an error
//! rather than silently ignored. Responses may gain fields; clients should ignore those they do
//! not know.
//!
//! # Resources
//!
//! A [`ResourceRequest`] uses the command line's forms: sizes (`memory`, `disk`) are strings
//! with an optional binary unit (`"512M"`, `"1G"`, `"65536"`), counts (`cpus`, `pids`) are JSON
//! numbers (`0.5`, `256`). Responses give the resolved limits as plain numbers
//! ([`ResourceLimits`]).
//!
//! # Times
//!
//! Timestamps are Unix milliseconds; durations given by clients are whole seconds.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The template a sandbox uses when the request names none.
pub const DEFAULT_TEMPLATE: &str = "host";

/// `POST /v1/sandboxes`: make a sandbox, from a template or from a snapshot.
///
/// The JSON body names at most one of `template` and `snapshot` (neither means the default
/// template); both is an error. A client that sets `snapshot` here leaves `template` at its
/// default, which is then not sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "CreateSandboxBody")]
pub struct CreateSandbox {
    /// Template name; [`DEFAULT_TEMPLATE`] when absent. Ignored with `snapshot`.
    #[serde(skip_serializing_if = "is_default_template")]
    pub template: String,
    /// A snapshot id (see [`Snapshot`]): the sandbox gets the snapshot's template, resources
    /// and environment, and its files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Limits; each one absent takes the template's default. Each must be within the
    /// template's maximum. Not with `snapshot` (its sandbox has the snapshot's).
    pub resources: Option<ResourceRequest>,
    /// Environment variables of every process in the sandbox (over the template's, or the
    /// snapshot's).
    pub env: BTreeMap<String, String>,
    /// The client's labels, filterable in listings.
    pub metadata: BTreeMap<String, String>,
    /// Time to live in seconds; the server's default (5 minutes) when absent, at most its
    /// configured maximum.
    pub timeout_secs: Option<u64>,
    /// Whether the sandbox's own services (ports other than 49983 and 49999) are reachable
    /// without its traffic access token; the server's default (`moat serve
    /// --private-traffic`) when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_traffic: Option<bool>,
    /// What its time running out does, and whether traffic resumes it when paused; kill, and
    /// no, when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    /// Its network; the template's when absent (none, loopback only, unless the template
    /// says otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
}

/// A sandbox's network. With `internet` false and no `allow` rule, it has none: loopback only.
/// Otherwise it reaches, through moat, what the rules and `internet` allow.
///
/// A rule is a CIDR network (`10.1.0.0/16`, `2001:db8::/32`), an IP address, a domain
/// (`pypi.org`) or every name below one (`*.example.com`), each optionally limited to a port
/// or port range (`api.example.com:443`, `203.0.113.7:8000-8010`; an IPv6 network with a port
/// in brackets, `[2001:db8::/32]:443`). The most specific rule that matches an address wins,
/// a deny over an allow of the same prefix; a domain rule beats any network rule for the
/// addresses moat resolved for that name. The host itself, loopback and multicast are never
/// reachable; private, shared and link-local ranges (with the cloud metadata addresses) only
/// through an allow rule inside them, given by an admin key. At most 256 rules per list and 4
/// DNS servers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Whether addresses no rule names (the public internet) are reachable.
    #[serde(default)]
    pub internet: bool,
    /// Rules that allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Rules that deny.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// IP addresses of the resolvers moat asks for the sandbox's names; the host's own
    /// (`/etc/resolv.conf`) when empty. The sandbox never reaches a resolver itself: moat
    /// answers its DNS, refusing names the rules do not allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
}

impl Network {
    /// The `internet: true` network with no rules.
    pub fn internet() -> Network {
        Network {
            internet: true,
            ..Network::default()
        }
    }

    /// Whether it is no network at all (loopback only).
    pub fn is_none(&self) -> bool {
        !self.internet && self.allow.is_empty()
    }
}

/// `GET` and `PUT /v1/sandboxes/{id}/network`: a sandbox's network and what it did with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SandboxNetwork {
    /// Its policy.
    pub network: Network,
    /// Its counters since it started (or since this server adopted it); absent while it has
    /// no network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<NetworkStats>,
}

/// What a sandbox did with its network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkStats {
    /// Connections allowed and opened.
    pub connections: u64,
    /// Connections refused.
    pub denied: u64,
    /// Bytes sent out through its connections (counted as each ends).
    pub bytes_out: u64,
    /// Bytes received through them (counted as each ends).
    pub bytes_in: u64,
    /// DNS queries answered.
    pub dns_answered: u64,
    /// DNS queries refused (names not allowed, answers pointing at closed addresses).
    pub dns_refused: u64,
    /// The latest refusals (at most 32), oldest first: what the sandbox tried.
    pub recent_denials: Vec<Denial>,
}

/// One refused connection or DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Denial {
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Where to: `ip:port`, or the name asked.
    pub target: String,
    /// Why, naming the rule or range.
    pub reason: String,
}

/// What a sandbox's time to live running out does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// End it (`killed`, reason `ttl`).
    #[default]
    Kill,
    /// Pause it (on gvisor: saved to disk, its memory released); it then stays paused, with no
    /// time to live, until it is resumed or deleted.
    Pause,
}

/// A sandbox's lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lifecycle {
    /// What its time to live running out does.
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// Whether a call that needs the paused sandbox (a command, a file, traffic to its
    /// ports) resumes it first, with its time to live started again, instead of being refused.
    #[serde(default)]
    pub auto_resume: bool,
}

// The JSON form of `CreateSandbox`, where an absent `template` can be told from the default.
/// `POST /v1/sandboxes`: make a sandbox from a template, or from a snapshot (at most one of
/// `template` and `snapshot`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "CreateSandbox")]
struct CreateSandboxBody {
    /// Template name; [`DEFAULT_TEMPLATE`] when absent (and no `snapshot` is given).
    #[serde(default)]
    template: Option<String>,
    /// A snapshot id instead of a template: the sandbox gets the snapshot's template,
    /// resources and environment, and its files.
    #[serde(default)]
    snapshot: Option<String>,
    /// Limits; each one absent takes the template's default. Each must be within the
    /// template's maximum. Not with `snapshot`.
    #[serde(default)]
    resources: Option<ResourceRequest>,
    /// Environment variables of every process in the sandbox (over the template's, or the
    /// snapshot's).
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// The client's labels, filterable in listings.
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    /// Time to live in seconds; the server's default (5 minutes) when absent, at most its
    /// configured maximum.
    #[serde(default)]
    timeout_secs: Option<u64>,
    /// Whether the sandbox's own services (ports other than 49983 and 49999) are reachable
    /// without its traffic access token; the server's default when absent.
    #[serde(default)]
    public_traffic: Option<bool>,
    /// What its time running out does, and whether traffic resumes it when paused; kill, and
    /// no, when absent.
    #[serde(default)]
    lifecycle: Option<Lifecycle>,
    /// Its network; the template's when absent.
    #[serde(default)]
    network: Option<Network>,
}

impl TryFrom<CreateSandboxBody> for CreateSandbox {
    type Error = String;

    fn try_from(b: CreateSandboxBody) -> Result<Self, String> {
        if b.template.is_some() && b.snapshot.is_some() {
            return Err("give one of `template` and `snapshot`, not both".into());
        }
        Ok(CreateSandbox {
            template: b.template.unwrap_or_else(default_template),
            snapshot: b.snapshot,
            resources: b.resources,
            env: b.env,
            metadata: b.metadata,
            timeout_secs: b.timeout_secs,
            public_traffic: b.public_traffic,
            lifecycle: b.lifecycle,
            network: b.network,
        })
    }
}

impl Default for CreateSandbox {
    /// The same as the empty JSON object: the `host` template with every default.
    fn default() -> Self {
        CreateSandbox {
            template: default_template(),
            snapshot: None,
            resources: None,
            env: BTreeMap::new(),
            metadata: BTreeMap::new(),
            timeout_secs: None,
            public_traffic: None,
            lifecycle: None,
            network: None,
        }
    }
}

fn is_default_template(t: &str) -> bool {
    t == DEFAULT_TEMPLATE
}

fn default_template() -> String {
    DEFAULT_TEMPLATE.to_owned()
}

/// Limits as a client asks for them; absent ones take a default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceRequest {
    /// Memory (RAM, no swap) as a size string: `"512M"`, `"1G"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPUs as a number: `0.5`, `2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Most processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Size of the writable layer as a size string; it lives in memory and counts against
    /// `memory` as it fills.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

/// Resolved limits, as numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ResourceLimits {
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// CPU, thousandths of a CPU.
    pub cpu_millis: u64,
    /// Most processes and threads.
    pub pids: u64,
    /// Writable layer, bytes.
    pub disk_bytes: u64,
}

/// Where a template's root filesystem comes from: `"host"`, `{"dir": "/path"}` or
/// `{"image": "registry/name:tag"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Rootfs {
    /// The host's system directories, read-only.
    Host,
    /// A directory on the host holding a root filesystem, read-only below a writable layer.
    Dir(String),
    /// An OCI image, pulled when the template is made: read-only below a writable layer. A
    /// stored template names it pinned to the digest pulled (`name:tag@sha256:…`).
    Image(String),
    /// An image a build made (`POST /v1/builds`), by the digest of its layers and
    /// configuration. Only builds write it.
    Build(String),
}

/// A template's definition, as stored and as clients give it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// The root filesystem.
    pub rootfs: Rootfs,
    /// Default limits of its sandboxes; the engine's defaults where absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequest>,
    /// Largest limits a sandbox may ask for; the engine's bounds where absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_resources: Option<ResourceRequest>,
    /// Environment variables of every process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The user commands run as by default (`user` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The working directory of commands by default (the user's home when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// A script for `/bin/sh -c` started in the background when a sandbox starts (a server,
    /// a kernel); it runs as `user` in `workdir` for the sandbox's life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// A script for `/bin/sh -c` run until it exits 0 before a sandbox counts as ready (for
    /// example, that the `start` server answers). A sandbox not ready within
    /// `ready_timeout_secs` fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// How long `ready` may take to succeed, seconds; [`DEFAULT_READY_TIMEOUT_SECS`] when
    /// absent, at most [`MAX_READY_TIMEOUT_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_secs: Option<u64>,
    /// Time to live of its sandboxes when a create names none, seconds; the server's default
    /// when absent, at most its maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Sandboxes kept started and ready for claims (the warm pool); 0 for none. The server's
    /// pool memory budget may keep fewer.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pool_size: u32,
    /// The isolation backend its sandboxes are made with (`native`, …), one the server runs;
    /// the server's default (`moat serve --backend`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// A snapshot with memory (the tenant's) its sandboxes start from: restored where the
    /// snapshot's sandbox was (a start script's work already done), on the snapshot's backend.
    /// No `start` or `ready` then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The network of its sandboxes (none, loopback only, when absent); a create may give its
    /// own instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
}

impl TemplateSpec {
    /// A spec with this root filesystem and every other field at its default.
    pub fn new(rootfs: Rootfs) -> TemplateSpec {
        TemplateSpec {
            rootfs,
            resources: None,
            max_resources: None,
            env: BTreeMap::new(),
            user: None,
            workdir: None,
            start: None,
            ready: None,
            ready_timeout_secs: None,
            timeout_secs: None,
            pool_size: 0,
            backend: None,
            snapshot: None,
            network: None,
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Readiness timeout of a template that names none, seconds.
pub const DEFAULT_READY_TIMEOUT_SECS: u64 = 30;
/// Longest readiness timeout a template may name, seconds.
pub const MAX_READY_TIMEOUT_SECS: u64 = 600;
/// Largest warm pool one template may ask for.
pub const MAX_POOL_SIZE: u32 = 1000;

/// `POST /v1/templates`: define a template for the caller's tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    /// Its name, `[a-z0-9][a-z0-9._-]{0,62}`, unique among the tenant's and the built-in
    /// templates.
    pub name: String,
    /// Its definition.
    pub spec: TemplateSpec,
}

/// A template as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Template {
    /// Its name (`name`, or `name:tag` for a tag).
    pub name: String,
    /// Built in (visible to every tenant, not deletable by them).
    pub builtin: bool,
    /// The build that made it (for a tag, the build of the template it was copied from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    /// Its definition.
    pub spec: TemplateSpec,
    /// When it was created, Unix milliseconds.
    pub created_at: i64,
    /// Its warm pool now.
    pub pool: PoolStatus,
}

/// A template's warm pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PoolStatus {
    /// Sandboxes the pool keeps (the template's `pool_size`, less what the memory budget
    /// does not allow).
    pub target: u32,
    /// Sandboxes started, ready and not yet claimed.
    pub ready: u32,
    /// Members destroyed since the server started because the pools held more memory than
    /// their budget (each pass destroys the largest until the rest fit).
    #[serde(default)]
    pub evicted: u64,
}

/// One line of `POST /v1/templates` with `Accept: application/x-ndjson`: how the pull of the
/// template's image goes, then the template made or the error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TemplateCreateEvent {
    /// The image's manifest is known: its layers and their compressed size together.
    Resolved {
        /// Layers of the image.
        layers: u32,
        /// Their compressed bytes together.
        bytes: u64,
    },
    /// Bytes of a layer received so far (layers the server has already are not fetched).
    Progress {
        /// Which layer, from 0.
        layer: u32,
        /// Bytes received.
        received: u64,
        /// The layer's compressed size.
        size: u64,
    },
    /// A layer is unpacked (or was here already).
    Unpacked {
        /// Which layer, from 0.
        layer: u32,
    },
    /// The template is made: the last line.
    Template {
        /// The template.
        template: Box<Template>,
    },
    /// It failed: the last line.
    Error(ErrorDetail),
}

/// `GET /v1/templates`: the templates the caller sees, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TemplateList {
    /// The templates.
    pub templates: Vec<Template>,
}

/// Most tags one build or one `POST /v1/templates/{name}/tags` writes.
pub const MAX_TEMPLATE_TAGS: usize = 16;

/// `POST /v1/templates/{name}/tags`: copy the template `name` (itself `name` or `name:tag`)
/// to each of `tags` of its name, replacing tags that exist.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TagTemplate {
    /// The tags (`default`: the name alone, when a build made it); at most
    /// [`MAX_TEMPLATE_TAGS`].
    pub tags: Vec<String>,
}

/// `POST /v1/builds`: build a template from a Dockerfile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBuild {
    /// The template to make (`name` or `name:tag`). A template of that name that a build
    /// made, or a tag, is replaced when the build succeeds; any other is a conflict.
    pub template: String,
    /// More tags the build writes, each as `name:tag` of the template's name (`default`:
    /// the name alone); at most [`MAX_TEMPLATE_TAGS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// The build context, for `COPY` and `ADD`: the digest (`sha256:…`) of a tar archive
    /// uploaded with `PUT /v1/build-contexts/{digest}`. None: an empty context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Named build contexts, for `COPY --from=NAME`: each a digest of an uploaded archive
    /// (names `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub contexts: BTreeMap<String, String>,
    /// Names the Dockerfile's `FROM` may use for a template's image: `FROM NAME` starts from
    /// the image of the template this maps `NAME` to (one made from an image or a build).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub from_templates: BTreeMap<String, String>,
    /// Values of the Dockerfile's `ARG`s.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, String>,
    /// The template's start script (its sandboxes run it in the background at boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// The template's readiness script (retried until it exits 0 before a sandbox counts as
    /// started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// The backend the steps run on and the template uses; the server's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Limits of each `RUN` step's sandbox (its `disk` bounds what a step may write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequest>,
    /// The network of `RUN` steps (none when absent: loopback only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// Longest the whole build may take, seconds (default 1800, at most 7200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Run every step again instead of reusing what an earlier build made.
    #[serde(default)]
    pub no_cache: bool,
}

/// Where a build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    /// Waiting for its turn.
    Queued,
    /// Its steps are running.
    Running,
    /// Done: the template is made.
    Succeeded,
    /// A step failed, a limit was reached or the server stopped; see `error`.
    Failed,
    /// Cancelled by its owner.
    Cancelled,
}

impl BuildStatus {
    /// Whether the build is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            BuildStatus::Succeeded | BuildStatus::Failed | BuildStatus::Cancelled
        )
    }
}

/// A build as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Build {
    /// Its id (`b-…`).
    pub id: String,
    /// The template it makes.
    pub template: String,
    /// The more tags it writes (see [`CreateBuild::tags`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Where it is.
    pub status: BuildStatus,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Steps of the Dockerfile after `FROM`.
    pub steps: u32,
    /// Steps finished so far.
    pub steps_done: u32,
    /// Steps whose result an earlier build made and this one reused.
    pub steps_cached: u32,
    /// The image made (`sha256:…`), once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When it was asked for, Unix milliseconds.
    pub created_at: i64,
    /// When it ended, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// Warnings about the Dockerfile (instructions with no effect in moat, unused args).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// `GET /v1/builds`: the caller's builds, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BuildList {
    /// The builds.
    pub builds: Vec<Build>,
}

/// `GET /v1/builds/{id}/logs?offset=N`: the build's log from byte `offset` on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BuildLogs {
    /// The log from the offset asked for (UTF-8; invalid bytes replaced).
    pub text: String,
    /// The offset to ask for next.
    pub next_offset: u64,
    /// The build is over and the log complete.
    pub done: bool,
}

/// `POST /v1/jobs`: run code or a command later, in a fresh sandbox, with inputs written
/// before and outputs kept in blob storage after.
///
/// Exactly one of `code`, `cmd` and `shell` is given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// Template name; [`DEFAULT_TEMPLATE`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Source code, run by the interpreter of `language`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The language of `code`: `python` (the default), `bash`, `sh` or `javascript`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Program and arguments instead of code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// A script for `/bin/sh -c` instead of code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Files written into the sandbox before the run (relative paths are under the working
    /// directory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<JobInput>,
    /// Paths or globs (`*`, `?`, `[a-z]` within a name; `**` for any number of directories)
    /// of files to keep after the run, relative to the working directory unless absolute.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Environment variables of the run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory; the template's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Seconds one attempt may run (default 600; at most the server's `--max-ttl` less 300,
    /// and 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Limits of the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequest>,
    /// Attempts after the first when one fails (a non-zero exit or a sandbox that failed);
    /// 0 when absent, at most 10. A timeout or a cancel is not retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// A key of the caller's choosing: a second submit with the same key returns the first
    /// job instead of making another (also taken from the `Idempotency-Key` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// An `http://` or `https://` URL the server POSTs the finished job to (the job's JSON,
    /// signed in `Moat-Signature` with the job's `webhook.secret`), retried with backoff
    /// until it answers 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

/// A job's completion webhook and how its delivery went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct JobWebhook {
    /// Where it is sent.
    pub url: String,
    /// The key of its signature: `Moat-Signature: t=T,v1=HEX` where HEX is the hex
    /// HMAC-SHA256 of `T.BODY` under this secret (T: Unix seconds of the attempt).
    pub secret: String,
    /// Deliveries tried so far.
    pub attempts: u32,
    /// When a delivery was answered 2xx, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<i64>,
    /// Why the last delivery failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One input file of a [`CreateJob`]: `path`, and exactly one of `content`, `content_b64`,
/// `blob` and `job_output`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobInput {
    /// Where the file is written in the sandbox.
    pub path: String,
    /// UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_b64: Option<String>,
    /// A blob uploaded before with `POST /v1/blobs` (`sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
    /// An output of an earlier job of the caller's that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_output: Option<JobOutputRef>,
}

/// An output file of an earlier job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobOutputRef {
    /// The job's id.
    pub job: String,
    /// The output's path, as that job lists it.
    pub path: String,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker (a first attempt, or a retry after its backoff).
    Queued,
    /// An attempt is running.
    Running,
    /// The last attempt exited 0; its outputs are kept.
    Succeeded,
    /// The last attempt exited non-zero or its sandbox failed, with no retry left; its
    /// outputs are kept.
    Failed,
    /// Cancelled by its owner.
    Cancelled,
    /// The last attempt ran past its `timeout_secs` and was killed; its outputs are kept.
    TimedOut,
}

impl JobState {
    /// The name shown and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
        }
    }

    /// The state named `name` ([`JobState::as_str`]'s text), if any.
    pub fn from_name(name: &str) -> Option<JobState> {
        [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
            JobState::TimedOut,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// A file a job kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct JobOutput {
    /// Its absolute path in the sandbox.
    pub path: String,
    /// Its size, bytes.
    pub size: u64,
    /// Its blob (`sha256:…`).
    pub digest: String,
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Job {
    /// Its id (`job-…`).
    pub id: String,
    /// Where it is.
    pub state: JobState,
    /// The template its sandboxes are made from.
    pub template: String,
    /// Its idempotency key, if it was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Attempts started so far (an attempt cut off by a server restart counts).
    pub attempts: u32,
    /// Most attempts it may have (`retries` + 1).
    pub max_attempts: u32,
    /// The last attempt's exit code, once it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why the last attempt failed, when not by its exit code alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last 4 KiB of the last attempt's standard output (UTF-8, invalid bytes
    /// replaced); the whole of it is at `/v1/jobs/{id}/logs/stdout`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stdout_tail: String,
    /// Likewise for standard error.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr_tail: String,
    /// The files it kept, once it ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<JobOutput>,
    /// Output paths or globs that matched nothing, or files that could not be kept, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_errors: Vec<String>,
    /// When it was submitted, Unix milliseconds.
    pub created_at: i64,
    /// When its last attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// Its completion webhook, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<JobWebhook>,
}

/// `GET /v1/jobs`: the caller's jobs, newest first, a page at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobList {
    /// The jobs.
    pub jobs: Vec<Job>,
    /// The cursor of the next page (pass it as `after`); absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A stored blob (`POST /v1/blobs` answers one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Blob {
    /// Its content's digest (`sha256:…`): what inputs name it by.
    pub digest: String,
    /// Its size, bytes.
    pub size: u64,
}

/// Where a sandbox is in its life.
///
/// `starting → running ⇄ paused`; `starting`, `running` and `paused` may end in `killed` or
/// `failed`, which are final.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Being made; not yet usable.
    Starting,
    /// Ready for commands.
    Running,
    /// Frozen; resumes to running.
    Paused,
    /// Ended on purpose: deleted, expired, or ended by the server.
    Killed,
    /// Could not be made, or broke.
    Failed,
}

impl SandboxState {
    /// Every state.
    pub const ALL: [SandboxState; 5] = [
        SandboxState::Starting,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Killed,
        SandboxState::Failed,
    ];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Killed => "killed",
            SandboxState::Failed => "failed",
        }
    }

    /// The state named `s`, if any.
    pub fn parse(s: &str) -> Option<SandboxState> {
        SandboxState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
    }

    /// Whether the sandbox still holds resources (starting, running or paused).
    pub fn is_active(self) -> bool {
        !self.is_ended()
    }

    /// Whether this state is final (killed or failed).
    pub fn is_ended(self) -> bool {
        matches!(self, SandboxState::Killed | SandboxState::Failed)
    }

    /// Whether the state machine allows going from `self` to `to`.
    pub fn can_become(self, to: SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, to),
            (Starting, Running | Failed | Killed)
                | (Running, Paused | Killed | Failed)
                | (Paused, Running | Killed | Failed)
        )
    }
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Sandbox {
    /// Its id.
    pub id: String,
    /// The template it was made from.
    pub template: String,
    /// Its state.
    pub state: SandboxState,
    /// The client's labels.
    pub metadata: BTreeMap<String, String>,
    /// Its limits.
    pub resources: ResourceLimits,
    /// When it was created.
    pub created_at: i64,
    /// When it expires, if it does.
    pub expires_at: Option<i64>,
    /// When it ended, if it has.
    pub ended_at: Option<i64>,
    /// Why it ended (`ttl`, `deleted`, `failed: …`), if it has.
    pub end_reason: Option<String>,
    /// Its access token: what its sandbox traffic (the E2B routes: `X-Access-Token`, signed
    /// file URLs) must present to reach it without an API key. Only in the answers of create
    /// and get.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// Whether its own services (ports other than 49983 and 49999) are reachable without its
    /// traffic access token.
    #[serde(default)]
    pub public_traffic: bool,
    /// Its traffic access token: what reaches its services when they are not public
    /// (`E2B-Traffic-Access-Token`), and its code interpreter. Only in the answers of create and
    /// get.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_access_token: Option<String>,
    /// The isolation backend that made it (`native`, `gvisor`).
    #[serde(default)]
    pub backend: String,
    /// What its time running out does, and whether calls resume it when paused.
    #[serde(default)]
    pub lifecycle: Lifecycle,
}

/// `GET /v1/sandboxes`: which sandboxes to list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListSandboxes {
    /// Only these states; all when empty.
    #[serde(default)]
    pub states: Vec<SandboxState>,
    /// Only sandboxes whose metadata has all of these pairs.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Continue after this cursor (a previous page's `next`).
    #[serde(default)]
    pub after: Option<String>,
    /// Page size (server default and maximum apply).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// One page of sandboxes, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SandboxList {
    /// The sandboxes.
    pub sandboxes: Vec<Sandbox>,
    /// The cursor of the next page; absent on the last.
    pub next: Option<String>,
}

/// `POST /v1/sandboxes/{id}/timeout`: a new time to live, counted from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    /// Seconds from now until the sandbox expires.
    pub timeout_secs: u64,
}

/// `POST /v1/sandboxes/{id}/resume`: thaw a paused sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeSandbox {
    /// A new time to live in seconds, counted from now; the expiry is left as it was when
    /// absent (it kept counting while the sandbox was paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// `POST /v1/sandboxes/{id}/snapshots`: take a snapshot of a running or paused sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// A name for people (1 to 128 characters, no control characters); names need not be
    /// unique, and listings filter on them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Save the sandbox's memory and running processes too (backends that can: gvisor); a
    /// sandbox made from it goes on from where they were. The sandbox is stopped for the time
    /// it takes (streams open on it end).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory: bool,
}

/// A snapshot: a frozen copy of a sandbox's writable layer (its files; never its memory or
/// processes on the native backend), from which new sandboxes start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Snapshot {
    /// Its id (`[a-z0-9]+`); `snapshot` in a create names it.
    pub id: String,
    /// Its name, if it was given one.
    pub name: Option<String>,
    /// The sandbox it was taken of.
    pub sandbox_id: String,
    /// That sandbox's template, which sandboxes made from it use.
    pub template: String,
    /// That sandbox's limits, which sandboxes made from it get.
    pub resources: ResourceLimits,
    /// Size of the stored copy, bytes.
    pub size_bytes: u64,
    /// Whether memory (running processes) was saved too; never on the native backend, whose
    /// snapshots hold files only.
    pub memory: bool,
    /// When it was taken, Unix milliseconds.
    pub created_at: i64,
}

/// `GET /v1/snapshots`: which snapshots to list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListSnapshots {
    /// Only those taken of this sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// Only those with this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Continue after this cursor (a previous page's `next`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Page size (server default and maximum apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// One page of snapshots, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotList {
    /// The snapshots.
    pub snapshots: Vec<Snapshot>,
    /// The cursor of the next page; absent on the last.
    pub next: Option<String>,
}

/// Largest `count` of one fork.
pub const MAX_FORK_COUNT: u32 = 20;

/// `POST /v1/sandboxes/{id}/fork`: copies of a running or paused sandbox. Its files are
/// snapshotted once and `count` sandboxes made from that snapshot, which is then deleted.
/// Running processes are not carried over.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkSandbox {
    /// How many copies, 1 to [`MAX_FORK_COUNT`]; 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Time to live of each copy in seconds; the server's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Labels of each copy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Copy the sandbox's memory and running processes too (backends that can: gvisor), so
    /// each copy goes on from where it was; files only otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory: bool,
}

/// What a fork made: one result per copy asked for, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ForkResult {
    /// Each copy: a sandbox, or why it could not be made.
    pub results: Vec<ForkItem>,
}

/// One copy of a fork: exactly one of `sandbox` and `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ForkItem {
    /// The new sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    /// Why this copy failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ForkError>,
}

/// Why one copy of a fork failed: what a create would have answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ForkError {
    /// The HTTP status a create failing this way answers with.
    pub status: u16,
    /// Machine-readable code (`quota_exceeded`, `unavailable`, …).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

/// Longest `timeout_secs` an [`ExecRequest`] may ask for: a buffered call holds its HTTP
/// request open.
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 3600;

/// `POST /v1/sandboxes/{id}/exec`: run one command, and either wait for its [`ExecResult`] or
/// follow it as a stream of [`ExecEvent`]s.
///
/// Exactly one of `cmd` and `shell` is given, and at most one of `stdin` and `stdin_b64`. The
/// standard input is bounded by the server's request body limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// A script for `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Text written to the command's standard input (UTF-8), which is then closed. Without it
    /// the command's standard input is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Bytes written to the command's standard input, base64 (standard alphabet, padded), for
    /// input that is not text. Not together with `stdin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
    /// Environment variables of this command (over the sandbox's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory; the sandbox's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `user` (uid 1000) or `root`; the sandbox's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Seconds after which the command and every process of its group are killed; the
    /// server's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// How output is carried: in the result's `stdout` and `stderr`, and in the `data` of a
    /// stream's output events.
    #[serde(default, skip_serializing_if = "OutputEncoding::is_default")]
    pub encoding: OutputEncoding,
}

/// How an exec's output bytes are carried in JSON strings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputEncoding {
    /// Text: the bytes decoded as UTF-8, invalid bytes replaced by U+FFFD.
    #[default]
    Utf8,
    /// Base64 (standard alphabet, padded) of the raw bytes.
    Base64,
}

impl OutputEncoding {
    fn is_default(&self) -> bool {
        *self == OutputEncoding::default()
    }
}

/// How a command ended: the last event of an exec stream, and the end fields of an
/// [`ExecResult`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExecEnd {
    /// The exit code; `null` when the command was killed by a signal or timed out.
    pub exit_code: Option<i32>,
    /// How it ended when not by exiting (`signal: killed`), else `null`.
    pub signal: Option<String>,
    /// Wall time from start to end, milliseconds.
    pub duration_ms: u64,
    /// The timeout passed and the command's process group was killed.
    pub timed_out: bool,
    /// The kernel's OOM killer killed a process of the sandbox while the command ran.
    pub oom_killed: bool,
}

/// One line of an exec stream (`Accept: application/x-ndjson`): `start`, then output events
/// as the output arrives, then exactly one `end` or `error`.
///
/// Output `data` follows the request's [`OutputEncoding`]: with `utf8` a multi-byte character
/// split between reads is held back and sent whole in the next event of the same stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ExecEvent {
    /// The command started. A program that could not be started at all (missing: exit 127,
    /// not executable: 126) has no `start`: its stream is the reason on `stderr`, then `end`.
    Start {
        /// Its pid inside the sandbox.
        pid: u32,
    },
    /// Output on standard output.
    Stdout {
        /// The bytes, per the request's encoding.
        data: String,
    },
    /// Output on standard error.
    Stderr {
        /// The bytes, per the request's encoding.
        data: String,
    },
    /// The command ended.
    End(ExecEnd),
    /// Following the command failed after it started (the sandbox's agent went away); how it
    /// ended is unknown.
    Error(ErrorDetail),
}

/// What a buffered command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExecResult {
    /// Standard output, cut at the server's cap, per the request's encoding (by default
    /// decoded as UTF-8, invalid bytes replaced).
    pub stdout: String,
    /// Standard error, likewise.
    pub stderr: String,
    /// The exit code; `null` when the command was killed by a signal or timed out.
    pub exit_code: Option<i32>,
    /// How it ended when not by exiting (`signal: killed`), else `null`.
    pub signal: Option<String>,
    /// Wall time from start to end, milliseconds.
    pub duration_ms: u64,
    /// The timeout passed and the command's process group was killed.
    pub timed_out: bool,
    /// Some output was dropped because a stream exceeded the server's cap.
    pub truncated: bool,
    /// The kernel's OOM killer killed a process of the sandbox while the command ran.
    pub oom_killed: bool,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyRole {
    /// Uses the templates and sandboxes of its tenant.
    #[default]
    User,
    /// Also manages keys and tenants, and may name host directories in templates.
    Admin,
}

impl KeyRole {
    /// The name shown: `user` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRole::User => "user",
            KeyRole::Admin => "admin",
        }
    }
}

impl std::fmt::Display for KeyRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/keys`: make an API key (admin keys only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A label for people: 1 to 200 characters, no control characters.
    pub name: String,
    /// What the key may do; `user` when absent.
    #[serde(default)]
    pub role: KeyRole,
    /// The tenant it acts for (`[a-z0-9]{1,64}`); the caller's when absent. A tenant that
    /// does not exist yet is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Its limits; each one absent is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<QuotaRequest>,
}

/// A key's limits as a client gives them (sizes as strings, like [`ResourceRequest`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaRequest {
    /// Sandboxes the key may have starting, running or paused at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sandboxes: Option<u32>,
    /// Sum of the memory limits of those sandboxes, as a size string (`"4G"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<String>,
    /// Sum of the pids limits (processes and threads) of those sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pids: Option<u64>,
    /// Bytes of snapshot archives the key's tenant may keep when this key makes one, as a
    /// size string (`"10G"`); the server's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_snapshot_size: Option<String>,
    /// API requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
}

/// A key's limits as the API shows them; `null` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeyQuotas {
    /// Sandboxes the key may have starting, running or paused at once.
    pub max_sandboxes: Option<u32>,
    /// Sum of the memory limits of those sandboxes, bytes.
    pub max_memory_bytes: Option<u64>,
    /// Sum of the pids limits of those sandboxes.
    #[serde(default)]
    pub max_pids: Option<u64>,
    /// Bytes of snapshot archives the key's tenant may keep when this key makes one; `null`
    /// is the server's default.
    #[serde(default)]
    pub max_snapshot_bytes: Option<u64>,
    /// API requests per minute.
    pub requests_per_minute: Option<u32>,
}

/// An API key as the API shows it; its secret is never shown again after creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiKey {
    /// Its public id, `key_` and 16 characters; safe to log.
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// Its label.
    pub name: String,
    /// What it may do.
    pub role: KeyRole,
    /// When it was created, Unix milliseconds.
    pub created_at: i64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
    /// Its limits.
    pub quotas: KeyQuotas,
}

/// The answer to `POST /v1/keys`: the key and, this once, its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CreatedKey {
    /// The key.
    #[serde(flatten)]
    pub key: ApiKey,
    /// The secret to send as `Authorization: Bearer <secret>` (`moat_` and 40 characters).
    /// The server keeps only its hash: it cannot be shown again.
    pub secret: String,
}

/// `GET /v1/keys`: a tenant's keys, revoked ones included, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeyList {
    /// The keys.
    pub keys: Vec<ApiKey>,
}

/// `POST /v1/run`: the one-shot mode. A sandbox is taken (from the template's warm pool when
/// it has one ready), the files written, the code or command run, the output files read, and
/// the sandbox destroyed, all in one call.
///
/// Exactly one of `code`, `cmd` and `shell` is given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Template name; [`DEFAULT_TEMPLATE`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Source code, run by the interpreter of `language`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The language of `code`: `python` (the default), `bash`, `sh` or `javascript` (node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Program and arguments instead of code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// A script for `/bin/sh -c` instead of code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Files written before the run (relative paths are under the working directory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<InputFile>,
    /// Text for standard input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Environment variables of the run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory; the template's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Seconds the run may take; the exec default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Limits of the sandbox (a request with limits cannot use the warm pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequest>,
    /// Files read back after the run, returned in [`RunResult::files`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_files: Vec<String>,
}

/// A file of a [`RunRequest`]: exactly one of `content` (UTF-8 text) and `content_b64`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InputFile {
    /// Where it goes in the sandbox.
    pub path: String,
    /// Its contents as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Its contents as base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_b64: Option<String>,
}

/// What a `POST /v1/run` did: the command's result and the output files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RunResult {
    /// The run's result, as a buffered exec reports it.
    #[serde(flatten)]
    pub exec: ExecResult,
    /// The requested output files, in the order asked.
    pub files: Vec<OutputFile>,
    /// The sandbox the run used (destroyed by now).
    pub sandbox_id: String,
}

/// One requested output file: its contents, or why they could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OutputFile {
    /// The path as asked.
    pub path: String,
    /// The contents as base64, when read.
    pub content_b64: Option<String>,
    /// Why it could not be read (missing, too large, a directory), when not.
    pub error: Option<String>,
}

/// What kind of entry a [`FileEntry`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (see [`FileEntry::symlink_target`]).
    Symlink,
    /// Anything else: a FIFO, socket or device.
    Other,
}

/// A file, directory or other entry in a sandbox's filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileEntry {
    /// The last component of `path` (`/` for the root).
    pub name: String,
    /// The absolute path inside the sandbox.
    pub path: String,
    /// Its kind; a symbolic link is `symlink` whatever it points to.
    #[serde(rename = "type")]
    pub kind: FileType,
    /// Size in bytes (of the link itself for a symbolic link).
    pub size: u64,
    /// Permission bits as a number (`420` is `0o644`); for a symbolic link, its target's
    /// (`0` when the target cannot be resolved).
    pub mode: u32,
    /// The owner's user name (or uid when it has none).
    pub owner: String,
    /// The group's name (or gid when it has none).
    pub group: String,
    /// Last modification, Unix milliseconds.
    pub modified_at: i64,
    /// Where a symbolic link points (resolved when it can be); `null` for anything else.
    pub symlink_target: Option<String>,
}

/// `GET /v1/sandboxes/{id}/files/list`: the entries under a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileList {
    /// Depth-first; each directory's entries in byte order of their names.
    pub entries: Vec<FileEntry>,
}

/// `POST /v1/sandboxes/{id}/files/mkdir`: make a directory and its missing parents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MakeDir {
    /// Absolute, or relative to the user's home.
    pub path: String,
}

/// `POST /v1/sandboxes/{id}/files/move`: rename an entry (creating the destination's parents).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveFile {
    /// The entry to move.
    pub from: String,
    /// Its new path.
    pub to: String,
}

/// The body of every error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// One error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorDetail {
    /// Machine-readable code (`invalid`, `not_found`, `conflict`, `quota_exceeded`, …).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn create_defaults_and_strictness() {
        let req: CreateSandbox = serde_json::from_str("{}").unwrap();
        assert_eq!(req.template, "host");
        assert_eq!(req, CreateSandbox::default());
        let req: CreateSandbox = serde_json::from_str(
            r#"{"template":"py","resources":{"memory":"256M","cpus":0.5,"pids":64},"timeout_secs":60}"#,
        )
        .unwrap();
        let res = req.resources.unwrap();
        assert_eq!(res.memory.as_deref(), Some("256M"));
        assert_eq!(res.cpus, Some(0.5));
        for bad in [
            r#"{"tempalte":"host"}"#,
            r#"{"resources":{"memroy":"1G"}}"#,
            r#"{"timeout_secs":-1}"#,
        ] {
            assert!(serde_json::from_str::<CreateSandbox>(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<ExecRequest>(r#"{"command":"ls"}"#).is_err());
    }

    #[test]
    fn create_takes_a_template_or_a_snapshot() {
        let req: CreateSandbox = serde_json::from_str(r#"{"snapshot":"abc"}"#).unwrap();
        assert_eq!(req.snapshot.as_deref(), Some("abc"));
        assert_eq!(req.template, DEFAULT_TEMPLATE);
        assert!(
            serde_json::from_str::<CreateSandbox>(r#"{"template":"host","snapshot":"abc"}"#)
                .is_err()
        );
        let out = serde_json::to_value(&req).unwrap();
        assert_eq!(out["snapshot"], "abc");
        assert!(out.get("template").is_none(), "{out}");
        let back: CreateSandbox = serde_json::from_value(out).unwrap();
        assert_eq!(back, req);
        let plain = serde_json::to_value(CreateSandbox {
            template: "py".into(),
            ..CreateSandbox::default()
        })
        .unwrap();
        assert_eq!(plain["template"], "py");
        let fork: ForkSandbox = serde_json::from_str("{}").unwrap();
        assert_eq!(fork.count, None);
        assert!(serde_json::from_str::<ForkSandbox>(r#"{"cnt":2}"#).is_err());
    }

    #[test]
    fn key_bodies() {
        let req: CreateKey = serde_json::from_str(r#"{"name":"ci"}"#).unwrap();
        assert_eq!(req.role, KeyRole::User);
        assert_eq!(req.tenant, None);
        let req: CreateKey = serde_json::from_str(
            r#"{"name":"ops","role":"admin","tenant":"acme","quotas":{"max_memory":"4G"}}"#,
        )
        .unwrap();
        assert_eq!(req.role, KeyRole::Admin);
        assert_eq!(req.quotas.unwrap().max_memory.as_deref(), Some("4G"));
        for bad in [
            r#"{"name":"x","role":"root"}"#,
            r#"{"name":"x","quota":{}}"#,
            r#"{"name":"x","quotas":{"max_memory_bytes":1}}"#,
            r#"{"role":"user"}"#,
        ] {
            assert!(serde_json::from_str::<CreateKey>(bad).is_err(), "{bad}");
        }
        let created = CreatedKey {
            key: ApiKey {
                id: "key_a".into(),
                tenant: "t".into(),
                name: "n".into(),
                role: KeyRole::User,
                created_at: 1,
                revoked_at: None,
                quotas: KeyQuotas::default(),
            },
            secret: "moat_s".into(),
        };
        let json = serde_json::to_value(&created).unwrap();
        assert_eq!(json["id"], "key_a");
        assert_eq!(json["secret"], "moat_s");
        assert_eq!(json["quotas"]["max_sandboxes"], serde_json::Value::Null);
        let back: CreatedKey = serde_json::from_value(json).unwrap();
        assert_eq!(back, created);
    }

    #[test]
    fn exec_encodings_and_events() {
        let req: ExecRequest =
            serde_json::from_str(r#"{"shell":"cat","stdin_b64":"AAE=","encoding":"base64"}"#)
                .unwrap();
        assert_eq!(req.encoding, OutputEncoding::Base64);
        assert_eq!(req.stdin_b64.as_deref(), Some("AAE="));
        let req: ExecRequest = serde_json::from_str(r#"{"shell":"ls"}"#).unwrap();
        assert_eq!(req.encoding, OutputEncoding::Utf8);
        assert!(serde_json::from_str::<ExecRequest>(r#"{"shell":"ls","encoding":"hex"}"#).is_err());
        let lines = [
            (ExecEvent::Start { pid: 7 }, r#"{"type":"start","pid":7}"#),
            (
                ExecEvent::Stdout { data: "é".into() },
                r#"{"type":"stdout","data":"é"}"#,
            ),
            (
                ExecEvent::End(ExecEnd {
                    exit_code: Some(3),
                    signal: None,
                    duration_ms: 5,
                    timed_out: false,
                    oom_killed: false,
                }),
                r#"{"type":"end","exit_code":3,"signal":null,"duration_ms":5,"timed_out":false,"oom_killed":false}"#,
            ),
            (
                ExecEvent::Error(ErrorDetail {
                    code: "unavailable".into(),
                    message: "gone".into(),
                }),
                r#"{"type":"error","code":"unavailable","message":"gone"}"#,
            ),
        ];
        for (event, line) in lines {
            assert_eq!(serde_json::to_string(&event).unwrap(), line);
            assert_eq!(serde_json::from_str::<ExecEvent>(line).unwrap(), event);
        }
    }

    #[test]
    fn rootfs_forms() {
        let spec: TemplateSpec = serde_json::from_str(r#"{"rootfs":"host"}"#).unwrap();
        assert_eq!(spec.rootfs, Rootfs::Host);
        let spec: TemplateSpec = serde_json::from_str(r#"{"rootfs":{"dir":"/srv/r"}}"#).unwrap();
        assert_eq!(spec.rootfs, Rootfs::Dir("/srv/r".into()));
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            serde_json::json!({"rootfs": {"dir": "/srv/r"}})
        );
        assert!(serde_json::from_str::<TemplateSpec>(r#"{"rootfs":"nope"}"#).is_err());
    }

    #[test]
    fn file_entry_shape() {
        let e = FileEntry {
            name: "a".into(),
            path: "/home/user/a".into(),
            kind: FileType::Dir,
            size: 4096,
            mode: 0o755,
            owner: "user".into(),
            group: "user".into(),
            modified_at: 1,
            symlink_target: None,
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "dir");
        assert_eq!(v["mode"], 493);
        assert!(v["symlink_target"].is_null());
        assert!(serde_json::from_str::<MoveFile>(r#"{"from":"a","to":"b","x":1}"#).is_err());
        assert!(serde_json::from_str::<MakeDir>(r#"{}"#).is_err());
    }
}
