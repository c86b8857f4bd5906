//! Helpers for tests that run the real `cairn` binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use cairn_client::NodeConnection;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn cairn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
}

/// A free TCP port on 127.0.0.1 (bound and released; tests retry startup if it is taken meanwhile).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub fn write_config(dir: &Path, node_id: u64, addr: SocketAddr) -> PathBuf {
    let path = dir.join(format!("node-{node_id}.toml"));
    let data = dir.join(format!("data-{node_id}"));
    std::fs::write(
        &path,
        format!(
            "node_id = {node_id}\ndata_dir = \"{}\"\nrpc_listen_addr = \"{addr}\"\nhttp_listen_addr = \"{}\"\nnbd_listen_addr = \"{}\"\n",
            data.display(),
            free_addr(),
            free_addr()
        ),
    )
    .unwrap();
    path
}

/// A storage node process, killed when dropped.
pub struct NodeProcess {
    pub child: Option<Child>,
    pub config: PathBuf,
    pub addr: SocketAddr,
}

impl NodeProcess {
    pub fn start(config: &Path, addr: SocketAddr) -> NodeProcess {
        let child = cairn()
            .args(["node", "run", "--config"])
            .arg(config)
            .env("CAIRN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        NodeProcess { child: Some(child), config: config.to_path_buf(), addr }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn sigkill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_raw(self.pid()).unwrap(), sig).unwrap();
    }

    /// Waits for the process to exit, with a deadline.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "node did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Connects, retrying until the node listens (deadline 30 s).
    pub async fn connect(&mut self) -> NodeConnection {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().unwrap()
            {
                panic!("node exited during startup: {status}");
            }
            match NodeConnection::connect(self.addr).await {
                Ok(c) => return c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "node never answered: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cairn` to completion with a deadline.
pub fn run_to_end(mut cmd: Command, within: Duration) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cairn did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}
