//! `cairn up`: a complete local pool in one directory, for a first look and for development.
//!
//! Every storage node runs as its own child process (`cairn node run --config …`) so that it can be
//! killed and restarted like a production node. `cairn up` never restarts a node that died: failures
//! must be real; `cairn node run --config DIR/node-K/node.toml` brings it back.
//!
//! ```text
//! DIR/pool.json          {"nodes":[{"id":1,"pid":…,"rpc":"127.0.0.1:7400","nbd":"nbd://127.0.0.1:7401","http":"http://127.0.0.1:7402"}…]}
//! DIR/node-K/node.toml   node K's configuration (written on first start, reused afterwards)
//! DIR/node-K/data/       node K's chunks and metadata
//! DIR/node-K/node.log    node K's log
//! ```
//!
//! Ports derive from `--port-base P`: node K listens on P + 10·(K−1) (RPC), + 1 (NBD) and + 2 (HTTP).
//! The first three nodes (or the only one) are the metadata voters; the others join as learners.

use crate::api::Api;
use anyhow::{Context, bail};
use cairn_node::NodeConfig;
use cairn_node::config::{IN_FLIGHT_BYTES_DEFAULT, Member, MetaSection};
use cairn_types::NodeId;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the pool may take to become healthy.
/// Prints a status line; a closed stdout (e.g. `cairn up | head`) must not stop the pool.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

const POOL_START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `cairn up` waits, once every node is up, for every node to serve client IO.
const SERVING_WAIT: Duration = Duration::from_secs(30);
/// How long stopping may take before `cairn up` gives up waiting.
const POOL_STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// Most nodes `cairn up` starts (ports must fit under 65536 and a laptop has limits).
const NODES_MAX: usize = 64;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Directory holding the pool's configuration and data (created if missing).
    #[arg(long, default_value = "cairn-data")]
    dir: PathBuf,
    /// Number of storage nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// First TCP port; node K uses port-base + 10·(K−1) .. + 2.
    #[arg(long, default_value_t = 7400)]
    port_base: u16,
}

#[derive(Debug, Serialize, Deserialize)]
struct PoolNode {
    id: u64,
    pid: u32,
    rpc: String,
    nbd: String,
    http: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct PoolJson {
    nodes: Vec<PoolNode>,
}

fn write_pool_json(path: &Path, pool: &PoolJson) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(pool)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Called by `cairn node run`: if the node belongs to a `cairn up` directory, record its new pid.
pub fn record_pid(config_path: &Path, id: u64) {
    let Some(pool_path) = config_path.parent().and_then(Path::parent).map(|d| d.join("pool.json")) else {
        return;
    };
    let Ok(text) = std::fs::read_to_string(&pool_path) else { return };
    let Ok(mut pool) = serde_json::from_str::<PoolJson>(&text) else { return };
    if let Some(n) = pool.nodes.iter_mut().find(|n| n.id == id) {
        n.pid = std::process::id();
        if let Err(e) = write_pool_json(&pool_path, &pool) {
            tracing::warn!("updating {}: {e:#}", pool_path.display());
        }
    }
}

fn member(port_base: u16, k: usize) -> anyhow::Result<Member> {
    let port = |off: usize| -> anyhow::Result<SocketAddr> {
        let p = usize::from(port_base) + 10 * (k - 1) + off;
        let p = u16::try_from(p).context("--port-base too high for this many nodes")?;
        Ok(SocketAddr::from(([127, 0, 0, 1], p)))
    };
    Ok(Member { id: k as u64, rpc: port(0)?, nbd: port(1)?, http: port(2)? })
}

fn send_signal(pid: u32, signal: rustix::process::Signal) -> bool {
    match i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        Some(p) => rustix::process::kill_process(p, signal).is_ok(),
        None => false,
    }
}

