//! The storage node daemon's library: configuration, the node RPC server, the metadata service's
//! transport, the admin HTTP API, and the mapping of store errors onto wire errors. The `cairn` binary (cairn-cli) wires it to signals and the command line.

pub mod config;
mod errors;
pub mod http;
pub mod missed;
pub mod node;
mod recovery;
pub mod scrub;
pub mod server;
pub mod transport;

pub use config::{ConfigError, NodeConfig};
pub use node::Node;
pub use server::{NodeError, RunningNode};
