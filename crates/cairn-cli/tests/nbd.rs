//! Replicated volumes over NBD, driven by real clients (qemu-img, qemu-io, nbdinfo, libnbd's
//! Python binding) against real pools: data integrity, node loss mid-workload, catch-up, the
//! gateway, fencing, corruption repair and malformed traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cairn_client::NodeConnection;
use cairn_proto::{Request, Response, RpcError};
use cairn_types::{ChunkIndex, ChunkSize, VolumeId};
use common::*;
use std::io::{Read, Write};
use std::time::Duration;

fn nbd_url(addr: &str, volume: &str) -> String {
    format!("nbd://{addr}/{volume}")
}

/// Writes pattern blocks `first..first + count` of `round` through qemu-io, then flushes.
fn write_flushed(url: &str, first: u64, count: u64, round: u64) {
    let mut cmds = pattern_cmds("write", first, count, round);
    cmds.extend(["-c".to_string(), "flush".to_string()]);
    qemu_io(url, cmds);
}

#[test]
fn qemu_img_qemu_io_and_nbdinfo_see_a_correct_disk() {
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "vol", "--size", "256M"]);
    let url = nbd_url(&pool.nbd(1), "vol");

    // 256 MiB of random bytes in, compared equal.
    let src = pool.dir.path().join("src.img");
    let mut data = vec![0u8; 256 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for w in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&src, &data).unwrap();
    let s = |v: &str| v.to_string();
    let (ok, out) = run_tool(
        "qemu-img",
        &[
            s("convert"),
            s("-n"),
            s("-f"),
            s("raw"),
            s("-O"),
            s("raw"),
            src.display().to_string(),
            url.clone(),
        ],
        Duration::from_secs(300),
    );
    assert!(ok, "qemu-img convert: {out}");
    let (ok, out) = run_tool(
        "qemu-img",
        &[s("compare"), s("-f"), s("raw"), s("-F"), s("raw"), src.display().to_string(), url.clone()],
        Duration::from_secs(300),
    );
    assert!(ok && out.contains("identical"), "qemu-img compare: {out}");

    // Unaligned writes (inside a block, across blocks, across a chunk boundary), read back through
    // another node's NBD server.
    let cmds: Vec<String> = [
        "write -P 0x11 1000 5000",
        "write -P 0x22 1048000 100000",
        "write -P 0x33 4095 2",
        "write -P 0x44 268435455 1",
    ]
    .iter()
    .flat_map(|c| ["-c".to_string(), c.to_string()])
    .collect();
    qemu_io(&url, cmds);
    let reads: Vec<String> = [
        "read -P 0x11 1000 3095",
        "read -P 0x33 4095 2",
        "read -P 0x11 4097 1903",
        "read -P 0x22 1048000 100000",
        "read -P 0x44 268435455 1",
    ]
    .iter()
    .flat_map(|c| ["-c".to_string(), c.to_string()])
    .collect();
    qemu_io(&nbd_url(&pool.nbd(2), "vol"), reads);
    // Bytes around the writes are the original ones.
    let mut expect = data.clone();
    expect[1000..6000].fill(0x11);
    expect[1_048_000..1_148_000].fill(0x22);
    expect[4095..4097].fill(0x33);
    expect[268_435_455] = 0x44;
    let dst = pool.dir.path().join("dst.img");
    let (ok, out) = run_tool(
        "qemu-img",
        &[s("convert"), s("-f"), s("raw"), s("-O"), s("raw"), url.clone(), dst.display().to_string()],
        Duration::from_secs(300),
    );
    assert!(ok, "qemu-img convert out: {out}");
    let got = std::fs::read(&dst).unwrap();
    assert!(got == expect, "disk content differs from the oracle");

    // nbdinfo: size and flags, told truthfully.
    let (ok, out) = run_tool("nbdinfo", std::slice::from_ref(&url), Duration::from_secs(30));
    assert!(ok, "{out}");
    for needle in [
        "export-size: 268435456",
        "can_multi_conn: false",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
        "base:allocation",
    ] {
        assert!(out.contains(needle), "nbdinfo lacks {needle:?}: {out}");
    }
    let (ok, out) = run_tool("nbdinfo", &[s("--list"), nbd_url(&pool.nbd(1), "")], Duration::from_secs(30));
    assert!(ok && out.contains("export=\"vol\""), "{out}");
    let (ok, out) = run_tool("nbdinfo", &[nbd_url(&pool.nbd(1), "nope")], Duration::from_secs(30));
    // libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
    assert!(!ok && out.contains("No such file or directory for export: nope"), "{out}");

    // Holes: never written, and after a trim.
    pool.cli_json(&["volume", "create", "thin", "--size", "64M"]);
    let thin = nbd_url(&pool.nbd(3), "thin");
    let (ok, out) = run_tool("nbdinfo", &[s("--map"), thin.clone()], Duration::from_secs(30));
    assert!(ok && out.trim() == "0    67108864    3  hole,zero", "{out}");
    let cmds: Vec<String> = ["write -P 1 0 1M", "write -P 2 8M 4M", "discard 9M 2M"]
        .iter()
        .flat_map(|c| ["-c".to_string(), c.to_string()])
        .collect();
    qemu_io(&thin, cmds);
    let (ok, out) = run_tool("nbdinfo", &[s("--map"), thin.clone()], Duration::from_secs(30));
    assert!(ok, "{out}");
    let map: Vec<(u64, u64, String)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[3].to_string())
        })
        .collect();
    let m = 1u64 << 20;
    assert_eq!(
        map,
        vec![
            (0, m, "data".into()),
            (m, 7 * m, "hole,zero".into()),
            (8 * m, m, "data".into()),
            (9 * m, 2 * m, "hole,zero".into()),
            (11 * m, m, "data".into()),
            (12 * m, 52 * m, "hole,zero".into()),
        ]
    );
}

/// Reads every 1 MiB block of a volume straight from one node's store over the RPC and checks it
/// against the pattern: proves that node holds the data itself (caught up), not another replica.
fn verify_on_node(pool: &Pool, k: u64, volume_id: u64, blocks: u64, round: u64) {
    verify_chunks_on_node(pool, k, volume_id, 0..blocks, round);
}

/// As [`verify_on_node`], for the 1 MiB chunks (= pattern blocks) in `chunks`.
fn verify_chunks_on_node(pool: &Pool, k: u64, volume_id: u64, chunks: std::ops::Range<u64>, round: u64) {
    check_copies_on_node(pool, k, volume_id, chunks, |b, data| {
        let want = ((b + round) % 251 + 1) as u8;
        data.iter().all(|x| *x == want)
    });
}

/// Reads node `k`'s own copy of each 1 MiB chunk in `chunks` straight from its RPC (it serves
/// them only with a read lease from its peers) and checks each with `ok(chunk, data)`. Returns how
/// many it checked.
fn check_copies_on_node(
    pool: &Pool,
    k: u64,
    volume_id: u64,
    chunks: impl IntoIterator<Item = u64>,
    ok: impl Fn(u64, &[u8]) -> bool,
) -> usize {
    // In sync is not yet serving: after a catch-up the node waits until enough peers have the map.
    wait_for(&format!("node {k} to serve client IO"), Duration::from_secs(30), || {
        (pool.get(k, "/v1/status").1["serving_clients"] == true).then_some(())
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = NodeConnection::connect(pool.rpc(k)).await.unwrap();
        let mut checked = 0;
        for b in chunks {
            let req = Request::Read {
                volume: VolumeId::new(volume_id).unwrap(),
                chunk: ChunkIndex(b),
                chunk_size: ChunkSize::DEFAULT,
                offset: 0,
                len: 1 << 20,
            };
            match c.call(&req).await.unwrap() {
                Response::Read { data, .. } => {
                    assert!(ok(b, &data), "node {k} chunk {b}: stale or wrong data");
                }
                other => panic!("node {k} chunk {b}: {other:?}"),
            }
            checked += 1;
        }
        checked
    })
}

fn volume_id(pool: &Pool, name: &str) -> u64 {
    pool.cli_json(&["volume", "info", name])["id"].as_u64().unwrap()
}

/// Writes `blocks` MiB with `round`'s pattern (flushing every 16 MiB) through `url` while, after
/// `delay`, node `victim` is SIGKILLed. The workload must finish without an IO error.
fn write_while_killing(pool: &Pool, url: &str, blocks: u64, round: u64, victim: u64, delay: Duration) {
    let mut cmds = Vec::new();
    for start in (0..blocks).step_by(16) {
        cmds.extend(pattern_cmds("write", start, 16.min(blocks - start), round));
        cmds.push("-c".into());
        cmds.push("flush".into());
    }
    let url = url.to_string();
    let worker = std::thread::spawn(move || qemu_io(&url, cmds));
    std::thread::sleep(delay);
    pool.sigkill(victim);
    worker.join().expect("the workload saw an IO error");
}

#[test]
fn node_loss_mid_workload_then_catch_up() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "vm", "--size", "128M"]);
    let id = volume_id(&pool, "vm");
    let url = nbd_url(&pool.nbd(1), "vm");
    // Kill node 3 (not the one serving NBD) in the middle of the writes.
    write_while_killing(&pool, &url, 128, 1, 3, Duration::from_millis(300));
    qemu_io(&url, pattern_cmds("read", 0, 128, 1));
    // Restart it: it catches up on what it missed.
    pool.restart(3);
    pool.wait_in_sync(Duration::from_secs(60));
    verify_on_node(&pool, 3, id, 128, 1);
    // Now lose a different node: every byte is still there.
    pool.sigkill(2);
    qemu_io(&url, pattern_cmds("read", 0, 128, 1));
    // And the pool still takes writes with one node down.
    qemu_io(&url, pattern_cmds("write", 0, 8, 2));
    qemu_io(&url, pattern_cmds("read", 0, 8, 2));
}

/// Chunks larger than one request (16 MiB: copied in four pieces) are caught up whole: a piece
/// leaves the copy "being installed" (never served, never a reconciliation's winner) until the
/// last one sets the source's version, so the restarted node ends with every byte and the same
/// versions as the others.
#[test]
fn chunks_copied_in_several_pieces_are_caught_up_whole() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "big", "--size", "64M", "--chunk-size", "16M"]);
    let url = nbd_url(&pool.nbd(1), "big");
    qemu_io(&url, pattern_cmds("write", 0, 64, 1));
    pool.sigkill(3);
    write_flushed(&url, 0, 64, 2);
    pool.restart(3);
    pool.wait_in_sync(Duration::from_secs(60));
    qemu_io(&nbd_url(&pool.nbd(3), "big"), pattern_cmds("read", 0, 64, 2));
    pool.assert_converged("big");
}

#[test]
fn gateway_rides_through_each_node_failing_in_turn() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "web", "--size", "64M"]);
    let id = volume_id(&pool, "web");
    let gw_addr = free_addr();
    let socket = pool.dir.path().join("gw.sock");
    let mut gw = cairn()
        .args(["gateway", "--pool", &pool.addrs(), "--listen", &gw_addr.to_string(), "--socket"])
        .arg(&socket)
        .env("CAIRN_LOG", "warn")
        .spawn()
        .unwrap();
    let url = nbd_url(&gw_addr.to_string(), "web");
    wait_for("the gateway to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(gw_addr).ok().map(|_| ())
    });
    for (round, victim) in [(1u64, 1u64), (2, 2), (3, 3)] {
        write_while_killing(&pool, &url, 64, round, victim, Duration::from_millis(200));
        qemu_io(&url, pattern_cmds("read", 0, 64, round));
        pool.restart(victim);
        pool.wait_in_sync(Duration::from_secs(60));
        verify_on_node(&pool, victim, id, 64, round);
    }
    // The unix socket serves the same volume.
    let unix_url = format!("nbd+unix:///web?socket={}", socket.display());
    qemu_io(&unix_url, pattern_cmds("read", 0, 64, 3));
    pool.assert_converged("web");
    let _ = gw.kill();
    let _ = gw.wait();
}

#[test]
fn a_second_writer_fences_the_first() {
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "mig", "--size", "16M"]);
    // Host A connects and writes; host B connects (nothing changes), writes, and takes over.
    let script = format!(
        r#"
import nbd, errno
a = nbd.NBD(); a.connect_uri("nbd://{a}/mig")
a.pwrite(b"A" * 4096, 0)
b = nbd.NBD(); b.connect_uri("nbd://{b}/mig")
a.pwrite(b"a" * 4096, 4096)          # B only connected: A still writes
assert b.pread(4096, 4096) == b"a" * 4096
b.pwrite(b"B" * 4096, 0)
try:
    a.pwrite(b"X" * 4096, 0)
    print("A-WRITE-SUCCEEDED")
except nbd.Error as e:
    # libnbd gives errno as a name or a number depending on its version.
    print("A-FENCED", e.errno in ("EPERM", errno.EPERM), e.string)
try:
    a.flush()
except nbd.Error:
    pass
assert b.pread(4096, 0) == b"B" * 4096, "fenced write changed data"
print("DATA-OK")
"#,
        a = pool.nbd(1),
        b = pool.nbd(2)
    );
    let (ok, out) = run_tool("/usr/bin/python3", &["-c".to_string(), script], Duration::from_secs(120));
    assert!(ok, "{out}");
    assert!(out.contains("A-FENCED True"), "{out}");
    assert!(out.contains("DATA-OK"), "{out}");
}

