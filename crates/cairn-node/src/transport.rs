//! Metadata peer messages over the node RPC: one pooled, pipelined connection per peer.

use bytes::Bytes;
use cairn_client::ConnectionPool;
use cairn_meta::NodeAddr;
use cairn_meta::network::{PeerReply, PeerRequest, PeerTransport};
use cairn_proto::{Request, Response};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// Carries [`PeerRequest`]s as `Request::Peer` frames.
#[derive(Debug, Clone, Default)]
pub struct RpcPeerTransport {
    connections: ConnectionPool,
}

impl RpcPeerTransport {
    async fn exchange(&self, addr: SocketAddr, body: Bytes, timeout: Duration) -> Result<PeerReply, String> {
        match self.connections.call_within(addr, &Request::Peer { body }, timeout).await {
            Ok(Response::Peer { body }) => cairn_meta::network::decode(&body),
            Ok(Response::Error(e)) => Err(e.to_string()),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl PeerTransport for RpcPeerTransport {
    fn call(
        &self,
        addr: &NodeAddr,
        request: PeerRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<PeerReply, String>> + Send {
        let this = self.clone();
        let rpc = addr.rpc.clone();
        async move {
            let addr: SocketAddr = rpc.parse().map_err(|e| format!("bad peer address {rpc:?}: {e}"))?;
            let body = Bytes::from(cairn_meta::network::encode(&request)?);
            this.exchange(addr, body, timeout).await
        }
    }
}
