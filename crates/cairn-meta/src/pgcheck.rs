//! What a storage node's cluster map says of a mutation's `missed_by`: the check a node makes
//! before it applies a client mutation and again after (see ARCHITECTURE.md "Catch-up", items 2
//! and 11), apart from I/O.
//!
//! A node refuses ("stale cluster map", the writer refreshes and re-sends) a mutation that names
//! as missed a node that is in sync and holds the chunk's PG (it may already serve reads: it must
//! get the mutation itself), that leaves out a node being filled with a copy of the PG, or of a PG
//! the node does not hold; and it does not acknowledge one during which the PG's membership
//! interval moved. Whatever the writer named, it records every mutation it applies as missed by
//! the PG's backfill members in its own map.
//!
//! Used by `cairn-node` (per request, through an index rebuilt per map epoch) and by the data-path
//! simulation (`cairn-sim`, `production` model).

use crate::state::ClusterState;
use cairn_types::placement::pg_of;
use cairn_types::{ChunkIndex, VolumeId};
use std::collections::{BTreeMap, HashMap, HashSet};

/// A chunk's PG in a node's cluster map, and what it says of a mutation's `missed_by`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgCheck {
    /// `Some(why)` if the writer's map is stale: the mutation names a node that is in sync and
    /// holds the PG (it may already serve reads: it must get the mutation itself), or leaves out
    /// a node being filled with a copy of the PG, or the PG is not this node's.
    pub stale: Option<String>,
    /// The PG's membership interval (grows with every member added or admitted): a mutation
    /// checked before it is applied is not acknowledged from here if it moved meanwhile.
    pub interval: u64,
    /// The PG's backfill members other than this node: every mutation applied here, and every copy
    /// installed here while this node holds the PG, is recorded as missed by them (whatever the
    /// writer named), so that their fill gets it.
    pub backfill: Vec<u64>,
    /// Whether this node holds the PG.
    pub holder: bool,
    /// Whether this node's map knows the volume (`interval` is then its PG set's, else the sum over
    /// every set the chunk's PG could be in).
    pub known: bool,
}

impl PgCheck {
    /// For a mutation applied and checked again (`self`, the look after): why it must not be
    /// acknowledged from here, if this map now finds the writer's stale or the PG's members
    /// changed since the look before (`pre`). Either a node it names is now in sync and holds the
    /// PG, or it leaves out a node now being filled (a listing of the PG's chunks for that node
    /// made after this node's map showed the fill may have come before this mutation, so the
    /// re-send must name it), or a fill began or ended while it was applied.
    pub fn refusal(&self, pre: Option<&PgCheck>) -> Option<String> {
        match (&self.stale, pre) {
            (Some(why), _) => Some(why.clone()),
            (None, Some(pre)) if pre.interval != self.interval => Some(
                "stale cluster map: this chunk's PG changed members while the mutation was applied; refresh the map"
                    .to_string(),
            ),
            _ => None,
        }
    }

    /// For a mutation routed by a writer's map in which the chunk's PG had membership interval
    /// `writer_interval`: why it must be refused, if this node's map is newer for that PG. A writer
    /// whose map predates a member (a node that joined and was filled and admitted since) neither
    /// sends it the mutation nor names it as having missed it, and no other check catches that
    /// omission: acknowledged by the older members, the write would be missing on a member that
    /// serves reads, with no record to copy it (found by the simulation of production's data path,
    /// `cairn-sim` `production`). A writer with a newer map than this node's is accepted: it
    /// routes and names by the newer membership.
    pub fn writer_behind(&self, writer_interval: u64) -> Option<String> {
        (self.known && writer_interval < self.interval).then(|| {
            format!(
                "stale cluster map: this chunk's PG changed members since the writer's map (interval {writer_interval}, \
                 {} here); refresh the map",
                self.interval
            )
        })
    }

    /// A mutation's records: the peers the writer named, and the backfill members of the chunk's
    /// PG in this node's map now (whatever the writer's map said: a node being filled gets every
    /// mutation applied here after its seed).
    pub fn to_record(now: Option<&PgCheck>, missed_by: &[u64]) -> Vec<u64> {
        let mut peers = missed_by.to_vec();
        for p in now.map(|c| c.backfill.as_slice()).unwrap_or_default() {
            if !peers.contains(p) {
                peers.push(*p);
            }
        }
        peers
    }
}

/// Per PG: (holders, backfill members, interval).
type Rows = Vec<(Vec<u64>, Vec<u64>, u64)>;

/// One map's answers to [`PgCheck`] questions, built once per map epoch.
#[derive(Debug, Clone, Default)]
pub struct PgIndex {
    pg_count: u32,
    /// Live volumes' copies.
    volumes: HashMap<u64, u8>,
    /// Per replica count, per PG.
    sets: BTreeMap<u8, Rows>,
    /// Nodes in sync.
    in_sync: HashSet<u64>,
}

