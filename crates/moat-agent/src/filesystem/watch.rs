//! Directory watchers on inotify.
//!
//! One inotify instance per watcher. A recursive watcher adds a watch for every subdirectory at
//! the start and for each new one as it appears (created or moved in), and drops the watches of
//! a subdirectory that is moved away. Events map as upstream's (fsnotify's) do: create and
//! moved-to → CREATE, modify → WRITE, delete → REMOVE, moved-from → RENAME, attrib → CHMOD.
//! Events about a watched directory itself (`*_SELF`) are not reported: its parent reports them,
//! and the watched root going away ends the watcher.
//!
//! A new subdirectory is watched when its CREATE event is read; anything created inside it before
//! that moment produces no event of its own (inotify has no way to watch a tree atomically).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use moat_proto::filesystem::{EntryInfo, EventType, FilesystemEvent};
use tokio::io::Interest;

use super::creds::blocking_as;
use super::entry::Names;
use super::{entry, ops, paths, sys};
use crate::pollfd::{Direction, PollFd};
use crate::rpc::{Code, RpcError};
use crate::users::User;

/// Most watchers (streams and polled ones together) the agent keeps at once; one more is
/// `resource_exhausted`.
pub const MAX_WATCHERS: usize = 256;

/// Most directories one recursive watcher watches. More at the start is `resource_exhausted`;
/// directories that appear later beyond it are not watched.
pub const MAX_WATCHED_DIRS: usize = 10_000;

/// Superblock magics of network and user-space filesystems, refused without
/// `allowNetworkMounts`: NFS, CIFS, SMB, SMB2, FUSE.
const NETWORK_FS_MAGICS: [u32; 5] = [0x6969, 0xFF53_4D42, 0x517B, 0xFE53_4D42, 0x6573_5546];

const WATCH_MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// What to watch.
#[derive(Debug, Clone)]
pub(crate) struct WatchSpec {
    pub path: String,
    pub recursive: bool,
    pub include_entry: bool,
    pub allow_network_mounts: bool,
}

/// A slot in the agent-wide watcher count, given back on drop.
#[derive(Debug)]
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Slot {
    pub(crate) fn take(count: &Arc<AtomicUsize>) -> Result<Slot, RpcError> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_WATCHERS).then_some(n + 1)
            })
            .map_err(|_| {
                RpcError::new(
                    Code::ResourceExhausted,
                    format!("too many watchers (at most {MAX_WATCHERS}); remove some first"),
                )
            })?;
        Ok(Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open watcher.
pub(crate) struct Watcher {
    fd: PollFd,
    root: String,
    recursive: bool,
    include_entry: bool,
    user: User,
    /// Watch descriptor → directory relative to the root ("" for the root).
    dirs: HashMap<i32, String>,
    root_wd: i32,
    buf: Vec<u8>,
    _slot: Slot,
}

/// Adds a watch on `path` to inotify instance `fd`. `follow` is false for subdirectories found by
/// walking, so a directory swapped for a symlink meanwhile is not followed.
fn add_watch(fd: RawFd, path: &str, follow: bool) -> io::Result<i32> {
    let c = sys::cstring(path)?;
    let mask = if follow {
        WATCH_MASK
    } else {
        WATCH_MASK | libc::IN_DONT_FOLLOW
    };
    // SAFETY: `fd` is an inotify descriptor kept open by the caller; `c` is NUL-terminated.
    let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) };
    if wd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(wd)
    }
}

/// Watches `rel` (relative to `root`) and, when `recursive`, every directory below it; returns
/// the new watch descriptors with their relative paths. Runs as the user. Directories that
/// vanish or cannot be read meanwhile are skipped; going over `limit` directories is an error.
fn watch_tree(
    fd: RawFd,
    root: &str,
    rel: &str,
    recursive: bool,
    limit: usize,
) -> Result<Vec<(i32, String)>, RpcError> {
    let mut out = Vec::new();
    let mut pending = vec![rel.to_string()];
    while let Some(rel) = pending.pop() {
        if out.len() >= limit {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("{root}: more than {MAX_WATCHED_DIRS} directories to watch"),
            ));
        }
        let full = paths::join(root, &rel);
        let wd = match add_watch(fd, &full, rel.is_empty()) {
            Ok(wd) => wd,
            Err(e) if !rel.is_empty() => {
                tracing::debug!(path = %full, error = %e, "not watching subdirectory");
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                return Err(RpcError::new(
                    Code::ResourceExhausted,
                    format!("{full}: the kernel's inotify watch limit is reached"),
                ));
            }
            Err(e) => return Err(ops::lookup_error(&e, &full)),
        };
        out.push((wd, rel.clone()));
        if !recursive {
            continue;
        }
        let Ok(dir) = ops::open_path(&full) else {
            continue;
        };
        let Ok(names) = sys::read_dir_names(dir.as_fd()) else {
            continue;
        };
        for name in names {
            let is_dir = sys::fstatat(dir.as_fd(), &name, libc::AT_SYMLINK_NOFOLLOW)
                .is_ok_and(|st| sys::file_type(st.st_mode) == libc::S_IFDIR);
            if is_dir {
                pending.push(paths::join(&rel, &entry::name_text(&name)));
            }
        }
    }
    Ok(out)
}

