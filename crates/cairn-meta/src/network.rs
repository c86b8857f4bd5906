//! Messages between metadata peers, and openraft's network on top of any [`PeerTransport`].
//!
//! Storage nodes carry these messages over the node RPC (cairn-node); the simulation test carries
//! them over turmoil's simulated network. Bodies are postcard (binary): a snapshot's bytes travel
//! as they are.

use crate::TypeConfig;
use crate::state::NodeAddr;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, RaftNetwork, RaftNetworkFactory};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;

/// Largest piece of a snapshot sent in one `InstallSnapshot` message: 3 MiB, inside the node
/// RPC's 4 MiB frame body with room for the envelope (peer messages are binary, so a piece costs
/// its own size). Whatever the state's size, a lagging node is brought up to date piece by piece.
/// (When peer messages were JSON, each byte a decimal number, a snapshot of ~10 000 volumes made
/// one message too large for a frame and the leader could never catch such a node up.)
pub const SNAPSHOT_CHUNK_MAX_BYTES: u64 = 3 * 1024 * 1024;

/// Encodes a peer message (request or reply) for the wire.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(message).map_err(|e| format!("cannot encode a peer message: {e}"))
}

/// Decodes a peer message; malformed input is an error, never a panic.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    postcard::from_bytes(body).map_err(|e| format!("malformed peer message: {e}"))
}

/// A node's periodic report to the leader: it is alive, and how full it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub id: u64,
    /// Changes every time the node's process starts.
    pub boot_id: u64,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// Peers this node holds writes for that they missed (it will copy them over).
    pub missed_for: Vec<u64>,
    /// Peers this node holds only seeds' entries for: chunks to copy to a node being filled, which
    /// count for its admission and for nothing once it is admitted.
    pub seeded_for: Vec<u64>,
    /// The epoch of the cluster map this node has applied (at least; read before the rest).
    pub epoch: u64,
    /// Whether the node serves client IO (see `MetaService::serves_clients`).
    pub serving: bool,
    /// The map epoch as of which the node has seeded every backfill member of the PGs it holds
    /// (see `cairn_node::recovery::Seeding`).
    pub seeded_epoch: u64,
}

/// A request from one metadata peer to another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Liveness and usage, sent to the leader every heartbeat interval.
    Heartbeat(NodeReport),
    /// A new node asks the leader to add it to the pool (as a learner of the metadata group).
    Join {
        id: u64,
        addr: NodeAddr,
    },
    /// The leader asks a node for its report (the other direction of `Heartbeat`): a node is
    /// alive if either reaches the other, so a one-way partition does not make the leader declare
    /// nodes it can reach down.
    Probe,
    /// Node `id`, in sync since the map of `in_sync_epoch`, asks a PG peer for a read lease (see
    /// `MetaService::serves_reads`).
    Lease {
        id: u64,
        in_sync_epoch: u64,
    },
}

/// Why a request meant for the leader was not handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PeerError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeAddr> },
    #[error("{0}")]
    Failed(String),
}

/// The answer to a [`PeerRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerReply {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Heartbeat(Result<(), PeerError>),
    Join(Result<(), PeerError>),
    Probe(NodeReport),
    /// Whether the lease is granted.
    Lease(bool),
}

/// Carries peer requests to the node at `addr`. Errors are transport failures (unreachable,
/// timeout), described for humans.
pub trait PeerTransport: Clone + Send + Sync + 'static {
    fn call(
        &self,
        addr: &NodeAddr,
        request: PeerRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<PeerReply, String>> + Send;
}

/// openraft's network factory over a [`PeerTransport`].
#[derive(Debug, Clone)]
pub struct Network<T> {
    pub transport: T,
}

/// openraft's connection to one peer.
#[derive(Debug)]
pub struct PeerClient<T> {
    target: u64,
    addr: NodeAddr,
    transport: T,
}

impl<T: PeerTransport> RaftNetworkFactory<TypeConfig> for Network<T> {
    type Network = PeerClient<T>;

    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> PeerClient<T> {
        PeerClient { target, addr: node.clone(), transport: self.transport.clone() }
    }
}

fn unexpected<E: std::error::Error>() -> RPCError<u64, NodeAddr, E> {
    RPCError::Network(NetworkError::new(&AnyError::error("peer sent an unexpected reply")))
}

fn unreachable<E: std::error::Error>(e: String) -> RPCError<u64, NodeAddr, E> {
    RPCError::Unreachable(Unreachable::new(&AnyError::error(e)))
}

impl<T: PeerTransport> RaftNetwork<TypeConfig> for PeerClient<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        match self.transport.call(&self.addr, PeerRequest::AppendEntries(rpc), option.hard_ttl()).await {
            Ok(PeerReply::AppendEntries(Ok(r))) => Ok(r),
            Ok(PeerReply::AppendEntries(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(unexpected()),
            Err(e) => Err(unreachable(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64, InstallSnapshotError>>>
    {
        match self.transport.call(&self.addr, PeerRequest::InstallSnapshot(rpc), option.hard_ttl()).await {
            Ok(PeerReply::InstallSnapshot(Ok(r))) => Ok(r),
            Ok(PeerReply::InstallSnapshot(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(unexpected()),
            Err(e) => Err(unreachable(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        match self.transport.call(&self.addr, PeerRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(PeerReply::Vote(Ok(r))) => Ok(r),
            Ok(PeerReply::Vote(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(_) => Err(unexpected()),
            Err(e) => Err(unreachable(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commands travel postcard-encoded inside Raft's append-entries messages: every field must
    /// be written whatever its value (postcard cannot skip one — a `skip_serializing_if` on a
    /// command's field once wedged replication to every follower).
    #[test]
    fn commands_round_trip_through_peer_encoding() {
        use crate::state::Command;
        let commands = [
            Command::SetCatchingUp { id: 3, catching_up: true, time_ms: 1, filled: None },
            Command::SetCatchingUp { id: 3, catching_up: false, time_ms: 2, filled: Some(vec![(3, 7)]) },
            Command::SetCatchingUp { id: 3, catching_up: false, time_ms: 3, filled: Some(Vec::new()) },
            Command::NodeBooted { id: 2, boot_id: 9, time_ms: 4 },
        ];
        for command in commands {
            let decoded: Command = decode(&encode(&command).unwrap()).unwrap();
            assert_eq!(decoded, command);
        }
    }

    /// The largest snapshot piece fits in one node RPC frame: a lagging node can always be brought
    /// up to date, whatever the state's size.
    #[test]
    fn the_largest_snapshot_piece_fits_in_one_frame() {
        let request = PeerRequest::InstallSnapshot(InstallSnapshotRequest {
            vote: openraft::Vote::new_committed(u64::MAX, u64::MAX),
            meta: openraft::SnapshotMeta::default(),
            offset: u64::MAX,
            data: vec![255; SNAPSHOT_CHUNK_MAX_BYTES as usize],
            done: false,
        });
        let body = encode(&request).unwrap();
        assert!(
            body.len() <= cairn_proto::frame::FRAME_BODY_MAX_BYTES as usize,
            "{} bytes for a {} byte piece",
            body.len(),
            SNAPSHOT_CHUNK_MAX_BYTES
        );
    }
}
