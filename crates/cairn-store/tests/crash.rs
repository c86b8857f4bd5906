//! Crash test: a writer runs in a child process (this test binary re-executed) and is SIGKILLed at
//! random moments, many times over the same data directory. After each kill the store is reopened and
//! every block is checked against the writer's log:
//!
//! * a block whose last mutation completed before the kill reads back exactly (page cache survives a
//!   process kill, so this is stronger than "everything flushed survives");
//! * a block the writer was mutating when killed reads as its old value, its new value, or is reported
//!   corrupt (a torn block) — never as bytes that were never written;
//! * every chunk mutated since the last completed flush is marked dirty.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cairn_store::{Store, StoreConfig, StoreError, WriteStamp};
use cairn_types::checksum::block_crcs;
use cairn_types::{BLOCK_SIZE_BYTES, ChunkIndex, ChunkSize, Generation, VolumeId};
use common::block_bytes;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHUNKS: u64 = 6;
const BLOCKS: u32 = 16;
const BS: usize = BLOCK_SIZE_BYTES as usize;
const ITERATIONS: u64 = 100;

fn size() -> ChunkSize {
    ChunkSize::new(BLOCKS * BLOCK_SIZE_BYTES).unwrap()
}

fn vol() -> VolumeId {
    VolumeId::new(11).unwrap()
}

/// The child: writes, trims and flushes forever (until killed), logging intents and completions.
/// Only runs when re-executed by `crash_at_random_moments` with CAIRN_CRASH_CHILD set.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("CAIRN_CRASH_CHILD") else {
        return;
    };
    let seed: u64 = std::env::var("CAIRN_CRASH_SEED").unwrap().parse().unwrap();
    let generation: u64 = std::env::var("CAIRN_CRASH_GEN").unwrap().parse().unwrap();
    let dir = std::path::PathBuf::from(dir);
    let mut log = std::fs::OpenOptions::new().append(true).create(true).open(dir.join("log")).unwrap();
    let store = Store::open(&dir.join("store"), StoreConfig { open_files_max: 3 }).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut sequence = 0;
    log.write_all(b"R\n").unwrap();
    loop {
        sequence += 1;
        let stamp = WriteStamp { generation: Generation(generation), sequence, expect: None };
        let chunk = rng.random_range(0..CHUNKS);
        let first = rng.random_range(0..BLOCKS);
        let n = rng.random_range(1..=(BLOCKS - first).min(6));
        match rng.random_range(0..20) {
            0 => {
                log.write_all(b"S\n").unwrap();
                store.flush(vol()).unwrap();
                log.write_all(b"F\n").unwrap();
            }
            1 | 2 => {
                log.write_all(format!("I {chunk} {first} {n} 0\n").as_bytes()).unwrap();
                store
                    .trim(
                        vol(),
                        ChunkIndex(chunk),
                        size(),
                        first * BLOCK_SIZE_BYTES,
                        n * BLOCK_SIZE_BYTES,
                        stamp,
                    )
                    .unwrap();
                log.write_all(b"D\n").unwrap();
            }
            _ => {
                let s: u64 = rng.random_range(1..u64::MAX - 16);
                let mut data = vec![0u8; n as usize * BS];
                for i in 0..n as usize {
                    block_bytes(s + i as u64, &mut data[i * BS..(i + 1) * BS]);
                }
                log.write_all(format!("I {chunk} {first} {n} {s}\n").as_bytes()).unwrap();
                store
                    .write(
                        vol(),
                        ChunkIndex(chunk),
                        size(),
                        first * BLOCK_SIZE_BYTES,
                        &data,
                        &block_crcs(&data),
                        stamp,
                    )
                    .unwrap();
                log.write_all(b"D\n").unwrap();
            }
        }
    }
}

#[derive(Debug, Clone)]
struct BlockModel {
    values: BTreeSet<u64>,
    may_be_corrupt: bool,
}

