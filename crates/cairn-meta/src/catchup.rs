//! The leader's catch-up decisions and the nodes' read-lease rules, apart from I/O.
//!
//! [`LeaderView`] is what the metadata leader knows beyond the committed map: when it last heard
//! each node, each node's latest report, and the clocks of each catch-up and fill. From it and a
//! map, [`LeaderView::decide`] returns the commands the leader proposes: nodes declared up or down,
//! restarts recorded, nodes sent (back) to catching up, and nodes whose catch-up (and fill) ends.
//! [`Grants`] and [`Leases`] are one node's read-lease books: the leases it granted its peers (and
//! how long a write they missed is held back) and the leases its peers granted it.
//!
//! `MetaService` drives these with tokio's clock and real RPCs; the data-path simulation
//! (`cairn-sim`, `production` model) drives the same code with a simulated clock and network.
//! Times are milliseconds of the caller's monotonic clock (in production: since the process
//! started), so a simulation controls them completely.
//!
//! Invariants kept here (see ARCHITECTURE.md "Catch-up"):
//! * a node's catch-up ends only on reports received in the leader's current term, from peers
//!   heard since it began, none holding writes it missed, with holders − q such peers in every PG
//!   it holds (every write it missed was recorded by q holders, so such a set includes one);
//! * a node being filled is admitted only with exactly the PGs the leader checked;
//! * a lease is granted only to a node the granter's map shows in sync at the lease's epoch and for
//!   which the granter holds no missed write; a write recorded as missed by a node is held back
//!   until `LEASE_HOLDBACK` after the last lease granted it (or after the granter started).

use crate::network::NodeReport;
use crate::state::{ClusterState, Command};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How long a read lease lasts, from when its request left the node that holds it.
pub const LEASE: Duration = cairn_types::limits::READ_LEASE;

/// How long after it last granted a node a lease a peer holds back the acknowledgement of a write
/// that node missed (see `cairn_types::limits::READ_LEASE_HOLDBACK`; clients allow for it).
pub const LEASE_HOLDBACK: Duration = cairn_types::limits::READ_LEASE_HOLDBACK;

/// A lease is renewed once it is this old.
pub const LEASE_RENEW: Duration = Duration::from_millis(500);

/// How long a node may stay in sync without serving client IO before it is made to catch up again.
pub const NOT_SERVING_MAX: Duration = Duration::from_secs(10);

/// The longest a node sent back to catching up for not serving waits before it is in sync again.
pub const STUCK_BACKOFF_MAX: Duration = Duration::from_secs(300);

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// How long a catch-up lasts at least after a node was sent back `times` times in a row for not
/// serving: nothing the first time it catches up, then 10 s, doubling, at most 5 minutes.
pub fn stuck_backoff(times: u32) -> Duration {
    match times {
        0 => Duration::ZERO,
        n => NOT_SERVING_MAX.saturating_mul(1 << (n - 1).min(10)).min(STUCK_BACKOFF_MAX),
    }
}

/// How many of a PG's other holders must grant a holder a read lease: all holders but a write
/// quorum of the R copies (q = ⌊R/2⌋ + 1). A write acknowledged without the holder was recorded
/// by at least q of the others, so any `holders − q` grants include one of them. (Counted from the
/// holders, not from R: a PG that also lists a member admitted since may hold writes that member
/// missed while it was being filled — acknowledged by q of the R before — and the member grants
/// leases as soon as it is in sync; the production simulation found a lease counted from
/// `cairn_types::placement::misses_allowed` alone granted so, seed 76.)
pub fn lease_need(replicas: u8, holders: usize) -> usize {
    holders.saturating_sub(usize::from(replicas) / 2 + 1)
}

/// Whether a node that caught up may serve: in every PG it holds (its other holders, and how
/// many of them must have the new map), enough of the `current` ones (those seen with it).
pub fn barrier_lifted(needs: &[(Vec<u64>, usize)], current: &BTreeSet<u64>) -> bool {
    needs.iter().all(|(holders, need)| holders.iter().filter(|p| current.contains(p)).count() >= *need)
}

