//! Scrub: a node's background check of every block it stores against the block's stored CRC-32C,
//! and the repair of each damaged block from an in-sync replica's copy.
//!
//! Client reads find a damaged block only when a client reads it; a block no client reads (a cold
//! part of a disk image) would rot unseen until the last good replica fails too. So every node
//! reads all of its chunks on a schedule (`[scrub] interval_s`, weekly by default, the first run at
//! a random point of the first interval so that nodes do not all scrub at once; the schedule
//! survives restarts through `scrub.json` in the data directory) and on demand (`POST /v1/scrub`,
//! `cairn scrub`), at most `[scrub] bytes_per_s` so that it yields to client IO.
//!
//! A damaged block (stored data failing its checksum, or a damaged table entry) is read from the
//! chunk's in-sync holders (a client read: only a replica that serves reads of the chunk answers)
//! and rewritten here only if this copy is at the version the good copy was read at
//! (`Store::repair_at`): one version names one content, so the good block is what the damaged one
//! held. A copy that moved meanwhile (a write in flight) is read again, a few times; a block still
//! not repaired is counted and listed, and the next run tries again. Header damage is not the
//! scrub's: the store quarantines such a file when it opens it, and the catch-up restores it.
//!
//! It also compares each chunk's in-sync copies (version and block checksums), one holder per
//! chunk — the chunks that holder stores: one it lacks is compared by nobody — and reports copies
//! of one version that differ; it does not repair those (see `compare_chunk`).

use crate::transport::RpcPeerTransport;
use cairn_client::piece::read_piece;
use cairn_client::{ConnectionPool, NodeConnection};
use cairn_meta::MetaService;
use cairn_proto::{Request, Response};
use cairn_store::{Store, StoreError};
use cairn_types::checksum::crc32c;
use cairn_types::placement::pg_of;
use cairn_types::{BLOCK_SIZE_BYTES, ChunkIndex, ChunkSize, Version, VolumeId};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// Bytes checked per store call (the chunk's lock is held for one such read).
const PIECE_BYTES: u32 = 256 * 1024;
/// Reads of a good copy per damaged block, if copies keep moving (writes in flight).
const REPAIR_ATTEMPTS: usize = 3;
/// Longest a read of a good copy may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Unrepaired blocks listed in the status, at most (the count goes on).
const UNREPAIRED_LISTED_MAX: usize = 100;
/// The file that keeps the schedule across restarts.
const SCHEDULE_FILE: &str = "scrub.json";
/// On-demand runs waiting at most (more are refused: the caller asks again later).
pub const PENDING_MAX: usize = 64;
/// Finished runs whose figures the status keeps (by ticket).
const RUNS_KEPT: usize = 16;
/// A scheduled run that could not list the volumes is tried again after this.
const RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The `[scrub]` settings.
#[derive(Debug, Clone, Copy)]
pub struct ScrubSettings {
    /// Time between scheduled runs (`None`: on demand only).
    pub interval: Option<Duration>,
    /// Most bytes read per second (`None`: unthrottled).
    pub bytes_per_s: Option<u64>,
}

