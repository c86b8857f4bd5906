//! `node.toml`: the storage node's configuration file.
//!
//! ```toml
//! # Unique id of this node in its pool, 1 or more.
//! node_id = 1
//! # Directory holding this node's chunks and metadata (created if missing; one node per directory).
//! data_dir = "/var/lib/cairn/node-1"
//! # Address the node RPC listens on (host:port).
//! rpc_listen_addr = "127.0.0.1:7400"
//! # Optional: address of the admin HTTP API (default: the RPC port + 2).
//! http_listen_addr = "127.0.0.1:7402"
//! # Optional: address of the NBD server (default: the RPC port + 1).
//! nbd_listen_addr = "127.0.0.1:7401"
//! # Optional: most chunk files kept open (default 1024).
//! open_files_max = 1024
//! # Optional: most request bytes in flight per connection before the node stops reading it
//! # (default 64 MiB, at least 8 MiB).
//! in_flight_bytes_max = 67108864
//!
//! [meta]
//! # The voters of the metadata quorum (1, 3 or 5 nodes) when the pool is first formed. The voter
//! # with the lowest id forms the pool; the others wait for it. Ignored once the pool exists.
//! voters = [
//!   { id = 1, rpc = "127.0.0.1:7400", http = "127.0.0.1:7402", nbd = "127.0.0.1:7401" },
//! ]
//! # Or: RPC addresses of existing members, to join a running pool (as a metadata learner).
//! join = ["127.0.0.1:7400"]
//! # A node silent this long is marked down (default 5000, at least 1000).
//! down_after_ms = 5000
//!
//! [limits]
//! # Connections each listener (node RPC, NBD, admin HTTP) serves at once (default 1024); one
//! # beyond it is closed at once. The node raises its open-file limit to fit them.
//! connections_max = 1024
//! # Of those, most from one client address (default: connections_max, i.e. no per-client cap).
//! connections_per_client_max = 1024
//! # How long a new connection may take to finish its handshake: the RPC hello, the NBD option
//! # haggling, an HTTP request's head (also the most an HTTP connection may stay idle between
//! # requests) (default 10000, at least 100).
//! handshake_timeout_ms = 10000
//! # A node RPC connection whose peer does not take a reply for this long is closed (default
//! # 60000, at least 100).
//! reply_write_timeout_ms = 60000
//! # Of the node RPC's connections_max, how many only the pool's nodes may take (connections from
//! # the address of a node in the cluster map or in [meta]): clients holding connections cannot
//! # lock the pool's members out (default: a quarter of connections_max, at most 64; capped at
//! # half).
//! rpc_connections_reserved_for_members = 64
//! ```
//!
//! Without `voters` or `join` the node forms a one-node pool of its own. Unknown keys are errors, so
//! a typo is caught rather than silently ignored.

use cairn_types::NodeId;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default bound on request bytes in flight per connection: 16 maximal requests, enough to keep a
/// disk busy, small enough that 100 connections stay within a few GiB worst case.
pub const IN_FLIGHT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// Lower bound: two maximal frames, so one maximal request can always be admitted.
pub const IN_FLIGHT_BYTES_MIN: u64 = 8 * 1024 * 1024;
/// Default time after which a silent node is marked down.
pub const DOWN_AFTER_MS_DEFAULT: u64 = 5000;

/// A node's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub rpc_listen_addr: SocketAddr,
    #[serde(default)]
    pub http_listen_addr: Option<SocketAddr>,
    #[serde(default)]
    pub nbd_listen_addr: Option<SocketAddr>,
    #[serde(default = "default_open_files")]
    pub open_files_max: usize,
    #[serde(default = "default_in_flight")]
    pub in_flight_bytes_max: u64,
    #[serde(default)]
    pub meta: MetaSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub scrub: ScrubSection,
}

/// Default time between scheduled scrubs: a week (Ceph's deep-scrub interval).
pub const SCRUB_INTERVAL_S_DEFAULT: u64 = 7 * 24 * 3600;
/// Default most bytes a scrub reads per second.
pub const SCRUB_BYTES_PER_S_DEFAULT: u64 = 32 * 1024 * 1024;

/// The `[scrub]` section: the background check of every stored block (see `scrub.rs`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScrubSection {
    /// Seconds between scheduled runs; 0: on demand only.
    #[serde(default = "default_scrub_interval")]
    pub interval_s: u64,
    /// Most bytes read per second; 0: unthrottled.
    #[serde(default = "default_scrub_rate")]
    pub bytes_per_s: u64,
}

