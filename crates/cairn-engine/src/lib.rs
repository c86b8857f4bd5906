//! Replication decisions, apart from I/O (Crucible's shape: replies in, next actions out).
//!
//! The async shells (the storage node's RPC handler, the volume client) and the deterministic
//! simulation (`cairn-sim`) drive the same functions here, so what the simulation proves about
//! them holds for the code that runs.
//!
//! * [`version`] — chunk versions `(generation, seq)` and what a mutation expects;
//! * [`replica`] — a storage node's verdict on a mutation or read of one PG;
//! * [`write`] — the client's write round over a PG's members: when a write is acknowledged, when
//!   a member must be degraded, when the map must be refreshed;
//! * [`reconcile`] — which copy wins when counted members differ, and what a recovering member
//!   must pull.

pub mod reconcile;
pub mod replica;
pub mod version;
pub mod write;

pub use version::{Expected, Version};
