//! The metadata state machine: what the pool knows, and the commands that change it.
//!
//! `apply` is deterministic: it depends only on the state and the command (time is a field of the
//! command, set by the proposer). Invalid commands are rejected by `apply` itself, so every member
//! rejects the same ones; the service may pre-check for quicker errors but `apply` is the authority.
//!
//! Invariants: volume ids are never reused (`next_volume_id` only grows, deleted ids are remembered);
//! generations only grow (`last_generation`, one counter for the whole pool); the epoch grows with
//! every change; the event log keeps the newest [`EVENTS_MAX`] events.

use crate::authority::{Member, PgAuthority, Phase, min_size};
use crate::placement::{PG_COUNT_DEFAULT, PG_WIDTH_MAX, pg_table};
use cairn_types::ChunkSize;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// Events kept in the replicated log; older ones are dropped. 1000 events cover days of a quiet
/// pool and hours of a busy one, and keep snapshots small.
pub const EVENTS_MAX: usize = 1000;
/// Largest volume: 1 PiB (2^50 bytes), far beyond any VM disk, small enough that byte offsets never
/// overflow any arithmetic on them.
pub const VOLUME_SIZE_MAX_BYTES: u64 = 1 << 50;
/// Most replicas of a volume.
pub const REPLICAS_MAX: u8 = PG_WIDTH_MAX as u8;
/// Default replicas of a volume.
pub const REPLICAS_DEFAULT: u8 = 3;
/// Weight of a node unless set otherwise.
pub const WEIGHT_DEFAULT: u32 = 100;

/// Where a node listens. Also openraft's `Node` type: membership carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// Node RPC, host:port.
    pub rpc: String,
    /// Admin HTTP API, host:port.
    pub http: String,
    /// NBD server, host:port.
    pub nbd: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rpc {} http {} nbd {}", self.rpc, self.http, self.nbd)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: u64,
    pub addr: NodeAddr,
    /// Member of the metadata quorum (else a learner).
    pub voter: bool,
    /// Heard from within `down_after_ms` (as judged by the leader).
    pub up: bool,
    /// Holds data: "in" nodes appear in the PG table; "out" nodes are being emptied.
    pub in_pool: bool,
    pub weight: u32,
    pub capacity_bytes: u64,
    pub joined_ms: u64,
    /// The node may lack writes made while it was away: clients neither read from it nor write to
    /// it; its peers copy it what it missed, then the leader clears this.
    #[serde(default)]
    pub catching_up: bool,
    /// Identifies the node's current process; a new value means it restarted.
    #[serde(default)]
    pub boot_id: u64,
    /// Identifies the node's current *copy of its data*: a new value (committed by `NodeStarted`
    /// before the node serves) means it may have lost unflushed writes, and voids its PG entries.
    #[serde(default)]
    pub incarnation: u64,
    /// The map epoch at which the node last came back in sync after catching up (0: it never
    /// caught up). It serves client IO only once enough of its PG peers have a map at least this
    /// new (`MetaService::serves_clients`).
    #[serde(default)]
    pub in_sync_epoch: u64,
}

impl NodeInfo {
    /// Up and not catching up: may serve reads and must receive writes.
    pub fn in_sync(&self) -> bool {
        self.up && !self.catching_up
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub chunk_size_bytes: u32,
    pub replicas: u8,
    /// Accepts writes from several connections under one generation.
    pub shared: bool,
    pub created_ms: u64,
    /// Latest writer generation issued (0: never opened for writing).
    pub generation: u64,
    /// Set by a shrink: bytes from here on may still hold data from before the shrink (replicas are
    /// not trimmed yet), so the volume may not grow past this point again.
    /// (Always serialized: binary encodings need every field.)
    #[serde(default)]
    pub stale_from_bytes: Option<u64>,
    /// Writers numbered so far: every writer (an open, or a shared volume's writer joining) gets
    /// the next number, the tag its versions carry, so two writers of one generation never make
    /// the same version.
    #[serde(default)]
    pub writers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub time_ms: u64,
    /// Dotted type, e.g. `node.down`, `volume.created`.
    pub kind: String,
    /// What it is about, e.g. `node 2`, `volume web01`.
    pub subject: String,
    pub details: String,
}

/// A change to the state, committed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Add a node (or update a known node's addresses and capacity).
    RegisterNode {
        id: u64,
        addr: NodeAddr,
        voter: bool,
        capacity_bytes: u64,
        time_ms: u64,
    },
    /// The leader's liveness verdict changed.
    SetNodeLiveness {
        id: u64,
        up: bool,
        time_ms: u64,
    },
    /// A node reported a new boot id: it restarted, and may have missed writes meanwhile.
    NodeBooted {
        id: u64,
        boot_id: u64,
        time_ms: u64,
    },
    /// Start or end a node's catch-up. Ending it admits the node's backfill entries; with
    /// `filled`, only if they are exactly those (replica count, PG) the leader checked (else the
    /// command is refused and the leader checks again).
    SetCatchingUp {
        id: u64,
        catching_up: bool,
        time_ms: u64,
        /// (No `skip_serializing_if`: commands also travel postcard-encoded inside Raft's
        /// messages, which cannot skip fields.)
        #[serde(default)]
        filled: Option<Vec<(u8, u32)>>,
    },
    /// A new leader took office (proposed by itself).
    LeaderElected {
        id: u64,
        term: u64,
        time_ms: u64,
    },
    CreateVolume {
        name: String,
        size_bytes: u64,
        chunk_size_bytes: u32,
        replicas: u8,
        shared: bool,
        time_ms: u64,
    },
    ResizeVolume {
        name: String,
        size_bytes: u64,
        allow_shrink: bool,
        time_ms: u64,
    },
    DeleteVolume {
        name: String,
        time_ms: u64,
    },
    /// Issue a new writer generation for a volume (and a writer number). With `after`, only if
    /// the volume's generation is still `after` or older: a request retried after a lost answer,
    /// or committed late, then opens nothing more (a duplicate would fence the writer that
    /// asked), and the writer re-reads the volume on `GenerationMoved` before it opens again.
    OpenVolume {
        name: String,
        time_ms: u64,
        #[serde(default)]
        after: Option<u64>,
    },
    /// Number a new writer of a volume under its current generation (a shared volume's writer
    /// that adopts the generation another opened).
    AddWriter {
        name: String,
    },
    /// A node started with data-directory incarnation `incarnation` (a new value when it may have
    /// lost unflushed writes). Its entries of another incarnation become void; it becomes a backfill
    /// member of the PGs whose target it is in and where it has no entry.
    NodeStarted {
        id: u64,
        incarnation: u64,
        time_ms: u64,
    },
    /// Remove `node` from the listed PGs of the `replicas`-copy PG set, each judged at the given
    /// interval (a PG whose interval moved is left alone). A removal that would leave fewer than
    /// min_size valid active members is refused for that PG. `generation`, if set, is the writer
    /// generation of the client asking: a fenced writer cannot remove members. The removed node
    /// stays a backfill member where it is in the target, so that it recovers.
    Degrade {
        replicas: u8,
        node: u64,
        pgs: Vec<(u32, u64)>,
        generation: Option<(String, u64)>,
        time_ms: u64,
    },
    /// Promote `node` at `incarnation` in one PG: backfill (or void) → joining, or joining → active.
    Admit {
        replicas: u8,
        pg: u32,
        node: u64,
        incarnation: u64,
        phase: Phase,
        time_ms: u64,
    },
}

