//! The volume client. This first piece is [`NodeConnection`]: one pipelined connection to a storage
//! node. The routing, replication, ordering and fencing engine builds on it.

mod connection;

pub use connection::{ConnectionError, NodeConnection, REQUESTS_IN_FLIGHT_MAX};
