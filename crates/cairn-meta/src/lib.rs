//! Cluster metadata, replicated with Raft (openraft), persisted in redb.
//!
//! The state ([`state::ClusterState`]) is a deterministic state machine: every change is a
//! [`state::Command`] committed through the Raft log and applied in log order on every member, and
//! every change that alters the cluster map bumps the epoch. Time enters commands from the proposer
//! (the leader's clock), never from the applier, so every member computes the same state.
//!
//! Layers:
//! * `state` — the state machine (nodes, placement-group table, volumes, generations, events);
//! * `authority` — per-PG authoritative members (active, joining, backfill) and intervals;
//! * `catchup` — the leader's catch-up decisions and the read-lease rules, apart from I/O;
//! * `pgcheck` — what a node's map says of a mutation's `missed_by` (stale map, fills);
//! * `placement` — the weighted rendezvous-hash balancer that computes the PG table;
//! * `storage` — openraft's log and state-machine storage on redb;
//! * `network` — openraft's network over any [`network::PeerTransport`];
//! * `service` — [`service::MetaService`], the small API the rest of Cairn uses, plus liveness.

pub mod authority;
pub mod catchup;
pub mod network;
pub mod pgcheck;
pub mod placement;
pub mod service;
pub mod state;
pub mod storage;

pub use service::{MetaConfig, MetaError, MetaService, MetadataStore};
pub use state::{ClusterState, Command, CommandResult, Event, NodeAddr, NodeInfo, StateError, Volume};

openraft::declare_raft_types!(
    /// openraft's type configuration for Cairn's metadata group.
    pub TypeConfig:
        D = state::Command,
        R = state::CommandResult,
        NodeId = u64,
        Node = state::NodeAddr,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// A Raft instance of the metadata group.
pub type Raft = openraft::Raft<TypeConfig>;
