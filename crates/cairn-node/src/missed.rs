//! The missed-writes log: which chunks which peers missed, as recorded by this node.
//!
//! When a client writes a chunk while one of its replicas is down or catching up (or that replica
//! fails during the write), every replica that applied the write records `(peer, volume, chunk)`.
//! The recovery worker later copies those chunks to the peer. An entry is recorded (appended and
//! fdatasync'ed) before the write is acknowledged, so an acknowledged write that a peer missed is
//! never forgotten. Recording an entry that already exists is free; so catch-up cost is bounded by
//! the number of distinct chunks written while the peer was away, not by the number of writes.
//!
//! A node being filled with a PG (a backfill member) is *seeded*: each holder records every chunk
//! it holds of the PG for it (`seed`). An entry only a seed made counts for that fill alone: once
//! the node is admitted (the leader checked that enough holders had copied it everything) such
//! entries are dropped, and they never make an admitted node catch up again.
//!
//! A new writer's open that reconciled a chunk without some of its holders records them here too,
//! *settled* at its generation (`record_settled`): the copy such an entry sends goes over the
//! peer's copy if that is of an older writer generation, even a higher one — a fenced writer's
//! write the open settled without (never acknowledged: every acknowledged one reached the
//! holders that decided), which would otherwise stay served beside the settled copy.
//!
//! File: `DATA_DIR/missed.log`, JSON lines `{"add":[peer,volume,chunk,chunk_size]}`,
//! `{"seed":[peer,volume,chunk,chunk_size]}`, `{"settled":[peer,volume,chunk,generation]}` (after
//! the entry's add) and `{"done":[peer,volume,chunk]}`, replayed at start; truncated whenever
//! nothing is pending.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// (volume id, chunk index).
pub type ChunkKey = (u64, u64);

#[derive(Debug, Serialize, Deserialize)]
enum Line {
    #[serde(rename = "add")]
    Add(u64, u64, u64, u32),
    #[serde(rename = "done")]
    Done(u64, u64, u64),
    #[serde(rename = "seed")]
    Seed(u64, u64, u64, u32),
    #[serde(rename = "settled")]
    Settled(u64, u64, u64, u64),
}

/// A chunk a peer missed, as `MissedLog::batch` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missed {
    pub volume: u64,
    pub chunk: u64,
    pub chunk_size: u32,
    /// The record's number: `done` clears it only if not recorded again since.
    pub seq: u64,
    /// The highest writer generation whose open settled the chunk without the peer (0: none):
    /// the copy sent goes over a peer's copy of an older generation.
    pub settled: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    chunk_size: u32,
    /// Bumped at every record, so a copy that started before a newer write does not clear it.
    seq: u64,
    /// Made by a seed only (no write recorded it since).
    seeded: bool,
    /// The highest writer generation whose open settled the chunk without the peer (0: none).
    settled: u64,
}

#[derive(Debug, Default)]
struct Inner {
    peers: BTreeMap<u64, BTreeMap<ChunkKey, Entry>>,
    next_seq: u64,
    /// An fdatasync of the file failed (its pages may be gone: what is on disk is unknown), or a
    /// failed append could not be cut off again. Every later record fails until the node restarts
    /// and replays the file, so no write is acknowledged on the strength of a record that may not
    /// be on disk.
    poisoned: Option<String>,
}