/// A flush covers every write acknowledged before it was asked for: also one that was in flight
/// while an earlier flush ran (that flush took the write's PG out of the set of PGs to flush
/// before the write reached the replicas — the later flush found nothing to do and returned at
/// once, leaving the write unsynced), and, on a shared volume, one acknowledged on another
/// connection (NBD `CAN_MULTI_CONN`: each connection had its own set). Checked with every node's
/// `unsynced_chunks` (chunks mutated since their last fdatasync) after each flush.
#[test]
fn a_flush_covers_every_write_acknowledged_before_it() {
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "fl", "--size", "64M", "--shared"]);
    let script = format!(
        r#"
import nbd, json, urllib.request
addrs = {addrs:?}
def unsynced():
    return [json.load(urllib.request.urlopen(f"http://{{a}}/v1/status"))["unsynced_chunks"] for a in addrs]
a = nbd.NBD(); a.connect_uri("nbd://{a}/fl")
b = nbd.NBD(); b.connect_uri("nbd://{a}/fl")
buf = nbd.Buffer.from_bytearray(bytearray(b"w" * 4096))
# Another connection's write (both connections to one server: CAN_MULTI_CONN is per server).
multi = []
for i in range(20):
    a.pwrite(b"m" * 4096, i * 1048576 + 8192)
    b.flush()
    multi.append(sum(unsynced()))
print("MULTI", multi)
# A write in flight while a flush runs, then a flush asked for after both completed.
raced = 0
for i in range(200):
    w = a.aio_pwrite(buf, (i % 64) * 1048576 + (i // 64) * 4096)
    f = a.aio_flush()
    done_w = done_f = False
    while not (done_w and done_f):
        done_w = done_w or a.aio_command_completed(w)
        done_f = done_f or a.aio_command_completed(f)
        if not (done_w and done_f):
            a.poll(-1)
    a.flush()
    if sum(unsynced()) != 0:
        raced += 1
print("RACED", raced)
"#,
        addrs = (1..=3).map(|k| pool.http(k)).collect::<Vec<_>>(),
        a = pool.nbd(1),
    );
    let (ok, out) = run_tool("/usr/bin/python3", &["-c".to_string(), script], Duration::from_secs(180));
    assert!(ok, "{out}");
    assert!(out.contains("MULTI [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"), "{out}");
    assert!(out.contains("RACED 0"), "{out}");
}

#[test]
fn a_corrupt_replica_is_detected_and_repaired() {
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "cv", "--size", "8M"]);
    let id = volume_id(&pool, "cv");
    let url = nbd_url(&pool.nbd(1), "cv");
    qemu_io(&url, vec!["-c".into(), "write -P 0x5a 0 1M".into(), "-c".into(), "flush".into()]);
    // Flip bytes in node 1's copy of chunk 0, block 3 (the data region starts at 8 KiB). Node 1 serves
    // the NBD connection and reads its own replica first, so the damage is met at once.
    let path = pool.data().join(format!("node-1/data/volumes/{id:016x}/0000000000000000.chunk"));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        f.write_all_at(&[0xff, 0x00, 0xff], 8192 + 3 * 4096 + 17).unwrap();
        f.sync_all().unwrap();
    }
    // Every read returns correct data (another replica's), and the bad copy is rewritten.
    let mut cmds = Vec::new();
    for _ in 0..6 {
        cmds.push("-c".to_string());
        cmds.push("read -P 0x5a 0 1M".to_string());
    }
    qemu_io(&url, cmds);
    // Node 1's NBD server read its own replica in-process (the local fast path is wired).
    let (code, status) = pool.get(1, "/v1/status");
    assert_eq!(code, 200);
    assert!(
        status["local_requests"].as_u64().is_some_and(|n| n > 0),
        "node 1 handled no request in-process: {status}"
    );
    // Node 1's copy now reads back correct. (A read goes to node 1 first only while node 1
    // holds a read lease for the chunk's PG; on a loaded machine one may lapse for a moment and
    // the read go elsewhere, so reads go on until one met the bad copy — bounded.)
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node_1_copy = || {
        rt.block_on(async {
            let c = NodeConnection::connect(pool.rpc(1)).await.unwrap();
            let req = Request::Read {
                volume: VolumeId::new(id).unwrap(),
                chunk: ChunkIndex(0),
                chunk_size: ChunkSize::DEFAULT,
                offset: 0,
                len: 1 << 20,
            };
            c.call(&req).await.unwrap()
        })
    };
    wait_for("node 1's copy repaired", Duration::from_secs(30), || match node_1_copy() {
        Response::Read { data, .. } => {
            assert!(data.iter().all(|b| *b == 0x5a), "repaired with wrong data");
            Some(())
        }
        _ => {
            qemu_io(&url, vec!["-c".into(), "read -P 0x5a 0 1M".into()]);
            None
        }
    });
}

/// A node that must copy chunks to a returning peer but cannot read its own copy of one (a corrupt
/// block) copies another in-sync replica's instead, and the rest of the peer's catch-up goes on: the
/// peer is back in sync with every byte (before, the unreadable chunk stopped the whole batch every
/// round and the peer stayed catching up for good).
#[test]
fn an_unreadable_copy_source_does_not_hold_up_a_peers_catch_up() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "uc", "--size", "16M"]);
    let id = volume_id(&pool, "uc");
    let url = nbd_url(&pool.nbd(1), "uc");
    qemu_io(&url, pattern_cmds("write", 0, 8, 1));
    pool.sigkill(3);
    // Written while node 3 is down: nodes 1 and 2 record that it missed chunks 0..8.
    write_flushed(&url, 0, 8, 2);
    // Node 1's copy of chunk 0 (first in its catch-up batch) gets a corrupt block.
    let path = pool.data().join(format!("node-1/data/volumes/{id:016x}/0000000000000000.chunk"));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        f.write_all_at(&[0xff, 0x00, 0xff], 8192 + 5 * 4096 + 9).unwrap();
        f.sync_all().unwrap();
    }
    pool.restart(3);
    pool.wait_in_sync(Duration::from_secs(60));
    verify_on_node(&pool, 3, id, 8, 2);
    // Reading through node 1 repairs its copy; then every replica is identical.
    qemu_io(&url, pattern_cmds("read", 0, 8, 2));
    pool.assert_converged("uc");
}

/// Sends raw bytes to an NBD server and reads what comes back (until EOF or 2 s of silence).
fn raw_exchange(addr: &str, chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for c in chunks {
        let _ = s.write_all(c);
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn request(kind: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Simple replies (magic, error, handle) found in `bytes` after the handshake prefix.
fn simple_errors(bytes: &[u8]) -> Vec<(u32, u64)> {
    let magic = 0x6744_6698u32.to_be_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 16 <= bytes.len() {
        if bytes[i..i + 4] == magic {
            let err = u32::from_be_bytes(bytes[i + 4..i + 8].try_into().unwrap());
            let handle = u64::from_be_bytes(bytes[i + 8..i + 16].try_into().unwrap());
            out.push((err, handle));
            i += 16;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn malformed_nbd_traffic_gets_errors_and_the_server_keeps_serving() {
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "m", "--size", "1M"]);
    let addr = pool.nbd(1);
    let hello = 3u32.to_be_bytes().to_vec(); // fixed newstyle + no zeroes

    // Garbage instead of a handshake: closed, no crash.
    raw_exchange(&addr, &[b"GET / HTTP/1.1\r\n\r\n".to_vec()]);
    // Unknown option: NBD_REP_ERR_UNSUP, then the session goes on to ABORT.
    let got = raw_exchange(&addr, &[hello.clone(), option(99, b""), option(2, b"")]);
    assert!(got.windows(4).any(|w| w == 0x8000_0001u32.to_be_bytes()), "no ERR_UNSUP");
    // GO on an unknown export: NBD_REP_ERR_UNKNOWN with a message.
    let mut go = 5u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"ghost");
    go.extend_from_slice(&0u16.to_be_bytes());
    let got = raw_exchange(&addr, &[hello.clone(), option(7, &go), option(2, b"")]);
    assert!(got.windows(4).any(|w| w == 0x8000_0006u32.to_be_bytes()), "no ERR_UNKNOWN");
    assert!(String::from_utf8_lossy(&got).contains("no volume named"));
    // An option claiming 1 GiB of data: the connection is closed.
    let mut huge = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    huge.extend_from_slice(&7u32.to_be_bytes());
    huge.extend_from_slice(&(1u32 << 30).to_be_bytes());
    raw_exchange(&addr, &[hello.clone(), huge]);

    // A session with bad requests: each gets its error, the session survives until DISC.
    let mut go = 1u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"m");
    go.extend_from_slice(&0u16.to_be_bytes());
    let mut write_beyond = request(1, 0, 3, 1 << 20, 4096);
    write_beyond.extend_from_slice(&[7u8; 4096]);
    let got = raw_exchange(
        &addr,
        &[
            hello.clone(),
            option(7, &go),
            request(0, 0, 1, (1 << 20) - 10, 20), // read beyond the end
            request(0, 0, 2, 0, 0),               // zero length
            write_beyond,                         // write beyond the end (payload consumed)
            request(42, 0, 4, 0, 512),            // unknown command
            request(0, 0x80, 5, 0, 512),          // unknown flag
            request(0, 0, 6, 0, 64 << 20),        // read larger than the maximum
            request(0, 0, 7, 0, 512),             // a good read
            request(2, 0, 8, 0, 0),               // disconnect
        ],
    );
    let replies = simple_errors(&got);
    let errno_of = |h: u64| replies.iter().find(|(_, hh)| *hh == h).map(|(e, _)| *e);
    assert_eq!(errno_of(1), Some(22), "read beyond end: EINVAL");
    assert_eq!(errno_of(2), Some(22), "zero length: EINVAL");
    assert_eq!(errno_of(3), Some(28), "write beyond end: ENOSPC");
    assert_eq!(errno_of(4), Some(22), "unknown command: EINVAL");
    assert_eq!(errno_of(5), Some(22), "unknown flag: EINVAL");
    assert_eq!(errno_of(6), Some(22), "oversized read: EINVAL");
    assert_eq!(errno_of(7), Some(0), "the good read after them succeeds");
    // A truncated request (header cut short) and a bad request magic just close that connection.
    raw_exchange(&addr, &[hello.clone(), option(7, &go), request(0, 0, 1, 0, 512)[..10].to_vec()]);
    let mut bad_magic = request(0, 0, 1, 0, 512);
    bad_magic[0] = 0;
    raw_exchange(&addr, &[hello, option(7, &go), bad_magic]);

    // Other clients never noticed.
    qemu_io(
        &nbd_url(&addr, "m"),
        vec!["-c".into(), "write -P 9 0 4096".into(), "-c".into(), "read -P 9 0 4096".into()],
    );
}

/// Issue scenario 1: a fourth node joins a pool holding data. It enters the balancer's target of
/// most PGs holding nothing: it is filled (a backfill member: every mutation of those PGs names it
/// as having missed it, and their holders copy it every chunk) and serves nothing of them, nor takes
/// part in read-modify-writes, until the end of its catch-up admits it. Every byte reads back right
/// through every node meanwhile, 512-byte writes made during the fill land on every copy, and once
/// admitted the new node holds and serves the same bytes as the others.
#[test]
fn a_node_joining_a_pool_with_data_is_filled_before_it_serves() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "jv", "--size", "96M"]);
    qemu_io(&nbd_url(&pool.nbd(1), "jv"), pattern_cmds("write", 0, 96, 7));
    let id = volume_id(&pool, "jv");
    pool.add_node(4);
    let url = |k| nbd_url(&pool.nbd(k), "jv");
    let targeted = targeted(&pool, 4);
    assert!(targeted > 100, "node 4 entered the target of {targeted} PGs only");
    // Unaligned writes inside the first 64 chunks while it is filled: each is a read-modify-write
    // of one 4 KiB block, through the new node's own NBD server. (The other 32 are not written
    // again: it gets them only from its holders' seeds.)
    let mut cmds = Vec::new();
    for b in 0..64u64 {
        cmds.push("-c".to_string());
        cmds.push(format!("write -P 0xee {} 512", (b << 20) + 1000));
    }
    qemu_io(&url(4), cmds);
    let mut reads = Vec::new();
    for b in 0..64u64 {
        let p = (b + 7) % 251 + 1;
        for c in [
            format!("read -P {p} {} 1000", b << 20),
            format!("read -P 0xee {} 512", (b << 20) + 1000),
            format!("read -P {p} {} {}", (b << 20) + 1512, (1 << 20) - 1512),
        ] {
            reads.push("-c".to_string());
            reads.push(c);
        }
    }
    for k in [2, 4] {
        qemu_io(&url(k), reads.clone());
    }
    // Admitted: a holder of the PGs it entered the target of.
    let held = wait_admitted(&pool, 4, targeted, Duration::from_secs(90));
    pool.wait_in_sync(Duration::from_secs(60));
    let (_, events) = pool.get(1, "/v1/events");
    assert!(
        events.as_array().unwrap().iter().any(|e| e["kind"] == "node.caught_up"
            && e["subject"] == "node 4"
            && e["details"].as_str().unwrap_or("").contains("more placement group")),
        "no admission event: {events}"
    );
    // Its own copies, read from it directly (it serves them now), hold every byte.
    let checked = check_held_copies(&pool, 4, id, &held, 96, |b, data| {
        let p = ((b + 7) % 251 + 1) as u8;
        if b >= 64 {
            return data.iter().all(|x| *x == p);
        }
        data[..1000].iter().all(|x| *x == p)
            && data[1000..1512].iter().all(|x| *x == 0xee)
            && data[1512..].iter().all(|x| *x == p)
    });
    assert!(checked > 30, "node 4 holds only {checked} of the 96 chunks");
    // Its copies were synced as they were installed, and are not dirty (not reported for
    // reconciliation at the next open).
    assert_eq!(pool.get(4, "/v1/status").1["unsynced_chunks"], 0);
    // Writes now reach it as a holder, and every copy agrees.
    qemu_io(&url(1), pattern_cmds("write", 0, 96, 9));
    qemu_io(&url(4), pattern_cmds("read", 0, 96, 9));
    pool.assert_converged("jv");
}

