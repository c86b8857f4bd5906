//! The storage node daemon's library: configuration, the node RPC server, and the mapping of store
//! errors onto wire errors. The `cairn` binary (cairn-cli) wires it to signals and the command line.

pub mod config;
mod errors;
pub mod server;

pub use config::{ConfigError, NodeConfig};
pub use server::{NodeError, RunningNode};
