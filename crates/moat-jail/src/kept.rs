//! Markers of sandboxes kept across server restarts.
//!
//! A uid-range slot is normally held by `flock` on its lock file, which the kernel drops when
//! the holder dies. A sandbox that must outlive its server (`moat serve --on-shutdown keep`)
//! would lose its slot in that gap, and a `moat run` could claim the same host ids for another
//! sandbox. So such a sandbox also has a marker, `<slots>/<slot>.kept`, written while the slot is
//! locked and removed only when the sandbox is destroyed: [`crate::idmap::IdRange::claim`] skips
//! marked slots, and a starting server finds its sandboxes (id and agent pid) in the markers.
//!
//! Several servers (each with its own data dir) can share one host and so one slots directory.
//! A marker names its owner, an id of the server's data dir, so that a starting server takes
//! over or cleans up only the markers of its own data dir and leaves the others' alone.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::{JailError, Result};

/// File-name suffix of markers in the slots directory.
const SUFFIX: &str = ".kept";

/// What a marker records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptMarker {
    /// The uid-range slot.
    pub slot: u32,
    /// The sandbox id.
    pub id: String,
    /// The agent's pid in the host's pid namespace.
    pub pid: i32,
    /// Who made the sandbox (an id of the server's data dir, `[a-z0-9]{1,64}`); `None` for
    /// markers written without one.
    pub owner: Option<String>,
}

/// The marker path of `slot`.
pub fn path(slots_dir: &Path, slot: u32) -> PathBuf {
    slots_dir.join(format!("{slot}{SUFFIX}"))
}

/// Whether `slot` is marked.
pub fn is_marked(slots_dir: &Path, slot: u32) -> bool {
    path(slots_dir, slot).exists()
}

/// Writes the marker of `m` (the caller holds the slot's lock).
pub fn write(slots_dir: &Path, m: &KeptMarker) -> Result<()> {
    let p = path(slots_dir, m.slot);
    let tmp = slots_dir.join(format!(".{}{SUFFIX}.tmp", m.slot));
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| JailError::os(format!("create {}", tmp.display()), e))?;
    let line = match &m.owner {
        Some(owner) => {
            crate::id::validate_id(owner)?;
            format!("{} {} {owner}\n", m.id, m.pid)
        }
        None => format!("{} {}\n", m.id, m.pid),
    };
    f.write_all(line.as_bytes())
        .map_err(|e| JailError::os(format!("write {}", tmp.display()), e))?;
    fs::rename(&tmp, &p).map_err(|e| JailError::os(format!("rename to {}", p.display()), e))
}

/// Removes the marker of `slot` (the caller holds the slot's lock); a missing one is fine.
pub fn remove(slots_dir: &Path, slot: u32) -> Result<()> {
    let p = path(slots_dir, slot);
    match fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(JailError::os(format!("remove {}", p.display()), e)),
    }
}

/// Every readable marker; unreadable or malformed ones are skipped (and stay, keeping their
/// slot out of use, which is the safe side).
pub fn scan(slots_dir: &Path) -> Vec<KeptMarker> {
    let Ok(entries) = fs::read_dir(slots_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(slot) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let mut parts = text.split_whitespace();
        if let (Some(id), Some(Ok(pid)), owner, None) = (
            parts.next(),
            parts.next().map(str::parse::<i32>),
            parts.next(),
            parts.next(),
        ) && crate::id::validate_id(id).is_ok()
            && owner.is_none_or(|o| crate::id::validate_id(o).is_ok())
        {
            out.push(KeptMarker {
                slot,
                id: id.to_owned(),
                pid,
                owner: owner.map(str::to_owned),
            });
        }
    }
    out.sort_by_key(|m| m.slot);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = KeptMarker {
            slot: 7,
            id: "abc123".into(),
            pid: 4242,
            owner: Some("d1a2".into()),
        };
        let legacy = KeptMarker {
            slot: 8,
            id: "def".into(),
            pid: 7,
            owner: None,
        };
        assert!(!is_marked(dir.path(), 7));
        write(dir.path(), &m).unwrap();
        write(dir.path(), &legacy).unwrap();
        assert!(is_marked(dir.path(), 7));
        fs::write(dir.path().join("9.kept"), "bad id! 1").unwrap();
        fs::write(dir.path().join("10.kept"), "abc 1 Bad/owner").unwrap();
        fs::write(dir.path().join("7"), "").unwrap();
        assert_eq!(scan(dir.path()), vec![m, legacy.clone()]);
        let bad = KeptMarker {
            owner: Some("../x".into()),
            ..legacy.clone()
        };
        assert!(write(dir.path(), &bad).is_err());
        remove(dir.path(), 7).unwrap();
        remove(dir.path(), 7).unwrap();
        assert!(!is_marked(dir.path(), 7));
    }
}
