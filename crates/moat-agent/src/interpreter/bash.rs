//! The bash driver: `bash` from the sandbox's `PATH`, running `bash_driver.sh` in the shell itself
//! so that its state (working directory, variables, functions) persists.
//!
//! The driver's text goes on the command line (`-c`), so nothing in the sandbox's filesystem can be
//! swapped for it. Commands are lines of bash made only of `$'…'` literals, which the driver
//! evaluates to set its variables: no JSON parser is needed in bash.

use std::collections::HashMap;

/// The driver (see the comment at its top for the protocol).
const DRIVER: &str = include_str!("bash_driver.sh");

/// Program and arguments of a driver that reads commands from `cmd_fd` and writes frames to
/// `event_fd`.
pub fn launch(cmd_fd: i32, event_fd: i32) -> (&'static str, Vec<String>) {
    let args = vec![
        "--noprofile".to_string(),
        "--norc".to_string(),
        "-c".to_string(),
        DRIVER.to_string(),
        "moat-bash".to_string(),
        cmd_fd.to_string(),
        event_fd.to_string(),
    ];
    ("bash", args)
}

/// The command line that runs `code` with `env` exported for its duration; an error names a
/// variable that is not a shell identifier.
pub fn command(code: &str, env: &HashMap<String, String>) -> Result<Vec<u8>, String> {
    let mut vars: Vec<_> = env.iter().collect();
    vars.sort();
    let mut line = format!("__moat_code={}; __moat_env=(", quote(code));
    for (name, value) in vars {
        if !is_identifier(name) {
            return Err(format!(
                "env var name {name:?} is not valid in bash (letters, digits and _, not starting with a digit)"
            ));
        }
        line.push_str(&quote(name));
        line.push(' ');
        line.push_str(&quote(value));
        line.push(' ');
    }
    line.push_str(")\n");
    Ok(line.into_bytes())
}

/// `s` as a bash `$'…'` literal on one line: backslash, quote and control characters escaped.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("$'");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("a b"), "$'a b'");
        assert_eq!(quote("it's\\\n"), "$'it\\'s\\\\\\x0a'");
        assert_eq!(quote("é"), "$'é'");
        let env = [("A_1".to_string(), "x".to_string())].into();
        let line = command("echo", &env).expect("command");
        assert_eq!(line, b"__moat_code=$'echo'; __moat_env=($'A_1' $'x' )\n");
        let bad = [("1A".to_string(), "x".to_string())].into();
        assert!(command("echo", &bad).is_err());
    }
}
