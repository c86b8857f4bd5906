//! Which copy wins, and what a recovering copy must pull.
//!
//! *Settling* (after a failed write, and at a writer's open): per chunk, the counted members'
//! versions are prefixes of one chain (I7), so the highest holds every acknowledged mutation; it is
//! installed on the others, **make identical, not newer-wins**: an install applies only if the
//! target is still at the version the plan saw.
//!
//! *Recovery* (backfill, restart, join): a recovering copy pulls every chunk whose version differs
//! from its source's, every chunk it holds that the source lacks (to delete), and every chunk that
//! was dirty when it booted (a power cut may have left its header and data from different writes).

use crate::version::Version;
use std::collections::{BTreeMap, BTreeSet};

/// One copy to make: `node` installs the winner's content at `version` if it still has `expected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Install {
    pub node: u64,
    pub expected: Version,
    pub version: Version,
}

/// The settle plan for one chunk: `versions` are each counted member's version, `active` the
/// members whose copy may win. Returns the member whose copy wins and the installs that make the
/// others identical to it (`version` is the winner's unless `restamp` gives a new one, which then
/// goes to every member, the winner too).
///
/// Only active copies win: they hold every acknowledged write (each was counted for it), and a
/// joining copy may still hold a leftover of an earlier life (a write that failed while it was a
/// member before) that its own recovery is about to replace with its source's copy — letting it
/// win could cross that recovery and leave two active copies different (found by the simulation).
pub fn settle(
    versions: &BTreeMap<u64, Version>,
    active: &BTreeSet<u64>,
    restamp: Option<Version>,
) -> Option<(u64, Vec<Install>)> {
    let (winner, top) = versions
        .iter()
        .filter(|(node, _)| active.contains(node))
        .max_by_key(|(node, v)| (**v, std::cmp::Reverse(**node)))?;
    let installs = versions
        .iter()
        .filter(|(node, v)| restamp.is_some() || (*node != winner && *v != top))
        .map(|(node, v)| Install { node: *node, expected: *v, version: restamp.unwrap_or(*top) })
        .collect();
    Some((*winner, installs))
}

/// What a recovering copy does with one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pull {
    /// Copy the source's chunk (at `version`) over ours, if ours is still at `expected`.
    Copy { chunk: u64, expected: Option<Version>, version: Version },
    /// The source has no such chunk: delete ours, if it is still at `expected`.
    Delete { chunk: u64, expected: Version },
}

/// The recovery plan of a target against its source.
pub fn recovery_plan(
    source: &BTreeMap<u64, Version>,
    target: &BTreeMap<u64, Version>,
    dirty_at_boot: &BTreeSet<u64>,
) -> Vec<Pull> {
    let mut plan = Vec::new();
    for (chunk, version) in source {
        let mine = target.get(chunk).copied();
        if mine != Some(*version) || dirty_at_boot.contains(chunk) {
            plan.push(Pull::Copy { chunk: *chunk, expected: mine, version: *version });
        }
    }
    for (chunk, version) in target {
        if !source.contains_key(chunk) {
            plan.push(Pull::Delete { chunk: *chunk, expected: *version });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(generation: u64, seq: u64) -> Version {
        Version { generation, seq }
    }

    #[test]
    fn the_highest_copy_wins_and_equal_copies_are_left_alone() {
        let versions: BTreeMap<u64, Version> = [(1, v(2, 3)), (2, v(2, 4)), (3, v(2, 4))].into();
        let all: BTreeSet<u64> = [1, 2, 3].into();
        let (winner, installs) = settle(&versions, &all, None).unwrap();
        assert_eq!(winner, 2);
        assert_eq!(installs, vec![Install { node: 1, expected: v(2, 3), version: v(2, 4) }]);
        let (_, restamped) = settle(&versions, &all, Some(v(2, 9))).unwrap();
        assert_eq!(restamped.len(), 3, "a restamp goes to every member");
        assert!(settle(&BTreeMap::new(), &all, None).is_none());
    }

    #[test]
    fn a_joining_copy_never_wins() {
        // Node 3 is joining with a leftover of a failed write (2, 9): the active copies win.
        let versions: BTreeMap<u64, Version> = [(1, v(2, 4)), (2, v(2, 4)), (3, v(2, 9))].into();
        let (winner, installs) = settle(&versions, &[1, 2].into(), None).unwrap();
        assert_eq!(winner, 1);
        assert_eq!(installs, vec![Install { node: 3, expected: v(2, 9), version: v(2, 4) }]);
        assert!(settle(&versions, &BTreeSet::new(), None).is_none(), "no active copy, no winner");
    }

    #[test]
    fn recovery_pulls_differences_deletions_and_dirty_chunks() {
        let source: BTreeMap<u64, Version> = [(1, v(1, 1)), (2, v(1, 5)), (3, v(1, 2))].into();
        let target: BTreeMap<u64, Version> = [(1, v(1, 1)), (2, v(1, 4)), (9, v(1, 1))].into();
        let plan = recovery_plan(&source, &target, &[1].into());
        assert_eq!(
            plan,
            vec![
                Pull::Copy { chunk: 1, expected: Some(v(1, 1)), version: v(1, 1) },
                Pull::Copy { chunk: 2, expected: Some(v(1, 4)), version: v(1, 5) },
                Pull::Copy { chunk: 3, expected: None, version: v(1, 2) },
                Pull::Delete { chunk: 9, expected: v(1, 1) },
            ]
        );
    }
}
