//! A sandbox's plan: a create resolved once, with its template read once, into everything the
//! manager records and its backend makes: the backend kind, the root filesystem, the limits as
//! one checked [`Resources`], the environment, user and working directory, the time to live,
//! the start and readiness scripts, the network policy and whether its services are public.
//!
//! Everything a client can get wrong is checked while the plan is made, before anything is
//! recorded; afterwards nothing is parsed again. The backend gets the plan as it is, with the
//! sandbox's id, and makes what it needs of it (cgroup limits, root filesystem, agent config).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use moat_proto::agent_config::AgentConfig;
use moat_proto::v1;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::resources::{Resources, bounds, parse_size};

pub use crate::network::NetworkPolicy;

/// What runs when a sandbox boots, before it counts as started.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Readiness {
    /// A `/bin/sh -c` script started in the background and left running.
    pub start: Option<String>,
    /// A `/bin/sh -c` script retried until it exits 0.
    pub ready: Option<String>,
    /// How long `ready` may take to pass.
    pub ready_timeout: Duration,
}

impl Readiness {
    /// The start and readiness scripts of `template`.
    pub fn of(template: &v1::TemplateSpec) -> Readiness {
        Readiness {
            start: template.start.clone(),
            ready: template.ready.clone(),
            ready_timeout: Duration::from_secs(
                template
                    .ready_timeout_secs
                    .unwrap_or(v1::DEFAULT_READY_TIMEOUT_SECS),
            ),
        }
    }
}

/// One sandbox to make, resolved and checked. The store keeps it with the sandbox's record
/// ([`SandboxPlan::to_json`]), as the engine's own JSON: not a wire format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxPlan {
    /// The template's name.
    pub template: String,
    /// The template's owner (`None` for a built-in): with the name, which warm pool serves it.
    pub template_owner: Option<String>,
    /// The kind of backend that makes it (a key of the manager's registry).
    pub backend: String,
    /// Its root filesystem (the template's, as the API names it).
    pub rootfs: v1::Rootfs,
    /// Its limits: the template's defaults, then the request, within the template's maximum
    /// and the engine's bounds (checked by whoever sets them over the defaults).
    pub resources: Resources,
    /// The template's environment.
    pub template_env: BTreeMap<String, String>,
    /// The create's own environment, over the template's (what a snapshot of it keeps).
    pub env: BTreeMap<String, String>,
    /// Who commands run as by default (`user` or `root`).
    pub user: String,
    /// The working directory of commands by default (the user's home when `None`).
    pub workdir: Option<String>,
    /// The time to live asked for (by the request, else the template); the server's default
    /// when `None`.
    pub timeout_secs: Option<u64>,
    /// What runs at boot before it counts as started.
    pub readiness: Readiness,
    /// How it reaches the network.
    pub network: NetworkPolicy,
    /// Whether its own services are public; the server's default when `None`.
    pub public_traffic: Option<bool>,
    /// What its time running out does, and whether calls resume it when paused.
    #[serde(default)]
    pub lifecycle: v1::Lifecycle,
    /// The client's labels.
    pub metadata: BTreeMap<String, String>,
    /// A snapshot archive to restore before it counts as running.
    pub layer: Option<PathBuf>,
    /// A memory checkpoint (a snapshot with memory's directory) the backend restores the
    /// sandbox from, instead of starting it afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<PathBuf>,
    /// Whether a warm-pool member of the template is exactly what the plan asks for.
    pub poolable: bool,
    /// The sandbox's id when the caller chose it (`moat run --id`); a fresh one when `None`.
    pub id: Option<String>,
    /// The idempotency key of the create, recorded with the sandbox; not part of the kept
    /// plan.
    #[serde(skip)]
    pub idempotency_key: Option<String>,
}

impl SandboxPlan {
    /// The plan of a sandbox of `template` (named `name`, owned by `owner`, its limits
    /// `limits`) made by the backend of kind `backend`, with the template's defaults and
    /// nothing of a request yet. The defaults' bounds are not checked: a request may set them
    /// over.
    pub fn of_template(
        name: &str,
        owner: Option<String>,
        template: &v1::TemplateSpec,
        limits: &TemplateLimits,
        backend: &str,
    ) -> SandboxPlan {
        SandboxPlan {
            template: name.to_owned(),
            template_owner: owner,
            backend: backend.to_owned(),
            rootfs: template.rootfs.clone(),
            resources: limits.defaults,
            template_env: template.env.clone(),
            env: BTreeMap::new(),
            user: template.user.clone().unwrap_or_else(|| "user".into()),
            workdir: template.workdir.clone(),
            timeout_secs: template.timeout_secs,
            readiness: Readiness::of(template),
            network: NetworkPolicy::None,
            public_traffic: None,
            lifecycle: v1::Lifecycle::default(),
            metadata: BTreeMap::new(),
            layer: None,
            memory: None,
            poolable: true,
            id: None,
            idempotency_key: None,
        }
    }

