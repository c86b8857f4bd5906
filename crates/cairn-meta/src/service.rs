//! [`MetaService`]: the metadata API the rest of Cairn uses, over one openraft instance.
//!
//! Writes are proposed through Raft and return once committed and applied (bounded by
//! `propose_timeout`: without a quorum they fail with [`MetaError::NoQuorum`] rather than hang).
//! Reads that must be current go through [`MetaService::linearizable`] first.
//!
//! The leader also runs the pool's housekeeping, each step a committed command:
//! * on taking office, it records `LeaderElected` and gives every node a fresh grace period;
//! * it registers every member of the Raft membership that the cluster map lacks (bootstrap voters
//!   and joined learners);
//! * it marks a node down when no heartbeat arrived for `down_after_ms`, and up when one arrives.
//!
//! Every node sends a heartbeat (liveness, capacity, usage) to the leader every
//! `heartbeat_interval_ms`; usage is kept in the leader's memory, not in the log.

use crate::Raft;
use crate::network::{Network, NodeReport, PeerError, PeerReply, PeerRequest, PeerTransport};
use crate::state::{ClusterState, Command, CommandResult, NodeAddr, StateError};
use crate::storage::{LogStore, StateMachineStore, open_db};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ServerState, SnapshotPolicy};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
// tokio's clock, so that a simulation (turmoil) controls liveness timing too.
use tokio::time::Instant;

/// A learner is promoted to voter only when its log is at most this many entries behind the
/// leader's.
const PROMOTE_LAG_MAX: u64 = 20;

/// Tunables of the metadata service.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    /// A node silent this long is marked down (default 5000 ms).
    pub down_after_ms: u64,
    /// How often nodes report to the leader (default 1000 ms).
    pub heartbeat_interval_ms: u64,
    /// Longest wait for a proposal to commit before answering "no quorum" (default 5 s).
    pub propose_timeout: Duration,
    /// Raft heartbeat (ms); elections start after 4–8 missed heartbeats.
    pub raft_heartbeat_ms: u64,
}

impl Default for MetaConfig {
    fn default() -> Self {
        MetaConfig {
            down_after_ms: 5000,
            heartbeat_interval_ms: 1000,
            propose_timeout: Duration::from_secs(5),
            raft_heartbeat_ms: 250,
        }
    }
}

/// Why a metadata operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetaError {
    #[error("this node is not the metadata leader")]
    NotLeader { leader: Option<(u64, NodeAddr)> },
    #[error("no quorum: {0}")]
    NoQuorum(String),
    #[error("{0}")]
    Rejected(#[from] StateError),
    #[error("metadata service failed: {0}")]
    Internal(String),
    /// The request is not possible in the pool's current state (the message says why and what to
    /// do).
    #[error("{0}")]
    Refused(String),
}

/// What a node measures for its heartbeats.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// Peers this node holds missed writes for.
    pub missed_for: Vec<u64>,
    /// Peers this node holds only seeds' entries for (their fill's; see `cairn_node::missed`).
    pub seeded_for: Vec<u64>,
    /// The map epoch as of which this node has seeded every backfill member of the PGs it holds
    /// (recorded its chunks of them as missed by the member).
    pub seeded_epoch: u64,
}

/// Measures the node's capacity, usage and pending catch-up work, for its heartbeats.
pub type UsageProbe = Arc<dyn Fn() -> Probe + Send + Sync>;

#[derive(Debug, Default)]
struct Liveness {
    last_seen: HashMap<u64, Instant>,
    usage: HashMap<u64, NodeReport>,
    /// Term in which this node last took office (to run the take-office steps once).
    led_term: Option<u64>,
    /// When each catching-up node started catching up, and its boot id then: a restart while
    /// catching up starts the wait again (peers' reports from before it prove nothing about it).
    catching_since: HashMap<u64, (Instant, u64, u64)>,
    /// Nodes in sync but not serving (their serving barrier up), and since when.
    not_serving_since: HashMap<u64, Instant>,
    /// Nodes sent back to catching up because they did not serve, and how many times in a row
    /// (until they serve): each time their next catch-up ends later ([`stuck_backoff`]).
    stuck: HashMap<u64, u32>,
    /// Per node being filled (backfill member of some PGs): those PGs, and the map epoch and time
    /// when the leader first saw exactly them. Its holders must have seeded them from a map at
    /// least that new, and reported since, before it is admitted.
    backfill_seen: HashMap<u64, BackfillSeen>,
}

/// See [`Liveness::backfill_seen`]: (replica count, PG) pairs, map epoch, time.
type BackfillSeen = (Vec<(u8, u32)>, u64, Instant);

