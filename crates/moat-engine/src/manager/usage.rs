//! What running sandboxes use over time: every [`USAGE_INTERVAL`] each one's memory, page
//! cache, CPU time and writable layer are read from its backend, and the last
//! [`MAX_USAGE_SAMPLES`] are kept in memory (they go with the sandbox, and with a restart).
//!
//! CPU use is a rate, so a sample's CPU percentage is computed from the CPU time used since the
//! sample before it (or since the sandbox became live), relative to the sandbox's CPU limit.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use moat_proto::v1;
use tokio::sync::watch;

use super::{Live, ManagerResult, SandboxManager, lock};
use crate::auth::Caller;
use crate::backend::{Instance, InstanceStats};
use crate::store::now_ms;

/// How often the server samples every running sandbox.
pub const USAGE_INTERVAL: Duration = Duration::from_secs(5);

/// Samples kept per sandbox: an hour at [`USAGE_INTERVAL`].
pub const MAX_USAGE_SAMPLES: usize = 720;

/// A sandbox's resource use at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UsageSample {
    /// When it was taken, Unix milliseconds.
    pub at_ms: i64,
    /// Its CPU limit rounded up to whole CPUs.
    pub cpu_count: u32,
    /// CPU time used since the sample before, as a percentage of what its CPU limit allows in
    /// that time (0 to 100).
    pub cpu_used_pct: f64,
    /// Memory in use (its processes and its page cache), bytes.
    pub memory_used_bytes: u64,
    /// Its memory limit, bytes.
    pub memory_total_bytes: u64,
    /// Of the memory in use, the page cache (its writable layer's files included), bytes.
    pub memory_cache_bytes: u64,
    /// Bytes in use on its writable layer.
    pub disk_used_bytes: u64,
    /// Size of its writable layer, bytes.
    pub disk_total_bytes: u64,
}

/// The backend's counters at one moment.
#[derive(Debug, Clone, Copy)]
struct Raw {
    at_ms: i64,
    stats: InstanceStats,
}

impl Raw {
    fn now(instance: &dyn Instance) -> Raw {
        Raw {
            at_ms: now_ms(),
            stats: instance.stats(),
        }
    }
}

/// The samples of one sandbox, oldest first.
#[derive(Debug)]
pub(super) struct History {
    /// What came just before the oldest sample kept: the base of its CPU rate.
    base: Raw,
    samples: VecDeque<Raw>,
}

impl History {
    /// An empty history of a sandbox becoming live now.
    pub(super) fn new(instance: &dyn Instance) -> History {
        History {
            base: Raw::now(instance),
            samples: VecDeque::new(),
        }
    }

    fn push(&mut self, raw: Raw) {
        if self.samples.len() >= MAX_USAGE_SAMPLES
            && let Some(oldest) = self.samples.pop_front()
        {
            self.base = oldest;
        }
        self.samples.push_back(raw);
    }
}

/// `next` as a sample of a sandbox with `limits`, its CPU rate measured since `prev`.
fn sample(prev: &Raw, next: &Raw, limits: &v1::ResourceLimits) -> UsageSample {
    let wall_usec = next.at_ms.saturating_sub(prev.at_ms).saturating_mul(1000);
    let used_usec = next
        .stats
        .cpu_usage_usec
        .saturating_sub(prev.stats.cpu_usage_usec);
    // What the limit allows in that time: wall time times the CPUs (millis / 1000).
    let allowed_usec = wall_usec as f64 * limits.cpu_millis as f64 / 1000.0;
    let cpu_used_pct = if allowed_usec > 0.0 {
        // The kernel enforces the quota per period, so a sample may overshoot it slightly.
        (used_usec as f64 / allowed_usec * 100.0).clamp(0.0, 100.0)
    } else {
        0.0
    };
    UsageSample {
        at_ms: next.at_ms,
        cpu_count: u32::try_from(limits.cpu_millis.div_ceil(1000)).unwrap_or(u32::MAX),
        cpu_used_pct,
        memory_used_bytes: next.stats.memory_bytes,
        memory_total_bytes: limits.memory_bytes,
        memory_cache_bytes: next.stats.memory_cache_bytes,
        disk_used_bytes: next.stats.disk_used_bytes,
        disk_total_bytes: next.stats.disk_total_bytes,
    }
}

