//! The admin HTTP API (JSON in and out), served by every node.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | /v1/status | this node's view: role, leader, term, epoch, counts (503 without quorum) |
//! | GET | /v1/nodes | every node: addresses, up/down, in/out, weight, capacity, usage |
//! | GET | /v1/volumes | every volume |
//! | POST | /v1/volumes | create: `{"name", "size_bytes", "replicas"?, "chunk_size_bytes"?, "shared"?}` |
//! | GET | /v1/volumes/{name} | one volume and the nodes holding its placement groups |
//! | DELETE | /v1/volumes/{name} | delete |
//! | POST | /v1/volumes/{name}/resize | `{"size_bytes", "allow_shrink"?}` |
//! | POST | /v1/volumes/{name}/open[?after=G] | issue a new writer generation (and writer number); with `after`, only if the volume is still at generation G or older (else 409) |
//! | POST | /v1/volumes/{name}/writer | number a new writer under the current generation |
//! | GET | /v1/events?since=N | events with sequence number above N |
//! | POST | /v1/nodes/{id}/catch-up | a client saw the node miss a write: it must catch up |
//! | GET | /v1/pgs | the placement-group table: `{"epoch", "pg_count", "table": [[node, …], …]}` |
//!
//! Everything but `/v1/status` is answered by the leader after confirming its leadership with a
//! quorum (reads see every earlier write). A follower answers `307 Temporary Redirect` to the same
//! path on the leader. Errors are `{"error": "message"}` with 400 (bad input), 404 (unknown volume or path),
//! 408 (request not done in 30 s), 409 (name taken), 413 (body over 64 KiB), 503 (no leader or no
//! quorum) or 500.

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cairn_meta::state::{ClusterState, Command, REPLICAS_DEFAULT, StateError, Volume};
use cairn_meta::{CommandResult, MetaError, MetadataStore};
use cairn_types::limits::CHUNK_SIZE_DEFAULT_BYTES;
use cairn_types::placement::pg_of;
use cairn_types::{ChunkIndex, VolumeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

type Meta = Arc<dyn MetadataStore>;

/// Counters `/v1/status` reports.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Requests this node's own volume clients (its NBD server) handled in-process.
    pub local_requests: Arc<AtomicU64>,
    /// Admin API requests this node's NBD server sent (map refreshes of every connection).
    pub nbd_meta_requests: Arc<AtomicU64>,
    /// The node's store, for `unsynced_chunks`.
    pub store: Option<Arc<cairn_store::Store>>,
    /// The node's scrub (`/v1/scrub`).
    pub scrub: Option<Arc<crate::scrub::Scrub>>,
}

/// The API's router; `/v1/status` reports the counters.
pub fn router(meta: Meta, counters: Counters) -> Router {
    let (scrub_a, scrub_b) = (counters.scrub.clone(), counters.scrub.clone());
    Router::new()
        .route("/v1/status", get(move |state: State<Meta>, uri: Uri| status(state, uri, counters.clone())))
        .route(
            "/v1/scrub",
            get(move || scrub_status(scrub_a.clone())).post(
                move |m: State<Meta>, u: Uri, body: axum::body::Bytes| {
                    scrub_start(m, u, body, scrub_b.clone())
                },
            ),
        )
        .route("/v1/nodes", get(nodes))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(volume_info).delete(delete_volume))
        .route("/v1/volumes/{name}/resize", post(resize_volume))
        .route("/v1/volumes/{name}/open", post(open_volume))
        .route("/v1/volumes/{name}/writer", post(add_writer))
        .route("/v1/events", get(events))
        .route("/v1/pgs", get(pgs))
        .route("/v1/nodes/{id}/catch-up", post(catch_up))
        .route(
            "/v1/nodes/{id}/promote",
            post(|m: State<Meta>, u: Uri, id: ApiPath<u64>| set_voter(m, u, id, true)),
        )
        .route(
            "/v1/nodes/{id}/demote",
            post(|m: State<Meta>, u: Uri, id: ApiPath<u64>| set_voter(m, u, id, false)),
        )
        .fallback(|uri: Uri| async move {
            ApiError::new(StatusCode::NOT_FOUND, format!("no such API path: {}", uri.path()))
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this path")
        })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_MAX_BYTES))
        .layer(axum::middleware::from_fn(bounded))
        .with_state(meta)
}

/// A request body that is not the JSON a handler takes: 413 if it is over the limit, else 400 (bad
/// input, whether malformed, of the wrong shape or without a JSON content type).
fn json_rejection(e: axum::extract::rejection::JsonRejection) -> ApiError {
    let status = match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::new(status, e.body_text())
}

