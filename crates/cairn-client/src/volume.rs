//! The volume IO engine: byte-range IO on a volume, replicated over its chunks' replicas.
//!
//! * Routing: byte range → chunks → placement group (`pg_of`) → the first R nodes of the PG's row in
//!   the map. The map (PG table, node states, volume) is refreshed every second and after errors.
//! * Writes go, in parallel, to every replica that is in sync (up, not catching up); the others are
//!   named in the write (`missed_by`) so that the replicas that apply it record what they missed. A
//!   write is acknowledged when every replica it was sent to applied it and at least a majority of
//!   R did. A replica that fails during a write is recorded as having missed it and reported to the
//!   pool (it must catch up); this client stops reading from it meanwhile.
//! * Below a majority, IO waits (refreshing the map, retrying) up to `io_timeout`, then fails.
//! * Mutations of one chunk are serialised by a per-chunk lock, so every replica applies them in the
//!   same order; unaligned writes read-modify-write their edge blocks under that lock.
//! * Reads go to one in-sync replica, rotating; a failed or corrupt read tries the next, and a corrupt
//!   replica is repaired with the good data. Checksums are verified here on every read.
//! * Fencing: the first mutation obtains a new generation from the pool (lazily, so that a migration
//!   target that only connects does not disturb the source). A fenced client's mutations fail with
//!   [`IoError::Fenced`] forever after. Shared volumes use the volume's current generation.

use crate::connection::ConnectionPool;
use crate::meta_client::{MetaClient, MetaClientError, NodeState, VolumeInfo};
use crate::versions::{ChunkVersions, Known, VERSIONS_MAX};
use bytes::Bytes;
use cairn_engine::Version;
use cairn_engine::reconcile::{Install, settle};
use cairn_proto::{ChunkInfo, Request, Response, RpcError, Stamp};
use cairn_types::checksum::block_crcs;
use cairn_types::limits::RPC_IO_MAX_BYTES;
use cairn_types::placement::pg_of;
use cairn_types::{BLOCK_SIZE_BYTES, ChunkIndex, ChunkSize, Expected, Generation, VolumeId, crc32c};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

const BS: u64 = BLOCK_SIZE_BYTES as u64;

/// How long a node this client saw fail stays excluded without the pool's map confirming it: long
/// enough for a report to reach the leader through an election (~10 s), short enough that a lost
/// report costs seconds, not the connection.
const SUSPECT_TTL: Duration = Duration::from_secs(15);

/// The storage node this client runs inside, if any: requests for it are handled in-process (same
/// checks and effects as over the RPC, without the network round trip).
pub trait LocalNode: Send + Sync + std::fmt::Debug {
    /// The node's id.
    fn id(&self) -> u64;
    /// Handles `request` as the node's RPC server would.
    fn handle(&self, request: Request) -> futures::future::BoxFuture<'static, Response>;
}

/// Tunables of a volume client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The node this client runs in (the NBD server of a storage node); `None` in the gateway.
    pub local: Option<Arc<dyn LocalNode>>,
    /// How long IO may wait for enough replicas before failing (default 30 s).
    pub io_timeout: Duration,
    /// How long one request to one node may take before that node is given up on for it (5 s).
    pub rpc_timeout: Duration,
    /// How often the map is refreshed (1 s).
    pub refresh_interval: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            local: None,
            io_timeout: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(5),
            refresh_interval: Duration::from_secs(1),
        }
    }
}

/// Why volume IO failed. The NBD layer maps these onto errno values.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IoError {
    #[error("this client was fenced: a newer writer holds the volume")]
    Fenced,
    #[error("no space left on a storage node")]
    NoSpace,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("IO error: {0}")]
    Io(String),
    #[error("volume {0:?} was deleted")]
    Deleted(String),
}

#[derive(Debug)]
struct VolumeMap {
    volume: VolumeInfo,
    /// The metadata epoch of the PG table this map was built from: the volume's description is
    /// fetched again only when the epoch moved (or on a refresh after an error).
    epoch: u64,
    pg_count: u32,
    /// Per PG, the nodes that hold this volume's data (the holders for its replica count).
    table: Vec<Vec<u64>>,
    /// Per PG, the nodes being filled with a copy of it: every mutation names them as having
    /// missed it (a node refuses one that does not: "stale map").
    backfill: Vec<Vec<u64>>,
    /// Per PG, its membership interval in this map (sent with every mutation).
    intervals: Vec<u64>,
    nodes: HashMap<u64, NodeState>,
}

impl VolumeMap {
    fn pg(&self, chunk: u64) -> Option<u32> {
        let id = VolumeId::new(self.volume.id).ok()?;
        Some(pg_of(id, ChunkIndex(chunk), self.pg_count).0)
    }

    fn replicas(&self, chunk: u64) -> Vec<u64> {
        let Some(pg) = self.pg(chunk) else { return Vec::new() };
        self.replicas_of_pg(pg)
    }

    fn replicas_of_pg(&self, pg: u32) -> Vec<u64> {
        self.table.get(pg as usize).cloned().unwrap_or_default()
    }

    fn backfill(&self, chunk: u64) -> Vec<u64> {
        let Some(pg) = self.pg(chunk) else { return Vec::new() };
        self.backfill.get(pg as usize).cloned().unwrap_or_default()
    }

    fn interval(&self, chunk: u64) -> u64 {
        let Some(pg) = self.pg(chunk) else { return 0 };
        self.intervals.get(pg as usize).copied().unwrap_or(0)
    }

    fn in_sync(&self, node: u64) -> bool {
        self.nodes.get(&node).is_some_and(|n| n.in_sync())
    }

    fn quorum(&self) -> usize {
        usize::from(self.volume.replicas) / 2 + 1
    }

    /// How many of a PG's holders must take part for a decision to see every acknowledged write:
    /// each was applied by at least `quorum()` of them (by all but R − q of them: `cairn_types::placement::write_quorum`),
    /// so any holders − quorum + 1 include one (more than needed once a PG holds more than R
    /// copies — a node that joined was admitted to it — and kept so: a flush then covers more).
    fn deciders(&self, pg: u32) -> usize {
        self.quorum().max((self.replicas_of_pg(pg).len() + 1).saturating_sub(self.quorum()))
    }
}

/// One chunk's share of a byte range.
#[derive(Debug, Clone, Copy)]
struct Piece {
    chunk: u64,
    /// Offset of the piece within its chunk.
    offset: u64,
    len: u64,
    /// Offset of the piece within the caller's buffer.
    at: usize,
}

/// How one mutation round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// Acknowledged.
    Done,
    /// Not acknowledged: the copies were made identical (or the writer adopted a newer
    /// generation); do it again.
    Settled,
}

/// Most times one mutation is done again after its chunk's copies were settled: each settle makes
/// them identical, so only other writers changing the chunk meanwhile (a shared volume) repeat it.
const SETTLE_ROUNDS_MAX: usize = 32;

/// How long an open trusts the chunk states its fence round reported: a chunk whose turn comes
/// later is asked again (a copy may have moved meanwhile; found by the production simulation).
const FENCE_REPORTS_FRESH: Duration = Duration::from_secs(1);

/// How many times a writer reads the volume again when its open finds a newer generation
/// committed since it read (hosts racing to open it), before it gives up with an error.
const OPEN_CONFLICTS_MAX: u32 = 8;

/// What became of a `RecordMissed` sent to some nodes (`VolumeClient::record_missed`).
#[derive(Debug, Default)]
struct Recorded {
    /// Recorded it.
    confirmed: BTreeSet<u64>,
    /// Refused: the copy had moved on from the version named (to this one).
    moved: BTreeMap<u64, Version>,
    /// Did not answer (timed out, connection failed).
    silent: BTreeSet<u64>,
}

/// A writer's generation: one it joined (a shared volume's current one) or one it opened.
enum Taken {
    Adopted(u64),
    Opened(VolumeInfo),
}

/// Why copying a chunk from one node to another failed.
#[derive(Debug)]
struct CopyError {
    /// The node that failed (the source or the target).
    node: u64,
    why: String,
    /// The plan was stale (the source or the target changed since): look again; nobody failed.
    stale: bool,
    /// The target failed and the source could not record that it missed the chunk.
    unrecorded: bool,
    /// A newer writer holds the volume: this writer stops; nobody failed.
    fenced: bool,
}

/// The copies of a chunk that may win a reconciliation: not half-installed, and not recorded by
/// any replica as having missed a write to the chunk (it may lack an acknowledged one that a
/// replica with a lower version number holds — two writers of a shared volume make siblings).
fn may_win(infos: &BTreeMap<u64, ChunkInfo>) -> BTreeSet<u64> {
    let missed: BTreeSet<u64> = infos.values().flat_map(|i| i.missed_by.iter().copied()).collect();
    infos
        .iter()
        .filter(|(n, i)| !missed.contains(n) && !i.chunk_version().is_installing())
        .map(|(n, _)| *n)
        .collect()
}

/// A random pause of up to `max`: writers that met on a chunk do not meet again in lockstep.
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    max.mul_f64((r % 1000) as f64 / 1000.0)
}

