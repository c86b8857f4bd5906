//! One range of a chunk read as a copy (for reconciliation, catch-up and verification): which
//! blocks hold data, with every block's bytes and checksum. Holes stay holes in a copy.

use bytes::Bytes;
use cairn_proto::message::present_blocks;
use cairn_proto::{Request, Response};
use cairn_types::{BLOCK_SIZE_BYTES, ChunkIndex, ChunkSize, Version, VolumeId};

/// A range of a chunk as one node holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Per block: holds data (else a hole).
    pub present: Vec<bool>,
    /// Per block: its checksum (the zero block's for holes).
    pub crcs: Vec<u32>,
    /// Every block's bytes.
    pub data: Bytes,
    /// The chunk's version when the range was read (with the data, under the chunk's lock).
    pub version: Version,
}

impl Piece {
    /// The payload of an `InstallRange` for this piece: the present blocks and their checksums.
    pub fn present_only(&self) -> (Bytes, Vec<u32>) {
        // Sizes were checked when the piece was read.
        present_blocks(&self.present, &self.data, &self.crcs).unwrap_or_default()
    }
}

/// Reads `[offset, offset + len)` of a chunk through `call` (one request to one node): its data,
/// which blocks hold data and its version, as of one moment. An error reply, an unexpected reply
/// or inconsistent sizes are `Err`. It is a client read: a node that does not serve client IO
/// (catching up, or restarted and not yet known so) refuses it, so a copy never comes from a node
/// that is not in sync by its own, current map; `ReadCopy` (with [`piece_from`]) is the one exception.
pub async fn read_piece<F, Fut>(
    call: F,
    volume: VolumeId,
    chunk: ChunkIndex,
    chunk_size: ChunkSize,
    offset: u32,
    len: u32,
) -> Result<Piece, String>
where
    F: Fn(Request) -> Fut,
    Fut: std::future::Future<Output = Result<Response, String>>,
{
    piece_from(call(Request::Read { volume, chunk, chunk_size, offset, len }).await?)
}

/// A piece from a `Read` (or `ReadCopy`) reply; an unexpected reply or inconsistent sizes are `Err`.
pub fn piece_from(reply: Response) -> Result<Piece, String> {
    let (crcs, data, present, version) = match reply {
        Response::Read { crcs, data, present, version } => (crcs, data, present, version),
        other => return Err(format!("read: unexpected reply {other:?}")),
    };
    if crcs.len() != present.len() || data.len() != present.len() * BLOCK_SIZE_BYTES as usize {
        return Err("read reply: sizes do not match".into());
    }
    Ok(Piece { present, crcs, data, version })
}
