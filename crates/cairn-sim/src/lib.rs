//! Deterministic simulation of the replicated data path.
//!
//! **Under test, unchanged:** the metadata state machine (`cairn_meta::state::ClusterState::apply`
//! and the PG authority rules in `cairn_meta::authority`) and the replication engine
//! (`cairn_engine`: the replica's verdicts, the client's write round, settling and recovery plans).
//! **Simulated around them:** storage nodes (a disk with a page cache that a power loss may drop,
//! tear or keep per chunk), volume clients (QD1, one volume), the metadata leader (commits after a
//! delay, read leases, verified degrades, fail-overs that lose its in-memory state), and a network
//! with delays, reordering, loss, one- and two-way partitions and frozen nodes. One thread, a
//! simulated clock and a seeded generator: a seed replays exactly.
//!
//! **Faults:** SIGKILL and restart of any node (page cache kept), power loss of a node (unsynced
//! chunks kept, reverted or torn; the node restarts with a new incarnation), a node joining, a node
//! frozen (accepts, never answers), partitions, a metadata fail-over, and writer handover while the
//! old writer keeps writing.
//!
//! **Oracle:** per block, the history of writes (issued, acknowledged). Every read returns the
//! latest value acknowledged before it began or a later write's value, never older, never zeros
//! for written data (I2); no write of an older generation is acknowledged once a newer writer's
//! open returned (I3); a node serves a read only while the metadata counts it as a valid active
//! member (I4, I9); every operation ends within the IO timeout (I6). At the end every fault is
//! healed, a final writer opens (reconciling), and the run must reach all PGs active and clean with
//! identical copies holding every acknowledged write (I1, I5).
//!
//! Simplifications, stated so nobody reads more into a pass: one volume of 3 copies; a node
//! applies a request atomically when it processes it (a kill never tears a mutation in a copy that
//! stays counted: such a copy is degraded before any write is acknowledged without it); the power
//! loss of every member of a PG at once (revival) is not generated; clients do not crash.

// One arm per message kind, with its condition inside, reads better than guards here.
#![allow(clippy::collapsible_match)]

pub mod production;

use cairn_engine::Version;
use cairn_engine::reconcile::{Pull, recovery_plan, settle};
use cairn_engine::replica::{Mutation, NodeView, ReadVerdict, Verdict, check_mutation, check_read};
use cairn_engine::version::Expected;
use cairn_engine::write::{Reply, Step, WriteRound};
use cairn_meta::authority::{Phase, Role};
use cairn_meta::state::{ClusterState, Command, CommandResult, NodeAddr};
use cairn_types::placement::pg_of;
use cairn_types::{ChunkIndex, VolumeId};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::rc::Rc;

/// Copies of the volume.
const R: u8 = 3;
const VOLUME: &str = "v";
const VOLUME_ID: u64 = 1;
const CHUNKS: u64 = 12;
const BLOCKS: usize = 4;
const PG_COUNT: u32 = 4;
/// Times are microseconds of simulated time, scaled down from production's seconds so that a seed
/// runs in milliseconds.
const RPC_TIMEOUT: u64 = 200_000;
const IO_TIMEOUT: u64 = 3_000_000;
const LEASE: u64 = 200_000;
const HEARTBEAT: u64 = 50_000;
const NODE_TICK: u64 = 20_000;
const RUN_US: u64 = 4_000_000;
const HEAL_US: u64 = 20_000_000;

/// splitmix64: small, fast, and fixed forever so that seeds replay.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// One copy of a chunk: its version and its blocks (each block holds the id of the write that
/// wrote it; 0 is zeros).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkCopy {
    pub version: Version,
    pub blocks: [u64; BLOCKS],
}

#[derive(Debug, Default)]
struct Disk {
    /// What the process sees (page cache).
    cache: BTreeMap<u64, ChunkCopy>,
    /// What survives a power loss for certain.
    durable: BTreeMap<u64, ChunkCopy>,
    /// Chunks changed since their last sync (their dirty flag is durable).
    unsynced: BTreeSet<u64>,
    /// Highest generation seen; persisted before use (durable at once).
    fence: u64,
}

impl Disk {
    fn version(&self, chunk: u64) -> Version {
        self.cache.get(&chunk).map(|c| c.version).unwrap_or(Version::NONE)
    }
    fn put(&mut self, chunk: u64, copy: ChunkCopy) {
        self.cache.insert(chunk, copy);
        self.unsynced.insert(chunk);
    }
    fn remove(&mut self, chunk: u64) {
        self.cache.remove(&chunk);
        self.unsynced.insert(chunk);
    }
    fn sync(&mut self, chunk: u64) {
        match self.cache.get(&chunk) {
            Some(c) => self.durable.insert(chunk, c.clone()),
            None => self.durable.remove(&chunk),
        };
        self.unsynced.remove(&chunk);
    }
    /// Power loss: each unsynced chunk is kept, reverted or torn (header of one, data of the other).
    fn power_loss(&mut self, rng: &mut Rng) -> BTreeSet<u64> {
        let dirty = std::mem::take(&mut self.unsynced);
        for chunk in &dirty {
            let cached = self.cache.get(chunk).cloned();
            let durable = self.durable.get(chunk).cloned();
            let survived = match rng.below(3) {
                0 => cached,
                1 => durable,
                _ => match (cached, durable) {
                    (Some(c), Some(d)) => Some(ChunkCopy { version: c.version, blocks: d.blocks }),
                    (Some(c), None) => Some(ChunkCopy { version: c.version, blocks: [0; BLOCKS] }),
                    (None, d) => d,
                },
            };
            match survived {
                Some(c) => self.durable.insert(*chunk, c),
                None => self.durable.remove(chunk),
            };
        }
        self.cache = self.durable.clone();
        dirty
    }
}

