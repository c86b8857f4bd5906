//! The storage node daemon as a real process, driven over TCP with the node RPC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use cairn_client::NodeConnection;
use cairn_proto::{Request, Response, RpcError, Stamp};
use cairn_types::checksum::block_crcs;
use cairn_types::{ChunkIndex, ChunkSize, Generation, VolumeId};
use common::*;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

/// The protocol version raw frames speak.
const V: u16 = cairn_proto::PROTOCOL_VERSION_MAX;

fn vol(v: u64) -> VolumeId {
    VolumeId::new(v).unwrap()
}

fn block(chunk: u64, block: u32, round: u8) -> Vec<u8> {
    let mut b = vec![round; 4096];
    b[..8].copy_from_slice(&chunk.to_le_bytes());
    b[8..12].copy_from_slice(&block.to_le_bytes());
    b
}

fn write_req(v: u64, chunk: u64, blk: u32, data: Vec<u8>, generation: u64) -> Request {
    Request::Write {
        volume: vol(v),
        chunk: ChunkIndex(chunk),
        chunk_size: ChunkSize::DEFAULT,
        offset: blk * 4096,
        stamp: Stamp { generation: Generation(generation), sequence: 1, expect: None },
        crcs: block_crcs(&data),
        data: Bytes::from(data),
        missed_by: vec![],
        // (Newer than any map: the PG check passes it.)
        pg_interval: u64::MAX,
    }
}

fn read_req(v: u64, chunk: u64, blk: u32, blocks: u32) -> Request {
    Request::Read {
        volume: vol(v),
        chunk: ChunkIndex(chunk),
        chunk_size: ChunkSize::DEFAULT,
        offset: blk * 4096,
        len: blocks * 4096,
    }
}