    /// The plan as the store keeps it with the sandbox's record.
    pub fn to_json(&self) -> std::result::Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(self)
    }

    /// A plan the store kept ([`SandboxPlan::to_json`]).
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<SandboxPlan, serde_json::Error> {
        SandboxPlan::deserialize(v)
    }

    /// What the agent is told at start: the template's environment with the create's over it.
    pub fn agent_config(&self) -> AgentConfig {
        let mut env_vars = self.template_env.clone();
        env_vars.extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        AgentConfig {
            default_user: self.user.clone(),
            default_workdir: self.workdir.clone(),
            env_vars,
            ..AgentConfig::default()
        }
    }

    /// The plan of a sandbox of the built-in `host` template made by the backend of kind
    /// `backend`: the host's system directories, the engine's default limits, user `user`.
    /// What tests and benchmarks hand a backend directly.
    pub fn host(backend: &str) -> SandboxPlan {
        SandboxPlan {
            template: v1::DEFAULT_TEMPLATE.to_owned(),
            template_owner: None,
            backend: backend.to_owned(),
            rootfs: v1::Rootfs::Host,
            resources: Resources::default(),
            template_env: BTreeMap::new(),
            env: BTreeMap::new(),
            user: "user".into(),
            workdir: None,
            timeout_secs: None,
            readiness: Readiness {
                ready_timeout: Duration::from_secs(v1::DEFAULT_READY_TIMEOUT_SECS),
                ..Readiness::default()
            },
            network: NetworkPolicy::None,
            public_traffic: None,
            lifecycle: v1::Lifecycle::default(),
            metadata: BTreeMap::new(),
            layer: None,
            memory: None,
            poolable: false,
            id: None,
            idempotency_key: None,
        }
    }
}

/// Applies a resource request over `base`.
pub fn apply(base: Resources, req: &v1::ResourceRequest) -> Result<Resources> {
    let mut r = base;
    if let Some(m) = &req.memory {
        r.memory_bytes = parse_size(m)?;
    }
    if let Some(d) = &req.disk {
        r.disk_bytes = parse_size(d)?;
    }
    if let Some(c) = req.cpus {
        if !c.is_finite() || c <= 0.0 || c > bounds::MAX_CPU_MILLIS as f64 / 1000.0 {
            return Err(EngineError::Invalid(format!(
                "cpus {c} must be positive and at most {}",
                bounds::MAX_CPU_MILLIS / 1000
            )));
        }
        r.cpu_millis = (c * 1000.0).round() as u64;
    }
    if let Some(p) = req.pids {
        r.pids = p;
    }
    Ok(r)
}

/// A template's limits in their typed form: parsed from its spec's strings once, when the
/// template is written (or, for one stored before, when the server starts), and read as they
/// are by every create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateLimits {
    /// What a sandbox gets where its request asks nothing: the engine's defaults with the
    /// template's `resources` over them, not checked against any bound (a request may set
    /// them over).
    pub defaults: Resources,
    /// The most a request may ask for: the engine's bounds with the template's
    /// `max_resources` over them; `None` where the template sets no maximum.
    pub max: Option<Resources>,
}

impl TemplateLimits {
    /// Parses `template`'s `resources` and `max_resources`.
    pub fn of(template: &v1::TemplateSpec) -> Result<TemplateLimits> {
        let defaults = match &template.resources {
            Some(r) => apply(Resources::default(), r)?,
            None => Resources::default(),
        };
        let max = match &template.max_resources {
            Some(m) => {
                let top = Resources {
                    memory_bytes: bounds::MAX_MEMORY,
                    cpu_millis: bounds::MAX_CPU_MILLIS,
                    pids: bounds::MAX_PIDS,
                    disk_bytes: bounds::MAX_DISK,
                };
                Some(apply(top, m)?)
            }
            None => None,
        };
        Ok(TemplateLimits { defaults, max })
    }

    /// A sandbox's limits: the defaults, then `req`, checked against the maximum and the
    /// engine's bounds.
    pub fn resolve(&self, req: Option<&v1::ResourceRequest>) -> Result<Resources> {
        let resolved = match req {
            Some(r) => apply(self.defaults, r)?,
            None => self.defaults,
        };
        self.check(resolved)?;
        Ok(resolved)
    }