#[derive(Debug)]
struct Node {
    id: u64,
    alive: bool,
    frozen: bool,
    disk: Disk,
    incarnation: u64,
    map: Option<Rc<ClusterState>>,
    lease_until: u64,
    lease_epoch: u64,
    /// Chunks dirty at boot after a power loss: their header may not match their data.
    suspects: BTreeSet<u64>,
    /// Per chunk, the interval at which this node last changed it as a counted member.
    touched_at: BTreeMap<u64, u64>,
    /// Per PG, the interval at which this node first saw itself joining.
    joined_at: BTreeMap<u32, u64>,
    /// Per PG, when its last recovery pass was asked for.
    /// Per PG, when its last recovery pass was asked for and this node's chunk versions then: a
    /// pull installs only over a copy still at the version it had when the list was asked for.
    recovering: BTreeMap<u32, (u64, BTreeMap<u64, Version>, Role, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ep {
    Node(u64),
    Client(usize),
    Meta,
}

#[derive(Debug, Clone)]
enum Msg {
    Write {
        op: u64,
        pg: u32,
        interval: u64,
        generation: u64,
        chunk: u64,
        expected: Version,
        new: Version,
        blocks: Vec<(usize, u64)>,
    },
    Read {
        op: u64,
        pg: u32,
        interval: u64,
        chunk: u64,
    },
    GetChunk {
        op: u64,
        pg: u32,
        interval: u64,
        chunk: u64,
    },
    Install {
        op: u64,
        pg: u32,
        interval: u64,
        generation: u64,
        chunk: u64,
        expected: Version,
        copy: ChunkCopy,
    },
    Fence {
        op: u64,
        generation: u64,
    },
    Verdict {
        op: u64,
        node: u64,
        verdict: Verdict,
        /// When the node decided (oracle bookkeeping, not protocol).
        at: u64,
    },
    ReadReply {
        op: u64,
        node: u64,
        result: Result<ChunkCopy, ReadVerdict>,
        interval: u64,
        pg: u32,
    },
    ChunkReply {
        op: u64,
        node: u64,
        copy: Option<ChunkCopy>,
    },
    InstallReply {
        op: u64,
        node: u64,
        result: InstallResult,
    },
    FenceReply {
        op: u64,
        node: u64,
        /// The node's incarnation: copies of an incarnation the opener's map does not know may
        /// have lost writes and must not take part in the reconciliation.
        incarnation: u64,
        /// Per PG, the interval the node knows and whether it is counted there (by its own
        /// incarnation): a copy is trusted only if that matches the opener's map.
        views: BTreeMap<u32, (u64, bool)>,
        copies: Option<BTreeMap<u64, ChunkCopy>>,
    },
    List {
        from: u64,
        pg: u32,
        min_interval: u64,
        /// Matches the reply to this request (as an RPC connection does: a reply to a request of
        /// an earlier process of the node must never be taken for the current one's).
        nonce: u64,
    },
    ListReply {
        pg: u32,
        nonce: u64,
        copies: Option<BTreeMap<u64, ChunkCopy>>,
    },
    Heartbeat {
        node: u64,
        sent_at: u64,
        incarnation: u64,
        epoch: u64,
    },
    Grant {
        until: u64,
        epoch: u64,
    },
    Map(Rc<ClusterState>),
    Started {
        node: u64,
        incarnation: u64,
    },
    Admit {
        node: u64,
        pg: u32,
        incarnation: u64,
        phase: Phase,
    },
    MapRequest,
    Degrade {
        pg: u32,
        interval: u64,
        node: u64,
        generation: u64,
    },
    Open,
    Opened {
        generation: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InstallResult {
    Installed,
    Mismatch,
    Refused,
    Fenced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    NodeTick(u64, u64),
    NodeHeartbeat(u64, u64),
    RpcTimeout(usize, u64, u64),
    ClientRetry(usize, u64),
    ClientIdle(usize),
    Remove(u64),
    Fault,
    MetaBack(u64),
}

#[derive(Debug)]
enum Event {
    Deliver { from: Ep, to: Ep, msg: Msg },
    Timer(Timer),
    Commit(Command),
}

#[derive(Debug)]
enum OpKind {
    Open,
    Write { chunk: u64, blocks: Vec<(usize, u64)> },
    Read { chunk: u64 },
}

#[derive(Debug)]
enum OpPhase {
    /// Waiting for a new map or a retry timer, then restarts.
    Waiting,
    Opening,
    Fencing {
        generation: u64,
        /// The map this pass was started from: counted members and intervals come from it.
        map: Rc<ClusterState>,
        pending: BTreeSet<u64>,
        copies: BTreeMap<u64, BTreeMap<u64, ChunkCopy>>,
        views: BTreeMap<u64, BTreeMap<u32, (u64, bool)>>,
    },
    Reconciling {
        pending: BTreeSet<u64>,
    },
    Writing {
        round: WriteRound,
        pending: BTreeSet<u64>,
        pg: u32,
        new: Version,
        /// Latest time a member applied this round's mutation (oracle bookkeeping).
        last_apply: u64,
    },
    Settling {
        pending: BTreeSet<u64>,
        copies: BTreeMap<u64, ChunkCopy>,
        pg: u32,
        interval: u64,
    },
    SettleInstall {
        pending: BTreeSet<u64>,
        version: Version,
    },
    Reading {
        candidates: Vec<u64>,
        started_at: u64,
    },
}

#[derive(Debug)]
struct Op {
    kind: OpKind,
    started: u64,
    phase: OpPhase,
    /// Each (re)start of a phase gets a new attempt number; replies to older attempts are ignored.
    attempt: u64,
    /// Generation being opened (Open ops).
    opening: u64,
}

#[derive(Debug)]
struct Client {
    /// The writer generation this client holds (0: not open).
    generation: u64,
    map: Rc<ClusterState>,
    /// The version each chunk is at, as far as this writer knows.
    versions: BTreeMap<u64, Version>,
    unsettled: BTreeSet<u64>,
    op: Option<Op>,
    next_attempt: u64,
    /// Source of fresh sequence numbers (never reused within a generation).
    next_seq: u64,
    fenced: bool,
}

/// A write as the oracle knows it.
#[derive(Debug, Clone)]
struct WriteRecord {
    id: u64,
    acked: bool,
}

/// What a run ended with.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub reads_checked: u64,
    pub reads_failed: u64,
    pub faults: u64,
    pub degrades: u64,
    pub admissions: u64,
    pub opens: u64,
    pub fenced_writes: u64,
}

/// The simulated pool.
#[derive(Debug)]
pub struct World {
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: BTreeMap<usize, Event>,
    next_event: usize,
    nodes: BTreeMap<u64, Node>,
    clients: Vec<Client>,
    primary: usize,
    meta: ClusterState,
    meta_up: bool,
    meta_term: u64,
    lease_until: BTreeMap<u64, u64>,
    removing: BTreeSet<u64>,
    no_removal_before: u64,
    blocked: BTreeSet<(Ep, Ep)>,
    next_write_id: u64,
    next_incarnation: u64,
    history: BTreeMap<(u64, usize), Vec<WriteRecord>>,
    opened_generation: u64,
    /// Per block, (time, id) each time a newer write of it was acknowledged.
    acked_floor: BTreeMap<(u64, usize), Vec<(u64, u64)>>,
    healing: bool,
    healed_at_open: bool,
    /// When each generation's open returned.
    opened_at: BTreeMap<u64, u64>,
    /// The PG intervals when the final open started.
    open_intervals: Option<Vec<u64>>,
    pub stats: Stats,
    trace: Vec<String>,
}

fn pg_of_chunk(chunk: u64, pg_count: u32) -> u32 {
    match VolumeId::new(VOLUME_ID) {
        Ok(v) => pg_of(v, ChunkIndex(chunk), pg_count).0,
        Err(_) => 0,
    }
}

impl World {
    /// A pool of 4 or 5 nodes with one 3-copy volume.
    pub fn new(seed: u64) -> World {
        let mut rng = Rng(seed);
        let node_count = rng.range(4, 5);
        let mut meta = ClusterState { pg_count: PG_COUNT, ..ClusterState::default() };
        let mut nodes = BTreeMap::new();
        for id in 1..=node_count {
            meta.apply(register(id, 0));
            let incarnation = id * 1000;
            meta.apply(Command::NodeStarted { id, incarnation, time_ms: 0 });
            nodes.insert(id, Node::new(id, incarnation));
        }
        create_volume(&mut meta, VOLUME, CHUNKS, R);
        let map = Rc::new(meta.clone());
        let client = |map: &Rc<ClusterState>| Client {
            generation: 0,
            map: map.clone(),
            versions: BTreeMap::new(),
            unsettled: BTreeSet::new(),
            op: None,
            next_attempt: 1,
            next_seq: 1,
            fenced: false,
        };
        let mut w = World {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            nodes,
            clients: vec![client(&map), client(&map)],
            primary: 0,
            meta,
            meta_up: true,
            meta_term: 1,
            lease_until: BTreeMap::new(),
            removing: BTreeSet::new(),
            no_removal_before: 0,
            blocked: BTreeSet::new(),
            next_write_id: 1,
            next_incarnation: 10_000,
            history: BTreeMap::new(),
            opened_generation: 0,
            acked_floor: BTreeMap::new(),
            healing: false,
            healed_at_open: false,
            open_intervals: None,
            opened_at: BTreeMap::new(),
            stats: Stats::default(),
            trace: Vec::new(),
        };
        for id in w.nodes.keys().copied().collect::<Vec<_>>() {
            w.boot(id);
        }
        for c in 0..w.clients.len() {
            w.at(0, Event::Timer(Timer::ClientIdle(c)));
        }
        w.at(50_000, Event::Timer(Timer::Fault));
        w
    }

    fn at(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        let id = self.next_event;
        self.next_event += 1;
        self.events.insert(id, event);
        self.queue.push(Reverse((self.now + delay, self.seq, id)));
    }

    fn log(&mut self, line: String) {
        if self.trace.len() >= 400 {
            self.trace.drain(..200);
        }
        self.trace.push(format!("{:>9} {line}", self.now));
    }

    fn reachable(&self, from: Ep, to: Ep) -> bool {
        let up = |ep: Ep| match ep {
            Ep::Node(n) => self.nodes.get(&n).is_some_and(|n| n.alive && !n.frozen),
            Ep::Meta => self.meta_up,
            Ep::Client(_) => true,
        };
        up(from) && up(to) && !self.blocked.contains(&(from, to))
    }

    fn send(&mut self, from: Ep, to: Ep, msg: Msg) {
        if !self.reachable(from, to) || self.rng.chance(5) {
            return;
        }
        let delay =
            if self.rng.chance(20) { self.rng.range(1_000, 300_000) } else { self.rng.range(50, 2_000) };
        self.at(delay, Event::Deliver { from, to, msg });
    }

    /// Runs the simulation: faults and IO for `RUN_US`, then healing, a final open and the checks.
    pub fn run(mut self) -> Result<Stats, String> {
        let result = self.run_inner();
        match result {
            Ok(()) => Ok(self.stats),
            Err(e) => {
                let tail = self.trace.iter().rev().take(80).rev().cloned().collect::<Vec<_>>().join("\n");
                Err(format!("{e}\n--- last trace lines ---\n{tail}"))
            }
        }
    }

    fn run_inner(&mut self) -> Result<(), String> {
        let mut steps = 0u64;
        while let Some(Reverse((time, _, id))) = self.queue.pop() {
            steps += 1;
            if steps > 3_000_000 {
                return Err("the run did not end within 3 000 000 steps".into());
            }
            self.now = time;
            if !self.healing && self.now >= RUN_US {
                self.heal();
            }
            if self.healing && self.now >= RUN_US + HEAL_US {
                return Err(format!(
                    "not healed {} s after the faults ended: {}",
                    HEAL_US / 1_000_000,
                    self.unhealed()
                ));
            }
            let Some(event) = self.events.remove(&id) else { continue };
            match event {
                Event::Deliver { from, to, msg } => {
                    if self.reachable(from, to) {
                        self.deliver(from, to, msg)?;
                    }
                }
                Event::Timer(t) => self.timer(t)?,
                Event::Commit(c) => self.commit(c),
            }
            if self.healing && self.done() {
                return self.final_checks();
            }
        }
        Err("the event queue ran dry".into())
    }

    // ---------------------------------------------------------------- faults

    fn fault(&mut self) {
        self.stats.faults += 1;
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        let n = ids[self.rng.below(ids.len() as u64) as usize];
        match self.rng.below(11) {
            0 | 1 => {
                // SIGKILL, restart later: the page cache survives.
                if self.nodes[&n].alive {
                    self.log(format!("fault: kill node {n}"));
                    self.kill(n);
                } else {
                    self.log(format!("fault: restart node {n}"));
                    self.boot(n);
                }
            }
            2 => {
                // Power loss of one node, only when no copy is void already (no whole-PG loss).
                // Judged by the nodes' true incarnations: a power loss the metadata has not heard
                // of yet counts.
                let incarnations: BTreeMap<u64, u64> =
                    self.nodes.values().map(|x| (x.id, x.incarnation)).collect();
                let any_void = self
                    .meta
                    .pg_sets
                    .values()
                    .flatten()
                    .any(|a| a.members.iter().any(|m| incarnations.get(&m.node) != Some(&m.incarnation)));
                let all_alive = self.nodes.values().all(|x| x.alive);
                let sole_copy =
                    self.meta.pg_sets.values().flatten().any(|a| a.active(&incarnations) == vec![n]);
                if !any_void && all_alive && !sole_copy {
                    self.log(format!("fault: power loss of node {n}"));
                    self.power_loss(n);
                }
            }
            3 => {
                let frozen = !self.nodes[&n].frozen;
                self.log(format!("fault: node {n} frozen={frozen}"));
                if let Some(node) = self.nodes.get_mut(&n) {
                    node.frozen = frozen;
                }
            }
            4 | 5 => {
                // A partition between a node and a client or the metadata, one-way or both.
                let other = match self.rng.below(3) {
                    0 => Ep::Meta,
                    1 => Ep::Client(self.rng.below(2) as usize),
                    _ => Ep::Node(ids[self.rng.below(ids.len() as u64) as usize]),
                };
                if other != Ep::Node(n) {
                    self.log(format!("fault: partition node {n} / {other:?}"));
                    self.blocked.insert((Ep::Node(n), other));
                    if self.rng.chance(500) {
                        self.blocked.insert((other, Ep::Node(n)));
                    }
                }
            }
            6 | 7 => {
                self.log("fault: partitions healed".into());
                self.blocked.clear();
            }
            8 => {
                if self.nodes.len() < 6 {
                    let id = self.nodes.keys().max().copied().unwrap_or(0) + 1;
                    self.log(format!("fault: node {id} joins"));
                    self.propose(register(id, 0));
                    self.next_incarnation += 1;
                    self.nodes.insert(id, Node::new(id, self.next_incarnation));
                    self.boot(id);
                }
            }
            9 => {
                if self.meta_up {
                    self.log("fault: metadata leader fails over".into());
                    self.meta_up = false;
                    self.meta_term += 1;
                    let back = self.rng.range(50_000, 400_000);
                    let term = self.meta_term;
                    self.at(back, Event::Timer(Timer::MetaBack(term)));
                }
            }
            _ => {
                self.log(format!("fault: writer handover to client {}", 1 - self.primary));
                self.primary = 1 - self.primary;
            }
        }
    }

    fn heal(&mut self) {
        self.healing = true;
        self.log("healing every fault".into());
        self.blocked.clear();
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.frozen = false;
            }
            if !self.nodes[&id].alive {
                self.boot(id);
            }
        }
        if !self.meta_up {
            self.meta_back();
        }
    }

    fn kill(&mut self, id: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.alive = false;
            n.map = None;
            n.lease_until = 0;
            n.recovering.clear();
            n.joined_at.clear();
        }
    }