/// The metadata service of one node.
pub struct MetaService<T: PeerTransport> {
    id: u64,
    addr: NodeAddr,
    raft: Raft,
    sm: StateMachineStore,
    transport: T,
    config: MetaConfig,
    liveness: Mutex<Liveness>,
    usage_probe: UsageProbe,
    boot_id: u64,
    /// The `in_sync_epoch` of this node for which enough PG peers were seen with a map at least as
    /// new (see [`MetaService::serves_clients`]).
    serving_from: Mutex<u64>,
    /// This node's read leases: the `in_sync_epoch` they were granted for, and per granting peer
    /// when the request it granted left (valid [`LEASE`] from then).
    leases: Mutex<(u64, HashMap<u64, Instant>)>,
    /// When this node last granted each peer a lease.
    granted: Mutex<HashMap<u64, Instant>>,
    /// When this process started: a lease it granted before a restart is not in `granted`.
    started: Instant,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl<T: PeerTransport> std::fmt::Debug for MetaService<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaService").field("id", &self.id).field("addr", &self.addr).finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn lock<X>(m: &Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T: PeerTransport> MetaService<T> {
    /// Opens the metadata database at `db_path` and starts this node's Raft instance and background
    /// tasks. The node serves peers as soon as this returns; call [`Self::bootstrap`] or
    /// [`Self::join`] to become part of a pool.
    pub async fn start(
        id: u64,
        addr: NodeAddr,
        db_path: &Path,
        transport: T,
        config: MetaConfig,
        usage_probe: UsageProbe,
    ) -> Result<Arc<Self>, MetaError> {
        // A damaged database file can make redb panic instead of returning an error: opening it is
        // guarded, so the node exits with one clear line instead of a backtrace.
        let opened = crate::storage::guard_panics(|| {
            let db = open_db(db_path).map_err(|e| e.to_string())?;
            let sm = StateMachineStore::open(db.clone()).map_err(|e| e.to_string())?;
            Ok((db, sm))
        });
        let (db, sm) = opened.map_err(|e| {
            MetaError::Internal(format!(
                "{} is damaged or unreadable ({e}); this node's metadata cannot be loaded. Move the file \
                 aside and rebuild it from the pool (see the operations guide, \"Rebuilding a node's metadata\")",
                db_path.display()
            ))
        })?;
        let log = LogStore::new(db.clone());
        let raft_config = openraft::Config {
            cluster_name: "cairn".into(),
            heartbeat_interval: config.raft_heartbeat_ms,
            election_timeout_min: config.raft_heartbeat_ms * 4,
            election_timeout_max: config.raft_heartbeat_ms * 8,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(500),
            max_in_snapshot_log_to_keep: 100,
            snapshot_max_chunk_size: crate::network::SNAPSHOT_CHUNK_MAX_BYTES,
            ..Default::default()
        };
        let raft_config = Arc::new(raft_config.validate().map_err(|e| MetaError::Internal(e.to_string()))?);
        let raft = Raft::new(id, raft_config, Network { transport: transport.clone() }, log, sm.clone())
            .await
            .map_err(|e| MetaError::Internal(e.to_string()))?;
        let service = Arc::new(MetaService {
            id,
            addr,
            raft,
            sm,
            transport,
            config,
            liveness: Mutex::new(Liveness::default()),
            usage_probe,
            // Distinct for every start of the process (nanoseconds since the epoch, never 0).
            boot_id: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                .max(1),
            serving_from: Mutex::new(0),
            leases: Mutex::new((0, HashMap::new())),
            started: Instant::now(),
            granted: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        });
        let leader_task = tokio::spawn(leader_loop(Arc::downgrade(&service)));
        let heartbeat_task = tokio::spawn(heartbeat_loop(Arc::downgrade(&service)));
        let barrier_task = tokio::spawn(lease_loop(Arc::downgrade(&service)));
        lock(&service.tasks).extend([leader_task, heartbeat_task, barrier_task]);
        Ok(service)
    }

    /// Stops Raft and the background tasks.
    pub async fn shutdown(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        let _ = self.raft.shutdown().await;
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn addr(&self) -> &NodeAddr {
        &self.addr
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Forms a new pool from `voters` if this node has never been part of one. Only the voter with
    /// the lowest id initialises Raft; the others wait to be contacted. Idempotent.
    pub async fn bootstrap(&self, voters: BTreeMap<u64, NodeAddr>) -> Result<(), MetaError> {
        let initialized = self.raft.is_initialized().await.map_err(|e| MetaError::Internal(e.to_string()))?;
        if initialized || voters.keys().next() != Some(&self.id) {
            return Ok(());
        }
        match self.raft.initialize(voters).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(MetaError::Internal(e.to_string())),
        }
    }

    /// Whether this node is a member (voter or learner) of the metadata group.
    pub fn is_member(&self) -> bool {
        self.raft.metrics().borrow().membership_config.membership().get_node(&self.id).is_some()
    }

    /// Asks the pool reachable at any of `seeds` to add this node. Follows "not the leader" answers;
    /// returns once the leader accepted the request.
    pub async fn join(&self, seeds: &[NodeAddr]) -> Result<(), MetaError> {
        let mut last = String::from("no seed addresses");
        let mut targets: Vec<NodeAddr> = seeds.to_vec();
        for _ in 0..8 {
            let mut next = Vec::new();
            for seed in &targets {
                let req = PeerRequest::Join { id: self.id, addr: self.addr.clone() };
                match self.transport.call(seed, req, Duration::from_secs(10)).await {
                    Ok(PeerReply::Join(Ok(()))) => return Ok(()),
                    Ok(PeerReply::Join(Err(PeerError::NotLeader { leader: Some(l) }))) => next.push(l),
                    Ok(PeerReply::Join(Err(e))) => last = e.to_string(),
                    Ok(_) => last = "unexpected reply".into(),
                    Err(e) => last = e,
                }
            }
            if next.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                next = seeds.to_vec();
            }
            targets = next;
        }
        Err(MetaError::NoQuorum(format!("could not join the pool: {last}")))
    }

