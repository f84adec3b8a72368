//! Descriptors driven by the runtime's reactor that survive a readiness wrongly reported
//! closed.
//!
//! The reactor keeps a descriptor's "closed" readiness (a hang-up) for good: a real hang-up is
//! final, and every read after it answers at once. A sandbox restored from a memory checkpoint
//! breaks that rule: gVisor replays, on the first poll after a restore, hang-ups of descriptors
//! the agent had already closed before the checkpoint, tagged with the reactor's keys of the
//! time. When the reactor has since given such a key to a live descriptor (the new connection
//! to the host, a process's pipe), that descriptor reads as hung up while a read would block,
//! and a reader that trusts the readiness retries forever without yielding: the agent stops
//! answering. So every read and write here treats "closed, yet the call would block" as what
//! it is, a readiness that cannot be trusted, and registers a duplicate of the descriptor
//! afresh (a new key, nothing pending) before it waits again.
//!
//! A replayed event whose key no registration holds any more would reach memory the reactor
//! has released. So an agent that may be checkpointed ([`keep_recent_registrations`]) keeps
//! the registrations of its last [`KEPT_REGISTRATIONS`] closed descriptors alive, their keys
//! taken: each descriptor itself is closed at once (`/dev/null` is put in its place, so its
//! peer sees the end at once), and only the reactor's record of it lingers. A registration
//! that lived through a checkpoint ([`checkpoint_coming`]) is kept for the agent's life, its
//! descriptor closed: the keys of those were seen replayed restore after restore (a background
//! command's pipes, closed after the restore, came back in the next two), however many
//! descriptors closed meanwhile.

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Which way an operation goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Reading: waits for the descriptor to be readable.
    Read,
    /// Writing: waits for the descriptor to be writable.
    Write,
}

/// How many registrations of closed descriptors an agent that may be checkpointed keeps.
pub const KEPT_REGISTRATIONS: usize = 64;

/// `/dev/null`, open, once registrations are kept (see [`keep_recent_registrations`]).
static NULL: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();

/// The registrations kept, oldest first.
static KEPT: Mutex<std::collections::VecDeque<Arc<AsyncFd<OwnedFd>>>> =
    Mutex::new(std::collections::VecDeque::new());

/// The registrations of closed descriptors that lived through a checkpoint: kept for good.
static PINNED: Mutex<Vec<Arc<AsyncFd<OwnedFd>>>> = Mutex::new(Vec::new());

/// How many checkpoints the agent has been readied for.
static CHECKPOINTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Says a checkpoint may follow: every registration made before now is kept for good once its
/// descriptor closes (see the module's notes).
pub fn checkpoint_coming() {
    CHECKPOINTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

fn checkpoints() -> u64 {
    CHECKPOINTS.load(std::sync::atomic::Ordering::SeqCst)
}

/// From now on, keeps the reactor's registrations of the last [`KEPT_REGISTRATIONS`] closed
/// descriptors alive (see the module's notes): for an agent whose sandbox may be checkpointed
/// and restored.
pub fn keep_recent_registrations() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let _ = NULL.set(null.into());
    Ok(())
}

/// Lets go of the registration `fd`, made when [`CHECKPOINTS`] was `born`, only once
/// [`KEPT_REGISTRATIONS`] newer ones are kept, when registrations are kept, or never when a
/// checkpoint came since it was made; with `release`, of its descriptor at once (`/dev/null`
/// takes its place). Only a descriptor whose open file nothing else of the agent holds may be
/// released so: the poller forgets a registration by itself only when its file is closed, and
/// one left behind under a number that then refers to `/dev/null` could not be removed.
fn retire(fd: Arc<AsyncFd<OwnedFd>>, born: u64, release: bool) {
    let Some(null) = NULL.get() else {
        return;
    };
    use std::os::fd::AsRawFd;
    // Shared (a renewal's predecessor still in use): the open file lives on in its successor,
    // so only the registration is kept, with its number.
    let sole = release && Arc::strong_count(&fd) == 1;
    if born < checkpoints() {
        if sole {
            // SAFETY: closes the descriptor the AsyncFd owns, which releases its file (and so
            // the poller's registration of it). The AsyncFd goes into PINNED, which never lets
            // go of it: it is never dropped, so the number, free for reuse from here on, is
            // never closed or deregistered again in its name. Pinned registrations cost no
            // descriptor, only the reactor's record.
            unsafe { libc::close(fd.get_ref().as_raw_fd()) };
        }
        PINNED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(fd);
        return;
    }
    if sole {
        // SAFETY: dup2 onto a descriptor the AsyncFd owns: it now refers to /dev/null, and the
        // file it referred to is released by this reference.
        unsafe { libc::dup2(null.as_raw_fd(), fd.get_ref().as_raw_fd()) };
    }
    let mut kept = KEPT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    kept.push_back(fd);
    while kept.len() > KEPT_REGISTRATIONS {
        kept.pop_front();
    }
}