/// One run's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    /// The request it serves (`POST /v1/scrub`'s ticket; 0: a scheduled run).
    pub ticket: u64,
    /// The volume scrubbed (none: every volume).
    pub volume: Option<u64>,
    pub started_ms: u64,
    pub completed_ms: Option<u64>,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub blocks_damaged: u64,
    pub blocks_repaired: u64,
    pub blocks_unrepaired: u64,
    /// Damaged blocks a write rewrote (or whose chunk went) before the repair: whole again.
    pub blocks_rewritten: u64,
    /// Chunks skipped (being installed, or quarantined: the catch-up restores them).
    pub chunks_skipped: u64,
    /// Chunks that could not be read (an I/O error): the disk's problem, the run's failure.
    pub chunks_unreadable: u64,
    /// Chunks whose copies this node compared with the other in-sync holders' (it compares the
    /// chunks of the PGs where it is the first in-sync holder).
    pub chunks_compared: u64,
    /// Chunks it could not compare (a holder did not serve the read, or its copy moved while
    /// it was read).
    pub chunks_not_compared: u64,
    /// Chunks whose in-sync copies stayed at different versions through a few looks (a write in
    /// flight, a writer that died before an open settled the chunk, a holder behind its serving
    /// barrier): normal for a while, not a fault.
    pub chunks_unsettled: u64,
    /// Chunks with two copies of one version that differ (a fault), and the first of them (at
    /// most `UNREPAIRED_LISTED_MAX` listed).
    pub chunks_differing_count: u64,
    pub chunks_differing: Vec<Differing>,
    /// Why the run failed (it could not list the volumes), if it did.
    pub error: Option<String>,
    /// Blocks still damaged, with why (at most `UNREPAIRED_LISTED_MAX`).
    pub unrepaired: Vec<Unrepaired>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Differing {
    pub volume: u64,
    pub chunk: u64,
    /// Each in-sync holder's version of the chunk (generation.sequence).
    pub versions: std::collections::BTreeMap<u64, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unrepaired {
    pub volume: u64,
    pub chunk: u64,
    pub block: u32,
    pub why: String,
}

/// What `GET /v1/scrub` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScrubStatus {
    /// This process's scrub (random): tickets count from 1 again after a restart, so a ticket
    /// names a run only together with it.
    pub instance: u64,
    pub running: bool,
    /// Runs finished since this process started.
    pub runs_completed: u64,
    /// On-demand runs asked for since this process started (the last ticket given).
    pub runs_requested: u64,
    /// Tickets up to this one have been served (runs serve requests in order).
    pub served_through: u64,
    /// On-demand runs waiting.
    pub pending: usize,
    /// When the next scheduled run starts (ms since the epoch; none: on demand only).
    pub next_due_ms: Option<u64>,
    /// Totals since this process started.
    pub blocks_damaged_total: u64,
    pub blocks_repaired_total: u64,
    /// The run in progress, or the last one.
    pub run: Option<RunSummary>,
    /// The last finished runs (at most 16), oldest first.
    pub runs: Vec<RunSummary>,
    pub bytes_per_s_max: Option<u64>,
}

/// The scrub's shared state: the HTTP API asks for runs and reads the status.
#[derive(Debug)]
pub struct Scrub {
    wake: tokio::sync::Notify,
    /// On-demand runs waiting, in order: (ticket, volume or none for all).
    pending: Mutex<std::collections::VecDeque<(u64, Option<u64>)>>,
    status: Mutex<ScrubStatus>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Default for Scrub {
    fn default() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let instance = std::collections::hash_map::RandomState::new().build_hasher().finish();
        Scrub {
            wake: tokio::sync::Notify::new(),
            pending: Mutex::default(),
            status: Mutex::new(ScrubStatus { instance, ..ScrubStatus::default() }),
        }
    }
}

impl Scrub {
    /// Asks for a run (of one volume, or all); returns this process's instance and the run's
    /// ticket: the run is done once
    /// `served_through` reaches it, and its figures are in `runs` under that ticket. `None` if
    /// [`PENDING_MAX`] runs are waiting already.
    pub fn request(&self, volume: Option<u64>) -> Option<(u64, u64)> {
        let ticket = {
            let mut p = lock(&self.pending);
            if p.len() >= PENDING_MAX {
                return None;
            }
            let mut s = lock(&self.status);
            s.runs_requested += 1;
            s.pending = p.len() + 1;
            p.push_back((s.runs_requested, volume));
            (s.instance, s.runs_requested)
        };
        self.wake.notify_one();
        Some(ticket)
    }

    fn next_request(&self) -> Option<(u64, Option<u64>)> {
        let mut p = lock(&self.pending);
        let next = p.pop_front();
        lock(&self.status).pending = p.len();
        next
    }

    pub fn status(&self) -> ScrubStatus {
        lock(&self.status).clone()
    }

