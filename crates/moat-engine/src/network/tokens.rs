//! Token buckets: a rate with bursts, held to by a sandbox's DNS queries and new connections
//! (one token each) and, where the operator sets a bandwidth, by its bytes.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// `per_sec` tokens a second, at most `burst` saved up; it starts full.
#[derive(Debug)]
pub struct Tokens {
    per_sec: f64,
    burst: f64,
    /// Tokens there now, and when that was last worked out.
    state: Mutex<(f64, Instant)>,
}

impl Tokens {
    /// A full bucket.
    pub fn new(per_sec: f64, burst: f64) -> Tokens {
        Tokens {
            per_sec,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// `f` of the tokens there now (refilled for the time since last asked).
    fn with<T>(&self, f: impl FnOnce(&mut f64) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.per_sec).min(self.burst);
        s.1 = now;
        f(&mut s.0)
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        self.with(|t| {
            let there = *t >= 1.0;
            if there {
                *t -= 1.0;
            }
            there
        })
    }

    /// Waits until tokens are there, and takes up to `want` of them (at least one). Waits for
    /// a batch (a tenth of a second's worth, or `want`) rather than token by token.
    pub async fn take_up_to(&self, want: usize) -> usize {
        let batch = (want as f64).min(self.per_sec / 10.0).max(1.0);
        loop {
            let taken = self.with(|t| {
                if *t >= batch {
                    let k = t.min(want as f64).floor();
                    *t -= k;
                    Ok(k as usize)
                } else {
                    Err(Duration::from_secs_f64((batch - *t) / self.per_sec))
                }
            });
            match taken {
                Ok(k) => return k,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Gives back tokens taken and not used.
    pub fn give_back(&self, n: usize) {
        self.with(|t| *t = (*t + n as f64).min(self.burst));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_lets_its_rate_through_and_no_more() {
        let b = Tokens::new(1000.0, 1000.0);
        // A full second's worth at once, then a tenth of a second's per batch.
        assert_eq!(b.take_up_to(5000).await, 1000);
        let began = Instant::now();
        let mut got = 0;
        while got < 3000 {
            got += b.take_up_to(5000).await;
        }
        assert!(
            began.elapsed() >= Duration::from_millis(2900),
            "{:?}",
            began.elapsed()
        );
        b.give_back(500);
        assert_eq!(b.take_up_to(500).await, 500);
    }

    #[tokio::test(start_paused = true)]
    async fn single_tokens_run_out_at_the_burst_and_come_back_at_the_rate() {
        let b = Tokens::new(100.0, 200.0);
        assert_eq!((0..300).filter(|_| b.try_take()).count(), 200);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!((0..300).filter(|_| b.try_take()).count(), 10);
    }
}
