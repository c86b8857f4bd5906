//! The admin HTTP API's request handling: arbitrary methods, paths, queries and bodies through the
//! real router, over Cairn's real state machine (`ClusterState::apply`, without Raft: a pool of
//! one node that is always the leader). Must never panic, and every answer is a JSON object with a
//! status code the API documents.
#![no_main]

use axum::body::Body;
use axum::http::{Method, Request};
use cairn_meta::network::NodeReport;
use cairn_meta::state::{ClusterState, Command, CommandResult, NodeAddr};
use cairn_meta::{MetaError, MetadataStore};
use futures::future::BoxFuture;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex, OnceLock};
use tower::ServiceExt;

/// One node's metadata without replication: commands apply to the state at once.
struct Local(Mutex<ClusterState>);

impl MetadataStore for Local {
    fn id(&self) -> u64 {
        1
    }
    fn role(&self) -> &'static str {
        "leader"
    }
    fn term(&self) -> u64 {
        1
    }
    fn leader(&self) -> Option<(u64, NodeAddr)> {
        Some((1, NodeAddr::default()))
    }
    fn is_leader(&self) -> bool {
        true
    }
    fn state(&self) -> ClusterState {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn usage(&self, _id: u64) -> Option<NodeReport> {
        None
    }
    fn silent_ms(&self, _id: u64) -> Option<u64> {
        Some(0)
    }
    fn propose(&self, command: Command) -> BoxFuture<'_, Result<CommandResult, MetaError>> {
        let r = self.0.lock().unwrap_or_else(|p| p.into_inner()).apply(command);
        Box::pin(async move {
            match r {
                CommandResult::Rejected(e) => Err(MetaError::Rejected(e)),
                other => Ok(other),
            }
        })
    }
    fn linearizable(&self) -> BoxFuture<'_, Result<(), MetaError>> {
        Box::pin(async { Ok(()) })
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

/// A fresh pool for every input (so inputs do not depend on each other): three nodes, one volume.
fn store() -> Arc<Local> {
    static BASE: OnceLock<ClusterState> = OnceLock::new();
    Arc::new(Local(Mutex::new(BASE.get_or_init(base).clone())))
}

fn base() -> ClusterState {
    let mut s = ClusterState::default();
    for id in 1..=3 {
        let addr = NodeAddr { rpc: format!("127.0.0.1:{id}"), ..NodeAddr::default() };
        s.apply(Command::RegisterNode { id, addr, voter: true, capacity_bytes: 1 << 40, time_ms: 1 });
    }
    s.apply(Command::CreateVolume {
        name: "vm1".into(),
        size_bytes: 1 << 30,
        chunk_size_bytes: 1 << 20,
        replicas: 3,
        shared: false,
        time_ms: 1,
    });
    s
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else { return };
    let method = [Method::GET, Method::POST, Method::DELETE, Method::PUT][usize::from(m % 4)].clone();
    let split = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    let path = String::from_utf8_lossy(&rest[..split]).into_owned();
    let body = rest.get(split + 1..).unwrap_or(&[]).to_vec();
    let Ok(request) = Request::builder()
        .method(method)
        .uri(format!("/{}", path.trim_start_matches('/')))
        .header("content-type", "application/json")
        .body(Body::from(body))
    else {
        return;
    };
    let router = cairn_node::http::router(store(), cairn_node::http::Counters::default());
    runtime().block_on(async {
        let response = router.oneshot(request).await.expect("the router is infallible");
        let status = response.status().as_u16();
        assert!(
            matches!(status, 200 | 201 | 307 | 400 | 404 | 405 | 408 | 409 | 413 | 500 | 503),
            "undocumented status {status}"
        );
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("every answer is JSON");
        if status >= 400 {
            assert!(json["error"].is_string(), "an error without a message: {json}");
        }
    });
});