/// A writer routing by a map older than a join (say, cut off from the metadata leader while the
/// new node was filled and admitted) neither sends its mutation to the new member nor names it as
/// having missed it: the old holders, whose maps know the new membership, refuse it ("stale
/// cluster map") instead of acknowledging a write the admitted node would lack. (Without the check
/// the write is applied here, unrecorded for the new member — the simulation of production's data
/// path found it.) A writer with the current map is served.
#[test]
fn a_mutation_routed_by_a_map_older_than_a_join_is_refused() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "iv", "--size", "16M"]);
    qemu_io(&nbd_url(&pool.nbd(1), "iv"), pattern_cmds("write", 0, 16, 3));
    let info = pool.cli_json(&["volume", "info", "iv"]);
    let (id, generation) = (info["id"].as_u64().unwrap(), info["generation"].as_u64().unwrap());
    let intervals = |pool: &Pool| -> Vec<u64> {
        let (_, pgs) = pool.get(1, "/v1/pgs");
        pgs["intervals"]["3"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
    };
    let before = intervals(&pool);
    pool.add_node(4);
    let targeted = targeted(&pool, 4);
    wait_admitted(&pool, 4, targeted, Duration::from_secs(90));
    let after = intervals(&pool);
    let (_, pgs) = pool.get(1, "/v1/pgs");
    let pg_count = pgs["pg_count"].as_u64().unwrap() as u32;
    let volume = VolumeId::new(id).unwrap();
    // A chunk whose PG took node 4 in, and one of its old holders.
    let (chunk, pg) = (0..16u64)
        .map(|c| (c, cairn_types::placement::pg_of(volume, ChunkIndex(c), pg_count).0 as usize))
        .find(|(_, pg)| after[*pg] > before[*pg])
        .expect("node 4 joined the PG of one of the volume's 16 chunks");
    let holders: Vec<u64> =
        pgs["holders"]["3"][pg].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(holders.contains(&4), "{holders:?}");
    let old_holder = holders.iter().copied().find(|h| *h != 4).unwrap();
    let write = |pg_interval: u64| raw_write(volume, chunk, 0, generation, 0x77, pg_interval);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reply = rt.block_on(async {
        let c = NodeConnection::connect(pool.rpc(old_holder)).await.unwrap();
        c.call(&write(before[pg])).await.unwrap()
    });
    match reply {
        Response::Error(RpcError::Unavailable { message }) => {
            assert!(message.contains("changed members since the writer's map"), "{message}")
        }
        other => {
            panic!("node {old_holder} took a mutation routed by the PG's members before the join: {other:?}")
        }
    }
    // Nothing was applied: the volume reads back as written, and a writer with the current map
    // (qemu-io through the new node) writes and reads every copy alike.
    qemu_io(&nbd_url(&pool.nbd(2), "iv"), pattern_cmds("read", 0, 16, 3));
    qemu_io(&nbd_url(&pool.nbd(4), "iv"), pattern_cmds("write", 0, 16, 5));
    qemu_io(&nbd_url(&pool.nbd(1), "iv"), pattern_cmds("read", 0, 16, 5));
    pool.assert_converged("iv");
}

/// The PGs (of the 3-copy set) node `k` holds, once it is filled and admitted (it held none of
/// them but entered the target of at least `targeted`).
fn wait_admitted(pool: &Pool, k: u64, targeted: usize, within: Duration) -> Vec<u64> {
    wait_for(&format!("node {k} to be filled and admitted"), within, || {
        let (_, pgs) = pool.get(1, "/v1/pgs");
        let held: Vec<u64> = (0..pgs["pg_count"].as_u64()?)
            .filter(|pg| pgs["holders"]["3"][*pg as usize].as_array().is_some_and(|r| r.contains(&k.into())))
            .collect();
        let filling = pgs["backfill"]["3"]
            .as_array()?
            .iter()
            .any(|r| r.as_array().is_some_and(|r| r.contains(&k.into())));
        (held.len() >= targeted && !filling).then_some(held)
    })
}

/// How many PGs of the 3-copy set have node `k` among the first three of their target row.
fn targeted(pool: &Pool, k: u64) -> usize {
    let (_, pgs) = pool.get(1, "/v1/pgs");
    pgs["table"].as_array().unwrap().iter().filter(|r| r.as_array().unwrap()[..3].contains(&k.into())).count()
}

/// Checks node `k`'s own copy of every 1 MiB chunk (of the first `chunks`) in a PG it holds
/// with `ok(chunk, data)` (see [`check_copies_on_node`]). Returns how many it checked.
fn check_held_copies(
    pool: &Pool,
    k: u64,
    id: u64,
    held: &[u64],
    chunks: u64,
    ok: impl Fn(u64, &[u8]) -> bool,
) -> usize {
    let pg_count = pool.get(1, "/v1/pgs").1["pg_count"].as_u64().unwrap() as u32;
    let in_held = |b: &u64| {
        let pg = cairn_types::placement::pg_of(VolumeId::new(id).unwrap(), ChunkIndex(*b), pg_count).0;
        held.contains(&u64::from(pg))
    };
    check_copies_on_node(pool, k, id, (0..chunks).filter(in_held), ok)
}

/// A node joins while a writer writes and flushes, and a holder is SIGKILLed during the fill: the
/// workload sees no error, the new node is admitted with the two other holders, the killed one
/// returns without sending it back to catching up, the new node holds every byte of what it holds,
/// the copies converge, and once an original node is lost the new one serves its share.
#[test]
fn a_join_during_writes_with_a_holder_killed_loses_nothing() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "jw", "--size", "96M"]);
    let id = volume_id(&pool, "jw");
    let url = nbd_url(&pool.nbd(1), "jw");
    qemu_io(&url, pattern_cmds("write", 0, 96, 1));
    let mut cmds = Vec::new();
    for start in (0..96).step_by(8) {
        cmds.extend(pattern_cmds("write", start, 8, 2));
        cmds.push("-c".into());
        cmds.push("flush".into());
    }
    let worker = {
        let url = url.clone();
        std::thread::spawn(move || qemu_io(&url, cmds))
    };
    pool.add_node(4);
    // Killed once it has seeded node 4's fill (its missed-writes log holds seeds' entries), most
    // of them not yet copied.
    let log = pool.data().join("node-3/data/missed.log");
    wait_for("node 3 to seed node 4's fill", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).ok().filter(|t| t.contains("\"seed\"")).map(|_| ())
    });
    pool.sigkill(3);
    worker.join().expect("the workload saw an IO error");
    qemu_io(&url, pattern_cmds("read", 0, 96, 2));
    // Admitted while node 3 is down (the two holders up suffice); node 3 comes back with the
    // writes it recorded for node 4 before it died (node 4 may catch up once more for them).
    let held = wait_admitted(&pool, 4, targeted(&pool, 4), Duration::from_secs(120));
    pool.restart(3);
    pool.wait_in_sync(Duration::from_secs(60));
    let checked = check_held_copies(&pool, 4, id, &held, 96, |b, data| {
        let want = ((b + 2) % 251 + 1) as u8;
        data.iter().all(|x| *x == want)
    });
    assert!(checked > 30, "node 4 holds only {checked} of the 96 chunks");
    pool.assert_converged("jw");
    pool.sigkill(1);
    // (Node 1 may have been the metadata leader: the new node's NBD server opens the volume
    // through the pool's API once another leads.)
    wait_for("a leader other than node 1", Duration::from_secs(30), || {
        pool.leader_seen_by(4).filter(|l| *l != 1)
    });
    qemu_io(&nbd_url(&pool.nbd(4), "jw"), pattern_cmds("read", 0, 96, 2));
}

/// A holder SIGKILLed after it seeded a joining node's fill, and back after the node was admitted
/// without it: the entries it seeded were the fill's alone, so they are dropped, and the admitted
/// node does not go back to catching up for them (it did, serving none of its PGs until every
/// seeded chunk had been offered to it again).
#[test]
fn a_holder_back_after_a_fill_ended_does_not_send_the_node_back_to_catching_up() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "js", "--size", "96M"]);
    qemu_io(&nbd_url(&pool.nbd(1), "js"), pattern_cmds("write", 0, 96, 3));
    pool.add_node(4);
    let log = pool.data().join("node-3/data/missed.log");
    wait_for("node 3 to seed node 4's fill", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).ok().filter(|t| t.contains("\"seed\"")).map(|_| ())
    });
    pool.sigkill(3);
    wait_admitted(&pool, 4, targeted(&pool, 4), Duration::from_secs(120));
    let admitted_at =
        pool.get(1, "/v1/events").1.as_array().unwrap().last().unwrap()["seq"].as_u64().unwrap();
    pool.restart(3);
    pool.wait_in_sync(Duration::from_secs(60));
    // Node 3 drops the entries it seeded once its map shows node 4 admitted (its log empties).
    wait_for("node 3 to drop the entries it seeded", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).ok().filter(|t| t.is_empty()).map(|_| ())
    });
    let (_, events) = pool.get(1, "/v1/events");
    let again: Vec<&serde_json::Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["seq"].as_u64().unwrap() > admitted_at
                && e["kind"] == "node.catching_up"
                && e["subject"] == "node 4"
        })
        .collect();
    assert!(again.is_empty(), "node 4 went back to catching up: {again:?}");
    qemu_io(&nbd_url(&pool.nbd(4), "js"), pattern_cmds("read", 0, 96, 3));
    pool.assert_converged("js");
}

/// Resumes a SIGSTOPped process when dropped (also when the test fails), so the pool can stop.
struct Thaw(i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::CONT);
        }
    }
}

/// Issue scenario 5: a node that accepts TCP but never answers (SIGSTOP: the kernel still completes
/// connections). Writes through a healthy node go on with the two others; the healthy nodes are
/// never reported as having missed writes (nothing waits behind the frozen node's connection);
/// once it is thawed, it catches up and holds every byte.
#[test]
fn a_frozen_node_does_not_demote_healthy_ones() {
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "fz", "--size", "32M"]);
    let url = nbd_url(&pool.nbd(1), "fz");
    qemu_io(&url, pattern_cmds("write", 0, 32, 1));
    let pid = pool.pid(3) as i32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::STOP,
    )
    .unwrap();
    let thaw = Thaw(pid);
    write_flushed(&url, 0, 32, 2);
    qemu_io(&nbd_url(&pool.nbd(2), "fz"), pattern_cmds("read", 0, 32, 2));
    let leader = wait_for("a leader among the healthy nodes", Duration::from_secs(30), || {
        [1, 2].into_iter().filter_map(|k| pool.leader_seen_by(k)).find(|l| *l != 3)
    });
    let (status, events) = pool.get(leader, "/v1/events");
    assert_eq!(status, 200);
    let demoted: Vec<&serde_json::Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            matches!(e["kind"].as_str(), Some("node.catching_up" | "node.down"))
                && matches!(e["subject"].as_str(), Some("node 1" | "node 2"))
        })
        .collect();
    assert!(demoted.is_empty(), "healthy nodes were demoted: {demoted:?}");
    drop(thaw);
    pool.wait_in_sync(Duration::from_secs(60));
    verify_on_node(&pool, 3, volume_id(&pool, "fz"), 32, 2);
    pool.assert_converged("fz");
}

