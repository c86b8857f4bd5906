//! `cairn`: the command line of a Cairn pool.
//!
//! * `cairn up [--dir DIR] [--port-base P]` — start a local pool in DIR (for now one storage node).
//! * `cairn node run --config FILE` — run a storage node.
//!
//! Errors are printed as one line starting with `error:` and the exit status is 1.

mod up;

use anyhow::Context;
use cairn_node::{NodeConfig, RunningNode};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "cairn",
    version,
    about = "Cairn: a scale-out storage pool for virtual-machine disks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local pool with its data under one directory, in the foreground (Ctrl-C stops it).
    Up(up::UpArgs),
    /// Storage node commands.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
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
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match cli.command {
        Command::Up(args) => up::run(args),
        Command::Node {
            command: NodeCommand::Run { config },
        } => run_node(config),
    };
    if let Err(e) = result {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
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
        let node = RunningNode::start(&config).await?;
        tracing::info!(
            node = %config.node_id,
            rpc = %node.rpc_addr(),
            data_dir = %config.data_dir.display(),
            "storage node running"
        );
        wait_for_stop_signal().await?;
        tracing::info!(node = %config.node_id, "stopping: finishing requests in flight, then flushing");
        node.shutdown().await.context("final flush")?;
        tracing::info!(node = %config.node_id, "stopped cleanly");
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