/// Per PG node `me` holds (if the map shows its process `boot_id` in sync): its other holders,
/// and how many of them must grant it a lease.
pub fn lease_needs(s: &ClusterState, me: u64, boot_id: u64) -> Option<Vec<(Vec<u64>, usize)>> {
    s.nodes.get(&me).filter(|n| n.boot_id == boot_id && n.in_sync())?;
    Some(
        s.pg_sets
            .keys()
            .flat_map(|r| (0..s.pg_count).map(move |pg| (*r, pg)))
            .filter_map(|(r, pg)| {
                let holders = s.holders(r, pg);
                let need = lease_need(r, holders.len());
                holders.contains(&me).then(|| (holders.into_iter().filter(|p| *p != me).collect(), need))
            })
            .collect(),
    )
}

/// Whether node `me` (process `boot_id`) may serve client IO: the map knows its current process
/// and it is in sync, and — after a catch-up — its serving barrier lifted for that in-sync epoch
/// (`serving_from`, see `MetaService::serves_clients`).
pub fn serves_clients(s: &ClusterState, me: u64, boot_id: u64, serving_from: u64) -> bool {
    s.nodes
        .get(&me)
        .filter(|n| n.boot_id == boot_id && n.in_sync())
        .map(|n| n.in_sync_epoch)
        .is_some_and(|e| e == 0 || serving_from == e)
}

/// The leases a node granted its peers (see `MetaService::lease_holdback`).
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// When this node last granted each peer a lease.
    granted: BTreeMap<u64, u64>,
    /// When this process started: a lease granted before a restart is not in `granted`.
    started_ms: u64,
}

impl Grants {
    pub fn new(started_ms: u64) -> Self {
        Grants { granted: BTreeMap::new(), started_ms }
    }

    /// Answers peer `id`'s request for a lease for its `in_sync_epoch`: granted only if this
    /// node's map shows it in sync at that epoch and this node holds no write recorded as missed by
    /// it (`holds_missed`, looked up by the caller under the same lock as this call: a write
    /// recorded before makes it a refusal, one recorded after finds this grant in
    /// [`Self::holdback`]).
    pub fn grant(
        &mut self,
        s: &ClusterState,
        id: u64,
        in_sync_epoch: u64,
        holds_missed: bool,
        now_ms: u64,
    ) -> bool {
        let in_sync = s.nodes.get(&id).is_some_and(|n| n.in_sync() && n.in_sync_epoch == in_sync_epoch);
        if !in_sync {
            tracing::debug!(
                node = id,
                "read lease refused: not in sync at epoch {in_sync_epoch} in this map"
            );
            return false;
        }
        if holds_missed {
            tracing::debug!(node = id, "read lease refused: this node holds writes it missed");
            return false;
        }
        self.granted.insert(id, now_ms);
        true
    }

    /// How long a mutation recorded as missed by `peers` must still be held back before it is
    /// acknowledged: until `LEASE_HOLDBACK` after this node last granted any of them a lease, or
    /// after this process started.
    pub fn holdback(&self, peers: &[u64], now_ms: u64) -> Duration {
        let until = peers
            .iter()
            .map(|p| self.granted.get(p).copied().unwrap_or(self.started_ms).max(self.started_ms))
            .map(|t| t + ms(LEASE_HOLDBACK))
            .max()
            .unwrap_or(0);
        Duration::from_millis(until.saturating_sub(now_ms))
    }
}

/// The read leases a node holds from its peers: the `in_sync_epoch` they were granted for, and
/// per granting peer when the request it granted left (valid `LEASE` from then).
#[derive(Debug, Clone, Default)]
pub struct Leases {
    epoch: u64,
    from: BTreeMap<u64, u64>,
}

impl Leases {
    /// Whether at least `need` of `others` granted a lease for `in_sync_epoch` still valid now.
    pub fn covers(&self, in_sync_epoch: u64, others: &[u64], need: usize, now_ms: u64) -> bool {
        self.epoch == in_sync_epoch
            && others.iter().filter(|p| self.from.get(p).is_some_and(|t| *t + ms(LEASE) > now_ms)).count()
                >= need
    }

    /// Whether the leases for `in_sync_epoch` are all fresh (no renewal due).
    pub fn fresh(&self, in_sync_epoch: u64, now_ms: u64) -> bool {
        self.epoch == in_sync_epoch
            && !self.from.is_empty()
            && self.from.values().all(|t| *t + ms(LEASE_RENEW) > now_ms)
    }

