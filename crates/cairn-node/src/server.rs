//! The node RPC server.
//!
//! One task accepts connections; per connection, one task reads frames and one writes replies.
//! Every request runs as its own task (store calls go to tokio's bounded blocking pool), so requests
//! on one connection proceed in parallel and their replies go out in completion order.
//!
//! Backpressure: before a request is started, the reader acquires permits for the bytes it pins
//! (its frame, or the data a read will return) from the connection's budget of
//! `in_flight_bytes_max`. When the budget is spent the reader stops reading the socket, so a client
//! that sends faster than the disk writes is slowed by TCP, not buffered without bound.
//!
//! Shutdown: stop accepting, stop reading requests, let the requests already started finish and
//! send their replies (bounded by [`SHUTDOWN_GRACE`]), flush every volume, return.

use crate::config::NodeConfig;
use crate::errors::to_rpc;
use bytes::BytesMut;
use cairn_proto::frame::FRAME_BODY_MAX_BYTES;
use cairn_proto::message::{decode, encode};
use cairn_proto::{
    ChunkInfo, Frame, FrameCodec, FrameKind, Hello, HelloReply, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
    Request, Response, RpcError,
};
use cairn_store::{Store, StoreError, WriteStamp};
use cairn_types::Version;
use cairn_types::limits::RPC_IO_MAX_BYTES;
use futures::StreamExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long shutdown waits for requests already started before flushing and exiting anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// Replies queued for a connection's writer. Each holds its request's byte permits until the
/// writer has written it to the socket, so the byte budget, not this count, bounds memory (a
/// client that never reads its replies stops being read from); the count only bounds the queue's
/// bookkeeping.
const REPLIES_QUEUED_MAX: usize = 256;

/// A reply on its way to the socket, with the byte permits of its request (released once written).
type Queued = (BytesMut, Option<tokio::sync::OwnedSemaphorePermit>);

/// Handles metadata peer messages (`Request::Peer`): body in, body out.
pub type PeerHandler = Arc<
    dyn Fn(bytes::Bytes) -> futures::future::BoxFuture<'static, Result<bytes::Bytes, String>> + Send + Sync,
>;

/// See [`ClientHooks::serves_reads`].
pub type ServesReads = Box<dyn Fn(cairn_types::VolumeId, cairn_types::ChunkIndex) -> bool + Send + Sync>;

/// See [`ClientHooks::lease_holdback`].
pub type LeaseHoldback = Box<dyn Fn(&[u64]) -> std::time::Duration + Send + Sync>;

/// What client IO needs from the rest of the node.
pub struct ClientHooks {
    /// Whether this node may serve client reads and writes now (the cluster map knows its current
    /// process and it is not catching up).
    pub serves_clients: Box<dyn Fn() -> bool + Send + Sync>,
    /// Whether this node may serve client reads of a chunk now: it serves clients and holds a read
    /// lease for the chunk's PG from enough of its other holders (`MetaService::lease_covers`).
    pub serves_reads: ServesReads,
    /// How long the acknowledgement of a mutation recorded as missed by these peers must still be
    /// held back (until any read lease this node granted them has run out).
    pub lease_holdback: LeaseHoldback,
    /// A chunk's PG as this node's cluster map has it, checked against the peers a mutation names
    /// as having missed it (see [`PgCheck`]).
    pub pg_check: PgCheckFn,
    /// Where missed writes of peers are recorded.
    pub missed: Arc<crate::missed::MissedLog>,
    /// This node's id (a record of itself in `missed`: its copy of the chunk is to be pulled back).
    pub me: u64,
    /// A volume as this node's cluster map knows it: a mutation of a generation older than the
    /// newest is refused even if its `Fence` never reached this node; every request for a deleted
    /// volume is refused.
    pub volume_state: Box<dyn Fn(u64) -> VolumeState + Send + Sync>,
    /// Whether an address is a pool node's (in this node's cluster map): it may take the node
    /// RPC's reserved connection slots.
    pub member_ip: Box<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>,
}

/// See [`ClientHooks::pg_check`].
pub type PgCheckFn =
    Box<dyn Fn(cairn_types::VolumeId, cairn_types::ChunkIndex, &[u64]) -> PgCheck + Send + Sync>;

