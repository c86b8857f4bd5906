//! Behaviour of the chunk store that the model test does not cover: fencing, on-disk corruption,
//! bad requests, locking, listing and deletion.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cairn_store::{Store, StoreConfig, StoreError, WriteStamp};
use cairn_types::checksum::block_crcs;
use cairn_types::placement::pg_of;
use cairn_types::{ChunkIndex, ChunkSize, Generation, PgId, VolumeId};
use cairn_types::{Expected, Version};
use std::os::unix::fs::FileExt;

fn vol(n: u64) -> VolumeId {
    VolumeId::new(n).unwrap()
}

fn gen_stamp(g: u64) -> WriteStamp {
    WriteStamp { generation: Generation(g), sequence: 1, expect: None }
}

fn pattern(byte: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| byte ^ (i as u8)).collect()
}

fn write(store: &Store, v: u64, chunk: u64, offset: u32, data: &[u8], g: u64) -> Result<(), StoreError> {
    store
        .write(vol(v), ChunkIndex(chunk), ChunkSize::DEFAULT, offset, data, &block_crcs(data), gen_stamp(g))
        .map(|_| ())
}

#[test]
fn lower_generation_is_fenced_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    write(&store, 1, 0, 0, &pattern(1, 4096), 5).unwrap();
    write(&store, 1, 0, 0, &pattern(2, 4096), 6).unwrap();
    let err = write(&store, 1, 0, 0, &pattern(3, 4096), 5).unwrap_err();
    assert!(matches!(err, StoreError::Fenced { highest: Generation(6), .. }), "{err}");
    assert!(err.to_string().contains("generation 5 refused"));
    let err = store.trim(vol(1), ChunkIndex(0), ChunkSize::DEFAULT, 0, 4096, gen_stamp(4)).unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }));
    assert_eq!(
        store.read(vol(1), ChunkIndex(0), ChunkSize::DEFAULT, 0, 4096).unwrap().data,
        pattern(2, 4096)
    );
    // The fence survives a restart.
    drop(store);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.highest_generation(vol(1)).unwrap(), Generation(6));
    assert!(matches!(write(&store, 1, 3, 0, &pattern(4, 4096), 5), Err(StoreError::Fenced { .. })));
    // Other volumes are independent.
    write(&store, 2, 0, 0, &pattern(4, 4096), 1).unwrap();
}

#[test]
fn raising_the_fence_persists_it_and_refuses_older_writers() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        write(&store, 1, 0, 0, &pattern(1, 4096), 3).unwrap();
        store.raise_fence(vol(1), Generation(7)).unwrap();
        store.raise_fence(vol(1), Generation(7)).unwrap();
        assert!(matches!(store.raise_fence(vol(1), Generation(6)), Err(StoreError::Fenced { .. })));
        assert!(matches!(write(&store, 1, 0, 0, &pattern(2, 4096), 3), Err(StoreError::Fenced { .. })));
        // A volume this node holds nothing of yet is fenced too.
        store.raise_fence(vol(2), Generation(7)).unwrap();
        assert!(matches!(write(&store, 2, 0, 0, &pattern(2, 4096), 6), Err(StoreError::Fenced { .. })));
    }
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.highest_generation(vol(1)).unwrap(), Generation(7), "the fence survives a restart");
    assert!(matches!(write(&store, 1, 0, 0, &pattern(2, 4096), 3), Err(StoreError::Fenced { .. })));
    write(&store, 1, 0, 0, &pattern(2, 4096), 7).unwrap();
}

