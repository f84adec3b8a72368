//! Host uid/gid ranges: every sandbox maps its ids 0..65535 onto a range of unprivileged host ids
//! that no other live sandbox uses, so two sandboxes never share a host identity.
//!
//! Ranges are claimed with `flock` on a lock file per slot: the kernel releases the lock when the
//! last holder dies, so a killed process can never leak a range. A slot whose sandbox outlives
//! its holder (kept across a server restart) is also marked (see [`crate::kept`]) and skipped.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::{JailError, Result};

/// Ids per sandbox.
pub const RANGE: u32 = 65536;
/// First host id used for sandboxes (far above ordinary users and `/etc/subuid` ranges).
pub const BASE: u32 = 1_000_000_000;
/// Number of slots (keeps every host id below 2^31).
pub const SLOTS: u32 = 16_384;

/// Attempts of [`IdRange::reclaim`], 10 ms apart.
const RECLAIM_TRIES: u32 = 100;

/// A claimed range; released when dropped (or when every process holding it is gone).
#[derive(Debug)]
pub struct IdRange {
    slot: u32,
    _lock: File,
}

impl IdRange {
    /// Claims a free slot, starting the search at a pseudo-random one.
    pub fn claim(slots_dir: &Path) -> Result<IdRange> {
        let mut seed = [0u8; 4];
        // SAFETY: seed is a valid writable buffer of 4 bytes.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), 4, 0) };
        let start = if n == 4 {
            u32::from_ne_bytes(seed) % SLOTS
        } else {
            std::process::id() % SLOTS
        };
        for i in 0..SLOTS {
            let slot = (start + i) % SLOTS;
            if let Some(range) = Self::try_lock(slots_dir, slot)? {
                // Checked under the lock: markers are written and removed only by its holder.
                if !crate::kept::is_marked(slots_dir, slot) {
                    return Ok(range);
                }
            }
        }
        Err(JailError::Invalid(format!(
            "all {SLOTS} uid ranges are in use"
        )))
    }

    /// Locks `slot` again for the sandbox kept on it (whose marker the caller found), waiting
    /// briefly for a concurrent [`IdRange::claim`] that is only looking at it.
    pub fn reclaim(slots_dir: &Path, slot: u32) -> Result<IdRange> {
        if slot >= SLOTS {
            return Err(JailError::Invalid(format!("slot {slot} is out of range")));
        }
        for _ in 0..RECLAIM_TRIES {
            if let Some(range) = Self::try_lock(slots_dir, slot)? {
                return Ok(range);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Err(JailError::Invalid(format!(
            "uid range slot {slot} is held by another process"
        )))
    }

    /// Locks `slot` if no process holds it (its sandbox, if any, has no live owner); `None`
    /// if one does.
    pub fn try_hold(slots_dir: &Path, slot: u32) -> Result<Option<IdRange>> {
        if slot >= SLOTS {
            return Err(JailError::Invalid(format!("slot {slot} is out of range")));
        }
        Self::try_lock(slots_dir, slot)
    }

    fn try_lock(slots_dir: &Path, slot: u32) -> Result<Option<IdRange>> {
        let path = slots_dir.join(slot.to_string());
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| JailError::os(format!("open {}", path.display()), e))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            Ok(Some(IdRange { slot, _lock: file }))
        } else {
            Ok(None)
        }
    }

    /// The first host id of the range.
    pub fn host_base(&self) -> u32 {
        BASE + self.slot * RANGE
    }

    /// The slot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The lock file's descriptor, for a cleanup process that must keep the range until it is done.
    pub fn lock_fd(&self) -> i32 {
        self._lock.as_raw_fd()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kept::{self, KeptMarker};

    #[test]
    fn claims_skip_marked_slots_and_reclaim_takes_them() {
        let dir = tempfile::tempdir().unwrap();
        let free = 1234;
        for slot in (0..SLOTS).filter(|s| *s != free) {
            let m = KeptMarker {
                slot,
                id: format!("s{slot}"),
                pid: 1,
                owner: None,
            };
            kept::write(dir.path(), &m).unwrap();
        }
        let range = IdRange::claim(dir.path()).unwrap();
        assert_eq!(range.slot(), free, "a claim took a marked slot");
        assert!(
            IdRange::claim(dir.path()).is_err(),
            "every slot is taken or marked"
        );
        drop(range);
        let kept = IdRange::reclaim(dir.path(), 7).unwrap();
        assert_eq!(kept.slot(), 7);
        assert!(IdRange::reclaim(dir.path(), SLOTS).is_err());
    }
}
