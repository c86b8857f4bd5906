//! `cairn volume verify NAME`: proves that every replica of every chunk of a volume holds the same
//! bytes (invariant I5, replicas converge), by comparing what each holder of the chunk's PG stores:
//! the chunk's version, which blocks hold data and the CRC-32C of each (the node verifies every
//! block against its stored checksum while reading, so a corrupt block shows up as an error, not as
//! a match). Equal bytes at different versions differ too: the next mutation expecting one version
//! would be refused by the other copy.
//!
//! It reads the whole volume from every holder (chunks no holder has are skipped), one chunk at a
//! time: a scrub run by hand, for operators and for tests after failures. A holder that does not
//! serve (catching up, down) is reported as not compared; the command then fails too, since it
//! could not prove convergence.

use crate::api::Api;
use anyhow::{Context, anyhow, bail};
use cairn_client::NodeConnection;
use cairn_client::piece::read_piece;
use cairn_proto::{Request, Response};
use cairn_types::limits::RPC_IO_MAX_BYTES;
use cairn_types::placement::pg_of;
use cairn_types::{ChunkIndex, ChunkSize, Version, VolumeId};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// Longest one request to one node may take before that node counts as not answering.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Serialize)]
struct Difference {
    chunk: u64,
    pg: u32,
    /// Per node: blocks holding data and a digest of their checksums.
    copies: BTreeMap<u64, String>,
}

#[derive(Debug, Serialize)]
struct Report {
    volume: String,
    chunks: u64,
    chunks_compared: u64,
    chunks_differing: Vec<Difference>,
    /// Nodes (with the reason) whose copies could not be read.
    not_compared: BTreeMap<u64, String>,
    consistent: bool,
}

/// What one holder stores of one chunk: its version and, per block, whether it holds data and its
/// checksum.
type Copy = (Version, Vec<(bool, u32)>);

