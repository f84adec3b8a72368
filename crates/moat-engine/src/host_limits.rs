//! The host's limit on open files (`RLIMIT_NOFILE`), which both the server and the sandboxes
//! depend on. The server holds a few descriptors per sandbox and one per connection, so it
//! raises its soft limit to the hard one at start. Every process in a sandbox gets a limit of
//! [`sandbox_nofile`] (soft and hard); without privilege over the host no process can set a
//! hard limit above the one it inherited, so below that every command in a sandbox would fail.

use std::io;

use moat_proto::agent_config::UserLimits;

/// A hard limit that leaves room for everything; what the messages suggest.
pub const RECOMMENDED_NOFILE: u64 = 1 << 20;

/// The open-file limit of every process in a sandbox.
pub fn sandbox_nofile() -> u64 {
    UserLimits::default().nofile
}

/// This process's `RLIMIT_NOFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit: what is enforced.
    pub soft: u64,
    /// The hard limit: how far the soft one may be raised.
    pub hard: u64,
}

/// This process's open-file limit now.
pub fn nofile() -> io::Result<NofileLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(NofileLimit {
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// Whether `limit` lets sandboxes run: an error saying what to set when its hard limit is
/// below [`sandbox_nofile`].
pub fn check_nofile(limit: NofileLimit) -> Result<(), String> {
    let needed = sandbox_nofile();
    if limit.hard >= needed {
        return Ok(());
    }
    Err(format!(
        "the hard limit on open files (RLIMIT_NOFILE) is {}, below the {needed} every sandbox \
         process gets, so every command in a sandbox would fail; raise it to at least {needed} \
         ({RECOMMENDED_NOFILE} recommended): `ulimit -Hn {RECOMMENDED_NOFILE}` in the shell that \
         starts moat, `LimitNOFILE={RECOMMENDED_NOFILE}` in its systemd unit, or `nofile` in \
         /etc/security/limits.conf",
        limit.hard
    ))
}

/// Checks the limit (see [`check_nofile`]) and raises the soft limit to the hard one (at most
/// the kernel's `fs.nr_open`). Returns the limit in force afterwards.
pub fn raise_nofile() -> Result<NofileLimit, String> {
    let limit = nofile().map_err(|e| format!("reading RLIMIT_NOFILE: {e}"))?;
    check_nofile(limit)?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(limit.hard);
    let target = limit.hard.min(nr_open);
    if target <= limit.soft {
        return Ok(limit);
    }
    let lim = libc::rlimit {
        rlim_cur: target,
        rlim_max: limit.hard,
    };
    // SAFETY: `lim` is a valid rlimit; a soft limit up to the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(format!(
            "raising the soft RLIMIT_NOFILE from {} to {target}: {}",
            limit.soft,
            io::Error::last_os_error()
        ));
    }
    Ok(NofileLimit {
        soft: target,
        hard: limit.hard,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_low_hard_limit_is_refused_with_what_to_set() {
        assert!(
            check_nofile(NofileLimit {
                soft: 1024,
                hard: 4096
            })
            .is_ok()
        );
        let e = check_nofile(NofileLimit {
            soft: 1024,
            hard: 1024,
        })
        .unwrap_err();
        assert!(
            e.contains("RLIMIT_NOFILE") && e.contains("LimitNOFILE="),
            "{e}"
        );
    }
}