#[test]
fn a_repair_rewrites_only_blocks_that_are_still_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let old = pattern(9, 2 * 4096);
    write(&store, 3, 2, 8192, &old, 1).unwrap();
    store.flush(vol(3)).unwrap();
    drop(store);
    // Damage block 3 (the second written block) on disk.
    let path = dir.path().join("volumes/0000000000000003/0000000000000002.chunk");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    f.write_all_at(&[0xff, 0x00, 0xff], 8192 + 3 * 4096 + 7).unwrap();
    drop(f);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let repair = |data: &[u8]| {
        store.repair(vol(3), ChunkIndex(2), ChunkSize::DEFAULT, 8192, data, &block_crcs(data)).unwrap()
    };
    assert_eq!(repair(&old), 1, "only the damaged block is rewritten");
    assert_eq!(store.read(vol(3), ChunkIndex(2), ChunkSize::DEFAULT, 8192, 2 * 4096).unwrap().data, old);
    assert_eq!(repair(&old), 0, "nothing left to repair");
    // A newer write landed: a late repair carrying the older data changes nothing.
    let new = pattern(4, 2 * 4096);
    write(&store, 3, 2, 8192, &new, 1).unwrap();
    assert_eq!(repair(&old), 0);
    assert_eq!(store.read(vol(3), ChunkIndex(2), ChunkSize::DEFAULT, 8192, 2 * 4096).unwrap().data, new);
}

/// A scrub finds every damaged block of a range (not only the first), and repairs from a peer's
/// copy only at the version it read: a copy that moved since keeps its blocks.
#[test]
fn a_scrub_finds_every_damaged_block_and_repairs_only_at_the_version_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let data = pattern(7, 4 * 4096);
    write(&store, 3, 2, 0, &data, 1).unwrap();
    store.flush(vol(3)).unwrap();
    let version = store.chunk_version(vol(3), ChunkIndex(2)).unwrap();
    let path = dir.path().join("volumes/0000000000000003/0000000000000002.chunk");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    for block in [1u64, 3] {
        f.write_all_at(&[0x5a, 0xa5], 8192 + block * 4096 + 11).unwrap();
    }
    drop(f);
    let damaged =
        |store: &Store| store.damaged_blocks(vol(3), ChunkIndex(2), ChunkSize::DEFAULT, 0, 1 << 20).unwrap();
    assert_eq!(damaged(&store), vec![1, 3]);
    assert!(store.damaged_blocks(vol(3), ChunkIndex(9), ChunkSize::DEFAULT, 0, 1 << 20).unwrap().is_empty());
    let repair_at = |store: &Store, at| {
        store.repair_at(vol(3), (ChunkIndex(2), ChunkSize::DEFAULT), 0, (&data, &block_crcs(&data)), at)
    };
    // Read from a copy at another version: refused, nothing changed.
    let other = Version { generation: version.generation, seq: version.seq + 1 };
    assert!(matches!(repair_at(&store, other), Err(StoreError::VersionMismatch { .. })));
    assert_eq!(damaged(&store), vec![1, 3]);
    assert_eq!(repair_at(&store, version).unwrap(), 2);
    assert!(damaged(&store).is_empty());
    assert_eq!(store.read(vol(3), ChunkIndex(2), ChunkSize::DEFAULT, 0, 4 * 4096).unwrap().data, data);
    assert_eq!(store.chunk_version(vol(3), ChunkIndex(2)).unwrap(), version, "a repair keeps the version");
}

#[test]
fn flipped_bytes_on_disk_are_reported_as_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let data = pattern(9, 3 * 4096);
    write(&store, 3, 2, 8192, &data, 1).unwrap();
    store.flush(vol(3)).unwrap();
    drop(store);
    // Flip one byte in the middle of the second written block (block 3 of the chunk).
    let path = dir.path().join("volumes/0000000000000003/0000000000000002.chunk");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let at = 8192 + 3 * 4096 + 100; // data region starts after header and table (8 KiB)
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    drop(f);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let err = store.read(vol(3), ChunkIndex(2), ChunkSize::DEFAULT, 0, 1 << 20).unwrap_err();
    match &err {
        StoreError::Corrupt { volume, chunk, block, .. } => {
            assert_eq!((volume.get(), chunk.0, *block), (3, 2, 3));
        }
        other => panic!("expected corruption, got {other}"),
    }
    assert!(err.to_string().contains("volume 3 chunk 2 block 3"));
    // Undamaged blocks still read.
    let ok = store.read(vol(3), ChunkIndex(2), ChunkSize::DEFAULT, 8192, 4096).unwrap();
    assert_eq!(ok.data, data[..4096]);
    // Rewriting the damaged block heals it.
    write(&store, 3, 2, 12288, &data[4096..8192], 1).unwrap();
    assert_eq!(store.read(vol(3), ChunkIndex(2), ChunkSize::DEFAULT, 8192, 3 * 4096).unwrap().data, data);
}