impl PgIndex {
    pub fn new(s: &ClusterState) -> Self {
        let volumes = s.volumes.values().map(|v| (v.id, v.replicas)).collect();
        let sets = s
            .pg_sets
            .iter()
            .map(|(r, set)| {
                let rows = (0..s.pg_count)
                    .map(|pg| {
                        let interval = set.get(pg as usize).map(|a| a.interval).unwrap_or(0);
                        (s.holders(*r, pg), s.backfill(*r, pg), interval)
                    })
                    .collect();
                (*r, rows)
            })
            .collect();
        let in_sync = s.nodes.values().filter(|n| n.in_sync()).map(|n| n.id).collect();
        PgIndex { pg_count: s.pg_count, volumes, sets, in_sync }
    }

    /// The membership interval of `chunk`'s PG for a volume of `replicas` copies (what a writer
    /// routing by this map sends with a mutation); 0 if this map has no such PG set.
    pub fn interval(&self, replicas: u8, volume: VolumeId, chunk: ChunkIndex) -> u64 {
        let pg = pg_of(volume, chunk, self.pg_count).0 as usize;
        self.sets.get(&replicas).and_then(|set| set.get(pg)).map(|row| row.2).unwrap_or(0)
    }

    /// Node `me`'s check of a mutation of `chunk` of `volume` naming `missed_by`.
    pub fn check(&self, me: u64, volume: VolumeId, chunk: ChunkIndex, missed_by: &[u64]) -> PgCheck {
        let pg = pg_of(volume, chunk, self.pg_count).0 as usize;
        // A volume this map does not know yet (created since): every set its PG could be in is
        // checked for holders; its writers' maps are newer than this one, so they name whatever
        // backfill members it has.
        let known = self.volumes.get(&volume.get());
        let rows: Vec<&(Vec<u64>, Vec<u64>, u64)> = match known {
            Some(r) => self.sets.get(r).and_then(|set| set.get(pg)).into_iter().collect(),
            None => self.sets.values().filter_map(|set| set.get(pg)).collect(),
        };
        let mut check = PgCheck::default();
        for (holders, backfill, interval) in rows.iter().copied() {
            check.interval += interval;
            if known.is_none() {
                continue;
            }
            check.known = true;
            check.holder = holders.contains(&me);
            check.backfill = backfill.iter().copied().filter(|n| *n != me).collect();
        }
        if known.is_some() && !check.holder {
            // (A writer routing by a view older than the PG's set, say.)
            check.stale =
                Some("stale cluster map: this node does not hold this chunk's PG; refresh the map".into());
        }
        for (holders, backfill, _) in rows.iter() {
            if let Some(p) = missed_by.iter().find(|p| self.in_sync.contains(p) && holders.contains(p)) {
                check.stale = Some(format!(
                    "stale cluster map: node {p} is in sync and holds this chunk's PG; refresh the map"
                ));
            } else if let Some(p) = backfill.iter().find(|p| known.is_some() && !missed_by.contains(p)) {
                check.stale = Some(format!(
                    "stale cluster map: node {p} is being filled with a copy of this chunk's PG and must be named \
                     as having missed the mutation; refresh the map"
                ));
            }
        }
        check
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, NodeAddr};

    fn pool(nodes: u64) -> ClusterState {
        let mut s = ClusterState { pg_count: 4, ..ClusterState::default() };
        for id in 1..=nodes {
            let addr = NodeAddr { rpc: format!("n{id}"), ..NodeAddr::default() };
            s.apply(Command::RegisterNode { id, addr, voter: true, capacity_bytes: 1 << 40, time_ms: 0 });
        }
        s.apply(Command::CreateVolume {
            name: "v".into(),
            size_bytes: 1 << 30,
            chunk_size_bytes: 1 << 20,
            replicas: 3,
            shared: false,
            time_ms: 0,
        });
        s
    }

    #[test]
    fn a_writer_whose_map_predates_a_join_is_refused_by_nodes_that_know_it() {
        let mut s = pool(3);
        let v = VolumeId::new(s.volumes["v"].id).unwrap();
        let chunk = ChunkIndex(0);
        let old = PgIndex::new(&s).interval(3, v, chunk);
        s.apply(Command::RegisterNode {
            id: 4,
            addr: NodeAddr { rpc: "n4".into(), ..NodeAddr::default() },
            voter: false,
            capacity_bytes: 1 << 40,
            time_ms: 1,
        });
        let index = PgIndex::new(&s);
        let pg = pg_of(v, chunk, s.pg_count).0;
        let holder = s.holders(3, pg)[0];
        let check = index.check(holder, v, chunk, &[]);
        if s.backfill(3, pg).is_empty() {
            // The join did not touch this chunk's PG: its interval did not move.
            assert_eq!(check.writer_behind(old), None);
        } else {
            assert!(check.writer_behind(old).is_some_and(|why| why.contains("stale cluster map")));
            assert_eq!(check.writer_behind(index.interval(3, v, chunk)), None, "the current map is accepted");
            assert_eq!(check.writer_behind(u64::MAX), None, "a writer with a newer map is accepted");
        }
        // Some PG took the new node in; its writers with the old map are refused.
        let moved = (0..s.pg_count).find(|p| !s.backfill(3, *p).is_empty()).unwrap();
        let c = (0..1024).map(ChunkIndex).find(|c| pg_of(v, *c, s.pg_count).0 == moved).unwrap();
        let check = index.check(s.holders(3, moved)[0], v, c, &[4]);
        assert!(check.known && check.stale.is_none());
        assert!(check.writer_behind(index.interval(3, v, c) - 1).is_some());
    }
}
