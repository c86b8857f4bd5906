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
use crate::catchup::{Grants, LeaderView, Leases, barrier_lifted, lease_needs};
use crate::network::{Network, NodeReport, PeerError, PeerReply, PeerRequest, PeerTransport};
use crate::state::{ClusterState, Command, CommandResult, NodeAddr, StateError};
use crate::storage::{LogStore, StateMachineStore, open_db};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ServerState, SnapshotPolicy};
use std::collections::{BTreeMap, BTreeSet};
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
    /// Term in which this node last took office (to run the take-office steps once).
    led_term: Option<u64>,
    /// What the leader knows beyond the map (reports, catch-up clocks).
    view: LeaderView,
}

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
    /// This node's read leases (see [`Leases`]).
    leases: Mutex<Leases>,
    /// The leases this node granted its peers (see [`Grants`]).
    granted: Mutex<Grants>,
    /// When this process started: the origin of the millisecond clock the catch-up rules use
    /// ([`Self::clock_ms`]).
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
            leases: Mutex::new(Leases::default()),
            started: Instant::now(),
            granted: Mutex::new(Grants::new(0)),
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
        lock(&self.liveness).view.usage(id).cloned()
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
        let serving_from = *lock(&self.serving_from);
        self.read(|s| crate::catchup::serves_clients(s, self.id, self.boot_id, serving_from))
    }

    /// Milliseconds since this process started: the clock of the catch-up and lease rules.
    fn clock_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
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
        lock(&self.leases).covers(in_sync_epoch, others, need, self.clock_ms())
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
        lock(&self.granted).holdback(peers, self.clock_ms())
    }

    /// Answers a peer's lease request (see [`Self::lease_covers`]).
    fn grant_lease(&self, id: u64, in_sync_epoch: u64) -> bool {
        // Under the `granted` lock: a write recorded before this look makes it a refusal; one
        // recorded after it finds this grant when it asks how long to hold back.
        let mut granted = lock(&self.granted);
        let holds_missed = (self.usage_probe)().missed_for.contains(&id);
        let now = self.clock_ms();
        self.read(|s| granted.grant(s, id, in_sync_epoch, holds_missed, now))
    }

    /// Per PG this node holds (if it is in sync for this process): its other holders, and how
    /// many of them must grant it a lease.
    fn lease_needs(&self) -> Option<Vec<(Vec<u64>, usize)>> {
        self.read(|s| lease_needs(s, self.id, self.boot_id))
    }

    /// One round of this node's read leases: while this node is in sync, every [`LEASE_RENEW`] it
    /// asks its PG peers (those up in its map) to grant it a lease again; the first time the
    /// grants cover every PG it holds after a catch-up, the serving barrier lifts (writes are
    /// served from then on).
    async fn renew_lease(&self) {
        let me = self.id;
        let Some(needs) = self.lease_needs() else { return };
        let Some(in_sync_epoch) = self.read(|s| s.nodes.get(&me).map(|n| n.in_sync_epoch)) else { return };
        {
            let fresh = lock(&self.leases).fresh(in_sync_epoch, self.clock_ms());
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
        let sent = self.clock_ms();
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
        // A refusal ends that peer's lease at once (it may hold a write this node missed), and
        // only peers asked this round are kept (one gone down would look stale forever).
        lock(&self.leases).renewed(in_sync_epoch, &granted, sent);
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
        lock(&self.liveness).view.silent_ms(id, self.clock_ms())
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
                self.record_heartbeat(report, None);
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

    fn record_heartbeat(&self, report: NodeReport, probe_sent_ms: Option<u64>) {
        let now = self.clock_ms();
        lock(&self.liveness).view.heard(report, probe_sent_ms, now);
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
                // A new leader has not heard anyone yet: everyone starts a fresh grace period, and
                // a node is caught up only on reports received in this term.
                let now = self.clock_ms();
                self.read(|s| l.view.took_office(s, now));
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
            let now = self.clock_ms();
            lock(&self.liveness).view.registering(id, now);
            self.propose(Command::RegisterNode { id, addr, voter, capacity_bytes, time_ms: now_ms() })
                .await?;
        }
        // Liveness verdicts, restarts and catch-ups (see `LeaderView::decide`).
        let decisions = {
            let mut l = lock(&self.liveness);
            let now = self.clock_ms();
            let (down_after, interval) = (self.config.down_after_ms, self.config.heartbeat_interval_ms);
            self.read(|s| l.view.decide(s, self.id, now, down_after, interval))
        };
        for (id, up) in &decisions.liveness {
            if *up {
                tracing::info!(node = id, "node is up");
            } else {
                tracing::warn!(node = id, "node is down: no heartbeat for {} ms", self.config.down_after_ms);
            }
        }
        for (id, _) in &decisions.finished {
            tracing::info!(node = id, "node caught up");
        }
        for command in decisions.commands(now_ms()) {
            self.propose(command).await?;
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

pub use crate::catchup::lease_need;

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

/// How often a node that caught up asks its peers whether they have the new map.
const SERVING_BARRIER_POLL: Duration = Duration::from_millis(100);

pub use crate::catchup::{LEASE, LEASE_HOLDBACK};

/// How long a peer may take to answer a lease request.
const LEASE_CALL_TIMEOUT: Duration = Duration::from_secs(1);

async fn heartbeat_loop<T: PeerTransport>(service: std::sync::Weak<MetaService<T>>) {
    loop {
        let Some(s) = service.upgrade() else { return };
        let interval = Duration::from_millis(s.config.heartbeat_interval_ms);
        let report = s.report();
        if s.is_leader() {
            s.record_heartbeat(report, None);
            // And ask every other node for its report: a node the leader can reach is heard even
            // if its own heartbeats cannot reach the leader (a one-way partition).
            let others: Vec<(u64, NodeAddr)> = s.read(|st| {
                st.nodes.values().filter(|n| n.id != s.id).map(|n| (n.id, n.addr.clone())).collect()
            });
            for (id, addr) in others {
                let weak = service.clone();
                let transport = s.transport.clone();
                let sent = s.clock_ms();
                tokio::spawn(async move {
                    if let Ok(PeerReply::Probe(report)) =
                        transport.call(&addr, PeerRequest::Probe, interval).await
                        && report.id == id
                        && let Some(s) = weak.upgrade()
                        && s.is_leader()
                    {
                        // (A report the node sent itself after this probe left is newer: kept.)
                        s.record_heartbeat(report, Some(sent));
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