pub use cairn_meta::pgcheck::PgCheck;

/// A volume in a node's cluster map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    /// Not (yet) in the map: created after the map this node has, or never.
    Unknown,
    Live {
        generation: u64,
        /// Several writers share its generation (their versions are siblings, not one chain).
        shared: bool,
    },
    Deleted,
}

impl std::fmt::Debug for ClientHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHooks").finish_non_exhaustive()
    }
}

/// Parts installed once the metadata service runs (it needs the RPC server up first, to reach its
/// peers); until then peer messages and client IO are answered "starting".
#[derive(Default)]
pub struct Wiring {
    pub peer: std::sync::OnceLock<PeerHandler>,
    pub hooks: std::sync::OnceLock<ClientHooks>,
}

impl std::fmt::Debug for Wiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wiring").finish_non_exhaustive()
    }
}

pub type PeerSlot = Arc<Wiring>;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data directory: {0}")]
    Store(#[from] StoreError),
    // The cause is part of the message and not a `source`, so that a printed error chain names
    // it once.
    #[error("cannot listen on {addr}: {cause}")]
    Listen { addr: SocketAddr, cause: std::io::Error },
    #[error("metadata service: {0}")]
    Meta(String),
    #[error("{0}")]
    Startup(String),
}

/// A started node.
#[derive(Debug)]
pub struct RunningNode {
    rpc_addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

impl RunningNode {
    /// Binds the listener and starts serving `store`; peer messages go to the handler in `peer`.
    pub async fn start(
        config: &NodeConfig,
        store: Arc<Store>,
        peer: PeerSlot,
    ) -> Result<RunningNode, NodeError> {
        let listener = TcpListener::bind(config.rpc_listen_addr)
            .await
            .map_err(|source| NodeError::Listen { addr: config.rpc_listen_addr, cause: source })?;
        let rpc_addr = listener
            .local_addr()
            .map_err(|source| NodeError::Listen { addr: config.rpc_listen_addr, cause: source })?;
        let shutdown = CancellationToken::new();
        // Before the cluster map is known, the nodes named in the configuration (and this one).
        let members = config
            .meta
            .voters
            .iter()
            .map(|m| m.rpc.ip())
            .chain(config.meta.join.iter().map(|a| a.ip()))
            .chain([config.rpc_listen_addr.ip()])
            .collect();
        let limits = Limits {
            in_flight_bytes_max: config.in_flight_bytes_max,
            connections: config.limits.rpc_limiter(),
            configured_members: Arc::new(members),
            hello_timeout: config.limits.handshake_timeout(),
            // A peer that does not take a reply for this long is cut off (its requests' byte
            // permits would otherwise stay pinned forever).
            reply_write_timeout: Duration::from_millis(config.limits.reply_write_timeout_ms),
        };
        let task = tokio::spawn(serve(listener, store, limits, shutdown.clone(), peer));
        Ok(RunningNode { rpc_addr, shutdown, task })
    }