/// Why a command was rejected. Every member rejects the same commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StateError {
    #[error("volume name {0:?} is invalid: use 1 to 64 characters from A-Z a-z 0-9 . _ -, not only dots")]
    InvalidName(String),
    #[error("a volume named {0:?} already exists")]
    NameTaken(String),
    #[error("no volume named {0:?}")]
    UnknownVolume(String),
    #[error("invalid size {size_bytes}: {reason}")]
    InvalidSize { size_bytes: u64, reason: String },
    #[error("invalid chunk size: {0}")]
    InvalidChunkSize(String),
    #[error("{replicas} replicas requested but {reason}")]
    InvalidReplicas { replicas: u8, reason: String },
    #[error(
        "shrinking volume {name:?} from {from} to {to} bytes destroys data; pass --allow-shrink to do it anyway"
    )]
    ShrinkRefused { name: String, from: u64, to: u64 },
    #[error("unknown node {0}")]
    UnknownNode(u64),
    #[error("node {id} reported incarnation {incarnation}, older than its current {current}")]
    StaleIncarnation { id: u64, incarnation: u64, current: u64 },
    #[error("no placement group {pg} in the {replicas}-copy set")]
    UnknownPg { replicas: u8, pg: u32 },
    #[error("volume {name:?}: generation {generation} is fenced by generation {current}")]
    Fenced { name: String, generation: u64, current: u64 },
    #[error(
        "volume {name:?} was opened for writing since generation {after} (it is at generation {current}): read it again before opening"
    )]
    GenerationMoved { name: String, after: u64, current: u64 },
    #[error("node {node} cannot be admitted to pg {pg} as {phase:?} (incarnation {incarnation})")]
    NotAdmissible { pg: u32, node: u64, incarnation: u64, phase: Phase },
    #[error("node {id} is being filled with other placement groups than the ones checked")]
    FillChanged { id: u64 },
    #[error(
        "volume {name:?} was shrunk to {stale_from} bytes and its old data beyond that is not erased yet; it cannot grow past {stale_from} bytes (create a new volume instead)"
    )]
    GrowOverStale { name: String, stale_from: u64 },
}

/// The outcome of applying a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Done,
    Volume(Volume),
    Rejected(StateError),
}

/// Everything the metadata group agrees on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub epoch: u64,
    pub pg_count: u32,
    /// `pg_table[pg]`: ordered replica list (up to 5 distinct nodes); a volume with R replicas uses
    /// the first R.
    pub pg_table: Vec<Vec<u64>>,
    pub nodes: BTreeMap<u64, NodeInfo>,
    pub volumes: BTreeMap<String, Volume>,
    pub next_volume_id: u64,
    pub last_generation: u64,
    /// Ids of deleted volumes: a node returning with their chunks purges them.
    pub deleted_volumes: Vec<u64>,
    pub events: VecDeque<Event>,
    pub next_event_seq: u64,
    pub leader: Option<u64>,
    pub term: u64,
    /// Per replica count R, the authority of each of the `pg_count` PGs (volumes with R copies use
    /// the first R nodes of each target row). Created when the first volume with R copies is.
    #[serde(default)]
    pub pg_sets: BTreeMap<u8, Vec<PgAuthority>>,
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState {
            epoch: 0,
            pg_count: PG_COUNT_DEFAULT,
            pg_table: Vec::new(),
            nodes: BTreeMap::new(),
            volumes: BTreeMap::new(),
            next_volume_id: 1,
            last_generation: 0,
            deleted_volumes: Vec::new(),
            events: VecDeque::new(),
            next_event_seq: 1,
            leader: None,
            term: 0,
            pg_sets: BTreeMap::new(),
        }
    }
}

/// Checks a volume name: 1–64 characters of `[A-Za-z0-9._-]`, not only dots.
pub fn validate_name(name: &str) -> Result<(), StateError> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        // "." and ".." would be paths, not names, in URLs and export names.
        && !name.bytes().all(|b| b == b'.');
    if ok { Ok(()) } else { Err(StateError::InvalidName(name.to_string())) }
}

/// Checks a volume size: a positive multiple of 4 KiB up to 1 PiB.
pub fn validate_size(size_bytes: u64) -> Result<(), StateError> {
    let reason = if size_bytes == 0 {
        "a volume needs at least 4 KiB"
    } else if !size_bytes.is_multiple_of(4096) {
        "sizes must be a multiple of 4 KiB"
    } else if size_bytes > VOLUME_SIZE_MAX_BYTES {
        "the largest volume is 1 PiB"
    } else {
        return Ok(());
    };
    Err(StateError::InvalidSize { size_bytes, reason: reason.into() })
}