    /// Makes node `id` a metadata voter (`voter`) or a learner, on the leader. A learner is promoted
    /// only once it holds the metadata log up to within a few entries of the leader's (else its
    /// votes would slow every commit); the last voter is never demoted. Both are Raft membership
    /// changes (joint consensus), so a majority of the voters before *and* after must be up.
    pub async fn set_voter(&self, id: u64, voter: bool) -> Result<(), MetaError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        if membership.get_node(&id).is_none() {
            return Err(MetaError::Refused(format!("node {id} is not a member of the metadata group")));
        }
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        if voters.contains(&id) == voter {
            return Ok(());
        }
        let change = if voter {
            let last = metrics.last_log_index.unwrap_or(0);
            let matched = metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|l| l.index)
                .unwrap_or(0);
            if matched + PROMOTE_LAG_MAX < last {
                return Err(MetaError::Refused(format!(
                    "node {id} holds the metadata log up to entry {matched} of {last}: it is not caught up \
                     (is it running?); try again when it is"
                )));
            }
            openraft::ChangeMembers::AddVoterIds([id].into())
        } else {
            if voters.len() <= 1 {
                return Err(MetaError::Refused(format!("node {id} is the only metadata voter")));
            }
            openraft::ChangeMembers::RemoveVoters([id].into())
        };
        // `retain`: a demoted voter stays a learner (it keeps receiving the log).
        let r = tokio::time::timeout(self.config.propose_timeout, self.raft.change_membership(change, true))
            .await;
        match r {
            Err(_) => Err(MetaError::NoQuorum(format!(
                "the membership change was not committed within {:?}: a majority of the voters before \
                 and after the change must be up",
                self.config.propose_timeout
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(self.not_leader()),
            Ok(Err(RaftError::APIError(e))) => Err(MetaError::Refused(e.to_string())),
            Ok(Err(RaftError::Fatal(e))) => Err(MetaError::Internal(e.to_string())),
        }
    }

    /// The current leader, as this node knows it.
    pub fn leader(&self) -> Option<(u64, NodeAddr)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id).cloned()?;
        Some((id, addr))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// The current Raft term.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Reads the locally applied state (may lag the leader; see [`Self::linearizable`]).
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        let d = self.sm.data.read().unwrap_or_else(|p| p.into_inner());
        f(&d.cluster)
    }

    /// Waits until this node, as leader, has confirmed its leadership with a quorum and applied
    /// everything committed before the call: reads after it see every earlier write.
    pub async fn linearizable(&self) -> Result<(), MetaError> {
        let r = tokio::time::timeout(self.config.propose_timeout, self.raft.ensure_linearizable()).await;
        match r {
            Err(_) => Err(MetaError::NoQuorum(format!(
                "the leader could not reach a majority of the metadata voters within {:?}",
                self.config.propose_timeout
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(_)))) => {
                Err(self.not_leader())
            }
            Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::QuorumNotEnough(q)))) => {
                let got: Vec<String> = q.got.iter().map(|n| n.to_string()).collect();
                Err(MetaError::NoQuorum(format!(
                    "the leader reached only node(s) {} of the metadata voters, not a majority",
                    got.join(", ")
                )))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(MetaError::Internal(e.to_string())),
        }
    }

    fn not_leader(&self) -> MetaError {
        match self.leader() {
            Some((id, _)) if id == self.id => MetaError::NoQuorum("leadership is changing".into()),
            leader => MetaError::NotLeader { leader },
        }
    }

    /// Commits `command` and returns its result. Rejections come back as [`MetaError::Rejected`].
    pub async fn propose(&self, command: Command) -> Result<CommandResult, MetaError> {
        let r = tokio::time::timeout(self.config.propose_timeout, self.raft.client_write(command)).await;
        match r {
            Err(_) => Err(MetaError::NoQuorum(format!(
                "the change was not committed within {:?}: fewer than a majority of the metadata voters are reachable",
                self.config.propose_timeout
            ))),
            Ok(Ok(resp)) => match resp.data {
                CommandResult::Rejected(e) => Err(MetaError::Rejected(e)),
                other => Ok(other),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(self.not_leader()),
            Ok(Err(RaftError::APIError(e))) => Err(MetaError::Internal(e.to_string())),
            Ok(Err(RaftError::Fatal(e))) => Err(MetaError::Internal(e.to_string())),
        }
    }

    /// The latest report of a node's capacity and usage (known on the leader).
    pub fn usage(&self, id: u64) -> Option<NodeReport> {
        lock(&self.liveness).usage.get(&id).cloned()
    }

    /// This process's boot id.
    pub fn boot_id(&self) -> u64 {
        self.boot_id
    }

    /// Whether this node may serve client IO: the cluster map knows its current process and it is
    /// not catching up.
    ///
    /// After catching up, only once enough of its PG peers have applied a map in which it is in
    /// sync: until then a peer with an older map could still take a write that names this node as
    /// having missed it (recorded for a copy that comes later), and a read here would miss that
    /// write. A write is acknowledged only if every replica it went to took it, at least a quorum
    /// q of the R; so once, in every PG, R − q peers have the new map, any such write meets one of
    /// them and is refused.
    pub fn serves_clients(&self) -> bool {
        let in_sync_epoch = self.read(|s| {
            s.nodes
                .get(&self.id)
                .filter(|n| n.boot_id == self.boot_id && n.in_sync())
                .map(|n| n.in_sync_epoch)
        });
        in_sync_epoch.is_some_and(|e| e == 0 || *lock(&self.serving_from) == e)
    }

    /// Whether this node may serve client reads of a PG whose other holders are `others`, of which
    /// `need` must vouch for it: it serves clients (above) and holds a read lease from at least
    /// `need` of them for its current `in_sync_epoch`. A lease, renewed every ~0.5 s, lasts
    /// [`LEASE`] from when its request left, and is granted only by a peer whose map shows this
    /// node in sync (at that epoch) and that holds no write recorded as missed by it. With R copies
    /// `need` is R − q (q = ⌊R/2⌋ + 1): a write acknowledged without this node was applied — and
    /// recorded as missed by it — by at least q of the R, so every R − q of the others hold one of
    /// them, and each of those holds its acknowledgement back until [`LEASE_HOLDBACK`] after the
    /// last lease it granted this node ([`Self::lease_holdback`]). So once such a write is
    /// acknowledged this node's lease for that PG has run out: a node cut off from the pool, still
    /// reachable by some client, stops serving reads before it can serve stale ones. Leases are
    /// per PG: losing the peers of some PGs does not stop reads of the others.
    pub fn lease_covers(&self, others: &[u64], need: usize) -> bool {
        if need == 0 {
            return self.serves_clients();
        }
        if !self.serves_clients() {
            return false;
        }
        let Some(in_sync_epoch) = self.read(|s| s.nodes.get(&self.id).map(|n| n.in_sync_epoch)) else {
            return false;
        };
        let leases = lock(&self.leases);
        if leases.0 != in_sync_epoch {
            return false;
        }
        let now = Instant::now();
        others.iter().filter(|p| leases.1.get(p).is_some_and(|t| *t + LEASE > now)).count() >= need
    }

    /// Whether this node serves reads of *every* PG it holds (`/v1/status serving_clients`).
    pub fn serves_reads(&self) -> bool {
        let Some(needs) = self.lease_needs() else { return false };
        needs.iter().all(|(others, need)| self.lease_covers(others, *need))
    }

    /// How long a mutation recorded here as missed by `peers` must still be held back before it
    /// is acknowledged: until [`LEASE_HOLDBACK`] after this node last granted any of them a lease
    /// (or after this process started: grants made before a restart are forgotten). The missed
    /// write must be recorded *before* this is asked: a lease request answered after the record
    /// is refused, one granted before it is counted here (both under the `granted` lock).
    pub fn lease_holdback(&self, peers: &[u64]) -> Duration {
        let granted = lock(&self.granted);
        let now = Instant::now();
        peers
            .iter()
            .map(|p| granted.get(p).copied().unwrap_or(self.started).max(self.started))
            .map(|t| (t + LEASE_HOLDBACK).saturating_duration_since(now))
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Answers a peer's lease request (see [`Self::lease_covers`]).
    fn grant_lease(&self, id: u64, in_sync_epoch: u64) -> bool {
        let in_sync =
            self.read(|s| s.nodes.get(&id).is_some_and(|n| n.in_sync() && n.in_sync_epoch == in_sync_epoch));
        if !in_sync {
            tracing::debug!(
                node = id,
                "read lease refused: not in sync at epoch {in_sync_epoch} in this map"
            );
            return false;
        }
        // Under the `granted` lock: a write recorded before this look makes it a refusal; one
        // recorded after it finds this grant when it asks how long to hold back.
        let mut granted = lock(&self.granted);
        if (self.usage_probe)().missed_for.contains(&id) {
            tracing::debug!(node = id, "read lease refused: this node holds writes it missed");
            return false;
        }
        granted.insert(id, Instant::now());
        true
    }

    /// Per PG this node holds (if it is in sync for this process): its other holders, and how
    /// many of them must grant it a lease.
    fn lease_needs(&self) -> Option<Vec<(Vec<u64>, usize)>> {
        let me = self.id;
        self.read(|s| {
            s.nodes.get(&me).filter(|n| n.boot_id == self.boot_id && n.in_sync())?;
            Some(
                s.pg_sets
                    .keys()
                    .flat_map(|r| (0..s.pg_count).map(move |pg| (*r, pg)))
                    .filter_map(|(r, pg)| {
                        let holders = s.holders(r, pg);
                        let need = lease_need(r, holders.len());
                        holders
                            .contains(&me)
                            .then(|| (holders.into_iter().filter(|p| *p != me).collect(), need))
                    })
                    .collect(),
            )
        })
    }

    /// One round of this node's read leases: while this node is in sync, every [`LEASE_RENEW`] it
    /// asks its PG peers (those up in its map) to grant it a lease again; the first time the
    /// grants cover every PG it holds after a catch-up, the serving barrier lifts (writes are
    /// served from then on).
    async fn renew_lease(&self) {
        let me = self.id;
        let Some(needs) = self.lease_needs() else { return };
        let Some(in_sync_epoch) = self.read(|s| s.nodes.get(&me).map(|n| n.in_sync_epoch)) else { return };
        let now = Instant::now();
        {
            let leases = lock(&self.leases);
            let fresh = leases.0 == in_sync_epoch
                && !leases.1.is_empty()
                && leases.1.values().all(|t| *t + LEASE_RENEW > now);
            let barrier_down = in_sync_epoch != 0 && *lock(&self.serving_from) != in_sync_epoch;
            if fresh && !barrier_down {
                return;
            }
        }
        // Every other node up in the map is asked, not only today's PG peers: a PG set created a
        // moment ago (the first volume with its number of copies) is then covered at once.
        // (Peers the map shows down are not asked: they cannot answer, and take no writes.)
        let addrs: Vec<(u64, NodeAddr)> = self.read(|s| {
            s.nodes.values().filter(|n| n.id != me && n.up).map(|n| (n.id, n.addr.clone())).collect()
        });
        let sent = Instant::now();
        let request = PeerRequest::Lease { id: me, in_sync_epoch };
        let replies = futures::future::join_all(
            addrs.iter().map(|(_, addr)| self.transport.call(addr, request.clone(), LEASE_CALL_TIMEOUT)),
        )
        .await;
        let granted: BTreeSet<u64> = addrs
            .iter()
            .zip(replies)
            .filter_map(|((id, _), r)| matches!(r, Ok(PeerReply::Lease(true))).then_some(*id))
            .collect();
        {
            let mut leases = lock(&self.leases);
            if leases.0 != in_sync_epoch {
                *leases = (in_sync_epoch, HashMap::new());
            }
            for id in &granted {
                leases.1.insert(*id, sent);
            }
            // A refusal ends that peer's lease at once (it may hold a write this node missed), and
            // only peers asked this round are kept (one gone down would look stale forever).
            leases.1.retain(|id, _| granted.contains(id));
        }
        if !barrier_lifted(&needs, &granted) {
            return;
        }
        let mut serving_from = lock(&self.serving_from);
        if in_sync_epoch != 0 && *serving_from != in_sync_epoch {
            tracing::info!(
                epoch = in_sync_epoch,
                "serving client IO: enough peers have the map in which this node is in sync"
            );
            *serving_from = in_sync_epoch;
        }
    }

    /// Milliseconds since the leader last heard from a node.
    pub fn silent_ms(&self, id: u64) -> Option<u64> {
        lock(&self.liveness).last_seen.get(&id).map(|t| t.elapsed().as_millis() as u64)
    }

    /// Handles a request from a peer.
    pub async fn handle_peer(&self, request: PeerRequest) -> PeerReply {
        match request {
            PeerRequest::AppendEntries(r) => PeerReply::AppendEntries(self.raft.append_entries(r).await),
            PeerRequest::Vote(r) => PeerReply::Vote(self.raft.vote(r).await),
            PeerRequest::InstallSnapshot(r) => {
                PeerReply::InstallSnapshot(self.raft.install_snapshot(r).await)
            }
            PeerRequest::Heartbeat(report) => {
                if !self.is_leader() {
                    return PeerReply::Heartbeat(Err(PeerError::NotLeader {
                        leader: self.leader().map(|l| l.1),
                    }));
                }
                self.record_heartbeat(report);
                PeerReply::Heartbeat(Ok(()))
            }
            PeerRequest::Probe => PeerReply::Probe(self.report()),
            PeerRequest::Lease { id, in_sync_epoch } => PeerReply::Lease(self.grant_lease(id, in_sync_epoch)),
            PeerRequest::Join { id, addr } => {
                if !self.is_leader() {
                    return PeerReply::Join(Err(PeerError::NotLeader { leader: self.leader().map(|l| l.1) }));
                }
                let is_voter =
                    self.raft.metrics().borrow().membership_config.membership().voter_ids().any(|v| v == id);
                if is_voter {
                    // Only a node that lost its metadata asks to join while it is a member; a voter
                    // that forgot its votes must not vote again before it is demoted.
                    return PeerReply::Join(Err(PeerError::Failed(format!(
                        "node {id} is a metadata voter: a voter that lost its metadata must first be demoted \
                         (cairn node demote {id}; see the operations guide, \"Rebuilding a node's metadata\")"
                    ))));
                }
                let r =
                    tokio::time::timeout(self.config.propose_timeout, self.raft.add_learner(id, addr, false))
                        .await;
                PeerReply::Join(match r {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(PeerError::Failed(e.to_string())),
                    Err(_) => Err(PeerError::Failed("adding the node did not commit in time".into())),
                })
            }
        }
    }

    fn record_heartbeat(&self, report: NodeReport) {
        let mut l = lock(&self.liveness);
        l.last_seen.insert(report.id, Instant::now());
        l.usage.insert(report.id, report);
    }

    /// One round of the leader's housekeeping (see the module documentation).
    async fn lead(&self) -> Result<(), MetaError> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            lock(&self.liveness).led_term = None;
            return Ok(());
        }
        let term = metrics.current_term;
        let took_office = {
            let mut l = lock(&self.liveness);
            if l.led_term != Some(term) {
                // A new leader has not heard anyone yet: everyone starts a fresh grace period.
                let now = Instant::now();
                let ids: Vec<u64> = self.read(|s| s.nodes.keys().copied().collect());
                for id in ids {
                    l.last_seen.insert(id, now);
                }
                // Reports and catch-up clocks from an earlier term prove nothing now: a node
                // caught up only on reports received in this term.
                l.usage.clear();
                l.catching_since.clear();
                l.backfill_seen.clear();
                true
            } else {
                false
            }
        };
        if took_office {
            self.propose(Command::LeaderElected { id: self.id, term, time_ms: now_ms() }).await?;
            lock(&self.liveness).led_term = Some(term);
        }
        // Register members the cluster map lacks (or whose addresses changed).
        let membership = metrics.membership_config.membership().clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let missing: Vec<(u64, NodeAddr)> = self.read(|s| {
            membership
                .nodes()
                .filter(|(id, addr)| {
                    s.nodes.get(id).is_none_or(|n| n.addr != **addr || n.voter != voters.contains(id))
                })
                .map(|(id, addr)| (*id, addr.clone()))
                .collect()
        });
        for (id, addr) in missing {
            let capacity_bytes = self.usage(id).map(|u| u.capacity_bytes).unwrap_or(0);
            let voter = voters.contains(&id);
            lock(&self.liveness).last_seen.entry(id).or_insert_with(Instant::now);
            self.propose(Command::RegisterNode { id, addr, voter, capacity_bytes, time_ms: now_ms() })
                .await?;
        }
        // Liveness verdicts.
        let changes: Vec<(u64, bool)> = {
            let l = lock(&self.liveness);
            self.read(|s| {
                s.nodes
                    .values()
                    .filter_map(|n| {
                        let silent = if n.id == self.id {
                            0
                        } else {
                            l.last_seen.get(&n.id).map(|t| t.elapsed().as_millis() as u64).unwrap_or(u64::MAX)
                        };
                        let up = silent < self.config.down_after_ms;
                        (up != n.up).then_some((n.id, up))
                    })
                    .collect()
            })
        };
        self.track_catch_up().await?;
        for (id, up) in changes {
            if up {
                tracing::info!(node = id, "node is up");
            } else {
                tracing::warn!(node = id, "node is down: no heartbeat for {} ms", self.config.down_after_ms);
            }
            self.propose(Command::SetNodeLiveness { id, up, time_ms: now_ms() }).await?;
        }
        Ok(())
    }

    fn report(&self) -> NodeReport {
        // The epoch first: what the report says was true of a map at least this new.
        let epoch = self.read(|s| s.epoch);
        let p = (self.usage_probe)();
        NodeReport {
            id: self.id,
            boot_id: self.boot_id,
            capacity_bytes: p.capacity_bytes,
            used_bytes: p.used_bytes,
            missed_for: p.missed_for,
            seeded_for: p.seeded_for,
            seeded_epoch: p.seeded_epoch,
            epoch,
            serving: self.serves_clients(),
        }
    }

    /// Boot ids and catch-up: record restarts; end a node's catch-up once every up peer has
    /// reported since it started catching up and none holds writes it missed.
    async fn track_catch_up(&self) -> Result<(), MetaError> {
        let (boots, finished) = {
            let mut l = lock(&self.liveness);
            let now = Instant::now();
            self.read(|s| {
                let boots: Vec<(u64, u64)> = l
                    .usage
                    .values()
                    .filter(|r| s.nodes.get(&r.id).is_some_and(|n| n.boot_id != r.boot_id))
                    .map(|r| (r.id, r.boot_id))
                    .collect();
                let mut finished = Vec::new();
                let catching: Vec<u64> =
                    s.nodes.values().filter(|n| n.up && n.catching_up).map(|n| n.id).collect();
                l.catching_since.retain(|id, _| catching.contains(id));
                // The PGs each node is being filled with, and since when exactly those.
                let mut filling: HashMap<u64, Vec<(u8, u32)>> = HashMap::new();
                for (r, set) in &s.pg_sets {
                    for pg in 0..set.len() as u32 {
                        for x in s.backfill(*r, pg) {
                            filling.entry(x).or_default().push((*r, pg));
                        }
                    }
                }
                l.backfill_seen.retain(|id, (pgs, ..)| filling.get(id) == Some(pgs));
                for (id, pgs) in filling {
                    l.backfill_seen.entry(id).or_insert((pgs, s.epoch, now));
                }
                for id in catching {
                    let boot = s.nodes.get(&id).map(|n| n.boot_id).unwrap_or(0);
                    // (When it began, for which process, and the map epoch that shows it.)
                    let entry = l.catching_since.entry(id).or_insert((now, boot, s.epoch));
                    if entry.1 != boot {
                        *entry = (now, boot, s.epoch);
                    }
                    let (since, catching_epoch) = (entry.0, entry.2);
                    let booted = l
                        .usage
                        .get(&id)
                        .is_some_and(|r| Some(r.boot_id) == s.nodes.get(&id).map(|n| n.boot_id));
                    let peers_done = s.nodes.values().filter(|p| p.up && p.id != id).all(|p| {
                        let fresh = l.last_seen.get(&p.id).is_some_and(|t| *t > since) || p.id == self.id;
                        let pending = l.usage.get(&p.id).is_some_and(|r| r.missed_for.contains(&id));
                        fresh && !pending
                    });
                    // Per PG it holds: enough of the other holders have reported since its
                    // catch-up began and hold nothing for it that every write it missed is known
                    // to have been copied. A write acknowledged without it was applied by at least
                    // a majority q of the R holders, all among the R − 1 others, each recording it
                    // durably before the acknowledgement; so any R − q such peers cover every one.
                    // Peers that are down count for nothing: two failures in sequence must not let
                    // a node that missed writes serve its old copy (it waits for them instead).
                    let covered = s.pg_sets.keys().all(|r| {
                        (0..s.pg_count).all(|pg| {
                            let holders = s.holders(*r, pg);
                            if !holders.contains(&id) {
                                return true;
                            }
                            // Of its holders − 1 others, at least q applied every such write:
                            // any holders − q of them include one. (Not R − q: a PG that took in
                            // a filled node has more holders than R.)
                            let need = lease_need(*r, holders.len());
                            let good = holders
                                .iter()
                                .filter(|p| **p != id)
                                .filter(|p| {
                                    let up = s.nodes.get(p).is_some_and(|n| n.up);
                                    let fresh =
                                        l.last_seen.get(p).is_some_and(|t| *t > since) || **p == self.id;
                                    let pending = l.usage.get(p).is_some_and(|r| r.missed_for.contains(&id));
                                    up && fresh && !pending
                                })
                                .count();
                            good >= need
                        })
                    });
                    // Being filled: every PG it is a backfill member of must have been seeded,
                    // from a map that shows it so, by every up holder (each recorded its chunks
                    // of the PG as missed by it; every mutation applied there since is recorded
                    // too), and each such holder has reported since and holds nothing for it,
                    // with at least holders − q + 1 of them in sync: a write acknowledged without
                    // it was applied by at least q of the holders, so one of those covers it.
                    let filled = match l.backfill_seen.get(&id) {
                        None => true,
                        Some((pgs, seen_epoch, seen_at)) => pgs.iter().all(|(r, pg)| {
                            let holders = s.holders(*r, *pg);
                            let need = holders.len().saturating_sub(usize::from(*r) / 2 + 1) + 1;
                            let mut good = 0;
                            for p in &holders {
                                let Some(n) = s.nodes.get(p).filter(|n| n.up) else { continue };
                                let fresh = l.last_seen.get(p).is_some_and(|t| *t > since.max(*seen_at))
                                    || *p == self.id;
                                let Some(r) = l.usage.get(p) else { return false };
                                let holds = r.missed_for.contains(&id) || r.seeded_for.contains(&id);
                                if !fresh || r.seeded_epoch < *seen_epoch || holds {
                                    return false;
                                }
                                if n.in_sync() {
                                    good += 1;
                                }
                            }
                            good >= need
                        }),
                    };
                    let self_pending = l.usage.get(&self.id).is_some_and(|r| r.missed_for.contains(&id));
                    // The node itself may hold chunks to pull back (after a power loss, or chunks
                    // changed lately that differ from its peers'): its report must come from a
                    // map that shows it catching up (it compares only then), and say nothing is
                    // left.
                    let own_pending = l
                        .usage
                        .get(&id)
                        .is_none_or(|r| r.epoch < catching_epoch || r.missed_for.contains(&id));
                    // A node that was in sync without serving (its barrier could not lift)
                    // waits longer each time before it is in sync again, instead of flipping
                    // every few seconds while whatever keeps it from its peers lasts.
                    let backoff = stuck_backoff(l.stuck.get(&id).copied().unwrap_or(0));
                    if booted
                        && since.elapsed() >= backoff
                        && peers_done
                        && covered
                        && filled
                        && !self_pending
                        && !own_pending
                        && since.elapsed() >= Duration::from_millis(self.config.heartbeat_interval_ms)
                    {
                        // With the PGs its fill was checked for: admitted only if they are still
                        // exactly those when the command applies.
                        let checked =
                            l.backfill_seen.get(&id).map(|(pgs, ..)| pgs.clone()).unwrap_or_default();
                        finished.push((id, checked));
                    }
                }
                (boots, finished)
            })
        };
        // A node the map shows in sync but that some node holds missed writes for (a write failed on
        // it while it stayed up) must catch up before it serves reads again.
        let behind: Vec<u64> = {
            let mut l = lock(&self.liveness);
            let now = Instant::now();
            let (behind, not_serving): (Vec<u64>, Vec<u64>) = self.read(|s| {
                let behind = s
                    .nodes
                    .values()
                    .filter(|n| {
                        // Its own report counts too: a node that must pull chunks back after a
                        // power loss serves nothing until it has.
                        n.in_sync() && l.usage.values().any(|r| r.missed_for.contains(&n.id))
                    })
                    .map(|n| n.id)
                    .collect();
                for id in &behind {
                    let holding: Vec<u64> =
                        l.usage.values().filter(|r| r.missed_for.contains(id)).map(|r| r.id).collect();
                    tracing::info!(
                        node = id,
                        "node {id} catches up again: node(s) {holding:?} hold writes it missed"
                    );
                }
                // In sync but not serving (its serving barrier has not lifted: peers it cannot
                // reach, say): clients send it writes it refuses. Past a while it catches up
                // again, so clients leave it out meanwhile.
                let not_serving = s
                    .nodes
                    .values()
                    .filter(|n| {
                        n.in_sync()
                            && l.usage.get(&n.id).is_some_and(|r| {
                                r.boot_id == n.boot_id && r.epoch >= n.in_sync_epoch && !r.serving
                            })
                    })
                    .map(|n| n.id)
                    .collect();
                (behind, not_serving)
            });
            l.not_serving_since.retain(|id, _| not_serving.contains(id));
            // A node that serves again starts its backoff over.
            let serving: Vec<u64> = l.usage.values().filter(|r| r.serving).map(|r| r.id).collect();
            for id in serving {
                l.stuck.remove(&id);
            }
            let mut stuck = Vec::new();
            for id in not_serving {
                let since = *l.not_serving_since.entry(id).or_insert(now);
                if since.elapsed() >= NOT_SERVING_MAX {
                    let times = l.stuck.get(&id).copied().unwrap_or(0) + 1;
                    tracing::warn!(
                        node = id,
                        "node {id} is in sync but has not served for {} s (peers it cannot reach?): it catches up \
                         again, for at least {} s ({times} time(s) in a row)",
                        NOT_SERVING_MAX.as_secs(),
                        stuck_backoff(times).as_secs()
                    );
                    l.stuck.insert(id, times);
                    l.not_serving_since.remove(&id);
                    stuck.push(id);
                }
            }
            behind.into_iter().chain(stuck).collect()
        };
        for id in behind {
            self.propose(Command::SetCatchingUp { id, catching_up: true, time_ms: now_ms(), filled: None })
                .await?;
        }
        for (id, boot_id) in boots {
            self.propose(Command::NodeBooted { id, boot_id, time_ms: now_ms() }).await?;
        }
        for (id, checked) in finished {
            tracing::info!(node = id, "node caught up");
            let command =
                Command::SetCatchingUp { id, catching_up: false, time_ms: now_ms(), filled: Some(checked) };
            self.propose(command).await?;
        }
        Ok(())
    }
}