    /// One renewal round's answers: `granted` (asked at `sent_ms`) now hold a lease; every other
    /// peer's lease ends (a refusal may mean it holds a write this node missed, and a peer gone
    /// down would look stale forever).
    pub fn renewed(&mut self, in_sync_epoch: u64, granted: &BTreeSet<u64>, sent_ms: u64) {
        if self.epoch != in_sync_epoch {
            *self = Leases { epoch: in_sync_epoch, from: BTreeMap::new() };
        }
        for id in granted {
            self.from.insert(*id, sent_ms);
        }
        self.from.retain(|id, _| granted.contains(id));
    }
}

/// See [`LeaderView::backfill_seen`]: (replica count, PG) pairs, map epoch, time.
type BackfillSeen = (Vec<(u8, u32)>, u64, u64);

/// What the leader knows beyond the committed map (kept in its memory only; a new leader starts
/// afresh, see [`LeaderView::took_office`]).
#[derive(Debug, Default, Clone)]
pub struct LeaderView {
    last_seen: BTreeMap<u64, u64>,
    usage: BTreeMap<u64, NodeReport>,
    /// When each catching-up node started catching up, its boot id then and the map epoch: a
    /// restart while catching up starts the wait again (peers' reports from before it prove
    /// nothing about it).
    catching_since: BTreeMap<u64, (u64, u64, u64)>,
    /// Nodes in sync but not serving (their serving barrier up), and since when.
    not_serving_since: BTreeMap<u64, u64>,
    /// Nodes sent back to catching up because they did not serve, and how many times in a row
    /// (until they serve): each time their next catch-up ends later ([`stuck_backoff`]).
    stuck: BTreeMap<u64, u32>,
    /// Per node being filled (backfill member of some PGs): those PGs, and the map epoch and time
    /// when the leader first saw exactly them. Its holders must have seeded them from a map at
    /// least that new, and reported since, before it is admitted.
    backfill_seen: BTreeMap<u64, BackfillSeen>,
}

/// What one round of [`LeaderView::decide`] asks the leader to commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decisions {
    /// Nodes whose liveness changes: (id, up).
    pub liveness: Vec<(u64, bool)>,
    /// Nodes in sync that must catch up (again): peers hold writes they missed, or they did not
    /// serve for too long.
    pub behind: Vec<u64>,
    /// Nodes that restarted: (id, new boot id).
    pub boots: Vec<(u64, u64)>,
    /// Nodes whose catch-up ends, with the PGs their fill was checked for.
    pub finished: Vec<(u64, Vec<(u8, u32)>)>,
}

impl Decisions {
    /// The commands, in the order the leader proposes them.
    pub fn commands(&self, time_ms: u64) -> Vec<Command> {
        let mut out = Vec::new();
        for id in &self.behind {
            out.push(Command::SetCatchingUp { id: *id, catching_up: true, time_ms, filled: None });
        }
        for (id, boot_id) in &self.boots {
            out.push(Command::NodeBooted { id: *id, boot_id: *boot_id, time_ms });
        }
        for (id, checked) in &self.finished {
            out.push(Command::SetCatchingUp {
                id: *id,
                catching_up: false,
                time_ms,
                filled: Some(checked.clone()),
            });
        }
        for (id, up) in &self.liveness {
            out.push(Command::SetNodeLiveness { id: *id, up: *up, time_ms });
        }
        out
    }
}

impl LeaderView {
    /// A new leader has heard nobody yet: every node of the map starts a fresh grace period, and
    /// reports and catch-up clocks of an earlier term are forgotten (they prove nothing now).
    pub fn took_office(&mut self, s: &ClusterState, now_ms: u64) {
        for id in s.nodes.keys() {
            self.last_seen.insert(*id, now_ms);
        }
        self.usage.clear();
        self.catching_since.clear();
        self.backfill_seen.clear();
    }

    /// A node's report arrived (its heartbeat, or its answer to a probe sent at `sent_ms`: kept
    /// only if no report the node sent itself arrived since).
    pub fn heard(&mut self, report: NodeReport, sent_ms: Option<u64>, now_ms: u64) {
        if sent_ms.is_some_and(|sent| self.last_seen.get(&report.id).is_some_and(|t| *t > sent)) {
            return;
        }
        self.last_seen.insert(report.id, now_ms);
        self.usage.insert(report.id, report);
    }