/// A four-node pool with a 64 MiB volume `name`: (pool, volume id, the holders of a chunk).
fn four_nodes_and_holders(name: &str) -> (Pool, u64, impl Fn(u64) -> Vec<u64>) {
    let pool = Pool::start(4);
    pool.cli_json(&["volume", "create", name, "--size", "64M"]);
    let id = volume_id(&pool, name);
    let info = pool.cli_json(&["volume", "info", name]);
    let pg_count = pool.get(1, "/v1/pgs").1["pg_count"].as_u64().unwrap() as u32;
    let holders = move |chunk: u64| -> Vec<u64> {
        let pg = cairn_types::placement::pg_of(VolumeId::new(id).unwrap(), ChunkIndex(chunk), pg_count).0;
        let row = info["pgs"].as_array().unwrap().iter().find(|p| p["pg"] == pg).unwrap();
        row["nodes"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect()
    };
    (pool, id, holders)
}

/// Read leases are per PG: in a four-node pool with two nodes (3 and 4) dead, the chunks whose
/// copies lie on both survivors stay readable through them (each vouches for the other), although
/// the PGs that held both dead nodes have no peer left to grant their third holder a lease. With
/// one lease for the whole node, the survivors served no read at all.
#[test]
fn losing_the_peers_of_some_pgs_does_not_stop_reads_of_the_others() {
    let (pool, _, holders) = four_nodes_and_holders("pp");
    let url = nbd_url(&pool.nbd(1), "pp");
    write_flushed(&url, 0, 64, 1);
    let both =
        (0..64).find(|c| holders(*c).contains(&1) && holders(*c).contains(&2)).expect("a chunk on 1 and 2");
    assert!(
        (0..64).any(|c| holders(c).contains(&3) && holders(c).contains(&4)),
        "no PG holds both nodes that die: the test would prove nothing"
    );
    pool.sigkill(3);
    pool.sigkill(4);
    wait_for("nodes 3 and 4 down", Duration::from_secs(30), || {
        let (status, nodes) = pool.get(pool.leader_seen_by(1)?, "/v1/nodes");
        let down = nodes.as_array()?.iter().filter(|n| n["state"] == "down").count();
        (status == 200 && down == 2).then_some(())
    });
    let reader = nbd_url(&pool.nbd(2), "pp");
    qemu_io(&reader, pattern_cmds("read", both, 1, 1));
    qemu_io(&url, pattern_cmds("read", both, 1, 1));
}

/// Issue scenario 2, split-brain on handover. In a 4-node pool, chunk X's PG lies on nodes 1-3 and
/// chunk Y's PG includes node 4. Writer B takes the volume over by writing X; writer A then
/// writes Y. Fencing at open raises B's generation on every replica before B's first write, so
/// A's write is refused by all of Y's replicas (EPERM) and none of them applies it: Y's copies
/// stay identical. (With fencing only as writes arrive, node 4 had not seen B and applied it.)
#[test]
fn a_handover_fences_every_replica_before_the_new_writer_writes() {
    let (pool, id, holders) = four_nodes_and_holders("sb");
    let x = (0..64).find(|c| !holders(*c).contains(&4)).expect("a chunk away from node 4");
    let y = (0..64).find(|c| holders(*c).contains(&4)).expect("a chunk on node 4");
    let script = format!(
        r#"
import nbd, errno
a = nbd.NBD(); a.connect_uri("nbd://{a}/sb")
a.pwrite(b"A" * 4096, {x})
b = nbd.NBD(); b.connect_uri("nbd://{b}/sb")
b.pwrite(b"B" * 4096, {x})
try:
    a.pwrite(b"Y" * 4096, {y})
    print("A-WRITE-SUCCEEDED")
except nbd.Error as e:
    print("A-FENCED", e.errno in ("EPERM", errno.EPERM), e.string)
"#,
        a = pool.nbd(1),
        b = pool.nbd(2),
        x = x << 20,
        y = y << 20,
    );
    let (ok, out) = run_tool("/usr/bin/python3", &["-c".to_string(), script], Duration::from_secs(120));
    assert!(ok, "{out}");
    assert!(out.contains("A-FENCED True"), "{out}");
    // Every replica of Y holds the same bytes: zeros, the fenced write nowhere.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for k in holders(y) {
            let c = NodeConnection::connect(pool.rpc(k)).await.unwrap();
            let req = Request::Read {
                volume: VolumeId::new(id).unwrap(),
                chunk: ChunkIndex(y),
                chunk_size: ChunkSize::DEFAULT,
                offset: 0,
                len: 4096,
            };
            // A PG created a moment ago (with the volume) has its read leases ~0.1 s later.
            let t0 = std::time::Instant::now();
            let mut reply = c.call(&req).await.unwrap();
            while matches!(reply, Response::Error(RpcError::Unavailable { .. }))
                && t0.elapsed() < Duration::from_secs(5)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
                reply = c.call(&req).await.unwrap();
            }
            match reply {
                Response::Read { data, .. } => {
                    assert!(data.iter().all(|b| *b == 0), "node {k} applied the fenced writer's write")
                }
                other => panic!("node {k}: {other:?}"),
            }
        }
    });
    pool.assert_converged("sb");
}

/// `cairn volume verify` proves convergence and catches a replica that differs: one block written
/// straight to one node (bypassing the volume client) makes it fail and name that chunk.
#[test]
fn verify_finds_a_replica_that_differs_and_a_catch_up_brings_it_back() {
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "vf", "--size", "16M"]);
    qemu_io(&nbd_url(&pool.nbd(1), "vf"), pattern_cmds("write", 0, 16, 1));
    pool.assert_converged("vf");
    let info = pool.cli_json(&["volume", "info", "vf"]);
    let id = info["id"].as_u64().unwrap();
    let generation = info["generation"].as_u64().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = NodeConnection::connect(pool.rpc(2)).await.unwrap();
        // (An interval newer than any map: the PG check passes it.)
        let req = raw_write(VolumeId::new(id).unwrap(), 5, 8192, generation, 0x5a, u64::MAX);
        assert!(matches!(c.call(&req).await.unwrap(), Response::Applied { .. }));
    });
    let (ok, report) = pool.verify("vf");
    assert!(!ok, "verify passed over a differing replica: {report}");
    let differing = report["chunks_differing"].as_array().unwrap();
    assert_eq!(differing.len(), 1, "{report}");
    assert_eq!(differing[0]["chunk"], 5);
    // A new writer opens the volume (a new generation committed; its fence round never reaches
    // node 2 here): that write is now what a fenced writer leaves on a replica the new writer
    // could not reach. Nobody recorded it as missed, yet catching up finds the chunk changed
    // lately there and above every in-sync copy, and copies theirs back. (A copy of the current
    // writer's generation is left alone: it differs only by writes in flight.)
    let client = reqwest::blocking::Client::new();
    let url = format!("http://{}/v1/volumes/vf/open", pool.http(1));
    let mut r = client.post(&url).send().unwrap();
    if r.status().as_u16() == 307 {
        let to = r.headers()["location"].to_str().unwrap().to_string();
        r = client.post(to).send().unwrap();
    }
    assert!(r.status().is_success(), "{:?}", r.status());
    send_to_catch_up(&pool, 2);
    pool.wait_in_sync(Duration::from_secs(60));
    pool.assert_converged("vf");
}

/// A 4 KiB write of `byte` straight to one node (bypassing the volume client), as writer
/// `generation` routing by PG interval `pg_interval`, that names nobody as having missed it.
fn raw_write(
    volume: VolumeId,
    chunk: u64,
    offset: u32,
    generation: u64,
    byte: u8,
    pg_interval: u64,
) -> Request {
    let data = vec![byte; 4096];
    Request::Write {
        volume,
        chunk: ChunkIndex(chunk),
        chunk_size: ChunkSize::DEFAULT,
        offset,
        stamp: cairn_proto::Stamp {
            generation: cairn_types::Generation(generation),
            sequence: u64::MAX,
            expect: None,
        },
        crcs: cairn_types::checksum::block_crcs(&data),
        data: data.into(),
        missed_by: Vec::new(),
        pg_interval,
    }
}

/// Asks the pool to make node `k` catch up (`POST /v1/nodes/{k}/catch-up`, as a client reporting
/// a failed write does) and waits until the map shows it.
fn send_to_catch_up(pool: &Pool, k: u64) {
    let client = reqwest::blocking::Client::new();
    let url = format!("http://{}/v1/nodes/{k}/catch-up", pool.http(1));
    let r = client.post(url).send().unwrap();
    assert!(r.status().is_success() || r.status().as_u16() == 307, "{:?}", r.status());
    if r.status().as_u16() == 307 {
        let to = r.headers()["location"].to_str().unwrap().to_string();
        assert!(client.post(to).send().unwrap().status().is_success());
    }
    wait_for(&format!("node {k} catching up"), Duration::from_secs(30), || {
        let nodes = pool.cli_json(&["node", "ls"]);
        nodes.as_array()?.iter().any(|n| n["id"] == k && n["catching_up"] == true).then_some(())
    });
}

/// Issue scenario 4: a node loses its unflushed writes in a power cut. Simulated on a real pool:
/// round 1 is written and flushed, node 2's chunk files are copied aside; round 2 is written
/// (acknowledged, never flushed); node 2 is SIGKILLed, its chunk files are put back as they were
/// at the flush (what a power cut may leave: every chunk changed since is dirty on disk), and its
/// record of the OS boot is made to differ (the machine restarted). On restart it must copy its
/// dirty chunks back from the others before it serves: afterwards its own store holds round 2.
#[test]
fn a_power_cut_node_copies_its_dirty_chunks_back_before_serving() {
    let (mut pool, id) = pool_with_flushed_round_1("pc");
    let saved = save_chunk_files(&pool, 2, id);
    write_round_2_unflushed(&pool, "pc");
    pool.sigkill(2);
    power_cut(&pool, 2, id, &saved);
    pool.restart(2);
    wait_for("node 2's restart to be seen", Duration::from_secs(30), || {
        let leader = [1, 3].into_iter().filter_map(|k| pool.leader_seen_by(k)).next()?;
        let (_, events) = pool.get(leader, "/v1/events");
        events
            .as_array()?
            .iter()
            .any(|e| e["kind"] == "node.restarted" && e["subject"] == "node 2")
            .then_some(())
    });
    pool.wait_in_sync(Duration::from_secs(60));
    // Node 2's own copies, the vanished files included (found by comparing chunk lists).
    verify_on_node(&pool, 2, id, 36, 2);
    qemu_io(&nbd_url(&pool.nbd(2), "pc"), pattern_cmds("read", 0, 36, 2));
    pool.assert_converged("pc");
}

