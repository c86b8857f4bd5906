//! Messages carried in frame bodies, encoded with postcard (serde). Block data travels as raw bytes
//! beside the CRC-32C of every 4 KiB block, which the receiver verifies end to end.

use bytes::Bytes;
use cairn_types::{ChunkIndex, ChunkSize, Expected, Generation, Version, VolumeId};
use serde::{Deserialize, Serialize};

/// The client's hello: the protocol versions it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version_min: u16,
    pub version_max: u16,
}

/// The server's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// The version both will speak from now on.
    Accepted { version: u16 },
    /// No common version; the server closes the connection.
    Refused(RpcError),
}

/// Who issued a mutation: writer generation (fencing) and the writer's sequence number. The
/// mutation leaves the chunk at version `(generation, sequence)`; with `expect` (version 4) a node
/// applies it only to a copy at the version the writer expects, else answers
/// [`RpcError::VersionMismatch`] and changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Stamp {
    pub generation: Generation,
    pub sequence: u64,
    pub expect: Option<Expected>,
}

/// A request to a storage node. Offsets and lengths are in bytes within the chunk and must be
/// multiples of 4 KiB; a request covers at most `RPC_IO_MAX_BYTES`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Read {
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        len: u32,
    },
    Write {
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        stamp: Stamp,
        /// CRC-32C of each 4 KiB block of `data`.
        crcs: Vec<u32>,
        data: Bytes,
        /// Replicas of this chunk the writer knows will not get this write (down or catching up):
        /// the node records them so that it later brings them up to date.
        missed_by: Vec<u64>,
        /// The membership interval of the chunk's PG in the writer's map (version 7): a node whose
        /// map has a newer one refuses the mutation ("stale cluster map"), since a writer routing
        /// by older members may leave a newer member out without naming it.
        pg_interval: u64,
    },
    Trim {
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        len: u32,
        stamp: Stamp,
        /// As for `Write` (version 2).
        missed_by: Vec<u64>,
        /// As for `Write` (version 7).
        pg_interval: u64,
    },
    WriteZeroes {
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        len: u32,
        stamp: Stamp,
        /// Keep the blocks allocated (NBD's NO_HOLE) instead of punching a hole.
        allocate: bool,
        /// As for `Write` (version 2).
        missed_by: Vec<u64>,
        /// As for `Write` (version 7).
        pg_interval: u64,
    },
    /// Make every mutation of the volume acknowledged before this request durable.
    Flush {
        volume: VolumeId,
    },
    /// The persisted state of a chunk.
    ChunkVersion {
        volume: VolumeId,
        chunk: ChunkIndex,
    },
    /// A message between metadata peers (Raft, heartbeats, joins); the body belongs to cairn-meta.
    Peer {
        body: Bytes,
    },
    /// Which blocks hold data (for NBD block status).
    Allocation {
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        len: u32,
    },
    /// Record that `peers` missed writes to this chunk (they failed during a write).
    RecordMissed {
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        peers: Vec<u64>,
        /// Record only if this node's copy is still at this version (version 5): the one the
        /// write being acknowledged left here. A copy replaced meanwhile (another writer's
        /// reconciliation of a shared volume) no longer holds that write, and acknowledging it
        /// would lose it; the node refuses (`VersionMismatch`), checked and recorded in one step
        /// with respect to installs.
        at: Option<Version>,
        /// Version 9: the record is a new writer's, for holders its open's reconciliation of the
        /// chunk left out, at this writer generation: the copy it sends them goes over one of an
        /// older generation even if higher (a fenced writer's leftover the open settled without).
        settled: Option<Generation>,
    },
    /// Catch-up: replace a range of a chunk with a peer's copy. `data` holds the present blocks.
    InstallRange {
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        present: Vec<bool>,
        crcs: Vec<u32>,
        data: Bytes,
        /// The sender's writer generation (version 2): refused below the volume's fence, so a
        /// superseded writer's reconciliation cannot overwrite a newer writer's data.
        generation: Generation,
        /// The copy's version (version 4): the chunk is at it once the range is installed.
        version: Version,
        /// Install only if this node's copy is still at this version (version 4): a
        /// reconciliation planned against it never overwrites a newer one.
        expect: Option<Version>,
        /// The node the copy comes from (version 5): refused (`VersionMismatch`) if this node
        /// recorded it as having missed a write to the chunk — a record made after the copy was
        /// planned (the write it missed is here, and the copy would undo it).
        source: Option<u64>,
        /// Version 9: the copy is sent for a record an open of this writer generation settled
        /// (`RecordMissed::settled`). A copy here of an older generation then takes it even if
        /// this node recorded the source as having missed the chunk — by a write of an older
        /// generation, or an earlier open (the settled one decides): that record is of writes the
        /// open settled. (Else two such nodes, each recording the other, refused each other's
        /// copies for good.)
        settled: Option<Generation>,
        /// Version 9: the source's copy is dirty (changed lately: it may hold a write never
        /// confirmed); the copy installed stays dirty too, so the next open reconciles it and a
        /// catch-up compares it (else an old writer's stray spread by a copy was served beside
        /// the other replicas' copy after the open).
        dirty: bool,
    },
    /// Rewrite blocks this node holds corrupt with good copies read elsewhere.
    Repair {
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        crcs: Vec<u32>,
        data: Bytes,
    },
    /// A new writer opened the volume with `generation` (version 2): persist it as the volume's
    /// fence, wait for mutations admitted under the old fence to finish, and report the chunks
    /// that are dirty here (they may differ between replicas).
    Fence {
        volume: VolumeId,
        generation: Generation,
    },
    /// The chunks of `volume` this node holds with an index above `after` (all if `None`), in
    /// order, at most `limit` (capped at [`CHUNK_LIST_MAX`]) (version 3): a node that lost power
    /// compares them with its own to find chunk files that vanished.
    ListChunks {
        volume: VolumeId,
        after: Option<ChunkIndex>,
        limit: u32,
    },
    /// A range of a chunk read as a copy, for reconciliation, recovery and verification (version
    /// 4): answered like `Read` (with allocation and version) whether or not the node serves client
    /// IO — a node catching up still answers for its copy, and the asker decides what it is worth.
    ReadCopy {
        volume: VolumeId,
        chunk: ChunkIndex,
        chunk_size: ChunkSize,
        offset: u32,
        len: u32,
    },
}