async fn leader_loop<T: PeerTransport>(service: std::sync::Weak<MetaService<T>>) {
    loop {
        let Some(s) = service.upgrade() else { return };
        let interval = Duration::from_millis(s.config.raft_heartbeat_ms);
        if let Err(e) = s.lead().await {
            tracing::debug!("leader housekeeping: {e}");
        }
        drop(s);
        tokio::time::sleep(interval).await;
    }
}

/// How many of a PG's other holders must grant a holder a read lease: all holders but a write
/// quorum of the R copies (q = ⌊R/2⌋ + 1). A write acknowledged without the holder was recorded
/// by at least q of the others, so any `holders − q` grants include one of them. (Counted from the
/// holders, not from R: a PG that also lists a member being filled has more holders than R.)
pub fn lease_need(replicas: u8, holders: usize) -> usize {
    holders.saturating_sub(usize::from(replicas) / 2 + 1)
}

/// Whether a node that caught up may serve: in every PG it holds (its other holders, and how
/// many of them must have the new map), enough of the `current` ones (those seen with it).
fn barrier_lifted(needs: &[(Vec<u64>, usize)], current: &BTreeSet<u64>) -> bool {
    needs.iter().all(|(holders, need)| holders.iter().filter(|p| current.contains(p)).count() >= *need)
}