impl ClusterState {
    fn event(&mut self, time_ms: u64, kind: &str, subject: String, details: String) {
        self.events.push_back(Event {
            seq: self.next_event_seq,
            time_ms,
            kind: kind.into(),
            subject,
            details,
        });
        self.next_event_seq += 1;
        while self.events.len() > EVENTS_MAX {
            self.events.pop_front();
        }
    }

    fn rebalance(&mut self) {
        let weights: BTreeMap<u64, u32> =
            self.nodes.values().filter(|n| n.in_pool).map(|n| (n.id, n.weight)).collect();
        self.pg_table = pg_table(&weights, self.pg_count, PG_WIDTH_MAX);
    }

    /// Every node's current incarnation.
    pub fn incarnations(&self) -> BTreeMap<u64, u64> {
        self.nodes.values().map(|n| (n.id, n.incarnation)).collect()
    }

    /// The target of PG `pg` for `replicas` copies: the first R nodes of its table row.
    pub fn target(&self, replicas: u8, pg: u32) -> Vec<u64> {
        self.pg_table
            .get(pg as usize)
            .map(|row| row.iter().take(usize::from(replicas)).copied().collect())
            .unwrap_or_default()
    }

    /// The nodes that hold PG `pg`'s data for volumes of `replicas` copies: its authority's members
    /// once the set exists (a node that joined later is not among them until it has a copy), else
    /// the target. The data path routes by this, never by the bare target: the target changes the
    /// moment a node joins, before the new node holds anything.
    pub fn holders(&self, replicas: u8, pg: u32) -> Vec<u64> {
        match self.pg(replicas, pg) {
            Some(a) => a.members.iter().filter(|m| m.phase != Phase::Backfill).map(|m| m.node).collect(),
            None => self.target(replicas, pg),
        }
    }

    /// The nodes being filled with a copy of PG `pg` (backfill members): every mutation of the PG
    /// names them as having missed it, so that its appliers record it and copy it to them; they
    /// serve nothing and count for nothing until the commit that ends their catch-up admits them.
    pub fn backfill(&self, replicas: u8, pg: u32) -> Vec<u64> {
        match self.pg(replicas, pg) {
            Some(a) => a.members.iter().filter(|m| m.phase == Phase::Backfill).map(|m| m.node).collect(),
            None => Vec::new(),
        }
    }

    /// The (replica count, PG) pairs `node` is a backfill member of, in order.
    pub fn filling(&self, node: u64) -> Vec<(u8, u32)> {
        self.pg_sets
            .iter()
            .flat_map(|(r, set)| {
                set.iter().enumerate().filter_map(move |(pg, a)| {
                    a.entry(node).is_some_and(|m| m.phase == Phase::Backfill).then_some((*r, pg as u32))
                })
            })
            .collect()
    }

    /// Whether `node` is a backfill member of any PG.
    pub fn backfilling(&self, node: u64) -> bool {
        self.pg_sets.values().flatten().any(|a| a.entry(node).is_some_and(|m| m.phase == Phase::Backfill))
    }

    /// The authority of PG `pg` of the `replicas`-copy set, if that set exists.
    pub fn pg(&self, replicas: u8, pg: u32) -> Option<&PgAuthority> {
        self.pg_sets.get(&replicas).and_then(|set| set.get(pg as usize))
    }

