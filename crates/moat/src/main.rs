//! The `moat` binary: command-line tool, server (`serve`), and (hidden `agent` subcommand) the in-sandbox agent.

// Standard output goes through `cli::output`, which reports a closed pipe instead of panicking.
#![deny(clippy::print_stdout)]

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Run untrusted code in isolated, disposable sandboxes, fast.
#[derive(Debug, Parser)]
#[command(name = "moat", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command in a new sandbox, attached to this terminal, then destroy the sandbox.
    Run(Box<cli::run::RunArgs>),
    /// Serve the HTTP API (`/v1`, `/metrics`, `/healthz`, `/readyz`); listens on 127.0.0.1:7070 by default.
    Serve(cli::serve::ServeArgs),
    /// Show what this host supports and what moat will use.
    Check,
    /// Sandboxes on a moat server ($MOAT_URL): create, ls, get, exec, cp, rm, timeout, pause,
    /// resume, fork.
    Sandbox(cli::sandbox::SandboxArgs),
    /// Snapshots on a moat server: create, ls, get, rm.
    Snapshot(cli::snapshot::SnapshotArgs),
    /// Asynchronous jobs on a moat server: submit, ls, get, logs, outputs, cancel, rm.
    Job(cli::job::JobArgs),
    /// An MCP server on standard input and output, whose tools run in sandboxes of a moat
    /// server ($MOAT_URL, $MOAT_API_KEY).
    Mcp(cli::mcp::McpArgs),
    /// Templates on a moat server: create, ls, get, rm.
    Template(cli::template::TemplateArgs),
    /// API keys on a moat server (needs an admin key): create, ls, revoke.
    Keys(cli::keys::KeysArgs),
    /// The in-sandbox agent (started by moat itself as a sandbox's first process).
    #[command(hide = true)]
    Agent,
}

fn main() -> ExitCode {
    // The agent path comes first and touches nothing else: it runs as PID 1 inside a sandbox.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("agent")) {
        cli::agent::main();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) if cli::run_remote::wanted() => cli::run_remote::main(*args),
        Command::Run(args) => cli::run::main(*args),
        Command::Serve(args) => cli::serve::main(args),
        Command::Check => cli::check::main(),
        Command::Sandbox(args) => cli::sandbox::main(args),
        Command::Snapshot(args) => cli::snapshot::main(args),
        Command::Job(args) => cli::job::main(args),
        Command::Mcp(args) => cli::mcp::main(args),
        Command::Template(args) => cli::template::main(args),
        Command::Keys(args) => cli::keys::main(args),
        Command::Agent => cli::agent::main(),
    }
}