#[test]
fn damaged_header_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    write(&store, 3, 0, 0, &pattern(9, 4096), 1).unwrap();
    drop(store);
    let path = dir.path().join("volumes/0000000000000003/0000000000000000.chunk");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xff], 20).unwrap();
    drop(f);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let err = store.read(vol(3), ChunkIndex(0), ChunkSize::DEFAULT, 0, 4096).unwrap_err();
    assert!(matches!(err, StoreError::BadChunkFile { .. }), "{err}");
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let data = pattern(1, 4096);
    // Unaligned offset, beyond the end, zero length, wrong checksum count, wrong checksum.
    assert!(matches!(write(&store, 1, 0, 100, &data, 1), Err(StoreError::InvalidRequest(_))));
    assert!(matches!(
        write(&store, 1, 0, (1 << 20) - 4096, &pattern(1, 8192), 1),
        Err(StoreError::InvalidRequest(_))
    ));
    assert!(matches!(write(&store, 1, 0, 0, &[], 1), Err(StoreError::InvalidRequest(_))));
    let r = store.write(vol(1), ChunkIndex(0), ChunkSize::DEFAULT, 0, &data, &[1, 2], gen_stamp(1));
    assert!(matches!(r, Err(StoreError::InvalidRequest(_))));
    let r = store.write(vol(1), ChunkIndex(0), ChunkSize::DEFAULT, 0, &data, &[0xdead], gen_stamp(1));
    assert!(matches!(r, Err(StoreError::Corrupt { block: 0, .. })));
    assert!(store.read(vol(1), ChunkIndex(0), ChunkSize::DEFAULT, 0, 4097).is_err());
    // A chunk keeps the size it was created with.
    write(&store, 1, 0, 0, &data, 1).unwrap();
    let small = ChunkSize::new(64 * 1024).unwrap();
    let r = store.read(vol(1), ChunkIndex(0), small, 0, 4096);
    assert!(matches!(r, Err(StoreError::InvalidRequest(_))));
}

#[test]
fn a_data_dir_is_used_by_one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let _store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let err = Store::open(dir.path(), StoreConfig::default()).unwrap_err();
    assert!(matches!(err, StoreError::DataDirLocked { .. }), "{err}");
}

#[test]
fn foreign_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cairn-store"), b"not a cairn store").unwrap();
    let err = Store::open(dir.path(), StoreConfig::default()).unwrap_err();
    assert!(matches!(err, StoreError::BadDataDir { .. }), "{err}");
}

#[test]
fn thin_provisioning_trim_and_listing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig { open_files_max: 4 }).unwrap();
    // Unwritten chunks read as zeros and create nothing.
    let r = store.read(vol(5), ChunkIndex(100), ChunkSize::DEFAULT, 0, 1 << 20).unwrap();
    assert!(r.data.iter().all(|b| *b == 0));
    assert!(store.list_chunks(vol(5)).unwrap().is_empty());
    for c in 0..20 {
        write(&store, 5, c, 0, &pattern(c as u8, 1 << 20), 1).unwrap();
    }
    store.flush(vol(5)).unwrap();
    let path = dir.path().join("volumes/0000000000000005/0000000000000003.chunk");
    let blocks_before = std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::blocks(&m)).unwrap();
    store.trim(vol(5), ChunkIndex(3), ChunkSize::DEFAULT, 0, 1 << 20, gen_stamp(1)).unwrap();
    let blocks_after = std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::blocks(&m)).unwrap();
    assert!(
        blocks_after + 1024 <= blocks_before,
        "trim freed space: {blocks_before} -> {blocks_after} sectors"
    );
    let r = store.read(vol(5), ChunkIndex(3), ChunkSize::DEFAULT, 0, 1 << 20).unwrap();
    assert!(r.data.iter().all(|b| *b == 0));
    let all: Vec<u64> = store.list_chunks(vol(5)).unwrap().iter().map(|c| c.0).collect();
    assert_eq!(all, (0..20).collect::<Vec<_>>());
    // Per-PG listing partitions the chunks by the placement hash.
    let mut seen = 0;
    for pg in 0..8 {
        for (v, c) in store.list_chunks_in_pg(PgId(pg), 8).unwrap() {
            assert_eq!(pg_of(v, c, 8), PgId(pg));
            seen += 1;
        }
    }
    assert_eq!(seen, 20);
    assert_eq!(store.chunk_state(vol(5), ChunkIndex(3)).unwrap().map(|s| s.version), Some(2));
    store.delete_volume(vol(5)).unwrap();
    assert!(store.list_chunks(vol(5)).unwrap().is_empty());
    assert!(store.list_volumes().unwrap().is_empty());
    assert_eq!(store.chunk_state(vol(5), ChunkIndex(3)).unwrap(), None);
}

