//! Calls under way to a sandbox's agent, counted so that a pause lets them finish first.
//!
//! A pause that saves a sandbox to disk ends its agent's connection: a file read or any other
//! short call still under way then would fail, although the sandbox is only pausing (and,
//! with `auto_resume`, the very next call resumes it). So a short call holds a [`CallGuard`]
//! from the moment it is routed until its answer is complete, and a pause first refuses new
//! calls (they wait for the pause, then resume the sandbox or get a 409), then waits up to
//! [`PAUSE_DRAIN_LIMIT`] for the guards to go. Streams that last as long as a process does
//! (commands, watches, code executions, traffic to the sandbox's own services) hold a guard
//! only until their answer starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// The longest a pause waits for calls under way to finish before it goes on without them.
pub const PAUSE_DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// The count of one sandbox's calls under way.
#[derive(Debug, Default)]
pub(super) struct CallGate {
    under_way: AtomicUsize,
    idle: Notify,
}

impl CallGate {
    /// Counts a call in until the guard is dropped. The caller checks, after this, that the
    /// sandbox is not pausing: a pause sets its flag before it looks at the count, so one of
    /// the two always sees the other.
    pub(super) fn enter(self: &Arc<Self>) -> CallGuard {
        self.under_way.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.clone())
    }

    /// Waits until no call is under way or `limit` has passed; `false` when calls were still
    /// under way at the limit.
    pub(super) async fn drain(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.idle.notified();
                tokio::pin!(idle);
                // Registered before the count is read, so a guard dropped in between wakes it.
                idle.as_mut().enable();
                if self.under_way.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

/// One call under way to a sandbox's agent; dropping it ends the call for a pause's purposes.
#[derive(Debug)]
pub struct CallGuard(Arc<CallGate>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.under_way.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_waits_for_the_last_guard_and_no_longer_than_its_limit() {
        let gate = Arc::new(CallGate::default());
        assert!(gate.drain(Duration::from_millis(1)).await, "idle at once");
        let first = gate.enter();
        let second = gate.enter();
        assert!(!gate.drain(Duration::from_millis(20)).await, "held");
        drop(first);
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.drain(Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(second);
        assert!(waiter.await.expect("drain task"), "woken by the last guard");
    }
}