    /// The address the node RPC listens on.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// Stops the node cleanly: see the module documentation. Returns the final flush's outcome.
    pub async fn shutdown(self) -> Result<(), StoreError> {
        self.shutdown.cancel();
        self.task.await.map_err(|e| StoreError::InvalidRequest(format!("server task failed: {e}")))?
    }
}

#[derive(Debug, Clone)]
struct Limits {
    in_flight_bytes_max: u64,
    connections: cairn_types::admission::ConnectionLimiter,
    configured_members: Arc<std::collections::HashSet<std::net::IpAddr>>,
    hello_timeout: Duration,
    reply_write_timeout: Duration,
}

async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    limits: Limits,
    shutdown: CancellationToken,
    peer: PeerSlot,
) -> Result<(), StoreError> {
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    // Dropping a refused stream closes it.
                    let ip = remote.ip();
                    let member = limits.configured_members.contains(&ip)
                        || peer.hooks.get().is_some_and(|h| (h.member_ip)(ip));
                    let Some(slot) = limits.connections.admit_logged_as(Some(ip), member, "RPC") else { continue };
                    let store = store.clone();
                    let shutdown = shutdown.clone();
                    let conn_tracker = tracker.clone();
                    let peer = peer.clone();
                    let limits = limits.clone();
                    tracker.spawn(async move {
                        match serve_connection(stream, store, limits, shutdown, conn_tracker, peer).await {
                            Ok(()) | Err(ConnError::Closed) => tracing::debug!(%remote, "connection closed"),
                            Err(e) => tracing::info!(%remote, "connection closed: {e}"),
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        tracing::warn!("requests still running after {SHUTDOWN_GRACE:?}; flushing anyway");
    }
    let flushed = tokio::task::spawn_blocking(move || store.flush_all())
        .await
        .map_err(|e| StoreError::InvalidRequest(format!("flush task failed: {e}")))?;
    if let Err(e) = &flushed {
        tracing::error!("final flush failed: {e}");
    }
    flushed
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Frame(#[from] cairn_proto::FrameError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("peer closed during hello")]
    Closed,
}

fn encode_frame(version: u16, kind: FrameKind, request_id: u64, body: bytes::Bytes) -> BytesMut {
    let mut buf = BytesMut::new();
    if let Err(e) = (Frame { version, kind, request_id, body }).encode(&mut buf) {
        // A reply too large for a frame (a bug: replies are bounded) becomes an error reply.
        tracing::error!(request_id, "cannot send a reply: {e}");
        let error = Response::Error(RpcError::Io { message: format!("reply not sent: {e}") });
        let body = encode(&error).unwrap_or_default();
        buf.clear();
        let _ = (Frame { version, kind, request_id, body }).encode(&mut buf);
    }
    buf
}

async fn serve_connection(
    stream: TcpStream,
    store: Arc<Store>,
    limits: Limits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    peer: PeerSlot,
) -> Result<(), ConnError> {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut frames = FramedRead::new(read, FrameCodec);

    // Hello: agree on a version or refuse.
    let hello = tokio::time::timeout(limits.hello_timeout, frames.next())
        .await
        .map_err(|_| ConnError::Protocol("no hello within the timeout".into()))?
        .ok_or(ConnError::Closed)??;
    if hello.kind != FrameKind::Hello {
        return Err(ConnError::Protocol(format!("expected a hello, got {:?}", hello.kind)));
    }
    let hello: Hello = decode(&hello.body).map_err(|e| ConnError::Protocol(e.to_string()))?;
    let reply = match cairn_proto::negotiate(hello.version_min, hello.version_max) {
        Some(version) => HelloReply::Accepted { version },
        None => HelloReply::Refused(RpcError::UnsupportedVersion {
            peer_min: hello.version_min,
            peer_max: hello.version_max,
            ours_min: PROTOCOL_VERSION_MIN,
            ours_max: PROTOCOL_VERSION_MAX,
        }),
    };
    let body = encode(&reply).map_err(|e| ConnError::Protocol(e.to_string()))?;
    let buf = encode_frame(0, FrameKind::HelloReply, 0, body);
    write.write_all(&buf).await.map_err(cairn_proto::FrameError::Io)?;
    let HelloReply::Accepted { version } = reply else {
        return Err(ConnError::Protocol(format!(
            "no common protocol version with a peer speaking {}..={}",
            hello.version_min, hello.version_max
        )));
    };

    let (replies, mut queue) = mpsc::channel::<Queued>(REPLIES_QUEUED_MAX);
    // Cancelled when replies can no longer be written: the reader stops too (a peer that does not
    // read its replies must not go on getting requests served, with their permits released).
    let cut = CancellationToken::new();
    let writer_cut = cut.clone();
    let reply_write_timeout = limits.reply_write_timeout;
    let writer = tokio::spawn(async move {
        while let Some((buf, permit)) = queue.recv().await {
            let written = tokio::time::timeout(reply_write_timeout, write.write_all(&buf)).await;
            drop(permit);
            if !matches!(written, Ok(Ok(()))) {
                writer_cut.cancel();
                // Drain so senders never block.
                while queue.recv().await.is_some() {}
                return;
            }
        }
    });
    let budget = Arc::new(Semaphore::new(usize::try_from(limits.in_flight_bytes_max).unwrap_or(usize::MAX)));
    let result = loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = cut.cancelled() => break Err(ConnError::Protocol("the peer stopped reading its replies".into())),
            frame = frames.next() => match frame {
                None => break Ok(()),
                Some(Err(e)) => break Err(ConnError::Frame(e)),
                Some(Ok(f)) => f,
            },
        };
        if frame.kind != FrameKind::Request || frame.version != version {
            break Err(ConnError::Protocol(format!(
                "expected a version {version} request, got a version {} {:?} frame",
                frame.version, frame.kind
            )));
        }
        let id = frame.request_id;
        let request = match decode::<Request>(&frame.body) {
            Ok(r) => r,
            Err(e) => {
                // The frame was intact, so the stream is still in step: answer and go on.
                send_response(
                    &replies,
                    version,
                    id,
                    Response::Error(RpcError::InvalidRequest { message: e.to_string() }),
                    None,
                )
                .await;
                continue;
            }
        };
        if request.payload_bytes() > u64::from(RPC_IO_MAX_BYTES) {
            let message = format!(
                "request of {} bytes exceeds the limit of {RPC_IO_MAX_BYTES}",
                request.payload_bytes()
            );
            let response = Response::Error(RpcError::InvalidRequest { message });
            send_response(&replies, version, id, response, None).await;
            continue;
        }
        let cost =
            (frame.body.len() as u64).max(request.payload_bytes()).clamp(1, u64::from(FRAME_BODY_MAX_BYTES));
        drop(frame);
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = cut.cancelled() => break Err(ConnError::Protocol("the peer stopped reading its replies".into())),
            p = budget.clone().acquire_many_owned(u32::try_from(cost).unwrap_or(u32::MAX)) => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
        };
        let store = store.clone();
        let replies = replies.clone();
        let peer = peer.clone();
        tracker.spawn(async move {
            let response = match request {
                Request::Peer { body } => match peer.peer.get() {
                    Some(handler) => match handler(body).await {
                        Ok(body) => Response::Peer { body },
                        Err(message) => Response::Error(RpcError::InvalidRequest { message }),
                    },
                    None => Response::Error(RpcError::Io { message: "metadata service is starting".into() }),
                },
                request => handle(store, peer, request).await,
            };
            send_response(&replies, version, id, response, Some(permit)).await;
        });
    };
    drop(replies);
    // The writer ends when every started request has queued its reply.
    let _ = writer.await;
    result
}

