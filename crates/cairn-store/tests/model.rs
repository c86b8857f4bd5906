//! Property test: random sequences of write / trim / write-zeroes / read / flush / reopen, some with an
//! injected IO failure, checked against a simple in-memory model of what every block may hold.
//!
//! The model's contract is a disk's: after a successful mutation its blocks read exactly as written;
//! after a failed one, each of its blocks reads as its old value, its new value, or a corruption error
//! (never other bytes), until a later successful mutation overwrites it. Blocks outside a failed
//! mutation are never affected. A failed fdatasync poisons the volume until reopen.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cairn_store::{FaultInjector, IoOp, Store, StoreConfig, StoreError, WriteStamp};
use cairn_types::checksum::block_crcs;
use cairn_types::{BLOCK_SIZE_BYTES, ChunkIndex, ChunkSize, Generation, VolumeId};
use common::block_bytes;
use proptest::prelude::*;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

const CHUNKS: u64 = 3;
const BLOCKS_PER_CHUNK: u32 = 16; // 64 KiB chunks
const BS: usize = BLOCK_SIZE_BYTES as usize;

#[derive(Debug, Default)]
struct Injector {
    /// Fail the n-th IO from now (0 = the next one).
    countdown: Mutex<Option<u32>>,
    failed: Mutex<Option<IoOp>>,
}

