//! Per-placement-group authority: which replicas of a PG hold its latest state.
//!
//! The balancer's PG table says where a PG's replicas *should* be (its target). This module says
//! which copies are *authoritative*: a PG's `members`, each a (node, incarnation, phase) entry, and an
//! `interval` number bumped by every change of them.
//!
//! * `Active` members serve reads, must apply every write before it is acknowledged, and count for
//!   `min_size`.
//! * `Joining` members must apply every write (they are counted for acknowledgement) but serve no
//!   reads and do not count for `min_size`: they are finishing their recovery.
//! * `Backfill` members receive writes when they can apply them, count for nothing and serve
//!   nothing: they are recovering a copy from an active member.
//! * An entry whose incarnation is not its node's current one is **void**: the node restarted and
//!   may have lost writes (power loss), so the entry counts for nothing and serves nothing. It stays
//!   in the set only while removing it would leave fewer than `min_size` valid active members, and is
//!   replaced when the node is re-admitted.
//!
//! Invariants (checked by [`PgAuthority::check`]; `ClusterState::apply` asserts them):
//! * a node appears at most once in a PG's members;
//! * an `Active` or `Joining` entry is removed only by a commit that names the interval it was
//!   judged at, and never so that fewer than `min_size` valid active members remain;
//! * the interval only grows, and grows with every membership change;
//! * a member becomes `Active` only from `Joining` with the same incarnation (it was counted for every
//!   write since it became joining, and copied everything older from an active member).
//!
//! These rules make the acknowledgement rule "every counted member of the newest interval applied
//! it" sufficient for: an acknowledged write is held by every valid active member, at any later
//! interval.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A member's phase in a PG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Phase {
    /// Holds the PG's latest state: serves reads, counted for acknowledgement and min_size.
    Active,
    /// Counted for acknowledgement; finishing recovery (its final comparison with its source).
    Joining,
    /// Recovering a copy; receives writes it can apply, counts for nothing.
    Backfill,
}

/// One member of a PG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: u64,
    /// The node's incarnation when this entry was made; void once the node has another.
    pub incarnation: u64,
    pub phase: Phase,
}

/// What a node is in one PG, from the PG's entry and the node's current incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Active with its current incarnation: serves reads, counted.
    Active,
    /// Joining with its current incarnation: counted, no reads.
    Joining,
    /// Backfill, or a void entry (restarted): receives writes, counts for nothing.
    Receiving,
    /// Not a member.
    None,
}

impl Role {
    /// Counted for acknowledgement.
    pub fn counted(self) -> bool {
        matches!(self, Role::Active | Role::Joining)
    }
}

/// The authoritative state of one PG.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PgAuthority {
    pub interval: u64,
    pub members: Vec<Member>,
}

/// The smallest number of valid active members a PG of `replicas` copies may have and still
/// acknowledge writes: a majority (Ceph's default `size - size/2`). With 3 copies, 2.
pub fn min_size(replicas: u8) -> usize {
    let r = usize::from(replicas.max(1));
    r - r / 2
}

