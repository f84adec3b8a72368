//! Samples, percentiles and table rows.

use std::time::Duration;

/// Durations of repeated runs.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<Duration>);

impl Samples {
    /// Adds one sample.
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    /// The `p`-th percentile (0–100), nearest rank.
    pub fn percentile(&self, p: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    /// The median.
    pub fn median(&self) -> Duration {
        self.percentile(50.0)
    }

    /// Prints a table row: median, p99 and the ratios of the medians to `bare` and `bwrap`.
    pub fn row(&self, label: &str, bare: &Samples, bwrap: Option<&Samples>) {
        let ratio = |other: &Samples| {
            let o = other.median().as_secs_f64();
            if o > 0.0 {
                format!("{:.2}×", self.median().as_secs_f64() / o)
            } else {
                "-".into()
            }
        };
        println!(
            "| {label} | {} | {} | {} | {} |",
            ms(self.median()),
            ms(self.percentile(99.0)),
            ratio(bare),
            bwrap.map(ratio).unwrap_or_else(|| "-".into())
        );
    }
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
