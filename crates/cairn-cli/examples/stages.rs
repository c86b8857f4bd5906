//! Per-stage latency of the 4 KiB data path, against a running pool (used by bench/nbd.sh):
//! 1. one node-RPC round trip that does no IO (ChunkVersion);
//! 2. node-RPC 4 KiB read / write to one replica (RPC + store);
//! 3. VolumeClient 4 KiB read (one replica) / write (all replicas in parallel, quorum).
//!
//! The NBD layer on top is what fio measures; the difference is the NBD server's share.
//!
//! Usage: stages API_ADDR VOLUME [OPS]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use cairn_client::{ClientConfig, MetaClient, NodeConnection, VolumeClient};
use cairn_proto::{Request, Stamp};
use cairn_types::checksum::block_crcs;
use cairn_types::{ChunkIndex, ChunkSize, Generation, VolumeId};
use std::sync::Arc;
use std::time::Instant;

fn report(name: &str, mut lat: Vec<f64>) {
    lat.sort_by(|a, b| a.total_cmp(b));
    let mean = lat.iter().sum::<f64>() / lat.len() as f64;
    let p99 = lat[lat.len() * 99 / 100];
    println!("{name:<44} mean {mean:>8.1} µs   p99 {p99:>8.1} µs");
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let api = args[1].clone();
    let name = args[2].clone();
    let ops: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(5000);
    let meta = Arc::new(MetaClient::new(&[api]).unwrap());
    let vol = VolumeClient::open(meta.clone(), &name, ClientConfig::default()).await.unwrap();
    let info = vol.volume();
    let nodes = meta.nodes().await.unwrap();
    let conn = NodeConnection::connect(nodes[0].rpc.parse().unwrap()).await.unwrap();
    let volume = VolumeId::new(info.id).unwrap();
    let size = ChunkSize::new(info.chunk_size_bytes).unwrap();
    let data = Bytes::from(vec![0x5au8; 4096]);
    let crcs = block_crcs(&data);
    // Prefill the volume's first 64 MiB so reads hit data.
    for i in 0..64u64 {
        vol.write(i << 20, Bytes::from(vec![1u8; 1 << 20]), false).await.unwrap();
    }
    // The volume client took a generation; use it for direct writes too. Direct writes go to one
    // node only, behind the volume client's back, so they use chunks 64..128, which it never
    // touches (its replicas of those chunks differ afterwards; the volume is a benchmark's).
    let generation = meta.volume(&name).await.unwrap().generation;
    let direct = |i: usize| ChunkIndex(64 + i as u64 % 64);
    let fill = Bytes::from(vec![2u8; 1 << 20]);
    for i in 0..64 {
        let req = Request::Write {
            volume,
            chunk: direct(i),
            chunk_size: size,
            offset: 0,
            stamp: Stamp { generation: Generation(generation), sequence: 1, expect: None },
            crcs: block_crcs(&fill),
            data: fill.clone(),
            missed_by: vec![],
            // (Newer than any map: the PG check passes it.)
            pg_interval: u64::MAX,
        };
        conn.call(&req).await.unwrap();
    }
    let mut t = Vec::new();
    for i in 0..ops {
        let s = Instant::now();
        conn.call(&Request::ChunkVersion { volume, chunk: direct(i) }).await.unwrap();
        t.push(s.elapsed().as_secs_f64() * 1e6);
    }
    report("1. RPC round trip, no IO (ChunkVersion)", t);
    let mut r = Vec::new();
    let mut w = Vec::new();
    for i in 0..ops {
        let chunk = direct(i);
        let offset = ((i * 7919) % 256) as u32 * 4096;
        let s = Instant::now();
        conn.call(&Request::Read { volume, chunk, chunk_size: size, offset, len: 4096 }).await.unwrap();
        r.push(s.elapsed().as_secs_f64() * 1e6);
        let s = Instant::now();
        let req = Request::Write {
            volume,
            chunk,
            chunk_size: size,
            offset,
            stamp: Stamp { generation: Generation(generation), sequence: i as u64, expect: None },
            crcs: crcs.clone(),
            data: data.clone(),
            missed_by: vec![],
            // (Newer than any map: the PG check passes it.)
            pg_interval: u64::MAX,
        };
        conn.call(&req).await.unwrap();
        w.push(s.elapsed().as_secs_f64() * 1e6);
    }
    report("2a. RPC 4K read, one node (RPC + store)", r);
    report("2b. RPC 4K write, one node (RPC + store)", w);
    let mut r = Vec::new();
    let mut w = Vec::new();
    for i in 0..ops {
        let off = ((i as u64 * 7919) % 16384) * 4096;
        let s = Instant::now();
        vol.read(off, 4096).await.unwrap();
        r.push(s.elapsed().as_secs_f64() * 1e6);
        let s = Instant::now();
        vol.write(off, data.clone(), false).await.unwrap();
        w.push(s.elapsed().as_secs_f64() * 1e6);
    }
    report(&format!("3a. VolumeClient 4K read ({} replicas)", info.replicas), r);
    report(&format!("3b. VolumeClient 4K write ({} replicas)", info.replicas), w);
}