/// What a mutation does to an aligned range of a chunk.
#[derive(Debug, Clone)]
enum Mutation {
    Write(Bytes),
    Trim(u32),
    Zero(u32, bool),
}

/// A volume opened by one client (one NBD connection).
#[derive(Debug)]
pub struct VolumeClient {
    meta: Arc<MetaClient>,
    name: String,
    config: ClientConfig,
    map: RwLock<Arc<VolumeMap>>,
    connections: ConnectionPool,
    generation: tokio::sync::Mutex<u64>,
    fenced: AtomicBool,
    /// The volume was deleted: every operation fails from then on.
    deleted: AtomicBool,
    /// The versions this writer's mutations left, and the sequence numbers of new ones.
    versions: Mutex<ChunkVersions>,
    chunk_locks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    rotation: AtomicUsize,
    /// Nodes this client saw miss a write; not read from until the map shows them catching up.
    suspects: Mutex<BTreeMap<u64, Instant>>,
    /// PGs mutated since the last successful flush: a flush reaches only their replicas, so a PG
    /// never written (perhaps without a majority) cannot stall it. Shared by every client of the
    /// volume in this process (`MetaClient::touched_pgs`): a flush covers every connection's writes.
    touched_pgs: Arc<crate::meta_client::TouchedPgs>,
    refresher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for VolumeClient {
    fn drop(&mut self) {
        if let Some(t) = self.refresher.lock().ok().and_then(|mut g| g.take()) {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn meta_err(e: MetaClientError) -> IoError {
    IoError::Io(e.to_string())
}

impl VolumeClient {
    /// Opens volume `name` through the pool's API (no generation is taken until the first write).
    pub async fn open(
        meta: Arc<MetaClient>,
        name: &str,
        config: ClientConfig,
    ) -> Result<Arc<Self>, MetaClientError> {
        let map = fetch_map(&meta, name, Instant::now(), None).await?;
        let touched_pgs = meta.touched_pgs(map.volume.id);
        let client = Arc::new(VolumeClient {
            meta,
            name: name.to_string(),
            config,
            map: RwLock::new(Arc::new(map)),
            connections: ConnectionPool::default(),
            generation: tokio::sync::Mutex::new(0),
            fenced: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
            versions: Mutex::new(ChunkVersions::new(VERSIONS_MAX)),
            chunk_locks: Mutex::new(HashMap::new()),
            rotation: AtomicUsize::new(0),
            suspects: Mutex::new(BTreeMap::new()),
            touched_pgs,
            refresher: Mutex::new(None),
        });
        let weak = Arc::downgrade(&client);
        let interval = client.config.refresh_interval;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(c) = weak.upgrade() else { return };
                let _ = c.refresh_within(interval).await;
            }
        });
        *lock(&client.refresher) = Some(task);
        Ok(client)
    }

    fn map(&self) -> Arc<VolumeMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fetches the map again now.
    pub async fn refresh(&self) -> Result<(), IoError> {
        self.refresh_within(Duration::ZERO).await
    }

    /// Refreshes the map from a pool view at most `max_age` old (shared with the other volume
    /// clients of this `MetaClient`); the volume's own description is fetched again only if the
    /// metadata changed since (`max_age` zero: always).
    async fn refresh_within(&self, max_age: Duration) -> Result<(), IoError> {
        let now = Instant::now();
        let fresher_than = now.checked_sub(max_age).unwrap_or(now);
        let known = (!max_age.is_zero()).then(|| self.map()).map(|m| (m.epoch, m.volume.clone()));
        let map = match fetch_map(&self.meta, &self.name, fresher_than, known).await {
            // The name now belongs to another volume: this one was deleted (and a new one made).
            Ok(m) if m.volume.id != self.map().volume.id => {
                self.deleted.store(true, Ordering::SeqCst);
                return Err(IoError::Deleted(self.name.clone()));
            }
            Ok(m) => m,
            Err(MetaClientError::UnknownVolume(_)) => {
                self.deleted.store(true, Ordering::SeqCst);
                return Err(IoError::Deleted(self.name.clone()));
            }
            Err(e) => return Err(meta_err(e)),
        };
        // A suspect is dropped once the map shows it out of sync (the pool took over), or after
        // SUSPECT_TTL: if the pool never heard of its failure (the report was lost), naming it as
        // missing forever would make every write to its PGs fail as "stale map".
        lock(&self.suspects).retain(|n, since| map.in_sync(*n) && since.elapsed() < SUSPECT_TTL);
        // Never backwards: two refreshes may finish in the other order, and an older map would
        // count a PG's older holders for flushes and settles (found by review).
        let mut current = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.epoch >= current.epoch {
            *current = Arc::new(map);
        }
        Ok(())
    }

    pub fn size_bytes(&self) -> u64 {
        self.map().volume.size_bytes
    }

    pub fn shared(&self) -> bool {
        self.map().volume.shared
    }

    pub fn volume(&self) -> VolumeInfo {
        self.map().volume.clone()
    }

    fn chunk_size(&self) -> u64 {
        u64::from(self.map().volume.chunk_size_bytes)
    }

    fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let cs = self.chunk_size();
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let chunk = pos / cs;
            let in_chunk = pos % cs;
            let n = (cs - in_chunk).min(end - pos).min(u64::from(RPC_IO_MAX_BYTES));
            out.push(Piece { chunk, offset: in_chunk, len: n, at: (pos - offset) as usize });
            pos += n;
        }
        out
    }

    fn ids(&self) -> Result<(VolumeId, ChunkSize), IoError> {
        self.check_deleted()?;
        let v = self.map().volume.clone();
        Ok((
            VolumeId::new(v.id).map_err(|e| IoError::Invalid(e.to_string()))?,
            ChunkSize::new(v.chunk_size_bytes).map_err(|e| IoError::Invalid(e.to_string()))?,
        ))
    }

    /// Fails once the volume is known to be deleted (a node refused a request for it, or the
    /// pool no longer knows it): its data is going away, nothing may be acknowledged any more.
    fn check_deleted(&self) -> Result<(), IoError> {
        if self.deleted.load(Ordering::SeqCst) {
            return Err(IoError::Deleted(self.name.clone()));
        }
        Ok(())
    }

    /// One request to one node, bounded by the RPC timeout. `Err` is a transport failure.
    async fn call(&self, node: u64, request: &Request) -> Result<Response, String> {
        if let Some(local) = self.config.local.as_ref().filter(|l| l.id() == node) {
            let reply = Ok(local.handle(request.clone()).await);
            self.note_deleted(&reply);
            return reply;
        }
        let addr: SocketAddr = {
            let map = self.map();
            let n = map.nodes.get(&node).ok_or_else(|| format!("unknown node {node}"))?;
            n.rpc.parse().map_err(|e| format!("node {node} address {:?}: {e}", n.rpc))?
        };
        // A connection on which a call timed out is replaced (`call_within`): after a partition it
        // may sit in TCP's retransmission back-off for minutes. A mutation still in its send
        // buffer may then arrive after later ones sent on the new connection; it changes nothing
        // there, as it expects a version the copy has left (versioned mutations).
        // A mutation recorded as missed by peers may be held back until the read leases the node
        // granted them ran out (`cairn_types::limits::READ_LEASE_HOLDBACK`): that is not a failure.
        let names_missed = match request {
            Request::Write { missed_by, .. }
            | Request::Trim { missed_by, .. }
            | Request::WriteZeroes { missed_by, .. } => !missed_by.is_empty(),
            Request::RecordMissed { peers, .. } => !peers.is_empty(),
            _ => false,
        };
        let timeout = if names_missed {
            self.config.rpc_timeout + cairn_types::limits::READ_LEASE_HOLDBACK
        } else {
            self.config.rpc_timeout
        };
        let reply = self
            .connections
            .call_within(addr, request, timeout)
            .await
            .map_err(|e| format!("node {node}: {e}"));
        self.note_deleted(&reply);
        reply
    }

    fn note_deleted(&self, reply: &Result<Response, String>) {
        if let Ok(Response::Error(RpcError::Deleted { .. })) = reply {
            self.deleted.store(true, Ordering::SeqCst);
        }
    }

    fn chunk_lock(&self, chunk: u64) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.chunk_locks);
        // Drop locks nobody holds, so the table stays as small as the IO in flight.
        if locks.len() > 1024 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(chunk).or_default().clone()
    }

    async fn generation(&self) -> Result<u64, IoError> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(IoError::Fenced);
        }
        let mut g = self.generation.lock().await;
        if *g == 0 {
            let generation = match self.take_generation().await? {
                Taken::Adopted(generation) => generation,
                Taken::Opened(opened) => {
                    let generation = opened.generation;
                    // Fence and reconcile by a map at least as new as the open: one up to a
                    // refresh old could miss a member admitted since, which would then take the
                    // old writer's mutations unfenced (found by review).
                    self.refresh().await?;
                    // Before the first write: no replica accepts the previous writer's mutations
                    // from now on, and the chunks it may have left different are made identical.
                    match self.fence_and_reconcile(generation).await {
                        Ok(()) => generation,
                        // Two first writers of a shared volume opened at once: the later
                        // generation fenced this one; a shared writer adopts it.
                        Err(IoError::Fenced) if self.shared() => {
                            self.fenced.store(false, Ordering::SeqCst);
                            self.meta.volume(&self.name).await.map_err(meta_err)?.generation
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            *g = generation;
        }
        Ok(*g)
    }

    /// Joins or opens a writer generation, numbering this writer. A shared volume's writer joins
    /// the current generation (if any) with a number of its own; any other writer opens a new
    /// generation, which numbers it too. The open names the generation read: if a newer one was
    /// committed since (another host's open, or this one's whose answer was lost), it opens
    /// nothing and this reads the volume again, at most `OPEN_CONFLICTS_MAX` times.
    async fn take_generation(&self) -> Result<Taken, IoError> {
        let mut conflicts = 0;
        loop {
            let read = if self.shared() {
                let v = self.meta.writer(&self.name).await.map_err(meta_err)?;
                if v.generation != 0 {
                    lock(&self.versions).set_tag(v.writers);
                    return Ok(Taken::Adopted(v.generation));
                }
                0
            } else {
                self.meta.volume(&self.name).await.map_err(meta_err)?.generation
            };
            match self.meta.open(&self.name, read).await {
                Ok(opened) => {
                    lock(&self.versions).set_tag(opened.writers);
                    return Ok(Taken::Opened(opened));
                }
                Err(MetaClientError::Conflict(why)) if conflicts < OPEN_CONFLICTS_MAX => {
                    conflicts += 1;
                    tracing::info!(volume = %self.name, "open raced another: {why}; reading it again");
                }
                Err(e) => return Err(meta_err(e)),
            }
        }
    }

    /// Fencing at open. Raises `generation` on every in-sync holder of the volume's PGs (each
    /// persists it and waits out the mutations it admitted under the old one), then, for every
    /// chunk any of them reports dirty, makes the in-sync holders' copies identical: the copy with
    /// the highest (generation, sequence) wins (`cairn_engine::reconcile::settle`) among those
    /// that may (see [`may_win`]). A previous writer's write that reached only some replicas
    /// before the fence thus either reaches all or none. A holder that cannot be reached is
    /// reported as needing catch-up, and every holder that took no part in a chunk's
    /// reconciliation is recorded (on the copies made identical) as having missed the chunk: it
    /// gets their copy before it serves again, and by then its own map carries the new
    /// generation, so it refuses the old writer too. So is a holder that took part but then does
    /// not confirm its copy is still the settled one (it moved since: pulled back by its own
    /// catch-up, perhaps older).
    async fn fence_and_reconcile(&self, generation: u64) -> Result<(), IoError> {
        let (volume, chunk_size) = self.ids()?;
        let deadline = Instant::now() + self.config.io_timeout;
        // Until a majority of every PG's holders serve (after a restart of the whole pool, say,
        // none does yet): the chunks dirty on them are reconciled before the first write, which
        // the ones that do not serve yet cannot take part in.
        let (map, reached, dirty) = loop {
            let (map, reached, dirty) = self.fence_round(volume, generation).await?;
            // (As many as a reconciliation of the PG needs: `deciders`.)
            let short = map
                .table
                .iter()
                .enumerate()
                .find(|(pg, row)| {
                    row.iter().filter(|n| reached.contains(n)).count() < map.deciders(*pg as u32)
                })
                .map(|(pg, row)| (map.deciders(pg as u32), row));
            match short {
                None => break (map, reached, dirty),
                Some((need, row)) if Instant::now() > deadline => {
                    return Err(IoError::Io(format!(
                        "open: fewer than {need} of the replicas {row:?} of a placement group serve"
                    )));
                }
                Some(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = self.refresh().await;
                }
            }
        };
        let fenced_at = Instant::now();
        let reconciled = self
            .reconcile_dirty((volume, chunk_size, generation), &map, &reached, (dirty, fenced_at))
            .await?;
        if reconciled > 0 {
            tracing::info!(volume = %volume, generation, reconciled, "open: made dirty chunks identical");
        }
        Ok(())
    }

    /// Raises `generation` on every holder the map shows in sync. Returns the map used, the holders
    /// that serve (and were fenced), and the chunks dirty on them with each one's state there.
    #[allow(clippy::type_complexity)]
    async fn fence_round(
        &self,
        volume: VolumeId,
        generation: u64,
    ) -> Result<(Arc<VolumeMap>, BTreeSet<u64>, BTreeMap<u64, BTreeMap<u64, ChunkInfo>>), IoError> {
        let map = self.map();
        let nodes: BTreeSet<u64> = map.table.iter().flatten().copied().filter(|n| map.in_sync(*n)).collect();
        let request = Request::Fence { volume, generation: Generation(generation) };
        let results = futures::future::join_all(nodes.iter().map(|n| self.call(*n, &request))).await;
        let mut reached = BTreeSet::new();
        let mut dirty: BTreeMap<u64, BTreeMap<u64, ChunkInfo>> = BTreeMap::new();
        for (node, r) in nodes.iter().zip(results) {
            match r {
                Ok(Response::FenceRaised { serving: false, .. }) => {
                    // Fenced, but catching up or still starting (perhaps after a power loss): its
                    // copies may be stale or torn and take no part (recorded below as having
                    // missed every chunk reconciled).
                    tracing::debug!(node, "fence: the node does not serve yet; its copies take no part");
                }
                Ok(Response::FenceRaised { dirty: chunks, .. }) => {
                    reached.insert(*node);
                    for (chunk, info) in chunks {
                        dirty.entry(chunk.0).or_default().insert(*node, info);
                    }
                }
                Ok(Response::Error(RpcError::Fenced { .. })) => {
                    self.fenced.store(true, Ordering::SeqCst);
                    return Err(IoError::Fenced);
                }
                Ok(other) => self.suspect(*node, &format!("fence: unexpected reply {other:?}")),
                Err(e) => self.suspect(*node, &format!("fence: {e}")),
            }
        }
        Ok((map, reached, dirty))
    }

    /// Reconciles the chunks dirty on the holders reached (see `fence_and_reconcile`).
    #[allow(clippy::too_many_arguments)]
    async fn reconcile_dirty(
        &self,
        (volume, chunk_size, generation): (VolumeId, ChunkSize, u64),
        map: &VolumeMap,
        reached: &BTreeSet<u64>,
        (dirty, fenced_at): (BTreeMap<u64, BTreeMap<u64, ChunkInfo>>, Instant),
    ) -> Result<usize, IoError> {
        let mut reconciled = 0usize;
        // A holder that fails for one chunk takes no part in the later ones either (it is
        // suspected and recorded as having missed each): a frozen holder must not cost a timeout
        // per dirty chunk, with every write waiting on the open.
        let mut reached = reached.clone();
        let shared = map.volume.shared;
        // (The fence's reports are used while fresh; a chunk whose turn comes later has its states
        // asked again: a holder's copy may have moved since — a failing holder costs seconds over
        // the chunks before — and a stale state settled nothing: found by the production
        // simulation.)
        for (chunk, from_fence) in dirty {
            let mut reported: BTreeMap<u64, ChunkInfo> =
                if fenced_at.elapsed() < FENCE_REPORTS_FRESH { from_fence } else { BTreeMap::new() };
            let holders = map.replicas(chunk);
            let mut live: BTreeSet<u64> = holders.iter().copied().filter(|n| reached.contains(n)).collect();
            let mut stale_rounds = 0;
            // The version the live holders' copies were made identical at.
            let mut settled_at: Option<Version> = None;
            // Each failure takes one holder out (suspected, caught up later), so this ends.
            'settle: while !live.is_empty() {
                // Never decided by fewer than a quorum of the holders (the others' copies may hold
                // what wins): the open fails and the next write tries it again.
                // (holders − q + 1 of them: every acknowledged write was applied by q of the
                // holders, and a PG that took in a filled node has more than R.)
                if map.pg(chunk).is_none_or(|pg| live.len() < map.deciders(pg)) {
                    return Err(IoError::Io(format!(
                        "open: chunk {chunk}: only {} of its holders take part in its reconciliation",
                        live.len()
                    )));
                }
                let ask: Vec<u64> = live.iter().copied().filter(|n| !reported.contains_key(n)).collect();
                let (asked, failed) = self.chunk_infos(volume, chunk, &ask).await;
                if !failed.is_empty() {
                    for (node, why, answered) in failed {
                        self.suspect(node, &format!("open: chunk {chunk} version: {why}"));
                        live.remove(&node);
                        // One that did not answer at all is left out of the later chunks too; one
                        // that answered with an error (a damaged copy of this chunk) is not.
                        if !answered {
                            reached.remove(&node);
                        }
                    }
                    continue 'settle;
                }
                reported.extend(asked);
                // A holder that recorded itself as missing the chunk is pulling its own copy back
                // (after a power loss, or its catch-up found the copy differs): that copy is in
                // motion and takes no part; it is recorded below with the holders outside.
                let unsure: Vec<u64> = live
                    .iter()
                    .copied()
                    .filter(|n| reported.get(n).is_some_and(|i| i.missed_by.contains(n)))
                    .collect();
                if !unsure.is_empty() {
                    for node in unsure {
                        live.remove(&node);
                    }
                    continue 'settle;
                }
                let infos: BTreeMap<u64, ChunkInfo> =
                    reported.iter().filter(|(n, _)| live.contains(n)).map(|(n, i)| (*n, i.clone())).collect();
                let versions: BTreeMap<u64, Version> =
                    infos.iter().map(|(n, i)| (*n, i.chunk_version())).collect();
                let Some((winner, installs)) = settle(&versions, &may_win(&infos), None) else {
                    // No copy may win (each recorded as missed somewhere, or half installed):
                    // identical ones need nothing; different ones must not be left for a first
                    // write to build on.
                    if versions.values().collect::<BTreeSet<_>>().len() <= 1 {
                        settled_at = versions.values().next().copied();
                        break;
                    }
                    return Err(IoError::Io(format!(
                        "open: chunk {chunk}: its copies differ and none may win a reconciliation: {versions:?}"
                    )));
                };
                for install in installs {
                    if let Err(e) = self
                        .install_copy(winner, install, (volume, chunk, chunk_size), (generation, true))
                        .await
                    {
                        if e.fenced {
                            self.fenced.store(true, Ordering::SeqCst);
                            return Err(IoError::Fenced);
                        }
                        if e.stale && stale_rounds < SETTLE_ROUNDS_MAX {
                            // A copy moved since its version was read, or the source does not
                            // serve reads for a moment (a read lease on its way): ask them all
                            // again after a pause (32 rounds of 100 ms outlast a lease round).
                            stale_rounds += 1;
                            reported.clear();
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue 'settle;
                        }
                        if e.unrecorded {
                            return Err(IoError::Io(format!("open: chunk {chunk}: {}", e.why)));
                        }
                        live.remove(&e.node);
                        reached.remove(&e.node);
                        continue 'settle;
                    }
                    reconciled += 1;
                }
                settled_at = versions.get(&winner).copied();
                break;
            }
            // Every holder dropped out at once (a network blip of this client): the chunk was not
            // settled, and must not be passed over as if it were (found by review).
            if map.pg(chunk).is_none_or(|pg| live.len() < map.deciders(pg)) {
                return Err(IoError::Io(format!(
                    "open: chunk {chunk}: only {} of its holders take part in its reconciliation",
                    live.len()
                )));
            }
            // Holders that took no part may hold another copy (a stray write of the old writer,
            // a torn one): the copies made identical record them as having missed the chunk,
            // settled at this generation (their copy goes over an older generation's, see
            // `MissedLog::record_settled`). So do the nodes being filled with a copy of its PG:
            // theirs came from a holder's copy as it was — perhaps an old writer's leftover that
            // holder has pulled back since (found by the production simulation, seed 5277 with a
            // 5–30 s writeback) — and no writer's mutation reaches them. (A record whose copy the
            // node holds already costs one version question.)
            let mut outside: Vec<u64> = holders.iter().copied().filter(|n| !live.contains(n)).collect();
            outside.extend(map.backfill(chunk));
            let mut on: Vec<u64> = live.iter().copied().collect();
            // With none outside, the round still asks the holders that took part whether their
            // copy is still the settled one (a winner read for its copy may have pulled an older
            // one back since: it would serve it beside the settled one). Each later round leaves
            // out at least one holder of `on`, so this ends.
            loop {
                // (On a shared volume with nobody outside the check is skipped: another writer of
                // this generation may move the copies legitimately meanwhile.)
                if outside.is_empty() && shared {
                    break;
                }
                // Each only if its copy is still the settled one: a copy that moved since (a
                // left-out holder's own catch-up copy landing in between) is not counted (found by
                // review), and the open fails below unless a quorum still holds it.
                let at: BTreeMap<u64, Version> =
                    settled_at.map(|v| on.iter().map(|n| (*n, v)).collect()).unwrap_or_default();
                let recorded = self
                    .record_missed(&on, &outside, volume, chunk, chunk_size, (&at, Some(generation)))
                    .await;
                // A holder that does not answer takes no part in the later chunks either (as in
                // the rounds above).
                for node in &recorded.silent {
                    reached.remove(node);
                }
                let refused: Vec<u64> = on
                    .iter()
                    .copied()
                    .filter(|n| !recorded.confirmed.contains(n))
                    // (Another shared writer's write of this generation moved it on: legitimate.)
                    .filter(|n| !recorded.moved.get(n).is_some_and(|v| shared && v.generation >= generation))
                    .collect();
                for node in &refused {
                    self.suspect(
                        *node,
                        &format!(
                            "open: chunk {chunk}: its copy is no longer the settled one, or it could not \
                             record that {outside:?} missed it"
                        ),
                    );
                }
                // A quorum of them: a holder left out serves reads only with leases from all its
                // other holders but q − 1, so q records reach one it needs; fewer let it go on
                // serving its own copy beside the settled one (found by the production simulation,
                // seed 84 316: the one record made was on the only holder the writer could reach).
                let confirmed = recorded.confirmed;
                if confirmed.len() < map.quorum().min(on.len()) {
                    return Err(IoError::Io(format!(
                        "open: chunk {chunk}: only {} replicas could record that nodes {outside:?} missed it",
                        confirmed.len()
                    )));
                }
                // A holder that did not confirm (its copy moved since it was settled — pulled back
                // by its own catch-up, perhaps older —, it is unsure of it, or it did not answer)
                // is left out in turn, recorded on those that did (found by the production
                // simulation, seed 280 668: only suspected, it served its pulled-back copy).
                if refused.is_empty() {
                    break;
                }
                outside = refused;
                on = confirmed.into_iter().collect();
            }
        }
        Ok(reconciled)
    }

    /// The state of `chunk` on each of `nodes` (a node without it: at version none), and the
    /// nodes that failed to tell (with whether they answered at all).
    async fn chunk_infos(
        &self,
        volume: VolumeId,
        chunk: u64,
        nodes: &[u64],
    ) -> (BTreeMap<u64, ChunkInfo>, Vec<(u64, String, bool)>) {
        let ask = Request::ChunkVersion { volume, chunk: ChunkIndex(chunk) };
        let replies = futures::future::join_all(nodes.iter().map(|n| self.call(*n, &ask))).await;
        let mut infos = BTreeMap::new();
        let mut failed = Vec::new();
        for (node, reply) in nodes.iter().zip(replies) {
            match reply {
                Ok(Response::ChunkVersion(info)) => {
                    infos.insert(*node, info.unwrap_or_else(ChunkInfo::absent));
                }
                Ok(other) => failed.push((*node, format!("{other:?}"), true)),
                Err(e) => failed.push((*node, e, false)),
            }
        }
        (infos, failed)
    }

    /// `node` failed during IO: stop reading from it and have the pool catch it up.
    fn suspect(&self, node: u64, why: &str) {
        tracing::warn!(node, "{why}");
        lock(&self.suspects).insert(node, Instant::now());
        let meta = self.meta.clone();
        tokio::spawn(async move {
            // Bounded: 20 tries over ~10 s (the node may have been the metadata leader).
            for attempt in 0..20 {
                match meta.report_catch_up(node).await {
                    Ok(()) => return,
                    Err(e) if attempt == 19 => tracing::warn!(node, "reporting a missed write: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        });
    }

    /// Installs node `from`'s copy of `chunk` as `install` says; a target that failed (perhaps
    /// left torn) is recorded as missed by `from`, so that it is copied whole before it serves
    /// again, and is reported, like a failed write. `settles`: the open's reconciliation of
    /// generation `generation` (the record is settled at it, see `record_missed`).
    async fn install_copy(
        &self,
        from: u64,
        install: Install,
        (volume, chunk, chunk_size): (VolumeId, u64, ChunkSize),
        (generation, settles): (u64, bool),
    ) -> Result<(), CopyError> {
        let settles = settles.then_some(generation);
        let mut result = self.copy_chunk(from, install, (volume, chunk, chunk_size), generation).await;
        if let Err(e) = &mut result
            && !e.stale
            && !e.fenced
        {
            if e.node == install.node {
                let Recorded { confirmed, .. } = self
                    .record_missed(&[from], &[e.node], volume, chunk, chunk_size, (&BTreeMap::new(), settles))
                    .await;
                if !confirmed.contains(&from) {
                    e.unrecorded = true;
                    e.why = format!("{} and node {from} could not record it", e.why);
                    self.suspect(from, &format!("chunk {chunk}: could not record a missed copy"));
                }
            }
            self.suspect(e.node, &format!("copying chunk {chunk}: {}", e.why));
        }
        result
    }

    /// Copies chunk `chunk` whole from node `from` (at `install.version`) to `install.node` (still
    /// at `install.expected`), present blocks with their checksums and holes as holes, in pieces
    /// of at most one RPC, as writer `generation` (a node fenced by a newer writer refuses it).
    async fn copy_chunk(
        &self,
        from: u64,
        install: Install,
        (volume, chunk, chunk_size): (VolumeId, u64, ChunkSize),
        generation: u64,
    ) -> Result<(), CopyError> {
        let Install { node: to, expected: expect, version } = install;
        let fail = |node: u64, what: String, stale: bool| CopyError {
            node,
            why: format!("from node {from} to node {to}: {what}"),
            stale,
            unrecorded: false,
            fenced: false,
        };
        let piece = RPC_IO_MAX_BYTES.min(chunk_size.bytes());
        for offset in (0..chunk_size.bytes()).step_by(piece as usize) {
            let (c, o) = (ChunkIndex(chunk), offset);
            let copy = match self
                .call(from, &Request::Read { volume, chunk: c, chunk_size, offset: o, len: piece })
                .await
            {
                // The source does not serve this read now (no read lease, catching up): not a
                // failure of the node — the copy is planned again from a fresh look.
                Ok(Response::Error(RpcError::Unavailable { message })) => {
                    return Err(fail(from, format!("the source does not serve reads now: {message}"), true));
                }
                Ok(reply) => crate::piece::piece_from(reply).map_err(|e| fail(from, e, false))?,
                Err(e) => return Err(fail(from, e, false)),
            };
            if copy.version != version {
                return Err(fail(
                    from,
                    format!("the source moved to {} while being copied", copy.version),
                    true,
                ));
            }
            let (kept, kept_crcs) = copy.present_only();
            let install = Request::InstallRange {
                volume,
                chunk: c,
                chunk_size,
                offset: o,
                present: copy.present,
                crcs: kept_crcs,
                data: kept,
                generation: Generation(generation),
                version,
                // The first piece is installed over the planned copy; the next ones over the
                // pieces before them (the target is "being installed" in between).
                expect: Some(if o == 0 { expect } else { Version::installing(version) }),
                // Refused if the target recorded the source as having missed a write to the
                // chunk since this copy was planned (the copy would undo that write).
                source: Some(from),
                settled: None,
                // Installed dirty: if this writer dies before every other copy got it, the copies
                // differ, and the next open must find the chunk among the dirty ones (installed
                // clean, it was skipped and the difference stayed: found by review). Copies
                // already identical cost one comparison at that open.
                dirty: true,
            };
            match self.call(to, &install).await {
                Ok(Response::Done) => {}
                Ok(Response::Error(RpcError::VersionMismatch { current, .. })) => {
                    return Err(fail(to, format!("the target moved to {current}"), true));
                }
                // A newer writer holds the volume: this writer's copies stop; nobody failed.
                Ok(Response::Error(RpcError::Fenced { .. })) => {
                    return Err(CopyError {
                        fenced: true,
                        ..fail(to, "fenced by a newer writer".into(), false)
                    });
                }
                other => return Err(fail(to, format!("{other:?}"), false)),
            }
        }
        Ok(())
    }

    /// Makes the in-sync copies of `chunk` identical: the highest version among those that may
    /// win ([`may_win`]) wins (every acknowledged mutation is on every in-sync copy not recorded as
    /// having missed it, so the highest holds them all) and is installed on each other copy that
    /// is still at the version seen. Returns the version they are all at now. A copy that cannot
    /// be installed is recorded as missed by the winner and its node reported, as for a failed
    /// write.
    async fn settle_chunk(&self, chunk: u64) -> Result<Version, IoError> {
        let (volume, chunk_size) = self.ids()?;
        let deadline = Instant::now() + self.config.io_timeout;
        let mut last = String::new();
        loop {
            self.check_deleted()?;
            let generation = self.generation().await?;
            let map = self.map();
            let suspects: BTreeSet<u64> = lock(&self.suspects).keys().copied().collect();
            let nodes: Vec<u64> = map
                .replicas(chunk)
                .into_iter()
                .filter(|n| map.in_sync(*n) && !suspects.contains(n))
                .collect();
            let (infos, failed) = self.chunk_infos(volume, chunk, &nodes).await;
            if let Some((node, why, _)) = failed.first() {
                last = format!("node {node}: chunk version: {why}");
            }
            let versions: BTreeMap<u64, Version> =
                infos.iter().map(|(n, i)| (*n, i.chunk_version())).collect();
            if map.pg(chunk).is_some_and(|pg| infos.len() >= map.deciders(pg))
                && let Some((winner, installs)) = settle(&versions, &may_win(&infos), None)
            {
                let top = versions.get(&winner).copied().unwrap_or(Version::NONE);
                let mut again = false;
                for install in installs {
                    if let Err(e) = self
                        .install_copy(winner, install, (volume, chunk, chunk_size), (generation, false))
                        .await
                    {
                        if e.fenced {
                            // A shared writer adopts the newer generation; any other stops here.
                            self.on_fenced(generation).await?;
                        }
                        last = e.why;
                        again = true;
                    }
                }
                if !again {
                    lock(&self.versions).set(chunk, Some(top));
                    return Ok(top);
                }
            } else if last.is_empty() {
                last = format!(
                    "only {} of {} replicas answered, none of them may win",
                    infos.len(),
                    nodes.len()
                );
            }
            if Instant::now() > deadline {
                return Err(IoError::Io(format!(
                    "chunk {chunk}: could not make its copies identical: {last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20) + jitter(Duration::from_millis(50))).await;
            let _ = self.refresh().await;
        }
    }

    /// A shared volume's writer was fenced by another shared writer's open: adopt the newest.
    async fn on_fenced(&self, used: u64) -> Result<(), IoError> {
        if !self.shared() {
            self.fenced.store(true, Ordering::SeqCst);
            return Err(IoError::Fenced);
        }
        let v = self.meta.volume(&self.name).await.map_err(meta_err)?;
        let mut g = self.generation.lock().await;
        if v.generation > used {
            *g = v.generation;
            Ok(())
        } else {
            Err(IoError::Fenced)
        }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, IoError> {
        let mut out = vec![0u8; len as usize];
        let pieces = self.pieces(offset, len);
        let reads = pieces.iter().map(|p| async move {
            let a0 = p.offset / BS * BS;
            let a1 = (p.offset + p.len).div_ceil(BS) * BS;
            let (data, _) = self.read_aligned(p.chunk, a0, a1 - a0, false).await?;
            Ok::<_, IoError>((p, data, (p.offset - a0) as usize))
        });
        for r in futures::future::join_all(reads).await {
            let (p, data, skip) = r?;
            out[p.at..p.at + p.len as usize].copy_from_slice(&data[skip..skip + p.len as usize]);
        }
        Ok(out)
    }

    /// Reads an aligned range from one replica, with the chunk's version there. `chunk_locked`:
    /// the caller holds the chunk's lock (a read-modify-write); else a repair of a corrupt replica
    /// takes it, so that a repair never writes data older than a write that completed meanwhile.
    async fn read_aligned(
        &self,
        chunk: u64,
        offset: u64,
        len: u64,
        chunk_locked: bool,
    ) -> Result<(Vec<u8>, Version), IoError> {
        let (volume, chunk_size) = self.ids()?;
        let request = Request::Read {
            volume,
            chunk: ChunkIndex(chunk),
            chunk_size,
            offset: offset as u32,
            len: len as u32,
        };
        let deadline = Instant::now() + self.config.io_timeout;
        let mut last = String::from("no replica in sync");
        loop {
            self.check_deleted()?;
            let map = self.map();
            let suspects: BTreeSet<u64> = lock(&self.suspects).keys().copied().collect();
            let mut candidates: Vec<u64> = map
                .replicas(chunk)
                .into_iter()
                .filter(|n| map.in_sync(*n) && !suspects.contains(n))
                .collect();
            if !candidates.is_empty() {
                let start = self.rotation.fetch_add(1, Ordering::Relaxed) % candidates.len();
                candidates.rotate_left(start);
            }
            // A replica in this very process is read first: no network round trip. (Clients on
            // different nodes thus read different replicas; the gateway rotates.)
            if let Some(local) = &self.config.local
                && let Some(i) = candidates.iter().position(|n| *n == local.id())
            {
                candidates[..=i].rotate_right(1);
            }
            let mut corrupt = Vec::new();
            for node in candidates {
                match self.call(node, &request).await {
                    Ok(Response::Read { crcs, data, version, .. }) => {
                        let good = verified(&data, &crcs, len);
                        if !good {
                            last = format!("node {node} returned data failing its checksums");
                            corrupt.push(node);
                            continue;
                        }
                        if !corrupt.is_empty() {
                            if chunk_locked {
                                self.repair(&corrupt, volume, chunk, chunk_size, offset, &data, &crcs).await;
                            } else {
                                // Under the chunk lock, from a fresh read of the good replica: the
                                // data read above may be older than a write completed since.
                                let lock = self.chunk_lock(chunk);
                                let _guard = lock.lock().await;
                                if let Ok(Response::Read { crcs, data, .. }) = self.call(node, &request).await
                                    && verified(&data, &crcs, len)
                                {
                                    self.repair(&corrupt, volume, chunk, chunk_size, offset, &data, &crcs)
                                        .await;
                                }
                            }
                        }
                        return Ok((data.to_vec(), version));
                    }
                    Ok(Response::Error(RpcError::Corrupt { block, .. })) => {
                        last = format!("node {node}: block {block} corrupt");
                        corrupt.push(node);
                    }
                    Ok(Response::Error(RpcError::InvalidRequest { message })) => {
                        return Err(IoError::Invalid(message));
                    }
                    Ok(Response::Error(e)) => last = format!("node {node}: {e}"),
                    Ok(other) => last = format!("node {node}: unexpected reply {other:?}"),
                    Err(e) => last = e,
                }
            }
            if Instant::now() > deadline {
                return Err(IoError::Io(format!("read of chunk {chunk} failed: {last}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = self.refresh().await;
        }
    }

    /// Rewrites a range on replicas that returned it corrupt, with data that verified.
    #[allow(clippy::too_many_arguments)]
    async fn repair(
        &self,
        nodes: &[u64],
        volume: VolumeId,
        chunk: u64,
        chunk_size: ChunkSize,
        offset: u64,
        data: &Bytes,
        crcs: &[u32],
    ) {
        for node in nodes {
            let request = Request::Repair {
                volume,
                chunk: ChunkIndex(chunk),
                chunk_size,
                offset: offset as u32,
                crcs: crcs.to_vec(),
                data: data.clone(),
            };
            match self.call(*node, &request).await {
                Ok(Response::Done) => tracing::warn!(node, chunk, "repaired a corrupt copy"),
                Ok(other) => tracing::warn!(node, chunk, "repair refused: {other:?}"),
                Err(e) => tracing::warn!(node, chunk, "repair failed: {e}"),
            }
        }
    }

    /// Writes `data` at `offset`; with `fua`, durable when it returns.
    /// `data` is shared, not copied: aligned pieces go to the replicas as slices of it.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let pieces = self.pieces(offset, data.len() as u64);
        let writes = pieces.iter().map(|p| self.write_piece(*p, data.slice(p.at..p.at + p.len as usize)));
        for r in futures::future::join_all(writes).await {
            r?;
        }
        if fua { self.flush_range(offset, data.len() as u64).await } else { Ok(()) }
    }

    async fn write_piece(&self, p: Piece, data: Bytes) -> Result<(), IoError> {
        let lock = self.chunk_lock(p.chunk);
        let _guard = lock.lock().await;
        let a0 = p.offset / BS * BS;
        let a1 = (p.offset + p.len).div_ceil(BS) * BS;
        if a0 == p.offset && a1 == p.offset + p.len {
            return self.mutate_settled(p.chunk, a0, Mutation::Write(data)).await;
        }
        // Read-modify-write of the partial edge blocks, under the chunk lock, expecting the
        // version read with them: if the chunk changed since (another writer of a shared volume),
        // no replica applies it, and it is done again from a fresh read.
        for _ in 0..SETTLE_ROUNDS_MAX {
            let mut buf = vec![0u8; (a1 - a0) as usize];
            let mut read_at = None;
            if a0 < p.offset {
                let (head, v) = self.read_aligned(p.chunk, a0, BS, true).await?;
                buf[..BS as usize].copy_from_slice(&head);
                read_at = Some(v);
            }
            // The last block is partial too, unless it is the first block, already read.
            if a1 > p.offset + p.len && !(a1 - a0 == BS && a0 < p.offset) {
                let (tail, v) = self.read_aligned(p.chunk, a1 - BS, BS, true).await?;
                let n = buf.len();
                buf[n - BS as usize..].copy_from_slice(&tail);
                if read_at.is_some_and(|h| h != v) {
                    // The edges were read at different versions: settle, then read again.
                    self.settle_chunk(p.chunk).await?;
                    continue;
                }
                read_at = Some(v);
            }
            let skip = (p.offset - a0) as usize;
            buf[skip..skip + data.len()].copy_from_slice(&data);
            match self.mutate(p.chunk, a0, Mutation::Write(Bytes::from(buf)), read_at).await? {
                Round::Done => return Ok(()),
                Round::Settled => tokio::time::sleep(jitter(Duration::from_millis(5))).await,
            }
        }
        Err(IoError::Io(format!("chunk {}: its replicas kept changing under this write", p.chunk)))
    }

    /// Applies one aligned mutation (caller holds the chunk lock), again after each settle.
    async fn mutate_settled(&self, chunk: u64, offset: u64, mutation: Mutation) -> Result<(), IoError> {
        for _ in 0..SETTLE_ROUNDS_MAX {
            if let Round::Done = self.mutate(chunk, offset, mutation.clone(), None).await? {
                return Ok(());
            }
            tokio::time::sleep(jitter(Duration::from_millis(5))).await;
        }
        Err(IoError::Io(format!("chunk {chunk}: its replicas kept changing under this mutation")))
    }

    /// Frees `len` bytes at `offset`; partial blocks at the edges are left as they are (a trim is a
    /// hint).
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        for p in self.pieces(offset, len) {
            let a0 = p.offset.div_ceil(BS) * BS;
            let a1 = (p.offset + p.len) / BS * BS;
            if a1 > a0 {
                let lock = self.chunk_lock(p.chunk);
                let _guard = lock.lock().await;
                self.mutate_settled(p.chunk, a0, Mutation::Trim((a1 - a0) as u32)).await?;
            }
        }
        if fua { self.flush_range(offset, len).await } else { Ok(()) }
    }

    /// Makes `len` bytes at `offset` read as zeros; `no_hole` keeps them allocated.
    pub async fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fua: bool) -> Result<(), IoError> {
        for p in self.pieces(offset, len) {
            let a0 = p.offset.div_ceil(BS) * BS;
            let a1 = (p.offset + p.len) / BS * BS;
            if a1 <= a0 {
                // Entirely within one block: write zeros.
                self.write_piece(p, Bytes::from(vec![0u8; p.len as usize])).await?;
                continue;
            }
            if a0 > p.offset {
                let head = Piece { chunk: p.chunk, offset: p.offset, len: a0 - p.offset, at: 0 };
                self.write_piece(head, Bytes::from(vec![0u8; head.len as usize])).await?;
            }
            if p.offset + p.len > a1 {
                let tail = Piece { chunk: p.chunk, offset: a1, len: p.offset + p.len - a1, at: 0 };
                self.write_piece(tail, Bytes::from(vec![0u8; tail.len as usize])).await?;
            }
            let lock = self.chunk_lock(p.chunk);
            let _guard = lock.lock().await;
            self.mutate_settled(p.chunk, a0, Mutation::Zero((a1 - a0) as u32, no_hole)).await?;
        }
        if fua { self.flush_range(offset, len).await } else { Ok(()) }
    }

    /// Applies one aligned mutation to every in-sync replica of `chunk` (caller holds the chunk
    /// lock), expecting the chunk at `read_at` (the version a read-modify-write read) or at the
    /// version this writer knows. `Round::Settled`: some replica held another version, the copies
    /// were made identical and nothing is acknowledged — the caller starts again (a
    /// read-modify-write from a fresh read).
    async fn mutate(
        &self,
        chunk: u64,
        offset: u64,
        mutation: Mutation,
        read_at: Option<Version>,
    ) -> Result<Round, IoError> {
        let (volume, chunk_size) = self.ids()?;
        let deadline = Instant::now() + self.config.io_timeout;
        let mut last = String::new();
        let generation = self.generation().await?;
        let expected = match read_at {
            Some(v) => Expected::Exact(v),
            None => {
                let known = lock(&self.versions).get(chunk, self.shared());
                match known {
                    Known::At(v) => Expected::Exact(v),
                    Known::Untouched => Expected::Below(generation),
                    Known::Unknown => Expected::Exact(self.settle_chunk(chunk).await?),
                }
            }
        };
        // One stamp for every attempt: a replica that applied an earlier attempt answers it as
        // applied instead of refusing it.
        let stamp = Stamp {
            generation: Generation(generation),
            sequence: lock(&self.versions).next_sequence(expected),
            expect: Some(expected),
        };
        // Replicas that applied this mutation in some attempt.
        let mut applied_by: BTreeSet<u64> = BTreeSet::new();
        loop {
            self.check_deleted()?;
            let map = self.map();
            let replicas = map.replicas(chunk);
            // All of the chunk's holders but R − q must apply it (`write_quorum`).
            let need = cairn_types::placement::write_quorum(map.volume.replicas, replicas.len());
            let suspects: BTreeSet<u64> = lock(&self.suspects).keys().copied().collect();
            let (targets, mut missed): (Vec<u64>, Vec<u64>) =
                replicas.iter().partition(|n| map.in_sync(**n) && !suspects.contains(n));
            // Nodes being filled with a copy of the PG: the appliers record that they missed it,
            // and copy it to them.
            for n in map.backfill(chunk) {
                if !missed.contains(&n) {
                    missed.push(n);
                }
            }
            if targets.len() >= need {
                let request = match &mutation {
                    Mutation::Write(data) => Request::Write {
                        volume,
                        chunk: ChunkIndex(chunk),
                        chunk_size,
                        offset: offset as u32,
                        stamp,
                        crcs: block_crcs(data),
                        data: data.clone(),
                        missed_by: missed.clone(),
                        pg_interval: map.interval(chunk),
                    },
                    Mutation::Trim(len) => Request::Trim {
                        volume,
                        chunk: ChunkIndex(chunk),
                        chunk_size,
                        offset: offset as u32,
                        len: *len,
                        stamp,
                        missed_by: missed.clone(),
                        pg_interval: map.interval(chunk),
                    },
                    Mutation::Zero(len, allocate) => Request::WriteZeroes {
                        volume,
                        chunk: ChunkIndex(chunk),
                        chunk_size,
                        offset: offset as u32,
                        len: *len,
                        stamp,
                        allocate: *allocate,
                        missed_by: missed.clone(),
                        pg_interval: map.interval(chunk),
                    },
                };
                let results =
                    futures::future::join_all(targets.iter().map(|n| self.call(*n, &request))).await;
                let mut ok = Vec::new();
                let mut failed = Vec::new();
                let mut stale_map = false;
                let mut no_space = false;
                let mut conflict = false;
                let mut fenced = false;
                let mut now_at = BTreeSet::new();
                // The version each replica that applied it is at now.
                let mut applied_at = BTreeMap::new();
                // The versions replicas that refused it are at.
                let mut refused_at = Vec::new();
                // Replicas that refused it as behind (a volume with one writer).
                let mut behind = Vec::new();
                for (node, r) in targets.iter().zip(results) {
                    match r {
                        Ok(Response::Applied { version }) => {
                            ok.push(*node);
                            now_at.insert(version);
                            applied_at.insert(*node, version);
                        }
                        Ok(Response::Error(RpcError::Fenced { .. })) => {
                            self.on_fenced(generation).await?;
                            fenced = true; // shared volume: again with the newer generation
                        }
                        // Behind: with one writer, the replica missed mutations; like a failure,
                        // it is recorded as having missed this one and caught up. With several
                        // (a shared volume), another writer's mutation may still be on its way
                        // to it: settled below instead.
                        // (Only if the writer expected a version its own acknowledged mutation left:
                        // one its read returned may be a leftover the others never had.)
                        Ok(Response::Error(RpcError::VersionMismatch { current, behind: true })) => {
                            last = format!("node {node}: its copy is behind (at {current})");
                            refused_at.push(current);
                            if self.shared() || read_at.is_some() {
                                conflict = true;
                            } else {
                                failed.push(*node);
                                behind.push(*node);
                            }
                        }
                        // Another chain (a concurrent writer of a shared volume, or a leftover of
                        // a failed write): never acknowledged over it.
                        Ok(Response::Error(RpcError::VersionMismatch { current, behind: false })) => {
                            last = format!("node {node}: its copy is at {current}, not {expected:?}");
                            refused_at.push(current);
                            conflict = true;
                        }
                        // A full replica: the others may have applied it, so it is recorded as
                        // missed like any failure (replicas must not stay different), then the
                        // write fails with ENOSPC.
                        Ok(Response::Error(RpcError::NoSpace { .. })) => {
                            no_space = true;
                            last = format!("node {node}: no space left");
                            failed.push(*node);
                        }
                        Ok(Response::Error(RpcError::InvalidRequest { message })) => {
                            return Err(IoError::Invalid(message));
                        }
                        Ok(Response::Error(RpcError::Unavailable { message })) => {
                            last = format!("node {node}: {message}");
                            stale_map = true;
                        }
                        Ok(Response::Error(e)) => {
                            last = format!("node {node}: {e}");
                            failed.push(*node);
                        }
                        Ok(other) => {
                            last = format!("node {node}: unexpected reply {other:?}");
                            failed.push(*node);
                        }
                        Err(e) => {
                            last = e;
                            failed.push(*node);
                        }
                    }
                }
                applied_by.extend(ok.iter().copied());
                if fenced {
                    return Ok(Round::Settled);
                }
                if conflict {
                    let agreed = refused_at.first().copied().filter(|v| {
                        refused_at.len() == targets.len()
                            && refused_at.iter().all(|r| r == v)
                            && !v.is_installing()
                    });
                    match agreed {
                        // Every replica refused it from the same version (another writer's
                        // mutation went first everywhere): nothing to settle, do it again over it.
                        Some(v) => lock(&self.versions).set(chunk, Some(v)),
                        // The copies hold different chains: make them identical (the highest
                        // that may wins; no acknowledged mutation is lost), and the caller does
                        // it again over the result.
                        None => {
                            self.settle_chunk(chunk).await?;
                        }
                    }
                    return Ok(Round::Settled);
                }
                // Every replica is behind the version this writer's last acknowledged mutation
                // left — or more of them than may lack an acknowledged write (all of the holders
                // but R − q applied it), the others not answering: they lost it (every holder lost
                // power before a flush made it durable, which a power cut of every holder may do;
                // found by the production simulation, seed 114 226). They are not failing — none
                // is suspected — but this write, built on data that is gone, is not acknowledged:
                // it fails, and the next mutation of the chunk looks its version up again.
                let lost =
                    behind.len() == targets.len() || behind.len() > replicas.len().saturating_sub(need);
                if ok.is_empty() && !behind.is_empty() && lost {
                    lock(&self.versions).set(chunk, None);
                    return Err(IoError::Io(format!(
                        "chunk {chunk}: every replica lost this writer's last acknowledged, unflushed \
                         mutation of it ({last})"
                    )));
                }
                // Replicas that applied it record who did not: those known in advance were named in
                // the request itself (recorded durably before the reply); replicas that failed
                // during it are recorded here. Every applier must confirm before the mutation is
                // acknowledged: the catch-up relies on each of them holding the record.
                // A record is made only if the copy still holds this mutation (`at`): on a shared
                // volume another writer's reconciliation may have replaced it since it applied
                // (`moved`), and then it is not acknowledged but settled and done again.
                let mut recorded = true;
                let mut moved = false;
                // Only when enough applied it to acknowledge it: a record for an attempt applied
                // by fewer (its leftovers are settled like any failed write's) could face another
                // writer's acknowledged sibling whose appliers recorded this one — each side would
                // then refuse the other's copy for good.
                if ok.len() >= need && !failed.is_empty() {
                    let Recorded { confirmed, moved: refused, .. } = self
                        .record_missed(&ok, &failed, volume, chunk, chunk_size, (&applied_at, None))
                        .await;
                    moved = !refused.is_empty();
                    for node in ok.iter().filter(|n| !confirmed.contains(n) && !refused.contains_key(n)) {
                        recorded = false;
                        last = format!("node {node} could not record that node(s) {failed:?} missed a write");
                        self.suspect(*node, &last);
                    }
                }
                for node in &failed {
                    // The storage nodes' heartbeats report the missed write to the leader too;
                    // this only speeds things up.
                    self.suspect(*node, &format!("write to chunk {chunk} failed: {last}"));
                }
                if moved {
                    self.settle_chunk(chunk).await?;
                    return Ok(Round::Settled);
                }
                if no_space && recorded {
                    return Err(IoError::NoSpace);
                }
                // Acknowledged: all holders but R − q applied it (`write_quorum`), and every other replica is known not to have
                // (recorded as missed, so it is caught up before it serves reads again).
                if ok.len() >= need && !stale_map && recorded {
                    // Every applier reports the version it left (a trim of a chunk a replica
                    // does not hold leaves it at none); if they differ, look it up next time.
                    let at = (now_at.len() == 1).then(|| now_at.first().copied()).flatten();
                    lock(&self.versions).set(chunk, at);
                    // Marked for flushing once acknowledged (a flush covers the writes
                    // acknowledged before it was asked for; one that began while this was in
                    // flight may have reached the replicas first, and leaves the mark). A
                    // mutation that fails leaves none: a PG that lost its majority does not fail
                    // every later flush.
                    if let Some(pg) = map.pg(chunk) {
                        self.touched_pgs.touch(pg);
                    }
                    return Ok(Round::Done);
                }
            } else {
                last = format!(
                    "only {} of {} replicas of chunk {chunk} are in sync",
                    targets.len(),
                    replicas.len()
                );
            }
            if Instant::now() > deadline {
                // Not acknowledged, but applied on some replicas: the others (one that kept
                // answering that it does not serve, say) are recorded as having missed it, so that
                // they catch it up — nothing else would (the chunk is not dirty on them, and the
                // appliers' dirty flags may be cleared before anyone opens the volume again).
                let others: Vec<u64> =
                    self.map().replicas(chunk).into_iter().filter(|n| !applied_by.contains(n)).collect();
                if applied_by.len() >= self.map().quorum() && !others.is_empty() {
                    let on: Vec<u64> = applied_by.iter().copied().collect();
                    let _ = self
                        .record_missed(&on, &others, volume, chunk, chunk_size, (&BTreeMap::new(), None))
                        .await;
                }
                return Err(IoError::Io(format!(
                    "write to chunk {chunk} did not reach enough of its replicas (all but R − q of them): {last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = self.refresh().await;
        }
    }

    /// Has each node of `on` record that `peers` missed a write to `chunk` — where `at` names a
    /// node's version, only if its copy is still at it; with `settled`, as left out of the chunk's
    /// reconciliation by this writer's open of that generation (`Request::RecordMissed::settled`).
    /// Returns the nodes that recorded it, those whose copy had moved (refused with
    /// `VersionMismatch`: their version now) and those that did not answer.
    async fn record_missed(
        &self,
        on: &[u64],
        peers: &[u64],
        volume: VolumeId,
        chunk: u64,
        chunk_size: ChunkSize,
        (at, settled): (&BTreeMap<u64, Version>, Option<u64>),
    ) -> Recorded {
        let request = |node: u64| Request::RecordMissed {
            volume,
            chunk: ChunkIndex(chunk),
            chunk_size,
            peers: peers.to_vec(),
            at: at.get(&node).copied(),
            settled: settled.map(Generation),
        };
        let results = futures::future::join_all(on.iter().map(|n| {
            let r = request(*n);
            async move { self.call(*n, &r).await }
        }))
        .await;
        let mut recorded = Recorded::default();
        for (node, r) in on.iter().zip(results) {
            match r {
                Ok(Response::Done) => {
                    recorded.confirmed.insert(*node);
                }
                Ok(Response::Error(RpcError::VersionMismatch { current, .. })) => {
                    tracing::debug!(node, chunk, %current, "recording a missed write: the copy moved on");
                    recorded.moved.insert(*node, current);
                }
                Err(e) => {
                    tracing::warn!(node, chunk, "recording a missed write: {e}");
                    recorded.silent.insert(*node);
                }
                Ok(other) => tracing::warn!(node, chunk, "recording a missed write: {other:?}"),
            }
        }
        recorded
    }

    /// Makes every write acknowledged before it durable on a majority of each chunk's replicas.
    /// Only the PGs mutated since a flush last covered them are involved.
    pub async fn flush(&self) -> Result<(), IoError> {
        self.flush_only(None).await
    }

    /// A FUA mutation of `[offset, offset + len)`: makes it (and whatever else is pending in its
    /// chunks' PGs) durable, not every PG pending.
    async fn flush_range(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let map = self.map();
        let pgs: BTreeSet<u32> = self.pieces(offset, len).iter().filter_map(|p| map.pg(p.chunk)).collect();
        self.flush_only(Some(&pgs)).await
    }

    async fn flush_only(&self, only: Option<&BTreeSet<u32>>) -> Result<(), IoError> {
        let (volume, _) = self.ids()?;
        let covered = self.touched_pgs.pending(only);
        if covered.is_empty() {
            return Ok(());
        }
        let pgs: BTreeSet<u32> = covered.keys().copied().collect();
        self.flush_pgs(volume, &pgs).await?;
        // Durable: those not mutated again since this flush began are clean (the others stay).
        self.touched_pgs.flushed(&covered);
        Ok(())
    }

    async fn flush_pgs(&self, volume: VolumeId, pgs: &BTreeSet<u32>) -> Result<(), IoError> {
        let deadline = Instant::now() + self.config.io_timeout;
        loop {
            self.check_deleted()?;
            let map = self.map();
            // A node this client saw miss a write does not count, even before the map says so.
            let suspects: BTreeSet<u64> = lock(&self.suspects).keys().copied().collect();
            let nodes: BTreeSet<u64> = pgs
                .iter()
                .flat_map(|pg| map.replicas_of_pg(*pg))
                .filter(|n| map.in_sync(*n) && !suspects.contains(n))
                .collect();
            let request = Request::Flush { volume };
            let results = futures::future::join_all(nodes.iter().map(|n| self.call(*n, &request))).await;
            let flushed: BTreeSet<u64> = nodes
                .iter()
                .zip(results)
                .filter(|(_, r)| matches!(r, Ok(Response::Done)))
                .map(|(n, _)| *n)
                .collect();
            let all_pgs_durable = pgs.iter().all(|pg| {
                map.replicas_of_pg(*pg).iter().filter(|n| flushed.contains(n)).count() >= map.deciders(*pg)
            });
            if all_pgs_durable {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(IoError::Io("flush did not reach a majority of replicas".into()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = self.refresh().await;
        }
    }

    /// Allocation of `[offset, offset + len)`: runs of (length, is_hole), in order.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, IoError> {
        let (volume, chunk_size) = self.ids()?;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, hole: bool| match runs.last_mut() {
            Some((l, h)) if *h == hole => *l += n,
            _ => runs.push((n, hole)),
        };
        for p in self.pieces(offset, len) {
            let a0 = p.offset / BS * BS;
            let a1 = (p.offset + p.len).div_ceil(BS) * BS;
            let request = Request::Allocation {
                volume,
                chunk: ChunkIndex(p.chunk),
                chunk_size,
                offset: a0 as u32,
                len: (a1 - a0) as u32,
            };
            let map = self.map();
            let mut present = None;
            for node in map.replicas(p.chunk).into_iter().filter(|n| map.in_sync(*n)) {
                if let Ok(Response::Allocation { present: bits }) = self.call(node, &request).await {
                    present = Some(bits);
                    break;
                }
            }
            // Without an answer, report data: claiming a hole that is not one would lose data.
            let bits = present.unwrap_or_else(|| vec![true; ((a1 - a0) / BS) as usize]);
            for (i, b) in bits.iter().enumerate() {
                let block_start = a0 + i as u64 * BS;
                let s = block_start.max(p.offset);
                let e = (block_start + BS).min(p.offset + p.len);
                if e > s {
                    push(e - s, !b);
                }
            }
        }
        Ok(runs)
    }
}

/// Whether a read reply holds `len` bytes whose every block matches its checksum.
fn verified(data: &[u8], crcs: &[u32], len: u64) -> bool {
    data.len() as u64 == len
        && crcs.len() == data.len() / BS as usize
        && data.chunks_exact(BS as usize).zip(crcs).all(|(b, c)| crc32c(b) == *c)
}

/// Builds a volume's map from a pool view fetched no earlier than `fresher_than`; `known` is the
/// volume's description as of an epoch, reused if the view's epoch is the same.
async fn fetch_map(
    meta: &MetaClient,
    name: &str,
    fresher_than: Instant,
    known: Option<(u64, VolumeInfo)>,
) -> Result<VolumeMap, MetaClientError> {
    let view = meta.pool_view(fresher_than).await?;
    let (pgs, nodes) = (&view.pgs, &view.nodes);
    let volume = match known {
        Some((epoch, volume)) if epoch == pgs.epoch => volume,
        // The shared copy if it is as new as the view, else fetched after the view: at least as
        // new as its epoch.
        Some(_) => meta.volume_at(name, pgs.epoch).await?,
        None => meta.volume(name).await?,
    };
    // Route by the holders (a node that joined later holds nothing of a PG until it has been given
    // a copy); the target rows only for a pool whose metadata predates holders.
    let table = match pgs.holders.get(&volume.replicas) {
        Some(rows) => rows.clone(),
        None => {
            pgs.table.iter().map(|r| r.iter().take(usize::from(volume.replicas)).copied().collect()).collect()
        }
    };
    let backfill = pgs.backfill.get(&volume.replicas).cloned().unwrap_or_default();
    // Every mutation carries its PG's interval: without them (a leader of an older version) every
    // one would be refused as "stale cluster map"; say so instead.
    let intervals = match pgs.intervals.get(&volume.replicas) {
        Some(rows) => rows.clone(),
        None if pgs.holders.contains_key(&volume.replicas) => {
            return Err(MetaClientError::Failed(
                "the metadata leader does not report PG intervals (/v1/pgs): it runs an older Cairn; \
                 every node and client of a pool must run the same version"
                    .into(),
            ));
        }
        None => Vec::new(),
    };
    Ok(VolumeMap {
        volume,
        epoch: pgs.epoch,
        pg_count: pgs.pg_count,
        table,
        backfill,
        intervals,
        nodes: nodes.iter().map(|n| (n.id, n.clone())).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(generation: u64, seq: u64, missed_by: &[u64]) -> ChunkInfo {
        ChunkInfo {
            generation: Generation(generation),
            version: 1,
            last_sequence: seq,
            dirty: true,
            missed_by: missed_by.to_vec(),
            fence: Generation(generation),
            serving: true,
        }
    }

    #[test]
    fn copies_recorded_as_missed_or_half_installed_never_win() {
        // Nodes 1 and 2 hold an acknowledged write (3.5) that node 3 missed; node 3 holds a
        // sibling with a higher number (3.9, another shared writer's, never acknowledged).
        let infos: BTreeMap<u64, ChunkInfo> =
            [(1, info(3, 5, &[3])), (2, info(3, 5, &[3])), (3, info(3, 9, &[]))].into();
        assert_eq!(may_win(&infos), [1, 2].into());
        let versions = infos.iter().map(|(n, i)| (*n, i.chunk_version())).collect();
        let (winner, installs) = settle(&versions, &may_win(&infos), None).unwrap();
        assert!(winner == 1 || winner == 2);
        assert_eq!(installs.len(), 1);
        assert_eq!(installs[0].node, 3, "the missed copy gets the acknowledged one");
        // A half-installed copy (its marker sorts below every version of a writer) never wins.
        let marker = Version::installing(Version { generation: 3, seq: 5 });
        let half = ChunkInfo { generation: Generation(0), last_sequence: marker.seq, ..info(0, 0, &[]) };
        let infos: BTreeMap<u64, ChunkInfo> = [(1, info(0, 0, &[])), (2, half)].into();
        assert_eq!(may_win(&infos), [1].into());
    }
}
