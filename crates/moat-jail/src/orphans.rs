//! Sandboxes left running with no one to end them.
//!
//! A sandbox ends with its owner: a server's agent exits when the server's end of its channel
//! closes, and a `moat run` has a guardian. A sandbox that was paused (its cgroup frozen) when
//! its server was killed cannot see that: its processes stay frozen, holding memory and their
//! host uids, and the next server's sweep of empty cgroups passes them by.
//!
//! The uid-range lock tells such a sandbox apart: every live owner holds its sandbox's slot
//! (see [`crate::idmap`]), and a sandbox kept across a restart has a marker ([`crate::kept`]).
//! A sandbox whose processes run as the ids of a slot that nobody holds and nobody marked has
//! no owner left, on any server of this host.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::cgroup::{Layout, SandboxCgroup};
use crate::idmap::{BASE, IdRange, RANGE, SLOTS};

/// How long a reap waits for the killed processes to leave their cgroups.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(5);

/// Kills and removes every sandbox of this host that no live process owns (see the module's
/// documentation); returns their names. A sandbox whose owner is alive, or which is marked
/// kept, or whose processes run as no range's ids, is left alone.
pub fn reap(layout: &Layout, slots_dir: &Path) -> Vec<String> {
    let names: BTreeSet<String> = layout
        .bases()
        .iter()
        .filter_map(|base| fs::read_dir(base).ok())
        .flat_map(|entries| entries.flatten())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let mut reaped = Vec::new();
    for name in names {
        let Some(cgroup) = SandboxCgroup::existing(layout, &name) else {
            continue;
        };
        let Some(slot) = cgroup.pids().into_iter().find_map(slot_of) else {
            continue;
        };
        // Held while it is reaped, so that no new sandbox takes these ids meanwhile.
        let Ok(Some(_held)) = IdRange::try_hold(slots_dir, slot) else {
            continue;
        };
        if crate::kept::is_marked(slots_dir, slot) {
            continue;
        }
        cgroup.kill_all();
        if cgroup.wait_empty(EMPTY_TIMEOUT) {
            let _ = cgroup.remove();
        }
        reaped.push(name);
    }
    reaped
}

/// The uid-range slot whose ids process `pid` runs as (its real uid), if any.
fn slot_of(pid: i32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let slot = uid.checked_sub(BASE)? / RANGE;
    (slot < SLOTS).then_some(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_range_s_ids_name_a_slot() {
        // This test's own process runs as no range's ids.
        assert_eq!(slot_of(std::process::id() as i32), None);
        assert_eq!(slot_of(-1), None);
    }
}
