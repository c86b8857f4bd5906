//! Deterministic simulation of the data path production runs today: majority writes with a
//! missed-writes log, per-node catch-up ended by the leader, per-PG read leases with the hold-back
//! of missed writes, and joins filled (seeded, copied, admitted) before they serve.
//!
//! **Under test, unchanged (production's own code):** the metadata state machine
//! (`ClusterState::apply`: liveness, restarts, catch-up, rebalance, backfill and admission), the
//! leader's decisions (`cairn_meta::catchup::LeaderView::decide`: who is down, who restarted, who
//! catches up again, whose catch-up or fill ends), the read-lease books and rules
//! (`Grants::grant`/`holdback`, `Leases::covers`/`renewed`, `lease_needs`, `barrier_lifted`,
//! `serves_clients`) and a storage node's stale-map check of a mutation (`PgIndex::check`,
//! `PgCheck::refusal`, `PgCheck::to_record`), and an open's choice of the copy that wins a
//! reconciliation (`cairn_engine::reconcile::settle`).
//! **Modelled after production's async shells** (`cairn-client::volume` `mutate`/`read_aligned`,
//! `cairn-node::server` `handle`, `cairn-node::recovery` `run`/`seed_backfill`, `cairn-node::missed`,
//! `MetaService`'s loops): which nodes a write goes to and names as missed, when it is acknowledged
//! (every target applied, at least a majority, records confirmed), the records a node makes and
//! when it holds an acknowledgement back, lease rounds, reports, seeding, and the catch-up copies
//! (version asked first, installed only over that version, never from a source the target recorded
//! as having missed the chunk, entries cleared only if not written again meanwhile), the revival
//! of chunks no holder is in sync for (`revive_chunk`), the dirty-chunk comparison of a node that
//! catches up (`compare_dirty`), and a new writer's open (`VolumeClient::generation`,
//! `fence_and_reconcile`: commit a generation, fence, reconcile the dirty chunks).
//!
//! **Faults:** SIGKILL and restart of any node (the page cache survives; memory does not), power
//! loss of one node while the pool is healthy (unflushed chunks kept or reverted; back, it pulls
//! its dirty chunks and compares chunk lists), a power loss of every node at once (at most once;
//! only flushed writes are owed after it; the writer flushes now and then), a node frozen (messages to it wait, it does nothing,
//! then it resumes with its old memory), partitions between any two endpoints (nodes, the
//! writer, the reader) and splits of two nodes from the rest, a node joining, metadata fail-over
//! (the new leader knows nothing of earlier reports), a writer handover (a new host opens the
//! volume; the old writer goes on until refused), and up to two faults at a time.
//!
//! **Oracle:** every read (by the writer or by a second client that only reads) returns the latest
//! value acknowledged before it began or a later one (I2: never older, never zeros for written
//! data). At the end every fault is healed, the pool must settle (every node in sync and serving,
//! no missed-writes entry left, nobody being filled) with every holder holding every acknowledged
//! write (I1), and after a final write of every chunk every holder must hold it (I5). An old
//! writer's write acknowledged after the new writer's open returned must have been applied somewhere
//! before (I3), and after the open every replica serves one copy of each chunk not written since
//! (I3's second clause: a write never acknowledged that some replicas lack is not served;
//! `Options::check_one_copy_after_open`).
//!
//! Simplifications, stated so nobody reads more into a pass: one volume of 3 copies, one writer at
//! a time (no shared volume), one handover per seed, whole-chunk writes (a version check stands for
//! the store's; a conflict is "settled" by writing again over any older copy, or with
//! `Options::writer_settles` as production's `settle_chunk`); a node handles each
//! message atomically (its map may advance between a mutation's check before and after it is
//! applied); power loss only while the pool is healthy, whole chunks kept or reverted; a flush
//! covers every PG (unless `Options::pg_flushes`); links fail both ways (TCP) unless `Options::one_way_partitions` (then some lose
//! one direction's messages only, the other's arriving: what a connection established before the
//! cut sees).

use crate::{ExpectNode, Rng, create_volume, register};
use cairn_engine::reconcile::settle;
use cairn_meta::catchup::{
    Grants, LeaderView, Leases, barrier_lifted, lease_need, lease_needs, serves_clients,
};
use cairn_meta::network::NodeReport;
use cairn_meta::pgcheck::{PgCheck, PgIndex};
use cairn_meta::state::{ClusterState, Command, CommandResult};
use cairn_types::placement::pg_of;
use cairn_types::{ChunkIndex, Version, VolumeId};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::rc::Rc;

const R: u8 = 3;
const VOLUME_ID: u64 = 1;
const CHUNKS: u64 = 8;
const PG_COUNT: u32 = 4;
/// Production's timings (milliseconds): `MetaConfig` defaults, the client's and recovery's.
const HEARTBEAT_MS: u64 = 1000;
const DOWN_AFTER_MS: u64 = 5000;
const LEADER_TICK_MS: u64 = 250;
const LEASE_POLL_MS: u64 = 100;
const LEASE_CALL_TIMEOUT_MS: u64 = 1000;
const RECOVERY_MS: u64 = 300;
const MAP_SYNC_MS: u64 = 50;
const CLIENT_REFRESH_MS: u64 = 1000;
const CLIENT_RETRY_MS: u64 = 100;
const RPC_TIMEOUT_MS: u64 = 5000;
const HOLDBACK_ALLOWANCE_MS: u64 = 3500;
const IO_TIMEOUT_MS: u64 = 30_000;
const SUSPECT_TTL_MS: u64 = 15_000;
const ELECTION_MS: u64 = 1500;
const RUN_MS: u64 = 60_000;
const HEAL_MS: u64 = 240_000;
/// `cairn_store::DIRTY_LINGER_FLUSHES`: a chunk's dirty flag outlasts this many flushes.
const DIRTY_LINGER_FLUSHES: u32 = 16;
/// `cairn-client`'s `FENCE_REPORTS_FRESH`.
const FENCE_REPORTS_FRESH_MS: u64 = 1000;
/// `cairn-node`'s `PULL_OWN_AFTER`: a writer's attempt lasts at most its RPC timeout and the
/// hold-back allowance.
const PULL_OWN_AFTER_MS: u64 = 10_000;

/// What a run leaves out of production's rules, to show what the simulation finds without them.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Nodes refuse a mutation routed by a map older than theirs for the chunk's PG
    /// (`PgCheck::writer_behind`).
    pub check_writer_interval: bool,
    /// A catch-up copy relayed from another replica clears the relayer's entry only if it is at
    /// least as new as the relayer's own copy.
    pub relay_keeps_newer: bool,
    /// A write is acknowledged only once all of the chunk's holders but R − q applied it (else a
    /// majority of R, as before: too few once a PG took in a filled node).
    pub all_holders_but_r_minus_q: bool,
    /// A node that must pull its own copies back while no holder is in sync revives them from the
    /// holders' own copies (`recovery::revive_chunk`; else it waits for an in-sync holder).
    pub revive: bool,
    /// Nodes refuse a mutation of a generation below their fence or their map's (a handed-over
    /// writer's), and the new writer's open fences them.
    pub fence: bool,
    /// The new writer's open reconciles the chunks dirty on the holders it fenced.
    pub reconcile_dirty: bool,
    /// A catch-up's dirty-chunk comparison records as missed (and pulls back) only a copy of an
    /// older writer generation than the volume's: a copy of the current writer's differs only by
    /// its writes in flight (else every copy that differs is pulled back, perhaps older).
    pub compare_keeps_newer: bool,
    /// An open asks each dirty chunk's state again when its turn comes (else it settles on the
    /// fence's reports), and leaves out a holder that recorded itself as missing the chunk.
    pub fresh_states: bool,
    /// The oracle also checks that after the new writer's open every replica serves one copy of a
    /// chunk it has not written since (I3's second clause; on by default since the open's records
    /// are settled and copies name their source).
    pub check_one_copy_after_open: bool,
    /// The range of a node's writeback interval (ms; the kernel's, making the page cache durable):
    /// 1–4 s by default. Linux's own (dirty pages written within 5–30 s) leaves unflushed data
    /// exposed longer, and shows a known gap after a power loss of every node (ARCHITECTURE.md).
    pub writeback_ms: (u64, u64),
    /// A node refuses to confirm a record of a write (`RecordMissed` with `at`) for a chunk it
    /// recorded itself as missing: its copy is to be pulled back.
    pub unsure_copy_confirms_nothing: bool,
    /// A node pulling its own copy back (after a power loss) waits until writes it may have
    /// answered before are past their writers' attempts, and pulls the newest in-sync copy (else
    /// at once, from any in-sync holder).
    pub pull_newest: bool,
    /// The new writer's `OpenVolume` names the generation it read (`after`): the state machine
    /// opens none if a newer one is committed, so a request re-sent after its answer was lost,
    /// or committed late, fences nothing (else every request opens a generation).
    pub open_names_after: bool,
    /// An open's records of the holders outside a reconciliation carry its generation, and the
    /// copy a record sends goes over a copy of an older generation even if higher (a fenced
    /// writer's leftover the open did not reach; else a higher copy is kept, one writer's chain).
    pub settled_records_replace: bool,
    /// A copy names the node it is from, and a peer that recorded that node as having missed
    /// the chunk refuses it (its copy lacks a write, or is a leftover an open settled without
    /// it); else only a shared volume's copies are checked so.
    pub copies_name_source: bool,
    /// An open records the nodes being filled with a reconciled chunk's PG as having missed it
    /// (settled) whether or not it installed a copy: a holder may have given them an old
    /// writer's leftover it has pulled back since (else only if it installed one).
    pub fill_members_settled: bool,
    /// A copy sent for a settled record goes over a copy of an older generation even if the
    /// target recorded its source as having missed the chunk by an older record (else two nodes,
    /// each recording the other, may refuse each other's copies for good).
    pub settled_overrides_records: bool,
    /// A copy of a chunk dirty on its source is installed dirty (`Store::install_range`'s
    /// `dirty`): it may carry a write never confirmed, which the next open must then reconcile
    /// and a catch-up compare (else every install is clean).
    pub copies_carry_dirty: bool,
    /// An open goes on past a reconciled chunk only once a quorum of the holders that took part
    /// recorded the ones left out (else once any one did).
    pub records_need_quorum: bool,
    /// A catch-up copy carries its sender's writer generation and a node refuses one below its
    /// fence or its map's generation, as a write (else copies are not fenced).
    pub installs_check_generation: bool,
    /// A node that missed the current writer's fence passes on an in-sync replica's copy of a
    /// chunk dirty on it of an older generation, not its own (else it copies its own).
    pub unfenced_strays_relayed: bool,
    /// Every holder that took part in a reconciliation is asked to confirm its copy is still the
    /// settled one (with the open's record of the holders outside, if any), and one that does not
    /// (its copy moved since, it is unsure of it, or it did not answer) is recorded in turn,
    /// settled, on the ones that did, as left out (else records are sent only if some holder was
    /// outside, and a refuser is only suspected: it may serve a copy it pulled back meanwhile,
    /// older than the settled one).
    pub refusers_recorded: bool,
    /// A node whose map shows it down (not only one catching up) passes on an in-sync replica's
    /// copy rather than its own (else only one catching up does: a node cut off from the pool,
    /// back before the leader saw it, copied a stray it held to a node being filled).
    pub down_nodes_relay: bool,
    /// Some partitions lose the messages of one direction only (from the node, or to it; the
    /// other direction's arrive). Off by default: it changes every seed's schedule, and the
    /// rules' tests name seeds of the default one (`one_way_partitions_keep_every_invariant`
    /// runs seeds with it on).
    pub one_way_partitions: bool,
    /// A node unsure of its copy of a chunk (it recorded itself as missing it: a power loss took
    /// writes it had not flushed) takes a newer copy from a peer it recorded as having missed the
    /// chunk by writes only (not an open's settled record): one writer's versions grow along one
    /// chain, so the newer copy holds every write the record is of (else it refuses it, and a
    /// write both applied alone, each recording the other, leaves no copy anyone takes: seed
    /// 643 095 of the model of 5d0906d).
    pub unsure_takes_newer: bool,
    /// A flush covers only the PGs the client's acknowledged mutations touched since they were
    /// last flushed (`TouchedPgs`: marked when a mutation is acknowledged, cleared by a flush that
    /// covered the same mark), and one write in eight is FUA (flushed at once, its PG only:
    /// `VolumeClient::flush_range`); else every flush covers every PG and no write is FUA. Off
    /// by default: it changes every seed's schedule (`pg_flushes_keep_every_invariant` runs seeds
    /// with it on).
    pub pg_flushes: bool,
    /// A write whose chunk's version the writer does not know (after a failed or conflicting
    /// write) first makes the in-sync copies identical, as production's `settle_chunk`: the
    /// states of the in-sync holders it does not suspect (at least `deciders`), the highest copy
    /// that may win (none recorded as missed by another, the winner serving reads) installed over
    /// the others at the version seen (naming the winner as source: a node that recorded it
    /// refuses), then the write expects that version; a copy not installed gets its node
    /// suspected and the settle done again. Else the write expects no version (any older copy
    /// takes it). Off by default: it changes every seed's schedule (`writer_settles_keep_every_invariant`
    /// runs seeds with it on).
    pub writer_settles: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            check_writer_interval: true,
            relay_keeps_newer: true,
            all_holders_but_r_minus_q: true,
            revive: true,
            fence: true,
            reconcile_dirty: true,
            compare_keeps_newer: true,
            fresh_states: true,
            check_one_copy_after_open: true,
            writeback_ms: (1000, 4000),
            unsure_copy_confirms_nothing: true,
            pull_newest: true,
            open_names_after: true,
            settled_records_replace: true,
            copies_name_source: true,
            fill_members_settled: true,
            settled_overrides_records: true,
            copies_carry_dirty: true,
            records_need_quorum: true,
            installs_check_generation: true,
            unfenced_strays_relayed: true,
            refusers_recorded: true,
            down_nodes_relay: true,
            one_way_partitions: false,
            unsure_takes_newer: true,
            pg_flushes: false,
            writer_settles: false,
        }
    }
}

type Ep = u64;
/// The writer's endpoint (nodes are 1..).
const CLIENT: Ep = 0;
/// A second client that only reads (another host reading the volume: a live-migration target, a
/// node's own NBD export), with its own map and no knowledge of the writer's failures.
const READER: Ep = 100;
/// The host a writer handover moves the volume to (the old writer goes on until it is fenced).
const NEW_WRITER: Ep = 200;
/// A version is `generation × GEN + seq`: ordered as production's (generation, sequence).
const GEN: u64 = 1_000_000;
/// Marks the open's requests and records (no op of a client has this id).
const OPEN_OP: u64 = u64::MAX;

fn generation_of(version: u64) -> u64 {
    version / GEN
}

/// A model version as production's (`cairn_types::Version`).
fn as_version(version: u64) -> cairn_types::Version {
    cairn_types::Version { generation: version / GEN, seq: version % GEN }
}

/// The simulated volume's writer generation in `map` (0 before its first open).
fn volume_generation(map: &ClusterState) -> u64 {
    map.volumes.values().find(|v| v.id == VOLUME_ID).map_or(0, |v| v.generation)
}