    /// Checks `r` against the engine's bounds and the template's maximum: the one check of a
    /// sandbox's limits.
    pub fn check(&self, r: Resources) -> Result<()> {
        r.validate()?;
        if let Some(max) = &self.max {
            for (what, v, m) in [
                ("memory", r.memory_bytes, max.memory_bytes),
                ("cpus (millis)", r.cpu_millis, max.cpu_millis),
                ("pids", r.pids, max.pids),
                ("disk", r.disk_bytes, max.disk_bytes),
            ] {
                if v > m {
                    return Err(EngineError::Invalid(format!(
                        "{what} {v} is over the template's limit of {m}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The limits as the API and the store show them.
pub fn limits_v1(r: &Resources) -> v1::ResourceLimits {
    v1::ResourceLimits {
        memory_bytes: r.memory_bytes,
        cpu_millis: r.cpu_millis,
        pids: r.pids,
        disk_bytes: r.disk_bytes,
    }
}

/// Limits as the API and the store show them, as the engine's type.
pub fn resources_of(l: &v1::ResourceLimits) -> Resources {
    Resources {
        memory_bytes: l.memory_bytes,
        cpu_millis: l.cpu_millis,
        pids: l.pids,
        disk_bytes: l.disk_bytes,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn template() -> v1::TemplateSpec {
        v1::TemplateSpec {
            env: [("A".to_string(), "template".to_string())].into(),
            user: Some("root".into()),
            workdir: Some("/srv".into()),
            start: Some("serve".into()),
            ready: Some("probe".into()),
            timeout_secs: Some(60),
            resources: Some(v1::ResourceRequest {
                memory: Some("256M".into()),
                ..Default::default()
            }),
            max_resources: Some(v1::ResourceRequest {
                memory: Some("1G".into()),
                ..Default::default()
            }),
            ..v1::TemplateSpec::new(v1::Rootfs::Dir("/images/py".into()))
        }
    }

    fn of_template(name: &str, owner: Option<String>, t: &v1::TemplateSpec) -> SandboxPlan {
        let limits = TemplateLimits::of(t).unwrap();
        SandboxPlan::of_template(name, owner, t, &limits, "native")
    }

    #[test]
    fn a_template_resolves_once_into_a_plan() {
        let plan = of_template("py", Some("acme".into()), &template());
        assert_eq!(plan.backend, "native");
        assert_eq!(plan.rootfs, v1::Rootfs::Dir("/images/py".into()));
        assert_eq!(plan.resources.memory_bytes, 256 << 20);
        assert_eq!(plan.resources.pids, Resources::default().pids);
        assert_eq!(plan.timeout_secs, Some(60));
        assert_eq!(plan.network, NetworkPolicy::None);
        assert_eq!(
            plan.readiness,
            Readiness {
                start: Some("serve".into()),
                ready: Some("probe".into()),
                ready_timeout: Duration::from_secs(v1::DEFAULT_READY_TIMEOUT_SECS),
            }
        );
        let host = of_template("host", None, &v1::TemplateSpec::new(v1::Rootfs::Host));
        assert_eq!(host.user, "user");
        assert_eq!(host.rootfs, v1::Rootfs::Host);
        assert_eq!(host.resources, Resources::default());
    }

    #[test]
    fn the_agent_gets_the_request_env_over_the_template_env() {
        let mut plan = of_template("py", None, &template());
        plan.env = [
            ("A".to_string(), "request".to_string()),
            ("B".to_string(), "request".to_string()),
        ]
        .into();
        let agent = plan.agent_config();
        assert_eq!(agent.default_user, "root");
        assert_eq!(agent.default_workdir.as_deref(), Some("/srv"));
        assert_eq!(agent.env_vars["A"], "request");
        assert_eq!(agent.env_vars["B"], "request");
    }

    #[test]
    fn a_plan_reads_back_as_the_store_keeps_it() {
        let mut plan = of_template("py", None, &template());
        plan.env = [("B".to_string(), "request".to_string())].into();
        plan.layer = Some("/data/snapshots/x.tar".into());
        let json = plan.to_json().unwrap();
        assert_eq!(json["resources"]["memory_bytes"], 256u64 << 20);
        assert_eq!(SandboxPlan::from_json(&json).unwrap(), plan);
    }

    #[test]
    fn limits_stay_within_the_template_and_the_bounds() {
        let t = TemplateLimits::of(&template()).unwrap();
        assert_eq!(
            TemplateLimits::of(&template())
                .unwrap()
                .defaults
                .memory_bytes,
            256 << 20
        );
        let over = Resources {
            memory_bytes: 2 << 30,
            ..Resources::default()
        };
        let err = t.check(over).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "invalid request: memory {} is over the template's limit of {}",
                2u64 << 30,
                1u64 << 30
            )
        );
        let tiny = Resources {
            pids: 1,
            ..Resources::default()
        };
        assert!(matches!(t.check(tiny), Err(EngineError::Invalid(_))));
        let json = serde_json::to_value(t).unwrap();
        assert_eq!(serde_json::from_value::<TemplateLimits>(json).unwrap(), t);
        let l = limits_v1(&Resources::default());
        assert_eq!(resources_of(&l), Resources::default());
    }
}