impl Default for ScrubSection {
    fn default() -> Self {
        ScrubSection { interval_s: SCRUB_INTERVAL_S_DEFAULT, bytes_per_s: SCRUB_BYTES_PER_S_DEFAULT }
    }
}

impl ScrubSection {
    pub fn settings(&self) -> crate::scrub::ScrubSettings {
        crate::scrub::ScrubSettings {
            interval: (self.interval_s > 0).then(|| std::time::Duration::from_secs(self.interval_s)),
            bytes_per_s: (self.bytes_per_s > 0).then_some(self.bytes_per_s),
        }
    }
}

fn default_scrub_interval() -> u64 {
    SCRUB_INTERVAL_S_DEFAULT
}

fn default_scrub_rate() -> u64 {
    SCRUB_BYTES_PER_S_DEFAULT
}

/// The `[limits]` section: bounds on connections.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    #[serde(default = "default_connections_max")]
    pub connections_max: usize,
    /// Default (`None`): `connections_max`.
    #[serde(default)]
    pub connections_per_client_max: Option<usize>,
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_ms: u64,
    #[serde(default = "default_reply_write_timeout")]
    pub reply_write_timeout_ms: u64,
    /// Default (`None`): a quarter of `connections_max`, at most 64.
    #[serde(default)]
    pub rpc_connections_reserved_for_members: Option<usize>,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            connections_max: default_connections_max(),
            connections_per_client_max: None,
            handshake_timeout_ms: default_handshake_timeout(),
            reply_write_timeout_ms: default_reply_write_timeout(),
            rpc_connections_reserved_for_members: None,
        }
    }
}

impl LimitsSection {
    /// Most connections one client address may hold on one listener.
    pub fn per_client_max(&self) -> usize {
        self.connections_per_client_max.unwrap_or(self.connections_max)
    }

    /// The admission counter of one listener.
    pub fn limiter(&self) -> cairn_types::admission::ConnectionLimiter {
        cairn_types::admission::ConnectionLimiter::new(self.connections_max, self.per_client_max())
    }

    /// The node RPC's admission counter: its last slots are kept for the pool's nodes.
    pub fn rpc_limiter(&self) -> cairn_types::admission::ConnectionLimiter {
        cairn_types::admission::ConnectionLimiter::with_reserve(
            self.connections_max,
            self.per_client_max(),
            self.rpc_reserved(),
        )
    }

    /// Node RPC connections kept for the pool's nodes.
    pub fn rpc_reserved(&self) -> usize {
        self.rpc_connections_reserved_for_members.unwrap_or((self.connections_max / 4).min(64))
    }

    pub fn handshake_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.handshake_timeout_ms)
    }
}

fn default_connections_max() -> usize {
    1024
}

fn default_handshake_timeout() -> u64 {
    10_000
}

fn default_reply_write_timeout() -> u64 {
    60_000
}

/// The `[meta]` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetaSection {
    #[serde(default)]
    pub voters: Vec<Member>,
    #[serde(default)]
    pub join: Vec<SocketAddr>,
    #[serde(default = "default_down_after")]
    pub down_after_ms: u64,
}

impl Default for MetaSection {
    fn default() -> Self {
        MetaSection { voters: Vec::new(), join: Vec::new(), down_after_ms: DOWN_AFTER_MS_DEFAULT }
    }
}

/// A member of the pool: its id and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: u64,
    pub rpc: SocketAddr,
    pub http: SocketAddr,
    pub nbd: SocketAddr,
}