impl Watcher {
    /// Validates `spec.path` (absolute and clean) as `user` and starts watching it.
    pub(crate) async fn open(user: &User, spec: WatchSpec, slot: Slot) -> Result<Self, RpcError> {
        let path = spec.path.clone();
        let recursive = spec.recursive;
        let allow_network = spec.allow_network_mounts;
        let (fd, dirs) = blocking_as(user, move || {
            let dir = ops::open_path(&path)?;
            let st = sys::fstat(dir.as_fd()).map_err(|e| RpcError::from_io(&e, &path))?;
            if sys::file_type(st.st_mode) != libc::S_IFDIR {
                return Err(RpcError::new(
                    Code::InvalidArgument,
                    format!("path is not a directory: {path}"),
                ));
            }
            let magic = sys::fs_magic(dir.as_fd()).map_err(|e| RpcError::from_io(&e, &path))?;
            if !allow_network && NETWORK_FS_MAGICS.contains(&magic) {
                return Err(RpcError::new(
                    Code::InvalidArgument,
                    format!("cannot watch a path on a network filesystem: {path}"),
                ));
            }
            // SAFETY: inotify_init1 takes flags only.
            let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
            if raw < 0 {
                let e = io::Error::last_os_error();
                return Err(if e.raw_os_error() == Some(libc::EMFILE) {
                    RpcError::new(
                        Code::ResourceExhausted,
                        "the kernel's inotify instance limit is reached",
                    )
                } else {
                    RpcError::from_io(&e, "inotify_init1")
                });
            }
            // SAFETY: a fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let dirs = watch_tree(fd.as_raw_fd(), &path, "", recursive, MAX_WATCHED_DIRS)?;
            Ok((fd, dirs))
        })
        .await?;
        let root_wd = dirs.first().map_or(-1, |(wd, _)| *wd);
        let fd = PollFd::new(fd, Interest::READABLE)
            .map_err(|e| RpcError::from_io(&e, "registering the inotify descriptor"))?;
        Ok(Watcher {
            fd,
            root: spec.path,
            recursive: spec.recursive,
            include_entry: spec.include_entry,
            user: user.clone(),
            dirs: dirs.into_iter().collect(),
            root_wd,
            buf: vec![0u8; 64 * 1024],
            _slot: slot,
        })
    }

