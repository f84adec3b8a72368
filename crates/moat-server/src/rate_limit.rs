//! Per-key rate limit: a token bucket per API key, in memory.
//!
//! A key's bucket holds [`BURST_SECONDS`] of its rate (at least one request) and refills
//! continuously at `requests_per_minute / 60` per second. The rate is the key's
//! `quotas.requests_per_minute` or the server's default, read on every request, so a changed
//! quota applies at once. A full bucket behaves exactly as a missing one, so buckets that have
//! refilled (idle keys, revoked keys, which never authenticate again) are dropped now and then:
//! the map holds only keys active within the last few seconds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Requests per minute per key when neither the key nor `moat serve --rate-limit` says
/// otherwise: high, because evaluation pipelines and benchmarks drive one key hard.
pub const DEFAULT_REQUESTS_PER_MINUTE: u32 = 60_000;

/// A bucket holds this many seconds of its key's rate, so short bursts pass untouched.
pub const BURST_SECONDS: u32 = 5;

/// How often full buckets are swept out of the map.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The `Retry-After` of a key whose rate is 0 (it is never refilled): a minute, after which
/// its quota may have changed.
const BLOCKED_RETRY_AFTER_SECS: u64 = 60;

/// A request refused: when to try again, and the rate that refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limited {
    /// Whole seconds until the bucket holds a request again (at least 1).
    pub(crate) retry_after_secs: u64,
    /// The key's rate, requests per minute.
    pub(crate) requests_per_minute: u32,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    requests_per_minute: u32,
}

#[derive(Debug)]
struct Buckets {
    by_key: HashMap<String, Bucket>,
    last_sweep: Instant,
}

/// The buckets of every key seen lately.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    default_rpm: u32,
    buckets: Mutex<Buckets>,
}

/// How many requests a bucket of this rate holds.
fn capacity(rpm: u32) -> f64 {
    if rpm == 0 {
        return 0.0;
    }
    (f64::from(rpm) * f64::from(BURST_SECONDS) / 60.0).max(1.0)
}

/// The bucket's tokens at `now`, refilled since it was last touched.
fn refilled(b: &Bucket, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
    let rate = f64::from(b.requests_per_minute) / 60.0;
    (b.tokens + elapsed * rate).min(capacity(b.requests_per_minute))
}

impl RateLimiter {
    /// A limiter whose keys without a quota of their own get `default_rpm` requests a minute.
    pub(crate) fn new(default_rpm: u32) -> RateLimiter {
        RateLimiter {
            default_rpm,
            buckets: Mutex::new(Buckets {
                by_key: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        }
    }

    /// Takes one request from `key_id`'s bucket at `now`, its rate being `quota` (or the
    /// default); or says when to come back.
    pub(crate) fn check(
        &self,
        key_id: &str,
        quota: Option<u32>,
        now: Instant,
    ) -> Result<(), Limited> {
        let rpm = quota.unwrap_or(self.default_rpm);
        let mut guard = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let buckets = &mut *guard;
        if now.saturating_duration_since(buckets.last_sweep) >= SWEEP_INTERVAL {
            buckets
                .by_key
                .retain(|_, b| refilled(b, now) < capacity(b.requests_per_minute));
            buckets.last_sweep = now;
        }
        let bucket = buckets
            .by_key
            .entry(key_id.to_owned())
            .or_insert_with(|| Bucket {
                tokens: capacity(rpm),
                updated: now,
                requests_per_minute: rpm,
            });
        bucket.tokens = refilled(bucket, now);
        bucket.updated = now;
        if bucket.requests_per_minute != rpm {
            // The quota changed: the new rate from now on, never more than its burst.
            bucket.requests_per_minute = rpm;
            bucket.tokens = bucket.tokens.min(capacity(rpm));
        }
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let retry_after_secs = if rpm == 0 {
            BLOCKED_RETRY_AFTER_SECS
        } else {
            let wait = (1.0 - bucket.tokens) * 60.0 / f64::from(rpm);
            (wait.ceil() as u64).max(1)
        };
        Err(Limited {
            retry_after_secs,
            requests_per_minute: rpm,
        })
    }

    /// How many keys have a bucket now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_key
            .len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let limiter = RateLimiter::new(DEFAULT_REQUESTS_PER_MINUTE);
        let t0 = Instant::now();
        // 120/min: 2 per second, a burst of 10.
        for _ in 0..10 {
            limiter.check("k", Some(120), t0).unwrap();
        }
        let refused = limiter.check("k", Some(120), t0).unwrap_err();
        assert_eq!(refused.retry_after_secs, 1);
        assert_eq!(refused.requests_per_minute, 120);
        // Another key is not affected.
        limiter.check("other", Some(120), t0).unwrap();
        // Half a second gives one request back, not two.
        let t1 = t0 + Duration::from_millis(500);
        limiter.check("k", Some(120), t1).unwrap();
        assert!(limiter.check("k", Some(120), t1).is_err());
    }

    #[test]
    fn slow_rates_default_and_zero() {
        let limiter = RateLimiter::new(6);
        let t0 = Instant::now();
        // 1/min: a burst of one, then a minute's wait.
        limiter.check("slow", Some(1), t0).unwrap();
        assert_eq!(
            limiter
                .check("slow", Some(1), t0)
                .unwrap_err()
                .retry_after_secs,
            60
        );
        // The default (6/min) applies without a quota; its burst is still one request.
        limiter.check("d", None, t0).unwrap();
        assert_eq!(
            limiter.check("d", None, t0).unwrap_err().retry_after_secs,
            10
        );
        // 0/min blocks the key entirely.
        let e = limiter.check("zero", Some(0), t0).unwrap_err();
        assert_eq!(e.retry_after_secs, BLOCKED_RETRY_AFTER_SECS);
    }

    #[test]
    fn a_lowered_quota_caps_the_bucket_and_full_buckets_are_swept() {
        let limiter = RateLimiter::new(DEFAULT_REQUESTS_PER_MINUTE);
        let t0 = Instant::now();
        limiter.check("k", Some(6000), t0).unwrap();
        limiter.check("k", Some(12), t0).unwrap();
        assert!(limiter.check("k", Some(12), t0).is_err());
        limiter.check("idle", None, t0).unwrap();
        assert_eq!(limiter.tracked(), 2);
        // After the sweep interval both buckets are full again: only the caller's stays.
        limiter.check("new", None, t0 + SWEEP_INTERVAL).unwrap();
        assert_eq!(limiter.tracked(), 1);
    }
}
