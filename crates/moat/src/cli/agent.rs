//! `moat agent`: becomes the in-sandbox agent.

/// Runs the agent; never returns.
pub fn main() -> ! {
    moat_agent::agent_main()
}