/// Keeps this node's read lease (see `serves_reads`); its first grant after a catch-up lifts the
/// serving barrier (see `serves_clients`).
async fn lease_loop<T: PeerTransport>(service: std::sync::Weak<MetaService<T>>) {
    loop {
        let Some(s) = service.upgrade() else { return };
        s.renew_lease().await;
        drop(s);
        tokio::time::sleep(SERVING_BARRIER_POLL).await;
    }
}

/// How long a node may stay in sync without serving client IO before it is made to catch up again.
const NOT_SERVING_MAX: Duration = Duration::from_secs(10);

/// The longest a node sent back to catching up for not serving waits before it is in sync again.
const STUCK_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// How long a catch-up lasts at least after a node was sent back `times` times in a row for not
/// serving: nothing the first time it catches up, then 10 s, doubling, at most 5 minutes.
fn stuck_backoff(times: u32) -> Duration {
    match times {
        0 => Duration::ZERO,
        n => NOT_SERVING_MAX.saturating_mul(1 << (n - 1).min(10)).min(STUCK_BACKOFF_MAX),
    }
}

/// How often a node that caught up asks its peers whether they have the new map.
const SERVING_BARRIER_POLL: Duration = Duration::from_millis(100);

/// How long a read lease lasts, from when its request left the node that holds it.
pub const LEASE: Duration = cairn_types::limits::READ_LEASE;

