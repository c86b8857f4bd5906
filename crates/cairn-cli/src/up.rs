//! `cairn up`: a local pool in one directory, for a first look and for development.
//!
//! For now the pool is one storage node run as a child process (`cairn node run`), so that it can be
//! killed and restarted like a production node. Layout:
//!
//! ```text
//! DIR/node-1/node.toml   the node's configuration (written on first start, reused afterwards)
//! DIR/node-1/data/       the node's data directory
//! ```
//!
//! Ports derive from `--port-base P`: node K's RPC listens on 127.0.0.1:(P + 10·(K-1)), leaving
//! room for each node's NBD and HTTP ports at P + 10·(K-1) + 1 and + 2.

use anyhow::{Context, bail};
use cairn_node::NodeConfig;
use cairn_types::NodeId;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How long a node may take to start listening.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Directory holding the pool's configuration and data (created if missing).
    #[arg(long, default_value = "cairn-data")]
    dir: PathBuf,
    /// First TCP port; every other port derives from it.
    #[arg(long, default_value_t = 7400)]
    port_base: u16,
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.dir.display()))?;
    let node_dir = dir.join("node-1");
    std::fs::create_dir_all(&node_dir).with_context(|| format!("creating {}", node_dir.display()))?;
    let config_path = node_dir.join("node.toml");
    if !config_path.exists() {
        let config = NodeConfig {
            node_id: NodeId::new(1)?,
            data_dir: node_dir.join("data"),
            rpc_listen_addr: SocketAddr::from(([127, 0, 0, 1], args.port_base)),
            open_files_max: 1024,
            in_flight_bytes_max: cairn_node::config::IN_FLIGHT_BYTES_DEFAULT,
        };
        std::fs::write(&config_path, config.to_toml())
            .with_context(|| format!("writing {}", config_path.display()))?;
    }
    let config = NodeConfig::load(&config_path)?;
    let exe = std::env::current_exe().context("finding the cairn executable")?;
    let mut child = Command::new(exe)
        .args(["node", "run", "--config"])
        .arg(&config_path)
        .spawn()
        .context("starting storage node 1")?;
    if let Err(e) = wait_listening(&mut child, config.rpc_listen_addr) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    println!(
        "node 1  rpc {}  data {}",
        config.rpc_listen_addr,
        config.data_dir.display()
    );
    println!("pool is up; Ctrl-C stops it");

    let pid = child.id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut child_exit = tokio::task::spawn_blocking(move || child.wait());
        tokio::select! {
            r = crate::wait_for_stop_signal() => {
                r?;
                // A terminal's Ctrl-C reaches the child too; `kill` of this process does not.
                terminate(pid)?;
                let status = (&mut child_exit).await?.context("waiting for storage node 1")?;
                println!("pool stopped (node 1: {status})");
                Ok(())
            }
            exit = &mut child_exit => {
                let status = exit?.context("waiting for storage node 1")?;
                bail!(
                    "storage node 1 exited ({status}); restart it with: cairn node run --config {}",
                    config_path.display()
                )
            }
        }
    })
}

/// Sends SIGTERM to a child process.
fn terminate(pid: u32) -> anyhow::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .context("invalid child pid")?;
    match rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e).context("stopping storage node 1"),
    }
}

fn wait_listening(child: &mut Child, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + NODE_START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("storage node 1 exited during startup ({status}); see its error above");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("storage node 1 did not start listening on {addr} within {NODE_START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
