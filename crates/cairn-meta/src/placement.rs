//! The placement-group balancer: weighted rendezvous hashing (highest random weight).
//!
//! For placement group `pg` and node `n` with weight `w`, the score is `w / -ln(u)` where `u` in
//! (0, 1) is derived from `xxh3_64_with_seed(pg_le32 ‖ node_le64, PG_TABLE_SEED)`. A PG's replicas
//! are the nodes with the highest scores, in descending order. Scores of one (pg, node) pair never
//! depend on the other nodes, so when a node joins only the PGs where it scores among the top
//! `width` change, and when one leaves only the PGs that held it change: minimal movement.
//! The hash, seed and formula are fixed forever (a change would move data).

use std::collections::BTreeMap;

/// Seed of the balancer hash ("cairn_pt"). Never change it.
pub const PG_TABLE_SEED: u64 = 0x6361_6972_6e5f_7074;

/// Default number of placement groups in a pool: 256. With 3 replicas that is 768 PG replicas, so
/// up to ~25 nodes each hold at least 30 and load evens out within a few percent; the table (and the
/// per-PG state that recovery keeps) stays a few kilobytes. Fixed when the pool is created.
pub const PG_COUNT_DEFAULT: u32 = 256;

/// Most replicas a PG lists (the largest replica count a volume may have).
pub const PG_WIDTH_MAX: usize = 5;

fn score(pg: u32, node: u64, weight: u32) -> f64 {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(&pg.to_le_bytes());
    key[4..].copy_from_slice(&node.to_le_bytes());
    let h = xxhash_rust::xxh3::xxh3_64_with_seed(&key, PG_TABLE_SEED);
    // 53 random bits → u in (0, 1), never 0 or 1.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight) / -u.ln()
}

/// The ordered replica list of one PG among `nodes` (id → weight; weight 0 nodes are skipped).
pub fn place_pg(pg: u32, nodes: &BTreeMap<u64, u32>, width: usize) -> Vec<u64> {
    let mut scored: Vec<(f64, u64)> =
        nodes.iter().filter(|(_, w)| **w > 0).map(|(id, w)| (score(pg, *id, *w), *id)).collect();
    // Descending score; ties (practically impossible) broken by node id for determinism.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(width).map(|(_, id)| id).collect()
}

/// The whole PG table.
pub fn pg_table(nodes: &BTreeMap<u64, u32>, pg_count: u32, width: usize) -> Vec<Vec<u64>> {
    (0..pg_count).map(|pg| place_pg(pg, nodes, width)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(ids: &[u64]) -> BTreeMap<u64, u32> {
        ids.iter().map(|id| (*id, 100)).collect()
    }

    #[test]
    fn pinned_placement_never_changes() {
        let t = pg_table(&nodes(&[1, 2, 3, 4]), 4, 3);
        assert_eq!(t, PINNED);
    }

    const PINNED: [[u64; 3]; 4] = [[2, 4, 3], [4, 1, 2], [4, 1, 3], [4, 1, 2]];

    #[test]
    fn spread_is_even() {
        let t = pg_table(&nodes(&[1, 2, 3, 4, 5, 6]), PG_COUNT_DEFAULT, 3);
        let mut count = BTreeMap::new();
        for row in &t {
            for n in row {
                *count.entry(*n).or_insert(0) += 1;
            }
        }
        // 768 replicas over 6 nodes = 128 each; allow ±25 %.
        for (n, c) in count {
            assert!((96..=160).contains(&c), "node {n} holds {c} PG replicas");
        }
    }

    proptest! {
        #[test]
        fn adding_a_node_moves_only_what_must_move(n in 3u64..12, width in 1usize..=5) {
            let before_nodes: BTreeMap<u64, u32> = (1..=n).map(|i| (i, 100)).collect();
            let mut after_nodes = before_nodes.clone();
            after_nodes.insert(n + 1, 100);
            let before = pg_table(&before_nodes, 256, width);
            let after = pg_table(&after_nodes, 256, width);
            for (b, a) in before.iter().zip(&after) {
                // Either unchanged, or the new node entered and everything else kept its order.
                if a != b {
                    prop_assert!(a.contains(&(n + 1)));
                    let kept: Vec<u64> = a.iter().copied().filter(|x| *x != n + 1).collect();
                    prop_assert_eq!(&kept[..], &b[..kept.len()]);
                }
            }
        }

        #[test]
        fn rows_are_distinct_nodes(n in 1u64..10, width in 1usize..=5) {
            let t = pg_table(&(1..=n).map(|i| (i, 100)).collect(), 64, width);
            for row in t {
                prop_assert_eq!(row.len(), width.min(n as usize));
                let mut s = row.clone();
                s.sort();
                s.dedup();
                prop_assert_eq!(s.len(), row.len());
            }
        }
    }
}