#[test]
fn a_deleted_volume_goes_in_bounded_steps_and_flushes_still_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    for chunk in 0..10 {
        write(&store, 7, chunk, 0, &pattern(3, 4096), 1).unwrap();
    }
    write(&store, 8, 0, 0, &pattern(4, 4096), 1).unwrap();
    assert_eq!(store.delete_volume_step(vol(7), 4).unwrap(), (4, false));
    assert_eq!(store.list_chunks(vol(7)).unwrap().len(), 6);
    // The removed chunks were unflushed: a flush must not trip over their missing files.
    store.flush_all().unwrap();
    assert_eq!(store.delete_volume_step(vol(7), 4).unwrap(), (4, false));
    assert_eq!(store.delete_volume_step(vol(7), 4).unwrap(), (2, true));
    assert_eq!(store.list_volumes().unwrap(), vec![vol(8)], "only the deleted volume goes");
    assert!(!dir.path().join("volumes/0000000000000007").exists());
    // Deleting what is gone is done at once; a volume whose metadata is damaged goes all the same.
    assert_eq!(store.delete_volume_step(vol(7), 4).unwrap(), (0, true));
    drop(store);
    std::fs::write(dir.path().join("volumes/0000000000000008/volume.meta"), b"garbage").unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.delete_volume_step(vol(8), 4).unwrap(), (1, true));
    assert!(store.list_volumes().unwrap().is_empty());
}

#[test]
fn damaged_chunk_files_are_quarantined_until_a_copy_is_installed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    for chunk in 0..3 {
        write(&store, 2, chunk, 0, &pattern(9, 8192), 4).unwrap();
    }
    store.flush_all().unwrap();
    drop(store);
    let vdir = dir.path().join("volumes/0000000000000002");
    let c0 = vdir.join("0000000000000000.chunk");
    let mut bytes = std::fs::read(&c0).unwrap();
    bytes[30] ^= 1;
    std::fs::write(&c0, bytes).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(vdir.join("0000000000000001.chunk"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    std::fs::write(vdir.join("volume.meta"), b"junk").unwrap();

    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.check_all().unwrap(), 2);
    let mut damaged = store.take_damaged();
    damaged.sort();
    assert_eq!(damaged, vec![(vol(2), ChunkIndex(0)), (vol(2), ChunkIndex(1))]);
    assert!(store.take_damaged().is_empty(), "reported once");
    // No zeros for a damaged chunk: reads, writes and its state all fail until a copy is installed.
    let read = store.read(vol(2), ChunkIndex(0), ChunkSize::DEFAULT, 0, 4096);
    assert!(matches!(read, Err(StoreError::BadChunkFile { .. })), "{read:?}");
    assert!(matches!(write(&store, 2, 1, 0, &pattern(1, 4096), 4), Err(StoreError::BadChunkFile { .. })));
    assert!(store.chunk_state(vol(2), ChunkIndex(1)).is_err());
    // A crash before any copy was installed: the quarantine was in memory, the damaged files are
    // gone; the durable markers keep both chunks quarantined (and reported again), never zeros.
    drop(store);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    store.check_all().unwrap();
    let mut again = store.take_damaged();
    again.sort();
    assert_eq!(again, vec![(vol(2), ChunkIndex(0)), (vol(2), ChunkIndex(1))]);
    let read = store.read(vol(2), ChunkIndex(0), ChunkSize::DEFAULT, 0, 4096);
    assert!(matches!(read, Err(StoreError::BadChunkFile { .. })), "{read:?}");
    // The rebuilt fence is the chunks' highest generation: an older writer is refused.
    assert_eq!(store.highest_generation(vol(2)).unwrap(), Generation(4));
    assert!(matches!(write(&store, 2, 2, 0, &pattern(1, 4096), 3), Err(StoreError::Fenced { .. })));
    // A copy from a replica replaces it.
    let data = pattern(9, 8192);
    let mut present = vec![false; 256];
    present[0] = true;
    present[1] = true;
    store
        .install_range(
            vol(2),
            ChunkIndex(0),
            ChunkSize::DEFAULT,
            0,
            &present,
            &data,
            &block_crcs(&data),
            Generation(4),
            Version { generation: 4, seq: 7 },
            None,
            false,
        )
        .unwrap();
    assert!(!store.is_quarantined(vol(2), ChunkIndex(0)));
    assert_eq!(store.read(vol(2), ChunkIndex(0), ChunkSize::DEFAULT, 0, 8192).unwrap().data, data);
    assert!(store.is_quarantined(vol(2), ChunkIndex(1)));
    // The damaged files were kept aside (the second start moved nothing: the files were gone).
    assert!(std::fs::read_dir(dir.path().join("damaged")).unwrap().count() >= 3);
    assert!(!vdir.join("0000000000000000.damaged").exists(), "the installed chunk's marker is gone");
    assert!(vdir.join("0000000000000001.damaged").exists());
    // Deleting the volume forgets its quarantined chunks and the damaged files kept aside.
    store.delete_volume(vol(2)).unwrap();
    assert!(!store.is_quarantined(vol(2), ChunkIndex(1)));
    assert!(store.take_damaged().iter().all(|(v, _)| *v != vol(2)));
    let kept = std::fs::read_dir(dir.path().join("damaged")).unwrap().count();
    assert_eq!(kept, 0, "the deleted volume's damaged files are gone");
}