/// Issue scenario 3, two failures in sequence. In a 5-node pool (voters 1-3), chunk X's PG is on
/// nodes 3, 4 and 5. Node 3 dies; X is rewritten (4 and 5 record that 3 missed it); 4 and 5 die;
/// 3 restarts. Nodes 1 and 2 hold nothing for 3, but they are not X's holders: 3 must stay
/// catching up (serving nothing) instead of serving its old copy, until 4 and 5 return and copy it
/// the write it missed.
#[test]
fn a_node_whose_peers_died_after_it_stays_catching_up_until_they_return() {
    let mut pool = Pool::start(5);
    pool.cli_json(&["volume", "create", "sq", "--size", "256M"]);
    let id = volume_id(&pool, "sq");
    let info = pool.cli_json(&["volume", "info", "sq"]);
    let pg_count = pool.get(1, "/v1/pgs").1["pg_count"].as_u64().unwrap() as u32;
    let x = (0..256u64)
        .find(|c| {
            let pg = cairn_types::placement::pg_of(VolumeId::new(id).unwrap(), ChunkIndex(*c), pg_count).0;
            let row = info["pgs"].as_array().unwrap().iter().find(|p| p["pg"] == pg).unwrap();
            let mut nodes: Vec<u64> =
                row["nodes"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
            nodes.sort();
            nodes == [3, 4, 5]
        })
        .expect("a chunk on nodes 3, 4 and 5");
    let url = nbd_url(&pool.nbd(1), "sq");
    qemu_io(&url, pattern_cmds("write", x, 1, 1));
    pool.sigkill(3);
    qemu_io(&url, pattern_cmds("write", x, 1, 2));
    pool.sigkill(4);
    pool.sigkill(5);
    pool.restart(3);
    let node3 = |pool: &Pool| -> Option<serde_json::Value> {
        let leader = [1, 2].into_iter().filter_map(|k| pool.leader_seen_by(k)).next()?;
        let (status, nodes) = pool.get(leader, "/v1/nodes");
        (status == 200).then_some(())?;
        nodes.as_array()?.iter().find(|n| n["id"] == 3).cloned()
    };
    wait_for("node 3 up and catching up", Duration::from_secs(60), || {
        node3(&pool).filter(|n| n["state"] == "up" && n["catching_up"] == true).map(|_| ())
    });
    // Its up peers (1, 2) hold nothing for it, and it must still not be declared caught up.
    let until = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < until {
        if let Some(n) = node3(&pool)
            && n["catching_up"] != true
        {
            let leader = [1, 2].into_iter().filter_map(|k| pool.leader_seen_by(k)).next().unwrap();
            let events = pool.get(leader, "/v1/events").1;
            panic!(
                "node 3 was declared caught up while the peers holding its missed write were down: {events}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    pool.restart(4);
    pool.restart(5);
    wait_for("node 3 caught up", Duration::from_secs(60), || {
        node3(&pool).filter(|n| n["state"] == "up" && n["catching_up"] == false).map(|_| ())
    });
    // Node 3's own copy of X holds round 2, copied from 4 or 5.
    verify_chunks_on_node(&pool, 3, id, x..x + 1, 2);
    pool.wait_in_sync(Duration::from_secs(60));
    pool.assert_converged("sq");
}

/// The whole pool loses power after round 2 was written and flushed — but node 3's flush never
/// reached its disk (a flush is acknowledged once a majority synced): node 3's chunk files go back
/// to round 1, the others keep round 2, every chunk dirty on every node. No replica is in sync to
/// copy from, so each chunk's holders compare their own copies and all take the newest that reads
/// back whole: the pool comes back (before, every node waited for an in-sync replica forever),
/// the flushed round 2 is everywhere, node 3's own copies included, and the replicas are
/// identical.
#[test]
fn a_power_cut_of_the_whole_pool_revives_from_the_holders_own_copies() {
    let (mut pool, id) = pool_with_flushed_round_1("pw");
    let saved = save_chunk_files(&pool, 3, id);
    write_flushed(&nbd_url(&pool.nbd(1), "pw"), 0, 32, 2);
    for k in 1..=3 {
        pool.sigkill(k);
    }
    power_cut(&pool, 3, id, &saved);
    for k in 1..=2 {
        std::fs::write(pool.data().join(format!("node-{k}/data/os-boot-id")), "00000000-power-cut").unwrap();
    }
    for k in 1..=3 {
        pool.restart(k);
    }
    pool.wait_in_sync(Duration::from_secs(90));
    verify_chunks_on_node(&pool, 3, id, 0..32, 2);
    for k in 1..=3 {
        qemu_io(&nbd_url(&pool.nbd(k), "pw"), pattern_cmds("read", 0, 32, 2));
    }
    pool.assert_converged("pw");
}

/// A writer that outlives a power cut of the whole pool (a gateway on a hypervisor host): the
/// mutation it wrote last (acknowledged, never flushed) is gone from every replica, so every
/// replica is behind the version it expects. Nobody failed: the next write fails once (it was
/// built on data that is gone) and the one after it is done over the copies' version. Before,
/// every replica was reported as failing and every write to the chunk failed after 30 s.
#[test]
fn a_writer_that_outlives_a_power_cut_of_every_replica_writes_again() {
    let (mut pool, id) = pool_with_flushed_round_1("pl");
    let saved: Vec<std::path::PathBuf> = (1..=3).map(|k| save_chunk_files(&pool, k, id)).collect();
    let gw_addr = free_addr();
    let mut gw = cairn()
        .args(["gateway", "--pool", &pool.addrs(), "--listen", &gw_addr.to_string()])
        .env("CAIRN_LOG", "warn")
        .spawn()
        .unwrap();
    wait_for("the gateway to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(gw_addr).ok().map(|_| ())
    });
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name).display().to_string();
    let script = format!(
        r#"
import nbd, os, time
h = nbd.NBD(); h.connect_uri("{uri}")
h.pwrite(bytes([0x22]) * 4096, 0)      # acknowledged, never flushed
open("{ready}", "w").close()
deadline = time.time() + 240
while not os.path.exists("{go}") and time.time() < deadline:
    time.sleep(0.05)
for attempt in range(2):
    t = time.time()
    try:
        h.pwrite(bytes([0x33]) * 4096, 4096)
        print("write-ok", attempt, round(time.time() - t, 1), flush=True)
        break
    except nbd.Error as e:
        print("write-error", attempt, round(time.time() - t, 1), e.string, flush=True)
"#,
        uri = nbd_url(&gw_addr.to_string(), "pl"),
        ready = file("ready"),
        go = file("go"),
    );
    let writing = spawn_python(&script);
    wait_for("the unflushed write", Duration::from_secs(60), || {
        std::path::Path::new(&file("ready")).exists().then_some(())
    });
    for k in 1..=3 {
        pool.sigkill(k);
    }
    for (k, saved) in (1..=3).zip(&saved) {
        power_cut(&pool, k, id, saved);
    }
    for k in 1..=3 {
        pool.restart(k);
    }
    pool.wait_in_sync(Duration::from_secs(90));
    std::fs::write(file("go"), b"").unwrap();
    let out = run_to_end_child(writing, Duration::from_secs(120));
    let _ = gw.kill();
    let _ = gw.wait();
    assert!(out.contains("write-ok"), "the writer could not write again: {out}");
    for line in out.lines().filter(|l| l.starts_with("write-error")) {
        let secs: f64 = line.split_whitespace().nth(2).and_then(|t| t.parse().ok()).unwrap_or(f64::MAX);
        assert!(secs < 15.0, "a write failed only after {secs} s: {out}");
    }
    pool.wait_in_sync(Duration::from_secs(30));
    qemu_io(&nbd_url(&pool.nbd(2), "pl"), vec!["-c".into(), "read -P 0x33 4096 4096".into()]);
    pool.assert_converged("pl");
}

/// A 3-node pool with a 36 MiB volume `name` whose first 32 MiB hold round 1, flushed.
fn pool_with_flushed_round_1(name: &str) -> (Pool, u64) {
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", name, "--size", "36M"]);
    let id = volume_id(&pool, name);
    write_flushed(&nbd_url(&pool.nbd(1), name), 0, 32, 1);
    (pool, id)
}

/// Copies node `k`'s chunk files of volume `id` aside (their state at the last flush).
fn save_chunk_files(pool: &Pool, k: u64, id: u64) -> std::path::PathBuf {
    let chunks = pool.data().join(format!("node-{k}/data/volumes/{id:016x}"));
    let saved = pool.dir.path().join(format!("saved-{k}"));
    std::fs::create_dir_all(&saved).unwrap();
    for entry in std::fs::read_dir(&chunks).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "chunk") {
            std::fs::copy(&path, saved.join(path.file_name().unwrap())).unwrap();
        }
    }
    saved
}

/// Round 2 of the 36 one-MiB blocks of `volume` through libnbd, which (unlike qemu) sends no flush
/// when it disconnects: acknowledged, never flushed. Chunks 32-35 are written for the first time.
fn write_round_2_unflushed(pool: &Pool, volume: &str) {
    let mut writes = String::new();
    for b in 0..36u64 {
        writes.push_str(&format!("h.pwrite(bytes([{}]) * 1048576, {})\n", (b + 2) % 251 + 1, b << 20));
    }
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri(\"nbd://{}/{volume}\")\n{writes}print(\"WRITTEN\")\n",
        pool.nbd(1)
    );
    python_prints(script, "WRITTEN", Duration::from_secs(120));
}

/// What a power cut may leave on node `k` (killed): its chunk files of volume `id` as at the last
/// flush (`saved`), each marked dirty (round 2 marked them durably before changing them), the files
/// created since gone (chunks 32-35: their dirty flags with them), and the machine's boot id
/// changed.
fn power_cut(pool: &Pool, k: u64, id: u64, saved: &std::path::Path) {
    let chunks = pool.data().join(format!("node-{k}/data/volumes/{id:016x}"));
    for entry in std::fs::read_dir(saved).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let mut header = cairn_store::ChunkHeader::decode(&bytes[..cairn_store::format::HEADER_LEN]).unwrap();
        header.dirty = true;
        bytes[..cairn_store::format::HEADER_LEN].copy_from_slice(&header.encode());
        std::fs::write(chunks.join(path.file_name().unwrap()), bytes).unwrap();
    }
    for c in 32..36u64 {
        let _ = std::fs::remove_file(chunks.join(format!("{c:016x}.chunk")));
    }
    std::fs::write(pool.data().join(format!("node-{k}/data/os-boot-id")), "00000000-power-cut").unwrap();
}

/// A `--shared` volume takes several writers at once: four connections whose first writes start
/// together (their opens may race: a shared writer fenced by another's open adopts the newer
/// generation instead of failing with EPERM) all write, and every write reads back.
#[test]
fn shared_volume_writers_starting_at_once_all_write() {
    let pool = pool_with_shared_volume("sh");
    let script = format!(
        r#"
import nbd, threading
hs = []
for i in range(4):
    h = nbd.NBD(); h.connect_uri("nbd://{a}/sh"); hs.append(h)
start = threading.Barrier(4)
errors = []
def write(i):
    start.wait()
    try:
        hs[i].pwrite(bytes([i + 1]) * 4096, i * 1048576)
    except nbd.Error as e:
        errors.append((i, e.string))
threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
for i in range(4):
    assert hs[0].pread(4096, i * 1048576) == bytes([i + 1]) * 4096, i
print("SHARED-OK")
"#,
        a = pool.nbd(1)
    );
    python_prints(script, "SHARED-OK", Duration::from_secs(120));
    pool.assert_converged("sh");
}

/// A 3-node pool with a 16 MiB `--shared` volume `name`.
fn pool_with_shared_volume(name: &str) -> Pool {
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", name, "--size", "16M", "--shared"]);
    pool
}

/// Starts a Python (libnbd) script with its output piped (see [`run_to_end_child`]).
fn spawn_python(script: &str) -> std::process::Child {
    std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs a Python (libnbd) script and checks it printed `marker`.
fn python_prints(script: String, marker: &str, within: Duration) {
    let (ok, out) = run_tool("/usr/bin/python3", &["-c".to_string(), script], within);
    assert!(ok && out.contains(marker), "{out}");
}

/// Two writers of a shared volume race on the same chunks while one writer's replica stalls: Y
/// (through node 2, which cannot reach node 1) writes block 0; its copies on nodes 2 and 3 apply
/// it and node 1's never arrives. X (through node 1) writes a sector of block 1 over the version it
/// read, applies it on node 1, meets Y's version on 2 and 3 and settles the chunk — and where X's
/// sibling version is the higher one, installs it over Y's copies. Y then records node 1 as having
/// missed its write and acknowledged it: its block was gone from every replica. The record is now
/// made only if the copy is still at the version the write left there (checked with respect to
/// installs in one step), and an install is refused from a source the node recorded as having
/// missed the chunk; Y's write is done again instead, and both writes are kept.
#[test]
fn a_settle_by_another_shared_writer_never_undoes_an_acknowledged_write() {
    let pool = pool_with_shared_volume("sr");
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name).display().to_string();
    const CHUNKS: usize = 8;
    let script = format!(
        r#"
import nbd, os, time
M = 1 << 20
x = nbd.NBD(); x.connect_uri("{x}")
y = nbd.NBD(); y.connect_uri("{y}")
for c in range({chunks}):
    y.pwrite(bytes([1]) * 4096, c * M)        # Y knows each chunk's version from here
open("{ready}", "w").close()
deadline = time.time() + 60
while not os.path.exists("{go}") and time.time() < deadline:
    time.sleep(0.02)
ys = [y.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([0x59]) * 4096), c * M) for c in range({chunks})]
time.sleep(0.5)
for c in range({chunks}):
    x.pwrite(bytes([0x58]) * 512, c * M + 4096 + 512)   # a read-modify-write of block 1
print("x-done", flush=True)
pending = set(ys)
deadline = time.time() + 90
while pending and time.time() < deadline:
    for cookie in list(pending):
        try:
            if y.aio_command_completed(cookie):
                pending.discard(cookie)
        except nbd.Error as e:
            print("y-error", e.string, flush=True)
            pending.discard(cookie)
    if pending:
        y.poll(1000)