    fn update(&self, f: impl FnOnce(&mut ScrubStatus)) {
        f(&mut lock(&self.status));
    }

    fn update_run(&self, f: impl FnOnce(&mut RunSummary)) {
        if let Some(run) = lock(&self.status).run.as_mut() {
            f(run);
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Schedule {
    last_completed_ms: u64,
}

fn read_schedule(data_dir: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(data_dir.join(SCHEDULE_FILE)).ok()?;
    serde_json::from_str::<Schedule>(&text).ok().map(|s| s.last_completed_ms)
}

fn write_schedule(data_dir: &std::path::Path, last_completed_ms: u64) {
    let body = serde_json::to_vec(&Schedule { last_completed_ms }).unwrap_or_default();
    if let Err(e) = crate::recovery::write_durably(data_dir, SCHEDULE_FILE, &body) {
        tracing::warn!("scrub: recording the schedule in {}: {e}", data_dir.display());
    }
}

/// A random fraction of `d` (the first run's offset), from the process's hash seed.
fn random_part(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_nanos()));
    d.mul_f64((h.finish() % 10_000) as f64 / 10_000.0)
}

/// When the next scheduled run is due (ms since the epoch).
fn next_due(settings: ScrubSettings, last_completed_ms: Option<u64>) -> Option<u64> {
    let interval = settings.interval?;
    Some(match last_completed_ms {
        Some(last) => last.saturating_add(interval.as_millis() as u64),
        // Never scrubbed: somewhere in the first interval, so nodes started together spread out.
        None => now_ms().saturating_add(random_part(interval).as_millis() as u64),
    })
}

/// Runs the scrub until `stop`: on schedule and on demand.
pub async fn run(
    scrub: Arc<Scrub>,
    store: Arc<Store>,
    meta: Arc<MetaService<RpcPeerTransport>>,
    me: u64,
    data_dir: std::path::PathBuf,
    settings: ScrubSettings,
    stop: CancellationToken,
) {
    let connections = ConnectionPool::default();
    let mut due = next_due(settings, read_schedule(&data_dir));
    scrub.update(|s| {
        s.next_due_ms = due;
        s.bytes_per_s_max = settings.bytes_per_s;
    });
    // Not before the map knows this node and its volumes (a node starting before it has joined,
    // or replayed its metadata, would skip every volume as unknown).
    while meta.read(|s| !s.nodes.contains_key(&me)) {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    loop {
        // On-demand runs first, in order (every one waiting, not one per wake-up), else the
        // scheduled one (every volume) once due.
        let (ticket, volume) = match scrub.next_request() {
            Some(r) => r,
            None if due.is_some_and(|d| d <= now_ms()) => (0, None),
            None => {
                let wait = due.map(|d| Duration::from_millis(d.saturating_sub(now_ms())));
                let scheduled = async {
                    match wait {
                        Some(w) => tokio::time::sleep(w).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = scrub.wake.notified() => {}
                    _ = scheduled => {}
                }
                continue;
            }
        };
        let started_ms = now_ms();
        scrub.update(|s| {
            s.running = true;
            s.run = Some(RunSummary { ticket, volume, started_ms, ..RunSummary::default() });
        });
        tracing::info!(volume, ticket, "scrub started");
        let ctx = Ctx { scrub: &scrub, store: &store, meta: &meta, connections: &connections, me, settings };
        let Some(listed) = scrub_all(ctx, volume, &stop).await else { return };
        let completed_ms = now_ms();
        let run = {
            let mut s = lock(&scrub.status);
            s.running = false;
            s.runs_completed += 1;
            s.served_through = s.served_through.max(ticket);
            let mut run = s.run.clone().unwrap_or_default();
            run.completed_ms = Some(completed_ms);
            if let Err(e) = &listed {
                run.error = Some(e.clone());
            }
            s.run = Some(run.clone());
            s.runs.push(run.clone());
            if s.runs.len() > RUNS_KEPT {
                s.runs.remove(0);
            }
            run
        };
        tracing::info!(
            volume,
            ticket,
            chunks = run.chunks_checked,
            bytes = run.bytes_checked,
            damaged = run.blocks_damaged,
            repaired = run.blocks_repaired,
            unrepaired = run.blocks_unrepaired,
            unreadable = run.chunks_unreadable,
            compared = run.chunks_compared,
            unsettled = run.chunks_unsettled,
            not_compared = run.chunks_not_compared,
            differing = run.chunks_differing_count,
            error = run.error.as_deref().unwrap_or(""),
            "scrub finished"
        );
        // A whole scheduled or requested run that listed the volumes moves the schedule on; one
        // that could not is tried again in an hour.
        if volume.is_none() {
            due = match listed {
                Ok(()) => {
                    write_schedule(&data_dir, completed_ms);
                    next_due(settings, Some(completed_ms))
                }
                // (A scheduled run: an hour from now; a requested one keeps the schedule.)
                Err(_) if ticket == 0 => Some(completed_ms.saturating_add(RETRY_AFTER.as_millis() as u64)),
                Err(_) => due,
            };
            scrub.update(|s| s.next_due_ms = due);
        }
    }
}

#[derive(Clone, Copy)]
struct Ctx<'a> {
    scrub: &'a Scrub,
    store: &'a Arc<Store>,
    meta: &'a MetaService<RpcPeerTransport>,
    connections: &'a ConnectionPool,
    me: u64,
    settings: ScrubSettings,
}

/// Scrubs every chunk of the live volumes this node holds (or of one): `None` if stopped,
/// `Err` if the volumes could not be listed.
async fn scrub_all(ctx: Ctx<'_>, only: Option<u64>, stop: &CancellationToken) -> Option<Result<(), String>> {
    let s = ctx.store.clone();
    let volumes = match tokio::task::spawn_blocking(move || s.list_volumes()).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Some(Err(format!("listing volumes: {e}"))),
        Err(e) => return Some(Err(format!("listing volumes: {e}"))),
    };
    for volume in volumes.into_iter().filter(|v| only.is_none_or(|o| o == v.get())) {
        // A live volume of the map (a deleted one's chunks are being removed).
        let Some(chunk_size) = ctx.meta.read(|s| {
            s.volumes
                .values()
                .find(|v| v.id == volume.get())
                .and_then(|v| ChunkSize::new(v.chunk_size_bytes).ok())
        }) else {
            continue;
        };
        let s = ctx.store.clone();
        let chunks = match tokio::task::spawn_blocking(move || s.list_chunks(volume)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Some(Err(format!("listing the chunks of volume {volume}: {e}"))),
            Err(e) => return Some(Err(format!("listing the chunks of volume {volume}: {e}"))),
        };
        for chunk in chunks {
            if !scrub_chunk(ctx, (volume, chunk, chunk_size), stop).await {
                return None;
            }
        }
    }
    Some(Ok(()))
}

/// Checks one chunk piece by piece, repairing damaged blocks; `false` if stopped.
async fn scrub_chunk(
    ctx: Ctx<'_>,
    (volume, chunk, chunk_size): (VolumeId, ChunkIndex, ChunkSize),
    stop: &CancellationToken,
) -> bool {
    let piece = PIECE_BYTES.min(chunk_size.bytes());
    for offset in (0..chunk_size.bytes()).step_by(piece as usize) {
        if stop.is_cancelled() {
            return false;
        }
        let began = tokio::time::Instant::now();
        let len = piece.min(chunk_size.bytes() - offset);
        let s = ctx.store.clone();
        let found =
            tokio::task::spawn_blocking(move || s.damaged_blocks(volume, chunk, chunk_size, offset, len))
                .await;
        ctx.scrub.update_run(|r| r.bytes_checked += u64::from(len));
        match found {
            Ok(Ok(damaged)) => {
                for block in damaged {
                    ctx.scrub.update_run(|r| r.blocks_damaged += 1);
                    ctx.scrub.update(|s| s.blocks_damaged_total += 1);
                    tracing::warn!(volume = %volume, chunk = chunk.0, block, "scrub: damaged block");
                    let repaired = tokio::select! {
                        _ = stop.cancelled() => return false,
                        r = repair_block(ctx, (volume, chunk, chunk_size), block) => r,
                    };
                    match repaired {
                        Ok(true) => {
                            tracing::warn!(volume = %volume, chunk = chunk.0, block, "scrub: repaired");
                            ctx.scrub.update_run(|r| r.blocks_repaired += 1);
                            ctx.scrub.update(|s| s.blocks_repaired_total += 1);
                        }
                        Ok(false) => ctx.scrub.update_run(|r| r.blocks_rewritten += 1),
                        Err(why) => {
                            tracing::warn!(volume = %volume, chunk = chunk.0, block, "scrub: not repaired: {why}");
                            ctx.scrub.update_run(|r| {
                                r.blocks_unrepaired += 1;
                                if r.unrepaired.len() < UNREPAIRED_LISTED_MAX {
                                    let (volume, chunk) = (volume.get(), chunk.0);
                                    r.unrepaired.push(Unrepaired { volume, chunk, block, why });
                                }
                            });
                        }
                    }
                }
            }
            // Being installed, or quarantined (a damaged header): the catch-up's; the next run
            // checks it.
            Ok(Err(StoreError::Installing { .. } | StoreError::BadChunkFile { .. })) => {
                ctx.scrub.update_run(|r| r.chunks_skipped += 1);
                return true;
            }
            Ok(Err(e)) => {
                tracing::error!(volume = %volume, chunk = chunk.0, "scrub: cannot read the chunk: {e}");
                ctx.scrub.update_run(|r| r.chunks_unreadable += 1);
                return true;
            }
            Err(e) => {
                tracing::error!(volume = %volume, chunk = chunk.0, "scrub: {e}");
                ctx.scrub.update_run(|r| r.chunks_unreadable += 1);
                return true;
            }
        }
        // The rate limit, per piece: no burst beyond one piece.
        if let Some(rate) = ctx.settings.bytes_per_s.filter(|r| *r > 0) {
            let due = began + Duration::from_secs_f64(f64::from(len) / rate as f64);
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep_until(due) => {}
            }
        }
    }
    ctx.scrub.update_run(|r| r.chunks_checked += 1);
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = compare_chunk(ctx, (volume, chunk, chunk_size)) => true,
    }
}