#[test]
fn requests_for_volumes_not_held_keep_nothing_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    write(&store, 1, 0, 0, &pattern(1, 4096), 1).unwrap();
    let (c, cs) = (ChunkIndex(0), ChunkSize::DEFAULT);
    for v in 2..2000 {
        let read = store.read(vol(v), c, cs, 0, 4096).unwrap();
        assert_eq!((read.data, read.version), (vec![0; 4096], Version::NONE));
        assert_eq!(store.allocation(vol(v), c, cs, 0, 8192).unwrap(), vec![false, false]);
        assert!(store.chunk_state(vol(v), c).unwrap().is_none());
        assert!(store.list_chunks(vol(v)).unwrap().is_empty());
        assert!(store.dirty_chunks(vol(v)).unwrap().is_empty());
        assert_eq!(store.highest_generation(vol(v)).unwrap(), Generation(0));
        store.flush(vol(v)).unwrap();
        assert_eq!(store.trim(vol(v), c, cs, 0, 4096, gen_stamp(1)).unwrap(), Version::NONE);
        let data = pattern(3, 4096);
        assert_eq!(store.repair(vol(v), c, cs, 0, &data, &block_crcs(&data)).unwrap(), 0);
    }
    assert_eq!(store.volumes_loaded(), 1, "only the volume held here");
    assert_eq!(store.read(vol(1), c, cs, 0, 4096).unwrap().data, pattern(1, 4096));
}

#[test]
fn dirty_flags_follow_flushes_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig { open_files_max: 1 }).unwrap();
    write(&store, 1, 0, 0, &pattern(1, 4096), 1).unwrap();
    write(&store, 1, 1, 0, &pattern(1, 4096), 1).unwrap();
    store.flush(vol(1)).unwrap();
    write(&store, 1, 1, 4096, &pattern(2, 4096), 1).unwrap();
    assert_eq!(store.unsynced_chunks(vol(1)).unwrap(), vec![ChunkIndex(1)]);
    drop(store);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.dirty_chunks(vol(1)).unwrap(), vec![ChunkIndex(0), ChunkIndex(1)]);
    let st = store.chunk_state(vol(1), ChunkIndex(1)).unwrap().unwrap();
    assert!(st.dirty);
    assert_eq!(st.version, 2);
    store.flush(vol(1)).unwrap();
    assert!(store.unsynced_chunks(vol(1)).unwrap().is_empty());
    // Dirty flags linger for a while after the last mutation, then clear.
    assert_eq!(store.dirty_chunks(vol(1)).unwrap(), vec![ChunkIndex(0), ChunkIndex(1)]);
    for _ in 0..cairn_store::DIRTY_LINGER_FLUSHES {
        store.flush(vol(1)).unwrap();
    }
    assert!(store.dirty_chunks(vol(1)).unwrap().is_empty());
    drop(store);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert!(store.dirty_chunks(vol(1)).unwrap().is_empty());
    assert!(!store.chunk_state(vol(1), ChunkIndex(1)).unwrap().unwrap().dirty);
}