async fn send_response(
    replies: &mpsc::Sender<Queued>,
    version: u16,
    id: u64,
    response: Response,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let body = match encode(&response) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("cannot encode a response: {e}");
            return;
        }
    };
    // If the writer is gone the connection is closing; the reply has nowhere to go.
    let _ = replies.send((encode_frame(version, FrameKind::Response, id, body), permit)).await;
}

/// This node as seen by a volume client running inside it (its NBD server).
#[derive(Debug)]
pub struct LocalHandler {
    pub id: u64,
    pub store: Arc<Store>,
    pub wiring: PeerSlot,
    /// Requests handled in-process (reported by `/v1/status` as `local_requests`).
    pub requests: Arc<std::sync::atomic::AtomicU64>,
}

impl cairn_client::LocalNode for LocalHandler {
    fn id(&self) -> u64 {
        self.id
    }

    fn handle(&self, request: Request) -> futures::future::BoxFuture<'static, Response> {
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(handle(self.store.clone(), self.wiring.clone(), request))
    }
}

/// Runs one client or peer-data request against the store on the blocking pool (the same path for
/// requests from the network and from a volume client inside this node).
async fn handle(store: Arc<Store>, wiring: PeerSlot, request: Request) -> Response {
    if let (Some(volume), Some(hooks)) = (request.volume(), wiring.hooks.get())
        && (hooks.volume_state)(volume.get()) == VolumeState::Deleted
    {
        return Response::Error(RpcError::Deleted { volume });
    }
    // The chunk's PG as checked before a mutation is applied (compared again after).
    let mut pre: Option<PgCheck> = None;
    let client_io = matches!(
        request,
        Request::Read { .. }
            | Request::Write { .. }
            | Request::Trim { .. }
            | Request::WriteZeroes { .. }
            | Request::Allocation { .. }
    );
    if client_io {
        let unavailable = |message: &str| Response::Error(RpcError::Unavailable { message: message.into() });
        let Some(hooks) = wiring.hooks.get() else { return unavailable("the node is starting") };
        if !(hooks.serves_clients)() {
            return unavailable("the node is catching up on writes it missed");
        }
        if let Request::Read { volume, chunk, .. } | Request::Allocation { volume, chunk, .. } = &request
            && !(hooks.serves_reads)(*volume, *chunk)
        {
            return unavailable(
                "no read lease for this chunk's PG (its peers do not confirm this copy is current)",
            );
        }
        if let Request::Write { volume, chunk, missed_by, pg_interval, .. }
        | Request::Trim { volume, chunk, missed_by, pg_interval, .. }
        | Request::WriteZeroes { volume, chunk, missed_by, pg_interval, .. } = &request
        {
            let check = (hooks.pg_check)(*volume, *chunk, missed_by);
            if let Some(why) = &check.stale {
                return unavailable(why);
            }
            // A writer routing by an older membership of the PG may leave a newer member out
            // without naming it.
            if let Some(why) = check.writer_behind(*pg_interval) {
                return unavailable(&why);
            }
            pre = Some(check);
        }
        let stamped = match &request {
            Request::Write { volume, stamp, .. }
            | Request::Trim { volume, stamp, .. }
            | Request::WriteZeroes { volume, stamp, .. } => Some((*volume, stamp.generation)),
            _ => None,
        };
        if let Some((volume, generation)) = stamped {
            let highest = match (hooks.volume_state)(volume.get()) {
                VolumeState::Live { generation, .. } => generation,
                _ => 0,
            };
            if generation.0 < highest {
                log_fenced(volume, generation.0, highest);
                return Response::Error(RpcError::Fenced {
                    volume,
                    generation,
                    highest: cairn_types::Generation(highest),
                });
            }
        }
    }
    // A copy is fenced like a write, by the map's generation too: a sender whose map lags behind
    // a new writer's open would spread what the writer it still knows left (found by the
    // production simulation).
    if let (Request::InstallRange { volume, generation, .. }, Some(hooks)) = (&request, wiring.hooks.get())
        && let VolumeState::Live { generation: highest, .. } = (hooks.volume_state)(volume.get())
        && generation.0 < highest
    {
        log_fenced(*volume, generation.0, highest);
        return Response::Error(RpcError::Fenced {
            volume: *volume,
            generation: *generation,
            highest: cairn_types::Generation(highest),
        });
    }
    // Peers a mutation records as having missed it: its acknowledgement waits out any read lease
    // this node granted them (see `MetaService::serves_reads`).
    let mut recorded: Vec<u64> = match &request {
        Request::Write { missed_by, .. }
        | Request::Trim { missed_by, .. }
        | Request::WriteZeroes { missed_by, .. } => missed_by.clone(),
        Request::RecordMissed { peers, .. } => peers.clone(),
        _ => Vec::new(),
    };
    if let Some(check) = &pre {
        recorded.extend(check.backfill.iter().filter(|p| !recorded.contains(p)).copied().collect::<Vec<_>>());
    }
    let slot = wiring.clone();
    let result = tokio::task::spawn_blocking(move || run(&store, wiring.hooks.get(), request, pre)).await;
    match result {
        Ok(Ok(response)) => {
            if let Some(h) = slot.hooks.get()
                && !recorded.is_empty()
                && matches!(response, Response::Applied { .. } | Response::Done)
            {
                let wait = (h.lease_holdback)(&recorded);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            response
        }
        Ok(Err(e)) => {
            if matches!(
                e,
                StoreError::Io { .. } | StoreError::Poisoned { .. } | StoreError::BadChunkFile { .. }
            ) {
                tracing::error!("{e}");
            }
            Response::Error(to_rpc(e))
        }
        Err(e) => Response::Error(RpcError::Io { message: format!("request task failed: {e}") }),
    }
}

/// Logs a refused mutation of a superseded writer: the first of each second (a fenced writer
/// may keep trying), so the refusal leaves a trace without flooding the log.
fn log_fenced(volume: cairn_types::VolumeId, generation: u64, highest: u64) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if LAST.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
        tracing::info!(
            %volume,
            "refused a mutation of writer generation {generation}: the volume's writer is generation \
             {highest} (the old writer was fenced)"
        );
    }
}

