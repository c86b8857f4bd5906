//! The recovery worker: copies to catching-up peers the chunks they missed (see `missed`).
//!
//! Every round (300 ms) it takes, for each peer with pending chunks that the cluster map shows up
//! and catching up, a batch of chunks and copies each whole chunk (present blocks with their
//! checksums; holes stay holes) with `InstallRange`. A catching-up node receives no client writes, so
//! a copy never races a client write on the target; a write made here meanwhile re-records the chunk,
//! and the copy is repeated. The leader ends the peer's catch-up once no node reports pending chunks
//! for it.

use crate::missed::MissedLog;
use crate::transport::RpcPeerTransport;
use bytes::Bytes;
use cairn_client::{ConnectionPool, NodeConnection};
use cairn_meta::MetaService;
use cairn_proto::{Request, Response};
use cairn_store::Store;
use cairn_types::limits::RPC_IO_MAX_BYTES;
use cairn_types::{BLOCK_SIZE_BYTES, ChunkIndex, ChunkSize, VolumeId};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Chunks copied per peer per round.
const BATCH_CHUNKS: usize = 32;
/// Pause between rounds.
const ROUND_INTERVAL: Duration = Duration::from_millis(300);
/// Longest a single range copy may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(20);

pub async fn run(
    store: Arc<Store>,
    missed: Arc<MissedLog>,
    meta: Arc<MetaService<RpcPeerTransport>>,
    stop: CancellationToken,
) {
    let connections = ConnectionPool::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(ROUND_INTERVAL) => {}
        }
        for peer in missed.pending_peers() {
            let Some(node) = meta.read(|s| s.nodes.get(&peer).cloned()) else { continue };
            if !node.up || !node.catching_up {
                continue;
            }
            let Ok(addr) = node.addr.rpc.parse::<SocketAddr>() else { continue };
            let conn = match connections.get(addr).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(peer, "catch-up: {e}");
                    continue;
                }
            };
            let batch = missed.batch(peer, BATCH_CHUNKS);
            let mut copied = 0;
            for (volume, chunk, chunk_size, seq) in batch {
                match copy_chunk(&store, &conn, volume, chunk, chunk_size).await {
                    Ok(()) => {
                        copied += 1;
                        if let Err(e) = missed.done(peer, volume, chunk, seq) {
                            tracing::error!("missed-writes log: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(peer, volume, chunk, "catch-up copy failed: {e}");
                        connections.forget(&conn).await;
                        break;
                    }
                }
            }
            if copied > 0 {
                tracing::info!(peer, copied, remaining = missed.pending(peer), "catch-up: copied chunks");
            }
        }
    }
}

async fn copy_chunk(
    store: &Arc<Store>,
    conn: &NodeConnection,
    volume: u64,
    chunk: u64,
    size: u32,
) -> Result<(), String> {
    let volume = VolumeId::new(volume).map_err(|e| e.to_string())?;
    let chunk = ChunkIndex(chunk);
    let chunk_size = ChunkSize::new(size).map_err(|e| e.to_string())?;
    let s = store.clone();
    let (present, reply) = tokio::task::spawn_blocking(move || {
        let present = s.allocation(volume, chunk, chunk_size, 0, chunk_size.bytes())?;
        let reply = s.read(volume, chunk, chunk_size, 0, chunk_size.bytes())?;
        Ok::<_, cairn_store::StoreError>((present, reply))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let range_blocks = (RPC_IO_MAX_BYTES / BLOCK_SIZE_BYTES) as usize;
    let bs = BLOCK_SIZE_BYTES as usize;
    for (i, flags) in present.chunks(range_blocks).enumerate() {
        let first = i * range_blocks;
        let mut data = Vec::new();
        let mut crcs = Vec::new();
        for (j, p) in flags.iter().enumerate() {
            if *p {
                let b = first + j;
                data.extend_from_slice(&reply.data[b * bs..(b + 1) * bs]);
                crcs.push(reply.crcs[b]);
            }
        }
        let request = Request::InstallRange {
            volume,
            chunk,
            chunk_size,
            offset: (first * bs) as u32,
            present: flags.to_vec(),
            crcs,
            data: Bytes::from(data),
        };
        match tokio::time::timeout(COPY_TIMEOUT, conn.call(&request)).await {
            Ok(Ok(Response::Done)) => {}
            Ok(Ok(Response::Error(e))) => return Err(e.to_string()),
            Ok(Ok(other)) => return Err(format!("unexpected reply {other:?}")),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        }
    }
    Ok(())
}