#[test]
fn a_chunk_file_whose_creation_never_became_durable_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    write(&store, 9, 0, 0, &pattern(1, 4096), 1).unwrap();
    store.flush(vol(9)).unwrap();
    drop(store);
    // What a power cut after the rename but before any flush can leave: a named file whose header
    // never reached the disk (zeros), and one cut short; plus a temp file from an unfinished creation.
    let vdir = dir.path().join("volumes/0000000000000009");
    std::fs::write(vdir.join("0000000000000001.chunk"), vec![0u8; 8192 + (1 << 20)]).unwrap();
    std::fs::write(vdir.join("0000000000000002.chunk"), b"CAIR").unwrap();
    std::fs::write(vdir.join("0000000000000003.chunk.tmp"), b"x").unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.list_chunks(vol(9)).unwrap(), vec![ChunkIndex(0)]);
    assert!(!vdir.join("0000000000000003.chunk.tmp").exists());
    let r = store.read(vol(9), ChunkIndex(1), ChunkSize::DEFAULT, 0, 4096).unwrap();
    assert_eq!(r.data, vec![0u8; 4096]);
    write(&store, 9, 1, 0, &pattern(2, 4096), 1).unwrap();
    assert_eq!(
        store.read(vol(9), ChunkIndex(1), ChunkSize::DEFAULT, 0, 4096).unwrap().data,
        pattern(2, 4096)
    );
    assert_eq!(
        store.read(vol(9), ChunkIndex(0), ChunkSize::DEFAULT, 0, 4096).unwrap().data,
        pattern(1, 4096)
    );
}

