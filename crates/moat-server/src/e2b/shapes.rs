//! The E2B API's JSON bodies, with E2B's field names, and how moat's sandboxes fill them.
//!
//! Requests ignore fields they do not know (newer SDKs send more); responses carry every field
//! the SDKs require. Times are RFC 3339 in UTC with milliseconds.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat};
use moat_engine::manager::UsageSample;
use moat_proto::v1;
use serde::{Deserialize, Serialize};

use super::{CLIENT_ID, ENVD_VERSION};

/// `POST /v2/sandboxes`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NewSandboxV2 {
    /// Template name; `base` when absent.
    #[serde(rename = "templateID")]
    pub(crate) template_id: Option<String>,
    /// Time to live, seconds.
    pub(crate) timeout: Option<i64>,
    pub(crate) metadata: Option<BTreeMap<String, String>>,
    /// The default environment of every process.
    pub(crate) env_vars: Option<BTreeMap<String, String>>,
    pub(crate) auto_pause: Option<bool>,
    pub(crate) auto_pause_memory: Option<bool>,
    pub(crate) auto_resume: Option<AutoResume>,
    /// snake_case on the wire, unlike its neighbours.
    #[serde(rename = "allow_internet_access")]
    pub(crate) allow_internet_access: Option<bool>,
    pub(crate) network: Option<serde_json::Value>,
    pub(crate) mcp: Option<serde_json::Value>,
    pub(crate) iam: Option<serde_json::Value>,
    pub(crate) volume_mounts: Option<serde_json::Value>,
}

/// `autoResume` of [`NewSandboxV2`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct AutoResume {
    #[serde(default)]
    pub(crate) enabled: bool,
}

/// `POST /v2/sandboxes/{id}/connect`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct ConnectSandboxV2 {
    /// Seconds from now the sandbox should live at least.
    pub(crate) timeout: Option<i64>,
    /// `false`: resume a paused sandbox from its disk only, its processes started afresh (the
    /// SDK's `on_resume="reboot"`; a no-op for a running one). Refused: moat resumes processes.
    pub(crate) memory: Option<bool>,
}

/// `POST /sandboxes/{id}/timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct SandboxTimeoutRequest {
    /// Seconds from now until the sandbox expires.
    pub(crate) timeout: i64,
}

/// A sandbox as create and connect answer it: what the SDK needs to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Sandbox {
    #[serde(rename = "templateID")]
    pub(crate) template_id: String,
    #[serde(rename = "sandboxID")]
    pub(crate) sandbox_id: String,
    #[serde(rename = "clientID")]
    pub(crate) client_id: &'static str,
    pub(crate) alias: String,
    pub(crate) envd_version: &'static str,
    pub(crate) envd_access_token: String,
    /// Always given (E2B gives it only for sandboxes whose services are private): the code
    /// interpreter SDK sends it, and only it, on its context routes.
    pub(crate) traffic_access_token: String,
    pub(crate) domain: String,
}

impl Sandbox {
    /// The answer for `sandbox`, whose access token is `token` and traffic access token
    /// `traffic`, on `domain`.
    pub(crate) fn new(
        sandbox: &v1::Sandbox,
        token: String,
        traffic: String,
        domain: &str,
    ) -> Sandbox {
        Sandbox {
            template_id: sandbox.template.clone(),
            sandbox_id: sandbox.id.clone(),
            client_id: CLIENT_ID,
            alias: sandbox.template.clone(),
            envd_version: ENVD_VERSION,
            envd_access_token: token,
            traffic_access_token: traffic,
            domain: domain.to_owned(),
        }
    }
}

/// `lifecycle` of [`SandboxDetail`]: what happens at the end of the time to live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Lifecycle {
    pub(crate) auto_resume: bool,
    pub(crate) on_timeout: &'static str,
}

/// `GET /sandboxes/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxDetail {
    #[serde(flatten)]
    pub(crate) listed: ListedSandbox,
    pub(crate) envd_access_token: String,
    pub(crate) domain: String,
    /// Whether the public internet is open to it (`internet` of its policy).
    pub(crate) allow_internet_access: bool,
    pub(crate) lifecycle: Lifecycle,
}

/// An item of `GET /v2/sandboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub(crate) template_id: String,
    #[serde(rename = "sandboxID")]
    pub(crate) sandbox_id: String,
    #[serde(rename = "clientID")]
    pub(crate) client_id: &'static str,
    pub(crate) alias: String,
    pub(crate) started_at: String,
    pub(crate) end_at: String,
    pub(crate) cpu_count: u64,
    #[serde(rename = "memoryMB")]
    pub(crate) memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub(crate) disk_size_mb: u64,
    pub(crate) state: &'static str,
    pub(crate) envd_version: &'static str,
    pub(crate) metadata: BTreeMap<String, String>,
}

/// The E2B state of a moat state: `running` or `paused`; `None` for the states E2B clients
/// never see (starting, ended).
pub(crate) fn e2b_state(state: v1::SandboxState) -> Option<&'static str> {
    match state {
        v1::SandboxState::Running => Some("running"),
        v1::SandboxState::Paused => Some("paused"),
        _ => None,
    }
}

/// Bytes in a megabyte as E2B counts them (MiB).
const MB: u64 = 1 << 20;