    /// A member being registered starts its grace period now (unless heard already).
    pub fn registering(&mut self, id: u64, now_ms: u64) {
        self.last_seen.entry(id).or_insert(now_ms);
    }

    /// A node's latest report.
    pub fn usage(&self, id: u64) -> Option<&NodeReport> {
        self.usage.get(&id)
    }

    /// Milliseconds since the leader last heard from a node.
    pub fn silent_ms(&self, id: u64, now_ms: u64) -> Option<u64> {
        self.last_seen.get(&id).map(|t| now_ms.saturating_sub(*t))
    }

    /// One round of the leader's catch-up housekeeping for leader `me`: liveness verdicts, restarts,
    /// nodes behind or not serving, and catch-ups (and fills) that end.
    pub fn decide(
        &mut self,
        s: &ClusterState,
        me: u64,
        now_ms: u64,
        down_after_ms: u64,
        heartbeat_interval_ms: u64,
    ) -> Decisions {
        let liveness = s
            .nodes
            .values()
            .filter_map(|n| {
                let silent = if n.id == me { 0 } else { self.silent_ms(n.id, now_ms).unwrap_or(u64::MAX) };
                let up = silent < down_after_ms;
                (up != n.up).then_some((n.id, up))
            })
            .collect();
        let mut decisions = Decisions { liveness, ..Decisions::default() };
        self.catch_ups(s, me, now_ms, heartbeat_interval_ms, &mut decisions);
        decisions.behind = self.behind(s, now_ms);
        decisions
    }