/// A path parameter whose rejection (bad percent-encoding, not a number…) is a JSON error like
/// every other answer of the API.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::new(e.status(), e.body_text())),
        }
    }
}

/// Largest request body accepted: requests are small JSON documents.
pub const BODY_MAX_BYTES: usize = 64 * 1024;
/// Longest a request may take, its body included (a proposal waits at most 5 s for a quorum).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Refuses a body announced larger than [`BODY_MAX_BYTES`] before reading it (413), and answers
/// 408 to a request not done within [`REQUEST_TIMEOUT`] (a body sent slowly, say).
async fn bounded(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = announced.filter(|l| *l > BODY_MAX_BYTES as u64) {
        let message = format!("request body of {len} bytes exceeds the limit of {BODY_MAX_BYTES}");
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("request not completed within {} s", REQUEST_TIMEOUT.as_secs()),
        )
        .into_response(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// An API error, rendered as `{"error": …}` with its status (or a redirect to the leader).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    location: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), location: None }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody { error: &self.message });
        match self.location {
            Some(loc) => (self.status, [(header::LOCATION, loc)], body).into_response(),
            None => (self.status, body).into_response(),
        }
    }
}

fn map_error(e: MetaError, uri: &Uri) -> ApiError {
    match e {
        MetaError::NotLeader { leader: Some((id, addr)) } => ApiError {
            status: StatusCode::TEMPORARY_REDIRECT,
            message: format!("not the leader; node {id} is"),
            location: Some(format!(
                "http://{}{}",
                addr.http,
                uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
            )),
        },
        MetaError::NotLeader { leader: None } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no quorum: there is no metadata leader (is a majority of the metadata voters up?)",
        ),
        MetaError::NoQuorum(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("no quorum: {m}")),
        MetaError::Rejected(e) => {
            let status = match &e {
                StateError::UnknownVolume(_) | StateError::UnknownNode(_) => StatusCode::NOT_FOUND,
                StateError::NameTaken(_) | StateError::GenerationMoved { .. } => StatusCode::CONFLICT,
                _ => StatusCode::BAD_REQUEST,
            };
            ApiError::new(status, e.to_string())
        }
        MetaError::Internal(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m),
        MetaError::Refused(m) => ApiError::new(StatusCode::CONFLICT, m),
    }
}

/// Makes sure this node is the leader and up to date; otherwise the error redirects or says why not.
async fn lead(meta: &Meta, uri: &Uri) -> Result<(), ApiError> {
    if !meta.is_leader() {
        let leader = meta.leader().filter(|(id, _)| *id != meta.id());
        return Err(map_error(MetaError::NotLeader { leader }, uri));
    }
    meta.linearizable().await.map_err(|e| map_error(e, uri))
}

#[derive(Serialize)]
struct LeaderJson {
    id: u64,
    http: String,
}

#[derive(Serialize)]
struct StatusJson {
    node_id: u64,
    role: String,
    leader: Option<LeaderJson>,
    term: u64,
    epoch: u64,
    pg_count: u32,
    nodes_total: usize,
    nodes_up: usize,
    volumes: usize,
    events_last_seq: u64,
    /// Data-path requests this node's NBD server handled in-process (local fast path).
    local_requests: u64,
    /// Admin API requests this node's NBD server sent (map refreshes, opens).
    nbd_meta_requests: u64,
    /// Chunks mutated since their last fdatasync (what flushes still have to make durable).
    unsynced_chunks: u64,
    /// Whether this node serves client reads and writes now (in sync, after a catch-up once enough
    /// of its peers have the map that says so, and holding a read lease from its peers).
    serving_clients: bool,
}

async fn status(
    State(meta): State<Meta>,
    uri: Uri,
    counters: Counters,
) -> Result<Json<StatusJson>, ApiError> {
    if meta.is_leader() {
        meta.linearizable().await.map_err(|e| map_error(e, &uri))?;
    } else if meta.leader().is_none() {
        return Err(map_error(MetaError::NotLeader { leader: None }, &uri));
    }
    let role = meta.role().to_string();
    let leader = meta.leader().map(|(id, addr)| LeaderJson { id, http: addr.http });
    let s = meta.state();
    Ok(Json(StatusJson {
        node_id: meta.id(),
        role,
        leader,
        term: meta.term(),
        epoch: s.epoch,
        pg_count: s.pg_count,
        nodes_total: s.nodes.len(),
        nodes_up: s.nodes.values().filter(|n| n.up).count(),
        volumes: s.volumes.len(),
        events_last_seq: s.next_event_seq - 1,
        local_requests: counters.local_requests.load(Ordering::Relaxed),
        nbd_meta_requests: counters.nbd_meta_requests.load(Ordering::Relaxed),
        unsynced_chunks: counters.store.as_ref().map_or(0, |s| s.unsynced_count()),
        serving_clients: meta.serves_reads(),
    }))
}