fn default_down_after() -> u64 {
    DOWN_AFTER_MS_DEFAULT
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
    #[error("{path}: cannot read: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// `addr` with its port raised by `by`; ports past 65535 are refused when the file is loaded.
fn offset(addr: SocketAddr, by: u16) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port().saturating_add(by))
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl NodeConfig {
    /// Reads and validates a configuration file. Relative `data_dir`s are relative to the file.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), cause: source })?;
        let invalid = |message: String| ConfigError::Invalid { path: path.to_path_buf(), message };
        let mut config: NodeConfig = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
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
            return Err(invalid(format!("in_flight_bytes_max must be at least {IN_FLIGHT_BYTES_MIN}")));
        }
        for (derived, by, given) in
            [("http_listen_addr", 2, config.http_listen_addr), ("nbd_listen_addr", 1, config.nbd_listen_addr)]
        {
            if given.is_none() && config.rpc_listen_addr.port().checked_add(by).is_none() {
                return Err(invalid(format!(
                    "rpc_listen_addr port {} leaves no room for the default {derived} (RPC port + {by}); \
                     give {derived} or a lower RPC port",
                    config.rpc_listen_addr.port()
                )));
            }
        }
        if config.limits.connections_max == 0 || config.limits.connections_per_client_max == Some(0) {
            return Err(invalid(
                "limits.connections_max and connections_per_client_max must be at least 1".into(),
            ));
        }
        if config.limits.reply_write_timeout_ms < 100 {
            return Err(invalid("limits.reply_write_timeout_ms must be at least 100".into()));
        }
        if config.limits.handshake_timeout_ms < 100 {
            return Err(invalid("limits.handshake_timeout_ms must be at least 100".into()));
        }
        if config.meta.down_after_ms < 1000 {
            return Err(invalid("meta.down_after_ms must be at least 1000".into()));
        }
        let voters = config.meta.voters.len();
        if voters > 0 && !matches!(voters, 1 | 3 | 5) {
            return Err(invalid(format!(
                "meta.voters lists {voters} nodes; a metadata quorum has 1, 3 or 5 voters"
            )));
        }
        if config.data_dir.is_relative()
            && let Some(parent) = path.parent()
        {
            config.data_dir = parent.join(&config.data_dir);
        }
        Ok(config)
    }

    /// The admin HTTP API's address (default: RPC port + 2).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listen_addr.unwrap_or_else(|| offset(self.rpc_listen_addr, 2))
    }

    /// The NBD server's address (default: RPC port + 1).
    pub fn nbd_addr(&self) -> SocketAddr {
        self.nbd_listen_addr.unwrap_or_else(|| offset(self.rpc_listen_addr, 1))
    }

    /// This node as a pool member.
    pub fn member(&self) -> Member {
        Member {
            id: self.node_id.get(),
            rpc: self.rpc_listen_addr,
            http: self.http_addr(),
            nbd: self.nbd_addr(),
        }
    }

    /// The file's text for a node with these settings (used by `cairn up`).
    pub fn to_toml(&self) -> String {
        let voters: Vec<String> = self
            .meta
            .voters
            .iter()
            .map(|m| {
                format!(
                    "  {{ id = {}, rpc = \"{}\", http = \"{}\", nbd = \"{}\" }},\n",
                    m.id, m.rpc, m.http, m.nbd
                )
            })
            .collect();
        let join: Vec<String> = self.meta.join.iter().map(|a| format!("\"{a}\"")).collect();
        format!(
            "# Cairn storage node configuration (documented in crates/cairn-node/src/config.rs).\n\
             # Unique id of this node in its pool, 1 or more.\n\
             node_id = {}\n\
             # Directory holding this node's chunks and metadata (created if missing).\n\
             data_dir = {}\n\
             # Addresses of the node RPC, the admin HTTP API and the NBD server.\n\
             rpc_listen_addr = \"{}\"\n\
             http_listen_addr = \"{}\"\n\
             nbd_listen_addr = \"{}\"\n\
             \n\
             [meta]\n\
             # Voters of the metadata quorum when the pool is first formed.\n\
             voters = [\n{}]\n\
             # RPC addresses of members to join (nodes added to a running pool).\n\
             join = [{}]\n\
             # A node silent this long is marked down.\n\
             down_after_ms = {}\n\
             \n\
             [limits]\n\
             # Connections each listener serves at once; how long a handshake may take.\n\
             connections_max = {}\n\
             connections_per_client_max = {}\n\
             handshake_timeout_ms = {}\n\
             reply_write_timeout_ms = {}\n\
             # Node RPC connections only the pool's nodes may take.\n\
             rpc_connections_reserved_for_members = {}\n\
             \n\
             [scrub]\n\
             # Seconds between checks of every stored block against its checksum (0: on demand\n\
             # only, `cairn scrub`), and the most bytes such a check reads per second (0: no limit).\n\
             interval_s = {}\n\
             bytes_per_s = {}\n",
            self.node_id,
            quote(&self.data_dir.display().to_string()),
            self.rpc_listen_addr,
            self.http_addr(),
            self.nbd_addr(),
            voters.concat(),
            join.join(", "),
            self.meta.down_after_ms,
            self.limits.connections_max,
            self.limits.per_client_max(),
            self.limits.handshake_timeout_ms,
            self.limits.reply_write_timeout_ms,
            self.limits.rpc_reserved(),
            self.scrub.interval_s,
            self.scrub.bytes_per_s,
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
        let c = load("node_id = 3\ndata_dir = \"/tmp/x\"\nrpc_listen_addr = \"127.0.0.1:100\"\n").unwrap();
        assert_eq!(c.node_id.get(), 3);
        assert_eq!(c.open_files_max, 1024);
        assert_eq!(c.in_flight_bytes_max, IN_FLIGHT_BYTES_DEFAULT);
        assert_eq!(c.http_addr().port(), 102);
        assert_eq!(c.nbd_addr().port(), 101);
        assert!(c.meta.voters.is_empty());
        assert_eq!(c.meta.down_after_ms, 5000);
    }

    #[test]
    fn errors_are_one_line_and_name_the_problem() {
        let base = "node_id = 1\ndata_dir = \"/x\"\nrpc_listen_addr = \"127.0.0.1:1\"\n";
        for (text, needle) in [
            (
                "node_id = 0\ndata_dir = \"/x\"\nrpc_listen_addr = \"127.0.0.1:1\"\n".to_string(),
                "node id must not be zero",
            ),
            ("node_id = 1\ndata_dir = \"/x\"\n".to_string(), "rpc_listen_addr"),
            ("node_id = 1\ndata_dir = \"/x\"\nrpc_listen_addr = \"nowhere\"\n".to_string(), "line 3"),
            (format!("{base}colour = 1\n"), "colour"),
            (format!("{base}in_flight_bytes_max = 5\n"), "at least"),
            (format!("{base}[meta]\ndown_after_ms = 10\n"), "down_after_ms"),
            (format!("{base}[limits]\nconnections_max = 0\n"), "connections_max"),
            (
                "node_id = 1\ndata_dir = \"/x\"\nrpc_listen_addr = \"127.0.0.1:65535\"\n".to_string(),
                "no room",
            ),
            (
                format!(
                    "{base}[meta]\nvoters = [{{ id = 1, rpc = \"127.0.0.1:1\", http = \"127.0.0.1:2\", nbd = \"127.0.0.1:3\" }}, {{ id = 2, rpc = \"127.0.0.1:1\", http = \"127.0.0.1:2\", nbd = \"127.0.0.1:3\" }}]\n"
                ),
                "1, 3 or 5",
            ),
            ("node_id = [".to_string(), "line 1"),
        ] {
            let e = load(&text).unwrap_err().to_string();
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
            http_listen_addr: None,
            nbd_listen_addr: None,
            open_files_max: 1024,
            in_flight_bytes_max: IN_FLIGHT_BYTES_DEFAULT,
            meta: MetaSection {
                voters: vec![Member {
                    id: 2,
                    rpc: "127.0.0.1:5".parse().unwrap(),
                    http: "127.0.0.1:7".parse().unwrap(),
                    nbd: "127.0.0.1:6".parse().unwrap(),
                }],
                join: vec!["127.0.0.1:9".parse().unwrap()],
                down_after_ms: 3000,
            },
            limits: LimitsSection {
                connections_max: 7,
                connections_per_client_max: Some(3),
                handshake_timeout_ms: 500,
                reply_write_timeout_ms: 700,
                rpc_connections_reserved_for_members: Some(2),
            },
            scrub: ScrubSection { interval_s: 0, bytes_per_s: 1234 },
        };
        let path = dir.path().join("node.toml");
        std::fs::write(&path, c.to_toml()).unwrap();
        let back = NodeConfig::load(&path).unwrap();
        assert_eq!(back.data_dir, c.data_dir);
        assert_eq!(back.rpc_listen_addr, c.rpc_listen_addr);
        assert_eq!(back.http_addr().port(), 7);
        assert_eq!(back.meta.voters, c.meta.voters);
        assert_eq!(back.meta.join, c.meta.join);
        assert_eq!(back.meta.down_after_ms, 3000);
        assert_eq!(back.limits, c.limits);
        assert_eq!(back.scrub, c.scrub);
    }
}
