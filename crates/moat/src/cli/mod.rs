//! The subcommands of `moat`.

pub mod agent;
pub mod check;
pub mod cp;
pub mod data_dir_lock;
pub mod dockerignore;
pub mod job;
pub mod keys;
pub mod mcp;
pub mod network_args;
pub mod output;
pub mod remote;
pub mod run;
pub mod run_remote;
pub mod sandbox;
pub mod serve;
pub mod signal;
pub mod snapshot;
pub mod table;
pub mod template;
pub mod template_build;
pub mod terminal;

/// A single-threaded runtime for one command, or, when it cannot be made, the message printed
/// and `failure` as the exit status.
pub fn runtime(
    failure: std::process::ExitCode,
) -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("moat: starting the runtime: {e}");
            failure
        })
}