    fn power_loss(&mut self, id: u64) {
        self.kill(id);
        self.next_incarnation += 1;
        let inc = self.next_incarnation;
        let Some(n) = self.nodes.get_mut(&id) else { return };
        let dirty = n.disk.power_loss(&mut self.rng);
        n.suspects.extend(dirty);
        n.touched_at.clear();
        n.incarnation = inc;
        let delay = self.rng.range(10_000, 300_000);
        self.at(delay, Event::Timer(Timer::NodeTick(id, u64::MAX)));
    }

    fn boot(&mut self, id: u64) {
        let Some(n) = self.nodes.get_mut(&id) else { return };
        n.alive = true;
        n.frozen = false;
        let inc = n.incarnation;
        self.at(0, Event::Timer(Timer::NodeTick(id, inc)));
        self.at(0, Event::Timer(Timer::NodeHeartbeat(id, inc)));
    }

    fn meta_back(&mut self) {
        self.meta_up = true;
        // The new leader knows no lease its predecessor granted: it removes nobody until they
        // are over.
        self.lease_until.clear();
        self.removing.clear();
        self.no_removal_before = self.now + LEASE + 10_000;
        self.push_map();
    }

    // ---------------------------------------------------------------- metadata

    fn propose(&mut self, command: Command) {
        let delay = self.rng.range(1_000, 5_000);
        self.at(delay, Event::Commit(command));
    }

    fn commit(&mut self, command: Command) {
        let degrade = match &command {
            Command::Degrade { node, .. } => Some(*node),
            _ => None,
        };
        let admit = matches!(command, Command::Admit { .. });
        let text = format!("{command:?}");
        let result = self.meta.apply(command);
        if let Some(node) = degrade {
            self.removing.remove(&node);
            self.stats.degrades += 1;
        }
        if admit && result == CommandResult::Done {
            self.stats.admissions += 1;
        }
        if !matches!(result, CommandResult::Rejected(_)) {
            self.log(format!("commit {text}"));
            self.push_map();
        }
    }

