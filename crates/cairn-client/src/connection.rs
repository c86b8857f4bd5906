//! A pipelined node-RPC connection: many requests in flight, replies matched by request id in any
//! order. One task writes the frames callers queue (so a caller that gives up mid-way can never leave
//! half a frame on the socket); one task reads replies and hands each to its caller.
//!
//! Bounds: at most [`REQUESTS_IN_FLIGHT_MAX`] requests are outstanding; further callers wait for a
//! slot (backpressure). When the connection fails, every waiting caller gets the error.

use bytes::BytesMut;
use cairn_proto::message::{decode, encode};
use cairn_proto::{
    Frame, FrameCodec, FrameKind, Hello, HelloReply, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, Request,
    Response, RpcError,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::codec::FramedRead;

/// Most requests outstanding on one connection. 256 covers a guest's queue depth (QEMU uses up to
/// 128 per disk) with room for replication fan-out, and bounds the reply-slot table.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 256;

/// How long connecting and the hello may take before the node is considered unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot connect to storage node {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("connection to storage node {addr} lost: {message}")]
    Lost { addr: SocketAddr, message: String },
    #[error("storage node {addr} refused the connection: {error}")]
    Refused { addr: SocketAddr, error: RpcError },
    #[error("storage node {addr} sent a malformed reply: {message}")]
    Protocol { addr: SocketAddr, message: String },
}

type Pending = Arc<Mutex<PendingTable>>;

#[derive(Debug, Default)]
struct PendingTable {
    waiters: HashMap<u64, oneshot::Sender<Result<Response, ConnectionError>>>,
    /// Set once the connection failed; later callers get it at once.
    failed: Option<ConnectionError>,
    /// The highest request id sent: a reply to a lower id without a waiter is a late one (its
    /// caller gave up), dropped; a reply to a higher one was never asked for.
    highest: u64,
}

