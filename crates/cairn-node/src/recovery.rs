//! The recovery worker: copies to catching-up peers the chunks they missed (see `missed`), and
//! copies back to this node the chunks a power loss may have reverted here.
//!
//! Power loss: the node acknowledges writes before they are flushed, so after the machine
//! restarted (a new OS boot id, [`note_power_loss`]) every chunk whose dirty flag is set may hold
//! older data than its replicas. Those chunks are recorded in the missed-writes log *for this node
//! itself* before the node first reports to the pool; this node is then catching up, serves no
//! client IO, reports itself as pending, and the worker pulls each such chunk whole from an in-sync
//! replica. (A process kill keeps the page cache: nothing to pull then.)
//!
//! Every round (300 ms) it takes, for each peer with pending chunks that the cluster map shows up
//! and catching up, a batch of chunks and copies each whole chunk (present blocks with their
//! checksums; holes stay holes) with `InstallRange`. A catching-up node receives no client writes, so
//! a copy never races a client write on the target; a write made here meanwhile re-records the chunk,
//! and the copy is repeated. The leader ends the peer's catch-up once no node reports pending chunks
//! for it.

use crate::missed::MissedLog;
use crate::transport::RpcPeerTransport;
use bytes::Bytes;
use cairn_client::piece::{Piece, piece_from, read_piece};
use cairn_client::{ConnectionPool, NodeConnection};
use cairn_meta::MetaService;
use cairn_proto::{Request, Response, RpcError};
use cairn_store::Store;
use cairn_types::limits::RPC_IO_MAX_BYTES;
use cairn_types::placement::pg_of;
use cairn_types::{BLOCK_SIZE_BYTES, ChunkIndex, ChunkSize, VolumeId};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Chunks copied per peer per round.
const BATCH_CHUNKS: usize = 32;
/// Pause between rounds.
const ROUND_INTERVAL: Duration = Duration::from_millis(300);
/// Longest a single range copy may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the OS boot id of the node's last start is kept.
const OS_BOOT_ID_FILE: &str = "os-boot-id";
/// Written after a clean shutdown's final flush succeeded (every acknowledged write is durable),
/// removed at the next start.
const CLEAN_SHUTDOWN_FILE: &str = "clean-shutdown";
/// Present from a power-loss restart until the node has compared its chunk lists with its peers'
/// (a chunk file created since the last flush may have vanished, and its dirty flag with it): the
/// node reports itself as missing writes meanwhile, so it serves nothing.
const LISTING_PENDING_FILE: &str = "power-loss-listing";

/// Whether a power-loss restart's comparison of chunk lists is still to be done.
pub fn listing_pending(data_dir: &std::path::Path) -> bool {
    data_dir.join(LISTING_PENDING_FILE).exists()
}

pub(crate) fn write_durably(dir: &std::path::Path, name: &str, content: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut &f, content)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Records that the node stopped cleanly with everything flushed: its next start needs no
/// power-loss resync even if the machine restarts meanwhile.
pub fn note_clean_shutdown(data_dir: &std::path::Path) -> std::io::Result<()> {
    write_durably(data_dir, CLEAN_SHUTDOWN_FILE, b"clean\n")
}

fn os_boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?.trim().to_string())
}