    /// Waits for the next batch of events; `None` once the watched directory is gone.
    pub(crate) async fn next_batch(&mut self) -> Result<Option<Vec<FilesystemEvent>>, RpcError> {
        loop {
            if !self.dirs.contains_key(&self.root_wd) {
                return Ok(None);
            }
            let buf = &mut self.buf;
            let read = self
                .fd
                .io(Direction::Read, |fd| {
                    // SAFETY: `buf` is writable for its length; `fd` is the inotify descriptor.
                    let n =
                        unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                })
                .await;
            let n = match read {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RpcError::from_io(&e, "reading inotify events")),
            };
            let events = self.parse(n);
            let events = self.post_process(events).await?;
            if !events.is_empty() {
                return Ok(Some(events));
            }
        }
    }

    /// Decodes `n` bytes of raw inotify events into (type, relative name, is-dir) triples,
    /// updating the watch table for removed watches and moved-away directories.
    fn parse(&mut self, n: usize) -> Vec<Raw> {
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut out = Vec::new();
        let mut off = 0;
        while off + header <= n {
            // SAFETY: the kernel wrote a whole inotify_event header at `off` (checked against
            // `n`); read_unaligned copes with any alignment of the byte buffer.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(self.buf[off..].as_ptr().cast()) };
            let name_start = off + header;
            let name_end = (name_start + ev.len as usize).min(n);
            let raw_name = &self.buf[name_start..name_end];
            let name_len = raw_name
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(raw_name.len());
            let name = String::from_utf8_lossy(&raw_name[..name_len]).into_owned();
            off = name_end;
            let mask = ev.mask;
            if mask & libc::IN_Q_OVERFLOW != 0 {
                tracing::warn!(root = %self.root, "inotify queue overflowed; events were lost");
                continue;
            }
            if mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&ev.wd);
                continue;
            }
            if name.is_empty() {
                // An event about a watched directory itself.
                continue;
            }
            let Some(dir) = self.dirs.get(&ev.wd) else {
                continue;
            };
            let rel = paths::join(dir, &name);
            let is_dir = mask & libc::IN_ISDIR != 0;
            let ty = if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                EventType::Create
            } else if mask & libc::IN_MODIFY != 0 {
                EventType::Write
            } else if mask & libc::IN_DELETE != 0 {
                EventType::Remove
            } else if mask & libc::IN_MOVED_FROM != 0 {
                EventType::Rename
            } else if mask & libc::IN_ATTRIB != 0 {
                EventType::Chmod
            } else {
                continue;
            };
            if is_dir && matches!(ty, EventType::Rename | EventType::Remove) {
                self.forget_subtree(&rel);
            }
            out.push(Raw { ty, rel, is_dir });
        }
        out
    }

    /// Stops watching directory `rel` and everything below it (moved away or deleted: later
    /// events from those watches would carry stale names).
    fn forget_subtree(&mut self, rel: &str) {
        let prefix = format!("{rel}/");
        let gone: Vec<i32> = self
            .dirs
            .iter()
            .filter(|(_, d)| d.as_str() == rel || d.starts_with(&prefix))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            // SAFETY: the inotify descriptor is open; removing an already-gone watch fails
            // harmlessly with EINVAL.
            self.fd
                .with_fd(|fd| unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) });
        }
    }

    /// Watches new subdirectories (recursive watchers) and adds entries (`includeEntry`), as the
    /// user, then builds the wire events.
    async fn post_process(&mut self, raw: Vec<Raw>) -> Result<Vec<FilesystemEvent>, RpcError> {
        if raw.is_empty() {
            return Ok(Vec::new());
        }
        let new_dirs: Vec<String> = if self.recursive {
            raw.iter()
                .filter(|r| r.is_dir && r.ty == EventType::Create)
                .map(|r| r.rel.clone())
                .collect()
        } else {
            Vec::new()
        };
        let want_entries: Vec<String> = if self.include_entry {
            raw.iter()
                .filter(|r| {
                    matches!(
                        r.ty,
                        EventType::Create | EventType::Write | EventType::Chmod
                    )
                })
                .map(|r| r.rel.clone())
                .collect()
        } else {
            Vec::new()
        };
        if new_dirs.is_empty() && want_entries.is_empty() {
            return Ok(raw.into_iter().map(Raw::into_event).collect());
        }
        // Its number stays the same until the next read: `self` is borrowed until then.
        let fd = self.fd.with_fd(|fd| fd.as_raw_fd());
        let root = self.root.clone();
        let room = MAX_WATCHED_DIRS.saturating_sub(self.dirs.len());
        // The inotify descriptor stays open across the await: `self` owns it and is borrowed.
        let (added, entries) = blocking_as(&self.user, move || {
            let mut added = Vec::new();
            for rel in new_dirs {
                let room = room.saturating_sub(added.len());
                match watch_tree(fd, &root, &rel, true, room) {
                    Ok(mut wds) => added.append(&mut wds),
                    Err(e) => tracing::warn!(path = %rel, error = %e, "not watching new directory"),
                }
            }
            let mut names = Names::default();
            let mut entries: HashMap<String, EntryInfo> = HashMap::new();
            for rel in want_entries {
                let full = paths::join(&root, &rel);
                if let Ok((dir, name)) = ops::open_parent(&full)
                    && let Ok(info) = entry::entry_at(dir.as_fd(), &name, &full, &mut names)
                {
                    entries.insert(rel, info);
                }
            }
            Ok((added, entries))
        })
        .await?;
        self.dirs.extend(added);
        Ok(raw
            .into_iter()
            .map(|r| {
                let entry = match r.ty {
                    EventType::Create | EventType::Write | EventType::Chmod => {
                        entries.get(&r.rel).cloned()
                    }
                    _ => None,
                };
                let mut ev = r.into_event();
                ev.entry = entry;
                ev
            })
            .collect())
    }
}

/// A decoded event before the wire form.
struct Raw {
    ty: EventType,
    rel: String,
    is_dir: bool,
}

impl Raw {
    fn into_event(self) -> FilesystemEvent {
        FilesystemEvent {
            name: self.rel,
            r#type: self.ty as i32,
            entry: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watcher_slots_are_bounded_and_given_back() {
        let count = Arc::new(AtomicUsize::new(0));
        let mut slots: Vec<Slot> = (0..MAX_WATCHERS)
            .map(|_| Slot::take(&count).expect("slot"))
            .collect();
        let over = Slot::take(&count).map(drop).map_err(|e| e.code);
        assert_eq!(over, Err(Code::ResourceExhausted));
        slots.pop();
        assert!(Slot::take(&count).is_ok());
        drop(slots);
        assert_eq!(count.load(Ordering::Acquire), 0);
    }
}
