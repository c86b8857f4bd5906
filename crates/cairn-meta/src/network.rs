//! Messages between metadata peers, and openraft's network on top of any [`PeerTransport`].
//!
//! Storage nodes carry these messages over the node RPC (cairn-node); the simulation test carries
//! them over turmoil's simulated network. Bodies are JSON.

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

/// Largest piece of a snapshot sent in one `InstallSnapshot` message: 768 KiB. Peer messages are
/// JSON, which writes each snapshot byte as a decimal number and a comma (up to 4 characters), so a
/// piece becomes at most 3 MiB of JSON, inside the node RPC's 4 MiB frame body with room for the
/// envelope. (openraft's default, 3 MiB, made a snapshot of a pool with ~10 000 volumes too large
/// for one frame: the leader could never bring a lagging node up to date.)
pub const SNAPSHOT_CHUNK_MAX_BYTES: u64 = 768 * 1024;

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

    /// The largest snapshot piece, in the worst case for JSON (every byte 255), fits in one node
    /// RPC frame: a lagging node can always be brought up to date, whatever the state's size.
    #[test]
    fn the_largest_snapshot_piece_fits_in_one_frame() {
        let request = PeerRequest::InstallSnapshot(InstallSnapshotRequest {
            vote: openraft::Vote::new_committed(u64::MAX, u64::MAX),
            meta: openraft::SnapshotMeta::default(),
            offset: u64::MAX,
            data: vec![255; SNAPSHOT_CHUNK_MAX_BYTES as usize],
            done: false,
        });
        let body = serde_json::to_vec(&request).unwrap();
        assert!(
            body.len() <= cairn_proto::frame::FRAME_BODY_MAX_BYTES as usize,
            "{} bytes of JSON for a {} byte piece",
            body.len(),
            SNAPSHOT_CHUNK_MAX_BYTES
        );
    }
}