/// Most chunk indexes in one `ChunkList` reply (8 bytes each: well inside a frame).
pub const CHUNK_LIST_MAX: u32 = 65_536;

impl Request {
    /// The volume the request is about (`None` for metadata peer messages).
    pub fn volume(&self) -> Option<VolumeId> {
        match self {
            Request::Read { volume, .. }
            | Request::Write { volume, .. }
            | Request::Trim { volume, .. }
            | Request::WriteZeroes { volume, .. }
            | Request::Flush { volume }
            | Request::ChunkVersion { volume, .. }
            | Request::Allocation { volume, .. }
            | Request::RecordMissed { volume, .. }
            | Request::InstallRange { volume, .. }
            | Request::Repair { volume, .. }
            | Request::Fence { volume, .. }
            | Request::ListChunks { volume, .. }
            | Request::ReadCopy { volume, .. } => Some(*volume),
            Request::Peer { .. } => None,
        }
    }

    /// Bytes of data this request carries or asks for: what it pins in memory while in flight.
    pub fn payload_bytes(&self) -> u64 {
        match self {
            Request::Read { len, .. } | Request::ReadCopy { len, .. } => u64::from(*len),
            Request::Write { data, .. } => data.len() as u64,
            Request::Peer { body } => body.len() as u64,
            Request::InstallRange { data, .. } | Request::Repair { data, .. } => data.len() as u64,
            _ => 0,
        }
    }
}

/// The persisted state of one chunk on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    pub generation: Generation,
    pub version: u64,
    pub last_sequence: u64,
    pub dirty: bool,
    /// Peers this node recorded as having missed a write to the chunk (version 4): their copies
    /// must never win a reconciliation (an acknowledged write may be missing from them).
    pub missed_by: Vec<u64>,
    /// The volume's writer generation this node has persisted (its fence; version 8): a node whose
    /// map lags learns from it that a newer writer opened the volume.
    pub fence: Generation,
    /// Whether this node serves client IO now (version 8): a copy on a node that does not (it is
    /// catching up, or its map lags) may be a fenced writer's leftover, not the pool's state.
    pub serving: bool,
}