async fn read_block(c: &NodeConnection, chunk: u64, blk: u32) -> Vec<u8> {
    match c.call(&read_req(1, chunk, blk, 1)).await.unwrap() {
        Response::Read { crcs, data, .. } => {
            assert_eq!(crcs, block_crcs(&data), "reply checksums must cover the data");
            data.to_vec()
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Issues many writes concurrently on one connection (pipelined, replies in any order).
async fn write_all(c: &Arc<NodeConnection>, round: u8, chunks: u64, blocks: u32) {
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..chunks {
        for blk in 0..blocks {
            let c = c.clone();
            tasks.spawn(async move {
                let r = c.call(&write_req(1, chunk, blk, block(chunk, blk, round), 1)).await.unwrap();
                assert!(matches!(r, Response::Applied { .. }));
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_writes_survive_sigkill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = write_config(dir.path(), 1, addr);
    let mut node = NodeProcess::start(&config, addr);
    let c = Arc::new(node.connect().await);
    assert_eq!(c.version(), cairn_proto::PROTOCOL_VERSION_MAX);
    write_all(&c, 1, 8, 32).await;
    assert_eq!(c.call(&Request::Flush { volume: vol(1) }).await.unwrap(), Response::Done);
    // A second round over half the blocks, not flushed.
    write_all(&c, 2, 4, 32).await;
    for chunk in [0, 5] {
        assert_eq!(read_block(&c, chunk, 3).await, block(chunk, 3, if chunk < 4 { 2 } else { 1 }));
    }
    drop(c);
    node.sigkill();

    let mut node = NodeProcess::start(&config, addr);
    let c = node.connect().await;
    for chunk in 0..8 {
        for blk in 0..32 {
            let got = read_block(&c, chunk, blk).await;
            if chunk < 4 {
                // Unflushed, but a process kill keeps the page cache: old or new, never anything else.
                assert!(
                    got == block(chunk, blk, 1) || got == block(chunk, blk, 2),
                    "chunk {chunk} block {blk}"
                );
            } else {
                assert_eq!(got, block(chunk, blk, 1), "flushed chunk {chunk} block {blk}");
            }
        }
    }
    // Never-written space reads as zeros.
    assert_eq!(read_block(&c, 99, 0).await, vec![0u8; 4096]);
    match c.call(&Request::ChunkVersion { volume: vol(1), chunk: ChunkIndex(0) }).await.unwrap() {
        Response::ChunkVersion(Some(info)) => assert!(info.version >= 32),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = write_config(dir.path(), 1, addr);
    let mut node = NodeProcess::start(&config, addr);
    let c = Arc::new(node.connect().await);
    write_all(&c, 7, 4, 16).await;
    node.signal(rustix::process::Signal::TERM);
    let status = node.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "clean stop exits 0");
    // The connection is closed by the stop.
    assert!(c.call(&read_req(1, 0, 0, 1)).await.is_err());
    drop(c);
    let mut node = NodeProcess::start(&config, addr);
    let c = node.connect().await;
    assert_eq!(read_block(&c, 3, 15).await, block(3, 15, 7));
    node.signal(rustix::process::Signal::INT);
    assert_eq!(node.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_back_as_error_replies() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = write_config(dir.path(), 1, addr);
    let mut node = NodeProcess::start(&config, addr);
    let c = node.connect().await;
    // Fencing.
    assert!(matches!(
        c.call(&write_req(1, 0, 0, block(0, 0, 1), 5)).await.unwrap(),
        Response::Applied { .. }
    ));
    match c.call(&write_req(1, 0, 0, block(0, 0, 2), 4)).await.unwrap() {
        Response::Error(RpcError::Fenced { generation, highest, .. }) => {
            assert_eq!((generation, highest), (Generation(4), Generation(5)));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(read_block(&c, 0, 0).await, block(0, 0, 1));
    // A checksum that does not match the data.
    let mut bad = write_req(1, 0, 1, block(0, 1, 1), 5);
    if let Request::Write { crcs, .. } = &mut bad {
        crcs[0] ^= 1;
    }
    assert!(matches!(c.call(&bad).await.unwrap(), Response::Error(RpcError::Corrupt { block: 1, .. })));
    // Unaligned, beyond the chunk, oversized.
    for r in [read_req(1, 0, 0, 0), read_req(1, 0, 255, 2), read_req(1, 0, 0, 2048)] {
        assert!(
            matches!(c.call(&r).await.unwrap(), Response::Error(RpcError::InvalidRequest { .. })),
            "{r:?}"
        );
    }
    // The connection still works.
    assert_eq!(read_block(&c, 0, 0).await, block(0, 0, 1));
}

/// Writes one raw frame.
fn raw_frame(kind: u16, version: u16, id: u64, body: &[u8]) -> Vec<u8> {
    let kind = match kind {
        1 => cairn_proto::FrameKind::Hello,
        3 => cairn_proto::FrameKind::Request,
        _ => cairn_proto::FrameKind::Response,
    };
    let mut buf = BytesMut::new();
    cairn_proto::Frame { version, kind, request_id: id, body: Bytes::copy_from_slice(body) }
        .encode(&mut buf)
        .unwrap();
    buf.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_traffic_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = write_config(dir.path(), 1, addr);
    let mut node = NodeProcess::start(&config, addr);
    let good = node.connect().await;
    assert!(matches!(
        good.call(&write_req(1, 0, 0, block(0, 0, 3), 1)).await.unwrap(),
        Response::Applied { .. }
    ));

    let closes = |bytes: Vec<u8>| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(&bytes);
        let mut sink = Vec::new();
        // The node closes the connection (read returns EOF or reset), it does not hang.
        let r = s.read_to_end(&mut sink);
        assert!(
            r.is_ok() || r.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
    };
    closes(b"GET / HTTP/1.1\r\n\r\n0123456789abcdef0123456789".to_vec());
    // A frame claiming a 1 GiB body.
    let mut huge = raw_frame(1, 0, 0, b"");
    huge[16..20].copy_from_slice(&(1u32 << 30).to_le_bytes());
    closes(huge);
    // A hello naming only versions from the future.
    let hello =
        cairn_proto::message::encode(&cairn_proto::Hello { version_min: V + 1, version_max: V + 4 }).unwrap();
    closes(raw_frame(1, 0, 0, &hello));
    // A valid hello then a corrupted frame.
    let ok_hello =
        cairn_proto::message::encode(&cairn_proto::Hello { version_min: V, version_max: V }).unwrap();
    let mut bytes = raw_frame(1, 0, 0, &ok_hello);
    let mut req = raw_frame(3, V, 1, &cairn_proto::message::encode(&read_req(1, 0, 0, 1)).unwrap());
    let last = req.len() - 1;
    req[last] ^= 0xff;
    bytes.extend_from_slice(&req);
    closes(bytes);

    // A valid frame whose body is garbage gets an error reply and the connection lives on.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&raw_frame(1, 0, 0, &ok_hello)).unwrap();
    s.write_all(&raw_frame(3, V, 42, &[0xff, 0xff, 0xff])).unwrap();
    s.write_all(&raw_frame(3, V, 43, &cairn_proto::message::encode(&read_req(1, 0, 0, 1)).unwrap())).unwrap();
    let mut got = BytesMut::new();
    let mut replies = Vec::new();
    let mut buf = [0u8; 65536];
    while replies.len() < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed early");
        got.put_slice(&buf[..n]);
        while let Some(f) = cairn_proto::Frame::decode(&mut got).unwrap() {
            replies.push(f);
        }
    }
    assert_eq!(replies[0].kind, cairn_proto::FrameKind::HelloReply);
    let by_id = |id: u64| replies.iter().find(|f| f.request_id == id).unwrap();
    let r42: Response = cairn_proto::message::decode(&by_id(42).body).unwrap();
    assert!(matches!(r42, Response::Error(RpcError::InvalidRequest { .. })), "{r42:?}");
    let r43: Response = cairn_proto::message::decode(&by_id(43).body).unwrap();
    assert!(matches!(r43, Response::Read { .. }));

    // The well-behaved client never noticed.
    assert_eq!(read_block(&good, 0, 0).await, block(0, 0, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_in_flight_than_the_byte_budget_completes() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = write_config(dir.path(), 1, addr);
    // The smallest budget (8 MiB) with 24 writes of 4 MiB in flight: the node must throttle reading,
    // not fail or deadlock.
    let text = "in_flight_bytes_max = 8388608\n".to_string() + &std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text).unwrap();
    let mut node = NodeProcess::start(&config, addr);
    let c = Arc::new(node.connect().await);
    let size = ChunkSize::new(4 << 20).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..24u64 {
        let c = c.clone();
        tasks.spawn(async move {
            let data = vec![chunk as u8 + 1; 4 << 20];
            let req = Request::Write {
                volume: vol(2),
                chunk: ChunkIndex(chunk),
                chunk_size: size,
                offset: 0,
                stamp: Stamp { generation: Generation(1), sequence: chunk, expect: None },
                crcs: block_crcs(&data),
                data: Bytes::from(data),
                missed_by: vec![],
                // (Newer than any map: the PG check passes it.)
                pg_interval: u64::MAX,
            };
            assert!(matches!(c.call(&req).await.unwrap(), Response::Applied { .. }));
        });
    }
    let all = async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all).await.expect("writes did not complete");
    let req = Request::Read {
        volume: vol(2),
        chunk: ChunkIndex(23),
        chunk_size: size,
        offset: 4 << 20 >> 1,
        len: 4096,
    };
    match c.call(&req).await.unwrap() {
        Response::Read { data, .. } => assert!(data.iter().all(|b| *b == 24)),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn startup_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let check = |config: &std::path::Path, needle: &str| {
        let mut cmd = cairn();
        cmd.args(["node", "run", "--config"]).arg(config).env("CAIRN_LOG", "off");
        let out = run_to_end(cmd, Duration::from_secs(30));
        assert!(!out.status.success(), "must fail: {needle}");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {err:?}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{err:?} should mention {needle:?}"
        );
        // The cause is named once, not repeated by the error chain.
        if let Some(cause) = lines[0].rsplit(": ").next().filter(|c| c.contains("os error")) {
            assert_eq!(lines[0].matches(cause).count(), 1, "{err:?} repeats its cause");
        }
    };
    // Missing file.
    check(&dir.path().join("nope.toml"), "cannot read");
    // Bad TOML.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "node_id = \"one\"\n").unwrap();
    check(&bad, "line 1");
    // Port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = write_config(dir.path(), 1, taken.local_addr().unwrap());
    check(&config, "cannot listen");
    // Data directory that cannot be created (its parent is a regular file).
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let config = dir.path().join("unwritable.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = 1\ndata_dir = \"{}/data\"\nrpc_listen_addr = \"{}\"\nhttp_listen_addr = \"{}\"\n",
            file.display(),
            free_addr(),
            free_addr()
        ),
    )
    .unwrap();
    check(&config, "creating data directory");
    // A data directory already used by a running node.
    let addr = free_addr();
    let config = write_config(dir.path(), 4, addr);
    let mut node = NodeProcess::start(&config, addr);
    tokio::runtime::Runtime::new().unwrap().block_on(node.connect());
    let second = dir.path().join("second.toml");
    std::fs::write(
        &second,
        format!(
            "node_id = 5\ndata_dir = \"{}\"\nrpc_listen_addr = \"{}\"\nhttp_listen_addr = \"{}\"\n",
            dir.path().join("data-4").display(),
            free_addr(),
            free_addr()
        ),
    )
    .unwrap();
    check(&second, "already in use");
}

/// A raw connection that says hello and sends `count` copies of `request` (ids 1..=count) without
/// reading anything back.
fn send_unread(addr: std::net::SocketAddr, request: &Request, count: u64) -> std::net::TcpStream {
    let hello = cairn_proto::message::encode(&cairn_proto::Hello { version_min: V, version_max: V }).unwrap();
    let mut bytes = raw_frame(1, 0, 0, &hello);
    let body = cairn_proto::message::encode(request).unwrap();
    for id in 1..=count {
        bytes.extend_from_slice(&raw_frame(3, V, id, &body));
    }
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(&bytes).unwrap();
    s
}

fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// The largest RSS of `pid` over `window` (sampled every 50 ms): how much a misbehaving client
/// made it pin. A bound over time, not a wait for a condition.
fn peak_rss(pid: i32, window: Duration) -> u64 {
    let end = std::time::Instant::now() + window;
    let mut peak = 0;
    while std::time::Instant::now() < end {
        peak = peak.max(rss_bytes(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_pins_at_most_its_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = write_config(dir.path(), 1, addr);
    let text = "in_flight_bytes_max = 16777216\n".to_string() + &std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text).unwrap();
    let mut node = NodeProcess::start(&config, addr);
    let c = node.connect().await;
    let size = ChunkSize::new(4 << 20).unwrap();
    let data = vec![7u8; 4 << 20];
    let write = Request::Write {
        volume: vol(3),
        chunk: ChunkIndex(0),
        chunk_size: size,
        offset: 0,
        stamp: Stamp { generation: Generation(1), sequence: 1, expect: None },
        crcs: block_crcs(&data),
        data: Bytes::from(data),
        missed_by: vec![],
        // (Newer than any map: the PG check passes it.)
        pg_interval: u64::MAX,
    };
    assert!(matches!(c.call(&write).await.unwrap(), Response::Applied { .. }));
    let before = rss_bytes(node.pid());

    // 200 reads of 4 MiB (800 MiB of replies) on a connection whose replies are never read.
    let read =
        Request::Read { volume: vol(3), chunk: ChunkIndex(0), chunk_size: size, offset: 0, len: 4 << 20 };
    let mut s = send_unread(addr, &read, 200);
    let peak = peak_rss(node.pid(), Duration::from_secs(3));
    // The budget is 16 MiB; socket buffers and allocator slack come on top. Without the bound the
    // node would hold the replies queued for the writer: hundreds of MiB.
    assert!(peak < before + (96 << 20), "node RSS grew from {} MiB to {} MiB", before >> 20, peak >> 20);

    // Reading now gets every reply: the node was waiting, not stuck.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut got = BytesMut::new();
    let mut replies = 0;
    let mut buf = vec![0u8; 1 << 20];
    while replies < 201 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed after {replies} replies");
        got.put_slice(&buf[..n]);
        while let Some(f) = cairn_proto::Frame::decode(&mut got).unwrap() {
            if f.kind == cairn_proto::FrameKind::Response {
                let r: Response = cairn_proto::message::decode(&f.body).unwrap();
                assert!(matches!(&r, Response::Read { data, .. } if data.iter().all(|b| *b == 7)));
            }
            replies += 1;
        }
    }
    // The well-behaved client never noticed.
    assert!(matches!(c.call(&read).await.unwrap(), Response::Read { .. }));
}

/// A TCP connection to `to` from local address `from` (another loopback address: another client).
fn connect_from(from: &str, to: std::net::SocketAddr) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let s = socket.connect(to).await.unwrap().into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s
    })
}

/// Whether the server closes `s` within `within` (EOF or reset) without it sending anything more.
fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A one-node pool whose node.toml has `limits` as its `[limits]` section, with its admin API up.
fn node_with_limits(
    dir: &std::path::Path,
    limits: &str,
) -> (NodeProcess, cairn_node::config::NodeConfig, std::net::SocketAddr) {
    let addr = free_addr();
    let config = write_config(dir, 1, addr);
    let text = std::fs::read_to_string(&config).unwrap() + "[limits]\n" + limits;
    std::fs::write(&config, text).unwrap();
    let node = NodeProcess::start(&config, addr);
    let cfg = cairn_node::config::NodeConfig::load(&config).unwrap();
    let status = format!("http://{}/v1/status", cfg.http_addr());
    wait_for("the admin API", Duration::from_secs(30), || {
        reqwest::blocking::get(&status).ok().filter(|r| r.status().is_success())
    });
    (node, cfg, addr)
}

/// Clients holding node RPC connections cannot lock the pool's nodes out: the last slots are kept
/// for addresses of pool nodes (here the node's own, 127.0.0.1), so a client from elsewhere
/// (127.0.0.2) gets at most `connections_max - rpc_connections_reserved_for_members`.
#[test]
fn the_pools_nodes_keep_rpc_slots_that_clients_cannot_take() {
    let dir = tempfile::tempdir().unwrap();
    let limits =
        "connections_max = 16\nrpc_connections_reserved_for_members = 6\nhandshake_timeout_ms = 60000\n";
    let (_node, _, addr) = node_with_limits(dir.path(), limits);
    let mut idle: Vec<std::net::TcpStream> = (0..10).map(|_| connect_from("127.0.0.2", addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    for s in &mut idle {
        assert!(!closed_within(s, Duration::from_millis(100)), "a client was refused below the reserve");
    }
    let mut extra = connect_from("127.0.0.2", addr);
    assert!(closed_within(&mut extra, Duration::from_millis(1000)), "a client took a reserved slot");
    // A pool node's address still gets in, and is served.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for _ in 0..3 {
            let c = NodeConnection::connect(addr).await.unwrap();
            let r = c.call(&Request::ChunkVersion { volume: vol(1), chunk: ChunkIndex(0) }).await.unwrap();
            assert_eq!(r, Response::ChunkVersion(None));
        }
    });
    drop(idle);
}

#[test]
fn connections_are_capped_and_handshakes_time_out_on_every_listener() {
    let dir = tempfile::tempdir().unwrap();
    let limits = "connections_max = 16\nconnections_per_client_max = 12\nhandshake_timeout_ms = 1500\n\
                  rpc_connections_reserved_for_members = 0\n";
    let (node, cfg, addr) = node_with_limits(dir.path(), limits);

    for (listener, at) in [("rpc", addr), ("nbd", cfg.nbd_addr()), ("http", cfg.http_addr())] {
        // Twelve silent connections from 127.0.0.1 reach its per-client cap: a thirteenth from it is
        // closed at once, while another client (127.0.0.2) still gets in, up to the listener's 16.
        let opened = std::time::Instant::now();
        let mut idle: Vec<std::net::TcpStream> =
            (0..12).map(|_| std::net::TcpStream::connect(at).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200)); // accepts are in order
        let mut extra = std::net::TcpStream::connect(at).unwrap();
        assert!(
            closed_within(&mut extra, Duration::from_millis(1000)),
            "{listener}: 13th from one client kept"
        );
        idle.extend((0..4).map(|_| connect_from("127.0.0.2", at)));
        std::thread::sleep(Duration::from_millis(200));
        for s in &mut idle[12..] {
            assert!(!closed_within(s, Duration::from_millis(100)), "{listener}: another client was refused");
        }
        let mut extra = connect_from("127.0.0.2", at);
        assert!(closed_within(&mut extra, Duration::from_millis(1000)), "{listener}: 17th connection kept");
        // None of them finished a handshake: each is closed once the timeout (1.5 s) passes.
        for s in &mut idle {
            assert!(closed_within(s, Duration::from_secs(10)), "{listener}: a silent connection was kept");
        }
        let took = opened.elapsed();
        assert!(took >= Duration::from_millis(1400), "{listener}: closed after {took:?}, before the timeout");
        // A half-sent HTTP request (headers never finished) is closed the same way.
        if listener == "http" {
            let mut half = std::net::TcpStream::connect(at).unwrap();
            half.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n").unwrap();
            assert!(closed_within(&mut half, Duration::from_secs(10)), "a half-sent request was kept");
        }
        // Once they are gone, the listener serves again.
        wait_for("a free slot", Duration::from_secs(10), || {
            let mut s = std::net::TcpStream::connect(at).ok()?;
            (!closed_within(&mut s, Duration::from_millis(300))).then_some(())
        });
    }
    // The API answers JSON errors for bad paths and bodies, and 413 for a body over the limit.
    let client = reqwest::blocking::Client::new();
    let base = format!("http://{}", cfg.http_addr());
    let r = client.get(format!("{base}/v1/nope")).send().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.json::<serde_json::Value>().unwrap()["error"].is_string());
    let r = client.post(format!("{base}/v1/nodes/abc/catch-up")).send().unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.json::<serde_json::Value>().unwrap()["error"].is_string());
    // (Found by the http_api fuzz target: JSON of the wrong shape; a name that is not UTF-8 once
    // decoded.)
    let r = client
        .post(format!("{base}/v1/volumes"))
        .header("content-type", "application/json")
        .body("\"x\"")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.json::<serde_json::Value>().unwrap()["error"].is_string());
    let r = client.get(format!("{base}/v1/volumes/%ff%fe")).send().unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.json::<serde_json::Value>().unwrap()["error"].is_string());
    let r = client.get(format!("{base}/v1/events?since=x")).send().unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.json::<serde_json::Value>().unwrap()["error"].is_string());
    // (Raw: the node answers from the length alone and closes, so a client still sending the body
    // would see a broken pipe instead of the answer.)
    let mut s = std::net::TcpStream::connect(cfg.http_addr()).unwrap();
    s.write_all(
        b"POST /v1/volumes HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 104857600\r\n\r\n",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("{\"error\":"), "{answer}");
    drop(node);
}