#[derive(Debug, Clone)]
enum Msg {
    /// Client requests carry the op and its attempt: a reply is matched to its request (as
    /// production's RPC matches replies per call), never to a later attempt.
    Write {
        op: (u64, u64),
        chunk: u64,
        version: u64,
        /// The version the writer expects the copy at (its last acknowledged write of the chunk),
        /// or none known (then any older copy takes it).
        expect: Option<u64>,
        missed_by: Vec<u64>,
        interval: u64,
    },
    WriteReply {
        op: (u64, u64),
        from: u64,
        reply: Answer,
    },
    RecordMissed {
        op: (u64, u64),
        chunk: u64,
        peers: Vec<u64>,
        at: u64,
        /// An open's record: the generation whose open settled the chunk (0: a write's record).
        settled: u64,
    },
    RecordReply {
        op: (u64, u64),
        from: u64,
        ok: bool,
    },
    Read {
        op: (u64, u64),
        chunk: u64,
    },
    ReadReply {
        op: (u64, u64),
        from: u64,
        version: Option<u64>,
    },
    LeaseReq {
        round: u64,
        from: u64,
        in_sync_epoch: u64,
    },
    LeaseReply {
        round: u64,
        from: u64,
        granted: bool,
    },
    VersionReq {
        job: u64,
        from: u64,
        chunk: u64,
    },
    VersionReply {
        job: u64,
        version: u64,
    },
    SourceRead {
        job: u64,
        from: u64,
        chunk: u64,
        /// `ReadCopy` (a revival): answered whether or not the source serves reads.
        any: bool,
    },
    /// `ChunkVersion` for a revival: the holder's version and whom it recorded as missing the chunk.
    ReviveReq {
        job: u64,
        from: u64,
        chunk: u64,
    },
    ReviveReply {
        job: u64,
        from: u64,
        version: u64,
        missed_by: Vec<u64>,
    },
    SourceReply {
        job: u64,
        version: Option<u64>,
        /// The source's copy is dirty (changed lately: it may hold a write not yet confirmed).
        dirty: bool,
    },
    Install {
        job: u64,
        from: u64,
        chunk: u64,
        version: u64,
        expect: u64,
        source: Option<u64>,
        /// The record's `settled` (`InstallRange::settled`).
        settled: u64,
        /// The source's copy is dirty: so is the copy installed (`InstallRange::dirty`).
        dirty: bool,
        /// The sender's writer generation for the volume (its fence or its map's, the higher).
        generation: u64,
    },
    InstallReply {
        job: u64,
        ok: bool,
    },
    Report(NodeReport),
    /// `ListChunks`: which chunks the peer holds (a node back from a power loss compares).
    ListReq {
        from: u64,
    },
    ListReply {
        from: u64,
        chunks: Vec<u64>,
    },
    CatchUp {
        node: u64,
    },
    /// A new writer asks the metadata leader for a generation newer than `after` (`OpenVolume`; one
    /// request at a time, as production's client: a re-sent one commits nothing more).
    Open {
        after: u64,
    },
    /// A client's `Flush`: this node's copies made durable (`Store::flush`).
    Flush {
        round: u64,
    },
    FlushReply {
        round: u64,
        from: u64,
    },
    /// `ChunkVersion` for a catch-up's dirty-chunk comparison (one request for the chunks the
    /// source holds).
    CompareReq {
        round: u64,
        from: u64,
        chunks: Vec<u64>,
    },
    CompareReply {
        round: u64,
        from: u64,
        infos: Vec<ChunkState>,
    },
    /// `Fence`: raise the generation; the answer names the chunks dirty here (with each one's
    /// version and whom this node recorded as missing it) and whether this node serves.
    Fence {
        round: u64,
        generation: u64,
    },
    FenceReply {
        round: u64,
        from: u64,
        fenced: bool,
        serving: bool,
        dirty: Vec<(u64, u64, Vec<u64>)>,
    },
    /// `ChunkVersion` from a client's reconciliation.
    Info {
        round: u64,
        chunk: u64,
    },
    InfoReply {
        round: u64,
        from: u64,
        version: u64,
        missed_by: Vec<u64>,
        /// It serves client reads of the chunk now (a writer's settle reads the winner's copy
        /// with a client read).
        serving: bool,
    },
    /// A reconciliation's copy (`Install` from the client): applied only if the copy here is still
    /// at `expect`, refused if the node's fence is above `generation`.
    Put {
        round: u64,
        chunk: u64,
        version: u64,
        expect: u64,
        generation: u64,
        /// The node the copy is from (a writer's settle; `InstallRange::source`): refused by a
        /// node that recorded it as having missed the chunk (`RecordedSource::taken`).
        source: Option<u64>,
    },
    PutReply {
        round: u64,
        from: u64,
        ok: bool,
        fenced: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Applied,
    Unavailable,
    /// `VersionMismatch { behind: true }`: the copy is older than the version the writer expects
    /// (it missed a write): failed, and recorded as missed.
    Behind,
    /// `VersionMismatch { behind: false }`: the copy holds another version (a failed write's
    /// leftover): the writer settles and writes again.
    Conflict,
    /// `Fenced`: a newer writer holds the volume; this writer stops.
    Fenced,
}

#[derive(Debug, Clone)]
enum Event {
    Deliver {
        from: Ep,
        to: Ep,
        msg: Msg,
    },
    /// Node timers carry the node's life (a restart starts new ones).
    Heartbeat(u64, u64),
    LeasePoll(u64, u64),
    LeaseRoundEnd {
        node: u64,
        round: u64,
    },
    Recovery(u64, u64),
    JobTimeout {
        node: u64,
        job: u64,
    },
    CompareTimeout {
        node: u64,
        round: u64,
    },
    MapSync(u64, u64),
    /// The node's periodic flush (a client's flush, the kernel's writeback).
    Flush(u64, u64),
    LeaderTick,
    Commit {
        term: u64,
        commands: Vec<Command>,
    },
    ClientNext(Ep),
    ClientRefresh(Ep),
    ClientTimeout {
        client: Ep,
        op: u64,
        attempt: u64,
    },
    ClientRetry {
        client: Ep,
        op: u64,
        attempt: u64,
    },
    /// A flush round timed out.
    FlushRound {
        client: Ep,
        round: u64,
    },
    /// A writer's settle round timed out, or its pause before the next one is over.
    SettleRound {
        client: Ep,
        round: u64,
    },
    /// A step of a writer's open timed out (or is due).
    OpenStep {
        client: Ep,
        round: u64,
    },
    Fault,
    Restart(u64),
    Unfreeze(u64),
    Heal {
        a: Ep,
        b: Ep,
    },
}

struct Queued {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// One entry of a node's missed-writes log (durable).
#[derive(Debug, Clone, Copy)]
struct Entry {
    seed: bool,
    seq: u64,
    /// Made by an open's reconciliation of generation `settled` (`MissedLog::settle`; 0: by
    /// writes only): the copy it sends goes over any copy of an older generation.
    settled: u64,
}

#[derive(Debug, Clone)]
struct LeaseRound {
    id: u64,
    sent: u64,
    epoch: u64,
    needs: Vec<(Vec<u64>, usize)>,
    asked: BTreeSet<u64>,
    granted: BTreeSet<u64>,
    answered: BTreeSet<u64>,
}

/// A holder's answer to a revival: its version of the chunk and whom it recorded as missing it.
type ReviveAnswer = (u64, Vec<u64>);

#[derive(Debug, Clone)]
struct Job {
    id: u64,
    peer: u64,
    chunk: u64,
    seq: u64,
    /// The node whose copy is sent (this node, or an in-sync replica relayed).
    source: u64,
    target_version: Option<u64>,
    /// The version sent (the source's).
    version: Option<u64>,
    /// A revival (`recovery::revive_chunk`): the other holders asked, and their answers so far
    /// (version, whom each recorded as missing the chunk).
    revive: Option<(BTreeSet<u64>, BTreeMap<u64, ReviveAnswer>)>,
    /// The `revive` round only asks the in-sync sources which is newest (`pull_own`).
    newest: bool,
    /// The entry's `settled`: the copy goes over a peer's copy of an older generation.
    settled: u64,
}

#[derive(Debug)]
struct Node {
    id: u64,
    alive: bool,
    frozen: bool,
    /// Process starts so far (timers of an earlier process stop).
    life: u64,
    /// When this process started.
    started_at: u64,
    boot_id: u64,
    /// The node's applied cluster map (survives a restart, as Raft's state does).
    map: Rc<ClusterState>,
    index: Rc<PgIndex>,
    index_epoch: u64,
    /// chunk → version (the value is the version: each write's own), as the process sees it (the
    /// page cache: survives a kill).
    store: BTreeMap<u64, u64>,
    /// What a power loss keeps for certain (the last flush).
    durable: BTreeMap<u64, u64>,
    /// Chunks changed since the last flush (their dirty flag is durable).
    dirty: BTreeSet<u64>,
    /// Back from a power loss, the chunk-list comparison with the peers is still to do
    /// (`DATA_DIR/power-loss-listing`; durable), and the peers that answered so far.
    listing: Option<BTreeMap<u64, Vec<u64>>>,
    /// (peer, chunk) → entry; durable.
    missed: BTreeMap<(u64, u64), Entry>,
    next_seq: u64,
    grants: Grants,
    leases: Leases,
    serving_from: u64,
    seeded: BTreeSet<(u64, u8, u32)>,
    seeded_epoch: u64,
    lease_round: Option<LeaseRound>,
    job: Option<Job>,
    /// Messages that reached it while frozen.
    held: Vec<(Ep, Msg)>,
    /// The volume's raised writer generation (durable).
    fence: u64,
    /// Chunks whose header says dirty (durable), with the flushes since their last change: the
    /// flag is cleared after `DIRTY_LINGER_FLUSHES` (`Store::dirty_chunks`).
    marked: BTreeMap<u64, u32>,
    /// The catch-up (named by the node's `in_sync_epoch`) whose dirty-chunk comparison is done
    /// (`recovery::DirtyCheck`; memory only).
    compared_for: Option<u64>,
    /// The dirty-chunk comparison under way: (round, catch-up, this node's versions of the chunks
    /// compared, per source asked its answer: per chunk (version, missed_by)).
    comparing: Option<Comparison>,
}

/// A holder's state of a chunk: (chunk, version, whom it recorded as missing it, its fence, whether
/// it serves; a chunk it lacks: version 0, fence 0, not serving — `ChunkInfo::absent`).
type ChunkState = (u64, u64, Vec<u64>, u64, bool);

/// See `Node::comparing`.
#[derive(Debug, Clone)]
struct Comparison {
    round: u64,
    period: u64,
    mine: BTreeMap<u64, u64>,
    /// Per chunk, the in-sync holders to compare with.
    sources: BTreeMap<u64, Vec<u64>>,
    answers: BTreeMap<u64, Option<Vec<ChunkState>>>,
}

#[derive(Debug, Clone)]
enum OpKind {
    Write { version: u64, applied_by: BTreeSet<u64> },
    Read { floor: u64, began: u64 },
}

#[derive(Debug, Clone)]
struct Op {
    id: u64,
    chunk: u64,
    kind: OpKind,
    deadline: u64,
    attempt: u64,
    /// Nodes asked in this attempt, and their answers (None: none yet).
    asked: BTreeMap<u64, Option<Answer>>,
    /// Read: candidates left to try in this attempt.
    candidates: Vec<u64>,
    /// Write: the records phase (the appliers asked to record who failed; whether a target
    /// answered "stale map"; the appliers' answers).
    recording: Option<(BTreeSet<u64>, bool, BTreeMap<u64, bool>)>,
}

/// A volume client (`VolumeClient`): its map, the nodes it saw fail, its one operation in flight.
#[derive(Debug)]
struct Client {
    ep: Ep,
    writer: bool,
    map: Rc<ClusterState>,
    suspects: BTreeMap<u64, u64>,
    op: Option<Op>,
    /// Per chunk, the version a write expects the copy at: the last acknowledged write's, or none
    /// known (after a failed or conflicting one; a new writer knows none).
    known: BTreeMap<u64, Option<u64>>,
    /// The writer generation its versions carry (0: the first writer, never opened in the model).
    generation: u64,
    /// A newer writer fenced it: it stops.
    fenced: bool,
    /// Its open, while under way (`VolumeClient::generation`).
    opening: Option<Opening>,
    /// Its flush, while under way.
    flushing: Option<Flushing>,
    /// Per PG its acknowledged mutations touched since they were flushed, the mark of the last
    /// one (`Options::pg_flushes`; `TouchedPgs`).
    touched: BTreeMap<u32, u64>,
    marks: u64,
    /// Per chunk, the last version this client got acknowledged (what its flush promises).
    own_acked: BTreeMap<u64, u64>,
    /// Its settle of its write's chunk, while under way (`Options::writer_settles`).
    settling: Option<Settling>,
}

/// A writer's settle of one chunk (`VolumeClient::settle_chunk`): its round, the states asked
/// (node → (version, recorded as missed, serving reads)), then the installs sent (node → ok).
#[derive(Debug, Clone)]
struct Settling {
    chunk: u64,
    round: u64,
    asked: BTreeSet<u64>,
    infos: BTreeMap<u64, (u64, Vec<u64>, bool)>,
    /// node → (installed, fenced), once answered.
    puts: BTreeMap<u64, Option<(bool, bool)>>,
    top: u64,
}

/// A client's flush: its round, deadline, the acknowledged versions it covers (those acknowledged
/// before it began), and the nodes asked and whether each flushed.
#[derive(Debug, Clone)]
struct Flushing {
    round: u64,
    deadline: u64,
    covers: BTreeMap<u64, u64>,
    asked: BTreeMap<u64, bool>,
    /// The PGs it covers, with their marks (`Options::pg_flushes`); none: every PG.
    pgs: Option<BTreeMap<u32, u64>>,
}

impl Client {
    fn new(ep: Ep, writer: bool, map: Rc<ClusterState>) -> Client {
        Client {
            ep,
            writer,
            map,
            suspects: BTreeMap::new(),
            op: None,
            known: BTreeMap::new(),
            generation: 0,
            fenced: false,
            opening: None,
            flushing: None,
            touched: BTreeMap::new(),
            marks: 0,
            own_acked: BTreeMap::new(),
            settling: None,
        }
    }
}

/// What an open waits for now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OpenStep {
    /// Its map to show a generation newer than `after` (the `OpenVolume` commit).
    Commit { after: u64 },
    /// The fence round's answers.
    Fence,
    /// The states of one dirty chunk on the live holders not reported yet.
    Infos(u64),
    /// The winner's copy installed on the others: (chunk, winner's version).
    Installs(u64, u64),
    /// The holders that took no part recorded as missing the chunk: (chunk, version recorded at).
    Records(u64, u64),
}

/// A new writer's open (`fence_and_reconcile`): commit a generation, fence every in-sync holder,
/// make the chunks dirty on them identical.
#[derive(Debug, Clone)]
struct Opening {
    round: u64,
    deadline: u64,
    generation: u64,
    step: OpenStep,
    /// The nodes asked in this step, and whether each answered well (None: no answer yet).
    asked: BTreeMap<u64, Option<bool>>,
    /// Holders that serve and were fenced.
    reached: BTreeSet<u64>,
    /// chunk → node → (version, missed_by), from the fence answers and the chunk-state questions.
    dirty: BTreeMap<u64, BTreeMap<u64, (u64, Vec<u64>)>>,
    /// The chunk being reconciled: the holders taking part, and whether a copy was installed.
    live: BTreeSet<u64>,
    installed: bool,
    /// When the fence round that named the dirty chunks ended (its reports are trusted for
    /// `FENCE_REPORTS_FRESH_MS`).
    fenced_at: u64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ProductionStats {
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub reads_checked: u64,
    pub reads_failed: u64,
    pub faults: u64,
    pub catch_ups: u64,
    pub fills: u64,
    pub holdbacks: u64,
    pub power_losses: u64,
    /// Chunks revived from the holders' own copies (no holder in sync).
    pub revivals: u64,
    /// Client flushes that completed.
    pub flushes: u64,
    /// Power losses of every node at once.
    pub pool_power_losses: u64,
    /// Writer handovers (a new writer opened the volume).
    pub handovers: u64,
    /// Opens that returned (fence and reconciliation done).
    pub opens: u64,
    /// Links cut one way only (`Options::one_way_partitions`).
    pub one_way_cuts: u64,
    /// FUA writes (`Options::pg_flushes`).
    pub fua_writes: u64,
    /// Writers' settles decided, and the copies they installed (`Options::writer_settles`).
    pub settles: u64,
    pub settle_installs: u64,
}

impl ProductionStats {
    /// Adds another run's counts to these.
    pub fn add(&mut self, o: &ProductionStats) {
        self.writes_acked += o.writes_acked;
        self.writes_failed += o.writes_failed;
        self.reads_checked += o.reads_checked;
        self.reads_failed += o.reads_failed;
        self.faults += o.faults;
        self.catch_ups += o.catch_ups;
        self.fills += o.fills;
        self.holdbacks += o.holdbacks;
        self.power_losses += o.power_losses;
        self.revivals += o.revivals;
        self.flushes += o.flushes;
        self.pool_power_losses += o.pool_power_losses;
        self.handovers += o.handovers;
        self.opens += o.opens;
        self.one_way_cuts += o.one_way_cuts;
        self.fua_writes += o.fua_writes;
        self.settles += o.settles;
        self.settle_installs += o.settle_installs;
    }
}

struct ProductionWorld {
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    nodes: BTreeMap<u64, Node>,
    meta: Rc<ClusterState>,
    leader: Option<u64>,
    term: u64,
    view: LeaderView,
    /// The leader's proposals in flight (it decides again only once they committed).
    proposing: usize,
    leader_lost_at: Option<u64>,
    /// Links cut, by direction (from, to): a message from `from` to `to` is lost.
    blocked: BTreeSet<(Ep, Ep)>,
    /// The client being driven now (`switch_to`), and the others.
    client: Client,
    other_clients: Vec<Client>,
    next_op: u64,
    next_version: u64,
    next_id: u64,
    /// Per chunk: the highest version acknowledged.
    acked: BTreeMap<u64, u64>,
    /// Per chunk, the highest version acknowledged before a flush that completed began: what a
    /// power loss of every node must keep (I1).
    flushed: BTreeMap<u64, u64>,
    pool_power_losses: u64,
    /// When every node last lost power.
    pool_power_loss_at: Option<u64>,
    /// An `OpenVolume` is proposed and not yet committed (or lost).
    open_pending: bool,
    /// When each node last answered a write of each version as applied (it held it then).
    confirmed_at: BTreeMap<(u64, u64), u64>,
    /// The current writer's endpoint (`NEW_WRITER` after a handover).
    writer_ep: Ep,
    handovers: u64,
    /// When the new writer's open returned (its generation, the time).
    opened_at: Option<(u64, u64)>,
    /// When each node first held each version, by a write or a copy (the I3 check of an old
    /// writer's acknowledgements).
    applied_at: BTreeMap<(u64, u64), u64>,
    /// After the new writer's open: per chunk it has sent no write of yet, the copy the first
    /// read begun since returned (and from which node): every replica must serve that one.
    pinned: BTreeMap<u64, (u64, u64)>,
    /// Chunks the new writer has sent a write of since its open.
    written_since_open: BTreeSet<u64>,
    /// The chunks I3 promises one copy of after the open: those it reconciled (dirty on a holder
    /// it fenced) and those an old writer's mutation reached once the new generation was
    /// committed. (A failed write's leftover from before, no longer dirty anywhere, is not
    /// reconciled: it stays until the chunk is next written — a failed write's blocks are
    /// undefined, as on a disk.)
    promised: BTreeSet<u64>,
    healing: bool,
    final_pass: Option<u64>,
    faulty: BTreeSet<u64>,
    joins: u64,
    trace: Vec<String>,
    /// `CAIRN_SIM_TRACE` set: every trace line is printed as it happens (to compare two runs).
    print_trace: bool,
    stats: ProductionStats,
    violation: Option<String>,
    options: Options,
}

fn pg(chunk: u64) -> u32 {
    match VolumeId::new(VOLUME_ID) {
        Ok(v) => pg_of(v, ChunkIndex(chunk), PG_COUNT).0,
        Err(_) => 0,
    }
}

impl Node {
    fn new(id: u64, boot_id: u64, map: Rc<ClusterState>, now: u64) -> Node {
        Node {
            id,
            alive: true,
            frozen: false,
            life: 0,
            started_at: now,
            boot_id,
            index: Rc::new(PgIndex::new(&map)),
            index_epoch: map.epoch,
            map,
            store: BTreeMap::new(),
            durable: BTreeMap::new(),
            dirty: BTreeSet::new(),
            listing: None,
            missed: BTreeMap::new(),
            next_seq: 0,
            fence: 0,
            marked: BTreeMap::new(),
            compared_for: None,
            comparing: None,
            grants: Grants::new(now),
            leases: Leases::default(),
            serving_from: 0,
            seeded: BTreeSet::new(),
            seeded_epoch: 0,
            lease_round: None,
            job: None,
            held: Vec::new(),
        }
    }

    fn set_map(&mut self, map: &Rc<ClusterState>) {
        self.map = map.clone();
    }

    fn check(&mut self, chunk: u64, missed_by: &[u64]) -> PgCheck {
        if self.index_epoch != self.map.epoch {
            self.index = Rc::new(PgIndex::new(&self.map));
            self.index_epoch = self.map.epoch;
        }
        match VolumeId::new(VOLUME_ID) {
            Ok(v) => self.index.check(self.id, v, ChunkIndex(chunk), missed_by),
            Err(_) => PgCheck::default(),
        }
    }

    fn serves_clients(&self) -> bool {
        serves_clients(&self.map, self.id, self.boot_id, self.serving_from)
    }

    /// A mutation or an install: in the page cache, the chunk dirty until the next flush.
    fn put(&mut self, chunk: u64, version: u64) {
        self.store.insert(chunk, version);
        self.dirty.insert(chunk);
        self.marked.insert(chunk, 0);
    }

    /// A copy installed by a peer or a client's reconciliation: a holder that serves records it for
    /// the PG's backfill members (the copy reaches them through the catch-up, as a write would).
    fn install(&mut self, chunk: u64, version: u64) {
        self.put_copy(chunk, version);
        let serving = self.serves_clients();
        let c = self.check(chunk, &[]);
        if c.holder && serving {
            self.record(&c.backfill, chunk, false);
        }
    }

