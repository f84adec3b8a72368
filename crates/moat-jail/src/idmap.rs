//! Host uid/gid ranges: every sandbox maps its ids 0..65535 onto a range of unprivileged host ids
//! that no other live sandbox uses, so two sandboxes never share a host identity.
//!
//! Ranges are claimed with `flock` on a lock file per slot: the kernel releases the lock when the
//! last holder dies, so a killed process can never leak a range.

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
                return Ok(IdRange { slot, _lock: file });
            }
        }
        Err(JailError::Invalid(format!(
            "all {SLOTS} uid ranges are in use"
        )))
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