impl PgAuthority {
    /// The entry of `node`, if any.
    pub fn entry(&self, node: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.node == node)
    }

    /// What `node` (now at `incarnation`) is in this PG.
    pub fn role(&self, node: u64, incarnation: u64) -> Role {
        match self.entry(node) {
            None => Role::None,
            Some(m) if m.incarnation != incarnation => Role::Receiving,
            Some(m) => match m.phase {
                Phase::Active => Role::Active,
                Phase::Joining => Role::Joining,
                Phase::Backfill => Role::Receiving,
            },
        }
    }

    /// Members whose entry is valid (matches the node's current incarnation in `incarnations`).
    fn valid<'a>(&'a self, incarnations: &'a BTreeMap<u64, u64>) -> impl Iterator<Item = &'a Member> + 'a {
        self.members.iter().filter(|m| incarnations.get(&m.node) == Some(&m.incarnation))
    }

    /// Valid active members: they serve reads.
    pub fn active(&self, incarnations: &BTreeMap<u64, u64>) -> Vec<u64> {
        self.valid(incarnations).filter(|m| m.phase == Phase::Active).map(|m| m.node).collect()
    }

    /// Valid active and joining members: every write must reach them before it is acknowledged.
    pub fn counted(&self, incarnations: &BTreeMap<u64, u64>) -> Vec<u64> {
        self.valid(incarnations).filter(|m| m.phase != Phase::Backfill).map(|m| m.node).collect()
    }

    /// Every member: writes are sent to all of them (non-counted ones apply what they can).
    pub fn all(&self) -> Vec<u64> {
        self.members.iter().map(|m| m.node).collect()
    }

    /// Checks the structural invariants: distinct nodes.
    pub fn check(&self) -> Result<(), String> {
        for (i, m) in self.members.iter().enumerate() {
            if self.members[..i].iter().any(|o| o.node == m.node) {
                return Err(format!("node {} appears twice", m.node));
            }
        }
        Ok(())
    }

    /// Removes `node`'s entry if that keeps at least `min` valid active members (a backfill or
    /// void entry can always go). Returns whether it was removed.
    pub fn remove(&mut self, node: u64, incarnations: &BTreeMap<u64, u64>, min: usize) -> bool {
        let Some(m) = self.entry(node).copied() else { return false };
        let valid_active = incarnations.get(&node) == Some(&m.incarnation) && m.phase == Phase::Active;
        if valid_active && self.active(incarnations).len() <= min {
            return false;
        }
        self.members.retain(|e| e.node != node);
        self.interval += 1;
        true
    }

    /// Drops void entries where enough valid active members remain without them, and void backfill
    /// or joining entries always. Returns whether anything changed.
    pub fn prune_void(&mut self, incarnations: &BTreeMap<u64, u64>, min: usize) -> bool {
        let active = self.active(incarnations).len();
        let before = self.members.len();
        self.members.retain(|m| {
            let void = incarnations.get(&m.node) != Some(&m.incarnation);
            !(void && (m.phase != Phase::Active || active >= min))
        });
        let changed = self.members.len() != before;
        if changed {
            self.interval += 1;
        }
        changed
    }

    /// Adds `node` as a backfill member at `incarnation` unless it has a valid entry already. A void
    /// entry (kept because the PG is at min_size) stays in place and recovers like a backfill one.
    pub fn add_backfill(&mut self, node: u64, incarnation: u64) -> bool {
        if self.entry(node).is_some() {
            return false;
        }
        self.members.push(Member { node, incarnation, phase: Phase::Backfill });
        self.interval += 1;
        true
    }

    /// Promotes `node` (at `incarnation`): to `Joining` from backfill or a void entry, to `Active`
    /// from joining at the same incarnation. Returns whether it changed.
    pub fn admit(&mut self, node: u64, incarnation: u64, to: Phase) -> bool {
        let Some(m) = self.members.iter_mut().find(|m| m.node == node) else { return false };
        let ok = match to {
            Phase::Joining => m.phase == Phase::Backfill || m.incarnation != incarnation,
            Phase::Active => m.phase == Phase::Joining && m.incarnation == incarnation,
            Phase::Backfill => false,
        };
        if ok {
            m.incarnation = incarnation;
            m.phase = to;
            self.interval += 1;
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incs(pairs: &[(u64, u64)]) -> BTreeMap<u64, u64> {
        pairs.iter().copied().collect()
    }

    fn pg(nodes: &[u64]) -> PgAuthority {
        PgAuthority {
            interval: 1,
            members: nodes
                .iter()
                .map(|n| Member { node: *n, incarnation: 1, phase: Phase::Active })
                .collect(),
        }
    }

    #[test]
    fn removal_never_goes_below_min_size() {
        let inc = incs(&[(1, 1), (2, 1), (3, 1)]);
        let mut p = pg(&[1, 2, 3]);
        assert!(p.remove(3, &inc, 2));
        assert_eq!(p.interval, 2);
        assert!(!p.remove(2, &inc, 2), "would leave one active member");
        assert_eq!(p.active(&inc), vec![1, 2]);
    }

    #[test]
    fn a_restart_voids_the_entry_and_it_recovers_in_place() {
        let mut p = pg(&[1, 2, 3]);
        let inc = incs(&[(1, 1), (2, 2), (3, 2)]);
        // Two members restarted (power loss): their entries are void; one valid active member is
        // left, below min_size, so the void entries stay.
        assert!(!p.prune_void(&inc, 2));
        assert_eq!(p.counted(&inc), vec![1]);
        assert_eq!(p.role(2, 2), Role::Receiving);
        assert!(p.admit(2, 2, Phase::Joining));
        assert_eq!(p.role(2, 2), Role::Joining);
        assert!(!p.admit(2, 3, Phase::Active), "another incarnation is not admitted");
        assert!(p.admit(2, 2, Phase::Active));
        // Now two valid active members: node 3's void entry goes.
        assert!(p.prune_void(&inc, 2));
        assert_eq!(p.all(), vec![1, 2]);
        p.check().unwrap();
    }

    #[test]
    fn backfill_counts_for_nothing_until_admitted() {
        let inc = incs(&[(1, 1), (2, 1), (3, 1), (4, 7)]);
        let mut p = pg(&[1, 2, 3]);
        assert!(p.add_backfill(4, 7));
        assert!(!p.add_backfill(4, 7));
        assert_eq!(p.counted(&inc), vec![1, 2, 3]);
        assert_eq!(p.role(4, 7), Role::Receiving);
        assert!(!p.admit(4, 7, Phase::Active), "joining comes first");
        assert!(p.admit(4, 7, Phase::Joining));
        assert_eq!(p.counted(&inc), vec![1, 2, 3, 4]);
        assert_eq!(p.active(&inc), vec![1, 2, 3]);
    }

    #[test]
    fn min_size_is_a_majority() {
        assert_eq!([1, 2, 3, 4, 5].map(min_size), [1, 1, 2, 2, 3]);
    }
}