    /// A whole copy installed (catch-up, pull-back, reconciliation): synced before it is
    /// acknowledged, and no longer dirty (`Store::install_range`'s last piece).
    fn put_copy(&mut self, chunk: u64, version: u64) {
        self.store.insert(chunk, version);
        self.durable.insert(chunk, version);
        self.dirty.remove(&chunk);
        self.marked.remove(&chunk);
    }

    /// The catch-up this process is in, if its map shows one (`DirtyCheck::catching_up`).
    fn catch_up_period(&self) -> Option<u64> {
        self.map
            .nodes
            .get(&self.id)
            .filter(|n| n.boot_id == self.boot_id && n.catching_up)
            .map(|n| n.in_sync_epoch)
    }

    /// Whether the dirty-chunk comparison of the catch-up it is in is still to do.
    fn compare_pending(&self) -> bool {
        self.catch_up_period().is_some_and(|p| self.compared_for != Some(p))
    }

    /// `MissedLog::renew_if_present`: a new seq for the entry, if there is one.
    fn renew(&mut self, peer: u64, chunk: u64) -> bool {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.missed.get_mut(&(peer, chunk)).map(|e| e.seq = seq).is_some()
    }

    fn record(&mut self, peers: &[u64], chunk: u64, seed: bool) {
        for p in peers {
            self.next_seq += 1;
            let seq = self.next_seq;
            match self.missed.get_mut(&(*p, chunk)) {
                Some(_) if seed => {}
                Some(e) => {
                    e.seq = seq;
                    e.seed = false;
                }
                None => {
                    self.missed.insert((*p, chunk), Entry { seed, seq, settled: 0 });
                }
            }
        }
    }

    /// Marks the entries of `peers` for `chunk` as made by an open of generation `generation`.
    fn settle(&mut self, peers: &[u64], chunk: u64, generation: u64) {
        for p in peers {
            if let Some(e) = self.missed.get_mut(&(*p, chunk)) {
                e.settled = e.settled.max(generation);
            }
        }
    }

    /// Peers with write entries, and peers with only seeds' entries.
    fn pending_split(&self) -> (Vec<u64>, Vec<u64>) {
        let mut by_peer: BTreeMap<u64, bool> = BTreeMap::new();
        for ((p, _), e) in &self.missed {
            let all_seed = by_peer.entry(*p).or_insert(true);
            *all_seed &= e.seed;
        }
        let written = by_peer.iter().filter(|(_, s)| !**s).map(|(p, _)| *p).collect();
        let seeded = by_peer.iter().filter(|(_, s)| **s).map(|(p, _)| *p).collect();
        (written, seeded)
    }

    fn holds_missed_for(&self, peer: u64) -> bool {
        self.missed.iter().any(|((p, _), e)| *p == peer && !e.seed)
    }

    fn report(&self) -> NodeReport {
        let (mut missed_for, seeded_for) = self.pending_split();
        // Until its chunk lists are compared, a node back from a power loss misses writes itself.
        if (self.listing.is_some() || self.compare_pending()) && !missed_for.contains(&self.id) {
            missed_for.push(self.id);
        }
        NodeReport {
            id: self.id,
            boot_id: self.boot_id,
            capacity_bytes: 1 << 40,
            used_bytes: 0,
            missed_for,
            seeded_for,
            epoch: self.map.epoch,
            serving: self.serves_clients(),
            seeded_epoch: self.seeded_epoch,
        }
    }

    fn in_sync_epoch(&self) -> u64 {
        self.map.nodes.get(&self.id).map(|n| n.in_sync_epoch).unwrap_or(0)
    }

    /// Serves a read of `chunk` now: serves clients, holds the PG, and enough of its other holders
    /// granted it a lease (`MetaService::lease_covers`).
    fn serves_read(&self, chunk: u64, now: u64) -> bool {
        if !self.serves_clients() {
            return false;
        }
        let holders = self.map.holders(R, pg(chunk));
        if !holders.contains(&self.id) {
            return false;
        }
        let need = lease_need(R, holders.len());
        if need == 0 {
            return true;
        }
        let others: Vec<u64> = holders.into_iter().filter(|p| *p != self.id).collect();
        self.leases.covers(self.in_sync_epoch(), &others, need, now)
    }
}

impl ProductionWorld {
    fn new(seed: u64, options: Options) -> ProductionWorld {
        let mut rng = Rng(seed ^ 0x005e_ed0f_9a0d);
        let mut meta = ClusterState { pg_count: PG_COUNT, ..ClusterState::default() };
        for id in 1..=3 {
            meta.apply(register(id, 0));
        }
        create_volume(&mut meta, "v", CHUNKS, R);
        let meta = Rc::new(meta);
        let mut nodes = BTreeMap::new();
        for id in 1..=3 {
            let boot = 1000 + id * 10 + rng.below(5);
            nodes.insert(id, Node::new(id, boot, meta.clone(), 0));
        }
        let mut w = ProductionWorld {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            client: Client::new(CLIENT, true, meta.clone()),
            other_clients: vec![Client::new(READER, false, meta.clone())],
            meta,
            leader: Some(1),
            term: 1,
            view: LeaderView::default(),
            proposing: 0,
            leader_lost_at: None,
            blocked: BTreeSet::new(),
            next_op: 1,
            next_version: 1,
            next_id: 1,
            acked: BTreeMap::new(),
            flushed: BTreeMap::new(),
            pool_power_losses: 0,
            pool_power_loss_at: None,
            open_pending: false,
            confirmed_at: BTreeMap::new(),
            writer_ep: CLIENT,
            handovers: 0,
            opened_at: None,
            applied_at: BTreeMap::new(),
            pinned: BTreeMap::new(),
            written_since_open: BTreeSet::new(),
            promised: BTreeSet::new(),
            healing: false,
            final_pass: None,
            faulty: BTreeSet::new(),
            joins: 0,
            trace: Vec::new(),
            print_trace: std::env::var_os("CAIRN_SIM_TRACE").is_some(),
            stats: ProductionStats::default(),
            violation: None,
            options,
        };
        let meta = w.meta.clone();
        w.view.took_office(&meta, 0);
        for id in 1..=3 {
            w.start_node_timers(id);
        }
        w.at(10, Event::LeaderTick);
        for c in [CLIENT, READER] {
            w.at(100, Event::ClientNext(c));
            w.at(CLIENT_REFRESH_MS, Event::ClientRefresh(c));
        }
        let first = w.rng.range(1000, 5000);
        w.at(first, Event::Fault);
        w
    }

    fn log(&mut self, line: String) {
        push_trace(&mut self.trace, self.print_trace, self.now, line);
    }

    fn at(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Queued { at: self.now + delay, seq: self.seq, event }));
    }

    fn start_node_timers(&mut self, id: u64) {
        let j = self.rng.below(100);
        let life = self.nodes.get(&id).map(|n| n.life).unwrap_or(0);
        self.at(j + 10, Event::Heartbeat(id, life));
        self.at(j + 20, Event::LeasePoll(id, life));
        self.at(j + 30, Event::Recovery(id, life));
        self.at(j + 5, Event::MapSync(id, life));
        let f = self.rng.range(self.options.writeback_ms.0, self.options.writeback_ms.1);
        self.at(f, Event::Flush(id, life));
    }

    fn linked(&self, from: Ep, to: Ep) -> bool {
        !self.blocked.contains(&(from, to))
    }

    /// Cuts the link between `a` and `b` both ways.
    fn cut(&mut self, a: Ep, b: Ep) {
        self.blocked.insert((a, b));
        self.blocked.insert((b, a));
    }

    fn reachable(&self, ep: Ep) -> bool {
        ep == CLIENT || ep == READER || ep == NEW_WRITER || self.nodes.get(&ep).is_some_and(|n| n.alive)
    }

    fn send(&mut self, from: Ep, to: Ep, msg: Msg) {
        self.send_after(0, from, to, msg);
    }

    fn send_after(&mut self, extra: u64, from: Ep, to: Ep, msg: Msg) {
        if !self.linked(from, to) {
            return;
        }
        let delay =
            extra + self.rng.range(1, 8) + if self.rng.chance(20) { self.rng.range(20, 400) } else { 0 };
        self.at(delay, Event::Deliver { from, to, msg });
    }

    fn run(mut self) -> Result<ProductionStats, String> {
        let mut steps: u64 = 0;
        while let Some(Reverse(q)) = self.queue.pop() {
            self.now = q.at;
            steps += 1;
            if steps > 5_000_000 {
                let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
                for _ in 0..10_000 {
                    let Some(Reverse(q)) = self.queue.pop() else { break };
                    let k = format!("{:?}", q.event);
                    let k: String = k.chars().take(40).collect();
                    *kinds.entry(k).or_default() += 1;
                }
                return Err(
                    self.fail(format!("the run did not end within its step budget; next events: {kinds:?}"))
                );
            }
            if !self.healing && self.now >= RUN_MS {
                self.heal_all();
            }
            if self.now > RUN_MS + HEAL_MS {
                return Err(self.fail("the pool did not settle after every fault was healed".into()));
            }
            self.handle(q.event);
            if let Some(v) = self.violation.take() {
                return Err(self.fail(v));
            }
            if self.healing && self.final_pass.is_none() && self.idle(self.writer_ep) && self.settled() {
                // Before any write could cover it up: every holder holds every acknowledged write.
                self.holders_hold_acked("settled after every fault was healed")?;
                self.log("settled: final write of every chunk".into());
                self.final_pass = Some(0);
            }
            // After the final writes, once settled again (a final write that failed on a node
            // sends it back to catching up first).
            if let Some(done) = self.final_pass
                && done >= CHUNKS
                && self.idle(self.writer_ep)
                && self.settled()
            {
                return self.final_check();
            }
        }
        Err(self.fail("the event queue ran dry".into()))
    }

