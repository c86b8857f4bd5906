//! Deterministic-network simulation (turmoil) of the metadata layer: three voters running the real
//! `MetaService` (openraft + redb on disk) over turmoil's simulated TCP, under partitions, message
//! loss and crash-restarts, for many seeds. Checked:
//!
//! * at most one leader per term;
//! * no committed change is lost: every volume whose creation was acknowledged exists on every node
//!   at the end, and all nodes converge to the same state;
//! * generations acknowledged to a client strictly increase, and never exceed what the state knows.
//!
//! turmoil fixes the network's randomness per seed; openraft draws its election timeouts from its
//! own random source, so a failing seed narrows a bug down rather than replaying it exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cairn_meta::network::{PeerReply, PeerRequest, PeerTransport};
use cairn_meta::state::{ClusterState, Command, CommandResult};
use cairn_meta::{MetaConfig, MetaError, MetaService, NodeAddr};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 9000;
const NODES: u64 = 3;

#[derive(Debug, Serialize, Deserialize)]
enum SimRequest {
    Peer(PeerRequest),
    Propose(Command),
    Inspect,
}

#[derive(Debug, Serialize, Deserialize)]
enum SimReply {
    Peer(PeerReply),
    /// The result, or an error with the leader's id if the node knows it.
    Proposed(Result<CommandResult, (String, Option<u64>)>),
    State(Box<ClusterState>),
}

async fn exchange(host: &str, request: &SimRequest, timeout: Duration) -> Result<SimReply, String> {
    let fut = async {
        let mut s = turmoil::net::TcpStream::connect((host, PORT)).await.map_err(|e| e.to_string())?;
        let body = cairn_meta::network::encode(request)?;
        s.write_u32(body.len() as u32).await.map_err(|e| e.to_string())?;
        s.write_all(&body).await.map_err(|e| e.to_string())?;
        let len = s.read_u32().await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        cairn_meta::network::decode(&buf)
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| "timeout".to_string())?
}

#[derive(Debug, Clone)]
struct SimTransport;

