//! Upload bodies: why a caller's body failed, kept for the file service (the stream's consumer,
//! the agent client, only sees that it failed).

use std::sync::Mutex;

use tokio::sync::Notify;

use super::FileError;

/// Why an upload body failed, once it has: the front end that reads the body sets it, the
/// file service waits on it beside the transfer.
#[derive(Debug, Default)]
pub struct UploadFailure {
    error: Mutex<Option<FileError>>,
    notify: Notify,
}

impl UploadFailure {
    /// Records that the body failed with `e`.
    pub fn set(&self, e: FileError) {
        *self.lock() = Some(e);
        // A permit is stored when nobody waits yet, so a later `wait` still wakes.
        self.notify.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<FileError>> {
        self.error.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The failure, if the body failed.
    pub fn take(&self) -> Option<FileError> {
        self.lock().clone()
    }

    /// Waits until the body fails (forever if it never does).
    pub async fn wait(&self) -> FileError {
        loop {
            if let Some(e) = self.take() {
                return e;
            }
            self.notify.notified().await;
        }
    }
}

/// The error an upload body stream ends with; the details are in its [`UploadFailure`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyFailed(pub String);