/// What one holder stores of a chunk: its version and each block's checksum (a hole's is the
/// zero block's: a hole and a block of zeros hold the same bytes — a repair of a damaged hole's
/// entry writes zeros as data).
type Copy = (Version, Vec<u32>);

/// Compares this node's copy of a chunk with the other in-sync holders' (version and each block's
/// checksum), if this node is the first in-sync holder of its PG in the map's order (one comparer
/// per chunk). Two copies at one version must hold the same bytes (one version names one
/// content): copies that do not are reported (`chunks_differing`), not repaired — which copy is
/// right is the catch-up's and the next open's to decide, and it is a fault to look into. Copies
/// at different versions are normal for a while (a write in flight, a writer that died before
/// the next open settles the chunk, a holder behind its serving barrier): looked at again a few
/// times, still apart they are counted as unsettled, not as a fault.
async fn compare_chunk(ctx: Ctx<'_>, (volume, chunk, chunk_size): (VolumeId, ChunkIndex, ChunkSize)) {
    let holders: Vec<(u64, Option<std::net::SocketAddr>)> = ctx.meta.read(|s| {
        let Some(v) = s.volumes.values().find(|v| v.id == volume.get()) else { return Vec::new() };
        s.holders(v.replicas, pg_of(volume, chunk, s.pg_count).0)
            .into_iter()
            .filter_map(|n| s.nodes.get(&n))
            .filter(|n| n.in_sync())
            .map(|n| (n.id, n.addr.rpc.parse().ok()))
            .collect()
    });
    if holders.first().is_none_or(|(id, _)| *id != ctx.me) || holders.len() < 2 {
        return;
    }
    let mut versions = std::collections::BTreeMap::new();
    for attempt in 0..REPAIR_ATTEMPTS {
        let mut copies: std::collections::BTreeMap<u64, Copy> = std::collections::BTreeMap::new();
        for (id, addr) in &holders {
            let copy = match (*id == ctx.me, addr) {
                (true, _) => read_copy(ctx, None, (volume, chunk, chunk_size)).await,
                (false, Some(addr)) => read_copy(ctx, Some(*addr), (volume, chunk, chunk_size)).await,
                (false, None) => Err("no address".into()),
            };
            match copy {
                Ok(c) => {
                    copies.insert(*id, c);
                }
                Err(e) => {
                    tracing::debug!(volume = %volume, chunk = chunk.0, node = id, "scrub: not compared: {e}");
                    ctx.scrub.update_run(|r| r.chunks_not_compared += 1);
                    return;
                }
            }
        }
        versions = copies.iter().map(|(n, c)| (*n, c.0.to_string())).collect();
        // Two contents under one version: a fault, whatever the other copies do.
        let differ = copies.values().any(|a| copies.values().any(|b| a.0 == b.0 && a.1 != b.1));
        if differ {
            tracing::error!(volume = %volume, chunk = chunk.0, ?versions, "scrub: copies of one version differ");
            ctx.scrub.update_run(|r| {
                r.chunks_compared += 1;
                r.chunks_differing_count += 1;
                if r.chunks_differing.len() < UNREPAIRED_LISTED_MAX {
                    r.chunks_differing.push(Differing { volume: volume.get(), chunk: chunk.0, versions });
                }
            });
            return;
        }
        let first = copies.values().next().map(|c| c.0);
        if copies.values().all(|c| Some(c.0) == first) {
            ctx.scrub.update_run(|r| r.chunks_compared += 1);
            return;
        }
        if attempt + 1 < REPAIR_ATTEMPTS {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tracing::debug!(volume = %volume, chunk = chunk.0, ?versions, "scrub: copies at different versions");
    ctx.scrub.update_run(|r| r.chunks_unsettled += 1);
}

/// A holder's copy, as compared (this node's if `addr` is none), read piece by piece
/// (`PIECE_BYTES`, within the rate limit) as of one version: the peers' with client reads (a
/// holder that does not serve reads of the chunk now is not compared), this node's from its store
/// (every block verified).
async fn read_copy(
    ctx: Ctx<'_>,
    addr: Option<std::net::SocketAddr>,
    (volume, chunk, chunk_size): (VolumeId, ChunkIndex, ChunkSize),
) -> Result<Copy, String> {
    let conn = match addr {
        Some(addr) => Some(
            tokio::time::timeout(READ_TIMEOUT, ctx.connections.get(addr))
                .await
                .map_err(|_| format!("no connection within {READ_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let piece = PIECE_BYTES.min(chunk_size.bytes());
    let mut version = None;
    let mut crcs = Vec::new();
    for offset in (0..chunk_size.bytes()).step_by(piece as usize) {
        let began = tokio::time::Instant::now();
        let (v, c) = match &conn {
            Some(conn) => {
                let p = read_range(conn, (volume, chunk, chunk_size), offset, piece).await?;
                (p.version, p.crcs)
            }
            None => {
                let s = ctx.store.clone();
                let r = tokio::task::spawn_blocking(move || s.read(volume, chunk, chunk_size, offset, piece))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                (r.version, r.crcs)
            }
        };
        if version.is_some_and(|x| x != v) {
            return Err("the copy moved while it was read".into());
        }
        version = Some(v);
        crcs.extend(c);
        if let Some(rate) = ctx.settings.bytes_per_s.filter(|r| *r > 0) {
            tokio::time::sleep_until(began + Duration::from_secs_f64(f64::from(piece) / rate as f64)).await;
        }
    }
    Ok((version.unwrap_or(Version::NONE), crcs))
}

/// Rewrites one damaged block from an in-sync holder's copy at this copy's version: `Ok(true)`
/// if rewritten, `Ok(false)` if a write replaced the block meanwhile (or the chunk went).
async fn repair_block(
    ctx: Ctx<'_>,
    (volume, chunk, chunk_size): (VolumeId, ChunkIndex, ChunkSize),
    block: u32,
) -> Result<bool, String> {
    let sources: Vec<(u64, std::net::SocketAddr)> = ctx.meta.read(|s| {
        let Some(v) = s.volumes.values().find(|v| v.id == volume.get()) else { return Vec::new() };
        s.holders(v.replicas, pg_of(volume, chunk, s.pg_count).0)
            .into_iter()
            .filter(|n| *n != ctx.me)
            .filter_map(|n| s.nodes.get(&n))
            .filter(|n| n.in_sync())
            .filter_map(|n| Some((n.id, n.addr.rpc.parse().ok()?)))
            .collect()
    });
    if sources.is_empty() {
        return Err("no other holder of the chunk is in sync".into());
    }
    let offset = block * BLOCK_SIZE_BYTES;
    let mut last = String::new();
    for attempt in 0..REPAIR_ATTEMPTS {
        for (id, addr) in &sources {
            let conn = match tokio::time::timeout(READ_TIMEOUT, ctx.connections.get(*addr)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    last = format!("node {id}: {e}");
                    continue;
                }
                Err(_) => {
                    last = format!("node {id}: no connection within {READ_TIMEOUT:?}");
                    continue;
                }
            };
            let (data, crcs, version) = match read_block(&conn, (volume, chunk, chunk_size), offset).await {
                Ok(p) => p,
                Err(e) => {
                    last = format!("node {id}: {e}");
                    continue;
                }
            };
            let s = ctx.store.clone();
            let repaired = tokio::task::spawn_blocking(move || {
                s.repair_at(volume, (chunk, chunk_size), offset, (&data, &crcs), version)
            })
            .await
            .map_err(|e| e.to_string())?;
            match repaired {
                Ok(n) => return Ok(n > 0),
                Err(StoreError::VersionMismatch { current, .. }) => {
                    last = format!(
                        "node {id}'s copy is at {version}, this one at {current} (a write in flight)"
                    );
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        if attempt + 1 < REPAIR_ATTEMPTS {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Err(last)
}

/// One block of a good copy, verified: (data, crcs, version).
async fn read_block(
    conn: &NodeConnection,
    (volume, chunk, chunk_size): (VolumeId, ChunkIndex, ChunkSize),
    offset: u32,
) -> Result<(Vec<u8>, Vec<u32>, Version), String> {
    let piece = read_range(conn, (volume, chunk, chunk_size), offset, BLOCK_SIZE_BYTES).await?;
    // A hole there reads as zeros: the same content, stored as data here.
    let data = piece.data.to_vec();
    let crc = crc32c(&data);
    if piece.present.first().copied().unwrap_or(false) && piece.crcs.first() != Some(&crc) {
        return Err("the good copy's block does not match its checksum in transit".into());
    }
    Ok((data, vec![crc], piece.version))
}

/// `[offset, offset + len)` of a holder's copy, with a client read.
async fn read_range(
    conn: &NodeConnection,
    (volume, chunk, chunk_size): (VolumeId, ChunkIndex, ChunkSize),
    offset: u32,
    len: u32,
) -> Result<cairn_client::piece::Piece, String> {
    let call = |request: Request| async move {
        match tokio::time::timeout(READ_TIMEOUT, conn.call(&request)).await {
            Ok(Ok(Response::Error(e))) => Err(e.to_string()),
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {READ_TIMEOUT:?}")),
        }
    };
    read_piece(call, volume, chunk, chunk_size, offset, len).await
}