#[test]
fn mutations_apply_only_on_the_version_they_expect() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let (v, c, cs) = (vol(1), ChunkIndex(3), ChunkSize::DEFAULT);
    let ver = |generation, seq| Version { generation, seq };
    let stamp = |seq, expect| WriteStamp { generation: Generation(5), sequence: seq, expect: Some(expect) };
    let a = pattern(1, 4096);
    let b = pattern(2, 4096);
    // The first write of generation 5 expects anything older; it leaves the chunk at 5.1.
    let r = store.write(v, c, cs, 0, &a, &block_crcs(&a), stamp(1, Expected::Below(5)));
    assert_eq!(r.unwrap(), ver(5, 1));
    // Sent again (a retry), it is answered as applied and changes nothing.
    assert_eq!(
        store.write(v, c, cs, 0, &a, &block_crcs(&a), stamp(1, Expected::Below(5))).unwrap(),
        ver(5, 1)
    );
    // Another write that would leave the same version with other data (two writers whose
    // versions collide) is not answered as applied: a conflict, and nothing changes.
    let collided = store.write(v, c, cs, 0, &b, &block_crcs(&b), stamp(1, Expected::Below(5)));
    assert!(matches!(collided, Err(StoreError::VersionMismatch { behind: false, .. })), "{collided:?}");
    assert_eq!(store.read(v, c, cs, 0, 4096).unwrap().data, a);
    // A write expecting a version the copy has not reached: behind, refused.
    let behind = store.write(v, c, cs, 0, &b, &block_crcs(&b), stamp(9, Expected::Exact(ver(5, 8))));
    assert!(
        matches!(behind, Err(StoreError::VersionMismatch { behind: true, current, .. }) if current == ver(5, 1))
    );
    // One expecting an older version (another chain): a conflict, refused.
    let conflict = store.write(v, c, cs, 0, &b, &block_crcs(&b), stamp(9, Expected::Exact(ver(4, 2))));
    assert!(matches!(conflict, Err(StoreError::VersionMismatch { behind: false, .. })), "{conflict:?}");
    assert_eq!(store.read(v, c, cs, 0, 4096).unwrap().data, a, "a refused write changes nothing");
    // Trims and zeroes are checked the same way; a chunk this node never held is at version none.
    let t = store.trim(v, ChunkIndex(9), cs, 0, 4096, stamp(2, Expected::Exact(Version::NONE)));
    assert_eq!(t.unwrap(), Version::NONE, "nothing to trim, the chunk stays at none");
    assert!(store.trim(v, c, cs, 0, 4096, stamp(2, Expected::Exact(ver(5, 0)))).is_err());
    assert_eq!(store.trim(v, c, cs, 0, 4096, stamp(2, Expected::Exact(ver(5, 1)))).unwrap(), ver(5, 2));
    assert_eq!(
        store.trim(v, c, cs, 0, 4096, stamp(2, Expected::Exact(ver(5, 1)))).unwrap(),
        ver(5, 2),
        "a re-sent trim is answered as applied"
    );
    // A read reports the version with the data, and which blocks hold data.
    let read = store.read(v, c, cs, 0, 8192).unwrap();
    assert_eq!((read.version, read.present), (ver(5, 2), vec![false, false]));
    // An install sets the copy's version; with a condition it applies only over the planned copy.
    let present = [true, false];
    let install = |expect| {
        store.install_range(
            v,
            c,
            cs,
            0,
            &present,
            &b,
            &block_crcs(&b),
            Generation(5),
            ver(5, 4),
            expect,
            false,
        )
    };
    assert!(matches!(install(Some(ver(5, 1))), Err(StoreError::VersionMismatch { .. })));
    install(Some(ver(5, 2))).unwrap();
    // A first piece that does not end the chunk leaves it "being installed": not served, and
    // only the next piece of the same copy goes on (then the chunk is at the copy's version).
    let installing = Version::installing(ver(5, 4));
    assert_eq!(store.chunk_state(v, c).unwrap().unwrap().version(), installing);
    assert!(matches!(store.read(v, c, cs, 0, 4096), Err(StoreError::Installing { .. })));
    let rest = vec![false; 254];
    let other = store.install_range(
        v,
        c,
        cs,
        8192,
        &rest,
        &[],
        &[],
        Generation(5),
        ver(5, 3),
        Some(ver(5, 4)),
        false,
    );
    assert!(other.is_err(), "a piece of another copy is refused");
    assert!(store.chunk_state(v, c).unwrap().unwrap().dirty, "half a copy is dirty");
    store
        .install_range(v, c, cs, 8192, &rest, &[], &[], Generation(5), ver(5, 4), Some(installing), false)
        .unwrap();
    let read = store.read(v, c, cs, 0, 4096).unwrap();
    assert_eq!((read.version, read.data), (ver(5, 4), b));
    assert_eq!(store.chunk_state(v, c).unwrap().unwrap().version(), ver(5, 4));
    // A whole copy is synced and is its source's copy: neither dirty nor waiting for a flush
    // (a node filled by copies reports none of them at the next open).
    let state = store.chunk_state(v, c).unwrap().unwrap();
    assert!(!state.dirty);
    assert!(!store.dirty_chunks(v).unwrap().contains(&c));
    assert!(!store.unsynced_chunks(v).unwrap().contains(&c));
    // A copy of a source's dirty copy (it may hold a write never confirmed) stays dirty, synced.
    let whole = vec![true; 256];
    let data = vec![7u8; 256 * 4096];
    store
        .install_range(
            v,
            c,
            cs,
            0,
            &whole,
            &data,
            &block_crcs(&data),
            Generation(5),
            ver(5, 6),
            Some(ver(5, 4)),
            true,
        )
        .unwrap();
    assert!(store.chunk_state(v, c).unwrap().unwrap().dirty);
    assert!(store.dirty_chunks(v).unwrap().contains(&c));
    assert!(!store.unsynced_chunks(v).unwrap().contains(&c));
}