/// A lease is renewed once it is this old.
const LEASE_RENEW: Duration = Duration::from_millis(500);

/// How long a peer may take to answer a lease request.
const LEASE_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long after it last granted a node a lease a peer holds back the acknowledgement of a write
/// that node missed (see `cairn_types::limits::READ_LEASE_HOLDBACK`; clients allow for it).
pub const LEASE_HOLDBACK: Duration = cairn_types::limits::READ_LEASE_HOLDBACK;

async fn heartbeat_loop<T: PeerTransport>(service: std::sync::Weak<MetaService<T>>) {
    loop {
        let Some(s) = service.upgrade() else { return };
        let interval = Duration::from_millis(s.config.heartbeat_interval_ms);
        let report = s.report();
        if s.is_leader() {
            s.record_heartbeat(report);
            // And ask every other node for its report: a node the leader can reach is heard even
            // if its own heartbeats cannot reach the leader (a one-way partition).
            let others: Vec<(u64, NodeAddr)> = s.read(|st| {
                st.nodes.values().filter(|n| n.id != s.id).map(|n| (n.id, n.addr.clone())).collect()
            });
            for (id, addr) in others {
                let weak = service.clone();
                let transport = s.transport.clone();
                tokio::spawn(async move {
                    let sent = Instant::now();
                    if let Ok(PeerReply::Probe(report)) =
                        transport.call(&addr, PeerRequest::Probe, interval).await
                        && report.id == id
                        && let Some(s) = weak.upgrade()
                        && s.is_leader()
                    {
                        // A report the node sent itself after this probe left is newer: keep it.
                        let newer = lock(&s.liveness).last_seen.get(&id).is_some_and(|t| *t > sent);
                        if !newer {
                            s.record_heartbeat(report);
                        }
                    }
                });
            }
        } else if let Some((_, leader)) = s.leader() {
            let transport = s.transport.clone();
            drop(s);
            let _ = transport.call(&leader, PeerRequest::Heartbeat(report), interval).await;
        }
        tokio::time::sleep(interval).await;
    }
}