/// An NBD connection past the handshake (EXPORT_NAME) to volume `name` of `size` bytes.
fn nbd_open(at: std::net::SocketAddr, name: &str, size: u64) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(at).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    s.write_all(&opt).unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), size);
    s
}

/// Starts a one-node pool with volume "v" (64 MiB, one replica); returns it and its config.
fn node_with_volume(dir: &std::path::Path) -> (NodeProcess, cairn_node::config::NodeConfig) {
    let addr = free_addr();
    let config = write_config(dir, 1, addr);
    let node = NodeProcess::start(&config, addr);
    let cfg = cairn_node::config::NodeConfig::load(&config).unwrap();
    let client = reqwest::blocking::Client::new();
    let create = format!("http://{}/v1/volumes", cfg.http_addr());
    wait_for("the volume to be created", Duration::from_secs(30), || {
        let body = serde_json::json!({ "name": "v", "size_bytes": 64u64 << 20, "replicas": 1 });
        client.post(&create).json(&body).send().ok().filter(|r| r.status().as_u16() == 201)
    });
    (node, cfg)
}

fn status_counter(cfg: &cairn_node::config::NodeConfig, name: &str) -> u64 {
    let url = format!("http://{}/v1/status", cfg.http_addr());
    let v: serde_json::Value = reqwest::blocking::get(url).unwrap().json().unwrap();
    v[name].as_u64().unwrap()
}

