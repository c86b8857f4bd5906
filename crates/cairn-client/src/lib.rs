//! The volume client: the data path's engine, used by the NBD server on every storage node and by
//! `cairn gateway` on hypervisor hosts.
//!
//! * [`NodeConnection`] — one pipelined node-RPC connection.
//! * [`MetaClient`] — the pool's admin API as the data path needs it (map, generations).
//! * [`piece::read_piece`] — a range of a chunk read as a copy (reconciliation, catch-up, verify).
//! * [`VolumeClient`] — byte-range IO on a volume: routing, replication, ordering, fencing, retries.

mod connection;
pub mod meta_client;
pub mod piece;
mod versions;
pub mod volume;

pub use connection::{ConnectionError, ConnectionPool, NodeConnection, REQUESTS_IN_FLIGHT_MAX};
pub use meta_client::{MetaClient, MetaClientError, VolumeInfo};
pub use volume::{ClientConfig, IoError, LocalNode, VolumeClient};
