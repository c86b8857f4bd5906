//! A client of the admin HTTP API for the data path: volume descriptions, the placement-group
//! table, node states, and writer generations. Tries every known address, follows the leader's
//! redirect, and moves on when a node answers 503 (it may be cut off from the majority).

use serde::Deserialize;
use std::time::Duration;

/// Redirects followed per request (follower → leader).
const REDIRECTS_MAX: usize = 3;

#[derive(Debug, Clone, thiserror::Error)]
pub enum MetaClientError {
    #[error("no volume named {0:?}")]
    UnknownVolume(String),
    #[error("metadata service: {0}")]
    Failed(String),
    /// The request conflicts with the current state (HTTP 409), e.g. an open whose `after` is
    /// older than the volume's generation.
    #[error("metadata service: {0}")]
    Conflict(String),
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub chunk_size_bytes: u32,
    pub replicas: u8,
    pub shared: bool,
    pub generation: u64,
    /// Writers numbered so far (the latest open's or `writer`'s number).
    #[serde(default)]
    pub writers: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PgTable {
    pub epoch: u64,
    pub pg_count: u32,
    /// The balancer's target rows.
    pub table: Vec<Vec<u64>>,
    /// Per replica count in use, each PG's holders (the nodes that have its data).
    #[serde(default)]
    pub holders: std::collections::BTreeMap<u8, Vec<Vec<u64>>>,
    /// Per replica count in use, each PG's backfill members (being filled; named as having missed
    /// every mutation of the PG).
    #[serde(default)]
    pub backfill: std::collections::BTreeMap<u8, Vec<Vec<u64>>>,
    /// Per replica count in use, each PG's membership interval (sent with every mutation: a node
    /// whose map has a newer one refuses it).
    #[serde(default)]
    pub intervals: std::collections::BTreeMap<u8, Vec<u64>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NodeState {
    pub id: u64,
    pub rpc: String,
    pub nbd: String,
    pub state: String,
    pub catching_up: bool,
}

impl NodeState {
    pub fn in_sync(&self) -> bool {
        self.state == "up" && !self.catching_up
    }
}

#[derive(Debug)]
pub struct MetaClient {
    http: reqwest::Client,
    bases: Vec<String>,
    /// The PG table and node states, shared by every volume client of this `MetaClient` (all
    /// connections of one NBD server): fetched at most once per refresh interval however many
    /// volumes are open, one fetch at a time.
    view: tokio::sync::Mutex<Option<PoolView>>,
    /// Volume descriptions by name with the metadata epoch they are at least as new as, shared
    /// like `view`; an entry no volume client holds is dropped at the next insert.
    volumes: std::sync::Mutex<std::collections::HashMap<String, VolumeSlot>>,
    /// Admin API requests sent (each counts once, redirects included).
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Per volume id, the PGs mutated through any volume client of this `MetaClient` since a
    /// flush covered them: a flush on one connection covers every connection's acknowledged
    /// writes (NBD `CAN_MULTI_CONN`). Entries no client holds are dropped at the next insert.
    touched: std::sync::Mutex<std::collections::HashMap<u64, std::sync::Weak<TouchedPgs>>>,
}

/// PGs mutated since a flush covered them, each with the count of its latest mutation (marked
/// when a mutation starts and again when it is acknowledged). A flush takes nothing out until it
/// succeeded, and then only the PGs not marked again since it began: a flush running at the same
/// time (another connection's, a FUA write's) finds them still there and flushes them itself
/// instead of returning at once.
#[derive(Debug, Default)]
pub struct TouchedPgs {
    inner: std::sync::Mutex<(std::collections::BTreeMap<u32, u64>, u64)>,
}

impl TouchedPgs {
    fn lock(&self) -> std::sync::MutexGuard<'_, (std::collections::BTreeMap<u32, u64>, u64)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `pg` as mutated.
    pub fn touch(&self, pg: u32) {
        let mut g = self.lock();
        g.1 += 1;
        let n = g.1;
        g.0.insert(pg, n);
    }

    /// The PGs a flush must cover now (those of `only`, if given), with their marks.
    pub fn pending(
        &self,
        only: Option<&std::collections::BTreeSet<u32>>,
    ) -> std::collections::BTreeMap<u32, u64> {
        self.lock()
            .0
            .iter()
            .filter(|(pg, _)| only.is_none_or(|o| o.contains(pg)))
            .map(|(p, n)| (*p, *n))
            .collect()
    }

    /// A flush of `covered` (as returned by [`Self::pending`]) succeeded: the PGs not marked again
    /// since are clean.
    pub fn flushed(&self, covered: &std::collections::BTreeMap<u32, u64>) {
        let mut g = self.lock();
        for (pg, n) in covered {
            if g.0.get(pg) == Some(n) {
                g.0.remove(pg);
            }
        }
    }
}

type VolumeSlot = std::sync::Arc<tokio::sync::Mutex<Option<(u64, VolumeInfo)>>>;

/// The pool-wide part of a volume's map, as fetched at `fetched` (taken before the requests).
#[derive(Debug, Clone)]
pub struct PoolView {
    pub fetched: tokio::time::Instant,
    pub pgs: std::sync::Arc<PgTable>,
    pub nodes: std::sync::Arc<Vec<NodeState>>,
}

impl MetaClient {
    /// `addrs`: HTTP API addresses (`host:port` or URLs) of any nodes of the pool.
    pub fn new(addrs: &[String]) -> Result<MetaClient, MetaClientError> {
        let bases: Vec<String> = addrs
            .iter()
            .map(|a| {
                let a = a.trim().trim_end_matches('/');
                if a.starts_with("http://") { a.to_string() } else { format!("http://{a}") }
            })
            .collect();
        if bases.is_empty() {
            return Err(MetaClientError::Failed("no pool address".into()));
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| MetaClientError::Failed(e.to_string()))?;
        Ok(MetaClient {
            http,
            bases,
            view: tokio::sync::Mutex::new(None),
            volumes: Default::default(),
            requests: Default::default(),
            touched: Default::default(),
        })
    }

    /// The set of PGs of volume `id` mutated since a flush covered them, shared by every volume
    /// client of this `MetaClient` that has the volume open.
    pub fn touched_pgs(&self, id: u64) -> std::sync::Arc<TouchedPgs> {
        let mut all = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = all.get(&id).and_then(|w| w.upgrade()) {
            return set;
        }
        all.retain(|_, w| w.strong_count() > 0);
        let set = std::sync::Arc::new(TouchedPgs::default());
        all.insert(id, std::sync::Arc::downgrade(&set));
        set
    }

    async fn request(&self, post: bool, path: &str) -> Result<(u16, serde_json::Value), MetaClientError> {
        let mut failures = Vec::new();
        for base in &self.bases {
            let mut url = format!("{base}{path}");
            for _ in 0..=REDIRECTS_MAX {
                let req = if post {
                    self.http.post(&url).json(&serde_json::json!({}))
                } else {
                    self.http.get(&url)
                };
                self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let resp = match req.send().await {
                    Ok(r) => r,
                    Err(e) => {
                        failures.push(format!("{url}: {e}"));
                        break;
                    }
                };
                let status = resp.status().as_u16();
                if status == 307
                    && let Some(loc) =
                        resp.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok())
                {
                    url = loc.to_string();
                    continue;
                }
                let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
                if status == 503 {
                    failures.push(format!("{url}: {}", body["error"].as_str().unwrap_or("unavailable")));
                    break;
                }
                return Ok((status, body));
            }
        }
        Err(MetaClientError::Failed(format!("no node of the pool answered: {}", failures.join("; "))))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        post: bool,
        path: &str,
        name: &str,
    ) -> Result<T, MetaClientError> {
        let (status, body) = self.request(post, path).await?;
        match status {
            200 | 201 => serde_json::from_value(body).map_err(|e| MetaClientError::Failed(e.to_string())),
            404 => Err(MetaClientError::UnknownVolume(name.to_string())),
            409 => Err(MetaClientError::Conflict(body["error"].as_str().unwrap_or("conflict").to_string())),
            _ => Err(MetaClientError::Failed(
                body["error"].as_str().unwrap_or("unexpected answer").to_string(),
            )),
        }
    }

    pub async fn volume(&self, name: &str) -> Result<VolumeInfo, MetaClientError> {
        self.get_json(false, &format!("/v1/volumes/{name}"), name).await
    }

    pub async fn volumes(&self) -> Result<Vec<VolumeInfo>, MetaClientError> {
        self.get_json(false, "/v1/volumes", "").await
    }

    /// The PG table and node states as fetched no earlier than `fresher_than`: the shared copy if
    /// it is recent enough, else a new fetch (callers waiting meanwhile share it).
    pub async fn pool_view(&self, fresher_than: tokio::time::Instant) -> Result<PoolView, MetaClientError> {
        let mut view = self.view.lock().await;
        if let Some(v) = view.as_ref().filter(|v| v.fetched >= fresher_than) {
            return Ok(v.clone());
        }
        let fetched = tokio::time::Instant::now();
        let (pgs, nodes) = tokio::try_join!(self.pgs(), self.nodes())?;
        let v = PoolView { fetched, pgs: std::sync::Arc::new(pgs), nodes: std::sync::Arc::new(nodes) };
        *view = Some(v.clone());
        Ok(v)
    }

    /// Volume `name` as of metadata epoch `epoch` or later: the shared copy if it is that new,
    /// else fetched (once for every caller waiting on the same name).
    pub async fn volume_at(&self, name: &str, epoch: u64) -> Result<VolumeInfo, MetaClientError> {
        let slot = {
            let mut volumes = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
            if !volumes.contains_key(name) {
                volumes.retain(|_, slot| std::sync::Arc::strong_count(slot) > 1);
            }
            volumes.entry(name.to_string()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some((_, v)) = slot.as_ref().filter(|(at, _)| *at >= epoch) {
            return Ok(v.clone());
        }
        let v = self.volume(name).await?;
        *slot = Some((epoch, v.clone()));
        Ok(v)
    }

    /// The count of admin API requests this client has sent.
    pub fn counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.requests.clone()
    }

    pub async fn pgs(&self) -> Result<PgTable, MetaClientError> {
        self.get_json(false, "/v1/pgs", "").await
    }

    pub async fn nodes(&self) -> Result<Vec<NodeState>, MetaClientError> {
        self.get_json(false, "/v1/nodes", "").await
    }

    /// Obtains a new writer generation for the volume (committed before it is returned), newer
    /// than `after`, the generation the caller read: if a newer one is committed already (another
    /// writer's, or this caller's own request whose answer was lost), it fails with `Conflict` and
    /// opens nothing, so a retried or late request never fences the writer that sent it.
    pub async fn open(&self, name: &str, after: u64) -> Result<VolumeInfo, MetaClientError> {
        self.get_json(true, &format!("/v1/volumes/{name}/open?after={after}"), name).await
    }

    /// Numbers a new writer of `name` under its current generation (committed): the returned
    /// `writers` is this writer's number.
    pub async fn writer(&self, name: &str) -> Result<VolumeInfo, MetaClientError> {
        self.get_json(true, &format!("/v1/volumes/{name}/writer"), name).await
    }

    /// Tells the pool that a node missed a write while it stayed up: it must catch up.
    pub async fn report_catch_up(&self, node: u64) -> Result<(), MetaClientError> {
        let _: serde_json::Value = self.get_json(true, &format!("/v1/nodes/{node}/catch-up"), "").await?;
        Ok(())
    }
}
