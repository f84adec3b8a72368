//! The `moat` binary: command-line tool, server and (hidden `agent` subcommand) in-sandbox agent.

fn main() {
    println!("moat");
}