/// At start, before the node reports to the pool: if the machine restarted since the node last
/// ran, records every dirty chunk as missed by this node itself (so it is pulled back before the
/// node serves). Then remembers this boot. Returns how many chunks were recorded.
pub fn note_power_loss(
    data_dir: &std::path::Path,
    store: &Store,
    missed: &MissedLog,
    me: u64,
) -> Result<usize, String> {
    let path = data_dir.join(OS_BOOT_ID_FILE);
    let now = os_boot_id().map_err(|e| format!("reading the OS boot id: {e}"))?;
    let last = std::fs::read_to_string(&path).ok().map(|s| s.trim().to_string());
    let clean_path = data_dir.join(CLEAN_SHUTDOWN_FILE);
    let clean = clean_path.exists();
    let mut recorded = 0;
    // A resync only when the machine restarted since the last start and the node had not stopped
    // cleanly. No boot-id file (a new data directory, or one from a version before this check):
    // no resync — assuming a power loss there would make every node of an upgraded pool wait for
    // a source none of them can be.
    if let Some(last) = last
        && last != now
        && !clean
    {
        write_durably(data_dir, LISTING_PENDING_FILE, b"pending\n")
            .map_err(|e| format!("{}: {e}", data_dir.join(LISTING_PENDING_FILE).display()))?;
        for volume in store.list_volumes().map_err(|e| e.to_string())? {
            for chunk in store.dirty_chunks(volume).map_err(|e| e.to_string())? {
                if let Some(state) = store.chunk_state(volume, chunk).map_err(|e| e.to_string())? {
                    missed
                        .record(&[me], volume.get(), chunk.0, state.chunk_size.bytes())
                        .map_err(|e| format!("{}: {e}", missed.path().display()))?;
                    recorded += 1;
                }
            }
        }
    }
    // Durable before the node serves: a later start must compare with this boot, and must not
    // take this run's end for a clean one unless it is.
    write_durably(data_dir, OS_BOOT_ID_FILE, now.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if clean {
        std::fs::remove_file(&clean_path)
            .and_then(|_| std::fs::File::open(data_dir)?.sync_all())
            .map_err(|e| format!("{}: {e}", clean_path.display()))?;
    }
    Ok(recorded)
}

/// Whether this node has compared the chunks dirty here with its peers' for the catch-up it is in
/// (see [`compare_dirty`]); its reports say it misses writes until it has, so the leader does not
/// end the catch-up first.
#[derive(Debug, Default)]
pub struct DirtyCheck {
    /// The catch-up compared, named by the node's `in_sync_epoch` while it lasts.
    done_for: std::sync::Mutex<Option<u64>>,
    meta: std::sync::OnceLock<std::sync::Weak<MetaService<RpcPeerTransport>>>,
}

impl DirtyCheck {
    pub fn attach(&self, meta: &Arc<MetaService<RpcPeerTransport>>) {
        let _ = self.meta.set(Arc::downgrade(meta));
    }

    /// The catch-up this node is in (its map shows its current process catching up), if any.
    fn catching_up(&self, me: u64) -> Option<u64> {
        let meta = self.meta.get()?.upgrade()?;
        let boot = meta.boot_id();
        meta.read(|s| {
            s.nodes.get(&me).filter(|n| n.boot_id == boot && n.catching_up).map(|n| n.in_sync_epoch)
        })
    }

    /// Whether the comparison for the catch-up this node is in is still to be done.
    pub fn pending(&self, me: u64) -> bool {
        self.catching_up(me)
            .is_some_and(|period| *self.done_for.lock().unwrap_or_else(|p| p.into_inner()) != Some(period))
    }
}

/// Which backfill members' PGs this node has *seeded*: recorded every chunk it holds of the PG as
/// missed by the member, so that the catch-up copies them (a node that joins is filled so). A
/// mutation applied here after this node's map showed the member is recorded for it too (or
/// refused as from a stale map: `ClientHooks::stale_missed`, checked again after applying), so the
/// seed and the records cover every write the member must get.
#[derive(Debug, Default)]
pub struct Seeding {
    /// (member, replica count, PG) seeded by this process.
    done: std::sync::Mutex<std::collections::HashSet<(u64, u8, u32)>>,
    /// The map epoch as of which every backfill entry in a PG this node holds is seeded (reported
    /// to the leader, which admits a member only after every up holder seeded it).
    epoch: std::sync::atomic::AtomicU64,
    /// When a failed seed was last logged (at most one warning every 30 s: it is retried every
    /// round).
    warned: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Seeding {
    fn warn(&self, message: String) {
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            tracing::warn!("{message}; every fill of a PG this node holds waits for it");
            *warned = Some(std::time::Instant::now());
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Seeds the backfill members of the PGs this node holds that it has not seeded yet (see
/// [`Seeding`]). Returns false if something failed (tried again next round).
async fn seed_backfill(
    store: &Arc<Store>,
    missed: &MissedLog,
    meta: &MetaService<RpcPeerTransport>,
    me: u64,
    seeding: &Seeding,
) -> bool {
    let (epoch, wanted, volumes, pg_count) = meta.read(|s| {
        let wanted: Vec<(u64, u8, u32)> = s
            .pg_sets
            .keys()
            .flat_map(|r| (0..s.pg_count).map(move |pg| (*r, pg)))
            .filter(|(r, pg)| s.holders(*r, *pg).contains(&me))
            .flat_map(|(r, pg)| s.backfill(r, pg).into_iter().map(move |x| (x, r, pg)))
            .collect();
        let volumes: Vec<(u64, u8, u32)> = s
            .volumes
            .values()
            .filter(|v| !s.deleted_volumes.contains(&v.id))
            .map(|v| (v.id, v.replicas, v.chunk_size_bytes))
            .collect();
        (s.epoch, wanted, volumes, s.pg_count)
    });
    let todo: Vec<(u64, u8, u32)> = {
        let mut done = seeding.done.lock().unwrap_or_else(|p| p.into_inner());
        // A member admitted since is forgotten (filled again later, it is seeded again).
        done.retain(|w| wanted.contains(w));
        wanted.into_iter().filter(|w| !done.contains(w)).collect()
    };
    if !todo.is_empty() {
        let mut entries = Vec::new();
        for (id, replicas, chunk_size) in volumes {
            let Ok(volume) = VolumeId::new(id) else { continue };
            let members: Vec<(u64, u32)> =
                todo.iter().filter(|(_, r, _)| *r == replicas).map(|(x, _, pg)| (*x, *pg)).collect();
            if members.is_empty() {
                continue;
            }
            let st = store.clone();
            let chunks = match tokio::task::spawn_blocking(move || st.list_chunks(volume)).await {
                Ok(Ok(chunks)) => chunks,
                Ok(Err(e)) => {
                    // Every fill this node holds a PG of waits on it: say why.
                    seeding.warn(format!("seeding a backfill: listing the chunks of volume {id}: {e}"));
                    return false;
                }
                Err(e) => {
                    seeding.warn(format!("seeding a backfill: {e}"));
                    return false;
                }
            };
            for chunk in chunks {
                let pg = pg_of(volume, chunk, pg_count).0;
                for (x, _) in members.iter().filter(|(_, p)| *p == pg) {
                    entries.push((*x, id, chunk.0, chunk_size));
                }
            }
        }
        if let Err(e) = missed.record_many(&entries, true) {
            seeding.warn(format!("seeding a backfill: missed-writes log: {e}"));
            return false;
        }
        if !entries.is_empty() {
            tracing::info!(
                chunks = entries.len(),
                pgs = todo.len(),
                "backfill: recorded this node's chunks of the PGs being filled, to copy them over"
            );
        }
        seeding.done.lock().unwrap_or_else(|p| p.into_inner()).extend(todo);
    }
    seeding.epoch.fetch_max(epoch, std::sync::atomic::Ordering::SeqCst);
    true
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    store: Arc<Store>,
    missed: Arc<MissedLog>,
    meta: Arc<MetaService<RpcPeerTransport>>,
    me: u64,
    data_dir: std::path::PathBuf,
    dirty_check: Arc<DirtyCheck>,
    seeding: Arc<Seeding>,
    stop: CancellationToken,
) {
    let connections = ConnectionPool::default();
    let started = tokio::time::Instant::now();
    let mut reaped = tokio::time::Instant::now();
    let mut damaged: Vec<(cairn_types::VolumeId, ChunkIndex)> = Vec::new();
    // Per peer whose copies failed: when to try again, and the current delay (doubling up to
    // COPY_BACKOFF_MAX), so a peer that cannot take copies (full disk, say) is not retried every
    // round nor reported in every round's log.
    let mut backoff: std::collections::HashMap<u64, (tokio::time::Instant, Duration)> = Default::default();
    // Chunks whose copy here cannot be read (a corrupt block, say): skipped until then, so that one
    // of them does not hold up the rest of a peer's catch-up (the other replicas that recorded the
    // missed write copy it).
    let mut unreadable: std::collections::HashMap<(u64, u64), tokio::time::Instant> = Default::default();
    // Records kept after a relayed copy that differs from this node's own (shared volumes), and
    // since when (see `KEPT_MAX`).
    let mut kept_since: std::collections::HashMap<(u64, u64, u64), tokio::time::Instant> = Default::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(ROUND_INTERVAL) => {}
        }
        let local = Local { store: &store, missed: &missed, meta: &meta, connections: &connections, me };
        if listing_pending(&data_dir) && compare_chunk_lists(local).await {
            let path = data_dir.join(LISTING_PENDING_FILE);
            let removed =
                std::fs::remove_file(&path).and_then(|_| std::fs::File::open(&data_dir)?.sync_all());
            if let Err(e) = removed {
                tracing::error!("{}: {e}", path.display());
            }
        }
        if let Some(period) = dirty_check.catching_up(me)
            && dirty_check.pending(me)
            && compare_dirty(local).await
        {
            *dirty_check.done_for.lock().unwrap_or_else(|p| p.into_inner()) = Some(period);
        }
        damaged.extend(store.take_damaged());
        if !damaged.is_empty() {
            note_damaged(&mut damaged, &missed, &meta, me);
        }
        if reaped.elapsed() >= REAP_INTERVAL {
            reap_deleted(&store, &meta, &stop).await;
            reaped = tokio::time::Instant::now();
        }
        seed_backfill(&store, &missed, &meta, me, &seeding).await;
        // Fills that ended (the node was admitted): the seeds' own entries for it are done with.
        for peer in missed.pending_peers() {
            if peer != me && meta.read(|s| s.nodes.contains_key(&peer) && !s.backfilling(peer)) {
                match missed.drop_seeded(peer) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        peer,
                        entries = n,
                        "backfill: node {peer} was admitted; dropped this node's seeded entries for it"
                    ),
                    Err(e) => tracing::error!("missed-writes log: {e}"),
                }
            }
        }
        if missed.pending(me) > 0 {
            // Only while the node serves no client IO (the leader makes a node that reports writes
            // it missed itself catching up): a pull racing a client write could put older data over
            // it, and an install lifts a damaged chunk's quarantine before all of it is copied.
            let catching_up =
                meta.read(|s| s.nodes.get(&me).is_none_or(|n| n.boot_id != meta.boot_id() || n.catching_up));
            if catching_up {
                pull_own(local, started).await;
            }
            // Its own copies may be the reverted ones: it copies nothing to others until it
            // has pulled them all back.
            continue;
        }
        for peer in missed.pending_peers() {
            if peer == me {
                continue;
            }
            let Some(node) = meta.read(|s| s.nodes.get(&peer).cloned()) else { continue };
            if !node.up || !node.catching_up {
                continue;
            }
            if backoff.get(&peer).is_some_and(|(at, _)| tokio::time::Instant::now() < *at) {
                continue;
            }
            let Ok(addr) = node.addr.rpc.parse::<SocketAddr>() else { continue };
            let conn = match connections.get(addr).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(peer, "catch-up: {e}");
                    continue;
                }
            };
            let now = tokio::time::Instant::now();
            unreadable.retain(|_, until| *until > now);
            kept_since.retain(|_, since| now.saturating_duration_since(*since) < KEPT_MAX * 2);
            // (Or shown down: a node cut off from the pool, back before the leader saw it, may
            // hold a fenced writer's stray it alone applied — found by the production simulation,
            // seed 517 693: one such copied to a node being filled.)
            let me_catching_up = meta.read(|s| s.nodes.get(&me).is_none_or(|n| !n.in_sync()));
            let batch = missed.batch(peer, BATCH_CHUNKS + unreadable.len());
            // Shared volumes (their copies may be siblings), looked up once per batch.
            let shared: std::collections::HashSet<u64> =
                meta.read(|s| s.volumes.values().filter(|v| v.shared).map(|v| v.id).collect());
            // And each volume's writer generation in the map (the fence a copy carries at least).
            let generations: std::collections::HashMap<u64, u64> =
                meta.read(|s| s.volumes.values().map(|v| (v.id, v.generation)).collect());
            let mut copied = 0;
            for crate::missed::Missed { volume, chunk, chunk_size, seq, settled } in batch {
                if unreadable.contains_key(&(volume, chunk)) {
                    continue;
                }
                if meta.read(|s| s.deleted_volumes.contains(&volume)) {
                    // Deleted meanwhile: nothing to copy (its chunks are purged everywhere).
                    if let Err(e) = missed.done(peer, volume, chunk, seq) {
                        tracing::error!("missed-writes log: {e}");
                    }
                    continue;
                }
                // A node catching up itself (or shown down) may hold an older copy than the in-sync
                // replicas (it missed writes too): it passes on theirs, never its own.
                // (Unless no replica is in sync at all — the whole pool restarting — when its own
                // copy is all there is.)
                let in_sync_source = || {
                    let Ok(v) = VolumeId::new(volume) else { return false };
                    copy_sources(&meta, &missed, (me, peer), v, ChunkIndex(chunk))
                        .is_some_and(|s| !s.is_empty())
                };
                // On a shared volume a copy may replace a higher version on the peer, so it must
                // be current: only a node that serves reads of the chunk (its peers confirm its
                // copy is current) copies its own; any other passes on an in-sync replica's (a
                // holder frozen past a write it missed would otherwise put its older copy over the
                // newer one another replica gave the peer).
                // (`passed_on`: this node's copy is passed over by rule, not because it failed.)
                let mut passed_on = true;
                let map_generation = generations.get(&volume).copied().unwrap_or(0);
                let outcome = if me_catching_up && in_sync_source() {
                    Err(CopyFailure::Source("this node is catching up itself (or shown down)".into()))
                } else if unfenced_stray(&store, volume, chunk, map_generation).await && in_sync_source() {
                    // It missed the current writer's fence, and its copy, dirty and of an older
                    // generation, may be a stray the fenced writer left only here: an in-sync
                    // replica's goes instead (found by the production simulation, seed 98 655).
                    Err(CopyFailure::Source(
                        "this node missed the writer's fence; its copy may be a stray".into(),
                    ))
                } else if shared.contains(&volume) && !serves_reads_of(&meta, me, volume, chunk) {
                    Err(CopyFailure::Source("this node does not serve reads of the chunk now".into()))
                } else {
                    passed_on = false;
                    copy_chunk(
                        &store,
                        (&conn, peer),
                        (volume, chunk, chunk_size),
                        (me, shared.contains(&volume), map_generation),
                        settled,
                    )
                    .await
                };
                match outcome {
                    Ok(()) => {
                        copied += 1;
                        if let Err(e) = missed.done(peer, volume, chunk, seq) {
                            tracing::error!("missed-writes log: {e}");
                        }
                    }
                    Err(CopyFailure::Source(e)) => {
                        // This node's copy cannot be read or is passed over: the peer gets an
                        // in-sync replica's. This node's own version, before the relay: the
                        // record is done only if the peer ends up with a copy at least as new
                        // (one writer). An in-sync replica may lack a write this node applied
                        // whose failure there is not recorded yet (the writer is still waiting
                        // for it); relayed, its copy would clear this record, the write later
                        // acknowledged, and a node being filled admitted without it (found by
                        // the simulation of production's data path).
                        // (And the volume's writer generation: the one in the map, or this node's
                        // fence if newer — the map may lag the open that fenced it.)
                        let st = store.clone();
                        let (own, current) = tokio::task::spawn_blocking(move || {
                            let v = VolumeId::new(volume).ok()?;
                            let own = st.chunk_version(v, ChunkIndex(chunk)).ok()?;
                            let fence = st.highest_generation(v).ok()?.0;
                            Some((own, fence.max(map_generation)))
                        })
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or((cairn_types::Version::NONE, map_generation));
                        let is_shared = shared.contains(&volume);
                        match relay_from_replica(
                            &store,
                            &missed,
                            &meta,
                            &connections,
                            &conn,
                            (me, peer),
                            volume,
                            chunk,
                            chunk_size,
                            (is_shared, settled),
                        )
                        .await
                        {
                            // (Only when this node's copy was passed over by rule, readable: one
                            // that cannot be read is given by nobody, and keeping the record would
                            // hold the peer's catch-up up for good. On a shared volume any other
                            // version is kept for: siblings are not ordered.)
                            // One writer: this node's newer copy (a write in flight, or a failed
                            // write's leftover) goes after it — its versions grow along one
                            // chain, so it holds all the relayed one does — and then the record
                            // is done. (Kept instead, two nodes catching up, each holding the
                            // other's records, waited for each other for good: found by the
                            // simulation, seed 293 876.)
                            // (Only a copy of the volume's current writer generation: an older
                            // generation's version above the in-sync replica's is a write never
                            // acknowledged — a fenced writer's stray, which only this node's
                            // dirty-chunk comparison finds — and must not spread; the relayed
                            // copy then does the record. Found by review.)
                            Ok((from, held))
                                if passed_on && !is_shared && held < own && own.generation >= current =>
                            {
                                let generation = generations.get(&volume).copied().unwrap_or(0);
                                let own_copy = copy_chunk(
                                    &store,
                                    (&conn, peer),
                                    (volume, chunk, chunk_size),
                                    (me, false, generation),
                                    settled,
                                )
                                .await;
                                match own_copy {
                                    Ok(()) => {
                                        tracing::debug!(
                                            peer,
                                            volume,
                                            chunk,
                                            "catch-up: {e}: copied node {from}'s copy ({held}), then this \
                                             node's newer one ({own})"
                                        );
                                        copied += 1;
                                        if let Err(e) = missed.done(peer, volume, chunk, seq) {
                                            tracing::error!("missed-writes log: {e}");
                                        }
                                    }
                                    Err(why) => {
                                        tracing::debug!(
                                            peer,
                                            volume,
                                            chunk,
                                            "catch-up: own copy after a relay: {why:?}"
                                        );
                                        unreadable.insert(
                                            (volume, chunk),
                                            tokio::time::Instant::now() + KEPT_RETRY,
                                        );
                                    }
                                }
                                continue;
                            }
                            // A shared volume's siblings are not ordered: the record is kept
                            // until this node serves reads of the chunk again (then it copies its
                            // own), for at most KEPT_MAX (by then any write in flight has been
                            // acknowledged or failed; a copy that still differs is a leftover).
                            Ok((from, held))
                                if passed_on
                                    && is_shared
                                    && held != own
                                    && kept_since
                                        .entry((peer, volume, chunk))
                                        .or_insert_with(tokio::time::Instant::now)
                                        .elapsed()
                                        < KEPT_MAX =>
                            {
                                tracing::debug!(
                                    peer,
                                    volume,
                                    chunk,
                                    "catch-up: {e}: node {from}'s copy differs from this node's ({held}, here \
                                     {own}); the record is kept for now"
                                );
                                unreadable.insert((volume, chunk), tokio::time::Instant::now() + KEPT_RETRY);
                                continue;
                            }
                            Ok((from, _)) => {
                                if passed_on {
                                    tracing::debug!(
                                        peer,
                                        volume,
                                        chunk,
                                        "catch-up: {e}: copied node {from}'s copy"
                                    );
                                } else {
                                    tracing::warn!(
                                        peer,
                                        volume,
                                        chunk,
                                        "catch-up: this node's copy cannot be read ({e}); copied node {from}'s instead"
                                    );
                                }
                                copied += 1;
                                if let Err(e) = missed.done(peer, volume, chunk, seq) {
                                    tracing::error!("missed-writes log: {e}");
                                }
                                continue;
                            }
                            Err(why) => tracing::debug!(peer, volume, chunk, "catch-up: relaying: {why}"),
                        }
                        tracing::warn!(
                            peer,
                            volume,
                            chunk,
                            "catch-up: this node's copy cannot be read ({e}) and no other in-sync replica \
                             could be copied; skipped for {} s",
                            UNREADABLE_SKIP.as_secs()
                        );
                        unreadable.insert((volume, chunk), tokio::time::Instant::now() + UNREADABLE_SKIP);
                    }
                    Err(CopyFailure::Raced) => {
                        tracing::debug!(
                            peer,
                            volume,
                            chunk,
                            "catch-up: another replica's copy got there first"
                        );
                    }
                    Err(CopyFailure::Refused) => {
                        // The peer gets the chunk from the node whose record names this one;
                        // this record is tried again later (skipped meanwhile, so the rest of
                        // the batch goes on: found by review).
                        tracing::debug!(
                            peer,
                            volume,
                            chunk,
                            "catch-up: the peer recorded this node as having missed the chunk"
                        );
                        unreadable.insert((volume, chunk), tokio::time::Instant::now() + KEPT_RETRY);
                    }
                    Err(CopyFailure::Target(e)) => {
                        let delay =
                            backoff.get(&peer).map_or(ROUND_INTERVAL, |(_, d)| *d * 2).min(COPY_BACKOFF_MAX);
                        tracing::warn!(
                            peer,
                            volume,
                            chunk,
                            "catch-up copy failed: {e}; trying again in {} s",
                            delay.as_secs_f64()
                        );
                        backoff.insert(peer, (tokio::time::Instant::now() + delay, delay));
                        connections.forget(&conn).await;
                        break;
                    }
                }
            }
            if copied > 0 {
                backoff.remove(&peer);
            }
            if copied > 0 {
                tracing::info!(peer, copied, remaining = missed.pending(peer), "catch-up: copied chunks");
            }
        }
    }
}