#[test]
fn idle_nbd_connections_cost_the_metadata_almost_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (node, cfg) = node_with_volume(dir.path());
    let conns: Vec<std::net::TcpStream> = (0..50).map(|_| nbd_open(cfg.nbd_addr(), "v", 64 << 20)).collect();
    let before = status_counter(&cfg, "nbd_meta_requests");
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(3)); // the window measured, not a wait for a condition
    let sent = status_counter(&cfg, "nbd_meta_requests") - before;
    let secs = started.elapsed().as_secs_f64();
    // Shared by all connections: the pool view (2 requests) once a second, the volume once per
    // metadata change. Per connection it would be 3 requests a second each: 450.
    assert!(sent as f64 <= 4.0 * secs + 4.0, "{sent} admin requests in {secs:.1} s for 50 idle connections");
    drop(conns);
    drop(node);
}

#[test]
fn an_nbd_client_that_never_reads_its_replies_pins_at_most_its_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (node, cfg) = node_with_volume(dir.path());
    let before = rss_bytes(node.pid());

    // 40 reads of 32 MiB (1.25 GiB of replies) on a connection whose replies are never read.
    let mut s = nbd_open(cfg.nbd_addr(), "v", 64 << 20);
    let len: u32 = 32 << 20;
    for handle in 0..40u64 {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes()); // flags
        r.extend_from_slice(&0u16.to_be_bytes()); // READ
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&((handle % 2) * u64::from(len)).to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        s.write_all(&r).unwrap();
    }
    let peak = peak_rss(node.pid(), Duration::from_secs(4));
    // The budget is 128 MiB per connection; the volume client's buffers come on top. Without the
    // bound the queued replies alone would be 1.25 GiB.
    assert!(peak < before + (320 << 20), "node RSS grew from {} MiB to {} MiB", before >> 20, peak >> 20);
    // Reading now gets every reply (zeros: nothing was written).
    let mut reply = vec![0u8; 16 + len as usize];
    for _ in 0..40 {
        s.read_exact(&mut reply).unwrap();
        assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0, "read failed");
        assert!(reply[16..].iter().all(|b| *b == 0));
    }
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_taking_replies_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = write_config(dir.path(), 1, addr);
    let text = "in_flight_bytes_max = 16777216\n".to_string()
        + &std::fs::read_to_string(&config).unwrap()
        + "[limits]\nreply_write_timeout_ms = 1000\n";
    std::fs::write(&config, text).unwrap();
    let mut node = NodeProcess::start(&config, addr);
    let c = node.connect().await;
    let size = ChunkSize::new(4 << 20).unwrap();
    let read =
        Request::Read { volume: vol(3), chunk: ChunkIndex(0), chunk_size: size, offset: 0, len: 4 << 20 };
    let mut s = send_unread(addr, &read, 200);
    // Not reading for longer than the reply write timeout: the node gives up on this connection.
    std::thread::sleep(Duration::from_secs(4)); // the stall under test, not a wait for a condition
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut frames = 0;
    let mut got = BytesMut::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.put_slice(&buf[..n]);
                while let Ok(Some(_)) = cairn_proto::Frame::decode(&mut got) {
                    frames += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the node kept the connection of a peer that stopped reading: {e}"),
        }
    }
    assert!(frames < 201, "every reply arrived ({frames}): the connection was not cut");
    // Others are served as before.
    assert!(matches!(c.call(&read).await.unwrap(), Response::Read { .. }));
}