fn record_missed(
    hooks: Option<&ClientHooks>,
    peers: &[u64],
    volume: cairn_types::VolumeId,
    chunk: cairn_types::ChunkIndex,
    chunk_size: cairn_types::ChunkSize,
) -> Result<(), StoreError> {
    if peers.is_empty() {
        return Ok(());
    }
    let hooks = hooks.ok_or_else(|| StoreError::InvalidRequest("the node is starting".into()))?;
    hooks.missed.record(peers, volume.get(), chunk.0, chunk_size.bytes()).map_err(|e| StoreError::Io {
        context: format!("recording missed writes in {}", hooks.missed.path().display()),
        cause: e,
    })
}

/// For a mutation applied here and recorded as missed by peers: if this node's map now finds the
/// writer's map stale, or the PG's members moved since the check before (see
/// [`PgCheck::refusal`]), the mutation is not acknowledged from here ("stale map": the writer
/// refreshes and sends it again with the same stamp, and then it counts). The record stays: it
/// keeps a named node's serving barrier down and sends it back to catching up, and the copy is
/// skipped at once if the node holds this version by then.
fn refuse_if_stale(now: Option<&PgCheck>, pre: Option<&PgCheck>) -> Option<Response> {
    let why = now?.refusal(pre)?;
    Some(Response::Error(RpcError::Unavailable { message: why }))
}

