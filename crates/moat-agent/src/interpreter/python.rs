//! The Python driver: `python3` from the sandbox's `PATH`, running `python_driver.py`.
//!
//! The driver's text goes on the command line (`-c` plus an argument) rather than into a file:
//! nothing in the sandbox's filesystem can be swapped for it, and it needs no writable place.

use std::collections::HashMap;

use serde_json::json;

/// The driver (see the comment at its top for the protocol).
const DRIVER: &str = include_str!("python_driver.py");

/// What `-c` runs: the driver, compiled under a file name of its own so that tracebacks can leave
/// its frames out.
const BOOTSTRAP: &str = "import sys; exec(compile(sys.argv.pop(1), '<moat-driver>', 'exec'))";

/// Program and arguments of a driver that reads commands from `cmd_fd` and writes frames to
/// `event_fd`, leaving out result entries over `entry_limit` bytes.
pub fn launch(cmd_fd: i32, event_fd: i32, entry_limit: usize) -> (&'static str, Vec<String>) {
    // -u: unbuffered stdout and stderr, so output streams as it is written.
    let args = ["-u", "-c", BOOTSTRAP, DRIVER]
        .into_iter()
        .map(str::to_string)
        .chain([
            cmd_fd.to_string(),
            event_fd.to_string(),
            entry_limit.to_string(),
        ])
        .collect();
    ("python3", args)
}

/// The command line that runs `code` with `env` set for its duration.
pub fn command(code: &str, env: &HashMap<String, String>) -> Vec<u8> {
    json_command(code, env)
}

/// `{"code": …, "env": {…}}` and a newline (the command format of the Python and JavaScript
/// drivers).
pub fn json_command(code: &str, env: &HashMap<String, String>) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!({"code": code, "env": env})).unwrap_or_default();
    line.push(b'\n');
    line
}