    /// Boot ids and catch-up: restarts to record (`out.boots`); catch-ups to end (`out.finished`) once every up peer has reported
    /// since it began and none holds writes the node missed.
    fn catch_ups(
        &mut self,
        s: &ClusterState,
        me: u64,
        now: u64,
        heartbeat_interval_ms: u64,
        out: &mut Decisions,
    ) {
        let l = self;
        out.boots = l
            .usage
            .values()
            .filter(|r| s.nodes.get(&r.id).is_some_and(|n| n.boot_id != r.boot_id))
            .map(|r| (r.id, r.boot_id))
            .collect();
        let catching: Vec<u64> = s.nodes.values().filter(|n| n.up && n.catching_up).map(|n| n.id).collect();
        l.catching_since.retain(|id, _| catching.contains(id));
        // The PGs each node is being filled with, and since when exactly those.
        let mut filling: BTreeMap<u64, Vec<(u8, u32)>> = BTreeMap::new();
        for (r, set) in &s.pg_sets {
            for pg in 0..set.len() as u32 {
                for x in s.backfill(*r, pg) {
                    filling.entry(x).or_default().push((*r, pg));
                }
            }
        }
        l.backfill_seen.retain(|id, (pgs, ..)| filling.get(id) == Some(pgs));
        for (id, pgs) in filling {
            l.backfill_seen.entry(id).or_insert((pgs, s.epoch, now));
        }
        for id in catching {
            let boot = s.nodes.get(&id).map(|n| n.boot_id).unwrap_or(0);
            // (When it began, for which process, and the map epoch that shows it.)
            let entry = l.catching_since.entry(id).or_insert((now, boot, s.epoch));
            if entry.1 != boot {
                *entry = (now, boot, s.epoch);
            }
            let (since, catching_epoch) = (entry.0, entry.2);
            let booted =
                l.usage.get(&id).is_some_and(|r| Some(r.boot_id) == s.nodes.get(&id).map(|n| n.boot_id));
            // (The leader too: its own report is recorded with its heartbeats, and until one is
            // since `t` it proves nothing — a new leader's is up to a heartbeat away, and one
            // taken before a write was recorded would vouch for a node that missed it.)
            let fresh_since = |p: u64, t: u64| l.last_seen.get(&p).is_some_and(|seen| *seen > t);
            let peers_done = s.nodes.values().filter(|p| p.up && p.id != id).all(|p| {
                let pending = l.usage.get(&p.id).is_some_and(|r| r.missed_for.contains(&id));
                fresh_since(p.id, since) && !pending
            });
            // Per PG it holds: enough of the other holders have reported since its catch-up began
            // and hold nothing for it that every write it missed is known to have been copied. A
            // write acknowledged without it was applied by at least a majority q of the R holders,
            // all among the R − 1 others, each recording it durably before the acknowledgement; so
            // any R − q such peers cover every one. Peers that are down count for nothing: two
            // failures in sequence must not let a node that missed writes serve its old copy (it
            // waits for them instead).
            let covered = s.pg_sets.keys().all(|r| {
                (0..s.pg_count).all(|pg| {
                    let holders = s.holders(*r, pg);
                    if !holders.contains(&id) {
                        return true;
                    }
                    // Of its holders − 1 others, at least q applied every such write: any
                    // holders − q of them include one. (Not R − q: a PG that took in a filled node
                    // has more holders than R.)
                    let need = lease_need(*r, holders.len());
                    let good = holders
                        .iter()
                        .filter(|p| **p != id)
                        .filter(|p| {
                            let up = s.nodes.get(p).is_some_and(|n| n.up);
                            let pending = l.usage.get(p).is_some_and(|r| r.missed_for.contains(&id));
                            up && fresh_since(**p, since) && !pending
                        })
                        .count();
                    good >= need
                })
            });
            // Being filled: every PG it is a backfill member of must have been seeded, from a map
            // that shows it so, by every up holder (each recorded its chunks of the PG as missed by
            // it; every mutation applied there since is recorded too), and each such holder has
            // reported since and holds nothing for it, with at least holders − q + 1 of them in
            // sync: a write acknowledged without it was applied by at least q of the holders, so
            // one of those covers it.
            let filled = match l.backfill_seen.get(&id) {
                None => true,
                Some((pgs, seen_epoch, seen_at)) => pgs.iter().all(|(r, pg)| {
                    let holders = s.holders(*r, *pg);
                    let need = holders.len().saturating_sub(usize::from(*r) / 2 + 1) + 1;
                    let mut good = 0;
                    for p in &holders {
                        let Some(n) = s.nodes.get(p).filter(|n| n.up) else { continue };
                        let Some(r) = l.usage.get(p) else { return false };
                        let holds = r.missed_for.contains(&id) || r.seeded_for.contains(&id);
                        if !fresh_since(*p, since.max(*seen_at)) || r.seeded_epoch < *seen_epoch || holds {
                            return false;
                        }
                        if n.in_sync() {
                            good += 1;
                        }
                    }
                    good >= need
                }),
            };
            let self_pending = l.usage.get(&me).is_some_and(|r| r.missed_for.contains(&id));
            // The node itself may hold chunks to pull back (after a power loss, or chunks changed
            // lately that differ from its peers'): its report must come from a map that shows it
            // catching up (it compares only then), and say nothing is left.
            let own_pending =
                l.usage.get(&id).is_none_or(|r| r.epoch < catching_epoch || r.missed_for.contains(&id));
            // A node that was in sync without serving (its barrier could not lift) waits longer
            // each time before it is in sync again, instead of flipping every few seconds while
            // whatever keeps it from its peers lasts.
            let backoff = ms(stuck_backoff(l.stuck.get(&id).copied().unwrap_or(0)));
            let elapsed = now.saturating_sub(since);
            if booted
                && elapsed >= backoff
                && peers_done
                && covered
                && filled
                && !self_pending
                && !own_pending
                && elapsed >= heartbeat_interval_ms
            {
                // With the PGs its fill was checked for: admitted only if they are still exactly
                // those when the command applies.
                let checked = l.backfill_seen.get(&id).map(|(pgs, ..)| pgs.clone()).unwrap_or_default();
                out.finished.push((id, checked));
            }
        }
    }