#[test]
fn crash_at_random_moments() {
    if std::env::var("CAIRN_CRASH_CHILD").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut model: HashMap<(u64, u32), BlockModel> = HashMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut kills_mid_write = 0;
    for iteration in 1..=ITERATIONS {
        let log_path = dir.path().join("log");
        let _ = std::fs::remove_file(&log_path);
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("CAIRN_CRASH_CHILD", dir.path())
            .env("CAIRN_CRASH_SEED", iteration.to_string())
            .env("CAIRN_CRASH_GEN", iteration.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the child has opened the store, then let it run a random while.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log_path).map(|s| s.starts_with("R\n")).unwrap_or(false) {
            assert!(Instant::now() < deadline, "crash child never started");
            assert!(child.try_wait().unwrap().is_none(), "crash child exited early");
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(200..40_000)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        // Replay the log into the model.
        let log = std::fs::read_to_string(&log_path).unwrap();
        let mut lines: Vec<&str> =
            log.split_inclusive('\n').filter(|l| l.ends_with('\n')).map(str::trim_end).collect();
        assert_eq!(lines.remove(0), "R");
        let mut since_flush: BTreeSet<u64> = BTreeSet::new();
        let mut pending: Option<(u64, u32, u32, u64)> = None;
        let mut flush_started_with: Option<BTreeSet<u64>> = None;
        for line in lines {
            let mut parts = line.split(' ');
            match parts.next().unwrap() {
                "I" => {
                    let v: Vec<u64> = parts.map(|p| p.parse().unwrap()).collect();
                    pending = Some((v[0], v[1] as u32, v[2] as u32, v[3]));
                }
                "D" => {
                    let (chunk, first, n, s) = pending.take().unwrap();
                    for i in 0..n {
                        let seed = if s == 0 { 0 } else { s + u64::from(i) };
                        model.insert(
                            (chunk, first + i),
                            BlockModel { values: [seed].into(), may_be_corrupt: false },
                        );
                    }
                    since_flush.insert(chunk);
                }
                "S" => flush_started_with = Some(since_flush.clone()),
                "F" => {
                    let covered = flush_started_with.take().unwrap();
                    since_flush.retain(|c| !covered.contains(c));
                }
                other => panic!("bad log line {other:?}"),
            }
        }
        let wrote_something = log.contains("\nD\n");
        // The mutation in flight at the kill: each block may hold its old or new value or be torn; if
        // any block changed, the chunk must be dirty (checked below, once the blocks are read).
        let mut in_flight: Option<(u64, BTreeSet<u64>, u32, u32)> = None;
        if let Some((chunk, first, n, s)) = pending {
            kills_mid_write += 1;
            let mut new_values = BTreeSet::new();
            for i in 0..n {
                let seed = if s == 0 { 0 } else { s + u64::from(i) };
                let m = model
                    .entry((chunk, first + i))
                    .or_insert(BlockModel { values: [0].into(), may_be_corrupt: false });
                if !m.values.contains(&seed) {
                    new_values.insert(seed);
                }
                m.values.insert(seed);
                m.may_be_corrupt = true;
            }
            in_flight = Some((chunk, new_values, first, n));
        }
        // A flush in progress at the kill may or may not have cleaned its chunks: only chunks mutated
        // after the last completed flush must be dirty, and those the in-progress flush did not cover.
        if let Some(covered) = flush_started_with {
            since_flush.retain(|c| !covered.contains(c));
        }

        // Verify.
        let store = Store::open(&dir.path().join("store"), StoreConfig::default()).unwrap();
        let dirty: BTreeSet<u64> = store.dirty_chunks(vol()).unwrap().into_iter().map(|c| c.0).collect();
        let on_disk: BTreeSet<u64> = store.list_chunks(vol()).unwrap().into_iter().map(|c| c.0).collect();
        // (A trim of a chunk that does not exist changes nothing and creates nothing.)
        for c in since_flush.intersection(&on_disk) {
            assert!(
                dirty.contains(c),
                "iteration {iteration}: chunk {c} changed since the last flush but is not dirty"
            );
        }
        let highest = store.highest_generation(vol()).unwrap();
        if wrote_something {
            assert_eq!(highest, Generation(iteration));
        } else {
            assert!(highest <= Generation(iteration));
        }
        let mut expect = vec![0u8; BS];
        for chunk in 0..CHUNKS {
            for block in 0..BLOCKS {
                let m = model
                    .entry((chunk, block))
                    .or_insert(BlockModel { values: [0].into(), may_be_corrupt: false });
                match store.read(vol(), ChunkIndex(chunk), size(), block * BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES)
                {
                    Ok(r) => {
                        let hit = m.values.iter().copied().find(|s| {
                            block_bytes(*s, &mut expect);
                            expect == r.data
                        });
                        let Some(hit) = hit else {
                            panic!(
                                "iteration {iteration}: chunk {chunk} block {block} holds bytes never written"
                            );
                        };
                        *m = BlockModel { values: [hit].into(), may_be_corrupt: false };
                        if let Some((c, new_values, first, n)) = &in_flight
                            && *c == chunk
                            && (*first..first + n).contains(&block)
                            && new_values.contains(&hit)
                        {
                            assert!(
                                dirty.contains(&chunk),
                                "iteration {iteration}: chunk {chunk} changed but is not dirty"
                            );
                        }
                    }
                    Err(StoreError::Corrupt { .. }) => {
                        assert!(
                            m.may_be_corrupt,
                            "iteration {iteration}: chunk {chunk} block {block} corrupt but not torn"
                        );
                        assert!(
                            dirty.contains(&chunk),
                            "iteration {iteration}: chunk {chunk} torn but not dirty"
                        );
                    }
                    Err(e) => panic!("iteration {iteration}: chunk {chunk} block {block}: {e}"),
                }
            }
        }
    }
    eprintln!("{ITERATIONS} kills, {kills_mid_write} in the middle of a mutation");
}