fn alive(pid: u32) -> bool {
    match i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        Some(p) => rustix::process::test_kill_process(p).is_ok(),
        None => false,
    }
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    if !(1..=NODES_MAX).contains(&args.nodes) {
        bail!("--nodes must be between 1 and {NODES_MAX}");
    }
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize().with_context(|| format!("resolving {}", args.dir.display()))?;
    let voters_n = if args.nodes >= 3 { 3 } else { 1 };
    let members: Vec<Member> =
        (1..=args.nodes).map(|k| member(args.port_base, k)).collect::<anyhow::Result<_>>()?;
    let voters: Vec<Member> = members[..voters_n].to_vec();

    let exe = std::env::current_exe().context("finding the cairn executable")?;
    let mut children: Vec<(u64, PathBuf, Child)> = Vec::new();
    let mut pool = PoolJson { nodes: Vec::new() };
    let result = (|| -> anyhow::Result<()> {
        for (k, m) in members.iter().enumerate() {
            let node_dir = dir.join(format!("node-{}", k + 1));
            std::fs::create_dir_all(&node_dir).with_context(|| format!("creating {}", node_dir.display()))?;
            let config_path = node_dir.join("node.toml");
            if !config_path.exists() {
                let config = NodeConfig {
                    node_id: NodeId::new(m.id)?,
                    data_dir: node_dir.join("data"),
                    rpc_listen_addr: m.rpc,
                    http_listen_addr: Some(m.http),
                    nbd_listen_addr: Some(m.nbd),
                    open_files_max: 1024,
                    in_flight_bytes_max: IN_FLIGHT_BYTES_DEFAULT,
                    meta: MetaSection {
                        voters: voters.clone(),
                        join: if k < voters_n { Vec::new() } else { voters.iter().map(|v| v.rpc).collect() },
                        ..MetaSection::default()
                    },
                    limits: Default::default(),
                    scrub: Default::default(),
                };
                std::fs::write(&config_path, config.to_toml())
                    .with_context(|| format!("writing {}", config_path.display()))?;
            }
            let config = NodeConfig::load(&config_path)?;
            let log_path = node_dir.join("node.log");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("opening {}", log_path.display()))?;
            let child = Command::new(&exe)
                .args(["node", "run", "--config"])
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting storage node {}", m.id))?;
            pool.nodes.push(PoolNode {
                id: config.node_id.get(),
                pid: child.id(),
                rpc: config.rpc_listen_addr.to_string(),
                nbd: format!("nbd://{}", config.nbd_addr()),
                http: format!("http://{}", config.http_addr()),
            });
            children.push((config.node_id.get(), config_path, child));
        }
        write_pool_json(&dir.join("pool.json"), &pool)?;
        wait_healthy(&pool, &mut children)
    })();
    if let Err(e) = result {
        for (_, _, c) in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        return Err(e);
    }
    for n in &pool.nodes {
        say!("node {}  rpc {}  nbd {}  http {}", n.id, n.rpc, n.nbd, n.http);
    }
    say!("pool is up: {} nodes, data in {}; Ctrl-C stops it", pool.nodes.len(), dir.display());
    supervise(&dir, children)
}

/// Waits until every node is registered and up, as the metadata leader sees it.
fn wait_healthy(pool: &PoolJson, children: &mut [(u64, PathBuf, Child)]) -> anyhow::Result<()> {
    let addrs: Vec<String> = pool.nodes.iter().map(|n| n.http.clone()).collect();
    let api = Api::new(Some(&addrs.join(",")))?;
    let deadline = Instant::now() + POOL_START_TIMEOUT;
    let mut last;
    loop {
        for (id, config, c) in children.iter_mut() {
            if let Some(status) = c.try_wait()? {
                let log = config.with_file_name("node.log");
                bail!("storage node {id} exited during startup ({status}); see {}", log.display());
            }
        }
        match api.get::<serde_json::Value>("/v1/nodes") {
            Ok(nodes) => {
                let up =
                    nodes.as_array().map(|a| a.iter().filter(|n| n["state"] == "up").count()).unwrap_or(0);
                if up == pool.nodes.len() {
                    wait_serving(pool);
                    return Ok(());
                }
                last = format!("{up} of {} nodes up", pool.nodes.len());
            }
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("the pool did not become healthy within {POOL_START_TIMEOUT:?}: {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (at most [`SERVING_WAIT`]) until every node serves client IO — in sync, and holding a
/// read lease from its peers (`/v1/status` `serving_clients`) — so that IO right after "pool is
/// up" is served by every node. A node still catching up after a restart of the pool may take
/// longer: then the pool is announced anyway, naming it.
fn wait_serving(pool: &PoolJson) {
    let deadline = Instant::now() + SERVING_WAIT;
    loop {
        let waiting: Vec<u64> = pool
            .nodes
            .iter()
            .filter(|n| {
                let serving = Api::new(Some(&n.http))
                    .and_then(|a| a.get::<serde_json::Value>("/v1/status"))
                    .is_ok_and(|s| s["serving_clients"] == true);
                !serving
            })
            .map(|n| n.id)
            .collect();
        if waiting.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let ids: Vec<String> = waiting.iter().map(|i| i.to_string()).collect();
            say!(
                "node(s) {} do not serve client IO yet (catching up, or no read lease from their peers); see GET /v1/status",
                ids.join(", ")
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs until SIGINT/SIGTERM, reporting nodes that exit, then stops every node of the pool.
fn supervise(dir: &Path, mut children: Vec<(u64, PathBuf, Child)>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut reported = std::collections::BTreeSet::new();
    rt.block_on(async {
        let stop = crate::wait_for_stop_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                r = &mut stop => return r,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    for (id, config, c) in children.iter_mut() {
                        if !reported.contains(id) && let Ok(Some(status)) = c.try_wait() {
                            reported.insert(*id);
                            eprintln!(
                                "node {id} exited ({status}); it is not restarted automatically: cairn node run --config {}",
                                config.display()
                            );
                        }
                    }
                }
            }
        }
    })?;
    // Stop every node of the pool, including ones restarted by hand (pool.json has their pids).
    let pids: Vec<u32> = std::fs::read_to_string(dir.join("pool.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<PoolJson>(&t).ok())
        .map(|p| p.nodes.iter().map(|n| n.pid).collect())
        .unwrap_or_default();
    for pid in &pids {
        send_signal(*pid, rustix::process::Signal::TERM);
    }
    for (_, _, c) in &children {
        send_signal(c.id(), rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + POOL_STOP_TIMEOUT;
    loop {
        let mut running = 0;
        for (_, _, c) in children.iter_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                running += 1;
            }
        }
        running +=
            pids.iter().filter(|p| !children.iter().any(|(_, _, c)| c.id() == **p) && alive(**p)).count();
        if running == 0 {
            say!("pool stopped");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{running} node(s) still running after {POOL_STOP_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