/// The metadata API the rest of Cairn programs against (the admin API, the node); openraft stays
/// behind it, so the consensus library can change without touching its users.
pub trait MetadataStore: Send + Sync + 'static {
    /// This node's id.
    fn id(&self) -> u64;
    /// "leader", "follower", "candidate" or "learner".
    fn role(&self) -> &'static str;
    /// The current Raft term.
    fn term(&self) -> u64;
    /// The leader as this node knows it.
    fn leader(&self) -> Option<(u64, NodeAddr)>;
    fn is_leader(&self) -> bool;
    /// A copy of the locally applied state (may lag the leader; see `linearizable`).
    fn state(&self) -> ClusterState;
    /// Latest heartbeat report of a node (known on the leader).
    fn usage(&self, id: u64) -> Option<NodeReport>;
    /// Milliseconds since the leader last heard from a node.
    fn silent_ms(&self, id: u64) -> Option<u64>;
    /// Commits a command; see [`MetaService::propose`].
    fn propose(&self, command: Command) -> futures::future::BoxFuture<'_, Result<CommandResult, MetaError>>;
    /// Confirms leadership with a quorum; see [`MetaService::linearizable`].
    fn linearizable(&self) -> futures::future::BoxFuture<'_, Result<(), MetaError>>;
    /// Whether this node serves client IO now; see [`MetaService::serves_clients`].
    fn serves_clients(&self) -> bool {
        true
    }
    /// Whether this node serves client reads now; see [`MetaService::serves_reads`].
    fn serves_reads(&self) -> bool {
        self.serves_clients()
    }
    /// Makes a node a metadata voter or learner; see [`MetaService::set_voter`]. A store without
    /// Raft membership refuses.
    fn set_voter(&self, id: u64, _voter: bool) -> futures::future::BoxFuture<'_, Result<(), MetaError>> {
        Box::pin(
            async move { Err(MetaError::Refused(format!("node {id}: this metadata store has no voters"))) },
        )
    }
}