/// Records the chunks the store found damaged as missed by this node itself, so that they are
/// copied back from replicas like after a power loss (until then the store refuses every operation
/// on them, so no read ever sees zeros for them). Keeps those of volumes the map does not know yet.
fn note_damaged(
    damaged: &mut Vec<(cairn_types::VolumeId, ChunkIndex)>,
    missed: &MissedLog,
    meta: &MetaService<RpcPeerTransport>,
    me: u64,
) {
    damaged.retain(|(volume, chunk)| {
        let (size, deleted) = meta.read(|s| {
            let size = s.volumes.values().find(|v| v.id == volume.get()).map(|v| v.chunk_size_bytes);
            (size, s.deleted_volumes.contains(&volume.get()))
        });
        match size {
            Some(size) => match missed.record(&[me], volume.get(), chunk.0, size) {
                Ok(()) => {
                    tracing::warn!(%volume, %chunk, "a damaged chunk is copied back from a replica");
                    false
                }
                Err(e) => {
                    tracing::error!("missed-writes log: {e}");
                    true
                }
            },
            None => !deleted,
        }
    });
}

/// Where a copy of a chunk may come from: the in-sync holders of its PG other than this node and
/// `not` (the peer being copied to), leaving out any this node recorded as having missed a write
/// to the chunk (the map may not show it catching up yet). `None` if the map does not know the
/// volume (deleted, or not yet).
fn copy_sources(
    meta: &MetaService<RpcPeerTransport>,
    missed: &MissedLog,
    (me, not): (u64, u64),
    volume: VolumeId,
    chunk: ChunkIndex,
) -> Option<Vec<(u64, String)>> {
    let behind = missed.missed_by(volume.get(), chunk.0);
    meta.read(|s| {
        let v = s.volumes.values().find(|v| v.id == volume.get())?;
        Some(
            s.holders(v.replicas, pg_of(volume, chunk, s.pg_count).0)
                .into_iter()
                .filter(|n| *n != me && *n != not && !behind.contains(n))
                .filter_map(|n| s.nodes.get(&n))
                .filter(|n| n.in_sync())
                .map(|n| (n.id, n.addr.rpc.clone()))
                .collect(),
        )
    })
}

