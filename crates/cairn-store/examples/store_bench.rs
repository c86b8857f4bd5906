//! Chunk-store microbenchmark, single process, single thread, with a baseline measured in the same run.
//!
//! Workloads over a 256 MiB volume (default 1 MiB chunks):
//! * 4 KiB random writes, a flush every 64 writes: Cairn store vs pwrite + fdatasync every 64 on one
//!   raw file of the same size in the same directory;
//! * 4 KiB random reads of the prefilled volume: Cairn store vs pread of the raw file.
//!
//! Usage: cargo run --release -p cairn-store --example store_bench -- [DIR] [OPS]
//! DIR defaults to a temporary directory under ./target (the same disk as the build).

use cairn_store::{Store, StoreConfig, WriteStamp};
use cairn_types::checksum::block_crcs;
use cairn_types::{ChunkIndex, ChunkSize, Generation, VolumeId};
use rand::{Rng, SeedableRng};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const VOLUME_BYTES: u64 = 256 << 20;
const BS: usize = 4096;
const FLUSH_EVERY: usize = 64;

struct Stats {
    ops: usize,
    total: Duration,
    lat: Vec<Duration>,
}

impl Stats {
    fn iops(&self) -> f64 {
        self.ops as f64 / self.total.as_secs_f64()
    }
    fn mean_us(&self) -> f64 {
        self.total.as_secs_f64() * 1e6 / self.ops as f64
    }
    fn p99_us(&mut self) -> f64 {
        self.lat.sort();
        self.lat[self.lat.len() * 99 / 100].as_secs_f64() * 1e6
    }
}

fn run(ops: usize, mut op: impl FnMut(usize)) -> Stats {
    let mut lat = Vec::with_capacity(ops);
    let start = Instant::now();
    for i in 0..ops {
        let t = Instant::now();
        op(i);
        lat.push(t.elapsed());
    }
    Stats { ops, total: start.elapsed(), lat }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let base = match args.get(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from("target"),
    };
    let ops: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(20_000);
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::tempdir_in(&base)?;
    let store = Store::open(&dir.path().join("store"), StoreConfig::default())?;
    let raw =
        OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("raw"))?;
    raw.set_len(VOLUME_BYTES)?;
    let volume = VolumeId::new(1)?;
    let chunk_size = ChunkSize::DEFAULT;
    let cs = u64::from(chunk_size.bytes());
    let stamp = WriteStamp { generation: Generation(1), sequence: 0, expect: None };
    let blocks = VOLUME_BYTES / BS as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let offsets: Vec<u64> = (0..ops).map(|_| rng.random_range(0..blocks) * BS as u64).collect();
    let mut buf = vec![0u8; BS];
    rng.fill(&mut buf[..]);
    let crcs = block_crcs(&buf);

    let mut store_write = run(ops, |i| {
        let off = offsets[i];
        let r = store.write(volume, ChunkIndex(off / cs), chunk_size, (off % cs) as u32, &buf, &crcs, stamp);
        assert!(r.is_ok(), "{r:?}");
        if (i + 1) % FLUSH_EVERY == 0 {
            assert!(store.flush(volume).is_ok());
        }
    });
    let mut raw_write = run(ops, |i| {
        assert!(raw.write_all_at(&buf, offsets[i]).is_ok());
        if (i + 1) % FLUSH_EVERY == 0 {
            assert!(rustix::fs::fdatasync(&raw).is_ok());
        }
    });

    // Prefill everything so that reads return data, then read at random.
    let fill = vec![0x5au8; cs as usize];
    let fill_crcs = block_crcs(&fill);
    for c in 0..VOLUME_BYTES / cs {
        store.write(volume, ChunkIndex(c), chunk_size, 0, &fill, &fill_crcs, stamp)?;
        raw.write_all_at(&fill, c * cs)?;
    }
    store.flush(volume)?;
    rustix::fs::fdatasync(&raw)?;
    let mut store_read = run(ops, |i| {
        let off = offsets[i];
        let r = store.read(volume, ChunkIndex(off / cs), chunk_size, (off % cs) as u32, BS as u32);
        assert!(r.is_ok(), "{r:?}");
    });
    let mut out = vec![0u8; BS];
    let mut raw_read = run(ops, |i| {
        assert!(raw.read_exact_at(&mut out, offsets[i]).is_ok());
    });

    println!("chunk store, {ops} ops of 4 KiB at random over {} MiB, one thread", VOLUME_BYTES >> 20);
    println!("{:<36} {:>10} {:>10} {:>10} {:>10}", "workload", "IOPS", "mean µs", "p99 µs", "vs raw");
    let write_ratio = store_write.iops() / raw_write.iops();
    let read_ratio = store_read.iops() / raw_read.iops();
    for (name, s, ratio) in [
        ("randwrite 4K, flush/64: cairn-store", &mut store_write, format!("{write_ratio:.2}")),
        ("randwrite 4K, flush/64: raw file", &mut raw_write, "1.00".to_string()),
        ("randread 4K: cairn-store", &mut store_read, format!("{read_ratio:.2}")),
        ("randread 4K: raw file", &mut raw_read, "1.00".to_string()),
    ] {
        println!("{:<36} {:>10.0} {:>10.1} {:>10.1} {:>10}", name, s.iops(), s.mean_us(), s.p99_us(), ratio);
    }
    Ok(())
}
