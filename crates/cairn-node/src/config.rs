//! `node.toml`: the storage node's configuration file.
//!
//! ```toml
//! # Unique id of this node in its pool, 1 or more.
//! node_id = 1
//! # Directory holding this node's chunks (created if missing; one node per directory).
//! data_dir = "/var/lib/cairn/node-1"
//! # Address the node RPC listens on (host:port).
//! rpc_listen_addr = "127.0.0.1:7401"
//! # Optional: most chunk files kept open (default 1024).
//! open_files_max = 1024
//! # Optional: most request bytes in flight per connection before the node stops reading it
//! # (default 64 MiB, at least 8 MiB).
//! in_flight_bytes_max = 67108864
//! ```
//!
//! Unknown keys are errors, so a typo is caught rather than silently ignored.

use cairn_types::NodeId;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default bound on request bytes in flight per connection: 16 maximal requests, enough to keep a
/// disk busy, small enough that 100 connections stay within a few GiB worst case.
pub const IN_FLIGHT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// Lower bound: two maximal frames, so one maximal request can always be admitted.
pub const IN_FLIGHT_BYTES_MIN: u64 = 8 * 1024 * 1024;

/// A node's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub rpc_listen_addr: SocketAddr,
    #[serde(default = "default_open_files")]
    pub open_files_max: usize,
    #[serde(default = "default_in_flight")]
    pub in_flight_bytes_max: u64,
}

fn default_open_files() -> usize {
    1024
}

fn default_in_flight() -> u64 {
    IN_FLIGHT_BYTES_DEFAULT
}

/// Why a configuration file was refused; the message is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl NodeConfig {
    /// Reads and validates a configuration file. Relative `data_dir`s are relative to the file.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut config: NodeConfig = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            let message = e.message().replace('\n', " ");
            invalid(match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            })
        })?;
        if config.open_files_max == 0 {
            return Err(invalid("open_files_max must be at least 1".into()));
        }
        if config.in_flight_bytes_max < IN_FLIGHT_BYTES_MIN {
            return Err(invalid(format!(
                "in_flight_bytes_max must be at least {IN_FLIGHT_BYTES_MIN}"
            )));
        }
        if config.data_dir.is_relative()
            && let Some(parent) = path.parent()
        {
            config.data_dir = parent.join(&config.data_dir);
        }
        Ok(config)
    }

    /// The file's text for a node with these settings (used by `cairn up`).
    pub fn to_toml(&self) -> String {
        format!(
            "# Cairn storage node configuration.\n\
             # Unique id of this node in its pool, 1 or more.\n\
             node_id = {}\n\
             # Directory holding this node's chunks (created if missing).\n\
             data_dir = \"{}\"\n\
             # Address the node RPC listens on.\n\
             rpc_listen_addr = \"{}\"\n",
            self.node_id,
            self.data_dir
                .display()
                .to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\""),
            self.rpc_listen_addr
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<NodeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        NodeConfig::load(&path)
    }

    #[test]
    fn minimal_config() {
        let c = load("node_id = 3\ndata_dir = \"/tmp/x\"\nrpc_listen_addr = \"127.0.0.1:1\"\n").unwrap();
        assert_eq!(c.node_id.get(), 3);
        assert_eq!(c.open_files_max, 1024);
        assert_eq!(c.in_flight_bytes_max, IN_FLIGHT_BYTES_DEFAULT);
    }

    #[test]
    fn errors_are_one_line_and_name_the_problem() {
        for (text, needle) in [
            (
                "node_id = 0\ndata_dir = \"/x\"\nrpc_listen_addr = \"127.0.0.1:1\"\n",
                "node id must not be zero",
            ),
            ("node_id = 1\ndata_dir = \"/x\"\n", "rpc_listen_addr"),
            (
                "node_id = 1\ndata_dir = \"/x\"\nrpc_listen_addr = \"nowhere\"\n",
                "line 3",
            ),
            (
                "node_id = 1\ndata_dir = \"/x\"\nrpc_listen_addr = \"127.0.0.1:1\"\ncolour = 1\n",
                "colour",
            ),
            (
                "node_id = 1\ndata_dir = \"/x\"\nrpc_listen_addr = \"127.0.0.1:1\"\nin_flight_bytes_max = 5\n",
                "at least",
            ),
            ("node_id = [", "line 1"),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
            assert!(!e.contains('\n'), "{e:?} is not one line");
        }
    }

    #[test]
    fn round_trips_through_to_toml() {
        let dir = tempfile::tempdir().unwrap();
        let c = NodeConfig {
            node_id: NodeId::new(2).unwrap(),
            data_dir: dir.path().join("d \"q\""),
            rpc_listen_addr: "127.0.0.1:5".parse().unwrap(),
            open_files_max: 1024,
            in_flight_bytes_max: IN_FLIGHT_BYTES_DEFAULT,
        };
        let path = dir.path().join("node.toml");
        std::fs::write(&path, c.to_toml()).unwrap();
        let back = NodeConfig::load(&path).unwrap();
        assert_eq!(back.data_dir, c.data_dir);
        assert_eq!(back.rpc_listen_addr, c.rpc_listen_addr);
    }
}