impl ChunkInfo {
    /// A chunk the node does not hold: at version none, recorded as missed by nobody.
    pub fn absent() -> ChunkInfo {
        ChunkInfo {
            generation: Generation(0),
            version: 0,
            last_sequence: 0,
            dirty: false,
            missed_by: Vec::new(),
            fence: Generation(0),
            serving: false,
        }
    }

    /// The chunk's version.
    pub fn chunk_version(&self) -> Version {
        Version { generation: self.generation.0, seq: self.last_sequence }
    }
}

/// A storage node's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Data read, with the CRC-32C of each block (zero blocks carry the zero block's CRC), which
    /// blocks hold data and the chunk's version, all as of one moment (version 4).
    Read {
        crcs: Vec<u32>,
        data: Bytes,
        present: Vec<bool>,
        version: Version,
    },
    /// A write, trim or write-zeroes applied (or found applied already): the chunk's version now
    /// (version 4; none for a trim of a chunk the node does not hold).
    Applied {
        version: Version,
    },
    /// A mutation or flush completed.
    Done,
    /// Answer to `ChunkVersion`: `None` if the node holds no such chunk.
    ChunkVersion(Option<ChunkInfo>),
    Error(RpcError),
    /// Answer to `Peer`.
    Peer {
        body: Bytes,
    },
    /// Answer to `Allocation`: one entry per block, true if it holds data.
    Allocation {
        present: Vec<bool>,
    },
    /// Answer to `Fence`: the fence is raised; the volume's chunks dirty on this node, and whether
    /// this node serves client IO now (a catching-up node's copies must not win a reconciliation).
    FenceRaised {
        dirty: Vec<(ChunkIndex, ChunkInfo)>,
        serving: bool,
    },
    /// Answer to `ListChunks`; `more` if chunks past the last one listed remain.
    ChunkList {
        chunks: Vec<ChunkIndex>,
        more: bool,
    },
}

/// Every error that crosses the wire. Messages are for humans; the variant is for code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RpcError {
    #[error("volume {volume}: generation {generation} is fenced, a newer writer holds generation {highest}")]
    Fenced { volume: VolumeId, generation: Generation, highest: Generation },
    #[error("volume {volume} chunk {chunk} block {block} is corrupt: {message}")]
    Corrupt { volume: VolumeId, chunk: ChunkIndex, block: u32, message: String },
    #[error("volume {volume} chunk {chunk}: no space left on the storage node")]
    NoSpace { volume: VolumeId, chunk: ChunkIndex },
    #[error("storage node IO error: {message}")]
    Io { message: String },
    #[error("invalid request: {message}")]
    InvalidRequest { message: String },
    #[error(
        "no common protocol version: peer speaks {peer_min}..={peer_max}, we speak {ours_min}..={ours_max}"
    )]
    UnsupportedVersion { peer_min: u16, peer_max: u16, ours_min: u16, ours_max: u16 },
    #[error("storage node is shutting down")]
    ShuttingDown,
    #[error("storage node cannot serve this now: {message}")]
    Unavailable { message: String },
    /// The volume was deleted (version 3): its data is going away on every node.
    #[error("volume {volume} was deleted")]
    Deleted { volume: VolumeId },
    /// The node's copy of the chunk is not at the version the mutation expects (version 4);
    /// `behind`: it lacks mutations the writer expects it to have (it needs recovery); otherwise
    /// it holds another chain (a concurrent writer of a shared volume, or a leftover).
    #[error("chunk copy at version {current} is not the one the writer expects{}", if *behind { " (behind)" } else { "" })]
    VersionMismatch { current: Version, behind: bool },
    /// The node's copy of the chunk is damaged (version 5): its file failed its checks and was
    /// moved aside; the node holds no copy until one is installed from a replica.
    #[error("chunk copy is damaged: {message}")]
    Damaged { message: String },
}