print("y-done", len(pending), flush=True)
"#,
        x = nbd_url(&pool.nbd(1), "sr"),
        y = nbd_url(&pool.nbd(2), "sr"),
        chunks = CHUNKS,
        ready = file("ready"),
        go = file("go"),
    );
    let writing = spawn_python(&script);
    wait_for("Y's first writes", Duration::from_secs(60), || {
        std::path::Path::new(&file("ready")).exists().then_some(())
    });
    let isolation = Isolation::outbound(pool.pid(2), &[pool.rpc(1).port()]);
    std::fs::write(file("go"), b"").unwrap();
    let out = run_to_end_child(writing, Duration::from_secs(120));
    drop(isolation);
    assert!(out.contains("x-done") && out.contains("y-done 0"), "{out}");
    assert!(!out.contains("y-error"), "Y's writes must succeed: {out}");
    // Every chunk holds both writes, read through node 3.
    let check = format!(
        r#"
import nbd
M = 1 << 20
h = nbd.NBD(); h.connect_uri("{uri}")
lost = []
for c in range({chunks}):
    b0 = h.pread(4096, c * M)
    b1 = h.pread(4096, c * M + 4096)
    if b0 != bytes([0x59]) * 4096:
        lost.append(("Y", c, b0[0]))
    if b1[512:1024] != bytes([0x58]) * 512:
        lost.append(("X", c, b1[512]))
print("LOST", lost)
"#,
        uri = nbd_url(&pool.nbd(3), "sr"),
        chunks = CHUNKS,
    );
    python_prints(check, "LOST []", Duration::from_secs(60));
    pool.wait_in_sync(Duration::from_secs(60));
    pool.assert_converged("sr");
}

/// Writers of a shared volume that write different 512-byte sectors of the same 4 KiB blocks at
/// once: each write is a read-modify-write of the block, and it is applied only over the version it
/// read (else done again from a fresh read), so no writer's sectors are lost and every replica ends
/// identical (issue "Replication that stays correct…", item 6).
#[test]
fn shared_writers_of_one_block_lose_no_sector_and_replicas_converge() {
    let pool = pool_with_shared_volume("sb");
    let script = format!(
        r#"
import nbd, threading
uris = ["nbd://{a1}/sb", "nbd://{a2}/sb", "nbd://{a3}/sb", "nbd://{a1}/sb"]
hs = []
for u in uris:
    h = nbd.NBD(); h.connect_uri(u); hs.append(h)
# Blocks in two chunks; writer i owns sectors i and i + 4 of each block.
blocks = [b * 4096 for b in range(4)] + [(1 << 20) + b * 4096 for b in range(4)]
ROUNDS = 24
start = threading.Barrier(4)
errors = []
def write(i):
    start.wait()
    try:
        for r in range(ROUNDS):
            for b in blocks:
                for s in (i, i + 4):
                    hs[i].pwrite(bytes([(i + 1) * 16 + r % 16]) * 512, b + s * 512)
    except nbd.Error as e:
        errors.append((i, e.string))
threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
lost = []
for reader in hs:
    for b in blocks:
        got = reader.pread(4096, b)
        for i in range(4):
            want = bytes([(i + 1) * 16 + (ROUNDS - 1) % 16]) * 512
            for s in (i, i + 4):
                if got[s * 512:(s + 1) * 512] != want:
                    lost.append((b, s, got[s * 512]))
assert not lost, ("sectors lost", len(lost), lost[:8])
print("SECTORS-OK")
"#,
        a1 = pool.nbd(1),
        a2 = pool.nbd(2),
        a3 = pool.nbd(3),
    );
    python_prints(script, "SECTORS-OK", Duration::from_secs(240));
    pool.assert_converged("sb");
}

#[test]
fn deleting_a_volume_removes_its_data_everywhere_and_fails_the_io_of_open_clients() {
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "d", "--size", "16M"]);
    let id = volume_id(&pool, "d");
    let dirs: Vec<std::path::PathBuf> =
        (1..=3).map(|k| pool.data().join(format!("node-{k}/data/volumes/{id:016x}"))).collect();
    let script = format!(
        r#"
import nbd, os, subprocess, time
h = nbd.NBD(); h.connect_uri("nbd://{a}/d")
for i in range(8):
    h.pwrite(bytes([i + 1]) * (1 << 20), i << 20)
h.flush()
for d in {dirs:?}:
    assert os.path.isdir(d), d + " holds no data"
subprocess.run([{bin:?}, "--addr", {addrs:?}, "volume", "rm", "d"], check=True,
               env=dict(os.environ, CAIRN_LOG="off"), stdout=subprocess.DEVNULL)
# The connection that still holds the volume open: every operation fails from now on.
res = {{}}
for op in ("write", "read", "flush"):
    deadline = time.time() + 10
    while True:
        try:
            if op == "write":
                h.pwrite(b"x" * 4096, 0)
            elif op == "read":
                h.pread(4096, 0)
            else:
                h.flush()
        except nbd.Error as e:
            res[op] = "FAILED"
            break
        if time.time() > deadline:
            res[op] = "STILL-ACKNOWLEDGED"
            break
        time.sleep(0.1)
print("RESULT", res["write"], res["read"], res["flush"])
"#,
        a = pool.nbd(1),
        dirs = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
        bin = env!("CARGO_BIN_EXE_cairn"),
        addrs = pool.addrs(),
    );
    let (ok, out) = run_tool("/usr/bin/python3", &["-c".to_string(), script], Duration::from_secs(120));
    assert!(ok, "{out}");
    assert!(out.contains("RESULT FAILED FAILED FAILED"), "{out}");
    // Every node removes the volume's chunks in the background.
    wait_for("the deleted volume's data to go from every node", Duration::from_secs(30), || {
        dirs.iter().all(|d| !d.exists()).then_some(())
    });
    // A new volume of the same name is a new volume: it reads zeros.
    pool.cli_json(&["volume", "create", "d", "--size", "16M"]);
    let out = qemu_io(&nbd_url(&pool.nbd(2), "d"), vec!["-c".into(), "read -P 0 0 8M".into()]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// Bit flips in one replica's blocks that no client reads are found by `cairn scrub` and
/// repaired from the other replicas, every byte verified on that replica afterwards; a second
/// scrub finds nothing.
#[test]
fn scrub_finds_and_repairs_bit_flips_in_blocks_no_client_reads() {
    use std::os::unix::fs::FileExt;
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "scr", "--size", "8M"]);
    write_flushed(&nbd_url(&pool.nbd(1), "scr"), 0, 8, 5);
    let id = volume_id(&pool, "scr");
    // One flipped bit in each of three blocks of node 2's copies, while it runs (past the chunk
    // header and block table: data starts at 8 KiB for 1 MiB chunks).
    let vdir = pool.data().join(format!("node-2/data/volumes/{id:016x}"));
    let flips = [(1u64, 0u64), (1, 200), (6, 17)];
    for (chunk, block) in flips {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(vdir.join(format!("{chunk:016x}.chunk")))
            .unwrap();
        let at = 8192 + block * 4096 + 99;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    }
    // The flips are real: node 2's own copy of chunk 1 no longer reads back.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let read_own = |chunk: u64| {
        rt.block_on(async {
            let c = NodeConnection::connect(pool.rpc(2)).await.unwrap();
            let req = Request::ReadCopy {
                volume: VolumeId::new(id).unwrap(),
                chunk: ChunkIndex(chunk),
                chunk_size: ChunkSize::DEFAULT,
                offset: 0,
                len: 1 << 20,
            };
            c.call(&req).await.unwrap()
        })
    };
    assert!(matches!(read_own(1), Response::Error(RpcError::Corrupt { block: 0, .. })), "{:?}", read_own(1));
    let report = pool.cli_json(&["scrub", "--wait"]);
    let runs: Vec<(u64, &serde_json::Value)> = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["node"].as_u64().unwrap(), &n["run"]))
        .collect();
    assert_eq!(runs.len(), 3, "{report}");
    for (node, run) in &runs {
        let (damaged, repaired) = if *node == 2 { (3, 3) } else { (0, 0) };
        assert_eq!(run["blocks_damaged"], damaged, "node {node}: {report}");
        assert_eq!(run["blocks_repaired"], repaired, "node {node}: {report}");
        assert_eq!(run["blocks_unrepaired"], 0, "node {node}: {report}");
        assert_eq!(run["chunks_checked"], 8, "node {node}: {report}");
        assert_eq!(run["bytes_checked"], 8u64 << 20, "node {node}: {report}");
    }
    verify_chunks_on_node(&pool, 2, id, 0..8, 5);
    pool.assert_converged("scr");
    // Nothing left to find; the status keeps the totals.
    let again = pool.cli_json(&["scrub", "scr", "--wait"]);
    for n in again["nodes"].as_array().unwrap() {
        assert_eq!(n["run"]["blocks_damaged"], 0, "{again}");
        assert_eq!(n["run"]["volume"], id, "{again}");
    }
    // Requests queue in order and every one is served at once, none left for the schedule.
    for _ in 0..2 {
        pool.cli_json(&["scrub"]);
    }
    let third = pool.cli_json(&["scrub", "--wait", "--timeout", "60"]);
    assert_eq!(third["nodes"].as_array().unwrap().len(), 3, "{third}");
    let (status, s) = pool.get(2, "/v1/scrub");
    assert_eq!(status, 200);
    assert_eq!(s["served_through"], s["runs_requested"], "{s}");
    assert_eq!(s["runs_completed"], 5, "{s}");
    assert_eq!(
        (s["blocks_damaged_total"].as_u64(), s["blocks_repaired_total"].as_u64()),
        (Some(3), Some(3)),
        "{s}"
    );
    assert!(s["next_due_ms"].as_u64().is_some(), "a weekly run is scheduled: {s}");
    // An unknown volume is a clear error.
    let (ok, _, err) = pool.cli(&["scrub", "nope", "--wait"]);
    assert!(!ok && err.contains("nope"), "{err}");
    // Every chunk's in-sync copies were compared, by one holder each.
    let sum = |report: &serde_json::Value, key: &str| -> u64 {
        report["nodes"].as_array().unwrap().iter().map(|n| n["run"][key].as_u64().unwrap()).sum()
    };
    assert_eq!(sum(&again, "chunks_compared"), 8, "{again}");
    // A copy that differs with valid checksums (block 10 of node 3's chunk 4, rewritten behind
    // its back, its table entry too) is not damaged, but the comparison finds it.
    let path = pool.data().join(format!("node-3/data/volumes/{id:016x}/{:016x}.chunk", 4));
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let other = vec![0xeeu8; 4096];
    f.write_all_at(&other, 8192 + 10 * 4096).unwrap();
    let mut entry = cairn_types::crc32c(&other).to_le_bytes().to_vec();
    entry.extend_from_slice(&0x3154_4144u32.to_le_bytes()); // "DAT1": holds data
    f.write_all_at(&entry, 4096 + 10 * 8).unwrap();
    drop(f);
    let (ok, out, err) = pool.cli(&["--json", "scrub", "--wait"]);
    assert!(!ok && err.contains("differ"), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let differing: Vec<u64> = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| {
            n["run"]["chunks_differing"].as_array().unwrap().iter().map(|d| d["chunk"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(differing, vec![4], "{report}");
    assert_eq!(sum(&report, "blocks_damaged"), 0, "its checksums hold: {report}");
}

/// Scrub races with writes: one block of every chunk is damaged on node 2 while a client keeps
/// writing other blocks of the same chunks (their versions move under the repairs). A repair
/// goes in only at the version its good copy was read at, so every damaged block ends repaired
/// exactly once with its own data, and every write is there — checked byte by byte on node 2.
#[test]
fn scrub_repairs_under_writes_to_the_same_chunks_keep_every_byte() {
    use std::os::unix::fs::FileExt;
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "sw", "--size", "8M"]);
    let url = nbd_url(&pool.nbd(1), "sw");
    write_flushed(&url, 0, 8, 5);
    let id = volume_id(&pool, "sw");
    let vdir = pool.data().join(format!("node-2/data/volumes/{id:016x}"));
    for chunk in 0..8u64 {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(vdir.join(format!("{chunk:016x}.chunk")))
            .unwrap();
        let at = 8192 + 99; // block 0's data
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    }
    // 4 KiB writes at 64 KiB into every chunk, over and over, while scrubs run.
    let mut cmds = Vec::new();
    for round in 0..40u64 {
        for chunk in 0..8u64 {
            cmds.push("-c".to_string());
            cmds.push(format!("write -P {} {} 4k", 100 + round, (chunk << 20) + 65536));
        }
    }
    cmds.extend(["-c".to_string(), "flush".to_string()]);
    let worker = {
        let url = url.clone();
        std::thread::spawn(move || qemu_io(&url, cmds))
    };
    while !worker.is_finished() {
        // (May fail while writes keep the copies moving: the next run tries again.)
        let _ = pool.cli(&["scrub", "sw", "--wait", "--timeout", "60"]);
    }
    worker.join().expect("the writes saw an IO error");
    let done = pool.cli_json(&["scrub", "sw", "--wait", "--timeout", "60"]);
    for n in done["nodes"].as_array().unwrap() {
        assert_eq!(n["run"]["blocks_unrepaired"], 0, "{done}");
    }
    let (_, s) = pool.get(2, "/v1/scrub");
    assert_eq!(s["blocks_repaired_total"], 8, "each damaged block repaired once: {s}");
    let checked = check_copies_on_node(&pool, 2, id, 0..8, |chunk, data| {
        let old = ((chunk + 5) % 251 + 1) as u8;
        data.iter().enumerate().all(|(i, b)| *b == if (65536..69632).contains(&i) { 139 } else { old })
    });
    assert_eq!(checked, 8);
    pool.assert_converged("sw");
}

#[test]
fn damaged_chunk_files_and_volume_metadata_are_moved_aside_and_restored_from_replicas() {
    let mut pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "dmg", "--size", "8M"]);
    let url = nbd_url(&pool.nbd(1), "dmg");
    write_flushed(&url, 0, 8, 3);
    let id = volume_id(&pool, "dmg");
    pool.sigkill(3);
    let data = pool.data().join("node-3/data");
    let vdir = data.join(format!("volumes/{id:016x}"));
    // Chunk 0: one flipped byte in its header. Chunk 1: truncated (its data region lost).
    // volume.meta: garbage.
    let c0 = vdir.join("0000000000000000.chunk");
    let mut bytes = std::fs::read(&c0).unwrap();
    bytes[20] ^= 0x40;
    std::fs::write(&c0, bytes).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(vdir.join("0000000000000001.chunk"))
        .unwrap()
        .set_len(8192)
        .unwrap();
    std::fs::write(vdir.join("volume.meta"), b"not a volume.meta").unwrap();

    pool.restart(3);
    pool.wait_in_sync(Duration::from_secs(60));
    // Node 3 serves its own, restored copies of the damaged chunks (read straight from it).
    wait_for("node 3 to hold chunks 0 and 1 again", Duration::from_secs(60), || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let c = NodeConnection::connect(pool.rpc(3)).await.ok()?;
            for chunk in 0..2u64 {
                let req = Request::Read {
                    volume: VolumeId::new(id).unwrap(),
                    chunk: ChunkIndex(chunk),
                    chunk_size: ChunkSize::DEFAULT,
                    offset: 0,
                    len: 1 << 20,
                };
                match c.call(&req).await.ok()? {
                    Response::Read { .. } => {}
                    _ => return None,
                }
            }
            Some(())
        })
    });
    verify_chunks_on_node(&pool, 3, id, 0..8, 3);
    pool.assert_converged("dmg");
    // Each damaged file was moved aside once (no loop), kept for inspection.
    let mut aside: Vec<String> = std::fs::read_dir(data.join("damaged"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    aside.sort();
    assert_eq!(aside.len(), 3, "{aside:?}");
    assert!(aside[0].starts_with(&format!("{id:016x}-0000000000000000.chunk-")), "{aside:?}");
    assert!(aside[1].starts_with(&format!("{id:016x}-0000000000000001.chunk-")), "{aside:?}");
    assert!(aside[2].starts_with(&format!("{id:016x}-volume.meta-")), "{aside:?}");
    // And the volume takes writes on node 3 again (its rebuilt fence works).
    write_flushed(&nbd_url(&pool.nbd(3), "dmg"), 0, 8, 4);
    verify_chunks_on_node(&pool, 3, id, 0..8, 4);
}

/// A tmpfs mounted at a directory for the test's lifetime (lazily unmounted when dropped, even if
/// a process still holds files in it).
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(at: &std::path::Path, size: &str) -> SmallFs {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs(at.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

#[test]
fn a_full_node_fails_writes_with_enospc_and_deleting_volumes_rescues_it() {
    let mut pool = Pool::start(3);
    // Node 3's data directory on a 24 MiB file system.
    pool.sigkill(3);
    let data = pool.data().join("node-3/data");
    let saved = pool.data().join("node-3/data.saved");
    std::fs::rename(&data, &saved).unwrap();
    std::fs::create_dir(&data).unwrap();
    let _fs = SmallFs::mount(&data, "24m");
    let copied =
        std::process::Command::new("cp").arg("-a").arg(format!("{}/.", saved.display())).arg(&data).status();
    assert!(copied.unwrap().success());
    pool.restart(3);
    pool.wait_in_sync(Duration::from_secs(60));

    pool.cli_json(&["volume", "create", "big", "--size", "64M"]);
    let url = nbd_url(&pool.nbd(1), "big");
    let args: Vec<String> =
        ["-f", "raw", &url, "-c", "write -P 7 0 48M", "-c", "flush"].iter().map(|s| s.to_string()).collect();
    let (_, out) = run_tool("qemu-io", &args, Duration::from_secs(300));
    // Either node 3 was written to and the write failed with ENOSPC (the other replicas may have
    // applied it), or (if the writer's map still showed node 3 catching up from its restart) the
    // write went to the others. Either way node 3 lacks what they hold, so it must be catching up
    // (serving nothing) rather than an in-sync replica that differs.
    assert!(
        out.contains("No space left on device") || out.contains("wrote"),
        "the write neither failed with ENOSPC nor succeeded: {out}"
    );
    wait_for("node 3 to be catching up (it cannot take the copies)", Duration::from_secs(30), || {
        let (status, nodes) = pool.get(1, "/v1/nodes");
        let n3 = nodes.as_array()?.iter().find(|n| n["id"] == 3)?.clone();
        (status == 200 && n3["catching_up"] == true).then_some(())
    });

    // Deleting the volume frees node 3 (in the background), and the pool takes writes again.
    pool.cli_json(&["volume", "rm", "big"]);
    wait_for("node 3 to free its space", Duration::from_secs(60), || {
        let used: u64 = walk_size(&data.join("volumes"));
        (used < 4 << 20).then_some(())
    });
    pool.wait_in_sync(Duration::from_secs(60));
    pool.cli_json(&["volume", "create", "small", "--size", "8M"]);
    write_flushed(&nbd_url(&pool.nbd(2), "small"), 0, 8, 5);
    let id = volume_id(&pool, "small");
    verify_chunks_on_node(&pool, 3, id, 0..8, 5);
    pool.assert_converged("small");
    pool.sigkill(3);
}

/// Bytes allocated under a directory.
fn walk_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                walk_size(&p)
            } else {
                std::fs::metadata(&p).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0)
            }
        })
        .sum()
}