impl PeerTransport for SimTransport {
    fn call(
        &self,
        addr: &NodeAddr,
        request: PeerRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<PeerReply, String>> + Send {
        let host = addr.rpc.clone();
        async move {
            match exchange(&host, &SimRequest::Peer(request), timeout).await? {
                SimReply::Peer(r) => Ok(r),
                _ => Err("unexpected reply".into()),
            }
        }
    }
}

fn addr(id: u64) -> NodeAddr {
    NodeAddr { rpc: format!("n{id}"), http: format!("n{id}:1"), nbd: format!("n{id}:2") }
}

/// Leaders observed, per term.
type Leaders = Arc<Mutex<BTreeMap<u64, BTreeSet<u64>>>>;

async fn run_node(id: u64, dir: PathBuf, leaders: Leaders) -> turmoil::Result {
    let config = MetaConfig { down_after_ms: 3000, ..MetaConfig::default() };
    let meta = MetaService::start(
        id,
        addr(id),
        &dir.join("meta.redb"),
        SimTransport,
        config,
        Arc::new(|| cairn_meta::service::Probe { capacity_bytes: 1 << 30, ..Default::default() }),
    )
    .await
    .map_err(|e| e.to_string())?;
    let voters: BTreeMap<u64, NodeAddr> = (1..=NODES).map(|i| (i, addr(i))).collect();
    meta.bootstrap(voters).await.map_err(|e| e.to_string())?;
    // Record who leads in which term, as every node sees itself.
    let watch = meta.clone();
    tokio::spawn(async move {
        let mut metrics = watch.raft().metrics();
        loop {
            {
                let m = metrics.borrow_and_update();
                if m.state == openraft::ServerState::Leader {
                    leaders.lock().unwrap().entry(m.current_term).or_default().insert(m.id);
                }
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    });
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    loop {
        let (mut s, _) = listener.accept().await?;
        let meta = meta.clone();
        tokio::spawn(async move {
            let Ok(len) = s.read_u32().await else { return };
            let mut buf = vec![0u8; len as usize];
            if s.read_exact(&mut buf).await.is_err() {
                return;
            }
            let Ok(request) = cairn_meta::network::decode::<SimRequest>(&buf) else { return };
            let reply = match request {
                SimRequest::Peer(p) => SimReply::Peer(meta.handle_peer(p).await),
                SimRequest::Propose(c) => SimReply::Proposed(meta.propose(c).await.map_err(|e| match e {
                    MetaError::NotLeader { leader } => ("not leader".to_string(), leader.map(|l| l.0)),
                    other => (other.to_string(), None),
                })),
                SimRequest::Inspect => SimReply::State(Box::new(meta.read(|s| s.clone()))),
            };
            let body = cairn_meta::network::encode(&reply).unwrap();
            let _ = s.write_u32(body.len() as u32).await;
            let _ = s.write_all(&body).await;
        });
    }
}

#[derive(Debug, Default)]
struct Acked {
    volumes: Vec<String>,
    generations: Vec<u64>,
}

fn simulate(seed: u64) {
    let dirs: Vec<tempfile::TempDir> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
    let leaders: Leaders = Arc::default();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let done = Arc::new(Mutex::new(false));
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .tick_duration(Duration::from_millis(5))
        .rng_seed(seed)
        .fail_rate(0.002)
        .repair_rate(0.3)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .build();
    for id in 1..=NODES {
        let dir = dirs[(id - 1) as usize].path().to_path_buf();
        let leaders = leaders.clone();
        sim.host(format!("n{id}"), move || run_node(id, dir.clone(), leaders.clone()));
    }
    let client_acked = acked.clone();
    let client_done = done.clone();
    sim.client("client", async move {
        let mut n = 0u64;
        let mut target_id = 1u64;
        // Propose a stream of changes to whichever node accepts them, for 40 s of simulated time.
        let start = tokio::time::Instant::now();
        while start.elapsed() < Duration::from_secs(40) {
            n += 1;
            let target = format!("n{target_id}");
            let have_v1 = client_acked.lock().unwrap().volumes.iter().any(|v| v == "v1");
            let command = if n.is_multiple_of(3) && have_v1 {
                Command::OpenVolume { name: "v1".into(), time_ms: n, after: None }
            } else {
                Command::CreateVolume {
                    name: if have_v1 { format!("v{n}") } else { "v1".into() },
                    size_bytes: 1 << 20,
                    chunk_size_bytes: 1 << 20,
                    replicas: 1,
                    shared: false,
                    time_ms: n,
                }
            };
            let r = exchange(&target, &SimRequest::Propose(command.clone()), Duration::from_secs(8)).await;
            if std::env::var("CAIRN_SIM_DEBUG").is_ok() {
                eprintln!(
                    "{:?} {target}: {:?}",
                    start.elapsed(),
                    r.as_ref().map(|r| format!("{r:?}").chars().take(100).collect::<String>())
                );
            }
            match &r {
                Ok(SimReply::Proposed(Err((_, Some(leader))))) => target_id = *leader,
                Ok(SimReply::Proposed(Ok(_))) => {}
                _ => target_id = target_id % NODES + 1,
            }
            if let Ok(SimReply::Proposed(Ok(CommandResult::Volume(v)))) = r {
                let mut a = client_acked.lock().unwrap();
                match command {
                    Command::OpenVolume { .. } => a.generations.push(v.generation),
                    _ => a.volumes.push(v.name),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        *client_done.lock().unwrap() = true;
        Ok(())
    });

    // Inject faults while the client runs: partitions, repairs, crash-restarts.
    let mut rng_state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let mut steps = 0u64;
    let mut crashed: Option<String> = None;
    while !*done.lock().unwrap() {
        sim.step().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        steps += 1;
        if steps.is_multiple_of(400) {
            // Every 2 s of simulated time.
            let a = format!("n{}", next() % NODES + 1);
            let b = format!("n{}", next() % NODES + 1);
            match next() % 5 {
                0 if a != b => sim.partition(a.as_str(), b.as_str()),
                1 => sim.repair("n1", "n2"),
                2 => {
                    sim.repair("n1", "n3");
                    sim.repair("n2", "n3");
                }
                3 if crashed.is_none() => {
                    sim.crash(a.as_str());
                    crashed = Some(a);
                }
                _ => {
                    if let Some(h) = crashed.take() {
                        sim.bounce(h.as_str());
                    }
                }
            }
        }
        assert!(steps < 1_000_000, "seed {seed}: simulation did not finish");
    }
    // Heal everything and let the pool settle, then compare every node's state.
    if let Some(h) = crashed.take() {
        sim.bounce(h.as_str());
    }
    for (a, b) in [("n1", "n2"), ("n1", "n3"), ("n2", "n3")] {
        sim.repair(a, b);
    }
    sim.set_fail_rate(0.0);
    let states: Arc<Mutex<Vec<ClusterState>>> = Arc::default();
    let checker_states = states.clone();
    let acked_final = acked.clone();
    sim.client("checker", async move {
        // Wait until every node has applied every acknowledged change and they agree.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut got = Vec::new();
            for id in 1..=NODES {
                if let Ok(SimReply::State(s)) =
                    exchange(&format!("n{id}"), &SimRequest::Inspect, Duration::from_secs(2)).await
                {
                    got.push(*s);
                }
            }
            let expected = acked_final.lock().unwrap().volumes.len();
            let converged = got.len() == NODES as usize
                && got.iter().all(|s| s.volumes.values().filter(|v| v.name != "v1").count() >= expected)
                && got
                    .windows(2)
                    .all(|w| w[0].volumes == w[1].volumes && w[0].last_generation == w[1].last_generation);
            if converged || tokio::time::Instant::now() > deadline {
                *checker_states.lock().unwrap() = got;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    sim.run().unwrap_or_else(|e| panic!("seed {seed}: {e}"));

    // At most one leader per term.
    for (term, ids) in leaders.lock().unwrap().iter() {
        assert!(ids.len() <= 1, "seed {seed}: term {term} had leaders {ids:?}");
    }
    let acked = acked.lock().unwrap();
    let states = states.lock().unwrap();
    assert_eq!(states.len(), NODES as usize, "seed {seed}: a node never answered after healing");
    for (i, s) in states.iter().enumerate() {
        for name in &acked.volumes {
            assert!(
                s.volumes.contains_key(name),
                "seed {seed}: node {} lost acknowledged volume {name}",
                i + 1
            );
        }
        if let Some(g) = acked.generations.last() {
            assert!(s.last_generation >= *g, "seed {seed}: node {} forgot generation {g}", i + 1);
        }
    }
    assert!(
        states.windows(2).all(|w| w[0].volumes == w[1].volumes),
        "seed {seed}: nodes disagree on volumes"
    );
    assert!(
        acked.generations.windows(2).all(|w| w[0] < w[1]),
        "seed {seed}: generations not strictly increasing: {:?}",
        acked.generations
    );
    assert!(!acked.volumes.is_empty(), "seed {seed}: no change was ever committed");
    eprintln!(
        "seed {seed}: {} volumes and {} generations acknowledged, {} terms",
        acked.volumes.len(),
        acked.generations.len(),
        leaders.lock().unwrap().len()
    );
}

#[test]
fn metadata_survives_partitions_loss_and_crashes() {
    let seeds: u64 = std::env::var("CAIRN_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    for seed in 0..seeds {
        simulate(seed);
    }
}
