//! The NBD server: handshake, option haggling and transmission over any byte stream (TCP or unix
//! socket).
//!
//! Transmission: one task reads requests, each request runs as its own task against the
//! connection's `VolumeClient`, and one task writes replies in completion order. Bounded: at most
//! [`REQUESTS_IN_FLIGHT_MAX`] requests and [`IN_FLIGHT_BYTES_MAX`] payload bytes in flight per
//! connection; beyond that the reader stops reading the socket.

use crate::proto::*;
use cairn_client::{ClientConfig, IoError, MetaClient, MetaClientError, VolumeClient};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Requests in flight per connection: above QEMU's default queue depth.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Payload bytes in flight per connection: four maximal requests.
pub const IN_FLIGHT_BYTES_MAX: u32 = 4 * PAYLOAD_MAX;

/// How long one reply may take to be written: a client that stops reading its replies for this
/// long is cut off (its requests' permits would otherwise stay pinned).
const REPLY_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A request's slot and byte permits, held until its reply is written.
type Permits = (tokio::sync::OwnedSemaphorePermit, tokio::sync::OwnedSemaphorePermit);

/// Limits of one NBD listener.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections served at once; a connection beyond it is accepted and closed at once (so the
    /// client sees a clean end instead of waiting in the backlog), and logged.
    pub connections_max: usize,
    /// Of those, most from one client address (TCP only).
    pub connections_per_client_max: usize,
    /// How long a client may take from connecting to choosing its export.
    pub handshake_timeout: std::time::Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            connections_max: 1024,
            connections_per_client_max: 1024,
            handshake_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// The volumes a server exports: every volume of the pool, by name.
#[derive(Debug)]
pub struct Exports {
    pub meta: Arc<MetaClient>,
    pub config: ClientConfig,
    pub limits: ServerLimits,
}

