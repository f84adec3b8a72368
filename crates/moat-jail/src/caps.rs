//! Dropping Linux capabilities. Every function here is async-signal-safe (raw system calls only), so
//! it may run between `fork` and `exec`.

use std::io;

use crate::sys::{cvt, cvt_int};

/// Highest capability number the running kernel knows (`/proc/sys/kernel/cap_last_cap`).
///
/// Reads a file, so call it before forking.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// The capabilities up to `last_cap` in the calling thread's bounding set, as a mask (bit N:
/// capability N). The set can only shrink, so what is not in it now never comes back.
pub fn bounding_set(last_cap: u32) -> u64 {
    (0..=last_cap.min(63))
        // SAFETY: prctl with integer arguments only; an unknown capability answers EINVAL.
        .filter(|&cap| unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) } == 1)
        .fold(0, |mask, cap| mask | 1 << cap)
}

/// Drops the capabilities of `mask` (see [`bounding_set`]) from the bounding set, which leaves
/// it empty when `mask` is all it held: no later `exec` can regain a capability. One system
/// call per capability, so only those present are named (under gVisor each call is a round
/// trip through the sentry). Needs `CAP_SETPCAP`.
pub fn drop_bounding(mask: u64) -> io::Result<()> {
    for cap in (0..64u32).filter(|c| mask & (1 << c) != 0) {
        // SAFETY: prctl with integer arguments only; no memory is passed.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r == -1 {
            let err = io::Error::last_os_error();
            // EINVAL: the kernel does not know this capability; nothing to drop.
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(err);
            }
        }
    }
    Ok(())
}

/// Clears the ambient set and turns keep-caps off.
pub fn clear_ambient() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r == -1 {
        let err = io::Error::last_os_error();
        // EINVAL: a kernel without ambient capabilities (gVisor's sentry), so there are none.
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
    // SAFETY: prctl with integer arguments only.
    cvt_int(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) })?;
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// Empties the effective, permitted and inheritable sets of the calling thread.
pub fn clear_all() -> io::Result<()> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and data are valid, properly laid out (version 3 takes two data elements)
    // and live for the duration of the call.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    })?;
    Ok(())
}

/// The effective capability mask of the calling thread (for tests and audits).
pub fn effective() -> io::Result<u64> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and data are valid and writable for the duration of the call.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    })?;
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}
