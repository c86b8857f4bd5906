//! Runs the simulation of production's data path (`cairn_sim::production`) over many seeds.
//! `CAIRN_SIM_SEEDS=N` runs N seeds (default 10 000, about 50 s), `CAIRN_SIM_FIRST=S` starts at seed S; a
//! failure prints the seed and the last lines of its trace, and replays exactly (`CAIRN_SIM_TRACE=1`
//! prints the whole trace). The seeds that fail without a rule are found again with the ignored
//! search whenever the model changes (its random draws move); each comment describes the shape
//! first found.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cairn_sim::production::{Options, ProductionStats, run_production_seed, run_production_seed_with};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn production_seeds_keep_every_invariant() {
    let first = env("CAIRN_SIM_FIRST", 0);
    let count = env("CAIRN_SIM_SEEDS", 10_000);
    let mut t = ProductionStats::default();
    for seed in first..first + count {
        match run_production_seed(seed) {
            Ok(s) => t.add(&s),
            Err(e) => panic!("seed {seed} failed (replay: CAIRN_SIM_FIRST={seed} CAIRN_SIM_SEEDS=1):\n{e}"),
        }
    }
    println!("{count} seeds from {first}: {t:?}");
    if count < 100 {
        return;
    }
    // The runs must exercise what they claim to: writes acknowledged and reads checked, catch-ups
    // ended, joins filled and admitted, writes held back for a lease.
    assert!(t.writes_acked > count * 50, "{t:?}");
    assert!(t.reads_checked > count * 50, "{t:?}");
    assert!(
        t.catch_ups > count && t.fills > count / 4 && t.holdbacks > 0 && t.power_losses > count / 10,
        "{t:?}"
    );
    // Writer handovers happen in most seeds and every one's open returns; some chunks are revived.
    assert!(t.handovers > count / 2 && t.opens == t.handovers && t.revivals > 0, "{t:?}");
}

/// Runs seeds `CAIRN_SIM_FIRST..` (`count_var` of them, default 3000) with `options`, which change
/// every seed's schedule (so they run as seeds of their own); returns the count and the totals.
fn seeds_with(what: &str, count_var: &str, options: Options) -> (u64, ProductionStats) {
    let first = env("CAIRN_SIM_FIRST", 0);
    let count = env(count_var, 3_000);
    let mut t = ProductionStats::default();
    for seed in first..first + count {
        match run_production_seed_with(seed, options) {
            Ok(s) => t.add(&s),
            Err(e) => {
                panic!("seed {seed} failed with {what} (replay: CAIRN_SIM_FIRST={seed} {count_var}=1):\n{e}")
            }
        }
    }
    println!("{count} seeds from {first} with {what}: {t:?}");
    (count, t)
}

/// Partitions that lose one direction's messages only (a node's requests arrive but its answers
/// do not, or the other way round) keep every invariant too.
#[test]
fn one_way_partitions_keep_every_invariant() {
    let options = Options { one_way_partitions: true, ..Options::default() };
    let (count, t) = seeds_with("one-way partitions", "CAIRN_SIM_ONE_WAY_SEEDS", options);
    if count >= 100 {
        assert!(t.one_way_cuts > count / 4 && t.writes_acked > count * 50 && t.opens > count / 2, "{t:?}");
    }
}

/// Flushes that cover only the PGs the client's acknowledged writes touched since they were
/// last flushed, and FUA writes (flushed at once, their PG only), keep every invariant too — a
/// flushed write survives a power loss of every node (I1).
#[test]
fn pg_flushes_keep_every_invariant() {
    let options = Options { pg_flushes: true, ..Options::default() };
    let (count, t) = seeds_with("PG flushes", "CAIRN_SIM_PG_FLUSH_SEEDS", options);
    if count >= 100 {
        assert!(t.fua_writes > count * 5 && t.flushes > count && t.pool_power_losses > count / 20, "{t:?}");
    }
}