/// A connection to one storage node.
#[derive(Debug)]
pub struct NodeConnection {
    addr: SocketAddr,
    version: u16,
    outgoing: tokio::sync::mpsc::Sender<BytesMut>,
    pending: Pending,
    next_id: AtomicU64,
    slots: Semaphore,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for NodeConnection {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

fn lock(p: &Pending) -> std::sync::MutexGuard<'_, PendingTable> {
    match p.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

impl NodeConnection {
    /// Connects and negotiates the protocol version.
    pub async fn connect(addr: SocketAddr) -> Result<NodeConnection, ConnectionError> {
        let connect_err = |message: String| ConnectionError::Connect { addr, message };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| connect_err(e.to_string()))?;
        let (read, mut write) = stream.into_split();
        let hello = Hello { version_min: PROTOCOL_VERSION_MIN, version_max: PROTOCOL_VERSION_MAX };
        let body = encode(&hello).map_err(|e| connect_err(e.to_string()))?;
        let mut buf = BytesMut::new();
        Frame { version: 0, kind: FrameKind::Hello, request_id: 0, body }
            .encode(&mut buf)
            .map_err(|e| connect_err(e.to_string()))?;
        let mut frames = FramedRead::new(read, FrameCodec);
        let version = tokio::time::timeout(CONNECT_TIMEOUT, async {
            write.write_all(&buf).await.map_err(|e| connect_err(e.to_string()))?;
            let frame = frames
                .next()
                .await
                .ok_or_else(|| connect_err("closed during hello".into()))?
                .map_err(|e| connect_err(e.to_string()))?;
            if frame.kind != FrameKind::HelloReply {
                return Err(ConnectionError::Protocol { addr, message: "expected a hello reply".into() });
            }
            match decode::<HelloReply>(&frame.body) {
                Ok(HelloReply::Accepted { version }) => Ok(version),
                Ok(HelloReply::Refused(error)) => Err(ConnectionError::Refused { addr, error }),
                Err(e) => Err(ConnectionError::Protocol { addr, message: e.to_string() }),
            }
        })
        .await
        .map_err(|_| connect_err("hello timed out".into()))??;
        let pending: Pending = Arc::default();
        let reader = tokio::spawn(read_replies(addr, frames, pending.clone()));
        let (outgoing, queue) = tokio::sync::mpsc::channel(REQUESTS_IN_FLIGHT_MAX);
        let writer = tokio::spawn(write_requests(addr, write, queue, pending.clone()));
        Ok(NodeConnection {
            addr,
            version,
            outgoing,
            writer,
            pending,
            next_id: AtomicU64::new(1),
            slots: Semaphore::new(REQUESTS_IN_FLIGHT_MAX),
            reader,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Sends `request` and waits for its response. An error response from the node is returned as
    /// `Ok(Response::Error(..))`; `Err` means the connection itself failed.
    pub async fn call(&self, request: &Request) -> Result<Response, ConnectionError> {
        let lost = |message: String| ConnectionError::Lost { addr: self.addr, message };
        let _slot = self.slots.acquire().await.map_err(|_| lost("closed".into()))?;
        let body = encode(request)
            .map_err(|e| ConnectionError::Protocol { addr: self.addr, message: e.to_string() })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut table = lock(&self.pending);
            if let Some(e) = &table.failed {
                return Err(e.clone());
            }
            table.waiters.insert(id, tx);
            table.highest = table.highest.max(id);
        }
        // Removes the waiter however this call ends: also when the caller gives up on it (a
        // timeout drops this future), so a node that never answers leaves no waiters behind.
        let _waiter = Waiter { pending: &self.pending, id };
        let mut buf = BytesMut::new();
        let frame = Frame { version: self.version, kind: FrameKind::Request, request_id: id, body };
        if let Err(e) = frame.encode(&mut buf) {
            return Err(ConnectionError::Protocol { addr: self.addr, message: e.to_string() });
        }
        if self.outgoing.send(buf).await.is_err() {
            return Err(lost("writer task ended".into()));
        }
        rx.await.map_err(|_| lost("reply task ended".into()))?
    }

    /// Whether the connection has failed (closed, or a protocol error): nothing more goes on it.
    pub fn has_failed(&self) -> bool {
        lock(&self.pending).failed.is_some()
    }

    /// Requests waiting for their reply (each removed when its reply comes or its caller gives up).
    pub fn waiting(&self) -> usize {
        lock(&self.pending).waiters.len()
    }
}

/// A call's entry in the table of requests waiting for replies; removed when dropped.
struct Waiter<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        lock(self.pending).waiters.remove(&self.id);
    }
}

async fn write_requests(
    addr: SocketAddr,
    mut write: OwnedWriteHalf,
    mut queue: tokio::sync::mpsc::Receiver<BytesMut>,
    pending: Pending,
) {
    while let Some(buf) = queue.recv().await {
        if let Err(e) = write.write_all(&buf).await {
            fail_all(&pending, ConnectionError::Lost { addr, message: e.to_string() });
            return;
        }
    }
}

fn fail_all(pending: &Pending, failure: ConnectionError) {
    let mut table = lock(pending);
    for (_, tx) in table.waiters.drain() {
        let _ = tx.send(Err(failure.clone()));
    }
    if table.failed.is_none() {
        table.failed = Some(failure);
    }
}

async fn read_replies(
    addr: SocketAddr,
    mut frames: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    pending: Pending,
) {
    let failure = loop {
        let frame = match frames.next().await {
            None => {
                break ConnectionError::Lost { addr, message: "closed by the storage node".into() };
            }
            Some(Err(e)) => {
                break ConnectionError::Lost { addr, message: e.to_string() };
            }
            Some(Ok(f)) => f,
        };
        if frame.kind != FrameKind::Response {
            break ConnectionError::Protocol { addr, message: format!("unexpected {:?} frame", frame.kind) };
        }
        let response = match decode::<Response>(&frame.body) {
            Ok(r) => r,
            Err(e) => {
                break ConnectionError::Protocol { addr, message: e.to_string() };
            }
        };
        let (waiter, highest) = {
            let mut table = lock(&pending);
            (table.waiters.remove(&frame.request_id), table.highest)
        };
        match waiter {
            Some(tx) => {
                let _ = tx.send(Ok(response));
            }
            // Its caller gave up on it (a timeout): the other calls on this connection go on.
            None if frame.request_id <= highest => {}
            None => {
                break ConnectionError::Protocol {
                    addr,
                    message: format!("reply to unknown request {}", frame.request_id),
                };
            }
        }
    };
    tracing::debug!(%addr, error = %failure, "node connection ended");
    fail_all(&pending, failure);
}

/// One address's slot in the pool: its connection, if any. Callers to the same node wait on this
/// slot's lock while one of them connects; callers to other nodes never do.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<NodeConnection>>>>;

/// Connections to many nodes, one each, opened on first use and dropped when they fail.
///
/// Connecting happens outside the pool-wide lock (which guards only the address → slot table and is
/// never held across an await), so a node that accepts TCP but never answers the hello delays only
/// the callers that want that node, never calls to healthy ones.
#[derive(Debug, Clone, Default)]
pub struct ConnectionPool {
    slots: Arc<Mutex<HashMap<SocketAddr, Slot>>>,
}

impl ConnectionPool {
    fn slot(&self, addr: SocketAddr) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(addr).or_default().clone()
    }

