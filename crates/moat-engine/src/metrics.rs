//! What `moat serve` counts and times, and its rendering in the Prometheus text format
//! (version 0.0.4).
//!
//! Hand-written on atomics: recording is a few relaxed atomic adds, never a lock, so it costs
//! nothing measurable on the hot paths (create, claim, exec, every HTTP request). The only lock
//! guards the error counters, which are touched only when an error is answered.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moat_proto::v1::{PoolStatus, SandboxState};

/// Upper bounds of the latency histograms' buckets, from 0.5 ms to 60 s; slower observations
/// count only in the implicit `+Inf` bucket.
pub const LATENCY_BUCKETS: [Duration; 16] = [
    Duration::from_micros(500),
    Duration::from_millis(1),
    Duration::from_micros(2500),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_micros(2_500_000),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
];

/// HTTP statuses are counted in a fixed table: 100 to 599.
const FIRST_STATUS: u16 = 100;
const STATUS_SLOTS: usize = 500;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A latency histogram with the [`LATENCY_BUCKETS`] bounds.
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket, not cumulative; the last slot is beyond the last bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of every observation, nanoseconds (wraps after 584 years of summed latency).
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Counts one observation.
    pub fn observe(&self, d: Duration) {
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|bound| d <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// How many observations it has counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        // `_count` is the running total of the buckets read once, so it always equals the
        // `+Inf` bucket, as the format requires, even while observations arrive.
        let mut cumulative = 0u64;
        for (slot, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = LATENCY_BUCKETS
                .get(slot)
                .map_or_else(|| "+Inf".to_owned(), |b| seconds(*b));
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum {}", seconds(sum));
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// The registry of one server: latency histograms and counters. Shared behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    create: Histogram,
    claim: Histogram,
    exec: Histogram,
    /// Answers by HTTP status, index `status - 100`.
    http: Box<[AtomicU64]>,
    /// JSON errors answered, by `error.code`. The codes are `&'static str`, a set fixed at
    /// compile time, so the label cannot grow without bound.
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Network egress over every sandbox.
    egress: std::sync::Arc<crate::network::Counters>,
    /// Output bytes buffered execs dropped (past a stream's cap or the tenant's budget).
    exec_output_dropped: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            create: Histogram::default(),
            claim: Histogram::default(),
            exec: Histogram::default(),
            http: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            errors: Mutex::new(BTreeMap::new()),
            egress: Default::default(),
            exec_output_dropped: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Counts a successful sandbox create that took `d`.
    pub fn observe_create(&self, d: Duration) {
        self.create.observe(d);
    }

    /// Counts a sandbox claimed from a warm pool in `d`.
    pub fn observe_claim(&self, d: Duration) {
        self.claim.observe(d);
    }

    /// Counts a buffered exec that ran its command in `d`.
    pub fn observe_exec(&self, d: Duration) {
        self.exec.observe(d);
    }

    /// Counts output bytes a buffered exec dropped.
    pub fn count_exec_output_dropped(&self, bytes: usize) {
        if bytes > 0 {
            self.exec_output_dropped
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    /// Counts one HTTP answer with this status (outside 100–599: ignored).
    pub fn count_http(&self, status: u16) {
        if let Some(slot) = status
            .checked_sub(FIRST_STATUS)
            .and_then(|i| self.http.get(usize::from(i)))
        {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one JSON error answered with this `error.code`.
    pub fn count_error(&self, code: &'static str) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *errors.entry(code).or_default() += 1;
    }

    /// The network egress totals every sandbox's counters add to.
    pub fn egress(&self) -> std::sync::Arc<crate::network::Counters> {
        self.egress.clone()
    }

    /// The create latency histogram.
    pub fn create(&self) -> &Histogram {
        &self.create
    }

    /// The warm-pool claim latency histogram.
    pub fn claim(&self) -> &Histogram {
        &self.claim
    }

    /// The exec latency histogram.
    pub fn exec(&self) -> &Histogram {
        &self.exec
    }

    /// Every series in the Prometheus text format 0.0.4, with the sandbox counts by state
    /// (every state is shown, zeros included), the warm pools as (owner tenant, template
    /// name, status) and the output bytes buffered execs hold now, given by the caller.
    pub fn render(
        &self,
        states: &BTreeMap<SandboxState, u64>,
        pools: &[(Option<String>, String, PoolStatus)],
        exec_output_held: usize,
    ) -> String {
        let mut out = String::with_capacity(4096);

        header(
            &mut out,
            "moat_sandboxes",
            "Sandboxes on record, by state.",
            "gauge",
        );
        for state in SandboxState::ALL {
            let n = states.get(&state).copied().unwrap_or(0);
            let _ = writeln!(out, "moat_sandboxes{{state=\"{state}\"}} {n}");
        }

        // Built-in templates have no owner: their tenant label is empty.
        let pool_label = |owner: &Option<String>, name: &str| {
            format!(
                "tenant=\"{}\",template=\"{}\"",
                escape(owner.as_deref().unwrap_or("")),
                escape(name)
            )
        };
        header(
            &mut out,
            "moat_pool_ready",
            "Warm sandboxes ready to claim, by template.",
            "gauge",
        );
        for (owner, name, status) in pools {
            let labels = pool_label(owner, name);
            let _ = writeln!(out, "moat_pool_ready{{{labels}}} {}", status.ready);
        }
        header(
            &mut out,
            "moat_pool_target",
            "Warm sandboxes each pool aims to keep, by template.",
            "gauge",
        );
        for (owner, name, status) in pools {
            let labels = pool_label(owner, name);
            let _ = writeln!(out, "moat_pool_target{{{labels}}} {}", status.target);
        }

        self.create.render(
            &mut out,
            "moat_create_seconds",
            "Time to create a sandbox until its agent answers (successful creates), seconds.",
        );
        self.claim.render(
            &mut out,
            "moat_claim_seconds",
            "Time to hand out a sandbox from a warm pool, seconds.",
        );
        self.exec.render(
            &mut out,
            "moat_exec_seconds",
            "Time of a buffered exec, from the request to the command's end, seconds.",
        );
        header(
            &mut out,
            "moat_exec_output_held_bytes",
            "Output bytes buffered execs hold now, waiting for their commands' end.",
            "gauge",
        );
        let _ = writeln!(out, "moat_exec_output_held_bytes {exec_output_held}");
        header(
            &mut out,
            "moat_exec_output_dropped_bytes_total",
            "Output bytes buffered execs dropped, past a stream's cap or the tenant's budget.",
            "counter",
        );
        let _ = writeln!(
            out,
            "moat_exec_output_dropped_bytes_total {}",
            self.exec_output_dropped.load(Ordering::Relaxed)
        );

        header(
            &mut out,
            "moat_http_requests_total",
            "HTTP requests answered, by status.",
            "counter",
        );
        for (i, slot) in self.http.iter().enumerate() {
            let n = slot.load(Ordering::Relaxed);
            if n > 0 {
                let status = usize::from(FIRST_STATUS) + i;
                let _ = writeln!(out, "moat_http_requests_total{{status=\"{status}\"}} {n}");
            }
        }

        for (name, help, value) in [
            (
                "moat_egress_connections_total",
                "Sandbox connections allowed and opened by the egress proxy.",
                &self.egress.connections,
            ),
            (
                "moat_egress_denied_total",
                "Sandbox connections the network policy refused.",
                &self.egress.denied,
            ),
            (
                "moat_egress_sent_bytes_total",
                "Bytes sandboxes sent through their connections (counted as each ends).",
                &self.egress.bytes_out,
            ),
            (
                "moat_egress_received_bytes_total",
                "Bytes sandboxes received through their connections (counted as each ends).",
                &self.egress.bytes_in,
            ),
            (
                "moat_dns_answered_total",
                "Sandbox DNS queries answered from a resolver.",
                &self.egress.dns_answered,
            ),
            (
                "moat_dns_refused_total",
                "Sandbox DNS queries refused by the network policy.",
                &self.egress.dns_refused,
            ),
        ] {
            header(&mut out, name, help, "counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }

        header(
            &mut out,
            "moat_errors_total",
            "JSON errors answered, by error code.",
            "counter",
        );
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (code, n) in errors {
            let _ = writeln!(out, "moat_errors_total{{code=\"{}\"}} {n}", escape(code));
        }

        header(
            &mut out,
            "moat_build_info",
            "The running moat's version; always 1.",
            "gauge",
        );
        let _ = writeln!(
            out,
            "moat_build_info{{version=\"{}\"}} 1",
            escape(env!("CARGO_PKG_VERSION"))
        );
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Seconds as the shortest decimal that reads back as the same number (`0.0005`, `1`, `60`).
fn seconds(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

/// A label value escaped as the text format asks: backslash, double quote and newline.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches_inf() {
        let m = Metrics::new();
        m.observe_exec(Duration::from_micros(100));
        m.observe_exec(Duration::from_millis(1));
        m.observe_exec(Duration::from_millis(3));
        m.observe_exec(Duration::from_secs(120));
        let text = m.render(&BTreeMap::new(), &[], 0);
        for line in [
            "moat_exec_seconds_bucket{le=\"0.0005\"} 1",
            "moat_exec_seconds_bucket{le=\"0.001\"} 2",
            "moat_exec_seconds_bucket{le=\"0.0025\"} 2",
            "moat_exec_seconds_bucket{le=\"0.005\"} 3",
            "moat_exec_seconds_bucket{le=\"60\"} 3",
            "moat_exec_seconds_bucket{le=\"+Inf\"} 4",
            "moat_exec_seconds_count 4",
            "moat_exec_seconds_sum 120.0041",
            "moat_create_seconds_count 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert_eq!(m.exec().count(), 4);
    }

    #[test]
    fn states_pools_counters_and_escaping() {
        let m = Metrics::new();
        m.count_http(200);
        m.count_http(200);
        m.count_http(404);
        m.count_http(42);
        m.count_http(600);
        m.count_error("not_found");
        let states = BTreeMap::from([(SandboxState::Running, 3)]);
        let pools = vec![
            (
                None,
                "host".to_owned(),
                PoolStatus {
                    target: 4,
                    ready: 2,
                    evicted: 0,
                },
            ),
            (
                Some("acme".to_owned()),
                "q\"\\\n".to_owned(),
                PoolStatus {
                    target: 1,
                    ready: 0,
                    evicted: 0,
                },
            ),
        ];
        let text = m.render(&states, &pools, 0);
        for line in [
            "moat_sandboxes{state=\"running\"} 3",
            "moat_sandboxes{state=\"failed\"} 0",
            "moat_pool_ready{tenant=\"\",template=\"host\"} 2",
            "moat_pool_target{tenant=\"acme\",template=\"q\\\"\\\\\\n\"} 1",
            "moat_http_requests_total{status=\"200\"} 2",
            "moat_http_requests_total{status=\"404\"} 1",
            "moat_errors_total{code=\"not_found\"} 1",
            "# TYPE moat_claim_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert_eq!(text.matches("moat_http_requests_total{").count(), 2);
        assert!(text.ends_with('\n'));
    }
}
