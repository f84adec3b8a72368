//! One `moat serve` per data dir: an exclusive `flock` on `<data-dir>/moat.lock`, held for the
//! life of the process.
//!
//! Two servers on one store would each believe they own its sandboxes (one would mark the
//! other's running sandboxes orphaned at start and kill them). The kernel drops a `flock` when
//! its holder exits however it exits, so a crashed server never leaves a stale lock; the pid in
//! the file only names the holder in the refusal.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// The lock file's name in the data dir.
pub const LOCK_FILE: &str = "moat.lock";

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Takes the lock of `data_dir` without waiting, and writes our pid into it; fails at once,
/// naming the holder's pid, when another process holds it.
pub fn lock(data_dir: &Path) -> Result<DataDirLock> {
    let path = data_dir.join(LOCK_FILE);
    // Not truncated on open: until we hold the lock the pid in it is the holder's.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let holder = match file.read_to_string(&mut text) {
                Ok(_) if !text.trim().is_empty() => format!("pid {}", text.trim()),
                _ => "a process that has not written its pid yet".to_owned(),
            };
            bail!(
                "the data dir {} is in use by another moat serve ({holder}, holding {}); \
                 stop it or pass another --data-dir",
                data_dir.display(),
                path.display()
            );
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing our pid into {}", path.display()))?;
    Ok(DataDirLock { _file: file })
}