/// `POST /v1/scrub`'s body (optional): the volume to scrub (default: every volume).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScrubRequest {
    volume: Option<String>,
}

#[derive(Serialize)]
struct ScrubStarted {
    node_id: u64,
    /// The run's ticket: it is done once `served_through` (`GET /v1/scrub`) reaches it, and its
    /// figures are in `runs` under it.
    ticket: u64,
    /// The node process's scrub instance: a ticket names a run only together with it (the
    /// tickets count again after a restart).
    instance: u64,
    volume_id: Option<u64>,
}

fn no_scrub() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "this node runs no scrub (it is not a storage node)")
}

/// `GET /v1/scrub`: this node's scrub: running or not, the current or last run's figures.
async fn scrub_status(
    scrub: Option<Arc<crate::scrub::Scrub>>,
) -> Result<Json<crate::scrub::ScrubStatus>, ApiError> {
    Ok(Json(scrub.ok_or_else(no_scrub)?.status()))
}

/// `POST /v1/scrub`: asks this node to scrub now (every volume, or the one named).
async fn scrub_start(
    State(meta): State<Meta>,
    uri: Uri,
    body: axum::body::Bytes,
    scrub: Option<Arc<crate::scrub::Scrub>>,
) -> Result<Json<ScrubStarted>, ApiError> {
    let scrub = scrub.ok_or_else(no_scrub)?;
    // No body: every volume.
    let request: ScrubRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ScrubRequest { volume: None }
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?
    };
    let volume_id = match request.volume {
        Some(name) => Some(
            meta.state()
                .volumes
                .get(&name)
                .map(|v| v.id)
                .ok_or_else(|| map_error(MetaError::Rejected(StateError::UnknownVolume(name)), &uri))?,
        ),
        None => None,
    };
    let (instance, ticket) = scrub.request(volume_id).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{} scrub runs are waiting already: ask again later", crate::scrub::PENDING_MAX),
        )
    })?;
    Ok(Json(ScrubStarted { node_id: meta.id(), ticket, instance, volume_id }))
}

#[derive(Serialize)]
struct NodeJson {
    id: u64,
    rpc: String,
    http: String,
    nbd: String,
    voter: bool,
    state: &'static str,
    catching_up: bool,
    #[serde(rename = "in")]
    in_pool: bool,
    weight: u32,
    capacity_bytes: u64,
    used_bytes: u64,
    last_heartbeat_ms_ago: Option<u64>,
    pg_replicas: usize,
}

async fn nodes(State(meta): State<Meta>, uri: Uri) -> Result<Json<Vec<NodeJson>>, ApiError> {
    lead(&meta, &uri).await?;
    let s = meta.state();
    let nodes = {
        s.nodes
            .values()
            .map(|n| {
                let usage = meta.usage(n.id);
                NodeJson {
                    id: n.id,
                    rpc: n.addr.rpc.clone(),
                    http: n.addr.http.clone(),
                    nbd: n.addr.nbd.clone(),
                    voter: n.voter,
                    state: if n.up { "up" } else { "down" },
                    catching_up: n.catching_up,
                    in_pool: n.in_pool,
                    weight: n.weight,
                    capacity_bytes: usage.as_ref().map(|u| u.capacity_bytes).unwrap_or(n.capacity_bytes),
                    used_bytes: usage.as_ref().map(|u| u.used_bytes).unwrap_or(0),
                    last_heartbeat_ms_ago: if n.id == meta.id() { Some(0) } else { meta.silent_ms(n.id) },
                    // PG copies it holds, over every replica count in use (the target's for a
                    // pool without volumes yet).
                    pg_replicas: if s.pg_sets.is_empty() {
                        s.pg_table.iter().filter(|row| row.iter().take(3).any(|x| *x == n.id)).count()
                    } else {
                        s.pg_sets.values().flatten().filter(|a| a.entry(n.id).is_some()).count()
                    },
                }
            })
            .collect()
    };
    Ok(Json(nodes))
}

