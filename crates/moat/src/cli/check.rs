//! `moat check`: what this host supports, and what moat will use.

use std::fmt::Write as _;
use std::process::ExitCode;

use moat_jail::probe::{Finding, probe_all};

/// Prints the findings, the backend choice and the backends `moat serve` registers. Exits 0 when the native backend can run.
pub fn main() -> ExitCode {
    let mut findings = probe_all();
    findings.push(nofile_finding());
    // Writing to a String cannot fail; the text goes out in one piece at the end.
    let mut text = String::new();
    let width = findings.iter().map(|f| f.name.len()).max().unwrap_or(10);
    for f in &findings {
        let mark = if f.ok { "yes" } else { "no " };
        let _ = writeln!(text, "{:width$}  {mark}  {}", f.name, f.detail);
    }
    let ok = |name: &str| findings.iter().any(|f: &Finding| f.name == name && f.ok);
    text.push('\n');
    let native =
        ok("root") && ok("user namespaces") && ok("cgroups") && ok("seccomp") && ok(NOFILE);
    if native {
        let extras: Vec<&str> = ["landlock", "overlayfs"]
            .into_iter()
            .filter(|n| ok(n))
            .collect();
        let _ = writeln!(
            text,
            "moat will use: native backend (namespaces, seccomp{}{}, cgroups)",
            if extras.contains(&"landlock") {
                ", landlock"
            } else {
                ""
            },
            if extras.contains(&"overlayfs") {
                ", overlayfs templates"
            } else {
                ""
            }
        );
    } else {
        let _ = writeln!(
            text,
            "moat cannot run sandboxes here: the native backend needs root, user namespaces, cgroups, seccomp and a hard open-file limit of at least {}",
            moat_engine::host_limits::sandbox_nofile()
        );
    }
    let _ = writeln!(
        text,
        "moat serve registers: {} (default {}; a template may name its backend, `moat serve \
         --backend` sets the default)",
        super::serve::BACKENDS.join(", "),
        super::serve::DEFAULT_BACKEND
    );
    let runsc = findings.iter().find(|f| f.name == "runsc");
    let _ = writeln!(
        text,
        "gvisor backend: {}",
        match runsc {
            Some(f) if f.ok => format!(
                "available ({}; `moat run --backend gvisor`, templates with `\"backend\": \"gvisor\"`)",
                f.detail
            ),
            Some(f) => format!("unavailable: {}", f.detail),
            None => "unavailable".into(),
        }
    );
    let _ = writeln!(
        text,
        "microVM backend: {}",
        if ok("kvm") {
            "possible (not yet built)"
        } else {
            "unavailable on this host"
        }
    );
    if let Err(e) = super::output::print(&text) {
        if super::output::is_closed(&e) {
            return ExitCode::from(super::output::EXIT_OUTPUT_CLOSED);
        }
        eprintln!("moat: {e:#}");
        return ExitCode::FAILURE;
    }
    if native {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The name of the open-file limit's finding.
const NOFILE: &str = "open files";

/// Whether the hard `RLIMIT_NOFILE` lets every sandbox process have its own limit, and what to
/// set if not.
fn nofile_finding() -> Finding {
    use moat_engine::host_limits::{check_nofile, nofile};
    match nofile() {
        Ok(limit) => match check_nofile(limit) {
            Ok(()) => Finding {
                name: NOFILE,
                ok: true,
                detail: format!(
                    "soft {}, hard {} (moat serve raises the soft limit to the hard one)",
                    limit.soft, limit.hard
                ),
            },
            Err(why) => Finding {
                name: NOFILE,
                ok: false,
                detail: why,
            },
        },
        Err(e) => Finding {
            name: NOFILE,
            ok: false,
            detail: format!("reading RLIMIT_NOFILE: {e}"),
        },
    }
}
