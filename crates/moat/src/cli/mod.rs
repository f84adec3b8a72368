//! The subcommands of `moat`.

pub mod agent;
pub mod check;
pub mod data_dir_lock;
pub mod run;
pub mod serve;
pub mod terminal;