/// The payload of an `InstallRange` from a read of the same range: the blocks `present` marks
/// (in order) and their checksums. `data` holds every block of the range, `crcs` one per block.
/// `None` if the sizes do not match.
pub fn present_blocks(present: &[bool], data: &[u8], crcs: &[u32]) -> Option<(Bytes, Vec<u32>)> {
    let bs = cairn_types::BLOCK_SIZE_BYTES as usize;
    if crcs.len() != present.len() || data.len() != present.len() * bs {
        return None;
    }
    let mut kept = Vec::new();
    let mut kept_crcs = Vec::new();
    for (i, p) in present.iter().enumerate() {
        if *p {
            kept.extend_from_slice(&data[i * bs..(i + 1) * bs]);
            kept_crcs.push(crcs[i]);
        }
    }
    Some((Bytes::from(kept), kept_crcs))
}

/// Why a body could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed message body: {0}")]
pub struct BodyError(#[from] postcard::Error);

/// Encodes a message body.
pub fn encode<T: Serialize>(message: &T) -> Result<Bytes, BodyError> {
    Ok(Bytes::from(postcard::to_allocvec(message)?))
}

/// Decodes a message body. Trailing bytes are an error: a body is exactly one message.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, BodyError> {
    let (value, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(BodyError(postcard::Error::DeserializeBadEncoding));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vol() -> impl Strategy<Value = VolumeId> {
        (1u64..).prop_map(|v| VolumeId::new(v).unwrap())
    }

    fn size() -> impl Strategy<Value = ChunkSize> {
        (16u32..=26).prop_map(|s| ChunkSize::new(1 << s).unwrap())
    }

    fn stamp() -> impl Strategy<Value = Stamp> {
        (any::<u64>(), any::<u64>(), any::<Option<(u64, u64)>>()).prop_map(|(g, s, e)| Stamp {
            generation: Generation(g),
            sequence: s,
            expect: e.map(|(generation, seq)| Expected::Exact(Version { generation, seq })),
        })
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (vol(), any::<u64>(), size(), any::<u32>(), any::<u32>()).prop_map(
                |(volume, c, chunk_size, offset, len)| {
                    Request::Read { volume, chunk: ChunkIndex(c), chunk_size, offset, len }
                }
            ),
            (
                vol(),
                any::<u64>(),
                size(),
                any::<u32>(),
                stamp(),
                proptest::collection::vec(any::<u32>(), 0..8),
                proptest::collection::vec(any::<u8>(), 0..512)
            )
                .prop_map(|(volume, c, chunk_size, offset, stamp, crcs, data)| Request::Write {
                    volume,
                    chunk: ChunkIndex(c),
                    chunk_size,
                    offset,
                    stamp,
                    crcs,
                    data: Bytes::from(data),
                    missed_by: vec![2, 3],
                    pg_interval: 7,
                }),
            (vol(), any::<u64>(), size(), any::<u32>(), any::<u32>(), stamp()).prop_map(
                |(volume, c, chunk_size, offset, len, stamp)| Request::Trim {
                    volume,
                    chunk: ChunkIndex(c),
                    chunk_size,
                    offset,
                    len,
                    stamp,
                    missed_by: vec![3],
                    pg_interval: 1,
                }
            ),
            (vol(), any::<u64>(), size(), any::<u32>(), any::<u32>(), stamp(), any::<bool>()).prop_map(
                |(volume, c, chunk_size, offset, len, stamp, allocate)| {
                    Request::WriteZeroes {
                        volume,
                        chunk: ChunkIndex(c),
                        chunk_size,
                        offset,
                        len,
                        stamp,
                        allocate,
                        missed_by: Vec::new(),
                        pg_interval: 0,
                    }
                }
            ),
            vol().prop_map(|volume| Request::Flush { volume }),
            (vol(), any::<u64>())
                .prop_map(|(volume, g)| Request::Fence { volume, generation: Generation(g) }),
            (vol(), any::<u64>())
                .prop_map(|(volume, c)| Request::ChunkVersion { volume, chunk: ChunkIndex(c) }),
            (vol(), proptest::option::of(any::<u64>()), any::<u32>()).prop_map(|(volume, after, limit)| {
                Request::ListChunks { volume, after: after.map(ChunkIndex), limit }
            }),
        ]
    }

    fn rpc_error() -> impl Strategy<Value = RpcError> {
        prop_oneof![
            (vol(), any::<u64>(), any::<u64>()).prop_map(|(volume, g, h)| RpcError::Fenced {
                volume,
                generation: Generation(g),
                highest: Generation(h)
            }),
            (vol(), any::<u64>(), any::<u32>(), ".{0,40}").prop_map(|(volume, c, block, message)| {
                RpcError::Corrupt { volume, chunk: ChunkIndex(c), block, message }
            }),
            (vol(), any::<u64>()).prop_map(|(volume, c)| RpcError::NoSpace { volume, chunk: ChunkIndex(c) }),
            ".{0,40}".prop_map(|message| RpcError::Io { message }),
            ".{0,40}".prop_map(|message| RpcError::InvalidRequest { message }),
            (any::<u16>(), any::<u16>()).prop_map(|(a, b)| RpcError::UnsupportedVersion {
                peer_min: a,
                peer_max: b,
                ours_min: 1,
                ours_max: 1
            }),
            Just(RpcError::ShuttingDown),
            vol().prop_map(|volume| RpcError::Deleted { volume }),
            (any::<u64>(), any::<bool>()).prop_map(|(seq, behind)| RpcError::VersionMismatch {
                current: Version { generation: 1, seq },
                behind
            }),
        ]
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            (proptest::collection::vec(any::<u32>(), 0..8), proptest::collection::vec(any::<u8>(), 0..512))
                .prop_map(|(crcs, data)| Response::Read {
                    present: crcs.iter().map(|c| c % 2 == 0).collect(),
                    crcs,
                    data: Bytes::from(data),
                    version: Version { generation: 3, seq: 9 },
                }),
            Just(Response::Done),
            (any::<u64>(), any::<u64>())
                .prop_map(|(generation, seq)| Response::Applied { version: Version { generation, seq } }),
            proptest::option::of((any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>())).prop_map(|o| {
                Response::ChunkVersion(o.map(|(g, version, last_sequence, dirty)| ChunkInfo {
                    generation: Generation(g),
                    version,
                    last_sequence,
                    dirty,
                    missed_by: vec![g % 7],
                    fence: Generation(version),
                    serving: dirty,
                }))
            }),
            rpc_error().prop_map(Response::Error),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| Response::Peer { body: Bytes::from(b) }),
            proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..8).prop_map(|v| {
                Response::FenceRaised {
                    serving: true,
                    dirty: v
                        .into_iter()
                        .map(|(c, g, s)| {
                            let info = ChunkInfo {
                                generation: Generation(g),
                                version: 1,
                                last_sequence: s,
                                dirty: true,
                                missed_by: Vec::new(),
                                fence: Generation(g),
                                serving: true,
                            };
                            (ChunkIndex(c), info)
                        })
                        .collect(),
                }
            }),
            (proptest::collection::vec(any::<u64>(), 0..64), any::<bool>()).prop_map(|(c, more)| {
                Response::ChunkList { chunks: c.into_iter().map(ChunkIndex).collect(), more }
            }),
        ]
    }

    proptest! {
        #[test]
        fn request_round_trip(r in request()) {
            let body = encode(&r).unwrap();
            prop_assert_eq!(decode::<Request>(&body).unwrap(), r);
        }

        #[test]
        fn response_round_trip(r in response()) {
            let body = encode(&r).unwrap();
            prop_assert_eq!(decode::<Response>(&body).unwrap(), r);
        }

        #[test]
        fn hello_round_trip(a in any::<u16>(), b in any::<u16>(), e in rpc_error()) {
            let h = Hello { version_min: a, version_max: b };
            prop_assert_eq!(decode::<Hello>(&encode(&h).unwrap()).unwrap(), h);
            for reply in [HelloReply::Accepted { version: a }, HelloReply::Refused(e)] {
                prop_assert_eq!(decode::<HelloReply>(&encode(&reply).unwrap()).unwrap(), reply);
            }
        }

        #[test]
        fn arbitrary_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
            let _ = decode::<Hello>(&bytes);
            let _ = decode::<HelloReply>(&bytes);
        }
    }

    #[test]
    fn zero_volume_id_is_refused() {
        // A body naming volume 0 must not decode into a VolumeId.
        let body = encode(&(0u8, 0u64, 0u64)).unwrap();
        assert!(decode::<Request>(&body).is_err());
    }
}
