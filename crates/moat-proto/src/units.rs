//! The human forms of sizes (`512M`, `1.5G`), CPU counts (`0.5`) and durations (`30s`) that
//! requests, templates and the command line use: parsing and formatting, shared by the server
//! and every client so that both read and print them alike. Pure: the bounds a sandbox's limits
//! must keep are the engine's.

use std::fmt;
use std::time::Duration;

/// The longest duration [`parse_duration`] accepts: one day, the longest time-out or TTL any
/// request may name.
pub const MAX_DURATION_SECS: u64 = 24 * 3600;

/// Text that is not a size, CPU count or duration; says which and how to write one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitError(String);

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnitError {}

/// The binary units, largest first.
const UNITS: [(&str, u64); 4] = [
    ("T", 1 << 40),
    ("G", 1 << 30),
    ("M", 1 << 20),
    ("K", 1 << 10),
];

/// Splits `t` into its leading number (digits and dots) and the rest.
fn split_number(t: &str) -> (&str, &str) {
    let at = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    t.split_at(at)
}

/// Parses a size: a number with an optional binary unit (`K`, `M`, `G`, `T`, optionally followed
/// by `i`/`iB`/`B`), for example `512M`, `1G`, `1.5G`, `65536`.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let bad = || UnitError(format!("invalid size {text:?}: use e.g. 512M, 1G or 65536"));
    let (num, unit) = split_number(text.trim());
    if num.is_empty() {
        return Err(bad());
    }
    let unit = unit.trim().to_ascii_uppercase();
    let mult = match unit.trim_end_matches('B').trim_end_matches('I') {
        "" => 1,
        u => UNITS
            .iter()
            .find(|(name, _)| *name == u)
            .map(|(_, n)| *n)
            .ok_or_else(bad)?,
    };
    let value: f64 = num.parse().map_err(|_| bad())?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Parses a CPU count such as `1`, `0.5` or `2.25` into thousandths of a CPU.
pub fn parse_cpus(text: &str) -> Result<u64, UnitError> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| UnitError(format!("invalid CPU count {text:?}: use e.g. 1 or 0.5")))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(UnitError(format!(
            "invalid CPU count {text:?}: must be positive"
        )));
    }
    Ok((v * 1000.0).round() as u64)
}

/// Parses a duration: a number with a unit `ms`, `s`, `m` or `h` (a bare number is seconds),
/// positive and at most [`MAX_DURATION_SECS`].
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let bad = || {
        UnitError(format!(
            "invalid duration {text:?}: use e.g. 500ms, 30s, 5m"
        ))
    };
    let (num, unit) = split_number(text.trim());
    let v: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "" | "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(UnitError(format!(
            "invalid duration {text:?}: must be positive"
        )));
    }
    if secs > MAX_DURATION_SECS as f64 {
        return Err(UnitError(format!(
            "duration {text:?} is longer than the maximum of {}h",
            MAX_DURATION_SECS / 3600
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// CPU thousandths as a count of CPUs, as [`parse_cpus`] reads it: `1`, `0.5`, `0.25`.
pub fn format_cpus(millis: u64) -> String {
    let text = format!("{}.{:03}", millis / 1000, millis % 1000);
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// `bytes` exactly, in the largest binary unit that divides it (`512M`, `1G`), else as a plain
/// number: the form [`parse_size`] reads back.
pub fn format_size(bytes: u64) -> String {
    UNITS
        .iter()
        .find(|(_, n)| bytes >= *n && bytes.is_multiple_of(*n))
        .map_or_else(|| bytes.to_string(), |(u, n)| format!("{}{u}", bytes / n))
}

/// `bytes` as [`format_size`] writes it when that is exact in a unit or under 1K (`2G`, `512M`,
/// `100`), else to one decimal in the largest unit it reaches (`1.4G`).
pub fn format_size_approx(bytes: u64) -> String {
    let exact = format_size(bytes);
    if bytes < 1024 || exact != bytes.to_string() {
        return exact;
    }
    let (unit, size) = UNITS
        .into_iter()
        .find(|(_, size)| bytes >= *size)
        .unwrap_or(("K", 1 << 10));
    format!("{:.1}{unit}", bytes as f64 / size as f64)
}

/// `bytes` for a sentence: [`format_size_approx`] with the unit spelled out (`8MiB`, `1.4GiB`,
/// `100 bytes`); a figure with a decimal is not exact.
pub fn describe_size(bytes: u64) -> String {
    let s = format_size_approx(bytes);
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{s} bytes")
    } else {
        format!("{s}iB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").ok(), Some(512 << 20));
        assert_eq!(parse_size("1G").ok(), Some(1 << 30));
        assert_eq!(parse_size("1.5Gi").ok(), Some(3 << 29));
        assert_eq!(parse_size("64MiB").ok(), Some(64 << 20));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("2t").ok(), Some(2 << 40));
        for bad in ["", "M", "12X", "-1M", "1..2G", "nan", "1KT"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpus_and_durations() {
        assert_eq!(parse_cpus("0.5").ok(), Some(500));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("abc").is_err());
        assert_eq!(parse_duration("30s").ok(), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_duration("500ms").ok(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_duration("2").ok(), Some(Duration::from_secs(2)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("1000h").is_err());
        for m in [1u64, 10, 500, 1000, 2250, 64_000] {
            assert_eq!(parse_cpus(&format_cpus(m)).ok(), Some(m));
        }
        assert_eq!(format_cpus(2250), "2.25");
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(1536 << 20), "1536M");
        assert_eq!(format_size(4 << 40), "4T");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size_approx(1536 << 20), "1536M");
        assert_eq!(format_size_approx(1_500_000_000), "1.4G");
        assert_eq!(format_size_approx(100), "100");
        assert_eq!(format_size_approx(0), "0");
        assert_eq!(describe_size(512), "512 bytes");
        assert_eq!(describe_size(3 << 20), "3MiB");
        assert_eq!(describe_size((8 << 20) + 1), "8.0MiB");
        assert_eq!(describe_size(5 << 30), "5GiB");
        assert_eq!(describe_size(1_500_000_000), "1.4GiB");
        for n in [1u64, 4096, 512 << 20, 3 << 30, 12345] {
            assert_eq!(parse_size(&format_size(n)).ok(), Some(n));
        }
    }
}