impl ListedSandbox {
    /// The listing of `sandbox` (one in an E2B-visible state; others show as `running`).
    pub(crate) fn new(sandbox: &v1::Sandbox) -> ListedSandbox {
        let r = &sandbox.resources;
        ListedSandbox {
            template_id: sandbox.template.clone(),
            sandbox_id: sandbox.id.clone(),
            client_id: CLIENT_ID,
            alias: sandbox.template.clone(),
            started_at: rfc3339(sandbox.created_at),
            end_at: sandbox.expires_at.map_or_else(never, rfc3339),
            cpu_count: r.cpu_millis.div_ceil(1000),
            memory_mb: r.memory_bytes / MB,
            disk_size_mb: r.disk_bytes / MB,
            state: e2b_state(sandbox.state).unwrap_or("running"),
            envd_version: ENVD_VERSION,
            metadata: sandbox.metadata.clone(),
        }
    }
}

impl SandboxDetail {
    /// The detail of `sandbox`, whose access token is `token`, on `domain`.
    pub(crate) fn new(sandbox: &v1::Sandbox, token: String, domain: &str) -> SandboxDetail {
        SandboxDetail {
            listed: ListedSandbox::new(sandbox),
            envd_access_token: token,
            domain: domain.to_owned(),
            allow_internet_access: false,
            lifecycle: Lifecycle {
                auto_resume: sandbox.lifecycle.auto_resume,
                on_timeout: match sandbox.lifecycle.on_timeout {
                    v1::OnTimeout::Kill => "kill",
                    v1::OnTimeout::Pause => "pause",
                },
            },
        }
    }
}

/// An item of `GET /sandboxes/{id}/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxMetric {
    pub(crate) timestamp: String,
    pub(crate) timestamp_unix: i64,
    pub(crate) cpu_count: u32,
    pub(crate) cpu_used_pct: f64,
    pub(crate) mem_used: u64,
    pub(crate) mem_total: u64,
    pub(crate) mem_cache: u64,
    pub(crate) disk_used: u64,
    pub(crate) disk_total: u64,
}

impl From<&UsageSample> for SandboxMetric {
    fn from(s: &UsageSample) -> Self {
        SandboxMetric {
            timestamp: rfc3339(s.at_ms),
            timestamp_unix: s.at_ms.div_euclid(1000),
            cpu_count: s.cpu_count,
            // Two decimals are all a percentage of a 5 s sample means.
            cpu_used_pct: (s.cpu_used_pct * 100.0).round() / 100.0,
            mem_used: s.memory_used_bytes,
            mem_total: s.memory_total_bytes,
            mem_cache: s.memory_cache_bytes,
            disk_used: s.disk_used_bytes,
            disk_total: s.disk_total_bytes,
        }
    }
}

/// Unix milliseconds as RFC 3339 in UTC (`2025-01-01T00:00:00.000Z`).
pub(crate) fn rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map_or_else(never, |t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// The end of a sandbox that never expires (and of times past what RFC 3339 can write).
fn never() -> String {
    "9999-12-31T23:59:59.999Z".to_owned()
}

/// An RFC 3339 time (any offset) as Unix milliseconds.
pub(crate) fn parse_rfc3339(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_735_689_600_123), "2025-01-01T00:00:00.123Z");
        assert_eq!(
            parse_rfc3339("2025-01-01T00:00:00.123Z"),
            Some(1_735_689_600_123)
        );
        // Python's isoformat with an offset and microseconds.
        assert_eq!(
            parse_rfc3339("2025-01-01T02:00:00.123456+02:00"),
            Some(1_735_689_600_123)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(rfc3339(i64::MAX), never());
    }

    #[test]
    fn requests_ignore_unknown_fields() {
        let r: NewSandboxV2 = serde_json::from_str(
            r#"{"templateID":"base","timeout":120,"metadata":{"k":"v"},"envVars":{"A":"1"},
                "allow_internet_access":false,"secure":true,"somethingNew":[1]}"#,
        )
        .unwrap();
        assert_eq!(r.template_id.as_deref(), Some("base"));
        assert_eq!(r.timeout, Some(120));
        assert_eq!(r.env_vars.unwrap()["A"], "1");
        assert_eq!(r.allow_internet_access, Some(false));
    }

    #[test]
    fn listing_fields() {
        let sandbox = v1::Sandbox {
            id: "abc".into(),
            template: "base".into(),
            state: v1::SandboxState::Running,
            metadata: BTreeMap::new(),
            resources: v1::ResourceLimits {
                memory_bytes: 512 << 20,
                cpu_millis: 1500,
                pids: 10,
                disk_bytes: 1 << 30,
            },
            created_at: 0,
            expires_at: None,
            ended_at: None,
            end_reason: None,
            access_token: None,
            public_traffic: true,
            traffic_access_token: None,
            backend: "native".into(),
            lifecycle: Default::default(),
        };
        let l = serde_json::to_value(ListedSandbox::new(&sandbox)).unwrap();
        assert_eq!(l["cpuCount"], 2);
        assert_eq!(l["memoryMB"], 512);
        assert_eq!(l["diskSizeMB"], 1024);
        assert_eq!(l["state"], "running");
        assert_eq!(l["endAt"], never());
        assert_eq!(l["sandboxID"], "abc");
        assert_eq!(l["clientID"], CLIENT_ID);
    }
}