/// Whether this node serves client reads of a chunk now (it serves clients and enough of the
/// chunk's PG's other holders granted it a read lease: its copy is current).
fn serves_reads_of(meta: &MetaService<RpcPeerTransport>, me: u64, volume: u64, chunk: u64) -> bool {
    let Ok(id) = VolumeId::new(volume) else { return false };
    let lease = meta.read(|s| {
        let v = s.volumes.values().find(|v| v.id == volume)?;
        let holders = s.holders(v.replicas, pg_of(id, ChunkIndex(chunk), s.pg_count).0);
        let need = cairn_meta::service::lease_need(v.replicas, holders.len());
        holders.contains(&me).then(|| (holders.into_iter().filter(|n| *n != me).collect::<Vec<u64>>(), need))
    });
    lease.is_some_and(|(others, need)| meta.lease_covers(&others, need))
}

/// What the comparisons of this node's copies with its peers' work with.
#[derive(Clone, Copy)]
struct Local<'a> {
    store: &'a Arc<Store>,
    missed: &'a MissedLog,
    meta: &'a MetaService<RpcPeerTransport>,
    connections: &'a ConnectionPool,
    me: u64,
}

/// While this node catches up: compares the version of every chunk dirty here (mutated lately —
/// perhaps by a writer the pool had already fenced, which reached only this node because the new
/// writer could not) with an in-sync replica's, and records each that differs as missed by this
/// node, so that it is pulled back before the node serves (nobody else recorded such a write).
/// Returns whether the comparison is complete.
async fn compare_dirty(node: Local<'_>) -> bool {
    let Local { store, missed, meta, connections, me } = node;
    let s = store.clone();
    let Ok(Ok(volumes)) = tokio::task::spawn_blocking(move || s.list_volumes()).await else { return false };
    let mut recorded = 0;
    for volume in volumes {
        let (info, deleted) = meta.read(|s| {
            (
                s.volumes.values().find(|v| v.id == volume.get()).cloned(),
                s.deleted_volumes.contains(&volume.get()),
            )
        });
        // Deleted, or never in the pool's map (the comparison runs from a map that knows this
        // process, so one newer than any write it holds): nothing to compare.
        let Some(info) = info.filter(|_| !deleted) else { continue };
        let s = store.clone();
        let dirty = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for chunk in s.dirty_chunks(volume)? {
                if let Some(state) = s.chunk_state(volume, chunk)? {
                    out.push((chunk, state.version()));
                }
            }
            Ok::<_, cairn_store::StoreError>(out)
        })
        .await;
        let Ok(Ok(dirty)) = dirty else { return false };
        for (chunk, mine) in dirty {
            let sources = copy_sources(meta, missed, (me, me), volume, chunk).unwrap_or_default();
            // Every in-sync holder is asked; one that another recorded as having missed the chunk
            // does not count (its map may lag); this copy is compared with the others.
            let ask = Request::ChunkVersion { volume, chunk };
            let replies = futures::future::join_all(sources.iter().map(|(_, rpc)| async {
                let addr = rpc.parse::<SocketAddr>().ok()?;
                match connections.call_within(addr, &ask, COMPARE_TIMEOUT).await {
                    Ok(Response::ChunkVersion(info)) => {
                        Some(info.unwrap_or_else(cairn_proto::ChunkInfo::absent))
                    }
                    _ => None,
                }
            }))
            .await;
            let answered: Vec<(u64, cairn_proto::ChunkInfo)> =
                sources.iter().zip(replies).filter_map(|((id, _), r)| Some((*id, r?))).collect();
            let behind: Vec<u64> = answered.iter().flat_map(|(_, i)| i.missed_by.iter().copied()).collect();
            let versions: Vec<cairn_types::Version> = answered
                .iter()
                .filter(|(id, _)| !behind.contains(id))
                .map(|(_, i)| i.chunk_version())
                .collect();
            // The volume's writer generation: this node's map may lag (it can have taken a fenced
            // writer's write while it did), so the fences the others persisted count too.
            let current = answered.iter().map(|(_, i)| i.fence.0).fold(info.generation, u64::max);
            // Copies of nodes that serve: one that does not may hold the same leftover.
            let serving: Vec<cairn_types::Version> = answered
                .iter()
                .filter(|(id, i)| i.serving && !behind.contains(id))
                .map(|(_, i)| i.chunk_version())
                .collect();
            let theirs = (!versions.is_empty()).then_some(versions);
            match theirs {
                Some(v) if v.iter().all(|v| *v == mine) => {}
                // (A copy left half installed — an interrupted settle or open — is pulled back
                // whole, whatever its marker compares to.)
                // A copy of the volume's current writer generation differs only by its writers'
                // writes in flight (on their way to some replicas, or failed on some and then
                // recorded, or never acknowledged; on a shared volume, siblings its writers
                // settle): their records and settles cover them. Pulling an in-sync replica's
                // copy back over it would undo a write that may be acknowledged — that replica
                // may not have got it yet — with nobody recording that this node lacks it (found
                // by the production simulation, seeds 154 and 3601; on shared volumes by review).
                // What this comparison is for, a fenced writer's leftover (an older generation),
                // is still pulled back.
                Some(_) if !mine.is_installing() && mine.generation >= current => {}
                // A one-writer volume's fenced-writer leftover is above every copy the pool holds;
                // a copy here that the copy of some in-sync replica that serves matches or passes
                // is none (an older one is covered by the records of the writes it missed; one
                // that does not serve may hold the same leftover: found by review). Pulling back
                // over it could undo what an open's reconciliation chose, or race the copy of its
                // winner to the others (found by the production simulation).
                Some(_) if !mine.is_installing() && !info.shared && serving.iter().any(|t| *t >= mine) => {}
                Some(_) => {
                    if let Err(e) = missed.record(&[me], volume.get(), chunk.0, info.chunk_size_bytes) {
                        tracing::error!("missed-writes log: {e}");
                        return false;
                    }
                    recorded += 1;
                }
                // No in-sync replica to compare with (a one-copy volume; or every holder is
                // catching up, as after a restart of the whole pool: no writer could have reached
                // one of them and not the others since, and the next writer's open reconciles the
                // chunks dirty on them).
                None if sources.is_empty() => {}
                // One exists but did not answer: again later.
                None => {
                    tracing::debug!(%volume, %chunk, "catch-up: no in-sync replica answered for the comparison yet");
                    return false;
                }
            }
        }
    }
    if recorded > 0 {
        tracing::warn!(
            chunks = recorded,
            "catch-up: {recorded} chunk(s) changed lately here differ from the in-sync replicas'; they are copied back"
        );
    }
    true
}