async fn list_volumes(State(meta): State<Meta>, uri: Uri) -> Result<Json<Vec<Volume>>, ApiError> {
    lead(&meta, &uri).await?;
    Ok(Json(meta.state().volumes.values().cloned().collect()))
}

#[derive(Serialize)]
struct PgJson {
    pg: u32,
    nodes: Vec<u64>,
}

#[derive(Serialize)]
struct VolumeInfoJson {
    #[serde(flatten)]
    volume: Volume,
    chunks: u64,
    /// Per node: how many of the volume's placement groups it holds a replica of.
    nodes: BTreeMap<u64, usize>,
    pgs: Vec<PgJson>,
}

/// The placement groups a volume's chunks fall in, with the nodes holding each.
fn placement(s: &ClusterState, v: &Volume) -> VolumeInfoJson {
    let chunk = u64::from(v.chunk_size_bytes.max(1));
    let chunks = v.size_bytes.div_ceil(chunk);
    let mut used = vec![false; s.pg_count as usize];
    // With 16 chunks per PG on average, every PG is used with overwhelming probability
    // ((1 - 1/n)^(16n) < 1e-6); below that, find them exactly.
    if chunks >= 16 * u64::from(s.pg_count) {
        used.iter_mut().for_each(|u| *u = true);
    } else if let Ok(id) = VolumeId::new(v.id) {
        for c in 0..chunks {
            used[pg_of(id, ChunkIndex(c), s.pg_count).0 as usize] = true;
        }
    }
    let mut nodes = BTreeMap::new();
    let mut pgs = Vec::new();
    for (pg, in_use) in used.iter().enumerate() {
        if !in_use {
            continue;
        }
        let row: Vec<u64> = s.holders(v.replicas, pg as u32);
        for n in &row {
            *nodes.entry(*n).or_insert(0) += 1;
        }
        pgs.push(PgJson { pg: pg as u32, nodes: row });
    }
    VolumeInfoJson { volume: v.clone(), chunks, nodes, pgs }
}

async fn volume_info(
    State(meta): State<Meta>,
    uri: Uri,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<VolumeInfoJson>, ApiError> {
    lead(&meta, &uri).await?;
    let s = meta.state();
    s.volumes
        .get(&name)
        .map(|v| placement(&s, v))
        .map(Json)
        .ok_or_else(|| map_error(MetaError::Rejected(StateError::UnknownVolume(name)), &uri))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVolume {
    name: String,
    size_bytes: u64,
    replicas: Option<u8>,
    chunk_size_bytes: Option<u32>,
    #[serde(default)]
    shared: bool,
}

async fn propose_volume(meta: &Meta, uri: &Uri, command: Command) -> Result<Volume, ApiError> {
    if !meta.is_leader() {
        lead(meta, uri).await?;
    }
    match meta.propose(command).await.map_err(|e| map_error(e, uri))? {
        CommandResult::Volume(v) => Ok(v),
        other => {
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("unexpected result {other:?}")))
        }
    }
}

async fn create_volume(
    State(meta): State<Meta>,
    uri: Uri,
    body: Result<Json<CreateVolume>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    let Json(req) = body.map_err(json_rejection)?;
    let command = Command::CreateVolume {
        name: req.name,
        size_bytes: req.size_bytes,
        chunk_size_bytes: req.chunk_size_bytes.unwrap_or(CHUNK_SIZE_DEFAULT_BYTES),
        replicas: req.replicas.unwrap_or(REPLICAS_DEFAULT),
        shared: req.shared,
        time_ms: now_ms(),
    };
    Ok((StatusCode::CREATED, Json(propose_volume(&meta, &uri, command).await?)))
}