async fn call(conn: &NodeConnection, request: &Request) -> Result<Response, String> {
    match tokio::time::timeout(CALL_TIMEOUT, conn.call(request)).await {
        Ok(Ok(Response::Error(e))) => Err(e.to_string()),
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

async fn read_copy(
    conn: &NodeConnection,
    volume: VolumeId,
    chunk: ChunkIndex,
    chunk_size: ChunkSize,
) -> Result<Option<Copy>, String> {
    match call(conn, &Request::ChunkVersion { volume, chunk }).await? {
        Response::ChunkVersion(None) => return Ok(None),
        Response::ChunkVersion(Some(_)) => {}
        other => return Err(format!("unexpected reply {other:?}")),
    }
    let piece = RPC_IO_MAX_BYTES.min(chunk_size.bytes());
    let mut copy = Vec::new();
    let mut version = None;
    for offset in (0..chunk_size.bytes()).step_by(piece as usize) {
        let read =
            read_piece(|r| async move { call(conn, &r).await }, volume, chunk, chunk_size, offset, piece)
                .await?;
        if version.is_some_and(|v| v != read.version) {
            return Err("the chunk changed while being read (is the volume still being written?)".into());
        }
        version = Some(read.version);
        copy.extend(read.present.into_iter().zip(read.crcs).map(|(p, c)| (p, if p { c } else { 0 })));
    }
    let version = version.unwrap_or(Version::NONE);
    // A file never written (at version none, all holes; a refused write can leave one) is the
    // same as no file.
    if version == Version::NONE && copy.iter().all(|(present, _)| !present) {
        return Ok(None);
    }
    Ok(Some((version, copy)))
}

fn summary(copy: &Option<Copy>) -> String {
    match copy {
        None => "absent".into(),
        Some((version, blocks)) => {
            let data = blocks.iter().filter(|(p, _)| *p).count();
            let mut bytes = Vec::with_capacity(blocks.len() * 5);
            for (p, c) in blocks {
                bytes.push(u8::from(*p));
                bytes.extend_from_slice(&c.to_le_bytes());
            }
            format!("version {version}, {data} data blocks, digest {:08x}", cairn_types::crc32c(&bytes))
        }
    }
}

pub fn run(api: &Api, name: &str, json_out: bool) -> anyhow::Result<()> {
    let info: Value = api.get(&format!("/v1/volumes/{name}"))?;
    let nodes: Value = api.get("/v1/nodes")?;
    let pgs: Value = api.get("/v1/pgs")?;
    let id = info["id"].as_u64().ok_or_else(|| anyhow!("volume {name}: no id in the answer"))?;
    let volume = VolumeId::new(id)?;
    let chunk_size = ChunkSize::new(
        info["chunk_size_bytes"].as_u64().ok_or_else(|| anyhow!("volume {name}: no chunk size"))? as u32,
    )?;
    let chunks = info["chunks"].as_u64().unwrap_or(0);
    let replicas = info["replicas"].as_u64().unwrap_or(0);
    let pg_count = pgs["pg_count"].as_u64().ok_or_else(|| anyhow!("no pg_count in /v1/pgs"))? as u32;
    let rows: Vec<Vec<u64>> = serde_json::from_value(pgs["holders"][replicas.to_string()].clone())
        .context("no PG holders for this volume's replica count in /v1/pgs")?;
    let addrs: BTreeMap<u64, SocketAddr> = nodes
        .as_array()
        .ok_or_else(|| anyhow!("/v1/nodes is not a list"))?
        .iter()
        .filter_map(|n| Some((n["id"].as_u64()?, n["rpc"].as_str()?.parse().ok()?)))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = runtime.block_on(async {
        let mut connections = BTreeMap::new();
        let mut not_compared: BTreeMap<u64, String> = BTreeMap::new();
        let mut differing = Vec::new();
        let mut compared = 0;
        for chunk in 0..chunks {
            let pg = pg_of(volume, ChunkIndex(chunk), pg_count).0;
            let holders = rows.get(pg as usize).cloned().unwrap_or_default();
            let mut copies: BTreeMap<u64, Option<Copy>> = BTreeMap::new();
            for node in holders {
                if not_compared.contains_key(&node) {
                    continue;
                }
                if let std::collections::btree_map::Entry::Vacant(slot) = connections.entry(node) {
                    let Some(addr) = addrs.get(&node) else {
                        not_compared.insert(node, "no RPC address in the map".into());
                        continue;
                    };
                    match NodeConnection::connect(*addr).await {
                        Ok(c) => {
                            slot.insert(c);
                        }
                        Err(e) => {
                            not_compared.insert(node, e.to_string());
                            continue;
                        }
                    }
                }
                let Some(conn) = connections.get(&node) else { continue };
                match read_copy(conn, volume, ChunkIndex(chunk), chunk_size).await {
                    Ok(copy) => {
                        copies.insert(node, copy);
                    }
                    Err(e) => {
                        not_compared.insert(node, format!("chunk {chunk}: {e}"));
                    }
                }
            }
            if copies.values().all(Option::is_none) {
                continue;
            }
            compared += 1;
            let first = copies.values().next().cloned().flatten();
            if copies.values().any(|c| *c != first) {
                let copies = copies.iter().map(|(n, c)| (*n, summary(c))).collect();
                differing.push(Difference { chunk, pg, copies });
            }
        }
        let consistent = differing.is_empty() && not_compared.is_empty();
        Report {
            volume: name.to_string(),
            chunks,
            chunks_compared: compared,
            chunks_differing: differing,
            not_compared,
            consistent,
        }
    });
    if json_out {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!(
            "volume {}: {} chunks, {} held by some replica and compared, {} differing",
            report.volume,
            report.chunks,
            report.chunks_compared,
            report.chunks_differing.len()
        );
        for d in &report.chunks_differing {
            outln!("  chunk {} (pg {}):", d.chunk, d.pg);
            for (node, copy) in &d.copies {
                outln!("    node {node}: {copy}");
            }
        }
        for (node, why) in &report.not_compared {
            outln!("  node {node} not compared: {why}");
        }
    }
    if !report.chunks_differing.is_empty() {
        bail!("{} chunk(s) of volume {name} differ between replicas", report.chunks_differing.len());
    }
    if !report.not_compared.is_empty() {
        bail!("{} node(s) could not be compared; convergence is not proven", report.not_compared.len());
    }
    Ok(())
}
