//! The subcommands of `moat`.

pub mod agent;
pub mod check;
pub mod run;
pub mod serve;
pub mod terminal;