impl FaultInjector for Injector {
    fn before(&self, op: IoOp) -> Option<std::io::Error> {
        let mut c = self.countdown.lock().unwrap();
        match *c {
            Some(0) => {
                *c = None;
                *self.failed.lock().unwrap() = Some(op);
                let errno = if op == IoOp::WriteData { 28 } else { 5 }; // ENOSPC or EIO
                Some(std::io::Error::from_raw_os_error(errno))
            }
            Some(n) => {
                *c = Some(n - 1);
                None
            }
            None => None,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { chunk: u64, first: u32, n: u32, seed: u64 },
    Trim { chunk: u64, first: u32, n: u32 },
    WriteZeroes { chunk: u64, first: u32, n: u32, allocate: bool },
    Read { chunk: u64, first: u32, n: u32 },
    Flush,
    Reopen,
}

fn range() -> impl Strategy<Value = (u64, u32, u32)> {
    (0..CHUNKS, 0..BLOCKS_PER_CHUNK)
        .prop_flat_map(|(c, first)| (Just(c), Just(first), 1..=(BLOCKS_PER_CHUNK - first).min(5)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), 1u64..u64::MAX).prop_map(|((chunk, first, n), seed)| Op::Write { chunk, first, n, seed }),
        1 => range().prop_map(|(chunk, first, n)| Op::Trim { chunk, first, n }),
        1 => (range(), any::<bool>()).prop_map(|((chunk, first, n), allocate)| Op::WriteZeroes { chunk, first, n, allocate }),
        3 => range().prop_map(|(chunk, first, n)| Op::Read { chunk, first, n }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// What a block may read as.
#[derive(Debug, Clone)]
struct BlockModel {
    values: BTreeSet<u64>,
    may_be_corrupt: bool,
}

impl Default for BlockModel {
    fn default() -> Self {
        BlockModel { values: [0].into(), may_be_corrupt: false }
    }
}

struct Harness {
    dir: tempfile::TempDir,
    injector: Arc<Injector>,
    store: Option<Store>,
    blocks: HashMap<(u64, u32), BlockModel>,
    poisoned: bool,
    mutated_since_flush: BTreeSet<u64>,
}

const VOL: u64 = 7;

fn vol() -> VolumeId {
    VolumeId::new(VOL).unwrap()
}

fn size() -> ChunkSize {
    ChunkSize::new(BLOCKS_PER_CHUNK * BLOCK_SIZE_BYTES).unwrap()
}

fn stamp() -> WriteStamp {
    WriteStamp { generation: Generation(1), sequence: 1, expect: None }
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let injector = Arc::new(Injector::default());
        // A tiny open-file cache so eviction and reopening happen constantly.
        let store = Store::open_with_faults(
            dir.path(),
            StoreConfig { open_files_max: 2 },
            Some(injector.clone() as Arc<dyn FaultInjector>),
        )
        .unwrap();
        Harness {
            dir,
            injector,
            store: Some(store),
            blocks: HashMap::new(),
            poisoned: false,
            mutated_since_flush: BTreeSet::new(),
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    fn model(&mut self, chunk: u64, block: u32) -> &mut BlockModel {
        self.blocks.entry((chunk, block)).or_default()
    }

    /// Applies the outcome of a mutation to the model.
    fn mutated(&mut self, chunk: u64, first: u32, n: u32, seeds: &[u64], result: Result<(), StoreError>) {
        let failed_op = self.injector.failed.lock().unwrap().take();
        match result {
            Ok(()) => {
                assert!(!self.poisoned, "mutation succeeded on a poisoned volume");
                assert!(failed_op.is_none(), "IO {failed_op:?} failed but the mutation succeeded");
                self.mutated_since_flush.insert(chunk);
                for i in 0..n {
                    *self.model(chunk, first + i) =
                        BlockModel { values: [seeds[i as usize]].into(), may_be_corrupt: false };
                }
            }
            Err(StoreError::Poisoned { .. }) => assert!(self.poisoned, "poisoned without a failed sync"),
            Err(e) => {
                let op = failed_op.unwrap_or_else(|| panic!("mutation failed without injected fault: {e}"));
                if op == IoOp::Sync {
                    self.poisoned = true;
                }
                if op == IoOp::WriteData {
                    assert!(matches!(e, StoreError::NoSpace { .. }), "ENOSPC must map to NoSpace: {e}");
                }
                // These fail before the mutation touches the chunk's blocks (the injector fails an IO
                // before it runs), so the contents are exactly as before.
                let untouched = matches!(
                    op,
                    IoOp::WriteVolumeMeta
                        | IoOp::CreateChunk
                        | IoOp::MarkDirty
                        | IoOp::Sync
                        | IoOp::WriteData
                );
                if untouched {
                    return;
                }
                self.mutated_since_flush.insert(chunk);
                for i in 0..n {
                    let m = self.model(chunk, first + i);
                    m.values.insert(seeds[i as usize]);
                    m.may_be_corrupt = true;
                }
            }
        }
    }

    fn run(&mut self, op: &Op, fault: Option<u32>) {
        *self.injector.countdown.lock().unwrap() = fault;
        *self.injector.failed.lock().unwrap() = None;
        match *op {
            Op::Write { chunk, first, n, seed } => {
                let seeds: Vec<u64> = (0..u64::from(n)).map(|i| seed.wrapping_add(i).max(1)).collect();
                let mut data = vec![0u8; n as usize * BS];
                for (i, s) in seeds.iter().enumerate() {
                    block_bytes(*s, &mut data[i * BS..(i + 1) * BS]);
                }
                let crcs = block_crcs(&data);
                let r = self.store().write(
                    vol(),
                    ChunkIndex(chunk),
                    size(),
                    first * BLOCK_SIZE_BYTES,
                    &data,
                    &crcs,
                    stamp(),
                );
                self.mutated(chunk, first, n, &seeds, r.map(|_| ()));
            }
            Op::Trim { chunk, first, n } => {
                let r = self.store().trim(
                    vol(),
                    ChunkIndex(chunk),
                    size(),
                    first * BLOCK_SIZE_BYTES,
                    n * BLOCK_SIZE_BYTES,
                    stamp(),
                );
                self.mutated(chunk, first, n, &vec![0; n as usize], r.map(|_| ()));
            }
            Op::WriteZeroes { chunk, first, n, allocate } => {
                let r = self.store().write_zeroes(
                    vol(),
                    ChunkIndex(chunk),
                    size(),
                    first * BLOCK_SIZE_BYTES,
                    n * BLOCK_SIZE_BYTES,
                    stamp(),
                    allocate,
                );
                self.mutated(chunk, first, n, &vec![0; n as usize], r.map(|_| ()));
            }
            Op::Read { chunk, first, n } => {
                let r = self.store().read(
                    vol(),
                    ChunkIndex(chunk),
                    size(),
                    first * BLOCK_SIZE_BYTES,
                    n * BLOCK_SIZE_BYTES,
                );
                let failed_op = self.injector.failed.lock().unwrap().take();
                match r {
                    Ok(reply) => {
                        assert_eq!(reply.crcs, block_crcs(&reply.data), "returned checksums must match data");
                        let mut expect = vec![0u8; BS];
                        for i in 0..n {
                            let got = &reply.data[i as usize * BS..(i as usize + 1) * BS];
                            let m = self.model(chunk, first + i).clone();
                            let ok = m.values.iter().any(|s| {
                                block_bytes(*s, &mut expect);
                                expect == got
                            });
                            assert!(
                                ok,
                                "chunk {chunk} block {} read bytes never written (allowed {:?})",
                                first + i,
                                m.values
                            );
                        }
                    }
                    Err(StoreError::Corrupt { block, .. }) => {
                        let m = self.model(chunk, block).clone();
                        assert!(
                            m.may_be_corrupt,
                            "chunk {chunk} block {block} reported corrupt but was written cleanly"
                        );
                    }
                    Err(e) => assert!(failed_op.is_some(), "read failed without injected fault: {e}"),
                }
            }
            Op::Flush => {
                let r = self.store().flush(vol());
                let failed_op = self.injector.failed.lock().unwrap().take();
                match r {
                    Ok(()) => {
                        assert!(!self.poisoned, "flush succeeded on a poisoned volume");
                        self.mutated_since_flush.clear();
                        assert!(self.store().unsynced_chunks(vol()).unwrap().is_empty());
                    }
                    Err(StoreError::Poisoned { .. }) => assert!(self.poisoned),
                    Err(e) => {
                        let op =
                            failed_op.unwrap_or_else(|| panic!("flush failed without injected fault: {e}"));
                        if op == IoOp::Sync {
                            self.poisoned = true;
                        }
                        // Chunks synced before the failure are clean; the rest must stay dirty.
                        let still: BTreeSet<u64> =
                            self.store().dirty_chunks(vol()).unwrap().into_iter().map(|c| c.0).collect();
                        self.mutated_since_flush.retain(|c| still.contains(c));
                    }
                }
            }
            Op::Reopen => {
                *self.injector.countdown.lock().unwrap() = None;
                self.store = None;
                self.store = Some(
                    Store::open_with_faults(
                        self.dir.path(),
                        StoreConfig { open_files_max: 2 },
                        Some(self.injector.clone() as Arc<dyn FaultInjector>),
                    )
                    .unwrap(),
                );
                self.poisoned = false;
                // Every chunk mutated since the last successful flush must still be known dirty.
                let dirty: BTreeSet<u64> =
                    self.store().dirty_chunks(vol()).unwrap().into_iter().map(|c| c.0).collect();
                let on_disk: BTreeSet<u64> =
                    self.store().list_chunks(vol()).unwrap().into_iter().map(|c| c.0).collect();
                for c in &self.mutated_since_flush {
                    assert!(
                        dirty.contains(c) || !on_disk.contains(c),
                        "chunk {c} mutated since flush but not dirty"
                    );
                }
            }
        }
        *self.injector.countdown.lock().unwrap() = None;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in proptest::collection::vec((op(), proptest::option::weighted(0.15, 0u32..6)), 1..80)) {
        let mut h = Harness::new();
        for (op, fault) in &ops {
            h.run(op, *fault);
        }
        // Finally every block is read back once more.
        for chunk in 0..CHUNKS {
            h.run(&Op::Read { chunk, first: 0, n: BLOCKS_PER_CHUNK }, None);
        }
    }
}