impl Exports {
    async fn open(&self, name: &str) -> Result<Option<Arc<VolumeClient>>, String> {
        match VolumeClient::open(self.meta.clone(), name, self.config.clone()).await {
            Ok(c) => Ok(Some(c)),
            Err(MetaClientError::UnknownVolume(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn list(&self) -> Result<Vec<String>, String> {
        Ok(self.meta.volumes().await.map_err(|e| e.to_string())?.into_iter().map(|v| v.name).collect())
    }
}

/// Accepts NBD connections on TCP until `stop` is cancelled.
pub async fn serve_tcp(listener: tokio::net::TcpListener, exports: Arc<Exports>, stop: CancellationToken) {
    let accept = || async {
        let (stream, remote) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, Some(remote.ip())))
    };
    accept_loop(accept, exports, stop).await;
}

/// Accepts NBD connections on a unix socket until `stop` is cancelled.
pub async fn serve_unix(listener: tokio::net::UnixListener, exports: Arc<Exports>, stop: CancellationToken) {
    accept_loop(|| async { listener.accept().await.map(|(s, _)| (s, None)) }, exports, stop).await;
}

/// Serves every accepted stream until `stop`; then waits (bounded) for connections to finish.
async fn accept_loop<S, F, Fut>(mut accept: F, exports: Arc<Exports>, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(S, Option<std::net::IpAddr>)>>,
{
    let tracker = TaskTracker::new();
    let connections = cairn_types::admission::ConnectionLimiter::new(
        exports.limits.connections_max,
        exports.limits.connections_per_client_max,
    );
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = accept() => match accepted {
                Ok((stream, client)) => {
                    // Dropping a refused stream closes it.
                    let Some(slot) = connections.admit_logged(client, "NBD") else { continue };
                    let exports = exports.clone();
                    let stop = stop.clone();
                    tracker.spawn(async move {
                        if let Err(e) = serve_connection(stream, exports, stop).await {
                            tracing::info!("NBD connection closed: {e}");
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("NBD accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
    tracker.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), tracker.wait()).await;
}

async fn option_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await
}

fn transmission_flags(shared: bool) -> u16 {
    let mut f = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_SEND_DF
        | TF_SEND_CACHE;
    // Several connections may write only to a shared volume (each exclusive connection takes its own
    // generation and fences the others); a flush then covers every connection's writes.
    if shared {
        f |= TF_CAN_MULTI_CONN;
    }
    f
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Serves one NBD client until it disconnects.
pub async fn serve_connection<S>(
    stream: S,
    exports: Arc<Exports>,
    stop: CancellationToken,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let limit = exports.limits.handshake_timeout;
    let negotiated = match tokio::time::timeout(limit, handshake(&mut r, &mut w, &exports)).await {
        Ok(n) => n?,
        Err(_) => {
            return Err(NbdError::Protocol(format!(
                "handshake not finished within {} s (handshake_timeout)",
                limit.as_secs_f64()
            )));
        }
    };
    let Some((client, structured, meta_context)) = negotiated else { return Ok(()) };
    transmit(r, w, client, structured, meta_context, stop).await
}

/// The option haggling phase: the volume the client chose, whether it asked for structured replies
/// and the `base:allocation` context, or `None` if it aborted.
async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &Exports,
) -> Result<Option<(Arc<VolumeClient>, bool, bool)>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&NBDMAGIC.to_be_bytes()).await?;
    w.write_all(&IHAVEOPT.to_be_bytes()).await?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()).await?;
    let client_flags = r.read_u32().await?;
    if client_flags & CLIENT_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol("client does not speak fixed newstyle".into()));
    }
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;
    let mut structured = false;
    let mut meta_context = false;
    let client = loop {
        if r.read_u64().await? != IHAVEOPT {
            return Err(NbdError::Protocol("bad option magic".into()));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > OPTION_LEN_MAX {
            return Err(NbdError::Protocol(format!("option of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(data)
                    .map_err(|_| NbdError::Protocol("export name not UTF-8".into()))?;
                let Some(client) = exports.open(&name).await.map_err(NbdError::Protocol)? else {
                    return Err(NbdError::Protocol(format!("no volume named {name:?}")));
                };
                w.write_all(&client.size_bytes().to_be_bytes()).await?;
                w.write_all(&transmission_flags(client.shared()).to_be_bytes()).await?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124]).await?;
                }
                break client;
            }
            OPT_ABORT => {
                option_reply(w, opt, REP_ACK, &[]).await?;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(w, opt, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                match exports.list().await {
                    Ok(names) => {
                        for name in names {
                            let mut d = (name.len() as u32).to_be_bytes().to_vec();
                            d.extend_from_slice(name.as_bytes());
                            option_reply(w, opt, REP_SERVER, &d).await?;
                        }
                        option_reply(w, opt, REP_ACK, &[]).await?;
                    }
                    Err(e) => option_reply(w, opt, REP_ERR_UNSUP, e.as_bytes()).await?,
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(w, opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data").await?;
                    continue;
                }
                structured = true;
                option_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let parsed = parse_info_request(&data);
                let Some((name, requests)) = parsed else {
                    option_reply(w, opt, REP_ERR_INVALID, b"malformed INFO/GO request").await?;
                    continue;
                };
                let client = match exports.open(&name).await {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        option_reply(w, opt, REP_ERR_UNKNOWN, format!("no volume named {name:?}").as_bytes())
                            .await?;
                        continue;
                    }
                    Err(e) => {
                        option_reply(w, opt, REP_ERR_UNSUP, e.as_bytes()).await?;
                        continue;
                    }
                };
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&client.size_bytes().to_be_bytes());
                d.extend_from_slice(&transmission_flags(client.shared()).to_be_bytes());
                option_reply(w, opt, REP_INFO, &d).await?;
                if requests.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    option_reply(w, opt, REP_INFO, &d).await?;
                }
                if requests.contains(&INFO_BLOCK_SIZE) {
                    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [BLOCK_SIZE_MIN, BLOCK_SIZE_PREFERRED, PAYLOAD_MAX] {
                        d.extend_from_slice(&v.to_be_bytes());
                    }
                    option_reply(w, opt, REP_INFO, &d).await?;
                }
                option_reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    break client;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if opt == OPT_SET_META_CONTEXT && !structured {
                    option_reply(w, opt, REP_ERR_INVALID, b"negotiate structured replies first").await?;
                    continue;
                }
                let parsed = parse_meta_context_request(&data).map(|(_, queries)| queries);
                let Some(queries) = parsed else {
                    option_reply(w, opt, REP_ERR_INVALID, b"malformed meta context request").await?;
                    continue;
                };
                let matched = if opt == OPT_LIST_META_CONTEXT && queries.is_empty() {
                    true
                } else {
                    queries
                        .iter()
                        .any(|q| q == BASE_ALLOCATION || (opt == OPT_LIST_META_CONTEXT && q == "base:"))
                };
                if matched {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    option_reply(w, opt, REP_META_CONTEXT, &d).await?;
                }
                if opt == OPT_SET_META_CONTEXT {
                    meta_context = matched;
                }
                option_reply(w, opt, REP_ACK, &[]).await?;
            }
            other => {
                option_reply(w, other, REP_ERR_UNSUP, format!("option {other} is not supported").as_bytes())
                    .await?;
            }
        }
    };
    Ok(Some((client, structured, meta_context)))
}