/// After a power loss: asks every up peer which chunks it holds of every volume, and records as
/// missed by this node each chunk of a PG this node holds that it has no file for (its creation
/// never became durable), so that it is pulled like a dirty one. Returns whether the comparison is
/// complete (else it is tried again next round). Waits until this node's map knows its current
/// process: the map is then at least as new as the restart, so no volume is overlooked.
async fn compare_chunk_lists(node: Local<'_>) -> bool {
    let Local { store, missed, meta, connections, me } = node;
    if meta.read(|s| s.nodes.get(&me).map(|n| n.boot_id)) != Some(meta.boot_id()) {
        return false;
    }
    let (volumes, peers) = meta.read(|s| {
        let volumes: Vec<cairn_meta::Volume> = s.volumes.values().cloned().collect();
        let peers: Vec<(u64, String)> =
            s.nodes.values().filter(|n| n.id != me && n.up).map(|n| (n.id, n.addr.rpc.clone())).collect();
        (volumes, peers)
    });
    // Every node that shares a PG with this one must answer: a chunk only a down peer holds (with
    // this node) would otherwise go unnoticed, and this node would serve zeros for it.
    let up: std::collections::BTreeSet<u64> = peers.iter().map(|(id, _)| *id).collect();
    let missing_peer = meta.read(|s| {
        s.pg_sets.iter().find_map(|(r, set)| {
            (0..set.len() as u32).find_map(|pg| {
                let holders = s.holders(*r, pg);
                if !holders.contains(&me) {
                    return None;
                }
                holders.into_iter().find(|n| *n != me && !up.contains(n))
            })
        })
    });
    if let Some(peer) = missing_peer {
        tracing::info!(
            peer,
            "power-loss resync: waiting for node {peer}, which shares placement groups with this one, to compare chunk lists"
        );
        return false;
    }
    let mut recorded = 0;
    for v in volumes {
        let Ok(volume) = VolumeId::new(v.id) else { continue };
        let s = store.clone();
        let Ok(Ok(local)) = tokio::task::spawn_blocking(move || s.list_chunks(volume)).await else {
            return false;
        };
        let local: std::collections::BTreeSet<ChunkIndex> = local.into_iter().collect();
        let mut wanted = std::collections::BTreeSet::new();
        for (peer, rpc) in &peers {
            let Ok(addr) = rpc.parse::<SocketAddr>() else { continue };
            let mut after = None;
            loop {
                let request =
                    Request::ListChunks { volume, after, limit: cairn_proto::message::CHUNK_LIST_MAX };
                let (chunks, more) = match connections.call_within(addr, &request, COPY_TIMEOUT).await {
                    Ok(Response::ChunkList { chunks, more }) => (chunks, more),
                    other => {
                        tracing::info!(peer, %volume, "power-loss resync: listing chunks: {other:?}; trying again");
                        return false;
                    }
                };
                after = chunks.last().copied();
                let mine = |c: &ChunkIndex| {
                    meta.read(|s| s.holders(v.replicas, pg_of(volume, *c, s.pg_count).0).contains(&me))
                };
                wanted.extend(chunks.into_iter().filter(|c| !local.contains(c) && mine(c)));
                if !more || after.is_none() {
                    break;
                }
            }
        }
        for chunk in wanted {
            if let Err(e) = missed.record(&[me], v.id, chunk.0, v.chunk_size_bytes) {
                tracing::error!("missed-writes log: {e}");
                return false;
            }
            recorded += 1;
        }
    }
    if recorded > 0 {
        tracing::warn!(
            chunks = recorded,
            "power-loss resync: {recorded} chunk(s) the peers hold had no file here (created after the last flush); they are copied back"
        );
    }
    true
}

/// Longest wait before copying to a peer whose copies failed is tried again.
const COPY_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How often the node looks for data of deleted volumes to remove.
const REAP_INTERVAL: Duration = Duration::from_secs(2);
/// Chunk files removed per step; steps are [`REAP_PAUSE`] apart, so deleting data costs the disk
/// at most ~2 500 unlinks a second however much was deleted.
const REAP_FILES_PER_STEP: usize = 256;
const REAP_PAUSE: Duration = Duration::from_millis(100);
/// Steps of [`REAP_FILES_PER_STEP`] files per reaping round (every [`REAP_INTERVAL`]).
const REAP_STEPS_PER_ROUND: usize = 4;

/// Removes, in the background and bounded in rate, the chunks of every volume the pool deleted.
async fn reap_deleted(store: &Arc<Store>, meta: &MetaService<RpcPeerTransport>, stop: &CancellationToken) {
    let store2 = store.clone();
    let Ok(Ok(local)) = tokio::task::spawn_blocking(move || store2.list_volumes()).await else { return };
    let deleted: Vec<cairn_types::VolumeId> =
        meta.read(|s| local.into_iter().filter(|v| s.deleted_volumes.contains(&v.get())).collect());
    // At most REAP_STEPS_PER_ROUND steps per round, so deleting a large volume never holds up
    // catch-up for long (the rest goes in later rounds).
    let mut steps = 0;
    for volume in deleted {
        let mut removed = 0;
        loop {
            if steps >= REAP_STEPS_PER_ROUND {
                return;
            }
            steps += 1;
            let store = store.clone();
            let step =
                tokio::task::spawn_blocking(move || store.delete_volume_step(volume, REAP_FILES_PER_STEP))
                    .await;
            match step {
                Ok(Ok((n, done))) => {
                    removed += n;
                    if done {
                        tracing::info!(%volume, removed, "removed the data of a deleted volume");
                        break;
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(%volume, "removing the data of a deleted volume: {e}");
                    break;
                }
                Err(e) => {
                    tracing::error!(%volume, "removing the data of a deleted volume: task failed: {e}");
                    break;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REAP_PAUSE) => {}
            }
        }
    }
}

/// Rounds of `pull_own` so far: picks which source each chunk is pulled from.
static PULL_ROUNDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How long after it starts a node waits before it pulls its own chunks back from in-sync
/// replicas: a write it applied and answered before it lost power may still be on its way to the
/// others (a writer's attempt lasts up to its RPC timeout, 5 s by default, and the hold-back
/// allowance); after this, the newest in-sync copy holds every write acknowledged with this node
/// among its appliers.
const PULL_OWN_AFTER: Duration = Duration::from_secs(10);

/// Pulls back, from in-sync replicas, a batch of the chunks this node recorded as missed by itself:
/// from the one whose copy is newest, and not before `PULL_OWN_AFTER` since this process started
/// (found by the production simulation's long run, seed 383 903: a node back from a power loss
/// pulled a copy from a replica the write it had answered had not reached yet, and the write,
/// acknowledged with it among its appliers, was gone from it, unrecorded).
async fn pull_own(node: Local<'_>, started: tokio::time::Instant) {
    let Local { store, missed, meta, connections, me } = node;
    let mut pulled = 0;
    let round = PULL_ROUNDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for crate::missed::Missed { volume, chunk, chunk_size, seq, .. } in missed.batch(me, BATCH_CHUNKS) {
        // The in-sync holders of the chunk's PG other than this node; none if the volume is gone.
        let deleted = meta.read(|s| s.deleted_volumes.contains(&volume));
        let sources: Option<Vec<SocketAddr>> = VolumeId::new(volume).ok().and_then(|v| {
            let all = copy_sources(meta, missed, (me, me), v, ChunkIndex(chunk))?;
            Some(all.into_iter().filter_map(|(_, rpc)| rpc.parse().ok()).collect())
        });
        let Some(sources) = sources else {
            // A deleted volume: nothing to pull (its chunks are purged with it). A volume this
            // node's map does not know yet (it is still catching up on the log) waits.
            if deleted && let Err(e) = missed.done(me, volume, chunk, seq) {
                tracing::error!("missed-writes log: {e}");
            }
            continue;
        };
        if sources.is_empty() {
            // No holder in sync at all (the whole pool lost power, say): the holders' own copies
            // decide.
            match revive_chunk(node, (volume, chunk, chunk_size)).await {
                Ok(from) => {
                    pulled += 1;
                    if from != me {
                        tracing::warn!(
                            volume,
                            chunk,
                            "no replica was in sync: took node {from}'s copy, the newest readable one"
                        );
                    }
                    if let Err(e) = missed.done(me, volume, chunk, seq) {
                        tracing::error!("missed-writes log: {e}");
                    }
                }
                Err(e) => tracing::debug!(volume, chunk, "resync: no in-sync replica to copy from yet ({e})"),
            }
            continue;
        }
        if started.elapsed() < PULL_OWN_AFTER {
            continue;
        }
        // The newest copy among the sources that answer (ties: the first in rotation).
        let Ok(v) = VolumeId::new(volume) else { continue };
        let ask = Request::ChunkVersion { volume: v, chunk: ChunkIndex(chunk) };
        let k = sources.len();
        let rotated: Vec<SocketAddr> = (0..k).map(|i| sources[(chunk as usize + round + i) % k]).collect();
        let versions = futures::future::join_all(rotated.iter().map(|addr| async {
            match connections.call_within(*addr, &ask, COMPARE_TIMEOUT).await {
                Ok(Response::ChunkVersion(info)) => {
                    Some(info.map_or(cairn_types::Version::NONE, |i| i.chunk_version()))
                }
                _ => None,
            }
        }))
        .await;
        let newest = rotated.iter().zip(versions).filter_map(|(addr, v)| Some((v?, *addr))).fold(
            None,
            |best: Option<(cairn_types::Version, SocketAddr)>, (v, a)| match best {
                Some((bv, _)) if bv >= v => best,
                _ => Some((v, a)),
            },
        );
        let Some((_, addr)) = newest else {
            tracing::debug!(volume, chunk, "power-loss resync: no in-sync replica answered yet");
            continue;
        };
        let conn = match connections.get(addr).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(volume, chunk, "power-loss resync: {e}");
                continue;
            }
        };
        match pull_chunk(store, From::Serving(&conn), volume, chunk, chunk_size).await {
            Ok(()) => {
                pulled += 1;
                if let Err(e) = missed.done(me, volume, chunk, seq) {
                    tracing::error!("missed-writes log: {e}");
                }
            }
            Err(e) => {
                tracing::warn!(volume, chunk, "power-loss resync: {e}");
                connections.forget(&conn).await;
            }
        }
    }
    if pulled > 0 {
        tracing::info!(pulled, remaining = missed.pending(me), "power-loss resync: copied chunks back");
    }
}

