//! `cairn`: the command line of a Cairn pool.
//!
//! Errors are printed as one line starting with `error:` and the exit status is 1.

/// `println!` for command output: when stdout is a pipe whose reader went away (`cairn events |
/// head`), the command ends quietly with success instead of panicking.
macro_rules! outln {
    () => {
        $crate::out_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out_line(format_args!($($arg)*))
    };
}

mod api;
mod commands;
mod scrub;
mod up;
mod verify;

use anyhow::Context;
use cairn_node::{Node, NodeConfig};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "cairn", version, about = "Cairn: a scale-out storage pool for virtual-machine disks")]
struct Cli {
    /// Admin API address(es) of the pool, comma separated (else CAIRN_ADDR, else ./cairn-data/pool.json).
    #[arg(long, global = true)]
    addr: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local pool with its data under one directory, in the foreground (Ctrl-C stops it).
    Up(up::UpArgs),
    /// Pool health: nodes, leader, volumes.
    Status,
    /// Serve NBD on a hypervisor host that holds no storage, talking to the storage nodes directly.
    Gateway {
        /// Admin API addresses of pool nodes, comma separated.
        #[arg(long)]
        pool: String,
        /// TCP address to serve NBD on (e.g. 127.0.0.1:10809).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Unix socket to serve NBD on.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Storage node commands.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Volume commands.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Check every block every node stores against its checksum now, repairing damaged ones from
    /// an in-sync replica (the weekly background scrub, on demand).
    Scrub {
        /// Only this volume (default: every volume).
        volume: Option<String>,
        /// Wait until every node has finished, print what each found, and fail if a damaged
        /// block could not be repaired.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Print the pool's events (with --follow, keep printing new ones).
    Events {
        #[arg(long)]
        follow: bool,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Run a storage node until SIGTERM or SIGINT.
    Run {
        /// The node's configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// List the pool's nodes.
    Ls,
    /// Make a metadata learner a voter (it must be up and hold the metadata log).
    Promote { id: u64 },
    /// Make a metadata voter a learner (e.g. before rebuilding its lost metadata; see
    /// docs/operations.md). A majority of the voters must stay up.
    Demote { id: u64 },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume.
    Create {
        name: String,
        /// Size with optional K/M/G/T suffix (binary), a multiple of 4K.
        #[arg(long)]
        size: String,
        /// Copies of every block, 1 to 5 (default 3).
        #[arg(long)]
        replicas: Option<u8>,
        /// Chunk size, a power of two from 64K to 64M (default 1M).
        #[arg(long)]
        chunk_size: Option<String>,
        /// Allow several writers at once (cluster file systems, multi-job benchmarks).
        #[arg(long)]
        shared: bool,
        /// Warn when the pool's provisioned bytes (size × replicas of every volume) exceed this
        /// many times its raw capacity.
        #[arg(long, env = "CAIRN_OVERCOMMIT_LIMIT", default_value_t = 2.0)]
        overcommit_limit: f64,
    },
    /// List volumes.
    Ls,
    /// Show a volume and where its data lives.
    Info { name: String },
    /// Change a volume's size.
    Resize {
        name: String,
        #[arg(long)]
        size: String,
        /// Allow making the volume smaller (destroys the data beyond the new end).
        #[arg(long)]
        allow_shrink: bool,
        /// As for `create`.
        #[arg(long, env = "CAIRN_OVERCOMMIT_LIMIT", default_value_t = 2.0)]
        overcommit_limit: f64,
    },
    /// Delete a volume and its data.
    Rm { name: String },
    /// Compare every replica of every chunk (which blocks hold data, their checksums); fails if
    /// any differ or cannot be read.
    Verify { name: String },
}

/// An error and its causes on one line, each cause named once (many messages already include
/// their cause).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line = format!("{line}: {cause}");
        }
    }
    line.replace('\n', " ")
}

/// Writes one line of command output (see `outln!`).
pub fn out_line(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.write_all(b"\n")).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing the output: {e}");
        std::process::exit(1);
    }
}