/// See [`PgCheck::to_record`].
fn peers_to_record(now: Option<&PgCheck>, missed_by: &[u64]) -> Vec<u64> {
    PgCheck::to_record(now, missed_by)
}

/// A chunk's state as peers see it, with the peers this node recorded as having missed it.
fn chunk_info(
    s: cairn_store::ChunkState,
    hooks: Option<&ClientHooks>,
    (volume, chunk): (cairn_types::VolumeId, cairn_types::ChunkIndex),
    fence: cairn_types::Generation,
) -> ChunkInfo {
    ChunkInfo {
        generation: s.generation,
        version: s.version,
        last_sequence: s.last_sequence,
        dirty: s.dirty,
        missed_by: hooks.map(|h| h.missed.missed_by(volume.get(), chunk.0)).unwrap_or_default(),
        fence,
        serving: hooks.is_some_and(|h| (h.serves_clients)()),
    }
}

/// Per-chunk (striped) locks that make a record of missed writes and the checks that depend on it
/// one step with respect to installs: a mutation applied and recorded as missed by peers, a
/// `RecordMissed` checked against the copy's version, and an `InstallRange` checked against the
/// records (see `Request::RecordMissed::at` and `Request::InstallRange::source`). Taken outside the
/// store's own chunk lock, only by requests that record or name a source.
static RECORD_STRIPES: [std::sync::Mutex<()>; 64] = [const { std::sync::Mutex::new(()) }; 64];