/// When no holder of a chunk is in sync (every one is catching up: the whole pool lost power, say),
/// its holders' own copies decide. Every holder must answer (one that is down is waited for), so
/// that all decide from the same copies; a copy another holder recorded as having missed a write to
/// the chunk cannot win, nor one that cannot be read. A holder sure of its copy (it did not lose
/// power — no record of itself — or already revived the chunk) decides first; among the unsure,
/// the highest version that reads back whole (every block's checksum holds) wins; ties go to the
/// lowest node id. A copy taken keeps its version and its taker is sure of it, so later deciders
/// pick it again. A flushed write is on a majority of the holders (a flush is acknowledged so),
/// and its chunk's header is synced with it, so it is in what wins; a write never flushed may be
/// lost — what a power cut of every node may do. Returns the node whose copy this node now has.
async fn revive_chunk(node: Local<'_>, (volume, chunk, size): (u64, u64, u32)) -> Result<u64, String> {
    let Local { store, missed, meta, connections, me } = node;
    let ids = checked(volume, chunk, size)?;
    let (volume_id, chunk_index, chunk_size) = ids;
    let boot = meta.boot_id();
    let holders = meta
        .read(|s| {
            // Only from a map that knows this process: "nobody is in sync" must be current.
            s.nodes.get(&me).filter(|n| n.boot_id == boot)?;
            let v = s.volumes.values().find(|v| v.id == volume)?;
            let holders: Vec<(u64, bool, bool, String)> = s
                .holders(v.replicas, pg_of(volume_id, chunk_index, s.pg_count).0)
                .into_iter()
                .filter_map(|n| s.nodes.get(&n))
                .map(|n| (n.id, n.up, n.in_sync(), n.addr.rpc.clone()))
                .collect();
            Some(holders)
        })
        .ok_or("the map does not know this process or the volume yet")?;
    if holders.iter().any(|(id, _, in_sync, _)| *id != me && *in_sync) {
        return Err("a holder is in sync: its copy is the one to take".into());
    }
    // A node being filled with the PG holds copies the holders gave it; theirs decide, and it
    // pulls the one they revive.
    if !holders.iter().any(|(id, ..)| *id == me) {
        return Err("this node does not hold the chunk's PG yet: it waits for a holder's revived copy".into());
    }
    // Every holder says which version it has and whom it recorded as missing it: all of them, so
    // that every holder decides from the same copies (one that is down is waited for).
    if let Some((id, ..)) = holders.iter().find(|(id, up, _, _)| *id != me && !*up) {
        return Err(format!("holder {id} is down: every holder's copy must be seen"));
    }
    let others: Vec<(u64, SocketAddr)> = holders
        .iter()
        .filter(|(id, ..)| *id != me)
        .filter_map(|(id, _, _, rpc)| Some((*id, rpc.parse().ok()?)))
        .collect();
    let ask = Request::ChunkVersion { volume: volume_id, chunk: chunk_index };
    let replies = futures::future::join_all(others.iter().map(|(_, addr)| async {
        match connections.call_within(*addr, &ask, COMPARE_TIMEOUT).await {
            Ok(Response::ChunkVersion(info)) => {
                Some(Some(info.unwrap_or_else(cairn_proto::ChunkInfo::absent)))
            }
            // It answered, but its copy cannot be read (damaged): it cannot win.
            Ok(Response::Error(
                RpcError::Damaged { .. } | RpcError::Corrupt { .. } | RpcError::Io { .. },
            )) => Some(None),
            _ => None,
        }
    }))
    .await;
    let s = store.clone();
    let mine = tokio::task::spawn_blocking(move || s.chunk_version(volume_id, chunk_index))
        .await
        .map_err(|e| e.to_string())?
        .ok();
    let own_records = missed.missed_by(volume, chunk);
    // (version, node, whether the node still records itself as unsure of its copy)
    let mut copies: Vec<(cairn_types::Version, u64, bool)> = Vec::new();
    if let Some(v) = mine {
        copies.push((v, me, own_records.contains(&me)));
    }
    // A holder *another* recorded as having missed a write to the chunk cannot win.
    let mut excluded: std::collections::BTreeSet<u64> =
        own_records.iter().copied().filter(|p| *p != me).collect();
    for ((id, _), reply) in others.iter().zip(replies) {
        let Some(answer) = reply else {
            return Err(format!("holder {id} is up but did not answer"));
        };
        if let Some(info) = answer {
            excluded.extend(info.missed_by.iter().copied().filter(|p| p != id));
            copies.push((info.chunk_version(), *id, info.missed_by.contains(id)));
        }
    }
    copies.retain(|(v, id, _)| !excluded.contains(id) && !v.is_installing());
    // A holder that is sure of its copy (it did not lose power, or already revived this chunk
    // with every holder's copy seen) decides; among the unsure ones, the newest. Ties: lowest id.
    copies.sort_by_key(|(v, id, unsure)| (*unsure, std::cmp::Reverse(*v), *id));
    let addrs: std::collections::BTreeMap<u64, SocketAddr> = others.into_iter().collect();
    for (_, id, _) in copies {
        if id == me {
            // Ours, if it reads back whole.
            let s = store.clone();
            let whole = tokio::task::spawn_blocking(move || {
                s.read(volume_id, chunk_index, chunk_size, 0, chunk_size.bytes())
            })
            .await
            .is_ok_and(|r| r.is_ok());
            if whole {
                return Ok(me);
            }
            continue;
        }
        let Some(addr) = addrs.get(&id) else { continue };
        let conn = connections.get(*addr).await.map_err(|e| format!("holder {id}: {e}"))?;
        // Taken only if it reads back whole (a torn block fails its checksum), checked before
        // this node's own copy is replaced. Only the holder's answer that its copy cannot be
        // read passes over it; a failure to get an answer (or to install the copy here) is tried
        // again next round — falling back to an older copy then would make it the one everybody
        // takes, flushed writes lost.
        if !reads_whole(&conn, ids).await.map_err(|e| format!("holder {id}: {e}"))? {
            continue;
        }
        pull_chunk(store, From::Any(&conn), volume, chunk, size)
            .await
            .map_err(|e| format!("holder {id}: {e}"))?;
        return Ok(id);
    }
    Err("no holder's copy reads back whole".into())
}