    fn push_map(&mut self) {
        let map = Rc::new(self.meta.clone());
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            self.send(Ep::Meta, Ep::Node(id), Msg::Map(map.clone()));
        }
        for c in 0..self.clients.len() {
            self.send(Ep::Meta, Ep::Client(c), Msg::Map(map.clone()));
        }
    }

    fn meta_receive(&mut self, from: Ep, msg: Msg) {
        match msg {
            Msg::Heartbeat { node, sent_at, incarnation, epoch } => {
                let committed = self.meta.nodes.get(&node).is_some_and(|n| n.incarnation == incarnation);
                if committed && !self.removing.contains(&node) {
                    let until = sent_at + LEASE;
                    let e = self.lease_until.entry(node).or_default();
                    *e = (*e).max(until);
                    let grant = Msg::Grant { until, epoch: self.meta.epoch };
                    self.send(Ep::Meta, from, grant);
                }
                if epoch < self.meta.epoch {
                    let map = Rc::new(self.meta.clone());
                    self.send(Ep::Meta, from, Msg::Map(map));
                }
            }
            Msg::Started { node, incarnation } => {
                if self.meta.nodes.get(&node).is_some_and(|n| n.incarnation != incarnation) {
                    self.propose(Command::NodeStarted { id: node, incarnation, time_ms: self.now / 1000 });
                }
            }
            Msg::Admit { node, pg, incarnation, phase } => {
                self.propose(Command::Admit {
                    replicas: R,
                    pg,
                    node,
                    incarnation,
                    phase,
                    time_ms: self.now / 1000,
                });
            }
            Msg::MapRequest => {
                let map = Rc::new(self.meta.clone());
                self.send(Ep::Meta, from, Msg::Map(map));
            }
            Msg::Degrade { pg, interval, node, generation } => {
                let current = self.meta.pg(R, pg).map(|a| a.interval);
                let volume_generation = self.meta.volumes.get(VOLUME).map(|v| v.generation).unwrap_or(0);
                // The accusation is checked: a node the leader reaches both ways is not removed
                // (the client retries it until its IO times out).
                let verified_down =
                    !self.reachable(Ep::Meta, Ep::Node(node)) || !self.reachable(Ep::Node(node), Ep::Meta);
                if current == Some(interval) && generation >= volume_generation && verified_down {
                    if self.removing.insert(node) {
                        let not_before =
                            self.lease_until.get(&node).copied().unwrap_or(0).max(self.no_removal_before);
                        let wait = not_before.saturating_sub(self.now) + 1_000;
                        self.log(format!("meta: removing node {node} in {wait} us"));
                        self.at(wait, Event::Timer(Timer::Remove(node)));
                    }
                } else {
                    let map = Rc::new(self.meta.clone());
                    self.send(Ep::Meta, from, Msg::Map(map));
                }
            }
            Msg::Open => {
                let CommandResult::Volume(v) = self.meta.apply(Command::OpenVolume {
                    name: VOLUME.into(),
                    time_ms: self.now / 1000,
                    after: None,
                }) else {
                    return;
                };
                self.log(format!("meta: generation {} issued", v.generation));
                self.push_map();
                self.send(Ep::Meta, from, Msg::Opened { generation: v.generation });
            }
            _ => {}
        }
    }

    /// The removal of a node whose lease is over: one commit takes it out of every PG it is in.
    fn remove_now(&mut self, node: u64) {
        if !self.meta_up || !self.removing.contains(&node) {
            return;
        }
        let pgs: Vec<(u32, u64)> = self
            .meta
            .pg_sets
            .get(&R)
            .map(|set| {
                set.iter()
                    .enumerate()
                    .filter(|(_, a)| a.entry(node).is_some_and(|m| m.phase != Phase::Backfill))
                    .map(|(pg, a)| (pg as u32, a.interval))
                    .collect()
            })
            .unwrap_or_default();
        self.propose(Command::Degrade { replicas: R, node, pgs, generation: None, time_ms: self.now / 1000 });
    }

    // ---------------------------------------------------------------- timers

    fn timer(&mut self, t: Timer) -> Result<(), String> {
        match t {
            Timer::Fault => {
                if !self.healing {
                    self.fault();
                    let next = self.rng.range(30_000, 250_000);
                    self.at(next, Event::Timer(Timer::Fault));
                }
            }
            Timer::MetaBack(term) => {
                if term == self.meta_term && !self.meta_up {
                    self.meta_back();
                }
            }
            Timer::Remove(id) => self.remove_now(id),
            Timer::NodeTick(id, inc) if inc == u64::MAX => {
                // Power is back after a power loss.
                if !self.nodes[&id].alive {
                    self.boot(id);
                }
            }
            Timer::NodeTick(id, inc) => self.node_tick(id, inc),
            Timer::NodeHeartbeat(id, inc) => self.node_heartbeat(id, inc),
            Timer::RpcTimeout(c, attempt, node) => self.rpc_timeout(c, attempt, node)?,
            Timer::ClientRetry(c, attempt) => {
                if self.clients[c].op.as_ref().is_some_and(|op| op.attempt == attempt) {
                    self.restart_op(c)?;
                }
            }
            Timer::ClientIdle(c) => self.client_idle(c)?,
        }
        Ok(())
    }

    // ---------------------------------------------------------------- storage nodes

    fn node_heartbeat(&mut self, id: u64, inc: u64) {
        let Some(n) = self.nodes.get(&id) else { return };
        if !n.alive || n.incarnation != inc {
            return;
        }
        let epoch = n.map.as_ref().map(|m| m.epoch).unwrap_or(0);
        let committed =
            n.map.as_ref().is_some_and(|m| m.nodes.get(&id).is_some_and(|x| x.incarnation == inc));
        self.send(
            Ep::Node(id),
            Ep::Meta,
            Msg::Heartbeat { node: id, sent_at: self.now, incarnation: inc, epoch },
        );
        if !committed {
            self.send(Ep::Node(id), Ep::Meta, Msg::Started { node: id, incarnation: inc });
        }
        self.at(HEARTBEAT, Event::Timer(Timer::NodeHeartbeat(id, inc)));
    }

    fn node_tick(&mut self, id: u64, inc: u64) {
        let Some(n) = self.nodes.get_mut(&id) else { return };
        if !n.alive || n.incarnation != inc {
            return;
        }
        self.at(NODE_TICK, Event::Timer(Timer::NodeTick(id, inc)));
        let writeback = self.rng.chance(300);
        let n = self.nodes.get_mut(&id).expect_node();
        // Background writeback: the page cache reaches the disk sooner or later.
        if let Some(chunk) = n.disk.unsynced.iter().next().copied()
            && writeback
        {
            n.disk.sync(chunk);
        }
        if n.frozen {
            return;
        }
        let Some(map) = n.map.clone() else { return };
        if map.nodes.get(&id).is_none_or(|x| x.incarnation != inc) {
            return;
        }
        let Some(set) = map.pg_sets.get(&R) else { return };
        let incarnations = map.incarnations();
        for (pg, authority) in set.iter().enumerate() {
            let pg = pg as u32;
            let role = authority.role(id, inc);
            let n = self.nodes.get_mut(&id).expect_node();
            if !matches!(role, Role::Receiving | Role::Joining) {
                continue;
            }
            if n.recovering.get(&pg).is_some_and(|(t, ..)| self.now < t + 2 * RPC_TIMEOUT) {
                continue;
            }
            let sources: Vec<u64> =
                authority.active(&incarnations).into_iter().filter(|s| *s != id).collect();
            if sources.is_empty() {
                continue;
            }
            let source = sources[self.rng.below(sources.len() as u64) as usize];
            let n = self.nodes.get_mut(&id).expect_node();
            let snapshot: BTreeMap<u64, Version> = n
                .disk
                .cache
                .iter()
                .filter(|(c, _)| pg_of_chunk(**c, map.pg_count) == pg)
                .map(|(c, copy)| (*c, copy.version))
                .collect();
            self.seq += 1;
            let nonce = self.seq;
            let n = self.nodes.get_mut(&id).expect_node();
            n.recovering.insert(pg, (self.now, snapshot, role, nonce));
            self.send(
                Ep::Node(id),
                Ep::Node(source),
                Msg::List { from: id, pg, min_interval: authority.interval, nonce },
            );
        }
    }

    fn node_receive(&mut self, id: u64, from: Ep, msg: Msg) -> Result<(), String> {
        let now = self.now;
        let Some(n) = self.nodes.get_mut(&id) else { return Ok(()) };
        match msg {
            Msg::Map(map) => {
                if n.map.as_ref().is_none_or(|m| m.epoch < map.epoch) {
                    n.map = Some(map);
                    n.note_joining();
                }
            }
            Msg::Grant { until, epoch } => {
                if until > n.lease_until {
                    n.lease_until = until;
                    n.lease_epoch = epoch;
                }
            }
            Msg::Write { op, pg, interval, generation, chunk, expected, new, blocks } => {
                let (known, role) = n.pg_view(pg);
                let fence = n.fence();
                let view = NodeView { known_interval: known, role, fence, current: n.disk.version(chunk) };
                let mut verdict = check_mutation(
                    &view,
                    &Mutation { interval, generation, expected: Expected::Exact(expected), new },
                );
                if verdict == Verdict::Apply && role != Role::Active && n.suspects.contains(&chunk) {
                    verdict = Verdict::Behind;
                }
                if verdict == Verdict::UnknownInterval {
                    self.send(Ep::Node(id), Ep::Meta, Msg::MapRequest);
                }
                // I3: once a newer writer's open returned, no copy that is counted — in the
                // metadata and in its own view — applies an older generation's mutation. (A node
                // the metadata removed, behind a partition with a stale map, may still apply one to
                // its copy: that copy serves nothing and is recovered before it counts again.)
                let meta_counted = {
                    let incarnations = self.meta.incarnations();
                    self.meta.pg(R, pg).is_some_and(|a| a.counted(&incarnations).contains(&id))
                };
                if verdict == Verdict::Apply
                    && generation < self.opened_generation
                    && role.counted()
                    && meta_counted
                {
                    return Err(format!(
                        "I3: node {id} applied a write of generation {generation} after generation {} was opened",
                        self.opened_generation
                    ));
                }
                let n = self.nodes.get_mut(&id).expect_node();
                if verdict == Verdict::Apply {
                    n.disk.fence = n.disk.fence.max(generation);
                    let mut copy = n.disk.cache.get(&chunk).cloned().unwrap_or_default();
                    for (b, value) in &blocks {
                        copy.blocks[*b] = *value;
                    }
                    copy.version = new;
                    n.disk.put(chunk, copy);
                    if role.counted() {
                        n.touched_at.insert(chunk, interval);
                    }
                }
                self.send(Ep::Node(id), from, Msg::Verdict { op, node: id, verdict, at: self.now });
            }
            Msg::Read { op, pg, interval, chunk } => {
                let (known, role) = n.pg_view(pg);
                let lease = now < n.lease_until && n.map.as_ref().is_some_and(|m| m.epoch >= n.lease_epoch);
                let verdict = check_read(known, role, interval, lease);
                let result = match verdict {
                    ReadVerdict::Serve => Ok(n.disk.cache.get(&chunk).cloned().unwrap_or_default()),
                    v => Err(v),
                };
                if result.is_ok() {
                    // I4/I9: the metadata must count this node as a valid active member now.
                    let incarnations = self.meta.incarnations();
                    let active = self.meta.pg(R, pg).map(|a| a.active(&incarnations)).unwrap_or_default();
                    if !active.contains(&id) {
                        return Err(format!(
                            "I9: node {id} served a read of pg {pg} at interval {interval} while not active in the metadata ({:?})",
                            self.meta.pg(R, pg)
                        ));
                    }
                }
                self.send(Ep::Node(id), from, Msg::ReadReply { op, node: id, result, interval, pg });
            }
            Msg::GetChunk { op, pg, interval, chunk } => {
                let (known, role) = n.pg_view(pg);
                // Only a counted copy (of this node's own incarnation) may be a settle's winner.
                let copy = (known == interval && role.counted())
                    .then(|| n.disk.cache.get(&chunk).cloned().unwrap_or_default());
                self.send(Ep::Node(id), from, Msg::ChunkReply { op, node: id, copy });
            }
            Msg::Install { op, pg, interval, generation, chunk, expected, copy } => {
                let (known, role) = n.pg_view(pg);
                let meta_counted = {
                    let incarnations = self.meta.incarnations();
                    self.meta.pg(R, pg).is_some_and(|a| a.counted(&incarnations).contains(&id))
                };
                let result = if generation < n.fence() {
                    InstallResult::Fenced
                } else if generation < self.opened_generation && role.counted() && meta_counted {
                    return Err(format!(
                        "I3: node {id} would install a copy for generation {generation} after generation {} was opened",
                        self.opened_generation
                    ));
                } else if known != interval || role == Role::None {
                    InstallResult::Refused
                } else if n.disk.version(chunk) != expected {
                    InstallResult::Mismatch
                } else {
                    n.disk.fence = n.disk.fence.max(generation);
                    n.disk.put(chunk, copy);
                    n.suspects.remove(&chunk);
                    if role.counted() {
                        n.touched_at.insert(chunk, interval);
                    }
                    InstallResult::Installed
                };
                if result == InstallResult::Installed {
                    self.log(format!(
                        "node {id}: installed chunk {chunk} at {:?} (pg {pg}, interval {interval}, {role:?})",
                        self.nodes[&id].disk.version(chunk)
                    ));
                }
                self.send(Ep::Node(id), from, Msg::InstallReply { op, node: id, result });
            }
            Msg::Fence { op, generation } => {
                let copies = if generation < n.fence() {
                    None
                } else {
                    n.disk.fence = generation;
                    Some(n.disk.cache.clone())
                };
                let incarnation = n.incarnation;
                let views = (0..n.map.as_ref().map(|m| m.pg_count).unwrap_or(0))
                    .map(|pg| {
                        let (interval, role) = n.pg_view(pg);
                        (pg, (interval, role.counted()))
                    })
                    .collect();
                self.send(Ep::Node(id), from, Msg::FenceReply { op, node: id, incarnation, views, copies });
            }
            Msg::List { from: target, pg, min_interval, nonce } => {
                let (known, role) = n.pg_view(pg);
                let pg_count = n.map.as_ref().map(|m| m.pg_count).unwrap_or(PG_COUNT);
                // The barrier: a source that knows the target's interval has finished every
                // mutation of older intervals (requests are applied atomically here).
                let copies = (known >= min_interval && role == Role::Active).then(|| {
                    n.disk
                        .cache
                        .iter()
                        .filter(|(c, _)| pg_of_chunk(**c, pg_count) == pg)
                        .map(|(c, copy)| (*c, copy.clone()))
                        .collect()
                });
                self.send(Ep::Node(id), Ep::Node(target), Msg::ListReply { pg, nonce, copies });
            }
            Msg::ListReply { pg, nonce, copies } => {
                if n.recovering.get(&pg).is_none_or(|r| r.3 != nonce) {
                    return Ok(());
                }
                let Some((_, mine, asked_as, _)) = n.recovering.remove(&pg) else { return Ok(()) };
                let Some(source) = copies else { return Ok(()) };
                let (_, role) = n.pg_view(pg);
                if !matches!(role, Role::Receiving | Role::Joining) {
                    return Ok(());
                }
                let pg_count = n.map.as_ref().map(|m| m.pg_count).unwrap_or(PG_COUNT);
                let source_versions: BTreeMap<u64, Version> =
                    source.iter().map(|(c, copy)| (*c, copy.version)).collect();
                let suspects: BTreeSet<u64> =
                    n.suspects.iter().copied().filter(|c| pg_of_chunk(*c, pg_count) == pg).collect();
                let joined = n.joined_at.get(&pg).copied();
                let mut pulled = Vec::new();
                let mut skipped = 0;
                for pull in recovery_plan(&source_versions, &mine, &suspects) {
                    let (chunk, expected, version) = match pull {
                        Pull::Copy { chunk, expected, version } => (chunk, expected, Some(version)),
                        Pull::Delete { chunk, expected } => (chunk, Some(expected), None),
                    };
                    // A joining copy changed by a write of its joining interval may be ahead of a
                    // source that has not received that write yet: never move it back.
                    let touched_since_joining =
                        joined.is_some_and(|j| n.touched_at.get(&chunk).is_some_and(|t| *t >= j));
                    let older = version.unwrap_or(Version::NONE) < expected.unwrap_or(Version::NONE);
                    if touched_since_joining && older && !n.suspects.contains(&chunk) {
                        continue;
                    }
                    // Make identical, conditionally: a copy changed since the list was asked for
                    // (a write or an install that reached it meanwhile) is left for the next pass.
                    if n.disk.version(chunk) != expected.unwrap_or(Version::NONE) {
                        skipped += 1;
                        continue;
                    }
                    let line = format!(
                        "node {id}: pulled chunk {chunk} {expected:?} -> {version:?} (pg {pg}, {role:?})"
                    );
                    match source.get(&chunk) {
                        Some(copy) => n.disk.put(chunk, copy.clone()),
                        None => n.disk.remove(chunk),
                    }
                    pulled.push(line);
                    n.suspects.remove(&chunk);
                    n.touched_at.remove(&chunk);
                }
                let inc = n.incarnation;
                for line in pulled {
                    self.log(line);
                }
                let phase = if role == Role::Joining { Phase::Active } else { Phase::Joining };
                // Only a pass asked for as a joining member is the barrier (its source knew the
                // joining interval); a pass asked for before, answered after, is not.
                if phase == Phase::Active && (skipped > 0 || asked_as != Role::Joining) {
                    // The barrier pass must compare every chunk: try again.
                    return Ok(());
                }
                self.send(Ep::Node(id), Ep::Meta, Msg::Admit { node: id, pg, incarnation: inc, phase });
            }
            _ => {}
        }
        Ok(())
    }

    // ---------------------------------------------------------------- clients

    fn client_idle(&mut self, c: usize) -> Result<(), String> {
        if self.clients[c].op.is_some() {
            return Ok(());
        }
        let client = &self.clients[c];
        let kind = if self.healing {
            // At the end the primary opens once more: its open reconciles every chunk.
            // The final open reconciles a clean pool: a copy admitted before it may have come
            // from an active copy holding a failed write's leftover (allowed until the next
            // reconciliation), so only a reconciliation after the last admission proves I5.
            if c != self.primary || self.final_open_done() || !self.clean() {
                // Look again later: another writer's open may still supersede this one.
                self.at(50_000, Event::Timer(Timer::ClientIdle(c)));
                return Ok(());
            }
            OpKind::Open
        } else if c == self.primary && client.generation == 0 {
            OpKind::Open
        } else if client.generation != 0 && !client.fenced && self.rng.chance(650) {
            let chunk = self.rng.below(CHUNKS);
            let mut blocks = Vec::new();
            for b in 0..BLOCKS {
                if self.rng.chance(500) || (b == BLOCKS - 1 && blocks.is_empty()) {
                    let id = self.next_write_id;
                    self.next_write_id += 1;
                    self.history.entry((chunk, b)).or_default().push(WriteRecord { id, acked: false });
                    blocks.push((b, id));
                }
            }
            OpKind::Write { chunk, blocks }
        } else {
            OpKind::Read { chunk: self.rng.below(CHUNKS) }
        };
        if self.healing {
            self.open_intervals = Some(self.intervals());
        }
        self.log(format!("client {c}: starts {kind:?}"));
        self.clients[c].op =
            Some(Op { kind, started: self.now, phase: OpPhase::Waiting, attempt: 0, opening: 0 });
        self.restart_op(c)
    }

    fn final_open_done(&self) -> bool {
        let g = self.clients[self.primary].generation;
        g != 0
            && g == self.meta.volumes.get(VOLUME).map(|v| v.generation).unwrap_or(0)
            && self.opened_generation == g
            && self.healed_at_open
    }

    fn finish_op(&mut self, c: usize) {
        self.clients[c].op = None;
        let think = self.rng.range(0, 5_000);
        self.at(think, Event::Timer(Timer::ClientIdle(c)));
    }

    fn new_attempt(&mut self, c: usize) -> u64 {
        let client = &mut self.clients[c];
        let a = client.next_attempt;
        client.next_attempt += 1;
        if let Some(op) = client.op.as_mut() {
            op.attempt = a;
        }
        a
    }

    fn wait(&mut self, c: usize, delay: u64) {
        let attempt = self.new_attempt(c);
        if let Some(op) = self.clients[c].op.as_mut() {
            op.phase = OpPhase::Waiting;
        }
        self.at(delay, Event::Timer(Timer::ClientRetry(c, attempt)));
    }

    fn fail_op(&mut self, c: usize, why: &str) {
        let Some(op) = self.clients[c].op.as_ref() else { return };
        let line = format!("client {c}: op {:?} failed: {why}", op.kind);
        let (write, read) = match op.kind {
            OpKind::Write { chunk, .. } => (Some(chunk), false),
            OpKind::Read { .. } => (None, true),
            OpKind::Open => (None, false),
        };
        self.log(line);
        if let Some(chunk) = write {
            self.stats.writes_failed += 1;
            // It may be applied on some copies: settle before the next mutation of the chunk.
            self.clients[c].unsettled.insert(chunk);
        }
        if read {
            self.stats.reads_failed += 1;
        }
        self.finish_op(c);
    }

    fn fenced(&mut self, c: usize) {
        self.log(format!("client {c}: fenced"));
        self.stats.fenced_writes += 1;
        self.clients[c].fenced = true;
        self.clients[c].generation = 0;
        self.clients[c].op = None;
        let think = self.rng.range(0, 5_000);
        self.at(think, Event::Timer(Timer::ClientIdle(c)));
    }

    /// (Re)starts the current op's phase from the client's current map.
    fn restart_op(&mut self, c: usize) -> Result<(), String> {
        let Some(op) = self.clients[c].op.as_ref() else { return Ok(()) };
        if self.now > op.started + IO_TIMEOUT {
            self.fail_op(c, "IO timeout");
            return Ok(());
        }
        match op.kind {
            OpKind::Open if op.opening == 0 => {
                let attempt = self.new_attempt(c);
                if let Some(op) = self.clients[c].op.as_mut() {
                    op.phase = OpPhase::Opening;
                }
                self.send(Ep::Client(c), Ep::Meta, Msg::Open);
                self.at(RPC_TIMEOUT, Event::Timer(Timer::ClientRetry(c, attempt)));
            }
            OpKind::Open => {
                // Fence and reconcile with a map at least as new as the generation's commit: an
                // older one may not count members admitted since, which would then miss the
                // reconciliation.
                let opening = op.opening;
                if self.clients[c].map.volumes.get(VOLUME).is_none_or(|v| v.generation < opening) {
                    self.send(Ep::Client(c), Ep::Meta, Msg::MapRequest);
                    self.wait(c, 20_000);
                } else {
                    self.start_fencing(c);
                }
            }
            OpKind::Write { chunk, .. } => {
                if self.clients[c].unsettled.contains(&chunk) {
                    self.start_settle(c, chunk);
                } else {
                    self.start_round(c);
                }
            }
            OpKind::Read { chunk } => {
                let map = self.clients[c].map.clone();
                let pg = pg_of_chunk(chunk, map.pg_count);
                let mut candidates = map.pg(R, pg).map(|a| a.active(&map.incarnations())).unwrap_or_default();
                let len = candidates.len();
                let k = self.rng.below(len.max(1) as u64) as usize;
                candidates.rotate_left(k.min(len));
                if let Some(op) = self.clients[c].op.as_mut() {
                    op.phase = OpPhase::Reading { candidates, started_at: 0 };
                }
                self.next_read(c);
            }
        }
        Ok(())
    }

    fn next_read(&mut self, c: usize) {
        let map = self.clients[c].map.clone();
        let Some(op) = self.clients[c].op.as_mut() else { return };
        let OpKind::Read { chunk } = op.kind else { return };
        let OpPhase::Reading { candidates, .. } = &mut op.phase else { return };
        let Some(node) = candidates.pop() else {
            // Nobody could serve: refresh the map and try again shortly.
            self.send(Ep::Client(c), Ep::Meta, Msg::MapRequest);
            self.wait(c, 20_000);
            return;
        };
        let started = op.started;
        let _ = started;
        if let OpPhase::Reading { started_at, .. } = &mut op.phase {
            *started_at = self.now.max(*started_at);
        }
        let attempt = self.new_attempt(c);
        let pg = pg_of_chunk(chunk, map.pg_count);
        let interval = map.pg(R, pg).map(|a| a.interval).unwrap_or(0);
        self.send(Ep::Client(c), Ep::Node(node), Msg::Read { op: attempt, pg, interval, chunk });
        self.at(RPC_TIMEOUT, Event::Timer(Timer::RpcTimeout(c, attempt, node)));
    }

    fn start_round(&mut self, c: usize) {
        let client = &self.clients[c];
        let map = client.map.clone();
        let Some(op) = client.op.as_ref() else { return };
        let OpKind::Write { chunk, .. } = op.kind else { return };
        let pg = pg_of_chunk(chunk, map.pg_count);
        let Some(authority) = map.pg(R, pg) else { return };
        let round = WriteRound::new(authority, &map.incarnations(), R);
        if round.start() == Step::BelowMinSize {
            self.send(Ep::Client(c), Ep::Meta, Msg::MapRequest);
            self.wait(c, 50_000);
            return;
        }
        let generation = client.generation;
        let expected = client.versions.get(&chunk).copied().unwrap_or(Version::NONE);
        let seq = client.next_seq;
        let new = Version { generation, seq };
        let blocks = match &op.kind {
            OpKind::Write { blocks, .. } => blocks.clone(),
            _ => Vec::new(),
        };
        let targets = round.targets().to_vec();
        let attempt = self.new_attempt(c);
        let interval = round.interval;
        self.clients[c].next_seq += 1;
        if let Some(op) = self.clients[c].op.as_mut() {
            op.phase = OpPhase::Writing {
                round,
                pending: targets.iter().copied().collect(),
                pg,
                new,
                last_apply: 0,
            };
        }
        for node in targets {
            let msg = Msg::Write {
                op: attempt,
                pg,
                interval,
                generation,
                chunk,
                expected,
                new,
                blocks: blocks.clone(),
            };
            self.send(Ep::Client(c), Ep::Node(node), msg);
            self.at(RPC_TIMEOUT, Event::Timer(Timer::RpcTimeout(c, attempt, node)));
        }
    }

    fn start_settle(&mut self, c: usize, chunk: u64) {
        let map = self.clients[c].map.clone();
        let pg = pg_of_chunk(chunk, map.pg_count);
        let Some(authority) = map.pg(R, pg) else { return };
        let counted = authority.counted(&map.incarnations());
        let interval = authority.interval;
        if counted.is_empty() {
            self.send(Ep::Client(c), Ep::Meta, Msg::MapRequest);
            self.wait(c, 50_000);
            return;
        }
        let attempt = self.new_attempt(c);
        if let Some(op) = self.clients[c].op.as_mut() {
            op.phase = OpPhase::Settling {
                pending: counted.iter().copied().collect(),
                copies: BTreeMap::new(),
                pg,
                interval,
            };
        }
        for node in counted {
            self.send(Ep::Client(c), Ep::Node(node), Msg::GetChunk { op: attempt, pg, interval, chunk });
            self.at(RPC_TIMEOUT, Event::Timer(Timer::RpcTimeout(c, attempt, node)));
        }
    }

    fn start_fencing(&mut self, c: usize) {
        let map = self.clients[c].map.clone();
        let Some(op) = self.clients[c].op.as_ref() else { return };
        let generation = op.opening;
        let members: BTreeSet<u64> =
            map.pg_sets.get(&R).into_iter().flatten().flat_map(|a| a.all()).collect();
        let attempt = self.new_attempt(c);
        if let Some(op) = self.clients[c].op.as_mut() {
            op.phase = OpPhase::Fencing {
                generation,
                map: map.clone(),
                pending: members.clone(),
                copies: BTreeMap::new(),
                views: BTreeMap::new(),
            };
        }
        for node in members {
            self.send(Ep::Client(c), Ep::Node(node), Msg::Fence { op: attempt, generation });
            self.at(RPC_TIMEOUT, Event::Timer(Timer::RpcTimeout(c, attempt, node)));
        }
    }

    fn degrade(&mut self, c: usize, pg: u32, node: u64) {
        let map = self.clients[c].map.clone();
        let interval = map.pg(R, pg).map(|a| a.interval).unwrap_or(0);
        let generation =
            self.clients[c].generation.max(self.clients[c].op.as_ref().map(|o| o.opening).unwrap_or(0));
        self.log(format!("client {c}: degrade node {node} in pg {pg} at interval {interval}"));
        self.send(Ep::Client(c), Ep::Meta, Msg::Degrade { pg, interval, node, generation });
        self.wait(c, 60_000);
    }

    fn rpc_timeout(&mut self, c: usize, attempt: u64, node: u64) -> Result<(), String> {
        let Some(op) = self.clients[c].op.as_ref() else { return Ok(()) };
        if op.attempt != attempt {
            return Ok(());
        }
        match &op.phase {
            OpPhase::Writing { pending, .. } if pending.contains(&node) => {
                self.on_write_reply(c, node, Reply::Unreachable)?;
            }
            OpPhase::Reading { .. } => self.next_read(c),
            OpPhase::Settling { pending, pg, .. } if pending.contains(&node) => {
                let pg = *pg;
                self.degrade(c, pg, node);
            }
            OpPhase::SettleInstall { pending, .. } | OpPhase::Reconciling { pending, .. }
                if pending.contains(&node) =>
            {
                self.wait(c, 10_000);
            }
            OpPhase::Fencing { pending, .. } if pending.contains(&node) => {
                // An unreachable member: degrade it from every PG (any one names the node).
                let map = self.clients[c].map.clone();
                let pg = map
                    .pg_sets
                    .get(&R)
                    .and_then(|set| set.iter().position(|a| a.entry(node).is_some()))
                    .unwrap_or(0) as u32;
                self.degrade(c, pg, node);
            }
            _ => {}
        }
        Ok(())
    }

    fn client_receive(&mut self, c: usize, msg: Msg) -> Result<(), String> {
        match msg {
            Msg::Map(map) => {
                let client = &mut self.clients[c];
                if client.map.epoch < map.epoch {
                    client.map = map;
                    if client.op.as_ref().is_some_and(|o| matches!(o.phase, OpPhase::Waiting)) {
                        self.restart_op(c)?;
                    }
                }
            }
            Msg::Opened { generation } => {
                let Some(op) = self.clients[c].op.as_mut() else { return Ok(()) };
                if matches!(op.phase, OpPhase::Opening) && op.opening == 0 {
                    op.opening = generation;
                    // Sequence numbers start again with each generation (versions are (g, seq)).
                    self.clients[c].next_seq = 1;
                    self.log(format!("client {c}: opening generation {generation}"));
                    self.send(Ep::Client(c), Ep::Meta, Msg::MapRequest);
                    self.wait(c, 5_000);
                }
            }
            Msg::Verdict { op, node, verdict, at } => {
                if matches!(verdict, Verdict::Apply | Verdict::AlreadyApplied)
                    && let Some(Op { attempt, phase: OpPhase::Writing { last_apply, .. }, .. }) =
                        self.clients[c].op.as_mut()
                    && *attempt == op
                {
                    *last_apply = (*last_apply).max(at);
                }
                if self.clients[c].op.as_ref().is_some_and(|o| o.attempt == op) {
                    self.on_write_reply(c, node, Reply::Verdict(verdict))?;
                }
            }
            Msg::ReadReply { op, node, result, interval, pg } => {
                if self.clients[c].op.as_ref().is_none_or(|o| o.attempt != op) {
                    return Ok(());
                }
                match result {
                    Ok(copy) => self.check_read(c, node, pg, interval, copy)?,
                    Err(ReadVerdict::StaleInterval) => {
                        self.send(Ep::Client(c), Ep::Meta, Msg::MapRequest);
                        self.wait(c, 5_000);
                    }
                    Err(_) => self.next_read(c),
                }
            }
            Msg::ChunkReply { op, node, copy } => self.on_chunk_reply(c, op, node, copy),
            Msg::InstallReply { op, node, result } => self.on_install_reply(c, op, node, result)?,
            Msg::FenceReply { op, node, incarnation, views, copies } => {
                self.on_fence_reply(c, op, node, incarnation, views, copies)
            }
            _ => {}
        }
        Ok(())
    }

    fn on_write_reply(&mut self, c: usize, node: u64, reply: Reply) -> Result<(), String> {
        let Some(op) = self.clients[c].op.as_mut() else { return Ok(()) };
        let OpPhase::Writing { round, pending, pg, new, last_apply } = &mut op.phase else { return Ok(()) };
        pending.remove(&node);
        let (pg, new, last_apply) = (*pg, *new, *last_apply);
        let step = round.on_reply(node, reply);
        let OpKind::Write { chunk, ref blocks } = op.kind else { return Ok(()) };
        let blocks = blocks.clone();
        match step {
            Step::Wait => {}
            Step::Acked => {
                // I3: a write of an older generation is acknowledged only if every apply counted
                // for it happened before any newer writer's open returned (then that open fenced
                // and reconciled after it; the acknowledgement merely arrived late).
                let generation = self.clients[c].generation;
                if let Some((g, t)) =
                    self.opened_at.iter().find(|(g, t)| **g > generation && **t < last_apply)
                {
                    return Err(format!(
                        "I3: client {c} acknowledged a write of generation {generation} applied at {last_apply}, after generation {g}'s open returned at {t}"
                    ));
                }
                self.log(format!("client {c}: write to chunk {chunk} acked at {new:?}"));
                self.stats.writes_acked += 1;
                for (b, id) in blocks {
                    // An old writer's acknowledgement may arrive after a newer writer's (its write
                    // reached every copy before the newer open fenced them): the floor is the
                    // newest write in chain order, and ids follow chain order.
                    let acks = self.acked_floor.entry((chunk, b)).or_default();
                    if acks.last().is_none_or(|(_, last)| *last < id) {
                        acks.push((self.now, id));
                    }
                    if let Some(r) =
                        self.history.get_mut(&(chunk, b)).and_then(|h| h.iter_mut().find(|r| r.id == id))
                    {
                        r.acked = true;
                    }
                }
                self.clients[c].versions.insert(chunk, new);
                self.finish_op(c);
            }
            Step::Refresh | Step::BelowMinSize => {
                self.send(Ep::Client(c), Ep::Meta, Msg::MapRequest);
                self.wait(c, 10_000);
            }
            Step::Degrade(n) => self.degrade(c, pg, n),
            Step::Fenced => self.fenced(c),
            Step::Settle => {
                self.clients[c].unsettled.insert(chunk);
                self.wait(c, 0);
            }
        }
        Ok(())
    }

    fn on_chunk_reply(&mut self, c: usize, attempt: u64, node: u64, copy: Option<ChunkCopy>) {
        let Some(op) = self.clients[c].op.as_mut() else { return };
        if op.attempt != attempt {
            return;
        }
        let OpPhase::Settling { pending, copies, pg, interval } = &mut op.phase else { return };
        let Some(copy) = copy else {
            self.send(Ep::Client(c), Ep::Meta, Msg::MapRequest);
            self.wait(c, 10_000);
            return;
        };
        pending.remove(&node);
        copies.insert(node, copy);
        if !pending.is_empty() {
            return;
        }
        let (pg, interval) = (*pg, *interval);
        let copies = std::mem::take(copies);
        let OpKind::Write { chunk, .. } = op.kind else { return };
        let versions: BTreeMap<u64, Version> = copies.iter().map(|(n, c)| (*n, c.version)).collect();
        let client = &mut self.clients[c];
        let fresh = Version { generation: client.generation, seq: client.next_seq };
        client.next_seq += 1;
        let map = self.clients[c].map.clone();
        let active: BTreeSet<u64> =
            map.pg(R, pg).map(|a| a.active(&map.incarnations())).unwrap_or_default().into_iter().collect();
        let client = &mut self.clients[c];
        let Some((winner, installs)) = settle(&versions, &active, Some(fresh)) else {
            self.wait(c, 10_000);
            return;
        };
        let mut copy = copies.get(&winner).cloned().unwrap_or_default();
        copy.version = fresh;
        let generation = client.generation;
        let attempt = self.new_attempt(c);
        if let Some(op) = self.clients[c].op.as_mut() {
            op.phase =
                OpPhase::SettleInstall { pending: installs.iter().map(|i| i.node).collect(), version: fresh };
        }
        for i in installs {
            let msg = Msg::Install {
                op: attempt,
                pg,
                interval,
                generation,
                chunk,
                expected: i.expected,
                copy: copy.clone(),
            };
            self.send(Ep::Client(c), Ep::Node(i.node), msg);
            self.at(RPC_TIMEOUT, Event::Timer(Timer::RpcTimeout(c, attempt, i.node)));
        }
    }

    fn on_install_reply(
        &mut self,
        c: usize,
        attempt: u64,
        node: u64,
        result: InstallResult,
    ) -> Result<(), String> {
        let Some(op) = self.clients[c].op.as_mut() else { return Ok(()) };
        if op.attempt != attempt {
            return Ok(());
        }
        if result == InstallResult::Fenced {
            if matches!(op.kind, OpKind::Open) {
                self.fail_op(c, "a newer writer opened meanwhile");
            } else {
                self.fenced(c);
            }
            return Ok(());
        }
        if result != InstallResult::Installed {
            // Someone changed meanwhile: start the phase again from a fresh map.
            self.send(Ep::Client(c), Ep::Meta, Msg::MapRequest);
            self.wait(c, 10_000);
            return Ok(());
        }
        match &mut op.phase {
            OpPhase::SettleInstall { pending, version } => {
                pending.remove(&node);
                if pending.is_empty() {
                    let version = *version;
                    let OpKind::Write { chunk, .. } = op.kind else { return Ok(()) };
                    self.log(format!("client {c}: chunk {chunk} settled at {version:?}"));
                    self.clients[c].versions.insert(chunk, version);
                    self.clients[c].unsettled.remove(&chunk);
                    self.restart_op(c)?;
                }
            }
            OpPhase::Reconciling { pending, .. } => {
                pending.remove(&node);
                if pending.is_empty() {
                    // Compare again from a fresh map: a member admitted meanwhile was not in this
                    // pass. The open returns after a pass that finds every counted copy identical.
                    self.send(Ep::Client(c), Ep::Meta, Msg::MapRequest);
                    self.wait(c, 5_000);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn on_fence_reply(
        &mut self,
        c: usize,
        attempt: u64,
        node: u64,
        incarnation: u64,
        node_views: BTreeMap<u32, (u64, bool)>,
        reply: Option<BTreeMap<u64, ChunkCopy>>,
    ) {
        let Some(op) = self.clients[c].op.as_mut() else { return };
        if op.attempt != attempt {
            return;
        }
        let OpPhase::Fencing { map, .. } = &op.phase else { return };
        let map = map.clone();
        if map.nodes.get(&node).is_none_or(|n| n.incarnation != incarnation) {
            // The node restarted since this map: wait for the map that voids its old entries.
            self.send(Ep::Client(c), Ep::Meta, Msg::MapRequest);
            self.wait(c, 20_000);
            return;
        }
        let Some(op) = self.clients[c].op.as_mut() else { return };
        let OpPhase::Fencing { generation, pending, copies, views, .. } = &mut op.phase else { return };
        let Some(reply) = reply else {
            self.fail_op(c, "a newer writer opened meanwhile");
            return;
        };
        pending.remove(&node);
        copies.insert(node, reply);
        views.insert(node, node_views);
        if !pending.is_empty() {
            return;
        }
        let generation = *generation;
        let copies = std::mem::take(copies);
        let views = std::mem::take(views);
        // Every counted member must have answered as counted at the pass's interval: a member
        // whose own view differs (it was recovering when it answered, or the PG changed) would
        // bring an untrusted copy or miss the reconciliation. Start the pass again from a new map.
        let incarnations = map.incarnations();
        let consistent = map.pg_sets.get(&R).into_iter().flatten().enumerate().all(|(pg, a)| {
            a.counted(&incarnations)
                .iter()
                .all(|n| views.get(n).and_then(|v| v.get(&(pg as u32))) == Some(&(a.interval, true)))
        });
        if !consistent {
            self.send(Ep::Client(c), Ep::Meta, Msg::MapRequest);
            self.wait(c, 20_000);
            return;
        }
        // Reconcile: per chunk, among the counted members of its PG, the highest copy wins.
        let mut installs = Vec::new();
        let mut versions = BTreeMap::new();
        let mut seq = self.clients[c].next_seq;
        for chunk in 0..CHUNKS {
            let pg = pg_of_chunk(chunk, map.pg_count);
            let Some(authority) = map.pg(R, pg) else { continue };
            let counted = authority.counted(&incarnations);
            let mut held: BTreeMap<u64, Version> = BTreeMap::new();
            for n in &counted {
                let v = copies.get(n).and_then(|m| m.get(&chunk)).map(|c| c.version).unwrap_or(Version::NONE);
                held.insert(*n, v);
            }
            let active: BTreeSet<u64> = authority.active(&incarnations).into_iter().collect();
            let Some((winner, plan)) = settle(&held, &active, None) else { continue };
            if !plan.is_empty() {
                let seen: Vec<String> = counted
                    .iter()
                    .map(|n| format!("{n}:{:?}", copies.get(n).and_then(|m| m.get(&chunk))))
                    .collect();
                self.log(format!(
                    "client {c}: open reconciles chunk {chunk}: winner {winner}, copies {seen:?}"
                ));
            }
            let mut copy = copies.get(&winner).and_then(|m| m.get(&chunk)).cloned().unwrap_or_default();
            // Copies differ: the winner goes to every counted copy under a fresh version of the
            // new generation, so that every counted copy changes version — a recovery pull planned
            // before this (from a source's older state) then fails its condition instead of
            // undoing the reconciliation on a member that already held the winner.
            let plan = if plan.is_empty() {
                plan
            } else {
                let fresh = Version { generation, seq };
                seq += 1;
                copy.version = fresh;
                settle(&held, &active, Some(fresh)).map(|(_, p)| p).unwrap_or_default()
            };
            versions.insert(chunk, copy.version);
            for i in plan {
                installs.push((i, pg, authority.interval, chunk, copy.clone()));
            }
        }
        self.clients[c].next_seq = seq;
        self.log(format!("client {c}: reconcile pass with {} install(s)", installs.len()));
        let attempt = self.new_attempt(c);
        if let Some(op) = self.clients[c].op.as_mut() {
            op.phase = OpPhase::Reconciling { pending: installs.iter().map(|(i, ..)| i.node).collect() };
        }
        self.clients[c].versions = versions;
        if installs.is_empty() {
            self.open_done(c);
            return;
        }
        for (i, pg, interval, chunk, copy) in installs {
            let msg =
                Msg::Install { op: attempt, pg, interval, generation, chunk, expected: i.expected, copy };
            self.send(Ep::Client(c), Ep::Node(i.node), msg);
            self.at(RPC_TIMEOUT, Event::Timer(Timer::RpcTimeout(c, attempt, i.node)));
        }
    }

    fn open_done(&mut self, c: usize) {
        let Some(op) = self.clients[c].op.as_ref() else { return };
        let generation = op.opening;
        self.log(format!("client {c}: open of generation {generation} returned"));
        self.stats.opens += 1;
        self.opened_generation = self.opened_generation.max(generation);
        self.opened_at.entry(generation).or_insert(self.now);
        if self.healing {
            // Valid only if no PG changed while the open ran (it started on a clean pool).
            self.healed_at_open = self.clean() && self.open_intervals.as_ref() == Some(&self.intervals());
        }
        let client = &mut self.clients[c];
        client.generation = generation;
        client.fenced = false;
        client.unsettled.clear();
        self.finish_op(c);
    }

    /// I2: the value of every block is the latest acknowledged before the read began, or a later
    /// write's.
    fn check_read(
        &mut self,
        c: usize,
        node: u64,
        pg: u32,
        interval: u64,
        copy: ChunkCopy,
    ) -> Result<(), String> {
        let Some(op) = self.clients[c].op.as_ref() else { return Ok(()) };
        let OpKind::Read { chunk } = op.kind else { return Ok(()) };
        let started = op.started;
        for (b, value) in copy.blocks.iter().enumerate() {
            let history = self.history.get(&(chunk, b)).cloned().unwrap_or_default();
            let floor = self.floor(chunk, b, started);
            let ok = *value == floor || (*value > floor && history.iter().any(|r| r.id == *value));
            if !ok {
                return Err(format!(
                    "I2: client {c} read chunk {chunk} block {b} = {value} from node {node} (pg {pg}, interval {interval}); latest acknowledged before the read: {floor}"
                ));
            }
        }
        self.stats.reads_checked += 1;
        self.finish_op(c);
        Ok(())
    }

    /// The newest write of a block acknowledged before `time` (0: none).
    fn floor(&self, chunk: u64, block: usize, time: u64) -> u64 {
        self.acked_floor
            .get(&(chunk, block))
            .and_then(|acks| acks.iter().rev().find(|(t, _)| *t < time))
            .map(|(_, id)| *id)
            .unwrap_or(0)
    }

    fn deliver(&mut self, from: Ep, to: Ep, msg: Msg) -> Result<(), String> {
        match to {
            Ep::Meta => {
                self.meta_receive(from, msg);
                Ok(())
            }
            Ep::Node(id) => self.node_receive(id, from, msg),
            Ep::Client(c) => self.client_receive(c, msg),
        }
    }

    // ---------------------------------------------------------------- the end

    fn unhealed(&self) -> String {
        let incarnations = self.meta.incarnations();
        let mut out = Vec::new();
        for (pg, a) in self.meta.pg_sets.get(&R).into_iter().flatten().enumerate() {
            if a.active(&incarnations).len() != a.members.len() || a.members.len() < usize::from(R) {
                out.push(format!("pg {pg}: {:?}", a.members));
            }
        }
        let ops: Vec<String> = self
            .clients
            .iter()
            .map(|c| format!("{:?}", c.op.as_ref().map(|o| (&o.kind, &o.phase))))
            .collect();
        format!(
            "{}; incarnations {incarnations:?}; final open done: {}; ops {ops:?}",
            out.join(", "),
            self.final_open_done()
        )
    }

    /// Every PG's members all active and valid, at least R of them.
    fn clean(&self) -> bool {
        let incarnations = self.meta.incarnations();
        self.meta
            .pg_sets
            .get(&R)
            .into_iter()
            .flatten()
            .all(|a| a.active(&incarnations).len() == a.members.len() && a.members.len() >= usize::from(R))
    }

    fn intervals(&self) -> Vec<u64> {
        self.meta.pg_sets.get(&R).into_iter().flatten().map(|a| a.interval).collect()
    }

    fn done(&self) -> bool {
        self.clean() && self.final_open_done() && self.clients.iter().all(|c| c.op.is_none())
    }

    /// I1, I5: every active copy of every chunk is identical and holds every acknowledged write.
    fn final_checks(&mut self) -> Result<(), String> {
        let incarnations = self.meta.incarnations();
        for chunk in 0..CHUNKS {
            let pg = pg_of_chunk(chunk, self.meta.pg_count);
            let active = self.meta.pg(R, pg).map(|a| a.active(&incarnations)).unwrap_or_default();
            let copies: Vec<(u64, ChunkCopy)> = active
                .iter()
                .map(|n| {
                    (
                        *n,
                        self.nodes.get(n).and_then(|x| x.disk.cache.get(&chunk)).cloned().unwrap_or_default(),
                    )
                })
                .collect();
            for (n, copy) in &copies {
                if copy != &copies[0].1 {
                    return Err(format!(
                        "I5: chunk {chunk}: node {n} holds {copy:?}, node {} holds {:?}",
                        copies[0].0, copies[0].1
                    ));
                }
            }
            if let Some((_, copy)) = copies.first() {
                for (b, value) in copy.blocks.iter().enumerate() {
                    let floor = self.floor(chunk, b, u64::MAX);
                    let history = self.history.get(&(chunk, b)).cloned().unwrap_or_default();
                    if !(*value == floor || (*value > floor && history.iter().any(|r| r.id == *value))) {
                        return Err(format!(
                            "I1: chunk {chunk} block {b} holds {value}; the latest acknowledged write is {floor}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Node {
    fn new(id: u64, incarnation: u64) -> Node {
        Node {
            id,
            alive: false,
            frozen: false,
            disk: Disk::default(),
            incarnation,
            map: None,
            lease_until: 0,
            lease_epoch: 0,
            suspects: BTreeSet::new(),
            touched_at: BTreeMap::new(),
            joined_at: BTreeMap::new(),
            recovering: BTreeMap::new(),
        }
    }

    /// Records, for each PG where the new map makes this node joining, the interval it first
    /// saw (it applies nothing at an interval before it knows it, so every mutation it applied as
    /// a joining member carries this interval or a later one).
    fn note_joining(&mut self) {
        let Some(map) = self.map.clone() else { return };
        for (pg, authority) in map.pg_sets.get(&R).into_iter().flatten().enumerate() {
            if authority.role(self.id, self.incarnation) == Role::Joining {
                self.joined_at.entry(pg as u32).or_insert(authority.interval);
            } else {
                self.joined_at.remove(&(pg as u32));
            }
        }
    }

    /// The newest interval this node knows of `pg` and its role there.
    fn pg_view(&self, pg: u32) -> (u64, Role) {
        match self.map.as_ref().and_then(|m| m.pg(R, pg)) {
            Some(a) => (a.interval, a.role(self.id, self.incarnation)),
            None => (0, Role::None),
        }
    }

    /// The volume's fence: the highest generation persisted here or committed in the map.
    fn fence(&self) -> u64 {
        let committed =
            self.map.as_ref().and_then(|m| m.volumes.get(VOLUME)).map(|v| v.generation).unwrap_or(0);
        self.disk.fence.max(committed)
    }
}

/// A storage node joining the simulated pool (nodes 1–3 are the metadata voters).
fn register(id: u64, time_ms: u64) -> Command {
    Command::RegisterNode {
        id,
        addr: NodeAddr { rpc: format!("sim:{id}"), ..NodeAddr::default() },
        voter: id <= 3,
        capacity_bytes: 1 << 40,
        time_ms,
    }
}

/// Creates the simulated volume (id 1, `chunks` chunks of 64 KiB, `replicas` copies).
fn create_volume(meta: &mut ClusterState, name: &str, chunks: u64, replicas: u8) {
    let created = meta.apply(Command::CreateVolume {
        name: name.into(),
        size_bytes: chunks * (1 << 16),
        chunk_size_bytes: 1 << 16,
        replicas,
        shared: false,
        time_ms: 0,
    });
    assert!(matches!(created, CommandResult::Volume(ref v) if v.id == 1), "{created:?}");
}

/// A node the simulation names is one it has (of either model).
trait ExpectNode<'a, T> {
    fn expect_node(self) -> T;
}

impl<'a, N> ExpectNode<'a, &'a mut N> for Option<&'a mut N> {
    fn expect_node(self) -> &'a mut N {
        match self {
            Some(n) => n,
            None => unreachable!("the simulation only names nodes it has"),
        }
    }
}

impl<'a, N> ExpectNode<'a, &'a N> for Option<&'a N> {
    fn expect_node(self) -> &'a N {
        match self {
            Some(n) => n,
            None => unreachable!("the simulation only names nodes it has"),
        }
    }
}

/// Runs one seed.
pub fn run_seed(seed: u64) -> Result<Stats, String> {
    World::new(seed).run()
}