/// Writes of a chunk whose version the writer does not know (after a failed or conflicting
/// write) that first make the in-sync copies identical, as production's `settle_chunk`, keep
/// every invariant too.
#[test]
fn writer_settles_keep_every_invariant() {
    let options = Options { writer_settles: true, ..Options::default() };
    let (count, t) = seeds_with("writer settles", "CAIRN_SIM_SETTLE_SEEDS", options);
    if count >= 100 {
        assert!(
            t.settles > count / 10 && t.settle_installs > count / 50 && t.writes_acked > count * 50,
            "{t:?}"
        );
    }
}

/// A writer whose map predates a node's join (cut from the metadata leader meanwhile) wrote to the
/// PG's older members only, without naming the new member, after it had been filled and admitted:
/// acknowledged, unrecorded, and then read back old from the new member. Nodes now refuse a
/// mutation routed by an older PG membership than theirs (`PgCheck::writer_behind`).
#[test]
fn without_the_writer_interval_check_a_writer_with_an_old_map_loses_a_write() {
    fails_only_without(7729, Options { check_writer_interval: false, ..Options::default() });
}

/// A PG that took in a filled node has four holders; a write acknowledged by a majority of R (two
/// of them) was missed by the other two: one cut off from the writer, one catching up after a
/// power loss, which was given the write by a peer, then pulled its own copy back from the first
/// one (in sync, without the write) and was left without it and without a record (I1 once the
/// pool settled). Writes now need all holders but R − q (found by review, for another shape). Since
/// copies name their source (`Options::copies_name_source`), the peer refuses the first one's copy
/// there too: either rule closes this seed.
#[test]
fn without_the_grown_pg_write_quorum_two_holders_miss_an_acknowledged_write() {
    fails_only_without(
        14_246,
        Options { all_holders_but_r_minus_q: false, copies_name_source: false, ..Options::default() },
    );
}

/// Two nodes catching up, each holding records for the other, each with a copy newer than the one
/// in-sync replica's (failed writes' leftovers): relaying that replica's older copy and keeping the
/// record until it could copy its own (once in sync), each waited for the other for good — the
/// pool never settled (found by a run of 400 000 seeds). Now a relayer's newer copy follows the
/// relayed one and the record is done.
#[test]
fn two_nodes_catching_up_with_newer_copies_do_not_wait_for_each_other() {
    run_production_seed(293_876).unwrap();
}

/// Nodes that did not check the writer generation (neither the fence an open raised nor their
/// map's) applied a handed-over writer's write after the new writer's open had returned, and the
/// old writer got it acknowledged (I3).
#[test]
fn without_fencing_an_old_writer_gets_a_write_acknowledged_after_the_new_writers_open() {
    fails_only_without(1, Options { fence: false, ..Options::default() });
}

/// A node catching up compared a chunk dirty on it, written by the current writer, with an in-sync
/// replica that had not got that write yet, recorded it as missed by itself and pulled the older
/// copy back over it: the write, acknowledged with this node among its appliers, was then missing
/// here with nobody recording it, and a read returned the older copy (I2). The comparison now
/// leaves a copy of the current writer generation alone (it differs only by writes in flight).
#[test]
fn without_the_current_generation_rule_a_catch_up_pulls_back_over_an_acknowledged_write() {
    fails_only_without(16_059, Options { compare_keeps_newer: false, ..Options::default() });
}

fn fails_only_without(seed: u64, options: Options) {
    let failure =
        run_production_seed_with(seed, options).expect_err("the seed finds the hole without the rule");
    assert!(
        failure.starts_with("I1:") || failure.starts_with("I2:") || failure.starts_with("I3:"),
        "{failure}"
    );
    run_production_seed(seed).unwrap();
}

