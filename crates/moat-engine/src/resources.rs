//! Resource limits of a sandbox, their defaults and their bounds. The human forms (`512M`,
//! `1.5`, `30s`) are parsed by [`moat_proto::units`]; the functions here refuse bad ones as
//! invalid requests.

use std::time::Duration;

use crate::error::{EngineError, Result};

/// The limits one sandbox runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    /// Memory (RAM; swap is disabled), bytes.
    pub memory_bytes: u64,
    /// CPU, in thousandths of a CPU.
    pub cpu_millis: u64,
    /// Maximum number of processes and threads.
    pub pids: u64,
    /// Size of the writable layer (`/`, `/tmp`, `/home`), bytes. It lives in memory (tmpfs) and
    /// counts against `memory_bytes` as it fills.
    pub disk_bytes: u64,
}

/// Bounds every request is checked against.
pub mod bounds {
    /// Smallest memory limit: the agent needs a few MiB.
    pub const MIN_MEMORY: u64 = 16 << 20;
    /// Largest memory limit.
    pub const MAX_MEMORY: u64 = 64 << 30;
    /// Smallest CPU share (0.01 CPU).
    pub const MIN_CPU_MILLIS: u64 = 10;
    /// Largest CPU share (64 CPUs).
    pub const MAX_CPU_MILLIS: u64 = 64_000;
    /// Fewest processes (the agent plus a shell and a command).
    pub const MIN_PIDS: u64 = 8;
    /// Most processes and threads of one sandbox: well below any host's task limit (all
    /// sandboxes together are capped too, see `moat_jail::cgroup::sandbox_pids_budget`), and as
    /// many as `RLIMIT_NPROC` lets one user have anyway.
    pub const MAX_PIDS: u64 = 4096;
    /// Smallest writable layer.
    pub const MIN_DISK: u64 = 1 << 20;
    /// Largest writable layer.
    pub const MAX_DISK: u64 = 256 << 30;
    /// Longest run time.
    pub const MAX_TIMEOUT_SECS: u64 = moat_proto::units::MAX_DURATION_SECS;
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            memory_bytes: 512 << 20,
            cpu_millis: 1000,
            pids: 256,
            disk_bytes: 1 << 30,
        }
    }
}

impl Resources {
    /// Checks every limit against [`bounds`].
    pub fn validate(&self) -> Result<()> {
        use bounds::*;
        check(
            "memory",
            self.memory_bytes,
            MIN_MEMORY,
            MAX_MEMORY,
            fmt_bytes,
        )?;
        check(
            "cpus",
            self.cpu_millis,
            MIN_CPU_MILLIS,
            MAX_CPU_MILLIS,
            moat_proto::units::format_cpus,
        )?;
        check("pids", self.pids, MIN_PIDS, MAX_PIDS, |v| v.to_string())?;
        check("disk", self.disk_bytes, MIN_DISK, MAX_DISK, fmt_bytes)?;
        Ok(())
    }
}

fn check(name: &str, v: u64, min: u64, max: u64, show: impl Fn(u64) -> String) -> Result<()> {
    if v < min || v > max {
        return Err(EngineError::Invalid(format!(
            "{name} {} is out of range ({} to {})",
            show(v),
            show(min),
            show(max)
        )));
    }
    Ok(())
}

/// Formats bytes exactly in the largest binary unit that divides them (`512M`): the form
/// [`parse_size`] reads back.
pub use moat_proto::units::format_size as fmt_bytes;

/// [`moat_proto::units::parse_size`], refused as an invalid request.
pub fn parse_size(text: &str) -> Result<u64> {
    moat_proto::units::parse_size(text).map_err(invalid)
}

/// [`moat_proto::units::parse_cpus`], refused as an invalid request.
pub fn parse_cpus(text: &str) -> Result<u64> {
    moat_proto::units::parse_cpus(text).map_err(invalid)
}

/// [`moat_proto::units::parse_duration`] (at most [`bounds::MAX_TIMEOUT_SECS`]), refused as an
/// invalid request.
pub fn parse_duration(text: &str) -> Result<Duration> {
    moat_proto::units::parse_duration(text).map_err(invalid)
}

fn invalid(e: moat_proto::units::UnitError) -> EngineError {
    EngineError::Invalid(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's parsers are moat-proto's (whose tests pin the values), their errors an
    /// invalid request.
    #[test]
    fn parsers_are_protos_refusing_as_invalid() {
        use moat_proto::units;
        let invalid = |e: EngineError| matches!(e, EngineError::Invalid(_));
        for text in [
            "512M", "1G", "1.5Gi", "64MiB", "4096", "", "M", "12X", "-1M", "1..2G", "nan",
        ] {
            let (ours, theirs) = (parse_size(text), units::parse_size(text));
            assert_eq!(ours.as_ref().ok(), theirs.as_ref().ok(), "{text}");
            assert_eq!(ours.is_err(), theirs.is_err(), "{text}");
            assert!(ours.map_or_else(invalid, |_| true), "{text}");
        }
        for text in ["0.5", "0", "abc"] {
            let (ours, theirs) = (parse_cpus(text), units::parse_cpus(text));
            assert_eq!(ours.as_ref().ok(), theirs.as_ref().ok(), "{text}");
            assert!(ours.map_or_else(invalid, |_| true), "{text}");
        }
        for text in ["30s", "500ms", "2", "0s", "5d", "1000h"] {
            let (ours, theirs) = (parse_duration(text), units::parse_duration(text));
            assert_eq!(ours.as_ref().ok(), theirs.as_ref().ok(), "{text}");
            assert!(ours.map_or_else(invalid, |_| true), "{text}");
        }
    }

    #[test]
    fn bounds_are_enforced() {
        assert!(Resources::default().validate().is_ok());
        let small = Resources {
            memory_bytes: 1 << 20,
            ..Resources::default()
        };
        assert!(small.validate().is_err());
        let many = Resources {
            pids: 1 << 30,
            ..Resources::default()
        };
        assert!(many.validate().is_err());
    }
}