/// A non-blocking descriptor registered with the runtime's reactor (see the module's notes).
#[derive(Debug)]
pub struct PollFd {
    /// The current registration and the count of checkpoints when it was made; replaced
    /// when its readiness cannot be trusted. `None` only while the `PollFd` is dropped.
    current: Mutex<Option<(Arc<AsyncFd<OwnedFd>>, u64)>>,
    interest: Interest,
}

impl PollFd {
    /// Makes `fd`, whose open file no other descriptor of the agent refers to, non-blocking
    /// and registers it for `interest`.
    pub fn new(fd: OwnedFd, interest: Interest) -> io::Result<PollFd> {
        set_nonblocking(fd.as_fd())?;
        Ok(PollFd {
            current: Mutex::new(Some((Arc::new(register(fd, interest)?), checkpoints()))),
            interest,
        })
    }

    /// Runs `f` on the descriptor as it is now (for ioctls and the like: a renewal changes
    /// its number, never the open file it refers to).
    pub fn with_fd<R>(&self, f: impl FnOnce(BorrowedFd<'_>) -> R) -> R {
        let fd = self.registration();
        f(fd.get_ref().as_fd())
    }

    /// Runs `op` once the descriptor is ready for `dir`, again each time it answers
    /// `WouldBlock`, until it answers anything else.
    pub async fn io<R>(
        &self,
        dir: Direction,
        mut op: impl FnMut(BorrowedFd<'_>) -> io::Result<R>,
    ) -> io::Result<R> {
        poll_fn(|cx| self.poll_io(cx, dir, &mut op)).await
    }

    /// The polling form of [`PollFd::io`].
    pub fn poll_io<R>(
        &self,
        cx: &mut Context<'_>,
        dir: Direction,
        mut op: impl FnMut(BorrowedFd<'_>) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        loop {
            let fd = self.registration();
            let mut guard = match dir {
                Direction::Read => ready!(fd.poll_read_ready(cx))?,
                Direction::Write => ready!(fd.poll_write_ready(cx))?,
            };
            let closed = match dir {
                Direction::Read => guard.ready().is_read_closed(),
                Direction::Write => guard.ready().is_write_closed(),
            };
            match guard.try_io(|inner| op(inner.get_ref().as_fd())) {
                Ok(result) => return Poll::Ready(result),
                // A fresh registration has no readiness until the reactor reports some, so
                // the next turn of this loop waits: it cannot spin.
                Err(_would_block) if closed => self.renew(&fd)?,
                Err(_would_block) => {}
            }
        }
    }

    fn registration(&self) -> Arc<AsyncFd<OwnedFd>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(fd, _)| fd.clone())
            .expect("a PollFd in use has a registration")
    }

    /// Replaces the registration `seen` (unless another caller already did) with one of a
    /// duplicate descriptor: a new key in the poller, with nothing pending. The old one is
    /// deregistered and closed when its last user lets go, which wakes whoever waits on it.
    fn renew(&self, seen: &Arc<AsyncFd<OwnedFd>>) -> io::Result<()> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.as_ref().is_some_and(|(c, _)| Arc::ptr_eq(c, seen)) {
            let dup = seen.get_ref().try_clone()?;
            let fresh = (Arc::new(register(dup, self.interest)?), checkpoints());
            if let Some((old, born)) = current.replace(fresh) {
                retire(old, born, false);
            }
        }
        Ok(())
    }
}

impl Drop for PollFd {
    fn drop(&mut self) {
        let current = self
            .current
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((fd, born)) = current.take() {
            retire(fd, born, true);
        }
    }
}

fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor, and the AsyncFd owns it: nothing can
    // close or replace it while registered.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// Sets `O_NONBLOCK` on `fd` (on its open file, which its duplicates share).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl with integer arguments on an open descriptor.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors that nothing else owns.
        unsafe {
            use std::os::fd::FromRawFd;
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        }
    }

    fn read_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is writable for its length; fd is open for the borrow.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// A hang-up the reactor reports for a pipe whose writer is alive (what a restore replays)
    /// is survived: the read waits without retrying over and over, and data written later is
    /// read.
    #[tokio::test(flavor = "current_thread")]
    async fn a_hang_up_reported_for_a_live_pipe_neither_spins_nor_loses_data() {
        let (r, w) = pipe();
        let reader = Arc::new(PollFd::new(r, Interest::READABLE).expect("register"));
        forge_hang_up(&reader).await;
        let tries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = {
            let (reader, tries) = (reader.clone(), tries.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 8];
                let n = reader
                    .io(Direction::Read, |fd| {
                        tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        read_now(fd, &mut buf)
                    })
                    .await
                    .expect("read");
                buf[..n].to_vec()
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !task.is_finished(),
            "the read returned before any data was written"
        );
        // One try on the forged readiness; a reader that trusts it retries thousands of times.
        let idle = tries.load(std::sync::atomic::Ordering::SeqCst);
        assert!(idle <= 2, "{idle} reads of an empty pipe while waiting");
        // SAFETY: writes from a valid buffer to the pipe's open write end.
        let n = unsafe { libc::write(w.as_raw_fd(), b"hi".as_ptr().cast(), 2) };
        assert_eq!(n, 2);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the read finishes once data is there")
            .expect("join");
        assert_eq!(got, b"hi");
    }

    /// With registrations kept (a checkpointable agent), dropping a descriptor still closes
    /// it at once: the reader of a pipe whose write end is dropped sees the end of file.
    #[tokio::test(flavor = "current_thread")]
    async fn a_kept_registration_does_not_keep_its_descriptor_open() {
        keep_recent_registrations().expect("keep");
        let (r, w) = pipe();
        let writer = PollFd::new(w, Interest::WRITABLE).expect("register");
        writer
            .io(Direction::Write, |fd| {
                // SAFETY: writes from a valid buffer to the pipe's open write end.
                let n = unsafe { libc::write(fd.as_raw_fd(), b"x".as_ptr().cast(), 1) };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            })
            .await
            .expect("write");
        drop(writer);
        assert_eq!(
            KEPT.lock().expect("lock").len(),
            1,
            "the registration is kept"
        );
        let reader = PollFd::new(r, Interest::READABLE).expect("register");
        let mut buf = [0u8; 4];
        let mut got = Vec::new();
        for what in ["data", "the end of file, at once"] {
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                reader.io(Direction::Read, |fd| read_now(fd, &mut buf)),
            )
            .await
            .expect(what)
            .expect("read");
            got.push(n);
        }
        assert_eq!(got, [1, 0]);
    }

    /// A registration made before a checkpoint outlives any number of descriptors closed
    /// after it (a restore may hand its key back); one made after it goes once
    /// [`KEPT_REGISTRATIONS`] newer ones are kept.
    #[tokio::test(flavor = "current_thread")]
    async fn a_registration_that_lived_through_a_checkpoint_is_kept_for_good() {
        keep_recent_registrations().expect("keep");
        let weak_of = |fd: &PollFd| Arc::downgrade(&fd.registration());
        let (r, _w1) = pipe();
        let before = PollFd::new(r, Interest::READABLE).expect("register");
        let lived = weak_of(&before);
        let number = before.with_fd(|fd| fd.as_raw_fd());
        checkpoint_coming();
        let (r, _w2) = pipe();
        let after = PollFd::new(r, Interest::READABLE).expect("register");
        let fresh = weak_of(&after);
        drop(before);
        // Its registration is kept, its descriptor closed: pinning costs no descriptor.
        // SAFETY: fcntl with integer arguments; nothing has opened a descriptor since.
        assert_eq!(unsafe { libc::fcntl(number, libc::F_GETFD) }, -1);
        drop(after);
        for _ in 0..=KEPT_REGISTRATIONS {
            let (r, _w) = pipe();
            drop(PollFd::new(r, Interest::READABLE).expect("register"));
        }
        assert!(lived.upgrade().is_some(), "released after the checkpoint");
        assert!(fresh.upgrade().is_none(), "kept beyond the recent ones");
    }

    /// Puts a read-closed readiness on `fd`'s current registration while its writer is alive:
    /// the registration is swapped for one on a pipe whose writer closed (a real hang-up),
    /// re-pointed at the live descriptor's key by duplicating the live descriptor over it.
    async fn forge_hang_up(fd: &PollFd) {
        let (dead_r, dead_w) = pipe();
        drop(dead_w);
        let dead = Arc::new(register(dead_r, Interest::READABLE).expect("register"));
        // Wait until the reactor has reported the hang-up on it.
        let guard = dead.readable().await.expect("readable");
        assert!(guard.ready().is_read_closed());
        drop(guard);
        // Point the hung-up registration's descriptor at the live pipe's read end: the
        // readiness stays closed, the reads now go to the live pipe and would block.
        let live = fd.registration();
        // SAFETY: dup2 onto a descriptor `dead` owns, replacing its open file atomically.
        let r = unsafe { libc::dup2(live.get_ref().as_raw_fd(), dead.get_ref().as_raw_fd()) };
        assert!(r >= 0);
        *fd.current.lock().expect("lock") = Some((dead, checkpoints()));
    }
}