impl SandboxManager {
    /// Takes one sample of every running sandbox whose instance is free now: one held by a
    /// long operation (a checkpoint, a pause, a teardown) is sampled next time, so that it
    /// holds up no other sandbox's sample.
    pub async fn sample_usage(&self) {
        let all: Vec<Arc<Live>> = lock(&self.inner.live).values().cloned().collect();
        for live in all {
            let Ok(instance) = live.instance.try_lock() else {
                continue;
            };
            let raw = Raw::now(&**instance);
            drop(instance);
            lock(&live.usage).push(raw);
        }
    }

    /// Samples every running sandbox each [`USAGE_INTERVAL`] until `stop` turns true.
    pub async fn run_usage_sampler(&self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(USAGE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.sample_usage().await;
        }
    }

    /// The usage samples of the caller's running sandbox `id` taken from `from_ms` to `to_ms`
    /// (Unix milliseconds, both included, each optional), oldest first, ending with one taken
    /// now unless `to_ms` is in the past. 404 for no such sandbox, 409 when it is not running.
    pub async fn usage(
        &self,
        caller: &Caller,
        id: &str,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
    ) -> ManagerResult<Vec<UsageSample>> {
        let live = self.inner.live_for(&caller.tenant, id).await?;
        let (t, i) = (caller.tenant.clone(), id.to_owned());
        let rec = self.inner.db(move |s| s.get_sandbox(&t, &i)).await?;
        // Written by this manager; an unreadable value shows as zeros rather than failing.
        let limits: v1::ResourceLimits = serde_json::from_value(rec.resources).unwrap_or_default();
        let current = Raw::now(&**live.instance.lock().await);
        let history = lock(&live.usage);
        let latest = to_ms
            .is_none_or(|to| to >= current.at_ms)
            .then_some(&current);
        let in_range =
            |at: i64| from_ms.is_none_or(|from| at >= from) && to_ms.is_none_or(|to| at <= to);
        let mut out = Vec::new();
        let mut prev = &history.base;
        for raw in history.samples.iter().chain(latest) {
            if in_range(raw.at_ms) {
                out.push(sample(prev, raw, &limits));
            }
            prev = raw;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(at_ms: i64, cpu_usage_usec: u64) -> Raw {
        Raw {
            at_ms,
            stats: InstanceStats {
                cpu_usage_usec,
                memory_bytes: 10,
                ..InstanceStats::default()
            },
        }
    }

    #[test]
    fn cpu_percent_is_of_the_limit_between_samples() {
        let limits = v1::ResourceLimits {
            memory_bytes: 100,
            cpu_millis: 500,
            pids: 1,
            disk_bytes: 1,
        };
        // Half a CPU for a second is 500 ms of CPU time; 250 ms used is half of it.
        let s = sample(&raw(1000, 0), &raw(2000, 250_000), &limits);
        assert!((s.cpu_used_pct - 50.0).abs() < 1e-9, "{}", s.cpu_used_pct);
        assert_eq!((s.cpu_count, s.memory_total_bytes), (1, 100));
        // Never above 100, never negative, nothing for no time.
        assert_eq!(
            sample(&raw(0, 0), &raw(1000, 10_000_000), &limits).cpu_used_pct,
            100.0
        );
        assert_eq!(sample(&raw(0, 5), &raw(1000, 1), &limits).cpu_used_pct, 0.0);
        assert_eq!(sample(&raw(7, 0), &raw(7, 9), &limits).cpu_used_pct, 0.0);
    }

    #[test]
    fn history_is_bounded_and_keeps_its_base() {
        let mut h = History {
            base: raw(0, 0),
            samples: VecDeque::new(),
        };
        for i in 1..=(MAX_USAGE_SAMPLES as i64 + 2) {
            h.push(raw(i, 0));
        }
        assert_eq!(h.samples.len(), MAX_USAGE_SAMPLES);
        assert_eq!(h.base.at_ms, 2);
        assert_eq!(h.samples.front().map(|r| r.at_ms), Some(3));
    }
}