/// Finds seeds that fail with a rule left out (the relay rule, `Options::relay_keeps_newer`, found
/// by seed 668 of an earlier fault mix, has none in the current one within 30 000 seeds).
#[test]
#[ignore = "a search, not a test: finds seeds that fail with a rule left out"]
fn search_seeds_failing_without_a_rule() {
    let first = env("CAIRN_SIM_FIRST", 0);
    let count = env("CAIRN_SIM_SEEDS", 10_000);
    for (name, options) in [
        ("check_writer_interval", Options { check_writer_interval: false, ..Options::default() }),
        ("relay_keeps_newer", Options { relay_keeps_newer: false, ..Options::default() }),
        ("all_holders_but_r_minus_q", Options { all_holders_but_r_minus_q: false, ..Options::default() }),
        ("revive", Options { revive: false, ..Options::default() }),
        ("fence", Options { fence: false, ..Options::default() }),
        ("reconcile_dirty", Options { reconcile_dirty: false, ..Options::default() }),
        ("compare_keeps_newer", Options { compare_keeps_newer: false, ..Options::default() }),
        ("fresh_states", Options { fresh_states: false, ..Options::default() }),
        (
            "unsure_copy_confirms_nothing",
            Options { unsure_copy_confirms_nothing: false, ..Options::default() },
        ),
        ("pull_newest", Options { pull_newest: false, ..Options::default() }),
        ("open_names_after", Options { open_names_after: false, ..Options::default() }),
        ("settled_records_replace", Options { settled_records_replace: false, ..Options::default() }),
        ("copies_name_source", Options { copies_name_source: false, ..Options::default() }),
        ("fill_members_settled", Options { fill_members_settled: false, ..Options::default() }),
        ("settled_overrides_records", Options { settled_overrides_records: false, ..Options::default() }),
        ("copies_carry_dirty", Options { copies_carry_dirty: false, ..Options::default() }),
        ("records_need_quorum", Options { records_need_quorum: false, ..Options::default() }),
        ("installs_check_generation", Options { installs_check_generation: false, ..Options::default() }),
        ("unfenced_strays_relayed", Options { unfenced_strays_relayed: false, ..Options::default() }),
        ("refusers_recorded", Options { refusers_recorded: false, ..Options::default() }),
        ("down_nodes_relay", Options { down_nodes_relay: false, ..Options::default() }),
        ("unsure_takes_newer", Options { unsure_takes_newer: false, ..Options::default() }),
        // (Rules that close the same shapes, left out together.)
        (
            "copies_name_source+relays",
            Options {
                copies_name_source: false,
                unfenced_strays_relayed: false,
                down_nodes_relay: false,
                ..Options::default()
            },
        ),
        (
            "records_need_quorum+refusers_recorded",
            Options { records_need_quorum: false, refusers_recorded: false, ..Options::default() },
        ),
        (
            "unfenced_strays_relayed+down_nodes_relay",
            Options { unfenced_strays_relayed: false, down_nodes_relay: false, ..Options::default() },
        ),
    ] {
        // `CAIRN_SIM_RULE=name` searches for that rule only.
        if std::env::var("CAIRN_SIM_RULE").is_ok_and(|r| r != name) {
            continue;
        }
        let found: Vec<u64> = (first..first + count)
            .filter(|seed| {
                run_production_seed_with(*seed, options).is_err_and(|e| {
                    e.starts_with("I1:")
                        || e.starts_with("I2:")
                        || e.starts_with("I3:")
                        || e.contains("did not settle")
                })
            })
            .take(3)
            .collect();
        println!("without {name}: {found:?}");
    }
}

/// Counts the seeds that fail with Linux's writeback interval (5–30 s instead of 1–4 s): unflushed
/// data stays exposed longer, and after a power loss of every node a revival can leave a holder's
/// newer copy that the catch-up then never replaces (the known gap in ARCHITECTURE.md). A search,
/// not a test, until that gap is closed.
#[test]
#[ignore = "a search, not a test: the known gap after a power loss of every node"]
fn search_seeds_failing_with_a_long_writeback() {
    let first = env("CAIRN_SIM_FIRST", 0);
    let count = env("CAIRN_SIM_SEEDS", 3_000);
    let options = Options { writeback_ms: (5_000, 30_000), ..Options::default() };
    let failed: Vec<(u64, String)> = (first..first + count)
        .filter_map(|seed| {
            let e = run_production_seed_with(seed, options).err()?;
            Some((seed, e.lines().next().unwrap_or("").chars().take(100).collect()))
        })
        .collect();
    println!("{} of {count} seeds from {first} fail with a 5–30 s writeback:", failed.len());
    for (seed, why) in failed.iter().take(20) {
        println!("  {seed}: {why}");
    }
}

