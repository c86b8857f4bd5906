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

/// A free TCP port on 127.0.0.1 below the ephemeral range (32768 and up), so an outgoing
/// connection never takes it between this check and the node binding it.
pub fn free_addr() -> SocketAddr {
    // Never the same port twice in one test process (a port checked and released is free again).
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = 10000 + rand::random::<u16>() % 22000;
        let mut given = GIVEN.lock().unwrap();
        if given.contains(&port) {
            continue;
        }
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            given.push(port);
            return l.local_addr().unwrap();
        }
    }
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
            .env("CAIRN_LOG", "warn,openraft=off")
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
                // Serving clients starts once the node's own metadata knows it (about a second).
                Ok(c) => {
                    let probe = cairn_proto::Request::Read {
                        volume: cairn_types::VolumeId::new(1).unwrap(),
                        chunk: cairn_types::ChunkIndex(0),
                        chunk_size: cairn_types::ChunkSize::DEFAULT,
                        offset: 0,
                        len: 4096,
                    };
                    match c.call(&probe).await {
                        Ok(cairn_proto::Response::Error(cairn_proto::RpcError::Unavailable { .. })) => {
                            assert!(Instant::now() < deadline, "node never served clients");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        _ => return c,
                    }
                }
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

/// A whole local pool started with `cairn up`, in a temp dir, on random ports. Every process it
/// started (and every node restarted through it) is killed when it is dropped.
pub struct Pool {
    pub dir: tempfile::TempDir,
    pub up: Option<Child>,
    pub port_base: u16,
    /// Nodes `cairn up` started.
    pub nodes: usize,
    /// Nodes added to the pool since (`add_node`).
    pub added: usize,
    /// Nodes started by the test itself (restarts, added nodes), by node id.
    pub restarted: Vec<(u64, Child)>,
    client: reqwest::blocking::Client,
}

fn ports_free(base: u16, count: usize) -> bool {
    (0..count).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i as u16)).is_ok())
}

/// Runs `cairn up` and waits (90 s at most) until it prints "pool is up"; `None` if it does not.
fn launch_up(dir: &Path, nodes: usize, port_base: u16) -> Option<Child> {
    let mut up = cairn()
        .args(["up", "--nodes", &nodes.to_string(), "--port-base", &port_base.to_string(), "--dir"])
        .arg(dir)
        .env("CAIRN_LOG", "info,openraft=warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        // Keeps reading after "pool is up" so that cairn up's later lines have somewhere to go.
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.starts_with("pool is up") => return Some(up),
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
        if up.try_wait().unwrap().is_some() {
            break;
        }
    }
    let _ = up.kill();
    let _ = up.wait();
    None
}

