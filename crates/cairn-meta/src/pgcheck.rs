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
use std::collections::{HashMap, HashSet};

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
    sets: HashMap<u8, Rows>,
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