/// A power cut of every node lost a write acknowledged but not yet flushed; the writer's next
/// write of the chunk expected its version, and every attempt found some holders behind it and the
/// rest not serving yet — never all behind — so it treated them as failing, sent them to catch up,
/// and failed only after `io_timeout` (found by a run of a million seeds, seed 114 226). Now more
/// holders behind than may lack an acknowledged write mean it was lost: the write fails at once and
/// the next one expects no version.
#[test]
fn a_write_lost_by_a_power_cut_of_every_node_does_not_stall_the_next_one() {
    run_production_seed(114_226).unwrap();
}

/// A node back from a power loss, unsure of a chunk it had applied a write to, confirmed the
/// writer's record of that write (its copy still held it), so the write was acknowledged with it
/// as an applier; it then pulled its copy back from an in-sync replica that had not got the write
/// yet, and served the older copy (I2; found by a run of a million seeds, seed 201 397). A node now
/// refuses to confirm a record for a chunk it recorded itself as missing — and pulls its copy back
/// only from the newest in-sync copy once writes in flight are past (below): either rule alone
/// closes this seed.
#[test]
fn without_the_unsure_copy_rules_a_power_lost_node_vouches_for_a_write_it_then_pulls_back() {
    fails_only_without(
        201_397,
        Options { unsure_copy_confirms_nothing: false, pull_newest: false, ..Options::default() },
    );
}

/// A node answered a write, lost power before the writer acknowledged it, restarted and pulled its
/// copy back at once from an in-sync replica the write had not reached yet; the write was then
/// acknowledged with it among its appliers, and it was gone from it, unrecorded (I1; found by the
/// long run, seed 383 903). A node now pulls its own copies back only `PULL_OWN_AFTER` after it
/// started (a writer's attempt is over by then), from the newest in-sync copy.
#[test]
fn without_pulling_the_newest_copy_late_a_power_lost_node_loses_a_write_it_answered() {
    fails_only_without(91_343, Options { pull_newest: false, ..Options::default() });
}

/// An old writer's write, never acknowledged, reached one holder only; the new writer's open
/// reconciled the chunk without that holder (it was catching up) and recorded it as having missed
/// the chunk — but the copy the record sent was lower than the leftover, which the catch-up kept
/// (one writer's versions grow along one chain), so two copies were served after the open (I3's
/// second clause, seed 7978). An open's records now carry its generation (`RecordMissed::settled`),
/// and their copy goes over one of an older generation whatever its version.
#[test]
fn without_settled_records_a_fenced_writers_leftover_outlives_the_open() {
    fails_only_without(7978, Options { settled_records_replace: false, ..Options::default() });
}

/// The holder left out of an open's reconciliation held an old writer's leftover and a record, from
/// that writer's write, of a peer having missed the chunk: it pushed the leftover to that peer,
/// over the copy the open had settled there, and two copies were served after the open (I3's
/// second clause, seed 10 234). A copy now names the node it is from, and a peer that recorded that
/// node as having missed the chunk refuses it. (The rules below that have a node relay an in-sync
/// replica's copy instead of its own — it missed the fence, or its map shows it down — close this
/// seed too: all three are left out.)
#[test]
fn without_copies_naming_their_source_a_leftover_is_pushed_over_a_settled_copy() {
    fails_only_without(
        18_717,
        Options {
            copies_name_source: false,
            unfenced_strays_relayed: false,
            down_nodes_relay: false,
            ..Options::default()
        },
    );
}