async fn delete_volume(
    State(meta): State<Meta>,
    uri: Uri,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(propose_volume(&meta, &uri, Command::DeleteVolume { name, time_ms: now_ms() }).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    size_bytes: u64,
    #[serde(default)]
    allow_shrink: bool,
}

async fn resize_volume(
    State(meta): State<Meta>,
    uri: Uri,
    ApiPath(name): ApiPath<String>,
    body: Result<Json<Resize>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Volume>, ApiError> {
    let Json(req) = body.map_err(json_rejection)?;
    let command = Command::ResizeVolume {
        name,
        size_bytes: req.size_bytes,
        allow_shrink: req.allow_shrink,
        time_ms: now_ms(),
    };
    Ok(Json(propose_volume(&meta, &uri, command).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAfter {
    /// Open only if the volume's generation is still this one or older (409 otherwise).
    after: Option<u64>,
}

async fn open_volume(
    State(meta): State<Meta>,
    uri: Uri,
    ApiPath(name): ApiPath<String>,
    q: Result<Query<OpenAfter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Volume>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let command = Command::OpenVolume { name, time_ms: now_ms(), after: q.after };
    Ok(Json(propose_volume(&meta, &uri, command).await?))
}

async fn add_writer(
    State(meta): State<Meta>,
    uri: Uri,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(propose_volume(&meta, &uri, Command::AddWriter { name }).await?))
}

#[derive(Deserialize)]
struct Since {
    since: Option<u64>,
}

async fn events(
    State(meta): State<Meta>,
    uri: Uri,
    q: Result<Query<Since>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<cairn_meta::Event>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    lead(&meta, &uri).await?;
    Ok(Json(meta.state().events_since(q.since.unwrap_or(0))))
}

#[derive(Serialize)]
struct PgTableJson {
    epoch: u64,
    pg_count: u32,
    /// The balancer's target rows (up to 5 nodes; R copies use the first R).
    table: Vec<Vec<u64>>,
    /// Per replica count in use, each PG's holders: the nodes the data path uses.
    holders: BTreeMap<u8, Vec<Vec<u64>>>,
    /// Per replica count in use, each PG's backfill members: nodes being filled with a copy, named
    /// as having missed every mutation of the PG until they are admitted.
    backfill: BTreeMap<u8, Vec<Vec<u64>>>,
    /// Per replica count in use, each PG's membership interval (grows with every member added or
    /// admitted; writers send it with every mutation).
    intervals: BTreeMap<u8, Vec<u64>>,
}

async fn pgs(State(meta): State<Meta>, uri: Uri) -> Result<Json<PgTableJson>, ApiError> {
    lead(&meta, &uri).await?;
    let s = meta.state();
    let holders =
        s.pg_sets.keys().map(|r| (*r, (0..s.pg_count).map(|pg| s.holders(*r, pg)).collect())).collect();
    let backfill =
        s.pg_sets.keys().map(|r| (*r, (0..s.pg_count).map(|pg| s.backfill(*r, pg)).collect())).collect();
    let intervals = s.pg_sets.iter().map(|(r, set)| (*r, set.iter().map(|a| a.interval).collect())).collect();
    Ok(Json(PgTableJson {
        epoch: s.epoch,
        pg_count: s.pg_count,
        table: s.pg_table.clone(),
        holders,
        backfill,
        intervals,
    }))
}

async fn catch_up(
    State(meta): State<Meta>,
    uri: Uri,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !meta.is_leader() {
        lead(&meta, &uri).await?;
    }
    let command = Command::SetCatchingUp { id, catching_up: true, time_ms: now_ms(), filled: None };
    meta.propose(command).await.map_err(|e| map_error(e, &uri))?;
    Ok(Json(serde_json::json!({ "id": id, "catching_up": true })))
}

/// Makes a node a metadata voter or learner (`cairn node promote|demote`; the procedure that needs
/// it: rebuilding a voter's lost metadata, docs/operations.md).
async fn set_voter(
    State(meta): State<Meta>,
    uri: Uri,
    ApiPath(id): ApiPath<u64>,
    voter: bool,
) -> Result<Json<serde_json::Value>, ApiError> {
    lead(&meta, &uri).await?;
    meta.set_voter(id, voter).await.map_err(|e| map_error(e, &uri))?;
    Ok(Json(serde_json::json!({ "id": id, "voter": voter })))
}

/// Serves the API on `listener` until `stop`: at most `limits.connections_max` connections at
/// once (one beyond it is closed at once), and a connection that does not send a complete request
/// head within `limits.handshake_timeout_ms` — a half-sent request, or an idle keep-alive
/// connection — is closed. On `stop`, idle connections close and requests in progress finish
/// (bounded by 10 s).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: crate::config::LimitsSection,
    stop: tokio_util::sync::CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    let connections = limits.limiter();
    loop {
        let (stream, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = connections.admit_logged(Some(remote.ip()), "HTTP") else { continue };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tracker.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.handshake_timeout());
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            let outcome = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(std::time::Duration::from_secs(10), conn.as_mut())
                        .await
                        .unwrap_or(Ok(()))
                }
            };
            if let Err(e) = outcome {
                tracing::debug!(%remote, "HTTP connection closed: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    tracker.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tracker.wait()).await;
}