    /// The connection to `addr`, connecting if there is none.
    pub async fn get(&self, addr: SocketAddr) -> Result<Arc<NodeConnection>, ConnectionError> {
        let slot = self.slot(addr);
        let mut conn = slot.lock().await;
        // A connection known to have failed (the node closed it: it restarted, say) is replaced
        // before anything is sent on it: the request would fail without reaching the node, and
        // the node be suspected for nothing.
        if let Some(c) = conn.as_ref().filter(|c| !c.has_failed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(NodeConnection::connect(addr).await?);
        *conn = Some(c.clone());
        Ok(c)
    }

    /// Forgets `conn` (it failed); the next `get` reconnects.
    pub async fn forget(&self, conn: &Arc<NodeConnection>) {
        let slot = self.slot(conn.addr());
        let mut current = slot.lock().await;
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *current = None;
        }
    }

    /// Sends `request` on the pooled connection to `addr`, forgetting the connection if it fails.
    pub async fn call(&self, addr: SocketAddr, request: &Request) -> Result<Response, ConnectionError> {
        let conn = self.get(addr).await?;
        let r = conn.call(request).await;
        if r.is_err() {
            self.forget(&conn).await;
        }
        r
    }

    /// Like [`ConnectionPool::call`], bounded by `timeout` (connecting included). A connection on
    /// which a call timed out is forgotten too: after a partition it may sit in TCP's retransmission
    /// back-off for a minute while a new connection would get through at once; calls already on
    /// it finish (or time out) there.
    pub async fn call_within(
        &self,
        addr: SocketAddr,
        request: &Request,
        timeout: std::time::Duration,
    ) -> Result<Response, ConnectionError> {
        let timed_out = |what: &str| ConnectionError::Lost {
            addr,
            message: format!("{what} within {} ms", timeout.as_millis()),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let conn = tokio::time::timeout_at(deadline, self.get(addr))
            .await
            .map_err(|_| timed_out("not connected"))??;
        match tokio::time::timeout_at(deadline, conn.call(request)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.forget(&conn).await;
                Err(e)
            }
            Err(_) => {
                self.forget(&conn).await;
                Err(timed_out("no answer"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that accepts TCP but never answers must not delay calls to another node
    /// (issue: one frozen node demoted healthy ones because connecting held the pool's lock).
    #[tokio::test]
    async fn a_frozen_node_does_not_block_connections_to_others() {
        let frozen = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let frozen_addr = frozen.local_addr().unwrap();
        // Accepts (the kernel's backlog does) and never reads or writes.
        let pool = ConnectionPool::default();
        let p = pool.clone();
        let stuck = tokio::spawn(async move { p.get(frozen_addr).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A second address with nothing listening: the attempt must fail at once (refused), not
        // wait behind the frozen node's 5 s connect timeout.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let started = std::time::Instant::now();
        let r = pool.get(closed_addr).await;
        assert!(r.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a call to another node waited {:?} behind the frozen one",
            started.elapsed()
        );
        stuck.abort();
        drop(frozen);
    }

    /// A node that completes the hello and then answers late: calls given up on by their callers
    /// (timeouts) leave no waiters behind, and their late replies do not end the connection.
    #[tokio::test]
    async fn calls_given_up_on_leave_no_waiters_and_late_replies_keep_the_connection() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = silent.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut frames = FramedRead::new(read, FrameCodec);
            let _hello = frames.next().await;
            let reply = HelloReply::Accepted { version: PROTOCOL_VERSION_MAX };
            let mut buf = BytesMut::new();
            Frame { version: 0, kind: FrameKind::HelloReply, request_id: 0, body: encode(&reply).unwrap() }
                .encode(&mut buf)
                .unwrap();
            write.write_all(&buf).await.unwrap();
            // Answers each request 50 ms late (its caller gave up after 5 ms), then answers the
            // last one at once.
            let mut n = 0;
            while let Some(Ok(frame)) = frames.next().await {
                n += 1;
                if n <= 20 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let body = encode(&Response::Done).unwrap();
                let mut buf = BytesMut::new();
                Frame {
                    version: PROTOCOL_VERSION_MAX,
                    kind: FrameKind::Response,
                    request_id: frame.request_id,
                    body,
                }
                .encode(&mut buf)
                .unwrap();
                write.write_all(&buf).await.unwrap();
            }
        });
        let conn = NodeConnection::connect(addr).await.unwrap();
        let request = Request::ChunkVersion {
            volume: cairn_types::VolumeId::new(1).unwrap(),
            chunk: cairn_types::ChunkIndex(0),
        };
        for _ in 0..20 {
            let r = tokio::time::timeout(Duration::from_millis(5), conn.call(&request)).await;
            assert!(r.is_err(), "the node answers late");
        }
        assert_eq!(conn.waiting(), 0);
        // The late replies do not end the connection: a call after them is answered.
        let r = tokio::time::timeout(Duration::from_secs(5), conn.call(&request)).await;
        assert!(matches!(r, Ok(Ok(Response::Done))), "{r:?}");
        server.abort();
    }
}