/// Whether a holder's copy of a chunk reads back whole (`ReadCopy`, piece by piece, every block's
/// checksum checked by the holder): `Ok(false)` if the holder answered that it cannot be read,
/// `Err` if no answer came.
async fn reads_whole(
    conn: &NodeConnection,
    (volume, chunk, chunk_size): (VolumeId, ChunkIndex, ChunkSize),
) -> Result<bool, String> {
    let piece = RPC_IO_MAX_BYTES.min(chunk_size.bytes());
    for offset in (0..chunk_size.bytes()).step_by(piece as usize) {
        let request = Request::ReadCopy { volume, chunk, chunk_size, offset, len: piece };
        match tokio::time::timeout(COPY_TIMEOUT, conn.call(&request)).await {
            // The holder says its copy cannot be read (damaged, a block fails its checksum, or its
            // disk failed the read).
            Ok(Ok(Response::Error(
                RpcError::Damaged { .. } | RpcError::Corrupt { .. } | RpcError::Io { .. },
            ))) => {
                return Ok(false);
            }
            Ok(Ok(Response::Error(e))) => return Err(e.to_string()),
            Ok(Ok(reply)) => {
                piece_from(reply)?;
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        }
    }
    Ok(true)
}

/// A missed-writes log entry's ids, checked.
fn checked(volume: u64, chunk: u64, size: u32) -> Result<(VolumeId, ChunkIndex, ChunkSize), String> {
    let volume = VolumeId::new(volume).map_err(|e| e.to_string())?;
    Ok((volume, ChunkIndex(chunk), ChunkSize::new(size).map_err(|e| e.to_string())?))
}

/// Replaces this node's copy of a chunk with a peer's, whole (present blocks, holes as holes).
async fn pull_chunk(
    store: &Arc<Store>,
    conn: From<'_>,
    volume: u64,
    chunk: u64,
    size: u32,
) -> Result<(), String> {
    let ids = checked(volume, chunk, size)?;
    // The first piece goes over the copy here as it is now (a damaged one counts as none): a peer
    // that installs a newer copy meanwhile (catching this node up) is not undone by this one.
    let s = store.clone();
    let here = tokio::task::spawn_blocking(move || s.chunk_version(ids.0, ids.1))
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or(cairn_types::Version::NONE);
    // Whether the source's copy is dirty (it may hold a write never confirmed): so is the copy
    // taken (or if it was written since it was asked: a write marks it dirty first).
    let (asked, _, source_dirty) = target_version(
        match conn {
            From::Serving(c) | From::Any(c) => c,
        },
        ids,
    )
    .await?;
    copy_from(conn, ids, Some(here), |offset, copy: Piece, expect| {
        let s = store.clone();
        let dirty = source_dirty || copy.version != asked;
        async move {
            let (kept, kept_crcs) = copy.present_only();
            tokio::task::spawn_blocking(move || {
                // Its own fence: a local copy never raises or fails it.
                let generation = s.highest_generation(ids.0)?;
                let (volume, chunk, chunk_size) = ids;
                let present = &copy.present;
                s.install_range(
                    volume,
                    chunk,
                    chunk_size,
                    offset,
                    present,
                    &kept,
                    &kept_crcs,
                    generation,
                    copy.version,
                    expect,
                    dirty,
                )
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
        }
    })
    .await
    .map(|_| ())
}

/// Copies a chunk to `peer` (through `to`) from another in-sync replica of it (neither `me` nor
/// `peer`), for a chunk whose copy here cannot be read or is passed over. Returns the replica
/// copied and the version the peer holds now (the relayed copy's, or its own if that was at least
/// as new: one writer's versions grow along one chain, so an older copy never goes over a newer
/// one).
#[allow(clippy::too_many_arguments)]
async fn relay_from_replica(
    store: &Arc<Store>,
    missed: &MissedLog,
    meta: &MetaService<RpcPeerTransport>,
    connections: &ConnectionPool,
    to: &NodeConnection,
    (me, peer): (u64, u64),
    volume: u64,
    chunk: u64,
    size: u32,
    (shared, settled): (bool, u64),
) -> Result<(u64, cairn_types::Version), String> {
    let ids = checked(volume, chunk, size)?;
    let sources = copy_sources(meta, missed, (me, peer), ids.0, ids.1).unwrap_or_default();
    let s = store.clone();
    let generation = tokio::task::spawn_blocking(move || s.highest_generation(ids.0))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    // At least the volume's writer generation in the map (this node may have missed its fence).
    let in_map = meta.read(|s| s.volumes.values().find(|v| v.id == ids.0.get()).map(|v| v.generation));
    let generation = generation.max(cairn_types::Generation(in_map.unwrap_or(0)));
    let mut last = String::from("no other in-sync replica");
    for (node, rpc) in sources {
        let Ok(addr) = rpc.parse::<SocketAddr>() else { continue };
        let from = match connections.get(addr).await {
            Ok(c) => c,
            Err(e) => {
                last = format!("node {node}: {e}");
                continue;
            }
        };
        match relay_chunk(&from, to, ids, generation, (node, shared, settled)).await {
            Ok(held) => return Ok((node, held)),
            Err(e) => last = format!("node {node}: {e}"),
        }
    }
    Err(last)
}

/// Copies a chunk whole from node `origin` (connection `from`) to node `to` (for a peer this node
/// could not copy its own copy to), as writer `generation` (this node's fence for the volume).
async fn relay_chunk(
    from: &NodeConnection,
    to: &NodeConnection,
    ids: (VolumeId, ChunkIndex, ChunkSize),
    generation: cairn_types::Generation,
    (origin, shared, settled): (u64, bool, u64),
) -> Result<cairn_types::Version, String> {
    let (first, ..) = target_version(to, ids).await?;
    // A peer already at the source's version or a newer one keeps its copy (one writer): an older
    // copy would go over writes another replica already gave it. (On a shared volume two writers
    // make sibling versions, and the relayed in-sync copy replaces a higher one; and a copy of a
    // generation an open settled the chunk past is replaced too: `peer_keeps`.)
    let (source, _, source_dirty) = target_version(from, ids).await?;
    if peer_keeps(first, source, shared, settled) {
        return Ok(first);
    }
    copy_from(From::Serving(from), ids, Some(first), |offset, copy: Piece, expect| async move {
        // Dirty there, or written since it was asked (a write marks it dirty first): installed
        // dirty (`InstallRange::dirty`).
        let dirty = source_dirty || copy.version != source;
        let (data, crcs) = copy.present_only();
        let (volume, chunk, chunk_size) = ids;
        let request = Request::InstallRange {
            volume,
            chunk,
            chunk_size,
            offset,
            present: copy.present,
            crcs,
            data,
            generation,
            version: copy.version,
            expect,
            // The origin named: a peer that recorded it as having missed the chunk refuses it.
            source: Some(origin),
            settled: (settled > 0).then_some(cairn_types::Generation(settled)),
            dirty,
        };
        match tokio::time::timeout(COPY_TIMEOUT, to.call(&request)).await {
            Ok(Ok(Response::Done)) => Ok(()),
            Ok(Ok(other)) => Err(format!("installing on the peer: {other:?}")),
            Ok(Err(e)) => Err(format!("installing on the peer: {e}")),
            Err(_) => Err("installing on the peer: timed out".into()),
        }
    })
    .await
}

/// The version of a chunk on a peer, for a copy's first piece to expect: a piece that arrives
/// late (after a copy given up on, retried and finished) then changes nothing. A copy the peer
/// cannot read (damaged) counts as none: the store lets an install expecting none replace a
/// quarantined copy, and refuses it over any other. `Err` if the peer did not answer: a copy is
/// never installed without a condition (a late one could roll back a newer copy).
/// The state of a chunk on a peer: its version, the nodes it recorded as having missed the chunk,
/// and whether its copy is dirty.
async fn target_version(
    to: &NodeConnection,
    (volume, chunk, _): (VolumeId, ChunkIndex, ChunkSize),
) -> Result<(cairn_types::Version, Vec<u64>, bool), String> {
    match tokio::time::timeout(COPY_TIMEOUT, to.call(&Request::ChunkVersion { volume, chunk })).await {
        Ok(Ok(Response::ChunkVersion(info))) => Ok(info
            .map(|i| (i.chunk_version(), i.missed_by.clone(), i.dirty))
            .unwrap_or((cairn_types::Version::NONE, Vec::new(), false))),
        // Damaged there, or a block fails its checksum: no copy to keep.
        Ok(Ok(Response::Error(RpcError::Damaged { .. } | RpcError::Corrupt { .. }))) => {
            Ok((cairn_types::Version::NONE, Vec::new(), false))
        }
        Ok(Ok(other)) => Err(format!("asking the peer for its version: unexpected reply {other:?}")),
        Ok(Err(e)) => Err(format!("asking the peer for its version: {e}")),
        Err(_) => Err("asking the peer for its version: timed out".into()),
    }
}

/// A node a copy is read from: one that serves client IO (in sync by its own current map: it
/// refuses otherwise), or any (reviving a chunk none of whose holders is in sync).
#[derive(Clone, Copy)]
enum From<'a> {
    Serving(&'a NodeConnection),
    Any(&'a NodeConnection),
}

/// Reads a chunk whole from node `from`, piece by piece, and hands each piece to `install` with
/// the version the target must be at for it: `first` for the first piece, the copy's "being
/// installed" marker for the next ones (they go over the pieces before them). Every piece must
/// come from one version of the source, which is returned.
async fn copy_from<I, F>(
    from: From<'_>,
    ids: (VolumeId, ChunkIndex, ChunkSize),
    first: Option<cairn_types::Version>,
    install: I,
) -> Result<cairn_types::Version, String>
where
    I: Fn(u32, Piece, Option<cairn_types::Version>) -> F,
    F: std::future::Future<Output = Result<(), String>>,
{
    let (volume, chunk, chunk_size) = ids;
    let piece = RPC_IO_MAX_BYTES.min(chunk_size.bytes());
    let mut first_version = None;
    for offset in (0..chunk_size.bytes()).step_by(piece as usize) {
        let conn = match from {
            From::Serving(c) | From::Any(c) => c,
        };
        let call = |request: Request| async move {
            match tokio::time::timeout(COPY_TIMEOUT, conn.call(&request)).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_string()),
            }
        };
        let copy = match from {
            From::Serving(_) => read_piece(call, volume, chunk, chunk_size, offset, piece).await?,
            // Answered also by a node that does not serve (see `From`).
            From::Any(_) => {
                piece_from(call(Request::ReadCopy { volume, chunk, chunk_size, offset, len: piece }).await?)?
            }
        };
        let version = copy.version;
        let expect = match first_version {
            None => first,
            Some(v) if v == version => Some(cairn_types::Version::installing(v)),
            Some(v) => return Err(format!("the source moved from {v} to {version} during the copy")),
        };
        first_version = Some(version);
        install(offset, copy, expect).await?;
    }
    Ok(first_version.unwrap_or(cairn_types::Version::NONE))
}

/// Why a copy to a peer failed: this node's copy (skip the chunk), the peer (back off), or
/// another replica's copy reached the peer first (try again next round).
#[derive(Debug)]
enum CopyFailure {
    Source(String),
    Target(String),
    Raced,
    /// The peer recorded this node as having missed the chunk: its copy comes from elsewhere.
    Refused,
}

/// How long a peer may take to say which version of a chunk it holds, for a comparison.
const COMPARE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a record kept after a relayed copy older than this node's own waits before it is
/// tried again (this node copies its own once it is in sync; meanwhile the peer's other records go
/// on).
const KEPT_RETRY: Duration = Duration::from_secs(3);

/// Whether this node missed the volume's current writer generation `map_generation` (its own
/// fence is older) and holds `chunk` dirty at an older generation: a write of the fenced writer
/// it may hold alone, which it must not spread before its catch-up compares it.
async fn unfenced_stray(store: &Arc<Store>, volume: u64, chunk: u64, map_generation: u64) -> bool {
    let Ok(v) = VolumeId::new(volume) else { return false };
    let s = store.clone();
    tokio::task::spawn_blocking(move || {
        let fence = s.highest_generation(v).ok()?.0;
        let state = s.chunk_state(v, ChunkIndex(chunk)).ok()??;
        Some(fence < map_generation && state.dirty && state.version().generation < map_generation)
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Whether a peer at version `target` keeps its copy rather than take one at `source`: it holds
/// this very copy already; or a newer one, on a volume with one writer per generation, further
/// along the chunk's one chain of versions (an older copy never goes over it) — unless the record
/// being copied was settled by an open of a newer generation than that copy's (`settled`, see
/// `MissedLog::record_settled`): then it is a fenced writer's leftover, never acknowledged, that
/// the open settled the chunk without. On a shared volume two writers make sibling versions, and
/// a higher one there may be a write never acknowledged that the copy (holding the acknowledged
/// one) must replace. (Never over a half-installed copy: its marker says nothing of what it holds.)
fn peer_keeps(
    target: cairn_types::Version,
    source: cairn_types::Version,
    shared: bool,
    settled: u64,
) -> bool {
    target == source
        || (target > source && !target.is_installing() && !shared && target.generation >= settled)
}

/// The longest a record is kept after a relayed copy that differs from this node's own (shared
/// volumes): longer than a write can stay in flight (a client's `io_timeout`, 30 s, plus the
/// hold-back allowance).
const KEPT_MAX: Duration = Duration::from_secs(60);

/// How long a chunk whose copy here cannot be read is left out of catch-up copies.
const UNREADABLE_SKIP: Duration = Duration::from_secs(30);

async fn copy_chunk(
    store: &Arc<Store>,
    (conn, peer): (&NodeConnection, u64),
    (volume, chunk, size): (u64, u64, u32),
    (me, shared, map_generation): (u64, bool, u64),
    settled: u64,
) -> Result<(), CopyFailure> {
    let (volume, chunk, chunk_size) = checked(volume, chunk, size).map_err(CopyFailure::Source)?;
    // The peer's version first: a peer that holds this copy already (another replica's copy got
    // there first, or the writer re-sent the write to it) costs one question, not a read of the
    // whole chunk; and the copy read after it is at least as new as what the peer had then.
    let (target, recorded, _) =
        target_version(conn, (volume, chunk, chunk_size)).await.map_err(CopyFailure::Target)?;
    let s = store.clone();
    let here = tokio::task::spawn_blocking(move || s.chunk_version(volume, chunk))
        .await
        .map_err(|e| CopyFailure::Source(e.to_string()))?
        .map_err(|e| CopyFailure::Source(e.to_string()))?;
    // The peer holds this very copy already, or one it keeps (`peer_keeps`): done.
    let holds = |mine: cairn_types::Version| peer_keeps(target, mine, shared, settled);
    if holds(here) {
        return Ok(());
    }
    // The peer recorded this node as having missed the chunk: it refuses this copy (see
    // `InstallRange::source`) — unless it takes it (`RecordedSource::taken`, as far as this node
    // can tell: the record being copied is settled, or the peer is unsure of its own copy and
    // this one is newer, of the current writer generation). Not read only to be refused: tried
    // again after a pause.
    let named = recorded.contains(&me);
    if named {
        let s = store.clone();
        let fence = tokio::task::spawn_blocking(move || s.highest_generation(volume))
            .await
            .map_err(|e| CopyFailure::Source(e.to_string()))?
            .map_err(|e| CopyFailure::Source(e.to_string()))?;
        let offered = cairn_types::RecordedSource {
            // (Whether the peer's record is settled is the peer's to check.)
            recorded: 0,
            settled,
            current: target,
            copy: here,
            unsure: recorded.contains(&peer),
            one_chain: !shared,
            current_generation: fence.0.max(map_generation),
        };
        if !offered.taken() {
            return Err(CopyFailure::Refused);
        }
    }
    let s = store.clone();
    let (reply, generation, dirty) = tokio::task::spawn_blocking(move || {
        // Data, allocation and version as of one moment (read under the chunk's lock).
        let reply = s.read(volume, chunk, chunk_size, 0, chunk_size.bytes())?;
        // Dirty here (changed lately: it may hold a write never confirmed), or written since
        // the read (a write marks the chunk dirty first): the copy is installed dirty.
        let dirty = s.chunk_state(volume, chunk)?.is_none_or(|st| st.dirty || st.version() != reply.version);
        // The generation this node accepted, or the volume's in its map if newer (a holder that
        // missed the writer's fence): a target fenced by a newer writer refuses the copy, and one
        // already raised to the map's by another replica's copy takes it.
        let generation = s.highest_generation(volume)?.max(cairn_types::Generation(map_generation));
        Ok::<_, cairn_store::StoreError>((reply, generation, dirty))
    })
    .await
    .map_err(|e| CopyFailure::Source(e.to_string()))?
    .map_err(|e| CopyFailure::Source(e.to_string()))?;
    if holds(reply.version) {
        return Ok(());
    }
    let first_expect = Some(target);
    let range_blocks = (RPC_IO_MAX_BYTES / BLOCK_SIZE_BYTES) as usize;
    let bs = BLOCK_SIZE_BYTES as usize;
    for (i, flags) in reply.present.chunks(range_blocks).enumerate() {
        let first = i * range_blocks;
        let mut data = Vec::new();
        let mut crcs = Vec::new();
        for (j, p) in flags.iter().enumerate() {
            if *p {
                let b = first + j;
                data.extend_from_slice(&reply.data[b * bs..(b + 1) * bs]);
                crcs.push(reply.crcs[b]);
            }
        }
        let request = Request::InstallRange {
            volume,
            chunk,
            chunk_size,
            offset: (first * bs) as u32,
            present: flags.to_vec(),
            crcs,
            data: Bytes::from(data),
            generation,
            version: reply.version,
            // The first piece goes over the copy the peer had when this copy began, the next
            // ones over the pieces before them.
            expect: if i == 0 { first_expect } else { Some(cairn_types::Version::installing(reply.version)) },
            // Refused if the peer recorded this node as having missed the chunk: this copy would
            // undo the write recorded (on a shared volume it may replace a higher sibling), or
            // bring back a fenced writer's leftover an open settled without this node (found by
            // the production simulation, seed 8506 of the model of c922349).
            source: Some(me),
            settled: (settled > 0).then_some(cairn_types::Generation(settled)),
            dirty,
        };
        let failed = match tokio::time::timeout(COPY_TIMEOUT, conn.call(&request)).await {
            Ok(Ok(Response::Done)) => continue,
            // (Sent although the peer recorded this node — it looked unsure of its own copy —
            // and refused: its record may be settled, or it is sure again. As refused: tried again
            // after the pause, not every round. Found by review.)
            Ok(Ok(Response::Error(cairn_proto::RpcError::VersionMismatch { .. }))) if named => {
                return Err(CopyFailure::Refused);
            }
            Ok(Ok(Response::Error(cairn_proto::RpcError::VersionMismatch { .. }))) => {
                return Err(CopyFailure::Raced);
            }
            Ok(Ok(Response::Error(e))) => e.to_string(),
            Ok(Ok(other)) => format!("unexpected reply {other:?}"),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".into(),
        };
        return Err(CopyFailure::Target(failed));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::peer_keeps;
    use cairn_types::Version;

    fn v(generation: u64, seq: u64) -> Version {
        Version { generation, seq }
    }

    #[test]
    fn a_peer_keeps_a_newer_copy_unless_an_open_settled_the_chunk_past_it() {
        // One writer: a higher copy of the same chain stays.
        assert!(peer_keeps(v(1, 9), v(1, 5), false, 0));
        assert!(peer_keeps(v(1, 5), v(1, 5), false, 0));
        assert!(!peer_keeps(v(1, 4), v(1, 5), false, 0));
        // An open of generation 2 settled the chunk without the peer: its higher copy of
        // generation 1 is a fenced writer's leftover and is replaced; one of generation 2 stays.
        assert!(!peer_keeps(v(1, 9), v(1, 5), false, 2));
        assert!(peer_keeps(v(2, 3), v(1, 5), false, 2));
        // Shared volumes: a higher sibling is replaced; a half-installed copy always is.
        assert!(!peer_keeps(v(1, 9), v(1, 5), true, 0));
        assert!(!peer_keeps(Version::installing(v(1, 9)), v(1, 5), false, 0));
    }
}