impl Pool {
    pub fn start(nodes: usize) -> Pool {
        let client = reqwest::blocking::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap();
        for attempt in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port_base = loop {
                // Below the ephemeral range (32768 and up): see `free_addr`.
                let b = 10000 + (rand::random::<u16>() % 2200) * 10;
                if ports_free(b, nodes * 10 + 10) {
                    break b;
                }
            };
            if let Some(up) = launch_up(&dir.path().join("cairn-data"), nodes, port_base) {
                return Pool { dir, up: Some(up), port_base, nodes, added: 0, restarted: Vec::new(), client };
            }
            // (A port may have been taken between the check and the start.)
            eprintln!("pool start attempt {attempt} failed; retrying on other ports");
        }
        panic!("could not start a pool in 3 attempts");
    }

    /// Stops `cairn up` with SIGTERM (it must exit 0 and stop every node), then runs it again on
    /// the same directory and ports.
    pub fn restart_up(&mut self) {
        let pids: Vec<u32> = (1..=self.nodes as u64).map(|k| self.pid(k)).collect();
        let up = self.up.as_mut().unwrap();
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(up.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = up.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "cairn up did not stop");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "cairn up exited with {status}");
        for pid in pids {
            let alive =
                rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap())
                    .is_ok();
            assert!(!alive, "node process {pid} still running after cairn up stopped");
        }
        self.up =
            Some(launch_up(&self.data(), self.nodes, self.port_base).expect("cairn up did not come back"));
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("cairn-data")
    }

    pub fn http(&self, k: u64) -> String {
        format!("127.0.0.1:{}", self.port_base as u64 + 10 * (k - 1) + 2)
    }

    pub fn addrs(&self) -> String {
        (1..=self.nodes as u64).map(|k| self.http(k)).collect::<Vec<_>>().join(",")
    }

    pub fn pid(&self, k: u64) -> u32 {
        // The newest process the test started for node k, else the one `cairn up` started.
        if let Some((_, c)) = self.restarted.iter().rev().find(|(id, _)| *id == k) {
            return c.id();
        }
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.data().join("pool.json")).unwrap()).unwrap();
        v["nodes"].as_array().unwrap().iter().find(|n| n["id"] == k).unwrap()["pid"].as_u64().unwrap() as u32
    }

    pub fn sigkill(&self, k: u64) {
        let pid = rustix::process::Pid::from_raw(self.pid(k) as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
        // Wait until it is gone (its ports free) so a restart can bind them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while rustix::process::test_kill_process(pid).is_ok() {
            // A child of `cairn up` stays a zombie until reaped; it no longer holds ports.
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero())).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                break;
            }
            assert!(Instant::now() < deadline, "node {k} did not die");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Restarts node k with `cairn node run`, as an operator would.
    pub fn restart(&mut self, k: u64) {
        let config = self.data().join(format!("node-{k}/node.toml"));
        let child = cairn()
            .args(["node", "run", "--config"])
            .arg(config)
            .env("CAIRN_LOG", "warn,openraft=off")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.restarted.push((k, child));
    }

    /// Starts node `k` (beyond the pool's own) configured to join through node 1, and waits until
    /// node 1's map shows it up.
    pub fn add_node(&mut self, k: u64) {
        let dir = self.data().join(format!("node-{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = |off: u64| self.port_base as u64 + 10 * (k - 1) + off;
        let config = format!(
            "node_id = {k}\ndata_dir = \"{}\"\nrpc_listen_addr = \"127.0.0.1:{}\"\nnbd_listen_addr = \"127.0.0.1:{}\"\nhttp_listen_addr = \"127.0.0.1:{}\"\n[meta]\njoin = [\"127.0.0.1:{}\"]\n",
            dir.join("data").display(),
            port(0),
            port(1),
            port(2),
            self.port_base
        );
        std::fs::write(dir.join("node.toml"), config).unwrap();
        self.added += 1;
        self.restart(k);
        wait_for("the new node to be up", Duration::from_secs(30), || {
            let (status, nodes) = self.get(1, "/v1/nodes");
            let up =
                status == 200 && nodes.as_array().unwrap().iter().any(|n| n["id"] == k && n["state"] == "up");
            up.then_some(())
        });
    }

    /// `cairn volume verify NAME --json`: (exit success, report).
    pub fn verify(&self, name: &str) -> (bool, serde_json::Value) {
        let (ok, out, err) = self.cli(&["--json", "volume", "verify", name]);
        let report =
            serde_json::from_str(&out).unwrap_or_else(|_| panic!("verify printed no report: {out} {err}"));
        (ok, report)
    }

    /// Asserts that every replica of every chunk of `name` is identical. Copies that could not be
    /// compared (a replica catching up, or without a read lease for a moment, refuses to serve
    /// them) are compared again, for at most 30 s; copies that differ fail at once.
    pub fn assert_converged(&self, name: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (ok, report) = self.verify(name);
            if ok && report["consistent"] == true {
                return;
            }
            let differing = report["chunks_differing"].as_array().is_none_or(|d| !d.is_empty());
            if differing || std::time::Instant::now() > deadline {
                panic!("replicas of {name} differ: {report}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// GET on node k's API without following redirects: (status, body).
    pub fn get(&self, k: u64, path: &str) -> (u16, serde_json::Value) {
        match self.client.get(format!("http://{}{path}", self.http(k))).send() {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json().unwrap_or(serde_json::Value::Null))
            }
            Err(_) => (0, serde_json::Value::Null),
        }
    }

    /// Runs the CLI against the pool (every node's address); returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = cairn();
        cmd.arg("--addr").arg(self.addrs()).args(args).env("CAIRN_LOG", "off");
        let out = run_to_end(cmd, Duration::from_secs(60));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Like `cli`, but the command must succeed; returns stdout parsed as JSON (pass --json).
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let (ok, out, err) = self.cli(&full);
        assert!(ok, "cairn {args:?} failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("cairn {args:?} printed non-JSON ({e}): {out}"))
    }

    /// The leader as node k sees it (None if it knows none or does not answer).
    pub fn leader_seen_by(&self, k: u64) -> Option<u64> {
        let (status, v) = self.get(k, "/v1/status");
        if status != 200 {
            return None;
        }
        v["leader"]["id"].as_u64()
    }
}

/// Polls `f` until it returns Some, with a deadline.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for k in 1..=self.nodes as u64 {
            if let Ok(text) = std::fs::read_to_string(self.data().join("pool.json"))
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(pid) = v["nodes"]
                    .as_array()
                    .and_then(|a| a.iter().find(|n| n["id"] == k))
                    .and_then(|n| n["pid"].as_u64())
                && let Some(pid) = rustix::process::Pid::from_raw(pid as i32)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        for (_, c) in &mut self.restarted {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut up) = self.up.take() {
            let _ = up.kill();
            let _ = up.wait();
        }
        // A failed test leaves the end of every node's log in its output (the directory goes).
        if std::thread::panicking() {
            for k in 1..=self.nodes as u64 {
                let path = self.data().join(format!("node-{k}")).join("node.log");
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                // (Without openraft's own lines: a down peer fills the log with them.)
                let lines: Vec<&str> = text.lines().filter(|l| !l.contains("openraft")).collect();
                eprintln!("--- {} (last {} lines) ---", path.display(), lines.len().min(60));
                for line in &lines[lines.len().saturating_sub(60)..] {
                    eprintln!("{line}");
                }
            }
        }
    }
}