/// An iptables rule in the INPUT chain for the test's lifetime, deleted by its exact spec when
/// dropped (also when the test fails).
struct DropRule(Vec<String>);

impl DropRule {
    fn add(spec: &[&str]) -> DropRule {
        let spec: Vec<String> = spec.iter().map(|s| s.to_string()).collect();
        let out = std::process::Command::new("iptables").arg("-A").arg("INPUT").args(&spec).output().unwrap();
        assert!(
            out.status.success(),
            "this test adds an iptables rule and needs root and iptables: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        DropRule(spec)
    }
}

impl Drop for DropRule {
    fn drop(&mut self) {
        let _ = std::process::Command::new("iptables").arg("-D").arg("INPUT").args(&self.0).output();
    }
}

/// A three-node pool with an 8 MiB volume `name`: (pool, the metadata leader, another node).
fn pool_with_volume_and_leader(name: &str) -> (Pool, u64, u64) {
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", name, "--size", "8M"]);
    let leader = wait_for("a leader", Duration::from_secs(30), || pool.leader_seen_by(1));
    let other = (1..=3).find(|k| *k != leader).unwrap();
    (pool, leader, other)
}

#[test]
fn a_one_way_partition_of_the_leader_keeps_the_pool_writable_and_heals_within_seconds() {
    let (pool, leader, other) = pool_with_volume_and_leader("p");
    let write = |round: u64| {
        write_flushed(&nbd_url(&pool.nbd(other), "p"), 0, 8, round);
    };
    write(1);

    // Nothing reaches the leader's RPC port any more; the leader still reaches everyone.
    let port = pool.rpc(leader).port().to_string();
    let rule = DropRule::add(&["-i", "lo", "-p", "tcp", "--dport", &port, "-j", "DROP"]);
    write(2);
    // The leader keeps hearing the others (it asks them), so it never declares them down: watched
    // for longer than the down timeout (5 s).
    let watch = std::time::Instant::now();
    while watch.elapsed() < Duration::from_secs(7) {
        let (status, nodes) = pool.get(leader, "/v1/nodes");
        if status == 200 {
            for n in nodes.as_array().unwrap() {
                if n["id"] != leader {
                    assert_eq!(n["state"], "up", "the leader declared a node it reaches down: {nodes}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    write(3);

    // Healed: back in sync within seconds (stalled connections are replaced, not waited out).
    drop(rule);
    let healed = std::time::Instant::now();
    pool.wait_in_sync(Duration::from_secs(60));
    assert!(healed.elapsed() < Duration::from_secs(20), "took {:?} to heal", healed.elapsed());
    let id = volume_id(&pool, "p");
    for k in 1..=3 {
        verify_chunks_on_node(&pool, k, id, 0..8, 3);
    }
    pool.assert_converged("p");
}

/// A node cut off from the other nodes in both directions for the test's lifetime: nothing
/// reaches its RPC port, and nothing it sends to the given ports of other nodes leaves it. All nodes
/// share 127.0.0.1, so its outgoing packets are told apart by their sockets: the connections it
/// holds now (matched by their source ports, read from /proc) and every socket it opens later
/// (its process is moved into a cgroup of its own, matched by iptables' `cgroup` module). Its
/// HTTP and NBD ports stay reachable, so the test can watch it. Every rule is deleted by its exact
/// spec and the cgroup removed when dropped.
struct Isolation {
    rules: Vec<(&'static str, Vec<String>)>,
    cgroup: std::path::PathBuf,
    pid: u32,
}

const CGROUP2: &str = "/sys/fs/cgroup/unified";

impl Isolation {
    fn of(pid: u32, own_rpc: u16, peers_rpc: &[u16]) -> Isolation {
        Isolation::cut(pid, Some(own_rpc), peers_rpc)
    }

    /// Only what the node sends to other nodes' RPC ports is dropped: they still reach it, and
    /// it still answers them (replies leave through sockets it accepted, outside the cgroup).
    fn outbound(pid: u32, peers_rpc: &[u16]) -> Isolation {
        Isolation::cut(pid, None, peers_rpc)
    }

    fn cut(pid: u32, own_rpc: Option<u16>, peers_rpc: &[u16]) -> Isolation {
        let name = format!("cairn-test-{pid}");
        let cgroup = std::path::Path::new(CGROUP2).join(&name);
        std::fs::create_dir_all(&cgroup)
            .unwrap_or_else(|e| panic!("this test needs a writable cgroup2 hierarchy at {CGROUP2}: {e}"));
        let mut iso = Isolation { rules: Vec::new(), cgroup: cgroup.clone(), pid };
        std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()).unwrap();
        for port in peers_rpc.iter().map(|p| p.to_string()) {
            iso.add(
                "OUTPUT",
                &["-m", "cgroup", "--path", &name, "-p", "tcp", "--dport", &port, "-j", "DROP"],
            );
        }
        if let Some(own) = own_rpc.map(|p| p.to_string()) {
            iso.add("INPUT", &["-i", "lo", "-p", "tcp", "--dport", &own, "-j", "DROP"]);
            iso.add("OUTPUT", &["-o", "lo", "-p", "tcp", "--sport", &own, "-j", "DROP"]);
        }
        // Connections the node opened before it moved into the cgroup keep their old one.
        for port in outgoing_ports(pid, peers_rpc) {
            iso.add("OUTPUT", &["-o", "lo", "-p", "tcp", "--sport", &port.to_string(), "-j", "DROP"]);
        }
        iso
    }

    fn add(&mut self, chain: &'static str, spec: &[&str]) {
        let spec: Vec<String> = spec.iter().map(|s| s.to_string()).collect();
        let out = std::process::Command::new("iptables").arg("-A").arg(chain).args(&spec).output().unwrap();
        assert!(
            out.status.success(),
            "iptables -A {chain} {spec:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.rules.push((chain, spec));
    }
}

impl Drop for Isolation {
    fn drop(&mut self) {
        for (chain, spec) in &self.rules {
            let _ = std::process::Command::new("iptables").arg("-D").arg(chain).args(spec).output();
        }
        // Back to the root cgroup (if it still runs), then the empty cgroup can go.
        let _ = std::fs::write(std::path::Path::new(CGROUP2).join("cgroup.procs"), self.pid.to_string());
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// Local ports of `pid`'s TCP connections to any of `remote_ports` on loopback.
fn outgoing_ports(pid: u32, remote_ports: &[u16]) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let target = std::fs::read_link(e.ok()?.path()).ok()?;
            let t = target.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9
                && inodes.contains(f[9])
                && let (Some(local), Some(remote)) = (port(f[1]), port(f[2]))
                && remote_ports.contains(&remote)
            {
                ports.push(local);
            }
        }
    }
    ports
}

/// A full, two-way isolation of the metadata leader: the others elect a new leader and keep the
/// pool writable (through another node) within seconds; the isolated leader answers no
/// linearizable read (it cannot confirm its leadership); once healed it follows the new leader,
/// catches up and holds every write, and the replicas are identical.
#[test]
fn a_fully_isolated_leader_is_replaced_and_rejoins_within_seconds() {
    let (pool, leader, writer) = pool_with_volume_and_leader("iso");
    let url = nbd_url(&pool.nbd(writer), "iso");
    write_flushed(&url, 0, 8, 1);

    let peers: Vec<u16> = (1..=3).filter(|k| *k != leader).map(|k| pool.rpc(k).port()).collect();
    let isolation = Isolation::of(pool.pid(leader), pool.rpc(leader).port(), &peers);
    let cut = std::time::Instant::now();
    let new_leader = wait_for("the others to elect a new leader", Duration::from_secs(20), || {
        pool.leader_seen_by(writer).filter(|l| *l != leader)
    });
    write_flushed(&url, 0, 8, 2);
    qemu_io(&url, pattern_cmds("read", 0, 8, 2));
    eprintln!("new leader {new_leader}, pool written again {:?} after the cut", cut.elapsed());
    // The old leader cannot confirm its leadership: it answers no linearizable read (503, or a
    // redirect once it has stepped down), never stale metadata.
    wait_for("the isolated node to stop answering as leader", Duration::from_secs(20), || {
        let (status, _) = pool.get(leader, "/v1/volumes");
        (status != 200).then_some(())
    });

    drop(isolation);
    let healed = std::time::Instant::now();
    pool.wait_in_sync(Duration::from_secs(60));
    assert!(healed.elapsed() < Duration::from_secs(20), "took {:?} to heal", healed.elapsed());
    wait_for("the old leader to follow the new one", Duration::from_secs(20), || {
        pool.leader_seen_by(leader).filter(|l| *l != leader)
    });
    let id = volume_id(&pool, "iso");
    for k in 1..=3 {
        verify_chunks_on_node(&pool, k, id, 0..8, 2);
    }
    pool.assert_converged("iso");
}

/// I2 across a partition: a node cut off from every other node (both directions of its RPC port,
/// and what it sends to their HTTP ports) while a client of another node writes. The writes are
/// acknowledged without it — and a reader that holds a connection to the cut-off node's NBD
/// server must not be served the old data: the node's read lease (granted by its PG peers, who
/// stop granting once they recorded a write it missed, and hold back that write's acknowledgement
/// until the last lease they granted has run out) lapses, so the node refuses to serve reads and
/// the reader gets an error instead of stale bytes.
#[test]
fn a_node_cut_off_from_the_pool_serves_no_stale_read() {
    let (pool, leader, writer) = pool_with_volume_and_leader("ls");
    let cut = (1..=3).find(|k| *k != leader && *k != writer).unwrap();
    write_flushed(&nbd_url(&pool.nbd(writer), "ls"), 0, 1, 1);
    // A reader connected through the node to be cut off: it reads block 0 (round 1: bytes of 2),
    // then again once told to (round 2 would be bytes of 3).
    let dir = tempfile::tempdir().unwrap();
    let (ready, go) = (dir.path().join("ready"), dir.path().join("go"));
    let script = format!(
        r#"
import nbd, os, time
h = nbd.NBD(); h.connect_uri("{uri}")
print("first", h.pread(4096, 0)[0], flush=True)
open("{ready}", "w").close()
deadline = time.time() + 120
while not os.path.exists("{go}") and time.time() < deadline:
    time.sleep(0.05)
try:
    print("second", h.pread(4096, 0)[0], flush=True)
except Exception as e:
    print("error", e, flush=True)
"#,
        uri = nbd_url(&pool.nbd(cut), "ls"),
        ready = ready.display(),
        go = go.display()
    );
    let child = spawn_python(&script);
    wait_for("the reader's first read", Duration::from_secs(30), || ready.exists().then_some(()));
    let others: Vec<u64> = (1..=3).filter(|k| *k != cut).collect();
    let mut ports: Vec<u16> = others.iter().map(|k| pool.rpc(*k).port()).collect();
    ports.extend(others.iter().map(|k| pool.http(*k).rsplit(':').next().unwrap().parse::<u16>().unwrap()));
    let isolation = Isolation::of(pool.pid(cut), pool.rpc(cut).port(), &ports);
    write_flushed(&nbd_url(&pool.nbd(writer), "ls"), 0, 1, 2);
    // Round 2 is acknowledged. Through the cut-off node: an error, or round 2 — never round 1.
    std::fs::write(&go, b"").unwrap();
    let out = run_to_end_child(child, Duration::from_secs(150));
    assert!(out.contains("first 2"), "{out}");
    assert!(
        !out.contains("second 2"),
        "the cut-off node served the data of before an acknowledged write: {out}"
    );
    drop(isolation);
    pool.wait_in_sync(Duration::from_secs(60));
    qemu_io(&nbd_url(&pool.nbd(cut), "ls"), pattern_cmds("read", 0, 1, 2));
    pool.assert_converged("ls");
}

/// The other half of the read lease: a node that can no longer be reached by a writer's node (its
/// packets to the node's RPC and HTTP ports are dropped) but still talks with everyone else keeps renewing
/// its lease until its peers record the write it missed — so they hold that write's
/// acknowledgement back until the lease they last granted has run out. A reader hammering the
/// node's NBD server never gets the old data once the write is acknowledged (it gets the new data
/// from another replica). Without the hold-back, the node served its old copy for as long as it
/// took to learn from the metadata that it must catch up.
#[test]
fn a_write_is_acknowledged_only_once_the_node_that_missed_it_serves_no_reads() {
    // The node that misses the write is the metadata leader and the writer's node cannot reach it
    // at all, so the writer cannot report the failure: the leader learns it from the peers'
    // reports (within a second or so), and its own copy must not be served meanwhile.
    let (pool, missing, writer) = pool_with_volume_and_leader("lh");
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name).display().to_string();
    // The writer holds its connection (it opened the volume for writing and wrote block 0 with
    // bytes of 2) before the cut; then it writes bytes of 3 and prints when that was acknowledged.
    let writer_script = format!(
        r#"
import nbd, os, time
h = nbd.NBD(); h.connect_uri("{uri}")
h.pwrite(bytes([2]) * 4096, 0); h.flush()
open("{ready}", "w").close()
deadline = time.time() + 90
while not os.path.exists("{go}") and time.time() < deadline:
    time.sleep(0.02)
h.pwrite(bytes([3]) * 4096, 0)
print("acked", time.time(), flush=True)
"#,
        uri = nbd_url(&pool.nbd(writer), "lh"),
        ready = file("w-ready"),
        go = file("w-go"),
    );
    let reader_script = format!(
        r#"
import nbd, os, time
h = nbd.NBD(); h.connect_uri("{uri}")
deadline = time.time() + 90
while not os.path.exists("{go}") and time.time() < deadline:
    t = time.time()
    try:
        print("read", t, h.pread(4096, 0)[0], flush=True)
    except Exception as e:
        print("error", t, e, flush=True)
    open("{ready}", "a").close()
    time.sleep(0.02)
"#,
        uri = nbd_url(&pool.nbd(missing), "lh"),
        ready = file("r-ready"),
        go = file("r-go"),
    );
    let python = spawn_python;
    let writing = python(&writer_script);
    wait_for("the writer's first write", Duration::from_secs(30), || {
        std::path::Path::new(&file("w-ready")).exists().then_some(())
    });
    let reading = python(&reader_script);
    wait_for("the reader's first read", Duration::from_secs(30), || {
        std::path::Path::new(&file("r-ready")).exists().then_some(())
    });
    let http = pool.http(missing).rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let isolation = Isolation::outbound(pool.pid(writer), &[pool.rpc(missing).port(), http]);
    std::fs::write(file("w-go"), b"").unwrap();
    let written = run_to_end_child(writing, Duration::from_secs(60));
    let acknowledged: f64 = written
        .lines()
        .find_map(|l| l.strip_prefix("acked ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("the write was not acknowledged: {written}"));
    // Keep reading for a while after the acknowledgement.
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(file("r-go"), b"").unwrap();
    let out = run_to_end_child(reading, Duration::from_secs(30));
    let reads: Vec<(f64, String)> = out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let kind = f.next()?;
            let t: f64 = f.next()?.parse().ok()?;
            Some((t, if kind == "read" { f.next()?.to_string() } else { "error".into() }))
        })
        .collect();
    assert!(reads.iter().any(|(t, v)| *t < acknowledged && v == "2"), "{out}");
    let after: Vec<&(f64, String)> = reads.iter().filter(|(t, _)| *t > acknowledged).collect();
    assert!(!after.is_empty(), "no read after the acknowledgement: {out}");
    let stale: Vec<&&(f64, String)> = after.iter().filter(|(_, v)| v == "2").collect();
    assert!(stale.is_empty(), "old data read after the write was acknowledged: {stale:?}");
    drop(isolation);
    pool.wait_in_sync(Duration::from_secs(60));
    pool.assert_converged("lh");
}

/// Waits (bounded) for a child to exit and returns its stdout and stderr; kills it past the limit.
fn run_to_end_child(mut child: std::process::Child, within: Duration) -> String {
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A node that can be reached but cannot reach its peers (its outgoing packets dropped) and is
/// sent to catch up: its catch-up ends (the leader reaches it, and it has no chunk changed lately
/// to compare), but its serving barrier cannot lift (it cannot ask its peers), so it is sent back
/// to catching up after 10 s without serving — and then waits longer each time (10 s, 20 s, …)
/// instead of flipping every ~11 s (clients retry writes it refuses during each in-sync phase).
/// Once healed it serves again, takes writes, and the replicas are identical.
#[test]
fn a_node_that_cannot_reach_its_peers_backs_off_instead_of_flipping() {
    let (pool, leader, stuck) = pool_with_volume_and_leader("bo");
    let writer = (1..=3).find(|k| *k != leader && *k != stuck).unwrap();
    let url = nbd_url(&pool.nbd(writer), "bo");
    let peers: Vec<u16> = (1..=3).filter(|k| *k != stuck).map(|k| pool.rpc(k).port()).collect();
    let isolation = Isolation::outbound(pool.pid(stuck), &peers);
    let events = |since: u64| -> Vec<serde_json::Value> {
        let (ok, out, err) = pool.cli(&["--json", "events", "--since", &since.to_string()]);
        assert!(ok, "{err}");
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let from = events(0).iter().filter_map(|e| e["seq"].as_u64()).max().unwrap_or(0);
    send_to_catch_up(&pool, stuck);
    let began = std::time::Instant::now();
    while began.elapsed() < Duration::from_secs(55) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let flips = events(from)
        .iter()
        .filter(|e| e["kind"] == "node.catching_up" && e["subject"] == format!("node {stuck}"))
        .count();
    // Without backoff: at 0 s and every ~11 s after (5 in 55 s). With it: at 0 s, ~11 s, ~32 s.
    assert!((2..=3).contains(&flips), "node {stuck} was sent to catch up {flips} times in 55 s");

    drop(isolation);
    pool.wait_in_sync(Duration::from_secs(60));
    write_flushed(&url, 0, 8, 1);
    let id = volume_id(&pool, "bo");
    for k in 1..=3 {
        verify_chunks_on_node(&pool, k, id, 0..8, 1);
    }
    pool.assert_converged("bo");
}

/// A flapping partition: nothing reaches one node's RPC port for 1.5 s, then everything does for
/// 1.5 s, ten times over, while a client on another node keeps writing and flushing. Every write
/// succeeds (the flapping node is left out and recorded as having missed them, or takes them),
/// and once the flapping stops the pool heals by itself: every node holds the last round, and
/// the replicas are identical.
#[test]
fn a_flapping_partition_loses_no_write_and_heals() {
    let pool = Pool::start(3);
    pool.cli_json(&["volume", "create", "fl", "--size", "8M"]);
    let leader = wait_for("a leader", Duration::from_secs(30), || pool.leader_seen_by(1));
    let flapping = (1..=3).find(|k| *k != leader).unwrap();
    let writer = (1..=3).find(|k| *k != flapping).unwrap();
    let port = pool.rpc(flapping).port().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flapper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for _ in 0..10 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let rule = DropRule::add(&["-i", "lo", "-p", "tcp", "--dport", &port, "-j", "DROP"]);
                std::thread::sleep(Duration::from_millis(1500));
                drop(rule);
                std::thread::sleep(Duration::from_millis(1500));
            }
        })
    };
    let url = nbd_url(&pool.nbd(writer), "fl");
    let mut round = 1;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(30) && !flapper.is_finished() {
        write_flushed(&url, 0, 8, round);
        qemu_io(&url, pattern_cmds("read", 0, 8, round));
        round += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    flapper.join().unwrap();
    let last = round - 1;
    assert!(last >= 3, "only {last} rounds were written while the partition flapped");
    pool.wait_in_sync(Duration::from_secs(60));
    let id = volume_id(&pool, "fl");
    for k in 1..=3 {
        verify_chunks_on_node(&pool, k, id, 0..8, last);
    }
    pool.assert_converged("fl");
}
