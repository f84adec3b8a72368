//! Safe wrappers of the `*at` system calls (and a few others) that [`super::unpack`] and
//! [`super::tree`] use: names are single components, relative to a directory descriptor, so no
//! path string is ever resolved against the host's tree.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The result of a call that returns -1 and sets `errno` on failure.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens the directory at `path` (a trusted host path: the caller's).
pub(in crate::images) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)?;
    Ok(OwnedFd::from(dir))
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`.
pub(in crate::images) fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and `dir` an open descriptor, both valid for the call.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    })?;
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The directory `name` in `dir`, not through a symbolic link (`ELOOP`, or `ENOTDIR` for
/// anything else that is not a directory).
pub(in crate::images) fn openat_dir(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// `mkdirat(dir, name, mode)` (the umask applies).
pub(in crate::images) fn mkdirat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and `dir` an open descriptor, both valid for the call.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

/// `mkfifoat(dir, name, mode)` (the umask applies).
pub(in crate::images) fn mkfifoat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and `dir` an open descriptor, both valid for the call.
    cvt(unsafe { libc::mkfifoat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

/// `unlinkat(dir, name, flags)`: `flags` 0 for a non-directory, `AT_REMOVEDIR` for an
/// empty directory.
pub(in crate::images) fn unlinkat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and `dir` an open descriptor, both valid for the call.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `symlinkat(target, dir, name)`: the link `name` in `dir`, holding `target` verbatim.
pub(in crate::images) fn symlinkat(
    target: &CStr,
    dir: BorrowedFd<'_>,
    name: &CStr,
) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and `dir` an open descriptor, all valid for
    // the call.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `linkat(old_dir, old_name, new_dir, new_name, 0)`: flags 0, so a symbolic link
/// `old_name` is linked itself, never followed.
pub(in crate::images) fn linkat(
    old_dir: BorrowedFd<'_>,
    old_name: &CStr,
    new_dir: BorrowedFd<'_>,
    new_name: &CStr,
) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated and both descriptors open, all valid for the
    // call.
    cvt(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old_name.as_ptr(),
            new_dir.as_raw_fd(),
            new_name.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// `fstatat(dir, name, flags)`.
pub(in crate::images) fn fstatat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated, `dir` an open descriptor and `st` writable room for
    // one `stat`, all valid for the call.
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// `fstat(fd)`.
pub(in crate::images) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `fd` is an open descriptor and `st` writable room for one `stat`.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// `fchown(fd, uid, gid)`.
pub(in crate::images) fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: fchown with an open descriptor and integer arguments.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

/// `fchownat(dir, name, uid, gid, flags)`.
pub(in crate::images) fn fchownat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    uid: u32,
    gid: u32,
    flags: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and `dir` an open descriptor, both valid for the call.
    cvt(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, flags) }).map(drop)
}

/// `fchmod(fd, mode)`.
pub(in crate::images) fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: fchmod with an open descriptor and an integer.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// `futimens(fd, times)`: access then modification time.
pub(in crate::images) fn futimens(
    fd: BorrowedFd<'_>,
    times: &[libc::timespec; 2],
) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor and `times` two readable timespecs.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

/// `utimensat(dir, name, times, flags)`: access then modification time.
pub(in crate::images) fn utimensat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    times: &[libc::timespec; 2],
    flags: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated, `dir` an open descriptor and `times` two readable
    // timespecs, all valid for the call.
    cvt(unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), times.as_ptr(), flags) }).map(drop)
}

/// The target of the symbolic link `name` in `dir`.
pub(in crate::images) fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<CString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: `name` is NUL-terminated, `dir` an open descriptor and `buf` writable for its
    // length, all valid for the call.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    // Negative (an error) fails the conversion.
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    if n >= buf.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    buf.truncate(n);
    CString::new(buf).map_err(|_| io::Error::other("symbolic link target with a NUL byte"))
}

/// The names in the directory `dir`, without `.` and `..`.
pub(in crate::images) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    // A new open file description: a duplicate would share (and move) `dir`'s offset.
    let fd = openat_dir(dir, c".")?;
    // SAFETY: `fd` is an open directory descriptor; on success the stream owns it.
    let stream = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if stream.is_null() {
        return Err(io::Error::last_os_error());
    }
    // Closed by the stream from now on.
    let _ = fd.into_raw_fd();
    let stream = DirStream(stream);
    let mut names = Vec::new();
    loop {
        // SAFETY: errno is thread-local; cleared, it tells the end of the stream from an
        // error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream.0` is an open directory stream, used by this thread only.
        let entry = unsafe { libc::readdir(stream.0) };
        if entry.is_null() {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(0) | None => Ok(names),
                Some(_) => Err(err),
            };
        }
        // SAFETY: readdir returned a valid entry, whose name is NUL-terminated and stays
        // valid until the next call on the stream; it is copied before that.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
}

/// An open directory stream, closed on drop.
struct DirStream(*mut libc::DIR);

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: the stream is open and closed only here; closedir also closes its
        // descriptor.
        unsafe { libc::closedir(self.0) };
    }
}

/// `renameat(dir, from, dir, to)`: replaces `to` (not through a link: the entry itself).
pub(in crate::images) fn renameat(dir: BorrowedFd<'_>, from: &CStr, to: &CStr) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated and `dir` an open descriptor, valid for the call.
    cvt(unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) })
        .map(drop)
}

/// Opens `path` (relative) in `root` as if `root` were `/`: symbolic links, absolute or with
/// `..`, resolve inside it and never outside (`openat2(RESOLVE_IN_ROOT)`), no magic link, no
/// other mount. `flags` without `O_CREAT`: this only opens what is there.
pub(in crate::images) fn open_in_root(
    root: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    // SAFETY: open_how is a plain C struct; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = u64::try_from((flags & !libc::O_CREAT) | libc::O_CLOEXEC).unwrap_or(0);
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
    // A rename anywhere on the system can make a RESOLVE_* lookup fail with EAGAIN; the man
    // page asks callers to retry.
    let mut last = io::Error::from_raw_os_error(libc::EAGAIN);
    for _ in 0..16 {
        // SAFETY: `path` is NUL-terminated and `how` a valid open_how whose size is passed; the
        // kernel only reads both.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if ret >= 0 {
            let fd = libc::c_int::try_from(ret).map_err(|_| io::Error::other("fd out of range"))?;
            // SAFETY: the kernel just returned this descriptor and nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EAGAIN) {
            break;
        }
    }
    Err(last)
}

/// The host path the open descriptor `fd` refers to (its `/proc/self/fd` link).
pub(in crate::images) fn fd_path(fd: BorrowedFd<'_>) -> io::Result<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}
