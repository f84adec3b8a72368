//! The signal named in a command's end status, which the agent writes as Go does
//! (`signal: killed`): what `moat run` and the remote commands turn into exit status 128+N.

/// The signal named in a Go-style status (`signal: killed`).
pub fn signal_number(status: &str) -> Option<i32> {
    let name = status.strip_prefix("signal: ")?;
    let name = name.trim_end_matches(" (core dumped)");
    Some(match name {
        "hangup" => libc::SIGHUP,
        "interrupt" => libc::SIGINT,
        "quit" => libc::SIGQUIT,
        "illegal instruction" => libc::SIGILL,
        "trace/breakpoint trap" => libc::SIGTRAP,
        "aborted" => libc::SIGABRT,
        "bus error" => libc::SIGBUS,
        "floating point exception" => libc::SIGFPE,
        "killed" => libc::SIGKILL,
        "user defined signal 1" => libc::SIGUSR1,
        "segmentation fault" => libc::SIGSEGV,
        "user defined signal 2" => libc::SIGUSR2,
        "broken pipe" => libc::SIGPIPE,
        "alarm clock" => libc::SIGALRM,
        "terminated" => libc::SIGTERM,
        "CPU time limit exceeded" => libc::SIGXCPU,
        "file size limit exceeded" => libc::SIGXFSZ,
        "bad system call" => libc::SIGSYS,
        other => other.strip_prefix("signal ").and_then(|n| n.parse().ok())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_map_back_to_numbers() {
        assert_eq!(signal_number("signal: killed"), Some(9));
        assert_eq!(
            signal_number("signal: segmentation fault (core dumped)"),
            Some(11)
        );
        assert_eq!(signal_number("signal: signal 40"), Some(40));
        assert_eq!(signal_number("exit status 1"), None);
    }
}