/// A copy from a node this one recorded as having missed the chunk is refused (it would undo the
/// write recorded) — unless it is sent for a record an open of a newer generation settled and the
/// copy here is of an older generation (protocol 9); and a copy of a dirty source stays dirty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_from_a_recorded_source_is_refused_unless_an_open_settled_it() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = write_config(dir.path(), 1, addr);
    let mut node = NodeProcess::start(&config, addr);
    let c = node.connect().await;
    let chunk = ChunkIndex(0);
    assert!(matches!(
        c.call(&write_req(1, 0, 0, block(0, 0, 1), 1)).await.unwrap(),
        Response::Applied { .. }
    ));
    // Node 5 missed that write (recorded by a write, not by an open).
    let record = Request::RecordMissed {
        volume: vol(1),
        chunk,
        chunk_size: ChunkSize::DEFAULT,
        peers: vec![5],
        at: None,
        settled: None,
    };
    assert_eq!(c.call(&record).await.unwrap(), Response::Done);
    let before = chunk_info(&c, chunk).await;
    assert_eq!(before.missed_by, vec![5]);
    // A whole copy of holes from node 5, at a version of generation 1.
    let install = |seq, settled: Option<u64>, dirty, expect| Request::InstallRange {
        volume: vol(1),
        chunk,
        chunk_size: ChunkSize::DEFAULT,
        offset: 0,
        present: vec![false; 256],
        crcs: vec![],
        data: Bytes::new(),
        generation: Generation(2),
        version: cairn_types::Version { generation: 1, seq },
        expect,
        source: Some(5),
        settled: settled.map(Generation),
        dirty,
    };
    let refused = c.call(&install(100, None, false, None)).await.unwrap();
    assert!(matches!(refused, Response::Error(RpcError::VersionMismatch { .. })), "{refused:?}");
    assert_eq!(
        chunk_info(&c, chunk).await.chunk_version(),
        before.chunk_version(),
        "a refused copy changes nothing"
    );
    // Sent for a record an open of generation 2 settled: the copy here (generation 1) is replaced,
    // clean since its source's was.
    assert_eq!(c.call(&install(100, Some(2), false, None)).await.unwrap(), Response::Done);
    let after = chunk_info(&c, chunk).await;
    assert_eq!(after.chunk_version(), cairn_types::Version { generation: 1, seq: 100 });
    assert!(!after.dirty);
    // A copy of a dirty source stays dirty here.
    let from_dirty = install(101, Some(2), true, Some(after.chunk_version()));
    assert_eq!(c.call(&from_dirty).await.unwrap(), Response::Done);
    let dirty = chunk_info(&c, chunk).await;
    assert_eq!(dirty.chunk_version(), cairn_types::Version { generation: 1, seq: 101 });
    assert!(dirty.dirty, "a copy of a dirty source must stay dirty");
    node.sigkill();
}

