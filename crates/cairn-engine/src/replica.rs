//! A storage node's decisions on one request for one PG.
//!
//! The node knows the newest interval of each PG it has seen (intervals only grow, I8), its own
//! role in the PG at that interval (from the metadata's PG authority and its own incarnation), the
//! volume's fence (highest generation seen) and the chunk's version.

use crate::version::{Expected, Version};
use cairn_meta::authority::Role;
use cairn_types::version::VersionCheck;

/// What the node knows when a mutation arrives.
#[derive(Debug, Clone, Copy)]
pub struct NodeView {
    pub known_interval: u64,
    pub role: Role,
    pub fence: u64,
    pub current: Version,
}

/// A mutation's claims.
#[derive(Debug, Clone, Copy)]
pub struct Mutation {
    pub interval: u64,
    pub generation: u64,
    pub expected: Expected,
    pub new: Version,
}

/// The node's answer to a mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it (raising the fence to its generation first if it is higher).
    Apply,
    /// The copy is already at the mutation's new version: a re-send; answer applied.
    AlreadyApplied,
    /// The sender's map is older than the node's: refresh and re-send.
    StaleInterval,
    /// The node has not learned this interval yet: it refreshes; the sender retries.
    UnknownInterval,
    /// The node is not a member of the PG at this interval.
    NotMember,
    /// A newer writer holds the volume.
    Fenced,
    /// The copy lacks mutations the writer expects it to have: it needs recovery.
    Behind,
    /// The copy is at a version the writer does not expect (another chain): never applied.
    Conflict,
}

/// Decides on a mutation. Fencing first: a fenced writer learns it whatever else is wrong.
pub fn check_mutation(node: &NodeView, m: &Mutation) -> Verdict {
    if m.generation < node.fence {
        return Verdict::Fenced;
    }
    if m.interval < node.known_interval {
        return Verdict::StaleInterval;
    }
    if m.interval > node.known_interval {
        return Verdict::UnknownInterval;
    }
    if node.role == Role::None {
        return Verdict::NotMember;
    }
    // "Any older generation" is safe only on a copy known to hold the PG's latest state: a
    // recovering copy may be stale, and must not gain the real chain's version over stale bytes.
    if matches!(m.expected, Expected::Below(_)) && node.role != Role::Active {
        return Verdict::Behind;
    }
    match m.expected.check(node.current, m.new) {
        VersionCheck::Apply => Verdict::Apply,
        VersionCheck::AlreadyApplied => Verdict::AlreadyApplied,
        VersionCheck::Behind => Verdict::Behind,
        VersionCheck::Conflict => Verdict::Conflict,
    }
}

/// The node's answer to a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadVerdict {
    Serve,
    StaleInterval,
    UnknownInterval,
    /// Not an active member with its current incarnation, or its read lease is over.
    NotServing,
}

/// Decides on a read: only a valid active member at the newest interval it knows, holding a read
/// lease (so that a member removed by a commit it has not heard of stops serving before writes
/// are acknowledged without it; I2, I9).
pub fn check_read(known_interval: u64, role: Role, interval: u64, lease_valid: bool) -> ReadVerdict {
    if interval < known_interval {
        ReadVerdict::StaleInterval
    } else if interval > known_interval {
        ReadVerdict::UnknownInterval
    } else if role != Role::Active || !lease_valid {
        ReadVerdict::NotServing
    } else {
        ReadVerdict::Serve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(generation: u64, seq: u64) -> Version {
        Version { generation, seq }
    }

    fn node(current: Version) -> NodeView {
        NodeView { known_interval: 5, role: Role::Active, fence: 3, current }
    }

    fn m(expected: Expected, new: Version) -> Mutation {
        Mutation { interval: 5, generation: 3, expected, new }
    }

    #[test]
    fn versions_decide() {
        let n = node(v(3, 4));
        assert_eq!(check_mutation(&n, &m(Expected::Exact(v(3, 4)), v(3, 5))), Verdict::Apply);
        assert_eq!(check_mutation(&n, &m(Expected::Exact(v(3, 3)), v(3, 4))), Verdict::AlreadyApplied);
        assert_eq!(check_mutation(&n, &m(Expected::Exact(v(3, 6)), v(3, 7))), Verdict::Behind);
        assert_eq!(check_mutation(&n, &m(Expected::Exact(v(3, 2)), v(3, 3))), Verdict::Conflict);
        assert_eq!(check_mutation(&node(v(2, 9)), &m(Expected::Below(3), v(3, 1))), Verdict::Apply);
        assert_eq!(check_mutation(&n, &m(Expected::Below(3), v(3, 1))), Verdict::Conflict);
        let joining = NodeView { role: Role::Joining, ..node(v(2, 9)) };
        assert_eq!(check_mutation(&joining, &m(Expected::Below(3), v(3, 1))), Verdict::Behind);
    }

    #[test]
    fn fencing_and_intervals_come_first() {
        let n = node(v(3, 4));
        let old = Mutation { generation: 2, ..m(Expected::Exact(v(3, 4)), v(3, 5)) };
        assert_eq!(check_mutation(&n, &old), Verdict::Fenced);
        let stale = Mutation { interval: 4, ..m(Expected::Exact(v(3, 4)), v(3, 5)) };
        assert_eq!(check_mutation(&n, &stale), Verdict::StaleInterval);
        let ahead = Mutation { interval: 6, ..m(Expected::Exact(v(3, 4)), v(3, 5)) };
        assert_eq!(check_mutation(&n, &ahead), Verdict::UnknownInterval);
        let outsider = NodeView { role: Role::None, ..n };
        assert_eq!(check_mutation(&outsider, &m(Expected::Exact(v(3, 4)), v(3, 5))), Verdict::NotMember);
    }

    #[test]
    fn only_leased_active_members_serve_reads() {
        assert_eq!(check_read(5, Role::Active, 5, true), ReadVerdict::Serve);
        assert_eq!(check_read(5, Role::Active, 5, false), ReadVerdict::NotServing);
        assert_eq!(check_read(5, Role::Joining, 5, true), ReadVerdict::NotServing);
        assert_eq!(check_read(5, Role::Receiving, 5, true), ReadVerdict::NotServing);
        assert_eq!(check_read(5, Role::Active, 4, true), ReadVerdict::StaleInterval);
        assert_eq!(check_read(5, Role::Active, 6, true), ReadVerdict::UnknownInterval);
    }
}
