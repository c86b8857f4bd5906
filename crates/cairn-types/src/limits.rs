//! Sizes and limits, kept together. Every limit says why it has its value.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The unit of checksumming and of the on-disk block table. 4 KiB matches the page size, the logical
/// block size of modern disks and what guests issue most, so a guest write is rarely read-modify-write.
pub const BLOCK_SIZE_BYTES: u32 = 4096;

/// Smallest chunk: 64 KiB keeps the per-chunk header and table overhead (8 KiB) below 12 %.
pub const CHUNK_SIZE_MIN_BYTES: u32 = 64 * 1024;
/// Largest chunk: 64 MiB; beyond that catch-up and recovery, which move whole changed chunks, get coarse.
pub const CHUNK_SIZE_MAX_BYTES: u32 = 64 * 1024 * 1024;
/// Default chunk: 1 MiB. A 40 GiB volume is 40 960 chunks, spread over every node, so even a small
/// volume stripes over a whole pool; a changed chunk costs at most 1 MiB to copy during catch-up; and
/// the per-chunk state (header + block table, 8 KiB) stays under 1 % of the data.
pub const CHUNK_SIZE_DEFAULT_BYTES: u32 = 1024 * 1024;

/// Largest data payload of a single node-RPC request or reply. Guests send at most 32 MiB (NBD's
/// maximum); the client splits larger IO per chunk and per this limit, so that one request never pins
/// more than 4 MiB of a node's memory.
pub const RPC_IO_MAX_BYTES: u32 = 4 * 1024 * 1024;

const _: () = assert!(CHUNK_SIZE_MIN_BYTES.is_power_of_two() && CHUNK_SIZE_MAX_BYTES.is_power_of_two());
const _: () = assert!(CHUNK_SIZE_DEFAULT_BYTES.is_power_of_two());
const _: () = assert!(CHUNK_SIZE_MIN_BYTES.is_multiple_of(BLOCK_SIZE_BYTES));
const _: () = assert!(CHUNK_SIZE_MIN_BYTES <= CHUNK_SIZE_DEFAULT_BYTES);
const _: () = assert!(CHUNK_SIZE_DEFAULT_BYTES <= CHUNK_SIZE_MAX_BYTES);
const _: () = assert!(RPC_IO_MAX_BYTES.is_multiple_of(BLOCK_SIZE_BYTES));

/// Why a chunk size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkSizeError {
    #[error("chunk size {0} bytes is not a power of two")]
    NotPowerOfTwo(u32),
    #[error("chunk size {0} bytes is out of range ({CHUNK_SIZE_MIN_BYTES} to {CHUNK_SIZE_MAX_BYTES} bytes)")]
    OutOfRange(u32),
}

/// A validated chunk size: a power of two between the minimum and the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ChunkSize(u32);

impl ChunkSize {
    pub const DEFAULT: ChunkSize = ChunkSize(CHUNK_SIZE_DEFAULT_BYTES);

    pub fn new(bytes: u32) -> Result<Self, ChunkSizeError> {
        if !(CHUNK_SIZE_MIN_BYTES..=CHUNK_SIZE_MAX_BYTES).contains(&bytes) {
            return Err(ChunkSizeError::OutOfRange(bytes));
        }
        if !bytes.is_power_of_two() {
            return Err(ChunkSizeError::NotPowerOfTwo(bytes));
        }
        Ok(Self(bytes))
    }

    pub fn bytes(self) -> u32 {
        self.0
    }

    /// Number of 4 KiB blocks in one chunk.
    pub fn blocks(self) -> u32 {
        self.0 / BLOCK_SIZE_BYTES
    }
}

impl Default for ChunkSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u32> for ChunkSize {
    type Error = ChunkSizeError;
    fn try_from(bytes: u32) -> Result<Self, ChunkSizeError> {
        Self::new(bytes)
    }
}

impl From<ChunkSize> for u32 {
    fn from(size: ChunkSize) -> u32 {
        size.0
    }
}

impl fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} KiB", self.0 / 1024)
    }
}

/// How long a node's read lease lasts, from when its request left (see `cairn_meta`'s
/// `MetaService::lease_covers`).
pub const READ_LEASE: std::time::Duration = std::time::Duration::from_secs(3);

/// How long after it last granted a node a read lease a peer holds back the acknowledgement of a
/// write that node missed: the lease plus a margin for clocks that run at slightly different
/// rates and for the answer's way back. Clients wait this much longer than their RPC timeout for
/// a reply to a mutation that names missed peers.
pub const READ_LEASE_HOLDBACK: std::time::Duration = std::time::Duration::from_millis(3500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_validation() {
        assert!(ChunkSize::new(1024 * 1024).is_ok());
        assert_eq!(ChunkSize::new(3 * 1024 * 1024), Err(ChunkSizeError::NotPowerOfTwo(3 * 1024 * 1024)));
        assert_eq!(ChunkSize::new(4096), Err(ChunkSizeError::OutOfRange(4096)));
        assert_eq!(ChunkSize::new(128 << 20), Err(ChunkSizeError::OutOfRange(128 << 20)));
        assert_eq!(ChunkSize::DEFAULT.blocks(), 256);
    }
}