async fn chunk_info(c: &NodeConnection, chunk: ChunkIndex) -> cairn_proto::ChunkInfo {
    match c.call(&Request::ChunkVersion { volume: vol(1), chunk }).await.unwrap() {
        Response::ChunkVersion(Some(info)) => info,
        other => panic!("{other:?}"),
    }
}

/// A catch-up copy is fenced like a write, also by the volume's generation in the node's map: a
/// sender whose map lags behind a new writer's open must not spread the old writer's strays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_an_older_writer_generation_than_the_map_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let (mut node, cfg) = tokio::task::spawn_blocking(move || node_with_volume(&path)).await.unwrap();
    let http = cfg.http_addr();
    // Two writers opened the volume: the map's generation is past 1.
    let generation = tokio::task::spawn_blocking(move || {
        let client = reqwest::blocking::Client::new();
        let mut g = 0;
        for _ in 0..2 {
            let r = client.post(format!("http://{http}/v1/volumes/v/open")).send().unwrap();
            assert!(r.status().is_success(), "{:?}", r.status());
            g = r.json::<serde_json::Value>().unwrap()["generation"].as_u64().unwrap();
        }
        g
    })
    .await
    .unwrap();
    assert!(generation >= 2);
    let c = node.connect().await;
    let install = |generation: u64| Request::InstallRange {
        volume: vol(1),
        chunk: ChunkIndex(0),
        chunk_size: ChunkSize::DEFAULT,
        offset: 0,
        present: vec![false; 256],
        crcs: vec![],
        data: Bytes::new(),
        generation: Generation(generation),
        version: cairn_types::Version { generation: 1, seq: 5 },
        expect: None,
        source: None,
        settled: None,
        dirty: false,
    };
    // The node's map shows the generation within moments (it leads the one-node pool).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match c.call(&install(generation - 1)).await.unwrap() {
            Response::Error(RpcError::Fenced { highest, .. }) => {
                assert_eq!(highest, Generation(generation));
                break;
            }
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "an older generation's copy went in: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(c.call(&install(generation)).await.unwrap(), Response::Done);
    node.sigkill();
}