impl Pool {
    /// NBD address of node k.
    pub fn nbd(&self, k: u64) -> String {
        format!("127.0.0.1:{}", self.port_base as u64 + 10 * (k - 1) + 1)
    }

    /// RPC address of node k.
    pub fn rpc(&self, k: u64) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.port_base as u64 + 10 * (k - 1)).parse().unwrap()
    }

    /// Waits until every node is up and none is catching up.
    pub fn wait_in_sync(&self, within: Duration) {
        let count = self.nodes + self.added;
        wait_for("every node up and in sync", within, || {
            for k in 1..=count as u64 {
                let (status, nodes) = self.get(k, "/v1/nodes");
                if status == 200 {
                    let all = nodes.as_array()?;
                    let ok = all.len() == count
                        && all.iter().all(|n| n["state"] == "up" && n["catching_up"] == false);
                    if !ok {
                        return None;
                    }
                    // And every node serves client IO (after a catch-up, once enough peers have
                    // the map that says so).
                    let serving =
                        (1..=count as u64).all(|j| self.get(j, "/v1/status").1["serving_clients"] == true);
                    return serving.then_some(());
                }
            }
            None
        });
    }
}

/// Runs a program to completion with a deadline; returns (success, stdout + stderr).
pub fn run_tool(program: &str, args: &[String], within: Duration) -> (bool, String) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = run_to_end(cmd, within);
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// qemu-io commands writing 1 MiB blocks `[first, first + count)` with pattern `(block + round) % 251 + 1`.
pub fn pattern_cmds(op: &str, first: u64, count: u64, round: u64) -> Vec<String> {
    let mut v = Vec::new();
    for b in first..first + count {
        v.push("-c".to_string());
        v.push(format!("{op} -P {} {} 1M", (b + round) % 251 + 1, b << 20));
    }
    v
}

/// Runs qemu-io on an NBD URL with the given command arguments; asserts it succeeded and that no
/// pattern check failed.
pub fn qemu_io(url: &str, cmds: Vec<String>) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string(), url.to_string()];
    args.extend(cmds);
    let (ok, out) = run_tool("qemu-io", &args, Duration::from_secs(300));
    assert!(ok, "qemu-io failed: {}", out.lines().rev().take(10).collect::<Vec<_>>().join(" | "));
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io reported: {}",
        out.lines()
            .filter(|l| l.contains("fail") || l.contains("error"))
            .take(5)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    out
}