/// The log filter without `CAIRN_LOG`. openraft reports every failed replication attempt to an
/// unreachable peer (several lines a second while a node is down); Cairn's own liveness says that
/// once (`node.down`), so openraft speaks only of errors, and its replication loop not at all.
const DEFAULT_LOG_FILTER: &str = "info,openraft=error,openraft::replication=off";

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .init();
    let json = cli.json;
    let api = || api::Api::new(cli.addr.as_deref());
    let result = match cli.command {
        Command::Up(args) => up::run(args),
        Command::Node { command: NodeCommand::Run { config } } => run_node(config),
        Command::Node { command: NodeCommand::Ls } => api().and_then(|a| commands::node_ls(&a, json)),
        Command::Node { command: NodeCommand::Promote { id } } => {
            api().and_then(|a| commands::node_set_voter(&a, id, true, json))
        }
        Command::Node { command: NodeCommand::Demote { id } } => {
            api().and_then(|a| commands::node_set_voter(&a, id, false, json))
        }
        Command::Status => api().and_then(|a| commands::status(&a, json)),
        Command::Gateway { pool, listen, socket } => run_gateway(&pool, listen, socket),
        Command::Scrub { volume, wait, timeout } => api().and_then(|a| {
            scrub::run(&a, volume.as_deref(), wait, std::time::Duration::from_secs(timeout), json)
        }),
        Command::Events { follow, since } => api().and_then(|a| commands::events(&a, follow, since, json)),
        Command::Volume { command } => api().and_then(|a| match command {
            VolumeCommand::Create { name, size, replicas, chunk_size, shared, overcommit_limit } => {
                let chunk = chunk_size.as_deref();
                commands::volume_create(&a, &name, &size, replicas, chunk, shared, overcommit_limit, json)
            }
            VolumeCommand::Ls => commands::volume_ls(&a, json),
            VolumeCommand::Info { name } => commands::volume_info(&a, &name, json),
            VolumeCommand::Resize { name, size, allow_shrink, overcommit_limit } => {
                commands::volume_resize(&a, &name, &size, allow_shrink, overcommit_limit, json)
            }
            VolumeCommand::Rm { name } => commands::volume_rm(&a, &name, json),
            VolumeCommand::Verify { name } => verify::run(&a, &name, json),
        }),
    };
    if let Err(e) = result {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Store calls run on the blocking pool; bound it so a flood of requests cannot spawn
        // thousands of threads (requests beyond this wait in the pool's queue, itself bounded by each
        // connection's in-flight byte budget).
        .max_blocking_threads(64)
        .build()
        .context("starting the async runtime")
}

fn run_node(config_path: PathBuf) -> anyhow::Result<()> {
    let config = NodeConfig::load(&config_path)?;
    runtime()?.block_on(async {
        let node = Node::start(&config).await?;
        tracing::info!(
            node = %config.node_id,
            rpc = %node.rpc_addr(),
            http = %node.http_addr(),
            data_dir = %config.data_dir.display(),
            "storage node running"
        );
        up::record_pid(&config_path, config.node_id.get());
        wait_for_stop_signal().await?;
        tracing::info!(node = %config.node_id, "stopping: finishing requests in flight, then flushing");
        node.shutdown().await.context("final flush")?;
        tracing::info!(node = %config.node_id, "stopped cleanly");
        Ok(())
    })
}

fn run_gateway(
    pool: &str,
    listen: Option<std::net::SocketAddr>,
    socket: Option<PathBuf>,
) -> anyhow::Result<()> {
    if listen.is_none() && socket.is_none() {
        anyhow::bail!("give --listen ADDR, --socket PATH or both");
    }
    let addrs: Vec<String> = pool.split(',').filter(|s| !s.trim().is_empty()).map(str::to_string).collect();
    let meta = cairn_client::MetaClient::new(&addrs)?;
    runtime()?.block_on(async {
        let exports = std::sync::Arc::new(cairn_nbd::Exports {
            meta: std::sync::Arc::new(meta),
            config: Default::default(),
            limits: Default::default(),
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let mut tasks = Vec::new();
        if let Some(addr) = listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            tracing::info!(%addr, "gateway serving NBD over TCP");
            tasks.push(tokio::spawn(cairn_nbd::serve_tcp(l, exports.clone(), stop.clone())));
        }
        if let Some(path) = &socket {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            tracing::info!(path = %path.display(), "gateway serving NBD on a unix socket");
            tasks.push(tokio::spawn(cairn_nbd::serve_unix(l, exports.clone(), stop.clone())));
        }
        wait_for_stop_signal().await?;
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        if let Some(path) = &socket {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    })
}

/// Waits for SIGTERM or SIGINT.
pub(crate) async fn wait_for_stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