    /// Nodes the map shows in sync that must catch up again: some node holds writes they missed
    /// (a write failed on one while it stayed up), or they have not served for `NOT_SERVING_MAX`.
    fn behind(&mut self, s: &ClusterState, now: u64) -> Vec<u64> {
        let l = self;
        let behind: Vec<u64> = s
            .nodes
            .values()
            // Its own report counts too: a node that must pull chunks back after a power loss
            // serves nothing until it has.
            .filter(|n| n.in_sync() && l.usage.values().any(|r| r.missed_for.contains(&n.id)))
            .map(|n| n.id)
            .collect();
        for id in &behind {
            let holding: Vec<u64> =
                l.usage.values().filter(|r| r.missed_for.contains(id)).map(|r| r.id).collect();
            tracing::info!(
                node = id,
                "node {id} catches up again: node(s) {holding:?} hold writes it missed"
            );
        }
        // In sync but not serving (its serving barrier has not lifted: peers it cannot reach, say):
        // clients send it writes it refuses. Past a while it catches up again, so clients leave it
        // out meanwhile.
        let not_serving: Vec<u64> = s
            .nodes
            .values()
            .filter(|n| {
                n.in_sync()
                    && l.usage
                        .get(&n.id)
                        .is_some_and(|r| r.boot_id == n.boot_id && r.epoch >= n.in_sync_epoch && !r.serving)
            })
            .map(|n| n.id)
            .collect();
        l.not_serving_since.retain(|id, _| not_serving.contains(id));
        // A node that serves again starts its backoff over.
        let serving: Vec<u64> = l.usage.values().filter(|r| r.serving).map(|r| r.id).collect();
        for id in serving {
            l.stuck.remove(&id);
        }
        let mut stuck = Vec::new();
        for id in not_serving {
            let since = *l.not_serving_since.entry(id).or_insert(now);
            if now.saturating_sub(since) >= ms(NOT_SERVING_MAX) {
                let times = l.stuck.get(&id).copied().unwrap_or(0) + 1;
                tracing::warn!(
                    node = id,
                    "node {id} is in sync but has not served for {} s (peers it cannot reach?): it catches up \
                     again, for at least {} s ({times} time(s) in a row)",
                    NOT_SERVING_MAX.as_secs(),
                    stuck_backoff(times).as_secs()
                );
                l.stuck.insert(id, times);
                l.not_serving_since.remove(&id);
                stuck.push(id);
            }
        }
        behind.into_iter().chain(stuck).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_that_does_not_serve_waits_longer_each_time() {
        let secs: Vec<u64> = (0..8).map(|n| stuck_backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![0, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(stuck_backoff(u32::MAX), STUCK_BACKOFF_MAX);
    }

    #[test]
    fn a_caught_up_node_waits_for_enough_peers_with_the_new_map_in_every_pg() {
        // Three copies (need one other holder with the new map per PG), and one copy (none).
        let needs = vec![(vec![1, 2], 1), (vec![2, 3], 1), (vec![], 0)];
        assert!(!barrier_lifted(&needs, &BTreeSet::new()));
        assert!(!barrier_lifted(&needs, &[1].into()), "the PG held with 2 and 3 has none");
        assert!(barrier_lifted(&needs, &[2].into()));
        assert!(barrier_lifted(&[(vec![], 0)], &BTreeSet::new()), "a one-copy volume waits for nobody");
    }

    #[test]
    fn a_write_missed_by_a_node_is_held_back_until_its_last_lease_ran_out() {
        let mut g = Grants::new(1_000);
        let hb = ms(LEASE_HOLDBACK);
        // Nothing granted in this process: held back from its start (grants before are forgotten).
        assert_eq!(g.holdback(&[2], 1_000), LEASE_HOLDBACK);
        assert_eq!(g.holdback(&[2], 1_000 + hb), Duration::ZERO);
        let s = ClusterState::default();
        assert!(!g.grant(&s, 2, 0, false, 5_000), "a node the map does not know gets no lease");
        g.granted.insert(2, 5_000);
        assert_eq!(g.holdback(&[3, 2], 5_100), Duration::from_millis(hb - 100));
        assert_eq!(g.holdback(&[], 5_100), Duration::ZERO);
    }

    #[test]
    fn a_lease_covers_only_its_epoch_and_only_while_fresh() {
        let mut l = Leases::default();
        l.renewed(7, &[2, 3].into(), 1_000);
        assert!(l.covers(7, &[2, 3], 2, 1_000 + ms(LEASE) - 1));
        assert!(!l.covers(7, &[2, 3], 2, 1_000 + ms(LEASE)), "ran out");
        assert!(!l.covers(8, &[2, 3], 1, 1_001), "another in-sync epoch");
        l.renewed(7, &[3].into(), 2_000);
        assert!(!l.covers(7, &[2], 1, 2_001), "a refusal ends that peer's lease at once");
        assert!(l.fresh(7, 2_000 + ms(LEASE_RENEW) - 1));
        assert!(!l.fresh(7, 2_000 + ms(LEASE_RENEW)));
    }
}