impl<T: PeerTransport> MetadataStore for MetaService<T> {
    fn id(&self) -> u64 {
        self.id
    }

    fn role(&self) -> &'static str {
        match self.raft.metrics().borrow().state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        }
    }

    fn term(&self) -> u64 {
        MetaService::term(self)
    }

    fn leader(&self) -> Option<(u64, NodeAddr)> {
        MetaService::leader(self)
    }

    fn is_leader(&self) -> bool {
        MetaService::is_leader(self)
    }

    fn state(&self) -> ClusterState {
        self.read(|s| s.clone())
    }

    fn usage(&self, id: u64) -> Option<NodeReport> {
        MetaService::usage(self, id)
    }

    fn silent_ms(&self, id: u64) -> Option<u64> {
        MetaService::silent_ms(self, id)
    }

    fn propose(&self, command: Command) -> futures::future::BoxFuture<'_, Result<CommandResult, MetaError>> {
        Box::pin(MetaService::propose(self, command))
    }

    fn linearizable(&self) -> futures::future::BoxFuture<'_, Result<(), MetaError>> {
        Box::pin(MetaService::linearizable(self))
    }

    fn serves_clients(&self) -> bool {
        MetaService::serves_clients(self)
    }

    fn serves_reads(&self) -> bool {
        MetaService::serves_reads(self)
    }

    fn set_voter(&self, id: u64, voter: bool) -> futures::future::BoxFuture<'_, Result<(), MetaError>> {
        Box::pin(MetaService::set_voter(self, id, voter))
    }
}

#[cfg(test)]
mod barrier_tests {
    use super::*;

    #[test]
    fn a_node_that_does_not_serve_waits_longer_each_time() {
        let secs: Vec<u64> = (0..8).map(|n| stuck_backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![0, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(stuck_backoff(u32::MAX), STUCK_BACKOFF_MAX);
    }

    #[test]
    fn a_caught_up_node_waits_for_enough_peers_with_the_new_map_in_every_pg() {
        // Three copies (need one other holder with the new map per PG), and one copy (none).
        let needs = vec![(vec![1, 2], 1), (vec![2, 3], 1), (vec![], 0)];
        assert!(!barrier_lifted(&needs, &BTreeSet::new()));
        assert!(!barrier_lifted(&needs, &[1].into()), "the PG held with 2 and 3 has none");
        assert!(barrier_lifted(&needs, &[2].into()));
        assert!(barrier_lifted(&[(vec![], 0)], &BTreeSet::new()), "a one-copy volume waits for nobody");
    }
}