#[derive(Debug)]
pub struct MissedLog {
    path: PathBuf,
    file: Mutex<File>,
    inner: Mutex<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MissedLog {
    pub fn open(path: &Path) -> std::io::Result<MissedLog> {
        let mut inner = Inner::default();
        // A crash in the middle of an append leaves a partial last line: cut it off, or the next
        // append would be glued onto it and both skipped at the next replay.
        if let Ok(bytes) = std::fs::read(path) {
            let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            if whole < bytes.len() {
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(whole as u64)?;
                f.sync_data()?;
            }
        }
        if let Ok(f) = File::open(path) {
            for line in std::io::BufReader::new(f).lines() {
                let line = line?;
                // A torn last line (crash mid-append) was never acknowledged: skip it.
                match serde_json::from_str::<Line>(&line) {
                    Ok(Line::Add(peer, v, c, size)) => {
                        inner.next_seq += 1;
                        let seq = inner.next_seq;
                        let entry = Entry { chunk_size: size, seq, seeded: false, settled: 0 };
                        inner.peers.entry(peer).or_default().insert((v, c), entry);
                    }
                    Ok(Line::Seed(peer, v, c, size)) => {
                        inner.next_seq += 1;
                        let seq = inner.next_seq;
                        let entry = Entry { chunk_size: size, seq, seeded: true, settled: 0 };
                        inner.peers.entry(peer).or_default().entry((v, c)).or_insert(entry);
                    }
                    Ok(Line::Settled(peer, v, c, generation)) => {
                        if let Some(e) = inner.peers.get_mut(&peer).and_then(|m| m.get_mut(&(v, c))) {
                            e.settled = e.settled.max(generation);
                        }
                    }
                    Ok(Line::Done(peer, v, c)) => {
                        if let Some(m) = inner.peers.get_mut(&peer) {
                            m.remove(&(v, c));
                        }
                    }
                    Err(_) => {}
                }
            }
        }
        inner.peers.retain(|_, m| !m.is_empty());
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(MissedLog { path: path.to_path_buf(), file: Mutex::new(file), inner: Mutex::new(inner) })
    }

    /// Records that `peers` missed a write to `(volume, chunk)`; durable when it returns.
    pub fn record(&self, peers: &[u64], volume: u64, chunk: u64, chunk_size: u32) -> std::io::Result<()> {
        let entries: Vec<(u64, u64, u64, u32)> =
            peers.iter().map(|p| (*p, volume, chunk, chunk_size)).collect();
        self.record_many(&entries, false)
    }

    /// Records that `peers` missed `(volume, chunk, chunk_size)` as left out of the chunk's
    /// reconciliation by the open of writer `generation` (see the module documentation); durable
    /// when it returns.
    pub fn record_settled(
        &self,
        peers: &[u64],
        (volume, chunk, chunk_size): (u64, u64, u32),
        generation: u64,
    ) -> std::io::Result<()> {
        let entries: Vec<(u64, u64, u64, u32)> =
            peers.iter().map(|p| (*p, volume, chunk, chunk_size)).collect();
        self.record_lines(&entries, false, generation)
    }

    /// Records each `(peer, volume, chunk, chunk_size)` with one append and one fdatasync;
    /// durable when it returns (all of them, or, on an error, none). With `seed`, for a fill (see
    /// the module documentation): an entry that exists already is left as it is.
    pub fn record_many(&self, entries: &[(u64, u64, u64, u32)], seed: bool) -> std::io::Result<()> {
        self.record_lines(entries, seed, 0)
    }

    /// `record_many`, the entries settled at `settled` if that is above 0.
    fn record_lines(
        &self,
        entries: &[(u64, u64, u64, u32)],
        seed: bool,
        settled: u64,
    ) -> std::io::Result<()> {
        // The file lock is taken first and held throughout, so lines reach the file in the order the
        // in-memory state changed (replay must see an Add after a Done of the same chunk).
        let mut f = lock(&self.file);
        let mut new_lines = String::new();
        let mut added = Vec::new();
        // (Entries settled here, with what they were before: put back if the append fails.)
        let mut raised = Vec::new();
        {
            let mut inner = lock(&self.inner);
            if let Some(why) = &inner.poisoned {
                return Err(std::io::Error::other(format!("the missed-writes log failed earlier: {why}")));
            }
            for (peer, volume, chunk, chunk_size) in entries.iter().copied() {
                inner.next_seq += 1;
                let seq = inner.next_seq;
                let map = inner.peers.entry(peer).or_default();
                let line = match map.get_mut(&(volume, chunk)) {
                    Some(_) if seed => None,
                    // A write recorded over a seed's entry: no longer the fill's alone (written
                    // down, so that a restart knows it too).
                    Some(e) if e.seeded => {
                        e.seq = seq;
                        e.seeded = false;
                        Some(Line::Add(peer, volume, chunk, e.chunk_size))
                    }
                    Some(e) => {
                        e.seq = seq;
                        None
                    }
                    None => {
                        map.insert((volume, chunk), Entry { chunk_size, seq, seeded: seed, settled: 0 });
                        added.push((peer, volume, chunk));
                        Some(if seed {
                            Line::Seed(peer, volume, chunk, chunk_size)
                        } else {
                            Line::Add(peer, volume, chunk, chunk_size)
                        })
                    }
                };
                let settles = map
                    .get_mut(&(volume, chunk))
                    .filter(|e| e.settled < settled)
                    .map(|e| std::mem::replace(&mut e.settled, settled));
                for line in
                    line.into_iter().chain(settles.map(|_| Line::Settled(peer, volume, chunk, settled)))
                {
                    new_lines.push_str(&serde_json::to_string(&line).map_err(std::io::Error::other)?);
                    new_lines.push('\n');
                }
                if let Some(before) = settles {
                    raised.push((peer, volume, chunk, before));
                }
            }
        }
        if new_lines.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.append(&mut f, new_lines.as_bytes()) {
            // Not recorded: the entries go from memory too, so that a re-sent write records
            // them again instead of finding them there.
            let mut inner = lock(&self.inner);
            for (peer, volume, chunk, before) in raised {
                if let Some(e) = inner.peers.get_mut(&peer).and_then(|m| m.get_mut(&(volume, chunk))) {
                    e.settled = before;
                }
            }
            for (peer, volume, chunk) in added {
                if let Some(map) = inner.peers.get_mut(&peer) {
                    map.remove(&(volume, chunk));
                    if map.is_empty() {
                        inner.peers.remove(&peer);
                    }
                }
            }
            return Err(e);
        }
        if let Err(e) = f.sync_data() {
            lock(&self.inner).poisoned.get_or_insert_with(|| format!("fdatasync: {e}"));
            return Err(e);
        }
        Ok(())
    }

    /// Appends `bytes`; if that fails, cuts the file back to where it was (a partial line would
    /// swallow the next append at replay), and poisons the log if that fails too.
    fn append(&self, f: &mut File, bytes: &[u8]) -> std::io::Result<()> {
        let before = f.metadata()?.len();
        let Err(e) = f.write_all(bytes) else { return Ok(()) };
        if let Err(t) = f.set_len(before) {
            lock(&self.inner).poisoned.get_or_insert_with(|| format!("append: {e}; cutting it off: {t}"));
        }
        Err(e)
    }

    /// Whether `peer` is recorded as having missed `(volume, chunk)`, and if so the generation of
    /// the open that settled the entry (0: writes' records only).
    pub fn entry_settled(&self, peer: u64, volume: u64, chunk: u64) -> Option<u64> {
        lock(&self.inner).peers.get(&peer)?.get(&(volume, chunk)).map(|e| e.settled)
    }

    /// The peers recorded as having missed a write to this chunk.
    pub fn missed_by(&self, volume: u64, chunk: u64) -> Vec<u64> {
        let inner = lock(&self.inner);
        inner.peers.iter().filter(|(_, m)| m.contains_key(&(volume, chunk))).map(|(p, _)| *p).collect()
    }

    pub fn pending_peers(&self) -> Vec<u64> {
        lock(&self.inner).peers.keys().copied().collect()
    }

    /// The peers this node holds entries for, split in two: those with an entry a write made,
    /// and those whose entries all come from seeds (their fill's alone).
    pub fn pending_split(&self) -> (Vec<u64>, Vec<u64>) {
        let inner = lock(&self.inner);
        let mut written = Vec::new();
        let mut seeded = Vec::new();
        for (p, m) in &inner.peers {
            if m.values().all(|e| e.seeded) {
                seeded.push(*p);
            } else {
                written.push(*p);
            }
        }
        (written, seeded)
    }

    /// Drops the entries of `peer` that only a seed made (its fill ended: it was admitted).
    /// Returns how many. (Not synced, like `done`: replaying them costs a needless copy.)
    pub fn drop_seeded(&self, peer: u64) -> std::io::Result<usize> {
        let mut f = lock(&self.file);
        let (dropped, emptied) = {
            let mut inner = lock(&self.inner);
            let Some(map) = inner.peers.get_mut(&peer) else { return Ok(0) };
            let dropped: Vec<ChunkKey> = map.iter().filter(|(_, e)| e.seeded).map(|(k, _)| *k).collect();
            for k in &dropped {
                map.remove(k);
            }
            if map.is_empty() {
                inner.peers.remove(&peer);
            }
            (dropped, inner.peers.is_empty())
        };
        if dropped.is_empty() {
            return Ok(0);
        }
        if emptied {
            f.set_len(0)?;
            return Ok(dropped.len());
        }
        let mut lines = String::new();
        for (v, c) in &dropped {
            lines.push_str(&serde_json::to_string(&Line::Done(peer, *v, *c)).map_err(std::io::Error::other)?);
            lines.push('\n');
        }
        self.append(&mut f, lines.as_bytes())?;
        Ok(dropped.len())
    }

    /// Up to `max` chunks `peer` missed.
    pub fn batch(&self, peer: u64, max: usize) -> Vec<Missed> {
        lock(&self.inner)
            .peers
            .get(&peer)
            .map(|m| {
                m.iter()
                    .take(max)
                    .map(|((v, c), e)| Missed {
                        volume: *v,
                        chunk: *c,
                        chunk_size: e.chunk_size,
                        seq: e.seq,
                        settled: e.settled,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// If `peer` is recorded as missing the chunk, renews the record (a new seq, in memory: a
    /// `done` of the copy planned before it then leaves it) and returns true; else false. One step,
    /// so a `done` cannot come between the look and the renewal.
    pub fn renew_if_present(&self, peer: u64, volume: u64, chunk: u64) -> bool {
        let mut inner = lock(&self.inner);
        inner.next_seq += 1;
        let seq = inner.next_seq;
        match inner.peers.get_mut(&peer).and_then(|m| m.get_mut(&(volume, chunk))) {
            Some(e) => {
                e.seq = seq;
                true
            }
            None => false,
        }
    }

    /// Number of chunks `peer` still misses.
    pub fn pending(&self, peer: u64) -> usize {
        lock(&self.inner).peers.get(&peer).map(|m| m.len()).unwrap_or(0)
    }

    /// The chunk was copied to `peer` as it was at record `seq`; clears it unless recorded again since.
    pub fn done(&self, peer: u64, volume: u64, chunk: u64, seq: u64) -> std::io::Result<()> {
        let mut f = lock(&self.file);
        let emptied = {
            let mut inner = lock(&self.inner);
            let Some(map) = inner.peers.get_mut(&peer) else { return Ok(()) };
            if map.get(&(volume, chunk)).is_none_or(|e| e.seq != seq) {
                return Ok(());
            }
            map.remove(&(volume, chunk));
            if map.is_empty() {
                inner.peers.remove(&peer);
            }
            inner.peers.is_empty()
        };
        if emptied {
            // Nothing pending: start the file afresh. (Not synced: if this is lost, replaying the old
            // file repeats copies, which is harmless; so is a failure here.)
            return f.set_len(0);
        }
        let line = serde_json::to_string(&Line::Done(peer, volume, chunk)).map_err(std::io::Error::other)?;
        self.append(&mut f, format!("{line}\n").as_bytes())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewed_record_outlives_the_done_of_a_copy_planned_before() {
        let dir = tempfile::tempdir().unwrap();
        let log = MissedLog::open(&dir.path().join("missed.log")).unwrap();
        assert!(!log.renew_if_present(1, 7, 3), "nothing to renew");
        assert_eq!(log.pending(1), 0, "renewing creates nothing");
        log.record(&[1], 7, 3, 4096).unwrap();
        let planned = log.batch(1, 10)[0].seq;
        assert!(log.renew_if_present(1, 7, 3));
        log.done(1, 7, 3, planned).unwrap();
        assert_eq!(log.pending(1), 1, "the copy planned before the renewal does not end the record");
        let renewed = log.batch(1, 10)[0].seq;
        log.done(1, 7, 3, renewed).unwrap();
        assert_eq!(log.pending(1), 0);
    }

    #[test]
    fn seeded_entries_are_the_fills_alone_until_a_write_records_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missed.log");
        let log = MissedLog::open(&path).unwrap();
        log.record_many(&[(4, 1, 1, 4096), (4, 1, 2, 4096), (5, 1, 1, 4096)], true).unwrap();
        log.record(&[4], 1, 2, 4096).unwrap();
        log.record_many(&[(4, 1, 2, 4096)], true).unwrap();
        assert_eq!(log.pending_split(), (vec![4], vec![5]));
        drop(log);
        // The same after a restart.
        let log = MissedLog::open(&path).unwrap();
        assert_eq!(log.pending_split(), (vec![4], vec![5]));
        // Admitted: the seeds' entries go, the write's stays.
        assert_eq!(log.drop_seeded(4).unwrap(), 1);
        assert_eq!(log.batch(4, 10).iter().map(|b| (b.volume, b.chunk)).collect::<Vec<_>>(), vec![(1, 2)]);
        assert_eq!(log.drop_seeded(5).unwrap(), 1);
        drop(log);
        let log = MissedLog::open(&path).unwrap();
        assert_eq!(log.pending_split(), (vec![4], vec![]));
    }

    #[test]
    fn an_opens_settled_records_keep_their_generation_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missed.log");
        let log = MissedLog::open(&path).unwrap();
        log.record(&[2], 1, 10, 4096).unwrap();
        log.record_settled(&[2, 3], (1, 10, 4096), 7).unwrap();
        // A later write's record of the same chunk keeps the entry settled; a lower generation
        // does not lower it.
        log.record(&[2], 1, 10, 4096).unwrap();
        log.record_settled(&[3], (1, 10, 4096), 5).unwrap();
        let settled =
            |log: &MissedLog, peer| log.batch(peer, 10).iter().map(|m| m.settled).collect::<Vec<_>>();
        assert_eq!((settled(&log, 2), settled(&log, 3)), (vec![7], vec![7]));
        drop(log);
        let log = MissedLog::open(&path).unwrap();
        assert_eq!((settled(&log, 2), settled(&log, 3)), (vec![7], vec![7]));
        // Done, and recorded again by a write only: no longer settled.
        let seq = log.batch(2, 10)[0].seq;
        log.done(2, 1, 10, seq).unwrap();
        log.record(&[2], 1, 10, 4096).unwrap();
        drop(log);
        let log = MissedLog::open(&path).unwrap();
        assert_eq!(settled(&log, 2), vec![0]);
    }

    #[test]
    fn survives_reopen_and_respects_newer_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missed.log");
        let log = MissedLog::open(&path).unwrap();
        log.record(&[2, 3], 1, 10, 1 << 20).unwrap();
        log.record(&[2], 1, 11, 1 << 20).unwrap();
        let b = log.batch(2, 10);
        assert_eq!(b.len(), 2);
        // A newer write to chunk 10 arrives while it is being copied: the copy does not clear it.
        log.record(&[2], 1, 10, 1 << 20).unwrap();
        log.done(2, 1, 10, b[0].seq).unwrap();
        log.done(2, 1, 11, b[1].seq).unwrap();
        assert_eq!(log.pending(2), 1);
        drop(log);
        let log = MissedLog::open(&path).unwrap();
        assert_eq!(log.pending_peers(), vec![2, 3]);
        assert_eq!(log.pending(2), 1);
        let b = log.batch(2, 10);
        log.done(2, 1, 10, b[0].seq).unwrap();
        let b = log.batch(3, 10);
        log.done(3, 1, 10, b[0].seq).unwrap();
        assert!(log.pending_peers().is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_partial_last_line_is_cut_off_so_later_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missed.log");
        let log = MissedLog::open(&path).unwrap();
        log.record(&[2], 1, 10, 1 << 20).unwrap();
        drop(log);
        // A crash in the middle of the next append.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"add":[3,1,1"#).unwrap();
        drop(f);
        let log = MissedLog::open(&path).unwrap();
        log.record(&[4], 1, 12, 1 << 20).unwrap();
        drop(log);
        let log = MissedLog::open(&path).unwrap();
        assert_eq!(log.pending_peers(), vec![2, 4], "the record after the torn line was replayed");
    }

    #[test]
    fn a_failed_append_is_not_kept_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missed.log");
        let log = MissedLog::open(&path).unwrap();
        // A handle that cannot be written (as a full or failing disk would refuse).
        let writable = std::mem::replace(&mut *lock(&log.file), File::open(&path).unwrap());
        assert!(log.record(&[2], 1, 10, 1 << 20).is_err());
        // The same record again (a re-sent write): the entry must not be found in memory alone.
        assert!(log.record(&[2], 1, 10, 1 << 20).is_err(), "never acknowledged from memory alone");
        assert!(log.missed_by(1, 10).is_empty());
        // The failed append could not be cut off either (the handle refuses that too): the log
        // is poisoned, and records fail until the node restarts and replays the file.
        *lock(&log.file) = writable;
        assert!(log.record(&[3], 1, 11, 1 << 20).is_err(), "poisoned");
        drop(log);
        let log = MissedLog::open(&path).unwrap();
        log.record(&[2], 1, 10, 1 << 20).unwrap();
        assert_eq!(log.pending(2), 1);
    }
}