fn record_stripe(
    volume: cairn_types::VolumeId,
    chunk: cairn_types::ChunkIndex,
) -> std::sync::MutexGuard<'static, ()> {
    let h = volume.get().wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ chunk.0.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    let stripe = &RECORD_STRIPES[(h >> 58) as usize];
    stripe.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(
    store: &Store,
    hooks: Option<&ClientHooks>,
    request: Request,
    pre: Option<PgCheck>,
) -> Result<Response, StoreError> {
    let check = |volume, chunk, missed_by: &[u64]| hooks.map(|h| (h.pg_check)(volume, chunk, missed_by));
    // A mutation takes the record lock if it records anything (named peers, or backfill members
    // as checked before it; the look after it is applied, under the lock, decides what is
    // recorded).
    let needs_stripe =
        |missed_by: &[u64]| !missed_by.is_empty() || pre.as_ref().is_some_and(|c| !c.backfill.is_empty());
    let stamp = |s: cairn_proto::Stamp| WriteStamp {
        generation: s.generation,
        sequence: s.sequence,
        expect: s.expect,
    };
    Ok(match request {
        Request::Read { volume, chunk, chunk_size, offset, len }
        | Request::ReadCopy { volume, chunk, chunk_size, offset, len } => {
            let r = store.read(volume, chunk, chunk_size, offset, len)?;
            Response::Read { crcs: r.crcs, data: r.data.into(), present: r.present, version: r.version }
        }
        Request::Write { volume, chunk, chunk_size, offset, stamp: s, crcs, data, missed_by, .. } => {
            let _stripe = needs_stripe(&missed_by).then(|| record_stripe(volume, chunk));
            let version = store.write(volume, chunk, chunk_size, offset, &data, &crcs, stamp(s))?;
            // Before the acknowledgement: an acknowledged write a peer missed is never forgotten.
            let now = check(volume, chunk, &missed_by);
            record_missed(hooks, &peers_to_record(now.as_ref(), &missed_by), volume, chunk, chunk_size)?;
            refuse_if_stale(now.as_ref(), pre.as_ref()).unwrap_or(Response::Applied { version })
        }
        Request::RecordMissed { volume, chunk, chunk_size, peers, at, settled } => {
            let _stripe = record_stripe(volume, chunk);
            if let Some(at) = at {
                // A copy this node recorded itself as missing (back from a power loss, or its
                // catch-up found it differs) is to be pulled back from an in-sync replica, which
                // may not have the write being acknowledged yet: it does not count as holding it
                // (found by the production simulation, seed 201 397: pulled back, the write was
                // gone from here, unrecorded).
                if hooks.is_some_and(|h| h.missed.missed_by(volume.get(), chunk.0).contains(&h.me)) {
                    return Ok(Response::Error(RpcError::Unavailable {
                        message: "this node's copy of the chunk is to be pulled back from its peers".into(),
                    }));
                }
                // The write being acknowledged must still be here: a copy installed over it since
                // (another shared writer's reconciliation) no longer holds it.
                let current = store.chunk_version(volume, chunk)?;
                if current != at {
                    return Err(StoreError::VersionMismatch {
                        volume,
                        chunk,
                        current,
                        expected: cairn_types::Expected::Exact(at),
                        behind: current < at,
                    });
                }
            }
            match settled {
                Some(generation) => {
                    let hooks =
                        hooks.ok_or_else(|| StoreError::InvalidRequest("the node is starting".into()))?;
                    hooks
                        .missed
                        .record_settled(&peers, (volume.get(), chunk.0, chunk_size.bytes()), generation.0)
                        .map_err(|e| StoreError::Io {
                            context: format!("recording missed writes in {}", hooks.missed.path().display()),
                            cause: e,
                        })?;
                }
                None => record_missed(hooks, &peers, volume, chunk, chunk_size)?,
            }
            Response::Done
        }
        Request::Allocation { volume, chunk, chunk_size, offset, len } => {
            Response::Allocation { present: store.allocation(volume, chunk, chunk_size, offset, len)? }
        }
        Request::InstallRange {
            volume,
            chunk,
            chunk_size,
            offset,
            present,
            crcs,
            data,
            generation,
            version,
            expect,
            source,
            settled,
            dirty,
        } => {
            // A copy installed here while this node holds the PG changes what a node being filled
            // must get (a writer's settle, an open's reconciliation): recorded for it, under the
            // record lock, once installed (from the map as it is then: a seed made after this
            // node's map showed the fill lists the chunk after the install, or this records it).
            let _stripe = record_stripe(volume, chunk);
            if let Some(source) = source {
                // A copy from a node recorded here as having missed a write to the chunk would undo
                // that write (the record came after the copy was planned): refused, unless an
                // open settled it or this node is unsure of its copy and it is newer
                // (`RecordedSource::taken`).
                let Some(hooks) = hooks else {
                    return Ok(Response::Error(RpcError::Unavailable {
                        message: "the node is starting".into(),
                    }));
                };
                if let Some(recorded) = hooks.missed.entry_settled(source, volume.get(), chunk.0) {
                    let current = store.chunk_version(volume, chunk)?;
                    let (map_generation, one_chain) = match (hooks.volume_state)(volume.get()) {
                        VolumeState::Live { generation, shared } => (generation, !shared),
                        _ => (0, false),
                    };
                    let mut offered = cairn_types::RecordedSource {
                        recorded,
                        settled: settled.map_or(0, |g| g.0),
                        current,
                        copy: version,
                        unsure: hooks.missed.entry_settled(hooks.me, volume.get(), chunk.0).is_some(),
                        one_chain,
                        current_generation: store.highest_generation(volume)?.0.max(map_generation),
                    };
                    if !offered.settles() && offered.takes_newer() {
                        // This node stays unsure of the copy it takes: its record of itself is
                        // renewed (a new seq), so that a pull of its own copy back that read an
                        // older one and finishes after this install does not end it (found by
                        // review). If that pull ended it just now, this node is sure again and
                        // the copy is refused.
                        offered.unsure = hooks.missed.renew_if_present(hooks.me, volume.get(), chunk.0);
                    }
                    if !offered.taken() {
                        return Err(StoreError::VersionMismatch {
                            volume,
                            chunk,
                            current,
                            expected: cairn_types::Expected::Exact(expect.unwrap_or(Version::NONE)),
                            behind: false,
                        });
                    }
                }
            }
            store.install_range(
                volume, chunk, chunk_size, offset, &present, &data, &crcs, generation, version, expect, dirty,
            )?;
            // (Only while this node serves: a copy installed on a holder that is catching up
            // repeats a version an in-sync holder already recorded for the fill or gave it.)
            let serving = hooks.is_some_and(|h| (h.serves_clients)());
            let filling = check(volume, chunk, &[])
                .filter(|c| c.holder && serving)
                .map(|c| c.backfill)
                .unwrap_or_default();
            record_missed(hooks, &filling, volume, chunk, chunk_size)?;
            Response::Done
        }
        Request::Repair { volume, chunk, chunk_size, offset, crcs, data } => {
            let rewritten = store.repair(volume, chunk, chunk_size, offset, &data, &crcs)?;
            if rewritten > 0 {
                tracing::warn!(volume = %volume, chunk = chunk.0, rewritten, "repaired corrupt blocks from a replica");
            }
            Response::Done
        }
        Request::Trim { volume, chunk, chunk_size, offset, len, stamp: s, missed_by, .. } => {
            let _stripe = needs_stripe(&missed_by).then(|| record_stripe(volume, chunk));
            let version = store.trim(volume, chunk, chunk_size, offset, len, stamp(s))?;
            let now = check(volume, chunk, &missed_by);
            record_missed(hooks, &peers_to_record(now.as_ref(), &missed_by), volume, chunk, chunk_size)?;
            refuse_if_stale(now.as_ref(), pre.as_ref()).unwrap_or(Response::Applied { version })
        }
        Request::WriteZeroes {
            volume,
            chunk,
            chunk_size,
            offset,
            len,
            stamp: s,
            allocate,
            missed_by,
            ..
        } => {
            let _stripe = needs_stripe(&missed_by).then(|| record_stripe(volume, chunk));
            let version = store.write_zeroes(volume, chunk, chunk_size, offset, len, stamp(s), allocate)?;
            let now = check(volume, chunk, &missed_by);
            record_missed(hooks, &peers_to_record(now.as_ref(), &missed_by), volume, chunk, chunk_size)?;
            refuse_if_stale(now.as_ref(), pre.as_ref()).unwrap_or(Response::Applied { version })
        }
        Request::Flush { volume } => {
            store.flush(volume)?;
            Response::Done
        }
        Request::Peer { .. } => {
            return Err(StoreError::InvalidRequest("peer message routed to the store".into()));
        }
        Request::Fence { volume, generation } => {
            store.raise_fence(volume, generation)?;
            let fence = store.highest_generation(volume)?;
            let mut dirty = Vec::new();
            for chunk in store.dirty_chunks(volume)? {
                if let Some(s) = store.chunk_state(volume, chunk)? {
                    dirty.push((chunk, chunk_info(s, hooks, (volume, chunk), fence)));
                }
            }
            let serving = hooks.is_some_and(|h| (h.serves_clients)());
            Response::FenceRaised { dirty, serving }
        }
        Request::ChunkVersion { volume, chunk } => {
            let fence = store.highest_generation(volume)?;
            Response::ChunkVersion(
                store.chunk_state(volume, chunk)?.map(|s| chunk_info(s, hooks, (volume, chunk), fence)),
            )
        }
        Request::ListChunks { volume, after, limit } => {
            let limit = limit.clamp(1, cairn_proto::message::CHUNK_LIST_MAX) as usize;
            let mut chunks: Vec<cairn_types::ChunkIndex> =
                store.list_chunks(volume)?.into_iter().filter(|c| after.is_none_or(|a| *c > a)).collect();
            let more = chunks.len() > limit;
            chunks.truncate(limit);
            Response::ChunkList { chunks, more }
        }
    })
}
