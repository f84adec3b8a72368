//! `moat check`: what this host supports, and what moat will use.

use std::process::ExitCode;

use moat_jail::probe::{Finding, probe_all};

/// Prints the findings and the backend choice. Exits 0 when the native backend can run.
pub fn main() -> ExitCode {
    let findings = probe_all();
    let width = findings.iter().map(|f| f.name.len()).max().unwrap_or(10);
    for f in &findings {
        let mark = if f.ok { "yes" } else { "no " };
        println!("{:width$}  {mark}  {}", f.name, f.detail);
    }
    let ok = |name: &str| findings.iter().any(|f: &Finding| f.name == name && f.ok);
    println!();
    let native = ok("root") && ok("user namespaces") && ok("cgroups") && ok("seccomp");
    if native {
        let extras: Vec<&str> = ["landlock", "overlayfs"]
            .into_iter()
            .filter(|n| ok(n))
            .collect();
        println!(
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
        println!(
            "moat cannot run sandboxes here: the native backend needs root, user namespaces, cgroups and seccomp"
        );
    }
    println!(
        "gVisor backend: {}",
        if ok("runsc") {
            "available (not yet used by moat)"
        } else {
            "unavailable"
        }
    );
    println!(
        "microVM backend: {}",
        if ok("kvm") {
            "possible (not yet built)"
        } else {
            "unavailable on this host"
        }
    );
    if native {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