    /// Adds backfill entries for nodes that are in a PG's target but not its members (a joined or
    /// restarted node), and drops void entries that are no longer needed. A node that gets a
    /// backfill entry catches up (it is filled by its peers' catch-up; the commit that ends it
    /// admits it).
    fn reconcile_targets(&mut self) {
        let incarnations = self.incarnations();
        let targets: BTreeMap<(u8, u32), Vec<u64>> = self
            .pg_sets
            .iter()
            .flat_map(|(r, set)| (0..set.len() as u32).map(move |pg| (*r, pg)))
            .map(|(r, pg)| ((r, pg), self.target(r, pg)))
            .collect();
        let mut filled = BTreeSet::new();
        for (r, set) in self.pg_sets.iter_mut() {
            for (pg, authority) in set.iter_mut().enumerate() {
                // Void entries go first where they may, so that their nodes come back as backfill.
                authority.prune_void(&incarnations, min_size(*r));
                for node in targets.get(&(*r, pg as u32)).into_iter().flatten() {
                    // (Production nodes keep incarnation 0: their restarts are handled by the
                    // catch-up, not by incarnations.) A 1-copy PG is not filled: admitted, the
                    // new node would make its one holder depend on it for reads (a lease) until
                    // the displaced member can be removed (the self-healing issue).
                    if *r == 1 {
                        continue;
                    }
                    if let Some(inc) = incarnations.get(node)
                        && authority.add_backfill(*node, *inc)
                    {
                        filled.insert(*node);
                    }
                }
                // Checked, not asserted: a panic in `apply` would crash every replica of the
                // metadata on the same log entry, again at every restart. (`add_backfill` refuses
                // duplicates, so this holds by construction; tests assert it.)
                debug_assert!(
                    authority.check().is_ok(),
                    "pg authority invariant broken: {:?}",
                    authority.check()
                );
            }
        }
        for id in filled {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.catching_up = true;
            }
        }
    }

    /// Admits every backfill entry of `node` (its catch-up ended: its peers copied it every chunk
    /// of those PGs, see `MetaService::track_catch_up`): backfill → joining → active. Returns how
    /// many PGs it joined.
    fn admit_backfill(&mut self, node: u64) -> usize {
        let Some(inc) = self.nodes.get(&node).map(|n| n.incarnation) else { return 0 };
        let mut admitted = 0;
        for authority in self.pg_sets.values_mut().flatten() {
            if authority.entry(node).is_some_and(|m| m.phase == Phase::Backfill && m.incarnation == inc)
                && authority.admit(node, inc, Phase::Joining)
                && authority.admit(node, inc, Phase::Active)
            {
                admitted += 1;
            }
        }
        admitted
    }

    /// Nodes that hold data.
    pub fn data_nodes(&self) -> usize {
        self.nodes.values().filter(|n| n.in_pool).count()
    }

    /// Events with a sequence number above `since`.
    pub fn events_since(&self, since: u64) -> Vec<Event> {
        self.events.iter().filter(|e| e.seq > since).cloned().collect()
    }

    /// Creates the PG set of every replica count some volume uses and that has none yet: a new
    /// set holds no data, so its target members are authoritative at once. Runs before a command
    /// only while there are volumes but no sets (a pool whose state predates PG sets gets them on
    /// its next command) — scanning every volume on every command would make each command cost
    /// O(volumes); a new replica count otherwise comes only with `CreateVolume`, which adds its set.
    fn ensure_pg_sets(&mut self) {
        let missing: BTreeSet<u8> =
            self.volumes.values().map(|v| v.replicas).filter(|r| !self.pg_sets.contains_key(r)).collect();
        for replicas in missing {
            self.add_pg_set(replicas);
        }
    }

    /// Creates the PG set of `replicas` copies if there is none.
    fn add_pg_set(&mut self, replicas: u8) {
        if self.pg_sets.contains_key(&replicas) {
            return;
        }
        let incarnations = self.incarnations();
        // A node being filled (a backfill member elsewhere) is catching up until its fill ends: it
        // takes part as a backfill member here too, and the next node of the row holds the PG
        // meanwhile (else a 1- or 2-copy volume whose PG it entered could not take writes until
        // its fill ends).
        let filling: BTreeSet<u64> = self.nodes.keys().copied().filter(|n| self.backfilling(*n)).collect();
        let member = |node: u64, phase| Member {
            node,
            incarnation: incarnations.get(&node).copied().unwrap_or(0),
            phase,
        };
        let set = (0..self.pg_count)
            .map(|pg| {
                let row = self.pg_table.get(pg as usize).cloned().unwrap_or_default();
                let mut members: Vec<Member> = row
                    .iter()
                    .copied()
                    .filter(|n| !filling.contains(n))
                    .take(usize::from(replicas))
                    .map(|n| member(n, Phase::Active))
                    .collect();
                // (A 1-copy PG is not filled: see `reconcile_targets`.)
                if replicas > 1 {
                    members.extend(
                        self.target(replicas, pg)
                            .into_iter()
                            .filter(|n| filling.contains(n))
                            .map(|n| member(n, Phase::Backfill)),
                    );
                }
                PgAuthority { interval: 1, members }
            })
            .collect();
        self.pg_sets.insert(replicas, set);
    }

    /// Applies one committed command.
    pub fn apply(&mut self, command: Command) -> CommandResult {
        if self.pg_sets.is_empty() && !self.volumes.is_empty() {
            self.ensure_pg_sets();
        }
        match self.apply_inner(command) {
            Ok(r) => {
                self.epoch += 1;
                r
            }
            Err(e) => CommandResult::Rejected(e),
        }
    }

    fn apply_inner(&mut self, command: Command) -> Result<CommandResult, StateError> {
        match command {
            Command::RegisterNode { id, addr, voter, capacity_bytes, time_ms } => {
                match self.nodes.get_mut(&id) {
                    Some(n) => {
                        n.addr = addr;
                        n.capacity_bytes = capacity_bytes;
                        if n.voter != voter {
                            n.voter = voter;
                            let kind = if voter { "node.promoted" } else { "node.demoted" };
                            let what = if voter { "metadata voter" } else { "metadata learner" };
                            self.event(time_ms, kind, format!("node {id}"), format!("now a {what}"));
                        }
                    }
                    None => {
                        let details = format!("{addr}, {}", if voter { "voter" } else { "learner" });
                        self.nodes.insert(
                            id,
                            NodeInfo {
                                id,
                                addr,
                                voter,
                                up: true,
                                in_pool: true,
                                weight: WEIGHT_DEFAULT,
                                capacity_bytes,
                                joined_ms: time_ms,
                                catching_up: false,
                                boot_id: 0,
                                incarnation: 0,
                                in_sync_epoch: 0,
                            },
                        );
                        self.rebalance();
                        self.reconcile_targets();
                        self.event(time_ms, "node.joined", format!("node {id}"), details);
                    }
                }
                Ok(CommandResult::Done)
            }
            Command::SetNodeLiveness { id, up, time_ms } => {
                let node = self.nodes.get_mut(&id).ok_or(StateError::UnknownNode(id))?;
                if node.up != up {
                    node.up = up;
                    // Back from down: it missed whatever was written meanwhile.
                    let details = if up {
                        node.catching_up = true;
                        "catching up on writes it missed".to_string()
                    } else {
                        String::new()
                    };
                    let kind = if up { "node.up" } else { "node.down" };
                    self.event(time_ms, kind, format!("node {id}"), details);
                }
                Ok(CommandResult::Done)
            }
            Command::NodeBooted { id, boot_id, time_ms } => {
                let node = self.nodes.get_mut(&id).ok_or(StateError::UnknownNode(id))?;
                if node.boot_id != boot_id {
                    let restarted = node.boot_id != 0;
                    node.boot_id = boot_id;
                    if restarted {
                        node.catching_up = true;
                        self.event(
                            time_ms,
                            "node.restarted",
                            format!("node {id}"),
                            "catching up on writes it missed".into(),
                        );
                    }
                }
                Ok(CommandResult::Done)
            }
            Command::SetCatchingUp { id, catching_up, time_ms, filled } => {
                if !catching_up
                    && let Some(checked) = filled
                    && self.filling(id) != checked
                {
                    return Err(StateError::FillChanged { id });
                }
                let epoch = self.epoch + 1; // this command's
                let node = self.nodes.get_mut(&id).ok_or(StateError::UnknownNode(id))?;
                if node.catching_up != catching_up {
                    node.catching_up = catching_up;
                    if !catching_up {
                        node.in_sync_epoch = epoch;
                    }
                    let kind = if catching_up { "node.catching_up" } else { "node.caught_up" };
                    let admitted = if catching_up { 0 } else { self.admit_backfill(id) };
                    let details = if admitted > 0 {
                        format!("filled: now holds {admitted} more placement group(s)")
                    } else {
                        String::new()
                    };
                    self.event(time_ms, kind, format!("node {id}"), details);
                }
                Ok(CommandResult::Done)
            }
            Command::LeaderElected { id, term, time_ms } => {
                self.leader = Some(id);
                self.term = term;
                self.event(time_ms, "leader.changed", format!("node {id}"), format!("term {term}"));
                Ok(CommandResult::Done)
            }
            Command::CreateVolume { name, size_bytes, chunk_size_bytes, replicas, shared, time_ms } => {
                validate_name(&name)?;
                validate_size(size_bytes)?;
                ChunkSize::new(chunk_size_bytes).map_err(|e| StateError::InvalidChunkSize(e.to_string()))?;
                if !(1..=REPLICAS_MAX).contains(&replicas) {
                    return Err(StateError::InvalidReplicas {
                        replicas,
                        reason: format!("a volume has 1 to {REPLICAS_MAX}"),
                    });
                }
                let nodes = self.data_nodes();
                if usize::from(replicas) > nodes {
                    return Err(StateError::InvalidReplicas {
                        replicas,
                        reason: format!("the pool has only {nodes} storage node(s)"),
                    });
                }
                if self.volumes.contains_key(&name) {
                    return Err(StateError::NameTaken(name));
                }
                let volume = Volume {
                    id: self.next_volume_id,
                    name: name.clone(),
                    size_bytes,
                    chunk_size_bytes,
                    replicas,
                    shared,
                    created_ms: time_ms,
                    generation: 0,
                    stale_from_bytes: None,
                    writers: 0,
                };
                self.next_volume_id += 1;
                self.volumes.insert(name.clone(), volume.clone());
                self.add_pg_set(replicas);
                self.event(
                    time_ms,
                    "volume.created",
                    format!("volume {name}"),
                    format!("id {}, {size_bytes} bytes, {replicas} replicas", volume.id),
                );
                Ok(CommandResult::Volume(volume))
            }
            Command::ResizeVolume { name, size_bytes, allow_shrink, time_ms } => {
                validate_size(size_bytes)?;
                let volume =
                    self.volumes.get_mut(&name).ok_or_else(|| StateError::UnknownVolume(name.clone()))?;
                let from = volume.size_bytes;
                if size_bytes < from && !allow_shrink {
                    return Err(StateError::ShrinkRefused { name, from, to: size_bytes });
                }
                if let Some(stale) = volume.stale_from_bytes
                    && size_bytes > stale
                {
                    return Err(StateError::GrowOverStale { name, stale_from: stale });
                }
                if size_bytes < from {
                    volume.stale_from_bytes =
                        Some(volume.stale_from_bytes.map_or(size_bytes, |s| s.min(size_bytes)));
                }
                volume.size_bytes = size_bytes;
                let volume = volume.clone();
                self.event(
                    time_ms,
                    "volume.resized",
                    format!("volume {name}"),
                    format!("{from} -> {size_bytes} bytes"),
                );
                Ok(CommandResult::Volume(volume))
            }
            Command::DeleteVolume { name, time_ms } => {
                let volume =
                    self.volumes.remove(&name).ok_or_else(|| StateError::UnknownVolume(name.clone()))?;
                self.deleted_volumes.push(volume.id);
                self.event(time_ms, "volume.deleted", format!("volume {name}"), format!("id {}", volume.id));
                Ok(CommandResult::Volume(volume))
            }
            Command::OpenVolume { name, time_ms, after } => {
                let volume =
                    self.volumes.get_mut(&name).ok_or_else(|| StateError::UnknownVolume(name.clone()))?;
                if let Some(after) = after.filter(|a| volume.generation > *a) {
                    return Err(StateError::GenerationMoved { name, after, current: volume.generation });
                }
                self.last_generation += 1;
                volume.generation = self.last_generation;
                volume.writers += 1;
                let volume = volume.clone();
                self.event(
                    time_ms,
                    "volume.generation",
                    format!("volume {name}"),
                    format!("generation {}", volume.generation),
                );
                Ok(CommandResult::Volume(volume))
            }
            Command::AddWriter { name } => {
                let volume =
                    self.volumes.get_mut(&name).ok_or_else(|| StateError::UnknownVolume(name.clone()))?;
                volume.writers += 1;
                Ok(CommandResult::Volume(volume.clone()))
            }
            Command::NodeStarted { id, incarnation, time_ms } => {
                let node = self.nodes.get_mut(&id).ok_or(StateError::UnknownNode(id))?;
                // Incarnations only grow: a late report from an earlier process must not bring
                // back entries a newer incarnation voided (found by the simulation: a delayed
                // report revived a power-lost node's old copies).
                if incarnation < node.incarnation {
                    return Err(StateError::StaleIncarnation { id, incarnation, current: node.incarnation });
                }
                if node.incarnation != incarnation {
                    let previous = node.incarnation;
                    node.incarnation = incarnation;
                    self.reconcile_targets();
                    self.event(
                        time_ms,
                        "node.incarnation",
                        format!("node {id}"),
                        format!("{previous} -> {incarnation}: its copies recover before they serve"),
                    );
                }
                Ok(CommandResult::Done)
            }
            Command::Degrade { replicas, node, pgs, generation, time_ms } => {
                if let Some((name, g)) = &generation {
                    let v = self.volumes.get(name).ok_or_else(|| StateError::UnknownVolume(name.clone()))?;
                    if *g < v.generation {
                        return Err(StateError::Fenced {
                            name: name.clone(),
                            generation: *g,
                            current: v.generation,
                        });
                    }
                }
                let incarnations = self.incarnations();
                let in_target: Vec<bool> =
                    pgs.iter().map(|(pg, _)| self.target(replicas, *pg).contains(&node)).collect();
                let set = self.pg_sets.get_mut(&replicas).ok_or(StateError::UnknownPg { replicas, pg: 0 })?;
                let mut removed = Vec::new();
                for ((pg, interval), in_target) in pgs.iter().zip(in_target) {
                    let authority =
                        set.get_mut(*pg as usize).ok_or(StateError::UnknownPg { replicas, pg: *pg })?;
                    if authority.interval != *interval {
                        continue;
                    }
                    if authority.remove(node, &incarnations, min_size(replicas)) {
                        removed.push(*pg);
                        // It stays in the target: it receives writes again and recovers.
                        if in_target && let Some(inc) = incarnations.get(&node) {
                            authority.add_backfill(node, *inc);
                        }
                    }
                }
                if !removed.is_empty() {
                    self.event(
                        time_ms,
                        "pg.degraded",
                        format!("node {node}"),
                        format!("removed from {} pg(s) of the {replicas}-copy set", removed.len()),
                    );
                }
                Ok(CommandResult::Done)
            }
            Command::Admit { replicas, pg, node, incarnation, phase, time_ms } => {
                let current = self.nodes.get(&node).ok_or(StateError::UnknownNode(node))?.incarnation;
                let authority = self
                    .pg_sets
                    .get_mut(&replicas)
                    .and_then(|set| set.get_mut(pg as usize))
                    .ok_or(StateError::UnknownPg { replicas, pg })?;
                if current != incarnation || !authority.admit(node, incarnation, phase) {
                    return Err(StateError::NotAdmissible { pg, node, incarnation, phase });
                }
                self.reconcile_targets();
                if phase == Phase::Active {
                    self.event(time_ms, "pg.member_active", format!("node {node}"), format!("pg {pg}"));
                }
                Ok(CommandResult::Done)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_nodes(n: u64) -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=n {
            let addr = NodeAddr { rpc: format!("127.0.0.1:{id}"), ..NodeAddr::default() };
            s.apply(Command::RegisterNode { id, addr, voter: true, capacity_bytes: 1 << 30, time_ms: 1 });
        }
        s
    }

    fn create(s: &mut ClusterState, name: &str, size: u64, replicas: u8) -> CommandResult {
        s.apply(Command::CreateVolume {
            name: name.into(),
            size_bytes: size,
            chunk_size_bytes: 1 << 20,
            replicas,
            shared: false,
            time_ms: 2,
        })
    }

    #[test]
    fn every_writer_gets_its_own_number() {
        let mut s = with_nodes(3);
        create(&mut s, "w", 1 << 20, 3);
        let number = |r: CommandResult| match r {
            CommandResult::Volume(v) => (v.generation, v.writers),
            other => panic!("{other:?}"),
        };
        let a = number(s.apply(Command::OpenVolume { name: "w".into(), time_ms: 3, after: None }));
        let b = number(s.apply(Command::AddWriter { name: "w".into() }));
        let c = number(s.apply(Command::OpenVolume { name: "w".into(), time_ms: 4, after: None }));
        assert_eq!((a.1, b.1, c.1), (1, 2, 3), "numbers never repeat");
        assert_eq!(a.0, b.0, "a writer joining keeps the generation");
        assert!(c.0 > b.0);
        assert!(matches!(s.apply(Command::AddWriter { name: "nope".into() }), CommandResult::Rejected(_)));
    }

    #[test]
    fn a_retried_or_late_open_opens_no_second_generation() {
        let mut s = with_nodes(3);
        create(&mut s, "w", 1 << 20, 3);
        let open = |s: &mut ClusterState, after| {
            s.apply(Command::OpenVolume { name: "w".into(), time_ms: 3, after })
        };
        // The writer read generation 0 and asked; its answer was lost and it asked again: the
        // second request must not fence the generation the first one committed.
        let CommandResult::Volume(first) = open(&mut s, Some(0)) else {
            panic!("the first open must commit")
        };
        assert_eq!(
            open(&mut s, Some(0)),
            CommandResult::Rejected(StateError::GenerationMoved {
                name: "w".into(),
                after: 0,
                current: first.generation
            })
        );
        assert_eq!(s.volumes["w"].generation, first.generation, "a duplicate opened nothing");
        // Having read the volume again, the writer opens past it.
        let CommandResult::Volume(again) = open(&mut s, Some(first.generation)) else {
            panic!("an open after the current generation must commit")
        };
        assert!(again.generation > first.generation);
        // An operator's open names no generation and always opens.
        let CommandResult::Volume(forced) = open(&mut s, None) else {
            panic!("an unconditional open commits")
        };
        assert!(forced.generation > again.generation);
    }

    #[test]
    fn volumes_are_validated() {
        let mut s = with_nodes(3);
        assert!(matches!(create(&mut s, "web01", 1 << 30, 3), CommandResult::Volume(v) if v.id == 1));
        assert_eq!(
            create(&mut s, "web01", 1 << 30, 3),
            CommandResult::Rejected(StateError::NameTaken("web01".into()))
        );
        assert!(matches!(
            create(&mut s, "bad name", 4096, 1),
            CommandResult::Rejected(StateError::InvalidName(_))
        ));
        for bad in [&"x".repeat(65) as &str, ".", ".."] {
            assert!(matches!(
                create(&mut s, bad, 4096, 1),
                CommandResult::Rejected(StateError::InvalidName(_))
            ));
        }
        assert!(matches!(create(&mut s, "...a", 4096, 1), CommandResult::Volume(_)));
        assert!(matches!(create(&mut s, "a", 0, 1), CommandResult::Rejected(StateError::InvalidSize { .. })));
        assert!(matches!(
            create(&mut s, "a", 1000, 1),
            CommandResult::Rejected(StateError::InvalidSize { .. })
        ));
        assert!(matches!(
            create(&mut s, "a", 4096, 4),
            CommandResult::Rejected(StateError::InvalidReplicas { .. })
        ));
        assert!(matches!(
            create(&mut s, "a", 4096, 0),
            CommandResult::Rejected(StateError::InvalidReplicas { .. })
        ));
        let shrink =
            Command::ResizeVolume { name: "web01".into(), size_bytes: 4096, allow_shrink: false, time_ms: 3 };
        assert!(matches!(s.apply(shrink), CommandResult::Rejected(StateError::ShrinkRefused { .. })));
        let grow = Command::ResizeVolume {
            name: "web01".into(),
            size_bytes: 2 << 30,
            allow_shrink: false,
            time_ms: 3,
        };
        assert!(matches!(s.apply(grow), CommandResult::Volume(v) if v.size_bytes == 2 << 30));
    }

    #[test]
    fn coming_back_in_sync_records_the_epoch_it_happened_at() {
        let mut s = with_nodes(3);
        assert_eq!(s.nodes[&2].in_sync_epoch, 0, "a node that never caught up has none");
        s.apply(Command::SetCatchingUp { id: 2, catching_up: true, time_ms: 3, filled: None });
        assert_eq!(s.nodes[&2].in_sync_epoch, 0);
        s.apply(Command::SetCatchingUp { id: 2, catching_up: false, time_ms: 4, filled: None });
        assert_eq!(s.nodes[&2].in_sync_epoch, s.epoch, "the epoch of the map that shows it in sync");
        let before = s.epoch;
        s.apply(Command::SetCatchingUp { id: 2, catching_up: false, time_ms: 5, filled: None });
        assert_eq!(s.nodes[&2].in_sync_epoch, before, "no change, no new epoch for it");
    }

    #[test]
    fn ids_and_generations_never_repeat() {
        let mut s = with_nodes(1);
        create(&mut s, "a", 4096, 1);
        s.apply(Command::DeleteVolume { name: "a".into(), time_ms: 3 });
        let CommandResult::Volume(v) = create(&mut s, "a", 4096, 1) else { panic!() };
        assert_eq!(v.id, 2, "ids are never reused");
        assert_eq!(s.deleted_volumes, vec![1]);
        let mut last = 0;
        for _ in 0..5 {
            let CommandResult::Volume(v) =
                s.apply(Command::OpenVolume { name: "a".into(), time_ms: 4, after: None })
            else {
                panic!()
            };
            assert!(v.generation > last);
            last = v.generation;
        }
    }

    #[test]
    fn epoch_events_and_pg_table() {
        let mut s = with_nodes(3);
        assert_eq!(s.pg_table.len(), PG_COUNT_DEFAULT as usize);
        assert!(s.pg_table.iter().all(|r| r.len() == 3));
        let e = s.epoch;
        s.apply(Command::SetNodeLiveness { id: 2, up: false, time_ms: 5 });
        assert!(s.epoch > e);
        assert_eq!(s.events.back().map(|e| e.kind.as_str()), Some("node.down"));
        for i in 0..(EVENTS_MAX + 10) {
            s.apply(Command::SetNodeLiveness { id: 2, up: i % 2 == 0, time_ms: 6 });
        }
        assert_eq!(s.events.len(), EVENTS_MAX);
        assert_eq!(s.events_since(s.next_event_seq - 3).len(), 2);
    }

    #[test]
    fn a_shrunk_volume_cannot_grow_back_over_old_data() {
        let mut s = with_nodes(1);
        create(&mut s, "v", 2 << 30, 1);
        let resize = |size, allow_shrink| Command::ResizeVolume {
            name: "v".into(),
            size_bytes: size,
            allow_shrink,
            time_ms: 9,
        };
        assert!(
            matches!(s.apply(resize(1 << 30, true)), CommandResult::Volume(v) if v.stale_from_bytes == Some(1 << 30))
        );
        assert!(matches!(
            s.apply(resize(2 << 30, false)),
            CommandResult::Rejected(StateError::GrowOverStale { .. })
        ));
        assert!(
            matches!(s.apply(resize(1 << 29, true)), CommandResult::Volume(v) if v.stale_from_bytes == Some(1 << 29))
        );
        assert!(matches!(s.apply(resize(1 << 29, false)), CommandResult::Volume(_)));
    }

    #[test]
    fn a_joining_node_is_backfill_until_admitted() {
        let mut s = with_nodes(3);
        for id in 1..=3 {
            s.apply(Command::NodeStarted { id, incarnation: 10 + id, time_ms: 1 });
        }
        create(&mut s, "v", 1 << 30, 3);
        let before: Vec<Vec<u64>> =
            (0..s.pg_count).map(|pg| s.pg(3, pg).unwrap().counted(&s.incarnations())).collect();
        let addr = NodeAddr { rpc: "127.0.0.1:4".into(), ..NodeAddr::default() };
        s.apply(Command::RegisterNode { id: 4, addr, voter: false, capacity_bytes: 1 << 30, time_ms: 5 });
        s.apply(Command::NodeStarted { id: 4, incarnation: 44, time_ms: 5 });
        let inc = s.incarnations();
        let mut backfilled = 0;
        for pg in 0..s.pg_count {
            let a = s.pg(3, pg).unwrap();
            assert_eq!(a.counted(&inc), before[pg as usize], "a join changes no counted set");
            if s.target(3, pg).contains(&4) {
                assert_eq!(a.role(4, 44), crate::authority::Role::Receiving);
                backfilled += 1;
            }
        }
        assert!(backfilled > 0);
        let pg = (0..s.pg_count).find(|pg| s.target(3, *pg).contains(&4)).unwrap();
        let admit = |phase| Command::Admit { replicas: 3, pg, node: 4, incarnation: 44, phase, time_ms: 6 };
        assert!(matches!(s.apply(admit(Phase::Active)), CommandResult::Rejected(_)));
        assert_eq!(s.apply(admit(Phase::Joining)), CommandResult::Done);
        assert_eq!(s.apply(admit(Phase::Active)), CommandResult::Done);
        assert_eq!(s.pg(3, pg).unwrap().active(&s.incarnations()).len(), 4);
    }

    #[test]
    fn degrade_respects_intervals_min_size_and_fencing() {
        let mut s = with_nodes(3);
        for id in 1..=3 {
            s.apply(Command::NodeStarted { id, incarnation: id, time_ms: 1 });
        }
        create(&mut s, "v", 1 << 30, 3);
        let CommandResult::Volume(v) =
            s.apply(Command::OpenVolume { name: "v".into(), time_ms: 2, after: None })
        else {
            panic!()
        };
        let interval = s.pg(3, 0).unwrap().interval;
        let degrade = |node, interval, g| Command::Degrade {
            replicas: 3,
            node,
            pgs: vec![(0, interval)],
            generation: Some(("v".into(), g)),
            time_ms: 3,
        };
        assert!(matches!(
            s.apply(degrade(1, interval, v.generation - 1)),
            CommandResult::Rejected(StateError::Fenced { .. })
        ));
        assert_eq!(s.apply(degrade(1, interval + 5, v.generation)), CommandResult::Done);
        assert_eq!(s.pg(3, 0).unwrap().interval, interval, "a stale interval removes nothing");
        s.apply(degrade(1, interval, v.generation));
        let a = s.pg(3, 0).unwrap();
        assert_eq!(a.counted(&s.incarnations()).len(), 2);
        assert_eq!(a.role(1, 1), crate::authority::Role::Receiving, "it stays to recover");
        let i2 = a.interval;
        let first = a.active(&s.incarnations())[0];
        s.apply(degrade(first, i2, v.generation));
        assert_eq!(s.pg(3, 0).unwrap().active(&s.incarnations()).len(), 2, "never below min_size");
    }

    #[test]
    fn holders_do_not_change_when_a_node_joins() {
        let mut s = with_nodes(3);
        create(&mut s, "v", 1 << 30, 3);
        let before: Vec<Vec<u64>> = (0..s.pg_count).map(|pg| s.holders(3, pg)).collect();
        let addr = NodeAddr { rpc: "127.0.0.1:4".into(), ..NodeAddr::default() };
        s.apply(Command::RegisterNode { id: 4, addr, voter: false, capacity_bytes: 1 << 30, time_ms: 5 });
        let after: Vec<Vec<u64>> = (0..s.pg_count).map(|pg| s.holders(3, pg)).collect();
        assert_eq!(before, after, "a joined node holds nothing yet, so it serves nothing");
        assert!((0..s.pg_count).any(|pg| s.target(3, pg).contains(&4)), "the target moved");
        assert_eq!(s.holders(2, 0), s.target(2, 0), "no 2-copy volume yet: the target");
        // It is being filled wherever it entered the target, and catches up meanwhile.
        let filled: Vec<u32> = (0..s.pg_count).filter(|pg| s.backfill(3, *pg) == vec![4]).collect();
        let entered: Vec<u32> = (0..s.pg_count).filter(|pg| s.target(3, *pg).contains(&4)).collect();
        assert_eq!(filled, entered);
        assert!(s.nodes[&4].catching_up && s.backfilling(4));
        let interval = s.pg(3, filled[0]).unwrap().interval;
        // The end of its catch-up admits it: it holds those PGs from then on — only if they are
        // the ones the leader checked.
        let checked: Vec<(u8, u32)> = filled[1..].iter().map(|pg| (3, *pg)).collect();
        assert!(matches!(
            s.apply(Command::SetCatchingUp { id: 4, catching_up: false, time_ms: 6, filled: Some(checked) }),
            CommandResult::Rejected(StateError::FillChanged { id: 4 })
        ));
        assert!(s.nodes[&4].catching_up);
        let checked: Vec<(u8, u32)> = filled.iter().map(|pg| (3, *pg)).collect();
        s.apply(Command::SetCatchingUp { id: 4, catching_up: false, time_ms: 6, filled: Some(checked) });
        assert!(!s.backfilling(4));
        for pg in 0..s.pg_count {
            let mut expected = before[pg as usize].clone();
            if filled.contains(&pg) {
                expected.push(4);
            }
            assert_eq!(s.holders(3, pg), expected);
        }
        assert!(s.pg(3, filled[0]).unwrap().interval > interval);
        assert!(s.events.back().unwrap().details.contains(&format!("{} more", filled.len())));
    }

    #[test]
    fn a_pg_set_created_while_a_node_is_filled_takes_it_as_backfill() {
        let mut s = with_nodes(3);
        create(&mut s, "v", 1 << 30, 3);
        let addr = NodeAddr { rpc: "127.0.0.1:4".into(), ..NodeAddr::default() };
        s.apply(Command::RegisterNode { id: 4, addr, voter: false, capacity_bytes: 1 << 30, time_ms: 5 });
        assert!(s.backfilling(4));
        // A 2-copy volume now: where node 4 is in the target, the next node of the row holds.
        create(&mut s, "w", 1 << 30, 2);
        let mut entered = 0;
        for pg in 0..s.pg_count {
            let holders = s.holders(2, pg);
            assert_eq!(holders.len(), 2);
            assert!(!holders.contains(&4));
            if s.target(2, pg).contains(&4) {
                entered += 1;
                assert_eq!(s.backfill(2, pg), vec![4]);
            }
        }
        assert!(entered > 0);
        // Its fill's end admits it there too.
        s.apply(Command::SetCatchingUp { id: 4, catching_up: false, time_ms: 6, filled: None });
        assert!(!s.backfilling(4));
        assert!((0..s.pg_count).any(|pg| s.holders(2, pg).contains(&4)));
    }

    #[test]
    fn incarnations_only_grow() {
        let mut s = with_nodes(1);
        assert_eq!(s.apply(Command::NodeStarted { id: 1, incarnation: 5, time_ms: 1 }), CommandResult::Done);
        assert!(matches!(
            s.apply(Command::NodeStarted { id: 1, incarnation: 4, time_ms: 2 }),
            CommandResult::Rejected(StateError::StaleIncarnation { current: 5, .. })
        ));
        assert_eq!(s.nodes[&1].incarnation, 5);
    }

    #[test]
    fn a_state_from_before_pg_sets_gets_them_on_its_next_command() {
        let mut s = with_nodes(3);
        create(&mut s, "v", 1 << 30, 3);
        s.pg_sets.clear();
        let before: Vec<Vec<u64>> = (0..s.pg_count).map(|pg| s.target(3, pg)).collect();
        s.apply(Command::LeaderElected { id: 1, term: 2, time_ms: 3 });
        assert!(s.pg_sets.contains_key(&3));
        let holders: Vec<Vec<u64>> = (0..s.pg_count).map(|pg| s.holders(3, pg)).collect();
        assert_eq!(holders, before);
    }
}
