//! The subcommands of `moat`.

pub mod agent;
pub mod check;
pub mod cp;
pub mod data_dir_lock;
pub mod keys;
pub mod remote;
pub mod run;
pub mod run_remote;
pub mod sandbox;
pub mod serve;
pub mod table;
pub mod template;
pub mod terminal;