    fn fail(&self, why: String) -> String {
        let tail: Vec<&String> = self.trace.iter().rev().take(120).collect();
        let mut out = format!("{why}\nmap: {}\n", self.describe_map());
        for n in self.nodes.values() {
            let (written, seeded) = n.pending_split();
            // (peer, chunk, settled generation) of each entry made by writes or an open.
            let writes: Vec<(u64, u64, u64)> =
                n.missed.iter().filter(|(_, e)| !e.seed).map(|((p, c), e)| (*p, *c, e.settled)).collect();
            out.push_str(&format!(
                "node {}: alive {} frozen {} boot {} map epoch {} serving {} seeded_epoch {} entries {} (writes for {written:?}: {writes:?}, seeds for {seeded:?}) job {:?} store {:?}\n",
                n.id,
                n.alive,
                n.frozen,
                n.boot_id,
                n.map.epoch,
                n.serves_clients(),
                n.seeded_epoch,
                n.missed.len(),
                n.job,
                n.store
            ));
        }
        for c in std::iter::once(&self.client).chain(&self.other_clients) {
            out.push_str(&format!(
                "client {}: writer {} fenced {} op {:?} flushing {:?} opening {}\n",
                c.ep,
                c.writer,
                c.fenced,
                c.op.as_ref().map(|o| (o.id, o.chunk, o.attempt)),
                c.flushing.as_ref().map(|f| (f.round, f.deadline, &f.pgs, &f.asked)),
                c.opening.is_some()
            ));
        }
        out.push_str(&format!(
            "leader {:?} term {}; leader view: {:?}\nlast events:\n",
            self.leader, self.term, self.view
        ));
        for l in tail.into_iter().rev() {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    fn describe_map(&self) -> String {
        let nodes: Vec<String> = self
            .meta
            .nodes
            .values()
            .map(|n| {
                format!(
                    "{}:{}{}",
                    n.id,
                    if n.up { "up" } else { "down" },
                    if n.catching_up { "/catching" } else { "" }
                )
            })
            .collect();
        let pgs: Vec<String> = (0..PG_COUNT)
            .map(|p| format!("pg{p}={:?}+{:?}", self.meta.holders(R, p), self.meta.backfill(R, p)))
            .collect();
        format!("epoch {} nodes [{}] {}", self.meta.epoch, nodes.join(" "), pgs.join(" "))
    }

    fn settled(&self) -> bool {
        self.meta.nodes.values().all(|n| n.in_sync())
            && (0..PG_COUNT).all(|p| self.meta.backfill(R, p).is_empty())
            && self.nodes.values().all(|n| {
                n.alive && !n.frozen && n.missed.is_empty() && n.listing.is_none() && n.serves_clients()
            })
    }

    fn final_check(&mut self) -> Result<ProductionStats, String> {
        for chunk in 0..CHUNKS {
            let want = self.acked.get(&chunk).copied().unwrap_or(0);
            for h in self.meta.holders(R, pg(chunk)) {
                let have = self.nodes.get(&h).and_then(|n| n.store.get(&chunk).copied()).unwrap_or(0);
                if have != want {
                    return Err(self.fail(format!(
                        "I5: chunk {chunk}: holder {h} holds version {have}, the last acknowledged write is {want}"
                    )));
                }
            }
        }
        Ok(self.stats)
    }

    /// I1: every holder of every chunk holds its latest acknowledged write (or a later version).
    fn holders_hold_acked(&self, when: &str) -> Result<(), String> {
        for chunk in 0..CHUNKS {
            let want = self.acked.get(&chunk).copied().unwrap_or(0);
            for h in self.meta.holders(R, pg(chunk)) {
                let have = self.nodes.get(&h).and_then(|n| n.store.get(&chunk).copied()).unwrap_or(0);
                if have < want {
                    return Err(self.fail(format!(
                        "I1: {when}: chunk {chunk}: holder {h} holds version {have}, older than the acknowledged {want}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn heal_all(&mut self) {
        self.healing = true;
        self.log("healing every fault".into());
        self.blocked.clear();
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            let (alive, frozen) = self.nodes.get(&id).map(|n| (n.alive, n.frozen)).unwrap_or((true, false));
            if !alive {
                self.restart(id);
            }
            if frozen {
                self.unfreeze(id);
            }
        }
        self.faulty.clear();
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { from, to, msg } => self.deliver(from, to, msg),
            Event::Heartbeat(id, life) => {
                if !self.lives(id, life) {
                    return;
                }
                if self.node_runs(id)
                    && let Some(n) = self.nodes.get(&id)
                {
                    let report = n.report();
                    match self.leader {
                        Some(l) if l == id => {
                            let now = self.now;
                            self.view.heard(report, None, now);
                        }
                        Some(l) => self.send(id, l, Msg::Report(report)),
                        None => {}
                    }
                }
                self.at(HEARTBEAT_MS, Event::Heartbeat(id, life));
            }
            Event::LeasePoll(id, life) => {
                if !self.lives(id, life) {
                    return;
                }
                if self.node_runs(id) {
                    self.lease_poll(id);
                }
                self.at(LEASE_POLL_MS, Event::LeasePoll(id, life));
            }
            Event::LeaseRoundEnd { node, round } => self.lease_round_end(node, round),
            Event::Recovery(id, life) => {
                if !self.lives(id, life) {
                    return;
                }
                if self.node_runs(id) {
                    self.recovery(id);
                }
                self.at(RECOVERY_MS, Event::Recovery(id, life));
            }
            Event::CompareTimeout { node, round } => {
                if let Some(n) = self.nodes.get_mut(&node)
                    && n.comparing.as_ref().is_some_and(|c| c.round == round)
                {
                    n.comparing = None;
                }
            }
            Event::JobTimeout { node, job } => {
                if let Some(n) = self.nodes.get_mut(&node)
                    && n.job.as_ref().is_some_and(|j| j.id == job)
                {
                    n.job = None;
                }
            }
            Event::MapSync(id, life) => {
                if !self.lives(id, life) {
                    return;
                }
                if self.node_runs(id) && self.leader.is_some_and(|l| self.linked(l, id)) {
                    let meta = self.meta.clone();
                    if let Some(n) = self.nodes.get_mut(&id) {
                        n.set_map(&meta);
                    }
                }
                // Now and then a node applies the log late (a slow disk, a busy process).
                let d = if self.rng.chance(30) {
                    self.rng.range(500, 3000)
                } else {
                    self.rng.range(MAP_SYNC_MS / 2, MAP_SYNC_MS * 2)
                };
                self.at(d, Event::MapSync(id, life));
            }
            Event::Flush(id, life) => {
                if !self.lives(id, life) {
                    return;
                }
                // The kernel's writeback: durable, but the dirty flags age only with a client's
                // flushes (`Msg::Flush`).
                if self.node_runs(id)
                    && let Some(n) = self.nodes.get_mut(&id)
                {
                    n.durable = n.store.clone();
                    n.dirty.clear();
                }
                let d = self.rng.range(self.options.writeback_ms.0, self.options.writeback_ms.1);
                self.at(d, Event::Flush(id, life));
            }
            Event::LeaderTick => {
                self.leader_tick();
                self.at(LEADER_TICK_MS, Event::LeaderTick);
            }
            Event::Commit { term, commands } => {
                self.proposing = self.proposing.saturating_sub(1);
                if commands.iter().any(|c| matches!(c, Command::OpenVolume { .. })) {
                    self.open_pending = false;
                }
                // An entry of an earlier term may still commit (it reached a majority before the
                // fail-over) or be lost.
                if term != self.term && self.rng.chance(500) {
                    return;
                }
                let mut meta = (*self.meta).clone();
                for c in commands {
                    let what = format!("{c:?}");
                    let ends = match &c {
                        Command::SetCatchingUp { catching_up: false, filled, id, .. } => meta
                            .nodes
                            .get(id)
                            .is_some_and(|n| n.catching_up)
                            .then(|| filled.as_ref().is_some_and(|f| !f.is_empty())),
                        _ => None,
                    };
                    let r = meta.apply(c);
                    if let Some(fill) = ends
                        && matches!(r, CommandResult::Done)
                    {
                        self.stats.catch_ups += 1;
                        if fill {
                            self.stats.fills += 1;
                        }
                    }
                    let short: String = what.chars().take(120).collect();
                    self.log(format!("commit {short} -> {r:?}"));
                }
                self.meta = Rc::new(meta);
                if let Some(l) = self.leader {
                    let meta = self.meta.clone();
                    if let Some(n) = self.nodes.get_mut(&l) {
                        n.set_map(&meta);
                    }
                }
            }
            Event::ClientNext(c) => {
                self.switch_to(c);
                self.client_next();
            }
            Event::ClientRefresh(c) => {
                self.switch_to(c);
                self.client_refresh();
                self.at(CLIENT_REFRESH_MS, Event::ClientRefresh(c));
            }
            Event::ClientTimeout { client, op, attempt } => {
                self.switch_to(client);
                if self.client.op.as_ref().is_some_and(|o| o.id == op && o.attempt == attempt) {
                    self.attempt_ended();
                }
            }
            Event::FlushRound { client, round } => {
                self.switch_to(client);
                match self.client.flushing.as_ref().filter(|f| f.round == round) {
                    Some(f) if f.asked.is_empty() => {
                        self.client_refresh();
                        self.flush_send();
                    }
                    Some(_) => self.flush_round_end(),
                    None => {}
                }
            }
            Event::SettleRound { client, round } => {
                self.switch_to(client);
                if self.client.settling.as_ref().is_some_and(|s| s.round == round) {
                    self.settle_round_end();
                }
            }
            Event::OpenStep { client, round } => {
                self.switch_to(client);
                if self.client.opening.as_ref().is_some_and(|o| o.round == round) {
                    self.open_step_due();
                }
            }
            Event::ClientRetry { client, op, attempt } => {
                self.switch_to(client);
                if self.client.op.as_ref().is_some_and(|o| o.id == op && o.attempt == attempt) {
                    self.client_refresh();
                    self.attempt();
                }
            }
            Event::Fault => {
                if !self.healing {
                    self.fault();
                    let next = self.rng.range(1500, 6000);
                    self.at(next, Event::Fault);
                }
            }
            Event::Restart(id) => {
                if !self.healing && self.nodes.get(&id).is_some_and(|n| !n.alive) {
                    self.restart(id);
                    self.faulty.remove(&id);
                }
            }
            Event::Unfreeze(id) => {
                if !self.healing && self.nodes.get(&id).is_some_and(|n| n.frozen) {
                    self.unfreeze(id);
                    self.faulty.remove(&id);
                }
            }
            Event::Heal { a, b } => {
                if !self.healing {
                    self.blocked.remove(&(a, b));
                    self.blocked.remove(&(b, a));
                    self.log(format!("partition {a}-{b} healed"));
                    for ep in [a, b] {
                        if ep != CLIENT
                            && ep != READER
                            && !self.blocked.iter().any(|(x, y)| *x == ep || *y == ep)
                        {
                            self.faulty.remove(&ep);
                        }
                    }
                }
            }
        }
    }

    fn node_runs(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.alive && !n.frozen)
    }

    /// Whether a node timer belongs to the node's current process.
    fn lives(&self, id: u64, life: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.alive && n.life == life)
    }

    // ---- faults ----

    fn fault(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        if self.faulty.len() >= 2 {
            return;
        }
        let healthy: Vec<u64> = ids.iter().copied().filter(|i| !self.faulty.contains(i)).collect();
        if healthy.is_empty() {
            return;
        }
        let id = healthy[self.rng.below(healthy.len() as u64) as usize];
        self.stats.faults += 1;
        match self.rng.below(11) {
            0..=2 => {
                if self.rng.chance(400) && self.power_loss_allowed() {
                    self.power_loss(id);
                } else {
                    self.log(format!("kill node {id}"));
                }
                self.kill(id);
                self.faulty.insert(id);
                let back = self.rng.range(500, 12_000);
                self.at(back, Event::Restart(id));
            }
            3 | 4 => {
                self.log(format!("freeze node {id}"));
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.frozen = true;
                }
                self.faulty.insert(id);
                let back = self.rng.range(300, 9_000);
                self.at(back, Event::Unfreeze(id));
            }
            5 | 6 => {
                // Cut from everyone (nodes and client), or from one other endpoint.
                let others: Vec<Ep> =
                    ids.iter().copied().filter(|o| *o != id).chain(self.client_eps()).collect();
                let cut: Vec<Ep> = if self.rng.chance(500) {
                    others
                } else {
                    vec![others[self.rng.below(others.len() as u64) as usize]]
                };
                let back = self.rng.range(500, 15_000);
                // (`Options::one_way_partitions`: some lose only one direction's messages.)
                let one_way = self.options.one_way_partitions && self.rng.chance(400);
                let outgoing = one_way && self.rng.chance(500);
                for o in cut {
                    if one_way {
                        let (from, to) = if outgoing { (id, o) } else { (o, id) };
                        self.log(format!("partition {from}->{to} (one way)"));
                        self.blocked.insert((from, to));
                        self.stats.one_way_cuts += 1;
                    } else {
                        self.log(format!("partition {id}-{o}"));
                        self.cut(id, o);
                    }
                    self.at(back, Event::Heal { a: id, b: o });
                }
                self.faulty.insert(id);
            }
            7 if self.joins < 2 && self.nodes.len() < 5 => {
                let new = ids.iter().max().copied().unwrap_or(0) + 1;
                self.joins += 1;
                self.log(format!("node {new} joins"));
                let boot = 5000 + new * 10 + self.rng.below(5);
                let meta = self.meta.clone();
                self.nodes.insert(new, Node::new(new, boot, meta, self.now));
                self.start_node_timers(new);
            }
            10 => {
                // A split: this node and another (with the reader, or not) apart from the rest.
                let mut side: Vec<Ep> = vec![id];
                let others: Vec<u64> = ids.iter().copied().filter(|o| *o != id).collect();
                if !others.is_empty() {
                    side.push(others[self.rng.below(others.len() as u64) as usize]);
                }
                if self.rng.chance(500) {
                    side.push(READER);
                }
                let rest: Vec<Ep> =
                    ids.iter().copied().chain(self.client_eps()).filter(|e| !side.contains(e)).collect();
                let back = self.rng.range(1000, 20_000);
                self.log(format!("split {side:?} from {rest:?}"));
                for a in &side {
                    for b in &rest {
                        self.cut(*a, *b);
                        self.at(back, Event::Heal { a: *a, b: *b });
                    }
                    if *a != READER {
                        self.faulty.insert(*a);
                    }
                }
            }
            9 if self.handovers == 0 => self.handover(),
            8 if self.pool_power_losses == 0 && self.power_loss_allowed() && self.rng.chance(300) => {
                self.pool_power_loss();
            }
            _ => {
                // A client-side cut: a client loses one node.
                let back = self.rng.range(500, 10_000);
                let eps = self.client_eps();
                let c = eps[self.rng.below(eps.len() as u64) as usize];
                self.log(format!("partition {c}-{id}"));
                self.cut(c, id);
                self.at(back, Event::Heal { a: c, b: id });
            }
        }
    }

    /// A power loss is generated only while the pool is healthy (every node in sync, none still
    /// pulling chunks back after an earlier one): every write acknowledged since was applied by
    /// the others too, so losing this node's unflushed writes loses no acknowledged one (losing
    /// them on every applier is what a power cut of more than R − q of them may do).
    fn power_loss_allowed(&self) -> bool {
        self.faulty.is_empty()
            && self.meta.nodes.values().all(|n| n.in_sync())
            && self.nodes.values().all(|n| {
                n.alive && !n.frozen && n.listing.is_none() && !n.missed.keys().any(|(p, _)| *p == n.id)
            })
    }

    /// The machine of node `id` loses power: each chunk changed since its last flush keeps its
    /// page-cache copy or reverts to the flushed one (a chunk created since vanishes). At its next
    /// start it finds the machine rebooted (`recovery::note_power_loss`): it records each dirty
    /// chunk as missed by itself and has its chunk lists to compare with its peers'.
    fn power_loss(&mut self, id: u64) {
        self.log(format!("power loss of node {id}"));
        self.stats.power_losses += 1;
        let keeps: Vec<bool> = (0..64).map(|_| self.rng.chance(330)).collect();
        let n = self.nodes.get_mut(&id).expect_node();
        let dirty: Vec<u64> = n.dirty.iter().copied().collect();
        for (i, chunk) in dirty.iter().enumerate() {
            if !keeps[i % keeps.len()] {
                match n.durable.get(chunk).copied() {
                    Some(v) => n.store.insert(*chunk, v),
                    None => n.store.remove(chunk),
                };
            }
        }
        // (Every chunk whose header says dirty: `Store::dirty_chunks`, a superset of the unsynced.)
        let marked: BTreeSet<u64> = dirty.into_iter().chain(n.marked.keys().copied()).collect();
        for chunk in marked {
            n.record(&[id], chunk, false);
        }
        n.listing = Some(BTreeMap::new());
    }

    /// Every node loses power at once (a power cut of the room): acknowledged writes not yet
    /// flushed may be lost; flushed ones must survive (I1).
    fn pool_power_loss(&mut self) {
        self.pool_power_losses += 1;
        self.stats.pool_power_losses += 1;
        self.log("power loss of every node".into());
        self.pool_power_loss_at = Some(self.now);
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.power_loss(id);
            self.kill(id);
            self.faulty.insert(id);
            let back = self.rng.range(500, 8_000);
            self.at(back, Event::Restart(id));
        }
        // From now on only what a flush covered is owed (to a read in flight too).
        for (chunk, a) in self.acked.iter_mut() {
            *a = self.flushed.get(chunk).copied().unwrap_or(0);
        }
        let flushed = self.flushed.clone();
        for c in std::iter::once(&mut self.client).chain(self.other_clients.iter_mut()) {
            if let Some(op) = c.op.as_mut()
                && let OpKind::Read { floor, .. } = &mut op.kind
            {
                *floor = (*floor).min(flushed.get(&op.chunk).copied().unwrap_or(0));
            }
        }
    }

    fn kill(&mut self, id: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.alive = false;
            n.frozen = false;
            n.held.clear();
            n.lease_round = None;
            n.job = None;
            n.comparing = None;
            n.compared_for = None;
        }
    }

    fn restart(&mut self, id: u64) {
        let boot = 7000 + self.now * 10 + id;
        let now = self.now;
        self.log(format!("restart node {id} (boot {boot})"));
        if let Some(n) = self.nodes.get_mut(&id) {
            n.alive = true;
            n.frozen = false;
            n.life += 1;
            n.boot_id = boot;
            n.grants = Grants::new(now);
            n.started_at = now;
            n.leases = Leases::default();
            n.serving_from = 0;
            n.seeded.clear();
            n.seeded_epoch = 0;
            n.lease_round = None;
            n.job = None;
        }
        self.start_node_timers(id);
    }

    fn unfreeze(&mut self, id: u64) {
        self.log(format!("unfreeze node {id}"));
        let held = match self.nodes.get_mut(&id) {
            Some(n) => {
                n.frozen = false;
                std::mem::take(&mut n.held)
            }
            None => Vec::new(),
        };
        for (from, msg) in held {
            self.deliver(from, id, msg);
        }
    }

    // ---- metadata ----

    fn propose(&mut self, commands: Vec<Command>) {
        if commands.is_empty() || self.leader.is_none() {
            return;
        }
        // One Raft entry each (`MetaService::lead` proposes them one after the other): nodes and
        // clients may see a round half applied.
        let term = self.term;
        let mut d = 0;
        for c in commands {
            d += self.rng.range(2, 30);
            self.proposing += 1;
            self.at(d, Event::Commit { term, commands: vec![c] });
        }
    }

    /// Whether node `id` can reach a majority of the metadata voters (nodes 1–3).
    fn has_quorum(&self, id: u64) -> bool {
        (1..=3).filter(|v| *v == id || (self.node_runs(*v) && self.linked(id, *v))).count() >= 2
    }

    fn leader_tick(&mut self) {
        let ok = self.leader.is_some_and(|l| self.node_runs(l) && self.has_quorum(l));
        if !ok {
            let since = *self.leader_lost_at.get_or_insert(self.now);
            if self.now - since < ELECTION_MS {
                return;
            }
            let candidate = (1..=3).find(|v| self.node_runs(*v) && self.has_quorum(*v));
            self.leader = None;
            let Some(c) = candidate else { return };
            self.term += 1;
            self.leader = Some(c);
            self.leader_lost_at = None;
            self.proposing = 0;
            self.view = LeaderView::default();
            let meta = self.meta.clone();
            let now = self.now;
            self.view.took_office(&meta, now);
            self.log(format!("node {c} leads (term {})", self.term));
            self.propose(vec![Command::LeaderElected { id: c, term: self.term, time_ms: now }]);
            return;
        }
        self.leader_lost_at = None;
        if self.proposing > 0 {
            return;
        }
        let Some(l) = self.leader else { return };
        let meta = self.meta.clone();
        // Members the map lacks (a join whose registration was lost in a fail-over) are registered.
        let missing: Vec<Command> = self
            .nodes
            .keys()
            .filter(|id| !meta.nodes.contains_key(id))
            .map(|id| register(*id, self.now))
            .collect();
        if !missing.is_empty() {
            self.propose(missing);
            return;
        }
        for id in meta.nodes.keys() {
            let now = self.now;
            self.view.registering(*id, now);
        }
        let d = self.view.decide(&meta, l, self.now, DOWN_AFTER_MS, HEARTBEAT_MS);
        let commands = d.commands(self.now);
        self.propose(commands);
    }

    // ---- node message handling ----

    fn deliver(&mut self, from: Ep, to: Ep, msg: Msg) {
        if !self.linked(from, to) || !self.reachable(to) {
            return;
        }
        if to == CLIENT || to == READER || to == NEW_WRITER {
            self.switch_to(to);
            self.client_reply(msg);
            return;
        }
        let Some(n) = self.nodes.get_mut(&to) else { return };
        if n.frozen {
            n.held.push((from, msg));
            return;
        }
        let now = self.now;
        match msg {
            Msg::Report(report) => {
                if self.leader == Some(to) {
                    self.view.heard(report, None, now);
                }
            }
            Msg::CompareReq { round, from: peer, chunks } => {
                let n = self.nodes.get(&to).expect_node();
                let serving = n.serves_clients();
                let infos = chunks
                    .into_iter()
                    .map(|c| {
                        let missed: Vec<u64> =
                            n.missed.keys().filter(|(_, k)| *k == c).map(|(p, _)| *p).collect();
                        match n.store.get(&c) {
                            Some(v) => (c, *v, missed, n.fence, serving),
                            None => (c, 0, missed, 0, false),
                        }
                    })
                    .collect();
                self.send(to, peer, Msg::CompareReply { round, from: to, infos });
            }
            Msg::CompareReply { round, from: peer, infos } => {
                let n = self.nodes.get_mut(&to).expect_node();
                if let Some(c) = n.comparing.as_mut().filter(|c| c.round == round) {
                    c.answers.insert(peer, Some(infos));
                    if c.answers.values().all(|a| a.is_some()) {
                        self.compare_end(to);
                    }
                }
            }
            Msg::Flush { round } => {
                let n = self.nodes.get_mut(&to).expect_node();
                n.durable = n.store.clone();
                n.dirty.clear();
                n.marked.retain(|_, f| {
                    *f += 1;
                    *f < DIRTY_LINGER_FLUSHES
                });
                self.send(to, from, Msg::FlushReply { round, from: to });
            }
            Msg::Open { after } => {
                // One request at a time, as production's client (it waits for an answer or a
                // timeout before it asks again); whether it opens is the state machine's rule.
                if self.leader == Some(to) && !self.open_pending {
                    self.open_pending = true;
                    let after = self.options.open_names_after.then_some(after);
                    self.propose(vec![Command::OpenVolume { name: "v".into(), time_ms: now, after }]);
                }
            }
            Msg::Fence { round, generation } => {
                let n = self.nodes.get_mut(&to).expect_node();
                let fenced = generation < n.fence;
                n.fence = n.fence.max(generation);
                let serving = n.serves_clients();
                let dirty = n
                    .marked
                    .keys()
                    .filter_map(|c| n.store.get(c).map(|v| (*c, *v)))
                    .map(|(c, v)| (c, v, n.missed.keys().filter(|(_, k)| *k == c).map(|(p, _)| *p).collect()))
                    .collect();
                self.send(to, from, Msg::FenceReply { round, from: to, fenced, serving, dirty });
            }
            Msg::Info { round, chunk } => {
                let n = self.nodes.get(&to).expect_node();
                let version = n.store.get(&chunk).copied().unwrap_or(0);
                let missed_by = n.missed.keys().filter(|(_, c)| *c == chunk).map(|(p, _)| *p).collect();
                let serving = n.serves_read(chunk, now);
                self.send(to, from, Msg::InfoReply { round, from: to, version, missed_by, serving });
            }
            Msg::Put { round, chunk, version, expect, generation, source } => {
                // (Fenced like any install, by the map's generation too: a handed-over writer's
                // settle copies are refused where the map shows the newer writer.)
                let n = self.nodes.get(&to).expect_node();
                let fenced = generation < n.fence.max(volume_generation(&n.map));
                let current = n.store.get(&chunk).copied().unwrap_or(0);
                let refused = !fenced && self.source_refused(to, (chunk, version), source, 0);
                let n = self.nodes.get_mut(&to).expect_node();
                let ok = !fenced && current == expect && !refused;
                if ok {
                    n.fence = generation;
                    n.install(chunk, version);
                    // (Dirty, as production's reconciliation copies: a crash before the others
                    // got theirs leaves it among the chunks the next open reconciles.)
                    n.marked.insert(chunk, 0);
                    self.applied_at.entry((version, to)).or_insert(self.now);
                }
                let line =
                    format!("node {to} reconciliation puts chunk {chunk} v{version} (has v{current}): {ok}");
                self.log(line);
                self.send(to, from, Msg::PutReply { round, from: to, ok, fenced });
            }
            Msg::CatchUp { node } => {
                self.log(format!("leader {to}: the client reports node {node} failed a write"));
                if self.leader == Some(to) && self.meta.nodes.get(&node).is_some_and(|n| n.in_sync()) {
                    let c =
                        Command::SetCatchingUp { id: node, catching_up: true, time_ms: now, filled: None };
                    self.propose(vec![c]);
                }
            }
            Msg::Write { op, chunk, version, expect, missed_by, interval } => {
                let reply = self.node_write(to, chunk, (version, expect), &missed_by, interval);
                let (answer, hold) = reply;
                if hold > 0 {
                    self.stats.holdbacks += 1;
                }
                self.send_after(hold, to, from, Msg::WriteReply { op, from: to, reply: answer });
            }
            Msg::RecordMissed { op, chunk, peers, at, settled } => {
                let n = self.nodes.get_mut(&to).expect_node();
                // (A copy it recorded itself as missing is to be pulled back: it holds no write.)
                let ok = n.store.get(&chunk).copied().unwrap_or(0) == at
                    && !(self.options.unsure_copy_confirms_nothing && n.missed.contains_key(&(to, chunk)));
                let mut hold = 0;
                if ok {
                    n.record(&peers, chunk, false);
                    if self.options.settled_records_replace {
                        n.settle(&peers, chunk, settled);
                    }
                    hold = n.grants.holdback(&peers, now).as_millis() as u64;
                }
                self.send_after(hold, to, from, Msg::RecordReply { op, from: to, ok });
            }
            Msg::Read { op, chunk } => {
                let n = self.nodes.get(&to).expect_node();
                let version = n.serves_read(chunk, now).then(|| n.store.get(&chunk).copied().unwrap_or(0));
                self.send(to, from, Msg::ReadReply { op, from: to, version });
            }
            Msg::LeaseReq { round, from: peer, in_sync_epoch } => {
                let n = self.nodes.get_mut(&to).expect_node();
                let holds = n.holds_missed_for(peer);
                let map = n.map.clone();
                let granted = n.grants.grant(&map, peer, in_sync_epoch, holds, now);
                self.send(to, from, Msg::LeaseReply { round, from: to, granted });
            }
            Msg::LeaseReply { round, from: peer, granted } => {
                let n = self.nodes.get_mut(&to).expect_node();
                let mut done = false;
                if let Some(r) = n.lease_round.as_mut().filter(|r| r.id == round) {
                    r.answered.insert(peer);
                    if granted {
                        r.granted.insert(peer);
                    }
                    done = r.answered.len() == r.asked.len();
                }
                if done {
                    self.lease_round_end(to, round);
                }
            }
            Msg::VersionReq { job, from: peer, chunk } => {
                let v = self.nodes.get(&to).expect_node().store.get(&chunk).copied().unwrap_or(0);
                self.send(to, peer, Msg::VersionReply { job, version: v });
            }
            Msg::SourceRead { job, from: peer, chunk, any } => {
                let n = self.nodes.get(&to).expect_node();
                let version =
                    (any || n.serves_read(chunk, now)).then(|| n.store.get(&chunk).copied().unwrap_or(0));
                let dirty = n.marked.contains_key(&chunk);
                self.send(to, peer, Msg::SourceReply { job, version, dirty });
            }
            Msg::ReviveReq { job, from: peer, chunk } => {
                let n = self.nodes.get(&to).expect_node();
                let version = n.store.get(&chunk).copied().unwrap_or(0);
                let missed_by = n.missed.keys().filter(|(_, c)| *c == chunk).map(|(p, _)| *p).collect();
                self.send(to, peer, Msg::ReviveReply { job, from: to, version, missed_by });
            }
            Msg::ReviveReply { job, from: peer, version, missed_by } => {
                self.revive_answer(to, job, peer, (version, missed_by));
            }
            Msg::Install { job, from: peer, chunk, version, expect, source, settled, dirty, generation } => {
                let n = self.nodes.get_mut(&to).expect_node();
                let current = n.store.get(&chunk).copied().unwrap_or(0);
                // Fenced like a write: below this node's fence or its map's generation, refused
                // (a sender whose map lags would spread a stray of the writer it still knows).
                let map_generation = volume_generation(&n.map);
                let fenced =
                    self.options.installs_check_generation && generation < n.fence.max(map_generation);
                // (A copy from a node this one recorded as having missed the chunk would undo the
                // write recorded, or bring back a leftover an open settled without it, unless
                // `cairn_types::RecordedSource::taken`: an open of a newer generation settled it,
                // or this node is unsure of its own copy and the copy is newer.)
                let settled = if self.options.settled_overrides_records { settled } else { 0 };
                let refused = (!fenced && self.source_refused(to, (chunk, version), source, settled))
                    || current != expect;
                let n = self.nodes.get_mut(&to).expect_node();
                let refused = refused || fenced;
                let line = format!(
                    "node {to} install chunk {chunk} v{version} from {peer} (source {source:?}, expect {expect}, has {current}): {}",
                    if refused { "refused" } else { "done" }
                );
                push_trace(&mut self.trace, self.print_trace, self.now, line);
                if !refused {
                    if self.options.installs_check_generation {
                        n.fence = n.fence.max(generation);
                    }
                    n.install(chunk, version);
                    if dirty {
                        n.marked.insert(chunk, 0);
                    }
                    self.applied_at.entry((version, to)).or_insert(self.now);
                }
                self.send(to, peer, Msg::InstallReply { job, ok: !refused });
            }
            Msg::ListReq { from: peer } => {
                let chunks = self.nodes.get(&to).expect_node().store.keys().copied().collect();
                self.send(to, peer, Msg::ListReply { from: to, chunks });
            }
            Msg::ListReply { from: peer, chunks } => {
                if let Some(answers) = self.nodes.get_mut(&to).expect_node().listing.as_mut() {
                    answers.insert(peer, chunks);
                }
            }
            Msg::VersionReply { job, version } => self.job_version(to, job, version),
            Msg::SourceReply { job, version, dirty } => self.job_source(to, job, version, dirty),
            Msg::InstallReply { job, ok } => self.job_installed(to, job, ok),
            Msg::WriteReply { .. }
            | Msg::RecordReply { .. }
            | Msg::ReadReply { .. }
            | Msg::FenceReply { .. }
            | Msg::InfoReply { .. }
            | Msg::PutReply { .. }
            | Msg::FlushReply { .. } => {}
        }
    }

    /// Whether node `id` refuses a copy of `chunk` at `version` from `source` because it recorded
    /// that source as having missed the chunk (`RecordedSource::taken`, the receiver's side of
    /// `InstallRange::source`); a copy it takes as newer while unsure of its own renews its record
    /// of itself (`MissedLog::renew_if_present`).
    fn source_refused(
        &mut self,
        id: u64,
        (chunk, version): (u64, u64),
        source: Option<u64>,
        settled: u64,
    ) -> bool {
        let unsure_rule = self.options.unsure_takes_newer;
        let n = self.nodes.get_mut(&id).expect_node();
        let Some(e) = source.and_then(|s| n.missed.get(&(s, chunk))) else { return false };
        let current = n.store.get(&chunk).copied().unwrap_or(0);
        let mut offered = cairn_types::RecordedSource {
            recorded: e.settled,
            settled,
            current: as_version(current),
            copy: as_version(version),
            unsure: unsure_rule && n.missed.contains_key(&(id, chunk)),
            one_chain: true,
            current_generation: n.fence.max(volume_generation(&n.map)),
        };
        if !offered.settles() && offered.takes_newer() {
            offered.unsure = n.renew(id, chunk);
        }
        !offered.taken()
    }

    /// A client write on a node (`cairn-node::server::handle` and `run`): (answer, hold-back ms).
    fn node_write(
        &mut self,
        id: u64,
        chunk: u64,
        (version, expect): (u64, Option<u64>),
        missed_by: &[u64],
        interval: u64,
    ) -> (Answer, u64) {
        let now = self.now;
        let sync = self.rng.chance(200) && self.leader.is_some_and(|l| self.linked(l, id));
        let meta = self.meta.clone();
        let n = self.nodes.get_mut(&id).expect_node();
        if !n.serves_clients() {
            return (Answer::Unavailable, 0);
        }
        let pre = n.check(chunk, missed_by);
        if pre.stale.is_some()
            || (self.options.check_writer_interval && pre.writer_behind(interval).is_some())
        {
            return (Answer::Unavailable, 0);
        }
        // Fenced by the map's generation or the store's raised fence (`server::handle`, the store's
        // admission).
        let map_generation = volume_generation(&n.map);
        if self.options.fence && generation_of(version) < n.fence.max(map_generation) {
            return (Answer::Fenced, 0);
        }
        // The map may move on while the mutation is applied.
        if sync {
            n.set_map(&meta);
        }
        // The version check under the chunk lock (`cairn_types::version`, applied by the store): a
        // copy at the version this write left (an earlier attempt of it) answers it as applied.
        let current = n.store.get(&chunk).copied().unwrap_or(0);
        if current != version {
            match expect {
                Some(e) if current < e => return (Answer::Behind, 0),
                Some(e) if current != e => return (Answer::Conflict, 0),
                None if current > version => return (Answer::Conflict, 0),
                _ => {
                    n.put(chunk, version);
                    n.fence = n.fence.max(generation_of(version));
                    self.applied_at.entry((version, id)).or_insert(now);
                    if meta
                        .volumes
                        .values()
                        .any(|v| v.id == VOLUME_ID && v.generation > generation_of(version))
                    {
                        self.promised.insert(chunk);
                    }
                }
            }
        }
        let n = self.nodes.get_mut(&id).expect_node();
        let after = n.check(chunk, missed_by);
        let peers = PgCheck::to_record(Some(&after), missed_by);
        n.record(&peers, chunk, false);
        let line = format!(
            "node {id} applied v{version} chunk {chunk} (map epoch {}, interval {} vs writer's {interval}), recorded for {peers:?}",
            n.map.epoch, after.interval
        );
        self.log(line);
        let n = self.nodes.get_mut(&id).expect_node();
        if after.refusal(Some(&pre)).is_some() {
            return (Answer::Unavailable, 0);
        }
        // Held back for the peers named and the backfill members seen before it was applied
        // (`server::handle`).
        let held_for = PgCheck::to_record(Some(&pre), missed_by);
        let hold = if held_for.is_empty() { 0 } else { n.grants.holdback(&held_for, now).as_millis() as u64 };
        self.confirmed_at.insert((version, id), now);
        (Answer::Applied, hold)
    }

    // ---- leases ----

    fn lease_poll(&mut self, id: u64) {
        let now = self.now;
        self.next_id += 1;
        let round = self.next_id;
        let n = self.nodes.get_mut(&id).expect_node();
        if n.lease_round.is_some() {
            return;
        }
        let Some(needs) = lease_needs(&n.map, id, n.boot_id) else { return };
        let epoch = n.in_sync_epoch();
        let fresh = n.leases.fresh(epoch, now);
        let barrier_down = epoch != 0 && n.serving_from != epoch;
        if fresh && !barrier_down {
            return;
        }
        let asked: BTreeSet<u64> =
            n.map.nodes.values().filter(|p| p.id != id && p.up).map(|p| p.id).collect();
        n.lease_round = Some(LeaseRound {
            id: round,
            sent: now,
            epoch,
            needs,
            asked: asked.clone(),
            granted: BTreeSet::new(),
            answered: BTreeSet::new(),
        });
        if asked.is_empty() {
            self.lease_round_end(id, round);
            return;
        }
        for p in asked {
            self.send(id, p, Msg::LeaseReq { round, from: id, in_sync_epoch: epoch });
        }
        self.at(LEASE_CALL_TIMEOUT_MS, Event::LeaseRoundEnd { node: id, round });
    }

    fn lease_round_end(&mut self, id: u64, round: u64) {
        let Some(n) = self.nodes.get_mut(&id) else { return };
        if !n.alive || n.lease_round.as_ref().is_none_or(|r| r.id != round) {
            return;
        }
        if n.frozen {
            // (Its task does not run: it resumes when the node does.)
            self.at(10, Event::LeaseRoundEnd { node: id, round });
            return;
        }
        let Some(r) = n.lease_round.take() else { return };
        n.leases.renewed(r.epoch, &r.granted, r.sent);
        if barrier_lifted(&r.needs, &r.granted) && r.epoch != 0 && n.serving_from != r.epoch {
            n.serving_from = r.epoch;
            self.log(format!("node {id} serves (in sync at epoch {})", r.epoch));
        }
    }

    // ---- recovery ----

    fn recovery(&mut self, id: u64) {
        self.compare_begin(id);
        self.next_id += 1;
        let job = self.next_id;
        let n = self.nodes.get_mut(&id).expect_node();
        // Seeding (`recovery::seed_backfill`).
        let map = n.map.clone();
        let wanted: Vec<(u64, u8, u32)> = (0..map.pg_count)
            .filter(|p| map.holders(R, *p).contains(&id))
            .flat_map(|p| map.backfill(R, p).into_iter().map(move |x| (x, R, p)))
            .collect();
        n.seeded.retain(|w| wanted.contains(w));
        let todo: Vec<(u64, u8, u32)> = wanted.into_iter().filter(|w| !n.seeded.contains(w)).collect();
        if !todo.is_empty() {
            let line = format!("node {id} seeds {todo:?} from map epoch {}", map.epoch);
            push_trace(&mut self.trace, self.print_trace, self.now, line);
            let chunks: Vec<u64> = n.store.keys().copied().collect();
            for chunk in chunks {
                for (x, _, p) in &todo {
                    if pg(chunk) == *p {
                        n.record(&[*x], chunk, true);
                    }
                }
            }
            n.seeded.extend(todo);
        }
        n.seeded_epoch = n.seeded_epoch.max(map.epoch);
        // Fills that ended: the seeds' entries are done with.
        let peers: BTreeSet<u64> = n.missed.keys().map(|(p, _)| *p).collect();
        for p in &peers {
            if *p != id && map.nodes.contains_key(p) && !map.backfilling(*p) {
                n.missed.retain(|(q, _), e| q != p || !e.seed);
            }
        }
        // Back from a power loss: every up peer's chunk list, and each chunk of this node's PGs it
        // has no copy of recorded as missed by itself (`recovery::compare_chunk_lists`).
        let mut ask = Vec::new();
        if let Some(answers) = n.listing.as_ref() {
            let up: Vec<u64> = map.nodes.values().filter(|p| p.id != id && p.up).map(|p| p.id).collect();
            ask = up.iter().copied().filter(|p| !answers.contains_key(p)).collect();
            if ask.is_empty() {
                let lacking: BTreeSet<u64> = answers
                    .values()
                    .flatten()
                    .copied()
                    .filter(|c| map.holders(R, pg(*c)).contains(&id) && !n.store.contains_key(c))
                    .collect();
                for chunk in lacking {
                    n.record(&[id], chunk, false);
                }
                n.listing = None;
            }
        }
        // Chunks it must pull back itself: only while catching up, and it copies nothing to others
        // until it has (its own copies may be the reverted ones) (`recovery::pull_own`).
        let own = n.missed.iter().find(|((p, _), _)| *p == id).map(|((_, c), e)| (*c, e.seq));
        let mut pull = None;
        let mut revive = None;
        let mut newest: Option<(BTreeSet<u64>, u64)> = None;
        if let Some((chunk, seq)) = own {
            let catching = map.nodes.get(&id).is_none_or(|x| x.boot_id != n.boot_id || x.catching_up);
            let sources: Vec<u64> = map
                .holders(R, pg(chunk))
                .into_iter()
                .filter(|h| *h != id && map.nodes.get(h).is_some_and(|x| x.in_sync()))
                .filter(|h| !n.missed.contains_key(&(*h, chunk)))
                .collect();
            // (Not before writes this node may have answered before it lost power are past their
            // writers' attempts: then the newest in-sync copy holds every one acknowledged.)
            let settled_in =
                (self.now.saturating_sub(n.started_at) >= PULL_OWN_AFTER_MS) || !self.options.pull_newest;
            if catching && n.job.is_none() && !sources.is_empty() && settled_in && self.options.pull_newest {
                let here = n.store.get(&chunk).copied().unwrap_or(0);
                let asked: BTreeSet<u64> = sources.iter().copied().collect();
                n.job = Some(Job {
                    id: job,
                    peer: id,
                    chunk,
                    seq,
                    source: id,
                    target_version: Some(here),
                    version: None,
                    revive: Some((asked.clone(), BTreeMap::new())),
                    newest: true,
                    settled: 0,
                });
                newest = Some((asked, chunk));
            } else if catching && n.job.is_none() && !sources.is_empty() && settled_in {
                let source = sources[(seq % sources.len() as u64) as usize];
                let here = n.store.get(&chunk).copied().unwrap_or(0);
                n.job = Some(Job {
                    id: job,
                    peer: id,
                    chunk,
                    seq,
                    source,
                    target_version: Some(here),
                    version: None,
                    revive: None,
                    newest: false,
                    settled: 0,
                });
                pull = Some((source, chunk));
            } else if catching && n.job.is_none() && sources.is_empty() && self.options.revive {
                revive = Some((chunk, seq));
            }
        }
        if let Some((chunk, seq)) = revive
            && let Some(others) = self.revival(id, job, chunk, seq)
        {
            for p in others {
                self.send(id, p, Msg::ReviveReq { job, from: id, chunk });
            }
            self.at(RPC_TIMEOUT_MS, Event::JobTimeout { node: id, job });
        }
        if let Some((asked, chunk)) = newest {
            for p in asked {
                self.send(id, p, Msg::ReviveReq { job, from: id, chunk });
            }
            self.at(RPC_TIMEOUT_MS, Event::JobTimeout { node: id, job });
        }
        for p in ask {
            self.send(id, p, Msg::ListReq { from: id });
        }
        if let Some((source, chunk)) = pull {
            self.send(id, source, Msg::SourceRead { job, from: id, chunk, any: false });
            self.at(RPC_TIMEOUT_MS, Event::JobTimeout { node: id, job });
        }
        if own.is_some() {
            return;
        }
        let n = self.nodes.get_mut(&id).expect_node();
        if n.job.is_some() {
            return;
        }
        // (So does one its map shows down: `Options::down_nodes_relay`.)
        let me_catching_up =
            map.nodes.get(&id).is_none_or(|x| x.catching_up || (self.options.down_nodes_relay && !x.up));
        let pick = n
            .missed
            .iter()
            .find(|((p, _), _)| *p != id && map.nodes.get(p).is_some_and(|x| x.up && x.catching_up));
        let Some(((peer, chunk), entry)) = pick.map(|(k, e)| (*k, *e)) else { return };
        // A node catching up itself passes on an in-sync replica's copy (`copy_sources`).
        let sources: Vec<u64> = map
            .holders(R, pg(chunk))
            .into_iter()
            .filter(|h| *h != id && *h != peer && map.nodes.get(h).is_some_and(|x| x.in_sync()))
            .filter(|h| !n.missed.contains_key(&(*h, chunk)))
            .collect();
        // So does one that missed the current writer's fence, for a chunk dirty here of an older
        // generation: its copy may be a stray the fenced writer left only here
        // (`Options::unfenced_strays_relayed`).
        let map_generation = volume_generation(&map);
        let stray = self.options.unfenced_strays_relayed
            && n.fence < map_generation
            && n.marked.contains_key(&chunk)
            && n.store.get(&chunk).is_some_and(|v| generation_of(*v) < map_generation);
        let source = if (me_catching_up || stray) && !sources.is_empty() {
            sources[(entry.seq % sources.len() as u64) as usize]
        } else {
            id
        };
        n.job = Some(Job {
            id: job,
            peer,
            chunk,
            seq: entry.seq,
            source,
            target_version: None,
            version: None,
            revive: None,
            newest: false,
            settled: entry.settled,
        });
        self.send(id, peer, Msg::VersionReq { job, from: id, chunk });
        self.at(RPC_TIMEOUT_MS, Event::JobTimeout { node: id, job });
    }

    /// While catching up: compares each chunk dirty here with the in-sync holders' copies
    /// (`recovery::compare_dirty`); one that differs is recorded as missed by this node.
    fn compare_begin(&mut self, id: u64) {
        self.next_id += 1;
        let round = self.next_id;
        let n = self.nodes.get_mut(&id).expect_node();
        let Some(period) = n.catch_up_period() else { return };
        if n.comparing.is_some() || !n.compare_pending() {
            return;
        }
        let map = n.map.clone();
        let mine: BTreeMap<u64, u64> =
            n.marked.keys().filter_map(|c| n.store.get(c).map(|v| (*c, *v))).collect();
        let mut sources = BTreeMap::new();
        let mut ask: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for chunk in mine.keys() {
            let s: Vec<u64> = map
                .holders(R, pg(*chunk))
                .into_iter()
                .filter(|h| *h != id && !n.missed.contains_key(&(*h, *chunk)))
                .filter(|h| map.nodes.get(h).is_some_and(|x| x.in_sync()))
                .collect();
            for h in &s {
                ask.entry(*h).or_default().push(*chunk);
            }
            sources.insert(*chunk, s);
        }
        n.comparing = Some(Comparison {
            round,
            period,
            mine,
            sources,
            answers: ask.keys().map(|h| (*h, None)).collect(),
        });
        if ask.is_empty() {
            self.compare_end(id);
            return;
        }
        for (h, chunks) in ask {
            self.send(id, h, Msg::CompareReq { round, from: id, chunks });
        }
        self.at(RPC_TIMEOUT_MS, Event::CompareTimeout { node: id, round });
    }

    /// Every source answered: the differing chunks are recorded, and the comparison is done.
    fn compare_end(&mut self, id: u64) {
        let keeps_newer = self.options.compare_keeps_newer;
        let n = self.nodes.get_mut(&id).expect_node();
        let map_generation = volume_generation(&n.map);
        let Some(c) = n.comparing.take() else { return };
        let mut differ = Vec::new();
        let mut complete = true;
        for (chunk, mine) in &c.mine {
            let sources = c.sources.get(chunk).cloned().unwrap_or_default();
            // (holder, its state)
            let answered: Vec<(u64, ChunkState)> = sources
                .iter()
                .filter_map(|h| {
                    let infos = c.answers.get(h)?.as_ref()?;
                    infos.iter().find(|i| i.0 == *chunk).map(|i| (*h, i.clone()))
                })
                .collect();
            let behind: BTreeSet<u64> = answered.iter().flat_map(|a| a.1.2.iter().copied()).collect();
            let theirs: Vec<u64> =
                answered.iter().filter(|a| !behind.contains(&a.0)).map(|a| a.1.1).collect();
            let current = answered.iter().map(|a| a.1.3).fold(map_generation, u64::max);
            let serving: Vec<u64> =
                answered.iter().filter(|a| a.1.4 && !behind.contains(&a.0)).map(|a| a.1.1).collect();
            // (A copy of the current generation differs only by writes in flight; an older one is
            // a fenced writer's leftover only if above every copy of an in-sync holder that serves.)
            let kept = keeps_newer && (generation_of(*mine) >= current || serving.iter().any(|v| v >= mine));
            if !theirs.is_empty() && theirs.iter().any(|v| v != mine) && !kept {
                differ.push(*chunk);
            }
            // (Sources, but every one behind: again later.)
            complete &= !theirs.is_empty() || sources.is_empty();
        }
        for chunk in &differ {
            n.record(&[id], *chunk, false);
        }
        if complete {
            n.compared_for = Some(c.period);
        }
        let line = format!(
            "node {id} compared its dirty chunks for catch-up {} (complete {complete}): {differ:?} differ",
            c.period
        );
        push_trace(&mut self.trace, self.print_trace, self.now, line);
    }

    fn job_version(&mut self, id: u64, job: u64, version: u64) {
        let n = self.nodes.get_mut(&id).expect_node();
        let Some(j) = n.job.as_mut().filter(|j| j.id == job) else { return };
        j.target_version = Some(version);
        let (source, chunk) = (j.source, j.chunk);
        if source == id {
            let v = n.store.get(&chunk).copied().unwrap_or(0);
            let dirty = n.marked.contains_key(&chunk);
            self.job_source(id, job, Some(v), dirty);
        } else {
            self.send(id, source, Msg::SourceRead { job, from: id, chunk, any: false });
        }
    }

    /// No holder of `chunk` is in sync (every one catching up: the whole pool restarted or lost
    /// power): its holders' own copies decide (`recovery::revive_chunk`). Starts job `job` if the
    /// node's map knows its process, it holds the PG, and every other holder is up and none in
    /// sync; returns the holders to ask.
    fn revival(&mut self, id: u64, job: u64, chunk: u64, seq: u64) -> Option<BTreeSet<u64>> {
        let n = self.nodes.get_mut(&id).expect_node();
        let map = n.map.clone();
        map.nodes.get(&id).filter(|x| x.boot_id == n.boot_id)?;
        let holders = map.holders(R, pg(chunk));
        let state = |h: &u64| map.nodes.get(h).map(|x| (x.up, x.in_sync()));
        let others: BTreeSet<u64> = holders.iter().copied().filter(|h| *h != id).collect();
        if !holders.contains(&id) || others.iter().any(|h| state(h) != Some((true, false))) {
            return None;
        }
        n.job = Some(Job {
            id: job,
            peer: id,
            chunk,
            seq,
            source: id,
            target_version: None,
            version: None,
            revive: Some((others.clone(), BTreeMap::new())),
            newest: false,
            settled: 0,
        });
        Some(others)
    }

    /// A holder answered a revival; once all have, the copy to take is decided: a holder sure of
    /// its copy (no record of itself) first, then the newest; a copy another holder recorded as
    /// missed cannot win; ties go to the lowest id. This node's own copy is kept, or the winner's
    /// pulled (`SourceRead` with `any`).
    fn revive_answer(&mut self, id: u64, job: u64, from: u64, answer: (u64, Vec<u64>)) {
        let n = self.nodes.get_mut(&id).expect_node();
        let Some(j) = n.job.as_mut().filter(|j| j.id == job) else { return };
        let Some((asked, answers)) = j.revive.as_mut() else { return };
        answers.insert(from, answer);
        if answers.len() < asked.len() {
            return;
        }
        let answers = answers.clone();
        let chunk = j.chunk;
        if j.newest {
            // The newest in-sync copy (ties: lowest id) is pulled (`pull_own`).
            let Some((&source, _)) = answers.iter().max_by_key(|(h, (v, _))| (*v, Reverse(**h))) else {
                n.job = None;
                return;
            };
            j.source = source;
            self.send(id, source, Msg::SourceRead { job, from: id, chunk, any: false });
            return;
        }
        let mut copies: Vec<(bool, Reverse<u64>, u64)> = Vec::new();
        if let Some(v) = n.store.get(&chunk) {
            copies.push((n.missed.contains_key(&(id, chunk)), Reverse(*v), id));
        }
        let mut excluded: BTreeSet<u64> =
            n.missed.keys().filter(|(p, c)| *c == chunk && *p != id).map(|(p, _)| *p).collect();
        for (h, (v, missed_by)) in &answers {
            excluded.extend(missed_by.iter().copied().filter(|p| p != h));
            copies.push((missed_by.contains(h), Reverse(*v), *h));
        }
        copies.retain(|c| !excluded.contains(&c.2));
        copies.sort();
        let here = n.store.get(&chunk).copied().unwrap_or(0);
        self.stats.revivals += 1;
        let line = format!("node {id} revives chunk {chunk} (has v{here}): copies {copies:?}");
        push_trace(&mut self.trace, self.print_trace, self.now, line);
        match copies.first().map(|c| c.2) {
            None => n.job = None,
            Some(winner) if winner == id => {
                let seq = j.seq;
                if n.missed.get(&(id, chunk)).is_some_and(|e| e.seq == seq) {
                    n.missed.remove(&(id, chunk));
                }
                n.job = None;
                self.recovery(id);
            }
            Some(winner) => {
                j.source = winner;
                j.target_version = Some(here);
                self.send(id, winner, Msg::SourceRead { job, from: id, chunk, any: true });
            }
        }
    }

    fn job_source(&mut self, id: u64, job: u64, version: Option<u64>, dirty: bool) {
        let dirty = dirty && self.options.copies_carry_dirty;
        let n = self.nodes.get_mut(&id).expect_node();
        let Some(j) = n.job.clone().filter(|j| j.id == job) else { return };
        let Some(v) = version else {
            n.job = None;
            return;
        };
        if j.peer == id {
            // Its own chunk pulled back: installed over its copy as it was before the read (a
            // peer's copy installed meanwhile is not undone), the record done.
            if n.store.get(&j.chunk).copied().unwrap_or(0) == j.target_version.unwrap_or(0) {
                n.put_copy(j.chunk, v);
                if dirty {
                    n.marked.insert(j.chunk, 0);
                }
                self.applied_at.entry((v, id)).or_insert(self.now);
                if n.missed.get(&(id, j.chunk)).is_some_and(|e| e.seq == j.seq) {
                    n.missed.remove(&(id, j.chunk));
                }
            }
            n.job = None;
            self.recovery(id);
            return;
        }
        let target = j.target_version.unwrap_or(0);
        // (An open settled the chunk at generation `settled`: a copy of an older generation is a
        // fenced writer's leftover the open did not reach, whatever its version.)
        let superseded = generation_of(target) < j.settled && target != v;
        if target >= v && !superseded {
            // The peer holds this version or a newer one (one writer: versions grow along one
            // chain): nothing to copy.
            self.copied(id, &j, target);
            return;
        }
        if let Some(j) = n.job.as_mut() {
            j.version = Some(v);
        }
        let generation = n.fence.max(volume_generation(&n.map));
        self.send(
            id,
            j.peer,
            Msg::Install {
                job,
                from: id,
                chunk: j.chunk,
                version: v,
                expect: target,
                source: self.options.copies_name_source.then_some(j.source),
                settled: j.settled,
                dirty,
                generation,
            },
        );
    }

    fn job_installed(&mut self, id: u64, job: u64, ok: bool) {
        let n = self.nodes.get_mut(&id).expect_node();
        let Some(j) = n.job.clone().filter(|j| j.id == job) else { return };
        if ok {
            self.copied(id, &j, j.version.unwrap_or(0));
        } else {
            n.job = None;
        }
    }

    /// A copy reached the peer, which holds `peer_holds` now. When it was another replica's copy
    /// (relayed) and this node's own is newer (`Options::relay_keeps_newer`), this node's goes
    /// after it (one writer: it holds all the relayed one does): a copy relayed from an in-sync
    /// replica that has not got a write this node applied (in flight, its failure not yet
    /// recorded) would leave the peer without it. Then `MissedLog::done`: the entry goes unless the
    /// chunk was recorded again since. The batch goes on.
    fn copied(&mut self, id: u64, j: &Job, peer_holds: u64) {
        let relay_then_own = self.options.relay_keeps_newer;
        let n = self.nodes.get_mut(&id).expect_node();
        let own = n.store.get(&j.chunk).copied().unwrap_or(0);
        // (The volume's writer generation: the map's, or this node's fence if newer.)
        let current = volume_generation(&n.map).max(n.fence);
        if relay_then_own && j.source != id && peer_holds < own && generation_of(own) >= current {
            if let Some(job) = n.job.as_mut() {
                job.source = id;
                job.version = Some(own);
            }
            let msg = Msg::Install {
                job: j.id,
                from: id,
                chunk: j.chunk,
                version: own,
                expect: peer_holds,
                source: self.options.copies_name_source.then_some(id),
                settled: j.settled,
                dirty: self.options.copies_carry_dirty && n.marked.contains_key(&j.chunk),
                generation: current,
            };
            self.send(id, j.peer, msg);
            return;
        }
        if n.missed.get(&(j.peer, j.chunk)).is_some_and(|e| e.seq == j.seq) {
            n.missed.remove(&(j.peer, j.chunk));
        }
        n.job = None;
        if self.node_runs(id) {
            self.recovery(id);
        }
    }

    // ---- client ----

    /// How many of a PG's `holders` must apply a write (`cairn_types::placement::write_quorum`).
    fn write_quorum(&self, holders: usize) -> usize {
        if self.options.all_holders_but_r_minus_q {
            cairn_types::placement::write_quorum(R, holders)
        } else {
            usize::from(R) / 2 + 1
        }
    }

    /// Makes client `ep` the one the client functions drive.
    fn switch_to(&mut self, ep: Ep) {
        if self.client.ep == ep {
            return;
        }
        if let Some(i) = self.other_clients.iter().position(|c| c.ep == ep) {
            std::mem::swap(&mut self.client, &mut self.other_clients[i]);
        }
    }

    /// Whether client `ep` has no operation in flight.
    fn idle(&self, ep: Ep) -> bool {
        std::iter::once(&self.client)
            .chain(&self.other_clients)
            .filter(|c| c.ep == ep)
            .all(|c| c.op.is_none())
    }

    fn client_refresh(&mut self) {
        if self.leader.is_some_and(|l| self.linked(self.client.ep, l) && self.node_runs(l)) {
            self.client.map = self.meta.clone();
        }
        let now = self.now;
        let map = self.client.map.clone();
        // A suspect is dropped once the map shows it out of sync, or after SUSPECT_TTL.
        self.client.suspects.retain(|id, since| {
            now - *since < SUSPECT_TTL_MS && map.nodes.get(id).is_some_and(|n| n.in_sync())
        });
    }

    fn client_next(&mut self) {
        if self.client.op.is_some() || self.client.fenced {
            return;
        }
        if self.client.opening.is_some() {
            self.at(100, Event::ClientNext(self.client.ep));
            return;
        }
        if self.client.flushing.is_some() {
            return;
        }
        // A writer flushes now and then (a VM's fsync; a handed-over one too, until fenced).
        if self.client.writer && self.final_pass.is_none() && !self.healing && self.rng.chance(100) {
            let pg_flushes = self.options.pg_flushes;
            self.client.flushing = Some(Flushing {
                round: 0,
                deadline: self.now + IO_TIMEOUT_MS,
                // (What it promises: every write this client got acknowledged before it began.)
                covers: if pg_flushes { self.client.own_acked.clone() } else { self.acked.clone() },
                asked: BTreeMap::new(),
                pgs: pg_flushes.then(|| self.client.touched.clone()),
            });
            if pg_flushes && self.client.touched.is_empty() {
                // Nothing acknowledged since the last flush: done at once, as production's.
                self.flush_round_end();
            } else {
                self.flush_send();
            }
            return;
        }
        let current = self.client.ep == self.writer_ep;
        let (chunk, write) = match self.final_pass {
            _ if !self.client.writer => (self.rng.below(CHUNKS), false),
            // A writer handed over goes on writing until it is fenced, but not into the heal.
            _ if !current && self.healing => return,
            _ if !current => (self.rng.below(CHUNKS), self.rng.chance(550)),
            Some(done) if done < CHUNKS => (done, true),
            Some(_) => return,
            // Healing: quiet until the pool settles (a catch-up ends only at a moment when no
            // holder holds a record for the node: under writes that never pause it may not).
            None if self.healing => {
                self.at(100, Event::ClientNext(self.client.ep));
                return;
            }
            None => (self.rng.below(CHUNKS), self.rng.chance(550)),
        };
        self.next_op += 1;
        let kind = if write {
            let version = self.client.generation * GEN + self.next_version;
            self.next_version += 1;
            OpKind::Write { version, applied_by: BTreeSet::new() }
        } else {
            OpKind::Read { floor: self.acked.get(&chunk).copied().unwrap_or(0), began: self.now }
        };
        self.client.op = Some(Op {
            id: self.next_op,
            chunk,
            kind,
            deadline: self.now + IO_TIMEOUT_MS,
            attempt: 0,
            asked: BTreeMap::new(),
            candidates: Vec::new(),
            recording: None,
        });
        self.attempt();
    }

    fn op_done(&mut self) {
        self.client.op = None;
        if self.client.ep == self.writer_ep
            && let Some(done) = self.final_pass.as_mut()
        {
            *done += 1;
        }
        let d = self.rng.range(1, 40);
        self.at(d, Event::ClientNext(self.client.ep));
    }

    fn attempt(&mut self) {
        let Some(mut op) = self.client.op.take() else { return };
        // (A write of a chunk whose version it does not know settles the chunk first.)
        if self.options.writer_settles
            && matches!(op.kind, OpKind::Write { .. })
            && self.client.known.get(&op.chunk) == Some(&None)
        {
            let chunk = op.chunk;
            self.client.op = Some(op);
            self.client.settling = Some(Settling {
                chunk,
                round: 0,
                asked: BTreeSet::new(),
                infos: BTreeMap::new(),
                puts: BTreeMap::new(),
                top: 0,
            });
            self.settle_send();
            return;
        }
        op.attempt += 1;
        op.asked.clear();
        op.recording = None;
        let map = self.client.map.clone();
        let holders = map.holders(R, pg(op.chunk));
        let in_sync = |n: &u64| map.nodes.get(n).is_some_and(|x| x.in_sync());
        let (targets, mut missed): (Vec<u64>, Vec<u64>) =
            holders.iter().partition(|n| in_sync(n) && !self.client.suspects.contains_key(n));
        match op.kind {
            OpKind::Write { version, .. } => {
                for b in map.backfill(R, pg(op.chunk)) {
                    if !missed.contains(&b) {
                        missed.push(b);
                    }
                }
                let q = self.write_quorum(holders.len());
                if targets.len() < q {
                    self.client.op = Some(op);
                    self.retry_or_fail();
                    return;
                }
                if self.opened_at.is_some_and(|(g, _)| generation_of(version) >= g) {
                    self.written_since_open.insert(op.chunk);
                }
                let interval = match VolumeId::new(VOLUME_ID) {
                    Ok(v) => PgIndex::new(&map).interval(R, v, ChunkIndex(op.chunk)),
                    Err(_) => 0,
                };
                for t in &targets {
                    op.asked.insert(*t, None);
                    self.send(
                        self.client.ep,
                        *t,
                        Msg::Write {
                            op: (op.id, op.attempt),
                            chunk: op.chunk,
                            version,
                            expect: self.client.known.get(&op.chunk).copied().flatten(),
                            missed_by: missed.clone(),
                            interval,
                        },
                    );
                }
                let wait = RPC_TIMEOUT_MS + if missed.is_empty() { 0 } else { HOLDBACK_ALLOWANCE_MS };
                let (id, attempt) = (op.id, op.attempt);
                self.client.op = Some(op);
                self.at(wait, Event::ClientTimeout { client: self.client.ep, op: id, attempt });
            }
            OpKind::Read { .. } => {
                let mut c = targets;
                if !c.is_empty() {
                    let k = self.rng.below(c.len() as u64) as usize;
                    c.rotate_left(k);
                }
                op.candidates = c;
                self.client.op = Some(op);
                self.read_next();
            }
        }
    }

    fn read_next(&mut self) {
        let Some(op) = self.client.op.as_mut() else { return };
        if op.candidates.is_empty() {
            self.retry_or_fail();
            return;
        }
        let node = op.candidates.remove(0);
        op.asked.clear();
        op.asked.insert(node, None);
        op.attempt += 1;
        let (id, chunk, attempt) = (op.id, op.chunk, op.attempt);
        self.send(self.client.ep, node, Msg::Read { op: (id, attempt), chunk });
        self.at(RPC_TIMEOUT_MS, Event::ClientTimeout { client: self.client.ep, op: id, attempt });
    }

    fn retry_or_fail(&mut self) {
        let Some(op) = self.client.op.as_ref() else { return };
        if self.now > op.deadline {
            let op = op.clone();
            match op.kind {
                OpKind::Write { version, applied_by } => {
                    self.stats.writes_failed += 1;
                    self.client.known.insert(op.chunk, None);
                    if self.final_pass.is_some() && self.client.ep == self.writer_ep {
                        self.violation = Some(format!(
                            "a write of chunk {} failed after the pool settled (every fault healed)",
                            op.chunk
                        ));
                    }
                    self.log(format!("write v{version} of chunk {} failed", op.chunk));
                    // Applied by a majority but not acknowledged: the others are recorded.
                    let others: Vec<u64> = self
                        .client
                        .map
                        .holders(R, pg(op.chunk))
                        .into_iter()
                        .filter(|n| !applied_by.contains(n))
                        .collect();
                    if applied_by.len() >= self.write_quorum(self.client.map.holders(R, pg(op.chunk)).len())
                        && !others.is_empty()
                    {
                        for n in &applied_by {
                            self.send(
                                self.client.ep,
                                *n,
                                Msg::RecordMissed {
                                    op: (0, 0),
                                    chunk: op.chunk,
                                    peers: others.clone(),
                                    at: version,
                                    settled: 0,
                                },
                            );
                        }
                    }
                }
                OpKind::Read { .. } => {
                    self.stats.reads_failed += 1;
                }
            }
            self.op_done();
            return;
        }
        // A new attempt number: whatever the ended attempt still had scheduled is ignored.
        let Some(op) = self.client.op.as_mut() else { return };
        op.attempt += 1;
        let (id, attempt) = (op.id, op.attempt);
        self.at(CLIENT_RETRY_MS, Event::ClientRetry { client: self.client.ep, op: id, attempt });
    }

    fn client_reply(&mut self, msg: Msg) {
        if let Msg::InfoReply { round, .. } | Msg::PutReply { round, .. } = &msg
            && self.client.settling.as_ref().is_some_and(|s| s.round == *round)
        {
            self.settle_reply(msg);
            return;
        }
        if let Msg::FlushReply { round, from } = msg {
            if let Some(f) = self.client.flushing.as_mut().filter(|f| f.round == round) {
                f.asked.insert(from, true);
                if f.asked.values().all(|d| *d) {
                    self.flush_round_end();
                }
            }
            return;
        }
        if let Msg::FenceReply { round, from, .. }
        | Msg::InfoReply { round, from, .. }
        | Msg::PutReply { round, from, .. }
        | Msg::RecordReply { op: (OPEN_OP, round), from, .. } = msg
        {
            self.open_reply(round, from, msg);
            return;
        }
        let Some(op) = self.client.op.as_mut() else { return };
        match msg {
            Msg::WriteReply { op: id, from, reply }
                if id == (op.id, op.attempt) && op.recording.is_none() =>
            {
                if let Some(slot) = op.asked.get_mut(&from)
                    && slot.is_none()
                {
                    *slot = Some(reply);
                }
                if op.asked.values().all(|a| a.is_some()) {
                    self.attempt_ended();
                }
            }
            Msg::RecordReply { op: id, from, ok } if id == (op.id, op.attempt) => {
                if let Some((_, _, answers)) = op.recording.as_mut() {
                    answers.insert(from, ok);
                    let all =
                        op.recording.as_ref().is_some_and(|(ok, _, a)| ok.iter().all(|n| a.contains_key(n)));
                    if all {
                        self.attempt_ended();
                    }
                }
            }
            Msg::ReadReply { op: id, from, version }
                if id == (op.id, op.attempt) && op.asked.contains_key(&from) =>
            {
                let OpKind::Read { floor, began } = op.kind else { return };
                match version {
                    Some(v) => {
                        self.stats.reads_checked += 1;
                        let chunk = op.chunk;
                        self.check_pinned(chunk, v, from, began);
                        if v < floor {
                            self.violation = Some(format!(
                                "I2: a read of chunk {chunk} from node {from} returned version {v}, older than the \
                                 version {floor} acknowledged before the read began"
                            ));
                        }
                        self.op_done();
                    }
                    None => self.read_next(),
                }
            }
            _ => {}
        }
    }

    /// A write attempt's replies are in (or it timed out): record, acknowledge or retry
    /// (`VolumeClient::mutate`).
    fn attempt_ended(&mut self) {
        let Some(mut op) = self.client.op.take() else { return };
        let OpKind::Write { version, ref mut applied_by } = op.kind else {
            // A read timed out on one node: the next.
            self.client.op = Some(op);
            self.read_next();
            return;
        };
        if let Some((ok, stale, answers)) = op.recording.take() {
            let recorded = ok.iter().all(|n| answers.get(n) == Some(&true));
            for n in ok.iter().filter(|n| answers.get(n) != Some(&true)) {
                self.suspect(*n);
            }
            let q = self.write_quorum(self.client.map.holders(R, pg(op.chunk)).len());
            let done = recorded && ok.len() >= q && !stale;
            self.client.op = Some(op);
            self.finish_write(version, done);
            return;
        }
        let mut ok = BTreeSet::new();
        let mut failed = BTreeSet::new();
        let mut stale = false;
        let mut conflict = false;
        let mut fenced = false;
        let mut behind = 0;
        for (n, a) in &op.asked {
            match a {
                Some(Answer::Fenced) => fenced = true,
                Some(Answer::Applied) => {
                    ok.insert(*n);
                }
                Some(Answer::Unavailable) => stale = true,
                // Behind (one writer): it missed writes; failed, recorded as missed like a failure.
                Some(Answer::Behind) => {
                    failed.insert(*n);
                    behind += 1;
                }
                // Another version (a failed write's leftover): settled, then written again.
                Some(Answer::Conflict) => {
                    stale = true;
                    conflict = true;
                }
                None => {
                    failed.insert(*n);
                }
            }
        }
        applied_by.extend(ok.iter().copied());
        if fenced {
            // (`IoError::Fenced`: the write fails and so does every later one of this writer.)
            self.log(format!(
                "writer {} (generation {}) fenced: v{version} of chunk {} fails",
                self.client.ep, self.client.generation, op.chunk
            ));
            self.client.fenced = true;
            self.stats.writes_failed += 1;
            self.op_done();
            return;
        }
        let line = format!(
            "write v{version} chunk {} attempt {}: applied {ok:?} failed {failed:?} stale {stale}",
            op.chunk, op.attempt
        );
        self.log(line);
        // Every target is behind this writer's last acknowledged write of the chunk, or more than
        // may lack one: they lost it (every holder lost power before a flush). None is suspected;
        // the write fails at once and the next one expects no version (`mutate`). (In the final
        // pass: written again.)
        let holders = self.client.map.holders(R, pg(op.chunk)).len();
        let lost = behind == op.asked.len() || behind > holders.saturating_sub(self.write_quorum(holders));
        if ok.is_empty() && behind > 0 && lost {
            self.log(format!(
                "write v{version} of chunk {} failed: every replica lost the last write",
                op.chunk
            ));
            self.client.known.insert(op.chunk, None);
            self.stats.writes_failed += 1;
            self.client.op = None;
            let d = self.rng.range(1, 40);
            self.at(d, Event::ClientNext(self.client.ep));
            return;
        }
        if conflict {
            // (`settle_chunk`: the copies made alike; here the next attempt expects none.)
            self.client.known.insert(op.chunk, None);
        }
        for n in &failed {
            self.suspect(*n);
        }
        let q = self.write_quorum(self.client.map.holders(R, pg(op.chunk)).len());
        if ok.len() >= q && !failed.is_empty() {
            // Every applier records who failed, and must confirm, before the acknowledgement.
            let peers: Vec<u64> = failed.iter().copied().collect();
            op.attempt += 1;
            let (id, attempt) = (op.id, op.attempt);
            for n in &ok {
                self.send(
                    self.client.ep,
                    *n,
                    Msg::RecordMissed {
                        op: (id, attempt),
                        chunk: op.chunk,
                        peers: peers.clone(),
                        at: version,
                        settled: 0,
                    },
                );
            }
            op.recording = Some((ok, stale, BTreeMap::new()));
            self.client.op = Some(op);
            self.at(
                RPC_TIMEOUT_MS + HOLDBACK_ALLOWANCE_MS,
                Event::ClientTimeout { client: self.client.ep, op: id, attempt },
            );
            return;
        }
        let done = ok.len() >= q && !stale;
        self.client.op = Some(op);
        self.finish_write(version, done && failed.is_empty());
    }

    fn finish_write(&mut self, version: u64, done: bool) {
        let Some(op) = self.client.op.as_ref() else { return };
        if done {
            let chunk = op.chunk;
            let op = op.clone();
            let epochs: Vec<(u64, u64)> =
                op.asked.keys().filter_map(|n| self.nodes.get(n).map(|x| (*n, x.map.epoch))).collect();
            let line = format!(
                "ack v{version} chunk {chunk} (pg {}) applied by (node, map epoch) {epochs:?}; client map epoch {}",
                pg(chunk),
                self.client.map.epoch
            );
            self.log(line);
            let applied_by = match &op.kind {
                OpKind::Write { applied_by, .. } => applied_by.clone(),
                OpKind::Read { .. } => BTreeSet::new(),
            };
            if let Some((generation, at)) = self.opened_at
                && generation_of(version) < generation
                && applied_by.iter().all(|n| self.applied_at.get(&(version, *n)).is_none_or(|t| *t >= at))
            {
                self.violation = Some(format!(
                    "I3: v{version} of chunk {chunk} of an old writer acknowledged, applied only after writer generation \
                     {generation}'s open returned at {at}"
                ));
            }
            // A write applied before every node lost power and acknowledged after (its replies were
            // on their way) may be lost with the power: owed only if a quorum applied it since.
            let since_loss = self.pool_power_loss_at.is_none_or(|t| {
                let q = self.write_quorum(self.client.map.holders(R, pg(chunk)).len());
                applied_by
                    .iter()
                    .filter(|n| self.confirmed_at.get(&(version, **n)).is_some_and(|a| *a > t))
                    .count()
                    >= q
            });
            if since_loss {
                let a = self.acked.entry(chunk).or_insert(0);
                *a = (*a).max(version);
                let a = self.client.own_acked.entry(chunk).or_insert(0);
                *a = (*a).max(version);
            }
            self.client.known.insert(chunk, Some(version));
            self.stats.writes_acked += 1;
            // Marked for flushing once acknowledged (`TouchedPgs::touch`); a FUA write is flushed
            // at once, its PG only, and done when that flush is.
            if self.options.pg_flushes {
                self.client.marks += 1;
                let mark = self.client.marks;
                self.client.touched.insert(pg(chunk), mark);
                if self.rng.chance(125) {
                    self.stats.fua_writes += 1;
                    self.client.flushing = Some(Flushing {
                        round: 0,
                        deadline: self.now + IO_TIMEOUT_MS,
                        covers: [(chunk, version)].into(),
                        asked: BTreeMap::new(),
                        pgs: Some([(pg(chunk), mark)].into()),
                    });
                    self.flush_send();
                }
            }
            self.op_done();
        } else {
            self.retry_or_fail();
        }
    }

    // ---- a writer's settle (`VolumeClient::settle_chunk`, `Options::writer_settles`) ----

    /// Asks the chunk's in-sync holders the client does not suspect for its state there.
    fn settle_send(&mut self) {
        let Some(chunk) = self.client.settling.as_ref().map(|s| s.chunk) else { return };
        self.next_id += 1;
        let round = self.next_id;
        let map = self.client.map.clone();
        let nodes: BTreeSet<u64> = map
            .holders(R, pg(chunk))
            .into_iter()
            .filter(|n| {
                map.nodes.get(n).is_some_and(|x| x.in_sync()) && !self.client.suspects.contains_key(n)
            })
            .collect();
        let ep = self.client.ep;
        if nodes.is_empty() {
            // (Nobody to ask: again after a pause, until the write's deadline.)
            self.settle_pause();
            return;
        }
        if let Some(st) = self.client.settling.as_mut() {
            *st = Settling {
                chunk,
                round,
                asked: nodes.clone(),
                infos: BTreeMap::new(),
                puts: BTreeMap::new(),
                top: 0,
            };
        }
        for n in nodes {
            self.send(ep, n, Msg::Info { round, chunk });
        }
        self.at(RPC_TIMEOUT_MS, Event::SettleRound { client: ep, round });
    }

    fn settle_reply(&mut self, msg: Msg) {
        let Some(st) = self.client.settling.as_mut() else { return };
        match msg {
            Msg::InfoReply { from, version, missed_by, serving, .. } if st.puts.is_empty() => {
                st.infos.insert(from, (version, missed_by, serving));
                if st.asked.iter().all(|n| st.infos.contains_key(n)) {
                    self.settle_round_end();
                }
            }
            Msg::PutReply { from, ok, fenced, .. } => {
                if let Some(slot) = st.puts.get_mut(&from) {
                    *slot = Some((ok, fenced));
                }
                if st.puts.values().all(Option::is_some) {
                    self.settle_round_end();
                }
            }
            _ => {}
        }
    }

    /// The states are in (or timed out): the highest copy that may win goes over the others; or
    /// the installs are answered (or timed out): done, or again after a pause; or a pause is over.
    fn settle_round_end(&mut self) {
        let Some(st) = self.client.settling.clone() else { return };
        if st.asked.is_empty() && st.puts.is_empty() {
            // (A pause is over, or nobody could be asked.)
            self.settle_send();
            return;
        }
        if !st.puts.is_empty() {
            if st.puts.values().any(|p| p.is_some_and(|(_, fenced)| fenced)) {
                // A newer writer holds the volume (`on_fenced`): this write fails, and so does
                // every later one of this writer.
                self.log(format!(
                    "writer {} (generation {}) fenced during a settle",
                    self.client.ep, self.client.generation
                ));
                self.client.settling = None;
                self.client.fenced = true;
                self.stats.writes_failed += 1;
                self.op_done();
                return;
            }
            // (A node that did not answer is reported, as for a failed write; one whose copy
            // moved, or that refused the source, is only asked again: production's stale retry.)
            let silent: Vec<u64> = st.puts.iter().filter(|(_, p)| p.is_none()).map(|(n, _)| *n).collect();
            if st.puts.values().all(|p| p.is_some_and(|(ok, _)| ok)) {
                self.settle_done(st.top);
            } else {
                for n in silent {
                    self.suspect(n);
                }
                self.settle_pause();
            }
            return;
        }
        let holders = self.client.map.holders(R, pg(st.chunk));
        let missed: BTreeSet<u64> = st.infos.values().flat_map(|i| i.1.iter().copied()).collect();
        let may_win: BTreeSet<u64> = st.infos.keys().copied().filter(|n| !missed.contains(n)).collect();
        let versions: BTreeMap<u64, Version> = st.infos.iter().map(|(n, i)| (*n, as_version(i.0))).collect();
        let plan = (st.infos.len() >= Self::deciders(holders.len()))
            .then(|| settle(&versions, &may_win, None))
            .flatten()
            // (The winner's copy is read with a client read: it must serve reads of the chunk.)
            .filter(|(winner, _)| st.infos.get(winner).is_some_and(|i| i.2));
        let Some((winner, installs)) = plan else {
            self.settle_pause();
            return;
        };
        let top = st.infos.get(&winner).map_or(0, |i| i.0);
        self.stats.settles += 1;
        self.stats.settle_installs += installs.len() as u64;
        let line = format!(
            "writer {} settles chunk {} on node {winner}'s v{top}: {:?}",
            self.client.ep, st.chunk, st.infos
        );
        self.log(line);
        if installs.is_empty() {
            self.settle_done(top);
            return;
        }
        self.next_id += 1;
        let round = self.next_id;
        let (ep, chunk, generation) = (self.client.ep, st.chunk, self.client.generation);
        if let Some(s) = self.client.settling.as_mut() {
            s.round = round;
            s.top = top;
            s.puts = installs.iter().map(|i| (i.node, None)).collect();
        }
        for i in installs {
            let expect = i.expected.generation * GEN + i.expected.seq;
            self.send(
                ep,
                i.node,
                Msg::Put { round, chunk, version: top, expect, generation, source: Some(winner) },
            );
        }
        self.at(RPC_TIMEOUT_MS, Event::SettleRound { client: ep, round });
    }

    /// The settle goes on after a pause, until the write's deadline (then the write fails).
    fn settle_pause(&mut self) {
        if self.client.op.as_ref().is_none_or(|op| self.now > op.deadline) {
            self.client.settling = None;
            self.retry_or_fail();
            return;
        }
        self.next_id += 1;
        let round = self.next_id;
        let ep = self.client.ep;
        if let Some(s) = self.client.settling.as_mut() {
            s.round = round;
            s.asked.clear();
            s.infos.clear();
            s.puts.clear();
        }
        let d = self.rng.range(20, 70);
        self.at(d, Event::SettleRound { client: ep, round });
    }

    /// The copies are identical at `top`: the write goes on, expecting it (with a version above
    /// it: production stamps the mutation after the settle).
    fn settle_done(&mut self, top: u64) {
        let Some(st) = self.client.settling.take() else { return };
        self.client.known.insert(st.chunk, Some(top));
        if let Some(op) = self.client.op.as_mut()
            && let OpKind::Write { version, .. } = &mut op.kind
            && *version <= top
        {
            *version = self.client.generation * GEN + self.next_version;
            self.next_version += 1;
        }
        self.attempt();
    }

    // ---- a client's flush (`VolumeClient::flush_pgs`) ----

    /// Sends `Flush` to every in-sync holder the client does not suspect.
    fn flush_send(&mut self) {
        self.next_id += 1;
        let round = self.next_id;
        let map = self.client.map.clone();
        let pgs: Vec<u32> = match self.client.flushing.as_ref().and_then(|f| f.pgs.as_ref()) {
            Some(pgs) => pgs.keys().copied().collect(),
            None => (0..map.pg_count).collect(),
        };
        let nodes: BTreeSet<u64> = pgs
            .iter()
            .flat_map(|p| map.holders(R, *p))
            .filter(|n| {
                map.nodes.get(n).is_some_and(|x| x.in_sync()) && !self.client.suspects.contains_key(n)
            })
            .collect();
        let ep = self.client.ep;
        let Some(f) = self.client.flushing.as_mut() else { return };
        f.round = round;
        f.asked = nodes.iter().map(|n| (*n, false)).collect();
        for n in nodes {
            self.send(ep, n, Msg::Flush { round });
        }
        self.at(RPC_TIMEOUT_MS, Event::FlushRound { client: ep, round });
    }

    /// The round's answers are in (or it timed out): done once `deciders` of every PG's holders
    /// flushed; else again after 100 ms, until `io_timeout`.
    fn flush_round_end(&mut self) {
        let Some(f) = self.client.flushing.clone() else { return };
        let map = self.client.map.clone();
        let pgs: Vec<u32> = match f.pgs.as_ref() {
            Some(pgs) => pgs.keys().copied().collect(),
            None => (0..map.pg_count).collect(),
        };
        let durable = pgs.iter().all(|p| {
            let row = map.holders(R, *p);
            row.iter().filter(|n| f.asked.get(n) == Some(&true)).count() >= Self::deciders(row.len())
        });
        if durable {
            for (chunk, v) in &f.covers {
                let floor = self.flushed.entry(*chunk).or_insert(0);
                *floor = (*floor).max(*v);
            }
            // The PGs not marked again since it began are clean (`TouchedPgs::flushed`).
            for (p, mark) in f.pgs.iter().flatten() {
                if self.client.touched.get(p) == Some(mark) {
                    self.client.touched.remove(p);
                }
            }
            self.stats.flushes += 1;
            self.client.flushing = None;
            let d = self.rng.range(1, 40);
            self.at(d, Event::ClientNext(self.client.ep));
        } else if self.now > f.deadline {
            self.log("flush failed: too few holders flushed".into());
            self.client.flushing = None;
            let d = self.rng.range(1, 40);
            self.at(d, Event::ClientNext(self.client.ep));
        } else {
            // (Due with nobody asked: `flush_send` after a refresh.)
            self.next_id += 1;
            let (ep, round) = (self.client.ep, self.next_id);
            if let Some(f) = self.client.flushing.as_mut() {
                f.round = round;
                f.asked.clear();
            }
            self.at(100, Event::FlushRound { client: ep, round });
        }
    }

    // ---- a writer handover (`VolumeClient::generation`, `fence_and_reconcile`) ----

    /// I3: once the new writer's open returned, the replicas of a chunk it has not written since
    /// serve one copy (the old writer's leftovers were made identical or stay refused).
    fn check_pinned(&mut self, chunk: u64, version: u64, from: u64, began: u64) {
        let Some((generation, at)) = self.opened_at else { return };
        if !self.options.check_one_copy_after_open
            || began < at
            || self.written_since_open.contains(&chunk)
            || !self.promised.contains(&chunk)
        {
            return;
        }
        match self.pinned.get(&chunk).copied() {
            None => {
                self.pinned.insert(chunk, (version, from));
            }
            Some((v, node)) if v != version => {
                self.violation = Some(format!(
                    "I3: after writer generation {generation}'s open, chunk {chunk} was read as v{v} from node {node} \
                     and as v{version} from node {from}, with no write of it sent since"
                ));
            }
            Some(_) => {}
        }
    }

    /// The clients' endpoints (the new writer's once a handover happened).
    fn client_eps(&self) -> Vec<Ep> {
        let mut eps = vec![CLIENT, READER];
        if self.handovers > 0 {
            eps.push(NEW_WRITER);
        }
        eps
    }

    /// A new host opens the volume for writing (a live migration's target, a VM restarted
    /// elsewhere); the old writer goes on until a node refuses it as fenced.
    fn handover(&mut self) {
        self.handovers += 1;
        self.stats.handovers += 1;
        self.log("handover: a new writer opens the volume".into());
        self.other_clients.push(Client::new(NEW_WRITER, true, self.meta.clone()));
        self.writer_ep = NEW_WRITER;
        self.switch_to(NEW_WRITER);
        self.open_begin(0);
        self.at(CLIENT_REFRESH_MS, Event::ClientRefresh(NEW_WRITER));
        self.at(100, Event::ClientNext(NEW_WRITER));
    }

    /// Asks the leader for a generation newer than `after` (`OpenVolume`).
    fn open_begin(&mut self, after: u64) {
        self.next_id += 1;
        let round = self.next_id;
        self.client.opening = Some(Opening {
            round,
            deadline: self.now + IO_TIMEOUT_MS,
            generation: 0,
            step: OpenStep::Commit { after },
            asked: BTreeMap::new(),
            reached: BTreeSet::new(),
            dirty: BTreeMap::new(),
            live: BTreeSet::new(),
            installed: false,
            fenced_at: 0,
        });
        if let Some(l) = self.leader {
            self.send(self.client.ep, l, Msg::Open { after });
        }
        self.at(200, Event::OpenStep { client: self.client.ep, round });
    }

    fn open_failed(&mut self, why: String) {
        let Some(o) = self.client.opening.as_ref() else { return };
        let after = o.generation.max(match o.step {
            OpenStep::Commit { after } => after,
            _ => 0,
        });
        self.log(format!("open failed: {why}"));
        self.open_begin(after);
    }

    /// Sends this step's requests (`asked` are the nodes) under a new round, with its timeout.
    fn open_send(&mut self, step: OpenStep, to: Vec<(u64, Msg)>, timeout: u64) {
        self.next_id += 1;
        let round = self.next_id;
        let ep = self.client.ep;
        let Some(o) = self.client.opening.as_mut() else { return };
        o.round = round;
        o.step = step;
        o.asked = to.iter().map(|(n, _)| (*n, None)).collect();
        for (n, mut msg) in to {
            match &mut msg {
                Msg::Fence { round: r, .. }
                | Msg::Info { round: r, .. }
                | Msg::Put { round: r, .. }
                | Msg::RecordMissed { op: (_, r), .. } => *r = round,
                _ => {}
            }
            self.send(ep, n, msg);
        }
        self.at(timeout, Event::OpenStep { client: ep, round });
    }

    /// A step is due: the commit looked for, a pause over, or a round timed out.
    fn open_step_due(&mut self) {
        let Some(o) = self.client.opening.clone() else { return };
        match o.step {
            OpenStep::Commit { after } => {
                self.client_refresh();
                let g = volume_generation(&self.client.map);
                if g > after {
                    if let Some(o) = self.client.opening.as_mut() {
                        o.generation = g;
                    }
                    self.fence_round();
                } else if self.now > o.deadline {
                    self.open_failed("no generation committed".into());
                } else {
                    if let Some(l) = self.leader {
                        self.send(self.client.ep, l, Msg::Open { after });
                    }
                    self.next_id += 1;
                    let round = self.next_id;
                    if let Some(o) = self.client.opening.as_mut() {
                        o.round = round;
                    }
                    self.at(500, Event::OpenStep { client: self.client.ep, round });
                }
            }
            _ => self.open_advance(),
        }
    }

    /// Raises the generation on every holder the map shows in sync.
    fn fence_round(&mut self) {
        self.client_refresh();
        let Some(generation) = self.client.opening.as_ref().map(|o| o.generation) else { return };
        let map = self.client.map.clone();
        let nodes: BTreeSet<u64> = (0..map.pg_count)
            .flat_map(|p| map.holders(R, p))
            .filter(|n| map.nodes.get(n).is_some_and(|x| x.in_sync()))
            .collect();
        if let Some(o) = self.client.opening.as_mut() {
            o.reached.clear();
            o.dirty.clear();
        }
        let to = nodes.into_iter().map(|n| (n, Msg::Fence { round: 0, generation })).collect();
        self.open_send(OpenStep::Fence, to, RPC_TIMEOUT_MS);
    }

    fn open_reply(&mut self, round: u64, from: u64, msg: Msg) {
        let Some(o) = self.client.opening.as_mut().filter(|o| o.round == round) else { return };
        if o.asked.get(&from).is_none_or(|a| a.is_some()) {
            return;
        }
        let good = match msg {
            Msg::FenceReply { fenced, serving, dirty, .. } => {
                if serving && !fenced {
                    o.reached.insert(from);
                    for (chunk, version, missed_by) in dirty {
                        o.dirty.entry(chunk).or_default().insert(from, (version, missed_by));
                    }
                }
                !fenced
            }
            Msg::InfoReply { version, missed_by, .. } => {
                if let OpenStep::Infos(chunk) = o.step {
                    o.dirty.entry(chunk).or_default().insert(from, (version, missed_by));
                }
                true
            }
            // (Fenced by a newer writer: it cannot happen with one opener; a failure all the same.)
            Msg::PutReply { ok, fenced, .. } => ok && !fenced,
            Msg::RecordReply { ok, .. } => ok,
            _ => return,
        };
        o.asked.insert(from, Some(good));
        if o.asked.values().all(|a| a.is_some()) {
            self.open_advance();
        }
    }

    /// deciders: as many of a PG's holders as a reconciliation needs (`VolumeMap::deciders`).
    fn deciders(holders: usize) -> usize {
        let q = usize::from(R) / 2 + 1;
        q.max((holders + 1).saturating_sub(q))
    }

    /// A step's answers are in (or it timed out).
    fn open_advance(&mut self) {
        let Some(o) = self.client.opening.clone() else { return };
        let silent: Vec<u64> = o.asked.iter().filter(|(_, a)| a.is_none()).map(|(n, _)| *n).collect();
        let failed: Vec<u64> = o.asked.iter().filter(|(_, a)| **a != Some(true)).map(|(n, _)| *n).collect();
        for n in &silent {
            self.suspect(*n);
        }
        let map = self.client.map.clone();
        match o.step {
            OpenStep::Fence => {
                let short = (0..map.pg_count).find(|p| {
                    let row = map.holders(R, *p);
                    row.iter().filter(|n| o.reached.contains(n)).count() < Self::deciders(row.len())
                });
                match short {
                    None => {
                        if let Some(o) = self.client.opening.as_mut() {
                            o.fenced_at = self.now;
                        }
                        self.open_next_chunk();
                    }
                    Some(p) if self.now > o.deadline => {
                        self.open_failed(format!("too few holders of pg {p} serve"));
                    }
                    Some(_) => {
                        // Again after a pause (`fence_and_reconcile`: 200 ms, a refresh).
                        self.next_id += 1;
                        let round = self.next_id;
                        if let Some(o) = self.client.opening.as_mut() {
                            o.round = round;
                            o.step = OpenStep::Commit { after: o.generation.saturating_sub(1) };
                        }
                        self.at(200, Event::OpenStep { client: self.client.ep, round });
                    }
                }
            }
            OpenStep::Infos(chunk) => {
                if let Some(o) = self.client.opening.as_mut() {
                    for n in &failed {
                        o.live.remove(n);
                        o.reached.remove(n);
                    }
                }
                self.open_settle(chunk);
            }
            OpenStep::Installs(chunk, _) => {
                let any_ok = o.asked.values().any(|a| *a == Some(true));
                let stale = o.asked.iter().any(|(_, a)| *a == Some(false));
                if let Some(o) = self.client.opening.as_mut() {
                    o.installed |= any_ok;
                    // A target that did not answer takes no part any more (suspected; recorded
                    // below); one whose copy moved is asked again.
                    for n in &silent {
                        o.live.remove(n);
                        o.reached.remove(n);
                    }
                    if stale {
                        let live = o.live.clone();
                        if let Some(d) = o.dirty.get_mut(&chunk) {
                            d.retain(|n, _| !live.contains(n));
                        }
                    }
                }
                if stale && self.now <= o.deadline {
                    self.open_ask(chunk);
                } else if stale {
                    self.open_failed(format!("chunk {chunk}: copies kept moving"));
                } else {
                    self.open_settle(chunk);
                }
            }
            OpenStep::Records(chunk, _) => {
                let confirmed = o.asked.values().filter(|a| **a == Some(true)).count();
                for n in &failed {
                    self.suspect(*n);
                }
                // (A quorum of them: a holder left out serves reads only with leases from all its
                // other holders but q − 1, so q records reach one it needs; fewer let it go on
                // serving its own copy beside the settled one.)
                let need = if self.options.records_need_quorum { usize::from(R) / 2 + 1 } else { 1 };
                if confirmed < need.min(o.asked.len()) {
                    self.open_failed(format!(
                        "chunk {chunk}: only {confirmed} holders recorded the ones that took no part"
                    ));
                    return;
                }
                // A holder that did not confirm is left out in turn, recorded on those that did
                // (`reconcile_dirty`: its copy may have moved, pulled back, older).
                if self.options.refusers_recorded && !failed.is_empty() {
                    let at = match o.step {
                        OpenStep::Records(_, at) => at,
                        _ => 0,
                    };
                    if let Some(o) = self.client.opening.as_mut() {
                        for n in &failed {
                            o.live.remove(n);
                        }
                    }
                    self.open_record(chunk, at);
                    return;
                }
                if let Some(o) = self.client.opening.as_mut() {
                    o.dirty.remove(&chunk);
                }
                self.open_next_chunk();
            }
            OpenStep::Commit { .. } => {}
        }
    }

    /// The next dirty chunk to reconcile, or the open returns.
    fn open_next_chunk(&mut self) {
        let Some(o) = self.client.opening.as_mut() else { return };
        if !self.options.reconcile_dirty {
            o.dirty.clear();
        }
        let Some(chunk) = o.dirty.keys().next().copied() else {
            let generation = o.generation;
            self.client.opening = None;
            self.client.generation = generation;
            self.client.known.clear();
            self.opened_at = Some((generation, self.now));
            self.stats.opens += 1;
            self.log(format!("writer {} opened: generation {generation}", self.client.ep));
            return;
        };
        let holders = self.client.map.holders(R, pg(chunk));
        o.live = holders.iter().copied().filter(|n| o.reached.contains(n)).collect();
        o.installed = false;
        // (The fence's reports are trusted while fresh; later, the chunk's state is asked again.)
        if self.options.fresh_states
            && self.now.saturating_sub(o.fenced_at) >= FENCE_REPORTS_FRESH_MS
            && let Some(d) = o.dirty.get_mut(&chunk)
        {
            d.clear();
        }
        self.open_ask(chunk);
    }

    /// Asks the live holders of `chunk` not heard from yet for its state there.
    fn open_ask(&mut self, chunk: u64) {
        let Some(o) = self.client.opening.as_ref() else { return };
        let known = o.dirty.get(&chunk);
        let ask: Vec<u64> =
            o.live.iter().copied().filter(|n| known.is_none_or(|d| !d.contains_key(n))).collect();
        if ask.is_empty() {
            self.open_settle(chunk);
            return;
        }
        let to = ask.into_iter().map(|n| (n, Msg::Info { round: 0, chunk })).collect();
        self.open_send(OpenStep::Infos(chunk), to, RPC_TIMEOUT_MS);
    }

    /// The highest copy that may win is installed on the live holders that lack it
    /// (`reconcile::settle`, `may_win`); then the holders that took no part are recorded.
    fn open_settle(&mut self, chunk: u64) {
        let Some(o) = self.client.opening.clone() else { return };
        let holders = self.client.map.holders(R, pg(chunk));
        if o.live.len() < Self::deciders(holders.len()) {
            self.open_failed(format!("chunk {chunk}: only {} of its holders take part", o.live.len()));
            return;
        }
        let infos: BTreeMap<u64, (u64, Vec<u64>)> = o
            .dirty
            .get(&chunk)
            .map(|d| d.iter().filter(|(n, _)| o.live.contains(n)).map(|(n, i)| (*n, i.clone())).collect())
            .unwrap_or_default();
        // A holder pulling its own copy back (it recorded itself as missing it) takes no part.
        let unsure: Vec<u64> = infos.iter().filter(|(n, i)| i.1.contains(n)).map(|(n, _)| *n).collect();
        if self.options.fresh_states && !unsure.is_empty() {
            if let Some(o) = self.client.opening.as_mut() {
                for n in &unsure {
                    o.live.remove(n);
                }
            }
            self.open_settle(chunk);
            return;
        }
        let missed: BTreeSet<u64> = infos.values().flat_map(|(_, m)| m.iter().copied()).collect();
        let may_win: BTreeSet<u64> = infos.keys().copied().filter(|n| !missed.contains(n)).collect();
        let as_version = |v: u64| Version { generation: generation_of(v), seq: v % GEN };
        let versions: BTreeMap<u64, Version> = infos.iter().map(|(n, (v, _))| (*n, as_version(*v))).collect();
        self.promised.insert(chunk);
        let line = format!("open reconciles chunk {chunk}: {infos:?}");
        self.log(line);
        let at = match settle(&versions, &may_win, None) {
            None => {
                let distinct: BTreeSet<u64> = infos.values().map(|(v, _)| *v).collect();
                if distinct.len() > 1 {
                    self.open_failed(format!("chunk {chunk}: copies differ, none may win: {distinct:?}"));
                    return;
                }
                distinct.into_iter().next().unwrap_or(0)
            }
            Some((winner, installs)) => {
                let v = infos.get(&winner).map_or(0, |i| i.0);
                if !installs.is_empty() && !matches!(o.step, OpenStep::Installs(c, w) if c == chunk && w == v)
                {
                    let generation = o.generation;
                    let to = installs
                        .iter()
                        .map(|i| {
                            let expect = i.expected.generation * GEN + i.expected.seq;
                            (
                                i.node,
                                Msg::Put { round: 0, chunk, version: v, expect, generation, source: None },
                            )
                        })
                        .collect();
                    self.open_send(OpenStep::Installs(chunk, v), to, RPC_TIMEOUT_MS);
                    return;
                }
                v
            }
        };
        self.open_record(chunk, at);
    }

    /// Holders that took no part in `chunk`'s reconciliation (and the nodes being filled:
    /// `Options::fill_members_settled`) are recorded on the live ones as having missed the chunk,
    /// settled at version `at`.
    fn open_record(&mut self, chunk: u64, at: u64) {
        let Some(o) = self.client.opening.clone() else { return };
        let holders = self.client.map.holders(R, pg(chunk));
        let mut outside: Vec<u64> = holders.iter().copied().filter(|n| !o.live.contains(n)).collect();
        if o.installed || self.options.fill_members_settled {
            outside.extend(self.client.map.backfill(R, pg(chunk)));
        }
        // (With none outside, the round still asks the live holders whether their copy is still
        // the settled one: `Options::refusers_recorded`.)
        if (outside.is_empty() && !self.options.refusers_recorded) || o.live.is_empty() {
            if let Some(o) = self.client.opening.as_mut() {
                o.dirty.remove(&chunk);
            }
            self.open_next_chunk();
            return;
        }
        let to = o
            .live
            .iter()
            .map(|n| {
                let settled = o.generation;
                (*n, Msg::RecordMissed { op: (OPEN_OP, 0), chunk, peers: outside.clone(), at, settled })
            })
            .collect();
        self.open_send(OpenStep::Records(chunk, at), to, RPC_TIMEOUT_MS + HOLDBACK_ALLOWANCE_MS);
    }

    fn suspect(&mut self, node: u64) {
        if self.client.suspects.contains_key(&node) {
            return;
        }
        self.client.suspects.insert(node, self.now);
        if let Some(l) = self.leader {
            self.send(self.client.ep, l, Msg::CatchUp { node });
        }
    }
}

/// Adds a line to the trace (its last lines are kept; `CAIRN_SIM_TRACE` prints every one).
fn push_trace(trace: &mut Vec<String>, print: bool, now: u64, line: String) {
    if trace.len() >= 400 {
        trace.drain(..200);
    }
    let line = format!("{now:>7} {line}");
    if print {
        eprintln!("{line}");
    }
    trace.push(line);
}

/// Runs one seed of the production model.
pub fn run_production_seed(seed: u64) -> Result<ProductionStats, String> {
    ProductionWorld::new(seed, Options::default()).run()
}

/// Runs one seed with some of production's rules left out (see [`Options`]).
pub fn run_production_seed_with(seed: u64, options: Options) -> Result<ProductionStats, String> {
    ProductionWorld::new(seed, options).run()
}