/// A holder frozen through the new writer's open took a last write of the old writer (its map
/// still showed the old generation), never acknowledged, and copied it — its own copy, dirty — to
/// a node being filled that its record named, before its own catch-up compared it; the fill member
/// served it beside the settled copy (I3's second clause, seed 98 655). A node that missed the
/// current writer's fence now passes on an in-sync replica's copy of a chunk dirty on it of an
/// older generation. (So does a node its map shows down, which also closes this seed in the current
/// model: both are left out.)
#[test]
fn without_relaying_unfenced_strays_a_stray_reaches_a_fill_member_after_the_open() {
    fails_only_without(
        98_655,
        Options { unfenced_strays_relayed: false, down_nodes_relay: false, ..Options::default() },
    );
}

/// The new writer, cut off from all holders of a chunk but one, settled it on the states the fence
/// had reported and had the holder left out recorded as missing the chunk — on the one holder it
/// could reach. The left-out holder kept its read lease from another and served its own copy
/// beside the settled one (I3's second clause, seed 84 316). The open now goes on only once a
/// quorum of the holders recorded it (a holder serves only with leases from all but q − 1 others).
/// (Recording the holders that do not confirm, below, also closes this seed now: both are left
/// out; no seed in 0–150 000 fails without the quorum alone.)
#[test]
fn without_a_quorum_of_records_a_left_out_holder_serves_its_copy_after_the_open() {
    fails_only_without(
        84_316,
        Options { records_need_quorum: false, refusers_recorded: false, ..Options::default() },
    );
}

/// A holder catching up compared a chunk the old writer left dirty and recorded itself as missing
/// it, after the fence had reported its copy (the old writer's last write, never acknowledged):
/// the open, on that fresh report, settled the chunk on that copy and installed it on the two
/// others, while the holder pulled its own copy back from one of them just before — the older
/// one. It then refused the open's record (its copy had moved) and was only suspected; nobody
/// recorded it as missing the chunk, and two copies were served after the open (I3's second
/// clause, seed 280 668, found by the long run). A holder that does not confirm the open's record
/// is now recorded in turn, settled, on those that did.
#[test]
fn without_recording_a_holder_that_refused_the_opens_record_it_serves_an_older_copy() {
    fails_only_without(280_668, Options { refusers_recorded: false, ..Options::default() });
}

/// A holder the open had fenced took an old writer's last write, never acknowledged, then was cut
/// off from the pool; the open recorded it as missing the chunk on the others. Back before the
/// leader had marked it up (its map showed it down, not catching up), it copied its own copy —
/// that stray — to a node being filled, then pulled its own back; the new member served the stray
/// beside the settled copy (I3's second clause, seed 517 693, found by the long run). A node its
/// map shows down now passes on an in-sync replica's copy, as one catching up does.
#[test]
fn without_down_nodes_relaying_a_cut_off_holder_gives_a_stray_to_a_new_member() {
    fails_only_without(517_693, Options { down_nodes_relay: false, ..Options::default() });
}

/// A write, never acknowledged, reached node 1 alone, which recorded node 2 as having missed it,
/// then lost power: its copy went back to the flushed one, and it recorded itself as unsure of it.
/// A later attempt reached node 2 alone, which recorded nodes 1 and 3. Every holder then caught
/// up with none in sync: node 1 refused node 2's copy (it had recorded node 2), and a revival found
/// every copy recorded as missed by someone — the pool never settled (seed 643 095, found by the
/// long run). A node unsure of its copy now takes a newer one from a peer it recorded by writes
/// only (`Options::unsure_takes_newer`).
#[test]
fn without_an_unsure_node_taking_a_newer_copy_two_power_lost_holders_never_settle() {
    let failure =
        run_production_seed_with(643_095, Options { unsure_takes_newer: false, ..Options::default() })
            .expect_err("the seed finds the hole without the rule");
    assert!(failure.contains("did not settle"), "{failure}");
    run_production_seed(643_095).unwrap();
}