fn errno(e: &IoError) -> u32 {
    match e {
        IoError::Fenced => EPERM,
        IoError::NoSpace => ENOSPC,
        IoError::Invalid(_) => EINVAL,
        IoError::Io(_) | IoError::Deleted(_) => EIO,
    }
}

fn simple_reply(handle: u64, error: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn structured_chunk(handle: u64, flags: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn error_reply(handle: u64, error: u32, message: &str, structured_read: bool) -> Vec<u8> {
    if structured_read {
        let msg = &message.as_bytes()[..message.len().min(4096)];
        let mut p = error.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg);
        structured_chunk(handle, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &p)
    } else {
        simple_reply(handle, error, &[])
    }
}

async fn transmit<R, W>(
    mut r: R,
    mut w: W,
    client: Arc<VolumeClient>,
    structured: bool,
    meta_context: bool,
    stop: CancellationToken,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let size = client.size_bytes();
    // Each queued reply carries its request's slot and byte permits, released once it is written:
    // a client that sends requests but never reads replies stops being read from (the limits
    // bound what it pins), and one that stops reading for REPLY_WRITE_TIMEOUT is cut off.
    let (tx, mut rx) = mpsc::channel::<(Vec<u8>, Option<Permits>)>(REQUESTS_IN_FLIGHT_MAX);
    // Cancelled when replies can no longer be written: the reader stops too.
    let cut = CancellationToken::new();
    let writer_cut = cut.clone();
    let writer = tokio::spawn(async move {
        while let Some((buf, permits)) = rx.recv().await {
            let written = tokio::time::timeout(REPLY_WRITE_TIMEOUT, w.write_all(&buf)).await;
            drop(permits);
            if !matches!(written, Ok(Ok(()))) {
                writer_cut.cancel();
                while rx.recv().await.is_some() {}
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let count = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    let bytes = Arc::new(Semaphore::new(IN_FLIGHT_BYTES_MAX as usize));
    let tracker = TaskTracker::new();
    let result = loop {
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        let read = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            _ = cut.cancelled() => break Err(NbdError::Protocol("the client stopped reading its replies".into())),
            r = r.read_exact(&mut hdr) => r,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(NbdError::Io(e)),
        }
        let h = match decode_request(&hdr) {
            Ok(h) => h,
            Err(Verdict::Fatal(m)) => break Err(NbdError::Protocol(m.into())),
            Err(Verdict::Errno(e)) => break Err(NbdError::Protocol(format!("bad request (errno {e})"))),
        };
        let structured_read = structured && matches!(h.kind, CMD_READ | CMD_BLOCK_STATUS);
        if let Err(v) = validate(&h, size, structured, meta_context) {
            match v {
                Verdict::Fatal(m) => break Err(NbdError::Protocol(m.into())),
                Verdict::Errno(e) => {
                    if h.kind == CMD_WRITE {
                        // Skip the payload (bounded: larger ones are fatal above).
                        let mut sink = vec![0u8; h.length as usize];
                        if let Err(e) = r.read_exact(&mut sink).await {
                            break Err(NbdError::Io(e));
                        }
                    }
                    let _ =
                        tx.send((error_reply(h.handle, e, "invalid request", structured_read), None)).await;
                    continue;
                }
            }
        }
        if h.kind == CMD_DISC {
            break Ok(());
        }
        let Ok(slot) = count.clone().acquire_owned().await else { break Ok(()) };
        let payload_bytes = if matches!(h.kind, CMD_READ | CMD_WRITE) { h.length.max(1) } else { 1 };
        let Ok(budget) = bytes.clone().acquire_many_owned(payload_bytes).await else { break Ok(()) };
        let mut payload = Vec::new();
        if h.kind == CMD_WRITE {
            payload = vec![0u8; h.length as usize];
            if let Err(e) = r.read_exact(&mut payload).await {
                break Err(NbdError::Io(e));
            }
        }
        let client = client.clone();
        let tx = tx.clone();
        tracker.spawn(async move {
            let reply = execute(&client, h, payload, structured_read).await;
            let _ = tx.send((reply, Some((slot, budget)))).await;
        });
    };
    // Finish the requests already started (NBD_CMD_DISC requires it), then close.
    tracker.close();
    tracker.wait().await;
    drop(tx);
    let _ = writer.await;
    result
}

async fn execute(
    client: &VolumeClient,
    h: RequestHeader,
    payload: Vec<u8>,
    structured_read: bool,
) -> Vec<u8> {
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(h.length);
    let outcome: Result<Vec<u8>, IoError> = match h.kind {
        CMD_READ => match client.read(h.offset, len).await {
            Ok(data) => {
                return if structured_read {
                    let mut p = h.offset.to_be_bytes().to_vec();
                    p.extend_from_slice(&data);
                    structured_chunk(h.handle, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, &p)
                } else {
                    simple_reply(h.handle, 0, &data)
                };
            }
            Err(e) => Err(e),
        },
        CMD_WRITE => client.write(h.offset, bytes::Bytes::from(payload), fua).await.map(|_| Vec::new()),
        CMD_FLUSH => client.flush().await.map(|_| Vec::new()),
        CMD_TRIM => client.trim(h.offset, len, fua).await.map(|_| Vec::new()),
        CMD_CACHE => Ok(Vec::new()),
        CMD_WRITE_ZEROES => {
            client.write_zeroes(h.offset, len, h.flags & CMD_FLAG_NO_HOLE != 0, fua).await.map(|_| Vec::new())
        }
        CMD_BLOCK_STATUS => match client.allocation(h.offset, len).await {
            Ok(runs) => {
                let mut p = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                let take = if h.flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { runs.len() };
                for (n, hole) in runs.into_iter().take(take) {
                    p.extend_from_slice(&(n as u32).to_be_bytes());
                    let flags = if hole { STATE_HOLE | STATE_ZERO } else { 0 };
                    p.extend_from_slice(&flags.to_be_bytes());
                }
                return structured_chunk(h.handle, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, &p);
            }
            Err(e) => Err(e),
        },
        _ => Err(IoError::Invalid(format!("command {}", h.kind))),
    };
    match outcome {
        Ok(_) => simple_reply(h.handle, 0, &[]),
        Err(e) => {
            if !matches!(e, IoError::Fenced) {
                tracing::warn!(
                    command = h.kind,
                    offset = h.offset,
                    length = h.length,
                    "NBD request failed: {e}"
                );
            }
            error_reply(h.handle, errno(&e), &e.to_string(), structured_read)
        }
    }
}
