//! The client's write round: one mutation of one chunk, sent to every member of its PG at one
//! interval, acknowledged when every counted member applied it (I1).
//!
//! The round never waits on anything but replies: the shell sends to [`WriteRound::targets`],
//! feeds each reply (or a timeout, as [`Reply::Unreachable`]) to [`WriteRound::on_reply`], and does
//! what the returned [`Step`] says.

use crate::replica::Verdict;
use cairn_meta::authority::{PgAuthority, min_size};
use std::collections::{BTreeMap, BTreeSet};

/// A member's answer as the round sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The node's verdict (it applied the mutation on `Apply`).
    Verdict(Verdict),
    /// No answer within the RPC timeout, or the connection failed.
    Unreachable,
    /// The node failed to apply it (IO error).
    Failed,
}

/// What the shell does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Wait for more replies.
    Wait,
    /// Every counted member applied it: acknowledge.
    Acked,
    /// The client's map is stale (or the node's): refresh the map and start a new round.
    Refresh,
    /// Ask the metadata to remove this member (it did not answer or failed), then start a new round.
    Degrade(u64),
    /// A newer writer holds the volume: fail this and every later mutation.
    Fenced,
    /// A counted member's copy differs from what the writer expects: settle the chunk across the
    /// counted members, then start a new round.
    Settle,
    /// The PG has fewer than min_size valid active members: wait for the map to change (bounded by
    /// the IO timeout).
    BelowMinSize,
}

/// One mutation's round at one interval.
#[derive(Debug, Clone)]
pub struct WriteRound {
    pub interval: u64,
    counted: BTreeSet<u64>,
    applied: BTreeSet<u64>,
    targets: Vec<u64>,
    below_min_size: bool,
}

impl WriteRound {
    /// Starts a round for a PG of a `replicas`-copy volume as the client's map shows it.
    pub fn new(authority: &PgAuthority, incarnations: &BTreeMap<u64, u64>, replicas: u8) -> WriteRound {
        WriteRound {
            interval: authority.interval,
            counted: authority.counted(incarnations).into_iter().collect(),
            applied: BTreeSet::new(),
            targets: authority.all(),
            below_min_size: authority.active(incarnations).len() < min_size(replicas),
        }
    }

    /// Every member: counted ones must apply it, the others apply what they can.
    pub fn targets(&self) -> &[u64] {
        &self.targets
    }

    /// Whether the round cannot succeed at this interval at all.
    pub fn start(&self) -> Step {
        if self.below_min_size { Step::BelowMinSize } else { self.progress() }
    }

    fn progress(&self) -> Step {
        if self.counted.is_subset(&self.applied) { Step::Acked } else { Step::Wait }
    }

    /// Takes one member's reply.
    pub fn on_reply(&mut self, node: u64, reply: Reply) -> Step {
        let counted = self.counted.contains(&node);
        match reply {
            Reply::Verdict(Verdict::Fenced) => Step::Fenced,
            _ if self.below_min_size => Step::BelowMinSize,
            // Members that are not counted never decide a round.
            _ if !counted => self.progress(),
            Reply::Verdict(Verdict::Apply | Verdict::AlreadyApplied) => {
                self.applied.insert(node);
                self.progress()
            }
            Reply::Verdict(Verdict::StaleInterval | Verdict::UnknownInterval | Verdict::NotMember) => {
                Step::Refresh
            }
            Reply::Verdict(Verdict::Behind | Verdict::Conflict) => Step::Settle,
            Reply::Unreachable | Reply::Failed => Step::Degrade(node),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_meta::authority::{Member, Phase};

    fn authority(members: &[(u64, Phase)]) -> PgAuthority {
        PgAuthority {
            interval: 7,
            members: members
                .iter()
                .map(|(node, phase)| Member { node: *node, incarnation: 1, phase: *phase })
                .collect(),
        }
    }

    fn incs() -> BTreeMap<u64, u64> {
        (1..=5).map(|n| (n, 1)).collect()
    }

    #[test]
    fn acknowledged_only_when_every_counted_member_applied() {
        let a =
            authority(&[(1, Phase::Active), (2, Phase::Active), (3, Phase::Joining), (4, Phase::Backfill)]);
        let mut r = WriteRound::new(&a, &incs(), 3);
        assert_eq!(r.targets(), &[1, 2, 3, 4]);
        assert_eq!(r.start(), Step::Wait);
        assert_eq!(r.on_reply(1, Reply::Verdict(Verdict::Apply)), Step::Wait);
        assert_eq!(r.on_reply(4, Reply::Unreachable), Step::Wait, "backfill never decides");
        assert_eq!(r.on_reply(2, Reply::Verdict(Verdict::AlreadyApplied)), Step::Wait);
        assert_eq!(r.on_reply(3, Reply::Verdict(Verdict::Apply)), Step::Acked, "joining members count");
    }

    #[test]
    fn failures_lead_to_degrade_refresh_settle_or_fencing() {
        let a = authority(&[(1, Phase::Active), (2, Phase::Active), (3, Phase::Active)]);
        let mut r = WriteRound::new(&a, &incs(), 3);
        assert_eq!(r.on_reply(1, Reply::Unreachable), Step::Degrade(1));
        assert_eq!(r.on_reply(2, Reply::Verdict(Verdict::StaleInterval)), Step::Refresh);
        assert_eq!(r.on_reply(3, Reply::Verdict(Verdict::Behind)), Step::Settle);
        let b = authority(&[(1, Phase::Active), (4, Phase::Backfill)]);
        let mut r = WriteRound::new(&b, &incs(), 3);
        assert_eq!(r.on_reply(4, Reply::Verdict(Verdict::Fenced)), Step::Fenced, "any member may fence");
    }

    #[test]
    fn below_min_size_nothing_is_acknowledged() {
        let a = authority(&[(1, Phase::Active), (2, Phase::Joining)]);
        let mut r = WriteRound::new(&a, &incs(), 3);
        assert_eq!(r.start(), Step::BelowMinSize);
        assert_eq!(r.on_reply(1, Reply::Verdict(Verdict::Apply)), Step::BelowMinSize);
    }
}
