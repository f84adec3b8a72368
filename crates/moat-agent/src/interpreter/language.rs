//! The languages contexts run, their names on the wire (`shared/reference/e2b-wire.md` §9.2) and
//! the driver of each.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::limits::MAX_RESULT_ENTRY_BYTES;
use super::{bash, javascript, python};

/// A language of a context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Language {
    /// Python 3 (`python3`).
    Python,
    /// JavaScript on `node`.
    JavaScript,
    /// TypeScript on the JavaScript driver (types stripped where node can).
    TypeScript,
    /// A persistent bash shell.
    Bash,
}

/// The names accepted, for error messages.
const SUPPORTED: &str = "python, javascript (js), typescript (ts), bash";

impl Language {
    /// The language a request names: trimmed, case-insensitive, `js` and `ts` as aliases. An
    /// error message names the supported ones.
    pub fn parse(raw: &str) -> Result<Language, String> {
        let name = raw.trim().to_ascii_lowercase();
        match name.as_str() {
            "python" => Ok(Language::Python),
            "javascript" | "js" => Ok(Language::JavaScript),
            "typescript" | "ts" => Ok(Language::TypeScript),
            "bash" => Ok(Language::Bash),
            _ => Err(format!(
                "language {raw:?} is not supported; supported languages: {SUPPORTED}"
            )),
        }
    }

    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::TypeScript => "typescript",
            Language::Bash => "bash",
        }
    }

    /// The program that runs the driver.
    pub fn program(self) -> &'static str {
        match self {
            Language::Python => "python3",
            Language::JavaScript | Language::TypeScript => "node",
            Language::Bash => "bash",
        }
    }

    /// Program and arguments of the driver, talking on `cmd_fd` and `event_fd`.
    pub fn launch(self, cmd_fd: i32, event_fd: i32) -> (&'static str, Vec<String>) {
        match self {
            Language::Python => python::launch(cmd_fd, event_fd, MAX_RESULT_ENTRY_BYTES),
            Language::JavaScript | Language::TypeScript => {
                javascript::launch(cmd_fd, event_fd, MAX_RESULT_ENTRY_BYTES, self.name())
            }
            Language::Bash => bash::launch(cmd_fd, event_fd),
        }
    }

    /// The command line for the driver that runs `code` with `env`; an error says why the
    /// request cannot run in this language.
    pub fn command(self, code: &str, env: &HashMap<String, String>) -> Result<Vec<u8>, String> {
        match self {
            Language::Python => Ok(python::command(code, env)),
            Language::JavaScript | Language::TypeScript => Ok(javascript::command(code, env)),
            Language::Bash => bash::command(code, env),
        }
    }

    /// Checks that the driver's program is in `path` (a `PATH` value); the error is the message
    /// for the client.
    pub fn check_installed(self, path: &str) -> Result<(), String> {
        let program = self.program();
        let found = path.split(':').filter(|d| !d.is_empty()).any(|dir| {
            std::fs::metadata(Path::new(dir).join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
        if found {
            Ok(())
        } else {
            Err(format!(
                "{} contexts need `{program}`, which is not installed in this sandbox (not found in PATH={path})",
                self.name()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(Language::parse(" Python "), Ok(Language::Python));
        assert_eq!(Language::parse("JS"), Ok(Language::JavaScript));
        assert_eq!(Language::parse("ts"), Ok(Language::TypeScript));
        assert_eq!(Language::parse("bash"), Ok(Language::Bash));
        let err = Language::parse("r").expect_err("r");
        assert!(
            err.contains("not supported") && err.contains("python"),
            "{err}"
        );
        assert_eq!(Language::TypeScript.program(), "node");
    }

    #[test]
    fn installed_programs() {
        assert!(
            Language::Bash
                .check_installed("/nonexistent:/bin:/usr/bin")
                .is_ok()
        );
        let err = Language::Bash
            .check_installed("/nonexistent")
            .expect_err("none");
        assert!(err.contains("`bash`"), "{err}");
    }
}
