//! Space in the data dir. The store (and with it every record of what runs) lives there; when it
//! fills up, writes fail and a record could no longer follow what the backend does. So the
//! server refuses work that changes state while the data dir's free space is under
//! [`DATA_DIR_RESERVE`] (`507 insufficient_storage`, and `/readyz` says so), and a write that
//! fails for lack of space all the same answers the same way.

use std::path::Path;

use crate::disk::free_disk;

use moat_proto::units::describe_size;

use super::{ManagerError, ManagerResult, SandboxManager};

/// Free space the data dir must keep for the store: below it, state-changing requests are
/// refused.
pub const DATA_DIR_RESERVE: u64 = 32 << 20;

impl SandboxManager {
    /// Whether the data dir (the store's directory) has at least [`DATA_DIR_RESERVE`] free:
    /// [`ManagerError::InsufficientStorage`] with the figures when it has not. A store in
    /// memory always has room; a data dir whose free space cannot be read is given the benefit
    /// of the doubt (its writes still fail cleanly).
    pub fn check_storage(&self) -> ManagerResult<()> {
        let Some(dir) = self.inner.store.path().and_then(Path::parent) else {
            return Ok(());
        };
        let Ok(free) = free_disk(dir) else {
            return Ok(());
        };
        if free >= DATA_DIR_RESERVE {
            return Ok(());
        }
        Err(ManagerError::InsufficientStorage(format!(
            "the server's data dir is full: {} free, below the {} it keeps for its records; \
             nothing was changed",
            describe_size(free),
            describe_size(DATA_DIR_RESERVE)
        )))
    }
}

/// Whether `e` failed for lack of space (SQLite's "database or disk is full").
pub(super) fn is_disk_full(e: &crate::store::StoreError) -> bool {
    matches!(e, crate::store::StoreError::Sqlite(s)
        if s.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_full_error_is_recognised() {
        let full = crate::store::StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        ));
        assert!(is_disk_full(&full));
        let busy = crate::store::StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        ));
        assert!(!is_disk_full(&busy));
    }
}
