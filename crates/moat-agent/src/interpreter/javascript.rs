//! The JavaScript driver: `node` from the sandbox's `PATH`, running `javascript_driver.js`; it also
//! serves TypeScript contexts, stripping types first where the installed node can.
//!
//! The driver's text goes on the command line (`-e`), so nothing in the sandbox's filesystem can be
//! swapped for it.

use std::collections::HashMap;

/// The driver (see the comment at its top for the protocol).
const DRIVER: &str = include_str!("javascript_driver.js");

/// Program and arguments of a driver for `language` (`javascript` or `typescript`) that reads
/// commands from `cmd_fd` and writes frames to `event_fd`.
pub fn launch(
    cmd_fd: i32,
    event_fd: i32,
    entry_limit: usize,
    language: &str,
) -> (&'static str, Vec<String>) {
    let args = vec![
        "-e".to_string(),
        DRIVER.to_string(),
        "--".to_string(),
        cmd_fd.to_string(),
        event_fd.to_string(),
        entry_limit.to_string(),
        language.to_string(),
    ];
    ("node", args)
}

/// The command line that runs `code` with `env` set for its duration.
pub fn command(code: &str, env: &HashMap<String, String>) -> Vec<u8> {
    super::python::json_command(code, env)
}
